"""The CRDT merge core, in readable Python: the specification and the test oracle.

Theory of operation
-------------------
A :class:`Replica` is one copy of a sub-cloud on one endpoint (DESIGN.md section 5). It holds
collections (collection name -> document id -> field name -> CRDT value), append-only logs
(log name -> records) and a causal context. ``_cmerge.pyx`` is a Cython optimisation of this
module; it must agree with it on every state, delta, encoding and change report
(STYLE.md section 1.3). This module reads no clock and does no I/O: time comes in as
``now_ms`` (physical milliseconds since the Unix epoch).

The model is the delta-state causal CRDT of Almeida, Shoker and Baquero (arXiv:1603.01529):

* Every value written gets a *dot* ``(replica, counter)``: the replica's counter goes up by
  one for each entry it creates. The *causal context* is the set of dots a replica has seen,
  kept as a version vector plus a "dot cloud" of ranges above it (compacted on every insert).
* A field is a *dot store*: the set of live entries written at it. A local write records the
  dots it has seen at that field as *killed* (they join the context and leave the store).
  Writes that did not see each other are concurrent and both stay; how a field reads them
  depends on its type: last-writer-wins picks the greatest (HLC, replica id, counter), a
  multi-value register shows them all, a counter adds the per-replica contributions, an
  add-wins set shows every element that has a live entry, a text field shows the merged text.
* Merging keeps a remote entry unless its dot is already in the local context (seen: it is
  here, or something here has killed it), and drops a local entry whose dot the remote side
  has seen but no longer holds. Removing a field, a document or a set element only adds
  dots to the context: there are no tombstones, and the context itself stays compact
  (a version vector plus a few ranges) because dots are dense per replica.
* Log records (readings, events) are entries that nothing kills: an append costs one dot
  and the value.

One binary format serves three purposes (docs/core.md has the byte layout): the delta of one
local transaction (:meth:`Replica.commit`), the delta a peer lacks
(:meth:`Replica.encode_since`) and the snapshot (:meth:`Replica.encode_snapshot`, the delta an
empty replica lacks; canonical, so equal states give equal bytes). Decoding is complete before
any mutation, so malformed input raises :class:`DecodeError` and changes nothing.

Hybrid logical clock: one HLC per transaction, 48 bits of physical milliseconds and 16 bits of
logical counter in one 64-bit integer. A remote HLC more than ``MAX_CLOCK_SKEW_MS`` ahead of
``now_ms`` is refused with :class:`ClockSkewError`, so one device with a wrong clock cannot
drag every other clock into the future.
"""

from __future__ import annotations

import builtins
import struct
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

from p2pcloud.errors import ClockSkewError, CoreUsageError, DecodeError

__all__ = [
    "FORMAT_VERSION",
    "MAX_CLOCK_SKEW_MS",
    "BlobRef",
    "CausalContext",
    "Change",
    "HybridClock",
    "Replica",
    "decode_value",
    "decode_version",
    "encode_value",
    "encode_version",
    "hlc_pack",
    "hlc_unpack",
]

# -- limits, each with its reason ---------------------------------------------------------

HLC_LOGICAL_BITS: Final = 16  # 65,536 events per millisecond before borrowing the next ms
HLC_LOGICAL_MASK: Final = (1 << HLC_LOGICAL_BITS) - 1
# 48 bits hold the milliseconds, but now_ms stays below 2^47 (the year 6429) so every accepted
# HLC is below 2^63 and the difference of two fits a signed 64-bit integer (ADVANCE ops)
MAX_PHYSICAL_MS: Final = (1 << 47) - 1
MAX_HLC: Final = (1 << 64) - 1  # the packed clock is one unsigned 64-bit integer
MAX_CLOCK_SKEW_MS: Final = 5 * 60 * 1000
"""How far a remote clock may run ahead of ours (5 minutes, Kerberos' default tolerance).

NTP-synchronised devices agree within a second; a device whose clock is further ahead is
refused with ClockSkewError rather than allowed to push every replica's clock (and so every
later last-writer-wins decision) into its future."""
MIN_REPLICA_ID: Final = 8  # BRIEF: replica ids are opaque bytes of 8..32
MAX_REPLICA_ID: Final = 32
MAX_NAME_BYTES: Final = 1024  # collection, document, field and log names: a path, not a payload
MAX_VALUE_DEPTH: Final = 32  # nested lists/maps in a value; bounds decoder recursion
MAX_COUNTER: Final = (1 << 63) - 1  # dot counters: 2^63 entries outlive any replica; fits int64
MAX_VARINT_BYTES: Final = 10  # LEB128 of a 64-bit integer
MAX_U64: Final = (1 << 64) - 1
MAX_BLOB_HASH: Final = 64  # a BLAKE3/SHA-512 digest at most
FIELD_NAME_CACHE: Final = 8  # field names a transaction delta remembers (a document's fields)

FORMAT_MAGIC: Final = 0xD7  # first byte of every delta and snapshot
FORMAT_VERSION: Final = 1

# Entry kinds (the type of the value an entry belongs to) double as op codes.
OP_LWW: Final = 1  # last-writer-wins register write
OP_MV: Final = 2  # multi-value register write
OP_COUNTER: Final = 3  # counter: the writer's cumulative (increments, decrements)
OP_SET_ADD: Final = 4  # add-wins set: add an element
OP_TEXT: Final = 5  # text field edit: carries a CORE-TEXT delta
OP_APPEND: Final = 6  # append a record to a log
OP_REMOVE_FIELD: Final = 7  # kill-only: the field's entries
OP_REMOVE_DOC: Final = 8  # kill-only: every entry of a document
OP_SET_REMOVE: Final = 9  # kill-only: the entries of one set element
OP_ADVANCE: Final = 10  # skip counters and move the run's HLC (snapshots, since-deltas)
_ENTRY_OPS: Final = frozenset({OP_LWW, OP_MV, OP_COUNTER, OP_SET_ADD, OP_TEXT, OP_APPEND})

FLAG_NEW_COLL: Final = 0x10  # a collection/log name reference follows
FLAG_NEW_DOC: Final = 0x20  # a document id reference follows
FLAG_KILLS: Final = 0x40  # a kill list follows the payload
FLAG_TICK: Final = 0x80  # the HLC moves up by one before this op (one transaction per edit)

# Value tags (docs/core.md "values").
TAG_NONE: Final = 0
TAG_FALSE: Final = 1
TAG_TRUE: Final = 2
TAG_UINT: Final = 3
TAG_NEGINT: Final = 4
TAG_FLOAT: Final = 5
TAG_STR: Final = 6
TAG_BYTES: Final = 7
TAG_LIST: Final = 8
TAG_MAP: Final = 9
TAG_BLOB: Final = 10
TAG_SMALL: Final = 0x80  # 0x80 | n encodes the integer n in 0..127 in one byte

Change = tuple[str, str | None, str | None]
"""What a merge touched: ``(collection, document, field)``; ``(log, None, None)`` for logs."""


# -- hybrid logical clock ------------------------------------------------------------------


def hlc_pack(physical_ms: int, logical: int) -> int:
    """Pack a hybrid logical clock reading into 64 bits.

    Args:
        physical_ms: milliseconds since the Unix epoch, 0..2^47-1.
        logical: the logical counter, 0..65535.

    Returns:
        ``physical_ms << 16 | logical``.

    Raises:
        CoreUsageError: a part is out of range.
    """
    if not 0 <= physical_ms <= MAX_PHYSICAL_MS or not 0 <= logical <= HLC_LOGICAL_MASK:
        raise CoreUsageError("HLC parts out of range")
    return (physical_ms << HLC_LOGICAL_BITS) | logical


def hlc_unpack(hlc: int) -> tuple[int, int]:
    """Split a packed HLC into ``(physical_ms, logical)``.

    Args:
        hlc: a packed clock, 0..2^64-1.

    Returns:
        The physical milliseconds and the logical counter.

    Raises:
        CoreUsageError: ``hlc`` is not a 64-bit unsigned integer.
    """
    if not 0 <= hlc <= MAX_HLC:
        raise CoreUsageError("HLC out of range")
    return hlc >> HLC_LOGICAL_BITS, hlc & HLC_LOGICAL_MASK


