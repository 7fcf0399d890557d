"""Seeded random JSON-RPC sequences over the methods the driver and spdk-golden use.

Names come from small pools so that duplicates, missing objects and
dependency errors (an lvstore on a claimed bdev, deleting a snapshot with
clones, a namespace on a bdev that is already exported) happen often. Sizes
include the u64 edge cases SPDK multiplies without overflow checks
(``size_in_mib * 1 MiB`` wraps modulo 2^64). A few percent of requests are
mutated: a required key dropped, a value of the wrong type, an unknown key.

The generator may reuse a UUID seen in an earlier reply (lookups by uuid); the
replay maps recorded UUIDs to the replaying target's, so recordings stay valid.
Host paths are built under ``root`` (see ``harness.ROOT``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import Any

MIB = 1 << 20
U64_MAX = (1 << 64) - 1

BASES = ("m0", "m1", "a0", "a1")
LVS_NAMES = ("lvs0", "lvs1", "L" * 63, "L" * 64, "")
LVOL_NAMES = ("v0", "v1", "v2", "s0", "s1", "c0", "n" * 63, "n" * 64, "", "x/y")
NQN = "nqn.2016-06.io.spdk:"
NQNS = (NQN + "s0", NQN + "s1", NQN + "s2", "nqn.bad", "nqn.2014-08.org.nvmexpress.discovery")
HOSTS = ("nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555",
         "nqn.2016-06.io.spdk:host1", "host-not-an-nqn")
KEY_NAMES = ("k0", "k1", "k2")
KEY_FILES = ("psk0", "dh0", "dhc0", "loose", "missing")
PORTS = ("54420", "54421", "0", "abc")
FIXED_UUIDS = ("6f1c1b1e-0c5a-4b53-9d44-2f3f8c7e1a01", "6f1c1b1e-0c5a-4b53-9d44-2f3f8c7e1a02")
# size_in_mib values: small, cluster-rounding, bigger than any test lvstore,
# moderate thin sizes (1 and 4 TiB: SPDK memsets 8 bytes per cluster of a thin
# blob, so these stay at most 32 MiB on the recording target), and u64
# wrap-arounds: 2^44 MiB * 1 MiB wraps to 0, 2^44+1 to 1 MiB, 2^63-1 and
# 2^64-1 to 2^64 - 1 MiB.
SIZES_MIB = (0, 1, 4, 5, 8, 16, 33, 100, 300, 5000, 1 << 20, 1 << 22,
             1 << 44, (1 << 44) + 1, (1 << 63) - 1, U64_MAX)
BAD_SIZES = (-1, 1 << 64, 1.5, "8")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class Generator:
    """``next()`` gives the next request; ``observe()`` feeds it the reply."""

    def __init__(self, seed: int, root: str) -> None:
        self.rng = random.Random(seed)
        self.root = root
        self.next_id = 1
        self.lvs_uuids: list[str] = []
        self.lvol_uuids: list[str] = []
        self.known: list[str] = []           # aliases of lvols created lately
        self.table: list[tuple[int, Callable[[], tuple[str, dict[str, Any] | None]]]] = [
            (5, self.malloc_create), (1, self.malloc_delete), (3, self.aio_create),
            (1, self.aio_delete), (3, self.get_bdevs), (2, self.iostat), (2, self.qos),
            (7, self.create_lvstore), (2, self.get_lvstores), (1, self.delete_lvstore),
            (1, self.rename_lvstore), (14, self.create_lvol), (3, self.get_lvols),
            (4, self.resize), (2, self.set_read_only), (5, self.snapshot), (4, self.clone),
            (3, self.inflate), (3, self.decouple), (3, self.rename), (5, self.delete_lvol),
            (2, self.create_transport), (1, self.get_transports), (4, self.create_subsystem),
            (2, self.delete_subsystem), (3, self.get_subsystems), (5, self.add_ns),
            (2, self.remove_ns), (3, self.add_listener), (1, self.remove_listener),
            (3, self.add_host), (1, self.remove_host), (2, self.allow_any_host),
            (2, self.add_key), (1, self.remove_key), (1, self.get_keys),
        ]
        self.weights = [w for w, _ in self.table]

    # --- the sequence ---------------------------------------------------
    def next(self) -> dict[str, Any]:
        fn = self.rng.choices([f for _, f in self.table], self.weights)[0]
        method, params = fn()
        if params is not None and method != "bdev_get_iostat" and self.rng.random() < 0.06:
            params = self.mutate(params)
        req: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": self.next_id}
        if params is not None:
            req["params"] = params
        self.next_id += 1
        return req

    def observe(self, request: dict[str, Any], reply: Any) -> None:
        """Remember what the target handed out: lvstore/lvol UUIDs, lvol aliases."""
        if not isinstance(reply, dict) or not isinstance(reply.get("result"), str):
            return
        value, method, params = reply["result"], request["method"], request.get("params")
        if not UUID_RE.match(value) or not isinstance(params, dict):
            return
        if method == "bdev_lvol_create_lvstore":
            self.lvs_uuids = (self.lvs_uuids + [value])[-4:]
            return
        self.lvol_uuids = (self.lvol_uuids + [value])[-6:]
        lvs = params.get("lvs_name")
        if method != "bdev_lvol_create":
            source = str(params.get("lvol_name") or params.get("snapshot_name") or "")
            lvs = source.partition("/")[0] if "/" in source else None
        name = params.get("lvol_name") if method == "bdev_lvol_create" else \
            params.get("snapshot_name") if method == "bdev_lvol_snapshot" else \
            params.get("clone_name")
        if isinstance(lvs, str) and isinstance(name, str):
            self.known = (self.known + [f"{lvs}/{name}"])[-8:]

    def mutate(self, params: dict[str, Any]) -> dict[str, Any]:
        out = dict(params)
        how = self.rng.randrange(3)
        key = self.rng.choice(sorted(out)) if out else None
        if how == 0 and key is not None:
            del out[key]
        elif how == 1 and key is not None:
            v = out[key]
            out[key] = (7 if isinstance(v, str) else "7" if isinstance(v, int | bool)
                        else None)
        else:
            out["bogus_key"] = 1
        return out

    # --- pools ------------------------------------------------------------
    def pick(self, seq: tuple[Any, ...] | list[Any]) -> Any:
        return self.rng.choice(seq)

    def maybe(self, p: float = 0.5) -> bool:
        return self.rng.random() < p

    def lvol_ref(self) -> str:
        r = self.rng.random()
        if r < 0.12 and self.lvol_uuids:
            return self.pick(self.lvol_uuids)
        if r > 0.5 and self.known:
            return self.pick(self.known)
        if r < 0.2:
            return self.pick(LVOL_NAMES[:6])            # a bare name: not a lookup key
        if r < 0.23:
            return self.pick(BASES)
        lvs = "lvs0" if self.maybe(0.7) else "lvs1"
        return f"{lvs}/{self.pick(LVOL_NAMES[:6])}"

    def bdev_ref(self) -> str:
        return self.pick(BASES) if self.maybe(0.4) else self.lvol_ref()

    def lvs_selector(self, name_key: str = "lvs_name", uuid_key: str = "uuid") -> dict[str, Any]:
        r = self.rng.random()
        if r < 0.2 and self.lvs_uuids:
            return {uuid_key: self.pick(self.lvs_uuids)}
        if r < 0.23:
            return {}
        if r < 0.25 and self.lvs_uuids:
            return {name_key: self.pick(LVS_NAMES[:2]), uuid_key: self.pick(self.lvs_uuids)}
        if r < 0.28:
            return {uuid_key: "00000000-0000-0000-0000-000000000000"}
        return {name_key: ("lvs0" if self.maybe(0.7) else "lvs1") if self.maybe(0.95)
                else self.pick(LVS_NAMES)}

    def size(self) -> Any:
        return self.pick(BAD_SIZES) if self.maybe(0.03) else self.pick(SIZES_MIB)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    # --- bdev ---------------------------------------------------------------
    def malloc_create(self) -> tuple[str, dict[str, Any]]:
        block = self.pick((512, 4096, 4096, 512, 512, 4096, 1000, 520))
        size = self.pick((8, 64, 128, 128)) * MIB
        p: dict[str, Any] = {"num_blocks": 0 if self.maybe(0.03) else size // block,
                             "block_size": block}
        if self.maybe(0.9):
            p["name"] = self.pick(BASES[:2])
        if self.maybe(0.15):
            p["uuid"] = self.pick(FIXED_UUIDS + ("not-a-uuid",))
        return "bdev_malloc_create", p

    def malloc_delete(self) -> tuple[str, dict[str, Any]]:
        return "bdev_malloc_delete", {"name": self.pick(BASES + ("Malloc0",))}

    def aio_create(self) -> tuple[str, dict[str, Any]]:
        f = self.pick(("aio0.img", "aio1.img", "aio0.img", "missing.img"))
        p: dict[str, Any] = {"name": self.pick(BASES[2:] + BASES[:1]),
                             "filename": self.path(f)}
        if self.maybe(0.3):
            p["block_size"] = self.pick((512, 4096, 1000))
        return "bdev_aio_create", p

    def aio_delete(self) -> tuple[str, dict[str, Any]]:
        return "bdev_aio_delete", {"name": self.pick(BASES)}

    def get_bdevs(self) -> tuple[str, dict[str, Any] | None]:
        if self.maybe(0.4):
            return "bdev_get_bdevs", None
        p: dict[str, Any] = {"name": self.bdev_ref()}
        if self.maybe(0.1):
            p["timeout"] = self.pick((0, 5))
        return "bdev_get_bdevs", p

    def iostat(self) -> tuple[str, dict[str, Any] | None]:
        # Per channel, of lvol bdevs, never mutated: an lvstore's base bdev
        # counts the blobstore's own metadata I/O (device-level and in its
        # channel), which the simulator does not reproduce byte for byte.
        ref = self.lvol_ref()
        if ref in BASES:     # lvol_ref names a base bdev 3% of the time: not here
            ref = f"lvs0/{LVOL_NAMES[0]}"
        return "bdev_get_iostat", {"name": ref, "per_channel": True}

    def qos(self) -> tuple[str, dict[str, Any]]:
        p: dict[str, Any] = {"name": self.bdev_ref()}
        for key, values in (("rw_ios_per_sec", (0, 500, 1000, 1500, 20000)),
                            ("rw_mbytes_per_sec", (0, 1, 10)),
                            ("r_mbytes_per_sec", (0, 5)), ("w_mbytes_per_sec", (0, 5))):
            if self.maybe(0.35):
                p[key] = self.pick(values)
        return "bdev_set_qos_limit", p

    # --- lvol ---------------------------------------------------------------
    def create_lvstore(self) -> tuple[str, dict[str, Any]]:
        p: dict[str, Any] = {"bdev_name": self.pick(BASES + ("nope",)),
                             "lvs_name": ("lvs0" if self.maybe(0.6) else "lvs1")
                             if self.maybe(0.9) else self.pick(LVS_NAMES)}
        if self.maybe(0.5):
            # 3 MiB: a multiple of 4 KiB that is not a power of two; 2 KiB: not a
            # multiple of the 4 KiB page; 2^40: not a u32. Nothing below 1 MiB
            # (a thin terabyte lvol would cost the real target gigabytes).
            p["cluster_sz"] = self.pick((MIB, MIB, MIB, 4 * MIB, 2 * MIB, 3 * MIB, 2048, 0,
                                         1 << 40))
        if self.maybe(0.2):
            p["clear_method"] = self.pick(("none", "unmap", "write_zeroes", "bogus"))
        return "bdev_lvol_create_lvstore", p

    def get_lvstores(self) -> tuple[str, dict[str, Any] | None]:
        if self.maybe(0.4):
            return "bdev_lvol_get_lvstores", None
        return "bdev_lvol_get_lvstores", self.lvs_selector()

    def delete_lvstore(self) -> tuple[str, dict[str, Any]]:
        return "bdev_lvol_delete_lvstore", self.lvs_selector()

    def rename_lvstore(self) -> tuple[str, dict[str, Any]]:
        return "bdev_lvol_rename_lvstore", {"old_name": self.pick(LVS_NAMES[:2]),
                                            "new_name": self.pick(LVS_NAMES)}

    def create_lvol(self) -> tuple[str, dict[str, Any]]:
        p: dict[str, Any] = {"lvol_name": self.pick(LVOL_NAMES[:6]) if self.maybe(0.85)
                             else self.pick(LVOL_NAMES),
                             "size_in_mib": self.size()}
        if self.maybe(0.8):
            p["thin_provision"] = self.maybe()
        p.update(self.lvs_selector())
        if self.maybe(0.35):
            p["clear_method"] = self.pick(("none", "unmap", "write_zeroes", "bogus"))
        return "bdev_lvol_create", p

    def get_lvols(self) -> tuple[str, dict[str, Any] | None]:
        if self.maybe(0.5):
            return "bdev_lvol_get_lvols", None
        return "bdev_lvol_get_lvols", self.lvs_selector("lvs_name", "lvs_uuid")

    def resize(self) -> tuple[str, dict[str, Any]]:
        return "bdev_lvol_resize", {"name": self.lvol_ref(), "size_in_mib": self.size()}

    def set_read_only(self) -> tuple[str, dict[str, Any]]:
        return "bdev_lvol_set_read_only", {"name": self.lvol_ref()}

    def snapshot(self) -> tuple[str, dict[str, Any]]:
        return "bdev_lvol_snapshot", {"lvol_name": self.lvol_ref(),
                                      "snapshot_name": self.pick(LVOL_NAMES)}

    def clone(self) -> tuple[str, dict[str, Any]]:
        return "bdev_lvol_clone", {"snapshot_name": self.lvol_ref(),
                                   "clone_name": self.pick(LVOL_NAMES)}

    def inflate(self) -> tuple[str, dict[str, Any]]:
        return "bdev_lvol_inflate", {"name": self.lvol_ref()}

    def decouple(self) -> tuple[str, dict[str, Any]]:
        return "bdev_lvol_decouple_parent", {"name": self.lvol_ref()}

    def rename(self) -> tuple[str, dict[str, Any]]:
        return "bdev_lvol_rename", {"old_name": self.lvol_ref(),
                                    "new_name": self.pick(LVOL_NAMES)}

    def delete_lvol(self) -> tuple[str, dict[str, Any]]:
        return "bdev_lvol_delete", {"name": self.lvol_ref()}

    # --- nvmf ---------------------------------------------------------------
    def nqn(self) -> str:
        return self.pick(NQNS[:3]) if self.maybe(0.9) else self.pick(NQNS)

    def create_transport(self) -> tuple[str, dict[str, Any]]:
        return "nvmf_create_transport", {"trtype": self.pick(("TCP", "tcp", "RDMA"))}

    def get_transports(self) -> tuple[str, dict[str, Any] | None]:
        if self.maybe(0.6):
            return "nvmf_get_transports", None
        return "nvmf_get_transports", {"trtype": self.pick(("TCP", "RDMA"))}

    def create_subsystem(self) -> tuple[str, dict[str, Any]]:
        p: dict[str, Any] = {"nqn": self.nqn()}
        if self.maybe(0.4):
            p["serial_number"] = self.pick(("SPDK001", "S" * 20, "S" * 21))
        if self.maybe(0.3):
            p["model_number"] = self.pick(("csi-spdk", "M" * 40, "M" * 41))
        if self.maybe(0.5):
            p["allow_any_host"] = self.maybe()
        if self.maybe(0.3):
            p["max_namespaces"] = self.pick((1, 2, 4))
        return "nvmf_create_subsystem", p

    def delete_subsystem(self) -> tuple[str, dict[str, Any]]:
        return "nvmf_delete_subsystem", {"nqn": self.nqn()}

    def get_subsystems(self) -> tuple[str, dict[str, Any] | None]:
        if self.maybe(0.6):
            return "nvmf_get_subsystems", None
        return "nvmf_get_subsystems", {"nqn": self.nqn()}

    def add_ns(self) -> tuple[str, dict[str, Any]]:
        ns: dict[str, Any] = {"bdev_name": self.bdev_ref()}
        if self.maybe(0.3):
            ns["nsid"] = self.pick((1, 2, 3, 5))
        if self.maybe(0.1):
            ns["uuid"] = self.pick(FIXED_UUIDS + ("zz",))
        return "nvmf_subsystem_add_ns", {"nqn": self.nqn(), "namespace": ns}

    def remove_ns(self) -> tuple[str, dict[str, Any]]:
        return "nvmf_subsystem_remove_ns", {"nqn": self.nqn(), "nsid": self.pick((1, 2, 3))}

    def listen_address(self) -> dict[str, Any]:
        la: dict[str, Any] = {"trtype": self.pick(("tcp", "TCP")), "traddr": "127.0.0.1",
                              "trsvcid": self.pick(PORTS[:2]) if self.maybe(0.9)
                              else self.pick(PORTS)}
        if self.maybe(0.8):
            la["adrfam"] = self.pick(("ipv4", "IPv4"))
        return la

    def add_listener(self) -> tuple[str, dict[str, Any]]:
        p: dict[str, Any] = {"nqn": self.nqn(), "listen_address": self.listen_address()}
        if self.maybe(0.2):
            p["secure_channel"] = self.maybe()
        return "nvmf_subsystem_add_listener", p

    def remove_listener(self) -> tuple[str, dict[str, Any]]:
        return "nvmf_subsystem_remove_listener", {"nqn": self.nqn(),
                                                  "listen_address": self.listen_address()}

    def add_host(self) -> tuple[str, dict[str, Any]]:
        p: dict[str, Any] = {"nqn": self.nqn(), "host": self.pick(HOSTS)}
        r = self.rng.random()
        if r < 0.15:
            p["psk"] = self.pick(KEY_NAMES)
        elif r < 0.3:
            p["dhchap_key"] = self.pick(KEY_NAMES)
            if self.maybe(0.4):
                p["dhchap_ctrlr_key"] = self.pick(KEY_NAMES)
        return "nvmf_subsystem_add_host", p

    def remove_host(self) -> tuple[str, dict[str, Any]]:
        return "nvmf_subsystem_remove_host", {"nqn": self.nqn(), "host": self.pick(HOSTS)}

    def allow_any_host(self) -> tuple[str, dict[str, Any]]:
        return "nvmf_subsystem_allow_any_host", {"nqn": self.nqn(),
                                                 "allow_any_host": self.maybe()}

    # --- keyring ------------------------------------------------------------
    def add_key(self) -> tuple[str, dict[str, Any]]:
        f = self.pick(KEY_FILES)
        path = f"keys/{f}" if self.maybe(0.05) else self.path(f"keys/{f}")
        return "keyring_file_add_key", {"name": self.pick(KEY_NAMES), "path": path}

    def remove_key(self) -> tuple[str, dict[str, Any]]:
        return "keyring_file_remove_key", {"name": self.pick(KEY_NAMES)}

    def get_keys(self) -> tuple[str, None]:
        return "keyring_get_keys", None


def methods_covered() -> list[str]:
    """Every method a generator can emit (for the README and the report)."""
    gen = Generator(0, "/r")
    names: set[str] = set()
    for _, fn in gen.table:
        for _ in range(30):
            names.add(fn()[0])
    return sorted(names)
