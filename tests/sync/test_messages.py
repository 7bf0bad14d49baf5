"""The sync protocol v2 codec: compact ids round-trip, hostile bytes are only MalformedPacket."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcloud._ids import Hashname, SubCloudId
from p2pcloud.errors import MalformedPacket
from p2pcloud.sync import replica_id_for
from p2pcloud.sync.messages import (
    MAX_MESSAGE_BYTES,
    MAX_TABLE_ENTRIES,
    Ack,
    Envelopes,
    FramingError,
    IdTable,
    Message,
    Reconcile,
    SnapshotChunk,
    Unknown,
    VectorOffer,
    Vectors,
    decode_message,
    encode_message,
    split_frames,
)
from p2pcloud.sync.reconcile import Range

A = Hashname("a" * 52)
B = Hashname("b" * 52)
SC = SubCloudId(bytes(range(16)))


def tables() -> tuple[IdTable, IdTable]:
    """A's table (encodes A->B, decodes B->A) and B's."""
    return IdTable(A, B), IdTable(B, A)


def wire(msg: Message, sender: IdTable, receiver: IdTable) -> tuple[Message, int]:
    frame = encode_message(msg, sender)
    buf = bytearray(frame)
    (body,) = split_frames(buf)
    assert not buf
    return decode_message(body, receiver), len(frame)


def test_the_endpoints_replicas_travel_as_one_byte_tags() -> None:
    ta, tb = tables()
    version = {replica_id_for(SC, A): 300, replica_id_for(SC, B): 7}
    offer = VectorOffer(SC, version, True, 512)
    got, size = wire(Vectors((offer,)), ta, tb)
    assert got == Vectors((offer,))
    # 16-byte sub-cloud definition + refs/tags/counters: nothing like 2 x 16-byte origins
    literal = len(encode_message(Vectors((offer,))))
    assert size <= 36 and literal - size >= 30, (size, literal)
    body = cbor2.loads(encode_message(Vectors((offer,)), IdTable(A, B))[1:])
    assert -1 in body[3][1] and -2 in body[3][1]  # the tags, not the ids


def test_a_sub_cloud_named_once_is_an_index_after_in_both_directions() -> None:
    ta, tb = tables()
    writer = bytes([9]) * 16  # a third member: defined once, then an index
    first = VectorOffer(SC, {writer: 3}, True, 0)
    got, size1 = wire(Vectors((first,)), ta, tb)
    assert got == Vectors((first,))
    again, size2 = wire(Vectors((first,)), ta, tb)
    assert again == got and size1 - size2 >= 32  # both ids were indexes the second time
    # B answers about the same sub-cloud and writer: it names A's definitions (odd refs)
    answer = VectorOffer(SC, {writer: 5, replica_id_for(SC, B): 1}, False, 0)
    got_b, size_b = wire(Vectors((answer,)), tb, ta)
    assert got_b == Vectors((answer,)) and size_b < 16
    assert tb.defined_out == 0 and ta.defined_in == 0
    env, _ = wire(Envelopes(SC, 4, (b"raw",)), tb, ta)
    assert env == Envelopes(SC, 4, (b"raw",))


@pytest.mark.parametrize(
    "msg",
    [
        Reconcile(False, (Range(0, b"", 0, bytes(8), b"12345678"),)),
        Reconcile(True, ()),
        Ack((1, 2, 1 << 40)),
        SnapshotChunk(SC, 9, 3, 10, {replica_id_for(SC, A): 2, b"x" * 32: 4}, b"abc"),
        Unknown((SC, SubCloudId(b"\xff" * 16))),
        Envelopes(SC, 0, ()),
    ],
)
def test_every_message_type_round_trips_with_and_without_a_table(msg: Message) -> None:
    ta, tb = tables()
    assert wire(msg, ta, tb)[0] == msg
    assert decode_message(split_frames(bytearray(encode_message(msg)))[0]) == msg


def test_a_full_table_sends_ids_literally_and_stays_in_step() -> None:
    ta, tb = tables()
    ids = [SubCloudId(i.to_bytes(16, "big")) for i in range(MAX_TABLE_ENTRIES + 5)]
    for i in range(0, len(ids), 4000):
        got, _ = wire(Unknown(tuple(ids[i : i + 4000])), ta, tb)
        assert got == Unknown(tuple(ids[i : i + 4000]))
    assert ta.defined_out == tb.defined_in == MAX_TABLE_ENTRIES
    got, size = wire(Unknown((ids[0], ids[-1])), ta, tb)  # an index, then a literal
    assert got == Unknown((ids[0], ids[-1])) and size > 16


def test_a_failed_encoding_defines_nothing() -> None:
    ta, _tb = tables()
    offer = VectorOffer(SC, {bytes([i % 256, i // 256]) * 8: 1 for i in range(3000)}, True, 0)
    with pytest.raises(ValueError):
        encode_message(Vectors((offer,)), ta)
    assert ta.defined_out == 0


def _body(obj: Any) -> bytes:
    return cbor2.dumps(obj)


@pytest.mark.parametrize(
    "obj",
    [
        [2, 2, [], [3, [], True, 0]],  # index 1 of the sender's dictionary: never defined
        [2, 2, [], [1, [], True, 0]],  # index 0 of ours: we defined nothing
        [2, 2, [], [-1, [], True, 0]],  # a tag where a sub-cloud belongs
        [2, 2, [], [bytes(16), [True, 1], True, 0]],  # a bool is no tag
        [2, 2, [], [bytes(15), [], True, 0]],  # a short sub-cloud id
        [2, 2, [], [bytes(16), [b"x" * 33, 1], True, 0]],  # an origin too long
        [2, 2, [], [bytes(16), [-1, 1 << 63], True, 0]],  # a counter past the core's
        [2, 2, [], [bytes(16), [], True, MAX_MESSAGE_BYTES + 1]],  # bytes per dot
        [2, 3, [], bytes(16), -1, []],  # a negative batch id
        [2, 3, [], bytes(16), 1],  # a field missing
        [2, 3, "defs", bytes(16), 1, []],
        [2, 4, [1], "extra"],
        [2, 1, "yes", [], b""],
        [2, 1, False, [], b"123456789"],  # a salt too long
        ["2", 1],
        [],
        {"v": 2},
    ],
)
def test_hostile_fields_raise_only_malformed_packet(obj: Any) -> None:
    _ta, tb = tables()
    with pytest.raises(MalformedPacket):
        decode_message(_body(obj), tb)


def test_definitions_count_even_when_a_later_field_is_malformed() -> None:
    _ta, tb = tables()
    with pytest.raises(MalformedPacket):
        decode_message(_body([2, 3, [bytes(16)], bytes(16), -5, []]), tb)
    assert tb.defined_in == 1  # the sender counted it as defined too
    got = decode_message(_body([2, 3, [], 0, 1, []]), tb)
    assert got == Envelopes(SubCloudId(bytes(16)), 1, ())


def test_too_many_definitions_define_nothing() -> None:
    _ta, tb = tables()
    defs = [i.to_bytes(16, "big") for i in range(MAX_TABLE_ENTRIES + 1)]
    with pytest.raises(MalformedPacket):
        decode_message(_body([2, 6, defs, []]), tb)
    with pytest.raises(MalformedPacket):
        decode_message(_body([2, 6, [bytes(16), b"short"], []]), tb)
    assert tb.defined_in == 0


def test_references_need_a_table() -> None:
    with pytest.raises(MalformedPacket):
        decode_message(_body([2, 6, [], [0]]))
    with pytest.raises(MalformedPacket):
        decode_message(_body([2, 6, [bytes(16)], []]))
    with pytest.raises(MalformedPacket):
        decode_message(_body([2, 2, [], [bytes(16), [-2, 1], True, 0]]))


def test_framing_limits() -> None:
    buf = bytearray(encode_message(Ack((1,))))
    whole = bytes(buf)
    part = bytearray(whole[:-1])
    assert split_frames(part) == [] and part == whole[:-1]  # a truncated frame waits
    with pytest.raises(FramingError):
        split_frames(bytearray(b"\x00"))  # empty: a version-1 peer's length prefix
    with pytest.raises(FramingError):
        split_frames(bytearray(b"\xff\xff\xff\xff\x01"))  # a 5-byte prefix
    big = MAX_MESSAGE_BYTES + 1
    prefix = bytes([(big & 0x7F) | 0x80, ((big >> 7) & 0x7F) | 0x80,
                    ((big >> 14) & 0x7F) | 0x80, big >> 21])
    with pytest.raises(FramingError):
        split_frames(bytearray(prefix))
    assert split_frames(bytearray(whole + whole)) == [whole[1:], whole[1:]]


_ID = st.sampled_from([SC, SubCloudId(b"\x01" * 16), SubCloudId(b"\x02" * 16)])
_ORIGIN = st.one_of(
    st.sampled_from([replica_id_for(SC, A), replica_id_for(SC, B), b"\x07" * 16]),
    st.binary(min_size=8, max_size=32),
)
_VERSION = st.dictionaries(_ORIGIN, st.integers(1, (1 << 63) - 1), max_size=4)
_MSG = st.one_of(
    st.builds(
        Vectors,
        st.lists(
            st.builds(VectorOffer, _ID, _VERSION, st.booleans(), st.integers(0, 10**6)),
            max_size=3,
        ).map(tuple),
    ),
    st.builds(Envelopes, _ID, st.integers(0, 99), st.just((b"e",))),
    st.builds(Unknown, st.lists(_ID, max_size=3).map(tuple)),
    st.builds(SnapshotChunk, _ID, st.integers(0, 9), st.just(0), st.just(2), _VERSION,
              st.just(b"ab")),
)


@settings(max_examples=150)
@given(st.lists(st.tuples(st.booleans(), _MSG), max_size=12))
def test_any_conversation_round_trips(conversation: list[tuple[bool, Message]]) -> None:
    # both directions interleaved, as on a channel: the dictionaries never disagree
    ta, tb = tables()
    for from_a, msg in conversation:
        got, _ = wire(msg, ta, tb) if from_a else wire(msg, tb, ta)
        assert got == msg
    assert ta.defined_out == tb.defined_in and tb.defined_out == ta.defined_in


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bodies_raise_only_malformed_packet(data: bytes) -> None:
    _ta, tb = tables()
    try:
        msg = decode_message(data, tb)
    except MalformedPacket:
        return
    assert isinstance(msg, (Reconcile, Vectors, Envelopes, Ack, SnapshotChunk, Unknown))
