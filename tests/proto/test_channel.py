"""Tests of the channel state machines (p2pcloud.proto.channel).

Deterministic and synchronous: a fake pipe between two channels loses, duplicates, reorders
and delays packets from a seeded RNG, every head goes through real JSON text, and the test
moves ``now`` itself. The pipe checks two protocol rules on every packet it carries: a seq is
never above the sender's last received ack + window, and a packet is never resent twice
within one second.
"""

from __future__ import annotations

import heapq
import json as jsonlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from p2pcloud._ids import ChannelId
from p2pcloud.errors import LocalProtocolError, MalformedPacket
from p2pcloud.proto.channel import (
    ACK_DELAY,
    CHANNEL_TIMEOUT,
    DEFAULT_WINDOW,
    HEAD_OVERHEAD,
    MAX_MISS,
    MAX_MISS_SENT,
    MAX_WINDOW,
    MISS_REPEAT,
    MISS_RESEND_INTERVAL,
    RECEIVE_SLACK,
    RESEND_INTERVAL,
    Channel,
    ChannelClosed,
    ChannelEvent,
    ChannelState,
    DataReceived,
    EndReceived,
    ReliableChannel,
    UnreliableChannel,
    accept_channel,
    decode_miss,
    encode_miss,
    open_channel,
)

INNER_MTU = 1400  # v3 channels.md: an inner packet is at most 1400 bytes
CID = ChannelId(3)


# -- the fake pipe ------------------------------------------------------------------------


@dataclass
class Side:
    """One end of the pipe: its channel, what it sent, what reached it."""

    name: str
    window: int = DEFAULT_WINDOW
    channel: Channel | None = None
    events: list[ChannelEvent] = field(default_factory=list)
    acks_delivered: int = 0  # highest ack delivered to this side (what it may know)
    peer_window: int = DEFAULT_WINDOW  # the window the peer last advertised to this side
    sends: dict[int, list[float]] = field(default_factory=dict)  # seq -> transmit times
    heads: list[dict[str, Any]] = field(default_factory=list)  # every head it sent
    max_ahead: int = 0  # the furthest a new seq went beyond the ack it knew


class Pipe:
    """Two channels joined by a lossy, duplicating, reordering, delaying link.

    Side ``a`` opens; side ``b`` is created by :func:`accept_channel` when the open arrives
    (like the mesh, packets for an unknown channel without ``type`` are dropped).
    """

    def __init__(
        self,
        a: Channel,
        *,
        seed: int,
        loss: float = 0.0,
        dup: float = 0.0,
        reorder: float = 0.0,
        delay: tuple[float, float] = (0.005, 0.05),
        window_a: int = DEFAULT_WINDOW,
        window_b: int = DEFAULT_WINDOW,
        now: float = 0.0,
    ) -> None:
        self.rng = random.Random(seed)
        self.loss, self.dup, self.reorder, self.delay = loss, dup, reorder, delay
        self.now = now
        self.a = Side("a", window_a, a)
        self.b = Side("b", window_b)
        self.timeout = CHANNEL_TIMEOUT  # given to accept_channel
        self.flight: list[tuple[float, int, str, bytes, bytes]] = []
        self.fifo = {"a": 0.0, "b": 0.0}  # a link keeps order unless a packet is reordered
        self.counter = 0
        self.carried = 0

    def other(self, side: Side) -> Side:
        return self.b if side is self.a else self.a

    def transmit(self, side: Side) -> int:
        if side.channel is None:
            return 0
        packets = side.channel.packets_to_send(self.now)
        for head, body in packets:
            assert head["c"] == CID
            text = jsonlib.dumps(head, separators=(",", ":")).encode()
            assert 2 + len(text) + len(body) <= INNER_MTU
            side.heads.append(head)
            seq = head.get("seq")
            if seq is not None and side.channel.reliable:
                # v3 reliable.md: never send a seq above the last received ack + window
                # (the window: ours, and the peer's as its last miss edge said; v3: 50 until then)
                limit = side.acks_delivered + min(side.window, side.peer_window)
                assert seq <= limit, f"{side.name} sent seq {seq} above ack+window {limit}"
                side.max_ahead = max(side.max_ahead, seq - side.acks_delivered)
                times = side.sends.setdefault(seq, [])
                if len(times) >= 2:
                    # v3 reliable.md: a missed packet is resent at most once per second
                    gap = self.now - times[-1]
                    assert gap >= MISS_RESEND_INTERVAL - 1e-9, f"seq {seq} resent after {gap}s"
                times.append(self.now)
            self._fly(side, text, body)
        return len(packets)

    def _fly(self, side: Side, text: bytes, body: bytes) -> None:
        copies = 1
        if self.rng.random() < self.loss:
            copies = 0
        elif self.rng.random() < self.dup:
            copies = 2
        for _ in range(copies):
            low, high = self.delay
            at = self.now + self.rng.uniform(low, high)
            at = max(at, self.fifo[side.name])
            if self.rng.random() < self.reorder:
                at += self.rng.uniform(0, 4 * high)  # late: overtaken by later packets
            else:
                self.fifo[side.name] = at
            self.counter += 1
            heapq.heappush(self.flight, (at, self.counter, side.name, text, body))

    def deliver(self, src: str, text: bytes, body: bytes) -> None:
        dst = self.b if src == "a" else self.a
        head = jsonlib.loads(text)
        self.carried += 1
        if dst.channel is None:
            if "type" not in head:
                return  # the mesh drops packets for unknown channels that are not opens
            dst.channel = accept_channel(
                head, body, self.now, window=dst.window, timeout=self.timeout
            )
        else:
            dst.channel.receive(head, body, self.now)
        ack = head.get("ack")
        # a miss's total delta is the window counted from *that packet's* ack; a reordered
        # older packet (lower ack) says nothing about the window now, as TCP ignores window
        # updates from old segments (RFC 793 SND.WL1/WL2), and so does the sender
        current = type(ack) is int and ack >= dst.acks_delivered
        if type(ack) is int and ack > dst.acks_delivered:
            dst.acks_delivered = ack
        miss = head.get("miss")
        if current and isinstance(miss, list) and miss:
            dst.peer_window = min(sum(miss), MAX_WINDOW)  # v3: the total delta is the window

    def collect(self) -> None:
        for side in (self.a, self.b):
            if side.channel is not None:
                while (event := side.channel.next_event()) is not None:
                    side.events.append(event)

    def step(self, until: float | None = None) -> bool:
        """Send what is due, then move ``now`` to the next delivery or timer and run it.

        Args:
            until: do not move ``now`` past this time.

        Returns:
            False when the link is quiet: nothing in flight and no timer pending.
        """
        self.transmit(self.a)
        self.transmit(self.b)
        times = [self.flight[0][0]] if self.flight else []
        for side in (self.a, self.b):
            if side.channel is not None and (timer := side.channel.get_timer()) is not None:
                times.append(timer)
        if not times:
            return False
        if until is not None and min(times) > until:
            self.now = max(self.now, until)
            return True
        self.now = max(self.now, min(times))
        while self.flight and self.flight[0][0] <= self.now:
            _, _, src, text, body = heapq.heappop(self.flight)
            self.deliver(src, text, body)
        for side in (self.a, self.b):
            channel = side.channel
            timer = None if channel is None else channel.get_timer()
            if channel is not None and timer is not None and timer <= self.now:
                channel.handle_timer(self.now)
        self.collect()
        return True


