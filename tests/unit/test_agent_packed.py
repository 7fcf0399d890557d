"""The desired state's compact in-memory form (agent/packed.py): the entry-by-
entry snapshot reader gives what ``json.loads`` gives, the writer what
``json.dumps(sort_keys, compact)`` gives, and an entry changed in place is
what gets stored."""

from __future__ import annotations

import json

import pytest

from csi_spdk.agent import packed
from csi_spdk.agent.packed import Packed

STATE = {
    "transports": {"TCP": {"trtype": "TCP"}},
    "keys": {"k-1": {"name": "k-1", "path": "/s/keys/k-1"}, "é-2": {"name": "é-2", "path": "/x"}},
    "subsystems": {"nqn.a": {"params": {"nqn": "nqn.a", "max_namespaces": 1},
                             "allow_any_host": False, "listeners": [{"listen_address": {
                                 "trtype": "TCP", "traddr": "127.0.0.1", "trsvcid": "4420"}}],
                             "namespaces": {"1": {"namespace": {"bdev_name": "u", "nsid": 1}}},
                             "hosts": {}}},
    "qos": {},
    "crypto": {"keys": {}, "bdevs": {"c": {"name": "c", "base_bdev_name": "u", "n": 1.5}}},
}


@pytest.mark.parametrize("text", [
    json.dumps({"format": 2, "seq": 7, "state": STATE}, sort_keys=True, separators=(",", ":")),
    json.dumps({"state": STATE, "seq": 7, "format": 2}, indent=2),      # any layout
    json.dumps({"format": 1, **STATE}),                                 # the legacy file
])
def test_the_snapshot_reader_gives_what_json_loads_gives(text):
    loaded = packed.load(text)
    assert packed.plain(loaded) == json.loads(text)
    state = loaded.get("state", loaded)
    assert isinstance(state["subsystems"], Packed)
    assert isinstance(state["crypto"]["bdevs"], Packed)


@pytest.mark.parametrize("text", ['{"format": 2, "seq": 1, "state": {"keys": {"a": 1}', '{"a" 1}',
                                  '{"a": 1} trailing', '{"a": tru}'])
def test_bad_json_is_a_value_error(text):
    with pytest.raises(ValueError):
        packed.load(text)


def test_the_writer_gives_what_json_dumps_gives():
    data = packed.load(json.dumps(STATE, indent=1))
    data["subsystems"]["nqn.a"]["hosts"]["h"] = {"host": "h"}       # checked out, changed
    expect = json.loads(json.dumps(STATE))
    expect["subsystems"]["nqn.a"]["hosts"]["h"] = {"host": "h"}
    written = b"".join(packed.chunks(b"<", data, b">"))
    assert written == b"<" + json.dumps(expect, sort_keys=True,
                                        separators=(",", ":")).encode() + b">"
    big = Packed()
    for i in range(3000):        # more than one chunk
        big[f"k{i}"] = {"v": "x" * 40, "i": i}
    pieces = list(packed.chunks(b"", {"s": big}, b""))
    assert len(pieces) > 1
    assert json.loads(b"".join(pieces)) == {"s": {f"k{i}": {"v": "x" * 40, "i": i}
                                                 for i in range(3000)}}


def test_an_entry_changed_in_place_is_stored_and_reads_are_copies():
    sec = Packed()
    sec["a"] = {"hosts": {}}
    sec.settle()
    entry = sec["a"]
    entry["hosts"]["h"] = {"host": "h"}                    # in place, as the recorder does
    assert sec.raw("a") == packed.pack({"hosts": {"h": {"host": "h"}}})
    sec.settle()
    assert sec.raw("a") == b'{"hosts":{"h":{"host":"h"}}}'
    for _, value in sec.items():                           # a copy: not stored
        value["hosts"].clear()
    sec.settle()
    assert sec.value("a") == {"hosts": {"h": {"host": "h"}}}
    assert sec.pop("a") == {"hosts": {"h": {"host": "h"}}} and "a" not in sec and len(sec) == 0
    assert sec.setdefault("b", {}) == {} and list(sec) == ["b"]
