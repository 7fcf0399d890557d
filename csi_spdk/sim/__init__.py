"""SPDK v25.09 JSON-RPC simulator (``csi-spdk sim``); fidelity pinned by spdk-golden/."""

from .dataplane import DataPlane, ListenerInfo, NamespaceInfo, NullDataPlane
from .server import SimServer
from .state import RpcError

__all__ = ["DataPlane", "ListenerInfo", "NamespaceInfo", "NullDataPlane", "RpcError",
           "SimServer"]
