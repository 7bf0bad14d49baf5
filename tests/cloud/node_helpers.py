"""Helpers for the cloud-on-a-node tests: real nodes on 127.0.0.1, waiting without timing claims."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from p2pcloud._node.node import Node, open_node

GIVE_UP = 90  # seconds: a hang guard only (trio.fail_after), never a timing claim
POLL = 0.05  # seconds between checks of a condition another task makes true


async def wait_for(condition: Callable[[], Any], what: str = "") -> Any:
    """Poll ``condition`` until it returns something truthy, and return it.

    The caller's ``trio.fail_after`` bounds the wait; ``what`` names it in a hang.
    """
    while True:
        value = condition()
        if value:
            return value
        await trio.sleep(POLL)


async def start_nodes(stack: AsyncExitStack, root: Path, names: list[str],
                      **kwargs: Any) -> list[Node]:
    """Open one real node (UDP on 127.0.0.1, own data dir) per name."""
    kwargs.setdefault("port", 0)
    kwargs.setdefault("tcp_port", None)
    return [await stack.enter_async_context(open_node(root / n, **kwargs)) for n in names]


def held(node: Node, sc_id: bytes) -> Any:
    """The node's sub-cloud with this id, or None."""
    assert node.replication is not None
    return node.replication.subclouds.get(sc_id)


def field(node: Node, sc_id: bytes, coll: str, doc: str, name: str) -> Any:
    """A field of a sub-cloud on a node, None if the node does not hold it (yet)."""
    sc = held(node, sc_id)
    return None if sc is None else sc.get_field(coll, doc, name)


async def found_and_join(admin: Node, *others: Node) -> bytes:
    """Found a cloud on ``admin`` and join every other node by invite; wait until each
    holds the cloud sub-cloud and sees itself as a member there."""
    assert admin.cloud is not None
    cloud = await admin.cloud.found()
    for node in others:
        assert node.cloud is not None
        await node.cloud.join(await admin.cloud.invite())
    for node in others:
        c = node.cloud
        assert c is not None
        await wait_for(lambda c=c, h=node.hashname: c.subcloud is not None
                       and c.membership.is_member(h) and c.membership.is_member(admin.hashname))
    return cloud