def _check_now(now_ms: int) -> None:
    if not isinstance(now_ms, int) or not 0 <= now_ms <= MAX_PHYSICAL_MS:
        raise CoreUsageError("now_ms must be an int of milliseconds in 0..2^47-1")


class HybridClock:
    """A hybrid logical clock (Kulkarni et al., 2014) that never reads the time itself.

    Readings are packed 64-bit integers (see :func:`hlc_pack`); each :meth:`tick` returns a
    reading greater than every reading ticked or observed before.
    """

    __slots__ = ("last",)

    def __init__(self, last: int = 0) -> None:
        """Start the clock.

        Args:
            last: the greatest reading already used or seen (0 for a new clock).
        """
        self.last = last

    def tick(self, now_ms: int) -> int:
        """Return a fresh reading for a local event.

        Args:
            now_ms: the physical time in milliseconds.

        Returns:
            ``now_ms << 16`` if the physical clock moved past every reading, else the last
            reading plus one (the logical part carries into the millisecond when full).

        Raises:
            CoreUsageError: ``now_ms`` is out of range or the clock is exhausted.
        """
        _check_now(now_ms)
        if now_ms > self.last >> HLC_LOGICAL_BITS:
            self.last = now_ms << HLC_LOGICAL_BITS
        elif self.last >= MAX_HLC:
            raise CoreUsageError("hybrid logical clock exhausted")
        else:
            self.last += 1
        return self.last

    def check(self, remote: int, now_ms: int) -> None:
        """Refuse a remote reading that runs too far ahead of the local physical time.

        Args:
            remote: a packed remote reading.
            now_ms: the local physical time in milliseconds.

        Raises:
            ClockSkewError: ``remote`` is more than ``MAX_CLOCK_SKEW_MS`` ahead of ``now_ms``.
        """
        if (remote >> HLC_LOGICAL_BITS) > now_ms + MAX_CLOCK_SKEW_MS:
            raise ClockSkewError(
                f"remote clock {remote >> HLC_LOGICAL_BITS} ms is more than "
                f"{MAX_CLOCK_SKEW_MS} ms ahead of {now_ms} ms"
            )

    def observe(self, remote: int, now_ms: int) -> None:
        """Take a remote reading into account so later ticks order after it.

        Args:
            remote: a packed remote reading.
            now_ms: the local physical time in milliseconds.

        Raises:
            ClockSkewError: the remote reading is too far ahead (nothing changes).
            CoreUsageError: ``now_ms`` is out of range.
        """
        _check_now(now_ms)
        self.check(remote, now_ms)
        if remote > self.last:
            self.last = remote


# -- causal context ------------------------------------------------------------------------


class CausalContext:
    """A set of dots: per replica a version vector entry plus a cloud of ranges above it.

    Keys are replica ids (or, inside a Replica, small integers standing for them). The
    representation is kept compact on every insert: ranges in the cloud are sorted,
    disjoint, not adjacent, and start above ``vv[key] + 1``; a range reaching the vector
    is folded into it.
    """

    __slots__ = ("cloud", "vv")

    def __init__(self) -> None:
        """Create an empty context."""
        self.vv: dict[Any, int] = {}
        self.cloud: dict[Any, list[tuple[int, int]]] = {}

    def contains(self, key: Any, counter: int) -> bool:
        """Return whether the dot ``(key, counter)`` is in the context."""
        if counter <= self.vv.get(key, 0):
            return True
        ranges = self.cloud.get(key)
        if not ranges:
            return False
        i = bisect_right(ranges, (counter, MAX_U64)) - 1
        return i >= 0 and ranges[i][0] <= counter <= ranges[i][1]

    def add(self, key: Any, counter: int) -> None:
        """Add the dot ``(key, counter)``."""
        self.add_range(key, counter, counter)

    def add_range(self, key: Any, lo: int, hi: int) -> None:
        """Add the dots ``(key, lo) .. (key, hi)`` (inclusive); compacts as it goes."""
        if hi < lo:
            return
        v = self.vv.get(key, 0)
        if hi <= v:
            return
        ranges = self.cloud.get(key)
        if lo <= v + 1:
            v = hi
            if ranges:
                # fold every cloud range that now touches the vector into it
                i = 0
                while i < len(ranges) and ranges[i][0] <= v + 1:
                    v = max(v, ranges[i][1])
                    i += 1
                del ranges[:i]
                if not ranges:
                    del self.cloud[key]
            self.vv[key] = v
            return
        if ranges is None:
            self.cloud[key] = [(lo, hi)]
            return
        # insert into the sorted cloud, merging overlapping or adjacent ranges
        i = bisect_right(ranges, (lo, MAX_U64))
        if i > 0 and ranges[i - 1][1] + 1 >= lo:
            i -= 1
            lo = ranges[i][0]
            hi = max(hi, ranges[i][1])
        j = i
        while j < len(ranges) and ranges[j][0] <= hi + 1:
            hi = max(hi, ranges[j][1])
            j += 1
        ranges[i:j] = [(lo, hi)]

    def overlaps(self, key: Any, lo: int, hi: int) -> bool:
        """Return whether any dot ``(key, lo..hi)`` is in the context."""
        if lo <= self.vv.get(key, 0):
            return True
        ranges = self.cloud.get(key)
        if not ranges:
            return False
        i = bisect_right(ranges, (hi, MAX_U64)) - 1
        return i >= 0 and ranges[i][1] >= lo

    def ranges(self, key: Any) -> list[tuple[int, int]]:
        """Return the dots of ``key`` as sorted disjoint inclusive ranges."""
        out: list[tuple[int, int]] = []
        v = self.vv.get(key, 0)
        if v:
            out.append((1, v))
        out.extend(self.cloud.get(key, ()))
        return out

    def keyset(self) -> set[Any]:
        """Return every key with at least one dot."""
        return set(self.vv) | set(self.cloud)

    def max(self, key: Any) -> int:
        """Return the greatest counter of ``key`` in the context (0 if none)."""
        ranges = self.cloud.get(key)
        if ranges:
            return ranges[-1][1]
        return self.vv.get(key, 0)

    def merge(self, other: CausalContext) -> None:
        """Add every dot of ``other`` (the join of two contexts)."""
        for key in other.keyset():
            for lo, hi in other.ranges(key):
                self.add_range(key, lo, hi)

    def compact(self) -> None:
        """Fold cloud ranges into the version vector where they touch it.

        The context is kept compact on every insert, so this only repairs a context
        whose fields were assigned by hand; it is idempotent.
        """
        for key in list(self.cloud):
            ranges = sorted(self.cloud.pop(key))
            for lo, hi in ranges:
                self.add_range(key, lo, hi)

    def version(self) -> dict[Any, int]:
        """Return the version vector part (keys with a counter > 0)."""
        return {k: v for k, v in self.vv.items() if v}

    def copy(self) -> CausalContext:
        """Return an independent copy."""
        out = CausalContext()
        out.vv = dict(self.vv)
        out.cloud = {k: list(v) for k, v in self.cloud.items()}
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CausalContext):
            return NotImplemented
        keys = self.keyset() | other.keyset()
        return all(self.ranges(k) == other.ranges(k) for k in keys)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"CausalContext(vv={self.vv!r}, cloud={self.cloud!r})"


# -- values --------------------------------------------------------------------------------


class BlobRef:
    """A reference to a blob: its content hash and its size in bytes (an LWW value)."""

    __slots__ = ("hash", "size")

    def __init__(self, hash: bytes, size: int) -> None:  # noqa: A002 - the natural name
        """Create a reference.

        Args:
            hash: the blob's digest (1..64 bytes, BLAKE3 in p2pcloud).
            size: the blob's length in bytes.

        Raises:
            CoreUsageError: a part is out of range.
        """
        if not isinstance(hash, bytes) or not 1 <= len(hash) <= MAX_BLOB_HASH:
            raise CoreUsageError("BlobRef.hash must be 1..64 bytes")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_U64:
            raise CoreUsageError("BlobRef.size must be an int in 0..2^64-1")
        self.hash = hash
        self.size = size

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlobRef):
            return NotImplemented
        return self.hash == other.hash and self.size == other.size

    def __hash__(self) -> int:
        return hash((self.hash, self.size))

    def __repr__(self) -> str:
        return f"BlobRef(hash={self.hash.hex()!r}, size={self.size})"


