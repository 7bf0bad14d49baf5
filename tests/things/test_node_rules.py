"""Rules and Python handlers fire exactly once per event, with three owner devices online
and with one."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio

from p2pcloud._node.node import Node
from p2pcloud._node.things import OwnerNotified, ThingEvent, ThingNotice
from p2pcloud.errors import RuleError
from p2pcloud.things import rules as r
from tests.things.nodes import GIVE_UP, found_and_join, holds, start_nodes, things, wait_for

RULE = 'on reading_added if value > 80 and unit == "kg" do notify_owner("heavy"), ' \
       'append(alerts, value)'


def _settled(nodes: list[Node], hashname: str, notices: int) -> bool:
    """Every device holds the same ``notices`` notices and waits on no firing."""
    return all(holds(n, hashname) and len(things(n).notices(hashname)) == notices
               and things(n).rules_pending() == 0 for n in nodes)


async def test_a_rule_fires_once_with_one_device_online_and_with_three(tmp_path):
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            home, phone, laptop = await start_nodes(stack, tmp_path, ["home", "phone", "laptop"])
            nodes = [home, phone, laptop]
            heard: dict[str, list[ThingNotice]] = {n.hashname: [] for n in nodes}
            handled: list[tuple[str, ThingEvent]] = []
            for node in nodes:
                things(node).add_listener(heard[node.hashname].append)

                async def on_reading(event: ThingEvent, who: str = node.hashname) -> None:
                    handled.append((who, event))

                things(node).add_handler("reading_added", on_reading)
            with pytest.raises(RuleError):
                things(home).add_handler("exploded", on_reading)

            # one device: the home box is the whole cloud
            await found_and_join(home)
            scale = await things(home).create("scale")
            await things(home).scan(things(home).tag(scale.hashname).uri())
            with pytest.raises(RuleError, match="unknown action"):
                await things(home).add_rule(scale.hashname, "on reading_added do explode()")
            rule_id = await things(home).add_rule(scale.hashname, RULE)
            await things(home).add_reading(scale.hashname, {"value": 120, "unit": "kg"})
            await wait_for(lambda: _settled([home], scale.hashname, 1))
            sc = things(home)._find(scale.hashname)
            assert [a["value"] for a in sc.log("alerts")] == [120]
            await wait_for(lambda: len(handled) == 1)
            assert [(who, e.fields["value"]) for who, e in handled] == [(home.hashname, 120)]

            # three devices: the phone and the laptop join and merge what was done
            await home.cloud.found() if home.cloud.id is None else None
            for node in (phone, laptop):
                await node.cloud.join(await home.cloud.invite())
            await wait_for(lambda: all(holds(n, scale.hashname)
                                       and [x["id"] for x in things(n).rules(scale.hashname)]
                                       == [rule_id] for n in nodes))
            await wait_for(lambda: _settled(nodes, scale.hashname, 1))
            # the phone's reading fires the rule on exactly one device
            await things(phone).add_reading(scale.hashname, {"value": 91.5, "unit": "kg"})
            await things(laptop).add_reading(scale.hashname, {"value": 60, "unit": "kg"})
            await wait_for(lambda: _settled(nodes, scale.hashname, 2))
            assert [n["text"] for n in things(laptop).notices(scale.hashname)] == ["heavy"] * 2
            [event] = [e for e in things(home).events(scale.hashname)
                       if e["type"] == "reading_added" and e["value"] == 91.5]
            await wait_for(lambda: all(r.is_done(things(n)._find(scale.hashname).replica,
                                                 rule_id, event["id"]) for n in nodes))
            assert len(r.done_by(sc.replica, rule_id, event["id"])) == 1
            await wait_for(lambda: len(sc.log("alerts")) == 2)
            assert sorted(a["value"] for a in sc.log("alerts")) == [91.5, 120]
            # every owner device is told of the new firing once; the listener runs once the
            # merge is durable, a moment after the log (which _settled reads) shows it
            def told(node: Node) -> list[str]:
                return [n.data["text"] for n in heard[node.hashname]
                        if isinstance(n, OwnerNotified)]

            await wait_for(lambda: all(len(told(n)) >= (2 if n is home else 1) for n in nodes))
            for node in nodes:
                assert told(node) == ["heavy"] * (2 if node is home else 1)
            # the Python handlers: once per reading, on one device each
            await wait_for(lambda: len(handled) >= 3)
            assert sorted(e.fields["value"] for _who, e in handled) == [60, 91.5, 120]
            assert all(things(n).rules_pending() == 0 for n in nodes)
            assert len(handled) == 3
            await things(home).remove_rule(scale.hashname, rule_id)
            await wait_for(lambda: things(phone).rules(scale.hashname) == [])