def pump(
    pipe: Pipe, app: Callable[[], None] | None = None, max_rounds: int = 100_000
) -> int:
    """Run the pipe (calling ``app`` every round) until it is quiet; fail loudly if never."""
    rounds = 0
    while True:
        if app is not None:
            app()
        if not pipe.step():
            pipe.collect()
            return rounds
        rounds += 1
        assert rounds < max_rounds, "channels never went quiet"


def data_of(events: list[ChannelEvent], skip_open: bool = False) -> bytes:
    bodies = [e.body for e in events if isinstance(e, DataReceived)]
    return b"".join(bodies[1:] if skip_open else bodies)


def closes(events: list[ChannelEvent]) -> list[ChannelClosed]:
    return [e for e in events if isinstance(e, ChannelClosed)]


class Writer:
    """Feeds ``data`` into a channel as its send capacity allows, then ends it."""

    def __init__(self, side: Side, data: bytes, rng: random.Random, now: Callable[[], float]):
        self.side, self.data, self.rng, self.now = side, data, rng, now
        self.offset = 0
        self.ended = False

    def __call__(self) -> None:
        channel = self.side.channel
        if channel is None or self.ended or channel.state is ChannelState.CLOSED:
            return
        while channel.send_capacity() > 0 and self.offset < len(self.data):
            size = self.rng.randint(1, 1000)
            chunk = self.data[self.offset : self.offset + size]
            self.offset += len(chunk)
            channel.send(chunk, now=self.now())
        if self.offset >= len(self.data) and channel.send_capacity() > 0:
            channel.send(b"", end=True, now=self.now())
            self.ended = True


