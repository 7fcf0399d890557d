"""JSON-RPC method table: parameter decoding and dispatch to the state modules.

SPDK decodes params with ``spdk_json_decode_object`` and reports failures
differently per subsystem: bdev/lvol/keyring handlers answer -32603
"spdk_json_decode_object failed", nvmf handlers -32602 "Invalid parameters",
parameterless methods -32602 "<method> method requires no parameters".
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import bdev as bdevmod
from . import methods_lvol as lvolmod
from . import qos as qosmod
from .method_names import ALIASES, ALL_METHODS, STARTUP_ONLY
from .state import EINVAL, ENODEV, ETIMEDOUT, NoParams, RpcError, SimState, errno_error

BDEV, NVMF, KEYRING, NONE, ACCEL = "bdev", "nvmf", "keyring", "none", "accel"
# Handlers that decode with spdk_json_decode_object_relaxed: unknown keys are ignored.
RELAXED = {"nvmf_subsystem_add_listener", "nvmf_subsystem_add_ns", "nvmf_subsystem_add_host",
           "nvmf_create_transport", "keyring_file_add_key"}

# type tags: str, u64/u32/u16 (non-negative, in range), i64/i32, bool, obj, arr,
# uuid (a string ``spdk_json_decode_uuid`` accepts: the dashed 36-char form), any
Spec = dict[str, tuple[str, bool]]
Handler = Callable[[SimState, dict[str, Any]], Any]


@dataclass(frozen=True)
class Method:
    handler: Handler
    spec: Spec
    family: str


METHODS: dict[str, Method] = {}


def method(rpc_name: str, family: str = BDEV, /,
           **spec: tuple[str, bool]) -> Callable[[Handler], Handler]:
    """Register a handler with its parameter spec (``key=(type, required)``)."""
    def deco(fn: Handler) -> Handler:
        METHODS[rpc_name] = Method(fn, spec, family)
        return fn
    return deco


_INT_RANGES = {"u64": (0, 1 << 64), "u32": (0, 1 << 32), "u16": (0, 1 << 16),
               "i64": (-(1 << 63), 1 << 63), "i32": (-(1 << 31), 1 << 31)}
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                   r"[0-9a-fA-F]{12}$")


def _type_ok(tag: str, value: Any) -> bool:
    if tag == "str":
        return isinstance(value, str)
    if tag == "uuid":
        return isinstance(value, str) and bool(_UUID.match(value))
    if tag in _INT_RANGES:
        if isinstance(value, bool) or not isinstance(value, int):
            return False
        low, high = _INT_RANGES[tag]
        return low <= value < high
    if tag == "bool":
        return isinstance(value, bool)
    if tag == "obj":
        return isinstance(value, dict)
    if tag == "arr":
        return isinstance(value, list)
    return True


def decode(name: str, m: Method, params: Any) -> dict[str, Any]:
    """Validate ``params`` against the method's spec the way SPDK would."""
    if m.family == NONE:
        if params is not None:
            raise RpcError(-32602, f"{name} method requires no parameters")
        return {}
    fail = {NVMF: RpcError(-32602, "Invalid parameters"),
            KEYRING: RpcError(-32602, "Invalid argument"),
            ACCEL: RpcError(-32700, "spdk_json_decode_object failed")}.get(
        m.family, RpcError(-32603, "spdk_json_decode_object failed"))
    if params is None:
        if any(req for _, req in m.spec.values()):
            raise fail
        return NoParams()
    if not isinstance(params, dict):
        raise fail
    for key, value in params.items():
        if key not in m.spec and name in RELAXED:
            continue
        if key not in m.spec or not _type_ok(m.spec[key][0], value):
            raise fail
    for key, (_, required) in m.spec.items():
        if required and key not in params:
            raise fail
    return {k: v for k, v in params.items() if k in m.spec}


def call(state: SimState, name: str, params: Any) -> Any:
    """Run one method; raises RpcError. ``params`` is the raw JSON value (or None)."""
    m = METHODS.get(name)
    if m is None:
        raise RpcError(-32601, "Method not found")
    decoded = decode(name, m, params)
    with state.lock:
        try:
            return m.handler(state, decoded)
        finally:
            state.after_call(name)


def _b(tag: str) -> tuple[str, bool]:
    return (tag, False)


def _r(tag: str) -> tuple[str, bool]:
    return (tag, True)


# --- framework ---------------------------------------------------------------

@method("spdk_get_version", NONE)
def _version(state: SimState, p: dict[str, Any]) -> Any:
    return {"version": "SPDK v25.09",
            "fields": {"major": 25, "minor": 9, "patch": 0, "suffix": ""}}


