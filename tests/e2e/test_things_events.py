"""Thing events on the daemon's event hub: names, JSON shapes, and the per-thing rate limit of
``thing.changed`` (driven with the node's own notice classes and Trio's MockClock)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import trio
import trio.testing
from p2pcloudd.events import EventHub
from p2pcloudd.routes_things import (
    CHANGED_BURST,
    CHANGED_WINDOW,
    _Coalescer,
    event_type,
    to_json,
)

from p2pcloud._ids import Hashname
from p2pcloud._node.things import MessageReceived, OwnerNotified, ThingChanged, ThingCreated

A = Hashname("a" * 52)
B = Hashname("b" * 52)


def _published(hub: EventHub) -> list[tuple[str, dict[str, Any]]]:
    with hub.subscribe(0) as (missed, _receive):
        return [(e.type, e.data) for e in missed]


def test_notice_names_and_json() -> None:
    assert event_type(ThingCreated(A)) == "thing.created"
    assert event_type(ThingChanged(A)) == "thing.changed"
    assert event_type(MessageReceived(A)) == "thing.message"
    assert event_type(OwnerNotified(A)) == "thing.notify"
    record = {"id": "m1", "from": B, "text": "found it", "contact": "", "at_ms": 5,
              "raw": b"\x00\x01"}
    assert to_json(MessageReceived(A, record)) == {
        "thing": A, "data": {**record, "raw": "aaaq"}}  # bytes as base32


async def test_changed_events_burst_then_merge_per_thing(
    autojump_clock: trio.testing.MockClock,  # pytest-trio's: sleeps take no real time
) -> None:
    hub = EventHub()
    coalescer = _Coalescer(SimpleNamespace(events=hub))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(coalescer.run)
        for n in range(100):  # a sync of many readings of A: a burst, then merged
            coalescer.changed(A, {"collections": [f"c{n % 3}"]})
        coalescer.changed(B, {"collections": ["profile"]})  # another thing: at once
        coalescer.changed(A, {"claimed": True})
        events = _published(hub)
        assert [d["thing"] for _, d in events] == [A] * CHANGED_BURST + [B]
        await trio.sleep(CHANGED_WINDOW + 0.01)
        events = _published(hub)
        assert len(events) == CHANGED_BURST + 2
        merged = events[-1][1]
        assert merged == {"thing": A, "data": {"collections": ["c0", "c1", "c2"],
                                               "claimed": True}}
        # Quiet for a window: the next change goes out at once again.
        await trio.sleep(2 * CHANGED_WINDOW)
        coalescer.changed(A, {"collections": ["notes"]})
        assert _published(hub)[-1][1] == {"thing": A, "data": {"collections": ["notes"]}}
        nursery.cancel_scope.cancel()
