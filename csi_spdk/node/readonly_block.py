"""Read-only raw block publish: a read-only loop device over the namespace.

A read-only bind mount does NOT stop writes to a device node: ``ro`` applies to
the filesystem holding the node, while ``open(O_WRONLY)`` + ``write`` on it go
straight to the block device. So a ``readonly`` block publish binds, instead
of the namespace, a loop device made with ``losetup --read-only`` over it: the
kernel refuses every write to that loop (EPERM), and the pod gets no path to
the writable namespace. (``blockdev --setro`` on the namespace itself would
also stop the node's own writable publishes of the same volume.)

State: one JSON record per read-only target path under
``<state_dir>/targets/`` (volume, target, backing device, loop), written right
after ``losetup`` and before the bind, deleted last by ``detach``. Crash safety:

* crash between ``losetup`` and the record: a retried publish adopts the
  read-only loop backed by the device that no record claims (sysfs
  ``loop/backing_file`` + ``ro``); if nobody retries, unstage detaches it;
* crash after the record: a retried publish reuses the recorded loop while it
  is still read-only and backed by the same device;
* crash during unpublish: the record outlives the unmount, so the retry
  detaches exactly that loop, and only while it is still backed by the
  recorded device (a loop number reused by someone else is never touched).

Concurrency: callers hold the volume lock (NodeServicer); loops of different
volumes never share a backing device.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re

from .mount import Mounter
from .sysfs import read_attr

log = logging.getLogger("csi_spdk.readonly_block")

_LOOP_NAME = re.compile(r"^loop\d+$")


class ReadOnlyLoops:
    """Read-only loop devices of read-only block publishes, with their records."""

    def __init__(self, state_dir: str, run=Mounter.run, sysfs_root: str = "/sys",
                 dev_root: str = "/dev") -> None:
        self.dir = os.path.join(state_dir, "targets")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.run = run
        self.sysfs_root = sysfs_root
        self.dev_root = dev_root

    # --- records -------------------------------------------------------------------
    def _path(self, target: str) -> str:
        key = hashlib.sha256(os.path.abspath(target).encode()).hexdigest()[:40]
        return os.path.join(self.dir, key + ".json")

    def load(self, target: str) -> dict | None:
        try:
            with open(self._path(target), encoding="utf-8") as f:
                rec = json.load(f)
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) and rec.get("loop") else None

    def records(self) -> list[dict]:
        out = []
        for name in sorted(os.listdir(self.dir)):
            if not name.endswith(".json"):
                continue
            with contextlib.suppress(OSError, ValueError), \
                    open(os.path.join(self.dir, name), encoding="utf-8") as f:
                rec = json.load(f)
                if isinstance(rec, dict) and rec.get("loop"):
                    out.append(rec)
        return out

    def _save(self, rec: dict) -> None:
        path = self._path(rec["target"])
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(rec, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _delete(self, target: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(target))

    # --- sysfs view of loop devices ---------------------------------------------------
    def backing(self, loop: str) -> str:
        """The (resolved) backing file of ``loop``, "" when it is not bound."""
        name = os.path.basename(loop)
        value = read_attr(os.path.join(self.sysfs_root, "block", name, "loop", "backing_file"))
        # a backing device removed under the loop reads "/dev/nvme0n1 (deleted)"
        value = value.removesuffix(" (deleted)")
        return os.path.realpath(value) if value else ""

    def is_readonly(self, loop: str) -> bool:
        return read_attr(os.path.join(self.sysfs_root, "block", os.path.basename(loop),
                                      "ro")) == "1"

    def loops_backed_by(self, device: str) -> list[str]:
        """Read-only loop devices whose backing file is ``device``."""
        want = os.path.realpath(device)
        base = os.path.join(self.sysfs_root, "block")
        try:
            names = sorted(n for n in os.listdir(base) if _LOOP_NAME.match(n))
        except OSError:
            return []
        return [os.path.join(self.dev_root, n) for n in names
                if self.backing(n) == want and self.is_readonly(n)]

    def _ours(self, loop: str, device: str) -> bool:
        return bool(device) and self.backing(loop) == os.path.realpath(device) \
            and self.is_readonly(loop)

    # --- operations ---------------------------------------------------------------------
    def attach(self, volume_id: str, target: str, device: str) -> str:
        """The read-only loop over ``device`` for ``target``: the recorded one,
        an unclaimed one left by a crash, or a new one. Idempotent."""
        rec = self.load(target)
        if rec is not None and rec.get("device") == device and self._ours(rec["loop"], device):
            return rec["loop"]
        claimed = {r["loop"] for r in self.records()}
        for loop in self.loops_backed_by(device):
            if loop not in claimed:
                log.info("adopting read-only loop left by an interrupted publish",
                         extra={"f": {"loop": loop, "device": device, "target": target}})
                break
        else:
            res = self.run(["losetup", "--read-only", "--direct-io=on", "--find", "--show",
                            device], f"creating a read-only loop device over {device}")
            loop = res.stdout.strip()
        self._save({"volume_id": volume_id, "target": os.path.abspath(target),
                    "device": device, "loop": loop})
        return loop

    def detach(self, target: str) -> None:
        """Detach the loop recorded for ``target`` (if still ours), then forget it.
        Idempotent; call after the target is unmounted."""
        rec = self.load(target)
        if rec is None:
            self._delete(target)
            return
        self._detach_loop(rec["loop"], rec.get("device", ""))
        self._delete(target)

    def detach_volume(self, volume_id: str, device: str) -> None:
        """Unstage: detach every loop of the volume, recorded or left by a crash."""
        for rec in self.records():
            if rec.get("volume_id") == volume_id:
                self.detach(rec["target"])
        if device:
            claimed = {r["loop"] for r in self.records()}
            for loop in self.loops_backed_by(device):
                if loop not in claimed:
                    self._detach_loop(loop, device)

    def _detach_loop(self, loop: str, device: str) -> None:
        if not self._ours(loop, device):
            return      # already detached, or the number now belongs to someone else
        self.run(["losetup", "-d", loop], f"detaching read-only loop device {loop}")
        log.info("detached read-only loop", extra={"f": {"loop": loop, "device": device}})
