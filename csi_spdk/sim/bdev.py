"""Simulated bdevs: the common JSON shape, malloc and aio, iostat (QoS: sim/qos.py).

Result shapes (key order included) follow what SPDK v25.09 returns for
``bdev_get_bdevs`` / ``bdev_get_iostat``, as recorded in spdk-golden/.
"""

from __future__ import annotations

import errno
import os
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any

from .state import EEXIST, EINVAL, ENODEV, SimState, errno_error

TICK_RATE = 2596100000
MEMORY_DOMAINS = [{"dma_device_id": "system", "dma_device_type": 1},
                  {"dma_device_id": "SPDK_ACCEL_DMA_DEVICE", "dma_device_type": 2}]
IO_TYPES = ("read", "write", "unmap", "flush", "reset", "nvme_admin", "nvme_io", "nvme_io_md",
            "write_zeroes", "zcopy", "get_zone_info", "zone_management", "zone_append",
            "compare", "compare_and_write", "abort", "seek_hole", "seek_data", "copy",
            "nvme_iov_md", "nvme_nssr")
QOS_KEYS = ("rw_ios_per_sec", "rw_mbytes_per_sec", "r_mbytes_per_sec", "w_mbytes_per_sec")
IOSTAT_OPS = ("read", "write", "unmap", "copy")


def io_types(*supported: str) -> dict[str, bool]:
    return {name: name in supported for name in IO_TYPES}


@dataclass
class IoStat:
    """Byte and op counters of one bdev (latencies are simulated as constant)."""

    counters: dict[str, int] = field(default_factory=dict)

    def add(self, op: str, nbytes: int, ops: int = 1) -> None:
        key = "unmapped" if op == "unmap" else ("copied" if op == "copy" else
                                                 ("read" if op == "read" else "written"))
        self.counters[f"bytes_{key}"] = self.counters.get(f"bytes_{key}", 0) + nbytes
        self.counters[f"num_{op}_ops"] = self.counters.get(f"num_{op}_ops", 0) + ops

    def reset(self) -> None:
        self.counters.clear()

    def json(self, with_errors: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for op, key in (("read", "read"), ("write", "written"), ("unmap", "unmapped"),
                        ("copy", "copied")):
            out[f"bytes_{key}"] = self.counters.get(f"bytes_{key}", 0)
            out[f"num_{op}_ops"] = self.counters.get(f"num_{op}_ops", 0)
        for op in IOSTAT_OPS:
            n = out[f"num_{op}_ops"]
            # Simulated latency: 1000 ticks per op (the golden test normalises ticks).
            out[f"{op}_latency_ticks"] = 1000 * n
            out[f"max_{op}_latency_ticks"] = 1000 if n else 0
            out[f"min_{op}_latency_ticks"] = 1000 if n else 0
        if with_errors:
            out["io_error"] = {}
        return out


class Bdev:
    """Base class of every simulated bdev."""

    product_name = "Unknown"
    supported: dict[str, bool] = io_types("read", "write")
    has_memory_domains = True

    def __init__(self, state: SimState, name: str, block_size: int, num_blocks: int,
                 uuid: str | None = None) -> None:
        self.state = state
        self.name = name
        self.uuid = uuid or str(uuidlib.uuid4())
        self.aliases: list[str] = [self.uuid]
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.claim_type: str | None = None      # "exclusive_write" / "read_many_write_one"
        self.qos = dict.fromkeys(QOS_KEYS, 0)
        self.qos_active = False                  # SPDK's bdev->internal.qos exists (sim/qos.py)
        self.qos_thread = False                  # its QoS runs on a thread (sim/qos.py)
        self.iostat = IoStat()
        self.channel_stat = IoStat()             # the one nvmf I/O channel, while open
        # SPDK's examine modules read every new bdev: 3 reads, 36 KiB + a block.
        self.iostat.add("read", 36864 + block_size, 3)

    @property
    def size(self) -> int:
        return self.block_size * self.num_blocks

    @property
    def opened(self) -> bool:
        """True while a consumer holds an I/O channel (nvmf namespace)."""
        return self.claim_type == "exclusive_write"

    def driver_specific(self) -> dict[str, Any]:
        return {}

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "aliases": list(self.aliases),
            "product_name": self.product_name, "block_size": self.block_size,
            "num_blocks": self.num_blocks, "preferred_write_alignment": 0,
            "preferred_write_granularity": 0, "optimal_write_size": 0,
            "preferred_unmap_alignment": 0, "preferred_unmap_granularity": 0,
            "uuid": self.uuid, "assigned_rate_limits": dict(self.qos),
            "claimed": self.claim_type is not None,
        }
        if self.claim_type is not None:
            out["claim_type"] = self.claim_type
        out["zoned"] = False
        out["supported_io_types"] = dict(self.supported)
        if self.has_memory_domains:
            out["memory_domains"] = [dict(d) for d in MEMORY_DOMAINS]
        out["driver_specific"] = self.driver_specific()
        return out

    def remove(self) -> None:
        """Called when the bdev is deleted (after consumers were hot-removed)."""


class MallocBdev(Bdev):
    product_name = "Malloc disk"
    supported = io_types("read", "write", "unmap", "flush", "reset", "write_zeroes", "zcopy",
                         "abort", "copy")


