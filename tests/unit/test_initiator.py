"""NvmeTcpInitiator against a fake sysfs tree and a fake ``nvme`` executable."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import fakesys  # noqa: E402

from csi_spdk import contract  # noqa: E402
from csi_spdk.errors import FailedPrecondition, InvalidArgument, Unavailable  # noqa: E402
from csi_spdk.node.initiator import NvmeTcpInitiator  # noqa: E402

NS1 = "5b0c7b0e-3c1e-4e7a-9c55-0a8f3c4b7d21"
NS2 = "0d6f1f4a-8a57-4e0a-b1c2-7e7a5d3a9b10"
NQN1 = contract.subsystem_nqn(NS1)
NQN2 = contract.subsystem_nqn(NS2)
HOSTNQN = contract.host_nqn("worker-1")
HOSTID = contract.host_id("worker-1")


@pytest.fixture
def env(tmp_path, monkeypatch):
    sysfs, dev, bindir = tmp_path / "sys", tmp_path / "dev", tmp_path / "bin"
    sysfs.mkdir()
    dev.mkdir()
    (dev / "nvme-fabrics").touch()  # the nvme-tcp module is "loaded"
    fakesys.install_fake_nvme(str(bindir))
    log = tmp_path / "nvme.log"
    monkeypatch.setenv("FAKE_NVME_LOG", str(log))
    monkeypatch.setenv("FAKE_NVME_SYSFS", str(sysfs))
    monkeypatch.setenv("FAKE_NVME_DEV", str(dev))
    monkeypatch.setenv("FAKE_NVME_EXPORTS", f'{{"{NQN1}": ["{NS1}"], "{NQN2}": ["{NS2}"]}}')
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    ini = NvmeTcpInitiator(HOSTNQN, HOSTID, ctrl_loss_tmo=60, reconnect_delay=2,
                           sysfs_root=str(sysfs), dev_root=str(dev))
    return ini, str(sysfs), str(dev), str(log)


class VirtualClock:
    """The initiator module's ``time``: ``monotonic`` moves only by ``sleep``.

    What a wait test asserts is how long the initiator decided to wait (its
    timeout, its poll steps), not how long a loaded machine took to run the
    fake ``nvme`` around it: the wall clock measured both."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.on_sleep = lambda: None

    def monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds
        self.on_sleep()


@pytest.fixture
def clock(monkeypatch):
    import csi_spdk.node.initiator as initiator_mod
    c = VirtualClock()
    monkeypatch.setattr(initiator_mod, "time", c)
    return c


def pc(nqn=NQN1, ns=NS1, addr="10.0.2.2", port="4420"):
    return {contract.PC_NQN: nqn, contract.PC_TRTYPE: "tcp", contract.PC_TRADDR: addr,
            contract.PC_TRSVCID: port, contract.PC_ADRFAM: "ipv4", contract.PC_NS_UUID: ns,
            contract.PC_SERIAL: contract.serial_number(ns)}


def test_default_udev_only_for_real_sysfs(tmp_path):
    assert NvmeTcpInitiator(HOSTNQN, HOSTID, 60, 2).use_udev
    assert not NvmeTcpInitiator(HOSTNQN, HOSTID, 60, 2, sysfs_root=str(tmp_path)).use_udev


def test_connect_runs_exact_command_and_finds_device(env):
    ini, _sysfs, dev, log = env
    device = ini.connect(pc(), timeout=2)
    assert device == os.path.join(dev, "nvme0n1")
    assert fakesys.read_log(log) == [[
        "connect", "-t", "tcp", "-a", "10.0.2.2", "-s", "4420", "-n", NQN1,
        "--hostnqn", HOSTNQN, "--hostid", HOSTID, "--ctrl-loss-tmo=60",
        "--reconnect-delay=2"]]
    assert ini.is_connected(NQN1) and ini.path_live(NQN1)
    assert not ini.is_connected(NQN2)


def test_connect_skipped_when_already_connected(env):
    ini, _sysfs, dev, log = env
    first = ini.connect(pc(), timeout=2)
    second = ini.connect(pc(), timeout=2)
    assert first == second
    assert [a[0] for a in fakesys.read_log(log)] == ["connect"]


