"""Things end to end: real daemons as subprocesses on 127.0.0.1, driven through the CLI.

One cloud of three owner devices (home box, laptop, phone) and a finder's daemon in a cloud
of its own are started once for the module (daemon start-up dominates the time). Each test
makes its own things, so the tests do not depend on each other's results; the rule test
stops and restarts two owner daemons and leaves all of them running again.

Waits poll a condition with a generous bound (conftest.WAIT) and fail with what they saw;
nothing sleeps for a fixed time to make a test pass, and no test asserts how long anything
took. "Exactly once" is checked on settled state: every device reports no rule firing it
still waits on (``rules_pending``), so no later firing can appear.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio

import p2pcloud
from p2pcloud._crypto import LocalIdentity
from p2pcloud._wire import b32decode, b32encode
from p2pcloud.things import scan as _s
from p2pcloud.things import tags
from tests.e2e.conftest import WAIT, Daemon, cli, cli_json, env, wait_for

UP_FLAGS = ("--port", "0", "--tcp-port", "0", "--api-port", "0")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Daemon]]:
    """Three owner daemons in one cloud (homebox founded it) and a finder in its own cloud."""
    base = tmp_path_factory.mktemp("things")
    daemons = {name: Daemon(base / name) for name in ("homebox", "laptop", "phone", "finder")}
    try:
        for d in daemons.values():
            d.up(*UP_FLAGS)
        cli_json(daemons["homebox"].data_dir, "cloud", "new")
        for name in ("laptop", "phone"):
            invite = cli_json(daemons["homebox"].data_dir, "cloud", "invite")["uri"]
            cli_json(daemons[name].data_dir, "cloud", "join", invite)
        cli_json(daemons["finder"].data_dir, "cloud", "new")
        wait_for("three members seen by every owner device", lambda: all(
            len(cli_json(daemons[n].data_dir, "cloud", "members")["members"]) == 3
            for n in ("homebox", "laptop", "phone")))
        yield daemons
    finally:
        for d in daemons.values():
            d.stop()


def owners(home: dict[str, Daemon]) -> list[Daemon]:
    """The three owner devices."""
    return [home["homebox"], home["laptop"], home["phone"]]


def things_on(d: Daemon, *flags: str) -> dict[str, dict[str, Any]]:
    """``p2pcloud thing ls --json`` as hashname -> thing."""
    return {t["hashname"]: t for t in cli_json(d.data_dir, "thing", "ls", *flags)["things"]}


def log_of(d: Daemon, thing: str, name: str) -> list[Any]:
    """Every record of a thing's log on ``d`` ([] while the thing has not arrived)."""
    answer = d.request("GET", f"/api/things/{thing}/logs/{name}?limit=20000")
    if answer.status == 404:
        return []
    assert answer.status == 200, answer.body
    page = answer.json()
    assert page["total"] == len(page["records"]), "a log larger than one page"
    return list(page["records"])


def rules_pending(d: Daemon) -> int:
    """Rule firings ``d`` still waits on."""
    return int(d.get("/api/things")["rules_pending"])


def fails(done: subprocess.CompletedProcess[str], *words: str) -> None:
    """The command failed with exit status 1 and a message naming every word."""
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    for word in words:
        assert word in done.stderr, (word, done.stderr)


# -- fresh tags: print, decode, claim, see everywhere; a second claim fails ------------------------


