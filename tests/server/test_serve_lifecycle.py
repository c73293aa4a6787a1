"""`twinserve serve` from start to stop: the artifact verified once (or not at all when told), an artifact
without a parity result refused, refusals inside the app's startup as one line (exit 2), and the drain on
SIGTERM with the listener still open (/ready answers 503 "draining" until it closes)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from cli.main import main
from server.app import create_app
from server.serve_cli import SHUTDOWN_TAIL_S, check_parity_recorded
from server.settings import Settings
from server.shutdown import DrainingServer
from tests.conftest import server_settings
from twin import artifact as art
from twin.artifact import MANIFEST, read_manifest, update_artifact
from twin.util import free_port

from .helpers import TASK_PROMPTS, make_long, sse_events, wait_for

ROOT = Path(__file__).resolve().parents[2]


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def lifespan_only(monkeypatch):
    """DrainingServer.run replaced by the app's lifespan alone (startup, then shutdown): no port, no loop
    left running. Records the app it ran."""
    ran = {}

    def run(self, sockets=None):
        ran["app"] = self.app
        with TestClient(self.app):
            self.started = True

    monkeypatch.setattr(DrainingServer, "run", run)
    return ran


# ----------------------------------------------------------------------------- parity

def test_serve_refuses_an_artifact_without_a_parity_result(capsys, tiny_artifact, monkeypatch):
    monkeypatch.delenv("TWINSERVE_REQUIRE_PARITY", raising=False)
    assert read_manifest(tiny_artifact).parity is None and not read_manifest(tiny_artifact).skip_parity
    code, text = run_cli(capsys, "serve", str(tiny_artifact), "--port", "8999")
    assert code == 2 and "Traceback" not in text
    line, = [x for x in text.splitlines() if x.strip()]
    assert line.startswith("error: ") and str(tiny_artifact / MANIFEST) in line and "no parity result" in line
    assert "--skip-parity" in line and "TWINSERVE_REQUIRE_PARITY=false" in line and "--no-require-parity" in line


def test_parity_recorded_or_skipped_or_waived_is_served(artifact_copy):
    settings = Settings(artifact=str(artifact_copy))
    manifest = read_manifest(artifact_copy)
    with pytest.raises(ValueError, match="no parity result"):
        check_parity_recorded(settings, manifest)
    check_parity_recorded(settings.model_copy(update={"require_parity": False}), manifest)
    skipped = update_artifact(artifact_copy, {}, {"skip_parity": True})   # what `build --skip-parity` records
    check_parity_recorded(settings, skipped)
    gated = manifest.model_copy(update={"parity": {"math": {"max_abs_logit_diff": 1e-5, "argmax_agreement": 1.0}}})
    check_parity_recorded(settings, gated)
    check_parity_recorded(settings, manifest.model_copy(update={"synthetic": {"like": "tiny"}}))


# ----------------------------------------------------------------------------- verify once, or not at all

def _count_hashes(monkeypatch, root: Path) -> list[str]:
    """Names of the files under ``root`` hashed from now on (an uncertified artifact's probe builds and hashes
    an artifact of its own elsewhere)."""
    hashed: list[str] = []
    real = art.sha256_file

    def counting(path, *a, **kw):
        if Path(path).resolve().is_relative_to(root.resolve()):
            hashed.append(Path(path).name)
        return real(path, *a, **kw)

    monkeypatch.setattr(art, "sha256_file", counting)
    return hashed


def test_serve_hashes_each_artifact_file_once(capsys, artifact_copy, monkeypatch, lifespan_only):
    monkeypatch.setenv("TWINSERVE_REQUIRE_PARITY", "false")
    monkeypatch.setenv("TWINSERVE_DEVICE", "cpu")
    hashed = _count_hashes(monkeypatch, artifact_copy)
    code, text = run_cli(capsys, "serve", str(artifact_copy), "--port", "8999")
    assert code == 0, text
    assert lifespan_only["app"].state.engine is not None       # the app really loaded
    files = read_manifest(artifact_copy).files
    assert sorted(hashed) == sorted(Path(f).name for f in files)   # every file once, none twice


def test_verify_artifact_false_is_honoured_by_serve(capsys, artifact_copy, monkeypatch, lifespan_only):
    monkeypatch.setenv("TWINSERVE_REQUIRE_PARITY", "false")
    monkeypatch.setenv("TWINSERVE_DEVICE", "cpu")
    (artifact_copy / art.REPORT).write_text('{"edited": true}')     # a checksum that no longer matches
    code, text = run_cli(capsys, "serve", str(artifact_copy), "--port", "8999")
    assert code == 2 and "report.json" in text and "modified" in text
    hashed = _count_hashes(monkeypatch, artifact_copy)
    monkeypatch.setenv("TWINSERVE_VERIFY_ARTIFACT", "false")
    code, text = run_cli(capsys, "serve", str(artifact_copy), "--port", "8999")
    assert code == 0, text
    assert hashed == [] and lifespan_only["app"].state.settings.verify_artifact is False
    code, text = run_cli(capsys, "serve", str(artifact_copy), "--port", "8999", "--verify-artifact")
    assert code == 2 and "report.json" in text        # the flag overrides the variable


# ----------------------------------------------------------------------------- refusals inside startup

def test_a_refusal_inside_startup_is_one_line_and_exit_2(artifact_copy, tmp_path):
    """With checksums off (so the CLI's own check cannot catch it), a damaged tokenizer.json is refused while
    uvicorn starts the app: one line naming the file, exit 2, no traceback."""
    tok = artifact_copy / "tokenizer" / "tokenizer.json"
    tok.write_text(tok.read_text()[:200])
    env = dict(os.environ, TWINSERVE_THREADS="1", TWINSERVE_DEVICE="cpu", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-m", "cli", "serve", str(artifact_copy), "--port", str(free_port()),
                        "--no-verify-artifact", "--no-require-parity"], check=False, cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and str(tok) in errors[0] and "not valid JSON" in errors[0]


def test_a_refusal_inside_startup_is_logged_as_one_line_by_other_hosts(artifact_copy, capfd):
    """Served by another host (uvicorn directly, Ray): the lifespan failure uvicorn logs is that one line."""
    tok = artifact_copy / "tokenizer" / "tokenizer.json"
    tok.write_text("{")
    app = create_app(server_settings(artifact_copy, verify_artifact=False))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="info"))
    with pytest.raises(SystemExit):
        server.run()
    assert not server.started
    err = capfd.readouterr().err
    assert "Traceback" not in err
    refusal = [x for x in err.splitlines() if "refusing to start:" in x]
    assert len(refusal) == 1 and str(tok) in refusal[0] and "not valid JSON" in refusal[0]


# ----------------------------------------------------------------------------- drain with the listener open

def _start(artifact, **overrides):
    app = create_app(server_settings(artifact, **overrides))
    port = free_port()
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=SHUTDOWN_TAIL_S), app)
    thread = threading.Thread(target=server.run, name=f"draining-{port}", daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), 60, "server start")
    assert server.started
    return server, thread, f"http://127.0.0.1:{port}"


def _stream(url: str, prompt: str, max_tokens: int, out: list) -> None:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        out.append((r.status_code, sse_events(r.iter_lines())))


def test_shutdown_drains_with_the_listener_open_and_ready_503(routed_artifact):
    """What SIGTERM does (uvicorn's handle_exit sets should_exit): admitted requests, running and queued, all
    finish; meanwhile a new connection is accepted and /ready answers 503 "draining", a new completion 503;
    then the listener closes."""
    server, thread, url = _start(routed_artifact, max_batch_size=2, drain_timeout_s=30.0)
    engine = server.app.state.engine
    make_long(engine, delay_s=0.03)
    results: list = []
    clients = [threading.Thread(target=_stream, args=(url, TASK_PROMPTS["math"][i % 4], 24, results))
               for i in range(4)]
    for t in clients:
        t.start()
    wait_for(lambda: engine.load["running"] == 2 and engine.load["waiting"] == 2, 30, "2 running + 2 queued")
    server.should_exit = True                       # = SIGTERM
    wait_for(lambda: not engine.accepting, 10, "drain start")
    ready = httpx.get(f"{url}/ready", timeout=5)    # a fresh connection: the listener is still open
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "draining"
    new = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1}, timeout=5)
    assert new.status_code == 503
    assert engine.load["running"] + engine.load["waiting"] > 0      # still draining when they were answered
    for t in clients:
        t.join(60)
    thread.join(30)
    assert not thread.is_alive()
    assert len(results) == 4
    for status, events in results:
        assert status == 200 and events[-1] == "[DONE]"
        finals = [e for e in events[:-1] if e["choices"] and e["choices"][0]["finish_reason"]]
        assert [e["choices"][0]["finish_reason"] for e in finals] == ["length"]
        assert sum(len(e["choices"][0]["text"]) > 0 for e in events[:-1] if e["choices"]) > 0
    with pytest.raises(httpx.ConnectError):        # and then the listener closed
        httpx.get(f"{url}/ready", timeout=2)


def test_drain_timeout_ends_what_is_left_with_an_error_event(routed_artifact):
    server, thread, url = _start(routed_artifact, max_batch_size=1, drain_timeout_s=0.5)
    engine = server.app.state.engine
    make_long(engine, delay_s=0.05)
    results: list = []
    client = threading.Thread(target=_stream, args=(url, TASK_PROMPTS["code"][0], 100, results))
    client.start()
    wait_for(lambda: engine.load["running"] == 1, 30, "a running request")
    server.should_exit = True
    client.join(30)
    thread.join(30)
    assert not thread.is_alive()
    (status, events), = results
    assert status == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["message"] == "server is shutting down"


# ----------------------------------------------------------------------------- settings a new user meets

def test_the_artifact_argument_defaults_to_twinserve_artifact(capsys, artifact_copy, monkeypatch, lifespan_only):
    """`twinserve serve` with no argument serves TWINSERVE_ARTIFACT, as --help says."""
    monkeypatch.setenv("TWINSERVE_REQUIRE_PARITY", "false")
    monkeypatch.setenv("TWINSERVE_DEVICE", "cpu")
    monkeypatch.setenv("TWINSERVE_ARTIFACT", str(artifact_copy))
    code, text = run_cli(capsys, "serve", "--port", str(free_port()))
    assert code == 0, text
    assert lifespan_only["app"].state.settings.artifact == str(artifact_copy)


def test_a_port_in_use_is_refused_before_loading(capsys, artifact_copy, monkeypatch):
    """One line, exit 2, before any weight is read (uvicorn would find it only after the whole load)."""
    import socket

    monkeypatch.setenv("TWINSERVE_REQUIRE_PARITY", "false")
    loaded = []
    monkeypatch.setattr("server.serve_cli.memory_plan", lambda *a: loaded.append(1))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, text = run_cli(capsys, "serve", str(artifact_copy), "--port", str(port))
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in text and "Traceback" not in text
    assert text.count("\n") == 1 and not loaded


def test_the_signal_itself_stops_admission(routed_artifact):
    """SIGTERM/Ctrl-C (uvicorn's handle_exit) refuses at once: /ready and a new request answer 503 "draining"
    right after the signal, not only from uvicorn's next tick."""
    import signal

    server, thread, _url = _start(routed_artifact, max_batch_size=2, drain_timeout_s=30.0)
    engine = server.app.state.engine
    assert engine.accepting
    server.handle_exit(signal.SIGTERM, None)
    assert not engine.accepting and engine.ready          # before any tick of uvicorn's loop
    thread.join(30)
    assert not thread.is_alive()
