"""Exceptions: every API or transport failure raises one of these, carrying the daemon's
message. Errors in the user's code are not exceptions: they are `Execution.error`."""

from __future__ import annotations

from typing import Any


class FissileError(Exception):
    """Base class of every Fissile SDK error."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class BadRequestError(FissileError):
    """400: the daemon refused the request as malformed or not allowed."""


class AuthenticationError(FissileError):
    """401: no API key, a wrong key or a revoked key."""


class PermissionDeniedError(FissileError):
    """403: the sandbox's guest refused access to a path."""


class NotFoundError(FissileError):
    """404: no such sandbox, space, snapshot or file (for this API key's tenant)."""


class ConflictError(FissileError):
    """409: the sandbox is in the wrong state for the request (e.g. still starting)."""


class PayloadTooLargeError(FissileError):
    """413: a body, file or code cell is larger than the daemon allows."""


class RateLimitError(FissileError):
    """429: a quota (sandboxes, memory, fork fan-out) is exhausted."""


class SandboxError(FissileError):
    """5xx, or the sandbox stopped answering in the middle of a stream."""


class TemplateBuildError(FissileError):
    """A template build failed (a command exited non-zero, the warm-up raised, ...):
    nothing of it was kept. `output` holds what its steps and commands printed."""

    def __init__(self, message: str, output: list[str]):
        super().__init__(message)
        self.output = output


class TimeoutError(FissileError):
    """A request did not finish within its timeout."""


class ForkError(FissileError):
    """Some children of a fork failed. `children` holds the ones that started (close them,
    or use them); `errors` the per-child messages of the others."""

    def __init__(self, message: str, children: list[Any], errors: list[str]):
        super().__init__(message)
        self.children = children
        self.errors = errors


_BY_STATUS: dict[int, type[FissileError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    429: RateLimitError,
}


def error_for(status: int, body: bytes) -> FissileError:
    """The exception for an error response (`{"error": {"code", "message"}}`)."""
    import json

    code: str | None = None
    message = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    try:
        parsed = json.loads(body)
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            code = parsed["error"].get("code")
            message = parsed["error"].get("message", message)
    except ValueError:
        pass
    cls = _BY_STATUS.get(status, SandboxError if status >= 500 else FissileError)
    return cls(message, status=status, code=code)
