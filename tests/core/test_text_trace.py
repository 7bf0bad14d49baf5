"""The automerge-paper editing trace (259,778 edits) on the text CRDT.

The whole trace replays in the Cython module in a fraction of a second; the pure-Python
twin takes a few seconds, so it replays the full trace in one test only and a prefix
elsewhere.
"""

from __future__ import annotations

import random

import pytest

from p2pcloud._core import _ctext, _reference_text
from tests.core.text_support import IMPLEMENTATIONS, load_trace, replay, rid, trace_edits

TWIN_PREFIX = 6000  # edits of the trace the twin replays in the concurrent tests


@pytest.mark.parametrize("name", ["cython", "twin"])
def test_trace_replays_to_the_final_text(name: str) -> None:
    doc = IMPLEMENTATIONS[name](rid(0))
    replay(doc, trace_edits())
    assert doc.value() == load_trace()["endContent"]
    assert len(doc) == len(load_trace()["endContent"])
    # one op counter per inserted and per deleted character
    edits = trace_edits()
    assert doc.version() == {rid(0): sum(len(t) + d for _, d, t in edits)}


def test_trace_state_is_identical_and_round_trips() -> None:
    edits = trace_edits()[:TWIN_PREFIX]
    twin = _reference_text.Text(rid(0))
    fast = _ctext.Text(rid(0))
    replay(twin, edits)
    replay(fast, edits)
    assert twin.encode_state() == fast.encode_state()
    assert twin.take_pending() == fast.take_pending()

    full = _ctext.Text(rid(0))
    replay(full, trace_edits())
    state = full.encode_state()
    loaded = _ctext.Text.decode_state(state, rid(1))
    assert loaded.value() == load_trace()["endContent"]
    assert loaded.version() == full.version()
    assert loaded.encode_state() == state
    # the snapshot stores runs, not one record per character: it is smaller than the
    # characters ever typed, although it keeps them all (deleted ones too)
    assert len(state) < sum(len(text) for _, _, text in trace_edits())
    # a loaded copy edits on with its own counters, and the original merges that
    loaded.insert(0, "% loaded\n")
    loaded.delete(len(loaded) - 3, 3)
    full.apply(loaded.take_pending())
    assert full.value() == loaded.value()
    assert full.encode_state() == loaded.encode_state()


def test_trace_full_delta_rebuilds_the_document() -> None:
    source = _ctext.Text(rid(0))
    replay(source, trace_edits())
    delta = source.take_pending()
    assert delta == source.encode_since({})
    copy = _ctext.Text(rid(1))
    assert copy.apply(delta) is True
    assert copy.value() == load_trace()["endContent"]
    assert copy.encode_state() == source.encode_state()
    assert copy.apply(delta) is False  # duplicates change nothing


@pytest.mark.parametrize("name", ["cython", "twin"])
def test_trace_handed_between_three_replicas(name: str) -> None:
    """Three parts of the trace typed on three replicas, each catching up first."""
    edits = trace_edits() if name == "cython" else trace_edits()[:TWIN_PREFIX]
    cls = IMPLEMENTATIONS[name]
    replicas = [cls(rid(n)) for n in range(3)]
    cuts = [0, len(edits) // 3, 2 * len(edits) // 3, len(edits)]
    outbox: list[bytes] = []
    for n, doc in enumerate(replicas):
        for delta in outbox:
            doc.apply(delta)
        replay(doc, edits[cuts[n] : cuts[n + 1]])
        outbox.append(doc.take_pending())
    for doc in replicas:
        for delta in reversed(outbox):  # any order: early ops wait for their predecessors
            doc.apply(delta)
    expected = replicas[2].value()
    if name == "cython":
        assert expected == load_trace()["endContent"]
    states = {doc.encode_state() for doc in replicas}
    assert len(states) == 1
    assert all(doc.value() == expected for doc in replicas)


@pytest.mark.parametrize("name", ["cython", "twin"])
def test_concurrent_windows_of_the_trace_converge(name: str) -> None:
    """Three replicas type different windows of the trace at once (positions clamped to
    their own text) and exchange deltas in random order every few hundred edits."""
    edits = trace_edits() if name == "cython" else trace_edits()[:TWIN_PREFIX]
    cls = IMPLEMENTATIONS[name]
    rng = random.Random(7)
    replicas = [cls(rid(n)) for n in range(3)]
    window = len(edits) // 3
    step = 2000 if name == "cython" else 300
    inboxes: list[list[bytes]] = [[], [], []]
    for start in range(0, window, step):
        for n, doc in enumerate(replicas):
            replay(doc, edits[n * window + start : n * window + min(start + step, window)], True)
            delta = doc.take_pending()
            for other in range(3):
                if other != n:
                    inboxes[other].append(delta)
        for n, doc in enumerate(replicas):
            rng.shuffle(inboxes[n])
            # deliver most now, keep some back: they arrive late, after later deltas
            keep = inboxes[n][: len(inboxes[n]) // 3]
            for delta in inboxes[n][len(keep) :]:
                doc.apply(delta)
            inboxes[n] = keep
    for n, doc in enumerate(replicas):
        for delta in inboxes[n]:
            doc.apply(delta)
    values = {doc.value() for doc in replicas}
    assert len(values) == 1
    states = {doc.encode_state() for doc in replicas}
    assert len(states) == 1
    versions = [doc.version() for doc in replicas]
    assert versions[0] == versions[1] == versions[2]
    # a snapshot of three interleaved histories loads back to the same bytes
    state = states.pop()
    loaded = cls.decode_state(state, rid(3))
    assert loaded.encode_state() == state
    assert loaded.value() == values.pop()


def test_twin_and_cython_agree_on_a_concurrent_trace_prefix() -> None:
    edits = trace_edits()[:TWIN_PREFIX]
    pairs = [(_reference_text.Text(rid(n)), _ctext.Text(rid(n))) for n in range(2)]
    half = len(edits) // 2
    for n, (twin, fast) in enumerate(pairs):
        replay(twin, edits[n * half : (n + 1) * half], True)
        replay(fast, edits[n * half : (n + 1) * half], True)
    deltas = [(twin.take_pending(), fast.take_pending()) for twin, fast in pairs]
    assert all(a == b for a, b in deltas)
    for n, (twin, fast) in enumerate(pairs):
        assert twin.apply(deltas[1 - n][0]) == fast.apply(deltas[1 - n][0])
        assert twin.value() == fast.value()
        assert twin.encode_state() == fast.encode_state()
    assert pairs[0][1].value() == pairs[1][1].value()
