"""Boot a small QEMU guest (TCG, Debian 13 cloud kernel, busybox initramfs) and
run a shell script in it: the real NVMe/TCP data path that the host kernel lacks,
with in-band authentication (DH-HMAC-CHAP) and TLS, which Debian 12's lacks.

The initramfs has two layers, concatenated into one file per run (the kernel
unpacks concatenated cpio archives in order):

* base (cached in ``.cache/guest/base13-<hash>.cpio``, rebuilt when any input
  file changes): from the Debian 13 (trixie) userland that
  scripts/install-guest-deps.sh unpacks into ``.cache/guest/trixie/root``:
  busybox, nvme-cli 2.13, tlshd, keyutils, cryptsetup, e2fsprogs, xfsprogs,
  util-linux, kmod, socat; the kernel modules; the Python interpreter of the
  host (same prefix path, pruned stdlib) with the distributions csi-spdk
  depends on; the shared libraries of all of these, resolved with trixie's
  dynamic loader against trixie's libraries (the host's glibc is older, and
  glibc is backward compatible); csi-sanity when installed;
* run: the repository's ``csi_spdk`` package at the same absolute path as on
  the host, ``/etc/guest/test.sh`` (the script), ``/etc/guest/env`` and extra
  files.

The cloud kernel has no 9p, and virtiofs needs virtiofsd (not on the host),
so files are copied, not shared. Results come back on the second serial port
(ttyS1, a file on the host); the guest powers off with sysrq.

Command line (for manual use)::

    python3 tests/e2e/guest/harness.py build
    python3 tests/e2e/guest/harness.py run 'nvme version; python3 -c "import grpc"'
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata as md
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

try:
    from .devices import Monitor, NvmeController, qemu_monitor_args, qemu_nvme_args
except ImportError:          # run as a script: python3 tests/e2e/guest/harness.py
    from devices import Monitor, NvmeController, qemu_monitor_args, qemu_nvme_args

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
CACHE = Path(os.environ.get("CSI_SPDK_GUEST_CACHE", REPO / ".cache" / "guest"))
DISTRO = "trixie"   # CACHE/trixie/{kernel,root}: see scripts/install-guest-deps.sh
INSTALL_SCRIPT = REPO / "scripts" / "install-guest-deps.sh"
QEMU = "qemu-system-x86_64"

# Modules copied into the guest (with their dependencies); loaded on demand by
# modprobe (kmod, with the kernel's modules.dep), /proc/sys/kernel/modprobe set.
MODULES = ("configfs", "nvme-fabrics", "nvme-tcp", "nvmet", "nvmet-tcp", "loop", "xfs",
           "virtio_pci", "virtio_net", "dm-mod", "dm-crypt", "tls",
           # kTLS's AES-GCM (NVMe/TCP TLS; the kernel loads them by alias)
           "gcm", "ghash-generic", "aesni-intel", "ghash-clmulni-intel")
DEFAULT_PRELOAD = ("nvme-tcp", "nvmet-tcp", "loop")

# Programs of the trixie userland copied into the guest (absent ones are
# skipped), with their libraries.
PROGRAMS = (
    "nvme", "tlshd", "keyctl", "cryptsetup", "dmsetup", "ip",
    "mkfs.ext4", "mke2fs", "e2fsck", "fsck.ext4", "resize2fs", "tune2fs", "dumpe2fs",
    "mkfs.xfs", "xfs_repair", "xfs_growfs", "xfs_db", "xfs_io", "xfs_admin", "xfs_info",
    "xfs_spaceman", "blkid", "findmnt", "lsblk", "mount", "umount", "losetup", "blockdev",
    "wipefs", "fsck", "fstrim", "mountpoint", "kmod", "socat", "nsenter", "unshare",
)
KMOD_LINKS = ("modprobe", "insmod", "rmmod", "lsmod", "modinfo", "depmod")
# Python stdlib parts never needed in the guest.
STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
               "site-packages", "pydoc_data", "distutils", "venv", "unittest/test"}
STDLIB_SKIP_PREFIX = ("config-",)


class GuestUnavailable(RuntimeError):
    """qemu, the kernel or a tool is missing (run scripts/install-guest-deps.sh)."""


@dataclasses.dataclass
class GuestResult:
    exit_code: int | None       # None: no result (guest crashed or host timeout)
    output: str                 # stdout+stderr of the script
    console: str                # kernel console (ttyS0)
    timed_out: bool
    timings: dict[str, float]

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def describe(self, console_lines: int = 40) -> str:
        tail = "\n".join(self.console.splitlines()[-console_lines:])
        return (f"guest exit code {self.exit_code} (timed out: {self.timed_out}), "
                f"timings {self.timings}\n--- guest output ---\n{self.output}"
                f"\n--- guest console (last {console_lines} lines) ---\n{tail}")


# --- prerequisites ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Kernel:
    root: Path        # the unpacked package
    version: str

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def moddir(self) -> Path:
        return self.root / "usr" / "lib" / "modules" / self.version


def _distro_dir(cache: Path) -> Path:
    return cache / DISTRO


def find_kernel(cache: Path = CACHE) -> Kernel | None:
    if not (_distro_dir(cache) / ".done").exists():
        return None
    root = _distro_dir(cache) / "kernel"
    for d in sorted((root / "usr" / "lib" / "modules").glob("*")):
        k = Kernel(root, d.name)
        if k.vmlinuz.exists():
            return k
    return None


def userland_root(cache: Path = CACHE) -> Path:
    """The unpacked trixie packages the guest's programs and libraries come from."""
    return _distro_dir(cache) / "root"


