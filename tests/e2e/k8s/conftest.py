"""Session fixture: the whole rig (control plane, chart objects, sidecars,
driver, simulators and the background QEMU guest with the node plugin) is
started once and torn down at the end, also when a test or the start fails.

Missing binaries (scripts/install-k8s.sh) or guest prerequisites skip the
tests that need them, except under CI=true, where they fail.
Env: CSI_SPDK_K8S_KEEP=1 keeps the work dir (logs, kubeconfigs) for debugging;
CSI_SPDK_K8S_GUEST=0 runs without the guest (the data-path test skips).
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from . import cluster, guestnode, scenarios
from .rig import (
    GUEST_TARGET,
    HOST_TARGETS,
    SC_BLOCK,
    SC_IMMEDIATE,
    SC_WFFC,
    SNAPSHOT_CLASS,
    Rig,
)

TEST_NAMESPACE = "rig-tests"
_RIG: list[Rig] = []
_TIMINGS: list[dict] = []


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _skip_or_fail(msg: str) -> None:
    if in_ci():
        pytest.fail(msg + " [CI=true: not skipping]", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def rig():
    missing = cluster.missing_prerequisites()
    if missing:
        _skip_or_fail("Kubernetes rig prerequisites missing: " + ", ".join(missing))
    guest = None
    if os.environ.get("CSI_SPDK_K8S_GUEST", "1") != "0":
        gmissing = guestnode.missing_prerequisites()
        if gmissing and in_ci():
            pytest.fail("QEMU guest prerequisites missing: " + ", ".join(gmissing)
                        + " [CI=true: not skipping]", pytrace=False)
        if not gmissing:
            # Boots while the control plane starts.
            guest = guestnode.GuestNode(GUEST_TARGET[4], f"topology.kubernetes.io/zone="
                                        f"{GUEST_TARGET[3]}")
    workdir = cluster.make_tempdir()
    r = Rig(workdir, guest)
    t0 = time.monotonic()
    try:
        r.start()
        r.kubectl.apply({"apiVersion": "v1", "kind": "Namespace",
                         "metadata": {"name": TEST_NAMESPACE}})
        # Pods need the namespace's default ServiceAccount (serviceaccount-controller).
        cluster.wait_until(f"ServiceAccount {TEST_NAMESPACE}/default", lambda: r.kubectl.get(
            "serviceaccount", "default", TEST_NAMESPACE) is not None, 60, 0.5, r.logs)
    except BaseException as err:
        logs = r.logs(40)
        r.stop()
        if guest is not None:
            guest.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.fail(f"the Kubernetes rig did not start: {err}\n{logs}", pytrace=False)
    r.timings["start"] = round(time.monotonic() - t0, 1)
    _TIMINGS.append(r.timings)
    _RIG.append(r)
    try:
        yield r
    finally:
        _RIG.remove(r)
        r.stop()
        if guest is not None:
            guest.stop()
        if os.environ.get("CSI_SPDK_K8S_KEEP"):
            print(f"\nk8s rig work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def env(rig) -> scenarios.Env:
    def get_capacity(params: dict, segment: dict) -> tuple[int, int]:
        from csi_spdk.proto import csi_pb2
        res = rig.controller_stub().GetCapacity(csi_pb2.GetCapacityRequest(
            parameters=params, accessible_topology=csi_pb2.Topology(segments=segment)),
            timeout=30)
        return res.available_capacity, res.maximum_volume_size.value

    targets = {node: name for name, (_l, _s, _z, node) in HOST_TARGETS.items()}
    if rig.guest is not None:
        targets[GUEST_TARGET[4]] = GUEST_TARGET[0]
    return scenarios.Env(
        kubectl=rig.kubectl, spdk=rig.spdk, namespace=TEST_NAMESPACE,
        driver_namespace=cluster.NAMESPACE, sc_immediate=SC_IMMEDIATE, sc_wffc=SC_WFFC,
        sc_block=SC_BLOCK, snapshot_class=SNAPSHOT_CLASS, nodes=dict(rig.nodes),
        fake_kubelet=True, target_of_node=targets, diagnostics=lambda: rig.logs(15),
        get_capacity=get_capacity)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and _RIG and "k8s" in item.nodeid:
        rep.sections.append(("k8s rig logs", _RIG[0].logs(40)))


def pytest_terminal_summary(terminalreporter) -> None:
    for t in _TIMINGS:
        terminalreporter.write_line(f"k8s rig start-up timings (s, cumulative): {t}")
