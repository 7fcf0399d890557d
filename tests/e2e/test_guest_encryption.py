"""Encryption at rest in the QEMU guest, one boot for every scenario: the
simulator with its kernel data plane (``sim --nvmet``: a crypto bdev is a real
dm-crypt mapping over the lvol's file), the agent, controller and node, the
real NVMe/TCP initiator, cryptsetup/dm-crypt for node mode.

Per mode (node, target) and access type (ext4, raw block), plus ``none`` as
the control that proves the plaintext check can fail: write a pattern, read
the lvol's backing file directly (pattern absent; present for ``none``), read
back through the volume (present); snapshot and clone, the clone staged with
its copied key shows the data; a wrong key is refused (node: NodeStage,
target: ControllerPublish); expand online (the filesystem / block device
grew); teardown leaves no mapping, loop device, lvol or key file, and no
volume key appears in any log (csi_stack_stop checks).

The target/block volume uses a key the test chose (the provisioner secret),
and the test checks the lvol's ciphertext on the host: AES-XTS with
key||key2 and dm-crypt's plain64 tweak, and NOT SPDK's SIMPLE_LBA tweak (LBA
in the high 64 bits; see sim/nvmet_crypt.py)."""

from __future__ import annotations

import re
import secrets

import pytest
from guest.harness import GuestOptions

pytestmark = pytest.mark.guest

MARK = b"CSI-SPDK-ENCRYPTION-TEST-PATTERN:"
PATTERN_LEN = 1 << 20


def pattern() -> bytes:
    out = bytearray()
    i = 0
    while len(out) < PATTERN_LEN:
        out += MARK + f"{i:08d}".encode() + bytes(range(23))
        i += 1
    return bytes(out[:PATTERN_LEN])


