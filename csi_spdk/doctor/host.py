"""The machine a doctor check looks at: files under a root (``/`` or a fake
tree in tests), programs on PATH, the kernel's config and modules."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field


@dataclass
class Mount:
    mount_point: str
    fstype: str
    source: str
    shared: bool             # a "shared:N" optional field (propagation peer group)


@dataclass
class Host:
    root: str = "/"
    _config: dict[str, str] | None = field(default=None, repr=False)
    config_source: str = ""

    def path(self, p: str) -> str:
        return os.path.join(self.root, p.lstrip("/"))

    def read(self, p: str) -> str | None:
        try:
            with open(self.path(p), encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return None

    def exists(self, p: str) -> bool:
        return os.path.lexists(self.path(p))

    def listdir(self, p: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(p)))
        except OSError:
            return []

    def link_name(self, p: str) -> str:
        """The last component of a symlink's target ('' when not a link)."""
        try:
            return os.path.basename(os.readlink(self.path(p)))
        except OSError:
            return ""

    @staticmethod
    def which(program: str) -> str | None:
        return shutil.which(program)

    @staticmethod
    def run(argv: list[str], timeout: float = 10.0) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)

    # --- the kernel -------------------------------------------------------------------
    @property
    def release(self) -> str:
        return (self.read("/proc/sys/kernel/osrelease") or os.uname().release).strip()

    @property
    def hostname(self) -> str:
        return (self.read("/proc/sys/kernel/hostname") or os.uname().nodename).strip()

    def kernel_config(self) -> dict[str, str]:
        """CONFIG_* of the running kernel from /boot/config-<release> or
        /proc/config.gz; empty when neither is readable."""
        if self._config is None:
            self._config = {}
            text = self.read(f"/boot/config-{self.release}")
            if text is not None:
                self.config_source = f"/boot/config-{self.release}"
            else:
                try:
                    with gzip.open(self.path("/proc/config.gz"), "rt") as f:
                        text = f.read()
                    self.config_source = "/proc/config.gz"
                except OSError:
                    text = ""
            for m in re.finditer(r"^(CONFIG_\w+)=(.*)$", text, re.M):
                self._config[m.group(1)] = m.group(2).strip('"')
            for m in re.finditer(r"^# (CONFIG_\w+) is not set$", text, re.M):
                self._config[m.group(1)] = "n"  # known to this kernel, and off
        return self._config

    def module_loaded(self, name: str) -> bool:
        """Loaded or built in: both appear in /sys/module (with a parameters dir
        or a version when built in; a loaded one also has initstate)."""
        return self.exists(f"/sys/module/{name.replace('-', '_')}")

    def module_available(self, name: str) -> str:
        """'builtin', 'module' or '' from /lib/modules/<release>/modules.{builtin,dep}."""
        base = f"/lib/modules/{self.release}"
        stem = "[-_]".join(re.escape(p) for p in re.split("[-_]", name))
        pattern = re.compile(rf"/{stem}\.ko(\.[a-z]+)?(:|$)", re.M)
        for kind, fname in (("builtin", "modules.builtin"), ("module", "modules.dep")):
            text = self.read(f"{base}/{fname}") or self.read(f"/usr{base}/{fname}") or ""
            if pattern.search(text):
                return kind
        return ""

    def mounts(self) -> list[Mount]:
        """/proc/self/mountinfo: mount point, fstype, source and propagation."""
        out = []
        for line in (self.read("/proc/self/mountinfo") or "").splitlines():
            left, sep, right = line.partition(" - ")
            fields = left.split()
            if not sep or len(fields) < 6:
                continue
            point = fields[4].replace("\\040", " ")
            optional = fields[6:]
            rparts = right.split()
            out.append(Mount(point, rparts[0] if rparts else "",
                             rparts[1] if len(rparts) > 1 else "",
                             any(o.startswith("shared:") for o in optional)))
        return out

    def mount_of(self, path: str) -> Mount | None:
        """The mount a path lives on: the longest mount point that is its prefix
        (the last one mounted there wins, as in the kernel)."""
        best = None
        path = os.path.normpath(path)
        for m in self.mounts():
            mp = os.path.normpath(m.mount_point)
            if (path == mp or path.startswith(mp.rstrip("/") + "/")) and \
                    (best is None or len(mp) >= len(os.path.normpath(best.mount_point))):
                best = m
        return best

    def meminfo(self) -> dict[str, int]:
        """/proc/meminfo in bytes (HugePages_* counts stay counts)."""
        out = {}
        for line in (self.read("/proc/meminfo") or "").splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                scale = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
                out[key.strip()] = int(parts[0]) * scale
        return out
