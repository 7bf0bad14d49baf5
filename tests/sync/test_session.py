"""The per-peer sync session over the in-memory harness (real crypto, real core, moved `now`)."""

from __future__ import annotations

import math
import random
import struct

import cbor2
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcloud._core import Replica
from p2pcloud.sync import (
    EnvelopesReceived,
    EnvelopesWanted,
    MessageDropped,
    Reconciled,
    SessionFailed,
    SnapshotReceived,
    SnapshotWanted,
    SubCloudUnknownToPeer,
    SyncSession,
    fold_point,
)
from p2pcloud.sync import envelope as E
from p2pcloud.sync.catalog import Catalog
from p2pcloud.sync.messages import (
    MAX_BATCH_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_TABLE_ENTRIES,
    PROTOCOL_VERSION,
    Ack,
    Envelopes,
    Reconcile,
    SnapshotChunk,
    Unknown,
    VectorOffer,
    Vectors,
    encode_message,
)
from p2pcloud.sync.reconcile import Range
from p2pcloud.sync.session import ANTI_ENTROPY_INTERVAL, SNAPSHOT_CHUNK_BYTES
from tests.sync.harness import FakeNet, FakeNode


def doc_writer(i: int, size: int = 40):  # type: ignore[no-untyped-def]
    def fn(r: Replica) -> None:
        r.set("docs", f"d{i}", "title", f"document {i}")
        r.set("docs", f"d{i}", "body", "x" * size)

    return fn


def same(*nodes: FakeNode) -> bool:
    scs = nodes[0].replicas.keys()
    return all(
        n.replicas[sc].encode_snapshot() == nodes[0].replicas[sc].encode_snapshot()
        for n in nodes
        for sc in scs
    )


def env_bytes(node: FakeNode, sc: bytes, origin_of: FakeNode | None = None) -> int:
    log = node.logs[sc]
    total = 0
    for origin, spans in log.by_origin.items():
        if origin_of is None or origin == origin_of.replicas[sc].replica_id:
            total += sum(len(raw) for _l, raw in spans.values())
    return total


def pair(seed: int = 1) -> tuple[FakeNet, FakeNode, FakeNode, bytes]:
    net = FakeNet(seed)
    a, b = net.add("a"), net.add("b")
    sc = net.subcloud(a, b)
    return net, a, b, sc


# -- convergence, bytes, round trips -----------------------------------------------------


def test_two_replicas_converge_in_one_round_trip_with_bytes_near_the_difference() -> None:
    net, a, b, sc = pair()
    for i in range(60):
        a.write(sc, doc_writer(i))
    for i in range(25):
        b.write(sc, doc_writer(1000 + i))
    floor = env_bytes(a, sc) + env_bytes(b, sc)
    net.connect(a, b)
    flights = net.run()
    assert same(a, b)
    assert a.replicas[sc].get("docs", "d1000", "title") == "document 1000"
    # both vectors cross, both sides' envelopes cross, then the acknowledgements
    assert flights == 3, net.flight_bytes
    assert net.flight_bytes[-1] < 64  # the trailing flight is only an acknowledgement
    assert net.bytes <= 1.05 * floor + 400, (net.bytes, floor)
    assert a.sessions[b.hashname].in_sync and b.sessions[a.hashname].in_sync
    assert not a.rejected and not b.rejected


def test_one_sided_difference_costs_one_round_trip() -> None:
    net, a, b, sc = pair(2)
    for i in range(10):
        a.write(sc, doc_writer(i))
    net.connect(a, b)
    net.run()
    net.disconnect(a, b)
    for i in range(100):
        a.write(sc, doc_writer(100 + i))
    floor = env_bytes(a, sc) - sum(1 for _ in ())  # every envelope of A
    new_bytes = sum(
        len(raw)
        for first, (_last, raw) in next(iter(a.logs[sc].by_origin.values())).items()
        if first > 20
    )
    assert floor > new_bytes
    net.reset_counters()
    net.connect(a, b)
    net.run()
    assert same(a, b)
    # both vectors cross in the first flight; the envelopes follow in the second
    data_flight = max(range(len(net.flight_bytes)), key=lambda i: net.flight_bytes[i])
    assert data_flight == 1 and len(net.flight_bytes) == 3, net.flight_bytes
    assert net.bytes <= 1.05 * new_bytes + 400, (net.bytes, new_bytes)


