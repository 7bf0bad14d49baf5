"""Signed deltas: sealing, opening, and every reason a receiver refuses one (real Ed25519)."""

from __future__ import annotations

import random

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcloud._core import Replica
from p2pcloud._crypto import LocalIdentity
from p2pcloud._ids import Hashname, SubCloudId
from p2pcloud.errors import DeltaRejected, LocalProtocolError, RemoteProtocolError
from p2pcloud.sync import envelope as E
from p2pcloud.sync.envelope import decode_envelope, open_envelope, replica_id_for, seal
from tests.sync.harness import NOW_MS

RNG = random.Random(7)
ALICE = LocalIdentity.from_seed(RNG.randbytes(32))
MALLORY = LocalIdentity.from_seed(RNG.randbytes(32))
SC = SubCloudId(RNG.randbytes(16))


def commit(identity: LocalIdentity, sc: SubCloudId = SC, replica_id: bytes | None = None) -> bytes:
    r = Replica(replica_id or replica_id_for(sc, identity.hashname))
    r.begin(NOW_MS)
    r.set("docs", "d1", "title", "hello")
    r.set("docs", "d1", "n", 3)
    return r.commit()


def only_alice(_sc: SubCloudId, hn: Hashname) -> bool:
    return hn == ALICE.hashname


def reencode(raw: bytes, **changes: object) -> bytes:
    obj = cbor2.loads(raw)
    obj.update(changes)
    return cbor2.dumps(obj)


def reason_of(raw: bytes, can_write=only_alice, is_known=None) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(DeltaRejected) as info:
        open_envelope(raw, can_write, is_known=is_known)
    assert isinstance(info.value, RemoteProtocolError)
    return info.value.reason


def test_replica_id_is_bound_to_subcloud_and_hashname() -> None:
    a = replica_id_for(SC, ALICE.hashname)
    assert len(a) == 16
    assert a != replica_id_for(SC, MALLORY.hashname)
    assert a != replica_id_for(SubCloudId(bytes(16)), ALICE.hashname)


def test_seal_then_open_round_trip() -> None:
    delta = commit(ALICE)
    env = seal(ALICE, SC, delta)
    opened = open_envelope(env.raw, only_alice, is_known=lambda sc: sc == SC)
    assert opened.delta == delta
    assert opened.hashname == ALICE.hashname
    assert (opened.origin, opened.first, opened.last) == (replica_id_for(SC, ALICE.hashname), 1, 2)
    assert set(cbor2.loads(env.raw)) == {"v", "s", "a", "k", "d", "g"}
    # the delta applies to a fresh replica exactly as committed
    r = Replica(b"\x01" * 16)
    r.apply([opened.delta], NOW_MS)
    assert r.get("docs", "d1", "title") == "hello"


def test_seal_refuses_a_delta_of_another_replica() -> None:
    with pytest.raises(LocalProtocolError):
        seal(ALICE, SC, commit(MALLORY))
    with pytest.raises(LocalProtocolError):
        seal(ALICE, SC, b"")
    with pytest.raises(LocalProtocolError):
        seal(LocalIdentity.from_cs3a(ALICE.cs3a_public, ALICE.cs3a_secret), SC, commit(ALICE))


def test_forged_signature() -> None:
    env = seal(ALICE, SC, commit(ALICE))
    sig = bytearray(env.signature)
    sig[5] ^= 1
    assert reason_of(reencode(env.raw, g=bytes(sig))) == E.REJECT_BAD_SIGNATURE
    # the same signature over an altered delta (same header, different value) fails too
    other = Replica(replica_id_for(SC, ALICE.hashname))
    other.begin(NOW_MS)
    other.set("docs", "d1", "title", "HACKED")
    other.set("docs", "d1", "n", 3)
    assert reason_of(reencode(env.raw, d=other.commit())) == E.REJECT_BAD_SIGNATURE


