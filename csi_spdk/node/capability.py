"""Which volume capabilities the node serves, checked before any work.

Shared by stage, publish and expand: the access type (block or mount), a
supported access mode, and for a mounted filesystem a supported fsType and
no multi-node writer (a non-cluster filesystem must not be written by two
nodes).
"""

from __future__ import annotations

from ..errors import InvalidArgument
from ..proto import csi_pb2
from .mount import SUPPORTED_FS

Mode = csi_pb2.VolumeCapability.AccessMode
READ_ONLY_MODES = {Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY}
_SUPPORTED_MODES = {Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY,
                    Mode.MULTI_NODE_READER_ONLY, Mode.MULTI_NODE_SINGLE_WRITER,
                    Mode.MULTI_NODE_MULTI_WRITER, Mode.SINGLE_NODE_SINGLE_WRITER,
                    Mode.SINGLE_NODE_MULTI_WRITER}
# A mounted (non-cluster) filesystem must not be written by two nodes.
_MOUNT_REFUSED_MODES = {Mode.MULTI_NODE_MULTI_WRITER}


def access_type(cap: csi_pb2.VolumeCapability) -> str:
    kind = cap.WhichOneof("access_type")
    if kind not in ("block", "mount"):
        raise InvalidArgument("volume_capability needs an access type (block or mount)")
    return kind


def check_capability(cap: csi_pb2.VolumeCapability) -> str:
    """The access type of a capability this node serves; INVALID_ARGUMENT else."""
    kind = access_type(cap)
    if not cap.HasField("access_mode") or cap.access_mode.mode not in _SUPPORTED_MODES:
        raise InvalidArgument("volume_capability has no supported access mode")
    if kind == "mount":
        if cap.access_mode.mode in _MOUNT_REFUSED_MODES:
            raise InvalidArgument("a mounted filesystem cannot be MULTI_NODE_MULTI_WRITER; "
                                  "use volumeMode: Block")
        if cap.mount.fs_type and cap.mount.fs_type not in SUPPORTED_FS:
            raise InvalidArgument(f"fsType {cap.mount.fs_type!r} is not supported "
                                  f"(use one of {', '.join(SUPPORTED_FS)})")
    return kind


def is_read_only(cap: csi_pb2.VolumeCapability) -> bool:
    return cap.access_mode.mode in READ_ONLY_MODES
