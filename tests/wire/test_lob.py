"""LOB packets (telehash v3 lob.md) with the lob-enc 0.0.17 quirks."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcloud._wire import (
    MAX_HEAD,
    MAX_PACKET,
    Packet,
    decode_packet,
    encode_packet,
)
from p2pcloud.errors import LocalProtocolError, MalformedPacket

L1 = bytes.fromhex(
    "001d7b2274797065223a2274657374222c22666f6f223a5b22626172225d7d616e792062696e61727921"
)


def test_vector_l1_decode() -> None:
    packet = decode_packet(L1)
    assert packet.json == {"type": "test", "foo": ["bar"]}
    assert packet.body == b"any binary!"
    assert packet.head == b'{"type":"test","foo":["bar"]}'
    assert len(L1) == 42


def test_vector_l1_encode() -> None:
    assert encode_packet({"type": "test", "foo": ["bar"]}, b"any binary!") == L1


def test_empty_head_channel_packet() -> None:
    assert decode_packet(b"\x00\x00xyz") == Packet(b"", None, b"xyz")
    assert encode_packet(None, b"xyz") == b"\x00\x00xyz"


def test_binary_heads_one_to_six_bytes() -> None:
    assert decode_packet(b"\x00\x01\x3abody") == Packet(b"\x3a", None, b"body")
    six = b'{"a":1'  # six bytes that look like JSON are still a binary head
    assert decode_packet(b"\x00\x06" + six) == Packet(six, None, b"")


def test_js_quirk_short_json_dropped() -> None:
    # lob-enc drops JSON heads shorter than 7 bytes: {} becomes LENGTH 0.
    assert encode_packet({}, b"x") == b"\x00\x00x"
    assert encode_packet({"": 1}, b"") == b"\x00\x00"  # '{"":1}' is 6 bytes
    assert encode_packet({"a": 1}, b"") == b'\x00\x07{"a":1}'


def test_json_is_compact_utf8_like_json_stringify() -> None:
    raw = encode_packet({"type": "link", "at": 1, "csid": "3a", "name": "été"})
    assert raw[2:] == '{"type":"link","at":1,"csid":"3a","name":"été"}'.encode()


def test_length_past_end_is_malformed() -> None:
    with pytest.raises(MalformedPacket):
        decode_packet(b"\x00\x05abc")


@pytest.mark.parametrize("data", [b"", b"\x00"])
def test_too_short(data: bytes) -> None:
    with pytest.raises(MalformedPacket):
        decode_packet(data)


@pytest.mark.parametrize(
    "head",
    [
        b"[1,2,3,4]",
        b'"string"',
        b"not json at all",
        b'{"a":NaN}',
        b'{"a":1,',
        b"\xff\xfe{}{}{}{}",
        b"[" * 5000 + b"]" * 5000,
        b'{"a":' + b"9" * 5000 + b"}",
    ],
)
def test_bad_json_heads(head: bytes) -> None:
    with pytest.raises(MalformedPacket):
        decode_packet(len(head).to_bytes(2, "big") + head)


def test_signed_length_limit() -> None:
    # lob-enc writes LENGTH with writeInt16BE: heads above 32767 bytes cannot interoperate.
    big = {"k": "x" * MAX_HEAD}
    with pytest.raises(LocalProtocolError):
        encode_packet(big)
    head = b'{"k":"' + b"x" * (MAX_HEAD + 1 - 8) + b'"}'
    assert len(head) == MAX_HEAD + 1
    with pytest.raises(MalformedPacket):
        decode_packet(len(head).to_bytes(2, "big") + head)


def test_max_packet() -> None:
    with pytest.raises(MalformedPacket):
        decode_packet(b"\x00\x00" + bytes(MAX_PACKET))
    with pytest.raises(LocalProtocolError):
        encode_packet(None, bytes(MAX_PACKET))


def test_nested_attached_packet() -> None:
    attached = encode_packet({"1a": "x" * 10}, bytes(32))
    outer = decode_packet(encode_packet({"type": "link", "at": 3}, attached))
    inner = decode_packet(outer.body)
    assert inner.json == {"1a": "x" * 10} and inner.body == bytes(32)


def test_reencode_decoded_packet() -> None:
    packet = decode_packet(L1)
    assert encode_packet(packet.head, packet.body) == L1


def test_unserializable_head() -> None:
    with pytest.raises(LocalProtocolError):
        encode_packet({"x": float("nan")})
    with pytest.raises(LocalProtocolError):
        encode_packet({"x": object()})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.text(max_size=10), json_values, max_size=6), st.binary(max_size=200))
def test_round_trip(head: dict[str, object], body: bytes) -> None:
    raw = encode_packet(head, body)
    packet = decode_packet(raw)
    assert packet.body == body
    if len(json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()) >= 7:
        assert packet.json == head
    else:
        assert packet.head == b"" and packet.json is None


@given(st.binary(min_size=1, max_size=6), st.binary(max_size=100))
def test_round_trip_binary_head(head: bytes, body: bytes) -> None:
    assert decode_packet(encode_packet(head, body)) == Packet(head, None, body)
