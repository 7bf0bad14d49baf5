"""Folder sync decisions, as pure functions over versions (no disk, no clock).

Theory of operation
-------------------
A folder is one collection of a sub-cloud: collection ``"files"``, one document per file,
its id the relative POSIX path (:mod:`p2pcloud.files.paths`), one field ``"content"``
holding a multi-value register of :class:`FileVersion` values ``{blob: BlobRef(hash, size),
t: mtime_ns, m: mode, by: device}``. Deleting a file removes its document.

Three views of each path meet here:

* ``base``: what this device last knew to be in sync at the path (the version the disk
  file matched, remembered in the local index, never synced);
* ``local``: the disk now, as :data:`UNCHANGED` (the file's stat equals the base's: no
  hashing), :data:`ABSENT`, or a freshly hashed :class:`FileVersion`;
* ``remote``: the register's live values in the replica (oldest first; empty if no
  document).

:func:`plan_publish` decides the replica writes (local changes, and conflicts), then
:func:`plan_disk` decides what to do to the disk once those writes are in. Two rules carry
the safety argument:

1. The disk is only ever written where the local view is UNCHANGED or ABSENT, that is where
   no local edit is pending; a local edit is always published (or kept as the winner of a
   conflict) before anything may replace it.
2. No version is ever dropped: when two versions compete (concurrent writes that the
   register kept both of, or a local edit made while a remote one arrived), the newest is
   the winner at the path and every other one is written to the replica as its own
   document ``name.conflict-<device>-<time>.ext``. Conflict copies are ordinary synced files,
   so every device shows the same ones; deleting the copy is how a user discards it.

Every device that sees the same register values derives the same writes (winner: the last
value in the register's deterministic order; copy names: from the version's author and
mtime), so devices resolving one conflict at the same time write equal values and converge.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import blake3

from p2pcloud._core import BlobRef
from p2pcloud.blobs.chunking import HASH_SIZE
from p2pcloud.files.paths import conflict_name, parse_conflict_name

__all__ = [
    "ABSENT",
    "COLLECTION",
    "FIELD",
    "UNCHANGED",
    "AdoptBase",
    "Conflict",
    "DeleteFile",
    "DiskAction",
    "FileVersion",
    "ForgetBase",
    "LocalView",
    "RemoveDoc",
    "ReplicaWrite",
    "SetMeta",
    "SetVersion",
    "WriteFile",
    "distinct_versions",
    "list_conflicts",
    "plan_disk",
    "plan_publish",
]

COLLECTION: Final = "files"  # the sub-cloud collection a folder maps to
FIELD: Final = "content"  # the multi-value register holding a file's versions
MODE_MASK: Final = 0o777  # permission bits only: setuid/setgid/sticky are not synced (safety)
MAX_MTIME_NS: Final = (1 << 63) - 1  # a signed 64-bit nanosecond count (year 2262)


@dataclass(frozen=True, slots=True)
class FileVersion:
    """One version of a file: its blob, size, mtime, permission bits and author device."""

    blob: bytes
    size: int
    mtime_ns: int
    mode: int
    device: str

    def to_value(self) -> dict[str, Any]:
        """The register value written to the replica."""
        return {"blob": BlobRef(self.blob, self.size), "t": self.mtime_ns, "m": self.mode,
                "by": self.device}

    @classmethod
    def from_value(cls, value: Any) -> FileVersion | None:
        """Read a register value; None if it is not a well-formed file version (a peer's
        bad value is skipped, never trusted).

        Args:
            value: a value read from the replica.
        """
        if not isinstance(value, dict):
            return None
        blob, t, m, by = value.get("blob"), value.get("t"), value.get("m"), value.get("by")
        if not isinstance(blob, BlobRef) or len(blob.hash) != HASH_SIZE:
            return None
        if not isinstance(t, int) or isinstance(t, bool) or not -MAX_MTIME_NS <= t <= MAX_MTIME_NS:
            return None
        if not isinstance(m, int) or isinstance(m, bool) or not 0 <= m <= MODE_MASK:
            return None
        if not isinstance(by, str) or not 0 < len(by) <= 64:
            return None
        return cls(blob.hash, blob.size, t, m, by)

    def same_content(self, other: FileVersion) -> bool:
        """Same bytes (blob hash and size), whatever the metadata."""
        return self.blob == other.blob and self.size == other.size

    def same_file(self, other: FileVersion) -> bool:
        """Same bytes, mtime and mode (the author does not matter)."""
        return self.same_content(other) and (self.mtime_ns, self.mode) == (other.mtime_ns,
                                                                           other.mode)


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


UNCHANGED: Final = _Marker("UNCHANGED")
"""The local view when the file's stat equals the base's: content not re-read."""
ABSENT: Final = _Marker("ABSENT")
"""The local view when there is no regular file at the path."""

LocalView = _Marker | FileVersion


# -- replica writes --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetVersion:
    """Write ``version`` as the register value of ``path`` (kills the values seen there)."""

    path: str
    version: FileVersion
    reason: str  # created, modified, metadata, conflict-winner, conflict-copy, recreated


@dataclass(frozen=True, slots=True)
class RemoveDoc:
    """Remove the document of ``path`` (the file was deleted here)."""

    path: str


ReplicaWrite = SetVersion | RemoveDoc


def distinct_versions(values: Iterable[Any]) -> list[FileVersion]:
    """The well-formed versions among register values, duplicates folded, order kept
    (oldest first, as the register returns them; a duplicate keeps its newest place).

    Args:
        values: what ``Replica.get`` returned for the field (a tuple for a register).
    """
    out: list[FileVersion] = []
    for v in values:
        fv = FileVersion.from_value(v)
        if fv is None:
            continue
        if fv in out:
            out.remove(fv)
        out.append(fv)
    return out


def _copy_path(path: str, version: FileVersion, taken: Callable[[str], FileVersion | None],
               planned: list[ReplicaWrite]) -> str:
    name = conflict_name(path, version.device, version.mtime_ns)
    mine = [w.version for w in planned if isinstance(w, SetVersion) and w.path == name]
    other = mine[-1] if mine else taken(name)
    if other is None or other.same_file(version):
        return name
    # two conflicting versions from one device in one second: tell them apart by content
    tag = blake3.blake3(version.blob + version.mode.to_bytes(2, "big")).hexdigest()[:8]
    return conflict_name(path, version.device, version.mtime_ns, tag)


def plan_publish(
    path: str,
    base: FileVersion | None,
    local: LocalView,
    remote: list[FileVersion],
    taken: Callable[[str], FileVersion | None],
) -> list[ReplicaWrite]:
    """Decide the replica writes for one path (local changes and conflicts).

    Args:
        path: the document id.
        base: the version the disk matched at the last sync here, or None.
        local: the disk now (UNCHANGED, ABSENT, or its new version authored by this device).
        remote: the register's distinct versions, oldest first (:func:`distinct_versions`).
        taken: the winning version at another path, or None (to choose free copy names).

    Returns:
        The writes, in order (empty if the replica already says what it should).
    """
    writes: list[ReplicaWrite] = []
    winner = remote[-1] if remote else None
    if len(remote) > 1:
        # concurrent writes kept by the register: the newest stays, the others become copies
        writes.append(SetVersion(path, winner, "conflict-winner"))  # type: ignore[arg-type]
        for loser in remote[:-1]:
            writes.append(SetVersion(_copy_path(path, loser, taken, writes), loser,
                                     "conflict-copy"))
    if local is UNCHANGED:
        return writes
    if local is ABSENT:
        if base is not None and winner == base:
            return [w for w in writes if w.path != path] + [RemoveDoc(path)]
        return writes  # never here, or the remote changed it: the remote version comes back
    assert isinstance(local, FileVersion)
    if winner is None:
        return writes + [SetVersion(path, local, "created" if base is None else "recreated")]
    if local.same_file(winner):
        return writes  # already what the replica says
    if base is not None and winner == base:
        if local.same_content(base):
            return writes + [SetVersion(path, local, "metadata")]
        return writes + [SetVersion(path, local, "modified")]
    if local.same_content(winner):
        return writes  # both sides wrote the same bytes; the remote metadata is applied
    # a local edit and a remote one that did not see each other: keep both
    copy = _copy_path(path, winner, taken, writes)
    return [w for w in writes if w.path != path] + [
        SetVersion(path, local, "conflict-winner"),
        SetVersion(copy, winner, "conflict-copy"),
    ]


# -- disk actions ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WriteFile:
    """Write ``version``'s blob to the path (atomically), with its mtime and mode."""

    version: FileVersion


