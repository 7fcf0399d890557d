"""Simulator server: TCP listener, DataPlane hooks, ``csi-spdk sim`` lifecycle."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from csi_spdk.sim import DataPlane, ListenerInfo, NamespaceInfo, SimServer
from csi_spdk.spdk.client import SpdkClient


class Recorder(DataPlane):
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def subsystem_created(self, nqn: str, serial: str, model: str,
                          allow_any_host: bool) -> None:
        self.events.append(("sub+", nqn))

    def subsystem_deleted(self, nqn: str) -> None:
        self.events.append(("sub-", nqn))

    def namespace_added(self, ns: NamespaceInfo) -> None:
        self.events.append(("ns+", ns.nqn, ns.nsid, ns.path, ns.uuid, ns.nguid, ns.size))

    def namespace_removed(self, nqn: str, nsid: int) -> None:
        self.events.append(("ns-", nqn, nsid))

    def namespace_resized(self, ns: NamespaceInfo) -> None:
        self.events.append(("ns~", ns.nsid, ns.size))

    def listener_added(self, listener: ListenerInfo) -> None:
        self.events.append(("lst+", listener.traddr, listener.trsvcid))

    def listener_removed(self, listener: ListenerInfo) -> None:
        self.events.append(("lst-", listener.traddr, listener.trsvcid))

    def host_added(self, nqn: str, host_nqn: str) -> None:
        self.events.append(("host+", host_nqn))

    def host_removed(self, nqn: str, host_nqn: str) -> None:
        self.events.append(("host-", host_nqn))


def test_dataplane_hooks(short_tmp: Path) -> None:
    rec = Recorder()
    nqn = "nqn.2016-06.io.spdk:dp"
    with SimServer(str(short_tmp / "s.sock"), str(short_tmp / "d"), dataplane=rec) as sim:
        c = SpdkClient(sim.socket_path or "")
        c.call("bdev_malloc_create", {"name": "M0", "num_blocks": 16384, "block_size": 4096})
        c.call("bdev_lvol_create_lvstore", {"bdev_name": "M0", "lvs_name": "lvs0"})
        vol = c.call("bdev_lvol_create", {"lvol_name": "v", "size_in_mib": 8,
                                          "lvs_name": "lvs0", "thin_provision": True})
        c.call("nvmf_create_transport", {"trtype": "TCP"})
        c.call("nvmf_create_subsystem", {"nqn": nqn})
        c.call("nvmf_subsystem_add_ns", {"nqn": nqn, "namespace": {"bdev_name": vol}})
        c.call("nvmf_subsystem_add_listener", {"nqn": nqn, "listen_address": {
            "trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "4420"}})
        c.call("nvmf_subsystem_add_host", {"nqn": nqn, "host": "nqn.2014-08.org.nvmexpress:"
                                           "uuid:00000000-0000-0000-0000-000000000001"})
        c.call("bdev_lvol_resize", {"name": vol, "size_in_mib": 16})
        c.call("bdev_lvol_delete", {"name": vol})   # silently drops the namespace
        c.call("nvmf_delete_subsystem", {"nqn": nqn})
        c.close()
    kinds = [e[0] for e in rec.events]
    assert kinds == ["sub+", "ns+", "lst+", "host+", "ns~", "ns-", "lst-", "host-", "sub-"]
    ns_added = rec.events[1]
    assert ns_added[3] and ns_added[3].endswith(f"{vol}.img")
    assert ns_added[4] == vol and ns_added[5] == vol.replace("-", "").upper()
    assert rec.events[4] == ("ns~", 1, 16 << 20)


def test_tcp_listener_and_notification_quirk(short_tmp: Path) -> None:
    with SimServer(str(short_tmp / "s.sock"), None, tcp="127.0.0.1:0") as sim:
        assert sim.tcp_address is not None
        host, port = sim.tcp_address
        with SpdkClient(f"{host}:{port}") as c:
            assert c.call("bdev_get_bdevs") == []
        with socket.create_connection((host, port), timeout=2) as s:
            s.sendall(b'{"jsonrpc":"2.0","method":"bdev_get_bdevs"}')
            time.sleep(0.2)
            assert s.recv(100) == b'{"jsonrpc":"2.0","id":null,"result":[]'
            s.sendall(b'{"method":"spdk_get_version","id":2}')
            reply = json.loads(s.recv(1000).decode())
            assert reply["id"] == 2


def test_many_concurrent_connections(short_tmp: Path) -> None:
    with SimServer(str(short_tmp / "s.sock"), None) as sim:
        socks = [socket.socket(socket.AF_UNIX) for _ in range(50)]
        for i, s in enumerate(socks):
            s.connect(sim.socket_path or "")
            s.sendall(json.dumps({"jsonrpc": "2.0", "id": i, "method": "spdk_get_version"})
                      .encode())
        for i, s in enumerate(socks):
            s.settimeout(5)
            assert json.loads(s.recv(4096))["id"] == i
            s.close()


def test_cli_serves_until_sigterm(short_tmp: Path) -> None:
    sock = short_tmp / "cli.sock"
    proc = subprocess.Popen([sys.executable, "-m", "csi_spdk", "sim", "--rpc-socket", str(sock),
                             "--data-dir", str(short_tmp / "data")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with SpdkClient(str(sock)) as c:
            assert c.call("framework_wait_init") is True
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
