"""A real Kubernetes control plane as plain processes on 127.0.0.1, no Docker,
no kubelet: etcd, kube-apiserver, kube-controller-manager (PV binder,
attach/detach, expander, PVC/PV protection, garbage collector, service
accounts), snapshot-controller, the CSI sidecars of the Helm chart
(csi-provisioner, -attacher, -resizer, -snapshotter) with the chart's own
arguments and ServiceAccount, the driver's controller and SPDK simulators.

Binaries come from scripts/install-k8s.sh (.cache/k8s/bin, or $CSI_SPDK_K8S_BIN).
Everything runs in its own process group and a temp dir, and ``stop()``
removes all of it.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
CHART = REPO / "deploy" / "helm" / "csi-spdk"
BIN = Path(os.environ.get("CSI_SPDK_K8S_BIN", REPO / ".cache" / "k8s" / "bin"))
K8S_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl",
                "csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter",
                "snapshot-controller")
K8S_VERSION = "v1.34.4"        # scripts/install-k8s.sh
SNAPSHOTTER_CLIENT = "github.com/kubernetes-csi/external-snapshotter/client/v8@v8.7.0"
NAMESPACE = "csi-spdk"          # the chart's release namespace
RELEASE = "csi-spdk"
DRIVER = "csi-spdk.io"
# kube-controller-manager controllers the PVC path needs (1.34 names).
KCM_CONTROLLERS = (
    "persistentvolume-binder-controller", "persistentvolume-attach-detach-controller",
    "persistentvolume-expander-controller", "persistentvolumeclaim-protection-controller",
    "persistentvolume-protection-controller", "garbage-collector-controller",
    "serviceaccount-controller",
)
SIDECARS = ("csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter")


class RigError(RuntimeError):
    pass


class ProcessDied(RigError):
    """A component exited: waiting longer cannot help."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def go_bin_dir() -> Path | None:
    go = shutil.which("go") or ("/usr/local/go/bin/go" if os.path.exists("/usr/local/go/bin/go")
                                else None)
    if not go:
        return None
    out = subprocess.run([go, "env", "GOPATH"], capture_output=True, text=True)
    return Path(out.stdout.strip()) / "bin" if out.returncode == 0 else None


def helm_binary() -> str | None:
    found = shutil.which("helm")
    if found:
        return found
    d = go_bin_dir()
    return str(d / "helm") if d and (d / "helm").exists() else None


def snapshot_crd_dir() -> Path | None:
    """The VolumeSnapshot CRDs, from the Go module cache (install-deploy-tools.sh)."""
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not os.path.exists(go) and not shutil.which(go):
        return None
    out = subprocess.run([go, "mod", "download", "-json", SNAPSHOTTER_CLIENT],
                         capture_output=True, text=True, cwd="/")
    if out.returncode != 0:
        return None
    d = Path(json.loads(out.stdout).get("Dir", "")) / "config" / "crd"
    return d if d.is_dir() else None


def missing_prerequisites() -> list[str]:
    missing = [f"{b} (scripts/install-k8s.sh)" for b in K8S_BINARIES if not (BIN / b).exists()]
    if not helm_binary():
        missing.append("helm (scripts/install-deploy-tools.sh)")
    if snapshot_crd_dir() is None:
        missing.append(f"{SNAPSHOTTER_CLIENT} CRDs (scripts/install-deploy-tools.sh)")
    return missing


# --- processes -------------------------------------------------------------------------------
class Proc:
    """One component: its own process group, output in a log file."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict | None = None,
                 cwd: Path | None = None) -> None:
        self.name, self.cmd, self.log = name, cmd, log
        self._out = open(log, "ab")  # noqa: SIM115 (closed in stop)
        self.popen = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                                      cwd=cwd, start_new_session=True)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_bytes().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 10) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        # whatever is left in the group (children), and the leader if stuck
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self._out.close()


def wait_until(what: str, check: Callable[[], object], timeout: float,
               interval: float = 0.5, on_fail: Callable[[], str] | None = None):
    """Poll ``check`` until it returns a truthy value; RigError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_err: Exception | None = None
    while True:
        try:
            got = check()
            if got:
                return got
        except ProcessDied:
            raise
        except Exception as err:  # noqa: BLE001 - reported on timeout
            last_err = err
        if time.monotonic() > deadline:
            detail = f" (last error: {last_err})" if last_err else ""
            extra = ("\n" + on_fail()) if on_fail else ""
            raise RigError(f"timed out after {timeout:.0f}s waiting for {what}{detail}{extra}")
        time.sleep(interval)


