"""Short-code pairing with SPAKE2 (p2pcloud.cloud.pairing)."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcloud.cloud import pairing as pr
from p2pcloud.cloud._words import INDEX, WORDS
from p2pcloud.cloud.grants import found_cloud
from p2pcloud.cloud.membership import Membership
from p2pcloud.cloud.pairing import PairingHost, PairingJoiner, make_code, parse_code
from p2pcloud.errors import JoinFailed, LocalProtocolError
from tests.cloud.helpers import NOW, entropy_from, identity

HOME = identity("pairing home")
PHONE = identity("pairing phone")
MALLORY = identity("mallory")
ENT = entropy_from("pairing")
FOUNDING = found_cloud(HOME, now=NOW - 60, entropy=ENT)
MS = Membership(FOUNDING.cloud, [FOUNDING], now=NOW)


def open_host(**kw):
    host = PairingHost(HOME, **kw)
    code = host.open(MS, now=NOW, entropy=ENT)
    return host, code


def other_code(code):
    number, *words = code.split("-")
    words[1] = WORDS[(INDEX[words[1]] + 1) % 256]
    return "-".join([number, *words])


def run(host, joiner, *, peer_at_host=PHONE.hashname, now=NOW):
    """Run the four messages; return every message sent and both sides' last steps."""
    sent = []
    m1 = joiner.start()
    sent.append(m1)
    s1 = host.receive(peer_at_host, m1, membership=MS, now=now, entropy=ENT)
    sent.append(s1.reply)
    j1 = joiner.receive(s1.reply, now=now)
    if j1.reply is None:
        return sent, s1, j1
    sent.append(j1.reply)
    s2 = host.receive(peer_at_host, j1.reply, membership=MS, now=now, entropy=ENT)
    sent.append(s2.reply)
    j2 = joiner.receive(s2.reply, now=now)
    return sent, s2, j2


def test_right_code_pairs_the_device():
    host, code = open_host()
    assert host.nameplate(NOW) == int(code.split("-")[0])
    joiner = PairingJoiner(PHONE, code, peer=HOME.hashname, entropy=ENT)
    sent, hs, js = run(host, joiner)
    assert hs.error is None and hs.done and hs.grant is not None
    assert js.error is None and js.done and js.joined is not None
    assert js.joined.grant == hs.grant and hs.grant.subject == PHONE.hashname
    assert js.joined.membership.is_member(PHONE.hashname)
    assert js.joined.cloud == FOUNDING.cloud
    assert MS.with_records([hs.grant]).is_member(PHONE.hashname)
    # the code never travels: no message carries it or any of its words
    for msg in sent:
        assert code.encode() not in msg
        for word in code.split("-")[1:]:
            assert word.encode() not in msg
    # one-time: the code is closed after use
    assert host.nameplate(NOW) is None
    assert host.statistics() == {"code burned by an attempt": 1, "paired": 1}


def test_typed_code_is_normalized():
    host, code = open_host()
    typed = "  " + code.upper().replace("-", " ") + " "
    joiner = PairingJoiner(PHONE, typed, peer=HOME.hashname, entropy=ENT)
    _, hs, js = run(host, joiner)
    assert hs.grant is not None and js.joined is not None


def test_wrong_code_fails_after_one_attempt_and_burns_the_code():
    host, code = open_host()
    wrong = PairingJoiner(PHONE, other_code(code), peer=HOME.hashname, entropy=ENT)
    _, hs, js = run(host, wrong)
    assert js.done and js.joined is None and "code was wrong" in js.error
    assert hs.grant is None and host.attempts == 1
    assert host.statistics() == {"code burned by an attempt": 1}
    assert host.nameplate(NOW) is None  # burned: the pairing flag goes off
    # now even the right code is refused: the user must open a new code
    right = PairingJoiner(PHONE, code, peer=HOME.hashname, entropy=ENT)
    _, hs2, js2 = run(host, right)
    assert hs2.grant is None and "no pairing code open" in hs2.error
    assert js2.joined is None and "no pairing code open" in js2.error


