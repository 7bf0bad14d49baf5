"""Helpers for the things-on-a-node tests: real nodes on 127.0.0.1, waits without timing claims."""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from p2pcloud._node.node import Node, open_node
from p2pcloud._node.things import Things

GIVE_UP = 120  # seconds: a hang guard only (trio.fail_after), never a timing claim
POLL = 0.05  # seconds between checks of a condition another task makes true


async def wait_for(condition: Callable[[], Any]) -> Any:
    """Poll ``condition`` until it returns something truthy, and return it (the caller's
    ``trio.fail_after`` bounds the wait; a hang names the condition's line on stderr)."""
    try:
        while True:
            value = condition()
            if value:
                return value
            await trio.sleep(POLL)
    except trio.Cancelled:
        code = getattr(condition, "__code__", None)
        where = f"{code.co_filename}:{code.co_firstlineno}" if code else repr(condition)
        print(f"wait_for gave up waiting on {where}", file=sys.stderr)
        raise


async def start_nodes(stack: AsyncExitStack, root: Path, names: list[str]) -> list[Node]:
    """One real node per name: UDP on 127.0.0.1, its own data dir."""
    return [await stack.enter_async_context(open_node(root / n, port=0, tcp_port=None))
            for n in names]


def things(node: Node) -> Things:
    """The node's things facade (every node with a data dir has one)."""
    assert node.things is not None
    return node.things


async def found_and_join(admin: Node, *others: Node) -> bytes:
    """Found a cloud on ``admin``, join the others by invite; wait until every node sees
    every other as a member."""
    assert admin.cloud is not None
    cloud = await admin.cloud.found()
    for node in others:
        assert node.cloud is not None
        await node.cloud.join(await admin.cloud.invite())
    everyone = [admin, *others]
    for node in everyone:
        c = node.cloud
        assert c is not None
        await wait_for(lambda c=c: c.subcloud is not None and all(
            c.membership.is_member(n.hashname) for n in everyone))
    return cloud


def holds(node: Node, hashname: str) -> bool:
    """Whether a node holds a live thing with this hashname, with its profile."""
    return any(v.hashname == hashname for v in things(node).list(include_archived=True))
