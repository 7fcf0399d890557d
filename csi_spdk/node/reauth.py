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
import re
import threading
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


def io_queue_failed(lines: list[str], ctrl: str) -> bool:
    """Did an I/O queue of ``ctrl`` fail its re-authentication? (the kernel logs
    only the admin queue's success; an I/O queue's failure is "qid N:
    authentication failed" / "qid N: controller authentication failed")."""
    for line in lines:
        m = _QID_FAILED.search(line)
        if m and m.group(1) == ctrl and m.group(2) != "0":
            return True
    return False


_QID_FAILED = re.compile(r"(nvme\d+): qid (\d+): (?:controller )?authentication failed")
# A DHHC-1 value the kernel's key parser rejects (3-byte key). Its store
# first runs nvme_auth_stop() (cancel_work_sync of the re-authentication
# work), then fails to parse it and returns -EINVAL without changing the key
# or queueing a new re-authentication: a write that returns once the running
# re-authentication of every queue has ended.
_BARRIER = b"DHHC-1:00:AAAA:"


def settle(path: str, timeout: float) -> bool:
    """Wait until the controller's running re-authentication (admin queue, then
    every I/O queue, which the kernel does after logging the admin queue's
    success) has ended. False if it did not end within ``timeout``."""
    def barrier() -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, _BARRIER)
        except OSError:
            pass                      # EINVAL: the barrier key is refused by design
        finally:
            os.close(fd)
    t = threading.Thread(target=barrier, name="reauth-settle", daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive()


def _write_and_wait(path: str, value: str, ctrl: str, kmsg: str, timeout: float) -> bool | None:
    """True once the admin queue re-authenticated *and* every I/O queue's
    re-authentication ended without a failure. Waiting for the I/O queues
    matters: the caller moves the target to the next key as soon as this
    returns, and an I/O queue still re-authenticating with the previous pair
    then fails ("qid 1: controller authentication failed") and the kernel
    drops the controller (seen against spdk_tgt v25.09)."""
    klog = KernelLog(kmsg)
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(value)
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        ok = None
        while time.monotonic() < deadline:
            seen += klog.lines()
            ok = verdict(seen, ctrl)
            if ok is not None:
                break
            time.sleep(0.1)
        if ok is not True:
            return ok
        if not settle(path, max(deadline - time.monotonic(), 1.0)):
            return None
        seen += klog.lines()
        return not io_queue_failed(seen, ctrl)
    finally:
        klog.close()
