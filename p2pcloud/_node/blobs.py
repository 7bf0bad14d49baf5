"""The node's blob engine: BlobTransfers over one ``blob`` channel per peer, LMDB as chunk store.

Theory of operation
-------------------
:class:`BlobEngine` is the thin Trio shell around the pure
:class:`p2pcloud.blobs.BlobTransfers` (docs/files.md). Every call into the coordinator runs
in a worker thread, one at a time (``self._limiter`` has one token), because the
coordinator reads the store (``has``/``get``/``get_manifest`` are LMDB reads and folder
file reads) inside its methods, and STYLE.md section 3 keeps LMDB off the event loop. One
such call also drains the coordinator's events and outgoing messages, so each input costs
one thread hop.

* **Channel.** One reliable ``blob`` channel per linked peer; its byte stream carries
  length-prefixed frames (u32 big-endian, at most ``MAX_BLOB_MESSAGE``), one blob message
  each. A reader task feeds frames in; a writer task per peer sends what comes out.
* **Storing.** ``ChunkReceived`` chunks (already verified by the coordinator) are
  batched and written by one writer task. A chunk of a blob that a synced folder waits
  for goes straight into that folder's part file (``part_writer``,
  p2pcloud/files/parts.py): the content crosses the disk once, and LMDB's map never holds
  it. Every other chunk goes to LMDB, one transaction per batch (one fsync for many
  chunks). A ``BlobCompleted`` is released only after every chunk received before it
  is durable. ``ManifestReceived`` stores the manifest bytes as a chunk keyed by the blob
  hash (the blob hash *is* the manifest's BLAKE3, so it is content-addressed like any
  chunk), one transaction per batch of manifests; the blob record (size, chunk list) and
  a record ``b"m" + blob`` that pins the manifest are written when the blob is opened
  (``Replication.ensure_blob``) or added locally.
* **Wanting.** ``want`` queues blobs beyond ``MAX_ACTIVE_BLOBS`` and feeds them as others
  complete; waiters (``open_blob``, folders) get a :class:`trio.Event` per blob.
"""

from __future__ import annotations

import logging
import math
import struct
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final

import blake3
import trio

from p2pcloud._ids import Hashname
from p2pcloud.blobs import (
    MAX_BLOB_MESSAGE,
    BlobCompleted,
    BlobStalled,
    BlobTransfers,
    ChunkReceived,
    Manifest,
    ManifestReceived,
    MessageDropped,
    decode_manifest,
)
from p2pcloud.blobs.transfer import MAX_ACTIVE_BLOBS
from p2pcloud.errors import BadManifest, StoreError

if TYPE_CHECKING:
    from p2pcloud._node.stream import ChannelStream
    from p2pcloud._store import Store

__all__ = ["BLOB_FRAME", "BlobEngine", "manifest_record_id"]

log = logging.getLogger("p2pcloud.blobs")

BLOB_FRAME: Final = struct.Struct(">I")  # length prefix of one blob message on the stream
MAX_PENDING_CHUNK_BYTES: Final = 4 * 1024 * 1024
"""Verified chunks held in memory waiting for their LMDB batch: the reader pauses beyond
this, so a disk slower than the network pushes back instead of filling memory."""
MAX_INBOX_BYTES: Final = 4 * 1024 * 1024
"""Received bodies waiting for the coordinator: readers pause beyond this (together with
MAX_PENDING_CHUNK_BYTES, what a fast sender can make us hold)."""
MAX_BODIES_PER_STEP: Final = 256  # bodies per worker call: amortises the thread hop
MAX_RECEIVE: Final = 1024 * 1024  # per receive_some: whole large-frame bodies, uncopied
MAX_WRITE_BATCH_BYTES: Final = 4 * 1024 * 1024  # per writer batch (LMDB dirty pages, part writes)
MAX_COALESCE_BYTES: Final = 1024 * 1024  # queued frames joined into one channel write at most
MAX_WRITE_BATCH_CHUNKS: Final = 256
"""Chunks per writer batch (the store's MAX_CHUNK_BATCH is 4096): a blob's completion waits
for its batch, so small batches keep completions (and the files they let a folder write)
flowing while thousands of small blobs arrive; 256 still amortises an LMDB commit."""
SMALL_CHUNK: Final = 16 * 1024  # below this mean size a batch is mostly new small files
PART_WRITE_THREADS: Final = 4  # threads writing one batch into part files (file creation waits)
MAX_MANIFESTS_PER_BATCH: Final = 2048  # with MAX_WRITE_BATCH_CHUNKS, below the store's 4096
MAX_MANIFEST_CACHE: Final = 4096  # manifests kept decoded in memory (~0.5 MiB per GiB of blob)


