"""What an intent's refusal means to the CO: the gRPC code and a message a
person can act on, for DeleteVolume and ControllerPublishVolume.

``node_names`` turns the host NQNs an intent reports into CSI node ids
(``VolumeReports._node_names``: hash-form NQNs need the service's hints).
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import AlreadyExists, CsiError, FailedPrecondition, Internal, NotFound, echo
from ..spdk.intents import IntentError

NodeNames = Callable[[list[str]], list[str]]


def delete_refusal(volume_id: str, err: IntentError, node_names: NodeNames) -> CsiError:
    if err.reason == "foreign":
        return FailedPrecondition(f"lvol {err.details.get('alias', '?')} was not created "
                                  "by csi-spdk; refusing to delete it")
    if err.reason == "not_volume":
        return FailedPrecondition(f"{volume_id} is a snapshot, not a volume; "
                                  "use DeleteSnapshot")
    if err.reason == "published":
        return FailedPrecondition(
            f"volume {volume_id} is still published to "
            f"{', '.join(node_names(err.details.get('hosts', [])))}; "
            "unpublish it first")
    return Internal(f"delete of {volume_id}: {err.message}")


def publish_refusal(volume_id: str, node_id: str, err: IntentError,
                    node_names: NodeNames) -> CsiError:
    if err.reason == "not_volume":
        return NotFound(f"volume {volume_id} does not exist")
    if err.reason == "conflict":
        return AlreadyExists(f"volume {volume_id} is already published to node "
                             f"{echo(node_id)} with a different capability or "
                             "readonly flag")
    if err.reason == "single_node":
        return FailedPrecondition(
            f"volume {volume_id} has a single-node access mode and is already "
            f"published to {', '.join(node_names(err.details.get('hosts', [])))}")
    return Internal(f"publish of {volume_id}: {err.message}")
