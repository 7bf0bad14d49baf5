"""delta_span reads the author and the dot range of a transaction delta from its header."""

import pytest

from p2pcloud._core import _cmerge, _reference, delta_span
from p2pcloud.errors import DecodeError

IMPLS = [pytest.param(_reference, id="python"), pytest.param(_cmerge, id="cython")]


@pytest.mark.parametrize("impl", IMPLS)
def test_span_of_successive_transactions(impl):
    rid = b"R" * 16
    r = impl.Replica(rid)
    r.begin(1_700_000_000_000)
    r.set("c", "d", "f", 1)
    r.set("c", "d", "g", 2)
    r.increment("c", "d", "n", 3)
    first = r.commit()
    assert delta_span(first) == (rid, 1, 3)
    r.begin(1_700_000_000_001)
    r.remove("c", "d")
    r.append("log", {"w": 81.5})
    second = r.commit()
    assert delta_span(second) == (rid, 4, 5)


@pytest.mark.parametrize("impl", IMPLS)
def test_since_deltas_and_snapshots_of_several_replicas_are_refused(impl):
    a, b = impl.Replica(b"A" * 8), impl.Replica(b"B" * 8)
    deltas = []
    for i, r in enumerate((a, b)):
        r.begin(1_700_000_000_000 + i)
        r.set("c", f"d{i}", "f", i)
        deltas.append(r.commit())
    a.apply(deltas[1:], 1_700_000_000_010)
    assert a.version() == {b"A" * 8: 1, b"B" * 8: 1}
    with pytest.raises(DecodeError):
        delta_span(a.encode_snapshot())
    with pytest.raises(DecodeError):
        delta_span(a.encode_since({}))


MALFORMED = [b"", b"\xd7", b"\x00\x01", b"\xd7\x01\x05", b"\xd7\x01\x01\x08AAAAAAAA\x00\x01\x09"]


@pytest.mark.parametrize("data", MALFORMED)
def test_malformed_headers_raise_decode_error(data):
    with pytest.raises(DecodeError):
        delta_span(data)

