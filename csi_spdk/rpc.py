"""The decorator stack every CSI RPC goes through (ember-csi style).

``@rpc(lock=("volume_id",))`` on a servicer method gives, in this order:

1. timing, one structured log line and Prometheus metrics per call
   (method, volume, gRPC code, duration; never the request's secrets);
2. a per-key try-lock on the named request fields, so a second operation on
   the same volume or name gets ABORTED while different volumes run in
   parallel;
3. error mapping: a ``CsiError`` aborts the call with its own code and
   message; any other exception is logged with its traceback and becomes
   INTERNAL.

Servicer methods therefore contain only their guard clauses and their logic.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from . import metrics
from .errors import CsiError
from .locks import KeyedLocks
from .log import redact

log = logging.getLogger("csi_spdk.rpc")

# Request fields that name the volume (or snapshot) a call is about, in the
# order the log line prefers them.
_SUBJECT_FIELDS = ("volume_id", "snapshot_id", "source_volume_id", "name")


def _subject(request: Any) -> str:
    for field in _SUBJECT_FIELDS:
        value = getattr(request, field, "")
        if isinstance(value, str) and value:
            return value
    return ""


def rpc(lock: Sequence[str] = (), quiet: bool = False) -> Callable:
    """Wrap a servicer method with logging, metrics, locking and error mapping.

    ``lock`` names request fields whose values are held in the servicer's
    ``locks`` (a ``KeyedLocks``) for the duration of the call. ``quiet``:
    a successful call logs at debug, not info (Probe and the plugin info
    calls, which every sidecar and kubelet's probes repeat: at info they were
    most of the log and, in a slow node, of the process's time); a failed
    one still warns.
    """
    ok_level = logging.DEBUG if quiet else logging.INFO

    def decorate(fn: Callable) -> Callable:
        method = fn.__name__

        @functools.wraps(fn)
        def wrapper(self, request, context: grpc.ServicerContext):
            start = time.monotonic()
            code = grpc.StatusCode.OK
            message = ""
            try:
                keys = [str(getattr(request, f, "") or "") for f in lock]
                locks: KeyedLocks = self.locks
                with locks.hold(keys, what=method):
                    return fn(self, request, context)
            except CsiError as err:
                code, message = err.code, err.message
            except Exception as err:  # noqa: BLE001 - last-resort mapping
                code = grpc.StatusCode.INTERNAL
                message = f"internal error in {method}: {type(err).__name__}: {err}"
                log.exception(message, extra={"f": {"method": method}})
            finally:
                elapsed = time.monotonic() - start
                metrics.CSI_REQUESTS.labels(method, code.name).inc()
                metrics.CSI_LATENCY.labels(method, code.name).observe(elapsed)
                fields = {
                    "method": method,
                    "volume": _subject(request),
                    "code": code.name,
                    "duration_ms": round(elapsed * 1000, 2),
                }
                if message:
                    fields["error"] = message
                level = ok_level if code == grpc.StatusCode.OK else logging.WARNING
                log.log(level, method, extra={"f": fields})
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("request", extra={"f": {"method": method,
                                                       "request": redact(request)}})
            context.abort(code, message)

        return wrapper

    return decorate
