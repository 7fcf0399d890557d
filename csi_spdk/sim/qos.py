"""``bdev_set_qos_limit`` as SPDK v25.09 does it (lib/bdev/bdev_rpc.c
``rpc_bdev_set_qos_limit`` + lib/bdev/bdev.c ``spdk_bdev_set_qos_rate_limits``).

What the real target does, step by step, and how it is modelled here:

1. The params decode as uint64 (a negative, fractional or > 2**64-1 value is
   -32603 "spdk_json_decode_object failed"). ``UINT64_MAX`` is SPDK's "not
   given" sentinel, so a key with that value counts as absent.
2. The RPC opens the bdev (missing: -19 "No such device"). Opening a bdev
   that has a QoS structure but no QoS thread (no consumer holds an I/O
   channel) starts QoS asynchronously and marks it "being changed".
3. No limit given: -22 "No rate limits specified".
4. IOPS are rounded up to a multiple of 1000 (with uint64 wrap-around, as in
   C); MB/s above ``UINT64_MAX / 2**20`` are clamped to that.
5. QoS "being changed" (step 2, or another change in flight): -32602
   "Failed to configure rate limit: Resource temporarily unavailable". So on
   a bdev nobody has opened, the first call that creates the QoS structure
   succeeds and every later call (a disable too) fails EAGAIN until a
   consumer opens it with an I/O channel (an nvmf namespace, or an lvstore
   on a base bdev: any claim). A crypto vbdev keeps a descriptor on its base
   but opens the base's channels only inside its own; once one was opened
   while QoS was enabled (by the examine of a crypto vbdev created on a base
   whose QoS is on, or by an nvmf namespace on the vbdev), the base's QoS
   runs on that thread for as long as the vbdev exists (``qos_thread``),
   exported or not. Checked on a real v25.09 target: QoS on, crypto vbdev
   created, changes accepted; crypto vbdev first, then QoS on, the second
   change EAGAIN until a namespace holds the vbdev, and accepted after that
   namespace is gone; EAGAIN again once the vbdev is deleted. Closing the
   last consumer keeps the limits (``bdev_qos_destroy`` copies them) and the
   EAGAIN returns.
6. Only zeros given and no other limit active: QoS is disabled and the
   structure freed (``assigned_rate_limits`` reads all 0 again). Otherwise a
   given 0 turns that one limit off and the structure stays.

The bdev keeps ``qos`` (the four values ``assigned_rate_limits`` reports, in
IOPS and MiB/s) and ``qos_active`` (SPDK's ``bdev->internal.qos != NULL``).
"""

from __future__ import annotations

import os
from typing import Any

from .state import EAGAIN, EINVAL, RpcError, SimState

UINT64_MAX = 2**64 - 1
QOS_KEYS = ("rw_ios_per_sec", "rw_mbytes_per_sec", "r_mbytes_per_sec", "w_mbytes_per_sec")
IOPS_KEYS = ("rw_ios_per_sec",)
MIN_IOS_PER_SEC = 1000                                  # SPDK_BDEV_QOS_MIN_IOS_PER_SEC
MAX_MBYTES_PER_SEC = UINT64_MAX // (1024 * 1024)        # SPDK_BDEV_QOS_MAX_MBYTES_PER_SEC


def _normalise(key: str, value: int) -> int:
    """SPDK's silent adjustment of one requested limit (step 4)."""
    if key in IOPS_KEYS:
        rest = value % MIN_IOS_PER_SEC
        return (value + MIN_IOS_PER_SEC - rest) % 2**64 if rest else value
    return min(value, MAX_MBYTES_PER_SEC)


def _has_channel(state: SimState, bdev) -> bool:
    """A consumer holds an I/O channel on ``bdev``: it is claimed, and when
    the claim is a crypto vbdev's, that vbdev has a consumer itself (the
    vbdev opens its base's channels only inside its own)."""
    if bdev.claim_type is None:
        return False
    over = [c for c in state.crypto.bdevs() if c.base is bdev]
    return not over or any(_has_channel(state, c) for c in over)


def set_qos_limit(state: SimState, p: dict[str, Any]) -> bool:
    bad = [k for k in QOS_KEYS if k in p and p[k] > UINT64_MAX]
    if bad:
        raise RpcError(-32603, "spdk_json_decode_object failed")
    bdev = state.must_bdev(p["name"])
    given = {k: p[k] for k in QOS_KEYS if k in p and p[k] != UINT64_MAX}
    if not given:
        raise RpcError(-EINVAL, "No rate limits specified")
    given = {k: _normalise(k, v) for k, v in given.items()}
    if bdev.qos_active and not bdev.qos_thread and not _has_channel(state, bdev):
        raise RpcError(-32602, "Failed to configure rate limit: " + os.strerror(EAGAIN))
    if bdev.claim_type is not None and any(c.base is bdev for c in state.crypto.bdevs()):
        bdev.qos_thread = _has_channel(state, bdev) or bdev.qos_thread
    disable = not any(given.values()) and not any(
        bdev.qos[k] for k in QOS_KEYS if k not in given)
    if disable:
        bdev.qos = dict.fromkeys(QOS_KEYS, 0)
        bdev.qos_active = False
        return True
    bdev.qos_active = True
    bdev.qos.update(given)
    return True
