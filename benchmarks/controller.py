"""Controller benchmark: create + publish + unpublish + delete N volumes through the
controller's gRPC (controller in a subprocess: ``python -m csi_spdk controller``),
and the same SPDK JSON-RPC sequence the driver issues, sent bare, in the same run.

    python3 benchmarks/controller.py --volumes 100 1000

Uses the simulator (a ``csi-spdk sim`` subprocess) unless CSI_SPDK_TEST_RPC names
a real spdk_tgt socket (then a uniquely named malloc lvstore is used and removed).
A real target needs memory for a (2N + 64) MiB malloc bdev and, because driver
and bare volumes are published side by side, 2N NVMe-oF subsystems: for
N = 1000 start it with ``-s 4096 --wait-for-rpc``, then send
``nvmf_set_max_subsystems 2048`` and ``framework_start_init``.
Reports p50/p99 per operation, volumes/s, driver/bare ratio, CreateVolume latency
of the first vs last 10% of volumes, and the controller's RSS with N volumes.

The controller runs at its production log level (info, one JSON line per call,
written to a file). A third figure splits the driver's overhead: the gRPC floor
is the p50 of a no-op call (Identity.GetPluginInfo) to the same process, so
driver p50 ~= bare p50 + gRPC floor + the driver's own work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from csi_spdk import contract  # noqa: E402
from csi_spdk.proto import csi_pb2, csi_pb2_grpc  # noqa: E402
from csi_spdk.spdk.api import SpdkApi  # noqa: E402
from csi_spdk.spdk.client import SpdkClient  # noqa: E402
from csi_spdk.spdk.errors import SpdkNotFound  # noqa: E402

MiB = 1024 * 1024
OPS = ("CreateVolume", "ControllerPublishVolume", "ControllerUnpublishVolume", "DeleteVolume")


def wait_for(path: str, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > end:
            raise SystemExit(f"{what} did not start (rc={proc.poll()})")
        time.sleep(0.05)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] * 1000


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cap() -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=1))


def grpc_floor(endpoint: str, calls: int = 500) -> list[float]:
    """Latency of a call that does no work, on the same server and channel type."""
    with grpc.insecure_channel(endpoint) as ch:
        ident = csi_pb2_grpc.IdentityStub(ch)
        out = []
        for _ in range(calls):
            t = time.perf_counter()
            ident.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
            out.append(time.perf_counter() - t)
    return out


class Driver:
    """One step per operation through the controller's gRPC API."""

    def __init__(self, ctl: csi_pb2_grpc.ControllerStub, tag: str) -> None:
        self.ctl, self.tag, self.ids = ctl, tag, []

    def create(self, i: int) -> None:
        self.ids.append(self.ctl.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=f"bench-{self.tag}-{i}", volume_capabilities=[cap()],
            capacity_range=csi_pb2.CapacityRange(required_bytes=MiB))).volume.volume_id)

    def publish(self, i: int) -> None:
        self.ctl.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=self.ids[i], node_id=f"node-{i % 8}", volume_capability=cap()))

    def unpublish(self, i: int) -> None:
        self.ctl.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
            volume_id=self.ids[i], node_id=f"node-{i % 8}"))

    def delete(self, i: int) -> None:
        self.ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=self.ids[i]))


class Bare:
    """The same SPDK JSON-RPC calls the driver issues per operation, sent
    directly with the driver's SPDK client (no gRPC, no CSI logic)."""

    def __init__(self, api: SpdkApi, lvs: str, tag: str, listen: dict) -> None:
        self.api, self.lvs, self.tag, self.listen, self.uuids = api, lvs, tag, listen, []

    def _get_or_none(self, method: str, params: dict) -> dict | None:
        with contextlib.suppress(SpdkNotFound):
            return self.api.call(method, params)
        return None

    def create(self, i: int) -> None:
        name = contract.volume_lvol_name(f"bare-{self.tag}-{i}")
        self.api.call("bdev_lvol_get_lvstores")
        self._get_or_none("bdev_get_bdevs", {"name": f"{self.lvs}/{name}"})
        self.uuids.append(self.api.lvol_create(self.lvs, name, MiB, False))

    def publish(self, i: int) -> None:
        u = self.uuids[i]
        nqn, host = contract.subsystem_nqn(u), contract.host_nqn(f"node-{i % 8}")
        self._get_or_none("bdev_get_bdevs", {"name": u})
        self._get_or_none("nvmf_get_subsystems", {"nqn": nqn})
        self.api.subsystem_create(nqn, contract.serial_number(u), contract.MODEL_NUMBER, 1)
        self.api.ns_add(nqn, u, uuid=u)
        self.api.listener_add(nqn, self.listen)
        self.api.host_add(nqn, host)

    def unpublish(self, i: int) -> None:
        u = self.uuids[i]
        nqn, host = contract.subsystem_nqn(u), contract.host_nqn(f"node-{i % 8}")
        self._get_or_none("nvmf_get_subsystems", {"nqn": nqn})
        self.api.host_remove(nqn, host)
        self.api.subsystem_delete(nqn)

    def delete(self, i: int) -> None:
        u = self.uuids[i]
        self._get_or_none("bdev_get_bdevs", {"name": u})
        self._get_or_none("nvmf_get_subsystems", {"nqn": contract.subsystem_nqn(u)})
        self.api.lvol_delete(u)


