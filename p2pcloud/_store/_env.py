"""One LMDB environment: whole transactions, map growth, error translation.

Theory of operation
-------------------
:class:`Environment` owns the ``lmdb.Environment`` of one node and is the only code in
p2pcloud that touches py-lmdb directly. Every public store function runs exactly one
transaction through :meth:`Environment.write` or :meth:`Environment.read`: the function
passed in receives an open transaction, does all its work synchronously and returns. Nothing
holds a transaction across an ``await`` (STYLE.md section 3): the Trio shell calls store
functions with ``trio.to_thread.run_sync``.

Durability: LMDB's default synchronous commit. ``sync=True`` and ``metasync=True`` make
``mdb_txn_commit`` flush the data pages and then the meta page before it returns, and
``writemap=False`` keeps dirty pages out of the shared map until the commit writes them, so a
write is durable when its call returns and a crash at any instant leaves the last committed
state (LMDB's copy-on-write B+tree and its two alternating meta pages).

Growth: the map starts small (:data:`INITIAL_MAP_SIZE`) and doubles, up to a cap, whenever a
write transaction fails with ``MapFullError``; the transaction is then run again from the
start, so write functions must be pure functions of their transaction. ``mdb_env_set_mapsize``
may only be called when this process has no transaction open, so a small gate lets readers
and the writer in (shared) and lets a resize wait until they are all out (exclusive). When
another process grew the map, LMDB reports ``MapResizedError`` on ``begin``; we adopt the new
size (``set_mapsize(0)``) and retry.

Errors: every ``lmdb.Error`` and ``OSError`` is translated into :class:`StoreError` (or
:class:`StoreFull`) with ``from exc``, and the message says what to do.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, TypeVar

import lmdb

from p2pcloud.errors import StoreError, StoreFull

__all__ = [
    "INITIAL_MAP_SIZE",
    "MAX_MAP_SIZE",
    "MIN_MAP_SIZE",
    "Environment",
    "translate",
]

T = TypeVar("T")

MIB: Final = 1 << 20
MIN_MAP_SIZE: Final = 1 * MIB  # smaller maps only churn through growth steps (tests use it)
INITIAL_MAP_SIZE: Final = 64 * MIB  # modest: a fresh node's address space, not its disk
MAX_MAP_SIZE: Final = 1 << 40
"""Default cap on map growth (1 TiB).

