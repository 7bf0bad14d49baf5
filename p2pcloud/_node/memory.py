"""An in-memory datagram network for deterministic node tests (STYLE.md section 1, idea 4).

Theory of operation
-------------------
:class:`MemoryNetwork` behaves like UDP between endpoints on one machine, without sockets:
a datagram may be lost, duplicated, delayed and reordered, and one larger than the MTU is
dropped, all decided by a seeded ``random.Random`` so a failing seed replays exactly. Time is
Trio's clock, so under ``trio.testing.MockClock(autojump_threshold=0)`` a test with seconds of
simulated delay runs in milliseconds.

Nothing here is reliable: the only promise is that a datagram that is delivered arrives whole
and unchanged. Each endpoint has a bounded receive queue; a full queue drops, as a full socket
buffer does.

One delivery task (started by :func:`open_memory_network`) keeps a heap of datagrams in flight
ordered by delivery time and sleeps until the earliest one is due.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from p2pcloud.errors import LocalProtocolError
from p2pcloud.proto.path import Path

__all__ = [
    "MemoryEndpoint",
    "MemoryNetwork",
    "NetworkConditions",
    "open_memory_network",
]

MEMORY_IP = "127.0.0.1"  # endpoints are named like loopback UDP sockets; nothing is bound
MEMORY_QUEUE = 1024  # datagrams an endpoint buffers unread, like a socket receive buffer
DEFAULT_MTU = 1500  # an Ethernet-sized datagram limit, as on a real UDP path


@dataclass(frozen=True, slots=True)
class NetworkConditions:
    """How badly the network behaves. Probabilities are per datagram, in 0..1.

    Attributes:
        loss: probability that a datagram is lost.
        duplicate: probability that a datagram is delivered twice.
        reorder: probability that a datagram gets an extra delay (up to ``reorder_delay``)
            and so overtakes or is overtaken by its neighbours.
        delay: one-way delay in seconds for every datagram.
        jitter: a uniform random extra delay in 0..jitter seconds.
        reorder_delay: the largest extra delay of a reordered datagram.
        mtu: the largest datagram delivered; larger ones are dropped.
    """

    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    delay: float = 0.005
    jitter: float = 0.0
    reorder_delay: float = 0.05
    mtu: int = DEFAULT_MTU

    def __post_init__(self) -> None:
        """Reject probabilities outside 0..1 and negative delays."""
        for name in ("loss", "duplicate", "reorder"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability, got {value}")
        if min(self.delay, self.jitter, self.reorder_delay) < 0 or self.mtu < 1:
            raise ValueError("delays must be >= 0 and mtu >= 1")


@dataclass(order=True, slots=True)
class _InFlight:
    when: float
    seq: int
    data: bytes = field(compare=False)
    source: Path = field(compare=False)
    target: Path = field(compare=False)


class MemoryEndpoint:
    """One endpoint on a :class:`MemoryNetwork`: a UDP-like socket with an address.

    Attributes:
        path: this endpoint's address (a ``udp4`` path on 127.0.0.1 with a unique port).
    """

    def __init__(self, network: MemoryNetwork, path: Path) -> None:
        """Create an endpoint; use :meth:`MemoryNetwork.endpoint` instead."""
        self._network = network
        self.path = path
        self._send, self._receive = trio.open_memory_channel[tuple[bytes, Path]](MEMORY_QUEUE)
        self.closed = False

    def send_nowait(self, data: bytes, path: Path) -> bool:
        """Send one datagram to ``path`` (it may be lost; nothing tells).

        Args:
            data: the datagram.
            path: the target endpoint's address.

        Returns:
            True: the network never pushes back (a full receiver queue drops instead).
        """
        if not self.closed:
            self._network._submit(bytes(data), self.path, path)
        return True

    async def send(self, data: bytes, path: Path) -> None:
        """Send one datagram to ``path`` (it may be lost; nothing tells).

        Args:
            data: the datagram.
            path: the target endpoint's address.

        Raises:
            trio.ClosedResourceError: the endpoint is closed.
        """
        if self.closed:
            raise trio.ClosedResourceError("memory endpoint is closed")
        self.send_nowait(data, path)
        await trio.lowlevel.checkpoint()

    def receive_nowait(self) -> tuple[bytes, Path]:
        """Take a datagram that already arrived.

        Raises:
            trio.WouldBlock: none is waiting.
            trio.EndOfChannel: the endpoint is closed.
        """
        return self._receive.receive_nowait()

    async def receive(self) -> tuple[bytes, Path]:
        """Wait for the next datagram.

        Returns:
            ``(data, source path)``.

        Raises:
            trio.ClosedResourceError: the endpoint is closed.
        """
        try:
            return await self._receive.receive()
        except trio.EndOfChannel as exc:
            raise trio.ClosedResourceError("memory endpoint is closed") from exc

    def __aiter__(self) -> AsyncIterator[tuple[bytes, Path]]:
        """Iterate over received datagrams until the endpoint closes."""
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[bytes, Path]]:
        async for item in self._receive:
            yield item

    def _deliver(self, data: bytes, source: Path) -> bool:
        if self.closed:
            return False
        try:
            self._send.send_nowait((data, source))
        except trio.WouldBlock:
            return False
        return True

    def close(self) -> None:
        """Close the endpoint: its address frees up and its iterator ends."""
        if not self.closed:
            self.closed = True
            self._send.close()
            self._network._endpoints.pop(self.path, None)


class MemoryNetwork:
    """A seeded, lossy, UDP-like datagram network living in one Trio run.

    Attributes:
        conditions: the :class:`NetworkConditions` applied to every datagram.
        counts: what happened to datagrams: ``sent``, ``delivered``, ``lost``, ``duplicated``,
            ``reordered``, ``too_big``, ``no_endpoint``, ``queue_full``.
        blocked: pairs ``(source, target)`` of paths that cannot reach each other (both
            directions are checked separately), to model endpoints behind separate NATs.
    """

    def __init__(self, conditions: NetworkConditions | None = None, *, seed: int = 0) -> None:
        """Create the network (run it with :func:`open_memory_network`).

        Args:
            conditions: loss, duplication, reordering, delay and MTU; default: a clean network.
            seed: the seed of every random decision.
        """
        self.conditions = conditions or NetworkConditions()
        self._random = random.Random(seed)  # noqa: S311  (a replayable fake, not crypto)
        self._endpoints: dict[Path, MemoryEndpoint] = {}
        self._ports = itertools.count(10_000)
        self._seq = itertools.count()
        self._heap: list[_InFlight] = []
        self._wakeup = trio.Event()
        self.counts: Counter[str] = Counter()
        self.blocked: set[tuple[Path, Path]] = set()

    def endpoint(self, port: int | None = None) -> MemoryEndpoint:
        """Create an endpoint with a fresh (or the given) port.

        Args:
            port: a port number; None picks the next free one.

        Returns:
            The endpoint.

        Raises:
            LocalProtocolError: the port is in use.
        """
        path = Path.udp4(MEMORY_IP, port if port is not None else next(self._ports))
        if path in self._endpoints:
            raise LocalProtocolError(f"memory port {path.port} is in use")
        endpoint = MemoryEndpoint(self, path)
        self._endpoints[path] = endpoint
        return endpoint

    def block(self, a: Path, b: Path) -> None:
        """Make ``a`` and ``b`` unable to reach each other, in both directions.

        Args:
            a: one endpoint's path.
            b: the other's.
        """
        self.blocked.add((a, b))
        self.blocked.add((b, a))

    def _submit(self, data: bytes, source: Path, target: Path) -> None:
        cond = self.conditions
        rnd = self._random
        self.counts["sent"] += 1
        if len(data) > cond.mtu:
            self.counts["too_big"] += 1
            return
        if (source, target) in self.blocked:
            self.counts["blocked"] += 1
            return
        copies = 1
        if cond.duplicate and rnd.random() < cond.duplicate:
            copies = 2
            self.counts["duplicated"] += 1
        now = trio.current_time()
        for _ in range(copies):
            if cond.loss and rnd.random() < cond.loss:
                self.counts["lost"] += 1
                continue
            delay = cond.delay
            if cond.jitter:
                delay += rnd.uniform(0.0, cond.jitter)
            if cond.reorder and rnd.random() < cond.reorder:
                delay += rnd.uniform(0.0, cond.reorder_delay)
                self.counts["reordered"] += 1
            item = _InFlight(now + delay, next(self._seq), data, source, target)
            heapq.heappush(self._heap, item)
            if self._heap[0] is item:
                self._wakeup.set()

    async def _run(self) -> None:
        while True:
            if not self._heap:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            first = self._heap[0].when
            with trio.move_on_at(first):
                await self._wakeup.wait()
            if self._wakeup.is_set():
                self._wakeup = trio.Event()
            now = trio.current_time()
            while self._heap and self._heap[0].when <= now:
                item = heapq.heappop(self._heap)
                target = self._endpoints.get(item.target)
                if target is None:
                    self.counts["no_endpoint"] += 1
                elif target._deliver(item.data, item.source):
                    self.counts["delivered"] += 1
                else:
                    self.counts["queue_full"] += 1

    @property
    def in_flight(self) -> int:
        """Datagrams sent and not yet delivered or dropped."""
        return len(self._heap)


@asynccontextmanager
async def open_memory_network(
    conditions: NetworkConditions | None = None, *, seed: int = 0
) -> AsyncIterator[MemoryNetwork]:
    """Run a :class:`MemoryNetwork` for the duration of the ``async with`` block.

    Args:
        conditions: loss, duplication, reordering, delay and MTU.
        seed: the seed of every random decision.

    Yields:
        The running network.
    """
    network = MemoryNetwork(conditions, seed=seed)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(network._run)
            try:
                yield network
            finally:
                for endpoint in list(network._endpoints.values()):
                    endpoint.close()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Let an error from the ``async with`` body leave as itself, not wrapped in a group.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from group.exceptions[0].__cause__
        raise
