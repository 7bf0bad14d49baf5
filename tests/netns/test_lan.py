"""A person's cloud across real networks: five hosts in network namespaces, real daemons.

Topology (tests/netns/harness.py builds it; nothing here needs the machine's own network)::

    segment 0 (the home LAN, 10.77.0.0/24)        segment 1 (elsewhere, 10.77.1.0/24)
      home .1  a .2  b .3  c .4                      home .1  d .2

The home box has a leg in both segments but forwards no IP packets, so ``d`` reaches the
LAN hosts only through the home box as a telehash router (``peer``/``connect``). Every daemon
runs with default options except its bind address: LAN discovery turns itself on because
the bind is not loopback.

The tests run in order on one lab: (a) the LAN hosts join one cloud (``a`` by invite, ``b``
and ``c`` by a short code, which finds the home box by mDNS) and then find and link each
other directly, with no address given, and a sub-cloud written on ``a`` reaches ``b`` and
``c``; (b) ``d`` joins by invite and receives ``a``'s writes with ``a`` linked through the
home box; (c) the home box is killed and ``a``, ``b``, ``c`` keep syncing directly on their
LAN. Waits are bounded polls (hang guards), never timing assertions.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.netns.harness import Host, Lab, wait_for

PORT = "42424"  # every host its own namespace: the same port everywhere, as in real life
WAIT = 60.0  # s: upper bound of one step (each takes a few seconds)


def _members(host: Host) -> dict[str, dict[str, Any]]:
    status, body = host.api("GET", "/api/cloud/members")
    return {m["hashname"]: m for m in body["members"]} if status == 200 else {}


def _online(host: Host, other: Host, *, direct: bool | None = None) -> dict[str, Any] | None:
    """``other``'s member row on ``host`` when it is online (and direct/routed as asked)."""
    row = _members(host).get(_hashname(other))
    if row is None or not row["online"] or row["path"] is None:
        return None
    if direct is not None and row["path"]["direct"] != direct:
        return None
    return row


_HASHNAMES: dict[str, str] = {}


def _hashname(host: Host) -> str:
    if host.name not in _HASHNAMES:
        _HASHNAMES[host.name] = host.ok("GET", "/api/status")["hashname"]
    return _HASHNAMES[host.name]


def _doc(host: Host, sc: str, doc: str) -> dict[str, Any] | None:
    status, body = host.api("GET", f"/api/subclouds/{sc}/album/{doc}")
    return body["fields"] if status == 200 else None


@pytest.fixture(scope="module")
def hosts(lab: Lab) -> dict[str, Host]:
    """The five hosts, daemons started (in no cloud yet)."""
    lan, far = lab.bridge(), lab.bridge()
    made = {
        "home": lab.host("home", (lan, 1), (far, 1)),
        "a": lab.host("a", (lan, 2)),
        "b": lab.host("b", (lan, 3)),
        "c": lab.host("c", (lan, 4)),
        "d": lab.host("d", (far, 2)),
    }
    made["home"].start("--bind", "0.0.0.0", "--port", PORT)  # noqa: S104 (both legs)
    for name in ("a", "b", "c", "d"):
        made[name].start("--bind", made[name].addresses[0], "--port", PORT)
    return made


