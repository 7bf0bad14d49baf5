"""The daemon's local HTTP API: a Starlette ASGI app served by hypercorn's Trio worker.

Theory of operation
-------------------
Routes are declared once, in a :class:`Registry`, with their method, path, summary, request
and response JSON Schemas, status codes and auth; the Starlette routing table **and** the
OpenAPI 3.1 description (``GET /api/openapi.json``) are both generated from that registry,
so the description cannot drift from the code. Each capability has its own route module that
registers into :data:`REGISTRY` when imported: :mod:`p2pcloudd.routes_node` (status, peers,
links, statistics, shutdown) and :mod:`p2pcloudd.routes_subclouds` (sub-clouds, documents,
sharing, ``change`` events).

Every request passes :class:`_Guard` first: the ``Host`` header must name a loopback host
when the API listens on loopback (a DNS-rebinding page cannot talk to it), and responses get
no-store / nosniff / no-referrer / CSP headers. Then each route's wrapper checks auth:

* ``Authorization: Bearer <token>`` with the token from the data dir's ``api-token``
  (constant-time compare), for the CLI and scripts;
* or the dashboard's ``p2pcloud_session`` cookie (HttpOnly, SameSite=Strict), obtained by
  redeeming a one-time login code (``GET /login?code=``, minted by a token holder with
  ``POST /api/login-codes``, which is what ``p2pcloud dashboard`` does) or by posting the
  token once to ``POST /login``. State-changing requests authenticated by the cookie must
  also carry a same-origin ``Origin`` header.

Errors always have the body ``{"error": {"code", "message", "hint"}}`` and a proper status.
``GET /api/events`` is a server-sent event stream fed by :class:`p2pcloudd.events.EventHub`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import p2pcloud
from p2pcloudd.config import is_loopback
from p2pcloudd.events import MAX_SUBSCRIBERS, EventPublished, TooManySubscribers
from p2pcloudd.runtime import LOGIN_CODE_TTL, SESSION_TTL, Daemon

log = logging.getLogger("p2pcloudd.api")

STATIC_DIR = Path(__file__).resolve().parent / "static"
SESSION_COOKIE = "p2pcloud_session"
MAX_BODY = 64 * 1024  # bytes of a JSON request body; the largest real one is a link URI
SSE_KEEPALIVE = 15.0  # s between SSE comments, so proxies and browsers keep the stream open
SSE_RETRY_MS = 2000  # how soon a browser's EventSource reconnects after a cut
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

Handler = Callable[[Daemon, Request], Awaitable[Any]]

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "hint"],
            "properties": {
                "code": {"type": "string", "description": "stable, machine-readable"},
                "message": {"type": "string", "description": "what went wrong"},
                "hint": {"type": "string", "description": "what to do next"},
            },
        }
    },
}
STATUS_TEXT = {
    200: "OK", 201: "Created", 202: "Accepted", 204: "No content", 303: "See other",
    400: "Bad request", 401: "Not authenticated",
    403: "Forbidden: the Host is not loopback, or a dashboard request came cross-origin",
    404: "Not found",
    405: "Method not allowed", 413: "Body too large", 415: "Unsupported media type",
    422: "Unprocessable", 500: "The daemon failed", 502: "The peer failed",
    503: "Unavailable", 504: "Timed out",
}


class ApiError(Exception):
    """An error answer: status, stable code, message and hint (what to do next)."""

    def __init__(self, status: int, code: str, message: str, hint: str = "") -> None:
        """Describe the error the client gets."""
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.hint = hint

    def response(self) -> JSONResponse:
        """The JSON error response."""
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return error_response(self.status, self.code, self.message, self.hint, headers)


def error_response(
    status: int, code: str, message: str, hint: str = "", headers: dict[str, str] | None = None
) -> JSONResponse:
    """A response with the error body ``{"error": {"code", "message", "hint"}}``."""
    body = {"error": {"code": code, "message": message, "hint": hint}}
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass(frozen=True)
class ApiRoute:
    """One route of the API, as the registry holds it.

    Attributes:
        method: HTTP method.
        path: URL path (Starlette syntax).
        name: the OpenAPI operationId.
        handler: ``await handler(daemon, request)`` returns a JSON value or a Response.
        summary: one line for the OpenAPI description.
        tag: the capability it belongs to (``node``, ``events``, ``dashboard``...).
        response: JSON Schema of the success body (None: no body).
        request: JSON Schema of the JSON request body (None: no body).
        status: success status.
        errors: the error statuses it may answer (401 is added for authed routes).
        auth: needs the token or a dashboard session.
        media: the success body's media type.
        query: query parameters as ``{name: (schema, description)}``.
        params: descriptions of the path's ``{parameters}``, by name.
    """

    method: str
    path: str
    name: str
    handler: Handler
    summary: str
    tag: str
    response: dict[str, Any] | None
    request: dict[str, Any] | None = None
    status: int = 200
    errors: tuple[int, ...] = ()
    auth: bool = True
    media: str = "application/json"
    query: dict[str, tuple[dict[str, Any], str]] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)


class Registry:
    """Routes of the API; capability modules add theirs with :meth:`route`."""

    def __init__(self) -> None:
        """An empty registry."""
        self.routes: list[ApiRoute] = []

    def route(self, method: str, path: str, **kwargs: Any) -> Callable[[Handler], Handler]:
        """Register the decorated handler as ``method path`` (see :class:`ApiRoute`)."""

        def decorate(handler: Handler) -> Handler:
            if any(r.method == method and r.path == path for r in self.routes):
                raise ValueError(f"route {method} {path} registered twice")
            self.routes.append(
                ApiRoute(method=method, path=path, name=handler.__name__.lstrip("_"),
                         handler=handler, **kwargs)
            )
            return handler

        return decorate


REGISTRY = Registry()
route = REGISTRY.route

CAPABILITIES = ("p2pcloudd.routes_node", "p2pcloudd.routes_subclouds",
                "p2pcloudd.routes_things", "p2pcloudd.routes_cloud")
"""Route modules, one per capability. A module may also define ``async def
background(daemon)``: it runs for the API app's lifetime (started at startup, cancelled at
shutdown), e.g. to publish the capability's events."""