def test_second_volume_gets_its_own_device(env):
    ini, *_ = env
    d1 = ini.connect(pc(), timeout=2)
    d2 = ini.connect(pc(NQN2, NS2), timeout=2)
    assert d1 != d2
    assert ini.find_device(NQN2, NS2, 0) == d2
    # A namespace uuid under the wrong subsystem never matches.
    assert ini.find_device(NQN1, NS2, 0) is None


def test_disconnect_only_that_subsystem(env):
    ini, _sysfs, dev, log = env
    ini.connect(pc(), timeout=2)
    ini.connect(pc(NQN2, NS2), timeout=2)
    ini.disconnect(NQN1)
    assert fakesys.read_log(log)[-1] == ["disconnect", "-n", NQN1]
    assert not ini.is_connected(NQN1) and ini.is_connected(NQN2)
    assert ini.find_device(NQN2, NS2, 0)
    n = len(fakesys.read_log(log))
    ini.disconnect(NQN1)   # idempotent: nothing to do, no command
    assert len(fakesys.read_log(log)) == n
    assert all("disconnect-all" not in a for a in fakesys.read_log(log))


def test_connect_failure_is_unavailable(env, monkeypatch):
    ini, *_ = env
    monkeypatch.setenv("FAKE_NVME_FAIL", "connect")
    with pytest.raises(Unavailable, match="Connection refused"):
        ini.connect(pc(), timeout=1)


def test_namespace_never_appears_disconnects_again(env, monkeypatch, clock):
    ini, _sysfs, _dev, log = env
    monkeypatch.setenv("FAKE_NVME_EXPORTS", "{}")
    t0 = clock.t
    with pytest.raises(Unavailable, match="did not appear"):
        ini.connect(pc(), timeout=0.5)
    # it waited its timeout once: this call made the connection, so no rescan
    # and second wait before it disconnects
    assert clock.t - t0 == pytest.approx(0.5)
    assert [a[0] for a in fakesys.read_log(log)] == ["connect", "disconnect"]
    assert not ini.is_connected(NQN1)


def test_missing_publish_context_key(env):
    ini, *_ = env
    bad = pc()
    del bad[contract.PC_NS_UUID]
    with pytest.raises(InvalidArgument):
        ini.connect(bad)


def test_find_device_waits_for_late_namespace(env, clock):
    ini, sysfs, dev, _log = env
    subsys, ctrl = fakesys.add_fabrics_subsystem(sysfs, dev, NQN1, [])
    t0 = clock.t

    def appears_at_0_3s():
        if clock.t - t0 >= 0.3 and not os.path.exists(os.path.join(dev, "nvme0n1")):
            fakesys.add_namespace(sysfs, dev, subsys, ctrl, NS1)

    clock.on_sleep = appears_at_0_3s
    found = ini.find_device(NQN1, NS1, timeout=5)
    assert found == os.path.join(dev, "nvme0n1")
    assert clock.t - t0 < 0.3 + 0.25   # short polls (at most 0.25 s), not one-second steps


def test_find_device_waits_in_a_thread_for_a_namespace_another_thread_adds(env):
    """The same wait on the real clock: the device made by another thread
    while find_device polls is found (no timing asserted)."""
    ini, sysfs, dev, _log = env
    subsys, ctrl = fakesys.add_fabrics_subsystem(sysfs, dev, NQN1, [])
    t = threading.Thread(target=lambda: (time.sleep(0.3), fakesys.add_namespace(
        sysfs, dev, subsys, ctrl, NS1)))
    t.start()
    found = ini.find_device(NQN1, NS1, timeout=300)
    t.join()
    assert found == os.path.join(dev, "nvme0n1")


def test_find_device_times_out(env, clock):
    ini, *_ = env
    t0 = clock.t
    assert ini.find_device(NQN1, NS1, timeout=0.3) is None
    assert clock.t - t0 == pytest.approx(0.3)   # the whole timeout, and no more


def test_connected_to_other_address_connects_again(env):
    ini, sysfs, dev, log = env
    fakesys.add_fabrics_subsystem(sysfs, dev, NQN1, [NS1], traddr="10.0.0.9")
    ini.connect(pc(), timeout=2)
    assert [a[0] for a in fakesys.read_log(log)] == ["connect"]


def test_dead_controller_is_not_connected(env):
    ini, sysfs, dev, _log = env
    fakesys.add_fabrics_subsystem(sysfs, dev, NQN1, [NS1], state="deleting")
    assert not ini.is_connected(NQN1)
    assert not ini.path_live(NQN1)


