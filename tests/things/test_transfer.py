"""Handing a thing on: whole or partial history, old owner's access ends, tag still works."""

from __future__ import annotations

import dataclasses

import pytest

from p2pcloud._core import BlobRef, Replica
from p2pcloud._crypto import LocalIdentity
from p2pcloud._ids import Hashname
from p2pcloud.errors import ThingError, TransferError
from p2pcloud.sync.envelope import open_envelope, replica_id_for, seal
from p2pcloud.things import rules as r
from p2pcloud.things import scan as s
from p2pcloud.things import tags as tg
from p2pcloud.things import thing as t
from p2pcloud.things import transfer as x
from tests.things.helpers import NOW, Cloud, SeededEntropy, make_cloud, make_thing

FINDER = LocalIdentity.generate(SeededEntropy("finder")).hashname


def lived_in_thing(cloud: Cloud) -> tuple[t.NewThing, Replica, tg.Tag]:
    """A claimed thing with notes, files, readings, inbox, card and a rule."""
    new, replica, _ = make_thing(cloud)
    me = cloud.devices[0].hashname
    tag, _e, _d = s.claim_here(replica, new.claim_secret, me=me, my_cloud=cloud.id,
                               entropy=SeededEntropy("c"), now_ms=NOW + 1)
    t.add_note(replica, "bought 2024", now_ms=NOW + 2)
    t.add_file(replica, "manual", name="manual.pdf", kind="manual",
               blob=BlobRef(b"\x02" * 32, 99), now_ms=NOW + 3)
    for i in range(3):
        t.add_reading(replica, 70 + i, unit="kg", by=me, entropy=SeededEntropy(f"r{i}"),
                      now_ms=NOW + 4 + i)
    t.set_card(replica, {"if found": "call 555"}, now_ms=NOW + 8)
    s.serve_request(replica, s.message_request(tag, "found it"), requester=FINDER, me=me,
                    thing_identity=None, entropy=SeededEntropy("m"), now_ms=NOW + 9)
    r.add_rule(replica, "on scanned do notify_owner", entropy=SeededEntropy("rule"),
               now_ms=NOW + 10)
    return new, replica, tag


def hand_over(old: Replica, seller: Cloud, buyer: Cloud, scope: list[str] | None = None
              ) -> tuple[x.TransferPackage, x.AcceptedThing]:
    identity = t.open_thing_key(old, seller.devices[0])
    package = x.prepare_transfer(old, identity, to_cloud=buyer.id, members=buyer.members,
                                 scope=scope, entropy=SeededEntropy("move"), now_ms=NOW + 100)
    accepted = x.accept_transfer(package.encode(), me=buyer.devices[0], my_cloud=buyer.id,
                                 expect_thing=identity.hashname, now_ms=NOW + 101)
    x.end_access(old, package.record, now_ms=NOW + 102)
    return package, accepted


def test_whole_history_moves() -> None:
    seller, buyer = make_cloud("seller"), make_cloud("buyer")
    _new, old, _tag = lived_in_thing(seller)
    # A scan after the rule was made: handled in the seller's cloud, never again in the buyer's.
    s.open_thing(old, me=seller.devices[0].hashname, entropy=SeededEntropy("o"), now_ms=NOW + 50)
    before = {name: [v for _h, _r, v in old.log(name)] for name in old.logs()}
    docs = {c: {d: old.document(c, d) for d in old.documents(c)}
            for c in (t.PROFILE, t.NOTES, t.FILES, t.CARD, t.RULES)}
    _pkg, accepted = hand_over(old, seller, buyer)
    new = accepted.replica
    for name in (t.READINGS, t.EVENTS, t.INBOX):
        assert [v for _h, _r, v in new.log(name)] == before[name], name
    for coll, content in docs.items():
        if coll != t.RULES:
            assert {d: new.document(coll, d) for d in new.documents(coll)} == content, coll
    assert new.documents(t.RULES) == list(docs[t.RULES])
    assert new.get(t.NOTES, "notes", "text") == "bought 2024"
    assert set(new.documents(t.KEYS)) == set(buyer.members)
    moved_rule = r.load_rules(new)[0][0]
    assert moved_rule.text == "on scanned do notify_owner"
    # Old events do not fire the moved rules again in the new cloud.
    assert moved_rule.created_ms == accepted.record.at_ms
    runner = r.RuleRunner(buyer.devices[0].hashname, [buyer.devices[0].hashname],
                          started_ms=NOW + 1000)
    runner.observe(new, NOW + 1000)
    assert runner.due(new, NOW + 10 * r.TAKEOVER_MS) == []
    # Both clouds keep the signed record.
    assert x.transfer_records(new) == [accepted.record]
    assert x.transfer_records(old) == [accepted.record]


