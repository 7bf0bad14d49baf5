"""Receive-side flow control through the node (ours): a reader that stops reading bounds
what both nodes hold, and the data arrives intact once it reads again.

Two nodes on the in-memory network under pytest-trio's ``autojump_clock`` (simulated time):
the sender's ``send_all`` must stall after about one window, the receiving stream's queue must
stay within one window of packets, and the channel must survive several channel timeouts of
silence from the reader (no ``"timeout"``).
"""

from __future__ import annotations

import hashlib

import pytest
import trio
import trio.testing

from p2pcloud._node.memory import NetworkConditions
from p2pcloud._node.stream import LARGE_BODY, ChannelStream
from p2pcloud.proto.channel import CHANNEL_TIMEOUT, DEFAULT_WINDOW
from tests.node.conftest import memory_pair, random_bytes

LOSSY = NetworkConditions(loss=0.1, duplicate=0.1, reorder=0.1, delay=0.01, jitter=0.02)


@pytest.mark.parametrize("conditions", [None, LOSSY], ids=["clean", "lossy"])
async def test_a_reader_that_stops_bounds_both_nodes(
    conditions: NetworkConditions | None, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_pair(conditions, seed=3) as (_, a, b):
        with trio.fail_after(120):
            await a.link(b.link_uri)
        body = a._max_body(b.hashname)
        payload = random_bytes(400 * body)  # eight windows of full packets
        accepted: list[ChannelStream] = []
        got = trio.Event()

        async def handler(stream: ChannelStream) -> None:
            accepted.append(stream)
            got.set()
            await trio.sleep_forever()  # the test reads it itself

        b.serve_channel("bulk", handler)
        stream = await a.open_channel(b.hashname, "bulk")
        sent = trio.Event()

        async def send() -> None:
            await stream.send_all(payload)
            await stream.send_eof()
            sent.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            await got.wait()
            reader = accepted[0]
            data = bytearray(await reader.receive_some(10 * body))  # read a little, then stop
            peak_queue = peak_sender = 0
            for _ in range(int(6 * CHANNEL_TIMEOUT)):  # silent reader for six channel timeouts
                await trio.sleep(1)
                queued = reader.bytes_received - len(data)  # bytes waiting in b's stream
                in_sender = stream.bytes_sent - reader.bytes_received  # bytes a holds unacked
                peak_queue = max(peak_queue, queued)
                peak_sender = max(peak_sender, in_sender)
            assert not sent.is_set()  # the sender stalled
            assert stream.bytes_sent < len(payload) // 2
            assert peak_queue <= (DEFAULT_WINDOW + 1) * body
            assert peak_sender <= 2 * DEFAULT_WINDOW * body
            assert reader.error is None and stream.error is None  # no timeout, no err
            # read again: everything arrives, intact and in order
            with trio.fail_after(600):
                while chunk := await reader.receive_some():
                    data += chunk
                await sent.wait()
            assert len(data) == len(payload)
            assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()
            await stream.aclose()
            await reader.aclose()
            nursery.cancel_scope.cancel()


async def test_an_empty_packet_before_a_large_body_is_not_read_as_eof(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A reliable open usually has an empty body; when a large-frame body (>= LARGE_BODY)
    # queues behind it before the reader runs, receive_some must return the large body (not
    # b"" from the empty one alone, which would read as EOF). Large bodies need a large-frame
    # TCP path, so they are queued here through the same entry the node's dispatch uses.
    async with memory_pair() as (_, a, b):
        await a.link(b.link_uri)
        accepted: list[ChannelStream] = []
        got = trio.Event()

        async def handler(stream: ChannelStream) -> None:
            accepted.append(stream)
            got.set()
            await trio.sleep_forever()

        b.serve_channel("bulk", handler)
        stream = await a.open_channel(b.hashname, "bulk")
        await got.wait()
        reader = accepted[0]
        big = random_bytes(LARGE_BODY + 1)
        reader._on_data({}, b"")
        reader._on_data({}, big)
        reader._on_data({}, b"tail")
        assert await reader.receive_some() == big
        assert await reader.receive_some() == b"tail"
        await stream.send_all(b"x")
        assert await reader.receive_some() == b"x"
        await stream.aclose()
        await reader.aclose()
