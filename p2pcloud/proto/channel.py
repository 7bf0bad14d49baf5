"""Channels: the reliable and unreliable channel state machines of Telehash v3 E3X.

Theory of operation
-------------------
A channel is one stream of inner packets inside a link. An inner packet is a pair
``(json, body)``: the decrypted LOB's JSON head and its binary body. This module owns
everything that happens *inside* one channel: sequence numbers, acks, misses, resends,
flow control, ``end``/``err`` and the channel timeouts. It knows nothing about exchanges,
encryption, paths or sockets: the mesh (``p2pcloud.proto.mesh``) routes each decrypted
inner packet to :meth:`Channel.receive` by its ``c``, and encrypts what
:meth:`Channel.packets_to_send` hands back. Like every protocol module it does no I/O and
reads no clock: ``now`` (seconds, any monotonic origin) comes in with every call.

The behaviour follows the v3 spec (``e3x/channels.md``, ``e3x/reliable.md``) and, where the
spec is vague, telehash-js 0.4.18 (e3x 0.2.3) as it behaves on the wire, so a JS peer
interoperates. docs/protocol/channels.md explains it for a newcomer; in short:

* Every packet carries ``c``; only the open (first) packet carries ``type``.
* Unreliable channels carry no ``seq``: packets are delivered as they arrive.
* Reliable channels number every content packet (``seq`` 1 is the open, ``end`` counts).
  The receiver delivers in order, buffers out-of-order packets up to its window, and
  confirms with ``ack`` (the highest seq delivered in order) and ``miss`` (deltas from the
  ack to each missing seq, the last delta being the window edge). The sender keeps every
  packet until it is acked, never sends a seq above ack + window, resends a missed packet
  at most once per second, and resends packets that stay unacked for ``RESEND_INTERVAL``.
* ``end`` on both sides (and our ``end`` acked) closes cleanly; ``err`` closes at once and
  drops all buffers; a timeout closes with ``err`` ``"timeout"``.
* Ours, all within what a v3 peer accepts (each marked "ours" where it is done): windows
  above 50 between p2pcloud peers, advertised as a lone ``miss`` edge; TCP-style fast
  retransmit after three bare acks without progress; the last ack said once more; a miss
  as soon as three packets wait behind a gap; misses that ask again for packets dropped
  beyond the window; no resend on a miss for a packet sent less than a round trip ago.

Events come out of :meth:`Channel.next_event` in order: :class:`DataReceived` for content,
:class:`EndReceived` once the peer's ``end`` is delivered, and exactly one
:class:`ChannelClosed` when the channel reaches ``CLOSED`` (``err`` None for a clean close).

Bad input from the peer never raises: it is dropped and counted by reason in
:meth:`Channel.statistics`. Only misuse of the local API raises
(:class:`~p2pcloud.errors.LocalProtocolError`).

Speed matters on the reliable path (bulk transfers, benchmarked against raw secretbox): the
in-order fast path does no scans, in-flight packets live in a dict keyed by seq, and misses
are only computed while gaps exist and a packet goes out.
"""

from __future__ import annotations

import abc
import enum
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from p2pcloud._ids import ChannelId
from p2pcloud.errors import LocalProtocolError, MalformedPacket

__all__ = [
    "ACK_DELAY",
    "CHANNEL_TIMEOUT",
    "DEFAULT_WINDOW",
    "HEAD_OVERHEAD",
    "MAX_MISS_SENT",
    "MAX_WINDOW",
    "MISS_REPEAT",
    "MISS_RESEND_INTERVAL",
    "RESEND_INTERVAL",
    "OutBody",
    "Channel",
    "ChannelClosed",
    "ChannelEvent",
    "ChannelState",
    "ChannelStatistics",
    "DataReceived",
    "EndReceived",
    "ReliableChannel",
    "UnreliableChannel",
    "accept_channel",
    "decode_miss",
    "encode_miss",
    "open_channel",
]

# -- limits and timers ----------------------------------------------------------------------

DEFAULT_WINDOW: Final = 50
"""Packets a receiver buffers beyond its ack; telehash-js e3x ``chan_inbuf``. A JS peer drops
any seq more than 50 above its ack, so 50 is also the send window towards it."""

MAX_WINDOW: Final = 1024
"""Largest window a channel may be configured with or a peer may advertise: bounds the
receive buffer and the send buffer (1024 x 1400 B inner packets = 1.4 MB per direction)."""

RECEIVE_SLACK: Final = DEFAULT_WINDOW
"""Extra seqs a receiver accepts beyond its advertised window edge: telehash-js has no send
window of its own (only a 100-packet ``chan_outbuf``) and overshoots ours by up to 50."""

RESEND_INTERVAL: Final = 2.0
"""Seconds a sent packet may stay unacked before it is resent; e3x ``chan_resend``."""

MISS_RESEND_INTERVAL: Final = 1.0
"""v3 reliable.md: a packet named in ``miss`` is resent at most once per second."""

MISS_THRESHOLD: Final = 3
"""Out-of-order packets held before a miss goes out at once: fewer is likely reordering."""

MISS_REPEAT: Final = MISS_RESEND_INTERVAL / 2
"""Seconds between repeats of our miss while gaps last. Senders resend a packet at most once
per MISS_RESEND_INTERVAL; repeating at that same period can land just inside their limit
each time and cost a whole extra second per loss (seen with telehash-js)."""

DUP_ACK_THRESHOLD: Final = 3
"""Bare acks without progress before the oldest unacked packet is resent (TCP's three)."""

ACK_DELAY: Final = 1.0
"""Seconds within which delivered data is acked; e3x ``chan_autoack`` and reliable.md."""

CHANNEL_TIMEOUT: Final = 10.0
"""Default channel timeout (OPENING, ENDED, unacked data); e3x ``chan_timeout``."""

MAX_CHANNEL_ID: Final = 0xFFFFFFFF
"""v3 channels.md: a channel id is a uint32 >= 1."""

MAX_TYPE_LENGTH: Final = 128
"""Longest channel ``type`` accepted on an open; real types are short words (path, peer)."""

MAX_ERR_LENGTH: Final = 256
"""A peer's ``err`` text is cut to this many characters before it reaches events and logs."""

MAX_MISS: Final = MAX_WINDOW + RECEIVE_SLACK + 1
"""digest §10.5: a ``miss`` cannot name more seqs than the largest receive buffer holds,
plus the window edge; longer lists are cut here so a hostile list costs bounded work."""

MAX_MISS_SENT: Final = 40
"""Longest ``miss`` we send: the gaps beyond it are reported once the first ones are filled.
It keeps our heads small (see HEAD_OVERHEAD) so a miss fits beside a full-size body."""

HEAD_OVERHEAD: Final = 360
"""Most bytes of JSON this layer adds to an application head (``c``, ``seq``, ``ack``,
``end`` and a ``MAX_MISS_SENT`` miss, with json.dumps' default separators; the open's
``type`` is not included). The mesh subtracts it when it computes the largest body."""

FLOW_RESTORE_ADVERTS: Final = 4
"""Ack-bearing packets that repeat the full window after a flow-controlled window reopened:
the sender keeps the last window it heard, and losing all four is unlikely; a lost one costs
only speed (a smaller window), never safety."""

