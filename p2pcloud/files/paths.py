"""Relative paths as document ids: normalisation, safety, and conflict-copy names (pure).

A synced file's document id is its path relative to the folder root, with POSIX ``/``
separators, exactly one spelling per file: no empty, ``.`` or ``..`` components, no leading
``/``, no NUL or control characters. A peer's document id is a path we are about to write
to, so every id from a replica is checked here before the disk is touched: an id that would
escape the folder (``../x``, ``/etc/passwd``) or that this platform cannot hold safely
(``CON``, ``a:b`` or a trailing dot on Windows) is refused with :class:`UnsafePath`.

Names that start with ``.p2pcloud`` are ours (temporary files of atomic writes, metadata)
and are never synced in either direction.
"""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime
from typing import Final

from p2pcloud.errors import UnsafePath

__all__ = [
    "INTERNAL_PREFIX",
    "MAX_COMPONENT_BYTES",
    "MAX_PATH_BYTES",
    "TEMP_PREFIX",
    "PART_PREFIX",
    "ConflictName",
    "conflict_name",
    "is_internal",
    "normalize_relpath",
    "parse_conflict_name",
    "safe_device_label",
]

WINDOWS: Final = sys.platform == "win32"
MAX_PATH_BYTES: Final = 1024  # the core's MAX_NAME_BYTES: a document id is at most this long
MAX_COMPONENT_BYTES: Final = 255  # NAME_MAX of ext4, APFS, NTFS (in UTF-8 bytes, the strictest)
INTERNAL_PREFIX: Final = ".p2pcloud"  # our own names inside a folder; never synced
TEMP_PREFIX: Final = ".p2pcloud-tmp-"  # atomic writes go through files named like this
PART_PREFIX: Final = ".p2pcloud-part-"  # remote content arriving (parts.py); kept by scans
MAX_DEVICE_LABEL: Final = 32  # the device part of a conflict-copy name; keeps names short

_WINDOWS_RESERVED: Final = frozenset(
    ["CON", "PRN", "AUX", "NUL"]
    + [f"COM{i}" for i in range(1, 10)]
    + [f"LPT{i}" for i in range(1, 10)]
)
_WINDOWS_BAD_CHARS: Final = frozenset('<>:"|?*\\')
_LABEL_RE: Final = re.compile(r"[^A-Za-z0-9_-]")
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")
_CONFLICT_RE: Final = re.compile(
    r"^(?P<stem>.+)\.conflict-(?P<device>[A-Za-z0-9_-]{1,32})-(?P<time>\d{8}-\d{6})"
    r"(?P<tag>-[0-9a-f]{8})?(?P<ext>\.[^./]*)?$"
)


def is_internal(name: str) -> bool:
    """Whether a path component is one of ours (temporary files, metadata): never synced."""
    return name.startswith(INTERNAL_PREFIX)


