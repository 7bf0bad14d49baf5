"""``p2pcloud cloud ...``: a person's cloud from the command line.

Every command talks to the running daemon through its HTTP API (:mod:`p2pcloudd.routes_cloud`):

* ``cloud new``: found a cloud on this device (it becomes the first admin);
* ``cloud status``: the cloud id, our role, how many members are online;
* ``cloud invite [--qr] [--png FILE] [--svg FILE] [--role device|admin] [--expires S]``: a
  one-time invite as a ``p2pcloud:invite/1/...`` URI, drawn as a QR code in the terminal with
  ``--qr``, written as an image with ``--png``/``--svg``;
* ``cloud join URI|FILE.png``: join with an invite, pasted or as a photo/screenshot of its QR
  code (decoded here with zxing-cpp, a real QR reader);
* ``cloud code``: open a short pairing code (``42-maple-otter-drum``) for a device with no
  camera; ``cloud pair CODE`` on the new device, on the same LAN;
* ``cloud members``, ``cloud online``: members with role, online state and path in use;
* ``cloud revoke HASHNAME``: remove a lost device;
* ``cloud policy MEMBER SC full|on-demand|hidden``: what a member keeps of a sub-cloud;
  ``cloud policies`` lists the entries.

Every command takes ``--json``. Exit statuses are cli.py's (0 done, 1 failed, 2 usage,
3 not running, 4 token, 5 timeout).
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path
from typing import Any

from p2pcloudd.cli import (
    EXIT_OK,
    EXIT_USAGE,
    Client,
    CliError,
    _data_dir,
    _emit_json,
    _path_text,
    _q,
)

JOIN_TIMEOUT = 30.0  # s the daemon waits for the other device by default
REQUEST_SLACK = 15.0  # s more the CLI waits for the daemon's answer than the daemon waits
MAX_IMAGE_BYTES = 32 * 1024 * 1024  # a photo of a QR code; larger files are not photos
INVITE_PREFIX = "p2pcloud:"


def _client(args: argparse.Namespace) -> Client:
    return Client(_data_dir(args))


def _short(hashname: str) -> str:
    return hashname[:12] + "…"


# -- commands -----------------------------------------------------------------------------


def cmd_new(args: argparse.Namespace) -> int:
    """Found a cloud: this device becomes its first admin and holds its own sub-cloud."""
    _, cloud = _client(args).request("POST", "/api/cloud")
    if args.json:
        _emit_json(cloud)
        return EXIT_OK
    print(f"founded cloud {cloud['cloud_id']}")
    print("add a device: `p2pcloud cloud invite --qr` (scan or paste it there), or "
          "`p2pcloud cloud code` (type it there)")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """Show this device's cloud: id, role, members, how many are online."""
    cloud = _client(args).get("/api/cloud")
    if args.json:
        _emit_json(cloud)
        return EXIT_OK
    if cloud["cloud_id"] is None:
        print("in no cloud yet: `p2pcloud cloud new` founds one, `p2pcloud cloud join` or "
              "`p2pcloud cloud pair` joins one")
        return EXIT_OK
    print(f"cloud:   {cloud['cloud_id']}")
    print(f"role:    {cloud['role']}")
    print(f"members: {cloud['members']} ({cloud['online']} other(s) online)")
    return EXIT_OK


def cmd_invite(args: argparse.Namespace) -> int:
    """Make a one-time invite: its URI, and a QR code to scan with the new device."""
    body: dict[str, Any] = {"role": args.role, "expires_in": args.expires}
    if args.png is not None:
        body["qr"] = "png"
    elif args.svg is not None:
        body["qr"] = "svg"
    _, invite = _client(args).request("POST", "/api/cloud/invites", body)
    if args.png is not None:
        _write(args.png, base64.b64decode(invite.pop("qr_png")))
    if args.svg is not None:
        _write(args.svg, invite.pop("qr_svg").encode("utf-8"))
    if args.json:
        _emit_json(invite)
        return EXIT_OK
    if args.qr:
        from p2pcloud.cloud.invites import invite_qr_text

        print(invite_qr_text(invite["uri"]))
    print(invite["uri"])
    minutes = invite["expires_in"] / 60
    print(f"(works once, for {minutes:.0f} min; on the new device: "
          "`p2pcloud cloud join '<the invite>'` or `p2pcloud cloud join PHOTO.png`)",
          file=sys.stderr)
    for path in (args.png, args.svg):
        if path is not None:
            print(f"wrote {path}", file=sys.stderr)
    return EXIT_OK


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror}", "choose another file") from exc


