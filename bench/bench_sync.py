"""Reconciliation cost of p2pcloud sync: bytes on the wire and round trips against the floor.

Two scenarios, both run through real SyncSessions (real Ed25519 envelopes, the compiled core)
connected by a lossless in-memory pipe that counts every byte and every flight (a flight is
one half round trip: everything both sides send at once):

1. One sub-cloud of 1,000,000 documents on two replicas that differ by 100 deltas (50 new
   transactions on each side). Floor: the 100 deltas themselves (crdt-anchors.md section 1:
   with causal metadata, identification is free and the floor is size(VV) + payload(D)); we
   also show the signed envelopes, since every delta must travel signed. Goal: within 1.5x
   of the floor, one round trip.
2. M = 10,000 sub-clouds shared by two endpoints, idle and with K = 10 changed (goal G6:
   idle = 1 round trip, <= 64 B message; K changed <= ceil(log16(M/32)) + 1 round trips,
   <= 400 B overhead per changed sub-cloud). Anchor, measured in the same run: one version
   vector exchange per sub-cloud (what automerge-repo's per-document sync does).

Run:  .venv/bin/python bench/bench_sync.py
Prints the tables and writes the "sync" section of bench/RESULTS.md.
"""

from __future__ import annotations

import math
import random
import sys
import time
from bisect import bisect_right
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._results import write_section  # noqa: E402
from p2pcloud._core import IMPLEMENTATION, Replica, encode_version  # noqa: E402
from p2pcloud._crypto import LocalIdentity  # noqa: E402
from p2pcloud._ids import Hashname, SubCloudId  # noqa: E402
from p2pcloud.sync import (  # noqa: E402
    Catalog,
    Envelope,
    EnvelopesReceived,
    EnvelopesWanted,
    SnapshotReceived,
    SnapshotWanted,
    SyncSession,
    open_envelope,
    replica_id_for,
    seal,
)
from p2pcloud.sync.messages import (  # noqa: E402
    T_ACK,
    T_ENVELOPES,
    T_RECONCILE,
    T_VECTORS,
    IdTable,
    VectorOffer,
    Vectors,
    encode_message,
    split_frames,
)

COMMAND = ".venv/bin/python bench/bench_sync.py"
NOW_MS = 1_800_000_000_000


class Shell:
    """A minimal pure shell: catalog, envelope logs, replicas, one session per peer."""

    def __init__(self, identity: LocalIdentity, writers: set[Hashname]) -> None:
        self.identity = identity
        self.catalog = Catalog()
        self.replicas: dict[SubCloudId, Replica] = {}
        # sub-cloud -> origin -> (sorted firsts, first -> (last, raw))
        self.logs: dict[
            SubCloudId, dict[bytes, tuple[list[int], dict[int, tuple[int, bytes]]]]
        ] = {}
        self.sessions: dict[Hashname, SyncSession] = {}
        self.writers = writers

    def add(self, sc: SubCloudId, replica: Replica | None = None) -> None:
        self.replicas[sc] = replica or Replica(replica_id_for(sc, self.identity.hashname))
        self.logs[sc] = {}
        self.catalog.set_subcloud(sc, self.replicas[sc].version())

    def store(self, sc: SubCloudId, env: Envelope) -> None:
        firsts, spans = self.logs[sc].setdefault(env.origin, ([], {}))
        if env.first in spans:
            return
        spans[env.first] = (env.last, env.raw)
        if not firsts or env.first > firsts[-1]:
            firsts.append(env.first)
        else:
            firsts.insert(bisect_right(firsts, env.first), env.first)
        self.catalog.record(sc, env.origin, env.first, env.last, len(env.raw))

    def write(self, sc: SubCloudId, fn: Callable[[Replica], None]) -> Envelope:
        r = self.replicas[sc]
        r.begin(NOW_MS)
        fn(r)
        env = seal(self.identity, sc, r.commit())
        self.store(sc, env)
        for s in self.sessions.values():
            s.push(sc, [env], 0.0)
        return env

    def after(self, sc: SubCloudId, origin: bytes, after: int, budget: int) -> list[bytes]:
        firsts, spans = self.logs[sc].get(origin, ([], {}))
        i = max(0, bisect_right(firsts, after) - 1)
        out: list[bytes] = []
        size = 0
        for first in firsts[i:]:
            last, raw = spans[first]
            if last <= after:
                continue
            if out and size + len(raw) > budget:
                break
            out.append(raw)
            size += len(raw)
        return out

    def handle(self, peer: Hashname) -> None:
        s = self.sessions[peer]
        while (ev := s.next_event()) is not None:
            if isinstance(ev, EnvelopesWanted):
                envs = self.after(ev.subcloud, ev.origin, ev.after, ev.budget_bytes)
                s.provide_envelopes(ev.subcloud, ev.origin, ev.after, envs, 0.0)
            elif isinstance(ev, SnapshotWanted):
                s.provide_snapshot(ev.subcloud, b"", {}, 0.0)
            elif isinstance(ev, EnvelopesReceived):
                opened = [
                    open_envelope(raw, lambda _s, hn: hn in self.writers) for raw in ev.envelopes
                ]
                self.replicas[ev.subcloud].apply([e.delta for e in opened], NOW_MS)
                for env in opened:
                    self.store(ev.subcloud, env)
                s.acknowledge(ev.batch, 0.0)
            elif isinstance(ev, SnapshotReceived):
                s.acknowledge(ev.batch, 0.0)


