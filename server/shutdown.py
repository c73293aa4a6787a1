"""`twinserve serve`'s uvicorn server: a drain, with the listener still open, before uvicorn's own shutdown."""
from __future__ import annotations

import logging

import uvicorn

log = logging.getLogger("uvicorn.error")


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain before its shutdown. On SIGTERM (or Ctrl-C) the engine stops admitting
    while the listener stays open: new requests and /ready answer 503 "draining" (a load balancer's probe
    sees it), admitted requests (running and queued) finish, up to drain_timeout_s. Then whatever is left
    gets a "shutting down" error, and uvicorn closes the listener and waits SHUTDOWN_TAIL_S for the last
    responses. A second Ctrl-C ends the drain at once."""

    def __init__(self, config, app):
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig, frame) -> None:
        """The signal itself stops admission (uvicorn notices should_exit only at its next 0.1 s tick, and
        /ready or a request in between would still be accepted); the drain then runs in ``shutdown``."""
        engine = getattr(self.app.state, "engine", None)
        if engine is not None and self.started:
            engine.accepting = False
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        engine = getattr(self.app.state, "engine", None)
        if engine is not None and self.started:
            running = engine.load
            log.info("draining: %d running, %d queued; up to %g s (drain_timeout_s)", running["running"],
                     running["waiting"], engine.settings.drain_timeout_s)
            if not await engine.drain(abort=lambda: self.force_exit):
                log.warning("drain timeout: ending the requests still admitted")
            await engine.stop(drain_s=0)
        await super().shutdown(sockets)
