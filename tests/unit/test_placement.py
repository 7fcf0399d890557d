"""placement: capacity, overcommit and topology ranking (pure)."""

from __future__ import annotations

from csi_spdk import contract
from csi_spdk.controller import placement
from csi_spdk.controller.config import TargetConfig

MiB = placement.MiB
N = contract.TOPOLOGY_NODE_KEY


def tc(name, node="", **topo):
    return TargetConfig(name=name, rpc="/x", listen_address="127.0.0.1", node=node,
                        topology=topo)


def pool(name, free, total=1024 * MiB, prov=0, node="", cluster=4 * MiB, **topo):
    return placement.Pool(tc(name, node, **topo), "lvs", cluster, total, free, prov)


def names(pools):
    return [p.target.name for p in pools]


def test_align():
    assert placement.align(1, 4 * MiB) == 4 * MiB
    assert placement.align(5 * MiB, 4 * MiB) == 8 * MiB
    assert placement.align(0, 4 * MiB) == 4 * MiB
    assert placement.align(MiB + 1, 4096) == 2 * MiB   # SPDK sizes are whole MiB
    assert placement.align_down(7 * MiB, 4 * MiB) == 4 * MiB


def test_thick_uses_free_space_and_prefers_most_free():
    pools = [pool("a", 100 * MiB), pool("b", 500 * MiB), pool("c", 10 * MiB)]
    assert names(placement.rank(pools, lambda p: 50 * MiB, False, 2.0)) == ["b", "a"]


def test_thin_uses_overcommit():
    pools = [pool("a", 0, total=100 * MiB, prov=150 * MiB),
             pool("b", 0, total=100 * MiB, prov=190 * MiB)]
    assert names(placement.rank(pools, lambda p: 40 * MiB, True, 2.0)) == ["a"]
    assert names(placement.rank(pools, lambda p: 40 * MiB, True, 1.0)) == []
    assert pools[0].available(True, 2.0) == 50 * MiB


def test_requisite_filters_and_preferred_ranks_node_first():
    pools = [pool("a", 900 * MiB, node="n1"), pool("b", 100 * MiB, node="n2"),
             pool("c", 500 * MiB)]
    req = [{N: "n2"}, {N: "n3"}]
    # the hosting node never excludes a target (NVMe/TCP reaches it from anywhere)
    assert names(placement.rank(pools, lambda p: MiB, False, 1, req)) == ["a", "c", "b"]
    pref = [{N: "n2"}]
    assert names(placement.rank(pools, lambda p: MiB, False, 1, req, pref)) == ["b", "a", "c"]
    assert names(placement.rank(pools, lambda p: MiB, False, 1, [], [{N: "n1"}]))[0] == "a"


def test_topology_labels_and_target_key():
    pools = [pool("a", 100 * MiB, zone="z1"), pool("b", 900 * MiB, zone="z2")]
    assert names(placement.rank(pools, lambda p: MiB, False, 1, [{"zone": "z1"}])) == ["a"]
    assert names(placement.rank(pools, lambda p: MiB, False, 1, [{N: "x", "zone": "z2"}])) \
        == ["b"]
    # a preferred label segment beats free space
    assert names(placement.rank(pools, lambda p: MiB, False, 1, [],
                                [{"zone": "z1"}]))[0] == "a"


def test_compatible():
    assert placement.compatible({"a": "1"}, {"b": "2"})
    assert not placement.compatible({"a": "1"}, {"a": "2"})
    assert placement.accessible(tc("x"), [])


def test_ssd_class_requirement_prefers_the_target_labelled_with_it():
    """external-provisioner (non-strict) passes an SSD-class allowedTopologies
    term as requisite and preferred, without the chosen node: the target
    whose config carries the class label ranks first although others have
    more room; the others stay usable (NVMe/TCP reaches them too)."""
    ssd = {"ssd.csi-spdk.io/qemu-nvme-ctrl": "true"}
    pools = [pool("a", 800 * MiB, node="n-a", **{"topology.kubernetes.io/zone": "a"}),
             pool("g", 100 * MiB, node="n-g", **{"topology.kubernetes.io/zone": "g"}, **ssd)]
    ranked = placement.rank(pools, lambda p: 48 * MiB, False, 1.0, requisite=[ssd],
                            preferred=[ssd])
    assert names(ranked) == ["g", "a"]
    # without the label in the target's config, the one with most room wins
    plain = [pool("a", 800 * MiB), pool("g", 100 * MiB, node="n-g")]
    assert names(placement.rank(plain, lambda p: 48 * MiB, False, 1.0, requisite=[ssd],
                                preferred=[ssd])) == ["a", "g"]


def test_provisioned_counts_against_thick_at_ratio_one():
    """At ratio <= 1 thin volumes' sizes are promises: a thick volume may only
    take what no volume or snapshot is promised, even if clusters are free."""
    p = pool("a", free=900 * MiB, total=1024 * MiB, prov=1000 * MiB)
    assert p.available(False, 1.0) == 24 * MiB
    assert p.available(False, 2.0) == 900 * MiB      # overcommitted thin: no promise
    assert p.available(True, 1.0) == 24 * MiB
    assert placement.shortfall(p, 1.0, thick_bytes=25 * MiB)
    assert placement.shortfall(p, 1.0, thick_bytes=24 * MiB) == ""