@method("rpc_get_methods", current=_b("bool"), include_aliases=_b("bool"))
def _methods(state: SimState, p: dict[str, Any]) -> Any:
    names = list(ALL_METHODS)
    if p.get("current"):
        names = [n for n in names if n not in STARTUP_ONLY]
    if p.get("include_aliases"):
        names = list(ALIASES) + names
    return names


@method("framework_wait_init", NONE)
def _wait_init(state: SimState, p: dict[str, Any]) -> Any:
    return True


@method("framework_get_subsystems", NONE)
def _subsystems(state: SimState, p: dict[str, Any]) -> Any:
    deps = [("scheduler", []), ("vmd", []), ("sock", []), ("iobuf", []), ("keyring", []),
            ("accel", ["iobuf"]), ("bdev", ["accel", "keyring", "vmd", "sock", "iobuf"]),
            ("scsi", ["bdev"]), ("nvmf", ["bdev", "keyring", "sock"]), ("nbd", ["bdev"]),
            ("iscsi", ["scsi", "sock"])]
    return [{"subsystem": n, "depends_on": d} for n, d in deps]


@method("framework_get_config", name=_r("str"))
def _get_config(state: SimState, p: dict[str, Any]) -> Any:
    if p["name"] == "nvmf":
        return state.nvmf.config()
    if p["name"] == "keyring":
        return [{"method": "keyring_file_add_key", "params": {"name": k.name, "path": k.path}}
                for k in state.keyring.keys]
    known = {"scheduler", "vmd", "sock", "iobuf", "accel", "bdev", "scsi", "nbd", "iscsi"}
    if p["name"] not in known:
        raise errno_error(ENODEV)
    return []


# --- bdev --------------------------------------------------------------------

@method("bdev_malloc_create", name=_b("str"), num_blocks=_r("u64"), block_size=_r("u32"),
        uuid=_b("uuid"), optimal_io_boundary=_b("u32"), md_size=_b("u32"),
        md_interleave=_b("bool"), dif_type=_b("i32"), dif_is_head_of_md=_b("bool"),
        dif_pi_format=_b("u32"), physical_block_size=_b("u32"), numa_id=_b("i32"))
def _malloc_create(state: SimState, p: dict[str, Any]) -> Any:
    return bdevmod.malloc_create(state, p)


@method("bdev_malloc_delete", name=_r("str"))
def _malloc_delete(state: SimState, p: dict[str, Any]) -> Any:
    return bdevmod.delete_typed(state, p["name"], bdevmod.MallocBdev)


@method("bdev_aio_create", name=_r("str"), filename=_r("str"), block_size=_b("u32"),
        readonly=_b("bool"), fallocate=_b("bool"), uuid=_b("str"))
def _aio_create(state: SimState, p: dict[str, Any]) -> Any:
    return bdevmod.aio_create(state, p)


@method("bdev_aio_delete", name=_r("str"))
def _aio_delete(state: SimState, p: dict[str, Any]) -> Any:
    return bdevmod.delete_typed(state, p["name"], bdevmod.AioBdev)


@method("bdev_get_bdevs", name=_b("str"), timeout=_b("u64"))
def _get_bdevs(state: SimState, p: dict[str, Any]) -> Any:
    name = p.get("name")
    if not name:
        lvolmod.reconcile_all(state)
        return [b.json() for b in state.bdevs]
    deadline = time.monotonic() + p.get("timeout", 0) / 1000.0
    while True:
        bdev = state.find_bdev(name)
        if bdev is not None:
            lvolmod.reconcile_all(state)
            return [bdev.json()]
        remaining = deadline - time.monotonic()
        if not p.get("timeout"):        # absent or 0: no waiting
            raise errno_error(ENODEV)
        if remaining <= 0:
            raise errno_error(ETIMEDOUT)
        state.changed.wait(remaining)


@method("bdev_wait_for_examine", NONE)
def _wait_examine(state: SimState, p: dict[str, Any]) -> Any:
    return True


@method("bdev_set_qos_limit", name=_r("str"), rw_ios_per_sec=_b("u64"),
        rw_mbytes_per_sec=_b("u64"), r_mbytes_per_sec=_b("u64"), w_mbytes_per_sec=_b("u64"))
def _qos(state: SimState, p: dict[str, Any]) -> Any:
    return qosmod.set_qos_limit(state, p)


@method("bdev_get_iostat", name=_b("str"), per_channel=_b("bool"))
def _iostat(state: SimState, p: dict[str, Any]) -> Any:
    return bdevmod.iostat(state, p)


@method("bdev_reset_iostat", name=_b("str"), mode=_b("str"))
def _reset_iostat(state: SimState, p: dict[str, Any]) -> Any:
    return bdevmod.reset_iostat(state, p)


@method("bdev_nvme_get_controllers", name=_b("str"))
def _nvme_ctrlrs(state: SimState, p: dict[str, Any]) -> Any:
    if p.get("name"):
        raise errno_error(ENODEV)
    return []


