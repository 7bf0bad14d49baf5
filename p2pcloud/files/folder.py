"""A synced folder: the scanner and the applier around the pure decisions of model.py.

Theory of operation
-------------------
A :class:`Folder` binds a directory on disk to the ``"files"`` collection of one sub-cloud
replica (:mod:`p2pcloud.files.model` has the mapping and the rules). One method does the
work, :meth:`Folder.reconcile`, in four steps over the paths it is asked about (all of them,
or the few a watcher event or a remote delta named):

1. *Look*: stat each path; a file whose stat equals its index entry is UNCHANGED and is
   not read; only a changed or new file is hashed (chunked, BLAKE3).
2. *Publish*: :func:`plan_publish` turns local changes and conflicts into replica writes,
   made in one local transaction whose delta is returned for the node to sign and send.
3. *Apply*: :func:`plan_disk` turns the replica's winners into disk actions: atomic writes
   (chunks come from local files first, then from the plugged chunk source), metadata
   updates, deletes. New files are written before old ones are deleted, so a rename on the
   other device becomes a write whose chunks are read from the old file here: no data is
   fetched. A file whose chunks are not here yet is left alone and reported as missing.
4. *Remember*: the index is updated and saved.

The folder is synchronous (it does disk I/O); the node runs it in a worker thread, one call
at a time per folder, and owns the replica: it applies remote deltas, then calls
:meth:`reconcile` with the changed paths (:func:`paths_from_changes`).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import blake3

from p2pcloud.blobs import Manifest
from p2pcloud.errors import BlobError, CoreUsageError, UnsafePath
from p2pcloud.files import disk
from p2pcloud.files.disk import DiskStat, FileBusy, NotAFile
from p2pcloud.files.index import IndexEntry, LocalIndex
from p2pcloud.files.model import (
    ABSENT,
    COLLECTION,
    FIELD,
    UNCHANGED,
    AdoptBase,
    Conflict,
    DeleteFile,
    FileVersion,
    ForgetBase,
    LocalView,
    RemoveDoc,
    ReplicaWrite,
    SetMeta,
    SetVersion,
    WriteFile,
    distinct_versions,
    list_conflicts,
    plan_disk,
    plan_publish,
)
from p2pcloud.files.parts import PartFiles
from p2pcloud.files.paths import normalize_relpath, parse_conflict_name, safe_device_label

__all__ = [
    "BlobMissing",
    "ConflictCopied",
    "FileDeleted",
    "FileEvent",
    "FilePublished",
    "FileRenamed",
    "FileSkipped",
    "FileWritten",
    "Folder",
    "PathRefused",
    "ReconcileResult",
    "paths_from_changes",
]

MAX_PATHS_PER_CALL: Final = 1_000_000  # paths one reconcile looks at; a folder of a million files
WRITE_BATCH: Final = 256
"""Remote files written per batch (temp files, one parallel fsync, renames): amortises the
journal commit over many small files; bounded so open descriptors stay far below ulimits."""


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FilePublished:
    """A local change went into the replica (``reason``: created, modified, metadata,
    recreated, deleted, conflict-winner, conflict-copy)."""

    path: str
    reason: str


@dataclass(frozen=True, slots=True)
class FileRenamed:
    """A local delete and create of the same blob in one scan: a rename (no data re-sent)."""

    old: str
    new: str


@dataclass(frozen=True, slots=True)
class FileWritten:
    """A remote version was written to disk (``metadata_only``: just mode and mtime)."""

    path: str
    metadata_only: bool


@dataclass(frozen=True, slots=True)
class FileDeleted:
    """A file deleted remotely was deleted here."""

    path: str


@dataclass(frozen=True, slots=True)
class ConflictCopied:
    """Two versions competed at ``path``; the other one now lives at ``copy``."""

    path: str
    copy: str
    device: str


@dataclass(frozen=True, slots=True)
class PathRefused:
    """A path was not synced: unsafe name, symlink on the way, not a regular file."""

    path: str
    reason: str


@dataclass(frozen=True, slots=True)
class FileSkipped:
    """A path was left for the next reconcile (changed while read, I/O error)."""

    path: str
    reason: str


@dataclass(frozen=True, slots=True)
class BlobMissing:
    """A remote version cannot be written yet: its manifest or some chunks are not here.

    ``manifest`` is None when the manifest itself is missing (fetch it by ``blob``);
    otherwise ``chunks`` lists the chunk hashes to fetch (:class:`p2pcloud.blobs.BlobFetch`).
    """

    path: str
    blob: bytes
    manifest: Manifest | None
    chunks: tuple[bytes, ...]


FileEvent = (FilePublished | FileRenamed | FileWritten | FileDeleted | ConflictCopied
             | PathRefused | FileSkipped | BlobMissing)


@dataclass(slots=True)
class ReconcileResult:
    """What one reconcile did: the delta to send, the events, the blobs still missing."""

    delta: bytes = b""
    events: list[FileEvent] = field(default_factory=list)
    missing: dict[bytes, BlobMissing] = field(default_factory=dict)
    hashed_files: int = 0
    hashed_bytes: int = 0


def paths_from_changes(changes: Iterable[tuple[str, str | None, str | None]]) -> list[str]:
    """The folder paths a ``Replica.apply`` change report touched (for :meth:`reconcile`).

    Args:
        changes: ``(collection, document, field)`` triples.

    Returns:
        The document ids of the ``"files"`` collection, in order, once each.
    """
    return list(dict.fromkeys(doc for coll, doc, _ in changes
                              if coll == COLLECTION and doc is not None))


def _under(known: list[str], prefix: str) -> Iterator[str]:
    """The entries of the sorted list ``known`` that start with ``prefix``."""
    for i in range(bisect.bisect_left(known, prefix), len(known)):
        if not known[i].startswith(prefix):
            return
        yield known[i]


def _no_chunk(_h: bytes) -> bytes | None:
    return None


def _no_manifest(_h: bytes) -> Manifest | None:
    return None


class Folder:
    """One directory synced with the ``"files"`` collection of a replica."""

    def __init__(
        self,
        root: Path,
        replica: Any,
        *,
        device: str,
        index_path: Path,
        chunks: Callable[[bytes], bytes | None] = _no_chunk,
        manifests: Callable[[bytes], Manifest | None] = _no_manifest,
        has_chunk: Callable[[bytes], bool] | None = None,
    ) -> None:
        """Open a folder.

        Args:
            root: the directory (must exist).
            replica: the sub-cloud's ``p2pcloud._core.Replica``; the folder opens and
                commits its own transactions in it.
            device: this device's label, the author of its versions (used in conflict
                names; reduced to ``[A-Za-z0-9_-]``).
            index_path: where to keep the local index (outside the folder, e.g. the node's
                data directory).
            chunks: the chunk source for remote content that no local file holds (the
                node's chunk store, filled by blob fetches).
            manifests: the manifest source for blobs no local file holds.
            has_chunk: whether ``chunks`` holds a chunk, without reading it (defaults to
                calling ``chunks``).

        Raises:
            NotADirectoryError: ``root`` is not a directory.
        """
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(str(root))
        self.replica = replica
        self.device = safe_device_label(device)
        self.index_path = Path(index_path)
        self._chunks = chunks
        self._manifests = manifests
        self._has_chunk = has_chunk or (lambda h: chunks(h) is not None)
        self.parts = PartFiles(self.root)
        """Remote content being written straight into the folder as it arrives (parts.py)."""
        self._checked: set[str] = set()
        self._found_parts: list[str] | None = None  # part files a full walk saw
        self._stats: dict[str, DiskStat] = {}
        self.unsent_deltas: list[bytes] = []
        """Deltas of a reconcile that raised after writing (a bug or a dying disk): the
        node sends them like ``ReconcileResult.delta``."""
        try:
            self.index = LocalIndex.load(self.index_path)
            self.index_recovered = False
        except BlobError:
            # a corrupt index only costs a rehash: see index.py
            self.index = LocalIndex()
            self.index_recovered = True

    # -- reading the replica -----------------------------------------------------------------

    def versions(self, path: str) -> list[FileVersion]:
        """The distinct versions the replica holds for ``path`` (oldest first)."""
        raw = self.replica.get(COLLECTION, path, FIELD, ())
        return distinct_versions(raw if isinstance(raw, tuple) else (raw,))

    def _winner(self, path: str) -> FileVersion | None:
        vs = self.versions(path)
        return vs[-1] if vs else None

    def conflicts(self) -> list[Conflict]:
        """Every conflict in the folder (conflict copies, and unsplit concurrent values)."""
        return list_conflicts(self.replica.documents(COLLECTION), self.versions)

    def resolve_conflict(self, copy: str, *, keep_copy: bool = False,
                         now_ms: int | None = None) -> bytes:
        """Settle a conflict from the CLI or API, then :meth:`reconcile` updates the disk.

        Args:
            copy: the conflict copy's path (``Conflict.copy``).
            keep_copy: False discards the copy's version; True makes it the file's version
                (it replaces the winner at the original path) and removes the copy.
            now_ms: the time for the replica transaction (defaults to the wall clock).

        Returns:
            The delta to send.

        Raises:
            UnsafePath: ``copy`` is not a conflict copy of this folder.
        """
        parsed = parse_conflict_name(copy)
        versions = self.versions(copy)
        if parsed is None or not versions:
            raise UnsafePath(f"{copy!r} is not a conflict copy here")
        self.replica.begin(now_ms if now_ms is not None else time.time_ns() // 1_000_000)
        try:
            if keep_copy:
                self.replica.set_mv(COLLECTION, parsed.original, FIELD, versions[-1].to_value())
            self.replica.remove(COLLECTION, copy)
        finally:
            delta: bytes = self.replica.commit()
        return delta

    # -- serving -----------------------------------------------------------------------------

    def manifest(self, blob_hash: bytes) -> Manifest | None:
        """The manifest of a blob a local file holds (to answer a peer's ``mwant``)."""
        return self.index.manifest(blob_hash)

    def read_chunk(self, chunk_hash: bytes) -> bytes | None:
        """A chunk read from the local file (or part file) that holds it, verified; None if
        not here."""
        where = self.index.locate(chunk_hash)
        if where is None:
            return self.parts.read_chunk(chunk_hash)
        path, offset, size = where
        try:
            data = disk.read_range(disk.resolve(self.root, path), offset, size)
        except (OSError, UnsafePath):
            data = None
        if data is None or blake3.blake3(data).digest() != chunk_hash:
            # the file changed since it was indexed (the next scan re-indexes it)
            return self.parts.read_chunk(chunk_hash)
        return data

    def write_part(self, manifest: Manifest, chunk_hash: bytes, data: bytes) -> bool:
        """Write a verified chunk straight into the part file of a blob this folder waits
        for (called by the node's blob engine, from its writer thread).

        Args:
            manifest: the blob's manifest (the chunk was verified against it).
            chunk_hash: the chunk's hash.
            data: its bytes.

        Returns:
            Whether the chunk is now on disk here; if False, keep it in the chunk store.
        """
        return self.parts.write(manifest, chunk_hash, data)

    def blobs(self) -> list[bytes]:
        """The blob hashes local files hold (for ``have`` announcements)."""
        return self.index.blobs()

    # -- the work ----------------------------------------------------------------------------

    def reconcile(self, paths: Iterable[str] | None = None, *, now_ms: int | None = None
                  ) -> ReconcileResult:
        """Scan, publish local changes, apply remote ones, for all paths or some.

        Args:
            paths: relative POSIX paths (files or directories) to look at; None for the
                whole folder. Paths of the replica's change report and of watcher events go
                here.
            now_ms: the time for the replica transaction (defaults to the wall clock).

        Returns:
            The delta to send (``b""`` if nothing was written), the events, and the blobs
            whose data is still missing.
        """
        result = ReconcileResult()
        self._found_parts = [] if paths is None else None
        self._checked = set()  # directories verified during this pass (disk.resolve)
        self._stats = {}  # the stat each path had when it was looked at
        disk_now = self._collect(paths, result)
        locals_: dict[str, LocalView] = {}
        manifests: dict[str, Manifest] = {}
        for path, seen in disk_now.items():
            view = self._local_view(path, seen, manifests, result)
            if view is not None:
                locals_[path] = view
        # -- publish
        when = now_ms if now_ms is not None else time.time_ns() // 1_000_000
        self.replica.begin(when)
        try:
            written: list[ReplicaWrite] = []
            remote: dict[str, list[FileVersion]] = {}
            for path, view in locals_.items():
                base = self.index.get(path)
                vs = remote[path] = self.versions(path)
                if view is UNCHANGED and len(vs) <= 1:
                    continue  # plan_publish writes nothing then: the common case of a rescan
                writes = plan_publish(path, base.version if base else None, view, vs,
                                      self._winner)
                for w in writes:
                    try:
                        self._write(w)
                    except CoreUsageError as exc:  # the core refused the name or value
                        result.events.append(PathRefused(w.path, str(exc)))
                        continue
                    remote.pop(w.path, None)  # changed: read it again below
                    written.append(w)
        except BaseException:
            # writes already made must reach a delta, or the replica would hold dots that
            # no delta carries: keep it for the node (unsent_deltas), then re-raise
            delta = self.replica.commit()
            if delta:
                self.unsent_deltas.append(delta)
            raise
        result.delta = self.replica.commit()
        self._report_writes(written, result)
        # -- apply: copies created above are new paths too
        for w in written:
            if isinstance(w, SetVersion) and w.path not in locals_:
                copy_seen = disk.stat_path(self.root, w.path, self._checked)
                if isinstance(copy_seen, NotAFile):
                    result.events.append(PathRefused(w.path, copy_seen.kind))
                    continue
                view = self._local_view(w.path, copy_seen, manifests, result)
                if view is not None:
                    locals_[w.path] = view
        # order: new files first, then replacements, then deletes, so that the old content
        # of a file being replaced or deleted is still there to read chunks from (a
        # conflict copy of this device's version, a rename's target)
        stages: tuple[list[tuple[str, Any]], ...] = ([], [], [])
        for path, view in locals_.items():
            base = self.index.get(path)
            vs = remote[path] if path in remote else self.versions(path)
            action = plan_disk(base.version if base else None, view, vs[-1] if vs else None)
            if action is None:
                continue
            stage = (2 if isinstance(action, (DeleteFile, ForgetBase))
                     else 0 if view is ABSENT else 1)
            stages[stage].append((path, action))
        dirty_dirs: set[Path] = set()
        for stage_actions in stages:
            to_write: list[tuple[str, FileVersion]] = []
            for path, action in stage_actions:
                if isinstance(action, WriteFile):
                    to_write.append((path, action.version))
                else:
                    self._act(path, locals_[path], action, manifests, result, dirty_dirs)
            for i in range(0, len(to_write), WRITE_BATCH):
                self._write_batch(to_write[i:i + WRITE_BATCH], locals_, manifests, result,
                                  dirty_dirs)
        # the disk first, then the index: an index must never claim what a crash undid
        disk.sync_dirs(dirty_dirs)
        if self.index.dirty:
            self.index.save(self.index_path)
        if self._found_parts is not None:
            # a full pass knows every blob still missing: other part files are leftovers
            self.parts.prune(set(result.missing), self._found_parts)
        return result

    # -- steps -------------------------------------------------------------------------------

    def _collect(self, paths: Iterable[str] | None, result: ReconcileResult
                 ) -> dict[str, DiskStat | None]:
        """The paths to look at, each with its stat (None: no file); unsafe ones refused."""
        found: dict[str, DiskStat | NotAFile | None] = {}
        if paths is None:
            for rel, st in disk.walk_files(self.root, parts=self._found_parts):
                found[rel] = st
            for rel in self.index.entries:
                found.setdefault(rel, None)
            for rel in self.replica.documents(COLLECTION):
                found.setdefault(rel, None)
        else:
            known: list[str] | None = None  # index paths and documents, sorted (prefix lookups)
            for p in paths:
                if not p:
                    return self._collect(None, result)
                try:
                    normalize_relpath(p)  # before the disk is touched, even by a stat
                except UnsafePath as exc:
                    result.events.append(PathRefused(p, str(exc)))
                    continue
                pst = disk.stat_path(self.root, p, self._checked)
                if known is None:
                    # one sorted list per call, then a bisection per path: scanning every
                    # entry per path made an incremental pass over 10,000 paths quadratic
                    docs = self.replica.documents(COLLECTION)
                    known = sorted(set(self.index.entries) | set(docs))
                prefix = p + "/"
                if isinstance(pst, NotAFile) and pst.kind == "directory":
                    for rel, wst in disk.walk_files(self.root, p):
                        found[rel] = wst
                    for rel in _under(known, prefix):
                        if rel not in found:
                            # not on disk under p (deleted), or unsafe: refused below,
                            # before any stat
                            found[rel] = None
                else:
                    found[p] = pst
                    for rel in _under(known, prefix):  # a directory that was deleted
                        if rel in self.index.entries:
                            found.setdefault(rel, None)
                if len(found) > MAX_PATHS_PER_CALL:
                    break
        out: dict[str, DiskStat | None] = {}
        for rel, fst in found.items():
            try:
                normalize_relpath(rel)
            except UnsafePath as exc:
                result.events.append(PathRefused(rel, str(exc)))
                continue
            if isinstance(fst, NotAFile):
                # a directory or symlink where a file is (or was): never written through
                if self.index.get(rel) is not None or self.versions(rel):
                    result.events.append(PathRefused(rel, fst.kind))
                continue
            out[rel] = fst
        return out

    def _local_view(self, path: str, seen: DiskStat | None, manifests: dict[str, Manifest],
                    result: ReconcileResult) -> LocalView | None:
        """UNCHANGED / ABSENT / the file's new version; None to skip the path this time."""
        base = self.index.get(path)
        if seen is None:
            return ABSENT
        self._stats[path] = seen
        if base is not None:
            if seen == base.stat:
                return UNCHANGED
            b = base.stat
            if (seen.size, seen.mtime_ns, seen.ino) == (b.size, b.mtime_ns, b.ino):
                # chmod only: the content is what the index says, no need to read it
                manifests[path] = base.manifest
                v = base.version
                return FileVersion(v.blob, v.size, seen.mtime_ns, seen.mode, self.device)
        try:
            manifest, st = disk.hash_file(disk.resolve(self.root, path, checked=self._checked))
        except FileBusy as exc:
            result.events.append(FileSkipped(path, str(exc)))
            return None
        except (OSError, UnsafePath) as exc:
            result.events.append(FileSkipped(path, f"cannot read: {exc}"))
            return None
        self._stats[path] = st
        result.hashed_files += 1
        result.hashed_bytes += manifest.size
        manifests[path] = manifest
        return FileVersion(manifest.blob_hash, manifest.size, st.mtime_ns, st.mode, self.device)

    def _write(self, w: ReplicaWrite) -> None:
        if isinstance(w, SetVersion):
            self.replica.set_mv(COLLECTION, w.path, FIELD, w.version.to_value())
        else:
            self.replica.remove(COLLECTION, w.path)

    def _report_writes(self, written: list[ReplicaWrite], result: ReconcileResult) -> None:
        removed = {w.path for w in written if isinstance(w, RemoveDoc)}
        created = [w for w in written if isinstance(w, SetVersion) and w.reason == "created"]
        renamed_old: set[str] = set()
        renamed_new: set[str] = set()
        for c in created:
            for old in sorted(removed - renamed_old):
                base = self.index.get(old)
                if base is not None and base.version.same_content(c.version):
                    result.events.append(FileRenamed(old, c.path))
                    renamed_old.add(old)
                    renamed_new.add(c.path)
                    break
        for w in written:
            if w.path in renamed_old or w.path in renamed_new:
                continue
            if isinstance(w, RemoveDoc):
                result.events.append(FilePublished(w.path, "deleted"))
                continue
            result.events.append(FilePublished(w.path, w.reason))
            if w.reason == "conflict-copy":
                parsed = parse_conflict_name(w.path)
                if parsed is not None:
                    result.events.append(ConflictCopied(parsed.original, w.path,
                                                        w.version.device))

    def _manifest_for(self, blob: bytes, manifests: dict[str, Manifest]) -> Manifest | None:
        m = self.index.manifest(blob)
        if m is not None:
            return m
        for cand in manifests.values():
            if cand.blob_hash == blob:
                return cand
        m = self._manifests(blob)
        return m if m is not None and m.blob_hash == blob else None

    def _chunk_stream(self, manifest: Manifest) -> Iterator[bytes]:
        for ref in manifest.chunks:
            data = self.read_chunk(ref.hash)
            if data is None:
                data = self._chunks(ref.hash)
                if data is None or blake3.blake3(data).digest() != ref.hash:
                    raise FileBusy("a chunk disappeared during the write")
            yield data

    def _expect(self, path: str, view: LocalView) -> DiskStat | NotAFile | None:
        """The stat the path must still have when an action runs (the decision's premise)."""
        base = self.index.get(path)
        if view is UNCHANGED and base is not None:
            return base.stat
        if view is ABSENT:
            return None
        seen = self._stats.get(path)
        return seen if seen is not None else disk.stat_path(self.root, path, self._checked)

    def _act(self, path: str, view: LocalView, action: Any, manifests: dict[str, Manifest],
             result: ReconcileResult, dirty_dirs: set[Path]) -> None:
        base = self.index.get(path)
        expect = self._expect(path, view)
        if isinstance(expect, NotAFile):
            result.events.append(PathRefused(path, expect.kind))
            return
        try:
            if isinstance(action, SetMeta):
                assert expect is not None
                v = action.version
                st = disk.set_meta(self.root, path, mtime_ns=v.mtime_ns, mode=v.mode,
                                   expect=expect)
                manifest = base.manifest if base is not None else manifests[path]
                self.index.put(path, IndexEntry(v, st, manifest))
                result.events.append(FileWritten(path, True))
            elif isinstance(action, AdoptBase):
                assert expect is not None
                self.index.put(path, IndexEntry(action.version, expect, manifests[path]))
            elif isinstance(action, DeleteFile):
                assert expect is not None
                disk.delete_file(self.root, path, expect=expect)
                dirty_dirs.add(disk.resolve(self.root, path, checked=self._checked).parent)
                self.index.forget(path)
                result.events.append(FileDeleted(path))
            elif isinstance(action, ForgetBase):
                self.index.forget(path)
        except FileBusy as exc:
            result.events.append(FileSkipped(path, str(exc)))
        except UnsafePath as exc:
            result.events.append(PathRefused(path, str(exc)))
        except OSError as exc:
            result.events.append(FileSkipped(path, f"disk refused: {exc}"))

    def _write_batch(self, writes: list[tuple[str, FileVersion]], locals_: dict[str, LocalView],
                     manifests: dict[str, Manifest], result: ReconcileResult,
                     dirty_dirs: set[Path]) -> None:
        """Write remote versions: all temp files, one parallel fsync, then the renames."""
        started: list[tuple[disk.PendingWrite, FileVersion, Manifest, DiskStat | None]] = []
        for path, v in writes:
            expect = self._expect(path, locals_[path])
            if isinstance(expect, NotAFile):
                result.events.append(PathRefused(path, expect.kind))
                continue
            manifest = self._manifest_for(v.blob, manifests)
            if manifest is None:
                self._missing(BlobMissing(path, v.blob, None, ()), result)
                continue
            if manifest.size != v.size:
                result.events.append(PathRefused(path, "manifest size differs from the version"))
                continue
            absent = self._absent(manifest)
            if absent:
                try:
                    self.parts.open(manifest, path)  # resumes one left by an earlier run
                except OSError as exc:
                    result.events.append(FileSkipped(path, f"disk refused: {exc}"))
                    continue
                except UnsafePath as exc:
                    result.events.append(PathRefused(path, str(exc)))
                    continue
                absent = self._absent(manifest)
            if absent:
                self._missing(BlobMissing(path, v.blob, manifest, absent), result)
                continue
            try:
                part = self.parts.claim(v.blob)
                pending = None
                if part is not None:
                    adopted = False
                    try:
                        pending = disk.adopt_part(self.root, path, part, mtime_ns=v.mtime_ns,
                                                  mode=v.mode, checked=self._checked)
                        adopted = True
                    finally:
                        if not adopted:
                            self.parts.finished(v.blob, renamed=False)
                        elif pending is None:
                            # another file system: copy from the part file (still readable),
                            # which the successful write below then drops
                            self.parts.unclaim(v.blob)
                if pending is None:
                    pending = disk.begin_write(self.root, path, self._chunk_stream(manifest),
                                               mtime_ns=v.mtime_ns, mode=v.mode,
                                               checked=self._checked)
            except FileBusy as exc:
                result.events.append(FileSkipped(path, str(exc)))
                continue
            except UnsafePath as exc:
                result.events.append(PathRefused(path, str(exc)))
                continue
            except OSError as exc:
                result.events.append(FileSkipped(path, f"disk refused: {exc}"))
                continue
            started.append((pending, v, manifest, expect))
        errors = disk.flush_writes([p for p, _, _, _ in started])
        for (pending, v, manifest, expect), err in zip(started, errors, strict=True):
            if err is not None:
                disk.abort_write(pending)
                if pending.keep:
                    self.parts.finished(v.blob, renamed=False)
                result.events.append(FileSkipped(pending.rel, f"disk refused: {err}"))
                continue
            try:
                st = disk.finish_write(pending, expect)
            except FileBusy as exc:
                if pending.keep:
                    self.parts.finished(v.blob, renamed=False)
                result.events.append(FileSkipped(pending.rel, str(exc)))
                continue
            except OSError as exc:
                if pending.keep:
                    self.parts.finished(v.blob, renamed=False)
                result.events.append(FileSkipped(pending.rel, f"disk refused: {exc}"))
                continue
            if pending.keep:
                self.parts.finished(v.blob, renamed=True)
            else:
                self.parts.drop(v.blob)  # a part file begun for it is of no use now
            dirty_dirs.add(pending.target.parent)
            self.index.put(pending.rel, IndexEntry(v, st, manifest))
            result.events.append(FileWritten(pending.rel, False))

    def _absent(self, manifest: Manifest) -> tuple[bytes, ...]:
        return tuple(h for h in manifest.unique_chunks()
                     if self.index.locate(h) is None and not self.parts.has(h)
                     and not self._has_chunk(h))

    def _missing(self, event: BlobMissing, result: ReconcileResult) -> None:
        self.parts.expect(event.blob, event.path)
        result.events.append(event)
        result.missing[event.blob] = event
