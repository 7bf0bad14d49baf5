"""BlobTransfers between endpoints: manifests then chunks, forgers, vanishing peers, resume."""

from __future__ import annotations

import random
from collections.abc import Callable

from p2pcloud._ids import Hashname
from p2pcloud.blobs import (
    BlobCompleted,
    BlobStalled,
    BlobTransfers,
    ChunkData,
    ChunkReceived,
    Manifest,
    ManifestPiece,
    ManifestReceived,
    ManifestWant,
    MessageDropped,
    Want,
    decode_blob_message,
    encode_blob_message,
    manifest_of,
)


class Endpoint:
    """An endpoint with a dict chunk store and the real coordinator."""

    def __init__(self, name: str, data: bytes | None = None) -> None:
        self.name = Hashname(name)
        self.chunks: dict[bytes, bytes] = {}
        self.manifests: dict[bytes, Manifest] = {}
        self.asked: list[bytes] = []
        if data is not None:
            m = manifest_of(data)
            self.manifests[m.blob_hash] = m
            for c, o in zip(m.chunks, m.offsets(), strict=True):
                self.chunks[c.hash] = data[o:o + c.size]
        self.t = BlobTransfers(self.chunks.__contains__, self.chunks.get, self.manifests.get,
                               max_in_flight=4, request_timeout=10.0)
        self.events: list[object] = []

    def receive(self, peer: Hashname, body: bytes, now: float) -> list[tuple[Hashname, bytes]]:
        msg = decode_blob_message(body)
        if isinstance(msg, Want):
            self.asked.extend(msg.hashes)
        self.t.receive(peer, body, now)
        return []

    def drain(self) -> None:
        while (e := self.t.next_event()) is not None:
            self.events.append(e)
            if isinstance(e, ManifestReceived):
                self.manifests[e.blob] = e.manifest
            elif isinstance(e, ChunkReceived):
                self.chunks[e.hash] = e.data


class Forger:
    """Answers every mwant with a forged manifest and every want with wrong bytes."""

    def __init__(self, name: str) -> None:
        self.name = Hashname(name)

    def receive(self, peer: Hashname, body: bytes, now: float) -> list[tuple[Hashname, bytes]]:
        msg = decode_blob_message(body)
        forged = manifest_of(b"forged content")
        if isinstance(msg, ManifestWant):
            enc = forged.encoded
            return [(peer, encode_blob_message(ManifestPiece(msg.blob, 0, len(enc), enc)))]
        if isinstance(msg, Want):
            return [(peer, encode_blob_message(ChunkData(h, b"wrong bytes"))) for h in msg.hashes]
        return []


def _run(fetcher: Endpoint, others: list[Endpoint | Forger], until: Callable[[], bool],
         down_after: dict[str, int] | None = None, rounds: int = 400) -> None:
    """Pump messages between the fetcher and the others (replies go back at once)."""
    now = 0.0
    served: dict[str, int] = {}
    by_name = {o.name: o for o in others}
    for o in others:
        fetcher.t.peer_up(o.name)
        if isinstance(o, Endpoint):
            o.t.peer_up(fetcher.name)
    for _ in range(rounds):
        fetcher.drain()
        if until():
            return
        sent = fetcher.t.messages_to_send(now)
        for peer, body in sent:
            other = by_name[peer]
            limit = (down_after or {}).get(peer)
            if limit is not None and served.get(peer, 0) >= limit:
                continue  # it went away: the message is lost
            served[peer] = served.get(peer, 0) + 1
            replies = other.receive(fetcher.name, body, now)
            if isinstance(other, Endpoint):
                replies = other.t.messages_to_send(now)
            for _to, reply in replies:
                fetcher.t.receive(peer, reply, now)
            if limit is not None and served[peer] >= limit:
                fetcher.t.peer_down(peer)
        if not sent:
            timer = fetcher.t.get_timer()
            if timer is None:
                fetcher.drain()
                if until():
                    return
                raise AssertionError("idle before done")
            now = timer
            fetcher.t.handle_timer(now)
        now += 0.01
    raise AssertionError("transfer never finished")


def _done(e: Endpoint, blob: bytes) -> Callable[[], bool]:
    return lambda: BlobCompleted(blob) in e.events


def test_fetch_with_a_forger_and_a_vanishing_peer() -> None:
    data = random.Random(1).randbytes(1_500_000)
    m = manifest_of(data)
    fetcher = Endpoint("fetcher")
    forger = Forger("a-forger")  # asked first for the manifest (sorted by hashname)
    honest = Endpoint("b-honest", data)
    vanisher = Endpoint("c-vanisher", data)
    fetcher.t.want_blob(m.blob_hash)
    _run(fetcher, [forger, honest, vanisher], _done(fetcher, m.blob_hash),
         down_after={"c-vanisher": 3})
    rebuilt = b"".join(fetcher.chunks[c.hash] for c in m.chunks)
    assert rebuilt == data
    assert fetcher.manifests[m.blob_hash] == m
    dropped = [e for e in fetcher.events if isinstance(e, MessageDropped)]
    assert dropped and all(e.peer == "a-forger" for e in dropped)
    assert any("bad manifest" in e.reason for e in dropped)
    stats = fetcher.t.statistics()
    assert stats["chunks received"] == len(m.unique_chunks())
    assert stats["chunk size mismatch"] >= 1  # the forger was asked, refused, routed around
    assert stats["chunk verified"] == len(m.unique_chunks())
    assert len(vanisher.asked) > 0
    assert fetcher.t.progress(m.blob_hash) is None  # finished fetches are dropped


def test_resume_asks_only_for_missing_chunks() -> None:
    data = random.Random(2).randbytes(1_000_000)
    m = manifest_of(data)
    holder = Endpoint("holder", data)
    fetcher = Endpoint("fetcher")
    half = list(m.unique_chunks())[::2]
    for h in half:  # a previous, interrupted fetch stored these
        fetcher.chunks[h] = holder.chunks[h]
    fetcher.t.want_blob(m.blob_hash, m)
    _run(fetcher, [holder], _done(fetcher, m.blob_hash))
    assert not set(holder.asked) & set(half)
    assert set(holder.asked) == set(m.unique_chunks()) - set(half)


def test_stalled_without_peers_then_resumed() -> None:
    data = random.Random(3).randbytes(200_000)
    m = manifest_of(data)
    fetcher = Endpoint("fetcher")
    fetcher.t.want_blob(m.blob_hash)
    assert fetcher.t.messages_to_send(0.0) == []
    fetcher.drain()
    assert fetcher.events == [BlobStalled(m.blob_hash, False, ())]
    holder = Endpoint("holder", data)
    _run(fetcher, [holder], _done(fetcher, m.blob_hash))
    assert b"".join(fetcher.chunks[c.hash] for c in m.chunks) == data


def test_garbage_from_a_peer_is_dropped_not_raised() -> None:
    fetcher = Endpoint("fetcher")
    for body in (b"", b"\xff\x00garbage", encode_blob_message(ChunkData(b"x" * 32, b"?"))):
        fetcher.t.receive(Hashname("noise"), body, 0.0)
    fetcher.drain()
    assert sum(isinstance(e, MessageDropped) for e in fetcher.events) == 2
    assert fetcher.t.statistics()["unsolicited chunk"] == 1
