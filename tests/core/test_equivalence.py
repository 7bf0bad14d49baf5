"""The compiled core and the pure-Python twin agree on every random operation stream.

``_reference.py`` is the specification (STYLE.md section 1.3): for every program of local
transactions, deliveries in any order with duplicates and losses, anti-entropy syncs and
snapshot merges over 3 to 5 replicas, both implementations must produce the same deltas, the
same change reports, the same reads and the same snapshots, byte for byte.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from p2pcloud._core import _cmerge, _reference
from tests.core.streams import run_program, steps


def _programs() -> st.SearchStrategy[tuple[int, list[Any]]]:
    return st.integers(3, 5).flatmap(lambda n: st.tuples(st.just(n), steps(n)))


@given(_programs())
def test_compiled_core_matches_reference(case: tuple[int, list[Any]]) -> None:
    n, program = case
    expected = run_program(_reference, program, n)
    actual = run_program(_cmerge, program, n)
    assert len(actual) == len(expected)
    for want, got in zip(expected, actual, strict=True):
        assert got == want


def test_bulk_write_matches_reference() -> None:
    """set_many and one-at-a-time sets give the same delta, in both implementations."""
    items = {f"key{i}": i * 7 - 300 for i in range(2000)}
    out = []
    for impl in (_reference, _cmerge):
        for bulk in (True, False):
            r = impl.Replica(b"replica1")
            r.begin(1_700_000_000_000)
            if bulk:
                r.set_many("kv", "main", items)
            else:
                for k, v in items.items():
                    r.set("kv", "main", k, v)
            delta = r.commit()
            other = impl.Replica(b"replica2")
            changes = other.apply([delta], 1_700_000_000_000)
            loaded = impl.Replica.load(r.encode_snapshot(), b"replica3", 1_700_000_000_000)
            out.append((delta, r.encode_snapshot(), changes, other.encode_snapshot(),
                        loaded.encode_snapshot()))
            assert r.document("kv", "main") == items
            assert loaded.document("kv", "main") == items
    assert all(x == out[0] for x in out)


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 11),
                          st.sampled_from(["set", "set_add", "remove_field", "increment"])),
                min_size=1, max_size=60))
def test_field_name_table_matches_reference(writes: list[tuple[str, int, str]]) -> None:
    """More distinct field names than the writer remembers, in one transaction."""
    deltas = []
    for impl in (_reference, _cmerge):
        r = impl.Replica(b"replica1")
        r.begin(1_700_000_000_000)
        for doc, i, op in writes:
            try:
                if op == "set":
                    r.set("c", doc, f"field{i}", i)
                elif op == "set_add":
                    r.set_add("c", doc, f"field{i}", i)
                elif op == "increment":
                    r.increment("c", doc, f"field{i}", 1)
                else:
                    r.remove_field("c", doc, f"field{i}")
            except Exception as exc:  # noqa: BLE001 - a type clash must clash in both
                assert type(exc).__name__ == "CoreUsageError"
        delta = r.commit()
        other = impl.Replica(b"replica2")
        other.apply([delta], 1_700_000_000_000)
        assert other.encode_snapshot() == r.encode_snapshot()
        deltas.append(delta)
    assert deltas[0] == deltas[1]