def read_invite_image(path: Path) -> str:
    """Decode the QR code in an image file (PNG, JPEG...) and return the invite text.

    Raises:
        CliError: unreadable, no QR code, or the QR code is no p2pcloud invite.
    """
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}", "check the file name") from exc
    if size > MAX_IMAGE_BYTES:
        raise CliError(f"{path} is larger than {MAX_IMAGE_BYTES >> 20} MiB",
                       "use a smaller photo or screenshot of the QR code")
    import zxingcpp
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            results = zxingcpp.read_barcodes(image)
    except (OSError, UnidentifiedImageError) as exc:
        raise CliError(f"{path} is not an image this tool reads ({exc})",
                       "give a PNG or JPEG of the invite's QR code, or paste its text") from exc
    texts = [r.text for r in results if r.text.lower().startswith(INVITE_PREFIX)]
    if not texts:
        found = "no QR code" if not results else "a QR code that is no p2pcloud invite"
        raise CliError(f"{path}: {found}",
                       "photograph the invite shown by `p2pcloud cloud invite --qr`, or paste "
                       "its text")
    return str(texts[0])


def cmd_join(args: argparse.Namespace) -> int:
    """Join a cloud with an invite (its text, or an image of its QR code)."""
    text = args.invite
    if not text.lower().startswith(INVITE_PREFIX):
        path = Path(text).expanduser()
        if not path.exists():
            raise CliError(f"{text[:60]!r} is neither an invite nor a file",
                           "paste the whole p2pcloud:invite/1/... text, or give the QR "
                           "image's file name", EXIT_USAGE)
        text = read_invite_image(path)
    _, joined = _client(args).request(
        "POST", "/api/cloud/join", {"invite": text, "timeout": args.timeout},
        timeout=args.timeout + REQUEST_SLACK)
    if args.json:
        _emit_json(joined)
    else:
        print(f"joined cloud {joined['cloud_id']} ({joined['members']} members)")
    return EXIT_OK


def cmd_code(args: argparse.Namespace) -> int:
    """Open a short pairing code; type it on the new device with `p2pcloud cloud pair`."""
    _, opened = _client(args).request("POST", "/api/cloud/pairing",
                                      {"expires_in": args.expires})
    if args.json:
        _emit_json(opened)
        return EXIT_OK
    print(opened["code"])
    print(f"(on the new device, on this network: `p2pcloud cloud pair {opened['code']}`; "
          f"open for {opened['expires_in'] / 60:.0f} min, one try)", file=sys.stderr)
    return EXIT_OK


def cmd_pair(args: argparse.Namespace) -> int:
    """Join a cloud with a code shown by `p2pcloud cloud code` on a device on this LAN."""
    _, joined = _client(args).request(
        "POST", "/api/cloud/pair", {"code": args.code, "timeout": args.timeout},
        timeout=args.timeout + REQUEST_SLACK)
    if args.json:
        _emit_json(joined)
    else:
        print(f"joined cloud {joined['cloud_id']} ({joined['members']} members)")
    return EXIT_OK


def _members_lines(members: list[dict[str, Any]]) -> None:
    # plain lines, not a table: a hashname (52 characters) is never cut, people copy it
    for m in members:
        mark = "x" if m["revoked"] else "*" if m["online"] or m["self"] else "-"
        where = ("this device" if m["self"] else "revoked" if m["revoked"]
                 else _path_text(m["path"]) if m["online"] else "offline")
        print(f"{mark} {m['hashname']}  {m['role']:<6}  {where}")


def cmd_members(args: argparse.Namespace) -> int:
    """List the cloud's members: role, online or not, the path in use."""
    result = _client(args).get("/api/cloud/members")
    if args.json:
        _emit_json(result)
        return EXIT_OK
    _members_lines(result["members"])
    return EXIT_OK


