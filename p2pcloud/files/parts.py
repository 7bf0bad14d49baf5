"""Part files: remote content written straight into the folder as its chunks arrive.

Theory of operation
-------------------
A blob that a synced folder needs (a remote version whose chunks are not here) is written
into a *part file* ``.p2pcloud-part-<blob hash hex>`` in the directory of the path that
needs it (so creating many and renaming them into place spreads over the directories
instead of queueing on the root's lock: 2-3x faster for a burst of small files here), at
the offsets its manifest gives, chunk by chunk, as the node's blob engine verifies them.
When every chunk is in, the folder *adopts* the part file as the temporary file of its
atomic write (mode, mtime, fsync, then ``rename`` over the path after the usual "is the
file still as the decision saw it" check, :mod:`p2pcloud.files.disk`): the content
crosses the disk once, and never goes through the node's LMDB chunk store (which would
write it a second time and map it into the process).

* **Nothing is trusted after a restart.** Part files are not fsynced while they fill; a
  crash can leave any mixture of written, stale and zero bytes. A part file found on disk
  is therefore re-verified before use (every chunk at its first offset is read and its
  BLAKE3 compared): what verifies is held, the rest is fetched again. The part file *is*
  the resume state; nothing else is saved.
* **Never a half-written file at a path.** A part file lives under our internal prefix
  (never synced, never taken for a user file) until its rename, which happens only after
  the fsync of the complete content.
* **Only blobs the folder asked for.** The folder registers the blobs it reported missing
  (:meth:`PartFiles.expect`); a chunk of any other blob is refused here and goes to the
  node's chunk store as before.
* **Threads.** The blob engine writes from a few writer threads while a reconcile reads
  and adopts from another: one lock guards the registry (never held during I/O), one per
  part file its creation. Only a large part file keeps a descriptor open while it fills
  (at most MAX_KEPT_FDS at once): a folder may wait for thousands of blobs at once.
"""

from __future__ import annotations

import contextlib
import os
import stat as stat_mod
import threading
from pathlib import Path
from typing import Final

import blake3

from p2pcloud.blobs import Manifest
from p2pcloud.errors import UnsafePath
from p2pcloud.files import disk
from p2pcloud.files.paths import PART_PREFIX

__all__ = ["MAX_EXPECTED_BLOBS", "PART_PREFIX", "PartFiles", "part_name"]

MAX_EXPECTED_BLOBS: Final = 1_000_000
"""Blobs one folder may wait for at once (a million new files); beyond it a blob simply goes
through the chunk store, so the registry cannot grow without bound."""

KEEP_FD_CHUNKS: Final = 16
"""A part of at least this many chunks keeps one descriptor open while it fills (an open per
chunk of a 1 GiB file is ~13,000 opens); smaller ones open per write."""
MAX_KEPT_FDS: Final = 32  # descriptors kept open at once, far below any ulimit
WRITEBACK_BYTES: Final = 8 * 1024 * 1024
"""A large part file asks the kernel to start writing back every this many bytes written
(``posix_fadvise(DONTNEED)`` on the fresh range starts the writeback of its dirty pages and
returns; pages not yet written back stay cached). Without it a 1 GiB file sat dirty in the
page cache and its adoption's fsync wrote it all at the end (~0.3 s of waiting on the
critical path here); with it that fsync finds a few MiB left. Durability is unchanged: the
fsync before the rename is still what makes the file safe."""
_FADV_DONTNEED: Final = getattr(os, "POSIX_FADV_DONTNEED", None)

_O_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)
_O_BINARY: Final = getattr(os, "O_BINARY", 0)


def part_name(blob: bytes) -> str:
    """The file name of a blob's part file (in the directory of the path that needs it)."""
    return PART_PREFIX + blob.hex()


