"""The rig's scheduler (scheduling.schedule) against hand-written API
objects: no control plane needed, so this runs wherever the unit tests do."""

from __future__ import annotations

from . import scheduling
from .cluster import DRIVER
from .scenarios import Env

SSD = "ssd.csi-spdk.io/qemu-nvme-ctrl"
NODE_KEY = "topology.csi-spdk.io/node"
ZONE = "topology.kubernetes.io/zone"


class FakeKubectl:
    def __init__(self, objects: dict[tuple[str, str | None], object]) -> None:
        self.objects = objects

    def get(self, kind, name=None, namespace=None):
        return self.objects.get((kind, name), None if name else [])


def node(name, labels, keys):
    return ({"metadata": {"name": name, "labels": {NODE_KEY: name, **labels}}},
            {"spec": {"drivers": [{"name": DRIVER, "topologyKeys": [NODE_KEY, *keys]}]}})


def world(allowed, capacities=(), storage_capacity=True, extra_nodes=()):
    a = node("node-a", {ZONE: "a"}, [ZONE])
    g = node("node-g", {ZONE: "g", SSD: "true"}, [ZONE, SSD])
    # a Node carrying the label without the driver reporting it as a topology key
    x = node("node-x", {ZONE: "x", SSD: "true"}, [ZONE])
    nodes = [a, g, x, *extra_nodes]
    objs = {
        ("pvc", "c1"): {"spec": {"storageClassName": "sc",
                                 "resources": {"requests": {"storage": "64Mi"}}}},
        ("storageclass", "sc"): {"metadata": {"name": "sc"}, "allowedTopologies": allowed},
        ("csidriver", DRIVER): {"spec": {"storageCapacity": storage_capacity}},
        ("csistoragecapacities", None): list(capacities),
        ("nodes", None): [n for n, _ in nodes],
    }
    for n, c in nodes:
        objs[("csinode", n["metadata"]["name"])] = c
    names = {n["metadata"]["name"]: {} for n, _ in nodes}
    return Env(kubectl=FakeKubectl(objs), spdk=None, namespace="t", driver_namespace="d",
               sc_immediate="", sc_wffc="", sc_block="", snapshot_class="", nodes=names)


def cap(labels, capacity, maximum=None):
    c = {"storageClassName": "sc", "nodeTopology": {"matchLabels": labels},
         "capacity": capacity}
    if maximum:
        c["maximumVolumeSize"] = maximum
    return c


TERM = [{"matchLabelExpressions": [{"key": SSD, "values": ["true"]}]}]


def test_allowed_topologies_pick_the_node_whose_driver_reports_the_label():
    env = world(TERM, [cap({ZONE: "g"}, "1Gi"), cap({ZONE: "a"}, "1Gi"),
                       cap({ZONE: "x"}, "1Gi")])
    assert scheduling.schedule(env, "c1") == ("node-g", "")


def test_no_node_with_the_class():
    env = world([{"matchLabelExpressions": [{"key": "ssd.csi-spdk.io/other", "values": ["true"]}]}])
    assert scheduling.schedule(env, "c1") == (
        None, "0/3 nodes are available: 3 node(s) didn't find available persistent volumes "
              "to bind.")


def test_capacity_is_checked_when_the_driver_tracks_it():
    # no capacity object yet for the class: not feasible (the scheduler retries)
    env = world(TERM)
    node_, reason = scheduling.schedule(env, "c1")
    assert node_ is None and "1 node(s) did not have enough free storage" in reason
    assert "2 node(s) didn't find available persistent volumes to bind" in reason
    # maximumVolumeSize, when set, is what counts
    assert scheduling.schedule(world(TERM, [cap({ZONE: "g"}, "1Gi", "32Mi")]), "c1")[0] is None
    assert scheduling.schedule(world(TERM, [cap({ZONE: "g"}, "32Mi", "1Gi")]), "c1")[0] == \
        "node-g"
    # capacity not tracked by the CSIDriver: topology alone decides
    assert scheduling.schedule(world(TERM, storage_capacity=False), "c1")[0] == "node-g"


def test_no_allowed_topologies_and_selector_expressions():
    env = world([], [cap({}, "1Gi")])
    assert scheduling.schedule(env, "c1")[0] == "node-a"      # every node; first by name
    expr = {"storageClassName": "sc", "capacity": "1Gi", "nodeTopology": {
        "matchExpressions": [{"key": ZONE, "operator": "In", "values": ["x"]}]}}
    assert scheduling.schedule(world([], [expr]), "c1")[0] == "node-x"


def test_node_without_the_driver():
    lonely = ({"metadata": {"name": "node-0", "labels": {}}}, {"spec": {"drivers": []}})
    env = world([], [cap({}, "1Gi")], extra_nodes=[lonely])
    assert scheduling.schedule(env, "c1")[0] == "node-a"
    env = world(TERM, [cap({}, "1Gi")], extra_nodes=[lonely])
    env.kubectl.objects[("nodes", None)] = [lonely[0]]
    env.nodes = {"node-0": {}}
    assert scheduling.schedule(env, "c1") == (
        None, f"0/1 nodes are available: 1 {scheduling.REASON_NO_DRIVER}.")