def test_fresh_tag_printed_decoded_claimed_on_the_phone_seen_everywhere(
    home: dict[str, Daemon], tmp_path: Path,
) -> None:
    homebox, laptop, phone = owners(home)
    sheet = tmp_path / "fresh.png"
    made = cli_json(homebox.data_dir, "tag", "print", "--sheet", "1", "--png", str(sheet))
    assert made["count"] == 1
    decoded = tags.decode_image(sheet.read_bytes())
    assert len(decoded) == 1 and decoded[0].is_fresh
    tag = decoded[0]
    listed = things_on(homebox)
    assert tag.hashname in listed and listed[tag.hashname]["claimed"] is False

    claimed = cli_json(phone.data_dir, "scan", str(sheet))
    assert claimed["action"] == "claimed"
    assert claimed["thing"]["hashname"] == tag.hashname and claimed["thing"]["claimed"] is True
    new_tag = tags.parse_tag(claimed["new_tag"])
    assert new_tag.kind == "claimed" and new_tag.hashname == tag.hashname

    for d in (laptop, homebox):
        wait_for(f"the claimed thing on {d.data_dir.name}",
                 lambda d=d: things_on(d).get(tag.hashname, {}).get("claimed") is True)
    # The claimed tag printed anywhere in the cloud is the new one (the finder capability).
    assert cli_json(laptop.data_dir, "tag", "print", tag.hashname)["kind"] == "claimed"

    # A second claim with the same fresh tag fails clearly, from our cloud and another.
    before = {d.data_dir.name: things_on(d, "--all") for d in owners(home)}
    again = cli(laptop.data_dir, "scan", str(sheet))
    fails(again, "claim secret already spent")
    assert "next:" in again.stderr
    stranger = cli(home["finder"].data_dir, "scan", str(sheet))
    fails(stranger, "claim")
    assert things_on(home["finder"]) == {}
    assert {d.data_dir.name: things_on(d, "--all") for d in owners(home)} == before


# -- a finder: card, message, and nothing else ---------------------------------------------------


async def _finder_attempts(data_dir: Path, tag: tags.Tag, other: str) -> dict[str, dict[str, Any]]:
    """A finder node (not in the owner's cloud) tries what a finder must not do."""
    with trio.fail_after(4 * WAIT):  # a hang guard for the whole visit
        return await _finder_visit(data_dir, tag, other)


async def _finder_visit(data_dir: Path, tag: tags.Tag, other: str) -> dict[str, dict[str, Any]]:
    async with p2pcloud.open_node(data_dir, port=0, tcp_port=None) as node:
        assert node.things is not None
        cap, hn = tag.secret, str(tag.hashname)

        def req(**fields: Any) -> bytes:
            return bytes(cbor2.dumps({"v": 1, **fields}))

        attempts = {
            "card": req(op="card", t=hn, cap=cap),  # allowed: the control
            "other collection": req(op="read", t=hn, cap=cap, collection="notes"),
            "collection in a card request": req(op="card", t=hn, cap=cap,
                                                collection="profile"),
            "inbox": req(op="inbox", t=hn, cap=cap),
            "list things": req(op="list", t=hn, cap=cap),
            "another thing": req(op="card", t=other, cap=cap),
            "write the card": req(op="set_card", t=hn, cap=cap, card={"text": "mine"}),
            "wrong capability": req(op="card", t=hn, cap=bytes(16)),
            "claim": req(op="claim", t=hn, secret=cap, cloud=bytes(16), members=[]),
        }
        answers = {}
        for what, data in attempts.items():
            with trio.fail_after(WAIT):
                answers[what] = await node.things.raw_request(tag, data)
        return answers


