"""Blob transfers of one endpoint over its ``blob`` channels: a pure coordinator.

Theory of operation
-------------------
:class:`BlobTransfers` is what the Trio shell talks to for blobs, shaped like every protocol
core here (STYLE.md section 2): channel bodies and ``now`` go in (:meth:`receive`), bodies to
send come out (:meth:`messages_to_send`), one timer (:meth:`get_timer`), events
(:meth:`next_event`). It does no I/O: the chunk store is plugged in as ``has``/``get``
callables for reading, and the shell stores what the events hand it (``ManifestReceived``,
``ChunkReceived``) with its own writes.

* **Serving.** A peer's ``want``/``mwant`` is answered from the store (:func:`answer`).
* **Fetching a blob** (:meth:`want_blob`) has two phases. Without its manifest, the
  manifest is asked of one peer at a time (``mwant``), resuming at the offset held; a peer
  that answers ``err``, times out or sends a manifest that does not hash to the blob is
  skipped and the next one asked. With the manifest, a :class:`BlobFetch` plans the
  chunks over every peer that is up (peers that lack a chunk say ``err`` and are not asked
  for it again; ``have`` announcements narrow it down up front).
* **Completion.** ``BlobCompleted`` when every chunk is held; ``BlobStalled`` when no peer
  that is up can provide what is missing (a later :meth:`peer_up` or ``have`` resumes).

Bad input from a peer never raises: it is dropped, counted by reason and reported as
``MessageDropped``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from p2pcloud._ids import Hashname
from p2pcloud.blobs.fetch import MAX_IN_FLIGHT_PER_PEER, REQUEST_TIMEOUT, BlobFetch, ChunkVerified
from p2pcloud.blobs.manifest import Manifest
from p2pcloud.blobs.messages import (
    MAX_INLINE_BLOB,
    MAX_WANT_HASHES,
    BlobMessage,
    ChunkData,
    ChunkError,
    Have,
    ManifestAssembler,
    ManifestPiece,
    ManifestWant,
    Want,
    decode_blob_message,
    encode_blob_message,
)
from p2pcloud.blobs.serve import answer
from p2pcloud.errors import BadManifest, MalformedPacket

__all__ = [
    "MAX_ACTIVE_BLOBS",
    "BlobCompleted",
    "BlobStalled",
    "BlobTransfers",
    "ChunkReceived",
    "ManifestReceived",
    "MessageDropped",
    "TransferEvent",
]

MAX_ACTIVE_BLOBS: Final = 1024
"""Blobs fetched at once: each holds a planner with its chunk list; more wait their turn in
the shell (a folder of 10,000 new files is fetched 1,024 blobs at a time)."""
MAX_QUEUED_MESSAGES: Final = 4096  # outgoing bodies not yet taken; a peer flooding wants waits
MAX_EVENTS: Final = 65536  # events not yet read (one per chunk): a bug guard, oldest dropped


@dataclass(frozen=True, slots=True)
class ManifestReceived:
    """A blob's manifest arrived and verified; keep it (the blob record)."""

    blob: bytes
    manifest: Manifest


@dataclass(frozen=True, slots=True)
class ChunkReceived:
    """A chunk arrived and verified; store it under ``hash``.

    ``manifests`` are those of the blobs being fetched that contain it, so the shell can
    write it straight to where those blobs go (a folder's part file) instead of a store."""

    peer: Hashname
    hash: bytes
    data: bytes
    manifests: tuple[Manifest, ...] = ()


@dataclass(frozen=True, slots=True)
class BlobCompleted:
    """Every chunk of ``blob`` is held."""

    blob: bytes


@dataclass(frozen=True, slots=True)
class BlobStalled:
    """No peer that is up can provide the rest of ``blob`` (``manifest`` False: not even its
    manifest); ``missing`` lists the chunk hashes still to fetch."""

    blob: bytes
    manifest: bool
    missing: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class MessageDropped:
    """A peer's message was refused (``reason``: malformed, bad manifest, ...)."""

    peer: Hashname
    reason: str


TransferEvent = ManifestReceived | ChunkReceived | BlobCompleted | BlobStalled | MessageDropped


class _ManifestQuest:
    """Fetching one manifest: which peer is asked, from which offset, who failed."""

    __slots__ = ("asked", "assembler", "deadline", "failed", "inline")

    def __init__(self, blob: bytes) -> None:
        self.assembler = ManifestAssembler(blob)
        self.inline = False  # the last mwant asked for a small blob's chunks too
        self.asked: Hashname | None = None
        self.deadline = 0.0
        self.failed: set[Hashname] = set()


