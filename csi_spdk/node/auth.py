"""Node side of data-path authentication: node-stage secrets -> ``nvme connect``.

``ConnectAuth.from_request`` checks what the target enforces (publish_context
``auth``) against the node-stage secrets, and this kernel's support for it:

* dhchap: ``--dhchap-secret`` and ``--dhchap-ctrl-secret`` (bidirectional).
  Needs the kernel's in-band authentication (CONFIG_NVME_HOST_AUTH; Linux
  6.1 as Debian 12 builds it has none).
* tls: ``--tls`` with the TLS PSK (derived from the interchange key as SPDK
  derives it: ``csi_spdk/tls_psk.py``) added first to the kernel's ``.nvme``
  keyring for (host NQN, subsystem NQN), where the handshake daemon
  ``tlshd`` (ktls-utils) finds it. Needs CONFIG_NVME_TCP_TLS and tlshd.

A missing feature is FAILED_PRECONDITION naming it and the way out. Secrets
never reach a log line or an error: ``redact`` removes them (and anything in
their format) from nvme-cli's output, which may echo its arguments.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field

from .. import contract, nvme_keys, tls_psk
from ..errors import FailedPrecondition, Internal, InvalidArgument

_KEY_TEXT = re.compile(r"(DHHC-1|NVMeTLSkey-1):[0-9A-Fa-f]{2}:[A-Za-z0-9+/=]+:?")


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """``text`` without any of ``secrets`` nor anything shaped like a key."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    return _KEY_TEXT.sub("<redacted>", text)


@dataclass(frozen=True)
class KernelFeatures:
    """What this node's kernel and userland offer (probed once, cached)."""

    inband_auth: bool
    tls: bool
    tlshd: bool

    @classmethod
    def probe(cls, proc_root: str = "/proc", dev_root: str = "/dev") -> KernelFeatures:
        # In-band auth lives in nvme-core (built in or loaded): its symbols are
        # in kallsyms. TLS adds the "tls" option to the fabrics option table.
        syms = ""
        try:
            with open(os.path.join(proc_root, "kallsyms"), encoding="ascii",
                      errors="replace") as f:
                for line in f:
                    if " nvme_auth_negotiate" in line or " nvme_tcp_tls" in line:
                        syms += line
        except OSError:
            pass
        try:
            with open(os.path.join(dev_root, "nvme-fabrics"), encoding="ascii") as f:
                options = f.read()
        except OSError:
            options = ""
        return cls(inband_auth="nvme_auth_negotiate" in syms,
                   tls=bool(re.search(r"(^|,)tls(,|$)", options.strip())) or "nvme_tcp_tls" in syms,
                   tlshd=_process_running(proc_root, "tlshd"))


def _process_running(proc_root: str, name: str) -> bool:
    try:
        pids = [p for p in os.listdir(proc_root) if p.isdigit()]
    except OSError:
        return False
    for pid in pids:
        try:
            with open(os.path.join(proc_root, pid, "comm"), encoding="ascii") as f:
                if f.read().strip() == name:
                    return True
        except OSError:
            continue
    return False


@dataclass(frozen=True)
class ConnectAuth:
    mode: str                                        # dhchap / tls / none
    dhchap_key: str = field(default="", repr=False)
    dhchap_ctrl_key: str = field(default="", repr=False)
    tls_psk: str = field(default="", repr=False)

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.dhchap_key, self.dhchap_ctrl_key, self.tls_psk) if s)

    @classmethod
    def from_request(cls, publish_context: Mapping[str, str],
                     secrets: Mapping[str, str]) -> ConnectAuth:
        """Validate; raises INVALID_ARGUMENT naming the secret (never its value)."""
        mode = publish_context.get(contract.PC_AUTH) or contract.AUTH_NONE
        if mode not in contract.AUTH_MODES:
            raise InvalidArgument(f"publish_context auth {mode!r} is not one of "
                                  f"{', '.join(contract.AUTH_MODES)}")
        if mode == contract.AUTH_DHCHAP:
            host = _secret(secrets, contract.SECRET_DHCHAP_KEY, nvme_keys.parse_dhchap_key)
            ctrl = secrets.get(contract.SECRET_DHCHAP_CTRL_KEY, "")
            if ctrl:
                _secret(secrets, contract.SECRET_DHCHAP_CTRL_KEY, nvme_keys.parse_dhchap_key)
            return cls(mode, dhchap_key=host, dhchap_ctrl_key=ctrl)
        if mode == contract.AUTH_TLS:
            psk = _secret(secrets, contract.SECRET_TLS_PSK, nvme_keys.parse_tls_psk)
            return cls(mode, tls_psk=psk)
        return cls(mode)

    def require(self, features: KernelFeatures) -> None:
        """FAILED_PRECONDITION when this node cannot do what the volume needs."""
        if self.mode == contract.AUTH_DHCHAP and not features.inband_auth:
            raise FailedPrecondition(
                "this node's kernel has no NVMe in-band authentication "
                "(CONFIG_NVME_HOST_AUTH), which the volume's StorageClass requires "
                "(auth: dhchap): run a kernel with CONFIG_NVME_HOST_AUTH=y (Linux 6.x, "
                "e.g. Debian 13's), or use a StorageClass with auth: none")
        if self.mode == contract.AUTH_TLS and not features.tls:
            raise FailedPrecondition(
                "this node's kernel has no NVMe/TCP TLS (CONFIG_NVME_TCP_TLS), which the "
                "volume's StorageClass requires (auth: tls): run a kernel with "
                "CONFIG_NVME_TCP_TLS=y (Linux >= 6.7), or use auth: dhchap")
        if self.mode == contract.AUTH_TLS and not features.tlshd:
            raise FailedPrecondition(
                "auth: tls needs the TLS handshake daemon tlshd (ktls-utils) running on "
                "this node; install and start it (systemctl enable --now tlshd)")

    def connect_args(self) -> list[str]:
        if self.mode == contract.AUTH_DHCHAP:
            args = [f"--dhchap-secret={self.dhchap_key}"]
            if self.dhchap_ctrl_key:
                args.append(f"--dhchap-ctrl-secret={self.dhchap_ctrl_key}")
            return args
        if self.mode == contract.AUTH_TLS:
            return ["--tls"]
        return []

    def prepare(self, nvme: str, host_nqn: str, subsys_nqn: str) -> None:
        """tls: the derived TLS PSK into the ``.nvme`` keyring before connecting
        (derived here, not by ``nvme check-tls-key``: see csi_spdk/tls_psk.py)."""
        if self.mode != contract.AUTH_TLS:
            return
        try:
            tls_psk.insert(self.tls_psk, host_nqn, subsys_nqn)
        except (tls_psk.KeyringError, OSError, subprocess.SubprocessError) as e:
            raise Internal("inserting the volume's TLS PSK into the .nvme keyring failed: "
                           f"{redact(str(e), self.secrets)}") from None


def _secret(secrets: Mapping[str, str], name: str, parse) -> str:
    value = secrets.get(name, "")
    if not value:
        raise InvalidArgument(
            f"node-stage secret {name!r} is missing: the volume's target requires "
            "authentication; its StorageClass must name the Secret in "
            "csi.storage.k8s.io/node-stage-secret-name/-namespace")
    try:
        parse(value)
    except nvme_keys.KeyFormatError as e:
        raise InvalidArgument(f"node-stage secret {name!r} is not a valid key: {e}") from None
    return value.strip()
