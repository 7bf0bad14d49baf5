"""``p2pcloud thing ...``, ``p2pcloud tag print``, ``p2pcloud scan``: things from the command line.

Every command talks to the running daemon through its HTTP API (:mod:`p2pcloudd.routes_things`)
except ``thing run``, which *is* a small node of its own: the process a smart thing (a scale, a
sensor box) runs to pair with its owner's cloud and append readings.

Commands:

* ``thing new NAME [--make --model --serial --card]``, ``thing ls [--all]``,
  ``thing show THING``, ``thing note THING TEXT``, ``thing rename THING NAME``,
  ``thing archive THING [--undo]``, ``thing card THING TEXT``,
  ``thing reading THING FIELD=VALUE...``, ``thing inbox THING``,
  ``thing rule add THING TEXT`` / ``thing rule rm THING RULE_ID``,
  ``thing transfer THING TO [--history all|PARTS]``, ``thing run ...``;
* ``tag print THING [--png FILE | --svg FILE]`` (the terminal by default) and
  ``tag print --sheet N [--png FILE | --svg FILE]`` (N fresh tags on one page);
* ``scan FILE|URI [--message TEXT [--contact C]]``.

Exit statuses are cli.py's (0 done, 1 failed, 2 usage, 3 not running, 4 token, 5 timeout).
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
from pathlib import Path
from typing import Any

from p2pcloudd.cli import (
    EXIT_AUTH,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    Client,
    CliError,
    _data_dir,
    _emit_json,
    _field_value,
    _not_running,
    _q,
)

SCAN_REQUEST_TIMEOUT = 60.0  # s: the daemon gives a scan 40 s (it may link the owner's cloud)
MAX_SCAN_FILE = 16 * 1024 * 1024  # bytes; the daemon refuses larger images (routes_things)


# -- raw requests (images in or out) ------------------------------------------------------


def _raw(client: Client, method: str, path: str, *, body: bytes | None = None,
         content_type: str = "application/json", timeout: float = SCAN_REQUEST_TIMEOUT,
         ) -> tuple[int, str, bytes]:
    """One request whose body or answer is not JSON; returns ``(status, type, bytes)``.

    Raises:
        CliError: as :meth:`Client.request` does.
    """
    conn = http.client.HTTPConnection(client.host, client.port, timeout=timeout)
    headers = {"Authorization": f"Bearer {client.token}"}
    if body is not None:
        headers["Content-Type"] = content_type
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    except (ConnectionRefusedError, ConnectionResetError) as exc:
        raise _not_running(client.data_dir, f" (nothing answers at {client.info['url']})"
                           ) from exc
    except TimeoutError as exc:
        raise CliError(f"the daemon did not answer {method} {path} in {timeout:.0f} s",
                       "check its log, or retry", EXIT_TIMEOUT) from exc
    except OSError as exc:
        raise _not_running(client.data_dir, f" ({exc})") from exc
    finally:
        conn.close()
    ctype = response.getheader("content-type", "")
    if response.status == 401:
        raise CliError("the daemon refused the API token",
                       "restart it: `p2pcloud down; p2pcloud up`", EXIT_AUTH)
    if response.status >= 400:
        err: dict[str, Any] = {}
        if ctype.startswith("application/json"):
            try:
                err = json.loads(raw).get("error", {})
            except (ValueError, AttributeError):
                err = {}
        raise CliError(err.get("message") or f"HTTP {response.status}", err.get("hint", ""),
                       EXIT_FAILED)
    return response.status, ctype, raw


def _write_file(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror}", "choose another file") from exc


def _thing_path(thing: str, tail: str = "") -> str:
    return f"/api/things/{_q(thing)}{tail}"


def _print_thing(thing: dict[str, Any]) -> None:
    print(f"{thing['name']}  ({thing['hashname']})")
    for key in ("make", "model", "serial"):
        if thing.get(key):
            print(f"  {key}: {thing[key]}")
    flags = [k for k in ("archived", "claimed", "ended") if thing.get(k)]
    if flags:
        print(f"  {', '.join(flags)}")
    shown = {"name", "hashname", "make", "model", "serial", "archived", "claimed", "ended"}
    for key, value in sorted(thing.items()):
        if key in shown or value in (None, "", [], {}):
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        if len(text) > 300:
            text = text[:300] + "…"
        print(f"  {key}: {text}")


# -- thing --------------------------------------------------------------------------------


def cmd_thing_new(args: argparse.Namespace) -> int:
    """Create a thing: its own keys, sub-cloud and tag (print it with `p2pcloud tag print`)."""
    body = {"name": args.name}
    for key in ("make", "model", "serial", "card"):
        value = getattr(args, key)
        if value:
            body[key] = value
    if args.claim:
        body["claim"] = True
    _, thing = Client(_data_dir(args)).request("POST", "/api/things", body,
                                               timeout=SCAN_REQUEST_TIMEOUT)
    if args.json:
        _emit_json(thing)
    else:
        state = "claimed" if thing.get("claimed") else "unclaimed: scan its tag to claim it"
        print(f"created {thing['name']!r} ({state}): {thing['hashname']}")
        print(f"print its tag: p2pcloud tag print {thing['hashname'][:12]} --png tag.png")
    return EXIT_OK


def cmd_thing_ls(args: argparse.Namespace) -> int:
    """List the things of your cloud (archived ones too with --all)."""
    path = "/api/things" + ("?archived=true" if args.all else "")
    things = Client(_data_dir(args)).get(path)["things"]
    if args.json:
        _emit_json({"things": things})
        return EXIT_OK
    if not things:
        print("no things yet: `p2pcloud thing new NAME`, or scan a fresh tag with "
              "`p2pcloud scan FILE`")
    for t in things:
        extra = " ".join(x for x in (t.get("make", ""), t.get("model", "")) if x)
        flag = " (archived)" if t.get("archived") else ""
        if not t.get("claimed"):
            flag += " (unclaimed: scan its tag)"
        print(f"{t['hashname']}  {t['name'] or '(unnamed)'}{flag}"
              + (f"  {extra}" if extra else ""))
    return EXIT_OK


def cmd_thing_show(args: argparse.Namespace) -> int:
    """Show a thing: profile, card, notes, readings, rules, inbox, as the node has them."""
    thing = Client(_data_dir(args)).get(_thing_path(args.thing))
    if args.json:
        _emit_json(thing)
    else:
        _print_thing(thing)
    return EXIT_OK


def _post_thing(args: argparse.Namespace, tail: str, body: dict[str, Any],
                done: str, method: str = "POST") -> int:
    _, thing = Client(_data_dir(args)).request(method, _thing_path(args.thing, tail), body)
    if args.json:
        _emit_json(thing)
    else:
        print(done)
    return EXIT_OK


def cmd_thing_note(args: argparse.Namespace) -> int:
    """Add text to a thing's notes."""
    return _post_thing(args, "/notes", {"text": args.text}, f"noted on {args.thing}")


