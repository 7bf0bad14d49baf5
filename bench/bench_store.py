"""Benchmark the LMDB store against raw LMDB measured in the same run.

Figures:

* durable writes per second: one ``commit_local`` per write (one durable commit each),
  against the raw LMDB single-put durable commit rate (the physical limit: two fsyncs per
  commit);
* remote envelopes per second in batches of 100 per transaction (``append_envelopes``),
  against the same single-put commit rate and the raw one-transaction put rate;
* streaming a log back in 64 KiB batches (``envelopes_after``);
* a node with 1,000,000 documents: build a core Replica with them (``set_many`` in one
  transaction), checkpoint its snapshot, close; then reopen the store (open time), and
  ``load_state`` + ``Replica.load`` (load time), against a raw LMDB get of the same bytes.

Run: ``.venv/bin/python bench/bench_store.py`` (``--docs 100000`` for a quick run;
``--no-write`` to leave bench/RESULTS.md alone).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lmdb

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_section  # noqa: E402

from p2pcloud._core import IMPLEMENTATION, Replica  # noqa: E402
from p2pcloud._store import open_store  # noqa: E402

NOW_MS = 1_764_000_000_000
SC = b"bench-subcloud!!"
LOCAL = b"local-replica-id"
ENVELOPE_BYTES = 200  # a small signed delta: CBOR head, two keys, a few ops, a signature
BATCH = 100


def raw_env(path: Path) -> lmdb.Environment:
    """A raw LMDB environment with the store's durability settings."""
    return lmdb.open(str(path), map_size=4 << 30, sync=True, metasync=True, writemap=False,
                     lock=True, max_dbs=4)


def best_of(runs: int, fn: Callable[[], float]) -> float:
    """The best (highest) rate of ``runs`` runs: noise on a shared box only slows things."""
    return max(fn() for _ in range(runs))


def anchor_single_put_commits(root: Path, n: int) -> float:
    """Raw LMDB: one put per durable write transaction; transactions per second."""
    with raw_env(root / "anchor-commits") as env:
        value = os.urandom(ENVELOPE_BYTES)
        t = time.perf_counter()
        for i in range(n):
            with env.begin(write=True) as txn:
                txn.put(i.to_bytes(16, "big"), value)
        return n / (time.perf_counter() - t)


def anchor_one_txn_puts(root: Path, n: int) -> float:
    """Raw LMDB: n random 16-byte keys with 32-byte values in one transaction, with commit."""
    keys = [os.urandom(16) for _ in range(n)]
    value = os.urandom(32)
    with raw_env(root / "anchor-puts") as env:
        t = time.perf_counter()
        with env.begin(write=True) as txn:
            for k in keys:
                txn.put(k, value)
        return n / (time.perf_counter() - t)


def bench_commit_local(root: Path, n: int) -> float:
    """commit_local, one durable commit per write; writes per second."""
    envelope = os.urandom(ENVELOPE_BYTES)
    with open_store(root / "local") as store:
        t = time.perf_counter()
        for c in range(1, n + 1):
            store.commit_local(SC, envelope, c, c, origin=LOCAL)
        return n / (time.perf_counter() - t)


def bench_remote_batches(root: Path, batches: int) -> tuple[float, float, Path]:
    """append_envelopes with BATCH envelopes per call; (envelopes/s, batches/s, store path)."""
    envelope = os.urandom(ENVELOPE_BYTES)
    origins = [b"remote-origin-%02d" % i for i in range(4)]
    path = root / "remote"
    with open_store(path) as store:
        counters = dict.fromkeys(origins, 0)
        t = time.perf_counter()
        for b in range(batches):
            origin = origins[b % len(origins)]
            start = counters[origin]
            counters[origin] = start + BATCH
            store.append_envelopes(
                SC, [(origin, envelope, c, c) for c in range(start + 1, start + BATCH + 1)]
            )
        elapsed = time.perf_counter() - t
    return batches * BATCH / elapsed, batches / elapsed, path


def bench_stream(path: Path) -> float:
    """envelopes_after in 64 KiB batches over every origin's log; envelopes per second."""
    with open_store(path) as store:
        version = store.version(SC)
        t = time.perf_counter()
        count = 0
        for origin in version:
            after = 0
            while batch := store.envelopes_after(SC, origin, after, 64 * 1024):
                count += len(batch)
                after = batch[-1].last
        return count / (time.perf_counter() - t)


