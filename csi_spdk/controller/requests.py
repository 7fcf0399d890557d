"""Request validation shared by the Controller RPCs: capabilities, StorageClass
parameters, capacity ranges. Pure functions; every problem is a CsiError with
the gRPC code the CSI spec asks for and a message naming the offending field."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .. import contract
from ..errors import InvalidArgument, OutOfRange, echo, require
from ..proto import csi_pb2
from . import dhchap_strength, qos
from .auth import parse_auth
from .config import Config
from .encryption import parse_mode

_Mode = csi_pb2.VolumeCapability.AccessMode
SINGLE_NODE_MODES = frozenset({_Mode.SINGLE_NODE_WRITER, _Mode.SINGLE_NODE_READER_ONLY,
                               _Mode.SINGLE_NODE_SINGLE_WRITER, _Mode.SINGLE_NODE_MULTI_WRITER})
FS_TYPES = ("ext4", "xfs")
# Smallest device each filesystem's mkfs accepts: xfsprogs >= 5.19 refuses
# data sections under 300 MiB. A mount volume is rounded up to this so that
# NodeStageVolume cannot fail on a size the controller chose.
FS_MIN_BYTES = {"xfs": 300 * 1024 * 1024}
CLEAR_METHODS = ("none", "unmap", "write_zeroes")
IMMUTABLE_KEYS = ("target", "lvstore", "thinProvision", "clearMethod", "fsType", "auth",
                  *dhchap_strength.PARAM_KEYS, "encryption")
PARAM_KEYS = IMMUTABLE_KEYS + qos.MUTABLE_KEYS
K8S_PARAM_PREFIX = "csi.storage.k8s.io/"


def _mode_name(mode: int) -> str:
    """The enum name, or the number for a value this proto does not know."""
    try:
        return _Mode.Mode.Name(mode)
    except ValueError:
        return f"{mode} (unknown)"


def capability_problem(cap: csi_pb2.VolumeCapability) -> str | None:
    """Why a capability is unsupported, or None when it is supported."""
    kind = cap.WhichOneof("access_type")
    if kind is None:
        return "volume capability needs an access type (block or mount)"
    mode = cap.access_mode.mode
    if mode == _Mode.MULTI_NODE_MULTI_WRITER and kind != "block":
        return "MULTI_NODE_MULTI_WRITER is supported for block volumes only"
    if mode not in SINGLE_NODE_MODES | {_Mode.MULTI_NODE_READER_ONLY,
                                        _Mode.MULTI_NODE_MULTI_WRITER}:
        return f"access mode {_mode_name(mode)} is not supported"
    if kind == "mount" and cap.mount.fs_type and cap.mount.fs_type not in FS_TYPES:
        return f"fs_type {echo(cap.mount.fs_type)} is not supported (use {' or '.join(FS_TYPES)})"
    return None


def check_capabilities(caps) -> None:
    require(caps, "volume_capabilities")
    for cap in caps:
        problem = capability_problem(cap)
        if problem:
            raise InvalidArgument(problem)


def filesystem_floor(caps, params_fs: str) -> tuple[str, int]:
    """(fs type, smallest size it can be made on) for the mount capabilities
    of a request; ("", 0) for block-only requests or filesystems without one."""
    for cap in caps:
        if cap.WhichOneof("access_type") == "mount":
            fs = cap.mount.fs_type or params_fs
            if fs in FS_MIN_BYTES:
                return fs, FS_MIN_BYTES[fs]
    return "", 0


def is_single_node(cap: csi_pb2.VolumeCapability) -> bool:
    return cap.access_mode.mode in SINGLE_NODE_MODES


@dataclass(frozen=True)
class VolumeParams:
    target: str = ""
    lvstore: str = ""
    thin: bool = False
    clear_method: str = ""
    fs_type: str = ""
    qos: qos.Limits = field(default_factory=dict)   # the four limits, SPDK keys (qos.py)
    thin_set: bool = False   # thinProvision was given explicitly
    auth: str = contract.AUTH_DHCHAP   # data-path auth (controller/auth.py)
    # weakest DH-HMAC-CHAP digest / DH group (controller/dhchap_strength.py)
    dhchap: dhchap_strength.Strength = field(default_factory=dhchap_strength.Strength)
    encryption: str = contract.ENCRYPTION_NONE   # at rest (controller/encryption.py)


def parse_params(params: Mapping[str, str], config: Config,
                 mutable: Mapping[str, str] | None = None) -> VolumeParams:
    """StorageClass parameters (docs/DESIGN.md) and, from a VolumeAttributesClass,
    ``mutable`` ones (QoS keys only; they win over the same keys in ``params``).
    Unknown keys and bad values are INVALID_ARGUMENT."""
    for key in params:
        if key not in PARAM_KEYS and not key.startswith(K8S_PARAM_PREFIX):
            raise InvalidArgument(f"unknown parameter {echo(key)}; accepted: "
                                  f"{', '.join(PARAM_KEYS)} and {K8S_PARAM_PREFIX}*")
    target = params.get("target", "")
    if target and config.target(target) is None:
        raise InvalidArgument(f"parameter target={echo(target)} is not a configured target "
                              f"({', '.join(config.target_names)})")
    thin = params.get("thinProvision", "false").lower()
    if thin not in ("true", "false"):
        raise InvalidArgument(f"parameter thinProvision={echo(params['thinProvision'])} "
                              "must be true or false")
    clear = params.get("clearMethod", "")
    if clear and clear not in CLEAR_METHODS:
        raise InvalidArgument(f"parameter clearMethod={echo(clear)} must be one of "
                              f"{', '.join(CLEAR_METHODS)}")
    fs = params.get("fsType", "")
    if fs and fs not in FS_TYPES:
        raise InvalidArgument(f"parameter fsType={echo(fs)} must be one of {', '.join(FS_TYPES)}")
    limits = qos.parse(params) | qos.parse_mutable(mutable or {}, IMMUTABLE_KEYS)
    auth = parse_auth(dict(params), config.auth.default_mode)
    return VolumeParams(target, params.get("lvstore", ""), thin == "true", clear, fs,
                        qos.full(limits), thin_set="thinProvision" in params, auth=auth,
                        dhchap=dhchap_strength.parse(dict(params), auth),
                        encryption=parse_mode(dict(params)))


def capacity_range(req) -> tuple[int, int]:
    required, limit = req.capacity_range.required_bytes, req.capacity_range.limit_bytes
    if required < 0 or limit < 0:
        raise OutOfRange("capacity_range bytes must not be negative")
    if limit and required > limit:
        raise OutOfRange(f"required_bytes {required} exceeds limit_bytes {limit}")
    return required, limit


def segments_of(topologies) -> list[dict[str, str]]:
    return [dict(t.segments) for t in topologies]
