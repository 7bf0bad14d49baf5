"""Helpers for node tests: nodes on the in-memory network.

Tests take pytest-trio's ``autojump_clock`` fixture (a ``MockClock`` that jumps ahead whenever
every task is blocked), so seconds of simulated retransmit timers cost no real time.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from p2pcloud._crypto import LocalIdentity
from p2pcloud._node.memory import MemoryNetwork, NetworkConditions, open_memory_network
from p2pcloud._node.node import Node, open_node


def identity(seed: int) -> LocalIdentity:
    """A deterministic identity (so a failing seed replays with the same keys)."""
    return LocalIdentity.from_seed(seed.to_bytes(4, "big") * 8)


@asynccontextmanager
async def memory_pair(
    conditions: NetworkConditions | None = None, *, seed: int = 0
) -> AsyncIterator[tuple[MemoryNetwork, Node, Node]]:
    """Two nodes on one in-memory network (not linked yet)."""
    async with (
        open_memory_network(conditions, seed=seed) as net,
        open_node(identity=identity(2 * seed + 1), network=net) as a,
        open_node(identity=identity(2 * seed + 2), network=net) as b,
    ):
        yield net, a, b


def random_bytes(n: int) -> bytes:
    """Incompressible test data."""
    return os.urandom(n)
