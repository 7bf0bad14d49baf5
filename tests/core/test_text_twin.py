"""The Cython text CRDT against its twin, the specification: random concurrent edit
streams on 3-5 replicas must give identical values, change reports, deltas and
snapshots, byte for byte, at every step."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcloud._core import _ctext, _reference_text
from tests.core.text_support import rid

# astral characters, accents and a lone surrogate (Python strs may hold one) all travel
ALPHABET = st.sampled_from(["a", "b", "c", " ", "\n", "é", "ß", "中", "😀", "\ud800"])

STEP = st.one_of(
    st.tuples(
        st.just("insert"),
        st.integers(0, 4),
        st.integers(0, 10**6),
        st.text(ALPHABET, min_size=1, max_size=12),
    ),
    st.tuples(st.just("delete"), st.integers(0, 4), st.integers(0, 10**6), st.integers(1, 8)),
    st.tuples(st.just("send"), st.integers(0, 4)),
    st.tuples(st.just("deliver"), st.integers(0, 10**6), st.integers(0, 4)),
    st.tuples(st.just("sync"), st.integers(0, 4), st.integers(0, 4)),
)


class Pair:
    """The same replica in both implementations; every call is made on both and compared."""

    def __init__(self, replica_id: bytes) -> None:
        self.replica_id = replica_id
        self.twin = _reference_text.Text(replica_id)
        self.fast = _ctext.Text(replica_id)

    def both(self, method: str, *args: Any) -> Any:
        expected = getattr(self.twin, method)(*args)
        got = getattr(self.fast, method)(*args)
        assert got == expected, (method, args)
        return expected

    def check(self) -> None:
        assert self.fast.value() == self.twin.value()
        assert len(self.fast) == len(self.twin)
        assert self.fast.version() == self.twin.version()


def run_program(n_replicas: int, steps: list[tuple[Any, ...]], order: list[int]) -> None:
    pairs = [Pair(rid(n)) for n in range(n_replicas)]
    network: list[bytes] = []
    for step in steps:
        kind = step[0]
        if kind == "insert":
            pair = pairs[step[1] % n_replicas]
            pair.both("insert", step[2] % (len(pair.twin) + 1), step[3])
        elif kind == "delete":
            pair = pairs[step[1] % n_replicas]
            if len(pair.twin):
                pos = step[2] % len(pair.twin)
                pair.both("delete", pos, min(step[3], len(pair.twin) - pos))
        elif kind == "send":
            delta = pairs[step[1] % n_replicas].both("take_pending")
            if delta:
                network.append(delta)
        elif kind == "deliver" and network:
            pairs[step[2] % n_replicas].both("apply", network[step[1] % len(network)])
        elif kind == "sync":
            source, sink = pairs[step[1] % n_replicas], pairs[step[2] % n_replicas]
            delta = source.both("encode_since", sink.twin.version())
            sink.both("apply", delta)
        for pair in pairs:
            pair.check()
    for pair in pairs:
        delta = pair.both("take_pending")
        if delta:
            network.append(delta)
    # everything reaches everyone, each replica in its own order
    for number, pair in enumerate(pairs):
        for k in range(len(network)):
            pair.both("apply", network[(order[k % len(order)] + k * (number + 1)) % len(network)])
        for delta in network:
            pair.both("apply", delta)
        pair.check()
    states = {pair.both("encode_state") for pair in pairs}
    assert len(states) == 1
    state = states.pop()
    assert len({pair.twin.value() for pair in pairs}) == 1
    twin = _reference_text.Text.decode_state(state, rid(9))
    fast = _ctext.Text.decode_state(state, rid(9))
    assert twin.encode_state() == fast.encode_state() == state
    assert fast.value() == twin.value() == pairs[0].twin.value()
    assert pairs[0].both("encode_since", {}) == fast.encode_since({})


@given(
    st.integers(3, 5),
    st.lists(STEP, max_size=80),
    st.lists(st.integers(0, 1000), min_size=1, max_size=20),
)
def test_cython_matches_twin_on_random_concurrent_streams(
    n_replicas: int, steps: list[tuple[Any, ...]], order: list[int]
) -> None:
    run_program(n_replicas, steps, order)


@given(st.lists(STEP, max_size=40), st.integers(0, 2**32))
def test_cython_matches_twin_on_snapshots_mid_stream(
    steps: list[tuple[Any, ...]], cut: int
) -> None:
    """A replica reloaded from its snapshot mid-stream behaves the same in both."""
    pairs = [Pair(rid(n)) for n in range(3)]
    for number, step in enumerate(steps):
        if step[0] in ("insert", "delete"):
            pair = pairs[step[1] % 3]
            if step[0] == "insert":
                pair.both("insert", step[2] % (len(pair.twin) + 1), step[3])
            elif len(pair.twin):
                pos = step[2] % len(pair.twin)
                pair.both("delete", pos, min(step[3], len(pair.twin) - pos))
        elif step[0] == "send":
            delta = pairs[step[1] % 3].both("take_pending")
            for other in pairs:
                other.both("apply", delta)
        if number == cut % (len(steps) or 1):
            victim = pairs[step[1] % 3] if len(step) > 1 else pairs[0]
            state = victim.both("encode_state")
            victim.twin = _reference_text.Text.decode_state(state, victim.replica_id)
            victim.fast = _ctext.Text.decode_state(state, victim.replica_id)
            victim.check()


def random_program(seed: int, length: int) -> list[tuple[Any, ...]]:
    """A long edit stream: enough runs to split blocks, long inserts, long deletes."""
    rng = random.Random(seed)
    letters = "abc é中😀"
    steps: list[tuple[Any, ...]] = []
    for _ in range(length):
        roll = rng.random()
        who = rng.randrange(5)
        if roll < 0.45:
            size = rng.choice([1, 1, 2, 3, 40])
            text = "".join(rng.choice(letters) for _ in range(size))
            steps.append(("insert", who, rng.randrange(10**6), text))
        elif roll < 0.7:
            steps.append(("delete", who, rng.randrange(10**6), rng.choice([1, 1, 2, 30])))
        elif roll < 0.85:
            steps.append(("send", who))
        elif roll < 0.95:
            steps.append(("deliver", rng.randrange(10**6), who))
        else:
            steps.append(("sync", who, rng.randrange(5)))
    return steps


@pytest.mark.parametrize("seed", range(12))
def test_cython_matches_twin_on_long_seeded_streams(seed: int) -> None:
    run_program(3 + seed % 3, random_program(seed, 500), [seed, 7, 3, 11])


def test_scattered_edits_in_one_pasted_run_agree() -> None:
    """One long insert cut into hundreds of fragments by scattered edits, merged remotely:
    exercises the per-insert fragment index of the Cython module."""
    rng = random.Random(5)
    author, fast_author = _reference_text.Text(rid(0)), _ctext.Text(rid(0))
    for doc in (author, fast_author):
        doc.insert(0, "lorem ipsum dolor sit amet " * 80)
    pasted = author.take_pending()
    assert fast_author.take_pending() == pasted
    for _ in range(400):
        pos = rng.randrange(len(author))
        for doc in (author, fast_author):
            doc.delete(pos, 1)
        if rng.random() < 0.3:
            pos = rng.randrange(len(author) + 1)
            for doc in (author, fast_author):
                doc.insert(pos, "#")
    edits = author.take_pending()
    assert fast_author.take_pending() == edits
    readers = [_reference_text.Text(rid(1)), _ctext.Text(rid(1))]
    for reader in readers:
        reader.apply(edits)  # held: the paste is missing
        reader.apply(pasted)
    assert readers[0].value() == readers[1].value() == author.value() == fast_author.value()
    assert readers[0].encode_state() == readers[1].encode_state() == author.encode_state()
