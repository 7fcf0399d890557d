"""Typed SPDK JSON-RPC errors.

SPDK reports failures in two families (see shared/spdk-golden/README.md):
synchronous handler errors come back as ``-errno`` with strerror text, and
errors from async callbacks are wrapped in -32602/-32603 with the errno text as
the message ("No space left on device", "File exists", "Operation not
permitted"). We classify by code first and message second, so callers can
catch ``SpdkNoSpace`` without caring which family SPDK used.
"""

from __future__ import annotations

import errno as _errno
import os

import grpc

from ..errors import Internal, Unavailable

JSONRPC_INVALID_REQUEST = -32600
JSONRPC_METHOD_NOT_FOUND = -32601
JSONRPC_INVALID_PARAMS = -32602
JSONRPC_INTERNAL_ERROR = -32603

# strerror texts that appear inside -32602/-32603 messages, most specific first.
_MESSAGE_ERRNOS = [
    (os.strerror(e), e)
    for e in (
        _errno.ENOSPC, _errno.EEXIST, _errno.ENODEV, _errno.ENOENT, _errno.EPERM,
        _errno.EAGAIN, _errno.EBUSY, _errno.ETIMEDOUT, _errno.ENOMEM, _errno.EINVAL,
    )
]


class SpdkError(Internal):
    """SPDK answered a JSON-RPC call with an error object.

    Unhandled, it surfaces as INTERNAL with SPDK's method, code and message.
    """

    def __init__(self, method: str, code: int, message: str) -> None:
        super().__init__(f"SPDK {method} failed: {message} (code {code})")
        self.method = method
        self.spdk_code = code
        self.spdk_message = message
        self.errno = errno_of(code, message)


class SpdkNotFound(SpdkError):
    """ENODEV/ENOENT: the bdev, lvstore, lvol or file does not exist. Unmapped,
    a race with a delete: NOT_FOUND."""

    code = grpc.StatusCode.NOT_FOUND


class SpdkExists(SpdkError):
    """EEXIST: the name is taken."""


class SpdkNoSpace(SpdkError):
    """ENOSPC: not enough free clusters (or metadata pages, for a thick lvol).
    Also ENOMEM: on spdk_tgt v25.09 a thin lvol, snapshot or clone that finds
    no free metadata page fails with -32602 "Cannot allocate memory" (about
    one page per cluster by default: num_md_pages_per_cluster_ratio)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class SpdkNotPermitted(SpdkError):
    """EPERM: e.g. deleting a snapshot that has two or more clones."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class SpdkBusy(SpdkError):
    """EAGAIN/EBUSY: the object is busy right now; the caller retries."""

    code = grpc.StatusCode.UNAVAILABLE


class SpdkInvalid(SpdkError):
    """EINVAL or a parameter the method rejected."""


# SPDK modules by method prefix, longest first: who provides a missing method.
_MODULES = (("bdev_lvol_", "lvol"), ("bdev_nvme_", "bdev_nvme"), ("bdev_malloc_", "malloc"),
            ("bdev_aio_", "aio"), ("bdev_crypto_", "crypto"), ("bdev_", "bdev"),
            ("nvmf_", "nvmf"), ("keyring_linux_", "keyring_linux"),
            ("keyring_file_", "keyring_file"), ("keyring_", "keyring"),
            ("accel_", "accel"))


def module_of(method: str) -> str:
    return next((m for prefix, m in _MODULES if method.startswith(prefix)),
                method.split("_", 1)[0])


class SpdkMethodNotFound(SpdkError):
    """The target does not implement the method (module not built in): not
    transient, the target must be rebuilt or configured: FAILED_PRECONDITION."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, method: str, code: int, message: str) -> None:
        super().__init__(method, code, message)
        self.message = (f"the SPDK target does not implement {method} (code {code}): build "
                        f"or start spdk_tgt with its {module_of(method)!r} module")
        self.args = (self.message,)


class SpdkTransportError(Unavailable):
    """The RPC socket could not be reached, broke, or timed out (transient)."""

    def __init__(self, address: str, method: str, reason: str) -> None:
        super().__init__(f"SPDK at {address} unreachable during {method}: {reason}")
        self.address = address
        self.method = method


def errno_of(code: int, message: str) -> int | None:
    """The errno behind an SPDK error: from a -errno code, else from the text."""
    if -4096 < code < 0:
        return -code
    for text, number in _MESSAGE_ERRNOS:
        if text in message:
            return number
    return None


_BY_ERRNO: dict[int, type[SpdkError]] = {
    _errno.ENODEV: SpdkNotFound,
    _errno.ENOENT: SpdkNotFound,
    _errno.EEXIST: SpdkExists,
    _errno.ENOSPC: SpdkNoSpace,
    _errno.ENOMEM: SpdkNoSpace,
    _errno.EPERM: SpdkNotPermitted,
    _errno.EAGAIN: SpdkBusy,
    _errno.EBUSY: SpdkBusy,
    _errno.EINVAL: SpdkInvalid,
}


def from_response(method: str, error: dict) -> SpdkError:
    """Build the most specific SpdkError for a JSON-RPC error object."""
    code = int(error.get("code", JSONRPC_INTERNAL_ERROR))
    message = str(error.get("message", ""))
    if code == JSONRPC_METHOD_NOT_FOUND:
        return SpdkMethodNotFound(method, code, message)
    cls = _BY_ERRNO.get(errno_of(code, message) or 0)
    if cls is None and code == JSONRPC_INVALID_PARAMS:
        cls = SpdkInvalid
    return (cls or SpdkError)(method, code, message)
