"""A read-only raw block publish is enforced by the kernel, with the real NVMe/TCP
initiator in the QEMU guest: the pod's device refuses writes (EPERM/EROFS)
while reads return the volume's data, a writable publish of the same volume
next to it still writes, and unpublish/unstage leave no loop device."""

from __future__ import annotations

import pytest
from guest.harness import GuestOptions

pytestmark = pytest.mark.guest

DRIVER = r'''
import errno, os
from pathlib import Path

import grpc
from csi_spdk.proto import csi_pb2 as csi
from csi_spdk.proto import csi_pb2_grpc as csi_grpc

MiB = 1 << 20
RUN = os.environ.get("CSI_RUN", "/run/csi")
# node-stage secrets: csi_stack_start's generated keys (auth: dhchap default)
SECRETS = __import__("json").loads(Path(RUN, "auth-keys.json").read_text())
ctrl = csi_grpc.ControllerStub(grpc.insecure_channel(f"unix://{RUN}/controller.sock"))
node = csi_grpc.NodeStub(grpc.insecure_channel(f"unix://{RUN}/node.sock"))
AM = csi.VolumeCapability.AccessMode
cap = csi.VolumeCapability(block=csi.VolumeCapability.BlockVolume(),
                           access_mode=AM(mode=AM.SINGLE_NODE_MULTI_WRITER))


def step(msg):
    print(f"== {msg}", flush=True)


def loops():
    """{loopN: backing file} of every bound loop device."""
    out = {}
    for b in Path("/sys/block").glob("loop*"):
        f = b / "loop" / "backing_file"
        if f.exists():
            out[b.name] = f.read_text().strip()
    return out


def nvme_loops():
    return {k: v for k, v in loops().items() if v.startswith("/dev/nvme")}


def try_write(path):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, b"X" * 4096)
        os.fsync(fd)
        return 0
    except OSError as err:
        return err.errno
    finally:
        os.close(fd)


node_id = node.NodeGetInfo(csi.NodeGetInfoRequest()).node_id
vol = ctrl.CreateVolume(csi.CreateVolumeRequest(
    name="pvc-ro-block", capacity_range=csi.CapacityRange(required_bytes=16 * MiB),
    volume_capabilities=[cap])).volume
vid = vol.volume_id
pctx = dict(ctrl.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
    volume_id=vid, node_id=node_id, volume_capability=cap)).publish_context)
staging = "/var/lib/kubelet/plugins/csi/ro/staging"
rw, ro = "/var/lib/kubelet/pods/p1/dev/rw", "/var/lib/kubelet/pods/p2/dev/ro"
os.makedirs(staging, exist_ok=True)
for t in (rw, ro):
    os.makedirs(os.path.dirname(t), exist_ok=True)
before = loops()

step("stage, publish writable, write data")
node.NodeStageVolume(csi.NodeStageVolumeRequest(secrets=SECRETS,
    volume_id=vid, publish_context=pctx, staging_target_path=staging, volume_capability=cap))


def publish(target, readonly):
    node.NodePublishVolume(csi.NodePublishVolumeRequest(
        volume_id=vid, publish_context=pctx, staging_target_path=staging, target_path=target,
        volume_capability=cap, readonly=readonly))


publish(rw, False)
data = os.urandom(MiB)
with open(rw, "r+b") as f:
    f.write(data)
    os.fsync(f.fileno())
assert nvme_loops() == {}, nvme_loops()

step("publish read-only: writes are refused by the kernel, reads work")
publish(ro, True)
publish(ro, True)                                  # idempotent: same loop
made = nvme_loops()
print("read-only loops", made, flush=True)
assert len(made) == 1, made
loop = "/dev/" + next(iter(made))
assert os.stat(ro).st_rdev == os.stat(loop).st_rdev, "target is not the read-only loop"
assert Path(f"/sys/block/{os.path.basename(loop)}/ro").read_text().strip() == "1"
code = try_write(ro)
print("write to the read-only target:", errno.errorcode.get(code, code), flush=True)
assert code in (errno.EPERM, errno.EROFS), code
with open(ro, "rb") as f:
    assert f.read(MiB) == data, "read-only target does not show the volume's data"
assert try_write(rw) == 0, "the writable publish must still write"
with open(ro, "rb", buffering=0) as f:
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert f.read(4096) == b"X" * 4096, "read-only loop does not see the volume's writes"
with open(rw, "rb") as f:
    assert f.read(4096) == b"X" * 4096

step("unpublish: the loop device is gone; unstage; nothing left")
node.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(volume_id=vid, target_path=ro))
assert nvme_loops() == {}, nvme_loops()
assert loops() == before, (before, loops())
assert not os.path.lexists(ro)
node.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(volume_id=vid, target_path=ro))
node.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(volume_id=vid, target_path=rw))
node.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(volume_id=vid,
                                                    staging_target_path=staging))
ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
    volume_id=vid, node_id=node_id))
ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vid))
assert not [c for c in os.listdir("/sys/class/nvme") if c.startswith("nvme")]
assert loops() == before, (before, loops())
print("RO-BLOCK-OK", flush=True)
'''


def test_guest_readonly_block_publish_is_enforced(guest, host_rpc):
    res = guest.run("""
        . /etc/guest/lib.sh
        csi_stack_start guest-node
        rc=0
        python3 /root/ro_block.py || rc=$?
        csi_stack_stop || rc=1
        [ "$rc" = 0 ] || csi_stack_logs 80
        exit $rc
        """, timeout=300, files={"/root/ro_block.py": DRIVER},
        options=GuestOptions(host_rpc=host_rpc), check=True)
    assert "RO-BLOCK-OK" in res.output
