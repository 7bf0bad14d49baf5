"""Channels as Trio objects: a reliable channel is a ``trio.abc.HalfCloseableStream``.

Theory of operation
-------------------
The mesh (pure) owns every channel's state: sequence numbers, acks, retransmits and the send
window. A :class:`ChannelStream` is the application's handle on one reliable channel and only
translates between the two worlds:

* ``send_all`` cuts the bytes into channel bodies no larger than ``Mesh.max_body`` (the path's
  MTU decides: about 1.3 KB on UDP, up to the negotiated frame size on a large-frame TCP path),
  and before each one waits until ``Mesh.send_capacity`` says the window has room: that is the
  flow control, the same window telehash v3 reliable channels use (e3x ``reliable.md``).
* ``receive_some`` reads from a queue the node fills from ``ChannelData`` events (in order:
  the mesh delivers a reliable channel's data in sequence). That queue counts against the
  channel's receive window: each packet the application has read to its end (empty ones
  included) is reported with ``Node._consume`` -> ``Mesh.consume``, which opens the window
  again. A reader that stops reading therefore stalls its sender after one window, and the
  queue holds at most about one window of packets (receive-side flow control, ours).
* ``send_eof`` sends ``end`` (v3: the last content packet); the peer reads ``b""``.
* ``aclose`` is a full close, like TCP's: it sends ``end`` if it was not sent yet, and if the
  peer's data is still arriving (or was left unread), the peer is told ``err: "closed"`` so its
  sends fail with ``BrokenResourceError`` instead of filling a buffer no one reads.

The node calls the ``_on_*`` methods from its event dispatch; they never block.
"""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from p2pcloud._ids import ChannelId, Hashname

if TYPE_CHECKING:
    from p2pcloud._node.node import Node

__all__ = [
    "DEFAULT_RECEIVE_SIZE",
    "ChannelPacket",
    "ChannelStream",
    "UnreliableChannel",
]

DEFAULT_RECEIVE_SIZE = 65_536  # bytes receive_some returns at most when no limit is given
LARGE_BODY = 16 * 1024  # a body this large is returned alone by receive_some, uncopied
CLOSED_ERR = "closed"  # the err a fully closed stream answers late data with (like a TCP RST)
MAX_UNRELIABLE_QUEUE = 256  # unreliable packets buffered unread; more are dropped, as on UDP


@dataclass(frozen=True, slots=True)
class ChannelPacket:
    """One channel packet as the application sees it: its JSON head fields and its body."""

    json: dict[str, Any] = field(default_factory=dict)
    body: bytes = b""


