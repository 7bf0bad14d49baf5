"""Joining a cloud: time from ``join`` to the first fully synced sub-cloud of 10,000 documents.

Real nodes on 127.0.0.1 (UDP, each with its own data dir and LMDB store, the compiled core,
real Ed25519 envelopes). The home box founds a cloud and fills a sub-cloud with 10,000
documents (three fields each), written as 100 transactions of 100 documents (a bulk import)
or, in the second scenario, as 10,000 one-document transactions (a sub-cloud that grew one
edit at a time: ten thousand signed envelopes to send and verify). Then a fresh device
joins by invite; the clock starts when ``cloud.join`` is called and stops when the new
device's replica of the sub-cloud has the home box's version vector (every document). The
join itself (link, invite proof, grant) and the time until the new device holds the cloud
sub-cloud are shown as parts of it. Each scenario runs ``--runs`` times with a new device.

Run:  .venv/bin/python bench/bench_cloud.py [--runs 3]
Prints the table and writes the "cloud" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._results import write_section  # noqa: E402
from p2pcloud._core import IMPLEMENTATION  # noqa: E402
from p2pcloud._node.node import Node, open_node  # noqa: E402

COMMAND = ".venv/bin/python bench/bench_cloud.py --runs 3"
DOCS = 10_000
POLL = 0.005  # seconds between checks of the joiner's replica


async def fill(home: Node, per_txn: int) -> Any:
    sc = await home.create_subcloud(f"docs-{per_txn}")
    assert home.replication is not None
    for start in range(0, DOCS, per_txn):

        def write(replica: Any, start: int = start) -> None:
            for i in range(start, start + per_txn):
                replica.set_many("docs", f"d{i:05d}", {
                    "title": f"document {i}", "n": i, "body": "x" * 40})

        await home.replication.write(sc, write, [("docs", None, None)])
    return sc


async def join_once(home: Node, sc: Any, root: Path, name: str) -> dict[str, float]:
    assert home.cloud is not None
    invite = await home.cloud.invite()
    target = sc.version()
    async with open_node(root / name, port=0, tcp_port=None) as node:
        assert node.cloud is not None and node.replication is not None
        t0 = time.perf_counter()
        await node.cloud.join(invite)
        t_join = time.perf_counter()
        t_cloud = None
        assert home.cloud.subcloud is not None
        while True:
            mine_cloud = node.cloud.subcloud
            if (t_cloud is None and mine_cloud is not None
                    and mine_cloud.version() == home.cloud.subcloud.version()):
                t_cloud = time.perf_counter()
            mine = node.replication.subclouds.get(sc.id)
            if mine is not None and mine.version() == target:
                break
            await trio.sleep(POLL)
        t_done = time.perf_counter()
        assert len(mine.documents("docs")) == DOCS
    return {"join": t_join - t0, "cloud": (t_cloud or t_done) - t0, "synced": t_done - t0}


async def main(runs: int) -> list[tuple[str, list[dict[str, float]]]]:
    root = Path(tempfile.mkdtemp(prefix="bench-cloud-"))
    out = []
    async with open_node(root / "home", port=0, tcp_port=None) as home:
        assert home.cloud is not None
        await home.cloud.found()
        for per_txn, label in ((100, "100 transactions of 100 documents"),
                               (1, "10,000 one-document transactions")):
            t = time.perf_counter()
            sc = await fill(home, per_txn)
            print(f"filled {label} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            results = []
            for run in range(runs):
                r = await join_once(home, sc, root, f"joiner-{per_txn}-{run}")
                print(f"{label}: {r}", file=sys.stderr)
                results.append(r)
            out.append((label, results))
    return out


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s (best {min(values):.2f})"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    before = os.getloadavg()
    measured = trio.run(main, args.runs)
    after = os.getloadavg()
    rows = ["| sub-cloud of 10,000 documents written as | join (link, proof, grant) | "
            "cloud sub-cloud synced | fully synced |", "| --- | --- | --- | --- |"]
    for label, results in measured:
        rows.append(f"| {label} | {fmt([r['join'] for r in results])} | "
                    f"{fmt([r['cloud'] for r in results])} | "
                    f"{fmt([r['synced'] for r in results])} |")
    body = "\n".join(rows) + (
        f"\n\nTime from `cloud.join(invite)` on a fresh device to its replica of the home "
        f"box's sub-cloud having the home box's version vector (all {DOCS:,} documents, three "
        f"fields each), median of {args.runs} runs with a new device each (best in brackets). "
        "Both nodes on 127.0.0.1 over UDP in one process (one Trio loop, so their CPU work "
        f"adds up), each with its own LMDB store; core: {IMPLEMENTATION}. Every delta travels "
        "as an Ed25519-signed envelope and is verified against the cloud's grants on "
        f"arrival. Load average {before[0]:.2f} before, {after[0]:.2f} after, on a shared "
        "2-core machine.")
    print(body)
    write_section("cloud", COMMAND, body)
