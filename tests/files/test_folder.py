"""Folder sync between real folders through two core Replicas."""

from __future__ import annotations

import os
import random
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from p2pcloud.blobs import BlobFetch, ChunkVerified, Want, answer, chunk_buffer
from p2pcloud.errors import UnsafePath
from p2pcloud.files import (
    COLLECTION,
    FIELD,
    BlobMissing,
    ConflictCopied,
    FileRenamed,
    FileSkipped,
    FileVersion,
    FileWritten,
    Folder,
    PathRefused,
)
from p2pcloud.files import disk as disk_mod
from tests.files.conftest import Device, pump

T0 = 1_767_225_600 * 10**9  # mtimes the tests set, in ns
Make = Callable[[int], list[Device]]


def _mode(d: Device, rel: str) -> int:
    return stat.S_IMODE(os.stat(d.root / rel).st_mode)


def _mtime(d: Device, rel: str) -> int:
    return os.stat(d.root / rel).st_mtime_ns


def test_create_modify_rename_delete_chmod_mtime_round_trip(devices: Make) -> None:
    a, b = devices(2)
    big = random.Random(1).randbytes(2 * 1024 * 1024)
    a.write("big.bin", big, mtime_ns=T0)
    a.write("docs/readme.md", b"# hello\n", mtime_ns=T0 + 1, mode=0o600)
    a.write("docs/deep/er/x.txt", b"x", mtime_ns=T0 + 2, mode=0o755)
    a.write("empty", b"", mtime_ns=T0 + 3)
    pump([a, b])
    assert b.files() == a.files()
    for rel in ("big.bin", "docs/readme.md", "docs/deep/er/x.txt", "empty"):
        assert _mtime(b, rel) == _mtime(a, rel)
        assert _mode(b, rel) == _mode(a, rel)
    assert _mode(b, "docs/readme.md") == 0o600 and _mode(b, "docs/deep/er/x.txt") == 0o755

    # modify in the middle of the big file: only the chunks around the edit travel
    b.fetched.clear()
    edited = big[:1_000_000] + b"EDIT" * 10 + big[1_000_040:]
    a.write("big.bin", edited, mtime_ns=T0 + 10)
    pump([a, b])
    assert b.read("big.bin") == edited and _mtime(b, "big.bin") == T0 + 10
    sizes = {c.hash: c.size for c in chunk_buffer(edited)}
    sent = sum(sizes[h] for h in set(b.fetched))
    assert 0 < sent < 0.25 * len(edited)

    # rename: a delete plus a create of the same blob; nothing is fetched
    b.fetched.clear()
    os.rename(a.root / "big.bin", a.root / "docs/moved.bin")
    results = pump([a, b])
    assert any(isinstance(e, FileRenamed) and (e.old, e.new) == ("big.bin", "docs/moved.bin")
               for r in results for e in r.events)
    assert b.fetched == []
    assert not (b.root / "big.bin").exists()
    assert b.read("docs/moved.bin") == edited

    # delete
    os.unlink(a.root / "docs/readme.md")
    pump([a, b])
    assert not (b.root / "docs/readme.md").exists()

    # chmod and touch on b go back to a, without re-reading content
    os.chmod(b.root / "empty", 0o640)
    os.utime(b.root / "docs/deep/er/x.txt", ns=(T0 + 99, T0 + 99))
    results = pump([b, a])
    assert _mode(a, "empty") == 0o640
    assert _mtime(a, "docs/deep/er/x.txt") == T0 + 99
    assert any(isinstance(e, FileWritten) and e.metadata_only for r in results for e in r.events)
    assert a.files() == b.files()
    assert a.folder.conflicts() == [] and b.folder.conflicts() == []


def test_rescan_reads_nothing_unchanged_and_survives_a_restart(devices: Make) -> None:
    (a,) = devices(1)
    for i in range(50):
        a.write(f"d{i % 5}/f{i}.txt", f"file {i}".encode(), mtime_ns=T0 + i)
    first = a.reconcile()
    assert first.hashed_files == 50 and first.delta
    again = a.reconcile()
    assert again.hashed_files == 0 and again.delta == b"" and again.events == []
    a.reopen()  # the index was saved: a restart does not rehash either
    assert a.reconcile().hashed_files == 0
    a.write("d1/f1.txt", b"changed", mtime_ns=T0 + 1000)
    one = a.reconcile(["d1"])  # an incremental reconcile of one directory
    assert one.hashed_files == 1 and one.delta