def cmd_thing_rename(args: argparse.Namespace) -> int:
    """Rename a thing."""
    return _post_thing(args, "/rename", {"name": args.name}, f"renamed to {args.name!r}")


def cmd_thing_archive(args: argparse.Namespace) -> int:
    """Archive a thing (hidden from `thing ls`; its tag keeps working); --undo brings it back."""
    verb = "unarchived" if args.undo else "archived"
    return _post_thing(args, "/archive", {"archived": not args.undo}, f"{verb} {args.thing}")


def cmd_thing_card(args: argparse.Namespace) -> int:
    """Set the card a finder sees when scanning the tag ("" shows nothing)."""
    return _post_thing(args, "/card", {"text": args.text}, f"card of {args.thing} set",
                       method="PUT")


def cmd_thing_reading(args: argparse.Namespace) -> int:
    """Append a reading: FIELD=VALUE... (values are JSON when they parse: weight=71.5)."""
    fields: dict[str, Any] = {}
    for item in args.fields:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise CliError(f"{item!r} is not FIELD=VALUE",
                           "write readings as name=value, e.g. value=71.5 unit=kg", EXIT_USAGE)
        fields[name] = _field_value(value)
    return _post_thing(args, "/readings", {"fields": fields},
                       f"reading added to {args.thing}: {fields}")


