"""Encryption at rest in the QEMU guest, one boot for every scenario: the
agent, controller and node, the real NVMe/TCP initiator, cryptsetup/dm-crypt
for node mode, and as SPDK either the simulator with its kernel data plane
(``sim --nvmet``: a crypto bdev is a real dm-crypt mapping over the lvol's
file) or, when CSI_SPDK_TEST_RPC names one (``host_rpc``), a real spdk_tgt on
the host with its AES-XTS crypto bdev (ISA-L crypto).

Per mode (node, target) and access type (ext4, raw block), plus ``none`` as
the control that proves the plaintext check can fail: write a pattern, read
back through the volume (present); snapshot and clone, the clone staged with
its copied key shows the data; a wrong key is refused with
FAILED_PRECONDITION (node: NodeStage, target: ControllerPublish, naming where
the key is kept) and leaves no crypto bdev or accel key; expand online (the
filesystem / block device grew); after the unpublish no crypto bdev and no
accel key of the volume is left in SPDK (while published, target mode has
exactly one of each: the control), and the lvol's raw bytes read THROUGH SPDK
(the lvol exported on its own and read from the guest) do not show the
pattern (they do for ``none``); with the simulator the lvol's backing file is
checked directly too. Teardown leaves no mapping, loop device, lvol, crypto
bdev, accel key, subsystem or key file, and no volume key appears in any log
(csi_stack_stop checks; with CSI_SPDK_TEST_LOG the real target's log too).

The target/block volume uses a key the test chose (the provisioner secret),
and the test checks the lvol's ciphertext on the host: with the simulator
AES-XTS with key||key2 and dm-crypt's plain64 tweak over 512-byte sectors;
with a real target AES-XTS with key||key2, one data unit per lvol block, and
SPDK's SIMPLE_LBA tweak (LBA in the high 64 bits; see sim/nvmet_crypt.py)."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

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
import uuid as uuid_mod
from pathlib import Path

import grpc
from csi_spdk import contract
from csi_spdk.proto import csi_pb2 as csi
from csi_spdk.proto import csi_pb2_grpc as csi_grpc
from csi_spdk.spdk.api import SpdkApi
from csi_spdk.spdk.client import SpdkClient

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
# the simulator in this guest, or a real spdk_tgt on the host (host_rpc):
# its listener stays on the host's 127.0.0.1, the guest dials the host
SIM = not os.environ.get("GUEST_SPDK_RPC")
spdk = SpdkApi(SpdkClient(os.environ.get("GUEST_SPDK_RPC") or f"{RUN}/spdk.sock"))
LISTEN, DIAL = "127.0.0.1", "127.0.0.1" if SIM else "10.0.2.2"
RAW_NQN = "nqn.2016-06.io.spdk:csi-test-raw"
PORT = os.environ.get("GUEST_TARGET_PORT", "4420")   # a real target's (harness.py)


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


def raw_scan(uuid):
    """The lvol's bytes as SPDK holds them, read through SPDK: the lvol (no
    consumer may hold it: the volume is unpublished) exported on its own to
    this guest and read to its end. Returns (pattern found, first 8 KiB)."""
    ns, hostid = str(uuid_mod.uuid4()), str(uuid_mod.uuid4())
    spdk.call("nvmf_create_subsystem", {"nqn": RAW_NQN, "allow_any_host": True,
                                        "serial_number": "CSITESTRAW0001"})
    try:
        spdk.call("nvmf_subsystem_add_ns", {"nqn": RAW_NQN, "namespace": {
            "bdev_name": uuid, "uuid": ns}})
        spdk.call("nvmf_subsystem_add_listener", {"nqn": RAW_NQN, "listen_address": {
            "trtype": "TCP", "adrfam": "IPv4", "traddr": LISTEN, "trsvcid": PORT}})
        subprocess.run(["nvme", "connect", "-t", "tcp", "-a", DIAL, "-s", PORT,
                        "-n", RAW_NQN, "--hostnqn",
                        f"nqn.2014-08.org.nvmexpress:uuid:{hostid}", "--hostid", hostid],
                       check=True, capture_output=True)
        try:
            dev = None
            for _ in range(100):
                dev = next((f"/dev/{Path(b).name}" for b in glob.glob("/sys/block/nvme*")
                            if Path(b, "uuid").exists() and Path(b, "uuid").read_text().strip()
                            == ns and Path(f"/dev/{Path(b).name}").exists()), None)
                if dev:
                    break
                time.sleep(0.1)
            assert dev, f"raw export of {uuid} did not show up"
            found, head, tail = False, b"", b""
            with open(dev, "rb", buffering=0) as f:
                while chunk := f.read(4 * MiB):
                    head = head or chunk[:8192]
                    found = found or MARK in tail + chunk
                    tail = chunk[-len(MARK):]
            return found, head
        finally:
            subprocess.run(["nvme", "disconnect", "-n", RAW_NQN], capture_output=True)
    finally:
        spdk.call("nvmf_delete_subsystem", {"nqn": RAW_NQN})


def crypto_state(uuid):
    """(crypto bdev of the volume open?, names of the accel keys made for it)"""
    bdevs = [b["name"] for b in spdk.call("bdev_get_bdevs")]
    keys = [k["name"] for k in spdk.call("accel_crypto_keys_get")]
    return (contract.crypto_bdev_name(uuid) in bdevs,
            sorted(k for k in keys if k.startswith(contract.crypto_bdev_name(uuid))))


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
    key_name = contract.crypto_key_name(uuid, sec.get("encryptionKey", ""))
    if mode == "target":   # the control for "destroyed after unexport" below
        assert crypto_state(uuid) == (True, [key_name]), crypto_state(uuid)
    else:
        assert crypto_state(uuid) == (False, []), crypto_state(uuid)
    step(f"[{tag}] write the pattern; the lvol's file must not show it")
    a.write(PATTERN)
    drop_caches()
    if SIM:   # the backing file itself (a real target's lvol: raw_scan below)
        raw = lvol_file(uuid).read_bytes()
        if mode == "none":
            assert MARK in raw, "control: plaintext volume does not show the pattern"
        else:
            assert MARK not in raw, "pattern readable in the lvol's backing file"
        if mode == "node":
            assert raw[:6] == b"LUKS\xba\xbe", raw[:6]
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
            # names where the key is kept (here the key file standing in for the Secret)
            assert str(KEYS / f"{clone.volume_context['lvolUuid']}.json") in msg, msg
        for part in (wrong["encryptionKey"][:64], wrong["encryptionKey"][64:]):
            assert part not in msg, msg
        # nothing opened with the wrong key, nothing left of the refused attempt
        assert crypto_state(clone.volume_context["lvolUuid"]) == (False, []), \
            crypto_state(clone.volume_context["lvolUuid"])
        if SIM:   # (a real target's: the volume's raw_scan below covers the shared clusters)
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
    # unexported: no crypto bdev and no accel key of the volume left in SPDK
    assert crypto_state(uuid) == (False, []), crypto_state(uuid)
    step(f"[{tag}] the lvol's raw bytes through SPDK")
    found, head = raw_scan(uuid)
    if mode == "none":
        assert found, "control: plaintext lvol read through SPDK does not show the pattern"
    else:
        assert not found, "pattern readable in the lvol through SPDK"
    if mode == "node":
        assert head[:6] == b"LUKS\xba\xbe", head[:6]
    if tag == "target-block":
        if SIM:
            assert head == lvol_file(uuid).read_bytes()[:len(head)]
        block = spdk.call("bdev_get_bdevs", {"name": uuid})[0]["block_size"]
        print(f"CIPHERTEXT {block} {head.hex()}", flush=True)
    ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert mappings() == [], mappings()
    assert loops() == BASE_LOOPS, loops()   # no loop device of the data plane left
    assert not (KEYS / f"{uuid}.json").exists()


BASE_LOOPS = loops()   # /tmp/sim itself may be on one (lib.sh data_dir)
for spec in sys.argv[2:]:
    scenario(*spec.split(":"))
left = list(KEYS.glob("*.json")) if KEYS.exists() else []
assert left == [], left
step("nothing is left in SPDK: lvols, crypto bdevs, accel keys, subsystems")
assert not [lv["name"] for lv in spdk.lvols() if lv["name"].startswith("csi")]
assert not [b["name"] for b in spdk.call("bdev_get_bdevs")
            if b["name"].startswith(contract.CRYPTO_PREFIX)]
assert not [k["name"] for k in spdk.call("accel_crypto_keys_get")
            if k["name"].startswith(contract.CRYPTO_PREFIX)]
assert not [s["nqn"] for s in spdk.subsystems()
            if s["nqn"].startswith(contract.NQN_PREFIX) or s["nqn"] == RAW_NQN]
print("ENCRYPTION-OK", flush=True)
'''

SCENARIOS = ["none:block", "node:mount", "node:block", "target:mount", "target:block"]
# a focused run (e.g. "target:block"), for a slow real-target rig; CI runs all
SCENARIOS = os.environ.get("CSI_SPDK_TEST_ENCRYPTION_SCENARIOS", "").split() or SCENARIOS


def _xts(key: bytes, data: bytes, unit: int, tweak) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    out = b""
    for i in range(len(data) // unit):
        enc = Cipher(algorithms.AES(key), modes.XTS(tweak(i))).encryptor()
        out += enc.update(data[i * unit:(i + 1) * unit]) + enc.finalize()
    return out


def plain64(i: int) -> bytes:
    """dm-crypt's plain64 IV: the sector number, little-endian, low 64 bits."""
    return i.to_bytes(16, "little")


