"""API latency: a write through one daemon's local API until the change is on another's
event stream. p2pcloudd beside Syncthing, same run, same box.

p2pcloudd: two daemons (separate processes, loopback), A linked with B, A owns a sub-cloud
shared (write) with B. One sample: ``PUT /api/subclouds/{sc}/bench/d{i}`` on A (a fresh HTTP
connection, as the CLI makes), until B's ``GET /api/events`` stream delivers the ``change``
event for ``bench/d{i}``. B applies, stores durably and only then publishes the event. The
PUT answers once A's write is durable; its own round trip is reported too.

Syncthing (the anchor, as in bench_daemon.py and ../shared/bench/syncthing-bench.sh): two
instances paired via REST on loopback, one shared folder with the file watcher off. One
sample: write ``s{i}.txt`` into A's folder and ``POST /rest/db/scan?folder=lat&sub=s{i}.txt``
on A (Syncthing's API way of saying "this changed"), until B's ``GET /rest/events``
long-poll delivers ``ItemFinished`` for that file (B has written it).

Samples run one after the other (no overlap), after ``WARMUP`` unmeasured ones. Both run in
one fresh network namespace holding only ``lo`` (the script re-executes itself with
``unshare -n``); Syncthing has discovery, relays, NAT, usage reports and upgrades off.

Run: ``.venv/bin/python bench/bench_api.py`` (root, or user namespaces). ``SAMPLES`` (default
500) and ``ST_SAMPLES`` (default 200) set the counts. Needs Debian's ``syncthing`` for the
anchor; without it only p2pcloudd is measured and the table says so.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402
from bench_daemon import (  # noqa: E402
    in_netns,
    p2pcloudd_start,
    stop,
    syncthing_generate,
    syncthing_start,
)

SAMPLES = int(os.environ.get("SAMPLES", "500"))
ST_SAMPLES = int(os.environ.get("ST_SAMPLES", "200"))
WARMUP = 20  # unmeasured samples first: imports, caches, TCP windows
SAMPLE_TIMEOUT = 60.0  # s; a sample that takes longer fails the benchmark
ST_A = {"gui": ("127.0.0.1", 18384), "listen": "tcp://127.0.0.1:22101",
        "key": "benchapiA0123456789"}
ST_B = {"gui": ("127.0.0.1", 18385), "listen": "tcp://127.0.0.1:22102",
        "key": "benchapiB0123456789"}


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def request(host: str, port: int, method: str, path: str, headers: dict[str, str],
            body: Any = None) -> tuple[int, Any]:
    """One request on a fresh connection; returns (status, JSON or None)."""
    conn = http.client.HTTPConnection(host, port, timeout=SAMPLE_TIMEOUT)
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        headers = {**headers, "Content-Type": "application/json"}
    try:
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw) if raw else None
    except ValueError:
        return response.status, None


# -- p2pcloudd ------------------------------------------------------------------------------


class P2p:
    """A started p2pcloudd's API."""

    def __init__(self, data_dir: Path) -> None:
        self.ready_ms, self.proc = p2pcloudd_start(data_dir)
        info = json.loads((data_dir / "api.json").read_text())
        host, port = info["url"].removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.auth = {"Authorization": "Bearer " + (data_dir / "api-token").read_text().strip()}

    def call(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = request(self.host, self.port, method, path, self.auth, body)
        if status >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {status} {answer}")
        return answer


def sse_reader(host: str, port: int, headers: dict[str, str],
               out: queue.Queue[tuple[float, dict[str, Any]]]) -> http.client.HTTPConnection:
    """Read p2pcloudd's event stream in a thread: ``(perf_counter at arrival, event)``."""
    conn = http.client.HTTPConnection(host, port, timeout=None)
    conn.request("GET", "/api/events", headers={**headers, "Accept": "text/event-stream"})
    response = conn.getresponse()
    assert response.status == 200, response.status

    def read() -> None:
        try:
            for raw in response:
                if raw.startswith(b"data: "):
                    out.put((time.perf_counter(), json.loads(raw[6:])))
        except Exception:  # noqa: BLE001,S110  (the stream is closed at the end of the run)
            pass

    threading.Thread(target=read, daemon=True).start()
    return conn


def wait_event(events: queue.Queue[tuple[float, dict[str, Any]]], match: Any) -> float:
    deadline = time.perf_counter() + SAMPLE_TIMEOUT
    while True:
        arrived, event = events.get(timeout=max(0.01, deadline - time.perf_counter()))
        if match(event):
            return arrived


def bench_p2pcloudd(work: Path, samples: int) -> dict[str, list[float]]:
    a, b = P2p(work / "p2p-a"), P2p(work / "p2p-b")
    conn = None
    try:
        b_status = b.call("GET", "/api/status")
        a.call("POST", "/api/links", {"uri": b_status["link_uri"]})
        sc = a.call("POST", "/api/subclouds", {"name": "bench"})["id"]
        a.call("POST", f"/api/subclouds/{sc}/share",
               {"hashname": b_status["hashname"], "rights": "write"})
        deadline = time.monotonic() + SAMPLE_TIMEOUT
        while not any(s["id"] == sc for s in b.call("GET", "/api/subclouds")["subclouds"]):
            if time.monotonic() > deadline:
                raise RuntimeError("B never received the sub-cloud")
            time.sleep(0.02)
        b.call("GET", f"/api/subclouds/{sc}")  # B follows its changes from here on
        events: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        conn = sse_reader(b.host, b.port, b.auth, events)
        out: dict[str, list[float]] = {"event": [], "put": []}
        for i in range(WARMUP + samples):
            doc = f"d{i}"
            t0 = time.perf_counter()
            a.call("PUT", f"/api/subclouds/{sc}/bench/{doc}", {"v": i, "text": "hello"})
            t1 = time.perf_counter()
            arrived = wait_event(events, lambda e, doc=doc: e["type"] == "change"
                                 and e["data"]["document"] == doc)
            if i >= WARMUP:
                out["put"].append((t1 - t0) * 1000)
                out["event"].append((arrived - t0) * 1000)
        return out
    finally:
        if conn is not None:
            conn.close()
        stop(a.proc)
        stop(b.proc)


# -- Syncthing -------------------------------------------------------------------------------


class St:
    """A started Syncthing instance's REST API."""

    def __init__(self, home: Path, conf: dict[str, Any]) -> None:
        syncthing_generate(home, gui=conf["gui"], listen=conf["listen"], key=conf["key"])
        _, self.proc = syncthing_start(home, gui=conf["gui"], key=conf["key"])
        self.host, self.port = conf["gui"]
        self.listen = conf["listen"]
        self.auth = {"X-API-Key": conf["key"]}
        self.id = self.call("GET", "/rest/system/status")["myID"]

    def call(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = request(self.host, self.port, method, path, self.auth, body)
        if status >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {status} {answer}")
        return answer


def bench_syncthing(work: Path, samples: int) -> dict[str, list[float]]:
    a, b = St(work / "st-a", ST_A), St(work / "st-b", ST_B)
    try:
        folders = {a: work / "st-a-folder", b: work / "st-b-folder"}
        for me, other in ((a, b), (b, a)):
            folders[me].mkdir()
            me.call("POST", "/rest/config/devices",
                    {"deviceID": other.id, "name": "peer", "addresses": [other.listen]})
        for me in (a, b):
            me.call("POST", "/rest/config/folders", {
                "id": "lat", "label": "lat", "path": str(folders[me]), "type": "sendreceive",
                "fsWatcherEnabled": False, "rescanIntervalS": 86400,
                "devices": [{"deviceID": a.id}, {"deviceID": b.id}]})
        deadline = time.monotonic() + SAMPLE_TIMEOUT
        while True:
            conns = a.call("GET", "/rest/system/connections")["connections"]
            state = b.call("GET", "/rest/db/status?folder=lat").get("state")
            if conns.get(b.id, {}).get("connected") and state == "idle":
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the two Syncthing instances never connected")
            time.sleep(0.1)
        # A filtered event request has its own subscription (created by the first such
        # request) whose ids count only its events: create it now, start from its last id.
        first = b.call("GET", "/rest/events?events=ItemFinished&timeout=0") or []
        since = max([e["id"] for e in first] or [0])
        events: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        stop_flag = threading.Event()

        def poll() -> None:
            last = since
            while not stop_flag.is_set():
                try:
                    got = b.call("GET", f"/rest/events?events=ItemFinished&since={last}"
                             "&timeout=1")
                except (OSError, RuntimeError, http.client.HTTPException):
                    time.sleep(0.01)  # a long-poll cut short: ask again
                    continue
                now = time.perf_counter()
                for e in got or []:
                    last = max(last, e["id"])
                    events.put((now, e))

        threading.Thread(target=poll, daemon=True).start()
        out: dict[str, list[float]] = {"event": [], "put": []}
        try:
            for i in range(WARMUP + samples):
                name = f"s{i}.txt"
                t0 = time.perf_counter()
                (folders[a] / name).write_text(f"v {i} hello\n")
                a.call("POST", f"/rest/db/scan?folder=lat&sub={name}")
                t1 = time.perf_counter()
                arrived = wait_event(events, lambda e, name=name: e["data"].get("item") == name
                                     and e["data"].get("folder") == "lat")
                if i >= WARMUP:
                    out["put"].append((t1 - t0) * 1000)
                    out["event"].append((arrived - t0) * 1000)
        finally:
            stop_flag.set()
        return out
    finally:
        for st in (a, b):
            kids = Path(f"/proc/{st.proc.pid}/task/{st.proc.pid}/children")
            inner = kids.read_text().split() if kids.exists() else []
            stop(st.proc)
            for pid in inner:  # `serve` runs its inner syncthing as a child
                try:
                    if b"syncthing" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        os.kill(int(pid), 15)
                except OSError:
                    continue


def row(name: str, values: list[float]) -> str:
    if not values:
        return f"| {name} | n/a | n/a | n/a | n/a | 0 |"
    return (f"| {name} | {statistics.median(values):.1f} ms | {percentile(values, 95):.1f} ms | "
            f"{percentile(values, 99):.1f} ms | {max(values):.1f} ms | {len(values)} |")


def main() -> None:
    in_netns()
    import p2pcloud

    work = Path(tempfile.mkdtemp(prefix="bench-api-"))
    try:
        load_before = Path("/proc/loadavg").read_text().split()[:3]
        ours = bench_p2pcloudd(work, SAMPLES)
        have_st = shutil.which("syncthing") is not None
        theirs = bench_syncthing(work, ST_SAMPLES) if have_st else {}
        load_after = Path("/proc/loadavg").read_text().split()[:3]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    st_version = (subprocess.run(["syncthing", "--version"], capture_output=True, text=True,
                                 check=False).stdout.split()[1] if have_st else "not installed")
    rows = [
        "| from the API write on A to the event on B | p50 | p95 | p99 | max | samples |",
        "| --- | --- | --- | --- | --- | --- |",
        row("p2pcloudd: `PUT` document → B's `change` event (SSE)", ours["event"]),
        row(f"Syncthing {st_version}: write file + `POST /rest/db/scan` → B's "
            "`ItemFinished` (`/rest/events`)", theirs.get("event", [])),
        "",
        "| the write call alone | p50 | p95 | p99 | max | samples |",
        "| --- | --- | --- | --- | --- | --- |",
        row("p2pcloudd `PUT` (answers when durable on A)", ours["put"]),
        row("Syncthing file write + `POST /rest/db/scan` (answers when scanned)",
            theirs.get("put", [])),
    ]
    notes = (
        f"\nTwo daemons of each, as separate processes on loopback inside one network namespace "
        f"holding only `lo`, measured one after the other in the same run. Samples are "
        f"sequential (the next write starts when the previous event arrived), after {WARMUP} "
        "unmeasured ones; each HTTP call opens a fresh connection, as the CLI does. The "
        "Syncthing folder has its file watcher off and is told what changed through its API, "
        "the nearest equivalent of an API write; its events are read by long-polling "
        "`/rest/events` (p2pcloudd's by one open server-sent event stream). Both include the "
        "receiver writing the change durably before it reports it. p2pcloudd runs under "
        f"CPython {sys.version.split()[0]} with the {p2pcloud.core_implementation()} merge "
        f"core. Load average {' '.join(load_before)} before, {' '.join(load_after)} after, on "
        f"a shared {os.cpu_count()}-core machine."
    )
    body = "\n".join(rows) + "\n" + notes
    print(body)
    write_section("api", ".venv/bin/python bench/bench_api.py", body)


if __name__ == "__main__":
    main()
