"""``csi-spdk doctor node`` on a real kernel (the QEMU guest): after the
preparation the operator guide gives (nvme-tcp loaded, the kubelet dir on a
shared mount) nothing fails; the optional features are reported as the
kernel's own config file says; and it catches a private kubelet mount."""

from __future__ import annotations

import json
import re

import pytest
from guest import harness

pytestmark = pytest.mark.guest


def _kernel_config() -> tuple[str, dict[str, str], object]:
    kernel = harness.find_kernel()
    if kernel is None:
        pytest.skip("no guest kernel (scripts/install-guest-deps.sh)")
    path = kernel.root / "boot" / f"config-{kernel.version}"
    text = path.read_text()
    config = dict(re.findall(r"^(CONFIG_\w+)=(.*)$", text, re.M))
    return kernel.version, config, path


def _doctor(output: str, marker: str) -> dict:
    body = output.split(f"--{marker}--", 2)[1]
    return json.loads(body)


def test_doctor_node_passes_on_a_prepared_guest(guest):
    release, config, config_path = _kernel_config()
    res = guest.run("""
        mkdir -p /var/lib/kubelet /var/lib/private-kubelet
        mount -t tmpfs kubelet /var/lib/kubelet
        mount --make-shared /var/lib/kubelet
        mount -t tmpfs private /var/lib/private-kubelet
        mount --make-private /var/lib/private-kubelet
        if command -v tlshd >/dev/null; then echo "--tlshd-- present"; fi
        echo --good--
        rc=0; csi-spdk doctor node --node-id guest-node --state-dir /tmp/csi --format json \\
            || rc=$?
        echo "--good-- rc=$rc"
        echo --bad--
        rc=0; csi-spdk doctor node --node-id guest-node --state-dir /tmp/csi \\
            --kubelet-dir /var/lib/private-kubelet --format json || rc=$?
        echo "--bad-- rc=$rc"
        csi-spdk doctor node --node-id guest-node --state-dir /tmp/csi || true
        exit 0
        """, timeout=180, files={f"/boot/config-{release}": config_path}, check=True)
    assert "--good-- rc=0" in res.output, res.output
    good = _doctor(res.output, "good")
    checks = {c["name"]: c for c in good["checks"]}
    assert good["ok"] is True and good["host"].endswith(f"(kernel {release})")
    assert [c["name"] for c in good["checks"] if c["status"] == "fail"] == []
    for name in ("kernel module nvme-fabrics", "kernel module nvme-tcp", "nvme-cli",
                 "filesystem tools", "host NQN and host ID", "kubelet directory",
                 "mount propagation"):
        assert checks[name]["status"] == "pass", checks[name]
    assert checks["kernel module nvme-tcp"]["detail"].startswith("loaded")
    # the optional features, exactly as the kernel's config says
    text = config_path.read_text()
    option = "CONFIG_NVME_HOST_AUTH" if "CONFIG_NVME_HOST_AUTH" in text else "CONFIG_NVME_AUTH"
    host_auth = config.get(option)
    auth = checks["in-band authentication (DH-HMAC-CHAP)"]
    assert auth["status"] == ("pass" if host_auth in ("y", "m") else "warn"), auth
    if auth["status"] == "warn":
        assert auth["detail"] == f"kernel {release} is built without {option}"
    tls = checks["NVMe/TCP TLS"]
    kernel_tls = config.get("CONFIG_NVME_TCP_TLS") in ("y", "m")
    tlshd = "--tlshd-- present" in res.output   # the Debian 13 guest has ktls-utils
    assert tls["status"] == ("pass" if kernel_tls and tlshd else "warn"), tls
    assert ("built without CONFIG_NVME_TCP_TLS" in tls["detail"]) == (not kernel_tls)
    assert "--bad-- rc=1" in res.output, res.output
    bad = _doctor(res.output, "bad")
    failed = [c for c in bad["checks"] if c["status"] == "fail"]
    assert [c["name"] for c in failed] == ["mount propagation"], failed
    assert failed[0]["fix"].startswith("mount --make-rshared /var/lib/private-kubelet")
    assert "csi-spdk doctor node on" in res.output and "this node is ready" in res.output
