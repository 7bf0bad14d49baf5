"""Synced folders survive a daemon restart (``folders.json``): real daemons, CLI and API."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from tests.e2e.conftest import Daemon, cli, cli_json, wait_for

ZERO_PORTS = ("--port", "0", "--tcp-port", "0", "--api-port", "0")


def _remembered(daemon: Daemon) -> list[dict[str, str]]:
    data = json.loads((daemon.data_dir / "folders.json").read_text())
    return list(data["folders"])


def _log(daemon: Daemon) -> str:
    return (daemon.data_dir / "p2pcloudd.log").read_text(errors="replace")


def test_a_folder_syncs_again_after_restart_with_what_changed_while_down(
    two_daemons: tuple[Daemon, Daemon], tmp_path: Path,
) -> None:
    a, b = two_daemons
    cli_json(a.data_dir, "link", b.status()["link_uri"])
    sc = cli_json(a.data_dir, "sc", "new", "docs")["id"]
    cli_json(a.data_dir, "share", sc, b.status()["hashname"], "write")
    wait_for("B holds the sub-cloud",
             lambda: any(s["id"] == sc for s in cli_json(b.data_dir, "sc", "ls")["subclouds"]))
    fa, fb = tmp_path / "fa", tmp_path / "fb"
    fa.mkdir()
    fb.mkdir()
    (fa / "before.txt").write_text("written before the restart\n")
    cli_json(a.data_dir, "files", "add", sc, str(fa))
    cli_json(b.data_dir, "files", "add", sc, str(fb))
    wait_for("before.txt on B", lambda: (fb / "before.txt").exists())
    assert _remembered(a) == [{"subcloud": sc, "path": str(fa.resolve())}]
    assert (a.data_dir / "folders.json").stat().st_mode & 0o777 == 0o600

    assert cli(a.data_dir, "down").returncode == 0
    (fa / "while-down.txt").write_text("written while the daemon was down\n")
    a.up()  # the remembered ports: B's link comes back by A's relink of B

    listed = wait_for("A syncs the folder again", lambda: [
        f for f in cli_json(a.data_dir, "files", "ls")["folders"]
        if f["path"] == str(fa.resolve())])
    assert listed[0]["subcloud"] == sc
    wait_for("while-down.txt on B", lambda: (fb / "while-down.txt").exists()
             and (fb / "while-down.txt").read_text() == "written while the daemon was down\n")
    # Still watched after the restart: a file written now travels too.
    (fa / "after.txt").write_text("written after the restart\n")
    wait_for("after.txt on B", lambda: (fb / "after.txt").exists())
    assert a.get("/api/folders")["unavailable"] == []
    assert _remembered(a) == [{"subcloud": sc, "path": str(fa.resolve())}]


def test_a_folder_deleted_while_down_is_reported_and_kept(
    make_daemon: Callable[[str], Daemon], tmp_path: Path,
) -> None:
    a = make_daemon("a")
    a.up(*ZERO_PORTS)
    sc = cli_json(a.data_dir, "sc", "new", "photos")["id"]
    gone, kept = tmp_path / "gone", tmp_path / "kept"
    gone.mkdir()
    kept.mkdir()
    cli_json(a.data_dir, "files", "add", sc, str(gone))
    cli_json(a.data_dir, "files", "add", sc, str(kept))
    assert cli(a.data_dir, "down").returncode == 0
    shutil.rmtree(gone)

    a.up()  # starts although a remembered folder is gone
    body = wait_for("the gone folder reported", lambda: a.get("/api/folders")
                    if a.get("/api/folders")["unavailable"] else None)
    assert body["unavailable"] == [{"subcloud": sc, "path": str(gone.resolve()),
                                    "reason": "the directory no longer exists"}]
    wait_for("the other folder re-added", lambda: [
        f for f in a.get("/api/folders")["folders"] if f["path"] == str(kept.resolve())])
    log = wait_for("the warning logged", lambda: [
        line for line in _log(a).splitlines() if "not re-added" in line])
    assert str(gone.resolve()) in log[0] and "no longer exists" in log[0]
    # Kept in the file (it may be an unmounted disk): recreating it and restarting syncs it.
    assert {f["path"] for f in _remembered(a)} == {str(gone.resolve()), str(kept.resolve())}
    assert cli(a.data_dir, "down").returncode == 0
    gone.mkdir()
    a.up()
    wait_for("both folders synced again", lambda: len(a.get("/api/folders")["folders"]) == 2)
    assert a.get("/api/folders")["unavailable"] == []


def test_a_damaged_folders_file_is_logged_moved_aside_and_the_daemon_starts(
    make_daemon: Callable[[str], Daemon], tmp_path: Path,
) -> None:
    a = make_daemon("a")
    a.up(*ZERO_PORTS)
    sc = cli_json(a.data_dir, "sc", "new", "music")["id"]
    assert cli(a.data_dir, "down").returncode == 0
    (a.data_dir / "folders.json").write_bytes(b'{"folders": [{"subcloud": 3')

    a.up()
    log = wait_for("the error logged", lambda: [
        line for line in _log(a).splitlines() if "synced folders not restored" in line])
    assert "folders.json is damaged" in log[0] and "folders.json.damaged" in log[0]
    assert (a.data_dir / "folders.json.damaged").read_bytes() == b'{"folders": [{"subcloud": 3'
    assert a.get("/api/folders") == {"folders": [], "unavailable": []}
    # A folder added now is remembered in a fresh file.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    cli_json(a.data_dir, "files", "add", sc, str(fresh))
    assert _remembered(a) == [{"subcloud": sc, "path": str(fresh.resolve())}]
