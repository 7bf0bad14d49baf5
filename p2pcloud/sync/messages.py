"""The sync channel's messages: compact CBOR arrays in length-prefixed frames (docs/sync.md).

Theory of operation
-------------------
The ``sync`` channel is reliable and ordered (telehash v3 e3x/reliable.md), so the session
treats it as a byte stream: every message is ``varint length || CBOR array`` and every array
starts ``[version, type, ...]`` (protocol version :data:`PROTOCOL_VERSION` = 2; version 1 used
a 4-byte length and CBOR maps). Decoding is strict: every field is checked for type and bound
and anything else raises :class:`~p2pcloud.errors.MalformedPacket` (the session drops the
message and counts it). A frame longer than :data:`MAX_MESSAGE_BYTES`, a length prefix longer
than :data:`MAX_FRAME_HEADER` bytes or an empty frame (what a version-1 peer's 4-byte length
prefix looks like) breaks the stream itself (:class:`FramingError`): the session fails and
the shell closes the channel.

Ids are the bulk of small messages (a 16-byte sub-cloud id, 16-byte origin replica ids in
every version vector), so a session names them compactly through an :class:`IdTable`:

* Each direction has its own dictionary. A message that names an id the sender has not
  named before lists it once in its ``defs`` field (the first element after the type); the
  n-th id a sender ever defines gets index n on both sides, because the stream is ordered.
  ``defs`` are taken in before anything else of the message is checked, so a message that
  is dropped for a later field still keeps both dictionaries in step.
* An *id reference* is then: a byte string (the id itself, when there is no table or the
  table is full), ``2 * i`` (index ``i`` of the sender's dictionary) or ``2 * i + 1`` (index
  ``i`` of the receiver's dictionary: an answer names the sub-cloud the question named).
* An origin in a version vector may also be ``-1`` (the sender's own replica of the
  sub-cloud) or ``-2`` (the receiver's): replica ids are derived,
  ``SHA-256(b"p2pcloud replica" + sub-cloud id + hashname)[:16]`` (BRIEF.md), and both
  hashnames are the session's endpoints, so the two commonest origins cost one byte.
* A version vector travels as a flat list ``[origin ref, counter, ...]`` (zero counters left
  out).

:func:`encode_message` and :func:`decode_message` without a table use literal ids only (a
message any session accepts, at any point of its stream).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import cbor2

from p2pcloud._ids import Hashname, SubCloudId
from p2pcloud.errors import MalformedPacket
from p2pcloud.sync.envelope import MAX_ENVELOPE_BYTES, SUBCLOUD_ID_SIZE, replica_id_for
from p2pcloud.sync.reconcile import (
    FINGERPRINT_SIZE,
    ITEM_HASH_SIZE,
    ITEM_THRESHOLD,
    MAX_DEPTH,
    SALT_SIZE,
    Range,
)

__all__ = [
    "MAX_BATCHES_PER_ACK",
    "MAX_BATCH_BYTES",
    "MAX_FRAME_HEADER",
    "MAX_MESSAGE_BYTES",
    "MAX_RANGES_PER_MESSAGE",
    "MAX_SNAPSHOT_BYTES",
    "MAX_TABLE_ENTRIES",
    "MAX_VECTORS_PER_MESSAGE",
    "MAX_VECTOR_ORIGINS",
    "PROTOCOL_VERSION",
    "Ack",
    "Envelopes",
    "FramingError",
    "IdTable",
    "Message",
    "Reconcile",
    "SnapshotChunk",
    "Unknown",
    "VectorOffer",
    "Vectors",
    "decode_message",
    "encode_message",
    "split_frames",
]

PROTOCOL_VERSION: Final = 2
"""Version 2: varint frame lengths, CBOR arrays, id dictionaries and replica tags.
Version 1 (4-byte lengths, CBOR maps, literal ids) is rejected: its frames start with a
zero byte, which version 2 reads as an empty frame and fails the session cleanly."""
MAX_BATCH_BYTES: Final = 256 * 1024
"""Envelope bytes per ENVELOPES message: large enough to amortise framing, small enough that
one message never holds a peer's window for long (a batch is at least one envelope)."""
MAX_MESSAGE_BYTES: Final = MAX_ENVELOPE_BYTES + 64 * 1024
"""Largest frame: one maximal envelope (a batch is at least one) plus CBOR overhead; every
other message type is far smaller. A larger length prefix means a broken stream."""
MAX_FRAME_HEADER: Final = 4  # 7 bits per varint byte: 4 bytes hold 2^28 > MAX_MESSAGE_BYTES
MAX_RANGES_PER_MESSAGE: Final = 16 * 4096
"""Reconciliation ranges per message: a reply splits each mismatched range into 16, and a
run over 10^5 sub-clouds needs about 4096 mismatched ranges at the widest level."""
MAX_ITEM_BYTES: Final = 4 * ITEM_THRESHOLD * ITEM_HASH_SIZE  # legit lists hold <= THRESHOLD
MAX_VECTORS_PER_MESSAGE: Final = 4096  # vector offers batched into one message
MAX_VECTOR_ORIGINS: Final = 2048
"""Origins in one version vector: every writer a sub-cloud ever had; 2,048 is far beyond a
personal cloud's devices and keeps one vector under 64 KiB even with literal ids."""
MAX_TABLE_ENTRIES: Final = 4096
"""Ids one direction of a session may define (sub-clouds that differed, their writers).
Past it ids travel literally (16 bytes more each); the bound caps a session's memory at
about 1 MB whatever the peer sends."""
MIN_ID_BYTES: Final = 8  # BRIEF: replica ids are 8..32 bytes; sub-cloud ids 16
MAX_ID_BYTES: Final = 32
MAX_BATCHES_PER_ACK: Final = 4096  # the window holds far fewer unacknowledged batches
MAX_ENVELOPES_PER_BATCH: Final = 65536  # MAX_BATCH_BYTES of the smallest possible envelopes
MAX_SNAPSHOT_BYTES: Final = 1 << 30
"""Largest snapshot a receiver reassembles (1 GiB): the materialized state of one
sub-cloud; G2 puts 10^5 map entries under 1 MB, so this leaves room for 10^8."""
MAX_BATCH_ID: Final = (1 << 63) - 1  # batch ids count up per session
MAX_COUNTER: Final = (1 << 63) - 1  # the core's dot counters (p2pcloud._core MAX_COUNTER)
MAX_BYTES_PER_DOT: Final = MAX_MESSAGE_BYTES  # a dot is never bigger than a frame

