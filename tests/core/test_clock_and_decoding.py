"""Hybrid logical clock, clock-skew refusal, and decoder robustness (both implementations).

Decoders see bytes from peers: random and mutated input must raise only DecodeError (or
ClockSkewError when a mutated clock lands far in the future) and must change nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcloud._core import _cmerge, _reference
from p2pcloud.errors import ClockSkewError, CoreUsageError, DecodeError
from tests.core.streams import run_program, try_apply

IMPLS = [pytest.param(_reference, id="python"), pytest.param(_cmerge, id="cython")]
NOW = 1_700_000_000_000
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("impl", IMPLS)
def test_hlc_packs_48_plus_16_and_ticks_monotonically(impl: Any) -> None:
    assert impl.hlc_pack(NOW, 3) == NOW << 16 | 3
    assert impl.hlc_unpack(NOW << 16 | 3) == (NOW, 3)
    c = impl.HybridClock()
    t1 = c.tick(NOW)
    assert t1 == NOW << 16
    t2 = c.tick(NOW)  # same millisecond: the logical part moves
    assert t2 == t1 + 1
    t3 = c.tick(NOW - 50)  # the physical clock went back: still after t2
    assert t3 == t2 + 1
    c.observe((NOW + 10) << 16 | 9, NOW)  # a remote clock slightly ahead is taken in
    assert c.tick(NOW) == (NOW + 10) << 16 | 10
    c.last = NOW << 16 | 0xFFFF  # a full logical part carries into the next millisecond
    assert c.tick(NOW) == (NOW + 1) << 16
    with pytest.raises(CoreUsageError):
        c.tick(-1)


@pytest.mark.parametrize("impl", IMPLS)
def test_remote_clock_too_far_ahead_is_refused(impl: Any) -> None:
    skew = impl.MAX_CLOCK_SKEW_MS
    c = impl.HybridClock()
    c.observe((NOW + skew) << 16, NOW)  # exactly at the limit: accepted
    with pytest.raises(ClockSkewError):
        c.observe((NOW + skew + 1) << 16, NOW)
    assert c.last == (NOW + skew) << 16
    future = impl.Replica(b"futurist")
    future.begin(NOW + skew + 1)
    future.set("c", "d", "f", "from the future")
    delta = future.commit()
    r = impl.Replica(b"replicaA")
    r.begin(NOW)
    r.set("c", "d", "g", 1)
    local = r.commit()
    before = r.encode_snapshot()
    with pytest.raises(ClockSkewError) as err:
        r.apply([local, delta], NOW)  # the whole batch is refused
    assert err.value.delta_index == 1  # type: ignore[attr-defined]
    assert r.encode_snapshot() == before
    assert r.clock.last == NOW << 16
    assert r.apply([delta], NOW + 1) == [("c", "d", "f")]  # once our clock catches up
    r.begin(NOW + 2)
    assert r.commit() == b""
    r.begin(NOW + 3)
    r.set("c", "d", "g", 2)
    r.commit()
    # the next local write orders after the remote one
    assert r.conflicts("c", "d", "g") == [2]
    assert r.clock.last > (NOW + skew + 1) << 16


def _sample_deltas(impl: Any) -> list[bytes]:
    program = [
        ("txn", 0, [("set", "c", "x", "f", [1, {"k": "v"}]), ("increment", "c", "x", "g", 3),
                    ("append", "log", 2.5), ("set_add", "c", "y", "s", "a")]),
        ("txn", 1, [("set_mv", "c", "x", "f", b"\x00"), ("remove", "c", "y")]),
        ("deliver", 0, 1, 0),
        ("txn", 1, [("remove_field", "c", "x", "f"), ("set_discard", "c", "y", "s", "a"),
                    ("set", "d", "z", "h", None)]),
        ("sync", 1, 2),
        ("snapshot", 0, 2),
    ]
    record = run_program(impl, program, 3)
    return [x[1] for x in record if x[0] in ("delta", "since", "snapshot") and x[1]]


@st.composite
def _mutations(draw: Any, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif data:
            del data[pos]
    return bytes(data)


def _target(impl: Any) -> Any:
    r = impl.Replica(b"targetAA")
    r.begin(NOW)
    r.set("c", "x", "f", "before")
    r.append("log", 1)
    r.commit()
    return r


def _check_robust(data: bytes) -> None:
    outcomes = []
    for impl in (_reference, _cmerge):
        r = _target(impl)
        before = r.encode_snapshot()
        ver = r.version()
        outcome = try_apply(r, data, NOW)
        if outcome != "ok":
            assert r.encode_snapshot() == before
            assert r.version() == ver
        outcomes.append((outcome, r.encode_snapshot()))
    assert outcomes[0] == outcomes[1]


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_decode_error(data: bytes) -> None:
    _check_robust(data)


@given(st.binary(max_size=60).map(lambda b: b"\xd7\x01" + b))
def test_random_bodies_raise_only_decode_error(data: bytes) -> None:
    _check_robust(data)


@given(st.data())
def test_mutated_deltas_raise_only_typed_errors(data: Any) -> None:
    base = data.draw(st.sampled_from(_sample_deltas(_reference)))
    _check_robust(data.draw(_mutations(base)))


def test_sample_deltas_are_identical_and_apply() -> None:
    assert _sample_deltas(_reference) == _sample_deltas(_cmerge)
    for impl in (_reference, _cmerge):
        for d in _sample_deltas(impl):
            assert try_apply(_target(impl), d, NOW) == "ok"


@pytest.mark.parametrize("impl", IMPLS)
def test_values_round_trip_and_bad_values_are_typed(impl: Any) -> None:
    for v in [None, True, False, 0, 127, 128, -1, 2**64 - 1, -(2**64), 1.5, "é", b"\x00",
              [1, [2, {"a": None}]], {"k": [b"x"]}, impl.BlobRef(b"h" * 32, 7)]:
        assert impl.decode_value(impl.encode_value(v)) == v
    for bad in [2**64, -(2**64) - 1, object(), {1: 2}, "\ud800"]:
        with pytest.raises(CoreUsageError):
            impl.encode_value(bad)
    with pytest.raises(DecodeError):
        impl.decode_value(b"\x03\xff")
    v = impl.decode_version(impl.encode_version({b"replicaA": 5, b"replicaB": 0}))
    assert v == {b"replicaA": 5}


def test_purepython_env_selects_the_twin() -> None:
    code = (
        "import p2pcloud, p2pcloud._core as c; "
        "print(p2pcloud.core_implementation(), c.Replica.__module__)"
    )
    env = dict(os.environ, P2PCLOUD_PUREPYTHON="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["python", "p2pcloud._core._reference"]
    env.pop("P2PCLOUD_PUREPYTHON")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["cython", "p2pcloud._core._cmerge"]


def test_missing_compiled_core_is_a_clear_import_error() -> None:
    code = (
        "import sys; sys.modules['p2pcloud._core._cmerge'] = None\n"
        "try:\n    import p2pcloud._core\nexcept ImportError as exc:\n    print(exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "P2PCLOUD_PUREPYTHON"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert "build_ext --inplace" in out
    assert "P2PCLOUD_PUREPYTHON=1" in out


@pytest.mark.parametrize("impl", IMPLS)
def test_own_snapshot_loads_after_the_clock_went_back(impl: Any) -> None:
    r = impl.Replica(b"replicaA")
    r.begin(NOW)
    r.set("c", "d", "f", 1)
    r.commit()
    snap = r.encode_snapshot()
    earlier = NOW - 10 * impl.MAX_CLOCK_SKEW_MS
    with pytest.raises(ClockSkewError):
        impl.Replica.load(snap, b"replicaA", earlier)  # as a peer's snapshot: refused
    again = impl.Replica.load(snap, b"replicaA", None)  # our own stored snapshot
    assert again.encode_snapshot() == snap
    again.begin(earlier)
    again.set("c", "d", "f", 2)
    again.commit()
    assert again.get("c", "d", "f") == 2  # later than the loaded write, clock or not
    assert again.version() == {b"replicaA": 2}
    with pytest.raises(CoreUsageError):
        r.apply([snap], None)  # type: ignore[arg-type]
