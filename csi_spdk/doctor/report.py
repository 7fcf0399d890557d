"""A doctor check's result and the two ways it is printed."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

PASS, WARN, FAIL = "pass", "warn", "fail"


@dataclass
class Check:
    name: str
    status: str          # pass: ready; warn: an optional feature is missing; fail: blocks
    detail: str
    fix: str = ""


def ok(name: str, detail: str) -> Check:
    return Check(name, PASS, detail)


def warn(name: str, detail: str, fix: str) -> Check:
    return Check(name, WARN, detail, fix)


def fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, FAIL, detail, fix)


def text(role: str, host: str, checks: list[Check]) -> str:
    """One line a check: status, name, what was found, and the fix."""
    lines = [f"csi-spdk doctor {role} on {host}"]
    for c in checks:
        line = f"{c.status.upper():4}  {c.name}: {c.detail}"
        if c.fix and c.status != PASS:
            line += f"; fix: {c.fix}"
        lines.append(line)
    failed = sum(c.status == FAIL for c in checks)
    warned = sum(c.status == WARN for c in checks)
    lines.append(f"{len(checks)} checks: {failed} failed, {warned} warnings"
                 + ("" if failed else f"; this {role} is ready"))
    return "\n".join(lines)


def as_json(role: str, host: str, checks: list[Check]) -> str:
    return json.dumps({"role": role, "host": host,
                       "ok": not any(c.status == FAIL for c in checks),
                       "checks": [asdict(c) for c in checks]}, indent=2)
