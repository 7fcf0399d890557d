"""The simulator's kernel data plane (``csi-spdk sim --nvmet``) in the guest:
SPDK JSON-RPC objects become nvmet configfs objects that a real initiator
connects to, and go away again."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.guest

DRIVER = r'''
import json, os, subprocess, sys, time
from pathlib import Path

from csi_spdk import contract
from csi_spdk.spdk.api import SpdkApi
from csi_spdk.spdk.client import SpdkClient

MiB = 1 << 20
NVMET = Path("/sys/kernel/config/nvmet")
NODE = "guest-node-1"
HOSTNQN, HOSTID = contract.host_nqn(NODE), contract.host_id(NODE)
SPDK_LISTEN = "192.0.2.10"     # SPDK's view; the kernel port listens on 127.0.0.1


def sh(*cmd, check=True):
    print("+", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    print(p.stdout + p.stderr, end="", flush=True)
    if check and p.returncode:
        sys.exit(f"FAILED ({p.returncode}): {' '.join(cmd)}")
    return p


def kernel_objects():
    out = []
    for top in ("subsystems", "hosts", "ports"):
        out += [f"{top}/{p.name}" for p in (NVMET / top).iterdir()]
    for port in (NVMET / "ports").iterdir():
        out += [f"ports/{port.name}/subsystems/{p.name}" for p in (port / "subsystems").iterdir()]
    return sorted(out)


def wait_dev(ns_uuid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for b in Path("/sys/block").glob("nvme*"):
            dev = Path("/dev") / b.name
            uuid = b / "uuid"
            if uuid.exists() and dev.exists() and uuid.read_text().strip() == ns_uuid:
                return str(dev)
        time.sleep(0.1)
    sys.exit(f"no block device with uuid {ns_uuid}")


api = SpdkApi(SpdkClient("/run/spdk.sock", timeout=30))
print("spdk", api.version()["version"], flush=True)
api.malloc_create("Malloc0", 256 * MiB, 4096)
api.lvstore_create("Malloc0", "lvs0")
lvol = api.lvol_create("lvs0", "csi-guest-vol", 64 * MiB, thin=True)
nqn = contract.subsystem_nqn(lvol)
api.transport_create("TCP")
api.subsystem_create(nqn, contract.serial_number(lvol), contract.MODEL_NUMBER)
api.ns_add(nqn, lvol, uuid=lvol)
api.listener_add(nqn, api.listen_address(SPDK_LISTEN, 4420))
api.host_add(nqn, HOSTNQN)

sub = api.subsystem_get(nqn)
assert [a["traddr"] for a in sub["listen_addresses"]] == [SPDK_LISTEN], sub
print("kernel:", kernel_objects(), flush=True)
port = next(p for p in (NVMET / "ports").iterdir() if (p / "subsystems" / nqn).exists())
assert (port / "addr_traddr").read_text().strip() == "127.0.0.1"
assert (port / "addr_trsvcid").read_text().strip() == "4420"
assert (NVMET / "subsystems" / nqn / "allowed_hosts" / HOSTNQN).exists()
assert (NVMET / "subsystems" / nqn / "attr_allow_any_host").read_text().strip() == "0"

sh("nvme", "connect", "-t", "tcp", "-a", "127.0.0.1", "-s", "4420", "-n", nqn,
   "--hostnqn", HOSTNQN, "--hostid", HOSTID)
dev = wait_dev(lvol)
ctrl = next(c for c in Path("/sys/class/nvme").iterdir()
            if (c / "subsysnqn").read_text().strip() == nqn)
serial = (ctrl / "serial").read_text().strip()
model = (ctrl / "model").read_text().strip()
print("device", dev, "controller", ctrl.name, "serial", serial, "model", model, flush=True)
assert serial == contract.serial_number(lvol), serial
assert model == contract.MODEL_NUMBER, model
size = int(sh("blockdev", "--getsize64", dev).stdout)
assert size == 64 * MiB, size

pattern = os.urandom(4 * MiB)
offset = 16 * MiB
fd = os.open(dev, os.O_RDWR)
os.pwrite(fd, pattern, offset)
os.fsync(fd)
os.close(fd)
Path("/proc/sys/vm/drop_caches").write_text("3")
fd = os.open(dev, os.O_RDONLY)
assert os.pread(fd, len(pattern), offset) == pattern, "read-back mismatch"
os.close(fd)

# The data reached the lvol's backing file: the simulator sees the clusters.
info = next(x for x in api.lvols("lvs0") if x["uuid"] == lvol)
print("lvol after write:", json.dumps(info), flush=True)
assert info.get("num_allocated_clusters", 1) > 0, info

sh("nvme", "disconnect", "-n", nqn)
api.host_remove(nqn, HOSTNQN)
assert not (NVMET / "subsystems" / nqn / "allowed_hosts" / HOSTNQN).exists()
assert not (NVMET / "hosts" / HOSTNQN).exists()
p = sh("nvme", "connect", "-t", "tcp", "-a", "127.0.0.1", "-s", "4420", "-n", nqn,
       "--hostnqn", HOSTNQN, "--hostid", HOSTID, check=False)
assert p.returncode != 0, "a removed host could still connect"

api.subsystem_delete(nqn)
left = kernel_objects()
assert left == [], left
api.lvol_delete(lvol)

# Leave one export live: stopping the simulator must remove it from the kernel.
lvol2 = api.lvol_create("lvs0", "csi-guest-vol2", 8 * MiB, thin=True)
nqn2 = contract.subsystem_nqn(lvol2)
api.subsystem_create(nqn2, contract.serial_number(lvol2), contract.MODEL_NUMBER)
api.ns_add(nqn2, lvol2, uuid=lvol2)
api.listener_add(nqn2, api.listen_address("127.0.0.1", 4420))
api.host_add(nqn2, HOSTNQN)
assert len(kernel_objects()) == 4, kernel_objects()
print("SIM-NVMET-OK", flush=True)
'''


def test_guest_sim_nvmet_dataplane(guest):
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
        echo "--- kernel objects after sim exit ---"; nvmet_objects
        [ -z "$(nvmet_objects)" ] || rc=1
        exit $rc
        """, timeout=180, files={"/root/driver.py": DRIVER}, check=True)
    assert "SIM-NVMET-OK" in res.output
