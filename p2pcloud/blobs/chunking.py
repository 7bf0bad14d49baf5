"""Content-defined chunking and chunk hashes (DESIGN.md section 5, docs/files.md).

A blob (a file's content) is cut into chunks where the content itself says so: FastCDC
(Xia et al., "The Design of Fast Content-Defined Chunking for Data Deduplication Based
Storage Systems", IEEE TPDS 2020) rolls a gear hash over the bytes and cuts where its
masked bits are zero. An edit therefore moves only the cut points next to it; the chunks
before and after keep their bytes and so their hashes, and only the few chunks around the
edit travel again. Fixed-size blocks (Syncthing's 128 KiB..16 MiB blocks) would shift every
block after an insertion.

The cutting is done by ``pyfastcdc`` (a Cython port of fastcdc-rs' v2020 module: its cut
points equal fastcdc-rs', so other implementations can agree with ours), the hashing by the
``blake3`` package. This module does no I/O: callers hand in a buffer (``bytes``, a
``memoryview`` of an ``mmap``...). Measured on this machine (bench/bench_files.py):
pyfastcdc cuts at ~4.6 GB/s against ~2.6 GB/s for ``fastcdc`` 1.7 (whose wheel also pulls
in a CLI's dependencies), so pyfastcdc is the one we use.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final, NamedTuple, Protocol

import blake3
import pyfastcdc

__all__ = [
    "CHUNK_AVG",
    "CHUNK_MAX",
    "CHUNK_MIN",
    "HASH_SIZE",
    "ChunkSpan",
    "chunk_buffer",
    "chunk_hash",
    "iter_chunks",
    "iter_stream_chunks",
]

CHUNK_MIN: Final = 16 * 1024
"""No cut before 16 KiB: per-chunk costs (a hash lookup, a manifest entry of ~35 bytes, one
request) stay below 0.3% of the bytes, and FastCDC skips this many bytes without hashing."""
CHUNK_AVG: Final = 64 * 1024
"""FastCDC's target: 64 KiB keeps the manifest of a 1 GiB file near 14k entries (~0.5 MiB)
while an edit re-sends about one chunk on each side of it. FastCDC 2020 starts looking for
cut points only after CHUNK_MIN, so the mean on random data is about CHUNK_AVG + CHUNK_MIN
(~78 KiB measured)."""
CHUNK_MAX: Final = 256 * 1024
"""A forced cut at 256 KiB: bounds one chunk message (MAX_CHUNK_MESSAGE) and the memory one
in-flight request holds, even on data with no natural cut point (zeros)."""
HASH_SIZE: Final = 32  # BLAKE3's default output: 256 bits, collision-safe for content addressing
_NORMALIZATION: Final = 1  # FastCDC "NC1": fewer tiny/huge chunks, fastcdc-rs' default


class ChunkSpan(NamedTuple):
    """One chunk of a buffer: where it is and what it hashes to."""

    offset: int
    size: int
    hash: bytes


def chunk_hash(data: bytes | bytearray | memoryview) -> bytes:
    """The address of a chunk: its 32-byte BLAKE3 digest.

    Args:
        data: the chunk's bytes.

    Returns:
        ``blake3(data).digest()``.
    """
    return blake3.blake3(data).digest()


def _cutter() -> pyfastcdc.FastCDC:
    # a fresh instance per call: pyfastcdc's objects are not safe to share across threads,
    # and building one costs microseconds (a 256-entry gear table)
    return pyfastcdc.FastCDC(
        CHUNK_AVG, min_size=CHUNK_MIN, max_size=CHUNK_MAX, normalized_chunking=_NORMALIZATION
    )


def iter_chunks(data: bytes | bytearray | memoryview) -> Iterator[ChunkSpan]:
    """Cut a buffer into content-defined chunks and hash each one.

    The result depends only on the bytes (deterministic across runs and machines).

    Args:
        data: the whole blob (an empty buffer has no chunks).

    Yields:
        The chunks in order; their sizes add up to ``len(data)``.
    """
    if 0 < len(data) <= CHUNK_MIN:
        # FastCDC never cuts before CHUNK_MIN: a small blob is one chunk (the common case
        # of a folder of small files; skips building a cutter per file)
        yield ChunkSpan(0, len(data), blake3.blake3(data).digest())
        return
    for piece in _cutter().cut_buf(data):
        yield ChunkSpan(piece.offset, piece.length, blake3.blake3(piece.data).digest())


class Readable(Protocol):
    """A binary stream read with ``readinto`` (a raw file object, ``io.BytesIO``...)."""

    def readinto(self, b: memoryview, /) -> int:
        """Fill ``b`` from the stream; return how many bytes, 0 at the end."""
        ...


def iter_stream_chunks(stream: Readable) -> Iterator[ChunkSpan]:
    """Cut a stream into content-defined chunks and hash each one, in bounded memory.

    The cut points and hashes equal :func:`iter_chunks` over the whole content (pyfastcdc's
    stream cutter keeps at least ``CHUNK_MAX`` bytes ahead of each cut, which is all a cut
    depends on), but only one buffer of ``2 * CHUNK_MAX`` is held: a 1 GiB file is hashed
    with ~0.5 MiB instead of a mapping of the whole file, whose pages would count as the
    process's resident memory.

    Args:
        stream: the content, read from its current position to its end.

    Yields:
        The chunks in order (offsets from the position the stream started at).
    """
    for piece in _cutter().cut_stream(stream):
        # piece.data is valid only until the next piece is cut: hash it now
        yield ChunkSpan(piece.offset, piece.length, blake3.blake3(piece.data).digest())


def chunk_buffer(data: bytes | bytearray | memoryview) -> list[ChunkSpan]:
    """Like :func:`iter_chunks`, as a list.

    Args:
        data: the whole blob.

    Returns:
        The chunks in order.
    """
    return list(iter_chunks(data))
