"""Part files: remote content written straight into the folder, adopted, resumed after a crash."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from p2pcloud.blobs import Manifest, manifest_of
from p2pcloud.files import FileWritten, Folder
from p2pcloud.files import disk as disk_mod
from p2pcloud.files.parts import PART_PREFIX, PartFiles, part_name
from tests.files.conftest import Device

Make = Callable[[int], list[Device]]

T0 = 1_767_225_600 * 10**9


def _chunks_of(data: bytes, manifest: Manifest) -> dict[bytes, bytes]:
    out, pos = {}, 0
    for ref in manifest.chunks:
        out[ref.hash] = data[pos:pos + ref.size]
        pos += ref.size
    return out


def _receiver(b: Device, manifest: Manifest) -> None:
    """Bravo knows the manifest (an mwant brought it) but holds no chunk and reads no peer."""
    b.peers = []
    b.folder = Folder(b.root, b.replica, device=b.name, index_path=b.root.parent / "b.index",
                      chunks=b.store.get, manifests={manifest.blob_hash: manifest}.get,
                      has_chunk=b.store.__contains__)


def _parts_on_disk(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(PART_PREFIX + "*"))


def test_chunks_go_into_a_part_file_that_is_adopted_without_a_copy(devices: Make) -> None:
    a, b = devices(2)
    data = random.Random(1).randbytes(900_000)
    a.write("dir/video.bin", data, mtime_ns=T0, mode=0o640)
    touched = b.receive([a.reconcile().delta])
    manifest = a.folder.manifest(a.folder.index.get("dir/video.bin").manifest.blob_hash)  # type: ignore[union-attr]
    assert manifest is not None and len(manifest.chunks) > 3
    _receiver(b, manifest)
    result = b.reconcile(touched)
    assert set(result.missing[manifest.blob_hash].chunks) == set(manifest.unique_chunks())
    part = b.root / "dir" / part_name(manifest.blob_hash)  # beside its path
    assert part.exists() and part.stat().st_size == len(data)  # sparse, full size
    for h, chunk in _chunks_of(data, manifest).items():
        assert b.folder.write_part(manifest, h, chunk)
    ino = part.stat().st_ino
    result = b.reconcile(touched)
    assert FileWritten("dir/video.bin", False) in result.events
    assert b.read("dir/video.bin") == data
    st = os.stat(b.root / "dir/video.bin")
    assert st.st_ino == ino  # renamed into place, not copied
    assert (st.st_mtime_ns, st.st_mode & 0o777) == (T0, 0o640)
    assert _parts_on_disk(b.root) == []
    assert b.store == {}  # nothing went through the chunk store


def test_a_crash_mid_fill_resumes_from_what_verifies_on_disk(devices: Make) -> None:
    a, b = devices(2)
    data = random.Random(2).randbytes(1_200_000)
    a.write("big.bin", data, mtime_ns=T0)
    touched = b.receive([a.reconcile().delta])
    manifest = manifest_of(data)
    _receiver(b, manifest)
    b.reconcile(touched)
    chunks = _chunks_of(data, manifest)
    order = list(chunks)
    written = order[: len(order) // 2]
    for h in written:
        assert b.folder.write_part(manifest, h, chunks[h])
    # the crash: a torn write leaves garbage where one written chunk was
    torn = written[0]
    offset = manifest.offsets()[[r.hash for r in manifest.chunks].index(torn)]
    with open(b.root / part_name(manifest.blob_hash), "r+b") as f:  # big.bin is at the root
        f.seek(offset + 10)
        f.write(b"\xff" * 100)
    _receiver(b, manifest)  # a new process: a new Folder, nothing in memory
    result = b.reconcile(touched)
    missing = result.missing[manifest.blob_hash]
    assert set(missing.chunks) == (set(order) - set(written)) | {torn}
    for h in missing.chunks:
        assert b.folder.write_part(manifest, h, chunks[h])
    b.reconcile(touched)
    assert b.read("big.bin") == data
    assert _parts_on_disk(b.root) == []


def test_only_expected_blobs_are_taken_and_a_full_pass_prunes_leftovers(
            devices: Make) -> None:
    (b,) = devices(1)
    stray = manifest_of(b"not wanted by anyone" * 100)
    assert not b.folder.write_part(stray, stray.chunks[0].hash, b"not wanted by anyone" * 100)
    assert _parts_on_disk(b.root) == []
    leftover = b.root / part_name(stray.blob_hash)
    leftover.write_bytes(b"from an earlier run")
    b.reconcile()
    assert _parts_on_disk(b.root) == []
    assert b.files() == {}  # part files are never taken for user files


def test_a_local_edit_before_adoption_keeps_the_edit_and_adopts_into_the_copy(
        devices: Make) -> None:
    a, b = devices(2)
    data = random.Random(3).randbytes(300_000)
    a.write("doc.txt", data, mtime_ns=T0)
    touched = b.receive([a.reconcile().delta])
    manifest = manifest_of(data)
    _receiver(b, manifest)
    b.reconcile(touched)
    for h, chunk in _chunks_of(data, manifest).items():
        assert b.folder.write_part(manifest, h, chunk)
    b.write("doc.txt", b"written here meanwhile", mtime_ns=T0 + 5)
    result = b.reconcile(touched)
    # the local edit is published first; the remote version becomes a conflict copy
    assert b.read("doc.txt") == b"written here meanwhile"
    copies = [p for p in b.files() if "conflict" in p]
    assert len(copies) == 1 and b.read(copies[0]) == data
    assert result.delta
    assert _parts_on_disk(b.root) == []


def test_parallel_writers_fill_many_parts(tmp_path: Path) -> None:
    parts = PartFiles(tmp_path)
    rng = random.Random(4)
    blobs = [rng.randbytes(rng.randint(1, 70_000)) for _ in range(60)]
    manifests = [manifest_of(d) for d in blobs]
    work = []
    for d, m in zip(blobs, manifests, strict=True):
        parts.expect(m.blob_hash, f"d{len(work) % 3}/f{m.blob_hash.hex()[:8]}")
        work += [(m, h, c) for h, c in _chunks_of(d, m).items()]
    rng.shuffle(work)
    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(lambda w: parts.write(*w), work))
    for d, m in zip(blobs, manifests, strict=True):
        assert parts.complete(m.blob_hash)
        (path,) = tmp_path.rglob(part_name(m.blob_hash))
        assert path.read_bytes() == d
        assert parts.read_chunk(m.chunks[0].hash) == d[: m.chunks[0].size]
    path = parts.claim(manifests[0].blob_hash)
    assert path is not None and parts.claim(manifests[0].blob_hash) is None
    assert not parts.write(manifests[0], manifests[0].chunks[0].hash, blobs[0][:1])


def test_a_part_file_on_another_file_system_is_copied_then_dropped(
        devices: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = devices(2)
    data = random.Random(5).randbytes(400_000)
    a.write("mnt/other-fs.bin", data, mtime_ns=T0)
    touched = b.receive([a.reconcile().delta])
    manifest = manifest_of(data)
    _receiver(b, manifest)
    b.reconcile(touched)
    for h, chunk in _chunks_of(data, manifest).items():
        assert b.folder.write_part(manifest, h, chunk)
    # what adopt_part answers when the target directory is on another file system
    monkeypatch.setattr(disk_mod, "adopt_part", lambda *a, **k: None)
    result = b.reconcile(touched)
    assert FileWritten("mnt/other-fs.bin", False) in result.events
    assert b.read("mnt/other-fs.bin") == data
    assert _parts_on_disk(b.root) == []


def test_one_blob_needed_at_two_paths_is_fetched_once_and_written_twice(
        devices: Make) -> None:
    a, b = devices(2)
    data = random.Random(6).randbytes(200_000)
    a.write("x/copy1.bin", data, mtime_ns=T0)
    a.write("y/z/copy2.bin", data, mtime_ns=T0 + 1)
    touched = b.receive([a.reconcile().delta])
    manifest = manifest_of(data)
    _receiver(b, manifest)
    result = b.reconcile(touched)
    assert list(result.missing) == [manifest.blob_hash]
    assert len(_parts_on_disk(b.root)) == 1  # one part file for both paths
    for h, chunk in _chunks_of(data, manifest).items():
        assert b.folder.write_part(manifest, h, chunk)
    b.reconcile(touched)
    assert b.read("x/copy1.bin") == data and b.read("y/z/copy2.bin") == data
    assert _mtime_ns(b, "y/z/copy2.bin") == T0 + 1
    assert _parts_on_disk(b.root) == []


def _mtime_ns(d: Device, rel: str) -> int:
    return os.stat(d.root / rel).st_mtime_ns
