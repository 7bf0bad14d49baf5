"""The daemon's event hub: one publisher side, many live subscribers (the SSE streams).

Theory of operation
-------------------
Daemon parts call :meth:`EventHub.publish` (synchronous, never blocks) with an event type
(``link.up``, ``link.down``, ``link.path``, ``statistics`` from the runtime; ``change``,
``subcloud.added`` and ``sync.progress`` from the sub-cloud routes; the
capabilities' own, e.g. things and cloud) and a JSON-able dict. Each event gets the next id
and goes into a bounded history ring and into every subscriber's bounded queue.

A subscriber that falls :data:`MAX_SUBSCRIBER_BACKLOG` events behind is cut off (its queue is
closed) rather than letting memory grow or slowing the publisher; an SSE client reconnects
with ``Last-Event-ID`` (browsers' EventSource does that by itself) and gets the events it
missed from the history, or a ``reset`` event telling it to re-read the state when they are
gone from the ring. Nothing here does I/O.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import trio

MAX_HISTORY = 512  # events kept for reconnecting clients: minutes of link churn plus ticks
MAX_SUBSCRIBER_BACKLOG = 256  # events queued per stream before a slow client is cut off
MAX_SUBSCRIBERS = 64  # open event streams; each costs a queue; more than this is a leak


@dataclass(frozen=True, slots=True)
class EventPublished:
    """One event as subscribers see it.

    Attributes:
        id: increasing from 1 within one daemon run.
        type: dotted name (``link.up``).
        time: Unix time it was published.
        data: the payload (JSON-able).
    """

    id: int
    type: str
    time: float
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The JSON form carried in an SSE ``data:`` line."""
        return {"id": self.id, "type": self.type, "time": self.time, "data": self.data}


class TooManySubscribers(Exception):
    """:data:`MAX_SUBSCRIBERS` streams are open already."""


class EventHub:
    """Fan-out of daemon events to live subscribers, with a short replay history."""

    def __init__(self) -> None:
        """An empty hub."""
        self._next_id = 1
        self._history: deque[EventPublished] = deque(maxlen=MAX_HISTORY)
        self._subscribers: set[trio.MemorySendChannel[EventPublished]] = set()
        self._subscribed = trio.Event()  # set while anyone subscribes (wait_subscribed)
        self.published: dict[str, int] = {}

    @property
    def subscribers(self) -> int:
        """Open subscriptions."""
        return len(self._subscribers)

    async def wait_subscribed(self) -> None:
        """Return once at least one subscription is open (at once if one is).

        Lets periodic publishers (statistics) sleep while nobody listens.
        """
        await self._subscribed.wait()

    def _subscribers_changed(self) -> None:
        if self._subscribers:
            self._subscribed.set()
        elif self._subscribed.is_set():
            self._subscribed = trio.Event()

    def publish(self, type: str, data: dict[str, Any]) -> EventPublished:
        """Publish an event to every subscriber now; never blocks.

        Args:
            type: the event type.
            data: its payload.

        Returns:
            The event as published.
        """
        event = EventPublished(self._next_id, type, time.time(), data)
        self._next_id += 1
        self._history.append(event)
        self.published[type] = self.published.get(type, 0) + 1
        for send in list(self._subscribers):
            try:
                send.send_nowait(event)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                # Too slow (or gone): cut it off; it reconnects with Last-Event-ID.
                self._subscribers.discard(send)
                send.close()
                self._subscribers_changed()
        return event

    @contextmanager
    def subscribe(
        self, last_id: int | None = None
    ) -> Iterator[tuple[list[EventPublished], trio.MemoryReceiveChannel[EventPublished]]]:
        """Subscribe while the block runs.

        Args:
            last_id: the last event id the client saw (SSE ``Last-Event-ID``), if any.

        Yields:
            ``(missed, receive)``: events after ``last_id`` still in the history (or one
            ``reset`` event when some are gone), and the live queue.

        Raises:
            TooManySubscribers: :data:`MAX_SUBSCRIBERS` are open.
        """
        if len(self._subscribers) >= MAX_SUBSCRIBERS:
            raise TooManySubscribers(f"{MAX_SUBSCRIBERS} event streams are open already")
        missed: list[EventPublished] = []
        if last_id is not None and last_id > self._next_id - 1:
            # An id from the future: the client saw an earlier run of the daemon (ids start
            # at 1 again after a restart), so everything it knows may be stale.
            missed = [EventPublished(0, "reset", time.time(), {"reason": "daemon restarted"})]
        elif last_id is not None and last_id < self._next_id - 1:
            oldest = self._history[0].id if self._history else self._next_id
            if last_id + 1 < oldest:
                missed = [EventPublished(0, "reset", time.time(), {"reason": "events lost"})]
            else:
                missed = [e for e in self._history if e.id > last_id]
        send, receive = trio.open_memory_channel[EventPublished](MAX_SUBSCRIBER_BACKLOG)
        self._subscribers.add(send)
        self._subscribers_changed()
        try:
            yield missed, receive
        finally:
            self._subscribers.discard(send)
            self._subscribers_changed()
            send.close()
            receive.close()
