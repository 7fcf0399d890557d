"""The written contract between controller, node and SPDK.

Everything two components must agree on lives here and only here:
volume/snapshot ids, the names the driver gives SPDK objects, NQNs, the
publish_context keys ControllerPublishVolume hands to NodeStageVolume, the
host NQN a node uses, and the topology keys. Change it only compatibly:
volumes created by an older driver must still be deletable.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass

from .errors import InvalidArgument, NotFound

# --- volume and snapshot ids -------------------------------------------------
# "<target>:<lvol uuid>": DeleteVolume goes straight to the right target and
# lvol without scanning. Target names are DNS labels, so ':' cannot occur in
# them. Snapshot ids use the same form (a snapshot is an lvol too).
_TARGET_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass(frozen=True)
class ObjectId:
    target: str
    lvol_uuid: str

    def __str__(self) -> str:
        return f"{self.target}:{self.lvol_uuid}"


def valid_target_name(name: str) -> bool:
    return bool(_TARGET_NAME.match(name))


def parse_id(value: str, kind: str = "volume") -> ObjectId:
    """Parse a volume/snapshot id. A malformed id cannot name an existing
    object, so it is NOT_FOUND (what csi-sanity and the sidecars expect)."""
    if not value:
        raise InvalidArgument(f"{kind} id is required")
    target, sep, lvol_uuid = value.partition(":")
    if not sep or not valid_target_name(target) or not _UUID.match(lvol_uuid):
        raise NotFound(f"{kind} {value!r} does not exist (not a csi-spdk {kind} id)")
    return ObjectId(target, lvol_uuid)


# --- names of SPDK objects ------------------------------------------------------
# lvol names are at most 63 characters. A CSI name that fits and uses only safe
# characters is kept readable ("csi-pvc-<uuid>"); anything else is hashed
# ("csih-<sha256>"). The prefixes mark what the driver owns: it never deletes
# an lvol without one of them. Snapshots and driver-managed objects get their
# own prefixes so they never collide with volumes of the same name.
LVOL_NAME_MAX = 63
_SAFE = re.compile(r"^[A-Za-z0-9._-]+$")
VOLUME_PREFIX, VOLUME_HASH_PREFIX = "csi-", "csih-"
SNAPSHOT_PREFIX, SNAPSHOT_HASH_PREFIX = "csis-", "csish-"
# A snapshot the driver takes to clone a volume from a volume source; named
# after the *new* volume's CSI name so a retried CreateVolume finds it.
CLONE_SOURCE_PREFIX = "csic-"
# A user-deleted snapshot that SPDK cannot delete yet (two or more clones) is
# marked by an empty thin lvol named this prefix + the snapshot's uuid: SPDK
# refuses to rename a snapshot (read-only blob, -32602 "Operation not
# permitted"), so the mark cannot be on the snapshot itself. A marked snapshot
# is gone for CSI and is deleted, then its marker, once at most one clone is left.
DELETED_MARK_PREFIX = "csid-"
DRIVER_PREFIXES = (VOLUME_PREFIX, VOLUME_HASH_PREFIX, SNAPSHOT_PREFIX, SNAPSHOT_HASH_PREFIX,
                   CLONE_SOURCE_PREFIX, DELETED_MARK_PREFIX)


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:48]


def _lvol_name(name: str, prefix: str, hash_prefix: str) -> str:
    if _SAFE.match(name) and len(prefix) + len(name) <= LVOL_NAME_MAX:
        return prefix + name
    return hash_prefix + _digest(name)


def volume_lvol_name(csi_name: str) -> str:
    return _lvol_name(csi_name, VOLUME_PREFIX, VOLUME_HASH_PREFIX)


def snapshot_lvol_name(csi_name: str) -> str:
    return _lvol_name(csi_name, SNAPSHOT_PREFIX, SNAPSHOT_HASH_PREFIX)


def clone_source_lvol_name(new_volume_csi_name: str) -> str:
    return CLONE_SOURCE_PREFIX + _digest(new_volume_csi_name)


def deleted_mark_lvol_name(snapshot_uuid: str) -> str:
    return DELETED_MARK_PREFIX + snapshot_uuid


def is_driver_lvol(lvol_name: str) -> bool:
    return lvol_name.startswith(DRIVER_PREFIXES)


def is_volume_lvol(lvol_name: str) -> bool:
    return lvol_name.startswith((VOLUME_PREFIX, VOLUME_HASH_PREFIX))


def is_snapshot_lvol(lvol_name: str) -> bool:
    return lvol_name.startswith((SNAPSHOT_PREFIX, SNAPSHOT_HASH_PREFIX))


# --- NVMe-oF ---------------------------------------------------------------------
# One subsystem per volume. The NQN, serial and model are all derived from the
# lvol uuid so the node can find the namespace and the controller can find the
# subsystem without any lookup table.
NQN_PREFIX = "nqn.2024-11.io.csi-spdk:vol:"
MODEL_NUMBER = "csi-spdk volume"  # <= 40 characters (NVMe MN)


def subsystem_nqn(lvol_uuid: str) -> str:
    return NQN_PREFIX + lvol_uuid


def serial_number(lvol_uuid: str) -> str:
    """20-character NVMe serial: the uuid's hex without dashes, truncated."""
    return lvol_uuid.replace("-", "")[:20]


