"""Key formats (csi_spdk/nvme_keys.py) against real nvme-cli output.

The host's nvme-cli (installed by scripts/install-guest-deps.sh) generates
DH-HMAC-CHAP keys; ``nvme check-dhchap-key``/``check-tls-key`` of nvme-cli
2.13 in the Debian 13 guest validate ours (tests/e2e/test_guest_auth.py).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import zlib

import pytest

from csi_spdk import nvme_keys as nk

NVME = shutil.which("nvme", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture
def nvme() -> str:
    if NVME is None:
        if _in_ci():
            pytest.fail("nvme-cli missing (scripts/install-guest-deps.sh installs it)")
        pytest.skip("nvme-cli not installed")
    return NVME


@pytest.mark.parametrize("length", [32, 48, 64])
def test_dhchap_format_is_byte_identical_to_nvme_cli(nvme, length) -> None:
    raw = bytes(range(length))
    out = subprocess.run([nvme, "gen-dhchap-key", f"--secret={raw.hex()}", "--hmac=0",
                          f"--key-length={length}"], capture_output=True, text=True, check=True)
    assert nk.DhchapKey(0, raw).text == out.stdout.strip()
    assert nk.parse_dhchap_key(out.stdout).key == raw


@pytest.mark.parametrize("hmac", [0, 1, 2, 3])
def test_random_nvme_cli_keys_parse(nvme, hmac) -> None:
    length = {0: 32, 1: 32, 2: 48, 3: 64}[hmac]
    out = subprocess.run([nvme, "gen-dhchap-key", f"--hmac={hmac}", f"--key-length={length}",
                          f"--nqn={HOSTNQN}"], capture_output=True, text=True, check=True)
    key = nk.parse_dhchap_key(out.stdout)
    assert key.hash_id == hmac and len(key.key) == length
    assert key.text == out.stdout.strip()


def test_generated_dhchap_keys_are_random_and_well_formed() -> None:
    a, b = nk.generate_dhchap_key(), nk.generate_dhchap_key()
    assert a.key != b.key and len(a.key) == 32 and a.hash_id == 0
    assert a.text.startswith("DHHC-1:00:") and a.text.endswith(":")
    assert nk.parse_dhchap_key(a.text) == a
    blob = base64.b64decode(a.text.split(":")[2])
    assert blob[:32] == a.key and int.from_bytes(blob[32:], "little") == zlib.crc32(a.key)
    for name, hid, size in (("sha256", 1, 32), ("sha384", 2, 48), ("sha512", 3, 64)):
        k = nk.generate_dhchap_key(name)
        assert (k.hash_id, len(k.key)) == (hid, size)
        assert k.text.startswith(f"DHHC-1:0{hid}:")


def test_generated_tls_psks() -> None:
    p = nk.generate_tls_psk()
    assert p.text.startswith("NVMeTLSkey-1:01:") and len(p.psk) == 32
    assert nk.parse_tls_psk(p.text) == p
    q = nk.generate_tls_psk("sha384")
    assert q.text.startswith("NVMeTLSkey-1:02:") and len(q.psk) == 48
    with pytest.raises(nk.KeyFormatError):
        nk.generate_tls_psk("sha512")


def test_corrupt_keys_are_refused_without_echoing_them() -> None:
    good = nk.generate_dhchap_key().text
    body = good.split(":")[2]
    flipped = ("A" if body[0] != "A" else "B") + body[1:]
    bad = [good.replace("DHHC-1:00:", "DHHC-1:07:"), f"DHHC-1:00:{flipped}:", good[:-1],
           "DHHC-1:01:" + nk._pack(bytes(48)) + ":", "DHHC-1:00:" + nk._pack(bytes(20)) + ":",
           "DHHC-1:00:!!!!:"]
    for text in bad:
        with pytest.raises(nk.KeyFormatError) as e:
            nk.parse_dhchap_key(text)
        assert body[:8] not in str(e.value)
    with pytest.raises(nk.KeyFormatError, match="CRC"):
        nk.parse_tls_psk("NVMeTLSkey-1:01:" + base64.b64encode(bytes(36)).decode() + ":")


def test_key_material_stays_out_of_repr_and_str() -> None:
    k, p = nk.generate_dhchap_key(), nk.generate_tls_psk()
    for obj, secret in ((k, k.text), (p, p.text)):
        body = secret.split(":")[2]
        assert body not in repr(obj) and body not in str(obj) and body not in f"{obj}"
        assert obj.__class__.__name__ in repr(obj)
