"""The per-peer sync session: one sans-I/O state machine per linked pair (docs/sync.md).

Theory of operation
-------------------
A :class:`SyncSession` owns everything that happens on the one reliable ``sync`` channel
between this endpoint and one peer. It does no I/O, reads no clock (``now`` comes in) and
never reads the store: it reads the in-memory :class:`~p2pcloud.sync.catalog.Catalog` the
shell keeps up to date, and asks the shell for stored bytes through events. The channel is
reliable and ordered, so the session sees a byte stream: ``receive_data`` in,
``data_to_send`` out (framing in messages.py). The shell's loop is::

    session.receive_data(chunk, now)              # or handle_timer(now) / push(...)
    while (ev := session.next_event()) is not None:
        EnvelopesWanted   -> session.provide_envelopes(sc, origin, after, envs, now)
        SnapshotWanted    -> session.provide_snapshot(sc, snapshot, version, now)
        EnvelopesReceived -> open_envelope + store + Replica.apply + catalog.record,
                             push the new envelopes to the *other* sessions,
                             then session.acknowledge(ev.batch, now)
        SnapshotReceived  -> load/apply + catalog.set_subcloud, then acknowledge
    send(session.data_to_send())

The protocol, in the order a new session runs it:

1. *Which sub-clouds differ* (reconcile.py): the initiator (the lower hashname) sends one
   fingerprint over all (sub-cloud id, version digest) items; the peer answers; the
   exchange recurses into mismatched ranges only, as one ping-pong chain of messages, and
   ends when one side's answer is empty. Idle peers: one round trip of a few dozen bytes.
2. *Per differing sub-cloud*: each side that finds one sends its version vector
   (``Vectors``, batched, ``reply`` asks for the other's). A side that learns the peer's
   vector streams what the peer lacks: per origin, the envelopes after the peer's counter,
   fetched from the shell in batches of at most ``MAX_BATCH_BYTES``. One round trip, bytes
   proportional to the difference (crdt-anchors.md section 1, the VV-delta floor). A side
   that recognises, in the peer's item hashes or range fingerprints, one of its own
   earlier versions of a differing sub-cloud (the catalog keeps a few) knows the peer's
   version without its vector and streams at once: that round trip is saved.
   Vectors are compact (messages.py, protocol version 2): ids are defined once per
   session and then named by index, and the two endpoints' own replicas by 1-byte tags.
3. *Snapshots*: if the peer's counter for an origin is below our fold floor (those
   envelopes were folded into the checkpoint), the checkpoint goes first, in chunks, then
   the envelopes after it.
4. *Live push*: once a sub-cloud's peer version is known (or assumed after a run found it
   equal), envelopes the shell stores are pushed at once if they extend what the peer has.
   A receiver that stores an envelope past a gap offers its vector, which re-syncs.
5. *Flow control*: at most ``window_bytes`` of unacknowledged envelopes and snapshot chunks
   per peer; the receiver acknowledges a batch only after the shell stored it.
6. *Anti-entropy*: the initiator re-runs step 1 every ``ANTI_ENTROPY_INTERVAL`` seconds,
   which repairs anything a lost session left behind.

Bad input from the peer never raises: a malformed message is dropped and counted
(:meth:`statistics`) and reported (:class:`MessageDropped`); a broken frame length ends the
session (:class:`SessionFailed`; the shell closes the channel).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from p2pcloud._ids import Hashname, SubCloudId
from p2pcloud.errors import CoreError, DeltaRejected, LocalProtocolError, MalformedPacket
from p2pcloud.sync.catalog import Catalog
from p2pcloud.sync.envelope import Envelope, decode_envelope
from p2pcloud.sync.messages import (
    MAX_BATCH_BYTES,
    MAX_BATCHES_PER_ACK,
    MAX_BYTES_PER_DOT,
    MAX_SNAPSHOT_BYTES,
    MAX_VECTORS_PER_MESSAGE,
    Ack,
    Envelopes,
    FramingError,
    IdTable,
    Message,
    Reconcile,
    SnapshotChunk,
    Unknown,
    VectorOffer,
    Vectors,
    decode_message,
    encode_message,
    split_frames,
)
from p2pcloud.sync.reconcile import (
    DIRECT_THRESHOLD,
    ITEM_HASH_SIZE,
    ITEM_THRESHOLD,
    MODE_FP,
    MODE_ITEMS,
    MODE_OFFERED,
    MODE_SPLIT,
    Range,
    RangeError,
    ReconcileSet,
    initial_ranges,
    item_hash,
    respond,
)
from p2pcloud.sync.reconcile import _fingerprint as range_fingerprint  # inference: same
from p2pcloud.sync.reconcile import _short as short_item_hash  # hashes as the peer's

__all__ = [
    "ANTI_ENTROPY_INTERVAL",
    "DEFAULT_WINDOW_BYTES",
    "MAX_WINDOW_BYTES",
    "SNAPSHOT_CHUNK_BYTES",
    "EnvelopesReceived",
    "EnvelopesWanted",
    "MessageDropped",
    "PeerVersionLearned",
    "Progress",
    "Reconciled",
    "SessionFailed",
    "SnapshotReceived",
    "SnapshotWanted",
    "SubCloudUnknownToPeer",
    "SyncEvent",
    "SyncSession",
]

DEFAULT_WINDOW_BYTES: Final = 1024 * 1024
"""Unacknowledged envelope bytes in flight per peer: a few round trips of a home uplink
(1 MiB at 10 Mbit/s is 0.8 s), small enough that a slow disk on the receiver pushes back."""
MAX_WINDOW_BYTES: Final = 16 * 1024 * 1024
"""What a receiver holds unacknowledged before it calls the sender abusive and drops data."""
SNAPSHOT_CHUNK_BYTES: Final = 64 * 1024  # one chunk per message: fits any window, amortises CBOR
MAX_INFERENCE_CHECKS: Final = 4096
"""Earlier versions tried against the peer's fingerprints per Reconcile message: a reply
holds at most a few hundred mismatched ranges of <= ITEM_THRESHOLD items, and each check
is one SHA-256; past the bound the session simply waits for the peer's vector."""
ANTI_ENTROPY_INTERVAL: Final = 60.0
"""Seconds between reconciliation runs on a live session: the fallback that repairs what
a gap or a lost message left behind; an idle run costs about 60 bytes."""


