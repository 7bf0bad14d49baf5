"""Sub-clouds as the application sees them, and their signed registry records.

Theory of operation
-------------------
A :class:`SubCloud` is the handle an app gets from ``node.create_subcloud`` /
``node.subcloud``: reads go to the core ``Replica`` in memory, writes go through the node's
:class:`~p2pcloud._node.replication.Replication` engine, which commits them to the store
before the call returns (docs/subclouds.md).

Lazy replicas. A node may hold far more sub-clouds than it should keep in memory (a home box
with 10,000 things; a phone). The handle therefore holds its ``Replica`` only while it is
used: :attr:`SubCloud.replica` loads it from the store (checkpoint + log,
``Store.load_state``) on first use, and the engine's async paths load it in a worker thread
first (``Replication.loaded``). The engine keeps at most its budget of replicas loaded
(``MAX_LOADED_REPLICAS``, least recently used first out) and drops only replicas nobody can
be writing through: not *pinned* (:meth:`SubCloud.pinned`: its lock held, i.e. a write,
merge or checkpoint in flight; a synced folder; an open subscription; the cloud sub-cloud).
The store is the truth, so dropping one loses nothing; the next use loads it again.

Derived facts. What a layer reads of *every* sub-cloud at open (the things index, the list
of things) must not load every replica: :meth:`SubCloud.derived` caches small values computed
from the replica, keyed by the sub-cloud's state fingerprint (sync catalog: version digest,
log dots and bytes), and the engine persists them beside the store (:class:`DerivedCache`),
so a restart answers from the cache until the sub-cloud changes.

Registry records. Until the cloud/membership layer (``p2pcloud/cloud``) takes over, every
sub-cloud carries one *registry record*, signed by its owner (our extension, not
Telehash v3)::

    {"v": 1, "s": sub-cloud id (16), "n": name, "t": kind,
     "o": owner CS3a key (32), "k": owner Ed25519 verify key (32),
     "acl": {hashname: "read" | "write"}, "r": revision, "g": signature (64)}

``g = Ed25519(b"p2pcloud subcloud v1" + canonical CBOR of the map without "g")``. The
owner's hashname is derived from ``o`` (telehash v3 hashname rules) and ``k`` must convert
to ``o`` (the same key binding as envelopes), so any member can forward a record unchanged
and every receiver checks it came from the owner. A record replaces a held one only if it
has the same owner and a higher revision. :meth:`RegistryRecord.rights` is what the
engine's rights check reads.
"""

from __future__ import annotations

import contextlib
import hmac
import math
import os
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import cbor2
import nacl.bindings as _nb
import nacl.exceptions
import trio

from p2pcloud._core import BlobRef, Replica
from p2pcloud._crypto import KEY_SIZE, SIGNATURE_SIZE, LocalIdentity, hashname_from_keys
from p2pcloud._crypto import verify_signature as _verify
from p2pcloud._ids import Hashname, ReplicaId, SubCloudId
from p2pcloud._wire import b32encode
from p2pcloud.errors import BadRecord, LocalProtocolError
from p2pcloud.sync import replica_id_for

if TYPE_CHECKING:
    from p2pcloud._node.replication import Replication
    from p2pcloud.files import Folder

__all__ = [
    "KINDS",
    "MAX_ACL_ENTRIES",
    "MAX_RECORD_BYTES",
    "MAX_SUBSCRIPTION_BACKLOG",
    "RIGHTS",
    "MAX_DERIVED_BYTES",
    "MAX_LOADED_REPLICAS",
    "BlobReader",
    "Change",
    "DerivedCache",
    "PeerProgress",
    "RegistryRecord",
    "SubCloud",
    "Subscription",
    "decode_record",
    "sign_record",
]

MAX_SUBSCRIPTION_BACKLOG: Final = 100_000
"""Changes a subscriber may leave unread; past that it is closed with SubscriptionLost
(its reader must re-read the state), so a stalled reader cannot grow the node's memory."""

