"""Every decoder, fed random and mutated valid input, raises only its typed error.

Covers decode_packet, decloak, b32decode, open_handshake, Exchange.decrypt_channel and the
whole receive pipeline (decloak -> LOB -> handshake or channel), and checks allocations stay
within the named limits. Key files and URIs are fuzzed in test_keyfile.py / test_uri.py.
Inputs that once crashed (or would crash a naive decoder) live in corpus/ and are replayed.
"""

from __future__ import annotations

import contextlib
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcloud._wire import (
    MAX_HEAD,
    MAX_PACKET,
    b32decode,
    cloak,
    decloak,
    decode_packet,
    encode_packet,
)
from p2pcloud.errors import HandshakeFailed, MalformedPacket
from p2pcloud.proto.exchange import Exchange, open_handshake
from tests.wire._support import CORPUS, CountingEntropy, identity

ALICE, BOB = identity("fuzz alice"), identity("fuzz bob")


def _linked() -> tuple[Exchange, Exchange]:
    xa = Exchange(ALICE, BOB.cs3a_public, CountingEntropy("fuzz xa"))
    xb = Exchange(BOB, ALICE.cs3a_public, CountingEntropy("fuzz xb"))
    first = xa.handshake(xa.new_at(1000))
    verdict = xb.receive_handshake(open_handshake(BOB, decode_packet(first).body))
    assert verdict.reply_at is not None
    xa.receive_handshake(open_handshake(ALICE, decode_packet(xb.handshake(verdict.reply_at)).body))
    return xa, xb


XA, XB = _linked()
HANDSHAKE = XA.handshake()
CHANNEL = XA.encrypt_channel(encode_packet({"c": 1, "type": "sync", "seq": 1}, b"payload"))
SAMPLES = [
    HANDSHAKE,
    CHANNEL,
    encode_packet({"type": "hn", "hn": {"3a": "x" * 52}}, b""),
    cloak(HANDSHAKE, CountingEntropy("c1")),
    cloak(CHANNEL, CountingEntropy("c2"), rounds=3),
]


def receive(data: bytes) -> object:
    """What the mesh does with a datagram, minus the bookkeeping; raises only typed errors."""
    plain, _rounds = decloak(data)
    packet = decode_packet(plain)
    if packet.head == b"\x3a":
        hs = open_handshake(BOB, packet.body)
        return XB.receive_handshake(hs) if hs.key == ALICE.cs3a_public else hs
    if not packet.head:
        inner = XB.decrypt_channel(packet.body)
        return decode_packet(inner)
    return packet


TYPED = (MalformedPacket, HandshakeFailed)


@given(st.binary(max_size=2000))
def test_random_bytes_through_the_pipeline(data: bytes) -> None:
    with contextlib.suppress(TYPED):
        receive(data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    kind = draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif kind == "extend":
        data += draw(st.binary(min_size=1, max_size=64))
    else:
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@given(mutated())
def test_mutated_packets_through_the_pipeline(data: bytes) -> None:
    with contextlib.suppress(TYPED):
        receive(data)


@given(mutated())
def test_mutated_handshake_bodies(data: bytes) -> None:
    for body in (data, data[3:]):
        with contextlib.suppress(TYPED):
            open_handshake(BOB, body)
        with contextlib.suppress(TYPED):
            open_handshake(BOB, body, expected_key=ALICE.cs3a_public)


@given(mutated())
def test_mutated_channel_bodies(data: bytes) -> None:
    with contextlib.suppress(TYPED):
        XB.decrypt_channel(data[2:])


@given(st.binary(max_size=400))
def test_decode_packet_random(data: bytes) -> None:
    try:
        packet = decode_packet(data)
    except MalformedPacket:
        return
    assert encode_packet(packet.head, packet.body) == data


@given(st.binary(max_size=400))
def test_decode_json_heads(junk: bytes) -> None:
    head = b"{" + junk + b"}"
    with contextlib.suppress(MalformedPacket):
        decode_packet(len(head).to_bytes(2, "big") + head)


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz234567=ABC01 ", max_size=120))
def test_b32decode_near_alphabet(text: str) -> None:
    with contextlib.suppress(MalformedPacket):
        b32decode(text)


# -- allocations stay within the limits --------------------------------------------------


def _peak(fn: Callable[..., object], *args: object) -> int:
    tracemalloc.start()
    try:
        with contextlib.suppress(TYPED):
            fn(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_oversized_input_is_refused_before_copying() -> None:
    big = b"\x00\x00" + bytes(4 * MAX_PACKET)
    assert _peak(decode_packet, big) < 64 * 1024
    assert _peak(decloak, b"\x01" + bytes(4 * MAX_PACKET)) < 64 * 1024
    assert _peak(open_handshake, BOB, bytes(4 * MAX_PACKET)) < 64 * 1024
    assert _peak(b32decode, "a" * (4 * MAX_PACKET)) < 64 * 1024


def test_largest_accepted_inputs_allocate_in_proportion() -> None:
    # A max-size frame of garbage costs at most MAX_CLOAK_ROUNDS passes, each freed.
    frame = b"\x01" + bytes(MAX_PACKET - 1)
    assert _peak(decloak, frame) < 4 * MAX_PACKET
    # A max-size JSON head of nested arrays is refused without a deep recursion blow-up.
    head = b"[" * (MAX_HEAD // 2) + b"]" * (MAX_HEAD // 2)
    assert _peak(decode_packet, len(head).to_bytes(2, "big") + head) < 64 * MAX_HEAD


# -- the corpus: every input that ever crashed (or would crash a naive) decoder -----------


def _corpus() -> list[Path]:
    return sorted(p for p in CORPUS.iterdir() if p.suffix == ".bin")


def test_corpus_is_not_empty() -> None:
    assert len(_corpus()) >= 5


@pytest.mark.parametrize("path", _corpus(), ids=lambda p: p.name)
def test_corpus_replays_without_crashing(path: Path) -> None:
    data = path.read_bytes()
    with contextlib.suppress(TYPED):
        receive(data)
    with contextlib.suppress(MalformedPacket):
        decode_packet(data)
    with contextlib.suppress(TYPED):
        open_handshake(BOB, data)