def test_idle_peers_exchange_a_few_dozen_bytes() -> None:
    net, a, b, sc = pair(3)
    for i in range(20):
        a.write(sc, doc_writer(i))
    net.connect(a, b)
    net.run()
    net.reset_counters()
    net.advance(ANTI_ENTROPY_INTERVAL + 1)
    assert net.run() == 2
    assert net.bytes <= 80, net.flight_bytes
    assert any(isinstance(e, Reconciled) and e.differing == 0 for e in a.events + b.events)


# -- live push ----------------------------------------------------------------------------


def test_live_push_reaches_a_peer_in_one_flight() -> None:
    net, a, b, sc = pair(4)
    a.write(sc, doc_writer(0))
    net.connect(a, b)
    net.run()
    net.reset_counters()
    a.write(sc, lambda r: r.set("docs", "live", "v", 42))
    net.step()  # one flight: A's push arrives and B merges it
    assert b.replicas[sc].get("docs", "live", "v") == 42
    assert net.run() == 1  # only B's acknowledgement is left
    assert same(a, b)


def test_live_push_before_the_first_run_ends_is_not_lost() -> None:
    net, a, b, sc = pair(5)
    net.connect(a, b)
    a.write(sc, lambda r: r.set("docs", "early", "v", 1))  # before any reconciliation
    b.write(sc, lambda r: r.set("docs", "early", "w", 2))
    net.run()
    assert same(a, b)
    assert b.replicas[sc].get("docs", "early", "v") == 1


def test_live_push_is_forwarded_across_members() -> None:
    net = FakeNet(6)
    a, b, c = net.add("a"), net.add("b"), net.add("c")
    sc = net.subcloud(a, b, c)
    net.connect(a, b)
    net.connect(b, c)  # A and C are not linked: B forwards the envelopes unchanged
    net.run()
    a.write(sc, lambda r: r.set("docs", "relay", "v", "via b"))
    net.step()
    net.step()
    assert c.replicas[sc].get("docs", "relay", "v") == "via b"
    net.run()
    assert same(a, b, c)
    assert c.logs[sc].all_raw() == a.logs[sc].all_raw()  # byte-identical envelopes


def test_an_envelope_past_a_gap_makes_the_receiver_ask_for_the_gap() -> None:
    net, a, b, sc = pair(7)
    net.connect(a, b)
    net.run()
    net.disconnect(a, b)
    first = a.write(sc, doc_writer(1))
    second = a.write(sc, doc_writer(2))
    net.connect(a, b)
    net.run()
    net.disconnect(a, b)
    c = net.add("c")
    c.add_subcloud(sc)
    net.writers[sc].add(c.hashname)
    net.connect(b, c)
    net.run()  # C is in sync with B (and so holds `first` and `second`)
    assert c.replicas[sc].version() == a.replicas[sc].version()
    # a third member D receives `second` before `first` (e.g. a push that raced a restart)
    d = net.add("d")
    d.add_subcloud(sc)
    net.writers[sc].add(d.hashname)
    net.connect(c, d)
    net.run()
    net.disconnect(c, d)
    d.logs[sc] = type(d.logs[sc])()
    d.replicas[sc] = Replica(d.replicas[sc].replica_id)
    d.catalog.set_subcloud(sc)
    net.connect(c, d)
    session = d.sessions[c.hashname]
    session.receive_data(encode_message(Envelopes(sc, 10**6, (second.raw,))), net.now)
    d.handle_events(c.hashname)
    assert d.catalog.has_gap(sc)
    assert d.catalog.counter(sc, second.origin) == 0
    net.run()
    assert not d.catalog.has_gap(sc)
    assert d.catalog.counter(sc, second.origin) == second.last
    assert same(a, d)
    assert first.last + 1 == second.first
    assert a.replicas[sc].version() == d.replicas[sc].version()


