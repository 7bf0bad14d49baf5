"""Thing endpoints: the owner's node answers links to its things' hashnames.

Theory of operation
-------------------
A tag carries a thing's hashname and CS3a key (p2pcloud/things/tags.py). Whoever answers a
link to that hashname must hold the thing's key (telehash v3: the handshake proves it), and
a tag-only thing has no computer: its key is sealed to the owner's devices
(p2pcloud/things/thing.py ``open_thing_key``). So an owner device hosts the thing.

A home box may hold 10,000 things; it must open fast and stay small, so nothing is started
per thing at open. Instead:

* the tag lists **router paths**: the CS3a key and address of an owner device (docs/things.md
  "tag URI", path type 4). A scanner links that device (an ordinary link; strangers may link,
  they see no sub-cloud: ``Replication.may_read``) and opens a ``thinghost`` channel naming
  the thing's hashname: one CBOR request ``{v: 1, t: hashname}`` (our extension);
* the owner device **wakes** the thing: it opens the thing key and starts a lightweight
  endpoint for it (:class:`ThingHost`): a key-only :class:`~p2pcloud._node.node.Node` with the
  thing's identity, one UDP socket on the same address as the owner device, no store. It
  answers ``{v: 1, ok: true, paths: [...]}`` with that endpoint's paths;
* the scanner links the thing's hashname on those paths with the key from the tag (a normal
  telehash v3 link: the endpoint proves it holds the thing's key) and opens a ``thing``
  channel (p2pcloud/things/scan.py) to it. Requests are served against the owner device's
  replica of the thing's sub-cloud, so writes (inbox messages, scan events, spent claims)
  replicate to the other owner devices like any local write.

Bounds: at most ``MAX_HOSTED`` endpoints run at once (the least recently used one is stopped
to make room) and an endpoint stops after ``HOST_IDLE`` seconds without a request, so memory
and sockets stay bounded whatever the number of things.

Framing on ``thing`` and ``thinghost`` channels: each message is a 4-byte big-endian length
and that many bytes of CBOR, bounded by the receiver's limit.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import cbor2
import trio

from p2pcloud._crypto import LocalIdentity, is_hashname
from p2pcloud._ids import Hashname
from p2pcloud.errors import MalformedPacket

if TYPE_CHECKING:
    from p2pcloud._node.node import Node
    from p2pcloud._node.stream import ChannelStream

__all__ = [
    "HOST_CHANNEL",
    "HOST_IDLE",
    "MAX_HOSTED",
    "MAX_HOST_REQUEST",
    "ThingHost",
    "read_frame",
    "write_frame",
]

log = logging.getLogger("p2pcloud.things")

HOST_CHANNEL: Final = "thinghost"  # the wake-up channel to an owner device (our extension)
MAX_HOSTED: Final = 32
"""Thing endpoints running at once: each is one UDP socket and a small mesh; finders come
one at a time, so a few dozen cover bursts while bounding a 10,000-thing home box."""
HOST_IDLE: Final = 300.0
"""Seconds an endpoint lives without a request: long enough for a finder to read the card and
type a message, short enough that a box does not keep sockets for things nobody scans."""
MAX_HOST_REQUEST: Final = 256  # a wake request is a version and a 52-character hashname
FRAME: Final = struct.Struct(">I")
REQUEST_TIMEOUT: Final = 30.0  # seconds a peer may take to send one request frame


async def read_frame(stream: ChannelStream, limit: int) -> bytes | None:
    """Read one length-prefixed frame.

    Args:
        stream: the channel. limit: the largest frame accepted.

    Returns:
        The frame, or None when the peer ended the channel before a frame began.

    Raises:
        MalformedPacket: the frame is larger than ``limit`` or cut off.
    """
    buf = bytearray()
    need = FRAME.size
    size: int | None = None
    while True:
        while len(buf) < need:
            data = await stream.receive_some(max(1, min(need - len(buf), 1 << 16)))
            if not data:
                if not buf:
                    return None
                raise MalformedPacket("the frame was cut off")
            buf += data
        if size is None:
            (size,) = FRAME.unpack_from(buf)
            if size > limit:
                raise MalformedPacket(f"a frame of {size} bytes is larger than {limit}")
            del buf[:FRAME.size]
            need = size
            if size == 0:
                return b""
            continue
        return bytes(buf[:size])


async def write_frame(stream: ChannelStream, data: bytes) -> None:
    """Write one length-prefixed frame."""
    await stream.send_all(FRAME.pack(len(data)) + data)


def decode_wake(data: bytes) -> Hashname:
    """Decode a wake request ``{v: 1, t: hashname}``.

    Raises:
        MalformedPacket: anything else.
    """
    try:
        m = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises many types on hostile input; all mean malformed
        raise MalformedPacket(f"wake request is not CBOR: {exc}") from exc
    if not isinstance(m, dict) or m.get("v") != 1 or not is_hashname(m.get("t")):
        raise MalformedPacket("a wake request is {v: 1, t: hashname}")
    return Hashname(str(m["t"]))


@dataclass(eq=False)
class _Hosted:
    hashname: Hashname
    node: Node
    used: float
    stopping: bool = False
    nudge: trio.Event = field(default_factory=trio.Event)  # stop asked, or the idle time changed
    serving: int = 0

    def stop(self) -> None:
        self.stopping = True
        self.nudge.set()


Serve = Callable[[Hashname, "ChannelStream"], Awaitable[None]]


class ThingHost:
    """The bounded pool of thing endpoints of one owner device (module docstring)."""

    def __init__(self, bind: str, serve: Serve, *, max_hosted: int = MAX_HOSTED,
                 idle: float = HOST_IDLE) -> None:
        """Create the pool.

        Args:
            bind: the local address endpoints bind (the owner device's address).
            serve: ``serve(thing hashname, stream)`` answers one ``thing`` channel.
            max_hosted: endpoints running at once. idle: seconds before an idle one stops.
        """
        self.bind = bind
        self._serve = serve
        self.max_hosted = max_hosted
        self.idle = idle
        self._hosted: dict[Hashname, _Hosted] = {}
        self._starting: dict[Hashname, trio.Event] = {}
        self._nursery: trio.Nursery | None = None
        self.started = 0  # endpoints started since the node opened (statistics)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Own the endpoints' tasks; runs until cancelled (the node's nursery)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    @property
    def hosted(self) -> list[Hashname]:
        """Things whose endpoint runs now."""
        return list(self._hosted)

    async def wake(self, identity: LocalIdentity) -> list[dict[str, Any]]:
        """Make sure the thing's endpoint runs; return its v3 paths.

        Args:
            identity: the thing's keys (opened from its seal).

        Returns:
            The endpoint's paths (JSON objects).
        """
        hn = identity.hashname
        while hn in self._starting:
            await self._starting[hn].wait()
        hosted = self._hosted.get(hn)
        if hosted is None:
            if self._nursery is None:
                raise trio.ClosedResourceError("the thing host is not running")
            while len(self._hosted) >= self.max_hosted:
                oldest = min(self._hosted.values(), key=lambda h: h.used)
                self._hosted.pop(oldest.hashname, None)
                oldest.stop()
            done = trio.Event()
            self._starting[hn] = done
            try:
                hosted = await self._nursery.start(self._run_endpoint, identity)
            finally:
                del self._starting[hn]
                done.set()
        hosted.used = trio.current_time()
        return [p.to_json() for p in hosted.node.paths]

    async def _run_endpoint(self, identity: LocalIdentity, *,
                            task_status: trio.TaskStatus[_Hosted] = trio.TASK_STATUS_IGNORED
                            ) -> None:
        from p2pcloud._node.node import open_node

        hn = identity.hashname
        async with open_node(identity=identity, port=0, tcp_port=None, bind=self.bind) as node:
            hosted = _Hosted(hn, node, trio.current_time())

            async def handler(stream: ChannelStream) -> None:
                hosted.serving += 1
                hosted.used = trio.current_time()
                try:
                    await self._serve(hn, stream)
                finally:
                    hosted.serving -= 1
                    hosted.used = trio.current_time()

            from p2pcloud.things.scan import CHANNEL_TYPE

            node.serve_channel(CHANNEL_TYPE, handler)
            self._hosted[hn] = hosted
            self.started += 1
            task_status.started(hosted)
            try:
                while not hosted.stopping:
                    # sleep until it would be idle long enough (re-checked: a request may
                    # have come meanwhile), or until stopped or the idle time changes
                    with trio.move_on_at(hosted.used + self.idle):
                        await hosted.nudge.wait()
                    hosted.nudge = trio.Event()
                    if (hosted.serving == 0
                            and trio.current_time() - hosted.used >= self.idle):
                        break
            finally:
                if self._hosted.get(hn) is hosted:
                    del self._hosted[hn]
        log.debug("thing endpoint %s stopped", hn[:8])

    def stop(self, hashname: Hashname) -> None:
        """Stop a thing's endpoint (the thing was handed on, or its key is gone)."""
        hosted = self._hosted.pop(hashname, None)
        if hosted is not None:
            hosted.stop()

    def set_idle(self, seconds: float) -> None:
        """Change how long an endpoint lives without a request (running ones included)."""
        self.idle = seconds
        for hosted in self._hosted.values():
            hosted.nudge.set()