def manifest_record_id(blob: bytes) -> bytes:
    """The blob record id that pins a blob's manifest bytes (stored as chunk ``blob``)."""
    return b"m" + blob


class BlobEngine:
    """Blob transfers of one node over LMDB (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        write_limiter: trio.CapacityLimiter,
        extra_chunks: Callable[[bytes], bytes | None] | None = None,
        extra_manifest: Callable[[bytes], Manifest | None] | None = None,
        on_completed: Callable[[bytes], None] | None = None,
        part_writer: Callable[[Manifest, bytes, bytes], bool] | None = None,
    ) -> None:
        """Create the engine (no tasks yet: :meth:`run` starts them).

        Args:
            store: the node's store.
            write_limiter: the node's one-writer limiter for LMDB writes.
            extra_chunks: a second chunk source (synced folders' files).
            extra_manifest: a second manifest source (synced folders' index).
            on_completed: called in the Trio thread when a blob is complete and durable.
            part_writer: ``(manifest, chunk hash, data) -> bool`` writes a verified chunk
                where a folder wants that blob (a worker thread calls it); False keeps the
                chunk in LMDB instead.
        """
        self._store = store
        self._writer = write_limiter
        self._limiter = trio.CapacityLimiter(1)  # the coordinator is used by one thread at a time
        self._extra_chunks = extra_chunks
        self._extra_manifest = extra_manifest
        self._on_completed = on_completed
        self._part_writer = part_writer
        self._disk = trio.CapacityLimiter(1)  # part file writes: one batch at a time
        self._pool: ThreadPoolExecutor | None = None  # the part writers (run)
        self._manifests: dict[bytes, Manifest] = {}
        # verified chunks not yet written, with the manifests of the blobs that need them
        self._pending: dict[bytes, tuple[bytes, tuple[Manifest, ...]]] = {}
        self._pending_bytes = 0
        self._pending_gen: dict[bytes, int] = {}  # when each pending chunk was received
        # received manifests not yet in LMDB. One transaction per batch: a folder of 10,000
        # small files brings 10,000 manifests. The blob records (size, chunk list, manifest
        # pin) are written when a reader opens the blob (Replication.ensure_blob); until
        # then these bytes are unreferenced chunks.
        self._pending_manifests: dict[bytes, Manifest] = {}
        self._flushing: dict[bytes, tuple[bytes, tuple[Manifest, ...]]] = {}  # being written
        self._received_gen = 0
        self._stored_gen = 0
        self._completions: deque[tuple[int, bytes]] = deque()
        self._wake_writer = trio.Event()
        self._room = trio.Event()
        self._transfers = BlobTransfers(self._has, self._get, self._get_manifest,
                                        get_verifies=True)
        self._out: dict[Hashname, trio.MemorySendChannel[bytes]] = {}
        self._waiters: dict[bytes, trio.Event] = {}
        self._backlog: deque[bytes] = deque()  # wanted blobs beyond MAX_ACTIVE_BLOBS
        self._wanted: set[bytes] = set()
        self._stats: Counter[str] = Counter()
        self.bytes_received: Counter[Hashname] = Counter()
        """Blob channel bytes read from each peer (frames included)."""
        self._timer_changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        # bodies read from the channels, not yet given to the coordinator (_inbox_loop)
        self._inbox: deque[tuple[Hashname, bytes]] = deque()
        self._inbox_bytes = 0
        self._inbox_wake = trio.Event()
        self._inbox_room = trio.Event()

    # -- chunk store callables (run in the coordinator's worker thread) ---------------------

    def _has(self, digest: bytes) -> bool:
        if digest in self._pending or digest in self._flushing:
            return True
        if self._store.has_chunks([digest]):
            return True
        return self._extra_chunks is not None and self._extra_chunks(digest) is not None

    def _get(self, digest: bytes) -> bytes | None:
        # verified bytes only (BlobTransfers(get_verifies=True)): pending chunks were
        # verified on receipt, folders verify what they read, LMDB's are checked here
        held = self._pending.get(digest) or self._flushing.get(digest)
        if held is not None:
            return held[0]
        data = self._store.get_chunk(digest)
        if data is not None and blake3.blake3(data).digest() != digest:
            self._stats["corrupt chunks in the store"] += 1
            log.error("chunk %s in the store does not match its hash", digest.hex()[:16])
            data = None
        if data is None and self._extra_chunks is not None:
            data = self._extra_chunks(digest)
        return data

    def _get_manifest(self, blob: bytes) -> Manifest | None:
        cached = self._manifests.get(blob) or self._pending_manifests.get(blob)
        if cached is not None:
            return cached
        raw = self._store.get_chunk(blob)
        if raw is not None:
            try:
                manifest = decode_manifest(raw, blob)
            except BadManifest:
                manifest = None
            if manifest is not None:
                self._cache(manifest)
                return manifest
        if self._extra_manifest is not None:
            return self._extra_manifest(blob)
        return None

    def _cache(self, manifest: Manifest) -> None:
        if len(self._manifests) >= MAX_MANIFEST_CACHE:
            self._manifests.pop(next(iter(self._manifests)))
        self._manifests[manifest.blob_hash] = manifest

    def manifest(self, blob: bytes) -> Manifest | None:
        """A held manifest (store, cache or a folder), read synchronously (worker threads)."""
        return self._get_manifest(blob)

    # -- running ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the timer and the chunk writer until cancelled."""
        # the part writers: kept for the engine's life (threads made per batch cost their
        # creation and, with glibc, a fresh malloc arena each)
        self._pool = ThreadPoolExecutor(PART_WRITE_THREADS, thread_name_prefix="p2pcloud-parts")
        try:
            await self._run(task_status)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._timer_loop)
            nursery.start_soon(self._writer_loop)
            nursery.start_soon(self._inbox_loop)
            task_status.started()

    async def _step(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run one coordinator call in the worker thread, then act on what it produced."""
        now = trio.current_time()

        def work() -> tuple[list[Any], list[tuple[Hashname, bytes]]]:
            fn(*args)
            # plan first, then drain: planning itself emits events (BlobStalled when no
            # peer is left to ask), and with nothing in flight there may be no later step
            # to report them
            messages = self._transfers.messages_to_send(now)
            events = []
            while (event := self._transfers.next_event()) is not None:
                events.append(event)
            return events, messages

        events, messages = await trio.to_thread.run_sync(work, limiter=self._limiter)
        await self._handle(events)
        for peer, body in messages:
            out = self._out.get(peer)
            if out is not None:
                out.send_nowait(body)
        self._timer_changed.set()

    async def _handle(self, events: Iterable[Any]) -> None:
        manifests: list[Manifest] = []
        for event in events:
            if isinstance(event, ChunkReceived):
                self._received_gen += 1
                if event.hash not in self._pending:
                    self._pending[event.hash] = (event.data, event.manifests)
                    self._pending_gen[event.hash] = self._received_gen
                    self._pending_bytes += len(event.data)
                self._stats["chunks received"] += 1
            elif isinstance(event, ManifestReceived):
                manifests.append(event.manifest)
            elif isinstance(event, BlobCompleted):
                self._completions.append((self._received_gen, event.blob))
            elif isinstance(event, BlobStalled):
                self._stats["stalled"] += 1
                log.info("blob %s stalled: no peer has %d chunk(s)%s", event.blob.hex()[:16],
                         len(event.missing), "" if event.manifest else " nor the manifest")
            elif isinstance(event, MessageDropped):
                self._stats[f"dropped: {event.reason.split(':')[0]}"] += 1
                log.warning("blob message from %s refused: %s", event.peer[:8], event.reason)
        for m in manifests:
            self._cache(m)
            # stored by the writer task with the next chunk batch, not here: a durable
            # transaction on the read path stalled the channel for every manifest batch
            self._pending_manifests[m.blob_hash] = m
        if self._pending or self._completions or self._pending_manifests:
            self._wake_writer.set()

    async def _writer_loop(self) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer = trio.Event()
            while self._pending or self._pending_manifests:
                # the oldest chunks first (dicts keep insertion order), so once a batch is
                # written every chunk received up to its newest one is durable: the blobs
                # completed by then can be released now, not when the queue runs dry
                gen = self._stored_gen
                batch: dict[bytes, tuple[bytes, tuple[Manifest, ...]]] = {}
                size = 0
                for digest in list(self._pending):
                    if batch and (size >= MAX_WRITE_BATCH_BYTES
                                  or len(batch) >= MAX_WRITE_BATCH_CHUNKS):
                        break
                    held = self._pending.pop(digest)
                    gen = self._pending_gen.pop(digest)
                    batch[digest] = held
                    size += len(held[0])
                if not self._pending:
                    gen = self._received_gen
                self._flushing = batch
                manifests: list[Manifest] = []
                for blob in list(self._pending_manifests)[:MAX_MANIFESTS_PER_BATCH]:
                    manifests.append(self._pending_manifests.pop(blob))
                try:
                    rest = {d: data for d, (data, ms) in batch.items() if not ms}
                    if len(rest) < len(batch):
                        rest.update(await trio.to_thread.run_sync(
                            self._write_parts, batch, limiter=self._disk))
                    rest.update((m.blob_hash, m.encoded) for m in manifests)
                    if rest:
                        await trio.to_thread.run_sync(self._store.put_chunks, rest,
                                                      limiter=self._writer)
                except StoreError:
                    log.exception("storing %d received chunks failed; they will be re-fetched",
                                  len(batch))
                    self._stats["chunk writes failed"] += 1
                finally:
                    self._flushing = {}
                    self._pending_bytes -= size
                    self._room.set()
                    self._room = trio.Event()
                self._stored_gen = gen
                await self._release_completions()
            if not self._pending:
                self._stored_gen = self._received_gen
            await self._release_completions()

    async def _release_completions(self) -> None:
        """Report the blobs whose every chunk is durable (see _writer_loop)."""
        done: list[bytes] = []
        while self._completions and self._completions[0][0] <= self._stored_gen:
            done.append(self._completions.popleft()[1])
        for blob in done:
            self._complete(blob)
        if done:
            await self._feed_backlog()

    def _write_parts(self, batch: dict[bytes, tuple[bytes, tuple[Manifest, ...]]]
                     ) -> dict[bytes, bytes]:
        """Write chunks into folders' part files; return those no folder took."""
        writer = self._part_writer
        todo = [(d, data, ms) for d, (data, ms) in batch.items() if ms]

        def one(item: tuple[bytes, bytes, tuple[Manifest, ...]]) -> bool:
            digest, data, manifests = item
            taken = False
            if writer is not None:
                for m in manifests:
                    try:
                        taken = writer(m, digest, data) or taken
                    except OSError:
                        log.exception("writing a chunk into a part file failed")
            return taken

        pool = self._pool
        if len(todo) > 1 and pool is not None and sum(len(d) for _, d, _ in todo) < (
                len(todo) * SMALL_CHUNK):
            # creating a file costs ~0.5 ms of file system work here, most of it waiting:
            # a folder of small files is written by a few threads at once. Large chunks
            # (of files being filled) are plain pwrites into the page cache: this thread.
            taken = list(pool.map(one, todo))
        else:
            taken = [one(item) for item in todo]
        rest: dict[bytes, bytes] = {}
        for (digest, data, _ms), ok in zip(todo, taken, strict=True):
            if ok:
                self._stats["chunks written to part files"] += 1
            else:
                rest[digest] = data
        return rest

    def _complete(self, blob: bytes) -> None:
        self._stats["blobs completed"] += 1
        self._wanted.discard(blob)
        event = self._waiters.pop(blob, None)
        if event is not None:
            event.set()
        if self._on_completed is not None:
            self._on_completed(blob)

    async def _timer_loop(self) -> None:
        while True:
            deadline = self._transfers.get_timer()
            with trio.move_on_at(deadline if deadline is not None else math.inf):
                await self._timer_changed.wait()
                self._timer_changed = trio.Event()
                continue
            await self._step(self._transfers.handle_timer, trio.current_time())

    # -- wanting ------------------------------------------------------------------------------

    async def want(self, blobs: Iterable[tuple[bytes, Manifest | None]]) -> None:
        """Fetch these blobs (resuming: chunks held are not asked for).

        Args:
            blobs: ``(blob hash, manifest or None)`` pairs.
        """
        for blob, manifest in blobs:
            if blob in self._wanted:
                continue
            self._wanted.add(blob)
            if manifest is not None:
                self._cache(manifest)
            self._backlog.append(blob)
        await self._feed_backlog()

    async def _feed_backlog(self) -> None:
        take: list[bytes] = []
        active = len(self._wanted) - len(self._backlog)
        while self._backlog and active + len(take) < MAX_ACTIVE_BLOBS:
            take.append(self._backlog.popleft())
        if not take:
            return

        def start() -> None:
            for blob in take:
                try:
                    self._transfers.want_blob(blob)
                except ValueError:
                    self._backlog.appendleft(blob)  # the coordinator is full: later

        await self._step(start)

    def waiter(self, blob: bytes) -> trio.Event:
        """An event set when ``blob`` is complete and durable (the caller wants it first)."""
        return self._waiters.setdefault(blob, trio.Event())

    def progress(self) -> tuple[int, int]:
        """``(bytes done, bytes total)`` over the blobs being fetched (manifests known)."""
        done = total = 0
        for blob in list(self._wanted):
            p = self._transfers.progress(blob)
            if p is not None:
                done += p[0]
                total += p[1]
        return done, total

    def statistics(self) -> dict[str, int]:
        """Counters of the engine and of the coordinator."""
        out = dict(self._stats)
        out.update(self._transfers.statistics())
        out["wanted"] = len(self._wanted)
        return out

    # -- channels -------------------------------------------------------------------------------

    async def run_channel(self, stream: ChannelStream) -> None:
        """Serve one peer's ``blob`` channel until it ends (either side may have opened it).

        Args:
            stream: the reliable channel.
        """
        peer = stream.hashname
        send, receive = trio.open_memory_channel[bytes](math.inf)
        old = self._out.get(peer)
        if old is not None:
            old.close()
        self._out[peer] = send
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_frames, stream, receive, nursery.cancel_scope)
                await self._step(self._transfers.peer_up, peer)
                await self._read_frames(stream, peer)
                nursery.cancel_scope.cancel()
        finally:
            if self._out.get(peer) is send:
                del self._out[peer]
                with trio.CancelScope(shield=True):
                    await self._step(self._transfers.peer_down, peer)
            send.close()

    async def _write_frames(self, stream: ChannelStream, receive: trio.MemoryReceiveChannel[bytes],
                            scope: trio.CancelScope) -> None:
        try:
            async for body in receive:
                frames = [BLOB_FRAME.pack(len(body)), body]
                size = len(body)
                while size < MAX_COALESCE_BYTES:  # coalesce what is queued into one write
                    try:
                        more = receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    frames += [BLOB_FRAME.pack(len(more)), more]
                    size += len(more)
                await stream.send_all(b"".join(frames))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            scope.cancel()

    async def _read_frames(self, stream: ChannelStream, peer: Hashname) -> None:
        buf = bytearray()
        while True:
            try:
                data = await stream.receive_some(MAX_RECEIVE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            self.bytes_received[peer] += len(data)
            buf += data
            pos = 0
            size = 0
            with memoryview(buf) as view:
                while len(buf) - pos >= BLOB_FRAME.size:
                    (n,) = BLOB_FRAME.unpack_from(view, pos)
                    if n > MAX_BLOB_MESSAGE:
                        self._stats["dropped: oversized frame"] += 1
                        log.warning("blob channel from %s sent a %d-byte frame; closing it",
                                    peer[:8], n)
                        return
                    end = pos + BLOB_FRAME.size + n
                    if len(buf) < end:
                        break
                    # one copy per body (out of the view), one memmove of the rest below
                    self._inbox.append((peer, bytes(view[pos + BLOB_FRAME.size:end])))
                    size += n
                    pos = end
            del buf[:pos]
            if size:
                self._inbox_bytes += size
                self._inbox_wake.set()
            # the processor takes the bodies while this task reads on: receiving (and the
            # channel's decryption) overlaps with verifying and answering in the worker
            while self._inbox_bytes > MAX_INBOX_BYTES:
                await self._inbox_room.wait()
            while self._pending_bytes > MAX_PENDING_CHUNK_BYTES:
                await self._room.wait()

    async def _inbox_loop(self) -> None:
        """Feed every peer's received bodies to the coordinator, many per worker call."""
        while True:
            await self._inbox_wake.wait()
            self._inbox_wake = trio.Event()
            while self._inbox:
                items: list[tuple[Hashname, bytes]] = []
                size = 0
                while self._inbox and len(items) < MAX_BODIES_PER_STEP:
                    peer, body = self._inbox.popleft()
                    items.append((peer, body))
                    size += len(body)
                now = trio.current_time()

                def feed(items: list[tuple[Hashname, bytes]] = items, now: float = now) -> None:
                    for peer, body in items:
                        self._transfers.receive(peer, body, now)

                try:
                    await self._step(feed)
                finally:
                    self._inbox_bytes -= size
                    self._inbox_room.set()
                    self._inbox_room = trio.Event()
