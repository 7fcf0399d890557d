"""``env``: the controller test environment (controller_fixtures.make_env) on the
simulator or CSI_SPDK_TEST_RPC, closed after the test. Modules with another
kind of ``env`` (the node tests) define their own, which takes precedence."""

from __future__ import annotations

import pytest
from controller_fixtures import make_env


@pytest.fixture
def env(tmp_path):
    e = make_env(tmp_path)
    yield e
    e.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA with server/client certificates and the bad ones (agent_fixtures.Pki)."""
    from agent_pki import Pki

    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def agent_env(spdk_rpc, short_tmp):
    """An lvstore on the test SPDK target and an agent over it on a Unix socket."""
    from agent_fixtures import AgentEnv

    e = AgentEnv(spdk_rpc, short_tmp)
    yield e
    e.close()
