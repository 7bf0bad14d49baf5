"""Thing creation, the digital-twin layout, listing helpers and the sealed thing key."""

from __future__ import annotations

import nacl.public
import pytest

from p2pcloud._core import BlobRef
from p2pcloud._crypto import LocalIdentity
from p2pcloud.errors import ThingError
from p2pcloud.things import thing as t
from p2pcloud.things.rules import rule_hosts
from tests.things.helpers import NOW, SeededEntropy, make_cloud, make_thing, replica_for


def test_new_thing_has_keys_subcloud_and_claim_secret() -> None:
    new = t.new_thing(SeededEntropy("a"))
    assert len(new.subcloud) == t.SUBCLOUD_ID_SIZE
    assert len(new.claim_secret) == t.CLAIM_SECRET_SIZE
    assert new.identity.verify_key is not None
    assert new.hashname == new.identity.hashname
    other = t.new_thing(SeededEntropy("b"))
    assert other.hashname != new.hashname and other.subcloud != new.subcloud


def test_layout_of_a_new_thing() -> None:
    cloud = make_cloud("home")
    new, replica, delta = make_thing(cloud)
    assert delta
    assert replica.document(t.PROFILE, "thing") == {
        "archived": False, "created_ms": NOW, "cs3a": new.identity.cs3a_public,
        "hashname": new.hashname, "make": "Acme", "model": "X1", "name": "bike",
        "serial": "S-1"}
    access = replica.document(t.ACCESS, "access")
    assert access is not None
    assert access["claim_spent"] is False and access["owner_cloud"] == cloud.id
    assert access["claim_hash"] == t.claim_hash(new.claim_secret)
    assert new.claim_secret not in replica.encode_snapshot()  # only its hash is kept
    assert t.card(replica) == {}
    assert set(replica.documents(t.KEYS)) == set(cloud.members)
    # A second replica of the same sub-cloud converges from the delta.
    other = replica_for(new.subcloud, cloud.devices[1])
    other.apply([delta], NOW)
    assert other.encode_snapshot() == replica.encode_snapshot()


def test_notes_files_readings_card() -> None:
    cloud = make_cloud("home")
    _new, replica, _ = make_thing(cloud)
    t.add_note(replica, "oil changed", now_ms=NOW + 1)
    t.add_note(replica, "; chain oiled", now_ms=NOW + 2)
    assert replica.get(t.NOTES, "notes", "text") == "oil changed; chain oiled"
    blob = BlobRef(b"\x01" * 32, 1234)
    t.add_file(replica, "manual", name="manual.pdf", kind="manual", blob=blob,
               mime="application/pdf", now_ms=NOW + 3)
    assert replica.get(t.FILES, "manual", "blob") == blob
    with pytest.raises(ThingError):
        t.add_file(replica, "x", name="x", kind="photo", blob=b"not a ref", now_ms=NOW)
    event, _ = t.add_reading(replica, 81.5, unit="kg", kind="weight",
                             by=cloud.devices[0].hashname, entropy=SeededEntropy("r"),
                             now_ms=NOW + 4)
    readings = [v for _h, _r, v in replica.log(t.READINGS)]
    assert readings == [{"value": 81.5, "unit": "kg", "kind": "weight", "at_ms": NOW + 4,
                         "event": event["id"]}]
    assert replica.log(t.EVENTS)[-1][2] == event and event["type"] == "reading_added"
    with pytest.raises(ThingError):
        t.add_reading(replica, True, by=None, entropy=SeededEntropy("r"), now_ms=NOW)
    t.set_card(replica, {"if found": "call 555 0100"}, now_ms=NOW + 5)
    assert t.card(replica) == {"if found": "call 555 0100"}
    with pytest.raises(ThingError):
        t.set_card(replica, {str(i): "x" for i in range(t.MAX_CARD_FIELDS + 1)}, now_ms=NOW)
    with pytest.raises(ThingError):
        t.set_card(replica, {"a": "x" * (t.MAX_CARD_VALUE + 1)}, now_ms=NOW)


def test_list_rename_archive() -> None:
    cloud = make_cloud("home")
    _a, ra, _ = make_thing(cloud, name="scale")
    _b, rb, _ = make_thing(cloud, name="Bike")
    assert [i.name for i in t.list_things([ra, rb])] == ["Bike", "scale"]
    t.rename(ra, "bathroom scale", now_ms=NOW + 1)
    t.set_archived(rb, True, now_ms=NOW + 2)
    assert [i.name for i in t.list_things([ra, rb])] == ["bathroom scale"]
    listed = t.list_things([ra, rb], include_archived=True)
    assert [(i.name, i.archived) for i in listed] == [("bathroom scale", False), ("Bike", True)]
    t.set_archived(rb, False, now_ms=NOW + 3)
    assert len(t.list_things([ra, rb])) == 2
    with pytest.raises(ThingError):
        t.rename(ra, "x" * (t.MAX_NAME + 1), now_ms=NOW)
    assert t.thing_info(ra).name == "bathroom scale"


