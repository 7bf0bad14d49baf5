"""Routing tests: peer/connect introductions, relaying by token, moving to a direct path.

A router R linked to A and B introduces them (telehash v3 channels/peer.md, connect.md);
the fake network blocks A <-> B until the test opens it.
"""

from __future__ import annotations

import random

import pytest

from p2pcloud._ids import Hashname
from p2pcloud._wire import decloak, decode_packet, encode_packet
from p2pcloud.errors import HandshakeFailed, MalformedPacket
from p2pcloud.proto.events import ChannelData, LinkDown, PacketDropped, PathChanged
from p2pcloud.proto.mesh import HANDSHAKE_TIMEOUT, KEEPALIVE_UDP, LinkState
from p2pcloud.proto.path import Path
from p2pcloud.proto.routing import (
    MAX_RELAY_ENTRIES,
    MAX_RELAY_PER_ENDPOINT,
    RELAY_IDLE_TIMEOUT,
    RelayTable,
)
from tests.proto.fakenet import FakeNetwork, FakeNode


def accept_all(_hn: str) -> bool:
    return True


def up(x: FakeNode, y: FakeNode) -> bool:
    return x.mesh.link_state(y.hashname) is LinkState.UP


def triangle(seed: int, **net_kw: float) -> tuple[FakeNetwork, FakeNode, FakeNode, FakeNode]:
    """R linked to A and B; A and B cannot reach each other directly."""
    net = FakeNetwork(seed, **net_kw)
    r = net.add("r", accept=accept_all)
    a = net.add("a")
    b = net.add("b", accept=accept_all)
    net.block(a.addr, b.addr)
    a.mesh.link(r.keys(), net.now, paths=[r.addr])
    b.mesh.link(r.keys(), net.now, paths=[r.addr])
    net.run_until(lambda: up(a, r) and up(r, a) and up(b, r) and up(r, b), timeout=60)
    return net, r, a, b


def introduce(net: FakeNetwork, r: FakeNode, a: FakeNode, b: FakeNode) -> None:
    # a knows b's keys and its (unreachable) address, and that r can reach it
    a.mesh.link(b.keys(), net.now, paths=[Path.peer(r.hashname), b.addr])
    net.run_until(lambda: up(a, b) and up(b, a), timeout=60)


def send_peer_request(node: FakeNode, router: Hashname, target: str, body: bytes) -> None:
    """Open a raw ``peer`` channel (what a mesh does for a peer-path handshake)."""
    link = node.mesh._links[router]  # test reaches in: the mesh sends these only itself
    assert link.exchange is not None
    cid = link.exchange.next_channel_id()
    node.mesh._send_inner(link, {"c": cid, "type": "peer", "peer": target}, body)


def test_router_introduces_and_relays_only_ciphertext() -> None:
    net, r, a, b = triangle(1)
    relayed: list[bytes] = []
    seen_by_r: list[bytes] = []

    def tap(data: bytes, src: Path, dst: Path) -> None:
        if src == r.addr or dst == r.addr:
            seen_by_r.append(data)
        if src == r.addr and dst in (a.addr, b.addr):
            plain, _ = decloak(data)
            if len(decode_packet(plain).head) == 0:
                relayed.append(plain)

    net.taps.append(tap)
    introduce(net, r, a, b)
    assert a.mesh.link_path(b.hashname) == Path.peer(r.hashname)
    assert b.mesh.link_path(a.hashname) == Path.peer(r.hashname)
    secret = b"a secret only a and b may read " * 4
    cid = a.mesh.open_channel(b.hashname, "test", reliable=True, body=secret, now=net.now)
    net.run_until(lambda: [e for e in b.of(ChannelData) if e.body == secret])
    b.mesh.send(a.hashname, cid, secret[::-1], now=net.now)
    net.run_until(lambda: [e for e in a.of(ChannelData) if e.body == secret[::-1]])
    stats = r.mesh.statistics()
    assert stats.relayed > 0 and stats.relay_entries == 2
    # R saw only ciphertext: the plaintext is in no datagram it received or sent ...
    assert not any(secret[:16] in d or secret[::-1][:16] in d for d in seen_by_r)
    # ... it holds no exchange for the tokens it relays, and none of its keys opens them
    r_tokens = set(r.mesh._by_token)
    relayed_tokens = {p[2:18] for p in relayed}
    assert relayed_tokens and not relayed_tokens & r_tokens
    r_exchanges = [link.exchange for link in r.mesh._links.values() if link.exchange]
    assert len(r_exchanges) == 2  # only its own links to a and b
    opened = 0
    for packet in relayed:
        body = decode_packet(packet).body
        for ex in r_exchanges:
            with pytest.raises((HandshakeFailed, MalformedPacket)):
                ex.decrypt_channel(body)
            opened += 1
    assert opened > 0
    # and R has no link to anything but a and b
    assert set(r.mesh.links()) == {a.hashname, b.hashname}


