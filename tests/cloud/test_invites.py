"""Invites: the p2pcloud: URI, its QR code read back by a real decoder, the join protocol."""

from __future__ import annotations

import hashlib
import io
import struct

import cbor2
import pytest
import zxingcpp
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from p2pcloud._wire import b32decode, b32encode
from p2pcloud.cloud import invites as inv
from p2pcloud.cloud.grants import found_cloud
from p2pcloud.cloud.invites import InviteBook, InviteJoiner, format_invite, parse_invite
from p2pcloud.cloud.membership import Membership
from p2pcloud.errors import BadURI, JoinFailed, LocalProtocolError
from tests.cloud.helpers import NOW, entropy_from, identity

HOME = identity("home box")
PHONE = identity("new phone")
THIEF = identity("thief")
ENT = entropy_from("invites")
FOUNDING = found_cloud(HOME, now=NOW - 3600, entropy=ENT)
CLOUD = FOUNDING.cloud
MS = Membership(CLOUD, [FOUNDING], now=NOW)
PATHS = [{"type": "udp4", "ip": "127.0.0.1", "port": 42424},
         {"type": "tcp4", "ip": "127.0.0.1", "port": 42425}]


def make(book=None, **kw):
    book = book or InviteBook()
    invite = book.create(HOME, MS, paths=PATHS, now=NOW, entropy=ENT, **kw)
    return book, invite


def test_invite_text_round_trip():
    _, invite = make()
    text = format_invite(invite)
    assert text.startswith("p2pcloud:invite/1/") and len(text) < 400
    back = parse_invite(text, now=NOW)
    assert back == invite
    assert back.inviter == HOME.hashname and back.keys() == {"3a": HOME.cs3a_public}
    assert back.expires == NOW + inv.DEFAULT_TTL and list(back.paths) == PATHS
    # case and surrounding space do not matter (QR codes carry upper case)
    assert parse_invite("  " + text.upper() + "\n") == invite
    assert inv.is_invite(text.upper()) and not inv.is_invite("P2PCLOUD:AEBAGBAF")


def test_qr_png_decodes_with_a_real_reader():
    _, invite = make()
    png = inv.invite_qr_png(invite)
    assert png.startswith(b"\x89PNG")
    results = zxingcpp.read_barcodes(Image.open(io.BytesIO(png)))
    assert len(results) == 1
    assert results[0].format == zxingcpp.BarcodeFormat.QRCode
    assert parse_invite(results[0].text, now=NOW) == invite


def test_qr_svg_and_terminal_text():
    _, invite = make()
    svg = inv.invite_qr_svg(invite)
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "<path" in svg
    text = inv.invite_qr_text(invite)
    lines = text.splitlines()
    assert len(lines) > 10 and len({len(line) for line in lines}) == 1
    assert set(text) <= set("█▀▄ \n")
    # the terminal rendering and the PNG are of the same code
    qr = inv.invite_qr(invite)
    assert (qr.symbol_size(border=4)[1] + 1) // 2 == len(lines)


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda t: t[:-7], "truncated"),
        (lambda t: t[: len("p2pcloud:invite/1/") + 3], "truncated"),
        (lambda t: t.replace("p2pcloud:invite/1/", "p2pcloud:invite/2/"), "version 2"),
        (lambda t: t.replace("p2pcloud:invite/1/", "p2pcloud:invite/"), "truncated"),
        (lambda t: t.replace("p2pcloud:", "link:"), "not a p2pcloud"),
        (lambda t: t.replace("invite/", "tag/"), "not an invite"),
        (lambda t: t[:40] + ("a" if t[40] != "a" else "b") + t[41:], "altered"),
        (lambda t: t + "aaaa", "extra characters"),
        (lambda t: t[:30] + "!" + t[31:], "damaged"),
    ],
)
def test_bad_invites_fail_clearly(mangle, message):
    _, invite = make()
    with pytest.raises(BadURI, match=message):
        parse_invite(mangle(format_invite(invite)), now=NOW)


