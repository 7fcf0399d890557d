"""The kernel data plane of a namespace on a crypto bdev (sim/crypto.py): the
lvol's backing file through a loop device and a plain dm-crypt mapping with
the crypto key's material, ``aes-xts-plain64`` with key||key2 (512-bit XTS
key, 512-byte sectors), served by nvmet as a block device. The lvol's file
then holds real ciphertext, as the lvol under SPDK's crypto bdev does.

Not byte-compatible with SPDK: checked against a real spdk_tgt v25.09
(software accel module, ISA-L crypto; see docs/DESIGN.md), SPDK's
``SIMPLE_LBA`` tweak is the 128-bit little-endian value with the LBA in its
HIGH 64 bits (``iv[0] = 0; iv[1] = lba`` in lib/accel/accel_sw.c), while
dm-crypt's ``plain64`` puts the sector number in the LOW 64 bits and
``plain64be`` puts it big-endian at the end; no dm-crypt IV mode gives SPDK's
tweak. Sector 0 is identical, every other sector differs. Same key, same
cipher, same data unit: only the tweak layout differs.

The key reaches cryptsetup on stdin (``--key-file -``), never in argv.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import subprocess

from .dataplane import NamespaceInfo

log = logging.getLogger(__name__)
_TIMEOUT = 60


class CryptError(RuntimeError):
    pass


def _run(argv: list[str], data: bytes | None = None) -> str:
    try:
        res = subprocess.run(argv, input=data, capture_output=True, timeout=_TIMEOUT,
                             check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise CryptError(f"{argv[0]} {argv[1]}: {err}") from err
    if res.returncode != 0:
        raise CryptError(f"{' '.join(argv[:3])} failed (exit {res.returncode}): "
                         f"{res.stderr.decode(errors='replace').strip()[:300]}")
    return res.stdout.decode().strip()


class CryptMappings:
    """(nqn, nsid) -> (loop device, dm name) of encrypted namespaces."""

    def __init__(self) -> None:
        self.open_: dict[tuple[str, int], tuple[str, str]] = {}

    @staticmethod
    def name(nqn: str, nsid: int) -> str:
        return "csim-" + hashlib.sha256(f"{nqn}/{nsid}".encode()).hexdigest()[:32]

    def open(self, ns: NamespaceInfo) -> str:
        """The dm-crypt device to serve for ``ns`` (idempotent)."""
        key = (ns.nqn, ns.nsid)
        if key in self.open_:
            return f"/dev/mapper/{self.open_[key][1]}"
        assert ns.crypto is not None and ns.path
        material = bytes.fromhex(ns.crypto.key) + bytes.fromhex(ns.crypto.key2)
        loop = _run(["losetup", "--find", "--show", ns.path])
        name = self.name(ns.nqn, ns.nsid)
        try:
            # --hash plain: cryptsetup hashes a plain-mode key read from stdin
            # like a typed passphrase; the material must be the XTS key itself
            _run(["cryptsetup", "open", "--type", "plain", "--hash", "plain",
                  "--cipher", "aes-xts-plain64",
                  "--key-size", str(len(material) * 8), "--sector-size", "512",
                  "--key-file", "-", "--keyfile-size", str(len(material)), loop, name],
                 material)
        except CryptError:
            with contextlib.suppress(CryptError):
                _run(["losetup", "-d", loop])
            raise
        self.open_[key] = (loop, name)
        return f"/dev/mapper/{name}"

    def close(self, nqn: str, nsid: int) -> None:
        entry = self.open_.pop((nqn, nsid), None)
        if entry is None:
            return
        loop, name = entry
        for argv in (["cryptsetup", "close", name], ["losetup", "-d", loop]):
            try:
                _run(argv)
            except CryptError as err:
                log.warning("nvmet: %s", err)

    def close_subsystem(self, nqn: str) -> None:
        for key in [k for k in self.open_ if k[0] == nqn]:
            self.close(*key)

    def resize(self, ns: NamespaceInfo) -> None:
        """The lvol's file grew: the loop device, then the mapping follow."""
        entry = self.open_.get((ns.nqn, ns.nsid))
        if entry is not None:
            _run(["losetup", "--set-capacity", entry[0]])
            _run(["cryptsetup", "resize", entry[1]])

    def close_all(self) -> None:
        for key in list(self.open_):
            self.close(*key)
