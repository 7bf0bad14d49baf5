"""An in-memory harness for sync tests: fake shells around real sessions, real crypto, real core.

Each :class:`FakeNode` is a pure "shell": core Replicas per sub-cloud, dict-based envelope
logs (per sub-cloud, origin, first counter, as the store keeps them), a snapshot checkpoint
per sub-cloud and one :class:`SyncSession` per linked peer. A :class:`FakeNet` wires the
sessions through lossless, ordered pipes, because the ``sync`` channel is reliable: what the
channel layer guarantees (tests/proto covers loss, reordering and duplication below it) is
exactly an ordered byte stream that dies with the link. The test moves ``now`` itself.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from p2pcloud._core import Replica
from p2pcloud._crypto import LocalIdentity
from p2pcloud._ids import Hashname, SubCloudId
from p2pcloud.errors import DecodeError, DeltaRejected
from p2pcloud.sync import (
    Catalog,
    Envelope,
    EnvelopesReceived,
    EnvelopesWanted,
    PeerVersionLearned,
    SnapshotReceived,
    SnapshotWanted,
    SyncSession,
    open_envelope,
    replica_id_for,
    seal,
)

NOW_MS = 1_800_000_000_000  # a fixed wall clock for the core's HLC checks


@dataclass
class Log:
    """One sub-cloud's stored envelopes: origin -> first counter -> (last, raw)."""

    by_origin: dict[bytes, dict[int, tuple[int, bytes]]] = field(default_factory=dict)

    def add(self, env: Envelope) -> bool:
        spans = self.by_origin.setdefault(env.origin, {})
        if env.first in spans:
            return False
        spans[env.first] = (env.last, env.raw)
        return True

    def after(self, origin: bytes, after: int, budget: int) -> list[bytes]:
        spans = self.by_origin.get(origin, {})
        out: list[bytes] = []
        size = 0
        for first in sorted(spans):
            last, raw = spans[first]
            if last <= after:
                continue
            if out and size + len(raw) > budget:
                break
            out.append(raw)
            size += len(raw)
        return out

    def all_raw(self) -> list[bytes]:
        return [raw for spans in self.by_origin.values() for _l, raw in spans.values()]