def test_finder_reads_the_card_leaves_a_message_and_nothing_else(
    home: dict[str, Daemon], tmp_path: Path,
) -> None:
    homebox, laptop, phone = owners(home)
    finder = home["finder"]
    bike = cli_json(phone.data_dir, "thing", "new", "bike", "--claim",
                    "--card", "If found, please call +41 79 000 00 00")
    other = cli_json(phone.data_dir, "thing", "new", "boots", "--claim")
    cli_json(phone.data_dir, "thing", "note", "bike", "frame number BR-1234")
    png = tmp_path / "bike.png"
    cli_json(phone.data_dir, "tag", "print", "bike", "--png", str(png))
    tag = tags.scan_image(png.read_bytes())
    assert tag.kind == "claimed" and tag.hashname == bike["hashname"]

    # An owner device tells of what arrives after it holds the thing (what the thing's logs
    # held before it arrived there is history): the laptop must hold the new bike first.
    # (The boots too: the next test compares the laptop's sub-clouds before and after.)
    for d in owners(home):
        wait_for(f"the bike and the boots on {d.data_dir.name}",
                 lambda d=d: {bike["hashname"], other["hashname"]} <= set(things_on(d)))
    known_before = {p["hashname"] for p in finder.get("/api/peers")["peers"]}
    seen = cli_json(finder.data_dir, "scan", str(png))
    assert seen["action"] == "finder" and seen["thing"] is None
    assert seen["card"] == {"text": "If found, please call +41 79 000 00 00"}

    watch = subprocess.Popen(
        [sys.executable, "-m", "p2pcloudd.cli", "--data-dir", str(laptop.data_dir), "events",
         "--type", "thing.message", "--count", "1", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        wait_for("the laptop's event stream is open",
                 lambda: laptop.get("/api/statistics")["daemon"]["event_subscribers"] >= 1)
        sent = cli_json(finder.data_dir, "scan", str(png), "--message",
                        "Found it at the station kiosk", "--contact", "ana@example.org")
        assert sent["message_sent"] is True
        out, err = watch.communicate(timeout=WAIT)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate()
    assert watch.returncode == 0, err
    event = json.loads(out.splitlines()[0])
    assert event["type"] == "thing.message" and event["data"]["thing"] == bike["hashname"]
    assert event["data"]["data"]["text"] == "Found it at the station kiosk"

    finder_hn = finder.status()["hashname"]
    for d in owners(home):
        inbox = wait_for(f"the message on {d.data_dir.name}", lambda d=d: cli_json(
            d.data_dir, "thing", "inbox", bike["hashname"])["messages"])
        assert [(m["text"], m["contact"], m["from"]) for m in inbox] == [
            ("Found it at the station kiosk", "ana@example.org", finder_hn)]

    # The finder's own node holds none of the owner's sub-clouds and no thing.
    owner_scs = {s["id"] for s in phone.get("/api/subclouds")["subclouds"]}
    finder_scs = {s["id"] for s in finder.get("/api/subclouds")["subclouds"]}
    assert bike["subcloud"] in owner_scs and not owner_scs & finder_scs
    assert things_on(finder) == {}
    # ... and knows no endpoint of the owner's but those the tag named (and the thing).
    named = {str(p.router_hashname) for p in tag.paths if p.router_hashname} | {tag.hashname}
    peers = {p["hashname"] for p in finder.get("/api/peers")["peers"]} - known_before
    assert peers <= named, (peers, named)
    assert tag.hashname in peers | known_before

    # Everything else a finder might try is refused, each with its reason.
    answers = trio.run(_finder_attempts, tmp_path / "finder2", tag, other["hashname"])
    assert answers["card"]["ok"] is True
    assert answers["card"]["card"] == {"text": "If found, please call +41 79 000 00 00"}
    expected = {
        "other collection": _s.REFUSE_NOT_ALLOWED,
        "collection in a card request": _s.REFUSE_FIELD,
        "inbox": _s.REFUSE_NOT_ALLOWED,
        "list things": _s.REFUSE_NOT_ALLOWED,
        "another thing": _s.REFUSE_OTHER_THING,
        "write the card": _s.REFUSE_NOT_ALLOWED,
        "wrong capability": _s.REFUSE_BAD_CAP,
    }
    for what, reason in expected.items():
        assert answers[what]["ok"] is False and answers[what]["err"] == reason, (what, answers)
    assert answers["claim"]["ok"] is False  # a claimed thing's capability claims nothing
    # ... and wrote nothing: the notes and inbox are as they were.
    assert cli_json(phone.data_dir, "thing", "show", "bike")["notes"].strip() == (
        "frame number BR-1234")
    assert len(cli_json(phone.data_dir, "thing", "inbox", "bike")["messages"]) == 1


# -- bad tags ----------------------------------------------------------------------------------


def _tag_text(data: bytes) -> str:
    return "P2PCLOUD:" + b32encode(data).upper()


def _with_check(body: bytes) -> bytes:
    # docs/things.md: the check is the first 4 bytes of SHA-256(b"p2pcloud tag" | body)
    return body + hashlib.sha256(b"p2pcloud tag" + body).digest()[:4]


def test_bad_tags_give_a_clear_error_and_change_nothing(
    home: dict[str, Daemon], tmp_path: Path,
) -> None:
    _, laptop, _ = owners(home)
    uri = cli_json(laptop.data_dir, "tag", "print", "--sheet", "1")["tags"][0]["uri"]
    good = tags.parse_tag(uri).to_bytes()
    body = good[:-4]
    foreign = LocalIdentity.generate(os.urandom)
    key_at = 2  # version, kind, then the 32-byte CS3a key
    altered = bytearray(good)
    altered[70] ^= 0x01  # a bit of the secret: the check no longer matches
    bad = {
        "truncated": (uri[:len(uri) // 2], "truncated"),
        "altered": (_tag_text(bytes(altered)), "altered or damaged"),
        "wrong version": (_tag_text(_with_check(bytes([2]) + body[1:])), "version 2"),
        "foreign key": (_tag_text(_with_check(
            body[:key_at] + foreign.cs3a_public + body[key_at + 32:])), "foreign key"),
        "not a tag": ("P2PCLOUD:" + "8" * 40, "altered or damaged"),
    }
    image = tmp_path / "noise.png"
    image.write_bytes(tags.render_png("hello, not a tag"))
    before_things = things_on(laptop, "--all")
    before_scs = laptop.get("/api/subclouds")["subclouds"]
    for what, (text, words) in bad.items():
        done = cli(laptop.data_dir, "scan", text)
        fails(done, "not a valid tag", words)
        answer = laptop.request("POST", "/api/scan", body={"uri": text})
        assert answer.status == 422 and answer.json()["error"]["code"] == "bad_tag", what
    fails(cli(laptop.data_dir, "scan", str(image)), "not a p2pcloud tag")
    blank = tmp_path / "blank.txt"
    blank.write_text("no image here")
    fails(cli(laptop.data_dir, "scan", str(blank)), "not an image")
    # A replayed claim secret: claim once, then the same text again.
    assert cli_json(laptop.data_dir, "scan", uri)["action"] == "claimed"
    claimed_things = things_on(laptop, "--all")
    fails(cli(laptop.data_dir, "scan", uri), "claim secret already spent")
    assert things_on(laptop, "--all") == claimed_things
    # Nothing but that one claim changed anything.
    assert set(claimed_things) == set(before_things)
    assert laptop.get("/api/subclouds")["subclouds"] == before_scs
    assert b32decode(tags.parse_tag(uri).hashname)  # the good tag itself was fine


# -- rules: exactly once -------------------------------------------------------------------------


class _Unsettled(dict[str, tuple[int, int, int]]):
    """Per device (notices, alerts, rules pending): false until every device settled."""

    def __init__(self, devices: list[Daemon], thing: str, notices: int) -> None:
        super().__init__((d.data_dir.name, (len(log_of(d, thing, "notices")),
                                            len(log_of(d, thing, "alerts")), rules_pending(d)))
                         for d in devices)
        self.want = notices

    def __bool__(self) -> bool:
        return all(n >= self.want and a >= self.want and p == 0 for n, a, p in self.values())


def _settled(devices: list[Daemon], thing: str, notices: int) -> _Unsettled:
    return _Unsettled(devices, thing, notices)


def test_a_rule_fires_exactly_once_with_three_devices_online_and_with_one(
    home: dict[str, Daemon],
) -> None:
    homebox, laptop, phone = owners(home)
    scale = cli_json(laptop.data_dir, "thing", "new", "scale", "--claim")["hashname"]
    rule = cli_json(laptop.data_dir, "thing", "rule", "add", scale,
                    'on reading_added if value > 80 do notify_owner("heavy"), '
                    "append(alerts, value)")
    for d in owners(home):
        wait_for(f"the rule on {d.data_dir.name}", lambda d=d: [
            r for r in cli_json(d.data_dir, "thing", "rule", "ls", scale)["rules"]
            if r["id"] == rule["id"]])

    # Three devices online: one reading fires, the other does not. The phone (where the
    # rule did not run) reports the notification on its event stream too.
    watch = subprocess.Popen(
        [sys.executable, "-m", "p2pcloudd.cli", "--data-dir", str(phone.data_dir), "events",
         "--type", "thing.notify", "--count", "1", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        wait_for("the phone's event stream is open",
                 lambda: phone.get("/api/statistics")["daemon"]["event_subscribers"] >= 1)
        cli_json(laptop.data_dir, "thing", "reading", scale, "value=90", "unit=kg")
        cli_json(laptop.data_dir, "thing", "reading", scale, "value=10", "unit=kg")
        out, err = watch.communicate(timeout=WAIT)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate()
    assert watch.returncode == 0, err
    notify = json.loads(out.splitlines()[0])
    assert notify["data"]["thing"] == scale and notify["data"]["data"]["text"] == "heavy"
    wait_for("the firing settled on every device",
             lambda: _settled(owners(home), scale, 1))
    for d in owners(home):
        notices = log_of(d, scale, "notices")
        assert [n["text"] for n in notices] == ["heavy"], (d.data_dir.name, notices)
        assert [a["value"] for a in log_of(d, scale, "alerts")] == [90]

    # One device online: the other two are stopped while the event happens.
    for d in (homebox, phone):
        cli_json(d.data_dir, "down")
    try:
        cli_json(laptop.data_dir, "thing", "reading", scale, "value=95")
        wait_for("the laptop fired alone", lambda: _settled([laptop], scale, 2))
    finally:
        for d in (homebox, phone):
            d.up()
    wait_for("the firing settled on every device after the restart",
             lambda: _settled(owners(home), scale, 2))
    for d in owners(home):
        notices = log_of(d, scale, "notices")
        assert [n["text"] for n in notices] == ["heavy", "heavy"], (d.data_dir.name, notices)
        assert len({n["event"] for n in notices}) == 2
        assert sorted(a["value"] for a in log_of(d, scale, "alerts")) == [90, 95]


# -- transfer ----------------------------------------------------------------------------------


def test_transfer_hands_the_history_on_and_ends_the_old_owners_access(
    home: dict[str, Daemon], tmp_path: Path,
) -> None:
    homebox, laptop, phone = owners(home)
    buyer = home["finder"]  # a person with a cloud of their own
    lamp = cli_json(homebox.data_dir, "thing", "new", "lamp", "--claim", "--make", "Artek")
    cli_json(homebox.data_dir, "thing", "note", "lamp", "bought 2024, new bulb 2026")
    cli_json(homebox.data_dir, "thing", "reading", "lamp", "value=7", "unit=W")
    png = tmp_path / "lamp.png"
    cli_json(homebox.data_dir, "tag", "print", "lamp", "--png", str(png))
    for d in (laptop, phone):
        wait_for(f"the lamp's reading on {d.data_dir.name}",
                 lambda d=d: log_of(d, lamp["hashname"], "readings"))

    target = cli_json(buyer.data_dir, "thing", "receive")["target"]
    bad = cli(homebox.data_dir, "thing", "transfer", "lamp", target[:40])
    fails(bad, "transfer")
    done = cli_json(homebox.data_dir, "thing", "transfer", "lamp", target)
    assert done["transferred"] is True
    # The target works once.
    fails(cli(laptop.data_dir, "thing", "transfer", "lamp", target), "")

    got = wait_for("the lamp at the buyer", lambda: things_on(buyer).get(lamp["hashname"]))
    assert got["name"] == "lamp" and got["make"] == "Artek" and got["claimed"] is True
    shown = cli_json(buyer.data_dir, "thing", "show", lamp["hashname"])
    assert "bought 2024" in shown["notes"]
    assert [r["value"] for r in log_of(buyer, lamp["hashname"], "readings")] == [7]
    assert got["subcloud"] != lamp["subcloud"]
    for d in owners(home):
        wait_for(f"the lamp gone from {d.data_dir.name}",
                 lambda d=d: lamp["hashname"] not in things_on(d))

    # The tag keeps working for the new owner: scanning it opens the thing there.
    opened = cli_json(buyer.data_dir, "scan", str(png))
    assert opened["action"] == "opened" and opened["thing"]["hashname"] == lamp["hashname"]
    # The new owner's writes reach none of the old owner's devices: they do not hold the
    # new sub-cloud, and the old one is ended (writes to it are refused).
    cli_json(buyer.data_dir, "thing", "note", lamp["hashname"], "now in the hallway")
    for d in owners(home):
        assert d.request("GET", f"/api/subclouds/{got['subcloud']}/collections").status == 404
    refused = cli(laptop.data_dir, "thing", "note", lamp["hashname"], "still mine?")
    fails(refused, "no thing")
    # An old owner scanning the tag is told the thing moved.
    fails(cli(laptop.data_dir, "scan", str(png)), "moved")


# -- a smart thing: pairs, writes readings while the owner's devices come and go --------------

SMART_READINGS = 10_000
SMART_WAIT = 4 * WAIT  # s: 10,000 durable writes and their sync on a shared 2-core machine


class Lines:
    """The JSON lines a child process prints, collected by a reader thread (no blocking read
    in the test, so every wait has a bound)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.items: list[dict[str, Any]] = []
        self.proc = proc
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.items.append(json.loads(line))

    def join(self) -> None:
        """Wait for the reader to see the end of the output (after the process exited)."""
        self._thread.join(timeout=WAIT)

    def event(self, name: str) -> dict[str, Any] | None:
        """The first line with ``"event": name`` so far."""
        return next((i for i in self.items if i.get("event") == name), None)


def test_a_smart_thing_pairs_and_every_reading_arrives_exactly_once(
    home: dict[str, Daemon], tmp_path: Path,
) -> None:
    homebox, laptop, phone = owners(home)
    invite = cli_json(homebox.data_dir, "thing", "invite")["uri"]
    readings = tmp_path / "readings.jsonl"
    readings.write_text("".join(json.dumps({"value": i, "unit": "kg"}) + "\n"
                                for i in range(SMART_READINGS)))
    stderr = tmp_path / "scale.stderr"
    with stderr.open("w") as err_file:  # a file, not a pipe: the thing never blocks on it
        proc = subprocess.Popen(
            [sys.executable, "-m", "p2pcloudd.cli", "--data-dir", str(tmp_path / "scale"),
             "thing", "run", "--pair", invite, "--name", "scale", "--make", "Acme",
             "--readings", str(readings), "--json"],
            stdout=subprocess.PIPE, stderr=err_file, text=True, env=env())
    lines = Lines(proc)
    try:
        ready = wait_for("the smart thing paired", lambda: lines.event("ready")
                         or proc.poll() is not None)
        assert isinstance(ready, dict), stderr.read_text()
        scale = ready["hashname"]

        def count(d: Daemon) -> int:
            return len(log_of(d, scale, "readings"))

        # The owner's devices come and go while it writes.
        cli_json(phone.data_dir, "down")
        try:
            wait_for("readings reach the laptop", lambda: count(laptop) >= 1000, SMART_WAIT)
            cli_json(laptop.data_dir, "down")
            try:
                wait_for("readings reach the home box", lambda: count(homebox) >= 3000,
                         SMART_WAIT)
            finally:
                phone.up()
            wait_for("readings reach the phone", lambda: count(phone) >= 1, SMART_WAIT)
        finally:
            if not (laptop.data_dir / "api.json").exists():
                laptop.up()
        written = wait_for("the thing wrote every reading", lambda: lines.event("written"),
                           SMART_WAIT)
        assert written["count"] == SMART_READINGS
        for d in owners(home):
            wait_for(f"every reading on {d.data_dir.name}",
                     lambda d=d: count(d) >= SMART_READINGS, SMART_WAIT)
            values = [r["value"] for r in log_of(d, scale, "readings")]
            assert len(values) == SMART_READINGS, d.data_dir.name
            assert sorted(values) == list(range(SMART_READINGS)), d.data_dir.name
        thing = things_on(laptop)[scale]
        assert thing["smart"] is True and thing["name"] == "scale" and thing["make"] == "Acme"
        roles = {m["hashname"]: m["role"] for m in
                 cli_json(homebox.data_dir, "cloud", "members")["members"]}
        assert roles[scale] == "thing"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        lines.join()  # the reader owns stdout until its end
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == 0 and lines.event("stopped") is not None, stderr.read_text()
