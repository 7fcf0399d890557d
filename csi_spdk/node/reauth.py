"""Key rotation on the node: give a live NVMe controller new DH-HMAC-CHAP
secrets without disconnecting it.

Linux keeps a connected controller's secrets in
``/sys/class/nvme/nvmeX/dhchap_secret`` and ``dhchap_ctrl_secret``; writing
one stores it and starts a re-authentication of the live queues at once
(``nvme_ctrl_auth_work``, asynchronous: the write returns before it ends).
The kernel reports the outcome only in its log: ``nvmeX: qid 0:
authenticated ...`` or ``nvmeX: qid 0: authentication failed``. A failed
re-authentication is soft ("credentials remain valid until the controller
terminates the connection"), so the connection survives either way, but the
next reconnect would use the new secret.

``converge`` writes at most one attribute per re-authentication and checks
the kernel's verdict before the next one, because every write meets the
target as it is: the controller's rotation (``csi-spdk rotate-keys``) moves
the target and the node in lock-step, (new host key, old controller key)
then (new, new), and calls NodeStageVolume with exactly the target's pair
each time, so one attribute differs per call. Secrets never reach a log.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time

from ..errors import FailedPrecondition, Unavailable

log = logging.getLogger("csi_spdk.reauth")
KMSG = "/dev/kmsg"


class KernelLog:
    """The kernel log from now on (``/dev/kmsg`` opened at its end)."""

    def __init__(self, path: str = KMSG) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with contextlib.suppress(OSError):
            os.lseek(self.fd, 0, os.SEEK_END)

    def lines(self) -> list[str]:
        out = []
        while True:
            try:
                rec = os.read(self.fd, 8192)
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno == errno.EPIPE:   # records overwritten: go on from the next
                    continue
                raise
            if not rec:
                return out
            # "prio,seq,usec,flags;message" per record; " KEY=value" continuation lines
            for line in rec.decode("utf-8", "replace").splitlines():
                if line and not line.startswith(" "):
                    out.append(line.split(";", 1)[1] if ";" in line else line)

    def close(self) -> None:
        os.close(self.fd)


def verdict(lines: list[str], ctrl: str) -> bool | None:
    """True/False once the kernel said how ``ctrl``'s admin queue re-authenticated."""
    for line in lines:
        if f"{ctrl}: qid 0: authenticated" in line:
            return True
        if f"{ctrl}: qid 0: authentication failed" in line or (
                f"{ctrl}: qid 0: error" in line and "authentication" in line):
            return False
    return None


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def converge(sysfs_root: str, controllers: list[str], host_key: str, ctrl_key: str,
             kmsg: str = KMSG, timeout: float = 30.0) -> list[str]:
    """Make each controller hold ``host_key``/``ctrl_key`` (a live
    re-authentication per changed attribute); returns "nvmeX/attr" written.
    UNAVAILABLE when the kernel refuses (the target does not have that pair
    yet: the caller retries after the target moved), FAILED_PRECONDITION
    when this kernel cannot re-key a live controller."""
    done = []
    for ctrl in controllers:
        base = os.path.join(sysfs_root, "class", "nvme", ctrl)
        for attr, want in (("dhchap_secret", host_key), ("dhchap_ctrl_secret", ctrl_key)):
            path = os.path.join(base, attr)
            if not want:
                continue
            if not os.path.exists(path):
                raise FailedPrecondition(
                    f"{ctrl} has no {attr} in sysfs: this kernel cannot give a connected "
                    "controller new DH-HMAC-CHAP keys (Linux >= 6.1 with "
                    "CONFIG_NVME_HOST_AUTH); unstage the volume to rotate its keys")
            previous = _read(path)
            if previous == want:
                continue
            ok = _write_and_wait(path, want, ctrl, kmsg, timeout)
            if ok is not True and previous:
                # back to what the target accepted, so a reconnect still works and
                # the retry (after the target moved) re-authenticates again
                _write_and_wait(path, previous, ctrl, kmsg, timeout)
            if ok is not True:
                raise Unavailable(
                    f"re-authentication of {ctrl} with the new "
                    f"{'host' if attr == 'dhchap_secret' else 'controller'} key "
                    f"{'failed' if ok is False else 'did not finish in time'}: the target "
                    "does not hold that key pair (yet); the connection keeps working with "
                    "its previous credentials")
            log.info("re-authenticated with a rotated key", extra={"f": {
                "controller": ctrl, "attribute": attr}})
            done.append(f"{ctrl}/{attr}")
    return done


def _write_and_wait(path: str, value: str, ctrl: str, kmsg: str, timeout: float) -> bool | None:
    klog = KernelLog(kmsg)
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(value)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ok = verdict(klog.lines(), ctrl)
            if ok is not None:
                return ok
            time.sleep(0.1)
        return None
    finally:
        klog.close()