class _Part:
    """One blob being written: where each chunk goes, which are in."""

    __slots__ = ("claimed", "dirty_hi", "dirty_lo", "fd", "fd_users", "held", "lock",
                 "manifest", "offsets", "path", "ready", "rel", "sizes", "unflushed")

    def __init__(self, manifest: Manifest, rel: str) -> None:
        self.manifest = manifest
        self.rel = rel  # the path that needs the blob: its directory holds the part file
        self.path = Path()  # set when the file is made (ready)
        self.offsets: dict[bytes, list[int]] = {}
        self.sizes: dict[bytes, int] = {}
        pos = 0
        for ref in manifest.chunks:
            self.offsets.setdefault(ref.hash, []).append(pos)
            self.sizes[ref.hash] = ref.size
            pos += ref.size
        self.held: set[bytes] = set()
        self.claimed = False
        self.ready = False  # the file exists (created, or resumed and verified)
        self.lock = threading.Lock()  # creation and resume of the file, its shared fd
        self.fd: int | None = None  # kept open while a large part fills (KEEP_FD_CHUNKS)
        self.fd_users = 0
        # bytes written through the kept fd since the last writeback hint, and their range
        self.unflushed = 0
        self.dirty_lo = 0
        self.dirty_hi = 0

    def complete(self) -> bool:
        return len(self.held) == len(self.offsets)


