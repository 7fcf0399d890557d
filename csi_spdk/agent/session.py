"""The server half of the agent's ``Session`` stream (proto/agent.proto).

The controller's client keeps one bidirectional stream per channel and sends
every request on it with an id; replies go back in the order they are ready.
A message on an open stream costs grpcio about 0.3 ms less than a unary call
(no call set-up, no per-call metadata, fewer completion-queue rounds:
``benchmarks/agent.py``), which is most of the agent's hop.

Threads: a reader takes requests off the stream and hands each to the pool;
the handler (the servicer's ``_session_one``: the same checks, log line,
counter and status as the unary RPC) runs there, so a slow intent holds up
no other request; the gRPC handler thread yields the replies. When the
client half-closes, the replies still owed are sent before the stream ends;
when it goes away (cancelled, connection lost) the stream ends at once and
what is still running finishes with nobody to answer.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor

import grpc

from ..proto import agent_pb2

log = logging.getLogger("csi_spdk.agent")

_END = object()          # the reader is done: no more requests will come
_GONE = object()         # the client went away: stop now


def status(request_id: int, code: grpc.StatusCode, message: str) -> agent_pb2.SessionReply:
    """The reply of a failed request: what its unary RPC would have aborted with."""
    return agent_pb2.SessionReply(id=request_id, status=agent_pb2.Status(
        code=code.value[0], message=message))


class Open:
    """The sessions being served, so that a stopping agent can end them: a
    client's stream never ends by itself, and the server's grace period
    would otherwise always run out on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replies: set[queue.SimpleQueue] = set()
        self.ending = False

    def add(self, replies: queue.SimpleQueue) -> None:
        with self._lock:
            self._replies.add(replies)

    def discard(self, replies: queue.SimpleQueue) -> None:
        with self._lock:
            self._replies.discard(replies)

    def end(self) -> None:
        """Let every session send the replies it owes and end (status OK);
        a client's next call opens a new stream, to whoever listens then."""
        with self._lock:
            self.ending = True
            for replies in self._replies:
                replies.put(_END)


def serve(requests: Iterator[agent_pb2.SessionRequest], context: grpc.ServicerContext,
          handle: Callable[[agent_pb2.SessionRequest, grpc.ServicerContext],
                           agent_pb2.SessionReply],
          pool: Executor, sessions: Open) -> Iterator[agent_pb2.SessionReply]:
    """The replies of a session, as ``handle`` produces them on ``pool``."""
    replies: queue.SimpleQueue = queue.SimpleQueue()
    context.add_callback(lambda: replies.put(_GONE))
    sessions.add(replies)
    try:
        yield from _replies(requests, context, handle, pool, replies, sessions)
    finally:
        sessions.discard(replies)


def _replies(requests: Iterator[agent_pb2.SessionRequest], context: grpc.ServicerContext,
             handle: Callable[[agent_pb2.SessionRequest, grpc.ServicerContext],
                              agent_pb2.SessionReply],
             pool: Executor, replies: queue.SimpleQueue,
             sessions: Open) -> Iterator[agent_pb2.SessionReply]:

    def run(req: agent_pb2.SessionRequest) -> None:
        try:
            reply = handle(req, context)
        except Exception:  # noqa: BLE001 - handle maps errors; this is the last resort
            log.exception("session request failed", extra={"f": {"id": req.id}})
            reply = status(req.id, grpc.StatusCode.INTERNAL,
                           "internal error in the storage agent")
        replies.put(reply)

    owed = [0]           # requests handed to the pool whose reply was not sent yet
    lock = threading.Lock()

    def read() -> None:
        try:
            for req in requests:
                with lock:
                    owed[0] += 1
                try:
                    if sessions.ending:
                        raise RuntimeError("stopping")
                    pool.submit(run, req)
                except RuntimeError:      # the agent is stopping: nothing new starts
                    replies.put(status(req.id, grpc.StatusCode.UNAVAILABLE,
                                       "the storage agent is stopping"))
        except Exception:  # noqa: BLE001 - the stream broke: the callback ends it
            pass
        replies.put(_END)

    threading.Thread(target=read, name="agent-session-reader", daemon=True).start()
    ended = False
    while True:
        item = replies.get()
        if item is _GONE:
            return
        if item is _END:
            ended = True
        else:
            with lock:
                owed[0] -= 1
            yield item
        if ended:
            with lock:
                if owed[0] == 0:
                    return