# -- request helpers ----------------------------------------------------------------------


async def json_body(request: Request, schema: dict[str, Any]) -> dict[str, Any]:
    """Read and validate a JSON request body.

    Raises:
        ApiError: 415 not JSON, 413 too large, 400 does not parse or fails the schema.
    """
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, "not_json", f"the body must be application/json, not {ctype!r}",
                       "send Content-Type: application/json with a JSON object")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(413, "body_too_large", f"the body is larger than {MAX_BODY} bytes",
                           "send a smaller request")
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise ApiError(400, "bad_json", f"the body is not JSON: {exc}",
                       "send a JSON object") from exc
    validate(schema, value, "body")
    assert isinstance(value, dict)
    return value


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
    "integer": (int,), "number": (int, float), "null": (type(None),),
}


def validate(schema: dict[str, Any], value: Any, where: str) -> None:
    """Check ``value`` against the JSON Schema subset the routes use.

    Supports type, properties, required, additionalProperties (false), enum, minLength,
    maxLength, minimum, maximum and items.

    Raises:
        ApiError: 400 with the place that failed.
    """
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        ok = any(
            isinstance(value, _JSON_TYPES[n])
            and not (n in ("integer", "number") and isinstance(value, bool))
            for n in names
        )
        if not ok:
            _bad(where, f"must be {' or '.join(names)}")
    if "enum" in schema and value not in schema["enum"]:
        _bad(where, f"must be one of {schema['enum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            _bad(where, "is too short")
        if len(value) > schema.get("maxLength", MAX_BODY):
            _bad(where, "is too long")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            _bad(where, f"must be at least {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            _bad(where, f"must be at most {schema['maximum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                _bad(f"{where}.{key}", "is required")
        for key, item in value.items():
            if key in props:
                validate(props[key], item, f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                _bad(f"{where}.{key}", "is not a known field")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            validate(schema["items"], item, f"{where}[{i}]")


def _bad(where: str, what: str) -> None:
    raise ApiError(400, "invalid_body", f"{where} {what}", "see /api/openapi.json for the schema")


# -- auth and the per-route wrapper -------------------------------------------------------


def _authenticate(daemon: Daemon, request: Request) -> None:
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise ApiError(401, "bad_auth_header",
                           "the Authorization header is not 'Bearer <token>'",
                           "send Authorization: Bearer <the token in DATA_DIR/api-token>")
        if not daemon.check_token(presented.strip()):
            raise ApiError(401, "bad_token", "the API token is wrong",
                           "use the token in this daemon's DATA_DIR/api-token (the CLI does)")
        return
    session = request.cookies.get(SESSION_COOKIE)
    if session is not None:
        if not daemon.check_session(session):
            raise ApiError(401, "session_expired", "the dashboard session is not valid",
                           "log in again: run `p2pcloud dashboard`")
        if request.method in UNSAFE_METHODS:
            origin = request.headers.get("origin")
            expected = f"{request.url.scheme}://{request.headers.get('host', '')}"
            if origin != expected:
                raise ApiError(403, "cross_origin", "a dashboard request came from another origin",
                               "use the dashboard served by the daemon itself")
        return
    raise ApiError(401, "unauthorized", "this request carries no API token",
                   "send Authorization: Bearer <the token in DATA_DIR/api-token>, or open the "
                   "dashboard with `p2pcloud dashboard`")


def _endpoint(daemon: Daemon, spec: ApiRoute) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            if spec.auth:
                _authenticate(daemon, request)
            result = await spec.handler(daemon, request)
        except ApiError as exc:
            if exc.status >= 500 or exc.status == 401:
                log.info("api error method=%s path=%s status=%d code=%s", request.method,
                         request.url.path, exc.status, exc.code)
            return exc.response()
        except Exception:
            # A bug, not a client error: log it whole, answer with the usual error body.
            log.exception("api bug method=%s path=%s", request.method, request.url.path)
            return error_response(500, "internal_error", "the daemon failed on this request",
                                  "see the daemon's log (p2pcloudd.log in the data dir)")
        if isinstance(result, Response):
            return result
        if result is None:
            return Response(status_code=spec.status)
        return JSONResponse(result, status_code=spec.status)

    return endpoint


# -- the OpenAPI description --------------------------------------------------------------


def openapi(registry: Registry = REGISTRY) -> dict[str, Any]:
    """The OpenAPI 3.1 description of every registered route."""
    paths: dict[str, dict[str, Any]] = {}
    for spec in registry.routes:
        op: dict[str, Any] = {
            "operationId": spec.name,
            "summary": spec.summary,
            "tags": [spec.tag],
            "responses": {},
        }
        if spec.handler.__doc__:
            op["description"] = spec.handler.__doc__.strip()
        if not spec.auth:
            op["security"] = []
        # Path parameters (``{sc}``) come from the path itself; ``params`` describes them.
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"},
             "description": spec.params.get(name, "")}
            for name in re.findall(r"\{([A-Za-z_]\w*)(?::\w+)?\}", spec.path)
        ] + [
            {"name": name, "in": "query", "required": False, "schema": schema,
             "description": text}
            for name, (schema, text) in spec.query.items()
        ]
        if parameters:
            op["parameters"] = parameters
        if spec.request is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": spec.request}},
            }
        ok: dict[str, Any] = {"description": STATUS_TEXT.get(spec.status, "OK")}
        if spec.response is not None:
            ok["content"] = {spec.media: {"schema": spec.response}}
        op["responses"][str(spec.status)] = ok
        # Every route may answer 403 (a non-loopback Host, or a cross-origin dashboard
        # request) and every authenticated one 401.
        errors = set(spec.errors) | {403} | ({401} if spec.auth else set())
        for status in sorted(errors):
            op["responses"][str(status)] = {
                "description": STATUS_TEXT.get(status, "Error"),
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
        paths.setdefault(spec.path, {})[spec.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "p2pcloudd local API",
            "version": p2pcloud.__version__,
            "description": "The local HTTP API of the p2pcloud daemon (docs/daemon.md). "
            "Every route but the dashboard login needs the bearer token from the data dir's "
            "api-token file, or a dashboard session cookie.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"session": []}],
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR_SCHEMA},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "the token in DATA_DIR/api-token"},
                "session": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE,
                            "description": "a dashboard session (see GET /login)"},
            },
        },
    }