def cmd_thing_inbox(args: argparse.Namespace) -> int:
    """Show the messages finders left for a thing."""
    inbox = Client(_data_dir(args)).get(_thing_path(args.thing, "/inbox"))
    if args.json:
        _emit_json(inbox)
        return EXIT_OK
    if not inbox["messages"]:
        print("no messages")
    for m in inbox["messages"]:
        contact = f"  (contact: {m['contact']})" if m.get("contact") else ""
        print(f"- {m.get('text', '')}{contact}  from {str(m.get('from', ''))[:12]}")
    return EXIT_OK


def cmd_thing_rule_add(args: argparse.Namespace) -> int:
    """Add a rule, e.g. 'on message_received do notify_owner("someone found it")'."""
    _, rule = Client(_data_dir(args)).request("POST", _thing_path(args.thing, "/rules"),
                                              {"text": args.text})
    if args.json:
        _emit_json(rule)
    else:
        print(f"rule {rule['id']} added to {args.thing}")
    return EXIT_OK


def cmd_thing_rule_rm(args: argparse.Namespace) -> int:
    """Remove a rule by its id."""
    Client(_data_dir(args)).request("DELETE",
                                    _thing_path(args.thing, f"/rules/{_q(args.rule)}"))
    if args.json:
        _emit_json({"removed": True, "rule": args.rule})
    else:
        print(f"rule {args.rule} removed")
    return EXIT_OK


def cmd_thing_log(args: argparse.Namespace) -> int:
    """Show the records of one of a thing's logs (readings, events, inbox, notices...)."""
    page = Client(_data_dir(args)).get(
        _thing_path(args.thing, f"/logs/{_q(args.log)}?offset={args.offset}&limit={args.limit}"))
    if args.json:
        _emit_json(page)
        return EXIT_OK
    for record in page["records"]:
        print(json.dumps(record, sort_keys=True))
    shown = len(page["records"])
    print(f"({shown} of {page['total']} from {page['offset']})", file=sys.stderr)
    return EXIT_OK


def cmd_thing_rule_ls(args: argparse.Namespace) -> int:
    """List a thing's rules."""
    rules = Client(_data_dir(args)).get(_thing_path(args.thing, "/rules"))
    if args.json:
        _emit_json(rules)
        return EXIT_OK
    if not rules["rules"]:
        print("no rules")
    for r in rules["rules"]:
        problem = f"  (does not parse: {r['error']})" if r.get("error") else ""
        print(f"{r['id']}  {r['text']}{problem}")
    return EXIT_OK


def cmd_thing_receive(args: argparse.Namespace) -> int:
    """Make a transfer target: give it to someone handing a thing to your cloud."""
    _, made = Client(_data_dir(args)).request("POST", "/api/transfer-targets")
    if args.json:
        _emit_json(made)
    else:
        print(made["target"])
        print(f"(works once, for {made['expires_in'] / 60:.0f} min; the current owner runs "
              "`p2pcloud thing transfer THING '<the target>'`)", file=sys.stderr)
    return EXIT_OK


def cmd_thing_invite(args: argparse.Namespace) -> int:
    """Invite a smart thing into your cloud (it runs `p2pcloud thing run --pair INVITE`)."""
    _, made = Client(_data_dir(args)).request("POST", "/api/thing-invites",
                                              {"expires_in": args.expires})
    if args.json:
        _emit_json(made)
    else:
        print(made["uri"])
        print("(works once; on the thing: `p2pcloud thing run --pair '<the invite>' --name "
              "NAME`; it can write only its own sub-cloud)", file=sys.stderr)
    return EXIT_OK


def cmd_thing_transfer(args: argparse.Namespace) -> int:
    """Hand a thing on to another person's cloud (its history, or --history PARTS)."""
    _, result = Client(_data_dir(args)).request(
        "POST", _thing_path(args.thing, "/transfer"),
        {"to": args.to, "history": args.history}, timeout=SCAN_REQUEST_TIMEOUT)
    if args.json:
        _emit_json(result)
    else:
        print(f"{args.thing} handed on; this cloud's access to it has ended")
    return EXIT_OK


# -- tag ----------------------------------------------------------------------------------


