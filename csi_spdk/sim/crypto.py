"""accel crypto keys and the crypto vbdev, as SPDK v25.09 with the software
accel module (ISA-L crypto) answers them (tests/contract/data/crypto_v25.09.json).

What the recording showed and this module reproduces:

* ``accel_crypto_key_create``: a missing ``cipher``/``key``/``name`` is
  -32700 "spdk_json_decode_object failed"; every refused key is -32602
  "failed to create DEK, rc -22" (key == key2, different lengths, no key2,
  sizes the software module lacks (only 16- and 32-byte AES-XTS halves), bad
  hex, an unknown cipher, a tweak mode other than SIMPLE_LBA); a taken name
  is "rc -17".
* ``accel_crypto_keys_get`` lists the material in clear (``tweak_mode`` only
  when it was given): the agent never forwards it.
* ``accel_crypto_key_destroy`` does NOT refuse a key a crypto bdev uses.
* ``bdev_crypto_create``: an unknown key is -32602 "Key was not found", none
  at all -32603 "No key was found", a taken name -17, a claimed base -1 "Operation
  not permitted"; a missing base bdev is accepted (SPDK defers the vbdev until
  the base arrives, and ``bdev_crypto_delete`` cannot remove the deferral): the
  driver checks the base first. The bdev's uuid is SHA-1 (v5) of the base's
  uuid in SPDK's crypto namespace; an nvmf namespace on it takes its nguid.
* it follows a resize of its base; deleting the base (even a claimed lvol)
  hot-removes it; ``bdev_crypto_delete`` of an exported one drops the namespace.

The data plane gets the key material with the namespace (``CryptoInfo``) so
that it can really encrypt (``sim/nvmet.py``: dm-crypt in the guest).
"""

from __future__ import annotations

import hashlib
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .bdev import Bdev, io_types
from .dataplane import CryptoInfo
from .state import EEXIST, ENODEV, EPERM, RpcError, errno_error

if TYPE_CHECKING:
    from .state import SimState

CRYPTO_NAMESPACE = uuidlib.UUID("078e3cf7-f4b4-4545-b2c3-d40045a64ae2")  # vbdev_crypto.c
XTS_KEY_BYTES = (16, 32)     # AES-XTS-128 / -256 halves the software module takes
TWEAK_MODES = ("SIMPLE_LBA", "JOIN_NEG_LBA_WITH_LBA", "INCR_512_FULL_LBA",
               "INCR_512_UPPER_LBA")
CIPHERS = ("AES_CBC", "AES_XTS")
ACCEL_DOMAIN = [{"dma_device_id": "SPDK_ACCEL_DMA_DEVICE", "dma_device_type": 2}]


@dataclass
class CryptoKey:
    name: str
    cipher: str
    key: str = field(repr=False)
    key2: str = field(default="", repr=False)
    tweak_mode: str | None = None

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "cipher": self.cipher, "key": self.key}
        if self.key2:
            out["key2"] = self.key2
        if self.tweak_mode is not None:
            out["tweak_mode"] = self.tweak_mode
        return out


def _dek_error(err: int) -> RpcError:
    return RpcError(-32602, f"failed to create DEK, rc -{err}")


def _unhex(text: str) -> bytes | None:
    try:
        return bytes.fromhex(text) if len(text) % 2 == 0 else None
    except ValueError:
        return None


class CryptoBdev(Bdev):
    product_name = "crypto"
    supported = io_types("read", "write", "unmap", "reset", "write_zeroes")
    has_memory_domains = False

    def __init__(self, state: SimState, name: str, base: Bdev, key: CryptoKey) -> None:
        digest = hashlib.sha1(CRYPTO_NAMESPACE.bytes + uuidlib.UUID(base.uuid).bytes).digest()
        super().__init__(state, name, base.block_size, base.num_blocks,
                         str(uuidlib.UUID(bytes=digest[:16], version=5)))
        self.base = base
        self.key = key

    def crypto_info(self) -> CryptoInfo:
        return CryptoInfo(self.key.cipher, self.key.key, self.key.key2)

    def json(self) -> dict[str, Any]:
        out = super().json()
        out.pop("driver_specific")
        out["memory_domains"] = [dict(d) for d in ACCEL_DOMAIN]
        out["driver_specific"] = {"crypto": {"base_bdev_name": self.base.name,
                                             "name": self.name,
                                             "key_name": self.key.name}}
        return out