def missing_prerequisites(cache: Path = CACHE) -> list[str]:
    missing = []
    if not shutil.which(QEMU):
        missing.append(QEMU)
    if find_kernel(cache) is None:
        missing.append(f"Debian 13 cloud kernel in {_distro_dir(cache)}/kernel")
    root = userland_root(cache)
    for tool in ("busybox", "nvme", "tlshd", "keyctl", "mkfs.ext4", "mkfs.xfs", "kmod"):
        if _find_program(root, tool) is None:
            missing.append(f"{tool} (Debian 13, in {root})")
    return missing


def _resolve_in(root: Path, path: Path) -> Path:
    """Follow symlinks of ``path`` (inside ``root``) without leaving ``root``:
    an absolute link target is relative to ``root``, not to the host's /."""
    for _ in range(40):
        if not path.is_symlink():
            return path
        target = os.readlink(path)
        path = Path(os.path.normpath(root / target.lstrip("/") if target.startswith("/")
                                     else path.parent / target))
    raise GuestUnavailable(f"symlink loop at {path}")


def _find_program(root: Path, name: str) -> Path | None:
    """The guest path (relative to ``root``) of program ``name``, or None."""
    for d in ("usr/sbin", "usr/bin", "sbin", "bin"):
        cand = root / d / name
        if cand.is_symlink() or cand.exists():
            real = _resolve_in(root, cand)
            if real.is_file():
                return cand.relative_to(root)
    return None


def install(cache: Path = CACHE) -> None:
    """Run scripts/install-guest-deps.sh (apt-get; needs root)."""
    subprocess.run(["bash", str(INSTALL_SCRIPT), str(cache)], check=True)


# --- cpio (newc) writer ------------------------------------------------------------------
class Cpio:
    """Write an uncompressed newc archive; parent directories are added as needed."""

    def __init__(self, out) -> None:
        self.out = out
        self.ino = 1000
        self.seen: set[str] = {""}

    def _header(self, name: str, mode: int, size: int, mtime: int = 0, nlink: int = 1,
                rdev: tuple[int, int] = (0, 0)) -> None:
        self.ino += 1
        raw = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev[0], rdev[1],
                  len(raw), 0]
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.out.write(hdr + raw + b"\0" * ((-(len(hdr) + len(raw))) % 4))

    def _pad(self, n: int) -> None:
        self.out.write(b"\0" * ((-n) % 4))

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.seen:
                self.seen.add(d)
                self._header(d, stat.S_IFDIR | 0o755, 0, nlink=2)

    def dir(self, name: str, mode: int = 0o755) -> None:
        name = name.strip("/")
        if name in self.seen:
            return
        self._parents(name)
        self.seen.add(name)
        self._header(name, stat.S_IFDIR | mode, 0, nlink=2)

    def data(self, name: str, data: bytes, mode: int = 0o644, mtime: int = 0) -> None:
        name = name.strip("/")
        self._parents(name)
        self.seen.add(name)
        self._header(name, stat.S_IFREG | mode, len(data), mtime=mtime)
        self.out.write(data)
        self._pad(len(data))

    def file(self, name: str, src: str | Path, mode: int | None = None) -> None:
        st = os.stat(src)
        with open(src, "rb") as f:
            self.data(name, f.read(), mode=stat.S_IMODE(st.st_mode) if mode is None else mode,
                      mtime=int(st.st_mtime))

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self._parents(name)
        self.seen.add(name)
        raw = target.encode()
        self._header(name, stat.S_IFLNK | 0o777, len(raw))
        self.out.write(raw)
        self._pad(len(raw))

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        name = name.strip("/")
        self._parents(name)
        self.seen.add(name)
        self._header(name, stat.S_IFCHR | mode, 0, rdev=(major, minor))

    def close(self) -> None:
        self._header("TRAILER!!!", 0, 0)
        # pad to 512 bytes like GNU cpio; harmless for concatenation
        pos = self.out.tell()
        self.out.write(b"\0" * ((-pos) % 512))


