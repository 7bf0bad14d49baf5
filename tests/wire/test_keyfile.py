"""Key files: atomic writes, mode 0600, sealing, and clear errors on every bad file."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pcloud._crypto import LocalIdentity
from p2pcloud._keyfile import KDF_MEM_MAX, MAX_KEYFILE, load_identity, save_identity
from p2pcloud.errors import KeyFileError, WrongPassphrase
from tests.wire._support import identity, load_d1

FAST = {"kdf_ops": 1, "kdf_mem": 8192}  # argon2id minimums: tests stay fast


def test_round_trip_unsealed(tmp_path: Path) -> None:
    me = identity("key owner")
    path = tmp_path / "identity.key"
    save_identity(path, me)
    back = load_identity(path)
    assert back.hashname == me.hashname and back.seed == me.seed
    assert back.sign(b"m") == me.sign(b"m")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["identity.key"]  # no temp file left behind


def test_round_trip_cs3a_only(tmp_path: Path) -> None:
    d1 = load_d1()
    a = LocalIdentity.from_cs3a(d1["A_pk"], d1["A_sk"])
    save_identity(tmp_path / "k", a)
    back = load_identity(tmp_path / "k")
    assert back.cs3a_secret == a.cs3a_secret and back.signing_key is None


def test_round_trip_sealed(tmp_path: Path) -> None:
    me = identity("sealed")
    path = tmp_path / "k"
    save_identity(path, me, "correct horse", **FAST)
    assert me.seed is not None and me.seed not in path.read_bytes()
    assert load_identity(path, "correct horse").hashname == me.hashname


def test_wrong_passphrase_leaves_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "k"
    save_identity(path, identity("x"), "right", **FAST)
    before = path.read_bytes()
    with pytest.raises(WrongPassphrase):
        load_identity(path, "wrong")
    with pytest.raises(WrongPassphrase, match="passphrase"):
        load_identity(path)
    assert path.read_bytes() == before


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k"
    first, second = identity("first"), identity("second")
    save_identity(path, first)
    with pytest.raises(KeyFileError, match="already exists"):
        save_identity(path, second)
    assert load_identity(path).hashname == first.hashname
    save_identity(path, second, overwrite=True)
    assert load_identity(path).hashname == second.hashname
    assert sorted(os.listdir(tmp_path)) == ["k"]


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no key file"):
        load_identity(tmp_path / "nope")
    with pytest.raises(KeyFileError):
        save_identity(tmp_path / "no" / "dir" / "k", identity("x"))


def test_unknown_version(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(cbor2.dumps({"format": "p2pcloud-key", "v": 99, "seed": bytes(32)}))
    with pytest.raises(KeyFileError, match="upgrade"):
        load_identity(path)


@pytest.mark.parametrize(
    "doc",
    [
        {"format": "p2pcloud-key", "v": 1},
        {"format": "p2pcloud-key", "v": 1, "seed": bytes(31)},
        {"format": "p2pcloud-key", "v": 1, "cs3a": [bytes(32), bytes(32)]},
        {"format": "other", "v": 1, "seed": bytes(32)},
        {"format": "p2pcloud-key", "v": 1, "sealed": {"kdf": "scrypt"}},
        [1, 2, 3],
    ],
)
def test_corrupt_documents(tmp_path: Path, doc: object) -> None:
    path = tmp_path / "k"
    path.write_bytes(cbor2.dumps(doc))
    with pytest.raises(KeyFileError):
        load_identity(path, "pw")


def test_hostile_kdf_limits_refused(tmp_path: Path) -> None:
    path = tmp_path / "k"
    save_identity(path, identity("x"), "pw", **FAST)
    doc = cbor2.loads(path.read_bytes())
    doc["sealed"]["mem"] = KDF_MEM_MAX * 4
    path.write_bytes(cbor2.dumps(doc))
    with pytest.raises(KeyFileError, match="corrupt sealing"):
        load_identity(path, "pw")


def test_too_large(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(bytes(MAX_KEYFILE + 1))
    with pytest.raises(KeyFileError, match="larger"):
        load_identity(path)


def test_every_truncation_is_a_key_file_error(tmp_path: Path) -> None:
    for sealed in (False, True):
        path = tmp_path / f"k{sealed}"
        save_identity(path, identity("t"), "pw" if sealed else None, **FAST)
        whole = path.read_bytes()
        for n in range(len(whole)):
            path.write_bytes(whole[:n])
            with pytest.raises(KeyFileError):
                load_identity(path, "pw")


def test_empty_passphrase_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        save_identity(tmp_path / "k", identity("x"), "")


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400))
def test_random_files_raise_only_key_file_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz"
    path.write_bytes(data)
    with contextlib.suppress(KeyFileError):
        load_identity(path, "pw")


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_files_raise_only_key_file_error(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "base"
    if not path.exists():
        save_identity(path, identity("fuzz base"))
    whole = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(whole) - 1))
        whole[i] = data.draw(st.integers(0, 255))
    target = tmp_path / "mutant"
    target.write_bytes(bytes(whole))
    try:
        loaded = load_identity(target)
    except KeyFileError:
        return
    assert isinstance(loaded, LocalIdentity)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=25)
@given(data=st.data())
def test_mutated_sealed_box_is_wrong_passphrase(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "sealed"
    if not path.exists():
        save_identity(path, identity("fuzz sealed"), "pw", **FAST)
    doc = cbor2.loads(path.read_bytes())
    field = data.draw(st.sampled_from(["box", "nonce", "salt"]))
    value = bytearray(doc["sealed"][field])
    i = data.draw(st.integers(0, len(value) - 1))
    value[i] ^= data.draw(st.integers(1, 255))
    doc["sealed"][field] = bytes(value)
    target = tmp_path / "mutant"
    target.write_bytes(cbor2.dumps(doc))
    with pytest.raises(WrongPassphrase):
        load_identity(target, "pw")
