"""The locustfile sends the same mix and records TTFT / routing as custom events (needs locust installed)."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# never import locust here: it monkey-patches the process with gevent. It runs in a subprocess.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust not installed")
LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtest" / "locustfile.py"


def _locust(*args, cwd):
    exe = shutil.which("locust", path=str(Path(sys.executable).parent)) or "locust"
    return subprocess.run([exe, "-f", str(LOCUSTFILE), "--headless", "--skip-log", *args], cwd=cwd, check=False,
                          capture_output=True, text=True, timeout=60)


def test_locust_headless_ttft_and_routing_events(fake, tasks_dir, tmp_path):
    p = _locust("--host", fake.url, "-u", "2", "-r", "2", "-t", "2s", "--json", "--twin-tasks", str(tasks_dir),
                "--twin-mix", "reverse=1,shift=1", cwd=tmp_path)
    stats = {(s["method"], s["name"]): s for s in json.loads(p.stdout)}
    for t in ("reverse", "shift"):
        assert stats[("TTFT", t)]["num_requests"] > 0 and stats[("TTFT", t)]["num_failures"] == 0
        assert stats[("POST", f"/v1/completions [{t}]")]["num_requests"] > 0
    assert stats[("ROUTING", "reverse")]["num_failures"] == 0
    assert stats[("ROUTING", "shift")]["num_failures"] == stats[("ROUTING", "shift")]["num_requests"] > 0
    assert all(b["stream"] is True for b in fake.state.bodies)


def test_locust_bad_mix_exits_2(tasks_dir, tmp_path):
    p = _locust("--host", "http://127.0.0.1:1", "-u", "1", "-t", "1s", "--twin-tasks", str(tasks_dir),
                "--twin-mix", "nosuch=1", cwd=tmp_path)
    assert p.returncode == 2 and "nosuch" in p.stderr
