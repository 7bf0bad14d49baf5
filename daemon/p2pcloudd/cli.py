"""``p2pcloud``: the command line; it talks to the running daemon through its HTTP API.

Commands (``p2pcloud COMMAND --help`` for each): ``init``, ``up``, ``down``, ``status``,
``id``, ``link URI``, ``peers``, ``events``, ``demo``, ``dashboard``, ``doctor``, and for
data ``sc new|ls``, ``put``, ``get``, ``ls``, ``rm``, ``share``, ``watch``. Every
command that shows something takes ``--json`` for scripts. The data dir is ``--data-dir``, else
``$P2PCLOUD_HOME``, else ``$XDG_DATA_HOME/p2pcloud``, else ``~/.local/share/p2pcloud``; the
CLI finds the daemon's API in its ``api.json`` and the token in its ``api-token``.

Exit statuses:

| status | meaning |
| --- | --- |
| 0 | done |
| 1 | the operation failed (the daemon answered with an error; doctor found a failure) |
| 2 | usage error (bad arguments) |
| 3 | the daemon is not running (start it with ``p2pcloud up``); ``up``: another one is starting |
| 4 | the daemon refused the API token |
| 5 | timed out waiting for the daemon |
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import webbrowser
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_AUTH = 4
EXIT_TIMEOUT = 5
UP_TIMEOUT = 30.0  # s `up` waits for the daemon to answer; a cold start takes well under 2 s
DOWN_TIMEOUT = 15.0  # s `down` waits for the process to exit after asking it to stop
REQUEST_TIMEOUT = 10.0  # s for an ordinary API request on loopback
LINK_REQUEST_TIMEOUT = 45.0  # s: the daemon itself gives up on a link after ~31 s
MAX_LOG_BYTES = 8 * 1024 * 1024  # p2pcloudd.log is rotated to .1 by `up` beyond this
LOG_TAIL_LINES = 12  # lines of the daemon's log shown when it fails to start


class CliError(Exception):
    """A failure to report: message, what to do next, exit status."""

    def __init__(self, message: str, hint: str = "", status: int = EXIT_FAILED) -> None:
        """Describe it."""
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.status = status


def _not_running(data_dir: Path, why: str = "") -> CliError:
    return CliError(f"the daemon is not running{why}",
                    f"start it with `p2pcloud up{_dd_flag(data_dir)}`", EXIT_NOT_RUNNING)


_GLOBAL_DATA_DIR: list[Path | None] = [None]


def _dd_flag(data_dir: Path) -> str:
    return f" --data-dir {data_dir}" if _GLOBAL_DATA_DIR[0] is not None else ""


# -- talking to the daemon ----------------------------------------------------------------


class Client:
    """A tiny HTTP client for the daemon's API (stdlib only: the CLI starts fast)."""

    def __init__(self, data_dir: Path) -> None:
        """Find the running daemon of ``data_dir``.

        Raises:
            CliError: no daemon has run there (status 3), or its files are unreadable.
        """
        from p2pcloudd import datadir

        self.data_dir = data_dir
        try:
            info = datadir.read_api_file(data_dir)
        except datadir.DataDirError as exc:
            raise CliError(str(exc), "restart the daemon: `p2pcloud down; p2pcloud up`") from exc
        if info is None:
            raise _not_running(data_dir)
        self.info = info
        parsed = urllib.parse.urlsplit(info["url"])
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 80
        self.pid = int(info.get("pid", 0))
        try:
            self.token = datadir.read_token(data_dir)
        except datadir.DataDirError as exc:
            raise CliError(str(exc), "", EXIT_AUTH) from exc

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> tuple[int, Any]:
        """Send one request; return ``(status, decoded JSON or None)``.

        Raises:
            CliError: not reachable (status 3), token refused (4), an error answer (1).
        """
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except (ConnectionRefusedError, ConnectionResetError) as exc:
            raise _not_running(
                self.data_dir, f" (nothing answers at {self.info['url']}; it may have "
                f"crashed: see {self.data_dir / 'p2pcloudd.log'})") from exc
        except TimeoutError as exc:
            raise CliError(f"the daemon did not answer {method} {path} in {timeout:.0f} s",
                           "check its log, or restart it", EXIT_TIMEOUT) from exc
        except OSError as exc:
            raise _not_running(self.data_dir, f" ({exc})") from exc
        except http.client.HTTPException as exc:
            raise CliError(f"the daemon's answer to {method} {path} broke off ({exc!r})",
                           "retry; if it persists, see the daemon's log") from exc
        finally:
            conn.close()
        data = json.loads(raw) if raw and response.getheader("content-type", "").startswith(
            "application/json") else None
        if response.status == 401:
            raise CliError(
                "the daemon refused the API token",
                f"the token in {self.data_dir / 'api-token'} changed since the daemon started?"
                " restart it: `p2pcloud down; p2pcloud up`", EXIT_AUTH)
        if response.status >= 400:
            err = (data or {}).get("error", {}) if isinstance(data, dict) else {}
            raise CliError(err.get("message") or f"HTTP {response.status}",
                           err.get("hint", ""), EXIT_FAILED)
        return response.status, data

    def get(self, path: str) -> Any:
        """GET a JSON document."""
        return self.request("GET", path)[1]


