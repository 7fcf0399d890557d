"""The client half of the agent's ``Session`` stream (proto/agent.proto).

One stream per channel carries the calls of every controller thread, each
with an id; a reader thread hands each reply to the caller waiting for its
id. Why: a message on an open stream costs grpcio about 0.3 ms less than a
unary call (``benchmarks/agent.py``), and the agent hop is on every SPDK
call the controller makes.

Failure is per request where it can be and per stream where it must: a
request the agent refuses or fails answers its id with a status and the
stream carries on; a request not answered by its deadline is given up
(DEADLINE_EXCEEDED, a late reply is dropped); when the stream itself breaks
(agent killed, connection lost, channel closed) every request waiting on it
fails with the stream's status (UNAVAILABLE) and the session is dead: the
owner opens a new one for the next call, which is the reconnection.
"""

from __future__ import annotations

import itertools
import queue
import threading
from typing import Any

import grpc

from ..proto import agent_pb2

METHOD = "/csispdk.agent.v1.Agent/Session"


class SessionError(grpc.RpcError):
    """A request's failure, with a gRPC status as a unary call's error has."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    sent = True      # the request went out on the stream (the agent may have run it)


class SessionClosed(SessionError):
    """The stream was already broken: the request was never sent."""

    sent = False


_CODES = {c.value[0]: c for c in grpc.StatusCode}


class _Waiter:
    __slots__ = ("event", "reply", "error")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reply: agent_pb2.SessionReply | None = None
        self.error: SessionError | None = None


class Session:
    """One open ``Session`` stream on ``channel``. Safe to share between threads."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: dict[int, _Waiter] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._broken: SessionError | None = None
        self.channel = channel
        self._call = channel.stream_stream(
            METHOD, request_serializer=agent_pb2.SessionRequest.SerializeToString,
            response_deserializer=agent_pb2.SessionReply.FromString,
        )(iter(self._outbox.get, None))
        threading.Thread(target=self._read, name="agent-session", daemon=True).start()

    @property
    def alive(self) -> bool:
        return self._broken is None

    def _read(self) -> None:
        try:
            for reply in self._call:
                with self._lock:
                    waiter = self._waiting.pop(reply.id, None)
                if waiter is not None:        # None: its caller gave up (deadline)
                    waiter.reply = reply
                    waiter.event.set()
            error = SessionError(grpc.StatusCode.UNAVAILABLE, "the agent ended the session")
        except grpc.RpcError as err:
            error = SessionError(err.code(), err.details() or str(err.code()))
        self._fail(error)

    def _fail(self, error: SessionError) -> None:
        with self._lock:
            if self._broken is None:
                self._broken = error
            waiting, self._waiting = self._waiting, {}
        for waiter in waiting.values():
            waiter.error = error
            waiter.event.set()
        self._outbox.put(None)                # ends the request stream's sender

    def request(self, timeout: float, **kind: Any) -> Any:
        """Send one request (``call=CallRequest(...)`` or another of the
        SessionRequest's kinds) and return its reply message of that kind;
        raise ``SessionError`` for a status, a deadline or a broken stream."""
        waiter = _Waiter()
        with self._lock:
            if self._broken is not None:
                raise SessionClosed(self._broken.code(), self._broken.details())
            request_id = next(self._ids)
            self._waiting[request_id] = waiter
        self._outbox.put(agent_pb2.SessionRequest(id=request_id, **kind))
        if not waiter.event.wait(timeout):
            with self._lock:
                self._waiting.pop(request_id, None)
            if not waiter.event.is_set():
                raise SessionError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        if waiter.error is not None:
            raise waiter.error
        reply = waiter.reply
        assert reply is not None
        if reply.WhichOneof("kind") == "status":
            raise SessionError(_CODES.get(reply.status.code, grpc.StatusCode.UNKNOWN),
                               reply.status.message)
        return getattr(reply, next(iter(kind)))

    def close(self) -> None:
        """End the stream; requests still waiting fail (CANCELLED)."""
        self._call.cancel()
        self._fail(SessionError(grpc.StatusCode.CANCELLED, "the session was closed"))
