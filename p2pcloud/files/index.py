"""The local index of a synced folder: what this device last knew to be in sync, per path.

It is this device's own memory and is never synced: for each path, the version the disk
file matched (the *base* of :mod:`p2pcloud.files.model`), the stat the file had then (so a
rescan that finds the same size, mtime, mode and inode skips the file without reading it),
and the file's manifest (so its chunks can be served to peers and reused for other files
without hashing it again).

It is saved atomically (temp file, fsync, rename) as CBOR. If it is lost or corrupt the
folder starts from an empty index: every file is hashed once more, and a file that differs
from the replica becomes a conflict copy rather than being overwritten, so losing the index
costs time, never data.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import cbor2

from p2pcloud.blobs import Manifest, decode_manifest
from p2pcloud.errors import BadManifest, BlobError
from p2pcloud.files.disk import DiskStat
from p2pcloud.files.model import FileVersion

__all__ = ["INDEX_VERSION", "MAX_INDEX_BYTES", "IndexEntry", "LocalIndex"]

INDEX_VERSION: Final = 1
MAX_INDEX_BYTES: Final = 1 << 31
"""2 GiB: a million files with large manifests; a bigger file is not an index we wrote."""


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One path's base: the synced version, the file's stat then, and its manifest."""

    version: FileVersion
    stat: DiskStat
    manifest: Manifest


class LocalIndex:
    """Path -> IndexEntry, with lookups by blob and by chunk for serving and reuse."""

    def __init__(self) -> None:
        """Create an empty index."""
        self.entries: dict[str, IndexEntry] = {}
        self._chunk_map: dict[bytes, tuple[str, int, int]] | None = None
        self._blob_map: dict[bytes, Manifest] | None = None
        self.dirty = False

    def get(self, path: str) -> IndexEntry | None:
        """The base of ``path``, or None."""
        return self.entries.get(path)

    def put(self, path: str, entry: IndexEntry) -> None:
        """Record the base of ``path``."""
        old = self.entries.get(path)
        self.entries[path] = entry
        if old is not None:
            self._invalidate()  # the old file's chunks may be gone: rebuild the maps
            return
        # a new path only adds lookups: extend the maps instead of rebuilding them, so a
        # reconcile writing 10,000 files does not rebuild a 10,000-entry map per batch
        self.dirty = True
        if self._chunk_map is not None:
            pos = 0
            for ref in entry.manifest.chunks:
                self._chunk_map.setdefault(ref.hash, (path, pos, ref.size))
                pos += ref.size
        if self._blob_map is not None:
            self._blob_map.setdefault(entry.manifest.blob_hash, entry.manifest)

    def forget(self, path: str) -> None:
        """Drop the base of ``path`` (no-op if absent)."""
        if self.entries.pop(path, None) is not None:
            self._invalidate()

    def _invalidate(self) -> None:
        self._chunk_map = None
        self._blob_map = None
        self.dirty = True

    def manifest(self, blob_hash: bytes) -> Manifest | None:
        """The manifest of a blob some local file holds, or None."""
        if self._blob_map is None:
            self._blob_map = {e.manifest.blob_hash: e.manifest for e in self.entries.values()}
        return self._blob_map.get(blob_hash)

    def locate(self, chunk_hash: bytes) -> tuple[str, int, int] | None:
        """Where a local file holds a chunk: ``(path, offset, size)``, or None."""
        if self._chunk_map is None:
            cmap: dict[bytes, tuple[str, int, int]] = {}
            for path, e in self.entries.items():
                pos = 0
                for ref in e.manifest.chunks:
                    cmap.setdefault(ref.hash, (path, pos, ref.size))
                    pos += ref.size
            self._chunk_map = cmap
        return self._chunk_map.get(chunk_hash)

    def blobs(self) -> list[bytes]:
        """The blob hashes of every indexed file (what this device can serve)."""
        if self._blob_map is None:
            self.manifest(b"")
        assert self._blob_map is not None
        return sorted(self._blob_map)

    # -- persistence ---------------------------------------------------------------------

    def encode(self) -> bytes:
        """The CBOR encoding of the index."""
        rows = {
            path: [e.version.blob, e.version.size, e.version.mtime_ns, e.version.mode,
                   e.version.device, e.stat.size, e.stat.mtime_ns, e.stat.mode, e.stat.ino,
                   e.manifest.encoded]
            for path, e in self.entries.items()
        }
        return cbor2.dumps({"v": INDEX_VERSION, "e": rows})

    @classmethod
    def decode(cls, data: bytes) -> LocalIndex:
        """Decode an index.

        Raises:
            BlobError: the bytes are not an index of this version (the caller starts empty).
        """
        try:
            obj = cbor2.loads(data)
        except Exception as exc:  # cbor2 raises several types on bad input
            raise BlobError("index is not CBOR") from exc
        if not isinstance(obj, dict) or obj.get("v") != INDEX_VERSION:
            raise BlobError("not an index of a known version")
        rows = obj.get("e")
        if not isinstance(rows, dict):
            raise BlobError("index entries missing")
        out = cls()
        for path, row in rows.items():
            out.entries[path] = _entry(path, row)
        return out

    def save(self, path: Path) -> None:
        """Write the index atomically (temp file, fsync, rename) and clear ``dirty``."""
        data = self.encode()
        tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.dirty = False

    @classmethod
    def load(cls, path: Path) -> LocalIndex:
        """Read an index file; an empty index if it is missing.

        Raises:
            BlobError: the file is corrupt or too large.
        """
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return cls()
        if size > MAX_INDEX_BYTES:
            raise BlobError("index file too large")
        return cls.decode(path.read_bytes())


def _entry(path: Any, row: Any) -> IndexEntry:
    if not isinstance(path, str) or not isinstance(row, list) or len(row) != 10:
        raise BlobError("malformed index entry")
    blob, size, mtime, mode, device, st_size, st_mtime, st_mode, st_ino, man = row
    ints = (size, mtime, mode, st_size, st_mtime, st_mode, st_ino)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ints):
        raise BlobError("malformed index entry")
    if not isinstance(blob, bytes) or not isinstance(device, str) or not isinstance(man, bytes):
        raise BlobError("malformed index entry")
    try:
        manifest = decode_manifest(man, blob)
    except BadManifest as exc:
        raise BlobError("index entry with a bad manifest") from exc
    return IndexEntry(FileVersion(blob, size, mtime, mode, device),
                      DiskStat(st_size, st_mtime, st_mode, st_ino), manifest)
