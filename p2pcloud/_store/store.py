"""The node's store: sub-clouds, per-origin delta logs, checkpoints, blobs, peers.

Theory of operation
-------------------
One :class:`Store` is one LMDB environment per node (DESIGN.md sections 3 and 5). It stores
bytes under keys and knows nothing of CRDT semantics or the network: envelopes (signed
deltas), snapshots and chunks are opaque to it. What it does know is the shape of the keys:

* an origin replica's deltas form a run of dot counters ``first..last`` (the core gives one
  run per transaction), so the log is keyed by ``(sub-cloud, origin, first)`` and a *head*
  per origin records the highest counter up to which the log (plus the checkpoint) holds
  every counter without a gap. ``version()`` reads the heads, never the log;
* ranges of one origin in the log are pairwise disjoint: an envelope inside a range already
  held is a no-op reported as ``COVERED``, one that partly overlaps a held range (two
  different envelopes claiming the same dots: a misbehaving author) is refused and reported
  as ``CONFLICT``;
* the materialized state is the latest checkpoint (an opaque snapshot and the version it
  covers) plus the log after it; truncating removes log ranges that the checkpoint covers;
* chunks are content-addressed (putting a held hash is a no-op); blob records reference
  them and keep a reference count per chunk; a chunk whose count reaches zero (or that
  arrived before any blob named it) goes on an orphan list that ``collect_garbage`` sweeps.

Every public method is synchronous and runs exactly one LMDB transaction (STYLE.md section
3); a write is durable when the method returns. Arguments are checked before the transaction
starts; any error inside it aborts it, so a failed call changes nothing. The Trio shell calls
these methods with ``trio.to_thread.run_sync(..., limiter=...)``; the store is thread-safe.

docs/store.md describes the tables and key encodings.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

from p2pcloud._ids import Hashname, ReplicaId, SubCloudId
from p2pcloud._store._codec import (
    CSID_RE,
    MAX_BLOB_CHUNKS,
    MAX_BLOB_ID,
    MAX_BLOB_SIZE,
    MAX_CHUNK_BYTES,
    MAX_CSID_KEYS,
    MAX_ENVELOPE_BYTES,
    MAX_HASH,
    MAX_KEY_BYTES,
    MAX_NAME_BYTES,
    MAX_PATHS_PER_PEER,
    MAX_SNAPSHOT_BYTES,
    MIN_HASH,
    SUBCLOUD_KINDS,
    U32,
    U64,
    as_bytes,
    as_counter,
    as_hashname,
    as_replica,
    as_size,
    as_subcloud,
    as_time,
    as_version,
    decode_record,
    encode_record,
    origin_key,
    split_origin_key,
    subcloud_prefix,
)
from p2pcloud._store._env import (
    INITIAL_MAP_SIZE,
    MAX_MAP_SIZE,
    MIN_MAP_SIZE,
    Environment,
)
from p2pcloud.errors import StoreError, StoreUsageError

__all__ = [
    "SCHEMA_VERSION",
    "AppendResult",
    "BlobRecord",
    "GarbageCollected",
    "LoadedState",
    "LogRecord",
    "LogSummary",
    "PeerRecord",
    "Store",
    "StoreStatistics",
    "SubCloudRecord",
    "TableStatistics",
    "open_store",
]

SCHEMA_VERSION: Final = 1
"""The layout this code writes (docs/store.md). A store of a newer schema is refused."""

MAX_BATCH_ENVELOPES: Final = 10_000
"""Envelopes in one remote batch: a write transaction keeps its dirty pages in memory
until it commits, so a batch is bounded (sync sends far smaller batches)."""
MAX_BATCH_BYTES: Final = 256 << 20  # the same bound in bytes, for the same reason
MAX_CHUNK_BATCH: Final = 4096  # chunks in one put_chunks/put_blob call; the same reason
MAX_CHUNK_BATCH_BYTES: Final = 256 << 20
MAX_QUERY: Final = 1 << 20  # hashes asked about in one has_chunks call (a 64 GiB blob)
MAX_GC_BATCH: Final = 10_000  # orphans swept per collect_garbage call: keeps the txn short

# named sub-databases (docs/store.md "tables")
_META: Final = b"meta"
_SUBCLOUDS: Final = b"subclouds"
_LOG: Final = b"log"
_HEADS: Final = b"heads"
_FLOORS: Final = b"floors"
_CHECKPOINTS: Final = b"checkpoints"
_CHECKPOINT_VERSIONS: Final = b"checkpoint_versions"
_CHUNKS: Final = b"chunks"
_REFS: Final = b"chunk_refs"
_ORPHANS: Final = b"orphans"
_BLOBS: Final = b"blobs"
_PEERS: Final = b"peers"
_TABLES: Final = (
    _META, _SUBCLOUDS, _LOG, _HEADS, _FLOORS, _CHECKPOINTS, _CHECKPOINT_VERSIONS,
    _CHUNKS, _REFS, _ORPHANS, _BLOBS, _PEERS,
)
_SCHEMA_KEY: Final = b"schema"
_HEAD: Final = struct.Struct(">QQQ")  # contiguous head, log bytes, log dots of one origin


class AppendResult(enum.Enum):
    """What appending an envelope did."""

    STORED = "stored"  # new: written durably
    COVERED = "covered"  # its range was already held (or folded into the checkpoint): no-op
    CONFLICT = "conflict"  # it partly overlaps a different held range of its origin: refused


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One envelope in a delta log: its origin replica and the counters it carries."""

    origin: ReplicaId
    first: int
    last: int
    envelope: bytes


@dataclass(frozen=True, slots=True)
class LoadedState:
    """A sub-cloud's materialized state: the checkpoint and the log records after it.

    Replay: ``Replica.load(snapshot)`` (or a new replica when ``snapshot`` is None), then
    apply the deltas of ``records``.
    """

    snapshot: bytes | None
    version: dict[ReplicaId, int]  # what the checkpoint covers ({} without one)
    records: list[LogRecord]


@dataclass(slots=True)
class LogSummary:
    """What sync's catalog needs of a sub-cloud at start-up (:meth:`Store.summary`)."""

    version: dict[ReplicaId, int] = field(default_factory=dict)  # contiguous heads
    floor: dict[ReplicaId, int] = field(default_factory=dict)  # truncated up to here
    checkpoint: dict[ReplicaId, int] = field(default_factory=dict)  # the checkpoint covers
    log_bytes: int = 0  # envelope bytes held in the log
    log_dots: int = 0  # dots (counters) those envelopes carry


