"""CS3a (telehash v3 e3x/cs/3a.md): vectors K1, K2, D1 on the primitives; identity."""

from __future__ import annotations

import hashlib

import nacl.bindings
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcloud import _crypto
from p2pcloud._crypto import (
    CHANNEL_MIN,
    MESSAGE_MIN,
    LocalIdentity,
    auth_secret,
    beforenm,
    channel_decrypt,
    channel_encrypt,
    channel_keys,
    message_decrypt,
    message_encrypt,
    message_verify,
    token_for,
    verify_signature,
)
from p2pcloud._wire import b32decode, decode_packet
from p2pcloud.errors import HandshakeFailed, LocalProtocolError, MalformedPacket
from tests.wire._support import CountingEntropy, ScriptedEntropy, identity, load_d1

D1 = load_d1()
A = LocalIdentity.from_cs3a(D1["A_pk"], D1["A_sk"])
B = LocalIdentity.from_cs3a(D1["B_pk"], D1["B_sk"])

K2_BA = bytes.fromhex(
    "9019f4987aec555a4669b1c4ff6f7188bd94ce8c0a319b91c16328dbe57fab2e440dfc7dce24ad555eaafa566c"
    "73605a510ef5013a0331a2ca834b70d5fb39b3421e957364665ac2bda633ec89ff4b6921417f94b58b40f2b4cb"
)
K2_AB = bytes.fromhex(
    "ef60cc1a562d0cf7efef41fae16533ef238cc0feeb24ae6ca0bef3ec80c86b2a0fed311eac60b72c0286845ae3"
    "4f6b746fb152d48d8f9a712fe411f9e4bef7a4ba806519740886711b47bbc29d6ab473b2de6892bf10465fb41d"
)


def test_k1_keys_belong_together() -> None:
    assert nacl.bindings.crypto_scalarmult_base(D1["A_sk"]) == D1["A_pk"]
    assert nacl.bindings.crypto_scalarmult_base(D1["B_sk"]) == D1["B_pk"]


def test_k2_b_to_a() -> None:
    assert len(K2_BA) == 90
    assert message_verify(K2_BA, auth_secret(B.cs3a_public, A.cs3a_secret))
    _eph, inner = message_decrypt(K2_BA, A.cs3a_secret)
    assert inner == b"\x00\x00"
    assert token_for(K2_BA).hex() == "5701031603d35bbe3c286665c7373e1f"


def test_k2_a_to_b() -> None:
    assert len(K2_AB) == 90
    assert message_verify(K2_AB, auth_secret(A.cs3a_public, B.cs3a_secret))
    _eph, inner = message_decrypt(K2_AB, B.cs3a_secret)
    assert inner == b"\x00\x00"
    assert token_for(K2_AB).hex() == "f211ab4dcd8332f06fbd689b6793e443"


def test_k2_verify_fails_against_wrong_sender() -> None:
    other = identity("other")
    assert not message_verify(K2_BA, auth_secret(other.cs3a_public, A.cs3a_secret))
    with pytest.raises(HandshakeFailed):
        message_decrypt(K2_BA, B.cs3a_secret)  # addressed to A, not B


def test_beforenm_is_hsalsa_of_x25519_not_raw() -> None:
    raw = nacl.bindings.crypto_scalarmult(D1["A_sk"], D1["B_pk"])
    shared = beforenm(D1["B_pk"], D1["A_sk"])
    assert shared != raw and shared == beforenm(D1["A_pk"], D1["B_sk"])


def test_beforenm_low_order_key_fails() -> None:
    with pytest.raises(HandshakeFailed):
        beforenm(bytes(32), D1["A_sk"])


def test_d1_ephemeral_keys() -> None:
    assert D1["eA_sk"] == hashlib.sha256(b"vector ephemeral A").digest()
    assert D1["eB_sk"] == hashlib.sha256(b"vector ephemeral B").digest()
    assert _crypto.cs3a_keypair(ScriptedEntropy(D1["eA_sk"])) == (D1["eA_pk"], D1["eA_sk"])
    assert _crypto.cs3a_keypair(ScriptedEntropy(D1["eB_sk"])) == (D1["eB_pk"], D1["eB_sk"])


def test_d1_outer_ab_from_primitives() -> None:
    body = message_encrypt(
        D1["innerAB"],
        eph_public=D1["eA_pk"],
        box_key=beforenm(D1["B_pk"], D1["eA_sk"]),
        auth_key=auth_secret(D1["B_pk"], D1["A_sk"]),
        nonce=bytes(range(24)),
    )
    assert b"\x00\x01\x3a" + body == D1["outerAB"]


def test_d1_outer_ba_opens_and_verifies() -> None:
    body = decode_packet(D1["outerBA"]).body
    assert message_verify(body, auth_secret(B.cs3a_public, A.cs3a_secret))
    eph, inner = message_decrypt(body, A.cs3a_secret)
    assert eph == D1["eB_pk"]
    assert decode_packet(inner).json == {"type": "link", "at": 1, "csid": "3a"}


