"""Child process of tests/e2e/test_crash_sync.py: a node that writes and syncs until killed.

Usage: ``python -m tests.e2e._sync_worker DATA_DIR PEER_URI SUBCLOUD_HEX TOTAL EXPECT``.

It opens a node on DATA_DIR (its identity file is prepared by the test), links to the peer,
waits for the shared sub-cloud, then writes ``local/w<i>`` for the next ``i`` up to TOTAL,
printing ``ACK <i>`` after each write returns (durable), while the peer's backlog streams
in. It prints ``SYNCED`` once it holds EXPECT backlog documents and ``DONE`` when both are
finished, then waits for stdin to close and exits cleanly (checkpointing on close).

It runs on Trio's default clock, which starts at a random offset in every process: each
restart of the worker is a real restart of the node, so the test also checks that the peer
takes the restarted endpoint's new session (handshake ``at`` values are epoch seconds,
independent of that clock).
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

import p2pcloud
from p2pcloud.errors import UnknownSubCloud


async def main(data_dir: Path, peer_uri: str, sc_hex: str, total: int, expect: int) -> None:
    async with p2pcloud.open_node(data_dir) as node:
        print("OPEN", flush=True)
        await node.link(peer_uri)
        print("LINKED", flush=True)
        sc_id = bytes.fromhex(sc_hex)
        while True:
            try:
                sc = node.subcloud(sc_id)
                break
            except UnknownSubCloud:
                await trio.sleep(0.01)
        done = [int(d[1:]) for d in sc.documents("local")]
        i = max(done, default=-1) + 1
        synced = False
        while True:
            if i < total:
                await sc.set("local", f"w{i}", "v", i)
                print(f"ACK {i}", flush=True)
                i += 1
                if i % 50 == 0:
                    print(f"HAVE {len(sc.documents('backlog'))} "
                          f"{node.statistics().dropped}", flush=True)
            if not synced and len(sc.documents("backlog")) >= expect:
                print("SYNCED", flush=True)
                synced = True
            if i >= total and synced:
                break
            await trio.sleep(0.01 if i < total else 0.02)
        print("DONE", flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # the test closes stdin when satisfied


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]),
             int(sys.argv[5]))
