"""Crash safety with real processes: SIGKILL a writer at seeded random moments.

The writer (tests/store/_writer.py) acknowledges each write after the store call returned.
After every kill the store must open, read consistently, and hold every acknowledged write
with the right bytes; writes that committed but were not acknowledged may be there too, and
must be just as whole.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from p2pcloud._store import BlobRecord, Store, open_store
from tests.store import _writer as w

REPO = Path(__file__).resolve().parents[2]
KILLS = 24  # kill points; each round is one writer process (about 0.4 s)
SEED = 20261129


@dataclass
class Acked:
    """Everything the writers promised so far."""

    local: int = 0
    remote: int = 0
    checkpoint: tuple[int, int] = (0, 0)
    blobs: set[int] = field(default_factory=set)
    removed: set[int] = field(default_factory=set)

    def read(self, lines: Iterable[str]) -> None:
        for line in lines:
            kind, *args = line.split()
            if kind == "L":
                self.local = max(self.local, int(args[0]))
            elif kind == "R":
                self.remote = max(self.remote, int(args[0]))
            elif kind == "B":
                self.blobs.add(int(args[0]))
            elif kind == "d":  # a removal began: the blob may or may not be there
                self.blobs.discard(int(args[0]))
            elif kind == "D":
                self.removed.add(int(args[0]))
                self.blobs.discard(int(args[0]))
            elif kind == "C":
                self.checkpoint = (int(args[0]), int(args[1]))


def _check_chain(
    records: list[tuple[int, int, bytes]],
    start: int,
    head: int,
    make: Callable[[int, int], bytes],
    width: Callable[[int], int],
) -> None:
    """The records cover ``start+1..head`` without a gap, each with its exact bytes."""
    for first, last, envelope in records:
        assert last == first + width(first)
        assert envelope == make(first, last), f"damaged envelope {first}..{last}"
    for (_, last, _), (first, _, _) in zip(records, records[1:], strict=False):
        assert first == last + 1, f"gap between {last} and {first}"
    if head > start:
        assert records, f"counters {start + 1}..{head} are missing"
        assert records[0][0] <= start + 1 <= records[0][1]
        assert records[-1][1] == head
    else:
        assert records == []


def _verify(store: Store, acked: Acked) -> None:
    version = store.version(w.SC)
    a, b = version.get(w.LOCAL, 0), version.get(w.REMOTE, 0)
    assert a >= acked.local, "an acknowledged local write is missing"
    assert b >= acked.remote, "an acknowledged remote batch is missing"

    state = store.load_state(w.SC)
    ca, cb = state.version.get(w.LOCAL, 0), state.version.get(w.REMOTE, 0)
    assert ca >= acked.checkpoint[0], "an acknowledged checkpoint is missing"
    assert cb >= acked.checkpoint[1], "an acknowledged checkpoint is missing"
    if state.snapshot is not None:
        assert state.snapshot == w.snapshot(ca, cb), "the checkpoint's bytes are damaged"
    local = [(r.first, r.last, r.envelope) for r in state.records if r.origin == w.LOCAL]
    remote = [(r.first, r.last, r.envelope) for r in state.records if r.origin == w.REMOTE]
    assert len(local) + len(remote) == len(state.records)
    _check_chain(local, ca, a, w.local_envelope, w.local_width)
    _check_chain(remote, cb, b, w.remote_envelope, w.remote_width)

    # streaming the whole kept log in bounded batches agrees with it
    streamed: list[tuple[int, int, bytes]] = []
    after = 0
    while batch := store.envelopes_after(w.SC, w.LOCAL, after, 64 * 1024):
        streamed.extend((r.first, r.last, r.envelope) for r in batch)
        after = batch[-1].last
    if local:
        assert streamed[-len(local) :] == local
    _check_chain(streamed, streamed[0][0] - 1 if streamed else a, a,
                 w.local_envelope, w.local_width)

    for i in acked.blobs:
        order = [w.chunk_hash(w.chunk(i, j)) for j in range(w.CHUNKS_PER_BLOB)]
        size = sum(len(w.chunk(i, j)) for j in range(w.CHUNKS_PER_BLOB))
        assert store.get_blob(w.blob_id(i)) == BlobRecord(size, tuple(order))
        assert store.missing_chunks(w.blob_id(i)) == []
        for j, digest in enumerate(order):
            assert store.get_chunk(digest) == w.chunk(i, j)
    for i in acked.removed:
        assert store.get_blob(w.blob_id(i)) is None
    stats = store.statistics()
    assert stats.tables["blobs"].entries >= len(acked.blobs)


def _wait_ready(out_path: Path, child: subprocess.Popen[bytes]) -> None:
    """Wait until the writer printed "ready" (it opened the store), or it died."""
    deadline = time.monotonic() + 60  # a very busy CI box; not a timing assertion
    while child.poll() is None and time.monotonic() < deadline:
        if out_path.read_text().startswith("ready"):
            return
        time.sleep(0.005)


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_no_acknowledged_write(tmp_path: Path) -> None:
    path = tmp_path / "store"
    rng = random.Random(SEED)
    acked = Acked()
    rounds_with_writes = 0
    for round_ in range(KILLS):
        out_path = tmp_path / f"acks-{round_}.txt"
        with out_path.open("w") as out:
            child = subprocess.Popen(
                [sys.executable, "-m", "tests.store._writer", str(path), str(round_)],
                cwd=REPO, stdout=out, stderr=subprocess.PIPE,
            )
            # a few kills land while the child starts and opens the store; the others come
            # a random time after it is ready, so they land mid-write even on a busy machine
            if round_ % 6 == 0:
                time.sleep(rng.uniform(0.0, 0.3))
            else:
                _wait_ready(out_path, child)
                time.sleep(rng.uniform(0.05, 0.4))
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
            stderr = child.stderr.read().decode() if child.stderr else ""
            if child.stderr:
                child.stderr.close()
        assert child.returncode == -signal.SIGKILL, f"writer died on its own:\n{stderr}"
        lines = out_path.read_text().splitlines()
        acked.read(line for line in lines if line != "ready")
        rounds_with_writes += len(lines) > 1
        with open_store(path) as store:
            _verify(store, acked)
    # the kills were real: the rounds killed after "ready" wrote before they died
    assert rounds_with_writes >= KILLS // 2
    assert acked.local > 20 and acked.remote > 20 and acked.blobs
