"""Kubernetes node guests: QEMU (TCG) booting the Debian 13 node disk of
scripts/build-node-rootfs.sh, running containerd + kubelet (node-init.sh).

Each node gets, per rig run, writable sparse copies of the root disk and of
the cached image disk (containerd's store with every image imported), so a
reboot keeps what the node wrote (/var/lib/kubelet, /var/lib/csi-spdk) and
a new run starts clean. Per-boot files (env, kubeconfig, certificates,
kubelet config, static Pod manifests) ride along as a second initramfs
archive. User networking: the node is 10.0.2.15 and dials the host as
10.0.2.2; host ports are forwarded to it for the kubelet API (the apiserver
reaches kubelets at 127.0.0.1:<port>, see ``NodeGuest.adopt``) and for
whatever else the node serves (``forwards``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from guest import harness  # noqa: E402
from k8s import cluster as k8s  # noqa: E402

REPO = HERE.parents[2]
CACHE = Path(os.environ.get("CSI_SPDK_GUEST_CACHE", REPO / ".cache" / "guest"))
BUILD_SCRIPT = REPO / "scripts" / "build-node-rootfs.sh"


class NodeError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Media:
    """The cached boot media of scripts/build-node-rootfs.sh."""
    dir: Path

    @property
    def kernel(self) -> Path:
        return self.dir / "kernel"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.cpio"

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs.ext4"


def media() -> Media:
    """Build (or reuse) the node media."""
    res = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True,
                         timeout=1200, env={**os.environ, "CSI_SPDK_GUEST_CACHE": str(CACHE),
                                            "K8S_BIN": str(k8s.BIN)})
    if res.returncode != 0:
        raise NodeError(f"build-node-rootfs.sh failed: {res.stdout[-2000:]}{res.stderr[-3000:]}")
    m = Media((CACHE / "node" / "current").resolve())
    if not m.rootfs.exists():
        raise NodeError(f"no node root disk in {m.dir}")
    return m


def missing_prerequisites() -> list[str]:
    out = harness.missing_prerequisites(CACHE)
    for tool in ("mmdebstrap", "umoci", "mke2fs", "gcc"):
        if not shutil.which(tool):
            out.append(tool)
    if not (k8s.BIN / "kubelet").exists():
        out.append("kubelet (scripts/install-k8s.sh)")
    if not (k8s.BIN / "kube-scheduler").exists():
        out.append("kube-scheduler (scripts/install-k8s.sh)")
    return out


def _qemu(m: Media, *, memory_mib: int, initrd: Path, disks: list[Path], workdir: Path,
          forwards: list[tuple[int, int]]) -> list[str]:
    fwd = "".join(f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in forwards)
    cmd = [harness.QEMU, "-accel", "tcg,thread=multi,tb-size=256", "-cpu", "max", "-smp", "2",
           "-m", str(memory_mib), "-nodefaults", "-no-reboot", "-display", "none",
           "-kernel", str(m.kernel), "-initrd", str(initrd),
           "-append", "console=ttyS0 loglevel=4 panic=-1 rdinit=/init no_timer_check",
           "-serial", f"file:{workdir / 'console.log'}",
           "-chardev", f"file,id=status,path={workdir / 'status.log'}",
           "-device", "isa-serial,chardev=status",
           "-nic", f"user,model=virtio-net-pci{fwd}"]
    for d in disks:
        cmd += ["-drive", f"file={d},if=virtio,format=raw,cache=unsafe"]
    return cmd


def _node_cpio(files: dict[str, bytes | str], out: Path) -> None:
    buf = io.BytesIO()
    c = harness.Cpio(buf)
    for name, data in sorted(files.items()):
        c.data(f"node/{name}", data.encode() if isinstance(data, str) else data, mode=0o600)
    c.close()
    out.write_bytes(buf.getvalue())


class _Guest:
    """One QEMU process: its status port (ttyS1) and console files."""

    def __init__(self, cmd: list[str], workdir: Path) -> None:
        self.dir = workdir
        for f in ("console.log", "status.log"):
            (workdir / f).unlink(missing_ok=True)
        self.log = open(workdir / "qemu.log", "ab")  # noqa: SIM115 (closed in stop)
        self.popen = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        self.started = time.monotonic()

    def status(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "status.log").read_text(errors="replace")
        return ""

    def console(self, lines: int = 60) -> str:
        with contextlib.suppress(OSError):
            text = (self.dir / "console.log").read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    def wait_for(self, marker: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.status()
            if marker in s:
                return True
            if "NODE-FAILED" in s or self.popen.poll() is not None:
                return marker in self.status()
            time.sleep(0.5)
        return False

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """Pull the plug: SIGKILL the QEMU process (a node lost, not shut down)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        self.log.close()


