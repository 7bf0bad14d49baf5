"""Benchmark things on a node (issue 6): a home box with many things, and a scan.

Figures:

* a home box holding N things (default 10,000), each with R readings (default 100): built
  through ``node.things`` (each thing: its registry record, its layout, then its readings in
  one transaction), then the node is closed; a fresh process opens it and measures the time
  to open the node (store, registry and catalog read, ``node.things`` indexed; replicas load
  lazily, docs/subclouds.md), its RSS after
  opening, and the time to list every thing (``node.things.list()``). Anchor, same run: the
  same process's RSS before opening the node (the interpreter and the imports);
* the time from scanning a tag image (a PNG decoded with zxing-cpp) on one owner device to
  the thing showing as claimed on a second owner device, on loopback (median of K rounds).

Run: ``.venv/bin/python bench/bench_things.py`` (``--things 1000`` for a quick run;
``--no-write`` to leave bench/RESULTS.md alone).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_section  # noqa: E402

from p2pcloud._core import Replica  # noqa: E402
from p2pcloud._node.node import open_node  # noqa: E402
from p2pcloud.things import thing as t  # noqa: E402
from p2pcloud.things.tags import render_png  # noqa: E402


def rss_mib() -> float:
    """This process's resident set size now (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def build(path: Path, count: int, readings: int) -> float:
    """Make a home box with ``count`` things of ``readings`` readings each; seconds taken."""
    start = time.perf_counter()
    async with open_node(path, port=0, tcp_port=None) as node:
        assert node.cloud is not None and node.things is not None
        await node.cloud.found()
        things = node.things
        me = node.hashname
        for i in range(count):
            view = await things.create(f"thing {i:05d}", make="Acme", serial=f"S-{i}")
            sc = things._find(view.hashname)

            def many(r: Replica) -> bytes:
                now = time.time_ns() // 1_000_000
                r.begin(now)
                for k in range(readings):
                    event = t.event_record("reading_added", by=me, now_ms=now + k,
                                           entropy=os.urandom, value=float(k), unit="kg",
                                           kind="weight")
                    r.append(t.READINGS, {"value": float(k), "unit": "kg", "kind": "weight",
                                          "at_ms": now + k, "event": event["id"]})
                    r.append(t.EVENTS, event)
                return bytes(r.commit())

            await things._write(sc, many, [(t.READINGS, None, None)])
            if i and i % 1000 == 0:
                print(f"  built {i} things", file=sys.stderr)
    return time.perf_counter() - start


async def measure_open(path: Path) -> dict[str, float]:
    """Open the box (in this fresh process), list its things; times and RSS."""
    before = rss_mib()
    start = time.perf_counter()
    async with open_node(path, port=0, tcp_port=None) as node:
        opened = time.perf_counter() - start
        assert node.things is not None
        after = rss_mib()
        start = time.perf_counter()
        views = node.things.list()
        listed = time.perf_counter() - start
        hosted = len(node.things.host.hosted)
        in_memory = sum(sc.is_loaded for sc in node.subclouds())
        things_open = node.things.opened_in
    return {"open_s": opened, "list_s": listed, "things": len(views), "rss_before": before,
            "rss_after": after, "hosted": hosted, "things_open_s": things_open,
            "in_memory": in_memory}


async def scan_rounds(root: Path, rounds: int) -> list[float]:
    """Seconds from scanning a tag PNG on the phone to the claim showing on the laptop."""
    out = []
    async with AsyncExitStack() as stack:
        home, phone, laptop = [await stack.enter_async_context(
            open_node(root / n, port=0, tcp_port=None)) for n in ("home", "phone", "laptop")]
        assert home.cloud and phone.cloud and laptop.cloud
        assert home.things and phone.things and laptop.things
        await home.cloud.found()
        for node in (phone, laptop):
            await node.cloud.join(await home.cloud.invite())
        for _ in range(rounds):
            view = await home.things.create("box")
            png = render_png(home.things.tag(view.hashname))
            start = time.perf_counter()
            result = await phone.things.scan(png)
            assert result.action == "claimed"
            while True:
                if any(v.hashname == view.hashname and v.claimed
                       for v in laptop.things.list()):
                    break
                await trio.sleep(0.001)
            out.append(time.perf_counter() - start)
    return out


