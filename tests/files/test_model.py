"""The pure decisions of folder sync: what to publish, what to write, what is a conflict."""

from __future__ import annotations

import blake3
from hypothesis import given
from hypothesis import strategies as st

from p2pcloud._core import BlobRef
from p2pcloud.files.model import (
    ABSENT,
    UNCHANGED,
    AdoptBase,
    DeleteFile,
    FileVersion,
    ForgetBase,
    RemoveDoc,
    SetMeta,
    SetVersion,
    WriteFile,
    distinct_versions,
    list_conflicts,
    plan_disk,
    plan_publish,
)

T = 1_767_225_600 * 10**9


def v(blob: int, *, t: int = T, mode: int = 0o644, by: str = "a", size: int = 10) -> FileVersion:
    return FileVersion(bytes([blob]) * 32, size, t, mode, by)


def nobody(_path: str) -> FileVersion | None:
    return None


def test_values_round_trip_and_bad_values_are_skipped() -> None:
    x = v(1)
    assert FileVersion.from_value(x.to_value()) == x
    bad = [None, 5, {}, {"blob": b"x", "t": 1, "m": 1, "by": "a"},
           {"blob": BlobRef(b"x" * 32, 1), "t": 1.5, "m": 1, "by": "a"},
           {"blob": BlobRef(b"x" * 32, 1), "t": 1, "m": 0o7777, "by": "a"},
           {"blob": BlobRef(b"x" * 32, 1), "t": 1, "m": 1, "by": ""},
           {"blob": BlobRef(b"x" * 16, 1), "t": 1, "m": 1, "by": "a"}]
    assert all(FileVersion.from_value(b) is None for b in bad)
    assert distinct_versions([x.to_value(), *bad, v(2).to_value(), x.to_value()]) == [v(2), x]


def test_local_changes_are_published() -> None:
    base = v(1)
    assert plan_publish("f", None, v(2), [], nobody) == [SetVersion("f", v(2), "created")]
    assert plan_publish("f", base, v(2), [base], nobody) == [SetVersion("f", v(2), "modified")]
    chmod = v(1, mode=0o600)
    assert plan_publish("f", base, chmod, [base], nobody) == [SetVersion("f", chmod, "metadata")]
    touched = v(1, t=T + 5)
    assert plan_publish("f", base, touched, [base], nobody)[0].reason == "metadata"  # type: ignore[union-attr]
    assert plan_publish("f", base, ABSENT, [base], nobody) == [RemoveDoc("f")]
    assert plan_publish("f", base, UNCHANGED, [base], nobody) == []
    assert plan_publish("f", base, v(1, by="b"), [base], nobody) == []  # same file, other author


def test_edit_beats_delete_both_ways() -> None:
    base = v(1)
    # deleted here, modified there: the remote version comes back (nothing published)
    assert plan_publish("f", base, ABSENT, [v(2)], nobody) == []
    assert plan_disk(base, ABSENT, v(2)) == WriteFile(v(2))
    # modified here, deleted there: the local edit is published again
    assert plan_publish("f", base, v(3), [], nobody) == [SetVersion("f", v(3), "recreated")]


def test_late_conflict_keeps_both_versions() -> None:
    base, mine, theirs = v(1), v(2, by="me"), v(3, by="peer", t=T + 10**9)
    writes = plan_publish("dir/f.txt", base, mine, [theirs], nobody)
    assert writes == [
        SetVersion("dir/f.txt", mine, "conflict-winner"),
        SetVersion("dir/f.conflict-peer-20260101-000001.txt", theirs, "conflict-copy"),
    ]
    # after the writes the winner is the local file: adopt it, never overwrite it
    assert plan_disk(base, mine, mine) == AdoptBase(mine)
    # the same bytes written on both sides is no conflict
    assert plan_publish("f", base, v(2, by="me"), [v(2, by="peer", t=T + 1)], nobody) == []
    assert plan_disk(base, v(2, by="me"), v(2, by="peer", t=T + 1)) == SetMeta(
        v(2, by="peer", t=T + 1))


