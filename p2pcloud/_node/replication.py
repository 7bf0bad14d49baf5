"""The replication engine: sub-clouds made real inside the node (docs/subclouds.md).

Theory of operation
-------------------
One :class:`Replication` per node with a data dir. It owns the node's one LMDB
:class:`~p2pcloud._store.Store` (``<data dir>/store``), the sync
:class:`~p2pcloud.sync.Catalog`, one core ``Replica`` per sub-cloud (in memory), the
:class:`~p2pcloud._node.blobs.BlobEngine`, and three reliable channels per linked peer:

* ``sync``: SYNC's :class:`~p2pcloud.sync.SyncSession` (docs/sync.md). A *driver* task per
  session answers its storage requests from the store in worker threads and sends what it
  produces; a reader task feeds it the channel's bytes; a timer task runs anti-entropy.
* ``blob``: the blob engine (p2pcloud/_node/blobs.py).
* ``subclouds``: signed registry records (owner, ACL; subcloud.py), so a peer learns of a
  sub-cloud shared with it.

The endpoint with the lower hashname opens the three channels when a link comes Up and
reopens one that ends while the link stays Up; the other side serves them.

**A local write** (``SubCloud.put`` ...): under the sub-cloud's lock, ``Replica.begin``,
the writes, ``commit()`` give a delta; it is sealed (``sync.seal``) and written with
``Store.commit_local`` in a worker thread; only then does the call return (durable), the
catalog records it, subscribers are told and the envelope is pushed to every session.
If the store refuses, the replica is reloaded from the store (the write never happened).

**Received envelopes**: verified in a worker thread (``sync.open_envelope`` with the
rights check :meth:`Replication.can_write`); rejected ones are logged with their reason
and counted, and change nothing. The rest are applied to the replica (a delta the core
refuses is dropped the same way), stored with ``append_envelopes`` (one transaction per
batch), recorded in the catalog, pushed on to the other sessions, told to subscribers and
to synced folders; only then is the batch acknowledged, so the peer resends anything we
crashed before storing.

**Crash**: the store is the truth. At start every sub-cloud is loaded from its latest
checkpoint plus the log after it (``Store.load_state``). Checkpoints are written every
``CHECKPOINT_EVERY`` stored envelopes, every ``CHECKPOINT_INTERVAL`` seconds when
something changed, and on clean close; the log is truncated up to what every member is
known to hold (``sync.fold_point``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import mmap
import os
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio

from p2pcloud import _core
from p2pcloud._core import BlobRef, Replica
from p2pcloud._ids import Hashname, ReplicaId, SubCloudId
from p2pcloud._node.blobs import BlobEngine, manifest_record_id
from p2pcloud._node.subcloud import (
    MAX_LOADED_REPLICAS,
    Change,
    DerivedCache,
    PeerProgress,
    RegistryRecord,
    SubCloud,
    decode_record,
    sign_record,
)
from p2pcloud._store import AppendResult, Store, SubCloudRecord
from p2pcloud._wire import b32decode
from p2pcloud.blobs import Manifest, iter_chunks
from p2pcloud.errors import (
    AccessDenied,
    BadRecord,
    BlobError,
    ClockSkewError,
    DecodeError,
    DeltaRejected,
    LinkError,
    LocalProtocolError,
    MalformedPacket,
    StoreError,
    UnknownSubCloud,
)
from p2pcloud.sync import (
    Catalog,
    EnvelopesReceived,
    EnvelopesWanted,
    MessageDropped,
    PeerVersionLearned,
    SessionFailed,
    SnapshotReceived,
    SnapshotWanted,
    SyncSession,
    fold_point,
    open_envelope,
    replica_id_for,
    seal,
    version_digest,
)
from p2pcloud.sync.envelope import Envelope

if TYPE_CHECKING:
    # p2pcloud.files (and watchfiles, anyio) load with the first synced folder: a node
    # without folders never needs them, and they cost the idle daemon ~2 MiB (docs/daemon.md)
    from p2pcloud._node.node import Node
    from p2pcloud._node.stream import ChannelStream
    from p2pcloud.files import Folder

__all__ = [
    "CHECKPOINT_EVERY",
    "CHECKPOINT_INTERVAL",
    "REGISTRY_CHANNEL",
    "SYNC_CHANNEL",
    "Replication",
]

log = logging.getLogger("p2pcloud.replication")

SYNC_CHANNEL: Final = "sync"
BLOB_CHANNEL: Final = "blob"
REGISTRY_CHANNEL: Final = "subclouds"
CHECKPOINT_EVERY: Final = 2000
"""Stored envelopes between checkpoints: bounds the log replayed at start-up (~2,000 small
deltas load in tens of milliseconds) while a snapshot is not rewritten on every write."""
CHECKPOINT_INTERVAL: Final = 60.0  # seconds: a quiet sub-cloud still gets its log folded
REOPEN_DELAY: Final = 1.0  # seconds before reopening a channel that ended on an Up link
REGISTRY_FRAME: Final = struct.Struct(">I")
MAX_REGISTRY_FRAME: Final = 64 * 1024  # a registry record is at most 32 KiB (subcloud.py)
FOLDER_BATCH_DELAY: Final = 0.2  # seconds a folder waits to batch completions into a reconcile
MAX_BLOB_FROM_STREAM: Final = 1 << 30
"""Bytes ``add_blob`` reads from a stream into memory before chunking (a path is mapped,
not read): larger content should be given as a file path."""
MAX_PUT_BATCH_BYTES: Final = 64 * 1024 * 1024  # chunks per store transaction when adding a blob
MAX_PUT_BATCH_CHUNKS: Final = 4096  # the store's MAX_CHUNK_BATCH
MAX_REJECT_LOG: Final = 1000  # rejected deltas remembered for statistics() (most recent)
MAX_UNSHARED: Final = 256  # registry records held back until rights arrive (a join's first)
DERIVED_FILE: Final = "derived.cbor"  # SubCloud.derived() values, beside the store


class CloudRules(Protocol):
    """What the cloud (``_node/cloud.py``) decides for the engine; None means "no opinion"
    (the sub-cloud is not part of the cloud, or the node is in no cloud): the registry ACL
    decides then."""

    def can_write(self, record: RegistryRecord, hashname: Hashname) -> bool | None:
        """May ``hashname`` write the sub-cloud now?"""

    def had_write(self, record: RegistryRecord, hashname: Hashname) -> bool | None:
        """Did ``hashname`` hold write rights (revoked authors too), for verification?"""

    def may_read(self, record: RegistryRecord, hashname: Hashname) -> bool | None:
        """May ``hashname`` replicate the sub-cloud (grants, revocation, policy)?"""

    def accepts_delta(self, subcloud: SubCloudId, hashname: Hashname, origin: ReplicaId,
                      first: int, last: int) -> bool:
        """Whether a verified delta's dot run is acceptable (revocation cutoffs)."""

    def intro_records(self, peer: Hashname) -> list[bytes]:
        """Cloud records to send a peer when the registry channel opens (our chain)."""

    def accepts_snapshot(self, record: RegistryRecord, peer: Hashname,
                         version: dict[bytes, int]) -> bool:
        """Whether to merge a snapshot ``peer`` sent (it holds no signatures)."""

    def take_record(self, raw: bytes, peer: Hashname) -> bool:
        """Take a cloud record that came on the registry channel; False: not one."""