@dataclass(frozen=True, slots=True)
class SubCloudRecord:
    """A sub-cloud's registry entry (DESIGN.md section 6); the store does not interpret it."""

    name: str
    kind: str  # "device", "thing" or "cloud"
    owner: Hashname
    policy: Mapping[str, Any] = field(default_factory=dict)  # replication policy, CBOR-able


@dataclass(frozen=True, slots=True)
class BlobRecord:
    """A blob: its size in bytes and its chunk hashes in order."""

    size: int
    chunks: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """What the node remembers of a peer endpoint."""

    hashname: Hashname
    keys: Mapping[str, bytes]  # CSID in hex ("3a") -> public key
    paths: tuple[Mapping[str, Any], ...] = ()  # telehash v3 path JSON, most recent first
    last_seen: float | None = None  # seconds since the epoch


@dataclass(frozen=True, slots=True)
class GarbageCollected:
    """What one :meth:`Store.collect_garbage` call freed."""

    chunks: int
    bytes: int
    more: bool  # orphans remain: call again


@dataclass(frozen=True, slots=True)
class TableStatistics:
    """One named sub-database: its entries and the bytes of its pages."""

    entries: int
    bytes: int


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    """Sizes and counts of a store (:meth:`Store.statistics`)."""

    schema: int
    map_size: int
    max_map_size: int
    used_bytes: int  # pages in use up to the highest one, as in the data file
    growths: int  # map growths by this handle
    adopted: int  # map sizes this handle adopted after another process grew the map
    tables: dict[str, TableStatistics]


def open_store(
    path: str | os.PathLike[str],
    *,
    initial_map_size: int = INITIAL_MAP_SIZE,
    max_map_size: int = MAX_MAP_SIZE,
    readonly: bool = False,
) -> Store:
    """Open (creating if needed) a node's store in the directory ``path``.

    Args:
        path: the store's directory (created with mode 0700 if missing).
        initial_map_size: the LMDB map size to start with; it grows by doubling on demand.
        max_map_size: the cap on growth; a write beyond it raises StoreFull.
        readonly: open for reading only (e.g. a status tool beside a running daemon).

    Returns:
        The open :class:`Store`; close it, or use it as a context manager.

    Raises:
        StoreUsageError: a size is out of range.
        StoreError: the store cannot be opened (locked, corrupt, newer schema, no
            permission); the message says what to do.
    """
    return Store(
        path, initial_map_size=initial_map_size, max_map_size=max_map_size, readonly=readonly
    )


