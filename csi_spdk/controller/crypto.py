"""Target-mode encryption: SPDK's AES-XTS crypto bdev stacked on a volume's lvol.

``stack`` puts the volume's key into SPDK's accel framework
(``accel_crypto_key_create``, AES-XTS-256: key and key2 are the halves of
the volume key) and opens ``csie-<lvol uuid>`` over the lvol
(``bdev_crypto_create``); export.py then exports that bdev under the lvol's
uuid instead of the lvol. ``unstack`` deletes the bdev and then the key
(``bdev_crypto_delete``, ``accel_crypto_key_destroy``): SPDK destroys a key a
crypto bdev still uses without complaint (tests/contract/data/
crypto_v25.09.json), so the order matters.

Snapshots and clones stay at the lvol layer (they hold ciphertext); a clone
is stacked with its source's key, which its own Secret got a copy of.

Idempotent and crash-safe: every step first reads what is there. A key name
carries 8 hex digits of the key's SHA-256, so "a key of this name exists"
means "this key exists". SPDK accepts ``bdev_crypto_create`` on a base that
does not exist (it defers the vbdev, and ``bdev_crypto_delete`` cannot remove
the deferral), so the lvol is looked up first.
"""

from __future__ import annotations

import contextlib
import logging

from .. import contract
from ..errors import FailedPrecondition, NotFound
from ..spdk.api import SpdkApi
from ..spdk.errors import SpdkError, SpdkNotFound

log = logging.getLogger("csi_spdk.crypto")
CIPHER = "AES_XTS"


def _key_name_of(bdev: dict | None) -> str:
    return ((bdev or {}).get("driver_specific") or {}).get("crypto", {}).get("key_name", "")


def stack(api: SpdkApi, lvol_uuid: str, key: str, key2: str, material: str) -> str:
    """The crypto bdev over the lvol, opened with this key; returns its name."""
    name = contract.crypto_bdev_name(lvol_uuid)
    key_name = contract.crypto_key_name(lvol_uuid, material)
    bdev = api.bdev_get(name)
    if bdev is not None:
        if _key_name_of(bdev) != key_name:
            raise FailedPrecondition(
                f"volume {lvol_uuid} is open on the target with another encryption key "
                "(was its Secret replaced?); unpublish it everywhere first")
        return name
    if api.bdev_get(lvol_uuid) is None:
        raise NotFound(f"volume {lvol_uuid} does not exist")
    try:
        api.call("accel_crypto_key_create", {"cipher": CIPHER, "key": key, "key2": key2,
                                             "name": key_name})
    except SpdkError as err:
        if "rc -17" not in err.spdk_message:   # "failed to create DEK, rc -17": exists
            raise
    create = {"base_bdev_name": lvol_uuid, "name": name, "key_name": key_name}
    try:
        api.call("bdev_crypto_create", create)
    except SpdkError:
        if _key_name_of(api.bdev_get(name)) != key_name:
            try:
                _release_claim(api, lvol_uuid)
                api.call("bdev_crypto_create", create)
            except BaseException:
                # no crypto bdev: no key of it left in SPDK either (the
                # unexport that follows a refused publish reads nothing stacked)
                with contextlib.suppress(SpdkError):
                    api.call("accel_crypto_key_destroy", {"key_name": key_name})
                raise
    log.info("crypto bdev stacked", extra={"f": {"bdev": name}})
    return name


def _release_claim(api: SpdkApi, lvol_uuid: str) -> None:
    """bdev_crypto_create failed: when the claim on the lvol is the driver's
    own QoS hold (qos.py: the volume's subsystem with the lvol as namespace and
    no host; a crash leaves one behind), delete it so the crypto bdev can claim
    the lvol. Nothing is lost: nobody could connect to it, and the export that
    follows makes the subsystem again over the crypto bdev, which keeps the
    lvol open just the same. Any other claim is FAILED_PRECONDITION saying
    what holds it; a subsystem that lets a host read the lvol in clear is never
    touched (a person has to look at it)."""
    nqn = contract.subsystem_nqn(lvol_uuid)
    sub = api.subsystem_get(nqn)
    on_lvol = sub is not None and any(ns.get("bdev_name") == lvol_uuid
                                      for ns in sub.get("namespaces", []))
    if on_lvol and (sub.get("hosts") or sub.get("allow_any_host")):
        raise FailedPrecondition(
            f"volume {lvol_uuid} is encrypted on the target, but subsystem {nqn} exports its "
            "lvol unencrypted to hosts; refusing to stack the crypto bdev under it: unpublish "
            "the volume from every node (or delete that subsystem) and publish again")
    if on_lvol:
        log.info("QoS hold left on an encrypted volume released before stacking",
                 extra={"f": {"nqn": nqn}})
        api.intent("unexport", {"uuid": lvol_uuid, "hosts": [], "all": True})
        return
    lvol = api.bdev_get(lvol_uuid) or {}
    if lvol.get("claimed"):
        raise FailedPrecondition(
            f"volume {lvol_uuid} cannot be opened encrypted: another SPDK consumer holds its "
            f"lvol ({lvol.get('claim_type', 'claimed')}; see bdev_get_bdevs on the target); "
            "remove that consumer and publish again")


def unstack(api: SpdkApi, lvol_uuid: str, material: str = "") -> None:
    """No crypto bdev and no accel key of the volume left (missing is success).
    ``material``: the volume's key, to name a key whose bdev is already gone."""
    name = contract.crypto_bdev_name(lvol_uuid)
    bdev = api.bdev_get(name)
    keys = {contract.crypto_key_name(lvol_uuid, material)} if material else set()
    if bdev is not None:
        keys.add(_key_name_of(bdev))
        with contextlib.suppress(SpdkNotFound):
            api.call("bdev_crypto_delete", {"name": name})
    for key_name in sorted(k for k in keys if k):
        destroy_key(api, key_name)


def destroy_key(api: SpdkApi, key_name: str) -> None:
    """``accel_crypto_key_destroy``; a missing key is success."""
    try:
        api.call("accel_crypto_key_destroy", {"key_name": key_name})
    except SpdkError as err:
        if "No key object found" not in err.spdk_message:
            raise


def bdev_of(api: SpdkApi, lvol_uuid: str) -> str | None:
    """The name of the volume's crypto bdev when one is open."""
    name = contract.crypto_bdev_name(lvol_uuid)
    return name if api.bdev_get(name) is not None else None
