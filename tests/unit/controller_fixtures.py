"""Fixtures for the controller tests: SPDK targets with a fresh lvstore each.

Backends, in order of preference:
- ``CSI_SPDK_TEST_RPC`` names a real spdk_tgt socket: every "target" is that
  spdk_tgt with its own uniquely named malloc bdev + lvstore (cleaned up);
- the simulator server (``csi_spdk.sim.server.SimServer``) on a socket in tmp;
- the simulator's method table in-process (only until the server exists).

The controller reaches each target through a storage agent (``csi-spdk
agent``, in-process, on a Unix socket) as in ``dev`` and the chart, unless
``CSI_SPDK_TEST_AGENT=0`` (or ``make_env(agent=False)``) makes it use the SPDK
socket directly.

``FlakyApi`` wraps an ``SpdkApi`` and fails the N-th mutating call, to test a
crash between any two SPDK calls.
"""

from __future__ import annotations

import contextlib
import os
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path

from csi_spdk import contract
from csi_spdk.controller import config as cfgmod
from csi_spdk.controller.auth import VolumeKeys
from csi_spdk.controller.service import ControllerServicer
from csi_spdk.proto import csi_pb2
from csi_spdk.spdk.api import SpdkApi
from csi_spdk.spdk.client import SpdkClient
from csi_spdk.spdk.errors import SpdkError, from_response

MiB = 1024 * 1024
GiB = 1024 * MiB
REAL_RPC = os.environ.get("CSI_SPDK_TEST_RPC", "")
THROUGH_AGENT = os.environ.get("CSI_SPDK_TEST_AGENT", "1") not in ("0", "false", "no")
# a real target's first NVMe/TCP port (4420 on 127.0.0.1 may be another target's)
NVMF_PORT = int(os.environ.get("CSI_SPDK_TEST_NVMF_PORT") or 4420)

MUTATING = ("create", "delete", "resize", "snapshot", "clone", "rename", "add", "remove")


class InProcClient:
    """SpdkClient look-alike that runs the simulator's method table in-process."""

    def __init__(self, state, address: str = "inproc") -> None:
        self.state = state
        self.address = address

    def call(self, method, params=None, timeout=None):
        import json

        from csi_spdk.sim.methods import call
        from csi_spdk.sim.state import RpcError
        try:
            result = call(self.state, method, json.loads(json.dumps(params)))
        except RpcError as err:
            raise from_response(method, {"code": err.code, "message": err.message}) from None
        return json.loads(json.dumps(result))

    def close(self) -> None:
        pass


class Crash(SpdkError):
    """The injected failure (looks like an SPDK error to the controller)."""

    def __init__(self, method: str) -> None:
        super().__init__(method, -32603, "injected crash")


class FlakyApi(SpdkApi):
    """Raise ``Crash`` instead of the ``fail_at``-th mutating call (1-based)."""

    def __init__(self, client) -> None:
        super().__init__(client)
        self.fail_at = 0
        self.count = 0
        self.log: list[str] = []

    def call(self, method, params=None, timeout=None, **kw):
        if any(w in method for w in MUTATING) and method != "bdev_get_bdevs":
            self.count += 1
            if self.fail_at and self.count == self.fail_at:
                raise Crash(method)
        self.log.append(method)
        return super().call(method, params, timeout, **kw)

    def arm(self, n: int) -> None:
        self.fail_at, self.count = n, 0

    @property
    def remote_intents(self) -> bool:
        """Through an agent the intents run there (one round trip), except
        while a failure is armed: then here, so every SPDK call is counted
        and the N-th can fail in between the intent's steps."""
        return not self.fail_at and super().remote_intents


@dataclass
class TargetEnv:
    name: str
    lvs: str
    malloc: str
    raw: SpdkApi            # direct access for assertions
    api: FlakyApi           # what the controller uses
    rpc: str
    server: object = None


@dataclass
class Env:
    servicer: ControllerServicer
    config: cfgmod.Config
    targets: dict[str, TargetEnv]
    cleanups: list = field(default_factory=list)
    secrets: MemorySecrets | None = None
    through_agent: bool = False   # the controller reaches the targets through agents

    @property
    def t0(self) -> TargetEnv:
        return next(iter(self.targets.values()))

    def close(self) -> None:
        for fn in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                fn()


def sim_server_available() -> bool:
    try:
        import csi_spdk.sim.server  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _start_backend(tmp: Path, idx: int, env: Env):
    """Return (rpc address, client) for one target's SPDK."""
    if REAL_RPC:
        return REAL_RPC, SpdkClient(REAL_RPC, timeout=30), None
    if sim_server_available():
        from csi_spdk.sim.server import SimServer
        sock = str(tmp / f"spdk{idx}.sock")
        server = SimServer(sock, str(tmp / f"data{idx}"))
        server.start()
        env.cleanups.append(server.stop)
        return sock, SpdkClient(sock, timeout=30), server
    from csi_spdk.sim.state import SimState
    state = SimState(tmp / f"data{idx}")
    return f"unix://{tmp}/inproc{idx}.sock", InProcClient(state), None


