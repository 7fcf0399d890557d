"""kill -9 of the target under a connected initiator, in the QEMU guest.

The agent's supervisor runs ``csi-spdk sim --nvmet`` as its spdk_tgt (the
kernel nvmet target is the data plane), a volume on an aio pool is exported
to the guest's own initiator and written; then the target is killed with
SIGKILL. The restarted simulator tears down what its predecessor left in the
kernel target (like a real target restart: connections drop), the supervisor
re-attaches the pool and replays the export, the initiator reconnects within
its ctrl-loss-tmo: same block device, data written before the kill reads back.
"""

from __future__ import annotations

import pytest
from guest.target_host import DRIVER_FILES

pytestmark = pytest.mark.guest

DRIVER = r'''
import os, subprocess, sys, time
from pathlib import Path

from csi_spdk import contract
from csi_spdk.agent.pools import Pools
from csi_spdk.agent.state import DesiredState
from csi_spdk.agent.supervisor import Supervisor, SupervisorConfig
from csi_spdk.spdk.api import SpdkApi
from csi_spdk.spdk.client import SpdkClient

sys.path.insert(0, "/root")
from target_driver import HOSTID, HOSTNQN, MiB, sh, wait_dev  # noqa: E402

SOCK = "/run/spdk.sock"


def read_direct(dev, offset, length):
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap
        buf = mmap.mmap(-1, length)
        os.preadv(fd, [buf], offset)
        return bytes(buf)
    finally:
        os.close(fd)


cmd = ["csi-spdk", "sim", "--rpc-socket", SOCK, "--data-dir", "/tmp/sim/data", "--nvmet",
       "--log-level", "info"]
cfg = SupervisorConfig(SOCK, command=cmd, poll_interval=0.2, check_memory=False,
                       start_timeout=180, log_file="/tmp/tgt.log")
api = SpdkApi(SpdkClient(SOCK, timeout=60))
pools = Pools({"pools": [{"name": "pool0", "devices": [{"path": "/tmp/sim/pool.img"}],
                          "cluster_size": "1MiB"}]}, api)
state = DesiredState("/var/lib/csi-spdk-agent/desired.json")
sup = Supervisor(cfg, pools, state).start()
[first] = sup.wait_recoveries(1, 240)
print("first start:", first.reason, first.pools[0]["state"], flush=True)
assert first.pools[0]["state"] == "created", first

def fwd(method, params):
    result = api.call(method, params)
    state.record(method, params, result)
    return result

lvol = api.lvol_create("pool0", "csi-guest-restart", 64 * MiB, thin=True)
nqn = contract.subsystem_nqn(lvol)
fwd("nvmf_create_transport", {"trtype": "TCP"})
fwd("nvmf_create_subsystem", {"nqn": nqn, "serial_number": contract.serial_number(lvol),
                              "model_number": contract.MODEL_NUMBER, "allow_any_host": False,
                              "max_namespaces": 1})
fwd("nvmf_subsystem_add_ns", {"nqn": nqn, "namespace": {"bdev_name": lvol, "uuid": lvol}})
fwd("nvmf_subsystem_add_listener", {"nqn": nqn, "listen_address": api.listen_address(
    "127.0.0.1", 4420)})
fwd("nvmf_subsystem_add_host", {"nqn": nqn, "host": HOSTNQN})

sh("nvme", "connect", "-t", "tcp", "-a", "127.0.0.1", "-s", "4420", "-n", nqn,
   "--hostnqn", HOSTNQN, "--hostid", HOSTID, "--ctrl-loss-tmo=300", "--reconnect-delay=1")
dev = wait_dev(lvol)
ctrl = next(c for c in Path("/sys/class/nvme").iterdir()
            if (c / "subsysnqn").read_text().strip() == nqn)
print("device", dev, "controller", ctrl.name, flush=True)
pattern = os.urandom(4 * MiB)
fd = os.open(dev, os.O_RDWR)
os.pwrite(fd, pattern, 16 * MiB)
os.fsync(fd)
os.close(fd)
assert read_direct(dev, 16 * MiB, len(pattern)) == pattern

old_pid = sup.pid
t0 = time.monotonic()
os.kill(old_pid, 9)
states = []
deadline = t0 + 280
while time.monotonic() < deadline:
    st = (ctrl / "state").read_text().strip()
    if not states or states[-1] != st:
        states.append(st)
        print(f"{time.monotonic() - t0:7.3f}s controller {ctrl.name}: {st}", flush=True)
    if st == "live" and len(states) > 1:
        break
    time.sleep(0.05)
live_after = time.monotonic() - t0
recs = sup.wait_recoveries(2, 60)
assert len(recs) == 2, "no recovery"
rec = recs[1]
print(f"RECOVERY kill -9 -> replay done {rec.duration:.3f}s (replay itself), "
      f"kill -9 -> controller live again {live_after:.3f}s; states {states}; "
      f"fixed {rec.replay['fixed']}: {rec.replay['created']}", flush=True)
assert states[-1] == "live" and len(states) > 1, \
    f"the initiator never lost its connection: the kernel target was not torn down ({states})"
assert rec.replay["failed"] == [], rec.replay
assert rec.pools[0]["state"] == "loaded", rec.pools
assert sup.pid != old_pid
assert Path(dev).exists() and wait_dev(lvol) == dev, "the block device changed"
assert read_direct(dev, 16 * MiB, len(pattern)) == pattern, "data lost across the restart"
more = os.urandom(1 * MiB)
fd = os.open(dev, os.O_RDWR)
os.pwrite(fd, more, 40 * MiB)
os.fsync(fd)
os.close(fd)
assert read_direct(dev, 40 * MiB, len(more)) == more
sub = api.subsystem_get(nqn)
assert [h["nqn"] for h in sub["hosts"]] == [HOSTNQN], sub
sh("nvme", "disconnect", "-n", nqn)
sup.stop()
print("AGENT-RESTART-OK", flush=True)
'''


def test_guest_initiator_survives_kill9_of_the_target(guest):
    res = guest.run("""
        . /etc/guest/lib.sh
        data_dir /tmp/sim
        truncate -s 512M /tmp/sim/pool.img
        rc=0
        python3 /root/driver.py || rc=$?
        echo "--- target log ---"; tail -n 80 /tmp/tgt.log
        echo "--- kernel objects after the agent stopped ---"; nvmet_objects
        [ -z "$(nvmet_objects)" ] || rc=1
        exit $rc
        """, timeout=600, files={"/root/driver.py": DRIVER, **DRIVER_FILES}, check=True)
    assert "AGENT-RESTART-OK" in res.output
    line = next(x for x in res.output.splitlines() if x.startswith("RECOVERY"))
    print("\n" + line)