def test_a_chosen_part_moves() -> None:
    seller, buyer = make_cloud("seller"), make_cloud("buyer")
    _new, old, _tag = lived_in_thing(seller)
    _pkg, accepted = hand_over(old, seller, buyer, scope=[t.READINGS, t.FILES])
    new = accepted.replica
    assert accepted.record.scope == (t.PROFILE, t.READINGS, t.FILES)
    assert len(new.log(t.READINGS)) == 3 and new.documents(t.FILES) == ["manual"]
    assert new.log(t.INBOX) == [] and new.log(t.EVENTS) == []
    assert new.get(t.NOTES, "notes", "text") is None and t.card(new) == {}
    assert t.thing_info(new).name == "bike"  # the profile always moves
    with pytest.raises(TransferError, match="cannot transfer"):
        x.prepare_transfer(new, accepted.identity, to_cloud=seller.id, members=seller.members,
                           scope=[t.KEYS], entropy=SeededEntropy("z"), now_ms=NOW)


def test_old_owner_access_ends() -> None:
    seller, buyer = make_cloud("seller"), make_cloud("buyer")
    _new, old, tag = lived_in_thing(seller)
    identity = t.open_thing_key(old, seller.devices[0])
    _pkg, accepted = hand_over(old, seller, buyer)
    info = t.thing_info(old)
    assert info.ended and t.list_things([old]) == []
    assert len(t.list_things([old], include_ended=True)) == 1
    assert x.access_ended(old, seller.id) and x.access_ended(accepted.replica, seller.id)
    assert not x.access_ended(accepted.replica, buyer.id)
    with pytest.raises(ThingError):
        t.open_thing_key(old, seller.devices[0])  # seals removed from the old sub-cloud
    with pytest.raises(ThingError):
        t.open_thing_key(accepted.replica, seller.devices[0])  # never sealed to the seller
    # The old sub-cloud no longer answers finders or claims.
    served = s.serve_request(old, s.card_request(tag), requester=FINDER,
                             me=seller.devices[0].hashname, thing_identity=identity,
                             entropy=SeededEntropy("q"), now_ms=NOW + 200)
    assert s.decode_response(served.response)["err"] == s.REFUSE_MOVED
    with pytest.raises(TransferError, match="already handed on"):
        x.prepare_transfer(old, identity, to_cloud=seller.id, members=seller.members,
                           entropy=SeededEntropy("z"), now_ms=NOW + 300)
    # The new sub-cloud is another sub-cloud: the old owner's devices are not its members.
    assert accepted.record.new_subcloud != accepted.record.old_subcloud


def test_tag_still_resolves_and_finder_capability_rotates() -> None:
    seller, buyer = make_cloud("seller"), make_cloud("buyer")
    _new, old, tag = lived_in_thing(seller)
    _pkg, accepted = hand_over(old, seller, buyer)
    new = accepted.replica
    # The printed tag names the same thing: the new owner's scan opens it.
    assert t.thing_info(new).hashname == tag.hashname
    assert s.decide_scan(tag, holder=new, my_cloud=buyer.id).action == s.SCAN_OPEN
    assert s.decide_scan(tag, holder=old, my_cloud=seller.id).action == s.SCAN_FINDER
    # The old finder capability is rotated out; the new tag's works.
    me = buyer.devices[0].hashname
    stale = s.serve_request(new, s.card_request(tag), requester=FINDER, me=me,
                            thing_identity=accepted.identity, entropy=SeededEntropy("a"),
                            now_ms=NOW + 200)
    assert s.decode_response(stale.response)["err"] == s.REFUSE_BAD_CAP
    new_tag = s.current_tag(new)
    assert new_tag.hashname == tag.hashname and new_tag.secret == accepted.finder_cap
    fresh_view = s.serve_request(new, s.card_request(new_tag), requester=FINDER, me=me,
                                 thing_identity=accepted.identity, entropy=SeededEntropy("b"),
                                 now_ms=NOW + 201)
    assert s.decode_response(fresh_view.response)["card"] == {"if found": "call 555"}