def cmd_tag_print(args: argparse.Namespace) -> int:
    """Print a thing's tag (the terminal, or --png/--svg FILE), or a sheet of N fresh tags."""
    if args.png and args.svg:
        raise CliError("choose one of --png and --svg", "", EXIT_USAGE)
    if (args.thing is None) == (args.sheet is None):
        raise CliError("name a THING, or ask for --sheet N fresh tags",
                       "e.g. `p2pcloud tag print bike --png bike.png` or "
                       "`p2pcloud tag print --sheet 12 --svg sheet.svg`", EXIT_USAGE)
    client = Client(_data_dir(args))
    if args.sheet is not None:
        return _print_sheet(args, client)
    out = args.png or args.svg
    if out is not None:
        suffix = ".png" if args.png else ".svg"
        _, _, data = _raw(client, "GET", _thing_path(args.thing, "/tag" + suffix))
        _write_file(out, data)
        tag = client.get(_thing_path(args.thing, "/tag"))
        if args.json:
            _emit_json({"thing": tag["thing"], "uri": tag["uri"], "kind": tag["kind"],
                        "file": str(out)})
        else:
            print(f"wrote {out} ({tag['kind']} tag of {tag['thing'][:12]}…)")
        return EXIT_OK
    tag = client.get(_thing_path(args.thing, "/tag"))
    if args.json:
        _emit_json(tag)
    else:
        print(tag["text"], end="")
        print(tag["uri"])
    return EXIT_OK


def _print_sheet(args: argparse.Namespace, client: Client) -> int:
    body = {"count": args.sheet, "columns": args.columns}
    if args.png or args.svg:
        suffix = "png" if args.png else "svg"
        out = args.png or args.svg
        _, _, data = _raw(client, "POST", f"/api/tags/sheet.{suffix}",
                          body=json.dumps(body).encode())
        _write_file(out, data)
        if args.json:
            _emit_json({"file": str(out), "count": args.sheet})
        else:
            print(f"wrote {out}: {args.sheet} fresh tag(s); scanning one claims its thing")
        return EXIT_OK
    _, made = client.request("POST", "/api/tags", body)
    if args.json:
        _emit_json(made)
        return EXIT_OK
    from p2pcloud.things import tags

    for item in made["tags"]:
        print(tags.render_text(item["uri"]), end="")
        print(f"fresh {item['thing'][:12]}…  {item['uri']}\n")
    return EXIT_OK


# -- scan ---------------------------------------------------------------------------------


def _looks_like_tag(text: str) -> bool:
    return text.strip().lower().startswith("p2pcloud:")


def cmd_scan(args: argparse.Namespace) -> int:
    """Scan a tag from a photo/screenshot FILE or its URI text: claim, open, or a finder's card.

    With --message, a finder also leaves that message for the owner (with --contact).
    """
    client = Client(_data_dir(args))
    source = args.source
    if _looks_like_tag(source):
        _, result = client.request("POST", "/api/scan", {"uri": source.strip()},
                                   timeout=SCAN_REQUEST_TIMEOUT)
    else:
        path = Path(source).expanduser()
        if source == "-":
            data = sys.stdin.buffer.read(MAX_SCAN_FILE + 1)
        else:
            try:
                with path.open("rb") as fh:
                    data = fh.read(MAX_SCAN_FILE + 1)
            except OSError as exc:
                raise CliError(f"cannot read {source}: {exc.strerror}",
                               "give an image file of the tag, or the tag's text "
                               "(P2PCLOUD:...)", EXIT_USAGE) from exc
        if len(data) > MAX_SCAN_FILE:
            raise CliError(f"{source} is larger than {MAX_SCAN_FILE} bytes",
                           "crop or shrink the photo", EXIT_USAGE)
        _, _, raw = _raw(client, "POST", "/api/scan/image", body=data,
                         content_type="application/octet-stream")
        result = json.loads(raw)
    sent = None
    if args.message is not None:
        if result.get("action") != "finder":
            raise CliError("--message is for a thing someone else owns; this scan "
                           f"{result.get('action')} it",
                           "add notes to your own things with `p2pcloud thing note`")
        _, sent = client.request("POST", "/api/messages", {
            "tag": result["tag"], "text": args.message, "contact": args.contact or ""},
            timeout=SCAN_REQUEST_TIMEOUT)
    if args.json:
        _emit_json({**result, "message_sent": sent is not None})
        return EXIT_OK
    _print_scan(result, sent is not None)
    return EXIT_OK