class PartFiles:
    """The part files of one folder (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        """Track part files in ``root`` (nothing is read or written yet).

        Args:
            root: the folder root.
        """
        self.root = Path(root)
        self._lock = threading.Lock()
        self._parts: dict[bytes, _Part] = {}
        self._by_chunk: dict[bytes, bytes] = {}  # chunk hash -> a blob whose part holds it
        self._expected: dict[bytes, str] = {}  # blob -> a path that needs it
        self._kept = 0  # parts holding a descriptor (guarded by _lock)

    # -- registration (reconcile thread) --------------------------------------------------

    def expect(self, blob: bytes, rel: str) -> None:
        """The folder needs ``blob`` at ``rel``: its chunks may be written here when they
        arrive (into a part file in the directory of ``rel``)."""
        with self._lock:
            if blob in self._expected or len(self._expected) < MAX_EXPECTED_BLOBS:
                self._expected.setdefault(blob, rel)

    def open(self, manifest: Manifest, rel: str) -> None:
        """Start or resume the part file of a blob the folder needs at ``rel`` (idempotent).

        A part file already on disk is re-verified chunk by chunk; what verifies is held.

        Raises:
            OSError: the part file cannot be created or read.
            UnsafePath: a directory on the way to ``rel`` is a symlink or not a directory.
        """
        with self._lock:
            self._expected.setdefault(manifest.blob_hash, rel)
            part = self._register_locked(manifest)
        self._prepare(part)

    def _register_locked(self, manifest: Manifest) -> _Part:
        blob = manifest.blob_hash
        part = self._parts.get(blob)
        if part is None:
            part = self._parts[blob] = _Part(manifest, self._expected[blob])
        return part

    def _part_path(self, part: _Part) -> Path:
        # the target's directory, made if missing, never through a symlink (disk.resolve);
        # two writer threads making the same directory at once: the second one looks again
        try:
            target = disk.resolve(self.root, part.rel, create_dirs=True)
        except FileExistsError:
            target = disk.resolve(self.root, part.rel, create_dirs=True)
        return target.parent / part_name(part.manifest.blob_hash)

    def _prepare(self, part: _Part, first: tuple[bytes, bytes] | None = None) -> bool:
        """Create the part file, or adopt and re-verify one left by an earlier run.

        Args:
            part: the part.
            first: a chunk ``(hash, data)`` to write while the new file is open (a small
                blob is one chunk: create and write it with one open).

        Returns:
            Whether ``first`` was written.
        """
        with part.lock:
            if part.ready:
                return False
            try:
                part.path = self._part_path(part)
                held = self._create_or_resume(part, first)
            except (OSError, UnsafePath):
                with self._lock:
                    if self._parts.get(part.manifest.blob_hash) is part:
                        del self._parts[part.manifest.blob_hash]
                raise
            part.ready = True
        blob = part.manifest.blob_hash
        with self._lock:
            part.held |= held
            for h in held:
                self._by_chunk.setdefault(h, blob)
        return first is not None and first[0] in held

    @staticmethod
    def _create_or_resume(part: _Part, first: tuple[bytes, bytes] | None) -> set[bytes]:
        held: set[bytes] = set()
        size = part.manifest.size
        try:
            fd = os.open(part.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_BINARY,
                         0o600)
        except FileExistsError:
            fd = os.open(part.path, os.O_RDWR | _O_NOFOLLOW | _O_BINARY)
            try:
                if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
                    raise OSError(f"{part.path.name} is not a regular file") from None
                # a leftover of an earlier run: keep what still verifies (module docstring)
                for h, offsets in part.offsets.items():
                    n = part.sizes[h]
                    data = os.pread(fd, n, offsets[0])
                    if len(data) == n and blake3.blake3(data).digest() == h:
                        held.add(h)
                        for off in offsets[1:]:
                            os.pwrite(fd, data, off)
            except BaseException:
                os.close(fd)
                raise
        else:
            if first is not None:
                try:
                    _pwrite_all(fd, first[1], part.offsets[first[0]])
                except BaseException:
                    os.close(fd)
                    raise
                held.add(first[0])
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)  # sparse: the holes are the chunks still to come
        finally:
            os.close(fd)
        return held

    # -- filling (the blob engine's writer threads) ---------------------------------------

    def write(self, manifest: Manifest, chunk_hash: bytes, data: bytes) -> bool:
        """Write a verified chunk of ``manifest``'s blob at each of its offsets.

        Several threads may write at once (different chunks, or different blobs).

        Args:
            manifest: the blob's manifest (the chunk was verified against it).
            chunk_hash: the chunk's hash.
            data: its bytes.

        Returns:
            True if the chunk is now in the blob's part file; False if the folder does not
            wait for this blob, the part is being adopted, or the disk refused (the caller
            keeps the chunk elsewhere).
        """
        blob = manifest.blob_hash
        with self._lock:
            part = self._parts.get(blob)
            if part is None:
                if blob not in self._expected:
                    return False
                part = self._register_locked(manifest)
            if part.claimed:
                return False
            if chunk_hash in part.held:
                return True
            offsets = part.offsets.get(chunk_hash)
            if offsets is None or len(data) != part.sizes[chunk_hash]:
                return False
        try:
            if self._prepare(part, (chunk_hash, data)):
                return True  # written by the creation itself
            fd, shared = self._acquire_fd(part)
        except (OSError, UnsafePath):
            return False
        try:
            _pwrite_all(fd, data, offsets)
            if shared:
                self._start_writeback(part, fd, offsets, len(data))
        except OSError:
            return False
        finally:
            if shared:
                self._release_fd(part)
            else:
                os.close(fd)
        with self._lock:
            part.held.add(chunk_hash)
            self._by_chunk.setdefault(chunk_hash, blob)
            done = part.complete()
        if done:
            self._release_fd(part, use=False)
        return True

    @staticmethod
    def _start_writeback(part: _Part, fd: int, offsets: list[int], size: int) -> None:
        """Every WRITEBACK_BYTES written to a large part, start the kernel's writeback of them."""
        if _FADV_DONTNEED is None:
            return  # not a POSIX system with fadvise: the adoption's fsync writes it all
        with part.lock:
            lo, hi = min(offsets), max(offsets) + size
            if part.unflushed:
                lo, hi = min(lo, part.dirty_lo), max(hi, part.dirty_hi)
            part.unflushed += size * len(offsets)
            if part.unflushed < WRITEBACK_BYTES:
                part.dirty_lo, part.dirty_hi = lo, hi
                return
            part.unflushed = 0
        # outside the lock: it submits I/O. Only a hint, so a refusal changes nothing.
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, lo, hi - lo, _FADV_DONTNEED)

    def _acquire_fd(self, part: _Part) -> tuple[int, bool]:
        """A descriptor to write ``part``: its kept one (shared) or a fresh one."""
        with part.lock:
            if part.fd is not None:
                part.fd_users += 1
                return part.fd, True
            keep = False
            if len(part.offsets) >= KEEP_FD_CHUNKS and not part.claimed:
                with self._lock:
                    if self._kept < MAX_KEPT_FDS:
                        self._kept += 1
                        keep = True
            try:
                fd = os.open(part.path, os.O_WRONLY | _O_NOFOLLOW | _O_BINARY)
            except BaseException:
                if keep:
                    with self._lock:
                        self._kept -= 1
                raise
            if keep:
                part.fd, part.fd_users = fd, 1
            return fd, keep

    def _release_fd(self, part: _Part, *, use: bool = True) -> None:
        """End one use of the kept descriptor (``use``), and close it once nobody uses it
        and the part is complete, claimed or forgotten."""
        with part.lock:
            if part.fd is None:
                return
            if use:
                part.fd_users -= 1
            if part.fd_users or not (part.complete() or part.claimed):
                return
            fd, part.fd = part.fd, None
            with contextlib.suppress(OSError):
                os.close(fd)
        with self._lock:
            self._kept -= 1

    # -- reading (serving peers, writing other files) -------------------------------------

    def has(self, chunk_hash: bytes) -> bool:
        """Whether a part file holds this chunk."""
        with self._lock:
            return chunk_hash in self._by_chunk

    def read_chunk(self, chunk_hash: bytes) -> bytes | None:
        """A chunk read back from a part file, verified; None if not here."""
        with self._lock:
            blob = self._by_chunk.get(chunk_hash)
            part = self._parts.get(blob) if blob is not None else None
            if part is None:
                return None
            path = part.path
            offset = part.offsets[chunk_hash][0]
            size = part.sizes[chunk_hash]
        data = disk.read_range(path, offset, size)
        if data is None or blake3.blake3(data).digest() != chunk_hash:
            return None
        return data

    def complete(self, blob: bytes) -> bool:
        """Whether the part file of ``blob`` holds every chunk and is not being adopted."""
        with self._lock:
            part = self._parts.get(blob)
            return part is not None and not part.claimed and part.complete()

    # -- adoption (reconcile thread) ------------------------------------------------------

    def claim(self, blob: bytes) -> Path | None:
        """Take a complete part file for adoption (no more writes go to it).

        Its chunks stay readable through :meth:`read_chunk` until :meth:`finished`, so
        other paths with the same content can be written from it meanwhile.

        Returns:
            The part file's path, or None if it is not complete or already claimed.
        """
        with self._lock:
            part = self._parts.get(blob)
            if part is None or part.claimed or not part.complete():
                return None
            part.claimed = True
            return part.path

    def unclaim(self, blob: bytes) -> None:
        """Give a claimed part file back (it could not be renamed: it is copied instead)."""
        with self._lock:
            part = self._parts.get(blob)
            if part is not None:
                part.claimed = False

    def finished(self, blob: bytes, *, renamed: bool) -> None:
        """An adoption ended: the part file was renamed into place, or it failed.

        Args:
            blob: the claimed blob.
            renamed: True if the file is now at its path (forget the part); False if the
                adoption failed (the part file stays, verified again when next opened).
        """
        with self._lock:
            part = self._parts.pop(blob, None)
            if part is None:
                return
            if renamed:
                self._expected.pop(blob, None)
            for h in part.offsets:
                if self._by_chunk.get(h) == blob:
                    del self._by_chunk[h]

    def drop(self, blob: bytes) -> None:
        """Forget and delete the part file of a blob that was written another way (its
        chunks were mostly in other local files)."""
        with self._lock:
            self._expected.pop(blob, None)
            part = self._parts.get(blob)
            if part is None or part.claimed:
                return
            del self._parts[blob]
            part.claimed = True  # no more writes
            for h in part.offsets:
                if self._by_chunk.get(h) == blob:
                    del self._by_chunk[h]
        self._release_fd(part, use=False)
        with contextlib.suppress(OSError):
            os.unlink(part.path)

    def prune(self, keep: set[bytes], found: list[str]) -> int:
        """Delete the part files of blobs the folder no longer needs.

        Call after a full reconcile with every blob it reported missing and every part file
        its walk saw.

        Args:
            keep: blobs still needed.
            found: relative paths of the part files in the folder (``disk.walk_files``).

        Returns:
            How many part files were deleted.
        """
        forgotten: list[_Part] = []
        with self._lock:
            self._expected = {b: r for b, r in self._expected.items() if b in keep}
            for blob in [b for b, p in self._parts.items() if b not in keep and not p.claimed]:
                part = self._parts.pop(blob)
                part.claimed = True  # no more writes
                forgotten.append(part)
                for h in part.offsets:
                    if self._by_chunk.get(h) == blob:
                        del self._by_chunk[h]
            registered = {b: p.path for b, p in self._parts.items() if p.ready}
        for part in forgotten:
            self._release_fd(part, use=False)  # outside _lock: part.lock comes first
        removed = 0
        for rel in found:
            name = rel.rpartition("/")[2]
            try:
                blob = bytes.fromhex(name[len(PART_PREFIX):])
            except ValueError:
                blob = b""
            path = self.root / rel
            if blob in keep and registered.get(blob, path) == path:
                continue  # still needed (and not a stray copy in another directory)
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed += 1
        return removed


def _pwrite_all(fd: int, data: bytes, offsets: list[int]) -> None:
    for off in offsets:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, off)
            view = view[n:]
            off += n
