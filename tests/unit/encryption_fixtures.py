"""Helpers of the target-mode encryption tests (test_encryption_qos.py,
test_encryption_hot_path.py): a publish request that carries the volume's
context, an injected crash, and what SPDK holds of a volume's crypto."""

from __future__ import annotations

import grpc
from controller_fixtures import block_cap, expect_code, publish_req

from csi_spdk import contract
from csi_spdk.proto import csi_pb2

MULTI = csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_MULTI_WRITER
NODE = "node-a"
# StorageClass parameters of each mode (auth off: the tests are about the key)
TARGET = {"encryption": "target", "auth": "none"}
NODE_MODE = {"encryption": "node", "auth": "none"}


def publish_req_of(vol, node: str = NODE):
    """ControllerPublishVolume of ``vol`` (raw block, multi-node) with its context."""
    req = publish_req(vol.volume_id, node, cap=block_cap(MULTI))
    req.volume_context.update(vol.volume_context)
    return req


def crash_at(env, n: int, method: str, request) -> None:
    """``method`` dies at its ``n``-th mutating SPDK call (INTERNAL to the CO)."""
    env.t0.api.arm(n)
    try:
        expect_code(grpc.StatusCode.INTERNAL, env.servicer, method, request)
    finally:
        env.t0.api.arm(0)


def crypto_left(env, uuid: str):
    """(the volume's crypto bdev or None, its accel key names) as SPDK holds them
    (read straight from SPDK, never through the agent)."""
    keys = [k["name"] for k in env.t0.raw.call("accel_crypto_keys_get", {})
            if k["name"].startswith(contract.crypto_bdev_name(uuid))]
    return env.t0.raw.bdev_get(contract.crypto_bdev_name(uuid)), keys
