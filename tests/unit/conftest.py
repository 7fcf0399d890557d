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
