"""API routes of the sub-cloud data capability: list/create, collections, documents, share.

Registered into :data:`p2pcloudd.api.REGISTRY` on import. A sub-cloud in a path (``{sc}``)
is its base32 id or its name (``node.subcloud(id_or_name)``). Writes answer once they are
durable (the SubCloud API returns only then).

Change events: :func:`background` (run by the API app for the daemon's lifetime) keeps one
task per held sub-cloud, subscribed to its changes, that publishes a ``change`` event
``{subcloud, name, collection, document, field, origin}`` on the daemon's event stream for
every change the subscription reports. It looks for new sub-clouds every
:data:`SUBCLOUD_POLL_INTERVAL` (created here, or shared with us by a peer): the node has no
"sub-cloud added" hook, so a sub-cloud's first changes after it appears may be missed by at
most that interval.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from starlette.requests import Request

import p2pcloud
from p2pcloud.errors import AccessDenied, SubscriptionLost, UnknownSubCloud
from p2pcloudd.api import ApiError, json_body, route
from p2pcloudd.runtime import Daemon

log = logging.getLogger("p2pcloudd.subclouds")

SUBCLOUD_POLL_INTERVAL = 0.5  # s; how late a newly held sub-cloud's change events may start
MAX_NAME = 200  # characters of a sub-cloud name (the node's own limit)
MAX_KEY = 512  # characters of a collection/document id in a path; real ids are far shorter
KINDS = ["device", "thing", "cloud"]

SUBCLOUD_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["id", "name", "kind", "owner"],
    "properties": {
        "id": {"type": "string", "description": "base32 sub-cloud id"},
        "name": {"type": "string"}, "kind": {"type": "string", "enum": KINDS},
        "owner": {"type": "string", "description": "the owner's hashname"},
        "rights": {"type": ["string", "null"], "description": "ours: write, read or null"},
    },
}
CREATE_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["name"], "additionalProperties": False,
    "properties": {"name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME},
                   "kind": {"type": "string", "enum": KINDS}},
}
SHARE_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["hashname", "rights"], "additionalProperties": False,
    "properties": {"hashname": {"type": "string", "minLength": 52, "maxLength": 52},
                   "rights": {"type": ["string", "null"], "enum": ["read", "write", None],
                              "description": "null removes the endpoint's rights"}},
}
DOC_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["subcloud", "collection", "document", "fields"],
    "properties": {"subcloud": {"type": "string"}, "collection": {"type": "string"},
                   "document": {"type": "string"},
                   "fields": {"type": "object", "description": "field -> JSON value"}},
}
FIELDS_REQUEST: dict[str, Any] = {
    "type": "object", "description": "the fields to write (last-writer-wins each)",
}
PARAMS = {"sc": "the sub-cloud: its base32 id, or its name", "coll": "a collection name",
          "doc": "a document id"}
SC_ERRORS = (404,)
WRITE_ERRORS = (400, 403, 404, 413, 415, 500)


def _sc_json(daemon: Daemon, sc: Any) -> dict[str, Any]:
    return {"id": sc.id_text, "name": sc.name, "kind": sc.kind, "owner": sc.owner,
            "rights": sc.rights(daemon.node.hashname)}


def _find(daemon: Daemon, request: Request) -> Any:
    key = request.path_params["sc"]
    try:
        return daemon.node.subcloud(key)
    except UnknownSubCloud as exc:
        raise ApiError(404, "unknown_subcloud", f"no sub-cloud {key!r} here",
                       "list them with `p2pcloud sc ls`; a shared one appears once its owner "
                       "is linked") from exc


def _names(request: Request) -> tuple[str, str]:
    coll, doc = request.path_params["coll"], request.path_params.get("doc", "")
    for part in (coll, doc):
        if len(part) > MAX_KEY:
            raise ApiError(400, "bad_name", f"a name is longer than {MAX_KEY} characters",
                           "use shorter collection and document ids")
    return coll, doc


async def _write(what: str, call: Any) -> None:
    try:
        await call()
    except AccessDenied as exc:
        raise ApiError(403, "access_denied", f"{what}: {exc}",
                       "ask the sub-cloud's owner for write rights (`p2pcloud share`)") from exc
    except (p2pcloud.CoreUsageError, p2pcloud.LocalProtocolError) as exc:
        raise ApiError(400, "bad_value", f"{what}: {exc}", "check the names and values") from exc
    except p2pcloud.StoreError as exc:
        raise ApiError(500, "store_failed", f"{what}: {exc}",
                       "nothing changed; check the data dir's disk") from exc


@route("GET", "/api/subclouds", summary="The sub-clouds this node holds", tag="subclouds",
       response={"type": "object", "required": ["subclouds"],
                 "properties": {"subclouds": {"type": "array", "items": SUBCLOUD_SCHEMA}}})
async def _list_subclouds(daemon: Daemon, request: Request) -> Any:
    """Owned ones and the ones peers shared with us, by name."""
    scs = sorted(daemon.node.subclouds(), key=lambda s: (s.name, s.id_text))
    return {"subclouds": [_sc_json(daemon, s) for s in scs]}


@route("POST", "/api/subclouds", summary="Create a sub-cloud owned by this node",
       tag="subclouds", status=201, request=CREATE_REQUEST, response=SUBCLOUD_SCHEMA,
       errors=(400, 413, 415))
async def _create_subcloud(daemon: Daemon, request: Request) -> Any:
    """Durable when it answers; ``kind`` defaults to ``device``."""
    body = await json_body(request, CREATE_REQUEST)
    try:
        sc = await daemon.node.create_subcloud(body["name"], body.get("kind", "device"))
    except p2pcloud.LocalProtocolError as exc:
        raise ApiError(400, "bad_subcloud", str(exc), "choose another name or kind") from exc
    wake = _WAKE.get(id(daemon))
    if wake is not None:
        wake.set()  # start its change events now
    return _sc_json(daemon, sc)


@route("GET", "/api/subclouds/{sc}/collections",
       params=PARAMS, summary="A sub-cloud's non-empty collections",
       tag="subclouds", errors=SC_ERRORS,
       response={"type": "object", "required": ["subcloud", "collections"],
                 "properties": {"subcloud": {"type": "string"},
                                "collections": {"type": "array", "items": {"type": "string"}}}})
async def _collections(daemon: Daemon, request: Request) -> Any:
    """Sorted names."""
    sc = _find(daemon, request)
    return {"subcloud": sc.id_text, "collections": sc.collections()}


@route("POST", "/api/subclouds/{sc}/share",
       params=PARAMS, summary="Give an endpoint read or write rights",
       tag="subclouds", request=SHARE_REQUEST, errors=(400, 403, 404, 413, 415),
       response={"type": "object", "required": ["subcloud", "hashname", "rights"],
                 "properties": {"subcloud": {"type": "string"}, "hashname": {"type": "string"},
                                "rights": {"type": ["string", "null"]}}})
async def _share(daemon: Daemon, request: Request) -> Any:
    """Owner only (403 otherwise); the peer receives the sub-cloud once linked."""
    sc = _find(daemon, request)
    body = await json_body(request, SHARE_REQUEST)
    try:
        await sc.share(body["hashname"], body["rights"])
    except AccessDenied as exc:
        raise ApiError(403, "access_denied", str(exc),
                       "only the sub-cloud's owner shares it") from exc
    except p2pcloud.LocalProtocolError as exc:
        raise ApiError(400, "bad_share", str(exc), "check the hashname (`p2pcloud peers`)") from exc
    return {"subcloud": sc.id_text, "hashname": body["hashname"], "rights": body["rights"]}


@route("GET", "/api/subclouds/{sc}/{coll}",
       params=PARAMS, summary="The document ids of a collection",
       tag="subclouds", errors=(400, 404),
       response={"type": "object", "required": ["subcloud", "collection", "documents"],
                 "properties": {"subcloud": {"type": "string"}, "collection": {"type": "string"},
                                "documents": {"type": "array", "items": {"type": "string"}}}})
async def _documents(daemon: Daemon, request: Request) -> Any:
    """Sorted; an empty or unknown collection has none."""
    sc = _find(daemon, request)
    coll, _ = _names(request)
    return {"subcloud": sc.id_text, "collection": coll, "documents": sc.documents(coll)}


@route("GET", "/api/subclouds/{sc}/{coll}/{doc}",
       params=PARAMS, summary="One document's fields",
       tag="subclouds", errors=(400, 404), response=DOC_SCHEMA)
async def _get_document(daemon: Daemon, request: Request) -> Any:
    """404 ``unknown_document`` when it is absent (never written, or deleted)."""
    sc = _find(daemon, request)
    coll, doc = _names(request)
    fields = sc.get(coll, doc)
    if fields is None:
        raise ApiError(404, "unknown_document", f"no document {coll}/{doc} in {sc.name!r}",
                       f"list the documents with `p2pcloud ls {sc.id_text} {coll}`")
    return {"subcloud": sc.id_text, "collection": coll, "document": doc, "fields": fields}


@route("PUT", "/api/subclouds/{sc}/{coll}/{doc}",
       params=PARAMS, summary="Write fields of a document",
       tag="subclouds", request=FIELDS_REQUEST, errors=WRITE_ERRORS, response=DOC_SCHEMA)
async def _put_document(daemon: Daemon, request: Request) -> Any:
    """The body's fields are written in one transaction; durable when it answers. Fields
    not named keep their values. Answers with the whole document after the write."""
    sc = _find(daemon, request)
    coll, doc = _names(request)
    fields = await json_body(request, FIELDS_REQUEST)
    if not fields:
        raise ApiError(400, "no_fields", "the body names no field", 'send {"field": value}')
    await _write(f"put {coll}/{doc}", lambda: sc.put(coll, doc, fields))
    return {"subcloud": sc.id_text, "collection": coll, "document": doc,
            "fields": sc.get(coll, doc) or {}}


@route("DELETE", "/api/subclouds/{sc}/{coll}/{doc}",
       params=PARAMS, summary="Remove a document",
       tag="subclouds", status=204, response=None, errors=(400, 403, 404, 500))
async def _delete_document(daemon: Daemon, request: Request) -> Any:
    """404 ``unknown_document`` when it is absent; durable when it answers."""
    sc = _find(daemon, request)
    coll, doc = _names(request)
    if sc.get(coll, doc) is None:
        raise ApiError(404, "unknown_document", f"no document {coll}/{doc} in {sc.name!r}",
                       f"list the documents with `p2pcloud ls {sc.id_text} {coll}`")
    await _write(f"delete {coll}/{doc}", lambda: sc.delete(coll, doc))
    return None


# -- change events ------------------------------------------------------------------------


async def _follow(daemon: Daemon, sc: Any) -> None:
    """Publish a ``change`` event for every change of ``sc``; resubscribe when lost."""
    while True:
        try:
            async with sc.subscribe() as changes:
                async for change in changes:
                    daemon.events.publish("change", {
                        "subcloud": sc.id_text, "name": sc.name,
                        "collection": change.collection, "document": change.document,
                        "field": change.field, "origin": change.origin,
                    })
            return
        except SubscriptionLost:
            # We fell behind: readers re-read the state on this event.
            log.warning("change events lost subcloud=%s", sc.id_text)
            daemon.events.publish("change.lost", {"subcloud": sc.id_text, "name": sc.name})


async def background(daemon: Daemon) -> None:
    """Run for the daemon's lifetime: one :func:`_follow` task per held sub-cloud."""
    following: set[bytes] = set()
    async with trio.open_nursery() as nursery:
        try:
            while True:
                wake = _WAKE[id(daemon)] = trio.Event()
                for sc in daemon.node.subclouds():
                    if sc.id not in following:
                        following.add(sc.id)
                        nursery.start_soon(_follow, daemon, sc)
                # A sub-cloud created through the API wakes us at once; shared ones are
                # found by the poll.
                with trio.move_on_after(SUBCLOUD_POLL_INTERVAL):
                    await wake.wait()
        finally:
            _WAKE.pop(id(daemon), None)


_WAKE: dict[int, trio.Event] = {}  # id(daemon) -> set it to look for new sub-clouds now
