"""PVCs and Pods the scenarios create, and what they read back from inside
the Pods (``kubectl exec``). Every wait is a ``kubectl wait`` or a watch-like
poll every few seconds with a deadline: a tight loop of ``kubectl get``
starves the TCG guests."""

from __future__ import annotations

import json
import shlex
import time

try:
    from k8s import cluster as k8s
except ImportError:
    from ..k8s import cluster as k8s

NAMESPACE = "pods"
MiB = 1 << 20


class Workloads:
    def __init__(self, kubectl: k8s.Kubectl, image: str, report) -> None:
        self.k, self.image, self.report = kubectl, image, report

    # -- objects --------------------------------------------------------------------------
    def pvc(self, name: str, size: str, sc: str, *, block: bool = False,
            mode: str = "ReadWriteOnce", source: dict | None = None) -> dict:
        spec = {"accessModes": [mode], "storageClassName": sc,
                "resources": {"requests": {"storage": size}},
                "volumeMode": "Block" if block else "Filesystem"}
        if source:
            spec["dataSource"] = source
        return self.k.create({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                              "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec})

    def pod(self, name: str, claim: str, *, block: bool = False, node: str | None = None,
            affinity: dict | None = None) -> dict:
        c = {"name": "app", "image": self.image, "imagePullPolicy": "Never",
             "command": ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"],
             "resources": {"limits": {"memory": "64Mi"}}}
        if block:
            c["volumeDevices"] = [{"name": "v", "devicePath": "/dev/xvda"}]
        else:
            c["volumeMounts"] = [{"name": "v", "mountPath": "/data"}]
        spec = {"containers": [c], "terminationGracePeriodSeconds": 5,
                "automountServiceAccountToken": False,
                "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": claim}}]}
        if node:
            spec["nodeSelector"] = {"kubernetes.io/hostname": node}
        if affinity:
            spec["affinity"] = affinity
        return self.k.create({"apiVersion": "v1", "kind": "Pod",
                              "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec})

    # -- waits ----------------------------------------------------------------------------
    def wait(self, what: str, condition: str, timeout: float = 300) -> None:
        res = self.k.run("wait", f"--for={condition}", what, "-n", NAMESPACE,
                         f"--timeout={int(timeout)}s", check=False, timeout=timeout + 30)
        if res.returncode != 0:
            raise AssertionError(f"{what} never got {condition}: {res.stderr.strip()}\n"
                                 + self.report())

    def running(self, pod: str, timeout: float = 300) -> dict:
        self.wait(f"pod/{pod}", "condition=Ready", timeout)
        return self.k.get("pod", pod, NAMESPACE)

    def bound(self, pvc: str, timeout: float = 180) -> dict:
        self.wait(f"pvc/{pvc}", "jsonpath={.status.phase}=Bound", timeout)
        return self.k.get("pvc", pvc, NAMESPACE)

    def delete_pod(self, pod: str, timeout: float = 180) -> None:
        self.k.run("delete", "pod", pod, "-n", NAMESPACE, "--ignore-not-found",
                   f"--timeout={int(timeout)}s", timeout=timeout + 30)

    def attachments(self, pv: str) -> list[dict]:
        return [va for va in self.k.get("volumeattachments")
                if va["spec"]["source"].get("persistentVolumeName") == pv]

    def wait_detached(self, pv: str, timeout: float = 180) -> None:
        """Until no VolumeAttachment of ``pv`` is left (unstage + unpublish done)."""
        k8s.wait_until(f"{pv} detached", lambda: not self.attachments(pv), timeout, 3,
                       self.report)

    def delete_pvc(self, pvc: str, timeout: float = 180) -> None:
        obj = self.k.get("pvc", pvc, NAMESPACE)
        self.k.run("delete", "pvc", pvc, "-n", NAMESPACE, "--ignore-not-found",
                   f"--timeout={int(timeout)}s", timeout=timeout + 30)
        pv = (obj or {}).get("spec", {}).get("volumeName")
        if pv:
            k8s.wait_until(f"PV {pv} deleted", lambda: self.k.get("pv", pv) is None, timeout, 3,
                           self.report)

    # -- inside the Pod -------------------------------------------------------------------
    def sh(self, pod: str, script: str, timeout: float = 120) -> str:
        res = self.k.run("exec", "-n", NAMESPACE, pod, "-c", "app", "--", "sh", "-c", script,
                         check=False, timeout=timeout)
        if res.returncode != 0:
            raise AssertionError(f"in {pod}: {script!r} failed ({res.returncode}): "
                                 f"{res.stderr.strip()} {res.stdout.strip()}")
        return res.stdout

    def df_bytes(self, pod: str, path: str = "/data") -> int:
        """Size of the filesystem at ``path`` as `df` inside the Pod shows it."""
        out = self.sh(pod, f"df -B1 --output=size {shlex.quote(path)} | tail -n 1")
        return int(out.strip())

    def until(self, what: str, check, timeout: float, interval: float = 5):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout:.0f}s: {what} (last: {last!r})\n"
                             + self.report())

    def events(self, kind: str, name: str) -> list[str]:
        items = self.k.events(NAMESPACE, name, kind)
        return [f"{e.get('reason')}: {e.get('message')}" for e in items]

    def dump(self, obj: dict) -> str:
        return json.dumps(obj, indent=1)[:3000]