MAX_UNRELIABLE_QUEUE: Final = 256
"""Unreliable packets queued between two :meth:`Channel.packets_to_send` calls."""

RESERVED_KEYS: Final = frozenset({"c", "type", "seq", "ack", "miss", "end", "err"})
"""Head keys the channel layer sets itself; the application may not put them in ``json``."""


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DataReceived:
    """A content packet was delivered (in order, on a reliable channel).

    ``json`` is the packet's full head as received (``c``, ``seq``, ``ack`` included; the
    open packet's ``type`` too), ``body`` its body. The open packet arrives this way as well.
    """

    json: dict[str, Any]
    body: bytes


@dataclass(frozen=True, slots=True)
class EndReceived:
    """The peer's ``end`` was delivered: it will send no more content on this channel.

    If the ``end`` packet carried a body or application keys, a :class:`DataReceived` for it
    comes first.
    """


@dataclass(frozen=True, slots=True)
class ChannelClosed:
    """The channel reached ``CLOSED``; emitted exactly once, always as the last event.

    ``err`` is None for a clean close (both sides sent ``end``, ours was acked), the peer's
    ``err`` text, ``"timeout"``, or the ``err`` given to a local :meth:`Channel.close`.
    """

    err: str | None


OutBody = bytes | memoryview
"""A body we send: bytes, or a read-only view of bytes that never change (kept uncopied)."""

ChannelEvent = DataReceived | EndReceived | ChannelClosed
"""Everything :meth:`Channel.next_event` can return."""


class ChannelState(enum.Enum):
    """v3 channels.md states, plus CLOSED for a channel that is gone."""

    OPENING = "opening"  # open sent or received, nothing seen the other way yet; times out
    OPEN = "open"  # packets seen both ways; no timeout of its own
    ENDED = "ended"  # the peer's end was delivered; times out when idle
    CLOSED = "closed"  # clean close, err or timeout; nothing more is delivered


@dataclass(frozen=True, slots=True)
class ChannelStatistics:
    """Counters of one channel, for logs, tests and benchmarks.

    ``sent`` counts content packets sent for the first time, ``resent`` their repeats,
    ``acks_sent`` bare acks, ``received`` every packet handed to :meth:`Channel.receive`,
    ``delivered`` content packets handed to the application, ``duplicates`` content packets
    seen before, ``dropped`` packets (or parts) ignored, by reason.
    """

    sent: int
    resent: int
    acks_sent: int
    received: int
    delivered: int
    duplicates: int
    dropped: Mapping[str, int]
    in_flight: int
    buffered: int


# -- miss encoding --------------------------------------------------------------------------


def encode_miss(ack: int, missing: list[int], capacity: int) -> list[int]:
    """Encode a v3 ``miss`` array (reliable.md, "miss delta encoding example").

    Args:
        ack: the ``ack`` sent alongside (highest seq delivered in order).
        missing: seqs above ``ack`` not received yet, in any order.
        capacity: receive buffer size; the last delta points at ``ack + capacity``, the first
            seq the receiver would drop (raised to the highest missing seq + 1 if needed).

    Returns:
        The deltas: from ``ack`` to each missing seq in ascending order, then to the edge.
    """
    out: list[int] = []
    last = ack
    for seq in sorted(set(missing)):
        if seq > last:
            out.append(seq - last)
            last = seq
    out.append(max(ack + capacity, last + 1) - last)
    return out


def decode_miss(ack: int, miss: object) -> tuple[list[int], int] | None:
    """Decode a peer's ``miss`` array; the inverse of :func:`encode_miss`.

    Args:
        ack: the ``ack`` that came with it.
        miss: the raw JSON value.

    Returns:
        ``(missing seqs ascending, window edge)``, or None if ``miss`` is not a non-empty list
        of positive integers (at most ``MAX_MISS`` of them are read).
    """
    if type(miss) is not list or not miss:
        return None
    seqs: list[int] = []
    last = ack
    for delta in miss[:MAX_MISS]:
        if type(delta) is not int or delta <= 0:
            return None
        last += delta
        seqs.append(last)
    edge = seqs.pop()
    return seqs, edge


# -- helpers --------------------------------------------------------------------------------


def _js_truthy(value: object) -> bool:
    """JavaScript truthiness: e3x tests ``if(packet.json.err)``, so ``[]`` is an error."""
    if value is None or value is False or value == "":
        return False
    return not (type(value) in (int, float) and value == 0)


def _err_text(value: object) -> str:
    """A peer's truthy ``err`` value as bounded text."""
    if isinstance(value, str):
        return value[:MAX_ERR_LENGTH]
    return "unknown error"


def _new_head(
    cid: ChannelId, json: Mapping[str, Any] | None, type: str | None = None
) -> dict[str, Any]:
    """A head with ``c`` (and ``type``) first, then the application's keys.

    Raises:
        LocalProtocolError: ``json`` uses a key the channel layer sets itself.
    """
    head: dict[str, Any] = {"c": cid} if type is None else {"c": cid, "type": type}
    if json:
        bad = RESERVED_KEYS.intersection(json)
        if bad:
            raise LocalProtocolError(
                f"head keys {sorted(bad)} are set by the channel layer; rename them"
            )
        head.update(json)
    return head


def _has_content(json: dict[str, Any], body: bytes) -> bool:
    """True if an ``end`` packet carries anything for the application."""
    return bool(body) or any(key not in RESERVED_KEYS for key in json)


class _Outgoing:
    """One reliable packet kept until acked."""

    __slots__ = ("body", "head", "queued", "resent_at", "sent_at")

    def __init__(self, head: dict[str, Any], body: OutBody) -> None:
        self.head = head
        self.body = body
        self.sent_at = 0.0  # last transmission (original or resend)
        self.resent_at: float | None = None  # last resend, for the once-per-second rule
        self.queued = False  # waiting in the resend queue


# -- the channels ---------------------------------------------------------------------------


