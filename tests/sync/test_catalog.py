"""The catalog: contiguous versions, gaps, floors, digests and the reconciliation items."""

from __future__ import annotations

import pytest

from p2pcloud._ids import SubCloudId
from p2pcloud.errors import LocalProtocolError
from p2pcloud.sync.catalog import MAX_PENDING_SPANS, Catalog, version_digest

SC = SubCloudId(b"\x42" * 16)
R1, R2 = b"r" * 16, b"s" * 16


def test_version_advances_only_contiguously() -> None:
    cat = Catalog()
    cat.set_subcloud(SC)
    assert cat.record(SC, R1, 1, 3, 100)
    assert not cat.record(SC, R1, 7, 9, 100)  # past a gap: waits
    assert cat.version(SC) == {R1: 3} and cat.has_gap(SC)
    assert not cat.record(SC, R1, 1, 3, 100)  # a duplicate changes nothing
    assert cat.record(SC, R1, 4, 6, 100)  # fills the gap: 7..9 joins
    assert cat.version(SC) == {R1: 9} and not cat.has_gap(SC)
    assert cat.record(SC, R2, 1, 1, 50)
    assert cat.version(SC) == {R1: 9, R2: 1}
    assert cat.bytes_per_dot(SC) == pytest.approx(350 / 10)  # the duplicate is not counted


def test_digest_follows_the_version_and_the_reconcile_set() -> None:
    cat = Catalog()
    cat.set_subcloud(SC)
    assert cat.digest(SC) == version_digest({}) == version_digest({R1: 0})
    cat.record(SC, R1, 1, 2, 10)
    assert cat.digest(SC) == version_digest({R1: 2})
    other = Catalog()
    other.set_subcloud(SC, {R1: 2})
    lo, hi = 0, 1 << 128
    assert cat.reconcile_set.fingerprint(lo, hi) == other.reconcile_set.fingerprint(lo, hi)
    cat.remove(SC)
    assert SC not in cat and len(cat.reconcile_set) == 0


def test_pending_spans_are_bounded() -> None:
    cat = Catalog()
    cat.set_subcloud(SC)
    for i in range(MAX_PENDING_SPANS + 50):
        cat.record(SC, R1, 10 + 2 * i, 10 + 2 * i, 1)
    assert sum(len(p) for p in cat._subs[SC].pending.values()) == MAX_PENDING_SPANS  # noqa: SLF001
    assert cat.version(SC) == {}


def test_floor_and_misuse() -> None:
    cat = Catalog()
    cat.set_subcloud(SC, {R1: 9}, {R1: 5})
    assert cat.floor(SC) == {R1: 5} and cat.counter(SC, R1) == 9
    with pytest.raises(LocalProtocolError):
        cat.record(SubCloudId(b"\x00" * 16), R1, 1, 1, 1)
    with pytest.raises(LocalProtocolError):
        cat.set_subcloud(SubCloudId(b"short"))


def test_earlier_versions_are_remembered_newest_first_and_bounded() -> None:
    from p2pcloud.sync.catalog import EARLIER_VERSIONS

    cat = Catalog()
    cat.set_subcloud(SC, {R1: 2})
    assert cat.earlier_versions(SC) == []  # nothing changed since it was set
    assert not cat.record(SC, R1, 5, 5, 10)  # past a gap: the version did not move
    assert cat.earlier_versions(SC) == []
    for c in range(3, 3 + EARLIER_VERSIONS + 2):
        if c == 5:
            continue
        cat.record(SC, R1, c, c, 10)
    earlier = cat.earlier_versions(SC)
    assert len(earlier) == EARLIER_VERSIONS
    counters = [v[R1] for _d, v in earlier]
    assert counters == sorted(counters, reverse=True) and counters[0] < cat.version(SC)[R1]
    assert all(d == version_digest(v) for d, v in earlier)
    assert cat.earlier_versions(SubCloudId(b"\x01" * 16)) == []
