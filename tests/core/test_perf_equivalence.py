"""The compiled core's bulk paths agree with the twin byte for byte.

The compiled merge takes shortcuts the twin does not have: it tries a document's next field
in insertion order before a hash probe (the "order hint"), keeps decoded names as UTF-8
slices until a str is needed, lets a field's head object take a new entry's contents, and
encodes since-deltas from a C selection with its own name index. These tests drive those
paths with many keys, in the orders that hit and miss the hint (same order, reversed,
shuffled, with gaps, with fields removed or re-added in between, with non-ASCII names), and
compare every delta, change report, read and snapshot with the specification.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcloud._core import _cmerge, _reference

NOW = 1_700_000_000_000
ORDERS = ["same", "reversed", "shuffled", "gaps", "blocks"]


def _keys(n: int, non_ascii: bool) -> list[str]:
    return [(f"clé{i}" if non_ascii and i % 3 == 0 else f"key{i}") for i in range(n)]


def _order(keys: list[str], how: str, rng: random.Random) -> list[str]:
    if how == "same":
        return list(keys)
    if how == "reversed":
        return keys[::-1]
    if how == "shuffled":
        out = list(keys)
        rng.shuffle(out)
        return out
    if how == "gaps":
        return [k for k in keys if rng.random() < 0.6]
    # blocks: runs in order, the runs themselves shuffled
    blocks = [keys[i:i + 7] for i in range(0, len(keys), 7)]
    rng.shuffle(blocks)
    return [k for b in blocks for k in b]


def _scenario(impl: Any, n: int, how: str, seed: int, non_ascii: bool,
              removed: float, docs: int) -> list[Any]:
    """Two replicas with many concurrent keys; everything observable, in order."""
    rng = random.Random(seed)
    keys = _keys(n, non_ascii)
    seen: list[Any] = []
    a = impl.Replica(b"replicaA")
    b = impl.Replica(b"replicaB")
    a.begin(NOW)
    for d in range(docs):
        a.set_many("kv", f"doc{d}", {k: i for i, k in enumerate(keys)})
    seen.append(a.commit())
    # A removes some fields and re-adds a few (holes and moved keys in its dicts)
    gone = [k for k in keys if rng.random() < removed]
    a.begin(NOW + 1)
    for k in gone:
        a.remove_field("kv", "doc0", k)
    for k in gone[::3]:
        a.set("kv", "doc0", k, "back")
    seen.append(a.commit())
    b.begin(NOW)
    for d in range(docs):
        b.set_many("kv", f"doc{d}", {k: -1 - i for i, k in enumerate(_order(keys, how, rng))})
    delta_b = b.commit()
    seen.append(delta_b)
    # the bulk merge (hint hits and misses), its report, reads
    seen.append(a.apply([delta_b], NOW))
    seen.append(a.document("kv", "doc0"))
    seen.append([a.conflicts("kv", "doc0", k) for k in keys[:: max(1, n // 17)]])
    # anti-entropy both ways, then a partial version
    va = a.version()
    vb = b.version()
    to_a = b.encode_since(va)
    to_b = a.encode_since(vb)
    seen += [to_a, to_b, a.apply([to_a], NOW), b.apply([to_b], NOW)]
    seen.append(a.encode_since({b"replicaA": 1, b"replicaB": max(1, n // 2)}))
    snap = a.encode_snapshot()
    seen += [snap, b.encode_snapshot()]
    # load, and a snapshot merged into a replica that already has part of it
    loaded = impl.Replica.load(snap, b"replicaC", NOW)
    seen.append(loaded.encode_snapshot())
    c = impl.Replica(b"replicaC")
    seen.append(c.apply([delta_b], NOW))
    seen.append(c.apply([snap], NOW))
    seen.append(c.encode_snapshot())
    return seen


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 300), st.sampled_from(ORDERS), st.integers(0, 2**32), st.booleans(),
       st.sampled_from([0.0, 0.1, 0.5]), st.integers(1, 3))
def test_bulk_merge_matches_reference(n: int, how: str, seed: int, non_ascii: bool,
                                      removed: float, docs: int) -> None:
    want = _scenario(_reference, n, how, seed, non_ascii, removed, docs)
    got = _scenario(_cmerge, n, how, seed, non_ascii, removed, docs)
    assert len(got) == len(want)
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        assert g == w, f"observation {i} differs"


def test_large_delta_matches_reference_byte_for_byte() -> None:
    """A 20,000-key delta into a 20,000-key state, every order of the hint at once."""
    for how in ORDERS:
        want = _scenario(_reference, 20_000, how, 7, False, 0.05, 1)
        got = _scenario(_cmerge, 20_000, how, 7, False, 0.05, 1)
        assert got == want, how


def test_since_delta_of_many_transactions_matches_reference() -> None:
    """Workload (c) in small: one-edit transactions on the same keys, synced both ways."""
    out = []
    for impl in (_reference, _cmerge):
        a = impl.Replica(b"replicaA")
        b = impl.Replica(b"replicaB")
        for i in range(1500):
            a.begin(NOW)
            a.set("kv", "main", f"k{i}", i)
            a.commit()
            b.begin(NOW + (i % 3))
            b.set("kv", "main", f"k{(i * 7) % 1500}", -i)
            b.commit()
        m2 = b.encode_since(a.version())
        r1 = a.apply([m2], NOW)
        m3 = a.encode_since(b.version())
        r2 = b.apply([m3], NOW)
        out.append((m2, m3, r1, r2, a.encode_snapshot(), b.encode_snapshot()))
    assert out[0] == out[1]
