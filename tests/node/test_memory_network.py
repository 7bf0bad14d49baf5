"""The in-memory network behaves like UDP: loss, duplication, reordering, delay, MTU."""

from __future__ import annotations

import trio
import trio.testing

from p2pcloud._node.memory import NetworkConditions, open_memory_network


async def collect(endpoint, count: int) -> list[bytes]:  # type: ignore[no-untyped-def]
    got = []
    with trio.move_on_after(10):
        while len(got) < count:
            data, _ = await endpoint.receive()
            got.append(data)
    return got


async def test_clean_network_delivers_in_order_after_the_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_network(NetworkConditions(delay=0.25), seed=1) as net:
        a, b = net.endpoint(), net.endpoint()
        start = trio.current_time()
        for i in range(20):
            await a.send(bytes([i]), b.path)
        data, source = await b.receive()
        assert trio.current_time() - start >= 0.25
        assert data == b"\x00" and source == a.path
        rest = await collect(b, 19)
        assert rest == [bytes([i]) for i in range(1, 20)]


async def test_lossy_network_loses_duplicates_and_reorders(
    autojump_clock: trio.testing.MockClock,
) -> None:
    conditions = NetworkConditions(loss=0.2, duplicate=0.2, reorder=0.3, jitter=0.01)
    async with open_memory_network(conditions, seed=7) as net:
        a, b = net.endpoint(), net.endpoint()
        for i in range(500):
            await a.send(i.to_bytes(2, "big"), b.path)
        got = await collect(b, 10_000)  # until quiet
        values = [int.from_bytes(d, "big") for d in got]
        assert len(set(values)) < 500  # some were lost
        assert len(values) > len(set(values))  # some arrived twice
        assert values != sorted(values)  # some overtook others
        assert net.counts["lost"] and net.counts["duplicated"] and net.counts["reordered"]


async def test_mtu_drops_large_datagrams_and_blocked_pairs_drop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_network(NetworkConditions(mtu=100), seed=1) as net:
        a, b, c = net.endpoint(), net.endpoint(), net.endpoint()
        net.block(a.path, c.path)
        await a.send(b"x" * 101, b.path)
        await a.send(b"y" * 100, b.path)
        await a.send(b"z", c.path)
        await c.send(b"w", a.path)
        assert await collect(b, 1) == [b"y" * 100]
        assert await collect(c, 1) == []
        assert net.counts["too_big"] == 1 and net.counts["blocked"] == 2


async def test_same_seed_same_fate(autojump_clock: trio.testing.MockClock) -> None:
    async def run() -> list[bytes]:
        conditions = NetworkConditions(loss=0.3, duplicate=0.3, reorder=0.3)
        async with open_memory_network(conditions, seed=42) as net:
            a, b = net.endpoint(), net.endpoint()
            for i in range(100):
                await a.send(bytes([i]), b.path)
            return await collect(b, 1000)

    assert await run() == await run()