IMPORT_SCRIPT = HERE / "import-images.sh"


def image_disk(m: Media, archive: Path, digest: str, refs, timeout: float = 900) -> Path:
    """containerd's store with ``archive`` imported (import-images.sh, on the
    host with the node disk's containerd), cached by containerd's version and
    the archive's content."""
    containerd = (m.dir / "containerd.version").read_text().strip()
    key = hashlib.sha256(f"containerd {containerd} {digest}".encode()).hexdigest()[:16]
    disk = CACHE / "node" / f"images-{key}.ext4"
    if disk.exists():
        return disk
    tmp = disk.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-L", "images", str(tmp), "4G"], check=True)
    res = subprocess.run(["bash", str(IMPORT_SCRIPT), str(m.rootfs), str(tmp), str(archive)],
                         capture_output=True, text=True, timeout=timeout)
    listed = set(res.stdout.split())
    if res.returncode != 0 or not set(refs) <= listed:
        tmp.unlink(missing_ok=True)
        raise NodeError(f"importing the images failed ({res.returncode}): {res.stderr[-3000:]}"
                        f"\nlisted: {sorted(listed)}\nwanted: {sorted(refs)}")
    os.replace(tmp, disk)
    return disk


@dataclasses.dataclass
class NodeSpec:
    name: str
    index: int                                  # pod CIDR 10.88.<index>.0/24
    memory_mib: int = 1536
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    manifests: dict[str, dict] = dataclasses.field(default_factory=dict)  # static Pods
    files: dict[str, bytes | str] = dataclasses.field(default_factory=dict)  # more /etc/node
    forwards: list[tuple[int, int]] = dataclasses.field(default_factory=list)


