"""The controller's client of a storage agent (proto/agent.proto).

Same surface as ``SpdkClient`` (``call(method, params, timeout)``, ``close()``,
``address``), so ``SpdkApi`` and everything above it work unchanged whether a
target is a local socket or an agent on a storage host. The errors keep their
meaning: an SPDK error answered through the agent becomes the same typed
``SpdkError`` a direct call raises (code and message intact); an agent that
cannot be reached, fails the TLS handshake, or cannot reach its spdk_tgt is
``SpdkTransportError`` (UNAVAILABLE) naming the agent; a refusal is
PERMISSION_DENIED with the agent's reason.

TLS: ``host:port`` addresses always use mutual TLS (CA, client certificate
and key); the agent's certificate is verified against ``server_name`` when
given, else against the address's host. ``unix://`` addresses are plaintext
on the same host.

Renewal without a restart: cert-manager (through the kubelet's Secret volume)
replaces the CA, certificate and key files in place. Before handing out its
stub the client looks at the files (at most once a second, a ``stat`` each);
when they changed and the new set is usable (the key matches the certificate,
checked with the standard ``ssl`` module, so a half-written renewal is
skipped until it is whole) it opens a new channel with them. Calls already
in flight finish on the old channel, which is closed once no call can still
be using it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from .. import metrics
from ..errors import CsiError, Internal, InvalidArgument
from ..proto import agent_pb2, agent_pb2_grpc
from .agent_session import Session, SessionError
from .client import DEFAULT_TIMEOUT
from .errors import SpdkTransportError, from_response
from .intents import IntentError

# Extra seconds the gRPC deadline gives the agent beyond the SPDK timeout it
# passes on, so spdk_tgt's timeout (a clear message from the agent) fires first.
DEADLINE_MARGIN = 2.0
# How often the TLS files are looked at for a renewal (seconds).
TLS_RECHECK_INTERVAL = 1.0
# A retired channel is closed this long after a renewal: longer than any call's
# deadline (the agent caps a call at 600 s), so no call in flight is cut.
RETIRED_CHANNEL_GRACE = 600.0 + 2 * DEADLINE_MARGIN
# The largest reply the client accepts (gRPC's default is 4 MiB): a listing
# crosses as one message, and bdev_get_bdevs at 10,000 lvols is ~13 MB (it
# failed with "Received message larger than max" before this was set). 512 MiB
# is about 400,000 lvols, beyond what one spdk_tgt holds.
MAX_REPLY_BYTES = 512 << 20
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_REPLY_BYTES)]

_DECODER = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")


def decode_each(text: str, each: Callable[[Any], Any]) -> Any:
    """A JSON array's elements decoded one at a time, keeping ``each(element)``
    when not None: a listing of 10,000 bdevs (~10 MB of text, ten times that
    as Python objects) is never held as objects whole, only what the caller
    keeps. A result that is not an array is returned decoded (as SpdkClient)."""
    pos = _WS.match(text).end()
    if not text.startswith("[", pos):
        return json.loads(text)
    items: list[Any] = []
    pos = _WS.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return items
    while True:
        obj, pos = _DECODER.raw_decode(text, pos)
        kept = each(obj)
        if kept is not None:
            items.append(kept)
        pos = _WS.match(text, pos).end()
        sep = text[pos:pos + 1]
        if sep == "]":
            return items
        if sep != ",":
            raise ValueError(f"malformed array at offset {pos}")
        pos = _WS.match(text, pos + 1).end()

log = logging.getLogger("csi_spdk.agent_client")


@dataclass(frozen=True)
class ClientTls:
    ca_file: str
    cert_file: str
    key_file: str

    def credentials(self) -> grpc.ChannelCredentials:
        def read(what: str, path: str) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as err:
                raise InvalidArgument(f"agent TLS {what} {path}: "
                                      f"{err.strerror or err}") from None
        return grpc.ssl_channel_credentials(
            root_certificates=read("caFile", self.ca_file),
            private_key=read("keyFile", self.key_file),
            certificate_chain=read("certFile", self.cert_file))

    def version(self) -> tuple[tuple[int, int, int], ...]:
        """What identifies this content of the files: (inode, size, mtime) each,
        following symlinks (a Secret volume swaps its ``..data`` link)."""
        out = []
        for path in (self.ca_file, self.cert_file, self.key_file):
            st = os.stat(path)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def check(self) -> None:
        """Raise ``ssl.SSLError``/``OSError`` unless the set is usable: the CA
        and the certificate parse and the key matches the certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=self.ca_file)
        ctx.load_cert_chain(self.cert_file, self.key_file)


