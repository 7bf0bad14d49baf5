"""``p2pcloud demo``: a laptop, a phone and a home box as three daemons on this computer.

Theory of operation
-------------------
The demo is a script of ordinary API calls, so what it shows is what a user's own programs
get. It makes a temporary folder, starts three ``p2pcloudd`` processes in it (each its own
data dir, every port chosen free, everything bound to 127.0.0.1), and then, printing each
step:

1. links them in a triangle (encrypted Telehash links, ``POST /api/links``);
2. the laptop creates the sub-cloud ``family`` and shares it (write) with the two others;
3. each device writes a document; the change is timed from the ``PUT`` on the writer to the
   ``change`` event on each other device's live event stream (``GET /api/events``);
4. each device syncs a folder with the sub-cloud (``POST /api/folders``), each starting with
   a file of its own (the phone's is a 256 KiB photo, fetched as a blob), and the laptop
   writes one more file after the folders are synced (the folder watcher picks it up);
5. it checks that all three hold the same documents and identical folders (SHA-256 of every
   file), prints a summary, and where to open the three dashboards.

``--once`` then stops everything and exits 0, or non-zero with the reason when a step
failed or timed out (after printing the end of the daemons' logs). Without ``--once`` the
daemons keep running for you to explore (dashboards, ``p2pcloud --data-dir ...``) until
Ctrl-C. Either way, and on Ctrl-C or SIGTERM at any point, every daemon the demo started is
stopped (``POST /api/shutdown``, then SIGKILL for one that does not exit) and the temporary
folder is removed (``--keep`` keeps it, with the logs).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.client
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from p2pcloudd.cli import (
    EXIT_OK,
    LINK_REQUEST_TIMEOUT,
    Client,
    CliError,
    _alive,
    _emit_json,
    _login_url,
    _path_text,
    _tail,
)

DEVICES = ("laptop", "phone", "home box")
SUBCLOUD = "family"
START_TIMEOUT = 60.0  # s for three daemons to start on a busy 2-core machine (one takes < 2 s)
STEP_TIMEOUT = 60.0  # s any one step may take before the demo gives up and says which
STOP_TIMEOUT = 15.0  # s a daemon gets to exit after POST /api/shutdown before SIGKILL
POLL = 0.05  # s between looks while waiting (API calls on loopback cost ~1 ms)
PHOTO_BYTES = 256 * 1024  # the phone's "photo": large enough to travel as a chunked blob
LOG_TAIL_LINES = 15  # lines of each daemon's log printed when the demo fails


CLOSED = "stream.closed"  # queued by EventStream when its stream ends (no daemon sends it)


class DemoFailed(Exception):
    """A step did not complete; the message says which and what was seen."""


class StreamClosed(DemoFailed):
    """A daemon's event stream ended while the demo waited on it."""


@dataclass
class Device:
    """One of the demo's daemons."""

    name: str
    data_dir: Path
    folder: Path
    process: subprocess.Popen[bytes] | None = None
    status: dict[str, Any] = field(default_factory=dict)
    client: Client | None = None
    events: EventStream | None = None

    @property
    def api(self) -> Client:
        """The API client (once the daemon answers)."""
        if self.client is None:
            raise DemoFailed(f"{self.name} has not started")
        return self.client

    @property
    def hashname(self) -> str:
        """Its hashname."""
        return str(self.status["hashname"])


