"""Replication policy stored in the cloud sub-cloud (p2pcloud.cloud.policy)."""

from __future__ import annotations

import pytest

from p2pcloud import _core
from p2pcloud._ids import SubCloudId
from p2pcloud.cloud import policy as pol
from p2pcloud.cloud.grants import found_cloud
from p2pcloud.cloud.membership import Membership, cloud_subcloud_id
from p2pcloud.cloud.policy import ReplicationPolicy
from p2pcloud.errors import LocalProtocolError
from p2pcloud.sync.envelope import replica_id_for
from tests.cloud.helpers import NOW, entropy_from, identity

HOME = identity("policy home")
PHONE = identity("policy phone")
TV = identity("policy tv")
OUTSIDER = identity("policy outsider")
ENT = entropy_from("policy")
FOUNDING = found_cloud(HOME, now=NOW - 60, entropy=ENT)
CS = cloud_subcloud_id(FOUNDING.cloud)
PHOTOS = SubCloudId(b"\x10" * 16)
SCALE = SubCloudId(b"\x20" * 16)
MS0 = Membership(FOUNDING.cloud, [FOUNDING], now=NOW)
MS = MS0.with_records([
    MS0.grant(HOME, subject_key=PHONE.cs3a_public, subject_verify_key=PHONE.verify_key,
              role="device", rights={"*": ["read", "write"]}, entropy=ENT),
    MS0.grant(HOME, subject_key=TV.cs3a_public, subject_verify_key=TV.verify_key,
              role="thing", rights={SCALE: ["read"]}, entropy=ENT),
])


def replica_with(entries, who=HOME):
    replica = _core.Replica(replica_id_for(CS, who.hashname))
    replica.begin(NOW * 1000)
    for member, subcloud, mode in entries:
        pol.set_policy(replica, member, subcloud, mode)
    replica.commit()
    return replica


def test_defaults_are_full_within_rights():
    policy = ReplicationPolicy.from_replica(replica_with([]), MS)
    assert policy.keeps_full(PHOTOS, PHONE.hashname) and policy.should_send(PHOTOS, HOME.hashname)
    # rights bound everything: the tv may read only the scale, the outsider nothing
    assert not policy.should_send(PHOTOS, TV.hashname) and policy.should_send(SCALE, TV.hashname)
    assert not policy.should_send(PHOTOS, OUTSIDER.hashname)
    assert policy.full_holders(PHOTOS) == sorted([HOME.hashname, PHONE.hashname])


def test_most_specific_entry_wins():
    replica = replica_with([
        ("*", "*", pol.MODE_ON_DEMAND),  # everyone: keep what you open
        (HOME.hashname, "*", pol.MODE_FULL),  # the home box keeps everything
        ("*", SCALE, pol.MODE_FULL),  # everybody keeps the scale's readings
        (PHONE.hashname, SCALE, pol.MODE_HIDDEN),  # ...but not the phone
    ])
    policy = ReplicationPolicy.from_replica(replica, MS)
    assert policy.mode(PHOTOS, PHONE.hashname) == pol.MODE_ON_DEMAND
    assert policy.fetches_on_read(PHOTOS, PHONE.hashname)
    assert not policy.keeps_full(PHOTOS, PHONE.hashname)
    assert policy.should_send(PHOTOS, PHONE.hashname)
    assert policy.keeps_full(PHOTOS, HOME.hashname)
    assert policy.keeps_full(SCALE, TV.hashname)
    assert policy.mode(SCALE, PHONE.hashname) == pol.MODE_HIDDEN
    assert not policy.should_send(SCALE, PHONE.hashname)
    assert not policy.fetches_on_read(SCALE, PHONE.hashname)
    assert policy.full_holders(SCALE) == sorted([HOME.hashname, TV.hashname])


def test_the_cloud_subcloud_cannot_be_hidden():
    policy = ReplicationPolicy.from_replica(
        replica_with([(PHONE.hashname, "*", pol.MODE_HIDDEN), (PHONE.hashname, CS, "hidden")]),
        MS)
    assert policy.keeps_full(CS, PHONE.hashname) and not policy.should_send(PHOTOS,
                                                                             PHONE.hashname)
    assert not policy.should_send(CS, OUTSIDER.hashname)


def test_policy_replicates_and_merges():
    home = replica_with([(PHONE.hashname, PHOTOS, pol.MODE_ON_DEMAND)])
    delta_home = home.encode_since({})
    laptop = _core.Replica(replica_id_for(CS, PHONE.hashname))
    laptop.begin(NOW * 1000 + 5)  # a later, concurrent change by another admin
    pol.set_policy(laptop, PHONE.hashname, PHOTOS, pol.MODE_HIDDEN)
    delta_laptop = laptop.commit()
    home.apply([delta_laptop], NOW * 1000 + 10)
    laptop.apply([delta_home], NOW * 1000 + 10)
    a = ReplicationPolicy.from_replica(home, MS)
    b = ReplicationPolicy.from_replica(laptop, MS)
    assert a.entries == b.entries
    assert a.mode(PHOTOS, PHONE.hashname) == pol.MODE_HIDDEN  # the later write wins
    home.begin(NOW * 1000 + 20)
    pol.clear_policy(home, PHONE.hashname, PHOTOS)
    home.commit()
    assert ReplicationPolicy.from_replica(home, MS).mode(PHOTOS, PHONE.hashname) == "full"


def test_bad_entries_are_refused_or_skipped():
    replica = _core.Replica(replica_id_for(CS, HOME.hashname))
    replica.begin(NOW * 1000)
    with pytest.raises(LocalProtocolError):
        pol.set_policy(replica, PHONE.hashname, PHOTOS, "sometimes")
    with pytest.raises(LocalProtocolError):
        pol.set_policy(replica, "not-a-hashname", PHOTOS, pol.MODE_FULL)
    with pytest.raises(LocalProtocolError):
        pol.set_policy(replica, PHONE.hashname, b"short", pol.MODE_FULL)
    # what a newer version (or junk) wrote is skipped, not misread
    replica.set(pol.COLL_POLICY, PHONE.hashname, "*", "archive")
    replica.set(pol.COLL_POLICY, "junk", "*", pol.MODE_HIDDEN)
    replica.set(pol.COLL_POLICY, PHONE.hashname, "zz", pol.MODE_HIDDEN)
    replica.set(pol.COLL_POLICY, "*", "*", pol.MODE_ON_DEMAND)
    replica.commit()
    assert pol.read_policy(replica) == {("*", "*"): pol.MODE_ON_DEMAND}
