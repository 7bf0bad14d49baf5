"""Blob manifests: the ordered chunk list of a blob, and the blob hash over it.

A manifest is the list of ``(chunk hash, chunk size)`` pairs of a blob, in order. Its
encoding is canonical (one byte string per manifest), so the blob hash, BLAKE3 over that
encoding, names the content: two devices that chunk the same bytes get the same blob hash,
and a receiver that holds a manifest whose BLAKE3 equals the hash it asked for knows every
chunk hash in it is the right one. Chunks are then verified one by one as they arrive.

Encoding (docs/files.md "Manifest")::

    0xB1                      magic
    0x01                      version
    varint count              number of chunks, <= MAX_MANIFEST_CHUNKS
    count x (32-byte hash, varint size)   size in 1..CHUNK_MAX

Varints are unsigned LEB128 in their shortest form (anything longer is refused: it would
give one manifest two encodings and so two blob hashes). The blob size is the sum of the
chunk sizes and is bounded by MAX_BLOB_SIZE.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, NamedTuple

import blake3

from p2pcloud.blobs.chunking import CHUNK_MAX, CHUNK_MIN, HASH_SIZE, ChunkSpan, iter_chunks
from p2pcloud.errors import BadManifest

__all__ = [
    "MANIFEST_VERSION",
    "MAX_BLOB_SIZE",
    "MAX_MANIFEST_BYTES",
    "MAX_MANIFEST_CHUNKS",
    "ChunkRef",
    "Manifest",
    "decode_manifest",
    "manifest_of",
]

MANIFEST_MAGIC: Final = 0xB1  # first byte: tells a manifest from a chunk or a CRDT delta (0xD7)
MANIFEST_VERSION: Final = 1
MAX_BLOB_SIZE: Final = 1 << 36
"""64 GiB: larger than any single file a personal cloud syncs in practice (disk images and
4K films included), small enough that the worst-case manifest stays bounded (below)."""
MAX_MANIFEST_CHUNKS: Final = MAX_BLOB_SIZE // CHUNK_MIN
"""4,194,304 entries: a 64 GiB blob cut at the minimum chunk size everywhere; a decoder
never allocates for more entries than that, whatever count a peer claims."""
_MAX_ENTRY_BYTES: Final = HASH_SIZE + 3  # a size up to CHUNK_MAX (2^18) is a 3-byte varint
MAX_MANIFEST_BYTES: Final = 2 + 4 + MAX_MANIFEST_CHUNKS * _MAX_ENTRY_BYTES
"""About 140 MiB: the longest valid encoding (magic, version, a 4-byte count, the entries);
typical manifests are ~0.45 MiB per GiB of blob."""


class ChunkRef(NamedTuple):
    """One manifest entry: a chunk's BLAKE3 hash and its size in bytes."""

    hash: bytes
    size: int


def _put_varint(out: bytearray, n: int) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


class Manifest:
    """The ordered chunks of one blob; immutable, validated on construction.

    Attributes:
        chunks: the entries in order.
        size: the blob's length in bytes (sum of the chunk sizes).
        encoded: the canonical encoding.
        blob_hash: BLAKE3 of ``encoded``: the blob's address.
    """

    __slots__ = ("blob_hash", "chunks", "encoded", "size")

    chunks: tuple[ChunkRef, ...]
    size: int
    encoded: bytes
    blob_hash: bytes

    def __init__(self, chunks: Iterable[ChunkRef | tuple[bytes, int]]) -> None:
        """Build a manifest from its entries.

        Args:
            chunks: ``(hash, size)`` pairs in blob order.

        Raises:
            BadManifest: a hash is not 32 bytes, a size is outside 1..CHUNK_MAX, or the blob
                would exceed MAX_BLOB_SIZE / MAX_MANIFEST_CHUNKS.
        """
        refs: list[ChunkRef] = []
        out = bytearray((MANIFEST_MAGIC, MANIFEST_VERSION))
        body = bytearray()
        total = 0
        for item in chunks:
            h, size = item
            if not isinstance(h, bytes) or len(h) != HASH_SIZE:
                raise BadManifest("a chunk hash must be 32 bytes")
            if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= CHUNK_MAX:
                raise BadManifest(f"a chunk size must be 1..{CHUNK_MAX}")
            total += size
            if total > MAX_BLOB_SIZE or len(refs) >= MAX_MANIFEST_CHUNKS:
                raise BadManifest("blob too large")
            refs.append(ChunkRef(h, size))
            body += h
            _put_varint(body, size)
        _put_varint(out, len(refs))
        out += body
        self.chunks = tuple(refs)
        self.size = total
        self.encoded = bytes(out)
        self.blob_hash = blake3.blake3(self.encoded).digest()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Manifest):
            return NotImplemented
        return self.encoded == other.encoded

    def __hash__(self) -> int:
        return hash(self.blob_hash)

    def __len__(self) -> int:
        return len(self.chunks)

    def __repr__(self) -> str:
        return (f"Manifest(blob={self.blob_hash.hex()[:16]}, chunks={len(self.chunks)}, "
                f"size={self.size})")

    def offsets(self) -> list[int]:
        """The byte offset of each chunk in the blob, in order."""
        out = []
        pos = 0
        for ref in self.chunks:
            out.append(pos)
            pos += ref.size
        return out

    def unique_chunks(self) -> dict[bytes, int]:
        """Each distinct chunk hash with its size (a blob may repeat a chunk), in first order."""
        return {ref.hash: ref.size for ref in self.chunks}