TAG_SENDER: Final = -1  # origin ref: the sender's own replica of the sub-cloud
TAG_RECEIVER: Final = -2  # origin ref: the receiver's replica of the sub-cloud

T_RECONCILE: Final = 1
T_VECTORS: Final = 2
T_ENVELOPES: Final = 3
T_ACK: Final = 4
T_SNAPSHOT: Final = 5
T_UNKNOWN: Final = 6


class FramingError(MalformedPacket):
    """A frame the stream cannot be resynchronised after (too long, bad prefix, empty)."""


@dataclass(frozen=True, slots=True)
class Reconcile:
    """Reconciliation ranges (reconcile.py); ``reply`` marks an answer to the peer's message."""

    reply: bool
    ranges: tuple[Range, ...]


@dataclass(frozen=True, slots=True)
class VectorOffer:
    """One sub-cloud's version vector (origin replica id -> counter).

    ``reply`` asks the peer for its own vector back; ``bytes_per_dot`` (whole bytes) lets
    the peer estimate the bytes it is about to receive.
    """

    subcloud: SubCloudId
    version: Mapping[bytes, int]
    reply: bool
    bytes_per_dot: int


@dataclass(frozen=True, slots=True)
class Vectors:
    """Version-vector offers for sub-clouds found to differ."""

    offers: tuple[VectorOffer, ...]