def test_concurrent_edits_keep_both_versions_and_list_the_conflict(devices: Make) -> None:
    a, b = devices(2)
    a.write("notes.txt", b"v0", mtime_ns=T0)
    pump([a, b])
    # both edit before hearing of the other's edit
    a.write("notes.txt", b"alpha's edit", mtime_ns=T0 + 10**9)
    b.write("notes.txt", b"bravo's longer edit", mtime_ns=T0 + 2 * 10**9)
    da, db = a.reconcile().delta, b.reconcile().delta
    assert da and db
    # the register keeps both values on both sides
    b.receive([da])
    a.receive([db])
    assert len(a.folder.versions("notes.txt")) == 2
    pump([a, b])
    for d in (a, b):
        files = d.files()
        assert set(files.values()) == {b"alpha's edit", b"bravo's longer edit"}
        assert len(files) == 2
        conflicts = d.folder.conflicts()
        assert len(conflicts) == 1
        c = conflicts[0]
        assert c.path == "notes.txt" and c.copy is not None and c.copy.startswith("notes.conflict-")
        assert files[c.copy] != files["notes.txt"]
        assert c.device in ("alpha", "bravo")
    assert a.files() == b.files()
    # the user discards the copy: deleting it resolves the conflict everywhere
    copy = a.folder.conflicts()[0].copy
    assert copy is not None
    os.unlink(a.root / copy)
    pump([a, b])
    assert a.folder.conflicts() == [] and b.folder.conflicts() == []
    assert a.files() == b.files() and len(a.files()) == 1


def test_local_edit_while_a_remote_edit_arrives_is_kept(devices: Make) -> None:
    a, b = devices(2)
    a.write("f.txt", b"base", mtime_ns=T0)
    pump([a, b])
    a.write("f.txt", b"from alpha", mtime_ns=T0 + 10**9)
    da = a.reconcile().delta
    b.write("f.txt", b"unscanned edit on bravo", mtime_ns=T0 + 3 * 10**9)
    touched = b.receive([da])  # the replica moves on before bravo's scan saw its edit
    result = b.reconcile(touched)
    assert b.read("f.txt") == b"unscanned edit on bravo"  # never overwritten
    copied = [e for e in result.events if isinstance(e, ConflictCopied)]
    assert len(copied) == 1 and copied[0].device == "alpha"
    assert b.read(copied[0].copy) == b"from alpha"
    a.receive([result.delta])
    pump([a, b])
    assert a.files() == b.files()
    assert len(a.folder.conflicts()) == 1


def test_edit_wins_over_a_concurrent_delete(devices: Make) -> None:
    a, b = devices(2)
    a.write("keep.txt", b"v0", mtime_ns=T0)
    pump([a, b])
    os.unlink(a.root / "keep.txt")
    b.write("keep.txt", b"edited while alpha deleted it", mtime_ns=T0 + 10**9)
    da, db = a.reconcile().delta, b.reconcile().delta
    a.receive([db])
    b.receive([da])
    pump([a, b])
    assert a.read("keep.txt") == b.read("keep.txt") == b"edited while alpha deleted it"


