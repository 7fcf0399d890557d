"""Intent-level storage operations (Mayastor style), written once for both sides.

A CSI call used to be a chain of serial SPDK calls, each a round trip that
costs spdk_tgt's RPC poller 4-8 ms (docs/DESIGN.md "Round trips"). An intent
does one CSI-level thing with the fewest serial rounds SPDK allows, sending
independent calls together on separate connections (SPDK reads every
connection in the same poll), and only reads state when a write says the
object is already there:

- ``create_lvol``: the create itself; a look-up only on EEXIST (1 round).
- ``export``: the subsystem (with the lvol look-up beside it), then
  namespace, listener and host together (2 rounds; 3 when it existed).
- ``unexport``: read the subsystem, then remove the host or delete the
  subsystem when it was the last (2 rounds); what it read says whether a
  target-mode crypto bdev was exported (``stacked``), so an unencrypted
  volume needs no crypto look-up afterwards.
- ``delete_volume``: the lvol and its subsystem read together, then the
  delete (2 rounds; 3 when a host-less subsystem holds it open).

The same code runs in the controller over a direct socket and inside the
storage agent (``agent/server.py``), so a CSI call through the agent is ONE
controller->agent round trip with the fan-out beside spdk_tgt. Specs and
results are plain JSON objects (the agent's wire format); decisions that
need CSI knowledge (error codes, messages with node names) stay in the
controller, which gets them as ``IntentError`` reasons with details.

Idempotency and crash safety: every intent first does what is missing and
treats "already there" as done; a failed step is re-checked against SPDK's
state before it is reported (SPDK's nvmf errors are generic), so a retry
after a crash or a lost reply between any two calls, including between the
parallel ones, converges.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from .. import contract
from .errors import SpdkError, SpdkExists, SpdkNotFound

# Independent SPDK calls of one intent run on these threads, each on its own
# pooled connection (the client never interleaves two requests on one).
_FANOUT = ThreadPoolExecutor(max_workers=64, thread_name_prefix="spdk-fanout")

INTENTS = ("create_lvol", "export", "unexport", "delete_volume")


class Api(Protocol):
    def call(self, method: str, params: dict | None = None,
             timeout: float | None = None) -> Any: ...


class IntentError(Exception):
    """A decision the intent cannot take for the caller: ``reason`` is one of
    ``not_volume``, ``foreign``, ``published``, ``conflict``, ``single_node``,
    ``exhausted``; ``details`` what the caller needs to word it."""

    def __init__(self, reason: str, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.reason, self.message, self.details = reason, message, details or {}


def parallel(*calls: Callable[[], Any]) -> list[tuple[Any, BaseException | None]]:
    """Run the calls together; (result, error) of each, in order. Never raises
    for a call's error: the caller re-checks what failed against SPDK. Only
    the first may fan out again (the others run on the shared pool)."""
    if not calls:
        return []
    if len(calls) == 1:
        try:
            return [(calls[0](), None)]
        except Exception as err:  # noqa: BLE001 - handed back
            return [(None, err)]
    # the first runs on the calling thread: a call that fans out itself (an
    # intent beside a read) never waits for a pool thread its own fan-out
    # needs, however many callers are in flight
    futures = [_FANOUT.submit(fn) for fn in calls[1:]]
    out: list[tuple[Any, BaseException | None]] = []
    try:
        out.append((calls[0](), None))
    except Exception as err:  # noqa: BLE001 - handed back
        out.append((None, err))
    for f in futures:
        err = f.exception()
        out.append((None, err) if err is not None else (f.result(), None))
    return out


def _raise_transport_first(results: list[tuple[Any, BaseException | None]]) -> None:
    """A call that did not get an SPDK answer (transport) wins: the caller
    retries the whole intent, which converges."""
    for _, err in results:
        if err is not None and not isinstance(err, SpdkError):
            raise err


def _get_or_none(api: Api, method: str, params: dict) -> Any:
    try:
        found = api.call(method, params)
    except SpdkNotFound:
        return None
    return found[0] if found else None


def bdev(api: Api, ref: str) -> dict | None:
    return _get_or_none(api, "bdev_get_bdevs", {"name": ref})


def subsystem(api: Api, nqn: str) -> dict | None:
    return _get_or_none(api, "nvmf_get_subsystems", {"nqn": nqn})


def lvol_name(b: dict | None) -> str | None:
    """The lvol's own name (``name`` of ``lvs/name``); None for anything else."""
    if not b or not (b.get("driver_specific") or {}).get("lvol"):
        return None
    aliases = b.get("aliases") or []
    if not aliases or "/" not in aliases[0]:
        return None
    return aliases[0].partition("/")[2]


