"""Range-based set reconciliation: correctness on random sets, and rounds and bytes (G6)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcloud.sync.messages import Reconcile, encode_message
from p2pcloud.sync.reconcile import (
    DIRECT_THRESHOLD,
    FINGERPRINT_SIZE,
    ITEM_THRESHOLD,
    MODE_EMPTY,
    MODE_FP,
    MODE_ITEMS,
    MODE_OFFERED,
    MODE_SPLIT,
    MODE_UNMATCHED,
    Range,
    RangeError,
    ReconcileSet,
    initial_ranges,
    respond,
)


def make(items: dict[bytes, bytes]) -> ReconcileSet:
    s = ReconcileSet()
    for k, d in items.items():
        s.set(k, d)
    return s


def reconcile(
    a: ReconcileSet, b: ReconcileSet, *, direct: bool = False
) -> tuple[set[bytes], int, list[int]]:
    """Run one reconciliation chain A -> B -> A ...; return (ids found, flights, bytes/flight).

    Ids reported by either side, including through direct offers, count as found.
    """
    ranges, found_list = initial_ranges(a, direct=direct)
    found = set(found_list)
    msg = Reconcile(False, tuple(ranges))
    sizes = []
    sides = [b, a]
    turn = 0
    while True:
        sizes.append(len(encode_message(msg)))
        if not msg.ranges:
            break
        reply, differ = respond(sides[turn % 2], msg.ranges)
        found.update(differ)
        msg = Reconcile(True, tuple(reply))
        turn += 1
        assert turn < 40, "reconciliation never ended"
    return found, len(sizes), sizes


def true_diff(x: dict[bytes, bytes], y: dict[bytes, bytes]) -> set[bytes]:
    return {k for k in x.keys() | y.keys() if x.get(k) != y.get(k)}


def random_items(rng: random.Random, m: int) -> dict[bytes, bytes]:
    return {rng.randbytes(16): rng.randbytes(16) for _ in range(m)}


def test_fingerprints_incremental_equal_rebuilt() -> None:
    rng = random.Random(1)
    items = random_items(rng, 500)
    s = make(items)
    root = Range(0, b"", MODE_FP, bytes(FINGERPRINT_SIZE))
    lo, hi = root.bounds()
    s.fingerprint(lo, hi)  # build the tree
    changed = dict(items)
    for k in list(items)[:50]:
        changed[k] = rng.randbytes(16)
        s.set(k, changed[k])
    fresh = make(changed)
    for depth, prefix in [(0, b""), (1, b"\x30"), (2, b"\xa7"), (3, b"\x12\x30")]:
        lo, hi = Range(depth, prefix, MODE_FP, bytes(FINGERPRINT_SIZE)).bounds()
        assert s.fingerprint(lo, hi) == fresh.fingerprint(lo, hi)
    assert s.count(*root.bounds()) == 500
    s.discard(list(items)[0])
    assert s.count(*root.bounds()) == 499


def test_bad_ranges_raise_range_error() -> None:
    s = make({})
    for bad in [
        Range(33, bytes(17), MODE_FP, bytes(FINGERPRINT_SIZE)),
        Range(1, b"", MODE_FP, bytes(FINGERPRINT_SIZE)),
        Range(1, b"\x01", MODE_FP, bytes(FINGERPRINT_SIZE)),  # a bit below the depth
        Range(0, b"", 9, b""),
        Range(0, b"", MODE_FP, b"short"),
        Range(0, b"", MODE_ITEMS, b"123"),
        Range(0, b"", MODE_EMPTY, b"x"),
    ]:
        with pytest.raises(RangeError):
            respond(s, [bad])


def test_children_partition_the_parent() -> None:
    parent = Range(3, b"\xab\xc0", MODE_FP, bytes(FINGERPRINT_SIZE))
    lo, hi = parent.bounds()
    edges = [parent.child(n, MODE_FP, bytes(FINGERPRINT_SIZE)).bounds() for n in range(16)]
    assert edges[0][0] == lo and edges[-1][1] == hi
    assert all(edges[i][1] == edges[i + 1][0] for i in range(15))


@settings(max_examples=60)
@given(
    st.integers(0, 300),
    st.integers(0, 40),
    st.integers(0, 20),
    st.integers(0, 20),
    st.booleans(),
    st.integers(0, 2**32),
)
def test_finds_exactly_the_differences(
    m: int, changed: int, only_a: int, only_b: int, direct: bool, seed: int
) -> None:
    rng = random.Random(seed)
    base = random_items(rng, m)
    a_items = dict(base)
    b_items = dict(base)
    for k in rng.sample(sorted(base), min(changed, m)):
        b_items[k] = rng.randbytes(16)
    a_items.update(random_items(rng, only_a))
    b_items.update(random_items(rng, only_b))
    found, _flights, _sizes = reconcile(make(a_items), make(b_items), direct=direct)
    diff = true_diff(a_items, b_items)
    assert diff <= found  # nothing is missed
    # extras only come from direct offers: a mismatched range of <= DIRECT_THRESHOLD items
    # of one side holds at least one real difference
    assert len(found - diff) <= DIRECT_THRESHOLD * len(diff)


def test_idle_10000_is_one_round_trip_with_a_tiny_message() -> None:
    rng = random.Random(2)
    items = random_items(rng, 10_000)
    found, flights, sizes = reconcile(make(items), make(items))
    assert found == set()
    assert flights == 2  # FP there, empty answer back: one round trip
    assert sizes[0] <= 64, sizes  # G6: one 16-byte fingerprint in a message of at most 64 B
    assert sum(sizes) <= 96, sizes


@pytest.mark.parametrize("k", [1, 10, 100])
def test_k_changed_of_10000_cost_about_log16_rounds(k: int) -> None:
    rng = random.Random(3 + k)
    m = 10_000
    items = random_items(rng, m)
    other = dict(items)
    for key in rng.sample(sorted(items), k):
        other[key] = rng.randbytes(16)
    found, flights, sizes = reconcile(make(items), make(other))
    diff = true_diff(items, other)
    assert diff <= found and len(found - diff) <= DIRECT_THRESHOLD * k
    # G6: at most ceil(log16(M / 32)) + 1 round trips (two flights each)
    bound = math.ceil(math.log(m / 32, 16)) + 1  # G6's formula (negentropy's 32)
    assert flights <= 2 * bound, (flights, sizes)
    # bytes stay proportional to K (16 fingerprints per level per change, plus item lists)
    assert sum(sizes) <= 64 + k * 1200, sizes


def test_direct_mode_offers_small_sets_at_once() -> None:
    rng = random.Random(4)
    a_items = random_items(rng, DIRECT_THRESHOLD)
    b_items = dict(a_items)
    ranges, direct = initial_ranges(make(a_items), direct=True)
    assert [r.mode for r in ranges] == [MODE_OFFERED]
    assert sorted(direct) == sorted(a_items)
    assert respond(make(b_items), ranges) == ([], [])
    # an id only B holds: B reports it itself
    extra = rng.randbytes(16)
    b_items[extra] = rng.randbytes(16)
    assert respond(make(b_items), ranges) == ([], [extra])
    # an id only A holds was offered already: no UNMATCHED round
    del b_items[extra]
    del b_items[sorted(b_items)[0]]
    assert respond(make(b_items), ranges) == ([], [])
    # a plain ITEMS list gets UNMATCHED back, and A maps it to the id
    items_range = Range(0, b"", MODE_ITEMS, ranges[0].payload, ranges[0].salt)
    reply, _ = respond(make(b_items), [items_range])
    assert [r.mode for r in reply] == [MODE_UNMATCHED]
    assert respond(make(a_items), reply)[1] == [sorted(a_items)[0]]


def test_split_payload_must_match_its_bitmap() -> None:
    s = make({})
    with pytest.raises(RangeError):
        respond(s, [Range(0, b"", MODE_SPLIT, b"\x80\x00")])  # one child, no fingerprint
    with pytest.raises(RangeError):
        respond(s, [Range(32, bytes(16), MODE_SPLIT, b"\x00\x00")])
    # a valid split of children we do not hold: every non-empty child is answered EMPTY
    split = Range(0, b"", MODE_SPLIT, b"\x80\x01" + bytes(2 * FINGERPRINT_SIZE))
    reply, differ = respond(s, [split])
    assert [r.mode for r in reply] == [MODE_EMPTY, MODE_EMPTY] and differ == []


@pytest.mark.parametrize("extra", [0, 1])
def test_item_lists_below_the_threshold_splits_above(extra: int) -> None:
    rng = random.Random(5)
    items = random_items(rng, ITEM_THRESHOLD + extra)
    reply, _ = respond(make(items), [Range(0, b"", MODE_FP, bytes(FINGERPRINT_SIZE))])
    assert [r.mode for r in reply] == [MODE_SPLIT if extra else MODE_ITEMS]
