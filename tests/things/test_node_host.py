"""Thing endpoints are started on demand and bounded: a box does not run one per thing."""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio

from tests.things.nodes import GIVE_UP, found_and_join, start_nodes, things, wait_for


async def test_endpoints_start_on_demand_stay_bounded_and_stop_when_idle(tmp_path):
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            home, finder = await start_nodes(stack, tmp_path, ["home", "finder"])
            await found_and_join(home)
            await found_and_join(finder)
            host = things(home).host
            host.max_hosted = 2
            tags = []
            for i in range(3):
                view = await things(home).create(f"box {i}", card=f"box number {i}")
                await things(home).scan(things(home).tag(view.hashname).uri())
                tags.append(things(home).tag(view.hashname))
            assert host.hosted == [] and host.started == 0  # nothing runs before a scan

            for i, tag in enumerate(tags):
                result = await things(finder).scan(tag.uri())
                assert result.card == {"text": f"box number {i}"}
                assert len(host.hosted) <= 2
            assert host.started == 3
            assert tags[0].hashname not in host.hosted  # the least recently used went first
            # the first box is woken again on its next scan
            again = await things(finder).scan(tags[0].uri())
            assert again.card == {"text": "box number 0"}
            assert tags[0].hashname in host.hosted and len(host.hosted) <= 2
            # idle endpoints stop by themselves
            host.set_idle(0.2)
            await wait_for(lambda: host.hosted == [])
            # and a later scan wakes the thing again
            assert (await things(finder).scan(tags[1].uri())).card == {"text": "box number 1"}
