"""A tiny lab of Linux network namespaces: hosts, bridges, veths, real daemons inside.

Theory of operation
-------------------
A :class:`Lab` owns every namespace it creates, all named ``p2pt<pid>-<name>`` so that two
runs never collide and a leftover of a killed run is recognisable (:func:`sweep_stale`
removes namespaces whose run is gone). Topology:

* one *switch* namespace holds the bridges (``ip link add brN type bridge``); a bridge is
  one LAN segment, with multicast snooping off so mDNS (224.0.0.251) floods like on a
  home switch;
* each *host* namespace gets one veth per leg: ``ethK`` inside the host, its peer
  enslaved to the leg's bridge in the switch namespace, an address in 10.77.N.0/24;
  loopback is brought up (the daemon's API listens on 127.0.0.1 inside the host);
* IP forwarding stays off everywhere (a new namespace's default): a host with legs in two
  segments is no IP router, so a host on the other segment reaches the first segment only
  through the mesh (telehash ``peer``/``connect``), which is what the tests check.

A :class:`Host` runs real ``p2pcloudd`` processes inside its namespace with
``ip netns exec`` (which execs, so the child's pid is the daemon's) and talks to the
daemon's HTTP API through an :class:`Agent`: one small Python process inside the same
namespace (``_agent.py``) that forwards JSON requests to 127.0.0.1, so the test process
itself never needs to enter a namespace. Every wait is bounded (hang guards); closing the
lab kills what it started (by pid) and deletes its namespaces, which also removes the
veths and bridges inside them.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
AGENT = Path(__file__).resolve().parent / "_agent.py"
PREFIX = "p2pt"
IP_TIMEOUT = 10.0  # s for one `ip` command; they take milliseconds
CALL_TIMEOUT = 45.0  # s for one API call through the agent (a join waits up to 30 s)
START_TIMEOUT = 30.0  # s for a daemon to write api.json and answer
STOP_TIMEOUT = 10.0  # s for a daemon to exit after SIGTERM before SIGKILL


class LabError(Exception):
    """The lab could not be built (no root, no iproute2, namespaces refused)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True,  # noqa: S603,S607
                          timeout=IP_TIMEOUT, check=False)
    if check and done.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can (probed for real)."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install -y iproute2)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    done = _ip("netns", "add", probe, check=False)
    if done.returncode != 0:
        return f"ip netns add is refused here: {done.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def sweep_stale() -> None:
    """Delete namespaces left by lab runs whose process is gone (a killed test run)."""
    done = _ip("netns", "list", check=False)
    for line in done.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX) or "-" not in name:
            continue
        pid_text = name[len(PREFIX):].split("-", 1)[0]
        if pid_text.isdigit() and not Path(f"/proc/{pid_text}").exists():
            # daemons a killed run left inside (its own, by pid), then the namespace
            for pid in _ip("netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", name, check=False)