class _Busy:
    """Detects two tasks using one direction at once (trio streams forbid it)."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(f"another task is already in {self._what}")
        self._held = True

    def __exit__(self, *exc: object) -> None:
        self._held = False


class ChannelStream(trio.abc.HalfCloseableStream):
    """A reliable channel to a peer, as a Trio stream.

    Attributes:
        hashname: the peer.
        cid: the channel id inside the link.
        type: the channel type (``"echo"``, ``"sync"``...).
        open_json: the JSON head of the open packet (incoming channels: the peer's).
        error: the ``err`` the channel closed with, once it closed with one.
    """

    def __init__(
        self,
        node: Node,
        hashname: Hashname,
        cid: ChannelId,
        type: str,
        open_json: dict[str, Any] | None = None,
    ) -> None:
        """Create the handle; the node does this (``Node.open_channel`` or an acceptor)."""
        self._node = node
        self.hashname = hashname
        self.cid = cid
        self.type = type
        self.open_json = dict(open_json or {})
        self.error: str | None = None
        self._packets: deque[ChannelPacket] = deque()
        self._offset = 0  # bytes of _packets[0].body already read by receive_some
        self._buffered = 0
        self._eof = False  # the peer sent end
        self._eof_sent = False
        self._closed = False  # aclose() was called
        self._broken = False  # the channel is gone (peer err, timeout, link down)
        self._receive_wakeup = trio.Event()
        self._send_wakeup = trio.Event()
        self._send_busy = _Busy("send_all or wait_send_all_might_not_block")
        self._receive_busy = _Busy("receive_some")
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- called by the node ------------------------------------------------------------

    def _on_data(self, json: dict[str, Any], body: bytes) -> None:
        if self._closed:
            # Late data for a stream the application closed: tell the peer (module docstring).
            self._reset()
            return
        self._packets.append(ChannelPacket(json, body))
        self._buffered += len(body)
        self.bytes_received += len(body)
        self._receive_wakeup.set()

    def _reset(self) -> None:
        if not self._broken:
            self._broken = True
            self.error = CLOSED_ERR
            self._node._close_channel(self.hashname, self.cid, CLOSED_ERR)

    def _on_end(self) -> None:
        self._eof = True
        self._receive_wakeup.set()

    def _on_closed(self, err: str | None) -> None:
        if err is not None:
            self.error = err
            self._broken = True
        else:
            self._eof = True
            self._eof_sent = True
        self._receive_wakeup.set()
        self._send_wakeup.set()

    def _on_progress(self) -> None:
        self._send_wakeup.set()

    # -- sending -----------------------------------------------------------------------

    def _check_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this channel stream was closed")
        if self._broken:
            raise trio.BrokenResourceError(f"channel closed by the peer: {self.error}")
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof() was called on this channel stream")

    def _capacity(self) -> int:
        capacity = self._node._capacity(self.hashname, self.cid)
        if capacity < 0 and not self._broken and not self._closed:
            self._on_closed("link down" if self.hashname not in self._node.links else "gone")
        return capacity

    def _queue(
        self,
        body: bytes | memoryview,
        *,
        json: dict[str, Any] | None = None,
        end: bool = False,
        pump: bool = True,
    ) -> None:
        if not self._node._send(self.hashname, self.cid, body, json=json, end=end, pump=pump):
            self._on_closed("link down" if self.hashname not in self._node.links else "gone")
            self._check_send()

    async def _wait_capacity(self) -> None:
        while True:
            self._check_send()
            if self._capacity() > 0:
                return
            self._send_wakeup = trio.Event()
            self._node._blocked_senders.add(self)
            try:
                await self._send_wakeup.wait()
            finally:
                self._node._blocked_senders.discard(self)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data`` reliably and in order, waiting for window space as needed.

        Args:
            data: the bytes.

        Raises:
            trio.BusyResourceError: another task is sending on this stream.
            trio.ClosedResourceError: this stream was closed, or ``send_eof`` was called.
            trio.BrokenResourceError: the peer closed the channel or the link went down.
        """
        with self._send_busy:
            self._check_send()
            view = memoryview(data).cast("B")
            # bytes never change: its pieces go to the channel as read-only views, kept
            # uncopied until acked (the seal copies each once, into its packet). Anything
            # mutable is copied piece by piece: the caller may reuse it once we return.
            immutable = type(data) is bytes
            checkpointed = False
            while view:
                capacity = self._capacity()
                if capacity <= 0:
                    await self._wait_capacity()
                    checkpointed = True
                    capacity = self._capacity()
                self._check_send()
                size = self._node._max_body(self.hashname)
                # Queue as many packets as the window takes, then pump (and send) once.
                for _ in range(max(capacity, 1)):
                    if not view:
                        break
                    piece: bytes | memoryview = view[:size] if immutable else bytes(view[:size])
                    view = view[size:]
                    self._queue(piece, pump=False)
                    self.bytes_sent += len(piece)
                self._node._pump()
            if not checkpointed:
                await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the channel's window has room.

        Raises:
            trio.BusyResourceError: another task is sending on this stream.
            trio.ClosedResourceError: this stream was closed.
            trio.BrokenResourceError: the channel is gone.
        """
        with self._send_busy:
            if self._capacity() <= 0:
                await self._wait_capacity()
            else:
                self._check_send()
                await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        """Send ``end``: the peer reads EOF; we can still receive. Idempotent.

        Raises:
            trio.BusyResourceError: a send is in progress.
            trio.ClosedResourceError: this stream was closed.
        """
        with self._send_busy:
            if self._closed:
                raise trio.ClosedResourceError("this channel stream was closed")
            if self._eof_sent or self._broken:
                await trio.lowlevel.checkpoint()
                return
            await self._wait_capacity()  # end is a content packet: it needs window space
            self._eof_sent = True
            self._node._send(self.hashname, self.cid, b"", end=True)  # gone: nothing to end
            await trio.lowlevel.checkpoint()

    async def _end_later(self) -> None:
        while not self._broken:
            capacity = self._capacity()
            if capacity > 0:
                self._node._send(self.hashname, self.cid, b"", end=True)
                return
            if capacity < 0:
                return
            self._send_wakeup = trio.Event()
            self._node._blocked_senders.add(self)
            try:
                await self._send_wakeup.wait()
            finally:
                self._node._blocked_senders.discard(self)

    # -- receiving ---------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Read some bytes, waiting for at least one unless the peer ended.

        Args:
            max_bytes: the most bytes to return (default 64 KiB).

        Returns:
            Bytes, or ``b""`` once the peer sent ``end`` and everything was read.

        Raises:
            ValueError: ``max_bytes`` is below 1.
            TypeError: ``max_bytes`` is not an integer.
            trio.BusyResourceError: another task is receiving.
            trio.ClosedResourceError: this stream was closed.
            trio.BrokenResourceError: the channel closed with an error (timeout, peer err).
        """
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_SIZE
        else:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        with self._receive_busy:
            waited = await self._wait_readable()
            out = self._take(max_bytes)
            if not waited:
                await trio.lowlevel.checkpoint()
            if not out and self._broken:
                raise trio.BrokenResourceError(f"channel closed: {self.error}")
            return out

    def _take(self, max_bytes: int) -> bytes:
        """Take up to ``max_bytes`` from the queued packet bodies, copying as little as we can.

        Whole bodies that fit are returned as they are (one body: no copy at all), so a
        large-frame channel hands its 128 KB bodies to the application untouched; small
        bodies are joined, but never with a large one behind them (that would copy it).
        """
        packets = self._packets
        parts: list[bytes] = []
        size = 0
        done = 0
        while packets and not self._offset and not packets[0].body:
            packets.popleft()  # empty bodies (an open, JSON-only packets): nothing to read
            done += 1
        if packets and not self._offset and LARGE_BODY <= len(packets[0].body) <= max_bytes:
            body = packets.popleft().body  # a large body alone, as it is: no copy
            self._buffered -= len(body)
            self._credit(done + 1)
            return body
        while packets and size < max_bytes:
            body = packets[0].body
            if self._offset:
                body = body[self._offset :]
            room = max_bytes - size
            if size and len(body) >= LARGE_BODY:
                # a large body goes out alone next time: joining it would copy it. (Only
                # behind real bytes: empty bodies alone must never come out as b"", EOF.)
                break
            if len(body) <= room:
                parts.append(body)
                size += len(body)
                packets.popleft()
                done += 1
                self._offset = 0
            else:
                parts.append(body[:room])
                size += room
                self._offset += room
        self._buffered -= size
        self._credit(done)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _credit(self, count: int) -> None:
        """Report ``count`` packets read to the end: the channel's window opens again."""
        if count and not self._broken:
            self._node._consume(self.hashname, self.cid, count)

    async def _wait_readable(self) -> bool:
        waited = False
        while True:
            if self._closed:
                raise trio.ClosedResourceError("this channel stream was closed")
            if self._buffered or self._eof or self._broken:
                return waited
            # Drop empty packets (json-only) so they do not look like data.
            empty = 0
            while self._packets and not self._packets[0].body:
                self._packets.popleft()
                empty += 1
            self._credit(empty)
            self._receive_wakeup = trio.Event()
            await self._receive_wakeup.wait()
            waited = True

    async def receive_packet(self) -> ChannelPacket:
        """Read the next whole packet with its JSON head (for protocols that use the head).

        Returns:
            The packet (what is left of it, if ``receive_some`` read part of its body).

        Raises:
            trio.EndOfChannel: the peer sent ``end`` and every packet was read.
            trio.BusyResourceError: another task is receiving.
            trio.ClosedResourceError: this stream was closed.
            trio.BrokenResourceError: the channel closed with an error.
        """
        with self._receive_busy:
            while not self._packets:
                if self._closed:
                    raise trio.ClosedResourceError("this channel stream was closed")
                if self._broken:
                    raise trio.BrokenResourceError(f"channel closed: {self.error}")
                if self._eof:
                    raise trio.EndOfChannel
                self._receive_wakeup = trio.Event()
                await self._receive_wakeup.wait()
            packet = self._packets.popleft()
            if self._offset:
                packet = ChannelPacket(packet.json, packet.body[self._offset :])
                self._offset = 0
            self._buffered -= len(packet.body)
            self._credit(1)
            await trio.lowlevel.checkpoint()
            return packet

    async def send_packet(self, body: bytes = b"", *, json: dict[str, Any] | None = None) -> None:
        """Send one packet with extra JSON head fields (``body`` must fit ``max_body``).

        Args:
            body: the body.
            json: extra head fields (never ``c``, ``seq``, ``ack``...: the mesh sets those).

        Raises:
            trio.ClosedResourceError / trio.BrokenResourceError: as :meth:`send_all`.
        """
        with self._send_busy:
            await self._wait_capacity()
            self._queue(bytes(body), json=json)
            self.bytes_sent += len(body)
            await trio.lowlevel.checkpoint()

    # -- closing -----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the stream (even when cancelled). Idempotent.

        Sends ``end`` if it was not sent; if the peer has not ended (or data was left
        unread) the peer gets ``err: "closed"`` when more of its data arrives, or at once.
        """
        if not self._closed:
            self._closed = True
            if not self._broken:
                if self._buffered:
                    self._reset()
                elif not self._eof_sent:
                    self._eof_sent = True
                    if self._capacity() > 0:
                        self._node._send(self.hashname, self.cid, b"", end=True)
                    else:
                        # The window is full: send end once it has room, like a TCP FIN
                        # queued behind unsent data (aclose itself never blocks).
                        self._node._spawn(self._end_later)
            self._packets.clear()
            self._buffered = 0
            self._receive_wakeup.set()
            self._send_wakeup.set()
        await trio.lowlevel.checkpoint()


class UnreliableChannel:
    """An unreliable channel: packets may be lost or reordered, nothing is retransmitted.

    Attributes:
        hashname: the peer.
        cid: the channel id.
        type: the channel type.
        dropped: packets dropped because the application did not read them fast enough.
    """

    def __init__(self, node: Node, hashname: Hashname, cid: ChannelId, type: str) -> None:
        """Create the handle; the node does this."""
        self._node = node
        self.hashname = hashname
        self.cid = cid
        self.type = type
        self._send, self._receive = trio.open_memory_channel[ChannelPacket](MAX_UNRELIABLE_QUEUE)
        self.dropped = 0
        self.error: str | None = None
        self._closed = False

    def _on_data(self, json: dict[str, Any], body: bytes) -> None:
        try:
            self._send.send_nowait(ChannelPacket(json, body))
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.dropped += 1

    def _on_end(self) -> None:
        self._send.close()

    def _on_closed(self, err: str | None) -> None:
        self.error = err
        self._send.close()

    def _on_progress(self) -> None:
        return  # unreliable channels do not wait for window space

    async def send(self, body: bytes = b"", *, json: dict[str, Any] | None = None) -> None:
        """Send one packet (it may be lost).

        Args:
            body: the body (at most ``Mesh.max_body`` bytes).
            json: extra head fields.

        Raises:
            trio.ClosedResourceError: the channel was closed here.
            trio.BrokenResourceError: the channel is gone.
        """
        if self._closed:
            raise trio.ClosedResourceError("this channel was closed")
        if self.error is not None:
            raise trio.BrokenResourceError(f"channel closed: {self.error}")
        if not self._node._send(self.hashname, self.cid, bytes(body), json=json):
            self.error = self.error or "gone"
            raise trio.BrokenResourceError(f"channel closed: {self.error}")
        await trio.lowlevel.checkpoint()

    async def receive(self) -> ChannelPacket:
        """Wait for the next packet.

        Raises:
            trio.EndOfChannel: the channel ended.
            trio.ClosedResourceError: the channel was closed here.
        """
        return await self._receive.receive()

    async def aclose(self) -> None:
        """Close the channel. Idempotent."""
        if not self._closed:
            self._closed = True
            self._receive.close()
            if self.error is None:
                self._node._close_channel(self.hashname, self.cid, None)
        await trio.lowlevel.checkpoint()