class BlobTransfers:
    """All blob fetches and answers of one endpoint (see the module docstring)."""

    def __init__(
        self,
        has: Callable[[bytes], bool],
        get: Callable[[bytes], bytes | None],
        get_manifest: Callable[[bytes], Manifest | None],
        *,
        max_in_flight: int = MAX_IN_FLIGHT_PER_PEER,
        request_timeout: float = REQUEST_TIMEOUT,
        get_verifies: bool = False,
    ) -> None:
        """Create the coordinator.

        Args:
            has: whether the local store holds a chunk.
            get: a chunk's bytes from the local store (or a folder's files), or None.
            get_manifest: a blob's manifest held locally, or None.
            max_in_flight: chunk requests outstanding per peer and blob.
            request_timeout: seconds before an unanswered request goes to another peer.
            get_verifies: ``get`` returns only bytes it checked against the hash, so
                answers need not hash them again.
        """
        self._has = has
        self._get = get
        self._get_manifest = get_manifest
        self._get_verifies = get_verifies
        self._max_in_flight = max_in_flight
        self._timeout = request_timeout
        self._peers: set[Hashname] = set()
        self._quests: dict[bytes, _ManifestQuest] = {}
        self._fetches: dict[bytes, BlobFetch] = {}
        self._by_chunk: dict[bytes, set[bytes]] = {}  # chunk hash -> blobs being fetched
        self._stalled: set[bytes] = set()
        self._dirty: set[bytes] = set()  # fetches whose plan may have changed since last planned
        self._ask: set[bytes] = set()  # manifest quests that no peer is asked in right now
        self._out: deque[tuple[Hashname, bytes]] = deque()
        self._events: deque[TransferEvent] = deque(maxlen=MAX_EVENTS)
        self._stats: dict[str, int] = {}

    # -- peers and wishes --------------------------------------------------------------------

    def peer_up(self, peer: Hashname) -> None:
        """A peer with a ``blob`` channel is reachable: it may be asked from now on."""
        self._peers.add(peer)
        for fetch in self._fetches.values():
            fetch.add_peer(peer)
        self._dirty.update(self._fetches)
        self._stalled.clear()  # worth another try

    def peer_down(self, peer: Hashname) -> None:
        """A peer went away: its requests go to others."""
        self._peers.discard(peer)
        for fetch in self._fetches.values():
            fetch.remove_peer(peer)
        self._dirty.update(self._fetches)
        for blob, quest in self._quests.items():
            if quest.asked == peer:
                quest.asked = None
                self._ask.add(blob)

    def want_blob(self, blob: bytes, manifest: Manifest | None = None) -> None:
        """Start (or resume) fetching a blob; chunks already held are not asked for.

        Args:
            blob: the blob hash.
            manifest: its manifest if known (else it is fetched first).

        Raises:
            ValueError: MAX_ACTIVE_BLOBS are being fetched already (finish some first).
        """
        if blob in self._fetches or blob in self._quests:
            return
        if len(self._fetches) + len(self._quests) >= MAX_ACTIVE_BLOBS:
            raise ValueError(f"at most {MAX_ACTIVE_BLOBS} blobs are fetched at once")
        known = manifest if manifest is not None else self._get_manifest(blob)
        if known is not None and known.blob_hash == blob:
            self._start_chunks(known)
        else:
            self._quests[blob] = _ManifestQuest(blob)
            self._ask.add(blob)
        self._stalled.discard(blob)

    def progress(self, blob: bytes) -> tuple[int, int] | None:
        """``(bytes done, bytes total)`` of a blob being fetched; None if unknown or not
        past its manifest yet."""
        fetch = self._fetches.get(blob)
        if fetch is None:
            return None
        p = fetch.progress()
        return p.bytes_done, p.bytes_total

    # -- input -------------------------------------------------------------------------------

    def receive(self, peer: Hashname, body: bytes, now: float) -> None:
        """Take one ``blob`` channel body from a peer. Never raises on bad input.

        Args:
            peer: who sent it.
            body: the channel body.
            now: the current time in seconds.
        """
        try:
            msg = decode_blob_message(body)
        except MalformedPacket as exc:
            self._drop(peer, f"malformed: {exc}")
            return
        if isinstance(msg, (Want, ManifestWant)):
            for reply in answer(msg, self._get, self._get_manifest,
                                verify=not self._get_verifies):
                self._send(peer, reply)
        elif isinstance(msg, Have):
            self._on_have(peer, msg)
        elif isinstance(msg, ChunkData):
            self._on_chunk(peer, msg)
        elif isinstance(msg, ChunkError):
            self._on_error(peer, msg)
        else:
            self._on_manifest_piece(peer, msg, now)

    def _on_have(self, peer: Hashname, msg: Have) -> None:
        for blob in msg.blobs:
            fetch = self._fetches.get(blob)
            if fetch is not None:
                fetch.add_peer(peer)
                self._dirty.add(blob)
        by_blob: dict[bytes, list[bytes]] = {}
        for h in msg.hashes:
            for blob in self._by_chunk.get(h, ()):
                by_blob.setdefault(blob, []).append(h)
        for blob, hashes in by_blob.items():
            self._fetches[blob].add_peer(peer, hashes)
            self._dirty.add(blob)

    def _on_chunk(self, peer: Hashname, msg: ChunkData) -> None:
        blobs = self._by_chunk.get(msg.hash)
        if not blobs:
            self._count("unsolicited chunk")
            return
        verified: list[Manifest] = []
        data = msg.data
        touched = sorted(blobs)
        for blob in touched:
            fetch = self._fetches[blob]
            event = fetch.receive_chunk(peer, msg.hash, msg.data)
            _drain(fetch)
            if isinstance(event, ChunkVerified):
                verified.append(fetch.manifest)
                data = event.data
            self._dirty.add(blob)
        if verified:
            self._count("chunks received")
            self._events.append(ChunkReceived(peer, msg.hash, data, tuple(verified)))
        self._settle(touched)

    def _on_error(self, peer: Hashname, msg: ChunkError) -> None:
        quest = self._quests.get(msg.hash)
        if quest is not None and quest.asked == peer:
            quest.failed.add(peer)
            quest.asked = None  # the next peer is asked at the next messages_to_send
            self._ask.add(msg.hash)
            return
        for blob in self._by_chunk.get(msg.hash, ()):
            self._fetches[blob].receive_error(peer, msg.hash, msg.reason)
            _drain(self._fetches[blob])
            self._dirty.add(blob)

    def _on_manifest_piece(self, peer: Hashname, msg: ManifestPiece, now: float) -> None:
        quest = self._quests.get(msg.blob)
        if quest is None or quest.asked != peer:
            self._count("unsolicited manifest")
            return
        try:
            manifest = quest.assembler.add(msg)
        except BadManifest as exc:
            self._drop(peer, f"bad manifest: {exc}")
            fresh = _ManifestQuest(msg.blob)
            fresh.failed = quest.failed | {peer}
            self._quests[msg.blob] = fresh
            self._ask.add(msg.blob)
            return
        quest.deadline = now + self._timeout  # progress: the peer is alive
        if manifest is None:
            return  # the answer to one mwant is every piece from its offset on: wait
        del self._quests[msg.blob]
        self._events.append(ManifestReceived(msg.blob, manifest))
        self._start_chunks(manifest, first=peer)
        fetch = self._fetches.get(msg.blob)
        if fetch is not None and quest.inline and manifest.size <= MAX_INLINE_BLOB:
            # asked with ``i``: the chunks follow the manifest on this ordered channel
            fetch.expect(peer, manifest.unique_chunks(), now)

    # -- output ------------------------------------------------------------------------------

    def messages_to_send(self, now: float) -> list[tuple[Hashname, bytes]]:
        """Plan requests and return every body to send, as ``(peer, body)``.

        Args:
            now: the current time in seconds.
        """
        for blob in sorted(self._ask):
            quest = self._quests.get(blob)
            if quest is None or quest.asked is not None:
                self._ask.discard(blob)
                continue
            candidates = sorted(self._peers - quest.failed)
            if not candidates:
                if blob not in self._stalled:
                    self._stalled.add(blob)
                    self._events.append(BlobStalled(blob, False, ()))
                continue
            self._ask.discard(blob)
            quest.asked = candidates[0]
            quest.deadline = now + self._timeout
            quest.inline = quest.assembler.offset == 0
            self._send(quest.asked, ManifestWant(blob, quest.assembler.offset, quest.inline))
        # only fetches whose state changed since they were last planned (a chunk, an err, a
        # peer, a timeout): with 1,024 blobs in flight, planning all of them per input
        # would cost more than the inputs themselves
        dirty, self._dirty = self._dirty, set()
        wants: dict[Hashname, dict[bytes, None]] = {}  # per peer, in order, without repeats
        for blob in sorted(dirty):
            fetch = self._fetches.get(blob)
            if fetch is None:
                continue
            plan = fetch.requests(now)
            _drain(fetch)
            for peer, hashes in plan:
                wants.setdefault(peer, {}).update(dict.fromkeys(hashes))
            idle = not plan and fetch.progress().in_flight == 0
            if idle and not fetch.is_complete() and blob not in self._stalled:
                self._stalled.add(blob)
                self._events.append(BlobStalled(blob, True, tuple(fetch.missing())))
        # one want per peer for up to MAX_WANT_HASHES chunks of any blobs: a folder of small
        # files would otherwise cost one message (and one answer pass) per file
        for peer, wanted in sorted(wants.items()):
            todo = list(wanted)
            for i in range(0, len(todo), MAX_WANT_HASHES):
                self._send(peer, Want(tuple(todo[i:i + MAX_WANT_HASHES])))
        out = list(self._out)
        self._out.clear()
        return out

    def get_timer(self) -> float | None:
        """The earliest request deadline, or None when nothing is outstanding."""
        times = [q.deadline for q in self._quests.values() if q.asked is not None]
        times += [t for f in self._fetches.values() if (t := f.get_timer()) is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        """Move requests past their deadline to other peers.

        Args:
            now: the current time in seconds.
        """
        for blob, quest in self._quests.items():
            if quest.asked is not None and quest.deadline <= now:
                quest.failed.add(quest.asked)
                quest.asked = None
                self._ask.add(blob)
                self._count("manifest timeout")
        for fetch in self._fetches.values():
            fetch.handle_timer(now)
            _drain(fetch)
        self._dirty.update(self._fetches)

    def next_event(self) -> TransferEvent | None:
        """The oldest event not yet read, or None."""
        return self._events.popleft() if self._events else None

    def statistics(self) -> dict[str, int]:
        """Counters by outcome (dropped messages by reason, chunks received, timeouts)."""
        out = dict(self._stats)
        for fetch in self._fetches.values():
            for key, n in fetch.statistics().items():
                out[f"chunk {key}"] = out.get(f"chunk {key}", 0) + n
        return out

    # -- internals ---------------------------------------------------------------------------

    def _start_chunks(self, manifest: Manifest, first: Hashname | None = None) -> None:
        fetch = BlobFetch(manifest, self._has, max_in_flight=self._max_in_flight,
                          request_timeout=self._timeout)
        blob = manifest.blob_hash
        self._fetches[blob] = fetch
        for h in fetch.missing():
            self._by_chunk.setdefault(h, set()).add(blob)
        # every peer that is up may have it: those that do not answer err and are skipped
        for peer in sorted(self._peers):
            fetch.add_peer(peer)
        if first is not None:
            fetch.add_peer(first)
        self._dirty.add(blob)
        self._settle([blob])

    def _settle(self, blobs: list[bytes]) -> None:
        for blob in blobs:
            fetch = self._fetches.get(blob)
            if fetch is not None and fetch.is_complete():
                del self._fetches[blob]
                for key, n in fetch.statistics().items():  # keep its counters
                    self._count(f"chunk {key}", n)
                for h in fetch.manifest.unique_chunks():
                    owners = self._by_chunk.get(h)
                    if owners is not None:
                        owners.discard(blob)
                        if not owners:
                            del self._by_chunk[h]
                self._stalled.discard(blob)
                self._events.append(BlobCompleted(blob))

    def _send(self, peer: Hashname, msg: BlobMessage) -> None:
        if len(self._out) >= MAX_QUEUED_MESSAGES:
            self._count("outgoing queue full")
            return
        self._out.append((peer, encode_blob_message(msg)))

    def _drop(self, peer: Hashname, reason: str) -> None:
        self._count(reason.split(":")[0])
        self._events.append(MessageDropped(peer, reason))

    def _count(self, key: str, n: int = 1) -> None:
        self._stats[key] = self._stats.get(key, 0) + n


def _drain(fetch: BlobFetch) -> None:
    # this coordinator acts on what BlobFetch's calls return and on is_complete(); the
    # fetch's own event queue would otherwise keep every verified chunk's bytes (up to
    # fetch.MAX_EVENTS of them) until the blob completes
    while fetch.next_event() is not None:
        pass
