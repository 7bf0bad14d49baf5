"""Smoke: create, tag, scan-claim on another device of the cloud."""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio

from p2pcloud.things.tags import render_png
from tests.things.nodes import GIVE_UP, found_and_join, holds, start_nodes, things, wait_for


async def test_smoke(tmp_path):
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            home, phone = await start_nodes(stack, tmp_path, ["home", "phone"])
            await found_and_join(home, phone)
            view = await things(home).create("bike", make="Acme")
            tag = things(home).tag(view.hashname)
            assert tag.is_fresh
            result = await things(phone).scan(render_png(tag))
            assert result.action == "claimed"
            await wait_for(lambda: holds(home, view.hashname)
                           and things(home).get(view.hashname).claimed)
