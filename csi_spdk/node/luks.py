"""Node-mode encryption: LUKS2 (cryptsetup, dm-crypt) between the NVMe
namespace and the filesystem or raw block device.

The volume's key arrives as the node-stage secret ``encryptionKey`` (128 hex
digits, controller/encryption.py); it is the LUKS2 passphrase of keyslot 0.
It reaches cryptsetup on its standard input (``--key-file -``), never in argv
(which /proc/<pid>/cmdline shows to every user) nor in a file.

Never reformat: ``open`` formats a device only when blkid finds nothing at all
on it (no filesystem, no partition table, no LUKS header, no other
signature); a device with a LUKS header is only ever opened, a wrong key is
FAILED_PRECONDITION and the header stays as it is; anything else on the device
is refused untouched.

The KDF is PBKDF2 at its minimum of 1000 iterations: the passphrase is 512
random bits, so key stretching adds no security, and Argon2's default 1 GiB
would not fit a small node (or the test guest).

Reconnect (``repoint``): when the kernel deleted the NVMe controller and
NodeGetVolumeStats connected it again, the namespace is a new block device
and the mapping still reads from the dead one. NodeGetVolumeStats has no
secrets, so the passphrase is not there; but the mapping was opened with
``--disable-keyring``, so its volume key is in its dm table: the table is read
(``dmsetup table --showkeys``), its device swapped for the new one's
major:minor and loaded again (``dmsetup reload`` on stdin, ``resume``): no
passphrase, the key never in argv, a log or an error.

Mapper names: ``csi-spdk-<sha256(volume id)[:40]>``, so stage, publish,
expand and unstage find the device from the volume id alone, after a restart
too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
from collections.abc import Callable

from .. import contract
from ..errors import FailedPrecondition, Internal
from .mount import Mounter, Probe

log = logging.getLogger("csi_spdk.luks")
MAPPER_DIR = "/dev/mapper"
_TIMEOUT = 120.0
_HEX = re.compile(r"^[0-9a-fA-F]{128}$")
# cryptsetup's exit codes (man cryptsetup, RETURN CODES)
_WRONG_KEY = 2          # "No key available with this passphrase."
_BUSY = 5               # device already exists or busy


def mapper_name(volume_id: str) -> str:
    return "csi-spdk-" + hashlib.sha256(volume_id.encode()).hexdigest()[:40]


def key_from_secrets(secrets: dict[str, str]) -> str:
    """The passphrase from the node-stage secrets; FAILED_PRECONDITION (naming the
    key, never a value) when it is missing or malformed."""
    key = (secrets.get(contract.SECRET_ENCRYPTION_KEY) or "").strip()
    if not key:
        raise FailedPrecondition(
            f"the volume is encrypted (encryption: node) but the node-stage secret has no "
            f"{contract.SECRET_ENCRYPTION_KEY!r}: the StorageClass's "
            "csi.storage.k8s.io/node-stage-secret-name must name the volume's Secret "
            "(csi-spdk-auth-${pv.name})")
    if not _HEX.match(key):
        raise FailedPrecondition(f"the node-stage secret's {contract.SECRET_ENCRYPTION_KEY!r} "
                                 "is not a volume encryption key (128 hex digits)")
    return key.lower()


Runner = Callable[..., subprocess.CompletedProcess]


class Luks:
    """cryptsetup for one node. ``run`` (tests pass a fake) has subprocess.run's
    signature; ``probe`` is ``Mounter.probe``."""

    def __init__(self, probe: Callable[[str], Probe], run: Runner = subprocess.run,
                 mapper_dir: str = MAPPER_DIR,
                 devno: Callable[[str], str] = Mounter.device_number) -> None:
        self.probe = probe
        self.devno = devno
        self._run = run
        self.mapper_dir = mapper_dir

    def path(self, name: str) -> str:
        return os.path.join(self.mapper_dir, name)

    def _tool(self, argv: list[str], what: str, stdin: str) -> subprocess.CompletedProcess:
        """Run cryptsetup or dmsetup with ``stdin`` (a key or a table: never on
        the command line); a missing tool or a hang is INTERNAL naming ``what``."""
        try:
            return self._run(argv, input=stdin, capture_output=True, text=True,
                             timeout=_TIMEOUT, check=False)
        except FileNotFoundError as err:
            raise Internal(f"{argv[0]} is not installed on this node ({what})") from err
        except subprocess.TimeoutExpired as err:
            raise Internal(f"{what}: {argv[0]} {argv[1]} did not finish in "
                           f"{_TIMEOUT:.0f}s") from err

    def _cryptsetup(self, args: list[str], what: str, key: str | None = None,
                    ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
        argv = ["cryptsetup", *args] + (["--key-file", "-"] if key is not None else [])
        res = self._tool(argv, what, key if key is not None else "")
        if res.returncode not in ok:
            raise Internal(f"{what} failed: cryptsetup {' '.join(args)} (exit "
                           f"{res.returncode}): {(res.stderr or res.stdout).strip()[:500]}")
        return res

    def backing_device(self, name: str) -> str | None:
        """The device under an open mapping (``cryptsetup status``), None if closed."""
        res = self._cryptsetup(["status", name], f"reading LUKS mapping {name}", ok=(0, 4))
        if res.returncode != 0:
            return None
        for line in res.stdout.splitlines():
            field, _, value = line.strip().partition(":")
            if field == "device":
                return value.strip()
        return None

    def open(self, device: str, name: str, key: str, readonly: bool = False) -> str:
        """The mapper device of ``device`` opened with ``key``; formats LUKS2 only
        on a device that carries nothing at all. Idempotent."""
        current = self.backing_device(name)
        if current is not None:
            if os.path.realpath(current) == os.path.realpath(device):
                return self.path(name)
            # our mapping over a device that was replaced (reconnect): reopen
            log.warning("LUKS mapping over a replaced device; reopening", extra={"f": {
                "mapping": name, "old": current, "new": device}})
            self.close(name)
        found = self.probe(device)
        if found.empty:
            if readonly:
                raise FailedPrecondition(f"read-only volume on {device} has no LUKS header "
                                         "and cannot be formatted")
            self._cryptsetup(["luksFormat", "--type", "luks2", "--batch-mode",
                              "--cipher", "aes-xts-plain64", "--key-size", "512",
                              "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
                              device], f"formatting {device} as LUKS2", key=key)
            log.info("LUKS2 formatted", extra={"f": {"device": device}})
        elif found.fstype != "crypto_LUKS":
            raise FailedPrecondition(f"{device} holds {found.describe()}, not a LUKS volume; "
                                     "refusing to format an encrypted volume over it")
        # --disable-keyring: the volume key stays in the dm table, so a resize
        # needs no passphrase (NodeExpandVolume has no secret unless the
        # StorageClass names a node-expand secret)
        args = ["open", "--type", "luks2", "--disable-keyring",
                *(["--readonly"] if readonly else []), device, name]
        res = self._cryptsetup(args, f"opening LUKS on {device}", key=key,
                               ok=(0, _WRONG_KEY, _BUSY))
        if res.returncode == _WRONG_KEY:
            raise FailedPrecondition(
                f"the encryption key in the node-stage secret does not open the LUKS2 "
                f"header on {device} (wrong Secret, or a key changed after the volume "
                "was formatted); nothing was changed")
        if res.returncode == _BUSY and self.backing_device(name) is None:
            raise Internal(f"opening LUKS on {device}: mapping {name} is busy")
        return self.path(name)

    def _dmsetup(self, args: list[str], what: str, table: str = "",
                 ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
        res = self._tool(["dmsetup", *args], what, table)
        if res.returncode not in ok:
            said = (res.stderr or "").strip()[:300]
            for word in table.split():      # the table holds the volume key
                if len(word) >= 32:
                    said = said.replace(word, "<key>")
            raise Internal(f"{what} failed: dmsetup {args[0]} {args[-1]} (exit "
                           f"{res.returncode}): {said}")
        return res

    def repoint(self, name: str, device: str) -> bool:
        """Make the open mapping ``name`` read from ``device`` (its namespace,
        reconnected as a new block device) with a dm table reload: the key
        stays the one in the table (module docstring: no secrets here).
        False when the mapping is not open (only a restage opens it)."""
        res = self._dmsetup(["table", "--showkeys", name], f"reading LUKS mapping {name}",
                            ok=(0, 1))
        fields = res.stdout.split() if res.returncode == 0 else []
        if not fields:
            return False
        if len(fields) < 8 or fields[2] != "crypt":
            raise Internal(f"mapping {name} is not one dm-crypt segment; stage the volume "
                           "again")
        want = self.devno(device)
        if fields[6] == want:
            return True
        fields[6] = want
        what = f"pointing LUKS mapping {name} at {device}"
        self._dmsetup(["reload", name], what, table=" ".join(fields) + "\n")
        self._dmsetup(["resume", name], what)
        log.warning("LUKS mapping reloaded onto the reconnected device", extra={"f": {
            "mapping": name, "device": device}})
        return True

    def close(self, name: str) -> None:
        """Close the mapping (missing is success)."""
        if self.backing_device(name) is None:
            return
        self._cryptsetup(["close", name], f"closing LUKS mapping {name}", ok=(0, 4))

    def resize(self, name: str, key: str | None = None) -> None:
        """Grow the mapping to its (grown) backing device. ``key``: when given,
        on stdin (a mapping whose volume key is in the kernel keyring needs it)."""
        self._cryptsetup(["resize", name], f"resizing LUKS mapping {name}", key=key)
