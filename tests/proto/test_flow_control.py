"""Receive-side flow control of reliable channels (ours; p2pcloud.proto.channel).

A channel made with ``flow_control=True`` counts delivered data against its receive window
until the application reports it consumed (``ReliableChannel.consume``). These tests run two
channels over the fake pipe of test_channel.py (seeded loss, duplication, reordering, delay;
every head through real JSON; the pipe asserts on every packet that a seq never goes above
the sender's last received ack + the window the receiver last advertised) and check that a
reader that stops reading bounds what both sides hold, and that data flows intact after.
"""

from __future__ import annotations

import json as jsonlib
import random

import pytest

from p2pcloud.proto.channel import (
    CHANNEL_TIMEOUT,
    DEFAULT_WINDOW,
    ChannelClosed,
    ChannelState,
    DataReceived,
    ReliableChannel,
    accept_channel,
    decode_miss,
    open_channel,
)
from tests.proto.test_channel import CID, Pipe, Writer, closes, data_of


class FlowPipe(Pipe):
    """The fake pipe, with side b's channel accepted with flow control on."""

    def deliver(self, src: str, text: bytes, body: bytes) -> None:
        dst = self.b if src == "a" else self.a
        if dst.channel is None:
            head = jsonlib.loads(text)
            if "type" not in head:
                return
            self.carried += 1
            dst.channel = accept_channel(
                head, body, self.now, window=dst.window, timeout=self.timeout, flow_control=True
            )
            return
        super().deliver(src, text, body)


class Reader:
    """The application on side b: takes DataReceived events and consumes them when told."""

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe
        self.taken = 0  # events of b already looked at
        self.unread: list[bytes] = []  # bodies delivered and not consumed: the app's buffer
        self.data = bytearray()
        self.reading = True
        self.per_round: int | None = None  # consume at most this many per round

    def __call__(self) -> None:
        events = self.pipe.b.events
        while self.taken < len(events):
            event = events[self.taken]
            self.taken += 1
            if isinstance(event, DataReceived):
                self.unread.append(event.body)
        if not self.reading or not self.unread:
            return
        count = len(self.unread)
        if self.per_round is not None:
            count = min(self.per_round, count)
        for body in self.unread[:count]:
            self.data += body
        del self.unread[:count]
        channel = self.pipe.b.channel
        assert isinstance(channel, ReliableChannel)
        channel.consume(count, self.pipe.now)

    def buffered_bytes(self) -> int:
        return sum(map(len, self.unread))


def run_until(pipe: Pipe, reader: Reader, writer: Writer, until: float) -> None:
    rounds = 0
    while pipe.now < until:
        writer()
        reader()
        if not pipe.step(until):
            break
        rounds += 1
        assert rounds < 200_000, "never reached the time"


def sender_bytes(writer: Writer) -> int:
    """Bytes the sending channel holds: queued or in flight, not yet acked."""
    channel = writer.side.channel
    assert isinstance(channel, ReliableChannel)
    return sum(len(entry.body) for entry in channel._out.values())


@pytest.mark.parametrize(("seed", "loss"), [(0, 0.0), (1, 0.0), (2, 0.1), (3, 0.2), (4, 0.1)])
def test_a_reader_that_stops_bounds_the_sender_then_data_flows_intact(
    seed: int, loss: float
) -> None:
    rng = random.Random(seed)
    payload = rng.randbytes(400_000)  # ~800 packets of up to 1000 bytes: many windows
    a = open_channel(CID, "bulk", reliable=True, now=0.0)
    pipe = FlowPipe(a, seed=seed, loss=loss, dup=loss / 2, reorder=loss)
    writer = Writer(pipe.a, payload, random.Random(seed + 1), lambda: pipe.now)
    reader = Reader(pipe)

    while len(reader.data) < 50_000:  # reading normally for a while
        writer()
        reader()
        assert pipe.step() and pipe.now < 30.0
    reader.reading = False
    start = int(pipe.now) + 1
    # stop reading for six channel timeouts: the sender must stall, not time out
    peak_receiver = peak_sender = 0
    carried_before = None
    for t in range(start, start + 60):
        run_until(pipe, reader, writer, float(t))
        peak_receiver = max(peak_receiver, reader.buffered_bytes())
        peak_sender = max(peak_sender, sender_bytes(writer))
        if t == start + 20:
            carried_before = pipe.carried
    b = pipe.b.channel
    assert isinstance(b, ReliableChannel)
    # what the receiving application holds is bounded by one window (+1: the held-back ack)
    assert peak_receiver <= (DEFAULT_WINDOW + 1) * 1000
    assert b.unread == len(reader.unread) <= DEFAULT_WINDOW + 1
    assert b.statistics().buffered <= DEFAULT_WINDOW  # out of order, awaiting a gap
    # the sender holds at most its send buffer (two windows) and nothing was lost
    assert peak_sender <= 2 * DEFAULT_WINDOW * 1000
    assert writer.offset < len(payload)  # it really was stalled
    assert a.state is ChannelState.OPEN and b.state is ChannelState.OPEN
    assert not closes(pipe.a.events) and not closes(pipe.b.events)
    # while stalled, only window probes and their answers cross (one each per 2 s or so)
    assert carried_before is not None
    assert pipe.carried - carried_before < 4 * 40

    reader.reading = True
    run_until(pipe, reader, writer, start + 400.0)
    assert bytes(reader.data) == payload[: len(reader.data)]
    assert writer.ended
    assert bytes(reader.data) == payload
    assert data_of(pipe.b.events, skip_open=True) == payload