# -- flow control and batching -----------------------------------------------------------


def test_flow_control_window_is_respected() -> None:
    net, a, b, sc = pair(8)
    a.window_bytes = b.window_bytes = 4096
    for i in range(300):
        a.write(sc, doc_writer(i, size=120))
    total = env_bytes(a, sc)
    assert total > 20 * 4096
    net.connect(a, b)
    flights = net.run()
    assert same(a, b)
    assert 0 < a.max_in_flight_seen <= 4096
    assert 0 < b.max_unacked_seen <= 4096
    # the backlog needed many windows, hence many round trips
    assert flights >= 2 * (total // 4096)


def test_backlog_streams_in_bounded_batches() -> None:
    net, a, b, sc = pair(9)
    for i in range(1500):
        a.write(sc, doc_writer(i, size=300))
    total = env_bytes(a, sc)
    assert total > 2 * MAX_BATCH_BYTES
    net.connect(a, b)
    net.run()
    assert same(a, b)
    assert len(a.requests) >= total // MAX_BATCH_BYTES
    for budget, given_bytes, count in a.requests:
        assert budget <= MAX_BATCH_BYTES
        assert count == 0 or given_bytes <= budget + 1000  # at most one envelope past it
    assert a.max_in_flight_seen <= a.sessions[b.hashname].window_bytes


def test_progress_counts_down_to_nothing() -> None:
    net, a, b, sc = pair(10)
    a.window_bytes = 8192
    for i in range(200):
        a.write(sc, doc_writer(i, size=100))
    net.connect(a, b)
    net.step()
    net.step()
    net.step()
    pa = a.sessions[b.hashname].progress()
    pb = b.sessions[a.hashname].progress()
    assert pa[sc].send_items > 0 and pa[sc].send_bytes > 0 and pa[sc].in_flight_bytes > 0
    assert pb[sc].receive_items > 0 and pb[sc].receive_bytes > 0
    before = pb[sc].receive_items
    net.step()
    net.step()
    assert b.sessions[a.hashname].progress()[sc].receive_items < before
    net.run()
    assert a.sessions[b.hashname].progress() == {}
    assert b.sessions[a.hashname].progress() == {}


# -- snapshots ----------------------------------------------------------------------------


def test_snapshot_bootstrap_of_a_new_member() -> None:
    net = FakeNet(11)
    a, b = net.add("a"), net.add("b")
    sc = net.subcloud(a, b)
    for i in range(400):
        (a if i % 2 else b).write(sc, doc_writer(i, size=200))
    net.connect(a, b)
    net.run()
    point = fold_point([a.replicas[sc].version(), b.replicas[sc].version()])
    assert point == a.replicas[sc].version()
    a.fold(sc, point)
    b.fold(sc, point)
    assert a.logs[sc].all_raw() == []
    for i in range(30):
        a.write(sc, doc_writer(1000 + i))  # after the checkpoint: stays in the log
    c = net.add("c")
    c.add_subcloud(sc)
    net.writers[sc].add(c.hashname)
    net.connect(a, c)
    net.run()
    assert same(a, c)
    snaps = [e for e in c.events if isinstance(e, SnapshotReceived)]
    assert len(snaps) == 1 and len(snaps[0].snapshot) > SNAPSHOT_CHUNK_BYTES  # chunked
    assert a.sessions[c.hashname].statistics()["snapshots out"] == 1
    # C can now serve the snapshot onward, and keeps syncing live
    c.write(sc, lambda r: r.set("docs", "from c", "v", 1))
    net.connect(b, c)
    net.run()
    assert same(a, b, c)


def test_fold_point_is_the_prefix_every_member_has() -> None:
    r1, r2 = b"1" * 16, b"2" * 16
    assert fold_point([{r1: 5, r2: 3}, {r1: 4}, {r1: 9, r2: 7}]) == {r1: 4}
    assert fold_point([{r1: 5, r2: 3}]) == {r1: 5, r2: 3}
    assert fold_point([]) == {}


# -- sub-clouds and many of them ---------------------------------------------------------


def test_subcloud_the_peer_lacks_is_reported() -> None:
    net, a, b, sc = pair(12)
    only_a = net.subcloud(a)
    a.write(only_a, doc_writer(0))
    net.connect(a, b)
    net.run()
    assert any(isinstance(e, SubCloudUnknownToPeer) and e.subcloud == only_a for e in a.events)
    assert only_a not in b.replicas


def _many(m: int, seed: int) -> tuple[FakeNet, FakeNode, FakeNode, list[bytes]]:
    net = FakeNet(seed)
    a, b = net.add("a"), net.add("b")
    scs = []
    for _ in range(m):
        sc = bytes(net.rng.randbytes(16))
        net.writers[sc] = {a.hashname, b.hashname}  # type: ignore[index]
        for n in (a, b):
            n.add_subcloud(sc)  # type: ignore[arg-type]
        scs.append(sc)
    return net, a, b, scs


def test_10000_idle_subclouds_cost_one_round_trip() -> None:
    net, a, b, _scs = _many(10_000, 13)
    net.connect(a, b)
    assert net.run() == 2
    assert net.bytes <= 80, net.flight_bytes


def test_10_changed_of_10000_subclouds_cost_about_log16_rounds() -> None:
    net, a, b, scs = _many(10_000, 14)
    rng = random.Random(14)
    changed = rng.sample(scs, 10)
    payload = 0
    for i, sc in enumerate(changed):
        env = (a if i % 2 else b).write(sc, doc_writer(i))  # type: ignore[arg-type]
        payload += len(env.raw)
    net.connect(a, b)
    flights = net.run()
    for sc in changed:
        assert a.replicas[sc].encode_snapshot() == b.replicas[sc].encode_snapshot()  # type: ignore[index]
    # G6: at most ceil(log16(M/32)) + 1 round trips, plus the one that moves the envelopes
    bound = math.ceil(math.log(10_000 / 32, 16)) + 1
    assert flights <= 2 * bound + 2, net.flight_bytes
    overhead = net.bytes - payload
    assert overhead <= 10 * 1500, (overhead, net.flight_bytes)


# -- hostile input -------------------------------------------------------------------------


def _session() -> tuple[SyncSession, Catalog]:
    cat = Catalog()
    cat.set_subcloud(bytes(16))  # type: ignore[arg-type]
    s = SyncSession(cat, local="a" * 52, remote="b" * 52, now=0.0)  # type: ignore[arg-type]
    s.data_to_send()
    return s, cat


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _frame(body: bytes) -> bytes:
    return _varint(len(body)) + body


def _drain(s: SyncSession) -> list[object]:
    out = []
    while (ev := s.next_event()) is not None:
        out.append(ev)
    return out


def test_malformed_messages_are_dropped_and_counted() -> None:
    s, _cat = _session()
    sc = bytes(16)
    bad = [
        b"\xff\xff",
        cbor2.dumps([3, 1, False, [], b""]),  # a protocol version we do not speak
        cbor2.dumps({"v": 1, "t": 1, "p": False, "r": []}),  # version 1's map, v2 framing
        cbor2.dumps([2, 99]),
        cbor2.dumps([2, 1, False, [40, b"", 0, b""], b""]),  # depth out of range
        cbor2.dumps([2, 1, False, [1, b"\x01", 0], b""]),  # a truncated range
        cbor2.dumps([2, 2, [], [sc, [5], True, 0]]),  # a truncated version vector
        cbor2.dumps([2, 2, [], [7, [], True, 0]]),  # a sub-cloud index never defined
        cbor2.dumps([2, 2, [], [sc, [-1, 0], True, 0]]),  # a zero counter
        cbor2.dumps([2, 2, [], [sc, [sc, 1, sc, 2], True, 0]]),  # an origin twice
        cbor2.dumps([2, 2, [], [sc, [-3, 1], True, 0]]),  # no such replica tag
        cbor2.dumps([2, 4, [77]]),  # an ack for a batch not in flight
        cbor2.dumps([2, 5, [], sc, 1, 5, 3, [], b"x"]),  # a chunk past the snapshot's end
        cbor2.dumps([2, 3, [b"short"], sc, 1, []]),  # a defined id of 5 bytes
        cbor2.dumps([2, 6, [bytes([i % 256]) * 16 for i in range(MAX_TABLE_ENTRIES + 1)], []]),
        cbor2.dumps([1, 2]),
    ]
    for body in bad:
        s.receive_data(_frame(body), 1.0)
    events = _drain(s)
    assert sum(isinstance(e, MessageDropped) for e in events) == len(bad)
    assert s.statistics()["messages dropped"] == len(bad)
    assert not s.failed


def test_a_version_1_peer_fails_the_session_cleanly() -> None:
    # version 1 framed a CBOR map with a 4-byte big-endian length: its first byte is 0
    s, _cat = _session()
    body = cbor2.dumps({"v": 1, "t": 4, "b": []})
    s.receive_data(struct.pack(">I", len(body)) + body, 1.0)
    failed = [e for e in _drain(s) if isinstance(e, SessionFailed)]
    assert s.failed and len(failed) == 1
    assert f"not sync protocol {PROTOCOL_VERSION}" in failed[0].reason


def test_a_length_prefix_longer_than_four_bytes_fails_the_session() -> None:
    s, _cat = _session()
    s.receive_data(b"\x80\x80\x80", 1.0)  # an incomplete prefix waits for more bytes
    assert not s.failed
    s.receive_data(b"\x80\x01", 1.0)
    assert s.failed


def test_a_broken_frame_fails_the_session_without_raising() -> None:
    s, _cat = _session()
    s.receive_data(_varint(MAX_MESSAGE_BYTES + 1), 1.0)
    assert s.failed
    assert any(isinstance(e, SessionFailed) for e in _drain(s))
    s.receive_data(b"more", 2.0)  # still never raises
    assert s.statistics()["dropped after failure"] == 1


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=120), max_size=8))
def test_random_frames_never_raise(bodies: list[bytes]) -> None:
    s, _cat = _session()
    for body in bodies:
        s.receive_data(_frame(body), 1.0)
    _drain(s)