# -- routes of the API itself: description, events, dashboard login ----------------------


@route("GET", "/api/openapi.json", summary="This API's OpenAPI 3.1 description", tag="meta",
       response={"type": "object", "required": ["openapi", "paths"]})
async def _openapi(daemon: Daemon, request: Request) -> Any:
    """Generated from the route registry, so it always matches the running daemon."""
    return openapi()


EVENT_SCHEMA = {
    "type": "object",
    "required": ["id", "type", "time", "data"],
    "properties": {
        "id": {"type": "integer"},
        "type": {"type": "string", "description": "link.up, link.down, link.path, statistics, "
                 "reset (re-read the state: events were lost)"},
        "time": {"type": "number", "description": "Unix time"},
        "data": {"type": "object"},
    },
}


@route("GET", "/api/events", summary="Live events (server-sent events)", tag="events",
       response={"type": "string", "description": "an SSE stream; each event's data line "
                 "holds one JSON object", "contentMediaType": "text/event-stream",
                 "x-event-schema": EVENT_SCHEMA},
       media="text/event-stream", errors=(503,))
async def _events(daemon: Daemon, request: Request) -> Any:
    """Event types: ``link.up`` {hashname, path}, ``link.down`` {hashname}, ``link.path``
    {hashname, path}, ``statistics`` (as GET /api/statistics). Send ``Last-Event-ID`` to get
    the events missed since (or a ``reset`` event when they are gone). A slow reader is cut
    off and should reconnect with ``Last-Event-ID``."""
    last = request.headers.get("last-event-id")
    last_id = int(last) if last is not None and last.isdigit() else None
    if daemon.events.subscribers >= MAX_SUBSCRIBERS:
        raise ApiError(503, "too_many_streams", f"{MAX_SUBSCRIBERS} event streams are open",
                       "close other dashboards or event readers")

    async def stream() -> AsyncIterator[str]:
        try:
            subscription = daemon.events.subscribe(last_id)
            missed, receive = subscription.__enter__()
        except TooManySubscribers:
            return
        try:
            yield f"retry: {SSE_RETRY_MS}\n: connected\n\n"
            for old in missed:
                yield _sse(old)
            while True:
                # Never yield inside a cancel scope in an async generator (trio's rule):
                # wait inside it, yield outside.
                event: EventPublished | None = None
                with trio.move_on_after(SSE_KEEPALIVE):
                    try:
                        event = await receive.receive()
                    except (trio.EndOfChannel, trio.ClosedResourceError):
                        return  # cut off as too slow: the client reconnects
                yield ": keepalive\n\n" if event is None else _sse(event)
        finally:
            subscription.__exit__(None, None, None)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _sse(event: EventPublished) -> str:
    data = json.dumps(event.to_json(), separators=(",", ":"))
    head = f"id: {event.id}\n" if event.id else ""
    return f"{head}event: {event.type}\ndata: {data}\n\n"


