"""Target-mode encryption in the agent's desired state (agent/state.py).

``accel_crypto_key_create`` is the one SPDK call that carries key material
inline (AES-XTS key and key2, hex). The record must never hold it in clear,
so the material goes to a 0600 file in ``<state dir>/crypto-keys`` (0700)
and the record keeps the key's name, cipher and that path, as it does for
keyring keys. ``accel_crypto_key_destroy`` removes file and entry.
``bdev_crypto_create``/``bdev_crypto_delete`` are recorded as they are (they
name the key, never hold it).

Replay after an spdk_tgt restart (which forgets every accel key and crypto
bdev while the lvols come back from disk): each recorded key is created again
from its file, then each recorded crypto bdev, before the subsystems' namespaces
that export them. SPDK's "rc -17" / "File exists" mean present already.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from .. import atomicfile
from ..spdk.errors import SpdkError

METHODS = frozenset({"accel_crypto_key_create", "accel_crypto_key_destroy",
                     "bdev_crypto_create", "bdev_crypto_delete"})
MATERIAL = ("key", "key2")


def _section(data: dict[str, Any]) -> dict[str, Any]:
    return data.setdefault("crypto", {"keys": {}, "bdevs": {}})


def key_dir(state_path: Path) -> Path:
    return state_path.parent / "crypto-keys"


def record(data: dict[str, Any], state_path: Path, method: str, p: dict[str, Any]) -> None:
    """Apply one forwarded crypto call to the record ``data`` (material to a file)."""
    section = _section(data)
    if method == "accel_crypto_key_create":
        name = p["name"]
        directory = key_dir(state_path)
        directory.mkdir(mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        path = directory / name
        atomicfile.write_bytes(path, "\n".join(str(p.get(k, "")) for k in MATERIAL).encode(),
                               0o600)
        section["keys"][name] = {**{k: v for k, v in p.items() if k not in MATERIAL},
                                 "path": str(path)}
    elif method == "accel_crypto_key_destroy":
        entry = section["keys"].pop(p["key_name"], None)
        if entry is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry["path"])
    elif method == "bdev_crypto_create":
        section["bdevs"][p["name"]] = dict(p)
    elif method == "bdev_crypto_delete":
        section["bdevs"].pop(p["name"], None)


def forget_base(data: dict[str, Any], lvol: str) -> None:
    """The lvol was deleted: SPDK hot-removed the crypto bdev on it."""
    bdevs = _section(data)["bdevs"]
    for name in [n for n, b in bdevs.items() if b.get("base_bdev_name") == lvol]:
        del bdevs[name]


def _load(entry: dict[str, Any]) -> dict[str, Any] | None:
    try:
        halves = Path(entry["path"]).read_text().split("\n")
    except OSError:
        return None
    params = {k: v for k, v in entry.items() if k != "path"}
    params.update({k: v for k, v in zip(MATERIAL, halves, strict=False) if v})
    return params


def replay(api, data: dict[str, Any], created: dict[str, list[str]],
           failed: list[dict[str, str]]) -> None:
    """Re-create the recorded accel keys and crypto bdevs that are missing."""
    section = data.get("crypto") or {}
    for name, entry in (section.get("keys") or {}).items():
        params = _load(entry)
        if params is None:
            failed.append({"object": f"crypto key {name}",
                           "error": f"key file {entry['path']} is missing"})
            continue
        try:
            api.call("accel_crypto_key_create", params)
        except SpdkError as err:
            if "rc -17" not in err.spdk_message:
                failed.append({"object": f"crypto key {name}",
                               "error": f"SPDK code {err.spdk_code}"})   # never the params
            continue
        created.setdefault("crypto_keys", []).append(name)
    for name, params in (section.get("bdevs") or {}).items():
        if api.bdev_get(name) is not None:
            continue
        try:
            api.call("bdev_crypto_create", params)
        except SpdkError as err:
            failed.append({"object": f"crypto bdev {name}", "error": str(err)})
            continue
        created.setdefault("crypto_bdevs", []).append(name)