def transfer(
    seed: int,
    *,
    size: int,
    loss: float,
    dup: float,
    reorder: float,
    both_ways: bool = False,
    window_a: int = DEFAULT_WINDOW,
    window_b: int = DEFAULT_WINDOW,
    timeout: float = CHANNEL_TIMEOUT,
) -> Pipe:
    """Send ``size`` random bytes from a to b (and b to a) over a bad link; both end."""
    rng = random.Random(seed)
    payload_a = rng.randbytes(size)
    payload_b = rng.randbytes(size // 2) if both_ways else b""
    a = open_channel(CID, "bulk", reliable=True, now=0.0, window=window_a, timeout=timeout)
    pipe = Pipe(
        a, seed=seed, loss=loss, dup=dup, reorder=reorder, window_a=window_a, window_b=window_b
    )
    pipe.timeout = timeout
    writer_a = Writer(pipe.a, payload_a, random.Random(seed + 1), lambda: pipe.now)
    writer_b = Writer(pipe.b, payload_b, random.Random(seed + 2), lambda: pipe.now)

    def app() -> None:
        writer_a()
        writer_b()

    pump(pipe, app)
    assert data_of(pipe.b.events, skip_open=True) == payload_a
    assert data_of(pipe.a.events) == payload_b
    for side in (pipe.a, pipe.b):
        assert closes(side.events) == [ChannelClosed(None)], side.name
        assert isinstance(side.events[-1], ChannelClosed)
        assert sum(isinstance(e, EndReceived) for e in side.events) == 1
        assert side.channel is not None
        assert side.channel.state is ChannelState.CLOSED
        assert side.channel.can_forget(pipe.now)
    return pipe


# -- transfers over a bad link ----------------------------------------------------------


@pytest.mark.parametrize("seed", range(24))
def test_transfer_over_lossy_link_is_intact_and_in_order(seed: int) -> None:
    pipe = transfer(seed, size=48 * 1024, loss=0.15, dup=0.05, reorder=0.1)
    stats = pipe.a.channel.statistics()  # type: ignore[union-attr]
    assert stats.in_flight == 0
    assert stats.sent >= 48 * 1024 // 1000


@pytest.mark.parametrize("seed", range(8))
def test_transfer_both_ways_at_once(seed: int) -> None:
    transfer(seed, size=32 * 1024, loss=0.1, dup=0.1, reorder=0.2, both_ways=True)


@pytest.mark.parametrize("seed", range(4))
def test_transfer_over_a_terrible_link(seed: int) -> None:
    transfer(seed, size=16 * 1024, loss=0.4, dup=0.2, reorder=0.3)


def test_clean_link_sends_no_resends_and_no_duplicates() -> None:
    pipe = transfer(7, size=200 * 1024, loss=0.0, dup=0.0, reorder=0.0)
    for side in (pipe.a, pipe.b):
        stats = side.channel.statistics()  # type: ignore[union-attr]
        assert stats.resent == 0
        assert stats.duplicates == 0
        assert stats.dropped == {}


def test_large_windows_between_p2pcloud_peers_are_used() -> None:
    pipe = transfer(3, size=600 * 1024, loss=0.02, dup=0.02, reorder=0.05,
                    window_a=400, window_b=400)
    assert pipe.a.max_ahead > DEFAULT_WINDOW  # b's advertised window was learned and used
    assert pipe.a.max_ahead <= 400


def test_large_window_towards_a_default_peer_stays_at_fifty() -> None:
    # window_b 50 (a telehash-js peer): a may never have more than 50 beyond b's ack
    transfer(5, size=200 * 1024, loss=0.05, dup=0.0, reorder=0.0, window_a=400, window_b=50)


# -- miss encoding ----------------------------------------------------------------------


def test_miss_encoding_matches_the_spec_example() -> None:
    # v3 e3x/reliable.md "miss delta encoding example" (digest §5)
    missing = [78236, 78235, 78245, 78238]
    assert encode_miss(78231, missing, 20) == [4, 1, 2, 7, 6]
    assert decode_miss(78231, [4, 1, 2, 7, 6]) == ([78235, 78236, 78238, 78245], 78251)


def test_decode_miss_rejects_bad_arrays() -> None:
    assert decode_miss(5, []) is None
    assert decode_miss(5, "4,1") is None
    assert decode_miss(5, [1, 0, 3]) is None
    assert decode_miss(5, [1, -2, 3]) is None
    assert decode_miss(5, [1, True, 3]) is None
    assert decode_miss(5, [1.0, 3]) is None
    assert decode_miss(5, [50]) == ([], 55)
    seqs, edge = decode_miss(0, [1] * (MAX_MISS + 500))  # type: ignore[misc]
    assert len(seqs) == MAX_MISS - 1  # cut at MAX_MISS entries, the last one is the edge


def feed(channel: Channel, packets: list[tuple[dict[str, Any], bytes]], now: float) -> None:
    for head, body in packets:
        channel.receive(jsonlib.loads(jsonlib.dumps(head)), body, now)


def drain(channel: Channel) -> list[ChannelEvent]:
    events = []
    while (event := channel.next_event()) is not None:
        events.append(event)
    return events


def test_receiver_sends_the_spec_shaped_miss() -> None:
    # a receiver with a 20-packet buffer, ack 3, holding 5, 7 and 8: missing 4 and 6
    b = accept_channel({"c": CID, "type": "t", "seq": 1}, b"", 0.0, window=20)
    feed(b, [({"c": CID, "seq": s}, b"x") for s in (2, 3, 5, 7, 8)], 0.1)
    [(head, body)] = b.packets_to_send(0.1 + ACK_DELAY)
    assert head == {"c": CID, "ack": 3, "miss": encode_miss(3, [4, 6], 20)}
    assert head["miss"] == [1, 2, 17]
    assert body == b""


def test_miss_is_sent_at_once_behind_a_gap_and_when_over_half_full() -> None:
    b = accept_channel({"c": CID, "type": "t", "seq": 1}, b"", 0.0, window=20)
    assert b.packets_to_send(0.0) == []  # the ack of the open waits up to ACK_DELAY
    feed(b, [({"c": CID, "seq": s}, b"x") for s in (3, 4)], 0.1)
    assert b.packets_to_send(0.1) == []  # two behind a gap: maybe just reordering
    feed(b, [({"c": CID, "seq": 5}, b"x")], 0.1)  # three: seq 2 is likely lost
    assert b.packets_to_send(0.1) == [({"c": CID, "ack": 1, "miss": [1, 19]}, b"")]
    feed(b, [({"c": CID, "seq": s}, b"x") for s in range(6, 13)], 0.2)  # 10 of 20: half
    assert b.packets_to_send(0.2) == []
    feed(b, [({"c": CID, "seq": 13}, b"x")], 0.3)  # 11 buffered: over half full
    [(head, _)] = b.packets_to_send(0.3)
    assert head == {"c": CID, "ack": 1, "miss": [1, 19]}  # seq 2 missing, edge 1 + 20 = 21
    feed(b, [({"c": CID, "seq": 14}, b"x")], 0.4)  # still over half: a miss per arrival
    assert b.packets_to_send(0.4) == [({"c": CID, "ack": 1, "miss": [1, 19]}, b"")]
    assert b.get_timer() == 0.4 + MISS_REPEAT  # and again every half second while it lasts


def test_our_miss_is_capped_so_heads_stay_small() -> None:
    b = accept_channel({"c": CID, "type": "t", "seq": 1}, b"", 0.0, window=MAX_WINDOW)
    feed(b, [({"c": CID, "seq": s}, b"x") for s in range(3, MAX_WINDOW, 2)], 0.1)  # 500 gaps
    [(head, _)] = b.packets_to_send(0.1)
    assert len(head["miss"]) == MAX_MISS_SENT
    seqs, edge = decode_miss(head["ack"], head["miss"])  # type: ignore[misc]
    assert seqs == list(range(2, 2 + 2 * (MAX_MISS_SENT - 1), 2))
    assert edge == 1 + MAX_WINDOW
    # the worst head this layer can add stays within HEAD_OVERHEAD
    widest = len(str(MAX_WINDOW + RECEIVE_SLACK))
    worst = {"c": 2**32 - 1, "seq": 2**32 - 1, "ack": 2**32 - 1, "end": True,
             "miss": [10**widest - 1] * MAX_MISS_SENT}
    assert len(jsonlib.dumps(worst)) <= HEAD_OVERHEAD


def sender_with(n: int, now: float = 0.0, window: int = DEFAULT_WINDOW) -> ReliableChannel:
    a = open_channel(CID, "t", reliable=True, now=now, window=window)
    assert isinstance(a, ReliableChannel)
    for i in range(n - 1):
        a.send(b"%d" % (i + 2), now=now)
    return a


def test_sender_resends_exactly_what_miss_names() -> None:
    a = sender_with(30)
    sent = a.packets_to_send(0.0)
    assert [h["seq"] for h, _ in sent] == list(range(1, 31))
    feed(a, [({"c": CID, "ack": 3, "miss": encode_miss(3, [4, 6, 20], DEFAULT_WINDOW)}, b"")], 0.1)
    resent = a.packets_to_send(0.1)
    assert [h["seq"] for h, _ in resent] == [4, 6, 20]
    assert [b for _, b in resent] == [b"4", b"6", b"20"]
    assert a.statistics().in_flight == 27  # 1..3 acked


def test_resends_are_rate_limited_to_once_per_second() -> None:
    a = sender_with(10)
    a.packets_to_send(0.0)
    resend_times = []
    now = 0.0
    while now < 5.0:
        now = round(now + 0.1, 6)
        feed(a, [({"c": CID, "ack": 2, "miss": [1, 50]}, b"")], now)  # seq 3 missing
        for head, _ in a.packets_to_send(now):
            if head.get("seq") == 3:
                resend_times.append(now)
        a.handle_timer(now) if (t := a.get_timer()) is not None and t <= now else None
    assert resend_times[0] == 0.1  # the first miss resends at once (as e3x does)
    gaps = [b - a for a, b in zip(resend_times, resend_times[1:], strict=False)]
    assert gaps and all(gap >= MISS_RESEND_INTERVAL - 1e-9 for gap in gaps)
    assert len(resend_times) <= 6


def test_window_is_never_exceeded_and_capacity_counts_down() -> None:
    a = open_channel(CID, "t", reliable=True, now=0.0)
    assert a.send_capacity() == 2 * DEFAULT_WINDOW - 1  # the open is seq 1
    while a.send_capacity():
        a.send(b"x", now=0.0)
    with pytest.raises(LocalProtocolError):
        a.send(b"x", now=0.0)
    sent = a.packets_to_send(0.0)
    assert [h["seq"] for h, _ in sent] == list(range(1, DEFAULT_WINDOW + 1))
    assert a.packets_to_send(0.1) == []  # window full, nothing acked
    feed(a, [({"c": CID, "ack": 10}, b"")], 0.2)
    assert a.send_capacity() == 10
    more = a.packets_to_send(0.2)
    assert [h["seq"] for h, _ in more] == list(range(DEFAULT_WINDOW + 1, DEFAULT_WINDOW + 11))


def test_unacked_packets_are_resent_after_the_resend_interval() -> None:
    a = sender_with(5)
    a.packets_to_send(0.0)
    assert a.get_timer() == RESEND_INTERVAL
    assert a.packets_to_send(1.0) == []
    a.handle_timer(RESEND_INTERVAL)
    resent = a.packets_to_send(RESEND_INTERVAL)
    assert [h["seq"] for h, _ in resent] == [1, 2, 3, 4, 5]
    assert resent[0][0]["type"] == "t"  # the open is resent as it was
    assert a.statistics().resent == 5


# -- acks -------------------------------------------------------------------------------


def test_data_is_acked_within_the_ack_delay_and_piggybacked() -> None:
    b = accept_channel({"c": CID, "type": "t", "seq": 1}, b"hello", 0.0)
    assert drain(b) == [DataReceived({"c": CID, "type": "t", "seq": 1}, b"hello")]
    assert b.get_timer() == ACK_DELAY
    assert b.packets_to_send(0.5) == []
    b.send(b"reply", now=0.5)
    [(head, body)] = b.packets_to_send(0.5)
    assert head == {"c": CID, "seq": 1, "ack": 1}  # the ack rides on the data
    assert body == b"reply"
    assert b.get_timer() == 0.5 + ACK_DELAY  # the ack is repeated once if nothing follows


def test_bare_ack_goes_out_after_the_delay() -> None:
    b = accept_channel({"c": CID, "type": "t", "seq": 1}, b"", 0.0)
    assert b.state is ChannelState.OPENING
    b.handle_timer(ACK_DELAY)
    assert b.packets_to_send(ACK_DELAY) == [({"c": CID, "ack": 1}, b"")]
    assert b.state is ChannelState.OPEN
    assert b.get_timer() == 2 * ACK_DELAY  # the ack is said once more, in case it was lost
    assert b.packets_to_send(2 * ACK_DELAY) == [({"c": CID, "ack": 1}, b"")]
    assert b.get_timer() is None  # OPEN and idle: nothing timed


def test_acks_come_every_quarter_window_during_bulk() -> None:
    b = accept_channel({"c": CID, "type": "t", "seq": 1}, b"", 0.0)
    acks = []
    for seq in range(2, 40):
        feed(b, [({"c": CID, "seq": seq}, b"x")], 0.01 * seq)
        acks += [h["ack"] for h, _ in b.packets_to_send(0.01 * seq)]
    assert acks == [12, 24, 36]


def test_duplicates_are_ignored_counted_and_reacked() -> None:
    b = accept_channel({"c": CID, "type": "t", "seq": 1}, b"", 0.0)
    feed(b, [({"c": CID, "seq": 2}, b"two")], 0.1)
    feed(b, [({"c": CID, "seq": 2}, b"two"), ({"c": CID, "seq": 1, "type": "t"}, b"")], 0.2)
    assert [e.body for e in drain(b) if isinstance(e, DataReceived)] == [b"", b"two"]
    assert b.statistics().duplicates == 2
    assert b.packets_to_send(0.2) == [({"c": CID, "ack": 2}, b"")]  # at once, not in 1 s


def test_seqs_far_beyond_the_window_are_dropped() -> None:
    b = accept_channel({"c": CID, "type": "t", "seq": 1}, b"", 0.0)
    feed(b, [({"c": CID, "seq": 1 + 2 * DEFAULT_WINDOW}, b"ok")], 0.1)  # slack for JS
    feed(b, [({"c": CID, "seq": 2 + 2 * DEFAULT_WINDOW}, b"no")], 0.1)
    feed(b, [({"c": CID, "seq": 10**30}, b"no")], 0.1)
    stats = b.statistics()
    assert stats.dropped == {"beyond window": 2}
    assert stats.buffered == 1


def test_telehash_js_packet_shapes_are_understood() -> None:
    # digest §12: what telehash-js 0.4.18 sent to the Python client
    a = open_channel(ChannelId(4), "echo", reliable=True, json={"echo": "hi"}, now=0.0)
    [(open_head, _)] = a.packets_to_send(0.0)
    assert open_head == {"c": 4, "type": "echo", "seq": 1, "echo": "hi"}
    a.receive({"echo": "hello", "c": 4, "seq": 1, "miss": [50], "ack": 0}, b"\x00\x01bin", 0.1)
    a.receive({"ack": 1, "c": 4}, b"", 0.2)
    assert drain(a) == [
        DataReceived({"echo": "hello", "c": 4, "seq": 1, "miss": [50], "ack": 0}, b"\x00\x01bin")
    ]
    assert a.state is ChannelState.OPEN
    stats = a.statistics()
    assert stats.dropped == {} and stats.in_flight == 0
    a.receive({"err": "unknown type", "c": 4}, b"", 0.3)
    assert drain(a) == [ChannelClosed("unknown type")]


def test_telehash_js_partial_miss_is_covered_by_the_resend_timer() -> None:
    # e3x lists gaps only from its lowest buffered seq: holding 3 and 4 with ack 1 it sends
    # "miss":[50] and never names 2; our resend timer must bring 2 (and the lost 5) anyway
    a = sender_with(5)
    a.packets_to_send(0.0)
    for now in (0.1, 0.2, 0.3):
        feed(a, [({"c": CID, "ack": 1, "miss": [50]}, b"")], now)
        assert a.packets_to_send(now) == []
    timer = a.get_timer()
    assert timer == 0.1 + RESEND_INTERVAL  # two seconds after the last ack progress
    a.handle_timer(timer)
    assert [h["seq"] for h, _ in a.packets_to_send(timer)] == [2, 3, 4, 5]


def test_repeated_bare_acks_resend_the_oldest_packet() -> None:
    # telehash-js acks every packet it gets after a gap with the same ack (and a miss that
    # does not name the gap): three such bare acks resend ack + 1, once per second at most
    a = sender_with(10)
    a.packets_to_send(0.0)
    dup = [({"c": CID, "ack": 3, "miss": [50]}, b"")]
    feed(a, dup, 0.05)  # progress: 1..3 acked
    feed(a, dup, 0.06)
    assert a.packets_to_send(0.06) == []
    feed(a, dup, 0.07)
    feed(a, dup, 0.08)  # the third without progress
    assert [h["seq"] for h, _ in a.packets_to_send(0.08)] == [4]
    for now in (0.1, 0.2, 0.3, 0.9):
        feed(a, dup, now)
        assert a.packets_to_send(now) == []  # not again within a second
    feed(a, dup, 1.1)
    assert [h["seq"] for h, _ in a.packets_to_send(1.1)] == [4]
    # an ack riding on data (with a seq) is not a duplicate ack
    b = sender_with(10)
    b.packets_to_send(0.0)
    for i in range(2, 8):
        feed(b, [({"c": CID, "seq": i, "ack": 3}, b"data")], 0.1 * i)
    assert all("seq" not in h for h, _ in b.packets_to_send(0.8))


def test_packets_dropped_beyond_the_window_are_asked_for_again() -> None:
    # a JS peer overshoots our window; once the window moves, our miss names what we dropped
    b = accept_channel({"c": CID, "type": "t", "seq": 1}, b"", 0.0, window=10)
    feed(b, [({"c": CID, "seq": s}, b"x") for s in range(3, 71)], 0.1)  # 2 lost
    stats = b.statistics()
    assert stats.buffered == 10 + RECEIVE_SLACK - 1  # 3..61
    assert stats.dropped == {"beyond window": 9}  # 62..70
    feed(b, [({"c": CID, "seq": 2}, b"x")], 0.2)
    [(head, _)] = b.packets_to_send(0.2)
    assert head["ack"] == 61
    seqs, edge = decode_miss(61, head["miss"])  # type: ignore[misc]
    assert seqs == list(range(62, 71)) and edge == 71


# -- end, err, timeouts -----------------------------------------------------------------


def opened_pair(reliable: bool = True) -> Pipe:
    a = open_channel(CID, "t", reliable=reliable, now=0.0)
    pipe = Pipe(a, seed=0)
    for _ in range(20):
        pipe.step()
        states = {side.channel.state for side in (pipe.a, pipe.b) if side.channel is not None}
        if states == {ChannelState.OPEN} and pipe.b.channel is not None:
            return pipe
        if pipe.b.channel is not None and not pipe.b.channel.reliable:
            pipe.b.channel.send(b"hello", now=pipe.now)  # an unreliable peer must answer
    raise AssertionError("channel never opened")


def test_end_from_a_then_b_closes_cleanly_both_ways() -> None:
    for first in ("a", "b"):
        pipe = opened_pair()
        one = pipe.a if first == "a" else pipe.b
        two = pipe.other(one)

        def app(one: Side = one, two: Side = two, pipe: Pipe = pipe) -> None:
            assert one.channel is not None and two.channel is not None
            if one.channel.send_capacity():
                one.channel.send(b"last", end=True, now=pipe.now)
            if EndReceived() in two.events and two.channel.send_capacity():
                two.channel.send(b"", end=True, now=pipe.now)

        pump(pipe, app)
        assert closes(pipe.a.events) == [ChannelClosed(None)]
        assert closes(pipe.b.events) == [ChannelClosed(None)]
        assert data_of(two.events).endswith(b"last")


def test_simultaneous_ends_close_cleanly() -> None:
    pipe = opened_pair()
    assert pipe.a.channel is not None and pipe.b.channel is not None
    pipe.a.channel.send(b"", end=True, now=pipe.now)
    pipe.b.channel.send(b"", end=True, now=pipe.now)
    pump(pipe)
    assert closes(pipe.a.events) == [ChannelClosed(None)]
    assert closes(pipe.b.events) == [ChannelClosed(None)]


def test_half_closed_channel_keeps_flowing_the_other_way() -> None:
    pipe = opened_pair()
    assert pipe.a.channel is not None and pipe.b.channel is not None
    pipe.a.channel.send(b"request", end=True, now=pipe.now)
    pipe.step()
    pipe.step()
    assert pipe.b.channel.state is ChannelState.ENDED
    # b answers for longer than a channel timeout; acks keep it alive
    start = pipe.now
    while pipe.now < start + 3 * CHANNEL_TIMEOUT:
        pipe.b.channel.send(b"part", now=pipe.now)
        second = pipe.now + 1.0
        while pipe.now < second:
            pipe.step(until=second)
    assert pipe.b.channel.state is ChannelState.ENDED
    pipe.b.channel.send(b"", end=True, now=pipe.now)
    pump(pipe)
    assert closes(pipe.a.events) == [ChannelClosed(None)]
    assert closes(pipe.b.events) == [ChannelClosed(None)]


def test_peer_that_never_ends_times_out_and_tells_us() -> None:
    pipe = opened_pair()
    a, b = pipe.a.channel, pipe.b.channel
    assert a is not None and b is not None
    a.send(b"", end=True, now=pipe.now)
    pump(pipe, max_rounds=50)  # b ENDED, acks a's end; b never ends: ENDED times out
    assert closes(pipe.b.events) == [ChannelClosed("timeout")]
    # a gets b's err "timeout"
    assert closes(pipe.a.events) == [ChannelClosed("timeout")]


def test_clean_close_lingers_to_reack_a_resent_end() -> None:
    a = open_channel(CID, "t", reliable=True, now=0.0)
    b = accept_channel(a.packets_to_send(0.0)[0][0], b"", 0.0)
    b.send(b"", end=True, now=0.0)
    feed(a, b.packets_to_send(0.0), 0.1)  # b's end (acking a's open): a is ENDED
    assert a.state is ChannelState.ENDED
    a.send(b"", end=True, now=0.1)
    feed(b, a.packets_to_send(0.1), 0.2)  # a's end acks b's end: b is done
    assert b.state is ChannelState.CLOSED
    assert drain(b)[-2:] == [EndReceived(), ChannelClosed(None)]
    assert b.packets_to_send(0.2) == [({"c": CID, "ack": 2}, b"")]  # this ack is lost
    a.handle_timer(0.1 + RESEND_INTERVAL)
    resent = a.packets_to_send(0.1 + RESEND_INTERVAL)
    assert [h["seq"] for h, _ in resent] == [2]
    feed(b, resent, 2.2)  # b lingers and acks the resent end again
    assert b.packets_to_send(2.2) == [({"c": CID, "ack": 2}, b"")]
    feed(a, [({"c": CID, "ack": 2}, b"")], 2.3)
    assert drain(a)[-2:] == [EndReceived(), ChannelClosed(None)]
    assert not b.can_forget(2.3)
    assert b.get_timer() == 0.2 + CHANNEL_TIMEOUT
    b.handle_timer(0.2 + CHANNEL_TIMEOUT)
    assert b.can_forget(0.2 + CHANNEL_TIMEOUT)
    assert b.get_timer() is None


def test_err_closes_at_once_and_drops_buffers() -> None:
    b = accept_channel({"c": CID, "type": "t", "seq": 1}, b"", 0.0)
    feed(b, [({"c": CID, "seq": 3}, b"held")], 0.1)  # buffered, 2 missing
    b.send(b"unacked", now=0.1)
    feed(b, [({"c": CID, "err": "boom"}, b"")], 0.2)
    assert drain(b) == [DataReceived({"c": CID, "type": "t", "seq": 1}, b""), ChannelClosed("boom")]
    stats = b.statistics()
    assert stats.buffered == 0 and stats.in_flight == 0
    assert b.packets_to_send(0.2) == []  # nothing goes back to an err
    assert b.can_forget(0.2)
    with pytest.raises(LocalProtocolError):
        b.send(b"x", now=0.3)
    feed(b, [({"c": CID, "seq": 2}, b"late")], 0.4)
    assert drain(b) == []
    assert b.statistics().dropped == {"closed": 1}


def test_local_err_is_sent_once_and_reported() -> None:
    for reliable in (True, False):
        pipe = opened_pair(reliable)
        assert pipe.a.channel is not None
        pipe.a.channel.close("gone away", now=pipe.now)
        pipe.a.channel.close("again", now=pipe.now)  # no double error
        pump(pipe)
        assert [h for h in pipe.a.heads if "err" in h] == [{"c": CID, "err": "gone away"}]
        assert closes(pipe.a.events) == [ChannelClosed("gone away")]
        assert closes(pipe.b.events) == [ChannelClosed("gone away")]


def test_opening_times_out_and_a_reliable_one_tells_the_peer() -> None:
    for reliable in (True, False):
        a = open_channel(CID, "t", reliable=reliable, now=0.0)
        a.packets_to_send(0.0)
        now = 0.0
        sent = []
        while a.state is not ChannelState.CLOSED:
            timer = a.get_timer()
            assert timer is not None and timer <= CHANNEL_TIMEOUT
            now = timer
            a.handle_timer(now)
            sent += a.packets_to_send(now)
        assert now == CHANNEL_TIMEOUT
        assert drain(a) == [ChannelClosed("timeout")]
        errs = [head for head, _ in sent if "err" in head]
        # a reliable peer may still be resending to us: tell it; an unreliable one is not
        assert errs == ([{"c": CID, "err": "timeout"}] if reliable else [])


def test_err_timeout_is_sent_to_the_peer() -> None:
    a = open_channel(CID, "t", reliable=True, now=0.0)
    a.packets_to_send(0.0)
    a.handle_timer(CHANNEL_TIMEOUT)
    assert a.packets_to_send(CHANNEL_TIMEOUT) == [({"c": CID, "err": "timeout"}, b"")]
    assert a.packets_to_send(CHANNEL_TIMEOUT) == []


def test_unacked_data_times_out_even_when_open() -> None:
    pipe = opened_pair()
    assert pipe.a.channel is not None
    pipe.loss = 1.0  # the link dies
    start = pipe.now
    pipe.a.channel.send(b"into the void", now=pipe.now)
    pump(pipe)
    assert closes(pipe.a.events) == [ChannelClosed("timeout")]
    assert pipe.now == start + CHANNEL_TIMEOUT  # simulated time: unacked since start
    assert pipe.a.channel.statistics().resent >= 4  # resent along the way


def test_open_idle_channel_has_no_timeout() -> None:
    for reliable in (True, False):
        pipe = opened_pair(reliable)
        assert pipe.b.channel is not None
        pipe.b.channel.send(b"hi", now=pipe.now)
        pump(pipe)
        for side in (pipe.a, pipe.b):
            assert side.channel is not None
            assert side.channel.state is ChannelState.OPEN
            assert side.channel.get_timer() is None


def test_ended_times_out_when_we_never_end() -> None:
    for reliable in (True, False):
        pipe = opened_pair(reliable)
        assert pipe.a.channel is not None and pipe.b.channel is not None
        pipe.b.channel.send(b"", end=True, now=pipe.now)
        start = pipe.now
        pump(pipe)
        assert closes(pipe.a.events) == [ChannelClosed("timeout")]
        assert EndReceived() in pipe.a.events
        assert pipe.now >= start + CHANNEL_TIMEOUT


def test_graceful_close_ends_and_times_out_if_the_peer_never_ends() -> None:
    pipe = opened_pair()
    assert pipe.a.channel is not None and pipe.b.channel is not None
    pipe.a.channel.close(now=pipe.now)
    assert pipe.a.channel.send_capacity() == 0
    pump(pipe)
    assert EndReceived() in pipe.b.events
    assert closes(pipe.a.events) == [ChannelClosed("timeout")]


def test_unreliable_channel_round_trip_and_clean_close() -> None:
    a = open_channel(CID, "path", reliable=False, json={"paths": []}, now=0.0)
    assert isinstance(a, UnreliableChannel)
    [(head, body)] = a.packets_to_send(0.0)
    assert head == {"c": CID, "type": "path", "paths": []} and body == b""
    b = accept_channel(head, body, 0.1)
    assert not b.reliable
    b.send(b"pong", json={"path": {"type": "udp4"}}, now=0.1)
    [(reply, _)] = b.packets_to_send(0.1)
    assert reply == {"c": CID, "path": {"type": "udp4"}}  # no seq, no ack
    feed(a, [(reply, b"pong")], 0.2)
    assert a.state is ChannelState.OPEN
    a.send(b"", end=True, now=0.2)
    feed(b, a.packets_to_send(0.2), 0.3)
    assert b.state is ChannelState.ENDED
    b.send(b"", end=True, now=0.3)
    feed(a, b.packets_to_send(0.3), 0.4)
    assert drain(a)[-2:] == [EndReceived(), ChannelClosed(None)]
    assert drain(b)[-2:] == [EndReceived(), ChannelClosed(None)]


# -- validation and hostile input -------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        {"type": "t"},
        {"c": 0, "type": "t"},
        {"c": -1, "type": "t"},
        {"c": 2**32, "type": "t"},
        {"c": True, "type": "t"},
        {"c": "1", "type": "t"},
        {"c": 1},
        {"c": 1, "type": ""},
        {"c": 1, "type": 5},
        {"c": 1, "type": "t", "seq": 2},
        {"c": 1, "type": "t", "seq": True},
        {"c": 1, "type": "t", "err": "no"},
    ],
)
def test_accept_rejects_bad_opens(head: dict[str, Any]) -> None:
    with pytest.raises(MalformedPacket):
        accept_channel(head, b"", 0.0)