class Store:
    """One node's LMDB store. Every method runs one whole transaction; see the module doc."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        initial_map_size: int = INITIAL_MAP_SIZE,
        max_map_size: int = MAX_MAP_SIZE,
        readonly: bool = False,
    ) -> None:
        """Open the store; prefer :func:`open_store`, which documents the arguments."""
        as_size(max_map_size, "max_map_size", MIN_MAP_SIZE, 1 << 48)
        as_size(initial_map_size, "initial_map_size", MIN_MAP_SIZE, max_map_size)
        if not isinstance(path, str | os.PathLike):
            raise StoreUsageError(f"path must be a str or a path, not {type(path).__name__}")
        self._env = Environment(
            path,
            _TABLES,
            initial_map_size=initial_map_size,
            max_map_size=max_map_size,
            readonly=readonly,
        )
        self._db = self._env.dbs
        try:
            if readonly:
                self.schema = self._env.read(self._read_schema, "checking its schema")
            else:
                self.schema = self._env.write(self._init_schema, "checking its schema")
        except BaseException:
            self._env.close()
            raise

    @property
    def path(self) -> str:
        """The store's directory."""
        return self._env.path

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Close the store after any running call finished. Idempotent."""
        self._env.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _read_schema(self, txn: Any) -> int:
        meta = self._db.get(_META)
        raw = txn.get(_SCHEMA_KEY, db=meta) if meta is not None else None
        found = 0 if raw is None else self._schema_value(raw)
        self._check_schema(found)
        return found

    def _init_schema(self, txn: Any) -> int:
        raw = txn.get(_SCHEMA_KEY, db=self._db[_META])
        if raw is None:
            txn.put(_SCHEMA_KEY, U32.pack(SCHEMA_VERSION), db=self._db[_META])
            return SCHEMA_VERSION
        found = self._schema_value(raw)
        self._check_schema(found)
        return found

    def _schema_value(self, raw: bytes) -> int:
        if len(raw) != U32.size:
            raise StoreError(
                f"the store at {self.path!r} has a damaged schema record: restore it from a "
                "backup or move it aside and let the node re-sync"
            )
        value: int = U32.unpack(raw)[0]
        return value

    def _check_schema(self, found: int) -> None:
        if found > SCHEMA_VERSION:
            raise StoreError(
                f"the store at {self.path!r} has schema version {found}, written by a newer "
                f"p2pcloud; this one reads up to version {SCHEMA_VERSION}. Upgrade p2pcloud "
                "(the store is left untouched)"
            )

    # -- sub-cloud registry ----------------------------------------------------------------

    def put_subcloud(self, subcloud: SubCloudId, record: SubCloudRecord) -> None:
        """Add or replace a sub-cloud's registry entry.

        Args:
            subcloud: the sub-cloud id.
            record: its metadata.

        Raises:
            StoreUsageError: a bad id, kind, owner, name or policy.
            StoreError: LMDB failed; nothing changed.
        """
        sc = as_subcloud(subcloud)
        if not isinstance(record, SubCloudRecord):
            raise StoreUsageError("record must be a SubCloudRecord")
        if not isinstance(record.name, str) or len(record.name.encode()) > MAX_NAME_BYTES:
            raise StoreUsageError(f"a sub-cloud name is a str of at most {MAX_NAME_BYTES} bytes")
        if record.kind not in SUBCLOUD_KINDS:
            raise StoreUsageError(f"kind must be one of {sorted(SUBCLOUD_KINDS)}")
        owner = as_hashname(record.owner)
        if not isinstance(record.policy, Mapping):
            raise StoreUsageError("policy must be a mapping")
        value = encode_record(
            {"name": record.name, "kind": record.kind, "owner": owner,
             "policy": dict(record.policy)},
            "sub-cloud record",
        )
        self._env.write(
            lambda txn: txn.put(sc, value, db=self._db[_SUBCLOUDS]), "writing a sub-cloud"
        )

    def get_subcloud(self, subcloud: SubCloudId) -> SubCloudRecord | None:
        """Return a sub-cloud's registry entry, or None.

        Raises:
            StoreUsageError: a bad id. StoreError: LMDB failed or the record is damaged.
        """
        sc = as_subcloud(subcloud)
        raw = self._env.read(lambda txn: txn.get(sc, db=self._db[_SUBCLOUDS]),
                             "reading a sub-cloud")
        return None if raw is None else _subcloud_record(raw)

    def subclouds(self) -> dict[SubCloudId, SubCloudRecord]:
        """Return every registered sub-cloud.

        Raises:
            StoreError: LMDB failed or a record is damaged.
        """
        def work(txn: Any) -> dict[SubCloudId, SubCloudRecord]:
            return {
                SubCloudId(bytes(k)): _subcloud_record(v)
                for k, v in txn.cursor(db=self._db[_SUBCLOUDS])
            }

        return self._env.read(work, "listing sub-clouds")

    def remove_subcloud(self, subcloud: SubCloudId) -> bool:
        """Forget a sub-cloud: its registry entry, logs, heads and checkpoint, in one txn.

        Returns:
            Whether anything was held for it.

        Raises:
            StoreUsageError: a bad id. StoreError: LMDB failed; nothing changed.
        """
        sc = as_subcloud(subcloud)
        prefix = subcloud_prefix(sc)

        def work(txn: Any) -> bool:
            found = txn.delete(sc, db=self._db[_SUBCLOUDS])
            found |= txn.delete(sc, db=self._db[_CHECKPOINTS])
            found |= txn.delete(sc, db=self._db[_CHECKPOINT_VERSIONS])
            found |= txn.delete(sc, db=self._db[_FLOORS])
            for name in (_LOG, _HEADS):
                cur = txn.cursor(db=self._db[name])
                ok = cur.set_range(prefix)
                while ok and cur.key().startswith(prefix):
                    found = True
                    ok = _delete(cur)  # moves to the next entry
            return bool(found)

        return self._env.write(work, "removing a sub-cloud")

    # -- delta logs ------------------------------------------------------------------------

    def commit_local(
        self,
        subcloud: SubCloudId,
        envelope: bytes,
        first: int,
        last: int,
        *,
        origin: ReplicaId,
    ) -> AppendResult:
        """Append this replica's own envelope; durable when this returns.

        A retry of the same call is a no-op (``COVERED``). Reusing counters with different
        bytes is a local bug (a replica restarted without its state) and is refused.

        Args:
            subcloud: the sub-cloud.
            envelope: the signed delta (opaque).
            first: its first dot counter. last: its last (>= first).
            origin: the local replica id of this sub-cloud (the store does not derive it).

        Returns:
            ``STORED``, or ``COVERED`` for an identical retry.

        Raises:
            StoreUsageError: bad arguments, or the counters are already used by other bytes.
            StoreFull, StoreError: nothing was written.
        """
        sc = as_subcloud(subcloud)
        item = _check_item(origin, envelope, first, last)

        def work(txn: Any) -> AppendResult:
            result = self._append(txn, sc, *item)
            if result is AppendResult.STORED:
                return result
            okey = origin_key(sc, item[0])
            held = txn.get(okey + U64.pack(item[2]), db=self._db[_LOG])
            if held is not None and held == U64.pack(item[3]) + item[1]:
                return AppendResult.COVERED
            raise StoreUsageError(
                f"local counters {item[2]}..{item[3]} are already used by another delta of this "
                "replica: it must be loaded from the store before it writes (counter reuse)"
            )

        return self._env.write(work, "committing a local write")

    def append_envelopes(
        self,
        subcloud: SubCloudId,
        items: Iterable[tuple[ReplicaId, bytes, int, int]],
    ) -> list[AppendResult]:
        """Append a batch of envelopes (from a peer) in ONE transaction: one durable commit.

        Args:
            subcloud: the sub-cloud they belong to.
            items: ``(origin, envelope, first, last)`` tuples, any order and origins.

        Returns:
            One :class:`AppendResult` per item, in order.

        Raises:
            StoreUsageError: a bad item, or the batch breaks ``MAX_BATCH_ENVELOPES`` /
                ``MAX_BATCH_BYTES``; nothing is written.
            StoreFull, StoreError: nothing was written.
        """
        sc = as_subcloud(subcloud)
        checked: list[tuple[ReplicaId, bytes, int, int]] = []
        total = 0
        for item in items:
            if len(checked) == MAX_BATCH_ENVELOPES:
                raise StoreUsageError(f"a batch holds at most {MAX_BATCH_ENVELOPES} envelopes")
            if not isinstance(item, tuple) or len(item) != 4:
                raise StoreUsageError("each item is an (origin, envelope, first, last) tuple")
            checked.append(_check_item(*item))
            total += len(checked[-1][1])
            if total > MAX_BATCH_BYTES:
                raise StoreUsageError(f"a batch holds at most {MAX_BATCH_BYTES} bytes")
        if not checked:
            return []
        return self._env.write(
            lambda txn: [self._append(txn, sc, *it) for it in checked], "appending envelopes"
        )

    def _append(
        self, txn: Any, sc: bytes, origin: bytes, envelope: bytes, first: int, last: int
    ) -> AppendResult:
        log = self._db[_LOG]
        okey = origin_key(sc, origin)
        head, nbytes, ndots = self._head(txn, okey)
        if last <= head:
            return AppendResult.COVERED
        key = okey + U64.pack(first)
        cur = txn.cursor(db=log)
        # the held range starting at or after `first` must not reach into [first, last]
        positioned = cur.set_range(key)
        if positioned and cur.key().startswith(okey):
            nfirst = U64.unpack(cur.key()[-8:])[0]
            if nfirst <= last:
                nlast = U64.unpack(cur.value()[:8])[0]
                if nfirst == first and nlast >= last:
                    return AppendResult.COVERED
                return AppendResult.CONFLICT
        found = cur.prev() if positioned else cur.last()
        # the held range starting before `first` must end before it
        if found and cur.key().startswith(okey):
            plast = U64.unpack(cur.value()[:8])[0]
            if plast >= last:
                return AppendResult.COVERED
            if plast >= first:
                return AppendResult.CONFLICT
        txn.put(key, U64.pack(last) + envelope, db=log)
        if first <= head + 1:
            head = self._absorb(cur, okey, last)
        nbytes, ndots = nbytes + len(envelope), ndots + last - first + 1
        txn.put(okey, _HEAD.pack(head, nbytes, ndots), db=self._db[_HEADS])
        return AppendResult.STORED

    def _head(self, txn: Any, okey: bytes) -> tuple[int, int, int]:
        raw = txn.get(okey, db=self._db[_HEADS])
        return (0, 0, 0) if raw is None else _unpack_head(raw)

    @staticmethod
    def _absorb(cur: Any, okey: bytes, head: int) -> int:
        """Extend a contiguous head over the held ranges that now follow it without a gap."""
        ok = cur.set_range(okey + U64.pack(head + 1))
        while ok:
            key = cur.key()
            if not key.startswith(okey) or U64.unpack(key[-8:])[0] > head + 1:
                break
            head = max(head, U64.unpack(cur.value()[:8])[0])
            ok = cur.next()
        return head

    def _raise_head(self, txn: Any, okey: bytes, to: int) -> None:
        """Raise an origin's head to at least ``to`` (a checkpoint covers it) and absorb."""
        head, nbytes, ndots = self._head(txn, okey)
        if to <= head:
            return
        cur = txn.cursor(db=self._db[_LOG])
        # a held range may straddle `to`: the last one starting at or before it
        found = cur.prev() if cur.set_range(okey + U64.pack(to + 1)) else cur.last()
        if found and cur.key().startswith(okey):
            to = max(to, U64.unpack(cur.value()[:8])[0])
        head = self._absorb(cur, okey, to)
        txn.put(okey, _HEAD.pack(head, nbytes, ndots), db=self._db[_HEADS])

    def version(self, subcloud: SubCloudId) -> dict[ReplicaId, int]:
        """Return the contiguous highest counter held per origin (the checkpoint included).

        Origins with nothing contiguous from counter 1 are left out. Reads only the heads.

        Raises:
            StoreUsageError: a bad id. StoreError: LMDB failed.
        """
        sc = as_subcloud(subcloud)
        prefix = subcloud_prefix(sc)

        def work(txn: Any) -> dict[ReplicaId, int]:
            out: dict[ReplicaId, int] = {}
            cur = txn.cursor(db=self._db[_HEADS])
            ok = cur.set_range(prefix)
            while ok:
                key = cur.key()
                if not key.startswith(prefix):
                    break
                head = _unpack_head(cur.value())[0]
                if head:
                    out[ReplicaId(bytes(key[len(prefix) + 1 :]))] = head
                ok = cur.next()
            return out

        return self._env.read(work, "reading a version")

    def all_versions(self) -> dict[SubCloudId, dict[ReplicaId, int]]:
        """Return :meth:`version` of every sub-cloud with a log or checkpoint, in one scan.

        Raises:
            StoreError: LMDB failed.
        """
        def work(txn: Any) -> dict[SubCloudId, dict[ReplicaId, int]]:
            out: dict[SubCloudId, dict[ReplicaId, int]] = {}
            for key, value in txn.cursor(db=self._db[_HEADS]):
                head = _unpack_head(value)[0]
                if head:
                    sc, origin = split_origin_key(bytes(key))
                    out.setdefault(sc, {})[origin] = head
            return out

        return self._env.read(work, "reading all versions")

    def envelopes_after(
        self,
        subcloud: SubCloudId,
        origin: ReplicaId,
        counter: int,
        limit_bytes: int,
    ) -> list[LogRecord]:
        """Return the next batch of an origin's envelopes whose range goes past ``counter``.

        Records come in counter order, as many as fit ``limit_bytes`` (counting envelope
        bytes), but at least one if any is left. Stream a log with repeated calls, passing
        the ``last`` of the final record returned; an empty list means the end. Envelopes
        already folded into the checkpoint and truncated are not returned.

        Args:
            subcloud: the sub-cloud. origin: the origin replica.
            counter: return ranges with ``last > counter`` (0 for the whole log).
            limit_bytes: the batch budget, 1..MAX_BATCH_BYTES.

        Raises:
            StoreUsageError: bad arguments. StoreError: LMDB failed.
        """
        sc = as_subcloud(subcloud)
        okey = origin_key(sc, as_replica(origin))
        after = as_counter(counter, "counter", 0)
        budget = as_size(limit_bytes, "limit_bytes", 1, MAX_BATCH_BYTES)
        return self._env.read(
            lambda txn: self._scan(txn, okey, after, budget), "reading envelopes"
        )

    def _scan(self, txn: Any, okey: bytes, after: int, budget: int | None) -> list[LogRecord]:
        origin = ReplicaId(bytes(okey[okey[0] + 2 :]))
        out: list[LogRecord] = []
        used = 0
        cur = txn.cursor(db=self._db[_LOG])
        start = okey + U64.pack(after + 1)  # after <= MAX_COUNTER, so this fits 64 bits
        # a range that starts at or before `after` may still end past it
        found = cur.prev() if cur.set_range(start) else cur.last()
        if found and cur.key().startswith(okey):
            value = cur.value()
            last = U64.unpack(value[:8])[0]
            if last > after:
                out.append(LogRecord(origin, U64.unpack(cur.key()[-8:])[0], last, bytes(value[8:])))
                used += len(value) - 8
        ok = cur.set_range(start)
        while ok:
            key = cur.key()
            if not key.startswith(okey):
                break
            value = cur.value()
            size = len(value) - 8
            if budget is not None and out and used + size > budget:
                break
            out.append(
                LogRecord(origin, U64.unpack(key[-8:])[0], U64.unpack(value[:8])[0],
                          bytes(value[8:]))
            )
            used += size
            ok = cur.next()
        return out

    # -- materialized state ------------------------------------------------------------------

    def checkpoint(
        self, subcloud: SubCloudId, snapshot: bytes, version: Mapping[ReplicaId, int]
    ) -> None:
        """Store a snapshot of the sub-cloud's replica and the version it covers.

        It replaces the previous checkpoint, which it must cover (every counter of the old
        version at most the new one's), so a checkpoint never moves the state backwards. The
        heads rise to at least ``version``. The log is kept; :meth:`truncate` removes what
        the checkpoint covers once every member has it.

        Args:
            subcloud: the sub-cloud.
            snapshot: the core's ``Replica.encode_snapshot()`` (opaque).
            version: the version vector the snapshot covers (``Replica.version()``).

        Raises:
            StoreUsageError: bad arguments, or the checkpoint is older than the held one.
            StoreFull, StoreError: nothing was written.
        """
        sc = as_subcloud(subcloud)
        snap = as_bytes(snapshot, "snapshot", 0, MAX_SNAPSHOT_BYTES)
        ver = as_version(version)
        encoded = encode_record(ver, "checkpoint version", MAX_SNAPSHOT_BYTES)

        def work(txn: Any) -> None:
            old = self._checkpoint_version(txn, sc)
            behind = [o for o, c in old.items() if ver.get(o, 0) < c]
            if behind:
                raise StoreUsageError(
                    "the new checkpoint does not cover the held one (it is behind for "
                    f"{len(behind)} origins): checkpoint the replica loaded from this store"
                )
            txn.put(sc, snap, db=self._db[_CHECKPOINTS])
            txn.put(sc, encoded, db=self._db[_CHECKPOINT_VERSIONS])
            for origin, counter in ver.items():
                self._raise_head(txn, origin_key(sc, origin), counter)

        self._env.write(work, "writing a checkpoint")

    def _checkpoint_version(self, txn: Any, sc: bytes) -> dict[ReplicaId, int]:
        return self._version_record(txn, _CHECKPOINT_VERSIONS, sc, "checkpoint version")

    def _version_record(self, txn: Any, table: bytes, sc: bytes, what: str
                        ) -> dict[ReplicaId, int]:
        raw = txn.get(sc, db=self._db[table])
        return {} if raw is None else _stored_version(raw, what)

    def get_checkpoint(self, subcloud: SubCloudId) -> tuple[bytes, dict[ReplicaId, int]] | None:
        """Return the checkpoint's snapshot and the version it covers, or None.

        This is what a peer below the floor is sent (sync's ``SnapshotWanted``).

        Raises:
            StoreUsageError: a bad id. StoreError: LMDB failed or the record is damaged.
        """
        sc = as_subcloud(subcloud)

        def work(txn: Any) -> tuple[bytes, dict[ReplicaId, int]] | None:
            snap = txn.get(sc, db=self._db[_CHECKPOINTS])
            if snap is None:
                return None
            return bytes(snap), self._checkpoint_version(txn, sc)

        return self._env.read(work, "reading a checkpoint")

    def summary(self, subcloud: SubCloudId) -> LogSummary:
        """Return what sync's catalog needs of one sub-cloud, from the heads (no log scan).

        Raises:
            StoreUsageError: a bad id. StoreError: LMDB failed or a record is damaged.
        """
        sc = as_subcloud(subcloud)
        return self._env.read(lambda txn: self._summaries(txn, sc).get(sc, LogSummary()),
                              "reading a summary")

    def summaries(self) -> dict[SubCloudId, LogSummary]:
        """Return :meth:`summary` of every sub-cloud with a log, checkpoint or floor.

        One read transaction over the heads, checkpoint versions and floors (not the log):
        the shell fills sync's catalog from it at start-up.

        Raises:
            StoreError: LMDB failed or a record is damaged.
        """
        return self._env.read(lambda txn: self._summaries(txn, None), "reading summaries")

    def _summaries(self, txn: Any, only: bytes | None) -> dict[SubCloudId, LogSummary]:
        out: dict[SubCloudId, LogSummary] = {}

        def get(sc: SubCloudId) -> LogSummary:
            found = out.get(sc)
            if found is None:
                found = out[sc] = LogSummary()
            return found

        cur = txn.cursor(db=self._db[_HEADS])
        prefix = b"" if only is None else subcloud_prefix(only)
        ok = cur.set_range(prefix) if prefix else cur.first()
        while ok and cur.key().startswith(prefix):
            sc, origin = split_origin_key(bytes(cur.key()))
            head, nbytes, ndots = _unpack_head(cur.value())
            summary = get(sc)
            if head:
                summary.version[origin] = head
            summary.log_bytes += nbytes
            summary.log_dots += ndots
            ok = cur.next()
        for table, what in ((_CHECKPOINT_VERSIONS, "checkpoint version"),
                            (_FLOORS, "log floor")):
            if only is not None:
                raw = txn.get(only, db=self._db[table])
                pairs = [] if raw is None else [(only, raw)]
            else:
                pairs = list(txn.cursor(db=self._db[table]))
            for key, raw in pairs:
                version = _stored_version(raw, what)
                summary = get(SubCloudId(bytes(key)))
                if table == _FLOORS:
                    summary.floor.update(version)
                else:
                    summary.checkpoint.update(version)
        return out

    def load_state(self, subcloud: SubCloudId) -> LoadedState:
        """Return the checkpoint and every log record past it, from one read transaction.

        Raises:
            StoreUsageError: a bad id. StoreError: LMDB failed or a record is damaged.
        """
        sc = as_subcloud(subcloud)
        prefix = subcloud_prefix(sc)

        def work(txn: Any) -> LoadedState:
            snap = txn.get(sc, db=self._db[_CHECKPOINTS])
            ver = self._checkpoint_version(txn, sc)
            records: list[LogRecord] = []
            cur = txn.cursor(db=self._db[_HEADS])
            ok = cur.set_range(prefix)
            while ok and cur.key().startswith(prefix):
                okey = bytes(cur.key())
                origin = ReplicaId(okey[len(prefix) + 1 :])
                records.extend(self._scan(txn, okey, ver.get(origin, 0), None))
                ok = cur.next()
            return LoadedState(None if snap is None else bytes(snap), ver, records)

        return self._env.read(work, "loading a sub-cloud's state")

    def truncate(self, subcloud: SubCloudId, version: Mapping[ReplicaId, int]) -> int:
        """Remove log ranges that end at or below ``version`` and the checkpoint covers.

        For each origin the cut is ``min(version[origin], checkpoint[origin])``, so the
        state (checkpoint + log) never loses a counter: checkpoint first, then truncate to
        what every member has. The cut becomes the origin's *floor* (:meth:`summary`):
        envelopes at or below it can no longer be served. One transaction.

        Returns:
            How many envelopes were removed.

        Raises:
            StoreUsageError: bad arguments. StoreFull, StoreError: nothing changed.
        """
        sc = as_subcloud(subcloud)
        ver = as_version(version)

        def work(txn: Any) -> int:
            covered = self._checkpoint_version(txn, sc)
            floor = self._version_record(txn, _FLOORS, sc, "log floor")
            removed = 0
            cur = txn.cursor(db=self._db[_LOG])
            for origin, counter in ver.items():
                cut = min(counter, covered.get(origin, 0))
                if cut <= floor.get(origin, 0):
                    continue
                floor[origin] = cut
                okey = origin_key(sc, origin)
                head, nbytes, ndots = self._head(txn, okey)
                ok = cur.set_range(okey)
                while ok:
                    key = cur.key()
                    if not key.startswith(okey) or U64.unpack(key[-8:])[0] > cut:
                        break
                    value = cur.value()
                    last = U64.unpack(value[:8])[0]
                    if last <= cut:
                        nbytes -= len(value) - 8
                        ndots -= last - U64.unpack(key[-8:])[0] + 1
                        ok = _delete(cur)
                        removed += 1
                    else:
                        ok = cur.next()
                txn.put(okey, _HEAD.pack(head, nbytes, ndots), db=self._db[_HEADS])
            txn.put(sc, encode_record(floor, "log floor", MAX_SNAPSHOT_BYTES),
                    db=self._db[_FLOORS])
            return removed

        return self._env.write(work, "truncating a log")

    # -- blobs -------------------------------------------------------------------------------

    def put_chunks(self, chunks: Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]]) -> int:
        """Store chunks by hash in one transaction; a held hash is a no-op (dedup).

        The store does not hash: the caller verified each chunk against its hash. A chunk
        that no blob record names yet is an orphan until one does (see
        :meth:`collect_garbage`); store the record first (:meth:`put_blob`) when fetching.

        Returns:
            How many chunks were new.

        Raises:
            StoreUsageError: a bad hash or chunk, or the batch is too big; nothing written.
            StoreFull, StoreError: nothing was written.
        """
        items = _check_chunks(chunks)
        if not items:
            return 0
        return self._env.write(lambda txn: self._put_chunks(txn, items), "storing chunks")

    def _put_chunks(self, txn: Any, items: list[tuple[bytes, bytes]]) -> int:
        new = 0
        db, refs, orphans = self._db[_CHUNKS], self._db[_REFS], self._db[_ORPHANS]
        for digest, data in items:
            if txn.put(digest, data, overwrite=False, db=db):
                new += 1
                if txn.get(digest, db=refs) is None:
                    txn.put(digest, b"", db=orphans)
        return new

    def has_chunks(self, hashes: Iterable[bytes]) -> set[bytes]:
        """Return which of ``hashes`` are held.

        Raises:
            StoreUsageError: a bad hash or too many. StoreError: LMDB failed.
        """
        wanted: list[bytes] = []
        for digest in hashes:
            if len(wanted) == MAX_QUERY:
                raise StoreUsageError(f"ask about at most {MAX_QUERY} hashes at once")
            wanted.append(as_bytes(digest, "chunk hash", MIN_HASH, MAX_HASH))

        def work(txn: Any) -> set[bytes]:
            cur = txn.cursor(db=self._db[_CHUNKS])
            return {d for d in wanted if cur.set_key(d)}

        return self._env.read(work, "looking up chunks")

    def get_chunk(self, digest: bytes) -> bytes | None:
        """Return a chunk's bytes, or None.

        Raises:
            StoreUsageError: a bad hash. StoreError: LMDB failed.
        """
        key = as_bytes(digest, "chunk hash", MIN_HASH, MAX_HASH)
        raw = self._env.read(lambda txn: txn.get(key, db=self._db[_CHUNKS]), "reading a chunk")
        return None if raw is None else bytes(raw)

    def put_blob(
        self,
        blob_id: bytes,
        size: int,
        chunk_hashes: Iterable[bytes],
        chunks: Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]] = (),
    ) -> bool:
        """Store a blob record (and optionally some of its chunks) in one transaction.

        The record's chunks gain a reference each (per occurrence); replacing a record moves
        the references from the old chunk list to the new one. Chunks need not be held
        yet: :meth:`missing_chunks` lists what to fetch.

        Args:
            blob_id: the blob's id (e.g. its whole-content hash).
            size: its size in bytes.
            chunk_hashes: its chunk hashes, in order.
            chunks: chunk bytes to store with it (a local file being added).

        Returns:
            Whether the record is new or changed (False: an identical record was held).

        Raises:
            StoreUsageError: bad arguments; nothing written. StoreFull, StoreError: the same.
        """
        bid = as_bytes(blob_id, "blob id", 1, MAX_BLOB_ID)
        nbytes = as_size(size, "blob size", 0, MAX_BLOB_SIZE)
        order: list[bytes] = []
        for digest in chunk_hashes:
            if len(order) == MAX_BLOB_CHUNKS:
                raise StoreUsageError(f"a blob has at most {MAX_BLOB_CHUNKS} chunks")
            order.append(as_bytes(digest, "chunk hash", MIN_HASH, MAX_HASH))
        items = _check_chunks(chunks)
        value = encode_record({"s": nbytes, "c": order}, "blob record", 1 << 30)

        def work(txn: Any) -> bool:
            self._put_chunks(txn, items)
            blobs = self._db[_BLOBS]
            old = txn.get(bid, db=blobs)
            if old is not None and bytes(old) == value:
                return False
            if old is not None:
                for digest in _blob_record(old).chunks:
                    self._unref(txn, digest)
            for digest in order:
                self._ref(txn, digest)
            txn.put(bid, value, db=blobs)
            return True

        return self._env.write(work, "storing a blob record")

    def _ref(self, txn: Any, digest: bytes) -> None:
        refs = self._db[_REFS]
        raw = txn.get(digest, db=refs)
        count = 0 if raw is None else U64.unpack(raw)[0]
        if count == 0:
            txn.delete(digest, db=self._db[_ORPHANS])
        txn.put(digest, U64.pack(count + 1), db=refs)

    def _unref(self, txn: Any, digest: bytes) -> None:
        refs = self._db[_REFS]
        raw = txn.get(digest, db=refs)
        count = 0 if raw is None else U64.unpack(raw)[0]
        if count <= 1:
            txn.delete(digest, db=refs)
            txn.put(digest, b"", db=self._db[_ORPHANS])
        else:
            txn.put(digest, U64.pack(count - 1), db=refs)

    def get_blob(self, blob_id: bytes) -> BlobRecord | None:
        """Return a blob record, or None.

        Raises:
            StoreUsageError: a bad id. StoreError: LMDB failed or the record is damaged.
        """
        bid = as_bytes(blob_id, "blob id", 1, MAX_BLOB_ID)
        raw = self._env.read(lambda txn: txn.get(bid, db=self._db[_BLOBS]), "reading a blob")
        return None if raw is None else _blob_record(raw)

    def missing_chunks(self, blob_id: bytes) -> list[bytes] | None:
        """Return the blob's chunk hashes not held yet (in order, each once), or None.

        Raises:
            StoreUsageError: a bad id. StoreError: LMDB failed or the record is damaged.
        """
        bid = as_bytes(blob_id, "blob id", 1, MAX_BLOB_ID)

        def work(txn: Any) -> list[bytes] | None:
            raw = txn.get(bid, db=self._db[_BLOBS])
            if raw is None:
                return None
            cur = txn.cursor(db=self._db[_CHUNKS])
            seen: set[bytes] = set()
            out = []
            for digest in _blob_record(raw).chunks:
                if digest not in seen and not cur.set_key(digest):
                    out.append(digest)
                seen.add(digest)
            return out

        return self._env.read(work, "listing missing chunks")

    def remove_blob(self, blob_id: bytes) -> bool:
        """Remove a blob record; its chunks lose a reference (freed by collect_garbage).

        Returns:
            Whether a record was held.

        Raises:
            StoreUsageError: a bad id. StoreError: LMDB failed; nothing changed.
        """
        bid = as_bytes(blob_id, "blob id", 1, MAX_BLOB_ID)

        def work(txn: Any) -> bool:
            raw = txn.get(bid, db=self._db[_BLOBS])
            if raw is None:
                return False
            for digest in _blob_record(raw).chunks:
                self._unref(txn, digest)
            txn.delete(bid, db=self._db[_BLOBS])
            return True

        return self._env.write(work, "removing a blob")

    def collect_garbage(self, limit: int = MAX_GC_BATCH) -> GarbageCollected:
        """Free up to ``limit`` chunks that no blob record references, in one transaction.

        Args:
            limit: orphans to look at, 1..MAX_GC_BATCH.

        Returns:
            What was freed and whether orphans remain.

        Raises:
            StoreUsageError: a bad limit. StoreError: LMDB failed; nothing changed.
        """
        budget = as_size(limit, "limit", 1, MAX_GC_BATCH)

        def work(txn: Any) -> GarbageCollected:
            freed = nbytes = seen = 0
            refs, chunks = self._db[_REFS], self._db[_CHUNKS]
            cur = txn.cursor(db=self._db[_ORPHANS])
            ok = cur.first()
            while ok and seen < budget:
                digest = bytes(cur.key())
                seen += 1
                if txn.get(digest, db=refs) is None:
                    data = txn.get(digest, db=chunks)
                    if data is not None:
                        nbytes += len(data)
                        freed += 1
                        txn.delete(digest, db=chunks)
                ok = _delete(cur)
            return GarbageCollected(freed, nbytes, bool(ok))

        return self._env.write(work, "collecting garbage")

    # -- peers -------------------------------------------------------------------------------

    def put_peer(self, record: PeerRecord) -> None:
        """Add or replace what the node remembers of a peer.

        Raises:
            StoreUsageError: a bad record. StoreFull, StoreError: nothing was written.
        """
        if not isinstance(record, PeerRecord):
            raise StoreUsageError("record must be a PeerRecord")
        hn = as_hashname(record.hashname)
        value = _encode_peer(record)
        self._env.write(lambda txn: txn.put(hn.encode(), value, db=self._db[_PEERS]),
                        "storing a peer")

    def get_peer(self, hashname: Hashname) -> PeerRecord | None:
        """Return a peer's record, or None.

        Raises:
            StoreUsageError: a bad hashname. StoreError: LMDB failed or the record is damaged.
        """
        key = as_hashname(hashname).encode()
        raw = self._env.read(lambda txn: txn.get(key, db=self._db[_PEERS]), "reading a peer")
        return None if raw is None else _peer_record(key, raw)

    def peers(self) -> list[PeerRecord]:
        """Return every remembered peer, in hashname order.

        Raises:
            StoreError: LMDB failed or a record is damaged.
        """
        def work(txn: Any) -> list[PeerRecord]:
            return [_peer_record(bytes(k), v) for k, v in txn.cursor(db=self._db[_PEERS])]

        return self._env.read(work, "listing peers")

    def remember_path(
        self, hashname: Hashname, path: Mapping[str, Any], now: float
    ) -> bool:
        """Put ``path`` first in a peer's remembered paths and set its last-seen time.

        An equal path moves to the front; beyond ``MAX_PATHS_PER_PEER`` the oldest go.

        Args:
            hashname: the peer. path: a telehash v3 path (JSON-like mapping).
            now: seconds since the epoch.

        Returns:
            False if the peer is unknown (put it with :meth:`put_peer` first).

        Raises:
            StoreUsageError: bad arguments. StoreFull, StoreError: nothing was written.
        """
        key = as_hashname(hashname).encode()
        when = as_time(now, "now")
        if not isinstance(path, Mapping):
            raise StoreUsageError("path must be a mapping (telehash v3 path JSON)")
        new = dict(path)
        encode_record(new, "path")

        def work(txn: Any) -> bool:
            raw = txn.get(key, db=self._db[_PEERS])
            if raw is None:
                return False
            old = _peer_record(key, raw)
            paths = (new, *(p for p in old.paths if p != new))[:MAX_PATHS_PER_PEER]
            updated = PeerRecord(old.hashname, old.keys, paths, when)
            txn.put(key, _encode_peer(updated), db=self._db[_PEERS])
            return True

        return self._env.write(work, "remembering a path")

    def remove_peer(self, hashname: Hashname) -> bool:
        """Forget a peer. Returns whether it was known.

        Raises:
            StoreUsageError: a bad hashname. StoreError: LMDB failed.
        """
        key = as_hashname(hashname).encode()
        return bool(self._env.write(lambda txn: txn.delete(key, db=self._db[_PEERS]),
                                    "removing a peer"))

    # -- statistics --------------------------------------------------------------------------

    def statistics(self) -> StoreStatistics:
        """Return sizes and counts: map size, bytes in use, entries and bytes per table.

        Raises:
            StoreError: LMDB failed.
        """
        def work(txn: Any) -> dict[str, Any]:
            return {name.decode(): txn.stat(db) for name, db in self._db.items()}

        raw = self._env.read(work, "reading statistics")
        info = self._env.info()  # after the read: it may have adopted a grown map
        psize = info["psize"]
        tables = {
            name: TableStatistics(
                st["entries"],
                (st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]) * psize,
            )
            for name, st in raw.items()
        }
        return StoreStatistics(
            schema=self.schema,
            map_size=info["map_size"],
            max_map_size=self._env.max_map_size,
            used_bytes=(info["last_pgno"] + 1) * psize,
            growths=self._env.growths,
            adopted=self._env.adopted,
            tables=tables,
        )