class NodeGuest:
    """A Kubernetes node: boot, wait for NodeReady, reboot, kill."""

    def __init__(self, spec: NodeSpec, m: Media, images: Path, cp, workdir: Path) -> None:
        self.spec, self.media, self.cp = spec, m, cp
        self.dir = workdir / f"node-{spec.name}"
        self.dir.mkdir(parents=True)
        self.kubelet_port = k8s.free_port()
        self.root = self.dir / "root.ext4"
        self.images = self.dir / "images.ext4"
        subprocess.run(["cp", "--sparse=always", str(m.rootfs), str(self.root)], check=True)
        subprocess.run(["cp", "--sparse=always", str(images), str(self.images)], check=True)
        self.guest: _Guest | None = None
        self.boots = 0
        self._initrd()

    def _initrd(self) -> None:
        s, cp = self.spec, self.cp
        crt, key = k8s.client_cert(cp.pki, f"kubelet-{s.name}", f"system:node:{s.name}",
                                   "system:nodes")
        api_port = cp.api_port
        kubecfg = {
            "apiVersion": "v1", "kind": "Config", "current-context": "node",
            "clusters": [{"name": "rig", "cluster": {
                "server": f"https://10.0.2.2:{api_port}",
                "certificate-authority": "/etc/node/ca.crt"}}],
            "users": [{"name": "node", "user": {"client-certificate": "/etc/node/kubelet.crt",
                                                "client-key": "/etc/node/kubelet.key"}}],
            "contexts": [{"name": "node", "context": {"cluster": "rig", "user": "node"}}]}
        kubelet_cfg = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "port": self.kubelet_port, "readOnlyPort": 0,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": "/etc/node/ca.crt"}},
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs", "failCgroupV1": True, "failSwapOn": False,
            "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
            "staticPodPath": "/etc/kubernetes/manifests",
            "resolvConf": "/etc/resolv.conf",
            "serializeImagePulls": False,
            "evictionHard": {"memory.available": "20Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            # kubelet's own periodic work is most of a TCG node's CPU (two
            # thirds in a measured start-up): the default periods, not
            # shorter ones (node status every 10 s, pod syncs every 1 min,
            # volume stats every 1 min)
            "shutdownGracePeriod": "0s",
            # a TCG guest on a busy machine needs minutes to start a shim:
            # the default 2 min fails container starts with "context canceled"
            "runtimeRequestTimeout": "10m",
        }
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        files = {
            "env": (f"NODE_NAME={s.name}\nAPI_HOST=10.0.2.2\nAPI_PORT={api_port}\n"
                    f"KUBELET_PORT={self.kubelet_port}\nPOD_CIDR=10.88.{s.index}.0/24\n"
                    f"NODE_LABELS='{labels}'\n"),
            "ca.crt": cp.ca.read_bytes(),
            "kubelet.crt": crt.read_bytes(), "kubelet.key": key.read_bytes(),
            "kubelet.kubeconfig": yaml.safe_dump(kubecfg),
            "kubelet-config.yaml": yaml.safe_dump(kubelet_cfg),
            **{f"manifests/{n}.yaml": yaml.safe_dump(p) for n, p in s.manifests.items()},
            **s.files,
        }
        _node_cpio(files, self.dir / "node.cpio")
        (self.dir / "initrd.cpio").write_bytes(self.media.initrd.read_bytes()
                                               + (self.dir / "node.cpio").read_bytes())

    # -- life cycle -----------------------------------------------------------------------
    def boot(self) -> None:
        if self.guest is not None and self.guest.alive():
            raise NodeError(f"node {self.spec.name} is running")
        fwd = [(self.kubelet_port, self.kubelet_port), *self.spec.forwards]
        self.guest = _Guest(_qemu(self.media, memory_mib=self.spec.memory_mib,
                                  initrd=self.dir / "initrd.cpio",
                                  disks=[self.root, self.images], workdir=self.dir,
                                  forwards=fwd), self.dir)
        self.boots += 1

    # a kernel that died before its init ran (no NODE-BOOT): booted again, at
    # most this often. Seen once: an int3 Oops in sched_clock_cpu 3.7 s into
    # boot (TCG with several vCPU threads racing the kernel's own code
    # patching); nothing of the node had run, so a new boot is the same node.
    EARLY_BOOT_RETRIES = 2

    def wait_kubelet(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        for attempt in range(self.EARLY_BOOT_RETRIES + 1):
            if self.guest.wait_for("NODE-KUBELET-STARTED", max(1.0, deadline - time.monotonic())):
                return
            if (self.guest.alive() or "NODE-BOOT" in self.guest.status()
                    or attempt == self.EARLY_BOOT_RETRIES):
                break
            kept = self.dir / f"console.early-death-{self.boots}.log"
            with contextlib.suppress(OSError):
                (self.dir / "console.log").rename(kept)
            print(f"node {self.spec.name}: the kernel died before init (console: {kept}); "
                  "booting again")
            self.guest.kill()
            self.boot()
        raise NodeError(f"node {self.spec.name}: kubelet did not start\n{self.describe()}")

    def adopt(self, timeout: float = 180) -> None:
        """Play the cloud controller manager (kubelet runs with
        --cloud-provider=external): give the Node the address the apiserver
        reaches its kubelet at (127.0.0.1, the forwarded port kubelet
        reports as its endpoint) and lift the uninitialized taint; then wait
        for NodeReady."""
        k = self.cp.kubectl
        name = self.spec.name
        k8s.wait_until(f"Node {name} registered", lambda: k.get("node", name), timeout, 2,
                       self.describe)
        k.run("patch", "node", name, "--subresource=status", "--type=json", "-p",
              '[{"op":"replace","path":"/status/addresses","value":[{"type":"InternalIP",'
              f'"address":"127.0.0.1"}},{{"type":"Hostname","address":"{name}"}}]}}]')
        k.run("taint", "node", name, "node.cloudprovider.kubernetes.io/uninitialized-",
              check=False)
        res = k.run("wait", "--for=condition=Ready", f"node/{name}", f"--timeout={int(timeout)}s",
                    check=False, timeout=timeout + 30)
        if res.returncode != 0:
            raise NodeError(f"node {name} not Ready: {res.stderr}\n{self.describe()}")

    def start(self, timeout: float = 240) -> None:
        self.boot()
        self.wait_kubelet(timeout)
        self.adopt(timeout)

    def kill(self) -> None:
        if self.guest is not None:
            self.guest.kill()

    def stop(self) -> None:
        self.kill()

    def describe(self) -> str:
        if self.guest is None:
            return f"node {self.spec.name}: not booted"
        return (f"--- node {self.spec.name} (boot {self.boots}, qemu "
                f"{'running' if self.guest.alive() else f'exit {self.guest.popen.poll()}'}) ---\n"
                f"status: {self.guest.status()[-1500:]}\nconsole:\n{self.guest.console(60)}")
