"""Grants, revocations and the membership they make (p2pcloud.cloud.grants / membership)."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pcloud import _core
from p2pcloud._ids import ReplicaId, SubCloudId
from p2pcloud.cloud import grants as g
from p2pcloud.cloud import membership as m
from p2pcloud.cloud.grants import decode_record, found_cloud, issue_grant, sign_revocation
from p2pcloud.cloud.membership import Membership, cloud_subcloud_id, verify_envelope
from p2pcloud.errors import BadRecord, DeltaRejected, LocalProtocolError
from p2pcloud.sync.envelope import REJECT_NO_WRITE_RIGHTS, replica_id_for, seal
from tests.cloud.helpers import NOW, entropy_from, identity

FOUNDER = identity("founder")
ADMIN = identity("admin")
ADMIN2 = identity("admin2")
PHONE = identity("phone")
LAPTOP = identity("laptop")
STRANGER = identity("stranger")
ENT = entropy_from("membership")
FOUNDING = found_cloud(FOUNDER, now=NOW - 1000, entropy=ENT)
CLOUD = FOUNDING.cloud
S1 = SubCloudId(b"\x01" * 16)
S2 = SubCloudId(b"\x02" * 16)


def grant(issuer, subject, *, role="device", rights=None, nb=NOW - 500, ex=None, cloud=CLOUD):
    return issue_grant(
        issuer, cloud, subject_key=subject.cs3a_public, subject_verify_key=subject.verify_key,
        role=role,
        rights=rights or ({"*": ["all"]} if role == "admin" else {S1: ["read", "write"]}),
        not_before=nb, expires=ex, entropy=ENT,
    )


G_ADMIN = grant(FOUNDER, ADMIN, role="admin")
G_ADMIN2 = grant(FOUNDER, ADMIN2, role="admin")
G_PHONE = grant(ADMIN, PHONE, rights={S1: ["read"], S2: ["read", "write"]})
G_LAPTOP = grant(FOUNDER, LAPTOP, rights={"*": ["read", "write"]})


def reasons(ms: Membership) -> dict[bytes | None, str]:
    return {r.record_id: r.reason for r in ms.rejected}


# -- records --------------------------------------------------------------------------------


def test_founding_grant_names_its_cloud_and_round_trips():
    assert FOUNDING.founding and FOUNDING.cloud == FOUNDING.id
    assert FOUNDING.issuer == FOUNDING.subject == FOUNDER.hashname
    again = decode_record(FOUNDING.raw)
    assert again == FOUNDING
    other = found_cloud(FOUNDER, now=NOW, entropy=ENT)
    assert other.cloud != CLOUD  # a new nonce founds a new cloud


def test_grant_fields_round_trip():
    assert G_PHONE.subject == PHONE.hashname and G_PHONE.issuer == ADMIN.hashname
    assert G_PHONE.rights_on(S1) == {"read"} and G_PHONE.rights_on(S2) == {"read", "write"}
    assert G_PHONE.rights_on(SubCloudId(b"\x03" * 16)) == frozenset()
    assert decode_record(G_PHONE.raw) == G_PHONE
    assert len(G_PHONE.raw) < 600


def test_altered_body_is_a_forgery():
    outer = cbor2.loads(G_PHONE.raw)
    body = cbor2.loads(outer["b"])
    body["a"] = {"*": ["all"]}  # the phone tries to give itself everything
    outer["b"] = cbor2.dumps(body, canonical=True)
    with pytest.raises(BadRecord, match="forged signature"):
        decode_record(cbor2.dumps(outer))


def test_a_re_encoded_record_is_refused():
    outer = cbor2.loads(G_PHONE.raw)
    reordered = cbor2.dumps({k: outer[k] for k in ("v", "t", "g", "b")})
    assert reordered != G_PHONE.raw
    with pytest.raises(BadRecord, match="not canonical"):
        decode_record(reordered)


@pytest.mark.parametrize(
    "data",
    [b"", b"\xff", cbor2.dumps({"v": 2, "t": "grant", "b": b"", "g": b"x" * 64}),
     cbor2.dumps({"v": 1, "t": "nope", "b": b"", "g": b"x" * 64}),
     cbor2.dumps([1, 2, 3]), b"\x9f" * 10000],
)
def test_malformed_records_raise_only_bad_record(data):
    with pytest.raises(BadRecord):
        decode_record(data)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.integers(0, 400), st.integers(0, 255))
def test_decoder_never_raises_anything_else(junk, pos, byte):
    with pytest.raises(BadRecord):
        decode_record(junk + b"\x00" if junk == G_PHONE.raw else junk)
    mutated = bytearray(G_PHONE.raw)
    mutated[pos % len(mutated)] ^= byte or 1
    try:
        rec = decode_record(bytes(mutated))
    except BadRecord:
        return
    # a flip that still decodes must be one the signature does not cover (outer CBOR framing)
    assert rec.id == G_PHONE.id


def test_admin_grants_must_cover_everything():
    with pytest.raises(LocalProtocolError):
        issue_grant(FOUNDER, CLOUD, subject_key=ADMIN.cs3a_public,
                    subject_verify_key=ADMIN.verify_key, role="admin", rights={S1: ["all"]},
                    not_before=NOW, expires=None, entropy=ENT)


def test_subject_keys_must_belong_together():
    with pytest.raises(LocalProtocolError, match="verify key"):
        issue_grant(FOUNDER, CLOUD, subject_key=PHONE.cs3a_public,
                    subject_verify_key=LAPTOP.verify_key, role="device", rights={S1: ["read"]},
                    not_before=NOW, expires=None, entropy=ENT)


# -- valid chains ------------------------------------------------------------------------------


def test_valid_chain_gives_members_and_rights():
    ms = Membership(CLOUD, [FOUNDING.raw, G_ADMIN.raw, G_PHONE.raw, G_LAPTOP.raw], now=NOW)
    assert ms.founder == FOUNDER.hashname
    assert set(ms.members()) == {FOUNDER.hashname, ADMIN.hashname, PHONE.hashname,
                                 LAPTOP.hashname}
    assert ms.admins() == sorted([FOUNDER.hashname, ADMIN.hashname])
    assert ms.member(PHONE.hashname).role == "device"
    assert ms.can_read(S1, PHONE.hashname) and not ms.can_write(S1, PHONE.hashname)
    assert ms.can_write(S2, PHONE.hashname)
    assert ms.can_write(S1, LAPTOP.hashname) and ms.can_write(S2, LAPTOP.hashname)
    assert not ms.can_admin(S1, LAPTOP.hashname) and ms.can_admin(S1, ADMIN.hashname)
    assert not ms.can_read(S1, STRANGER.hashname)
    assert ms.rejected == ()
    # the cloud sub-cloud: every member reads it, only admins write it
    cs = cloud_subcloud_id(CLOUD)
    assert ms.subcloud == cs
    assert ms.can_read(cs, PHONE.hashname) and not ms.can_write(cs, LAPTOP.hashname)
    assert ms.can_write(cs, ADMIN.hashname) and not ms.can_read(cs, STRANGER.hashname)


def test_chain_for_a_member_proves_it_alone():
    ms = Membership(CLOUD, [FOUNDING, G_ADMIN, G_ADMIN2, G_PHONE, G_LAPTOP], now=NOW)
    chain = ms.chain_for(PHONE.hashname)
    assert chain[0] == FOUNDING.raw
    assert set(chain) == {FOUNDING.raw, G_ADMIN.raw, G_PHONE.raw}
    alone = Membership(CLOUD, chain, now=NOW)
    assert alone.is_member(PHONE.hashname) and alone.rejected == ()
    assert ms.chain_for(STRANGER.hashname) == []


def test_grants_to_one_member_add_up():
    more = grant(FOUNDER, PHONE, rights={S1: ["write"]})
    ms = Membership(CLOUD, [FOUNDING, G_ADMIN, G_PHONE, more], now=NOW)
    assert ms.rights(S1, PHONE.hashname) == {"read", "write"}
    assert len(ms.member(PHONE.hashname).grants) == 2


# -- rejections -------------------------------------------------------------------------------


def test_forged_record_is_rejected_with_reason():
    outer = cbor2.loads(G_LAPTOP.raw)
    outer["g"] = bytes(64)
    ms = Membership(CLOUD, [FOUNDING.raw, cbor2.dumps(outer)], now=NOW)
    assert not ms.is_member(LAPTOP.hashname)
    assert [r.reason for r in ms.rejected] == [m.REJECT_FORGED]


def test_non_admin_issuer_is_rejected():
    by_device = grant(LAPTOP, STRANGER)
    ms = Membership(CLOUD, [FOUNDING, G_LAPTOP, by_device], now=NOW)
    assert ms.is_member(LAPTOP.hashname) and not ms.is_member(STRANGER.hashname)
    assert reasons(ms) == {by_device.id: m.REJECT_NOT_ADMIN}


def test_expired_and_not_yet_valid_grants():
    expired = grant(FOUNDER, PHONE, nb=NOW - 100, ex=NOW - 1)
    future = grant(FOUNDER, LAPTOP, nb=NOW + 10 * 3600)
    ms = Membership(CLOUD, [FOUNDING, expired, future], now=NOW)
    assert not ms.is_member(PHONE.hashname) and not ms.is_member(LAPTOP.hashname)
    assert reasons(ms) == {expired.id: m.REJECT_EXPIRED, future.id: m.REJECT_NOT_YET_VALID}
    # the same records, earlier and later: validity follows the `now` passed in
    assert Membership(CLOUD, [FOUNDING, expired], now=NOW - 50).is_member(PHONE.hashname)
    # a grant made on a device whose clock runs a little ahead still counts
    skewed = grant(FOUNDER, PHONE, nb=NOW + 60)
    assert Membership(CLOUD, [FOUNDING, skewed], now=NOW).is_member(PHONE.hashname)


def test_expired_admin_takes_its_grants_with_it():
    short_admin = grant(FOUNDER, ADMIN, role="admin", ex=NOW - 10, nb=NOW - 900)
    by_it = grant(ADMIN, PHONE)
    ms = Membership(CLOUD, [FOUNDING, short_admin, by_it], now=NOW)
    assert not ms.is_member(PHONE.hashname)
    assert reasons(ms) == {short_admin.id: m.REJECT_EXPIRED, by_it.id: m.REJECT_NO_CHAIN}


def test_cycle_is_rejected():
    # two endpoints make each other admins; neither is linked to the founder
    a_for_b = grant(ADMIN, ADMIN2, role="admin")
    b_for_a = grant(ADMIN2, ADMIN, role="admin")
    b_for_phone = grant(ADMIN2, PHONE)
    ms = Membership(CLOUD, [FOUNDING, a_for_b, b_for_a, b_for_phone], now=NOW)
    assert set(ms.members()) == {FOUNDER.hashname}
    assert reasons(ms) == {a_for_b.id: m.REJECT_CYCLE, b_for_a.id: m.REJECT_CYCLE,
                           b_for_phone.id: m.REJECT_CYCLE}
    # the same grants hanging off the founder are fine
    ms2 = Membership(CLOUD, [FOUNDING, G_ADMIN, a_for_b, b_for_a, b_for_phone], now=NOW)
    assert ms2.is_member(PHONE.hashname) and ms2.rejected == ()


def test_unknown_cloud_and_missing_founding_grant():
    elsewhere = found_cloud(STRANGER, now=NOW, entropy=ENT)
    foreign = grant(STRANGER, PHONE, cloud=elsewhere.cloud)
    ms = Membership(CLOUD, [FOUNDING, elsewhere, foreign], now=NOW)
    assert set(ms.members()) == {FOUNDER.hashname}
    assert reasons(ms) == {elsewhere.id: m.REJECT_UNKNOWN_CLOUD,
                           foreign.id: m.REJECT_UNKNOWN_CLOUD}
    # without our founding grant nobody is a member, and nothing is invented
    ms2 = Membership(CLOUD, [G_ADMIN, G_PHONE], now=NOW)
    assert ms2.founder is None and ms2.members() == {}
    assert set(reasons(ms2).values()) == {m.REJECT_NO_CHAIN}


def test_a_founding_grant_cannot_be_swapped():
    # the stranger signs a "founding grant" claiming our cloud id: it cannot carry our id
    fake = found_cloud(STRANGER, now=NOW, entropy=ENT)
    assert fake.cloud != CLOUD
    ms = Membership(CLOUD, [fake, grant(STRANGER, PHONE, cloud=fake.cloud)], now=NOW)
    assert ms.founder is None and ms.members() == {}


def test_revoked_issuer_grants_after_revocation_are_void():
    rev = Membership(CLOUD, [FOUNDING, G_ADMIN, G_PHONE], now=NOW).revoke(
        FOUNDER, ADMIN.hashname, accepted={}, entropy=ENT)
    assert rev.kept == {G_PHONE.id}  # the admin's earlier pairing stays
    late = grant(ADMIN, LAPTOP)  # signed after the revocation (back-dating does not help)
    ms = Membership(CLOUD, [FOUNDING, G_ADMIN, G_PHONE, rev, late], now=NOW)
    assert not ms.is_member(ADMIN.hashname) and ms.is_revoked(ADMIN.hashname)
    assert ms.is_member(PHONE.hashname) and not ms.is_member(LAPTOP.hashname)
    assert reasons(ms) == {late.id: m.REJECT_ISSUER_REVOKED, G_ADMIN.id: m.REJECT_SUBJECT_REVOKED}
    assert not ms.should_link(ADMIN.hashname) and ms.should_link(STRANGER.hashname)
    # the phone's chain now also carries the revocation that keeps its grant
    chain = ms.chain_for(PHONE.hashname)
    assert rev.raw in chain and Membership(CLOUD, chain, now=NOW).is_member(PHONE.hashname)
    # a revoked endpoint cannot be granted again
    with pytest.raises(LocalProtocolError, match="revoked"):
        ms.grant(FOUNDER, subject_key=ADMIN.cs3a_public, subject_verify_key=ADMIN.verify_key,
                 role="device", rights={S1: ["read"]}, entropy=ENT)


def test_revocation_by_a_non_admin_does_nothing():
    rev = sign_revocation(LAPTOP, CLOUD, PHONE.hashname, cutoffs={}, now=NOW, entropy=ENT)
    ms = Membership(CLOUD, [FOUNDING, G_ADMIN, G_PHONE, G_LAPTOP, rev], now=NOW)
    assert ms.is_member(PHONE.hashname)
    assert reasons(ms) == {rev.id: m.REJECT_NOT_ADMIN}


def test_mutual_revocation_closer_to_the_founder_wins():
    base = [FOUNDING, G_ADMIN, G_ADMIN2]
    ms0 = Membership(CLOUD, base, now=NOW)
    a_revokes_b = ms0.revoke(ADMIN, ADMIN2.hashname, accepted={}, entropy=ENT)
    b_revokes_a = ms0.revoke(ADMIN2, ADMIN.hashname, accepted={}, entropy=ENT)
    ms = Membership(CLOUD, [*base, a_revokes_b, b_revokes_a], now=NOW)
    # same depth: the smaller hashname's revocation is applied first and wins
    winner, loser = sorted([ADMIN.hashname, ADMIN2.hashname])
    assert ms.is_admin(winner) and ms.is_revoked(loser)
    assert FOUNDER.hashname in ms.admins()
    # the founder (depth 0) always goes first
    f_revokes_a = ms0.revoke(FOUNDER, ADMIN.hashname, accepted={}, entropy=ENT)
    a_revokes_f = ms0.revoke(ADMIN, FOUNDER.hashname, accepted={}, entropy=ENT)
    ms2 = Membership(CLOUD, [*base, a_revokes_f, f_revokes_a], now=NOW)
    assert ms2.is_admin(FOUNDER.hashname) and ms2.is_revoked(ADMIN.hashname)
    assert {r.record_id: r.reason for r in ms2.rejected}[a_revokes_f.id] == (
        m.REJECT_ISSUER_REVOKED)


# -- last admin ---------------------------------------------------------------------------------


def test_removing_the_last_admin_is_refused():
    ms = Membership(CLOUD, [FOUNDING, G_LAPTOP], now=NOW)
    with pytest.raises(LocalProtocolError, match="last admin"):
        ms.revoke(FOUNDER, FOUNDER.hashname, accepted={}, entropy=ENT)
    ms2 = Membership(CLOUD, [FOUNDING, G_ADMIN, G_LAPTOP], now=NOW)
    rev = ms2.revoke(ADMIN, FOUNDER.hashname, accepted={}, entropy=ENT)  # the other remains
    ms3 = ms2.with_records([rev])
    assert ms3.admins() == [ADMIN.hashname] and ms3.is_member(LAPTOP.hashname)
    with pytest.raises(LocalProtocolError, match="last admin"):
        ms3.revoke(ADMIN, ADMIN.hashname, accepted={}, entropy=ENT)
    with pytest.raises(LocalProtocolError, match="only an admin"):
        ms3.revoke(LAPTOP, ADMIN.hashname, accepted={}, entropy=ENT)


# -- order independence ------------------------------------------------------------------------


def _zoo() -> list[bytes]:
    """Valid and invalid records of every kind, revocations included."""
    ms0 = Membership(CLOUD, [FOUNDING, G_ADMIN, G_ADMIN2, G_PHONE, G_LAPTOP], now=NOW)
    r1 = ms0.revoke(ADMIN, ADMIN2.hashname, accepted={ReplicaId(b"r" * 16): 4}, entropy=ENT)
    r2 = ms0.revoke(ADMIN2, ADMIN.hashname, accepted={}, entropy=ENT)
    r3 = ms0.revoke(FOUNDER, PHONE.hashname, accepted={ReplicaId(b"p" * 16): 2}, entropy=ENT)
    r4 = ms0.revoke(ADMIN2, PHONE.hashname, accepted={ReplicaId(b"p" * 16): 7}, entropy=ENT)
    outer = cbor2.loads(G_LAPTOP.raw)
    outer["g"] = bytes(64)
    return [
        FOUNDING.raw, G_ADMIN.raw, G_ADMIN2.raw, G_PHONE.raw, G_LAPTOP.raw,
        grant(LAPTOP, STRANGER).raw, grant(ADMIN2, STRANGER, role="admin").raw,
        grant(STRANGER, ADMIN).raw, grant(FOUNDER, STRANGER, ex=NOW - 1, nb=NOW - 9).raw,
        grant(ADMIN2, LAPTOP, rights={S2: ["read"]}).raw,
        r1.raw, r2.raw, r3.raw, r4.raw, cbor2.dumps(outer), b"junk",
        found_cloud(STRANGER, now=NOW, entropy=ENT).raw,
    ]


ZOO = _zoo()
ZOO_SUMMARY = Membership(CLOUD, ZOO, now=NOW).summary()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.permutations(list(range(len(ZOO)))), st.lists(st.integers(0, len(ZOO) - 1),
                                                         max_size=8))
def test_any_order_and_duplication_gives_the_same_membership(order, dups):
    records = [ZOO[i] for i in order] + [ZOO[i] for i in dups]
    assert Membership(CLOUD, records, now=NOW).summary() == ZOO_SUMMARY


def test_zoo_outcome_is_what_the_rules_say():
    ms = Membership(CLOUD, ZOO, now=NOW)
    winner, loser = sorted([ADMIN.hashname, ADMIN2.hashname])
    assert ms.is_revoked(loser) and ms.is_admin(winner) and ms.is_revoked(PHONE.hashname)
    # the phone was revoked twice: the cutoffs merge to the larger one (if both counted)
    cut = ms.cutoffs(PHONE.hashname)[ReplicaId(b"p" * 16)]
    assert cut == (7 if loser != ADMIN2.hashname else 2)


# -- revocation cutoffs with real signed deltas -------------------------------------------------


def _deltas(author, subcloud, n):
    replica = _core.Replica(replica_id_for(subcloud, author.hashname))
    envelopes = []
    for i in range(n):
        replica.begin(NOW * 1000 + i)
        replica.set("notes", f"n{i}", "text", f"note {i}")
        replica.set("notes", f"n{i}", "more", i)
        envelopes.append(seal(author, subcloud, replica.commit()))
    return replica, envelopes


def test_writes_beyond_the_cutoff_are_rejected_however_they_travel():
    records = [FOUNDING, G_ADMIN, G_PHONE, G_LAPTOP]
    before = Membership(CLOUD, records, now=NOW)
    _, envs = _deltas(PHONE, S2, 4)  # the phone writes 4 transactions (2 dots each)
    for env in envs:
        assert verify_envelope(before, env.raw).last == env.last
    # the admin had applied the first two when it revoked the phone
    rid = replica_id_for(S2, PHONE.hashname)
    rev = before.revoke(ADMIN, PHONE.hashname, accepted={rid: envs[1].last}, entropy=ENT)
    # path 1: the founder hears from the phone itself; path 2: the laptop had stored every
    # envelope (it applied all four before it learned of the revocation) and forwards them
    # unchanged to a third member. Both apply the same verdict to the same bytes.
    direct = Membership(CLOUD, [*records, rev], now=NOW + 10)
    forwarded_bytes = [bytes(e.raw) for e in envs]
    via_laptop = Membership(CLOUD, [rev, *reversed(records)], now=NOW + 20)
    for ms in (direct, via_laptop):
        for env, raw in zip(envs[:2], forwarded_bytes[:2], strict=True):
            assert verify_envelope(ms, raw).first == env.first
        for raw in forwarded_bytes[2:]:
            with pytest.raises(DeltaRejected) as info:
                verify_envelope(ms, raw)
            assert info.value.reason == REJECT_NO_WRITE_RIGHTS
            assert "cutoff" in info.value.detail
        assert not ms.can_write(S2, PHONE.hashname)
        assert not ms.accepts_delta(S2, PHONE.hashname, rid, envs[1].first, envs[2].last)
        # a replica the revoker never heard from has no cutoff: nothing of it is accepted
        other = replica_id_for(S1, PHONE.hashname)
        assert not ms.accepts_delta(S1, PHONE.hashname, other, 1, 1)
    # the phone never had write rights on S1: its S1 deltas fail even below any cutoff
    _, s1 = _deltas(PHONE, S1, 1)
    with pytest.raises(DeltaRejected):
        verify_envelope(before, s1[0].raw)


# -- the cloud sub-cloud -----------------------------------------------------------------------


def test_records_round_trip_through_the_cloud_subcloud():
    cs = cloud_subcloud_id(CLOUD)
    home = _core.Replica(replica_id_for(cs, FOUNDER.hashname))
    delta = m.write_records(home, [FOUNDING, G_ADMIN, G_PHONE], now_ms=NOW * 1000)
    assert delta and seal(FOUNDER, cs, delta)
    assert m.write_records(home, [G_ADMIN], now_ms=NOW * 1000 + 1) == b""  # already there
    rev = Membership(CLOUD, m.read_records(home), now=NOW).revoke(
        FOUNDER, PHONE.hashname, accepted={}, entropy=ENT)
    delta2 = m.write_records(home, [rev], now_ms=NOW * 1000 + 2)
    # a second member applies both deltas and computes the same membership
    laptop = _core.Replica(replica_id_for(cs, LAPTOP.hashname))
    laptop.apply([delta2, delta], NOW * 1000 + 5)
    assert home.documents(m.COLL_GRANTS) == sorted(
        g.record_id_text(x.id) for x in (FOUNDING, G_ADMIN, G_PHONE))
    a = Membership(CLOUD, m.read_records(home), now=NOW)
    b = Membership(CLOUD, m.read_records(laptop), now=NOW)
    assert a.summary() == b.summary() and a.is_revoked(PHONE.hashname)
    # a record stored under the wrong document id is not read back as valid
    laptop.begin(NOW * 1000 + 9)
    laptop.set(m.COLL_GRANTS, g.record_id_text(G_ADMIN.id), m.FIELD_RECORD, G_LAPTOP.raw)
    laptop.commit()
    assert G_LAPTOP.raw not in m.read_records(laptop)


def test_too_many_records_is_refused():
    with pytest.raises(LocalProtocolError):
        Membership(CLOUD, (b"x%d" % i for i in range(m.MAX_RECORDS + 1)), now=NOW)



@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sets(st.integers(0, len(ZOO) - 1)), st.randoms(use_true_random=False))
def test_any_subset_is_a_function_of_the_set(chosen, rnd):
    subset = [ZOO[i] for i in sorted(chosen)]
    shuffled = list(subset)
    rnd.shuffle(shuffled)
    a = Membership(CLOUD, subset, now=NOW)
    b = Membership(CLOUD, shuffled + shuffled[:2], now=NOW)
    assert a.summary() == b.summary()
    # whatever the subset, the invariants hold: members hold grants from the subset and are
    # not revoked; every admin is a member; without the founding grant nobody is
    ids = {r.id for r in map(_try_decode, subset) if r is not None}
    for hashname, member in a.members().items():
        assert not a.is_revoked(hashname) and member.grants
        assert set(member.grants) <= ids
    assert set(a.admins()) <= set(a.members())
    if FOUNDING.raw not in subset:
        assert a.members() == {}


def _try_decode(raw):
    try:
        return decode_record(raw)
    except BadRecord:
        return None