BY_TYPE: dict[int, int] = {}
"""Frame bytes per message type of the last run (reconciliation vs vectors vs the rest)."""


def _count_types(data: bytes) -> None:
    import cbor2

    buf = bytearray(data)
    for body in split_frames(buf):
        t = cbor2.loads(body)[1]  # [version, type, ...]
        header = 1 + (len(body).bit_length() - 1) // 7  # the varint length prefix
        BY_TYPE[t] = BY_TYPE.get(t, 0) + header + len(body)


def run(a: Shell, b: Shell, done: Callable[[], bool]) -> tuple[list[int], int | None]:
    """Link a and b, pump until quiet; return bytes per flight and the flight that finished."""
    BY_TYPE.clear()
    sa = SyncSession(a.catalog, local=a.identity.hashname, remote=b.identity.hashname, now=0.0)
    sb = SyncSession(b.catalog, local=b.identity.hashname, remote=a.identity.hashname, now=0.0)
    a.sessions[b.identity.hashname] = sa
    b.sessions[a.identity.hashname] = sb
    flights: list[int] = []
    finished: int | None = None
    for _ in range(10_000):
        a.handle(b.identity.hashname)
        b.handle(a.identity.hashname)
        da, db = sa.data_to_send(), sb.data_to_send()
        if not da and not db:
            return flights, finished
        _count_types(da)
        _count_types(db)
        sb.receive_data(da, 0.0)
        sa.receive_data(db, 0.0)
        b.handle(a.identity.hashname)
        a.handle(b.identity.hashname)
        flights.append(len(da) + len(db))
        if finished is None and done():
            finished = len(flights)
    raise AssertionError("peers never went quiet")


def edit(i: int) -> Callable[[Replica], None]:
    def fn(r: Replica) -> None:
        for f in range(5):
            r.set("docs", f"doc{i:07d}", f"field{f}", f"edited value {i}.{f} " + "x" * 40)

    return fn


def big_subcloud(rng: random.Random) -> list[str]:
    docs, txns = 1_000_000, 1000
    ida = LocalIdentity.from_seed(rng.randbytes(32))
    idb = LocalIdentity.from_seed(rng.randbytes(32))
    writers = {ida.hashname, idb.hashname}
    sc = SubCloudId(rng.randbytes(16))
    a, b = Shell(ida, writers), Shell(idb, writers)
    a.add(sc)
    t0 = time.perf_counter()
    per = docs // txns
    history: list[Envelope] = []
    for t in range(txns):
        history.append(
            a.write(
                sc,
                lambda r, t=t: [
                    r.set("docs", f"doc{t * per + j:07d}", "n", t * per + j) for j in range(per)
                ],
            )
        )
    snap = a.replicas[sc].encode_snapshot()
    b.add(sc, Replica.load(snap, replica_id_for(sc, idb.hashname), NOW_MS))
    for env in history:
        b.store(sc, env)
    build = time.perf_counter() - t0
    assert a.catalog.digest(sc) == b.catalog.digest(sc)
    n_docs = len(a.replicas[sc].documents("docs"))

    new_a = [a.write(sc, edit(i)) for i in range(0, 100, 2)]
    new_b = [b.write(sc, edit(i)) for i in range(1, 100, 2)]
    deltas = sum(len(e.delta) for e in new_a + new_b)
    envelopes = sum(len(e.raw) for e in new_a + new_b)
    vv = len(encode_version(a.replicas[sc].version())) * 2

    def converged() -> bool:
        return a.replicas[sc].version() == b.replicas[sc].version()

    t0 = time.perf_counter()
    flights, finished = run(a, b, converged)
    elapsed = time.perf_counter() - t0
    assert finished is not None
    assert a.replicas[sc].encode_snapshot() == b.replicas[sc].encode_snapshot()
    wire = sum(flights)
    print(
        f"1 sub-cloud, {n_docs:,} documents, 100 differing deltas: wire {wire:,} B in "
        f"{len(flights)} flights (converged after {finished}); deltas {deltas:,} B, "
        f"envelopes {envelopes:,} B; build {build:.1f} s, sync {elapsed * 1000:.0f} ms"
    )
    return [
        "| scenario | wire bytes | floor: 100 deltas | ratio | signed envelopes | ratio | "
        "round trips to converge | flights until quiet |",
        "|---|---|---|---|---|---|---|---|",
        f"| {n_docs:,} documents, 50 + 50 new transactions | {wire:,} | {deltas:,} "
        f"(+ 2 vectors {vv} B) | {wire / deltas:.2f}x | {envelopes:,} | "
        f"{wire / envelopes:.2f}x | {math.ceil(finished / 2)} ({finished} flights) | "
        f"{len(flights)} (the last carries only acknowledgements) |",
    ]


