"""Messages of the ``blob`` channel: asking peers for chunks and manifests, and answering.

Each channel body is one CBOR map (DESIGN.md section 4: channel bodies are CBOR) with
``v`` (format version, 1) and ``t`` (message type):

=========  ==============================================  ===============================
``t``      fields                                          meaning
=========  ==============================================  ===============================
want       ``h``: list of chunk hashes                     send me these chunks
have       ``b``: blob hashes, ``h``: chunk hashes         I hold all of these blobs/chunks
chunk      ``h``: hash, ``d``: bytes                       one chunk (receiver verifies)
err        ``h``: hash, ``r``: reason text                 I cannot send this one
mwant      ``b``: blob hash, ``o``: offset, ``i``: inline  send the manifest from ``o``
manifest   ``b``, ``o``, ``n``: total length, ``d``: bytes  a piece of a manifest
=========  ==============================================  ===============================

``want``/``have``/``chunk``/``err`` are what the issue names; ``mwant``/``manifest`` are our
extension for manifests, which can be longer than one message (a 10 GiB blob has a ~4 MiB
manifest) and are verified as a whole by the blob hash (:class:`ManifestAssembler`).
``mwant`` with ``i: true`` (optional, absent means false) also asks for the chunks of a
blob of at most ``MAX_INLINE_BLOB`` bytes right after its manifest, as ordinary ``chunk``
(or ``err``) messages: a small file costs one request instead of two round trips.

Every decoder raises only :class:`MalformedPacket`, whatever the bytes; every size is bounded
before anything is allocated for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import cbor2

from p2pcloud.blobs.chunking import CHUNK_MAX, HASH_SIZE
from p2pcloud.blobs.manifest import MAX_MANIFEST_BYTES, Manifest, decode_manifest
from p2pcloud.errors import BadManifest, MalformedPacket

__all__ = [
    "BLOB_CHANNEL",
    "MAX_BLOB_MESSAGE",
    "MAX_HAVE_HASHES",
    "MAX_INLINE_BLOB",
    "MAX_WANT_HASHES",
    "BlobMessage",
    "ChunkData",
    "ChunkError",
    "Have",
    "ManifestAssembler",
    "ManifestPiece",
    "ManifestWant",
    "Want",
    "decode_blob_message",
    "encode_blob_message",
    "have_messages",
    "manifest_pieces",
]

BLOB_CHANNEL: Final = "blob"  # the channel type (telehash v3 channels carry a `type`)
BLOB_MESSAGE_VERSION: Final = 1
MAX_WANT_HASHES: Final = 64
"""Hashes in one want: 64 x 256 KiB = 16 MiB asked at once, more than a peer's in-flight
budget (MAX_IN_FLIGHT_PER_PEER in fetch.py), so one want always suffices."""
MAX_HAVE_HASHES: Final = 4096  # one have stays ~140 KiB; more is sent as several messages
MAX_REASON: Final = 200  # an err reason is a short code or sentence for logs, not a payload
MANIFEST_PIECE: Final = 128 * 1024  # manifest bytes per message: below CHUNK_MAX on any path
_ENVELOPE: Final = 64  # CBOR map keys, type strings, hash and integers around the data
MAX_BLOB_MESSAGE: Final = CHUNK_MAX + 1024
MAX_INLINE_BLOB: Final = 64 * 1024
"""Blobs up to this size come with their manifest when an ``mwant`` asks (``i``): a folder
of small files is fetched with one request per file; one chunk at most (< CHUNK_MIN is one
chunk), so the answer to one request stays bounded."""
"""The largest body of a blob message: one maximal chunk plus its CBOR envelope. A have
with MAX_HAVE_HASHES is smaller (4096 x 34 bytes)."""


@dataclass(frozen=True, slots=True)
class Want:
    """A request for chunks by hash."""

    hashes: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Have:
    """An announcement: the sender holds every chunk of ``blobs`` and the chunks ``hashes``."""

    blobs: tuple[bytes, ...]
    hashes: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ChunkData:
    """One chunk's bytes; the receiver verifies them against ``hash``."""

    hash: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class ChunkError:
    """The sender cannot provide ``hash`` (does not have it, or it failed verification there)."""

    hash: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class ManifestWant:
    """A request for a blob's manifest from byte ``offset`` on (``inline``: and the chunks
    of a blob of at most MAX_INLINE_BLOB bytes after it)."""

    blob: bytes
    offset: int
    inline: bool = False


@dataclass(frozen=True, slots=True)
class ManifestPiece:
    """Bytes ``offset..offset+len(data)`` of a manifest whose encoding is ``total`` bytes."""

    blob: bytes
    offset: int
    total: int
    data: bytes


BlobMessage = Want | Have | ChunkData | ChunkError | ManifestWant | ManifestPiece


