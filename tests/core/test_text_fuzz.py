"""Decoding fuzz for the text CRDT: random and mutated deltas and snapshots raise only
DecodeError and change nothing, and both implementations accept exactly the same inputs
with the same results."""

from __future__ import annotations

import zlib
from functools import cache
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcloud._core import _ctext, _reference_text
from p2pcloud.errors import DecodeError
from tests.core.text_support import rid

FORMATS = {"delta": _reference_text.FORMAT_DELTA, "state": _reference_text.FORMAT_STATE}


@cache
def corpus() -> dict[str, list[bytes]]:
    """Valid deltas and snapshots of a small concurrent session (some deflated)."""
    docs = [_reference_text.Text(rid(n)) for n in range(3)]
    deltas: list[bytes] = []
    for round_ in range(6):
        for n, doc in enumerate(docs):
            doc.insert(len(doc) // 2, f"{n}:{round_} é😀 ")
            if len(doc) > 4:
                doc.delete(1, 2)
            deltas.append(doc.take_pending())
            docs[(n + 1) % 3].apply(deltas[-1])
    big = _reference_text.Text(rid(4))
    big.insert(0, "lorem ipsum " * 60)
    for k in range(20):
        big.delete(5 * k, 1)
    deltas.append(big.take_pending())
    states = [doc.encode_state() for doc in docs] + [big.encode_state()]
    held = _reference_text.Text(rid(5))
    held.apply(deltas[4])  # ops waiting for predecessors: the snapshot carries them
    states.append(held.encode_state())
    return {"delta": deltas, "state": states}


def fresh_pair() -> tuple[Any, Any]:
    """The same small replica in both implementations, to apply deltas to."""
    twin, fast = _reference_text.Text(rid(6)), _ctext.Text(rid(6))
    for doc in (twin, fast):
        doc.insert(0, "base text")
        doc.apply(corpus()["delta"][0])
    return twin, fast


def validates(module: Any, data: bytes) -> bool:
    try:
        module.validate_delta(data)
    except DecodeError:
        return False
    return True


def check_delta(data: bytes) -> None:
    valid = validates(_reference_text, data)
    assert validates(_ctext, data) == valid
    twin, fast = fresh_pair()
    before = twin.encode_state()
    outcomes = []
    for doc in (twin, fast):
        try:
            outcomes.append(("ok", doc.apply(data), doc.encode_state()))
        except DecodeError:
            assert doc.encode_state() == before  # nothing changed
            outcomes.append(("error", None, before))
    assert outcomes[0] == outcomes[1], data
    # apply refuses exactly what validate_delta refuses (the held-ops bound aside)
    assert (outcomes[0][0] == "ok") == valid


def check_state(data: bytes) -> None:
    outcomes: list[tuple[Any, ...]] = []
    for cls in (_reference_text.Text, _ctext.Text):
        try:
            doc = cls.decode_state(data, rid(7))
            outcomes.append(("ok", doc.value(), doc.version(), doc.encode_state()))
        except DecodeError:
            outcomes.append(("error",))
    assert outcomes[0] == outcomes[1], data


def reframe(kind: str, body: bytes, deflate: bool) -> bytes:
    """Frames a (mutated) body, deflated or not, so mutations reach the body parser."""
    fmt = FORMATS[kind]
    if deflate:
        packed = bytearray((fmt, _reference_text.FLAG_DEFLATED))
        _reference_text._put_uint(packed, len(body))
        return bytes(packed) + zlib.compress(body)
    return bytes((fmt, 0)) + body


@pytest.mark.parametrize("kind", ["delta", "state"])
def test_corpus_is_valid_in_both(kind: str) -> None:
    for data in corpus()[kind]:
        if kind == "delta":
            check_delta(data)
        else:
            check_state(data)
            assert _ctext.Text.decode_state(data, rid(7)).encode_state() == data


@given(st.binary(max_size=200))
def test_random_bytes(data: bytes) -> None:
    check_delta(data)
    check_state(data)


@given(st.sampled_from(["delta", "state"]), st.binary(max_size=120))
def test_random_bodies_behind_a_valid_header(kind: str, body: bytes) -> None:
    data = bytes((FORMATS[kind], 0)) + body
    if kind == "delta":
        check_delta(data)
    else:
        check_state(data)


MUTATION = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete"]),
        st.integers(0, 10**6),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, where, value in mutations:
        if not buf:
            break
        at = where % len(buf)
        if op == "flip":
            buf[at] ^= 1 << (value % 8)
        elif op == "set":
            buf[at] = value
        elif op == "insert":
            buf.insert(at, value)
        else:
            del buf[at]
    return bytes(buf)


@given(st.sampled_from(["delta", "state"]), st.integers(0, 100), MUTATION, st.booleans())
def test_mutated_bodies(
    kind: str, pick: int, mutations: list[tuple[str, int, int]], deflate: bool
) -> None:
    samples = corpus()[kind]
    sample = samples[pick % len(samples)]
    body = _reference_text._unframe(FORMATS[kind], sample)
    data = reframe(kind, mutate(body, mutations), deflate)
    if kind == "delta":
        check_delta(data)
    else:
        check_state(data)


@given(st.sampled_from(["delta", "state"]), st.integers(0, 100), MUTATION)
def test_mutated_framed_bytes(kind: str, pick: int, mutations: list[tuple[str, int, int]]) -> None:
    samples = corpus()[kind]
    data = mutate(samples[pick % len(samples)], mutations)
    if kind == "delta":
        check_delta(data)
    else:
        check_state(data)


def test_limits_are_enforced() -> None:
    huge_count = bytes((_reference_text.FORMAT_DELTA, 0)) + b"\xff" * 9 + b"\x7f"
    too_long_varint = bytes((_reference_text.FORMAT_DELTA, 0)) + b"\xff" * 11
    bomb_header = bytearray((_reference_text.FORMAT_STATE, 1))
    _reference_text._put_uint(bomb_header, _reference_text.MAX_ENCODED_BYTES + 1)
    for data in (huge_count, too_long_varint, bytes(bomb_header) + b"x" * 10, b"\x00\x00"):
        check_delta(data)
        check_state(data)
        for cls in (_reference_text.Text, _ctext.Text):
            with pytest.raises(DecodeError):
                cls(rid(0)).apply(data)
            with pytest.raises(DecodeError):
                cls.decode_state(data, rid(0))


def _reorder_delete_runs(state: bytes) -> bytes:
    """Re-encodes a snapshot with its delete runs rotated by one (the first goes last):
    still valid (every field is relative to the previous run as written), but no longer
    canonical. Returns b"" when the rotation cannot be written."""
    spec = _reference_text
    outer = spec._Reader(spec._unframe(spec.FORMAT_STATE, state))
    meta = spec._Reader(spec._unpack(outer))
    content = spec._unpack(outer)
    agents = spec._read_agents(meta)
    n_runs, n_dels = meta.uint(), meta.uint()
    cols = [meta.take(meta.uint()) for _ in range(spec.N_COLUMNS)]
    held = meta.take(meta.uint())
    readers = {k: spec._Reader(cols[k]) for k in range(spec.COL_DEL_HEAD, spec.N_COLUMNS)}
    runs = []
    prev_agent, prev_end, prev_target = -1, 1, 0
    for _ in range(n_dels):
        head = readers[spec.COL_DEL_HEAD].uint()
        if head >> 1 != prev_agent:
            prev_agent, prev_end = head >> 1, 1
        counter = prev_end + readers[spec.COL_DEL_GAP].uint()
        length = readers[spec.COL_DEL_LENGTH].uint()
        target_agent = readers[spec.COL_DEL_TARGET_AGENT].uint()
        target = prev_target + readers[spec.COL_DEL_TARGET].sint()
        runs.append((head, counter, length, target_agent, target))
        prev_end, prev_target = counter + length, target
    fresh = [bytearray() for _ in range(spec.N_COLUMNS)]
    prev_agent, prev_end, prev_target = -1, 1, 0
    for head, counter, length, target_agent, target in runs[1:] + runs[:1]:
        if head >> 1 != prev_agent:
            prev_agent, prev_end = head >> 1, 1
        if counter < prev_end:  # a gap cannot go backwards within one replica's runs
            return b""
        spec._put_uint(fresh[spec.COL_DEL_HEAD], head)
        spec._put_uint(fresh[spec.COL_DEL_GAP], counter - prev_end)
        spec._put_uint(fresh[spec.COL_DEL_LENGTH], length)
        spec._put_uint(fresh[spec.COL_DEL_TARGET_AGENT], target_agent)
        spec._put_sint(fresh[spec.COL_DEL_TARGET], target - prev_target)
        prev_end, prev_target = counter + length, target
    body = bytearray()
    spec._put_agents(body, agents)
    spec._put_uint(body, n_runs)
    spec._put_uint(body, n_dels)
    for k in range(spec.N_COLUMNS):
        column = cols[k] if k < spec.COL_DEL_HEAD else bytes(fresh[k])
        spec._put_uint(body, len(column))
        body += column
    spec._put_uint(body, len(held))
    body += held
    out = bytearray((spec.FORMAT_STATE, 0))
    spec._pack(out, bytes(body))
    spec._pack(out, content)
    return bytes(out)


def test_non_canonical_delete_order_loads_the_same_in_both() -> None:
    """Delete runs of one replica separated by another's, listed newest first."""
    a, b = _reference_text.Text(rid(0)), _reference_text.Text(rid(1))
    a.insert(0, "abcdefghij")
    b.apply(a.take_pending())
    a.delete(0, 1)  # a: counter 11
    b.delete(8, 1)  # b: counter 1
    a.insert(0, "XY")  # a: 12..13
    a.delete(5, 1)  # a: counter 14
    for source, sink in ((a, b), (b, a)):
        sink.apply(source.encode_since(sink.version()))
    state = a.encode_state()
    shuffled = _reorder_delete_runs(state)
    assert shuffled and shuffled != state
    check_state(shuffled)
    assert _ctext.Text.decode_state(shuffled, rid(2)).encode_state() == state