MAX_LOADED_REPLICAS: Final = 128
"""Unpinned replicas a node keeps in memory (least recently used dropped first). A thing's
replica with a few hundred log records takes ~200 KiB, so 128 of them stay near 25 MiB: fine
for a phone, while 10,000 held sub-clouds all loaded took 2.7 GiB. A busy set larger than
this still works; it only loads from the store more often."""
MAX_DERIVED_BYTES: Final = 64 * 1024 * 1024
"""Size of the persisted derived-facts file read at open: ~300 bytes per thing view, so
this is ~200,000 sub-clouds; a larger or damaged file is ignored (everything recomputes)."""
DERIVED_VERSION: Final = 1
_T = TypeVar("_T")

RECORD_VERSION: Final = 1
SIGNING_CONTEXT: Final = b"p2pcloud subcloud v1"  # domain separation from deltas
MAX_ACL_ENTRIES: Final = 256
"""Endpoints named in one ACL: a household's devices and guests; the record (~70 bytes per
entry) then stays far below the store's 64 KiB record limit."""
MAX_RECORD_BYTES: Final = 32 * 1024  # 256 entries of ~70 bytes plus the fixed fields
MAX_NAME_CHARS: Final = 200  # a label for people, not a payload
RIGHTS: Final = frozenset({"read", "write"})
KINDS: Final = frozenset({"device", "thing", "cloud"})  # the store's kinds (docs/store.md)
_FIELDS: Final = frozenset({"v", "s", "n", "t", "o", "k", "acl", "r", "g"})
_HASHNAME_CHARS: Final = 52  # base32 of SHA-256, telehash v3


@dataclass(frozen=True, slots=True)
class RegistryRecord:
    """A verified registry record.

    Attributes:
        raw: the signed bytes (forwarded unchanged, kept in the store).
        subcloud: the sub-cloud id.
        name: its name.
        kind: device, thing or cloud.
        owner: the owner's hashname.
        acl: hashname -> "read" or "write" (the owner always writes).
        revision: increases with every change the owner signs.
    """

    raw: bytes
    subcloud: SubCloudId
    name: str
    kind: str
    owner: Hashname
    acl: dict[Hashname, str]
    revision: int

    def rights(self, hashname: Hashname) -> str | None:
        """``"write"``, ``"read"`` or None for ``hashname``."""
        if hashname == self.owner:
            return "write"
        return self.acl.get(hashname)


def _body(obj: dict[str, Any]) -> bytes:
    return SIGNING_CONTEXT + cbor2.dumps({k: v for k, v in obj.items() if k != "g"},
                                         canonical=True)


def sign_record(
    identity: LocalIdentity,
    subcloud: SubCloudId,
    *,
    name: str,
    kind: str,
    acl: dict[Hashname, str],
    revision: int,
) -> RegistryRecord:
    """Sign a registry record as its owner.

    Args:
        identity: the owner (needs a signing key).
        subcloud: the sub-cloud id.
        name: its name (1..200 characters).
        kind: device, thing or cloud.
        acl: hashname -> rights.
        revision: greater than every revision signed before for this sub-cloud.

    Returns:
        The record.

    Raises:
        LocalProtocolError: no signing key, or a bad name, kind, ACL or revision.
    """
    if identity.verify_key is None:
        raise LocalProtocolError("this identity cannot sign (made from CS3a keys)")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise LocalProtocolError(f"a sub-cloud name is 1..{MAX_NAME_CHARS} characters")
    if kind not in KINDS:
        raise LocalProtocolError(f"kind must be one of {sorted(KINDS)}")
    if len(acl) > MAX_ACL_ENTRIES:
        raise LocalProtocolError(f"at most {MAX_ACL_ENTRIES} endpoints per sub-cloud")
    for hn, rights in acl.items():
        if rights not in RIGHTS or not isinstance(hn, str) or len(hn) != _HASHNAME_CHARS:
            raise LocalProtocolError(f"bad ACL entry {hn!r}: {rights!r}")
    obj: dict[str, Any] = {
        "v": RECORD_VERSION, "s": bytes(subcloud), "n": name, "t": kind,
        "o": identity.cs3a_public, "k": identity.verify_key,
        "acl": {str(h): r for h, r in sorted(acl.items())}, "r": revision,
    }
    obj["g"] = identity.sign(_body(obj))
    raw = cbor2.dumps(obj, canonical=True)
    return decode_record(raw)


