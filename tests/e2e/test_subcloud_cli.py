"""Sub-cloud data through the CLI and the API: two real daemons linked on 127.0.0.1.

A creates a sub-cloud and shares it read-only with B; writes made on A with ``p2pcloud put``
show up on B (``p2pcloud get --json``, polled with a bound), deletes too; B's own writes are
refused (403); unknown sub-clouds and documents are 404s; ``p2pcloud watch`` on B reports a
change that came from A.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.e2e.conftest import WAIT, Daemon, cli, cli_json, env, wait_for


def _get(daemon: Daemon, *args: str) -> Any:
    done = cli(daemon.data_dir, "get", *args, "--json")
    return json.loads(done.stdout) if done.returncode == 0 else None


def test_share_put_get_delete_across_two_daemons(two_daemons: tuple[Daemon, Daemon]) -> None:
    a, b = two_daemons
    b_hashname = b.status()["hashname"]
    cli_json(a.data_dir, "link", b.status()["link_uri"])

    sc = cli_json(a.data_dir, "sc", "new", "notes")
    assert sc["name"] == "notes" and sc["kind"] == "device" and sc["rights"] == "write"
    assert sc["owner"] == a.status()["hashname"]
    assert [s["id"] for s in cli_json(a.data_dir, "sc", "ls")["subclouds"]] == [sc["id"]]
    shared = cli_json(a.data_dir, "share", sc["id"], b_hashname, "read")
    assert shared == {"subcloud": sc["id"], "hashname": b_hashname, "rights": "read"}

    put = cli_json(a.data_dir, "put", "notes", "todo", "t1", "title=hello", "count=3",
                   "done=false", "tags=[1, 2]")
    assert put["fields"] == {"title": "hello", "count": 3, "done": False, "tags": [1, 2]}
    assert cli_json(a.data_dir, "ls", "notes") == {"subcloud": sc["id"],
                                                   "collections": ["todo"]}

    # B receives the sub-cloud and the document.
    seen = wait_for("t1 on B", lambda: _get(b, sc["id"], "todo", "t1"))
    assert seen["fields"] == put["fields"]
    on_b = cli_json(b.data_dir, "sc", "ls")["subclouds"]
    assert [(s["id"], s["rights"]) for s in on_b] == [(sc["id"], "read")]
    assert cli_json(b.data_dir, "ls", sc["id"], "todo")["documents"] == ["t1"]

    # B may only read: 403 through the API, exit 1 with a hint through the CLI.
    denied = b.request("PUT", f"/api/subclouds/{sc['id']}/todo/t2", body={"title": "no"})
    assert denied.status == 403 and denied.json()["error"]["code"] == "access_denied"
    refused = cli(b.data_dir, "put", sc["id"], "todo", "t2", "title=no")
    assert refused.returncode == 1 and "write rights" in refused.stderr
    not_owner = b.request("POST", f"/api/subclouds/{sc['id']}/share",
                          body={"hashname": b_hashname, "rights": "write"})
    assert not_owner.status == 403

    # `p2pcloud watch` on B reports a change that came from A.
    watch = subprocess.Popen(
        [sys.executable, "-m", "p2pcloudd.cli", "--data-dir", str(b.data_dir), "watch",
         "--count", "1", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        counter = iter(range(10**6))

        def change_seen() -> bool:
            cli_json(a.data_dir, "put", "notes", "todo", "t3", f"n={next(counter)}")
            return watch.poll() is not None

        wait_for("watch on B sees a change", change_seen)
        out, err = watch.communicate(timeout=WAIT)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate()
    assert watch.returncode == 0, err
    event = json.loads(out.splitlines()[0])
    assert event["type"] == "change"
    assert event["data"]["subcloud"] == sc["id"] and event["data"]["collection"] == "todo"
    assert event["data"]["origin"] == a.status()["hashname"]

    # Delete on A; B sees it gone (404).
    assert cli_json(a.data_dir, "rm", "notes", "todo", "t1")["deleted"] is True
    wait_for("t1 gone on B", lambda: _get(b, sc["id"], "todo", "t1") is None)
    gone = b.request("GET", f"/api/subclouds/{sc['id']}/todo/t1")
    assert gone.status == 404 and gone.json()["error"]["code"] == "unknown_document"
    again = cli(a.data_dir, "rm", "notes", "todo", "t1")
    assert again.returncode == 1 and "no document" in again.stderr and "next:" in again.stderr


def test_errors_unknown_subcloud_and_bad_input(two_daemons: tuple[Daemon, Daemon]) -> None:
    a, _ = two_daemons
    missing = cli(a.data_dir, "get", "nope", "c", "d")
    assert missing.returncode == 1 and "no sub-cloud 'nope'" in missing.stderr
    assert "sc ls" in missing.stderr  # the hint
    answer = a.request("GET", "/api/subclouds/nope/collections")
    assert answer.status == 404 and answer.json()["error"]["code"] == "unknown_subcloud"
    cli_json(a.data_dir, "sc", "new", "box", "--kind", "thing")
    bad = cli(a.data_dir, "put", "box", "c", "d", "no-equals-sign")
    assert bad.returncode == 2 and "FIELD=VALUE" in bad.stderr
    empty = a.request("PUT", "/api/subclouds/box/c/d", body={})
    assert empty.status == 400 and empty.json()["error"]["code"] == "no_fields"
    not_object = a.request("PUT", "/api/subclouds/box/c/d", body=[1])
    assert not_object.status == 400 and not_object.json()["error"]["code"] == "invalid_body"
    bad_kind = a.request("POST", "/api/subclouds", body={"name": "x", "kind": "planet"})
    assert bad_kind.status == 400
    as_json = cli(a.data_dir, "get", "box", "c", "d", "--json")
    assert as_json.returncode == 1
    assert json.loads(as_json.stderr)["error"]["exit_status"] == 1


def test_docs_list_every_subcloud_command() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "daemon.md").read_text()
    for command in ("p2pcloud sc new", "p2pcloud sc ls", "p2pcloud put", "p2pcloud get",
                    "p2pcloud ls", "p2pcloud rm", "p2pcloud share", "p2pcloud watch"):
        assert command in text, command