@pytest.mark.parametrize("seed", range(4))
def test_a_slow_reader_gets_everything_and_the_window_is_respected(seed: int) -> None:
    rng = random.Random(seed)
    payload = rng.randbytes(120_000)
    a = open_channel(CID, "bulk", reliable=True, now=0.0)
    pipe = FlowPipe(a, seed=seed, loss=0.05, dup=0.05, reorder=0.05)
    writer = Writer(pipe.a, payload, random.Random(seed + 1), lambda: pipe.now)
    reader = Reader(pipe)
    reader.per_round = 1  # one packet per pipe round: the reader is the bottleneck
    rounds = 0
    while True:
        writer()
        reader()
        b = pipe.b.channel
        if len(reader.data) == len(payload) and b is not None and b.state is ChannelState.ENDED:
            b.close(now=pipe.now)  # read everything and saw a's end: end too
        if not pipe.step() and not reader.unread:
            break
        rounds += 1
        assert rounds < 400_000
        assert len(reader.unread) <= DEFAULT_WINDOW + 1
    assert bytes(reader.data) == payload
    assert closes(pipe.a.events) == [ChannelClosed(None)]
    assert closes(pipe.b.events) == [ChannelClosed(None)]


def test_a_full_window_holds_back_one_ack_and_advertises_edge_plus_one() -> None:
    a = open_channel(CID, "bulk", reliable=True, now=0.0)
    for i in range(DEFAULT_WINDOW + 20):
        a.send(bytes([i]), now=0.0)
    packets = a.packets_to_send(0.0)
    assert len(packets) == DEFAULT_WINDOW  # open + 49: the v3 window
    b = accept_channel(packets[0][0], packets[0][1], 0.0, flow_control=True)
    for head, body in packets[1:]:
        b.receive(head, body, 0.0)
    assert b.unread == DEFAULT_WINDOW
    acks = [h for h, _ in b.packets_to_send(0.1) if "seq" not in h]
    assert acks and acks[-1]["ack"] == DEFAULT_WINDOW - 1
    assert decode_miss(acks[-1]["ack"], acks[-1]["miss"]) == ([], DEFAULT_WINDOW)
    a.receive(acks[-1], b"", 0.1)
    assert a.packets_to_send(0.1) == []  # stalled at the edge
    # the application reads 20 packets: an ack with the new edge goes out at once
    b.consume(20, 0.2)
    acks = [h for h, _ in b.packets_to_send(0.2)]
    assert acks[-1]["ack"] == DEFAULT_WINDOW
    assert acks[-1]["ack"] + decode_miss(acks[-1]["ack"], acks[-1]["miss"])[1] - acks[-1][
        "ack"
    ] == DEFAULT_WINDOW + 20
    a.receive(acks[-1], b"", 0.2)
    sent = [h["seq"] for h, _ in a.packets_to_send(0.2)]
    assert sent == list(range(DEFAULT_WINDOW + 1, DEFAULT_WINDOW + 21))


def test_without_flow_control_consume_is_ignored_and_acks_are_unchanged() -> None:
    a = open_channel(CID, "bulk", reliable=True, now=0.0)
    for i in range(10):
        a.send(bytes([i]), now=0.0)
    packets = a.packets_to_send(0.0)
    b = accept_channel(packets[0][0], packets[0][1], 0.0)
    for head, body in packets[1:]:
        b.receive(head, body, 0.0)
    b.consume(5, 0.0)
    assert b.unread == 0
    acks = b.packets_to_send(0.0 + CHANNEL_TIMEOUT / 10)
    assert acks[-1][0] == {"c": CID, "ack": 11}
