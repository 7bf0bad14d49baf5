"""Cloaking (telehash v3 e3x/cloaking.md): vector C1 and the round rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcloud._wire import (
    CLOAK_KEY,
    MAX_CLOAK_ROUNDS,
    cloak,
    decloak,
    decode_packet,
    encode_packet,
)
from p2pcloud.errors import LocalProtocolError, MalformedPacket
from tests.wire._support import CountingEntropy, ScriptedEntropy

C1 = bytes.fromhex(
    "b8921a332948eedec882b3102aa9d6de8688d73a195b0cab64bbf61f5c6805df85e901c1fb774046f46a43"
    "ba5440a5cad24eb486"
)
C1_PLAIN = bytes.fromhex("00127b2274657374223a22636c6f616b6564227d")


def test_cloak_key() -> None:
    assert CLOAK_KEY.hex() == "d7f0e555546241b2a944ecd6d0de66856ac50b0baba76a6f5a4782956ca9459a"


def test_vector_c1_four_rounds() -> None:
    plain, rounds = decloak(C1)
    assert rounds == 4
    assert plain == C1_PLAIN
    packet = decode_packet(plain)
    assert packet.json == {"test": "cloaked"} and packet.body == b""


def test_vector_c1_reproduced_by_cloak() -> None:
    # Re-create C1 from its plain text with the nonces it used (read back off the rounds).
    nonces = []
    data = C1
    for _ in range(4):
        nonces.append(data[:8])
        data = decloak_one(data)
    entropy = ScriptedEntropy(*reversed(nonces))
    assert cloak(C1_PLAIN, entropy, rounds=4) == C1


def decloak_one(data: bytes) -> bytes:
    from p2pcloud._wire import _chacha20

    return _chacha20(data[:8], data[8:])


def test_plain_passes_through() -> None:
    assert decloak(C1_PLAIN) == (C1_PLAIN, 0)


def test_nonce_byte0_never_zero() -> None:
    out = cloak(C1_PLAIN, ScriptedEntropy(bytes(8)))
    assert out[0] != 0
    assert decloak(out) == (C1_PLAIN, 1)


def test_rounds_bound() -> None:
    deep = cloak(C1_PLAIN, CountingEntropy("deep"), rounds=MAX_CLOAK_ROUNDS)
    assert decloak(deep) == (C1_PLAIN, MAX_CLOAK_ROUNDS)
    deeper = cloak(deep, CountingEntropy("one more"))
    with pytest.raises(MalformedPacket):
        decloak(deeper)
    with pytest.raises(LocalProtocolError):
        cloak(C1_PLAIN, CountingEntropy("x"), rounds=MAX_CLOAK_ROUNDS + 1)


@pytest.mark.parametrize("data", [b"", b"\x01", b"\x01" * 9])
def test_too_short(data: bytes) -> None:
    with pytest.raises(MalformedPacket):
        decloak(data)


@given(st.binary(max_size=1600), st.integers(1, MAX_CLOAK_ROUNDS))
def test_round_trip(body: bytes, rounds: int) -> None:
    packet = encode_packet(None, body)
    assert decloak(cloak(packet, CountingEntropy(body.hex()), rounds=rounds)) == (packet, rounds)


@given(st.binary(max_size=2000))
def test_decloak_raises_only_malformed(data: bytes) -> None:
    try:
        plain, rounds = decloak(data)
    except MalformedPacket:
        return
    assert plain[0] == 0 and 0 <= rounds <= MAX_CLOAK_ROUNDS
