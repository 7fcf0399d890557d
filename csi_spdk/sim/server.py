"""Socket server and JSON-RPC framing of the SPDK simulator (``csi-spdk sim``).

Framing reproduces spdk_tgt v25.09 byte for byte where clients can notice
(see spdk-golden/11_jsonrpc_errors.json):
- requests are concatenated JSON values, no delimiter needed; replies are
  compact JSON followed by ``\\n``, in request order per connection;
- a notification (no ``id`` or ``"id": null``) that succeeds gets the reply
  without its final ``}`` and without ``\\n`` (SPDK's quirk); a failing one gets
  a complete error reply with ``"id": null``;
- incomplete JSON waits for more bytes; malformed JSON closes the connection
  without a reply (no -32700);
- batches, non-object requests, object/array ids, a wrong ``jsonrpc`` and a
  missing/non-string method give -32600 "Invalid request" with ``id`` null;
  a ``params`` that is neither object, array nor null gives -32600 with the id.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import io
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

from . import methods
from . import methods_lvol as lvolmod
from .dataplane import DataPlane
from .state import RpcError, SimState

log = logging.getLogger("csi_spdk.sim")
_MISSING = object()


def encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def error_reply(req_id: Any, code: int, message: str) -> bytes:
    return encode({"jsonrpc": "2.0", "id": req_id,
                   "error": {"code": code, "message": message}}) + b"\n"


def handle_request(state: SimState, req: Any) -> bytes:
    """Turn one decoded JSON value into the exact bytes spdk_tgt would send."""
    if not isinstance(req, dict):
        return error_reply(None, -32600, "Invalid request")
    if "jsonrpc" in req and req["jsonrpc"] != "2.0":
        return error_reply(None, -32600, "Invalid request")
    req_id = req.get("id", _MISSING)
    if isinstance(req_id, dict | list):
        return error_reply(None, -32600, "Invalid request")
    name = req.get("method")
    if not isinstance(name, str):
        return error_reply(None, -32600, "Invalid request")
    notification = req_id is _MISSING or req_id is None
    reply_id = None if notification else req_id
    params = req.get("params")
    if params is not None and not isinstance(params, dict | list):
        return error_reply(reply_id, -32600, "Invalid request")
    try:
        result = methods.call(state, name, params)
    except RpcError as err:
        return error_reply(reply_id, err.code, err.message)
    except Exception as err:  # a simulator bug must not kill the connection
        log.exception("method %s failed", name)
        return error_reply(reply_id, -32603, f"simulator error: {err}")
    body = encode({"jsonrpc": "2.0", "id": reply_id, "result": result})
    if notification:
        return body[:-1]          # SPDK leaves notification replies unterminated
    return body + b"\n"


class _Parser:
    """Splits a byte stream into JSON values; tells incomplete from malformed."""

    def __init__(self) -> None:
        self.buf = b""
        self.decoder = json.JSONDecoder()

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next(self) -> tuple[str, Any]:
        """('value', obj) | ('more', None) | ('bad', None)."""
        stripped = self.buf.lstrip(b" \t\r\n")
        if not stripped:
            self.buf = b""
            return "more", None
        try:
            text = stripped.decode("utf-8")
        except UnicodeDecodeError as err:
            if err.start >= len(stripped) - 3:
                try:
                    text = stripped[:err.start].decode("utf-8")
                except UnicodeDecodeError:
                    return "bad", None
            else:
                return "bad", None
        try:
            obj, end = self.decoder.raw_decode(text)
        except json.JSONDecodeError as err:
            return ("more", None) if err.pos >= len(text) else ("bad", None)
        if end == len(text) and text[-1:].isdigit():
            return "more", None   # a number may continue in the next packet
        self.buf = text[end:].encode("utf-8") + stripped[len(text.encode("utf-8")):]
        return "value", obj


class SimServer:
    """The simulator, usable in-process: ``start()`` serves on background threads."""

    def __init__(self, socket_path: str | os.PathLike[str] | None,
                 data_dir: str | os.PathLike[str] | None = None,
                 tcp: str | None = None, dataplane: DataPlane | None = None) -> None:
        self.socket_path = str(socket_path) if socket_path else None
        self._own_data_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="spdk-sim-"))
        self.tcp = tcp
        self.state = SimState(self.data_dir, dataplane)
        self.tcp_address: tuple[str, int] | None = None
        self._listeners: list[socket.socket] = []
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    # --- lifecycle ---------------------------------------------------
    def start(self) -> SimServer:
        self.state.dataplane.start()
        if self.socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
            Path(self.socket_path).parent.mkdir(parents=True, exist_ok=True)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(self.socket_path)
            s.listen(128)
            self._listeners.append(s)
        if self.tcp:
            host, _, port = self.tcp.rpartition(":")
            host = host.strip("[]") or "127.0.0.1"
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, int(port)))
            s.listen(128)
            self.tcp_address = s.getsockname()[:2]
            self._listeners.append(s)
        for s in self._listeners:
            t = threading.Thread(target=self._accept_loop, args=(s,), daemon=True,
                                 name="spdk-sim-accept")
            t.start()
            self._threads.append(t)
        log.info("SPDK simulator listening on %s%s (data in %s)", self.socket_path,
                 f" and {self.tcp_address}" if self.tcp_address else "", self.data_dir)
        return self

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        for s in self._listeners:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout=5)
        if self.socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        with self.state.lock:
            for sub in list(self.state.nvmf.subsystems):
                with contextlib.suppress(Exception):
                    self.state.nvmf.delete_subsystem({"nqn": sub.nqn})
        self.state.dataplane.stop()
        if self._own_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- simulator-only I/O ------------------------------------------
    def write(self, bdev: str, offset: int, data: bytes, io_size: int = 0) -> None:
        """Write ``data`` into lvol ``bdev`` (uuid or lvs/lvol) like a host would."""
        with self.state.lock:
            lvolmod.find_lvol(self.state, bdev).write(offset, data, io_size)
            self.state.persist.sync()

    def read(self, bdev: str, offset: int, length: int, io_size: int = 0) -> bytes:
        with self.state.lock:
            return lvolmod.find_lvol(self.state, bdev).read(offset, length, io_size)

    def call(self, method: str, params: Any = None) -> Any:
        """Run a method in-process (raises ``RpcError``)."""
        return methods.call(self.state, method, params)

    # --- connections -------------------------------------------------
    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                if self._stopping.is_set():
                    conn.close()
                    return
                self._conns.add(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                 name="spdk-sim-conn")
            t.start()
            with self._lock:
                self._threads = [x for x in self._threads if x.is_alive()]
                self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        parser = _Parser()
        try:
            while not self._stopping.is_set():
                data = conn.recv(65536)
                if not data:
                    return
                parser.feed(data)
                while True:
                    kind, obj = parser.next()
                    if kind == "more":
                        break
                    if kind == "bad":
                        return     # SPDK closes the connection without a reply
                    conn.sendall(handle_request(self.state, obj))
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()


def _make_dataplane(args: argparse.Namespace) -> DataPlane | None:
    if not getattr(args, "nvmet", False):
        return None
    try:
        from . import nvmet  # type: ignore[attr-defined]
    except ImportError:
        raise SystemExit("csi-spdk sim: --nvmet is not available "
                         "(csi_spdk/sim/nvmet.py implementing DataPlane is missing)") from None
    factory = getattr(nvmet, "make_dataplane", None) or nvmet.NvmetDataPlane
    return factory()


def _dhchap_lists(state: SimState, args: argparse.Namespace) -> None:
    """--dhchap-digests/--dhchap-dhgroups: spdk_tgt's start-up nvmf_set_config
    lists; a kernel data plane offers the strongest of each, as SPDK picks
    the strongest a (Linux) host offers."""
    from .nvmf import DHCHAP_DHGROUPS, DHCHAP_DIGESTS
    for flag, attr, known in (("digests", "dhchap_digests", DHCHAP_DIGESTS),
                              ("dhgroups", "dhchap_dhgroups", DHCHAP_DHGROUPS)):
        raw = getattr(args, f"dhchap_{flag}", "") or ""
        if not raw:
            continue
        wanted = [v.strip() for v in raw.split(",") if v.strip()]
        bad = [v for v in wanted if v not in known]
        if bad or not wanted:
            raise SystemExit(f"csi-spdk sim: --dhchap-{flag}: {', '.join(bad) or 'empty'} "
                             f"(one or more of {', '.join(known)})")
        setattr(state.nvmf, attr, [v for v in known if v in wanted])
    negotiate = getattr(state.dataplane, "dhchap_negotiation", None)
    if negotiate is not None and (args.dhchap_digests or args.dhchap_dhgroups):
        negotiate(state.nvmf.dhchap_digests[-1], state.nvmf.dhchap_dhgroups[-1])


def main(args: argparse.Namespace) -> int:
    """``csi-spdk sim``: serve until SIGTERM/SIGINT, then clean up and exit 0."""
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    dataplane = _make_dataplane(args)
    server = SimServer(args.rpc_socket, args.data_dir or None, tcp=args.tcp or None,
                       dataplane=dataplane)
    server.state.nvmf.max_subsystems = args.max_subsystems
    _dhchap_lists(server.state, args)
    done = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        done.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    server.start()
    try:
        while not done.wait(1.0):
            pass
    finally:
        # bounded, as the driver's processes are (a stuck data plane teardown,
        # e.g. configfs, shows its stack instead of hanging the caller)
        with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
            faulthandler.dump_traceback_later(60.0, exit=True)
        server.stop()
    return 0
