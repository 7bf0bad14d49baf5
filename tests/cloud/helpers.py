"""Shared helpers for the cloud tests: deterministic identities and entropy."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from p2pcloud._crypto import LocalIdentity

NOW = 1_800_000_000  # a fixed "now" in seconds (2027), the tests pass it in


def identity(name: str) -> LocalIdentity:
    """A deterministic identity per name (so hashname order is stable across runs)."""
    return LocalIdentity.from_seed(hashlib.sha256(b"cloud test " + name.encode()).digest())


def entropy_from(seed: str) -> Callable[[int], bytes]:
    """A deterministic entropy source: SHA-256 in counter mode over ``seed``."""
    state = {"n": 0}

    def entropy(n: int) -> bytes:
        out = b""
        while len(out) < n:
            state["n"] += 1
            out += hashlib.sha256(f"{seed}/{state['n']}".encode()).digest()
        return out[:n]

    return entropy