def decode_record(raw: bytes) -> RegistryRecord:
    """Parse and verify a registry record (from a peer or the store).

    Args:
        raw: the record bytes.

    Returns:
        The verified record.

    Raises:
        BadRecord: malformed, a key that does not bind, or a forged signature.
    """
    if not isinstance(raw, bytes) or len(raw) > MAX_RECORD_BYTES:
        raise BadRecord("a registry record is bytes of at most 32 KiB")
    try:
        obj: Any = cbor2.loads(raw)
    except Exception as exc:  # cbor2 raises many types on hostile input; all mean malformed
        raise BadRecord(f"registry record is not CBOR: {exc}") from exc
    if not isinstance(obj, dict) or set(obj) != _FIELDS or obj["v"] != RECORD_VERSION:
        raise BadRecord("not a registry record")
    s, n, t, o, k, acl, r, g = (obj[x] for x in ("s", "n", "t", "o", "k", "acl", "r", "g"))
    if not (isinstance(s, bytes) and len(s) == 16 and isinstance(o, bytes) and len(o) == KEY_SIZE
            and isinstance(k, bytes) and len(k) == KEY_SIZE and isinstance(g, bytes)
            and len(g) == SIGNATURE_SIZE):
        raise BadRecord("a key, id or signature has the wrong size")
    if not isinstance(n, str) or not 0 < len(n) <= MAX_NAME_CHARS or t not in KINDS:
        raise BadRecord("bad name or kind")
    if type(r) is not int or not 0 < r < 1 << 63:
        raise BadRecord("bad revision")
    if not isinstance(acl, dict) or len(acl) > MAX_ACL_ENTRIES:
        raise BadRecord("bad ACL")
    for hn, rights in acl.items():
        if not isinstance(hn, str) or len(hn) != _HASHNAME_CHARS or rights not in RIGHTS:
            raise BadRecord("bad ACL entry")
    try:
        converted = _nb.crypto_sign_ed25519_pk_to_curve25519(k)
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, TypeError) as exc:
        raise BadRecord("owner verify key is not a curve point") from exc
    if not hmac.compare_digest(converted, o):
        raise BadRecord("owner verify key does not match the CS3a key")
    if not _verify(o, k, _body(obj), g):
        raise BadRecord("forged registry record signature")
    owner = hashname_from_keys({"3a": o})
    return RegistryRecord(raw, SubCloudId(s), n, t, owner,
                          {Hashname(h): v for h, v in acl.items()}, r)


