"""Where a node keeps its identity, and how it is created and loaded."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from p2pcloud._node.node import IDENTITY_FILE, default_data_dir, load_or_create_identity
from p2pcloud.errors import KeyFileError, WrongPassphrase


def test_default_data_dir_follows_p2pcloud_home_then_xdg(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("P2PCLOUD_HOME", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / ".local" / "share" / "p2pcloud"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "p2pcloud"
    monkeypatch.setenv("P2PCLOUD_HOME", str(tmp_path / "mine"))
    assert default_data_dir() == tmp_path / "mine"


def test_identity_is_created_once_then_loaded(tmp_path: Path) -> None:
    data_dir = tmp_path / "deep" / "node"
    first = load_or_create_identity(data_dir)
    key_file = data_dir / IDENTITY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    again = load_or_create_identity(data_dir)
    assert again.hashname == first.hashname


def test_sealed_identity_needs_its_passphrase(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path, passphrase="correct horse")
    with pytest.raises(WrongPassphrase):
        load_or_create_identity(tmp_path)
    with pytest.raises(WrongPassphrase):
        load_or_create_identity(tmp_path, passphrase="wrong")
    assert load_or_create_identity(tmp_path, passphrase="correct horse").hashname == first.hashname


def test_a_corrupt_key_file_is_reported_and_never_replaced(tmp_path: Path) -> None:
    key_file = tmp_path / IDENTITY_FILE
    key_file.write_bytes(b"not a key file")
    with pytest.raises(KeyFileError):
        load_or_create_identity(tmp_path)
    assert key_file.read_bytes() == b"not a key file"
