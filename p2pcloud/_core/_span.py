"""Read who wrote a transaction delta, and which dots it holds, from its header alone.

The sync layer files every signed delta under (sub-cloud, origin replica, first counter) and
checks that the origin is the author's replica; it needs those three facts without decoding
(or merging) the operations. A delta made by :meth:`Replica.commit` has exactly one run: one
replica, a start counter, and one dot per operation, so its last counter is
``start + number_of_ops - 1``. Since-deltas and snapshots with several runs or context ranges
are refused here. A snapshot of a single replica with no gaps has the very shape of that
replica's transactions and holds exactly the dots its header names, so it reads the same way;
a run with counter skips (advance operations) would not, and only a full decode sees those:
the merge does, and a sender that hid skips behind a transaction header only misfiles its
own author's dots, never another replica's.

This is header parsing, shared by both implementations of the core: it reads a handful of
varints, so there is nothing for Cython to speed up.
"""

from __future__ import annotations

from p2pcloud._core._reference import (
    FORMAT_MAGIC,
    FORMAT_VERSION,
    MAX_COUNTER,
    MAX_REPLICA_ID,
    MIN_REPLICA_ID,
    _Reader,
)
from p2pcloud.errors import DecodeError

__all__ = ["delta_span"]


def delta_span(delta: bytes) -> tuple[bytes, int, int]:
    """Return ``(replica_id, first_counter, last_counter)`` of a transaction delta.

    Only the header is read; the operations are not validated (merging does that).

    Args:
        delta: bytes returned by ``Replica.commit()`` on some replica.

    Returns:
        The writing replica's id and the inclusive range of dot counters the delta holds.

    Raises:
        DecodeError: the bytes are not a delta of this format, or not a single-transaction
            delta (a since-delta or a snapshot).
    """
    if not isinstance(delta, bytes | bytearray | memoryview):
        raise DecodeError("a delta is bytes")
    r = _Reader(bytes(delta))
    if r.byte() != FORMAT_MAGIC:
        raise DecodeError("not a p2pcloud delta")
    if r.byte() != FORMAT_VERSION:
        raise DecodeError("unknown delta version")
    reps = []
    for _ in range(r.count()):
        n = r.varint()
        if not MIN_REPLICA_ID <= n <= MAX_REPLICA_ID:
            raise DecodeError("replica id length out of range")
        reps.append(r.raw(n))
    if r.varint() != 0:
        raise DecodeError("not a transaction delta: it carries context ranges")
    if r.varint() != 1:
        raise DecodeError("not a transaction delta: a transaction has exactly one run")
    rep = r.varint()
    if rep >= len(reps):
        raise DecodeError("replica index out of range")
    first = r.varint()
    r.varint()  # the run's HLC: not needed to place the delta
    nops = r.varint()
    if nops < 1:
        raise DecodeError("a transaction delta holds at least one operation")
    last = first + nops - 1
    if first < 1 or last > MAX_COUNTER:
        raise DecodeError("counter out of range")
    return reps[rep], first, last
