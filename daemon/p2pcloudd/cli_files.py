"""``p2pcloud files``: synced folders (``files add SC PATH``, ``files ls``) and their
conflicts; ``p2pcloud progress``: what is still moving, as progress bars.

Talks to the daemon's ``/api/folders`` (routes in ``routes_subclouds.py``). A folder syncs
with the sub-cloud's ``files`` collection from the moment it is added; the daemon remembers it
(``folders.json`` in the data dir) and adds it again at every start.
``progress`` reads ``GET /api/subclouds/{sc}`` and then follows ``sync.progress`` events.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import sys
import time
from pathlib import Path
from typing import Any

from p2pcloudd.cli import (
    EXIT_OK,
    EXIT_TIMEOUT,
    Client,
    CliError,
    _console,
    _data_dir,
    _emit_json,
    _not_running,
    _q,
)

ADD_TIMEOUT = 600.0  # s: the first full scan of a large folder hashes every file


def cmd_files_add(args: argparse.Namespace) -> int:
    """Sync a directory with a sub-cloud (its files go to the peers, theirs come here)."""
    path = Path(args.path).expanduser().resolve()
    spinner = (_console(stderr=True).status(f"scanning {path}…")
               if sys.stderr.isatty() and not args.json else contextlib.nullcontext())
    with spinner:
        _, folder = Client(_data_dir(args)).request(
            "POST", "/api/folders", {"subcloud": args.sc, "path": str(path)},
            timeout=ADD_TIMEOUT)
    if args.json:
        _emit_json(folder)
    else:
        print(f"syncing {folder['path']} with {folder['name']!r}: {folder['files']} files")
        print("contents from peers keep arriving: `p2pcloud progress --wait` shows them")
    return EXIT_OK


def cmd_files_ls(args: argparse.Namespace) -> int:
    """List the synced folders, their file counts and conflicts."""
    folders = Client(_data_dir(args)).get("/api/folders")["folders"]
    if args.json:
        _emit_json({"folders": folders})
        return EXIT_OK
    if not folders:
        print("no synced folders: add one with `p2pcloud files add SUBCLOUD PATH`")
    for f in folders:
        print(f"{f['path']}  ({f['name']}, {f['files']} files)")
        for c in f["conflicts"]:
            print(f"  conflict: {c['path']}" + (f" (copy: {c['copy']}, by {c['device']})"
                                               if c["copy"] else f" (by {c['device']})"))
    return EXIT_OK


def _pending(row: dict[str, Any]) -> int:
    return int(row["send_items"] + row["receive_items"])


def _moving(row: dict[str, Any]) -> bool:
    return bool(_pending(row) or row["in_flight_bytes"]
                or row["blob_bytes_done"] < row["blob_bytes_total"])


def cmd_progress(args: argparse.Namespace) -> int:
    """Show what is still moving between this node and its peers, per sub-cloud and peer.

    With --wait, follow it live as progress bars until everything is in sync (or --timeout).
    """
    client = Client(_data_dir(args))
    names = [args.sc] if args.sc else [s["id"] for s in client.get("/api/subclouds")["subclouds"]]
    state: dict[str, tuple[str, list[dict[str, Any]]]] = {}
    for key in names:
        d = client.get(f"/api/subclouds/{_q(key)}")
        state[d["id"]] = (d["name"], d["peers"])
    if not args.wait or not any(_moving(r) for _, rows in state.values() for r in rows):
        return _print_progress(args, state)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    # No read timeout: the daemon sends a comment line every 15 s, which is when a
    # --timeout is checked while nothing moves.
    conn = http.client.HTTPConnection(client.host, client.port, timeout=None)
    try:
        try:
            conn.request("GET", "/api/events", headers={
                "Authorization": f"Bearer {client.token}", "Accept": "text/event-stream"})
            response = conn.getresponse()
        except OSError as exc:
            raise _not_running(client.data_dir, f" ({exc})") from exc
        # Re-read after subscribing: nothing that changed in between is missed.
        for sc_id in state:
            d = client.get(f"/api/subclouds/{sc_id}")
            state[sc_id] = (d["name"], d["peers"])
        _follow_progress(args, response, state, deadline)
    finally:
        conn.close()
    return _print_progress(args, state)


def _follow_progress(args: argparse.Namespace, response: Any,
                     state: dict[str, tuple[str, list[dict[str, Any]]]],
                     deadline: float | None) -> None:
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    high: dict[tuple[str, str], int] = {}  # most items seen pending: the bar's total
    bars: dict[tuple[str, str], Any] = {}
    quiet = args.json or not sys.stdout.isatty()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                        TextColumn("{task.fields[detail]}"), disable=quiet)
    with progress:
        while any(_moving(r) for _, rows in state.values() for r in rows):
            for sc_id, (name, rows) in state.items():
                for row in rows:
                    key = (sc_id, row["peer"])
                    pending = _pending(row)
                    high[key] = max(high.get(key, 0), pending)
                    total = high[key] + row["blob_bytes_total"]
                    done = high[key] - pending + row["blob_bytes_done"]
                    detail = (f"{pending} items, files {row['blob_bytes_done']:,} of "
                              f"{row['blob_bytes_total']:,} B")
                    if key not in bars:
                        bars[key] = progress.add_task(f"{name} ↔ {row['peer'][:12]}",
                                                      total=max(total, 1), detail=detail)
                    progress.update(bars[key], total=max(total, 1), completed=done,
                                    detail=detail)
            if deadline is not None and time.monotonic() > deadline:
                raise CliError(f"still syncing after {args.timeout:.0f} s",
                               "run `p2pcloud progress --wait` again", EXIT_TIMEOUT)
            raw = response.readline()
            if not raw:
                raise CliError("the daemon closed the event stream", "is it still running?")
            if raw.startswith(b"data: "):
                event = json.loads(raw[6:])
                data = event["data"]
                if event["type"] == "sync.progress" and data["subcloud"] in state:
                    state[data["subcloud"]] = (data["name"], data["peers"])


def _print_progress(args: argparse.Namespace,
                    state: dict[str, tuple[str, list[dict[str, Any]]]]) -> int:
    if args.json:
        _emit_json({"subclouds": [{"subcloud": sc_id, "name": name, "peers": rows}
                                  for sc_id, (name, rows) in state.items()]})
        return EXIT_OK
    if not state:
        print("no sub-clouds yet")
    for name, rows in state.values():
        if not rows:
            print(f"{name}: no peer syncing it now")
        for row in rows:
            what = ("in sync" if not _moving(row) else
                    f"sending {row['send_items']} items ({row['send_bytes']:,} B), receiving "
                    f"{row['receive_items']} items ({row['receive_bytes']:,} B), files "
                    f"{row['blob_bytes_done']:,} of {row['blob_bytes_total']:,} B")
            print(f"{name} ↔ {row['peer']}: {what}")
    return EXIT_OK


def register(sub: Any, common: Any, shows: Any) -> None:
    """Add ``p2pcloud files add|ls`` to the CLI's subcommands."""
    files = sub.add_parser("files", parents=[common], help="synced folders and conflicts",
                           description="Sync folders with sub-clouds; list them and conflicts.")
    files_sub = files.add_subparsers(dest="files_command", required=True, metavar="SUBCOMMAND")
    add = files_sub.add_parser("add", parents=[common, shows], help="sync a directory",
                               description=cmd_files_add.__doc__)
    add.set_defaults(func=cmd_files_add)
    add.add_argument("sc", help="the sub-cloud (id or name)")
    add.add_argument("path", help="the directory (it must exist)")
    ls = files_sub.add_parser("ls", parents=[common, shows], help="list synced folders",
                              description=cmd_files_ls.__doc__)
    ls.set_defaults(func=cmd_files_ls)
    prog = sub.add_parser("progress", parents=[common, shows],
                          help="what is still moving to and from peers (progress bars)",
                          description=cmd_progress.__doc__)
    prog.set_defaults(func=cmd_progress)
    prog.add_argument("sc", nargs="?", default=None, help="one sub-cloud (default: all)")
    prog.add_argument("--wait", action="store_true",
                      help="follow it live until everything is in sync")
    prog.add_argument("--timeout", type=float, default=0.0, metavar="S",
                      help="with --wait: give up after S seconds (exit 5)")
