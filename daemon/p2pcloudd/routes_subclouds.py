"""API routes of the sub-cloud data capability: list/create, collections, documents, share.

Registered into :data:`p2pcloudd.api.REGISTRY` on import. A sub-cloud in a path (``{sc}``)
is its base32 id or its name (``node.subcloud(id_or_name)``). Writes answer once they are
durable (the SubCloud API returns only then).

Change events: :func:`background` (run by the API app for the daemon's lifetime) registers
one listener on the replication engine's ``change_listeners`` that publishes a ``change``
event ``{subcloud, name, collection, document, field, origin}`` on the daemon's event stream
for every change of any held sub-cloud, as the engine reports it (publishing never blocks;
a slow stream client is cut off by the hub and reconnects). No per-sub-cloud subscription
is held, so the engine stays free to unload idle replicas (a subscription pins one). A
sub-cloud shared with us by a peer (or created) is announced (``subcloud.added``) the moment
the engine reports it (its ``subcloud_listeners`` hook), or before its first change, or when
a route first names or lists it. Nothing polls.

``subcloud.added`` ``{subcloud, name, kind, owner}`` is published when a sub-cloud is
first followed (created here, shared with us, or already held when the daemon started).

Progress: ``sync.progress`` ``{subcloud, name, peers: [...]}`` is published whenever a
sub-cloud's per-peer progress (``SubCloud.progress()``: items and bytes still to send and
receive, blob bytes fetched) differs from the last one published. It is looked at every
:data:`PROGRESS_INTERVAL` while a sync moves (something pending, or within
:data:`PROGRESS_GRACE` of a change, link event or new sub-cloud, which is what starts one);
an idle daemon looks only every :data:`IDLE_PROGRESS_INTERVAL` (a safety net), so it stays
asleep (issue 7).

Synced folders (``/api/folders``) are remembered in the data dir (``folders.json``:
sub-cloud id and absolute path, written atomically when one is added) and re-added by
:func:`background` at start, so a restart (or a crash) does not stop a folder syncing; the
first reconcile picks up whatever changed on disk while the daemon was down. A remembered
folder that cannot be re-added (its directory is gone, its sub-cloud is no longer held) is
logged with a warning, listed under ``unavailable`` by ``GET /api/folders`` with the reason,
and kept in the file (the disk may only be unmounted); it never stops the daemon starting.
A damaged ``folders.json`` is logged as an error, moved aside (``folders.json.damaged``) and
a fresh one started.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import trio
from starlette.requests import Request

import p2pcloud
from p2pcloud._core import BlobRef
from p2pcloud.errors import AccessDenied, UnknownSubCloud
from p2pcloudd import datadir
from p2pcloudd.api import ApiError, json_body, route
from p2pcloudd.runtime import Daemon

log = logging.getLogger("p2pcloudd.subclouds")

MAX_NAME = 200  # characters of a sub-cloud name (the node's own limit)
MAX_KEY = 512  # characters of a collection/document id in a path; real ids are far shorter
KINDS = ["device", "thing", "cloud"]
MAX_PATH = 4096  # characters of a folder path: Linux's PATH_MAX
FILES_COLLECTION = "files"  # p2pcloud.files.COLLECTION (not imported: that loads watchfiles)
PROGRESS_INTERVAL = 0.5  # s between looks at sync progress while a sync moves
PROGRESS_GRACE = 5.0  # s of looking after a wake-up: a sync a change or link starts shows by then
IDLE_PROGRESS_INTERVAL = 15.0  # s between looks when idle (only a safety net; wakes are events)

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
PROGRESS_SCHEMA: dict[str, Any] = {
    "type": "object", "description": "what is still to move with one peer (SubCloud.progress)",
    "required": ["peer", "send_items", "send_bytes", "in_flight_bytes", "receive_items",
                 "receive_bytes", "blob_bytes_done", "blob_bytes_total"],
    "properties": {"peer": {"type": "string"}, **{k: {"type": "integer"} for k in (
        "send_items", "send_bytes", "in_flight_bytes", "receive_items", "receive_bytes",
        "blob_bytes_done", "blob_bytes_total")}},
}
FOLDER_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["subcloud", "name", "path", "files", "conflicts"],
    "properties": {
        "subcloud": {"type": "string"}, "name": {"type": "string"},
        "path": {"type": "string", "description": "the synced directory"},
        "files": {"type": "integer", "description": "files the sub-cloud holds"},
        "conflicts": {"type": "array", "items": {
            "type": "object", "required": ["path", "copy", "device"],
            "properties": {"path": {"type": "string"}, "copy": {"type": ["string", "null"]},
                           "device": {"type": "string"}}}},
    },
}
UNAVAILABLE_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["subcloud", "path", "reason"],
    "properties": {
        "subcloud": {"type": "string"}, "path": {"type": "string"},
        "reason": {"type": "string", "description": "why it is not synced now"},
    },
}
DETAIL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [*SUBCLOUD_SCHEMA["required"], "members", "collections", "peers", "folders"],
    "properties": {
        **SUBCLOUD_SCHEMA["properties"],
        "members": {"type": "array", "items": {
            "type": "object", "required": ["hashname", "rights", "owner", "self", "online"],
            "properties": {"hashname": {"type": "string"}, "rights": {"type": "string"},
                           "owner": {"type": "boolean"}, "self": {"type": "boolean"},
                           "online": {"type": "boolean"}}}},
        "collections": {"type": "array", "items": {
            "type": "object", "required": ["name", "documents"],
            "properties": {"name": {"type": "string"}, "documents": {"type": "integer"}}}},
        "peers": {"type": "array", "items": PROGRESS_SCHEMA},
        "folders": {"type": "array", "items": FOLDER_SCHEMA},
    },
}
FOLDER_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["subcloud", "path"], "additionalProperties": False,
    "properties": {"subcloud": {"type": "string", "description": "its id or name"},
                   "path": {"type": "string", "minLength": 1, "maxLength": MAX_PATH,
                            "description": "an absolute path of an existing directory"}},
}
PARAMS = {"sc": "the sub-cloud: its base32 id, or its name", "coll": "a collection name",
          "doc": "a document id"}
SC_ERRORS = (404,)
WRITE_ERRORS = (400, 403, 404, 413, 415, 500)


def _sc_json(daemon: Daemon, sc: Any) -> dict[str, Any]:
    return {"id": sc.id_text, "name": sc.name, "kind": sc.kind, "owner": sc.owner,
            "rights": sc.rights(daemon.node.hashname)}


def _progress_json(sc: Any) -> list[dict[str, Any]]:
    """``SubCloud.progress()`` as JSON rows, one per peer with a sync session, sorted."""
    rows = [{"peer": p.peer, "send_items": p.send_items, "send_bytes": p.send_bytes,
             "in_flight_bytes": p.in_flight_bytes, "receive_items": p.receive_items,
             "receive_bytes": p.receive_bytes, "blob_bytes_done": p.blob_bytes_done,
             "blob_bytes_total": p.blob_bytes_total} for p in sc.progress()]
    return sorted(rows, key=lambda r: str(r["peer"]))


def _folder_json(sc: Any, folder: Any) -> dict[str, Any]:
    conflicts = [{"path": c.path, "copy": c.copy, "device": c.device}
                 for c in folder.conflicts()]
    return {"subcloud": sc.id_text, "name": sc.name, "path": str(folder.root),
            "files": len(folder.replica.documents(FILES_COLLECTION)), "conflicts": conflicts}


def _detail(daemon: Daemon, sc: Any) -> dict[str, Any]:
    node = daemon.node
    up = node.links
    members = [{"hashname": sc.owner, "rights": "write", "owner": True}]
    members += [{"hashname": h, "rights": r, "owner": False}
                for h, r in sorted(sc.record.acl.items()) if h != sc.owner]
    for m in members:
        m["self"] = m["hashname"] == node.hashname
        m["online"] = m["self"] or m["hashname"] in up
    collections = [{"name": c, "documents": len(sc.documents(c))} for c in sc.collections()]
    return {**_sc_json(daemon, sc), "members": members, "collections": collections,
            "peers": _progress_json(sc), "folders": [_folder_json(sc, f) for f in sc.folders]}


def _find(daemon: Daemon, request: Request) -> Any:
    key = request.path_params["sc"]
    try:
        sc = daemon.node.subcloud(key)
    except UnknownSubCloud as exc:
        raise ApiError(404, "unknown_subcloud", f"no sub-cloud {key!r} here",
                       "list them with `p2pcloud sc ls`; a shared one appears once its owner "
                       "is linked") from exc
    _ensure_followed(daemon, sc)
    return sc


def _json_value(value: Any) -> Any:
    """A replica value as JSON: a blob reference is ``{"$blob": hex hash, "size": n}``,
    bytes are ``{"$bytes": base64}``, a multi-value register (concurrent values) a list.

    Synced folders store such values in their ``files`` collection; other apps may too.
    """
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, BlobRef):
        return {"$blob": bytes(value.hash).hex(), "size": value.size}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return str(value)


def _fields_json(fields: dict[str, Any] | None) -> dict[str, Any]:
    return {str(k): _json_value(v) for k, v in (fields or {}).items()}


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
    for sc in scs:
        _ensure_followed(daemon, sc)
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
    _ensure_followed(daemon, sc)  # its change events start now
    return _sc_json(daemon, sc)


@route("GET", "/api/subclouds/{sc}",
       params=PARAMS, summary="One sub-cloud: members, sync progress per peer, folders",
       tag="subclouds", errors=SC_ERRORS, response=DETAIL_SCHEMA)
async def _subcloud_detail(daemon: Daemon, request: Request) -> Any:
    """Everything the dashboard's sub-cloud view shows, in one answer."""
    sc = _find(daemon, request)
    return _detail(daemon, sc)


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
    return {"subcloud": sc.id_text, "collection": coll, "document": doc,
            "fields": _fields_json(fields)}


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
            "fields": _fields_json(sc.get(coll, doc))}


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