class Crypto:
    """The target's accel crypto keys and crypto vbdevs."""

    def __init__(self, state: SimState) -> None:
        self.state = state
        self.keys: list[CryptoKey] = []
        self.deferred: dict[str, str] = {}    # vbdev name -> missing base name

    def key(self, name: str) -> CryptoKey | None:
        return next((k for k in self.keys if k.name == name), None)

    def bdevs(self) -> list[CryptoBdev]:
        return [b for b in self.state.bdevs if isinstance(b, CryptoBdev)]

    # --- keys --------------------------------------------------------------
    def key_create(self, p: dict[str, Any]) -> bool:
        cipher = p["cipher"]
        if cipher not in CIPHERS:
            raise _dek_error(22)
        tweak = p.get("tweak_mode")
        if tweak is not None and tweak not in TWEAK_MODES:
            raise _dek_error(22)
        if self.key(p["name"]) is not None:
            raise _dek_error(17)
        key, key2 = _unhex(p["key"]), _unhex(p.get("key2", "")) if "key2" in p else b""
        if key is None or key2 is None:
            raise _dek_error(22)
        if cipher == "AES_XTS" and (not key2 or len(key) != len(key2) or key == key2):
            raise _dek_error(22)
        if tweak not in (None, "SIMPLE_LBA"):
            raise _dek_error(22)     # the software module has SIMPLE_LBA only
        # the software module: AES-XTS with 128/256-bit halves, no AES-CBC
        if cipher != "AES_XTS" or len(key) not in XTS_KEY_BYTES:
            raise _dek_error(22)
        self.keys.append(CryptoKey(p["name"], cipher, p["key"], p.get("key2", ""), tweak))
        return True

    def keys_get(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        if "key_name" in p:
            k = self.key(p["key_name"])
            if k is None:
                raise RpcError(-32602, "key was not found")
            return [k.json()]
        return [k.json() for k in self.keys]

    def key_destroy(self, p: dict[str, Any]) -> bool:
        k = self.key(p["key_name"])
        if k is None:
            raise RpcError(-32602, "No key object found")
        self.keys.remove(k)     # in use or not: SPDK does not check
        return True

    # --- vbdevs ------------------------------------------------------------
    def create(self, p: dict[str, Any]) -> str:
        if "key_name" not in p:
            raise RpcError(-32603, "No key was found")
        key = self.key(p["key_name"])
        if key is None:
            raise RpcError(-32602, "Key was not found")
        name = p["name"]
        if self.state.find_bdev(name) is not None or name in self.deferred:
            raise errno_error(EEXIST)
        base = self.state.find_bdev(p["base_bdev_name"])
        if base is None:
            self.deferred[name] = p["base_bdev_name"]
            return name
        if base.claim_type is not None:
            raise errno_error(EPERM)
        bdev = CryptoBdev(self.state, name, base, key)
        base.claim_type = "exclusive_write"
        # the examine of the new vbdev opens an I/O channel on the base: QoS
        # already enabled there starts running and stays while the vbdev
        # keeps its descriptor open (sim/qos.py)
        base.qos_thread = base.qos_active
        self.state.register_bdev(bdev)
        return name

    def delete(self, p: dict[str, Any]) -> bool:
        bdev = self.state.find_bdev(p["name"])
        if not isinstance(bdev, CryptoBdev):
            raise errno_error(ENODEV)
        self._remove(bdev)
        return True

    def _remove(self, bdev: CryptoBdev) -> None:
        self.state.unregister_bdev(bdev)
        bdev.base.claim_type = None
        bdev.base.qos_thread = False      # its last descriptor closed (bdev_qos_destroy)

    # --- hooks from the bdev layer ----------------------------------------
    def base_removed(self, base: Bdev) -> None:
        for bdev in self.bdevs():
            if bdev.base is base:
                self.state.unregister_bdev(bdev)

    def base_resized(self, base: Bdev) -> None:
        for bdev in self.bdevs():
            if bdev.base is base and bdev.num_blocks != base.num_blocks:
                bdev.num_blocks = base.num_blocks
                self.state.nvmf.bdev_resized(bdev)
