"""The Node service over a real gRPC server on a Unix socket."""

from __future__ import annotations

import os
import sys

import grpc
import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import loopdev  # noqa: E402
from test_node import UUID1, VOL1, Env, block_cap, mount_cap, pc  # noqa: E402

from csi_spdk import contract  # noqa: E402
from csi_spdk.node.mount import Mounter  # noqa: E402
from csi_spdk.proto import csi_pb2, csi_pb2_grpc  # noqa: E402
from csi_spdk.server import GrpcServer  # noqa: E402


@pytest.fixture
def served(tmp_path):
    loopdev.require_loop()
    env = Env(tmp_path)
    sock = str(tmp_path / "csi.sock")
    server = GrpcServer(f"unix://{sock}",
                        [lambda s: csi_pb2_grpc.add_NodeServicer_to_server(env.node, s)],
                        ["csi.v1.Node"])
    server.start()
    channel = grpc.insecure_channel(f"unix:{sock}")
    yield env, csi_pb2_grpc.NodeStub(channel)
    channel.close()
    server.stop(0)
    env.loops.cleanup()


def test_over_grpc(served):
    env, stub = served
    dev, _ = env.export()
    info = stub.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert info.node_id == "worker-1" and info.max_volumes_per_node == 7
    assert info.accessible_topology.segments[contract.TOPOLOGY_NODE_KEY] == "worker-1"
    staging, target = env.path("staging"), env.path("pod/vol")
    stub.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=VOL1, publish_context=pc(UUID1), staging_target_path=staging,
        volume_capability=mount_cap()))
    stub.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=VOL1, staging_target_path=staging, target_path=target,
        volume_capability=mount_cap(), readonly=True))
    assert Mounter().mounted_at(target).readonly
    stats = stub.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=VOL1, volume_path=target))
    assert stats.usage[0].total > 0 and not stats.volume_condition.abnormal
    with pytest.raises(grpc.RpcError) as err:
        stub.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=VOL1, staging_target_path=staging, target_path=env.path("b"),
            volume_capability=block_cap()))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as err:
        stub.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(volume_id=VOL1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stub.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=VOL1, target_path=target))
    stub.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=VOL1, staging_target_path=staging))
    assert Mounter().mounted_at(staging) is None
    assert not os.path.exists(target)
