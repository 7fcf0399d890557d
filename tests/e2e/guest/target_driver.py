"""Shared preamble of the guest driver scripts that talk to an NVMe-oF target
directly (SPDK JSON-RPC + the guest's kernel initiator). Copied into the guest
as ``/root/target_driver.py`` (``DRIVER_FILES``) and imported by the drivers.

The target is either the simulator's kernel data plane in the guest
(``csi-spdk sim --nvmet`` on /run/spdk.sock, listener and dial address
127.0.0.1) or, when the harness forwarded a real spdk_tgt of the host
(``$GUEST_SPDK_RPC``, see ``GuestOptions.host_rpc``), that target: its
listeners stay on the host's 127.0.0.1 and the guest dials the host at
10.0.2.2 on a port the host test chose free (``$TARGET_PORT``). A real
target is shared, so every object a driver creates carries ``$TARGET_TAG``
and ``Target.cleanup`` removes what is left; key files for it were written
by the host test (the target reads paths on its own file system) into
``$TARGET_KEY_DIR``; for the simulator they are written here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from csi_spdk import contract
from csi_spdk.spdk.api import SpdkApi
from csi_spdk.spdk.client import SpdkClient
from csi_spdk.spdk.errors import SpdkError

MiB = 1 << 20
NVMET = Path("/sys/kernel/config/nvmet")
NODE = "guest-node-1"
HOSTNQN, HOSTID = contract.host_nqn(NODE), contract.host_id(NODE)


def run(*cmd, timeout=120):
    """Run without echoing the arguments (they may hold a secret)."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    print(f"+ {cmd[0]} {cmd[1] if len(cmd) > 1 else ''} -> exit {p.returncode}", flush=True)
    print(p.stdout + p.stderr, end="", flush=True)
    return p