class AioBdev(Bdev):
    product_name = "AIO disk"
    supported = io_types("read", "write", "flush", "reset", "write_zeroes")
    has_memory_domains = False

    def __init__(self, state: SimState, name: str, block_size: int, num_blocks: int,
                 filename: str, block_size_override: bool, readonly: bool,
                 fallocate: bool, uuid: str | None = None) -> None:
        super().__init__(state, name, block_size, num_blocks, uuid)
        self.filename = filename
        self.block_size_override = block_size_override
        self.readonly = readonly
        self.fallocate = fallocate

    def driver_specific(self) -> dict[str, Any]:
        return {"aio": {"filename": self.filename,
                        "block_size_override": self.block_size_override,
                        "readonly": self.readonly, "fallocate": self.fallocate}}


VALID_BLOCK_SIZES = (512, 520, 528, 4096, 4160, 4224)


def malloc_create(state: SimState, p: dict[str, Any]) -> str:
    block_size = p["block_size"]
    num_blocks = p["num_blocks"]
    if block_size not in VALID_BLOCK_SIZES or block_size % 512 or num_blocks == 0:
        raise errno_error(EINVAL)
    name = p.get("name")
    if not name:    # the counter moves only once the options passed validation
        name = f"Malloc{state.malloc_counter}"
        state.malloc_counter += 1
    uuid = p.get("uuid")
    if uuid is not None:
        try:
            uuid = str(uuidlib.UUID(uuid))
        except ValueError:
            raise errno_error(EINVAL) from None
    if state.name_taken(name) or (uuid is not None and state.name_taken(uuid)):
        raise errno_error(EEXIST)
    state.register_bdev(MallocBdev(state, name, block_size, num_blocks, uuid))
    return name


def _logical_block_size(path: str) -> int:
    """BLKSSZGET of a block device; 0 for a regular file (``spdk_fd_get_blocklen``)."""
    import fcntl
    import struct
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0
    try:
        return struct.unpack("I", fcntl.ioctl(fd, 0x1268, b"\0" * 4))[0]
    except OSError:
        return 0
    finally:
        os.close(fd)


def aio_create(state: SimState, p: dict[str, Any]) -> str:
    """``create_aio_bdev``'s order: open, block size, size, then the name (register).

    A regular file has no detectable block size, so ``block_size`` is required
    for one (EINVAL without it).
    """
    name = p["name"]
    filename = p["filename"]
    if p.get("fallocate"):
        raise errno_error(errno.ENOTSUP)
    flags = os.O_RDONLY if p.get("readonly") else os.O_RDWR
    try:
        os.close(os.open(filename, flags))
        st = os.stat(filename)
    except OSError as err:
        raise errno_error(err.errno or EINVAL) from None
    detected = _logical_block_size(filename)
    block_size = p.get("block_size") or 0
    if block_size == 0:
        if detected == 0:
            raise errno_error(EINVAL)
        block_size = detected
    elif block_size < detected:
        raise errno_error(EINVAL)
    if block_size < 512 or block_size & (block_size - 1):
        raise errno_error(EINVAL)
    size = st.st_size
    if size % block_size:
        raise errno_error(EINVAL)
    if state.name_taken(name) or (p.get("uuid") and state.name_taken(p["uuid"])):
        raise errno_error(EEXIST)
    bdev = AioBdev(state, name, block_size, size // block_size, filename,
                   block_size_override=bool(p.get("block_size")),
                   readonly=bool(p.get("readonly", False)),
                   fallocate=bool(p.get("fallocate", False)), uuid=p.get("uuid"))
    state.register_bdev(bdev)
    state.persist.examine(bdev)          # an lvstore on the file loads, as in SPDK
    return name


def delete_typed(state: SimState, name: str, cls: type[Bdev]) -> bool:
    bdev = state.find_bdev(name)
    if bdev is None or not isinstance(bdev, cls):
        raise errno_error(ENODEV)
    state.unregister_bdev(bdev)
    bdev.remove()
    return True


def completion_order(bdevs: list[Bdev]) -> list[Bdev]:
    """The order ``bdev_get_iostat`` (all) answers in: its per-bdev stats finish
    asynchronously (one message hop per thread holding an I/O channel), so
    bdevs without a channel come first, then the ones an nvmf poll group has
    open, then lvstore base bdevs (blobstore channels); registration order
    within each group, as recorded on spdk_tgt v25.09 with one reactor.
    """
    def rank(bdev: Bdev) -> int:
        return {None: 0, "exclusive_write": 1}.get(bdev.claim_type, 2)
    return sorted(bdevs, key=rank)


def iostat(state: SimState, p: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"tick_rate": TICK_RATE, "ticks": state.ticks()}
    if "name" in p:
        bdev = state.must_bdev(p["name"])
        bdevs = [bdev]
    else:
        bdevs = completion_order(state.bdevs)
    if p.get("per_channel"):
        if len(bdevs) != 1:
            raise errno_error(EINVAL)
        bdev = bdevs[0]
        out["name"] = bdev.name
        channels = []
        if bdev.opened:
            channels.append({"thread_id": 2, **bdev.channel_stat.json(with_errors=False)})
        out["channels"] = channels
        return out
    out["bdevs"] = [{"name": b.name, **b.iostat.json()} for b in bdevs]
    return out


def reset_iostat(state: SimState, p: dict[str, Any]) -> bool:
    if "name" in p:
        bdev = state.must_bdev(p["name"])
        bdevs = [bdev]
    else:
        bdevs = list(state.bdevs)
    for bdev in bdevs:
        bdev.iostat.reset()
        bdev.channel_stat.reset()
    return True
