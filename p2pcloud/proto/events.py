"""Events the mesh hands to its shell (:meth:`p2pcloud.proto.mesh.Mesh.next_event`).

Every event is a frozen, slotted dataclass named as a fact in the past tense (STYLE.md
section 2). The shell pulls them with ``next_event()`` until it returns ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from p2pcloud._ids import ChannelId, Hashname
from p2pcloud.proto.path import Path

__all__ = [
    "ChannelClosed",
    "ChannelData",
    "ChannelEnded",
    "ChannelOpened",
    "LinkDown",
    "LinkUp",
    "MeshEvent",
    "PacketDropped",
    "PathChanged",
]


@dataclass(frozen=True, slots=True)
class LinkUp:
    """A link is Up: we sent a handshake and received one from ``hashname``.

    Also emitted again after a new session (the peer restarted with a new ephemeral key).
    """

    hashname: Hashname
    path: Path


@dataclass(frozen=True, slots=True)
class LinkDown:
    """A link went Down.

    ``reason`` is ``"timeout"`` (no handshake answered within 30 s of the first send or of a
    keepalive) or ``"closed"`` (the application called :meth:`Mesh.unlink`). A link whose
    only path went through a router that went down times out the same way.
    """

    hashname: Hashname
    reason: str


@dataclass(frozen=True, slots=True)
class ChannelOpened:
    """The peer opened a channel of a type the application registered.

    ``json`` and ``body`` are the open packet's head and body, for a look at the request;
    the same content also arrives as the first :class:`ChannelData` (reliable or not), so
    an application reads data from ChannelData only.
    """

    hashname: Hashname
    cid: ChannelId
    type: str
    reliable: bool
    json: dict[str, Any] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class ChannelData:
    """Data arrived on a channel (in order, for a reliable channel)."""

    hashname: Hashname
    cid: ChannelId
    json: dict[str, Any]
    body: bytes


@dataclass(frozen=True, slots=True)
class ChannelEnded:
    """The peer sent ``end`` on a channel: no more data will come from it."""

    hashname: Hashname
    cid: ChannelId


@dataclass(frozen=True, slots=True)
class ChannelClosed:
    """A channel is gone. ``err`` is None for a clean close (both ends sent ``end``).

    Typical ``err`` values: ``"timeout"``, ``"unknown type"`` (sent by the peer),
    ``"new session"`` (the peer restarted: its channels are gone), ``"link down"``.
    """

    hashname: Hashname
    cid: ChannelId
    err: str | None


@dataclass(frozen=True, slots=True)
class PacketDropped:
    """A received datagram (or a part of one) was dropped; nothing changed because of it.

    ``reason`` is one of the fixed strings in :data:`p2pcloud.proto.mesh.DROP_REASONS`;
    ``path`` is where it came from.
    """

    reason: str
    path: Path


@dataclass(frozen=True, slots=True)
class PathChanged:
    """The path used to send to ``hashname`` changed (``old`` is None the first time)."""

    hashname: Hashname
    path: Path
    old: Path | None


MeshEvent = (
    LinkUp
    | LinkDown
    | ChannelOpened
    | ChannelData
    | ChannelEnded
    | ChannelClosed
    | PacketDropped
    | PathChanged
)
"""Every event type :meth:`Mesh.next_event` can return."""