def manifest_of(
    data: bytes | bytearray | memoryview, spans: Sequence[ChunkSpan] | None = None
) -> Manifest:
    """Chunk and hash a buffer and build its manifest.

    Args:
        data: the whole blob.
        spans: its chunks if already computed (:func:`p2pcloud.blobs.chunk_buffer`).

    Returns:
        The manifest.

    Raises:
        BadManifest: the blob is larger than MAX_BLOB_SIZE.
    """
    if len(data) > MAX_BLOB_SIZE:
        raise BadManifest("blob too large")
    use = spans if spans is not None else iter_chunks(data)
    return Manifest((s.hash, s.size) for s in use)


def decode_manifest(
    data: bytes | bytearray | memoryview, blob_hash: bytes | None = None
) -> Manifest:
    """Decode and validate a manifest (from a peer or the store).

    Args:
        data: the encoding.
        blob_hash: if given, the hash the manifest must have (what was asked for).

    Returns:
        The manifest.

    Raises:
        BadManifest: wrong magic or version, truncated, a non-minimal varint, an entry out of
            range, too many chunks, trailing bytes, or a hash other than ``blob_hash``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadManifest("a manifest is bytes")
    raw = bytes(data)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BadManifest("manifest too long")
    if len(raw) < 3:
        raise BadManifest("manifest truncated")
    if raw[0] != MANIFEST_MAGIC:
        raise BadManifest("not a manifest (magic)")
    if raw[1] != MANIFEST_VERSION:
        raise BadManifest(f"unknown manifest version {raw[1]}")
    pos = 2
    end = len(raw)

    def varint() -> int:
        nonlocal pos
        n = 0
        shift = 0
        for i in range(5):  # 5 bytes hold 35 bits: more than any count or size allowed
            if pos >= end:
                raise BadManifest("manifest truncated")
            b = raw[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                if b == 0 and i > 0:
                    raise BadManifest("non-minimal varint")
                return n
            shift += 7
        raise BadManifest("varint too long")

    count = varint()
    if count > MAX_MANIFEST_CHUNKS:
        raise BadManifest("too many chunks")
    # each entry takes at least 33 bytes: refuse a count the bytes cannot hold before looping
    if count * (HASH_SIZE + 1) > end - pos:
        raise BadManifest("manifest truncated")
    refs = []
    for _ in range(count):
        if pos + HASH_SIZE > end:
            raise BadManifest("manifest truncated")
        h = raw[pos:pos + HASH_SIZE]
        pos += HASH_SIZE
        refs.append((h, varint()))
    if pos != end:
        raise BadManifest("trailing bytes after manifest")
    manifest = Manifest(refs)
    if manifest.encoded != raw:  # cannot differ after the checks above; kept as the invariant
        raise BadManifest("non-canonical manifest")
    if blob_hash is not None and manifest.blob_hash != blob_hash:
        raise BadManifest("manifest does not match the blob hash")
    return manifest