class Channel(abc.ABC):
    """State shared by :class:`ReliableChannel` and :class:`UnreliableChannel`.

    Create channels with :func:`open_channel` (outgoing) or :func:`accept_channel`
    (incoming), not directly.

    Attributes:
        cid: the channel id (``c``).
        type: the channel type from the open packet.
        reliable: True for a reliable (seq/ack) channel.
        outgoing: True if we sent the open.
    """

    reliable: bool = False

    def __init__(
        self,
        cid: ChannelId,
        type: str,
        *,
        outgoing: bool,
        now: float,
        timeout: float = CHANNEL_TIMEOUT,
    ) -> None:
        self.cid = cid
        self.type = type
        self.outgoing = outgoing
        self._state = ChannelState.OPENING
        if not timeout > 0:
            raise LocalProtocolError("channel timeout must be a positive number of seconds")
        self._timeout = float(timeout)
        self._opened_at = now
        self._activity_at = now
        self._has_sent = False
        self._has_received = False
        self._peer_ended = False
        self._events: deque[ChannelEvent] = deque()
        self._err_out: str | None = None  # err packet still to send after a local close
        self._discard_at: float | None = None  # lingering after a clean close until then
        self._sent = 0
        self._resent = 0
        self._acks_sent = 0
        self._received = 0
        self._delivered = 0
        self._duplicates = 0
        self._dropped: dict[str, int] = {}

    # -- shared API ----------------------------------------------------------------------

    @property
    def state(self) -> ChannelState:
        """The current :class:`ChannelState`."""
        return self._state

    def next_event(self) -> ChannelEvent | None:
        """Return the next event, or None when there is none.

        Returns:
            :class:`DataReceived`, :class:`EndReceived` or :class:`ChannelClosed`, in order.
        """
        if self._events:
            return self._events.popleft()
        return None

    def can_forget(self, now: float) -> bool:
        """Whether the mesh may drop this channel from its table.

        A channel closed cleanly lingers for one channel timeout (v3 channels.md: "internal
        state will be tracked until the channel timeout") to re-ack a resent ``end``.

        Args:
            now: current time.

        Returns:
            True once the channel is CLOSED, its last packets were taken by
            :meth:`packets_to_send`, and any linger time has passed.
        """
        if self._state is not ChannelState.CLOSED or self._err_out is not None:
            return False
        return self._discard_at is None or now >= self._discard_at

    def close(self, err: str | None = None, *, now: float) -> None:
        """Close the channel from our side.

        With ``err`` the channel closes at once: an ``err`` packet goes to the peer, buffers
        are dropped, and :class:`ChannelClosed` ``(err)`` is emitted. Without it the close is
        graceful: an ``end`` is queued (even if :meth:`send_capacity` is 0) unless already
        sent, and the channel closes once the peer ends too, or with ``"timeout"`` when the
        peer stays silent for the channel timeout after our ``end``.

        Args:
            err: error text for an abortive close, or None for a graceful one.
            now: current time.
        """
        if self._state is ChannelState.CLOSED:
            return
        if err is None:
            self._close_gracefully(now)
            return
        self._err_out = str(err)[:MAX_ERR_LENGTH] or "closed"
        self._finish(self._err_out, now)

    def statistics(self) -> ChannelStatistics:
        """Return the channel's counters.

        Returns:
            A :class:`ChannelStatistics` snapshot.
        """
        return ChannelStatistics(
            sent=self._sent,
            resent=self._resent,
            acks_sent=self._acks_sent,
            received=self._received,
            delivered=self._delivered,
            duplicates=self._duplicates,
            dropped=dict(self._dropped),
            in_flight=self._in_flight(),
            buffered=self._buffered(),
        )

    def __repr__(self) -> str:
        kind = "reliable" if self.reliable else "unreliable"
        return f"<{type(self).__name__} c={self.cid} {self.type!r} {kind} {self._state.value}>"

    # -- hooks and shared internals -----------------------------------------------------

    @abc.abstractmethod
    def _in_flight(self) -> int:
        """Packets queued or sent and not yet acked."""

    @abc.abstractmethod
    def _buffered(self) -> int:
        """Out-of-order packets held for in-order delivery."""

    @abc.abstractmethod
    def _close_gracefully(self, now: float) -> None:
        """Queue our ``end`` and start the closing timeout."""

    @abc.abstractmethod
    def send(
        self,
        body: OutBody,
        *,
        json: Mapping[str, Any] | None = None,
        end: bool = False,
        now: float,
    ) -> None:
        """Queue one content packet (see the subclasses for the details).

        Args:
            body: the packet body.
            json: extra head keys (not ``c``/``type``/``seq``/``ack``/``miss``/``end``/``err``).
            end: mark this as our last content packet.
            now: current time.

        Raises:
            LocalProtocolError: closed, ``end`` already sent, no capacity, reserved key.
        """

    @abc.abstractmethod
    def send_capacity(self) -> int:
        """Return how many packets :meth:`send` accepts now (flow control)."""

    @abc.abstractmethod
    def receive(self, json: dict[str, Any], body: bytes, now: float) -> None:
        """Process one inner packet routed here by its ``c``; never raises on bad input.

        Args:
            json: the packet's JSON head.
            body: the packet's body.
            now: current time.
        """

    @abc.abstractmethod
    def packets_to_send(self, now: float) -> list[tuple[dict[str, Any], OutBody]]:
        """Take the ``(json, body)`` inner packets to encrypt and send now.

        Args:
            now: current time.

        Returns:
            Inner packets in order; the mesh should call this after every receive, send and
            handle_timer.
        """

    @abc.abstractmethod
    def get_timer(self) -> float | None:
        """Return the earliest deadline for :meth:`handle_timer`, or None."""

    @abc.abstractmethod
    def handle_timer(self, now: float) -> None:
        """Run the timers that are due.

        Args:
            now: current time.
        """

    def _drop(self, reason: str) -> None:
        self._dropped[reason] = self._dropped.get(reason, 0) + 1

    def _screened(self, json: object, body: object, now: float) -> bool:
        """Handle what every channel type treats alike; True when the packet is done with.

        A head that is not a dict, a body that is not bytes, or a packet of another channel
        is dropped and counted; an ``err`` closes the channel (v3 channels.md), unless it
        already is closed.
        """
        if type(json) is not dict or type(body) is not bytes:
            self._received += 1
            self._drop("bad packet")
            return True
        if json.get("c") != self.cid:
            self._received += 1
            self._drop("wrong channel")
            return True
        err = json.get("err")
        if err is not None and _js_truthy(err):
            self._received += 1
            if self._state is ChannelState.CLOSED:
                self._drop("closed")
            else:
                self._err_received(err, now)
            return True
        return False

    def _mark_received(self, now: float) -> None:
        self._received += 1
        self._activity_at = now
        if not self._has_received:
            self._has_received = True
            if self._has_sent and self._state is ChannelState.OPENING:
                self._state = ChannelState.OPEN

    def _mark_sent(self) -> None:
        if not self._has_sent:
            self._has_sent = True
            if self._has_received and self._state is ChannelState.OPENING:
                self._state = ChannelState.OPEN

    def _err_received(self, value: object, now: float) -> None:
        # v3 channels.md: an err closes at once and drops everything buffered.
        self._finish(_err_text(value), now)

    def _finish(self, err: str | None, now: float) -> None:
        """Enter CLOSED and emit the one ChannelClosed."""
        self._state = ChannelState.CLOSED
        if err is None and self.reliable:
            self._discard_at = now + self._timeout  # before _drop_buffers: keep the last ack
        self._drop_buffers()
        self._events.append(ChannelClosed(err))

    @abc.abstractmethod
    def _drop_buffers(self) -> None:
        """Forget buffered data in both directions (err, timeout or clean close)."""

    def _err_packet(self) -> list[tuple[dict[str, Any], OutBody]]:
        err = self._err_out
        self._err_out = None
        if err is None:
            return []
        return [({"c": self.cid, "err": err}, b"")]