def test_reserved_keys_and_bad_arguments_are_refused() -> None:
    with pytest.raises(LocalProtocolError):
        open_channel(CID, "t", reliable=True, json={"seq": 5}, now=0.0)
    with pytest.raises(LocalProtocolError):
        open_channel(CID, "", reliable=True, now=0.0)
    with pytest.raises(LocalProtocolError):
        open_channel(ChannelId(0), "t", reliable=True, now=0.0)
    with pytest.raises(LocalProtocolError):
        open_channel(CID, "t", reliable=True, now=0.0, window=0)
    with pytest.raises(LocalProtocolError):
        open_channel(CID, "t", reliable=True, now=0.0, window=MAX_WINDOW + 1)
    with pytest.raises(LocalProtocolError):
        open_channel(CID, "t", reliable=False, now=0.0, timeout=0)
    a = open_channel(CID, "t", reliable=True, now=0.0)
    with pytest.raises(LocalProtocolError):
        a.send(b"x", json={"ack": 1}, now=0.0)
    a.send(b"x", end=True, now=0.0)
    with pytest.raises(LocalProtocolError):
        a.send(b"after end", now=0.0)


HOSTILE: list[dict[str, Any]] = [
    {"c": CID, "ack": -1},
    {"c": CID, "ack": "1"},
    {"c": CID, "ack": 1.5},
    {"c": CID, "ack": True},
    {"c": CID, "ack": 10**40},
    {"c": CID, "ack": 1, "miss": "1,2"},
    {"c": CID, "ack": 1, "miss": {"1": 2}},
    {"c": CID, "ack": 1, "miss": [0, 5]},
    {"c": CID, "ack": 1, "miss": [-3, 5]},
    {"c": CID, "ack": 1, "miss": [10**40, 5]},
    {"c": CID, "ack": 1, "miss": [1] * 100_000},
    {"c": CID, "miss": [1, 2]},
    {"c": CID, "seq": -5},
    {"c": CID, "seq": 0},
    {"c": CID, "seq": "2"},
    {"c": CID, "seq": 2.0},
    {"c": CID, "seq": None},
    {"c": CID, "seq": [2]},
    {"c": CID, "seq": 2**64},
    {"c": CID, "seq": 2, "end": "yes"},
    {"c": CID + 2, "seq": 2},
    {"c": CID, "err": 0},
    {"c": CID, "err": ""},
    {"c": CID, "err": None},
    {"c": CID, "err": False},
]


