"""Defects a new-user trial found: each with the right value."""
from __future__ import annotations

import pytest

from tests.conftest import app_client


@pytest.fixture(scope="module")
def c(routed_artifact):
    with app_client(routed_artifact) as client:
        yield client


def test_malformed_json_names_no_field(c):
    r = c.post("/v1/completions", content=b'{"model": "tiny", "prompt": ', headers={"content-type": "application/json"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] is None and err["code"] == "invalid_json"
    assert "not valid JSON" in err["message"] and "character 28" in err["message"]


def test_fallback_reports_no_top_expert(c):
    # letters of no task: the router's distance fallback fires (see tests/conftest.py ROUTER_UNKNOWN_LETTERS)
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "vwxyz vvwx yzzy wxyv", "max_tokens": 2})
    routing = r.json()["twin"]["routing"]
    assert routing["fallback"] is True
    assert routing["top_expert"] is None and routing["router_guess"] in ("math", "code", "chat")


def test_echo_with_max_tokens_zero_scores_the_prompt(c):
    r = c.post("/v1/completions", json={"model": "tiny:math", "prompt": "add abc", "max_tokens": 0, "echo": True,
                                        "logprobs": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == "add abc" and choice["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]["token_logprobs"]
    assert lp[0] is None and len(lp) == len(choice["logprobs"]["tokens"]) and all(x < 0 for x in lp[1:])
    bad = c.post("/v1/completions", json={"model": "tiny", "prompt": "add abc", "max_tokens": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
