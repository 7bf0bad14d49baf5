"""Watching a folder for changes, under Trio, to trigger incremental reconciles.

``watchfiles`` (Rust ``notify``: inotify, FSEvents, ReadDirectoryChangesW) does the
watching; its ``awatch`` runs on anyio, which runs on Trio. Events are debounced there (an
editor's save is several events within milliseconds: temp file, write, rename) and then
collected here into a set of relative paths, so a burst becomes one incremental reconcile
of the paths it touched, never a rescan of the world (Syncthing's complaint, peers.md §2).

Watchers can miss events (queue overflow, network file systems), so the node should still
run a full :meth:`Folder.reconcile` now and then; with an up-to-date index that costs one
stat per file and no reading.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final

import anyio
import trio
from watchfiles import Change, awatch

from p2pcloud.files.paths import is_internal

if TYPE_CHECKING:
    from p2pcloud.files.folder import Folder, ReconcileResult

__all__ = ["DEBOUNCE_MS", "FolderWatcher", "watch_and_reconcile"]

DEBOUNCE_MS: Final = 300
"""Changes within 300 ms are grouped: longer than an editor's save sequence (tens of ms),
short enough that a saved file starts syncing at once for a person watching."""
STEP_MS: Final = 50  # how long the watcher waits for a burst to go quiet before yielding
STOP_CHECK_MS: Final = 500  # the watch thread checks for stop this often (bounds shutdown)
MAX_PENDING_PATHS: Final = 100_000
"""Paths collected before the consumer takes them; beyond that the watcher asks for a full
reconcile instead (an empty path "" stands for the whole folder)."""


def _keep(_change: Change, path: str) -> bool:
    # our temporary files and metadata are not changes to sync
    return not any(is_internal(part) for part in Path(path).parts)


class FolderWatcher:
    """Collects changed paths of one folder; :meth:`wait_changes` hands them out in batches.

    Use::

        watcher = FolderWatcher(root)
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)
            while True:
                paths = await watcher.wait_changes()
                result = await trio.to_thread.run_sync(folder.reconcile, paths)
    """

    def __init__(self, root: Path, *, debounce_ms: int = DEBOUNCE_MS,
                 force_polling: bool | None = None) -> None:
        """Prepare a watcher (nothing runs until :meth:`run`).

        Args:
            root: the folder root.
            debounce_ms: how long changes are grouped.
            force_polling: poll instead of OS notifications (network file systems).
        """
        self.root = Path(root)
        self._real_root = os.path.realpath(self.root)
        self._debounce = debounce_ms
        self._force_polling = force_polling
        self._pending: set[str] = set()
        self._ready = trio.Event()
        self._stop: anyio.Event | None = None

    def _relative(self, path: str) -> str | None:
        real = os.path.realpath(path) if os.path.islink(path) else path
        for base in (self._real_root, str(self.root)):
            try:
                rel = os.path.relpath(real, base)
            except ValueError:  # another drive on Windows
                continue
            if rel == ".":
                return ""
            if not rel.startswith(".."):
                return rel.replace(os.sep, "/")
        return None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Watch until cancelled or :meth:`stop` is called (start it in a nursery)."""
        self._stop = anyio.Event()
        task_status.started()
        async for changes in awatch(
            self.root, watch_filter=_keep, debounce=self._debounce, step=STEP_MS,
            stop_event=self._stop, rust_timeout=STOP_CHECK_MS,
            force_polling=self._force_polling,
        ):
            for _change, path in changes:
                rel = self._relative(path)
                if rel is not None:
                    self._pending.add(rel)
            if len(self._pending) > MAX_PENDING_PATHS:
                self._pending = {""}
            if self._pending:
                self._ready.set()

    def stop(self) -> None:
        """Ask :meth:`run` to return (within STOP_CHECK_MS)."""
        if self._stop is not None:
            self._stop.set()

    async def wait_changes(self) -> set[str]:
        """Wait for changes and take them.

        Returns:
            Relative POSIX paths that changed (files or directories); ``{""}`` means the
            whole folder. Pass them to :meth:`p2pcloud.files.Folder.reconcile`.
        """
        while not self._pending:
            await self._ready.wait()
            self._ready = trio.Event()
        out, self._pending = self._pending, set()
        return out


async def watch_and_reconcile(
    folder: Folder,
    on_result: Callable[[ReconcileResult], Awaitable[None]],
    *,
    debounce_ms: int = DEBOUNCE_MS,
    limiter: trio.CapacityLimiter | None = None,
    task_status: trio.TaskStatus[FolderWatcher] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep a folder published: a full reconcile, then one incremental reconcile per batch.

    Runs until cancelled. Each reconcile runs in a worker thread (it reads and hashes
    files), one at a time; changes that arrive meanwhile are batched for the next one.

    Args:
        folder: the folder (no other task may reconcile it meanwhile).
        on_result: called with each result (send ``result.delta``, fetch what is missing).
        debounce_ms: how long changes are grouped.
        limiter: the worker-thread limiter to use (e.g. shared by all folders of a node).
        task_status: started with the watcher (its ``stop()`` ends this task).
    """
    watcher = FolderWatcher(folder.root, debounce_ms=debounce_ms)
    async with trio.open_nursery() as nursery:

        async def run_watcher(*, task_status: trio.TaskStatus[None]) -> None:
            await watcher.run(task_status=task_status)
            nursery.cancel_scope.cancel()  # stop() was called: end the loop below too

        await nursery.start(run_watcher)
        task_status.started(watcher)
        paths: list[str] | None = None  # the first pass looks at everything
        while True:
            result = await trio.to_thread.run_sync(folder.reconcile, paths, limiter=limiter)
            await on_result(result)
            changed = await watcher.wait_changes()
            paths = None if "" in changed else sorted(changed)
