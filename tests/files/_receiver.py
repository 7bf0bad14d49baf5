"""A receiving node for tests/files/test_crash_receive.py, run as its own process.

Usage: ``python -m tests.files._receiver <data dir> <sub-cloud name> <folder>``. It opens a
node, prints ``HN <hashname>``, reads ``GO <link uri>`` from stdin, links, waits for the
shared sub-cloud, adds the folder and prints ``FOLDER``; then it syncs until killed (the
test sends SIGKILL) or until stdin closes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

import p2pcloud
from p2pcloud.errors import UnknownSubCloud


def say(line: str) -> None:
    print(line, flush=True)


async def main(data_dir: Path, name: str, folder: Path) -> None:
    async with p2pcloud.open_node(data_dir, port=None) as node:
        say(f"HN {node.hashname}")
        line = await trio.to_thread.run_sync(sys.stdin.readline)
        await node.link(line.split()[1])
        with trio.fail_after(60):
            while True:
                try:
                    sc = node.subcloud(name)
                    break
                except UnknownSubCloud:
                    await trio.sleep(0.02)
        await sc.add_folder(folder)
        say("FOLDER")
        await trio.to_thread.run_sync(sys.stdin.read)  # until the test closes stdin


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
