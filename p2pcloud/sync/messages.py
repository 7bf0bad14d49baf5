"""The sync channel's messages: CBOR maps in length-prefixed frames (docs/sync.md).

The ``sync`` channel is reliable and ordered (telehash v3 e3x/reliable.md), so the session
treats it as a byte stream: every message is ``u32 big-endian length || CBOR map``. Every
map carries ``"v": 1`` (the protocol version) and ``"t"`` (the type). Decoding is strict:
every field is checked for type and bound and anything else raises
:class:`~p2pcloud.errors.MalformedPacket` (the session drops the message and counts it). A
frame longer than :data:`MAX_MESSAGE_BYTES` breaks the stream itself
(:class:`FramingError`): the session fails and the shell closes the channel.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final

import cbor2

from p2pcloud._ids import SubCloudId
from p2pcloud.errors import MalformedPacket
from p2pcloud.sync.envelope import MAX_ENVELOPE_BYTES, SUBCLOUD_ID_SIZE
from p2pcloud.sync.reconcile import (
    FINGERPRINT_SIZE,
    ITEM_HASH_SIZE,
    ITEM_THRESHOLD,
    MAX_DEPTH,
    SALT_SIZE,
    Range,
)

__all__ = [
    "MAX_BATCH_BYTES",
    "MAX_BATCHES_PER_ACK",
    "MAX_MESSAGE_BYTES",
    "MAX_RANGES_PER_MESSAGE",
    "MAX_SNAPSHOT_BYTES",
    "MAX_VECTOR_BYTES",
    "MAX_VECTORS_PER_MESSAGE",
    "PROTOCOL_VERSION",
    "Ack",
    "Envelopes",
    "FramingError",
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

PROTOCOL_VERSION: Final = 1
FRAME_HEADER: Final = 4  # u32 big-endian length of the CBOR map that follows
MAX_BATCH_BYTES: Final = 256 * 1024
"""Envelope bytes per ENVELOPES message: large enough to amortise framing, small enough that
one message never holds a peer's window for long (a batch is at least one envelope)."""
MAX_MESSAGE_BYTES: Final = MAX_ENVELOPE_BYTES + 64 * 1024
"""Largest frame: one maximal envelope (a batch is at least one) plus CBOR overhead; every
other message type is far smaller. A larger length prefix means a broken stream."""
MAX_RANGES_PER_MESSAGE: Final = 16 * 4096
"""Reconciliation ranges per message: a reply splits each mismatched range into 16, and a
run over 10^5 sub-clouds needs about 4096 mismatched ranges at the widest level."""
MAX_ITEM_BYTES: Final = 4 * ITEM_THRESHOLD * ITEM_HASH_SIZE  # legit lists hold <= THRESHOLD
MAX_VECTORS_PER_MESSAGE: Final = 4096  # vector offers batched into one message
MAX_VECTOR_BYTES: Final = 64 * 1024  # an encoded version vector: ~2,000 writers of 32-byte ids
MAX_BATCHES_PER_ACK: Final = 4096  # the window holds far fewer unacknowledged batches
MAX_ENVELOPES_PER_BATCH: Final = 65536  # MAX_BATCH_BYTES of the smallest possible envelopes
MAX_SNAPSHOT_BYTES: Final = 1 << 30
"""Largest snapshot a receiver reassembles (1 GiB): the materialized state of one
sub-cloud; G2 puts 10^5 map entries under 1 MB, so this leaves room for 10^8."""
MAX_BATCH_ID: Final = (1 << 63) - 1  # batch ids count up per session

T_RECONCILE: Final = 1
T_VECTORS: Final = 2
T_ENVELOPES: Final = 3
T_ACK: Final = 4
T_SNAPSHOT: Final = 5
T_UNKNOWN: Final = 6


class FramingError(MalformedPacket):
    """A frame length beyond MAX_MESSAGE_BYTES: the stream cannot be resynchronised."""


