"""TLS PSKs in the Linux kernel's ``.nvme`` keyring, for the nvmet data plane.

nvmet-tcp (and the host's nvme-tcp) hand the TLS handshake to ``tlshd``,
which looks the PSK up in the ``.nvme`` keyring by its identity
``NVMe<v>R<hh> <hostnqn> <subsysnqn> ...``. nvme-cli derives the retained PSK
from the interchange form and inserts it (``nvme check-tls-key --insert``);
keyutils' ``keyctl`` lists and unlinks. The PSK is passed on the command line
of a short-lived process inside the test guest only, and never logged.
"""

from __future__ import annotations

import subprocess


class KeyringError(RuntimeError):
    pass


def insert_tls_psk(host_nqn: str, subsys_nqn: str, psk: str) -> None:
    proc = subprocess.run(["nvme", "check-tls-key", "--insert", "--keyring=.nvme",
                           f"--hostnqn={host_nqn}", f"--subsysnqn={subsys_nqn}",
                           "--identity=0", f"--keydata={psk}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise KeyringError(f"inserting the TLS PSK of {host_nqn} for {subsys_nqn} into the "
                           f".nvme keyring failed (nvme check-tls-key exit {proc.returncode})")


def _keyctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["keyctl", *args], capture_output=True, text=True)


def revoke_tls_psks(host_nqn: str, subsys_nqn: str) -> None:
    """Unlink the (host, subsystem) PSKs from ``.nvme`` (best effort)."""
    found = _keyctl("search", "@s", "keyring", ".nvme")
    ring = found.stdout.strip()
    if found.returncode != 0 or not ring:
        return
    for key_id in _keyctl("rlist", ring).stdout.split():
        desc = _keyctl("rdescribe", key_id).stdout.strip()
        if f" {host_nqn} {subsys_nqn} " in f"{desc} ":
            _keyctl("unlink", key_id, ring)
