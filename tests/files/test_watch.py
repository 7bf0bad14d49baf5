"""The folder watcher under Trio (watchfiles' awatch runs on anyio, which runs on trio)."""

from __future__ import annotations

import time
from pathlib import Path

import trio

from p2pcloud._core import Replica
from p2pcloud.files import COLLECTION, Folder, FolderWatcher, ReconcileResult, watch_and_reconcile

T0 = 1_767_225_600_000


async def _wait_for(watcher: FolderWatcher, root: Path, rel: str, data: bytes) -> set[str]:
    """Write ``rel`` until the watcher reports it (the OS watch may start a moment late)."""
    seen: set[str] = set()
    with trio.fail_after(30):  # a hang guard, not a timing assertion
        while rel not in seen:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
            with trio.move_on_after(2):
                seen |= await watcher.wait_changes()
    return seen


async def test_watcher_notices_changes_and_drives_a_reconcile(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    root.mkdir()
    replica = Replica(b"w" * 16)
    folder = Folder(root, replica, device="watcher", index_path=tmp_path / "index")
    watcher = FolderWatcher(root, debounce_ms=50)
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        seen = await _wait_for(watcher, root, "sub/new.txt", b"hello")
        # our own temporary files are not reported
        assert not any(p.startswith(".p2pcloud") for p in seen)
        result = await trio.to_thread.run_sync(
            lambda: folder.reconcile(sorted(seen), now_ms=T0))
        assert result.delta
        assert replica.documents(COLLECTION) == ["sub/new.txt"]
        (root / ".p2pcloud-tmp-x").write_bytes(b"ignored")
        seen = await _wait_for(watcher, root, "second.txt", b"again")
        assert ".p2pcloud-tmp-x" not in seen
        watcher.stop()
    # run() returned after stop(): the nursery closed


async def test_watcher_stops_on_cancellation(tmp_path: Path) -> None:
    watcher = FolderWatcher(tmp_path, debounce_ms=50)
    with trio.fail_after(30):  # a hang guard: the watch thread checks for stop twice a second
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)
            await _wait_for(watcher, tmp_path, "x.txt", b"x")
            nursery.cancel_scope.cancel()
    assert nursery.cancel_scope.cancelled_caught


async def test_watch_and_reconcile_publishes_changes_until_stopped(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    root.mkdir()
    (root / "before.txt").write_bytes(b"there before the watch")
    replica = Replica(b"v" * 16)
    folder = Folder(root, replica, device="w", index_path=tmp_path / "index")
    deltas: list[bytes] = []
    published = trio.Event()

    async def on_result(result: ReconcileResult) -> None:
        if result.delta:
            deltas.append(result.delta)
        if "later.txt" in replica.documents(COLLECTION):
            published.set()

    with trio.fail_after(30):  # a hang guard, not a timing assertion
        async with trio.open_nursery() as nursery:
            watcher = await nursery.start(watch_and_reconcile, folder, on_result)
            while not published.is_set():
                (root / "later.txt").write_bytes(b"written while watched")
                with trio.move_on_after(2):
                    await published.wait()
            watcher.stop()
    assert replica.documents(COLLECTION) == ["before.txt", "later.txt"]
    other = Replica(b"o" * 16)
    other.apply(deltas, time.time_ns() // 1_000_000)  # the folder used the wall clock
    assert other.documents(COLLECTION) == ["before.txt", "later.txt"]
