"""``p2pcloud demo``: the real command as a subprocess, three real daemons on loopback.

The demo makes its temporary folder under ``TMPDIR``; the tests point that at ``tmp_path``
so they can check the folder is gone afterwards and that no daemon of it still runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.e2e.conftest import WAIT, env, wait_for

DEMO_WAIT = 180.0  # s: three daemons, links, a blob and folder watches on a shared machine


def _demo_env(tmp_path: Path) -> dict[str, str]:
    e = env()
    e["TMPDIR"] = str(tmp_path)
    return e


def _demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pcloudd.cli", "demo", *args], capture_output=True,
        text=True, timeout=DEMO_WAIT, env=_demo_env(tmp_path), check=False)


def _demo_dirs(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("p2pcloud-demo-*"))


def _daemons_in(base: Path) -> list[int]:
    """Pids of p2pcloudd processes whose command line names a dir under ``base``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if b"p2pcloudd.service" in cmdline and str(base).encode() in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


def test_demo_once_shows_three_devices_converging_and_cleans_up(tmp_path: Path) -> None:
    done = _demo(tmp_path, "--once")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    base = Path(out.splitlines()[0].rsplit(" in ", 1)[1])
    assert base.parent == tmp_path
    for step in ("1. starting a laptop, a phone and a home box", "2. linking them",
                 "3. the laptop creates the sub-cloud 'family'", "4. each device writes",
                 "5. each device syncs a folder", "6. converged"):
        assert step in out, out
    for writer, doc in (("laptop", "shopping"), ("phone", "photos"), ("home box", "heating")):
        assert f"{writer:<9} wrote notes/{doc}" in out
    assert "later.txt is on the phone and the home box" in out
    assert "all converged" in out
    assert "stopped cleanly" in out
    # Everything it started is gone: its folder and its three daemons.
    assert not base.exists()
    assert _demo_dirs(tmp_path) == []
    assert _daemons_in(tmp_path) == []


def test_demo_once_json_reports_what_converged(tmp_path: Path) -> None:
    done = _demo(tmp_path, "--once", "--json")
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    assert facts["ok"] is True
    assert sorted(facts["devices"]) == ["home box", "laptop", "phone"]
    hashnames = {d["hashname"] for d in facts["devices"].values()}
    assert len(hashnames) == 3
    assert len(facts["links"]) == 3
    assert facts["documents"] == 3
    assert [w["writer"] for w in facts["writes"]] == ["laptop", "phone", "home box"]
    for write in facts["writes"]:
        assert len(write["arrived_ms"]) == 2 and write["writer"] not in write["arrived_ms"]
    assert facts["folders"]["files"] == ["hello.txt", "later.txt", "photo.jpg",
                                         "recipes/soup.md"]
    assert not Path(facts["base"]).exists()
    assert _daemons_in(tmp_path) == []


def _read_until(proc: subprocess.Popen[str], marker: str) -> list[str]:
    """Lines of the demo's output up to and including the first one containing ``marker``."""
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"the demo ended before {marker!r}: {''.join(lines)}"
                         f"{proc.stderr.read() if proc.stderr else ''}")


def _base(lines: list[str]) -> Path:
    return Path(lines[0].rsplit(" in ", 1)[1].strip())


def test_demo_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "p2pcloudd.cli", "demo"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=_demo_env(tmp_path),
    ) as proc:
        try:
            lines = _read_until(proc, "Press Ctrl-C")
            base = _base(lines)
            # Without --once the daemons keep running and the dashboards are offered.
            assert "login?code=" in "".join(lines)
            assert len(_daemons_in(base)) == 3
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=WAIT) == 130
            assert proc.stdout is not None
            assert "stopped cleanly" in proc.stdout.read()
        finally:
            if proc.poll() is None:
                proc.kill()
    assert not base.exists()
    wait_for("the demo's daemons gone", lambda: _daemons_in(tmp_path) == [])


def test_demo_fails_with_the_reason_when_a_device_dies(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "p2pcloudd.cli", "demo", "--once"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=_demo_env(tmp_path),
    ) as proc:
        try:
            lines = _read_until(proc, "the home box holds it")
            base = _base(lines)
            phone = json.loads((base / "phone" / "api.json").read_text())["pid"]
            os.kill(phone, signal.SIGKILL)  # the phone dies mid-demo
            status = proc.wait(timeout=DEMO_WAIT)
            assert proc.stderr is not None
            err = proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
    assert status == 1, err
    assert "demo failed:" in err and "phone" in err.splitlines()[-2], err
    assert "--- phone:" in err  # the end of each daemon's log comes with the reason
    assert not base.exists()
    wait_for("the demo's daemons gone", lambda: _daemons_in(tmp_path) == [])
