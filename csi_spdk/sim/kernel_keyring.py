"""TLS PSKs in the Linux kernel's ``.nvme`` keyring, for the nvmet data plane.

nvmet-tcp (and the host's nvme-tcp) hand the TLS handshake to ``tlshd``,
which looks the PSK up in the ``.nvme`` keyring by its identity
``NVMe<v>R<hh> <hostnqn> <subsysnqn> ...``. The TLS PSK is derived from the
interchange form as SPDK derives it (``csi_spdk.tls_psk``) and added with
keyutils' ``keyctl`` (key bytes on stdin), which also lists and unlinks.
"""

from __future__ import annotations

import subprocess

from csi_spdk import tls_psk


class KeyringError(RuntimeError):
    pass


def insert_tls_psk(host_nqn: str, subsys_nqn: str, psk: str) -> None:
    """The TLS PSK SPDK derives from ``psk`` for (host, subsystem): not
    ``nvme check-tls-key --insert``, whose libnvme < 1.16 derives another one
    that SPDK refuses (csi_spdk/tls_psk.py), so a host that inserted that one
    is refused here too."""
    try:
        tls_psk.insert(psk, host_nqn, subsys_nqn)
    except (tls_psk.KeyringError, OSError, subprocess.SubprocessError) as e:
        raise KeyringError(f"inserting the TLS PSK of {host_nqn} for {subsys_nqn} into the "
                           f".nvme keyring failed ({type(e).__name__})") from None


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