def test_a_guessing_attacker_gets_nothing_even_if_it_lies_in_its_confirmation():
    host, code = open_host()
    guess = PairingJoiner(MALLORY, other_code(code), peer=HOME.hashname, entropy=ENT)
    s1 = host.receive(MALLORY.hashname, guess.start(), membership=MS, now=NOW, entropy=ENT)
    assert s1.reply is not None and not s1.done
    forged = cbor2.dumps({"v": 1, "t": "confirm", "c": bytes(32)})
    s2 = host.receive(MALLORY.hashname, forged, membership=MS, now=NOW, entropy=ENT)
    assert s2.done and s2.grant is None and "code was wrong" in s2.error
    assert host.statistics()[f"refused: {pr._WRONG}"[:120]] == 1
    assert cbor2.loads(s2.reply)["t"] == "refused"


def test_mitm_with_a_different_code_fails_on_both_sides():
    # Mallory answers the phone's discovery with its own open pairing (its own code); the
    # phone types the real home box's code into a session with Mallory.
    host, code = open_host()
    mallory_founding = found_cloud(MALLORY, now=NOW, entropy=entropy_from("mallory cloud"))
    mallory_ms = Membership(mallory_founding.cloud, [mallory_founding], now=NOW)
    fake_host = PairingHost(MALLORY)
    fake_code = fake_host.open(mallory_ms, now=NOW, entropy=entropy_from("mallory"))
    assert fake_code != code
    phone = PairingJoiner(PHONE, code, peer=MALLORY.hashname, entropy=ENT)
    m1 = cbor2.loads(phone.start())
    m1["np"] = int(fake_code.split("-")[0])  # say it reached Mallory's open nameplate
    s1 = fake_host.receive(PHONE.hashname, cbor2.dumps(m1), membership=mallory_ms, now=NOW,
                           entropy=ENT)
    j1 = phone.receive(s1.reply, now=NOW)
    assert j1.done and j1.joined is None and "code was wrong" in j1.error
    assert j1.reply is None  # the phone never confirms to Mallory
    # ...and Mallory's one guess at the home box fails and burns the real code
    guess = PairingJoiner(MALLORY, other_code(code), peer=HOME.hashname, entropy=ENT)
    _, hs, gs = run(host, guess, peer_at_host=MALLORY.hashname)
    assert hs.grant is None and gs.joined is None and host.nameplate(NOW) is None


def test_relaying_mitm_that_knows_the_code_is_caught_by_the_transcript():
    # Worst case: Mallory knows the code (shoulder surfing) and sits between the phone and
    # the home box, relaying. Each link authenticates a different pair of hashnames.
    host, code = open_host()
    phone = PairingJoiner(PHONE, code, peer=MALLORY.hashname, entropy=ENT)  # linked to Mallory
    m1 = phone.start()
    # (a) relay unchanged: the home box sees Mallory's link carrying the phone's keys
    s1 = host.receive(MALLORY.hashname, m1, membership=MS, now=NOW, entropy=ENT)
    assert s1.done and s1.grant is None and "another endpoint" in s1.error
    # (b) swap in Mallory's own keys but keep the phone's SPAKE2 message
    host2, code2 = open_host()
    phone2 = PairingJoiner(PHONE, code2, peer=MALLORY.hashname, entropy=ENT)
    msg = cbor2.loads(phone2.start())
    msg["a"], msg["k"] = MALLORY.cs3a_public, MALLORY.verify_key
    s2 = host2.receive(MALLORY.hashname, cbor2.dumps(msg), membership=MS, now=NOW, entropy=ENT)
    assert s2.reply is not None and not s2.done
    j2 = phone2.receive(s2.reply, now=NOW)  # the phone's transcript names other hashnames
    assert j2.joined is None and "code was wrong, or another device is in the middle" in j2.error
    assert j2.reply is None  # the phone never confirms, so the home box never grants
    # (c) the same relay with the right hashnames on both sides works: binding is the cause
    host3, code3 = open_host()
    direct = PairingJoiner(PHONE, code3, peer=HOME.hashname, entropy=ENT)
    _, hs3, js3 = run(host3, direct)
    assert hs3.grant is not None and js3.joined is not None


