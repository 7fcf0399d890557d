"""In-band authentication (DH-HMAC-CHAP) enforced by the real Linux kernel.

The simulator's kernel data plane (``csi-spdk sim --nvmet``) mirrors a host
entry added with keyring key names into nvmet's ``hosts/<nqn>/dhchap_*``; the
guest's nvme-cli 2.13 and 6.12 kernel then authenticate for real:

* our key format is accepted by ``nvme check-dhchap-key`` / ``check-tls-key``;
* the authorised node connects with its keys, writes and reads back;
* no key, a wrong host key, a wrong controller key, and a third identity
  (another host id) claiming the node's host NQN are refused by the kernel;
* rotation (``nvmf_subsystem_set_keys``, then the connected host's new
  secrets in sysfs, which re-authenticates): the connection survives, the old
  key is refused on a fresh connect, the new one accepted;
* removing the host entry and the keys leaves nothing in nvmet's configfs;
* no key appears in any output or log the run produced (host side grep).
"""

from __future__ import annotations

import json

import pytest

from csi_spdk import nvme_keys

pytestmark = pytest.mark.guest

DRIVER = r'''
import json, os, subprocess, sys, time
from pathlib import Path

from csi_spdk import contract
from csi_spdk.spdk.api import SpdkApi
from csi_spdk.spdk.client import SpdkClient
from csi_spdk.spdk.errors import SpdkError

MiB = 1 << 20
NVMET = Path("/sys/kernel/config/nvmet")
NODE = "guest-node-1"
HOSTNQN, HOSTID = contract.host_nqn(NODE), contract.host_id(NODE)
OTHER_HOSTID = "0f0e0d0c-0b0a-4908-8706-050403020100"
K = json.loads(Path("/root/keys.json").read_text())
KEYDIR = Path("/run/keys")


def run(*cmd):
    """Run without echoing the command line (it may hold a secret)."""
    p = subprocess.run(cmd, capture_output=True, text=True)
    print(f"+ {cmd[0]} {cmd[1]} -> exit {p.returncode}", flush=True)
    print(p.stdout + p.stderr, end="", flush=True)
    return p


def connect(nqn, host_key=None, ctrl_key=None, hostid=HOSTID, duplicate=False):
    cmd = ["nvme", "connect", "-t", "tcp", "-a", "127.0.0.1", "-s", "4420", "-n", nqn,
           "--hostnqn", HOSTNQN, "--hostid", hostid]
    if host_key:
        cmd.append(f"--dhchap-secret={host_key}")
    if ctrl_key:
        cmd.append(f"--dhchap-ctrl-secret={ctrl_key}")
    if duplicate:
        cmd.append("--duplicate-connect")
    return run(*cmd)


def controllers(nqn):
    return sorted(c.name for c in Path("/sys/class/nvme").iterdir()
                  if (c / "subsysnqn").read_text().strip() == nqn)


def wait_dev(ns_uuid, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for b in Path("/sys/block").glob("nvme*"):
            dev = Path("/dev") / b.name
            uuid = b / "uuid"
            if uuid.exists() and dev.exists() and uuid.read_text().strip() == ns_uuid:
                return str(dev)
        time.sleep(0.1)
    sys.exit(f"no block device with uuid {ns_uuid}")


def dmesg_count(text):
    return subprocess.run(["dmesg"], capture_output=True, text=True).stdout.count(text)


def put_key(api, name, material):
    KEYDIR.mkdir(mode=0o700, exist_ok=True)
    path = KEYDIR / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, material.encode())
    os.close(fd)
    api.key_file_add(name, str(path))


def refused(label, p, nqn):
    assert p.returncode != 0, f"{label}: the kernel let it connect"
    assert controllers(nqn) == before, f"{label}: a controller appeared"
    print(f"REFUSED {label}", flush=True)


# 1. our keys are valid for nvme-cli 2.13 (the same library the kernel path uses)
for k in ("host1", "ctrl1", "host2", "ctrl2", "wrong"):
    assert run("nvme", "check-dhchap-key", f"--key={K[k]}").returncode == 0, k
assert run("nvme", "check-tls-key", f"--hostnqn={HOSTNQN}",
           "--subsysnqn=nqn.2024-11.io.csi-spdk:check",
           f"--keydata={K['psk']}").returncode == 0
bad = K["host1"][:12] + ("A" if K["host1"][12] != "A" else "B") + K["host1"][13:]
assert run("nvme", "check-dhchap-key", f"--key={bad}").returncode != 0, "corrupt key accepted"

api = SpdkApi(SpdkClient("/run/spdk.sock", timeout=30))
api.malloc_create("Malloc0", 128 * MiB, 4096)
api.lvstore_create("Malloc0", "lvs0")
lvol = api.lvol_create("lvs0", "csi-guest-auth", 32 * MiB, thin=True)
nqn = contract.subsystem_nqn(lvol)
api.transport_create("TCP")
api.subsystem_create(nqn, contract.serial_number(lvol), contract.MODEL_NUMBER)
api.ns_add(nqn, lvol, uuid=lvol)
api.listener_add(nqn, api.listen_address("127.0.0.1", 4420))
put_key(api, "h1", K["host1"])
put_key(api, "c1", K["ctrl1"])
api.host_add(nqn, HOSTNQN, dhchap_key="h1", dhchap_ctrlr_key="c1")

host_dir = NVMET / "hosts" / HOSTNQN
assert (host_dir / "dhchap_key").read_text().strip() == K["host1"], "host key not mirrored"
assert (host_dir / "dhchap_ctrl_key").read_text().strip() == K["ctrl1"], "ctrl key not mirrored"
assert (NVMET / "subsystems" / nqn / "allowed_hosts" / HOSTNQN).exists()
sub = api.subsystem_get(nqn)
assert sub["hosts"] == [{"nqn": HOSTNQN, "dhchap_key": "h1", "dhchap_ctrlr_key": "c1"}], sub

# 2. refused: no key, wrong host key, right host key + wrong controller key,
#    a third identity claiming the node's host NQN
before = controllers(nqn)
refused("no key", connect(nqn), nqn)
refused("wrong host key", connect(nqn, K["wrong"], K["ctrl1"]), nqn)
refused("wrong controller key", connect(nqn, K["host1"], K["wrong"]), nqn)
refused("third identity without key", connect(nqn, hostid=OTHER_HOSTID), nqn)
refused("third identity with a guessed key", connect(nqn, K["wrong"], hostid=OTHER_HOSTID), nqn)

# 3. the authorised node: connect, write, read back
auth_before = dmesg_count("authenticated")
p = connect(nqn, K["host1"], K["ctrl1"])
assert p.returncode == 0, "the authorised host was refused"
dev = wait_dev(lvol)
(ctrl,) = controllers(nqn)
print("CONNECTED", ctrl, dev, flush=True)
pattern = os.urandom(1 * MiB)
fd = os.open(dev, os.O_RDWR)
os.pwrite(fd, pattern, 4 * MiB)
os.fsync(fd)
os.close(fd)
Path("/proc/sys/vm/drop_caches").write_text("3")
fd = os.open(dev, os.O_RDONLY)
assert os.pread(fd, len(pattern), 4 * MiB) == pattern, "read-back mismatch"
os.close(fd)
print("DATA-OK", flush=True)

# 4. rotation in two steps, each leaving host and target consistent after ONE
#    sysfs write (one write = one re-authentication of the live controller):
#    (a) the host key: target h2+c1, then the host's dhchap_secret;
#    (b) the controller key: target h2+c2, then the host's dhchap_ctrl_secret.
put_key(api, "h2", K["host2"])
put_key(api, "c2", K["ctrl2"])
cdir = Path("/sys/class/nvme") / ctrl


def reauth(attr, value):
    n = dmesg_count("authenticated")
    with open(cdir / attr, "w") as f:
        f.write(value)
    deadline = time.monotonic() + 60
    while dmesg_count("authenticated") <= n and time.monotonic() < deadline:
        time.sleep(0.2)
    assert dmesg_count("authenticated") > n, f"no re-authentication after writing {attr}"


n_auth = dmesg_count("authenticated")
api.host_set_keys(nqn, HOSTNQN, dhchap_key="h2", dhchap_ctrlr_key="c1")
reauth("dhchap_secret", K["host2"])
api.host_set_keys(nqn, HOSTNQN, dhchap_key="h2", dhchap_ctrlr_key="c2")
assert (host_dir / "dhchap_key").read_text().strip() == K["host2"]
reauth("dhchap_ctrl_secret", K["ctrl2"])
api.key_file_remove("h1")
api.key_file_remove("c1")
print("dmesg auth lines:", auth_before, n_auth, dmesg_count("authenticated"), flush=True)
assert dmesg_count("authenticated") > n_auth, "no re-authentication after rotation"
assert controllers(nqn) == [ctrl], controllers(nqn)
assert (cdir / "state").read_text().strip() == "live"
Path("/proc/sys/vm/drop_caches").write_text("3")
fd = os.open(dev, os.O_RDWR)
assert os.pread(fd, len(pattern), 4 * MiB) == pattern, "read-back after rotation"
os.pwrite(fd, pattern[::-1], 8 * MiB)
os.fsync(fd)
os.close(fd)
print("ROTATED-CONNECTION-SURVIVED", flush=True)
before = controllers(nqn)
refused("old keys after rotation", connect(nqn, K["host1"], K["ctrl1"], duplicate=True), nqn)
p = connect(nqn, K["host2"], K["ctrl2"], duplicate=True)
assert p.returncode == 0, "the rotated keys were refused"
assert len(controllers(nqn)) == 2
print("NEW-KEYS-OK", flush=True)

# 5. unpublish: disconnect, remove the host entry and the keys
run("nvme", "disconnect", "-n", nqn)
api.host_remove(nqn, HOSTNQN)
api.key_file_remove("h2")
api.key_file_remove("c2")
assert not host_dir.exists(), "host entry (with its keys) left in nvmet"
assert api.keyring_keys() == [], api.keyring_keys()
api.subsystem_delete(nqn)
assert not any((NVMET / "hosts").iterdir())
print("AUTH-OK", flush=True)
'''