The map is address space, not disk (without ``writemap`` the file grows only with the
pages actually written), so the cap only stops a runaway writer from exhausting the disk;
a home box holding many files may raise it with ``open_store(max_map_size=...)``."""
MAX_DBS: Final = 16  # named sub-databases: the store uses 11, the rest is headroom
MAX_READERS: Final = 126  # LMDB's default reader table: threads x processes reading at once
FILE_MODE: Final = 0o600  # the store holds private data: owner read/write only
DIR_MODE: Final = 0o700


def translate(exc: BaseException, path: str, doing: str) -> StoreError:
    """Turn an LMDB or OS error into a StoreError whose message says what to do.

    Args:
        exc: the error py-lmdb (or the OS) raised.
        path: the store's directory, named in the message.
        doing: what the store was doing, e.g. ``"opening"`` or ``"writing"``.

    Returns:
        A :class:`StoreError` (or :class:`StoreFull`) to raise ``from exc``.
    """
    where = f"the store at {path!r}"
    if isinstance(exc, lmdb.MapFullError):
        return StoreFull(
            f"{where} is full while {doing}: its map reached the size cap; open it with a larger "
            "max_map_size, or free space (collect garbage, truncate logs)"
        )
    if isinstance(exc, lmdb.LockError):
        return StoreError(
            f"{where} could not take its lock while {doing}: another process may hold it "
            "(is another p2pcloudd running on this data directory?); stop it and retry"
        )
    if isinstance(exc, lmdb.ReadersFullError):
        return StoreError(
            f"{where} has no free reader slot while {doing}: too many processes or threads "
            "are reading it; stop the other processes using it and retry"
        )
    if isinstance(
        exc,
        lmdb.CorruptedError
        | lmdb.PageNotFoundError
        | lmdb.PanicError
        | lmdb.BadChecksumError
        | lmdb.InvalidError
        | lmdb.VersionMismatchError,
    ):
        return StoreError(
            f"{where} is corrupt or not an LMDB store ({exc}) while {doing}: move it aside "
            "and let the node re-sync from its peers, or restore it from a backup"
        )
    if "already open in this process" in str(exc):
        return StoreError(
            f"{where} is already open in this process while {doing}: LMDB allows one handle "
            "per process; share the one Store object (close it before opening it again)"
        )
    if isinstance(exc, lmdb.ReadonlyError):
        return StoreError(f"{where} was opened read-only; open it writable to change it")
    err = getattr(exc, "errno", None)
    if err is None and isinstance(exc, lmdb.Error) and exc.args:
        # py-lmdb reports OS failures as lmdb.Error with the errno's text
        text = str(exc)
        for code in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
                     errno.ENOENT, errno.ENOTDIR):
            if os.strerror(code) in text:
                err = code
    if err in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"the disk holding {where} is full while {doing}: free disk space")
    if err in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError(
            f"no permission for {where} while {doing} ({exc}): check the directory's owner "
            "and mode, and that the disk is not read-only"
        )
    if err in (errno.ENOENT, errno.ENOTDIR):
        return StoreError(
            f"{where} does not exist or is not a directory ({exc}) while {doing}: check the "
            "path (a read-only open never creates a store)"
        )
    return StoreError(f"{where} failed while {doing}: {exc}; check the disk and retry")


def _damaged(path: str, doing: str) -> StoreError:
    return StoreError(
        f"the store at {path!r} holds a damaged record (found while {doing}): restore it "
        "from a backup, or move it aside and let the node re-sync from its peers"
    )


class _Gate:
    """Shared/exclusive gate: transactions enter shared, a map resize enters exclusive."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._users = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._users += 1
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                if self._users == 0:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._users:
                self._cond.wait()
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class Environment:
    """One node's LMDB environment with named sub-databases, growth and translated errors.

    Thread-safe: transactions may run from any thread (py-lmdb opens LMDB with
    ``MDB_NOTLS``), but each runs start to finish inside one call.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        names: tuple[bytes, ...],
        *,
        initial_map_size: int = INITIAL_MAP_SIZE,
        max_map_size: int = MAX_MAP_SIZE,
        readonly: bool = False,
    ) -> None:
        """Open (creating if needed and writable) the environment and its sub-databases.

        Args:
            path: the store's directory.
            names: the named sub-databases to open (created when writable).
            initial_map_size: the map size to start with, bytes (at least ``MIN_MAP_SIZE``).
            max_map_size: the cap on automatic growth, bytes.
            readonly: open without write access (another process may write meanwhile).

        Raises:
            StoreUsageError: a size is out of range (raised by the caller's checks).
            StoreError: the directory cannot be created or opened; the message says why.
        """
        self.path = os.fspath(path)
        self.max_map_size = max_map_size
        self.readonly = readonly
        self.growths = 0  # map growths made by this handle
        self.adopted = 0  # map sizes adopted from another process (MapResizedError)
        self._gate = _Gate()
        self._write_lock = threading.Lock()
        self._closed = False
        try:
            if not readonly:
                Path(self.path).mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            self._env = lmdb.open(
                self.path,
                map_size=initial_map_size,
                subdir=True,
                readonly=readonly,
                create=not readonly,
                # durability: the defaults, stated so nobody "optimises" them away
                sync=True,
                metasync=True,
                map_async=False,
                writemap=False,
                lock=True,
                mode=FILE_MODE,
                readahead=False,  # random access to a store larger than RAM: no readahead waste
                max_dbs=MAX_DBS,
                max_readers=MAX_READERS,
            )
        except (lmdb.Error, OSError) as exc:
            raise translate(exc, self.path, "opening") from exc
        try:
            # a process killed while reading leaves its reader slot behind; clear those so
            # their stale snapshots do not pin old pages (and the map does not grow for them)
            self._env.reader_check()
            if self._env.info()["map_size"] < initial_map_size and not readonly:
                self._env.set_mapsize(initial_map_size)
            self.dbs: dict[bytes, Any] = {}
            if readonly:
                # py-lmdb keeps a handle opened inside a read transaction only for that
                # transaction; opened on its own, it lives as long as the environment
                with self._env.begin() as txn:
                    existing = set(self._env.dbs(txn))
                for name in names:
                    if name in existing:
                        self.dbs[name] = self._env.open_db(name, create=False)
            else:
                with self._env.begin(write=True) as txn:
                    for name in names:
                        self.dbs[name] = self._env.open_db(name, txn=txn, create=True)
        except (lmdb.Error, OSError) as exc:
            self._env.close()
            raise translate(exc, self.path, "opening its tables") from exc

    # -- transactions ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the store at {self.path!r} is closed; open it again to use it")

    def write(self, fn: Callable[[Any], T], doing: str) -> T:
        """Run ``fn(txn)`` in one write transaction and commit it durably.

        ``fn`` may run more than once (after the map grew), so it must depend only on its
        transaction. Any exception from ``fn`` aborts the transaction: nothing is written.

        Args:
            fn: the work; receives the open write transaction.
            doing: what the work is, for error messages.

        Returns:
            What ``fn`` returned, after the commit reached the disk.

        Raises:
            StoreFull: the map reached ``max_map_size`` or the disk is full.
            StoreError: LMDB failed; the store is unchanged.
        """
        if self.readonly:
            raise StoreError(
                f"the store at {self.path!r} was opened read-only; open it writable to change it"
            )
        with self._write_lock:
            while True:
                self._check_open()
                try:
                    with self._gate.shared():
                        txn = self._env.begin(write=True)
                        try:
                            result = fn(txn)
                            txn.commit()
                        except BaseException:
                            txn.abort()
                            raise
                    return result
                except lmdb.MapFullError as exc:
                    self._grow(exc, doing)
                except lmdb.MapResizedError:
                    self._adopt_size(doing)
                except (lmdb.Error, OSError) as exc:
                    raise translate(exc, self.path, doing) from exc
                except struct.error as exc:  # a stored value of the wrong length
                    raise _damaged(self.path, doing) from exc

    def read(self, fn: Callable[[Any], T], doing: str) -> T:
        """Run ``fn(txn)`` in one read transaction (a consistent snapshot).

        Args:
            fn: the work; receives the open read-only transaction.
            doing: what the work is, for error messages.

        Returns:
            What ``fn`` returned.

        Raises:
            StoreError: LMDB failed.
        """
        while True:
            self._check_open()
            try:
                with self._gate.shared(), self._env.begin() as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                self._adopt_size(doing)
            except (lmdb.Error, OSError) as exc:
                raise translate(exc, self.path, doing) from exc
            except struct.error as exc:  # a stored value of the wrong length
                raise _damaged(self.path, doing) from exc

    def _grow(self, exc: lmdb.MapFullError, doing: str) -> None:
        # called with the write lock held and no transaction of ours open
        current = self._env.info()["map_size"]
        if current >= self.max_map_size:
            raise translate(exc, self.path, doing) from exc
        new = min(current * 2, self.max_map_size)
        with self._gate.exclusive():
            self._env.set_mapsize(new)
        self.growths += 1

    def _adopt_size(self, doing: str) -> None:
        try:
            with self._gate.exclusive():
                self._env.set_mapsize(0)  # LMDB: 0 adopts the size another process set
            self.adopted += 1
        except lmdb.Error as exc:
            raise translate(exc, self.path, doing) from exc

    # -- information -------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """LMDB's environment info (``map_size``, ``last_pgno``, ...) and ``psize``."""
        self._check_open()
        try:
            out = dict(self._env.info())
            out["psize"] = self._env.stat()["psize"]
            return out
        except lmdb.Error as exc:
            raise translate(exc, self.path, "reading its info") from exc

    def close(self) -> None:
        """Close the environment after every running transaction ended. Idempotent."""
        with self._write_lock, self._gate.exclusive():
            if not self._closed:
                self._closed = True
                self._env.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran."""
        return self._closed
