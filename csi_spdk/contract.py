"""The written contract between controller, node and SPDK.

Everything two components must agree on lives here and only here:
volume/snapshot ids, the names the driver gives SPDK objects, NQNs, the
publish_context keys ControllerPublishVolume hands to NodeStageVolume, the
host NQN a node uses, and the topology keys. Change it only compatibly:
volumes created by an older driver must still be deletable.
"""

from __future__ import annotations

import base64
import hashlib
import re
import urllib.parse
import uuid
from dataclasses import dataclass

from .errors import InvalidArgument, NotFound, echo

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
        raise NotFound(f"{kind} {echo(value)} does not exist (not a csi-spdk {kind} id)")
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
# A snapshot's durable CSI facts (source volume, creation time) are the name
# of an empty thin lvol beside it (SPDK keeps no timestamp and no user xattrs
# an RPC can set, and a snapshot cannot be renamed):
# "csim-" + snapshot uuid + source uuid (22 characters of base64url each) +
# creation time in ms (11 hex digits) = 60 <= 63 characters.
SNAPSHOT_META_PREFIX = "csim-"
# A clone CreateVolume has not finished (resize, inflate still to come) is
# marked by an empty thin lvol "csip-" + a digest of the volume's lvol name,
# created before the clone and deleted just before CreateVolume answers. No
# caller ever got a volume that still has one, so a retry that cannot finish it
# (its snapshot was deleted meanwhile) may delete it: it is the driver's own
# leftover, never a user's data.
PENDING_PREFIX = "csip-"
MARKER_PREFIXES = (DELETED_MARK_PREFIX, SNAPSHOT_META_PREFIX, PENDING_PREFIX)
DRIVER_PREFIXES = (VOLUME_PREFIX, VOLUME_HASH_PREFIX, SNAPSHOT_PREFIX, SNAPSHOT_HASH_PREFIX,
                   CLONE_SOURCE_PREFIX, DELETED_MARK_PREFIX, SNAPSHOT_META_PREFIX,
                   PENDING_PREFIX)


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


def pending_lvol_name(volume_lvol: str) -> str:
    """The marker of an unfinished clone whose lvol is named ``volume_lvol``."""
    return PENDING_PREFIX + _digest(volume_lvol)


def _b64(u: str) -> str:
    return base64.urlsafe_b64encode(uuid.UUID(u).bytes).decode().rstrip("=")


def _unb64(text: str) -> str:
    return str(uuid.UUID(bytes=base64.urlsafe_b64decode(text + "==")))


def snapshot_meta_prefix(snapshot_uuid: str) -> str:
    return SNAPSHOT_META_PREFIX + _b64(snapshot_uuid)


def snapshot_meta_lvol_name(snapshot_uuid: str, source_uuid: str, created_ms: int) -> str:
    return f"{snapshot_meta_prefix(snapshot_uuid)}{_b64(source_uuid)}{created_ms:011x}"


def parse_snapshot_meta(lvol_name: str) -> tuple[str, str, int] | None:
    """(snapshot uuid, source uuid, creation ms) of a meta lvol name, else None."""
    rest = lvol_name[len(SNAPSHOT_META_PREFIX):]
    if not lvol_name.startswith(SNAPSHOT_META_PREFIX) or len(rest) != 55:
        return None
    try:
        return _unb64(rest[:22]), _unb64(rest[22:44]), int(rest[44:], 16)
    except ValueError:
        return None


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
MODEL_NUMBER = "csi-spdk volume"  # <= 40 characters (NVMe MN); see model_number()


def subsystem_nqn(lvol_uuid: str) -> str:
    return NQN_PREFIX + lvol_uuid


def serial_number(lvol_uuid: str) -> str:
    """20-character NVMe serial: the uuid's hex without dashes, truncated."""
    return lvol_uuid.replace("-", "")[:20]


# Host identity: the controller puts the NQN derived from the CSI node id into
# the subsystem's allow-list; the node plugin connects with the same NQN and
# host id. Deriving both from the node id makes them agree by construction and
# survive reinstalls (and avoids the all-zero UUID of `nvme gen-hostnqn` in VMs).
# The NQN embeds the node id (percent-encoded, so any id gives a valid NQN:
# "nqn.yyyy-mm.<reverse domain>:" and then any UTF-8, 223 bytes at most), so
# the controller can name the nodes a volume is published to from SPDK alone
# after a restart. A node id too long for that (over ~190 bytes) gets a hash
# form, which is not invertible (its nodes are named from in-memory hints).
# Hosts allowed by drivers before this form (the nvmexpress uuid form) are
# still recognised and removed on unpublish (``legacy_host_nqn``). The host
# id changed with the form: Linux refuses a host id reused with another NQN.
_HOST_NAMESPACE = uuid.UUID("6f0b6a3c-5d0e-4a8e-9a43-0c5d3f1b2a71")
NQN_MAX_BYTES = 223
HOST_NQN_PREFIX = "nqn.2024-11.io.csi-spdk:node:"
HOST_NQN_HASH_PREFIX = "nqn.2024-11.io.csi-spdk:node-sha256:"


