"""Read-only raw block publish is enforced: the pod gets a read-only loop device
over the namespace (a read-only bind of the device node would not stop writes),
and unpublish / unstage leave no loop device behind, also after crashes."""

from __future__ import annotations

import errno
import os
import subprocess

import grpc
import pytest
from test_node import UUID1, VOL1, Env, block_cap, code_of, make_env, mounted

from csi_spdk import contract
from csi_spdk.node.mount import Mounter
from csi_spdk.node.readonly_block import ReadOnlyLoops
from csi_spdk.proto import csi_pb2

Mode = csi_pb2.VolumeCapability.AccessMode
MiB = 1 << 20


@pytest.fixture
def env(tmp_path):
    yield from make_env(tmp_path)


def ro_loops(env: Env) -> list[str]:
    return env.node.ro_loops.loops_backed_by(env.ini.devices[contract.subsystem_nqn(UUID1)])


def write_fails(path: str) -> int:
    """The errno a 4 KiB write to ``path`` fails with (0 if it succeeded)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, b"w" * 4096)
        return 0
    except OSError as err:
        return err.errno
    finally:
        os.close(fd)


def test_readonly_block_publish_refuses_writes(env):
    dev, _ = env.export(size=16 * MiB)
    cap = block_cap()
    env.stage(cap=cap)
    env.publish("pod/rw", cap=cap)
    with open(env.path("pod/rw"), "r+b") as f:
        f.write(b"precious" * 512)
    env.publish("pod/ro", cap=cap, readonly=True)
    env.publish("pod/ro", cap=cap, readonly=True)                 # idempotent
    loops = ro_loops(env)
    assert len(loops) == 1, loops
    ro = env.path("pod/ro")
    assert os.stat(ro).st_rdev == os.stat(loops[0]).st_rdev        # the loop, not the device
    assert write_fails(ro) in (errno.EPERM, errno.EROFS)
    with open(ro, "rb") as f:
        assert f.read(4096) == b"precious" * 512                  # reading works
    assert mounted(env, "pod/ro").readonly
    # the writable publish of the same volume still writes
    assert write_fails(env.path("pod/rw")) == 0
    # Same target, other readonly-ness: incompatible.
    assert code_of(env.publish, "pod/ro", cap=cap) == grpc.StatusCode.ALREADY_EXISTS
    stats = env.stats("pod/ro")
    assert [u.total for u in stats.usage] == [16 * MiB]

    env.unpublish("pod/ro")
    assert ro_loops(env) == []
    assert not os.path.lexists(ro)
    assert env.node.ro_loops.records() == []
    env.unpublish("pod/ro")                                       # idempotent
    env.unpublish("pod/rw")
    env.unstage()


def test_reader_only_access_mode_is_readonly_too(env):
    env.export(size=16 * MiB)
    cap = block_cap(Mode.SINGLE_NODE_READER_ONLY)
    env.stage(cap=cap)
    env.publish("pod/dev", cap=cap)
    assert write_fails(env.path("pod/dev")) in (errno.EPERM, errno.EROFS)
    env.unpublish("pod/dev")
    assert ro_loops(env) == []
    env.unstage()


def test_publish_after_crash_adopts_the_unrecorded_loop(env):
    """Crash after losetup, before the record: the retry reuses that loop."""
    dev, _ = env.export(size=16 * MiB)
    cap = block_cap()
    env.stage(cap=cap)
    orphan = subprocess.run(["losetup", "--read-only", "--find", "--show", dev],
                            capture_output=True, text=True, check=True).stdout.strip()
    env.publish("pod/ro", cap=cap, readonly=True)
    assert ro_loops(env) == [orphan]
    assert os.stat(env.path("pod/ro")).st_rdev == os.stat(orphan).st_rdev
    env.unpublish("pod/ro")
    assert ro_loops(env) == []
    env.unstage()


def test_publish_after_crash_reuses_the_recorded_loop(env):
    """Crash after the record, before the bind: the retry binds the recorded loop."""
    dev, _ = env.export(size=16 * MiB)
    cap = block_cap()
    env.stage(cap=cap)
    loop = env.node.ro_loops.attach(VOL1, env.path("pod/ro"), dev)
    env.node = env.new_node()                                      # plugin restart
    env.publish("pod/ro", cap=cap, readonly=True)
    assert ro_loops(env) == [loop]
    assert os.stat(env.path("pod/ro")).st_rdev == os.stat(loop).st_rdev
    env.unpublish("pod/ro")
    assert ro_loops(env) == []


def test_unpublish_after_crash_detaches_the_recorded_loop(env):
    """Crash after the unmount, before the detach: the retry finds it by the record."""
    env.export(size=16 * MiB)
    cap = block_cap()
    env.stage(cap=cap)
    env.publish("pod/ro", cap=cap, readonly=True)
    subprocess.run(["umount", env.path("pod/ro")], check=True)
    os.unlink(env.path("pod/ro"))
    env.node = env.new_node()
    assert len(ro_loops(env)) == 1
    env.unpublish("pod/ro")
    assert ro_loops(env) == []
    assert env.node.ro_loops.records() == []


def test_unstage_detaches_loops_left_behind(env):
    dev, _ = env.export(size=16 * MiB)
    cap = block_cap()
    env.stage(cap=cap)
    env.publish("pod/ro", cap=cap, readonly=True)
    subprocess.run(["losetup", "--read-only", "--find", "--show", dev],
                   capture_output=True, check=True)               # an unrecorded leftover
    subprocess.run(["umount", env.path("pod/ro")], check=True)    # CO skipped unpublish
    assert len(ro_loops(env)) == 2
    env.unstage()
    assert ro_loops(env) == []
    assert env.node.ro_loops.records() == []


def test_loop_reused_by_someone_else_is_not_detached(env, tmp_path):
    """A record whose loop number now belongs to another device is only forgotten."""
    dev, _ = env.export(size=16 * MiB)
    other, _ = env.loops.make(size=4 * MiB, name="other")
    loops = ReadOnlyLoops(str(tmp_path / "state2"))
    loops._save({"volume_id": VOL1, "target": "/t", "device": dev, "loop": other})
    loops.detach("/t")
    assert loops.records() == []
    assert os.path.exists(f"/sys/block/{os.path.basename(other)}/loop/backing_file")


def test_writable_block_publish_is_still_a_plain_bind(env):
    dev, _ = env.export(size=16 * MiB)
    cap = block_cap()
    env.stage(cap=cap)
    env.publish("pod/dev", cap=cap)
    assert os.stat(env.path("pod/dev")).st_rdev == os.stat(dev).st_rdev
    assert ro_loops(env) == []
    assert Mounter.is_block(dev)
    env.unpublish("pod/dev")
    env.unstage()
