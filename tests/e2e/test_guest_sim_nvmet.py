"""The simulator's kernel data plane (``csi-spdk sim --nvmet``) in the guest:
SPDK JSON-RPC objects become nvmet configfs objects that a real initiator
connects to, and go away again."""

from __future__ import annotations

import pytest
from guest.target_host import TargetRun

pytestmark = pytest.mark.guest

DRIVER = r"""
import json, os, sys
from pathlib import Path

sys.path.insert(0, "/root")
from csi_spdk import contract
from target_driver import HOSTID, HOSTNQN, MiB, NVMET, sh, wait_dev, write_read_back
from csi_spdk.spdk.api import SpdkApi
from csi_spdk.spdk.client import SpdkClient

SPDK_LISTEN = "192.0.2.10"     # SPDK's view; the kernel port listens on 127.0.0.1


def kernel_objects():
    out = []
    for top in ("subsystems", "hosts", "ports"):
        out += [f"{top}/{p.name}" for p in (NVMET / top).iterdir()]
    for port in (NVMET / "ports").iterdir():
        out += [f"ports/{port.name}/subsystems/{p.name}" for p in (port / "subsystems").iterdir()]
    return sorted(out)


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

write_read_back(dev, offset=16 * MiB, size=4 * MiB)

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
"""


def test_guest_sim_nvmet_dataplane(guest):
    """Simulator only: it checks the simulator's own kernel objects."""
    tr = TargetRun(None)
    res = tr.run(guest, driver=DRIVER, timeout=180, teardown="""
        echo "--- kernel objects after sim exit ---"; nvmet_objects
        [ -z "$(nvmet_objects)" ] || rc=1
        """)
    assert res.exit_code == 0, res.describe()
    assert "SIM-NVMET-OK" in res.output
