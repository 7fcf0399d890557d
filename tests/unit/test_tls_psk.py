"""TLS PSK derivation (csi_spdk/tls_psk.py) as SPDK v25.09 does it
(include/spdk_internal/nvme_tcp.h nvme_tcp_derive_retained_psk /
nvme_tcp_derive_tls_psk): recomputed here from RFC 5869 with hmac directly,
with the HkdfLabel laid out byte by byte, and shown to differ from the
derivation of libnvme < 1.16 (Debian 13's ``nvme check-tls-key --insert``),
which SPDK refuses. The guest TLS test proves both against the real kernel,
tlshd and spdk_tgt."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest

from csi_spdk import nvme_keys, tls_psk

HOST = "nqn.2024-11.io.csi-spdk:node:n1"
SUB = "nqn.2024-11.io.csi-spdk:vol:0b5e"


def _hkdf(md, key: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(b"\0" * md().digest_size, key, md).digest()        # extract, zero salt
    out, t, i = b"", b"", 1
    while len(out) < length:
        t = hmac.new(prk, t + info + bytes([i]), md).digest()
        out, i = out + t, i + 1
    return out[:length]


def _label(length: int, label: bytes, ctx: bytes) -> bytes:          # RFC 8446 HkdfLabel
    return struct.pack(">H", length) + bytes([len(label)]) + label + bytes([len(ctx)]) + ctx


@pytest.mark.parametrize("hash_name,md", [("sha256", hashlib.sha256), ("sha384", hashlib.sha384)])
def test_derivation_is_spdks(hash_name, md):
    psk = nvme_keys.generate_tls_psk(hash_name)
    n = len(psk.psk)
    ident = f"NVMe0R{psk.hash_id:02d} {HOST} {SUB}"
    assert tls_psk.identity(psk, HOST, SUB) == ident
    retained = _hkdf(md, psk.psk, _label(n, b"tls13 HostNQN", HOST.encode()), n)
    assert tls_psk.retained_psk(psk, HOST) == retained
    want = _hkdf(md, retained, _label(n, b"tls13 nvme-tls-psk", ident.encode()), n)
    assert tls_psk.tls_psk(psk, HOST, SUB) == want


def test_not_libnvme_compat_derivation():
    """libnvme < 1.16: length little-endian, label and context without length
    bytes (kept as its *_compat functions): a different key, refused by SPDK."""
    psk = nvme_keys.generate_tls_psk()
    n = len(psk.psk)
    ident = tls_psk.identity(psk, HOST, SUB)
    retained = _hkdf(hashlib.sha256, psk.psk,
                     struct.pack("<H", n) + b"tls13 HostNQN" + HOST.encode(), n)
    compat = _hkdf(hashlib.sha256, retained,
                   struct.pack("<H", n) + b"tls13 nvme-tls-psk" + ident.encode(), n)
    assert tls_psk.tls_psk(psk, HOST, SUB) != compat


def test_per_host_and_subsystem():
    psk = nvme_keys.generate_tls_psk()
    a = tls_psk.tls_psk(psk, HOST, SUB)
    assert a != tls_psk.tls_psk(psk, HOST + "x", SUB)
    assert a != tls_psk.tls_psk(psk, HOST, SUB + "x")
    assert a == tls_psk.tls_psk(nvme_keys.parse_tls_psk(psk.text), HOST, SUB)


def test_insert_passes_the_derived_key_on_stdin_only(tmp_path, monkeypatch):
    """keyctl padd psk <identity> %keyring:.nvme with the derived bytes on
    stdin: neither form of the key is on a command line."""
    log = tmp_path / "calls"
    fake = tmp_path / "keyctl"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {log}.args\ncat > {log}.stdin\necho 123\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    psk = nvme_keys.generate_tls_psk()
    assert tls_psk.insert(psk.text, HOST, SUB) == "123"
    args = (tmp_path / "calls.args").read_text().splitlines()
    assert args == ["padd", "psk", f"NVMe0R01 {HOST} {SUB}", "%keyring:.nvme"]
    assert (tmp_path / "calls.stdin").read_bytes() == tls_psk.tls_psk(psk, HOST, SUB)


def test_insert_failure_names_no_key(tmp_path, monkeypatch):
    fake = tmp_path / "keyctl"
    fake.write_text("#!/bin/sh\necho 'add_key: Required key not available' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    psk = nvme_keys.generate_tls_psk()
    with pytest.raises(tls_psk.KeyringError, match="exit 1") as err:
        tls_psk.insert(psk.text, HOST, SUB)
    assert psk.text.split(":")[2] not in str(err.value)
