"""Smart things: a thing with a computer runs its own small node (docs/things.md).

Theory of operation
-------------------
A bathroom scale or a meter has a computer, so it holds its own key instead of having it
sealed by its owner's cloud. It runs a node with a data dir (its key, its store) and:

1. **pairs**: it joins the owner's cloud with an invite the owner made with
   :meth:`p2pcloud._node.things.Things.invite_smart` (role ``thing``; its grant names no
   sub-cloud of the cloud, so it reads nothing of the owner's);
2. **becomes its thing**: its own hashname is the thing's, its sub-cloud id is derived from
   that hashname (``smart_subcloud_id``) and its registry record is signed by itself, with
   the owner's devices in the ACL; the layout seals its key to them, as for any thing, so
   they can answer for it (finders, transfers) while it is off;
3. **appends readings** (:meth:`ThingNode.add_reading`), which sync to the owner's devices
   like any write: every reading is a dot in the thing's replica, so it arrives exactly once
   whichever devices are online, whenever they come back.

Its grant is revoked like a device's (``node.cloud.revoke``): its links are refused and its
writes past the revocation cutoff are rejected by every member.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from p2pcloud._ids import Hashname
from p2pcloud._node.node import Node, open_node
from p2pcloud._node.things import ThingView
from p2pcloud.errors import ThingError

__all__ = ["ThingNode", "run_thing"]


class ThingNode:
    """A running smart thing (from :func:`run_thing`).

    Attributes:
        node: its node. hashname: its (and its thing's) hashname.
    """

    def __init__(self, node: Node) -> None:
        """Created by :func:`run_thing`."""
        self.node = node
        self.hashname: Hashname = node.hashname

    @property
    def view(self) -> ThingView:
        """Its thing as the owner sees it."""
        assert self.node.things is not None
        return self.node.things.get(self.hashname)

    async def add_reading(self, value: float, *, unit: str = "", kind: str = "") -> None:
        """Append a reading (durable here when this returns; it syncs to the owner).

        Raises:
            ThingError: not a number, or a text too long.
            AccessDenied: the thing may not write (its grant was revoked).
        """
        assert self.node.things is not None
        await self.node.things.add_reading(self.hashname, {"value": value, "unit": unit,
                                                           "kind": kind})

    def readings(self) -> list[dict[str, Any]]:
        """Its readings as this node holds them, oldest first."""
        assert self.node.things is not None
        return self.node.things.readings(self.hashname)


@asynccontextmanager
async def run_thing(path: str | os.PathLike[str], *, invite: str | None = None,
                    name: str = "", make: str = "", model: str = "", serial: str = "",
                    port: int | None = 0, bind: str = "127.0.0.1",
                    timeout: float = 30.0) -> AsyncIterator[ThingNode]:  # noqa: ASYNC109
    """Run a smart thing: open its node, pair it (first start), make its thing sub-cloud.

    Args:
        path: its data dir (its key and store; the pairing is remembered there).
        invite: the owner's invite (``things.invite_smart()``); needed on the first start.
        name, make, model, serial: its profile (first start).
        port: its UDP port (0: any). bind: the address to bind.
        timeout: seconds to wait for the owner's device when pairing.

    Yields:
        The :class:`ThingNode`.

    Raises:
        ThingError: not paired and no invite given.
        JoinFailed: the invite was refused or the owner's device did not answer.
    """
    async with open_node(path, port=port, tcp_port=None, bind=bind) as node:
        assert node.cloud is not None and node.things is not None
        if node.cloud.id is None:
            if not invite:
                raise ThingError("the thing is not paired: give it an invite from its owner "
                                 "(node.things.invite_smart())")
            await node.cloud.join(invite, timeout=timeout)
        await node.things.become_thing(name, make=make, model=model, serial=serial)
        yield ThingNode(node)
