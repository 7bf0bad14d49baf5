"""LAN discovery over real multicast DNS on the loopback interface, under Trio."""

from __future__ import annotations

import pytest
import trio
from zeroconf import ServiceInfo

from p2pcloud._node.discovery import (
    SERVICE_TYPE,
    PeerDiscovered,
    PeerLost,
    _parse_info,
    open_discovery,
)
from p2pcloud._wire import b32encode
from p2pcloud.errors import LocalProtocolError
from tests.cloud.helpers import identity

LOOPBACK = ["127.0.0.1"]
# A safety net so a broken network fails the test instead of hanging it; not a timing claim.
GIVE_UP = 60


async def next_about(discovery, hashname, kind, *, pairing="any"):
    """The next event of ``kind`` about ``hashname`` (other nodes on the host may appear)."""
    async for event in discovery:
        if isinstance(event, PeerLost) and kind is PeerLost and event.hashname == hashname:
            return event
        if (isinstance(event, PeerDiscovered) and kind is PeerDiscovered
                and event.peer.hashname == hashname
                and (pairing == "any" or event.peer.pairing == pairing)):
            return event
    raise AssertionError("discovery closed first")


async def test_two_nodes_find_each_other_on_loopback():
    alice, bob = identity("discovery alice"), identity("discovery bob")
    with trio.fail_after(GIVE_UP):
        async with open_discovery(alice, 40001, interfaces=LOOPBACK) as da:
            async with open_discovery(bob, 40002, interfaces=LOOPBACK) as db:
                seen_by_a = (await next_about(da, bob.hashname, PeerDiscovered)).peer
                seen_by_b = (await next_about(db, alice.hashname, PeerDiscovered)).peer
                assert seen_by_a.keys == {"3a": bob.cs3a_public}
                assert seen_by_a.port == 40002 and seen_by_a.addresses == ("127.0.0.1",)
                assert seen_by_a.paths() == [{"type": "udp4", "ip": "127.0.0.1", "port": 40002}]
                assert seen_by_b.port == 40001 and seen_by_b.pairing is None
                assert da.peers[bob.hashname] == seen_by_a
                assert alice.hashname not in da.peers  # never ourselves

                # a short-code pairing opens on bob: alice sees the flag and the nameplate
                await db.set_pairing(42)
                flagged = await next_about(da, bob.hashname, PeerDiscovered, pairing=42)
                assert flagged.updated and da.peers[bob.hashname].pairing == 42
                await db.set_pairing(None)
                cleared = await next_about(da, bob.hashname, PeerDiscovered, pairing=None)
                assert cleared.peer.pairing is None
            # bob left: its goodbye removes it from alice's view
            await next_about(da, bob.hashname, PeerLost)
            assert bob.hashname not in da.peers
            assert da.statistics()["found"] >= 1 and da.statistics()["lost"] >= 1


async def test_pairing_flag_from_the_start_and_bad_arguments():
    carol, dave = identity("discovery carol"), identity("discovery dave")
    with pytest.raises(LocalProtocolError, match="port 0"):
        async with open_discovery(carol, 0, interfaces=LOOPBACK):
            raise AssertionError("not reached")
    with pytest.raises(LocalProtocolError, match="nameplate"):
        async with open_discovery(carol, 40003, interfaces=LOOPBACK, pairing=100):
            raise AssertionError("not reached")
    with trio.fail_after(GIVE_UP):
        async with (
            open_discovery(carol, 40003, interfaces=LOOPBACK, pairing=7) as dc,
            open_discovery(dave, 40004, interfaces=LOOPBACK) as dd,
        ):
            peer = await dd.wait_peer(carol.hashname)
            assert peer.pairing == 7 and dc.pairing == 7
            with pytest.raises(LocalProtocolError):
                await dc.set_pairing(0)


def _info(props, addresses=(b"\x7f\x00\x00\x01",), port=4242):
    return ServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", addresses=list(addresses), port=port,
                       properties=props, server="x.local.")


def test_records_from_the_network_are_checked():
    erin, frank = identity("discovery erin"), identity("discovery frank")
    good = {b"v": b"1", b"hn": erin.hashname.encode(), b"s": b"0",
            b"3a": b32encode(erin.cs3a_public).encode()}
    peer, _ = _parse_info(_info(good))
    assert peer is not None and peer.hashname == erin.hashname and peer.pairing is None
    assert _parse_info(_info({**good, b"pair": b"17"}))[0].pairing == 17
    cases = {
        "hashname does not match key": {**good, b"3a": b32encode(frank.cs3a_public).encode()},
        "unknown record version": {**good, b"v": b"2"},
        "record without hashname or key": {b"v": b"1", b"hn": erin.hashname.encode()},
        "malformed key": {**good, b"3a": b"!!!"},
        "malformed pairing flag": {**good, b"pair": b"100"},
    }
    for reason, props in cases.items():
        assert _parse_info(_info(props)) == (None, reason)
    assert _parse_info(_info(good, addresses=()))[1] == "record without address or port"
