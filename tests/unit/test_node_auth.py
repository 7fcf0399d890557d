"""Node side of data-path authentication (node/auth.py + initiator): the
node-stage secrets become nvme connect's DH-HMAC-CHAP options, bad or missing
secrets and missing kernel features are refused before anything runs, and a
secret never reaches an error message."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import fakesys  # noqa: E402

from csi_spdk import contract, nvme_keys  # noqa: E402
from csi_spdk.errors import FailedPrecondition, InvalidArgument, Unavailable  # noqa: E402
from csi_spdk.node.auth import ConnectAuth, KernelFeatures, redact  # noqa: E402
from csi_spdk.node.initiator import NvmeTcpInitiator  # noqa: E402

NS = "5b0c7b0e-3c1e-4e7a-9c55-0a8f3c4b7d21"
NQN = contract.subsystem_nqn(NS)
HOSTNQN, HOSTID = contract.host_nqn("worker-1"), contract.host_id("worker-1")
ALL = KernelFeatures(inband_auth=True, tls=True, tlshd=True)


def pc(auth="dhchap"):
    out = {contract.PC_NQN: NQN, contract.PC_TRTYPE: "tcp", contract.PC_TRADDR: "10.0.2.2",
           contract.PC_TRSVCID: "4420", contract.PC_NS_UUID: NS}
    if auth:
        out[contract.PC_AUTH] = auth
    return out


def keys():
    return {contract.SECRET_DHCHAP_KEY: nvme_keys.generate_dhchap_key().text,
            contract.SECRET_DHCHAP_CTRL_KEY: nvme_keys.generate_dhchap_key().text}


@pytest.fixture
def env(tmp_path, monkeypatch):
    sysfs, dev, bindir = tmp_path / "sys", tmp_path / "dev", tmp_path / "bin"
    sysfs.mkdir()
    dev.mkdir()
    (dev / "nvme-fabrics").touch()
    fakesys.install_fake_nvme(str(bindir))
    log = tmp_path / "nvme.log"
    monkeypatch.setenv("FAKE_NVME_LOG", str(log))
    monkeypatch.setenv("FAKE_NVME_SYSFS", str(sysfs))
    monkeypatch.setenv("FAKE_NVME_DEV", str(dev))
    monkeypatch.setenv("FAKE_NVME_EXPORTS", f'{{"{NQN}": ["{NS}"]}}')
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")

    def make(features=ALL):
        return NvmeTcpInitiator(HOSTNQN, HOSTID, sysfs_root=str(sysfs), dev_root=str(dev),
                                features=features)
    return make, str(log), monkeypatch


def test_dhchap_secrets_become_connect_options(env):
    make, log, _ = env
    s = keys()
    make().connect(pc(), timeout=2, secrets=s)
    (argv,) = fakesys.read_log(log)
    assert argv[0] == "connect"
    assert f"--dhchap-secret={s[contract.SECRET_DHCHAP_KEY]}" in argv
    assert f"--dhchap-ctrl-secret={s[contract.SECRET_DHCHAP_CTRL_KEY]}" in argv


def test_auth_none_ignores_secrets(env):
    make, log, _ = env
    make().connect(pc(auth=""), timeout=2, secrets=keys())
    (argv,) = fakesys.read_log(log)
    assert not any(a.startswith("--dhchap") or a == "--tls" for a in argv)


def test_missing_or_bad_secret_is_invalid_argument_and_runs_nothing(env):
    make, log, _ = env
    with pytest.raises(InvalidArgument, match=contract.SECRET_DHCHAP_KEY):
        make().connect(pc(), timeout=2, secrets={})
    good = nvme_keys.generate_dhchap_key().text
    body = good.split(":")[2]
    broken = good.replace(body, body[::-1])
    with pytest.raises(InvalidArgument) as err:
        make().connect(pc(), timeout=2, secrets={contract.SECRET_DHCHAP_KEY: broken})
    assert body[::-1] not in str(err.value) and body not in str(err.value)
    with pytest.raises(InvalidArgument, match=contract.SECRET_DHCHAP_CTRL_KEY):
        make().connect(pc(), timeout=2, secrets={contract.SECRET_DHCHAP_KEY: good,
                                                 contract.SECRET_DHCHAP_CTRL_KEY: "nope"})
    assert fakesys.read_log(log) == []


def test_kernel_without_inband_auth_is_failed_precondition(env):
    make, log, _ = env
    with pytest.raises(FailedPrecondition) as err:
        make(KernelFeatures(inband_auth=False, tls=False, tlshd=False)).connect(
            pc(), timeout=2, secrets=keys())
    msg = str(err.value)
    assert "CONFIG_NVME_HOST_AUTH" in msg and "auth: none" in msg
    assert fakesys.read_log(log) == []


def test_tls_needs_kernel_tls_and_tlshd():
    psk = {contract.SECRET_TLS_PSK: nvme_keys.generate_tls_psk().text}
    auth = ConnectAuth.from_request(pc("tls"), psk)
    with pytest.raises(FailedPrecondition, match="CONFIG_NVME_TCP_TLS"):
        auth.require(KernelFeatures(inband_auth=True, tls=False, tlshd=True))
    with pytest.raises(FailedPrecondition, match="tlshd"):
        auth.require(KernelFeatures(inband_auth=True, tls=True, tlshd=False))
    auth.require(ALL)
    assert auth.connect_args() == ["--tls"]


def test_connect_failure_message_never_holds_a_secret(env):
    make, _, mp = env
    mp.setenv("FAKE_NVME_FAIL", "connect")
    mp.setenv("FAKE_NVME_ECHO", "1")
    s = keys()
    with pytest.raises(Unavailable) as err:
        make().connect(pc(), timeout=2, secrets=s)
    msg = str(err.value)
    assert "<redacted>" in msg and "authentication" in msg
    for v in s.values():
        assert v.split(":")[2] not in msg


def test_redact_catches_key_shaped_text():
    k = nvme_keys.generate_dhchap_key().text
    p = nvme_keys.generate_tls_psk().text
    out = redact(f"a={k} b={p} c={k[:-1]}")
    assert k.split(":")[2] not in out and p.split(":")[2] not in out


def test_feature_probe_reads_kallsyms_fabrics_options_and_processes(tmp_path):
    proc, dev = tmp_path / "proc", tmp_path / "dev"
    (proc / "42").mkdir(parents=True)
    dev.mkdir()
    (proc / "kallsyms").write_text("ffffffff81000000 T _text\n")
    (dev / "nvme-fabrics").write_text("instance=-1,cntlid=-1,transport=%s,dhchap_secret=%s\n")
    (proc / "42" / "comm").write_text("bash\n")
    assert KernelFeatures.probe(str(proc), str(dev)) == KernelFeatures(False, False, False)
    (proc / "kallsyms").write_text("ffffffff81000000 T _text\n"
                                   "ffffffff81234560 T nvme_auth_negotiate\n")
    (dev / "nvme-fabrics").write_text("instance=-1,dhchap_secret=%s,tls,keyring=%d\n")
    (proc / "42" / "comm").write_text("tlshd\n")
    assert KernelFeatures.probe(str(proc), str(dev)) == KernelFeatures(True, True, True)