def _data_dir(args: argparse.Namespace) -> Path:
    if args.data_dir is not None:
        return Path(args.data_dir).expanduser()
    from p2pcloud._node.node import default_data_dir

    return default_data_dir()


# -- output -------------------------------------------------------------------------------


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _emit_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    seconds = max(0.0, time.time() - ts)
    if seconds < 5:
        return "now"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 129600:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, h, m = s // 86400, s // 3600 % 24, s // 60 % 60
    if d:
        return f"{d} d {h} h"
    if h:
        return f"{h} h {m} min"
    if m:
        return f"{m} min {s % 60} s"
    return f"{s} s"


def _path_text(path: dict[str, Any] | None) -> str:
    if not path:
        return "-"
    if path.get("type") == "peer":
        return f"via router {str(path.get('hn'))[:12]}"
    return f"{path.get('type')} {path.get('ip')}:{path.get('port')}"


# -- commands -----------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    """Create the data dir, the identity and the API token (nothing is started)."""
    from p2pcloud._node.node import load_or_create_identity
    from p2pcloud.errors import KeyFileError
    from p2pcloudd import datadir

    data_dir = _data_dir(args)
    existed = (data_dir / "identity.key").exists()
    try:
        datadir.ensure_dir(data_dir)
        identity = load_or_create_identity(data_dir, os.environ.get("P2PCLOUD_PASSPHRASE") or None)
        datadir.load_or_create_token(data_dir)
    except (datadir.DataDirError, KeyFileError) as exc:
        raise CliError(str(exc), "fix the data dir, or choose another with --data-dir") from exc
    result = {"data_dir": str(data_dir), "hashname": str(identity.hashname),
              "created": not existed}
    if args.json:
        _emit_json(result)
        return EXIT_OK
    console = _console()
    verb = "created" if not existed else "already set up"
    console.print(f"[bold]{data_dir}[/]: {verb}")
    console.print(f"hashname: {identity.hashname}")
    console.print(f"next: [bold]p2pcloud up{_dd_flag(data_dir)}[/] starts the daemon")
    return EXIT_OK


def _daemon_flags(args: argparse.Namespace) -> list[str]:
    flags: list[str] = []
    for flag in ("port", "tcp_port", "bind", "api_port", "api_bind", "log_level", "log_format",
                 "discovery"):
        value = getattr(args, flag)
        if value is not None:
            flags += [f"--{flag.replace('_', '-')}", str(value)]
    for uri in args.link:
        flags += ["--link", uri]
    return flags


def _running_status(data_dir: Path) -> dict[str, Any] | None:
    try:
        client = Client(data_dir)
        status = client.get("/api/status")
    except CliError as exc:
        if exc.status == EXIT_NOT_RUNNING:
            return None
        raise
    return dict(status)