def simple_lba(i: int) -> bytes:
    """SPDK's SIMPLE_LBA tweak (lib/accel/accel_sw.c): the LBA in the HIGH 64 bits."""
    return bytes(8) + i.to_bytes(8, "little")


@pytest.mark.timeout(2100)
def test_guest_encryption_modes(guest, host_rpc):
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
        """, timeout=1800, files={"/root/encryption.py": DRIVER, "/root/pattern.bin": data},
        options=GuestOptions(host_rpc=host_rpc), check=True)
    assert "ENCRYPTION-OK" in res.output
    assert "no key material in" in res.output
    halves = (user_key, user_key[:64], user_key[64:])
    out = res.output.replace(f"encryption.py {user_key}", "")
    assert not [h for h in halves if h in out], "the user's key in the guest's output"
    target_log = os.environ.get("CSI_SPDK_TEST_LOG")   # the real target's own log
    if host_rpc and target_log:
        assert not [h for h in halves if h in Path(target_log).read_text(errors="replace")], \
            f"the user's key in {target_log}"
    found = re.search(r"CIPHERTEXT (\d+) ([0-9a-f]+)", res.output)
    if "target:block" not in SCENARIOS:
        return
    assert found, "no ciphertext printed"
    block, cipher = int(found.group(1)), bytes.fromhex(found.group(2))
    key = bytes.fromhex(user_key)
    if host_rpc:
        # SPDK's crypto bdev: AES-XTS(key||key2), one data unit per block of
        # the lvol, SIMPLE_LBA tweak; dm-crypt's plain64 agrees on unit 0 only
        assert len(cipher) >= 2 * block, (len(cipher), block)
        spdk = _xts(key, data[:len(cipher)], block, simple_lba)
        assert cipher == spdk, "the lvol is not AES-XTS(key||key2) with SPDK's SIMPLE_LBA tweak"
        dm = _xts(key, data[:len(cipher)], block, plain64)
        assert cipher[:block] == dm[:block] and cipher[block:2 * block] != dm[block:2 * block]
        return
    # the simulator's data plane: dm-crypt aes-xts-plain64 over 512-byte sectors
    dm = _xts(key, data[:len(cipher)], 512, plain64)
    spdk = _xts(key, data[:len(cipher)], 512, simple_lba)
    assert cipher == dm, "the data plane is not AES-XTS(key||key2) with plain64"
    # SPDK's crypto bdev agrees on sector 0 only (see sim/nvmet_crypt.py)
    assert cipher[:512] == spdk[:512] and cipher[512:1024] != spdk[512:1024]