def is_volume(b: dict | None) -> bool:
    name = lvol_name(b)
    return name is not None and contract.is_volume_lvol(name) and \
        not b["driver_specific"]["lvol"].get("snapshot")  # type: ignore[index]


def hosts_of(sub: dict | None) -> list[str]:
    return [h["nqn"] for h in (sub or {}).get("hosts", [])]


# --- create ----------------------------------------------------------------------
def create_lvol(api: Api, spec: dict) -> dict:
    """``{lvs, name, size_mib, thin, clear_method?}`` -> ``{"uuid"}`` for a new
    lvol, ``{"bdev"}`` for the one a previous attempt made (None: the name is
    taken by something that is not an lvol). ENOSPC and the rest propagate."""
    params = {"lvs_name": spec["lvs"], "lvol_name": spec["name"],
              "size_in_mib": int(spec["size_mib"]), "thin_provision": bool(spec["thin"])}
    if spec.get("clear_method"):
        params["clear_method"] = spec["clear_method"]
    try:
        return {"uuid": api.call("bdev_lvol_create", params)}
    except SpdkExists:
        return {"bdev": bdev(api, f"{spec['lvs']}/{spec['name']}")}


# --- export ----------------------------------------------------------------------
def _listener_matches(sub: dict, want: dict) -> bool:
    return any(str(a.get("trtype", "")).upper() == str(want["trtype"]).upper()
               and a.get("traddr") == want["traddr"]
               and str(a.get("trsvcid")) == str(want["trsvcid"])
               for a in sub.get("listen_addresses", []))


def has_namespace(sub: dict, uuid: str) -> bool:
    """Whether the subsystem ``sub`` already serves the volume ``uuid``
    (as its bdev, or a stacked bdev under the volume's namespace uuid)."""
    return any(ns.get("bdev_name") == uuid or ns.get("uuid") == uuid
               for ns in sub.get("namespaces", []))


def _host_has_keys(sub: dict, host: str, keys: dict[str, str]) -> bool:
    entry = next((h for h in sub.get("hosts", []) if h.get("nqn") == host), {})
    return all(entry.get(k) == v for k, v in keys.items())


def _check_publish(sub: dict, spec: dict) -> None:
    """An existing subsystem: the same host with other flags, or another host
    of a single-node volume, is the caller's error (reasons for CSI codes)."""
    host, hosts = spec["host"], hosts_of(sub)
    if host in hosts:
        previous = contract.model_signature(sub.get("model_number", ""), host) \
            or spec.get("hint") or None
        if previous is not None and previous != spec["signature"]:
            raise IntentError("conflict", "already published to this host with a different "
                              "capability or readonly flag")
    others = [h for h in hosts if h not in (host, spec.get("legacy", ""))]
    if others and spec.get("single_node"):
        raise IntentError("single_node", "single-node volume already published elsewhere",
                          {"hosts": others})