def start_daemon(data_dir: Path, flags: Sequence[str], *, quiet: bool) -> dict[str, Any]:
    """Start ``p2pcloudd`` on ``data_dir`` in the background and wait until its API answers.

    Args:
        data_dir: its data dir (created if missing).
        flags: extra daemon flags (ports, bind, links...).
        quiet: no spinner.

    Returns:
        Its ``/api/status``.

    Raises:
        CliError: it exited while starting (with the end of its log), or did not answer.
    """
    from p2pcloudd import datadir

    holder = datadir.lock_holder(data_dir)
    if holder is not None:
        raise CliError(f"a daemon (pid {holder}) holds {data_dir} but its API does not answer",
                       "wait a moment and retry, or stop it: `kill " + str(holder) + "`",
                       EXIT_NOT_RUNNING)
    try:
        datadir.ensure_dir(data_dir)
    except datadir.DataDirError as exc:
        raise CliError(str(exc), "choose another --data-dir") from exc
    log_path = data_dir / datadir.LOG_FILE
    with contextlib.suppress(OSError):
        if log_path.stat().st_size > MAX_LOG_BYTES:
            os.replace(log_path, log_path.with_name(log_path.name + ".1"))
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    command = [sys.executable, "-m", "p2pcloudd.service", "--data-dir", str(data_dir), *flags]
    try:
        child = subprocess.Popen(  # noqa: S603  (our own interpreter and module)
            command, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
            start_new_session=True, close_fds=True)
    finally:
        os.close(log_fd)
    deadline = time.monotonic() + UP_TIMEOUT
    spinner = (_console(stderr=True).status("starting p2pcloudd…")
               if sys.stderr.isatty() and not quiet else contextlib.nullcontext())
    with spinner:
        while True:
            code = child.poll()
            if code is not None:
                tail = _tail(log_path, LOG_TAIL_LINES)
                status_code = EXIT_NOT_RUNNING if code == 3 else EXIT_FAILED
                raise CliError(f"the daemon exited with status {code} while starting:\n{tail}",
                               f"its log is {log_path}", status_code)
            with contextlib.suppress(CliError):
                info = datadir.read_api_file(data_dir)
                if info is not None and info.get("pid") == child.pid:
                    status = _running_status(data_dir)
                    if status is not None:
                        return status
            if time.monotonic() > deadline:
                raise CliError(f"the daemon (pid {child.pid}) did not answer in "
                               f"{UP_TIMEOUT:.0f} s", f"see its log: {log_path}", EXIT_TIMEOUT)
            time.sleep(0.05)


def cmd_up(args: argparse.Namespace) -> int:
    """Start the daemon in the background and wait until its API answers."""
    data_dir = _data_dir(args)
    status = _running_status(data_dir)
    if status is not None:
        return _print_up(args, data_dir, status, already=True)
    status = start_daemon(data_dir, _daemon_flags(args), quiet=args.json)
    return _print_up(args, data_dir, status, already=False)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("  " + line for line in text[-lines:])


def _login_url(data_dir: Path) -> str:
    _, minted = Client(data_dir).request("POST", "/api/login-codes")
    return str(minted["url"])


def _print_up(args: argparse.Namespace, data_dir: Path, status: dict[str, Any],
              *, already: bool) -> int:
    url = _login_url(data_dir)
    if args.json:
        _emit_json({"running": True, "already_running": already, "pid": status["pid"],
                    "hashname": status["hashname"], "api_url": status["api_url"],
                    "dashboard_login_url": url})
        return EXIT_OK
    console = _console()
    head = "p2pcloudd is already running" if already else "p2pcloudd is up"
    console.print(f"[bold green]{head}[/] (pid {status['pid']}, data dir {data_dir})")
    console.print(f"hashname:  {status['hashname']}")
    console.print(f"dashboard: {url}")
    console.print("           (a one-time login link; `p2pcloud dashboard` makes a new one)")
    return EXIT_OK


def stop_daemon(data_dir: Path) -> int:
    """Ask the daemon of ``data_dir`` to stop, wait until its process exited; return its pid.

    Raises:
        CliError: not running (status 3), or still running after :data:`DOWN_TIMEOUT`.
    """
    client = Client(data_dir)
    _, answer = client.request("POST", "/api/shutdown")
    pid = int(answer.get("pid") or client.pid)
    deadline = time.monotonic() + DOWN_TIMEOUT
    while _alive(pid):
        if time.monotonic() > deadline:
            raise CliError(f"the daemon (pid {pid}) is still running after {DOWN_TIMEOUT:.0f} s",
                           f"see {data_dir / 'p2pcloudd.log'}; `kill {pid}` stops it",
                           EXIT_TIMEOUT)
        time.sleep(0.05)
    return pid


