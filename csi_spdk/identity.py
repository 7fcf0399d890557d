"""CSI Identity service, shared by the controller and the node plugin.

Plugin capabilities describe the driver as a whole, not one process: the node
plugin of a csi-spdk deployment advertises CONTROLLER_SERVICE too, because the
plugin has one (csi-sanity and other COs read them from the node endpoint).
``controller=False`` is for a deployment without any controller. Online volume
expansion is advertised everywhere (the controller grows the lvol while it is published,
the node grows the file system while it is mounted).

Probe is ready only when ``ready()`` says so (for the controller:
``ControllerServicer.ready``); not being ready is ``ready=false``,
never an error. Concurrency: stateless apart from ``ready``; every RPC is
idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from google.protobuf import wrappers_pb2

from . import __version__
from .locks import KeyedLocks
from .proto import csi_pb2, csi_pb2_grpc
from .rpc import rpc

log = logging.getLogger("csi_spdk.identity")

_PluginCap = csi_pb2.PluginCapability


class IdentityServicer(csi_pb2_grpc.IdentityServicer):
    """``IdentityServicer(driver_name, controller=..., node=..., ready=None)``.

    ``controller`` / ``node``: the servicers served next to it (or booleans).
    CONTROLLER_SERVICE is advertised when ``controller`` is truthy; Probe is
    ready when ``ready()`` and every given servicer's ``ready()`` (if it has
    one) say so.
    """

    def __init__(self, driver_name: str, *, controller: object = False,
                 node: object = None, topology: bool = True, online_expansion: bool = True,
                 ready: Callable[[], bool] | None = None,
                 version: str = __version__) -> None:
        if not driver_name:
            raise ValueError("driver name must not be empty")
        self.locks = KeyedLocks()
        self.driver_name = driver_name
        self.version = version
        self.controller = bool(controller)
        self.topology = topology
        self.online_expansion = online_expansion
        checks = [ready] if ready else []
        for svc in (controller, node):
            check = getattr(svc, "ready", None)
            if callable(check):
                checks.append(check)
        self.ready = lambda: all(c() for c in checks)

    @rpc(quiet=True)
    def GetPluginInfo(self, request, context):
        return csi_pb2.GetPluginInfoResponse(name=self.driver_name,
                                             vendor_version=self.version)

    @rpc(quiet=True)
    def GetPluginCapabilities(self, request, context):
        caps = []
        if self.controller:
            caps.append(_PluginCap(service=_PluginCap.Service(
                type=_PluginCap.Service.CONTROLLER_SERVICE)))
        if self.topology:
            caps.append(_PluginCap(service=_PluginCap.Service(
                type=_PluginCap.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)))
        if self.online_expansion:
            caps.append(_PluginCap(volume_expansion=_PluginCap.VolumeExpansion(
                type=_PluginCap.VolumeExpansion.ONLINE)))
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=caps)

    @rpc(quiet=True)
    def Probe(self, request, context):
        try:
            ok = bool(self.ready())
        except Exception:  # noqa: BLE001 - a probe reports, it does not fail
            log.exception("probe failed")
            ok = False
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=ok))