def host_id(node_id: str) -> str:
    return str(uuid.uuid5(_HOST_NAMESPACE, "host-id/v2:" + node_id))


def host_nqn(node_id: str) -> str:
    nqn = HOST_NQN_PREFIX + urllib.parse.quote(node_id, safe="")
    if len(nqn.encode()) <= NQN_MAX_BYTES:
        return nqn
    return HOST_NQN_HASH_PREFIX + hashlib.sha256(node_id.encode()).hexdigest()


def node_of_host(nqn: str) -> str | None:
    """The CSI node id a host NQN was derived from, or None (hash/legacy/foreign)."""
    if nqn.startswith(HOST_NQN_PREFIX):
        return urllib.parse.unquote(nqn[len(HOST_NQN_PREFIX):])
    return None


def legacy_host_nqn(node_id: str) -> str:
    """The host NQN drivers before the node-id form used for this node."""
    return f"nqn.2014-08.org.nvmexpress:uuid:{uuid.uuid5(_HOST_NAMESPACE, node_id)}"


# A publish's capability and readonly flag, durably: the subsystem's model
# number (set when the first host's publish creates it, <= 40 ASCII characters)
# says which host it was created for and that publish's signature:
# "csi-spdk <ro|rw> <sig 8 hex> h<host 8 hex>". A re-publish to that host with
# another capability or readonly flag is ALREADY_EXISTS even after a restart.
MODEL_PREFIX = "csi-spdk "


def publish_signature(capability: bytes, readonly: bool) -> str:
    return hashlib.sha256(capability + (b"\x01" if readonly else b"\x00")).hexdigest()[:8]


def model_number(host: str, signature: str, readonly: bool) -> str:
    h = hashlib.sha256(host.encode()).hexdigest()[:8]
    return f"{MODEL_PREFIX}{'ro' if readonly else 'rw'} {signature} h{h}"


def model_signature(model: str, host: str) -> str | None:
    """The signature a model number records for ``host``, or None."""
    parts = model.split(" ")
    if len(parts) != 4 or not model.startswith(MODEL_PREFIX):
        return None
    if parts[3] != "h" + hashlib.sha256(host.encode()).hexdigest()[:8]:
        return None
    return parts[2]


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

# Key rotation in a cluster (docs/DESIGN.md "Re-keying live connections"):
# the volume's Secret keeps the next keys under SECRET_NEXT_PREFIX and says
# in SECRET_ROTATION_STEP (not secret) which pair the target holds: "1" =
# (next host key, current controller key), "2" = (next, next), absent = the
# current pair. The controller moves the target first and the Secret second,
# so a node acting on the Secret (kubelet's republish hands it over) never
# writes a pair the target does not hold. Each node acknowledges the pair its
# live controller holds, as key fingerprints (no key material), in its own
# ConfigMap ACK_CONFIGMAP_PREFIX + <node name> in the driver's namespace:
# data <lvol uuid>: "<host fp>/<controller fp>".
SECRET_NEXT_PREFIX = "next."
SECRET_ROTATION_STEP = "rotationStep"
ROTATION_STEPS = ("1", "2")
ACK_CONFIGMAP_PREFIX = "csi-spdk-node-"
ACK_LABEL = "csi-spdk.io/node-acks"


def key_fingerprint(material: str) -> str:
    """First 8 hex of the key's SHA-256 (what the target's key names carry)."""
    return hashlib.sha256(material.encode()).hexdigest()[:8]


def pair_fingerprint(host_key: str, ctrl_key: str) -> str:
    """The ack ConfigMap's value for a pair."""
    return f"{key_fingerprint(host_key)}/{key_fingerprint(ctrl_key) if ctrl_key else ''}"


def ack_configmap_name(node: str) -> str:
    return ACK_CONFIGMAP_PREFIX + node


