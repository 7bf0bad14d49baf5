"""Scan decisions, claims (once only), owner open, and the finder's allow-list."""

from __future__ import annotations

import random
from typing import Any

import cbor2
import pytest

from p2pcloud._core import Replica
from p2pcloud._crypto import LocalIdentity
from p2pcloud._ids import Hashname
from p2pcloud.errors import ClaimRefused, MalformedPacket, ThingError
from p2pcloud.things import scan as s
from p2pcloud.things import tags as tg
from p2pcloud.things import thing as t
from p2pcloud.things import transfer as x
from tests.things.helpers import NOW, Cloud, SeededEntropy, make_cloud, make_thing

FINDER = LocalIdentity.generate(SeededEntropy("finder")).hashname
SERVER = LocalIdentity.generate(SeededEntropy("serving device")).hashname


def claimed_thing(cloud: Cloud) -> tuple[t.NewThing, Replica, tg.Tag]:
    new, replica, _ = make_thing(cloud)
    tag, _event, _delta = s.claim_here(replica, new.claim_secret, me=cloud.devices[0].hashname,
                                       my_cloud=cloud.id, entropy=SeededEntropy("claim"),
                                       now_ms=NOW + 1)
    t.set_card(replica, {"if found": "call 555 0100"}, now_ms=NOW + 2)
    return new, replica, tag


def serve(replica: Replica, data: bytes, *, requester: str = FINDER,
          thing_identity: LocalIdentity | None = None, now_ms: int = NOW + 10) -> s.Served:
    return s.serve_request(replica, data, requester=Hashname(requester), me=SERVER,
                           thing_identity=thing_identity, entropy=SeededEntropy("serve"),
                           now_ms=now_ms)


# -- decisions --------------------------------------------------------------------------------


def test_decide_scan_matrix() -> None:
    home, other = make_cloud("home"), make_cloud("other")
    new, replica, _ = make_thing(home)
    fresh = tg.fresh_tag(new)
    assert s.decide_scan(fresh, holder=replica, my_cloud=home.id).action == s.SCAN_CLAIM_HERE
    assert s.decide_scan(fresh, holder=None, my_cloud=other.id).action == s.SCAN_CLAIM_REMOTE
    tag, _e, _d = s.claim_here(replica, new.claim_secret, me=home.devices[0].hashname,
                               my_cloud=home.id, entropy=SeededEntropy("c"), now_ms=NOW + 1)
    assert s.decide_scan(tag, holder=replica, my_cloud=home.id).action == s.SCAN_OPEN
    assert s.decide_scan(tag, holder=None, my_cloud=other.id).action == s.SCAN_FINDER
    again = s.decide_scan(fresh, holder=replica, my_cloud=home.id)
    assert again.action == s.SCAN_REFUSED and again.reason == s.REFUSE_SPENT


# -- claims -------------------------------------------------------------------------------------


def test_claim_here_once_then_refused_and_nothing_changes() -> None:
    home = make_cloud("home")
    new, replica, _ = make_thing(home)
    me = home.devices[0].hashname
    with pytest.raises(ClaimRefused) as wrong:
        s.claim_here(replica, b"\x00" * 16, me=me, my_cloud=home.id,
                     entropy=SeededEntropy("c"), now_ms=NOW + 1)
    assert wrong.value.reason == s.REFUSE_BAD_SECRET
    tag, event, delta = s.claim_here(replica, new.claim_secret, me=me, my_cloud=home.id,
                                     entropy=SeededEntropy("c"), now_ms=NOW + 1)
    assert delta and event["type"] == "claimed" and tag.kind == tg.KIND_CLAIMED
    assert tag.hashname == new.hashname and tag.secret != new.claim_secret
    info = t.thing_info(replica)
    assert info.claimed and info.owner_cloud == home.id
    assert s.current_tag(replica) == tag
    before = replica.encode_snapshot()
    with pytest.raises(ClaimRefused, match="already spent") as spent:
        s.claim_here(replica, new.claim_secret, me=me, my_cloud=home.id,
                     entropy=SeededEntropy("c2"), now_ms=NOW + 2)
    assert spent.value.reason == s.REFUSE_SPENT
    assert replica.encode_snapshot() == before


def test_claim_spent_on_one_device_is_spent_on_the_other_after_merge() -> None:
    home = make_cloud("home")
    new, a, layout = make_thing(home)
    from tests.things.helpers import replica_for

    b = replica_for(new.subcloud, home.devices[1])
    b.apply([layout], NOW)
    _tag, _e, delta = s.claim_here(a, new.claim_secret, me=home.devices[0].hashname,
                                   my_cloud=home.id, entropy=SeededEntropy("c"), now_ms=NOW + 1)
    b.apply([delta], NOW + 2)
    with pytest.raises(ClaimRefused):
        s.claim_here(b, new.claim_secret, me=home.devices[1].hashname, my_cloud=home.id,
                     entropy=SeededEntropy("c"), now_ms=NOW + 3)


