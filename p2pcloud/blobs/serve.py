"""Answering a peer's ``want`` and ``mwant`` messages from a local chunk store (pure).

The Trio shell plugs its store in as callables (:class:`ChunkStore` is the shape: the LMDB
store, or a folder that serves chunks straight from its files) and sends back the messages
:func:`answer` returns. Chunks are re-verified before they leave: a store that rotted (or a
file that changed under its index) answers ``err`` instead of spreading bad bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol

import blake3

from p2pcloud.blobs.manifest import Manifest
from p2pcloud.blobs.messages import (
    MAX_INLINE_BLOB,
    BlobMessage,
    ChunkData,
    ChunkError,
    ManifestWant,
    Want,
    manifest_pieces,
)

__all__ = ["ERR_CORRUPT", "ERR_MISSING", "ChunkStore", "answer"]

ERR_MISSING: Final = "missing"  # err reason: this peer does not hold the chunk or manifest
ERR_CORRUPT: Final = "corrupt"  # err reason: it held bytes that no longer match the hash


class ChunkStore(Protocol):
    """What the blob layer needs from a chunk store; the node plugs LMDB in here."""

    def has(self, chunk_hash: bytes) -> bool:
        """Whether the chunk is held."""
        ...

    def get(self, chunk_hash: bytes) -> bytes | None:
        """The chunk's bytes, or None."""
        ...

    def put(self, chunk_hash: bytes, data: bytes) -> None:
        """Keep a verified chunk."""
        ...


def answer(
    msg: BlobMessage,
    get_chunk: Callable[[bytes], bytes | None],
    get_manifest: Callable[[bytes], Manifest | None],
    *,
    verify: bool = True,
) -> list[BlobMessage]:
    """The replies to one incoming request; other message types get no reply.

    Args:
        msg: a decoded ``want`` or ``mwant`` (anything else returns ``[]``).
        get_chunk: the local chunk source.
        get_manifest: the local manifest source, by blob hash.
        verify: hash each chunk before it leaves (False only when ``get_chunk`` returns
            nothing but verified bytes: one BLAKE3 pass per served byte less).

    Returns:
        One ``chunk`` or ``err`` per wanted hash, or the ``manifest`` pieces (an ``err`` for a
        manifest not held, with the blob hash as ``h``).
    """
    out: list[BlobMessage] = []
    if isinstance(msg, Want):
        for h in msg.hashes:
            out.append(_chunk_reply(h, get_chunk, verify))
    elif isinstance(msg, ManifestWant):
        manifest = get_manifest(msg.blob)
        if manifest is None or manifest.blob_hash != msg.blob:
            out.append(ChunkError(msg.blob, ERR_MISSING))
        else:
            out.extend(manifest_pieces(manifest, msg.offset))
            if msg.inline and msg.offset == 0 and manifest.size <= MAX_INLINE_BLOB:
                # the small blob's chunks follow its manifest (messages.py, mwant ``i``)
                for h in manifest.unique_chunks():
                    out.append(_chunk_reply(h, get_chunk, verify))
    return out


def _chunk_reply(h: bytes, get_chunk: Callable[[bytes], bytes | None],
                 verify: bool) -> BlobMessage:
    data = get_chunk(h)
    if data is None:
        return ChunkError(h, ERR_MISSING)
    if verify and blake3.blake3(data).digest() != h:
        return ChunkError(h, ERR_CORRUPT)
    return ChunkData(h, data)