@dataclass(frozen=True, slots=True)
class Envelopes:
    """A batch of envelopes of one sub-cloud, in counter order per origin."""

    subcloud: SubCloudId
    batch: int
    envelopes: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Ack:
    """The receiver stored these batches (or snapshot chunks): the sender's window reopens."""

    batches: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SnapshotChunk:
    """One chunk of a snapshot checkpoint: ``data`` at ``offset`` of ``total`` bytes.

    ``version`` is the checkpoint's version vector.
    """

    subcloud: SubCloudId
    batch: int
    offset: int
    total: int
    version: Mapping[bytes, int]
    data: bytes


@dataclass(frozen=True, slots=True)
class Unknown:
    """The sender does not replicate these sub-clouds (answer to their vector offers)."""

    subclouds: tuple[SubCloudId, ...]


Message = Reconcile | Vectors | Envelopes | Ack | SnapshotChunk | Unknown


class IdTable:
    """The id dictionaries of one session (both directions) and its two endpoints.

    One per :class:`~p2pcloud.sync.session.SyncSession`; pass it to every
    :func:`encode_message` and :func:`decode_message` of that session, in stream order.
    """

    __slots__ = ("_in", "_in_index", "_out", "_out_index", "_rid_cache", "local", "remote")

    def __init__(self, local: Hashname, remote: Hashname) -> None:
        """Start empty.

        Args:
            local: our hashname (the sender of what we encode).
            remote: the peer's hashname (the sender of what we decode).
        """
        self.local = local
        self.remote = remote
        self._out: list[bytes] = []  # ids we defined, by index
        self._out_index: dict[bytes, int] = {}
        self._in: list[bytes] = []  # ids the peer defined, by index
        self._in_index: dict[bytes, int] = {}
        self._rid_cache: tuple[bytes, bytes, bytes] = (b"", b"", b"")

    @property
    def defined_out(self) -> int:
        """How many ids we have defined for the peer."""
        return len(self._out)

    @property
    def defined_in(self) -> int:
        """How many ids the peer has defined for us."""
        return len(self._in)

    def replica_ids(self, subcloud: bytes) -> tuple[bytes, bytes]:
        """Our and the peer's replica ids of ``subcloud`` (cached for the last one asked).

        Args:
            subcloud: the sub-cloud id.

        Returns:
            ``(ours, theirs)``.
        """
        if self._rid_cache[0] != subcloud:
            sc = SubCloudId(subcloud)
            self._rid_cache = (
                subcloud,
                replica_id_for(sc, self.local),
                replica_id_for(sc, self.remote),
            )
        return self._rid_cache[1], self._rid_cache[2]


