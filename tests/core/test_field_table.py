"""The compiled core's C field tables agree with the twin's dicts on every edge.

The compiled core keeps each document's fields in a C hash table (names as UTF-8 bytes,
entries as structs in a pool, removed slots compacted away on a rebuild) and writes
``set_many`` into a fresh document without a lookup per key. These tests aim at what that
design could get wrong: the bulk path's inline pairs and its fallbacks (every value type,
bad keys and values part-way, a value whose own code writes to the replica), insertion
order after removals and rebuilds, long chains from many replicas, and counters at the
top of their range. Each compares everything observable with the specification.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcloud._core import _cmerge, _reference
from p2pcloud.errors import CoreUsageError, DecodeError

NOW = 1_700_000_000_000
IMPLS = (_reference, _cmerge)

KEYS = st.one_of(
    st.from_regex(r"[a-z]{1,6}[0-9]{0,4}", fullmatch=True),
    st.text(min_size=0, max_size=6),
    st.sampled_from(["", "clé", "ключ", "🔑", "a" * 1024, "b" * 1025, "\ud800"]),
    st.integers(0, 3),  # not a str: refused
)
VALUES = st.one_of(
    st.none(), st.booleans(),
    st.integers(-(2**64) - 3, 2**64 + 3),
    st.sampled_from([0, 127, 128, -1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1]),
    st.floats(allow_nan=False),
    st.text(max_size=8), st.just("\udc80"), st.binary(max_size=8),
    st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=2),
    st.tuples(st.integers(0, 3)),
    st.builds(lambda h, n: _reference.BlobRef(h, n), st.binary(min_size=1, max_size=4),
              st.integers(0, 10)),
    st.just(object()),  # unsupported: refused
)


def _outcome(fn: Any) -> Any:
    try:
        return ("ok", fn())
    except (CoreUsageError, DecodeError, TypeError) as exc:
        return ("error", type(exc).__name__, str(exc))


def _bulk(impl: Any, pre: str, items: dict[Any, Any]) -> list[Any]:
    r = impl.Replica(b"replica1")
    keys = list(items)
    out0: Any = None
    r.begin(NOW)
    if pre == "first" and keys:
        out0 = _outcome(lambda: r.set("kv", "main", keys[0], "old"))
    elif pre == "other":
        r.set("kv", "main", "zz-other", "old")
    elif pre == "some":
        for k in keys[1::2]:
            if isinstance(k, str) and len(k.encode("utf-8", "replace")) <= 1024:
                _outcome(lambda k=k: r.set("kv", "main", k, "old"))
    elif pre == "removed":
        r.set("kv", "main", "zz-gone", 1)
        r.remove_field("kv", "main", "zz-gone")
    first = r.commit()
    r.begin(NOW + 1)
    result = _outcome(lambda: r.set_many("kv", "main", items))
    delta = r.commit()
    out = [out0, first, result, delta, r.encode_snapshot(), r.document("kv", "main")]
    # the table after the bulk write still finds, replaces and removes every key
    r.begin(NOW + 2)
    for k in keys[::3]:
        out.append(_outcome(lambda k=k: r.set("kv", "main", k, "again")))
    for k in keys[1::4]:
        out.append(_outcome(lambda k=k: r.remove_field("kv", "main", k)))
    out += [r.commit(), r.encode_snapshot(), r.document("kv", "main")]
    loaded = impl.Replica.load(r.encode_snapshot(), b"replica2", NOW + 5)
    out += [loaded.encode_snapshot(), loaded.document("kv", "main")]
    return out


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(KEYS, VALUES, max_size=80),
       st.sampled_from(["fresh", "first", "other", "some", "removed"]))
def test_set_many_bulk_path_matches_reference(items: dict[Any, Any], pre: str) -> None:
    assert _bulk(_cmerge, pre, items) == _bulk(_reference, pre, items)


def test_set_many_big_fresh_document_matches_reference() -> None:
    """Past the presizing threshold, with a bad value near the end: the pairs before it stay."""
    items: dict[Any, Any] = {f"key{i}": (i if i % 5 else f"v{i}") for i in range(3000)}
    items["clé-non-ascii"] = 2**64 - 1
    items["big"] = -(2**64)
    items["bad"] = object()
    items["after"] = 1
    assert _bulk(_cmerge, "fresh", items) == _bulk(_reference, "fresh", items)


class _Sneaky(list):  # type: ignore[type-arg]
    """A list value whose iteration writes to the replica (user code inside set_many)."""

    replica: Any = None
    action: str = ""

    def __iter__(self) -> Any:
        # acts once: the twin iterates a stored container twice (encode, then copy)
        r = type(self).replica
        action, self.action = self.action, ""
        if action == "later-key":
            r.set("kv", "main", "k7", "from inside")
        elif action == "remove":
            r.remove_field("kv", "main", "k1")
        elif action == "swap":
            r.set("kv", "main", "k9", "in")
            r.remove_field("kv", "main", "k0")
        return super().__iter__()


def _reentrant(impl: Any, action: str) -> list[Any]:
    r = impl.Replica(b"replica1")
    _Sneaky.replica = r
    sneaky = _Sneaky([1, 2])
    sneaky.action = action
    items = {f"k{i}": i for i in range(12)}
    items["k3"] = sneaky
    r.begin(NOW)
    r.set_many("kv", "main", items)
    return [r.commit(), r.encode_snapshot(), r.document("kv", "main")]


def test_set_many_value_that_writes_to_the_document() -> None:
    for action in ("later-key", "remove", "swap"):
        assert _reentrant(_cmerge, action) == _reentrant(_reference, action), action


def _churn(impl: Any, seed: int) -> list[Any]:
    """Fields removed and written again many times: removed slots, rebuilds, order."""
    rng = random.Random(seed)
    a = impl.Replica(b"replicaA")
    b = impl.Replica(b"replicaB")
    out: list[Any] = []
    keys = [f"f{i}" for i in range(60)] + ["é", "ü2", "x" * 1024]
    for step in range(40):
        a.begin(NOW + step)
        for _ in range(rng.randrange(1, 40)):
            k = rng.choice(keys)
            op = rng.random()
            if op < 0.45:
                a.set("kv", "d", k, step)
            elif op < 0.8:
                a.remove_field("kv", "d", k)
            elif op < 0.85:
                a.remove("kv", "d")
            elif op < 0.9:
                a.set_many("kv", "d", {kk: -step for kk in rng.sample(keys, 5)})
            else:
                a.set_many("kv", f"n{step}", {kk: step for kk in keys})
        delta = a.commit()
        out += [delta, b.apply([delta], NOW + 100), a.document("kv", "d")]
    out += [a.encode_snapshot(), b.encode_snapshot(), b.encode_since({b"replicaA": 17})]
    return out


def test_field_table_churn_matches_reference() -> None:
    for seed in range(6):
        assert _churn(_cmerge, seed) == _churn(_reference, seed), seed


def _many_replicas(impl: Any, n: int, seed: int) -> list[Any]:
    """n replicas write one field (and a set and a counter) concurrently: long chains."""
    rng = random.Random(seed)
    reps = [impl.Replica(f"replica-{i:04d}".encode()) for i in range(n)]
    deltas = []
    for i, r in enumerate(reps):
        r.begin(NOW + rng.randrange(3))
        r.set("kv", "d", "x", i)
        r.set_add("kv", "d", "tags", i % 7)
        r.increment("kv", "d", "count", i - n // 2)
        r.set_mv("kv", "d", "mv", f"v{i}")
        deltas.append(r.commit())
    rng.shuffle(deltas)
    sink = impl.Replica(b"sink-replica")
    out = [sink.apply(deltas[: n // 2], NOW + 10), sink.apply(deltas, NOW + 10)]
    out += [sink.get("kv", "d", f) for f in ("x", "tags", "count", "mv")]
    out.append(sink.conflicts("kv", "d", "x"))
    # one replica resolves the field after seeing everything: the whole chain is killed
    last = reps[0]
    last.apply(deltas, NOW + 10)
    last.begin(NOW + 20)
    last.set("kv", "d", "x", "resolved")
    last.set_discard("kv", "d", "tags", 3)
    resolve = last.commit()
    out += [resolve, sink.apply([resolve], NOW + 30), sink.get("kv", "d", "x"),
            sink.get("kv", "d", "tags"), sink.encode_snapshot()]
    return out


def test_many_replicas_on_one_field_match_reference() -> None:
    for n, seed in ((40, 1), (300, 2)):
        assert _many_replicas(_cmerge, n, seed) == _many_replicas(_reference, n, seed)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _delta_at(start: int, nops: int, rid: bytes = b"replicaZ") -> bytes:
    """A hand-made delta: one run of ``nops`` writes from counter ``start``."""
    ops = b""
    for i in range(nops):
        name = f"k{i}".encode()
        if i == 0:
            ops += bytes([0x31]) + b"\x01\x02kv" + b"\x01\x01d"  # new coll "kv", doc "d"
            ops += b"\x01" + _varint(len(name)) + name + b"\x80"
        else:
            ops += bytes([0x01]) + b"\x01" + _varint(len(name)) + name + b"\x81"
    return (b"\xd7\x01\x01" + _varint(len(rid)) + rid + b"\x00\x01\x00" + _varint(start)
            + _varint(NOW << 16) + _varint(nops) + ops)


def _top(impl: Any) -> list[Any]:
    top = _reference.MAX_COUNTER
    out: list[Any] = []
    r = impl.Replica(b"replicaA")
    out.append(_outcome(lambda: r.apply([_delta_at(top - 1, 2)], NOW + 1)))
    out.append(_outcome(lambda: r.apply([_delta_at(top - 1, 3)], NOW + 1)))
    out.append(_outcome(lambda: r.apply([_delta_at(top, 1, b"replicaY")], NOW + 1)))
    out.append(r.version())
    snap = r.encode_snapshot()
    out.append(snap)
    # a replica that loads its own dots at the top cannot write any more
    own = impl.Replica.load(snap, b"replicaZ", NOW + 1)
    own.begin(NOW + 2)
    out.append(_outcome(lambda: own.set("kv", "d", "more", 1)))
    out.append(own.commit())
    out.append(own.encode_since({b"replicaZ": top - 1}))
    return out


def test_counters_at_the_top_of_their_range_match_reference() -> None:
    got, want = _top(_cmerge), _top(_reference)
    assert got == want
    assert want[0][0] == "ok" and want[1][0] == "error" and want[2][0] == "ok"


def _delta_values(values: list[bytes]) -> bytes:
    """A hand-made delta: one run writing fields v0, v1, ... with these encoded values."""
    ops = b""
    for i, enc in enumerate(values):
        name = f"v{i}".encode()
        head = bytes([0x31]) + b"\x01\x02kv\x01\x01d" if i == 0 else bytes([0x01])
        ops += head + b"\x01" + _varint(len(name)) + name + enc
    rid = b"replicaZ"
    return (b"\xd7\x01\x01" + _varint(len(rid)) + rid + b"\x00\x01\x00\x01"
            + _varint(NOW << 16) + _varint(len(values)) + ops)


INT_EDGES = [2**63 - 2, 2**63 - 1, 2**63, 2**64 - 1, 127, 128, 0]


def _int_edges(impl: Any) -> list[Any]:
    encs = [b"\x03" + _varint(v) for v in INT_EDGES]  # TAG_UINT, some not canonical
    encs += [b"\x04" + _varint(v) for v in INT_EDGES]  # TAG_NEGINT: -1 - v
    out: list[Any] = []
    r = impl.Replica(b"replicaA")
    out.append(_outcome(lambda: r.apply([_delta_values(encs)], NOW + 1)))
    out.append(r.document("kv", "d"))
    out.append(r.encode_snapshot())
    loaded = impl.Replica.load(r.encode_snapshot(), b"replicaB", NOW + 1)
    out.append(loaded.document("kv", "d"))
    # local writes at the same edges, then a since-delta of them
    loaded.begin(NOW + 2)
    for i, v in enumerate(INT_EDGES):
        loaded.set("kv", "local", f"p{i}", v)
        loaded.set_mv("kv", "local", f"n{i}", -1 - v)
    out.append(loaded.commit())
    out.append(loaded.encode_since({b"replicaZ": 5}))
    # truncated and overlong varints after an int tag refuse the whole delta
    for bad in (b"\x03", b"\x03\xff", b"\x04\x80\x80", b"\x03" + b"\xff" * 9 + b"\x02"):
        fresh = impl.Replica(b"replicaC")
        out.append(_outcome(lambda bad=bad, fresh=fresh: fresh.apply(
            [_delta_values([b"\x81", bad])], NOW + 1)))
        out.append(fresh.encode_snapshot())
    return out


def test_register_ints_at_the_64_bit_edges_match_reference() -> None:
    got, want = _int_edges(_cmerge), _int_edges(_reference)
    assert got == want
    assert want[1] is not None and want[1]["v1"] == 2**63 - 1 and want[1]["v8"] == -(2**63)
