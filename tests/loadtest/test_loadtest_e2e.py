"""End to end against the fake streaming server: accuracy, routing confusion, 429s, bounds, report, plot."""
from __future__ import annotations

import json
import random

import pytest

from loadtest.cli import main
from loadtest.runner import RunConfig, poisson_offsets, run
from loadtest.workload import Workload, load_tasks_dir, parse_mix
from twin.util import free_port


def _run(tmp_path, url, tasks_dir, *extra, plot=False):
    out = tmp_path / "report.json"
    argv = ["--url", url, "--tasks", str(tasks_dir), "--out", str(out), "--no-progress", *extra]
    if plot:
        argv += ["--plot", str(tmp_path / "report.png")]
    rc = main(argv)
    return rc, (json.loads(out.read_text()) if out.exists() else None)


def _expected_tasks(tasks_dir, mix, n, seed=0):
    """Replay the runner's seeded prompt draw: the labels of the first ``n`` prompts."""
    w = Workload(load_tasks_dir(tasks_dir), parse_mix(mix))
    rng = random.Random(f"{seed}:prompts")
    return [w.sample(rng).task for _ in range(n)]


def test_closed_loop_accuracy_routing_report_and_plot(fake, tasks_dir, tmp_path):
    mix = "reverse=1,upper=1,shift=2"
    rc, rep = _run(tmp_path, fake.url, tasks_dir, "--concurrency", "4", "--requests", "40", "--mix", mix, plot=True)
    assert rc == 0
    labels = _expected_tasks(tasks_dir, mix, 40)
    n = {t: labels.count(t) for t in ("reverse", "upper", "shift")}
    assert all(n.values())

    # schema
    assert set(rep) >= {"schema_version", "config", "workload", "summary", "latency", "errors", "tasks",
                        "routing", "results"}
    assert set(rep["summary"]) >= {"requests", "ok", "failed", "duration_s", "throughput_rps", "output_tokens",
                                   "output_tokens_per_s", "exact_match", "routing_accuracy", "stopped_by"}
    for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(rep["latency"][k]) == {"n", "mean", "min", "max", "p50", "p95", "p99"}
        assert rep["latency"][k]["p50"] > 0
    assert set(rep["routing"]) >= {"accuracy", "labels", "columns", "confusion", "matrix"}
    assert rep["config"]["mode"] == "closed" and rep["config"]["concurrency"] == 4
    assert rep["config"]["api_key"] is False
    assert rep["workload"]["shift"]["weight"] == pytest.approx(0.5)

    s = rep["summary"]
    assert (s["requests"], s["ok"], s["failed"]) == (40, 40, 0) and rep["errors"] == {}
    assert s["stopped_by"] == "requests" and s["throughput_rps"] > 0 and s["output_tokens_per_s"] > 0
    assert s["exact_match"] == pytest.approx((n["reverse"] + n["upper"]) / 40)
    assert s["routing_accuracy"] == pytest.approx((n["reverse"] + n["upper"]) / 40)
    t = rep["tasks"]
    assert {k: t[k]["requests"] for k in n} == n
    assert (t["reverse"]["exact_match"], t["upper"]["exact_match"], t["shift"]["exact_match"]) == (1.0, 1.0, 0.0)
    assert (t["reverse"]["routing_accuracy"], t["upper"]["routing_accuracy"], t["shift"]["routing_accuracy"]) \
        == (1.0, 1.0, 0.0)
    rt = rep["routing"]
    assert rt["labels"] == ["reverse", "shift", "upper"] and rt["columns"] == rt["labels"]
    assert rt["confusion"] == {"reverse": {"reverse": n["reverse"], "shift": 0, "upper": 0},
                               "shift": {"reverse": 0, "shift": 0, "upper": n["shift"]},
                               "upper": {"reverse": 0, "shift": 0, "upper": n["upper"]}}
    assert rt["matrix"] == [[n["reverse"], 0, 0], [0, 0, n["shift"]], [0, 0, n["upper"]]]

    # tokens from usage; every request carried its prompt's label in order of issue
    assert s["output_tokens"] == sum(len(b["prompt"].split(" ")[1]) - 1 for b in fake.state.bodies)
    assert [r["task"] for r in rep["results"]] == labels
    assert all(b["stream"] is True and b["temperature"] == 0 for b in fake.state.bodies)

    png = tmp_path / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes left nothing behind