def _check_hashes(hashes: Sequence[bytes], limit: int) -> list[bytes]:
    if len(hashes) > limit:
        raise ValueError(f"at most {limit} hashes per message")
    for h in hashes:
        if not isinstance(h, bytes) or len(h) != HASH_SIZE:
            raise ValueError("hashes are 32 bytes")
    return list(hashes)


def encode_blob_message(msg: BlobMessage) -> bytes:
    """Encode one message as a channel body.

    Args:
        msg: the message.

    Returns:
        The CBOR body (at most MAX_BLOB_MESSAGE bytes).

    Raises:
        ValueError: a field is out of range (a local bug, not a peer's).
    """
    m: dict[str, Any] = {"v": BLOB_MESSAGE_VERSION}
    if isinstance(msg, Want):
        m["t"] = "want"
        m["h"] = _check_hashes(msg.hashes, MAX_WANT_HASHES)
    elif isinstance(msg, Have):
        m["t"] = "have"
        m["b"] = _check_hashes(msg.blobs, MAX_HAVE_HASHES)
        m["h"] = _check_hashes(msg.hashes, MAX_HAVE_HASHES - len(msg.blobs))
    elif isinstance(msg, ChunkData):
        _check_hashes([msg.hash], 1)
        if not 1 <= len(msg.data) <= CHUNK_MAX:
            raise ValueError("chunk data must be 1..CHUNK_MAX bytes")
        m["t"] = "chunk"
        m["h"] = msg.hash
        m["d"] = bytes(msg.data)
    elif isinstance(msg, ChunkError):
        _check_hashes([msg.hash], 1)
        m["t"] = "err"
        m["h"] = msg.hash
        m["r"] = msg.reason[:MAX_REASON]
    elif isinstance(msg, ManifestWant):
        _check_hashes([msg.blob], 1)
        if not 0 <= msg.offset <= MAX_MANIFEST_BYTES:
            raise ValueError("manifest offset out of range")
        m["t"] = "mwant"
        m["b"] = msg.blob
        m["o"] = msg.offset
        if msg.inline:
            m["i"] = True
    else:
        _check_hashes([msg.blob], 1)
        if not 0 < msg.total <= MAX_MANIFEST_BYTES or not 0 <= msg.offset < msg.total:
            raise ValueError("manifest piece out of range")
        if not 1 <= len(msg.data) <= MANIFEST_PIECE or msg.offset + len(msg.data) > msg.total:
            raise ValueError("manifest piece data out of range")
        m["t"] = "manifest"
        m["b"] = msg.blob
        m["o"] = msg.offset
        m["n"] = msg.total
        m["d"] = bytes(msg.data)
    return cbor2.dumps(m)


def _hash(m: dict[Any, Any], key: str) -> bytes:
    h = m.get(key)
    if not isinstance(h, bytes) or len(h) != HASH_SIZE:
        raise MalformedPacket(f"blob message: {key!r} is not a 32-byte hash")
    return h


def _hash_list(m: dict[Any, Any], key: str, limit: int) -> tuple[bytes, ...]:
    hs = m.get(key, [])
    if not isinstance(hs, list) or len(hs) > limit:
        raise MalformedPacket(f"blob message: {key!r} is not a list of at most {limit}")
    for h in hs:
        if not isinstance(h, bytes) or len(h) != HASH_SIZE:
            raise MalformedPacket(f"blob message: {key!r} holds a non-hash")
    return tuple(hs)


def _uint(m: dict[Any, Any], key: str, limit: int) -> int:
    n = m.get(key)
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= limit:
        raise MalformedPacket(f"blob message: {key!r} is not an integer in 0..{limit}")
    return n