def _now_ms() -> int:
    # the core wants wall-clock milliseconds (HLC); the shell is where the clock is read
    import time

    return time.time_ns() // 1_000_000


class _SessionRunner:
    """One sync session and the wake-up its driver task waits on."""

    __slots__ = ("kick", "session", "stream")

    def __init__(self, session: SyncSession, stream: ChannelStream) -> None:
        self.session = session
        self.stream = stream
        self.kick = trio.Event()

    def wake(self) -> None:
        self.kick.set()


class Replication:
    """The node's sub-clouds, store and replication channels (see the module docstring)."""

    def __init__(self, node: Node, store: Store) -> None:
        """Create the engine; :meth:`start` loads the sub-clouds and starts the tasks."""
        self.node = node
        self.store = store
        self.identity = node.identity
        self.hashname = node.hashname
        self.catalog = Catalog()
        self.subclouds: dict[SubCloudId, SubCloud] = {}
        self.writer = trio.CapacityLimiter(1)  # LMDB serialises writers; queue them here
        self.readers = trio.CapacityLimiter(4)
        self.cpu = trio.CapacityLimiter(2)  # verification, merges, folder scans
        self.blobs = BlobEngine(
            store, write_limiter=self.writer, extra_chunks=self._folder_chunk,
            extra_manifest=self._folder_manifest, on_completed=self._blob_completed,
            part_writer=self._folder_part,
        )
        self._sessions: dict[Hashname, _SessionRunner] = {}
        self._registry_out: dict[Hashname, trio.MemorySendChannel[bytes]] = {}
        self._openers: set[Hashname] = set()
        self._nursery: trio.Nursery | None = None
        self._folder_wake: dict[int, tuple[trio.Event, set[str]]] = {}
        self._folder_woken_other: set[int] = set()  # woken by more than blob completions
        self._folder_woken_local: set[int] = set()  # woken by the watcher (local edits)
        self._blob_paths: dict[bytes, list[tuple[Folder, str]]] = {}
        self._stats: Counter[str] = Counter()
        self.rejections: list[tuple[str, str, str]] = []
        """Recent rejected inputs: (peer, reason, detail), newest last."""
        self._closed = False
        self.rules: CloudRules | None = None
        """The cloud's rights (grants, revocations, policy); set by ``_node/cloud.py``."""
        self.subcloud_listeners: list[Callable[[SubCloud], None]] = []
        """Called with every sub-cloud this node starts holding (created or received)."""
        self.change_listeners: list[Callable[[SubCloud, list[Change]], None]] = []
        """Called with every batch of changes of any sub-cloud, local or merged (after its
        subscribers); quick synchronous callbacks (``_node/things.py`` wakes its rules)."""
        self._unshared: dict[SubCloudId, RegistryRecord] = {}
        self.replica_budget = MAX_LOADED_REPLICAS
        """Unpinned replicas kept in memory (subcloud.py); tests lower it."""
        self._loaded: OrderedDict[SubCloudId, SubCloud] = OrderedDict()  # LRU, newest last
        self.derived_cache = DerivedCache()
        # registry records refused because they were not (yet) shared with us; re-checked by
        # refresh_shares() when the cloud's membership changes (a joiner's first records can
        # arrive before its welcome is processed)

    # -- rights ---------------------------------------------------------------------------------

    def can_write(self, subcloud: SubCloudId, hashname: Hashname) -> bool:
        """The rights check: may ``hashname`` write to ``subcloud``?

        The cloud's grants decide for sub-clouds of the cloud (``rules``); the registry
        ACL decides otherwise (sharing outside the cloud).
        """
        sc = self.subclouds.get(subcloud)
        if sc is None:
            return False
        if self.rules is not None:
            verdict = self.rules.can_write(sc.record, hashname)
            if verdict is not None:
                return verdict
        return sc.record.rights(hashname) == "write"

    def may_read(self, subcloud: SubCloudId, hashname: Hashname) -> bool:
        """Whether a peer may replicate ``subcloud`` (cloud grants and policy, the owner,
        or any ACL entry)."""
        sc = self.subclouds.get(subcloud)
        return sc is not None and self.record_readable(sc.record, hashname)

    def record_readable(self, record: RegistryRecord, hashname: Hashname) -> bool:
        """Whether ``hashname`` may replicate the sub-cloud ``record`` describes."""
        if self.rules is not None:
            verdict = self.rules.may_read(record, hashname)
            if verdict is not None:
                return verdict
        return record.rights(hashname) is not None

    def _had_write(self, subcloud: SubCloudId, hashname: Hashname) -> bool:
        # envelope verification: a revoked author's deltas up to its cutoff still verify
        # (anyone may forward them); accepts_delta() then judges the dot run
        sc = self.subclouds.get(subcloud)
        if sc is not None and self.rules is not None:
            verdict = self.rules.had_write(sc.record, hashname)
            if verdict is not None:
                return verdict
        return self.can_write(subcloud, hashname)

    def _accepts(self, env: Envelope) -> bool:
        return self.rules is None or self.rules.accepts_delta(
            env.subcloud, env.hashname, env.origin, env.first, env.last)

    def refresh_shares(self) -> None:
        """Rights changed (a member joined, was revoked, a policy changed): send peers the
        registry records they may now read, take records held back earlier, re-run sync."""
        for peer, out in list(self._registry_out.items()):
            if self.rules is not None:
                for raw in self.rules.intro_records(peer):
                    out.send_nowait(raw)
            for sc in self.subclouds.values():
                if self.may_read(sc.id, peer):
                    self._send_record(peer, sc.record)
        if self._nursery is not None:
            for record in list(self._unshared.values()):
                if self.record_readable(record, self.hashname):
                    del self._unshared[record.subcloud]
                    self._nursery.start_soon(self._adopt_record, record)
        now = trio.current_time()
        for runner in self._sessions.values():
            runner.session.rebuild_shares(now)  # the sessions cache what they share
            runner.wake()

    async def _adopt_record(self, record: RegistryRecord) -> None:
        if record.subcloud not in self.subclouds:
            await self._put_record(record)
            self._rerun_sessions()

    def _changed(self, sc: SubCloud, changes: list[Change]) -> None:
        """Tell a sub-cloud's subscribers and the change listeners what changed."""
        sc._notify(changes)
        for listener in self.change_listeners:
            listener(sc, changes)

    def _reject(self, peer: str, reason: str, detail: str = "") -> None:
        self._stats[f"rejected: {reason}"] += 1
        self.rejections.append((peer, reason, detail))
        del self.rejections[:-MAX_REJECT_LOG]
        log.warning("refused input from %s: %s %s", peer[:8], reason, detail)

    def statistics(self) -> dict[str, int]:
        """Counters: rejections by reason, envelopes stored, checkpoints, blob engine."""
        out = dict(self._stats)
        for k, v in self.blobs.statistics().items():
            out[f"blob {k}"] = v
        return out

    # -- start and stop -------------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Load every sub-cloud from the store, serve the channels, start the tasks."""
        self._nursery = nursery
        records = await trio.to_thread.run_sync(self.store.subclouds, limiter=self.readers)
        summaries = await trio.to_thread.run_sync(self.store.summaries, limiter=self.readers)
        for sc_id, rec in records.items():
            raw = rec.policy.get("record") if isinstance(rec.policy, dict) else None
            try:
                record = decode_record(raw if isinstance(raw, bytes) else b"")
            except BadRecord as exc:
                log.error("sub-cloud %s has a bad registry record, skipped: %s", sc_id.hex(), exc)
                continue
            # no replica is loaded here: SubCloud.replica / loaded() load one on first use
            self.subclouds[sc_id] = sc = SubCloud(self, record)
            s = summaries.get(sc_id)
            if s is not None:
                sc.log_dots = s.log_dots
                self.catalog.set_subcloud(sc_id, _plain(s.version), _plain(s.floor),
                                          log_bytes=s.log_bytes,
                                          log_dots=s.log_dots)
            else:
                self.catalog.set_subcloud(sc_id)
        if self.node.data_dir is not None:
            self.derived_cache = await trio.to_thread.run_sync(
                DerivedCache.load, self.node.data_dir / DERIVED_FILE, limiter=self.readers)
        await nursery.start(self.blobs.run)
        self.node.serve_channel(SYNC_CHANNEL, self._run_sync)
        self.node.serve_channel(BLOB_CHANNEL, self.blobs.run_channel)
        self.node.serve_channel(REGISTRY_CHANNEL, self._run_registry)
        self.node._link_listeners.append(self._on_link)
        nursery.start_soon(self._checkpoint_loop)
        for h in self.node.links:
            self._on_link(h, True)

    # -- lazy replicas (subcloud.py, "Lazy replicas") --------------------------------------------

    def _touch(self, sc: SubCloud) -> None:
        if sc._replica is not None:
            self._loaded[sc.id] = sc
            self._loaded.move_to_end(sc.id)

    def _install(self, sc: SubCloud, replica: Replica) -> Replica:
        """Keep a freshly loaded replica (unless another load won meanwhile), then trim."""
        if sc._replica is None:
            sc._replica = replica
            self._stats["replica loads"] += 1
        self._touch(sc)
        self._trim(keep=sc)
        assert sc._replica is not None
        return sc._replica

    def _trim(self, keep: SubCloud) -> None:
        """Drop least recently used unpinned replicas beyond the budget (never ``keep``, the
        one just loaded); replicas with writes since their checkpoint go last (their next
        load replays a longer log)."""
        excess = len(self._loaded) - self.replica_budget
        if excess <= 0:
            return
        for clean_only in (True, False):
            for sc_id, sc in list(self._loaded.items()):
                if excess <= 0:
                    return
                if sc._replica is None:
                    del self._loaded[sc_id]
                    excess -= 1
                elif (sc is not keep and (not clean_only or sc.since_checkpoint == 0)
                      and sc._drop()):
                    del self._loaded[sc_id]
                    self._stats["replica drops"] += 1
                    excess -= 1

    def _load_now(self, sc: SubCloud) -> Replica:
        """Load a replica in the calling thread (a synchronous reader needs it now)."""
        return self._install(sc, self._load_replica(sc.id))

    async def loaded(self, sc: SubCloud, *, locked: bool = False) -> Replica:
        """The sub-cloud's replica, loaded in a worker thread if it is not in memory.

        The load runs under the sub-cloud's lock (``locked``: the caller holds it), so no
        write or merge can land in the store between reading the state and installing it.
        """
        if sc._replica is not None:
            self._touch(sc)
            return sc._replica
        if locked:
            replica = await trio.to_thread.run_sync(self._load_replica, sc.id, limiter=self.cpu)
            return self._install(sc, replica)
        async with sc.lock:
            return await self.loaded(sc, locked=True)

    def fingerprint(self, sc: SubCloud) -> bytes:
        """The state of a sub-cloud's store, for SubCloud.derived(): version and floor
        (catalog) and the dots in the log. Within one node a state only grows, and a fold
        raises the floor, so equal fingerprints mean equal states."""
        return hashlib.sha256(
            self.catalog.digest(sc.id) + version_digest(self.catalog.floor(sc.id))
            + sc.log_dots.to_bytes(8, "big")).digest()[:16]

    async def _save_derived(self) -> None:
        if not self.derived_cache.dirty or self.node.data_dir is None:
            return
        copy = self.derived_cache.copy()  # the Trio thread keeps changing the original
        try:
            await trio.to_thread.run_sync(copy.save, self.node.data_dir / DERIVED_FILE,
                                          limiter=self.writer)
        except OSError:
            self.derived_cache.dirty = True
            log.exception("saving derived values failed (they are recomputed)")

    def _load_replica(self, sc_id: SubCloudId) -> Replica:
        rid = replica_id_for(sc_id, self.hashname)
        state = self.store.load_state(sc_id)
        now = _now_ms()
        replica = Replica.load(state.snapshot, rid, now) if state.snapshot else Replica(rid)
        deltas: list[bytes] = []
        for rec in state.records:
            try:
                deltas.append(_envelope_delta(rec.envelope))
            except DeltaRejected:
                log.error("stored envelope of %s unreadable, skipped", sc_id.hex())
        try:
            replica.apply(deltas, now)
        except (DecodeError, ClockSkewError):
            for d in deltas:  # one bad delta must not keep the rest out
                try:
                    replica.apply([d], now)
                except (DecodeError, ClockSkewError) as exc:
                    log.error("stored delta of %s refused by the core: %s", sc_id.hex(), exc)
        return replica

    async def aclose(self) -> None:
        """Checkpoint every sub-cloud that changed (a clean close loads fast next time)."""
        if self._closed:
            return
        self._closed = True
        for sc in list(self.subclouds.values()):
            if sc.since_checkpoint and sc.is_loaded:  # a dropped one replays its log later
                try:
                    await self.checkpoint(sc)
                except StoreError:
                    log.exception("checkpoint of %s at close failed", sc.name)
        await self._save_derived()

    # -- sub-clouds -----------------------------------------------------------------------------

    async def create_subcloud(self, name: str, kind: str = "device") -> SubCloud:
        """Create a sub-cloud owned by this node (see ``Node.create_subcloud``)."""
        sc_id = SubCloudId(os.urandom(16))
        record = sign_record(self.identity, sc_id, name=name, kind=kind, acl={}, revision=1)
        await self._put_record(record)
        # members of the cloud may read it at once (cloud grants): tell the linked ones
        for peer in list(self._registry_out):
            if self.may_read(sc_id, peer):
                self._send_record(peer, record)
        return self.subclouds[sc_id]

    def find(self, id_or_name: str | bytes) -> SubCloud:
        """A held sub-cloud by id (16 bytes or base32) or by name.

        Raises:
            UnknownSubCloud: none matches (or a name matches several).
        """
        if isinstance(id_or_name, bytes):
            sc = self.subclouds.get(SubCloudId(id_or_name))
            if sc is None:
                raise UnknownSubCloud(id_or_name.hex())
            return sc
        try:
            raw = b32decode(id_or_name)
        except MalformedPacket:
            raw = b""
        if len(raw) == 16 and SubCloudId(raw) in self.subclouds:
            return self.subclouds[SubCloudId(raw)]
        named = [s for s in self.subclouds.values() if s.name == id_or_name]
        if len(named) != 1:
            raise UnknownSubCloud(f"{id_or_name!r}: {len(named)} sub-clouds have that name")
        return named[0]

    async def _put_record(self, record: RegistryRecord) -> SubCloud:
        """Keep a verified record: store it, create or update the sub-cloud."""
        rec = SubCloudRecord(record.name, record.kind, record.owner, {"record": record.raw})
        await trio.to_thread.run_sync(self.store.put_subcloud, record.subcloud, rec,
                                      limiter=self.writer)
        sc = self.subclouds.get(record.subcloud)
        if sc is None:
            sc = SubCloud(self, record)  # empty, or whatever the store holds: loaded on use
            self.subclouds[record.subcloud] = sc
            self.catalog.set_subcloud(record.subcloud)
            for listener in self.subcloud_listeners:
                listener(sc)
        else:
            sc.record = record
        return sc

    async def share(self, sc: SubCloud, hashname: Hashname, rights: str | None) -> None:
        """Change one ACL entry (owner only) and tell the peers."""
        if sc.owner != self.hashname:
            raise AccessDenied(f"only the owner {sc.owner[:8]} can share {sc.name!r}")
        if hashname == self.hashname:
            raise LocalProtocolError("the owner always has write rights")
        acl = dict(sc.record.acl)
        before = set(acl)
        if rights is None:
            acl.pop(hashname, None)
        else:
            acl[hashname] = rights
        record = sign_record(self.identity, sc.id, name=sc.name, kind=sc.kind, acl=acl,
                             revision=sc.record.revision + 1)
        await self._put_record(record)
        for peer in before | set(acl):
            self._send_record(peer, record)
        self._rerun_sessions()

    def _send_record(self, peer: Hashname, record: RegistryRecord) -> None:
        out = self._registry_out.get(peer)
        if out is not None:
            out.send_nowait(record.raw)

    def _rerun_sessions(self) -> None:
        now = trio.current_time()
        for runner in self._sessions.values():
            runner.session.start_reconciliation(now)
            runner.wake()

    # -- local writes ---------------------------------------------------------------------------

    async def write(self, sc: SubCloud, fn: Callable[[Replica], None],
                    places: list[tuple[str, str | None, str | None]]) -> None:
        """Run ``fn`` in one replica transaction and make it durable (see module docstring).

        Raises:
            AccessDenied: no write rights.
            StoreError: not durable; the replica is reloaded and nothing changed.
        """
        if not self.can_write(sc.id, self.hashname):
            raise AccessDenied(f"{self.hashname[:8]} has no write rights to {sc.name!r}")
        async with sc.lock:
            replica = await self.loaded(sc, locked=True)
            replica.begin(_now_ms())
            try:
                fn(replica)
            finally:
                delta = replica.commit()
            if not delta:
                return
            await self._commit_delta(sc, delta)
        # Loads trim to the budget, but a replica a write pinned (its lock) could not be
        # dropped then: without this, a burst of writes on many sub-clouds would leave them
        # all in memory until the next load.
        self._trim(keep=sc)
        self._changed(sc, [Change(c, d, f, "local") for c, d, f in places])
        await self._after_local_writes(sc, places)

    async def _commit_delta(self, sc: SubCloud, delta: bytes) -> Envelope:
        """Seal and store a delta the replica just committed (caller holds the lock)."""
        try:
            env = seal(self.identity, sc.id, delta)
            await trio.to_thread.run_sync(
                lambda: self.store.commit_local(sc.id, env.raw, env.first, env.last,
                                                origin=ReplicaId(sc.replica_id)),
                limiter=self.writer,
            )
        except BaseException:
            # not durable: the replica must not keep a write the store does not have
            with trio.CancelScope(shield=True):
                sc.replica = await trio.to_thread.run_sync(self._load_replica, sc.id)
                for folder in sc.folders:
                    folder.replica = sc.replica
            raise
        self.catalog.record(sc.id, env.origin, env.first, env.last, len(env.raw))
        sc.log_dots += env.last - env.first + 1
        sc.since_checkpoint += 1
        self._stats["local envelopes"] += 1
        self._push(sc.id, [env], exclude=None)
        return env

    async def _after_local_writes(self, sc: SubCloud,
                                  places: Iterable[tuple[str, str | None, str | None]]) -> None:
        if sc.folders:
            from p2pcloud.files import paths_from_changes

            paths = paths_from_changes(places)
            if paths:
                self._wake_folders(sc, paths)
        if sc.since_checkpoint >= CHECKPOINT_EVERY:
            await self.checkpoint(sc)

    def _push(self, sc_id: SubCloudId, envs: list[Envelope], exclude: Hashname | None) -> None:
        now = trio.current_time()
        for peer, runner in self._sessions.items():
            if peer != exclude and self.may_read(sc_id, peer):
                runner.session.push(sc_id, envs, now)
                runner.wake()

    # -- checkpoints ----------------------------------------------------------------------------

    async def checkpoint(self, sc: SubCloud) -> None:
        """Store a snapshot of the replica and fold the log every member holds."""
        async with sc.lock:
            replica = await self.loaded(sc, locked=True)
            snapshot = await trio.to_thread.run_sync(replica.encode_snapshot, limiter=self.cpu)
            version = replica.version()
            await trio.to_thread.run_sync(self.store.checkpoint, sc.id, snapshot, _rids(version),
                                          limiter=self.writer)
            sc.since_checkpoint = 0
            self._stats["checkpoints"] += 1
            members = [m for m in (set(sc.record.acl) | {sc.owner}) if m != self.hashname]
            if members and all(m in sc.peer_versions for m in members):
                fold = fold_point([version] + [sc.peer_versions[m] for m in members])
                if fold:
                    await trio.to_thread.run_sync(self.store.truncate, sc.id, _rids(fold),
                                                  limiter=self.writer)
                    s = await trio.to_thread.run_sync(self.store.summary, sc.id)
                    self.catalog.set_subcloud(sc.id, _plain(s.version), _plain(s.floor),
                                              log_bytes=s.log_bytes,
                                              log_dots=s.log_dots)
                    sc.log_dots = s.log_dots

    async def _checkpoint_loop(self) -> None:
        while True:
            await trio.sleep(CHECKPOINT_INTERVAL)
            for sc in list(self.subclouds.values()):
                if sc.since_checkpoint and sc.is_loaded:
                    try:
                        await self.checkpoint(sc)
                    except StoreError:
                        log.exception("checkpoint of %s failed", sc.name)
            await self._save_derived()

    # -- receiving envelopes --------------------------------------------------------------------

    def _verify(self, sc_id: SubCloudId, raws: tuple[bytes, ...], peer: Hashname
                ) -> tuple[list[Envelope], list[tuple[str, str]]]:
        ok: list[Envelope] = []
        bad: list[tuple[str, str]] = []
        for raw in raws:
            try:
                env = open_envelope(raw, self._had_write, is_known=self.subclouds.__contains__)
            except DeltaRejected as exc:
                bad.append((exc.reason, exc.detail))
                continue
            if env.subcloud != sc_id:
                bad.append(("wrong sub-cloud", f"{env.subcloud.hex()} in a batch for "
                            f"{sc_id.hex()}"))
                continue
            if not self._accepts(env):
                bad.append(("no write rights", f"{env.hashname}: beyond the revocation cutoff"))
                continue
            ok.append(env)
        return ok, bad

    async def ingest(self, sc_id: SubCloudId, raws: tuple[bytes, ...], peer: Hashname) -> None:
        """Verify, merge, store and forward envelopes a peer sent (see module docstring)."""
        envs, bad = await trio.to_thread.run_sync(self._verify, sc_id, raws, peer,
                                                  limiter=self.cpu)
        for reason, detail in bad:
            self._reject(peer, reason, detail)
        sc = self.subclouds.get(sc_id)
        if sc is None or not envs:
            return
        async with sc.lock:
            replica = await self.loaded(sc, locked=True)
            # the cutoff again under the lock: a revocation signed while this batch was
            # being verified must not let it in
            fresh = [e for e in envs if self.catalog.counter(sc_id, e.origin) < e.last
                     and self._accepts(e)]
            if not fresh:
                return
            changes, applied = await trio.to_thread.run_sync(
                _apply_each, replica, fresh, limiter=self.cpu)
            for _env, err in applied:
                if err:
                    self._reject(peer, "refused by the core", err)
            good = [env for env, err in applied if not err]
            if not good:
                return
            results = await trio.to_thread.run_sync(
                self.store.append_envelopes, sc_id,
                [(e.origin, e.raw, e.first, e.last) for e in good], limiter=self.writer)
            stored: list[Envelope] = []
            for env, result in zip(good, results, strict=True):
                if result is AppendResult.STORED:
                    stored.append(env)
                    self.catalog.record(sc_id, env.origin, env.first, env.last, len(env.raw))
                    sc.log_dots += env.last - env.first + 1
                elif result is AppendResult.CONFLICT:
                    self._reject(peer, "conflicting counters", f"{env.origin.hex()} "
                                 f"{env.first}..{env.last}")
            sc.since_checkpoint += len(stored)
            self._stats["remote envelopes"] += len(stored)
        if stored:
            self._push(sc_id, stored, exclude=peer)
        if changes:
            self._changed(sc, [Change(c, d, f, peer) for c, d, f in changes])
            await self._after_local_writes(sc, changes)

    async def ingest_snapshot(self, sc_id: SubCloudId, snapshot: bytes, peer: Hashname,
                              *, version: Mapping[bytes, int] | None = None) -> None:
        """Merge a checkpoint a peer sent (we were below its fold floor) and checkpoint it.

        A snapshot carries no author signatures: the cloud's rules judge the sender and the
        snapshot's version vector (``CloudRules.accepts_snapshot``) before it is merged.
        """
        sc = self.subclouds.get(sc_id)
        if sc is None:
            return
        if self.rules is not None and not self.rules.accepts_snapshot(
                sc.record, peer, dict(version or {})):
            self._reject(peer, "snapshot refused",
                         f"{sc_id.hex()}: from a non-writer or beyond a revocation cutoff")
            return
        async with sc.lock:
            replica = await self.loaded(sc, locked=True)
            try:
                changes = await trio.to_thread.run_sync(replica.apply, [snapshot], _now_ms(),
                                                        limiter=self.cpu)
            except (DecodeError, ClockSkewError) as exc:
                self._reject(peer, "snapshot refused by the core", str(exc))
                return
            merged = await trio.to_thread.run_sync(replica.encode_snapshot, limiter=self.cpu)
            await trio.to_thread.run_sync(self.store.checkpoint, sc_id, merged,
                                          _rids(replica.version()), limiter=self.writer)
            s = await trio.to_thread.run_sync(self.store.summary, sc_id)
            self.catalog.set_subcloud(sc_id, _plain(s.version), _plain(s.floor),
                                      log_bytes=s.log_bytes,
                                      log_dots=s.log_dots)
            sc.log_dots = s.log_dots
        if changes:
            self._changed(sc, [Change(c, d, f, peer) for c, d, f in changes])
            await self._after_local_writes(sc, changes)

    # -- links and channels -----------------------------------------------------------------------

    def _on_link(self, peer: Hashname, up: bool) -> None:
        if not up or self._closed or self._nursery is None:
            return
        if self.hashname < peer and peer not in self._openers:
            self._openers.add(peer)
            for kind, runner in ((SYNC_CHANNEL, self._run_sync),
                                 (BLOB_CHANNEL, self.blobs.run_channel),
                                 (REGISTRY_CHANNEL, self._run_registry)):
                self._nursery.start_soon(self._keep_channel, peer, kind, runner)

    async def _keep_channel(self, peer: Hashname, kind: str,
                            runner: Callable[[ChannelStream], Any]) -> None:
        try:
            while not self._closed and peer in self.node.links:
                try:
                    stream = await self.node.open_channel(peer, kind)
                except (LinkError, trio.ClosedResourceError):
                    break
                try:
                    await runner(stream)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                finally:
                    with trio.CancelScope(shield=True):
                        await stream.aclose()
                await trio.sleep(REOPEN_DELAY)
        finally:
            if kind == SYNC_CHANNEL:
                self._openers.discard(peer)

    async def _run_registry(self, stream: ChannelStream) -> None:
        peer = stream.hashname
        send, receive = trio.open_memory_channel[bytes](math.inf)
        old = self._registry_out.get(peer)
        if old is not None:
            old.close()
        self._registry_out[peer] = send
        if self.rules is not None:  # our proof of membership goes first (the cloud's records)
            for raw in self.rules.intro_records(peer):
                send.send_nowait(raw)
        for sc in self.subclouds.values():
            if self.may_read(sc.id, peer):
                send.send_nowait(sc.record.raw)
        try:
            async with trio.open_nursery() as nursery:

                async def writer() -> None:
                    with _channel_gone():
                        async for raw in receive:
                            await stream.send_all(REGISTRY_FRAME.pack(len(raw)) + raw)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(writer)
                await self._read_records(stream, peer)
                nursery.cancel_scope.cancel()
        finally:
            if self._registry_out.get(peer) is send:
                del self._registry_out[peer]
            send.close()

    async def _read_records(self, stream: ChannelStream, peer: Hashname) -> None:
        buf = bytearray()
        with _channel_gone():
            while data := await stream.receive_some():
                buf += data
                while len(buf) >= REGISTRY_FRAME.size:
                    (n,) = REGISTRY_FRAME.unpack_from(buf)
                    if n > MAX_REGISTRY_FRAME:
                        self._reject(peer, "oversized registry frame", str(n))
                        return
                    if len(buf) < REGISTRY_FRAME.size + n:
                        break
                    raw = bytes(buf[REGISTRY_FRAME.size:REGISTRY_FRAME.size + n])
                    del buf[:REGISTRY_FRAME.size + n]
                    await self._receive_record(raw, peer)

    async def _receive_record(self, raw: bytes, peer: Hashname) -> None:
        if self.rules is not None and self.rules.take_record(raw, peer):
            return  # a grant or revocation of the cloud (self-verifying; the cloud checks it)
        try:
            record = await trio.to_thread.run_sync(decode_record, raw, limiter=self.cpu)
        except BadRecord as exc:
            self._reject(peer, "bad registry record", str(exc))
            return
        held = self.subclouds.get(record.subcloud)
        if held is not None:
            if held.owner != record.owner:
                self._reject(peer, "registry record of another owner", record.subcloud.hex())
                return
            if record.revision <= held.record.revision:
                return
        elif not self.record_readable(record, self.hashname):
            # not shared with us (yet): nothing to replicate; kept for refresh_shares()
            if len(self._unshared) < MAX_UNSHARED or record.subcloud in self._unshared:
                self._unshared[record.subcloud] = record
            return
        await self._put_record(record)
        self._stats["registry records"] += 1
        for other in self._registry_out:  # forward to peers it names
            if other != peer and self.record_readable(record, other):
                self._send_record(other, record)
        self._rerun_sessions()

    async def _run_sync(self, stream: ChannelStream) -> None:
        peer = stream.hashname
        session = SyncSession(self.catalog, local=self.hashname, remote=peer,
                              now=trio.current_time(),
                              shares=lambda sc: self.may_read(sc, peer))
        runner = _SessionRunner(session, stream)
        self._sessions[peer] = runner
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._session_timer, runner)
                nursery.start_soon(self._session_reader, runner, nursery.cancel_scope)
                with _channel_gone():
                    await self._session_driver(runner)
                nursery.cancel_scope.cancel()
        finally:
            if self._sessions.get(peer) is runner:
                del self._sessions[peer]

    async def _session_reader(self, runner: _SessionRunner, scope: trio.CancelScope) -> None:
        try:
            while data := await runner.stream.receive_some():
                runner.session.receive_data(data, trio.current_time())
                runner.wake()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    async def _session_timer(self, runner: _SessionRunner) -> None:
        while True:
            deadline = runner.session.get_timer()
            await trio.sleep_until(deadline if deadline is not None else trio.current_time() + 60)
            runner.session.handle_timer(trio.current_time())
            runner.wake()

    async def _session_driver(self, runner: _SessionRunner) -> None:
        session, peer = runner.session, runner.stream.hashname
        while True:
            event = session.next_event()
            if event is None:
                out = session.data_to_send()
                if out:
                    await runner.stream.send_all(out)
                    continue
                if session.failed:
                    return
                await runner.kick.wait()
                runner.kick = trio.Event()
                continue
            if isinstance(event, EnvelopesWanted):
                recs = await trio.to_thread.run_sync(
                    self.store.envelopes_after, event.subcloud,
                    ReplicaId(event.origin), event.after,
                    event.budget_bytes, limiter=self.readers)
                session.provide_envelopes(event.subcloud, event.origin, event.after,
                                          [r.envelope for r in recs], trio.current_time())
            elif isinstance(event, SnapshotWanted):
                cp = await trio.to_thread.run_sync(self.store.get_checkpoint, event.subcloud,
                                                   limiter=self.readers)
                snap, version = cp if cp is not None else (b"", {})
                session.provide_snapshot(event.subcloud, snap, _plain(version),
                                         trio.current_time())
            elif isinstance(event, EnvelopesReceived):
                await self.ingest(event.subcloud, event.envelopes, peer)
                session.acknowledge(event.batch, trio.current_time())
            elif isinstance(event, SnapshotReceived):
                await self.ingest_snapshot(event.subcloud, event.snapshot, peer,
                                           version=event.version)
                session.acknowledge(event.batch, trio.current_time())
            elif isinstance(event, PeerVersionLearned):
                sc = self.subclouds.get(event.subcloud)
                if sc is not None:
                    sc.peer_versions[peer] = dict(event.version)
            elif isinstance(event, MessageDropped):
                self._reject(peer, "sync message dropped", event.reason)
            elif isinstance(event, SessionFailed):
                self._reject(peer, "sync session failed", event.reason)

    # -- blobs -------------------------------------------------------------------------------

    async def add_blob(self, source: str | Path | bytes | trio.abc.ReceiveStream) -> BlobRef:
        """Chunk content into the store; see ``SubCloud.add_blob``."""
        if isinstance(source, (str, Path)):
            manifest = await trio.to_thread.run_sync(self._add_file, Path(source),
                                                     limiter=self.writer)
        else:
            if isinstance(source, bytes):
                data = source
            else:
                parts = bytearray()
                while chunk := await source.receive_some(1 << 20):  # noqa: ASYNC240
                    parts += chunk
                    if len(parts) > MAX_BLOB_FROM_STREAM:
                        raise BlobError("stream longer than 1 GiB: give add_blob a file path")
                data = bytes(parts)
            manifest = await trio.to_thread.run_sync(self._add_buffer, data, limiter=self.writer)
        return BlobRef(manifest.blob_hash, manifest.size)

    def _add_file(self, path: Path) -> Manifest:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return self._add_buffer(b"")
            with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    return self._add_buffer(view)
                finally:
                    view.release()

    def _add_buffer(self, data: bytes | memoryview) -> Manifest:
        refs: list[tuple[bytes, int]] = []
        batch: dict[bytes, bytes] = {}
        size = 0
        for span in iter_chunks(data):
            refs.append((span.hash, span.size))
            if span.hash not in batch:
                batch[span.hash] = bytes(data[span.offset:span.offset + span.size])
                size += span.size
            if size >= MAX_PUT_BATCH_BYTES or len(batch) >= MAX_PUT_BATCH_CHUNKS:
                self.store.put_chunks(batch)
                batch, size = {}, 0
        manifest = Manifest(refs)
        batch[manifest.blob_hash] = manifest.encoded
        self.store.put_blob(manifest.blob_hash, manifest.size, [h for h, _ in refs], batch)
        self.store.put_blob(manifest_record_id(manifest.blob_hash), len(manifest.encoded),
                            [manifest.blob_hash])
        return manifest

    async def ensure_blob(self, blob: bytes) -> list[bytes]:
        """Fetch a blob if needed; return its chunk hashes once every chunk is stored."""
        while True:
            rec = await trio.to_thread.run_sync(self.store.get_blob, blob, limiter=self.readers)
            if rec is not None:
                missing = await trio.to_thread.run_sync(self.store.missing_chunks, blob,
                                                        limiter=self.readers)
                if not missing:
                    return list(rec.chunks)
            else:
                manifest = await trio.to_thread.run_sync(self.blobs.manifest, blob,
                                                         limiter=self.readers)
                if manifest is not None:  # fetched (or a folder's): write its records
                    await trio.to_thread.run_sync(self._put_records, manifest,
                                                  limiter=self.writer)
                    continue
            done = self.blobs.waiter(blob)
            await self.blobs.want([(blob, None)])
            await done.wait()

    def _put_records(self, manifest: Manifest) -> None:
        self.store.put_blob(manifest.blob_hash, manifest.size, [c.hash for c in manifest.chunks],
                            {manifest.blob_hash: manifest.encoded})
        self.store.put_blob(manifest_record_id(manifest.blob_hash), len(manifest.encoded),
                            [manifest.blob_hash])

    async def read_chunk(self, digest: bytes) -> bytes:
        """One stored chunk (BlobError if it is not held)."""
        data = await trio.to_thread.run_sync(self.store.get_chunk, digest, limiter=self.readers)
        if data is None:
            data = await trio.to_thread.run_sync(self._folder_chunk, digest, limiter=self.readers)
        if data is None:
            raise BlobError(f"chunk {digest.hex()[:16]} is not held")
        return data

    def _folder_chunk(self, digest: bytes) -> bytes | None:
        for sc in list(self.subclouds.values()):
            for folder in list(sc.folders):
                data = folder.read_chunk(digest)
                if data is not None:
                    return data
        return None

    def _folder_part(self, manifest: Manifest, digest: bytes, data: bytes) -> bool:
        # a verified chunk straight into every folder waiting for the blob (files/parts.py)
        taken = False
        for sc in list(self.subclouds.values()):
            for folder in list(sc.folders):
                taken = folder.write_part(manifest, digest, data) or taken
        return taken

    def _folder_manifest(self, blob: bytes) -> Manifest | None:
        for sc in list(self.subclouds.values()):
            for folder in list(sc.folders):
                m = folder.manifest(blob)
                if m is not None:
                    return m
        return None

    def _blob_completed(self, blob: bytes) -> None:
        for folder, path in self._blob_paths.pop(blob, []):
            entry = self._folder_wake.get(id(folder))
            if entry is not None:
                entry[1].add(path)
                entry[0].set()

    def _folder_waits(self, folder: Folder) -> bool:
        """True while ``folder`` still waits for a blob (more completions are coming)."""
        return any(f is folder for waits in self._blob_paths.values() for f, _ in waits)

    # -- folders -------------------------------------------------------------------------------

    async def add_folder(self, sc: SubCloud, root: Path) -> Folder:
        """Sync a directory with the sub-cloud; returns after the first full reconcile."""
        if self._nursery is None:
            raise LocalProtocolError("the replication engine is not running")
        root = await trio.to_thread.run_sync(root.resolve)
        data_dir = Path(self.store.path).parent
        index_dir = data_dir / "folders"
        await trio.to_thread.run_sync(lambda: index_dir.mkdir(mode=0o700, exist_ok=True))
        import hashlib

        from p2pcloud.files import Folder

        tag = hashlib.sha256(sc.id + str(root).encode()).hexdigest()[:16]
        await self.loaded(sc)  # in a worker thread; the folder pins it from here on
        folder = Folder(root, sc.replica, device=self.hashname[:8],
                        index_path=index_dir / f"{tag}.index",
                        chunks=self.store.get_chunk, manifests=self.blobs.manifest,
                        has_chunk=lambda h: bool(self.store.has_chunks([h])))
        sc.folders.append(folder)
        wake = trio.Event()
        self._folder_wake[id(folder)] = (wake, set())
        await self._reconcile(sc, folder, None)
        await self._nursery.start(self._folder_loop, sc, folder)
        return folder

    def _wake_folders(self, sc: SubCloud, paths: list[str]) -> None:
        for folder in sc.folders:
            entry = self._folder_wake.get(id(folder))
            if entry is not None:
                entry[1].update(paths)
                entry[0].set()
                self._folder_woken_other.add(id(folder))

    async def _folder_loop(self, sc: SubCloud, folder: Folder, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from p2pcloud.files.watch import FolderWatcher

        watcher = FolderWatcher(folder.root)
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)

            async def watch() -> None:
                while True:
                    changed = await watcher.wait_changes()
                    entry = self._folder_wake[id(folder)]
                    entry[1].update(changed)
                    entry[0].set()
                    self._folder_woken_other.add(id(folder))
                    self._folder_woken_local.add(id(folder))

            nursery.start_soon(watch)
            task_status.started()
            last = -math.inf  # when the last reconcile of this loop ended
            fid = id(folder)
            while True:
                await self._folder_wake[fid][0].wait()
                # gather what arrives meanwhile: a reconcile rewrites the folder's index, so
                # 10,000 blobs completing one by one must not mean 10,000 reconciles.
                if fid in self._folder_woken_local:
                    await trio.sleep(FOLDER_BATCH_DELAY)  # local edits: let them settle
                elif fid in self._folder_woken_other:
                    # remote changes: the first after a quiet spell goes at once (its blobs
                    # are wanted sooner), a burst is batched at most every FOLDER_BATCH_DELAY
                    await trio.sleep_until(last + FOLDER_BATCH_DELAY)
                elif self._folder_waits(folder):
                    await trio.sleep(FOLDER_BATCH_DELAY)  # more completions are coming
                # (only completions, and the folder waits for no other blob: the last of a
                # burst, or one large file; nothing more is coming: go at once)
                self._folder_woken_other.discard(fid)
                self._folder_woken_local.discard(fid)
                entry = self._folder_wake[id(folder)]
                paths = set(entry[1])
                self._folder_wake[id(folder)] = (trio.Event(), set())
                await self._reconcile(sc, folder, None if "" in paths else sorted(paths))
                last = trio.current_time()

    async def _reconcile(self, sc: SubCloud, folder: Folder, paths: list[str] | None) -> None:
        async with sc.lock:
            folder.replica = sc.replica
            result = await trio.to_thread.run_sync(folder.reconcile, paths, limiter=self.cpu)
            deltas = list(folder.unsent_deltas) + ([result.delta] if result.delta else [])
            folder.unsent_deltas.clear()
            for delta in deltas:
                await self._commit_delta(sc, delta)
        if deltas:
            changed = [("files", e.path, "content") for e in result.events
                       if hasattr(e, "path")]
            self._changed(sc, [Change(c, d, f, "local") for c, d, f in changed])
        wants: list[tuple[bytes, Manifest | None]] = []
        for blob, missing in result.missing.items():
            self._blob_paths.setdefault(blob, []).append((folder, missing.path))
            wants.append((blob, missing.manifest))
        if wants:
            await self.blobs.want(wants)
        if sc.since_checkpoint >= CHECKPOINT_EVERY:
            await self.checkpoint(sc)

    # -- progress -------------------------------------------------------------------------------

    def progress(self, sc: SubCloud) -> list[PeerProgress]:
        """Per peer: what is still to move for ``sc`` (see ``SubCloud.progress``)."""
        done, total = self.blobs.progress()
        out = []
        for peer, runner in self._sessions.items():
            p = runner.session.progress().get(sc.id)
            if p is None:
                out.append(PeerProgress(peer, 0, 0, 0, 0, 0, done, total))
            else:
                out.append(PeerProgress(peer, p.send_items, p.send_bytes, p.in_flight_bytes,
                                        p.receive_items, p.receive_bytes, done, total))
        return out

    def in_sync(self, peer: Hashname) -> bool:
        """Whether the sync session with ``peer`` has nothing queued, in flight or awaited."""
        runner = self._sessions.get(peer)
        return runner is not None and runner.session.in_sync