def sh(*cmd, check=True):
    """Run and echo the command line (no secrets in it); exit on failure."""
    print("+", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    print(p.stdout + p.stderr, end="", flush=True)
    if check and p.returncode:
        sys.exit(f"FAILED ({p.returncode}): {' '.join(cmd)}")
    return p


def controllers(nqn):
    return sorted(c.name for c in Path("/sys/class/nvme").iterdir()
                  if (c / "subsysnqn").exists() and (c / "subsysnqn").read_text().strip() == nqn)


def wait_dev(ns_uuid, timeout=30.0):
    """/dev/nvmeXnY whose namespace uuid is ``ns_uuid`` (the head disk, not a
    hidden per-path nvmeXcYnZ, which has no /dev node)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for b in Path("/sys/block").glob("nvme*"):
            dev = Path("/dev") / b.name
            uuid = b / "uuid"
            if uuid.exists() and dev.exists() and uuid.read_text().strip() == ns_uuid:
                return str(dev)
        time.sleep(0.1)
    sys.exit(f"no block device with uuid {ns_uuid}")


def dmesg():
    return subprocess.run(["dmesg"], capture_output=True, text=True).stdout


def dmesg_count(text):
    return dmesg().count(text)


def write_read_back(dev, offset=0, size=MiB):
    """Write random data at ``offset``, drop caches, read it back; the data."""
    data = os.urandom(size)
    fd = os.open(dev, os.O_RDWR)
    os.pwrite(fd, data, offset)
    os.fsync(fd)
    os.close(fd)
    Path("/proc/sys/vm/drop_caches").write_text("3")
    fd = os.open(dev, os.O_RDONLY)
    assert os.pread(fd, size, offset) == data, "read-back mismatch"
    os.close(fd)
    return data


class Target:
    """Where the driver's target is and how to reach it."""

    def __init__(self) -> None:
        self.real = bool(os.environ.get("GUEST_SPDK_RPC"))
        self.rpc = os.environ.get("GUEST_SPDK_RPC") or "/run/spdk.sock"
        self.listen = "127.0.0.1"
        self.dial = "10.0.2.2" if self.real else "127.0.0.1"
        self.port = int(os.environ.get("TARGET_PORT", "4420"))
        self.tls_port = int(os.environ.get("TARGET_TLS_PORT", "4421"))
        self.tag = os.environ.get("TARGET_TAG", "g")
        self.key_dir = os.environ.get("TARGET_KEY_DIR", "/run/keys")
        self.keys = json.loads(Path("/root/keys.json").read_text()) \
            if Path("/root/keys.json").exists() else {}
        self.api = SpdkApi(SpdkClient(self.rpc, timeout=60))
        self._made: list[tuple[str, str]] = []
        print(f"target: {'real spdk_tgt on the host' if self.real else 'simulator'} "
              f"{self.api.version()['version']}, dial {self.dial}:{self.port}", flush=True)

    def name(self, base):
        return f"{self.tag}-{base}"

    def volume(self, size, lvs_size=None):
        """A fresh malloc lvstore, a thin lvol on it, a subsystem exporting it
        (no listener, no host yet); returns (lvol uuid, subsystem nqn)."""
        api = self.api
        malloc = self.name("malloc")
        api.malloc_create(malloc, lvs_size or max(4 * size, 64 * MiB), 4096)
        self._made.append(("malloc", malloc))
        api.lvstore_create(malloc, self.name("lvs"))
        self._made.append(("lvs", self.name("lvs")))
        lvol = api.lvol_create(self.name("lvs"), self.name("vol"), size, thin=True)
        self._made.append(("lvol", lvol))
        nqn = contract.subsystem_nqn(lvol)
        if not any(t.get("trtype", "").upper() == "TCP" for t in api.transports()):
            api.transport_create("TCP")
        api.subsystem_create(nqn, contract.serial_number(lvol), contract.MODEL_NUMBER)
        self._made.append(("subsystem", nqn))
        api.ns_add(nqn, lvol, uuid=lvol)
        return lvol, nqn

    def listen_on(self, nqn, tls=False):
        port = self.tls_port if tls else self.port
        self.api.listener_add(nqn, self.api.listen_address(self.listen, port),
                              secure_channel=tls)
        return port

    def put_key(self, name, label):
        """Key ``label`` of keys.json into the target's keyring as ``name``."""
        name = self.name(name)
        path = Path(self.key_dir) / label
        if not self.real:        # the simulator reads files of this guest
            path.parent.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.write(fd, self.keys[label].encode())
            os.close(fd)
        self.api.key_file_add(name, str(path))
        self._made.append(("key", name))
        return name

    def drop_key(self, name):
        self.api.key_file_remove(name)
        self._made.remove(("key", name))

    def our_keys(self):
        return sorted(k["name"] for k in self.api.keyring_keys()
                      if k["name"].startswith(self.tag + "-"))

    def connect(self, nqn, *extra, port=None, hostnqn=HOSTNQN, hostid=HOSTID):
        return run("nvme", "connect", "-t", "tcp", "-a", self.dial,
                   "-s", str(port or self.port), "-n", nqn,
                   "--hostnqn", hostnqn, "--hostid", hostid, *extra)

    def cleanup(self):
        """Remove, newest first, whatever this driver created and is still there."""
        for c in Path("/sys/class/nvme").iterdir():
            nqn = (c / "subsysnqn").read_text().strip() if (c / "subsysnqn").exists() else ""
            if any(kind == "subsystem" and n == nqn for kind, n in self._made):
                subprocess.run(["nvme", "disconnect", "-d", c.name], capture_output=True)
        undo = {"subsystem": self.api.subsystem_delete, "lvol": self.api.lvol_delete,
                "lvs": lambda n: self.api.call("bdev_lvol_delete_lvstore", {"lvs_name": n}),
                "malloc": lambda n: self.api.call("bdev_malloc_delete", {"name": n}),
                "key": self.api.key_file_remove}
        while self._made:
            kind, name = self._made.pop()
            try:
                undo[kind](name)
            except SpdkError as e:
                print(f"cleanup: {kind} {name}: {e}", flush=True)

    def forget(self, kind, name):
        """``name`` was removed by the driver itself (an asserted step)."""
        self._made.remove((kind, name))
