"""Crash safety of the replication engine with real processes and kill -9.

A worker node (tests/e2e/_sync_worker.py, a subprocess) writes locally while a large
backlog streams in from a peer node (in this process, real UDP/TCP on 127.0.0.1). The test
SIGKILLs the worker at 22 seeded random moments, some during the backlog sync and some
during its local writes, and restarts it each time. Then: nothing the worker acknowledged
is lost (the peer and the worker's own store hold every acknowledged write), the store
opens after every kill, and the sync completes.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import trio

import p2pcloud
from p2pcloud import _keyfile
from p2pcloud._core import Replica
from p2pcloud._crypto import LocalIdentity
from p2pcloud._node.subcloud import SubCloud
from p2pcloud.sync import replica_id_for, seal

ROOT = Path(__file__).resolve().parents[2]
KILLS = int(os.environ.get("CRASH_KILLS", "22"))
SEED = 20261129
INITIAL_BACKLOG = 3000  # envelopes of ~2 KiB each (~6 MiB) before the first start
BACKLOG_PER_ROUND = 400  # more arrive at the peer between restarts, so most rounds sync
LOCAL_WRITES = 2500  # the worker writes at most ~100 a second: rounds never run out
WAIT = 120  # seconds any one phase may take on a loaded 2-core machine


class Worker:
    """One run of the worker process and the lines it printed."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.acked: list[int] = []
        self._buf = b""
        self._changed = trio.Event()

    async def pump(self) -> None:
        assert self.proc.stdout is not None
        while data := await self.proc.stdout.receive_some():
            self._buf += data
            *lines, self._buf = self._buf.split(b"\n")
            for raw in lines:
                line = raw.decode()
                self.lines.append(line)
                if line.startswith("ACK "):
                    self.acked.append(int(line[4:]))
            self._changed.set()
            self._changed = trio.Event()
        self._changed.set()

    async def wait_line(self, predicate: object) -> None:
        assert callable(predicate)
        with trio.fail_after(WAIT):
            while not predicate(self):
                if self.proc.returncode is not None and not self.proc.stdout:
                    break
                await self._changed.wait()


def backlog_envelopes(author: LocalIdentity, sc_id: bytes, start: int, count: int,
                      replica: Replica) -> list[bytes]:
    out = []
    rng = random.Random(start)
    for i in range(start, start + count):
        replica.begin(1_780_000_000_000 + i)
        replica.set_many("backlog", f"b{i:06d}",
                         {f"f{k}": rng.randbytes(96).hex() for k in range(8)})
        out.append(seal(author, sc_id, replica.commit()).raw)  # type: ignore[arg-type]
    return out


async def feed(peer: p2pcloud.Node, sc: SubCloud, raws: list[bytes], author: str) -> None:
    engine = peer.replication
    assert engine is not None
    for i in range(0, len(raws), 500):
        await engine.ingest(sc.id, tuple(raws[i:i + 500]), author)  # type: ignore[arg-type]


def _count_note(peer: p2pcloud.Node, sc: SubCloud) -> str:
    engine = peer.replication
    assert engine is not None
    return (f"peer local={len(sc.documents('local'))} stats={engine.statistics()} "
            f"mesh drops={peer.statistics().dropped}")


async def run_round(worker: Worker, peer: p2pcloud.Node, sc: SubCloud, rng: random.Random,
                    last: bool) -> str:
    """Run one life of the worker; return how it ended: "sync", "writes" or "done"."""
    proc = worker.proc
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.pump)
        await worker.wait_line(lambda w: "LINKED" in w.lines or w.proc.poll() is not None)
        assert "LINKED" in worker.lines, f"the worker did not start: {worker.lines} " \
            f"(exit {proc.poll()})"
        if last:
            try:
                await worker.wait_line(lambda w: "DONE" in w.lines)
            except trio.TooSlowError:
                raise AssertionError(
                    f"the last run never finished: acked {len(worker.acked)}, lines "
                    f"{worker.lines[-3:]}, {_count_note(peer, sc)}") from None
            with trio.fail_after(WAIT):  # the peer holds every acknowledged write
                while True:
                    if all(sc.get("local", f"w{i}") == {"v": i} for i in range(LOCAL_WRITES)):
                        break
                    await trio.sleep(0.05)
            assert proc.stdin is not None
            await proc.stdin.aclose()
            with trio.fail_after(WAIT):
                assert await proc.wait() == 0
            how = "done"
        elif rng.random() < 0.5:
            # during the sync: a random instant after the link came up
            await trio.sleep(rng.uniform(0.0, 0.6))
            how = "writes" if "SYNCED" in worker.lines else "sync"
            proc.kill()
        else:
            n = len(worker.acked) + rng.randint(1, 40)
            await worker.wait_line(
                lambda w: len(w.acked) >= n or LOCAL_WRITES - 1 in w.acked)
            how = "writes"
            proc.kill()
        await proc.wait()
        nursery.cancel_scope.cancel()
    return how


async def test_kill_9_during_writes_and_sync(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    author = LocalIdentity.generate(os.urandom)  # a member whose deltas the peer forwards
    async with p2pcloud.open_node(tmp_path / "peer") as peer:
        worker_id = LocalIdentity.generate(os.urandom)
        while worker_id.hashname > peer.hashname:  # the worker opens the channels on restart
            worker_id = LocalIdentity.generate(os.urandom)
        wdir = tmp_path / "worker"
        wdir.mkdir(mode=0o700)
        _keyfile.save_identity(wdir / "identity.key", worker_id)
        sc = await peer.create_subcloud("crash")
        await sc.share(author.hashname, "write")
        await sc.share(worker_id.hashname, "write")
        author_replica = Replica(replica_id_for(sc.id, author.hashname))
        made = 0
        raws = backlog_envelopes(author, sc.id, made, INITIAL_BACKLOG, author_replica)
        made += INITIAL_BACKLOG
        await feed(peer, sc, raws, author.hashname)

        acked: set[int] = set()
        kills: Counter[str] = Counter()
        for round_ in range(KILLS + 1):
            last = round_ == KILLS
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "tests.e2e._sync_worker", str(wdir), peer.link_uri,
                 sc.id.hex(), str(LOCAL_WRITES), str(made)],
                stdout=subprocess.PIPE, stdin=subprocess.PIPE, cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            worker = Worker(proc)
            try:
                kills[await run_round(worker, peer, sc, rng, last)] += 1
            finally:
                if proc.poll() is None:
                    proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
            acked.update(worker.acked)
            if not last:
                raws = backlog_envelopes(author, sc.id, made, BACKLOG_PER_ROUND, author_replica)
                made += BACKLOG_PER_ROUND
                await feed(peer, sc, raws, author.hashname)
        assert kills["sync"] + kills["writes"] == KILLS
        # "sync": killed before the worker held the whole backlog; "writes": after
        assert kills["sync"] >= 3 and kills["writes"] >= 3, kills
        # a write that committed just before a kill was never acknowledged; the others were
        assert acked <= set(range(LOCAL_WRITES)) and len(acked) >= LOCAL_WRITES - KILLS
        assert len(sc.documents("backlog")) == made

    # the worker's own store: every acknowledged write and the whole backlog
    async with p2pcloud.open_node(wdir) as again:
        w_sc = again.subcloud(sc.id)
        assert all(w_sc.get("local", f"w{i}") == {"v": i} for i in range(LOCAL_WRITES))
        assert len(w_sc.documents("backlog")) == made