def _put_varint(out: bytearray, n: int) -> None:
    # LEB128, least significant group first (the varint of protobuf, lib0 and Yjs)
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _zigzag(n: int) -> int:
    return n * 2 if n >= 0 else -n * 2 - 1


def _unzigzag(n: int) -> int:
    return n >> 1 if not n & 1 else -((n + 1) >> 1)


def _put_value(out: bytearray, value: Any, depth: int) -> None:
    if depth > MAX_VALUE_DEPTH:
        raise CoreUsageError(f"value nested deeper than {MAX_VALUE_DEPTH}")
    if value is None:
        out.append(TAG_NONE)
    elif value is True:
        out.append(TAG_TRUE)
    elif value is False:
        out.append(TAG_FALSE)
    elif isinstance(value, int):
        if 0 <= value < 0x80:
            out.append(TAG_SMALL | value)
        elif 0 <= value <= MAX_U64:
            out.append(TAG_UINT)
            _put_varint(out, value)
        elif -(1 << 64) <= value < 0:
            out.append(TAG_NEGINT)
            _put_varint(out, -1 - value)
        else:
            raise CoreUsageError("integers must fit in -2^64..2^64-1")
    elif isinstance(value, float):
        out.append(TAG_FLOAT)
        out += struct.pack("<d", value)
    elif isinstance(value, str):
        raw = value.encode("utf-8", "surrogatepass")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise CoreUsageError("strings must be valid Unicode (no lone surrogates)") from exc
        out.append(TAG_STR)
        _put_varint(out, len(raw))
        out += raw
    elif isinstance(value, bytes):
        out.append(TAG_BYTES)
        _put_varint(out, len(value))
        out += value
    elif isinstance(value, (list, tuple)):
        out.append(TAG_LIST)
        _put_varint(out, len(value))
        for item in value:
            _put_value(out, item, depth + 1)
    elif isinstance(value, dict):
        out.append(TAG_MAP)
        _put_varint(out, len(value))
        for key, item in value.items():
            if not isinstance(key, str):
                raise CoreUsageError("map keys must be str")
            try:
                raw = key.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise CoreUsageError("map keys must be valid Unicode") from exc
            _put_varint(out, len(raw))
            out += raw
            _put_value(out, item, depth + 1)
    elif isinstance(value, BlobRef):
        out.append(TAG_BLOB)
        _put_varint(out, len(value.hash))
        out += value.hash
        _put_varint(out, value.size)
    else:
        raise CoreUsageError(f"cannot store a value of type {type(value).__name__}")


def encode_value(value: Any) -> bytes:
    """Encode a user value in the core's value format.

    Args:
        value: None, bool, int (-2^64..2^64-1), float, str, bytes, list/tuple, dict with str
            keys, or BlobRef, nested at most ``MAX_VALUE_DEPTH`` deep.

    Returns:
        The encoding (a tag byte, then the payload).

    Raises:
        CoreUsageError: the value has an unsupported type or is out of range.
    """
    out = bytearray()
    _put_value(out, value, 0)
    return bytes(out)


class _Reader:
    """A bounds-checked cursor over bytes; every failure is a DecodeError."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data)

    def byte(self) -> int:
        if self.pos >= self.end:
            raise DecodeError("truncated")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        n = 0
        shift = 0
        for _ in range(MAX_VARINT_BYTES):
            b = self.byte()
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                if n > MAX_U64:
                    raise DecodeError("varint exceeds 64 bits")
                return n
            shift += 7
        raise DecodeError("varint longer than 10 bytes")

    def count(self) -> int:
        """A count of following items, each at least one byte long."""
        n = self.varint()
        if n > self.end - self.pos:
            raise DecodeError("count exceeds the remaining bytes")
        return n

    def raw(self, n: int) -> bytes:
        if n > self.end - self.pos:
            raise DecodeError("truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return bytes(out)

    def text(self, n: int) -> str:
        raw = self.raw(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("invalid UTF-8") from exc

    def value(self, depth: int = 0) -> Any:
        if depth > MAX_VALUE_DEPTH:
            raise DecodeError("value nested too deep")
        tag = self.byte()
        if tag >= TAG_SMALL:
            return tag & 0x7F
        if tag == TAG_NONE:
            return None
        if tag == TAG_FALSE:
            return False
        if tag == TAG_TRUE:
            return True
        if tag == TAG_UINT:
            return self.varint()
        if tag == TAG_NEGINT:
            return -1 - self.varint()
        if tag == TAG_FLOAT:
            return struct.unpack("<d", self.raw(8))[0]
        if tag == TAG_STR:
            return self.text(self.varint())
        if tag == TAG_BYTES:
            return self.raw(self.varint())
        if tag == TAG_LIST:
            return [self.value(depth + 1) for _ in range(self.count())]
        if tag == TAG_MAP:
            out: dict[str, Any] = {}
            for _ in range(self.count()):
                key = self.text(self.varint())
                out[key] = self.value(depth + 1)
            return out
        if tag == TAG_BLOB:
            n = self.varint()
            if not 1 <= n <= MAX_BLOB_HASH:
                raise DecodeError("blob hash length out of range")
            digest = self.raw(n)
            return BlobRef(digest, self.varint())
        raise DecodeError(f"unknown value tag {tag}")


def decode_value(data: bytes) -> Any:
    """Decode one value encoded by :func:`encode_value`.

    Args:
        data: exactly one encoded value.

    Returns:
        The value (lists come back as lists, maps as dicts).

    Raises:
        DecodeError: the bytes are malformed or have trailing bytes.
    """
    r = _Reader(data)
    value = r.value()
    if r.pos != r.end:
        raise DecodeError("trailing bytes after value")
    return value


def _stored(value: Any) -> Any:
    """The form a value is stored in: scalars as given, containers as fresh copies."""
    if isinstance(value, (list, tuple, dict)):
        return decode_value(encode_value(value))
    return value


def _copy_out(value: Any) -> Any:
    """Containers are copied on the way out so callers cannot mutate the state."""
    if isinstance(value, (list, dict)):
        return decode_value(encode_value(value))
    return value


def _check_replica_id(replica_id: Any) -> bytes:
    if not isinstance(replica_id, bytes) or not MIN_REPLICA_ID <= len(replica_id) <= MAX_REPLICA_ID:
        raise CoreUsageError("a replica id is 8..32 bytes")
    return replica_id


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str):
        raise CoreUsageError(f"{what} must be a str")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CoreUsageError(f"{what} must be valid Unicode") from exc
    if len(raw) > MAX_NAME_BYTES:
        raise CoreUsageError(f"{what} longer than {MAX_NAME_BYTES} bytes")
    return name


def encode_version(version: Mapping[bytes, int]) -> bytes:
    """Encode a version vector (what a peer sends to ask for :meth:`Replica.encode_since`).

    Args:
        version: replica id -> greatest contiguous counter seen.

    Returns:
        ``varint n, n x (varint len, id, varint counter)``, sorted by replica id.

    Raises:
        CoreUsageError: a replica id or counter is out of range.
    """
    out = bytearray()
    items = sorted((_check_replica_id(k), v) for k, v in version.items() if v)
    _put_varint(out, len(items))
    for rid, ctr in items:
        if not isinstance(ctr, int) or not 0 <= ctr <= MAX_COUNTER:
            raise CoreUsageError("version counters must be ints in 0..2^63-1")
        _put_varint(out, len(rid))
        out += rid
        _put_varint(out, ctr)
    return bytes(out)


def decode_version(data: bytes) -> dict[bytes, int]:
    """Decode a version vector made by :func:`encode_version`.

    Raises:
        DecodeError: malformed bytes.
    """
    r = _Reader(data)
    out: dict[bytes, int] = {}
    for _ in range(r.count()):
        n = r.varint()
        if not MIN_REPLICA_ID <= n <= MAX_REPLICA_ID:
            raise DecodeError("replica id length out of range")
        rid = r.raw(n)
        ctr = r.varint()
        if ctr > MAX_COUNTER or rid in out:
            raise DecodeError("bad version entry")
        out[rid] = ctr
    if r.pos != r.end:
        raise DecodeError("trailing bytes after version")
    return out


# -- state ---------------------------------------------------------------------------------


class Entry:
    """One live entry of a dot store: who wrote it (dot), when (HLC), what (kind, value).

    ``rep`` is the replica's index in its Replica's table; ``next`` chains the concurrent
    entries of one field (a linked list: almost always of length one).
    """

    __slots__ = ("ctr", "hlc", "kind", "next", "nidx", "rep", "value")

    def __init__(self, kind: int, rep: int, ctr: int, hlc: int, value: Any) -> None:
        self.kind = kind
        self.rep = rep
        self.ctr = ctr
        self.hlc = hlc
        self.value = value  # COUNTER: (increments, decrements); TEXT: None
        self.next: Entry | None = None
        self.nidx = 0  # a local entry: its field name's number in its transaction's delta


class Doc:
    """A document: field name -> the head of its chain of live entries."""

    __slots__ = ("coll", "fields", "id")

    def __init__(self, coll: str, doc_id: str) -> None:
        self.coll = coll
        self.id = doc_id
        self.fields: dict[str, Entry] = {}


def _chain(head: Entry | None) -> Iterator[Entry]:
    while head is not None:
        yield head
        head = head.next


class _Decoded:
    """A fully decoded and validated delta, ready to merge."""

    __slots__ = ("ctx", "max_hlc", "reps", "runs")

    def __init__(self) -> None:
        self.reps: list[bytes] = []
        # (replica index in reps, [(lo, hi), ...])
        self.ctx: list[tuple[int, list[tuple[int, int]]]] = []
        # (replica index, start counter, hlc, ops); an op is (OP_ADVANCE, skip, hlc_step) or
        # (kind, coll, doc, field, payload, kills) with kills [(replica index, counter), ...]
        self.runs: list[tuple[int, int, int, list[tuple[Any, ...]]]] = []
        self.max_hlc = 0


_Text: Any = None


def _text_class() -> Any:
    """CORE-TEXT's Text class for this implementation (imported lazily: it is optional)."""
    global _Text
    if _Text is None:
        from p2pcloud._core._reference_text import Text

        _Text = Text
    return _Text


