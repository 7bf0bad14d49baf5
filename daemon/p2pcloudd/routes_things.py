"""API routes of the things capability: things, their tags, scanning, messages, rules, transfer.

Registered into :data:`p2pcloudd.api.REGISTRY` on import. Everything here calls the node's
things API (``node.things``, :mod:`p2pcloud._node.things`; docs/things.md describes the
pure layers under it) and turns its answers into JSON and its errors into the API's error
body. A thing in a path (``{thing}``) is its hashname or its name.

Routes that answer an image (a tag as PNG or SVG, a sheet of fresh tags) declare that media
type; everything else is JSON. ``POST /api/scan/image`` takes the image itself as the body
(any ``image/*`` or ``application/octet-stream``, at most :data:`MAX_IMAGE_UPLOAD` bytes),
which the JSON-only request validator of :mod:`p2pcloudd.api` cannot describe; its
OpenAPI description says so in words.

Thing events: :func:`background` registers a listener on ``node.things`` for the daemon's
lifetime and publishes each thing event on the daemon's event hub as ``thing.<what>``
(``thing.created``, ``thing.message``, ``thing.notify``...; :data:`EVENT_TYPES`), with the
event's fields as JSON (bytes as base32).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from starlette.requests import Request
from starlette.responses import Response

import p2pcloud
from p2pcloud._wire import b32encode
from p2pcloud.errors import (
    AccessDenied,
    BadURI,
    ClaimRefused,
    JoinFailed,
    RuleError,
    TagImageError,
    ThingError,
    ThingMoved,
    TransferError,
    UnknownThing,
)
from p2pcloudd.api import ApiError, json_body, route
from p2pcloudd.runtime import Daemon

log = logging.getLogger("p2pcloudd.things")

MAX_NAME = 200  # characters of a thing's name: a label on a sticker, not an essay
MAX_FIELD = 200  # characters of make / model / serial / a message's contact
MAX_CARD = 2000  # characters of a card: a few lines a finder reads on a phone
MAX_NOTE = 16_000  # characters added to the notes at once; the API body is 64 KiB anyway
MAX_MESSAGE = 1000  # characters of a finder's message (the thing channel's own limit)
MAX_RULE = 1024  # characters of a rule (the rule parser's own limit)
MAX_TAG_TEXT = 512  # characters of a tag URI (p2pcloud.things.tags.MAX_TAG_TEXT)
MAX_SHEET = 100  # fresh tags per sheet: 25 pages of four columns; more is a typo
MAX_IMAGE_UPLOAD = 16 * 1024 * 1024  # bytes of a scanned photo; a phone JPEG is 2-6 MB
MAX_KEY = 256  # characters of a {thing}/{rule} path parameter; real ones are far shorter
DEFAULT_LOG_PAGE = 1000  # records per page of a log by default
MAX_LOG_PAGE = 20_000  # records per page at most: about 2 MB of JSON
CHANGED_BURST = 8  # thing.changed events of one thing published at once per window
CHANGED_WINDOW = 1.0  # s; beyond the burst, a thing's changes are merged into one a window
MAX_CHANGED_TRACKED = 100_000  # things whose recent event times are kept; bounds memory
SCAN_TIMEOUT = 40.0  # s a scan may take: it may link the owner's cloud (mesh gives up at 30)

THING_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["hashname", "name"],
    "description": "a thing as the node lists it (fields beyond these may appear)",
    "properties": {
        "hashname": {"type": "string", "description": "the thing's hashname"},
        "name": {"type": "string"}, "make": {"type": "string"}, "model": {"type": "string"},
        "serial": {"type": "string"}, "archived": {"type": "boolean"},
        "claimed": {"type": "boolean"},
    },
}
THING_PARAMS = {"thing": "the thing: its hashname, or its name", "rule": "a rule id"}
CREATE_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["name"], "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME},
        "make": {"type": "string", "maxLength": MAX_FIELD},
        "model": {"type": "string", "maxLength": MAX_FIELD},
        "serial": {"type": "string", "maxLength": MAX_FIELD},
        "card": {"type": "string", "maxLength": MAX_CARD,
                 "description": "what a finder who scans the tag sees (empty: nothing)"},
        "claim": {"type": "boolean", "description": "claim it at once (as scanning its fresh "
                  "tag would): its tag is then the claimed one, ready for finders"},
    },
}
RENAME_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["name"], "additionalProperties": False,
    "properties": {"name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME}},
}
ARCHIVE_REQUEST: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {"archived": {"type": "boolean", "description": "default true"}},
}
NOTE_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["text"], "additionalProperties": False,
    "properties": {"text": {"type": "string", "minLength": 1, "maxLength": MAX_NOTE}},
}
READING_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["fields"], "additionalProperties": False,
    "properties": {"fields": {"type": "object",
                              "description": "e.g. {\"value\": 71.5, \"unit\": \"kg\"}"}},
}
CARD_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["text"], "additionalProperties": False,
    "properties": {"text": {"type": "string", "maxLength": MAX_CARD,
                            "description": "empty: a finder sees nothing"}},
}
RULE_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["text"], "additionalProperties": False,
    "properties": {"text": {"type": "string", "minLength": 1, "maxLength": MAX_RULE,
                            "description": "on EVENT [if CONDITION] do ACTION (docs/things.md)"}},
}
TRANSFER_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["to"], "additionalProperties": False,
    "properties": {
        "to": {"type": "string", "minLength": 1, "maxLength": 4096,
               "description": "the new owner's cloud (what `p2pcloud thing transfer` takes)"},
        "history": {"type": "string", "minLength": 1, "maxLength": 400,
                    "description": "all (default), or the parts to hand on"},
    },
}
FRESH_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["count"], "additionalProperties": False,
    "properties": {
        "count": {"type": "integer", "minimum": 1, "maximum": MAX_SHEET},
        "columns": {"type": "integer", "minimum": 1, "maximum": 8,
                    "description": "codes per row on a sheet (default 4)"},
    },
}
SCAN_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["uri"], "additionalProperties": False,
    "properties": {"uri": {"type": "string", "minLength": 1, "maxLength": MAX_TAG_TEXT,
                           "description": "the tag's text: P2PCLOUD:..."}},
}
MESSAGE_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["tag", "text"], "additionalProperties": False,
    "properties": {
        "tag": {"type": "string", "minLength": 1, "maxLength": MAX_TAG_TEXT,
                "description": "the scanned tag's text"},
        "text": {"type": "string", "minLength": 1, "maxLength": MAX_MESSAGE},
        "contact": {"type": "string", "maxLength": MAX_FIELD},
    },
}
TAG_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["thing", "uri", "kind"],
    "properties": {"thing": {"type": "string"}, "uri": {"type": "string"},
                   "kind": {"type": "string", "enum": ["fresh", "claimed"]},
                   "text": {"type": "string", "description": "the code for a terminal"}},
}
SCAN_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["action", "tag"],
    "properties": {
        "action": {"type": "string", "enum": ["claimed", "opened", "finder"],
                   "description": "claimed (a fresh tag: the thing is now this cloud's), "
                   "opened (the owner scanned a claimed tag) or finder (someone else's "
                   "thing: only its card)"},
        "tag": {"type": "string", "description": "the tag scanned (for a claim: the claimed "
                "tag to print)"},
        "thing": {"type": ["object", "null"], "description": "the thing (claim, open)"},
        "card": {"type": ["object", "null"], "description": "what a finder sees (label -> "
                 "text)"},
        "new_tag": {"type": ["string", "null"], "description": "after a claim: the claimed "
                    "tag to print (finders reach the thing with it)"},
    },
}
THING_INVITE_REQUEST: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {"expires_in": {"type": "number", "minimum": 60, "maximum": 30 * 86400,
                                  "description": "seconds it stays valid (default 3600)"}},
}
SIMPLE_THING_ERRORS = (400, 404, 409, 413, 415)
NODE_ERRORS = (400, 404, 409, 413, 415, 422, 502, 503, 504)


# -- helpers ------------------------------------------------------------------------------


def to_json(value: Any) -> Any:
    """A node value (dataclasses, bytes, enums, tuples) as JSON; bytes become base32."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not f.name.startswith("_")}
    if isinstance(value, bytes | bytearray | memoryview):
        return b32encode(bytes(value))
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_json(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    uri = getattr(value, "uri", None)
    if callable(uri):  # a Tag
        return str(uri())
    return str(value)


def _things(daemon: Daemon) -> Any:
    things = getattr(daemon.node, "things", None)
    if things is None:
        raise ApiError(503, "things_unavailable", "this node has no things API",
                       "update p2pcloud; things need a node with a data dir")
    return things


def _key(request: Request, name: str) -> str:
    value = str(request.path_params[name])
    if len(value) > MAX_KEY:
        raise ApiError(400, "bad_name", f"{name} is longer than {MAX_KEY} characters",
                       "use the thing's hashname or name")
    return value


def _find(daemon: Daemon, request: Request) -> Any:
    key = _key(request, "thing")
    try:
        return _things(daemon).get(key)
    except UnknownThing as exc:
        raise ApiError(404, "unknown_thing", str(exc),
                       "list them with `p2pcloud thing ls` (a hashname prefix of 8+ "
                       "characters works too)") from exc


def _hashname(view: Any) -> str:
    return str(getattr(view, "hashname", view))


async def _edit(daemon: Daemon, request: Request, schema: dict[str, Any], what: str,
                op: Callable[[Any, Any, dict[str, Any]], Awaitable[Any]]) -> Any:
    """The shape of every simple edit route: find the thing, read the body, run
    ``op(things, view, body)`` through :func:`call`, answer the thing as it is now."""
    view = _find(daemon, request)
    body = await json_body(request, schema)
    things = _things(daemon)
    await call(what, lambda: op(things, view, body))
    return thing_json(things.get(_hashname(view)))


async def call(what: str, fn: Callable[[], Awaitable[Any]], *,
               limit: float = SCAN_TIMEOUT) -> Any:
    """Run a node call and translate its errors into API errors.

    Args:
        what: names the operation in the message.
        fn: the call.
        limit: seconds before 504.

    Returns:
        What the call returned.

    Raises:
        ApiError: the translated error.
    """
    try:
        with trio.fail_after(limit):
            return await fn()
    except trio.TooSlowError as exc:
        raise ApiError(504, "thing_timeout", f"{what}: no answer within {limit:.0f} s",
                       "the thing's owner devices may all be offline; try again later") from exc
    except BadURI as exc:
        raise ApiError(422, "bad_tag", f"{what}: not a valid tag: {exc}",
                       "scan the tag again, or photograph it square on and in focus") from exc
    except TagImageError as exc:
        raise ApiError(422, "bad_image", f"{what}: {exc}",
                       "send a photo or screenshot with one tag in it") from exc
    except ClaimRefused as exc:
        raise ApiError(409, "claim_refused", f"{what}: {exc}",
                       "a tag can be claimed once; scan the claimed tag the owner printed") from exc
    except RuleError as exc:
        raise ApiError(400, "bad_rule", f"{what}: {exc}",
                       "see docs/things.md for the rule language") from exc
    except (TransferError, JoinFailed) as exc:
        raise ApiError(409, "transfer_failed", f"{what}: {exc}",
                       "check the new owner's cloud and that you own the thing") from exc
    except AccessDenied as exc:
        raise ApiError(403, "access_denied", f"{what}: {exc}",
                       "only the thing's owner devices may do this") from exc
    except UnknownThing as exc:
        raise ApiError(404, "unknown_thing", f"{what}: {exc}",
                       "list them with `p2pcloud thing ls`") from exc
    except ThingMoved as exc:
        raise ApiError(409, "thing_moved", f"{what}: {exc}",
                       "the thing has a new owner; ask them for its new tag") from exc
    except ThingError as exc:
        raise ApiError(409, "thing_refused", f"{what}: {exc}",
                       "nothing was changed; see the message") from exc
    except p2pcloud.LinkError as exc:
        raise ApiError(502, "unreachable", f"{what}: {exc}",
                       "the thing's owner devices did not answer; try again later") from exc
    except (p2pcloud.LocalProtocolError, p2pcloud.CoreUsageError) as exc:
        raise ApiError(400, "bad_value", f"{what}: {exc}", "check the values") from exc
    except p2pcloud.RemoteProtocolError as exc:
        raise ApiError(502, "bad_answer", f"{what}: {exc}",
                       "the other side answered with something unusable") from exc
    except p2pcloud.StoreError as exc:
        raise ApiError(500, "store_failed", f"{what}: {exc}",
                       "nothing changed; check the data dir's disk") from exc


def thing_json(view: Any) -> dict[str, Any]:
    """A ThingView as JSON (its own ``to_json``: the API shape)."""
    data: dict[str, Any] = to_json(view.to_json())
    return data


def _tag_of(things: Any, view: Any) -> Any:
    try:
        return things.tag(view)
    except BadURI as exc:
        raise ApiError(409, "no_tag", f"this thing has no printable tag: {exc}",
                       "a thing handed on has no tag here any more") from exc
    except ThingError as exc:
        raise ApiError(409, "no_tag", f"this thing has no tag here: {exc}", "") from exc


# -- things -------------------------------------------------------------------------------


@route("GET", "/api/things", summary="The things of this cloud", tag="things",
       query={"archived": ({"type": "boolean"}, "true: list archived things too")},
       response={"type": "object", "required": ["things", "rules_pending"],
                 "properties": {
                     "things": {"type": "array", "items": THING_SCHEMA},
                     "rules_pending": {"type": "integer", "description": "rule firings this "
                                       "device still waits on (0: every known event handled "
                                       "here or marked done by another device)"}}},
       errors=(503,))
async def _list_things(daemon: Daemon, request: Request) -> Any:
    """Sorted by name; archived things are left out unless ``archived=true``; handed-on
    things are never listed."""
    include = request.query_params.get("archived", "").lower() in ("1", "true", "yes")
    things = _things(daemon)
    views = things.list(include_archived=include)
    return {"things": [thing_json(v) for v in views], "rules_pending": things.rules_pending()}


@route("POST", "/api/things", summary="Create a thing (a sub-cloud and a tag)", tag="things",
       status=201, request=CREATE_REQUEST, response=THING_SCHEMA, errors=NODE_ERRORS)
async def _create_thing(daemon: Daemon, request: Request) -> Any:
    """The thing gets its own keypair, sub-cloud and tag; durable when it answers. It is
    unclaimed (its tag is fresh) unless ``claim`` is true: then this device claims it at once,
    as scanning its fresh tag would."""
    body = await json_body(request, CREATE_REQUEST)
    things = _things(daemon)
    view = await call("create", lambda: things.create(
        body["name"], make=body.get("make", ""), model=body.get("model", ""),
        serial=body.get("serial", ""), card=body.get("card", "")))
    if body.get("claim"):
        tag = things.tag(view.hashname)
        result = await call("claim", lambda: things.scan(tag.uri()))
        view = result.thing if result.thing is not None else things.get(view.hashname)
    return thing_json(view)


@route("GET", "/api/things/{thing}", params=THING_PARAMS, summary="One thing", tag="things",
       response={**THING_SCHEMA, "properties": {
           **THING_SCHEMA["properties"], "notes": {"type": "string"},
           "rules": {"type": "array", "items": {"type": "object"}},
           "counts": {"type": "object", "description": "records per log (readings, events, "
                      "inbox, notices)"},
           "last_reading": {"type": ["object", "null"]}}},
       errors=(400, 404, 503))
async def _show_thing(daemon: Daemon, request: Request) -> Any:
    """Its profile and card, notes, rules, the number of records in each log and the last
    reading."""
    view = _find(daemon, request)
    things = _things(daemon)
    data = thing_json(view)
    readings = things.readings(view)
    data["notes"] = things.notes(view)
    data["rules"] = to_json(things.rules(view))
    data["counts"] = {"readings": len(readings), "events": len(things.events(view)),
                      "inbox": len(things.inbox(view)), "notices": len(things.notices(view))}
    data["last_reading"] = to_json(readings[-1]) if readings else None
    return data


@route("POST", "/api/things/{thing}/rename", params=THING_PARAMS, summary="Rename a thing",
       tag="things", request=RENAME_REQUEST, response=THING_SCHEMA, errors=SIMPLE_THING_ERRORS)
async def _rename_thing(daemon: Daemon, request: Request) -> Any:
    """Answers the renamed thing."""
    return await _edit(daemon, request, RENAME_REQUEST, "rename",
                       lambda things, view, body: things.rename(view, body["name"]))


@route("POST", "/api/things/{thing}/archive", params=THING_PARAMS,
       summary="Archive (or unarchive) a thing", tag="things", request=ARCHIVE_REQUEST,
       response=THING_SCHEMA, errors=SIMPLE_THING_ERRORS)
async def _archive_thing(daemon: Daemon, request: Request) -> Any:
    """An archived thing is left out of the default listing; its tag keeps working."""
    return await _edit(daemon, request, ARCHIVE_REQUEST, "archive",
                       lambda things, view, body: things.archive(view, body.get("archived", True)))


@route("POST", "/api/things/{thing}/notes", params=THING_PARAMS, summary="Add to the notes",
       tag="things", request=NOTE_REQUEST, response=THING_SCHEMA, errors=SIMPLE_THING_ERRORS)
async def _note(daemon: Daemon, request: Request) -> Any:
    """The text is added to the thing's collaborative notes."""
    return await _edit(daemon, request, NOTE_REQUEST, "note",
                       lambda things, view, body: things.note(view, body["text"]))


@route("POST", "/api/things/{thing}/readings", params=THING_PARAMS,
       summary="Append a reading", tag="things", status=201, request=READING_REQUEST,
       response={"type": "object", "required": ["thing", "fields"],
                 "properties": {"thing": {"type": "string"}, "fields": {"type": "object"}}},
       errors=SIMPLE_THING_ERRORS)
async def _reading(daemon: Daemon, request: Request) -> Any:
    """Appended to the readings log with a ``reading_added`` event (rules see it)."""
    view = _find(daemon, request)
    body = await json_body(request, READING_REQUEST)
    things = _things(daemon)
    await call("reading", lambda: things.add_reading(view, body["fields"]))
    return {"thing": _hashname(view), "fields": body["fields"]}


@route("PUT", "/api/things/{thing}/card", params=THING_PARAMS,
       summary="Set the card a finder sees", tag="things", request=CARD_REQUEST,
       response=THING_SCHEMA, errors=SIMPLE_THING_ERRORS)
async def _card(daemon: Daemon, request: Request) -> Any:
    """Empty text: a finder who scans the tag sees nothing but can still leave a message."""
    return await _edit(daemon, request, CARD_REQUEST, "card",
                       lambda things, view, body: things.set_card(view, body["text"]))


# -- tags ---------------------------------------------------------------------------------


@route("GET", "/api/things/{thing}/tag", params=THING_PARAMS, summary="A thing's tag URI",
       tag="things", response=TAG_SCHEMA, errors=(400, 404, 409, 503))
async def _tag(daemon: Daemon, request: Request) -> Any:
    """The URI its QR code holds, and the code drawn for a terminal."""
    from p2pcloud.things import tags

    things = _things(daemon)
    view = _find(daemon, request)
    tag = _tag_of(things, view)
    return {"thing": _hashname(view), "uri": tag.uri(), "kind": tag.kind,
            "text": tags.render_text(tag)}


@route("GET", "/api/things/{thing}/tag.png", params=THING_PARAMS,
       summary="A thing's tag as a PNG image", tag="things", media="image/png",
       response={"type": "string", "contentMediaType": "image/png"},
       query={"scale": ({"type": "integer", "minimum": 1, "maximum": 40},
                        "pixels per module (default 8)")},
       errors=(400, 404, 409, 503))
async def _tag_png(daemon: Daemon, request: Request) -> Any:
    """Black on white with a quiet zone, ready to print."""
    from p2pcloud.things import tags

    things = _things(daemon)
    tag = _tag_of(things, _find(daemon, request))
    scale = _int_query(request, "scale", 8, 1, 40)
    return Response(tags.render_png(tag, scale=scale), media_type="image/png")


@route("GET", "/api/things/{thing}/tag.svg", params=THING_PARAMS,
       summary="A thing's tag as an SVG image", tag="things", media="image/svg+xml",
       response={"type": "string", "contentMediaType": "image/svg+xml"},
       errors=(400, 404, 409, 503))
async def _tag_svg(daemon: Daemon, request: Request) -> Any:
    """Scales to any print size."""
    from p2pcloud.things import tags

    things = _things(daemon)
    tag = _tag_of(things, _find(daemon, request))
    return Response(tags.render_svg(tag), media_type="image/svg+xml")


def _int_query(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"\d{1,6}", raw) or not low <= int(raw) <= high:
        raise ApiError(400, "bad_query", f"{name} must be a whole number from {low} to {high}",
                       "see /api/openapi.json")
    return int(raw)


async def _fresh(daemon: Daemon, request: Request) -> tuple[list[Any], int]:
    body = await json_body(request, FRESH_REQUEST)
    things = _things(daemon)
    fresh = await call("fresh tags", lambda: things.fresh_tags(body["count"]))
    return list(fresh), int(body.get("columns", 4))


def _tag_json(tag: Any) -> dict[str, Any]:
    return {"thing": str(tag.hashname), "uri": tag.uri(), "kind": tag.kind}


@route("POST", "/api/tags", summary="Make fresh tags (unclaimed things) and list their URIs",
       tag="things", status=201, request=FRESH_REQUEST,
       response={"type": "object", "required": ["tags"],
                 "properties": {"tags": {"type": "array", "items": TAG_SCHEMA}}},
       errors=NODE_ERRORS)
async def _fresh_tags(daemon: Daemon, request: Request) -> Any:
    """Each is a new unclaimed thing of this cloud; scanning its tag claims it once."""
    fresh, _ = await _fresh(daemon, request)
    return {"tags": [_tag_json(t) for t in fresh]}


@route("POST", "/api/tags/sheet.png", summary="A printable sheet of fresh tags (PNG)",
       tag="things", status=201, request=FRESH_REQUEST, media="image/png",
       response={"type": "string", "contentMediaType": "image/png"}, errors=NODE_ERRORS)
async def _sheet_png(daemon: Daemon, request: Request) -> Any:
    """Makes ``count`` fresh tags and lays them out with a label each (kind and hashname)."""
    from p2pcloud.things import tags

    fresh, columns = await _fresh(daemon, request)
    image = await trio.to_thread.run_sync(
        lambda: tags.render_sheet(fresh, kind="png", columns=columns))
    return Response(image, status_code=201, media_type="image/png")


@route("POST", "/api/tags/sheet.svg", summary="A printable sheet of fresh tags (SVG)",
       tag="things", status=201, request=FRESH_REQUEST, media="image/svg+xml",
       response={"type": "string", "contentMediaType": "image/svg+xml"}, errors=NODE_ERRORS)
async def _sheet_svg(daemon: Daemon, request: Request) -> Any:
    """Like the PNG sheet, as SVG (print at any size)."""
    from p2pcloud.things import tags

    fresh, columns = await _fresh(daemon, request)
    image = tags.render_sheet(fresh, kind="svg", columns=columns)
    return Response(image, status_code=201, media_type="image/svg+xml")


# -- scanning and messages ----------------------------------------------------------------


def scan_json(result: Any) -> dict[str, Any]:
    """A ScanResult as JSON: ``action``, ``tag``, ``thing``, ``card``, ``new_tag``."""
    return {
        "action": result.action,
        "tag": result.tag.uri(),
        "thing": thing_json(result.thing) if result.thing is not None else None,
        "card": dict(result.card) if result.card is not None else None,
        "new_tag": result.new_tag.uri() if result.new_tag is not None else None,
    }


async def _scan(daemon: Daemon, source: str | bytes) -> dict[str, Any]:
    things = _things(daemon)
    result = await call("scan", lambda: things.scan(source))
    data = scan_json(result)
    daemon.events.publish("thing.scanned", {
        "action": data["action"],
        "thing": data["thing"]["hashname"] if data["thing"] else str(result.tag.hashname)})
    return data


@route("POST", "/api/scan", summary="Scan a tag given its text", tag="things",
       request=SCAN_REQUEST, response=SCAN_SCHEMA, errors=NODE_ERRORS + (403,))
async def _scan_uri(daemon: Daemon, request: Request) -> Any:
    """A fresh tag claims the thing into this cloud (once); the owner's scan of a claimed tag
    opens the thing; anyone else gets the thing's card (and may then leave a message)."""
    body = await json_body(request, SCAN_REQUEST)
    return await _scan(daemon, body["uri"].strip())


@route("POST", "/api/scan/image", summary="Scan a tag from a photo or screenshot",
       tag="things", response=SCAN_SCHEMA, errors=NODE_ERRORS + (403,))
async def _scan_image(daemon: Daemon, request: Request) -> Any:
    """The request body is the image itself (PNG, JPEG, ... as ``image/*`` or
    ``application/octet-stream``), at most 16 MiB, with exactly one tag in it. Answers like
    ``POST /api/scan``."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (ctype.startswith("image/") or ctype == "application/octet-stream"):
        raise ApiError(415, "not_an_image", f"the body must be an image, not {ctype!r}",
                       "send the photo's bytes with Content-Type image/png or image/jpeg")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_IMAGE_UPLOAD:
            raise ApiError(413, "body_too_large",
                           f"the image is larger than {MAX_IMAGE_UPLOAD} bytes",
                           "send a smaller photo (a tag needs no more than a few hundred "
                           "pixels)")
    if not data:
        raise ApiError(400, "no_image", "the body is empty", "send the image's bytes")
    return await _scan(daemon, bytes(data))


@route("POST", "/api/messages", summary="Leave a message for the owner of a scanned thing",
       tag="things", status=201, request=MESSAGE_REQUEST,
       response={"type": "object", "required": ["thing", "sent"],
                 "properties": {"thing": {"type": "string"}, "sent": {"type": "boolean"}}},
       errors=NODE_ERRORS + (403,))
async def _message(daemon: Daemon, request: Request) -> Any:
    """What a finder does after reading the card: the message lands in the thing's inbox and
    the owner's devices are notified. Only the thing's card and this are open to a finder."""
    from p2pcloud.things import tags

    body = await json_body(request, MESSAGE_REQUEST)
    things = _things(daemon)

    async def send() -> Any:
        tag = tags.parse_tag(body["tag"].strip())
        await things.leave_message(tag, body["text"], body.get("contact", ""))
        return tag

    tag = await call("message", send)
    return {"thing": str(tag.hashname), "sent": True}


@route("GET", "/api/things/{thing}/inbox", params=THING_PARAMS,
       summary="Messages finders left", tag="things",
       response={"type": "object", "required": ["thing", "messages"],
                 "properties": {"thing": {"type": "string"},
                                "messages": {"type": "array", "items": {"type": "object"}}}},
       errors=(400, 404, 503))
async def _inbox(daemon: Daemon, request: Request) -> Any:
    """Oldest first: ``{id, from, text, contact, at_ms}`` each."""
    view = _find(daemon, request)
    return {"thing": _hashname(view), "messages": to_json(_things(daemon).inbox(view))}


@route("GET", "/api/things/{thing}/logs/{log}", params={
           **THING_PARAMS, "log": "readings, events, inbox, notices, or a log a rule appends "
           "to"}, summary="Records of one of a thing's logs", tag="things",
       query={"offset": ({"type": "integer", "minimum": 0}, "skip this many (default 0)"),
              "limit": ({"type": "integer", "minimum": 1, "maximum": MAX_LOG_PAGE},
                        f"at most this many (default {DEFAULT_LOG_PAGE})")},
       response={"type": "object", "required": ["thing", "log", "total", "records"],
                 "properties": {"thing": {"type": "string"}, "log": {"type": "string"},
                                "total": {"type": "integer"}, "offset": {"type": "integer"},
                                "records": {"type": "array"}}},
       errors=(400, 404, 503))
async def _log(daemon: Daemon, request: Request) -> Any:
    """Oldest first. ``total`` counts every record, so a reader pages with ``offset``."""
    view = _find(daemon, request)
    name = _key(request, "log")
    offset = _int_query(request, "offset", 0, 0, 10**9)
    limit = _int_query(request, "limit", DEFAULT_LOG_PAGE, 1, MAX_LOG_PAGE)
    try:
        records = daemon.node.subcloud(view.subcloud).log(name)
    except p2pcloud.SubCloudError as exc:
        raise ApiError(404, "unknown_thing", f"the thing's sub-cloud is gone: {exc}",
                       "list them with `p2pcloud thing ls`") from exc
    return {"thing": _hashname(view), "log": name, "total": len(records), "offset": offset,
            "records": to_json(records[offset:offset + limit])}


# -- rules --------------------------------------------------------------------------------


@route("GET", "/api/things/{thing}/rules", params=THING_PARAMS, summary="A thing's rules",
       tag="things", errors=(400, 404, 503),
       response={"type": "object", "required": ["thing", "rules"],
                 "properties": {"thing": {"type": "string"},
                                "rules": {"type": "array", "items": {"type": "object"}}}})
async def _rules(daemon: Daemon, request: Request) -> Any:
    """``{id, text, created_ms, enabled}`` each, with ``error`` for one that does not parse
    (written by a newer version)."""
    view = _find(daemon, request)
    return {"thing": _hashname(view), "rules": to_json(_things(daemon).rules(view))}


@route("POST", "/api/things/{thing}/rules", params=THING_PARAMS, summary="Add a rule",
       tag="things", status=201, request=RULE_REQUEST,
       response={"type": "object", "required": ["thing", "id", "text"],
                 "properties": {"thing": {"type": "string"}, "id": {"type": "string"},
                                "text": {"type": "string"}}},
       errors=SIMPLE_THING_ERRORS)
async def _add_rule(daemon: Daemon, request: Request) -> Any:
    """The rule is parsed first (400 ``bad_rule`` with the column when it does not) and then
    stored in the thing's sub-cloud; every owner device evaluates it, exactly one acts."""
    view = _find(daemon, request)
    body = await json_body(request, RULE_REQUEST)
    things = _things(daemon)
    rule_id = await call("rule", lambda: things.add_rule(view, body["text"]))
    return {"thing": _hashname(view), "id": str(rule_id), "text": body["text"]}


@route("DELETE", "/api/things/{thing}/rules/{rule}", params=THING_PARAMS,
       summary="Remove a rule", tag="things", status=204, response=None,
       errors=(400, 404, 409, 503))
async def _remove_rule(daemon: Daemon, request: Request) -> Any:
    """404 ``unknown_rule`` when the thing has no such rule."""
    view = _find(daemon, request)
    rule_id = _key(request, "rule")
    things = _things(daemon)
    if rule_id not in {r["id"] for r in things.rules(view)}:
        raise ApiError(404, "unknown_rule", f"the thing has no rule {rule_id!r}",
                       "list the rules with `p2pcloud thing rule ls THING`")
    await call("remove rule", lambda: things.remove_rule(view, rule_id))
    return None


# -- transfer -----------------------------------------------------------------------------


@route("POST", "/api/things/{thing}/transfer", params=THING_PARAMS,
       summary="Hand a thing on to another person's cloud", tag="things",
       request=TRANSFER_REQUEST,
       response={"type": "object", "required": ["thing", "transferred"],
                 "properties": {"thing": {"type": "string"}, "transferred": {"type": "boolean"},
                                "to": {"type": "string"}}},
       errors=NODE_ERRORS + (403,))
async def _transfer(daemon: Daemon, request: Request) -> Any:
    """The thing's history (or the chosen part) goes to the new owner's cloud; this cloud's
    access ends; the tag keeps working for the new owner."""
    view = _find(daemon, request)
    body = await json_body(request, TRANSFER_REQUEST)
    things = _things(daemon)
    await call("transfer", lambda: things.transfer(view, body["to"],
                                                   history=body.get("history", "all")))
    return {"thing": _hashname(view), "transferred": True, "to": body["to"]}


@route("POST", "/api/transfer-targets", summary="A transfer target: how someone hands a "
       "thing to this cloud", tag="things", status=201,
       response={"type": "object", "required": ["target", "expires_in"],
                 "properties": {"target": {"type": "string"},
                                "expires_in": {"type": "number"}}},
       errors=(409, 503))
async def _transfer_target(daemon: Daemon, request: Request) -> Any:
    """Give the text to the thing's current owner (`p2pcloud thing transfer THING TARGET`).
    It names this cloud, its members' keys, this device and a one-time secret; it works once,
    for an hour, while this daemon runs."""
    from p2pcloud._node.things import TARGET_TTL

    things = _things(daemon)
    try:
        target = things.transfer_target()
    except ThingError as exc:
        raise ApiError(409, "no_cloud", str(exc),
                       "found or join a cloud first (`p2pcloud cloud new`)") from exc
    return {"target": target, "expires_in": TARGET_TTL}


@route("POST", "/api/thing-invites", summary="Invite a smart thing to pair with the cloud",
       tag="things", status=201, request=THING_INVITE_REQUEST,
       response={"type": "object", "required": ["uri", "expires_in"],
                 "properties": {"uri": {"type": "string"}, "expires_in": {"type": "number"}}},
       errors=(400, 403, 409, 413, 415, 503))
async def _thing_invite(daemon: Daemon, request: Request) -> Any:
    """The smart thing runs `p2pcloud thing run --pair INVITE`: it joins with the role
    ``thing`` and a grant that names none of the cloud's sub-clouds (it reads nothing of the
    owner's); it writes only its own sub-cloud, as its owner. Admins only; works once."""
    body = await json_body(request, THING_INVITE_REQUEST)
    things = _things(daemon)
    expires_in = float(body.get("expires_in", 3600.0))
    try:
        uri = await things.invite_smart(expires_in=expires_in)
    except ThingError as exc:
        raise ApiError(409, "no_cloud", str(exc), "found one first: `p2pcloud cloud new`"
                       ) from exc
    except p2pcloud.LocalProtocolError as exc:
        raise ApiError(403, "not_admin", str(exc), "invite from an admin device") from exc
    return {"uri": uri, "expires_in": expires_in}


# -- thing events -------------------------------------------------------------------------

EVENT_TYPES = {
    "ThingCreated": "thing.created", "ThingChanged": "thing.changed",
    "MessageReceived": "thing.message", "OwnerNotified": "thing.notify",
}
"""Node event class -> daemon event type; any other event is ``thing.<snake_case name>``."""


def event_type(event: Any) -> str:
    """The daemon event type for a node thing event."""
    name = type(event).__name__
    if name in EVENT_TYPES:
        return EVENT_TYPES[name]
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower().removeprefix("thing_")
    return "thing." + snake


class _Coalescer:
    """Rate-limits ``thing.changed`` per thing: up to :data:`CHANGED_BURST` events of one
    thing go out at once within :data:`CHANGED_WINDOW`; beyond that, its changes are merged
    into one event when the window allows the next (a sync of 10,000 readings must not
    become 10,000 events that cut every stream off, while a claim right after a creation is
    still reported at once). Other thing events (created, message, notify) are never merged:
    each is news."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.sent: dict[str, deque[float]] = {}  # thing -> times of its last events
        self.pending: dict[str, set[str]] = {}  # thing -> collections changed since
        self.flags: dict[str, dict[str, Any]] = {}  # thing -> other fields (claimed...)
        self.wake = trio.Event()

    def _due(self, thing: str) -> float:
        """When ``thing`` may publish again (now or earlier: at once)."""
        times = self.sent.get(thing)
        if times is None or len(times) < CHANGED_BURST:
            return float("-inf")
        return times[0] + CHANGED_WINDOW

    def _publish(self, thing: str, data: dict[str, Any], now: float) -> None:
        if thing not in self.sent and len(self.sent) >= MAX_CHANGED_TRACKED:
            self.sent.clear()  # forgetting only lets a few more changes out at once
        self.sent.setdefault(thing, deque(maxlen=CHANGED_BURST)).append(now)
        self.daemon.events.publish("thing.changed", {"thing": thing, "data": data})

    def changed(self, thing: str, data: dict[str, Any]) -> None:
        now = trio.current_time()
        if thing not in self.pending and self._due(thing) <= now:
            self._publish(thing, data, now)
            return
        self.pending.setdefault(thing, set()).update(
            str(c) for c in data.get("collections", ()) if isinstance(c, str))
        self.flags.setdefault(thing, {}).update(
            {k: v for k, v in data.items() if k != "collections"})
        self.wake.set()

    async def run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            while self.pending:
                now = trio.current_time()
                due = min(self._due(h) for h in self.pending)
                if due > now:
                    await trio.sleep(due - now)
                    continue
                for thing in [h for h in self.pending if self._due(h) <= now]:
                    data = {"collections": sorted(self.pending.pop(thing)),
                            **self.flags.pop(thing, {})}
                    self._publish(thing, data, now)


async def background(daemon: Daemon) -> None:
    """Run for the daemon's lifetime: publish the node's thing events on the event hub
    (``thing.changed`` coalesced per thing, see :class:`_Coalescer`)."""
    things = getattr(daemon.node, "things", None)
    if things is None or not hasattr(things, "add_listener"):
        return
    coalescer = _Coalescer(daemon)

    def publish(event: Any) -> None:
        data = to_json(event)
        if not isinstance(data, dict):
            data = {"value": data}
        kind = event_type(event)
        if kind == "thing.changed":
            inner = data.get("data")
            coalescer.changed(str(data.get("thing", "")), inner if isinstance(inner, dict)
                              else {})
            return
        log.info("thing event type=%s thing=%s", kind, str(data.get("thing", ""))[:12])
        daemon.events.publish(kind, data)

    things.add_listener(publish)
    await coalescer.run()
