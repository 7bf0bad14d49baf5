"""``p2pcloud files``: synced folders (``files add SC PATH``, ``files ls``) and their conflicts.

Talks to the daemon's ``/api/folders`` (routes in ``routes_subclouds.py``). A folder syncs
with the sub-cloud's ``files`` collection from the moment it is added until the daemon stops
(the daemon does not remember folders across restarts yet: add them again after ``up``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from p2pcloudd.cli import EXIT_OK, Client, _data_dir, _emit_json

ADD_TIMEOUT = 600.0  # s: the first full scan of a large folder hashes every file


def cmd_files_add(args: argparse.Namespace) -> int:
    """Sync a directory with a sub-cloud (its files go to the peers, theirs come here)."""
    path = Path(args.path).expanduser().resolve()
    _, folder = Client(_data_dir(args)).request(
        "POST", "/api/folders", {"subcloud": args.sc, "path": str(path)}, timeout=ADD_TIMEOUT)
    if args.json:
        _emit_json(folder)
    else:
        print(f"syncing {folder['path']} with {folder['name']!r}: {folder['files']} files")
        print("contents from peers keep arriving: `p2pcloud files ls`, `p2pcloud watch`")
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