def rotation_pair(secrets: dict[str, str]) -> tuple[str, str]:
    """The DH-HMAC-CHAP pair the target holds, read from the volume's Secret
    data (the current pair, or the next keys as its rotation step says).
    INVALID_ARGUMENT (never a value) when the step needs keys that are missing."""
    step = (secrets.get(SECRET_ROTATION_STEP) or "").strip()
    host = (secrets.get(SECRET_DHCHAP_KEY) or "").strip()
    ctrl = (secrets.get(SECRET_DHCHAP_CTRL_KEY) or "").strip()
    if not step:
        return host, ctrl
    if step not in ROTATION_STEPS:
        raise InvalidArgument(f"secret {SECRET_ROTATION_STEP!r} is {step!r}: expected "
                              f"{' or '.join(ROTATION_STEPS)} (or absent)")
    nxt_host = (secrets.get(SECRET_NEXT_PREFIX + SECRET_DHCHAP_KEY) or "").strip()
    nxt_ctrl = (secrets.get(SECRET_NEXT_PREFIX + SECRET_DHCHAP_CTRL_KEY) or "").strip()
    if not nxt_host or (step == "2" and ctrl and not nxt_ctrl):
        raise InvalidArgument(f"secret {SECRET_ROTATION_STEP!r} is {step} but the next keys "
                              f"({SECRET_NEXT_PREFIX}{SECRET_DHCHAP_KEY}, "
                              f"{SECRET_NEXT_PREFIX}{SECRET_DHCHAP_CTRL_KEY}) are missing")
    return nxt_host, (nxt_ctrl if step == "2" else ctrl)

# Encryption at rest (StorageClass parameter ``encryption``, issue #16):
# ``node`` = LUKS2 on the node between the namespace and the filesystem/block
# device; ``target`` = SPDK's AES-XTS crypto bdev stacked on the lvol and
# exported instead of it. One key per volume, 64 random bytes as 128 hex
# digits (AES-XTS-256: key = first half, key2 = second half; for LUKS2 the
# text is the passphrase), in the volume's Secret under SECRET_ENCRYPTION_KEY
# (never in a context). The Secret also says the volume's mode.
ENCRYPTION_NONE, ENCRYPTION_NODE, ENCRYPTION_TARGET = "none", "node", "target"
ENCRYPTION_MODES = (ENCRYPTION_NONE, ENCRYPTION_NODE, ENCRYPTION_TARGET)
SECRET_ENCRYPTION_KEY = "encryptionKey"
SECRET_ENCRYPTION_MODE = "encryptionMode"
ENCRYPTION_KEY_HEX = 128
# SPDK objects of target mode: the crypto bdev "csie-<lvol uuid>" and its
# accel key "csie-<lvol uuid>-<8 hex of the key's SHA-256>".
CRYPTO_PREFIX = "csie-"


def crypto_bdev_name(lvol_uuid: str) -> str:
    return CRYPTO_PREFIX + lvol_uuid


def crypto_key_name(lvol_uuid: str, material: str) -> str:
    return f"{CRYPTO_PREFIX}{lvol_uuid}-{hashlib.sha256(material.encode()).hexdigest()[:8]}"


def lvol_of_crypto_bdev(name: str) -> str | None:
    """The lvol uuid a crypto bdev or key name is for, else None."""
    rest = name[len(CRYPTO_PREFIX):len(CRYPTO_PREFIX) + 36]
    return rest if name.startswith(CRYPTO_PREFIX) and _UUID.match(rest) else None


# volume_context keys (CreateVolume -> everything after it).
VC_TARGET = "target"
VC_LVSTORE = "lvstore"
VC_LVOL_UUID = "lvolUuid"
VC_THIN = "thinProvision"
VC_AUTH = "auth"            # StorageClass auth: dhchap / tls / none
VC_FS_TYPE = "fsType"       # StorageClass fsType; used when the capability names none
VC_ENCRYPTION = "encryption"   # none / node / target (absent: none)
# The rate limits SPDK enforces on the volume (bdev_get_bdevs
# assigned_rate_limits, read when the answer is built: CreateVolume,
# ControllerGetVolume, ListVolumes), by SPDK key; present only when that limit
# is on. Named like the StorageClass/VolumeAttributesClass parameters. The
# PV's copy is CreateVolume's; ControllerGetVolume has the current ones.
VC_QOS_KEYS = {
    "rw_ios_per_sec": "maxIOPS",            # read+write IOs per second
    "rw_mbytes_per_sec": "maxMBps",         # read+write MiB per second
    "r_mbytes_per_sec": "maxReadMBps",      # read MiB per second
    "w_mbytes_per_sec": "maxWriteMBps",     # write MiB per second
}

# --- topology ------------------------------------------------------------------------
TOPOLOGY_DOMAIN = "topology.csi-spdk.io"
TOPOLOGY_NODE_KEY = f"{TOPOLOGY_DOMAIN}/node"      # value: CSI node id
# Node SSD classes: "<TOPOLOGY_SSD_PREFIX><vendor>-<model class>" = "true".
TOPOLOGY_SSD_PREFIX = "ssd.csi-spdk.io/"