# -- helpers ---------------------------------------------------------------------------------


def _delete(cur: Any) -> bool:
    """Delete the cursor's entry; return whether it now stands on a next entry.

    py-lmdb's ``Cursor.delete`` returns True after deleting the last entry too, leaving the
    cursor unpositioned (an empty key, which no table of ours holds)."""
    return bool(cur.delete()) and cur.key() != b""


def _check_item(origin: object, envelope: object, first: object, last: object
                ) -> tuple[ReplicaId, bytes, int, int]:
    o = as_replica(origin)
    env = as_bytes(envelope, "envelope", 1, MAX_ENVELOPE_BYTES)
    f = as_counter(first, "first")
    la = as_counter(last, "last")
    if la < f:
        raise StoreUsageError(f"last ({la}) must be >= first ({f})")
    return o, env, f, la


def _check_chunks(chunks: object) -> list[tuple[bytes, bytes]]:
    if isinstance(chunks, Mapping):
        pairs: Iterable[Any] = chunks.items()
    elif isinstance(chunks, Iterable) and not isinstance(chunks, bytes | str):
        pairs = chunks
    else:
        raise StoreUsageError("chunks must be a mapping or pairs of (hash, data)")
    out: list[tuple[bytes, bytes]] = []
    total = 0
    for pair in pairs:
        if len(out) == MAX_CHUNK_BATCH:
            raise StoreUsageError(f"store at most {MAX_CHUNK_BATCH} chunks per call")
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise StoreUsageError("each chunk is a (hash, data) pair")
        digest = as_bytes(pair[0], "chunk hash", MIN_HASH, MAX_HASH)
        data = as_bytes(pair[1], "chunk", 0, MAX_CHUNK_BYTES)
        total += len(data)
        if total > MAX_CHUNK_BATCH_BYTES:
            raise StoreUsageError(f"store at most {MAX_CHUNK_BATCH_BYTES} bytes per call")
        out.append((digest, data))
    return out


