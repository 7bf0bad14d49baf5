"""Fixtures for the store tests: a real LMDB store in ``tmp_path``, started tiny so that
ordinary tests already exercise map growth."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pcloud._ids import Hashname, ReplicaId, SubCloudId
from p2pcloud._store import MIN_MAP_SIZE, Store, open_store

SC = SubCloudId(b"S" * 16)
SC2 = SubCloudId(b"T" * 16)
A = ReplicaId(b"A" * 16)
B = ReplicaId(b"B" * 16)
C = ReplicaId(b"C" * 16)
HN = Hashname("a" * 52)
HN2 = Hashname("b" * 52)


def digest(i: int) -> bytes:
    """A 32-byte stand-in for a chunk hash (the store never hashes)."""
    return i.to_bytes(4, "big") * 8


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_path: Path) -> Iterator[Store]:
    with open_store(store_path, initial_map_size=MIN_MAP_SIZE) as s:
        yield s
