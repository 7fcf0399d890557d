"""``csi-spdk rotate-keys``: new DH-HMAC-CHAP keys for a volume without
dropping its connections; the old keys are refused afterwards.

Every re-authentication meets the target as it is (a sysfs write on the node
re-authenticates the live controller at once), so target and nodes move in
lock-step, one key at a time (docs/DESIGN.md "Rotation"):

0. the next keys N are generated and stored beside the current ones O in the
   volume's Secret (``next.*``; a resumed rotation finds and keeps them);
1. N goes onto the target (key custody), then every host entry gets
   ``nvmf_subsystem_set_keys`` (N host, O controller), then the Secret says
   so (``rotationStep: 1``, kubelet's republish hands it to the nodes), then
   every node re-keys its live controller to exactly that pair;
2. set_keys (N, N) on every entry, ``rotationStep: 2``, the nodes again;
3. the Secret's keys become N (one patch, the step goes), then the target
   drops every other key of the volume.

All entries move before any node is asked: the nodes of a volume read one
Secret. Resumable after a crash anywhere: each step reads where the target
is (the host entry's key names say which pair it holds), the target moves
before the Secret says so, and a node is only ever asked for the pair the
target holds, which is always safe. A volume no node has connected (no host
entry) only gets new keys in its Secret. A published volume needs a
``NodeSync`` that reaches its nodes (the cluster's waits for their
acknowledgements, controller/rotate_nodes.py; the dev one calls their
endpoints, rotate_cli.py): without one the command refuses it
(FAILED_PRECONDITION), because a node left with the old keys would fail its
next reconnect.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import contract
from ..errors import FailedPrecondition
from .auth import VolumeAuth, VolumeKeys
from .target import Lvol, Target

log = logging.getLogger("csi_spdk.rotate")

# (volume id, node id, host NQN, the pair the target now holds) -> the node re-keys
# (an optional ``reaches(node id) -> bool`` says which nodes it can reach, an
# optional ``sync_all(volume id, lvol uuid, step, [(node, host)], pair)`` does
# a whole step at once: controller/rotate_nodes.py)
NodeSync = Callable[[str, str, str, VolumeKeys], None]


@dataclass
class Outcome:
    volume_id: str
    hosts: list[str] = field(default_factory=list)   # node ids re-keyed
    resumed: bool = False

    def line(self) -> str:
        nodes = ", ".join(self.hosts) or "no connected node"
        return (f"{self.volume_id}: keys rotated ({nodes})"
                + (" [finished an interrupted rotation]" if self.resumed else ""))


def sync_nodes(node_sync: NodeSync | None, volume_id: str, lvol_uuid: str, step: int,
               nodes: list[tuple[str, str]], keys: VolumeKeys) -> None:
    """Every node in ``nodes`` ((node id, host NQN)) re-keys its live
    controller to ``keys``, the pair the target holds now (rotation step
    ``step``): at once where the NodeSync can (``sync_all``: the cluster's,
    controller/rotate_nodes.py), else node by node."""
    if not nodes:
        return
    batch = getattr(node_sync, "sync_all", None)
    if batch is not None:
        batch(volume_id, lvol_uuid, step, nodes, keys)
        return
    for node, host in nodes:
        node_sync(volume_id, node, host, keys)


def _say_step(store, lvol_uuid: str, step: int) -> None:
    """The Secret says which pair the target now holds (after the target
    moved, never before): kubelet's republish hands it to the nodes, which
    re-key to it (node/rekey.py), whichever NodeSync waits for them."""
    set_step = getattr(store, "set_step", None)
    if set_step is not None:
        set_step(lvol_uuid, step)


def _pair(keys: VolumeKeys, lvol_uuid: str) -> tuple[str, str]:
    n = keys.names(lvol_uuid)
    return n["dhchap_key"], n.get("dhchap_ctrlr_key", "")


def rotate(target: Target, lv: Lvol, auth: VolumeAuth, node_sync: NodeSync | None,
           node_of: Callable[[str], str]) -> Outcome:
    """Rotate one volume's keys (see the module docstring)."""
    store = auth.store
    vid = str(contract.ObjectId(target.name, lv.uuid))
    if store is None or not all(hasattr(store, op) for op in ("pending", "set_pending",
                                                              "commit")):
        raise FailedPrecondition(
            "this controller's keys cannot be rotated per volume (static dev/test keys "
            "are shared by every volume: write a new auth.staticSecretsFile instead)")
    old = store.get(lv.uuid)
    if old is None or not old.dhchap_key:
        raise FailedPrecondition(f"volume {vid} has no DH-HMAC-CHAP keys to rotate (auth: "
                                 "none or tls; a TLS PSK cannot be rotated with set_keys)")
    sub = target.exporter.subsystem(lv.uuid)
    hosts = [h for h in (sub or {}).get("hosts", [])]
    reaches = getattr(node_sync, "reaches", lambda _node: node_sync is not None)
    unreachable = [node_of(h["nqn"]) for h in hosts if not reaches(node_of(h["nqn"]))]
    if unreachable:   # before anything changes
        raise FailedPrecondition(
            f"volume {vid} is published to {', '.join(unreachable)}: a node must re-key its "
            "live connection in step with the target (else its next reconnect fails); give "
            "the node plugins' endpoints (--node NODE=ENDPOINT), or rotate after unpublishing")
    resumed = store.pending(lv.uuid) is not None
    new = store.set_pending(lv.uuid, VolumeKeys.generate(contract.AUTH_DHCHAP))
    o_h, o_c = _pair(old, lv.uuid)
    n_h, n_c = _pair(new, lv.uuid)
    out = Outcome(vid, resumed=resumed)
    api = target.api
    nqn = contract.subsystem_nqn(lv.uuid)
    if hosts:
        for name, material in new.material(lv.uuid).items():
            auth.put_key(target.name, name, material)
    for h in hosts:
        have = (h.get("dhchap_key", ""), h.get("dhchap_ctrlr_key", ""))
        if have not in ((o_h, o_c), (n_h, o_c), (n_h, n_c)):
            raise FailedPrecondition(f"volume {vid}: the target's host entry for "
                                     f"{node_of(h['nqn'])} holds keys that are neither the "
                                     "Secret's nor the pending ones; publish the volume again "
                                     "to converge it first")
    # Every host entry moves before any node is asked (the cluster's nodes
    # read one Secret, so one step at a time for all of them): step 1 (N host,
    # O controller) for the entries still on O's controller key, step 2 (N, N)
    step1 = [h for h in hosts if h.get("dhchap_ctrlr_key", "") == o_c]
    for step, entries, ctrl, pair in ((1, step1, o_c, VolumeKeys(new.dhchap_key,
                                                                 old.dhchap_ctrl_key)),
                                      (2, hosts, n_c, new)):
        for h in entries:
            if (h.get("dhchap_key", ""), h.get("dhchap_ctrlr_key", "")) != (n_h, ctrl):
                api.host_set_keys(nqn, h["nqn"], dhchap_key=n_h, dhchap_ctrlr_key=ctrl)
        if entries:
            _say_step(store, lv.uuid, step)
        sync_nodes(node_sync, vid, lv.uuid, step,
                   [(node_of(h["nqn"]), h["nqn"]) for h in entries], pair)
    out.hosts = [node_of(h["nqn"]) for h in hosts]
    store.commit(lv.uuid)                                    # step 3
    auth.drop_target_keys(target.name, lv.uuid, keep=(n_h, n_c) if hosts else ())
    log.info("volume keys rotated", extra={"f": {"volume": vid, "nodes": out.hosts}})
    return out
