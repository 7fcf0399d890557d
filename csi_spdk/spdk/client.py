"""A small, thread-safe SPDK JSON-RPC client.

Why not the official ``spdk`` PyPI client: it holds one socket with no lock
(unsafe for a threaded gRPC server), never reconnects after the target
restarts, and reports every failure as one ``JSONRPCException`` whose message
embeds the error JSON, so callers would have to parse strings to tell ENOSPC
from EEXIST. This client keeps a pool of connections that follows the load (dialled on
demand up to ``pool_size``, at most ``idle`` kept between bursts; one request
in flight per connection, so concurrent callers never interleave bytes), always
sends an integer ``id`` (SPDK answers id-less notifications with an
unterminated reply that jams a streaming parser), applies a per-call deadline,
drops a connection on any transport error and dials again on the next call,
and raises the typed errors of ``spdk.errors``.
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import metrics
from .errors import SpdkTransportError, from_response

DEFAULT_TIMEOUT = 60.0
# Calls in flight per target (one connection each). SPDK reads every
# connection in the same poll, so concurrent CSI calls and an intent's
# parallel steps only overlap with a connection each: 64 keeps 16 CSI calls
# in flight (each up to 3 parallel SPDK calls) from queueing in the driver.
DEFAULT_CONNECTIONS = 64
# Idle connections kept for the next burst; the rest are closed when they
# come back, so the pool follows the load instead of its peak.
DEFAULT_IDLE = 16
CRASH_ENV = "CSI_SPDK_CRASH_AT"            # "<method>:<nth>:<before|after>"
CRASH_MARKER_ENV = "CSI_SPDK_CRASH_MARKER"  # file written just before the kill


class CrashHook:
    """Fault injection for the crash tests, enabled only by ``CSI_SPDK_CRASH_AT``:
    SIGKILL this process at the nth call of an SPDK method, before it is sent
    or after SPDK applied it (its reply read). The marker file proves the
    point was reached. Inert (one attribute check per call) without the
    variable."""

    def __init__(self, spec: str, marker: str) -> None:
        method, nth, when = spec.rsplit(":", 2)
        if when not in ("before", "after"):
            raise ValueError(f"{CRASH_ENV}={spec!r}: the last field must be before or after")
        self.method, self.nth, self.when, self.marker = method, int(nth), when, marker
        self.count = 0
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> CrashHook | None:
        spec = os.environ.get(CRASH_ENV, "")
        return cls(spec, os.environ.get(CRASH_MARKER_ENV, "")) if spec else None

    def before(self, method: str) -> int:
        if method != self.method:
            return 0
        with self._lock:
            self.count += 1
            n = self.count
        if self.when == "before" and n == self.nth:
            self._kill()
        return n

    def after(self, method: str, n: int) -> None:
        if method == self.method and self.when == "after" and n == self.nth:
            self._kill()

    def _kill(self) -> None:
        if self.marker:
            with open(self.marker, "w", encoding="utf-8") as f:
                f.write(f"{self.method}:{self.nth}:{self.when}\n")
                f.flush()
                os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


_CRASH = CrashHook.from_env()

# How SPDK (and the simulator) start a reply whose result is an array: the
# result's elements can then be decoded one at a time (``_Connection.call``'s
# ``each``) instead of the whole reply at once.
_ARRAY_HEAD = re.compile(r'\s*\{\s*"jsonrpc"\s*:\s*"2\.0"\s*,\s*"id"\s*:\s*(\d+)\s*,'
                         r'\s*"result"\s*:\s*\[')
_WS = re.compile(r"\s*")
# a reply head longer than this that is not an array result is decoded whole
_HEAD_MAX = 512


def parse_address(address: str) -> tuple[int, Any]:
    """Map ``unix:///path``, ``/path`` or ``host:port`` to (family, sockaddr)."""
    if address.startswith("unix://"):
        return socket.AF_UNIX, address[len("unix://"):]
    if address.startswith("unix:"):
        return socket.AF_UNIX, address[len("unix:"):]
    if address.startswith("/") or address.startswith("."):
        return socket.AF_UNIX, address
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"SPDK RPC address {address!r} is neither a socket path nor host:port")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, int(port))


