"""The cloud through real daemons on 127.0.0.1: the API (every cloud route, answers checked
against the OpenAPI description) and the ``p2pcloud cloud`` commands.

* found, then an invite as a QR PNG decoded by the CLI with zxing-cpp (a real QR reader),
  join; the replayed invite and a mistyped one fail with clear errors;
* members with online state and path; policies; revocation (the last admin cannot go);
* a restarted member comes back online by itself (paths remembered in the data dir);
* short-code pairing over mDNS on loopback (``--discovery on``): a wrong code fails once and
  burns the code, a fresh code pairs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2pcloud.cloud._words import WORDS
from tests.e2e.conftest import Daemon, cli, cli_json, wait_for
from tests.e2e.test_api import Checked

ZERO = ("--port", "0", "--tcp-port", "0", "--api-port", "0")
LAN = (*ZERO, "--discovery", "on")  # mDNS on 127.0.0.1 only (the bind address)


def _error(answer: Any) -> tuple[int, str]:
    return answer.status, answer.json()["error"]["code"]


def _member(daemon: Daemon, hashname: str) -> dict[str, Any] | None:
    rows = cli_json(daemon.data_dir, "cloud", "members")["members"]
    return next((m for m in rows if m["hashname"] == hashname), None)


def test_found_invite_by_qr_join_members_policy_revoke(
    make_daemon: Callable[[str], Daemon], tmp_path: Path,
) -> None:
    home, laptop, other = make_daemon("home"), make_daemon("laptop"), make_daemon("other")
    for d in (home, laptop, other):
        d.up(*ZERO)
    spec = home.get("/api/openapi.json")
    api = Checked(home, spec)
    cloud_routes = {(m, p) for p, item in spec["paths"].items() for m, op in item.items()
                    if op["tags"] == ["cloud"]}
    assert all(op.get("description") for p, item in spec["paths"].items()
               for op in item.values() if op["tags"] == ["cloud"])

    # In no cloud yet: a clear 409 on what needs one.
    assert api.call("GET", "/api/cloud").json()["cloud_id"] is None
    assert _error(api.call("GET", "/api/cloud/members")) == (409, "no_cloud")
    assert _error(api.call("POST", "/api/cloud/invites", body={})) == (409, "no_cloud")

    founded = api.call("POST", "/api/cloud")
    assert founded.status == 201
    cloud_id = founded.json()["cloud_id"]
    assert founded.json()["role"] == "admin" and founded.json()["members"] == 1
    assert _error(api.call("POST", "/api/cloud")) == (409, "already_in_cloud")
    home_hn = home.status()["hashname"]

    # An invite as a QR PNG through the CLI; the laptop's CLI decodes the picture.
    png = tmp_path / "invite.png"
    invite = cli_json(home.data_dir, "cloud", "invite", "--png", str(png))
    assert invite["uri"].startswith("p2pcloud:invite/1/") and png.read_bytes()[:4] == b"\x89PNG"
    joined = cli_json(laptop.data_dir, "cloud", "join", str(png))
    assert joined["cloud_id"] == cloud_id
    laptop_hn = laptop.status()["hashname"]
    assert cli_json(laptop.data_dir, "cloud", "status")["role"] == "device"

    # The same invite again, from another device: refused with a sentence.
    replay = other.request("POST", "/api/cloud/join",
                           body={"invite": invite["uri"], "timeout": 10})
    assert _error(replay) == (422, "join_failed")
    assert "used" in replay.json()["error"]["message"]
    refused = cli(other.data_dir, "cloud", "join", invite["uri"])
    assert refused.returncode == 1 and "used" in refused.stderr
    # A mistyped one (one character changed) is caught by its check, before any network.
    typo = invite["uri"][:-3] + ("a" if invite["uri"][-3] != "a" else "b") + invite["uri"][-2:]
    assert _error(api.call("POST", "/api/cloud/join", body={"invite": typo})) == (
        409, "cannot_join")  # the home box is in a cloud already: that comes first
    bad = other.request("POST", "/api/cloud/join", body={"invite": typo})
    assert _error(bad) == (422, "bad_invite")
    not_file = cli(other.data_dir, "cloud", "join", str(tmp_path / "missing.png"))
    assert not_file.returncode == 2 and "neither an invite nor a file" in not_file.stderr

    # In the terminal: the QR code drawn with block characters, then the URI to paste.
    drawn = cli(home.data_dir, "cloud", "invite", "--qr", "--expires", "120")
    assert drawn.returncode == 0, drawn.stderr
    assert "\u2588" in drawn.stdout or "\u2580" in drawn.stdout or "\u2584" in drawn.stdout
    assert drawn.stdout.strip().splitlines()[-1].startswith("p2pcloud:invite/1/")
    # Invites with a QR code inside the JSON, as the dashboard would take them.
    svg = api.call("POST", "/api/cloud/invites", body={"qr": "svg", "expires_in": 600})
    assert svg.status == 201 and svg.json()["qr_svg"].lstrip().startswith("<?xml")
    assert api.call("POST", "/api/cloud/invites", body={"role": "thing"}).status == 400

    # Members: both online, the laptop over a direct path.
    wait_for("laptop online at home", lambda: (_member(home, laptop_hn) or {}).get("online"))
    rows = api.call("GET", "/api/cloud/members").json()["members"]
    assert [r["hashname"] for r in rows] == [home_hn, laptop_hn]
    assert rows[0]["self"] and rows[0]["role"] == "admin"
    assert rows[1]["role"] == "device" and rows[1]["path"]["direct"]
    assert rows[1]["path"]["type"] in ("udp4", "tcp4")
    online = cli(home.data_dir, "cloud", "online")
    assert online.returncode == 0 and laptop_hn in online.stdout
    assert api.call("GET", "/api/cloud").json()["online"] == 1

    # Policies: the laptop keeps the home box's device sub-cloud on demand.
    device_sc = next(s["id"] for s in cli_json(home.data_dir, "sc", "ls")["subclouds"]
                     if s["kind"] == "device" and s["owner"] == home_hn)
    set_policy = api.call("PUT", "/api/cloud/policies",
                          body={"member": laptop_hn, "subcloud": device_sc, "mode": "on-demand"})
    assert set_policy.json() == {"member": laptop_hn, "subcloud": device_sc, "mode": "on-demand"}
    assert cli_json(home.data_dir, "cloud", "policy", "*", "*", "full")["mode"] == "full"
    listed = api.call("GET", "/api/cloud/policies").json()
    assert {"member": laptop_hn, "subcloud": device_sc, "mode": "on-demand"} in listed["policies"]
    assert {"member": "*", "subcloud": "*", "mode": "full"} in listed["policies"]
    assert cli_json(home.data_dir, "cloud", "policies") == listed
    assert _error(api.call("PUT", "/api/cloud/policies", body={
        "member": laptop_hn, "subcloud": "nope", "mode": "full"})) == (404, "unknown_subcloud")
    assert _error(api.call("PUT", "/api/cloud/policies", body={
        "member": laptop_hn, "subcloud": device_sc, "mode": "sometimes"})) == (400, "invalid_body")
    # A device is no admin: it can neither invite nor set policies.
    assert _error(laptop.request("POST", "/api/cloud/invites", body={})) == (403, "not_admin")

    # A restart: the new laptop process links the home box by itself, by the path it
    # remembered (no link command, no mDNS here).
    assert cli(laptop.data_dir, "down").returncode == 0
    laptop.up(*ZERO)
    wait_for("home online from the restarted laptop",
             lambda: (_member(laptop, home_hn) or {}).get("online"))

    # Revocation: the last admin cannot go; the laptop can, once.
    assert _error(api.call("DELETE", "/api/cloud/members/{hashname}",
                           url=f"/api/cloud/members/{home_hn}")) == (409, "last_admin")
    assert _error(api.call("DELETE", "/api/cloud/members/{hashname}",
                           url="/api/cloud/members/xyz")) == (400, "bad_hashname")
    revoked = cli_json(home.data_dir, "cloud", "revoke", laptop_hn)
    assert revoked == {"revoked": laptop_hn}
    assert _error(api.call("DELETE", "/api/cloud/members/{hashname}",
                           url=f"/api/cloud/members/{laptop_hn}")) == (409, "already_revoked")
    row = _member(home, laptop_hn)
    assert row is not None and row["revoked"]
    wait_for("the revoked laptop is unlinked",
             lambda: not (_member(home, laptop_hn) or {}).get("online"))
    listing = cli(home.data_dir, "cloud", "members")
    assert listing.returncode == 0 and "revoked" in listing.stdout

    # Pairing routes on the home box: it opens codes; it cannot pair into a second cloud.
    opened = api.call("POST", "/api/cloud/pairing", body={"expires_in": 60})
    assert opened.status == 201 and opened.json()["code"].count("-") == 3
    assert _error(api.call("POST", "/api/cloud/pair", body={"code": opened.json()["code"]})
                  ) == (409, "cannot_join")
    assert _error(other.request("POST", "/api/cloud/pairing", body={})) == (409, "no_cloud")
    missing = cloud_routes - api.exercised
    assert not missing, f"cloud routes not exercised: {missing}"


def test_short_code_pairing_over_mdns(make_daemon: Callable[[str], Daemon]) -> None:
    home, phone, thief = make_daemon("home"), make_daemon("phone"), make_daemon("thief")
    for d in (home, phone, thief):
        d.up(*LAN)
    spec = home.get("/api/openapi.json")
    api = Checked(home, spec)
    cloud_id = api.call("POST", "/api/cloud").json()["cloud_id"]

    # A wrong guess gets one try, and burns the code for everyone.
    opened = api.call("POST", "/api/cloud/pairing", body={"expires_in": 120})
    assert opened.status == 201
    code = opened.json()["code"]
    number, *words = code.split("-")
    wrong = "-".join([number, *words[:-1], next(w for w in WORDS if w != words[-1])])
    guess = Checked(thief, spec).call("POST", "/api/cloud/pair",
                                      body={"code": wrong, "timeout": 20})
    assert _error(guess) == (422, "join_failed")
    late = phone.request("POST", "/api/cloud/pair", body={"code": code, "timeout": 5})
    assert late.status in (422, 504) and late.json()["error"]["code"] in (
        "join_failed", "join_timeout")

    # A fresh code, through the CLI on both sides.
    fresh = cli_json(home.data_dir, "cloud", "code")["code"]
    done = cli(phone.data_dir, "cloud", "pair", fresh, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["cloud_id"] == cloud_id
    phone_hn = phone.status()["hashname"]
    wait_for("the phone is a member at home", lambda: _member(home, phone_hn))
    assert cli_json(thief.data_dir, "cloud", "status")["cloud_id"] is None