@route("POST", "/api/login-codes", summary="Mint a one-time dashboard login link", tag="dashboard",
       status=201, response={
           "type": "object", "required": ["code", "url", "expires_in"],
           "properties": {"code": {"type": "string"}, "url": {"type": "string"},
                          "expires_in": {"type": "number", "description": "seconds"}}})
async def _login_codes(daemon: Daemon, request: Request) -> Any:
    """``p2pcloud dashboard`` calls this and opens the returned URL; the code works once."""
    code, ttl = daemon.mint_login_code()
    base = daemon.api_url or f"{request.url.scheme}://{request.headers.get('host', '')}"
    return {"code": code, "url": f"{base}/login?code={urllib.parse.quote(code)}",
            "expires_in": ttl}


def _session_redirect(daemon: Daemon) -> Response:
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(SESSION_COOKIE, daemon.new_session(), max_age=int(SESSION_TTL),
                        httponly=True, samesite="strict", path="/")
    return response


def _login_page(message: str, status: int) -> HTMLResponse:
    text = (
        "<!doctype html><meta charset=utf-8><meta name=viewport content='width=device-width'>"
        "<title>p2pcloud: log in</title><link rel=stylesheet href='/style.css'>"
        f"<main class=login><h1>p2pcloud</h1><p class=problem>{message}</p>"
        "<p>Run <code>p2pcloud dashboard</code> on this computer for a new login link, or "
        "paste the token from the data dir's <code>api-token</code> file:</p>"
        "<form method=post action='/login'><input name=token type=password "
        "autocomplete=off aria-label=token placeholder='API token'>"
        "<button>Log in</button></form></main>"
    )
    return HTMLResponse(text, status_code=status)


