"""The agent's record of target-mode encryption (agent/crypto_state.py): accel
keys are kept as 0600 files, never in the record, and a SIGKILLed spdk_tgt
(a simulator process) gets its accel key, crypto bdev and the namespace that
exports it back from replay, in that order."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from simproc import SimProcess
from test_agent_state import forward

from csi_spdk import contract
from csi_spdk.agent.state import DesiredState
from csi_spdk.controller.encryption import VolumeKey
from csi_spdk.spdk.api import SpdkApi

MiB = 1 << 20


def test_crypto_record_holds_no_material_and_replay_restacks(short_tmp: Path) -> None:
    pool = short_tmp / "pool.img"
    with open(pool, "wb") as f:
        f.truncate(64 * MiB)
    state_path = short_tmp / "state" / "desired.json"
    state = DesiredState(state_path)
    key = VolumeKey.generate("target")
    sim = SimProcess(short_tmp / "spdk.sock", short_tmp / "data")
    sim.start()
    try:
        with sim.client() as c:
            api = SpdkApi(c)
            api.call("bdev_aio_create", {"name": "aio0", "filename": str(pool),
                                         "block_size": 512})
            api.lvstore_create("aio0", "pool", MiB)
            lvol = api.lvol_create("pool", "csi-enc", 8 * MiB, thin=True)
            other = api.lvol_create("pool", "csi-gone", 4 * MiB, thin=True)
            name, kname = contract.crypto_bdev_name(lvol), contract.crypto_key_name(
                lvol, key.material)
            gone, gone_key = contract.crypto_bdev_name(other), contract.crypto_key_name(
                other, key.material)
            nqn = contract.subsystem_nqn(lvol)
            for k, base in ((kname, lvol), (gone_key, other)):
                forward(api, state, "accel_crypto_key_create", {
                    "cipher": "AES_XTS", "key": key.key, "key2": key.key2, "name": k})
                forward(api, state, "bdev_crypto_create", {
                    "base_bdev_name": base, "name": contract.crypto_bdev_name(base),
                    "key_name": k})
            forward(api, state, "nvmf_create_subsystem", {"nqn": nqn, "allow_any_host": False})
            forward(api, state, "nvmf_subsystem_add_ns", {
                "nqn": nqn, "namespace": {"bdev_name": name, "uuid": lvol}})
            # the other volume is torn down the way the controller does it
            forward(api, state, "bdev_crypto_delete", {"name": gone})
            forward(api, state, "accel_crypto_key_destroy", {"key_name": gone_key})
            before = api.subsystem_get(nqn)["namespaces"]
        text = state_path.read_text() + state_path.with_suffix(".journal").read_text()
        for secret in (key.material, key.key, key.key2):
            assert secret not in text
        state.close()                  # the agent stops; what it left is on disk
        record = DesiredState(state_path, read_only=True).snapshot()["crypto"]
        assert set(record["keys"]) == {kname} and set(record["bdevs"]) == {name}
        key_file = Path(record["keys"][kname]["path"])
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(key_file.parent).st_mode) == 0o700
        assert not (key_file.parent / gone_key).exists()
        sim.kill9()

        sim.start()
        with sim.client() as c:
            api = SpdkApi(c)
            api.call("bdev_aio_create", {"name": "aio0", "filename": str(pool),
                                         "block_size": 512})
            assert api.bdev_get(lvol) is not None and api.bdev_get(name) is None
            state = DesiredState(state_path)           # the agent started again
            report = state.replay(api)
            assert report["failed"] == []
            assert report["created"]["crypto_keys"] == [kname]
            assert report["created"]["crypto_bdevs"] == [name]
            assert report["created"]["namespaces"] == [f"{nqn} nsid 1"]
            crypt = api.bdev_get(name)
            assert crypt["driver_specific"]["crypto"] == {
                "base_bdev_name": lvol, "name": name, "key_name": kname}
            keys = api.call("accel_crypto_keys_get", {})
            assert keys == [{"name": kname, "cipher": "AES_XTS", "key": key.key,
                             "key2": key.key2}]
            assert api.subsystem_get(nqn)["namespaces"] == before
            assert api.bdev_get(gone) is None
            again = state.replay(api)
            assert again["failed"] == [] and "crypto_bdevs" not in again["created"]
    finally:
        sim.stop()


def _denied(fn, *args) -> str:
    import grpc
    import pytest

    from csi_spdk.errors import CsiError
    with pytest.raises(CsiError) as err:
        fn(*args)
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED, err.value
    return err.value.message


def test_agent_forwards_only_the_drivers_crypto_calls(agent_env) -> None:
    """Driver names only, each crypto bdev on its own lvol with its own key, no
    inline key on bdev_crypto_create, no accel_crypto_keys_get (it lists
    material); what it refused is checked on SPDK itself."""
    key = VolumeKey.generate("target")
    lvol = agent_env.raw.lvol_create(agent_env.lvs, "csi-agentcrypt", 4 * MiB, thin=True)
    other = agent_env.raw.lvol_create(agent_env.lvs, "csi-agentother", 4 * MiB, thin=True)
    foreign = agent_env.raw.lvol_create(agent_env.lvs, "precious", 4 * MiB, thin=True)
    kname = contract.crypto_key_name(lvol, key.material)
    create = {"cipher": "AES_XTS", "key": key.key, "key2": key.key2}
    api = agent_env.api
    try:
        _denied(api.call, "accel_crypto_key_create", {**create, "name": "mykey"})
        _denied(api.call, "accel_crypto_key_create", {**create, "name": kname,
                                                      "cipher": "AES_CBC"})
        _denied(api.call, "accel_crypto_keys_get", {})
        assert agent_env.raw.call("accel_crypto_keys_get", {}) == []
        api.call("accel_crypto_key_create", {**create, "name": kname})
        # another lvol, a foreign lvol, another volume's key, an inline key
        _denied(api.call, "bdev_crypto_create", {"base_bdev_name": other, "name":
                                                 contract.crypto_bdev_name(lvol),
                                                 "key_name": kname})
        _denied(api.call, "bdev_crypto_create", {"base_bdev_name": foreign, "name":
                                                 contract.crypto_bdev_name(foreign),
                                                 "key_name": kname})
        _denied(api.call, "bdev_crypto_create", {"base_bdev_name": other, "name":
                                                 contract.crypto_bdev_name(other),
                                                 "key_name": kname})
        _denied(api.call, "bdev_crypto_create", {"base_bdev_name": lvol, "name":
                                                 contract.crypto_bdev_name(lvol),
                                                 "key_name": kname, "key": key.key})
        for base in (lvol, other, foreign):
            assert agent_env.raw.bdev_get(base)["claimed"] is False
        name = contract.crypto_bdev_name(lvol)
        api.call("bdev_crypto_create", {"base_bdev_name": lvol, "name": name,
                                        "key_name": kname})
        # exported only in its own volume's subsystem
        _denied(api.call, "nvmf_subsystem_add_ns", {
            "nqn": contract.subsystem_nqn(other), "namespace": {"bdev_name": name}})
        _denied(api.call, "bdev_crypto_delete", {"name": "crypt0"})
        _denied(api.call, "accel_crypto_key_destroy", {"key_name": "k0"})
        api.call("bdev_crypto_delete", {"name": name})
        api.call("accel_crypto_key_destroy", {"key_name": kname})
        assert agent_env.raw.call("accel_crypto_keys_get", {}) == []
    finally:
        for lv in (lvol, other, foreign):
            agent_env.raw.lvol_delete(lv)
