"""The one-buffer channel packet path (_crypto.channel_seal / channel_unseal, used by the mesh)
gives byte for byte what the reference path (encode_packet + channel_encrypt / channel_decrypt
+ decode_packet) gives, and decoders fed views raise only their typed errors."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from p2pcloud import _crypto
from p2pcloud._wire import decode_packet, encode_head, encode_packet
from p2pcloud.errors import HandshakeFailed, MalformedPacket

KEY = bytes(range(32))
TOKEN = bytes(range(100, 116))
NONCE = bytes(range(200, 224))

heads = st.one_of(
    st.just({}),
    st.fixed_dictionaries({"c": st.integers(1, 2**32 - 1)}),
    st.fixed_dictionaries(
        {"c": st.integers(1, 99), "seq": st.integers(1, 10**6), "ack": st.integers(0, 10**6)},
        optional={"miss": st.lists(st.integers(1, 60), min_size=1, max_size=5), "x": st.text()},
    ),
)


@given(heads, st.binary(max_size=3000))
def test_seal_matches_encode_packet_plus_channel_encrypt(head: dict, body: bytes) -> None:
    raw = encode_head(head)
    assert raw == (encode_packet(head)[2:] if raw else b"")
    sealed = _crypto.channel_seal(raw, body, enc_key=KEY, token=TOKEN, nonce=NONCE)
    reference = _crypto.channel_encrypt(
        encode_packet(head, body), enc_key=KEY, token=TOKEN, nonce=NONCE
    )
    assert bytes(sealed) == reference
    inner = _crypto.channel_unseal(memoryview(sealed)[2:], KEY)
    assert bytes(inner) == _crypto.channel_decrypt(reference[2:], KEY)
    from_view = decode_packet(inner)
    from_bytes = decode_packet(bytes(inner))
    assert from_view == from_bytes
    assert type(from_view.body) is bytes and from_view.body == body


@given(st.binary(max_size=200))
def test_unseal_of_garbage_raises_only_typed_errors(data: bytes) -> None:
    try:
        _crypto.channel_unseal(memoryview(data), KEY)
    except (MalformedPacket, HandshakeFailed):
        return
    raise AssertionError("garbage decrypted")  # a forgery would need the key


@given(st.binary(max_size=300))
def test_decode_packet_of_views_raises_only_malformed_packet(data: bytes) -> None:
    for form in (data, bytearray(data), memoryview(data)):
        try:
            packet = decode_packet(form)
        except MalformedPacket:
            continue
        assert type(packet.head) is bytes and type(packet.body) is bytes
        assert packet == decode_packet(bytes(data))


def test_altered_sealed_packet_does_not_open() -> None:
    sealed = _crypto.channel_seal(b"", os.urandom(100), enc_key=KEY, token=TOKEN, nonce=NONCE)
    sealed[-1] ^= 1
    try:
        _crypto.channel_unseal(memoryview(sealed)[2:], KEY)
    except HandshakeFailed:
        return
    raise AssertionError("an altered box opened")