def cmd_down(args: argparse.Namespace) -> int:
    """Ask the daemon to stop and wait until its process has exited."""
    pid = stop_daemon(_data_dir(args))
    if args.json:
        _emit_json({"stopped": True, "pid": pid})
    else:
        _console().print(f"p2pcloudd stopped (pid {pid})")
    return EXIT_OK


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A child of ours that exited is a zombie until reaped: treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def cmd_status(args: argparse.Namespace) -> int:
    """Show this node: hashname, link URI, ports, uptime, merge core, version."""
    status = Client(_data_dir(args)).get("/api/status")
    if args.json:
        _emit_json(status)
        return EXIT_OK
    from rich.table import Table

    table = Table(show_header=False, box=None)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # a link URI must stay whole to be copied
    ports = status["ports"]
    for key, value in (
        ("hashname", status["hashname"]),
        ("link URI", status["link_uri"]),
        ("ports", f"UDP {ports['udp']}, TCP {ports['tcp']}, API {ports['api']}"),
        ("API", status.get("api_url")),
        ("up for", _duration(status["uptime_s"])),
        ("links up", str(status.get("links_up"))),
        ("merge core", status["core_implementation"]),
        ("version", status["version"]),
        ("pid", str(status.get("pid"))),
        ("data dir", status.get("data_dir")),
    ):
        table.add_row(f"[bold]{key}[/]", str(value))
    _console().print(table)
    return EXIT_OK


def cmd_id(args: argparse.Namespace) -> int:
    """Show the hashname and link URI, and the URI as a QR code to scan with a phone."""
    status = Client(_data_dir(args)).get("/api/status")
    if args.json:
        _emit_json({"hashname": status["hashname"], "link_uri": status["link_uri"]})
        return EXIT_OK
    import segno

    print(f"hashname: {status['hashname']}")
    print(f"link URI: {status['link_uri']}")
    if not args.no_qr:
        segno.make(status["link_uri"], error="l").terminal(compact=True)
    print("Another device links with: p2pcloud link '<the link URI above>'")
    return EXIT_OK


def cmd_link(args: argparse.Namespace) -> int:
    """Link with a peer given its link URI; waits until the link is up."""
    client = Client(_data_dir(args))
    spinner = (_console(stderr=True).status("linking… (up to 30 s)")
               if sys.stderr.isatty() and not args.json else contextlib.nullcontext())
    with spinner:
        _, result = client.request("POST", "/api/links", {"uri": args.uri},
                                   timeout=LINK_REQUEST_TIMEOUT)
    if args.json:
        _emit_json(result)
    else:
        _console().print(f"linked [bold]{result['hashname']}[/] ({_path_text(result['path'])})")
    return EXIT_OK


def cmd_peers(args: argparse.Namespace) -> int:
    """List known peers: online, the path in use, last seen."""
    peers = Client(_data_dir(args)).get("/api/peers")["peers"]
    if args.json:
        _emit_json({"peers": peers})
        return EXIT_OK
    console = _console()
    if not peers:
        console.print("no peers yet: link one with `p2pcloud link URI` (its URI comes from "
                      "`p2pcloud id` on the other device)")
        return EXIT_OK
    from rich.table import Table

    table = Table(box=None)
    table.add_column("")
    table.add_column("hashname", no_wrap=True)  # 52 characters: never cut, people copy it
    table.add_column("path", overflow="fold")
    table.add_column("last seen", overflow="fold")
    for peer in peers:
        table.add_row("[green]●[/]" if peer["online"] else "[dim]○[/]", peer["hashname"],
                      _path_text(peer["path"]), "online" if peer["online"]
                      else _ago(peer["last_seen"]))
    console.print(table)
    return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    """Follow the daemon's live events (link up/down/path, statistics) until Ctrl-C."""
    client = Client(_data_dir(args))
    conn = http.client.HTTPConnection(client.host, client.port, timeout=None)
    try:
        try:
            conn.request("GET", "/api/events", headers={
                "Authorization": f"Bearer {client.token}", "Accept": "text/event-stream"})
            response = conn.getresponse()
        except OSError as exc:
            raise _not_running(client.data_dir, f" ({exc})") from exc
        if response.status != 200:
            raise CliError(f"the daemon refused the event stream (HTTP {response.status})",
                           "check `p2pcloud doctor`",
                           EXIT_AUTH if response.status == 401 else EXIT_FAILED)
        seen = 0
        for raw in response:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if not line.startswith("data: "):
                continue
            event = json.loads(line[len("data: "):])
            if args.type and event["type"] not in args.type:
                continue
            if args.json:
                print(json.dumps(event), flush=True)
            else:
                print(_event_text(event), flush=True)
            seen += 1
            if args.count and seen >= args.count:
                return EXIT_OK
    finally:
        conn.close()
    raise _not_running(client.data_dir, " (it closed the event stream)")


