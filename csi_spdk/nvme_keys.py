"""NVMe key formats: DH-HMAC-CHAP secrets and TLS pre-shared keys.

Both are the textual forms every NVMe implementation reads (nvme-cli, the
Linux host and nvmet, SPDK's keyring):

* DH-HMAC-CHAP (NVMe base spec 8.13.5.8, ``nvme gen-dhchap-key``):
  ``DHHC-1:<hh>:<base64(key || crc32(key) little-endian)>:`` where ``hh`` is
  the key transformation hash (00 none, 01 SHA-256, 02 SHA-384, 03 SHA-512)
  and the key is 32, 48 or 64 bytes (exactly the hash length when hh != 00).
* TLS PSK interchange format (NVMe/TCP spec 3.6.1.5, ``nvme gen-tls-key``):
  ``NVMeTLSkey-1:<hh>:<base64(psk || crc32(psk) little-endian)>:`` with hh 01
  (SHA-256, 32-byte PSK) or 02 (SHA-384, 48-byte PSK).

The CRC is the ordinary CRC-32 (zlib's; the kernel computes
``~crc32(~0, key)``). Keys come from ``secrets`` (the OS CSPRNG). The classes
keep their material out of ``repr``/``str`` so a key never reaches a log line
by accident: call ``.text`` to get it.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import zlib
from dataclasses import dataclass, field

DHCHAP_HASH_IDS = {"none": 0, "sha256": 1, "sha384": 2, "sha512": 3}
DHCHAP_KEY_LENGTHS = (32, 48, 64)
HASH_LENGTHS = {1: 32, 2: 48, 3: 64}
TLS_HASH_IDS = {"sha256": 1, "sha384": 2}

_DHCHAP_RE = re.compile(r"^DHHC-1:([0-9a-fA-F]{2}):([A-Za-z0-9+/=]+):$")
_TLS_RE = re.compile(r"^NVMeTLSkey-1:([0-9a-fA-F]{2}):([A-Za-z0-9+/=]+):$")


class KeyFormatError(ValueError):
    """A string is not a well-formed key (the message never contains the key)."""


def _pack(raw: bytes) -> str:
    return base64.b64encode(raw + zlib.crc32(raw).to_bytes(4, "little")).decode()


def _unpack(b64: str, kind: str) -> bytes:
    try:
        blob = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError(f"{kind}: the key part is not base64") from None
    if len(blob) < 5:
        raise KeyFormatError(f"{kind}: too short")
    raw, crc = blob[:-4], int.from_bytes(blob[-4:], "little")
    if zlib.crc32(raw) != crc:
        raise KeyFormatError(f"{kind}: CRC-32 mismatch (mistyped or truncated key)")
    return raw


@dataclass(frozen=True)
class DhchapKey:
    """A DH-HMAC-CHAP secret in ``DHHC-1`` form."""

    hash_id: int
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if self.hash_id not in (0, 1, 2, 3):
            raise KeyFormatError(f"DH-HMAC-CHAP: unknown hash id {self.hash_id:02x}")
        if len(self.key) not in DHCHAP_KEY_LENGTHS:
            raise KeyFormatError(f"DH-HMAC-CHAP: key length {len(self.key)} is not 32, 48 "
                                 "or 64 bytes")
        if self.hash_id and len(self.key) != HASH_LENGTHS[self.hash_id]:
            raise KeyFormatError(f"DH-HMAC-CHAP: hash id {self.hash_id:02x} needs a "
                                 f"{HASH_LENGTHS[self.hash_id]}-byte key, not {len(self.key)}")

    @property
    def text(self) -> str:
        return f"DHHC-1:{self.hash_id:02x}:{_pack(self.key)}:"

    def __str__(self) -> str:
        return f"<DH-HMAC-CHAP key, hash {self.hash_id:02x}, {len(self.key)} bytes>"


@dataclass(frozen=True)
class TlsPsk:
    """A TLS pre-shared key in the NVMe TLS PSK interchange format."""

    hash_id: int
    psk: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if self.hash_id not in HASH_LENGTHS or self.hash_id == 3:
            raise KeyFormatError(f"TLS PSK: unknown hash id {self.hash_id:02x}")
        if len(self.psk) != HASH_LENGTHS[self.hash_id]:
            raise KeyFormatError(f"TLS PSK: hash id {self.hash_id:02x} needs a "
                                 f"{HASH_LENGTHS[self.hash_id]}-byte PSK, not {len(self.psk)}")

    @property
    def text(self) -> str:
        return f"NVMeTLSkey-1:{self.hash_id:02x}:{_pack(self.psk)}:"

    def __str__(self) -> str:
        return f"<NVMe TLS PSK, hash {self.hash_id:02x}>"


def generate_dhchap_key(hash_name: str = "none", length: int = 32) -> DhchapKey:
    """A fresh random DH-HMAC-CHAP secret. ``hash_name``: the key transformation
    hash (none, sha256, sha384, sha512); with a hash, ``length`` is its size."""
    if hash_name not in DHCHAP_HASH_IDS:
        raise KeyFormatError(f"DH-HMAC-CHAP: unknown hash {hash_name!r} "
                             f"(one of {', '.join(DHCHAP_HASH_IDS)})")
    hash_id = DHCHAP_HASH_IDS[hash_name]
    if hash_id:
        length = HASH_LENGTHS[hash_id]
    return DhchapKey(hash_id, secrets.token_bytes(length))


def generate_tls_psk(hash_name: str = "sha256") -> TlsPsk:
    """A fresh random TLS PSK (configured PSK, interchange format)."""
    if hash_name not in TLS_HASH_IDS:
        raise KeyFormatError(f"TLS PSK: unknown hash {hash_name!r} (sha256 or sha384)")
    hash_id = TLS_HASH_IDS[hash_name]
    return TlsPsk(hash_id, secrets.token_bytes(HASH_LENGTHS[hash_id]))


def parse_dhchap_key(text: str) -> DhchapKey:
    """Validate ``DHHC-1:hh:...:`` (CRC included); KeyFormatError says what is wrong."""
    m = _DHCHAP_RE.match(text.strip())
    if not m:
        raise KeyFormatError("DH-HMAC-CHAP: not of the form DHHC-1:<hh>:<base64>:")
    return DhchapKey(int(m.group(1), 16), _unpack(m.group(2), "DH-HMAC-CHAP"))


def parse_tls_psk(text: str) -> TlsPsk:
    """Validate ``NVMeTLSkey-1:hh:...:`` (CRC included)."""
    m = _TLS_RE.match(text.strip())
    if not m:
        raise KeyFormatError("TLS PSK: not of the form NVMeTLSkey-1:<hh>:<base64>:")
    return TlsPsk(int(m.group(1), 16), _unpack(m.group(2), "TLS PSK"))
