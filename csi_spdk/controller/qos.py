"""Per-volume rate limits: StorageClass / VolumeAttributesClass parameters
applied with SPDK's ``bdev_set_qos_limit`` to the volume's lvol bdev.

Four keys, each ``0`` or absent = unlimited (docs/DESIGN.md, "QoS"):
``maxIOPS`` (read+write IOPS), ``maxMBps`` (read+write MiB/s), ``maxReadMBps``,
``maxWriteMBps``. SPDK v25.09 silently rounds IOPS up to a multiple of 1000
and clamps MiB/s at ``UINT64_MAX / 2**20``; the driver *rejects* values that
SPDK would change (INVALID_ARGUMENT naming the accepted ones) instead, so a
StorageClass or VolumeAttributesClass always reads as what is enforced.

SPDK quirk that shapes ``apply``: on a bdev that no consumer has open (a
volume that is not published), the first QoS call succeeds but every later
one fails EAGAIN until something opens an I/O channel (spdk-golden 08 and
``sim/qos.py``). So a change to an unpublished volume whose limits are
already set first "holds" the volume open: its NVMe-oF subsystem with the
namespace but no listener and no host (nobody can connect), then the set,
then the subsystem is deleted again. A crash in between leaves exactly the
state of a publish interrupted after the namespace step, which the next
publish completes, the next unpublish/DeleteVolume removes, and the next
ControllerModifyVolume releases (``release_hold``).

A change already matching what SPDK enforces makes no SPDK call (idempotent,
and it never meets the EAGAIN). Concurrency: callers hold the volume's lock;
an EAGAIN that persists on an exported volume (someone else is changing its
QoS, e.g. a replay after a target restart) is ABORTED.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .. import contract
from ..errors import Aborted, InvalidArgument, NotFound
from ..spdk.errors import SpdkBusy, SpdkNotFound
from ..spdk.intents import stacked
from . import crypto

if TYPE_CHECKING:
    from .target import Target

# parameter key -> bdev_set_qos_limit / assigned_rate_limits key
SPDK_KEYS = {
    "maxIOPS": "rw_ios_per_sec",
    "maxMBps": "rw_mbytes_per_sec",
    "maxReadMBps": "r_mbytes_per_sec",
    "maxWriteMBps": "w_mbytes_per_sec",
}
MUTABLE_KEYS = tuple(SPDK_KEYS)
IOPS_STEP = 1000                                   # SPDK_BDEV_QOS_MIN_IOS_PER_SEC
UINT64_MAX = 2**64 - 1                             # SPDK's "not given" sentinel
MAX_IOPS = (UINT64_MAX - 1) // IOPS_STEP * IOPS_STEP
MAX_MBPS = UINT64_MAX // (1024 * 1024)             # SPDK_BDEV_QOS_MAX_MBYTES_PER_SEC
BUSY_RETRIES = 5
BUSY_DELAY = 0.02                                  # seconds, times the attempt number

Limits = dict[str, int]   # SPDK key -> value; 0 = off


def _value(where: str, key: str, raw: str) -> int:
    text = raw.strip()
    if not text.isascii() or not text.isdigit():
        raise InvalidArgument(f"{where} {key}={raw!r} must be a whole number >= 0 "
                              "(0 = unlimited)")
    value = int(text)
    if key == "maxIOPS":
        if value > MAX_IOPS:
            raise InvalidArgument(f"{where} maxIOPS={value} is too large (at most {MAX_IOPS})")
        if value % IOPS_STEP:
            down, up = value // IOPS_STEP * IOPS_STEP, (value // IOPS_STEP + 1) * IOPS_STEP
            near = f"{down} or {up}" if down else f"{up}"
            raise InvalidArgument(
                f"{where} maxIOPS={value} is not accepted: SPDK enforces IOPS limits in "
                f"steps of {IOPS_STEP} and would silently use {up}; use 0 (unlimited) or a "
                f"multiple of {IOPS_STEP}, e.g. {near}")
    elif value > MAX_MBPS:
        raise InvalidArgument(f"{where} {key}={value} is too large: SPDK caps MiB/s at "
                              f"{MAX_MBPS} and would silently use that")
    return value


def parse(params: Mapping[str, str], where: str = "parameter") -> Limits:
    """The QoS keys present in ``params``, validated (other keys are ignored)."""
    return {SPDK_KEYS[k]: _value(where, k, params[k]) for k in MUTABLE_KEYS if k in params}


def parse_mutable(params: Mapping[str, str], immutable: tuple[str, ...] = (),
                  where: str = "mutable_parameters") -> Limits:
    """``mutable_parameters`` (a VolumeAttributesClass): only the QoS keys."""
    for key in params:
        if key in MUTABLE_KEYS:
            continue
        accepted = ", ".join(MUTABLE_KEYS)
        if key in immutable:
            raise InvalidArgument(f"{where}: {key!r} cannot be changed after creation (set it "
                                  f"in the StorageClass); mutable keys: {accepted}")
        raise InvalidArgument(f"{where}: unknown key {key!r}; mutable keys: {accepted}")
    return parse(params, where)


def full(limits: Limits) -> Limits:
    """All four limits, the absent ones off (what CreateVolume asks for)."""
    return {k: limits.get(k, 0) for k in SPDK_KEYS.values()}


def in_force(bdev: Mapping | None) -> Limits:
    """The limits SPDK enforces on a bdev (``assigned_rate_limits``)."""
    got = (bdev or {}).get("assigned_rate_limits") or {}
    return {k: int(got.get(k) or 0) for k in SPDK_KEYS.values()}


def context(limits: Mapping[str, int]) -> dict[str, str]:
    """volume_context entries for the limits in force (contract.VC_QOS_KEYS);
    a limit that is off has no entry."""
    return {contract.VC_QOS_KEYS[k]: str(v) for k, v in limits.items() if v}


def apply(target: Target, lvol_uuid: str, wanted: Limits, now: Limits | None = None) -> Limits:
    """Make SPDK enforce ``wanted`` (keys not in it stay as they are); returns
    the limits in force afterwards. ``now``: the limits in force as the caller
    just read them (``Lvol.qos``), saving the read; one more read only when
    something changed."""
    if now is None:
        bdev = target.api.bdev_get(lvol_uuid)
        if bdev is None:
            raise NotFound(f"volume lvol {lvol_uuid} does not exist on target {target.name}")
        now = in_force(bdev)
    change = {k: v for k, v in wanted.items() if now[k] != v}
    if not change:
        return now
    try:
        target.api.set_qos(lvol_uuid, **change)
    except SpdkBusy:
        _set_held_open(target, lvol_uuid, change)
    except SpdkNotFound as err:
        raise NotFound(f"volume lvol {lvol_uuid} does not exist") from err
    bdev = target.api.bdev_get(lvol_uuid)
    if bdev is None:
        raise NotFound(f"volume lvol {lvol_uuid} vanished while its QoS was set")
    return in_force(bdev)


def release_hold(target: Target, lvol_uuid: str) -> None:
    """Delete a hold that a crash left behind (the volume's subsystem with no
    host and no listener); one RPC. A published volume is left alone. A hold
    through a target-mode crypto bdev (``NvmfExporter.hold_open``) takes that
    bdev and its key with it: unpublished, nothing else uses them."""
    sub = target.exporter.subsystem(lvol_uuid)
    if sub is not None and not sub.get("hosts") and not sub.get("listen_addresses"):
        target.exporter.delete(lvol_uuid)
        if stacked(lvol_uuid, sub):
            crypto.unstack(target.api, lvol_uuid)


def _set_held_open(target: Target, lvol_uuid: str, change: Limits) -> None:
    """The set again while the volume's subsystem holds the bdev open."""
    exporter = target.exporter
    sub = exporter.subsystem(lvol_uuid)
    hold = not exporter.hosts_of(sub)        # not published (or a crashed hold)
    held = exporter.hold_open(lvol_uuid, sub) if hold else ""
    try:
        for attempt in range(1, BUSY_RETRIES + 1):
            try:
                target.api.set_qos(lvol_uuid, **change)
                return
            except SpdkBusy as err:
                if attempt == BUSY_RETRIES:
                    raise Aborted(f"the QoS limits of volume lvol {lvol_uuid} are being "
                                  f"changed by someone else (SPDK: {err.spdk_message}); "
                                  "retry") from err
                time.sleep(BUSY_DELAY * attempt)
    finally:
        if hold:
            exporter.delete(lvol_uuid)
        if held == contract.crypto_bdev_name(lvol_uuid):
            crypto.unstack(target.api, lvol_uuid)   # left over from a crash: unpublished
