"""Blob pipeline and folder scan/sync speed, with their anchors in the same run.

Measures:
  pipeline   chunk (FastCDC) + BLAKE3 of every chunk + manifest, on 256 MiB of random data,
             against BLAKE3 alone and SHA-256 alone over the same buffer (one thread each);
             plus the cutter alone, and the `fastcdc` package's cutter if it is installed.
  scan       Folder.reconcile of 10,000 small files (512 B..8 KiB, Syncthing's bench mix):
             first scan (read, chunk, hash, replica writes, index save) and a no-change
             rescan, against a bare os.walk + lstat of the same tree (the floor) and a
             read + SHA-256 of every file (what a naive scanner does).
  sync       the 10,000 files, and one 256 MiB file, from folder A to folder B through two
             core replicas: A's scan, the delta into B's replica, B's atomic writes (fsync per
             file), with chunks read from A's files. Syncthing's loopback figures
             (peers.md section 3: 10k files ~20.7 s median, best 10.8 s; 1 GiB ~8.0 s
             median, ~127 MiB/s) are from another run and another program, shown for scale.

Run:  .venv/bin/python bench/bench_files.py   (BENCH_FILES_MB=256, BENCH_FILES_N=10000)
Prints the tables and writes the "files" section of bench/RESULTS.md.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import blake3  # noqa: E402
import pyfastcdc  # noqa: E402

from bench._results import write_section  # noqa: E402
from p2pcloud._core import IMPLEMENTATION, Replica  # noqa: E402
from p2pcloud.blobs import CHUNK_AVG, CHUNK_MAX, CHUNK_MIN, manifest_of  # noqa: E402
from p2pcloud.files import Folder, paths_from_changes  # noqa: E402

COMMAND = ".venv/bin/python bench/bench_files.py"
MB = int(os.environ.get("BENCH_FILES_MB", "256"))
N_FILES = int(os.environ.get("BENCH_FILES_N", "10000"))
START_MS = 1_767_225_600_000


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def random_bytes(n: int, seed: int) -> bytes:
    """Seeded random bytes (randbytes takes at most 256 MiB - 1 per call)."""
    rng = random.Random(seed)
    block = 16 * 1024 * 1024
    return b"".join(rng.randbytes(min(block, n - i)) for i in range(0, n, block))


def pipeline_rows(data: bytes) -> list[tuple[str, float]]:
    cutter = pyfastcdc.FastCDC(CHUNK_AVG, min_size=CHUNK_MIN, max_size=CHUNK_MAX)
    rows = [
        ("p2pcloud pipeline: FastCDC + BLAKE3 per chunk + manifest",
         best_of(lambda: manifest_of(data))),
        ("anchor: BLAKE3 of the whole buffer (1 thread)",
         best_of(lambda: blake3.blake3(data).digest())),
        ("anchor: SHA-256 of the whole buffer", best_of(lambda: hashlib.sha256(data).digest())),
        ("pyfastcdc cut points only", best_of(lambda: sum(1 for _ in cutter.cut_buf(data)))),
    ]
    try:
        from fastcdc.fastcdc_cy import fastcdc_cy  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        rows.append(("fastcdc 1.7 (Cython) cut points only", best_of(
            lambda: sum(1 for _ in fastcdc_cy(data, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX)))))
    return rows


def tree_contents(n: int, seed: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    return [(f"d{i % 100:02d}/f{i:05d}.bin", rng.randbytes(rng.randint(512, 8192)))
            for i in range(n)]


def make_tree(root: Path, contents: list[tuple[str, bytes]]) -> int:
    """The anchor for B's writes: create every directory and file, plain writes, no fsync."""
    for i in range(100):
        (root / f"d{i:02d}").mkdir()
    total = 0
    for rel, data in contents:
        with open(root / rel, "wb") as f:
            f.write(data)
        total += len(data)
    return total


def bare_walk(root: Path) -> int:
    n = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return n


def naive_sha(root: Path) -> int:
    n = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                hashlib.sha256(f.read()).digest()
            n += 1
    return n


class Clock:
    def __init__(self) -> None:
        self.ms = START_MS

    def __call__(self) -> int:
        self.ms += 1
        return self.ms


