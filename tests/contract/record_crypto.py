"""Record the crypto bdev and accel crypto key answers of a real, freshly
started spdk_tgt v25.09 (built --with-crypto, software accel module = ISA-L
crypto) into tests/contract/data/crypto_v25.09.json (the spdk-golden format;
replayed against the simulator by test_crypto_golden.py).

    python3 tests/contract/record_crypto.py /path/to/spdk.sock [OUT.json]

The sequence covers what the driver relies on (controller/crypto.py): key
creation and its validation (lengths, key == key2, ciphers, tweak modes,
duplicate names), the crypto bdev stacked on an lvol (its JSON, the claim on
the lvol, export through a subsystem, a resize of the lvol underneath, a
snapshot of the claimed lvol), and teardown in both orders (a key in use
cannot be destroyed; a claimed lvol cannot be deleted).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from golden_replay import Recorder  # noqa: E402

OUT = HERE / "data" / "crypto_v25.09.json"
NQN = "nqn.2024-11.io.csi-spdk:vol:crypto-record"
K128, K128B = "00112233445566778899aabbccddeeff", "ffeeddccbbaa99887766554433221100"
K256 = "0123456789abcdef" * 4
K256B = "fedcba9876543210" * 4


def sequence(lvol: str) -> list[tuple[str, dict | None, str | None]]:
    """(method, params, note); ``lvol`` is the lvol's uuid."""
    kc = "accel_crypto_key_create"
    return [
        ("accel_crypto_keys_get", {}, "no keys yet"),
        (kc, {"cipher": "AES_XTS", "key": K128, "key2": K128, "name": "k-same"},
         "key == key2"),
        (kc, {"cipher": "AES_XTS", "key": K128, "key2": K256B, "name": "k-len"},
         "key and key2 of different lengths"),
        (kc, {"cipher": "AES_XTS", "key": K128, "name": "k-nokey2"}, "no key2"),
        (kc, {"cipher": "AES_XTS", "key": "00112233", "key2": "44556677",
              "name": "k-short"}, "32-bit keys"),
        (kc, {"cipher": "AES_XTS", "key": "zz" * 16, "key2": K128B, "name": "k-hex"},
         "not hex"),
        (kc, {"cipher": "AES_GCM", "key": K128, "key2": K128B, "name": "k-gcm"},
         "unknown cipher"),
        (kc, {"cipher": "AES_XTS", "key": K128, "key2": K128B, "name": "k-tweak",
              "tweak_mode": "INCR_512_FULL_LBA"}, "tweak mode the software module lacks"),
        (kc, {"cipher": "AES_XTS", "key": K128, "key2": K128B, "name": "k-badtweak",
              "tweak_mode": "NOPE"}, "unknown tweak mode"),
        (kc, {"cipher": "AES_XTS", "key": K128, "key2": K128B}, "no name"),
        (kc, {"cipher": "AES_XTS", "key": K128, "key2": K128B, "name": "k128",
              "tweak_mode": "SIMPLE_LBA"}, "AES-XTS-128, SIMPLE_LBA given"),
        (kc, {"cipher": "AES_XTS", "key": K256, "key2": K256B, "name": "k256"},
         "AES-XTS-256"),
        (kc, {"cipher": "AES_XTS", "key": K256, "key2": K256B, "name": "k256"},
         "the same name again"),
        (kc, {"cipher": "AES_CBC", "key": K128, "name": "kcbc"}, "AES_CBC, no key2"),
        ("accel_crypto_keys_get", {}, "every key (material included)"),
        ("accel_crypto_keys_get", {"key_name": "k256"}, "one key"),
        ("accel_crypto_keys_get", {"key_name": "nope"}, "unknown key"),
        ("bdev_crypto_create", {"base_bdev_name": lvol, "name": "crypt0",
                                "key_name": "nope"}, "unknown key"),
        ("bdev_crypto_create", {"base_bdev_name": lvol, "name": "crypt0"}, "no key at all"),
        ("bdev_crypto_create", {"base_bdev_name": lvol, "name": "crypt0",
                                "key_name": "kcbc"}, "a CBC key"),
        ("bdev_crypto_create", {"base_bdev_name": lvol, "name": "crypt0",
                                "key_name": "k256"}, "on the lvol"),
        ("bdev_crypto_create", {"base_bdev_name": lvol, "name": "crypt0",
                                "key_name": "k256"}, "the same again"),
        ("bdev_crypto_create", {"base_bdev_name": lvol, "name": "crypt1",
                                "key_name": "k128"}, "a second one on the claimed lvol"),
        ("bdev_get_bdevs", {"name": "crypt0"}, "the crypto bdev"),
        ("bdev_get_bdevs", {"name": lvol}, "the claimed lvol"),
        ("nvmf_create_subsystem", {"nqn": NQN, "allow_any_host": False}, None),
        ("nvmf_subsystem_add_ns", {"nqn": NQN, "namespace": {"bdev_name": "crypt0",
                                                             "uuid": lvol}},
         "export the crypto bdev under the lvol's uuid"),
        ("nvmf_get_subsystems", {"nqn": NQN}, None),
        ("bdev_lvol_resize", {"name": lvol, "size_in_mib": 12}, "grow the lvol underneath"),
        ("bdev_get_bdevs", {"name": "crypt0"}, "the crypto bdev follows"),
        ("nvmf_get_subsystems", {"nqn": NQN}, "and so does the namespace"),
        ("bdev_lvol_snapshot", {"lvol_name": lvol, "snapshot_name": "snap0"},
         "snapshot of the claimed lvol"),
        ("bdev_get_bdevs", {"name": "crypt0"}, "still there after the snapshot"),
        ("bdev_lvol_clone", {"snapshot_name": "lvs0/snap0", "clone_name": "clone0"}, None),
        ("bdev_crypto_create", {"base_bdev_name": "lvs0/clone0", "name": "crypt-clone",
                                "key_name": "k256"}, "the clone opened with the same key"),
        ("bdev_get_bdevs", {"name": "crypt-clone"}, None),
        ("bdev_lvol_delete", {"name": "lvs0/clone0"},
         "a claimed lvol: hot-removes the crypto bdev"),
        ("bdev_get_bdevs", {"name": "crypt-clone"}, "gone with its base"),
        ("bdev_crypto_delete", {"name": "crypt0"}, "while exported"),
        ("nvmf_get_subsystems", {"nqn": NQN}, "the namespace went with it"),
        ("nvmf_delete_subsystem", {"nqn": NQN}, None),
        ("bdev_crypto_delete", {"name": "crypt0"}, "again"),
        ("bdev_crypto_delete", {"name": "nope"}, "unknown"),
        ("bdev_get_bdevs", {"name": lvol}, "released"),
        ("accel_crypto_key_destroy", {"key_name": "k256"}, "no longer in use"),
        ("accel_crypto_key_destroy", {"key_name": "k256"}, "again"),
        ("accel_crypto_key_destroy", {}, "no name"),
        ("accel_crypto_keys_get", {}, None),
        ("bdev_crypto_create", {"base_bdev_name": lvol, "name": "crypt0",
                                "key_name": "k128"}, None),
        ("accel_crypto_key_destroy", {"key_name": "k128"},
         "a key in use: SPDK does not refuse (the driver destroys keys after the bdev)"),
        ("accel_crypto_keys_get", {}, None),
        ("bdev_crypto_delete", {"name": "crypt0"}, None),
        ("accel_crypto_keys_get", {}, None),
    ]


def main(sock: str, out: Path = OUT) -> int:
    rec = Recorder(sock)
    send = rec.send
    send("spdk_get_version", None)
    send("bdev_malloc_create", {"name": "Malloc0", "num_blocks": 32768, "block_size": 512})
    send("bdev_lvol_create_lvstore", {"bdev_name": "Malloc0", "lvs_name": "lvs0"})
    lvol = send("bdev_lvol_create", {"lvol_name": "vol0", "size_in_mib": 8,
                                     "lvs_name": "lvs0", "thin_provision": True})["result"]
    for method, params, note in sequence(lvol):
        send(method, params, note)
    send("bdev_lvol_delete", {"name": lvol})
    send("bdev_lvol_delete", {"name": "lvs0/snap0"})
    send("bdev_lvol_delete_lvstore", {"lvs_name": "lvs0"})
    send("bdev_malloc_delete", {"name": "Malloc0"})
    rec.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2]) if len(sys.argv) > 2 else OUT))