# --- certificates ------------------------------------------------------------------------------
def _certs(d: Path, extra_ips: tuple[str, ...] = ()) -> dict[str, Path]:
    """CA, apiserver serving cert (also for ``extra_ips``), admin client cert,
    service-account key pair."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    later = now + datetime.timedelta(days=2)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def write_key(k, path: Path) -> None:
        path.write_bytes(k.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))

    def name(cn: str, org: str | None = None) -> x509.Name:
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        if org:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
        return x509.Name(attrs)

    ca_key = key()
    ca = (x509.CertificateBuilder().subject_name(name("csi-spdk-rig-ca"))
          .issuer_name(name("csi-spdk-rig-ca")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(later)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, org: str | None, server: bool):
        k = key()
        b = (x509.CertificateBuilder().subject_name(name(cn, org)).issuer_name(ca.subject)
             .public_key(k.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now).not_valid_after(later)
             .add_extension(_aki(ca), critical=False)
             .add_extension(x509.ExtendedKeyUsage(
                 [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                 critical=False))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.DNSName("kubernetes"),
                x509.DNSName("kubernetes.default"), x509.DNSName("kubernetes.default.svc"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
                *[x509.IPAddress(ipaddress.ip_address(ip)) for ip in extra_ips]]),
                critical=False)
        return k, b.sign(ca_key, hashes.SHA256())

    out = {}
    for label, (k, c) in {"ca": (ca_key, ca),
                          "apiserver": leaf("kube-apiserver", None, True),
                          "admin": leaf("rig-admin", "system:masters", False)}.items():
        write_key(k, d / f"{label}.key")
        (d / f"{label}.crt").write_bytes(c.public_bytes(serialization.Encoding.PEM))
        out[label] = d / f"{label}.crt"
        out[label + "-key"] = d / f"{label}.key"
    sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_key(sa, d / "sa.key")
    write_key(ca_key, d / "ca-signing.key")
    (d / "sa.pub").write_bytes(sa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    out["sa-key"], out["sa-pub"] = d / "sa.key", d / "sa.pub"
    return out


def _aki(ca):
    """The issuer's key identifier: Python 3.13's ssl verifies strictly
    (VERIFY_X509_STRICT) and refuses a certificate without one ("Missing
    Authority Key Identifier": the in-cluster kubernetes client of the
    controller Pod, whose image has Python 3.13), as real clusters' never lack."""
    from cryptography import x509
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key())


