"""The folder watcher under Trio (watchfiles' awatch runs on anyio, which runs on trio)."""

from __future__ import annotations

from pathlib import Path

import trio

from p2pcloud._core import Replica
from p2pcloud.files import COLLECTION, Folder, FolderWatcher

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