# -- synced folders -----------------------------------------------------------------------


@route("GET", "/api/folders", summary="The synced folders", tag="folders",
       response={"type": "object", "required": ["folders"],
                 "properties": {"folders": {"type": "array", "items": FOLDER_SCHEMA},
                                "unavailable": {"type": "array", "items": UNAVAILABLE_SCHEMA}}})
async def _list_folders(daemon: Daemon, request: Request) -> Any:
    """Every synced folder, with its conflicts; and the remembered folders that could not
    be re-added at start, with the reason (``unavailable``)."""
    return {"folders": [_folder_json(sc, f) for sc in daemon.node.subclouds()
                        for f in sc.folders],
            "unavailable": [{"subcloud": e.subcloud, "path": e.path, "reason": why}
                            for e, why in _remembered(daemon).unavailable.items()]}


@route("POST", "/api/folders", summary="Sync a directory with a sub-cloud", tag="folders",
       status=201, request=FOLDER_REQUEST, response=FOLDER_SCHEMA,
       errors=(400, 403, 404, 409, 413, 415))
async def _add_folder(daemon: Daemon, request: Request) -> Any:
    """The directory's files go into the sub-cloud's ``files`` collection and the
    sub-cloud's files onto the disk; it is watched from then on. Answers after the first
    full reconcile (contents from peers keep arriving afterwards: ``sync.progress``)."""
    body = await json_body(request, FOLDER_REQUEST)
    try:
        sc = daemon.node.subcloud(body["subcloud"])
    except UnknownSubCloud as exc:
        raise ApiError(404, "unknown_subcloud", f"no sub-cloud {body['subcloud']!r} here",
                       "list them with `p2pcloud sc ls`") from exc
    _ensure_followed(daemon, sc)
    root = Path(body["path"])
    if not root.is_absolute():
        raise ApiError(400, "bad_folder", f"{root} is not an absolute path",
                       "give the directory's full path")
    resolved = await trio.to_thread.run_sync(root.resolve)
    if not await trio.to_thread.run_sync(resolved.is_dir):
        raise ApiError(400, "bad_folder", f"{root} is not a directory",
                       "create it first (`mkdir -p`), then add it")
    if sc.rights(daemon.node.hashname) != "write":
        raise ApiError(403, "access_denied", f"no write rights to {sc.name!r}",
                       "ask the sub-cloud's owner for write rights (`p2pcloud share`)")
    remembered = _remembered(daemon)
    async with remembered.lock:  # one add at a time: no folder is added twice
        if any(f.root == resolved for f in sc.folders):
            raise ApiError(409, "folder_exists", f"{resolved} already syncs with {sc.name!r}",
                           "see `p2pcloud files ls`")
        try:
            folder = await sc.add_folder(resolved)
        except (OSError, p2pcloud.LocalProtocolError) as exc:
            raise ApiError(400, "bad_folder", f"cannot sync {resolved}: {exc}",
                           "check the directory and its permissions") from exc
        log.info("folder added subcloud=%s path=%s", sc.id_text, resolved)
        await remembered.remember(daemon, datadir.SyncedFolder(sc.id_text, str(resolved)))
    return _folder_json(sc, folder)


