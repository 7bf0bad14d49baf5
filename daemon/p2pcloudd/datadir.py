"""The daemon's files in the data dir: lock, remembered state, API token, API address.

Layout (docs/daemon.md "Data dir"):

| file | written by | mode | what |
| --- | --- | --- | --- |
| ``identity.key`` | the node, first start | 0600 | the endpoint's keys (p2pcloud._keyfile) |
| ``config.toml`` | you (optional) | any | options, see :mod:`p2pcloudd.config` |
| ``state.json`` | the daemon | 0600 | ports it chose, known peers (with their link URIs) |
| ``api-token`` | the daemon or ``p2pcloud init`` | 0600 | the bearer token of the HTTP API |
| ``api.json`` | the daemon, while running | 0600 | where the API listens, the daemon's pid |
| ``folders.json`` | the daemon | 0600 | synced folders (sub-cloud id, path), re-added at start |
| ``p2pcloudd.lock`` | the daemon, while running | 0600 | ``fcntl.flock``: one daemon per data dir |
| ``p2pcloudd.log`` | ``p2pcloud up`` | 0600 | the background daemon's log lines |

Every file the daemon writes is written atomically (a temporary file in the same directory,
fsync, rename, fsync of the directory), so a crash (kill -9, power loss) leaves either the old
or the new content, never a torn file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
TOKEN_FILE = "api-token"  # noqa: S105  (a file name, not a secret)
API_FILE = "api.json"
LOCK_FILE = "p2pcloudd.lock"
LOG_FILE = "p2pcloudd.log"
CONFIG_FILE = "config.toml"
FOLDERS_FILE = "folders.json"
MAX_FOLDERS = 10_000  # synced folders remembered; far beyond any one person's use
TOKEN_BYTES = 32  # 256 bits from the OS CSPRNG: not guessable, not brute-forceable
MAX_STATE_BYTES = 4 * 1024 * 1024  # a state file larger than this is not ours: refuse to parse
MAX_KNOWN_PEERS = 1000  # peers remembered in state.json; the least recently seen go first


class DataDirError(Exception):
    """A data dir problem the user can fix (printed as one line by the daemon and the CLI)."""


class AlreadyRunning(DataDirError):
    """Another daemon holds the data dir's lock."""


def ensure_dir(data_dir: Path) -> None:
    """Create the data dir (mode 0700) if it is missing.

    Raises:
        DataDirError: it cannot be created, or it is not a directory.
    """
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise DataDirError(f"{data_dir}: cannot create the data dir: {exc.strerror}") from exc
    if not data_dir.is_dir():
        raise DataDirError(f"{data_dir}: not a directory")


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically with ``mode`` (temp file, fsync, rename).

    Raises:
        OSError: the file cannot be written.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # POSIX: the rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename still happened
    finally:
        os.close(fd)


# -- the lock -----------------------------------------------------------------------------