@settings(max_examples=100)
@given(st.binary(max_size=400))
def test_random_stream_never_raises(data: bytes) -> None:
    s, _cat = _session()
    s.receive_data(data, 1.0)
    _drain(s)


def test_envelopes_from_a_non_writer_or_forged_are_rejected_and_not_applied() -> None:
    net = FakeNet(15)
    a, b, mallory = net.add("a"), net.add("b"), net.add("mallory")
    sc = net.subcloud(a, b, mallory, writers=(a, b))
    net.connect(a, mallory)
    net.connect(b, mallory)
    net.run()
    mallory.write(sc, lambda r: r.set("docs", "d", "owned", True))
    net.run()
    assert a.rejected[E.REJECT_NO_WRITE_RIGHTS] >= 1
    assert a.replicas[sc].get("docs", "d", "owned") is None
    assert a.logs[sc].all_raw() == []
    # a tampered envelope of a real writer, injected straight into the stream
    good = b.write(sc, lambda r: r.set("docs", "d", "v", "good"))
    net.run()
    assert a.replicas[sc].get("docs", "d", "v") == "good"
    obj = cbor2.loads(good.raw)
    obj["g"] = bytes(64)
    tampered = cbor2.dumps(obj)
    session = a.sessions[mallory.hashname]
    session.receive_data(encode_message(Envelopes(sc, 999, (tampered, b"\x00junk"))), net.now)
    a.handle_events(mallory.hashname)
    assert a.rejected[E.REJECT_BAD_SIGNATURE] == 1
    assert a.rejected[E.REJECT_MALFORMED] == 1
    assert a.replicas[sc].get("docs", "d", "v") == "good"


