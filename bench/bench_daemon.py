"""Daemon cold start to ready, and idle memory: p2pcloudd beside Syncthing, same run, same box.

What is measured, for each daemon, ``RUNS`` times (median and best reported):

* **first start to ready**: from spawning the process on an empty data dir until its local
  API answers an authenticated status request. For p2pcloudd this includes creating the
  identity, token and state files. Syncthing needs ``syncthing generate`` first (its keys and
  config.xml, timed separately), then ``syncthing serve`` until ``/rest/system/ping`` pongs.
* **restart to ready**: the same daemon started again on its existing data dir.
* **idle RSS**: resident memory ``IDLE_S`` seconds after ready with nothing to do (p2pcloudd:
  the whole process tree, found through every thread's ``children`` list as in
  bench_idle.py; Syncthing: its serve monitor plus the Syncthing process it runs).

Safety, as in ../shared/bench/syncthing-bench.sh: the script re-executes itself in a fresh
network namespace (``unshare -n``) that has only ``lo``; Syncthing additionally has global and
local discovery, relays, NAT, STUN, usage and crash reports and upgrades off before its
first start. Every wait is bounded; only processes started here are stopped.

Run: ``.venv/bin/python bench/bench_daemon.py`` (root, or user namespaces). Needs Debian's
``syncthing`` (apt-get install -y syncthing); without it, only p2pcloudd is measured and the
table says so.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402

RUNS = int(os.environ.get("RUNS", "5"))
IDLE_S = float(os.environ.get("IDLE_S", "5"))
READY_TIMEOUT = 60.0  # s; a start that takes longer is a failure, not a data point
ST_GUI = ("127.0.0.1", 18384)
ST_LISTEN = "tcp://127.0.0.1:22101"
ST_KEY = "benchdaemonkey0123456789"


def in_netns() -> None:
    """Re-execute inside a fresh network namespace (only ``lo``, brought up)."""
    if os.environ.get("BENCH_IN_NETNS") != "1":
        ns = ["unshare", "-n"] if os.getuid() == 0 else ["unshare", "-rn"]
        os.execvp(ns[0], [*ns, "env", "BENCH_IN_NETNS=1", sys.executable, *sys.argv])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def http_get(host: str, port: int, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (0 once it is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Syncthing's ``serve`` is a monitor that runs the
    real Syncthing as a child), as bench_idle.py finds them.

    Every thread's ``children`` file is read: a Go program starts its child from whichever
    OS thread runs the goroutine, so the main thread's file alone misses it.
    """
    found = [pid]
    for parent in found:  # grows while we walk it: breadth-first over the whole tree
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                found += [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                continue
    return found


def tree_rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants, MiB."""
    return sum(rss_kb(p) for p in tree(pid)) / 1024


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- p2pcloudd ----------------------------------------------------------------------------


def p2pcloudd_start(data_dir: Path) -> tuple[float, subprocess.Popen[bytes]]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2pcloudd.service", "--data-dir", str(data_dir),
         "--port", "0", "--tcp-port", "0", "--api-port", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = t0 + READY_TIMEOUT
    while time.perf_counter() < deadline:
        try:
            info = json.loads((data_dir / "api.json").read_text())
            token = (data_dir / "api-token").read_text().strip()
        except (OSError, ValueError):
            info = None
        if info and info.get("pid") == proc.pid:
            host, port = info["url"].removeprefix("http://").rsplit(":", 1)
            try:
                status, _ = http_get(host, int(port), "/api/status",
                                     {"Authorization": f"Bearer {token}"})
            except OSError:
                status = 0
            if status == 200:
                return (time.perf_counter() - t0) * 1000, proc
        if proc.poll() is not None:
            raise RuntimeError(f"p2pcloudd exited with {proc.returncode} while starting")
        time.sleep(0.005)
    stop(proc)
    raise RuntimeError("p2pcloudd did not become ready")


def bench_p2pcloudd(work: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"first": [], "restart": [], "rss": []}
    for i in range(RUNS):
        data_dir = work / f"p2p{i}"
        ms, proc = p2pcloudd_start(data_dir)
        out["first"].append(ms)
        stop(proc)
        ms, proc = p2pcloudd_start(data_dir)
        out["restart"].append(ms)
        time.sleep(IDLE_S)
        out["rss"].append(tree_rss_mib(proc.pid))
        stop(proc)
    return out


# -- Syncthing ----------------------------------------------------------------------------


def syncthing_generate(home: Path, *, gui: tuple[str, int] = ST_GUI, listen: str = ST_LISTEN,
                       key: str = ST_KEY) -> float:
    """``syncthing generate`` into ``home``, then a loopback-only config; returns its ms."""
    t0 = time.perf_counter()
    subprocess.run(["syncthing", "generate", f"--home={home}", "--no-default-folder",
                    "--skip-port-probing"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=READY_TIMEOUT)
    ms = (time.perf_counter() - t0) * 1000
    path = home / "config.xml"
    tree = ET.parse(path)  # noqa: S314  (the file syncthing generate just wrote)
    root = tree.getroot()
    gui_e = root.find("gui")
    assert gui_e is not None
    gui_e.find("address").text = f"{gui[0]}:{gui[1]}"  # type: ignore[union-attr]
    gui_e.find("apikey").text = key  # type: ignore[union-attr]
    options = root.find("options")
    assert options is not None
    for tag in ("listenAddress", "stunServer", "globalAnnounceServer"):
        for e in options.findall(tag):
            options.remove(e)
    settings = {
        "listenAddress": listen, "globalAnnounceEnabled": "false",
        "localAnnounceEnabled": "false", "relaysEnabled": "false", "natEnabled": "false",
        "urAccepted": "-1", "urSeen": "3", "autoUpgradeIntervalH": "0",
        "crashReportingEnabled": "false", "startBrowser": "false",
        "announceLANAddresses": "false", "stunKeepaliveStartS": "0", "stunKeepaliveMinS": "0",
    }
    for tag, value in settings.items():
        found = options.find(tag)
        e = found if found is not None else ET.SubElement(options, tag)
        e.text = value
    tree.write(path)
    return ms


def syncthing_start(home: Path, *, gui: tuple[str, int] = ST_GUI, key: str = ST_KEY,
                    ) -> tuple[float, subprocess.Popen[bytes]]:
    """Start ``syncthing serve`` on ``home``; return (ms until it pongs, the process)."""
    env = {**os.environ, "STNOUPGRADE": "1", "STNORESTART": "1", "STNODEFAULTFOLDER": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        ["syncthing", "serve", f"--home={home}", "--no-browser", "--no-restart",
         "--no-upgrade", f"--logfile={home / 'syncthing.log'}", "--log-max-old-files=0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = t0 + READY_TIMEOUT
    while time.perf_counter() < deadline:
        try:
            status, body = http_get(*gui, "/rest/system/ping", {"X-API-Key": key})
        except OSError:
            status, body = 0, b""
        if status == 200 and b"pong" in body:
            return (time.perf_counter() - t0) * 1000, proc
        if proc.poll() is not None:
            raise RuntimeError(f"syncthing exited with {proc.returncode} while starting")
        time.sleep(0.005)
    stop(proc)
    raise RuntimeError("syncthing did not become ready")


def bench_syncthing(work: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"generate": [], "first": [], "restart": [], "rss": []}
    for i in range(RUNS):
        home = work / f"st{i}"
        out["generate"].append(syncthing_generate(home))
        ms, proc = syncthing_start(home)
        out["first"].append(ms)
        stop(proc)
        ms, proc = syncthing_start(home)
        out["restart"].append(ms)
        time.sleep(IDLE_S)
        out["rss"].append(tree_rss_mib(proc.pid))
        stop(proc)
    return out


def cell(values: list[float], unit: str) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values):.0f} {unit} (best {min(values):.0f})"


def main() -> None:
    in_netns()
    import p2pcloud

    work = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    try:
        load_before = Path("/proc/loadavg").read_text().split()[:3]
        ours = bench_p2pcloudd(work)
        have_st = shutil.which("syncthing") is not None
        theirs = bench_syncthing(work) if have_st else {}
        load_after = Path("/proc/loadavg").read_text().split()[:3]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    st_version = (subprocess.run(["syncthing", "--version"], capture_output=True, text=True)
                  .stdout.split()[1] if have_st else "not installed")
    rows = [
        "| | p2pcloudd | Syncthing " + st_version + " |",
        "| --- | --- | --- |",
        f"| first start to ready (empty data dir) | {cell(ours['first'], 'ms')} | "
        f"{cell(theirs.get('first', []), 'ms')} + `generate` "
        f"{cell(theirs.get('generate', []), 'ms')} |",
        f"| restart to ready | {cell(ours['restart'], 'ms')} | "
        f"{cell(theirs.get('restart', []), 'ms')} |",
        f"| idle RSS after {IDLE_S:.0f} s | {cell(ours['rss'], 'MiB')} | "
        f"{cell(theirs.get('rss', []), 'MiB')} |",
    ]
    notes = (
        f"\nMedian of {RUNS} runs each (best in brackets), both daemons in the same run inside "
        "one network namespace holding only `lo`. Ready = the local API answers an "
        "authenticated status request (p2pcloudd `GET /api/status` with the bearer token; "
        "Syncthing `GET /rest/system/ping` with its API key). p2pcloudd's first start creates "
        "its identity; Syncthing's keys and config come from `syncthing generate`, timed "
        "apart. RSS counts the whole process tree (Syncthing: its `serve` monitor plus the "
        "Syncthing process it runs, found through every thread's children list). p2pcloudd runs "
        f"under CPython {sys.version.split()[0]} with the {p2pcloud.core_implementation()} "
        f"merge core; most of its start is importing Python modules. Load average "
        f"{' '.join(load_before)} before, {' '.join(load_after)} after, on a shared "
        f"{os.cpu_count()}-core machine."
    )
    body = "\n".join(rows) + "\n" + notes
    print(body)
    write_section("daemon", ".venv/bin/python bench/bench_daemon.py", body)


if __name__ == "__main__":
    main()
