"""The SPDK JSON-RPC client: framing, typed errors, timeouts, reconnects,
concurrency. Transport faults are produced by a scripted socket peer; error
classification is checked against the error objects real SPDK returned."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from csi_spdk.spdk import errors as se
from csi_spdk.spdk.client import SpdkClient, parse_address

GOLDEN = Path(__file__).resolve().parents[3] / "shared" / "spdk-golden"


class Peer:
    """A tiny JSON-RPC peer on a Unix socket; ``handler(request) -> reply|None``.

    Returning None closes the connection without replying.
    """

    def __init__(self, path: Path, handler: Callable[[dict], dict | bytes | None]) -> None:
        self.path, self.handler = path, handler
        self.connections = 0
        self.requests: list[dict] = []
        self.open: list[socket.socket] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self.open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf, dec = "", json.JSONDecoder()
        with conn:
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk.decode()
                while buf.strip():
                    try:
                        req, end = dec.raw_decode(buf.lstrip())
                    except json.JSONDecodeError:
                        break
                    buf = buf.lstrip()[end:]
                    self.requests.append(req)
                    reply = self.handler(req)
                    if reply is None:
                        return
                    data = reply if isinstance(reply, bytes) \
                        else (json.dumps(reply) + "\n").encode()
                    try:
                        conn.sendall(data)
                    except OSError:
                        return  # the client gave up (timeout test)

    def close(self) -> None:
        """Stop like a restarting target: listener and every connection go."""
        self.sock.close()
        for conn in self.open:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def ok(req: dict, result=True) -> dict:
    return {"jsonrpc": "2.0", "id": req["id"], "result": result}


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "spdk.sock"


def test_parse_address() -> None:
    assert parse_address("/var/tmp/spdk.sock") == (socket.AF_UNIX, "/var/tmp/spdk.sock")
    assert parse_address("unix:///a.sock") == (socket.AF_UNIX, "/a.sock")
    assert parse_address("127.0.0.1:5260") == (socket.AF_INET, ("127.0.0.1", 5260))
    assert parse_address("[::1]:5260") == (socket.AF_INET6, ("::1", 5260))
    with pytest.raises(ValueError, match="neither"):
        parse_address("nonsense")


def test_sends_integer_ids_and_jsonrpc_version(sock_path: Path) -> None:
    peer = Peer(sock_path, lambda r: ok(r, r.get("params")))
    client = SpdkClient(str(sock_path))
    assert client.call("bdev_get_bdevs", {"name": "x"}) == {"name": "x"}
    assert client.call("spdk_get_version") is None
    first, second = peer.requests
    assert first == {"jsonrpc": "2.0", "method": "bdev_get_bdevs", "id": 1, "params": {"name": "x"}}
    assert second == {"jsonrpc": "2.0", "method": "spdk_get_version", "id": 2}
    assert peer.connections == 1  # the connection is reused
    peer.close()


def test_reply_split_across_packets(sock_path: Path) -> None:
    def handler(req: dict) -> bytes:
        return (json.dumps(ok(req, "x" * 200000)) + "\n").encode()

    Peer(sock_path, handler)
    assert SpdkClient(str(sock_path)).call("big") == "x" * 200000


class _SlowPeer(Peer):
    """Sends each reply in 64 KiB pieces with a pause, so the client reads many chunks."""

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            req = json.loads(conn.recv(65536).decode())
            data = self.handler(req)
            for i in range(0, len(data), 65536):
                conn.sendall(data[i:i + 65536])
                time.sleep(0.002)
            time.sleep(0.5)


def test_reply_is_decoded_once_not_per_chunk(sock_path: Path, monkeypatch) -> None:
    """SPDK ends a reply with a newline: the client decodes when a chunk ends
    with one, not on every chunk (re-parsing a 16,000-lvol reply per 64 KiB
    chunk cost 11.7 s of CPU). Also: a pretty-printed reply, with newlines
    inside, still decodes."""
    import csi_spdk.spdk.client as clientmod

    attempts = []

    class Counting(json.JSONDecoder):
        def raw_decode(self, s, idx=0):
            attempts.append(len(s))
            return super().raw_decode(s, idx)

    monkeypatch.setattr(clientmod.json, "JSONDecoder", Counting)
    bdevs = [{"name": f"lvol{i}", "aliases": [f"lvs/x{i}"], "text": "a\nb"} for i in range(8000)]
    _SlowPeer(sock_path, lambda r: (json.dumps(ok(r, bdevs)) + "\n").encode())
    assert SpdkClient(str(sock_path)).call("bdev_get_bdevs") == bdevs
    assert len(attempts) <= 2, f"{len(attempts)} decode attempts for one reply"
    pretty = sock_path.with_name("pretty.sock")
    _SlowPeer(pretty, lambda r: (json.dumps(ok(r, bdevs[:3000]), indent=2) + "\n").encode())
    attempts.clear()
    assert SpdkClient(str(pretty)).call("bdev_get_bdevs") == bdevs[:3000]


def _bdev_like(i: int) -> dict:
    """About the size and shape of one lvol in SPDK's bdev_get_bdevs."""
    return {"name": f"{i:08d}-0000-4000-8000-000000000000", "aliases": [f"lvs/csi-v{i}"],
            "product_name": "Logical Volume", "block_size": 4096, "num_blocks": 256,
            "assigned_rate_limits": {"rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0},
            "supported_io_types": {k: bool(i % 2) for k in "abcdefghijklmnopqrstu"},
            "driver_specific": {"lvol": {"lvol_store_uuid": "s" * 36, "thin_provision": True,
                                         "clones": [], "snapshot": False}}}


@pytest.mark.parametrize("indent", [None, 2])
def test_each_decodes_an_array_reply_one_element_at_a_time(sock_path: Path, indent) -> None:
    """``each``: only what it keeps of each element is returned (None drops
    one), however the reply is cut into chunks and formatted; the connection
    stays usable for the next reply."""
    bdevs = [_bdev_like(i) for i in range(3000)]
    _SlowPeer(sock_path, lambda r: (json.dumps(ok(r, bdevs), indent=indent) + "\n").encode())
    kept = SpdkClient(str(sock_path)).call(
        "bdev_get_bdevs", each=lambda b: b["name"] if b["num_blocks"] and
        int(b["name"][:8]) % 3 else None)
    assert kept == [b["name"] for i, b in enumerate(bdevs) if i % 3]
    again = sock_path.with_name("again.sock")
    peer = Peer(again, lambda r: ok(r, [{"n": r["id"]}, {"n": -1}]))
    client = SpdkClient(str(again))
    assert client.call("x", each=lambda e: e["n"] if e["n"] > 0 else None) == [1]
    assert client.call("x", each=lambda e: e) == [{"n": 2}, {"n": -1}]
    assert client.call("x") == [{"n": 3}, {"n": -1}]
    assert client.call("x", each=lambda e: e) == [{"n": 4}, {"n": -1}]
    assert peer.connections == 1
    peer.close()


def test_each_with_replies_that_are_no_array(sock_path: Path) -> None:
    """An error reply is the same typed error with ``each``; an empty array
    is empty; a result that is no array comes back as it is."""
    def handler(req: dict):
        if req["method"] == "missing":
            return {"jsonrpc": "2.0", "id": req["id"],
                    "error": {"code": -19, "message": "No such device"}}
        return ok(req, [] if req["method"] == "empty" else {"a": 1})
    Peer(sock_path, handler)
    client = SpdkClient(str(sock_path))
    with pytest.raises(se.SpdkNotFound):
        client.call("missing", each=lambda e: e)
    assert client.call("empty", each=lambda e: e) == []
    assert client.call("obj", each=lambda e: e) == {"a": 1}


def test_each_never_holds_the_whole_reply(sock_path: Path) -> None:
    """Bounded memory at 10,000 volumes (issue #12): streaming a ~10 MB
    reply of 12,000 lvol-like bdevs allocates at most a few chunks at a time,
    while the whole decode of the same reply, measured in the same test,
    needs more than the reply itself."""
    import tracemalloc

    bdevs = [_bdev_like(i) for i in range(12000)]
    data = (json.dumps(ok({"id": 1}, bdevs), indent=1) + "\n").encode()
    del bdevs
    peaks = {}
    for how in ("whole", "each"):
        path = sock_path.with_name(f"{how}.sock")
        _SlowPeer(path, lambda r: data)     # (a new client's first id is 1)
        client = SpdkClient(str(path), timeout=900)   # (tracemalloc is slow on a busy machine)
        tracemalloc.start()
        if how == "each":
            got = client.call("bdev_get_bdevs", each=lambda b: None)
        else:
            got = len(client.call("bdev_get_bdevs"))
        peaks[how] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert got == ([] if how == "each" else 12000)
    assert peaks["whole"] > len(data) > 9_000_000, peaks
    assert peaks["each"] < 1_000_000, peaks


def _golden_errors() -> list[tuple[str, dict]]:
    out = []
    for f in sorted(GOLDEN.glob("*.json")):
        for e in json.loads(f.read_text()):
            req, resp = e["request"], e["response"]
            if isinstance(req, dict) and isinstance(resp, dict) and "error" in resp \
                    and isinstance(req.get("id"), int):
                out.append((req["method"], resp["error"]))
    return out


@pytest.mark.skipif(not GOLDEN.is_dir(), reason="shared/spdk-golden not found")
def test_typed_errors_from_real_spdk_replies() -> None:
    expected = {
        ("bdev_lvol_create", -32602, "No space left on device"): se.SpdkNoSpace,
        ("bdev_lvol_resize", -32602, "No space left on device"): se.SpdkNoSpace,
        ("bdev_lvol_create", -17, "File exists"): se.SpdkExists,
        ("bdev_lvol_snapshot", -32602, "File exists"): se.SpdkExists,
        ("bdev_lvol_delete", -32603, "Operation not permitted"): se.SpdkNotPermitted,
        ("bdev_lvol_delete", -19, "No such device"): se.SpdkNotFound,
        ("nvmf_get_subsystems", -19, "No such device"): se.SpdkNotFound,
        ("bdev_aio_create", -2, "No such file or directory"): se.SpdkNotFound,
        ("bdev_set_qos_limit", -32602,
         "Failed to configure rate limit: Resource temporarily unavailable"): se.SpdkBusy,
        ("nvmf_subsystem_add_ns", -32602, "Invalid parameters"): se.SpdkInvalid,
        ("no_such_method", -32601, "Method not found"): se.SpdkMethodNotFound,
        ("bdev_get_bdevs", -110, "Connection timed out"): se.SpdkError,
    }
    seen = set()
    for method, error in _golden_errors():
        key = (method, error["code"], error["message"])
        err = se.from_response(method, error)
        assert isinstance(err, se.SpdkError)
        assert err.spdk_code == error["code"] and err.spdk_message == error["message"]
        if key in expected:
            assert type(err) is expected[key], key
            seen.add(key)
    assert seen == set(expected), f"golden files no longer contain {set(expected) - seen}"


def test_error_is_raised_typed_and_maps_to_grpc(sock_path: Path) -> None:
    Peer(sock_path, lambda r: {"jsonrpc": "2.0", "id": r["id"],
                               "error": {"code": -32602, "message": "No space left on device"}})
    with pytest.raises(se.SpdkNoSpace) as info:
        SpdkClient(str(sock_path)).call("bdev_lvol_create", {"lvol_name": "a"})
    assert info.value.errno == 28
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED  # unmapped: still right
    assert "bdev_lvol_create" in info.value.message


def test_enomem_is_no_space(sock_path: Path) -> None:
    """spdk_tgt v25.09: a thin lvol that finds no free metadata page."""
    Peer(sock_path, lambda r: {"jsonrpc": "2.0", "id": r["id"],
                               "error": {"code": -32602, "message": "Cannot allocate memory"}})
    with pytest.raises(se.SpdkNoSpace) as info:
        SpdkClient(str(sock_path)).call("bdev_lvol_create", {"lvol_name": "a"})
    assert info.value.errno == 12
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_timeout_is_unavailable_and_connection_is_dropped(sock_path: Path) -> None:
    slow = threading.Event()

    def handler(req: dict):
        if req["method"] == "slow":
            slow.wait(5)
        return ok(req)

    peer = Peer(sock_path, handler)
    client = SpdkClient(str(sock_path), timeout=5)
    start = time.monotonic()
    with pytest.raises(se.SpdkTransportError, match="timed out") as info:
        client.call("slow", timeout=0.3)
    assert time.monotonic() - start < 2
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    slow.set()
    # The late reply of the timed-out call must never be taken as the next answer.
    assert client.call("fast") is True
    assert peer.connections == 2


def test_missing_socket_is_unavailable(sock_path: Path) -> None:
    with pytest.raises(se.SpdkTransportError) as info:
        SpdkClient(str(sock_path)).call("spdk_get_version")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_reconnects_after_target_restart(sock_path: Path) -> None:
    peer = Peer(sock_path, ok)
    client = SpdkClient(str(sock_path))
    assert client.call("a") is True
    peer.close()
    sock_path.unlink()
    # Kill the pooled connection's server side: the next call must redial.
    peer2 = Peer(sock_path, ok)
    assert client.call("b") is True
    assert peer2.connections == 1


def test_every_idle_connection_is_redialled_after_a_restart(sock_path: Path) -> None:
    """Concurrent calls leave several idle connections; after a target
    restart all of them are dead: the next call still succeeds (one fresh
    connection), not just when a single connection was pooled."""
    gate = threading.Barrier(6)
    peer = Peer(sock_path, lambda r: (gate.wait(10), ok(r))[1])  # all 6 in flight at once
    client = SpdkClient(str(sock_path))
    threads = [threading.Thread(target=client.call, args=("warm",)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peer.connections == 6 and len(client._idle) == 6
    peer.close()
    sock_path.unlink()
    peer2 = Peer(sock_path, ok)
    assert client.call("after") is True
    assert peer2.connections == 1 and len(client._idle) == 1


def test_idle_connections_follow_the_load(sock_path: Path) -> None:
    """A burst opens a connection per call in flight; only ``idle`` stay open."""
    gate = threading.Barrier(10)
    peer = Peer(sock_path, lambda r: (gate.wait(10), ok(r))[1])  # all 10 in flight at once
    client = SpdkClient(str(sock_path), pool_size=32, idle=3)
    threads = [threading.Thread(target=client.call, args=("burst",)) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peer.connections == 10          # not queued behind a small pool
    assert len(client._idle) == 3


def test_server_closing_mid_call_is_unavailable(sock_path: Path) -> None:
    Peer(sock_path, lambda r: None)
    with pytest.raises(se.SpdkTransportError, match="closed"):
        SpdkClient(str(sock_path)).call("x")


def test_concurrent_callers_get_their_own_replies(sock_path: Path) -> None:
    def handler(req: dict):
        time.sleep(0.001)
        return ok(req, req["params"]["n"])

    peer = Peer(sock_path, handler)
    client = SpdkClient(str(sock_path), pool_size=4)
    results: dict[int, object] = {}

    def worker(base: int) -> None:
        for i in range(50):
            n = base * 1000 + i
            results[n] = client.call("echo", {"n": n})

    threads = [threading.Thread(target=worker, args=(b,)) for b in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 400 and all(k == v for k, v in results.items())
    assert 1 <= peer.connections <= 4  # bounded pool


def test_tcp_address(tmp_path: Path) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        req = json.loads(conn.recv(65536))
        conn.sendall((json.dumps(ok(req, "tcp")) + "\n").encode())
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    assert SpdkClient(f"127.0.0.1:{port}").call("m") == "tcp"
    srv.close()
