"""`twinserve serve`: every setting is a flag and a TWINSERVE_* variable."""
from __future__ import annotations

import argparse

from .settings import Settings


def cmd_serve(args) -> int:
    import uvicorn
    from pydantic import ValidationError

    from twin.artifact import verify_artifact

    from .app import create_app
    from .cli import UsageError
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'])} (--{str(err['loc'][0]).replace('_', '-')} or "
                             f"TWINSERVE_{str(err['loc'][0]).upper()}): {err['msg']}" for err in e.errors())
        raise UsageError(f"invalid setting: {problems}") from None
    verify_artifact(settings.artifact)  # fail fast with a clear message, before uvicorn starts
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=int(settings.drain_timeout_s) + 5)
    return 0


def register(sub) -> None:
    lines = [f"  TWINSERVE_{name.upper():<22} {f.description or ''} (default: {f.default})"
             for name, f in Settings.model_fields.items()]
    p = sub.add_parser("serve", help="serve an artifact over an OpenAI-compatible HTTP API",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Serve an artifact: /v1/completions, /v1/chat/completions, /v1/models, "
                                   "/health, /ready, /metrics, /v1/stats, playground at /.",
                       epilog="Settings (flags override environment variables):\n" + "\n".join(lines))
    p.add_argument("artifact", help="artifact directory (TWINSERVE_ARTIFACT)")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="bind port (default 8000)")
    p.add_argument("--mode", choices=["lowrank", "materialize", "backbone", "expert"], default=None,
                   help="fusion mode (default lowrank)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None)
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--max-queue", type=int, default=None)
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY")
    p.add_argument("--model-name", default=None, help="model id in the API (default: artifact dir name)")
    p.set_defaults(fn=cmd_serve)