def _keys() -> dict[str, str]:
    out = {k: nvme_keys.generate_dhchap_key().text
           for k in ("host1", "ctrl1", "host2", "ctrl2", "wrong")}
    out["psk"] = nvme_keys.generate_tls_psk().text
    return out


def assert_no_key_material(keys: dict[str, str], *texts: str) -> None:
    """Each key's base64 body must appear in none of ``texts``."""
    for name, key in keys.items():
        body = key.split(":")[2]
        for i, text in enumerate(texts):
            assert body not in text, f"key {name} leaked into captured text #{i}"


def test_guest_dhchap_enforced_by_kernel(guest):
    keys = _keys()
    res = guest.run("""
        . /etc/guest/lib.sh
        data_dir /tmp/sim
        csi-spdk sim --rpc-socket /run/spdk.sock --data-dir /tmp/sim --nvmet \
            > /tmp/sim.log 2>&1 &
        sim=$!
        wait_for 30 test -S /run/spdk.sock || { cat /tmp/sim.log; exit 1; }
        rc=0
        python3 /root/driver.py || rc=$?
        kill -TERM $sim
        wait $sim || { echo "sim exit code $?"; rc=1; }
        echo "--- sim log ---"; cat /tmp/sim.log
        echo "--- dmesg (nvme) ---"; dmesg | grep -i nvme | tail -40
        exit $rc
        """, timeout=300, files={"/root/driver.py": DRIVER,
                                 "/root/keys.json": json.dumps(keys)})
    # the grep runs before the assertions on success so a leak is caught either way
    assert_no_key_material(keys, res.output, res.console)
    assert res.exit_code == 0, res.describe()
    for marker in ("REFUSED no key", "REFUSED wrong host key", "REFUSED wrong controller key",
                   "REFUSED third identity without key", "DATA-OK",
                   "ROTATED-CONNECTION-SURVIVED", "REFUSED old keys after rotation",
                   "NEW-KEYS-OK", "AUTH-OK"):
        assert marker in res.output, marker


