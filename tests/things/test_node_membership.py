"""Things across restarts and membership changes: nothing runs per thing at open; a device
that joins later gets every thing and its key; a revoked device loses both."""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio

from p2pcloud._node.node import open_node
from p2pcloud.things import thing as t
from tests.things.nodes import GIVE_UP, found_and_join, holds, start_nodes, things, wait_for

THINGS = 40  # enough to show that nothing is started per thing


async def test_restart_then_a_new_device_gets_every_thing_and_key_then_is_revoked(tmp_path):
    with trio.fail_after(GIVE_UP):
        tags = {}
        async with open_node(tmp_path / "home", port=0, tcp_port=None) as home:
            await found_and_join(home)
            for i in range(THINGS):
                view = await things(home).create(f"box {i:02d}")
                tags[view.hashname] = things(home).tag(view.hashname).secret
            await things(home).archive("box 07")
            assert len(things(home).list()) == THINGS - 1
            assert len(things(home).list(include_archived=True)) == THINGS

        async with AsyncExitStack() as stack:
            home = await stack.enter_async_context(open_node(tmp_path / "home", port=0,
                                                             tcp_port=None))
            # reopened: every thing listed, none hosted, fresh tags print the same again
            assert things(home).host.hosted == []
            assert len(things(home).list(include_archived=True)) == THINGS
            assert {h: things(home).tag(h).secret for h in tags} == tags
            assert things(home).get("box 07").archived

            laptop, stranger = await start_nodes(stack, tmp_path, ["laptop", "stranger"])
            await laptop.cloud.join(await home.cloud.invite())
            await found_and_join(stranger)
            await wait_for(lambda: len(things(laptop).list(include_archived=True)) == THINGS)
            # the key of every thing was sealed to the new device: it prints the fresh tags
            await wait_for(lambda: all(
                laptop.hashname in things(laptop)._find(h).replica.documents(t.KEYS)
                for h in tags))
            assert {h: things(laptop).tag(h).secret for h in tags} == tags
            # and answers for the things: a claim through the laptop alone (its router path)
            hn = next(iter(tags))
            fresh = things(laptop).tag(hn)
            only_laptop = type(fresh)(fresh.kind, fresh.key, fresh.hashname, fresh.secret,
                                      tuple(p for p in fresh.paths
                                            if p.key == laptop.identity.cs3a_public))
            assert only_laptop.paths
            claimed = await things(stranger).scan(only_laptop.uri())
            assert claimed.action == "claimed" and holds(stranger, hn)
            assert things(laptop).host.started >= 1  # it woke the thing on demand
            await wait_for(lambda: not holds(home, hn))

            # revoking the laptop removes its seals and its ACL entry from every thing
            await home.cloud.revoke(laptop.hashname)
            rest = [h for h in tags if h != hn]
            await wait_for(lambda: all(
                laptop.hashname not in things(home)._find(h).replica.documents(t.KEYS)
                and laptop.hashname not in things(home)._find(h).record.acl for h in rest))
            assert things(home).tag(rest[0]).secret == tags[rest[0]]