# Host identity: the controller puts the NQN derived from the CSI node id into
# the subsystem's allow-list; the node plugin connects with the same NQN and
# host id. Deriving both from the node id makes them agree by construction and
# survive reinstalls (and avoids the all-zero UUID of `nvme gen-hostnqn` in VMs).
_HOST_NAMESPACE = uuid.UUID("6f0b6a3c-5d0e-4a8e-9a43-0c5d3f1b2a71")


def host_id(node_id: str) -> str:
    return str(uuid.uuid5(_HOST_NAMESPACE, node_id))


def host_nqn(node_id: str) -> str:
    return f"nqn.2014-08.org.nvmexpress:uuid:{host_id(node_id)}"


# publish_context keys (ControllerPublishVolume -> NodeStageVolume/Publish).
PC_NQN = "nqn"              # subsystem NQN
PC_TRTYPE = "trtype"        # "tcp"
PC_TRADDR = "traddr"        # the address clients dial (target's dial_address)
PC_TRSVCID = "trsvcid"      # port, as a string
PC_ADRFAM = "adrfam"        # "ipv4" or "ipv6"
PC_NS_UUID = "nsUuid"       # namespace uuid == lvol uuid
PC_SERIAL = "serial"        # subsystem serial number
PC_READONLY = "readonly"    # "true" when published read-only (absent otherwise)
PC_AUTH = "auth"            # what the target enforces: "dhchap", "tls" (absent: none)
PUBLISH_CONTEXT_KEYS = (PC_NQN, PC_TRTYPE, PC_TRADDR, PC_TRSVCID, PC_ADRFAM, PC_NS_UUID,
                        PC_SERIAL)

# Data-path authentication (StorageClass parameter ``auth``). The keys travel
# ONLY as node-stage secrets (kubelet reads the Secret named by the PV's
# nodeStageSecretRef for volumes of Pods on that node): never in
# publish_context or volume_context.
AUTH_DHCHAP, AUTH_TLS, AUTH_NONE = "dhchap", "tls", "none"
AUTH_MODES = (AUTH_DHCHAP, AUTH_TLS, AUTH_NONE)
SECRET_DHCHAP_KEY = "dhchapKey"          # DHHC-1:... the host's secret
SECRET_DHCHAP_CTRL_KEY = "dhchapCtrlKey"  # DHHC-1:... the controller's (bidirectional)
SECRET_TLS_PSK = "tlsPsk"                # NVMeTLSkey-1:... configured PSK
SECRET_KEYS = (SECRET_DHCHAP_KEY, SECRET_DHCHAP_CTRL_KEY, SECRET_TLS_PSK)

# volume_context keys (CreateVolume -> everything after it).
VC_TARGET = "target"
VC_LVSTORE = "lvstore"
VC_LVOL_UUID = "lvolUuid"
VC_THIN = "thinProvision"
VC_AUTH = "auth"            # StorageClass auth: dhchap / tls / none
VC_FS_TYPE = "fsType"       # StorageClass fsType; used when the capability names none

# --- topology ------------------------------------------------------------------------
TOPOLOGY_DOMAIN = "topology.csi-spdk.io"
TOPOLOGY_NODE_KEY = f"{TOPOLOGY_DOMAIN}/node"      # value: CSI node id
# Node SSD classes: "<TOPOLOGY_SSD_PREFIX><vendor>-<model class>" = "true".
TOPOLOGY_SSD_PREFIX = "ssd.csi-spdk.io/"