TLS_DRIVER = r'''
import json, os, subprocess, sys, time
from pathlib import Path

from csi_spdk import contract
from csi_spdk.spdk.api import SpdkApi
from csi_spdk.spdk.client import SpdkClient

MiB = 1 << 20
NVMET = Path("/sys/kernel/config/nvmet")
HOSTNQN, HOSTID = contract.host_nqn("guest-node-1"), contract.host_id("guest-node-1")
OTHER = contract.host_nqn("intruder")
K = json.loads(Path("/root/keys.json").read_text())


def run(*cmd):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    print(f"+ {cmd[0]} {cmd[1]} -> exit {p.returncode}", flush=True)
    print(p.stdout + p.stderr, end="", flush=True)
    return p


def connect(nqn, hostnqn=HOSTNQN, tls=True):
    cmd = ["nvme", "connect", "-t", "tcp", "-a", "127.0.0.1", "-s", "4421", "-n", nqn,
           "--hostnqn", hostnqn, "--hostid", HOSTID]
    return run(*cmd, *(["--tls"] if tls else []))


api = SpdkApi(SpdkClient("/run/spdk.sock", timeout=30))
api.malloc_create("Malloc0", 64 * MiB, 4096)
api.lvstore_create("Malloc0", "lvs0")
lvol = api.lvol_create("lvs0", "csi-guest-tls", 16 * MiB, thin=True)
nqn = contract.subsystem_nqn(lvol)
api.transport_create("TCP")
api.subsystem_create(nqn, contract.serial_number(lvol), contract.MODEL_NUMBER)
api.ns_add(nqn, lvol, uuid=lvol)
api.listener_add(nqn, api.listen_address("127.0.0.1", 4421), secure_channel=True)
os.makedirs("/run/keys", mode=0o700, exist_ok=True)
fd = os.open("/run/keys/p1", os.O_WRONLY | os.O_CREAT, 0o600)
os.write(fd, K["psk"].encode())
os.close(fd)
api.key_file_add("p1", "/run/keys/p1")
api.host_add(nqn, HOSTNQN, psk="p1")
port = next(p for p in (NVMET / "ports").iterdir() if (p / "subsystems" / nqn).exists())
assert (port / "addr_tsas").read_text().strip() == "tls1.3"
assert (port / "addr_treq").read_text().strip().startswith("required")
print(run("keyctl", "show", "%:.nvme").stdout, flush=True)

assert connect(nqn, tls=False).returncode != 0, "plain TCP reached a TLS-only port"
print("REFUSED plain", flush=True)
api.host_add(nqn, OTHER)
assert connect(nqn, hostnqn=OTHER).returncode != 0, "a host without a PSK got in"
print("REFUSED no-psk identity", flush=True)
api.host_remove(nqn, OTHER)
p = connect(nqn)
assert p.returncode == 0, "the host with the PSK was refused"
deadline = time.monotonic() + 20
dev = None
while dev is None and time.monotonic() < deadline:
    for b in Path("/sys/block").glob("nvme*"):
        # the head disk (nvmeXnY), not a hidden per-path nvmeXcYnZ without a /dev node
        if (b / "uuid").exists() and (b / "uuid").read_text().strip() == lvol \
                and Path("/dev", b.name).exists():
            dev = "/dev/" + b.name
    time.sleep(0.1)
assert dev, "no device"
data = os.urandom(MiB)
fd = os.open(dev, os.O_RDWR)
os.pwrite(fd, data, 0)
os.fsync(fd)
os.close(fd)
Path("/proc/sys/vm/drop_caches").write_text("3")
fd = os.open(dev, os.O_RDONLY)
assert os.pread(fd, MiB, 0) == data
os.close(fd)
print("TLS-DATA-OK", flush=True)
run("nvme", "disconnect", "-n", nqn)
api.host_remove(nqn, HOSTNQN)
api.subsystem_delete(nqn)
print("TLS-OK", flush=True)
'''


