"""Low-level probe of a block device with libblkid, in process.

Exactly what ``blkid -p -o export DEV`` does (util-linux ``misc-utils/blkid.c``,
``lowprobe_device``): a new probe on the device, superblocks with TYPE, USAGE
(and label/uuid/version) enabled, partition tables enabled, then
``blkid_do_safeprobe`` (which refuses ambivalent results). Same library, same
calls, so the same answer as the command, without a fork/exec per stage
(the largest part of NodeStageVolume's own time for a mount volume).

``probe`` returns None when libblkid cannot be loaded; the caller then runs
the ``blkid`` command.
"""

from __future__ import annotations

import ctypes
import os
import threading

# blkid.h (util-linux 2.38)
_SUBLKS_LABEL = 1 << 1
_SUBLKS_UUID = 1 << 3
_SUBLKS_TYPE = 1 << 5
_SUBLKS_SECTYPE = 1 << 6
_SUBLKS_USAGE = 1 << 7
_SUBLKS_VERSION = 1 << 8
_PARTS_ENTRY_DETAILS = 1 << 2

_lib = None
_lib_lock = threading.Lock()
_UNAVAILABLE = object()


class ProbeError(OSError):
    """libblkid could not probe the device, or its result is ambivalent."""


def _load():
    global _lib
    with _lib_lock:
        if _lib is None:
            try:
                lib = ctypes.CDLL("libblkid.so.1", use_errno=True)
                vp, cp, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
                lib.blkid_new_probe_from_filename.argtypes = [cp]
                lib.blkid_new_probe_from_filename.restype = vp
                lib.blkid_free_probe.argtypes = [vp]
                lib.blkid_free_probe.restype = None
                for name in ("blkid_probe_enable_superblocks",
                             "blkid_probe_set_superblocks_flags",
                             "blkid_probe_enable_partitions",
                             "blkid_probe_set_partitions_flags"):
                    getattr(lib, name).argtypes = [vp, i]
                    getattr(lib, name).restype = i
                lib.blkid_do_safeprobe.argtypes = [vp]
                lib.blkid_do_safeprobe.restype = i
                lib.blkid_probe_lookup_value.argtypes = [
                    vp, cp, ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_size_t)]
                lib.blkid_probe_lookup_value.restype = i
                _lib = lib
            except (OSError, AttributeError):
                _lib = _UNAVAILABLE
        return None if _lib is _UNAVAILABLE else _lib


def probe(device: str) -> dict[str, str] | None:
    """``{"TYPE": ..., "USAGE": ..., "PTTYPE": ...}`` (absent keys: not found),
    ``{}`` for a device with no signature at all, None when libblkid is not
    loadable. Raises ProbeError when the probe fails or is ambivalent."""
    lib = _load()
    if lib is None:
        return None
    pr = lib.blkid_new_probe_from_filename(os.fsencode(device))
    if not pr:
        err = ctypes.get_errno()
        raise ProbeError(err, f"libblkid cannot open {device}: {os.strerror(err)}")
    try:
        lib.blkid_probe_enable_superblocks(pr, 1)
        lib.blkid_probe_set_superblocks_flags(
            pr, _SUBLKS_LABEL | _SUBLKS_UUID | _SUBLKS_TYPE | _SUBLKS_SECTYPE | _SUBLKS_USAGE
            | _SUBLKS_VERSION)
        lib.blkid_probe_enable_partitions(pr, 1)
        lib.blkid_probe_set_partitions_flags(pr, _PARTS_ENTRY_DETAILS)
        rc = lib.blkid_do_safeprobe(pr)
        if rc == 1:
            return {}
        if rc != 0:
            what = "ambivalent (more than one signature)" if rc == -2 else "failed"
            raise ProbeError(f"low-level probe of {device} {what} (libblkid rc {rc})")
        out = {}
        for key in ("TYPE", "USAGE", "PTTYPE"):
            data, size = ctypes.c_char_p(), ctypes.c_size_t()
            if lib.blkid_probe_lookup_value(pr, key.encode(), ctypes.byref(data),
                                            ctypes.byref(size)) == 0 and data.value:
                out[key] = data.value.decode(errors="replace")
        return out
    finally:
        lib.blkid_free_probe(pr)