# -- the same scan through daemons and their HTTP API (--daemons) ------------------------------

DAEMON_WAIT = 60.0  # s; any one step through the daemons that takes longer fails the run


def _cli(data_dir: Path, *args: str) -> dict[str, Any]:
    """``p2pcloud --data-dir D ARGS --json``; must succeed."""
    done = subprocess.run([sys.executable, "-m", "p2pcloudd.cli", "--data-dir", str(data_dir),
                           *args, "--json"], capture_output=True, text=True, check=False,
                          timeout=DAEMON_WAIT)
    if done.returncode != 0:
        raise RuntimeError(f"p2pcloud {args}: {done.stderr}")
    return dict(json.loads(done.stdout))


class _Api:
    """A daemon's HTTP API (its api.json and token)."""

    def __init__(self, data_dir: Path) -> None:
        import urllib.parse

        url = urllib.parse.urlsplit(json.loads((data_dir / "api.json").read_text())["url"])
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.token = (data_dir / "api-token").read_text().strip()

    def call(self, method: str, path: str, body: bytes | None = None,
             ctype: str = "application/json") -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=DAEMON_WAIT)
        try:
            conn.request(method, path, body=body, headers={
                "Authorization": f"Bearer {self.token}", "Content-Type": ctype})
            answer = conn.getresponse()
            return answer.status, answer.read()
        finally:
            conn.close()

    def events(self) -> http.client.HTTPResponse:
        """An open ``/api/events`` response (read it line by line)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=DAEMON_WAIT)
        conn.request("GET", "/api/events", headers={"Authorization": f"Bearer {self.token}"})
        return conn.getresponse()


def daemon_scan_rounds(root: Path, rounds: int) -> list[float]:
    """Seconds from the phone daemon receiving a tag PNG (``POST /api/scan/image``) to the
    home box daemon's API showing the thing claimed, told by its ``thing.changed`` event."""
    names = ("home", "phone")
    out: list[float] = []
    try:
        for n in names:
            _cli(root / n, "up", "--port", "0", "--tcp-port", "0", "--api-port", "0")
        _cli(root / "home", "cloud", "new")
        invite = _cli(root / "home", "cloud", "invite")["uri"]
        _cli(root / "phone", "cloud", "join", invite)
        home, phone = _Api(root / "home"), _Api(root / "phone")
        stream = home.events()
        for _ in range(rounds):
            status, png = home.call("POST", "/api/tags/sheet.png", b'{"count": 1}')
            assert status == 201, status
            hn = str(t_scan_image(png).hashname)
            deadline = time.monotonic() + DAEMON_WAIT
            while phone.call("GET", f"/api/things/{hn}")[0] != 200:  # the sheet is old
                if time.monotonic() > deadline:
                    raise RuntimeError("the fresh thing never reached the phone")
                time.sleep(0.01)
            start = time.perf_counter()
            status, body = phone.call("POST", "/api/scan/image", png, "image/png")
            assert status == 200 and json.loads(body)["action"] == "claimed", body
            while True:
                line = stream.readline()
                if not line:
                    raise RuntimeError("the home box closed its event stream")
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                if event["type"] == "thing.changed" and event["data"].get("thing") == hn:
                    _, got = home.call("GET", f"/api/things/{hn}")
                    if json.loads(got).get("claimed"):
                        break
            out.append(time.perf_counter() - start)
    finally:
        for n in names:
            if (root / n / "api.json").exists():
                subprocess.run([sys.executable, "-m", "p2pcloudd.cli", "--data-dir",
                                str(root / n), "down"], capture_output=True, timeout=60,
                               check=False)
    return out


def t_scan_image(png: bytes) -> Any:
    """The tag in a PNG (zxing-cpp), as the phone would read it."""
    from p2pcloud.things.tags import scan_image

    return scan_image(png)


