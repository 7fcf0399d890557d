"""What a killed ``csi-spdk sim --nvmet`` left in the kernel target, and its removal.

When spdk_tgt dies its NVMe-oF listeners die with it: every host connection
drops and nothing answers until a new target re-creates the exports. The
kernel nvmet objects the simulator mirrors its exports into do not die with
the simulator process, so a kill -9 would leave them serving the lvol files
behind SPDK's back. The data plane therefore records the configfs objects it
owns (subsystems, the hosts and ports it created) in a small file, replaced
atomically on every change, and a new data plane tears exactly those down at
start-up: the restart looks to initiators like a real target restart, and
only the exports a client (the agent's replay) re-creates come back.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from .. import atomicfile

log = logging.getLogger(__name__)

DEFAULT_FILE = Path("/run/csi-spdk-sim-nvmet.json")


def owned_file_for(root: Path) -> Path:
    """Beside a fake configfs tree; in /run for the real one (configfs takes no files)."""
    if root == Path("/sys/kernel/config/nvmet"):
        return DEFAULT_FILE
    return root.parent / "csi-spdk-sim-nvmet.json"


def save(path: Path, subsystems: list[str], hosts: list[str], ports: list[int]) -> None:
    atomicfile.write_json(path, {"subsystems": sorted(subsystems), "hosts": sorted(hosts),
                                 "ports": sorted(ports)}, 0o600)


def clear(root: Path, path: Path) -> list[str]:
    """Remove what the record names from configfs; returns what was removed."""
    try:
        owned = atomicfile.read_json(path)
    except (ValueError, OSError):
        owned = None
    if not owned:
        return []
    removed: list[str] = []
    ports = root / "ports"
    for nqn in owned.get("subsystems", []):
        sub = root / "subsystems" / nqn
        for port in ports.iterdir() if ports.is_dir() else []:
            link = port / "subsystems" / nqn
            if link.is_symlink():
                link.unlink()          # drops the connections, as a dead target does
        if not sub.is_dir():
            continue
        for link in (sub / "allowed_hosts").iterdir():
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
        for ns in (sub / "namespaces").iterdir():
            with contextlib.suppress(OSError):
                if (ns / "enable").read_text().strip() == "1":
                    (ns / "enable").write_text("0")
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(ns)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(sub)
        removed.append(f"subsystems/{nqn}")
    for pid in owned.get("ports", []):
        port = ports / str(pid)
        if port.is_dir() and not any((port / "subsystems").iterdir()):
            os.rmdir(port)
            removed.append(f"ports/{pid}")
    for host in owned.get("hosts", []):
        with contextlib.suppress(FileNotFoundError, OSError):
            os.rmdir(root / "hosts" / host)
            removed.append(f"hosts/{host}")
    path.unlink()
    log.warning("nvmet: removed what a previous simulator left in the kernel target: %s",
                ", ".join(removed) or "nothing")
    return removed