# -- what applications see ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """One place a write or a merge touched.

    Attributes:
        collection: the collection (or log) name.
        document: the document id (None for a log append).
        field: the field (None for a whole document removed, or a log append).
        origin: ``"local"`` for this node's writes, else the hashname of the peer it came from.
    """

    collection: str
    document: str | None
    field: str | None
    origin: str


@dataclass(frozen=True, slots=True)
class PeerProgress:
    """What is still to move for one sub-cloud with one peer (progress bars).

    Items are dots (one per written value); bytes are estimates except ``in_flight_bytes``.
    ``blob_bytes_done``/``blob_bytes_total`` cover the node's blob fetches in progress.
    """

    peer: Hashname
    send_items: int
    send_bytes: int
    in_flight_bytes: int
    receive_items: int
    receive_bytes: int
    blob_bytes_done: int
    blob_bytes_total: int


class Subscription:
    """An async iterator of :class:`Change` batches of one sub-cloud; close it when done.

    ``async for change in sub:`` yields changes one by one; ``async with`` closes it.
    """

    def __init__(self, owner: SubCloud) -> None:
        """Created by :meth:`SubCloud.subscribe`."""
        self._owner = owner
        self._send, self._receive = trio.open_memory_channel[Change](math.inf)
        self._queued = 0
        self._lost = False

    def _deliver(self, changes: list[Change]) -> None:
        if self._lost:
            return
        if self._queued + len(changes) > MAX_SUBSCRIPTION_BACKLOG:
            self._lost = True
            self._send.close()
            return
        for change in changes:
            try:
                self._send.send_nowait(change)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
        self._queued += len(changes)

    def __aiter__(self) -> AsyncIterator[Change]:
        """Iterate the changes."""
        return self

    async def __anext__(self) -> Change:
        """The next change.

        Raises:
            StopAsyncIteration: the subscription was closed.
            SubscriptionLost: the reader fell more than MAX_SUBSCRIPTION_BACKLOG behind.
        """
        from p2pcloud.errors import SubscriptionLost

        try:
            change = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if self._lost:
                raise SubscriptionLost("the subscriber fell too far behind") from None
            raise StopAsyncIteration from None
        self._queued -= 1
        return change

    def aclose_nowait(self) -> None:
        """Stop receiving changes."""
        self._owner._subscribers.discard(self)
        self._send.close()

    async def aclose(self) -> None:
        """Stop receiving changes."""
        self.aclose_nowait()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> Subscription:
        """Use as ``async with sc.subscribe() as changes:``."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close the subscription."""
        await self.aclose()


class BlobReader:
    """A blob as an async readable stream (``receive_some``), fetching missing chunks first."""

    def __init__(self, owner: SubCloud, ref: BlobRef) -> None:
        """Created by :meth:`SubCloud.open_blob`."""
        self._owner = owner
        self.ref = ref
        self._chunks: list[bytes] | None = None
        self._index = 0
        self._buffer = b""
        self._offset = 0

    async def _ensure(self) -> None:
        if self._chunks is None:
            self._chunks = await self._owner._engine.ensure_blob(self.ref.hash)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to ``max_bytes`` of the blob (b"" at its end).

        Raises:
            BlobError: a chunk is missing from the store after the fetch completed.
        """
        await self._ensure()
        assert self._chunks is not None
        if self._offset >= len(self._buffer):
            if self._index >= len(self._chunks):
                await trio.lowlevel.checkpoint()
                return b""
            self._buffer = await self._owner._engine.read_chunk(self._chunks[self._index])
            self._index += 1
            self._offset = 0
        end = len(self._buffer) if max_bytes is None else self._offset + max_bytes
        out = self._buffer[self._offset:end]
        self._offset += len(out)
        return out

    async def read_all(self) -> bytes:
        """The whole blob (mind its size)."""
        parts = []
        while data := await self.receive_some():
            parts.append(data)
        return b"".join(parts)

    async def aclose(self) -> None:
        """Release the reader."""
        self._buffer = b""
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> BlobReader:
        """Use as ``async with sc.open_blob(ref) as reader:``."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close the reader."""
        await self.aclose()


