"""QoS benchmark: does a volume's maxMBps / maxIOPS hold under a real load?

    CSI_SPDK_TEST_RPC=/path/spdk.sock python3 benchmarks/qos.py [--seconds 8]
    CSI_SPDK_TEST_RPC=/path/spdk.sock python3 benchmarks/qos.py \
        --perf /path/to/spdk_nvme_perf [--port 4420]

Two load generators. With ``--perf``, SPDK's own ``spdk_nvme_perf`` on the
host (its user-space NVMe/TCP initiator, no emulation) against volumes the
driver's Controller service (in-process, on the real target) created,
published and modified; the figures are perf's "Total" IOPS and MiB/s. Without
it, the guest path below.

Needs a real spdk_tgt (the simulator's data plane, the guest kernel's nvmet,
enforces no SPDK QoS: without CSI_SPDK_TEST_RPC the run only checks the
plumbing and says so). The host boots the QEMU guest (tests/e2e/guest) with
the host's target forwarded in, and runs this file inside it with
``--in-guest``: the lib.sh stack (controller + node plugin on the real
target), three volumes created over gRPC (no limit, ``maxMBps``,
``maxIOPS``), published, connected with the kernel's NVMe/TCP initiator, and
a load generator of this file (threads doing O_DIRECT ``pwrite``/``pread`` on
the block device, QD = threads) run on each for ``--seconds``:

* baseline: the unlimited volume, 128 KiB writes and 4 KiB reads;
* bandwidth: 128 KiB writes on the ``maxMBps`` volume, then the limit changed
  online (ControllerModifyVolume) and measured again;
* IOPS: 4 KiB reads on the ``maxIOPS`` volume, then changed online likewise.

With ``--perf`` every limited run is preceded by the same run on the
unlimited volume, its baseline (the machine's load changes within minutes).

Prints each figure against its limit (ratio, and whether it is within 10%)
and against the baseline of the same run, and one ``@@BENCH <json>`` line.
A limit the unlimited baseline cannot reach is reported as not measurable.
TCG emulation makes the guest slow: choose limits well under the baseline.
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
GUEST_SCRIPT = "/root/bench_qos.py"
VOLUME_BYTES = 64 * MiB
TOLERANCE = 0.10


# --- in the guest ------------------------------------------------------------------------
def load(dev: str, write: bool, block: int, threads: int, seconds: float) -> dict:
    from io_load import load as run_load  # next to this file (in the guest: GUEST_FILES)
    return run_load(dev, write, block, threads, seconds, span_bytes=VOLUME_BYTES)


def _device(ns_uuid: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for b in os.listdir("/sys/block"):
            if b.startswith("nvme"):
                try:
                    with open(f"/sys/block/{b}/uuid", encoding="ascii") as f:
                        if f.read().strip() == ns_uuid and os.path.exists(f"/dev/{b}"):
                            return f"/dev/{b}"
                except OSError:
                    continue
        time.sleep(0.01)
    raise SystemExit(f"no block device for namespace {ns_uuid}")


def guest_main(args: argparse.Namespace) -> int:
    import grpc

    from csi_spdk import contract
    from csi_spdk.node.initiator import NvmeTcpInitiator
    from csi_spdk.proto import csi_pb2 as csi
    from csi_spdk.proto import csi_pb2_grpc as csi_grpc

    run = os.environ.get("CSI_RUN", "/run/csi")
    ctrl = csi_grpc.ControllerStub(grpc.insecure_channel(f"unix://{run}/controller.sock"))
    node = csi_grpc.NodeStub(grpc.insecure_channel(f"unix://{run}/node.sock"))
    node_id = node.NodeGetInfo(csi.NodeGetInfoRequest()).node_id
    nvme = NvmeTcpInitiator(contract.host_nqn(node_id), contract.host_id(node_id))
    AM = csi.VolumeCapability.AccessMode
    cap = csi.VolumeCapability(block=csi.VolumeCapability.BlockVolume(),
                               access_mode=AM(mode=AM.SINGLE_NODE_WRITER))
    real = bool(os.environ.get("GUEST_SPDK_RPC"))
    plan = {"base": {}, "bw": {"maxMBps": str(args.mbps[0])},
            "iops": {"maxIOPS": str(args.iops[0])}}
    vols, devs = {}, {}
    for name, params in plan.items():
        v = ctrl.CreateVolume(csi.CreateVolumeRequest(
            name=f"qos-bench-{name}", volume_capabilities=[cap], parameters=params,
            capacity_range=csi.CapacityRange(required_bytes=VOLUME_BYTES))).volume
        pc = dict(ctrl.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
            volume_id=v.volume_id, node_id=node_id, volume_capability=cap)).publish_context)
        subprocess.run(["nvme", *nvme.connect_command(pc)], check=True, capture_output=True)
        vols[name], devs[name] = (v, pc), _device(pc[contract.PC_NS_UUID])
    out: dict = {"real_spdk": real, "seconds": args.seconds, "runs": []}
    try:
        base_bw = load(devs["base"], True, 128 * 1024, args.threads, args.seconds)
        base_io = load(devs["base"], False, 4096, args.threads, args.seconds)
        out["baseline"] = {"write_128k": base_bw, "read_4k": base_io}
        for kind, key, values, block, write, base in (
                ("bw", "maxMBps", args.mbps, 128 * 1024, True, base_bw),
                ("iops", "maxIOPS", args.iops, 4096, False, base_io)):
            vid = vols[kind][0].volume_id
            for i, limit in enumerate(values):
                if i:       # the online change under test
                    ctrl.ControllerModifyVolume(csi.ControllerModifyVolumeRequest(
                        volume_id=vid, mutable_parameters={key: str(limit)}))
                ctx = dict(ctrl.ControllerGetVolume(csi.ControllerGetVolumeRequest(
                    volume_id=vid)).volume.volume_context)
                got = load(devs[kind], write, block, args.threads, args.seconds)
                figure = got["mibps"] if kind == "bw" else got["iops"]
                reach = base["mibps"] if kind == "bw" else base["iops"]
                out["runs"].append({"key": key, "limit": limit, "in_force": ctx.get(key),
                                    "measured": figure, "baseline": reach,
                                    "measurable": reach > limit * (1 + TOLERANCE), **got})
    finally:
        for _name, (v, pc) in vols.items():
            subprocess.run(["nvme", "disconnect", "-n", pc[contract.PC_NQN]],
                           capture_output=True, check=False)
            ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
                volume_id=v.volume_id, node_id=node_id))
            ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id))
    report(out)
    print("@@BENCH " + json.dumps(out), flush=True)
    return 0


def report(out: dict) -> None:
    where = "real spdk_tgt" if out["real_spdk"] else "SIMULATOR: SPDK QoS is NOT enforced here"
    how = "spdk_nvme_perf on the host" if out.get("load") == "spdk_nvme_perf" else \
        "kernel NVMe/TCP initiator in the QEMU guest (TCG)"
    print(f"\n== QoS, {out['seconds']:.0f} s per run, {how}, {where} ==")
    b = out["baseline"]
    print(f"baseline (no limit): 128 KiB writes {b['write_128k']['mibps']:.1f} MiB/s, "
          f"4 KiB reads {b['read_4k']['iops']:.0f} IOPS")
    for r in out["runs"]:
        unit = "MiB/s" if r["key"] == "maxMBps" else "IOPS"
        ratio = r["measured"] / r["limit"]
        verdict = ("within 10%" if abs(ratio - 1) <= TOLERANCE else "OFF BY MORE THAN 10%") \
            if r["measurable"] else "not measurable (baseline below the limit)"
        bound = f", drain bound +{r['drain_bound']:.1%}" if "drain_bound" in r else ""
        print(f"{r['key']}={r['limit']:<6} (in force {r['in_force']}): measured "
              f"{r['measured']:.1f} {unit} = {ratio:.3f} x limit, baseline "
              f"{r['baseline']:.1f}{bound}: {verdict}", flush=True)


# --- on the host, with spdk_nvme_perf -------------------------------------------------------
class _Ctx:
    """The grpc.ServicerContext part the @rpc decorator uses."""

    def abort(self, code, message):
        raise RuntimeError(f"{code.name}: {message}")


def perf(cmd: list[str], sub: dict, block: int, write: bool, args) -> dict:
    """One spdk_nvme_perf run against a published volume; its Total line.

    perf divides every completed I/O, including the queue it drains after
    ``-t``, by ``-t``: a figure can exceed the limit by up to
    ``qd * block / (limit * seconds)`` (reported as ``drain_bound``), which is
    why bandwidth runs use a small queue depth."""
    qd = args.bw_qd if write else args.iops_qd
    from csi_spdk import contract

    trid = (f"trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{args.port} "
            f"subnqn:{sub[contract.PC_NQN]} hostnqn:{contract.host_nqn(args.node)}")
    res = subprocess.run([*cmd, "--no-huge", "-s", "1024", "-c", "0x2", "-P",
                          str(args.qpairs), "-q", str(qd), "-o", str(block), "-w",
                          "write" if write else "randread", "-t", str(int(args.seconds)),
                          "-r", trid], capture_output=True, text=True, timeout=120)
    total = next((ln for ln in res.stdout.splitlines() if ln.startswith("Total")), None)
    if res.returncode or total is None:
        raise SystemExit(f"spdk_nvme_perf failed ({res.returncode}):\n{res.stdout[-2000:]}"
                         f"{res.stderr[-2000:]}")
    iops, mibps = (float(x) for x in total.split(":", 1)[1].split()[:2])
    return {"iops": iops, "mibps": mibps, "block": block, "write": write,
            "qd": qd, "seconds": args.seconds}


def perf_main(args: argparse.Namespace) -> int:
    import shlex
    import uuid

    from csi_spdk.controller import config as cfgmod
    from csi_spdk.controller.service import ControllerServicer
    from csi_spdk.proto import csi_pb2 as csi
    from csi_spdk.spdk.api import SpdkApi
    from csi_spdk.spdk.client import SpdkClient

    rpc = os.environ.get("CSI_SPDK_TEST_RPC")
    if not rpc:
        raise SystemExit("--perf needs CSI_SPDK_TEST_RPC (a real spdk_tgt)")
    cmd = shlex.split(args.perf)
    raw = SpdkApi(SpdkClient(rpc, timeout=30))
    tag = uuid.uuid4().hex[:8]
    malloc, lvs = f"QosBench{tag}", f"qosbench{tag}"
    raw.malloc_create(malloc, 320 * MiB)
    raw.lvstore_create(malloc, lvs)
    cfg = cfgmod.parse({"targets": [{
        "name": "bench", "rpc": rpc if ":" in rpc else f"unix://{rpc}",
        "nvmf": {"listenAddress": "127.0.0.1", "port": args.port}, "lvstores": [lvs]}]})
    svc, ctx = ControllerServicer(cfg, "csi-spdk.io"), _Ctx()
    AM = csi.VolumeCapability.AccessMode
    cap = csi.VolumeCapability(block=csi.VolumeCapability.BlockVolume(),
                               access_mode=AM(mode=AM.SINGLE_NODE_WRITER))
    # auth: none: spdk_nvme_perf connects without DH-HMAC-CHAP keys (the limits
    # under test do not depend on it), and in-process there is no Secret store
    plan = {"base": {"auth": "none"}, "bw": {"maxMBps": str(args.mbps[0]), "auth": "none"},
            "iops": {"maxIOPS": str(args.iops[0]), "auth": "none"}}
    vols = {}
    out: dict = {"real_spdk": True, "load": "spdk_nvme_perf", "seconds": args.seconds,
                 "runs": []}
    try:
        for name, params in plan.items():
            v = svc.CreateVolume(csi.CreateVolumeRequest(
                name=f"qos-bench-{tag}-{name}", volume_capabilities=[cap], parameters=params,
                capacity_range=csi.CapacityRange(required_bytes=VOLUME_BYTES)), ctx).volume
            pc = dict(svc.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
                volume_id=v.volume_id, node_id=args.node, volume_capability=cap),
                ctx).publish_context)
            vols[name] = (v, pc)
        base = {"write_128k": perf(cmd, vols["base"][1], 128 * 1024, True, args),
                "read_4k": perf(cmd, vols["base"][1], 4096, False, args)}
        out["baseline"] = base
        for kind, key, values, block, write in (
                ("bw", "maxMBps", args.mbps, 128 * 1024, True),
                ("iops", "maxIOPS", args.iops, 4096, False)):
            vid = vols[kind][0].volume_id
            for i, limit in enumerate(values):
                if i:       # the online change under test
                    svc.ControllerModifyVolume(csi.ControllerModifyVolumeRequest(
                        volume_id=vid, mutable_parameters={key: str(limit)}), ctx)
                in_force = dict(svc.ControllerGetVolume(csi.ControllerGetVolumeRequest(
                    volume_id=vid), ctx).volume.volume_context).get(key)
                # the unlimited volume right before: what the machine reaches now
                now = perf(cmd, vols["base"][1], block, write, args)
                ref = now["mibps"] if kind == "bw" else now["iops"]
                got = perf(cmd, vols[kind][1], block, write, args)
                per_s = limit * (MiB if kind == "bw" else block)      # bytes/s at the limit
                out["runs"].append({
                    "key": key, "limit": limit, "in_force": in_force,
                    "drain_bound": got["qd"] * args.qpairs * block / (per_s * args.seconds),
                    "measured": got["mibps"] if kind == "bw" else got["iops"],
                    "baseline": ref, "measurable": ref > limit * (1 + TOLERANCE), **got})
        out["baseline_after"] = {
            "write_128k": perf(cmd, vols["base"][1], 128 * 1024, True, args),
            "read_4k": perf(cmd, vols["base"][1], 4096, False, args)}
    finally:
        for v, _pc in vols.values():
            svc.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
                volume_id=v.volume_id), ctx)
            svc.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id), ctx)
        raw.call("bdev_lvol_delete_lvstore", {"lvs_name": lvs})
        raw.call("bdev_malloc_delete", {"name": malloc})
        svc.close()
    report(out)
    after = out["baseline_after"]
    print(f"baseline again at the end: 128 KiB writes {after['write_128k']['mibps']:.1f} "
          f"MiB/s, 4 KiB reads {after['read_4k']['iops']:.0f} IOPS (load noise check)")
    print("@@BENCH " + json.dumps(out), flush=True)
    return 0


# --- on the host, with the guest ------------------------------------------------------------
def guest_script(args: argparse.Namespace) -> str:
    return f"""
        . /etc/guest/lib.sh
        csi_stack_start qos-bench-node
        rc=0
        python3 {GUEST_SCRIPT} --in-guest --seconds {args.seconds} --threads {args.threads} \\
            --mbps {' '.join(map(str, args.mbps))} --iops {' '.join(map(str, args.iops))} \\
            || rc=$?
        csi_stack_stop || rc=1
        [ "$rc" = 0 ] || csi_stack_logs 60
        exit $rc
        """


def host_main(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    from guest.harness import GuestOptions, run_in_guest
    from io_load import GUEST_FILES

    rpc = os.environ.get("CSI_SPDK_TEST_RPC") or None
    if not rpc:
        print("CSI_SPDK_TEST_RPC is not set: the simulator enforces no QoS, so this run "
              "only checks the plumbing", flush=True)
    res = run_in_guest(guest_script(args), args.timeout,
                       files={GUEST_SCRIPT: Path(__file__).resolve(), **GUEST_FILES},
                       options=GuestOptions(host_rpc=rpc))
    print(res.output, end="" if res.output.endswith("\n") else "\n")
    if res.exit_code != 0:
        print(res.describe(), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each run")
    ap.add_argument("--threads", type=int, default=8, help="I/O threads (queue depth)")
    ap.add_argument("--mbps", type=int, nargs="+", default=[4, 8],
                    help="maxMBps at creation, then each online change")
    ap.add_argument("--iops", type=int, nargs="+", default=[1000, 2000],
                    help="maxIOPS at creation, then each online change")
    ap.add_argument("--timeout", type=int, default=600, help="guest script timeout (s)")
    ap.add_argument("--perf", default="", help="spdk_nvme_perf command (may carry a prefix, "
                                               "e.g. 'nsenter -t PID -n /path/spdk_nvme_perf')")
    ap.add_argument("--port", type=int, default=4420, help="--perf: the target's listener port")
    ap.add_argument("--bw-qd", type=int, default=4, help="--perf: queue depth of the "
                                                         "128 KiB write runs")
    ap.add_argument("--iops-qd", type=int, default=128, help="--perf: queue depth of the "
                                                             "4 KiB read runs")
    ap.add_argument("--qpairs", type=int, default=1,
                    help="--perf: I/O queue pairs (the target takes 128 commands per qpair)")
    ap.add_argument("--node", default="qos-bench-node", help="--perf: CSI node id (host NQN)")
    ap.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.in_guest:
        return guest_main(args)
    return perf_main(args) if args.perf else host_main(args)


if __name__ == "__main__":
    sys.exit(main())