def run_daemons(rounds: int, write: bool) -> None:
    """The ``--daemons`` run: its own section of RESULTS.md (``things-daemon``)."""
    with tempfile.TemporaryDirectory() as tmp:
        times = daemon_scan_rounds(Path(tmp), rounds)
    body = (
        f"Two daemons of one cloud (home box and phone, `p2pcloud up` processes on 127.0.0.1), "
        f"{rounds} rounds: the home box makes a fresh tag (`POST /api/tags/sheet.png`); once "
        "the phone holds the thing, the clock starts when the phone's API is handed the PNG "
        "(`POST /api/scan/image`: decode, claim, durable write, answer) and stops when the "
        "home box's event stream reports the change and its API shows the thing claimed.\n\n"
        "| measure | median | min | max |\n| --- | --- | --- | --- |\n"
        f"| scan image on the phone's API to claimed on the home box's API | "
        f"{statistics.median(times) * 1000:.0f} ms | {min(times) * 1000:.0f} ms | "
        f"{max(times) * 1000:.0f} ms |\n\n"
        "Section `things` measures the same path with the devices as nodes in one Python "
        "process (sharing one interpreter); here each device is a process of its own, as in "
        "real use, and the figure includes the two HTTP requests and the event stream.\n"
    )
    print(body)
    if write:
        write_section("things-daemon", ".venv/bin/python bench/bench_things.py --daemons", body)


def main() -> None:
    """Run the benchmark and write its section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--things", type=int, default=10_000)
    parser.add_argument("--readings", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--measure-open", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--daemons", action="store_true",
                        help="only the scan through two daemons' HTTP APIs (own section)")
    args = parser.parse_args()
    if args.daemons:
        run_daemons(args.rounds, not args.no_write)
        return
    if args.measure_open:
        print(json.dumps(trio.run(measure_open, Path(args.measure_open))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        box = Path(tmp) / "box"
        built = trio.run(build, box, args.things, args.readings)
        print(f"built {args.things} things in {built:.1f} s", file=sys.stderr)
        child = subprocess.run([sys.executable, __file__, "--measure-open", str(box)],
                               check=True, capture_output=True, text=True)
        opened = json.loads(child.stdout.strip().splitlines()[-1])
        store_mib = sum(f.stat().st_size for f in box.rglob("*") if f.is_file()) / 2**20
        scans = trio.run(scan_rounds, Path(tmp) / "scan", args.rounds)
    body = (
        f"A home box holding {args.things:,} things with {args.readings} readings each "
        f"(built in {built:.0f} s; store {store_mib:,.0f} MiB on disk), opened in a fresh "
        "process:\n\n"
        "| measure | p2pcloud | anchor, same run |\n| --- | --- | --- |\n"
        f"| time to open the node (store, sub-clouds, things index) | {opened['open_s']:.2f} s "
        f"| of which `node.things` (index, channels, tasks): {opened['things_open_s']:.2f} s |\n"
        f"| RSS after opening | {opened['rss_after']:.0f} MiB | {opened['rss_before']:.0f} MiB "
        "before opening (interpreter and imports) |\n"
        f"| time to list every thing | {opened['list_s'] * 1000:.0f} ms "
        f"({opened['things']:,} things) | |\n"
        f"| thing endpoints running after open | {opened['hosted']} | |\n"
        f"| replicas in memory after open and list | {opened['in_memory']} | |\n\n"
        "Replicas load lazily (at most `MAX_LOADED_REPLICAS` unpinned in memory); the index "
        "and the list come from values derived per sub-cloud state and saved at close "
        "(docs/subclouds.md, \"Lazy replicas\"); `node.things` adds an index entry per thing "
        "and starts nothing per thing.\n\n"
        f"Scan to open on a second device (loopback, {args.rounds} rounds): a tag PNG "
        "decoded with zxing-cpp on the phone, claimed there, until the laptop lists it as "
        f"claimed: median {statistics.median(scans) * 1000:.0f} ms, "
        f"min {min(scans) * 1000:.0f} ms, max {max(scans) * 1000:.0f} ms.\n"
    )
    print(body)
    if not args.no_write:
        write_section("things", "python bench/bench_things.py", body)


if __name__ == "__main__":
    main()
