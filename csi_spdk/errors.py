"""Errors that already carry their gRPC status code.

Every layer below the gRPC servicers raises one of these (or lets an
unexpected exception escape, which the decorator stack in ``rpc.py`` turns into
INTERNAL).  The message is what the user sees in ``kubectl describe``: say what
was wrong and what to do about it.
"""

from __future__ import annotations

import grpc

ECHO_LIMIT = 64          # characters of user input an error message repeats
MESSAGE_LIMIT = 2048     # a status message travels in gRPC trailers (8 KiB by default)


def echo(value: object, limit: int = ECHO_LIMIT) -> str:
    """``repr`` of user input for an error message, cut to ``limit`` characters
    (a 1 MB parameter value must not come back as a 1 MB status message)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, str | bytes) else len(text)
    return f"{text[:limit]}... ({size} characters)"


class CsiError(Exception):
    """An error with a gRPC status code and a message a person can act on."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        if len(message) > MESSAGE_LIMIT:
            message = message[:MESSAGE_LIMIT] + " ... (truncated)"
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgument(CsiError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CsiError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CsiError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(CsiError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(CsiError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(CsiError):
    """Another operation on the same volume is in flight; the caller retries."""

    code = grpc.StatusCode.ABORTED


class Unavailable(CsiError):
    """A transient fault (SPDK unreachable, timeout); the caller retries."""

    code = grpc.StatusCode.UNAVAILABLE


class PermissionDenied(CsiError):
    """The storage agent refused an operation the driver may not do."""

    code = grpc.StatusCode.PERMISSION_DENIED


class OutOfRange(CsiError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(CsiError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(CsiError):
    code = grpc.StatusCode.INTERNAL


def require(value: object, field: str) -> None:
    """The guard every RPC starts with: a required request field is set."""
    if not value:
        verb = "are" if field.endswith("s") else "is"
        raise InvalidArgument(f"{field} {verb} required")