class FakeNode:
    """A fake shell: replicas, logs, checkpoints, sessions; answers every session event."""

    def __init__(self, name: str, rng: random.Random, net: FakeNet) -> None:
        self.name = name
        self.net = net
        self.identity = LocalIdentity.from_seed(rng.randbytes(32))
        self.hashname: Hashname = self.identity.hashname
        self.catalog = Catalog()
        self.replicas: dict[SubCloudId, Replica] = {}
        self.logs: dict[SubCloudId, Log] = {}
        self.checkpoints: dict[SubCloudId, tuple[bytes, dict[bytes, int]]] = {}
        self.sessions: dict[Hashname, SyncSession] = {}
        self.rejected: Counter[str] = Counter()
        self.peer_versions: dict[tuple[SubCloudId, Hashname], dict[bytes, int]] = {}
        self.window_bytes: int | None = None
        self.shares: dict[Hashname, Callable[[SubCloudId], bool]] = {}
        self.max_unacked_seen = 0
        self.max_in_flight_seen = 0
        self.events: list[object] = []
        self.requests: list[tuple[int, int, int]] = []  # (budget, bytes given, envelopes)

    # -- local data -------------------------------------------------------------------------

    def add_subcloud(self, sc: SubCloudId) -> None:
        self.replicas[sc] = Replica(replica_id_for(sc, self.hashname))
        self.logs[sc] = Log()
        self.catalog.set_subcloud(sc)

    def write(self, sc: SubCloudId, fn: Callable[[Replica], None]) -> Envelope:
        replica = self.replicas[sc]
        replica.begin(NOW_MS)
        fn(replica)
        env = seal(self.identity, sc, replica.commit())
        self._store(sc, env, source=None)
        return env

    def _store(self, sc: SubCloudId, env: Envelope, source: Hashname | None) -> bool:
        if not self.logs[sc].add(env):
            return False
        self.catalog.record(sc, env.origin, env.first, env.last, len(env.raw))
        for peer, session in self.sessions.items():
            if peer != source:
                session.push(sc, [env], self.net.now)
        return True

    def fold(self, sc: SubCloudId, floor: dict[bytes, int]) -> None:
        """Fold every envelope at or below ``floor`` into the checkpoint (what STORE does)."""
        old_snap, old_floor = self.checkpoints.get(sc, (b"", {}))
        tmp = Replica(b"\x00" * 16)
        if old_snap:
            tmp.apply([old_snap], NOW_MS)
        log = self.logs[sc]
        new_floor = dict(old_floor)
        for origin, spans in log.by_origin.items():
            limit = floor.get(origin, 0)
            for first in sorted(spans):
                last, raw = spans[first]
                if last <= limit:
                    tmp.apply([open_envelope(raw, lambda _s, _h: True).delta], NOW_MS)
                    del spans[first]
                    new_floor[origin] = max(new_floor.get(origin, 0), last)
        self.checkpoints[sc] = (tmp.encode_snapshot(), new_floor)
        self._refresh(sc)

    def _refresh(self, sc: SubCloudId) -> None:
        log = self.logs[sc]
        size = sum(len(raw) for spans in log.by_origin.values() for _l, raw in spans.values())
        self.catalog.set_subcloud(
            sc,
            self.replicas[sc].version(),
            self.checkpoints.get(sc, (b"", {}))[1],
            log_bytes=size,
            log_dots=sum(self.replicas[sc].version().values()),
        )

    def can_write(self, sc: SubCloudId, hashname: Hashname) -> bool:
        return hashname in self.net.writers.get(sc, set())

    # -- sessions ---------------------------------------------------------------------------

    def open_session(self, peer: FakeNode) -> SyncSession:
        kwargs: dict[str, Any] = {}
        if self.window_bytes is not None:
            kwargs["window_bytes"] = self.window_bytes
        if peer.hashname in self.shares:
            kwargs["shares"] = self.shares[peer.hashname]
        s = SyncSession(
            self.catalog, local=self.hashname, remote=peer.hashname, now=self.net.now, **kwargs
        )
        self.sessions[peer.hashname] = s
        return s

    def restart(self) -> None:
        """Lose every session (the stored logs, checkpoints and replicas stay)."""
        for peer in list(self.sessions):
            self.net.disconnect(self, self.net.by_hashname[peer])
        # a restarted node reloads its replicas from the store: snapshot + log after it
        for sc in list(self.replicas):
            replica = Replica(replica_id_for(sc, self.hashname))
            snap = self.checkpoints.get(sc, (b"", {}))[0]
            deltas = [snap] if snap else []
            for raw in self.logs[sc].all_raw():
                deltas.append(open_envelope(raw, lambda _s, _h: True).delta)
            replica.apply(deltas, NOW_MS)
            self.replicas[sc] = replica
            self._refresh(sc)

    def handle_events(self, peer: Hashname) -> None:
        s = self.sessions[peer]
        while (ev := s.next_event()) is not None:
            self.events.append(ev)
            if isinstance(ev, EnvelopesWanted):
                envs = self.logs[ev.subcloud].after(ev.origin, ev.after, ev.budget_bytes)
                self.requests.append((ev.budget_bytes, sum(len(e) for e in envs), len(envs)))
                s.provide_envelopes(ev.subcloud, ev.origin, ev.after, envs, self.net.now)
            elif isinstance(ev, SnapshotWanted):
                snap, version = self.checkpoints.get(ev.subcloud, (b"", {}))
                s.provide_snapshot(ev.subcloud, snap, version, self.net.now)
            elif isinstance(ev, EnvelopesReceived):
                self.max_unacked_seen = max(self.max_unacked_seen, s.unacknowledged_bytes)
                self._receive(ev, peer)
                s.acknowledge(ev.batch, self.net.now)
            elif isinstance(ev, SnapshotReceived):
                self._receive_snapshot(ev)
                s.acknowledge(ev.batch, self.net.now)
            elif isinstance(ev, PeerVersionLearned):
                self.peer_versions[(ev.subcloud, peer)] = ev.version

    def _receive(self, ev: EnvelopesReceived, peer: Hashname) -> None:
        sc = ev.subcloud
        opened: list[Envelope] = []
        for raw in ev.envelopes:
            try:
                opened.append(
                    open_envelope(raw, self.can_write, is_known=self.catalog.__contains__)
                )
            except DeltaRejected as exc:
                self.rejected[exc.reason] += 1
        fresh = [e for e in opened if e.first not in self.logs[sc].by_origin.get(e.origin, {})]
        if not fresh:
            return
        try:
            self.replicas[sc].apply([e.delta for e in fresh], NOW_MS)
        except DecodeError:
            self.rejected["core refused"] += 1
            return
        for env in fresh:
            self._store(sc, env, source=peer)

    def _receive_snapshot(self, ev: SnapshotReceived) -> None:
        sc = ev.subcloud
        self.replicas[sc].apply([ev.snapshot], NOW_MS)
        old_snap, old_floor = self.checkpoints.get(sc, (b"", {}))
        tmp = Replica(b"\x00" * 16)
        tmp.apply([s for s in (old_snap, ev.snapshot) if s], NOW_MS)
        floor = dict(old_floor)
        for o, c in ev.version.items():
            floor[o] = max(floor.get(o, 0), c)
        log = self.logs[sc]
        for origin, spans in log.by_origin.items():
            for first in [f for f, (last, _r) in spans.items() if last <= floor.get(origin, 0)]:
                del spans[first]
        self.checkpoints[sc] = (tmp.encode_snapshot(), floor)
        self._refresh(sc)


