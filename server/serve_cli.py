"""`twinserve serve`: every setting is a flag and a TWINSERVE_* variable."""
from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path
from typing import get_args

from twin.errors import UsageError

from .memory import StartupError, memory_plan
from .settings import Mode, Settings

SHUTDOWN_TAIL_S = 5   # after the drain: uvicorn's wait for the last responses to flush (timeout_graceful_shutdown)
STOP_MARGIN_S = 10    # a supervisor's stop timeout must be at least drain_timeout_s + this (docs, deploy/)


def cmd_serve(args, expert_reader: Callable | None = None, prober: Callable | None = None) -> int:
    """``expert_reader``: what create_app passes on to load_artifact for mode `expert` (see create_app).
    ``prober(manifest)``: the build's early refusal (a tiny model of the artifact's config through the served
    step and transformers), run on an artifact no parity gate certified; raises naming the reason."""
    import uvicorn
    from pydantic import ValidationError

    from twin.artifact import read_manifest, verify_artifact

    from .app import create_app
    from .shutdown import DrainingServer
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'])} (--{str(err['loc'][0]).replace('_', '-')} or "
                             f"TWINSERVE_{str(err['loc'][0]).upper()}): {err['msg']}" for err in e.errors())
        raise UsageError(f"invalid setting: {problems}") from None
    # fail fast with a clear message, before uvicorn starts; the checksums are computed here, once
    manifest = verify_artifact(settings.artifact) if settings.verify_artifact else read_manifest(settings.artifact)
    check_parity_recorded(settings, manifest)
    check_port_free(settings.host, settings.port)  # before the weights load, not after
    if prober is not None and not manifest.parity and manifest.synthetic is None:
        prober(manifest)                           # uncertified artifact: its type must pass the probe
    memory_plan(settings, manifest)                # and refuse settings that cannot fit, with the numbers
    app = create_app(settings, expert_reader=expert_reader, verified=settings.verify_artifact,
                     report_startup_error=False)
    server = DrainingServer(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                           timeout_graceful_shutdown=SHUTDOWN_TAIL_S), app)
    try:
        server.run()
    except SystemExit:       # uvicorn's exit 3 when the app's startup fails
        refusal = getattr(app.state, "startup_error", None)
        if refusal is not None:   # a refusal (bad file, settings): one line, exit 2, no traceback
            raise refusal from None
        raise                     # anything else uvicorn has logged with its traceback
    return 0


def check_port_free(host: str, port: int) -> None:
    """StartupError when ``host:port`` cannot be bound (in use, or not an address of this machine): found in a
    millisecond here instead of by uvicorn after the whole artifact has loaded."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise StartupError(f"--host {host}: cannot resolve it ({e.strerror or e})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn binds: TIME_WAIT is no conflict
        try:
            s.bind(addr)
        except OSError as e:
            raise StartupError(f"cannot listen on {host}:{port}: {e.strerror or e} (another server on that port? "
                               "choose one with --port / TWINSERVE_PORT)") from None


def check_parity_recorded(settings: Settings, manifest) -> None:
    """An artifact whose build recorded no parity result was never compared with transformers (a gate killed
    part-way, or a build made without the gate): refused unless the build ran with --skip-parity (recorded in
    the manifest), or the operator says so (require_parity false). A synthetic artifact has no experts to
    compare with."""
    from twin.artifact import MANIFEST
    if manifest.parity or manifest.skip_parity or manifest.synthetic is not None or not settings.require_parity:
        return
    raise StartupError(f"{Path(settings.artifact) / MANIFEST}: no parity result (parity is null and the build did "
                       "not run with --skip-parity: the parity gate never ran or never finished); rebuild with "
                       "`twinserve build`, or serve it unchecked with --no-require-parity / "
                       "TWINSERVE_REQUIRE_PARITY=false")


def setting_help(name: str) -> str:
    """A setting's description with its default, stated once: a description that already explains its
    default (e.g. "(default: artifact dir name)") keeps that wording instead of the raw value."""
    f = Settings.model_fields[name]
    text = f.description or ""
    if "default" not in text:
        default = "unset" if f.default is None else f.default
        text = f"{text} (default: {default})" if text else f"default: {default}"
    return text.replace("%", "%%")   # argparse %-formats help strings


def str_list(value: str) -> list[str]:
    """A list flag: a JSON list ('["https://a.example", "https://b.example"]', as vLLM takes it) or
    comma-separated values."""
    import json
    text = value.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not a JSON list: {e}") from None
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise argparse.ArgumentTypeError("expected a JSON list of strings")
        return items
    return [x.strip() for x in text.split(",") if x.strip()]


def register(sub, expert_reader: Callable | None = None, prober: Callable | None = None) -> None:
    """Add `serve` to ``sub``. ``expert_reader(manifest, t)`` -> expert t's full state (mode `expert`): the
    composition root (cli.main) passes compression's reader, as server/ imports only twin/ and router/."""
    lines = [f"  TWINSERVE_{name.upper():<22} {setting_help(name).replace('%%', '%')}"
             for name in Settings.model_fields]
    p = sub.add_parser("serve", help="serve an artifact over an OpenAI-compatible HTTP API",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Serve an artifact: /v1/completions, /v1/chat/completions, /v1/models, "
                                   "/tokenize, /detokenize, /health, /ready, /metrics, /v1/stats, playground at /.",
                       epilog="Settings (flags override environment variables):\n" + "\n".join(lines))
    p.add_argument("artifact", nargs="?", default=None,
                   help="artifact directory (default: TWINSERVE_ARTIFACT, else artifacts/demo)")
    p.add_argument("--host", default=None, help=setting_help("host"))
    p.add_argument("--port", type=int, default=None, help=setting_help("port"))
    p.add_argument("--mode", choices=get_args(Mode), default=None, help=setting_help("mode"))
    p.add_argument("--device", default=None, help=setting_help("device"))
    p.add_argument("--dtype", choices=get_args(Settings.model_fields["dtype"].annotation), default=None,
                   help=setting_help("dtype"))
    p.add_argument("--max-batch-size", type=int, default=None, help=setting_help("max_batch_size"))
    p.add_argument("--max-model-len", type=int, default=None, help=setting_help("max_model_len"))
    p.add_argument("--kv-cache-gib", type=float, default=None, help=setting_help("kv_cache_gib"))
    p.add_argument("--threads", type=int, default=None, help=setting_help("threads"))
    p.add_argument("--max-queue", type=int, default=None, help=setting_help("max_queue"))
    p.add_argument("--api-key", default=None, help=setting_help("api_key"))
    p.add_argument("--model-name", default=None, help=setting_help("model_name"))
    p.add_argument("--allowed-origins", type=str_list, default=None, help=setting_help("allowed_origins"))
    p.add_argument("--allowed-methods", type=str_list, default=None, help=setting_help("allowed_methods"))
    p.add_argument("--allowed-headers", type=str_list, default=None, help=setting_help("allowed_headers"))
    p.add_argument("--max-request-bytes", type=int, default=None, help=setting_help("max_request_bytes"))
    p.add_argument("--drain-timeout-s", type=float, default=None, help=setting_help("drain_timeout_s"))
    p.add_argument("--verify-artifact", action=argparse.BooleanOptionalAction, default=None,
                   help=setting_help("verify_artifact"))
    p.add_argument("--require-parity", action=argparse.BooleanOptionalAction, default=None,
                   help=setting_help("require_parity"))
    p.set_defaults(fn=functools.partial(cmd_serve, expert_reader=expert_reader, prober=prober))