@pytest.mark.parametrize("head", HOSTILE, ids=[jsonlib.dumps(h)[:40] for h in HOSTILE])
def test_hostile_heads_are_dropped_and_counted_never_raised(head: dict[str, Any]) -> None:
    a = sender_with(5)
    a.packets_to_send(0.0)
    b = accept_channel({"c": CID, "type": "t", "seq": 1}, b"", 0.0)
    for channel in (a, b):
        before = channel.statistics()
        channel.receive(head, b"body", 0.5)
        after = channel.statistics()
        assert after.received == before.received + 1
        assert channel.state is not ChannelState.CLOSED
        channel.packets_to_send(0.5)
        assert after.in_flight <= before.in_flight


def test_hostile_err_values_close_with_bounded_text() -> None:
    for value, text in (("x" * 10_000, "x" * 256), ([], "unknown error"), (7, "unknown error")):
        b = accept_channel({"c": CID, "type": "t", "seq": 1}, b"", 0.0)
        b.receive({"c": CID, "err": value}, b"", 0.1)
        assert drain(b)[-1] == ChannelClosed(text)


def test_non_dict_heads_and_non_bytes_bodies_are_dropped() -> None:
    b = accept_channel({"c": CID, "type": "t", "seq": 1}, b"", 0.0)
    b.receive([1, 2], b"", 0.1)  # type: ignore[arg-type]
    b.receive({"c": CID, "seq": 2}, "text", 0.1)  # type: ignore[arg-type]
    assert b.statistics().dropped == {"bad packet": 2}


def test_content_after_end_and_second_end_are_dropped() -> None:
    b = accept_channel({"c": CID, "type": "t", "seq": 1}, b"", 0.0)
    feed(b, [({"c": CID, "seq": 3, "end": True}, b"")], 0.1)
    feed(b, [({"c": CID, "seq": 4}, b"after"), ({"c": CID, "seq": 5, "end": True}, b"")], 0.1)
    feed(b, [({"c": CID, "seq": 2}, b"before")], 0.1)
    events = drain(b)
    assert [e.body for e in events if isinstance(e, DataReceived)] == [b"", b"before"]
    assert events[-1] == EndReceived()
    assert b.statistics().dropped == {"after end": 1, "bad end": 1}
