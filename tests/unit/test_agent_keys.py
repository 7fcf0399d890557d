"""Key custody (agent/keys.py): 0600 files in a 0700 directory, registered in
SPDK's keyring_file, removed on DeleteKey, and the material never in a log
line, an error message, a metric or a desired-state record."""

from __future__ import annotations

import logging
import os
import stat

import grpc
import pytest
from prometheus_client import REGISTRY, generate_latest

from csi_spdk.errors import CsiError
from csi_spdk.log import JsonFormatter

# Interchange-format keys (NVMe TP 8006 / 8011 shapes); random enough to grep for.
DHCHAP = b"DHHC-1:00:ia6zGodOr5SEG0DmJFcgAM5m0lHXeMLQw5kgkoOdV2yxiWNM:"
PSK = b"NVMeTLSkey-1:01:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrZ:"


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def keyring(env) -> dict[str, dict]:
    return {k["name"]: k for k in env.raw.call("keyring_get_keys") if not k.get("removed")}


def code_of(fn, *args) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(CsiError) as err:
        fn(*args)
    return err.value.code, err.value.message


def test_put_key_writes_a_private_file_and_registers_it(agent_env):
    name = f"host-{agent_env.suffix}"
    path = agent_env.client.put_key(name, DHCHAP)
    assert os.path.dirname(path) == str(agent_env.tmp / "agent-state" / "keys")
    assert mode(os.path.dirname(path)) == 0o700
    assert mode(path) == 0o600
    with open(path, "rb") as f:
        assert f.read() == DHCHAP
    assert keyring(agent_env)[name]["path"] == path
    # the same key again: nothing changes
    assert agent_env.client.put_key(name, DHCHAP) == path
    assert list(keyring(agent_env)).count(name) == 1
    # other material under the same name is refused, the file is unchanged
    code, _ = code_of(agent_env.client.put_key, name, PSK)
    assert code == grpc.StatusCode.ALREADY_EXISTS
    with open(path, "rb") as f:
        assert f.read() == DHCHAP
    agent_env.client.delete_key(name)
    assert name not in keyring(agent_env)
    assert not os.path.exists(path)
    agent_env.client.delete_key(name)  # already gone: success


def test_a_crash_between_file_and_keyring_is_healed_by_the_retry(agent_env):
    name = f"crash-{agent_env.suffix}"
    keys_dir = agent_env.tmp / "agent-state" / "keys"
    (keys_dir / name).write_bytes(b"DHHC-1:00:stale-half-written")
    path = agent_env.client.put_key(name, DHCHAP)
    with open(path, "rb") as f:
        assert f.read() == DHCHAP
    assert keyring(agent_env)[name]["path"] == path
    agent_env.client.delete_key(name)


def test_bad_names_and_material_write_nothing(agent_env):
    keys_dir = agent_env.tmp / "agent-state" / "keys"
    before = sorted(os.listdir(keys_dir))
    for name, material in (("../escape", DHCHAP), ("", DHCHAP), ("a/b", DHCHAP),
                           ("ok-name", b""), ("ok-name", b"has space inside"),
                           ("ok-name", b"x" * 5000)):
        code, _ = code_of(agent_env.client.put_key, name, material)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(os.listdir(keys_dir)) == before
    assert "ok-name" not in keyring(agent_env)
    assert not (agent_env.tmp / "agent-state" / "escape").exists()


def test_keys_the_agent_does_not_keep_are_left_alone(agent_env, short_tmp):
    name = f"operator-{agent_env.suffix}"
    own = short_tmp / "operator.key"
    own.write_bytes(PSK)
    own.chmod(0o600)
    agent_env.raw.call("keyring_file_add_key", {"name": name, "path": str(own)})
    try:
        code, _ = code_of(agent_env.client.delete_key, name)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        code, _ = code_of(agent_env.client.put_key, name, DHCHAP)
        assert code == grpc.StatusCode.ALREADY_EXISTS
        assert keyring(agent_env)[name]["path"] == str(own)
        assert own.read_bytes() == PSK
    finally:
        agent_env.raw.call("keyring_file_remove_key", {"name": name})


def test_keyring_methods_are_not_callable_through_call(agent_env, short_tmp):
    code, _ = code_of(agent_env.api.call, "keyring_file_add_key",
                      {"name": "x", "path": str(short_tmp / "x")})
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "x" not in keyring(agent_env)


def test_a_loose_state_directory_is_tightened(spdk_rpc, short_tmp):
    from agent_fixtures import start_agent

    (short_tmp / "st" / "keys").mkdir(parents=True)
    os.chmod(short_tmp / "st" / "keys", 0o755)
    agent = start_agent(spdk_rpc, short_tmp / "st", f"unix://{short_tmp}/a.sock")
    try:
        assert mode(short_tmp / "st" / "keys") == 0o700
    finally:
        agent.stop()


class Recorder:
    def __init__(self) -> None:
        self.calls: list = []

    def record(self, method, params, result=None) -> None:
        self.calls.append((method, params, result))


def test_key_material_never_leaves_the_key_file(agent_env, caplog):
    """Every key operation, good and bad, at debug level: grep every captured
    log line (formatted as the agent writes them), every error message, the
    metrics and the desired-state records for each key's material."""
    from agent_fixtures import start_agent

    caplog.set_level(logging.DEBUG)
    rec = Recorder()
    agent = start_agent(agent_env.rpc, agent_env.tmp / "st", f"unix://{agent_env.tmp}/k.sock",
                        state=rec)
    messages = []
    try:
        with agent.client() as client:
            for i, material in enumerate((DHCHAP, PSK)):
                name = f"k{i}-{agent_env.suffix}"
                client.put_key(name, material)
                client.put_key(name, material)
                other = PSK if material == DHCHAP else DHCHAP
                for bad_name, bad_material in ((name, other), ("../" + name, material),
                                               (name, material + b" tail"),
                                               (name, material * 100)):
                    with pytest.raises(CsiError) as err:
                        client.put_key(bad_name, bad_material)
                    messages.append(err.value.message)
                client.delete_key(name)
    finally:
        agent.stop()
    text = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    text += "\n" + "\n".join(messages) + "\n" + repr(rec.calls)
    text += "\n" + generate_latest(REGISTRY).decode()
    assert "PutKey" in text and "keyring_file_add_key" in text  # the logs were captured
    for material in (DHCHAP, PSK):
        secret = material.decode().rstrip(":").split(":")[-1]
        assert secret not in text, "key material leaked"
    assert ("keyring_file_add_key", {"name": f"k0-{agent_env.suffix}",
                                     "path": str(agent_env.tmp / "st" / "keys" /
                                                 f"k0-{agent_env.suffix}")}, None) in rec.calls
    assert ("keyring_file_remove_key", {"name": f"k1-{agent_env.suffix}"}, None) in rec.calls