def test_expired_invite_fails_when_parsed():
    _, invite = make(ttl=600)
    text = format_invite(invite)
    assert parse_invite(text, now=NOW + 599) == invite
    with pytest.raises(BadURI, match="this invite expired at 2027-01-15 08:10:00 UTC"):
        parse_invite(text, now=NOW + 600)


def test_altered_keys_with_a_fixed_check_are_refused():
    # rebuild an invite whose verify key does not belong to its CS3a key, check recomputed
    _, invite = make()
    blob = b32decode(format_invite(invite).split("/")[-1])
    payload = cbor2.loads(blob[2:-4])
    payload["k"] = THIEF.verify_key
    body = cbor2.dumps(payload, canonical=True)
    check = hashlib.sha256(b"p2pcloud invite v1" + body).digest()[:4]
    text = "p2pcloud:invite/1/" + b32encode(struct.pack(">H", len(body)) + body + check)
    with pytest.raises(BadURI, match="do not belong together"):
        parse_invite(text)


def join(book, invite, joiner=PHONE, *, peer_seen_by_inviter=None, now=NOW):
    j = InviteJoiner(joiner, invite, entropy=ENT)
    outcome = book.handle_join(
        j.request(), local=HOME, peer=peer_seen_by_inviter or joiner.hashname, membership=MS,
        now=now, entropy=ENT,
    )
    return j, outcome


def test_join_round_trip_gives_a_verified_grant():
    book, invite = make(role="device", rights={"*": ["read", "write"]})
    j, outcome = join(book, parse_invite(format_invite(invite), now=NOW))
    assert outcome.error is None and outcome.grant is not None
    assert outcome.grant.subject == PHONE.hashname and outcome.grant.issuer == HOME.hashname
    joined = j.finish(outcome.reply, peer=HOME.hashname, now=NOW + 1)
    assert joined.cloud == CLOUD and joined.grant == outcome.grant
    assert joined.membership.is_member(PHONE.hashname)
    assert joined.membership.can_write(b"\x05" * 16, PHONE.hashname)
    assert FOUNDING.raw in joined.records
    # the inviter's view agrees once it adds the grant
    assert MS.with_records([outcome.grant]).is_member(PHONE.hashname)


def test_used_invite_fails_clearly():
    book, invite = make()
    join(book, invite)
    j, outcome = join(book, invite, THIEF)
    assert outcome.grant is None
    assert outcome.error == "this invite was already used; ask for a new one"
    with pytest.raises(JoinFailed, match="already used"):
        j.finish(outcome.reply, peer=HOME.hashname, now=NOW)


def test_expired_invite_fails_at_the_inviter():
    book, invite = make(ttl=60)
    j, outcome = join(book, invite, now=NOW + 61)
    assert outcome.grant is None
    assert "this invite expired at 2027-01-15 08:01:00 UTC" in outcome.error
    with pytest.raises(JoinFailed, match="expired"):
        j.finish(outcome.reply, peer=HOME.hashname, now=NOW + 61)


def test_wrong_secret_burns_the_invite():
    book, invite = make()
    guessed = inv.Invite(invite.cloud, invite.inviter, invite.inviter_key,
                         invite.inviter_verify_key, invite.paths, b"\x00" * 16, invite.expires)
    # the attacker knows the invite id (say it saw a join) but not the secret
    j = InviteJoiner(THIEF, guessed, entropy=ENT)
    msg = cbor2.loads(j.request())
    msg["i"] = invite.id
    outcome = book.handle_join(cbor2.dumps(msg), local=HOME, peer=THIEF.hashname, membership=MS,
                               now=NOW, entropy=ENT)
    assert outcome.grant is None and "proof is wrong" in outcome.error
    _, after = join(book, invite)  # the real owner of the invite now finds it burned
    assert after.grant is None and "already used" in after.error
    assert sum(book.statistics().values()) == 2 and "joined" not in book.statistics()