# --- lvol --------------------------------------------------------------------

@method("bdev_lvol_create_lvstore", bdev_name=_r("str"), lvs_name=_r("str"),
        cluster_sz=_b("u32"), clear_method=_b("str"), num_md_pages_per_cluster_ratio=_b("u32"),
        md_page_size=_b("u32"))
def _create_lvs(state: SimState, p: dict[str, Any]) -> Any:
    return lvolmod.create_lvstore(state, p)


@method("bdev_lvol_get_lvstores", uuid=_b("str"), lvs_name=_b("str"))
def _get_lvs(state: SimState, p: dict[str, Any]) -> Any:
    return lvolmod.get_lvstores(state, p)


@method("bdev_lvol_rename_lvstore", old_name=_r("str"), new_name=_r("str"))
def _rename_lvs(state: SimState, p: dict[str, Any]) -> Any:
    return lvolmod.rename_lvstore(state, p)


@method("bdev_lvol_delete_lvstore", uuid=_b("str"), lvs_name=_b("str"))
def _delete_lvs(state: SimState, p: dict[str, Any]) -> Any:
    return lvolmod.delete_lvstore(state, p)


@method("bdev_lvol_create", lvol_name=_r("str"), size_in_mib=_r("u64"),
        thin_provision=_b("bool"), uuid=_b("str"), lvs_name=_b("str"), clear_method=_b("str"))
def _create_lvol(state: SimState, p: dict[str, Any]) -> Any:
    return lvolmod.create_lvol(state, p)


@method("bdev_lvol_get_lvols", lvs_uuid=_b("str"), lvs_name=_b("str"))
def _get_lvols(state: SimState, p: dict[str, Any]) -> Any:
    return lvolmod.get_lvols(state, p)


@method("bdev_lvol_rename", old_name=_r("str"), new_name=_r("str"))
def _rename_lvol(state: SimState, p: dict[str, Any]) -> Any:
    return lvolmod.rename_lvol(state, p)


@method("bdev_lvol_resize", name=_r("str"), size_in_mib=_r("u64"))
def _resize(state: SimState, p: dict[str, Any]) -> Any:
    return lvolmod.resize_lvol(state, p)


@method("bdev_lvol_set_read_only", name=_r("str"))
def _ro(state: SimState, p: dict[str, Any]) -> Any:
    return lvolmod.set_read_only(state, p)


@method("bdev_lvol_snapshot", lvol_name=_r("str"), snapshot_name=_r("str"))
def _snapshot(state: SimState, p: dict[str, Any]) -> Any:
    return lvolmod.snapshot(state, p)


@method("bdev_lvol_clone", snapshot_name=_r("str"), clone_name=_b("str"))
def _clone(state: SimState, p: dict[str, Any]) -> Any:
    return lvolmod.clone(state, p)


@method("bdev_lvol_delete", name=_r("str"))
def _delete_lvol(state: SimState, p: dict[str, Any]) -> Any:
    return lvolmod.delete_lvol(state, p)


@method("bdev_lvol_inflate", name=_r("str"))
def _inflate(state: SimState, p: dict[str, Any]) -> Any:
    return lvolmod.inflate(state, p, allocate_all=True)


@method("bdev_lvol_decouple_parent", name=_r("str"))
def _decouple(state: SimState, p: dict[str, Any]) -> Any:
    return lvolmod.inflate(state, p, allocate_all=False)


# --- simulator-only I/O (names cannot collide with SPDK's) --------------------

@method("sim_bdev_write", name=_r("str"), offset=_r("u64"), data=_b("str"),
        length=_b("u64"), pattern=_b("u64"), io_size=_b("u64"))
def _sim_write(state: SimState, p: dict[str, Any]) -> Any:
    """Write to an lvol like a host would: base64 ``data`` or ``length`` x ``pattern``."""
    lv = lvolmod.find_lvol(state, p["name"])
    if "data" in p:
        try:
            data = base64.b64decode(p["data"], validate=True)
        except ValueError:
            raise errno_error(EINVAL) from None
    elif "length" in p:
        data = bytes([p.get("pattern", 0xA5) & 0xFF]) * p["length"]
    else:
        raise errno_error(EINVAL)
    lv.write(p["offset"], data, p.get("io_size", 0))
    return True


@method("sim_bdev_read", name=_r("str"), offset=_r("u64"), length=_r("u64"),
        io_size=_b("u64"))
def _sim_read(state: SimState, p: dict[str, Any]) -> Any:
    lv = lvolmod.find_lvol(state, p["name"])
    data = lv.read(p["offset"], p["length"], p.get("io_size", 0))
    return base64.b64encode(data).decode()


# nvmf, keyring and crypto methods register themselves on import.
from . import methods_crypto, methods_nvmf  # noqa: E402,F401