def test_path_live_follows_controller_state(env):
    ini, sysfs, dev, _log = env
    _subsys, ctrl = fakesys.add_fabrics_subsystem(sysfs, dev, NQN1, [NS1])
    assert ini.path_live(NQN1)
    with open(os.path.join(ctrl, "state"), "w") as f:
        f.write("connecting\n")
    assert not ini.path_live(NQN1)
    assert ini.is_connected(NQN1)


def test_rescan_writes_sysfs_attribute(env):
    ini, sysfs, dev, log = env
    _subsys, ctrl = fakesys.add_fabrics_subsystem(sysfs, dev, NQN1, [NS1])
    ini.rescan(NQN1)
    with open(os.path.join(ctrl, "rescan_controller")) as f:
        assert f.read() == "1"
    assert fakesys.read_log(log) == []


def test_udev_monitor_path(env, monkeypatch):
    """With udev on, the wait is driven by monitor.poll (faked here)."""
    ini, sysfs, dev, _log = env
    subsys, ctrl = fakesys.add_fabrics_subsystem(sysfs, dev, NQN1, [])
    polls = []

    class FakeMonitor:
        def poll(self, timeout):
            polls.append(timeout)
            fakesys.add_namespace(sysfs, dev, subsys, ctrl, NS1)   # "the uevent"
            return object()

        def stop(self):
            polls.append("stopped")

    ini.use_udev = True
    monkeypatch.setattr(NvmeTcpInitiator, "_monitor", staticmethod(lambda: FakeMonitor()))
    assert ini.find_device(NQN1, NS1, timeout=5) == os.path.join(dev, "nvme0n1")
    assert len(polls) == 2 and polls[-1] == "stopped"


def test_kernel_without_nvme_tcp_is_failed_precondition(env, monkeypatch):
    ini, _sysfs, dev, log = env
    os.unlink(os.path.join(dev, "nvme-fabrics"))
    monkeypatch.setenv("PATH", os.path.dirname(log))  # no modprobe, no nvme
    with pytest.raises(FailedPrecondition, match="nvme-tcp"):
        ini.connect(pc())


def _no_multipath_disk(sysfs, dev, ctrl, name, ns_uuid):
    """nvme_core.multipath=N: the namespace disk nvmeXnY sits under its controller."""
    d = os.path.join(ctrl, name)
    os.makedirs(d)
    for attr, value in (("uuid", ns_uuid), ("wwid", f"uuid.{ns_uuid}")):
        with open(os.path.join(d, attr), "w") as f:
            f.write(value + "\n")
    os.makedirs(os.path.join(sysfs, "block"), exist_ok=True)
    os.symlink(d, os.path.join(sysfs, "block", name))
    open(os.path.join(dev, name), "w").close()


def test_lookup_without_native_multipath(env):
    ini, sysfs, dev, _log = env
    _s1, ctrl1 = fakesys.add_fabrics_subsystem(sysfs, dev, NQN1, [])
    _s2, ctrl2 = fakesys.add_fabrics_subsystem(sysfs, dev, NQN2, [])
    _no_multipath_disk(sysfs, dev, ctrl1, "nvme0n1", NS1)
    _no_multipath_disk(sysfs, dev, ctrl2, "nvme1n1", NS2)
    assert ini.lookup(NQN1, NS1) == os.path.join(dev, "nvme0n1")
    assert ini.lookup(NQN2, NS2) == os.path.join(dev, "nvme1n1")
    assert ini.lookup(NQN1, NS2) is None            # right uuid, wrong subsystem


def test_lookup_scans_sys_block_without_subsystem_class(env):
    ini, sysfs, dev, _log = env
    fakesys.add_fabrics_subsystem(sysfs, dev, NQN1, [NS1])
    fakesys.add_fabrics_subsystem(sysfs, dev, NQN2, [NS2])
    import shutil
    shutil.rmtree(os.path.join(sysfs, "class", "nvme-subsystem"))
    assert ini.lookup(NQN2, NS2) == os.path.join(dev, "nvme1n1")
    assert ini.lookup(NQN1, NS2) is None
    assert [c.name for c in ini.controllers(NQN2)] == ["nvme1"]