def test_verify_key_must_match_the_cs3a_key() -> None:
    env = seal(ALICE, SC, commit(ALICE))
    # Mallory signs with her own key but claims Alice's CS3a key (and so her hashname)
    forged_sig = MALLORY.sign(E.SIGNING_CONTEXT + SC + env.delta)
    raw = reencode(env.raw, k=MALLORY.verify_key, g=forged_sig)
    assert reason_of(raw) == E.REJECT_KEY_BINDING
    assert reason_of(reencode(env.raw, k=bytes(32))) == E.REJECT_KEY_BINDING


def test_author_without_write_rights() -> None:
    env = seal(MALLORY, SC, commit(MALLORY))
    assert reason_of(env.raw) == E.REJECT_NO_WRITE_RIGHTS
    assert open_envelope(env.raw, lambda _s, _h: True).hashname == MALLORY.hashname


def test_unknown_subcloud() -> None:
    env = seal(ALICE, SC, commit(ALICE))
    assert reason_of(env.raw, is_known=lambda _sc: False) == E.REJECT_UNKNOWN_SUBCLOUD


def test_replica_id_not_the_authors() -> None:
    # Mallory (who may write) commits in Alice's replica id and signs it herself
    delta = commit(MALLORY, replica_id=replica_id_for(SC, ALICE.hashname))
    raw = cbor2.dumps(
        {
            "v": 1,
            "s": SC,
            "a": MALLORY.cs3a_public,
            "k": MALLORY.verify_key,
            "d": delta,
            "g": MALLORY.sign(E.SIGNING_CONTEXT + SC + delta),
        }
    )
    assert reason_of(raw, can_write=lambda _s, _h: True) == E.REJECT_REPLICA_MISMATCH
    # ... and a delta of her replica of another sub-cloud does not pass as this one's
    other_sc = SubCloudId(bytes(16))
    delta2 = commit(MALLORY, sc=other_sc)
    raw2 = reencode(raw, d=delta2, g=MALLORY.sign(E.SIGNING_CONTEXT + SC + delta2))
    assert reason_of(raw2, can_write=lambda _s, _h: True) == E.REJECT_REPLICA_MISMATCH


@pytest.mark.parametrize(
    "mutate",
    [
        lambda raw: raw[:-5],  # truncated
        lambda raw: raw[:1],
        lambda raw: b"",
        lambda raw: b"\xff" * 40,
        lambda raw: reencode(raw, v=2),
        lambda raw: reencode(raw, v=True),
        lambda raw: reencode(raw, x=1),
        lambda raw: reencode(raw, s=b"short"),
        lambda raw: reencode(raw, a="text"),
        lambda raw: reencode(raw, g=b"\x00" * 63),
        lambda raw: reencode(raw, d=b""),
        lambda raw: reencode(raw, d=b"\xd7\x01garbage"),
        lambda raw: cbor2.dumps([1, 2, 3]),
        lambda raw: b"\x00" * (E.MAX_ENVELOPE_BYTES + 1),
    ],
)
def test_malformed(mutate) -> None:  # type: ignore[no-untyped-def]
    env = seal(ALICE, SC, commit(ALICE))
    assert reason_of(mutate(env.raw), can_write=lambda _s, _h: True) == E.REJECT_MALFORMED


@given(st.binary(max_size=300))
def test_decode_raises_only_delta_rejected(data: bytes) -> None:
    try:
        decode_envelope(data)
    except DeltaRejected as exc:
        assert exc.reason == E.REJECT_MALFORMED


@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_any_flipped_byte_is_refused_or_harmless(pos: int, xor: int) -> None:
    env = seal(ALICE, SC, commit(ALICE))
    raw = bytearray(env.raw)
    raw[pos % len(raw)] ^= xor or 1
    try:
        opened = open_envelope(bytes(raw), only_alice)
    except DeltaRejected:
        return
    # only a change CBOR normalises away (none exist for this map) could get here
    assert opened.delta == env.delta and opened.signature == env.signature
