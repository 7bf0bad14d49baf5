"""Network paths: where a datagram comes from or goes to (telehash v3 ``SPEC:v3/routing.md``).

A :class:`Path` is the address the Trio shell hands to :meth:`Mesh.receive_datagram` and gets
back from :meth:`Mesh.datagrams_to_send`, and also the JSON object that telehash v3 peers put
in ``paths`` lists (link JSON, link URIs, the ``path`` channel).

Path types we know:

* ``udp4`` / ``udp6`` ``{"type","ip","port"}``: one datagram per packet, cloaked.
* ``tcp4`` / ``tcp6`` ``{"type","ip","port"}``: a chunked (or large-frame) TCP connection;
  the shell keys connections by the remote address.
* ``peer`` ``{"type":"peer","hn":<router>}``: reach the endpoint through a router we are
  linked to (``peer`` / ``connect`` channels). The mesh never hands a ``peer`` path to the
  shell: it resolves it to the router's own direct path.

Other v3 types (``http``, ``webrtc``, ...) are not supported: :meth:`Path.from_json` rejects
them, and a peer advertising them is simply not reachable that way.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from p2pcloud._ids import HASHNAME_LENGTH, Hashname
from p2pcloud.errors import MalformedPacket

__all__ = [
    "DIRECT_TYPES",
    "PATH_TYPES",
    "Path",
]

DIRECT_TYPES = frozenset({"udp4", "udp6", "tcp4", "tcp6"})
"""Path types that name an IP endpoint (``ip`` and ``port``)."""

PATH_TYPES = DIRECT_TYPES | {"peer"}
"""Every path type this mesh understands."""

MAX_PATH_JSON_VALUE = 64  # longest ip text we keep: an IPv6 address is at most 45 characters

_B32_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")


def is_hashname(value: object) -> bool:
    """Tell whether ``value`` looks like a v3 hashname (52 lowercase base32 characters).

    Args:
        value: anything taken from a peer's JSON.

    Returns:
        True when it is a string of exactly 52 base32 characters.
    """
    return (
        isinstance(value, str)
        and len(value) == HASHNAME_LENGTH
        and all(ch in _B32_ALPHABET for ch in value)
    )


@dataclass(frozen=True, slots=True)
class Path:
    """One way to reach an endpoint.

    Attributes:
        type: ``"udp4"``, ``"udp6"``, ``"tcp4"``, ``"tcp6"`` or ``"peer"``.
        ip: the IP address text (direct types only).
        port: the port (direct types only).
        hn: the router's hashname (``peer`` only).
    """

    type: str
    ip: str | None = None
    port: int | None = None
    hn: Hashname | None = None

    def __post_init__(self) -> None:
        """Check the fields fit the type (misuse by local code raises ``ValueError``)."""
        if self.type in DIRECT_TYPES:
            if self.ip is None or self.port is None or self.hn is not None:
                raise ValueError(f"a {self.type} path needs ip and port only: {self!r}")
            if not 0 <= self.port <= 0xFFFF:
                raise ValueError(f"port out of range: {self.port}")
        elif self.type == "peer":
            if self.hn is None or self.ip is not None or self.port is not None:
                raise ValueError(f"a peer path needs hn only: {self!r}")
        else:
            raise ValueError(f"unknown path type {self.type!r}")

    @classmethod
    def udp4(cls, ip: str, port: int) -> Path:
        """Build a ``udp4`` path.

        Args:
            ip: dotted IPv4 address.
            port: UDP port.

        Returns:
            The path.
        """
        return cls("udp4", ip=ip, port=port)

    @classmethod
    def tcp4(cls, ip: str, port: int) -> Path:
        """Build a ``tcp4`` path.

        Args:
            ip: dotted IPv4 address.
            port: TCP port.

        Returns:
            The path.
        """
        return cls("tcp4", ip=ip, port=port)

    @classmethod
    def peer(cls, router: Hashname) -> Path:
        """Build a ``peer`` path (reach an endpoint through ``router``).

        Args:
            router: the hashname of an endpoint we are linked to.

        Returns:
            The path.
        """
        return cls("peer", hn=router)

    @property
    def is_direct(self) -> bool:
        """True for an IP path (the shell can send to it), False for ``peer``."""
        return self.type in DIRECT_TYPES

    @property
    def is_udp(self) -> bool:
        """True for ``udp4`` / ``udp6``."""
        return self.type in ("udp4", "udp6")

    @property
    def is_tcp(self) -> bool:
        """True for ``tcp4`` / ``tcp6``."""
        return self.type in ("tcp4", "tcp6")

    def to_json(self) -> dict[str, Any]:
        """Return the v3 JSON form, e.g. ``{"type":"udp4","ip":"127.0.0.1","port":42424}``."""
        if self.type == "peer":
            return {"type": "peer", "hn": self.hn}
        return {"type": self.type, "ip": self.ip, "port": self.port}

    @classmethod
    def from_json(cls, obj: object) -> Path:
        """Parse a v3 path object from a peer (never trusts it).

        Args:
            obj: a decoded JSON value.

        Returns:
            The path.

        Raises:
            MalformedPacket: not an object, an unsupported type, or bad fields.
        """
        if not isinstance(obj, Mapping):
            raise MalformedPacket("path is not a JSON object")
        kind = obj.get("type")
        if kind == "peer":
            hn = obj.get("hn")
            if not is_hashname(hn):
                raise MalformedPacket("peer path without a valid hn")
            assert isinstance(hn, str)
            return cls("peer", hn=Hashname(hn))
        if kind not in DIRECT_TYPES:
            raise MalformedPacket(f"unsupported path type {str(kind)[:16]!r}")
        ip = obj.get("ip")
        port = obj.get("port")
        if not isinstance(ip, str) or len(ip) > MAX_PATH_JSON_VALUE:
            raise MalformedPacket("path ip is not a short string")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 0xFFFF:
            raise MalformedPacket("path port out of range")
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError as exc:
            raise MalformedPacket("path ip does not parse") from exc
        if (addr.version == 4) != kind.endswith("4"):
            raise MalformedPacket("path ip family does not match its type")
        return cls(kind, ip=str(addr), port=port)

    def __str__(self) -> str:
        """Short text for logs: ``udp4:127.0.0.1:4000`` or ``peer:abcdefgh``."""
        if self.type == "peer":
            return f"peer:{(self.hn or '')[:8]}"
        return f"{self.type}:{self.ip}:{self.port}"
