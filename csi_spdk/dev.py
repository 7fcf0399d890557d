"""``csi-spdk dev``: the embedded default for a newcomer.

The simulator (as a child process, or a given spdk_tgt), an lvstore, the
storage agent in front of it (a child process, ``csi-spdk agent`` on
``agent.sock``), a controller that reaches SPDK only through that agent (the
path a real deployment takes), and a node plugin, with fixed socket names
under ``--socket-dir`` that tests and docs rely on. This is the one module
that composes the wings; simulator and agent run as processes so that
nothing but the simulator's own files imports ``sim/`` and the agent stays a
separate process with its own state, as on a storage host.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import contract
from . import log as logsetup
from .childclock import ChildClock
from .errors import CsiError, FailedPrecondition
from .server import serve
from .spdk.agent_client import AgentClient
from .spdk.api import SpdkApi
from .spdk.client import SpdkClient
from .spdk.errors import SpdkError, SpdkNoSpace, SpdkNotFound

log = logging.getLogger("csi_spdk.dev")

DEV_LVSTORE = "lvs0"
DEV_BDEV = "Malloc0"
DEV_LVSTORE_BYTES = 4 * 1024**3
DEV_LVSTORE_MIN_BYTES = 512 * 1024**2
SIM_START_TIMEOUT = 20.0
AGENT_START_TIMEOUT = 20.0


def _die_with_parent() -> None:
    """In the child: get SIGTERM when dev dies, even by SIGKILL (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def _start_child(argv: list[str], make_client: Callable[[], SpdkClient | AgentClient],
                 what: str, timeout: float,
                 via: subprocess.Popen | None = None) -> subprocess.Popen:
    """Run ``csi-spdk <argv>`` and wait until a ``make_client()`` gets an answer.

    The client is made after the fork: a gRPC channel alive in this process
    when it forks lets gRPC's fork handlers run in the child before its exec
    (``preexec_fn``), and the agent child aborted there once (SIGABRT,
    "epoll_wait error: Bad file descriptor").

    ``timeout`` counts the child's own time (``childclock.py``): the time a
    loaded machine keeps it, this process or ``via`` (the target the child
    answers through) waiting for a CPU does not count, so a slow start is
    waited for and only a child that does not get there is given up on."""
    proc = subprocess.Popen([sys.executable, "-m", "csi_spdk", *argv],
                            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    clock = ChildClock(proc.pid, also=[os.getpid(), *([via.pid] if via else [])])
    client = make_client()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}")
            try:
                client.call("spdk_get_version", timeout=2.0)
                return proc
            except CsiError:  # not up yet (unreachable or not initialised): poll
                if clock.elapsed() > timeout:
                    stop_child(proc)
                    raise RuntimeError(f"{what} did not answer within {timeout:.0f}s of its "
                                       "own time (waits for a CPU not counted)") from None
                time.sleep(0.05)
            except BaseException:
                stop_child(proc)
                raise
    finally:
        client.close()


def start_simulator(rpc: str, data_dir: Path, log_level: str) -> subprocess.Popen:
    """Run ``csi-spdk sim`` on ``rpc`` and wait until it answers."""
    return _start_child(["sim", "--rpc-socket", rpc, "--data-dir", str(data_dir),
                         "--log-level", log_level], lambda: SpdkClient(rpc, timeout=2.0),
                        f"the SPDK simulator on {rpc}", SIM_START_TIMEOUT)


def start_agent(listen: str, rpc: str, state_dir: Path, log_level: str,
                sim: subprocess.Popen | None = None) -> subprocess.Popen:
    """Run ``csi-spdk agent`` on ``listen`` (a Unix socket) in front of ``rpc``
    (``sim``: the simulator process serving it, when dev started one)."""
    return _start_child(["agent", "--listen", listen, "--spdk-rpc", rpc,
                         "--state-dir", str(state_dir), "--log-level", log_level],
                        lambda: AgentClient(listen, timeout=2.0),
                        f"the storage agent on {listen}", AGENT_START_TIMEOUT, via=sim)


def stop_child(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ensure_lvstore(rpc: str) -> tuple[list[str], bool]:
    """Use the target's lvstores, or make one on a malloc bdev if it has none
    (then the second value is True: dev removes it when it stops).

    The malloc bdev is 4 GiB, or less when the target has less memory (an
    spdk_tgt started with ``--no-huge -s 2048`` refuses 4 GiB with ENOMEM)."""
    api = SpdkApi(SpdkClient(rpc))
    try:
        names = [lvs["name"] for lvs in api.lvstores()]
        if not names:
            size = DEV_LVSTORE_BYTES
            while True:
                try:
                    api.malloc_create(DEV_BDEV, size)
                    break
                except SpdkNoSpace:
                    if size <= DEV_LVSTORE_MIN_BYTES:
                        raise
                    size //= 2
                    log.warning("target has too little memory for the dev malloc bdev; "
                                "trying a smaller one", extra={"f": {"bytes": size}})
            api.lvstore_create(DEV_BDEV, DEV_LVSTORE)
            return [DEV_LVSTORE], True
        return names, False
    finally:
        api.client.close()


def drop_dev_lvstore(rpc: str) -> None:
    """Remove the lvstore and malloc bdev ``ensure_lvstore`` made (best effort)."""
    api = SpdkApi(SpdkClient(rpc))
    try:
        for method, params in (("bdev_lvol_delete_lvstore", {"lvs_name": DEV_LVSTORE}),
                               ("bdev_malloc_delete", {"name": DEV_BDEV})):
            try:
                api.call(method, params)
            except SpdkError as err:
                log.warning("could not remove what dev made", extra={"f": {
                    "method": method, "error": err.message}})
    finally:
        api.client.close()


LOCK_NAME = "dev.lock"


def lock_socket_dir(sock_dir: Path) -> int:
    """Take ``<sock_dir>/dev.lock`` (flock) for this process; return its fd.

    A second ``dev`` on the same directory would unlink the first one's
    sockets and delete its state, so it is refused naming the holder's pid.
    The file is unlinked by ``unlock_socket_dir`` while still locked; a
    process that opened the old file before that finds it unlinked after
    getting the lock and tries again on the new one."""
    path = sock_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FailedPrecondition(
                f"{sock_dir} is in use by another csi-spdk dev (pid {holder}); stop it "
                f"(kill {holder}) or give this one another --socket-dir") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # the holder removed it between our open and flock


def unlock_socket_dir(sock_dir: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock_dir / LOCK_NAME)
    os.close(fd)


def target_objects(rpc: str) -> tuple[set[str], set[str]]:
    """The driver's NVMe-oF subsystems (NQNs) and lvols (uuids) on a target."""
    api = SpdkApi(SpdkClient(rpc))
    try:
        nqns = {s["nqn"] for s in api.subsystems() if s["nqn"].startswith(contract.NQN_PREFIX)}
        lvols = {lv["uuid"] for lv in api.lvols() if contract.is_driver_lvol(lv["name"])}
        return nqns, lvols
    finally:
        api.client.close()


def drop_made_objects(rpc: str, before: tuple[set[str], set[str]]) -> None:
    """Delete the subsystems and lvols the driver made during this dev run
    (present now, absent at start); what was on the target before is kept.

    Subsystems go first (they hold the lvols as namespaces); lvols in passes,
    clones and volumes before snapshots, until a pass deletes nothing (a
    snapshot with clones left is refused by SPDK until they are gone)."""
    nqns, lvols = target_objects(rpc)
    api = SpdkApi(SpdkClient(rpc))
    try:
        for nqn in sorted(nqns - before[0]):
            try:
                api.subsystem_delete(nqn)
            except SpdkError as err:
                log.warning("could not remove a subsystem dev made", extra={"f": {
                    "nqn": nqn, "error": err.message}})
        todo = {lv["uuid"]: lv for lv in api.lvols() if lv["uuid"] in lvols - before[1]}
        while todo:
            progress = False
            for uuid, _lv in sorted(todo.items(),
                                   key=lambda kv: bool(kv[1].get("is_snapshot"))):
                try:
                    api.lvol_delete(uuid)
                except SpdkNotFound:
                    pass  # went with its parent
                except SpdkError:
                    continue
                del todo[uuid]
                progress = True
            if not progress:
                log.warning("could not remove lvols dev made", extra={"f": {
                    "lvols": sorted(lv["name"] for lv in todo.values())}})
                break
    finally:
        api.client.close()


def run_dev(args: argparse.Namespace) -> int:
    """Simulator (or --spdk-rpc) + agent + controller + node, until Ctrl-C/SIGTERM."""

    logsetup.setup(args.log_level)
    sock_dir = Path(args.socket_dir).resolve()
    sock_dir.mkdir(parents=True, exist_ok=True)
    lock_fd = lock_socket_dir(sock_dir)
    try:
        return _run_locked(args, sock_dir)
    finally:
        unlock_socket_dir(sock_dir, lock_fd)


def _run_locked(args: argparse.Namespace, sock_dir: Path) -> int:
    from .controller.main import controller_server
    from .node.main import node_server

    work = sock_dir / "dev-state"
    if work.exists():
        shutil.rmtree(work)  # ours, from an earlier run that was killed hard
    work.mkdir()
    sim = agent = None
    rpc = args.spdk_rpc
    agent_address = f"unix://{sock_dir}/agent.sock"
    if not rpc:
        rpc = str(sock_dir / "spdk.sock")
        sim = start_simulator(rpc, work / "sim-data", args.log_level)
    made_lvstore = False
    try:
        before = target_objects(rpc)
        lvstores, made_lvstore = ensure_lvstore(rpc)
        agent = start_agent(agent_address, rpc, work / "agent-state", args.log_level, sim)
        static_keys, sanity_secrets = write_dev_secrets(work)
        config = {
            "targets": [{
                "name": "dev",
                "agent": {"address": agent_address},
                "nvmf": {"listenAddress": "127.0.0.1", "port": 4420},
                "lvstores": lvstores,
                "node": args.node_id,
            }],
            # dev knows its only node, so publishing elsewhere is NOT_FOUND
            "nodes": [args.node_id],
            # no Kubernetes to keep per-volume Secrets: one generated key pair
            # for every volume, also written for csi-sanity's --csi.secrets
            "auth": {"staticSecretsFile": str(static_keys), "keyDir": str(work / "keys")},
            # encryption at rest: per-volume key files (no Kubernetes Secrets here)
            "encryption": {"keyDir": str(work / "volume-keys")},
        }
        config_path = work / "controller.json"
        config_path.write_text(json.dumps(config, indent=2))
        servers = [controller_server(str(config_path), f"unix://{sock_dir}/controller.sock",
                                     "csi-spdk.io")]
        node_args = argparse.Namespace(
            endpoint=f"unix://{sock_dir}/node.sock", node_id=args.node_id,
            state_dir=str(work / "node-state"), max_volumes=0, ctrl_loss_tmo=-1, unstage_grace=30.0,
            reconnect_delay=2, connect_timeout=30.0, spdk_rpc="", sysfs_root="/sys",
            topology=[], driver_name="csi-spdk.io",
        )
        servers.append(node_server(node_args))
    except BaseException:
        for proc in (agent, sim):
            if proc:
                stop_child(proc)
        if not sim and made_lvstore:
            drop_dev_lvstore(rpc)
        shutil.rmtree(work, ignore_errors=True)
        raise
    print(_dev_banner(sock_dir, rpc, lvstores, sim is not None, sanity_secrets), flush=True)

    def cleanup() -> None:
        stop_child(agent)
        if sim:
            stop_child(sim)
        else:
            drop_made_objects(rpc, before)
            if made_lvstore:
                drop_dev_lvstore(rpc)
        shutil.rmtree(work, ignore_errors=True)

    return serve(servers, args.metrics_address, cleanup)


def write_dev_secrets(work: Path) -> tuple[Path, Path]:
    """A fresh DH-HMAC-CHAP key pair (CSPRNG) for this dev run: the
    controller's static keys file and csi-sanity's --csi.secrets file (the
    same keys as node-stage and controller-publish secrets). Both 0600."""
    from .controller.auth import VolumeKeys, write_static_secrets

    dh, tls = VolumeKeys.generate(), VolumeKeys.generate("tls")
    keys = VolumeKeys(dh.dhchap_key, dh.dhchap_ctrl_key, tls.tls_psk)
    static = work / "auth-keys.json"
    write_static_secrets(static, keys)
    sanity = work / "csi-sanity-secrets.yaml"
    fd = os.open(sanity, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"NodeStageVolumeSecret": keys.secrets(),
                   "ControllerPublishVolumeSecret": keys.secrets()}, f, indent=2)
    return static, sanity


def _dev_banner(sock_dir: Path, rpc: str, lvstores: list[str], simulated: bool,
                sanity_secrets: Path) -> str:
    nvme_tcp = os.path.exists("/sys/module/nvme_tcp") and shutil.which("nvme")
    return "\n".join([
        "csi-spdk dev is running (Ctrl-C to stop; everything it made is removed)",
        f"  controller: unix://{sock_dir}/controller.sock",
        f"  node:       unix://{sock_dir}/node.sock"
        + ("" if nvme_tcp else "  (this host has no NVMe/TCP: staging will fail)"),
        f"  SPDK RPC:   {rpc} ({'simulator' if simulated else 'spdk_tgt'}), "
        f"lvstores {', '.join(lvstores)}",
        f"  agent:      unix://{sock_dir}/agent.sock (the controller's way to SPDK)",
        "try (staging specs need a kernel with nvme-tcp):",
        f"  csi-sanity --csi.endpoint=unix://{sock_dir}/node.sock "
        f"--csi.controllerendpoint=unix://{sock_dir}/controller.sock "
        "--csi.testvolumesize=67108864 --csi.mountdir=/tmp/csi-sanity-mnt "
        "--csi.stagingdir=/tmp/csi-sanity-stage "
        f"--csi.secrets={sanity_secrets}",
    ])


__all__ = ["run_dev"]
