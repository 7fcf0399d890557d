"""Replaying spdk-golden transcripts against a JSON-RPC endpoint and comparing.

Normalisation is deliberately narrow (the rest must match exactly):
- UUIDs (dashed, or as 32-hex nguids) are paired recording->replay as a
  bijection on first sight; a later mismatch in either direction fails;
- ``ticks``, ``tick_rate`` and ``*_latency_ticks`` values only need to be integers
  (the tick rate is the recording machine's TSC frequency);
- recorded paths ``/var/tmp/spdk-golden/...`` are mapped to the test's files.
"""

from __future__ import annotations

import json
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any

RECORDED_ROOT = "/var/tmp/spdk-golden"
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                     r"[0-9a-fA-F]{12}|(?<![0-9A-Fa-f])[0-9A-F]{32}(?![0-9A-Fa-f])")
TICK_KEYS = re.compile(r"^(ticks|tick_rate|.*latency_ticks)$")


def _canon(u: str) -> str:
    """nguid / upper-case forms -> dashed lower-case uuid (a single namespace)."""
    h = u.replace("-", "").lower()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass
class UuidMap:
    fwd: dict[str, str] = field(default_factory=dict)   # recorded -> replay
    back: dict[str, str] = field(default_factory=dict)  # replay -> recorded

    def pair(self, rec: str, got: str) -> str | None:
        """Record or check one pairing; return an error text on conflict."""
        r, g = _canon(rec), _canon(got)
        if r in self.fwd:
            if self.fwd[r] != g:
                return f"uuid {rec} was paired with {self.fwd[r]}, now {got}"
            return None
        if g in self.back:
            return f"uuid {got} already stands for recorded {self.back[g]}, not {rec}"
        self.fwd[r], self.back[g] = g, r
        return None

    def translate(self, text: str) -> str:
        """Rewrite recorded UUIDs in a request string to the replay's ones."""
        def sub(m: re.Match[str]) -> str:
            u = m.group(0)
            g = self.fwd.get(_canon(u))
            if g is None:
                return u
            if "-" not in u:
                g = g.replace("-", "")
            return g.upper() if u.isupper() else g
        return UUID_RE.sub(sub, text)


def map_paths(value: Any, root: str, recorded: str = RECORDED_ROOT) -> Any:
    """Every string with the ``recorded`` directory rewritten to ``root``."""
    if isinstance(value, str):
        return value.replace(recorded, root)
    if isinstance(value, list):
        return [map_paths(v, root, recorded) for v in value]
    if isinstance(value, dict):
        return {k: map_paths(v, root, recorded) for k, v in value.items()}
    return value


def translate(value: Any, uuids: UuidMap) -> Any:
    if isinstance(value, str):
        return uuids.translate(value)
    if isinstance(value, list):
        return [translate(v, uuids) for v in value]
    if isinstance(value, dict):
        return {k: translate(v, uuids) for k, v in value.items()}
    return value


def compare(exp: Any, got: Any, uuids: UuidMap, path: str = "$") -> list[str]:
    """Differences between recorded ``exp`` and replayed ``got`` (empty: equal)."""
    if isinstance(exp, dict):
        if not isinstance(got, dict):
            return [f"{path}: expected object, got {json.dumps(got)[:200]}"]
        if list(exp) != list(got):
            return [f"{path}: keys {list(exp)} != {list(got)}"]
        out: list[str] = []
        for k in exp:
            if TICK_KEYS.match(k) and isinstance(exp[k], int) and isinstance(got[k], int):
                continue
            out += compare(exp[k], got[k], uuids, f"{path}.{k}")
        return out
    if isinstance(exp, list):
        if not isinstance(got, list) or len(exp) != len(got):
            return [f"{path}: expected {json.dumps(exp)[:300]}, got {json.dumps(got)[:300]}"]
        out = []
        for i, (e, g) in enumerate(zip(exp, got, strict=True)):
            out += compare(e, g, uuids, f"{path}[{i}]")
        return out
    if isinstance(exp, str) and isinstance(got, str):
        e_ids, g_ids = UUID_RE.findall(exp), UUID_RE.findall(got)
        if UUID_RE.sub("<uuid>", exp) != UUID_RE.sub("<uuid>", got) or len(e_ids) != len(g_ids):
            return [f"{path}: expected {exp!r}, got {got!r}"]
        errors = [err for e, g in zip(e_ids, g_ids, strict=True)
                  if (err := uuids.pair(e, g))]
        return [f"{path}: {err}" for err in errors]
    if type(exp) is not type(got) or exp != got:
        return [f"{path}: expected {exp!r}, got {got!r}"]
    return []


class Connection:
    """One stream connection that reads back complete JSON values."""

    def __init__(self, address: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(address)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.closed = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_value(self, timeout: float) -> Any:
        """Next complete JSON value; raises TimeoutError / ConnectionError."""
        decoder = json.JSONDecoder()
        deadline = time.monotonic() + timeout
        while True:
            text = self.buf.decode(errors="replace").lstrip()
            if text:
                try:
                    obj, end = decoder.raw_decode(text)
                except json.JSONDecodeError:
                    pass
                else:
                    self.buf = text[end:].encode()
                    return obj
            self._recv(deadline)

    def read_for(self, seconds: float) -> bytes:
        """Everything that arrives within ``seconds`` (stops early on close)."""
        deadline = time.monotonic() + seconds
        while not self.closed:
            try:
                self._recv(deadline)
            except (TimeoutError, ConnectionError):
                break
        data, self.buf = self.buf, b""
        return data

    def _recv(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no complete reply")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise TimeoutError("no complete reply") from None
        if not chunk:
            self.closed = True
            raise ConnectionError("closed")
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


class Recorder:
    """Sends JSON-RPC requests to a real target one at a time and keeps each
    request with its answer, in the transcript format the replays read."""

    def __init__(self, sock: str) -> None:
        self.conn = Connection(sock)
        self.entries: list[dict] = []

    def send(self, method: str, params: dict | None, note: str | None = None) -> Any:
        req: dict = {"jsonrpc": "2.0", "method": method, "id": len(self.entries) + 1}
        if params is not None:
            req["params"] = params
        self.conn.send(json.dumps(req).encode())
        resp = self.conn.read_value(10.0)
        entry = {"request": req, "response": resp}
        if note:
            entry["note"] = note
        self.entries.append(entry)
        return resp

    def write(self, out) -> None:
        self.conn.close()
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(self.entries, indent=1) + "\n")
        print(f"wrote {len(self.entries)} entries to {out}")


def replay_transcript(entries: list[dict], sock: str) -> list[str]:
    """Replay a recorded transcript against the simulator listening on
    ``sock``; one line (with the first differences) per entry that differs."""
    uuids = UuidMap()
    failures: list[str] = []
    conn = Connection(sock)
    try:
        for index, entry in enumerate(entries):
            conn.send(json.dumps(translate(entry["request"], uuids)).encode())
            got = conn.read_value(10.0)
            errors = compare(entry["response"], got, uuids)
            if errors:
                note = f"  # {entry['note']}" if entry.get("note") else ""
                failures.append(f"entry [{index}] {json.dumps(entry['request'])[:200]}{note}"
                                "\n    " + "\n    ".join(errors[:8]))
    finally:
        conn.close()
    return failures
