"""An idle cloud member: memory and CPU of p2pcloudd with 5 peers linked, beside Syncthing.

What is measured (issue 5: "the daemon must be fit for a phone"):

* p2pcloudd: six daemons on loopback form one cloud (a member founds it, five peers join by
  invite), so the member holds 5 links and the cloud keeps them (keepalives, the cloud's
  re-link keeper, the daemon's own tasks). After a settle time nobody writes anything.
* Syncthing: six instances, the member sharing one folder with five devices, all connected.
  Both idle **at the same time, over the same window**, so the shared machine's load hits
  both alike.

For each member process: RSS at the end of the window (and the peak, VmHWM), and CPU time
(utime + stime from /proc) used during the window, scaled to **CPU seconds per hour**. Peers
are measured too (their median), as each is itself an idle member with 1..5 links.

Safety, as in bench_daemon.py: the script re-executes itself in a fresh network namespace
(``unshare -n``) holding only ``lo``; Syncthing's discovery, relays, NAT, STUN and reports
are off before its first start. Every wait is bounded; only processes started here stop.

Run: ``.venv/bin/python bench/bench_idle.py [--duration 180]`` (root, or user namespaces).
Needs Debian's ``syncthing`` for the comparison (without it only p2pcloudd is measured).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402
from bench_daemon import (  # noqa: E402
    in_netns,
    p2pcloudd_start,
    rss_kb,
    stop,
    syncthing_generate,
    syncthing_start,
    tree,
)

PEERS = 5
SETTLE_S = 20.0  # s after everything is linked before the window opens (start-up work ends)
LINK_TIMEOUT = 120.0  # s for every peer to be linked; longer is a failure, not a data point
TICK = os.sysconf("SC_CLK_TCK")


# -- process facts --------------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (fields 14 and 15 of /proc/PID/stat)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


# -- p2pcloudd ------------------------------------------------------------------------------


class Api:
    """The API of one daemon (token and address from its data dir)."""

    def __init__(self, data_dir: Path) -> None:
        info = json.loads((data_dir / "api.json").read_text())
        self.host, port = info["url"].removeprefix("http://").rsplit(":", 1)
        self.port = int(port)
        self.token = (data_dir / "api-token").read_text().strip()

    def call(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        headers = {"Authorization": f"Bearer {self.token}"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {data[:300]!r}")
        return json.loads(data) if data else None


def start_p2pcloud(work: Path) -> tuple[list[subprocess.Popen[bytes]], list[Api]]:
    procs, apis = [], []
    for i in range(PEERS + 1):
        _, proc = p2pcloudd_start(work / f"p2p{i}")
        procs.append(proc)
        apis.append(Api(work / f"p2p{i}"))
    member = apis[0]
    member.call("POST", "/api/cloud")
    for peer in apis[1:]:
        invite = member.call("POST", "/api/cloud/invites", {})["uri"]
        peer.call("POST", "/api/cloud/join", {"invite": invite})
    deadline = time.monotonic() + LINK_TIMEOUT
    while True:
        online = member.call("GET", "/api/cloud")["online"]
        if online == PEERS:
            return procs, apis
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {online} of {PEERS} peers online after {LINK_TIMEOUT} s")
        time.sleep(0.2)


# -- Syncthing ------------------------------------------------------------------------------


def _st_call(gui: tuple[str, int], key: str, method: str, path: str, body: Any = None) -> Any:
    conn = http.client.HTTPConnection(*gui, timeout=30)
    headers = {"X-API-Key": key, "Content-Type": "application/json"}
    try:
        conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                     headers=headers)
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    if response.status >= 300:
        raise RuntimeError(f"syncthing {method} {path}: {response.status} {data[:300]!r}")
    return json.loads(data) if data and data[:1] in (b"{", b"[") else None


def start_syncthing(work: Path) -> list[subprocess.Popen[bytes]]:
    procs, nodes = [], []
    for i in range(PEERS + 1):
        home = work / f"st{i}"
        gui = ("127.0.0.1", 18400 + i)
        listen = f"tcp://127.0.0.1:{22200 + i}"
        key = f"benchidlekey{i:02d}0123456789"
        syncthing_generate(home, gui=gui, listen=listen, key=key)
        _, proc = syncthing_start(home, gui=gui, key=key)
        procs.append(proc)
        my_id = _st_call(gui, key, "GET", "/rest/system/status")["myID"]
        nodes.append({"gui": gui, "key": key, "listen": listen, "id": my_id, "home": home})
    member, peers = nodes[0], nodes[1:]
    for peer in peers:  # pair both ways with static addresses (no discovery)
        _st_call(member["gui"], member["key"], "POST", "/rest/config/devices",
                 {"deviceID": peer["id"], "addresses": [peer["listen"]]})
        _st_call(peer["gui"], peer["key"], "POST", "/rest/config/devices",
                 {"deviceID": member["id"], "addresses": [member["listen"]]})
    devices = [{"deviceID": n["id"]} for n in nodes]
    for node in (member, *peers):  # one shared folder, as a cloud shares its sub-clouds
        (node["home"] / "shared").mkdir()
        _st_call(node["gui"], node["key"], "POST", "/rest/config/folders", {
            "id": "shared", "label": "shared", "path": str(node["home"] / "shared"),
            "type": "sendreceive", "devices": devices if node is member
            else [{"deviceID": member["id"]}, {"deviceID": node["id"]}],
        })
    deadline = time.monotonic() + LINK_TIMEOUT
    while True:
        conns = _st_call(member["gui"], member["key"], "GET",
                         "/rest/system/connections")["connections"]
        up = sum(1 for p in peers if conns.get(p["id"], {}).get("connected"))
        if up == PEERS:
            return procs
        if time.monotonic() > deadline:
            raise RuntimeError(f"syncthing: only {up} of {PEERS} peers connected")
        time.sleep(0.5)


# -- the window -----------------------------------------------------------------------------


def measure(groups: dict[str, list[subprocess.Popen[bytes]]], duration: float
            ) -> dict[str, list[dict[str, float]]]:
    """Idle ``duration`` seconds; per process: CPU s/hour, RSS and peak RSS (MiB)."""
    pids = {name: [tree(p.pid) for p in procs] for name, procs in groups.items()}
    before = {name: [sum(cpu_s(x) for x in t) for t in trees] for name, trees in pids.items()}
    t0 = time.monotonic()
    time.sleep(duration)
    elapsed = time.monotonic() - t0
    out: dict[str, list[dict[str, float]]] = {}
    for name, trees in pids.items():
        rows = []
        for t, cpu0 in zip(trees, before[name], strict=True):
            used = sum(cpu_s(x) for x in t) - cpu0
            rows.append({"cpu_s_per_h": used / elapsed * 3600,
                         "rss": sum(rss_kb(x) for x in t) / 1024,
                         "hwm": sum(hwm_kb(x) for x in t) / 1024})
        out[name] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180.0,
                        help="seconds of idling measured (default 180)")
    args = parser.parse_args()
    in_netns()
    import p2pcloud

    work = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    groups: dict[str, list[subprocess.Popen[bytes]]] = {}
    try:
        groups["p2pcloudd"] = start_p2pcloud(work)[0]
        have_st = shutil.which("syncthing") is not None
        if have_st:
            groups["syncthing"] = start_syncthing(work)
        time.sleep(SETTLE_S)
        load_before = Path("/proc/loadavg").read_text().split()[:3]
        result = measure(groups, args.duration)
        load_after = Path("/proc/loadavg").read_text().split()[:3]
    finally:
        for procs in groups.values():
            for proc in procs:
                stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    st_version = (subprocess.run(["syncthing", "--version"], capture_output=True, text=True,
                                 check=False).stdout.split()[1] if have_st else "not installed")

    def cells(name: str, key: str, fmt: str) -> tuple[str, str]:
        rows = result.get(name)
        if not rows:
            return "n/a", "n/a"
        return fmt.format(rows[0][key]), fmt.format(statistics.median(r[key] for r in rows[1:]))

    lines = [f"| | p2pcloudd member | Syncthing {st_version} member | p2pcloudd peers "
             "(median) | Syncthing peers (median) |", "| --- | --- | --- | --- | --- |"]
    for label, key, fmt in (("CPU seconds per hour idle", "cpu_s_per_h", "{:.1f} s"),
                            ("RSS at the end", "rss", "{:.1f} MiB"),
                            ("peak RSS (VmHWM)", "hwm", "{:.1f} MiB")):
        ours, ours_peers = cells("p2pcloudd", key, fmt)
        theirs, theirs_peers = cells("syncthing", key, fmt)
        lines.append(f"| {label} | {ours} | {theirs} | {ours_peers} | {theirs_peers} |")
    notes = (
        f"\nOne member with {PEERS} peers linked (p2pcloudd: one cloud, the peers joined by "
        f"invite; Syncthing: one folder shared with {PEERS} devices, all connected), idle "
        f"for {args.duration:.0f} s after a {SETTLE_S:.0f} s settle, both in the same window "
        "inside one network namespace holding only `lo`. CPU is utime+stime over the window, "
        "scaled to an hour; CPU and RSS count the whole process tree (Syncthing: its `serve` "
        "monitor plus the Syncthing process it runs, found through every thread's children "
        f"list). p2pcloudd runs under CPython {sys.version.split()[0]} with the "
        f"{p2pcloud.core_implementation()} merge core. Load average {' '.join(load_before)} "
        f"before, {' '.join(load_after)} after, on a shared {os.cpu_count()}-core machine."
    )
    body = "\n".join(lines) + "\n" + notes
    print(body)
    write_section("idle", ".venv/bin/python bench/bench_idle.py --duration "
                  f"{args.duration:.0f}", body)


if __name__ == "__main__":
    main()