def decode_blob_message(body: bytes) -> BlobMessage:
    """Decode a ``blob`` channel body.

    Args:
        body: the bytes a peer sent.

    Returns:
        The message.

    Raises:
        MalformedPacket: too long, not CBOR, not a map of a known version and type, or a
            field of the wrong type or out of its bound.
    """
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise MalformedPacket("blob message: not bytes")
    if len(body) > MAX_BLOB_MESSAGE:
        raise MalformedPacket("blob message: too long")
    try:
        m = cbor2.loads(bytes(body))
    except Exception as exc:  # cbor2 raises several types (CBORDecodeError, ValueError, ...)
        raise MalformedPacket(f"blob message: not CBOR ({type(exc).__name__})") from exc
    if not isinstance(m, dict):
        raise MalformedPacket("blob message: not a map")
    if m.get("v") != BLOB_MESSAGE_VERSION:
        raise MalformedPacket("blob message: unknown version")
    t = m.get("t")
    if t == "want":
        hashes = _hash_list(m, "h", MAX_WANT_HASHES)
        if not hashes:
            raise MalformedPacket("blob message: empty want")
        return Want(hashes)
    if t == "have":
        blobs = _hash_list(m, "b", MAX_HAVE_HASHES)
        return Have(blobs, _hash_list(m, "h", MAX_HAVE_HASHES - len(blobs)))
    if t == "chunk":
        h = _hash(m, "h")
        d = m.get("d")
        if not isinstance(d, bytes) or not 1 <= len(d) <= CHUNK_MAX:
            raise MalformedPacket("blob message: chunk data must be 1..CHUNK_MAX bytes")
        return ChunkData(h, d)
    if t == "err":
        h = _hash(m, "h")
        r = m.get("r", "")
        if not isinstance(r, str) or len(r) > MAX_REASON:
            raise MalformedPacket("blob message: bad err reason")
        return ChunkError(h, r)
    if t == "mwant":
        inline = m.get("i", False)
        if not isinstance(inline, bool):
            raise MalformedPacket("blob message: mwant inline flag must be a bool")
        return ManifestWant(_hash(m, "b"), _uint(m, "o", MAX_MANIFEST_BYTES), inline)
    if t == "manifest":
        b = _hash(m, "b")
        total = _uint(m, "n", MAX_MANIFEST_BYTES)
        offset = _uint(m, "o", MAX_MANIFEST_BYTES)
        d = m.get("d")
        if not isinstance(d, bytes) or not 1 <= len(d) <= MANIFEST_PIECE:
            raise MalformedPacket("blob message: manifest piece must be 1..MANIFEST_PIECE bytes")
        if offset + len(d) > total:
            raise MalformedPacket("blob message: manifest piece past its total")
        return ManifestPiece(b, offset, total, d)
    raise MalformedPacket("blob message: unknown type")


def have_messages(blobs: Sequence[bytes] = (), chunks: Sequence[bytes] = ()) -> list[Have]:
    """Announcements of what this endpoint holds, split to respect MAX_HAVE_HASHES.

    Args:
        blobs: blob hashes held whole (e.g. ``Folder.blobs()``).
        chunks: single chunk hashes held (a partial blob).

    Returns:
        The ``have`` messages (none if there is nothing to announce).
    """
    out = []
    for i in range(0, len(blobs), MAX_HAVE_HASHES):
        out.append(Have(tuple(blobs[i:i + MAX_HAVE_HASHES]), ()))
    for i in range(0, len(chunks), MAX_HAVE_HASHES):
        out.append(Have((), tuple(chunks[i:i + MAX_HAVE_HASHES])))
    return out


def manifest_pieces(manifest: Manifest, offset: int = 0) -> list[ManifestPiece]:
    """The messages that send a manifest from ``offset`` on (the answer to a ManifestWant).

    Args:
        manifest: the manifest to send.
        offset: where the asker wants to resume.

    Returns:
        The pieces in order (empty if ``offset`` is at or past the end).
    """
    enc = manifest.encoded
    return [
        ManifestPiece(manifest.blob_hash, o, len(enc), enc[o:o + MANIFEST_PIECE])
        for o in range(offset, len(enc), MANIFEST_PIECE)
    ]


class ManifestAssembler:
    """Collects the pieces of one manifest, in order, and verifies the whole by its hash.

    The pieces cannot be verified one by one (the blob hash covers the whole encoding), so
    a peer that sends garbage is caught at the end: :meth:`add` raises, and the caller
    starts over from offset 0 with a fresh assembler and another peer (it cannot know which
    bytes were wrong). Between honest peers it resumes at :attr:`offset`.
    """

    def __init__(self, blob_hash: bytes) -> None:
        """Start collecting the manifest of ``blob_hash``.

        Args:
            blob_hash: the 32-byte blob hash asked for.
        """
        self.blob_hash = blob_hash
        self._buf = bytearray()
        self._total: int | None = None

    @property
    def offset(self) -> int:
        """How many bytes are held: the offset of the next ManifestWant."""
        return len(self._buf)

    def add(self, piece: ManifestPiece) -> Manifest | None:
        """Take one piece.

        Args:
            piece: a decoded ``manifest`` message for this blob.

        Returns:
            The verified manifest once the last piece is in, else None. A piece for an
            offset already held (a duplicate) is ignored.

        Raises:
            BadManifest: the piece is for another blob, its total changed, it leaves a gap,
                or the finished bytes do not decode or do not hash to the blob hash.
        """
        if piece.blob != self.blob_hash:
            raise BadManifest("manifest piece for another blob")
        if self._total is None:
            self._total = piece.total
        elif piece.total != self._total:
            raise BadManifest("manifest total changed between pieces")
        held = len(self._buf)
        if piece.offset + len(piece.data) <= held:
            return None  # a duplicate: already held
        if piece.offset > held:
            raise BadManifest("manifest piece leaves a gap")
        self._buf += piece.data[held - piece.offset:]  # an overlap adds only its new tail
        if len(self._buf) < self._total:
            return None
        return decode_manifest(bytes(self._buf), self.blob_hash)