# -- events -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EnvelopesWanted:
    """The session wants stored envelopes: answer with :meth:`SyncSession.provide_envelopes`.

    Give the envelopes of ``origin`` in ``subcloud`` whose counters follow ``after``, in
    counter order, at most ``budget_bytes`` in total (always at least one if any exist).
    """

    subcloud: SubCloudId
    origin: bytes
    after: int
    budget_bytes: int


@dataclass(frozen=True, slots=True)
class SnapshotWanted:
    """The peer is below our fold floor: answer with :meth:`SyncSession.provide_snapshot`."""

    subcloud: SubCloudId


@dataclass(frozen=True, slots=True)
class EnvelopesReceived:
    """Envelopes arrived: verify, store and merge them, then ``acknowledge(batch)``."""

    subcloud: SubCloudId
    batch: int
    envelopes: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class SnapshotReceived:
    """A whole snapshot checkpoint arrived: load it, then ``acknowledge(batch)``."""

    subcloud: SubCloudId
    batch: int
    snapshot: bytes
    version: dict[bytes, int]


@dataclass(frozen=True, slots=True)
class PeerVersionLearned:
    """The peer told its version of a sub-cloud (input to :func:`catalog.fold_point`)."""

    subcloud: SubCloudId
    version: dict[bytes, int]


@dataclass(frozen=True, slots=True)
class SubCloudUnknownToPeer:
    """The peer does not replicate a sub-cloud we offered."""

    subcloud: SubCloudId


@dataclass(frozen=True, slots=True)
class Reconciled:
    """A reconciliation run ended; ``differing`` sub-clouds were found on our side."""

    differing: int


@dataclass(frozen=True, slots=True)
class MessageDropped:
    """A message from the peer was malformed or broke the protocol and was ignored."""

    reason: str


@dataclass(frozen=True, slots=True)
class SessionFailed:
    """The stream from the peer is broken beyond repair; close the channel."""

    reason: str


SyncEvent = (
    EnvelopesWanted
    | SnapshotWanted
    | EnvelopesReceived
    | SnapshotReceived
    | PeerVersionLearned
    | SubCloudUnknownToPeer
    | Reconciled
    | MessageDropped
    | SessionFailed
)


@dataclass(frozen=True, slots=True)
class Progress:
    """What is still to move for one sub-cloud with one peer (progress bars).

    Items are dots (one per written value); bytes are estimates from the log's average
    envelope size, except ``in_flight_bytes`` which is exact.
    """

    send_items: int
    send_bytes: int
    in_flight_bytes: int
    receive_items: int
    receive_bytes: int


# -- per sub-cloud state ----------------------------------------------------------------


@dataclass(slots=True)
class _Peer:
    remote: dict[bytes, int] | None = None  # what the peer has or has been sent
    peer_version: dict[bytes, int] | None = None  # what it last said it has
    peer_bpd: float = 0.0
    awaiting: bool = False  # our vector (reply wanted) is on its way
    stalled: set[bytes] = field(default_factory=set)  # origins the store could not serve
    snapshot_asked: bool = False


@dataclass(slots=True)
class _Batch:
    subcloud: SubCloudId
    size: int
    spans: list[tuple[bytes, int, int]]


@dataclass(slots=True)
class _SnapOut:
    subcloud: SubCloudId
    data: bytes
    version: dict[bytes, int]
    offset: int = 0


