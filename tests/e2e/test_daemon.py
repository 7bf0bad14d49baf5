"""The daemon and the CLI as a user runs them: real processes, real sockets on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.e2e.conftest import WAIT, Daemon, cli, cli_json, env, wait_for

ZERO_PORTS = ("--port", "0", "--tcp-port", "0", "--api-port", "0")


def service(data_dir: Path, *args: str) -> list[str]:
    """The command line of the daemon itself (what the p2pcloudd script runs)."""
    return [sys.executable, "-m", "p2pcloudd.service", "--data-dir", str(data_dir), *args]


def test_two_daemons_link_through_the_api_and_see_each_other(
    two_daemons: tuple[Daemon, Daemon],
) -> None:
    a, b = two_daemons
    b_status = b.status()
    answer = a.request("POST", "/api/links", body={"uri": b_status["link_uri"]})
    assert answer.status == 200, answer.body
    assert answer.json()["hashname"] == b_status["hashname"]
    a_hashname = a.status()["hashname"]

    row = wait_for("B online in A's peers", lambda: (a.peer(b_status["hashname"]) or {})
                   .get("online") and a.peer(b_status["hashname"]))
    assert row["path"]["ip"] == "127.0.0.1"
    assert row["path"]["type"] in ("udp4", "tcp4") and row["path"]["direct"] is True
    assert row["uri"] == b_status["link_uri"]
    back = wait_for("A online in B's peers", lambda: (b.peer(a_hashname) or {}).get("online")
                    and b.peer(a_hashname))
    assert back["uri"] is None  # A linked to B: B never saw A's URI
    assert a.status()["links_up"] == 1

    # The human view shows the same peer.
    table = cli(a.data_dir, "peers")
    assert table.returncode == 0 and b_status["hashname"] in table.stdout


def test_cli_link_and_errors_that_say_what_to_do(two_daemons: tuple[Daemon, Daemon]) -> None:
    a, b = two_daemons
    uri = cli_json(b.data_dir, "id")["link_uri"]
    linked = cli_json(a.data_dir, "link", uri)
    assert linked["hashname"] == b.status()["hashname"]

    bad = cli(a.data_dir, "link", "http://not-a-link-uri")
    assert bad.returncode == 1
    assert "not a link URI" in bad.stderr and "next:" in bad.stderr

    self_link = cli(a.data_dir, "link", a.status()["link_uri"])
    assert self_link.returncode == 1, self_link.stderr

    human_id = cli(a.data_dir, "id")
    assert human_id.returncode == 0
    assert a.status()["link_uri"] in human_id.stdout
    assert "\u2580" in human_id.stdout or "\u2584" in human_id.stdout  # the QR code's blocks


def test_kill_9_and_restart_keeps_identity_ports_and_peers(
    two_daemons: tuple[Daemon, Daemon],
) -> None:
    a, b = two_daemons
    b_hashname = b.status()["hashname"]
    assert a.request("POST", "/api/links", body={"uri": b.status()["link_uri"]}).status == 200
    before = a.status()
    wait_for("A's state.json remembers B", lambda: b_hashname in
             (a.data_dir / "state.json").read_text())

    os.kill(a.pid, signal.SIGKILL)
    gone = wait_for("A's API gone", lambda: cli(a.data_dir, "status"). returncode == 3
                    and cli(a.data_dir, "status"))
    assert "not running" in gone.stderr and "p2pcloud up" in gone.stderr

    a.up()  # no port flags: the remembered ports
    after = a.status()
    assert after["hashname"] == before["hashname"]
    assert after["ports"] == before["ports"]
    assert after["pid"] != before["pid"]
    # B is still a known peer, and `relink` brings the link back by itself.
    row = wait_for("A relinks B", lambda: (a.peer(b_hashname) or {}).get("online"))
    assert row


def test_a_second_daemon_on_the_same_data_dir_refuses(
    make_daemon: Callable[[str], Daemon],
) -> None:
    a = make_daemon("a")
    a.up(*ZERO_PORTS)
    second = subprocess.run(service(a.data_dir, *ZERO_PORTS), capture_output=True, text=True,
                            timeout=WAIT, env=env(), check=False)
    assert second.returncode == 3
    assert "already running on the data dir" in second.stderr
    assert f"pid {a.pid}" in second.stderr
    assert "p2pcloud down" in second.stderr
    # `up` against a running daemon says so and changes nothing.
    again = cli_json(a.data_dir, "up")
    assert again["already_running"] is True and again["pid"] == a.pid


def test_sigterm_stops_cleanly_with_status_0(tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    with subprocess.Popen(service(data_dir, *ZERO_PORTS), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env()) as proc:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # NODE's banner lines, then the daemon's
            lines.append(line.strip())
            if line.startswith("dashboard:"):
                break
        assert any(x.startswith("hashname: ") for x in lines)
        assert any(x.startswith("link URI: link://") for x in lines)
        assert (data_dir / "api.json").exists()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    assert "p2pcloudd: stopped" in out
    assert not (data_dir / "api.json").exists()
    state = json.loads((data_dir / "state.json").read_text())
    assert state["udp_port"] and state["tcp_port"] and state["api_port"]
    for name in ("api-token", "identity.key", "state.json"):
        assert (data_dir / name).stat().st_mode & 0o077 == 0, name


def test_once_prints_and_exits(tmp_path: Path) -> None:
    done = subprocess.run(service(tmp_path / "d", *ZERO_PORTS, "--once"), capture_output=True,
                          text=True, timeout=WAIT, env=env(), check=False)
    assert done.returncode == 0, done.stderr
    assert "hashname: " in done.stdout and "api: http://127.0.0.1:" in done.stdout


def test_the_api_refuses_missing_wrong_and_malformed_tokens(
    make_daemon: Callable[[str], Daemon],
) -> None:
    a = make_daemon("a")
    a.up(*ZERO_PORTS)
    for token, header, code in (
        (None, None, "unauthorized"),
        ("wrong-token", None, "bad_token"),
        (None, "Basic dXNlcjpwYXNz", "bad_auth_header"),
        (None, "Bearer ", "bad_auth_header"),
    ):
        headers = {"Authorization": header} if header else {}
        for method, path in (("GET", "/api/status"), ("GET", "/api/peers"),
                             ("POST", "/api/shutdown"), ("GET", "/api/events")):
            answer = a.request(method, path, token=token, headers=headers)
            assert answer.status == 401, (method, path, token, header)
            error = answer.json()["error"]
            assert error["code"] == code and error["message"] and error["hint"]
            assert answer.headers["www-authenticate"] == "Bearer"
    # The daemon is still there: the refused shutdown did nothing.
    assert a.status()["pid"] == a.pid
    # A page of another site that resolves its name to 127.0.0.1 (DNS rebinding) is refused.
    rebound = a.request("GET", "/api/status", headers={"Host": "evil.example:80"})
    assert rebound.status == 403 and rebound.json()["error"]["code"] == "bad_host"
    # Unknown routes answer with the same error body.
    missing = a.request("GET", "/api/nope")
    assert missing.status == 404 and missing.json()["error"]["code"] == "not_found"


def test_non_loopback_api_needs_an_explicit_option(tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    done = subprocess.run(service(data_dir, *ZERO_PORTS, "--api-bind", "0.0.0.0"),
                          capture_output=True, text=True, timeout=WAIT, env=env(), check=False)
    assert done.returncode == 2
    assert "refusing to serve the HTTP API on 0.0.0.0" in done.stderr
    assert "allow_remote_api = true" in done.stderr
    assert not (data_dir / "api.json").exists()


def test_config_file_is_checked(tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    (data_dir / "config.toml").write_text('api_prot = 0\n')
    done = subprocess.run(service(data_dir, "--once"), capture_output=True, text=True,
                          timeout=WAIT, env=env(), check=False)
    assert done.returncode == 2
    assert "unknown option 'api_prot'" in done.stderr and "did you mean 'api_port'" in done.stderr

    (data_dir / "config.toml").write_text('port = "many"\n')
    done = subprocess.run(service(data_dir, "--once"), capture_output=True, text=True,
                          timeout=WAIT, env=env(), check=False)
    assert done.returncode == 2 and "port must be a port number" in done.stderr

    (data_dir / "config.toml").write_text(
        'port = 0\ntcp_port = 0\napi_port = 0\nlog_format = "json"\nlog_level = "debug"\n')
    done = subprocess.run(service(data_dir, "--once"), capture_output=True, text=True,
                          timeout=WAIT, env=env(), check=False)
    assert done.returncode == 0, done.stderr
    ready = [json.loads(line) for line in done.stderr.splitlines() if '"ready"' in line]
    assert ready and ready[0]["level"] == "info" and ready[0]["logger"] == "p2pcloudd"


def test_cli_without_a_daemon_and_init_and_doctor(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh"
    for command in ("status", "peers", "id", "down", "dashboard"):
        done = cli(data_dir, command)
        assert done.returncode == 3, (command, done.stderr)
        assert "the daemon is not running" in done.stderr and "p2pcloud up" in done.stderr
    created = cli_json(data_dir, "init")
    assert created["created"] is True and len(created["hashname"]) == 52
    assert cli_json(data_dir, "init")["hashname"] == created["hashname"]
    report = cli(data_dir, "doctor", "--json")
    checks = {c["check"]: c for c in json.loads(report.stdout)["checks"]}
    assert report.returncode == 0  # not running is a warning, not a failure
    assert checks["daemon"]["result"] == "warn"
    assert checks["merge core"]["detail"].split()[0] in ("cython", "python")
    assert checks["identity.key"]["result"] == "ok"

    os.chmod(data_dir / "api-token", 0o644)
    report = cli(data_dir, "doctor", "--json")
    assert report.returncode == 1
    assert {c["check"]: c for c in json.loads(report.stdout)["checks"]}["api-token"][
        "result"] == "fail"


def test_doctor_and_status_against_a_running_daemon(make_daemon: Callable[[str], Daemon]) -> None:
    a = make_daemon("a")
    a.up(*ZERO_PORTS)
    report = cli_json(a.data_dir, "doctor")
    assert report["ok"] is True
    checks = {c["check"]: c for c in report["checks"]}
    assert checks["daemon"]["result"] == "ok" and str(a.pid) in checks["daemon"]["detail"]
    status = cli_json(a.data_dir, "status")
    assert str(status["ports"]["udp"]) in checks["ports"]["detail"]
    human = cli(a.data_dir, "status")
    assert human.returncode == 0 and status["hashname"] in human.stdout
    pid = a.pid
    down = cli_json(a.data_dir, "down")
    assert down["stopped"] is True and down["pid"] == pid
    assert cli(a.data_dir, "status").returncode == 3


def test_cli_follows_events(two_daemons: tuple[Daemon, Daemon]) -> None:
    a, b = two_daemons
    command = [sys.executable, "-m", "p2pcloudd.cli", "--data-dir", str(a.data_dir), "events",
               "--json", "--type", "link.up", "--count", "1"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env()) as follower:
        wait_for("the follower subscribed", lambda: a.get("/api/statistics")["daemon"][
            "event_subscribers"] == 1)
        assert cli(a.data_dir, "link", b.status()["link_uri"]).returncode == 0
        out, err = follower.communicate(timeout=WAIT)
    assert follower.returncode == 0, err
    event = json.loads(out)
    assert event["type"] == "link.up" and event["data"]["hashname"] == b.status()["hashname"]


def test_up_reports_why_the_daemon_could_not_start(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli(tmp_path / "d", "up", "--port", "0", "--tcp-port", "0",
                   "--api-port", str(port))
    assert done.returncode == 1
    assert "exited with status 2 while starting" in done.stderr
    assert f"API port {port} on 127.0.0.1 is already in use" in done.stderr
    assert "p2pcloudd.log" in done.stderr

