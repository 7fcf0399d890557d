"""Reading sysfs attributes (shared by the initiator and SSD discovery)."""

from __future__ import annotations


def read_attr(path: str) -> str:
    """A sysfs attribute's stripped text, or "" when it is absent/unreadable
    (devices come and go while we look, so absence is not an error)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""
