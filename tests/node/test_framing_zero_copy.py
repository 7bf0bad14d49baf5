"""The zero-copy receive path of stream framing: reads into the buffer, frames as views."""

from __future__ import annotations

import os

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from p2pcloud._framing import (
    BUFFER_FRAMES,
    CHUNKED_BUFFER,
    FRAME_HEADER,
    Framing,
    StreamFraming,
    encode_chunked,
    encode_hello,
)
from p2pcloud._node.transport import TcpTransport
from p2pcloud.errors import LocalProtocolError, MalformedPacket
from p2pcloud.proto.path import Path


def read_all(framing: StreamFraming, data: bytes, step: int) -> list[bytes | memoryview]:
    """Feed ``data`` as a socket would (``recv_into`` of at most ``step`` bytes a read).

    Each packet is copied before the next read, as the transport's consumer must; a view kept
    across a read would show whatever the buffer holds later.
    """
    out: list[bytes | memoryview] = []
    pos = 0
    while pos < len(data):
        room = framing.receive_buffer(step)
        size = min(len(room), step, len(data) - pos)
        room[:size] = data[pos : pos + size]
        framing.data_received(size)
        pos += size
        while (packet := framing.next_packet_view()) is not None:
            out.append(packet if isinstance(packet, bytes) else bytes(packet))
    return out


def framed_pair(max_frame: int) -> tuple[StreamFraming, StreamFraming]:
    """A client and a server framing that have negotiated large frames."""
    client = StreamFraming(initiator=True, max_frame=max_frame)
    server = StreamFraming(initiator=False, max_frame=max_frame)
    assert read_all(server, client.data_to_send(), 4096) == []
    assert read_all(client, server.data_to_send(), 4096) == []
    assert client.state is Framing.FRAMES and server.state is Framing.FRAMES
    return client, server


def test_frames_come_as_views_and_the_buffer_never_grows() -> None:
    client, server = framed_pair(8_000)
    packets = [os.urandom(n) for n in (8_000, 1, 7_999, 4_000, 8_000, 3) * 30]
    for packet in packets:
        client.send_packet(packet)
    wire = client.data_to_send()
    capacity = max(BUFFER_FRAMES * (8_000 + FRAME_HEADER), CHUNKED_BUFFER)
    got: list[bytes] = []
    kinds: set[type] = set()
    pos = 0
    while pos < len(wire):
        room = server.receive_buffer(5_000)
        assert len(room) >= 8_000 + FRAME_HEADER  # always room for one whole frame
        size = min(len(room), len(wire) - pos)
        room[:size] = wire[pos : pos + size]
        server.data_to_send()
        server.data_received(size)
        pos += size
        while (packet := server.next_packet_view()) is not None:
            kinds.add(type(packet))
            got.append(bytes(packet))
        assert server.buffered <= 8_000 + FRAME_HEADER  # only a partial frame stays behind
        assert server.receive_capacity == capacity  # bounded, never grown
    assert got == packets
    assert kinds == {memoryview}


def test_next_packet_still_returns_bytes_of_its_own() -> None:
    client, server = framed_pair(4_000)
    client.send_packet(b"a" * 3_000)
    client.send_packet(b"b" * 3_000)
    server.receive_data(client.data_to_send())
    first = server.next_packet()
    assert type(first) is bytes and first == b"a" * 3_000
    second = server.next_packet_view()
    assert isinstance(second, memoryview) and second == b"b" * 3_000


def test_frames_in_the_same_read_as_the_hello_answer_are_kept() -> None:
    # The listener's chunked answer and its first (large) frames arrive in one read: the
    # small chunked buffer hands them over to the frames buffer intact.
    client = StreamFraming(initiator=True, max_frame=100_000)
    server = StreamFraming(initiator=False, max_frame=100_000)
    read_all(server, client.data_to_send(), 1 << 20)
    big = [os.urandom(100_000), os.urandom(99_999)]
    for packet in big:
        server.send_packet(packet)
    wire = server.data_to_send()
    assert len(wire) > CHUNKED_BUFFER
    assert read_all(client, wire, len(wire)) == big
    assert client.state is Framing.FRAMES


def test_data_received_refuses_more_than_the_room() -> None:
    framing = StreamFraming(initiator=False)
    room = framing.receive_buffer()
    with pytest.raises(LocalProtocolError):
        framing.data_received(len(room) + 1)
    with pytest.raises(LocalProtocolError):
        framing.data_received(-1)


@given(st.lists(st.binary(min_size=1, max_size=5000), max_size=10), st.integers(1, 12000))
def test_framed_round_trip_through_the_read_buffer(packets: list[bytes], step: int) -> None:
    client, server = framed_pair(5000)
    for packet in packets:
        client.send_packet(packet)
    assert read_all(server, client.data_to_send(), step) == packets


@given(st.lists(st.binary(min_size=1, max_size=3000), max_size=8), st.integers(1, 700))
def test_chunked_round_trip_through_the_read_buffer(packets: list[bytes], step: int) -> None:
    wire = b"".join(encode_chunked(p) for p in packets)
    assert read_all(StreamFraming(initiator=False), wire, step) == packets


@given(st.binary(max_size=6000), st.integers(1, 3000))
def test_frame_read_buffer_fuzz_raises_only_malformed(data: bytes, step: int) -> None:
    client = StreamFraming(initiator=True, max_frame=2000)
    client.data_to_send()
    assert read_all(client, encode_chunked(encode_hello(2000)), 64) == []
    try:
        packets = read_all(client, data, step)
    except MalformedPacket:
        return
    assert all(0 < len(p) <= 2000 for p in packets)
    assert client.buffered <= 2000 + FRAME_HEADER


@given(st.binary(max_size=6000), st.integers(1, 3000))
def test_chunk_read_buffer_fuzz_raises_only_malformed(data: bytes, step: int) -> None:
    framing = StreamFraming(initiator=False)
    try:
        packets = read_all(framing, data, step)
    except MalformedPacket:
        return
    assert sum(map(len, packets)) <= len(data)


async def test_tcp_delivers_frames_as_views_intact_over_loopback() -> None:
    # Real sockets: every large frame reaches ``deliver`` as a view of the reader's buffer
    # and is intact when copied there, across many buffer reuses.
    max_frame = 65_536
    received: list[bytes] = []
    kinds: set[type] = set()
    arrived = trio.Event()
    first = trio.Event()
    packets = [b"\x00" + os.urandom(size - 1) for size in (max_frame, 5, 40_000) * 40]

    def deliver(data: bytes, path: Path) -> None:
        kinds.add(type(data))
        received.append(bytes(data))
        first.set()
        if len(received) == len(packets) + 1:
            arrived.set()

    server = await TcpTransport.bind("127.0.0.1", 0, max_frame=max_frame)
    client = await TcpTransport.bind("127.0.0.1", 0, max_frame=max_frame)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run, deliver, lambda: None)
        await nursery.start(client.run, lambda data, path: None, lambda: None)
        with trio.fail_after(20):
            client.send_nowait(b"\x00\x00first", server.path)  # held until the answer
            await first.wait()  # released (framed) only once the client switched
            assert client.frame_limit(server.path) == max_frame
            for packet in packets:
                client.send_nowait(packet, server.path)
            await arrived.wait()
        client.close()
        server.close()
    assert received == [b"\x00\x00first", *packets]
    assert memoryview in kinds
