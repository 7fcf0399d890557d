"""Fixtures for the end-to-end tests that boot a QEMU guest (tests/e2e/guest).

``guest`` runs a shell script in a fresh guest and returns a GuestResult;
``guest.run(..., check=True)`` fails the test with the guest's output and the
tail of its kernel console. Every guest run's output and timings are attached
to the test report (shown for failures; timings also in the summary).

Prerequisites (qemu, the cloud kernel in .cache/guest, busybox, nvme-cli...)
come from scripts/install-guest-deps.sh. Without them the guest tests are
skipped, except under CI (CI=true), where a missing prerequisite is a failure.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guest import harness  # noqa: E402
from guest.harness import GuestOptions, GuestResult  # noqa: E402

_TIMINGS: list[tuple[str, dict]] = []


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


class GuestRunner:
    def __init__(self, request: pytest.FixtureRequest) -> None:
        self.request = request

    def run(self, script: str, timeout: int = 120, *, check: bool = False,
            options: GuestOptions | None = None, **kwargs) -> GuestResult:
        res = harness.run_in_guest(script, timeout, options=options, **kwargs)
        node = self.request.node
        node.add_report_section("call", "guest output", res.describe())
        _TIMINGS.append((node.nodeid, res.timings))
        if check and res.exit_code != 0:
            pytest.fail(f"guest script failed\n{res.describe()}", pytrace=False)
        return res


@pytest.fixture(scope="session")
def guest_ready() -> None:
    missing = harness.missing_prerequisites()
    if missing:
        msg = ("QEMU guest prerequisites missing: " + ", ".join(missing)
               + " (run scripts/install-guest-deps.sh)")
        if in_ci():
            pytest.fail(msg + " [CI=true: not skipping]", pytrace=False)
        pytest.skip(msg)


@pytest.fixture
def guest(guest_ready, request) -> GuestRunner:
    return GuestRunner(request)


@pytest.fixture(scope="session")
def host_rpc() -> str | None:
    """A real spdk_tgt on the host (CSI_SPDK_TEST_RPC) the guest should use
    instead of the in-guest simulator; None for the simulator."""
    return os.environ.get("CSI_SPDK_TEST_RPC") or None


def pytest_terminal_summary(terminalreporter) -> None:
    if not _TIMINGS:
        return
    terminalreporter.section("guest timings (seconds)")
    for nodeid, t in _TIMINGS:
        terminalreporter.write_line(f"{nodeid}: {t}")
