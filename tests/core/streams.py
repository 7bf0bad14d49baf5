"""Random operation streams for the merge core, and a driver that runs them.

A *program* is a list of steps for 3..5 replicas: local transactions (many ops each),
deliveries of committed deltas (in any order, duplicated, or lost and re-sent later),
anti-entropy by ``encode_since`` and snapshot merges. The driver runs a program on one
implementation and records everything observable: every delta, every change report, every
snapshot, every read. Running it on the compiled core and on the twin must record the same.
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import strategies as st

from p2pcloud.errors import ClockSkewError, CoreUsageError, DecodeError

COLLS = ["c", "d"]
DOCS = ["x", "y", "z"]
FIELDS = ["f", "g", "h", "ä"]
LOGS = ["log", "c"]
REPLICA_IDS = [bytes([0x41 + i]) * 8 for i in range(5)]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64 - 1),
    st.integers(min_value=-200, max_value=200),
    st.floats(allow_nan=False),
    st.text(max_size=6),
    st.binary(max_size=6),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)
set_elements = st.one_of(st.integers(min_value=0, max_value=4), st.sampled_from(["a", "b"]))

coll = st.sampled_from(COLLS)
doc = st.sampled_from(DOCS)
field = st.sampled_from(FIELDS)

ops = st.one_of(
    st.tuples(st.just("set"), coll, doc, field, values),
    st.tuples(st.just("set"), coll, doc, field, scalars),
    st.tuples(st.just("set_mv"), coll, doc, field, scalars),
    st.tuples(st.just("increment"), coll, doc, field, st.integers(-5, 5)),
    st.tuples(st.just("set_add"), coll, doc, field, set_elements),
    st.tuples(st.just("set_discard"), coll, doc, field, set_elements),
    st.tuples(st.just("remove_field"), coll, doc, field),
    st.tuples(st.just("remove"), coll, doc),
    st.tuples(st.just("append"), st.sampled_from(LOGS), scalars),
    st.tuples(st.just("set_many"), coll, doc,
              st.lists(st.tuples(field, scalars), max_size=4)),
)
text_ops = st.one_of(
    st.tuples(st.just("text_insert"), coll, doc, field, st.integers(0, 8), st.text(max_size=4)),
    st.tuples(st.just("text_delete"), coll, doc, field, st.integers(0, 8), st.integers(0, 3)),
)


def steps(n_replicas: int, with_text: bool = True) -> st.SearchStrategy[list[Any]]:
    """A strategy for a program over ``n_replicas`` replicas."""
    rep = st.integers(0, n_replicas - 1)
    op = st.one_of(ops, text_ops) if with_text else ops
    step = st.one_of(
        st.tuples(st.just("txn"), rep, st.lists(op, min_size=1, max_size=6)),
        st.tuples(st.just("txn"), rep, st.lists(op, min_size=1, max_size=6)),
        st.tuples(st.just("deliver"), rep, rep, st.integers(0, 1000)),
        st.tuples(st.just("sync"), rep, rep),
        st.tuples(st.just("snapshot"), rep, rep),
    )
    return st.lists(step, min_size=1, max_size=25)


def _norm(value: Any) -> Any:
    """Make reads comparable (NaN-free values, frozensets sorted by repr)."""
    if isinstance(value, frozenset):
        return ("set", sorted(map(repr, value)))
    if isinstance(value, float) and math.isnan(value):
        return ("nan",)
    return value


def observe(replica: Any) -> Any:
    """Everything a reader can see of a replica."""
    docs = {
        (c, d): {f: _norm(v) for f, v in (replica.document(c, d) or {}).items()}
        for c in replica.collections()
        for d in replica.documents(c)
    }
    conflicts = {
        (c, d, f): replica.conflicts(c, d, f)
        for (c, d), fields in docs.items()
        for f in fields
    }
    logs = {name: replica.log(name) for name in replica.logs()}
    ctx = replica.context()
    context = {k: ctx.ranges(k) for k in sorted(ctx.keyset())}
    return (docs, conflicts, logs, replica.version(), context)


def run_program(impl: Any, program: list[Any], n_replicas: int) -> list[Any]:
    """Run ``program`` on the implementation module ``impl``; return the record."""
    reps = [impl.Replica(REPLICA_IDS[i]) for i in range(n_replicas)]
    outbox: list[tuple[int, bytes]] = []
    record: list[Any] = []
    now = 1_700_000_000_000
    for step in program:
        now += 7
        kind = step[0]
        if kind == "txn":
            r = reps[step[1]]
            r.begin(now)
            for op in step[2]:
                name, *args = op
                try:
                    getattr(r, name)(*args)
                    record.append(("ok", name))
                except CoreUsageError as exc:
                    record.append(("usage", name, type(exc).__name__))
            delta = r.commit()
            record.append(("delta", delta))
            if delta:
                outbox.append((step[1], delta))
        elif kind == "deliver":
            if outbox:
                src, delta = outbox[step[3] % len(outbox)]
                record.append(("changes", reps[step[2]].apply([delta], now)))
        elif kind == "sync":
            a, b = reps[step[1]], reps[step[2]]
            since = a.encode_since(b.version())
            record.append(("since", since))
            record.append(("changes", b.apply([since], now)))
        elif kind == "snapshot":
            snap = reps[step[1]].encode_snapshot()
            record.append(("snapshot", snap))
            record.append(("changes", reps[step[2]].apply([snap], now)))
        record.append(("state", [observe(r) for r in reps]))
    record.append(("final", [r.encode_snapshot() for r in reps]))
    return record


def try_apply(replica: Any, data: bytes, now: int) -> str:
    """Apply ``data``; return the name of the typed error it raised, or "ok"."""
    try:
        replica.apply([data], now)
    except (DecodeError, ClockSkewError) as exc:
        return type(exc).__name__
    return "ok"