@route("GET", "/login", summary="Redeem a one-time login code (sets the session cookie)",
       tag="dashboard", auth=False, status=303, response=None, errors=(401,),
       query={"code": ({"type": "string"}, "the code from POST /api/login-codes")})
async def _login_with_code(daemon: Daemon, request: Request) -> Any:
    """Redirects to the dashboard with an HttpOnly, SameSite=Strict session cookie."""
    code = request.query_params.get("code", "")
    if not code or not daemon.redeem_login_code(code):
        return _login_page(
            f"This login link is used up or older than {int(LOGIN_CODE_TTL // 60)} minutes.", 401
        )
    return _session_redirect(daemon)


@route("POST", "/login", summary="Log the dashboard in with the API token (form post)",
       tag="dashboard", auth=False, status=303, response=None, errors=(401, 413))
async def _login_with_token(daemon: Daemon, request: Request) -> Any:
    """Body: ``application/x-www-form-urlencoded`` with a ``token`` field."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(413, "body_too_large", "the login form is too large", "")
    fields = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
    token = (fields.get("token") or [""])[0].strip()
    if not token or not daemon.check_token(token):
        return _login_page("That token is not this daemon's token.", 401)
    return _session_redirect(daemon)


@route("POST", "/api/logout", summary="End the dashboard session", tag="dashboard", status=204,
       response=None)
async def _logout(daemon: Daemon, request: Request) -> Any:
    """Forgets the session cookie's session (a bearer token caller has none: no-op)."""
    session = request.cookies.get(SESSION_COOKIE)
    if session:
        daemon.end_session(session)
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# -- the app ------------------------------------------------------------------------------


class _Guard:
    """ASGI middleware: Host check (DNS rebinding) and security headers on every response."""

    def __init__(self, app: ASGIApp, *, loopback_only: bool) -> None:
        self.app = app
        self.loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.loopback_only:
            host = ""
            for key, value in scope.get("headers", []):
                if key == b"host":
                    host = value.decode("latin-1")
            hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if not is_loopback(hostname):
                response = error_response(
                    403, "bad_host", f"Host {host!r} is not a loopback name",
                    "talk to the API as http://127.0.0.1:PORT or http://localhost:PORT")
                await response(scope, receive, send)
                return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"cache-control", b"no-store"),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                    (b"content-security-policy",
                     b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def build_app(daemon: Daemon) -> ASGIApp:
    """The ASGI app for ``daemon``: every registered route, then the dashboard files."""
    backgrounds = []
    for module in CAPABILITIES:
        imported = importlib.import_module(module)  # each registers its routes into REGISTRY
        if hasattr(imported, "background"):
            backgrounds.append(imported.background)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Starlette enters and exits this in one task, so a nursery may span the yield.
        async with trio.open_nursery() as nursery:
            for run in backgrounds:
                nursery.start_soon(run, daemon)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()

    routes: list[Route | Mount] = [
        Route(spec.path, _endpoint(daemon, spec), methods=[spec.method], name=spec.name)
        for spec in REGISTRY.routes
    ]
    routes.append(Mount("/", app=StaticFiles(directory=STATIC_DIR, html=True), name="dashboard"))

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        if status == 405:
            return error_response(405, "method_not_allowed",
                                  f"{request.method} is not allowed on {request.url.path}",
                                  "see /api/openapi.json for the routes")
        return error_response(status, "not_found", f"no such route: {request.url.path}",
                              "see /api/openapi.json for the routes")

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found},
                    lifespan=lifespan)
    return _Guard(app, loopback_only=is_loopback(daemon.settings.api_bind))