def _print_scan(result: dict[str, Any], sent: bool) -> None:
    action = result.get("action")
    thing = result.get("thing") or {}
    if action == "claimed":
        print(f"claimed {thing.get('name') or thing.get('hashname', '')!r} into your cloud")
        print("name it: p2pcloud thing rename THING NAME; print the claimed tag finders use: "
              "p2pcloud tag print THING")
    elif action == "opened":
        print(f"your thing {thing.get('name', '')!r} ({thing.get('hashname', '')})")
        _print_thing(thing)
    else:
        card = result.get("card")
        print("this thing belongs to someone else. Its card:")
        if isinstance(card, dict) and card:
            for label, text in card.items():
                print(f"  {label}: {text}")
        elif isinstance(card, str) and card:
            print("  " + card.replace("\n", "\n  "))
        else:
            print("  (the owner shows nothing)")
        if sent:
            print("your message was delivered to the owner")
        else:
            print("leave a message: p2pcloud scan TAG --message 'found it at ...' "
                  "--contact 'phone or mail'")


# -- registration -------------------------------------------------------------------------


def register(sub: Any, common: argparse.ArgumentParser, shows: argparse.ArgumentParser) -> None:
    """Add ``thing``, ``tag`` and ``scan`` to the ``p2pcloud`` parser.

    Args:
        sub: the top-level subparsers. common: the ``--data-dir`` parent. shows: the
            ``--json`` parent.
    """

    def leaf(group: Any, name: str, func: Any, help: str) -> Any:
        p = group.add_parser(name, parents=[common, shows], help=help, description=func.__doc__)
        p.set_defaults(func=func)
        return p

    thing = sub.add_parser("thing", parents=[common], help="things you own and their clouds",
                           description="Things you own, each with a sub-cloud and a QR tag "
                           "(docs/howto-things.md).")
    ts = thing.add_subparsers(dest="thing_command", required=True, metavar="SUBCOMMAND")
    new = leaf(ts, "new", cmd_thing_new, "create a thing")
    new.add_argument("name", help="its name (1..200 characters)")
    for key in ("make", "model", "serial"):
        new.add_argument(f"--{key}", default="", help=f"its {key}")
    new.add_argument("--card", default="", help="what a finder who scans it sees")
    new.add_argument("--claim", action="store_true",
                     help="claim it at once (else scanning its fresh tag claims it)")
    ls = leaf(ts, "ls", cmd_thing_ls, "list things")
    ls.add_argument("--all", action="store_true", help="archived ones too")
    show = leaf(ts, "show", cmd_thing_show, "show a thing")
    note = leaf(ts, "note", cmd_thing_note, "add to a thing's notes")
    rename = leaf(ts, "rename", cmd_thing_rename, "rename a thing")
    archive = leaf(ts, "archive", cmd_thing_archive, "archive a thing")
    card = leaf(ts, "card", cmd_thing_card, "set what a finder sees")
    reading = leaf(ts, "reading", cmd_thing_reading, "append a reading")
    inbox = leaf(ts, "inbox", cmd_thing_inbox, "messages finders left")
    logp = leaf(ts, "log", cmd_thing_log, "records of a thing's log (readings, events...)")
    logp.add_argument("thing", help="the thing (hashname or name)")
    logp.add_argument("log", help="readings, events, inbox, notices, or a rule's log")
    logp.add_argument("--offset", type=int, default=0, help="skip this many records")
    logp.add_argument("--limit", type=int, default=1000, help="show at most this many")
    leaf(ts, "receive", cmd_thing_receive, "make a transfer target (someone hands you a thing)")
    inv = leaf(ts, "invite", cmd_thing_invite, "invite a smart thing into your cloud")
    inv.add_argument("--expires", type=float, default=3600.0, metavar="SECONDS",
                     help="how long it stays valid (default 3600)")
    transfer = leaf(ts, "transfer", cmd_thing_transfer, "hand a thing on to another cloud")
    for p in (show, note, rename, archive, card, reading, inbox, transfer):
        p.add_argument("thing", help="the thing (hashname or name)")
    note.add_argument("text")
    rename.add_argument("name")
    archive.add_argument("--undo", action="store_true", help="unarchive it")
    card.add_argument("text", help='e.g. "If found, please call +41 ..." ("" for nothing)')
    reading.add_argument("fields", nargs="+", metavar="FIELD=VALUE",
                         help="e.g. value=71.5 unit=kg")
    transfer.add_argument("to", help="the new owner's transfer target (`p2pcloud thing "
                          "receive` on one of their devices)")
    transfer.add_argument("--history", default="all",
                          help="all (default), or a comma list of the parts to hand on")
    rule = ts.add_parser("rule", parents=[common], help="add or remove a thing's rules",
                         description="Rules are data: on EVENT [if CONDITION] do ACTION.")
    rs = rule.add_subparsers(dest="rule_command", required=True, metavar="SUBCOMMAND")
    radd = leaf(rs, "add", cmd_thing_rule_add, "add a rule")
    radd.add_argument("thing", help="the thing (hashname or name)")
    radd.add_argument("text", help="e.g. 'on reading_added if value > 80 do notify_owner'")
    rls = leaf(rs, "ls", cmd_thing_rule_ls, "list a thing's rules")
    rls.add_argument("thing", help="the thing (hashname or name)")
    rrm = leaf(rs, "rm", cmd_thing_rule_rm, "remove a rule")
    rrm.add_argument("thing", help="the thing (hashname or name)")
    rrm.add_argument("rule", help="the rule id (`p2pcloud thing show THING`)")
    _register_run(ts, common, shows)

    tag = sub.add_parser("tag", parents=[common], help="print tags",
                         description="Print a thing's QR tag, or a sheet of fresh tags.")
    tgs = tag.add_subparsers(dest="tag_command", required=True, metavar="SUBCOMMAND")
    prt = leaf(tgs, "print", cmd_tag_print, "print a tag (terminal, PNG, SVG) or a sheet")
    prt.add_argument("thing", nargs="?", default=None, help="the thing (hashname or name)")
    prt.add_argument("--png", type=Path, default=None, metavar="FILE", help="write a PNG")
    prt.add_argument("--svg", type=Path, default=None, metavar="FILE", help="write an SVG")
    prt.add_argument("--sheet", type=int, default=None, metavar="N",
                     help="N fresh tags (new unclaimed things) on one page")
    prt.add_argument("--columns", type=int, default=4, help="codes per row on a sheet")

    scan = sub.add_parser("scan", parents=[common, shows], help="scan a tag (image or URI)",
                          description=cmd_scan.__doc__)
    scan.set_defaults(func=cmd_scan)
    scan.add_argument("source", metavar="FILE|URI",
                      help="a photo or screenshot of the tag (- for stdin), or its text")
    scan.add_argument("--message", default=None, help="leave this message for the owner")
    scan.add_argument("--contact", default=None, help="how the owner can reach you")