class _TxnWriter:
    """Encodes the ops of one local transaction as they happen."""

    __slots__ = ("buf", "coll", "doc", "names", "nops", "rep_map", "reps")

    def __init__(self, own_id: bytes) -> None:
        self.buf = bytearray()
        self.names = _NameTable()
        self.reps: list[bytes] = [own_id]
        self.rep_map: dict[int, int] = {0: 0}
        self.coll: str | None = None
        self.doc: str | None = None
        self.nops = 0


class _NameTable:
    """The names of one delta being written.

    ``varint (i << 1)`` refers to name number ``i`` of the delta; ``varint (p << 1 | 1),
    varint n, n bytes`` introduces a new name (the next number) made of the first ``p`` bytes
    of the previous new name and ``n`` more bytes. Which names are referred to rather than
    introduced again is the writer's choice (the reader accepts both); these rules fix it:

    * :meth:`put` (collection and document names, and every name of a since-delta or
      snapshot): a name already in the table is referred to;
    * :meth:`put_field` (field names of a transaction): referred to if the field's current
      entry was written by this transaction (its number is on that entry) or the name is
      one of the last ``FIELD_NAME_CACHE`` field names introduced; else introduced. A bulk
      write of new keys then costs no table lookup per key, and documents sharing a few
      field names still refer to them.
    """

    __slots__ = ("count", "index", "last", "recent")

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.count = 0
        self.last = b""
        self.recent: list[tuple[str, int]] = []

    def put(self, buf: bytearray, name: str) -> int:
        idx = self.index.get(name)
        if idx is not None:
            _put_varint(buf, idx << 1)
            return idx
        idx = self.new(buf, name)
        self.index[name] = idx
        return idx

    def new(self, buf: bytearray, name: str) -> int:
        raw = name.encode("utf-8")
        prev = self.last
        p = 0
        limit = min(len(raw), len(prev))
        while p < limit and raw[p] == prev[p]:
            p += 1
        _put_varint(buf, (p << 1) | 1)
        _put_varint(buf, len(raw) - p)
        buf += raw[p:]
        self.last = raw
        self.count += 1
        return self.count - 1

    def put_field(self, buf: bytearray, name: str, known: int | None) -> int:
        if known is None:
            for n, i in self.recent:
                if n == name:
                    known = i
                    break
        if known is not None:
            _put_varint(buf, known << 1)
            return known
        idx = self.new(buf, name)
        self.recent.insert(0, (name, idx))
        del self.recent[FIELD_NAME_CACHE:]
        return idx


