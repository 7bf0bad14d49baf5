"""API routes of the node capability: status, peers, links, statistics, shutdown.

Registered into :data:`p2pcloudd.api.REGISTRY` on import. The sub-cloud data capability
(put/get/ls/rm/watch/files) gets a module of its own beside this one.
"""

from __future__ import annotations

import os
from typing import Any

import trio
from starlette.requests import Request

import p2pcloud
from p2pcloudd.api import ApiError, json_body, route
from p2pcloudd.runtime import LINK_TIMEOUT, Daemon

PATH_SCHEMA: dict[str, Any] = {
    "type": ["object", "null"],
    "description": "a telehash v3 path: udp4/tcp4 with ip and port, or peer with hn (a router)",
    "properties": {
        "type": {"type": "string"}, "ip": {"type": "string"}, "port": {"type": "integer"},
        "hn": {"type": "string"}, "direct": {"type": "boolean"},
    },
}
STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["hashname", "link_uri", "ports", "uptime_s", "core_implementation", "version"],
    "properties": {
        "hashname": {"type": "string"},
        "link_uri": {"type": "string", "description": "give it to a peer: `p2pcloud link URI`"},
        "paths": {"type": "array", "items": PATH_SCHEMA},
        "ports": {"type": "object", "properties": {
            "udp": {"type": ["integer", "null"]}, "tcp": {"type": ["integer", "null"]},
            "api": {"type": ["integer", "null"]}}},
        "api_url": {"type": ["string", "null"]},
        "uptime_s": {"type": "number"},
        "started_at": {"type": "number", "description": "Unix time"},
        "pid": {"type": "integer"},
        "data_dir": {"type": "string"},
        "core_implementation": {"type": "string",
                                "description": "cython, python, or unavailable (why)"},
        "version": {"type": "string"},
        "links_up": {"type": "integer"},
    },
}
PEER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["hashname", "online", "path", "last_seen"],
    "properties": {
        "hashname": {"type": "string"},
        "online": {"type": "boolean", "description": "the link is Up now"},
        "path": PATH_SCHEMA,
        "last_seen": {"type": ["number", "null"],
                      "description": "Unix time the daemon last saw the link Up"},
        "uri": {"type": ["string", "null"],
                "description": "the link URI we linked with (null: the peer linked to us)"},
    },
}
MAX_URI = 4096  # bytes; a link URI with a handful of paths is a few hundred
LINK_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["uri"], "additionalProperties": False,
    "properties": {"uri": {"type": "string", "minLength": 1, "maxLength": MAX_URI,
                           "description": "link://host:port/?cs3a=...&paths=..."}},
}


@route("GET", "/api/status", summary="This node: hashname, link URI, ports, uptime, versions",
       tag="node", response=STATUS_SCHEMA)
async def _status(daemon: Daemon, request: Request) -> Any:
    """What `p2pcloud status` and `p2pcloud id` show."""
    return daemon.status()


@route("GET", "/api/peers", summary="Known peers: online, path in use, last seen", tag="node",
       response={"type": "object", "required": ["peers"],
                 "properties": {"peers": {"type": "array", "items": PEER_SCHEMA}}})
async def _peers(daemon: Daemon, request: Request) -> Any:
    """Online peers first, then by last seen. Known peers are remembered across restarts."""
    return {"peers": daemon.peers()}


@route("POST", "/api/links", summary="Link with an endpoint given its link URI", tag="node",
       request=LINK_REQUEST,
       response={"type": "object", "required": ["hashname", "path"],
                 "properties": {"hashname": {"type": "string"}, "path": PATH_SCHEMA}},
       errors=(400, 413, 415, 422, 502, 504))
async def _link(daemon: Daemon, request: Request) -> Any:
    """Answers once the link is Up (a handshake each way), or 504 after the mesh's 30 s."""
    body = await json_body(request, LINK_REQUEST)
    uri = body["uri"]
    try:
        hashname = await daemon.link(uri)
    except p2pcloud.BadURI as exc:
        raise ApiError(422, "bad_uri", f"not a link URI: {exc}",
                       "copy the peer's URI from `p2pcloud id` on that device") from exc
    except p2pcloud.LocalProtocolError as exc:
        raise ApiError(422, "cannot_link", str(exc), "link with another endpoint") from exc
    except p2pcloud.LinkError as exc:
        raise ApiError(502, "link_failed", str(exc),
                       "check that the peer's daemon runs and its address is reachable "
                       "(`p2pcloud doctor` there)") from exc
    except trio.TooSlowError as exc:
        raise ApiError(504, "link_timeout", f"no link within {LINK_TIMEOUT:.0f} s",
                       "check that the peer's daemon runs and its ports are reachable") from exc
    peers = {p["hashname"]: p for p in daemon.peers()}
    return {"hashname": hashname, "path": peers.get(hashname, {}).get("path")}


@route("GET", "/api/statistics", summary="Counters of the node, mesh, transports and daemon",
       tag="node", response={"type": "object", "required": ["node", "daemon"],
                             "properties": {"node": {"type": "object"},
                                            "daemon": {"type": "object"}}})
async def _statistics(daemon: Daemon, request: Request) -> Any:
    """The same body is published as a ``statistics`` event every statistics_interval."""
    return daemon.statistics()


@route("POST", "/api/shutdown", summary="Stop the daemon cleanly (what `p2pcloud down` does)",
       tag="node", status=202,
       response={"type": "object", "required": ["stopping"],
                 "properties": {"stopping": {"type": "boolean"}, "pid": {"type": "integer"}}})
async def _shutdown(daemon: Daemon, request: Request) -> Any:
    """Links are closed, state is saved and the process exits 0 shortly after the answer."""
    daemon.shutdown_requested.set()
    return {"stopping": True, "pid": os.getpid()}