def _start_agent(rpc: str, env: Env) -> str:
    """An agent over ``rpc`` on a short-path Unix socket; returns its address."""
    import shutil
    import tempfile

    from agent_fixtures import start_agent
    sock_dir = Path(tempfile.mkdtemp(prefix="csi-agent-", dir="/tmp"))
    env.cleanups.append(lambda: shutil.rmtree(sock_dir, ignore_errors=True))
    agent = start_agent(rpc.removeprefix("unix://"), sock_dir / "state",
                        f"unix://{sock_dir}/agent.sock")
    env.cleanups.append(agent.stop)
    return agent.address


def make_env(tmp: Path, n_targets: int = 1, lvs_mib: int = 256, cluster_mib: int = 1,
             ratio: float = 2.0, nodes: list[str] | None = None,
             topology: list[dict] | None = None, default_size: int = 16 * MiB,
             n_lvstores: int = 1, agent: bool | None = None) -> Env:
    env = Env(servicer=None, config=None, targets={})  # type: ignore[arg-type]
    agent = THROUGH_AGENT if agent is None else agent
    env.through_agent = agent
    raw_targets = []
    suffix = uuidlib.uuid4().hex[:8]
    for i in range(n_targets):
        name = f"t{i}-{suffix}" if REAL_RPC else f"target-{chr(97 + i)}"
        rpc, client, server = _start_backend(tmp, i, env)
        raw = SpdkApi(client)
        lvs_names = []
        for j in range(n_lvstores):
            malloc = f"csitest{suffix}m{i}x{j}"
            lvs = f"csitest{suffix}l{i}x{j}" if REAL_RPC else f"lvs{j}"
            raw.malloc_create(malloc, lvs_mib * MiB)
            raw.lvstore_create(malloc, lvs, cluster_sz=cluster_mib * MiB)
            lvs_names.append(lvs)
            env.cleanups.append(lambda r=raw, m=malloc: r.call("bdev_malloc_delete", {"name": m}))
            env.cleanups.append(lambda r=raw, lv=lvs: _wipe_lvstore(r, lv))
        local = rpc if rpc.startswith("unix") else f"unix://{rpc}"
        reach: dict = {"rpc": local}
        if agent and not isinstance(client, InProcClient):
            from csi_spdk.spdk.agent_client import AgentClient
            address = _start_agent(rpc, env)
            client = AgentClient(address, timeout=30, name=name)
            env.cleanups.append(client.close)
            reach = {"agent": {"address": address}}
        api = FlakyApi(client)
        env.targets[name] = TargetEnv(name, lvs_names[0], f"csitest{suffix}m{i}x0", raw, api,
                                      rpc, server)
        t: dict = {"name": name, **reach,
                   "nvmf": {"listenAddress": "127.0.0.1", "port": NVMF_PORT + i,
                            "dialAddress": "10.0.2.2"},
                   "lvstores": lvs_names}
        if nodes and i < len(nodes) and nodes[i]:
            t["node"] = nodes[i]
        if topology and i < len(topology):
            t["topology"] = topology[i]
        raw_targets.append(t)
    env.config = cfgmod.parse({"targets": raw_targets, "thinOvercommitRatio": ratio,
                               "defaultVolumeSize": default_size,
                               "auth": {"keyDir": str(tmp / "keys")},
                               "encryption": {"keyDir": str(tmp / "volume-keys")}})
    env.secrets = MemorySecrets()
    env.servicer = ControllerServicer(env.config, "csi-spdk.io",
                                      apis={n: t.api for n, t in env.targets.items()},
                                      secret_store=env.secrets)
    return env


