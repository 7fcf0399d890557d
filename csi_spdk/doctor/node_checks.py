"""Preflight checks for a Kubernetes node that runs ``csi-spdk node``: what
NodeStageVolume needs (the NVMe/TCP initiator, nvme-cli, mkfs/blkid/mount),
optional in-band auth and TLS, a stable host identity, and the kubelet
directory with mount propagation."""

from __future__ import annotations

import re
from collections.abc import Iterator

from .. import contract
from .host import Host
from .report import Check, fail, ok, warn

# nvme-cli 2.0 is the first with libnvme and the JSON `list-subsys` the node
# plugin reads; `connect --tls` arrived in 2.4 (Debian 12's "2.4+really2.3" is 2.3).
NVME_CLI_MIN = (2, 0)
NVME_CLI_TLS = (2, 4)
NODE_TOOLS = {"mkfs.ext4": "e2fsprogs", "resize2fs": "e2fsprogs", "mkfs.xfs": "xfsprogs",
              "xfs_growfs": "xfsprogs", "blkid": "util-linux", "losetup": "mount",
              "mount": "mount", "umount": "mount"}
ZERO_UUID = "00000000-0000-0000-0000-000000000000"


def module_check(host: Host, name: str, why: str) -> Check:
    title = f"kernel module {name}"
    if host.module_loaded(name):
        return ok(title, f"loaded ({why})")
    kind = host.module_available(name)
    if kind == "module":
        return fail(title, f"not loaded ({why})",
                    f"modprobe {name}; to load it at boot: echo {name} > "
                    f"/etc/modules-load.d/{name}.conf")
    if kind == "builtin":
        return ok(title, f"built into the kernel ({why})")
    return fail(title, f"kernel {host.release} has no {name} ({why})",
                "boot a kernel built with it (Debian's linux-image-amd64 and "
                "linux-image-cloud-amd64 have it as a module)")


def _config_flag(host: Host, *names: str) -> str | None:
    """'y'/'m' of the first option set, '' when none is, None when unknown."""
    config = host.kernel_config()
    if not config:
        return None
    for name in names:
        if config.get(name) in ("y", "m"):
            return config[name]
    return ""


def nvme_cli_version(host: Host) -> tuple[tuple[int, ...] | None, str]:
    nvme = host.which("nvme")
    if nvme is None:
        return None, ""
    try:
        res = host.run([nvme, "version"])
    except (OSError, TimeoutError) as err:
        return None, str(err)
    m = re.search(r"nvme version (\d+)\.(\d+)(?:\.(\d+))?", res.stdout)
    if not m:
        lines = (res.stdout or res.stderr).strip().splitlines()
        return None, lines[0] if lines else ""
    return tuple(int(g) for g in m.groups() if g is not None), m.group(0)


def nvme_cli_check(host: Host) -> Check:
    title = "nvme-cli"
    version, text = nvme_cli_version(host)
    if host.which("nvme") is None:
        return fail(title, "nvme is not on PATH", "apt-get install nvme-cli (the node image "
                                                   "ships it)")
    if version is None:
        return fail(title, f"cannot read its version ({text or 'no output'})",
                    "reinstall nvme-cli")
    shown = ".".join(map(str, version))
    if version < NVME_CLI_MIN:
        return fail(title, f"{shown} is older than 2.0", "install nvme-cli 2.x")
    return ok(title, f"{shown}{'' if version >= NVME_CLI_TLS else ' (no --tls before 2.4)'}")


def auth_check(host: Host) -> Check:
    title = "in-band authentication (DH-HMAC-CHAP)"
    # Linux 6.7 split CONFIG_NVME_AUTH (the host option until then) into
    # NVME_HOST_AUTH and a library both sides select.
    config = host.kernel_config()
    option = "CONFIG_NVME_HOST_AUTH" if "CONFIG_NVME_HOST_AUTH" in config or \
        "CONFIG_NVME_AUTH" not in config else "CONFIG_NVME_AUTH"
    flag = _config_flag(host, option)
    if flag:
        return ok(title, f"{option}={flag} in {host.config_source}")
    if flag is None:
        if host.module_loaded("nvme_auth"):
            return ok(title, "nvme_auth is loaded")
        return warn(title, f"cannot tell: no /boot/config-{host.release} or /proc/config.gz",
                    "check the kernel for CONFIG_NVME_HOST_AUTH (needed only for "
                    "volumes with DH-HMAC-CHAP)")
    return warn(title, f"kernel {host.release} is built without {option}",
                "volumes that require DH-HMAC-CHAP cannot be staged here; boot a kernel with "
                "it (Debian 13's 6.12, or bookworm-backports)")