def test_new_owner_can_hand_it_on_again() -> None:
    a, b, c = make_cloud("a"), make_cloud("b"), make_cloud("c")
    _new, old, _tag = lived_in_thing(a)
    _p1, at_b = hand_over(old, a, b)
    _p2, at_c = hand_over(at_b.replica, b, c)
    assert [rec.to_cloud for rec in x.transfer_records(at_c.replica)] == [b.id, c.id]
    assert x.access_ended(at_c.replica, a.id) and x.access_ended(at_c.replica, b.id)
    assert not x.access_ended(at_c.replica, c.id)
    assert len(at_c.replica.log(t.READINGS)) == 3


def package(seller: Cloud, buyer: Cloud) -> tuple[x.TransferPackage, Hashname]:
    _new, old, _tag = lived_in_thing(seller)
    identity = t.open_thing_key(old, seller.devices[0])
    return x.prepare_transfer(old, identity, to_cloud=buyer.id, members=buyer.members,
                              entropy=SeededEntropy("move"), now_ms=NOW + 100), identity.hashname


def test_packages_that_do_not_verify() -> None:
    seller, buyer, other = make_cloud("seller"), make_cloud("buyer"), make_cloud("other")
    pkg, thing_hn = package(seller, buyer)
    me = buyer.devices[0]

    def accept(p: x.TransferPackage | bytes, **kw: object) -> None:
        args: dict[str, object] = {"me": me, "my_cloud": buyer.id, "now_ms": NOW + 101}
        args.update(kw)
        x.accept_transfer(p, **args)  # type: ignore[arg-type]

    accept(pkg)  # the untouched package is fine
    env = bytearray(pkg.envelopes[0])
    env[-70] ^= 1  # inside the delta, just before the signature
    with pytest.raises(TransferError, match="does not verify"):
        accept(dataclasses.replace(pkg, envelopes=(bytes(env),)))
    with pytest.raises(TransferError, match="not the one the thing signed"):
        accept(dataclasses.replace(pkg, envelopes=pkg.envelopes * 2))
    # A delta sealed by someone else (the seller's device) for the new sub-cloud.
    intruder = seller.devices[0]
    stray = Replica(replica_id_for(pkg.record.new_subcloud, intruder.hashname))
    stray.begin(NOW)
    stray.set(t.CARD, "card", "fields", {"owner": "still me"})
    forged = seal(intruder, pkg.record.new_subcloud, stray.commit()).raw
    with pytest.raises(TransferError, match="no write rights"):
        accept(dataclasses.replace(pkg, envelopes=(*pkg.envelopes, forged)))
    with pytest.raises(TransferError, match="another cloud"):
        accept(pkg, my_cloud=other.id)
    with pytest.raises(TransferError, match="not signed by the thing"):
        accept(dataclasses.replace(pkg, record=dataclasses.replace(pkg.record,
                                                                   to_cloud=other.id)))
    with pytest.raises(TransferError, match="another thing"):
        accept(pkg, expect_thing=other.devices[0].hashname)
    with pytest.raises(TransferError, match="not sealed to this device"):
        accept(pkg, me=other.devices[0])
    for garbage in (b"", b"\xff" * 10, b"\xa0", pkg.encode()[:-3]):
        with pytest.raises(TransferError):
            accept(garbage)
    assert thing_hn == pkg.record.thing


def test_a_long_history_moves_in_several_signed_deltas_that_sync_like_any_other() -> None:
    seller, buyer = make_cloud("seller"), make_cloud("buyer", 2)
    _new, old, _tag = lived_in_thing(seller)
    old.begin(NOW + 20)
    for i in range(6000):  # about 1.6 MB of readings: more than one transaction's budget
        old.append(t.READINGS, {"value": i, "unit": "kg", "kind": "w" * 200, "at_ms": i})
    old.commit()
    pkg, accepted = hand_over(old, seller, buyer)
    assert len(pkg.envelopes) >= 2
    assert len(accepted.replica.log(t.READINGS)) == 6003
    # Another device of the buyer's cloud gets the same state from the stored envelopes.
    thing_hn = accepted.record.thing
    second = buyer.devices[1]
    replica = Replica(replica_id_for(accepted.record.new_subcloud, second.hashname))
    envs = [open_envelope(raw, lambda sc, hn: hn == thing_hn) for raw in accepted.envelopes]
    replica.apply([e.delta for e in envs], NOW + 200)
    replica.apply([accepted.delta], NOW + 200)
    assert replica.encode_snapshot() == accepted.replica.encode_snapshot()
    assert t.open_thing_key(replica, second).hashname == thing_hn