def normalize_relpath(rel: str, *, windows: bool = WINDOWS) -> str:
    """Check that a relative path is a canonical, safe document id, and return it.

    Args:
        rel: a path relative to the folder root, ``/``-separated.
        windows: apply Windows' naming rules too (defaults to the running platform).

    Returns:
        ``rel`` itself (a canonical path is returned unchanged).

    Raises:
        UnsafePath: empty, too long, absolute, a ``.``/``..``/empty component, NUL or
            control characters, one of our internal names, or a name unsafe on Windows.
    """
    if not isinstance(rel, str) or not rel:
        raise UnsafePath("empty path")
    if len(rel.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise UnsafePath(f"path longer than {MAX_PATH_BYTES} bytes")
    if rel.startswith("/"):
        raise UnsafePath("absolute path")
    if _CONTROL_RE.search(rel):
        raise UnsafePath("control character in path")
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from undecodable file names
        raise UnsafePath("path is not valid Unicode") from exc
    if windows and len(rel) >= 2 and rel[1] == ":":
        raise UnsafePath("drive-letter path")
    for part in rel.split("/"):
        if part in ("", ".", ".."):
            raise UnsafePath(f"path component {part!r} is not allowed")
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise UnsafePath(f"a name is longer than {MAX_COMPONENT_BYTES} bytes")
        if is_internal(part):
            raise UnsafePath("name reserved for p2pcloud")
        if windows:
            if any(c in _WINDOWS_BAD_CHARS for c in part):
                raise UnsafePath("character not allowed on Windows")
            if part[-1] in ". ":
                raise UnsafePath("trailing dot or space not allowed on Windows")
            if part.split(".", 1)[0].upper().rstrip(" ") in _WINDOWS_RESERVED:
                raise UnsafePath("reserved device name on Windows")
    return rel


def safe_device_label(device: str) -> str:
    """A device name reduced to ``[A-Za-z0-9_-]``, at most 32 characters (for file names).

    Args:
        device: any label (a hashname prefix, a host name...).

    Returns:
        The label with other characters replaced by ``-`` (``"device"`` if nothing is left).
    """
    label = _LABEL_RE.sub("-", device)[:MAX_DEVICE_LABEL].strip("-")
    return label or "device"


def _stamp(mtime_ns: int) -> str:
    # the version's own mtime, not the clock: every device derives the same name
    seconds = max(0, min(mtime_ns // 1_000_000_000, 253402300799))  # year 0001..9999
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y%m%d-%H%M%S")


def conflict_name(path: str, device: str, mtime_ns: int, tag: str = "") -> str:
    """The path of a conflict copy: ``dir/name.conflict-<device>-<time>.ext``.

    Args:
        path: the contested path.
        device: the author of the version that goes to the copy.
        mtime_ns: that version's modification time (gives ``<time>``, UTC).
        tag: optional 8 hex digits to tell apart two copies of the same second.

    Returns:
        The copy's path, in the same directory (names truncated to stay within limits).
    """
    head, sep, name = path.rpartition("/")
    dot = name.rfind(".")
    stem, ext = (name[:dot], name[dot:]) if dot > 0 else (name, "")
    suffix = f".conflict-{safe_device_label(device)}-{_stamp(mtime_ns)}{'-' + tag if tag else ''}"
    budget = MAX_COMPONENT_BYTES - len((suffix + ext).encode("utf-8"))
    if len(ext.encode("utf-8")) > 32:  # an "extension" that long is part of the name
        stem, ext = name, ""
        budget = MAX_COMPONENT_BYTES - len(suffix.encode("utf-8"))
    while len(stem.encode("utf-8")) > budget:
        stem = stem[:-1]
    return f"{head}{sep}{stem}{suffix}{ext}"


class ConflictName:
    """A parsed conflict-copy name: which path it is a copy of, from which device and when."""

    __slots__ = ("device", "original", "time")

    def __init__(self, original: str, device: str, time: str) -> None:
        """Hold the parts.

        Args:
            original: the contested path. device: the copy's author. time: ``YYYYmmdd-HHMMSS``.
        """
        self.original = original
        self.device = device
        self.time = time

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConflictName):
            return NotImplemented
        return (self.original, self.device, self.time) == (other.original, other.device,
                                                           other.time)

    def __hash__(self) -> int:
        return hash((self.original, self.device, self.time))

    def __repr__(self) -> str:
        return f"ConflictName({self.original!r}, {self.device!r}, {self.time!r})"


def parse_conflict_name(path: str) -> ConflictName | None:
    """Recognise a conflict-copy path.

    Args:
        path: a document id.

    Returns:
        Its parts, or None if it is not a conflict-copy name.
    """
    head, sep, name = path.rpartition("/")
    m = _CONFLICT_RE.match(name)
    if m is None:
        return None
    original = head + sep + m["stem"] + (m["ext"] or "")
    return ConflictName(original, m["device"], m["time"])