@dataclass(frozen=True, slots=True)
class Reconcile:
    """Reconciliation ranges (reconcile.py); ``reply`` marks an answer to the peer's message."""

    reply: bool
    ranges: tuple[Range, ...]


@dataclass(frozen=True, slots=True)
class VectorOffer:
    """One sub-cloud's version vector (``encode_version`` bytes).

    ``reply`` asks the peer for its own vector back; ``bytes_per_dot`` (milli-bytes, an
    integer) lets the peer estimate the bytes it is about to receive.
    """

    subcloud: SubCloudId
    version: bytes
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

    ``version`` (``encode_version`` bytes) is the checkpoint's version vector.
    """

    subcloud: SubCloudId
    batch: int
    offset: int
    total: int
    version: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class Unknown:
    """The sender does not replicate these sub-clouds (answer to their vector offers)."""

    subclouds: tuple[SubCloudId, ...]


Message = Reconcile | Vectors | Envelopes | Ack | SnapshotChunk | Unknown


def encode_message(msg: Message) -> bytes:
    """Encode one message as a frame (length prefix + CBOR map).

    Args:
        msg: the message.

    Returns:
        The frame bytes.
    """
    body: dict[str, Any] = {"v": PROTOCOL_VERSION}
    if isinstance(msg, Reconcile):
        body["t"] = T_RECONCILE
        body["p"] = msg.reply
        body["r"] = [[r.depth, r.prefix, r.mode, r.payload] for r in msg.ranges]
        salts = {r.salt for r in msg.ranges}
        if len(salts) > 1:
            raise ValueError("the ranges of one message belong to one run (one salt)")
        if salts and (salt := salts.pop()):
            body["n"] = salt  # once per message: every range of a run shares it
    elif isinstance(msg, Vectors):
        body["t"] = T_VECTORS
        body["o"] = [[o.subcloud, o.version, o.reply, o.bytes_per_dot] for o in msg.offers]
    elif isinstance(msg, Envelopes):
        body["t"] = T_ENVELOPES
        body["s"], body["b"], body["e"] = msg.subcloud, msg.batch, list(msg.envelopes)
    elif isinstance(msg, Ack):
        body["t"] = T_ACK
        body["b"] = list(msg.batches)
    elif isinstance(msg, SnapshotChunk):
        body["t"] = T_SNAPSHOT
        body.update(
            s=msg.subcloud, b=msg.batch, o=msg.offset, n=msg.total, w=msg.version, d=msg.data
        )
    else:
        body["t"] = T_UNKNOWN
        body["s"] = list(msg.subclouds)
    data = cbor2.dumps(body)
    return struct.pack(">I", len(data)) + data


def split_frames(buf: bytearray) -> list[bytes]:
    """Cut every complete frame off the front of ``buf`` (which keeps the rest).

    Args:
        buf: received stream bytes; consumed in place.

    Returns:
        The CBOR bodies of the complete frames, in order.

    Raises:
        FramingError: a length prefix beyond MAX_MESSAGE_BYTES.
    """
    out = []
    pos = 0
    while len(buf) - pos >= FRAME_HEADER:
        (n,) = struct.unpack_from(">I", buf, pos)
        if n > MAX_MESSAGE_BYTES:
            raise FramingError(f"frame of {n} bytes exceeds {MAX_MESSAGE_BYTES}")
        if len(buf) - pos - FRAME_HEADER < n:
            break
        out.append(bytes(buf[pos + FRAME_HEADER : pos + FRAME_HEADER + n]))
        pos += FRAME_HEADER + n
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


def _list(v: Any, hi: int, what: str) -> list[Any]:
    if not isinstance(v, list) or len(v) > hi:
        raise MalformedPacket(f"{what} is not a list of at most {hi}")
    return v


def _bool(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        raise MalformedPacket(f"{what} is not a bool")
    return v


def _subcloud(v: Any) -> SubCloudId:
    return SubCloudId(_bytes(v, SUBCLOUD_ID_SIZE, SUBCLOUD_ID_SIZE, "sub-cloud id"))


def decode_message(body: bytes) -> Message:
    """Decode one frame body (as :func:`split_frames` returns it).

    Args:
        body: the CBOR map bytes.

    Returns:
        The message.

    Raises:
        MalformedPacket: anything but a well-formed message of version 1.
    """
    try:
        obj: Any = cbor2.loads(body)
    except Exception as exc:  # cbor2 raises many types on hostile input; all mean "malformed"
        raise MalformedPacket(f"not CBOR: {exc}") from exc
    if not isinstance(obj, dict):
        raise MalformedPacket("a message is a CBOR map")
    if obj.get("v") != PROTOCOL_VERSION or type(obj.get("v")) is not int:
        raise MalformedPacket(f"unknown sync protocol version {obj.get('v')!r}")
    t = obj.get("t")
    try:
        if t == T_RECONCILE:
            ranges = []
            salt = _bytes(obj.get("n", b""), 0, SALT_SIZE, "salt")
            for item in _list(obj["r"], MAX_RANGES_PER_MESSAGE, "ranges"):
                depth, prefix, mode, payload = _list(item, 4, "range")
                ranges.append(
                    Range(
                        _int(depth, 0, MAX_DEPTH, "depth"),
                        _bytes(prefix, 0, MAX_DEPTH // 2, "prefix"),
                        _int(mode, 0, 5, "mode"),
                        _bytes(payload, 0, max(MAX_ITEM_BYTES, FINGERPRINT_SIZE), "payload"),
                        salt,
                    )
                )
            return Reconcile(_bool(obj["p"], "reply flag"), tuple(ranges))
        if t == T_VECTORS:
            offers = []
            for item in _list(obj["o"], MAX_VECTORS_PER_MESSAGE, "offers"):
                s, vv, reply, bpd = _list(item, 4, "offer")
                offers.append(
                    VectorOffer(
                        _subcloud(s),
                        _bytes(vv, 0, MAX_VECTOR_BYTES, "version"),
                        _bool(reply, "reply flag"),
                        _int(bpd, 0, MAX_MESSAGE_BYTES * 1000, "bytes per dot"),
                    )
                )
            return Vectors(tuple(offers))
        if t == T_ENVELOPES:
            envs = _list(obj["e"], MAX_ENVELOPES_PER_BATCH, "envelopes")
            return Envelopes(
                _subcloud(obj["s"]),
                _int(obj["b"], 0, MAX_BATCH_ID, "batch"),
                tuple(_bytes(e, 1, MAX_ENVELOPE_BYTES, "envelope") for e in envs),
            )
        if t == T_ACK:
            batches = _list(obj["b"], MAX_BATCHES_PER_ACK, "batches")
            return Ack(tuple(_int(b, 0, MAX_BATCH_ID, "batch") for b in batches))
        if t == T_SNAPSHOT:
            total = _int(obj["n"], 1, MAX_SNAPSHOT_BYTES, "snapshot size")
            offset = _int(obj["o"], 0, total - 1, "snapshot offset")
            data = _bytes(obj["d"], 1, MAX_BATCH_BYTES, "snapshot chunk")
            if offset + len(data) > total:
                raise MalformedPacket("snapshot chunk past the end")
            return SnapshotChunk(
                _subcloud(obj["s"]),
                _int(obj["b"], 0, MAX_BATCH_ID, "batch"),
                offset,
                total,
                _bytes(obj["w"], 0, MAX_VECTOR_BYTES, "version"),
                data,
            )
        if t == T_UNKNOWN:
            ids = _list(obj["s"], MAX_VECTORS_PER_MESSAGE, "sub-clouds")
            return Unknown(tuple(_subcloud(s) for s in ids))
    except (KeyError, ValueError, TypeError) as exc:
        if isinstance(exc, MalformedPacket):
            raise
        raise MalformedPacket(f"bad message fields: {exc}") from exc
    raise MalformedPacket(f"unknown message type {t!r}")