DRIVER = r'''
import glob, json, os, subprocess, sys, time
from pathlib import Path

import grpc
from csi_spdk.proto import csi_pb2 as csi
from csi_spdk.proto import csi_pb2_grpc as csi_grpc

MiB = 1 << 20
RUN = "/run/csi"
SECRETS = json.loads(Path(RUN, "auth-keys.json").read_text())
KEYS = Path(RUN, "volume-keys")
SEEN = Path(RUN, "encryption-keys.seen")
MARK = b"CSI-SPDK-ENCRYPTION-TEST-PATTERN:"
USER_KEY = sys.argv[1]
PATTERN = Path("/root/pattern.bin").read_bytes()
ctrl = csi_grpc.ControllerStub(grpc.insecure_channel(f"unix://{RUN}/controller.sock"))
node = csi_grpc.NodeStub(grpc.insecure_channel(f"unix://{RUN}/node.sock"))
AM = csi.VolumeCapability.AccessMode
NODE_ID = node.NodeGetInfo(csi.NodeGetInfoRequest()).node_id
SIZE, NEW_SIZE = 64 * MiB, 128 * MiB


def step(msg):
    print(f"== {msg}", flush=True)


def expect(code, fn):
    try:
        fn()
    except grpc.RpcError as err:
        assert err.code() == code, (err.code(), err.details())
        return err.details()
    raise AssertionError(f"expected {code}")


def lvol_file(uuid):
    found = glob.glob(f"/tmp/sim/**/{uuid}.img", recursive=True)
    assert len(found) == 1, found
    return Path(found[0])


def kept_key(uuid):
    key = json.loads((KEYS / f"{uuid}.json").read_text())["encryptionKey"]
    with open(SEEN, "a") as f:
        f.write(key + "\n")
    return key


def drop_caches():
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3")


def mappings():
    if not Path("/dev/mapper").is_dir():
        return []
    return sorted(p.name for p in Path("/dev/mapper").iterdir() if p.name != "control")


def loops():
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def cap_of(kind):
    access = {"mount": csi.VolumeCapability.MountVolume(fs_type="ext4")} if kind == "mount" \
        else {"block": csi.VolumeCapability.BlockVolume()}
    return csi.VolumeCapability(access_mode=AM(mode=AM.SINGLE_NODE_WRITER), **access)


class Attached:
    """One volume published, staged and published on this node."""

    def __init__(self, vol, kind, secrets, tag):
        self.vol, self.kind, self.secrets = vol, kind, secrets
        self.cap = cap_of(kind)
        self.staging = f"/var/lib/kubelet/staging/{tag}"
        self.target = f"/var/lib/kubelet/pods/{tag}/vol" + ("" if kind == "mount" else "-dev")
        os.makedirs(os.path.dirname(self.target), exist_ok=True)
        self.pctx = dict(ctrl.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id=NODE_ID, volume_capability=self.cap,
            volume_context=dict(vol.volume_context), secrets=secrets)).publish_context)
        node.NodeStageVolume(self._stage_req(secrets))
        node.NodePublishVolume(csi.NodePublishVolumeRequest(
            volume_id=vol.volume_id, publish_context=self.pctx,
            staging_target_path=self.staging, target_path=self.target,
            volume_capability=self.cap, volume_context=dict(vol.volume_context)))

    def _stage_req(self, secrets):
        return csi.NodeStageVolumeRequest(
            volume_id=self.vol.volume_id, publish_context=self.pctx,
            staging_target_path=self.staging, volume_capability=self.cap,
            secrets=secrets, volume_context=dict(self.vol.volume_context))

    def write(self, data):
        path = f"{self.target}/data" if self.kind == "mount" else self.target
        with open(path, "r+b" if self.kind == "block" else "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def read(self, n):
        drop_caches()
        path = f"{self.target}/data" if self.kind == "mount" else self.target
        with open(path, "rb") as f:
            return f.read(n)

    def size(self):
        if self.kind == "mount":
            st = os.statvfs(self.target)
            return st.f_blocks * st.f_frsize
        with open(self.target, "rb") as f:
            return f.seek(0, 2)

    def detach(self):
        node.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(
            volume_id=self.vol.volume_id, target_path=self.target))
        node.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(
            volume_id=self.vol.volume_id, staging_target_path=self.staging))
        ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
            volume_id=self.vol.volume_id, node_id=NODE_ID))


def secrets_for(vol):
    out = dict(SECRETS)
    if vol.volume_context.get("encryption", "none") != "none":
        out["encryptionKey"] = kept_key(vol.volume_context["lvolUuid"])
    return out


def scenario(mode, kind):
    tag = f"{mode}-{kind}"
    step(f"[{tag}] CreateVolume")
    params = {} if mode == "none" else {"encryption": mode}
    user = {"encryptionKey": USER_KEY} if tag == "target-block" else {}
    vol = ctrl.CreateVolume(csi.CreateVolumeRequest(
        name=f"pvc-{tag}", capacity_range=csi.CapacityRange(required_bytes=SIZE),
        volume_capabilities=[cap_of(kind)], parameters=params, secrets=user)).volume
    uuid = vol.volume_context["lvolUuid"]
    assert vol.volume_context.get("encryption", "none") == mode, dict(vol.volume_context)
    sec = secrets_for(vol)
    if tag == "target-block":
        assert sec["encryptionKey"] == USER_KEY
    a = Attached(vol, kind, sec, tag)
    if mode != "none":
        contexts = json.dumps([dict(vol.volume_context), a.pctx])
        for part in (sec["encryptionKey"][:64], sec["encryptionKey"][64:]):
            assert part not in contexts, "key material in volume_context/publish_context"
    if mode == "node":
        assert len(mappings()) == 1, mappings()
    step(f"[{tag}] write the pattern; the lvol's file must not show it")
    a.write(PATTERN)
    drop_caches()
    raw = lvol_file(uuid).read_bytes()
    if mode == "none":
        assert MARK in raw, "control: plaintext volume does not show the pattern"
    else:
        assert MARK not in raw, "pattern readable in the lvol's backing file"
    if mode == "node":
        assert raw[:6] == b"LUKS\xba\xbe", raw[:6]
    if tag == "target-block":
        print("CIPHERTEXT " + raw[:8192].hex(), flush=True)
    assert a.read(len(PATTERN)) == PATTERN, "read back through the volume differs"

    step(f"[{tag}] snapshot + clone with the copied key")
    snap = ctrl.CreateSnapshot(csi.CreateSnapshotRequest(
        name=f"snap-{tag}", source_volume_id=vol.volume_id)).snapshot
    clone = ctrl.CreateVolume(csi.CreateVolumeRequest(
        name=f"pvc-{tag}-clone", capacity_range=csi.CapacityRange(required_bytes=SIZE),
        volume_capabilities=[cap_of(kind)], parameters=params,
        volume_content_source=csi.VolumeContentSource(
            snapshot=csi.VolumeContentSource.SnapshotSource(
                snapshot_id=snap.snapshot_id)))).volume
    csec = secrets_for(clone)
    if mode != "none":
        assert csec["encryptionKey"] == sec["encryptionKey"]
        wrong = dict(csec, encryptionKey=("0f" * 64 if not csec["encryptionKey"].startswith(
            "0f") else "f0" * 64))
        wrong["encryptionKey"] = wrong["encryptionKey"][:64] + "ab" * 32
        if mode == "node":
            # published with the right key, staged with a wrong one: refused
            cap = cap_of(kind)
            pctx = dict(ctrl.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
                volume_id=clone.volume_id, node_id=NODE_ID, volume_capability=cap,
                volume_context=dict(clone.volume_context), secrets=csec)).publish_context)
            msg = expect(grpc.StatusCode.FAILED_PRECONDITION, lambda: node.NodeStageVolume(
                csi.NodeStageVolumeRequest(
                    volume_id=clone.volume_id, publish_context=pctx,
                    staging_target_path=f"/var/lib/kubelet/staging/{tag}-wrong",
                    volume_capability=cap, secrets=wrong,
                    volume_context=dict(clone.volume_context))))
            assert "does not open" in msg and wrong["encryptionKey"] not in msg, msg
            assert len(mappings()) == 1, mappings()
            ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
                volume_id=clone.volume_id, node_id=NODE_ID))
        else:
            msg = expect(grpc.StatusCode.FAILED_PRECONDITION,
                         lambda: ctrl.ControllerPublishVolume(
                             csi.ControllerPublishVolumeRequest(
                                 volume_id=clone.volume_id, node_id=NODE_ID,
                                 volume_capability=cap_of(kind),
                                 volume_context=dict(clone.volume_context), secrets=wrong)))
            assert "not the key of volume" in msg and wrong["encryptionKey"] not in msg, msg
        craw = lvol_file(clone.volume_context["lvolUuid"]).read_bytes()
        assert MARK not in craw
    c = Attached(clone, kind, csec, tag + "-clone")
    assert c.read(len(PATTERN)) == PATTERN, "clone does not show the snapshot's data"
    c.detach()
    ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=clone.volume_id))
    ctrl.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))

    step(f"[{tag}] expand online")
    before = a.size()
    exp = ctrl.ControllerExpandVolume(csi.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=csi.CapacityRange(required_bytes=NEW_SIZE),
        volume_capability=a.cap))
    node.NodeExpandVolume(csi.NodeExpandVolumeRequest(
        volume_id=vol.volume_id, volume_path=a.target, staging_target_path=a.staging,
        capacity_range=csi.CapacityRange(required_bytes=NEW_SIZE), volume_capability=a.cap))
    after = a.size()
    print(f"[{tag}] size {before} -> {after} (controller {exp.capacity_bytes})", flush=True)
    assert after >= before + 48 * MiB, (before, after)
    assert a.read(len(PATTERN)) == PATTERN

    step(f"[{tag}] teardown")
    a.detach()
    ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert mappings() == [], mappings()
    assert loops() == BASE_LOOPS, loops()   # no loop device of the data plane left
    assert not (KEYS / f"{uuid}.json").exists()


BASE_LOOPS = loops()   # /tmp/sim itself may be on one (lib.sh data_dir)
for spec in sys.argv[2:]:
    scenario(*spec.split(":"))
left = list(KEYS.glob("*.json")) if KEYS.exists() else []
assert left == [], left
print("ENCRYPTION-OK", flush=True)
'''

