"""The TLS PSK an NVMe/TCP host and target use, and its place in ``.nvme``.

Why this is not ``nvme check-tls-key --insert``: the interchange key is a
*configured* PSK; both ends turn it into the TLS PSK with two HKDF steps
(NVMe/TCP spec 3.6.1.3, RFC 8446's HKDF-Expand-Label):

1. retained PSK = HKDF-Expand-Label(HKDF-Extract(0, configured), "HostNQN",
   <host NQN>, len) -- skipped when the key's hash field is 00;
2. TLS PSK = HKDF-Expand-Label(HKDF-Extract(0, retained), "nvme-tls-psk",
   <PSK identity>, len), identity ``NVMe0R<hh> <hostnqn> <subnqn>``.

SPDK v25.09 does exactly that (include/spdk_internal/nvme_tcp.h
nvme_tcp_derive_retained_psk / nvme_tcp_derive_tls_psk, called from
lib/nvmf/tcp.c nvmf_tcp_subsystem_add_host and tcp_sock_get_key).
libnvme before 1.16 (Debian 13 ships 1.13) built the HkdfLabel wrongly
(length little-endian, label and context without their length bytes; kept
as libnvme's ``*_compat`` functions since commit fde6b1f5), so the PSK that
Debian 13's ``nvme check-tls-key --insert`` puts into the keyring is not the
one SPDK derives and the handshake fails with a fatal alert. The node
therefore derives the TLS PSK itself and adds it with keyutils' ``keyctl``
(key type ``psk``, description = the identity the 6.12 host looks up),
the key bytes on stdin, never on a command line.
"""

from __future__ import annotations

import struct
import subprocess

from csi_spdk import nvme_keys

_HASHES = {1: "SHA256", 2: "SHA384"}     # the interchange format's hash id


class KeyringError(RuntimeError):
    """keyctl failed (the message names the step, never the key)."""


def _expand_label(secret: bytes, hash_id: int, label: str, context: bytes,
                  length: int) -> bytes:
    """HKDF-Extract(0, secret) then HKDF-Expand with RFC 8446's HkdfLabel."""
    # imported here: only a TLS volume needs it, and the node plugin's start-up
    # stays free of it (tests/unit/test_cli_imports.py)
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    full = b"tls13 " + label.encode()
    info = struct.pack("!H", length) + bytes([len(full)]) + full + bytes([len(context)]) + context
    algorithm = getattr(hashes, _HASHES[hash_id])()
    return HKDF(algorithm=algorithm, length=length, salt=None, info=info).derive(secret)


def identity(psk: nvme_keys.TlsPsk, host_nqn: str, subsys_nqn: str) -> str:
    """PSK identity version 0 (what Linux 6.12's nvme-tcp and SPDK look up)."""
    return f"NVMe0R{psk.hash_id:02d} {host_nqn} {subsys_nqn}"


def retained_psk(psk: nvme_keys.TlsPsk, host_nqn: str) -> bytes:
    return _expand_label(psk.psk, psk.hash_id, "HostNQN", host_nqn.encode(), len(psk.psk))


def tls_psk(psk: nvme_keys.TlsPsk, host_nqn: str, subsys_nqn: str) -> bytes:
    """The bytes TLS 1.3 uses as the external PSK for this (host, subsystem)."""
    return _expand_label(retained_psk(psk, host_nqn), psk.hash_id, "nvme-tls-psk",
                         identity(psk, host_nqn, subsys_nqn).encode(), len(psk.psk))


def _keyctl(args: list[str], data: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["keyctl", *args], input=data, capture_output=True, timeout=60,
                          check=False)


def insert(interchange: str, host_nqn: str, subsys_nqn: str, keyring: str = ".nvme") -> str:
    """Add (or replace) the TLS PSK in the kernel's ``.nvme`` keyring (or
    another by name); returns its serial. The keyring is found by name
    (``.nvme`` is in no session keyring)."""
    psk = nvme_keys.parse_tls_psk(interchange)
    proc = _keyctl(["padd", "psk", identity(psk, host_nqn, subsys_nqn), f"%keyring:{keyring}"],
                   tls_psk(psk, host_nqn, subsys_nqn))
    if proc.returncode != 0:
        raise KeyringError(f"keyctl padd psk into {keyring} failed (exit {proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode().strip()