def _event_text(event: dict[str, Any]) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(event["time"]))
    data = event["data"]
    if event["type"].startswith("link."):
        what = str(data.get("hashname"))
        if "path" in data:
            what += f" ({_path_text(data['path'])})"
    elif event["type"] == "change":
        where = "/".join(str(p) for p in (data.get("collection"), data.get("document"),
                                          data.get("field")) if p is not None)
        what = f"{data.get('name')} {where} ({data.get('origin')})"
    elif event["type"] == "statistics":
        node = data.get("node", {})
        mesh = node.get("mesh") or {}
        what = (f"links up {node.get('links_up')}, datagrams in {mesh.get('datagrams_in')} "
                f"out {mesh.get('datagrams_out')}")
    else:
        what = json.dumps(data)
    return f"{when} {event['type']:<10} {what}"


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _field_value(text: str) -> Any:
    """A FIELD=VALUE value: JSON when it parses (``3``, ``true``, ``[1]``), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def cmd_sc_new(args: argparse.Namespace) -> int:
    """Create a sub-cloud owned by this node."""
    _, sc = Client(_data_dir(args)).request("POST", "/api/subclouds",
                                            {"name": args.name, "kind": args.kind})
    if args.json:
        _emit_json(sc)
    else:
        print(f"created {sc['name']!r} ({sc['kind']}), id {sc['id']}")
        print(f"share it: p2pcloud share {sc['id']} HASHNAME read|write")
    return EXIT_OK


def cmd_sc_ls(args: argparse.Namespace) -> int:
    """List the sub-clouds this node holds (owned, and shared with it)."""
    scs = Client(_data_dir(args)).get("/api/subclouds")["subclouds"]
    if args.json:
        _emit_json({"subclouds": scs})
        return EXIT_OK
    if not scs:
        print("no sub-clouds yet: create one with `p2pcloud sc new NAME`")
    for sc in scs:
        print(f"{sc['id']}  {sc['name']}  {sc['kind']}  rights {sc['rights'] or '-'}  "
              f"owner {sc['owner']}")
    return EXIT_OK


def cmd_put(args: argparse.Namespace) -> int:
    """Write fields of a document: FIELD=VALUE, values parsed as JSON when they parse."""
    fields: dict[str, Any] = {}
    for item in args.fields:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise CliError(f"{item!r} is not FIELD=VALUE",
                           "write fields as name=value, e.g. title=hello count=3", EXIT_USAGE)
        fields[name] = _field_value(value)
    _, doc = Client(_data_dir(args)).request(
        "PUT", f"/api/subclouds/{_q(args.sc)}/{_q(args.coll)}/{_q(args.doc)}", fields)
    if args.json:
        _emit_json(doc)
    else:
        print(f"wrote {args.coll}/{args.doc}: {', '.join(sorted(fields))}")
    return EXIT_OK


def cmd_get(args: argparse.Namespace) -> int:
    """Show a document's fields."""
    doc = Client(_data_dir(args)).get(
        f"/api/subclouds/{_q(args.sc)}/{_q(args.coll)}/{_q(args.doc)}")
    if args.json:
        _emit_json(doc)
    else:
        for name, value in sorted(doc["fields"].items()):
            print(f"{name} = {json.dumps(value)}")
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    """List a sub-cloud's collections, or a collection's document ids."""
    client = Client(_data_dir(args))
    if args.coll is None:
        result = client.get(f"/api/subclouds/{_q(args.sc)}/collections")
        items = result["collections"]
    else:
        result = client.get(f"/api/subclouds/{_q(args.sc)}/{_q(args.coll)}")
        items = result["documents"]
    if args.json:
        _emit_json(result)
    else:
        for item in items:
            print(item)
    return EXIT_OK