def test_concurrent_register_values_are_split_into_copies() -> None:
    older, newer = v(2, by="a"), v(3, by="b")
    writes = plan_publish("f.txt", v(1), UNCHANGED, [older, newer], nobody)
    assert writes == [
        SetVersion("f.txt", newer, "conflict-winner"),
        SetVersion("f.conflict-a-20260101-000000.txt", older, "conflict-copy"),
    ]
    # a second device deriving the same writes from the same values writes equal values
    assert plan_publish("f.txt", v(1), UNCHANGED, [older, newer], nobody) == writes
    # a copy name already used by a different version gets a blob tag
    taken = {"f.conflict-a-20260101-000000.txt": v(9)}
    tagged = plan_publish("f.txt", v(1), UNCHANGED, [older, newer], taken.get)
    tag = blake3.blake3(older.blob + older.mode.to_bytes(2, "big")).hexdigest()[:8]
    assert tagged[1].path == f"f.conflict-a-20260101-000000-{tag}.txt"


def test_disk_actions() -> None:
    base = v(1)
    assert plan_disk(base, UNCHANGED, base) is None
    assert plan_disk(base, UNCHANGED, None) == DeleteFile()
    assert plan_disk(base, UNCHANGED, v(2)) == WriteFile(v(2))
    assert plan_disk(base, UNCHANGED, v(1, mode=0o755)) == SetMeta(v(1, mode=0o755))
    assert plan_disk(None, ABSENT, v(2)) == WriteFile(v(2))
    assert plan_disk(base, ABSENT, None) == ForgetBase()
    assert plan_disk(None, ABSENT, None) is None
    # a local edit that is not the winner is never overwritten or deleted
    assert plan_disk(base, v(5), v(2)) is None
    assert plan_disk(base, v(5), None) is None


def test_list_conflicts() -> None:
    docs = {
        "a.txt": [v(1)],
        "a.conflict-b-20260101-000000.txt": [v(2, by="b")],
        "m.txt": [v(3, by="x"), v(4, by="y")],
        "plain.conflict-notes.txt": [v(5)],
    }
    out = list_conflicts(sorted(docs), lambda d: docs[d])
    assert [(c.path, c.copy, c.device) for c in out] == [
        ("a.txt", "a.conflict-b-20260101-000000.txt", "b"),
        ("m.txt", None, "x,y"),
    ]


_versions = st.builds(
    lambda blob, t, mode, by: v(blob, t=T + t * 10**9, mode=mode, by=by),
    st.integers(1, 3), st.integers(0, 2), st.sampled_from([0o644, 0o600]),
    st.sampled_from(["a", "b"]),
)


@given(
    base=st.none() | _versions,
    local=st.sampled_from([UNCHANGED, ABSENT]) | _versions,
    remote=st.lists(_versions, max_size=3),
)
def test_no_version_is_lost_and_no_local_edit_is_overwritten(base, local, remote) -> None:  # type: ignore[no-untyped-def]
    if local is UNCHANGED and base is None:
        local = ABSENT  # UNCHANGED means "equal to the base": it needs one
    remote = distinct_versions(x.to_value() for x in remote)
    docs: dict[str, list[FileVersion]] = {"f.txt": list(remote)} if remote else {}
    for w in plan_publish("f.txt", base, local, remote, lambda p: (docs.get(p) or [None])[-1]):
        if isinstance(w, SetVersion):
            docs[w.path] = [w.version]
        else:
            docs.pop(w.path, None)
    winners = [vs[-1] for vs in docs.values()]
    for r in remote:
        # every competing version survives somewhere, unless it is the base this device
        # knowingly replaced or deleted, or the same file as the local one
        kept = any(w == r for w in winners)
        assert kept or r == base or (isinstance(local, FileVersion) and r.same_file(local)), (
            r, winners)
    final = docs.get("f.txt", [None])[-1]
    action = plan_disk(base, local, final)
    if isinstance(local, FileVersion):
        assert final is not None and final.same_content(local)  # the local edit stays
        assert not isinstance(action, (WriteFile, DeleteFile))
    if local is ABSENT and base is not None and remote and remote[-1] != base:
        assert final is not None  # a delete never wins over an edit it did not see
