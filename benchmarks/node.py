"""Node benchmark: NodeStageVolume latency and the stage + publish + unpublish +
unstage round trip over N volumes, against a bare ``nvme connect`` measured in
the same run, in the QEMU guest (the host kernel has no NVMe/TCP).

    python3 benchmarks/node.py --volumes 20 --access block mount

The host side boots the guest (tests/e2e/guest/harness.py) and runs this same
file inside it with ``--in-guest``: ``csi-spdk sim --nvmet`` + controller + node
plugin (lib.sh ``csi_stack_start``), N volumes created and controller-published
per access type, then for each volume, interleaved so load noise hits both alike:

* bare: ``nvme connect`` with the arguments the node's initiator uses, then a
  1 ms sysfs poll until ``/dev/nvmeXnY`` of the namespace exists ("connect"),
  for mount volumes ``mkfs.ext4`` (the node's options; reported on its own: it
  is not driver overhead) and a bare ``mount``/``umount``, ``nvme disconnect``;
* driver: NodeStageVolume (returns with the device ready, and mounted for
  mount volumes) and NodePublishVolume over gRPC; the volume stays staged, so
  later volumes stage with more controllers connected. At the end every volume
  is unpublished and unstaged (timed).

Prints p50/p99 per figure and the staging overhead (driver stage minus bare
connect) against the target of 100 ms, and one ``@@BENCH <json>`` line.
Everything runs under TCG emulation: absolute numbers are several times those
of a real machine; the driver/bare comparison is what the run is for.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
TARGET_MS = 100.0
SIZES = {"block": 16 * MiB, "mount": 64 * MiB}
GUEST_SCRIPT = "/root/bench_node.py"


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile in ms (p99 of 20 samples is the maximum)."""
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] * 1000 if s else 0.0


# --- in the guest ------------------------------------------------------------------------
def _wait_device(ns_uuid: str, timeout: float = 30.0) -> str:
    """The bare wait: poll sysfs every 1 ms for the namespace's /dev node."""
    deadline = time.monotonic() + timeout
    while True:
        for b in os.listdir("/sys/block"):
            if not b.startswith("nvme") or "c" in b[4:]:
                continue
            try:
                with open(f"/sys/block/{b}/uuid", encoding="ascii") as f:
                    if f.read().strip() != ns_uuid:
                        continue
            except OSError:
                continue
            if os.path.exists(f"/dev/{b}"):
                return f"/dev/{b}"
        if time.monotonic() > deadline:
            raise SystemExit(f"bare: no block device for namespace {ns_uuid}")
        time.sleep(0.001)