@dataclass(frozen=True, slots=True)
class SetMeta:
    """The content is already right: set ``version``'s mtime and mode only."""

    version: FileVersion


@dataclass(frozen=True, slots=True)
class DeleteFile:
    """Delete the file (its document was removed remotely and it is unchanged here)."""


@dataclass(frozen=True, slots=True)
class AdoptBase:
    """The disk already matches ``version``: remember it as the base, touch nothing."""

    version: FileVersion


@dataclass(frozen=True, slots=True)
class ForgetBase:
    """Neither the disk nor the replica has the file any more: drop the base."""


DiskAction = WriteFile | SetMeta | DeleteFile | AdoptBase | ForgetBase | None


def plan_disk(base: FileVersion | None, local: LocalView, winner: FileVersion | None
              ) -> DiskAction:
    """Decide what to do to the disk at one path, after the replica writes are in.

    Args:
        base: the version the disk matched at the last sync here, or None.
        local: the disk now (UNCHANGED, ABSENT, or its freshly hashed version).
        winner: the register's winning version after :func:`plan_publish`'s writes, or None
            if the document does not exist.

    Returns:
        The action, or None for nothing. A local edit is never overwritten or deleted: with
        a FileVersion that differs from the winner in content the answer is None.
    """
    if local is UNCHANGED:
        if winner == base:
            return None
        if winner is None:
            return DeleteFile()
        assert base is not None  # UNCHANGED implies a base
        return SetMeta(winner) if winner.same_content(base) else WriteFile(winner)
    if local is ABSENT:
        if winner is None:
            return ForgetBase() if base is not None else None
        return WriteFile(winner)
    assert isinstance(local, FileVersion)
    if winner is None or not local.same_content(winner):
        return None  # an unpublished local edit (its path was refused, or a race): keep it
    return AdoptBase(winner) if local.same_file(winner) else SetMeta(winner)


# -- conflicts -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Conflict:
    """A contested file: ``path`` holds the winner, ``copy`` the other version.

    ``copy`` is None for concurrent values the register still holds (not yet split into
    copies by any device); then ``versions`` lists them all.
    """

    path: str
    copy: str | None
    device: str
    time: str
    versions: tuple[FileVersion, ...]


def list_conflicts(docs: Iterable[str], read: Callable[[str], list[FileVersion]]
                   ) -> list[Conflict]:
    """Every conflict in a folder: conflict copies, and registers with several values.

    Args:
        docs: the document ids of the folder's collection.
        read: the distinct versions of a document (:func:`distinct_versions` of its field).

    Returns:
        The conflicts, sorted by path then copy.
    """
    out = []
    for doc in docs:
        versions = read(doc)
        parsed = parse_conflict_name(doc)
        if parsed is not None and versions:
            out.append(Conflict(parsed.original, doc, parsed.device, parsed.time,
                                tuple(versions)))
        elif len(versions) > 1:
            out.append(Conflict(doc, None, ",".join(v.device for v in versions), "",
                                tuple(versions)))
    return sorted(out, key=lambda c: (c.path, c.copy or ""))