def test_a_lan_hosts_find_each_other_by_mdns_and_sync(hosts: dict[str, Host]) -> None:
    home, a, b, c = hosts["home"], hosts["a"], hosts["b"], hosts["c"]
    # The home box advertises a real address on each leg, not a guess from its host name.
    paths = {(p["type"], p["ip"]) for p in home.ok("GET", "/api/status")["paths"]}
    assert {("udp4", "10.77.0.1"), ("udp4", "10.77.1.1")} <= paths

    cloud_id = home.ok("POST", "/api/cloud")["cloud_id"]
    invite = home.ok("POST", "/api/cloud/invites", {})["uri"]
    assert a.ok("POST", "/api/cloud/join", {"invite": invite})["cloud_id"] == cloud_id
    for joiner in (b, c):  # no address given: the code's number is found by mDNS
        code = home.ok("POST", "/api/cloud/pairing", {})["code"]
        assert joiner.ok("POST", "/api/cloud/pair", {"code": code})["cloud_id"] == cloud_id

    # a, b and c link each other directly on the LAN (udp4 10.77.0.x), by themselves.
    for x, y in ((a, b), (a, c), (b, c)):
        row = wait_for(f"{y.name} online on {x.name} over a direct path",
                       lambda x=x, y=y: _online(x, y, direct=True), WAIT)
        assert row["path"]["type"] in ("udp4", "tcp4") and row["path"]["ip"] == y.addresses[0]

    # Links among them were tried with the addresses mDNS showed (whichever side began).
    tried = [host.ok("GET", "/api/cloud")["statistics"].get("relink: lan", 0)
             for host in (a, b, c)]
    assert sum(tried) >= 1, tried

    sc = a.ok("POST", "/api/subclouds", {"name": "photos"})["id"]
    a.ok("PUT", f"/api/subclouds/{sc}/album/p1", {"title": "beach"})
    for host in (b, c, home):
        seen = wait_for(f"p1 on {host.name}", lambda host=host: _doc(host, sc, "p1"), WAIT)
        assert seen == {"title": "beach"}


def test_b_far_host_syncs_through_the_home_box_as_router(hosts: dict[str, Host]) -> None:
    home, a, d = hosts["home"], hosts["a"], hosts["d"]
    # d cannot reach the LAN at all: no route (the home box is no IP router).
    probe = d.exec("python3", "-c", "import socket; s = socket.socket(socket.AF_INET, "
                   "socket.SOCK_DGRAM); s.sendto(b'x', ('10.77.0.2', 9))")
    assert probe.returncode != 0 and "unreachable" in probe.stderr.lower()

    invite = home.ok("POST", "/api/cloud/invites", {})["uri"]
    d.ok("POST", "/api/cloud/join", {"invite": invite})
    # d links a through a router: a `peer` path (telehash v3 peer/connect), never direct.
    # The home box is d's only way in, so whichever member relays, it sits behind it.
    row = wait_for("a online on d", lambda: _online(d, a), WAIT)
    assert row["path"]["type"] == "peer" and not row["path"]["direct"]
    assert row["path"]["hn"] in {_hashname(h) for h in (home, hosts["b"], hosts["c"])}
    home_row = _online(d, home, direct=True)
    assert home_row is not None and home_row["path"]["ip"] == "10.77.1.1"

    sc = next(s["id"] for s in a.ok("GET", "/api/subclouds")["subclouds"]
              if s["name"] == "photos")
    assert wait_for("p1 on d", lambda: _doc(d, sc, "p1"), WAIT) == {"title": "beach"}
    a.ok("PUT", f"/api/subclouds/{sc}/album/p2", {"title": "far away"})
    assert wait_for("p2 on d", lambda: _doc(d, sc, "p2"), WAIT) == {"title": "far away"}
    assert _online(d, a, direct=False) is not None  # still only through the router


def test_c_lan_keeps_syncing_directly_without_the_home_box(hosts: dict[str, Host]) -> None:
    home, a, b, c = hosts["home"], hosts["a"], hosts["b"], hosts["c"]
    home.stop(kill=True)  # the home box loses power
    sc = next(s["id"] for s in b.ok("GET", "/api/subclouds")["subclouds"]
              if s["name"] == "photos")
    a.ok("PUT", f"/api/subclouds/{sc}/album/p3", {"title": "after the outage"})
    for host in (b, c):
        seen = wait_for(f"p3 on {host.name}", lambda host=host: _doc(host, sc, "p3"), WAIT)
        assert seen == {"title": "after the outage"}
    c.ok("PUT", f"/api/subclouds/{sc}/album/p1", {"title": "beach, cropped"})
    assert wait_for("p1 edit on a", lambda: _doc(a, sc, "p1") == {"title": "beach, cropped"},
                    WAIT)
    # And the links in use are the LAN's own.
    for x, y in ((a, b), (b, c), (a, c)):
        assert _online(x, y, direct=True) is not None
