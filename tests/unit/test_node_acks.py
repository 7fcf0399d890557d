"""node/acks.py ConfigMapAcks against a fake CoreV1Api that answers as the
API server does (404 for a ConfigMap not there yet, 409 for a create that
lost a race, 403 from the admission policy, a timeout): the acknowledgement
ends up in the node's ConfigMap, and every failure is UNAVAILABLE naming
the ConfigMap and the status, never the request body. The real API server
with the chart's policy: tests/e2e/k8s/test_node_acks.py."""

from __future__ import annotations

import pytest

from csi_spdk import contract
from csi_spdk.errors import Unavailable
from csi_spdk.node.acks import ConfigMapAcks, from_args

kubernetes = pytest.importorskip("kubernetes")
from kubernetes.client.exceptions import ApiException  # noqa: E402

UUID = "0f7a4b2e-8a1d-4c3b-9b5a-6f1e2d3c4b5a"


class FakeCore:
    def __init__(self) -> None:
        self.maps: dict[str, dict] = {}
        self.calls: list[tuple[str, float]] = []
        self.fail: dict[str, Exception] = {}
        self.race = False

    def patch_namespaced_config_map(self, name, namespace, body, _request_timeout=None):
        self.calls.append(("patch", _request_timeout))
        if "patch" in self.fail:
            raise self.fail["patch"]
        if name not in self.maps:
            raise ApiException(status=404, reason="Not Found")
        for k, v in body["data"].items():
            if v is None:
                self.maps[name].pop(k, None)
            else:
                self.maps[name][k] = v

    def create_namespaced_config_map(self, namespace, body, _request_timeout=None):
        self.calls.append(("create", _request_timeout))
        if "create" in self.fail:
            raise self.fail["create"]
        if self.race:                  # another volume's ack created it meanwhile
            self.maps[body.metadata.name] = {}
            raise ApiException(status=409, reason="Conflict")
        assert body.metadata.labels[contract.ACK_LABEL] == "true"
        self.maps[body.metadata.name] = dict(body.data)


def test_create_then_patch_then_forget():
    core = FakeCore()
    acks = ConfigMapAcks("node-a", "csi-spdk", api=core, timeout=7)
    acks.record(UUID, "0123abcd/4567ef01")
    acks.record("other", "89abcdef/")
    assert core.maps == {"csi-spdk-node-node-a": {UUID: "0123abcd/4567ef01",
                                                  "other": "89abcdef/"}}
    assert [c for c, _ in core.calls] == ["patch", "create", "patch"]
    assert {t for _, t in core.calls} == {7}               # every request is bounded
    acks.forget(UUID)
    assert core.maps["csi-spdk-node-node-a"] == {"other": "89abcdef/"}
    ConfigMapAcks("node-b", "csi-spdk", api=core).forget(UUID)   # nothing there: fine


def test_a_create_that_lost_the_race_patches():
    core = FakeCore()
    core.race = True
    ConfigMapAcks("node-a", "csi-spdk", api=core).record(UUID, "0123abcd/4567ef01")
    assert core.maps == {"csi-spdk-node-node-a": {UUID: "0123abcd/4567ef01"}}


@pytest.mark.parametrize("where, error, text", [
    ("create", ApiException(status=403, reason="Forbidden"), "403 Forbidden"),
    ("patch", ApiException(status=403, reason="Forbidden"), "403"),
    ("patch", ApiException(status=500, reason="Internal Server Error"), "500"),
])
def test_refusals_are_unavailable_naming_the_configmap(where, error, text):
    core = FakeCore()
    error.body = '{"message": "echo of the request: 0123abcd/4567ef01"}'
    core.fail[where] = error
    with pytest.raises(Unavailable) as err:
        ConfigMapAcks("node-a", "csi-spdk", api=core).record(UUID, "0123abcd/4567ef01")
    assert "csi-spdk/csi-spdk-node-node-a" in err.value.message or \
        "csi-spdk-node-node-a" in err.value.message
    assert text in err.value.message and "echo" not in err.value.message


def test_an_unreachable_api_is_unavailable():
    import urllib3
    core = FakeCore()
    core.fail["patch"] = urllib3.exceptions.MaxRetryError(None, "/api", "timed out")
    with pytest.raises(Unavailable, match="MaxRetryError"):
        ConfigMapAcks("node-a", "csi-spdk", api=core).record(UUID, "0123abcd/4567ef01")


def test_credentials_load_at_the_first_ack_and_bad_ones_are_unavailable(tmp_path,
                                                                         monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    bad = tmp_path / "kubeconfig"
    bad.write_text("not: a kubeconfig\n")
    monkeypatch.setenv("KUBECONFIG", str(bad))
    acks = from_args("node-a", "csi-spdk", "auto")     # $KUBECONFIG: on, nothing loaded yet
    assert isinstance(acks, ConfigMapAcks) and acks._api is None
    with pytest.raises(Unavailable, match="no usable credentials"):
        acks.record(UUID, "0123abcd/4567ef01")
    monkeypatch.delenv("KUBECONFIG")
    assert from_args("node-a", "csi-spdk", "auto") is None
    assert from_args("node-a", "csi-spdk", "off") is None
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    with pytest.raises(ValueError, match="namespace"):
        from_args("node-a", "", "on")
