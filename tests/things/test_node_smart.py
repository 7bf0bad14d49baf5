"""A smart thing pairs with the owner's cloud and writes readings while owner devices come
and go; every reading arrives exactly once; its grant is revoked like a device's."""

from __future__ import annotations

import contextlib
from contextlib import AsyncExitStack

import trio

from p2pcloud._node.node import open_node
from p2pcloud._node.smartthing import run_thing
from p2pcloud._node.things import smart_subcloud_id
from p2pcloud.errors import AccessDenied
from tests.things.nodes import GIVE_UP, found_and_join, holds, start_nodes, things, wait_for

READINGS = 300  # enough that the phone leaves and returns in the middle of the run


def _values(node, hashname) -> list[float]:
    return [r["value"] for r in things(node).readings(hashname)] if holds(node, hashname) else []


async def _device(path, stop: trio.Event, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run a node until ``stop`` is set (an owner device that comes and goes)."""
    async with open_node(path, port=0, tcp_port=None) as node:
        task_status.started(node)
        await stop.wait()


async def test_smart_thing_readings_arrive_exactly_once_and_its_grant_is_revocable(tmp_path):
    with trio.fail_after(GIVE_UP * 2):
        async with AsyncExitStack() as stack:
            (home,) = await start_nodes(stack, tmp_path, ["home"])
            nursery = await stack.enter_async_context(trio.open_nursery())
            stop_phone = trio.Event()
            phone = await nursery.start(_device, tmp_path / "phone", stop_phone)
            await found_and_join(home, phone)
            invite = await things(home).invite_smart()
            scale = await stack.enter_async_context(run_thing(
                tmp_path / "scale", invite=invite, name="bathroom scale", make="Acme"))
            hn = scale.hashname
            assert scale.view.smart and scale.view.name == "bathroom scale"
            # the scale's grant names none of the cloud's sub-clouds
            assert home.cloud is not None
            member = next(m for m in home.cloud.members() if m.hashname == hn)
            assert member.role == "thing" and "*" not in member.rights
            await wait_for(lambda: holds(home, hn) and holds(phone, hn))
            assert things(home).get(hn).smart
            assert things(home)._find(hn).id == smart_subcloud_id(hn)
            # the scale reads nothing else of the owner's cloud
            assert scale.node.replication is not None
            assert home.cloud.device_id not in scale.node.replication.subclouds

            for i in range(READINGS):
                await scale.add_reading(50.0 + i / 10, unit="kg", kind="weight")
                if i == READINGS // 3:  # the phone goes away...
                    stop_phone.set()
                    await wait_for(lambda p=phone: p.hashname not in scale.node.links
                                   or p._closed)
                if i == 2 * READINGS // 3:  # ...and comes back
                    stop_phone = trio.Event()
                    phone = await nursery.start(_device, tmp_path / "phone", stop_phone)
            expected = [50.0 + i / 10 for i in range(READINGS)]
            assert [r["value"] for r in scale.readings()] == expected
            for node in (home, phone):
                await wait_for(lambda n=node: len(_values(n, hn)) >= READINGS)
                values = _values(node, hn)
                assert sorted(values) == sorted(expected)  # each exactly once
                assert len(set(values)) == READINGS
                events = [e for e in things(node).events(hn) if e["type"] == "reading_added"]
                assert len({e["id"] for e in events}) == READINGS == len(events)

            # revoke the scale like a device: its links end, its later writes go nowhere
            await home.cloud.revoke(hn)
            await wait_for(lambda: phone.cloud.membership.is_revoked(hn))
            await wait_for(lambda: hn not in home.links and hn not in phone.links)
            # the scale may already know it was revoked (then it refuses to write), or not
            # (then the write stays on the scale: no member accepts it any more)
            with contextlib.suppress(AccessDenied):
                await scale.add_reading(999.0, unit="kg")
            await things(phone).note(hn, "revoked the old scale")
            await wait_for(lambda: "revoked" in things(home).notes(hn))
            assert 999.0 not in _values(home, hn) and 999.0 not in _values(phone, hn)
            assert len(_values(home, hn)) == READINGS
            stop_phone.set()