def _unpack_head(raw: bytes) -> tuple[int, int, int]:
    if len(raw) != _HEAD.size:
        raise _damaged("log head")
    head, nbytes, ndots = _HEAD.unpack(raw)
    return head, nbytes, ndots


def _stored_version(raw: bytes, what: str) -> dict[ReplicaId, int]:
    try:
        return as_version(decode_record(raw, what))
    except StoreUsageError as exc:
        raise _damaged(what) from exc


def _damaged(what: str) -> StoreError:
    return StoreError(f"a stored {what} is damaged: restore the store or let the node re-sync")


def _subcloud_record(raw: bytes) -> SubCloudRecord:
    value = decode_record(raw, "sub-cloud record")
    try:
        return SubCloudRecord(
            name=value["name"], kind=value["kind"], owner=Hashname(value["owner"]),
            policy=value["policy"],
        )
    except (KeyError, TypeError) as exc:
        raise _damaged("sub-cloud record") from exc


def _blob_record(raw: bytes) -> BlobRecord:
    value = decode_record(raw, "blob record")
    try:
        return BlobRecord(value["s"], tuple(value["c"]))
    except (KeyError, TypeError) as exc:
        raise _damaged("blob record") from exc


def _encode_peer(record: PeerRecord) -> bytes:
    if not isinstance(record.keys, Mapping) or len(record.keys) > MAX_CSID_KEYS:
        raise StoreUsageError(f"keys must map at most {MAX_CSID_KEYS} CSIDs to public keys")
    keys = {}
    for csid, key in record.keys.items():
        if not isinstance(csid, str) or not CSID_RE.fullmatch(csid):
            raise StoreUsageError(f"a CSID is two lowercase hex digits, not {csid!r:.20}")
        keys[csid] = as_bytes(key, "public key", 1, MAX_KEY_BYTES)
    if not isinstance(record.paths, tuple | list) or len(record.paths) > MAX_PATHS_PER_PEER:
        raise StoreUsageError(f"paths must be a sequence of at most {MAX_PATHS_PER_PEER}")
    paths = []
    for path in record.paths:
        if not isinstance(path, Mapping):
            raise StoreUsageError("each path is a mapping (telehash v3 path JSON)")
        paths.append(dict(path))
    seen = None if record.last_seen is None else as_time(record.last_seen, "last_seen")
    return encode_record({"keys": keys, "paths": paths, "seen": seen}, "peer record")


def _peer_record(key: bytes, raw: bytes) -> PeerRecord:
    value = decode_record(raw, "peer record")
    try:
        return PeerRecord(
            Hashname(key.decode()), dict(value["keys"]), tuple(value["paths"]), value["seen"]
        )
    except (KeyError, TypeError, UnicodeDecodeError) as exc:
        raise _damaged("peer record") from exc