def sync_once(work: Path, name: str, fill: Callable[[Path], int], clock: Clock
              ) -> dict[str, float]:
    """Fill A, then time A's first scan, a no-change rescan, and B's apply."""
    a_root, b_root = work / f"{name}-a", work / f"{name}-b"
    a_root.mkdir()
    b_root.mkdir()
    t0 = time.perf_counter()
    total = fill(a_root)
    fill_secs = time.perf_counter() - t0
    ra, rb = Replica(b"a" * 16), Replica(b"b" * 16)
    fa = Folder(a_root, ra, device="a", index_path=work / f"{name}-a.index")
    fb = Folder(b_root, rb, device="b", index_path=work / f"{name}-b.index",
                chunks=fa.read_chunk, manifests=fa.manifest)
    out: dict[str, float] = {"bytes": float(total), "fill": fill_secs}
    t0 = time.perf_counter()
    res = fa.reconcile(now_ms=clock())
    out["scan"] = time.perf_counter() - t0
    out["files"] = float(res.hashed_files)
    t0 = time.perf_counter()
    again = fa.reconcile(now_ms=clock())
    out["rescan"] = time.perf_counter() - t0
    assert again.hashed_files == 0 and again.delta == b""
    t0 = time.perf_counter()
    touched = paths_from_changes(rb.apply([res.delta], clock()))
    out["apply_delta"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    resb = fb.reconcile(touched, now_ms=clock())
    out["write_b"] = time.perf_counter() - t0
    assert not resb.missing, "B lacked chunks"
    out["delta_bytes"] = float(len(res.delta))
    return out


def main() -> None:
    data = random_bytes(MB * 1024 * 1024, 1)
    rows = pipeline_rows(data)
    mib = len(data) / (1024 * 1024)
    lines = [
        f"Pipeline on {mib:.0f} MiB of random data (best of 3, one thread; core: "
        f"{IMPLEMENTATION}):",
        "",
        "| what | MiB/s | vs SHA-256 |",
        "|---|---|---|",
    ]
    sha = dict(rows)["anchor: SHA-256 of the whole buffer"]
    for label, secs in rows:
        lines.append(f"| {label} | {mib / secs:,.0f} | {sha / secs:.2f}x |")
    m = manifest_of(data)
    lines.append("")
    lines.append(f"Chunks: {len(m)} (mean {m.size / max(1, len(m)) / 1024:.1f} KiB; "
                 f"min/avg/max parameters {CHUNK_MIN // 1024}/{CHUNK_AVG // 1024}/"
                 f"{CHUNK_MAX // 1024} KiB), manifest {len(m.encoded):,} bytes.")
    del data

    clock = Clock()
    with tempfile.TemporaryDirectory(prefix="p2pcloud-bench-files-") as tmp:
        work = Path(tmp)
        contents = tree_contents(N_FILES, 2)
        small = sync_once(work, "small", lambda r: make_tree(r, contents), clock)
        # the floor and the naive anchor on the same tree, same run
        walk = best_of(lambda: bare_walk(work / "small-a"))
        naive = best_of(lambda: naive_sha(work / "small-a"))

        blob = random_bytes(MB * 1024 * 1024, 3)  # generated outside the timed fill

        def big_fill(root: Path) -> int:
            (root / "big.bin").write_bytes(blob)
            return len(blob)

        big = sync_once(work, "big", big_fill, clock)

    n = int(small["files"])
    lines += [
        "",
        f"Scan of {n:,} small files (512 B..8 KiB, {small['bytes'] / 2**20:.1f} MiB) with "
        "Folder.reconcile:",
        "",
        "| what | seconds | files/s |",
        "|---|---|---|",
        f"| first scan (read, chunk, BLAKE3, {n:,} replica writes, index save) | "
        f"{small['scan']:.2f} | {n / small['scan']:,.0f} |",
        f"| no-change rescan (lstat, compare with the index; nothing read) | "
        f"{small['rescan']:.2f} | {n / small['rescan']:,.0f} |",
        f"| anchor: bare os.walk + lstat (the floor) | {walk:.2f} | {n / walk:,.0f} |",
        f"| anchor: os.walk + read + SHA-256 each file (a naive scan) | {naive:.2f} | "
        f"{n / naive:,.0f} |",
        "",
        "Sync A -> B through two core replicas (chunks read from A's files; B writes each "
        "file atomically: temp, fsync, rename):",
        "",
        "| what | A scan | B applies delta | B writes files | total | rate | anchor: plain "
        "write of A's files (no fsync) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r, unit in ((f"{n:,} small files", small, "files"),
                           (f"one {MB} MiB file", big, "MiB")):
        total = r["scan"] + r["apply_delta"] + r["write_b"]
        rate = (f"{r['files'] / total:,.0f} files/s" if unit == "files"
                else f"{r['bytes'] / 2**20 / total:,.0f} MiB/s")
        lines.append(f"| {label} | {r['scan']:.2f} s | {r['apply_delta']:.2f} s | "
                     f"{r['write_b']:.2f} s | {total:.2f} s | {rate} | {r['fill']:.2f} s |")
    lines += [
        "",
        "These figures exclude the network and write B's files from A's through the copy "
        "path (begin_write); the node receives chunks into part files that are renamed into "
        "place instead. The whole path, two node processes on loopback against two Syncthing "
        "instances in the same run, is the \"syncthing\" section (bench/bench_syncthing.py).",
        f"Delta for {n:,} new files: {small['delta_bytes'] / 1024:,.0f} KiB.",
    ]
    body = "\n".join(lines)
    print(body)
    write_section("files", COMMAND, body)


if __name__ == "__main__":
    main()
