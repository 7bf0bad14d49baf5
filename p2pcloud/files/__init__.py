"""Folder sync: a directory on disk mapped to the ``"files"`` collection of a sub-cloud.

Not a pure layer: this package reads and writes files. Its decisions (what to publish, what
to write, what is a conflict) are the pure functions of :mod:`p2pcloud.files.model`.
docs/files.md explains the whole.
"""

from p2pcloud.files.folder import (
    BlobMissing,
    ConflictCopied,
    FileDeleted,
    FileEvent,
    FilePublished,
    FileRenamed,
    FileSkipped,
    FileWritten,
    Folder,
    PathRefused,
    ReconcileResult,
    paths_from_changes,
)
from p2pcloud.files.model import COLLECTION, FIELD, Conflict, FileVersion
from p2pcloud.files.paths import conflict_name, normalize_relpath, parse_conflict_name
from p2pcloud.files.watch import FolderWatcher, watch_and_reconcile

__all__ = [
    "COLLECTION",
    "FIELD",
    "BlobMissing",
    "Conflict",
    "ConflictCopied",
    "FileDeleted",
    "FileEvent",
    "FilePublished",
    "FileRenamed",
    "FileSkipped",
    "FileVersion",
    "FileWritten",
    "Folder",
    "FolderWatcher",
    "PathRefused",
    "ReconcileResult",
    "conflict_name",
    "normalize_relpath",
    "parse_conflict_name",
    "paths_from_changes",
    "watch_and_reconcile",
]
