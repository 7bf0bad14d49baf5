"""The pure join protocols plugged into real nodes: UDP on 127.0.0.1, mDNS on loopback.

This is how a Trio shell wires p2pcloud.cloud (the integration engineer owns the real
wiring): the admin node serves the ``pair`` channel type and feeds framed messages to the
pure state machines; the new device finds the admin by its pairing flag in LAN discovery,
links with the keys and paths from the discovery record (or from an invite), and runs the
joiner's side.
"""

from __future__ import annotations

from collections import deque

import trio

from p2pcloud._node.discovery import PeerDiscovered, open_discovery
from p2pcloud._node.node import open_node
from p2pcloud.cloud._join import CHANNEL_TYPE, FrameReader, frame, message_type
from p2pcloud.cloud.grants import found_cloud
from p2pcloud.cloud.invites import InviteBook, InviteJoiner, format_invite, parse_invite
from p2pcloud.cloud.membership import Membership
from p2pcloud.cloud.pairing import PairingHost, PairingJoiner, parse_code
from p2pcloud.uri import LinkInfo
from tests.cloud.helpers import NOW, entropy_from, identity

GIVE_UP = 60  # a safety net against a hang, not a timing claim


class Messages:
    """Framed messages from a channel stream, one at a time."""

    def __init__(self, stream):
        self.stream = stream
        self.reader = FrameReader()
        self.pending = deque()

    async def next(self):
        while not self.pending:
            data = await self.stream.receive_some()
            if not data:
                return None
            self.pending.extend(self.reader.feed(data))
        return self.pending.popleft()


class Admin:
    """The admin device's shell around the pure host state (what the node will do)."""

    def __init__(self, ident, membership):
        self.identity = ident
        self.membership = membership
        self.book = InviteBook()
        self.pairing = PairingHost(ident)
        self.granted = []
        self.entropy = entropy_from("admin " + ident.hashname)

    async def serve(self, stream):
        messages = Messages(stream)
        while (data := await messages.next()) is not None:
            if message_type(data) == "join":
                outcome = self.book.handle_join(
                    data, local=self.identity, peer=stream.hashname,
                    membership=self.membership, now=NOW, entropy=self.entropy)
                reply, grant, done = outcome.reply, outcome.grant, True
            else:
                step = self.pairing.receive(stream.hashname, data, membership=self.membership,
                                            now=NOW, entropy=self.entropy)
                reply, grant, done = step.reply, step.grant, step.done
            if reply is not None:
                await stream.send_all(frame(reply))
            if grant is not None:
                self.granted.append(grant)
                self.membership = self.membership.with_records([grant])
            if done:
                await stream.send_eof()
                return


def udp_paths(node):
    return [p for p in node.link_json["paths"] if p["type"] == "udp4"]


async def test_short_code_pairing_between_two_nodes_found_by_mdns():
    home, phone = identity("node home"), identity("node phone")
    founding = found_cloud(home, now=NOW - 60, entropy=entropy_from("node cloud"))
    admin = Admin(home, Membership(founding.cloud, [founding], now=NOW))
    code = admin.pairing.open(admin.membership, now=NOW, entropy=admin.entropy)
    nameplate, _ = parse_code(code)
    with trio.fail_after(GIVE_UP):
        async with (
            open_node(identity=home, port=0, tcp_port=None) as home_node,
            open_node(identity=phone, port=0, tcp_port=None) as phone_node,
        ):
            home_node.serve_channel(CHANNEL_TYPE, admin.serve)
            home_port = udp_paths(home_node)[0]["port"]
            async with (
                open_discovery(home, home_port, interfaces=["127.0.0.1"],
                               pairing=admin.pairing.nameplate(NOW)) as _home_disc,
                open_discovery(phone, 40100, interfaces=["127.0.0.1"]) as phone_disc,
            ):
                # the phone looks for the device showing this code's nameplate
                async for event in phone_disc:
                    if isinstance(event, PeerDiscovered) and event.peer.pairing == nameplate:
                        found = event.peer
                        break
            assert found.hashname == home.hashname
            peer = await phone_node.link(LinkInfo(found.hashname, found.keys, found.paths()))
            stream = await phone_node.open_channel(peer, CHANNEL_TYPE)
            joiner = PairingJoiner(phone, code, peer=peer, entropy=entropy_from("phone"))
            await stream.send_all(frame(joiner.start()))
            messages = Messages(stream)
            step = None
            while (data := await messages.next()) is not None:
                step = joiner.receive(data, now=NOW)
                if step.reply is not None:
                    await stream.send_all(frame(step.reply))
                if step.done:
                    break
            await stream.aclose()
    assert step is not None and step.error is None and step.joined is not None
    assert step.joined.membership.is_member(phone.hashname)
    assert [g.subject for g in admin.granted] == [phone.hashname]
    assert admin.membership.is_member(phone.hashname)


async def test_invite_join_between_two_nodes():
    home, laptop = identity("invite node home"), identity("invite node laptop")
    founding = found_cloud(home, now=NOW - 60, entropy=entropy_from("invite node cloud"))
    admin = Admin(home, Membership(founding.cloud, [founding], now=NOW))
    with trio.fail_after(GIVE_UP):
        async with (
            open_node(identity=home, port=0, tcp_port=None) as home_node,
            open_node(identity=laptop, port=0, tcp_port=None) as laptop_node,
        ):
            home_node.serve_channel(CHANNEL_TYPE, admin.serve)
            invite = admin.book.create(home, admin.membership, paths=udp_paths(home_node),
                                       now=NOW, entropy=admin.entropy)
            text = format_invite(invite)  # shown as QR or text, typed or scanned on the laptop
            parsed = parse_invite(text, now=NOW)
            peer = await laptop_node.link(
                LinkInfo(parsed.inviter, parsed.keys(), [dict(p) for p in parsed.paths]))
            stream = await laptop_node.open_channel(peer, CHANNEL_TYPE)
            joiner = InviteJoiner(laptop, parsed, entropy=entropy_from("laptop"))
            await stream.send_all(frame(joiner.request()))
            reply = await Messages(stream).next()
            await stream.aclose()
    joined = joiner.finish(reply, peer=peer, now=NOW)
    assert joined.membership.is_member(laptop.hashname)
    assert admin.membership.is_member(laptop.hashname)
    assert admin.book.statistics() == {"joined": 1}
