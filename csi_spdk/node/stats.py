"""NodeGetVolumeStats below its guard clauses: what a volume uses, and what
is wrong with it (the volume condition).

A staged volume whose NVMe/TCP controller the kernel deleted (ctrl_loss_tmo
ran out while the target was away) is connected again from its stage
record; a filesystem mounted on the old device stays broken until the volume
is staged again (NodeStageVolume then remounts it), while a LUKS mapping
follows the new device by a dm table reload.
"""

from __future__ import annotations

import logging

from .. import contract
from ..errors import CsiError
from ..proto import csi_pb2
from .luks import Luks
from .mount import Mounter
from .records import StageRecord

log = logging.getLogger("csi_spdk.node")


def usage(mounter: Mounter, path: str) -> tuple[list[csi_pb2.VolumeUsage], list[str]]:
    """Bytes (and inodes of a filesystem) at ``path``, and the problem reading them."""
    Unit = csi_pb2.VolumeUsage
    out: list[csi_pb2.VolumeUsage] = []
    try:
        if mounter.is_block(path):
            out.append(Unit(unit=Unit.BYTES, total=mounter.block_size(path)))
        elif mounter.mounted_at(path) is not None:
            st = mounter.fs_stats(path)
            out += [Unit(unit=Unit.BYTES, total=st.total_bytes,
                         available=st.available_bytes, used=st.used_bytes),
                    Unit(unit=Unit.INODES, total=st.total_inodes,
                         available=st.free_inodes, used=st.used_inodes)]
    except OSError as err:
        return out, [f"cannot read {path}: {err.strerror or err}"]
    return out, []


def reconnect(initiator, luks: Luks, rec: StageRecord, timeout: float) -> str:
    """Connect a staged volume again from its record; what happened, for the
    volume condition."""
    pc = {contract.PC_NQN: rec.nqn, contract.PC_TRTYPE: "tcp",
          contract.PC_TRADDR: rec.traddr, contract.PC_TRSVCID: rec.trsvcid,
          contract.PC_NS_UUID: rec.ns_uuid}
    try:
        device = initiator.connect(pc, timeout)
    except CsiError as err:
        return f"the NVMe/TCP controller of {rec.nqn} was gone; reconnecting failed: " \
               f"{err.message}"
    log.warning("reconnected a staged volume", extra={"f": {
        "volume": rec.volume_id, "device": device}})
    if rec.mapper:
        return _repoint_luks(luks, rec, device)
    if device != rec.device and rec.access == "mount":
        return (f"the NVMe/TCP controller of {rec.nqn} was gone and was reconnected as "
                f"{device}; the filesystem mounted from {rec.device} must be staged again")
    return f"the NVMe/TCP controller of {rec.nqn} was gone and was reconnected"


def _repoint_luks(luks: Luks, rec: StageRecord, device: str) -> str:
    """encryption: node: the LUKS mapping follows the reconnected device by
    a dm table reload (luks.py ``repoint``: NodeGetVolumeStats has no
    secret to reopen it with, the reload needs none); the filesystem or
    block target on the mapping keeps its device."""
    was = f"the NVMe/TCP controller of {rec.nqn} was gone and was reconnected as {device}"
    try:
        open_ = luks.repoint(rec.mapper, device)
    except CsiError as err:
        return f"{was}, but its LUKS mapping {rec.mapper} could not follow it " \
               f"({err.message}); stage the volume again"
    if not open_:
        return f"{was}; its LUKS mapping {rec.mapper} is not open: stage the volume " \
               "again (NodeStageVolume opens it with the key from the node-stage secret)"
    return f"{was}; LUKS mapping {rec.mapper} reads from it again"
