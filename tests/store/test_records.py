"""Sub-cloud registry, blobs and chunks, peers and statistics, on a real LMDB store."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pcloud._store import (
    MAX_PATHS_PER_PEER,
    MIN_MAP_SIZE,
    BlobRecord,
    PeerRecord,
    Store,
    SubCloudRecord,
    open_store,
)
from p2pcloud.errors import StoreUsageError
from tests.store.conftest import HN, HN2, SC, SC2, A, digest

# -- sub-cloud registry ------------------------------------------------------------------------


def test_subcloud_registry(store: Store) -> None:
    assert store.get_subcloud(SC) is None
    rec = SubCloudRecord("laptop", "device", HN, {"full_copy": [HN, HN2], "open_only": []})
    store.put_subcloud(SC, rec)
    store.put_subcloud(SC2, SubCloudRecord("bathroom scale", "thing", HN2))
    assert store.get_subcloud(SC) == rec
    assert store.subclouds() == {SC: rec, SC2: SubCloudRecord("bathroom scale", "thing", HN2)}
    renamed = SubCloudRecord("old laptop", "device", HN, {})
    store.put_subcloud(SC, renamed)
    assert store.get_subcloud(SC) == renamed
    assert store.remove_subcloud(SC) is True
    assert list(store.subclouds()) == [SC2]


@pytest.mark.parametrize(
    "record",
    [
        SubCloudRecord("x", "planet", HN),  # unknown kind
        SubCloudRecord("x", "thing", "NOT-A-HASHNAME"),  # type: ignore[arg-type]
        SubCloudRecord("x" * 2000, "thing", HN),  # name too long
        SubCloudRecord(b"x", "thing", HN),  # type: ignore[arg-type]
        SubCloudRecord("x", "thing", HN, {"v": object()}),  # not CBOR
        SubCloudRecord("x", "thing", HN, {"blob": b"x" * 100_000}),  # payload in metadata
        SubCloudRecord("x", "thing", HN, ["not", "a", "mapping"]),  # type: ignore[arg-type]
    ],
)
def test_bad_subcloud_records_are_refused(store: Store, record: SubCloudRecord) -> None:
    with pytest.raises(StoreUsageError):
        store.put_subcloud(SC, record)
    assert store.subclouds() == {}


# -- blobs and chunks --------------------------------------------------------------------------


def test_chunks_are_content_addressed(store: Store) -> None:
    assert store.put_chunks({digest(1): b"one", digest(2): b"two"}) == 2
    assert store.put_chunks([(digest(1), b"one"), (digest(3), b"three")]) == 1  # dedup
    assert store.has_chunks([digest(i) for i in range(5)]) == {digest(1), digest(2), digest(3)}
    assert store.get_chunk(digest(3)) == b"three"
    assert store.get_chunk(digest(4)) is None
    assert store.has_chunks([]) == set()
    assert store.put_chunks([]) == 0


def test_blob_records_and_missing_chunks(store: Store) -> None:
    order = [digest(1), digest(2), digest(1), digest(3)]
    assert store.put_blob(b"blob-1", 1234, order) is True
    assert store.put_blob(b"blob-1", 1234, order) is False  # identical record: no-op
    assert store.get_blob(b"blob-1") == BlobRecord(1234, tuple(order))
    assert store.get_blob(b"nope") is None
    assert store.missing_chunks(b"blob-1") == [digest(1), digest(2), digest(3)]
    store.put_chunks({digest(2): b"2"})
    assert store.missing_chunks(b"blob-1") == [digest(1), digest(3)]
    store.put_blob(b"blob-2", 2, [digest(1), digest(3)], {digest(1): b"1", digest(3): b"3"})
    assert store.missing_chunks(b"blob-1") == []
    assert store.missing_chunks(b"nope") is None


def test_refcounts_free_only_unreferenced_chunks(store: Store) -> None:
    data = {digest(i): bytes([i]) * 1000 for i in range(6)}
    store.put_blob(b"a", 4000, [digest(0), digest(1), digest(2), digest(2)],
                   {k: data[k] for k in (digest(0), digest(1), digest(2))})
    store.put_blob(b"b", 2000, [digest(2), digest(3)], {digest(3): data[digest(3)]})
    store.put_chunks({digest(4): data[digest(4)]})  # arrived, but no blob names it
    gc = store.collect_garbage()
    assert (gc.chunks, gc.bytes, gc.more) == (1, 1000, False)
    assert store.has_chunks(data) == {digest(i) for i in range(4)}

    assert store.remove_blob(b"a") is True
    assert store.remove_blob(b"a") is False
    gc = store.collect_garbage()
    assert (gc.chunks, gc.bytes) == (2, 2000)  # chunk 2 is still named by blob b
    assert store.has_chunks(data) == {digest(2), digest(3)}

    # replacing a record moves the references
    store.put_blob(b"b", 1000, [digest(3)])
    assert store.collect_garbage().chunks == 1
    assert store.has_chunks(data) == {digest(3)}
    assert store.collect_garbage().chunks == 0


def test_a_chunk_named_again_before_the_sweep_survives(store: Store) -> None:
    store.put_blob(b"a", 1, [digest(1)], {digest(1): b"x"})
    store.remove_blob(b"a")
    store.put_blob(b"b", 1, [digest(1)])
    assert store.collect_garbage().chunks == 0
    assert store.get_chunk(digest(1)) == b"x"


def test_garbage_is_collected_in_bounded_batches(store: Store) -> None:
    store.put_chunks({digest(i): b"x" * 10 for i in range(25)})
    freed = []
    while True:
        gc = store.collect_garbage(limit=10)
        freed.append(gc.chunks)
        if not gc.more:
            break
    assert freed == [10, 10, 5]
    assert store.has_chunks([digest(i) for i in range(25)]) == set()


# -- peers -------------------------------------------------------------------------------------


def test_peers_and_paths(store: Store) -> None:
    keys = {"3a": b"k" * 32}
    assert store.get_peer(HN) is None
    assert store.remember_path(HN, {"type": "udp4", "ip": "127.0.0.1", "port": 1}, 10.0) is False
    store.put_peer(PeerRecord(HN, keys))
    store.put_peer(PeerRecord(HN2, {"3a": b"j" * 32}, ({"type": "peer", "hn": HN},), 5.0))
    p1 = {"type": "udp4", "ip": "127.0.0.1", "port": 1}
    p2 = {"type": "tcp4", "ip": "127.0.0.1", "port": 2}
    assert store.remember_path(HN, p1, 100.0) is True
    assert store.remember_path(HN, p2, 101.0) is True
    assert store.remember_path(HN, dict(p1), 102.5) is True  # moves to the front, no duplicate
    got = store.get_peer(HN)
    assert got == PeerRecord(HN, keys, (p1, p2), 102.5)
    assert [p.hashname for p in store.peers()] == [HN, HN2]
    for port in range(3, 3 + 2 * MAX_PATHS_PER_PEER):
        store.remember_path(HN, {"type": "udp4", "ip": "127.0.0.1", "port": port}, 200.0)
    peer = store.get_peer(HN)
    assert peer is not None and len(peer.paths) == MAX_PATHS_PER_PEER
    assert peer.paths[0]["port"] == 2 + 2 * MAX_PATHS_PER_PEER  # the most recent first
    assert store.remove_peer(HN) is True
    assert store.remove_peer(HN) is False
    assert [p.hashname for p in store.peers()] == [HN2]


@pytest.mark.parametrize(
    "record",
    [
        PeerRecord("1" * 52, {"3a": b"k"}),  # type: ignore[arg-type]  # 1 is not base32
        PeerRecord(HN, {"3A": b"k"}),  # CSIDs are lowercase hex
        PeerRecord(HN, {"3a": "text"}),  # type: ignore[dict-item]
        PeerRecord(HN, {"3a": b"k" * 2000}),  # a key beyond any cipher set
        PeerRecord(HN, {"3a": b"k"}, ("not a mapping",)),  # type: ignore[arg-type]
        PeerRecord(HN, {"3a": b"k"}, (), float("nan")),
        PeerRecord(HN, {"3a": b"k"}, ({"x": 1},) * (MAX_PATHS_PER_PEER + 1)),
    ],
)
def test_bad_peer_records_are_refused(store: Store, record: PeerRecord) -> None:
    with pytest.raises(StoreUsageError):
        store.put_peer(record)
    assert store.peers() == []


# -- statistics and reopening ------------------------------------------------------------------


def test_statistics_count_what_is_held(store: Store) -> None:
    store.put_subcloud(SC, SubCloudRecord("x", "thing", HN))
    store.commit_local(SC, b"e" * 100, 1, 1, origin=A)
    store.put_blob(b"b", 3, [digest(1)], {digest(1): b"abc"})
    store.put_peer(PeerRecord(HN, {"3a": b"k" * 32}))
    st = store.statistics()
    assert st.schema == 1
    assert st.map_size >= MIN_MAP_SIZE and st.used_bytes <= st.map_size
    assert {n: t.entries for n, t in st.tables.items()} == {
        "meta": 1, "subclouds": 1, "log": 1, "heads": 1, "floors": 0, "checkpoints": 0,
        "checkpoint_versions": 0, "chunks": 1, "chunk_refs": 1, "orphans": 0, "blobs": 1,
        "peers": 1,
    }
    assert st.tables["log"].bytes > 0


def test_records_survive_close_and_reopen(store_path: Path) -> None:
    rec = SubCloudRecord("car", "thing", HN, {"keep": "all"})
    with open_store(store_path, initial_map_size=MIN_MAP_SIZE) as s:
        s.put_subcloud(SC, rec)
        s.put_blob(b"b", 3, [digest(1)], {digest(1): b"abc"})
        s.put_peer(PeerRecord(HN, {"3a": b"k" * 32}, ({"type": "udp4"},), 7.0))
    with open_store(store_path) as s:
        assert s.get_subcloud(SC) == rec
        assert s.get_blob(b"b") == BlobRecord(3, (digest(1),))
        assert s.get_chunk(digest(1)) == b"abc"
        assert s.get_peer(HN) == PeerRecord(HN, {"3a": b"k" * 32}, ({"type": "udp4"},), 7.0)