def test_claim_by_another_cloud_moves_the_thing_and_a_replay_fails() -> None:
    maker, buyer = make_cloud("maker"), make_cloud("buyer", 2)
    new, held, _ = make_thing(maker)
    fresh = tg.fresh_tag(new)
    identity = t.open_thing_key(held, maker.devices[0])
    request = s.claim_request(fresh, cloud=buyer.id, members=buyer.members)
    served = serve(held, request, requester=buyer.devices[0].hashname, thing_identity=identity)
    response = s.decode_response(served.response)
    assert response["ok"] is True and served.record is not None
    assert isinstance(served.events[0], s.ClaimAnswered)
    accepted = x.accept_transfer(response["pkg"], me=buyer.devices[0], my_cloud=buyer.id,
                                 expect_thing=fresh.hashname, now_ms=NOW + 20)
    info = t.thing_info(accepted.replica)
    assert info.owner_cloud == buyer.id and info.claimed and info.name == "bike"
    assert accepted.identity.hashname == new.hashname
    # Both of the buyer's devices can act for the thing; the maker's cannot any more.
    from tests.things.helpers import replica_for

    second = replica_for(served.record.new_subcloud, buyer.devices[1])
    second.apply([accepted.replica.encode_snapshot()], NOW + 21)
    assert t.open_thing_key(second, buyer.devices[1]).hashname == new.hashname
    with pytest.raises(ThingError):
        t.open_thing_key(held, maker.devices[0])
    # The buyer's tag is the claimed tag with the new finder capability.
    assert s.current_tag(accepted.replica).secret == accepted.finder_cap
    # Replaying the claim secret: the holder refuses, and nothing is written.
    before = held.encode_snapshot()
    replay = serve(held, request, requester=FINDER, thing_identity=identity)
    assert s.decode_response(replay.response)["err"] == s.REFUSE_MOVED
    assert replay.delta == b"" and held.encode_snapshot() == before
    # Scanning the fresh tag again in the buyer's cloud: refused as spent.
    again = s.decide_scan(fresh, holder=accepted.replica, my_cloud=buyer.id)
    assert again.action == s.SCAN_REFUSED and again.reason == s.REFUSE_SPENT


def test_only_the_claim_host_answers_claims() -> None:
    maker, buyer = make_cloud("maker", 3), make_cloud("buyer")
    new, held, _ = make_thing(maker)
    hosts = [d.hashname for d in maker.devices]
    host = s.claim_host(new.hashname, hosts)
    assert host in hosts and s.claim_host(new.hashname, list(reversed(hosts))) == host
    identity = t.open_thing_key(held, maker.devices[0])
    request = s.claim_request(tg.fresh_tag(new), cloud=buyer.id, members=buyer.members)
    answers = {}
    for device in maker.devices:
        served = s.serve_request(held.__class__.load(held.encode_snapshot(), b"x" * 16, NOW),
                                 request, requester=buyer.devices[0].hashname,
                                 me=device.hashname, thing_identity=identity,
                                 entropy=SeededEntropy("e"), now_ms=NOW + 5, claim_hosts=hosts)
        answers[device.hashname] = s.decode_response(served.response)
    assert [hn for hn, resp in answers.items() if resp["ok"]] == [host]
    for hn, resp in answers.items():
        if hn != host:
            assert resp["err"] == s.REFUSE_NOT_CLAIM_HOST and resp["detail"] == host


def test_remote_claim_refusals() -> None:
    maker, buyer = make_cloud("maker"), make_cloud("buyer")
    new, held, _ = make_thing(maker)
    identity = t.open_thing_key(held, maker.devices[0])
    before = held.encode_snapshot()
    wrong = tg.Tag("fresh", new.identity.cs3a_public, new.hashname, b"\x01" * 16)
    r = serve(held, s.claim_request(wrong, cloud=buyer.id, members=buyer.members),
              thing_identity=identity)
    assert s.decode_response(r.response)["err"] == s.REFUSE_BAD_SECRET
    good = s.claim_request(tg.fresh_tag(new), cloud=buyer.id, members=buyer.members)
    r = serve(held, good, thing_identity=None)  # this device has not opened the thing key
    assert s.decode_response(r.response)["err"] == s.REFUSE_NO_KEY
    assert held.encode_snapshot() == before
    with pytest.raises(ThingError):
        s.claim_request(tg.claimed_tag(new.identity.cs3a_public, b"\x02" * 16),
                        cloud=buyer.id, members=buyer.members)