class _Connection:
    def __init__(self, family: int, sockaddr: Any, timeout: float) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(sockaddr)
        except OSError:
            self.sock.close()
            raise
        self.chunks: list[bytes] = []
        self.decoder = json.JSONDecoder()

    def call(self, payload: bytes, deadline: float,
             each: Callable[[Any], Any] | None = None) -> dict:
        """Send one request, read its reply.

        SPDK ends every reply with a newline (spdk-golden/README.md, "JSON-RPC
        framing"), so the reply is decoded only when a chunk ends with one:
        once per reply instead of once per 64 KiB chunk (a 16,000-lvol
        bdev_get_bdevs is ~250 chunks). A newline inside a formatted reply
        just means one more attempt. ``each``: see ``_read_items``."""
        self.sock.settimeout(max(0.001, deadline - time.monotonic()))
        self.sock.sendall(payload)
        if each is not None:
            return self._read_items(deadline, each)
        return self._read_whole(deadline)

    def _read_whole(self, deadline: float) -> dict:
        while True:
            if self.chunks and self.chunks[-1].endswith(b"\n"):
                reply = self._decode()
                if reply is not None:
                    return reply
            self.chunks.append(self._recv(deadline))

    def _recv(self, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no complete reply before the deadline")
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("SPDK closed the connection")
        return chunk

    def _read_items(self, deadline: float, each: Callable[[Any], Any]) -> dict:
        """A reply whose result is an array, decoded one element at a time as
        the chunks arrive: ``each(element)`` is kept (None: dropped), so what
        the caller keeps, not the whole reply, is what is held (a
        bdev_get_bdevs of 20,000 lvols is ~25 MB of text and ~10 times that
        as Python objects). Any other reply (an error, a result that is no
        array) is decoded whole, ``each`` applied to an array result."""
        utf8 = codecs.getincrementaldecoder("utf-8")()
        buf = utf8.decode(b"".join(self.chunks))
        self.chunks = []
        head = None
        while head is None:
            head = _ARRAY_HEAD.match(buf)
            if head is None and (len(buf) > _HEAD_MAX or buf.rstrip().endswith("}")):
                self.chunks = [buf.encode()]
                reply = self._read_whole(deadline)
                if isinstance(reply.get("result"), list):
                    reply["result"] = [k for k in map(each, reply["result"]) if k is not None]
                return reply
            if head is None:
                buf += utf8.decode(self._recv(deadline))
        items: list[Any] = []
        pos = head.end()
        while True:
            while True:
                pos = _WS.match(buf, pos).end()
                if pos >= len(buf):
                    break
                c = buf[pos]
                if c == ",":
                    pos += 1
                    continue
                if c == "]":
                    end = _WS.match(buf, pos + 1).end()
                    if end >= len(buf):
                        break              # the closing brace is still to come
                    if buf[end] != "}":
                        raise ConnectionError("malformed reply after the result array")
                    rest = buf[end + 1:].strip()
                    self.chunks = [rest.encode()] if rest else []
                    return {"jsonrpc": "2.0", "id": int(head.group(1)), "result": items}
                if c not in "{[":
                    raise ConnectionError(f"unexpected {c!r} in a result array")
                try:
                    obj, pos = self.decoder.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    break                  # the element is not complete yet
                kept = each(obj)
                if kept is not None:
                    items.append(kept)
            buf, pos = buf[pos:], 0
            buf += utf8.decode(self._recv(deadline))

    def _decode(self) -> dict | None:
        data = b"".join(self.chunks)
        self.chunks = [data]
        try:
            text = data.decode()
            start = len(text) - len(text.lstrip())
            obj, end = self.decoder.raw_decode(text, start)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # incomplete: read more
        rest = text[end:].lstrip()
        self.chunks = [rest.encode()] if rest else []
        return obj

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class SpdkClient:
    """Call SPDK JSON-RPC methods. Safe to share between threads."""

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT,
                 pool_size: int = DEFAULT_CONNECTIONS, idle: int = DEFAULT_IDLE) -> None:
        """``pool_size``: calls in flight at most (a connection each, dialled
        on demand); ``idle``: connections kept open between bursts."""
        self.address = address
        self.timeout = timeout
        self.pool_size = pool_size
        self._keep = max(1, idle)
        self._family, self._sockaddr = parse_address(address)
        self._ids = itertools.count(1)
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(pool_size)

    streams = True   # ``call`` takes ``each`` (SpdkApi uses it for the listings)

    def call(self, method: str, params: dict | None = None, timeout: float | None = None,
             each: Callable[[Any], Any] | None = None) -> Any:
        """Send one request and return its ``result``; raise a typed error otherwise.

        ``each``: the result is an array; keep ``each(element)`` of every
        element that is not None, decoding one element at a time (the reply
        is never held whole)."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": next(self._ids)}
        if params is not None:
            request["params"] = params
        payload = json.dumps(request).encode()
        start = time.monotonic()
        outcome = "transport"
        if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise SpdkTransportError(self.address, method, "all connections busy until timeout")
        nth = _CRASH.before(method) if _CRASH is not None else 0
        try:
            reply = self._exchange(method, payload, deadline, each)
            if _CRASH is not None:
                _CRASH.after(method, nth)
            if reply.get("id") != request["id"]:
                raise SpdkTransportError(self.address, method,
                                         f"reply id {reply.get('id')!r} != {request['id']}")
            if "error" in reply:
                outcome = "error"
                raise from_response(method, reply["error"])
            outcome = "ok"
            return reply.get("result")
        finally:
            self._slots.release()
            metrics.SPDK_LATENCY.labels(method, outcome).observe(time.monotonic() - start)

    def _exchange(self, method: str, payload: bytes, deadline: float,
                  each: Callable[[Any], Any] | None = None) -> dict:
        """Run one request on a pooled connection; retry once on a stale idle one."""
        for attempt in (0, 1):
            conn, reused = self._checkout(method, deadline)
            try:
                reply = conn.call(payload, deadline, each)
            except (BrokenPipeError, ConnectionResetError, ConnectionError) as err:
                conn.close()
                # A pooled connection may have died with a restarted target; so
                # have the other idle ones then: they are dropped and a fresh
                # connection gets one more try. A fresh connection failing is real.
                if reused and attempt == 0:
                    self._drop_idle()
                    continue
                raise SpdkTransportError(self.address, method, str(err)) from err
            except (OSError, TimeoutError) as err:
                conn.close()
                reason = "timed out" if isinstance(err, TimeoutError | socket.timeout) else str(err)
                raise SpdkTransportError(self.address, method, reason) from err
            with self._lock:
                keep = len(self._idle) < self._keep
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()
            return reply
        raise AssertionError("unreachable")

    def _checkout(self, method: str, deadline: float) -> tuple[_Connection, bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        try:
            return _Connection(self._family, self._sockaddr,
                               max(0.001, deadline - time.monotonic())), False
        except OSError as err:
            raise SpdkTransportError(self.address, method, str(err)) from err

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        self._drop_idle()

    def __enter__(self) -> SpdkClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
