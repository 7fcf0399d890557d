"""Filesystems and mounts on the node: probe, mkfs-if-empty, mount, bind, unmount, resize.

Safety rule: a device is formatted only when ``blkid -p`` (low-level probe,
bypassing the blkid cache) finds *nothing* on it: no filesystem, no partition
table, no RAID/LVM/crypto or any other signature. ``mkfs.xfs`` runs without
``-f`` and ``mkfs.ext4`` without ``-F`` (stdin closed), so the mkfs tools
refuse on their own too if a signature appeared in between.

"What is mounted at this path" is read from ``/proc/self/mountinfo`` (the
topmost mount of a path wins), never from ``mount`` output.

Concurrency/idempotency contract: ``Mounter`` holds no state; callers serialise
work on the same device/path (the Node service's per-volume lock). ``mount``,
``bind_mount`` and ``bind_device`` are NOT idempotent by themselves (the caller
checks ``mounted_at`` first, because only the caller knows what *should* be
mounted there); ``unmount`` is idempotent (a path that is not mounted, or does
not exist, is success).
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
from dataclasses import dataclass

from .. import blkid
from ..errors import FailedPrecondition, Internal, InvalidArgument

log = logging.getLogger("csi_spdk.mount")

SUPPORTED_FS = ("ext4", "xfs")
DEFAULT_FS = "ext4"
_TIMEOUT = 600.0
# The smallest device each mkfs formats: xfsprogs >= 5.19 refuses data devices
# under 300 MiB ("Filesystem must be larger than 300MB."); mke2fs needs 128 KiB.
MIN_FS_BYTES = {"xfs": 300 << 20, "ext4": 128 << 10}
# What mkfs prints when the device is too small (for minimums of other versions).
_TOO_SMALL = ("must be larger than", "too small", "not enough space")


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    major_minor: str     # "7:0": the device backing the mount
    root: str            # path inside the filesystem ("/" or a bind source)
    mount_point: str
    options: tuple[str, ...]   # per-mount options ("rw", "ro", "nosuid", ...)
    fstype: str
    source: str

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


@dataclass(frozen=True)
class Probe:
    """What ``blkid -p`` found on a device. ``empty`` means nothing at all."""

    fstype: str = ""     # TYPE
    usage: str = ""      # USAGE: filesystem, raid, crypto, other
    pttype: str = ""     # PTTYPE: a partition table

    @property
    def empty(self) -> bool:
        return not (self.fstype or self.usage or self.pttype)

    def describe(self) -> str:
        parts = [f"TYPE={self.fstype}" if self.fstype else "",
                 f"USAGE={self.usage}" if self.usage else "",
                 f"PTTYPE={self.pttype}" if self.pttype else ""]
        return " ".join(p for p in parts if p) or "nothing"


@dataclass(frozen=True)
class FsStats:
    total_bytes: int
    available_bytes: int
    used_bytes: int
    total_inodes: int
    free_inodes: int
    used_inodes: int


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountInfo]:
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        f, r = left.split(), right.split()
        if len(f) < 6 or len(r) < 2:
            continue
        mounts.append(MountInfo(int(f[0]), f[2], _unescape(f[3]), _unescape(f[4]),
                                tuple(f[5].split(",")), r[0], _unescape(r[1])))
    return mounts


class Mounter:
    """Runs the mount/mkfs/resize tools. ``mountinfo`` is overridable for tests."""

    def __init__(self, mountinfo: str = "/proc/self/mountinfo") -> None:
        self.mountinfo = mountinfo

    # --- helpers --------------------------------------------------------------
    @staticmethod
    def run(args: list[str], what: str, ok: tuple[int, ...] = (0,)
            ) -> subprocess.CompletedProcess:
        try:
            res = subprocess.run(args, capture_output=True, text=True, timeout=_TIMEOUT,
                                 stdin=subprocess.DEVNULL, check=False)
        except FileNotFoundError as err:
            raise Internal(f"{args[0]} is not installed on this node ({what})") from err
        except subprocess.TimeoutExpired as err:
            raise Internal(f"{what}: {' '.join(args)} did not finish in {_TIMEOUT:.0f}s") \
                from err
        if res.returncode not in ok:
            raise Internal(f"{what} failed: {' '.join(args)} (exit {res.returncode}): "
                           f"{(res.stderr or res.stdout).strip()}")
        return res

    # --- probing and formatting ---------------------------------------------
    def probe(self, device: str) -> Probe:
        """Low-level probe of ``device``; raises if blkid cannot tell.

        In process with libblkid (``blkid.probe``, the same calls as
        ``blkid -p``); the ``blkid`` command when libblkid is not loadable."""
        try:
            found = blkid.probe(device)
        except blkid.ProbeError as err:
            raise Internal(f"probing {device} failed: {err}") from err
        if found is not None:
            return Probe(found.get("TYPE", ""), found.get("USAGE", ""), found.get("PTTYPE", ""))
        res = self.run(["blkid", "-p", "-o", "export", device], f"probing {device}",
                       ok=(0, 2))
        if res.returncode == 2:
            return Probe()
        values = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
        return Probe(values.get("TYPE", ""), values.get("USAGE", ""), values.get("PTTYPE", ""))

    def ensure_filesystem(self, device: str, fstype: str = "", options: list[str] = ()
                          ) -> tuple[str, bool]:
        """Make sure ``device`` carries a filesystem; return (fstype, formatted).

        ``fstype`` empty means "whatever is there, else ext4". A device with a
        different filesystem than an explicitly requested one, or with any
        non-filesystem signature, is refused (FAILED_PRECONDITION) and never
        touched.
        """
        if fstype and fstype not in SUPPORTED_FS:
            raise InvalidArgument(f"fsType {fstype!r} is not supported "
                                  f"(use one of {', '.join(SUPPORTED_FS)})")
        found = self.probe(device)
        if found.empty:
            want = fstype or DEFAULT_FS
            size = self._size_or_none(device)
            if size is not None and size < MIN_FS_BYTES.get(want, 0):
                raise self._too_small(device, want, size)
            try:
                self.mkfs(device, want, options)
            except Internal as err:
                if any(p in str(err).lower() for p in _TOO_SMALL):
                    raise self._too_small(device, want, size, str(err)) from err
                raise
            return want, True
        if found.usage == "filesystem" and found.fstype and not found.pttype:
            if fstype and found.fstype != fstype:
                raise FailedPrecondition(
                    f"{device} already holds a {found.fstype} filesystem but {fstype} was "
                    "requested; refusing to reformat a device that holds data")
            return found.fstype, False
        raise FailedPrecondition(f"{device} is not empty ({found.describe()}); refusing to "
                                 "format it")

    def _size_or_none(self, device: str) -> int | None:
        try:
            return self.block_size(device)
        except OSError:
            return None     # mkfs reports why it cannot open the device

    @staticmethod
    def _too_small(device: str, fstype: str, size: int | None, detail: str = ""
                   ) -> FailedPrecondition:
        """FAILED_PRECONDITION, not INVALID_ARGUMENT: the request is valid, the
        volume's current size is not; expanding the volume fixes it."""
        have = f"{size} bytes ({size / (1 << 20):.1f} MiB)" if size is not None else \
            "too small"
        need = MIN_FS_BYTES.get(fstype, 0)
        need_s = f"at least {need} bytes ({need / (1 << 20):g} MiB)" if need else \
            "a larger device"
        msg = (f"cannot create a {fstype} filesystem on {device}: the volume is {have}, "
               f"{fstype} needs {need_s}; expand the volume or use another fsType "
               "(nothing was written to the device)")
        return FailedPrecondition(msg + (f" [{detail}]" if detail else ""))

    def mkfs(self, device: str, fstype: str, options: list[str] = ()) -> None:
        # nodiscard: a fresh lvol is already unmapped; discarding it all over
        # the network only costs time.
        if fstype == "ext4":
            args = ["mkfs.ext4", "-q", "-E", "nodiscard", *options, device]
        elif fstype == "xfs":
            args = ["mkfs.xfs", "-q", "-K", *options, device]
        else:
            raise InvalidArgument(f"cannot create a {fstype!r} filesystem")
        self.run(args, f"creating {fstype} on {device}")
        log.info("formatted", extra={"f": {"device": device, "fstype": fstype}})

    # --- mounting ---------------------------------------------------------------
    def mounts(self) -> list[MountInfo]:
        with open(self.mountinfo, encoding="utf-8", errors="replace") as f:
            return parse_mountinfo(f.read())

    def mounted_at(self, path: str) -> MountInfo | None:
        """The topmost mount at ``path`` (compared after resolving symlinks)."""
        want = {os.path.abspath(path), os.path.realpath(path)}
        found = None
        for m in self.mounts():
            if m.mount_point in want:
                found = m
        return found

    def mount(self, source: str, target: str, fstype: str, flags: list[str] = ()) -> None:
        args = ["mount", "-t", fstype]
        if flags:
            args += ["-o", ",".join(flags)]
        self.run([*args, source, target], f"mounting {source} at {target}")

    def bind_mount(self, source: str, target: str, readonly: bool = False,
                   flags: list[str] = ()) -> None:
        """Bind ``source`` onto ``target``; read-only needs a second remount."""
        self.run(["mount", "--bind", source, target], f"bind mounting {source} at {target}")
        if readonly or flags:
            opts = ["remount", "bind", *(["ro"] if readonly else []), *flags]
            try:
                self.run(["mount", "-o", ",".join(opts), target],
                         f"remounting {target} read-only")
            except Exception:
                self.unmount(target)
                raise

    def bind_device(self, device: str, target: str, readonly: bool = False) -> None:
        """Bind a block device node onto a regular file at ``target`` (created)."""
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        if not os.path.exists(target):
            with open(target, "a", encoding="ascii"):
                pass
        self.bind_mount(device, target, readonly)

    def unmount(self, target: str) -> bool:
        """Unmount every mount stacked on ``target``; True if anything was unmounted."""
        did = False
        for _ in range(16):
            if not os.path.lexists(target) or self.mounted_at(target) is None:
                return did
            self.run(["umount", target], f"unmounting {target}")
            did = True
        raise Internal(f"{target} is still mounted after 16 unmounts")

    # --- sizes and stats --------------------------------------------------------
    def resize_fs(self, device: str, mount_point: str, fstype: str) -> None:
        """Grow the filesystem to fill its (already grown) device, online."""
        if fstype == "ext4" or fstype.startswith("ext"):
            self.run(["resize2fs", device], f"growing ext4 on {device}")
        elif fstype == "xfs":
            self.run(["xfs_growfs", mount_point], f"growing xfs at {mount_point}")
        else:
            raise InvalidArgument(f"cannot grow a {fstype!r} filesystem")

    @staticmethod
    def fs_stats(path: str) -> FsStats:
        st = os.statvfs(path)
        total = st.f_blocks * st.f_frsize
        avail = st.f_bavail * st.f_frsize
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        return FsStats(total, avail, used, st.f_files, st.f_ffree, st.f_files - st.f_ffree)

    @staticmethod
    def block_size(path: str) -> int:
        """Size in bytes of a block device (or a file bound to one)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)

    @staticmethod
    def is_block(path: str) -> bool:
        try:
            return stat.S_ISBLK(os.stat(path).st_mode)
        except OSError:
            return False

    @staticmethod
    def device_number(path: str) -> str:
        """"major:minor" of a block device node, as mountinfo spells it."""
        rdev = os.stat(path).st_rdev
        return f"{os.major(rdev)}:{os.minor(rdev)}"