def cmd_rm(args: argparse.Namespace) -> int:
    """Remove a document."""
    Client(_data_dir(args)).request(
        "DELETE", f"/api/subclouds/{_q(args.sc)}/{_q(args.coll)}/{_q(args.doc)}")
    if args.json:
        _emit_json({"deleted": True, "collection": args.coll, "document": args.doc})
    else:
        print(f"removed {args.coll}/{args.doc}")
    return EXIT_OK


def cmd_share(args: argparse.Namespace) -> int:
    """Give a peer read or write rights to a sub-cloud you own."""
    _, result = Client(_data_dir(args)).request(
        "POST", f"/api/subclouds/{_q(args.sc)}/share",
        {"hashname": args.hashname, "rights": args.rights})
    if args.json:
        _emit_json(result)
    else:
        print(f"{args.hashname} may now {args.rights} {args.sc}")
    return EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    """Follow the changes of every sub-cloud (local and from peers) until Ctrl-C."""
    args.type = ["change", "change.lost"]
    return cmd_events(args)


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Print (and open) a one-time login link to the web dashboard."""
    url = _login_url(_data_dir(args))
    opened = False
    if not args.no_open and not args.json:
        with contextlib.suppress(webbrowser.Error):
            opened = webbrowser.open(url)
    if args.json:
        _emit_json({"url": url})
    else:
        print(url)
        note = "opened in your browser" if opened else "open it in a browser on this computer"
        print(f"(a one-time login link, valid for a few minutes; {note})")
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check the setup: merge core, data dir, key and token files, config, daemon, ports."""
    checks = _doctor_checks(_data_dir(args))
    failed = any(c["result"] == "fail" for c in checks)
    if args.json:
        _emit_json({"ok": not failed, "checks": checks})
    else:
        from rich.table import Table

        colour = {"ok": "green", "warn": "yellow", "fail": "red"}
        table = Table("check", "result", "detail")
        for c in checks:
            table.add_row(c["check"], f"[{colour[c['result']]}]{c['result']}[/]", c["detail"])
        _console().print(table)
    return EXIT_FAILED if failed else EXIT_OK


def _check(name: str, result: str, detail: str) -> dict[str, str]:
    return {"check": name, "result": result, "detail": detail}


def _doctor_checks(data_dir: Path) -> list[dict[str, str]]:
    import p2pcloud
    from p2pcloudd import datadir
    from p2pcloudd.config import ConfigError, load_config_file
    from p2pcloudd.runtime import core_implementation

    checks = [_check("version", "ok", f"p2pcloud {p2pcloud.__version__}, Python "
                     f"{sys.version.split()[0]}")]
    core = core_implementation()
    if core == "cython":
        checks.append(_check("merge core", "ok", "cython (compiled)"))
    elif core == "python":
        why = ("P2PCLOUD_PUREPYTHON=1 is set" if os.environ.get("P2PCLOUD_PUREPYTHON") == "1"
               else "the compiled core is not built; reinstall with a C compiler for speed")
        checks.append(_check("merge core", "warn", f"python reference twin ({why})"))
    else:
        checks.append(_check("merge core", "fail", f"{core}; rebuild: "
                             "`python setup.py build_ext --inplace` or reinstall"))
    if not data_dir.is_dir():
        checks.append(_check("data dir", "fail", f"{data_dir} does not exist: run `p2pcloud init`"))
        return checks
    mode = data_dir.stat().st_mode & 0o777
    checks.append(_check("data dir", "warn" if mode & 0o077 else "ok",
                         f"{data_dir} (mode {mode:o}"
                         + ("; others can look in: `chmod 700` it)" if mode & 0o077 else ")")))
    for name, fix in (("identity.key", "run `p2pcloud init`"),
                      (datadir.TOKEN_FILE, "start the daemon or run `p2pcloud init`")):
        path = data_dir / name
        if not path.exists():
            checks.append(_check(name, "fail", f"missing: {fix}"))
            continue
        fmode = path.stat().st_mode & 0o777
        checks.append(_check(name, "fail" if fmode & 0o077 else "ok",
                             f"mode {fmode:o}" + (f"; fix: chmod 600 {path}" if fmode & 0o077
                                                   else "")))
    try:
        values = load_config_file(data_dir / datadir.CONFIG_FILE)
        checks.append(_check("config.toml", "ok", f"{len(values)} option(s) set" if values
                             else "none (defaults)"))
    except ConfigError as exc:
        checks.append(_check("config.toml", "fail", str(exc)))
    try:
        state = datadir.load_state(data_dir)
    except datadir.DataDirError as exc:
        checks.append(_check("state.json", "fail", str(exc)))
        state = datadir.State()
    holder = datadir.lock_holder(data_dir)
    try:
        status = Client(data_dir).get("/api/status")
    except CliError as exc:
        result = "warn" if exc.status == EXIT_NOT_RUNNING and holder is None else "fail"
        detail = exc.message + (f" ({exc.hint})" if exc.hint else "")
        if holder is not None:
            detail += f"; pid {holder} holds the data dir lock"
        checks.append(_check("daemon", result, detail))
        checks.append(_ports_free_check(state))
        return checks
    checks.append(_check("daemon", "ok", f"running, pid {status['pid']}, up "
                         f"{_duration(status['uptime_s'])}; API {status['api_url']} answers "
                         "and accepts the token"))
    ports = status["ports"]
    checks.append(_check("ports", "ok", f"UDP {ports['udp']}, TCP {ports['tcp']}, API "
                         f"{ports['api']} (the daemon listens on them)"))
    if status["core_implementation"] != core:
        checks.append(_check("daemon merge core", "warn",
                             f"the daemon runs {status['core_implementation']}, this CLI {core}"))
    return checks


