"""Two (or more) devices, each a real folder in tmp_path with its own core Replica.

Deltas go from one replica to the other in the test, as SYNC will carry them; chunks are
served by the other device's Folder.read_chunk (what the blob channel will carry), and
every chunk asked for is recorded so a test can see what crossed the "network".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from p2pcloud._core import Replica
from p2pcloud.blobs import Manifest
from p2pcloud.files import Folder, ReconcileResult, paths_from_changes

START_MS = 1_767_225_600_000  # 2026-01-01, a fixed fake clock for the replicas


class Clock:
    """Milliseconds that only go forward, one tick per call."""

    def __init__(self) -> None:
        self.ms = START_MS

    def __call__(self) -> int:
        self.ms += 1
        return self.ms


class Device:
    """One device: a folder on disk, a replica, the peers it may fetch chunks from."""

    def __init__(self, tmp_path: Path, name: str, clock: Clock) -> None:
        self.name = name
        self.root = tmp_path / name
        self.root.mkdir()
        self.clock = clock
        self.replica = Replica((name * 16).encode()[:16])
        self.peers: list[Device] = []
        self.fetched: list[bytes] = []  # chunk hashes that came from a peer
        self.store: dict[bytes, bytes] = {}  # a chunk store (filled by blob fetches)
        self.folder = self._open()

    def _open(self) -> Folder:
        return Folder(self.root, self.replica, device=self.name,
                      index_path=self.root.parent / f"{self.name}.index",
                      chunks=self._chunk, manifests=self._manifest, has_chunk=self._has)

    def reopen(self) -> None:
        """A restart: a new Folder over the same directory, index and replica."""
        self.folder = self._open()

    def _has(self, h: bytes) -> bool:
        return h in self.store or any(p.folder.index.locate(h) is not None for p in self.peers)

    def _chunk(self, h: bytes) -> bytes | None:
        if h in self.store:
            return self.store[h]
        for p in self.peers:
            data = p.folder.read_chunk(h)
            if data is not None:
                self.fetched.append(h)
                return data
        return None

    def _manifest(self, blob: bytes) -> Manifest | None:
        for p in self.peers:
            m = p.folder.manifest(blob)
            if m is not None:
                return m
        return None

    def reconcile(self, paths: list[str] | None = None) -> ReconcileResult:
        return self.folder.reconcile(paths, now_ms=self.clock())

    def receive(self, deltas: list[bytes]) -> list[str]:
        changes = self.replica.apply(deltas, self.clock())
        return paths_from_changes(changes)

    def write(self, rel: str, data: bytes, *, mtime_ns: int | None = None,
              mode: int | None = None) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if mode is not None:
            os.chmod(path, mode)
        if mtime_ns is not None:
            os.utime(path, ns=(mtime_ns, mtime_ns))

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def files(self) -> dict[str, bytes]:
        out = {}
        for dirpath, _dirs, names in os.walk(self.root):
            for n in names:
                p = Path(dirpath) / n
                out[p.relative_to(self.root).as_posix()] = p.read_bytes()
        return out


def pump(devices: list[Device], rounds: int = 10) -> list[ReconcileResult]:
    """Reconcile every device and pass every delta to the others until all are quiet."""
    results = []
    pending: dict[str, list[str] | None] = {d.name: None for d in devices}
    for _ in range(rounds):
        deltas = []
        for d in devices:
            if d.name not in pending:
                continue
            r = d.reconcile(pending[d.name])
            results.append(r)
            if r.delta:
                deltas.append((d, r.delta))
        pending = {}
        if not deltas:
            return results
        for src, delta in deltas:
            for d in devices:
                if d is not src:
                    touched = d.receive([delta])
                    prev = pending.get(d.name)
                    pending[d.name] = (prev or []) + touched
    raise AssertionError("devices never went quiet")


@pytest.fixture
def devices(tmp_path: Path) -> Iterator[Callable[[int], list[Device]]]:
    clock = Clock()

    def make(n: int) -> list[Device]:
        devs = [Device(tmp_path, name, clock) for name in ["alpha", "bravo", "charlie"][:n]]
        for d in devs:
            d.peers = [p for p in devs if p is not d]
        return devs

    yield make