def test_join_binds_both_hashnames():
    book, invite = make()
    # the thief relays the phone's join message over its own link: the hashnames disagree
    j = InviteJoiner(PHONE, invite, entropy=ENT)
    outcome = book.handle_join(j.request(), local=HOME, peer=THIEF.hashname, membership=MS,
                               now=NOW, entropy=ENT)
    assert outcome.grant is None and "another endpoint" in outcome.error
    # ...and the invite is still usable by the phone, which was never answered
    book2, invite2 = make()
    j2, ok = join(book2, invite2)
    # a reply relayed from another endpoint than the inviter is refused by the joiner
    with pytest.raises(JoinFailed, match="did not come from"):
        j2.finish(ok.reply, peer=THIEF.hashname, now=NOW)


def test_forged_welcome_is_refused():
    book, invite = make()
    j, outcome = join(book, invite)
    msg = cbor2.loads(outcome.reply)
    msg["m"] = bytes(32)
    with pytest.raises(JoinFailed, match="forged"):
        j.finish(cbor2.dumps(msg), peer=HOME.hashname, now=NOW)


@pytest.mark.parametrize("data", [b"", b"\xff\x00", cbor2.dumps({"v": 9, "t": "join"}),
                                  cbor2.dumps({"v": 1, "t": "join"}), cbor2.dumps([1])])
def test_garbage_join_messages_are_refused_not_raised(data):
    book, _ = make()
    outcome = InviteBook.handle_join(book, data, local=HOME, peer=PHONE.hashname, membership=MS,
                                     now=NOW, entropy=ENT)
    assert outcome.grant is None and outcome.error
    assert cbor2.loads(outcome.reply)["t"] == "refused"


def test_only_admins_invite_and_the_book_persists():
    book, invite = make()
    with pytest.raises(LocalProtocolError, match="only an admin"):
        book.create(PHONE, MS, paths=PATHS, now=NOW, entropy=ENT)
    join(book, invite)
    _, other = make(book)
    loaded = InviteBook.from_bytes(book.to_bytes())
    assert len(loaded) == 2
    with pytest.raises(JoinFailed, match="already used"):
        loaded.check(invite.id, NOW)
    assert loaded.check(other.id, NOW).role == "device"
    loaded.prune(NOW + inv.DEFAULT_TTL)
    assert len(loaded) == 0
    with pytest.raises(LocalProtocolError, match="damaged"):
        InviteBook.from_bytes(b"\x00garbage")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400) | st.text(alphabet="abcdefghijklmnopqrstuvwxyz234567",
                                       max_size=400).map(lambda t: "p2pcloud:invite/1/" + t))
def test_parse_invite_raises_only_bad_uri(text):
    try:
        parse_invite(text, now=NOW)
    except BadURI as exc:
        assert str(exc)


def test_book_keeps_per_subcloud_rights():
    book, invite = make(rights={b"\x07" * 16: ["read"]}, role="thing")
    loaded = InviteBook.from_bytes(book.to_bytes())
    j, outcome = join(loaded, invite)
    assert outcome.grant.role == "thing"
    assert outcome.grant.rights_on(b"\x07" * 16) == {"read"}
    assert outcome.grant.rights_on(b"\x08" * 16) == frozenset()


def test_invite_answered_for_another_cloud_is_refused_unburned():
    book, invite = make()
    other = found_cloud(HOME, now=NOW, entropy=entropy_from("another cloud"))
    j = InviteJoiner(PHONE, invite, entropy=ENT)
    outcome = book.handle_join(j.request(), local=HOME, peer=PHONE.hashname,
                               membership=Membership(other.cloud, [other], now=NOW),
                               now=NOW, entropy=ENT)
    assert outcome.grant is None and "another cloud" in outcome.error
    assert book.check(invite.id, NOW).used_at is None  # still usable for its own cloud