class _Encoder:
    """Id references for one message being encoded; new definitions commit at the end."""

    def __init__(self, table: IdTable | None) -> None:
        self.table = table
        self.defs: list[bytes] = []
        self._new: dict[bytes, int] = {}

    def ref(self, ident: bytes) -> bytes | int:
        t = self.table
        if t is None:
            return ident
        i = t._out_index.get(ident)
        if i is None:
            i = self._new.get(ident)
        if i is not None:
            return 2 * i
        j = t._in_index.get(ident)
        if j is not None:
            return 2 * j + 1
        if len(t._out) + len(self._new) >= MAX_TABLE_ENTRIES or not (
            MIN_ID_BYTES <= len(ident) <= MAX_ID_BYTES
        ):
            return ident  # the table is full: the id travels literally
        i = len(t._out) + len(self._new)
        self._new[ident] = i
        self.defs.append(ident)
        return 2 * i

    def version(self, subcloud: bytes, version: Mapping[bytes, int]) -> list[Any]:
        if len(version) > MAX_VECTOR_ORIGINS:
            raise ValueError(f"a version vector of more than {MAX_VECTOR_ORIGINS} origins")
        ours, theirs = self.table.replica_ids(subcloud) if self.table else (b"", b"")
        out: list[Any] = []
        for origin, counter in version.items():
            if not counter:
                continue
            if origin == ours:
                out.append(TAG_SENDER)
            elif origin == theirs:
                out.append(TAG_RECEIVER)
            else:
                out.append(self.ref(origin))
            out.append(counter)
        return out

    def commit(self) -> None:
        if self.table is not None:
            for ident in self.defs:
                self.table._out_index[ident] = len(self.table._out)
                self.table._out.append(ident)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_message(msg: Message, table: IdTable | None = None) -> bytes:
    """Encode one message as a frame (varint length + CBOR array).

    Args:
        msg: the message.
        table: the session's id table (ids become short references and defined ids are
            remembered in it); None encodes every id literally.

    Returns:
        The frame bytes.

    Raises:
        ValueError: a message this protocol cannot carry (ranges of two runs in one
            message, a version vector beyond MAX_VECTOR_ORIGINS); the table is unchanged.
    """
    enc = _Encoder(table)
    body: list[Any]
    if isinstance(msg, Reconcile):
        salts = {r.salt for r in msg.ranges}
        if len(salts) > 1:
            raise ValueError("the ranges of one message belong to one run (one salt)")
        flat: list[Any] = []
        for r in msg.ranges:
            flat += (r.depth, r.prefix, r.mode, r.payload)
        body = [PROTOCOL_VERSION, T_RECONCILE, msg.reply, flat, salts.pop() if salts else b""]
    elif isinstance(msg, Vectors):
        flat = []
        for o in msg.offers:
            flat += (enc.ref(o.subcloud), enc.version(o.subcloud, o.version), o.reply,
                     o.bytes_per_dot)
        body = [PROTOCOL_VERSION, T_VECTORS, enc.defs, flat]
    elif isinstance(msg, Envelopes):
        body = [PROTOCOL_VERSION, T_ENVELOPES, enc.defs, enc.ref(msg.subcloud), msg.batch,
                list(msg.envelopes)]
    elif isinstance(msg, Ack):
        body = [PROTOCOL_VERSION, T_ACK, list(msg.batches)]
    elif isinstance(msg, SnapshotChunk):
        body = [PROTOCOL_VERSION, T_SNAPSHOT, enc.defs, enc.ref(msg.subcloud), msg.batch,
                msg.offset, msg.total, enc.version(msg.subcloud, msg.version), msg.data]
    else:
        body = [PROTOCOL_VERSION, T_UNKNOWN, enc.defs, [enc.ref(s) for s in msg.subclouds]]
    data = cbor2.dumps(body)
    enc.commit()
    return _varint(len(data)) + data


