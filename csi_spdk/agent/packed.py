"""The desired state held compactly in memory: each entry as its JSON text.

At 10,000 published volumes the record is ~30,000 entries (a subsystem with
its namespace, listener and host; two key names; QoS limits). As Python
dicts, lists and strings that is ~470,000 objects and ~40 MiB of heap, plus
the fragmentation a one-shot ``json.loads`` of the whole snapshot leaves
behind (the agent's RSS was ~150 MiB). Kept as one ``bytes`` per entry (its
canonical compact JSON: sorted keys, no spaces) it is ~12 MiB, and the
snapshot is read entry by entry (``load``), never as one tree.

``Packed`` is the mapping each section is (``transports``, ``keys``,
``subsystems``, ``qos``, ``crypto.keys``, ``crypto.bdevs``): an entry is
decoded when the record's code reads it and kept decoded ("checked out") so
that changing it in place works, then packed again by ``settle`` (the
recorder calls it at the end of each change, under its lock). ``items`` and
``values`` decode fresh copies without checking them out (replay walks
every entry: they must not all stay decoded).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import re
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

# Sections holding sections rather than entries (``crypto.keys``, ``crypto.bdevs``).
NESTED = frozenset({"crypto"})
_decoder = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")
CHUNK = 1 << 16


def pack(value: Any) -> bytes:
    """The canonical JSON of an entry: what ``settle`` compares and stores."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


