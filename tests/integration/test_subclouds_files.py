"""Folder sync between two real nodes on 127.0.0.1: 2,000 small files and a 200 MiB file."""

from __future__ import annotations

import os
import random
from pathlib import Path

import blake3
import trio

import p2pcloud
from tests.integration.test_subclouds import shared_pair, wait_for

SMALL_FILES = 2000
LARGE_SIZE = 200 * 1024 * 1024
EDIT_AT = LARGE_SIZE // 2
EDIT_SIZE = 4096
WAIT_LARGE = 600  # seconds: the whole transfer on a loaded 2-core machine


def make_tree(root: Path, seed: int) -> None:
    rng = random.Random(seed)
    for i in range(SMALL_FILES):
        d = root / f"d{i % 40:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}.txt").write_bytes(rng.randbytes(rng.randint(512, 8192)))
    with open(root / "large.bin", "wb") as f:
        for _ in range(LARGE_SIZE // (1 << 20)):
            f.write(rng.randbytes(1 << 20))


def tree_hashes(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            h = blake3.blake3()
            with open(p, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
            out[p.relative_to(root).as_posix()] = h.digest()
    return out


def same_stats(a: Path, b: Path) -> bool:
    """Every file of ``a`` exists in ``b`` with its size and mtime (synced metadata)."""
    for dirpath, _dirs, files in os.walk(a):
        for name in files:
            src = Path(dirpath) / name
            dst = b / src.relative_to(a)
            try:
                sa, sb = src.stat(), dst.stat()
            except FileNotFoundError:
                return False
            if sa.st_size != sb.st_size or sa.st_mtime_ns != sb.st_mtime_ns:
                return False
    return True


def edit_middle(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(EDIT_AT)
        f.write(random.Random(11).randbytes(EDIT_SIZE))


async def wait_same(src: Path, dst: Path) -> None:
    with trio.fail_after(WAIT_LARGE):
        while True:
            if await trio.to_thread.run_sync(same_stats, src, dst):
                return
            await trio.sleep(0.5)


async def test_folder_of_2000_files_and_a_200_mib_file(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    await trio.to_thread.run_sync(make_tree, src, 7)
    async with p2pcloud.open_node(tmp_path / "a") as a, p2pcloud.open_node(tmp_path / "b") as b:
        sc_a, sc_b = await shared_pair(a, b)
        await sc_a.add_folder(src)
        await sc_b.add_folder(dst)
        await wait_same(src, dst)
        want = await trio.to_thread.run_sync(tree_hashes, src)
        got = await trio.to_thread.run_sync(tree_hashes, dst)
        assert len(want) == SMALL_FILES + 1
        assert got == want

        # an edit in the middle of the large file re-sends a few chunks, not the file
        blobs_b = b.replication.blobs  # type: ignore[union-attr]
        before = blobs_b.bytes_received[a.hashname]
        await trio.to_thread.run_sync(edit_middle, src / "large.bin")
        await wait_same(src, dst)
        sent_again = blobs_b.bytes_received[a.hashname] - before
        assert 0 < sent_again < LARGE_SIZE * 5 // 100, sent_again
        want = await trio.to_thread.run_sync(tree_hashes, src)
        got = await trio.to_thread.run_sync(tree_hashes, dst)
        assert got == want
        await wait_for(lambda: sc_b.conflicts() == [], "no conflicts")