def split_frames(buf: bytearray) -> list[bytes]:
    """Cut every complete frame off the front of ``buf`` (which keeps the rest).

    Args:
        buf: received stream bytes; consumed in place.

    Returns:
        The CBOR bodies of the complete frames, in order.

    Raises:
        FramingError: a length beyond MAX_MESSAGE_BYTES, a length prefix longer than
            MAX_FRAME_HEADER bytes, or an empty frame (a version-1 peer).
    """
    out: list[bytes] = []
    pos = 0
    size = len(buf)
    while pos < size:
        n = 0
        shift = 0
        i = pos
        while True:
            if i >= size:
                del buf[:pos]
                return out  # the length prefix itself is incomplete
            b = buf[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
            if i - pos >= MAX_FRAME_HEADER:
                raise FramingError(f"frame length prefix longer than {MAX_FRAME_HEADER} bytes")
        if n > MAX_MESSAGE_BYTES:
            raise FramingError(f"frame of {n} bytes exceeds {MAX_MESSAGE_BYTES}")
        if n == 0:
            raise FramingError(
                f"empty frame: not sync protocol {PROTOCOL_VERSION} (a version-1 peer?)"
            )
        if size - i < n:
            break
        out.append(bytes(buf[i : i + n]))
        pos = i + n
    del buf[:pos]
    return out


def _int(v: Any, lo: int, hi: int, what: str) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise MalformedPacket(f"{what} is not an integer in {lo}..{hi}")
    return v


def _bytes(v: Any, lo: int, hi: int, what: str) -> bytes:
    if not isinstance(v, bytes) or not lo <= len(v) <= hi:
        raise MalformedPacket(f"{what} is not {lo}..{hi} bytes")
    return v


def _list(v: Any, hi: int, what: str, *, step: int = 1) -> list[Any]:
    if not isinstance(v, list) or len(v) > hi or len(v) % step:
        raise MalformedPacket(f"{what} is not a list of at most {hi} (in groups of {step})")
    return v


def _bool(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        raise MalformedPacket(f"{what} is not a bool")
    return v


class _Decoder:
    """Resolves the id references of one received message against the session's table."""

    def __init__(self, table: IdTable | None) -> None:
        self.table = table

    def take_defs(self, v: Any) -> None:
        defs = _list(v, MAX_TABLE_ENTRIES, "id definitions")
        if not defs:
            return
        t = self.table
        if t is None:
            raise MalformedPacket("id definitions without a session table")
        if len(t._in) + len(defs) > MAX_TABLE_ENTRIES:
            raise MalformedPacket(f"the peer defined more than {MAX_TABLE_ENTRIES} ids")
        ids = [_bytes(d, MIN_ID_BYTES, MAX_ID_BYTES, "defined id") for d in defs]
        for ident in ids:  # all checked first: a bad list defines nothing
            t._in_index.setdefault(ident, len(t._in))
            t._in.append(ident)

    def ident(self, v: Any, lo: int, hi: int, what: str) -> bytes:
        if isinstance(v, bytes):
            return _bytes(v, lo, hi, what)
        t = self.table
        if type(v) is not int or v < 0 or t is None:
            raise MalformedPacket(f"{what} is not an id or an id reference")
        table = t._in if v % 2 == 0 else t._out  # even: the sender's dictionary
        if v // 2 >= len(table):
            raise MalformedPacket(f"{what} reference {v} is out of range")
        return _bytes(table[v // 2], lo, hi, what)

    def subcloud(self, v: Any) -> SubCloudId:
        return SubCloudId(self.ident(v, SUBCLOUD_ID_SIZE, SUBCLOUD_ID_SIZE, "sub-cloud id"))

    def version(self, subcloud: bytes, v: Any) -> dict[bytes, int]:
        flat = _list(v, 2 * MAX_VECTOR_ORIGINS, "version vector", step=2)
        out: dict[bytes, int] = {}
        for k in range(0, len(flat), 2):
            ref = flat[k]
            if ref in (TAG_SENDER, TAG_RECEIVER):
                if type(ref) is not int or self.table is None:
                    raise MalformedPacket("a replica tag without a session table")
                local_rid, remote_rid = self.table.replica_ids(subcloud)
                origin = remote_rid if ref == TAG_SENDER else local_rid  # the peer sent it
            else:
                origin = self.ident(ref, MIN_ID_BYTES, MAX_ID_BYTES, "origin")
            if origin in out:
                raise MalformedPacket("an origin twice in one version vector")
            out[origin] = _int(flat[k + 1], 1, MAX_COUNTER, "counter")
        return out


def decode_message(body: bytes, table: IdTable | None = None) -> Message:
    """Decode one frame body (as :func:`split_frames` returns it).

    Args:
        body: the CBOR array bytes.
        table: the session's id table (definitions in the message are added to it first,
            even if a later field is then found malformed); None accepts literal ids only.

    Returns:
        The message.

    Raises:
        MalformedPacket: anything but a well-formed message of version 2.
    """
    try:
        obj: Any = cbor2.loads(body)
    except Exception as exc:  # cbor2 raises many types on hostile input; all mean "malformed"
        raise MalformedPacket(f"not CBOR: {exc}") from exc
    if not isinstance(obj, list) or len(obj) < 2:
        raise MalformedPacket("a message is a CBOR array [version, type, ...]")
    if type(obj[0]) is not int or obj[0] != PROTOCOL_VERSION:
        raise MalformedPacket(f"unknown sync protocol version {obj[0]!r}")
    t = obj[1]
    dec = _Decoder(table)
    shapes = {T_RECONCILE: 5, T_VECTORS: 4, T_ENVELOPES: 6, T_ACK: 3, T_SNAPSHOT: 9,
              T_UNKNOWN: 4}
    if type(t) is not int or t not in shapes:
        raise MalformedPacket(f"unknown message type {t!r}")
    if len(obj) != shapes[t]:
        raise MalformedPacket(f"message type {t} has {len(obj)} fields, not {shapes[t]}")
    if t not in (T_RECONCILE, T_ACK):
        dec.take_defs(obj[2])  # before anything else: keeps the dictionaries in step
    if t == T_RECONCILE:
        salt = _bytes(obj[4], 0, SALT_SIZE, "salt")
        flat = _list(obj[3], 4 * MAX_RANGES_PER_MESSAGE, "ranges", step=4)
        ranges = [
            Range(
                _int(flat[k], 0, MAX_DEPTH, "depth"),
                _bytes(flat[k + 1], 0, MAX_DEPTH // 2, "prefix"),
                _int(flat[k + 2], 0, 5, "mode"),
                _bytes(flat[k + 3], 0, max(MAX_ITEM_BYTES, FINGERPRINT_SIZE), "payload"),
                salt,
            )
            for k in range(0, len(flat), 4)
        ]
        return Reconcile(_bool(obj[2], "reply flag"), tuple(ranges))
    if t == T_VECTORS:
        flat = _list(obj[3], 4 * MAX_VECTORS_PER_MESSAGE, "offers", step=4)
        offers = []
        for k in range(0, len(flat), 4):
            sc = dec.subcloud(flat[k])
            offers.append(
                VectorOffer(
                    sc,
                    dec.version(sc, flat[k + 1]),
                    _bool(flat[k + 2], "reply flag"),
                    _int(flat[k + 3], 0, MAX_BYTES_PER_DOT, "bytes per dot"),
                )
            )
        return Vectors(tuple(offers))
    if t == T_ENVELOPES:
        envs = _list(obj[5], MAX_ENVELOPES_PER_BATCH, "envelopes")
        return Envelopes(
            dec.subcloud(obj[3]),
            _int(obj[4], 0, MAX_BATCH_ID, "batch"),
            tuple(_bytes(e, 1, MAX_ENVELOPE_BYTES, "envelope") for e in envs),
        )
    if t == T_ACK:
        batches = _list(obj[2], MAX_BATCHES_PER_ACK, "batches")
        return Ack(tuple(_int(b, 0, MAX_BATCH_ID, "batch") for b in batches))
    if t == T_SNAPSHOT:
        sc = dec.subcloud(obj[3])
        total = _int(obj[6], 1, MAX_SNAPSHOT_BYTES, "snapshot size")
        offset = _int(obj[5], 0, total - 1, "snapshot offset")
        data = _bytes(obj[8], 1, MAX_BATCH_BYTES, "snapshot chunk")
        if offset + len(data) > total:
            raise MalformedPacket("snapshot chunk past the end")
        return SnapshotChunk(
            sc, _int(obj[4], 0, MAX_BATCH_ID, "batch"), offset, total,
            dec.version(sc, obj[7]), data,
        )
    ids = _list(obj[3], MAX_VECTORS_PER_MESSAGE, "sub-clouds")
    return Unknown(tuple(dec.subcloud(s) for s in ids))
