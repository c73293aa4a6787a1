"""Typed errors raised anywhere in the server; app.py maps them to OpenAI-shaped JSON in one place."""
from __future__ import annotations


class APIError(Exception):
    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(APIError):
    status = 400


class ContextLengthExceeded(APIError):
    status = 400
    code = "context_length_exceeded"


class Unauthorized(APIError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(APIError):
    status = 404
    type = "not_found_error"
    code = "model_not_found"


class ClientDisconnected(APIError):
    """Not sent to anyone (the client is gone); /metrics counts the request under status 499."""
    status = 499
    code = "client_disconnected"


class PayloadTooLarge(APIError):
    status = 413
    code = "request_too_large"


class UnsupportedMediaType(APIError):
    status = 415
    code = "unsupported_media_type"


class QueueFull(APIError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class NotReady(APIError):
    status = 503
    type = "server_error"
    code = "not_ready"


class Draining(NotReady):
    """Shutting down: admitted requests finish, new ones are refused (as /ready's 503 "draining")."""
    code = "draining"


class RequestTimeout(APIError):
    status = 504
    type = "timeout_error"
    code = "timeout"


class InternalError(APIError):
    status = 500
    type = "server_error"
    code = "internal_error"