# -- owner and finder ---------------------------------------------------------------------------


def test_owner_scan_opens_and_records_an_event() -> None:
    home = make_cloud("home")
    _new, replica, _tag = claimed_thing(home)
    info, event, delta = s.open_thing(replica, me=home.devices[1].hashname,
                                      entropy=SeededEntropy("o"), now_ms=NOW + 5)
    assert info.name == "bike" and delta
    assert event["type"] == "scanned" and event["owner"] is True
    assert replica.log(t.EVENTS)[-1][2] == event


def test_finder_reads_the_card() -> None:
    home = make_cloud("home")
    _new, replica, tag = claimed_thing(home)
    served = serve(replica, s.card_request(tag))
    response = s.decode_response(served.response)
    assert response == {"v": 1, "ok": True, "card": {"if found": "call 555 0100"}}
    assert isinstance(served.events[0], s.CardShown)
    event = replica.log(t.EVENTS)[-1][2]
    assert event["type"] == "scanned" and event["owner"] is False and event["finder"] == FINDER


def test_finder_leaves_a_message_that_lands_in_the_inbox() -> None:
    home = make_cloud("home")
    _new, replica, tag = claimed_thing(home)
    served = serve(replica, s.message_request(tag, "found your bike at the station",
                                              "555 0199"))
    assert s.decode_response(served.response)["ok"] is True and served.delta
    notified = served.events[0]
    assert isinstance(notified, s.MessageReceived) and notified.finder == FINDER
    inbox = [v for _h, _r, v in replica.log(t.INBOX)]
    assert inbox == [{"id": notified.event["id"], "from": FINDER,
                      "text": "found your bike at the station", "contact": "555 0199",
                      "at_ms": NOW + 10}]
    assert replica.log(t.EVENTS)[-1][2]["type"] == "message_received"


def test_finder_message_rate_limit() -> None:
    home = make_cloud("home")
    _new, replica, tag = claimed_thing(home)
    for i in range(s.MAX_MESSAGES_PER_FINDER):
        assert s.decode_response(serve(replica, s.message_request(tag, f"m{i}"),
                                       now_ms=NOW + 10 + i).response)["ok"]
    r = serve(replica, s.message_request(tag, "one more"), now_ms=NOW + 100)
    assert s.decode_response(r.response)["err"] == s.REFUSE_RATE
    later = serve(replica, s.message_request(tag, "next day"), now_ms=NOW + 86_400_100)
    assert s.decode_response(later.response)["ok"]


def test_many_finders_cannot_flood_the_inbox() -> None:
    home = make_cloud("home")
    _new, replica, tag = claimed_thing(home)
    entropy = SeededEntropy("sybils")
    finders = [LocalIdentity.generate(entropy).hashname for _ in range(30)]
    accepted = 0
    for i in range(s.MAX_MESSAGES_PER_DAY + 20):
        served = serve(replica, s.message_request(tag, f"spam {i}"),
                       requester=finders[i % len(finders)], now_ms=NOW + 10 + i)
        accepted += s.decode_response(served.response)["ok"]
    assert accepted == s.MAX_MESSAGES_PER_DAY
    assert len(replica.log(t.INBOX)) == s.MAX_MESSAGES_PER_DAY


def test_card_reads_are_recorded_up_to_a_bound_and_still_shown() -> None:
    home = make_cloud("home")
    _new, replica, tag = claimed_thing(home)
    for i in range(s.MAX_SCAN_EVENTS_PER_FINDER + 5):
        served = serve(replica, s.card_request(tag), now_ms=NOW + 10 + i)
        assert s.decode_response(served.response)["card"] == {"if found": "call 555 0100"}
        assert bool(served.delta) == (i < s.MAX_SCAN_EVENTS_PER_FINDER)
    scans = [v for _h, _r, v in replica.log(t.EVENTS) if v["type"] == "scanned"]
    assert len(scans) == s.MAX_SCAN_EVENTS_PER_FINDER


def raw(**fields: Any) -> bytes:
    return bytes(cbor2.dumps({"v": 1, **fields}))