def test_traffic_moves_to_a_direct_path_once_it_works() -> None:
    net, r, a, b = triangle(2)
    introduce(net, r, a, b)
    cid = a.mesh.open_channel(b.hashname, "test", reliable=True, body=b"via r", now=net.now)
    net.run_until(lambda: [e for e in b.of(ChannelData) if e.body == b"via r"])
    assert r.mesh.statistics().relayed > 0
    # a direct path appears (the NAT between them opens); periodic probes find it
    net.unblock(a.addr, b.addr)
    net.run_until(
        lambda: a.mesh.link_path(b.hashname) == b.addr and b.mesh.link_path(a.hashname) == a.addr,
        timeout=2 * KEEPALIVE_UDP,
    )
    assert [e for e in a.of(PathChanged) if e.path == b.addr][-1].old == Path.peer(r.hashname)
    assert [e for e in b.of(PathChanged) if e.path == a.addr]
    net.settle()
    relayed_before = r.mesh.statistics().relayed
    for i in range(20):
        a.mesh.send(b.hashname, cid, b"direct %d" % i, now=net.now)
    net.run_until(lambda: [e for e in b.of(ChannelData) if e.body == b"direct 19"])
    net.settle()
    assert r.mesh.statistics().relayed == relayed_before, "direct traffic bypasses the router"
    assert not a.of(LinkDown) and not b.of(LinkDown)


def test_relayed_link_survives_loss_and_keepalives() -> None:
    net, r, a, b = triangle(3, loss=0.1, duplicate=0.05, reorder=0.1, delay=0.01, jitter=0.01)
    introduce(net, r, a, b)
    payload = random.Random(3).randbytes(200_000)
    cid = a.mesh.open_channel(b.hashname, "test", reliable=True, now=net.now)
    mb = a.mesh.max_body(b.hashname)
    pos = 0

    def tick() -> None:
        nonlocal pos
        while pos < len(payload) and a.mesh.send_capacity(b.hashname, cid) > 0:
            a.mesh.send(b.hashname, cid, payload[pos : pos + mb], now=net.now)
            pos += mb

    def done() -> bool:
        got = b"".join(e.body for e in b.of(ChannelData) if e.cid == cid)
        return len(got) >= len(payload)

    net.run_until(done, tick=tick, timeout=300)
    assert b"".join(e.body for e in b.of(ChannelData) if e.cid == cid) == payload
    # idle through several keepalive periods: the relayed link stays up
    net.run_for(3 * KEEPALIVE_UDP)
    assert up(a, b) and up(b, a)
    assert not a.of(LinkDown) and not b.of(LinkDown)


def test_link_by_hashname_through_a_router_uses_a_plaintext_intro() -> None:
    net, r, a, b = triangle(4)
    # a knows only b's hashname and a router: it sends its keys, b answers with a handshake
    a.mesh.link(b.hashname, net.now, paths=[Path.peer(r.hashname)])
    assert a.mesh.link_state(b.hashname) is LinkState.UNRESOLVED
    net.run_until(lambda: up(a, b) and up(b, a), timeout=30)
    assert a.mesh.link_key(b.hashname) == b.mesh.identity.cs3a_public
    cid = a.mesh.open_channel(b.hashname, "test", reliable=False, body=b"hi", now=net.now)
    net.run_until(lambda: [e for e in b.of(ChannelData) if e.cid == cid])


def test_intro_to_an_endpoint_that_refuses_strangers_gets_nothing() -> None:
    net = FakeNetwork(5)
    r = net.add("r", accept=accept_all)
    a = net.add("a")
    b = net.add("b")  # default policy
    for x in (a, b):
        x.mesh.link(r.keys(), net.now, paths=[r.addr])
    net.run_until(lambda: up(a, r) and up(b, r) and up(r, a) and up(r, b))
    a.mesh.link(b.keys(), net.now, paths=[Path.peer(r.hashname)])
    net.run_for(HANDSHAKE_TIMEOUT + 1)
    assert not up(a, b) and b.mesh.link_state(a.hashname) is None
    assert b.mesh.statistics().drops.get("not accepted", 0) >= 1
    assert a.of(LinkDown) and a.of(LinkDown)[0].reason == "timeout"