def bench_documents(root: Path, docs: int) -> dict[str, float]:
    """Checkpoint a replica of ``docs`` documents, then time reopening and loading it."""
    out: dict[str, float] = {}
    t = time.perf_counter()
    replica = Replica(LOCAL)
    replica.begin(NOW_MS)
    for i in range(docs):
        replica.set_many("docs", f"doc{i:07d}", {"title": f"document {i}", "n": i, "ok": True})
    replica.commit()
    out["build"] = time.perf_counter() - t
    t = time.perf_counter()
    snapshot = replica.encode_snapshot()
    version = replica.version()
    out["encode"] = time.perf_counter() - t
    out["snapshot_bytes"] = len(snapshot)
    del replica
    path = root / "docs"
    with open_store(path) as store:
        t = time.perf_counter()
        store.checkpoint(SC, snapshot, version)
        out["checkpoint"] = time.perf_counter() - t

    # each open maps the file afresh (so reading faults its pages in); best of three
    opens, loads = [], []
    for _ in range(3):
        t = time.perf_counter()
        store = open_store(path)
        opens.append(time.perf_counter() - t)
        t = time.perf_counter()
        state = store.load_state(SC)
        loads.append(time.perf_counter() - t)
        store.close()
    out["open"], out["load_state"] = min(opens), min(loads)
    assert state.snapshot is not None
    t = time.perf_counter()
    loaded = Replica.load(state.snapshot, LOCAL, NOW_MS)
    for record in state.records:  # none here: the checkpoint covers everything
        loaded.apply([record.envelope], NOW_MS)
    out["replica_load"] = time.perf_counter() - t
    assert len(loaded.documents("docs")) == docs
    del loaded

    # anchor: a raw LMDB get of the same bytes from a fresh open (the floor for load_state)
    anchor = root / "anchor-get"
    with raw_env(anchor) as env, env.begin(write=True) as txn:
        txn.put(b"snapshot", snapshot)
    gets = []
    for _ in range(3):
        with raw_env(anchor) as env:
            t = time.perf_counter()
            with env.begin() as txn:
                raw = txn.get(b"snapshot")
            gets.append(time.perf_counter() - t)
        assert raw == snapshot
    out["raw_get"] = min(gets)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--writes", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3, help="runs of each rate (best kept)")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        root = Path(tmp)
        runs: list[Path] = []

        def fresh() -> Path:
            d = root / f"run{len(runs)}"
            d.mkdir()
            runs.append(d)
            return d

        # interleaved runs: the disk is shared, so each run of the store sits next to a run
        # of its anchor under the same load; the best of each is kept
        commit_runs, local_runs, remote = [], [], []
        for _ in range(args.runs):
            commit_runs.append(anchor_single_put_commits(fresh(), args.writes))
            local_runs.append(bench_commit_local(fresh(), args.writes))
            remote.append(bench_remote_batches(fresh(), args.batches))
        anchor_commits, local = max(commit_runs), max(local_runs)
        anchor_puts = best_of(args.runs, lambda: anchor_one_txn_puts(fresh(), 1_000_000))
        env_rate = max(r[0] for r in remote)
        batch_rate = max(r[1] for r in remote)
        stream = max(bench_stream(r[2]) for r in remote)
        docs = bench_documents(fresh(), args.docs)

    rows = [
        ("durable writes, one `commit_local` each", f"{local:,.0f} writes/s",
         f"single-put durable commit: {anchor_commits:,.0f} txn/s",
         f"{local / anchor_commits:.2f}x"),
        (f"remote envelopes, {BATCH} per `append_envelopes` txn", f"{env_rate:,.0f} env/s",
         f"single-put durable commit: {anchor_commits:,.0f} txn/s",
         f"{env_rate / anchor_commits:.1f}x"),
        ("  the same, batches per second", f"{batch_rate:,.0f} batches/s",
         f"single-put durable commit: {anchor_commits:,.0f} txn/s",
         f"{batch_rate / anchor_commits:.2f}x"),
        ("  the same, per envelope vs bulk puts", f"{env_rate:,.0f} env/s",
         f"1M puts in one txn: {anchor_puts:,.0f} puts/s", f"{env_rate / anchor_puts:.3f}x"),
        ("stream a log back, 64 KiB `envelopes_after` batches", f"{stream:,.0f} env/s",
         f"1M puts in one txn: {anchor_puts:,.0f} puts/s", f"{stream / anchor_puts:.2f}x"),
    ]
    lines = ["| measure | p2pcloud store | anchor (raw LMDB, same run) | ratio |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    n = args.docs
    total = docs["open"] + docs["load_state"] + docs["replica_load"]
    lines += [
        "",
        f"A node with {n:,} documents (3 fields each; core: {IMPLEMENTATION}), snapshot "
        f"{docs['snapshot_bytes'] / 2**20:.1f} MiB:",
        "",
        "| step | time | anchor |",
        "| --- | --- | --- |",
        f"| build the replica (setup, `set_many` in one transaction) | {docs['build']:.2f} s | |",
        f"| `encode_snapshot` (setup) | {docs['encode']:.2f} s | |",
        f"| `checkpoint` (one durable transaction) | {docs['checkpoint'] * 1000:.0f} ms | |",
        f"| **open the store** (best of 3) | {docs['open'] * 1000:.2f} ms | |",
        f"| **`load_state`** (checkpoint + log after it; best of 3) | "
        f"{docs['load_state'] * 1000:.2f} ms | "
        f"raw LMDB get of the same bytes after a fresh open: {docs['raw_get'] * 1000:.2f} ms |",
        f"| **`Replica.load`** (decode the snapshot) | {docs['replica_load']:.2f} s | |",
        f"| open + load, total | {total:.2f} s | |",
        "",
        f"{args.writes:,} writes per durable-write run, {args.batches} batches of {BATCH} "
        f"{ENVELOPE_BYTES}-byte envelopes per batch run; best of {args.runs} runs. A durable "
        "commit costs two fsyncs (data pages, then the meta page), so one write per "
        "transaction is bounded by the disk; batching a peer's envelopes into one "
        "transaction is what lifts remote ingest above that bound. The store file was in the "
        "OS page cache (just written): a cold boot adds reading the snapshot from disk.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        command = ".venv/bin/python bench/bench_store.py"
        if args.docs != 1_000_000:
            command += f" --docs {args.docs}"
        write_section("store", command, body)


if __name__ == "__main__":
    main()