def test_guest_tls_psk_enforced_by_kernel(guest):
    keys = _keys()
    res = guest.run("""
        . /etc/guest/lib.sh
        modprobe tls || true
        mkdir -p /etc/tlshd
        printf '[debug]\\nloglevel=1\\ntls=0\\nnl=0\\n[authenticate]\\nkeyrings=.nvme\\n' \
            > /etc/tlshd.conf
        tlshd -s -c /etc/tlshd.conf > /tmp/tlshd.log 2>&1 &
        data_dir /tmp/sim
        csi-spdk sim --rpc-socket /run/spdk.sock --data-dir /tmp/sim --nvmet \
            > /tmp/sim.log 2>&1 &
        sim=$!
        wait_for 30 test -S /run/spdk.sock || { cat /tmp/sim.log; exit 1; }
        rc=0
        python3 /root/driver.py || rc=$?
        kill -TERM $sim
        wait $sim || { echo "sim exit code $?"; rc=1; }
        echo "--- sim log ---"; cat /tmp/sim.log
        echo "--- tlshd log ---"; tail -30 /tmp/tlshd.log
        echo "--- dmesg (nvme) ---"; dmesg | grep -i -E "nvme|tls|handshake" | tail -40
        exit $rc
        """, timeout=300, files={"/root/driver.py": TLS_DRIVER,
                                 "/root/keys.json": json.dumps(keys)})
    assert_no_key_material(keys, res.output, res.console)
    assert res.exit_code == 0, res.describe()
    for marker in ("REFUSED plain", "REFUSED no-psk identity", "TLS-DATA-OK", "TLS-OK"):
        assert marker in res.output, marker