def test_a_crash_between_write_and_rename_leaves_the_old_file(
        devices: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = devices(2)
    a.write("doc.txt", b"old content", mtime_ns=T0)
    pump([a, b])
    a.write("doc.txt", b"new content that must not appear half-written", mtime_ns=T0 + 5)
    touched = b.receive([a.reconcile().delta])

    def crash(_src: object, _dst: object) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(disk_mod, "_replace", crash)
    result = b.reconcile(touched)
    assert any(isinstance(e, FileSkipped) and "crash" in e.reason for e in result.events)
    assert b.read("doc.txt") == b"old content"
    assert sorted(p.name for p in b.root.iterdir()) == ["doc.txt"]  # temp file removed

    # a real crash leaves the temp file behind: the next full scan removes it, unsynced
    (b.root / ".p2pcloud-tmp-deadbeef").write_bytes(b"partial")
    monkeypatch.undo()
    b.reconcile()
    assert b.read("doc.txt") == b"new content that must not appear half-written"
    assert sorted(p.name for p in b.root.iterdir()) == ["doc.txt"]
    assert b"partial" not in a.files().values()


def test_a_local_edit_during_a_remote_write_is_not_replaced(
        devices: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = devices(2)
    a.write("race.txt", b"v0", mtime_ns=T0)
    pump([a, b])
    a.write("race.txt", b"remote v1", mtime_ns=T0 + 5)
    touched = b.receive([a.reconcile().delta])
    # the user saves the file after the decision, while the new version is being written
    original = disk_mod.begin_write

    def racing_write(*args, **kwargs):  # type: ignore[no-untyped-def]
        pending = original(*args, **kwargs)
        b.write("race.txt", b"user's save during the write", mtime_ns=T0 + 7)
        return pending

    monkeypatch.setattr(disk_mod, "begin_write", racing_write)
    result = b.reconcile(touched)
    assert any(isinstance(e, FileSkipped) for e in result.events)
    assert b.read("race.txt") == b"user's save during the write"
    monkeypatch.undo()
    pump([a, b])  # the save is then a late conflict: both versions kept
    assert set(b.files().values()) == {b"remote v1", b"user's save during the write"}
    assert a.files() == b.files()


def test_unsafe_remote_paths_and_symlinks_are_refused(devices: Make, tmp_path: Path) -> None:
    a, b = devices(2)
    outside = tmp_path / "outside"
    outside.mkdir()
    a.write("ok.txt", b"fine", mtime_ns=T0)
    a.write("sub/inner.txt", b"inner", mtime_ns=T0)
    pump([a, b])
    version = a.folder.versions("ok.txt")[0]
    # a hostile peer writes document ids that point out of the folder
    a.replica.begin(a.clock())
    for bad in ("../escape.txt", "/abs.txt", "x/../../y.txt", ".p2pcloud-tmp-1", "a//b"):
        a.replica.set_mv(COLLECTION, bad, FIELD, version.to_value())
    delta = a.replica.commit()
    # bravo's sub directory is now a symlink to somewhere outside
    os.unlink(b.root / "sub/inner.txt")
    os.rmdir(b.root / "sub")
    os.symlink(outside, b.root / "sub")
    a.write("sub/new.txt", b"through the link?", mtime_ns=T0 + 1)
    touched = b.receive([delta, a.reconcile().delta])
    result = b.reconcile(touched)
    refused = {e.path for e in result.events if isinstance(e, PathRefused)}
    assert {"../escape.txt", "/abs.txt", "x/../../y.txt", ".p2pcloud-tmp-1", "a//b"} <= refused
    assert "sub/new.txt" in refused
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "escape.txt").exists()
    # a symlink in a folder is not synced
    os.symlink(outside, a.root / "link-to-outside")
    assert a.reconcile().delta == b""
    assert a.folder.versions("link-to-outside") == []


def test_missing_chunks_are_reported_then_fetched_with_the_planner(devices: Make) -> None:
    a, b = devices(2)
    b.peers = []  # bravo cannot read alpha's files directly: chunks must be fetched
    data = random.Random(3).randbytes(600_000)
    a.write("photo.jpg", data, mtime_ns=T0)
    touched = b.receive([a.reconcile().delta])
    result = b.reconcile(touched)
    assert [type(e) for e in result.events] == [BlobMissing]
    missing = result.events[0]
    assert isinstance(missing, BlobMissing) and missing.manifest is None  # manifest first
    # the manifest arrives (what an mwant to alpha brings), but no chunk yet
    manifest = a.folder.manifest(missing.blob)
    assert manifest is not None
    b.folder = Folder(b.root, b.replica, device=b.name, index_path=b.root.parent / "b2.index",
                      chunks=b.store.get, manifests={manifest.blob_hash: manifest}.get)
    result = b.reconcile(touched)
    event = result.missing[manifest.blob_hash]
    assert set(event.chunks) == set(manifest.unique_chunks())
    fetch = BlobFetch(manifest, b.store.__contains__)
    fetch.add_peer(a.name)  # type: ignore[arg-type]
    while not fetch.is_complete():
        for peer, hashes in fetch.requests(0.0):
            for reply in answer(Want(tuple(hashes)), a.folder.read_chunk, a.folder.manifest):
                got = fetch.receive_chunk(peer, reply.hash, reply.data)  # type: ignore[union-attr]
                assert isinstance(got, ChunkVerified)
                b.store[got.hash] = got.data
    result = b.reconcile(touched)
    assert b.read("photo.jpg") == data
    assert FileVersion.from_value(
        b.replica.get(COLLECTION, "photo.jpg", FIELD)[0]).blob == manifest.blob_hash  # type: ignore[union-attr]


def test_a_lost_or_corrupt_index_costs_a_rehash_not_data(devices: Make) -> None:
    a, b = devices(2)
    a.write("same.txt", b"same on both", mtime_ns=T0)
    a.write("moved-on.txt", b"v1", mtime_ns=T0)
    pump([a, b])
    # bravo's index is corrupted while the replica moves on and bravo edits a file
    (b.root.parent / "bravo.index").write_bytes(b"\xff not cbor")
    b.write("moved-on.txt", b"bravo's edit, unscanned", mtime_ns=T0 + 5 * 10**9)
    b.reopen()
    assert b.folder.index_recovered
    result = b.reconcile()
    assert result.hashed_files == 2
    # the unchanged file is adopted, the edited one is kept (as the winner) with the replica's
    # version beside it: nothing overwritten
    assert b.read("same.txt") == b"same on both"
    assert b.read("moved-on.txt") == b"bravo's edit, unscanned"
    assert [c.path for c in b.folder.conflicts()] == ["moved-on.txt"]
    a.receive([result.delta])
    pump([a, b])
    assert a.files() == b.files()


def test_writes_made_before_an_error_still_reach_a_delta(
        devices: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = devices(2)
    a.write("one.txt", b"1", mtime_ns=T0)
    a.write("two.txt", b"2", mtime_ns=T0)
    real = a.folder._write
    calls = []

    def failing_write(w):  # type: ignore[no-untyped-def]
        calls.append(w)
        if len(calls) == 2:
            raise RuntimeError("a bug in the middle of a publish")
        real(w)

    monkeypatch.setattr(a.folder, "_write", failing_write)
    with pytest.raises(RuntimeError):
        a.reconcile()
    assert len(a.folder.unsent_deltas) == 1
    b.receive(a.folder.unsent_deltas)
    assert b.replica.documents(COLLECTION) == [calls[0].path]


def test_conflicts_resolved_through_the_api(devices: Make) -> None:
    a, b = devices(2)
    for name in ("x.txt", "y.txt"):
        a.write(name, b"base", mtime_ns=T0)
    pump([a, b])
    for name in ("x.txt", "y.txt"):
        a.write(name, b"alpha " + name.encode(), mtime_ns=T0 + 10**9)
        b.write(name, b"bravo " + name.encode(), mtime_ns=T0 + 2 * 10**9)
    da, db = a.reconcile().delta, b.reconcile().delta
    a.receive([db])
    b.receive([da])
    pump([a, b])
    conflicts = {c.path: c for c in a.folder.conflicts()}
    assert set(conflicts) == {"x.txt", "y.txt"}
    x_copy, y_copy = conflicts["x.txt"].copy, conflicts["y.txt"].copy
    assert x_copy is not None and y_copy is not None
    kept = a.read(y_copy)
    b.receive([a.folder.resolve_conflict(x_copy, now_ms=a.clock())])  # discard x's copy
    b.receive([a.folder.resolve_conflict(y_copy, keep_copy=True, now_ms=a.clock())])
    pump([a, b])
    for d in (a, b):
        assert d.folder.conflicts() == []
        assert sorted(d.files()) == ["x.txt", "y.txt"]
        assert d.read("y.txt") == kept
    with pytest.raises(UnsafePath):
        a.folder.resolve_conflict("x.txt")


def test_incremental_reconcile_of_a_deleted_directory(devices: Make) -> None:
    import shutil

    a, b = devices(2)
    for i in range(3):
        a.write(f"docs/sub/f{i}.txt", b"x" * i, mtime_ns=T0)
    a.write("keep.txt", b"k", mtime_ns=T0)
    pump([a, b])
    shutil.rmtree(a.root / "docs")
    result = a.reconcile(["docs"])  # what a watcher reports for a removed directory
    assert sorted(e.path for e in result.events if hasattr(e, "path")) == [
        "docs/sub/f0.txt", "docs/sub/f1.txt", "docs/sub/f2.txt"]
    touched = b.receive([result.delta])
    b.reconcile(touched)
    assert sorted(b.files()) == ["keep.txt"]