def _ports_free_check(state: Any) -> dict[str, str]:
    remembered = [(kind, port) for kind, port in (("udp", state.udp_port),
                  ("tcp", state.tcp_port), ("tcp", state.api_port)) if port]
    if not remembered:
        return _check("ports", "ok", "none chosen yet (the first start chooses them)")
    busy = []
    for kind, port in remembered:
        sock = socket.socket(socket.AF_INET,
                             socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            busy.append(f"{kind.upper()} {port}")
        finally:
            sock.close()
    if busy:
        return _check("ports", "warn", "remembered ports in use by another program: "
                      + ", ".join(busy) + " (the daemon would choose others)")
    ports = ", ".join(f"{k.upper()} {p}" for k, p in remembered)
    return _check("ports", "ok", f"remembered ports are free: {ports}")


# -- the parser ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``p2pcloud``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS,
                        help="the data dir (default: $P2PCLOUD_HOME, else "
                        "$XDG_DATA_HOME/p2pcloud, else ~/.local/share/p2pcloud)")
    shows = argparse.ArgumentParser(add_help=False)
    shows.add_argument("--json", action="store_true", help="print JSON for scripts")

    parser = argparse.ArgumentParser(
        prog="p2pcloud", parents=[common],
        description="Your own devices, your own data: control the p2pcloud daemon.",
        epilog="Exit statuses: 0 done, 1 failed, 2 usage, 3 daemon not running, 4 token "
        "refused, 5 timed out. docs/daemon.md has the details.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Any, help: str, *, json_flag: bool = True) -> Any:
        parents = [common, shows] if json_flag else [common]
        p = sub.add_parser(name, parents=parents, help=help, description=func.__doc__)
        p.set_defaults(func=func)
        return p

    add("init", cmd_init, "create the data dir, identity and API token")
    up = add("up", cmd_up, "start the daemon in the background")
    up.add_argument("--port", type=int, default=None, help="UDP port (0: any)")
    up.add_argument("--tcp-port", type=int, default=None, help="TCP port (0: any)")
    up.add_argument("--bind", default=None, help="mesh address (default 127.0.0.1)")
    up.add_argument("--api-port", type=int, default=None, help="API/dashboard port (0: any)")
    up.add_argument("--api-bind", default=None, help="API address (default 127.0.0.1)")
    up.add_argument("--log-level", default=None, help="debug, info, warning, error")
    up.add_argument("--log-format", default=None, help="text or json")
    up.add_argument("--discovery", default=None, choices=["auto", "on", "off"],
                    help="LAN discovery by mDNS (default auto: on when --bind is not loopback)")
    up.add_argument("--link", action="append", default=[], metavar="URI",
                    help="link to this peer at start")
    add("down", cmd_down, "stop the daemon")
    add("status", cmd_status, "show this node")
    idp = add("id", cmd_id, "show the hashname and link URI (with a QR code)")
    idp.add_argument("--no-qr", action="store_true", help="no QR code")
    link = add("link", cmd_link, "link with a peer")
    link.add_argument("uri", help="the peer's link URI (`p2pcloud id` on the peer)")
    add("peers", cmd_peers, "list known peers")
    events = add("events", cmd_events, "follow live events (one JSON object a line with --json)")
    events.add_argument("--type", action="append", default=[], metavar="TYPE",
                        help="only events of this type (link.up, link.down, link.path, "
                        "statistics); may be repeated")
    events.add_argument("--count", type=int, default=0, metavar="N",
                        help="exit after N events (default: follow until Ctrl-C)")
    dash = add("dashboard", cmd_dashboard, "open the web dashboard (one-time login link)")
    dash.add_argument("--no-open", action="store_true", help="only print the link")
    add("doctor", cmd_doctor, "check the setup and the daemon")
    sc = sub.add_parser("sc", parents=[common], help="create and list sub-clouds",
                        description="Create and list sub-clouds.")
    sc_sub = sc.add_subparsers(dest="sc_command", required=True, metavar="SUBCOMMAND")
    sc_new = sc_sub.add_parser("new", parents=[common, shows], help="create a sub-cloud",
                               description=cmd_sc_new.__doc__)
    sc_new.set_defaults(func=cmd_sc_new)
    sc_new.add_argument("name", help="its name (1..200 characters)")
    sc_new.add_argument("--kind", default="device", choices=["device", "thing", "cloud"])
    sc_ls = sc_sub.add_parser("ls", parents=[common, shows], help="list sub-clouds",
                              description=cmd_sc_ls.__doc__)
    sc_ls.set_defaults(func=cmd_sc_ls)
    put = add("put", cmd_put, "write fields of a document")
    for p in (put, add("get", cmd_get, "show a document"), add("rm", cmd_rm, "remove a document")):
        p.add_argument("sc", help="the sub-cloud (id or name)")
        p.add_argument("coll", help="the collection")
        p.add_argument("doc", help="the document id")
    put.add_argument("fields", nargs="+", metavar="FIELD=VALUE",
                     help="values are JSON when they parse (3, true, \"x\"), else text")
    ls = add("ls", cmd_ls, "list a sub-cloud's collections, or a collection's documents")
    ls.add_argument("sc", help="the sub-cloud (id or name)")
    ls.add_argument("coll", nargs="?", default=None, help="the collection")
    share = add("share", cmd_share, "give a peer read or write rights to a sub-cloud")
    share.add_argument("sc", help="the sub-cloud (id or name)")
    share.add_argument("hashname", help="the peer's hashname (`p2pcloud peers`)")
    share.add_argument("rights", choices=["read", "write"])
    watch = add("watch", cmd_watch, "follow sub-cloud changes (JSON lines with --json)")
    watch.add_argument("--count", type=int, default=0, metavar="N",
                       help="exit after N changes (default: follow until Ctrl-C)")
    from p2pcloudd import cli_things

    cli_things.register(sub, common, shows)
    from p2pcloudd import demo as _demo

    _demo.register(sub, common, shows)
    from p2pcloudd import cli_files

    cli_files.register(sub, common, shows)
    from p2pcloudd import cli_cloud

    cli_cloud.register(sub, common, shows)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``p2pcloud`` command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status (see the module docstring).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "data_dir"):
        args.data_dir = None
    _GLOBAL_DATA_DIR[0] = args.data_dir
    try:
        return int(args.func(args))
    except CliError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": {"message": exc.message, "hint": exc.hint,
                                        "exit_status": exc.status}}), file=sys.stderr)
        else:
            print(f"p2pcloud: {exc.message}", file=sys.stderr)
            if exc.hint:
                print(f"  next: {exc.hint}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print("p2pcloud: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`p2pcloud peers | head`): not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    # `python -m p2pcloudd.cli`: run the importable module, so the cli_<area> modules
    # (which import p2pcloudd.cli) raise the same CliError class main() catches.
    from p2pcloudd.cli import main as _main

    sys.exit(_main())