def tls_check(host: Host) -> Check:
    title = "NVMe/TCP TLS"
    flag = _config_flag(host, "CONFIG_NVME_TCP_TLS")
    missing = []
    if flag == "":
        missing.append(f"kernel {host.release} is built without CONFIG_NVME_TCP_TLS")
    version, _ = nvme_cli_version(host)
    if version is not None and version < NVME_CLI_TLS:
        missing.append(f"nvme-cli {'.'.join(map(str, version))} has no --tls")
    if host.which("tlshd") is None:
        missing.append("tlshd (ktls-utils) is not on PATH")
    if not missing:
        how = f"CONFIG_NVME_TCP_TLS={flag}" if flag else "kernel config unknown"
        return ok(title, f"{how}, nvme-cli and tlshd present")
    return warn(title, "; ".join(missing),
                "volumes that require TLS cannot be staged here; they need a kernel with "
                "NVME_TCP_TLS, nvme-cli >= 2.4 and tlshd running (Debian 13 has all three)")


def host_identity_check(host: Host, node_id: str, state_dir: str) -> Check:
    """The node plugin derives its host NQN/ID from the node id (contract.py)
    and records them in the state dir; a record for another id means the
    node was renamed: targets still allow the old NQN."""
    title = "host NQN and host ID"
    want_nqn, want_id = contract.host_nqn(node_id), contract.host_id(node_id)
    for name, want in (("hostnqn", want_nqn), ("hostid", want_id)):
        have = (host.read(f"{state_dir}/{name}") or "").strip()
        if have and have != want:
            return fail(title, f"{state_dir}/{name} is {have}, but node id {node_id!r} gives "
                               f"{want} (was the node renamed?)",
                        "unstage this node's volumes under the old name first; the plugin "
                        "rewrites the file at start")
    etc = (host.read("/etc/nvme/hostnqn") or "").strip()
    if etc.endswith(ZERO_UUID):
        return warn(title, f"/etc/nvme/hostnqn is the all-zero UUID ({etc}); the driver does "
                           f"not use it (it connects as {want_nqn})",
                    "other NVMe/TCP users on this node share that NQN: write a real one "
                    "(nvme gen-hostnqn > /etc/nvme/hostnqn on hardware)")
    recorded = "recorded" if host.exists(f"{state_dir}/hostnqn") else "written at start"
    return ok(title, f"{want_nqn} (from node id {node_id!r}; {recorded} in {state_dir})")


def kubelet_check(host: Host, kubelet_dir: str) -> Iterator[Check]:
    title = "kubelet directory"
    if not host.exists(kubelet_dir):
        yield fail(title, f"{kubelet_dir} does not exist",
                   "is kubelet's --root-dir elsewhere? Give it with --kubelet-dir (and the "
                   "chart's node.kubeletDir)")
        return
    yield ok(title, f"{kubelet_dir} exists")
    title = "mount propagation"
    mount = host.mount_of(kubelet_dir)
    if mount is None:
        yield warn(title, "no /proc/self/mountinfo", "")
    elif mount.shared:
        yield ok(title, f"{kubelet_dir} is on {mount.mount_point}, a shared mount")
    else:
        yield fail(title, f"{kubelet_dir} is on {mount.mount_point}, which is not shared: "
                          "mounts the plugin makes would not reach kubelet and the Pods",
                   f"mount --make-rshared {mount.mount_point} (systemd makes / shared at "
                   "boot; the node Pod mounts the kubelet dir with mountPropagation: "
                   "Bidirectional)")


def tools_check(host: Host) -> Check:
    title = "filesystem tools"
    missing = sorted(t for t in NODE_TOOLS if host.which(t) is None)
    if missing:
        pkgs = " ".join(sorted({NODE_TOOLS[t] for t in missing}))
        return fail(title, f"missing {', '.join(missing)}", f"apt-get install {pkgs}")
    return ok(title, ", ".join(sorted(NODE_TOOLS)))


def node_checks(host: Host, node_id: str, state_dir: str, kubelet_dir: str) -> list[Check]:
    return [
        module_check(host, "nvme-fabrics", "the NVMe-oF host core"),
        module_check(host, "nvme-tcp", "the NVMe/TCP initiator nvme connect uses"),
        nvme_cli_check(host),
        tools_check(host),
        auth_check(host),
        tls_check(host),
        host_identity_check(host, node_id, state_dir),
        *kubelet_check(host, kubelet_dir),
    ]
