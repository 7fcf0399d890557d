"""NodeExpandVolume's wait for the kernel to see the grown namespace.

The kernel applies a namespace resize asynchronously after a rescan: the
block device is polled (short, growing steps) until it has the size the
controller expansion made, or UNAVAILABLE (the CO retries) after
``EXPAND_WAIT`` seconds.
"""

from __future__ import annotations

import time

from ..errors import FailedPrecondition, Unavailable
from .mount import Mounter

EXPAND_WAIT = 15.0


def wait_size(mounter: Mounter, device: str, required: int) -> int:
    """The size of ``device`` once it is at least ``required`` bytes."""
    deadline = time.monotonic() + EXPAND_WAIT
    interval = 0.02
    while True:
        try:
            size = mounter.block_size(device)
        except OSError as err:
            raise FailedPrecondition(f"cannot open {device}: {err}; restage the "
                                     "volume") from err
        if size >= required or time.monotonic() >= deadline:
            break
        time.sleep(interval)
        interval = min(interval * 2, 0.5)
    if size < required:
        raise Unavailable(f"{device} is {size} bytes, expected at least {required} after "
                          "the controller expansion; retry")
    return size
