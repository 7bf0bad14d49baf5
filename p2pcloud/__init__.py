"""p2pcloud: a peer-to-peer personal cloud node.

Start with :func:`open_node`::

    async with p2pcloud.open_node(path) as node:
        print(node.hashname, node.link_uri)

See docs/ for the architecture, the protocol and how-to guides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from p2pcloud.errors import (
    BadURI,
    ChannelError,
    ClockSkewError,
    CoreError,
    CoreUsageError,
    DecodeError,
    HandshakeFailed,
    KeyFileError,
    LinkError,
    LocalProtocolError,
    MalformedPacket,
    P2PCloudError,
    RemoteProtocolError,
    StoreError,
    WrongPassphrase,
)

if TYPE_CHECKING:
    from p2pcloud._node.node import Node, open_node
    from p2pcloud._node.smartthing import ThingNode, run_thing
    from p2pcloud._node.subcloud import SubCloud
    from p2pcloud._node.things import Things

__version__ = "0.1.0"

__all__ = [
    "BadURI",
    "ChannelError",
    "ClockSkewError",
    "CoreError",
    "CoreUsageError",
    "DecodeError",
    "HandshakeFailed",
    "KeyFileError",
    "LinkError",
    "LocalProtocolError",
    "MalformedPacket",
    "Node",
    "P2PCloudError",
    "RemoteProtocolError",
    "StoreError",
    "SubCloud",
    "ThingNode",
    "Things",
    "WrongPassphrase",
    "core_implementation",
    "open_node",
    "run_thing",
]


def core_implementation() -> str:
    """Return which CRDT merge core runs: ``"cython"`` or ``"python"`` (the reference twin)."""
    from p2pcloud import _core

    return _core.IMPLEMENTATION


def __getattr__(name: str) -> Any:
    # The node pulls in trio and the transports; import it only when asked for, so that
    # the pure layers stay importable on their own.
    if name in ("open_node", "Node"):
        from p2pcloud._node import node as _node_mod

        return getattr(_node_mod, name)
    if name == "SubCloud":
        from p2pcloud._node.subcloud import SubCloud

        return SubCloud
    if name in ("run_thing", "ThingNode"):  # smart things (docs/things.md)
        from p2pcloud._node import smartthing

        return getattr(smartthing, name)
    if name == "Things":
        from p2pcloud._node.things import Things

        return Things
    raise AttributeError(f"module 'p2pcloud' has no attribute {name!r}")
