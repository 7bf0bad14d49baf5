"""Handshake ``at`` values are epoch seconds, whatever clock the mesh's ``now`` comes from.

A node's ``now`` is Trio's clock, which starts at a random offset in every process. If ``at``
were drawn from it, a restarted endpoint could send an ``at`` below its previous session's
and its peer would drop the handshake as stale, keeping the old session keys (while the
restarted side thought the link Up). The shell passes ``wall_offset`` (epoch minus ``now``),
so a restart is a higher ``at`` and is taken at once.
"""

from __future__ import annotations

import random

from p2pcloud.proto.events import ChannelClosed, ChannelData
from p2pcloud.proto.exchange import KEEPALIVE_UDP
from p2pcloud.proto.mesh import Mesh
from p2pcloud.proto.path import Path
from tests.proto.fakenet import FakeNetwork
from tests.proto.test_mesh import accept_all, linked_pair, up


def test_a_restart_with_a_clock_far_behind_is_a_new_session_at_the_first_try() -> None:
    net = FakeNetwork(23)
    a, b = linked_pair(net)
    cid = a.mesh.open_channel(b.hashname, "test", reliable=True, body=b"x", now=net.now)
    net.run_until(lambda: b.of(ChannelData))
    net.run_for(3 * KEEPALIVE_UDP)  # keepalives raise the session's at
    assert up(a, b)
    # b's process restarts: its monotonic clock now reads 900 s less than before. The shell
    # measures wall clock minus that clock (the fake network's wall clock is its own `now`,
    # which the first meshes use with offset 0), so its at values continue from the wall.
    offset = -900.0
    fresh = Mesh(
        b.mesh.identity, entropy=random.Random(5).randbytes, accept=accept_all,
        wall_offset=-offset,
    )
    fresh.handle_types("test")
    net.move(b, Path.udp4("127.0.0.1", 50003))
    net.replace(b, fresh, offset=offset)
    b.mesh.link(a.keys(), net.time_of(b), paths=[a.addr])
    net.run_until(lambda: [e for e in a.of(ChannelClosed) if e.cid == cid], timeout=5)
    assert [e for e in a.of(ChannelClosed) if e.cid == cid][0].err == "new session"
    net.run_until(lambda: up(a, b) and up(b, a), timeout=5)
    cid2 = b.mesh.open_channel(a.hashname, "test", reliable=True, body=b"back", now=net.time_of(b))
    net.run_until(lambda: [e for e in a.of(ChannelData) if e.cid == cid2 and e.body == b"back"])
    # unlike a restart whose at came from its monotonic clock, nothing was stale
    assert "stale handshake" not in a.mesh.statistics().drops


def test_the_offset_moves_at_and_nothing_else() -> None:
    net = FakeNetwork(29)
    a, b = linked_pair(net)
    at_before = a.mesh._links[b.hashname].at
    shifted = Mesh(a.mesh.identity, entropy=random.Random(9).randbytes, accept=accept_all,
                   wall_offset=1_000_000.0)
    shifted.handle_types("test")
    net.replace(a, shifted)
    a.mesh.link(b.keys(), net.now, paths=[b.addr])
    net.run_until(lambda: up(a, b) and up(b, a), timeout=5)
    assert a.mesh._links[b.hashname].at >= at_before + 1_000_000 - 2