def export(api: Api, spec: dict) -> dict:
    """Make lvol ``uuid`` reachable by ``host``.

    ``spec``: uuid, host, legacy (the host's old NQN form), model (for a new
    subsystem), signature and hint (this publish's flags and the caller's
    memory of the previous one), single_node, keys (keyring key names),
    listen (listen_address object), secure_channel. Returns ``{"created"}``:
    whether this call created the subsystem.

    Round 1 creates the subsystem while it looks the lvol up: a subsystem
    that turns out to have no volume behind it is deleted again (and a crash
    in that window leaves a host-less subsystem of a non-volume, which
    ``Target.sweep`` removes)."""
    uuid = spec["uuid"]
    nqn = contract.subsystem_nqn(uuid)
    (found, lookup_err), (_, create_err) = parallel(
        lambda: bdev(api, uuid),
        lambda: api.call("nvmf_create_subsystem", {
            "nqn": nqn, "serial_number": contract.serial_number(uuid),
            "model_number": spec["model"], "allow_any_host": False, "max_namespaces": 1}))
    created = create_err is None
    if lookup_err is not None or (create_err is not None
                                  and not isinstance(create_err, SpdkError)):
        raise lookup_err or create_err  # type: ignore[misc]
    if not is_volume(found):
        if created:
            with contextlib.suppress(SpdkNotFound):
                api.call("nvmf_delete_subsystem", {"nqn": nqn})
        raise IntentError("not_volume", f"lvol {uuid} is not a volume")
    if created:
        sub: dict = {"namespaces": [], "listen_addresses": [], "hosts": []}
    else:
        have = subsystem(api, nqn)
        if have is None:
            if "Unable to create subsystem" in create_err.spdk_message:  # type: ignore
                raise IntentError("exhausted", create_err.spdk_message)  # type: ignore
            raise create_err  # type: ignore[misc]
        sub = have
        _check_publish(sub, spec)
    _fill(api, nqn, sub, spec)
    return {"created": created}


def _fill(api: Api, nqn: str, sub: dict, spec: dict) -> None:
    """Round 2: whatever of namespace, listener and host is missing, together."""
    uuid, host, keys = spec["uuid"], spec["host"], dict(spec.get("keys") or {})
    listen, tls = spec["listen"], bool(spec.get("secure_channel"))
    ns_bdev = spec.get("bdev") or uuid   # the exported bdev (the lvol unless stacked)
    steps: list[tuple[Callable[[dict], bool], Callable[[], Any]]] = []
    if not has_namespace(sub, uuid):
        steps.append((lambda s: has_namespace(s, uuid), lambda: api.call(
            "nvmf_subsystem_add_ns", {"nqn": nqn, "namespace": {"bdev_name": ns_bdev,
                                                               "uuid": uuid}})))
    if not _listener_matches(sub, listen):
        params: dict[str, Any] = {"nqn": nqn, "listen_address": listen}
        if tls:
            params["secure_channel"] = True
        steps.append((lambda s: _listener_matches(s, listen),
                      lambda: api.call("nvmf_subsystem_add_listener", params)))
    if host not in hosts_of(sub):
        steps.append((lambda s: host in hosts_of(s), lambda: api.call(
            "nvmf_subsystem_add_host", {"nqn": nqn, "host": host, **keys})))
    elif keys and not tls and not _host_has_keys(sub, host, keys):
        # nvmf_get_subsystems does not show a psk and set_keys rotates
        # DH-HMAC-CHAP keys only: an existing tls entry stays
        steps.append((lambda s: _host_has_keys(s, host, keys), lambda: api.call(
            "nvmf_subsystem_set_keys", {"nqn": nqn, "host": host, **keys})))
    if not steps:
        return
    results = parallel(*(action for _, action in steps))
    _raise_transport_first(results)
    failed = [(done, err) for (done, _), (_, err) in zip(steps, results, strict=True) if err]
    if failed:
        now = subsystem(api, nqn)
        for done, err in failed:
            if now is None or not done(now):
                raise err  # type: ignore[misc]


# --- unexport ----------------------------------------------------------------------
def stacked(uuid: str, sub: dict | None, lvol: dict | None = None) -> bool | None:
    """Whether a target-mode crypto bdev sits on lvol ``uuid``, as far as what
    the intent read anyway tells (no extra SPDK call): the volume's namespace
    names the crypto bdev (True) or the lvol itself (False: the namespace
    claims the lvol, so nothing else can be stacked on it); with no namespace,
    an lvol nobody claims has nothing stacked (False). None: the reads cannot
    tell (no subsystem or namespace and the lvol not read, or claimed by
    something else): the caller has to look (a crash between stacking the
    crypto bdev and exporting it, a retry after one between unexport and
    unstack)."""
    crypto, found = contract.crypto_bdev_name(uuid), None
    for ns in (sub or {}).get("namespaces", []):
        if ns.get("bdev_name") == crypto:
            return True
        if ns.get("bdev_name") == uuid:
            found = False
    if found is None and lvol is not None and not lvol.get("claimed"):
        found = False
    return found