def _plain(version: Mapping[ReplicaId, int]) -> dict[bytes, int]:
    """A store version vector as the sync layer types it (replica ids as plain bytes)."""
    return {bytes(k): v for k, v in version.items()}


def _rids(version: Mapping[bytes, int]) -> dict[ReplicaId, int]:
    """A core/sync version vector as the store types it."""
    return {ReplicaId(k): v for k, v in version.items()}


def _channel_gone() -> contextlib.suppress:
    """The channel broke or closed (peer gone, node closing): end the task quietly."""
    return contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError)


def _envelope_delta(raw: bytes) -> bytes:
    from p2pcloud.sync import decode_envelope

    return decode_envelope(raw).delta


def _apply_each(replica: Replica, envs: list[Envelope]
                ) -> tuple[list[_core.Change], list[tuple[Envelope, str]]]:
    """Apply deltas (one call when all are good; one by one to isolate a refused one)."""
    now = _now_ms()
    try:
        changes = replica.apply([e.delta for e in envs], now)
        return changes, [(e, "") for e in envs]
    except (DecodeError, ClockSkewError):
        pass
    out: list[tuple[Envelope, str]] = []
    seen: dict[Any, None] = {}
    for e in envs:
        try:
            for c in replica.apply([e.delta], now):
                seen[c] = None
            out.append((e, ""))
        except (DecodeError, ClockSkewError) as exc:
            out.append((e, str(exc)))
    return list(seen), out



async def open_replication(node: Node, nursery: trio.Nursery) -> Store:
    """Open the node's store (``<data dir>/store``) and start its replication engine.

    Args:
        node: a started node with a data dir.
        nursery: the node's nursery (the engine's tasks run there).

    Returns:
        The store (close it after the nursery has ended).

    Raises:
        StoreError: the store cannot be opened (locked by another process, corrupt, ...).
    """
    from p2pcloud._store import open_store

    assert node.data_dir is not None
    store = await trio.to_thread.run_sync(open_store, node.data_dir / "store")
    try:
        node.replication = Replication(node, store)
        await node.replication.start(nursery)
    except BaseException:
        node.replication = None
        store.close()
        raise
    return store