def _run(*cmd: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if res.returncode:
        from csi_spdk.node.auth import redact  # the command line may hold a key
        raise SystemExit(redact(f"bare: {' '.join(cmd)} failed ({res.returncode}): "
                                f"{(res.stderr + res.stdout).strip()}"))


def guest_main(args: argparse.Namespace) -> int:
    import grpc

    from csi_spdk import contract
    from csi_spdk.node.auth import ConnectAuth
    from csi_spdk.node.initiator import NvmeTcpInitiator
    from csi_spdk.proto import csi_pb2 as csi
    from csi_spdk.proto import csi_pb2_grpc as csi_grpc

    run = os.environ.get("CSI_RUN", "/run/csi")
    # node-stage secrets: csi_stack_start's generated keys (auth: dhchap default)
    secrets = json.loads(Path(run, "auth-keys.json").read_text())
    ctrl = csi_grpc.ControllerStub(grpc.insecure_channel(f"unix://{run}/controller.sock"))
    node = csi_grpc.NodeStub(grpc.insecure_channel(f"unix://{run}/node.sock"))
    node_id = node.NodeGetInfo(csi.NodeGetInfoRequest()).node_id
    # the node plugin's own initiator arguments (cli defaults), not a copy of them
    nvme_args = NvmeTcpInitiator(contract.host_nqn(node_id), contract.host_id(node_id))
    AM = csi.VolumeCapability.AccessMode
    results: dict[str, dict[str, list[float]]] = {}

    for access in args.access:
        if access == "block":
            cap = csi.VolumeCapability(block=csi.VolumeCapability.BlockVolume(),
                                       access_mode=AM(mode=AM.SINGLE_NODE_WRITER))
        else:
            cap = csi.VolumeCapability(mount=csi.VolumeCapability.MountVolume(fs_type="ext4"),
                                       access_mode=AM(mode=AM.SINGLE_NODE_WRITER))
        t: dict[str, list[float]] = {k: [] for k in (
            "connect", "disconnect", "mkfs", "mount", "stage", "publish", "unpublish",
            "unstage", "grpc")}
        vols = []
        for i in range(args.volumes):
            v = ctrl.CreateVolume(csi.CreateVolumeRequest(
                name=f"bench-{access}-{i}", volume_capabilities=[cap],
                capacity_range=csi.CapacityRange(required_bytes=SIZES[access]))).volume
            pc = dict(ctrl.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
                volume_id=v.volume_id, node_id=node_id, volume_capability=cap,
                volume_context=dict(v.volume_context))).publish_context)
            vols.append((v, pc))
        print(f"[{access}] {len(vols)} volumes created and published", flush=True)
        staged = []
        for i, (v, pc) in enumerate(vols):
            # bare kernel: connect + device node, [mkfs, mount/umount], disconnect
            t0 = time.perf_counter()
            auth = ConnectAuth.from_request(pc, secrets)   # the same auth the driver uses
            _run("nvme", *nvme_args.connect_command(pc), *auth.connect_args())
            dev = _wait_device(pc[contract.PC_NS_UUID])
            t["connect"].append(time.perf_counter() - t0)
            if access == "mount":
                t0 = time.perf_counter()
                _run("mkfs.ext4", "-q", "-E", "nodiscard", dev)
                t["mkfs"].append(time.perf_counter() - t0)
                mnt = f"/mnt/bare{i}"
                os.makedirs(mnt, exist_ok=True)
                t0 = time.perf_counter()
                _run("mount", "-t", "ext4", dev, mnt)
                t["mount"].append(time.perf_counter() - t0)
                _run("umount", mnt)
            t0 = time.perf_counter()
            _run("nvme", "disconnect", "-n", pc[contract.PC_NQN])
            t["disconnect"].append(time.perf_counter() - t0)

            # the driver: stage (device ready) + publish, over gRPC; an empty
            # call first gives the gRPC + Python floor of a node call
            t0 = time.perf_counter()
            node.NodeGetCapabilities(csi.NodeGetCapabilitiesRequest())
            t["grpc"].append(time.perf_counter() - t0)
            staging = f"/var/lib/kubelet/plugins/bench/{access}{i}/globalmount"
            target = f"/var/lib/kubelet/pods/bench{i}/volumes/{access}"
            os.makedirs(staging, exist_ok=True)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            t0 = time.perf_counter()
            node.NodeStageVolume(csi.NodeStageVolumeRequest(
                secrets=secrets,
                volume_id=v.volume_id, publish_context=pc, staging_target_path=staging,
                volume_capability=cap, volume_context=dict(v.volume_context)))
            t["stage"].append(time.perf_counter() - t0)
            if access == "block":   # the device is ready when stage returns
                _wait_device(pc[contract.PC_NS_UUID], timeout=0)
            elif not os.path.ismount(staging):
                raise SystemExit(f"{staging} is not mounted after NodeStageVolume")
            t0 = time.perf_counter()
            node.NodePublishVolume(csi.NodePublishVolumeRequest(
                volume_id=v.volume_id, publish_context=pc, staging_target_path=staging,
                target_path=target, volume_capability=cap))
            t["publish"].append(time.perf_counter() - t0)
            staged.append((v, staging, target))
        for v, staging, target in staged:
            t0 = time.perf_counter()
            node.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(
                volume_id=v.volume_id, target_path=target))
            t["unpublish"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            node.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(
                volume_id=v.volume_id, staging_target_path=staging))
            t["unstage"].append(time.perf_counter() - t0)
        left = [c for c in os.listdir("/sys/class/nvme") if c.startswith("nvme")]
        if left:
            raise SystemExit(f"controllers left after unstage: {left}")
        for v, _pc in vols:
            ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
                volume_id=v.volume_id, node_id=node_id))
            ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id))
        t["roundtrip"] = [sum(x) for x in zip(t["stage"], t["publish"], t["unpublish"],
                                               t["unstage"], strict=True)]
        t["bare_roundtrip"] = [a + b for a, b in zip(t["connect"], t["disconnect"],
                                                     strict=True)]
        if access == "mount":
            t["connect_mount"] = [a + b for a, b in zip(t["connect"], t["mount"], strict=True)]
        results[access] = t
        report(access, args.volumes, t)
    print("@@BENCH " + json.dumps({"volumes": args.volumes, "target_ms": TARGET_MS,
                                   "results": results}), flush=True)
    return 0


