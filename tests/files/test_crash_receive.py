"""kill -9 of a receiving node while folder content streams into its part files.

A sender node (this process) shares a folder with one large file and some small ones; the
receiver is a separate process (tests/files/_receiver.py) on 127.0.0.1, killed with SIGKILL
at seeded random moments of the transfer and restarted over the same data dir and folder.
After every kill: no file at a user path is ever partial or wrong (only complete, verified
content is renamed into place). At the end: the folder is complete and identical, and no
part file is left behind.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import blake3
import trio

import p2pcloud
from p2pcloud.files.parts import PART_PREFIX

ROOT = Path(__file__).resolve().parents[2]
KILLS = 5
SEED = 20261130
LARGE = 96 * 1024 * 1024  # long enough on loopback that most kills land mid-transfer
SMALL = 150
WAIT = 300  # seconds any phase may take on a loaded 2-core machine


def make_tree(root: Path) -> None:
    rng = random.Random(SEED)
    for i in range(SMALL):
        d = root / f"d{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"s{i:04d}.bin").write_bytes(rng.randbytes(rng.randint(100, 70_000)))
    with open(root / "large.bin", "wb") as f:
        for _ in range(LARGE >> 20):
            f.write(rng.randbytes(1 << 20))


def user_files(root: Path) -> dict[str, bytes]:
    """BLAKE3 of every file at a user path (our ``.p2pcloud*`` names excluded)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".p2pcloud")]
        for name in files:
            if name.startswith(".p2pcloud"):
                continue
            p = Path(dirpath) / name
            h = blake3.blake3()
            with open(p, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
            out[p.relative_to(root).as_posix()] = h.digest()
    return out


class Receiver:
    """One life of the receiving process."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self._buf = b""

    async def line(self) -> str:
        assert self.proc.stdout is not None
        with trio.fail_after(WAIT):
            while b"\n" not in self._buf:
                data = await self.proc.stdout.receive_some()
                if not data:
                    raise AssertionError(f"the receiver exited ({self.proc.poll()})")
                self._buf += data
        raw, self._buf = self._buf.split(b"\n", 1)
        return raw.decode()

    async def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(text.encode() + b"\n")


async def start(data: Path, dst: Path, sender: p2pcloud.Node, sc_name: str) -> Receiver:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.files._receiver", str(data), sc_name, str(dst)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    r = Receiver(proc)
    hn = (await r.line()).split()[1]
    sc = sender.subcloud(sc_name)
    if sc.rights(hn) is None:  # type: ignore[arg-type]
        await sc.share(hn, "write")
    await r.send(f"GO {sender.link_uri}")
    assert await r.line() == "FOLDER"
    return r


async def test_kill_9_while_receiving_leaves_no_partial_file(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    await trio.to_thread.run_sync(make_tree, src)
    want = await trio.to_thread.run_sync(user_files, src)
    async with p2pcloud.open_node(tmp_path / "sender", port=None) as sender:
        sc = await sender.create_subcloud("photos")
        await sc.add_folder(src)
        mid_transfer = 0
        for _ in range(KILLS):
            r = await start(tmp_path / "receiver", dst, sender, "photos")
            # a random instant while content streams into a part file (or soon after)
            with trio.move_on_after(5.0):
                while not any(dst.rglob(PART_PREFIX + "*")):  # noqa: ASYNC110
                    await trio.sleep(0.005)
            await trio.sleep(rng.uniform(0.0, 0.4))
            r.proc.send_signal(signal.SIGKILL)
            await r.proc.wait()
            got = await trio.to_thread.run_sync(user_files, dst)
            # every file at a user path is a complete, correct version
            assert {p: h for p, h in got.items() if want.get(p) != h} == {}
            if got != want:
                mid_transfer += 1
        r = await start(tmp_path / "receiver", dst, sender, "photos")
        with trio.fail_after(WAIT):
            while await trio.to_thread.run_sync(user_files, dst) != want:  # noqa: ASYNC110
                await trio.sleep(0.2)  # polling the disk: there is no event to wait for
        leftovers = list(dst.rglob(PART_PREFIX + "*"))
        assert r.proc.stdin is not None
        await r.proc.stdin.aclose()
        with trio.fail_after(WAIT):
            await r.proc.wait()
    assert leftovers == []
    print(f"{mid_transfer} of {KILLS} kills interrupted the transfer")
    assert mid_transfer >= 1  # the kills did interrupt the transfer
