"""StorageClass ``dhchapDigest`` / ``dhchapDHGroup``: the weakest DH-HMAC-CHAP
hash and Diffie-Hellman group a volume's connections may negotiate.

What SPDK v25.09 can enforce decides the semantics. The digest and DH group
are negotiated per connection, and SPDK chooses them from target-wide lists
only: ``nvmf_set_config`` ``dhchap_digests`` / ``dhchap_dhgroups``, a
start-up-only RPC (``SPDK_RPC_STARTUP``), from which it picks the strongest
pair the host also offers (``lib/nvmf/auth.c``, ``nvmf_auth_negotiate_exec``).
``nvmf_subsystem_add_host`` takes key names only: there is no per-host or
per-subsystem digest. A host may offer just the weakest algorithms, so a
volume gets at least the StorageClass's digest and group only on a target
whose lists hold nothing weaker. The controller therefore reads each
target's lists (``framework_get_config nvmf``) and places such a volume only
on a target that qualifies; publish checks again (a target restarted with
other lists). Linux hosts offer every digest and group, so against SPDK they
get the strongest the target allows.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import contract
from ..errors import FailedPrecondition, InvalidArgument, NotFound, echo
from ..spdk.api import SpdkApi

PARAM_DIGEST, PARAM_DHGROUP = "dhchapDigest", "dhchapDHGroup"
PARAM_KEYS = (PARAM_DIGEST, PARAM_DHGROUP)
# weakest first (SPDK's order, reversed)
DIGESTS = ("sha256", "sha384", "sha512")
DHGROUPS = ("null", "ffdhe2048", "ffdhe3072", "ffdhe4096", "ffdhe6144", "ffdhe8192")


@dataclass(frozen=True)
class Strength:
    """The weakest digest / DH group allowed ("" = any)."""

    digest: str = ""
    dhgroup: str = ""

    def __bool__(self) -> bool:
        return bool(self.digest or self.dhgroup)

    def context(self) -> dict[str, str]:
        """volume_context entries (so publish can check the target again)."""
        out = {}
        if self.digest:
            out[PARAM_DIGEST] = self.digest
        if self.dhgroup:
            out[PARAM_DHGROUP] = self.dhgroup
        return out


def parse(params: dict[str, str], mode: str) -> Strength:
    """INVALID_ARGUMENT naming the allowed values."""
    digest, dhgroup = params.get(PARAM_DIGEST, ""), params.get(PARAM_DHGROUP, "")
    if digest and digest not in DIGESTS:
        raise InvalidArgument(f"parameter {PARAM_DIGEST}={echo(digest)} must be one of "
                              f"{', '.join(DIGESTS)}")
    if dhgroup and dhgroup not in DHGROUPS:
        raise InvalidArgument(f"parameter {PARAM_DHGROUP}={echo(dhgroup)} must be one of "
                              f"{', '.join(DHGROUPS)}")
    if (digest or dhgroup) and mode != contract.AUTH_DHCHAP:
        raise InvalidArgument(f"parameters {PARAM_DIGEST}/{PARAM_DHGROUP} are for auth: "
                              f"dhchap; this StorageClass has auth: {mode}")
    return Strength(digest, dhgroup)


def from_context(ctx: dict[str, str]) -> Strength:
    return Strength(ctx.get(PARAM_DIGEST, ""), ctx.get(PARAM_DHGROUP, ""))


def target_lists(api: SpdkApi) -> tuple[list[str], list[str]]:
    """The target's (digests, DH groups), as its nvmf_set_config set them."""
    for entry in api.call("framework_get_config", {"name": "nvmf"}) or []:
        if entry.get("method") == "nvmf_set_config":
            p = entry.get("params") or {}
            return (list(p.get("dhchap_digests", DIGESTS)),
                    list(p.get("dhchap_dhgroups", DHGROUPS)))
    return list(DIGESTS), list(DHGROUPS)


def problem(want: Strength, digests: list[str], dhgroups: list[str]) -> str:
    """Why a target with these lists cannot give ``want`` ("" when it can)."""
    out = []
    if want.digest:
        weaker = [d for d in digests if d in DIGESTS
                  and DIGESTS.index(d) < DIGESTS.index(want.digest)]
        if weaker:
            out.append(f"it allows the weaker digest(s) {', '.join(weaker)}")
    if want.dhgroup:
        weaker = [g for g in dhgroups if g in DHGROUPS
                  and DHGROUPS.index(g) < DHGROUPS.index(want.dhgroup)]
        if weaker:
            out.append(f"it allows the weaker DH group(s) {', '.join(weaker)}")
    return "; ".join(out)


def unqualified(want: Strength, apis: dict[str, SpdkApi]) -> dict[str, str]:
    """target name -> why it cannot hold such a volume (qualifying ones absent)."""
    if not want:
        return {}
    out = {}
    for name, api in apis.items():
        why = problem(want, *target_lists(api))
        if why:
            out[name] = why
    return out


def refusal(want: Strength, why: dict[str, str]) -> FailedPrecondition:
    wanted = ", ".join(f"{k}={v}" for k, v in want.context().items())
    reasons = "; ".join(f"target {t}: {w}" for t, w in sorted(why.items()))
    return FailedPrecondition(
        f"{wanted} needs a target whose DH-HMAC-CHAP lists hold nothing weaker ({reasons}). "
        "SPDK negotiates from target-wide lists only: start spdk_tgt with nvmf_set_config "
        "dhchap_digests/dhchap_dhgroups restricted accordingly, or relax the StorageClass")


def check_target(name: str, api: SpdkApi, want: Strength) -> None:
    """Publish: the volume's target still qualifies (it may have been restarted
    with other lists)."""
    why = problem(want, *target_lists(api)) if want else ""
    if why:
        raise refusal(want, {name: why})


def restrict(targets, req, source, kind: str | None) -> None:
    """CreateVolume: keep only the targets that qualify in ``req.lvstores``
    (placement's candidates); a clone or restore stays on its source's
    target, which must qualify. ``targets``: controller ``Targets``."""
    want = req.params.dhchap
    if kind is not None:
        src_id = source.volume.volume_id if kind == "volume" else source.snapshot.snapshot_id
        try:
            t = targets.of(contract.parse_id(src_id))
        except (NotFound, InvalidArgument):
            return   # the create path reports the missing source
        check_target(t.name, t.api, want)
        return
    why = unqualified(want, {name: targets[name].api for name in req.lvstores})
    if why and len(why) == len(req.lvstores):
        raise refusal(want, why)
    req.lvstores = {k: v for k, v in req.lvstores.items() if k not in why}
