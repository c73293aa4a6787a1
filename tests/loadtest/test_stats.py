"""Unit tests: percentiles and distributions, Result metrics, routing confusion, mix parsing and sampling."""
from __future__ import annotations

import random
import statistics

import numpy as np
import pytest

from loadtest.client import Result, check_url
from loadtest.report import distribution, routing_section, summarize
from loadtest.runner import poisson_offsets
from loadtest.workload import LoadtestError, Row, Workload, load_data_file, parse_mix
from twin.util import percentile


def test_percentile_known_values():
    xs = list(range(1, 11))  # 1..10
    assert percentile(xs, 50) == pytest.approx(5.5)
    assert percentile(xs, 95) == pytest.approx(9.55)
    assert percentile(xs, 99) == pytest.approx(9.91)
    assert percentile(xs, 0) == 1 and percentile(xs, 100) == 10
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    assert percentile([3, 1, 2], 50) == 2  # order does not matter
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_percentile_matches_numpy():
    rng = random.Random(1)
    xs = [rng.expovariate(3.0) for _ in range(257)]
    for p in (50, 95, 99, 12.5):
        assert percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)))


def test_distribution_in_ms():
    d = distribution([0.001 * i for i in range(1, 101)])  # 1..100 ms
    assert d["n"] == 100
    assert d["mean"] == pytest.approx(50.5)
    assert d["min"] == pytest.approx(1) and d["max"] == pytest.approx(100)
    assert d["p50"] == pytest.approx(50.5) and d["p95"] == pytest.approx(95.05) and d["p99"] == pytest.approx(99.01)
    assert distribution([]) == {"n": 0, "mean": None, "min": None, "max": None, "p50": None, "p95": None, "p99": None}


def test_result_tokens_tpot_correct():
    r = Result(index=0, task="reverse", target="cba", ttft=0.1, e2e=0.5, chunks=5, text=" cba\n")
    assert r.tokens == 5 and r.tpot == pytest.approx(0.1) and r.correct is True
    r.usage_tokens = 3  # usage wins over the chunk count
    assert r.tokens == 3 and r.tpot == pytest.approx(0.2)
    assert Result(index=1, task="t", ttft=0.1, e2e=0.2, chunks=1).tpot is None  # one token: no TPOT
    assert Result(index=2, task="t", target="x", error="429").correct is None
    assert Result(index=3, task="t", text="x").correct is None  # no target


def _routed(task, top, ok=True, labeled=True):
    return Result(index=0, task=task, labeled=labeled, error=None if ok else "500",
                  routing={"top_expert": top} if top != "-" else None, top_expert=None if top == "-" else top)


def test_routing_confusion_exact():
    rs = ([_routed("a", "a")] * 3 + [_routed("a", "b")] + [_routed("b", "b")] * 2 + [_routed("b", None)]
          + [_routed("a", "a", ok=False)]          # failed: not counted
          + [_routed("unlabeled", "a", labeled=False)]  # no label: not counted
          + [_routed("b", "-")])                    # no routing info: not counted
    rt = routing_section(rs)
    assert rt["n"] == 7 and rt["correct"] == 5 and rt["accuracy"] == pytest.approx(5 / 7)
    assert rt["labels"] == ["a", "b"] and rt["columns"] == ["a", "b", "(none)"]
    assert rt["matrix"] == [[3, 1, 0], [0, 2, 1]]
    assert rt["confusion"]["b"]["(none)"] == 1


def test_summarize_errors_and_throughput():
    rs = [Result(index=i, task="a", ttft=0.01, e2e=0.05, chunks=4, text="x", target="x") for i in range(6)]
    rs += [Result(index=6, task="a", error="429", status=429), Result(index=7, task="b", error="conn_error"),
           Result(index=8, task="a", error="429", status=429)]
    rep = summarize(rs, wall_s=2.0)
    assert rep["errors"] == {"429": 2, "conn_error": 1}
    s = rep["summary"]
    assert (s["requests"], s["ok"], s["failed"]) == (9, 6, 3)
    assert s["throughput_rps"] == pytest.approx(3.0) and s["output_tokens_per_s"] == pytest.approx(12.0)
    assert s["exact_match"] == 1.0
    assert rep["tasks"]["a"]["errors"] == {"429": 2} and rep["tasks"]["b"]["ok"] == 0
    assert rep["latency"]["ttft_ms"]["p50"] == pytest.approx(10.0)
    assert rep["latency"]["tpot_ms"]["p99"] == pytest.approx(40 / 3)


def test_parse_mix():
    assert parse_mix("reverse=2, upper=1") == {"reverse": 2.0, "upper": 1.0}
    assert parse_mix(None) is None and parse_mix("") is None
    for bad, words in [("reverse=0", "positive"), ("reverse=-1", "positive"), ("reverse=nan", "positive"),
                       ("reverse", "task=proportion"), ("reverse=x", "not a number"), ("a=1,a=2", "twice")]:
        with pytest.raises(LoadtestError, match=words):
            parse_mix(bad)


def test_workload_sampling_proportions_and_unknown_task():
    pools = {t: [Row(prompt=f"{t} {i}=", task=t) for i in range(5)] for t in ("a", "b", "c")}
    w = Workload(pools, {"a": 3, "b": 1})
    assert w.weights == {"a": 0.75, "b": 0.25}
    rng = random.Random(0)
    draws = [w.sample(rng).task for _ in range(8000)]
    assert "c" not in draws
    assert draws.count("a") / len(draws) == pytest.approx(0.75, abs=0.02)
    rng1, rng2 = random.Random(5), random.Random(5)
    assert [w.sample(rng1) for _ in range(50)] == [w.sample(rng2) for _ in range(50)]  # seeded
    with pytest.raises(LoadtestError, match="nosuch"):
        Workload(pools, {"a": 1, "nosuch": 1})


def test_load_data_file_labels(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "p1", "label": "x", "target": "t"}\n\n{"prompt": "p2", "task": "y"}\n{"prompt": "p3"}\n')
    pools = load_data_file(f)
    assert pools["x"] == [Row("p1", "x", "t")] and pools["y"] == [Row("p2", "y")]
    assert pools["unlabeled"] == [Row("p3", "unlabeled", None, labeled=False)]
    f.write_text('{"label": "x"}\n')
    with pytest.raises(LoadtestError, match="prompt"):
        load_data_file(f)
    with pytest.raises(LoadtestError, match="not found"):
        load_data_file(tmp_path / "missing.jsonl")


def test_poisson_offsets():
    offs = poisson_offsets(50.0, 5000, random.Random(0))
    assert len(offs) == 5000 and offs == sorted(offs)
    gaps = np.diff([0.0] + offs)
    assert statistics.mean(gaps) == pytest.approx(0.02, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(0.02, rel=0.08)  # exponential: sd == mean
    cut = poisson_offsets(10.0, 1000, random.Random(0), horizon=1.0)
    assert 0 < len(cut) < 30 and cut[-1] <= 1.0


def test_check_url():
    assert check_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert check_url("http://localhost:8000/v1") == "http://localhost:8000"
    for bad in ("127.0.0.1:8000", "ftp://x", "http://", "http://h/?a=1"):
        with pytest.raises(LoadtestError):
            check_url(bad)
