"""Controller benchmark: create + publish + unpublish + delete N volumes through the
controller's gRPC (controller in a subprocess: ``python -m csi_spdk controller``),
and the same SPDK JSON-RPC sequence the driver issues, sent bare, in the same run.

    python3 benchmarks/controller.py --volumes 100 1000

Uses the simulator (a ``csi-spdk sim`` subprocess) unless CSI_SPDK_TEST_RPC names
a real spdk_tgt socket (then a uniquely named malloc lvstore is used and removed).
Reports p50/p99 per operation, volumes/s, driver/bare ratio, CreateVolume latency
of the first vs last 10% of volumes, and the controller's RSS with N volumes.
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


def run_driver(n: int, endpoint: str, tag: str) -> tuple[dict[str, list[float]], float]:
    times: dict[str, list[float]] = {op: [] for op in OPS}
    with grpc.insecure_channel(endpoint) as ch:
        ctl = csi_pb2_grpc.ControllerStub(ch)
        ids = []
        start = time.monotonic()
        for i in range(n):
            t = time.perf_counter()
            v = ctl.CreateVolume(csi_pb2.CreateVolumeRequest(
                name=f"bench-{tag}-{i}", volume_capabilities=[cap()],
                capacity_range=csi_pb2.CapacityRange(required_bytes=MiB))).volume
            times["CreateVolume"].append(time.perf_counter() - t)
            ids.append(v.volume_id)
        for i, vid in enumerate(ids):
            t = time.perf_counter()
            ctl.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
                volume_id=vid, node_id=f"node-{i % 8}", volume_capability=cap()))
            times["ControllerPublishVolume"].append(time.perf_counter() - t)
        elapsed = time.monotonic() - start
        if run_driver.on_full:  # type: ignore[attr-defined]
            run_driver.on_full()  # type: ignore[attr-defined]
        start2 = time.monotonic()
        for i, vid in enumerate(ids):
            t = time.perf_counter()
            ctl.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
                volume_id=vid, node_id=f"node-{i % 8}"))
            times["ControllerUnpublishVolume"].append(time.perf_counter() - t)
        for vid in ids:
            t = time.perf_counter()
            ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
            times["DeleteVolume"].append(time.perf_counter() - t)
        elapsed += time.monotonic() - start2
    return times, elapsed


run_driver.on_full = None  # type: ignore[attr-defined]


def run_bare(n: int, api: SpdkApi, lvs: str, tag: str, listen: dict) -> tuple[dict, float]:
    """The driver's SPDK call sequence per operation, without gRPC/Python layers."""
    times: dict[str, list[float]] = {op: [] for op in OPS}

    def get_or_none(method, params):
        with contextlib.suppress(SpdkNotFound):
            return api.call(method, params)
        return None

    uuids = []
    start = time.monotonic()
    for i in range(n):
        name = contract.volume_lvol_name(f"bare-{tag}-{i}")
        t = time.perf_counter()
        api.call("bdev_lvol_get_lvstores")
        get_or_none("bdev_get_bdevs", {"name": f"{lvs}/{name}"})
        uuids.append(api.lvol_create(lvs, name, MiB, False))
        times["CreateVolume"].append(time.perf_counter() - t)
    for i, u in enumerate(uuids):
        nqn, host = contract.subsystem_nqn(u), contract.host_nqn(f"node-{i % 8}")
        t = time.perf_counter()
        get_or_none("bdev_get_bdevs", {"name": u})
        get_or_none("nvmf_get_subsystems", {"nqn": nqn})
        api.subsystem_create(nqn, contract.serial_number(u), contract.MODEL_NUMBER, 1)
        api.ns_add(nqn, u, uuid=u)
        api.listener_add(nqn, listen)
        api.host_add(nqn, host)
        times["ControllerPublishVolume"].append(time.perf_counter() - t)
    for i, u in enumerate(uuids):
        nqn, host = contract.subsystem_nqn(u), contract.host_nqn(f"node-{i % 8}")
        t = time.perf_counter()
        get_or_none("nvmf_get_subsystems", {"nqn": nqn})
        api.host_remove(nqn, host)
        api.subsystem_delete(nqn)
        times["ControllerUnpublishVolume"].append(time.perf_counter() - t)
    for u in uuids:
        nqn = contract.subsystem_nqn(u)
        t = time.perf_counter()
        get_or_none("bdev_get_bdevs", {"name": u})
        get_or_none("nvmf_get_subsystems", {"nqn": nqn})
        api.lvol_delete(u)
        times["DeleteVolume"].append(time.perf_counter() - t)
    return times, time.monotonic() - start


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
                                    "--data-dir", str(tmp / "data"), "--log-level", "warning"],
                                   env=env, cwd=ROOT)
            procs.append(sim)
            wait_for(rpc, sim, "simulator")
        api = SpdkApi(SpdkClient(rpc, timeout=60))
        malloc, lvs = f"bench{tag}m", f"bench{tag}l"
        api.malloc_create(malloc, (2 * n + 64) * MiB)
        api.lvstore_create(malloc, lvs, cluster_sz=MiB)
        cfg = tmp / "controller.json"
        cfg.write_text(json.dumps({"targets": [{
            "name": "bench", "rpc": rpc if rpc.startswith("unix") else f"unix://{rpc}",
            "nvmf": {"listenAddress": "127.0.0.1", "port": 4420}, "lvstores": [lvs]}]}))
        sock = tmp / f"csi-{n}.sock"
        ctl = subprocess.Popen([sys.executable, "-m", "csi_spdk", "controller", "--endpoint",
                                f"unix://{sock}", "--config", str(cfg), "--log-level", "warning"],
                               env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
        procs.append(ctl)
        wait_for(str(sock), ctl, "controller")
        rss: list[float] = []
        run_driver.on_full = lambda: rss.append(rss_mib(ctl.pid))  # type: ignore[attr-defined]
        drv, drv_s = run_driver(n, f"unix://{sock}", tag)
        bare, bare_s = run_bare(n, api, lvs, tag,
                                SpdkApi.listen_address("127.0.0.1", 4420))
        print(f"\n== N={n} volumes ({'real spdk_tgt' if real_rpc else 'simulator'}) ==")
        print(f"{'operation':<28}{'driver p50':>11}{'p99':>9}{'bare p50':>10}{'p99':>9}"
              f"{'ratio p50':>11}")
        for op in OPS:
            d50, d99, b50, b99 = (pct(drv[op], .5), pct(drv[op], .99), pct(bare[op], .5),
                                  pct(bare[op], .99))
            print(f"{op:<28}{d50:>9.2f}ms{d99:>7.2f}ms{b50:>8.2f}ms{b99:>7.2f}ms"
                  f"{d50 / b50 if b50 else 0:>10.2f}x")
        print(f"{'lifecycle volumes/s':<28}{n / drv_s:>11.1f}{'':>9}{n / bare_s:>10.1f}"
              f"{'':>9}{(n / bare_s) / (n / drv_s):>10.2f}x")
        k = max(1, n // 10)
        first, last = drv["CreateVolume"][:k], drv["CreateVolume"][-k:]
        print(f"CreateVolume p50 first 10%: {statistics.median(first) * 1000:.2f} ms, "
              f"last 10%: {statistics.median(last) * 1000:.2f} ms")
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
