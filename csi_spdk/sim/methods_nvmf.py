"""nvmf_* and keyring_* entries of the method table (see ``methods.py``)."""

from __future__ import annotations

from typing import Any

from .methods import KEYRING, NVMF, _b, _r, method
from .state import SimState


@method("nvmf_create_transport", NVMF, trtype=_r("str"), max_queue_depth=_b("u16"),
        max_io_qpairs_per_ctrlr=_b("u16"), in_capsule_data_size=_b("u32"),
        max_io_size=_b("u32"), io_unit_size=_b("u32"), max_aq_depth=_b("u32"),
        num_shared_buffers=_b("u32"), buf_cache_size=_b("u32"), dif_insert_or_strip=_b("bool"),
        zcopy=_b("bool"), c2h_success=_b("bool"), sock_priority=_b("u32"),
        abort_timeout_sec=_b("u32"), ack_timeout=_b("u32"), data_wr_pool_size=_b("u32"),
        tgt_name=_b("str"))
def _create_transport(state: SimState, p: dict[str, Any]) -> Any:
    return state.nvmf.create_transport(p)


@method("nvmf_get_transports", NVMF, trtype=_b("str"), tgt_name=_b("str"))
def _get_transports(state: SimState, p: dict[str, Any]) -> Any:
    return state.nvmf.get_transports(p)


@method("nvmf_create_subsystem", NVMF, nqn=_r("str"), serial_number=_b("str"),
        model_number=_b("str"), allow_any_host=_b("bool"), max_namespaces=_b("u32"),
        min_cntlid=_b("u16"), max_cntlid=_b("u16"), ana_reporting=_b("bool"),
        tgt_name=_b("str"), max_discard_size_kib=_b("u64"),
        max_write_zeroes_size_kib=_b("u64"), passthrough=_b("bool"))
def _create_subsystem(state: SimState, p: dict[str, Any]) -> Any:
    return state.nvmf.create_subsystem(p)


@method("nvmf_delete_subsystem", NVMF, nqn=_r("str"), tgt_name=_b("str"))
def _delete_subsystem(state: SimState, p: dict[str, Any]) -> Any:
    return state.nvmf.delete_subsystem(p)


@method("nvmf_get_subsystems", NVMF, nqn=_b("str"), tgt_name=_b("str"))
def _get_subsystems(state: SimState, p: dict[str, Any]) -> Any:
    return state.nvmf.get_subsystems(p)


@method("nvmf_subsystem_allow_any_host", NVMF, nqn=_r("str"), allow_any_host=_r("bool"),
        tgt_name=_b("str"))
def _allow_any_host(state: SimState, p: dict[str, Any]) -> Any:
    return state.nvmf.allow_any_host(p)


@method("nvmf_subsystem_add_ns", NVMF, nqn=_r("str"), namespace=_r("obj"), tgt_name=_b("str"),
        no_auto_visible=_b("bool"))
def _add_ns(state: SimState, p: dict[str, Any]) -> Any:
    return state.nvmf.add_ns(p)


@method("nvmf_subsystem_remove_ns", NVMF, nqn=_r("str"), nsid=_r("u32"), tgt_name=_b("str"))
def _remove_ns(state: SimState, p: dict[str, Any]) -> Any:
    return state.nvmf.remove_ns(p)


_LISTENER = {"nqn": _r("str"), "listen_address": _r("obj"), "tgt_name": _b("str"),
             "secure_channel": _b("bool"), "sock_impl": _b("str"), "ana_state": _b("str"),
             "anagrpid": _b("u32")}


@method("nvmf_subsystem_add_listener", NVMF, **_LISTENER)
def _add_listener(state: SimState, p: dict[str, Any]) -> Any:
    return state.nvmf.add_listener(p)


@method("nvmf_subsystem_remove_listener", NVMF, **_LISTENER)
def _remove_listener(state: SimState, p: dict[str, Any]) -> Any:
    return state.nvmf.remove_listener(p)


@method("nvmf_subsystem_get_listeners", NVMF, nqn=_r("str"), tgt_name=_b("str"))
def _get_listeners(state: SimState, p: dict[str, Any]) -> Any:
    return state.nvmf.get_listeners(p)


@method("nvmf_subsystem_get_controllers", NVMF, nqn=_r("str"), tgt_name=_b("str"))
def _get_controllers(state: SimState, p: dict[str, Any]) -> Any:
    state.nvmf.must(p["nqn"])
    return []


@method("nvmf_subsystem_get_qpairs", NVMF, nqn=_r("str"), tgt_name=_b("str"))
def _get_qpairs(state: SimState, p: dict[str, Any]) -> Any:
    state.nvmf.must(p["nqn"])
    return []


_HOST = {"nqn": _r("str"), "host": _r("str"), "tgt_name": _b("str"), "psk": _b("any"),
         "dhchap_key": _b("str"), "dhchap_ctrlr_key": _b("str")}


@method("nvmf_subsystem_add_host", NVMF, **_HOST)
def _add_host(state: SimState, p: dict[str, Any]) -> Any:
    return state.nvmf.add_host(p)


@method("nvmf_subsystem_remove_host", NVMF, nqn=_r("str"), host=_r("str"), tgt_name=_b("str"))
def _remove_host(state: SimState, p: dict[str, Any]) -> Any:
    return state.nvmf.remove_host(p)


@method("nvmf_subsystem_set_keys", NVMF, nqn=_r("str"), host=_r("str"), tgt_name=_b("str"),
        dhchap_key=_b("str"), dhchap_ctrlr_key=_b("str"))
def _set_keys(state: SimState, p: dict[str, Any]) -> Any:
    return state.nvmf.set_keys(p)


@method("keyring_file_add_key", KEYRING, name=_r("str"), path=_r("str"))
def _add_key(state: SimState, p: dict[str, Any]) -> Any:
    return state.keyring.add_file_key(p["name"], p["path"])


@method("keyring_file_remove_key", KEYRING, name=_r("str"))
def _remove_key(state: SimState, p: dict[str, Any]) -> Any:
    return state.keyring.remove_file_key(p["name"])


@method("keyring_get_keys", "none")
def _get_keys(state: SimState, p: dict[str, Any]) -> Any:
    return state.keyring.json()