def _register_run(ts: Any, common: argparse.ArgumentParser,
                  shows: argparse.ArgumentParser) -> None:
    """``thing run``: see :func:`cmd_thing_run`."""
    run = ts.add_parser("run", parents=[common, shows], help="run a smart thing's node",
                        description=cmd_thing_run.__doc__)
    run.set_defaults(func=cmd_thing_run)
    run.add_argument("--pair", default=None, metavar="INVITE",
                     help="join the owner's cloud with this invite (`p2pcloud thing invite` "
                     "on an owner device), on first start")
    run.add_argument("--name", default="", help="the thing's name, on first start")
    run.add_argument("--make", default="", help="its make, on first start")
    run.add_argument("--model", default="", help="its model, on first start")
    run.add_argument("--port", type=int, default=0, help="UDP port (0: any)")
    run.add_argument("--bind", default="127.0.0.1", help="mesh address")
    run.add_argument("--readings", default=None, metavar="FILE",
                     help="append one reading per JSON line of FILE (- for stdin), e.g. "
                     '{"value": 71.5, "unit": "kg"}; lines an earlier run wrote are '
                     "skipped; then keep running")
    run.add_argument("--exit-after-readings", action="store_true",
                     help="exit once the readings are written (they sync when it runs again)")


def cmd_thing_run(args: argparse.Namespace) -> int:
    """Run a smart thing: a small node of its own in DATA_DIR (not a daemon) that pairs with
    its owner's cloud (first start: --pair INVITE), owns and writes its own sub-cloud, and
    appends readings that sync to the owner's devices. Runs until Ctrl-C / SIGTERM. With
    --json it prints one JSON object a line: ready, written, stopped."""
    import trio

    try:
        return int(trio.run(_run_thing, args, _data_dir(args)))
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], CliError):
            raise group.exceptions[0] from None
        raise


