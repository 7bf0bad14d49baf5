"""Nodes on the in-memory network: handshakes, reliable streams under loss, stream semantics.

Everything runs under pytest-trio's ``autojump_clock``: retransmit and handshake timers cost
simulated seconds, not real ones.
"""

from __future__ import annotations

import hashlib

import pytest
import trio
import trio.testing

from p2pcloud._node.memory import NetworkConditions
from p2pcloud._node.node import Node, open_node
from p2pcloud._node.stream import ChannelStream
from p2pcloud.errors import LinkError
from tests.node.conftest import identity, memory_pair, random_bytes

LOSSY = NetworkConditions(loss=0.2, duplicate=0.2, reorder=0.2, delay=0.01, jitter=0.02)
MIB = 1 << 20


async def read_all(stream: ChannelStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    return bytes(data)


async def test_handshake_links_both_sides(autojump_clock: trio.testing.MockClock) -> None:
    async with memory_pair() as (_, a, b):
        hashname = await a.link(b.link_uri)
        assert hashname == b.hashname
        await b.wait_link_up(a.hashname)  # b accepted a (default policy) and is Up too
        assert a.links == {b.hashname} and b.links == {a.hashname}
        assert a.link_path(b.hashname) == b.paths[0]


async def test_link_to_nobody_times_out(autojump_clock: trio.testing.MockClock) -> None:
    async with memory_pair() as (net, a, b):
        uri = b.link_uri
        await b.aclose()  # its address is gone: handshakes go nowhere
        with pytest.raises(LinkError):
            await a.link(uri)
        assert net.counts["no_endpoint"] >= 5  # the handshake and its resends, then give up


async def send_and_check(a: Node, b: Node, payload: bytes) -> None:
    received: list[bytes] = []
    done = trio.Event()

    async def handler(stream: ChannelStream) -> None:
        received.append(await read_all(stream))
        done.set()

    b.serve_channel("bulk", handler)
    stream = await a.open_channel(b.hashname, "bulk")
    await stream.send_all(payload)
    await stream.send_eof()
    with trio.fail_after(600):  # simulated seconds
        await done.wait()
    assert len(received[0]) == len(payload)
    assert hashlib.sha256(received[0]).digest() == hashlib.sha256(payload).digest()
    await stream.aclose()


@pytest.mark.parametrize("seed", range(50))
async def test_one_mib_survives_a_lossy_network(
    seed: int, autojump_clock: trio.testing.MockClock
) -> None:
    # 20% loss, 20% duplication, 20% reordering and delay on every datagram, handshake
    # included: the data arrives intact and in order.
    async with memory_pair(LOSSY, seed=seed) as (net, a, b):
        with trio.fail_after(120):
            await a.link(b.link_uri)
        await send_and_check(a, b, random_bytes(MIB))
        assert net.counts["lost"] and net.counts["duplicated"] and net.counts["reordered"]


async def test_data_flows_both_ways_under_loss(autojump_clock: trio.testing.MockClock) -> None:
    async with memory_pair(LOSSY, seed=99) as (_, a, b):
        with trio.fail_after(120):
            await a.link(b.link_uri)
        async with b.accept_channels("echo") as incoming:
            stream = await a.open_channel(b.hashname, "echo")
            served = await incoming.receive()
            data = random_bytes(200_000)

            async def echo() -> None:
                while chunk := await served.receive_some():
                    await served.send_all(chunk)
                await served.send_eof()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(echo)
                await stream.send_all(data)
                await stream.send_eof()
                assert await read_all(stream) == data
            await served.aclose()
        await stream.aclose()


async def test_unknown_channel_type_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    async with memory_pair() as (_, a, b):
        await a.link(b.link_uri)
        stream = await a.open_channel(b.hashname, "nobody-serves-this")
        with pytest.raises(trio.BrokenResourceError):
            await stream.receive_some()
        assert stream.error == "unknown type"


async def test_unreliable_channel_carries_packets(autojump_clock: trio.testing.MockClock) -> None:
    async with memory_pair() as (_, a, b):
        await a.link(b.link_uri)
        async with b.accept_channels("ping") as incoming:
            channel = await a.open_channel(b.hashname, "ping", reliable=False, json={"n": 0})
            served = await incoming.receive()
            await channel.send(b"one", json={"n": 1})
            packets = [await served.receive(), await served.receive()]
            assert packets[0].json.get("n") == 0
            assert packets[1].body == b"one" and packets[1].json.get("n") == 1
            await served.send(b"back")
            assert (await channel.receive()).body == b"back"
            await channel.aclose()


async def stream_pair_maker(a: Node, b: Node, incoming: trio.MemoryReceiveChannel[ChannelStream]):  # type: ignore[no-untyped-def]
    async def maker() -> tuple[ChannelStream, ChannelStream]:
        local = await a.open_channel(b.hashname, "duplex")
        remote = await incoming.receive()
        return local, remote

    return maker


@pytest.mark.parametrize("conditions", [NetworkConditions(), LOSSY], ids=["clean", "lossy"])
async def test_channel_stream_passes_trio_stream_checks(
    conditions: NetworkConditions, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_pair(conditions, seed=5) as (_, a, b):
        with trio.fail_after(120):
            await a.link(b.link_uri)
        async with b.accept_channels("duplex") as incoming:
            maker = await stream_pair_maker(a, b, incoming)
            await trio.testing.check_half_closeable_stream(maker, None)


async def test_router_relays_when_no_direct_path_exists(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # a and b can each reach the router but never each other (separate NATs): the router
    # introduces them and then relays every packet, which stays encrypted end to end.
    async with (
        memory_pair(LOSSY, seed=11) as (net, a, b),
        open_node(identity=identity(1000), network=net) as router,
    ):
        net.block(a.paths[0], b.paths[0])
        with trio.fail_after(120):
            await a.link(router.link_uri)
            await b.link(router.link_uri)
            await a.link(b.hashname, via=router.hashname)
            await b.wait_link_up(a.hashname)
        path = a.link_path(b.hashname)
        assert path is not None and path.type == "peer" and path.hn == router.hashname
        await send_and_check(a, b, random_bytes(100_000))
        assert router.statistics().mesh.relayed > 100_000 // 1400
        assert net.counts["blocked"] > 0  # direct attempts were made and failed
        path = a.link_path(b.hashname)
        assert path is not None and path.type == "peer"
