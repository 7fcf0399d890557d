"""JSON-RPC table entries of the accel crypto keys and the crypto vbdev (sim/crypto.py)."""

from __future__ import annotations

from typing import Any

from .methods import ACCEL, _b, _r, method
from .state import SimState


@method("accel_crypto_key_create", ACCEL, cipher=_r("str"), key=_r("str"), key2=_b("str"),
        tweak_mode=_b("str"), name=_r("str"))
def _key_create(state: SimState, p: dict[str, Any]) -> Any:
    return state.crypto.key_create(p)


@method("accel_crypto_keys_get", ACCEL, key_name=_b("str"))
def _keys_get(state: SimState, p: dict[str, Any]) -> Any:
    return state.crypto.keys_get(p)


@method("accel_crypto_key_destroy", ACCEL, key_name=_r("str"))
def _key_destroy(state: SimState, p: dict[str, Any]) -> Any:
    return state.crypto.key_destroy(p)


@method("bdev_crypto_create", base_bdev_name=_r("str"), name=_r("str"), crypto_pmd=_b("str"),
        key=_b("str"), cipher=_b("str"), key2=_b("str"), key_name=_b("str"))
def _crypto_create(state: SimState, p: dict[str, Any]) -> Any:
    return state.crypto.create(p)


@method("bdev_crypto_delete", name=_r("str"))
def _crypto_delete(state: SimState, p: dict[str, Any]) -> Any:
    return state.crypto.delete(p)
