"""A peer that closes the TCP connection its link runs on ends the link at once.

Real nodes on 127.0.0.1 with TCP only (no UDP), so every link runs over TCP. Without the
transport's ``on_peer_closed`` hook the link would stay up until the mesh's keepalive
timers give up (minutes), and a stopped peer would show as online all that time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio

from p2pcloud._node.node import open_node

DOWN_BOUND = 30.0  # s; the mesh's keepalive would need minutes: this tells the two apart


async def _wait(check: Callable[[], bool]) -> None:
    with trio.fail_after(DOWN_BOUND):
        while not check():  # noqa: ASYNC110  (node state has no event to wait on)
            await trio.sleep(0.01)


async def test_a_stopped_peer_on_tcp_goes_offline_and_others_stay(tmp_path: Path) -> None:
    async with (
        open_node(tmp_path / "a", port=None, tcp_port=0) as a,
        open_node(tmp_path / "c", port=None, tcp_port=0) as c,
    ):
        c_hn = await a.link(c.link_uri)
        async with open_node(tmp_path / "b", port=None, tcp_port=0) as b:
            b_hn = await a.link(b.link_uri)
            path = a.link_path(b_hn)
            assert path is not None and path.type == "tcp4"
            await _wait(lambda: a.hashname in b.links)
        # B has stopped: its TCP connections closed, A ends the link...
        await _wait(lambda: b_hn not in a.links)
        # ...and only that one: the link to C (another TCP connection) stays up.
        assert c_hn in a.links
        assert a._tcp is not None and a._tcp.counts["closed_by_peer"] >= 1
