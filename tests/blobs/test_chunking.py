"""Content-defined chunking and manifests: determinism, edit locality, bounded decoding."""

from __future__ import annotations

import random

import blake3
import pyfastcdc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcloud.blobs import (
    CHUNK_AVG,
    CHUNK_MAX,
    CHUNK_MIN,
    MAX_MANIFEST_CHUNKS,
    Manifest,
    chunk_buffer,
    chunk_hash,
    decode_manifest,
    manifest_of,
)
from p2pcloud.errors import BadManifest

MIB = 1024 * 1024


def _random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_chunking_is_deterministic_and_covers_the_buffer() -> None:
    data = _random_bytes(3 * MIB, 1)
    a = chunk_buffer(data)
    b = chunk_buffer(bytes(data))
    assert a == b
    assert a[0].offset == 0
    assert sum(c.size for c in a) == len(data)
    for prev, cur in zip(a, a[1:], strict=False):
        assert cur.offset == prev.offset + prev.size
    # every chunk but the last respects the bounds; hashes are BLAKE3 of the bytes
    assert all(CHUNK_MIN <= c.size <= CHUNK_MAX for c in a[:-1])
    for c in a:
        assert c.hash == blake3.blake3(data[c.offset:c.offset + c.size]).digest()
        assert c.hash == chunk_hash(data[c.offset:c.offset + c.size])


def test_empty_and_tiny_buffers() -> None:
    assert chunk_buffer(b"") == []
    m = manifest_of(b"")
    assert m.size == 0 and len(m) == 0
    assert decode_manifest(m.encoded, m.blob_hash) == m
    t = manifest_of(b"abc")
    assert [c.size for c in t.chunks] == [3]


def test_zeros_are_cut_at_the_maximum() -> None:
    spans = chunk_buffer(bytes(CHUNK_MAX * 3 + 10))
    assert [s.size for s in spans] == [CHUNK_MAX] * 3 + [10]
    assert len({s.hash for s in spans[:3]}) == 1  # a repeated chunk has one address


def test_an_edit_in_the_middle_of_20_mib_resends_under_5_percent() -> None:
    data = _random_bytes(20 * MIB, 2)
    before = manifest_of(data)
    mid = len(data) // 2
    edited = data[:mid] + b"an edit in the middle of the file" + data[mid + 100:]
    after = manifest_of(edited)
    held = {c.hash for c in before.chunks}
    resent = sum(c.size for c in after.chunks if c.hash not in held)
    assert resent < 0.05 * len(edited), resent
    assert before.blob_hash != after.blob_hash
    # the chunks away from the edit are the same objects at the start and the end
    assert before.chunks[:10] == after.chunks[:10]
    assert before.chunks[-10:] == after.chunks[-10:]


def test_an_insertion_at_the_front_shifts_no_later_chunk() -> None:
    data = _random_bytes(4 * MIB, 3)
    before = {c.hash for c in manifest_of(data).chunks}
    after = manifest_of(b"x" * 1000 + data)
    new = [c for c in after.chunks if c.hash not in before]
    assert sum(c.size for c in new) <= 2 * CHUNK_MAX


def test_manifest_round_trip_and_hash() -> None:
    data = _random_bytes(MIB, 4)
    m = manifest_of(data)
    assert m.size == len(data)
    assert m.blob_hash == blake3.blake3(m.encoded).digest()
    back = decode_manifest(m.encoded, m.blob_hash)
    assert back == m and back.chunks == m.chunks
    assert m.offsets()[0] == 0 and m.offsets()[-1] + m.chunks[-1].size == len(data)
    assert Manifest(m.chunks).encoded == m.encoded  # canonical


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda b: b"", "truncated"),
        (lambda b: b"\x00" + b[1:], "magic"),
        (lambda b: b[:1] + b"\x02" + b[2:], "version"),
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\x00", "trailing"),
        (lambda b: b[:2] + b"\x05" + b[3:], "truncated"),  # claims more chunks than bytes
    ],
)
def test_bad_manifests_raise_the_typed_error(mutate, why) -> None:  # type: ignore[no-untyped-def]
    m = Manifest([(b"\x01" * 32, 100), (b"\x02" * 32, 5)])
    with pytest.raises(BadManifest, match=why):
        decode_manifest(mutate(m.encoded))


def test_manifest_limits() -> None:
    m = Manifest([(b"\x01" * 32, 100)])
    with pytest.raises(BadManifest, match="blob hash"):
        decode_manifest(m.encoded, b"\x00" * 32)
    # a non-minimal varint for the size (100 as two bytes) would give a second encoding
    non_minimal = m.encoded[:3] + b"\x01" * 32 + bytes([0x80 | 100, 0x00])
    with pytest.raises(BadManifest, match="non-minimal"):
        decode_manifest(non_minimal)
    huge_count = bytes([0xB1, 1]) + bytes([0xFF, 0xFF, 0xFF, 0xFF, 0x0F])
    with pytest.raises(BadManifest):
        decode_manifest(huge_count)
    with pytest.raises(BadManifest, match="size"):
        Manifest([(b"\x01" * 32, CHUNK_MAX + 1)])
    with pytest.raises(BadManifest, match="size"):
        Manifest([(b"\x01" * 32, 0)])
    with pytest.raises(BadManifest, match="32 bytes"):
        Manifest([(b"\x01" * 31, 10)])
    assert MAX_MANIFEST_CHUNKS * CHUNK_MIN >= 1 << 36


@given(st.binary(max_size=400))
def test_decode_manifest_raises_only_bad_manifest(data: bytes) -> None:
    for candidate in (data, bytes([0xB1, 1]) + data):
        try:
            m = decode_manifest(candidate)
        except BadManifest:
            continue
        assert m.encoded == candidate


def test_small_blob_fast_path_agrees_with_the_cutter() -> None:
    data = _random_bytes(CHUNK_MIN + 2, 12)
    cutter = pyfastcdc.FastCDC(CHUNK_AVG, min_size=CHUNK_MIN, max_size=CHUNK_MAX)
    for n in (1, 100, CHUNK_MIN - 1, CHUNK_MIN, CHUNK_MIN + 1, CHUNK_MIN + 2):
        expected = [(c.offset, c.length) for c in cutter.cut_buf(data[:n])]
        assert [(c.offset, c.size) for c in chunk_buffer(data[:n])] == expected


class _Trickle:
    """A stream that returns at most ``step`` bytes per read (like a pipe or a slow disk)."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._step = step

    def readinto(self, buffer: memoryview) -> int:
        n = min(len(buffer), self._step, len(self._data) - self._pos)
        buffer[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n


@pytest.mark.parametrize("size", [0, 1, CHUNK_MIN, CHUNK_MAX + 1, 3 * MIB + 12345])
@pytest.mark.parametrize("step", [4096, 1 << 20])
def test_stream_chunking_equals_whole_buffer_chunking(size: int, step: int) -> None:
    from p2pcloud.blobs.chunking import iter_stream_chunks

    data = _random_bytes(size, size)
    assert list(iter_stream_chunks(_Trickle(data, step))) == chunk_buffer(data)


def test_stream_chunking_of_zeros_cuts_at_the_maximum() -> None:
    from p2pcloud.blobs.chunking import iter_stream_chunks

    data = bytes(2 * MIB + 5)
    spans = list(iter_stream_chunks(_Trickle(data, 65536)))
    assert spans == chunk_buffer(data)
    assert all(s.size == CHUNK_MAX for s in spans[:-1])
