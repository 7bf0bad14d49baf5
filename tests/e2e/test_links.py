"""Links across a peer's restart, through the CLI and the API of real daemons.

A links B by URI. B stops cleanly and starts again on its data dir (same identity, same
remembered ports): A must show B online again by itself. When the link ran over TCP, A's
node ends it the moment B closes the connection (tests/integration/test_tcp_link_close.py),
and A's daemon links B again from the URI it remembers; over UDP the mesh's own keepalive
finds B again. Either way nobody runs ``p2pcloud link`` a second time.
"""

from __future__ import annotations

from collections.abc import Callable

from tests.e2e.conftest import Daemon, cli, cli_json, wait_for

ZERO_PORTS = ("--port", "0", "--tcp-port", "0", "--api-port", "0")


def test_a_restarted_peer_is_linked_again_by_itself(
    make_daemon: Callable[[str], Daemon],
) -> None:
    a, b = make_daemon("a"), make_daemon("b")
    for d in (a, b):
        d.up(*ZERO_PORTS)
    b_hn = b.status()["hashname"]
    linked = cli_json(a.data_dir, "link", b.status()["link_uri"])
    assert linked["hashname"] == b_hn
    wait_for("B sees A", lambda: (b.peer(a.status()["hashname"]) or {}).get("online"))

    assert cli(b.data_dir, "down").returncode == 0
    b.up()  # the remembered ports: A's copy of B's URI still points at it
    row = wait_for("A shows B online again", lambda: (a.peer(b_hn) or {}).get("online")
                   and a.peer(b_hn))
    assert row["uri"] is not None  # A remembers how it reached B
    wait_for("B shows A online again",
             lambda: (b.peer(a.status()["hashname"]) or {}).get("online"))


OFFLINE_BOUND = 20.0  # s; without the goodbye a UDP link waits for keepalive timers (minutes)


def test_a_peer_that_stops_shows_offline_at_once(make_daemon: Callable[[str], Daemon]) -> None:
    a, b, c = make_daemon("a"), make_daemon("b"), make_daemon("c")
    for d in (a, b, c):
        d.up(*ZERO_PORTS)
    b_hn, c_hn = b.status()["hashname"], c.status()["hashname"]
    for d in (b, c):
        cli_json(a.data_dir, "link", d.status()["link_uri"])
    wait_for("B sees A", lambda: (b.peer(a.status()["hashname"]) or {}).get("online"))

    # B stops cleanly: it says goodbye on its link (p2pcloud-bye), whatever the transport.
    assert cli(b.data_dir, "down").returncode == 0
    wait_for("A shows B offline", lambda: (a.peer(b_hn) or {}).get("online") is False,
             timeout=OFFLINE_BOUND)
    assert (a.peer(c_hn) or {}).get("online") is True  # the others stay
    log = (a.data_dir / "p2pcloudd.log").read_text()
    assert "peer stopping" in log and b_hn[:12] in log
