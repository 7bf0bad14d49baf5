"""The blob-fetch planner: which chunk to ask of which peer, and what came back.

Theory of operation
-------------------
A :class:`BlobFetch` gets one blob's verified manifest, a ``has(hash)`` callable over the
local chunk store, and the peers that announced chunks (``have`` messages). It owns no
chunks and does no I/O: the Trio shell sends the ``want`` messages it plans
(:meth:`BlobFetch.requests`), feeds back what peers answered (:meth:`receive_chunk`,
:meth:`receive_error`, :meth:`remove_peer`) and stores each chunk the planner accepted.

* **Parallel, bounded.** Missing chunks are spread over every peer that has them, at most
  ``max_in_flight`` outstanding per peer (flow control: a slow phone is not buried), the
  least loaded eligible peer first, so the blob arrives about as fast as all peers together
  can send.
* **Verified.** A chunk is accepted only if its length and BLAKE3 hash equal the manifest's
  entry. A wrong chunk is rejected with a reason, the peer gets a strike and is never asked
  for that chunk again, and the chunk goes back to the queue for another peer. At
  ``MAX_STRIKES`` the peer is banned from this fetch. A timed-out request is a strike too.
* **Resumable.** The held set is the state: the planner asks only for chunks ``has`` says
  are missing, so after a crash, a lost link or a restart a new BlobFetch over the same
  store asks for exactly what is still missing. Nothing else needs saving.
* **Progress.** :meth:`progress` counts chunks and bytes done and to do, for progress bars.

Events (:meth:`next_event`) report what happened: ChunkVerified, ChunkRejected, PeerBanned,
FetchCompleted. Time comes in as ``now`` (seconds); nothing here reads a clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

import blake3

from p2pcloud._ids import Hashname
from p2pcloud.blobs.manifest import Manifest

__all__ = [
    "MAX_IN_FLIGHT_PER_PEER",
    "MAX_STRIKES",
    "REJECT_DUPLICATE",
    "REJECT_HASH",
    "REJECT_SIZE",
    "REJECT_UNSOLICITED",
    "REQUEST_TIMEOUT",
    "BlobFetch",
    "ChunkRejected",
    "ChunkVerified",
    "FetchCompleted",
    "FetchEvent",
    "FetchProgress",
    "PeerBanned",
]

MAX_IN_FLIGHT_PER_PEER: Final = 64
"""Requests outstanding per peer and blob: 64 x ~78 KiB = ~5 MiB in flight, what keeps a
fast link busy when the round trip through two busy Python processes reaches 25 ms
(200 MB/s x 25 ms; measured: 16 in flight capped a loopback transfer near 60 MB/s; 128
was no faster and held twice the memory on both sides) without queueing minutes of data
on a slow one. The coordinator sends them as wants of at most MAX_WANT_HASHES each."""
MAX_IN_FLIGHT_LIMIT: Final = 1024  # a configured value beyond this is a mistake (~80 MiB)
REQUEST_TIMEOUT: Final = 30.0
"""Seconds before an unanswered request is given to another peer: far above any round
trip of a working link (a 256 KiB chunk at 100 kB/s takes ~2.6 s) so a busy peer is not
punished, short enough that a vanished peer does not stall the blob for long."""
MAX_STRIKES: Final = 3
"""Wrong chunks or timeouts before a peer is banned from this fetch: one bad bit from a
flaky disk or one stall is forgiven, a peer that keeps failing is not asked again."""
MAX_EVENTS: Final = 4096  # events not yet read; beyond this the oldest are dropped (a bug guard)

REJECT_HASH: Final = "hash mismatch"
REJECT_SIZE: Final = "size mismatch"
REJECT_UNSOLICITED: Final = "not in this blob"
REJECT_DUPLICATE: Final = "already held"


@dataclass(frozen=True, slots=True)
class ChunkVerified:
    """A chunk arrived and verified; the caller stores ``data`` under ``hash``."""

    peer: Hashname
    hash: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class ChunkRejected:
    """A chunk a peer sent was refused (``reason`` is one of the ``REJECT_*`` constants)."""

    peer: Hashname
    hash: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class PeerBanned:
    """A peer reached MAX_STRIKES and is no longer asked during this fetch."""

    peer: Hashname
    reason: str


@dataclass(frozen=True, slots=True)
class FetchCompleted:
    """Every chunk of the blob is held."""

    blob_hash: bytes


FetchEvent = ChunkVerified | ChunkRejected | PeerBanned | FetchCompleted


@dataclass(frozen=True, slots=True)
class FetchProgress:
    """How far a fetch is: chunks and bytes held and in total (distinct chunks)."""

    chunks_done: int
    chunks_total: int
    bytes_done: int
    bytes_total: int
    in_flight: int

    @property
    def fraction(self) -> float:
        """Bytes done over bytes in total (1.0 for an empty blob)."""
        return 1.0 if self.bytes_total == 0 else self.bytes_done / self.bytes_total


_ALL: Final = None  # a peer that announced the whole blob


class BlobFetch:
    """Plans and checks the parallel fetch of one blob's chunks (see the module docstring)."""

    def __init__(
        self,
        manifest: Manifest,
        has: Callable[[bytes], bool],
        *,
        max_in_flight: int = MAX_IN_FLIGHT_PER_PEER,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        """Start (or resume) fetching a blob.

        Args:
            manifest: the blob's verified manifest.
            has: whether the local chunk store holds a chunk; asked once per distinct chunk
                here, which is what makes a new BlobFetch resume where the last one stopped.
            max_in_flight: requests outstanding per peer (1..MAX_IN_FLIGHT_LIMIT).
            request_timeout: seconds before an unanswered request moves to another peer.

        Raises:
            ValueError: ``max_in_flight`` or ``request_timeout`` out of range.
        """
        if not 1 <= max_in_flight <= MAX_IN_FLIGHT_LIMIT:
            raise ValueError(f"max_in_flight must be 1..{MAX_IN_FLIGHT_LIMIT}")
        if not request_timeout > 0:
            raise ValueError("request_timeout must be positive")
        self.manifest = manifest
        self._max_in_flight = max_in_flight
        self._timeout = request_timeout
        self._sizes = manifest.unique_chunks()
        self._done: set[bytes] = {h for h in self._sizes if has(h)}
        self._bytes_done = sum(self._sizes[h] for h in self._done)
        self._bytes_total = sum(self._sizes.values())
        # chunks to ask for, in blob order (a file can be written front to back as they come)
        self._queue: deque[bytes] = deque(h for h in self._sizes if h not in self._done)
        self._in_flight: dict[bytes, tuple[Hashname, float]] = {}
        self._peer_load: dict[Hashname, int] = {}
        self._peer_chunks: dict[Hashname, set[bytes] | None] = {}
        self._refused: dict[bytes, set[Hashname]] = {}  # peers that failed this chunk
        self._strikes: dict[Hashname, int] = {}
        self._banned: set[Hashname] = set()
        self._events: deque[FetchEvent] = deque(maxlen=MAX_EVENTS)
        self._stats: dict[str, int] = {}
        self._completed_reported = False
        self._check_complete()

    # -- peers ---------------------------------------------------------------------------

    def add_peer(self, peer: Hashname, hashes: Iterable[bytes] | None = None) -> None:
        """Record that a peer holds chunks of this blob (from its ``have`` message).

        Args:
            peer: the peer's hashname.
            hashes: the chunk hashes it holds; None means the whole blob. Called again, the
                announcements add up.
        """
        if peer in self._banned:
            return
        if hashes is None:
            self._peer_chunks[peer] = _ALL
        else:
            known = self._peer_chunks.get(peer, set())
            if known is not _ALL:
                assert known is not None
                known.update(h for h in hashes if h in self._sizes)
                self._peer_chunks[peer] = known
        self._peer_load.setdefault(peer, 0)

    def remove_peer(self, peer: Hashname) -> None:
        """A peer went away (link down): its outstanding requests go back to the queue.

        Args:
            peer: the peer's hashname.
        """
        self._peer_chunks.pop(peer, None)
        self._requeue_peer(peer)
        self._peer_load.pop(peer, None)

    def peers(self) -> list[Hashname]:
        """The peers that may still be asked (announced, not removed, not banned)."""
        return sorted(self._peer_chunks)

    # -- planning ------------------------------------------------------------------------

    def _peer_has(self, peer: Hashname, h: bytes) -> bool:
        known = self._peer_chunks.get(peer)
        return known is _ALL or (known is not None and h in known)

    def requests(self, now: float) -> list[tuple[Hashname, list[bytes]]]:
        """Plan the next requests and mark them in flight.

        Args:
            now: the current time in seconds.

        Returns:
            ``(peer, chunk hashes)`` pairs; send each as one ``want`` message. Empty when
            everything missing is in flight, or no peer that may be asked has it.
        """
        peers = [p for p in self._peer_chunks if p not in self._banned]
        free = {p: self._max_in_flight - self._peer_load.get(p, 0) for p in peers}
        capacity = sum(max(0, f) for f in free.values())
        plan: dict[Hashname, list[bytes]] = {}
        skipped: list[bytes] = []
        deadline = now + self._timeout
        while self._queue and capacity > 0:
            h = self._queue.popleft()
            if h in self._done or h in self._in_flight:
                continue
            refused = self._refused.get(h, ())
            best: Hashname | None = None
            for p in peers:
                if free[p] > 0 and p not in refused and self._peer_has(p, h):
                    # least loaded first, then fewest strikes, then the hashname (determinism)
                    key = (-free[p], self._strikes.get(p, 0), p)
                    if best is None or key < (-free[best], self._strikes.get(best, 0), best):
                        best = p
            if best is None:
                skipped.append(h)
                continue
            free[best] -= 1
            capacity -= 1
            self._peer_load[best] = self._peer_load.get(best, 0) + 1
            self._in_flight[h] = (best, deadline)
            plan.setdefault(best, []).append(h)
        self._queue.extendleft(reversed(skipped))  # keep blob order for the next round
        return sorted(plan.items())

    def expect(self, peer: Hashname, hashes: Iterable[bytes], now: float) -> None:
        """Mark chunks as requested from ``peer`` without a ``want``: it sends them unasked
        (the chunks of a small blob that follow its manifest). They time out like requests.

        Args:
            peer: who will send them.
            hashes: the chunk hashes.
            now: the current time in seconds.
        """
        if peer in self._banned or peer not in self._peer_chunks:
            return
        deadline = now + self._timeout
        for h in hashes:
            if h in self._sizes and h not in self._done and h not in self._in_flight:
                self._in_flight[h] = (peer, deadline)
                self._peer_load[peer] = self._peer_load.get(peer, 0) + 1

    def get_timer(self) -> float | None:
        """The earliest request deadline, or None when nothing is in flight."""
        if not self._in_flight:
            return None
        return min(deadline for _, deadline in self._in_flight.values())

    def handle_timer(self, now: float) -> None:
        """Give requests past their deadline to other peers; each is a strike for its peer.

        Args:
            now: the current time in seconds.
        """
        expired = [(h, p) for h, (p, deadline) in self._in_flight.items() if deadline <= now]
        for h, p in expired:
            self._release(h)
            self._refused.setdefault(h, set()).add(p)
            self._queue.appendleft(h)
            self._count("timeout")
            self._strike(p, "timeouts")

    # -- answers -------------------------------------------------------------------------

    def receive_chunk(self, peer: Hashname, h: bytes, data: bytes) -> ChunkVerified | ChunkRejected:
        """Check a chunk a peer sent. Never raises on bad input.

        Args:
            peer: who sent it.
            h: the hash it claims.
            data: the bytes.

        Returns:
            ChunkVerified (store ``data``) or ChunkRejected with the reason; the same object
            is queued as an event.
        """
        size = self._sizes.get(h)
        event: ChunkVerified | ChunkRejected
        if size is None:
            event = ChunkRejected(peer, h, REJECT_UNSOLICITED)
            self._count(REJECT_UNSOLICITED)
        elif h in self._done:
            event = ChunkRejected(peer, h, REJECT_DUPLICATE)  # a late answer: harmless
            self._count(REJECT_DUPLICATE)
            self._release(h, only=peer)
        elif len(data) != size or blake3.blake3(data).digest() != h:
            reason = REJECT_SIZE if len(data) != size else REJECT_HASH
            event = ChunkRejected(peer, h, reason)
            self._count(reason)
            self._release(h, only=peer)
            self._refused.setdefault(h, set()).add(peer)
            if h not in self._in_flight:
                self._queue.appendleft(h)  # ask someone else, first
            self._events.append(event)
            self._strike(peer, reason)
            return event
        else:
            # valid bytes are valid from anyone, even a peer we gave up on
            self._release(h)
            self._done.add(h)
            self._bytes_done += size
            event = ChunkVerified(peer, h, bytes(data))
            self._count("verified")
        self._events.append(event)
        self._check_complete()
        return event

    def receive_error(self, peer: Hashname, h: bytes, reason: str = "") -> None:
        """A peer said it cannot send a chunk: ask another peer (no strike: it was honest).

        Args:
            peer: who answered.
            h: the chunk hash.
            reason: its reason, for statistics.
        """
        if h not in self._sizes:
            self._count("err for unknown chunk")
            return
        self._count("err")
        self._refused.setdefault(h, set()).add(peer)
        known = self._peer_chunks.get(peer)
        if known is not None:
            known.discard(h)
        was_ours = self._in_flight.get(h, (None, 0.0))[0] == peer
        self._release(h, only=peer)
        if was_ours and h not in self._done:
            self._queue.appendleft(h)

    # -- state ---------------------------------------------------------------------------

    def is_complete(self) -> bool:
        """Whether every chunk of the blob is held."""
        return len(self._done) == len(self._sizes)

    def missing(self) -> list[bytes]:
        """The distinct chunk hashes not yet held, in blob order."""
        return [h for h in self._sizes if h not in self._done]

    def stalled(self) -> list[bytes]:
        """Missing chunks that no askable peer has and that are not in flight."""
        peers = [p for p in self._peer_chunks if p not in self._banned]
        return [
            h for h in self.missing()
            if h not in self._in_flight
            and not any(self._peer_has(p, h) and p not in self._refused.get(h, ()) for p in peers)
        ]

    def progress(self) -> FetchProgress:
        """Chunks and bytes done and in total, and requests in flight."""
        return FetchProgress(len(self._done), len(self._sizes), self._bytes_done,
                             self._bytes_total, len(self._in_flight))

    def statistics(self) -> dict[str, int]:
        """Counters by outcome: verified, each REJECT_* reason, err, timeout."""
        return dict(self._stats)

    def next_event(self) -> FetchEvent | None:
        """The oldest event not yet read, or None."""
        return self._events.popleft() if self._events else None

    # -- internals -----------------------------------------------------------------------

    def _count(self, key: str) -> None:
        self._stats[key] = self._stats.get(key, 0) + 1

    def _release(self, h: bytes, only: Hashname | None = None) -> None:
        entry = self._in_flight.get(h)
        if entry is None or (only is not None and entry[0] != only):
            return
        del self._in_flight[h]
        p = entry[0]
        if p in self._peer_load:
            self._peer_load[p] = max(0, self._peer_load[p] - 1)

    def _requeue_peer(self, peer: Hashname) -> None:
        mine = [h for h, (p, _) in self._in_flight.items() if p == peer]
        for h in reversed(mine):
            self._release(h)
            self._queue.appendleft(h)

    def _strike(self, peer: Hashname, reason: str) -> None:
        n = self._strikes.get(peer, 0) + 1
        self._strikes[peer] = n
        if n >= MAX_STRIKES and peer not in self._banned:
            self._banned.add(peer)
            self._peer_chunks.pop(peer, None)
            self._requeue_peer(peer)
            self._events.append(PeerBanned(peer, reason))

    def _check_complete(self) -> None:
        if self.is_complete() and not self._completed_reported:
            self._completed_reported = True
            self._events.append(FetchCompleted(self.manifest.blob_hash))
