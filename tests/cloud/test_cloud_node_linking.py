"""Members find each other again without help: through a member as a router, by mDNS after
both changed address, by remembered paths (see test_cloud_node.py for the restart case)."""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio

from p2pcloud._node.node import open_node
from tests.cloud.node_helpers import GIVE_UP, field, found_and_join, start_nodes, wait_for

LAN = {"discovery": True, "discovery_interfaces": ["127.0.0.1"]}


async def test_members_link_through_a_router_then_keep_syncing_without_it(tmp_path):
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            phone, laptop = await start_nodes(stack, tmp_path, ["phone", "laptop"])
            async with open_node(tmp_path / "home", port=0, tcp_port=None) as home:
                await found_and_join(home, phone, laptop)
                # neither knows an address of the other (both joined through the home box,
                # no LAN discovery): the home box introduces them (peer/connect)
                await wait_for(lambda: laptop.hashname in phone.links)
                # the link is Up before the re-link attempt that made it resumes and counts
                # its success, and either side's attempt may be the one that made it (the
                # other side's link came up from the incoming handshake): wait for a count
                await wait_for(lambda: any(c.cloud.statistics().get("relinked: router")
                                           for c in (phone, laptop)))
                stats = [phone.cloud.statistics(), laptop.cloud.statistics()]
                assert not any(s.get("relink: lan") for s in stats)
                # no side knew a path of the other: no direct attempt could have made it
                assert not any(s.get("relinked") for s in stats)
                # and the link moves to a direct path
                await phone.wait_direct_path(laptop.hashname)
                await laptop.wait_direct_path(phone.hashname)
            # the home box is gone: the phone and the laptop keep syncing directly
            await phone.cloud.device.set("notes", "n", "text", "without the router")
            await wait_for(lambda: field(laptop, phone.cloud.device_id, "notes", "n", "text"))
            views = {m.hashname: m for m in phone.cloud.members()}
            assert views[laptop.hashname].online
            assert views[laptop.hashname].path["type"] == "udp4"


async def test_members_that_both_moved_find_each_other_by_mdns(tmp_path):
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            home, phone, laptop = await start_nodes(stack, tmp_path, ["home", "phone", "laptop"])
            await found_and_join(home, phone, laptop)
            await wait_for(lambda: laptop.hashname in phone.links)
            phone_dev = phone.cloud.device_id
        # every address changed (new ports) and the home box is away: remembered paths are
        # stale and there is no router; the LAN is the only way
        async with AsyncExitStack() as stack:
            phone, laptop = await start_nodes(stack, tmp_path, ["phone", "laptop"], **LAN)
            await phone.cloud.device.set("notes", "moved", "text", "found by mDNS")
            await wait_for(lambda: field(laptop, phone_dev, "notes", "moved", "text"))
            stats = [phone.cloud.statistics(), laptop.cloud.statistics()]
            assert any(s.get("relink: lan") for s in stats)


async def test_a_member_proves_its_membership_to_one_that_never_saw_its_grant(tmp_path):
    """The founder is away while a second admin pairs a phone; when the phone and the
    founder meet, neither's cloud sub-cloud knows the other's grant... except the phone's
    chain, which it sends on the registry channel: the founder checks it and syncs."""
    kw = {"port": 0, "tcp_port": None}
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            (phone,) = await start_nodes(stack, tmp_path, ["phone"])
            async with open_node(tmp_path / "home", **kw) as home:
                await home.cloud.found()
                async with open_node(tmp_path / "admin2", **kw) as admin2:
                    await admin2.cloud.join(await home.cloud.invite(role="admin"))
                    await wait_for(lambda: admin2.cloud.subcloud is not None
                                   and admin2.cloud.membership.is_admin(admin2.hashname))
            async with open_node(tmp_path / "admin2", **kw) as admin2:
                await phone.cloud.join(await admin2.cloud.invite())
                await phone.cloud.device.set("notes", "n", "text", "from the phone")
            async with open_node(tmp_path / "home", **kw) as home:
                assert not home.cloud.membership.is_member(phone.hashname)
                await phone.link(home.link_uri)
                await wait_for(lambda: home.cloud.membership.is_member(phone.hashname))
                assert home.cloud.statistics().get("cloud records from peers")
                await wait_for(lambda: field(home, phone.cloud.device_id, "notes", "n", "text"))
                await home.cloud.device.set("notes", "h", "text", "from home")
                await wait_for(lambda: field(phone, home.cloud.device_id, "notes", "h", "text"))
