"""NodeStageVolume's and NodeUnstageVolume's steps below the guard clauses:
the filesystem mount at the staging path, and the wait for a live path
before an unmount.

The staging mount is idempotent: the same device already mounted there is
success; our own stage whose namespace came back as another device (the
kernel dropped the controller) is remounted; anything else at the path is
refused, never mounted over. A read-only volume is never formatted.
"""

from __future__ import annotations

import logging
import os
import time

from ..errors import FailedPrecondition
from ..proto import csi_pb2
from .luks import Luks
from .mount import Mounter
from .records import StageRecord

log = logging.getLogger("csi_spdk.node")


def same_device(mounter: Mounter, mount_major_minor: str, device: str) -> bool:
    try:
        return mounter.device_number(device) == mount_major_minor
    except OSError:
        return False


def mount_staging(mounter: Mounter, luks: Luks, *, device: str, staging: str,
                  cap: csi_pb2.VolumeCapability, want_fs: str, readonly: bool,
                  previous: StageRecord | None = None) -> str:
    """Mount ``device`` (the namespace or its LUKS mapping) at ``staging``,
    making a filesystem when it has none and may be written; the fstype."""
    existing = mounter.mounted_at(staging)
    if existing is not None:
        if same_device(mounter, existing.major_minor, device) and existing.root == "/":
            return existing.fstype
        old = luks.path(previous.mapper) if previous is not None and \
            previous.mapper else previous.device if previous is not None else ""
        if previous is not None and previous.state == "staged" and old \
                and old != device and existing.source == old:
            # Our own stage, but the kernel dropped that controller and the
            # namespace came back as another device: the old mount is dead.
            log.warning("staged volume's device was replaced; remounting", extra={"f": {
                "volume": previous.volume_id, "old": previous.device, "new": device}})
            mounter.unmount(staging)
            existing = None
    if existing is not None:
        raise FailedPrecondition(f"staging path {staging} already has {existing.source} "
                                 f"({existing.fstype}) mounted; refusing to stage over it")
    if readonly:
        found = mounter.probe(device)
        if not found.fstype:
            raise FailedPrecondition(f"read-only volume on {device} has no filesystem "
                                     "and cannot be formatted")
        fstype = found.fstype
        if want_fs and fstype != want_fs:
            raise FailedPrecondition(f"{device} holds {fstype}, not {want_fs}")
    else:
        fstype, _ = mounter.ensure_filesystem(device, want_fs)
    os.makedirs(staging, exist_ok=True)
    mounter.mount(device, staging, fstype, mount_flags(cap, fstype, readonly))
    return fstype


def mount_flags(cap: csi_pb2.VolumeCapability, fstype: str, readonly: bool) -> list[str]:
    """The capability's flags; read-only also skips the journal replay (a
    replay would write to the device)."""
    flags = list(cap.mount.mount_flags)
    if readonly:
        flags.append("ro")
        if fstype == "xfs":
            flags.append("norecovery")
        elif fstype == "ext4":
            flags.append("noload")
    return flags


def wait_live(initiator, nqn: str, grace: float) -> bool:
    """Wait up to ``grace`` seconds for a live path to ``nqn``."""
    deadline = time.monotonic() + grace
    while not initiator.path_live(nqn):
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    return True