def cmd_online(args: argparse.Namespace) -> int:
    """List the members linked now, and over which path (direct or through a router)."""
    result = _client(args).get("/api/cloud/members")
    online = [m for m in result["members"] if m["online"] and not m["self"]]
    if args.json:
        _emit_json({"cloud_id": result["cloud_id"], "members": online})
        return EXIT_OK
    if not online:
        print("no other member is online")
        return EXIT_OK
    for m in online:
        print(f"{m['hashname']}  {m['role']:<6}  {_path_text(m['path'])}")
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace) -> int:
    """Revoke a member (a lost device): every member refuses it from now on."""
    _, result = _client(args).request("DELETE", f"/api/cloud/members/{_q(args.hashname)}")
    if args.json:
        _emit_json(result)
    else:
        print(f"revoked {result['revoked']}; it gets nothing new and its later writes are "
              "refused everywhere")
    return EXIT_OK


def cmd_policy(args: argparse.Namespace) -> int:
    """Set what a member keeps of a sub-cloud: full, on-demand, or hidden from it."""
    _, result = _client(args).request(
        "PUT", "/api/cloud/policies",
        {"member": args.member, "subcloud": args.sc, "mode": args.mode})
    if args.json:
        _emit_json(result)
    else:
        print(f"{_short(result['member'])} keeps {result['mode']} of {result['subcloud']}")
    return EXIT_OK


def cmd_policies(args: argparse.Namespace) -> int:
    """List the replication policy entries (the most specific one applies)."""
    result = _client(args).get("/api/cloud/policies")
    if args.json:
        _emit_json(result)
        return EXIT_OK
    for row in result["policies"]:
        print(f"{row['member']}  {row['subcloud']}  {row['mode']}")
    print(f"(anything else: {result['default']})")
    return EXIT_OK


# -- the parser ---------------------------------------------------------------------------


def register(sub: Any, common: argparse.ArgumentParser, shows: argparse.ArgumentParser) -> None:
    """Add ``p2pcloud cloud ...`` to the CLI's subcommands (called by cli.build_parser)."""
    cloud = sub.add_parser("cloud", parents=[common], help="your devices as one cloud",
                           description="Found a cloud, add devices by invite or code, list, "
                           "revoke, set replication policies.")
    cloud_sub = cloud.add_subparsers(dest="cloud_command", required=True, metavar="SUBCOMMAND")

    def add(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = cloud_sub.add_parser(
            name, parents=[common, shows], help=help, description=func.__doc__)
        p.set_defaults(func=func)
        return p

    add("new", cmd_new, "found a cloud on this device")
    add("status", cmd_status, "show this device's cloud")
    invite = add("invite", cmd_invite, "make a one-time invite (URI, QR code)")
    invite.add_argument("--qr", action="store_true", help="draw the QR code in the terminal")
    invite.add_argument("--png", type=Path, default=None, metavar="FILE",
                        help="write the QR code as a PNG image")
    invite.add_argument("--svg", type=Path, default=None, metavar="FILE",
                        help="write the QR code as an SVG image")
    invite.add_argument("--role", choices=["device", "admin"], default="device",
                        help="the new device's role (default device)")
    invite.add_argument("--expires", type=float, default=3600.0, metavar="SECONDS",
                        help="how long it stays valid (default 3600)")
    join = add("join", cmd_join, "join a cloud with an invite (text or QR image file)")
    join.add_argument("invite", metavar="URI|FILE", help="the invite text, or an image of its QR")
    join.add_argument("--timeout", type=float, default=JOIN_TIMEOUT, metavar="SECONDS",
                      help="how long to wait for the inviting device")
    code = add("code", cmd_code, "open a short pairing code for a new device")
    code.add_argument("--expires", type=float, default=300.0, metavar="SECONDS",
                      help="how long the code stays open (default 300)")
    pair = add("pair", cmd_pair, "join a cloud with a pairing code (same LAN)")
    pair.add_argument("code", help="the code shown by `p2pcloud cloud code`")
    pair.add_argument("--timeout", type=float, default=JOIN_TIMEOUT, metavar="SECONDS",
                      help="how long to look for the device showing the code")
    add("members", cmd_members, "list the cloud's members")
    add("online", cmd_online, "list the members online now and their paths")
    revoke = add("revoke", cmd_revoke, "revoke a member (a lost device)")
    revoke.add_argument("hashname", help="its hashname (`p2pcloud cloud members`)")
    policy = add("policy", cmd_policy, "set a member's replication policy for a sub-cloud")
    policy.add_argument("member", help="the member's hashname")
    policy.add_argument("sc", help="the sub-cloud (id or name)")
    policy.add_argument("mode", choices=["full", "on-demand", "hidden"])
    add("policies", cmd_policies, "list the replication policy entries")
