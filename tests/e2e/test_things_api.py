"""The things routes against the OpenAPI description: every route tagged ``things`` is
exercised here on two real daemons (an owner and a second person's cloud), each JSON answer
validated against its declared schema and each image answer checked for its declared media
type and decoded back to the thing it shows. Errors keep the API's error shape."""

from __future__ import annotations

from typing import Any

from openapi_spec_validator import validate

from p2pcloud.things import tags
from tests.e2e import test_api as api_test
from tests.e2e.conftest import Daemon, cli_json, wait_for


def _image(api: Any, method: str, path: str, url: str, media: str, **kwargs: Any) -> bytes:
    answer = api.call(method, path, url=url, **kwargs)
    assert answer.status in (200, 201), (path, answer.status, answer.body)
    assert answer.headers["content-type"].startswith(media), answer.headers
    api.schema_for(method, path, answer.status, media)  # declared with that media type
    return answer.body


def test_every_things_route_answers_as_described(two_daemons: tuple[Daemon, Daemon]) -> None:
    a, b = two_daemons
    spec = a.get("/api/openapi.json")
    validate(spec)
    api = api_test.Checked(a, spec)
    other = api_test.Checked(b, spec)
    ours = {(m, p) for p, item in spec["paths"].items() for m, op in item.items()
            if "things" in op["tags"]}
    assert len(ours) >= 25

    # Before a cloud exists, making things is refused with the error shape.
    refused = api.call("POST", "/api/things", body={"name": "early"})
    assert refused.status == 409 and refused.json()["error"]["code"] == "thing_refused"
    for d in (a, b):
        cli_json(d.data_dir, "cloud", "new")

    made = api.call("POST", "/api/things", body={"name": "bike", "make": "Acme",
                                                 "card": "call 123"})
    assert made.status == 201 and made.json()["claimed"] is False
    bike = made.json()["hashname"]
    claimed = api.call("POST", "/api/things", body={"name": "lamp", "claim": True})
    assert claimed.status == 201 and claimed.json()["claimed"] is True
    lamp = claimed.json()["hashname"]
    listed = api.call("GET", "/api/things").json()
    assert [t["name"] for t in listed["things"]] == ["bike", "lamp"]
    assert listed["rules_pending"] == 0
    assert api.call("POST", "/api/things", body={"name": ""}).status == 400
    assert api.call("POST", "/api/things", body={"name": "x", "colour": "red"}).status == 400

    one = "/api/things/{thing}"
    shown = api.call("GET", one, url=f"/api/things/{bike}").json()
    assert shown["make"] == "Acme" and shown["card"] == {"text": "call 123"}
    missing = api.call("GET", one, url="/api/things/nosuchthing")
    assert missing.status == 404 and missing.json()["error"]["code"] == "unknown_thing"

    renamed = api.call("POST", "/api/things/{thing}/rename", url="/api/things/bike/rename",
                       body={"name": "city bike"})
    assert renamed.json()["name"] == "city bike"
    noted = api.call("POST", "/api/things/{thing}/notes", url=f"/api/things/{bike}/notes",
                     body={"text": "new chain"})
    assert noted.status == 200
    read = api.call("POST", "/api/things/{thing}/readings",
                    url=f"/api/things/{bike}/readings", body={"fields": {"value": 12.5,
                                                                         "unit": "km"}})
    assert read.status == 201
    bad_reading = api.call("POST", "/api/things/{thing}/readings",
                           url=f"/api/things/{bike}/readings", body={"fields": {"speed": 1}})
    assert bad_reading.status == 409 and "value" in bad_reading.json()["error"]["message"]
    carded = api.call("PUT", "/api/things/{thing}/card", url=f"/api/things/{bike}/card",
                      body={"text": "If found, call 123"})
    assert carded.json()["card"] == {"text": "If found, call 123"}
    archived = api.call("POST", "/api/things/{thing}/archive", url=f"/api/things/{lamp}/archive",
                        body={})
    assert archived.json()["archived"] is True
    assert [t["name"] for t in api.call("GET", "/api/things").json()["things"]] == ["city bike"]
    assert len(a.get("/api/things?archived=true")["things"]) == 2
    api.call("POST", "/api/things/{thing}/archive", url=f"/api/things/{lamp}/archive",
             body={"archived": False})

    # Tags: URI, PNG and SVG of a thing; fresh tags and sheets.
    tag = api.call("GET", "/api/things/{thing}/tag", url=f"/api/things/{bike}/tag").json()
    assert tag["kind"] == "fresh" and tag["thing"] == bike and tag["text"]
    png = _image(api, "GET", "/api/things/{thing}/tag.png", f"/api/things/{bike}/tag.png",
                 "image/png")
    assert tags.scan_image(png).uri() == tag["uri"]
    assert api.call("GET", "/api/things/{thing}/tag.png",
                    url=f"/api/things/{bike}/tag.png?scale=0").status == 400
    svg = _image(api, "GET", "/api/things/{thing}/tag.svg", f"/api/things/{bike}/tag.svg",
                 "image/svg+xml")
    assert svg.startswith(b"<?xml") or b"<svg" in svg[:200]
    fresh = api.call("POST", "/api/tags", body={"count": 2}).json()["tags"]
    assert len(fresh) == 2 and all(t["kind"] == "fresh" for t in fresh)
    sheet = _image(api, "POST", "/api/tags/sheet.png", "/api/tags/sheet.png", "image/png",
                   body={"count": 2, "columns": 2})
    assert len(tags.decode_image(sheet)) == 2
    _image(api, "POST", "/api/tags/sheet.svg", "/api/tags/sheet.svg", "image/svg+xml",
           body={"count": 1})
    assert api.call("POST", "/api/tags", body={"count": 0}).status == 400

    # Scans: the fresh tag by text (a claim), then the claimed tag from an image (opens).
    scanned = api.call("POST", "/api/scan", body={"uri": tag["uri"]}).json()
    assert scanned["action"] == "claimed" and scanned["thing"]["hashname"] == bike
    claimed_png = _image(api, "GET", "/api/things/{thing}/tag.png",
                         f"/api/things/{bike}/tag.png", "image/png")
    opened = api.call("POST", "/api/scan/image", raw=claimed_png,
                      headers={"Content-Type": "image/png"})
    assert opened.status == 200 and opened.json()["action"] == "opened"
    not_image = api.call("POST", "/api/scan/image", raw=b"hello",
                         headers={"Content-Type": "text/plain"})
    assert not_image.status == 415
    garbage = api.call("POST", "/api/scan/image", raw=b"\x89PNG broken",
                       headers={"Content-Type": "image/png"})
    assert garbage.status == 422 and garbage.json()["error"]["code"] == "bad_image"
    bad = api.call("POST", "/api/scan", body={"uri": tag["uri"][:60]})
    assert bad.status == 422 and "truncated" in bad.json()["error"]["message"]

    # Someone else (b) reads the card and leaves a message; a reads its inbox and logs.
    claimed_uri = scanned["new_tag"]
    card = other.call("POST", "/api/scan", body={"uri": claimed_uri}).json()
    assert card["action"] == "finder" and card["card"] == {"text": "If found, call 123"}
    sent = other.call("POST", "/api/messages", body={"tag": claimed_uri, "text": "found it",
                                                      "contact": "b@example.org"})
    assert sent.status == 201 and sent.json() == {"thing": bike, "sent": True}
    inbox = wait_for("the message in a's inbox", lambda: api.call(
        "GET", "/api/things/{thing}/inbox", url=f"/api/things/{bike}/inbox").json()["messages"])
    assert [m["text"] for m in inbox] == ["found it"]
    log = api.call("GET", "/api/things/{thing}/logs/{log}",
                   url=f"/api/things/{bike}/logs/readings?limit=5").json()
    assert log["total"] == 1 and log["records"][0]["value"] == 12.5
    events = a.get(f"/api/things/{bike}/logs/events")["records"]
    assert {"reading_added", "claimed", "scanned", "message_received"} <= {
        e["type"] for e in events}

    # Rules: add (a bad one is a 400 with the column), list, remove.
    added = api.call("POST", "/api/things/{thing}/rules", url=f"/api/things/{bike}/rules",
                     body={"text": 'on message_received do notify_owner("found")'})
    assert added.status == 201
    rule_id = added.json()["id"]
    bad_rule = api.call("POST", "/api/things/{thing}/rules", url=f"/api/things/{bike}/rules",
                        body={"text": "on sunrise do panic"})
    assert bad_rule.status == 400 and bad_rule.json()["error"]["code"] == "bad_rule"
    rules = api.call("GET", "/api/things/{thing}/rules", url=f"/api/things/{bike}/rules")
    assert [r["id"] for r in rules.json()["rules"]] == [rule_id]
    rule_path = "/api/things/{thing}/rules/{rule}"
    assert api.call("DELETE", rule_path, url=f"/api/things/{bike}/rules/{rule_id}").status == 204
    gone = api.call("DELETE", rule_path, url=f"/api/things/{bike}/rules/{rule_id}")
    assert gone.status == 404 and gone.json()["error"]["code"] == "unknown_rule"

    # A smart thing's invite; transfer of the lamp to b's cloud.
    invite = api.call("POST", "/api/thing-invites", body={"expires_in": 600})
    assert invite.status == 201 and invite.json()["uri"].startswith("p2pcloud:")
    target = other.call("POST", "/api/transfer-targets")
    assert target.status == 201
    bad_target = api.call("POST", "/api/things/{thing}/transfer",
                          url=f"/api/things/{lamp}/transfer", body={"to": "nonsense"})
    assert bad_target.status == 409 and bad_target.json()["error"]["code"] == "transfer_failed"
    moved = api.call("POST", "/api/things/{thing}/transfer", url=f"/api/things/{lamp}/transfer",
                     body={"to": target.json()["target"], "history": "all"})
    assert moved.status == 200 and moved.json()["transferred"] is True
    wait_for("the lamp at b", lambda: [t for t in b.get("/api/things")["things"]
                                       if t["hashname"] == lamp])

    exercised = api.exercised | other.exercised
    missing = ours - exercised
    assert not missing, f"things routes no test exercised: {missing}"
