"""mount.Mounter against REAL loop devices (skipped with the reason when unusable)."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import loopdev  # noqa: E402

from csi_spdk.errors import FailedPrecondition, InvalidArgument  # noqa: E402
from csi_spdk.node.mount import Mounter, parse_mountinfo  # noqa: E402

MiB = 1 << 20


@pytest.fixture
def loops(tmp_path):
    loopdev.require_loop()
    lo = loopdev.Loops(str(tmp_path))
    yield lo
    lo.cleanup()


@pytest.fixture
def m():
    return Mounter()


def test_parse_mountinfo_unescapes():
    text = ("36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root "
            "rw,errors=continue\n"
            "37 35 7:0 / /data ro,relatime shared:2 - xfs /dev/loop0 ro\n")
    a, b = parse_mountinfo(text)
    assert a.mount_point == "/mnt/with space" and a.root == "/mnt1" and a.fstype == "ext3"
    assert not a.readonly
    assert b.major_minor == "7:0" and b.readonly and b.source == "/dev/loop0"


def test_probe_empty_then_format_once_keeps_data(loops, m, tmp_path):
    dev, _ = loops.make()
    assert m.probe(dev).empty
    assert m.ensure_filesystem(dev) == ("ext4", True)
    assert m.probe(dev).fstype == "ext4"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m.mount(dev, str(mnt), "ext4", ["noatime"])
    (mnt / "data").write_text("keep me")
    m.unmount(str(mnt))
    # Asked again (a retried stage, or a restaged volume): never reformatted.
    assert m.ensure_filesystem(dev, "ext4") == ("ext4", False)
    assert m.ensure_filesystem(dev, "") == ("ext4", False)
    m.mount(dev, str(mnt), "ext4")
    assert (mnt / "data").read_text() == "keep me"
    info = m.mounted_at(str(mnt))
    assert info.source == dev and info.fstype == "ext4"
    assert info.major_minor == m.device_number(dev)


def test_existing_ext4_never_reformatted_as_xfs(loops, m):
    dev, _ = loops.make()
    subprocess.run(["mkfs.ext4", "-q", dev], check=True)
    with pytest.raises(FailedPrecondition, match="refusing to reformat"):
        m.ensure_filesystem(dev, "xfs")
    assert m.probe(dev).fstype == "ext4"


def test_other_signature_refused(loops, m):
    dev, _ = loops.make()
    if not loopdev.have("mkswap"):
        pytest.skip("needs mkswap (util-linux)")
    subprocess.run(["mkswap", dev], check=True, capture_output=True)
    with pytest.raises(FailedPrecondition, match="not empty"):
        m.ensure_filesystem(dev, "ext4")
    assert m.probe(dev).fstype == "swap"


def test_partition_table_refused(loops, m):
    dev, backing = loops.make()
    with open(backing, "r+b") as f:     # an MBR with one Linux partition
        f.seek(446)
        f.write(bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + struct.pack("<II", 2048, 4096))
        f.seek(510)
        f.write(b"\x55\xaa")
    probe = m.probe(dev)
    assert probe.pttype == "dos" and not probe.empty
    with pytest.raises(FailedPrecondition):
        m.ensure_filesystem(dev)


def test_unsupported_fs_rejected(loops, m):
    dev, _ = loops.make()
    with pytest.raises(InvalidArgument):
        m.ensure_filesystem(dev, "btrfs")
    assert m.probe(dev).empty


def test_bind_mount_readonly(loops, m, tmp_path):
    dev, _ = loops.make()
    m.ensure_filesystem(dev)
    stage, target = tmp_path / "stage", tmp_path / "target"
    stage.mkdir()
    target.mkdir()
    m.mount(dev, str(stage), "ext4")
    m.bind_mount(str(stage), str(target), readonly=True)
    info = m.mounted_at(str(target))
    assert info.readonly and info.major_minor == m.mounted_at(str(stage)).major_minor
    with pytest.raises(OSError) as err:
        (target / "x").write_text("no")
    assert err.value.errno == errno.EROFS
    (stage / "y").write_text("rw")                # the staging mount stays writable
    assert (target / "y").read_text() == "rw"
    assert m.unmount(str(target)) is True
    assert m.unmount(str(target)) is False       # idempotent
    assert m.unmount(str(tmp_path / "nonexistent")) is False


def test_block_bind_onto_file(loops, m, tmp_path):
    dev, _ = loops.make(size=8 * MiB)
    target = tmp_path / "pod" / "dev"
    m.bind_device(dev, str(target))
    assert m.is_block(str(target))
    assert os.stat(target).st_rdev == os.stat(dev).st_rdev
    assert m.block_size(str(target)) == 8 * MiB
    assert m.mounted_at(str(target)) is not None
    m.unmount(str(target))
    assert m.mounted_at(str(target)) is None and not m.is_block(str(target))


def test_stats(loops, m, tmp_path):
    dev, _ = loops.make()
    m.ensure_filesystem(dev)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m.mount(dev, str(mnt), "ext4")
    before = m.fs_stats(str(mnt))
    (mnt / "f").write_bytes(os.urandom(4 * MiB))
    os.sync()
    after = m.fs_stats(str(mnt))
    assert 50 * MiB < before.total_bytes <= 64 * MiB
    assert after.used_bytes >= before.used_bytes + 4 * MiB - 64 * 1024
    assert after.used_inodes == before.used_inodes + 1
    assert after.total_inodes == after.free_inodes + after.used_inodes


@pytest.mark.parametrize("fstype,size", [("ext4", 64 * MiB), ("xfs", 320 * MiB)])
def test_resize_after_growing_backing_file(loops, m, tmp_path, fstype, size):
    if fstype == "xfs" and not (loopdev.have("mkfs.xfs") and loopdev.have("xfs_growfs")):
        pytest.skip("needs xfsprogs")
    if fstype == "ext4" and not loopdev.has_cap(loopdev.CAP_SYS_RESOURCE):
        pytest.skip("online resize2fs needs CAP_SYS_RESOURCE, which this process lacks")
    dev, backing = loops.make(size=size)
    m.ensure_filesystem(dev, fstype)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m.mount(dev, str(mnt), fstype)
    before = m.fs_stats(str(mnt)).total_bytes
    loops.grow(dev, backing, 2 * size)
    assert m.block_size(dev) == 2 * size
    m.resize_fs(dev, str(mnt), fstype)
    after = m.fs_stats(str(mnt)).total_bytes
    assert after > before + size * 0.8


def test_offline_ext4_resize(loops, m):
    """resize2fs runs without CAP_SYS_RESOURCE when the filesystem is not mounted."""
    dev, backing = loops.make(size=64 * MiB)
    m.ensure_filesystem(dev, "ext4")
    loops.grow(dev, backing, 128 * MiB)
    m.resize_fs(dev, "", "ext4")
    out = subprocess.run(["dumpe2fs", "-h", dev], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    blocks, bsize = int(fields["Block count"]), int(fields["Block size"])
    assert blocks * bsize == 128 * MiB


def test_xfs_on_a_too_small_device_is_failed_precondition(loops, m):
    if not loopdev.have("mkfs.xfs"):
        pytest.skip("needs xfsprogs")
    dev, _ = loops.make(size=64 * MiB)
    with pytest.raises(FailedPrecondition) as err:
        m.ensure_filesystem(dev, "xfs")
    msg = str(err.value)
    assert "xfs" in msg and "300 MiB" in msg and "64.0 MiB" in msg, msg
    assert m.probe(dev).empty                     # nothing was written
    # exactly the minimum is accepted
    big, _ = loops.make(size=300 * MiB)
    assert m.ensure_filesystem(big, "xfs") == ("xfs", True)


def test_mkfs_too_small_message_is_mapped_too(loops, m, monkeypatch):
    """Without the size table (another xfsprogs' minimum), mkfs's own refusal
    still becomes FAILED_PRECONDITION naming the fsType, not INTERNAL."""
    if not loopdev.have("mkfs.xfs"):
        pytest.skip("needs xfsprogs")
    import csi_spdk.node.mount as mount_mod
    monkeypatch.setattr(mount_mod, "MIN_FS_BYTES", {})
    dev, _ = loops.make(size=64 * MiB)
    with pytest.raises(FailedPrecondition, match=r"cannot create a xfs filesystem.*larger than"):
        m.ensure_filesystem(dev, "xfs")
    assert m.probe(dev).empty


def test_ext4_minimum(loops, m):
    dev, _ = loops.make(size=64 << 10)
    with pytest.raises(FailedPrecondition, match="ext4 needs at least 131072 bytes"):
        m.ensure_filesystem(dev, "ext4")


def _cmd_probe(dev):
    res = subprocess.run(["blkid", "-p", "-o", "export", dev], capture_output=True,
                         text=True, check=False)
    values = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    return res.returncode, {k: v for k, v in values.items() if k in ("TYPE", "USAGE", "PTTYPE")}


def test_in_process_probe_agrees_with_blkid_command(loops, m):
    """libblkid in process answers exactly what ``blkid -p`` answers."""
    from csi_spdk import blkid
    if blkid._load() is None:
        pytest.skip("libblkid.so.1 not loadable")
    cases = {"empty": None, "ext4": ["mkfs.ext4", "-q"], "swap": ["mkswap"]}
    if loopdev.have("mkfs.xfs"):
        cases["xfs"] = ["mkfs.xfs", "-q"]
    if loopdev.have("sfdisk"):
        cases["gpt"] = "gpt"
    for name, cmd in cases.items():
        if isinstance(cmd, list) and not loopdev.have(cmd[0]):
            continue
        dev, _ = loops.make(size=320 * MiB if name == "xfs" else 16 * MiB, name=name)
        if cmd == "gpt":
            subprocess.run(["sfdisk", "-q", dev], input="label: gpt\n,8M\n", text=True,
                           check=True, capture_output=True)
        elif cmd:
            subprocess.run([*cmd, dev], check=True, capture_output=True)
        rc, want = _cmd_probe(dev)
        got = blkid.probe(dev)
        assert got == want, (name, got, want)
        assert (got == {}) == (rc == 2), (name, rc)
        assert m.probe(dev).empty == (name == "empty"), name
    # a partition table plus a filesystem signature elsewhere: refused, as blkid -p does
    dev, _ = loops.make(size=16 * MiB, name="both")
    subprocess.run(["mkfs.ext4", "-q", dev], check=True, capture_output=True)
    with open(dev, "r+b") as f:                  # an MBR boot signature next to ext4
        f.seek(510)
        f.write(b"\x55\xaa")
        f.seek(446)
        f.write(bytes([0x80, 0, 2, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little")
                + (4096).to_bytes(4, "little"))
    rc, want = _cmd_probe(dev)
    try:
        got = blkid.probe(dev)
    except blkid.ProbeError:
        got = "ambivalent"
    assert got == (want if rc in (0, 2) else "ambivalent"), (rc, want, got)
    assert not m.probe(dev).empty if got != "ambivalent" else True


def test_probe_falls_back_to_the_blkid_command(loops, m, monkeypatch):
    from csi_spdk import blkid
    monkeypatch.setattr(blkid, "_load", lambda: None)
    dev, _ = loops.make(size=16 * MiB)
    assert m.probe(dev).empty
    subprocess.run(["mkfs.ext4", "-q", dev], check=True, capture_output=True)
    assert m.probe(dev).fstype == "ext4"