class UnreliableChannel(Channel):
    """A channel without seq: packets go out as sent and are delivered as they arrive."""

    reliable = False

    def __init__(
        self,
        cid: ChannelId,
        type: str,
        *,
        outgoing: bool,
        now: float,
        timeout: float = CHANNEL_TIMEOUT,
    ) -> None:
        super().__init__(cid, type, outgoing=outgoing, now=now, timeout=timeout)
        self._queue: deque[tuple[dict[str, Any], bytes]] = deque()
        self._sent_end = False  # end queued by us
        self._closing = False  # close() without err: time out if the peer never ends

    def send(
        self,
        body: OutBody,
        *,
        json: Mapping[str, Any] | None = None,
        end: bool = False,
        now: float,
    ) -> None:
        """Queue one packet.

        Args:
            body: the packet body.
            json: extra head keys (not ``c``/``type``/``seq``/``ack``/``miss``/``end``/``err``).
            end: mark this as our last packet.
            now: current time.

        Raises:
            LocalProtocolError: the channel is closed, ``end`` was already sent, the queue
                is full (see :meth:`send_capacity`) or ``json`` uses a reserved key.
        """
        if self._state is ChannelState.CLOSED:
            raise LocalProtocolError(f"channel {self.cid} is closed")
        if self._sent_end:
            raise LocalProtocolError(f"channel {self.cid} already sent end")
        if len(self._queue) >= MAX_UNRELIABLE_QUEUE:
            raise LocalProtocolError("send queue full: wait until send_capacity() > 0")
        head = _new_head(self.cid, json)
        if end:
            head["end"] = True
            self._sent_end = True
        self._queue.append((head, bytes(body)))

    def send_capacity(self) -> int:
        """Packets that may be queued now.

        Returns:
            Free places in the send queue; 0 once ``end`` was sent or the channel closed.
        """
        if self._state is ChannelState.CLOSED or self._sent_end:
            return 0
        return MAX_UNRELIABLE_QUEUE - len(self._queue)

    def receive(self, json: dict[str, Any], body: bytes, now: float) -> None:
        """Process one inner packet routed to this channel. Never raises on bad input.

        Args:
            json: the packet's JSON head.
            body: the packet's body.
            now: current time.
        """
        if self._screened(json, body, now):
            return
        if self._state is ChannelState.CLOSED:
            self._received += 1
            self._drop("closed")
            return
        self._mark_received(now)
        if self._peer_ended:
            self._drop("after end")
            return
        end = json.get("end")
        if end is True:
            if _has_content(json, body):
                self._delivered += 1
                self._events.append(DataReceived(json, body))
            self._peer_ended = True
            self._events.append(EndReceived())
            self._state = ChannelState.ENDED
            if self._sent_end and not self._queue:
                self._finish(None, now)
            return
        if end is not None and end is not False:
            self._drop("bad end")
        self._delivered += 1
        self._events.append(DataReceived(json, body))

    def packets_to_send(self, now: float) -> list[tuple[dict[str, Any], OutBody]]:
        """Take the packets to encrypt and send now.

        Args:
            now: current time.

        Returns:
            ``(json, body)`` inner packets, in order.
        """
        if self._state is ChannelState.CLOSED:
            self._queue.clear()
            return self._err_packet()
        if not self._queue:
            return []
        out: list[tuple[dict[str, Any], OutBody]] = list(self._queue)
        self._queue.clear()
        self._sent += len(out)
        self._mark_sent()
        if self._sent_end and self._peer_ended:
            self._finish(None, now)
        return out

    def get_timer(self) -> float | None:
        """Return the earliest time :meth:`handle_timer` must be called, or None.

        Returns:
            A deadline in the same clock as ``now``, or None when nothing is timed.
        """
        state = self._state
        if state is ChannelState.CLOSED:
            return self._discard_at
        if state is ChannelState.OPENING:
            return self._opened_at + self._timeout
        if state is ChannelState.ENDED or self._closing:
            return self._activity_at + self._timeout
        return None

    def handle_timer(self, now: float) -> None:
        """Run the timers that are due.

        Args:
            now: current time.
        """
        if self._state is ChannelState.CLOSED:
            if self._discard_at is not None and now >= self._discard_at:
                self._discard_at = None
            return
        deadline = self.get_timer()
        if deadline is not None and now >= deadline:
            # closed locally only: nobody waits on acks here, and an unanswered one-shot
            # packet (an open with end) should not draw an err back to its sender
            self._finish("timeout", now)

    def _close_gracefully(self, now: float) -> None:
        self._closing = True
        self._activity_at = max(self._activity_at, now)
        if not self._sent_end:
            self._sent_end = True
            self._queue.append(({"c": self.cid, "end": True}, b""))

    def _drop_buffers(self) -> None:
        self._queue.clear()

    def _in_flight(self) -> int:
        return len(self._queue)

    def _buffered(self) -> int:
        return 0  # unreliable packets are delivered as they arrive, never held


