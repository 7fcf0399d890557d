"""The guest benchmarks' load generator (benchmarks/encryption.py, qos.py):
``threads`` threads doing O_DIRECT ``pwritev``/``preadv`` of one block size on
a block device for a fixed time, sequential (each thread its own stride) or
random, queue depth = threads.

Copied into the guest next to the benchmark that imports it (``GUEST_FILES``),
so it needs nothing but the standard library.
"""

from __future__ import annotations

import mmap
import os
import random
import threading
import time
from pathlib import Path

MiB = 1 << 20
GUEST_PATH = "/root/io_load.py"
GUEST_FILES = {GUEST_PATH: Path(__file__).resolve()}


def load(dev: str, write: bool, block: int, threads: int, seconds: float, *,
         span_bytes: int, rand: bool = False) -> dict:
    """I/O over the first ``span_bytes`` of ``dev`` for ``seconds``: ops, time,
    ops/s and MiB/s (a short read or write is an error, not a figure)."""
    span = span_bytes // block
    counts = [0] * threads
    errors: list[BaseException] = []
    stop = time.monotonic() + seconds

    def worker(i: int) -> None:
        try:
            fd = os.open(dev, (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT)
        except OSError as err:
            errors.append(err)
            return
        buf = mmap.mmap(-1, block)            # page-aligned, as O_DIRECT needs
        buf.write(os.urandom(block))
        rng = random.Random(i)
        try:
            k = i
            while time.monotonic() < stop:
                off = (rng.randrange(span) if rand else k % span) * block
                n = os.pwritev(fd, [buf], off) if write else os.preadv(fd, [buf], off)
                if n != block:
                    raise OSError(f"short I/O: {n} of {block} bytes")
                counts[i] += 1
                k += threads
        except BaseException as err:  # reported by the caller's thread
            errors.append(err)
        finally:
            os.close(fd)

    t0 = time.monotonic()
    ws = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for w in ws:
        w.start()
    for w in ws:
        w.join()
    if errors:
        raise errors[0]
    took = time.monotonic() - t0
    ops = sum(counts)
    return {"ops": ops, "seconds": took, "iops": ops / took, "mibps": ops * block / took / MiB,
            "block": block, "threads": threads, "write": write}
