"""The ``blob`` channel messages: round trips, bounds, and decoders that raise one error."""

from __future__ import annotations

import contextlib
import random

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcloud.blobs import (
    CHUNK_MAX,
    MAX_BLOB_MESSAGE,
    ChunkData,
    ChunkError,
    Have,
    Manifest,
    ManifestAssembler,
    ManifestPiece,
    ManifestWant,
    Want,
    answer,
    chunk_hash,
    decode_blob_message,
    encode_blob_message,
    have_messages,
    manifest_of,
    manifest_pieces,
)
from p2pcloud.blobs.messages import MAX_WANT_HASHES
from p2pcloud.errors import BadManifest, MalformedPacket

H = [bytes([i]) * 32 for i in range(4)]


@pytest.mark.parametrize(
    "msg",
    [
        Want((H[0], H[1])),
        Have((H[2],), (H[0], H[3])),
        Have((), ()),
        ChunkData(H[1], b"x" * CHUNK_MAX),
        ChunkError(H[0], "missing"),
        ManifestWant(H[3], 1000),
        ManifestPiece(H[2], 0, 10, b"0123456789"),
    ],
)
def test_round_trip(msg) -> None:  # type: ignore[no-untyped-def]
    body = encode_blob_message(msg)
    assert len(body) <= MAX_BLOB_MESSAGE
    assert decode_blob_message(body) == msg


@pytest.mark.parametrize(
    "obj",
    [
        [1, 2],
        {"v": 2, "t": "want", "h": [H[0]]},
        {"v": 1, "t": "nope"},
        {"v": 1, "t": "want", "h": []},
        {"v": 1, "t": "want", "h": [b"short"]},
        {"v": 1, "t": "want", "h": [H[0]] * (MAX_WANT_HASHES + 1)},
        {"v": 1, "t": "chunk", "h": H[0], "d": b""},
        {"v": 1, "t": "chunk", "h": H[0], "d": "text"},
        {"v": 1, "t": "err", "h": H[0], "r": 5},
        {"v": 1, "t": "mwant", "b": H[0], "o": -1},
        {"v": 1, "t": "mwant", "b": H[0], "o": True},
        {"v": 1, "t": "manifest", "b": H[0], "o": 5, "n": 6, "d": b"ab"},
    ],
)
def test_malformed_messages_are_refused(obj) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MalformedPacket):
        decode_blob_message(cbor2.dumps(obj))


def test_oversized_body_is_refused_before_parsing() -> None:
    with pytest.raises(MalformedPacket, match="too long"):
        decode_blob_message(b"\x00" * (MAX_BLOB_MESSAGE + 1))
    with pytest.raises(ValueError):
        encode_blob_message(ChunkData(H[0], b"x" * (CHUNK_MAX + 1)))


@given(st.binary(max_size=300))
def test_decoder_raises_only_malformed_packet(data: bytes) -> None:
    with contextlib.suppress(MalformedPacket):
        decode_blob_message(data)


def test_answer_serves_verified_chunks_and_manifests() -> None:
    data = random.Random(5).randbytes(300_000)
    m = manifest_of(data)
    store = {c.hash: data[o:o + c.size] for c, o in zip(m.chunks, m.offsets(), strict=True)}
    rotten = H[3]
    store[rotten] = b"not what it hashes to"
    replies = answer(Want((m.chunks[0].hash, H[1], rotten)), store.get,
                     {m.blob_hash: m}.get)
    assert replies[0] == ChunkData(m.chunks[0].hash, store[m.chunks[0].hash])
    assert replies[1] == ChunkError(H[1], "missing")
    assert replies[2] == ChunkError(rotten, "corrupt")
    assert chunk_hash(replies[0].data) == m.chunks[0].hash  # type: ignore[union-attr]

    pieces = answer(ManifestWant(m.blob_hash, 0), store.get, {m.blob_hash: m}.get)
    asm = ManifestAssembler(m.blob_hash)
    got = None
    for p in pieces:
        assert isinstance(p, ManifestPiece)
        got = asm.add(decode_blob_message(encode_blob_message(p)))  # type: ignore[arg-type]
    assert got == m
    assert answer(ManifestWant(H[0], 0), store.get, {}.get) == [ChunkError(H[0], "missing")]


def test_manifest_assembler_checks_the_whole() -> None:
    rng = random.Random(6)
    # 10,000 entries: a ~340 KB encoding, sent as several pieces
    m = Manifest([(rng.randbytes(32), 1000) for _ in range(10_000)])
    pieces = manifest_pieces(m)
    assert len(pieces) == 3
    asm = ManifestAssembler(m.blob_hash)
    results = []
    for p in pieces:
        assert asm.add(p) is None or p is pieces[-1]
        if p is not pieces[-1]:
            assert asm.add(p) is None  # a duplicate is ignored
        results.append(asm.offset)
    assert results[-1] == len(m.encoded)
    # resuming at an offset from another (honest) peer
    resumed = ManifestAssembler(m.blob_hash)
    resumed.add(pieces[0])
    tail = manifest_pieces(m, resumed.offset)
    out = [resumed.add(p) for p in tail]
    assert out[-1] == m
    # a forged manifest does not hash to the blob asked for
    forged = manifest_of(b"forged")
    asm = ManifestAssembler(m.blob_hash)
    with pytest.raises(BadManifest):
        asm.add(ManifestPiece(m.blob_hash, 0, len(forged.encoded), forged.encoded))
    with pytest.raises(BadManifest, match="gap"):
        ManifestAssembler(m.blob_hash).add(ManifestPiece(m.blob_hash, 5, 100, b"x"))
    with pytest.raises(BadManifest, match="another blob"):
        ManifestAssembler(m.blob_hash).add(ManifestPiece(H[0], 0, 100, b"x"))


def test_have_messages_respect_the_bound() -> None:
    blobs = [i.to_bytes(32, "big") for i in range(5000)]
    msgs = have_messages(blobs, [H[1], H[2]])
    assert [len(m.blobs) for m in msgs] == [4096, 904, 0]
    assert msgs[-1].hashes == (H[1], H[2])
    for m in msgs:
        assert decode_blob_message(encode_blob_message(m)) == m
    assert have_messages() == []
