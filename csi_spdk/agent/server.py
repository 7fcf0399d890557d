"""The agent's gRPC service (proto/agent.proto): checked SPDK calls and keys.

``Call`` forwards one allow-listed SPDK method to the local spdk_tgt after
``policy.check``; SPDK's own error travels back in the reply (code and message
unchanged) so the controller's typed errors work as over a direct socket, and
a broken spdk_tgt socket is UNAVAILABLE. ``PutKey``/``DeleteKey`` are
intent-level because no SPDK method takes a key inline (``keys.py``).

After every successful mutating call the server tells ``state.record(method,
params, result)``, the desired-state store that replays exports after an spdk_tgt
restart (``state.py``); keys are recorded as name and path, never material.
Until a store is wired in, ``NullState`` records nothing.

Every change, refusal and failure is one JSON log line (rpc, method, outcome,
duration, peer, error); reads log at debug level only. Parameters appear only
at debug level, redacted, and key material never.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import grpc

from .. import metrics
from ..errors import CsiError, InvalidArgument
from ..log import redact_mapping
from ..proto import agent_pb2, agent_pb2_grpc
from ..spdk import intents
from ..spdk.api import SpdkApi
from ..spdk.errors import SpdkError, SpdkNotFound
from . import policy, session
from .keys import KeyStore

log = logging.getLogger("csi_spdk.agent")

MAX_TIMEOUT = 600.0
INTENTS = ("create_lvol", "export", "unexport", "delete_volume")
# Requests of all sessions run at once at most; more wait for a thread. As
# many as the gRPC server's own workers, so a session is no narrower than
# unary calls were.
SESSION_WORKERS = 64


class State(Protocol):
    def record(self, method: str, params: dict | None, result: Any = None) -> Any: ...


class CheckedApi(SpdkApi):
    """What an intent running in the agent calls SPDK through: each call passes
    ``policy.check`` exactly as a ``Call`` would, and each successful mutating
    one is recorded in the desired state. The bdevs the intent has just read
    answer the policy's look-ups, so a check costs no extra round trip. The
    records are kept until ``flush`` (the intent's end: one state write)."""

    def __init__(self, api: SpdkApi, state: State, timeout: float) -> None:
        super().__init__(api.client)
        self.inner, self.state, self.timeout = api, state, timeout
        self._seen: dict[str, dict | None] = {}
        self._applied: list[tuple[str, dict | None, Any]] = []
        self._mutex = threading.Lock()

    def flush(self) -> None:
        """Record the mutating calls SPDK applied, in the order they returned."""
        with self._mutex:
            applied, self._applied = self._applied, []
        for method, params, result in applied:
            self.state.record(method, params, result)

    def _lookup(self, ref: str) -> dict | None:
        if ref in self._seen:
            return self._seen[ref]
        return self.inner.bdev_get(ref)

    def call(self, method: str, params: dict | None = None, timeout: float | None = None) -> Any:
        policy.check(method, params, self._lookup)
        try:
            result = self.inner.call(method, params, timeout=timeout or self.timeout)
        except SpdkNotFound:
            if method == "bdev_get_bdevs" and params and "name" in params:
                self._seen[params["name"]] = None
            raise
        if method == "bdev_get_bdevs" and params and "name" in params:
            self._seen[params["name"]] = result[0] if result else None
        if method in policy.MUTATING:
            with self._mutex:
                self._applied.append((method, params, result))
        return result


class NullState:
    """A desired-state store that keeps nothing (before one is configured)."""

    def record(self, method: str, params: dict | None, result: Any = None) -> None:
        return None


def peer_of(context: grpc.ServicerContext) -> str:
    """Who called: the client certificate's CN when there is one, else the peer."""
    try:
        auth = context.auth_context() or {}
        names = auth.get("x509_common_name") or []
        if names:
            return names[0].decode(errors="replace")
        return context.peer() or "?"
    except Exception:  # noqa: BLE001 - only for the log line
        return "?"


class AgentServicer(agent_pb2_grpc.AgentServicer):
    """The Agent service over one spdk_tgt (``api``) and a key store."""

    def __init__(self, api: SpdkApi, keys: KeyStore, state: State | None = None,
                 default_timeout: float = 30.0) -> None:
        self.api = api
        self.keys = keys
        self.state = state or NullState()
        self.default_timeout = default_timeout
        self._pool = ThreadPoolExecutor(SESSION_WORKERS, thread_name_prefix="agent-session")
        self.sessions = session.Open()

    # --- plumbing ---------------------------------------------------------------
    def _serve(self, context: grpc.ServicerContext, rpc: str, method: str,
               fn: Callable[[], tuple[Any, str]], fields: dict | None = None) -> Any:
        """A unary RPC: ``_run`` it; a failure aborts the call with its status."""
        reply, code, message = self._run(context, rpc, method, fn, fields)
        if code != grpc.StatusCode.OK:
            context.abort(code, message)
        return reply

    def _run(self, context: grpc.ServicerContext, rpc: str, method: str,
             fn: Callable[[], tuple[Any, str]], fields: dict | None = None,
             ) -> tuple[Any, grpc.StatusCode, str]:
        """Run ``fn`` (-> reply, outcome); log, count, map errors to a status.
        Returns (reply, code, message): the unary RPC aborts with a failure's
        code, a Session answers the request's id with it."""
        start = time.monotonic()
        label = method if rpc != "Call" else policy.metric_label(method)
        outcome, code, message, reply = "error", grpc.StatusCode.INTERNAL, "", None
        try:
            reply, outcome = fn()
            code = grpc.StatusCode.OK
        except policy.Refused as err:
            outcome, code, message = "refused", err.code, err.message
            metrics.AGENT_REFUSED.labels(label, err.reason).inc()
            fields = {**(fields or {}), "reason": err.reason}
        except CsiError as err:
            code, message = err.code, err.message
            outcome = {grpc.StatusCode.UNAVAILABLE: "unavailable",
                       grpc.StatusCode.INVALID_ARGUMENT: "invalid"}.get(code, "error")
        except Exception as err:  # noqa: BLE001 - last-resort mapping
            message = f"internal error in the storage agent: {type(err).__name__}"
            log.exception(message, extra={"f": {"rpc": rpc, "method": label}})
        elapsed = time.monotonic() - start
        metrics.AGENT_REQUESTS.labels(label, outcome).inc()
        metrics.AGENT_LATENCY.labels(label, outcome).observe(elapsed)
        # The audit trail: every change and every failure at info or above;
        # reads (most calls) only at debug, so they cost no log line.
        if code != grpc.StatusCode.OK:
            level = logging.WARNING
        elif rpc == "Call" and method in policy.READS:
            level = logging.DEBUG
        else:
            level = logging.INFO
        if log.isEnabledFor(level):
            line = {"rpc": rpc, "method": method[:80], "outcome": outcome,
                    "duration_ms": round(elapsed * 1000, 3), "peer": peer_of(context),
                    **(fields or {})}
            if message:
                line["error"] = message
            log.log(level, "refused" if outcome == "refused" else rpc, extra={"f": line})
        return reply, code, message

    def _changing(self) -> contextlib.AbstractContextManager:
        """Held around a change and its record (``DesiredState.changes``):
        a replay waits for changes in flight and changes wait for a replay."""
        store = getattr(self.state, "state", self.state)   # StorageSide -> its record
        changes = getattr(store, "changes", None)
        return changes.shared() if changes is not None else contextlib.nullcontext()

    def _record(self, method: str, params: dict | None, result: Any = None) -> None:
        """Tell the desired-state store; ``result`` is SPDK's reply (e.g. the nsid
        nvmf_subsystem_add_ns chose), never key material."""
        self.state.record(method, params, result)

    # --- Call ---------------------------------------------------------------------
    def Call(self, request, context):  # noqa: N802 - gRPC method name
        method = request.method
        return self._serve(context, "Call", method, lambda: self._call(request))

    def _call(self, request) -> tuple[agent_pb2.CallReply, str]:
        method = request.method
        try:
            params = json.loads(request.params_json) if request.params_json else None
        except ValueError:
            raise InvalidArgument(f"{method}: params_json is not JSON") from None
        if log.isEnabledFor(logging.DEBUG):
            log.debug("call", extra={"f": {"method": method[:80], "params": redact_mapping(
                params) if isinstance(params, dict) else "<not an object>"}})
        timeout = request.timeout if 0 < request.timeout <= MAX_TIMEOUT \
            else self.default_timeout
        if method in policy.AGENT_READS:
            policy.check(method, params, self.api.bdev_get)
            return agent_pb2.CallReply(result_json=json.dumps(self._agent_read(method))), "ok"
        try:
            policy.check(method, params, self.api.bdev_get)
            if method in policy.MUTATING:
                with self._changing():
                    result = self.api.call(method, params, timeout=timeout)
                    self._record(method, params, result)
                return agent_pb2.CallReply(result_json=json.dumps(result)), "ok"
            if method in policy.LISTINGS:
                # element by element: the listing is held as text, not objects
                # (10,000 volumes: ~10 MB of text, ten times that decoded)
                result = self.api.call(method, params, timeout=timeout, each=json.dumps)
                text = "[" + ", ".join(result) + "]" if isinstance(result, list) \
                    else json.dumps(result)
                return agent_pb2.CallReply(result_json=text), "ok"
            result = self.api.call(method, params, timeout=timeout)
        except SpdkError as err:
            return agent_pb2.CallReply(error=agent_pb2.SpdkError(
                code=err.spdk_code, message=err.spdk_message)), "spdk_error"
        return agent_pb2.CallReply(result_json=json.dumps(result)), "ok"

    def _agent_read(self, method: str) -> Any:
        """``csi_spdk_get_pools``: the pools of the agent's pool file with their
        state (loaded, created, refused, error) and the reason, capacity and
        devices (``Pools.report``); ``configured`` false without a pool file."""
        report = getattr(self.state, "pool_report", None)
        pools = report() if report is not None else None
        return {"configured": pools is not None, "pools": pools or []}

    # --- intents (spdk/intents.py) -------------------------------------------------
    def _intent(self, name: str, request, context):
        return self._serve(context, name, name, self._intent_fn(name, request))

    def _intent_fn(self, name: str, request) -> Callable[[], tuple[Any, str]]:
        def run() -> tuple[agent_pb2.IntentReply, str]:
            try:
                spec = json.loads(request.spec_json or "{}")
            except ValueError:
                raise InvalidArgument(f"{name}: spec_json is not JSON") from None
            if not isinstance(spec, dict):
                raise InvalidArgument(f"{name}: spec_json must be an object")
            timeout = request.timeout if 0 < request.timeout <= MAX_TIMEOUT \
                else self.default_timeout
            store = getattr(self.state, "state", self.state)   # StorageSide -> its record
            batch = getattr(store, "batch", contextlib.nullcontext)
            checked = CheckedApi(self.api, self.state, timeout)
            result = None
            try:
                with self._changing():
                    try:
                        result = intents.run(checked, name, spec)
                    finally:
                        # what SPDK applied is recorded, failed intent or not, in
                        # one atomic write (the parallel steps ran on other threads)
                        with batch():
                            checked.flush()
                            if result is not None:
                                self._settle(store, name, spec, result)
            except intents.IntentError as err:
                return agent_pb2.IntentReply(refusal=agent_pb2.IntentRefusal(
                    reason=err.reason, message=err.message,
                    details_json=json.dumps(err.details))), "declined"
            except SpdkError as err:
                return agent_pb2.IntentReply(error=agent_pb2.SpdkError(
                    code=err.spdk_code, message=err.spdk_message)), "spdk_error"
            except (KeyError, TypeError, ValueError) as err:
                raise InvalidArgument(f"{name}: malformed spec ({type(err).__name__}: "
                                      f"{str(err)[:80]})") from None
            return agent_pb2.IntentReply(result_json=json.dumps(result)), "ok"
        return run

    @staticmethod
    def _settle(store: Any, name: str, spec: dict, result: dict) -> None:
        """The record states what the intent made, whichever calls it needed."""
        if name == "export" and hasattr(store, "settle_export"):
            store.settle_export(spec)
        elif name == "unexport" and hasattr(store, "settle_unexport"):
            store.settle_unexport(spec, bool(result.get("gone")) or bool(spec.get("all")))
        elif name == "delete_volume" and hasattr(store, "settle_unexport"):
            store.settle_unexport(spec, gone=True)            # its subsystem went first
            store.record("bdev_lvol_delete", {"name": spec["uuid"]})   # and its QoS

    def CreateLvol(self, request, context):  # noqa: N802
        return self._intent("create_lvol", request, context)

    def Export(self, request, context):  # noqa: N802
        return self._intent("export", request, context)

    def Unexport(self, request, context):  # noqa: N802
        return self._intent("unexport", request, context)

    def DeleteVolume(self, request, context):  # noqa: N802
        return self._intent("delete_volume", request, context)

    # --- keys ---------------------------------------------------------------------
    def PutKey(self, request, context):  # noqa: N802
        return self._serve(context, "PutKey", "PutKey", self._put_key_fn(request),
                           {"key": request.name[:80]})

    def _put_key_fn(self, request) -> Callable[[], tuple[Any, str]]:
        def put() -> tuple[agent_pb2.PutKeyReply, str]:
            with self._changing():
                path = self.keys.put(request.name, bytes(request.material))
                self._record("keyring_file_add_key", {"name": request.name, "path": path})
            return agent_pb2.PutKeyReply(name=request.name, path=path), "ok"
        return put

    def DeleteKey(self, request, context):  # noqa: N802
        return self._serve(context, "DeleteKey", "DeleteKey", self._delete_key_fn(request),
                           {"key": request.name[:80]})

    def _delete_key_fn(self, request) -> Callable[[], tuple[Any, str]]:
        def delete() -> tuple[agent_pb2.DeleteKeyReply, str]:
            with self._changing():
                self.keys.delete(request.name)
                self._record("keyring_file_remove_key", {"name": request.name})
            return agent_pb2.DeleteKeyReply(), "ok"
        return delete

    # --- Session: the same requests multiplexed on one stream --------------------------
    def Session(self, request_iterator, context):  # noqa: N802
        """Each request runs on the session pool (a slow intent holds up no
        other request) and its reply goes back as soon as it is ready."""
        return session.serve(request_iterator, context, self._session_one, self._pool,
                             self.sessions)

    def end_sessions(self) -> None:
        """Before the server stops: the sessions end once their replies are sent."""
        self.sessions.end()

    def _session_one(self, req: agent_pb2.SessionRequest,
                     context: grpc.ServicerContext) -> agent_pb2.SessionReply:
        kind = req.WhichOneof("kind")
        if kind == "call":
            reply, code, message = self._run(context, "Call", req.call.method,
                                             lambda: self._call(req.call))
        elif kind == "intent" and req.intent.name in INTENTS:
            name = req.intent.name
            reply, code, message = self._run(context, name, name,
                                             self._intent_fn(name, req.intent.request))
        elif kind == "put_key":
            reply, code, message = self._run(context, "PutKey", "PutKey",
                                             self._put_key_fn(req.put_key),
                                             {"key": req.put_key.name[:80]})
        elif kind == "delete_key":
            reply, code, message = self._run(context, "DeleteKey", "DeleteKey",
                                             self._delete_key_fn(req.delete_key),
                                             {"key": req.delete_key.name[:80]})
        else:
            what = f"intent {req.intent.name[:40]!r}" if kind == "intent" else "request"
            return session.status(req.id, grpc.StatusCode.INVALID_ARGUMENT,
                                  f"session: unknown {what} (this agent serves "
                                  f"call, {', '.join(sorted(INTENTS))}, put_key, delete_key)")
        if code != grpc.StatusCode.OK:
            return session.status(req.id, code, message)
        return agent_pb2.SessionReply(id=req.id, **{kind: reply})
