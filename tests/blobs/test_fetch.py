"""The blob-fetch planner against several fake peers: honest, lying, vanishing, slow."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from p2pcloud._ids import Hashname
from p2pcloud.blobs import (
    MAX_STRIKES,
    BlobFetch,
    ChunkData,
    ChunkError,
    ChunkRejected,
    ChunkVerified,
    FetchCompleted,
    Manifest,
    PeerBanned,
    Want,
    answer,
    decode_blob_message,
    encode_blob_message,
    manifest_of,
)
from p2pcloud.blobs.fetch import REJECT_HASH, REJECT_UNSOLICITED

KIB = 1024


def _blob(n: int, seed: int) -> tuple[bytes, Manifest, dict[bytes, bytes]]:
    data = random.Random(seed).randbytes(n)
    m = manifest_of(data)
    chunks = {c.hash: data[o:o + c.size] for c, o in zip(m.chunks, m.offsets(), strict=True)}
    return data, m, chunks


class FakePeer:
    """A peer answering wants through the real message codec and the real answer()."""

    def __init__(self, name: str, chunks: dict[bytes, bytes], *, corrupt: bool = False,
                 vanish_after: int | None = None, silent: bool = False) -> None:
        self.name = Hashname(name)
        self.chunks = dict(chunks)
        self.corrupt = corrupt
        self.vanish_after = vanish_after
        self.silent = silent
        self.served = 0
        self.asked: list[bytes] = []

    @property
    def gone(self) -> bool:
        return self.vanish_after is not None and self.served >= self.vanish_after

    def get(self, h: bytes) -> bytes | None:
        data = self.chunks.get(h)
        if data is not None and self.corrupt:
            return bytes([data[0] ^ 1]) + data[1:]
        return data

    def handle(self, body: bytes) -> list[bytes]:
        msg = decode_blob_message(body)
        assert isinstance(msg, Want)
        self.asked.extend(msg.hashes)
        if self.silent:
            return []
        if self.corrupt:
            # a lying peer sends wrong bytes under the right name (answer() would refuse)
            return [encode_blob_message(ChunkData(h, self.get(h) or b"?")) for h in msg.hashes]
        out = []
        for reply in answer(msg, self.get, lambda b: None):
            if self.gone:
                break
            self.served += 1
            out.append(encode_blob_message(reply))
        return out


def _pump(fetch: BlobFetch, peers: dict[str, FakePeer], store: dict[bytes, bytes],
          on_round: Callable[[int], None] | None = None, max_rounds: int = 500) -> float:
    """Drive a fetch to the end; returns the fake time used."""
    now = 0.0
    rounds = 0
    while not fetch.is_complete():
        rounds += 1
        assert rounds < max_rounds, "fetch never completed"
        if on_round is not None:
            on_round(rounds)
        plan = fetch.requests(now)
        replies: list[tuple[FakePeer, bytes]] = []
        for name, hashes in plan:
            assert len(hashes) <= 16
            peer = peers[name]
            if peer.gone:
                continue
            for body in peer.handle(encode_blob_message(Want(tuple(hashes)))):
                replies.append((peer, body))
        random.Random(rounds).shuffle(replies)  # answers of several peers interleave
        for peer, body in replies:
            msg = decode_blob_message(body)
            if isinstance(msg, ChunkData):
                event = fetch.receive_chunk(peer.name, msg.hash, msg.data)
                if isinstance(event, ChunkVerified):
                    store[event.hash] = event.data
            elif isinstance(msg, ChunkError):
                fetch.receive_error(peer.name, msg.hash, msg.reason)
        for peer in peers.values():
            if peer.gone and peer.name in fetch.peers():
                fetch.remove_peer(peer.name)
        if not plan and not replies:
            timer = fetch.get_timer()
            assert timer is not None, f"stalled with nothing in flight: {fetch.stalled()}"
            now = timer
            fetch.handle_timer(now)
        else:
            now += 0.01
    return now


def test_parallel_fetch_with_a_liar_and_a_vanishing_peer() -> None:
    data, m, chunks = _blob(3000 * KIB, 7)
    peers = {
        "honest": FakePeer("honest", chunks),
        "liar": FakePeer("liar", chunks, corrupt=True),
        "vanisher": FakePeer("vanisher", chunks, vanish_after=5),
    }
    store: dict[bytes, bytes] = {}
    fetch = BlobFetch(m, store.__contains__, max_in_flight=4)
    for p in peers.values():
        fetch.add_peer(p.name)
    _pump(fetch, peers, store)
    assert fetch.is_complete()
    assert b"".join(store[c.hash] for c in m.chunks) == data
    events = []
    while (e := fetch.next_event()) is not None:
        events.append(e)
    rejected = [e for e in events if isinstance(e, ChunkRejected)]
    assert rejected and all(e.peer == "liar" and e.reason == REJECT_HASH for e in rejected)
    assert PeerBanned(Hashname("liar"), REJECT_HASH) in events
    # banned at the third strike; answers to requests already out may still arrive and are
    # refused too, but nothing is asked of it after the ban
    assert MAX_STRIKES <= len(rejected) < MAX_STRIKES + 4
    assert len(peers["liar"].asked) == len(rejected)
    assert isinstance(events[-1], FetchCompleted)
    # every peer took part, and the liar's chunks were all re-fetched elsewhere
    assert peers["vanisher"].served == 5
    stats = fetch.statistics()
    assert stats["verified"] == len(m.unique_chunks())
    assert stats[REJECT_HASH] == len(rejected)
    p = fetch.progress()
    assert (p.chunks_done, p.bytes_done, p.fraction) == (p.chunks_total, len(data), 1.0)


def test_silent_peer_times_out_and_others_take_over() -> None:
    _, m, chunks = _blob(1000 * KIB, 8)
    peers = {"a": FakePeer("a", chunks, silent=True), "b": FakePeer("b", chunks)}
    store: dict[bytes, bytes] = {}
    fetch = BlobFetch(m, store.__contains__, max_in_flight=2, request_timeout=5.0)
    for p in peers.values():
        fetch.add_peer(p.name)
    used = _pump(fetch, peers, store)
    assert fetch.is_complete()
    assert used >= 5.0  # the silent peer's requests had to expire first
    assert fetch.statistics()["timeout"] >= 1


def test_resume_after_interruption_asks_only_for_missing() -> None:
    _, m, chunks = _blob(2000 * KIB, 9)
    store: dict[bytes, bytes] = {}
    first = BlobFetch(m, store.__contains__, max_in_flight=3)
    first.add_peer(Hashname("p"))
    # interrupted: the first two rounds of answers arrive, then the node "crashes"
    for h in [h for _, hs in first.requests(0.0) for h in hs]:
        event = first.receive_chunk(Hashname("p"), h, chunks[h])
        assert isinstance(event, ChunkVerified)
        store[h] = event.data
    held_before = set(store)
    assert 0 < len(held_before) < len(m.unique_chunks())

    peer = FakePeer("p", chunks)
    second = BlobFetch(m, store.__contains__, max_in_flight=3)  # the held set is the state
    assert second.progress().chunks_done == len(held_before)
    assert set(second.missing()) == set(m.unique_chunks()) - held_before
    second.add_peer(peer.name)
    _pump(second, {"p": peer}, store)
    assert second.is_complete()
    assert not set(peer.asked) & held_before  # nothing held was asked for again
    assert sorted(peer.asked) == sorted(set(m.unique_chunks()) - held_before)


def test_partial_announcements_errors_and_unsolicited_chunks() -> None:
    _, m, chunks = _blob(1500 * KIB, 10)
    hashes = list(m.unique_chunks())
    half = len(hashes) // 2
    store: dict[bytes, bytes] = {}
    fetch = BlobFetch(m, store.__contains__)
    fetch.add_peer(Hashname("front"), hashes[:half])
    fetch.add_peer(Hashname("back"), hashes[half:])
    plan = dict(fetch.requests(0.0))
    assert set(plan["front"]) <= set(hashes[:half])
    assert set(plan["back"]) <= set(hashes[half:])
    # "front" says it lost one chunk: nobody else has it, so it is stalled, not lost
    lost = plan["front"][0]
    fetch.receive_error(Hashname("front"), lost, "missing")
    assert lost in fetch.stalled()
    assert fetch.receive_chunk(Hashname("x"), b"\x00" * 32, b"zz").reason == (  # type: ignore[union-attr]
        REJECT_UNSOLICITED)
    fetch.add_peer(Hashname("full"))  # a new peer with the whole blob unblocks it
    assert lost in dict(fetch.requests(0.0)).get("full", [])
    assert lost not in fetch.stalled()


def test_bad_arguments() -> None:
    _, m, _ = _blob(10 * KIB, 11)
    with pytest.raises(ValueError):
        BlobFetch(m, lambda h: False, max_in_flight=0)
    with pytest.raises(ValueError):
        BlobFetch(m, lambda h: False, request_timeout=0)
    done = BlobFetch(m, lambda h: True)
    assert done.is_complete() and done.requests(0.0) == []
    assert isinstance(done.next_event(), FetchCompleted)
