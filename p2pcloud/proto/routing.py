"""Router tables: relaying channel packets between two endpoints we are linked to.

Theory of operation (telehash v3 ``SPEC:v3/routing.md``, ``channels/peer.md``,
``channels/connect.md``; telehash-js 0.4.18 ``ext/peer.js`` and ``lib/util/receive.js``):

* Endpoint A, linked to us (the router R), opens a ``peer`` channel to R naming B and carrying
  A's handshake for B as its BODY. R reads the routing token of that handshake,
  ``SHA256(BODY[0:16])[0:16]`` (the first 16 bytes of A's ephemeral key), and remembers
  "channel packets carrying this token go to A". B later answers the same way, which teaches
  R the token that leads to B.
* Channel packets start with the *recipient's* token, so when a channel packet arrives whose
  token is not one of R's own exchanges, R looks it up here and forwards the packet, unchanged
  and still encrypted, to the endpoint the token names. R never holds a key that opens it.
* A relay entry names both ends: the ``target`` (who the token leads to) and the ``source``
  (the only endpoint allowed to send on it). R forwards only when the packet came in on a path
  of the source link, so a router is not an open reflector for strangers.

This module owns only the table (bounded, least recently used entries evicted, idle entries
expired); the mesh decides when to add, look up and forward.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from p2pcloud._ids import Hashname

__all__ = [
    "MAX_RELAY_ENTRIES",
    "MAX_RELAY_PER_ENDPOINT",
    "RELAY_IDLE_TIMEOUT",
    "ROUTING_TOKEN_LENGTH",
    "RelayEntry",
    "RelayTable",
]

ROUTING_TOKEN_LENGTH = 16  # telehash v3 e3x/cs/3a: TOKEN = SHA256(eph key[0:16])[0:16]

MAX_RELAY_ENTRIES = 1024  # two entries per relayed pair: 512 introduced pairs per router,
# far above what one personal cloud needs, and at most ~100 KiB of memory under a flood.

MAX_RELAY_PER_ENDPOINT = 64  # entries leading to one endpoint: one per session it keeps
# through this router, plus keepalive syncs (same token) and retries; a linked endpoint that
# floods peer requests evicts only its own oldest entries, never the other endpoints'.

RELAY_IDLE_TIMEOUT = 120.0  # seconds; relayed links refresh their entry with every packet and
# with the keepalive handshake (sent through the router every 30 s of idle, telehash v3
# transports/udp), so four missed keepalives mean the relayed link is dead.


@dataclass(slots=True)
class RelayEntry:
    """One routing token the router forwards.

    Attributes:
        token: the 16-byte routing token (the first 16 bytes of a channel packet body).
        target: the endpoint the token leads to (its exchange owns the token).
        source: the endpoint allowed to send packets carrying this token.
        last_used: when the entry was created or last forwarded a packet.
        forwarded: packets forwarded through this entry.
    """

    token: bytes
    target: Hashname
    source: Hashname
    last_used: float
    forwarded: int = 0


class RelayTable:
    """Bounded token → (target, source) map with LRU eviction and idle expiry."""

    def __init__(
        self, capacity: int = MAX_RELAY_ENTRIES, per_endpoint: int = MAX_RELAY_PER_ENDPOINT
    ) -> None:
        """Create an empty table.

        Args:
            capacity: the most entries kept; the least recently used one is evicted.
            per_endpoint: the most entries leading to one endpoint; past it, that endpoint's
                least recently used entry is evicted.
        """
        self._capacity = capacity
        self._per_endpoint = per_endpoint
        self._entries: OrderedDict[bytes, RelayEntry] = OrderedDict()
        self._per_target: dict[Hashname, int] = {}
        self.evicted = 0

    def __len__(self) -> int:
        """Return the number of entries."""
        return len(self._entries)

    def add(self, token: bytes, target: Hashname, source: Hashname, now: float) -> None:
        """Remember that packets with ``token`` from ``source`` go to ``target``.

        Args:
            token: the 16-byte routing token.
            target: who the token leads to.
            source: who may send packets carrying it.
            now: the current time.
        """
        old = self._entries.get(token)
        if old is not None and old.target == target and old.source == source:
            old.last_used = now
            self._entries.move_to_end(token)
            return
        if old is not None:
            self._remove(token)
        if self._per_target.get(target, 0) >= self._per_endpoint:
            oldest = next(t for t, e in self._entries.items() if e.target == target)
            self._remove(oldest)
            self.evicted += 1
        self._entries[token] = RelayEntry(token, target, source, now)
        self._per_target[target] = self._per_target.get(target, 0) + 1
        while len(self._entries) > self._capacity:
            self._remove(next(iter(self._entries)))
            self.evicted += 1

    def _remove(self, token: bytes) -> None:
        entry = self._entries.pop(token)
        left = self._per_target[entry.target] - 1
        if left:
            self._per_target[entry.target] = left
        else:
            del self._per_target[entry.target]

    def get(self, token: bytes) -> RelayEntry | None:
        """Look up a token without touching its age.

        Args:
            token: the first 16 bytes of a channel packet body.

        Returns:
            The entry, or None.
        """
        return self._entries.get(token)

    def touch(self, entry: RelayEntry, now: float) -> None:
        """Mark ``entry`` as just used (it forwarded a packet).

        Args:
            entry: an entry returned by :meth:`get`.
            now: the current time.
        """
        entry.last_used = now
        entry.forwarded += 1
        self._entries.move_to_end(entry.token)

    def forget(self, hashname: Hashname) -> int:
        """Drop every entry that involves ``hashname`` (its link went down).

        Args:
            hashname: the endpoint.

        Returns:
            The number of entries dropped.
        """
        gone = [t for t, e in self._entries.items() if hashname in (e.target, e.source)]
        for token in gone:
            self._remove(token)
        return len(gone)

    def expire(self, now: float) -> int:
        """Drop entries idle for :data:`RELAY_IDLE_TIMEOUT`.

        Args:
            now: the current time.

        Returns:
            The number of entries dropped.
        """
        dropped = 0
        # OrderedDict is in least-recently-used order: stop at the first fresh entry.
        while self._entries:
            token, entry = next(iter(self._entries.items()))
            if entry.last_used + RELAY_IDLE_TIMEOUT > now:
                break
            self._remove(token)
            dropped += 1
        return dropped

    def next_deadline(self) -> float | None:
        """Return when the oldest entry expires, or None when the table is empty."""
        if not self._entries:
            return None
        entry = next(iter(self._entries.values()))
        return entry.last_used + RELAY_IDLE_TIMEOUT

    def snapshot(self) -> list[tuple[bytes, Hashname, Hashname]]:
        """Return (token, target, source) triples, for tests and debugging."""
        return [(e.token, e.target, e.source) for e in self._entries.values()]