def test_d1_tokens_and_channel_keys() -> None:
    assert token_for(D1["eA_pk"]) == D1["tokenA"]
    assert token_for(D1["eB_pk"]) == D1["tokenB"]
    # the token is also SHA256 of the first 16 bytes of the handshake BODY
    assert token_for(decode_packet(D1["outerAB"]).body) == D1["tokenA"]
    enc, dec = channel_keys(D1["eA_pk"], D1["eA_sk"], D1["eB_pk"])
    assert enc == D1["encKeyA"] and dec == D1["decKeyA"]
    b_enc, b_dec = channel_keys(D1["eB_pk"], D1["eB_sk"], D1["eA_pk"])
    assert (b_enc, b_dec) == (dec, enc)


def test_d1_channel_packet() -> None:
    packet = channel_encrypt(
        D1["chan_inner"], enc_key=D1["encKeyA"], token=D1["tokenB"], nonce=bytes(range(48, 72))
    )
    assert packet == D1["chanAB"]
    assert channel_decrypt(decode_packet(packet).body, D1["encKeyA"]) == D1["chan_inner"]


def test_channel_altered_fails() -> None:
    body = bytearray(decode_packet(D1["chanAB"]).body)
    body[-1] ^= 1
    with pytest.raises(HandshakeFailed):
        channel_decrypt(bytes(body), D1["encKeyA"])
    with pytest.raises(HandshakeFailed):
        channel_decrypt(decode_packet(D1["chanAB"]).body, D1["decKeyA"])  # wrong key
    with pytest.raises(MalformedPacket):
        channel_decrypt(bytes(CHANNEL_MIN - 1), D1["encKeyA"])


def test_message_too_short() -> None:
    with pytest.raises(MalformedPacket):
        message_decrypt(bytes(MESSAGE_MIN - 1), A.cs3a_secret)
    assert not message_verify(bytes(MESSAGE_MIN - 1), bytes(32))


def test_message_altered_auth_fails() -> None:
    body = bytearray(K2_BA)
    body[-1] ^= 0x80
    assert not message_verify(bytes(body), auth_secret(B.cs3a_public, A.cs3a_secret))


# -- identity -----------------------------------------------------------------------------


def test_identity_cs3a_derived_from_ed25519() -> None:
    me = identity("me")
    assert me.verify_key is not None and me.signing_key is not None
    assert nacl.bindings.crypto_scalarmult_base(me.cs3a_secret) == me.cs3a_public
    assert nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(me.verify_key) == me.cs3a_public
    assert me.keys() == {"3a": _crypto.b32encode(me.cs3a_public)}
    assert b32decode(me.keys()["3a"]) == me.cs3a_public
    assert LocalIdentity.from_seed(me.seed or b"").hashname == me.hashname


def test_identity_generate_draws_32_bytes() -> None:
    entropy = ScriptedEntropy(bytes(range(32)))
    LocalIdentity.generate(entropy)
    assert entropy.left == 0


def test_signatures() -> None:
    me, other = identity("me"), identity("other")
    assert me.verify_key is not None and other.verify_key is not None
    sig = me.sign(b"grant")
    assert verify_signature(me.cs3a_public, me.verify_key, b"grant", sig)
    assert not verify_signature(me.cs3a_public, me.verify_key, b"grant!", sig)
    # a verify key that does not convert to the CS3a key is refused, even with a good sig
    osig = other.sign(b"grant")
    assert not verify_signature(me.cs3a_public, other.verify_key, b"grant", osig)
    assert not verify_signature(me.cs3a_public, me.verify_key[:31], b"grant", sig)
    assert not verify_signature(me.cs3a_public, me.verify_key, b"grant", sig[:63])
    assert not verify_signature(me.cs3a_public, bytes(32), b"grant", sig)


def test_cs3a_only_identity_cannot_sign() -> None:
    with pytest.raises(LocalProtocolError):
        A.sign(b"x")
    assert A.seed is None and A.verify_key is None


def test_mismatched_keys_rejected() -> None:
    with pytest.raises(LocalProtocolError):
        LocalIdentity.from_cs3a(D1["A_pk"], D1["B_sk"])
    with pytest.raises(LocalProtocolError):
        LocalIdentity.from_cs3a(D1["A_pk"][:31], D1["A_sk"])


def test_repr_hides_secrets() -> None:
    assert D1["A_sk"].hex() not in repr(A) and "458f" not in repr(A)


@given(st.binary(max_size=1500), st.binary(min_size=24, max_size=24))
def test_message_round_trip(inner: bytes, nonce: bytes) -> None:
    e_pk, e_sk = _crypto.cs3a_keypair(CountingEntropy(nonce.hex()))
    body = message_encrypt(
        inner,
        eph_public=e_pk,
        box_key=beforenm(B.cs3a_public, e_sk),
        auth_key=auth_secret(B.cs3a_public, A.cs3a_secret),
        nonce=nonce,
    )
    assert len(body) == len(inner) + MESSAGE_MIN
    assert message_verify(body, auth_secret(A.cs3a_public, B.cs3a_secret))
    assert message_decrypt(body, B.cs3a_secret) == (e_pk, inner)
