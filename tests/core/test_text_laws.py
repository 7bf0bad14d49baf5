"""CRDT laws, interleaving and API contract of the text CRDT, in both implementations."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcloud._core import _ctext, _reference_text
from p2pcloud.errors import CoreUsageError, DecodeError
from tests.core.text_support import IMPLEMENTATIONS, rid

IMPL = pytest.mark.parametrize("name", ["twin", "cython"])

EDIT = st.tuples(
    st.integers(0, 2),  # replica
    st.booleans(),  # insert?
    st.integers(0, 10**6),  # position (reduced modulo the length)
    st.text("xyz", min_size=1, max_size=5),
    st.integers(1, 4),  # delete length
    st.booleans(),  # take a delta after this edit?
)


def concurrent_deltas(cls: Any, edits: list[tuple[Any, ...]]) -> tuple[list[Any], list[bytes]]:
    """Three replicas edit; some deltas are exchanged as they go, all are returned."""
    docs = [cls(rid(n)) for n in range(3)]
    deltas: list[bytes] = []
    for who, is_insert, pos, text, length, send in edits:
        doc = docs[who]
        if is_insert or not len(doc):
            doc.insert(pos % (len(doc) + 1), text)
        else:
            pos %= len(doc)
            doc.delete(pos, min(length, len(doc) - pos))
        if send:
            delta = doc.take_pending()
            deltas.append(delta)
            docs[(who + 1) % 3].apply(delta)  # causal chains across replicas
    deltas.extend(doc.take_pending() for doc in docs)
    return docs, [d for d in deltas if d]


def merged_state(cls: Any, deltas: list[bytes]) -> bytes:
    doc = cls(rid(7))
    for delta in deltas:
        doc.apply(delta)
    state: bytes = doc.encode_state()
    return state


@IMPL
@given(st.lists(EDIT, max_size=30), st.randoms(use_true_random=False))
def test_any_delivery_order_and_duplication_converge(name: str, edits: Any, rnd: Any) -> None:
    cls = IMPLEMENTATIONS[name]
    _, deltas = concurrent_deltas(cls, edits)
    reference = merged_state(cls, deltas)
    shuffled = deltas * 2
    rnd.shuffle(shuffled)
    assert merged_state(cls, shuffled) == reference
    assert merged_state(cls, list(reversed(deltas))) == reference


@IMPL
@given(st.lists(EDIT, max_size=30), st.randoms(use_true_random=False))
def test_loss_then_anti_entropy_converges(name: str, edits: Any, rnd: Any) -> None:
    """Deltas are lost; one exchange of encode_since each way repairs everything."""
    cls = IMPLEMENTATIONS[name]
    docs, deltas = concurrent_deltas(cls, edits)
    a, b = cls(rid(5)), cls(rid(6))
    for delta in deltas:
        for doc in (a, b):
            if rnd.random() < 0.5:
                doc.apply(delta)
    for doc in docs:  # the authors hold everything they wrote
        for sink in (a, b):
            sink.apply(doc.encode_since(sink.version()))
    b_needs = a.encode_since(b.version())
    a_needs = b.encode_since(a.version())
    b.apply(b_needs)
    a.apply(a_needs)
    assert a.encode_state() == b.encode_state() == merged_state(cls, deltas)
    assert a.encode_since(b.version()) == b""
    assert a.apply(a.encode_since({})) is False


@IMPL
@given(st.lists(EDIT, max_size=30), st.lists(st.integers(0, 40), min_size=3, max_size=3))
def test_encode_since_sends_exactly_what_is_missing(name: str, edits: Any, have: list[int]) -> None:
    cls = IMPLEMENTATIONS[name]
    _, deltas = concurrent_deltas(cls, edits)
    full = cls(rid(7))
    for delta in deltas:
        full.apply(delta)
    version = {rid(n): have[n] for n in range(3)}
    delta = full.encode_since(version)
    sent = set()
    for run in _reference_text._decode_delta(delta) if delta else []:
        for counter in range(run.counter, run.end()):
            sent.add((run.agent, counter))
    missing = {
        (agent, counter)
        for agent, top in full.version().items()
        for counter in range(version.get(agent, 0) + 1, top + 1)
    }
    assert sent == missing


@IMPL
@given(st.lists(EDIT, max_size=30))
def test_state_round_trips(name: str, edits: Any) -> None:
    cls = IMPLEMENTATIONS[name]
    docs, _ = concurrent_deltas(cls, edits)
    for doc in docs:
        state = doc.encode_state()
        copy = cls.decode_state(state, rid(0))
        assert copy.value() == doc.value()
        assert copy.version() == doc.version()
        assert copy.encode_state() == state
        assert copy.encode_since({}) == doc.encode_since({})
        # the copy edits as replica 0 and continues its counters
        copy.insert(0, "!")
        assert copy.version()[rid(0)] == doc.version().get(rid(0), 0) + 1


@IMPL
def test_held_ops_wait_for_their_predecessors(name: str) -> None:
    cls = IMPLEMENTATIONS[name]
    a, b = cls(rid(0)), cls(rid(1))
    a.insert(0, "hello")
    first = a.take_pending()
    a.insert(5, " world")
    a.delete(0, 1)
    second = a.take_pending()
    assert b.apply(second) is False  # held: its predecessors are missing
    assert b.value() == "" and b.version() == {}
    held_state = b.encode_state()  # held ops are part of the snapshot
    reloaded = cls.decode_state(held_state, rid(1))
    assert reloaded.encode_state() == held_state
    assert b.apply(first) is True
    assert reloaded.apply(first) is True
    assert b.value() == reloaded.value() == "ello world"
    assert b.version() == a.version()


@IMPL
def test_too_many_held_ops_is_refused_without_change(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _reference_text if name == "twin" else _ctext
    monkeypatch.setattr(module, "MAX_HELD_RUNS", 2)
    a, b = IMPLEMENTATIONS[name](rid(0)), IMPLEMENTATIONS[name](rid(1))
    a.insert(0, "a")
    a.take_pending()  # lost
    for _ in range(3):
        a.insert(0, "b")
        a.delete(1, 1)
    delta = a.take_pending()  # 6 runs, all waiting for the lost first op
    before = b.encode_state()
    with pytest.raises(DecodeError):
        b.apply(delta)
    assert b.encode_state() == before


def type_concurrently(cls: Any, words: tuple[str, str], backwards: bool, base: str = "[]") -> str:
    """Two replicas type a word each, one character per insert, at the same place."""
    a, b = cls(rid(0)), cls(rid(1))
    a.insert(0, base)
    b.apply(a.take_pending())
    for doc, word in ((a, words[0]), (b, words[1])):
        for k, char in enumerate(word):
            # forwards: each char after the previous; backwards: each at the same spot
            doc.insert(1 if backwards else 1 + k, char)
    a.apply(b.take_pending())
    b.apply(a.take_pending())
    assert a.value() == b.value()
    return str(a.value())


@IMPL
@pytest.mark.parametrize("backwards", [False, True])
def test_concurrent_words_do_not_interleave(name: str, backwards: bool) -> None:
    cls = IMPLEMENTATIONS[name]
    one, two = "alpha ", "omega "
    if backwards:
        one, two = one[::-1], two[::-1]
    value = type_concurrently(cls, (one, two), backwards)
    typed = ("alpha ", "omega ")
    assert value in ("[" + typed[0] + typed[1] + "]", "[" + typed[1] + typed[0] + "]")


@IMPL
def test_concurrent_paragraphs_with_edits_do_not_interleave(name: str) -> None:
    """Three replicas type sentences at one spot, each fixing typos as it goes."""
    cls = IMPLEMENTATIONS[name]
    docs = [cls(rid(n)) for n in range(3)]
    docs[0].insert(0, "<>")
    seed = docs[0].take_pending()
    for doc in docs[1:]:
        doc.apply(seed)
    sentences = ["the quick brown fox. ", "jumps over the dog. ", "lorem ipsum dolor. "]
    for doc, sentence in zip(docs, sentences, strict=True):
        cursor = 1
        for char in sentence:
            doc.insert(cursor, char)
            cursor += 1
            if char == " ":  # a typo, backspaced at once
                doc.insert(cursor, "#")
                doc.delete(cursor, 1)
    deltas = [doc.take_pending() for doc in docs]
    for doc, delta in itertools.product(docs, deltas):
        doc.apply(delta)
    value = docs[0].value()
    assert all(doc.value() == value for doc in docs)
    assert value.startswith("<") and value.endswith(">")
    middle = value[1:-1]
    assert any("".join(p) == middle for p in itertools.permutations(sentences))


@IMPL
def test_local_misuse_raises_core_usage_error(name: str) -> None:
    cls = IMPLEMENTATIONS[name]
    for bad in (b"short", b"x" * 33, "a str id", 12345678):
        with pytest.raises(CoreUsageError):
            cls(bad)
    doc = cls(rid(0))
    doc.insert(0, "abc")
    for pos in (-1, 4, "1"):
        with pytest.raises(CoreUsageError):
            doc.insert(pos, "x")
    with pytest.raises(CoreUsageError):
        doc.insert(0, b"bytes")
    for pos, length in ((-1, 1), (0, 4), (3, 1), (1, -1)):
        with pytest.raises(CoreUsageError):
            doc.delete(pos, length)
    with pytest.raises(CoreUsageError):
        doc.encode_since({"not bytes": 1})
    with pytest.raises(CoreUsageError):
        cls.decode_state(doc.encode_state(), b"bad")
    assert doc.value() == "abc"
    doc.insert(3, "")
    doc.delete(1, 0)
    assert doc.take_pending() != b""
    assert doc.take_pending() == b""
    assert doc.apply(b"") is False
    assert str(doc) == "abc" and len(doc) == 3


@IMPL
def test_counters_and_versions(name: str) -> None:
    cls = IMPLEMENTATIONS[name]
    doc = cls(rid(0))
    doc.insert(0, "abcdef")  # counters 1..6
    doc.delete(1, 2)  # 7..8
    doc.insert(4, "X")  # 9
    assert doc.version() == {rid(0): 9}
    runs = _reference_text._decode_delta(doc.take_pending())
    kinds = [(type(run).__name__, run.counter, run.length) for run in runs]
    assert kinds == [("InsertRun", 1, 6), ("DeleteRun", 7, 2), ("InsertRun", 9, 1)]
    # backspacing makes one backward delete run: targets 5, 4, 3 of a fresh word
    word = cls(rid(1))
    word.insert(0, "wordy")
    word.take_pending()
    for _ in range(3):
        word.delete(len(word) - 1, 1)
    (run,) = _reference_text._decode_delta(word.take_pending())
    assert isinstance(run, _reference_text.DeleteRun)
    assert (run.counter, run.length, run.target, run.step) == (6, 3, 5, -1)


def test_random_three_way_sessions_agree_between_implementations() -> None:
    """Quick cross-check outside hypothesis: same seeds, both implementations, same bytes."""
    for seed in range(5):
        rng = random.Random(seed)
        edits = [
            (
                rng.randrange(3),
                rng.random() < 0.6,
                rng.randrange(1000),
                "".join(rng.choice("xyz") for _ in range(rng.randint(1, 5))),
                rng.randint(1, 4),
                rng.random() < 0.3,
            )
            for _ in range(80)
        ]
        twin_docs, twin_deltas = concurrent_deltas(_reference_text.Text, edits)
        fast_docs, fast_deltas = concurrent_deltas(_ctext.Text, edits)
        assert twin_deltas == fast_deltas
        assert [d.encode_state() for d in twin_docs] == [d.encode_state() for d in fast_docs]