def test_router_relays_only_between_linked_endpoints() -> None:
    net, r, a, b = triangle(6)
    introduce(net, r, a, b)
    # a peer request for an endpoint r has no link to: dropped, nothing is sent onwards
    stranger = net.add("s", accept=accept_all)
    to_stranger: list[bytes] = []
    net.taps.append(
        lambda data, src, dst: to_stranger.append(data) if dst == stranger.addr else None
    )
    net.settle()
    sent_before = r.sent
    send_peer_request(a, r.hashname, stranger.hashname, encode_packet(b"\x3a", bytes(100)))
    net.run_for(1.0)
    assert r.mesh.statistics().drops.get("no route") == 1
    assert r.sent == sent_before, "the router stays silent"
    assert not to_stranger
    # a bad peer target
    send_peer_request(a, r.hashname, "not-a-hashname", encode_packet(b"\x3a", bytes(100)))
    net.settle()
    assert r.mesh.statistics().drops.get("bad peer request") == 1
    # a channel packet carrying a relayed token, but sent by a stranger: refused
    token = next(t for t, _, _ in r.mesh._relay.snapshot())
    fake = b"\x00\x00" + token + random.Random(1).randbytes(80)
    state = r.mesh.debug_state()
    net.inject(r, fake, stranger.addr)
    assert r.of(PacketDropped)[-1].reason == "relay refused"
    assert r.mesh.debug_state() == state


def test_relay_table_is_bounded_under_a_flood_of_peer_requests() -> None:
    net, r, a, b = triangle(7)
    c = net.add("c")
    c.mesh.link(r.keys(), net.now, paths=[r.addr])
    net.run_until(lambda: up(c, r) and up(r, c))
    introduce(net, r, a, b)  # a legitimate relayed pair: two entries at r
    legit = {t for t, _, _ in r.mesh._relay.snapshot()}
    assert len(legit) == 2
    # c, linked to r, floods peer requests towards b with bogus handshakes
    rng = random.Random(7)
    for _ in range(MAX_RELAY_PER_ENDPOINT + 200):
        send_peer_request(c, r.hashname, b.hashname, encode_packet(b"\x3a", rng.randbytes(96)))
        net.flush(c)
        net.run_for(0.01)
    net.settle()
    entries = r.mesh._relay.snapshot()
    assert len(entries) <= 2 + MAX_RELAY_PER_ENDPOINT
    assert sum(1 for _, target, _ in entries if target == c.hashname) == MAX_RELAY_PER_ENDPOINT
    assert legit <= {t for t, _, _ in entries}, "the flood did not evict a's and b's entries"
    # every bogus handshake reached b as a connect and was dropped there, storing nothing
    assert b.mesh.statistics().drops.get("handshake failed", 0) >= MAX_RELAY_PER_ENDPOINT
    assert b.mesh.table_sizes()["links"] == 2
    # the relayed pair still works
    cid = a.mesh.open_channel(b.hashname, "test", reliable=True, body=b"ok", now=net.now)
    net.run_until(lambda: [e for e in b.of(ChannelData) if e.cid == cid])


def test_relay_table_total_bound() -> None:
    table = RelayTable()
    rng = random.Random(1)
    ends = [Hashname(f"{i:052d}") for i in range(40)]
    for i in range(MAX_RELAY_ENTRIES * 2):
        table.add(rng.randbytes(16), ends[i % 40], ends[(i + 1) % 40], float(i))
    assert len(table) == MAX_RELAY_ENTRIES
    assert table.evicted == MAX_RELAY_ENTRIES
    table.expire(2 * MAX_RELAY_ENTRIES + RELAY_IDLE_TIMEOUT)
    assert len(table) == 0


def test_relay_entries_go_when_an_endpoint_goes() -> None:
    net, r, a, b = triangle(8)
    introduce(net, r, a, b)
    assert r.mesh.statistics().relay_entries == 2
    r.mesh.unlink(a.hashname, net.now)
    net.flush(r)
    assert r.mesh.statistics().relay_entries == 0
    assert r.mesh.link_state(a.hashname) is None
    assert r.of(LinkDown)[-1] == LinkDown(a.hashname, "closed")


def test_relay_table_unit() -> None:
    table = RelayTable(capacity=2, per_endpoint=2)
    x, y, z = (Hashname(c * 52) for c in "xyz")
    table.add(b"1" * 16, x, y, 0.0)
    table.add(b"2" * 16, y, x, 1.0)
    entry = table.get(b"1" * 16)
    assert entry is not None
    table.touch(entry, 2.0)  # now 2 is the least recently used
    table.add(b"3" * 16, z, x, 3.0)
    assert table.get(b"2" * 16) is None and table.evicted == 1
    assert table.next_deadline() == 2.0 + RELAY_IDLE_TIMEOUT
    assert table.expire(2.0 + RELAY_IDLE_TIMEOUT) == 1
    assert len(table) == 1
    assert table.forget(x) == 1 and len(table) == 0