class FakeNet:
    """Lossless ordered pipes between linked nodes; steps move every pending byte once."""

    def __init__(self, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.now = 1000.0
        self.nodes: list[FakeNode] = []
        self.by_hashname: dict[Hashname, FakeNode] = {}
        self.writers: dict[SubCloudId, set[Hashname]] = {}
        self.links: set[tuple[Hashname, Hashname]] = set()
        self.flights = 0  # steps that carried bytes
        self.bytes = 0
        self.flight_bytes: list[int] = []

    def add(self, name: str) -> FakeNode:
        node = FakeNode(name, self.rng, self)
        self.nodes.append(node)
        self.by_hashname[node.hashname] = node
        return node

    def subcloud(
        self, *members: FakeNode, writers: tuple[FakeNode, ...] | None = None
    ) -> SubCloudId:
        sc = SubCloudId(self.rng.randbytes(16))
        self.writers[sc] = {n.hashname for n in (writers if writers is not None else members)}
        for n in members:
            n.add_subcloud(sc)
        return sc

    def connect(self, a: FakeNode, b: FakeNode) -> None:
        key = tuple(sorted((a.hashname, b.hashname)))
        assert key not in self.links
        self.links.add(key)  # type: ignore[arg-type]
        a.open_session(b)
        b.open_session(a)

    def disconnect(self, a: FakeNode, b: FakeNode) -> None:
        key = tuple(sorted((a.hashname, b.hashname)))
        self.links.discard(key)  # type: ignore[arg-type]
        a.sessions.pop(b.hashname, None)
        b.sessions.pop(a.hashname, None)

    def reset_counters(self) -> None:
        self.flights = 0
        self.bytes = 0
        self.flight_bytes = []

    def step(self) -> int:
        """Deliver everything every session has to send, at once; return the bytes moved."""
        outgoing = []
        for node in self.nodes:
            for peer in list(node.sessions):
                node.handle_events(peer)
            for peer, session in node.sessions.items():
                data = session.data_to_send()
                if data:
                    outgoing.append((node, self.by_hashname[peer], data))
        moved = 0
        for src, dst, data in outgoing:
            session = dst.sessions.get(src.hashname)
            if session is None:
                continue
            session.receive_data(data, self.now)
            dst.handle_events(src.hashname)
            moved += len(data)
        for node in self.nodes:
            for session in node.sessions.values():
                node.max_in_flight_seen = max(node.max_in_flight_seen, session.in_flight_bytes)
        if moved:
            self.flights += 1
            self.bytes += moved
            self.flight_bytes.append(moved)
        return moved

    def run(self, max_steps: int = 10_000) -> int:
        """Step until no bytes move; return the number of flights (half round trips)."""
        start = self.flights
        for _ in range(max_steps):
            if not self.step():
                return self.flights - start
        raise AssertionError("peers never went quiet")

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for node in self.nodes:
            for session in node.sessions.values():
                timer = session.get_timer()
                if timer is not None and timer <= self.now:
                    session.handle_timer(self.now)
