"""``csi-spdk dev``: one instance per socket directory (a lock naming the
holder's pid), and with ``--spdk-rpc`` it removes from the target everything
it made, and nothing else."""

from __future__ import annotations

import os
import sys

import grpc
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from devproc import run_lifecycle, start_dev  # noqa: E402

from csi_spdk import contract  # noqa: E402
from csi_spdk.proto import csi_pb2, csi_pb2_grpc  # noqa: E402
from csi_spdk.spdk.api import SpdkApi  # noqa: E402
from csi_spdk.spdk.client import SpdkClient  # noqa: E402

MiB = 1024 * 1024


def probe(endpoint: str) -> bool:
    with grpc.insecure_channel(endpoint.replace("unix://", "unix:")) as ch:
        return csi_pb2_grpc.IdentityStub(ch).Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value


@pytest.mark.timeout(900)   # two devs (ten processes) started, one stopped: 277 s at load 40
def test_second_dev_on_the_same_socket_dir_is_refused(tmp_path):
    first = start_dev(tmp_path)
    try:
        assert (first.sock_dir / "dev.lock").read_text().strip() == str(first.proc.pid)
        second = start_dev(tmp_path, sock_dir=first.sock_dir, wait=False)
        rc = second.wait_decided()
        out = second.output().strip().splitlines()
        if rc is None:
            second.stop()
        assert rc == 1, out
        assert out[-1] == (f"csi-spdk dev: {first.sock_dir} is in use by another csi-spdk dev "
                           f"(pid {first.proc.pid}); stop it (kill {first.proc.pid}) or give "
                           "this one another --socket-dir"), out
        assert "Traceback" not in second.output()
        # the first one still owns and serves its sockets and state
        assert probe(first.controller)
        assert probe(f"unix://{first.sock_dir}/node.sock")
        assert (first.sock_dir / "dev-state" / "controller.json").exists()
    finally:
        assert first.stop() == 0, first.output()
    assert sorted(p.name for p in first.sock_dir.iterdir()) == []


def test_the_lock_is_free_again_after_a_hard_kill(tmp_path):
    """SIGKILL leaves the lock file but not the lock: the next dev starts."""
    first = start_dev(tmp_path)
    first.proc.kill()
    first.proc.wait()
    assert (first.sock_dir / "dev.lock").exists()
    second = start_dev(tmp_path, sock_dir=first.sock_dir)
    try:
        assert probe(second.controller)
        assert (first.sock_dir / "dev.lock").read_text().strip() == str(second.proc.pid)
    finally:
        assert second.stop() == 0, second.output()


def _inventory(api: SpdkApi) -> dict:
    return {
        "subsystems": sorted(s["nqn"] for s in api.subsystems()),
        "lvols": sorted(f'{lv["lvs"]["name"]}/{lv["name"]}' for lv in api.lvols()),
        "lvstores": sorted(lvs["name"] for lvs in api.lvstores()),
        "bdevs": sorted(b["name"] for b in api.bdevs()),
    }


@pytest.mark.parametrize("prior", [False, True], ids=["empty-target", "target-in-use"])
def test_dev_spdk_rpc_removes_everything_it_made(tmp_path, spdk_rpc, prior):
    """A lifecycle (volumes thick and thin, snapshot, clone, publish) through
    ``dev --spdk-rpc``, then SIGTERM: the target is exactly as before. With
    ``prior``, the target already has an lvstore holding a driver-named lvol
    and a driver-NQN subsystem (another dev's, say): those stay."""
    api = SpdkApi(SpdkClient(spdk_rpc))
    tag = os.urandom(3).hex()
    try:
        if prior:
            api.malloc_create(f"Prior{tag}", 256 * MiB)
            api.lvstore_create(f"Prior{tag}", f"prior{tag}")
            old = api.lvol_create(f"prior{tag}", f"csi-prior-{tag}", 8 * MiB, thin=False)
            old_nqn = contract.subsystem_nqn(old)
            api.subsystem_create(old_nqn, "SPDK0000000000000001", "prior")
        before = _inventory(api)
        dev = start_dev(tmp_path, "--spdk-rpc", spdk_rpc)
        try:
            made = run_lifecycle(dev.controller, name=f"life{tag}")
            during = _inventory(api)
            # the lifecycle really made objects on this target
            assert len(during["lvols"]) >= len(before["lvols"]) + 4, during
            assert len(during["subsystems"]) == len(before["subsystems"]) + 1, during
            assert contract.subsystem_nqn(contract.parse_id(made.volume).lvol_uuid) \
                in during["subsystems"]
        finally:
            rc = dev.stop()
        assert rc == 0, dev.output()
        assert _inventory(api) == before, dev.output()
        assert sorted(p.name for p in dev.sock_dir.iterdir()) == []
    finally:
        if prior:
            api.subsystem_delete(old_nqn)
            api.call("bdev_lvol_delete_lvstore", {"lvs_name": f"prior{tag}"})
            api.call("bdev_malloc_delete", {"name": f"Prior{tag}"})
        api.client.close()