def test_a_peer_reconciles_only_the_subclouds_it_may_hold() -> None:
    net = FakeNet(16)
    box, phone = net.add("box"), net.add("phone")
    kept = [net.subcloud(box, phone) for _ in range(3)]
    others = [net.subcloud(box) for _ in range(60)]
    for i, sc in enumerate(kept + others):
        box.write(sc, doc_writer(i))
    box.shares[phone.hashname] = lambda sc: sc in kept
    net.connect(box, phone)
    net.run()
    assert all(
        phone.replicas[sc].encode_snapshot() == box.replicas[sc].encode_snapshot() for sc in kept
    )
    assert not any(isinstance(e, SubCloudUnknownToPeer) for e in box.events + phone.events)
    # a write to a sub-cloud the phone does not keep changes nothing between them
    box.write(others[0], doc_writer(999))
    net.reset_counters()
    net.advance(ANTI_ENTROPY_INTERVAL + 1)
    assert net.run() == 2 and net.bytes <= 80, net.flight_bytes
    # a write to a kept one is pushed at once
    box.write(kept[0], lambda r: r.set("docs", "kept", "v", 1))
    net.step()
    assert phone.replicas[kept[0]].get("docs", "kept", "v") == 1
    # the phone starts keeping one more: the box re-evaluates and syncs it
    phone.add_subcloud(others[1])
    kept.append(others[1])
    box.sessions[phone.hashname].rebuild_shares(net.now)
    net.run()
    assert phone.replicas[others[1]].encode_snapshot() == box.replicas[others[1]].encode_snapshot()


