"""The simulator's kernel data plane (``csi-spdk sim --nvmet``) and DH-HMAC-CHAP
keys: Linux nvmet keeps one key pair per host NQN (configfs ``hosts/<nqn>``
is shared by every subsystem: ``nvmet_setup_auth`` takes the keys of the
``nvmet_host`` linked under the subsystem's ``allowed_hosts``), SPDK one per
(subsystem, host). The limit cannot be lifted without another host NQN per
volume, so it is explicit: an add_host or set_keys that would need a second
pair for one host NQN is refused with EPERM and a message saying so, BEFORE
anything changes (the simulator's JSON view and the kernel never diverge);
the same keys on several subsystems (the static dev keys) work, and so does
rotation on one subsystem.

The kernel is replaced by a directory tree that behaves like configfs where
it matters here (a host directory comes with its dhchap_* attributes, a
subsystem with allowed_hosts/ and namespaces/, rmdir of a populated group).
The guest tests (tests/e2e/test_guest_auth.py) run the real thing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from controller_fixtures import InProcClient

from csi_spdk import contract, nvme_keys
from csi_spdk.sim import configfs as configfs_ops
from csi_spdk.sim import (
    methods,  # noqa: F401  (registers the RPC methods)
    nvmet,
)
from csi_spdk.sim.state import SimState
from csi_spdk.spdk.api import SpdkApi
from csi_spdk.spdk.errors import SpdkError, SpdkNotPermitted

HOST = contract.host_nqn("node-a")
MiB = 1 << 20


@pytest.fixture
def configfs(tmp_path, monkeypatch):
    root = tmp_path / "nvmet"
    for d in ("subsystems", "hosts", "ports"):
        (root / d).mkdir(parents=True)
    real_mkdir = configfs_ops.mkdir

    def mkdir(path: Path) -> None:
        real_mkdir(path)
        if path.parent.name == "hosts":
            for attr in ("dhchap_key", "dhchap_ctrl_key", "dhchap_hash", "dhchap_dhgroup"):
                (path / attr).touch()
        elif path.parent.name == "subsystems":
            (path / "allowed_hosts").mkdir(exist_ok=True)
            (path / "namespaces").mkdir(exist_ok=True)

    def rmdir(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    monkeypatch.setattr(configfs_ops, "mkdir", mkdir)
    monkeypatch.setattr(configfs_ops, "rmdir", rmdir)
    return root


@pytest.fixture
def sim(tmp_path, configfs):
    dp = nvmet.NvmetDataPlane(root=configfs, load_modules=False)
    state = SimState(tmp_path / "data", dp)
    api = SpdkApi(InProcClient(state))
    keydir = tmp_path / "keys"
    keydir.mkdir(mode=0o700)

    def key(name: str, material: str) -> str:
        path = keydir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, material.encode())
        os.close(fd)
        api.key_file_add(name, str(path))
        return material

    api.malloc_create("Malloc0", 64 * MiB, 4096)
    api.lvstore_create("Malloc0", "lvs0")
    nqns = []
    for i in range(2):
        lvol = api.lvol_create("lvs0", f"csi-v{i}", 8 * MiB, thin=True)
        nqn = contract.subsystem_nqn(lvol)
        api.subsystem_create(nqn, contract.serial_number(lvol), contract.MODEL_NUMBER)
        nqns.append(nqn)
    return api, key, nqns, configfs


def _gen() -> str:
    return nvme_keys.generate_dhchap_key().text


def test_second_pair_for_one_host_is_refused_before_anything_changes(sim):
    api, key, (n1, n2), root = sim
    h1, c1, h2, c2 = (key(n, _gen()) for n in ("h1", "c1", "h2", "c2"))
    api.host_add(n1, HOST, dhchap_key="h1", dhchap_ctrlr_key="c1")
    host_dir = root / "hosts" / HOST
    assert (host_dir / "dhchap_key").read_text() == h1
    assert (host_dir / "dhchap_ctrl_key").read_text() == c1
    with pytest.raises(SpdkNotPermitted) as err:   # EPERM: FAILED_PRECONDITION in the driver
        api.host_add(n2, HOST, dhchap_key="h2", dhchap_ctrlr_key="c2")
    msg = str(err.value)
    assert "one DH-HMAC-CHAP key pair per host NQN" in msg and n1 in msg, msg
    assert h2 not in msg and c2 not in msg and h1 not in msg
    # nothing changed: SPDK's view, the keyring's references, the kernel's
    assert api.subsystem_get(n2)["hosts"] == []
    assert not (root / "subsystems" / n2 / "allowed_hosts" / HOST).exists()
    assert (host_dir / "dhchap_key").read_text() == h1
    refs = {k["name"]: k["refcnt"] for k in api.keyring_keys()}
    assert refs["h2"] == refs["c2"] == 1, refs      # only the keyring's own reference
    # nor may the second subsystem allow the host without keys
    with pytest.raises(SpdkError, match="one DH-HMAC-CHAP key pair"):
        api.host_add(n2, HOST)
    # a set_keys on the first subsystem that the second one would contradict
    api.host_remove(n1, HOST)
    api.host_add(n2, HOST, dhchap_key="h2", dhchap_ctrlr_key="c2")
    assert (host_dir / "dhchap_key").read_text() == h2


def test_the_same_keys_on_two_subsystems_and_rotation_on_one(sim):
    api, key, (n1, n2), root = sim
    key("h1", _gen())
    key("c1", _gen())
    h2, c2 = key("h2", _gen()), key("c2", _gen())
    api.host_add(n1, HOST, dhchap_key="h1", dhchap_ctrlr_key="c1")
    api.host_add(n2, HOST, dhchap_key="h1", dhchap_ctrlr_key="c1")   # static dev keys
    assert (root / "subsystems" / n2 / "allowed_hosts" / HOST).is_symlink()
    # rotating one of two subsystems that share the host would break the other
    with pytest.raises(SpdkError, match="one DH-HMAC-CHAP key pair"):
        api.host_set_keys(n1, HOST, dhchap_key="h2", dhchap_ctrlr_key="c1")
    assert api.subsystem_get(n1)["hosts"][0]["dhchap_key"] == "h1"
    api.host_remove(n2, HOST)
    # alone, the two-step rotation goes through (DESIGN.md "Rotation")
    api.host_set_keys(n1, HOST, dhchap_key="h2", dhchap_ctrlr_key="c1")
    api.host_set_keys(n1, HOST, dhchap_key="h2", dhchap_ctrlr_key="c2")
    host_dir = root / "hosts" / HOST
    assert (host_dir / "dhchap_key").read_text() == h2
    assert (host_dir / "dhchap_ctrl_key").read_text() == c2
    assert api.subsystem_get(n1)["hosts"] == [
        {"nqn": HOST, "dhchap_key": "h2", "dhchap_ctrlr_key": "c2"}]
