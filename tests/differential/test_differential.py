"""Replay every recording from a real spdk_tgt v25.09 against a fresh simulator.

Zero differing responses, no exception list: a difference is a simulator bug
(or, after SPDK changes, a reason to re-record; see README.md).
"""

from __future__ import annotations

import pytest

from . import harness
from .generator import Generator, methods_covered

RECORDINGS = sorted(harness.RECORDINGS.glob("seed-*.json"))


def test_recordings_present() -> None:
    assert len(RECORDINGS) >= 10, f"expected >= 10 recordings in {harness.RECORDINGS}"
    for path in RECORDINGS:
        rec = harness.load(path)
        assert rec["target"] == "spdk_tgt v25.09"
        assert len(rec["entries"]) == rec["steps"] >= 600


@pytest.mark.parametrize("path", RECORDINGS, ids=[p.stem for p in RECORDINGS])
def test_simulator_matches_recording(path) -> None:  # type: ignore[no-untyped-def]
    rec = harness.load(path)
    with harness.simulator() as (sock, root):
        result = harness.replay(rec["entries"], sock, root)
    assert not result.differences, (
        f"{path.name}: {len(result.differences)} of {len(rec['entries'])} responses differ\n"
        + "\n".join(str(d) for d in result.differences[:15]))


def test_generator_is_deterministic_and_recordings_are_its_output() -> None:
    """A recording's requests are what its seed generates (so re-recording is faithful)."""
    for path in RECORDINGS[:3]:
        rec = harness.load(path)
        gen = Generator(rec["seed"], harness.ROOT)
        for entry in rec["entries"]:
            request = gen.next()
            assert request == entry["request"]
            gen.observe(request, entry["response"])


def test_recordings_exercise_every_method_and_many_errors() -> None:
    seen: dict[str, int] = {}
    errors = 0
    for path in RECORDINGS:
        for entry in harness.load(path)["entries"]:
            seen[entry["request"]["method"]] = seen.get(entry["request"]["method"], 0) + 1
            errors += "error" in entry["response"]
    assert sorted(seen) == methods_covered()
    total = sum(seen.values())
    assert 0.2 * total < errors < 0.9 * total, (errors, total)


def test_comparison_catches_a_wrong_reply(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The comparer is not vacuous: a changed error message is reported."""
    rec = harness.load(RECORDINGS[0])
    entries = [dict(e) for e in rec["entries"][:200]]
    index = next(i for i, e in enumerate(entries) if "error" in e["response"])
    bad = dict(entries[index]["response"])
    bad["error"] = {**bad["error"], "message": bad["error"]["message"] + "!"}
    entries[index] = {**entries[index], "response": bad}
    with harness.simulator() as (sock, root):
        result = harness.replay(entries, sock, root)
    assert [d.index for d in result.differences][:1] == [index]
