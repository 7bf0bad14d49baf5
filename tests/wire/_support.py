"""Helpers shared by the wire and exchange tests: the shared vectors and fixed entropy."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from p2pcloud._crypto import LocalIdentity

# The repo root's sibling folder shared/ (CI clones it beside the repo).
SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
CORPUS = Path(__file__).resolve().parent / "corpus"


def load_d1() -> dict[str, bytes]:
    """Vector D1 (deterministic CS3a exchange checked by telehash-js), values as bytes."""
    raw: dict[str, Any] = json.loads(
        (SHARED / "vectors" / "telehash-cs3a-exchange.json").read_text()
    )
    return {k: bytes.fromhex(v) for k, v in raw.items()}


class ScriptedEntropy:
    """An entropy callable that hands out a fixed script of bytes, in order.

    It fails loudly when the code asks for more than was scripted, so a test notices any
    change in how much randomness a call draws.
    """

    def __init__(self, *chunks: bytes) -> None:
        self._buf = bytearray(b"".join(chunks))

    def __call__(self, n: int) -> bytes:
        assert len(self._buf) >= n, f"entropy script exhausted (wanted {n} bytes)"
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    @property
    def left(self) -> int:
        """Bytes not yet handed out."""
        return len(self._buf)


class CountingEntropy:
    """Deterministic, never-repeating entropy: SHA-256 of a label and a counter."""

    def __init__(self, label: str) -> None:
        self._label = label.encode()
        self._counter = 0

    def __call__(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            self._counter += 1
            out += hashlib.sha256(self._label + self._counter.to_bytes(8, "big")).digest()
        return out[:n]


def identity(label: str) -> LocalIdentity:
    """A deterministic identity with a signing key."""
    return LocalIdentity.generate(CountingEntropy(label))
