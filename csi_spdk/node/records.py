"""The node's own state: one small JSON record per staged volume, and the
host NQN/ID files.

A stage record is written *before* connecting, so an unstage after a crash
or restart still knows which subsystem to disconnect. Every write is atomic
(temp file, fsync, rename): a crash leaves the old record or the new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass

from .. import contract

log = logging.getLogger("csi_spdk.node")


@dataclass
class StageRecord:
    """What unstage/publish/stats/expand need to know about a staged volume."""

    volume_id: str
    nqn: str
    ns_uuid: str
    staging_path: str
    access: str             # "block" or "mount"
    fstype: str = ""
    device: str = ""
    readonly: bool = False
    state: str = "connecting"   # "connecting" until the stage completed, then "staged"
    traddr: str = ""            # where to reconnect when the kernel dropped the controller
    trsvcid: str = ""
    mapper: str = ""            # encryption: node: the LUKS mapping over ``device``
    acked: str = ""             # dhchap: fingerprints of the pair acknowledged (rekey.py)


class StateStore:
    """Per-volume JSON records under ``<state_dir>/volumes``; atomic writes."""

    def __init__(self, state_dir: str) -> None:
        self.dir = os.path.join(state_dir, "volumes")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)

    def _path(self, volume_id: str) -> str:
        return os.path.join(self.dir, hashlib.sha256(volume_id.encode()).hexdigest()[:40]
                            + ".json")

    def load(self, volume_id: str) -> StageRecord | None:
        try:
            with open(self._path(volume_id), encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("unreadable stage record", extra={"f": {"volume": volume_id,
                                                                "error": str(err)}})
            return None
        known = StageRecord.__dataclass_fields__
        return StageRecord(**{k: v for k, v in data.items() if k in known})

    def save(self, rec: StageRecord) -> None:
        _atomic_write(self._path(rec.volume_id), json.dumps(asdict(rec), indent=1) + "\n")

    def delete(self, volume_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(volume_id))


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def persist_host_identity(state_dir: str, node_id: str) -> tuple[str, str]:
    """Write the derived host NQN/ID to ``state_dir/hostnqn`` and ``hostid``
    (for operators); warn when an existing file disagrees. Returns both."""
    os.makedirs(state_dir, exist_ok=True)
    values = {"hostnqn": contract.host_nqn(node_id), "hostid": contract.host_id(node_id)}
    for name, value in values.items():
        path = os.path.join(state_dir, name)
        try:
            with open(path, encoding="utf-8") as f:
                old = f.read().strip()
        except FileNotFoundError:
            old = None
        if old == value:
            continue
        if old is not None:
            log.warning("host identity file disagrees with the node id; rewriting it",
                        extra={"f": {"file": path, "old": old, "new": value,
                                     "node_id": node_id}})
        _atomic_write(path, value + "\n")
    return values["hostnqn"], values["hostid"]