SCENARIOS = ["none:block", "node:mount", "node:block", "target:mount", "target:block"]


def _xts(key: bytes, data: bytes, tweak) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    out = b""
    for i in range(len(data) // 512):
        enc = Cipher(algorithms.AES(key), modes.XTS(tweak(i))).encryptor()
        out += enc.update(data[i * 512:(i + 1) * 512]) + enc.finalize()
    return out


@pytest.mark.timeout(1500)
def test_guest_encryption_modes(guest):
    user_key = secrets.token_hex(32) + secrets.token_hex(32)
    data = pattern()
    res = guest.run(f"""
        . /etc/guest/lib.sh
        modprobe dm-crypt
        csi_stack_start guest-node
        rc=0
        python3 /root/encryption.py {user_key} {' '.join(SCENARIOS)} || rc=$?
        csi_stack_stop || rc=1
        [ "$rc" = 0 ] || csi_stack_logs 80
        exit $rc
        """, timeout=900, files={"/root/encryption.py": DRIVER, "/root/pattern.bin": data},
        options=GuestOptions(), check=True)
    assert "ENCRYPTION-OK" in res.output
    assert "no key material in" in res.output
    assert user_key not in res.output.replace(f"encryption.py {user_key}", "")
    found = re.search(r"CIPHERTEXT ([0-9a-f]+)", res.output)
    assert found, "no ciphertext printed"
    cipher = bytes.fromhex(found.group(1))
    key = bytes.fromhex(user_key)
    plain64 = _xts(key, data[:len(cipher)], lambda i: i.to_bytes(16, "little"))
    spdk = _xts(key, data[:len(cipher)], lambda i: bytes(8) + i.to_bytes(8, "little"))
    assert cipher == plain64, "the data plane is not AES-XTS(key||key2) with plain64"
    # SPDK's crypto bdev agrees on sector 0 only (see sim/nvmet_crypt.py)
    assert cipher[:512] == spdk[:512] and cipher[512:1024] != spdk[512:1024]
