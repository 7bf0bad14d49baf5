"""Stream framing: v3 chunking, large frames, and the negotiation between them (pure)."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcloud._framing import (
    CHUNK_MAX,
    MAX_CHUNKED_PACKET,
    MAX_FRAME,
    ChunkDecoder,
    FrameDecoder,
    Framing,
    StreamFraming,
    encode_chunked,
    encode_frame,
    encode_hello,
    parse_hello,
)
from p2pcloud.errors import LocalProtocolError, MalformedPacket


def decode_all(framing: StreamFraming, data: bytes, step: int = 7) -> list[bytes]:
    out = []
    for i in range(0, len(data), step):
        framing.receive_data(data[i : i + step])
        while (packet := framing.next_packet()) is not None:
            out.append(packet)
    return out


def test_chunking_matches_the_v3_layout() -> None:
    packet = bytes(range(256)) * 2  # 512 bytes: two full chunks and one of 2
    wire = encode_chunked(packet)
    assert wire[0] == CHUNK_MAX and wire[256] == CHUNK_MAX and wire[512] == 2
    assert wire[-1] == 0 and len(wire) == 512 + 3 + 1
    assert encode_chunked(b"ab") == b"\x02ab\x00"


def test_chunk_decoder_reassembles_and_counts_keepalives() -> None:
    dec = ChunkDecoder()
    wire = b"\x00\x00" + encode_chunked(b"x" * 600) + b"\x00" + encode_chunked(b"yz")
    packets = []
    pos = 0
    while True:
        packet, pos = dec.decode(wire, pos)
        if packet is None:
            break
        packets.append(packet)
    assert packets == [b"x" * 600, b"yz"]
    assert dec.keepalives == 3
    assert pos == len(wire)


def test_chunk_decoder_bounds_the_packet() -> None:
    dec = ChunkDecoder(max_packet=300)
    wire = encode_chunked(b"a" * 400)
    with pytest.raises(MalformedPacket):
        dec.decode(wire, 0)


def test_frame_decoder_rejects_oversized_frames() -> None:
    dec = FrameDecoder(2000)
    assert dec.decode(encode_frame(b"q" * 2000), 0) == (b"q" * 2000, 2004)
    with pytest.raises(MalformedPacket):
        dec.decode(struct.pack(">I", 2001), 0)
    assert dec.decode(b"\x00\x00\x00\x00", 0) == (None, 4)
    assert dec.keepalives == 1


def test_encoders_refuse_empty_and_oversized_packets() -> None:
    with pytest.raises(LocalProtocolError):
        encode_chunked(b"")
    with pytest.raises(LocalProtocolError):
        encode_chunked(b"a" * (MAX_CHUNKED_PACKET + 1))
    with pytest.raises(LocalProtocolError):
        encode_frame(b"a" * 11, 10)


def test_hello_is_a_plain_lob_that_v3_peers_see_as_plaintext() -> None:
    hello = encode_hello(65536)
    assert hello[0] == 0  # byte0 0: not taken for a cloaked packet (v3 errata)
    (head_len,) = struct.unpack(">H", hello[:2])
    head = json.loads(hello[2 : 2 + head_len])
    assert head == {"type": "p2pcloud-frames", "v": 1, "max": 65536}
    assert len(hello) == 2 + head_len  # no body
    assert parse_hello(hello) == 65536


@pytest.mark.parametrize(
    "head",
    [
        {"type": "p2pcloud-frames", "v": 2, "max": 65536},
        {"type": "p2pcloud-frames", "v": 1, "max": 100},
        {"type": "p2pcloud-frames", "v": 1, "max": MAX_FRAME + 1},
        {"type": "p2pcloud-frames", "v": 1, "max": True},
        {"type": "link", "v": 1, "max": 65536},
        ["p2pcloud-frames"],
    ],
)
def test_parse_hello_refuses_anything_else(head: object) -> None:
    text = json.dumps(head).encode()
    assert parse_hello(struct.pack(">H", len(text)) + text) is None


def test_negotiation_switches_both_sides_to_frames() -> None:
    client = StreamFraming(initiator=True, max_frame=65536)
    server = StreamFraming(initiator=False, max_frame=32768)
    assert client.state is Framing.NEGOTIATING
    client.send_packet(b"handshake-1")  # held until the answer
    server.receive_data(client.data_to_send())
    assert server.next_packet() is None
    assert server.state is Framing.FRAMES and server.max_frame == 32768
    server.send_packet(b"s" * 20000)  # framed, after the chunked answer
    answer = server.data_to_send()
    packets = decode_all(client, answer, step=1000)
    assert packets == [b"s" * 20000]
    assert client.state is Framing.FRAMES and client.max_frame == 32768
    # The held packet goes out framed.
    assert decode_all(server, client.data_to_send()) == [b"handshake-1"]


def test_a_plain_v3_listener_leaves_the_initiator_chunked() -> None:
    # A v3 peer never answers; the transport gives up and the held packets leave chunked.
    client = StreamFraming(initiator=True)
    client.send_packet(b"\x00\x01\x3a" + b"h" * 100)
    hello = client.data_to_send()
    v3_view = decode_all(StreamFraming(initiator=False, offer_frames=False), hello)
    assert v3_view == []  # our hello is consumed, never passed up as data
    client.give_up()
    assert client.state is Framing.CHUNKED
    wire = client.data_to_send()
    assert wire == encode_chunked(b"\x00\x01\x3a" + b"h" * 100)


def test_a_v3_initiator_keeps_a_p2pcloud_listener_chunked() -> None:
    server = StreamFraming(initiator=False)
    handshake = b"\x5a" + b"c" * 300  # cloaked: byte0 != 0
    assert decode_all(server, encode_chunked(handshake)) == [handshake]
    # A hello that is not the first packet is ignored: the connection stays v3.
    assert decode_all(server, encode_chunked(encode_hello(65536))) == []
    assert server.state is Framing.CHUNKED
    assert server.data_to_send() == b""


def test_initiator_without_offer_sends_no_hello() -> None:
    client = StreamFraming(initiator=True, offer_frames=False)
    assert client.state is Framing.CHUNKED
    assert client.data_to_send() == b""


@given(st.binary(max_size=3000), st.integers(min_value=1, max_value=600))
def test_chunk_stream_decoder_fuzz_raises_only_malformed(data: bytes, step: int) -> None:
    framing = StreamFraming(initiator=False)
    try:
        packets = decode_all(framing, data, step)
    except MalformedPacket:
        return
    assert sum(map(len, packets)) <= len(data)


@given(st.binary(max_size=3000), st.integers(min_value=1, max_value=600))
def test_frame_stream_decoder_fuzz_raises_only_malformed(data: bytes, step: int) -> None:
    client = StreamFraming(initiator=True, max_frame=2000)
    client.data_to_send()
    client.receive_data(encode_chunked(encode_hello(2000)))
    assert client.next_packet() is None and client.state is Framing.FRAMES
    try:
        packets = decode_all(client, data, step)
    except MalformedPacket:
        return
    assert all(0 < len(p) <= 2000 for p in packets)


@given(st.lists(st.binary(min_size=1, max_size=3000), max_size=8), st.integers(1, 700))
def test_chunked_round_trip(packets: list[bytes], step: int) -> None:
    wire = b"".join(encode_chunked(p) for p in packets)
    assert decode_all(StreamFraming(initiator=False), wire, step) == packets


@given(st.lists(st.binary(min_size=1, max_size=5000), max_size=8), st.integers(1, 7000))
def test_framed_round_trip(packets: list[bytes], step: int) -> None:
    client = StreamFraming(initiator=True, max_frame=5000)
    server = StreamFraming(initiator=False, max_frame=5000)
    for p in packets:
        client.send_packet(p)
    server.receive_data(client.data_to_send())
    assert server.next_packet() is None
    decode_all(client, server.data_to_send())
    assert decode_all(server, client.data_to_send(), step) == packets


def test_hello_parser_never_raises_on_junk() -> None:
    for junk in (b"", b"\x00", b"\x00\x07{\"type\"", b"\x00\x08\xff\xfe{}{}{}{}", b"\x01\x00"):
        assert parse_hello(junk) is None