def unexport(api: Api, spec: dict) -> dict:
    """``{uuid, hosts: [NQNs to remove], all?}``: remove the hosts; the
    subsystem goes when none is left (or with ``all``). Missing is success.
    Returns ``{"gone", "stacked"}``: the subsystem no longer exists; when it
    went, whether its namespace was a crypto bdev (``stacked``: None when
    unknown, see there)."""
    nqn = contract.subsystem_nqn(spec["uuid"])
    if spec.get("all"):
        _delete_subsystem(api, nqn)
        return {"gone": True, "stacked": None}
    sub = subsystem(api, nqn)
    if sub is None:
        return {"gone": True, "stacked": None}
    hosts = hosts_of(sub)
    remove = [h for h in spec["hosts"] if h in hosts]
    if not [h for h in hosts if h not in remove]:
        _delete_subsystem(api, nqn)   # the last host: no need to remove it first
        return {"gone": True, "stacked": stacked(spec["uuid"], sub)}
    results = parallel(*(lambda h=h: api.call("nvmf_subsystem_remove_host",
                                              {"nqn": nqn, "host": h}) for h in remove))
    _raise_transport_first(results)
    if any(err for _, err in results):
        now = subsystem(api, nqn)
        for h, (_, err) in zip(remove, results, strict=True):
            if err is not None and now is not None and h in hosts_of(now):
                raise err
    return {"gone": False}


def _delete_subsystem(api: Api, nqn: str) -> None:
    try:
        api.call("nvmf_delete_subsystem", {"nqn": nqn})
    except SpdkError:
        if subsystem(api, nqn) is not None:
            raise


# --- delete ----------------------------------------------------------------------
def delete_volume(api: Api, spec: dict) -> dict:
    """``{uuid}``: delete a volume lvol that no host is allowed on, and its
    host-less subsystem. Returns ``{"bdev", "stacked"}``: the lvol as it was
    before the delete (None: already gone), for the caller's reclaim and
    accounting, and whether a crypto bdev was on it (``stacked``)."""
    uuid = spec["uuid"]
    nqn = contract.subsystem_nqn(uuid)
    (found, e1), (sub, e2) = parallel(lambda: bdev(api, uuid), lambda: subsystem(api, nqn))
    if e1 or e2:
        raise e1 or e2  # type: ignore[misc]
    name = lvol_name(found)
    if name is None:
        return {"bdev": None}     # no lvol of that uuid (any other bdev is not a volume)
    if not contract.is_driver_lvol(name):
        raise IntentError("foreign", "not created by csi-spdk", {"alias": (
            found.get("aliases") or [uuid])[0]})
    if not is_volume(found):
        raise IntentError("not_volume", "a snapshot, not a volume")
    if hosts_of(sub):
        raise IntentError("published", "still published", {"hosts": hosts_of(sub)})
    if sub is not None:
        _delete_subsystem(api, nqn)
    with contextlib.suppress(SpdkNotFound):
        api.call("bdev_lvol_delete", {"name": uuid})
    return {"bdev": found, "stacked": stacked(uuid, sub, found)}


_TABLE: dict[str, Callable[[Api, dict], dict]] = {
    "create_lvol": create_lvol, "export": export, "unexport": unexport,
    "delete_volume": delete_volume,
}


def run(api: Api, name: str, spec: dict) -> dict:
    """Execute intent ``name`` against ``api`` (a direct client or the agent's
    checked one)."""
    fn = _TABLE.get(name)
    if fn is None:
        raise ValueError(f"unknown intent {name!r}")
    return fn(api, spec)