# --- collecting the base layer ----------------------------------------------------------------
def _ldd(root: Path, paths: Iterable[str]) -> set[str]:
    """The shared libraries of ``paths`` as the guest's (trixie's) dynamic
    loader resolves them: from ``root`` first, the host's only for a library
    trixie does not have. One loader run per file (``--list`` takes one)."""
    libdir = root / "usr" / "lib" / "x86_64-linux-gnu"
    loader = libdir / "ld-linux-x86-64.so.2"
    search = f"{libdir}:{root / 'usr' / 'lib'}"
    libs: set[str] = set()
    for path in paths:
        out = subprocess.run([str(loader), "--library-path", search, "--list", path],
                             capture_output=True, text=True).stdout
        for line in out.splitlines():
            m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(", line)
            if m:
                libs.add(m.group(1))
    return libs


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _dist_closure(roots: Iterable[str]) -> list[md.Distribution]:
    seen: dict[str, md.Distribution] = {}
    todo = list(roots)
    while todo:
        req = todo.pop()
        name = re.match(r"[A-Za-z0-9._-]+", req.strip()).group(0)
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        marker = req.partition(";")[2]
        if "extra" in marker:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[key] = dist
        todo.extend(r for r in (dist.requires or []) if "extra ==" not in r)
    return list(seen.values())


# Dependencies only the controller needs in a cluster (its Secret store): not
# copied into the guest, whose controller keeps its keys in a file.
GUEST_SKIP_DISTS = ("kubernetes",)


def _project_dependencies() -> list[str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        deps = list(tomllib.load(f)["project"]["dependencies"])
    return [d for d in deps if not d.startswith(GUEST_SKIP_DISTS)]


@dataclasses.dataclass
class BaseSpec:
    """What goes into the cached base layer."""
    files: dict[str, str]           # guest path -> host path (regular files)
    symlinks: dict[str, str]        # guest path -> link target
    kernel: Kernel

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update((HERE / "harness.py").read_bytes())
        h.update(self.kernel.version.encode())
        for g, src in sorted(self.files.items()):
            st = os.stat(src)
            h.update(f"{g}\0{src}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
        for g, t in sorted(self.symlinks.items()):
            h.update(f"{g}\0->{t}\n".encode())
        return h.hexdigest()[:16]


def collect_base(kernel: Kernel, extra_dists: Iterable[str] = (),
                 cache: Path = CACHE) -> BaseSpec:
    files: dict[str, str] = {}
    links: dict[str, str] = {}
    elves: list[str] = []

    def add(guest: str, host: str) -> None:
        files[guest] = host
        if _is_elf(host):
            elves.append(host)

    # busybox provides /bin, kmod /sbin; util-linux & co. live in /usr/{s,}bin.
    root = userland_root(cache)
    busybox = _find_program(root, "busybox")
    if busybox is None:
        raise GuestUnavailable(f"busybox missing in {root}")
    add("/bin/busybox", str(_resolve_in(root, root / busybox)))
    applets = subprocess.run([files["/bin/busybox"], "--list"], capture_output=True,
                             text=True).stdout.split()
    for a in applets:
        if a != "busybox":
            links[f"/bin/{a}"] = "busybox"
    for prog in PROGRAMS:
        rel = _find_program(root, prog)
        if rel is None:
            continue
        guest = "/usr/sbin/" + prog if "sbin" in rel.parts[-2] else "/usr/bin/" + prog
        add(guest, str(_resolve_in(root, root / rel)))
    if "/usr/bin/kmod" in files:
        for name in KMOD_LINKS:
            links[f"/sbin/{name}"] = "/usr/bin/kmod"
    sanity = _csi_sanity()
    if sanity:
        add("/usr/local/bin/csi-sanity", sanity)
    for conf in ("etc/mke2fs.conf", "etc/e2scrub.conf"):
        if (root / conf).is_file():
            files["/" + conf] = str(root / conf)

    # kernel modules + index files
    mod_files: set[str] = set()
    for mod in MODULES:
        out = subprocess.run(["modprobe", "-d", str(kernel.root), "-S", kernel.version,
                              "--show-depends", mod], capture_output=True, text=True)
        for line in out.stdout.splitlines():
            if line.startswith("insmod "):
                mod_files.add(line.split()[1])
    for f in mod_files:
        rel = os.path.relpath(f, kernel.root)
        files["/" + rel.replace("lib/modules", "usr/lib/modules", 1)] = f
    for f in kernel.moddir.glob("modules.*"):
        files[f"/usr/lib/modules/{kernel.version}/{f.name}"] = str(f)

    # Python: same prefix as on the host, so sys.prefix and shebangs work.
    prefix = Path(sys.base_prefix)
    exe = Path(sys.executable).resolve()
    add(str(exe), str(exe))
    links["/usr/bin/python3"] = str(exe)
    links[str(prefix / "bin" / "python3")] = exe.name
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(stdlib):
        rel = os.path.relpath(dirpath, stdlib)
        dirnames[:] = [d for d in dirnames
                       if os.path.normpath(os.path.join(rel, d)) not in STDLIB_SKIP
                       and not d.startswith(STDLIB_SKIP_PREFIX)]
        for fn in filenames:
            if ".opt-" in fn or fn.endswith((".exe", ".pyi")) or fn.startswith(
                    ("_tkinter", "_test", "xxlimited", "_xxtest", "_ctypes_test")):
                continue
            p = os.path.join(dirpath, fn)
            add(p, p)
    libpy = Path(sysconfig.get_config_var("LIBDIR") or prefix / "lib")
    for so in libpy.glob("libpython*.so.*"):
        add(str(so), str(so.resolve()))
    site = Path(sysconfig.get_paths()["purelib"])
    for dist in _dist_closure([*_project_dependencies(), *extra_dists]):
        for f in dist.files or []:
            p = Path(dist.locate_file(f)).resolve()
            if site not in p.parents or not p.is_file() or ".opt-" in p.name:
                continue
            add(str(p), str(p))

    # pyudev loads libudev with ctypes: not visible to the loader.
    udev = root / "usr" / "lib" / "x86_64-linux-gnu" / "libudev.so.1"
    if udev.exists():
        elves.append(str(udev))
    for lib in sorted(_ldd(root, sorted(set(elves)))):
        real = Path(lib)
        if root in real.parents:
            guest = "/" + str(real.relative_to(root))
            real = _resolve_in(root, real)
        else:   # a host library trixie lacks (e.g. the host's libpython)
            guest = os.path.join(os.path.realpath(os.path.dirname(lib)), os.path.basename(lib))
            real = Path(os.path.realpath(lib))
        files[guest] = str(real)
    # the ELF interpreter every program names (PT_INTERP)
    links["/usr/lib64/ld-linux-x86-64.so.2"] = "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    return BaseSpec(files=files, symlinks=links, kernel=kernel)


def _csi_sanity() -> str | None:
    env = os.environ.get("CSI_SANITY")
    if env and os.path.exists(env):
        return env
    found = shutil.which("csi-sanity")
    if found:
        return found
    gopath = os.environ.get("GOPATH") or os.path.expanduser("~/go")
    if shutil.which("go"):
        gopath = subprocess.run(["go", "env", "GOPATH"], capture_output=True,
                                text=True).stdout.strip() or gopath
    cand = Path(gopath) / "bin" / "csi-sanity"
    return str(cand) if cand.exists() else None


def build_base(kernel: Kernel, cache: Path = CACHE, extra_dists: Iterable[str] = ()) -> Path:
    """The cached base layer, built when missing or outdated."""
    spec = collect_base(kernel, extra_dists, cache)
    out = cache / f"base13-{spec.digest()}.cpio"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        c = Cpio(f)
        for d in ("dev", "proc", "sys", "run", "tmp", "root", "mnt", "etc", "var/tmp",
                  "usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "sbin", "etc/guest"):
            c.dir(d)
        c.dir("tmp", 0o1777)
        c.chardev("dev/console", 5, 1)
        c.chardev("dev/null", 1, 3, 0o666)
        # merged /usr for libraries (ldd names /lib/... and /lib64/...)
        c.symlink("lib", "usr/lib")
        c.symlink("lib64", "usr/lib64")
        c.data("etc/fstab", b"")
        c.data("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        c.data("etc/group", b"root:x:0:\n")
        c.data("etc/hosts", b"127.0.0.1 localhost csi-spdk-guest\n")
        c.data("usr/bin/csi-spdk", b'#!/bin/sh\nexec python3 -m csi_spdk "$@"\n', 0o755)
        for guest, host in sorted(spec.files.items()):
            guest = re.sub(r"^/lib(64)?/", r"/usr/lib\1/", guest)
            c.file(guest, host)
        for guest, target in sorted(spec.symlinks.items()):
            if guest.strip("/") not in c.seen:
                c.symlink(guest, target)
        c.close()
    tmp.rename(out)
    for old in cache.glob("base13-*.cpio"):
        if old != out:
            old.unlink()
    return out


# --- running ----------------------------------------------------------------------------------
@dataclasses.dataclass
class GuestOptions:
    memory_mib: int = 2048
    cpus: int = 2
    preload_modules: tuple[str, ...] = DEFAULT_PRELOAD
    # QEMU user networking: the host is 10.0.2.2 in the guest (for a real
    # spdk_tgt on the host, see host_rpc). Off by default: fully isolated guest.
    network: bool = False
    # A JSON-RPC address of a real target on the host (CSI_SPDK_TEST_RPC):
    # "unix:///path", "/path" or "127.0.0.1:port". Forwarded into the guest as
    # 10.0.2.100:5260 (guestfwd + socat); the guest sees it as $GUEST_SPDK_RPC.
    host_rpc: str | None = None
    # A csi-spdk agent on the host beside that target (its Unix socket path):
    # forwarded as 10.0.2.100:5261, $GUEST_AGENT; csi_stack_start then uses it
    # (key files land on the target's host, so auth works on a real target).
    host_agent: str | None = None
    extra_dists: tuple[str, ...] = ()   # more Python distributions for the guest
    boot_margin: float = 60.0           # host-side timeout = timeout + this
    # QEMU user-net port forwards (host 127.0.0.1:HOST -> guest :GUEST), e.g.
    # to reach a gRPC or JSON-RPC server in a background guest (start_guest).
    # Non-empty turns networking on.
    hostfwd: tuple[tuple[int, int], ...] = ()
    # Emulated PCIe NVMe SSDs (devices.NvmeController).
    nvme: tuple[NvmeController, ...] = ()
    # A QMP monitor (GuestHandle.monitor(): device_del, query-pci).
    monitor: bool = False


GUEST_RPC_ADDR = ("10.0.2.100", 5260)
GUEST_AGENT_ADDR = ("10.0.2.100", 5261)


def _socat_target(addr: str) -> str:
    if addr.startswith("unix:"):
        addr = "/" + addr.split(":", 1)[1].lstrip("/")
    return f"UNIX-CONNECT:{addr}" if addr.startswith("/") else f"TCP:{addr}"


def _qemu_net_args(opts: GuestOptions) -> list[str]:
    if not opts.network and not opts.host_rpc and not opts.hostfwd:
        return ["-nic", "none"]
    nic = "user,model=virtio-net-pci"
    for host_port, guest_port in opts.hostfwd:
        nic += f",hostfwd=tcp:127.0.0.1:{int(host_port)}-:{int(guest_port)}"
    for addr, (ip, port) in ((opts.host_rpc, GUEST_RPC_ADDR),
                             (opts.host_agent, GUEST_AGENT_ADDR)):
        if addr:
            nic += f",guestfwd=tcp:{ip}:{port}-cmd:socat - {_socat_target(addr)}"
    return ["-nic", nic]


def _repo_layer(c: Cpio) -> None:
    """The csi_spdk package (and pyproject) at the host path, with fresh bytecode."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0",
                    str(REPO / "csi_spdk")], capture_output=True)
    for dirpath, dirnames, filenames in os.walk(REPO / "csi_spdk"):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fn in filenames:
            if fn.endswith((".py", ".pyc", ".json", ".yaml", ".txt")) and ".opt-" not in fn:
                p = os.path.join(dirpath, fn)
                c.file(p, p)
    c.file(str(REPO / "pyproject.toml"), REPO / "pyproject.toml")


def _write_initrd(work: Path, base: Path, script: str, timeout: int,
                  env: Mapping[str, str] | None,
                  files: Mapping[str, bytes | str | Path] | None,
                  opts: GuestOptions) -> Path:
    """base layer + run layer (init, lib.sh, csi_spdk, env, script, files)."""
    initrd = work / "initrd.cpio"
    with open(initrd, "wb") as f:
        with open(base, "rb") as b:
            shutil.copyfileobj(b, f, 1 << 20)
        c = Cpio(f)
        c.file("init", HERE / "init.sh", 0o755)
        c.file("etc/guest/lib.sh", HERE / "lib.sh", 0o644)
        _repo_layer(c)
        genv = {
            "GUEST_TIMEOUT": str(int(timeout)),
            "GUEST_MODULES": " ".join(opts.preload_modules),
            "GUEST_NET": "1" if (opts.network or opts.host_rpc or opts.hostfwd) else "0",
            # The distributions were copied from this interpreter's purelib; in
            # a venv (.venv, scripts/venv.sh) that is not the base python's
            # own site dir, so the guest's python3 is told where it is.
            "PYTHONPATH": f"{REPO}:{sysconfig.get_paths()['purelib']}",
            "CSI_SPDK_REPO": str(REPO),
            "PYTHONUNBUFFERED": "1",
        }
        if opts.host_rpc:
            genv["GUEST_SPDK_RPC"] = "{}:{}".format(*GUEST_RPC_ADDR)
            # the real target's NVMe/TCP port on the host's 127.0.0.1, when
            # 4420 is taken there (another target on the same machine)
            port = os.environ.get("CSI_SPDK_TEST_NVMF_PORT") or "4420"
            genv["GUEST_TARGET_PORT"] = port
            genv.setdefault("CSI_NVMF_PORT", port)     # lib.sh's controller config
        if opts.host_agent:
            genv["GUEST_AGENT"] = "{}:{}".format(*GUEST_AGENT_ADDR)
        genv.update(env or {})
        c.data("etc/guest/env", "".join(f"export {k}={shlex.quote(v)}\n"
                                        for k, v in genv.items()).encode())
        c.data("etc/guest/test.sh", script.encode(), 0o755)
        for path, content in (files or {}).items():
            if isinstance(content, Path):
                c.file(path, content)
            else:
                c.data(path, content.encode() if isinstance(content, str) else content,
                       0o755 if str(path).endswith(".sh") else 0o644)
        c.close()
    return initrd


def _qemu_cmd(kernel: Kernel, initrd: Path, out_log: Path, con_log: Path,
              host_timeout: float, opts: GuestOptions) -> list[str]:
    cmd = [
        "timeout", "-k", "5", str(int(host_timeout)),
        QEMU, "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(opts.cpus),
        "-m", str(opts.memory_mib), "-nodefaults", "-no-reboot", "-display", "none",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
        # no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer
        # check can fail and panic ("IO-APIC + timer doesn't work!", seen with 6.12)
        "-append", "console=ttyS0 loglevel=4 panic=-1 rdinit=/init no_timer_check",
        "-serial", f"file:{con_log}",
        "-chardev", f"file,id=results,path={out_log}",
        "-device", "isa-serial,chardev=results",
        *_qemu_net_args(opts),
        *qemu_nvme_args(initrd.parent, opts.nvme),
        *(qemu_monitor_args(initrd.parent) if opts.monitor else []),
    ]
    return cmd


def _ready_kernel(cache: Path) -> Kernel:
    """The guest kernel, or GuestUnavailable naming what is missing."""
    missing = missing_prerequisites(cache)
    if missing:
        raise GuestUnavailable("missing: " + ", ".join(missing)
                               + " (run scripts/install-guest-deps.sh)")
    kernel = find_kernel(cache)
    assert kernel is not None
    return kernel


def _run_qemu(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run QEMU (under ``timeout``) in a process group of its own and kill the
    whole group if this is interrupted (a pytest timeout, ^C): killing only
    ``timeout`` would leave QEMU running its script on, unseen."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# A kernel that died before init started the script (no @@GUEST-START, a
# panic on the console) is booted again, at most this often: nothing of the
# test ran. Seen in CI and in the cluster rig (tests/e2e/cluster/nodes.py): an
# int3 Oops in sched_clock_cpu a few seconds into boot (TCG with several vCPU
# threads racing the kernel's own code patching).
EARLY_BOOT_RETRIES = 2


def _died_before_init(raw: str, console: str) -> bool:
    return "@@GUEST-START" not in raw and "Kernel panic" in console


def _panic_line(console: str) -> str:
    lines = [ln.strip() for ln in console.splitlines() if "Kernel panic" in ln or "Oops" in ln]
    return lines[0][:160] if lines else "no panic line"


def run_in_guest(script: str, timeout: int = 120, *, env: Mapping[str, str] | None = None,
                 files: Mapping[str, bytes | str | Path] | None = None,
                 options: GuestOptions | None = None, cache: Path = CACHE,
                 keep_dir: Path | None = None) -> GuestResult:
    """Boot the guest, run ``script`` with ``sh -e`` (busybox ash) as root, return
    its exit code and output. ``files``: guest path -> bytes/str content, or a
    host Path to copy. ``timeout`` bounds the script; the guest powers off after it."""
    opts = options or GuestOptions()
    kernel = _ready_kernel(cache)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    base = build_base(kernel, cache, opts.extra_dists)
    timings["base"] = round(time.monotonic() - t0, 2)

    work = Path(tempfile.mkdtemp(prefix="guest-", dir=keep_dir))
    try:
        t1 = time.monotonic()
        initrd = _write_initrd(work, base, script, timeout, env, files, opts)
        timings["initrd"] = round(time.monotonic() - t1, 2)

        out_log, con_log = work / "ttyS1.log", work / "console.log"
        cmd = _qemu_cmd(kernel, initrd, out_log, con_log,
                        timeout + opts.boot_margin, opts)
        t2 = time.monotonic()
        for boot in range(EARLY_BOOT_RETRIES + 1):
            proc = _run_qemu(cmd)
            raw = out_log.read_bytes().decode(errors="replace") if out_log.exists() else ""
            console = con_log.read_bytes().decode(errors="replace") if con_log.exists() else ""
            if not _died_before_init(raw, console) or boot == EARLY_BOOT_RETRIES:
                break
            timings[f"early_death_{boot + 1}"] = round(time.monotonic() - t2, 2)
            print(f"guest: the kernel died before init (boot {boot + 1}: "
                  f"{_panic_line(console)}); booting again", flush=True)
        timings["qemu"] = round(time.monotonic() - t2, 2)
        if proc.returncode not in (0,) and proc.stderr:
            console += f"\n[qemu exit {proc.returncode}] {proc.stderr}"
        raw = raw.replace("\r\n", "\n")
        output, exit_code, timed_out = raw, None, proc.returncode in (124, 137)
        m_start = re.search(r"^@@GUEST-START ([\d.]+)\n", raw, re.M)
        # the last marker (init prints it after the script, which cannot fake it)
        m_exit = ([None] + list(re.finditer(r"\n@@GUEST-EXIT (\d+) ([\d.]+)\n", raw)))[-1]
        if m_start:
            timings["kernel_to_init"] = float(m_start.group(1))
            output = raw[m_start.end():]
        if m_exit:
            exit_code = int(m_exit.group(1))
            output = output[:output.rfind("\n@@GUEST-EXIT")]
            if m_start:
                timings["script"] = round(float(m_exit.group(2)) - float(m_start.group(1)), 2)
                timed_out = timed_out or (exit_code == 137 and timings["script"] >= timeout)
        timings["total"] = round(time.monotonic() - t0, 2)
        return GuestResult(exit_code, output, console, timed_out, timings)
    finally:
        if keep_dir is None:
            shutil.rmtree(work, ignore_errors=True)


class GuestHandle:
    """A guest running in the background (``start_guest``): its script's output
    so far, whether it is still running, and ``stop()`` (kills QEMU, removes
    the work directory). Usable as a context manager."""

    def __init__(self, proc: subprocess.Popen, work: Path, out_log: Path, con_log: Path,
                 keep: bool) -> None:
        self.proc, self.work, self.out_log, self.con_log = proc, work, out_log, con_log
        self._keep = keep
        self._monitor: Monitor | None = None

    def output(self) -> str:
        raw = self.out_log.read_bytes().decode(errors="replace") if self.out_log.exists() else ""
        return raw.replace("\r\n", "\n")

    def console(self) -> str:
        return self.con_log.read_bytes().decode(errors="replace") if self.con_log.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for_output(self, marker: str, timeout: float) -> bool:
        """Wait until ``marker`` appears in the output; False on timeout or exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.output():
                return True
            if not self.alive():
                return marker in self.output()
            time.sleep(0.2)
        return False

    def describe(self, console_lines: int = 40) -> str:
        tail = "\n".join(self.console().splitlines()[-console_lines:])
        return (f"guest running: {self.alive()} (qemu exit {self.proc.poll()})\n"
                f"--- guest output ---\n{self.output()}\n"
                f"--- console (last {console_lines} lines) ---\n{tail}")

    def monitor(self) -> Monitor:
        """The QMP monitor (``GuestOptions(monitor=True)``), connected on first use."""
        if self._monitor is None:
            self._monitor = Monitor(self.work, self.alive)
        return self._monitor

    def wait(self, timeout: float) -> int | None:
        """Wait for the guest to power off; the script's exit code (None: no
        exit marker, e.g. a crash or the timeout, which kills QEMU)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill()          # the work dir (and so the output) stays until stop()
        m = ([None] + list(re.finditer(r"\n@@GUEST-EXIT (\d+) ", self.output())))[-1]
        return int(m.group(1)) if m else None

    def _kill(self) -> None:
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def stop(self) -> None:
        self._kill()
        if not self._keep:
            shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> GuestHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_guest(script: str, timeout: int = 600, *, env: Mapping[str, str] | None = None,
                files: Mapping[str, bytes | str | Path] | None = None,
                options: GuestOptions | None = None, cache: Path = CACHE,
                keep_dir: Path | None = None) -> GuestHandle:
    """Like ``run_in_guest`` but returns at once with a ``GuestHandle``; the
    guest runs ``script`` until it ends, ``timeout`` passes or ``stop()``.
    Reach servers in it through ``options.hostfwd``."""
    opts = options or GuestOptions()
    kernel = _ready_kernel(cache)
    base = build_base(kernel, cache, opts.extra_dists)
    work = Path(tempfile.mkdtemp(prefix="guest-bg-", dir=keep_dir))
    try:
        initrd = _write_initrd(work, base, script, timeout, env, files, opts)
        out_log, con_log = work / "ttyS1.log", work / "console.log"
        cmd = _qemu_cmd(kernel, initrd, out_log, con_log, timeout + opts.boot_margin, opts)
        with open(work / "qemu.stderr", "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err)
    except BaseException:
        if keep_dir is None:
            shutil.rmtree(work, ignore_errors=True)
        raise
    return GuestHandle(proc, work, out_log, con_log, keep=keep_dir is not None)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("build", "run", "install"):
        print(__doc__)
        return 2
    if argv[0] == "install":
        install()
        return 0
    kernel = find_kernel()
    if kernel is None:
        print("no kernel: run scripts/install-guest-deps.sh", file=sys.stderr)
        return 1
    if argv[0] == "build":
        t = time.monotonic()
        path = build_base(kernel)
        print(f"{path} ({path.stat().st_size >> 20} MiB) in {time.monotonic() - t:.1f}s")
        return 0
    res = run_in_guest(" ".join(argv[1:]) or "true", timeout=300)
    print(res.output, end="")
    print(f"[guest exit {res.exit_code}, timings {res.timings}]", file=sys.stderr)
    if res.exit_code is None:
        print(res.console[-4000:], file=sys.stderr)
    return 0 if res.exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