def report(access: str, n: int, t: dict[str, list[float]]) -> None:
    print(f"\n== node, {access}, N={n} volumes (sim --nvmet in the QEMU guest, TCG) ==")
    print(f"{'driver vs bare':<34}{'driver p50':>11}{'p99':>9}{'bare p50':>10}{'p99':>9}"
          f"{'overhead p50':>14}{'p99':>9}")
    rows = [("NodeStageVolume | connect+dev", "stage", "connect"),
            ("round trip | connect+disconnect", "roundtrip", "bare_roundtrip")]
    if access == "mount":
        rows.insert(1, ("NodeStageVolume | connect+mount", "stage", "connect_mount"))
    for label, d, b in rows:
        d50, d99, b50, b99 = pct(t[d], .5), pct(t[d], .99), pct(t[b], .5), pct(t[b], .99)
        print(f"{label:<34}{d50:>9.1f}ms{d99:>7.1f}ms{b50:>8.1f}ms{b99:>7.1f}ms"
              f"{d50 - b50:>12.1f}ms{d99 - b99:>7.1f}ms")
    for op in ("publish", "unpublish", "unstage", "grpc", "disconnect", "mkfs", "mount"):
        if t.get(op):
            who = "bare" if op in ("disconnect", "mkfs", "mount") else "driver"
            who = "NodeGetCapabilities (gRPC floor)" if op == "grpc" else who + " " + op
            print(f"  {who:<32}p50 {pct(t[op], .5):8.1f} ms   p99 "
                  f"{pct(t[op], .99):8.1f} ms")
    base = "connect_mount" if access == "mount" else "connect"
    over50 = pct(t["stage"], .5) - pct(t[base], .5)
    over99 = pct(t["stage"], .99) - pct(t[base], .99)
    verdict = "MET" if over50 < TARGET_MS else "MISSED"
    print(f"staging overhead on top of the kernel's own work ({base.replace('_', '+')}): "
          f"p50 {over50:.1f} ms, p99 {over99:.1f} ms (target < {TARGET_MS:.0f} ms at p50: "
          f"{verdict})", flush=True)


# --- on the host -------------------------------------------------------------------------
def guest_script(volumes: int, access: list[str]) -> str:
    """The guest's shell script (lib.sh stack + this file with --in-guest)."""
    return f"""
        . /etc/guest/lib.sh
        csi_stack_start bench-node
        rc=0
        python3 {GUEST_SCRIPT} --in-guest --volumes {volumes} --access {' '.join(access)} \\
            || rc=$?
        csi_stack_stop || rc=1
        [ "$rc" = 0 ] || csi_stack_logs 60
        exit $rc
        """


def guest_files() -> dict[str, Path]:
    return {GUEST_SCRIPT: Path(__file__).resolve()}


def parse(output: str) -> dict:
    """The ``@@BENCH`` JSON a run printed."""
    for line in output.splitlines():
        if line.startswith("@@BENCH "):
            return json.loads(line[len("@@BENCH "):])
    raise ValueError("no @@BENCH line in the output")


def host_main(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    from guest.harness import GuestOptions, run_in_guest

    load = os.getloadavg()[0]
    res = run_in_guest(guest_script(args.volumes, args.access), args.timeout,
                       files=guest_files(),
                       options=GuestOptions(host_rpc=os.environ.get("CSI_SPDK_TEST_RPC")
                                            or None))
    print(res.output, end="" if res.output.endswith("\n") else "\n")
    print(f"[guest exit {res.exit_code}, timings {res.timings}, host load average "
          f"{load:.2f} before, {os.getloadavg()[0]:.2f} after]", flush=True)
    if res.exit_code != 0:
        print(res.describe(), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=20)
    ap.add_argument("--access", nargs="+", choices=("block", "mount"),
                    default=["block", "mount"])
    ap.add_argument("--timeout", type=int, default=900, help="guest script timeout (s)")
    ap.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    return guest_main(args) if args.in_guest else host_main(args)


if __name__ == "__main__":
    sys.exit(main())
