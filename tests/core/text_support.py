"""Shared helpers for the text CRDT tests (this module holds no tests itself).

Both implementations are imported directly: ``_reference_text`` (the twin, the
specification) and ``_ctext`` (the Cython module).
"""

from __future__ import annotations

import gzip
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from p2pcloud._core import _ctext, _reference_text

IMPLEMENTATIONS = {"twin": _reference_text.Text, "cython": _ctext.Text}

TRACE = (
    Path(__file__).resolve().parents[2]
    / ".."
    / "shared"
    / "data"
    / "traces"
    / "automerge-paper.json.gz"
)


@cache
def load_trace() -> dict[str, Any]:
    """Returns: the automerge-paper editing trace (startContent, endContent, txns)."""
    if not TRACE.exists():
        reason = f"editing trace not found beside the repository: {TRACE}"
        if os.environ.get("CI"):  # CI always has shared/ beside the clone: missing is a fault
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    with gzip.open(TRACE) as handle:
        trace: dict[str, Any] = json.load(handle)
    return trace


def trace_edits() -> list[tuple[int, int, str]]:
    """Returns: every patch of the trace as (position, deleted count, inserted text)."""
    return [
        (pos, deleted, text)
        for txn in load_trace()["txns"]
        for pos, deleted, text in txn["patches"]
    ]


def replay(doc: Any, edits: list[tuple[int, int, str]], clamp: bool = False) -> None:
    """Applies trace edits to ``doc`` one call each; ``clamp`` keeps them inside the text
    (for replicas whose text differs from the one the trace was recorded on)."""
    for pos, deleted, text in edits:
        if clamp:
            pos = min(pos, len(doc))
            deleted = min(deleted, len(doc) - pos)
        if deleted:
            doc.delete(pos, deleted)
        if text:
            doc.insert(pos, text)


def rid(n: int) -> bytes:
    """Returns: a replica id for replica number ``n`` (8 bytes, ordered like n)."""
    return b"replica" + bytes([0x30 + n])