class EventStream:
    """A daemon's ``/api/events`` read by a background thread into a queue.

    Each item is ``(arrival time.monotonic(), event JSON)``. Closing it closes the socket,
    which ends the thread.
    """

    def __init__(self, client: Client) -> None:
        """Open the stream (the daemon answers its headers at once).

        Raises:
            DemoFailed: the daemon refused it.
        """
        self.queue: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        self._conn = http.client.HTTPConnection(client.host, client.port, timeout=None)
        self._conn.request("GET", "/api/events", headers={
            "Authorization": f"Bearer {client.token}", "Accept": "text/event-stream"})
        self._response = self._conn.getresponse()
        if self._response.status != 200:
            raise DemoFailed(f"the event stream answered HTTP {self._response.status}")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        # Ends when close() shuts the socket: http.client then fails in one of several
        # ways (OSError, ValueError, AttributeError on its closed file); all mean "closed".
        with contextlib.suppress(Exception):
            for raw in self._response:
                if raw.startswith(b"data: "):
                    self.queue.put((time.monotonic(), json.loads(raw[6:])))
        self.queue.put((time.monotonic(), {"type": CLOSED}))

    def wait(self, match: Callable[[dict[str, Any]], bool], timeout: float) -> float | None:
        """Take events until one matches; return its arrival time, or None on timeout.

        Events that do not match are dropped (callers wait for things in the order they
        cause them).

        Raises:
            StreamClosed: the stream ended (the daemon stopped) before a match.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                arrived, event = self.queue.get(timeout=left)
            except queue.Empty:
                return None
            if event.get("type") == CLOSED:
                self.queue.put((arrived, event))  # stays closed for the next wait
                raise StreamClosed("the event stream ended")
            if match(event):
                return arrived

    def close(self) -> None:
        """Close the socket (the reader thread ends)."""
        sock = self._conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        self._conn.close()


def _wait(what: str, check: Callable[[], Any], timeout: float = STEP_TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(POLL)
    raise DemoFailed(f"{what}: not done after {timeout:.0f} s (last seen: {last!r})")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _folder_digest(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of the regular files in a synced folder (ours skipped)."""
    from p2pcloud.files.paths import is_internal

    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(is_internal(part) for part in rel.parts) or not path.is_file():
            continue
        with contextlib.suppress(OSError):  # a file being replaced right now: next look
            out[rel.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


class Demo:
    """The demo's run: its devices, its output, its cleanup."""

    def __init__(self, base: Path, *, quiet: bool) -> None:
        """Plan three devices under ``base`` (nothing started yet)."""
        self.base = base
        self.quiet = quiet
        self.devices = [Device(name, base / name.replace(" ", "-"),
                               base / "folders" / name.replace(" ", "-"))
                        for name in DEVICES]
        self.facts: dict[str, Any] = {"base": str(base), "devices": {}, "writes": [],
                                      "links": []}

    def say(self, text: str) -> None:
        """Print a progress line (not with --json)."""
        if not self.quiet:
            print(text, flush=True)

    # -- the steps ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the three daemons at once and wait until each API answers."""
        from p2pcloudd import datadir

        self.say(f"1. starting a laptop, a phone and a home box (three p2pcloudd daemons, "
                 f"loopback only) in {self.base}")
        began = time.monotonic()
        for d in self.devices:
            datadir.ensure_dir(d.data_dir)
            d.folder.mkdir(parents=True)
            log_fd = os.open(d.data_dir / datadir.LOG_FILE,
                             os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                d.process = subprocess.Popen(  # noqa: S603  (our own interpreter and module)
                    [sys.executable, "-m", "p2pcloudd.service", "--data-dir", str(d.data_dir),
                     "--port", "0", "--tcp-port", "0", "--api-port", "0", "--bind",
                     "127.0.0.1", "--discovery", "off"],
                    stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                    start_new_session=True, close_fds=True)
            finally:
                os.close(log_fd)
        for d in self.devices:
            d.status = _wait(f"{d.name}'s daemon answering",
                             functools.partial(self._answering, d), START_TIMEOUT)
            d.events = EventStream(d.api)
            self.facts["devices"][d.name] = {"hashname": d.hashname,
                                             "data_dir": str(d.data_dir),
                                             "api_url": d.status["api_url"]}
            self.say(f"   {d.name:<9} {d.hashname[:16]}…  API {d.status['api_url']}")
        self.say(f"   all three answer after {_ms(time.monotonic() - began)}")

    def _answering(self, d: Device) -> dict[str, Any] | None:
        from p2pcloudd import datadir

        assert d.process is not None
        code = d.process.poll()
        if code is not None:
            raise DemoFailed(f"{d.name}'s daemon exited with status {code} while starting")
        with contextlib.suppress(CliError, datadir.DataDirError):
            info = datadir.read_api_file(d.data_dir)
            if info is not None and info.get("pid") == d.process.pid:
                d.client = Client(d.data_dir)
                return dict(d.client.get("/api/status"))
        return None

    def link(self) -> None:
        """Link every pair (a triangle), each link waiting until it is up."""
        self.say("2. linking them: Telehash v3 links (E3X handshake, cipher set 3a), "
                 "end-to-end encrypted")
        laptop, phone, box = self.devices
        for a, b in ((laptop, phone), (laptop, box), (phone, box)):
            began = time.monotonic()
            _, linked = a.api.request("POST", "/api/links", {"uri": b.status["link_uri"]},
                                      timeout=LINK_REQUEST_TIMEOUT)
            took = time.monotonic() - began
            self.facts["links"].append({"from": a.name, "to": b.name, "path": linked["path"],
                                        "ms": round(took * 1000, 1)})
            self.say(f"   {a.name} ↔ {b.name:<9} over {_path_text(linked['path'])} "
                     f"({_ms(took)})")

    def share(self) -> str:
        """The laptop creates the sub-cloud and shares it; wait until the others hold it."""
        laptop = self.devices[0]
        _, sc = laptop.api.request("POST", "/api/subclouds", {"name": SUBCLOUD})
        sc_id = str(sc["id"])
        self.facts["subcloud"] = sc_id
        self.say(f"3. the laptop creates the sub-cloud {SUBCLOUD!r} ({sc_id[:12]}…) and "
                 "shares it (write) with the phone and the home box")
        began = time.monotonic()
        for d in self.devices[1:]:
            laptop.api.request("POST", f"/api/subclouds/{sc_id}/share",
                               {"hashname": d.hashname, "rights": "write"})
        for d in self.devices[1:]:
            _wait(f"the {d.name} receiving {SUBCLOUD!r} with write rights",
                  functools.partial(self._holds, d, sc_id))
            self.say(f"   the {d.name} holds it, with write rights "
                     f"({_ms(time.monotonic() - began)})")
        return sc_id

    @staticmethod
    def _exited(d: Device) -> str:
        code = d.process.poll() if d.process is not None else None
        return f" (its daemon exited with status {code})" if code is not None else ""

    @staticmethod
    def _holds(d: Device, sc_id: str) -> bool:
        scs = d.api.get("/api/subclouds")["subclouds"]
        return any(s["id"] == sc_id and s["rights"] == "write" for s in scs)

    def write_documents(self, sc_id: str) -> None:
        """Each device writes a document; time its arrival on the others' event streams."""
        self.say("4. each device writes a document; timed from the PUT on the writer to the "
                 "change event on the others' live event streams")
        writes = [
            ("laptop", "shopping", {"item": "milk", "qty": 2, "by": "laptop"}),
            ("phone", "photos", {"album": "summer", "count": 1, "by": "phone"}),
            ("home box", "heating", {"target_c": 20.5, "mode": "eco", "by": "home box"}),
        ]
        for name, doc, fields in writes:
            writer = next(d for d in self.devices if d.name == name)
            began = time.monotonic()
            writer.api.request("PUT", f"/api/subclouds/{sc_id}/notes/{doc}", fields)
            arrivals = []
            for other in self.devices:
                if other is writer:
                    continue
                assert other.events is not None

                def remote_change(event: dict[str, Any], doc: str = doc) -> bool:
                    data = event.get("data", {})
                    return (event.get("type") == "change" and data.get("subcloud") == sc_id
                            and data.get("collection") == "notes"
                            and data.get("document") == doc and data.get("origin") != "local")

                try:
                    arrived = other.events.wait(remote_change, STEP_TIMEOUT)
                except StreamClosed as exc:
                    raise DemoFailed(f"the {other.name}'s event stream ended while waiting "
                                     f"for notes/{doc}{self._exited(other)}") from exc
                if arrived is None:
                    raise DemoFailed(f"the {other.name} saw no change event for notes/{doc} "
                                     f"(written on the {name}) in {STEP_TIMEOUT:.0f} s")
                got = other.api.get(f"/api/subclouds/{sc_id}/notes/{doc}")["fields"]
                if got != fields:
                    raise DemoFailed(f"the {other.name} reads notes/{doc} as {got!r}, "
                                     f"not {fields!r}")
                arrivals.append((other.name, arrived - began))
            self.facts["writes"].append({"writer": name, "document": f"notes/{doc}",
                                         "arrived_ms": {n: round(t * 1000, 1)
                                                        for n, t in arrivals}})
            shown = ", ".join(f"{n} {_ms(t)}" for n, t in arrivals)
            self.say(f"   {name:<9} wrote notes/{doc:<9} → arrived on {shown}")

    def sync_folders(self, sc_id: str) -> dict[str, str]:
        """Each device syncs a folder holding a file of its own; then one more file."""
        self.say("5. each device syncs a folder with the sub-cloud, each starting with a file "
                 "of its own")
        laptop, phone, box = self.devices
        (laptop.folder / "hello.txt").write_text("Hello from the laptop!\n")
        (phone.folder / "photo.jpg").write_bytes(os.urandom(PHOTO_BYTES))
        (box.folder / "recipes").mkdir()
        (box.folder / "recipes" / "soup.md").write_text("# Soup\n\nLeeks, potatoes, salt.\n")
        began = time.monotonic()
        for d in self.devices:
            _, added = d.api.request("POST", "/api/folders",
                                     {"subcloud": sc_id, "path": str(d.folder)}, timeout=60)
            files = ", ".join(sorted(p for p in _folder_digest(d.folder)))
            self.say(f"   {d.name:<9} syncs {d.folder}  ({files})")
        want = 3
        digests = self._converged_folders(want, "the three folders holding the same 3 files")
        took = time.monotonic() - began
        self.say(f"   all three folders hold the same {want} files after {_ms(took)} "
                 "(the photo travelled as a blob, in chunks)")
        began = time.monotonic()
        (laptop.folder / "later.txt").write_text("Written after the folders were synced.\n")
        self.say("   the laptop writes later.txt into its folder; the folder watcher sees it")
        digests = self._converged_folders(want + 1, "later.txt reaching the other folders")
        took_later = time.monotonic() - began
        self.say(f"   later.txt is on the phone and the home box after {_ms(took_later)}")
        self.facts["folders"] = {"files": sorted(digests), "first_sync_ms":
                                 round(took * 1000, 1), "later_file_ms":
                                 round(took_later * 1000, 1)}
        return digests

    def _converged_folders(self, count: int, what: str) -> dict[str, str]:
        def same() -> dict[str, str] | None:
            seen = [_folder_digest(d.folder) for d in self.devices]
            if len(seen[0]) == count and all(s == seen[0] for s in seen):
                return seen[0]
            return None

        try:
            result: dict[str, str] = _wait(what, same)
        except DemoFailed as exc:
            held = {d.name: sorted(_folder_digest(d.folder)) for d in self.devices}
            raise DemoFailed(f"{exc}; the folders hold {held}") from exc
        return result

    def check(self, sc_id: str) -> None:
        """Every device holds the same documents (read back through each API)."""
        views = []
        for d in self.devices:
            docs = d.api.get(f"/api/subclouds/{sc_id}/notes")["documents"]
            views.append({doc: d.api.get(f"/api/subclouds/{sc_id}/notes/{doc}")["fields"]
                          for doc in docs})
            if len(docs) != len(DEVICES):
                raise DemoFailed(f"the {d.name} holds {len(docs)} notes, not {len(DEVICES)}")
        if any(v != views[0] for v in views):
            raise DemoFailed(f"the devices disagree: {views}")
        self.facts["documents"] = len(views[0])
        self.say(f"6. converged: every device holds the same {len(views[0])} documents and "
                 f"the same {len(self.facts['folders']['files'])} files")

    def dashboards(self) -> dict[str, str]:
        """A one-time dashboard login link per device."""
        return {d.name: _login_url(d.data_dir) for d in self.devices}

    # -- cleanup -----------------------------------------------------------------------------

    def stop(self) -> list[str]:
        """Stop every daemon the demo started; return what went wrong (empty: nothing)."""
        problems: list[str] = []
        for d in self.devices:
            if d.events is not None:
                d.events.close()
        asked = []
        for d in self.devices:
            if d.process is None or d.process.poll() is not None:
                continue
            try:
                Client(d.data_dir).request("POST", "/api/shutdown", timeout=5)
            except CliError:
                d.process.terminate()  # not answering (yet): SIGTERM also stops it cleanly
            asked.append(d)
        deadline = time.monotonic() + STOP_TIMEOUT
        for d in asked:
            assert d.process is not None
            try:
                code = d.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                d.process.kill()
                d.process.wait()
                problems.append(f"{d.name}'s daemon did not stop in {STOP_TIMEOUT:.0f} s: "
                                "killed")
                continue
            if code != 0:
                problems.append(f"{d.name}'s daemon exited with status {code}")
        for d in self.devices:
            if d.process is not None and _alive(d.process.pid):
                problems.append(f"{d.name}'s daemon (pid {d.process.pid}) is still running")
        return problems

    def log_tails(self) -> str:
        """The end of each daemon's log."""
        from p2pcloudd import datadir

        parts = []
        for d in self.devices:
            log = d.data_dir / datadir.LOG_FILE
            if log.exists():
                parts.append(f"--- {d.name}: {log}\n{_tail(log, LOG_TAIL_LINES)}")
        return "\n".join(parts)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (and SIGHUP) raise KeyboardInterrupt, like Ctrl-C, so cleanup runs."""
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """No Ctrl-C while cleaning up (bounded by STOP_TIMEOUT), so no daemon is left behind."""
    old = {s: signal.signal(s, signal.SIG_IGN)
           for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def run_demo(*, once: bool, keep: bool, as_json: bool) -> int:
    """Run the demo (see the module docstring); return the exit status.

    Raises:
        CliError: a step failed (status 1), after everything was stopped.
        KeyboardInterrupt: Ctrl-C or SIGTERM, after everything was stopped.
    """
    base = Path(tempfile.mkdtemp(prefix="p2pcloud-demo-"))
    demo = Demo(base, quiet=as_json)
    failure: str | None = None
    logs = ""
    began = time.monotonic()
    try:
        with _sigterm_interrupts():
            try:
                demo.start()
                demo.link()
                sc_id = demo.share()
                demo.write_documents(sc_id)
                demo.sync_folders(sc_id)
                demo.check(sc_id)
                demo.facts["seconds"] = round(time.monotonic() - began, 2)
                _summary(demo, once=once)
                if as_json:
                    _emit_json({"ok": True, **demo.facts})
                if not once:
                    _wait_for_ctrl_c(demo)
            except (DemoFailed, CliError) as exc:
                failure = exc.message if isinstance(exc, CliError) else str(exc)
                logs = demo.log_tails()
    finally:
        with _uninterruptible():
            demo.say("stopping the three daemons…")
            problems = demo.stop()
            if keep:
                demo.say(f"kept {base} (data dirs, logs and folders)")
            else:
                shutil.rmtree(base, ignore_errors=True)
            if not problems and failure is None:
                demo.say("stopped cleanly" + ("" if keep else f"; removed {base}"))
    if failure is not None:
        if logs:
            print(logs, file=sys.stderr)
        raise CliError(f"demo failed: {failure}",
                       "run `p2pcloud demo --once --keep` to keep the daemons' logs; "
                       "`p2pcloud doctor` checks the setup")
    if problems:
        raise CliError("demo done, but stopping went wrong: " + "; ".join(problems))
    return EXIT_OK


def _summary(demo: Demo, *, once: bool) -> None:
    if demo.quiet:
        return
    facts = demo.facts
    slowest = max(ms for w in facts["writes"] for ms in w["arrived_ms"].values())
    print(f"\nDone in {facts['seconds']:.1f} s: three devices linked, one sub-cloud shared, "
          f"3 documents written and {len(facts['folders']['files'])} files synced, "
          "all converged.")
    print(f"  a document reached every other device within {slowest:.0f} ms of its write; "
          f"a file written later within {facts['folders']['later_file_ms']:.0f} ms")
    if once:
        print("  (without --once the three keep running, with a dashboard each to open)")
        return
    print("\nThe daemons keep running. Open a dashboard (one-time login links):")
    for name, url in demo.dashboards().items():
        print(f"  {name:<9} {url}")
    laptop = demo.devices[0]
    print("\nOr use the CLI against a device, e.g.:")
    print(f"  p2pcloud --data-dir {laptop.data_dir} peers")
    print(f"  p2pcloud --data-dir {laptop.data_dir} put {SUBCLOUD} notes todo title=call")
    print(f"  ls {demo.devices[1].folder}")
    print("\nPress Ctrl-C to stop the demo (it stops all three and removes its folder).",
          flush=True)


def _wait_for_ctrl_c(demo: Demo) -> None:
    while True:
        for d in demo.devices:
            if d.process is not None and d.process.poll() is not None:
                raise DemoFailed(f"the {d.name}'s daemon exited (status "
                                 f"{d.process.returncode})")
        time.sleep(0.5)


def cmd_demo(args: argparse.Namespace) -> int:
    """Start a laptop, a phone and a home box as three daemons on this computer, link them,
    share a sub-cloud, write on each, sync a folder, and show everything arriving.

    Everything lives in a temporary folder and on 127.0.0.1; your own node is not touched.
    With --once it stops and cleans up when done (exit 0 when everything converged);
    otherwise the daemons keep running for you to explore until Ctrl-C.
    """
    return run_demo(once=args.once, keep=args.keep, as_json=args.json)


def register(sub: Any, common: Any, shows: Any) -> None:
    """Add ``p2pcloud demo`` to the CLI's subcommands."""
    demo = sub.add_parser("demo", parents=[common, shows],
                          help="three devices on this computer, linked and syncing",
                          description=cmd_demo.__doc__)
    demo.set_defaults(func=cmd_demo)
    demo.add_argument("--once", action="store_true",
                      help="run to the end, stop everything, exit (0: all converged)")
    demo.add_argument("--keep", action="store_true",
                      help="keep the temporary folder (data dirs, logs, synced folders)")


__all__ = ["DemoFailed", "EventStream", "cmd_demo", "register", "run_demo"]
