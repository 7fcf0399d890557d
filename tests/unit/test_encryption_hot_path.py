"""The last unpublish and DeleteVolume decide from what SPDK's unexport and
delete already read (``intents.stacked``: the namespace names the crypto bdev
or the lvol, the lvol is claimed or not) whether a target-mode crypto bdev
may be on the volume: an unencrypted volume costs no key store read and no
crypto look-up, and every state a crash can leave between stacking the crypto
bdev and exporting it (or between unexporting and unstacking) still converges
to no crypto bdev and no accel key in SPDK."""

from __future__ import annotations

import pytest
from controller_fixtures import block_cap, call, create_req, make_env, uuid_of
from encryption_fixtures import (
    MULTI,
    NODE,
    NODE_MODE,
    TARGET,
    crash_at,
    crypto_left,
    publish_req_of,
)

from csi_spdk import contract
from csi_spdk.proto import csi_pb2

PLAIN = {"auth": "none"}


@pytest.fixture
def env(tmp_path):
    e = make_env(tmp_path)
    yield e
    e.close()


class _StoreReads:
    """Counts the key store's reads (in Kubernetes each is an API call)."""

    def __init__(self, store, monkeypatch) -> None:
        self.n = 0
        real = store.get

        def get(uuid):
            self.n += 1
            return real(uuid)
        monkeypatch.setattr(store, "get", get)


def _create(env, name, params):
    return call(env.servicer, "CreateVolume",
                create_req(name, caps=[block_cap(MULTI)], params=params)).volume


def _unpublish(env, vol, node=NODE):
    call(env.servicer, "ControllerUnpublishVolume", csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=vol.volume_id, node_id=node))


def _delete(env, vol):
    call(env.servicer, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))


class _CryptoCalls:
    """The crypto calls the controller makes: look-ups of a crypto bdev, its
    delete, accel key destroys (an intent's own reads are not crypto calls)."""

    def __init__(self, env, monkeypatch) -> None:
        self.seen: list[str] = []
        api, real = env.t0.api, env.t0.api.call

        def call(method, params=None, timeout=None):
            name = (params or {}).get("name", "")
            if method in ("bdev_crypto_delete", "accel_crypto_key_destroy") or (
                    method == "bdev_get_bdevs" and name.startswith(contract.CRYPTO_PREFIX)):
                self.seen.append(method)
            return real(method, params, timeout)
        monkeypatch.setattr(api, "call", call)


@pytest.mark.parametrize("params", [PLAIN, NODE_MODE], ids=["none", "node"])
def test_unencrypted_on_the_target_last_unpublish_and_delete_look_nothing_up(
        env, params, monkeypatch):
    vol = _create(env, "v-plain", params)
    uuid = uuid_of(vol.volume_id)
    call(env.servicer, "ControllerPublishVolume", publish_req_of(vol))
    reads = _StoreReads(env.servicer.encryption.store, monkeypatch)
    calls = _CryptoCalls(env, monkeypatch)
    _unpublish(env, vol)
    assert env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid)) is None
    assert reads.n == 0, "key store read on the last unpublish"
    _delete(env, vol)     # reads the store it deletes from, asks SPDK nothing more
    assert env.t0.raw.bdev_get(uuid) is None
    assert calls.seen == []


def test_target_mode_last_unpublish_still_unstacks(env, monkeypatch):
    """The control: the same counters see the crypto clean-up when it is due."""
    vol = _create(env, "v-tgt", TARGET)
    uuid = uuid_of(vol.volume_id)
    call(env.servicer, "ControllerPublishVolume", publish_req_of(vol))
    assert crypto_left(env, uuid)[0] is not None and len(crypto_left(env, uuid)[1]) == 1
    calls = _CryptoCalls(env, monkeypatch)
    _unpublish(env, vol)
    assert "bdev_crypto_delete" in calls.seen and "accel_crypto_key_destroy" in calls.seen
    assert crypto_left(env, uuid) == (None, [])
    calls.seen.clear()
    _delete(env, vol)    # unpublished clean: the unclaimed lvol says nothing is stacked
    assert calls.seen == ["accel_crypto_key_destroy"]   # no crypto bdev look-up
    assert env.t0.raw.bdev_get(uuid) is None and crypto_left(env, uuid) == (None, [])


# mutating SPDK calls of a first target-mode publish: 1 accel key, 2 crypto bdev,
# 3 the export's subsystem, 4 one of namespace / listener / host (in parallel);
# "key": the controller died after the accel key, before the crypto bdev
# (after 4 the host may be allowed already: DeleteVolume is then refused as
# "still published", rightly, and the CO unpublishes first)
@pytest.mark.parametrize(("step", "then"), [("key", "unpublish"), ("key", "delete"),
                                            (3, "unpublish"), (3, "delete"), (4, "unpublish")])
def test_a_crash_between_stacking_and_exporting_converges(env, step, then):
    vol = _create(env, f"v-crash{step}", TARGET)
    uuid = uuid_of(vol.volume_id)
    if step == "key":
        key = env.servicer.encryption.store.get(uuid)
        env.t0.raw.call("accel_crypto_key_create", {
            "cipher": "AES_XTS", "key": key.key, "key2": key.key2,
            "name": contract.crypto_key_name(uuid, key.material)})
    else:
        crash_at(env, step, "ControllerPublishVolume", publish_req_of(vol))
    bdev, keys = crypto_left(env, uuid)
    assert len(keys) == 1 and (bdev is not None) == (step != "key"), (bdev, keys)
    if then == "unpublish":
        _unpublish(env, vol)          # the CO gives up on the attach
        assert crypto_left(env, uuid) == (None, [])
        assert env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid)) is None
        assert env.t0.raw.bdev_get(uuid)["claimed"] is False
    _delete(env, vol)
    assert env.t0.raw.bdev_get(uuid) is None and crypto_left(env, uuid) == (None, [])
    assert env.servicer.encryption.store.get(uuid) is None


def test_a_crash_between_unexport_and_unstack_converges_on_the_retry(env):
    vol = _create(env, "v-retry", TARGET)
    uuid = uuid_of(vol.volume_id)
    call(env.servicer, "ControllerPublishVolume", publish_req_of(vol))
    # as if the controller died after the subsystem delete, before the unstack
    env.t0.raw.subsystem_delete(contract.subsystem_nqn(uuid))
    assert crypto_left(env, uuid)[0] is not None
    _unpublish(env, vol)              # the retry: no subsystem, so it looks
    assert crypto_left(env, uuid) == (None, [])


def test_an_unpublish_from_every_node_looks_everything_up(env):
    """node_id empty deletes the subsystem without reading it: unknown, so
    the crypto bdev is looked up (and removed)."""
    vol = _create(env, "v-all", TARGET)
    uuid = uuid_of(vol.volume_id)
    call(env.servicer, "ControllerPublishVolume", publish_req_of(vol))
    call(env.servicer, "ControllerUnpublishVolume", csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=vol.volume_id))
    assert crypto_left(env, uuid) == (None, [])