def test_intros_follow_the_handshake_schedule_and_time_out() -> None:
    net, r, a, b = triangle(9)
    intros: list[float] = []
    net.taps.append(lambda d, s, t: intros.append(net.now) if s == a.addr and t == r.addr else None)
    net.block(r.addr, b.addr)  # r can no longer reach b: intros vanish
    net.settle()
    intros.clear()
    start = net.now
    a.mesh.link(b.hashname, net.now, paths=[Path.peer(r.hashname)])
    net.run_until(lambda: a.of(LinkDown), timeout=HANDSHAKE_TIMEOUT + 1)
    sends = sorted({round(t - start, 6) for t in intros})
    assert sends[:5] == [0.0, 1.0, 3.0, 7.0, 15.0]
    assert a.of(LinkDown)[-1] == LinkDown(b.hashname, "timeout")
    assert a.mesh.link_state(b.hashname) is LinkState.UNRESOLVED


def test_no_relay_cycles_between_two_routers() -> None:
    # If each of two routers were reachable only through the other, sending would recurse
    # forever; a router reached only through a router is never used (one hop at most).
    net, r, a, b = triangle(10)
    introduce(net, r, a, b)
    net.settle()
    to_r = a.mesh._links[r.hashname]  # the test forges the cycle: no protocol run makes it
    to_b = a.mesh._links[b.hashname]
    a.mesh._add_path(to_r, Path.peer(b.hashname))
    to_r.best = Path.peer(b.hashname)
    to_b.best = Path.peer(r.hashname)
    outbox = a.mesh.table_sizes()["outbox"]
    cid = a.mesh.open_channel(b.hashname, "test", reliable=True, body=b"x", now=net.now)
    assert a.mesh.datagrams_to_send(net.now) == []  # nothing to send, and no recursion
    assert a.mesh.table_sizes()["outbox"] == outbox
    del cid


def test_hostile_intros_and_peer_bodies_are_dropped() -> None:
    net, r, a, b = triangle(11)
    for bad_key in (bytes(32), b"\x01" + bytes(31), b.mesh.identity.cs3a_public, bytes(31)):
        intro = encode_packet({"type": "link", "csid": "3a"}, encode_packet(None, bad_key))
        before = b.mesh.table_sizes()
        send_peer_request(a, r.hashname, b.hashname, intro)
        net.run_for(0.5)
        assert b.of(PacketDropped)[-1].reason == "bad peer request"
        assert b.mesh.link_state(a.hashname) is None
        after = b.mesh.table_sizes()
        assert {k: v for k, v in after.items() if k != "drop_reasons"} == {
            k: v for k, v in before.items() if k != "drop_reasons"
        }
    # a peer BODY larger than any handshake is not forwarded
    drops = r.mesh.statistics().drops.get("bad peer request", 0)
    send_peer_request(a, r.hashname, b.hashname, encode_packet(b"\x3a", bytes(1300)))
    net.run_for(0.5)
    assert r.mesh.statistics().drops.get("bad peer request", 0) == drops
    r.mesh.set_path_mtu(a.addr, 65_536)
    a.mesh.set_path_mtu(r.addr, 65_536)
    net.mtu = 70_000
    send_peer_request(a, r.hashname, b.hashname, encode_packet(b"\x3a", bytes(5000)))
    net.run_for(0.5)
    assert r.mesh.statistics().drops.get("bad peer request", 0) == drops + 1


def test_new_paths_given_to_an_up_link_are_tried_at_once() -> None:
    net, r, a, b = triangle(12)
    b.mesh._local_paths.clear()  # b advertises no address: a learns none from its pings
    a.mesh.link(b.keys(), net.now, paths=[Path.peer(r.hashname)])
    net.run_until(lambda: up(a, b) and up(b, a))
    net.run_for(2.0)
    assert a.mesh.link_paths(b.hashname) == [Path.peer(r.hashname)]
    net.unblock(a.addr, b.addr)
    start = net.now
    a.mesh.link(b.keys(), net.now, paths=[b.addr])  # the app learned b's address
    net.run_until(lambda: a.mesh.link_path(b.hashname) == b.addr, timeout=5)
    assert net.now - start < 5