CSI_TLS_DRIVER = r'''
import json, os, sys
from pathlib import Path

import grpc
from csi_spdk.proto import csi_pb2 as csi
from csi_spdk.proto import csi_pb2_grpc as csi_grpc

RUN = "/run/csi"
MiB = 1 << 20
SECRETS = json.loads(Path(RUN, "auth-keys.json").read_text())
ctrl = csi_grpc.ControllerStub(grpc.insecure_channel(f"unix://{RUN}/controller.sock"))
node = csi_grpc.NodeStub(grpc.insecure_channel(f"unix://{RUN}/node.sock"))
AM = csi.VolumeCapability.AccessMode
cap = csi.VolumeCapability(block=csi.VolumeCapability.BlockVolume(),
                           access_mode=AM(mode=AM.SINGLE_NODE_WRITER))
node_id = node.NodeGetInfo(csi.NodeGetInfoRequest()).node_id
vol = ctrl.CreateVolume(csi.CreateVolumeRequest(
    name="pvc-tls", capacity_range=csi.CapacityRange(required_bytes=16 * MiB),
    volume_capabilities=[cap], parameters={"auth": "tls"})).volume
assert vol.volume_context["auth"] == "tls", vol.volume_context
pc = dict(ctrl.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
    volume_id=vol.volume_id, node_id=node_id, volume_capability=cap,
    volume_context=dict(vol.volume_context))).publish_context)
print("publish_context", pc, flush=True)
assert pc["auth"] == "tls" and pc["trsvcid"] == "4421", pc
port = next(p for p in Path("/sys/kernel/config/nvmet/ports").iterdir()
            if (p / "subsystems" / pc["nqn"]).exists())
assert (port / "addr_tsas").read_text().strip() == "tls1.3"
staging, target = "/var/lib/kubelet/plugins/tls/staging", "/var/lib/kubelet/pods/p/tls"
os.makedirs(staging, exist_ok=True)
try:
    node.NodeStageVolume(csi.NodeStageVolumeRequest(
        volume_id=vol.volume_id, publish_context=pc, staging_target_path=staging,
        volume_capability=cap, volume_context=dict(vol.volume_context)))
    raise SystemExit("staged without the node-stage secret")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
    print("NO-SECRET-REFUSED", e.details(), flush=True)
node.NodeStageVolume(csi.NodeStageVolumeRequest(
    volume_id=vol.volume_id, publish_context=pc, staging_target_path=staging,
    volume_capability=cap, volume_context=dict(vol.volume_context), secrets=SECRETS))
node.NodePublishVolume(csi.NodePublishVolumeRequest(
    volume_id=vol.volume_id, publish_context=pc, staging_target_path=staging,
    target_path=target, volume_capability=cap, volume_context=dict(vol.volume_context)))
data = os.urandom(MiB)
with open(target, "r+b") as f:
    f.write(data)
    os.fsync(f.fileno())
Path("/proc/sys/vm/drop_caches").write_text("3")
with open(target, "rb") as f:
    assert f.read(MiB) == data
print("CSI-TLS-DATA-OK", flush=True)
node.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(volume_id=vol.volume_id,
                                                        target_path=target))
node.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(volume_id=vol.volume_id,
                                                    staging_target_path=staging))
ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
    volume_id=vol.volume_id, node_id=node_id))
ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vol.volume_id))
print("CSI-TLS-OK", flush=True)
'''


def test_guest_csi_tls_volume(guest):
    """auth: tls through the driver: controller (PSK, TLS listener) and node
    plugin (PSK into .nvme, nvme connect --tls) against the 6.12 kernel."""
    res = guest.run("""
        . /etc/guest/lib.sh
        printf '[authenticate]\\nkeyrings=.nvme\\n' > /etc/tlshd.conf
        tlshd -c /etc/tlshd.conf > /tmp/tlshd.log 2>&1 &
        csi_stack_start guest-node
        rc=0
        python3 /root/driver.py || rc=$?
        csi_stack_stop || rc=1
        [ "$rc" = 0 ] || { csi_stack_logs 60; dmesg | grep -i -E "nvme|tls" | tail -30; }
        exit $rc
        """, timeout=400, files={"/root/driver.py": CSI_TLS_DRIVER})
    assert res.exit_code == 0, res.describe()
    for marker in ("NO-SECRET-REFUSED", "CSI-TLS-DATA-OK", "CSI-TLS-OK",
                   "csi_stack: no key material"):
        assert marker in res.output, marker
