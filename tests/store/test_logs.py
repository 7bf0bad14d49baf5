"""Delta logs, versions, checkpoints and truncation, on a real LMDB store."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcloud._store import (
    MIN_MAP_SIZE,
    AppendResult,
    LogRecord,
    LogSummary,
    Store,
    open_store,
)
from p2pcloud.errors import StoreUsageError
from tests.store.conftest import SC, SC2, A, B, C

STORED, COVERED, CONFLICT = AppendResult.STORED, AppendResult.COVERED, AppendResult.CONFLICT


def stream(store: Store, origin: bytes, after: int = 0, limit: int = 64) -> list[LogRecord]:
    """Read a whole log the way sync does: bounded batches, each from where the last ended."""
    out: list[LogRecord] = []
    while True:
        batch = store.envelopes_after(SC, origin, after, limit)
        if not batch:
            return out
        assert sum(len(r.envelope) for r in batch) <= limit or len(batch) == 1
        out.extend(batch)
        after = batch[-1].last


def test_commit_local_sequence_and_version(store: Store) -> None:
    assert store.version(SC) == {}
    assert store.commit_local(SC, b"d1", 1, 1, origin=A) is STORED
    assert store.commit_local(SC, b"d2", 2, 5, origin=A) is STORED
    assert store.commit_local(SC, b"d3", 6, 6, origin=A) is STORED
    assert store.version(SC) == {A: 6}
    assert store.version(SC2) == {}
    assert [(r.first, r.last, r.envelope) for r in stream(store, A)] == [
        (1, 1, b"d1"), (2, 5, b"d2"), (6, 6, b"d3"),
    ]


def test_commit_local_retry_is_a_reported_no_op(store: Store) -> None:
    store.commit_local(SC, b"d1", 1, 2, origin=A)
    assert store.commit_local(SC, b"d1", 1, 2, origin=A) is COVERED
    assert len(stream(store, A)) == 1


def test_commit_local_refuses_counter_reuse(store: Store) -> None:
    store.commit_local(SC, b"d1", 1, 2, origin=A)
    with pytest.raises(StoreUsageError, match="counter reuse"):
        store.commit_local(SC, b"other", 1, 2, origin=A)
    with pytest.raises(StoreUsageError, match="counter reuse"):
        store.commit_local(SC, b"other", 2, 3, origin=A)
    assert [r.envelope for r in stream(store, A)] == [b"d1"]
    assert store.version(SC) == {A: 2}


def test_out_of_order_appends_fill_the_gap(store: Store) -> None:
    results = store.append_envelopes(SC, [(B, b"b7", 7, 9), (B, b"b4", 4, 6)])
    assert results == [STORED, STORED]
    assert store.version(SC) == {}  # nothing contiguous from counter 1 yet
    assert store.all_versions() == {}
    assert store.append_envelopes(SC, [(B, b"b1", 1, 3)]) == [STORED]
    assert store.version(SC) == {B: 9}  # the head absorbed both held ranges
    assert [r.first for r in stream(store, B)] == [1, 4, 7]


def test_covered_and_conflicting_appends(store: Store) -> None:
    store.append_envelopes(SC, [(B, b"b1", 1, 3), (B, b"b10", 10, 12)])
    got = store.append_envelopes(
        SC,
        [
            (B, b"b1", 1, 3),  # the same envelope again
            (B, b"x", 2, 3),  # inside the held contiguous prefix
            (B, b"b10", 10, 12),  # the same out-of-order envelope again
            (B, b"x", 11, 12),  # inside a held range past the head
            (B, b"x", 9, 10),  # partly overlaps 10..12: two deltas claim dot 10
            (B, b"x", 12, 14),  # partly overlaps 10..12 from above
            (B, b"x", 8, 13),  # contains 10..12
            (B, b"b4", 4, 9),  # fits exactly into the gap
        ],
    )
    assert got == [COVERED, COVERED, COVERED, COVERED, CONFLICT, CONFLICT, CONFLICT, STORED]
    assert store.version(SC) == {B: 12}
    assert [(r.first, r.last, r.envelope) for r in stream(store, B)] == [
        (1, 3, b"b1"), (4, 9, b"b4"), (10, 12, b"b10"),
    ]


def test_origins_and_subclouds_do_not_mix(store: Store) -> None:
    store.append_envelopes(SC, [(A, b"a", 1, 1), (B, b"b", 1, 2)])
    store.append_envelopes(SC2, [(A, b"a2", 1, 5)])
    assert store.version(SC) == {A: 1, B: 2}
    assert store.version(SC2) == {A: 5}
    assert store.all_versions() == {SC: {A: 1, B: 2}, SC2: {A: 5}}
    assert [r.envelope for r in stream(store, A)] == [b"a"]
    assert store.envelopes_after(SC2, A, 0, 100) == [LogRecord(A, 1, 5, b"a2")]


def test_prefix_ids_do_not_collide(store: Store) -> None:
    # a sub-cloud id that is a prefix of another, and origins that differ only in length
    short, long_ = b"S" * 8, b"S" * 9
    store.append_envelopes(short, [(b"A" * 8, b"x", 1, 1)])
    store.append_envelopes(long_, [(b"A" * 9, b"y", 1, 1)])
    assert store.version(short) == {b"A" * 8: 1}
    assert store.version(long_) == {b"A" * 9: 1}
    assert store.envelopes_after(short, b"A" * 9, 0, 10) == []


def test_bounded_batches_stream_in_order(store: Store) -> None:
    items = [(A, bytes([i % 251]) * (10 + i % 37), 2 * i + 1, 2 * i + 2) for i in range(300)]
    store.append_envelopes(SC, items[::-1])  # any order in, counter order out
    for limit in (1, 50, 400, 10_000):
        got = stream(store, A, limit=limit)
        assert [(r.first, r.last, r.envelope) for r in got] == [(f, la, e) for _, e, f, la in items]
    batch = store.envelopes_after(SC, A, 0, 100)
    assert sum(len(r.envelope) for r in batch) <= 100
    assert batch[0].first == 1


def test_a_batch_returns_one_record_larger_than_its_limit(store: Store) -> None:
    store.commit_local(SC, b"x" * 5000, 1, 1, origin=A)
    store.commit_local(SC, b"y" * 10, 2, 2, origin=A)
    assert [r.first for r in store.envelopes_after(SC, A, 0, 10)] == [1]
    assert [r.first for r in store.envelopes_after(SC, A, 1, 10)] == [2]


def test_envelopes_after_includes_a_range_straddling_the_counter(store: Store) -> None:
    store.append_envelopes(SC, [(A, b"a1", 1, 4), (A, b"a5", 5, 8)])
    assert [r.first for r in store.envelopes_after(SC, A, 2, 1000)] == [1, 5]
    assert [r.first for r in store.envelopes_after(SC, A, 4, 1000)] == [5]
    assert store.envelopes_after(SC, A, 8, 1000) == []
    assert store.envelopes_after(SC, B, 0, 1000) == []


def test_batch_is_atomic_on_bad_input(store: Store) -> None:
    store.append_envelopes(SC, [(A, b"a", 1, 1)])
    with pytest.raises(StoreUsageError):
        store.append_envelopes(SC, [(A, b"a2", 2, 2), (A, b"bad", 5, 4)])
    with pytest.raises(StoreUsageError):
        store.append_envelopes(SC, [(A, b"a2", 2, 2), (A, "text", 3, 3)])  # type: ignore[list-item]
    with pytest.raises(StoreUsageError):
        store.append_envelopes(SC, [(A, b"a2", 2, 2), (A, b"x")])  # type: ignore[list-item]
    assert store.version(SC) == {A: 1}
    assert store.append_envelopes(SC, []) == []


def test_checkpoint_load_state_and_truncate(store: Store) -> None:
    for c in range(1, 11):
        store.commit_local(SC, b"a%d" % c, c, c, origin=A)
    store.append_envelopes(SC, [(B, b"b1", 1, 3), (B, b"b4", 4, 6)])
    state = store.load_state(SC)
    assert state.snapshot is None and state.version == {}
    assert len(state.records) == 12

    store.checkpoint(SC, b"SNAP-1", {A: 6, B: 3})
    state = store.load_state(SC)
    assert state.snapshot == b"SNAP-1"
    assert state.version == {A: 6, B: 3}
    assert [(r.origin, r.first) for r in state.records] == [
        (A, 7), (A, 8), (A, 9), (A, 10), (B, 4),
    ]
    # truncation never cuts past the checkpoint (B is clamped to 3, C is unknown)
    assert store.truncate(SC, {A: 4, B: 100, C: 7}) == 5
    assert [r.first for r in stream(store, A)] == [5, 6, 7, 8, 9, 10]
    assert [r.first for r in stream(store, B)] == [4]
    assert store.version(SC) == {A: 10, B: 6}
    assert store.load_state(SC).records == state.records
    # a replay would find every counter: the checkpoint, then the log after it
    assert store.truncate(SC, {A: 100}) == 2
    assert store.load_state(SC).records == state.records


def test_summaries_floors_and_get_checkpoint(store: Store) -> None:
    assert store.summary(SC) == LogSummary()
    assert store.get_checkpoint(SC) is None
    for c in range(1, 7):
        store.commit_local(SC, b"x" * c, c, c, origin=A)
    store.append_envelopes(SC, [(B, b"yy", 1, 3), (B, b"zzz", 9, 9)])  # 4..8 missing
    store.append_envelopes(SC2, [(A, b"w", 1, 2)])
    assert store.summary(SC) == LogSummary({A: 6, B: 3}, {}, {}, 21 + 5, 6 + 4)
    store.checkpoint(SC, b"SNAP", {A: 4, B: 3})
    assert store.get_checkpoint(SC) == (b"SNAP", {A: 4, B: 3})
    assert store.truncate(SC, {A: 3, B: 3}) == 4
    want = LogSummary({A: 6, B: 3}, {A: 3, B: 3}, {A: 4, B: 3}, 4 + 5 + 6 + 3, 3 + 1)
    assert store.summary(SC) == want
    # a lower cut later does not lower the floor
    assert store.truncate(SC, {A: 1}) == 0
    assert store.summaries() == {SC: want, SC2: LogSummary({A: 2}, {}, {}, 1, 2)}
    assert store.remove_subcloud(SC)
    assert store.summaries() == {SC2: LogSummary({A: 2}, {}, {}, 1, 2)}


def test_checkpoint_raises_heads_and_absorbs_held_ranges(store: Store) -> None:
    store.append_envelopes(SC, [(B, b"b5", 5, 7), (B, b"b9", 9, 9), (B, b"b8", 8, 8)])
    assert store.version(SC) == {}
    store.checkpoint(SC, b"S", {B: 4, C: 2})  # a snapshot from a peer covering 1..4
    assert store.version(SC) == {B: 9, C: 2}
    # an envelope inside what the checkpoint covers is a no-op
    assert store.append_envelopes(SC, [(C, b"c", 1, 2), (C, b"c3", 3, 3)]) == [COVERED, STORED]
    assert store.version(SC) == {B: 9, C: 3}


def test_checkpoint_straddling_a_held_range(store: Store) -> None:
    store.append_envelopes(SC, [(B, b"b3", 3, 8)])
    store.checkpoint(SC, b"S", {B: 5})
    assert store.version(SC) == {B: 8}
    assert [r.first for r in store.load_state(SC).records] == [3]


def test_checkpoint_must_not_move_backwards(store: Store) -> None:
    store.checkpoint(SC, b"S2", {A: 5, B: 2})
    with pytest.raises(StoreUsageError, match="does not cover"):
        store.checkpoint(SC, b"S1", {A: 4, B: 9})
    with pytest.raises(StoreUsageError, match="does not cover"):
        store.checkpoint(SC, b"S1", {A: 9})
    assert store.load_state(SC).snapshot == b"S2"
    store.checkpoint(SC, b"S3", {A: 5, B: 2, C: 1})
    assert store.load_state(SC).version == {A: 5, B: 2, C: 1}


def test_remove_subcloud_drops_its_logs_only(store: Store) -> None:
    store.append_envelopes(SC, [(A, b"a", 1, 1)])
    store.append_envelopes(SC2, [(A, b"a", 1, 1)])
    store.checkpoint(SC, b"S", {A: 1})
    assert store.remove_subcloud(SC) is True
    assert store.remove_subcloud(SC) is False
    assert store.version(SC) == {} and store.load_state(SC).snapshot is None
    assert store.version(SC2) == {A: 1}


def test_logs_survive_close_and_reopen(store_path: Path) -> None:
    with open_store(store_path, initial_map_size=MIN_MAP_SIZE) as s:
        for c in range(1, 51):
            s.commit_local(SC, b"%d" % c, c, c, origin=A)
        s.append_envelopes(SC, [(B, b"b", 1, 9), (C, b"c", 4, 4)])
        s.checkpoint(SC, b"SNAP", {A: 20})
    with open_store(store_path) as s:
        assert s.version(SC) == {A: 50, B: 9}
        assert [r.envelope for r in stream(s, A)] == [b"%d" % c for c in range(1, 51)]
        assert s.envelopes_after(SC, C, 0, 10) == [LogRecord(C, 4, 4, b"c")]
        state = s.load_state(SC)
        assert state.snapshot == b"SNAP" and len(state.records) == 30 + 2


# -- a model: the store's version and log against a set of counters -------------------------

_ranges = st.lists(
    st.tuples(st.sampled_from([A, B]), st.integers(1, 40), st.integers(0, 3)),
    max_size=40,
)


@given(ops=_ranges, cut=st.integers(0, 45))
def test_version_and_log_match_a_model(tmp_path_factory: pytest.TempPathFactory,
                                       ops: list[tuple[bytes, int, int]], cut: int) -> None:
    path = tmp_path_factory.mktemp("model")
    held: dict[bytes, list[tuple[int, int]]] = {A: [], B: []}
    with open_store(path / "s", initial_map_size=MIN_MAP_SIZE) as s:
        # three batches: each item sees the ones before it, within a batch and across
        third = len(ops) // 3
        for part in (ops[:third], ops[third : 2 * third], ops[2 * third :]):
            batch, expected = [], []
            for origin, first, width in part:
                last = first + width
                mine = held[origin]
                head = _contiguous(mine)
                inside = any(f <= first and last <= la for f, la in mine)
                overlaps = any(not (last < f or la < first) for f, la in mine)
                expect = COVERED if last <= head or inside else CONFLICT if overlaps else STORED
                batch.append((origin, b"%s:%d-%d" % (origin[:1], first, last), first, last))
                expected.append(expect)
                if expect is STORED:
                    mine.append((first, last))
            assert s.append_envelopes(SC, batch) == expected
        want = {o: _contiguous(r) for o, r in held.items() if _contiguous(r)}
        assert s.version(SC) == want
        for origin, mine in held.items():
            got = [(r.first, r.last) for r in s.envelopes_after(SC, origin, 0, 1 << 20)]
            assert got == sorted(mine)
        # checkpoint at the held version, truncate at `cut`, and the state stays whole
        s.checkpoint(SC, b"snap", want)
        s.truncate(SC, {A: cut, B: cut})
        state = s.load_state(SC)
        for origin, mine in held.items():
            covered = min(cut, want.get(origin, 0))
            kept = [(r.first, r.last) for r in s.envelopes_after(SC, origin, 0, 1 << 20)]
            assert kept == sorted((f, la) for f, la in mine if la > covered)
            replay = [(r.first, r.last) for r in state.records if r.origin == origin]
            assert replay == sorted((f, la) for f, la in mine if la > want.get(origin, 0))
        assert s.version(SC) == want


def _contiguous(ranges: list[tuple[int, int]]) -> int:
    head = 0
    for f, la in sorted(ranges):
        if f > head + 1:
            break
        head = max(head, la)
    return head