class DataDirLock:
    """An exclusive ``fcntl.flock`` on ``p2pcloudd.lock``, held while the daemon runs.

    The kernel drops the lock when the process dies (even by kill -9), so a stale lock file
    never blocks a restart; the pid written into it is only for the error message.
    """

    def __init__(self, data_dir: Path) -> None:
        """Prepare the lock of ``data_dir`` (nothing is locked until :meth:`acquire`)."""
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or fail at once.

        Raises:
            AlreadyRunning: another process holds it.
            DataDirError: the lock file cannot be opened.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise DataDirError(f"{self.path}: cannot open the lock file: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            try:
                holder = os.read(fd, 32).decode("ascii", "replace").strip()
            finally:
                os.close(fd)
            who = f"pid {holder}" if holder.isdigit() else "another process"
            raise AlreadyRunning(
                f"another p2pcloudd ({who}) is already running on the data dir "
                f"{self.path.parent}; stop it with `p2pcloud down` or choose another --data-dir"
            ) from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (idempotent). The file stays: deleting it would race a new daemon."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def lock_holder(data_dir: Path) -> int | None:
    """Return the pid of the daemon holding the data dir's lock, or None if nobody does."""
    path = data_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.read(fd, 32).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# -- the API token ------------------------------------------------------------------------


def load_or_create_token(data_dir: Path) -> str:
    """Return the API token, creating ``api-token`` (mode 0600, atomically) on first use.

    Raises:
        DataDirError: the token file is unreadable, empty or readable by others.
    """
    path = data_dir / TOKEN_FILE
    if not path.exists():
        token = secrets.token_urlsafe(TOKEN_BYTES)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            # link() fails if the name exists: two processes creating it at once agree on
            # whichever won, and neither ever sees a half-written token.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        _fsync_dir(data_dir)
    return read_token(data_dir)


def read_token(data_dir: Path) -> str:
    """Read the API token.

    Raises:
        DataDirError: missing, empty, unreadable, or readable by group/others.
    """
    path = data_dir / TOKEN_FILE
    try:
        st = path.stat()
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError as exc:
        raise DataDirError(
            f"{path} is missing: run `p2pcloud init` (or start the daemon) to create it"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataDirError(f"{path}: cannot read the API token: {exc}") from exc
    if st.st_mode & 0o077:
        raise DataDirError(
            f"{path} is readable by other users (mode {st.st_mode & 0o777:o}); "
            f"fix it with `chmod 600 {path}`"
        )
    if not token:
        raise DataDirError(f"{path} is empty: delete it and restart the daemon to make a new one")
    return token


# -- state.json ---------------------------------------------------------------------------


@dataclass
class KnownPeer:
    """A peer this daemon has linked with.

    Attributes:
        hashname: the peer.
        uri: its link URI when we linked to it (None when it linked to us first).
        last_seen: Unix time the daemon last saw the link Up (None: never).
    """

    hashname: str
    uri: str | None = None
    last_seen: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON form kept in state.json."""
        return {"hashname": self.hashname, "uri": self.uri, "last_seen": self.last_seen}


@dataclass
class State:
    """What the daemon remembers between runs (``state.json``).

    Attributes:
        udp_port: the UDP port it chose on first start (None: not chosen yet).
        tcp_port: the TCP port.
        api_port: the HTTP API port.
        peers: known peers by hashname.
    """

    udp_port: int | None = None
    tcp_port: int | None = None
    api_port: int | None = None
    peers: dict[str, KnownPeer] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON form kept in state.json."""
        peers = sorted(self.peers.values(), key=lambda p: -(p.last_seen or 0.0))
        return {
            "version": 1,
            "udp_port": self.udp_port,
            "tcp_port": self.tcp_port,
            "api_port": self.api_port,
            "peers": [p.to_json() for p in peers[:MAX_KNOWN_PEERS]],
        }


def load_state(data_dir: Path) -> State:
    """Read ``state.json`` (an empty :class:`State` if there is none).

    Raises:
        DataDirError: the file exists but is not a state file we wrote.
    """
    path = data_dir / STATE_FILE
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return State()
    except OSError as exc:
        raise DataDirError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        if len(raw) > MAX_STATE_BYTES:
            raise ValueError(f"larger than {MAX_STATE_BYTES} bytes")
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        state = State(
            udp_port=_port_or_none(data.get("udp_port")),
            tcp_port=_port_or_none(data.get("tcp_port")),
            api_port=_port_or_none(data.get("api_port")),
        )
        for item in data.get("peers") or []:
            hashname = item["hashname"]
            if not isinstance(hashname, str):
                raise ValueError("a peer's hashname is not a string")
            uri = item.get("uri")
            seen = item.get("last_seen")
            state.peers[hashname] = KnownPeer(
                hashname,
                uri if isinstance(uri, str) else None,
                float(seen) if isinstance(seen, int | float) else None,
            )
    except (ValueError, KeyError, TypeError) as exc:
        raise DataDirError(
            f"{path} is damaged ({exc}); move it aside and restart (ports and known peers "
            "are then chosen afresh)"
        ) from exc
    return state


def _port_or_none(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 65535:
        raise ValueError(f"bad port {value!r}")
    return value


def save_state(data_dir: Path, state: State) -> None:
    """Write ``state.json`` atomically (mode 0600)."""
    text = json.dumps(state.to_json(), indent=1) + "\n"
    write_atomic(data_dir / STATE_FILE, text.encode())


# -- folders.json -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SyncedFolder:
    """A directory synced with a sub-cloud, remembered so a restart syncs it again.

    Attributes:
        subcloud: the sub-cloud's base32 id.
        path: the directory's absolute, resolved path.
    """

    subcloud: str
    path: str


def load_folders(data_dir: Path) -> list[SyncedFolder]:
    """Read ``folders.json`` (empty if there is none).

    Raises:
        DataDirError: the file exists but cannot be read or is not a folders file we wrote.
    """
    path = data_dir / FOLDERS_FILE
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise DataDirError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        if len(raw) > MAX_STATE_BYTES:
            raise ValueError(f"larger than {MAX_STATE_BYTES} bytes")
        data = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("folders"), list):
            raise ValueError("not a JSON object with a folders list")
        folders: list[SyncedFolder] = []
        for item in data["folders"][:MAX_FOLDERS]:
            if not isinstance(item, dict):
                raise ValueError("a folder entry is not an object")
            subcloud, where = item.get("subcloud"), item.get("path")
            if not isinstance(subcloud, str) or not isinstance(where, str):
                raise ValueError("a folder entry lacks its subcloud or path")
            if not Path(where).is_absolute():
                raise ValueError(f"folder path {where!r} is not absolute")
            folders.append(SyncedFolder(subcloud, where))
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataDirError(f"{path} is damaged ({exc})") from exc
    return folders


def save_folders(data_dir: Path, folders: list[SyncedFolder]) -> None:
    """Write ``folders.json`` atomically (mode 0600).

    Raises:
        OSError: the file cannot be written.
    """
    data = {"version": 1, "folders": [{"subcloud": f.subcloud, "path": f.path}
                                      for f in folders[:MAX_FOLDERS]]}
    write_atomic(data_dir / FOLDERS_FILE, (json.dumps(data, indent=1) + "\n").encode())


# -- api.json -----------------------------------------------------------------------------


def write_api_file(data_dir: Path, *, url: str, pid: int) -> None:
    """Tell the CLI where the running daemon's API is (``api.json``, mode 0600)."""
    info = {"url": url, "pid": pid, "token_file": TOKEN_FILE}
    write_atomic(data_dir / API_FILE, (json.dumps(info) + "\n").encode())


def read_api_file(data_dir: Path) -> dict[str, Any] | None:
    """Return ``api.json`` as a dict, or None when there is none (daemon never started)."""
    try:
        data = json.loads((data_dir / API_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DataDirError(
            f"{data_dir / API_FILE}: unreadable ({exc}); restart the daemon"
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("url"), str):
        raise DataDirError(f"{data_dir / API_FILE}: not an API file; restart the daemon")
    return data


def remove_api_file(data_dir: Path, pid: int) -> None:
    """Remove ``api.json`` if it is still ours (a newer daemon may have replaced it)."""
    with contextlib.suppress(DataDirError, OSError):
        info = read_api_file(data_dir)
        if info is not None and info.get("pid") == pid:
            (data_dir / API_FILE).unlink()