def _say(args: argparse.Namespace, event: str, text: str, **fields: Any) -> None:
    if args.json:
        print(json.dumps({"event": event, **fields}), flush=True)
    else:
        print(text, flush=True)


async def _run_thing(args: argparse.Namespace, data_dir: Path) -> int:
    import signal

    import trio

    from p2pcloud._node.smartthing import run_thing
    from p2pcloud._node.transport import TransportError
    from p2pcloud.errors import BadURI, JoinFailed, KeyFileError, LinkError, ThingError

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            async with run_thing(data_dir, invite=args.pair, name=args.name, make=args.make,
                                 model=args.model, port=args.port, bind=args.bind) as thing:
                return await _thing_main(args, thing, signals)
        except (KeyFileError, TransportError) as exc:
            raise CliError(str(exc), "check --data-dir and --port") from exc
        except BadURI as exc:
            raise CliError(f"--pair: not an invite: {exc}", "copy the whole text "
                           "`p2pcloud thing invite` printed", EXIT_USAGE) from exc
        except (JoinFailed, LinkError, trio.TooSlowError) as exc:
            raise CliError(f"pairing failed: {exc or 'no answer'}", "ask the owner for a new "
                           "invite: `p2pcloud thing invite` on one of their devices; the "
                           "device that made it must be running") from exc
        except ThingError as exc:
            raise CliError(str(exc), "pair it: `p2pcloud thing run --pair INVITE` with an "
                           "invite from `p2pcloud thing invite`", EXIT_USAGE) from exc


async def _thing_main(args: argparse.Namespace, thing: Any, signals: Any) -> int:
    import trio

    view = thing.view
    _say(args, "ready", f"smart thing {view.name!r} ({thing.hashname}) runs in cloud "
         f"{view.owner_cloud}", hashname=str(thing.hashname), subcloud=view.subcloud,
         cloud=view.owner_cloud)
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        async def stop_on_signal() -> None:
            async for _ in signals:
                done.set()
                return

        nursery.start_soon(stop_on_signal)
        if args.readings is not None:
            written = await _append_readings(args, thing)
            _say(args, "written", f"{written} reading(s) written", count=written,
                 total=len(thing.readings()))
            if args.exit_after_readings:
                done.set()
        await done.wait()
        nursery.cancel_scope.cancel()
    _say(args, "stopped", "stopped")
    return EXIT_OK


def _reading_fields(line_no: int, line: str) -> dict[str, Any]:
    try:
        fields = json.loads(line)
    except ValueError as exc:
        raise CliError(f"line {line_no} of the readings is not JSON: {exc}", "",
                       EXIT_USAGE) from exc
    value = fields.get("value") if isinstance(fields, dict) else None
    if not isinstance(fields, dict) or not isinstance(value, int | float) or isinstance(
            value, bool):
        raise CliError(f"line {line_no} of the readings is not an object with a numeric "
                       "value", 'write lines like {"value": 71.5, "unit": "kg"}', EXIT_USAGE)
    return dict(fields)


async def _append_readings(args: argparse.Namespace, thing: Any) -> int:
    """Append the readings of --readings not yet in the thing's log; return how many."""
    import trio

    from p2pcloud.errors import ThingError

    already = len(thing.readings())
    if args.readings == "-":
        stream = sys.stdin
    else:
        try:
            stream = await trio.to_thread.run_sync(
                lambda: open(args.readings, encoding="utf-8"))  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise CliError(f"cannot read {args.readings}: {exc.strerror}", "", EXIT_USAGE
                           ) from exc
    written = 0
    try:
        line_no = 0
        while True:
            line = await trio.to_thread.run_sync(stream.readline)
            if not line:
                break
            if not line.strip():
                continue
            line_no += 1
            if line_no <= already:
                continue  # written by an earlier run
            fields = _reading_fields(line_no, line)
            try:
                await thing.add_reading(fields["value"], unit=str(fields.get("unit", "")),
                                        kind=str(fields.get("kind", "")))
            except ThingError as exc:
                raise CliError(f"line {line_no}: {exc}", "", EXIT_USAGE) from exc
            written += 1
    finally:
        if stream is not sys.stdin:
            stream.close()
    return written
