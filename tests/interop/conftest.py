"""telehash-js 0.4.18 as a peer: install it from the shared recipe, run JS meshes.

The recipe (``../shared/interop/telehash-js``: package.json with npm overrides, and
scripts/server.js) is copied into the repo's gitignored ``.cache/`` and installed once with
``npm install --ignore-scripts``; later runs reuse the install. Without node, npm or the shared
folder the tests are skipped with the reason, except under CI (``CI`` set), where a missing
peer is a failure: the interop tests must not silently vanish there.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

REPO = Path(__file__).resolve().parents[2]
SHARED_RECIPE = REPO / ".." / "shared" / "interop" / "telehash-js"
CACHE = REPO / ".cache" / "telehash-js-0.4.18"
JS_DIR = Path(__file__).resolve().parent / "js"
TELEHASH_VERSION = "0.4.18"
NPM_TIMEOUT = 600  # seconds for the one-time install (about 6 s when the registry answers)
JS_START_TIMEOUT = 30  # seconds for a JS mesh to print its first line


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"telehash-js interop peer unavailable under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def _installed_version(root: Path) -> str | None:
    try:
        meta = json.loads((root / "node_modules" / "telehash" / "package.json").read_text())
    except (OSError, ValueError):
        return None
    version = meta.get("version")
    return version if isinstance(version, str) else None


def install_telehash_js(root: Path = CACHE) -> Path:
    """Install telehash-js 0.4.18 under ``root`` from the shared recipe (or reuse it).

    Args:
        root: the install folder (gitignored).

    Returns:
        ``root``, with ``node_modules/telehash`` at the pinned version.

    Raises:
        RuntimeError: the install failed (its output is in the message).
    """
    if _installed_version(root) == TELEHASH_VERSION:
        return root
    shutil.copytree(SHARED_RECIPE, root, dirs_exist_ok=True)
    for path in [root, *root.rglob("*")]:  # the shared recipe is read-only
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    npm = shutil.which("npm")
    assert npm is not None
    proc = subprocess.run(
        [npm, "install", "--ignore-scripts", "--no-audit", "--no-fund"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=NPM_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0 or _installed_version(root) != TELEHASH_VERSION:
        raise RuntimeError(
            f"npm install of telehash-js failed (rc={proc.returncode}):\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    return root


@pytest.fixture(scope="session")
def telehash_js() -> Path:
    """The telehash-js install folder; skips (or fails under CI) when it cannot exist."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        _unavailable("node and npm are needed on PATH to run telehash-js")
    if not (SHARED_RECIPE / "package.json").is_file():
        _unavailable(f"the shared telehash-js recipe is missing ({SHARED_RECIPE})")
    try:
        return install_telehash_js()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        _unavailable(f"cannot install telehash-js {TELEHASH_VERSION}: {exc}")
        raise  # unreachable: _unavailable raises


class JsProcess:
    """A running JS script: JSON lines from its stdout, its stderr kept for failures."""

    def __init__(self, process: trio.Process, stderr_path: Path) -> None:
        self.process = process
        self._stderr_path = stderr_path
        self._buffer = b""
        self.other_lines: list[bytes] = []

    def stderr(self) -> str:
        """What the script logged so far (telehash debug output goes there)."""
        try:
            return self._stderr_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    async def next_json(self) -> dict[str, Any]:
        """Wait for the next JSON object line on stdout (callers bound the wait).

        Returns:
            The decoded object.
        """
        assert self.process.stdout is not None
        while True:
            while b"\n" not in self._buffer:
                chunk = await self.process.stdout.receive_some(65536)
                if not chunk:
                    raise AssertionError(f"JS script exited early; stderr:\n{self.stderr()}")
                self._buffer += chunk
            line, self._buffer = self._buffer.split(b"\n", 1)
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None  # telehash logs a few plain lines ("generated new id ...")
            if isinstance(obj, dict):
                return obj
            self.other_lines.append(line)

    async def wait_for(self, event: str, seconds: float = JS_START_TIMEOUT) -> dict[str, Any]:
        """Skip JSON lines until one has ``"event": event``; fail after ``seconds``."""
        with trio.move_on_after(seconds):
            while True:
                obj = await self.next_json()
                if obj.get("event") == event:
                    return obj
        raise AssertionError(f"JS never reported {event!r}; stderr:\n{self.stderr()}")

    async def first_line(self, seconds: float = JS_START_TIMEOUT) -> dict[str, Any]:
        """The script's first JSON line (server.js: ``{hashname, keys, port}``)."""
        with trio.move_on_after(seconds):
            return await self.next_json()
        raise AssertionError(f"JS printed nothing; stderr:\n{self.stderr()}")


@asynccontextmanager
async def open_js(root: Path, script: Path, *args: str, life_ms: int = 90_000,
                  debug: bool = False) -> AsyncIterator[JsProcess]:
    """Run a JS script with telehash-js importable; kill it at the end.

    Args:
        root: the telehash-js install folder.
        script: the script (the shared scripts/server.js or one of tests/interop/js/).
        *args: its arguments.
        life_ms: the script's own exit timer (``LIFE``), a guard against leftovers.
        debug: turn on telehash's debug log (to stderr).

    Yields:
        The running process.
    """
    env = dict(os.environ)
    env["NODE_PATH"] = str(root / "node_modules")
    env["LIFE"] = str(life_ms)
    if debug:
        env["THDEBUG"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        stderr_path = Path(tmp) / "stderr.txt"
        with stderr_path.open("wb") as stderr_file:
            process = await trio.lowlevel.open_process(
                ["node", str(script), *args],
                cwd=str(root),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr_file,
            )
            js = JsProcess(process, stderr_path)
            try:
                yield js
            finally:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
                    if process.stdout is not None:
                        await process.stdout.aclose()