def client_cert(d: Path, label: str, cn: str, org: str | None = None, *,
                server_names: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A certificate signed by the rig's CA in ``d`` (made by ``_certs``): a
    client certificate for ``cn``/``org`` (kubelet: system:node:<name> in
    system:nodes), or with ``server_names`` (DNS names or IPs) a server one."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((d / "ca-signing.key").read_bytes(), None)
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    k = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    b = (x509.CertificateBuilder().subject_name(x509.Name(attrs)).issuer_name(ca.subject)
         .public_key(k.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(_aki(ca), critical=False)
         .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if server_names:
        sans = []
        for n in server_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    (d / f"{label}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / f"{label}.key").write_bytes(k.private_bytes(serialization.Encoding.PEM,
                                                     serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    return d / f"{label}.crt", d / f"{label}.key"


def kubeconfig(path: Path, server: str, ca: Path, *, cert: Path | None = None,
               key: Path | None = None, token: str | None = None, user: str = "rig") -> Path:
    u: dict = {}
    if token:
        u["token"] = token
    else:
        u["client-certificate"], u["client-key"] = str(cert), str(key)
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "rig",
        "clusters": [{"name": "rig", "cluster": {"server": server,
                                                  "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": u}],
        "contexts": [{"name": "rig", "context": {"cluster": "rig", "user": user}}],
    }))
    path.chmod(0o600)
    return path


# --- kubectl ----------------------------------------------------------------------------------
class Kubectl:
    """kubectl with a fixed kubeconfig (None: the current context, for kind)."""

    def __init__(self, binary: str, kubeconfig: Path | None = None) -> None:
        self.binary, self.kubeconfig = binary, kubeconfig

    def run(self, *args: str, input: str | None = None, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [self.binary, *(["--kubeconfig", str(self.kubeconfig)] if self.kubeconfig else []),
               *args]
        res = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RigError(f"kubectl {' '.join(args)} failed ({res.returncode}): "
                           f"{res.stderr.strip() or res.stdout.strip()}")
        return res

    def json(self, *args: str, check: bool = True):
        res = self.run(*args, "-o", "json", check=check)
        if res.returncode != 0:
            return None
        return json.loads(res.stdout)

    def get(self, kind: str, name: str | None = None, namespace: str | None = None):
        """The object (None if it does not exist), or the list's items."""
        args = ["get", kind, *([name] if name else []),
                *(["-n", namespace] if namespace else [])]
        if name:
            res = self.run(*args, "-o", "json", check=False)
            if res.returncode != 0:
                if "NotFound" in res.stderr or "not found" in res.stderr:
                    return None
                raise RigError(f"kubectl {' '.join(args)}: {res.stderr.strip()}")
            return json.loads(res.stdout)
        return self.json(*args)["items"]

    def apply(self, objs: Iterable[dict] | dict, server_side: bool = True) -> str:
        if isinstance(objs, dict):
            objs = [objs]
        doc = yaml.safe_dump_all(list(objs))
        args = ["apply", "-f", "-"]
        if server_side:
            args += ["--server-side", "--field-manager=csi-spdk-rig", "--force-conflicts"]
        return self.run(*args, input=doc).stdout

    def create(self, obj: dict) -> dict:
        return json.loads(self.run("create", "-f", "-", "-o", "json",
                                   input=json.dumps(obj)).stdout)

    def delete(self, kind: str, name: str, namespace: str | None = None,
               wait: bool = False) -> None:
        self.run("delete", kind, name, *(["-n", namespace] if namespace else []),
                 "--ignore-not-found", f"--wait={'true' if wait else 'false'}")

    def events(self, namespace: str, name: str, kind: str | None = None) -> list[dict]:
        sel = f"involvedObject.name={name}" + (f",involvedObject.kind={kind}" if kind else "")
        return self.json("get", "events", "-n", namespace, "--field-selector", sel)["items"]


# --- the chart ----------------------------------------------------------------------------------
def render_chart(values: dict, workdir: Path, kube_version: str = K8S_VERSION) -> list[dict]:
    helm = helm_binary()
    if not helm:
        raise RigError("helm not found (scripts/install-deploy-tools.sh)")
    vfile = workdir / "values.yaml"
    vfile.write_text(yaml.safe_dump(values))
    res = subprocess.run([helm, "template", RELEASE, str(CHART), "-n", NAMESPACE,
                          "-f", str(vfile), f"--kube-version={kube_version}"],
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise RigError(f"helm template failed: {res.stderr}")
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def sidecar_specs(objs: list[dict]) -> dict[str, dict]:
    """name -> container spec of the controller Deployment's containers."""
    for o in objs:
        if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-controller"):
            return {c["name"]: c for c in o["spec"]["template"]["spec"]["containers"]}
    raise RigError("the chart rendered no controller Deployment")


def container_args(container: dict, env: dict[str, str]) -> list[str]:
    """The container's args with $(VAR) expanded as kubelet does."""
    out = []
    for a in container.get("args", []):
        for k, v in env.items():
            a = a.replace(f"$({k})", v)
        out.append(a)
    return out


# --- the whole rig ------------------------------------------------------------------------------
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + snapshot-controller.

    ``kubelets``: real kubelets in QEMU guests join (tests/e2e/cluster): the
    apiserver's certificate also names 10.0.2.2 (the host as a user-network
    guest dials it), it allows privileged Pods, authorizes kubelets with the
    Node authorizer and NodeRestriction and reaches them at their InternalIP
    with the admin client certificate; every controller of
    kube-controller-manager runs (node lifecycle, ReplicaSets, DaemonSets...)
    and kube-scheduler runs too."""

    def __init__(self, workdir: Path, kubelets: bool = False) -> None:
        self.dir = workdir
        self.kubelets = kubelets
        self.procs: dict[str, Proc] = {}
        self.timings: dict[str, float] = {}
        self.api_port = free_port()
        self.server = f"https://127.0.0.1:{self.api_port}"

    def logs(self, lines: int = 25) -> str:
        return "\n".join(f"--- {n} ({'running' if p.alive() else f'exit {p.popen.poll()}'}), "
                         f"last {lines} lines of {p.log} ---\n{p.tail(lines)}"
                         for n, p in self.procs.items())

    def start_proc(self, name: str, cmd: list[str], env: dict | None = None) -> Proc:
        p = Proc(name, cmd, self.dir / "logs" / f"{name}.log", env=env, cwd=self.dir)
        self.procs[name] = p
        return p

    def _check_alive(self, *names: str) -> None:
        for n in names:
            p = self.procs[n]
            if not p.alive():
                raise ProcessDied(f"{n} exited with {p.popen.poll()}:\n{p.tail(40)}")

    def start(self) -> None:
        t0 = time.monotonic()
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        pki = self.dir / "pki"
        pki.mkdir()
        c = _certs(pki, ("10.0.2.2",) if self.kubelets else ())
        self.pki = pki
        self.ca = c["ca"]
        self.admin_kubeconfig = kubeconfig(self.dir / "admin.kubeconfig", self.server, c["ca"],
                                           cert=c["admin"], key=c["admin-key"], user="admin")
        self.kubectl = Kubectl(str(BIN / "kubectl"), self.admin_kubeconfig)

        etcd_port, peer_port = free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self.start_proc("etcd", [
            str(BIN / "etcd"), "--name", "rig", "--data-dir", str(self.dir / "etcd"),
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"rig=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync", "--log-level", "warn",
        ])
        wait_until("etcd", lambda: (self._check_alive("etcd"),
                                    socket.create_connection(("127.0.0.1", etcd_port), 1)
                                    .close(), True)[-1], 30, 0.2, self.logs)
        self.timings["etcd"] = round(time.monotonic() - t0, 1)

        self.start_proc("kube-apiserver", [
            str(BIN / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.api_port}", f"--cert-dir={self.dir / 'apiserver-certs'}",
            f"--tls-cert-file={c['apiserver']}", f"--tls-private-key-file={c['apiserver-key']}",
            f"--client-ca-file={c['ca']}",
            # (fills extension-apiserver-authentication, which the
            # controller-manager otherwise complains about in every log line)
            f"--requestheader-client-ca-file={c['ca']}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={c['sa-pub']}",
            f"--service-account-signing-key-file={c['sa-key']}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--authorization-mode=Node,RBAC",
            "--enable-priority-and-fairness=false", "--profiling=false",
            "--endpoint-reconciler-type=none", "--v=1",
            *([] if not self.kubelets else [
                "--allow-privileged=true", "--enable-admission-plugins=NodeRestriction",
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-client-certificate={c['admin']}",
                f"--kubelet-client-key={c['admin-key']}"]),
        ])
        wait_until("kube-apiserver /readyz", lambda: (
            self._check_alive("kube-apiserver"),
            self.kubectl.run("get", "--raw", "/readyz", check=False, timeout=10).returncode == 0
        )[-1], 120, 0.5, self.logs)
        self.timings["kube-apiserver"] = round(time.monotonic() - t0, 1)

        self.start_proc("kube-controller-manager", [
            str(BIN / "kube-controller-manager"),
            f"--kubeconfig={self.admin_kubeconfig}",
            f"--authentication-kubeconfig={self.admin_kubeconfig}",
            f"--authorization-kubeconfig={self.admin_kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            f"--cert-dir={self.dir / 'kcm-certs'}",
            f"--controllers={'*' if self.kubelets else ','.join(KCM_CONTROLLERS)}",
            *([] if not self.kubelets else [
                # a lost node is noticed in 20 s (the node-loss scenario)
                "--node-monitor-grace-period=20s", "--node-monitor-period=2s",
                "--allocate-node-cidrs=false"]),
            "--leader-elect=false", "--use-service-account-credentials=false",
            "--pvclaimbinder-sync-period=2s",
            "--attach-detach-reconcile-sync-period=5s",
            f"--root-ca-file={c['ca']}", f"--service-account-private-key-file={c['sa-key']}",
            "--v=2",
        ])
        # The snapshot CRDs (and the group snapshot ones the snapshotter watches).
        crds = snapshot_crd_dir()
        if crds is None:
            raise RigError(f"no CRDs: go mod download {SNAPSHOTTER_CLIENT} failed")
        docs = []
        for f in sorted(crds.glob("*.yaml")):
            docs += [d for d in yaml.safe_load_all(f.read_text())
                     if d and d.get("kind") == "CustomResourceDefinition"]
        self.kubectl.apply(docs)
        for d in docs:
            self.kubectl.run("wait", "--for=condition=Established", "--timeout=60s",
                             f"crd/{d['metadata']['name']}")
        self.start_proc("snapshot-controller", [
            str(BIN / "snapshot-controller"), f"--kubeconfig={self.admin_kubeconfig}",
            "--leader-election=false", "--v=2", "--resync-period=30s",
        ])
        if self.kubelets:
            self.start_proc("kube-scheduler", [
                str(BIN / "kube-scheduler"), f"--kubeconfig={self.admin_kubeconfig}",
                f"--authentication-kubeconfig={self.admin_kubeconfig}",
                f"--authorization-kubeconfig={self.admin_kubeconfig}",
                "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
                "--leader-elect=false", "--v=1",
            ])
        names = ("kube-controller-manager", "snapshot-controller",
                 *(("kube-scheduler",) if self.kubelets else ()))
        wait_until("kube-controller-manager and snapshot-controller", lambda: (
            self._check_alive(*names),
            self.kubectl.get("serviceaccount", "default", "default") is not None)[-1],
            60, 0.5, self.logs)
        self.timings["control-plane"] = round(time.monotonic() - t0, 1)

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            self.procs[name].stop()


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def python_csi_spdk() -> list[str]:
    return [sys.executable, "-m", "csi_spdk"]


def python_env() -> dict[str, str]:
    """Environment for the driver's processes: this checkout's csi_spdk."""
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": str(REPO) + (os.pathsep + path if path else ""),
            "PYTHONUNBUFFERED": "1"}


def make_tempdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="csi-spdk-k8s-"))