def many_subclouds(rng: random.Random, m: int, k: int) -> tuple[list[str], dict[str, float]]:
    ida = LocalIdentity.from_seed(rng.randbytes(32))
    idb = LocalIdentity.from_seed(rng.randbytes(32))
    writers = {ida.hashname, idb.hashname}
    a, b = Shell(ida, writers), Shell(idb, writers)
    scs = [SubCloudId(rng.randbytes(16)) for _ in range(m)]
    for sc in scs:
        a.add(sc)
        b.add(sc)
        env = a.write(sc, lambda r: r.set("profile", "thing", "name", "a thing"))
        b.replicas[sc].apply([env.delta], NOW_MS)
        b.store(sc, env)
    # the anchor: one vector exchange per sub-cloud (automerge-repo style), same encoding
    naive = 0
    tables = {a: IdTable(ida.hashname, idb.hashname), b: IdTable(idb.hashname, ida.hashname)}
    for sc in scs:
        for shell in (a, b):
            offer = VectorOffer(sc, shell.catalog.version(sc), True, 0)
            naive += len(encode_message(Vectors((offer,)), tables[shell]))
    changed = rng.sample(scs, k)
    payload = 0
    for i, sc in enumerate(changed):
        payload += len((a if i % 2 else b).write(sc, edit(i)).raw)

    def converged() -> bool:
        return all(a.replicas[sc].version() == b.replicas[sc].version() for sc in changed)

    flights, finished = run(a, b, converged)
    for sc in changed:
        assert a.replicas[sc].encode_snapshot() == b.replicas[sc].encode_snapshot()
    wire = sum(flights)
    bound = math.ceil(math.log(m / 32, 16)) + 1
    overhead = wire - payload
    name = "idle" if k == 0 else f"K = {k} changed"
    rtt = math.ceil((finished or len(flights)) / 2)
    rec, vec = BY_TYPE.get(T_RECONCILE, 0), BY_TYPE.get(T_VECTORS, 0)
    framing = BY_TYPE.get(T_ENVELOPES, 0) - payload  # batch headers around the envelopes
    acks = BY_TYPE.get(T_ACK, 0)
    print(
        f"M={m:,} {name}: wire {wire:,} B in {len(flights)} flights {flights}; payload "
        f"{payload:,} B; naive per-sub-cloud vectors {naive:,} B"
    )
    per = (lambda n: "" if k == 0 else f" ({n / k:.0f} per changed)")  # noqa: E731
    row = (
        f"| M = {m:,}, {name} | {wire:,} | {flights[0]} | {payload:,} | {overhead:,}"
        f"{per(overhead)} | {rec:,}{per(rec)} | {vec:,}{per(vec)} | "
        f"{framing:,}{per(framing)} | {acks:,}{per(acks)} | {rtt} "
        f"({1 if k == 0 else bound} goal) | {len(flights)} | {naive:,} B in 2 x {m:,} msgs |"
    )
    return [row], {"overhead_per": overhead / max(k, 1)}


def main() -> None:
    rng = random.Random(20261129)
    lines = [
        f"Core: {IMPLEMENTATION}. A flight is everything both sides send at once "
        "(half a round trip).",
        "",
    ]
    lines += big_subcloud(rng)
    lines += [
        "",
        "| scenario | wire bytes | first message | envelope payload | overhead | "
        "of which reconciliation | of which vector offers | of which envelope batch framing | "
        "of which acknowledgements | round trips to converge | flights until quiet | "
        "anchor: one vector exchange per sub-cloud (same codec) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows, _ = many_subclouds(rng, 10_000, 0)
    lines += rows
    rows, _ = many_subclouds(rng, 10_000, 10)
    lines += rows
    lines += [
        "",
        "Goals (crdt-anchors.md): one sub-cloud within 1.5x of the floor in one round trip; "
        "G6 idle M = 10,000: 1 round trip, first message <= 64 B; K changed: <= "
        "ceil(log16(M/32)) + 1 = 4 round trips, <= 400 B overhead per changed sub-cloud. "
        "Overhead is everything on the wire but the signed envelopes: the range-based "
        "reconciliation (8-byte fingerprints and 4-byte item hashes, salted per run), the "
        "two version vectors each changed sub-cloud needs (one each way; sync protocol v2 "
        "names the two endpoints' replicas with 1-byte tags and other ids by a per-session "
        "index after their first use), envelope batch framing and acknowledgements "
        "(coalesced per send). A side that "
        "recognises in the peer's listed item hashes or range fingerprints one of its own "
        "earlier versions of a sub-cloud sends the difference at once, without waiting a "
        "round trip for the peer's vector.",
    ]
    body = "\n".join(lines)
    print(body)
    write_section("sync", COMMAND, body)


if __name__ == "__main__":
    main()
