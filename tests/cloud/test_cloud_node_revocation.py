"""Revocation and the chain check on real nodes: links refused, nothing new sent, late writes
refused everywhere (also forwarded by a third device), bad grants rejected end-to-end."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from contextlib import AsyncExitStack

import cbor2
import pytest
import trio

from p2pcloud._core import Replica
from p2pcloud._crypto import LocalIdentity
from p2pcloud._node.node import open_node
from p2pcloud.cloud.grants import issue_grant, record_id_text
from p2pcloud.cloud.membership import (
    REJECT_CYCLE,
    REJECT_EXPIRED,
    REJECT_FORGED,
    REJECT_NOT_ADMIN,
)
from p2pcloud.errors import LocalProtocolError
from p2pcloud.sync import replica_id_for, seal
from tests.cloud.node_helpers import GIVE_UP, field, found_and_join, start_nodes, wait_for

BEYOND = "beyond the revocation cutoff"


def free_port() -> int:
    """A UDP port free right now on 127.0.0.1 (a restarted node comes back on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rejected_late(node) -> bool:
    """Whether the node refused a revoked author's late write: as a delta (its cutoff), or
    inside a snapshot (a relay whose log was folded sends its state as a snapshot)."""
    return any(BEYOND in detail or reason == "snapshot refused"
               for _peer, reason, detail in node.replication.rejections)


async def test_last_admin_cannot_be_revoked_and_a_stranger_is_not_a_member(tmp_path):
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            home, phone = await start_nodes(stack, tmp_path, ["home", "phone"])
            await found_and_join(home, phone)
            with pytest.raises(LocalProtocolError, match="last admin"):
                await home.cloud.revoke(home.hashname)
            with pytest.raises(LocalProtocolError, match="not a member"):
                await home.cloud.revoke(LocalIdentity.generate(os.urandom).hashname)


async def test_revoked_device_is_refused_and_gets_nothing_new(tmp_path):
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            home, phone, laptop = await start_nodes(stack, tmp_path, ["home", "phone", "laptop"])
            await found_and_join(home, phone, laptop)
            phone_dev, home_dev = phone.cloud.device_id, home.cloud.device_id
            await phone.cloud.device.set("notes", "before", "text", "kept")
            await wait_for(lambda: field(home, phone_dev, "notes", "before", "text"))
            await wait_for(lambda: field(laptop, phone_dev, "notes", "before", "text"))
            # the phone and the laptop have linked (through the home box as a router, then
            # directly) and remember each other's paths
            await wait_for(lambda: phone.cloud.remembered_paths(laptop.hashname))

            await home.cloud.revoke(phone.hashname)
            assert home.cloud.membership.is_revoked(phone.hashname)
            await wait_for(lambda: laptop.cloud.membership.is_revoked(phone.hashname))
            await wait_for(lambda: phone.hashname not in home.links
                           and phone.hashname not in laptop.links)
            [view] = [m for m in home.cloud.members() if m.hashname == phone.hashname]
            assert view.revoked and not view.online

            # written after the revocation: the laptop gets it, the phone never does
            await home.cloud.device.set("notes", "after", "text", "secret")
            await wait_for(lambda: field(laptop, home_dev, "notes", "after", "text"))
            # the phone keeps trying to re-link (it does not know it was removed) and every
            # member refuses its handshakes: wait until both have refused one
            await wait_for(lambda: home.statistics().dropped.get("not accepted")
                           and laptop.statistics().dropped.get("not accepted"))
            assert field(phone, home_dev, "notes", "after", "text") is None
            assert phone.hashname not in home.links and phone.hashname not in laptop.links
            # its earlier writes stay
            assert field(home, phone_dev, "notes", "before", "text") == "kept"
            assert field(laptop, phone_dev, "notes", "before", "text") == "kept"


def partition(a, b) -> None:
    """Cut the network between two nodes: each refuses the other's handshakes (the accept
    hook) and drops the link they have."""
    a.accept_filters.append(lambda h, other=b.hashname: h != other)
    b.accept_filters.append(lambda h, other=a.hashname: h != other)
    a.unlink(b.hashname)
    b.unlink(a.hashname)


async def test_late_write_forwarded_by_a_third_device_is_refused(tmp_path):
    """The phone, cut off from the others, writes after its revocation; a relay that has
    not heard of it yet takes the write and forwards it unchanged to the home box and a
    desktop, which both know of the revocation: both refuse it (the cutoffs)."""
    home_port, relay_port, desk_port = free_port(), free_port(), free_port()
    kw = {"tcp_port": None}

    def home_node():
        return open_node(tmp_path / "home", port=home_port, **kw)

    def relay_node():
        return open_node(tmp_path / "relay", port=relay_port, **kw)

    def desk_node():
        return open_node(tmp_path / "desk", port=desk_port, **kw)

    with trio.fail_after(GIVE_UP * 2):
        async with open_node(tmp_path / "phone", port=0, **kw) as phone:
            async with home_node() as home, desk_node() as desk:
                async with relay_node() as relay:
                    await found_and_join(home, phone, relay, desk)
                    phone_dev = phone.cloud.device_id
                    await phone.cloud.device.set("notes", "before", "text", "kept")
                    for node in (home, relay, desk):
                        await wait_for(lambda n=node: field(n, phone_dev, "notes", "before",
                                                            "text"))
                    # the relay has linked everyone directly (it remembers their paths)
                    await wait_for(lambda: all(
                        relay.cloud.remembered_paths(n.hashname) for n in (home, desk, phone)))
                # the relay is away and the phone is cut off while the home box revokes it
                partition(phone, home)
                partition(phone, desk)
                await home.cloud.revoke(phone.hashname)
                await wait_for(lambda: desk.cloud.membership.is_revoked(phone.hashname))
            assert not phone.cloud.membership.is_revoked(phone.hashname)  # never told
            # the phone writes after its revocation; only the relay, which has not heard of
            # it (the others are away now), takes it
            await phone.cloud.device.set("notes", "late", "text", "after revocation")
            async with relay_node() as relay:
                await wait_for(lambda: field(relay, phone_dev, "notes", "late", "text"))
            async with home_node() as home, desk_node() as desk, relay_node() as relay:
                # the relay forwards the late write (unchanged, or folded into a snapshot):
                # refused by both cutoffs
                await wait_for(lambda: rejected_late(home) and rejected_late(desk))
                await wait_for(lambda: relay.cloud.membership.is_revoked(phone.hashname))
                for node in (home, desk):
                    assert field(node, phone_dev, "notes", "before", "text") == "kept"
                    assert field(node, phone_dev, "notes", "late", "text") is None
                # the relay refuses the phone's later deltas from now on too
                assert not relay.cloud.accepts_delta(
                    phone_dev, phone.hashname, replica_id_for(phone_dev, phone.hashname),
                    10_000, 10_000)


def raw_put(replica: Replica, coll: str, doc: str, value: bytes) -> None:
    replica.set(coll, doc, "record", value)


async def test_forged_non_admin_expired_and_cyclic_grants_are_rejected_end_to_end(tmp_path):
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            home, laptop = await start_nodes(stack, tmp_path, ["home", "laptop"])
            cid = await found_and_join(home, laptop)
            strangers = {n: LocalIdentity.from_seed(hashlib.sha256(n.encode()).digest())
                         for n in ("x", "y", "z", "p", "q")}
            now = int(time.time())

            def grant(issuer, subject, role="device", nb=now - 60, ex=None):
                rights = {"*": ["all"]} if role == "admin" else {"*": ["read", "write"]}
                return issue_grant(
                    issuer, cid, subject_key=subject.cs3a_public,
                    subject_verify_key=subject.verify_key, role=role, rights=rights,
                    not_before=nb, expires=ex, entropy=os.urandom)

            # a member that is no admin signs a grant for x
            by_device = grant(laptop.identity, strangers["x"])
            # an admin's grant for y that expired an hour ago
            expired = grant(home.identity, strangers["y"], nb=now - 7200, ex=now - 3600)
            # a grant for z whose signature was tampered with
            good_z = grant(home.identity, strangers["z"])
            outer = cbor2.loads(good_z.raw)
            outer["g"] = bytes([outer["g"][0] ^ 1]) + outer["g"][1:]  # one bit of the signature
            forged = cbor2.dumps(outer, canonical=True)
            # p and q make each other admins: a cycle with no chain to the founder
            p_to_q = grant(strangers["p"], strangers["q"], role="admin")
            q_to_p = grant(strangers["q"], strangers["p"], role="admin")
            # a buggy admin device stores them all in the cloud sub-cloud; every member
            # re-checks every record's chain on its own
            sc = home.cloud.subcloud

            def put_all(replica):
                for rec in (by_device, expired, p_to_q, q_to_p):
                    raw_put(replica, "grants", record_id_text(rec.id), rec.raw)
                raw_put(replica, "grants", record_id_text(good_z.id), bytes(forged))

            await home.replication.write(sc, put_all, [("grants", None, None)])
            want = {REJECT_NOT_ADMIN, REJECT_EXPIRED, REJECT_FORGED, REJECT_CYCLE}
            for node in (home, laptop):
                m = await wait_for(lambda node=node: (m := node.cloud.membership) and want <= {
                    r.reason for r in m.rejected} and m)
                for ident in strangers.values():
                    assert not m.is_member(ident.hashname)
                assert sorted(m.members()) == sorted([home.hashname, laptop.hashname])

            # and x, holding its grant from a non-admin, cannot write a sub-cloud of the cloud
            x = strangers["x"]
            home_dev = home.cloud.device_id
            replica = Replica(replica_id_for(home_dev, x.hashname))
            replica.begin(now * 1000)
            replica.set("notes", "x", "text", "intruder")
            env = seal(x, home_dev, replica.commit())
            await laptop.replication.ingest(home_dev, (env.raw,), x.hashname)
            assert field(laptop, home_dev, "notes", "x", "text") is None
            assert any(peer == x.hashname for peer, _r, _d in laptop.replication.rejections)
            assert not laptop.replication.may_read(home_dev, x.hashname)
