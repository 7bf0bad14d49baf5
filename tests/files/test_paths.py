"""Path safety and conflict-copy names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcloud.errors import UnsafePath
from p2pcloud.files.paths import (
    conflict_name,
    normalize_relpath,
    parse_conflict_name,
    safe_device_label,
)

T = 1_767_225_600 * 10**9  # 2026-01-01 00:00:00 UTC in ns


@pytest.mark.parametrize(
    "rel",
    ["a.txt", "dir/sub/file.bin", ".bashrc", "with space/ü.txt", "a\\b", "x" * 255],
)
def test_safe_paths_are_returned_unchanged(rel: str) -> None:
    assert normalize_relpath(rel, windows=False) == rel


@pytest.mark.parametrize(
    ("rel", "why"),
    [
        ("", "empty"),
        ("/etc/passwd", "absolute"),
        ("../escape", "'..'"),
        ("a/../../b", "'..'"),
        ("a/./b", "'.'"),
        ("a//b", "''"),
        ("a/", "''"),
        ("nul\x00byte", "control"),
        ("new\nline", "control"),
        (".p2pcloud-tmp-0123", "reserved"),
        ("dir/.p2pcloud", "reserved"),
        ("x" * 256, "longer than 255"),
        ("a/" * 600 + "b", "longer than 1024"),
        ("\udcff", "Unicode"),
    ],
)
def test_unsafe_paths_are_refused(rel: str, why: str) -> None:
    with pytest.raises(UnsafePath, match=why):
        normalize_relpath(rel, windows=False)


@pytest.mark.parametrize(
    "rel", ["CON", "dir/nul.txt", "com1", "Lpt9.log", "a:b", "q?", "trail.", "trail ",
            "a\\b", "C:/x"],
)
def test_names_unsafe_on_windows(rel: str) -> None:
    normalize_relpath(rel.replace("\\", "_").replace(":", "_"), windows=False)
    with pytest.raises(UnsafePath):
        normalize_relpath(rel, windows=True)


@given(st.text(max_size=60))
def test_normalize_accepts_or_raises_unsafe_path_only(rel: str) -> None:
    try:
        out = normalize_relpath(rel, windows=True)
    except UnsafePath:
        return
    assert out == rel
    assert not rel.startswith("/") and ".." not in rel.split("/")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("notes.txt", "notes.conflict-laptop-20260101-000000.txt"),
        ("dir/archive.tar.gz", "dir/archive.tar.conflict-laptop-20260101-000000.gz"),
        (".bashrc", ".bashrc.conflict-laptop-20260101-000000"),
        ("Makefile", "Makefile.conflict-laptop-20260101-000000"),
    ],
)
def test_conflict_names_round_trip(path: str, expected: str) -> None:
    name = conflict_name(path, "laptop", T)
    assert name == expected
    normalize_relpath(name, windows=True)
    parsed = parse_conflict_name(name)
    assert parsed is not None
    assert (parsed.original, parsed.device, parsed.time) == (path, "laptop", "20260101-000000")


def test_conflict_name_details() -> None:
    assert safe_device_label("my phone/../x") == "my-phone----x"
    assert safe_device_label("///") == "device"
    tagged = conflict_name("a.txt", "dev", T, "0badcafe")
    assert tagged == "a.conflict-dev-20260101-000000-0badcafe.txt"
    assert parse_conflict_name(tagged).original == "a.txt"  # type: ignore[union-attr]
    long = conflict_name("d/" + "n" * 250 + ".txt", "dev", T)
    assert len(long.split("/")[-1].encode()) <= 255
    normalize_relpath(long, windows=False)
    assert parse_conflict_name("plain.txt") is None
