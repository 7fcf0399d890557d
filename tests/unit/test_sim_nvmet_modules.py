"""The simulator's kernel data plane loads nvmet/nvmet-tcp only when the
kernel lacks them, and starts without modprobe (the driver's image has no
kmod; the cluster's nodes load the modules at boot)."""

from __future__ import annotations

import subprocess

from csi_spdk.sim import nvmet


def _calls(monkeypatch, tmp_path, loaded: set[str], modprobe: str | None) -> list[list[str]]:
    sysmod = tmp_path / "module"
    for name in loaded:
        (sysmod / name).mkdir(parents=True)
    sysmod.mkdir(exist_ok=True)
    monkeypatch.setattr(nvmet, "SYS_MODULE", sysmod)
    monkeypatch.setattr(nvmet.shutil, "which", lambda cmd: modprobe)
    calls: list[list[str]] = []
    monkeypatch.setattr(nvmet.subprocess, "run",
                        lambda argv, **kw: calls.append(argv) or
                        subprocess.CompletedProcess(argv, 0))
    nvmet.NvmetDataPlane(root=tmp_path / "cfs", load_modules=True)._load_modules()
    return calls


def test_loaded_modules_are_not_probed(monkeypatch, tmp_path):
    assert _calls(monkeypatch, tmp_path, {"nvmet", "nvmet_tcp"}, "/sbin/modprobe") == []


def test_only_the_missing_module_is_probed(monkeypatch, tmp_path):
    assert _calls(monkeypatch, tmp_path, {"nvmet"}, "/sbin/modprobe") == [
        ["/sbin/modprobe", "nvmet-tcp"]]


def test_no_modprobe_is_no_crash(monkeypatch, tmp_path, caplog):
    assert _calls(monkeypatch, tmp_path, set(), None) == []
    assert "nvmet-tcp is not loaded and there is no modprobe" in caplog.text
