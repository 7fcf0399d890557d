"""Key rotation driven by kubelet's republish (docs/DESIGN.md "Re-keying
live connections in a cluster").

With ``requiresRepublish: true`` kubelet calls NodePublishVolume for every
mounted volume about once a minute, with the node-publish Secret fetched
afresh: the volume's Secret, whose ``rotationStep`` says which pair the
target holds (``contract.rotation_pair``). When the live controller holds
another pair, the node re-keys it (``initiator.rekey`` -> node/reauth.py)
and then acknowledges the pair's fingerprints in its ConfigMap
(node/acks.py), which ``rotate-keys`` waits for before it moves on.

Cheap when nothing changed: the stage record keeps the acknowledged pair's
fingerprints, so a republish with the same Secret compares two short strings
and returns: no sysfs write, no kernel-log read, no API call.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from .. import contract
from ..errors import CsiError
from .acks import Acks

log = logging.getLogger("csi_spdk.node.rekey")


def _lvol_uuid(volume_id: str) -> str:
    try:
        return contract.parse_id(volume_id).lvol_uuid
    except CsiError:
        return ""


def is_dhchap(publish_context: Mapping[str, str], secrets: Mapping[str, str]) -> bool:
    return publish_context.get(contract.PC_AUTH) == contract.AUTH_DHCHAP and \
        bool(secrets.get(contract.SECRET_DHCHAP_KEY))


def connect_secrets(publish_context: Mapping[str, str],
                    secrets: Mapping[str, str]) -> dict[str, str]:
    """The secrets to connect (or re-key) with: a Secret in mid-rotation
    gives the pair the target holds now, in the current keys' places."""
    out = dict(secrets)
    if not is_dhchap(publish_context, secrets):
        return out
    host, ctrl = contract.rotation_pair(out)
    out[contract.SECRET_DHCHAP_KEY] = host
    if ctrl:
        out[contract.SECRET_DHCHAP_CTRL_KEY] = ctrl
    return out


class Rekeyer:
    """``initiator``: has ``rekey(nqn, host_key, ctrl_key)``; ``acks``: where
    the node acknowledges (None: nowhere, dev and the endpoint path)."""

    def __init__(self, initiator, acks: Acks | None) -> None:
        self.initiator = initiator
        self.acks = acks

    def acknowledge(self, volume_id: str, pair: str) -> bool:
        """Record ``pair`` for the volume; False (logged, retried on the next
        republish) when the API does not take it: a stage or publish does not
        fail for it, the rotation waits."""
        uuid = _lvol_uuid(volume_id)
        if self.acks is None or not uuid:
            return True
        try:
            self.acks.record(uuid, pair)
        except CsiError as err:
            log.warning("could not acknowledge the volume's keys; retrying on the next "
                        "republish", extra={"f": {"volume": volume_id, "error": err.message}})
            return False
        return True

    def staged(self, rec, publish_context: Mapping[str, str],
               secrets: Mapping[str, str]) -> str:
        """After a stage connected with ``secrets`` (``connect_secrets``): the
        stage record's new ``acked`` value. A pair other than the one already
        acknowledged is acknowledged now ("" when the API did not take it: the
        next republish retries); no DH-HMAC-CHAP keeps the record's value."""
        if not is_dhchap(publish_context, secrets):
            return rec.acked
        pair = contract.pair_fingerprint(secrets[contract.SECRET_DHCHAP_KEY],
                                         secrets.get(contract.SECRET_DHCHAP_CTRL_KEY, ""))
        if pair == rec.acked:
            return rec.acked
        return pair if self.acknowledge(rec.volume_id, pair) else ""

    def republish(self, rec, publish_context: Mapping[str, str],
                  secrets: Mapping[str, str]) -> str | None:
        """Bring the volume's live controller to the pair the Secret says the
        target holds; returns the stage record's new ``acked`` value, or None
        when nothing changed (the caller saves nothing). UNAVAILABLE from the
        kernel's refusal (its previous secret restored) propagates."""
        if not is_dhchap(publish_context, secrets):
            return None
        host, ctrl = contract.rotation_pair(dict(secrets))
        pair = contract.pair_fingerprint(host, ctrl)
        if pair == rec.acked:
            return None
        written = self.initiator.rekey(rec.nqn, host, ctrl)
        if written:
            log.info("live connection re-keyed on republish", extra={"f": {
                "volume": rec.volume_id, "pair": pair, "written": written}})
        return pair if self.acknowledge(rec.volume_id, pair) else ""

    def forget(self, volume_id: str) -> None:
        uuid = _lvol_uuid(volume_id)
        if self.acks is None or not uuid:
            return
        try:
            self.acks.forget(uuid)
        except CsiError as err:
            log.warning("could not remove the volume's acknowledgement", extra={"f": {
                "volume": volume_id, "error": err.message}})
