"""End-to-end helpers: real daemons as subprocesses, driven through the CLI and the HTTP API.

Every daemon gets its own data dir under tmp_path and port 0 everywhere (the first start
chooses free ports and remembers them). Nothing here sleeps for a fixed time to make a test
pass: waits poll a condition with a generous bound and fail with what they saw.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

WAIT = 60.0  # s: upper bound of any wait; the machine is shared, so be generous


def env() -> dict[str, str]:
    """The environment for our subprocesses: no inherited data dir, unbuffered output."""
    e = {k: v for k, v in os.environ.items() if k not in ("P2PCLOUD_HOME", "XDG_DATA_HOME")}
    e["PYTHONUNBUFFERED"] = "1"
    return e


def cli(data_dir: Path, *args: str, timeout: float = WAIT) -> subprocess.CompletedProcess[str]:
    """Run ``p2pcloud --data-dir DATA_DIR ARGS`` and return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "p2pcloudd.cli", "--data-dir", str(data_dir), *args],
        capture_output=True, text=True, timeout=timeout, env=env(), check=False,
    )


def cli_json(data_dir: Path, *args: str) -> Any:
    """Run a CLI command with ``--json``; it must succeed; return the parsed output."""
    done = cli(data_dir, *args, "--json")
    assert done.returncode == 0, f"p2pcloud {args} failed ({done.returncode}): {done.stderr}"
    return json.loads(done.stdout)


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
    """Poll ``check()`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"{what}: not true after {timeout} s (last: {last!r})")


@dataclass
class Answer:
    """One HTTP answer."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


@dataclass
class Daemon:
    """A daemon started by ``p2pcloud up`` in its own data dir."""

    data_dir: Path
    pids: list[int] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        """From the data dir's api.json (as the CLI finds it)."""
        return str(json.loads((self.data_dir / "api.json").read_text())["url"])

    @property
    def token(self) -> str:
        """The API token."""
        return (self.data_dir / "api-token").read_text().strip()

    @property
    def pid(self) -> int:
        """The running daemon's pid."""
        return int(json.loads((self.data_dir / "api.json").read_text())["pid"])

    def up(self, *flags: str) -> dict[str, Any]:
        """``p2pcloud up --json`` with ``flags``; returns its output."""
        result = cli_json(self.data_dir, "up", *flags)
        self.pids.append(int(result["pid"]))
        return dict(result)

    def request(
        self, method: str, path: str, *, body: Any = None, token: str | None = "",
        headers: dict[str, str] | None = None, raw: bytes | None = None,
    ) -> Answer:
        """One HTTP request to the API; ``token=""`` uses the right one, None sends none."""
        url = urllib.parse.urlsplit(self.api_url)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=WAIT)
        all_headers = dict(headers or {})
        if token is not None:
            all_headers.setdefault("Authorization", f"Bearer {token or self.token}")
        payload = raw
        if body is not None:
            payload = json.dumps(body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=payload, headers=all_headers)
            response = conn.getresponse()
            return Answer(response.status, {k.lower(): v for k, v in response.getheaders()},
                          response.read())
        finally:
            conn.close()

    def get(self, path: str) -> Any:
        """GET with the token; must answer 200; returns the JSON."""
        answer = self.request("GET", path)
        assert answer.status == 200, (path, answer.status, answer.body)
        return answer.json()

    def status(self) -> dict[str, Any]:
        """GET /api/status."""
        return dict(self.get("/api/status"))

    def peer(self, hashname: str) -> dict[str, Any] | None:
        """This daemon's row for ``hashname`` in ``p2pcloud peers --json``."""
        peers = cli_json(self.data_dir, "peers")["peers"]
        return next((p for p in peers if p["hashname"] == hashname), None)

    def stop(self) -> None:
        """Stop every daemon process this fixture started (down, then SIGKILL)."""
        if (self.data_dir / "api.json").exists():
            with contextlib.suppress(subprocess.TimeoutExpired):
                cli(self.data_dir, "down", timeout=30)
        for pid in self.pids:
            try:  # only a daemon of ours: a pid may have been reused since
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"p2pcloudd.service" in cmdline and str(self.data_dir).encode() in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[[str], Daemon]]:
    """``make_daemon(name)``: a Daemon handle with a fresh data dir (not started)."""
    made: list[Daemon] = []

    def make(name: str) -> Daemon:
        daemon = Daemon(tmp_path / name)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.stop()


@pytest.fixture
def two_daemons(make_daemon: Callable[[str], Daemon]) -> tuple[Daemon, Daemon]:
    """Two running daemons, A and B, not linked."""
    a, b = make_daemon("a"), make_daemon("b")
    for d in (a, b):
        d.up("--port", "0", "--tcp-port", "0", "--api-port", "0")
    return a, b