class Packed(MutableMapping):
    """A section: key -> entry, each entry stored as ``pack(entry)``."""

    __slots__ = ("_raw", "_out")

    def __init__(self) -> None:
        self._raw: dict[str, bytes | None] = {}     # None: checked out, see _out
        self._out: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key in self._out:
            return self._out[key]
        raw = self._raw[key]
        assert raw is not None
        value = self._out[key] = json.loads(raw)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self._raw[key] = None
        self._out[key] = value

    def __delitem__(self, key: str) -> None:
        del self._raw[key]
        self._out.pop(key, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __contains__(self, key: object) -> bool:
        return key in self._raw

    def raw(self, key: str) -> bytes:
        """The entry's canonical JSON (as it is now, if it is checked out)."""
        if key in self._out:
            return pack(self._out[key])
        raw = self._raw[key]
        assert raw is not None
        return raw

    def value(self, key: str) -> Any:
        """A decoded copy of the entry, not checked out (read-only use)."""
        return self._out[key] if key in self._out else json.loads(self._raw[key])  # type: ignore[arg-type]

    def items(self) -> Iterator[tuple[str, Any]]:  # type: ignore[override]
        return ((k, self.value(k)) for k in list(self._raw))

    def values(self) -> Iterator[Any]:  # type: ignore[override]
        return (self.value(k) for k in list(self._raw))

    def settle(self) -> None:
        """Pack the checked-out entries again."""
        for key, value in self._out.items():
            if key in self._raw:
                self._raw[key] = pack(value)
        self._out.clear()

    def plain(self) -> dict[str, Any]:
        return {k: self.value(k) for k in self._raw}

    def encode_into(self, buf: bytearray) -> Iterator[bytearray]:
        """Append the section as JSON (sorted keys, compact) to ``buf``, entries
        as stored; yields ``buf`` whenever it holds ``CHUNK`` bytes or more
        (the caller writes and empties it)."""
        self.settle()
        buf += b"{"
        for n, key in enumerate(sorted(self._raw)):
            if n:
                buf += b","
            buf += json.dumps(str(key)).encode()
            buf += b":"
            buf += self._raw[key]  # type: ignore[operator]
            if len(buf) >= CHUNK:
                yield buf
        buf += b"}"

    def put_raw(self, key: str, raw: bytes) -> None:
        self._raw[key] = raw
        self._out.pop(key, None)


def empty() -> dict[str, Any]:
    """A record with every section, empty."""
    return {"transports": Packed(), "keys": Packed(), "subsystems": Packed(),
            "qos": Packed(), "crypto": {"keys": Packed(), "bdevs": Packed()}}


def sections(data: dict[str, Any]) -> Iterator[Packed]:
    for value in data.values():
        if isinstance(value, Packed):
            yield value
        elif isinstance(value, dict):
            yield from (v for v in value.values() if isinstance(v, Packed))


def settle(data: dict[str, Any]) -> None:
    for sec in sections(data):
        sec.settle()


def plain(data: Any) -> Any:
    """A deep plain-dict copy (reports, tests)."""
    if isinstance(data, Packed):
        return data.plain()
    if isinstance(data, dict):
        return {k: plain(v) for k, v in data.items()}
    return json.loads(json.dumps(data))


def encode(data: Any, buf: bytearray) -> Iterator[bytearray]:
    """``data`` as compact JSON with sorted keys (what ``json.dumps(plain(data),
    sort_keys=True, separators=(",", ":"))`` gives), appended to ``buf`` entry by
    entry and yielded in chunks of about ``CHUNK`` bytes for the caller to write
    and empty: never the whole text in memory (at 10,000 volumes a whole-file
    ``json.dumps`` left ~40 MiB of freed heap the process kept)."""
    if isinstance(data, Packed):
        yield from data.encode_into(buf)
    elif isinstance(data, dict):
        buf += b"{"
        for n, key in enumerate(sorted(data)):
            if n:
                buf += b","
            buf += json.dumps(str(key)).encode()
            buf += b":"
            yield from encode(data[key], buf)
        buf += b"}"
    else:
        buf += pack(data)


def chunks(head: bytes, data: Any, tail: bytes) -> Iterator[bytes]:
    """``head + encode(data) + tail`` as chunks to write one after the other."""
    buf = bytearray(head)
    for full in encode(data, buf):
        yield bytes(full)
        del full[:]
    buf += tail
    yield bytes(buf)


# --- reading a snapshot entry by entry ---------------------------------------------
def _ws(s: str, i: int) -> int:
    return _WS.match(s, i).end()  # type: ignore[union-attr]


def _object(s: str, i: int, member: Callable[[str, str, int], tuple[Any, int]],
            into: MutableMapping | None = None) -> tuple[Any, int]:
    """Parse the JSON object at ``s[i]``; ``member(key, s, j)`` parses each value
    (starting at ``j``) and returns it with the index after it."""
    out: Any = {} if into is None else into
    i = _ws(s, i)
    if s[i:i + 1] != "{":
        raise ValueError(f"expected an object at character {i}")
    i = _ws(s, i + 1)
    if s[i:i + 1] == "}":
        return out, i + 1
    while True:
        key, i = _decoder.raw_decode(s, i)
        i = _ws(s, i)
        if s[i:i + 1] != ":":
            raise ValueError(f"expected ':' at character {i}")
        i = _ws(s, i + 1)
        value, i = member(key, s, i)
        if isinstance(out, Packed) and isinstance(value, bytes):
            out.put_raw(key, value)
        else:
            out[key] = value
        i = _ws(s, i)
        if s[i:i + 1] == ",":
            i = _ws(s, i + 1)
            continue
        if s[i:i + 1] == "}":
            return out, i + 1
        raise ValueError(f"expected ',' or '}}' at character {i}")


def _entry(_key: str, s: str, i: int) -> tuple[bytes, int]:
    value, end = _decoder.raw_decode(s, i)
    return pack(value), end


def _section(name: str, s: str, i: int) -> tuple[Any, int]:
    if s[i:i + 1] != "{":
        return _decoder.raw_decode(s, i)
    if name in NESTED:
        return _object(s, i, lambda _k, s2, j: _object(s2, j, _entry, Packed()))
    return _object(s, i, _entry, Packed())


def _top(key: str, s: str, i: int) -> tuple[Any, int]:
    if key == "state":                              # format 2: {"format", "seq", "state"}
        return _object(s, i, _section)
    if key in ("format", "seq"):
        return _decoder.raw_decode(s, i)
    return _section(key, s, i)                      # format 1: the sections at the top


def load(text: str) -> dict[str, Any]:
    """A snapshot file's top-level object, its sections as ``Packed``; only one
    entry is ever decoded at a time. Raises ``ValueError`` for bad JSON."""
    out, end = _object(text, 0, _top)
    if text[_ws(text, end):].strip():
        raise ValueError(f"extra data after character {end}")
    return out


def release_freed_heap() -> None:
    """Give the heap a big transient freed back to the system (glibc's
    ``malloc_trim``; nothing elsewhere). Loading 10,000 volumes, or a replay
    that fails on most of them, frees tens of MiB in pieces the allocator
    would otherwise keep, so the agent's RSS would stay at its peak."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is not None:
        trim(0)
