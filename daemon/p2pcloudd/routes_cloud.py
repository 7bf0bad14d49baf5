"""API routes of the cloud capability: found, invite, join, pairing codes, members, revoke,
policies, and the ``cloud.members`` events.

Registered into :data:`p2pcloudd.api.REGISTRY` on import. The cloud itself (grants,
revocations, invites, SPAKE2 pairing, LAN discovery, re-linking through routers) is the
node's ``node.cloud`` (``p2pcloud/_node/cloud.py``, docs/cloud.md); these routes translate
HTTP to it and its errors to the API's error shape ``{"error": {"code", "message", "hint"}}``.

Theory of operation
-------------------
* Every route answers once the node has done the work: ``POST /api/cloud/join`` waits for the
  welcome (up to ``timeout``, 30 s by default), ``POST /api/cloud/pair`` for the SPAKE2
  exchange with the device found by mDNS. A pairing code opened with
  ``POST /api/cloud/pairing`` completes in the background; the new member shows up in
  ``GET /api/cloud/members`` and as a ``cloud.members`` event.
* :func:`background` runs for the daemon's lifetime and publishes a ``cloud.members``
  event when the membership or the policy changes (``cloud.add_listener``).
* LAN discovery and keeping members linked are the node's (``open_node(discovery=...)``,
  set from the daemon's ``discovery`` option by :func:`p2pcloudd.service.discovery_settings`):
  the cloud links every member it is not linked to by the paths mDNS shows, the paths it
  remembers in ``cloud.cbor`` (so they survive restarts), the invite's paths, and through
  every linked member as a router.
* Invites carry secrets; the daemon never logs them. QR codes are rendered here with segno
  (``p2pcloud.cloud.invites``), as SVG text or base64 PNG inside the JSON answer.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import TYPE_CHECKING, Any

import trio
from starlette.requests import Request

import p2pcloud
from p2pcloud._ids import Hashname
from p2pcloud._wire import b32decode, b32encode
from p2pcloud.errors import JoinFailed, MalformedPacket, UnknownSubCloud
from p2pcloudd.api import ApiError, json_body, route
from p2pcloudd.routes_node import PATH_SCHEMA
from p2pcloudd.runtime import Daemon

if TYPE_CHECKING:
    from p2pcloud._node.cloud import Cloud, MemberView

log = logging.getLogger("p2pcloudd.cloud")

EVENT_COALESCE = 0.2  # s: membership changes within this make one event
MAX_INVITE_TEXT = 2048  # characters of an invite; one with 4 paths is about 500
MAX_CODE = 100  # characters of a pairing code ("42-maple-otter-drum" is 19)
MAX_TTL = 30 * 24 * 3600.0  # s: an invite valid longer than a month is a standing door
MAX_WAIT = 120.0  # s a join or pair request may wait for the other device
ROLES = ["admin", "device", "thing"]
MODES = ["full", "on-demand", "hidden"]
QR_FORMATS = ["none", "svg", "png"]

CLOUD_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["cloud_id", "hashname", "members"],
    "properties": {
        "cloud_id": {"type": ["string", "null"],
                     "description": "base32 cloud id; null until founded or joined"},
        "hashname": {"type": "string", "description": "this endpoint"},
        "role": {"type": ["string", "null"], "description": "our role in the cloud"},
        "members": {"type": "integer", "description": "valid members, us included"},
        "online": {"type": "integer", "description": "members linked now (not us)"},
        "subcloud": {"type": ["string", "null"],
                     "description": "the cloud sub-cloud (grants, revocations, policy)"},
        "statistics": {"type": "object", "additionalProperties": {"type": "integer"},
                       "description": "counters since start: invites and pairings by outcome, "
                       "re-links by the way tried (relink: lan / remembered / router) and "
                       "succeeded (relinked, relinked: router)"},
    },
}
MEMBER_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["hashname", "role", "online", "path", "revoked"],
    "properties": {
        "hashname": {"type": "string"},
        "role": {"type": "string", "enum": ROLES},
        "rights": {"type": ["object", "null"],
                   "description": "sub-cloud id (base32) or * -> list of read/write/admin"},
        "expires": {"type": ["number", "null"], "description": "Unix time; null: never"},
        "revoked": {"type": "boolean"},
        "online": {"type": "boolean", "description": "linked now"},
        "path": PATH_SCHEMA,
        "self": {"type": "boolean", "description": "this endpoint"},
    },
}
INVITE_REQUEST: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "role": {"type": "string", "enum": ["admin", "device"],
                 "description": "the role the new device gets (default device)"},
        "expires_in": {"type": "number", "minimum": 60, "maximum": MAX_TTL,
                       "description": "seconds the invite stays valid (default 3600)"},
        "qr": {"type": "string", "enum": QR_FORMATS,
               "description": "also render the invite as a QR code (default none)"},
    },
}
INVITE_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["uri", "expires_in"],
    "properties": {
        "uri": {"type": "string", "description": "p2pcloud:invite/1/...: works once"},
        "expires_in": {"type": "number"},
        "expires_at": {"type": "number", "description": "Unix time"},
        "qr_svg": {"type": "string", "description": "an SVG document (qr = svg)"},
        "qr_png": {"type": "string", "description": "base64 PNG (qr = png)"},
    },
}
JOIN_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["invite"], "additionalProperties": False,
    "properties": {
        "invite": {"type": "string", "minLength": 1, "maxLength": MAX_INVITE_TEXT,
                   "description": "the invite text (p2pcloud:invite/1/...), any case"},
        "timeout": {"type": "number", "minimum": 1, "maximum": MAX_WAIT},
    },
}
PAIRING_REQUEST: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {"expires_in": {"type": "number", "minimum": 30, "maximum": 3600,
                                  "description": "seconds the code stays open (default 300)"}},
}
PAIR_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["code"], "additionalProperties": False,
    "properties": {
        "code": {"type": "string", "minLength": 3, "maxLength": MAX_CODE,
                 "description": "the code shown on the other device, e.g. 42-maple-otter-drum"},
        "timeout": {"type": "number", "minimum": 1, "maximum": MAX_WAIT},
    },
}
JOINED_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["cloud_id"],
    "properties": {"cloud_id": {"type": "string"}, "members": {"type": "integer"}},
}
POLICY_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["member", "subcloud", "mode"], "additionalProperties": False,
    "properties": {
        "member": {"type": "string", "minLength": 1, "maxLength": 52,
                   "description": "a member's hashname, or * for every member"},
        "subcloud": {"type": "string", "minLength": 1, "maxLength": 200,
                     "description": "the sub-cloud: base32 id or name, or * for every one"},
        "mode": {"type": "string", "enum": MODES,
                 "description": "full: keep everything; on-demand: keep what is opened; "
                 "hidden: never sent to that member"},
    },
}
PARAMS = {"hashname": "a member's hashname"}


# -- helpers ------------------------------------------------------------------------------


def _cloud(daemon: Daemon) -> Cloud:
    cloud = daemon.node.cloud
    if cloud is None:
        raise ApiError(503, "no_cloud_support", "this node keeps no data dir, so no cloud",
                       "run the daemon with a data dir")
    return cloud


def _in_cloud(daemon: Daemon) -> Cloud:
    cloud = _cloud(daemon)
    if cloud.id is None:
        raise ApiError(409, "no_cloud", "this device is in no cloud yet",
                       "found one with `p2pcloud cloud new`, or join one with "
                       "`p2pcloud cloud join INVITE` or `p2pcloud cloud pair CODE`")
    return cloud


def _id_text(value: bytes | None) -> str | None:
    return None if value is None else b32encode(bytes(value))


def _member_json(view: MemberView) -> dict[str, Any]:
    """A ``MemberView`` as JSON; the path gets ``direct`` as in ``/api/peers``."""
    path = dict(view.path) if view.path is not None else None
    if path is not None:
        path["direct"] = path.get("type") in ("udp4", "tcp4")
    return {
        "hashname": str(view.hashname),
        "role": view.role,
        "rights": dict(view.rights),
        "expires": view.expires,
        "revoked": bool(view.revoked),
        "online": bool(view.online),
        "path": path,
        "self": bool(view.this_device),
    }


def _summary(daemon: Daemon) -> dict[str, Any]:
    cloud = _cloud(daemon)
    members = [m for m in cloud.members() if not m.revoked]
    me = next((m for m in members if m.hashname == daemon.node.hashname), None)
    return {
        "cloud_id": _id_text(cloud.id),
        "hashname": daemon.node.hashname,
        "role": me.role if me is not None else None,
        "members": len(members),
        "online": sum(1 for m in members if m.online and m.hashname != daemon.node.hashname),
        "subcloud": cloud.subcloud.id_text if cloud.subcloud is not None else None,
        "statistics": dict(cloud.statistics()),
    }


def _join_error(exc: BaseException, how: str) -> ApiError:
    if isinstance(exc, JoinFailed):
        return ApiError(422, "join_failed", exc.reason,
                        "ask the other device for a new invite or code" if how == "invite"
                        else "open a new code on the other device and try once more")
    if isinstance(exc, p2pcloud.BadURI):
        return ApiError(422, "bad_invite", str(exc),
                        "copy the whole invite again, or scan its QR code")
    if isinstance(exc, p2pcloud.LinkError | trio.TooSlowError):
        return ApiError(504, "join_timeout", f"could not reach the inviting device ({exc})"
                        if str(exc) else "could not reach the inviting device in time",
                        "check that it runs and is on the same network, then retry")
    text = str(exc)
    hint = ("a device belongs to one cloud at a time; use another data dir for another cloud"
            if "already" in text else
            "pairing by code needs the mesh on UDP and LAN discovery (bind a LAN address)")
    return ApiError(409, "cannot_join", text, hint)


# -- routes -------------------------------------------------------------------------------


@route("GET", "/api/cloud", summary="This device's cloud: id, role, members, online",
       tag="cloud", response=CLOUD_SCHEMA, errors=(503,))
async def _get_cloud(daemon: Daemon, request: Request) -> Any:
    """``cloud_id`` is null until the cloud is founded here or joined."""
    return _summary(daemon)


@route("POST", "/api/cloud", summary="Found a cloud: this device becomes its first admin",
       tag="cloud", status=201, response=CLOUD_SCHEMA, errors=(409, 503))
async def _found(daemon: Daemon, request: Request) -> Any:
    """Creates the cloud id, the founding grant and this device's own sub-cloud. 409
    ``already_in_cloud`` when the device is in a cloud already."""
    cloud = _cloud(daemon)
    if cloud.id is not None:
        raise ApiError(409, "already_in_cloud",
                       f"this device is already in cloud {_id_text(cloud.id)}",
                       "invite other devices with `p2pcloud cloud invite`")
    try:
        await cloud.found()
    except p2pcloud.LocalProtocolError as exc:
        raise ApiError(409, "already_in_cloud", str(exc),
                       "invite other devices with `p2pcloud cloud invite`") from exc
    daemon.events.publish("cloud.members", _summary(daemon))
    return _summary(daemon)


@route("POST", "/api/cloud/invites", summary="Make a one-time invite (URI and QR code)",
       tag="cloud", status=201, request=INVITE_REQUEST, response=INVITE_SCHEMA,
       errors=(400, 403, 409, 413, 415, 503))
async def _invite(daemon: Daemon, request: Request) -> Any:
    """Admins only (403 otherwise). The invite carries this device's keys and paths, a
    one-time secret and its expiry; whoever holds it can join once, so show it only to the
    device that is to join."""
    cloud = _in_cloud(daemon)
    body = await json_body(request, INVITE_REQUEST)
    expires_in = float(body.get("expires_in", 3600.0))
    try:
        uri = await cloud.invite(role=body.get("role", "device"), expires_in=expires_in)
    except p2pcloud.LocalProtocolError as exc:
        raise ApiError(403, "not_admin", str(exc),
                       "invite from an admin device (`p2pcloud cloud members` shows roles)"
                       ) from exc
    answer: dict[str, Any] = {"uri": uri, "expires_in": expires_in,
                              "expires_at": time.time() + expires_in}
    qr = body.get("qr", "none")
    if qr != "none":
        from p2pcloud.cloud.invites import invite_qr_png, invite_qr_svg

        if qr == "svg":
            answer["qr_svg"] = invite_qr_svg(uri)
        else:
            answer["qr_png"] = base64.b64encode(invite_qr_png(uri)).decode("ascii")
    return answer


@route("POST", "/api/cloud/join", summary="Join a cloud with an invite (waits for the welcome)",
       tag="cloud", request=JOIN_REQUEST, response=JOINED_SCHEMA,
       errors=(400, 409, 413, 415, 422, 503, 504))
async def _join(daemon: Daemon, request: Request) -> Any:
    """Links to the inviting device by the paths in the invite, proves the invite's secret
    and receives a signed grant. 422 ``bad_invite`` (mistyped, truncated, expired) or
    ``join_failed`` (used, refused); 504 when the inviter cannot be reached."""
    cloud = _cloud(daemon)
    body = await json_body(request, JOIN_REQUEST)
    timeout = float(body.get("timeout", 30.0))
    try:
        with trio.fail_after(timeout + 5.0):
            cloud_id = await cloud.join(body["invite"].strip(), timeout=timeout)
    except (JoinFailed, p2pcloud.BadURI, p2pcloud.LinkError, trio.TooSlowError,
            p2pcloud.LocalProtocolError) as exc:
        raise _join_error(exc, "invite") from exc
    return {"cloud_id": _id_text(cloud_id), "members": _summary(daemon)["members"]}


@route("POST", "/api/cloud/pairing", summary="Open a short pairing code for a new device",
       tag="cloud", status=201, request=PAIRING_REQUEST, errors=(400, 403, 409, 413, 415, 503),
       response={"type": "object", "required": ["code", "expires_in"],
                 "properties": {"code": {"type": "string"},
                                "expires_in": {"type": "number"},
                                "expires_at": {"type": "number"}}})
async def _open_pairing(daemon: Daemon, request: Request) -> Any:
    """Admins only. The code (``42-maple-otter-drum``) is typed on the new device
    (``p2pcloud cloud pair CODE``) on the same LAN; this device advertises the code's number
    by mDNS until it is used or expires. One wrong guess burns it."""
    cloud = _in_cloud(daemon)
    body = await json_body(request, PAIRING_REQUEST)
    expires_in = float(body.get("expires_in", 300.0))
    try:
        code = await cloud.open_pairing(expires_in=expires_in)
    except p2pcloud.LocalProtocolError as exc:
        raise ApiError(403, "cannot_pair", str(exc),
                       "open codes on an admin device with LAN discovery on") from exc
    return {"code": code, "expires_in": expires_in, "expires_at": time.time() + expires_in}


@route("POST", "/api/cloud/pair", summary="Join a cloud with a short code (PAKE over the LAN)",
       tag="cloud", request=PAIR_REQUEST, response=JOINED_SCHEMA,
       errors=(400, 409, 413, 415, 422, 503, 504))
async def _pair(daemon: Daemon, request: Request) -> Any:
    """Finds the device showing the code by mDNS, runs SPAKE2 with it and receives a
    grant. A wrong code fails once and burns the code (422 ``join_failed``)."""
    cloud = _cloud(daemon)
    body = await json_body(request, PAIR_REQUEST)
    timeout = float(body.get("timeout", 30.0))
    try:
        with trio.fail_after(timeout + 5.0):
            cloud_id = await cloud.pair(body["code"].strip(), timeout=timeout)
    except (JoinFailed, p2pcloud.BadURI, p2pcloud.LinkError, trio.TooSlowError,
            p2pcloud.LocalProtocolError) as exc:
        raise _join_error(exc, "code") from exc
    return {"cloud_id": _id_text(cloud_id), "members": _summary(daemon)["members"]}


@route("GET", "/api/cloud/members", summary="The cloud's members: role, online, path",
       tag="cloud", errors=(409, 503),
       response={"type": "object", "required": ["cloud_id", "members"],
                 "properties": {"cloud_id": {"type": "string"},
                                "members": {"type": "array", "items": MEMBER_SCHEMA}}})
async def _members(daemon: Daemon, request: Request) -> Any:
    """Every member with a grant in force, and revoked ones (``revoked`` true); online first.
    ``path`` is the path in use: udp4/tcp4 (direct) or peer (through a router)."""
    cloud = _in_cloud(daemon)
    rows = [_member_json(m) for m in cloud.members()]
    rows.sort(key=lambda r: (r["revoked"], not r["self"], not r["online"], r["hashname"]))
    return {"cloud_id": _id_text(cloud.id), "members": rows}


@route("DELETE", "/api/cloud/members/{hashname}", params=PARAMS,
       summary="Revoke a member (a lost device)", tag="cloud", errors=(400, 403, 404, 409, 503),
       response={"type": "object", "required": ["revoked"],
                 "properties": {"revoked": {"type": "string"}}})
async def _revoke(daemon: Daemon, request: Request) -> Any:
    """Admins only. Every member then refuses the device's links, sends it nothing new and
    rejects what it writes after this point. Revoking the last admin is refused (409)."""
    cloud = _in_cloud(daemon)
    hashname = _hashname(request.path_params["hashname"])
    known = {m.hashname: m for m in cloud.members()}
    if hashname not in known:
        raise ApiError(404, "unknown_member", f"{hashname} is not a member of this cloud",
                       "see `p2pcloud cloud members`")
    if known[hashname].revoked:
        raise ApiError(409, "already_revoked", f"{hashname} is revoked already", "")
    try:
        await cloud.revoke(hashname)
    except p2pcloud.LocalProtocolError as exc:
        text = str(exc)
        status, code = ((409, "last_admin") if "admin" in text and "first" in text
                        else (403, "cannot_revoke"))
        raise ApiError(status, code, text,
                       "make another device an admin first" if code == "last_admin"
                       else "revoke from an admin device") from exc
    daemon.events.publish("cloud.members", _summary(daemon))
    return {"revoked": hashname}


@route("GET", "/api/cloud/policies", summary="The replication policy entries of the cloud",
       tag="cloud", errors=(409, 503),
       response={"type": "object", "required": ["policies", "default"],
                 "properties": {
                     "default": {"type": "string", "enum": MODES},
                     "policies": {"type": "array", "items": {
                         "type": "object", "required": ["member", "subcloud", "mode"],
                         "properties": {"member": {"type": "string"},
                                        "subcloud": {"type": "string"},
                                        "mode": {"type": "string", "enum": MODES}}}}}})
async def _policies(daemon: Daemon, request: Request) -> Any:
    """Every entry written (``*`` stands for every member or every sub-cloud); the most
    specific entry wins: (member, sub-cloud), (member, *), (*, sub-cloud), (*, *), then
    ``default``."""
    cloud = _in_cloud(daemon)
    rows = [{"member": str(member), "subcloud": str(sc), "mode": mode}
            for (member, sc), mode in cloud.policy.entries.items()]
    rows.sort(key=lambda r: (r["member"], r["subcloud"]))
    return {"policies": rows, "default": cloud.policy.default}


@route("PUT", "/api/cloud/policies", summary="Set a member's replication policy for a sub-cloud",
       tag="cloud", request=POLICY_REQUEST, errors=(400, 403, 404, 409, 413, 415, 503),
       response={"type": "object", "required": ["member", "subcloud", "mode"],
                 "properties": {"member": {"type": "string"}, "subcloud": {"type": "string"},
                                "mode": {"type": "string", "enum": MODES}}})
async def _set_policy(daemon: Daemon, request: Request) -> Any:
    """Admins only. ``full``: the member keeps everything (the home box); ``on-demand``: it
    keeps what it opens and fetches blobs when read (a phone); ``hidden``: it never gets the
    sub-cloud. The policy replicates to every member in the cloud sub-cloud."""
    cloud = _in_cloud(daemon)
    body = await json_body(request, POLICY_REQUEST)
    member = "*" if body["member"] == "*" else _hashname(body["member"])
    scope: Any = "*"
    scope_text = "*"
    if body["subcloud"] != "*":
        try:
            sc = daemon.node.subcloud(body["subcloud"])
        except UnknownSubCloud as exc:
            raise ApiError(404, "unknown_subcloud", f"no sub-cloud {body['subcloud']!r} here",
                           "list them with `p2pcloud sc ls`") from exc
        scope, scope_text = sc.id, sc.id_text
    if member != "*" and member not in {m.hashname for m in cloud.members()}:
        raise ApiError(404, "unknown_member", f"{member} is not a member of this cloud",
                       "see `p2pcloud cloud members`")
    try:
        await cloud.set_policy(member, scope, body["mode"])
    except p2pcloud.LocalProtocolError as exc:
        raise ApiError(403, "cannot_set_policy", str(exc), "set policies from an admin device"
                       ) from exc
    return {"member": member, "subcloud": scope_text, "mode": body["mode"]}


def _hashname(text: str) -> Hashname:
    text = text.strip().lower()
    try:
        ok = len(text) == 52 and len(b32decode(text)) == 32
    except MalformedPacket:
        ok = False
    if not ok:
        raise ApiError(400, "bad_hashname", f"not a hashname: {text[:60]!r}",
                       "copy it from `p2pcloud cloud members` (52 characters)")
    return Hashname(text)


# -- background: membership events ------------------------------------------------------


async def background(daemon: Daemon) -> None:
    """Run for the daemon's lifetime: a ``cloud.members`` event when the membership or the
    policy changes (members joined, were revoked, grants expired)."""
    cloud = daemon.node.cloud
    if cloud is None:
        return
    wake = trio.Event()

    def changed() -> None:
        # called by the cloud in the Trio thread, maybe inside the node's pump: only flag it
        wake.set()

    cloud.add_listener(changed)
    try:
        while True:
            await wake.wait()
            wake = trio.Event()
            if cloud.id is not None:
                daemon.events.publish("cloud.members", _summary(daemon))
            await trio.sleep(EVENT_COALESCE)  # a burst of changes makes one event
    finally:
        cloud.remove_listener(changed)