class DerivedCache:
    """Small values derived from sub-cloud states, each valid for one state fingerprint.

    The engine owns one, loads it at open and saves it at close and with its checkpoints
    (``derived.cbor`` beside the store). An entry whose fingerprint differs from the
    sub-cloud's current one is ignored, so a stale or missing file only costs a recompute.
    Values must be CBOR-able (tuples come back as lists).
    """

    def __init__(self, entries: dict[bytes, dict[str, tuple[bytes, Any]]] | None = None
                 ) -> None:
        """An empty cache (or one with ``entries``: sub-cloud -> name -> (fingerprint, value))."""
        self.entries: dict[bytes, dict[str, tuple[bytes, Any]]] = entries or {}
        self.dirty = False

    def get(self, subcloud: bytes, name: str, fingerprint: bytes) -> tuple[bool, Any]:
        """``(True, value)`` if held for this fingerprint, else ``(False, None)``."""
        entry = self.entries.get(subcloud, {}).get(name)
        if entry is None or entry[0] != fingerprint:
            return False, None
        return True, entry[1]

    def put(self, subcloud: bytes, name: str, fingerprint: bytes, value: Any) -> None:
        """Keep a value computed from the state ``fingerprint`` names."""
        self.entries.setdefault(subcloud, {})[name] = (fingerprint, value)
        self.dirty = True

    @classmethod
    def load(cls, path: Path) -> DerivedCache:
        """Read the file; missing, oversized or damaged gives an empty cache (no error)."""
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_DERIVED_BYTES + 1)
        except OSError:
            return cls()
        if len(raw) > MAX_DERIVED_BYTES:
            return cls()
        try:
            obj: Any = cbor2.loads(raw)
        except Exception:  # a cache: any damage (torn write, old format) means recompute
            return cls()
        if not isinstance(obj, dict) or obj.get("v") != DERIVED_VERSION:
            return cls()
        entries: dict[bytes, dict[str, tuple[bytes, Any]]] = {}
        held = obj.get("e")
        if not isinstance(held, dict):
            return cls()
        for sc, names in held.items():
            if not isinstance(sc, bytes) or not isinstance(names, dict):
                continue
            out = entries[sc] = {}
            for name, pair in names.items():
                if (isinstance(name, str) and isinstance(pair, list) and len(pair) == 2
                        and isinstance(pair[0], bytes)):
                    out[name] = (pair[0], pair[1])
        return cls(entries)

    def copy(self) -> DerivedCache:
        """A copy to save from a worker thread while this one keeps changing (clears
        ``dirty`` here; values are never mutated in place, so they are shared)."""
        self.dirty = False
        return DerivedCache({sc: dict(names) for sc, names in self.entries.items()})

    def save(self, path: Path) -> None:
        """Write the file atomically (temporary file, fsync, rename); clears ``dirty``.

        Not thread-safe against changes: save a :meth:`copy` from a worker thread.
        """
        data = cbor2.dumps({"v": DERIVED_VERSION, "e": {
            sc: {n: [fp, v] for n, (fp, v) in names.items()}
            for sc, names in self.entries.items()}})
        self.dirty = False
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class SubCloud:
    """One sub-cloud replicated by this node (from ``node.create_subcloud``/``node.subcloud``).

    Reads are synchronous (the replica is loaded from the store on first use, see the module
    docstring); every write is durable when its call returns.

    Attributes:
        id: the 16-byte id.
        replica_id: this node's replica id of it (bound to our hashname).
    """

    def __init__(self, engine: Replication, record: RegistryRecord,
                 replica: Replica | None = None) -> None:
        """Created by the replication engine; without ``replica`` it loads on first use."""
        self._engine = engine
        self.record = record
        self.id: SubCloudId = record.subcloud
        self._replica: Replica | None = replica
        self.replica_id: ReplicaId = replica_id_for(record.subcloud, engine.hashname)
        self.lock = trio.Lock()  # one user of the replica at a time (writes, merges, folders)
        self._subscribers: set[Subscription] = set()
        self.folders: list[Folder] = []
        self.since_checkpoint = 0  # envelopes stored since the last checkpoint
        self.log_dots = 0  # dots in the store's log (state fingerprint, see derived())
        self.peer_versions: dict[Hashname, dict[bytes, int]] = {}
        self._pins = 0

    # -- the replica, loaded on demand ---------------------------------------------------------

    @property
    def replica(self) -> Replica:
        """The core replica, loaded from the store now if it is not in memory.

        The load runs in the calling (Trio) thread; async code should ``await
        engine.loaded(sc)`` first so it happens in a worker thread. Do not keep the object
        beyond the current step: once unpinned it may be dropped and another loaded later.
        """
        replica = self._replica
        if replica is None:
            replica = self._engine._load_now(self)
        else:
            self._engine._touch(self)
        return replica

    @replica.setter
    def replica(self, replica: Replica) -> None:
        self._replica = replica
        self._engine._touch(self)

    @property
    def is_loaded(self) -> bool:
        """Whether the replica is in memory now."""
        return self._replica is not None

    def pinned(self) -> bool:
        """Whether the replica must stay in memory: a write, merge or checkpoint holds the
        lock, a folder syncs it, a subscriber listens, a caller pinned it (:meth:`pin`),
        or it is the cloud sub-cloud (read on every membership change)."""
        return bool(self.lock.locked() or self.folders or self._subscribers or self._pins
                    or self.record.kind == "cloud")

    @contextlib.contextmanager
    def pin(self) -> Any:
        """``with sc.pin():`` keeps the replica in memory for the block."""
        self._pins += 1
        try:
            yield self
        finally:
            self._pins -= 1

    def _drop(self) -> bool:
        """Forget the replica if nothing pins it (the store holds all of it)."""
        if self._replica is None or self.pinned():
            return False
        self._replica = None
        return True

    def derived(self, name: str, fn: Callable[[Replica], _T]) -> _T:
        """A small value computed from the replica, cached for the current state.

        The cache is keyed by the state fingerprint (sync catalog version and floor, dots in
        the log) and persisted by the engine, so at open it answers without loading the
        replica. While a write or merge holds the lock the replica may be ahead of the
        catalog, so the value is computed but not kept.

        Args:
            name: what is derived (one namespace per layer, e.g. ``"things.view"``).
            fn: computes it from the replica (CBOR-able result; exceptions pass through and
                nothing is cached).

        Returns:
            The value.
        """
        fp = self._engine.fingerprint(self)
        cache = self._engine.derived_cache
        found, value = cache.get(self.id, name, fp)
        if found:
            return value  # type: ignore[no-any-return]
        result = fn(self.replica)
        if not self.lock.locked():
            cache.put(self.id, name, fp, result)
        return result

    # -- identity ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The name its owner gave it."""
        return self.record.name

    @property
    def kind(self) -> str:
        """device, thing or cloud."""
        return self.record.kind

    @property
    def owner(self) -> Hashname:
        """The owner's hashname."""
        return self.record.owner

    @property
    def id_text(self) -> str:
        """The id as base32 (how users see it)."""
        return b32encode(self.id)

    def rights(self, hashname: Hashname) -> str | None:
        """``"write"``, ``"read"`` or None for an endpoint."""
        return self.record.rights(hashname)

    def __repr__(self) -> str:
        return f"<SubCloud {self.name!r} {self.id_text[:8]}>"

    # -- reads --------------------------------------------------------------------------------

    def get(self, coll: str, doc: str) -> dict[str, Any] | None:
        """A document as ``{field: value}``, or None if absent."""
        return self.replica.document(coll, doc)

    def get_field(self, coll: str, doc: str, field: str, default: Any = None) -> Any:
        """One field's value (``default`` if absent)."""
        return self.replica.get(coll, doc, field, default)

    def documents(self, coll: str) -> list[str]:
        """The document ids of a collection, sorted."""
        return self.replica.documents(coll)

    def collections(self) -> list[str]:
        """The non-empty collections, sorted."""
        return self.replica.collections()

    def log(self, name: str) -> list[Any]:
        """The values of an append-only log, oldest first."""
        return [value for _hlc, _rid, value in self.replica.log(name)]

    def version(self) -> dict[bytes, int]:
        """The version vector (origin replica id -> counter held without a gap)."""
        return self.replica.version()

    def conflicts(self) -> list[tuple[str, str, str, list[Any]]]:
        """Fields holding concurrent values, and conflicted files of synced folders.

        Returns:
            ``(collection, document, field, values)`` for every field with more than one
            live value (a scan of the whole sub-cloud), then one entry per conflicted file
            of each folder: ``("files", path, copy or "", [versions])``.
        """
        out: list[tuple[str, str, str, list[Any]]] = []
        for coll in self.replica.collections():
            for doc in self.replica.documents(coll):
                fields = self.replica.document(coll, doc) or {}
                for field in fields:
                    values = self.replica.conflicts(coll, doc, field)
                    if len(values) > 1:
                        out.append((coll, doc, field, values))
        for folder in self.folders:
            for c in folder.conflicts():
                out.append(("files", c.path, c.copy or "", list(c.versions)))
        return out

    # -- writes --------------------------------------------------------------------------------

    async def put(self, coll: str, doc: str, fields: Mapping[str, Any]) -> None:
        """Write several fields of a document (last-writer-wins) in one transaction.

        Raises:
            AccessDenied: this node has no write rights. CoreUsageError: a bad name or value.
            StoreError: the write could not be made durable (nothing changed).
        """
        items = dict(fields)
        await self._engine.write(
            self, lambda r: r.set_many(coll, doc, items),
            [(coll, doc, f) for f in items],
        )

    async def set(self, coll: str, doc: str, field: str, value: Any) -> None:
        """Write one field (last-writer-wins). Raises as :meth:`put`."""
        await self._engine.write(self, lambda r: r.set(coll, doc, field, value),
                                 [(coll, doc, field)])

    async def delete(self, coll: str, doc: str) -> None:
        """Remove a document. Raises as :meth:`put`."""
        if self.replica.document(coll, doc) is None:
            await trio.lowlevel.checkpoint()
            return
        await self._engine.write(self, lambda r: r.remove(coll, doc), [(coll, doc, None)])

    async def append(self, log: str, value: Any) -> None:
        """Append a record to an append-only log. Raises as :meth:`put`."""
        await self._engine.write(self, lambda r: r.append(log, value), [(log, None, None)])

    async def share(self, hashname: str, rights: str | None) -> None:
        """Give an endpoint read or write rights (None removes them); owner only.

        Raises:
            AccessDenied: this node does not own the sub-cloud.
            LocalProtocolError: bad rights or hashname.
        """
        await self._engine.share(self, Hashname(hashname), rights)

    # -- changes, blobs, folders, progress ----------------------------------------------------

    def subscribe(self) -> Subscription:
        """Changes from now on, local and remote, as an async iterator (close it when done)."""
        sub = Subscription(self)
        self._subscribers.add(sub)
        return sub

    def _notify(self, changes: list[Change]) -> None:
        for sub in list(self._subscribers):
            sub._deliver(changes)

    async def add_blob(self, source: str | Path | bytes | trio.abc.ReceiveStream) -> BlobRef:
        """Store content as a blob (chunks in the store) and return its reference.

        Store the reference in a document field to share it: ``await sc.set("photos",
        "p1", "image", ref)``; peers fetch the chunks when they open it.

        Args:
            source: a file path, the bytes, or a stream read to its end.

        Returns:
            ``BlobRef(blob hash, size)``.
        """
        return await self._engine.add_blob(source)

    def open_blob(self, ref: BlobRef) -> BlobReader:
        """Read a blob; missing chunks are fetched from peers first."""
        return BlobReader(self, ref)

    async def add_folder(self, path: str | Path) -> Folder:
        """Sync a directory with this sub-cloud's ``files`` collection (and watch it).

        Returns:
            The :class:`p2pcloud.files.Folder` (its first full reconcile has run).
        """
        return await self._engine.add_folder(self, Path(path))

    def progress(self) -> list[PeerProgress]:
        """Items and bytes still to send to and receive from each connected peer."""
        return self._engine.progress(self)
