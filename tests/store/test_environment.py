"""Opening, schema, map growth, errors, bad input, threads and a second process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lmdb
import pytest
import trio

from p2pcloud._store import (
    MIN_MAP_SIZE,
    SCHEMA_VERSION,
    PeerRecord,
    Store,
    open_store,
)
from p2pcloud.errors import StoreError, StoreFull, StoreUsageError
from tests.store.conftest import HN, SC, A, B, digest

REPO = Path(__file__).resolve().parents[2]

# -- opening and closing -------------------------------------------------------------------------


def test_open_creates_a_private_directory(store_path: Path) -> None:
    with open_store(store_path, initial_map_size=MIN_MAP_SIZE) as s:
        assert s.path == str(store_path)
        assert s.schema == SCHEMA_VERSION
    assert (store_path / "data.mdb").exists()
    assert store_path.stat().st_mode & 0o077 == 0
    assert (store_path / "data.mdb").stat().st_mode & 0o077 == 0


def test_closed_store_refuses_calls_and_close_is_idempotent(store_path: Path) -> None:
    s = open_store(store_path, initial_map_size=MIN_MAP_SIZE)
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.version(SC)
    with pytest.raises(StoreError, match="closed"):
        s.commit_local(SC, b"x", 1, 1, origin=A)


def test_second_handle_in_one_process_is_refused(store: Store) -> None:
    with pytest.raises(StoreError, match="already open in this process"):
        open_store(store.path)


def test_newer_schema_is_refused_untouched(store_path: Path) -> None:
    with open_store(store_path, initial_map_size=MIN_MAP_SIZE) as s:
        s.commit_local(SC, b"x", 1, 1, origin=A)
    env = lmdb.open(str(store_path), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(b"schema", (SCHEMA_VERSION + 1).to_bytes(4, "big"), db=env.open_db(b"meta", txn))
    env.close()
    with pytest.raises(StoreError, match="newer p2pcloud") as info:
        open_store(store_path)
    assert not isinstance(info.value, StoreUsageError)
    with pytest.raises(StoreError, match="newer p2pcloud"):
        open_store(store_path, readonly=True)
    # the refusal wrote nothing and left nothing open: the old schema opens again
    env = lmdb.open(str(store_path), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(b"schema", SCHEMA_VERSION.to_bytes(4, "big"), db=env.open_db(b"meta", txn))
    env.close()
    with open_store(store_path) as s:
        assert s.version(SC) == {A: 1}


def test_not_a_store_gives_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "data.mdb").write_bytes(os.urandom(64 * 1024))
    with pytest.raises(StoreError, match="corrupt or not an LMDB store"):
        open_store(bad)
    afile = tmp_path / "afile"
    afile.write_bytes(b"x")
    with pytest.raises(StoreError):
        open_store(afile)


def test_damaged_records_raise_store_errors(store_path: Path) -> None:
    with open_store(store_path, initial_map_size=MIN_MAP_SIZE) as s:
        s.commit_local(SC, b"x", 1, 1, origin=A)
        s.put_peer(PeerRecord(HN, {"3a": b"k" * 32}))
    env = lmdb.open(str(store_path), max_dbs=16)
    with env.begin(write=True) as txn:
        heads = env.open_db(b"heads", txn)
        key = next(iter(txn.cursor(db=heads)))[0]
        txn.put(key, b"short", db=heads)
        log = env.open_db(b"log", txn)
        key = next(iter(txn.cursor(db=log)))[0]
        txn.put(key, b"shrt", db=log)
        txn.put(HN.encode(), b"\xff\xff not cbor", db=env.open_db(b"peers", txn))
    env.close()
    with open_store(store_path) as s:
        for call in (lambda: s.version(SC), lambda: s.summaries(),
                     lambda: s.envelopes_after(SC, A, 0, 100), lambda: s.get_peer(HN),
                     lambda: s.peers()):
            with pytest.raises(StoreError, match="damaged") as info:
                call()
            assert not isinstance(info.value, StoreUsageError)
        with pytest.raises(StoreError, match="damaged"):
            s.commit_local(SC, b"y", 2, 2, origin=A)


def test_readonly_store_reads_and_refuses_writes(store_path: Path) -> None:
    with open_store(store_path, initial_map_size=MIN_MAP_SIZE) as s:
        s.commit_local(SC, b"x", 1, 1, origin=A)
    with open_store(store_path, readonly=True) as s:
        assert s.version(SC) == {A: 1}
        with pytest.raises(StoreError, match="read-only"):
            s.commit_local(SC, b"y", 2, 2, origin=A)
    with pytest.raises(StoreError, match="does not exist"):
        open_store(store_path.parent / "missing", readonly=True)


# -- map growth ------------------------------------------------------------------------------


def test_map_grows_far_beyond_its_start_and_loses_nothing(store_path: Path) -> None:
    envelope_sizes = [100, 3000, 70_000, 400_000]
    with open_store(store_path, initial_map_size=MIN_MAP_SIZE) as s:
        for c in range(1, 201):
            size = envelope_sizes[c % 4]
            s.commit_local(SC, bytes([c % 256]) * size, c, c, origin=A)
        batch = [(B, bytes([c % 256]) * 20_000, c, c) for c in range(1, 501)]
        s.append_envelopes(SC, batch)  # 10 MB in one transaction on a grown map
        s.put_blob(b"big", 8 << 20, [digest(i) for i in range(8)],
                   {digest(i): bytes([i]) * (1 << 20) for i in range(8)})
        s.checkpoint(SC, os.urandom(12 << 20), {A: 100})  # one value bigger than the start
        st = s.statistics()
        assert st.growths >= 5 and st.map_size >= 32 * MIN_MAP_SIZE
    with open_store(store_path, initial_map_size=MIN_MAP_SIZE) as s:
        assert s.version(SC) == {A: 200, B: 500}
        got = s.envelopes_after(SC, A, 0, 1 << 28)
        assert [len(r.envelope) for r in got] == [envelope_sizes[c % 4] for c in range(1, 201)]
        assert all(r.envelope == bytes([r.first % 256]) * len(r.envelope) for r in got)
        assert len(s.envelopes_after(SC, B, 0, 1 << 28)) == 500
        assert s.get_chunk(digest(7)) == bytes([7]) * (1 << 20)
        snapshot = s.load_state(SC).snapshot
        assert snapshot is not None and len(snapshot) == 12 << 20
        assert s.statistics().map_size >= 32 * MIN_MAP_SIZE  # reopened at the grown size


def test_growth_stops_at_the_cap_without_damage(store_path: Path) -> None:
    with open_store(store_path, initial_map_size=MIN_MAP_SIZE, max_map_size=4 * MIN_MAP_SIZE
                    ) as s:
        s.commit_local(SC, b"keep", 1, 1, origin=A)
        with pytest.raises(StoreFull, match="max_map_size"):
            s.commit_local(SC, b"x" * (8 * MIN_MAP_SIZE), 2, 2, origin=A)
        with pytest.raises(StoreFull):
            s.append_envelopes(SC, [(B, b"y" * (MIN_MAP_SIZE // 2), c, c) for c in range(1, 20)])
        assert s.version(SC) == {A: 1}
        assert s.commit_local(SC, b"small", 2, 2, origin=A).value == "stored"
    with open_store(store_path) as s:
        assert [r.envelope for r in s.envelopes_after(SC, A, 0, 100)] == [b"keep", b"small"]


# -- bad input ---------------------------------------------------------------------------------

_BAD_CALLS: list[tuple[str, Any]] = [
    ("wrong sub-cloud type", lambda s: s.commit_local("S" * 16, b"e", 1, 1, origin=A)),
    ("empty sub-cloud id", lambda s: s.version(b"")),
    ("oversized sub-cloud id", lambda s: s.version(b"S" * 65)),
    ("oversized replica id", lambda s: s.commit_local(SC, b"e", 1, 1, origin=b"A" * 33)),
    ("short replica id", lambda s: s.append_envelopes(SC, [(b"A", b"e", 1, 1)])),
    ("counter zero", lambda s: s.commit_local(SC, b"e", 0, 1, origin=A)),
    ("counter too big", lambda s: s.commit_local(SC, b"e", 1, 1 << 63, origin=A)),
    ("bool counter", lambda s: s.commit_local(SC, b"e", True, 1, origin=A)),
    ("float counter", lambda s: s.commit_local(SC, b"e", 1.0, 1, origin=A)),
    ("last before first", lambda s: s.commit_local(SC, b"e", 5, 4, origin=A)),
    ("empty envelope", lambda s: s.commit_local(SC, b"", 1, 1, origin=A)),
    ("str envelope", lambda s: s.commit_local(SC, "e", 1, 1, origin=A)),
    ("items not tuples", lambda s: s.append_envelopes(SC, [[A, b"e", 1, 1]])),
    ("batch too long", lambda s: s.append_envelopes(SC, [(A, b"e", c, c) for c in
                                                          range(1, 10_002)])),
    ("negative limit", lambda s: s.envelopes_after(SC, A, 0, -1)),
    ("negative counter", lambda s: s.envelopes_after(SC, A, -1, 10)),
    ("version not a mapping", lambda s: s.checkpoint(SC, b"s", [(A, 1)])),
    ("version bad counter", lambda s: s.checkpoint(SC, b"s", {A: -1})),
    ("snapshot not bytes", lambda s: s.checkpoint(SC, "snap", {A: 1})),
    ("truncate bad origin", lambda s: s.truncate(SC, {b"x": 1})),
    ("short chunk hash", lambda s: s.put_chunks({b"h": b"data"})),
    ("oversized chunk hash", lambda s: s.has_chunks([b"h" * 65])),
    ("chunk not bytes", lambda s: s.put_chunks({digest(1): 12})),
    ("chunks as bytes", lambda s: s.put_chunks(b"xx")),
    ("oversized chunk", lambda s: s.put_chunks({digest(1): bytes(16 << 20 | 1)})),
    ("oversized blob id", lambda s: s.put_blob(b"b" * 65, 1, [digest(1)])),
    ("negative blob size", lambda s: s.put_blob(b"b", -1, [digest(1)])),
    ("bad hash in blob", lambda s: s.put_blob(b"b", 1, [digest(1), b"short"])),
    ("gc limit zero", lambda s: s.collect_garbage(0)),
    ("bad hashname", lambda s: s.get_peer("A" * 52)),
    ("not a peer record", lambda s: s.put_peer({"hashname": HN})),
    ("bad time", lambda s: s.remember_path(HN, {"type": "udp4"}, float("inf"))),
    ("path not a mapping", lambda s: s.remember_path(HN, "udp4", 1.0)),
]


@pytest.mark.parametrize("call", [c for _, c in _BAD_CALLS], ids=[n for n, _ in _BAD_CALLS])
def test_bad_input_is_a_usage_error_and_changes_nothing(store_path: Path, call: Any) -> None:
    with open_store(store_path, initial_map_size=MIN_MAP_SIZE) as s:
        s.commit_local(SC, b"e1", 1, 1, origin=A)
        s.put_peer(PeerRecord(HN, {"3a": b"k" * 32}))
        before = s.statistics().tables
        with pytest.raises(StoreUsageError):
            call(s)
        assert s.statistics().tables == before
    with open_store(store_path) as s:  # and the file still opens and reads
        assert s.version(SC) == {A: 1}
        assert s.envelopes_after(SC, A, 0, 10)[0].envelope == b"e1"


def test_open_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(StoreUsageError):
        open_store(tmp_path / "s", initial_map_size=1000)
    with pytest.raises(StoreUsageError):
        open_store(tmp_path / "s", initial_map_size=8 * MIN_MAP_SIZE, max_map_size=MIN_MAP_SIZE)
    with pytest.raises(StoreUsageError):
        open_store(42)  # type: ignore[arg-type]


# -- threads: the Trio shell's way of calling the store ---------------------------------------


async def test_concurrent_calls_from_trio_threads_while_the_map_grows(store: Store) -> None:
    writer = trio.CapacityLimiter(1)
    readers = trio.CapacityLimiter(4)
    seen_versions: list[int] = []

    async def write(origin: bytes) -> None:
        for c in range(1, 41):
            await trio.to_thread.run_sync(
                store.append_envelopes, SC, [(origin, bytes([c]) * 30_000, c, c)],
                limiter=writer,
            )

    async def read() -> None:
        for _ in range(60):
            v = await trio.to_thread.run_sync(store.version, SC, limiter=readers)
            seen_versions.append(v.get(A, 0))
            batch = await trio.to_thread.run_sync(
                store.envelopes_after, SC, A, 0, 1 << 20, limiter=readers
            )
            assert [r.first for r in batch] == list(range(1, len(batch) + 1))

    async with trio.open_nursery() as nursery:
        for origin in (A, B):
            nursery.start_soon(write, origin)
        for _ in range(3):
            nursery.start_soon(read)
    assert store.version(SC) == {A: 40, B: 40}
    assert store.statistics().growths >= 1
    assert seen_versions and max(seen_versions) <= 40


# -- a second process growing the map ------------------------------------------------------------

_GROWER = textwrap.dedent(
    """
    import sys
    from p2pcloud._store import open_store
    with open_store(sys.argv[1], initial_map_size=1 << 20) as s:
        s.append_envelopes(bytes(b"S" * 16),
                           [(b"B" * 16, bytes([c]) * 200_000, c, c) for c in range(1, 81)])
        print(s.statistics().map_size)
    """
)


def test_map_grown_by_another_process_is_adopted(store: Store) -> None:
    store.commit_local(SC, b"mine", 1, 1, origin=A)
    before = store.statistics().map_size
    done = subprocess.run(
        [sys.executable, "-c", _GROWER, store.path], cwd=REPO, capture_output=True, text=True,
        timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > before
    # our handle still has the small map: LMDB says MapResized, the store adopts and goes on
    assert store.version(SC) == {A: 1, B: 80}
    assert store.statistics().adopted == 1
    assert len(store.envelopes_after(SC, B, 0, 1 << 28)) == 80
    store.commit_local(SC, b"mine2", 2, 2, origin=A)
    assert store.statistics().map_size >= int(done.stdout)
