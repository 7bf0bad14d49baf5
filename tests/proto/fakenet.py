"""A pure, seeded fake datagram network that pumps several :class:`Mesh` objects.

Theory of operation
-------------------
The network owns the clock: ``net.now`` only moves forward, to the next datagram delivery or
the next mesh timer, whichever is earlier (the meshes never read a clock, so a test with
minutes of simulated time runs in milliseconds). Every datagram a mesh hands out with
``datagrams_to_send`` goes through :meth:`FakeNetwork._transmit`, which behaves like UDP on a
bad day, all decided by one ``random.Random(seed)`` so a failing seed replays exactly:

* a datagram larger than the MTU is dropped (as IP would without fragmentation);
* a blocked (source, target) pair drops everything (a NAT or firewall between them), and
  a test's ``filters`` drop chosen datagrams (e.g. "the first echo");
* each datagram is lost with probability ``loss``, duplicated with probability
  ``duplicate`` (the copy takes its own delay), delayed by ``delay`` plus a uniform jitter,
  and with probability ``reorder`` delayed by up to ``reorder_span`` more, so later
  datagrams overtake it.

Nothing is reliable: the only promise is that a delivered datagram arrives whole. Helpers
fail loudly: :meth:`run_until` raises ``AssertionError`` when its condition does not hold in
time, and :meth:`settle` when the meshes never go quiet.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from p2pcloud._crypto import LocalIdentity
from p2pcloud._ids import Hashname
from p2pcloud._wire import MAX_UDP_PACKET
from p2pcloud.proto.events import MeshEvent
from p2pcloud.proto.mesh import Mesh
from p2pcloud.proto.path import Path

E = TypeVar("E")

QUIET_GAP = 5.0  # seconds: meshes are "quiet" when nothing is in flight and no timer is due
# sooner than this (keepalives every 30 s never end, so "no timer at all" cannot be asked)


@dataclass
class FakeNode:
    """One endpoint on the fake network: a mesh, its address and the events it emitted."""

    name: str
    mesh: Mesh
    addr: Path
    events: list[MeshEvent] = field(default_factory=list)
    sent: int = 0
    received: int = 0
    offset: float = 0.0  # this process's monotonic clock minus the network's (each differs)
    counts: Counter[type] = field(default_factory=Counter)

    @property
    def hashname(self) -> Hashname:
        """The mesh's hashname."""
        return self.mesh.hashname

    def of(self, kind: type[E]) -> list[E]:
        """Every event of one type emitted so far, in order."""
        return [e for e in self.events if isinstance(e, kind)]

    def count(self, kind: type[MeshEvent]) -> int:
        """How many events of one type were emitted so far (cheap: for run_until conditions)."""
        return self.counts[kind]

    def keys(self) -> dict[str, bytes]:
        """The keys a peer needs to link to this node."""
        return {"3a": self.mesh.identity.cs3a_public}


@dataclass(order=True)
class _InFlight:
    at: float
    seq: int
    data: bytes = field(compare=False)
    source: Path = field(compare=False)
    target: Path = field(compare=False)