def test_other_nameplate_is_refused_without_burning():
    host, code = open_host()
    number = int(code.split("-")[0])
    other = f"{number % 99 + 1}-" + "-".join(code.split("-")[1:])
    s = host.receive(PHONE.hashname, PairingJoiner(PHONE, other, peer=HOME.hashname,
                                                   entropy=ENT).start(),
                     membership=MS, now=NOW, entropy=ENT)
    assert s.grant is None and "not showing pairing code number" in s.error
    assert host.nameplate(NOW) == number  # still open for the right device
    _, hs, js = run(host, PairingJoiner(PHONE, code, peer=HOME.hashname, entropy=ENT))
    assert js.joined is not None


def test_expired_code_is_closed():
    host = PairingHost(HOME)
    code = host.open(MS, now=NOW, entropy=ENT, ttl=60)
    assert host.nameplate(NOW + 59) is not None
    _, hs, js = run(host, PairingJoiner(PHONE, code, peer=HOME.hashname, entropy=ENT),
                    now=NOW + 60)
    assert hs.grant is None and "no pairing code open" in js.error


def test_a_late_confirmation_is_refused():
    host = PairingHost(HOME)
    code = host.open(MS, now=NOW, entropy=ENT, ttl=60)
    joiner = PairingJoiner(PHONE, code, peer=HOME.hashname, entropy=ENT)
    s1 = host.receive(PHONE.hashname, joiner.start(), membership=MS, now=NOW + 10, entropy=ENT)
    j1 = joiner.receive(s1.reply, now=NOW + 10)
    assert j1.reply is not None  # the right code: the joiner confirms...
    s2 = host.receive(PHONE.hashname, j1.reply, membership=MS, now=NOW + 61, entropy=ENT)
    assert s2.grant is None and "no pairing in progress" in s2.error  # ...too late


def test_only_admins_open_codes():
    ms = MS.with_records([MS.grant(HOME, subject_key=PHONE.cs3a_public,
                                   subject_verify_key=PHONE.verify_key, role="device",
                                   rights={"*": ["read"]}, entropy=ENT)])
    with pytest.raises(LocalProtocolError, match="only an admin"):
        PairingHost(PHONE).open(ms, now=NOW, entropy=ENT)


def test_codes_and_words():
    assert len(WORDS) == 256 and len(set(WORDS)) == 256 and list(WORDS) == sorted(WORDS)
    assert all(w.isascii() and w.isalpha() and w.islower() and 2 <= len(w) <= 6 for w in WORDS)
    code = make_code(entropy_from("code"))
    number, *words = code.split("-")
    assert 1 <= int(number) <= pr.MAX_NAMEPLATE and len(words) == pr.CODE_WORDS
    assert parse_code(code.upper()) == (int(number), code)
    for bad, why in [("maple-otter-drum", "a number and"), ("0-maple-otter-drum", "1..99"),
                     ("5-maple-otter-xylophone", "not a pairing word"), ("x" * 100, "too long")]:
        with pytest.raises(JoinFailed, match=why):
            parse_code(bad)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_raises(junk):
    host, code = open_host()
    step = host.receive(PHONE.hashname, junk, membership=MS, now=NOW, entropy=ENT)
    assert step.grant is None
    joiner = PairingJoiner(PHONE, code, peer=HOME.hashname, entropy=ENT)
    joiner.start()
    step2 = joiner.receive(junk, now=NOW)
    assert step2.joined is None and step2.done


def test_pair_channel_framing_and_routing():
    from p2pcloud.cloud._join import MAX_MESSAGE, FrameReader, frame, message_type

    joiner = PairingJoiner(PHONE, "5-oak-kettle-clown", peer=HOME.hashname, entropy=ENT)
    first = joiner.start()
    stream = frame(first) + frame(b"\xff") + frame(b"")
    reader = FrameReader()
    got = []
    for i in range(0, len(stream), 7):  # arbitrary chunking, as a byte stream delivers it
        got += reader.feed(stream[i:i + 7])
    assert got == [first, b"\xff", b""]
    assert [message_type(m) for m in got] == ["pake", None, None]
    with pytest.raises(JoinFailed, match="oversized"):
        FrameReader().feed((MAX_MESSAGE + 1).to_bytes(4, "big"))
    with pytest.raises(LocalProtocolError):
        frame(bytes(MAX_MESSAGE + 1))