class _Remembered:
    """The synced folders one daemon keeps in ``folders.json`` (module docstring)."""

    def __init__(self) -> None:
        self.lock = trio.Lock()  # held while a folder is added or re-added
        self.entries: list[datadir.SyncedFolder] = []  # as in the file
        self.unavailable: dict[datadir.SyncedFolder, str] = {}  # not re-added -> why

    async def remember(self, daemon: Daemon, entry: datadir.SyncedFolder) -> None:
        """Add ``entry`` to ``folders.json`` (durable before this returns)."""
        self.unavailable.pop(entry, None)
        if entry in self.entries:
            return
        self.entries.append(entry)
        try:
            await trio.to_thread.run_sync(datadir.save_folders, daemon.data_dir,
                                          list(self.entries))
        except OSError as exc:
            log.error("cannot save synced folders file=%s error=%r: this folder is synced "
                      "now but not after a restart", datadir.FOLDERS_FILE, str(exc))

    async def restore(self, daemon: Daemon) -> None:
        """Re-add every remembered folder; one that cannot be is logged and kept."""
        async with self.lock:
            try:
                self.entries = await trio.to_thread.run_sync(datadir.load_folders,
                                                             daemon.data_dir)
            except datadir.DataDirError as exc:
                path = daemon.data_dir / datadir.FOLDERS_FILE
                aside = path.with_name(path.name + ".damaged")
                try:
                    await trio.to_thread.run_sync(path.replace, aside)
                except OSError as move_exc:
                    log.error("synced folders not restored: %s; and it cannot be moved "
                              "aside (%s): folders added now are not remembered", exc,
                              move_exc.strerror)
                    return
                log.error("synced folders not restored: %s; moved aside to %s (add the "
                          "folders again with `p2pcloud files add`)", exc, aside)
                return
            for entry in self.entries:
                why = await self._readd(daemon, entry)
                if why is not None:
                    self.unavailable[entry] = why
                    log.warning("synced folder not re-added subcloud=%s path=%s reason=%r "
                                "(kept in %s)", entry.subcloud, entry.path, why,
                                datadir.FOLDERS_FILE)

    async def _readd(self, daemon: Daemon, entry: datadir.SyncedFolder) -> str | None:
        """Re-add one folder; returns why it could not be (None: it syncs again)."""
        try:
            sc = daemon.node.subcloud(entry.subcloud)
        except UnknownSubCloud:
            return "the sub-cloud is no longer held here"
        root = Path(entry.path)
        if not await trio.to_thread.run_sync(root.is_dir):
            return "the directory no longer exists"
        if any(f.root == root for f in sc.folders):
            return None
        _ensure_followed(daemon, sc)
        try:
            await sc.add_folder(root)
        except (OSError, p2pcloud.P2PCloudError) as exc:
            return f"cannot sync it: {exc}"
        log.info("folder re-added subcloud=%s path=%s", entry.subcloud, entry.path)
        return None


