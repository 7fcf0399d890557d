"""A volume's whole life through the CSI gRPC API in the QEMU guest, with the
real NVMe/TCP initiator: create -> publish -> stage (nvme connect, mkfs) ->
publish (bind mount) -> write -> unpublish -> unstage (disconnect) -> stage
again (data still there) -> snapshot -> clone from the snapshot, staged on its
own, shows the data -> expand -> tear down -> delete, checking the kernel
objects on both sides at each step and that no lvol, subsystem, NVMe
controller or mount is left at the end."""

from __future__ import annotations

import pytest
from guest.harness import GuestOptions

pytestmark = pytest.mark.guest

DRIVER = r'''
import os, subprocess, sys
from pathlib import Path

import grpc
from csi_spdk.spdk.api import SpdkApi
from csi_spdk.spdk.client import SpdkClient
from csi_spdk.proto import csi_pb2 as csi
from csi_spdk.proto import csi_pb2_grpc as csi_grpc

MiB = 1 << 20
RUN = os.environ.get("CSI_RUN", "/run/csi")
# node-stage secrets: csi_stack_start's generated keys (auth: dhchap default)
SECRETS = __import__("json").loads(Path(RUN, "auth-keys.json").read_text())
NVMET = Path("/sys/kernel/config/nvmet")
SIM = not os.environ.get("GUEST_SPDK_RPC")
ctrl = csi_grpc.ControllerStub(grpc.insecure_channel(f"unix://{RUN}/controller.sock"))
node = csi_grpc.NodeStub(grpc.insecure_channel(f"unix://{RUN}/node.sock"))
AM = csi.VolumeCapability.AccessMode


def step(msg):
    print(f"== {msg}", flush=True)


def connected():
    return sorted((c / "subsysnqn").read_text().strip()
                  for c in Path("/sys/class/nvme").glob("nvme*") if (c / "subsysnqn").exists())


def mounts(path):
    return [line for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1] == path]


def allowed_hosts(nqn):
    d = NVMET / "subsystems" / nqn / "allowed_hosts"
    return sorted(p.name for p in d.iterdir()) if d.exists() else None


def fs_size(path):
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


# mkfs.xfs (xfsprogs 6.1) refuses file systems under 300 MB.
SIZES = {"ext4": (64 * MiB, 128 * MiB), "xfs": (320 * MiB, 384 * MiB)}

for fs in sys.argv[1:]:
    size, new_size = SIZES[fs]
    cap = csi.VolumeCapability(mount=csi.VolumeCapability.MountVolume(fs_type=fs),
                               access_mode=AM(mode=AM.SINGLE_NODE_WRITER))
    node_id = node.NodeGetInfo(csi.NodeGetInfoRequest()).node_id
    step(f"[{fs}] CreateVolume on node {node_id}")
    vol = ctrl.CreateVolume(csi.CreateVolumeRequest(
        name=f"pvc-guest-{fs}", capacity_range=csi.CapacityRange(required_bytes=size),
        volume_capabilities=[cap])).volume
    vid, vctx = vol.volume_id, dict(vol.volume_context)
    print(vid, vctx, flush=True)

    step("ControllerPublishVolume")
    pctx = dict(ctrl.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
        volume_id=vid, node_id=node_id, volume_capability=cap,
        volume_context=vctx)).publish_context)
    print(pctx, flush=True)
    nqn = pctx["nqn"]
    if SIM:
        assert len(allowed_hosts(nqn)) == 1, allowed_hosts(nqn)

    staging = f"/var/lib/kubelet/plugins/csi/{fs}/globalmount"
    target = f"/var/lib/kubelet/pods/p1/volumes/{fs}/mount"
    os.makedirs(staging, exist_ok=True)
    os.makedirs(os.path.dirname(target), exist_ok=True)

    def stage():
        node.NodeStageVolume(csi.NodeStageVolumeRequest(secrets=SECRETS,
            volume_id=vid, publish_context=pctx, staging_target_path=staging,
            volume_capability=cap, volume_context=vctx))
        assert nqn in connected(), connected()
        assert mounts(staging), f"{staging} not mounted"
        node.NodePublishVolume(csi.NodePublishVolumeRequest(
            volume_id=vid, publish_context=pctx, staging_target_path=staging,
            target_path=target, volume_capability=cap, volume_context=vctx))
        assert mounts(target), f"{target} not mounted"

    def unstage():
        node.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(
            volume_id=vid, target_path=target))
        assert not mounts(target)
        node.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(
            volume_id=vid, staging_target_path=staging))
        assert not mounts(staging)
        assert nqn not in connected(), connected()

    step("NodeStageVolume + NodePublishVolume")
    stage()
    dev, fstype = mounts(staging)[0].split()[0], mounts(staging)[0].split()[2]
    print("staged on", dev, fstype, flush=True)
    assert dev.startswith("/dev/nvme") and fstype == fs, mounts(staging)
    data = os.urandom(3 * MiB)
    Path(target, "data").write_bytes(data)
    os.sync()
    stats = node.NodeGetVolumeStats(csi.NodeGetVolumeStatsRequest(
        volume_id=vid, volume_path=target))
    print("stats", [(u.unit, u.total, u.used) for u in stats.usage], flush=True)

    step("unpublish + unstage, stage again: the data survives")
    unstage()
    stage()
    assert Path(target, "data").read_bytes() == data, "data lost across unstage/stage"

    step("CreateSnapshot, clone from it, read the data through the clone")
    snap = ctrl.CreateSnapshot(csi.CreateSnapshotRequest(
        name=f"snap-guest-{fs}", source_volume_id=vid)).snapshot
    assert snap.ready_to_use and snap.size_bytes == size, snap
    clone = ctrl.CreateVolume(csi.CreateVolumeRequest(
        name=f"pvc-guest-clone-{fs}", capacity_range=csi.CapacityRange(required_bytes=size),
        volume_capabilities=[cap], volume_content_source=csi.VolumeContentSource(
            snapshot=csi.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)))
    ).volume
    assert clone.content_source.snapshot.snapshot_id == snap.snapshot_id
    # xfs refuses a second mount of the same fs UUID without nouuid
    ccap = csi.VolumeCapability(mount=csi.VolumeCapability.MountVolume(
        fs_type=fs, mount_flags=["nouuid"] if fs == "xfs" else []),
        access_mode=AM(mode=AM.SINGLE_NODE_WRITER))
    cctx = dict(ctrl.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
        volume_id=clone.volume_id, node_id=node_id, volume_capability=ccap,
        volume_context=dict(clone.volume_context))).publish_context)
    cstaging = f"/var/lib/kubelet/plugins/csi/{fs}-clone/globalmount"
    ctarget = f"/var/lib/kubelet/pods/p2/volumes/{fs}-clone/mount"
    os.makedirs(cstaging, exist_ok=True)
    os.makedirs(os.path.dirname(ctarget), exist_ok=True)
    node.NodeStageVolume(csi.NodeStageVolumeRequest(secrets=SECRETS,
        volume_id=clone.volume_id, publish_context=cctx, staging_target_path=cstaging,
        volume_capability=ccap, volume_context=dict(clone.volume_context)))
    node.NodePublishVolume(csi.NodePublishVolumeRequest(
        volume_id=clone.volume_id, publish_context=cctx, staging_target_path=cstaging,
        target_path=ctarget, volume_capability=ccap))
    assert sorted(connected()) == sorted([nqn, cctx["nqn"]]), connected()
    assert Path(ctarget, "data").read_bytes() == data, "clone does not show the snapshot's data"
    node.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(
        volume_id=clone.volume_id, target_path=ctarget))
    node.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(
        volume_id=clone.volume_id, staging_target_path=cstaging))
    assert cctx["nqn"] not in connected() and nqn in connected(), connected()
    ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
        volume_id=clone.volume_id, node_id=node_id))
    ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=clone.volume_id))
    ctrl.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))

    step("ControllerExpandVolume + NodeExpandVolume")
    before = fs_size(target)
    exp = ctrl.ControllerExpandVolume(csi.ControllerExpandVolumeRequest(
        volume_id=vid, capacity_range=csi.CapacityRange(required_bytes=new_size),
        volume_capability=cap))
    if exp.node_expansion_required:
        node.NodeExpandVolume(csi.NodeExpandVolumeRequest(
            volume_id=vid, volume_path=target, staging_target_path=staging,
            capacity_range=csi.CapacityRange(required_bytes=new_size),
            volume_capability=cap))
    after = fs_size(target)
    print("fs size", before, "->", after, flush=True)
    assert after > before + 32 * MiB, (before, after)
    assert Path(target, "data").read_bytes() == data

    step("teardown")
    unstage()
    ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
        volume_id=vid, node_id=node_id))
    if SIM:
        assert not allowed_hosts(nqn), allowed_hosts(nqn)
    ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vid))
    if SIM:
        left = [p.name for p in (NVMET / "subsystems").iterdir()]
        assert left == [], left
step("nothing is left: lvols, subsystems, NVMe controllers, mounts")
spdk = SpdkApi(SpdkClient(os.environ.get("GUEST_SPDK_RPC") or f"{RUN}/spdk.sock"))
lvols = [lv["name"] for lv in spdk.lvols()]
assert not [n for n in lvols if n.startswith("csi")], lvols
subsystems = [s["nqn"] for s in spdk.subsystems() if s.get("subtype") == "NVMe"]
assert not [n for n in subsystems if n.startswith("nqn.2024-11.io.csi-spdk")], subsystems
assert connected() == [], connected()
kubelet_mounts = [line for line in Path("/proc/mounts").read_text().splitlines()
                  if "/var/lib/kubelet" in line]
assert kubelet_mounts == [], kubelet_mounts
print("LIFECYCLE-OK", flush=True)
'''


def test_guest_volume_lifecycle(guest, host_rpc):
    res = guest.run("""
        . /etc/guest/lib.sh
        csi_stack_start guest-node
        rc=0
        python3 /root/lifecycle.py ext4 xfs || rc=$?
        csi_stack_stop || rc=1
        [ "$rc" = 0 ] || csi_stack_logs 80
        exit $rc
        """, timeout=300, files={"/root/lifecycle.py": DRIVER},
        options=GuestOptions(host_rpc=host_rpc), check=True)
    assert "LIFECYCLE-OK" in res.output