class MemorySecrets:
    """A SecretStore (controller/auth.py) in a dict: what KubernetesSecrets
    keeps in the API server, for tests without one."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[str, VolumeKeys]] = {}   # lvol uuid -> (name, keys)

    def create(self, lvol_uuid: str, volume_name: str, keys: VolumeKeys) -> VolumeKeys:
        return self.data.setdefault(lvol_uuid, (volume_name, keys))[1]

    def get(self, lvol_uuid: str) -> VolumeKeys | None:
        found = self.data.get(lvol_uuid)
        return found[1] if found else None

    def delete(self, lvol_uuid: str) -> None:
        self.data.pop(lvol_uuid, None)
        self.next.pop(lvol_uuid, None)

    # rotation (controller/rotate.py), as KubernetesSecrets keeps next.* keys
    @property
    def next(self) -> dict[str, VolumeKeys]:
        return self.__dict__.setdefault("_next", {})

    def pending(self, lvol_uuid: str) -> VolumeKeys | None:
        return self.next.get(lvol_uuid)

    def set_pending(self, lvol_uuid: str, keys: VolumeKeys) -> VolumeKeys:
        return self.next.setdefault(lvol_uuid, keys)

    @property
    def steps(self) -> dict[str, int]:
        return self.__dict__.setdefault("_steps", {})

    def set_step(self, lvol_uuid: str, step: int) -> None:
        self.steps[lvol_uuid] = step

    def commit(self, lvol_uuid: str) -> None:
        if lvol_uuid in self.next:
            name = self.data[lvol_uuid][0]
            self.data[lvol_uuid] = (name, self.next.pop(lvol_uuid))
        self.steps.pop(lvol_uuid, None)

    def secret_data(self, lvol_uuid: str) -> dict[str, str]:
        """The Secret's data as kubelet hands it to a node (KubernetesSecrets'
        layout: the keys, ``next.*`` and ``rotationStep``)."""
        out = dict(self.data[lvol_uuid][1].secrets())
        if lvol_uuid in self.next:
            out.update({contract.SECRET_NEXT_PREFIX + k: v
                        for k, v in self.next[lvol_uuid].secrets().items()})
        if lvol_uuid in self.steps:
            out[contract.SECRET_ROTATION_STEP] = str(self.steps[lvol_uuid])
        return out


def _wipe_lvstore(raw: SpdkApi, lvs: str) -> None:
    """Delete every subsystem of the lvstore's lvols and their keyring keys
    (a test that ends with a volume published leaves them; on a shared real
    target the next test would find them), then the lvols, then lvs."""
    lvols = raw.lvols(lvs)
    for lv in lvols:
        with contextlib.suppress(SpdkError):
            raw.subsystem_delete(contract.subsystem_nqn(lv["uuid"]))
    owned = tuple(f"csik-{lv['uuid']}-" for lv in lvols)
    with contextlib.suppress(SpdkError):
        for key in raw.keyring_keys():
            if owned and key.get("name", "").startswith(owned):
                with contextlib.suppress(SpdkError):
                    raw.call("keyring_file_remove_key", {"name": key["name"]})
    for _ in range(10):
        lvols = raw.lvols(lvs)
        if not lvols:
            break
        for lv in lvols:
            with contextlib.suppress(SpdkError):
                raw.lvol_delete(lv["uuid"])
    with contextlib.suppress(SpdkError):
        raw.call("bdev_lvol_delete_lvstore", {"lvs_name": lvs})


# --- request builders -----------------------------------------------------------
Mode = csi_pb2.VolumeCapability.AccessMode


def mount_cap(mode=Mode.SINGLE_NODE_WRITER, fs: str = "ext4") -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))


def block_cap(mode=Mode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))


def create_req(name: str, size: int = 0, limit: int = 0, caps=None, params=None,
               snapshot: str = "", volume: str = "", requisite=None, preferred=None):
    req = csi_pb2.CreateVolumeRequest(
        name=name, volume_capabilities=caps or [mount_cap()], parameters=params or {})
    if size or limit:
        req.capacity_range.required_bytes = size
        req.capacity_range.limit_bytes = limit
    if snapshot:
        req.volume_content_source.snapshot.snapshot_id = snapshot
    if volume:
        req.volume_content_source.volume.volume_id = volume
    for seg in requisite or []:
        req.accessibility_requirements.requisite.add(segments=seg)
    for seg in preferred or []:
        req.accessibility_requirements.preferred.add(segments=seg)
    return req


def publish_req(volume_id: str, node: str, cap=None, readonly: bool = False):
    return csi_pb2.ControllerPublishVolumeRequest(
        volume_id=volume_id, node_id=node, volume_capability=cap or mount_cap(),
        readonly=readonly)


class RpcFailure(Exception):
    def __init__(self, code, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class FakeContext:
    """What the @rpc decorator needs from a grpc.ServicerContext."""

    def abort(self, code, message):
        raise RpcFailure(code, message)


def call(servicer, method: str, request):
    return getattr(servicer, method)(request, FakeContext())


def expect_code(code, servicer, method: str, request) -> str:
    try:
        call(servicer, method, request)
    except RpcFailure as err:
        assert err.code == code, f"{method}: expected {code.name}, got {err}"
        return err.message
    raise AssertionError(f"{method}: expected {code.name}, got success")


def uuid_of(volume_id: str) -> str:
    """The lvol uuid in a volume or snapshot id (``<target>:<uuid>``)."""
    return volume_id.split(":", 1)[1]