def run(n: int, driver: Driver, bare: Bare, on_full=lambda: None) -> dict[str, dict]:
    """Each phase steps through the volumes; volume i's driver step and bare
    step run back to back, so both see the same machine load (the order
    alternates so neither always goes first)."""
    times = {kind: {op: [] for op in OPS} for kind in ("driver", "bare")}
    phases = zip(OPS, ("create", "publish", "unpublish", "delete"), strict=True)
    for op, step in phases:
        for i in range(n):
            order = (("driver", driver), ("bare", bare))
            for kind, impl in (order if i % 2 == 0 else order[::-1]):
                t = time.perf_counter()
                getattr(impl, step)(i)
                times[kind][op].append(time.perf_counter() - t)
        if step == "publish":
            on_full()
    return times


def bench(n: int, real_rpc: str, tmp: Path) -> None:
    procs: list[subprocess.Popen] = []
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    tag = uuidlib.uuid4().hex[:6]
    try:
        if real_rpc:
            rpc = real_rpc
        else:
            rpc = str(tmp / "spdk.sock")
            sim = subprocess.Popen([sys.executable, "-m", "csi_spdk", "sim", "--rpc-socket", rpc,
                                    "--data-dir", str(tmp / "data"), "--log-level", "warning",
                                    "--max-subsystems", str(2 * n + 1)],
                                   env=env, cwd=ROOT)
            procs.append(sim)
            wait_for(rpc, sim, "simulator")
        api = SpdkApi(SpdkClient(rpc, timeout=60))
        malloc, lvs = f"bench{tag}m", f"bench{tag}l"
        api.malloc_create(malloc, (2 * n + 64) * MiB)
        # 2 metadata pages per thick 1-cluster lvol (SPDK's default is 1 page per cluster)
        api.call("bdev_lvol_create_lvstore", {"bdev_name": malloc, "lvs_name": lvs,
                                              "cluster_sz": MiB,
                                              "num_md_pages_per_cluster_ratio": 300})
        cfg = tmp / "controller.json"
        cfg.write_text(json.dumps({"targets": [{
            "name": "bench", "rpc": rpc if rpc.startswith("unix") else f"unix://{rpc}",
            "nvmf": {"listenAddress": "127.0.0.1", "port": 4420}, "lvstores": [lvs]}]}))
        sock = tmp / f"csi-{n}.sock"
        ctl_log = open(tmp / "controller.log", "w")  # noqa: SIM115 - closed with the tmp dir
        ctl = subprocess.Popen([sys.executable, "-m", "csi_spdk", "controller", "--endpoint",
                                f"unix://{sock}", "--config", str(cfg), "--log-level", "info"],
                               env=env, cwd=ROOT, stderr=ctl_log)
        procs.append(ctl)
        wait_for(str(sock), ctl, "controller")
        rss: list[float] = []
        floor = pct(grpc_floor(f"unix://{sock}"), .5)
        with grpc.insecure_channel(f"unix://{sock}") as ch:
            times = run(n, Driver(csi_pb2_grpc.ControllerStub(ch), tag),
                        Bare(api, lvs, tag, SpdkApi.listen_address("127.0.0.1", 4420)),
                        on_full=lambda: rss.append(rss_mib(ctl.pid)))
        drv, bare = times["driver"], times["bare"]
        drv_s, bare_s = (sum(sum(v) for v in t.values()) for t in (drv, bare))
        print(f"\n== N={n} volumes ({'real spdk_tgt' if real_rpc else 'simulator'}) ==")
        print(f"{'operation':<28}{'driver p50':>11}{'p99':>9}{'bare p50':>10}{'p99':>9}"
              f"{'ratio p50':>11}{'own work p50':>14}")
        for op in OPS:
            d50, d99, b50, b99 = (pct(drv[op], .5), pct(drv[op], .99), pct(bare[op], .5),
                                  pct(bare[op], .99))
            print(f"{op:<28}{d50:>9.2f}ms{d99:>7.2f}ms{b50:>8.2f}ms{b99:>7.2f}ms"
                  f"{d50 / b50 if b50 else 0:>10.2f}x{d50 - b50 - floor:>12.2f}ms")
        print(f"gRPC floor (no-op GetPluginInfo p50): {floor:.2f} ms per call")
        print(f"{'lifecycle volumes/s':<28}{n / drv_s:>11.1f}{'':>9}{n / bare_s:>10.1f}"
              f"{'':>9}{(n / bare_s) / (n / drv_s):>10.2f}x")
        k = max(1, n // 10)
        for kind, t in (("driver", drv), ("bare", bare)):
            first, last = t["CreateVolume"][:k], t["CreateVolume"][-k:]
            print(f"CreateVolume p50 ({kind}) first 10%: {statistics.median(first) * 1000:.2f}"
                  f" ms, last 10%: {statistics.median(last) * 1000:.2f} ms")
        print(f"controller RSS with {n} volumes published: {rss[0]:.1f} MiB")
        with contextlib.suppress(Exception):
            api.call("bdev_lvol_delete_lvstore", {"lvs_name": lvs})
            api.call("bdev_malloc_delete", {"name": malloc})
        api.client.close()
    finally:
        for p in reversed(procs):
            p.terminate()
            with contextlib.suppress(Exception):
                p.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--rpc", default=os.environ.get("CSI_SPDK_TEST_RPC", ""),
                    help="a real spdk_tgt RPC socket (default: simulator)")
    args = ap.parse_args()
    for n in args.volumes:
        with tempfile.TemporaryDirectory(prefix="csi-bench-") as tmp:
            bench(n, args.rpc, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