def test_a_log_folded_past_the_catalog_floor_still_bootstraps_by_snapshot() -> None:
    net = FakeNet(17)
    a, b = net.add("a"), net.add("b")
    sc = net.subcloud(a, b)
    for i in range(20):
        a.write(sc, doc_writer(i))
    net.connect(a, b)
    net.run()
    a.fold(sc, a.replicas[sc].version())
    a.catalog.set_subcloud(sc, a.replicas[sc].version(), {})  # the floor went unreported
    c = net.add("c")
    c.add_subcloud(sc)
    net.writers[sc].add(c.hashname)
    net.connect(a, c)
    net.run()
    assert same(a, c)
    assert any(isinstance(e, SnapshotReceived) for e in c.events)


_IDS = st.sampled_from([bytes(16), b"\x01" * 16])
_VERSIONS = st.dictionaries(
    st.binary(min_size=4, max_size=40), st.integers(0, (1 << 63) + 1), max_size=3
)
_RANGES = st.builds(
    lambda depth, mode, payload: Range(depth, bytes((depth + 1) // 2), mode, payload),
    st.integers(0, 32),
    st.integers(0, 5),
    st.binary(max_size=40),
)
_MESSAGES = st.one_of(
    st.builds(Reconcile, st.booleans(), st.lists(_RANGES, max_size=4).map(tuple)),
    st.builds(
        Vectors,
        st.lists(
            st.builds(VectorOffer, _IDS, _VERSIONS, st.booleans(), st.integers(0, 9)),
            max_size=3,
        ).map(tuple),
    ),
    st.builds(
        Envelopes,
        _IDS,
        st.integers(0, 5),
        st.lists(st.binary(min_size=1, max_size=60), max_size=3).map(tuple),
    ),
    st.builds(Ack, st.lists(st.integers(0, 5), max_size=3).map(tuple)),
    st.builds(
        SnapshotChunk,
        _IDS,
        st.integers(0, 5),
        st.integers(0, 3),
        st.just(4),
        _VERSIONS,
        st.binary(min_size=1, max_size=1),
    ),
    st.builds(Unknown, st.lists(_IDS, max_size=2).map(tuple)),
)


@settings(max_examples=200)
@given(st.lists(_MESSAGES, max_size=6))
def test_well_framed_hostile_messages_never_raise(messages: list[object]) -> None:
    s, cat = _session()
    for msg in messages:
        s.receive_data(encode_message(msg), 1.0)  # type: ignore[arg-type]
        for ev in _drain(s):
            # a shell acknowledging whatever arrived must not break the session either
            if isinstance(ev, (EnvelopesReceived, SnapshotReceived)):
                s.acknowledge(ev.batch, 1.0)
            elif isinstance(ev, EnvelopesWanted):
                s.provide_envelopes(ev.subcloud, ev.origin, ev.after, [], 1.0)
            elif isinstance(ev, SnapshotWanted):
                s.provide_snapshot(ev.subcloud, b"", {}, 1.0)
    assert s.statistics().get("messages in", 0) == len(messages)


def test_a_peer_listing_an_earlier_version_gets_the_difference_without_a_vector_round() -> None:
    net = FakeNet(11)
    a, b = net.add("a"), net.add("b")
    scs = [net.subcloud(a, b) for _ in range(60)]  # enough that ranges list item hashes
    for i, sc in enumerate(scs):
        (a if i % 2 else b).write(sc, doc_writer(i))
    net.connect(a, b)
    net.run()
    assert same(a, b)
    net.disconnect(a, b)
    changed = scs[:8]
    fresh = 0
    for i, sc in enumerate(changed):
        writer = a if i % 2 else b
        for k in range(1 + i % 3):  # one to three transactions behind
            writer.write(sc, doc_writer(100 * i + k))
            fresh += 1
    net.reset_counters()
    net.connect(a, b)
    net.run()
    assert same(a, b)
    sa, sb = a.sessions[b.hashname], b.sessions[a.hashname]
    inferred = sa.statistics().get("peer versions inferred", 0) + sb.statistics().get(
        "peer versions inferred", 0
    )
    assert inferred >= 1, (sa.statistics(), sb.statistics())
    # the inferred versions were exact: every new envelope crossed exactly once
    sent = sa.statistics().get("envelopes out", 0) + sb.statistics().get("envelopes out", 0)
    assert sent == fresh, (sent, fresh)
    assert sa.in_sync and sb.in_sync


def test_a_range_fingerprint_of_an_earlier_version_also_tells_the_peers_version() -> None:
    # 200 sub-clouds, one changed on b: a's split fingerprints match b's set with that one
    # sub-cloud at its earlier version, so b sends the envelope before any vector arrives
    net = FakeNet(11)
    a, b = net.add("a"), net.add("b")
    scs = [net.subcloud(a, b) for _ in range(200)]
    for i, sc in enumerate(scs):
        (a if i % 2 else b).write(sc, doc_writer(i))
    net.connect(a, b)
    net.run()
    net.disconnect(a, b)
    b.write(scs[0], doc_writer(1000))
    net.reset_counters()
    net.connect(a, b)
    net.run()
    assert same(a, b)
    sa, sb = a.sessions[b.hashname], b.sessions[a.hashname]
    assert sb.statistics().get("peer versions inferred from fingerprints") == 1
    assert sb.statistics()["envelopes out"] == 1 and "envelopes out" not in sa.statistics()
    assert sa.in_sync and sb.in_sync
