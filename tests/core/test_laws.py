"""CRDT laws, on the compiled core and on the twin.

* Op-based: every delivery order of the committed deltas, with duplicates, converges to one
  state; so does losing some and recovering them by anti-entropy (``encode_since``).
* State-based: merging snapshots is commutative, associative and idempotent.

States are compared by their canonical snapshots (equal states give equal bytes).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcloud._core import _cmerge, _reference
from tests.core.streams import REPLICA_IDS, steps

IMPLS = [pytest.param(_reference, id="python"), pytest.param(_cmerge, id="cython")]
NOW = 1_700_000_000_000
OBSERVER = b"observer"


def _history(impl: Any, n: int, program: list[Any]) -> tuple[list[Any], list[bytes]]:
    """Run a program; return the replicas and every delta they committed."""
    reps = [impl.Replica(REPLICA_IDS[i]) for i in range(n)]
    deltas: list[bytes] = []
    now = NOW
    for step in program:
        now += 3
        if step[0] == "txn":
            r = reps[step[1]]
            r.begin(now)
            for name, *args in step[2]:
                try:
                    getattr(r, name)(*args)
                except Exception as exc:  # noqa: BLE001 - only usage errors are expected
                    assert type(exc).__name__ == "CoreUsageError"
            d = r.commit()
            if d:
                deltas.append(d)
        elif step[0] == "deliver" and deltas:
            reps[step[2]].apply([deltas[step[3] % len(deltas)]], now)
        elif step[0] == "sync":
            reps[step[2]].apply([reps[step[1]].encode_since(reps[step[2]].version())], now)
        elif step[0] == "snapshot":
            reps[step[2]].apply([reps[step[1]].encode_snapshot()], now)
    return reps, deltas


histories = st.integers(3, 5).flatmap(lambda n: st.tuples(st.just(n), steps(n)))


@pytest.mark.parametrize("impl", IMPLS)
@given(case=histories, data=st.data())
def test_any_delivery_order_with_duplicates_converges(impl: Any, case: Any, data: Any) -> None:
    n, program = case
    reps, deltas = _history(impl, n, program)
    snapshots = set()
    for _ in range(3):
        order = data.draw(st.permutations(deltas))
        dups = data.draw(st.lists(st.sampled_from(deltas), max_size=4)) if deltas else []
        observer = impl.Replica(OBSERVER)
        for d in order + dups:
            observer.apply([d], NOW + 10_000)
        snapshots.add(observer.encode_snapshot())
    # one batch call is the same as one delta at a time
    batch = impl.Replica(OBSERVER)
    batch.apply(deltas, NOW + 10_000)
    snapshots.add(batch.encode_snapshot())
    # and every replica that made them, once it has them all, holds the same state
    for r in reps:
        r.apply(deltas, NOW + 10_000)
        again = impl.Replica(OBSERVER)
        again.apply([r.encode_snapshot()], NOW + 10_000)
        snapshots.add(again.encode_snapshot())
    assert len(snapshots) == 1


@pytest.mark.parametrize("impl", IMPLS)
@given(case=histories, data=st.data())
def test_loss_then_anti_entropy_converges(impl: Any, case: Any, data: Any) -> None:
    n, program = case
    _reps, deltas = _history(impl, n, program)
    full = impl.Replica(OBSERVER)
    full.apply(deltas, NOW + 10_000)
    observers = [impl.Replica(REPLICA_IDS[i]) for i in range(3)]
    for o in observers:
        # each observer gets a random subset, in a random order: the rest is lost
        got = data.draw(st.lists(st.sampled_from(deltas), max_size=len(deltas))) if deltas else []
        o.apply(got, NOW + 10_000)
    # full recovers the losses: one anti-entropy round from it to each observer, both ways
    for o in observers:
        o.apply([full.encode_since(o.version())], NOW + 10_000)
        full.apply([o.encode_since(full.version())], NOW + 10_000)
    want = full.encode_snapshot()
    for o in observers:
        probe = impl.Replica(OBSERVER)
        probe.apply([o.encode_snapshot()], NOW + 10_000)
        assert probe.encode_snapshot() == want


def _join(impl: Any, *states: bytes) -> bytes:
    r = impl.Replica(OBSERVER)
    for s in states:
        r.apply([s], NOW + 10_000)
    return r.encode_snapshot()


@pytest.mark.parametrize("impl", IMPLS)
@given(case=histories)
def test_state_merge_is_commutative_associative_idempotent(impl: Any, case: Any) -> None:
    n, program = case
    reps, _ = _history(impl, n, program)
    a, b, c = (_join(impl, r.encode_snapshot()) for r in reps[:3])
    assert _join(impl, a, b) == _join(impl, b, a)
    assert _join(impl, _join(impl, a, b), c) == _join(impl, a, _join(impl, b, c))
    assert _join(impl, a, a) == a
    assert _join(impl, a, b, b) == _join(impl, a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_concurrent_writes_lww_and_mv(impl: Any) -> None:
    a, b = impl.Replica(b"replicaA"), impl.Replica(b"replicaB")
    a.begin(NOW)
    a.set("c", "d", "lww", "from a")
    a.set_mv("c", "d", "mv", "a")
    da = a.commit()
    b.begin(NOW)  # the same millisecond: the replica id breaks the tie
    b.set("c", "d", "lww", "from b")
    b.set_mv("c", "d", "mv", "b")
    db = b.commit()
    assert a.apply([db], NOW) == [("c", "d", "lww"), ("c", "d", "mv")]
    b.apply([da], NOW)
    for r in (a, b):
        assert r.get("c", "d", "lww") == "from b"
        assert r.conflicts("c", "d", "lww") == ["from a", "from b"]
        assert r.get("c", "d", "mv") == ("a", "b")
    # a write that has seen both resolves the multi-value register
    a.begin(NOW + 1)
    a.set_mv("c", "d", "mv", "resolved")
    b.apply([a.commit()], NOW + 1)
    assert b.get("c", "d", "mv") == ("resolved",)


@pytest.mark.parametrize("impl", IMPLS)
def test_remove_is_observed_remove_and_leaves_no_tombstones(impl: Any) -> None:
    a, b = impl.Replica(b"replicaA"), impl.Replica(b"replicaB")
    a.begin(NOW)
    for i in range(100):
        a.set("c", f"doc{i}", "f", i)
    b.apply([a.commit()], NOW)
    b.begin(NOW + 1)
    for i in range(100):
        b.remove("c", f"doc{i}")
    removal = b.commit()
    a.begin(NOW + 1)
    a.set("c", "doc7", "g", "concurrent")  # concurrent with the removal: survives it
    concurrent = a.commit()
    a.apply([removal], NOW + 2)
    b.apply([concurrent], NOW + 2)
    for r in (a, b):
        assert r.documents("c") == ["doc7"]
        assert r.document("c", "doc7") == {"g": "concurrent"}
        # the causal context stays a version vector: no per-removal record
        ctx = r.context()
        assert ctx.cloud == {}
        assert ctx.vv == {b"replicaA": 101, b"replicaB": 100}
    assert a.encode_snapshot() == b.encode_snapshot()


@pytest.mark.parametrize("impl", IMPLS)
def test_counter_set_and_log(impl: Any) -> None:
    a, b = impl.Replica(b"replicaA"), impl.Replica(b"replicaB")
    a.begin(NOW)
    a.increment("c", "d", "n", 5)
    a.set_add("c", "d", "tags", "x")
    a.append("scale", {"g": 71.5})
    da = a.commit()
    b.begin(NOW)
    b.increment("c", "d", "n", -2)
    b.set_add("c", "d", "tags", "y")
    b.append("scale", {"g": 70.9})
    db = b.commit()
    a.apply([db], NOW)
    b.apply([da], NOW)
    a.begin(NOW + 1)
    a.set_discard("c", "d", "tags", "y")
    a.increment("c", "d", "n", 1)
    b.apply([a.commit()], NOW + 1)
    for r in (a, b):
        assert r.get("c", "d", "n") == 4
        assert r.get("c", "d", "tags") == frozenset({"x"})
        assert [v for _, _, v in r.log("scale")] == [{"g": 71.5}, {"g": 70.9}]
    assert a.encode_snapshot() == b.encode_snapshot()


@pytest.mark.parametrize("impl", IMPLS)
def test_blob_reference_and_usage_errors(impl: Any) -> None:
    from p2pcloud.errors import CoreUsageError

    a = impl.Replica(b"replicaA")
    with pytest.raises(CoreUsageError):
        a.set("c", "d", "f", 1)  # no transaction
    a.begin(NOW)
    ref = impl.BlobRef(bytes(32), 1234)
    a.set("files", "f1", "content", ref)
    a.increment("c", "d", "n")
    with pytest.raises(CoreUsageError):
        a.set_add("c", "d", "n", "x")  # the field is a counter
    with pytest.raises(CoreUsageError):
        a.set("c", "d", "f", object())
    with pytest.raises(CoreUsageError):
        a.set("c", "d", "x" * 2000, 1)
    delta = a.commit()
    b = impl.Replica(b"replicaB")
    b.apply([delta], NOW)
    assert b.get("files", "f1", "content") == ref
    assert b.document("c", "d") == {"n": 1}