def is_unix(address: str) -> bool:
    return address.startswith("unix:")


class AgentClient:
    """Call SPDK methods through a storage agent. Safe to share between threads."""

    def __init__(self, address: str, tls: ClientTls | None = None, server_name: str = "",
                 timeout: float = DEFAULT_TIMEOUT, name: str = "") -> None:
        self.address = address
        self.timeout = timeout
        self.name = name
        self._label = f"the storage agent {address}" + (f" of target {name!r}" if name else "")
        self._tls, self._server_name = tls, server_name
        self._tls_version: tuple | None = None
        self._renew_error = ""
        if is_unix(address):
            if tls is not None:
                raise InvalidArgument(f"agent {address}: TLS files are for a host:port agent")
            self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            if tls is None:
                raise InvalidArgument(f"agent {address}: a host:port agent needs tls "
                                      "(caFile, certFile, keyFile)")
            self._channel = self._secure_channel(tls)   # raises naming a missing file
            self._tls_version = tls.version()           # (a renewal meanwhile: seen later)
        self._current = agent_pb2_grpc.AgentStub(self._channel)
        self._session: Session | None = None
        self._channel_lock = threading.Lock()
        self._checked_at = time.monotonic()
        self._retired: list[threading.Timer] = []
        self._closed = threading.Event()

    # --- channel and credentials -------------------------------------------------
    def _secure_channel(self, tls: ClientTls) -> grpc.Channel:
        # A subchannel pool of its own: a renewed channel must not reuse the
        # old one's connection (made with the old certificate).
        options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        if self._server_name:
            options.append(("grpc.ssl_target_name_override", self._server_name))
        return grpc.secure_channel(self.address, tls.credentials(), options=options)

    @property
    def _stub(self) -> agent_pb2_grpc.AgentStub:
        """The stub for the next call, on a new channel when the TLS files were
        renewed since the last look."""
        if self._tls is not None and \
                time.monotonic() - self._checked_at >= TLS_RECHECK_INTERVAL:
            self._maybe_renew()
        return self._current

    def _maybe_renew(self) -> None:
        with self._channel_lock:
            if time.monotonic() - self._checked_at < TLS_RECHECK_INTERVAL:
                return
            self._checked_at = time.monotonic()
            tls = self._tls
            assert tls is not None
            try:
                version = tls.version()
                if version == self._tls_version:
                    return
                tls.check()
                channel = self._secure_channel(tls)
            except (OSError, ssl.SSLError, InvalidArgument) as err:
                # mid-renewal (a file missing, a key for another certificate):
                # keep the current channel and look again at the next check;
                # said once per distinct problem, not once a second
                if str(err) != self._renew_error:
                    self._renew_error = str(err)
                    log.warning("agent TLS files changed but are not usable yet; keeping "
                                "the current ones", extra={"f": {
                                    "agent": self.address, "error": str(err)[:200]}})
                return
            self._renew_error = ""
            old, self._channel = self._channel, channel
            self._current = agent_pb2_grpc.AgentStub(channel)
            self._tls_version = version
            timer = threading.Timer(RETIRED_CHANNEL_GRACE, old.close)
            timer.daemon = True
            timer.start()
            self._retired = [t for t in self._retired if t.is_alive()] + [timer]
            log.info("agent TLS certificates renewed; new connections use them",
                     extra={"f": {"agent": self.address, "cert": tls.cert_file}})

    def _request(self, timeout: float, **kind: Any) -> Any:
        """One request on this client's Session stream (opened on first use and
        again after it broke: the reconnection); the reply message of its kind.
        A request the stream never took (it broke just before) is sent once
        more on a new one: it cannot have reached the agent."""
        for attempt in (1, 2):
            session = self._open_session()
            try:
                return session.request(timeout, **kind)
            except SessionError as err:
                if err.sent or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _open_session(self) -> Session:
        self._stub                                   # noqa: B018 - a renewal swaps the channel
        session = self._session
        if session is not None and session.alive and session.channel is self._channel:
            return session
        with self._channel_lock:
            session = self._session
            if session is None or not session.alive or session.channel is not self._channel:
                session = self._session = Session(self._channel)
            return session

    # --- errors -------------------------------------------------------------------
    def _error(self, what: str, err: grpc.RpcError) -> CsiError:
        code, details = err.code(), err.details() or ""
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.CANCELLED):
            reason = "timed out" if code == grpc.StatusCode.DEADLINE_EXCEEDED else details
            return SpdkTransportError(self._label, what, reason)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return SpdkTransportError(self._label, what, f"not authenticated: {details}")
        if isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.UNKNOWN:
            return CsiError(f"{self._label}: {details}", code)
        return Internal(f"{self._label} failed {what}: {details}")

    # --- SpdkClient's surface --------------------------------------------------------
    streams = True   # ``call`` takes ``each`` (SpdkApi uses it for the listings)

    def call(self, method: str, params: dict | None = None, timeout: float | None = None,
             each: Callable[[Any], Any] | None = None) -> Any:
        """Forward one SPDK call; return its ``result`` or raise a typed error.
        ``each``: keep ``each(element)`` (not None) of an array result, decoded
        one element at a time from the reply's text (``decode_each``)."""
        timeout = timeout if timeout is not None else self.timeout
        request = agent_pb2.CallRequest(
            method=method, params_json=json.dumps(params) if params is not None else "",
            timeout=timeout)
        start = time.monotonic()
        outcome = "transport"
        try:
            reply = self._request(timeout + DEADLINE_MARGIN, call=request)
            if reply.HasField("error"):
                outcome = "error"
                raise from_response(method, {"code": reply.error.code,
                                             "message": reply.error.message})
            outcome = "ok"
            if not reply.result_json:
                return None
            if each is not None:
                return decode_each(reply.result_json, each)
            return json.loads(reply.result_json)
        except grpc.RpcError as err:
            if err.code() not in (grpc.StatusCode.UNAVAILABLE,
                                  grpc.StatusCode.DEADLINE_EXCEEDED):
                outcome = "refused" if err.code() == grpc.StatusCode.PERMISSION_DENIED \
                    else "error"
            raise self._error(method, err) from None
        finally:
            metrics.SPDK_LATENCY.labels(method, outcome).observe(time.monotonic() - start)

    # --- intents (spdk/intents.py): one round trip per CSI call ----------------------
    _INTENT_RPCS = {"create_lvol": "CreateLvol", "export": "Export", "unexport": "Unexport",
                    "delete_volume": "DeleteVolume"}

    def intent(self, name: str, spec: dict, timeout: float | None = None) -> dict:
        """Run an intent in the agent; the same result, ``IntentError`` or typed
        ``SpdkError`` as running it here over a direct socket."""
        rpc = self._INTENT_RPCS[name]
        timeout = timeout if timeout is not None else self.timeout
        start = time.monotonic()
        outcome = "transport"
        try:
            reply = self._request(timeout + DEADLINE_MARGIN, intent=agent_pb2.NamedIntent(
                name=name, request=agent_pb2.IntentRequest(spec_json=json.dumps(spec),
                                                           timeout=timeout)))
            if reply.HasField("refusal"):
                outcome = "declined"
                raise IntentError(reply.refusal.reason, reply.refusal.message,
                                  json.loads(reply.refusal.details_json or "{}"))
            if reply.HasField("error"):
                outcome = "error"
                raise from_response(name, {"code": reply.error.code,
                                           "message": reply.error.message})
            outcome = "ok"
            return json.loads(reply.result_json)
        except grpc.RpcError as err:
            if err.code() not in (grpc.StatusCode.UNAVAILABLE,
                                  grpc.StatusCode.DEADLINE_EXCEEDED):
                outcome = "refused" if err.code() == grpc.StatusCode.PERMISSION_DENIED \
                    else "error"
            raise self._error(rpc, err) from None
        finally:
            metrics.SPDK_LATENCY.labels(f"intent:{name}", outcome).observe(
                time.monotonic() - start)

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            with self._channel_lock:
                for timer in self._retired:      # close retired channels now
                    timer.cancel()
                    timer.function(*timer.args)
                self._retired.clear()
                if self._session is not None:
                    self._session.close()
                self._channel.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- key custody ----------------------------------------------------------------
    def put_key(self, name: str, material: bytes, timeout: float | None = None) -> str:
        """Give the target a key; returns its path on the storage host."""
        try:
            reply = self._request((timeout or self.timeout) + DEADLINE_MARGIN,
                                  put_key=agent_pb2.PutKeyRequest(name=name, material=material))
        except grpc.RpcError as err:
            raise self._error("PutKey", err) from None
        return reply.path

    def delete_key(self, name: str, timeout: float | None = None) -> None:
        try:
            self._request((timeout or self.timeout) + DEADLINE_MARGIN,
                          delete_key=agent_pb2.DeleteKeyRequest(name=name))
        except grpc.RpcError as err:
            raise self._error("DeleteKey", err) from None
