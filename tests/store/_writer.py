"""A child process for the crash test: writes to a store and acknowledges each durable write.

Run as ``python -m tests.store._writer STORE_DIR ROUND``. It opens the store (tiny map, so it
grows under the knife too), continues the logs from the version it finds, and loops forever
doing seeded writes. After each store call returns it prints one acknowledgement line and
flushes it: a line on stdout is a promise that the write is durable. Before a removal it
prints an intent line (lowercase), since a killed removal may or may not have committed.
The test kills it with SIGKILL at a random moment and checks every promise against the
reopened store.

Every byte written is a function of its key (:func:`local_envelope`, :func:`remote_envelope`,
:func:`snapshot`, :func:`chunk`), so the test can check content, not only presence.
"""

from __future__ import annotations

import hashlib
import random
import sys

from p2pcloud._ids import ReplicaId, SubCloudId
from p2pcloud._store import MIN_MAP_SIZE, open_store

SC = SubCloudId(b"crash-subcloud!!")
LOCAL = ReplicaId(b"local-replica-id")
REMOTE = ReplicaId(b"remote-replica!!")
BLOBS_PER_ROUND = 100_000  # round r uses blob indices r*BLOBS_PER_ROUND onwards
CHUNKS_PER_BLOB = 3


def _fill(label: str, blocks: int) -> bytes:
    return hashlib.blake2b(label.encode()).digest() * blocks


def local_width(first: int) -> int:
    """How many counters the local delta starting at ``first`` carries, minus one."""
    return first % 3


def remote_width(first: int) -> int:
    """The same for the remote origin's deltas."""
    return first * 7 % 4


def local_envelope(first: int, last: int) -> bytes:
    """The local envelope for ``first..last``: usually small, now and then 300 KB."""
    blocks = 4800 if first % 97 == 0 else 1 + first % 40
    return _fill(f"L{first}-{last}", blocks)


def remote_envelope(first: int, last: int) -> bytes:
    """The remote origin's envelope for ``first..last``."""
    return _fill(f"R{first}-{last}", 1 + first % 25)


def snapshot(a: int, b: int) -> bytes:
    """The checkpoint's snapshot bytes for the version ``{LOCAL: a, REMOTE: b}``."""
    return _fill(f"S{a}-{b}", 1000 + a % 5000)


def chunk(i: int, j: int) -> bytes:
    """Chunk ``j`` of blob ``i``."""
    return _fill(f"C{i}-{j}", 100 + (7 * i + j) % 1500)


def chunk_hash(data: bytes) -> bytes:
    """The content address of a chunk."""
    return hashlib.blake2b(data, digest_size=32).digest()


def blob_id(i: int) -> bytes:
    """Blob ``i``'s id."""
    return b"blob-%d" % i


def main() -> None:
    path, round_ = sys.argv[1], int(sys.argv[2])
    rng = random.Random(round_)
    store = open_store(path, initial_map_size=MIN_MAP_SIZE)
    version = store.version(SC)
    a, b = version.get(LOCAL, 0), version.get(REMOTE, 0)
    next_blob = round_ * BLOBS_PER_ROUND
    print("ready", flush=True)
    while True:
        r = rng.random()
        if r < 0.55:
            first = a + 1
            last = first + local_width(first)
            store.commit_local(SC, local_envelope(first, last), first, last, origin=LOCAL)
            a = last
            print(f"L {a}", flush=True)
        elif r < 0.8:
            batch = []
            for _ in range(rng.randint(1, 100)):
                first = b + 1
                b = first + remote_width(first)
                batch.append((REMOTE, remote_envelope(first, b), first, b))
            store.append_envelopes(SC, batch)
            print(f"R {b}", flush=True)
        elif r < 0.92:
            chunks = {}
            order = []
            for j in range(CHUNKS_PER_BLOB):
                data = chunk(next_blob, j)
                chunks[chunk_hash(data)] = data
                order.append(chunk_hash(data))
            size = sum(len(d) for d in chunks.values())
            store.put_blob(blob_id(next_blob), size, order, chunks)
            print(f"B {next_blob}", flush=True)
            next_blob += 1
        elif r < 0.96:
            gone = next_blob - 3
            if gone >= round_ * BLOBS_PER_ROUND:
                print(f"d {gone}", flush=True)  # from here on the blob may be gone
                store.remove_blob(blob_id(gone))
                store.collect_garbage()
                print(f"D {gone}", flush=True)
        else:
            store.checkpoint(SC, snapshot(a, b), {LOCAL: a, REMOTE: b})
            print(f"C {a} {b}", flush=True)
            store.truncate(SC, {LOCAL: max(0, a - 5), REMOTE: max(0, b - 5)})
            print("T", flush=True)


if __name__ == "__main__":
    main()