def _remembered(daemon: Daemon) -> _Remembered:
    remembered = _REMEMBERED.get(id(daemon))
    if remembered is None:
        remembered = _REMEMBERED[id(daemon)] = _Remembered()
    return remembered


# -- change events ------------------------------------------------------------------------


class _Followers:
    """The sub-clouds one daemon announced (``subcloud.added``) and publishes changes of."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.following: set[bytes] = set()

    def ensure(self, sc: Any) -> None:
        """Announce ``sc`` once (``subcloud.added``); its changes are published from then on
        (every held sub-cloud's are: see :meth:`changed`)."""
        if sc.id in self.following:
            return
        self.following.add(sc.id)
        self.daemon.events.publish("subcloud.added", {
            "subcloud": sc.id_text, "name": sc.name, "kind": sc.kind, "owner": sc.owner})

    def changed(self, sc: Any, changes: list[Any]) -> None:
        """The engine's change listener: one ``change`` event per change, in order."""
        self.ensure(sc)  # announced before its first change event
        for change in changes:
            self.daemon.events.publish("change", {
                "subcloud": sc.id_text, "name": sc.name,
                "collection": change.collection, "document": change.document,
                "field": change.field, "origin": change.origin,
            })


def _ensure_followed(daemon: Daemon, sc: Any) -> None:
    followers = _FOLLOWERS.get(id(daemon))
    if followers is not None:
        followers.ensure(sc)


def _moving(peers: list[dict[str, Any]]) -> bool:
    """Whether a progress picture shows a sync under way (anything left to move)."""
    return any(p["send_items"] or p["send_bytes"] or p["in_flight_bytes"] or p["receive_items"]
               or p["receive_bytes"] or p["blob_bytes_done"] != p["blob_bytes_total"]
               for p in peers)


class _Wake:
    """A wake-up flag the node's hooks set (they run synchronously: only set it here)."""

    def __init__(self) -> None:
        self.event = trio.Event()

    def set(self, *_: Any) -> None:
        self.event.set()


async def _report_progress(daemon: Daemon, wake: _Wake) -> None:
    """Publish ``sync.progress`` for a sub-cloud whenever its per-peer progress changed.

    An unchanged picture is not published again, so an idle daemon publishes nothing and
    the last event of a sync says all is done. Looked at every :data:`PROGRESS_INTERVAL`
    while a sync moves or within :data:`PROGRESS_GRACE` of a wake-up, else every
    :data:`IDLE_PROGRESS_INTERVAL` or at the next wake-up (see the module docstring).
    """
    last: dict[bytes, list[dict[str, Any]]] = {}
    busy_until = trio.current_time() + PROGRESS_GRACE
    while True:
        if wake.event.is_set():
            wake.event = trio.Event()
            busy_until = trio.current_time() + PROGRESS_GRACE
        moving = False
        for sc in daemon.node.subclouds():
            peers = _progress_json(sc)
            moving = moving or _moving(peers)
            if peers != last.get(sc.id, []):
                last[sc.id] = peers
                daemon.events.publish("sync.progress", {
                    "subcloud": sc.id_text, "name": sc.name, "peers": peers})
        if moving or trio.current_time() < busy_until:
            await trio.sleep(PROGRESS_INTERVAL)
        else:
            with trio.move_on_after(IDLE_PROGRESS_INTERVAL):
                await wake.event.wait()


async def background(daemon: Daemon) -> None:
    """Run for the daemon's lifetime: follow every held sub-cloud's changes (see the module
    docstring), and :func:`_report_progress`. Woken by the node's hooks only: new
    sub-clouds (``replication.subcloud_listeners``), changes (``change_listeners``) and
    link events (``node.add_link_listener``)."""
    node = daemon.node
    engine = node.replication
    wake = _Wake()
    async with trio.open_nursery() as nursery:
        followers = _FOLLOWERS[id(daemon)] = _Followers(daemon)

        def added(sc: Any) -> None:
            followers.ensure(sc)
            wake.set()

        def changed(sc: Any, changes: list[Any]) -> None:
            followers.changed(sc, changes)
            wake.set()

        if engine is not None:
            engine.subcloud_listeners.append(added)
            engine.change_listeners.append(changed)
        # a link up or down starts or ends sync sessions (a path change moves nothing)
        node.add_link_listener(lambda _h, what: wake.set() if what != "path" else None)
        try:
            for sc in node.subclouds():
                followers.ensure(sc)
            nursery.start_soon(_report_progress, daemon, wake)
            nursery.start_soon(_remembered(daemon).restore, daemon)
            await trio.sleep_forever()
        finally:
            if engine is not None:
                engine.subcloud_listeners.remove(added)
                engine.change_listeners.remove(changed)
            _FOLLOWERS.pop(id(daemon), None)
            _REMEMBERED.pop(id(daemon), None)


_FOLLOWERS: dict[int, _Followers] = {}  # id(daemon) -> its followers, while the app runs
_REMEMBERED: dict[int, _Remembered] = {}  # id(daemon) -> its remembered synced folders