class Replica:
    """One replica of a sub-cloud: collections, logs, causal context, clock.

    Local writes happen inside a transaction: :meth:`begin` (ticks the clock once), any
    number of writes, :meth:`commit` (returns the delta to send to the other replicas).
    Remote deltas, since-deltas and snapshots are merged with :meth:`apply`.
    """

    def __init__(self, replica_id: bytes) -> None:
        """Create an empty replica.

        Args:
            replica_id: this replica's id, 8..32 opaque bytes.

        Raises:
            CoreUsageError: the id is out of range.
        """
        self.replica_id = _check_replica_id(replica_id)
        self._reps: list[bytes] = [replica_id]  # index 0 is this replica
        self._rep_index: dict[bytes, int] = {replica_id: 0}
        self._ctx = CausalContext()
        self._colls: dict[str, dict[str, Doc]] = {}
        self._logs: dict[str, list[Entry]] = {}
        self._texts: dict[tuple[str, str, str], Any] = {}
        self.clock = HybridClock()
        self._next = 1  # next counter for a local entry
        self._txn: _TxnWriter | None = None
        self._txn_hlc = 0
        self._txn_start = 0

    # -- transactions ------------------------------------------------------------------

    def begin(self, now_ms: int) -> None:
        """Start a local transaction; all its writes share one HLC reading.

        Args:
            now_ms: the physical time in milliseconds.

        Raises:
            CoreUsageError: a transaction is already open, or ``now_ms`` is out of range.
        """
        if self._txn is not None:
            raise CoreUsageError("a transaction is already open")
        self._txn_hlc = self.clock.tick(now_ms)
        self._txn = _TxnWriter(self.replica_id)
        self._txn_start = self._next

    def commit(self) -> bytes:
        """End the transaction and return its delta (``b""`` if it wrote nothing).

        Raises:
            CoreUsageError: no transaction is open.
        """
        t = self._txn
        if t is None:
            raise CoreUsageError("no transaction is open")
        self._txn = None
        if t.nops == 0:
            return b""
        out = bytearray((FORMAT_MAGIC, FORMAT_VERSION))
        _put_varint(out, len(t.reps))
        for rid in t.reps:
            _put_varint(out, len(rid))
            out += rid
        out.append(0)  # no context ranges: a transaction's context is its dots and kills
        out.append(1)  # one run
        out.append(0)  # this replica is entry 0 of the table
        _put_varint(out, self._txn_start)
        _put_varint(out, self._txn_hlc)
        _put_varint(out, t.nops)
        out += t.buf
        return bytes(out)

    @property
    def in_transaction(self) -> bool:
        """Whether a local transaction is open."""
        return self._txn is not None

    def _writer(self) -> _TxnWriter:
        if self._txn is None:
            raise CoreUsageError("writes need an open transaction: call begin(now_ms) first")
        return self._txn

    def _op_header(self, t: _TxnWriter, op: int, coll: str, doc: str | None, kills: bool) -> None:
        # the header byte, then the collection and document references if they changed
        h = op | (FLAG_KILLS if kills else 0)
        new_coll = coll != t.coll
        new_doc = doc is not None and (new_coll or doc != t.doc)
        if new_coll:
            h |= FLAG_NEW_COLL
        if new_doc:
            h |= FLAG_NEW_DOC
        t.buf.append(h)
        if new_coll:
            t.names.put(t.buf, coll)
            t.coll = coll
            t.doc = None
        if new_doc:
            assert doc is not None
            t.names.put(t.buf, doc)
            t.doc = doc
        t.nops += 1

    def _put_field(self, t: _TxnWriter, field: str, head: Entry | None) -> int:
        """Write a field name; ``head`` is the field's head entry before this op."""
        known = None
        if head is not None and head.rep == 0 and head.ctr >= self._txn_start:
            known = head.nidx  # written by this transaction: its name is in the table
        return t.names.put_field(t.buf, field, known)

    def _put_kills(self, t: _TxnWriter, kills: list[Entry]) -> None:
        _put_varint(t.buf, len(kills))
        for e in kills:
            idx = t.rep_map.get(e.rep)
            if idx is None:
                idx = len(t.reps)
                t.rep_map[e.rep] = idx
                t.reps.append(self._reps[e.rep])
            _put_varint(t.buf, idx)
            _put_varint(t.buf, e.ctr)

    def _new_dot(self) -> int:
        ctr = self._next
        if ctr > MAX_COUNTER:
            raise CoreUsageError("dot counter exhausted")
        self._next = ctr + 1
        self._ctx.add(0, ctr)
        return ctr

    def _doc_for_write(self, coll: str, doc: str) -> Doc:
        docs = self._colls.get(coll)
        if docs is None:
            docs = self._colls[coll] = {}
        d = docs.get(doc)
        if d is None:
            d = docs[doc] = Doc(coll, doc)
        return d

    def _write(self, op: int, coll: str, doc: str, field: str, value: Any, payload: bytes,
               kill_filter: Any) -> Entry:
        """Shared body of the entry-creating field writes."""
        t = self._writer()
        _check_name(coll, "collection name")
        _check_name(doc, "document id")
        _check_name(field, "field name")
        d = self._doc_for_write(coll, doc)
        head = d.fields.get(field)
        kills = [e for e in _chain(head) if kill_filter(e)]
        ctr = self._new_dot()
        entry = Entry(op, 0, ctr, self._txn_hlc, value)
        keep = [e for e in _chain(head) if not kill_filter(e)]
        # the new entry goes first; the survivors keep their order behind it
        entry.next = None
        prev = entry
        for e in keep:
            prev.next = e
            prev = e
        prev.next = None
        d.fields[field] = entry
        self._op_header(t, op, coll, doc, bool(kills))
        entry.nidx = self._put_field(t, field, head)
        t.buf += payload
        if kills:
            self._put_kills(t, kills)
        return entry

    # -- local writes ------------------------------------------------------------------

    def set(self, coll: str, doc: str, field: str, value: Any) -> None:
        """Write a last-writer-wins value (replaces whatever this replica saw there).

        Args:
            coll: collection name. doc: document id. field: field name.
            value: see :func:`encode_value`; a :class:`BlobRef` makes a blob reference.

        Raises:
            CoreUsageError: no open transaction, a bad name or an unsupported value.
        """
        self._writer()
        enc = encode_value(value)
        self._write(OP_LWW, coll, doc, field, _stored(value), enc, _kill_all)

    def set_many(self, coll: str, doc: str, items: Mapping[str, Any] | Iterable[tuple[str, Any]]
                 ) -> None:
        """Write many last-writer-wins fields of one document (the bulk path).

        Args:
            coll: collection name. doc: document id.
            items: a mapping or an iterable of ``(field, value)`` pairs, written in order.

        Raises:
            CoreUsageError: as :meth:`set`; the pairs before the bad one are written.
        """
        pairs = items.items() if isinstance(items, Mapping) else items
        for field, value in pairs:
            self.set(coll, doc, field, value)

    def set_mv(self, coll: str, doc: str, field: str, value: Any) -> None:
        """Write a multi-value register: concurrent writes are all kept until resolved.

        Raises:
            CoreUsageError: as :meth:`set`.
        """
        self._writer()
        enc = encode_value(value)
        self._write(OP_MV, coll, doc, field, _stored(value), enc, _kill_all)

    def _check_kind(self, coll: str, doc: str, field: str, kind: int) -> None:
        head = self._field_head(coll, doc, field)
        if head is not None and _winner(self._reps, head).kind != kind:
            raise CoreUsageError(f"field {field!r} holds another type")

    def increment(self, coll: str, doc: str, field: str, amount: int = 1) -> None:
        """Add ``amount`` (negative to decrement) to a counter field.

        Raises:
            CoreUsageError: the field holds a non-counter value, or bad arguments.
        """
        self._writer()
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise CoreUsageError("counter amounts are ints")
        self._check_kind(coll, doc, field, OP_COUNTER)
        head = self._field_head(coll, doc, field)
        p = n = 0
        for e in _chain(head):
            if e.kind == OP_COUNTER and e.rep == 0:
                p += e.value[0]
                n += e.value[1]
        if amount >= 0:
            p += amount
        else:
            n -= amount
        if p > MAX_U64 or n > MAX_U64:
            raise CoreUsageError("counter overflow")
        payload = bytearray()
        _put_varint(payload, p)
        _put_varint(payload, n)
        self._write(OP_COUNTER, coll, doc, field, (p, n), bytes(payload), _kill_own_counter)

    def set_add(self, coll: str, doc: str, field: str, element: Any) -> None:
        """Add an element to an add-wins set field.

        Raises:
            CoreUsageError: the field holds another type, or the element is not a scalar.
        """
        self._writer()
        enc = _element(element)
        self._check_kind(coll, doc, field, OP_SET_ADD)
        self._write(OP_SET_ADD, coll, doc, field, element, enc,
                    lambda e: e.kind == OP_SET_ADD and encode_value(e.value) == enc)

    def set_discard(self, coll: str, doc: str, field: str, element: Any) -> None:
        """Remove an element from an add-wins set (a concurrent add wins).

        Raises:
            CoreUsageError: no open transaction or the element is not a scalar.
        """
        t = self._writer()
        enc = _element(element)
        head = self._field_head(coll, doc, field)
        kills = [e for e in _chain(head)
                 if e.kind == OP_SET_ADD and encode_value(e.value) == enc]
        if not kills:
            return
        self._kill_in_field(coll, doc, field, kills)
        self._new_dot()
        self._op_header(t, OP_SET_REMOVE, coll, doc, True)
        self._put_field(t, field, head)
        t.buf += enc
        self._put_kills(t, kills)

    def remove_field(self, coll: str, doc: str, field: str) -> None:
        """Remove a field (a concurrent write to it survives).

        Raises:
            CoreUsageError: no open transaction.
        """
        t = self._writer()
        head = self._field_head(coll, doc, field)
        kills = list(_chain(head))
        if not kills:
            return
        self._kill_in_field(coll, doc, field, kills)
        self._new_dot()
        self._op_header(t, OP_REMOVE_FIELD, coll, doc, True)
        self._put_field(t, field, head)
        self._put_kills(t, kills)

    def remove(self, coll: str, doc: str) -> None:
        """Remove a document (fields written concurrently survive).

        Raises:
            CoreUsageError: no open transaction.
        """
        t = self._writer()
        d = self._colls.get(coll, {}).get(doc)
        if d is None:
            return
        kills = [e for head in d.fields.values() for e in _chain(head)]
        del self._colls[coll][doc]
        if not self._colls[coll]:
            del self._colls[coll]
        self._new_dot()
        self._op_header(t, OP_REMOVE_DOC, coll, doc, True)
        self._put_kills(t, kills)

    def append(self, log: str, value: Any) -> None:
        """Append a record to an append-only log (readings, events).

        Raises:
            CoreUsageError: no open transaction, a bad name or an unsupported value.
        """
        t = self._writer()
        _check_name(log, "log name")
        enc = encode_value(value)
        ctr = self._new_dot()
        self._logs.setdefault(log, []).append(Entry(OP_APPEND, 0, ctr, self._txn_hlc,
                                                    _stored(value)))
        self._op_header(t, OP_APPEND, log, None, False)
        t.buf += enc

    def text_insert(self, coll: str, doc: str, field: str, pos: int, text: str) -> None:
        """Insert ``text`` at ``pos`` in a text field.

        Raises:
            CoreUsageError: the field holds another type or bad arguments.
        """
        self._text_edit(coll, doc, field, lambda t: t.insert(pos, text))

    def text_delete(self, coll: str, doc: str, field: str, pos: int, length: int) -> None:
        """Delete ``length`` characters at ``pos`` in a text field.

        Raises:
            CoreUsageError: the field holds another type or bad arguments.
        """
        self._text_edit(coll, doc, field, lambda t: t.delete(pos, length))

    def _text_edit(self, coll: str, doc: str, field: str, edit: Any) -> None:
        self._writer()
        _check_name(coll, "collection name")
        _check_name(doc, "document id")
        _check_name(field, "field name")
        self._check_kind(coll, doc, field, OP_TEXT)
        key = (coll, doc, field)
        text = self._texts.get(key)
        if text is None:
            text = _text_class()(self.replica_id)
        try:
            edit(text)
        except (IndexError, ValueError, TypeError) as exc:
            raise CoreUsageError(f"bad text edit: {exc}") from exc
        self._texts[key] = text
        delta = text.take_pending()
        payload = bytearray()
        _put_varint(payload, len(delta))
        payload += delta
        self._write(OP_TEXT, coll, doc, field, None, bytes(payload), _kill_own_text)

    def _kill_in_field(self, coll: str, doc: str, field: str, kills: list[Entry]) -> None:
        d = self._colls[coll][doc]
        dead = {id(e) for e in kills}
        keep = [e for e in _chain(d.fields[field]) if id(e) not in dead]
        _relink(d, field, keep)
        if not d.fields:
            del self._colls[coll][doc]
            if not self._colls[coll]:
                del self._colls[coll]

    # -- reads -------------------------------------------------------------------------

    def _field_head(self, coll: str, doc: str, field: str) -> Entry | None:
        d = self._colls.get(coll, {}).get(doc)
        return None if d is None else d.fields.get(field)

    def _read(self, coll: str, doc: str, field: str, head: Entry) -> Any:
        w = _winner(self._reps, head)
        if w.kind == OP_LWW:
            return _copy_out(w.value)
        if w.kind == OP_MV:
            same = sorted((e for e in _chain(head) if e.kind == OP_MV),
                          key=lambda e: (e.hlc, self._reps[e.rep], e.ctr))
            return tuple(_copy_out(e.value) for e in same)
        if w.kind == OP_COUNTER:
            return sum(e.value[0] - e.value[1] for e in _chain(head) if e.kind == OP_COUNTER)
        if w.kind == OP_SET_ADD:
            return frozenset(e.value for e in _chain(head) if e.kind == OP_SET_ADD)
        text = self._texts.get((coll, doc, field))
        return "" if text is None else text.value()

    def get(self, coll: str, doc: str, field: str, default: Any = None) -> Any:
        """Read a field.

        Returns:
            The winning value for a last-writer-wins field, a tuple of the concurrent values
            (oldest first) for a multi-value register, an int for a counter, a frozenset for
            a set, a str for text; ``default`` if the field does not exist.
        """
        head = self._field_head(coll, doc, field)
        return default if head is None else self._read(coll, doc, field, head)

    def conflicts(self, coll: str, doc: str, field: str) -> list[Any]:
        """Every live value of a field, oldest first (HLC, replica id, counter).

        A last-writer-wins field shows the concurrent writes its winner hides here.
        """
        head = self._field_head(coll, doc, field)
        es = sorted(_chain(head), key=lambda e: (e.hlc, self._reps[e.rep], e.ctr))
        return [_copy_out(e.value) for e in es]

    def document(self, coll: str, doc: str) -> dict[str, Any] | None:
        """Read a whole document as ``{field: value}`` (fields sorted), or None if absent."""
        d = self._colls.get(coll, {}).get(doc)
        if d is None:
            return None
        return {f: self._read(coll, doc, f, d.fields[f]) for f in sorted(d.fields)}

    def documents(self, coll: str) -> list[str]:
        """The ids of the documents of a collection, sorted."""
        return sorted(self._colls.get(coll, {}))

    def collections(self) -> list[str]:
        """The names of the non-empty collections, sorted."""
        return sorted(self._colls)

    def logs(self) -> list[str]:
        """The names of the logs, sorted."""
        return sorted(self._logs)

    def log(self, name: str) -> list[tuple[int, bytes, Any]]:
        """The records of a log as ``(hlc, replica id, value)``, oldest first.

        Records are ordered by (HLC, replica id, counter).
        """
        es = sorted(self._logs.get(name, ()), key=lambda e: (e.hlc, self._reps[e.rep], e.ctr))
        return [(e.hlc, self._reps[e.rep], _copy_out(e.value)) for e in es]

    def version(self) -> dict[bytes, int]:
        """The version vector: replica id -> greatest counter seen with no gap below it."""
        return {self._reps[k]: v for k, v in self._ctx.vv.items() if v}

    def context(self) -> CausalContext:
        """A copy of the causal context, keyed by replica id."""
        out = CausalContext()
        for k in self._ctx.keyset():
            for lo, hi in self._ctx.ranges(k):
                out.add_range(self._reps[k], lo, hi)
        return out

    # -- decoding ----------------------------------------------------------------------

    def _decode(self, data: bytes, now_ms: int | None) -> _Decoded:
        r = _Reader(data)
        d = _Decoded()
        if r.byte() != FORMAT_MAGIC:
            raise DecodeError("not a p2pcloud delta")
        if r.byte() != FORMAT_VERSION:
            raise DecodeError("unknown delta version")
        seen: builtins.set[bytes] = builtins.set()
        for _ in range(r.count()):
            n = r.varint()
            if not MIN_REPLICA_ID <= n <= MAX_REPLICA_ID:
                raise DecodeError("replica id length out of range")
            rid = r.raw(n)
            if rid in seen:
                raise DecodeError("duplicate replica id")
            seen.add(rid)
            d.reps.append(rid)
        nrep = len(d.reps)
        for _ in range(r.count()):
            rep = r.varint()
            if rep >= nrep:
                raise DecodeError("replica index out of range")
            ranges = []
            hi = 0
            for _ in range(r.count()):
                lo = hi + 1 + r.varint()
                hi = lo + r.varint()
                if hi > MAX_COUNTER:
                    raise DecodeError("counter out of range")
                ranges.append((lo, hi))
            d.ctx.append((rep, ranges))
        names: list[str] = []
        last = b""
        for _ in range(r.count()):
            rep = r.varint()
            if rep >= nrep:
                raise DecodeError("replica index out of range")
            start = r.varint()
            hlc = r.varint()
            if start < 1 or start > MAX_COUNTER:
                raise DecodeError("run start out of range")
            ctr = start
            run_hlc = hlc
            ops: list[tuple[Any, ...]] = []
            coll: str | None = None
            doc: str | None = None
            d.max_hlc = max(d.max_hlc, hlc)
            for _ in range(r.count()):
                h = r.byte()
                kind = h & 0x0F
                if kind == OP_ADVANCE:
                    if h != OP_ADVANCE:
                        raise DecodeError("flags on an advance op")
                    skip = r.varint()
                    step = _unzigzag(r.varint())
                    ctr += skip
                    hlc += step
                    if ctr > MAX_COUNTER or not 0 <= hlc <= MAX_HLC:
                        raise DecodeError("advance out of range")
                    d.max_hlc = max(d.max_hlc, hlc)
                    ops.append((OP_ADVANCE, skip, step))
                    continue
                if not OP_LWW <= kind <= OP_SET_REMOVE:
                    raise DecodeError(f"bad op header {h:#x}")
                if h & FLAG_TICK:
                    hlc += 1
                    if hlc > MAX_HLC:
                        raise DecodeError("HLC out of range")
                    d.max_hlc = max(d.max_hlc, hlc)
                    ops.append((OP_ADVANCE, 0, 1))
                if h & FLAG_NEW_COLL:
                    coll, last = _read_name(r, names, last)
                    doc = None
                if h & FLAG_NEW_DOC:
                    if kind == OP_APPEND:
                        raise DecodeError("a log append has no document")
                    doc, last = _read_name(r, names, last)
                if coll is None or (doc is None and kind != OP_APPEND):
                    raise DecodeError("op without a collection or document")
                field: str | None = None
                if kind not in (OP_APPEND, OP_REMOVE_DOC):
                    field, last = _read_name(r, names, last)
                payload: Any = None
                if kind in (OP_LWW, OP_MV, OP_APPEND):
                    payload = r.value()
                elif kind in (OP_SET_ADD, OP_SET_REMOVE):
                    payload = r.value()
                    if isinstance(payload, (list, dict)):
                        raise DecodeError("set elements are scalars")
                elif kind == OP_COUNTER:
                    payload = (r.varint(), r.varint())
                elif kind == OP_TEXT:
                    payload = r.raw(r.varint())
                    _validate_text(payload)
                kills: list[tuple[int, int]] = []
                if h & FLAG_KILLS:
                    if kind == OP_APPEND:
                        raise DecodeError("a log append kills nothing")
                    for _ in range(r.count()):
                        krep = r.varint()
                        kctr = r.varint()
                        if krep >= nrep or not 1 <= kctr <= MAX_COUNTER:
                            raise DecodeError("bad kill dot")
                        kills.append((krep, kctr))
                if ctr > MAX_COUNTER:
                    raise DecodeError("counter out of range")
                ctr += 1
                ops.append((kind, coll, doc, field, payload, kills))
            d.runs.append((rep, start, run_hlc, ops))
        if r.pos != r.end:
            raise DecodeError("trailing bytes after delta")
        if now_ms is not None:  # None: a trusted local snapshot (load)
            self.clock.check(d.max_hlc, now_ms)
        return d

    # -- merging -----------------------------------------------------------------------

    def apply(self, deltas: Iterable[bytes], now_ms: int) -> list[Change]:
        """Merge remote deltas, since-deltas or snapshots, in order.

        Every delta is decoded and checked first; if any is malformed or too far ahead,
        nothing changes. Any order, duplication or loss followed by re-delivery converges.

        Args:
            deltas: encoded deltas (``b""`` stands for an empty delta and is skipped).
            now_ms: the physical time in milliseconds (for the clock-skew check).

        Returns:
            The ``(collection, document, field)`` places whose live entries changed, each
            once, in the order first touched; ``(log, None, None)`` for log appends.

        Raises:
            DecodeError: a delta is malformed (``.delta_index`` says which).
            ClockSkewError: a delta's clock is too far ahead (``.delta_index`` says which).
            CoreUsageError: a transaction is open or ``now_ms`` is out of range.
        """
        _check_now(now_ms)
        return self._apply(deltas, now_ms)

    def _apply(self, deltas: Iterable[bytes], now_ms: int | None) -> list[Change]:
        if self._txn is not None:
            raise CoreUsageError("commit the open transaction before applying deltas")
        decoded = []
        for i, data in enumerate(deltas):
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise CoreUsageError("deltas are bytes")
            if not data:
                continue
            try:
                decoded.append(self._decode(bytes(data), now_ms))
            except (DecodeError, ClockSkewError) as exc:
                exc.delta_index = i  # type: ignore[union-attr]
                raise
        changes: dict[Change, None] = {}
        for d in decoded:
            self._merge(d, changes)
            if d.max_hlc > self.clock.last:
                self.clock.last = d.max_hlc
        self._next = max(self._next, self._ctx.max(0) + 1)
        return list(changes)

    @classmethod
    def load(cls, snapshot: bytes, replica_id: bytes, now_ms: int | None) -> Replica:
        """Create a replica from a snapshot (:meth:`encode_snapshot`) in one call.

        Args:
            snapshot: the snapshot bytes.
            replica_id: the new replica's id (the same as the snapshot's writer to resume it).
            now_ms: the physical time for the clock-skew check of a snapshot from a peer;
                None for a snapshot this node stored itself, which loads even after the
                local clock went back.

        Raises:
            DecodeError, ClockSkewError, CoreUsageError: as :meth:`apply`.
        """
        out = cls(replica_id)
        if now_ms is not None:
            _check_now(now_ms)
        out._apply([snapshot], now_ms)
        return out

    def _intern(self, rid: bytes) -> int:
        idx = self._rep_index.get(rid)
        if idx is None:
            idx = len(self._reps)
            self._reps.append(rid)
            self._rep_index[rid] = idx
        return idx

    def _merge(self, d: _Decoded, changes: dict[Change, None]) -> None:
        rmap = [self._intern(rid) for rid in d.reps]
        # 1. context ranges: drop local entries the sender has seen but does not hold
        hit: builtins.set[int] = builtins.set()
        kctx = CausalContext()
        for rep, ranges in d.ctx:
            for lo, hi in ranges:
                kctx.add_range(rmap[rep], lo, hi)
                if self._ctx.overlaps(rmap[rep], lo, hi):
                    hit.add(rmap[rep])
        if hit:
            rundots: builtins.set[tuple[int, int]] = builtins.set()
            for rep, start, _hlc, ops in d.runs:
                ctr = start
                for op in ops:
                    if op[0] == OP_ADVANCE:
                        ctr += op[1]
                        continue
                    if op[0] in _ENTRY_OPS:
                        rundots.add((rmap[rep], ctr))
                    ctr += 1
            self._kill_covered(kctx, hit, rundots, changes)
        # 2. runs, op by op
        for rep, start, hlc, ops in d.runs:
            r = rmap[rep]
            ctr = start
            pieces: list[tuple[int, int]] = []
            for op in ops:
                kind = op[0]
                if kind == OP_ADVANCE:
                    ctr += op[1]
                    hlc += op[2]
                    continue
                _, coll, doc, field, payload, kills = op
                dot = ctr  # every op has a dot; kill-only ops' dots hold no entry
                ctr += 1
                if pieces and pieces[-1][1] == dot - 1:
                    pieces[-1] = (pieces[-1][0], dot)
                else:
                    pieces.append((dot, dot))
                if kills:
                    self._apply_kills(coll, doc, field, [(rmap[k], c) for k, c in kills],
                                      changes)
                if kind not in _ENTRY_OPS:
                    continue
                fresh = not self._ctx.contains(r, dot)
                if kind == OP_TEXT:
                    key = (coll, doc, field)
                    text = self._texts.get(key)
                    if text is None:
                        text = self._texts[key] = _text_class()(self.replica_id)
                    if payload and _text_apply(text, payload):
                        changes[key] = None
                if not fresh:
                    continue
                if kind == OP_APPEND:
                    self._logs.setdefault(coll, []).append(Entry(kind, r, dot, hlc, payload))
                    changes[(coll, None, None)] = None
                    continue
                value = payload
                d_ = self._doc_for_write(coll, doc)
                e = Entry(kind, r, dot, hlc, value)
                e.next = d_.fields.get(field)
                d_.fields[field] = e
                changes[(coll, doc, field)] = None
            for lo, hi in pieces:
                self._ctx.add_range(r, lo, hi)
        # 3. the context ranges join the local context
        for rep, ranges in d.ctx:
            for lo, hi in ranges:
                self._ctx.add_range(rmap[rep], lo, hi)

    def _apply_kills(self, coll: str, doc: str | None, field: str | None,
                     dots: list[tuple[int, int]], changes: dict[Change, None]) -> None:
        """Kill the entries with these dots in one field (or, for ``field=None``, the doc)."""
        for rep, ctr in dots:
            self._ctx.add(rep, ctr)
        d = self._colls.get(coll, {}).get(doc) if doc is not None else None
        if d is None:
            return
        dead = set(dots)
        for f in [field] if field is not None else list(d.fields):
            head = d.fields.get(f)
            if head is None:
                continue
            es = list(_chain(head))
            keep = [e for e in es if (e.rep, e.ctr) not in dead]
            if len(keep) != len(es):
                _relink(d, f, keep)
                changes[(coll, doc, f)] = None
        if not d.fields:
            del self._colls[coll][d.id]
            if not self._colls[coll]:
                del self._colls[coll]

    def _kill_covered(self, kctx: CausalContext, hit: builtins.set[int],
                      rundots: builtins.set[tuple[int, int]],
                      changes: dict[Change, None]) -> None:
        for coll in list(self._colls):
            docs = self._colls[coll]
            for doc_id in list(docs):
                d = docs[doc_id]
                for f in list(d.fields):
                    es = list(_chain(d.fields[f]))
                    keep = [e for e in es if not (e.rep in hit and kctx.contains(e.rep, e.ctr)
                                                  and (e.rep, e.ctr) not in rundots)]
                    if len(keep) != len(es):
                        _relink(d, f, keep)
                        changes[(coll, doc_id, f)] = None
                if not d.fields:
                    del docs[doc_id]
            if not docs:
                del self._colls[coll]
        for name in list(self._logs):
            es = self._logs[name]
            keep = [e for e in es if not (e.rep in hit and kctx.contains(e.rep, e.ctr)
                                          and (e.rep, e.ctr) not in rundots)]
            if len(keep) != len(es):
                changes[(name, None, None)] = None
                if keep:
                    self._logs[name] = keep
                else:
                    del self._logs[name]

    # -- encoding ----------------------------------------------------------------------

    def encode_snapshot(self) -> bytes:
        """Encode the whole state: the delta an empty replica lacks.

        The encoding is canonical: two replicas with the same state give the same bytes.
        """
        return self.encode_since({})

    def encode_since(self, version: Mapping[bytes, int]) -> bytes:
        """Extract the delta that the holder of ``version`` lacks (for sync).

        Args:
            version: the peer's version vector (replica id -> counter), e.g. its
                :meth:`version`.

        Returns:
            A delta holding every live entry whose dot the version does not cover, plus the
            dots this replica has seen but holds no entry for (so the peer drops them).
        """
        if self._txn is not None:
            raise CoreUsageError("commit the open transaction before encoding")
        vv = {self._rep_index[k]: v for k, v in version.items() if k in self._rep_index}
        # every live entry, with where it lives
        live: dict[int, list[tuple[int, Entry, str, str | None, str | None]]] = {}
        for coll, docs in self._colls.items():
            for doc_id, d in docs.items():
                for f, head in d.fields.items():
                    for e in _chain(head):
                        live.setdefault(e.rep, []).append((e.ctr, e, coll, doc_id, f))
        for name, es in self._logs.items():
            for e in es:
                live.setdefault(e.rep, []).append((e.ctr, e, name, None, None))
        reps = sorted(self._ctx.keyset() | set(live), key=lambda k: self._reps[k])
        # dead dots: seen but not held, as ranges
        dead: dict[int, list[tuple[int, int]]] = {}
        for k in reps:
            held = sorted(c for c, *_ in live.get(k, ()))
            out: list[tuple[int, int]] = []
            j = 0
            for lo, hi in self._ctx.ranges(k):
                cur = lo
                while j < len(held) and held[j] < lo:
                    j += 1
                while j < len(held) and held[j] <= hi:
                    if held[j] > cur:
                        out.append((cur, held[j] - 1))
                    cur = held[j] + 1
                    j += 1
                if cur <= hi:
                    out.append((cur, hi))
            if out:
                dead[k] = out
        # Live text entries always go, with the whole text: a text's content merges the ops
        # of every edit ever delivered, including edits whose entries were since killed
        # (overwritten, removed), and a peer may have seen those dots without their ops.
        send = {k: sorted((x for x in live.get(k, ())
                           if x[0] > vv.get(k, 0) or x[1].kind == OP_TEXT),
                          key=lambda x: x[0]) for k in reps}
        send = {k: v for k, v in send.items() if v}
        used = [k for k in reps if k in dead or k in send]
        table = {k: i for i, k in enumerate(used)}
        out_b = bytearray((FORMAT_MAGIC, FORMAT_VERSION))
        _put_varint(out_b, len(used))
        for k in used:
            _put_varint(out_b, len(self._reps[k]))
            out_b += self._reps[k]
        _put_varint(out_b, len(dead))
        for k in used:
            if k not in dead:
                continue
            _put_varint(out_b, table[k])
            _put_varint(out_b, len(dead[k]))
            prev = 0
            for lo, hi in dead[k]:
                _put_varint(out_b, lo - prev - 1)
                _put_varint(out_b, hi - lo)
                prev = hi
        _put_varint(out_b, len(send))
        names = _NameTable()
        texts_sent: builtins.set[tuple[str, str, str]] = builtins.set()
        for k in used:
            if k not in send:
                continue
            items = send[k]
            first = items[0][1]
            _put_varint(out_b, table[k])
            _put_varint(out_b, first.ctr)
            _put_varint(out_b, first.hlc)
            ops = bytearray()
            nops = 0
            ctr = first.ctr
            hlc = first.hlc
            cur_coll: str | None = None
            cur_doc: str | None = None
            for _c, e, where, doc_name, fname in items:
                h = e.kind
                if e.ctr == ctr and e.hlc == hlc + 1:
                    h |= FLAG_TICK  # the next transaction of a burst: no ADVANCE op needed
                    hlc += 1
                elif e.ctr != ctr or e.hlc != hlc:
                    ops.append(OP_ADVANCE)
                    _put_varint(ops, e.ctr - ctr)
                    _put_varint(ops, _zigzag(e.hlc - hlc))
                    nops += 1
                    ctr = e.ctr
                    hlc = e.hlc
                new_coll = where != cur_coll
                new_doc = doc_name is not None and (new_coll or doc_name != cur_doc)
                if new_coll:
                    h |= FLAG_NEW_COLL
                if new_doc:
                    h |= FLAG_NEW_DOC
                ops.append(h)
                if new_coll:
                    names.put(ops, where)
                    cur_coll = where
                    cur_doc = None
                if new_doc:
                    assert doc_name is not None
                    names.put(ops, doc_name)
                    cur_doc = doc_name
                if fname is not None:
                    names.put(ops, fname)
                if e.kind == OP_COUNTER:
                    _put_varint(ops, e.value[0])
                    _put_varint(ops, e.value[1])
                elif e.kind == OP_TEXT:
                    assert doc_name is not None and fname is not None
                    key = (where, doc_name, fname)
                    text = self._texts.get(key)
                    state = b""
                    if text is not None and key not in texts_sent:
                        state = text.encode_since({})
                        texts_sent.add(key)
                    _put_varint(ops, len(state))
                    ops += state
                else:
                    _put_value(ops, e.value, 0)
                nops += 1
                ctr += 1
            _put_varint(out_b, nops)
            out_b += ops
        return bytes(out_b)