class FakeNetwork:
    """Seeded lossy datagram network plus the clock for a set of meshes.

    Args:
        seed: seeds every random choice (loss, duplication, delay, reordering, keys).
        loss: probability that a datagram is lost.
        duplicate: probability that a datagram is delivered twice.
        reorder: probability that a datagram gets an extra delay of up to ``reorder_span``.
        delay: base one-way delay in seconds.
        jitter: uniform extra delay in seconds.
        reorder_span: the largest extra delay of a reordered datagram.
        mtu: the largest datagram delivered.
        start: the initial ``now``.
    """

    def __init__(
        self,
        seed: int,
        *,
        loss: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        delay: float = 0.005,
        jitter: float = 0.0,
        reorder_span: float = 0.05,
        mtu: int = MAX_UDP_PACKET,
        start: float = 1000.0,
    ) -> None:
        self.rng = random.Random(seed)
        self.loss = loss
        self.duplicate = duplicate
        self.reorder = reorder
        self.delay = delay
        self.jitter = jitter
        self.reorder_span = reorder_span
        self.mtu = mtu
        self.now = start
        self.nodes: dict[Path, FakeNode] = {}
        self.blocked: set[tuple[Path, Path]] = set()
        self.taps: list[Callable[[bytes, Path, Path], None]] = []
        self.filters: list[Callable[[bytes, Path, Path], bool]] = []  # True: drop it
        self._heap: list[_InFlight] = []
        self._seq = itertools.count()
        self._ports = itertools.count(40000)
        self.delivered = 0
        self.lost = 0
        self.steps = 0

    # -- building -------------------------------------------------------------------------

    def entropy_for(self, name: str) -> Callable[[int], bytes]:
        """A deterministic entropy source for one node (seeded from the network's rng)."""
        del name  # nodes are told apart by the order they are added in
        rng = random.Random(self.rng.getrandbits(64))
        return rng.randbytes

    def add(
        self,
        name: str,
        *,
        accept: Callable[[Hashname], bool] | None = None,
        relay: bool = True,
        identity: LocalIdentity | None = None,
        types: tuple[str, ...] = ("test",),
        offset: float = 0.0,
        tcp: bool = False,
    ) -> FakeNode:
        """Create a mesh with a fresh identity on a new address ``127.0.0.1:<port>``.

        ``offset`` shifts the node's clock: real processes have unrelated monotonic clocks
        (Trio even adds a random offset), and the mesh must not care. ``tcp`` gives it a
        ``tcp4`` address (datagrams still behave as configured: TCP framing is the shell's).
        """
        entropy = self.entropy_for(name)
        ident = identity if identity is not None else LocalIdentity.generate(entropy)
        mesh = Mesh(ident, entropy=entropy, accept=accept, relay=relay)
        if types:
            mesh.handle_types(*types)
        port = next(self._ports)
        addr = Path.tcp4("127.0.0.1", port) if tcp else Path.udp4("127.0.0.1", port)
        mesh.add_local_path(addr)
        node = FakeNode(name, mesh, addr, offset=offset)
        self.nodes[addr] = node
        return node

    def replace(self, node: FakeNode, mesh: Mesh, *, offset: float | None = None) -> None:
        """Swap a node's mesh (a process restart), optionally with another clock offset."""
        node.mesh = mesh
        if offset is not None:
            node.offset = offset
        mesh.add_local_path(node.addr)

    def time_of(self, node: FakeNode) -> float:
        """``now`` as the node's own monotonic clock reads it."""
        return self.now + node.offset

    def move(self, node: FakeNode, addr: Path) -> None:
        """Give a node a new address (a NAT rebinding or a network change)."""
        del self.nodes[node.addr]
        node.addr = addr
        self.nodes[addr] = node

    def block(self, a: Path, b: Path) -> None:
        """Drop every datagram between two addresses, both ways."""
        self.blocked.add((a, b))
        self.blocked.add((b, a))

    def unblock(self, a: Path, b: Path) -> None:
        """Undo :meth:`block`."""
        self.blocked.discard((a, b))
        self.blocked.discard((b, a))

    # -- moving datagrams -----------------------------------------------------------------

    def flush(self, node: FakeNode) -> None:
        """Take a node's outgoing datagrams and put them on the wire; collect its events."""
        for data, target in node.mesh.datagrams_to_send(self.now + node.offset):
            assert target.is_direct, f"mesh handed a non-direct path to the network: {target}"
            node.sent += 1
            self._transmit(data, node.addr, target)
        while True:
            event = node.mesh.next_event()
            if event is None:
                break
            node.events.append(event)
            node.counts[type(event)] += 1

    def inject(self, node: FakeNode, data: bytes, source: Path) -> None:
        """Deliver ``data`` to ``node`` now, as if it came from ``source``."""
        node.mesh.receive_datagram(data, source, self.now + node.offset)
        self.flush(node)

    def _transmit(self, data: bytes, source: Path, target: Path) -> None:
        for tap in self.taps:
            tap(data, source, target)
        dropped = any(f(data, source, target) for f in self.filters)
        if dropped or len(data) > self.mtu or (source, target) in self.blocked:
            self.lost += 1
            return
        copies = 2 if self.rng.random() < self.duplicate else 1
        for _ in range(copies):
            if self.rng.random() < self.loss:
                self.lost += 1
                continue
            at = self.now + self.delay + self.rng.uniform(0.0, self.jitter)
            if self.rng.random() < self.reorder:
                at += self.rng.uniform(0.0, self.reorder_span)
            heapq.heappush(self._heap, _InFlight(at, next(self._seq), data, source, target))

    def nodes_by_name(self, name: str) -> FakeNode:
        """The (last added) node called ``name``."""
        return [n for n in self.nodes.values() if n.name == name][-1]

    def in_flight(self) -> int:
        """Datagrams on the wire now."""
        return len(self._heap)

    def next_time(self) -> float | None:
        """When the next delivery or mesh timer is due."""
        candidates = []
        for node in self.nodes.values():
            timer = node.mesh.get_timer()
            if timer is not None:
                candidates.append(timer - node.offset)
        if self._heap:
            candidates.append(self._heap[0].at)
        return min(candidates) if candidates else None

    def step(self) -> bool:
        """Advance to the next delivery or timer and process it. False when nothing is left."""
        when = self.next_time()
        if when is None:
            return False
        self.steps += 1
        self.now = max(self.now, when)
        if self._heap and self._heap[0].at <= self.now:
            item = heapq.heappop(self._heap)
            node = self.nodes.get(item.target)
            if node is not None:
                self.delivered += 1
                node.received += 1
                node.mesh.receive_datagram(item.data, item.source, self.now + node.offset)
                self.flush(node)
            return True
        for node in list(self.nodes.values()):
            timer = node.mesh.get_timer()
            if timer is not None and timer - node.offset <= self.now:
                # max(): with an offset, float rounding could land a hair before the timer
                node.mesh.handle_timer(max(self.now + node.offset, timer))
                self.flush(node)
        return True

    def flush_all(self) -> None:
        """Flush every node (after a test called the mesh API directly)."""
        for node in list(self.nodes.values()):
            self.flush(node)

    # -- running --------------------------------------------------------------------------

    def run_until(
        self,
        cond: Callable[[], Any],
        *,
        timeout: float = 60.0,
        max_steps: int = 2_000_000,
        tick: Callable[[], None] | None = None,
    ) -> None:
        """Run until ``cond()`` is true; AssertionError after ``timeout`` simulated seconds.

        Args:
            cond: checked after every step.
            timeout: simulated seconds allowed.
            max_steps: steps allowed (a livelock guard).
            tick: called after every step (a test's application logic, e.g. a sender).
        """
        self.flush_all()
        deadline = self.now + timeout
        for _ in range(max_steps):
            if tick is not None:
                tick()
                self.flush_all()
            if cond():
                return
            nxt = self.next_time()
            if nxt is None or nxt > deadline:
                raise AssertionError(
                    f"condition not met within {timeout} s (now={self.now:.3f}, "
                    f"in flight={self.in_flight()})"
                )
            self.step()
        raise AssertionError(f"condition not met within {max_steps} steps")

    def run_for(self, seconds: float, *, max_steps: int = 2_000_000) -> None:
        """Run every delivery and timer due in the next ``seconds``, then set ``now`` there."""
        self.flush_all()
        end = self.now + seconds
        for _ in range(max_steps):
            nxt = self.next_time()
            if nxt is None or nxt > end:
                self.now = end
                return
            self.step()
        raise AssertionError(f"meshes never went quiet: {max_steps} steps in {seconds} s")

    def settle(self, *, max_steps: int = 200_000, max_time: float = 120.0) -> None:
        """Run until nothing is in flight and no timer is due within QUIET_GAP seconds.

        Raises:
            AssertionError: "peers never went quiet" after ``max_steps`` or ``max_time``.
        """
        self.flush_all()
        start = self.now
        for _ in range(max_steps):
            nxt = self.next_time()
            if not self._heap and (nxt is None or nxt > self.now + QUIET_GAP):
                return
            assert self.now - start <= max_time, "peers never went quiet (time)"
            self.step()
        raise AssertionError(f"peers never went quiet: {max_steps} steps")