class ReliableChannel(Channel):
    """A reliable channel: ordered delivery, acks, misses, resends and a send window.

    Args:
        window: packets we buffer beyond our ack (our receive window, advertised in ``miss``)
            and the most we keep in flight; the peer's advertised window (``miss`` edge,
            ``DEFAULT_WINDOW`` until it says otherwise) caps the latter too.
        flow_control: ours: delivered data counts against the receive window until the
            application consumes it (:meth:`consume`), so the window reflects what the
            application has read, not what was handed to the event queue.
    """

    reliable = True

    def __init__(
        self,
        cid: ChannelId,
        type: str,
        *,
        outgoing: bool,
        now: float,
        timeout: float = CHANNEL_TIMEOUT,
        window: int = DEFAULT_WINDOW,
        flow_control: bool = False,
    ) -> None:
        super().__init__(cid, type, outgoing=outgoing, now=now, timeout=timeout)
        if _bad_window(window):
            raise LocalProtocolError(f"window must be an int in 1..{MAX_WINDOW}")
        self._window = window
        self._peer_window = DEFAULT_WINDOW  # telehash-js drops seqs > ack + 50
        # sending side
        self._out: dict[int, _Outgoing] = {}  # seq -> packet, for acked < seq <= last_seq
        self._last_seq = 0  # highest seq given to send()
        self._next_unsent = 1  # lowest seq never transmitted
        self._acked = 0  # highest seq the peer acked
        self._progress_at = now  # last time the peer's ack advanced (or data went out idle)
        self._feedback_at = now  # last ack advance or loss report (miss) from the peer
        self._resend: list[int] = []  # seqs to resend on the next packets_to_send
        self._min_rtt: float | None = None  # smallest ack round trip seen (None: no sample)
        self._dup_acks = 0  # bare acks in a row without progress (see _on_dup_ack)
        self._end_seq: int | None = None  # seq of our end
        self._closing = False
        # receiving side
        self._in_done = 0  # highest seq delivered in order (our ack)
        self._inbuf: dict[int, tuple[dict[str, Any], bytes]] = {}  # out-of-order packets
        self._in_max = 0  # highest seq in _inbuf
        self._seen_max = 0  # highest seq seen beyond in_done, held or dropped (gaps below)
        self._in_end: int | None = None  # seq of the peer's end, once seen
        self._ack_sent = 0  # last ack value we sent
        self._ack_repeated = 0  # last ack value we sent twice (see packets_to_send)
        self._ack_due: float | None = None  # when a (bare) ack must go out
        self._ack_every = max(1, min(window, DEFAULT_WINDOW) // 4)  # see _set_peer_window
        # ours: a non-default window is advertised as a lone edge delta (see packets_to_send)
        self._advert: list[int] | None = None if window == DEFAULT_WINDOW else [window]
        # content packets carry it until the peer acks one (they all carried it till then)
        self._advertising = self._advert is not None
        self._recv_limit = window + RECEIVE_SLACK
        # ours, receive-side flow control (see consume()): delivered content packets the
        # application has not consumed yet still count against our receive window
        self._flow_control = flow_control
        self._unread = 0  # DataReceived handed out and not yet consumed
        self._edge_sent = window  # the window edge (absolute seq) our last ack announced
        self._restore_adverts = 0  # see _flow_advert

    # -- sending -------------------------------------------------------------------------

    def send(
        self,
        body: OutBody,
        *,
        json: Mapping[str, Any] | None = None,
        end: bool = False,
        now: float,
    ) -> None:
        """Queue one content packet; it is kept until the peer acks it.

        Args:
            body: the packet body. ``bytes`` and read-only memoryviews are kept as they are
                until acked (no copy: the caller promises the bytes under a view do not
                change, e.g. a view of a ``bytes`` object); anything else is copied.
            json: extra head keys (not ``c``/``type``/``seq``/``ack``/``miss``/``end``/``err``).
            end: mark this as our last content packet.
            now: current time.

        Raises:
            LocalProtocolError: the channel is closed, ``end`` was already sent, the send
                buffer is full (see :meth:`send_capacity`) or ``json`` uses a reserved key.
        """
        if self._state is ChannelState.CLOSED:
            raise LocalProtocolError(f"channel {self.cid} is closed")
        if self._end_seq is not None:
            raise LocalProtocolError(f"channel {self.cid} already sent end")
        if self.send_capacity() <= 0:
            raise LocalProtocolError("send buffer full: wait until send_capacity() > 0")
        head = _new_head(self.cid, json) if json else {"c": self.cid}
        if type(body) is not bytes and not (type(body) is memoryview and body.readonly):
            body = bytes(body)  # a mutable buffer could change before it is acked
        self._queue_packet(head, body, end)

    def _queue_packet(self, head: dict[str, Any], body: OutBody, end: bool) -> None:
        seq = self._last_seq + 1
        head["seq"] = seq
        if end:
            head["end"] = True
            self._end_seq = seq
        self._out[seq] = _Outgoing(head, body)
        self._last_seq = seq

    def send_capacity(self) -> int:
        """Packets that may be queued now (flow control).

        The send buffer holds one send window in flight plus one window waiting, like
        telehash-js (window 50, ``chan_outbuf`` 100).

        Returns:
            How many more :meth:`send` calls will be accepted now; 0 once ``end`` was sent
            or the channel closed.
        """
        if self._state is ChannelState.CLOSED or self._end_seq is not None:
            return 0
        window = self._window if self._window < self._peer_window else self._peer_window
        free = self._acked + 2 * window - self._last_seq
        return free if free > 0 else 0

    def packets_to_send(self, now: float) -> list[tuple[dict[str, Any], OutBody]]:
        """Take the packets to encrypt and send now: resends, new data, a bare ack.

        Every packet carries our current ``ack`` (once we delivered something) and, while
        out-of-order packets are buffered, a ``miss``.

        Args:
            now: current time.

        Returns:
            ``(json, body)`` inner packets, in order. The dicts are fresh; the caller may
            keep them.
        """
        if self._state is ChannelState.CLOSED:
            last = self._err_packet()
            if self._discard_at is not None and self._ack_due is not None and now >= self._ack_due:
                last.append((self._ack_head(self._in_done, None), b""))
                self._acks_sent += 1
                self._ack_sent = self._in_done
                self._ack_due = None
            return last
        # new data may go up to ack + window (v3 reliable.md: never above it)
        window = self._window if self._window < self._peer_window else self._peer_window
        limit = self._acked + window
        if limit > self._last_seq:
            limit = self._last_seq
        ack_due = self._ack_due is not None and now >= self._ack_due
        if not (self._resend or self._next_unsent <= limit or ack_due):
            return []  # the common case while receiving: nothing to send, no miss to build
        out: list[tuple[dict[str, Any], OutBody]] = []
        real_done = self._in_done
        if self._flow_control:
            edge = real_done - self._unread + self._window
            # ours: with the window full, hold back the ack of the last packet we hold, so
            # the edge (ack + 1) stays ahead of the ack as v3 miss deltas must (see consume)
            in_done = real_done if real_done < edge else edge - 1
        else:
            edge = real_done + self._window
            in_done = real_done
        if self._seen_max > real_done:
            miss: list[int] | None = self._miss(in_done, edge)
            if self._flow_control and edge - in_done != self._window:
                self._restore_adverts = FLOW_RESTORE_ADVERTS  # see _flow_advert
        elif self._flow_control:
            miss = self._flow_advert(in_done, edge)
        elif self._advertising:
            miss = self._advert  # announce a non-default window until a packet with it is acked
        else:
            miss = None
        with_ack = in_done > 0 or miss is not None  # a miss is read relative to its ack
        # resends first: they are what the peer is waiting for
        if self._resend:
            outq = self._out
            top = self._acked + window
            for seq in sorted(self._resend):
                entry = outq.get(seq)
                if entry is None:
                    continue  # acked meanwhile
                if seq > top:
                    entry.queued = False  # the peer shrank its window meanwhile
                    continue
                entry.queued = False
                entry.sent_at = now
                head = entry.head.copy()
                if with_ack:
                    head["ack"] = in_done
                    if miss is not None:
                        head["miss"] = miss
                out.append((head, entry.body))
            self._resend.clear()
            self._resent += len(out)
        seq = self._next_unsent
        if seq <= limit:
            if self._acked == seq - 1:
                self._progress_at = now  # nothing was in flight: the timeout starts now
            outq = self._out
            count = limit - seq + 1
            while seq <= limit:
                entry = outq[seq]
                entry.sent_at = now
                head = entry.head.copy()
                if with_ack:
                    head["ack"] = in_done
                    if miss is not None:
                        head["miss"] = miss
                out.append((head, entry.body))
                seq += 1
            self._next_unsent = seq
            self._sent += count
        if out:
            self._mark_sent()
        elif ack_due:
            if in_done == self._ack_sent and edge == self._edge_sent:
                self._ack_repeated = in_done  # this bare ack is the repeat
            if miss is None and not self._flow_control:
                miss = self._advert
            out.append((self._ack_head(in_done, miss), b""))
            self._acks_sent += 1
            self._mark_sent()
        else:
            return out
        self._ack_sent = in_done
        self._edge_sent = edge
        if self._seen_max > real_done:
            self._ack_due = now + MISS_REPEAT  # repeat the miss while gaps last
        elif in_done != self._ack_repeated:
            # ours: say the last ack once more after ACK_DELAY, so a lost ack does not
            # leave the sender stalled until its RESEND_INTERVAL resends a whole window
            self._ack_due = now + ACK_DELAY
        else:
            self._ack_due = None
        return out

    def _ack_head(self, ack: int, miss: list[int] | None) -> dict[str, Any]:
        # v3 reliable.md: an ad-hoc ack carries no seq; telehash-js sends "ack":0 too.
        head: dict[str, Any] = {"c": self.cid, "ack": ack}
        if miss is not None:
            head["miss"] = miss
        return head

    def _flow_advert(self, ack: int, edge: int) -> list[int] | None:
        """The lone edge delta a flow-controlled channel puts beside ``ack``, or None.

        The sender keeps the last window it was told (v3: "cache the total delta number as
        the maximum window size"), so a reduced window goes on every ack-bearing packet,
        and the full one on the next ``FLOW_RESTORE_ADVERTS`` after it came back.
        """
        capacity = edge - ack
        if capacity != self._window:
            self._restore_adverts = FLOW_RESTORE_ADVERTS
            return [capacity]
        if self._restore_adverts:
            self._restore_adverts -= 1
            return [capacity]
        return self._advert if self._advertising else None

    def consume(self, count: int, now: float) -> bool:
        """Credit the receive window with content packets the application has consumed.

        Ours (receive-side flow control, on when the channel was made with
        ``flow_control=True``): every :class:`DataReceived` counts against our receive
        window until it is consumed, so the window edge we advertise is ``consumed +
        window`` and a sender facing a reader that stopped reading stalls after one window.
        When the window is full, our ack holds back the last packet we hold, so the edge
        stays one above the ack (a v3 miss delta is positive). Consuming counts as activity
        for the idle timeout of an ``ENDED`` channel. A channel without flow control
        ignores this call.

        Args:
            count: packets consumed (each :class:`DataReceived` is one); more than are
                unread is cut to what is unread.
            now: current time.

        Returns:
            True when the caller must act: an ack is due now (:meth:`packets_to_send`), or
            a new deadline was set (:meth:`get_timer` moved). False: nothing changed that
            needs a call before the deadline already known.
        """
        if not self._flow_control or count <= 0 or not self._unread:
            return False
        self._unread = self._unread - count if count < self._unread else 0
        if self._state is ChannelState.CLOSED:
            return False
        # reading is activity: an ENDED channel's idle timeout must not fire while our own
        # application is still reading what the peer sent before its end
        self._activity_at = now
        edge = self._in_done - self._unread + self._window
        if edge <= self._edge_sent:
            return False
        if edge - self._edge_sent >= self._ack_every or (
            self._in_done >= self._edge_sent and not self._unread
        ):
            # a quarter window opened, or the sender has used all the window it was given
            # and our reader has drained everything (it would starve): update it now.
            # Smaller openings ride on the next ack or ACK_DELAY, as long as the reader has
            # data left (TCP's receiver silly-window avoidance): an update per packet read
            # doubled the packets of a bulk transfer. (While nobody reads, the edge does not
            # move, so acking on arrival would not let the sender send more.)
            self._ack_due = now
            return True
        if self._ack_due is None:
            self._ack_due = now + ACK_DELAY
            return True  # a new deadline
        return False

    @property
    def unread(self) -> int:
        """Content packets delivered and not yet consumed (0 without flow control)."""
        return self._unread

    def _miss(self, ack: int, edge: int) -> list[int]:
        """Our miss array: every gap below the highest seq seen, then the window edge."""
        inbuf = self._inbuf
        last = ack
        # reliable.md example: the edge is the highest acceptable seq (ack + buffer size);
        # a JS peer's overshoot into the slack moves it up to what we really hold
        if edge < self._in_max:
            edge = self._in_max
        # gaps run up to the highest seq seen (dropped ones too), below the edge
        top = self._seen_max if self._seen_max < edge else edge - 1
        out: list[int] = []
        for seq in range(self._in_done + 1, top + 1):
            if seq not in inbuf:
                out.append(seq - last)
                last = seq
                if len(out) == MAX_MISS_SENT - 1:
                    break  # the rest next time; the edge below stays right
        out.append(edge - last if edge > last else 1)
        return out

    # -- receiving -----------------------------------------------------------------------

    def receive(self, json: dict[str, Any], body: bytes, now: float) -> None:
        """Process one inner packet routed to this channel. Never raises on bad input.

        Args:
            json: the packet's JSON head.
            body: the packet's body.
            now: current time.
        """
        if self._screened(json, body, now):
            return
        if self._state is ChannelState.CLOSED:
            self._receive_closed(json, now)
            return
        self._mark_received(now)

        ack = json.get("ack")
        if ack is not None:
            if type(ack) is not int or ack < 0:
                self._drop("bad ack")
                return
            if ack > self._next_unsent - 1:
                self._drop("ack beyond sent")
                return
            miss = json.get("miss")
            if ack > self._acked:
                self._on_ack(ack, now)
                self._feedback_at = now
            elif ack == self._acked and "seq" not in json and ack < self._next_unsent - 1:
                if type(miss) is list and len(miss) == 1 and miss[0] == 1:
                    # ours: a flow-controlled receiver whose window is full holds back the
                    # ack of the last packet it holds and says "edge = ack + 1". It is
                    # alive and waiting for its reader: neither a loss nor a timeout (TCP's
                    # persist state; our resend timer is the window probe)
                    self._progress_at = now
                    self._feedback_at = now
                    self._dup_acks = 0
                else:
                    self._on_dup_ack(now)
            if miss is not None:
                self._on_miss(ack, miss, now)
            if self.state is ChannelState.CLOSED:
                return  # our end got acked and the peer had ended: clean close
        elif "miss" in json:
            self._drop("miss without ack")

        seq = json.get("seq")
        if seq is None:
            return  # a bare ack
        if type(seq) is not int or seq < 1:
            self._drop("bad seq")
            return
        done = self._in_done
        if seq <= done or seq in self._inbuf:
            # already have it: the peer missed our ack, answer at once (as e3x does)
            self._duplicates += 1
            self._ack_due = now
            return
        if seq > done + self._recv_limit - self._unread:
            self._drop("beyond window")
            self._ack_due = now
            # ours: remember it, so our miss asks for it again once the window moves;
            # telehash-js has no send window and resends only what a miss names
            if (
                self._seen_max < seq <= done + 4 * self._recv_limit
                and (self._in_end is None or seq <= self._in_end)
            ):
                self._seen_max = seq
            return
        in_end = self._in_end
        end = json.get("end")
        if end is True:
            if in_end is not None or seq < self._in_max:
                self._drop("bad end")  # a second end, or content buffered after it
                return
            self._in_end = seq
            if self._seen_max > seq:
                self._seen_max = seq  # seqs we dropped beyond it were never content
        elif in_end is not None and seq > in_end:
            self._drop("after end")
            return
        elif end is not None and end is not False:
            self._drop("bad end")
        if seq == done + 1:
            self._deliver(json, body, end is True)
            if self._inbuf:
                self._drain()
                self._ack_due = now  # a gap was filled: tell the sender at once
            if self._peer_ended:
                self._ack_due = now  # ack the end at once, then maybe close cleanly
                self._check_done(now)
            elif (
                self._in_done
                if self._unread < self._window
                else self._in_done - self._unread + self._window - 1  # see packets_to_send
            ) - self._ack_sent >= self._ack_every:
                self._ack_due = now
            elif self._ack_due is None:
                self._ack_due = now + ACK_DELAY
            return
        self._inbuf[seq] = (json, body)
        if seq > self._in_max:
            self._in_max = seq
            if seq > self._seen_max:
                self._seen_max = seq
        held = len(self._inbuf)
        if held * 2 > self._window or held == MISS_THRESHOLD:
            # v3 reliable.md: over half full, send a miss; ours: also once a few packets
            # wait behind a gap (TCP's three duplicate acks), so one lost packet costs a
            # round trip, not ACK_DELAY (or a RESEND_INTERVAL if that miss is lost)
            self._ack_due = now
        elif self._ack_due is None:
            self._ack_due = now + ACK_DELAY

    def _deliver(self, json: dict[str, Any], body: bytes, end: bool) -> None:
        self._in_done += 1
        if end:
            if _has_content(json, body):
                self._delivered += 1
                self._events.append(DataReceived(json, body))
                if self._flow_control:
                    self._unread += 1
            self._peer_ended = True
            self._events.append(EndReceived())
            self._state = ChannelState.ENDED
        else:
            self._delivered += 1
            self._events.append(DataReceived(json, body))
            if self._flow_control:
                self._unread += 1

    def _drain(self) -> None:
        inbuf = self._inbuf
        while inbuf:
            packet = inbuf.pop(self._in_done + 1, None)
            if packet is None:
                break
            json, body = packet
            self._deliver(json, body, json.get("end") is True)
        if not inbuf:
            self._in_max = 0

    def _on_ack(self, ack: int, now: float) -> None:
        outq = self._out
        newest = outq[ack]
        if newest.resent_at is None:
            # Karn: time only packets sent once; the minimum filters out ack delays
            sample = now - newest.sent_at
            if self._min_rtt is None or sample < self._min_rtt:
                self._min_rtt = sample
        for seq in range(self._acked + 1, ack + 1):
            del outq[seq]
        self._acked = ack
        self._progress_at = now
        self._dup_acks = 0
        self._advertising = False  # the peer got a packet with our window: stop repeating it
        if self._end_seq is not None and ack >= self._end_seq:
            self._check_done(now)

    def _on_dup_ack(self, now: float) -> None:
        # ours (TCP's fast retransmit): bare acks that keep naming the same seq while we
        # have more in flight mean acked + 1 is lost. telehash-js acks every packet but
        # never names a gap below its lowest buffered seq in miss, so without this the
        # first loss in a window would wait for RESEND_INTERVAL.
        # Bare acks come from packets the peer got after acked + 1 was due, so no round-trip
        # guard here (unlike a miss); reordering may cost one needless resend, as in TCP.
        self._dup_acks += 1
        if self._dup_acks < DUP_ACK_THRESHOLD:
            return
        entry = self._out[self._acked + 1]
        if entry.queued:
            return
        if entry.resent_at is not None and entry.resent_at + MISS_RESEND_INTERVAL > now:
            return  # v3 reliable.md: at most once per second; later dup acks try again
        self._dup_acks = 0
        entry.resent_at = now
        entry.queued = True
        self._resend.append(self._acked + 1)

    def _on_miss(self, ack: int, miss: object, now: float) -> None:
        if type(miss) is list and len(miss) == 1 and type(miss[0]) is int and miss[0] > 0:
            # fast path: only the window edge (a window advertisement, or JS's [50])
            if ack < self._acked:
                return  # ours: a reordered old packet; its window is relative to a stale ack
            capacity = miss[0]
            self._set_peer_window(capacity if capacity <= MAX_WINDOW else MAX_WINDOW)
            return
        if type(miss) is not list:
            self._drop("bad miss")
            return
        if len(miss) > MAX_MISS:
            self._drop("miss too long")  # cut, digest §10.5
        decoded = decode_miss(ack, miss)
        if decoded is None:
            self._drop("bad miss")
            return
        seqs, edge = decoded
        if seqs:
            # the peer is alive and names its losses: misses, not RESEND_INTERVAL, drive
            # the resends until it goes quiet (ours; saves resending what it holds)
            self._feedback_at = now
        capacity = edge - ack
        # v3 reliable.md: the total delta is the peer's window; never send beyond it.
        # ours: not from a reordered old packet, whose edge is relative to a stale ack (a
        # flow-controlled peer's window shrinks as its ack grows; the edge never moves back)
        if ack >= self._acked:
            self._set_peer_window(capacity if capacity <= MAX_WINDOW else MAX_WINDOW)
        sent_max = self._next_unsent - 1
        # a peer may shrink its window: resends stay inside it too
        window = self._window if self._window < self._peer_window else self._peer_window
        top = self._acked + window
        outq = self._out
        rtt = self._min_rtt or 0.0  # without a sample, resend at once as e3x does
        for seq in seqs:
            if seq > sent_max:
                self._drop("miss out of range")
                break
            if seq > top:
                break
            entry = outq.get(seq)
            if entry is None or entry.queued:
                continue  # acked already (or stale), or queued for resend already
            if entry.resent_at is not None and entry.resent_at + MISS_RESEND_INTERVAL > now:
                continue  # v3 reliable.md: at most once per second
            if entry.sent_at + rtt > now:
                continue  # ours: sent less than a round trip ago, this miss predates it
            entry.resent_at = now
            entry.queued = True
            self._resend.append(seq)

    def _set_peer_window(self, window: int) -> None:
        if window != self._peer_window:
            self._peer_window = window
            # ack often enough for the peer's send window: min(its window, ours)
            self._ack_every = max(1, min(self._window, window) // 4)

    def _receive_closed(self, json: dict[str, Any], now: float) -> None:
        self._received += 1
        seq = json.get("seq")
        if (
            self._discard_at is not None
            and type(seq) is int
            and 0 < seq <= self._in_done
        ):
            # lingering after a clean close: the peer missed our ack of its end
            self._duplicates += 1
            self._ack_due = now
            return
        if self._discard_at is not None and seq is None:
            return  # a late bare ack while lingering: normal, nothing to do
        self._drop("closed")

    def _check_done(self, now: float) -> None:
        # v3 channels.md: both sides sent end (and ours was acked): a clean close.
        if (
            self._peer_ended
            and self._end_seq is not None
            and self._acked >= self._end_seq
            and self._state is not ChannelState.CLOSED
        ):
            self._finish(None, now)

    def _close_gracefully(self, now: float) -> None:
        self._closing = True
        self._activity_at = max(self._activity_at, now)
        if self._end_seq is None:
            self._queue_packet({"c": self.cid}, b"", True)

    def _drop_buffers(self) -> None:
        self._out.clear()
        self._resend.clear()
        self._inbuf.clear()
        self._in_max = 0
        self._unread = 0
        if self._discard_at is None or self._in_done == self._ack_sent:
            self._ack_due = None  # gone, or lingering with nothing owed: no repeats

    def _in_flight(self) -> int:
        return len(self._out)

    def _buffered(self) -> int:
        return len(self._inbuf)

    # -- timers --------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """Return the earliest time :meth:`handle_timer` or :meth:`packets_to_send` has work.

        Returns:
            A deadline in the same clock as ``now``, or None when nothing is timed.
        """
        state = self._state
        if state is ChannelState.CLOSED:
            if self._discard_at is None:
                return None
            if self._ack_due is not None and self._ack_due < self._discard_at:
                return self._ack_due
            return self._discard_at
        deadline = self._ack_due
        if self._next_unsent - 1 > self._acked:
            # something in flight: resend the oldest after RESEND_INTERVAL, give up after timeout
            resend = max(self._out[self._acked + 1].sent_at, self._feedback_at) + RESEND_INTERVAL
            if deadline is None or resend < deadline:
                deadline = resend
            give_up = self._progress_at + self._timeout
            if give_up < deadline:
                deadline = give_up
        if state is ChannelState.OPENING:
            give_up = self._opened_at + self._timeout
            if deadline is None or give_up < deadline:
                deadline = give_up
        elif state is ChannelState.ENDED or self._closing:
            give_up = max(self._activity_at, self._progress_at) + self._timeout
            if deadline is None or give_up < deadline:
                deadline = give_up
        return deadline

    def handle_timer(self, now: float) -> None:
        """Run the timers that are due: timeouts and resends (acks go out in packets_to_send).

        Args:
            now: current time.
        """
        state = self._state
        if state is ChannelState.CLOSED:
            if self._discard_at is not None and now >= self._discard_at:
                self._discard_at = None
                self._ack_due = None
            return
        timeout = self._timeout
        sent_max = self._next_unsent - 1
        if sent_max > self._acked and now >= self._progress_at + timeout:
            self.close("timeout", now=now)
            return
        if state is ChannelState.OPENING and now >= self._opened_at + timeout:
            self.close("timeout", now=now)
            return
        if (state is ChannelState.ENDED or self._closing) and now >= max(
            self._activity_at, self._progress_at
        ) + timeout:
            self.close("timeout", now=now)
            return
        feedback = self._feedback_at
        if (
            sent_max > self._acked
            and now >= max(self._out[self._acked + 1].sent_at, feedback) + RESEND_INTERVAL
        ):
            # unacked and no word from the peer for RESEND_INTERVAL: resend every packet
            # that old (a lost ack costs a window; the repeated ack makes that rare)
            outq = self._out
            window = self._window if self._window < self._peer_window else self._peer_window
            top = min(sent_max, self._acked + window)  # a peer may have shrunk its window
            for seq in range(self._acked + 1, top + 1):
                entry = outq[seq]
                # deadlines are compared as sums, exactly as get_timer computes them
                if entry.queued or max(entry.sent_at, feedback) + RESEND_INTERVAL > now:
                    continue
                if entry.resent_at is not None and entry.resent_at + MISS_RESEND_INTERVAL > now:
                    continue
                entry.resent_at = now
                entry.queued = True
                self._resend.append(seq)


def _bad_window(window: object) -> bool:
    """True unless ``window`` is an int in ``1..MAX_WINDOW`` (bools are not windows)."""
    return type(window) is not int or not 1 <= window <= MAX_WINDOW


# -- constructors ---------------------------------------------------------------------------


def open_channel(
    cid: ChannelId,
    type: str,
    *,
    reliable: bool,
    json: Mapping[str, Any] | None = None,
    body: bytes = b"",
    now: float,
    window: int = DEFAULT_WINDOW,
    timeout: float = CHANNEL_TIMEOUT,
    flow_control: bool = False,
) -> Channel:
    """Open an outgoing channel; its open packet comes out of the first packets_to_send.

    Args:
        cid: the id from the exchange (our parity, increasing).
        type: the channel type, e.g. ``"path"`` or ``"sync"``.
        reliable: seq/ack/miss reliability (the open carries ``"seq":1``).
        json: extra keys for the open packet's head.
        body: the open packet's body.
        now: current time.
        window: reliable only: our receive window and largest send window; above
            ``DEFAULT_WINDOW`` only pays off when the peer advertises a window as large
            (p2pcloud peers do; telehash-js stays at 50).
        timeout: the channel timeout in seconds.
        flow_control: reliable only: received data counts against our window until the
            application reports it consumed (:meth:`ReliableChannel.consume`).

    Returns:
        A :class:`ReliableChannel` or :class:`UnreliableChannel` in state OPENING.

    Raises:
        LocalProtocolError: bad id, type, window or timeout, or a reserved key in ``json``.
    """
    if not isinstance(type, str) or not 0 < len(type) <= MAX_TYPE_LENGTH:
        raise LocalProtocolError(f"channel type must be 1..{MAX_TYPE_LENGTH} characters")
    if not isinstance(cid, int) or isinstance(cid, bool) or not 1 <= cid <= MAX_CHANNEL_ID:
        raise LocalProtocolError("channel id must be a uint32 >= 1")
    head = _new_head(cid, json, type)
    channel: ReliableChannel | UnreliableChannel
    if reliable:
        channel = ReliableChannel(
            cid,
            type,
            outgoing=True,
            now=now,
            timeout=timeout,
            window=window,
            flow_control=flow_control,
        )
        channel._queue_packet(head, bytes(body), False)
    else:
        channel = UnreliableChannel(cid, type, outgoing=True, now=now, timeout=timeout)
        channel._queue.append((head, bytes(body)))
    return channel


def accept_channel(
    first_json: dict[str, Any],
    first_body: bytes,
    now: float,
    *,
    window: int = DEFAULT_WINDOW,
    timeout: float = CHANNEL_TIMEOUT,
    flow_control: bool = False,
) -> Channel:
    """Create the channel for an incoming open packet and process that packet.

    The open's content is the first :class:`DataReceived` event.

    Args:
        first_json: the open packet's head: ``c``, ``type``, and ``"seq":1`` if reliable.
        first_body: the open packet's body.
        now: current time.
        window: reliable only: our receive window and largest send window.
        timeout: the channel timeout in seconds.
        flow_control: reliable only: received data counts against our window until the
            application reports it consumed (:meth:`ReliableChannel.consume`).

    Returns:
        A :class:`ReliableChannel` or :class:`UnreliableChannel`.

    Raises:
        MalformedPacket: the packet is not a valid open (no/bad ``c`` or ``type``, a
            ``seq`` other than 1, or an ``err``); the mesh drops it.
        LocalProtocolError: a bad ``window`` or ``timeout`` (our configuration).
    """
    if type(first_json) is not dict or type(first_body) is not bytes:
        raise MalformedPacket("channel open must be a JSON head and a bytes body")
    cid = first_json.get("c")
    if type(cid) is not int or not 1 <= cid <= MAX_CHANNEL_ID:
        raise MalformedPacket("channel open without a valid c")
    kind = first_json.get("type")
    if type(kind) is not str or not 0 < len(kind) <= MAX_TYPE_LENGTH:
        raise MalformedPacket("channel open without a valid type")
    if _js_truthy(first_json.get("err")):
        raise MalformedPacket("channel open carries an err")
    seq = first_json.get("seq")
    channel: ReliableChannel | UnreliableChannel
    if seq is None:
        channel = UnreliableChannel(ChannelId(cid), kind, outgoing=False, now=now, timeout=timeout)
    elif type(seq) is int and seq == 1:
        channel = ReliableChannel(
            ChannelId(cid),
            kind,
            outgoing=False,
            now=now,
            timeout=timeout,
            window=window,
            flow_control=flow_control,
        )
    else:
        raise MalformedPacket("a reliable channel opens with seq 1")
    channel.receive(first_json, first_body, now)
    return channel
