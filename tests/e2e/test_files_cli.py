"""``p2pcloud files add|ls``: two real daemons sync a folder, driven only by the CLI."""

from __future__ import annotations

import http.client
import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

from tests.e2e.conftest import WAIT, Daemon, cli, cli_json, wait_for


def _last_progress(daemon: Daemon, sc: str, up_to: int) -> Any:
    """The peers of the last ``sync.progress`` event for ``sc`` with an id up to ``up_to``,
    read from the daemon's event history (``Last-Event-ID: 0`` replays it)."""
    url = urllib.parse.urlsplit(daemon.api_url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=WAIT)
    try:
        conn.request("GET", "/api/events", headers={
            "Authorization": f"Bearer {daemon.token}", "Last-Event-ID": "0"})
        response = conn.getresponse()
        assert response.status == 200
        seen = None
        for raw in response:
            if not raw.startswith(b"data: "):
                continue
            event = json.loads(raw[6:])
            assert event["type"] != "reset", "the history no longer holds the events"
            if event["type"] == "sync.progress" and event["data"]["subcloud"] == sc:
                seen = event["data"]["peers"]
            if event["id"] >= up_to:
                return seen
        raise AssertionError("the event stream ended")
    finally:
        conn.close()


def test_files_add_syncs_a_folder_both_ways_and_ls_lists_it(
    two_daemons: tuple[Daemon, Daemon], tmp_path: Path,
) -> None:
    a, b = two_daemons
    b_hn = b.status()["hashname"]
    cli_json(a.data_dir, "link", b.status()["link_uri"])
    sc = cli_json(a.data_dir, "sc", "new", "photos")["id"]
    cli_json(a.data_dir, "share", sc, b_hn, "write")
    wait_for("B holds the sub-cloud",
             lambda: any(s["id"] == sc for s in cli_json(b.data_dir, "sc", "ls")["subclouds"]))

    fa, fb = tmp_path / "fa", tmp_path / "fb"
    fa.mkdir()
    fb.mkdir()
    (fa / "a.txt").write_text("from A\n")
    (fb / "b.txt").write_text("from B\n")
    added = cli_json(a.data_dir, "files", "add", sc, str(fa))
    assert added["path"] == str(fa.resolve()) and added["files"] == 1
    cli_json(b.data_dir, "files", "add", "photos", str(fb))  # by name works too
    wait_for("both files on both sides", lambda: all(
        (d / n).exists() for d in (fa, fb) for n in ("a.txt", "b.txt")))
    assert (fb / "a.txt").read_text() == "from A\n"
    assert (fa / "b.txt").read_text() == "from B\n"

    listed = wait_for("A lists 2 files", lambda: [
        f for f in cli_json(a.data_dir, "files", "ls")["folders"] if f["files"] == 2])
    assert listed[0]["conflicts"] == [] and listed[0]["subcloud"] == sc
    # Progress: once the file is there nothing is left to move (--wait returns at once);
    # after a big file from A has arrived, `progress --wait` ends with every peer in sync.
    rest = cli_json(b.data_dir, "progress", "photos", "--wait", "--timeout", "60")
    (only,) = rest["subclouds"]
    assert only["subcloud"] == sc and only["peers"]
    assert all(p["send_items"] == p["receive_items"] == 0 for p in only["peers"])
    (fa / "big.bin").write_bytes(os.urandom(8 << 20))
    wait_for("big.bin on B", lambda: (fb / "big.bin").exists()
             and (fb / "big.bin").stat().st_size == 8 << 20)
    shown = cli(b.data_dir, "progress", "--wait", "--timeout", "60")
    assert shown.returncode == 0 and f"photos ↔ {a.status()['hashname']}: in sync" in (
        shown.stdout), shown.stdout

    # The sync.progress events say the same: the last one B published for the sub-cloud
    # (replayed from B's event history) matches what B's API reports now, all moved.
    newest = int(cli_json(b.data_dir, "events", "--count", "1", "--type", "statistics")["id"])
    detail = b.get(f"/api/subclouds/{sc}")["peers"]
    assert _last_progress(b, sc, newest) == detail
    assert all(p["blob_bytes_done"] == p["blob_bytes_total"] for p in detail)

    # A synced file is a document of the "files" collection; its blob reference reads as JSON.
    doc = cli_json(b.data_dir, "get", sc, "files", "a.txt")
    (version,) = [v for v in doc["fields"].values()]
    version = version[0] if isinstance(version, list) else version
    assert version["blob"]["size"] == len("from A\n") and len(version["blob"]["$blob"]) == 64
    text = cli(b.data_dir, "files", "ls")
    assert text.returncode == 0 and str(fb.resolve()) in text.stdout

    # Errors say what to do: a missing directory, a sub-cloud we do not hold.
    missing = cli(a.data_dir, "files", "add", sc, str(tmp_path / "nope"))
    assert missing.returncode == 1 and "mkdir" in missing.stderr
    unknown = cli(a.data_dir, "files", "add", "no-such", str(fa))
    assert unknown.returncode == 1 and "p2pcloud sc ls" in unknown.stderr
