"""NodePublishVolume's binds below the guard clauses: a staged volume's
device (block) or staging mount (mount) at the pod's target path.

Idempotent: this volume already at the target with the same read-only flag
is success, with another flag ALREADY_EXISTS, something else there
FAILED_PRECONDITION. A read-only block publish binds a read-only loop device
over the device (``readonly_block.py``): a read-only bind of the device node
itself would not stop writes to it.
"""

from __future__ import annotations

import os

from ..errors import AlreadyExists, FailedPrecondition
from .mount import Mounter, MountInfo
from .readonly_block import ReadOnlyLoops


def _check_existing(target: str, same: bool, readonly: bool, existing: MountInfo) -> None:
    if not same:
        raise FailedPrecondition(f"target path {target} already has {existing.source} "
                                 "mounted, which is not this volume")
    if existing.readonly != readonly:
        raise AlreadyExists(f"volume is already published at {target} with "
                            f"readonly={existing.readonly}")


def publish_block(mounter: Mounter, ro_loops: ReadOnlyLoops, *, volume_id: str,
                  device: str, target: str, readonly: bool) -> None:
    if not device or not os.path.exists(device):
        raise FailedPrecondition(f"the block device of {volume_id} is gone; "
                                 "restage the volume")
    existing = mounter.mounted_at(target)
    if existing is not None:
        ro = ro_loops.load(target)
        source = ro["loop"] if ro is not None else device
        try:
            same = os.stat(target).st_rdev == os.stat(source).st_rdev
        except OSError:
            same = False
        _check_existing(target, same, readonly, existing)
        return
    if os.path.isdir(target):
        try:
            os.rmdir(target)
        except OSError as err:
            raise FailedPrecondition(f"block target {target} is a non-empty "
                                     "directory") from err
    if not readonly:
        mounter.bind_device(device, target)
        return
    # A read-only bind of the device node would not stop writes to it.
    loop = ro_loops.attach(volume_id, target, device)
    try:
        mounter.bind_device(loop, target, readonly=True)
    except Exception:
        ro_loops.detach(target)
        raise


def publish_mount(mounter: Mounter, *, staging: str, target: str, readonly: bool) -> None:
    staged = mounter.mounted_at(staging)
    if staged is None:
        raise FailedPrecondition(f"staging path {staging} is not mounted; restage the "
                                 "volume")
    os.makedirs(target, exist_ok=True)
    existing = mounter.mounted_at(target)
    if existing is not None:
        same = existing.major_minor == staged.major_minor and existing.root == staged.root
        _check_existing(target, same, readonly, existing)
        return
    mounter.bind_mount(staging, target, readonly)