def test_thing_key_opens_on_every_member_device_and_nowhere_else() -> None:
    cloud = make_cloud("home", 3)
    new, replica, _ = make_thing(cloud)
    for device in cloud.devices:
        opened = t.open_thing_key(replica, device)
        assert opened.hashname == new.hashname and opened.seed == new.identity.seed
    stranger = LocalIdentity.generate(SeededEntropy("stranger"))
    with pytest.raises(ThingError, match="not sealed"):
        t.open_thing_key(replica, stranger)


def test_seal_is_a_libsodium_sealed_box() -> None:
    device = LocalIdentity.generate(SeededEntropy("d"))
    sealed = t.seal_to(device.cs3a_public, b"secret seed", SeededEntropy("e"))
    box = nacl.public.SealedBox(nacl.public.PrivateKey(device.cs3a_secret))
    assert box.decrypt(sealed) == b"secret seed"
    assert t.open_sealed(device, sealed) == b"secret seed"
    with pytest.raises(ThingError):
        t.open_sealed(device, sealed[:-1] + bytes([sealed[-1] ^ 1]))


def test_reseal_when_members_change() -> None:
    cloud = make_cloud("home", 3)
    new, replica, _ = make_thing(cloud)
    leaving, staying = cloud.devices[2], cloud.devices[:2]
    joining = LocalIdentity.generate(SeededEntropy("new phone"))
    members = {d.hashname: d.cs3a_public for d in [*staying, joining]}
    t.reseal_thing_key(replica, new.identity, members, entropy=SeededEntropy("s"),
                       now_ms=NOW + 1)
    assert set(replica.documents(t.KEYS)) == set(members)
    assert t.open_thing_key(replica, joining).hashname == new.hashname
    with pytest.raises(ThingError):
        t.open_thing_key(replica, leaving)


def test_the_key_is_never_sealed_to_nobody() -> None:
    cloud = make_cloud("home", 1)
    new, replica, _ = make_thing(cloud)
    with pytest.raises(ThingError, match="at least one member"):
        t.reseal_thing_key(replica, new.identity, {}, entropy=SeededEntropy("s"),
                           now_ms=NOW + 1)
    assert t.open_thing_key(replica, cloud.devices[0]).hashname == new.hashname
    other = t.new_thing(SeededEntropy("o"))
    with pytest.raises(ThingError, match="at least one member"):
        t.create_layout(replica_for(other.subcloud, cloud.devices[0]), other, cloud=cloud.id,
                        members={}, entropy=SeededEntropy("s"), now_ms=NOW)


def test_sealing_members_from_a_real_membership() -> None:
    from p2pcloud.cloud import grants as g
    from p2pcloud.cloud.membership import Membership

    entropy = SeededEntropy("membership")
    founder, phone, sensor, guest = (LocalIdentity.generate(entropy) for _ in range(4))
    founding = g.found_cloud(founder, now=NOW / 1000, entropy=entropy)
    cloud = founding.cloud
    new = t.new_thing(entropy)

    def grant(who: LocalIdentity, role: str, scope: object) -> g.Grant:
        assert who.verify_key is not None
        return g.issue_grant(founder, cloud, subject_key=who.cs3a_public,
                             subject_verify_key=who.verify_key, role=role,
                             rights={scope: ["read", "write"]},  # type: ignore[dict-item]
                             not_before=int(NOW / 1000), expires=None, entropy=entropy)

    other_subcloud = bytes(16)
    records = [founding, grant(phone, "device", "*"), grant(sensor, "thing", "*"),
               grant(guest, "device", other_subcloud)]
    membership = Membership(cloud, records, now=NOW / 1000 + 1)
    members = t.sealing_members(membership, new.subcloud)
    assert members == {founder.hashname: founder.cs3a_public, phone.hashname: phone.cs3a_public}
    assert rule_hosts(membership, new.subcloud) == sorted([founder.hashname, phone.hashname])
    replica = replica_for(new.subcloud, phone)
    t.create_layout(replica, new, cloud=cloud, members=members, entropy=entropy, now_ms=NOW)
    assert t.open_thing_key(replica, phone).hashname == new.hashname
    with pytest.raises(ThingError):
        t.open_thing_key(replica, guest)


def test_member_key_must_match_hashname() -> None:
    cloud = make_cloud("home", 2)
    new, replica, _ = make_thing(cloud)
    a, b = cloud.devices
    with pytest.raises(ThingError, match="does not match"):
        t.reseal_thing_key(replica, new.identity, {a.hashname: b.cs3a_public},
                           entropy=SeededEntropy("s"), now_ms=NOW + 1)
    assert set(replica.documents(t.KEYS)) == set(cloud.members)  # nothing changed


def test_a_key_sealed_for_another_thing_is_refused() -> None:
    cloud = make_cloud("home", 1)
    _a, ra, _ = make_thing(cloud, name="a")
    b, _rb, _ = make_thing(cloud, name="b")
    device = cloud.devices[0]
    ra.begin(NOW + 1)
    ra.set(t.KEYS, device.hashname, "sealed",
           t.seal_to(device.cs3a_public, b.identity.seed or b"", SeededEntropy("x")))
    ra.commit()
    with pytest.raises(ThingError, match="not this thing's key"):
        t.open_thing_key(ra, device)
