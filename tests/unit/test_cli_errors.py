"""The command line's failures: one line on stderr saying what is wrong and
what to do, exit code 1, never a Python traceback; a closed stdout pipe ends
quietly. Each case runs the real ``python -m csi_spdk`` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import fakesys  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def csi_spdk(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "csi_spdk", *args], capture_output=True,
                          text=True, timeout=60, env=env, **kw)


def one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("body,needles", [
    ("targets: [{name: A, rpc: /x.sock, nvmf: {listenAddress: 127.0.0.1, port: 4420}}]\n",
     ("targets[0].name", "'A'", "DNS label", "correct it")),
    ("targets: [\n", ("not valid YAML/JSON",)),
    ("targets: []\n", ("non-empty list",)),
    ("targets: [{name: a, rpc: /x.sock, nvmf: {listenAddress: 127.0.0.1, port: 4420},"
     " colour: red}]\n", ("unknown key 'colour'",)),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, body, needles):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(body)
    line = one_line_error(csi_spdk("controller", "--endpoint", f"unix://{tmp_path}/c.sock",
                                   "--config", str(cfg)), str(cfg), *needles)
    assert line.startswith("csi-spdk controller: ")
    assert not (tmp_path / "c.sock").exists()


def test_missing_config_file(tmp_path):
    one_line_error(csi_spdk("controller", "--endpoint", f"unix://{tmp_path}/c.sock",
                            "--config", str(tmp_path / "nope.yaml")),
                   "nope.yaml", "cannot read config file", "No such file")


def test_unreachable_spdk_socket_names_it_and_the_fix(tmp_path):
    sock = tmp_path / "no-spdk.sock"
    one_line_error(csi_spdk("discover", "--spdk-rpc", str(sock), "--sysfs-root",
                            str(tmp_path / "sys")),
                   str(sock), "unreachable", "spdk_tgt", "is running")


def test_dev_on_an_unreachable_target_leaves_nothing(tmp_path):
    sock_dir = tmp_path / "s"
    one_line_error(csi_spdk("dev", "--socket-dir", str(sock_dir), "--spdk-rpc",
                            str(tmp_path / "absent.sock")), "absent.sock", "unreachable")
    assert sorted(p.name for p in sock_dir.iterdir()) == []


def test_malformed_flag_value(tmp_path):
    one_line_error(csi_spdk("discover", "--spdk-rpc", "not an address", "--sysfs-root",
                            str(tmp_path)), "neither a socket path nor host:port")


def test_closed_stdout_pipe_ends_quietly(tmp_path):
    """``csi-spdk discover --format json | head -c 10``: the reader is gone
    before the writer writes (EPIPE on the first write): no traceback."""
    root = str(tmp_path / "sys")
    for i in range(3):
        fakesys.add_pcie_ssd(root, f"0000:0{i + 1}:00.0", "0x144d", "0xa80a",
                             "SAMSUNG MZQL21T9HCJR-00A07", f"S64{i}", namespaces=[1 << 20])
    r, w = os.pipe()
    os.close(r)  # the reader already exited
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        res = subprocess.run([sys.executable, "-m", "csi_spdk", "discover", "--format", "json",
                              "--sysfs-root", root], stdout=w, stderr=subprocess.PIPE,
                             text=True, timeout=60, env=env)
    finally:
        os.close(w)
    assert res.stderr == ""
    assert res.returncode == 141  # 128 + SIGPIPE, what a shell reports for `yes | head`


def test_pipe_read_in_part(tmp_path):
    """The same with a reader that takes 10 bytes and leaves (the shell form)."""
    root = str(tmp_path / "sys")
    for i in range(40):
        fakesys.add_pcie_ssd(root, f"0000:{i + 1:02x}:00.0", "0x144d", "0xa80a",
                             "SAMSUNG MZQL21T9HCJR-00A07", f"S6{i:03d}", namespaces=[1 << 20])
    env = {**os.environ, "PYTHONPATH": str(REPO), "ROOT": root, "PY": sys.executable}
    res = subprocess.run(
        ["bash", "-c", 'set -o pipefail; "$PY" -m csi_spdk discover --format json '
                       '--sysfs-root "$ROOT" | head -c 10'],
        capture_output=True, text=True, timeout=60, env=env)
    assert len(res.stdout) == 10 and res.stdout.startswith("[")
    assert "Traceback" not in res.stderr and res.stderr == "", res.stderr
    assert res.returncode in (0, 141)


def test_a_bug_still_shows_its_traceback(monkeypatch, capsys):
    """Only errors a person can fix are shortened; anything else keeps its traceback."""
    from csi_spdk import cli

    assert cli.explain(KeyError("x")) is None
    assert cli.explain(ZeroDivisionError()) is None
    msg, fix = cli.explain(FileNotFoundError(2, "No such file or directory", "/etc/x"))
    assert msg == "/etc/x: No such file or directory"
