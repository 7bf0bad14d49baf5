"""Property tests of the channel state machines: hostile input and any bad link.

Hypothesis feeds arbitrary JSON heads and bodies (biased towards the protocol keys and
plausible numbers) between ordinary API calls and checks that nothing raises and that the
channel's invariants hold after every step; and it runs whole transfers over links with any
mix of loss, duplication, reordering and window sizes.
"""

from __future__ import annotations

import json as jsonlib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcloud.proto.channel import (
    DEFAULT_WINDOW,
    MAX_WINDOW,
    RECEIVE_SLACK,
    Channel,
    ChannelClosed,
    ChannelEvent,
    ChannelState,
    DataReceived,
    EndReceived,
    ReliableChannel,
    accept_channel,
    decode_miss,
    encode_miss,
    open_channel,
)
from tests.proto.test_channel import CID, transfer

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(-3, 120),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
small_ints = st.integers(-2, 130)
protocol_values = {
    "c": st.one_of(st.just(CID), st.just(CID), st.just(CID), json_values),
    "seq": st.one_of(small_ints, small_ints, json_values),
    "ack": st.one_of(small_ints, small_ints, json_values),
    "miss": st.one_of(st.lists(st.integers(-2, 60), max_size=12), json_values),
    "end": st.one_of(st.just(True), json_values),
    "err": st.one_of(st.just(None), st.text(max_size=20), json_values),
    "type": st.one_of(st.just("t"), json_values),
}


@st.composite
def heads(draw: st.DrawFn) -> dict[str, Any]:
    head: dict[str, Any] = {"c": draw(protocol_values["c"])}
    for key in draw(st.sets(st.sampled_from(sorted(protocol_values)), max_size=5)):
        head[key] = draw(protocol_values[key])
    if draw(st.booleans()):
        head.update(draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3)))
    if head.get("err") is not None and draw(st.integers(0, 3)):
        del head["err"]  # mostly keep the channel alive to reach deeper states
    return head


operations = st.lists(
    st.one_of(
        st.tuples(st.just("receive"), heads(), st.binary(max_size=40)),
        st.tuples(st.just("send"), st.binary(max_size=40), st.booleans()),
        st.tuples(st.just("tick"), st.floats(0, 12)),
        st.tuples(st.just("flush")),
        st.tuples(st.just("close"), st.one_of(st.none(), st.text(max_size=10))),
    ),
    max_size=60,
)


class Checker:
    """Checks a channel's invariants after every step of a hypothesis run."""

    def __init__(self, channel: Channel, window: int) -> None:
        self.channel = channel
        self.window = window
        self.events: list[ChannelEvent] = []
        self.now = 0.0
        self.last_seq_delivered = 0

    def check(self) -> None:
        channel = self.channel
        while (event := channel.next_event()) is not None:
            assert not any(isinstance(e, ChannelClosed) for e in self.events), "event after close"
            if isinstance(event, DataReceived) and channel.reliable:
                seq = event.json["seq"]
                assert seq == self.last_seq_delivered + 1, "out of order delivery"
                self.last_seq_delivered = seq
            if isinstance(event, EndReceived):
                assert not any(isinstance(e, EndReceived) for e in self.events)
            self.events.append(event)
        stats = channel.statistics()
        assert stats.buffered <= self.window + RECEIVE_SLACK
        assert stats.in_flight <= 2 * MAX_WINDOW + 1
        assert (channel.state is ChannelState.CLOSED) == any(
            isinstance(e, ChannelClosed) for e in self.events
        )
        timer = channel.get_timer()
        assert timer is None or isinstance(timer, float)
        if isinstance(channel, ReliableChannel):
            assert channel.send_capacity() >= 0

    def flush(self) -> None:
        channel = self.channel
        for head, body in channel.packets_to_send(self.now):
            assert head["c"] == channel.cid
            jsonlib.dumps(head, allow_nan=False)  # always valid JSON for the wire
            assert isinstance(body, bytes)
            seq = head.get("seq")
            if isinstance(channel, ReliableChannel) and seq is not None:
                # v3 reliable.md: never above the peer's ack + window; a hostile peer may
                # move its advertised window, never ours (white-box check)
                assert seq <= channel._acked + self.window


def run_operations(channel: Channel, window: int, ops: list[tuple[Any, ...]]) -> Checker:
    checker = Checker(channel, window)
    checker.check()
    for op in ops:
        kind = op[0]
        if kind == "receive":
            channel.receive(op[1], op[2], checker.now)
        elif kind == "send":
            if channel.state is not ChannelState.CLOSED and channel.send_capacity() > 0:
                channel.send(op[1], end=op[2], now=checker.now)
        elif kind == "tick":
            checker.now += op[1]
            timer = channel.get_timer()
            if timer is not None and timer <= checker.now:
                channel.handle_timer(checker.now)
        elif kind == "flush":
            checker.flush()
        else:
            channel.close(op[1], now=checker.now)
        checker.check()
        checker.flush()
        checker.check()
    return checker


@given(ops=operations, window=st.sampled_from([DEFAULT_WINDOW, 4, 200]))
def test_hostile_heads_on_an_outgoing_reliable_channel(
    ops: list[tuple[Any, ...]], window: int
) -> None:
    channel = open_channel(CID, "t", reliable=True, now=0.0, window=window)
    for _ in range(20):
        if channel.send_capacity():
            channel.send(b"data", now=0.0)
    run_operations(channel, window, ops)


@given(ops=operations, reliable=st.booleans())
def test_hostile_heads_on_an_incoming_channel(ops: list[tuple[Any, ...]], reliable: bool) -> None:
    open_head: dict[str, Any] = {"c": CID, "type": "t"}
    if reliable:
        open_head["seq"] = 1
    channel = accept_channel(open_head, b"", 0.0)
    run_operations(channel, DEFAULT_WINDOW, ops)


@given(ops=operations)
def test_hostile_heads_on_an_outgoing_unreliable_channel(ops: list[tuple[Any, ...]]) -> None:
    run_operations(open_channel(CID, "t", reliable=False, now=0.0), DEFAULT_WINDOW, ops)


@given(
    ack=st.integers(0, 2**40),
    gaps=st.lists(st.integers(1, 400), max_size=40, unique=True),
    extra=st.integers(1, 100),
)
def test_miss_encoding_round_trips(ack: int, gaps: list[int], extra: int) -> None:
    missing = [ack + gap for gap in gaps]
    capacity = max(gaps, default=0) + extra
    encoded = encode_miss(ack, missing, capacity)
    assert all(delta > 0 for delta in encoded)
    assert decode_miss(ack, encoded) == (sorted(missing), ack + capacity)


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**32),
    loss=st.floats(0, 0.35),
    dup=st.floats(0, 0.3),
    reorder=st.floats(0, 0.5),
    windows=st.sampled_from(
        [(50, 50), (8, 8), (1, 1), (200, 200), (200, 50), (50, 200), (3, 120), (50, 2)]
    ),
    both_ways=st.booleans(),
)
def test_any_bad_link_delivers_everything_in_order(
    seed: int,
    loss: float,
    dup: float,
    reorder: float,
    windows: tuple[int, int],
    both_ways: bool,
) -> None:
    transfer(
        seed,
        size=12 * 1024,
        loss=loss,
        dup=dup,
        reorder=reorder,
        both_ways=both_ways,
        window_a=windows[0],
        window_b=windows[1],
        timeout=120.0,  # the property is delivery; heavy loss may stall 10 s by chance
    )