def refusal_cases(tag: tg.Tag, other_thing: str) -> list[tuple[str, bytes, str]]:
    cap, hn = tag.secret, tag.hashname
    return [
        ("read another collection", raw(op="read", t=hn, cap=cap, coll="notes"),
         s.REFUSE_NOT_ALLOWED),
        ("read the inbox", raw(op="inbox", t=hn, cap=cap), s.REFUSE_NOT_ALLOWED),
        ("card op naming the inbox", raw(op="card", t=hn, cap=cap, coll="inbox"),
         s.REFUSE_FIELD),
        ("list things", raw(op="list", t=hn, cap=cap), s.REFUSE_NOT_ALLOWED),
        ("write the card", raw(op="set_card", t=hn, cap=cap, card={"x": "y"}),
         s.REFUSE_NOT_ALLOWED),
        ("message with a target doc", raw(op="message", t=hn, cap=cap, text="hi", doc="a"),
         s.REFUSE_FIELD),
        ("another thing", raw(op="card", t=other_thing, cap=cap), s.REFUSE_OTHER_THING),
        ("no capability", raw(op="card", t=hn), s.REFUSE_NO_CAP),
        ("wrong capability", raw(op="card", t=hn, cap=b"\x00" * 16), s.REFUSE_BAD_CAP),
        ("message too long", raw(op="message", t=hn, cap=cap, text="x" * 1001),
         s.REFUSE_TOO_LONG),
        ("message not text", raw(op="message", t=hn, cap=cap, text=b"bytes"), s.REFUSE_FIELD),
        ("claim with the finder capability", raw(op="claim", t=hn, secret=cap, cloud=b"c",
                                                 members=[b"\x01" * 32]), s.REFUSE_SPENT),
        ("newer protocol", bytes(cbor2.dumps({"v": 2, "op": "card", "t": hn, "cap": cap})),
         s.REFUSE_VERSION),
        ("not CBOR", b"\xff\x00garbage", s.REFUSE_MALFORMED),
        ("no thing", raw(op="card", cap=cap), s.REFUSE_MALFORMED),
    ]


def test_every_other_finder_request_is_refused_and_changes_nothing() -> None:
    home = make_cloud("home")
    _new, replica, tag = claimed_thing(home)
    other = make_thing(home, name="other")[0].hashname
    for name, data, reason in refusal_cases(tag, other):
        before = replica.encode_snapshot()
        served = serve(replica, data)
        response = s.decode_response(served.response)
        assert response["ok"] is False, name
        assert response["err"] == reason, name
        assert served.delta == b"" and replica.encode_snapshot() == before, name
        assert isinstance(served.events[0], s.RequestRefused), name
        assert served.events[0].reason == reason, name


def test_allow_list_is_exactly_two_operations() -> None:
    assert {"card", "message"} == s.FINDER_OPS
    home = make_cloud("home")
    _new, replica, tag = claimed_thing(home)
    finder_hash = replica.get(t.ACCESS, "access", "finder_hash")
    for op in ("card", "message", "read", "list", "inbox", "events", "readings", "files",
               "notes", "rules", "profile", "keys", "open", "sync", "claim", "transfer"):
        fields = {"v": 1, "op": op, "t": tag.hashname, "cap": tag.secret}
        if op == "message":
            fields["text"] = "hi"
        verdict = s.check_finder_request(s.Request(op, tag.hashname, fields),
                                         thing=tag.hashname, finder_hash=finder_hash)
        assert (verdict is None) == (op in ("card", "message")), op


def test_unclaimed_thing_has_no_public_face() -> None:
    home = make_cloud("home")
    new, replica, _ = make_thing(home)
    probe = tg.claimed_tag(new.identity.cs3a_public, new.claim_secret)
    r = serve(replica, s.card_request(probe))
    assert s.decode_response(r.response)["err"] == s.REFUSE_NOT_CLAIMED


def test_serve_never_raises_on_random_bytes() -> None:
    home = make_cloud("home")
    _new, replica, tag = claimed_thing(home)
    rng = random.Random(11)
    good = s.message_request(tag, "hello")
    before = replica.encode_snapshot()
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 5)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        served = serve(replica, bytes(data))
        response = s.decode_response(served.response)
        if response["ok"]:
            replica_changed = replica.encode_snapshot() != before
            assert replica_changed
            before = replica.encode_snapshot()
    for size in (0, 1, 50, s.MAX_REQUEST_BYTES + 1):
        served = serve(replica, rng.randbytes(size))
        assert s.decode_response(served.response)["ok"] is False


def test_message_helpers_refuse_oversize() -> None:
    home = make_cloud("home")
    _new, _replica, tag = claimed_thing(home)
    with pytest.raises(ThingError):
        s.message_request(tag, "x" * (s.MAX_MESSAGE_TEXT + 1))
    with pytest.raises(MalformedPacket):
        s.decode_request(b"\xa0")  # an empty map: no version
    with pytest.raises(MalformedPacket):
        s.decode_response(raw(ok=False))
