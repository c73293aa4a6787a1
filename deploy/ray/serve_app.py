"""Ray Serve deployment of twinserve: the same FastAPI app as `twinserve serve`, one per replica.

Each replica builds `server.app:create_app(Settings(...))` in its own process (the artifact is loaded
in the app's lifespan, which Ray Serve runs before the replica takes traffic); Ray's HTTP proxy
load-balances requests across replicas. Streaming (SSE) passes through the proxy.

Run from the repository root (`pip install "ray[serve]"`; needs late-bound `serve.ingress()`, tested
with ray 2.60.0):

    RAY_AUTH_MODE=disabled serve run deploy/ray/config.yaml              # autoscaling 1..4, :8000
    RAY_AUTH_MODE=disabled python deploy/ray/serve_app.py --replicas 2 --port 8000 [--artifact DIR]

then `curl http://127.0.0.1:8000/ready` and the usual /v1/... endpoints. Relative artifact paths are
resolved against the repository root. Every setting of server/settings.py can go into `args:` in
config.yaml (lower-case names: artifact, mode, max_batch_size, ...); TWINSERVE_* variables in the
replica environment (runtime_env.env_vars) work too. `host`/`port` are ignored: Ray's proxy listens.

Notes:
* /metrics is per replica; through the proxy you see whichever replica answered. Scrape replicas
  directly, or use Ray's own metrics export (ray_serve_* series) for cluster-wide numbers.
* Each response carries `X-Twinserve-Replica` (the Ray replica id), handy to watch load balancing.
* On a multi-node cluster the replicas must import this module and the `server` and `compression`
  packages (mode `expert` reads the dense experts through compression): install the project on every node
  (or ship it with runtime_env.working_dir, excluding artifacts/ and .venv/).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.exceptions import RayServeException

try:
    # late-bound ingress: the app comes from __serve_build_asgi_app__ at replica start
    _late_bound_ingress = serve.ingress()
except TypeError as e:  # older Ray: serve.ingress(app) needs the app at import time
    raise ImportError("deploy/ray/serve_app.py needs a Ray Serve whose serve.ingress() accepts no app "
                      f"(late-bound ASGI app; tested with ray 2.60.0), found ray {ray.__version__}") from e

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENT_NAME = "twinserve"
_IGNORED = {"host", "port"}


def resolve_artifact(path: str | os.PathLike) -> str:
    """Absolute artifact path; a relative one is taken from the current directory if it exists there,
    else from the repository root (Ray may start replicas in another working directory)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    if p.exists():
        return str(p.resolve())
    return str(REPO_ROOT / p)


def settings_overrides(args: dict[str, Any] | None) -> dict[str, Any]:
    """Validate config args against server.settings.Settings; unknown keys are an error."""
    from server.settings import Settings

    args = dict(args or {})
    unknown = sorted(k for k in args if k not in Settings.model_fields and k not in _IGNORED)
    if unknown:
        raise ValueError(f"unknown twinserve setting(s) in Ray Serve args: {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(Settings.model_fields))})")
    out = {k: v for k, v in args.items() if k not in _IGNORED and v is not None}
    if "artifact" in out:
        out["artifact"] = resolve_artifact(out["artifact"])
    return out


@serve.deployment(
    name=DEPLOYMENT_NAME,
    ray_actor_options={"num_cpus": 1},
    # the engine batches internally; let Ray hand each replica plenty of concurrent requests
    max_ongoing_requests=64,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_wait_loop_s=2,
    graceful_shutdown_timeout_s=40,
)
@_late_bound_ingress
class TwinServe:
    """One twinserve app per replica; the FastAPI app is created here, in the replica's __init__."""

    def __init__(self, settings: dict[str, Any] | None = None):
        # NB: not `self.app`: Ray's ASGI wrapper base class owns that name (a read-only property)
        from compression.experts import read_expert_state
        from server.app import create_app
        from server.settings import Settings

        self.settings = Settings(**settings_overrides(settings))
        if self.settings.threads is None and "OMP_NUM_THREADS" not in os.environ:
            # one replica = ray_actor_options.num_cpus cores; torch would otherwise use every core
            self.settings = self.settings.model_copy(update={"threads": 1})
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except RayServeException:  # outside a replica (unit use)
            self.replica_id = f"pid-{os.getpid()}"
        self.twin_app = create_app(self.settings, expert_reader=read_expert_state)   # mode `expert`

        replica_id = self.replica_id

        @self.twin_app.middleware("http")
        async def replica_header(request, call_next):
            response = await call_next(request)
            response.headers["X-Twinserve-Replica"] = replica_id
            return response

    def __serve_build_asgi_app__(self):
        # Ray Serve calls this after __init__ and runs the app's lifespan (artifact load) before traffic
        return self.twin_app

    def check_health(self) -> None:
        """Ray's replica health check: the engine must be running (Ray restarts the replica otherwise)."""
        engine = getattr(self.twin_app.state, "engine", None)
        if engine is not None and not getattr(engine, "ready", True):
            raise RuntimeError("twinserve engine is not ready")


def app_builder(args: dict[str, Any] | None = None) -> serve.Application:
    """Application builder for config files (`import_path: deploy.ray.serve_app:app_builder`).
    `args` are twinserve settings (see server/settings.py)."""
    return TwinServe.bind(settings_overrides(args))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve twinserve with Ray Serve (local cluster).")
    p.add_argument("--artifact", default=os.environ.get("TWINSERVE_ARTIFACT", "artifacts/demo"))
    p.add_argument("--replicas", type=int, default=2, help="fixed replica count (default 2)")
    p.add_argument("--max-replicas", type=int, default=None,
                   help="autoscale between 1 and this many replicas instead of a fixed count")
    p.add_argument("--host", default="127.0.0.1", help="Ray HTTP proxy address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="Ray HTTP proxy port (default 8000)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    p.add_argument("--mode", default=None)
    a = p.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": a.host, "port": a.port})
    opts: dict[str, Any] = {"ray_actor_options": {"num_cpus": a.num_cpus}}
    if a.max_replicas:
        opts["autoscaling_config"] = {"min_replicas": 1, "max_replicas": a.max_replicas,
                                      "target_ongoing_requests": 8}
    else:
        opts["num_replicas"] = a.replicas
    settings = settings_overrides({"artifact": a.artifact, "mode": a.mode})
    serve.run(TwinServe.options(**opts).bind(settings), name="twinserve", route_prefix="/", blocking=False)
    print(f"twinserve on Ray Serve: http://{a.host}:{a.port}/  (Ctrl-C stops)", flush=True)
    try:
        import time
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