def _read_name(r: _Reader, names: list[str], last: bytes) -> tuple[str, bytes]:
    n = r.varint()
    if not n & 1:
        i = n >> 1
        if i >= len(names):
            raise DecodeError("name reference out of range")
        return names[i], last
    p = n >> 1
    if p > len(last):
        raise DecodeError("name prefix longer than the previous name")
    k = r.varint()
    if p + k > MAX_NAME_BYTES:
        raise DecodeError("name too long")
    raw = last[:p] + r.raw(k)
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError("invalid UTF-8 in a name") from exc
    names.append(name)
    return name, raw


def _text_apply(text: Any, payload: bytes) -> bool:
    """Apply a validated text delta; a refusal that depends on the text's state is dropped.

    The payload decoded during validation, so the only refusal left is the text's bound on
    ops held for missing predecessors (MAX_HELD_RUNS): the merge cannot fail half-way, so
    those ops are dropped here, and the next since-delta, which carries the whole text,
    brings them back.
    """
    try:
        return bool(text.apply(payload))
    except DecodeError:
        return False


def _validate_text(payload: bytes) -> None:
    """A text delta must decode before anything changes (CORE-TEXT's decode-only check)."""
    if payload:
        from p2pcloud._core._reference_text import validate_delta

        validate_delta(payload)


def _element(element: Any) -> bytes:
    if isinstance(element, (list, tuple, dict)):
        raise CoreUsageError("set elements are scalars (None, bool, int, float, str, bytes...)")
    return encode_value(element)


def _winner(reps: list[bytes], head: Entry) -> Entry:
    best = head
    e = head.next
    while e is not None:
        if (e.hlc, reps[e.rep], e.ctr) > (best.hlc, reps[best.rep], best.ctr):
            best = e
        e = e.next
    return best


def _relink(d: Doc, field: str, keep: list[Entry]) -> None:
    if not keep:
        del d.fields[field]
        return
    for a, b in zip(keep, keep[1:], strict=False):
        a.next = b
    keep[-1].next = None
    d.fields[field] = keep[0]


def _kill_all(_e: Entry) -> bool:
    return True


def _kill_own_counter(e: Entry) -> bool:
    return e.kind == OP_COUNTER and e.rep == 0


def _kill_own_text(e: Entry) -> bool:
    return e.kind == OP_TEXT and e.rep == 0
