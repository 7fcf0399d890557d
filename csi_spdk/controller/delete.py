"""DeleteVolume below its guard clauses: the delete intent, and the reclaim
of what the volume held up.

A target-mode crypto bdev holds its lvol open, so the first intent fails;
it has then deleted the subsystem (no host was allowed), and the crypto bdev
can go before the intent is sent again. After the delete, the volume's
hidden parent snapshots are reclaimed; a retry of a delete cut short (a
crash between the delete and that reclaim) finishes it with one sweep.
"""

from __future__ import annotations

from typing import Any

from ..spdk.errors import SpdkError
from .encryption import VolumeEncryption
from .target import Lvol, Target, Targets


def delete_lvol(target: Target, uuid: str,
                encryption: VolumeEncryption) -> tuple[dict[str, Any] | None, bool | None]:
    """The lvol the intent found (None: it was already gone), and whether a
    crypto bdev was on it (None: not known). Raises the intent's IntentError."""
    try:
        result = target.api.intent("delete_volume", {"uuid": uuid})
    except SpdkError:
        # a target-mode crypto bdev holds the lvol open: the intent
        # deleted the subsystem (no host was allowed), so it can go now;
        # any other failure is the caller's to see
        if not encryption.stacked(target.api, uuid):
            raise
        encryption.unexported(target.api, uuid, True)
        result = target.api.intent("delete_volume", {"uuid": uuid})
    found = result["bdev"]
    # whether a crypto bdev was on it, from what the intent read (no
    # look-up of its own); only an lvol the intent found can say "nothing"
    return found, result.get("stacked") if found is not None else None


def reclaim_after_delete(targets: Targets, target: Target, found: dict[str, Any] | None) -> None:
    lv = Lvol.from_bdev(found)
    if lv is not None:
        # The reclaim of its hidden parents reads the lineage after the
        # delete, under the lock DeleteSnapshot holds while it reads the
        # clones: the two cannot interleave into an unreclaimed snapshot.
        with target.lineage:
            target.deleted_lvol(lv)
    elif target.take_unfinished():
        # Maybe a retry after a crash between the delete and the reclaim of
        # the volume's internal parent snapshot: finish that (one scan).
        # Only when a delete may have been cut short since the last sweep
        # (this process's start counts): a retry after a lost reply, or
        # any other delete of a missing volume, makes no scan.
        try:
            target.sweep(targets.busy())
        except BaseException:
            target.unfinished_delete()
            raise
