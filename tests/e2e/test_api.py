"""The HTTP API against its own OpenAPI description: it validates, and every route in it is
exercised here with its answers checked against the schemas it declares."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from http.cookies import SimpleCookie
from typing import Any

from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from tests.e2e.conftest import WAIT, Answer, Daemon, wait_for


class Checked:
    """Calls API operations, checks each answer against the description, records coverage."""

    def __init__(self, daemon: Daemon, spec: dict[str, Any]) -> None:
        self.daemon = daemon
        self.spec = spec
        self.exercised: set[tuple[str, str]] = set()

    def schema_for(self, method: str, path: str, status: int, media: str) -> dict[str, Any]:
        responses = self.spec["paths"][path][method.lower()]["responses"]
        assert str(status) in responses, f"{method} {path} answered {status}, not declared"
        content = responses[str(status)].get("content", {})
        assert media in content, f"{method} {path} {status}: {media} not declared"
        return dict(content[media]["schema"])

    def check_json(self, method: str, path: str, answer: Answer) -> Any:
        schema = self.schema_for(method, path, answer.status, "application/json")
        body = answer.json()
        # The schemas refer to #/components/...: validate with the description as the root.
        Draft202012Validator({**schema, "components": self.spec["components"]}).validate(body)
        return body

    def call(self, method: str, path: str, *, url: str | None = None, **kwargs: Any) -> Answer:
        answer = self.daemon.request(method, url or path, **kwargs)
        self.exercised.add((method.lower(), path))
        if answer.headers.get("content-type", "").startswith("application/json"):
            self.check_json(method, path, answer)
        else:
            # Non-JSON answers (redirects, the login page) must still be declared.
            assert str(answer.status) in self.spec["paths"][path][method.lower()]["responses"]
        return answer


def session_cookie(answer: Answer) -> tuple[str, str]:
    """The session cookie set by a login answer, and its raw Set-Cookie header."""
    raw = answer.headers["set-cookie"]
    cookie = SimpleCookie()
    cookie.load(raw)
    return cookie["p2pcloud_session"].value, raw


def read_event(response: http.client.HTTPResponse, want: str) -> dict[str, Any]:
    """Read SSE lines until an event of type ``want``; return its JSON."""
    event_type = None
    while True:
        line = response.fp.readline().decode()
        assert line, "the event stream ended"
        line = line.rstrip("\n")
        if line.startswith("event: "):
            event_type = line[len("event: "):]
        elif line.startswith("data: ") and event_type == want:
            return dict(json.loads(line[len("data: "):]))


def open_events(daemon: Daemon, last_id: int | None = None) -> tuple[Any, Any]:
    url = urllib.parse.urlsplit(daemon.api_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=WAIT)
    headers = {"Authorization": f"Bearer {daemon.token}"}
    if last_id is not None:
        headers["Last-Event-ID"] = str(last_id)
    conn.request("GET", "/api/events", headers=headers)
    return conn, conn.getresponse()


def test_openapi_validates_and_every_route_is_exercised(
    two_daemons: tuple[Daemon, Daemon],
) -> None:
    a, b = two_daemons
    spec = a.get("/api/openapi.json")
    validate(spec)  # OpenAPI 3.1 (openapi-spec-validator)
    api = Checked(a, spec)
    # The cloud and things capabilities check their own routes the same way on daemons set
    # up for them (test_cloud_api.py, test_things_api.py); every other route is checked here.
    own_tests = {"cloud", "things"}
    operations = {(m, p) for p, item in spec["paths"].items() for m, op in item.items()
                  if not own_tests & set(op["tags"])}
    assert ("get", "/api/openapi.json") in operations
    api.call("GET", "/api/openapi.json")

    # status, peers, statistics
    status = api.call("GET", "/api/status").json()
    assert status["hashname"] and status["link_uri"].startswith("link://")
    assert status["ports"]["api"] == urllib.parse.urlsplit(a.api_url).port
    assert api.call("GET", "/api/peers").json() == {"peers": []}
    stats = api.call("GET", "/api/statistics").json()
    assert stats["node"]["links_up"] == 0

    # The event stream sees the link come up that POST /api/links makes.
    conn, events = open_events(a)
    try:
        assert events.status == 200
        assert events.getheader("content-type").startswith("text/event-stream")
        api.exercised.add(("get", "/api/events"))
        api.schema_for("GET", "/api/events", 200, "text/event-stream")
        bad = api.call("POST", "/api/links", body={"uri": "link://nowhere"})
        assert bad.status == 422 and bad.json()["error"]["code"] == "bad_uri"
        extra = api.call("POST", "/api/links", body={"uri": "x", "more": 1})
        assert extra.status == 400 and extra.json()["error"]["code"] == "invalid_body"
        not_json = api.call("POST", "/api/links", raw=b"uri=x",
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert not_json.status == 415
        b_uri = b.status()["link_uri"]
        linked = api.call("POST", "/api/links", body={"uri": b_uri})
        assert linked.status == 200
        up = read_event(events, "link.up")
        assert up["data"]["hashname"] == linked.json()["hashname"] == b.status()["hashname"]
        event_schema = spec["paths"]["/api/events"]["get"]["responses"]["200"]["content"][
            "text/event-stream"]["schema"]["x-event-schema"]
        Draft202012Validator(event_schema).validate(up)
    finally:
        conn.close()
    # A client that reconnects with Last-Event-ID gets what it missed from the history.
    conn, events = open_events(a, last_id=up["id"] - 1)
    try:
        again = read_event(events, "link.up")
        assert again["id"] == up["id"]
    finally:
        conn.close()
    peers = wait_for("B online", lambda: [p for p in a.get("/api/peers")["peers"] if p["online"]])
    api.check_json("GET", "/api/peers", Answer(200, {}, json.dumps({"peers": peers}).encode()))

    # Dashboard login: a one-time code becomes an HttpOnly, SameSite=Strict session cookie.
    minted = api.call("POST", "/api/login-codes")
    assert minted.status == 201
    code_url = urllib.parse.urlsplit(minted.json()["url"])
    assert code_url.path == "/login"
    login = api.call("GET", "/login", url=f"/login?{code_url.query}", token=None)
    assert login.status == 303 and login.headers["location"] == "/"
    session, raw = session_cookie(login)
    assert "httponly" in raw.lower() and "samesite=strict" in raw.lower()
    used = api.call("GET", "/login", url=f"/login?{code_url.query}", token=None)
    assert used.status == 401 and "set-cookie" not in used.headers  # one time only
    cookie = {"Cookie": f"p2pcloud_session={session}"}
    assert a.request("GET", "/api/status", token=None, headers=cookie).status == 200
    # A state change by cookie needs a same-origin Origin header (no cross-site requests).
    host = urllib.parse.urlsplit(a.api_url).netloc
    forged = api.call("POST", "/api/logout", token=None,
                      headers={**cookie, "Origin": "http://evil.example"})
    assert forged.status == 403 and forged.json()["error"]["code"] == "cross_origin"
    out = api.call("POST", "/api/logout", token=None,
                   headers={**cookie, "Origin": f"http://{host}"})
    assert out.status == 204
    expired = a.request("GET", "/api/status", token=None, headers=cookie)
    assert expired.status == 401 and expired.json()["error"]["code"] == "session_expired"

    # The token typed once into the login form works too; a wrong one does not.
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    wrong = api.call("POST", "/login", token=None, headers=form, raw=b"token=nope")
    assert wrong.status == 401 and "set-cookie" not in wrong.headers
    right = api.call("POST", "/login", token=None, headers=form,
                     raw=urllib.parse.urlencode({"token": a.token}).encode())
    assert right.status == 303
    session2, _ = session_cookie(right)
    assert a.request("GET", "/api/peers", token=None,
                     headers={"Cookie": f"p2pcloud_session={session2}"}).status == 200

    # Sub-clouds: create, write, read, list, share, delete (tests/e2e/test_subcloud_cli.py
    # has the two-daemon story); every answer is checked against its schema.
    made = api.call("POST", "/api/subclouds", body={"name": "api", "kind": "cloud"})
    assert made.status == 201
    sc = made.json()["id"]
    assert [s["id"] for s in api.call("GET", "/api/subclouds").json()["subclouds"]] == [sc]
    doc_path = "/api/subclouds/{sc}/{coll}/{doc}"
    put = api.call("PUT", doc_path, url=f"/api/subclouds/{sc}/c/d", body={"x": 1})
    assert put.status == 200 and put.json()["fields"] == {"x": 1}
    got = api.call("GET", doc_path, url=f"/api/subclouds/{sc}/c/d")
    assert got.json()["fields"] == {"x": 1}
    colls = api.call("GET", "/api/subclouds/{sc}/collections",
                     url=f"/api/subclouds/{sc}/collections")
    assert colls.json()["collections"] == ["c"]
    docs = api.call("GET", "/api/subclouds/{sc}/{coll}", url=f"/api/subclouds/{sc}/c")
    assert docs.json()["documents"] == ["d"]
    shared = api.call("POST", "/api/subclouds/{sc}/share", url=f"/api/subclouds/{sc}/share",
                      body={"hashname": b.status()["hashname"], "rights": "write"})
    assert shared.status == 200
    assert api.call("DELETE", doc_path, url=f"/api/subclouds/{sc}/c/d").status == 204
    # One sub-cloud's view (members, per-peer progress, folders) and synced folders.
    folder = a.data_dir.parent / "synced"
    folder.mkdir()
    (folder / "a.txt").write_text("a")
    added = api.call("POST", "/api/folders", body={"subcloud": sc, "path": str(folder)})
    assert added.status == 201 and added.json()["files"] == 1
    assert api.call("POST", "/api/folders", body={"subcloud": sc, "path": "rel"}).status == 400
    assert [f["path"] for f in api.call("GET", "/api/folders").json()["folders"]] == [
        str(folder.resolve())]
    detail = api.call("GET", "/api/subclouds/{sc}", url=f"/api/subclouds/{sc}").json()
    assert detail["members"][0]["self"] and detail["members"][0]["owner"]
    assert {m["hashname"] for m in detail["members"]} == {a.status()["hashname"],
                                                          b.status()["hashname"]}
    assert detail["folders"][0]["files"] == 1
    assert api.call("GET", "/api/subclouds/{sc}", url="/api/subclouds/nope").status == 404
    assert api.call("GET", doc_path, url=f"/api/subclouds/{sc}/c/d").status == 404

    # Last: shutdown, through the API.
    pid = a.pid
    stopping = api.call("POST", "/api/shutdown")
    assert stopping.status == 202 and stopping.json() == {"stopping": True, "pid": pid}
    wait_for("A's api.json removed at exit", lambda: not (a.data_dir / "api.json").exists())

    missing = operations - api.exercised
    assert not missing, f"routes in the OpenAPI description no test exercised: {missing}"
