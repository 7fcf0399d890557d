"""Node side of key rotation (node/reauth.py): a repeated NodeStageVolume with
other DH-HMAC-CHAP keys re-keys the live controller through sysfs, one
attribute per re-authentication, and reads the kernel's verdict from its log.
The kernel is a fake here (sysfs attribute files and a kernel-log file, with
a thread that answers each write as nvme_ctrl_auth_work logs it, against a
target's key pair: the admin queue's verdict first, then the I/O queues',
which fail if the target's pair changed meanwhile, and the settle barrier
returning when they are done); the guest tests run the real one."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from csi_spdk import nvme_keys
from csi_spdk.errors import FailedPrecondition, Unavailable
from csi_spdk.node import reauth


class FakeKernel:
    IO_TIME = 0.3        # the I/O queues re-authenticate after the admin queue

    def __init__(self, root: Path, ctrl: str, host: str, ctrl_key: str) -> None:
        self.idle = threading.Event()
        self.idle.set()
        self.dir = root / "class" / "nvme" / ctrl
        self.dir.mkdir(parents=True)
        (self.dir / "dhchap_secret").write_text(host + "\n")
        (self.dir / "dhchap_ctrl_secret").write_text(ctrl_key + "\n")
        self.kmsg = root / "kmsg"
        self.kmsg.write_text("6,1,1,-;nvme nvme0: qid 0: authenticated (at connect)\n")
        self.ctrl = ctrl
        self.target = (host, ctrl_key)       # what the target accepts
        self.writes: list[tuple[str, str]] = []
        self._seen = self._state()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _state(self) -> tuple[str, str]:
        return ((self.dir / "dhchap_secret").read_text().strip(),
                (self.dir / "dhchap_ctrl_secret").read_text().strip())

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self._state()
            if "" in now:     # caught between open("w") and write(): sysfs has no such state
                time.sleep(0.005)
                continue
            if now != self._seen:
                attr = "host" if now[0] != self._seen[0] else "ctrl"
                self.writes.append((attr, now[0] if attr == "host" else now[1]))
                self._seen = now
                ok = now == self.target
                msg = "authenticated with hash hmac(sha256)" if ok else "authentication failed"
                self.idle.clear()
                with open(self.kmsg, "a") as f:
                    f.write(f"4,2,2,-;nvme {self.ctrl}: qid 0: {msg}\n"
                            " SUBSYSTEM=nvme\n")
                if ok:
                    time.sleep(self.IO_TIME)
                    if now != self.target:       # the target moved under qid 1
                        with open(self.kmsg, "a") as f:
                            f.write(f"4,3,3,-;nvme {self.ctrl}: qid 1: controller "
                                    "authentication failed\n")
                self.idle.set()
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(autouse=True)
def fake_settle(monkeypatch):
    """The kernel's barrier (a refused write that waits for the running
    re-authentication work) on the fake: wait for its I/O-queue phase."""
    kernels: list[FakeKernel] = []
    orig = FakeKernel.__init__

    def init(self, *a, **kw):
        orig(self, *a, **kw)
        kernels.append(self)
    monkeypatch.setattr(FakeKernel, "__init__", init)
    monkeypatch.setattr(reauth, "settle",
                        lambda path, timeout: all(k.idle.wait(timeout) for k in kernels))
    return kernels


def _k() -> str:
    return nvme_keys.generate_dhchap_key().text


@pytest.fixture
def keys():
    return {n: _k() for n in ("h1", "c1", "h2", "c2")}


def test_two_step_rotation_one_write_each(tmp_path, keys):
    k = FakeKernel(tmp_path, "nvme0", keys["h1"], keys["c1"])
    try:
        assert reauth.converge(str(tmp_path), ["nvme0"], keys["h1"], keys["c1"],
                               str(k.kmsg), timeout=5) == []          # nothing to do
        k.target = (keys["h2"], keys["c1"])                          # step 1 on the target
        assert reauth.converge(str(tmp_path), ["nvme0"], keys["h2"], keys["c1"],
                               str(k.kmsg), timeout=5) == ["nvme0/dhchap_secret"]
        k.target = (keys["h2"], keys["c2"])                          # step 2
        assert reauth.converge(str(tmp_path), ["nvme0"], keys["h2"], keys["c2"],
                               str(k.kmsg), timeout=5) == ["nvme0/dhchap_ctrl_secret"]
        assert k._state() == (keys["h2"], keys["c2"])
        assert k.writes == [("host", keys["h2"]), ("ctrl", keys["c2"])]
    finally:
        k.stop()


def test_refused_keys_are_undone_and_unavailable(tmp_path, keys):
    """The target does not have the pair yet: the kernel refuses, the node
    goes back to the accepted secret (a reconnect keeps working), the caller
    gets UNAVAILABLE without any key in the message."""
    k = FakeKernel(tmp_path, "nvme0", keys["h1"], keys["c1"])
    try:
        with pytest.raises(Unavailable) as err:
            reauth.converge(str(tmp_path), ["nvme0"], keys["h2"], keys["c1"], str(k.kmsg),
                            timeout=5)
        assert "does not hold that key pair" in err.value.message
        for v in keys.values():
            assert v.split(":")[2] not in err.value.message
        assert k._state() == (keys["h1"], keys["c1"])
        assert k.writes == [("host", keys["h2"]), ("host", keys["h1"])]
    finally:
        k.stop()


def test_kernel_without_live_rekeying(tmp_path, keys):
    (tmp_path / "class" / "nvme" / "nvme0").mkdir(parents=True)
    (tmp_path / "kmsg").write_text("")
    with pytest.raises(FailedPrecondition, match="dhchap_secret"):
        reauth.converge(str(tmp_path), ["nvme0"], keys["h2"], keys["c1"],
                        str(tmp_path / "kmsg"), timeout=1)


def test_waits_for_the_io_queues_before_reporting(tmp_path, keys):
    """The admin queue's success is logged before the I/O queues re-authenticate:
    converge returns only after they did, so a target moved right after it
    cannot meet an I/O queue still on the previous pair (against spdk_tgt
    v25.09 that fails with "qid 1: controller authentication failed" and the
    kernel drops the controller)."""
    k = FakeKernel(tmp_path, "nvme0", keys["h1"], keys["c1"])
    try:
        k.target = (keys["h2"], keys["c1"])
        assert reauth.converge(str(tmp_path), ["nvme0"], keys["h2"], keys["c1"],
                               str(k.kmsg), timeout=5) == ["nvme0/dhchap_secret"]
        assert k.idle.is_set(), "returned while the I/O queues were re-authenticating"
        k.target = (keys["h2"], keys["c2"])
        assert reauth.converge(str(tmp_path), ["nvme0"], keys["h2"], keys["c2"],
                               str(k.kmsg), timeout=5) == ["nvme0/dhchap_ctrl_secret"]
        assert "qid 1" not in k.kmsg.read_text()
    finally:
        k.stop()


def test_io_queue_failure_is_unavailable(tmp_path, keys):
    """An I/O queue that fails its re-authentication (the target changed during
    it) fails the step: UNAVAILABLE, the previous secret written back."""
    k = FakeKernel(tmp_path, "nvme0", keys["h1"], keys["c1"])
    try:
        k.target = (keys["h2"], keys["c1"])

        def move_target():                      # during the I/O-queue phase
            while "qid 0: authenticated with" not in k.kmsg.read_text().split("(at connect)")[1]:
                time.sleep(0.01)
            k.target = (keys["h1"], keys["c1"])
        mover = threading.Thread(target=move_target, daemon=True)
        mover.start()
        with pytest.raises(Unavailable, match="failed"):
            reauth.converge(str(tmp_path), ["nvme0"], keys["h2"], keys["c1"],
                            str(k.kmsg), timeout=5)
        mover.join(5)
        assert "nvme0: qid 1: controller authentication failed" in k.kmsg.read_text()
        assert k._state() == (keys["h1"], keys["c1"])
    finally:
        k.stop()


def test_io_queue_failure_lines():
    lines = ["nvme nvme0: qid 0: authenticated with hash hmac(sha256) dhgroup ffdhe2048",
             "nvme nvme1: qid 2: authentication failed"]
    assert not reauth.io_queue_failed(lines, "nvme0")
    assert reauth.io_queue_failed(lines, "nvme1")
    assert reauth.io_queue_failed(["nvme nvme0: qid 1: controller authentication failed"],
                                  "nvme0")
    assert not reauth.io_queue_failed(["nvme nvme0: qid 0: authentication failed"], "nvme0")