class Agent:
    """A helper process inside a namespace that forwards API calls to its daemon."""

    def __init__(self, netns: str, data_dir: Path, env: dict[str, str]) -> None:
        """Start ``_agent.py`` in ``netns`` for the daemon of ``data_dir``."""
        self.proc = subprocess.Popen(  # noqa: S603  (our interpreter, our script)
            ["ip", "netns", "exec", netns, sys.executable, str(AGENT), str(data_dir)],  # noqa: S607
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env=env, cwd=REPO)

    def call(self, method: str, path: str, body: Any = None,
             timeout: float = CALL_TIMEOUT) -> tuple[int, Any]:
        """One request; returns ``(status, JSON body or None)``; status 0: no daemon answer."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        line = json.dumps({"method": method, "path": path, "body": body, "timeout": timeout})
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout + 5.0)
        if not ready:
            raise AssertionError(f"agent: no answer to {method} {path} in {timeout + 5} s")
        answer = self.proc.stdout.readline()
        if not answer:
            raise AssertionError(f"agent exited during {method} {path}")
        reply = json.loads(answer)
        return int(reply["status"]), reply["body"]

    def close(self) -> None:
        """Stop the agent."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class Host:
    """One namespace with its legs and the daemon running in it."""

    lab: Lab
    name: str
    netns: str
    addresses: list[str] = field(default_factory=list)
    data_dir: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    agent: Agent | None = None

    def exec(self, *cmd: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace and wait for it."""
        return subprocess.run(["ip", "netns", "exec", self.netns, *cmd],  # noqa: S603,S607
                              capture_output=True, text=True, timeout=timeout,
                              env=self.lab.env, cwd=REPO, check=False)

    def start(self, *flags: str) -> None:
        """Start ``p2pcloudd`` here (data dir under the lab's folder) and wait for its API."""
        self.data_dir = self.data_dir or self.lab.folder / self.name
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = (self.data_dir / "p2pcloudd.log").open("ab")
        command = [sys.executable, "-m", "p2pcloudd.service", "--data-dir", str(self.data_dir),
                   "--api-port", "0", "--tcp-port", "0", "--log-level", "debug", *flags]
        with log:
            self.proc = subprocess.Popen(  # noqa: S603
                ["ip", "netns", "exec", self.netns, *command],  # noqa: S607
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.lab.env, cwd=REPO)
        api = self.data_dir / "api.json"
        wait_for(f"{self.name}: daemon writes api.json",
                 lambda: self._alive() and api.exists()
                 and json.loads(api.read_text() or "{}").get("pid") == self.proc.pid,
                 START_TIMEOUT)
        if self.agent is not None:
            self.agent.close()
        self.agent = Agent(self.netns, self.data_dir, self.lab.env)
        wait_for(f"{self.name}: API answers", lambda: self.api("GET", "/api/status")[0] == 200,
                 START_TIMEOUT)

    def _alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"{self.name}: the daemon exited: {self.log_tail()}")
        return True

    def log_tail(self, lines: int = 30) -> str:
        """The end of the daemon's log (for failure messages)."""
        if self.data_dir is None:
            return ""
        path = self.data_dir / "p2pcloudd.log"
        text = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(text[-lines:])

    def api(self, method: str, path: str, body: Any = None,
            timeout: float = CALL_TIMEOUT) -> tuple[int, Any]:
        """A request to this host's daemon: ``(status, JSON)``."""
        assert self.agent is not None, f"{self.name}: no daemon started"
        return self.agent.call(method, path, body, timeout)

    def ok(self, method: str, path: str, body: Any = None,
           timeout: float = CALL_TIMEOUT) -> Any:
        """A request that must succeed (2xx); returns its JSON."""
        status, answer = self.api(method, path, body, timeout)
        assert 200 <= status < 300, f"{self.name}: {method} {path} -> {status} {answer}"
        return answer

    def stop(self, *, kill: bool = False) -> None:
        """Stop the daemon (SIGTERM, or SIGKILL with ``kill``; SIGKILL after a grace)."""
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Lab:
    """Namespaces, bridges and hosts for one test module; close it to remove everything."""

    def __init__(self, folder: Path) -> None:
        """A lab whose daemons keep their data dirs under ``folder``.

        Raises:
            LabError: the switch namespace cannot be created.
        """
        sweep_stale()
        self.folder = folder
        self.tag = f"{PREFIX}{os.getpid()}"
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("P2PCLOUD_HOME", "XDG_DATA_HOME")}
        self.env["PYTHONUNBUFFERED"] = "1"
        self.namespaces: list[str] = []
        self.hosts: dict[str, Host] = {}
        self.bridges: list[str] = []
        self.switch = self._netns("switch")

    def _netns(self, name: str) -> str:
        netns = f"{self.tag}-{name}"
        _ip("netns", "add", netns)
        self.namespaces.append(netns)
        _ip("-n", netns, "link", "set", "lo", "up")
        return netns

    def bridge(self) -> int:
        """A new LAN segment; returns its number N (addresses 10.77.N.0/24)."""
        number = len(self.bridges)
        name = f"br{number}"
        _ip("-n", self.switch, "link", "add", name, "type", "bridge",
            "mcast_snooping", "0")
        _ip("-n", self.switch, "link", "set", name, "up")
        self.bridges.append(name)
        return number

    def host(self, name: str, *segments: tuple[int, int]) -> Host:
        """A host with a leg on each ``(segment, last address byte)``."""
        netns = self._netns(name)
        host = Host(self, name, netns)
        for leg, (segment, last) in enumerate(segments):
            outside = f"v{len(self.hosts)}{leg}{name[:8]}"
            address = f"10.77.{segment}.{last}"
            _ip("link", "add", f"eth{leg}", "netns", netns, "type", "veth",
                "peer", "name", outside, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", outside, "master", self.bridges[segment])
            _ip("-n", self.switch, "link", "set", outside, "up")
            _ip("-n", netns, "addr", "add", f"{address}/24", "dev", f"eth{leg}")
            _ip("-n", netns, "link", "set", f"eth{leg}", "up")
            host.addresses.append(address)
        self.hosts[name] = host
        return host

    def close(self) -> None:
        """Stop every daemon and agent, delete every namespace (never raises)."""
        for host in self.hosts.values():
            with contextlib.suppress(Exception):
                host.stop()
        for netns in reversed(self.namespaces):
            _ip("netns", "del", netns, check=False)
        self.namespaces.clear()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0,
             interval: float = 0.2) -> Any:
    """Poll ``check()`` until it returns something truthy; fail after ``timeout`` (a hang
    guard, not a timing assertion: the bound is far above what the step needs)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not true after {timeout} s (last: {last!r})")