@dataclass(slots=True)
class _SnapIn:
    total: int
    version: dict[bytes, int]
    buf: bytearray


class SyncSession:
    """All sync state for one peer; see the module docstring for the protocol."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        local: Hashname,
        remote: Hashname,
        now: float,
        initiator: bool | None = None,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        shares: Callable[[SubCloudId], bool] | None = None,
    ) -> None:
        """Start a session on a freshly opened ``sync`` channel.

        Args:
            catalog: this endpoint's catalog (shared by all sessions of the node).
            local: our hashname.
            remote: the peer's hashname.
            now: the current time in seconds.
            initiator: whether we run reconciliation; default: the lower hashname does.
            window_bytes: unacknowledged bytes we allow in flight to this peer.
            shares: whether the peer may replicate a sub-cloud (default: all of ours).

        Raises:
            LocalProtocolError: a window outside 1..MAX_WINDOW_BYTES.
        """
        if not 0 < window_bytes <= MAX_WINDOW_BYTES:
            raise LocalProtocolError(f"window must be 1..{MAX_WINDOW_BYTES} bytes")
        self.catalog = catalog
        self.local = local
        self.remote = remote
        self.initiator = local < remote if initiator is None else initiator
        self.window_bytes = window_bytes
        self._shares = shares
        # the items this peer reconciles: all of ours, or a live view of what it may hold
        self._view = catalog.view(shares) if shares is not None else None
        self._out = bytearray()
        self._rx = bytearray()
        # per-session id dictionaries and replica tags (messages.py): must exist before
        # the first message below is encoded
        self._ids = IdTable(local, remote)
        self._events: deque[SyncEvent] = deque()
        self._stats: Counter[str] = Counter()
        self._failed = False
        self._subs: dict[SubCloudId, _Peer] = {}
        self._work: dict[SubCloudId, None] = {}  # sub-clouds that may have data to send
        self._request: tuple[SubCloudId, bytes, int] | None = None  # the store request out
        self._snap_request: SubCloudId | None = None
        self._snap_out: _SnapOut | None = None
        self._snap_in: dict[SubCloudId, _SnapIn] = {}
        self._next_batch = 1
        self._inflight: dict[int, _Batch] = {}
        self._inflight_bytes = 0
        self._window_blocked = False  # the next envelope does not fit the window
        self._rx_unacked: dict[int, tuple[SubCloudId, int]] = {}
        self._rx_unacked_bytes = 0
        self._offers: dict[SubCloudId, VectorOffer] = {}
        self._acks: list[int] = []
        self._unknown: list[SubCloudId] = []
        self._run_active = False
        self._run_started = now
        self._run_found: set[SubCloudId] = set()
        self._reconciled = False  # a run has completed: unchanged sub-clouds are in sync
        self._next_run: float | None = None
        if self.initiator:
            self._start_run(now)
        elif len(self._reconcile_set()) <= DIRECT_THRESHOLD:
            # DESIGN.md section 5: "each side sends its version vector; each then sends
            # the deltas the other lacks": with a few sub-clouds both sides offer at once,
            # so the data flows after one round trip whoever lacks it
            for sc in self.catalog.subclouds():
                if self._may_share(sc):
                    self._offer(sc, reply=True)
        self._flush()

    # -- the shell's side -----------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes to write to the ``sync`` channel now (empties the buffer).

        Acknowledgements wait here, so every batch the shell stored since the last call
        travels in one ``Ack`` message.
        """
        if not self._failed:
            for i in range(0, len(self._acks), MAX_BATCHES_PER_ACK):
                self._send(Ack(tuple(self._acks[i : i + MAX_BATCHES_PER_ACK])))
        self._acks.clear()
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> SyncEvent | None:
        """The next event for the shell, or None."""
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must run next (the next anti-entropy run), or None."""
        return None if self._failed else self._next_run

    def handle_timer(self, now: float) -> None:
        """Run what is due: start an anti-entropy reconciliation if its time has come.

        Args:
            now: the current time in seconds.
        """
        if self._next_run is not None and now >= self._next_run and not self._failed:
            self._start_run(now)
            self._flush()

    def rebuild_shares(self, now: float) -> None:
        """Re-evaluate the ``shares`` predicate (grants changed) and reconcile again.

        Args:
            now: the current time in seconds.
        """
        if self._view is not None:
            self._view.rebuild()
        self.start_reconciliation(now)

    def start_reconciliation(self, now: float) -> None:
        """Run reconciliation now (e.g. after the shell restored many sub-clouds).

        Args:
            now: the current time in seconds.
        """
        if not self._failed:
            self._start_run(now)
            self._flush()

    @property
    def in_flight_bytes(self) -> int:
        """Envelope and snapshot bytes sent to the peer and not yet acknowledged."""
        return self._inflight_bytes

    @property
    def unacknowledged_bytes(self) -> int:
        """Bytes received from the peer that the shell has not acknowledged yet."""
        return self._rx_unacked_bytes

    @property
    def failed(self) -> bool:
        """Whether the session broke (the shell should close the channel)."""
        return self._failed

    @property
    def in_sync(self) -> bool:
        """Whether a run has completed and nothing is queued, in flight or awaited."""
        return (
            self._reconciled
            and not self._run_active
            and not self._inflight
            and not self._rx_unacked
            and self._request is None
            and self._snap_out is None
            and not any(p.awaiting for p in self._subs.values())
            and all(not any(self._send_items(sc, p)) for sc, p in self._subs.items())
        )

    def statistics(self) -> dict[str, int]:
        """Counters: messages and bytes each way, envelopes, drops by reason."""
        return dict(self._stats)

    def progress(self) -> dict[SubCloudId, Progress]:
        """Items and bytes still to send and to receive, per sub-cloud with work left.

        Returns:
            sub-cloud id -> :class:`Progress`; sub-clouds in sync are left out.
        """
        out: dict[SubCloudId, Progress] = {}
        inflight: Counter[SubCloudId] = Counter()
        for b in self._inflight.values():
            inflight[b.subcloud] += b.size
        for sc, p in self._subs.items():
            send = sum(self._send_items(sc, p))
            recv = 0
            if p.peer_version is not None:
                for origin, c in p.peer_version.items():
                    recv += max(0, c - self.catalog.counter(sc, origin))
            if send or recv or inflight[sc]:
                out[sc] = Progress(
                    send,
                    int(send * self.catalog.bytes_per_dot(sc)),
                    inflight[sc],
                    recv,
                    int(recv * p.peer_bpd),
                )
        return out

    def _send_items(self, sc: SubCloudId, p: _Peer) -> list[int]:
        if p.remote is None:
            return []
        remote = p.remote
        version = self.catalog.version(sc)
        return [c - remote.get(o, 0) for o, c in version.items() if c > remote.get(o, 0)]

    # -- local inputs ---------------------------------------------------------------------

    def provide_envelopes(
        self,
        subcloud: SubCloudId,
        origin: bytes,
        after: int,
        envelopes: Sequence[bytes],
        now: float,
    ) -> None:
        """Answer an :class:`EnvelopesWanted` with stored envelopes.

        Args:
            subcloud: as in the request.
            origin: as in the request.
            after: as in the request.
            envelopes: the raw envelopes of ``origin`` after ``after`` in counter order
                (empty if the store has none: the session stops asking for that origin).
            now: the current time in seconds.

        Raises:
            LocalProtocolError: no such request is outstanding.
        """
        if self._request != (subcloud, origin, after):
            raise LocalProtocolError("provide_envelopes() without a matching EnvelopesWanted")
        self._request = None
        p = self._subs.get(subcloud)
        if p is None or p.remote is None or self._failed:
            self._pump()
            self._flush()
            return
        have = p.remote.get(origin, 0)
        if have != after:  # a vector arrived meanwhile: the request is stale, ask again
            self._work[subcloud] = None
            self._pump()
            self._flush()
            return
        batch: list[bytes] = []
        spans: list[tuple[bytes, int, int]] = []
        size = 0
        room = max(0, self.window_bytes - self._inflight_bytes)
        window_full = False
        for raw in envelopes:
            try:
                env = decode_envelope(raw)
            except DeltaRejected:
                self._stats["local envelope unreadable"] += 1
                continue
            if env.origin != origin or env.last <= have:
                continue
            if env.first > have + 1:
                break  # a hole in our log: send what is contiguous
            if size + len(raw) > room and (batch or self._inflight_bytes):
                window_full = True
                break  # the window decides; the rest waits for acknowledgements
            if batch and size + len(raw) > MAX_BATCH_BYTES:
                break
            batch.append(env.raw)
            spans.append((origin, env.first, env.last))
            size += len(raw)
            have = env.last
        if window_full and not batch:
            self._window_blocked = True  # ask again when an acknowledgement frees room
        if not batch and not window_full:
            self._stats["store had nothing to send"] += 1
            if not p.snapshot_asked and self._snap_request is None:
                # the log lacks what the peer needs (folded past what the catalog's floor
                # says): the checkpoint may hold it
                p.snapshot_asked = True
                self._snap_request = subcloud
                self._events.append(SnapshotWanted(subcloud))
                self._flush()
                return
            p.stalled.add(origin)
        elif batch:
            p.remote[origin] = have
            self._send_batch(subcloud, batch, spans, size)
        self._work[subcloud] = None
        self._pump()
        self._flush()

    def provide_snapshot(
        self, subcloud: SubCloudId, snapshot: bytes, version: Mapping[bytes, int], now: float
    ) -> None:
        """Answer a :class:`SnapshotWanted` with the stored checkpoint.

        Args:
            subcloud: as in the request.
            snapshot: the checkpoint (``Replica.encode_snapshot()`` of the folded state);
                empty if there is none (the session then stops for this sub-cloud).
            version: the checkpoint's version vector (the fold floor).
            now: the current time in seconds.

        Raises:
            LocalProtocolError: no such request is outstanding, or the snapshot is too big.
        """
        if self._snap_request != subcloud:
            raise LocalProtocolError("provide_snapshot() without a matching SnapshotWanted")
        self._snap_request = None
        if len(snapshot) > MAX_SNAPSHOT_BYTES:
            raise LocalProtocolError(f"snapshot larger than {MAX_SNAPSHOT_BYTES} bytes")
        p = self._subs.get(subcloud)
        if p is None or p.remote is None or self._failed:
            self._pump()
            self._flush()
            return
        if not snapshot:
            p.stalled.update(self.catalog.version(subcloud))
            self._stats["store had no snapshot"] += 1
        else:
            self._snap_out = _SnapOut(subcloud, bytes(snapshot), dict(version))
            for origin, c in version.items():
                if c > p.remote.get(origin, 0):
                    p.remote[origin] = c
        self._work[subcloud] = None
        self._pump()
        self._flush()

    def acknowledge(self, batch: int, now: float) -> None:
        """Tell the peer that a received batch (or snapshot) is stored.

        Args:
            batch: the ``batch`` of the :class:`EnvelopesReceived` / :class:`SnapshotReceived`.
            now: the current time in seconds.

        Raises:
            LocalProtocolError: the batch is not awaiting acknowledgement.
        """
        entry = self._rx_unacked.pop(batch, None)
        if entry is None:
            raise LocalProtocolError(f"batch {batch} is not awaiting acknowledgement")
        subcloud, size = entry
        self._rx_unacked_bytes -= size
        if self._failed:
            return
        self._acks.append(batch)
        if self.catalog.has_gap(subcloud):
            # an envelope arrived past a gap (a push raced anti-entropy): ask for the gap
            self._offer(subcloud, reply=True)
        self._work[subcloud] = None  # what we just stored may go on to this peer's gaps
        self._pump()
        self._flush()

    def push(self, subcloud: SubCloudId, envelopes: Sequence[Envelope], now: float) -> None:
        """Live push: the shell stored these envelopes (written here or received elsewhere).

        Call it after :meth:`Catalog.record`, on every session but the one they came from.
        Envelopes the peer can take now (it has everything before them and the window has
        room) go out at once; the rest are left to the pull path.

        Args:
            subcloud: their sub-cloud.
            envelopes: verified envelopes, in counter order per origin.
            now: the current time in seconds.
        """
        if self._failed or subcloud not in self.catalog or not self._may_share(subcloud):
            return
        p = self._subs.get(subcloud)
        if p is None:
            p = self._subs[subcloud] = _Peer()
            if self._reconciled:
                # a run found this sub-cloud equal and every change since came through
                # push(): the peer has our version minus what is being pushed now
                remote = self.catalog.version(subcloud)
                for env in envelopes:
                    remote[env.origin] = min(remote.get(env.origin, 0), env.first - 1)
                p.remote = remote
            else:
                self._offer(subcloud, reply=True)
        if p.remote is not None and self._snap_out is None:
            batch: list[bytes] = []
            spans: list[tuple[bytes, int, int]] = []
            size = 0
            for env in envelopes:
                have = p.remote.get(env.origin, 0)
                if env.first > have + 1 or env.last <= have:
                    continue
                if self._inflight_bytes + size + len(env.raw) > self.window_bytes and (
                    batch or self._inflight_bytes
                ):
                    break
                if size + len(env.raw) > MAX_BATCH_BYTES and batch:
                    break
                batch.append(env.raw)
                spans.append((env.origin, env.first, env.last))
                size += len(env.raw)
                p.remote[env.origin] = env.last
            if batch:
                self._stats["envelopes pushed"] += len(batch)
                self._send_batch(subcloud, batch, spans, size)
        self._work[subcloud] = None
        self._pump()
        self._flush()

    # -- the peer's side ------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        """Feed bytes read from the ``sync`` channel. Never raises on bad input.

        Args:
            data: any chunk of the stream.
            now: the current time in seconds.
        """
        if self._failed:
            self._stats["dropped after failure"] += 1
            return
        self._stats["bytes in"] += len(data)
        self._rx += data
        try:
            frames = split_frames(self._rx)
        except FramingError as exc:
            self._fail(str(exc))
            return
        for body in frames:
            self._stats["messages in"] += 1
            try:
                msg = decode_message(body, self._ids)
                self._handle(msg, now)
            except (MalformedPacket, RangeError, CoreError) as exc:
                self._drop(f"{type(exc).__name__}: {exc}")
        self._pump()
        self._flush()

    def _handle(self, msg: Message, now: float) -> None:
        if isinstance(msg, Reconcile):
            self._on_reconcile(msg, now)
        elif isinstance(msg, Vectors):
            for offer in msg.offers:
                self._on_offer(offer)
        elif isinstance(msg, Envelopes):
            self._on_envelopes(msg)
        elif isinstance(msg, Ack):
            for b in msg.batches:
                batch = self._inflight.pop(b, None)
                if batch is None:
                    self._drop("ack for a batch not in flight")
                    continue
                self._inflight_bytes -= batch.size
                self._window_blocked = False
                self._work[batch.subcloud] = None
        elif isinstance(msg, SnapshotChunk):
            self._on_snapshot_chunk(msg)
        else:
            for sc in msg.subclouds:
                p = self._subs.pop(sc, None)
                if p is not None:
                    self._events.append(SubCloudUnknownToPeer(sc))

    def _on_reconcile(self, msg: Reconcile, now: float) -> None:
        if not msg.reply and self._reconciled:
            self._forget_awaiting()  # a new run supersedes offers of the last one
        reply, differ = respond(self._reconcile_set(), msg.ranges)
        self._infer_from_fingerprints(msg)
        listed = self._listed_items(msg)
        for sc in differ:
            sid = SubCloudId(sc)
            if self._may_share(sid):
                self._run_found.add(sid)
                self._offer(sid, reply=True)
                if listed:
                    self._infer_peer_version(sid, listed)
        if msg.ranges:
            self._send(Reconcile(True, tuple(reply)))
            if not reply:
                self._end_run(now)
        else:
            self._end_run(now)

    @staticmethod
    def _listed_items(msg: Reconcile) -> tuple[bytes, set[bytes]] | None:
        """The salt and the salted item hashes the peer listed as its own (ITEMS, OFFERED)."""
        listed: set[bytes] = set()
        salt = b""
        for rng in msg.ranges:
            if rng.mode in (MODE_ITEMS, MODE_OFFERED):
                salt = rng.salt
                p = rng.payload
                listed.update(p[i : i + ITEM_HASH_SIZE] for i in range(0, len(p), ITEM_HASH_SIZE))
        return (salt, listed) if listed else None

    def _infer_peer_version(self, sc: SubCloudId, listed: tuple[bytes, set[bytes]]) -> None:
        """Recognise a peer that holds one of our earlier versions of ``sc``; send at once.

        The peer listed the salted hash of its item (sub-cloud id, digest of its version).
        If that hash is the hash of a version we held a few transactions ago, the peer is
        behind us by exactly those transactions: stream them now instead of waiting a round
        trip for its vector (our offer still goes out, and the peer's own vector corrects
        the guess when it arrives). A false match (2^-32 per earlier version) costs at most
        envelopes the peer already has or a gap, which its gap-triggered offer repairs.
        """
        p = self._subs.get(sc)
        if p is None or p.remote is not None:
            return
        salt, hashes = listed
        for digest, version in self.catalog.earlier_versions(sc):
            if short_item_hash(item_hash(sc, digest), salt) in hashes:
                p.remote = version
                self._stats["peer versions inferred"] += 1
                self._work[sc] = None
                return

    def _infer_from_fingerprints(self, msg: Reconcile) -> None:
        """As :meth:`_infer_peer_version`, from a range fingerprint the peer sent.

        A mismatched range whose fingerprint equals ours with one item replaced by one of
        its earlier versions tells the peer's version of that sub-cloud (same count, same
        other items). Bounded by MAX_INFERENCE_CHECKS per message.
        """
        rset = self._reconcile_set()
        checks = 0
        ranges: list[Range] = []
        for rng in msg.ranges:
            if rng.mode == MODE_SPLIT:
                ranges += (c for c in rng.children() if c.mode == MODE_FP)
            elif rng.mode == MODE_FP:
                ranges.append(rng)
        for rng in ranges:
            lo, hi = rng.bounds()
            count, total = rset.sum(lo, hi)
            if not 0 < count <= ITEM_THRESHOLD or range_fingerprint(total, count, rng.salt) == (
                rng.payload
            ):
                continue
            for key, h in rset.items(lo, hi):
                sc = SubCloudId(key)
                p = self._subs.get(sc)
                if (p is not None and p.remote is not None) or not self._may_share(sc):
                    continue
                for digest, version in self.catalog.earlier_versions(sc):
                    checks += 1
                    if checks > MAX_INFERENCE_CHECKS:
                        return
                    changed = total - h + item_hash(key, digest)
                    if range_fingerprint(changed, count, rng.salt) == rng.payload:
                        self._subs.setdefault(sc, _Peer()).remote = version
                        self._stats["peer versions inferred"] += 1
                        self._stats["peer versions inferred from fingerprints"] += 1
                        self._work[sc] = None
                        break

    def _on_offer(self, offer: VectorOffer) -> None:
        sc = offer.subcloud
        if sc not in self.catalog or not self._may_share(sc):
            self._subs.pop(sc, None)
            self._unknown.append(sc)
            return
        version = dict(offer.version)  # the codec checked ids (8..32 bytes) and counters
        p = self._subs.setdefault(sc, _Peer())
        remote = dict(version)
        # what is already on its way counts as theirs, unless it sits above a gap
        for batch in self._inflight.values():
            if batch.subcloud == sc:
                for origin, first, last in batch.spans:
                    if first <= remote.get(origin, 0) + 1 and last > remote.get(origin, 0):
                        remote[origin] = last
        if self._snap_out is not None and self._snap_out.subcloud == sc and p.remote:
            for origin, c in p.remote.items():
                remote[origin] = max(remote.get(origin, 0), c)
        p.remote = remote
        p.peer_version = version
        p.peer_bpd = float(offer.bytes_per_dot)
        p.stalled.clear()
        p.snapshot_asked = False  # new facts: a later fold may call for a snapshot again
        was_awaiting = p.awaiting
        p.awaiting = False
        self._events.append(PeerVersionLearned(sc, dict(version)))
        if offer.reply and not was_awaiting:
            self._offer(sc, reply=False)
        self._work[sc] = None

    def _on_envelopes(self, msg: Envelopes) -> None:
        size = sum(len(e) for e in msg.envelopes)
        if msg.batch in self._rx_unacked:
            self._drop("batch id reused")
            return
        if self._rx_unacked_bytes + size > MAX_WINDOW_BYTES:
            self._drop("peer ignored flow control")
            return
        if msg.subcloud not in self.catalog or not self._may_share(msg.subcloud):
            # not ours to store; acknowledge so the sender's window does not leak
            self._drop("envelopes for a sub-cloud we do not replicate")
            self._acks.append(msg.batch)
            self._unknown.append(msg.subcloud)
            return
        self._stats["envelopes in"] += len(msg.envelopes)
        p = self._subs.get(msg.subcloud)
        if p is not None and p.remote is not None:
            # the peer holds what it sends us: never echo it back
            for raw in msg.envelopes:
                try:
                    env = decode_envelope(raw)
                except DeltaRejected:
                    continue  # the shell's open_envelope reports it
                have = p.remote.get(env.origin, 0)
                if env.first <= have + 1 < env.last + 1:
                    p.remote[env.origin] = env.last
        self._rx_unacked[msg.batch] = (msg.subcloud, size)
        self._rx_unacked_bytes += size
        self._events.append(EnvelopesReceived(msg.subcloud, msg.batch, msg.envelopes))

    def _on_snapshot_chunk(self, msg: SnapshotChunk) -> None:
        sc = msg.subcloud
        if sc not in self.catalog or not self._may_share(sc):
            self._drop("snapshot for a sub-cloud we do not replicate")
            self._acks.append(msg.batch)
            return
        if self._rx_unacked_bytes + len(msg.data) > MAX_WINDOW_BYTES:
            self._drop("peer ignored flow control")
            return
        cur = self._snap_in.get(sc)
        if msg.offset == 0:
            cur = self._snap_in[sc] = _SnapIn(msg.total, dict(msg.version), bytearray())
        if cur is None or cur.total != msg.total or len(cur.buf) != msg.offset:
            self._snap_in.pop(sc, None)
            self._drop("snapshot chunk out of order")
            self._acks.append(msg.batch)
            return
        cur.buf += msg.data
        if len(cur.buf) < cur.total:
            self._acks.append(msg.batch)  # held in memory (bounded by MAX_SNAPSHOT_BYTES)
            return
        del self._snap_in[sc]
        version = cur.version  # checked by the codec
        self._stats["snapshots in"] += 1
        self._rx_unacked[msg.batch] = (sc, len(msg.data))
        self._rx_unacked_bytes += len(msg.data)
        self._events.append(SnapshotReceived(sc, msg.batch, bytes(cur.buf), version))

    # -- internals ------------------------------------------------------------------------

    def _reconcile_set(self) -> ReconcileSet:
        return self.catalog.reconcile_set if self._view is None else self._view.reconcile_set

    def _may_share(self, sc: SubCloudId) -> bool:
        return self._shares is None or self._shares(sc)

    def _drop(self, reason: str) -> None:
        self._stats["messages dropped"] += 1
        self._stats[f"dropped: {reason.split(':')[0]}"] += 1
        self._events.append(MessageDropped(reason))

    def _fail(self, reason: str) -> None:
        self._failed = True
        self._stats["session failed"] += 1
        self._events.append(SessionFailed(reason))

    def _send(self, msg: Message) -> None:
        frame = encode_message(msg, self._ids)
        self._stats["messages out"] += 1
        self._stats["bytes out"] += len(frame)
        self._out += frame

    def _send_batch(
        self, sc: SubCloudId, batch: list[bytes], spans: list[tuple[bytes, int, int]], size: int
    ) -> None:
        bid = self._next_batch
        self._next_batch += 1
        self._inflight[bid] = _Batch(sc, size, spans)
        self._inflight_bytes += size
        self._stats["envelopes out"] += len(batch)
        self._send(Envelopes(sc, bid, tuple(batch)))

    def _offer(self, sc: SubCloudId, *, reply: bool) -> None:
        if sc not in self.catalog:
            return
        p = self._subs.setdefault(sc, _Peer())
        if reply and p.awaiting:
            return  # our vector is already on its way
        pending = self._offers.get(sc)
        if pending is not None and (pending.reply or not reply):
            return
        p.awaiting = p.awaiting or reply
        self._offers[sc] = VectorOffer(
            sc,
            self.catalog.version(sc),
            reply,
            min(math.ceil(self.catalog.bytes_per_dot(sc)), MAX_BYTES_PER_DOT),
        )

    def _start_run(self, now: float) -> None:
        self._next_run = now + ANTI_ENTROPY_INTERVAL
        if self._run_active and now - self._run_started < ANTI_ENTROPY_INTERVAL:
            return  # a run is under way (one whose message was dropped is restarted later)
        self._run_active = True
        self._run_started = now
        self._run_found = set()
        if self._reconciled:
            self._forget_awaiting()
        # the first run of a session offers the vectors of a small set at once
        ranges, direct = initial_ranges(self._reconcile_set(), direct=not self._reconciled)
        self._send(Reconcile(False, tuple(ranges)))
        for sc in direct:
            sid = SubCloudId(sc)
            if self._may_share(sid):
                self._run_found.add(sid)
                self._offer(sid, reply=True)

    def _forget_awaiting(self) -> None:
        # an offer whose answer never came (a peer that dropped it) must not block the
        # next run's offers for ever; at worst the peer answers twice
        for p in self._subs.values():
            p.awaiting = False

    def _end_run(self, now: float) -> None:
        self._reconciled = True
        self._run_active = False
        self._events.append(Reconciled(len(self._run_found)))
        self._run_found = set()

    def _pump(self) -> None:
        """Start the next transfer the window allows: snapshot chunks, then envelopes."""
        if self._failed:
            return
        while self._snap_out is not None:
            snap = self._snap_out
            chunk = snap.data[snap.offset : snap.offset + SNAPSHOT_CHUNK_BYTES]
            if self._inflight_bytes and self._inflight_bytes + len(chunk) > self.window_bytes:
                break
            bid = self._next_batch
            self._next_batch += 1
            self._inflight[bid] = _Batch(snap.subcloud, len(chunk), [])
            self._inflight_bytes += len(chunk)
            self._send(
                SnapshotChunk(snap.subcloud, bid, snap.offset, len(snap.data), snap.version, chunk)
            )
            snap.offset += len(chunk)
            if snap.offset >= len(snap.data):
                self._stats["snapshots out"] += 1
                self._snap_out = None
        if self._request is not None or self._snap_request is not None or self._snap_out:
            return
        room = self.window_bytes - self._inflight_bytes
        if room <= 0 or self._window_blocked:
            return
        while self._work:
            sc = next(iter(self._work))
            p = self._subs.get(sc)
            if p is None or p.remote is None or sc not in self.catalog:
                del self._work[sc]
                continue
            floor = self.catalog.floor(sc)
            for origin, have in self.catalog.version(sc).items():
                theirs = p.remote.get(origin, 0)
                if have <= theirs or origin in p.stalled:
                    continue
                if theirs < floor.get(origin, 0):
                    if p.snapshot_asked:
                        p.stalled.add(origin)
                        continue
                    p.snapshot_asked = True
                    self._snap_request = sc
                    self._events.append(SnapshotWanted(sc))
                    return
                self._request = (sc, origin, theirs)
                self._events.append(
                    EnvelopesWanted(sc, origin, theirs, min(room, MAX_BATCH_BYTES))
                )
                return
            del self._work[sc]

    def _flush(self) -> None:
        """Turn queued offers and unknown-notices into messages (acks: data_to_send)."""
        if self._failed:
            self._offers.clear()
            self._acks.clear()
            self._unknown.clear()
            return
        if self._offers:
            offers = list(self._offers.values())
            self._offers.clear()
            for i in range(0, len(offers), MAX_VECTORS_PER_MESSAGE):
                self._send(Vectors(tuple(offers[i : i + MAX_VECTORS_PER_MESSAGE])))
        if self._unknown:
            unknown = list(dict.fromkeys(self._unknown))
            self._unknown.clear()
            for i in range(0, len(unknown), MAX_VECTORS_PER_MESSAGE):
                self._send(Unknown(tuple(unknown[i : i + MAX_VECTORS_PER_MESSAGE])))