def test_errors_counted_by_status(fake, tasks_dir, tmp_path):
    fake.state.reject_every = 4
    rc, rep = _run(tmp_path, fake.url, tasks_dir, "--concurrency", "3", "--requests", "20")
    assert rc == 0
    assert rep["errors"] == {"429": 5}
    assert (rep["summary"]["ok"], rep["summary"]["failed"]) == (15, 5)
    failed = [r for r in rep["results"] if r["error"]]
    assert all(r["status"] == 429 and r["message"] == "queue full" for r in failed)
    assert sum(t["errors"].get("429", 0) for t in rep["tasks"].values()) == 5
    assert rep["latency"]["e2e_ms"]["n"] == 15  # latencies only over successes


def test_api_key_sent_and_401_counted(fake, tasks_dir, tmp_path):
    fake.state.api_key = "s3cret"
    rc, rep = _run(tmp_path, fake.url, tasks_dir, "--requests", "3", "--api-key", "wrong")
    assert rc == 1 and rep["errors"] == {"401": 3}
    rc, rep = _run(tmp_path, fake.url, tasks_dir, "--requests", "3", "--api-key", "s3cret")
    assert rc == 0 and rep["errors"] == {} and rep["config"]["api_key"] is True
    assert "s3cret" not in (tmp_path / "report.json").read_text()


def test_connection_refused_is_conn_error(tasks_dir, tmp_path):
    rc, rep = _run(tmp_path, f"http://127.0.0.1:{free_port()}", tasks_dir, "--requests", "4", "--concurrency", "2")
    assert rc == 1
    assert rep["errors"] == {"conn_error": 4} and rep["summary"]["ok"] == 0
    assert all(r["status"] is None for r in rep["results"])


def test_poisson_respects_requests_bound(fake, tasks_dir, tmp_path):
    rc, rep = _run(tmp_path, fake.url, tasks_dir, "--rate", "200", "--requests", "12", "--seed", "3")
    assert rc == 0
    assert rep["summary"]["requests"] == 12 == len(fake.state.bodies)
    assert rep["summary"]["stopped_by"] == "requests" and rep["config"]["mode"] == "open"
    assert [r["index"] for r in rep["results"]] == list(range(12))


def test_poisson_respects_duration_bound(fake, tasks_dir):
    cfg = RunConfig(url=fake.url, rate=8.0, requests=1000, duration=0.6, seed=1)
    expected = len(poisson_offsets(8.0, 1000, random.Random("1:arrivals"), horizon=0.6))
    out = run(Workload(load_tasks_dir(tasks_dir)), cfg)
    assert len(out.results) == expected == len(fake.state.bodies) and out.stopped_by == "duration"
    assert out.wall_s < 3
    starts = [r.start for r in out.results]
    assert starts == sorted(starts) and starts[-1] <= 0.6 + 0.3  # scheduled <= 0.6 s, plus jitter


def test_stream_metrics_and_chunk_token_count(fake, tasks_dir):
    fake.state.usage, fake.state.chars_per_chunk, fake.state.delay = False, 2, 0.01
    out = run(Workload(load_tasks_dir(tasks_dir), {"reverse": 1}), RunConfig(url=fake.url, requests=3))
    for r in out.results:
        assert r.ok and r.top_expert == "reverse" and r.correct
        n = len(r.target)
        assert r.usage_tokens is None and r.tokens == r.chunks == (n + 1) // 2  # counted from chunks
        assert len(r.itl) == r.tokens - 1 and all(g > 0 for g in r.itl)
        assert sum(r.itl) > 0.01  # the fake sleeps 10 ms before each chunk (timing jitter aside)
        assert 0 < r.ttft < r.e2e and r.tpot == pytest.approx((r.e2e - r.ttft) / (r.tokens - 1))


def test_timeout(fake, tasks_dir):
    fake.state.delay = 0.5
    out = run(Workload(load_tasks_dir(tasks_dir)), RunConfig(url=fake.url, requests=2, concurrency=2, timeout=0.2))
    assert [r.error for r in out.results] == ["timeout", "timeout"]
    assert all(r.e2e < 0.5 for r in out.results)
