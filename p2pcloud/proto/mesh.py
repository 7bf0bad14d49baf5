"""The mesh: all Telehash v3 protocol state for one local endpoint, as a sans-I/O machine.

Theory of operation
-------------------
:class:`Mesh` is the STYLE.md section 2 shape (aioquic's ``QuicConnection`` is the model):
datagrams, the :class:`~p2pcloud.proto.path.Path` they came from and ``now`` go in through
:meth:`Mesh.receive_datagram` and :meth:`Mesh.handle_timer`; datagrams to send come out of
:meth:`Mesh.datagrams_to_send` and facts come out of :meth:`Mesh.next_event`. It does no I/O
and reads no clock; randomness arrives as ``entropy(n)``.

What it owns (docs/protocol/mesh.md explains each part for a newcomer):

* **Classification** of every received datagram (telehash v3 lob.md, e3x/cloaking.md, as
  telehash-js ``lib/util/receive.js``): decloak (and remember that the path cloaks, so we
  mirror it), then head length 0 is a channel packet routed by its token, head length 1 is a
  CS3a handshake, a JSON head is plaintext and ignored. Anything bad is dropped with a reason
  from :data:`DROP_REASONS`, counted in :meth:`statistics`, reported as
  :class:`PacketDropped`, and changes no state.
* **Links** (telehash v3 link.md): one :class:`_Link` per remote hashname, Unresolved (no
  keys) → Down (keys, no session) → Up (a handshake sent and one received in the current
  session). The cryptography of a session lives in WIRE's ``Exchange``; the mesh drives the
  handshake timers (resend unchanged at 1/3/7/15 s, give up at 30 s), keepalives (a new
  handshake "sync" after 30 s without hearing from the peer on UDP, 5 min on TCP), the
  ``at`` dance (reply echoing a higher ``at``; an equal ``at`` is "in sync"; a lower one is
  stale) and new sessions (a new ephemeral key from the peer errors every open channel).
* **Paths** (routing.md, channels/path.md): each link keeps a bounded list of paths. A path
  is trusted (``seen``) when a current handshake or a channel packet that decrypts arrives on
  it, as telehash-js does. Packets go out on the most recently seen direct path; a ``peer``
  path (through a router) is used only while no direct path works. The ``path`` channel
  advertises our own paths and answers each of the peer's with a pong sent on that path, and
  periodic syncs send handshakes to every candidate path, so a direct path is found and
  taken as soon as it works.
* **Routing** (channels/peer.md, channels/connect.md): as a router we forward a ``peer``
  request's handshake to its target in a ``connect`` and then relay channel packets by token
  (:mod:`p2pcloud.proto.routing`); as an endpoint we send handshakes for a peer-path link
  inside a ``peer`` channel to the router, and channel packets raw to the router.
* **Channels** (e3x/channels.md): inner packets are routed by ``c`` to CHANNEL's state
  machines (:mod:`p2pcloud.proto.channel`), which the mesh encrypts and decrypts. ``path``,
  ``peer`` and ``connect`` are the mesh's own; other types open only when the application
  registered them with :meth:`Mesh.handle_types` (else the peer gets
  ``{"err":"unknown type"}``, as telehash-js answers).

What it must not know about: sockets, Trio, the clock, TCP framing (the shell tells us a
path's MTU with :meth:`Mesh.set_path_mtu`), what applications put in channels.

Memory is bounded under any input: a handshake from an unknown hashname that the ``accept``
policy refuses stores nothing; links, pending links, paths per link, channels per link and
relay entries all have named caps below.
"""

from __future__ import annotations

import enum
import hashlib
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from p2pcloud._crypto import (
    CSID_3A,
    KEY_SIZE,
    TOKEN_SIZE,
    LocalIdentity,
    beforenm,
    hashname_from_keys,
)
from p2pcloud._ids import ChannelId, Hashname
from p2pcloud._wire import (
    CHANNEL_OVERHEAD,
    CLOAK_NONCE_SIZE,
    MAX_INNER_PACKET,
    MAX_PACKET,
    MAX_UDP_PACKET,
    Entropy,
    b32decode,
    cloak,
    decloak,
    decode_packet,
    encode_head,
    encode_packet,
)
from p2pcloud.errors import (
    HandshakeFailed,
    LinkError,
    LocalProtocolError,
    MalformedPacket,
)
from p2pcloud.proto import channel as _ch
from p2pcloud.proto.events import (
    ChannelClosed,
    ChannelData,
    ChannelEnded,
    ChannelOpened,
    LinkDown,
    LinkUp,
    MeshEvent,
    PacketDropped,
    PathChanged,
)
from p2pcloud.proto.exchange import MAX_HANDSHAKE, Exchange, open_handshake
from p2pcloud.proto.path import Path, is_hashname
from p2pcloud.proto.routing import RelayTable
from p2pcloud.uri import LinkInfo

__all__ = [
    "DROP_REASONS",
    "HANDSHAKE_RESENDS",
    "HANDSHAKE_TIMEOUT",
    "KEEPALIVE_TCP",
    "KEEPALIVE_UDP",
    "MAX_LINKS",
    "MAX_PATHS_PER_LINK",
    "MAX_PENDING_LINKS",
    "LinkState",
    "Mesh",
    "MeshStatistics",
]

log = logging.getLogger("p2pcloud.mesh")

# -- timers (telehash v3 e3x/handshake.md and transports/*.md; telehash-js defaults) -------

AT_UNITS_PER_SECOND = 1000
"""Handshake ``at`` values count epoch milliseconds (ours; telehash-js counts seconds).

Only the order of ``at`` values matters to v3; a finer unit keeps a quickly restarted
endpoint's first handshake above its previous session's, and telehash-js, whose own values
are seconds and so always lower, simply echoes ours."""
HANDSHAKE_RESENDS = (1.0, 3.0, 7.0, 15.0)
"""Seconds after the first send of a handshake at which it is resent unchanged (v3)."""

HANDSHAKE_TIMEOUT = 30.0
"""Seconds without an answering handshake after which the exchange is dropped (v3)."""

KEEPALIVE_UDP = 30.0
"""Idle seconds on a UDP (or relayed) path before a keepalive sync (v3 transports/udp: NAT
mappings of home routers expire after about a minute)."""

KEEPALIVE_TCP = 300.0
"""Idle seconds on a TCP path before a keepalive sync (v3 transports/tcp: 5 minutes)."""

PATH_DEAD_FACTOR = 2.5
"""A direct path not seen for this many keepalive intervals is no longer used to send (it
stays a candidate): two keepalive syncs went unanswered on it."""

DIRECT_PROBE_INTERVAL = 30.0
"""While a link runs over a router and has direct candidates, we sync (send handshakes to
every path) this often, so a direct path that starts working is found within 30 s."""

RE_ECHO_INTERVAL = 0.25
"""Least time between two echoes of the same handshake: a resend comes a second or more
after the first send, so this only stops network duplicates and replays from making us
answer each copy."""

MIN_SYNC_INTERVAL = 1.0
"""Syncs triggered by packets from new paths are at most this frequent (a peer moving from
path to path, or a replay from many addresses, cannot make us handshake in a loop)."""

# -- bounds (every table has a cap; each says why) -------------------------------------------

MAX_LINKS = 4096
"""Links kept at once. A personal cloud has tens of devices and a home box up to 10,000
things, most of which are not linked at the same time; a full table refuses new unknown
hashnames instead of evicting known ones."""

MAX_PENDING_LINKS = 256
"""Links learned from the network (accepted handshakes, plaintext intros) that are not Up
yet. They are the only state a stranger can create; 256 bounds it to ~100 KiB."""

MAX_PATHS_PER_LINK = 8
"""Paths kept per link: a device has at most a few addresses (LAN, public, IPv6, TCP) plus a
router or two; a peer advertising more cannot grow our tables."""

MAX_PATHS_ADVERTISED = 8
"""Paths we read from one ``path`` open (more are ignored, not an error)."""

MAX_CHANNELS_PER_LINK = 1024
"""Open channels per link. Each costs a state machine with buffers; a peer opening more is
refused with ``{"err":"too many channels"}``."""

MAX_PING_CIDS = 4
"""Recent ``path`` pings whose pongs we expect, per link."""

MAX_RECENT_SESSIONS = 4
"""Past ephemeral keys remembered per link, so a replayed handshake of an old session is
recognised as stale instead of resetting the live session."""

MAX_QUEUED_DROP_EVENTS = 1024
"""PacketDropped events kept waiting for next_event(); past this a flood of bad datagrams
is only counted in statistics(), so a shell that drains events late cannot be made to
buffer without bound."""

REPLAY_WINDOW = 256
"""Channel packets per link whose nonces we remember to drop exact replays (and network
duplicates) before they reach a channel. v3 channel packets have random nonces and no
counter, so older replays are left to the channels (a reliable channel drops a seen seq);
256 nonce prefixes cost 4 KiB per link."""

NONCE_PREFIX = 16  # bytes of the 24-byte random nonce kept per packet: 2**-128 collisions

MAX_PEER_BODY = 3 + MAX_HANDSHAKE
"""Largest BODY of a ``peer`` request we forward: one handshake (or a smaller plaintext
intro). A bigger one could not be opened by its target anyway, and must not ride a
large-frame TCP link in only to be too large for the target's UDP path."""

MAX_INTERMEDIATES = 8
"""Cipher-set intermediates read from a plaintext intro (v3 defines four cipher sets)."""

CHANNEL_HEAD_RESERVE = _ch.HEAD_OVERHEAD
"""Bytes of an inner packet kept for what the channel layer adds to a head (``c``, ``seq``,
``ack``, ``end`` and a capped ``miss``: CHANNEL's HEAD_OVERHEAD); the application's own head
fields and, on an open, the ``type`` come out of the body's share (see _check_size)."""

CID_LIMIT = 0xFFFFFFFF  # telehash v3 e3x/channels: c is a uint32

DROP_REASONS = (
    "malformed",  # undecodable LOB, bad cloaking, wrong sizes
    "too large",  # bigger than the path MTU allows
    "unsupported csid",  # a handshake of a cipher set other than 3a
    "plaintext",  # an unencrypted JSON packet (discovery / intro we do not answer)
    "unsupported head",  # a 2..6 byte binary head (not v3; THC's 5-byte routing)
    "handshake failed",  # does not decrypt or AUTH does not verify
    "unsupported handshake",  # handshake type other than link
    "not accepted",  # unknown hashname refused by the accept policy
    "link table full",  # MAX_LINKS or MAX_PENDING_LINKS reached
    "stale handshake",  # an older at or an old session's handshake (replay)
    "unknown token",  # channel packet for no exchange and no relay entry
    "relay refused",  # relay entry exists but the packet came from the wrong endpoint
    "no session",  # channel packet for an exchange whose peer handshake has not arrived
    "decrypt failed",  # channel packet with our token that does not open
    "replayed",  # a channel packet seen moments ago (replay or network duplicate)
    "bad channel packet",  # decrypted inner packet that is not a channel packet
    "bad channel id",  # c missing, out of range, or of our parity in an open
    "stale channel",  # an open for a channel id at or below the floor (replay)
    "unknown channel",  # a packet for a channel that does not exist
    "bad peer request",  # a peer/connect open that is not well formed
    "no route",  # peer request for an endpoint we have no Up link to
)
"""Every reason :class:`PacketDropped` can carry (a fixed set: statistics stay bounded)."""


class LinkState(enum.Enum):
    """telehash v3 link.md states."""

    UNRESOLVED = "unresolved"  # hashname known, keys not (or no path)
    DOWN = "down"  # keys known, no current session
    UP = "up"  # a handshake sent and one received in the current session


@dataclass(frozen=True, slots=True)
class MeshStatistics:
    """A snapshot of the mesh's counters (:meth:`Mesh.statistics`).

    Attributes:
        datagrams_in: datagrams given to receive_datagram.
        datagrams_out: datagrams handed out by datagrams_to_send.
        bytes_in: their bytes.
        bytes_out: their bytes.
        drops: drop reason → count (reasons from :data:`DROP_REASONS`).
        links: links in the table, by state name.
        channels: open channels over all links.
        relayed: channel packets forwarded as a router.
        relay_entries: entries in the relay table.
        handshakes_sent: handshake packets sent (first sends, resends, replies, syncs).
    """

    datagrams_in: int
    datagrams_out: int
    bytes_in: int
    bytes_out: int
    drops: Mapping[str, int]
    links: Mapping[str, int]
    channels: int
    relayed: int
    relay_entries: int
    handshakes_sent: int


@dataclass(slots=True)
class _PathInfo:
    """One path of a link. ``seen`` is when a trusted packet last arrived on it."""

    path: Path
    seen: float | None = None
    cloaked: bool = True  # telehash v3 cloaking: reply cloaked to a peer that cloaks
    probed: int = 0  # the at of the last handshake we sent on this path


@dataclass(slots=True)
class _Link:
    """Everything the mesh knows about one remote endpoint."""

    hashname: Hashname
    key: bytes | None
    local_origin: bool  # the application asked for it (never forgotten silently)
    paths: list[_PathInfo] = field(default_factory=list)
    best: Path | None = None
    exchange: Exchange | None = None
    state: LinkState = LinkState.UNRESOLVED
    at: int = 0  # at of our current handshake
    hs_packet: bytes | None = None  # our current handshake (resent unchanged)
    round_start: float | None = None  # an unanswered handshake was first sent then
    resends: int = 0  # resends done in this round
    received: bool = False  # a handshake of the current session arrived
    peer_ephemeral: bytes | None = None
    old_ephemerals: deque[bytes] = field(default_factory=lambda: deque(maxlen=MAX_RECENT_SESSIONS))
    last_rx: float = 0.0
    last_sync: float = -1e18
    last_catchup: float = -1e18  # last answer to a restarted peer's stale handshake
    last_reply: float = -1e18  # last handshake sent in answer to one (rate of re-echoes)
    last_peer_hs: bytes = b""  # digest of the peer's last accepted handshake (repeats)
    last_path_open: float = -1e18  # last path ping whose advertised paths we tried
    channels: dict[ChannelId, _ch.Channel] = field(default_factory=dict)
    cid_floor: int = 0  # highest channel id the peer opened in this session
    ping_cids: deque[int] = field(default_factory=lambda: deque(maxlen=MAX_PING_CIDS))
    recent: deque[bytes] = field(default_factory=deque)  # nonce prefixes, oldest first
    recent_set: set[bytes] = field(default_factory=set)

    def seen_nonce(self, nonce: bytes) -> bool:
        """Remember a channel packet's nonce; True if it was seen in the replay window."""
        if nonce in self.recent_set:
            return True
        self.recent.append(nonce)
        self.recent_set.add(nonce)
        if len(self.recent) > REPLAY_WINDOW:
            self.recent_set.discard(self.recent.popleft())
        return False

    def path_info(self, path: Path) -> _PathInfo | None:
        for info in self.paths:
            if info.path == path:
                return info
        return None


def _keepalive_for(path: Path | None) -> float:
    return KEEPALIVE_TCP if path is not None and path.is_tcp else KEEPALIVE_UDP


def _routing_token(handshake_body: bytes) -> bytes:
    # telehash v3 e3x/cs/3a: TOKEN = SHA256(first 16 bytes of the handshake BODY)[0:16]
    return hashlib.sha256(handshake_body[:16]).digest()[:TOKEN_SIZE]


class Mesh:
    """All protocol state for one local endpoint. Does no I/O and reads no clock.

    Args:
        identity: our keys and hashname.
        entropy: ``entropy(n)`` returns n random bytes (ephemeral keys, nonces, cloaking).
        accept: policy for handshakes from hashnames we have no link to: called with the
            hashname, True to link. Default: refuse every unknown hashname.
        relay: act as a router for endpoints we are linked to (telehash v3 routing.md:
            every endpoint may route; default True).
        flow_control: ours: the application's reliable channels count delivered data
            against their receive window until :meth:`consume` reports it read, so a slow
            reader stalls its sender after one window (default False: ``ChannelData`` is
            consumed as soon as it is queued, as in telehash-js).
        wall_offset: seconds to add to ``now`` to get Unix epoch seconds; used only for
            handshake ``at`` values, which come from the wall clock (in milliseconds, see
            ``AT_UNITS_PER_SECOND``) so that the first ``at`` of a restarted endpoint lies
            above every ``at`` of its previous session and its peer takes the new session
            instead of calling it stale. ``now`` itself may come from any monotonic clock; the shell
            measures this offset once at start (the mesh reads no clock). Default 0: ``now``
            already is epoch seconds.
    """

    def __init__(
        self,
        identity: LocalIdentity,
        *,
        entropy: Entropy,
        accept: Callable[[Hashname], bool] | None = None,
        relay: bool = True,
        flow_control: bool = False,
        wall_offset: float = 0.0,
    ) -> None:
        self._identity = identity
        self._flow_control = flow_control
        self._wall_offset = wall_offset
        self._entropy = entropy
        self._accept = accept
        self._relay_enabled = relay
        self._links: dict[Hashname, _Link] = {}
        self._by_token: dict[bytes, _Link] = {}
        self._relay = RelayTable()
        self._local_paths: list[Path] = []
        self._mtu: dict[Path, int] = {}
        self._types: set[str] = set()
        self._outbox: list[tuple[bytes, Path]] = []
        self._events: deque[MeshEvent] = deque()
        self._drops: Counter[str] = Counter()
        self._queued_drops = 0
        self._datagrams_in = 0
        self._datagrams_out = 0
        self._bytes_in = 0
        self._bytes_out = 0
        self._relayed = 0
        self._handshakes_sent = 0

    # -- configuration ------------------------------------------------------------------

    @property
    def hashname(self) -> Hashname:
        """Our own hashname."""
        return self._identity.hashname

    @property
    def identity(self) -> LocalIdentity:
        """Our identity (keys)."""
        return self._identity

    def add_local_path(self, path: Path) -> None:
        """Tell the mesh one of our own addresses, advertised to peers in ``path`` pings.

        Args:
            path: a direct path the shell listens on.
        """
        if path not in self._local_paths:
            self._local_paths.append(path)
            del self._local_paths[:-MAX_PATHS_ADVERTISED]

    @property
    def local_paths(self) -> list[Path]:
        """Our own paths, as given to :meth:`add_local_path`."""
        return list(self._local_paths)

    def handle_types(self, *types: str) -> None:
        """Register channel types the application accepts from peers.

        An incoming open of a registered type becomes a :class:`ChannelOpened` event; any
        other type is answered ``{"err":"unknown type"}`` and forgotten (telehash-js does
        the same). ``path``, ``peer`` and ``connect`` are handled by the mesh itself.

        Args:
            types: channel type names, e.g. ``"sync"``.
        """
        for kind in types:
            if kind in ("path", "peer", "connect"):
                raise LocalProtocolError(f"channel type {kind!r} belongs to the mesh")
            self._types.add(kind)

    def set_path_mtu(self, path: Path, mtu: int) -> None:
        """Set the largest datagram (cloaked, on the wire) a direct path carries.

        The shell calls this when a TCP connection negotiated large frames (our extension);
        :meth:`max_body` then grows for links using that path.

        Args:
            path: a direct path.
            mtu: bytes, at least the v3 UDP size and at most ``MAX_PACKET``.

        Raises:
            LocalProtocolError: a peer path, or an MTU out of range.
        """
        if not path.is_direct:
            raise LocalProtocolError("only a direct path has an MTU")
        if not MAX_UDP_PACKET <= mtu <= MAX_PACKET:
            raise LocalProtocolError(f"mtu must be in {MAX_UDP_PACKET}..{MAX_PACKET}")
        if mtu == MAX_UDP_PACKET:
            self._mtu.pop(path, None)
        else:
            self._mtu[path] = mtu

    def _path_mtu(self, path: Path) -> int:
        return self._mtu.get(path, MAX_UDP_PACKET)

    # -- links ----------------------------------------------------------------------------

    def link(
        self,
        target: LinkInfo | Hashname | Mapping[str, bytes],
        now: float,
        *,
        paths: Iterable[Path | Mapping[str, Any]] = (),
    ) -> Hashname:
        """Start (or refresh) a link to an endpoint.

        Args:
            target: a :class:`~p2pcloud.uri.LinkInfo` (keys and paths, from a link URI), the
                peer's keys (``{"3a": pk32}``), or a bare hashname (Unresolved until a
                handshake or a plaintext intro through a router brings its keys).
            now: the current time.
            paths: more paths to try (``Path`` or v3 path JSON), e.g. ``Path.peer(router)``.

        Returns:
            The peer's hashname.

        Raises:
            LocalProtocolError: keys without a usable 3a key, a bad path, or our own hashname.
            LinkError: the link table is full.
        """
        key: bytes | None = None
        all_paths: list[Path] = []
        if isinstance(target, LinkInfo):
            hashname = Hashname(target.hashname)
            key = target.keys.get("3a")
            for raw in target.paths:
                try:
                    all_paths.append(Path.from_json(raw))
                except MalformedPacket:
                    # a v3 URI may list transports we lack (http, webrtc): skip those
                    log.debug("%s: skipping unusable path %r", self._short, raw)
        elif isinstance(target, str):
            if not is_hashname(target):
                raise LocalProtocolError(f"not a hashname: {target!r}")
            hashname = Hashname(target)
        else:
            key = target.get("3a")
            try:
                hashname = hashname_from_keys(dict(target))
            except MalformedPacket as exc:
                raise LocalProtocolError(f"bad keys: {exc}") from exc
        if key is not None and not self._usable_key(key):
            raise LocalProtocolError("not a usable 3a key (32 bytes, not a low-order point)")
        if hashname == self.hashname:
            raise LocalProtocolError("cannot link to ourselves")
        all_paths.extend(self._coerce_path(p) for p in paths)
        link = self._links.get(hashname)
        if link is None:
            if len(self._links) >= MAX_LINKS:
                raise LinkError("link table full")
            link = _Link(hashname, key, local_origin=True)
            self._links[hashname] = link
            log.debug("%s: new link to %s", self._short, hashname[:8])
        link.local_origin = True
        if key is not None and link.key is None:
            link.key = key
        known = {info.path for info in link.paths}
        for path in all_paths:
            self._add_path(link, path)
        fresh = any(p not in known for p in all_paths)
        if (
            link.state is LinkState.UP
            and fresh
            and link.round_start is None
            and link.last_sync + MIN_SYNC_INTERVAL <= now
        ):
            self._start_round(link, now)  # try the new paths now (a sync reaches every path)
        if link.state is not LinkState.UP:
            if link.key is not None:
                link.state = LinkState.DOWN
            if link.round_start is None:
                self._start_round(link, now)
        return hashname

    def unlink(self, hashname: Hashname, now: float) -> None:
        """Forget a link: its channels close with ``"link down"`` and LinkDown("closed").

        Args:
            hashname: the peer.
            now: the current time.
        """
        link = self._links.get(hashname)
        if link is None:
            return
        self._link_down(link, "closed", now, forget=True)

    def link_state(self, hashname: Hashname) -> LinkState | None:
        """Return the state of the link to ``hashname``, or None if there is none."""
        link = self._links.get(hashname)
        return None if link is None else link.state

    def links(self) -> list[Hashname]:
        """Return the hashnames of every link in the table."""
        return list(self._links)

    def link_path(self, hashname: Hashname) -> Path | None:
        """Return the path packets to ``hashname`` currently take (None if none works)."""
        link = self._links.get(hashname)
        return None if link is None else link.best

    def link_paths(self, hashname: Hashname) -> list[Path]:
        """Return every known path of the link (trusted or candidate)."""
        link = self._links.get(hashname)
        return [] if link is None else [p.path for p in link.paths]

    def link_key(self, hashname: Hashname) -> bytes | None:
        """Return the peer's CS3a key, if known."""
        link = self._links.get(hashname)
        return None if link is None else link.key

    # -- channels: the application's side ------------------------------------------------

    def open_channel(
        self,
        hashname: Hashname,
        type: str,
        *,
        reliable: bool,
        json: Mapping[str, Any] | None = None,
        body: bytes = b"",
        now: float,
    ) -> ChannelId:
        """Open a channel to an Up link.

        Args:
            hashname: the peer.
            type: the channel type (the peer must handle it, or it answers an ``err``).
            reliable: seq/ack/miss with retransmission (True) or best effort (False).
            json: extra head fields for the open packet.
            body: the open packet's body.
            now: the current time.

        Returns:
            The new channel id.

        Raises:
            LinkError: no Up link to ``hashname``.
            LocalProtocolError: a reserved type, or a body larger than :meth:`max_body`.
        """
        link = self._up_link(hashname)
        if type in ("path", "peer", "connect"):
            raise LocalProtocolError(f"channel type {type!r} belongs to the mesh")
        self._check_size(link, json, body, type)
        if len(link.channels) >= MAX_CHANNELS_PER_LINK:
            raise LocalProtocolError("too many open channels on this link")
        assert link.exchange is not None
        cid = link.exchange.next_channel_id()
        ch = _ch.open_channel(
            cid,
            type,
            reliable=reliable,
            json=json,
            body=body,
            now=now,
            flow_control=self._flow_control,
        )
        link.channels[cid] = ch
        log.debug("%s: opened %s channel %d to %s", self._short, type, cid, hashname[:8])
        return cid

    def send(
        self,
        hashname: Hashname,
        cid: ChannelId,
        body: _ch.OutBody,
        *,
        json: Mapping[str, Any] | None = None,
        end: bool = False,
        now: float,
    ) -> None:
        """Queue one packet on a channel.

        Args:
            hashname: the peer.
            cid: the channel.
            body: at most :meth:`max_body` bytes; a read-only memoryview of bytes that
                never change is kept uncopied on a reliable channel (see Channel.send).
            json: extra head fields.
            end: this is the last packet we send on the channel.
            now: the current time.

        Raises:
            LinkError: no Up link.
            LocalProtocolError: no such channel, too large, or the channel refuses
                (ended, closed, flow control full: check :meth:`send_capacity`).
        """
        link = self._up_link(hashname)
        ch = self._channel(link, cid)
        self._check_size(link, json, body)
        ch.send(body, json=json, end=end, now=now)

    def send_capacity(self, hashname: Hashname, cid: ChannelId) -> int:
        """Return how many packets the channel accepts now (flow control).

        Raises:
            LinkError: no Up link.
            LocalProtocolError: no such channel.
        """
        link = self._up_link(hashname)
        return self._channel(link, cid).send_capacity()

    def consume(self, hashname: Hashname, cid: ChannelId, count: int, *, now: float) -> bool:
        """Report ``count`` ``ChannelData`` events of a reliable channel as read.

        Ours (receive-side flow control, see ``flow_control``): the channel's window opens
        by that many packets and an ack with the new window edge goes out when it matters.
        Unknown or gone channels, unreliable channels and a mesh without flow control
        ignore the call (the application may report late, after a close).

        Args:
            hashname: the peer.
            cid: the channel.
            count: ``ChannelData`` events consumed since the last report.
            now: the current time.

        Returns:
            True when the shell must act: a window update is due now
            (:meth:`datagrams_to_send`) or :meth:`get_timer` moved; False otherwise.
        """
        link = self._links.get(hashname)
        if link is None:
            return False
        ch = link.channels.get(cid)
        if isinstance(ch, _ch.ReliableChannel):
            return ch.consume(count, now)
        return False

    def close_channel(
        self, hashname: Hashname, cid: ChannelId, *, err: str | None = None, now: float
    ) -> None:
        """Close a channel: with ``err`` at once, else by sending ``end``.

        Args:
            hashname: the peer.
            cid: the channel.
            err: an error text to send, or None for a clean end.
            now: the current time.

        Raises:
            LocalProtocolError: no such channel.
        """
        link = self._links.get(hashname)
        if link is None or cid not in link.channels:
            raise LocalProtocolError(f"no channel {cid} to {hashname[:8]}")
        link.channels[cid].close(err, now=now)
        self._pump_channel(link, cid, now)

    def channel_ids(self, hashname: Hashname) -> list[ChannelId]:
        """Return the ids of the channels open on a link."""
        link = self._links.get(hashname)
        return [] if link is None else list(link.channels)

    def max_body(self, hashname: Hashname) -> int:
        """Largest channel body (with a small JSON head) that fits the path in use.

        A v3 inner packet is at most 1400 bytes; on a path whose MTU the shell raised
        (:meth:`set_path_mtu`, TCP large frames) it is the MTU minus the channel overhead.

        Args:
            hashname: the peer.

        Returns:
            Bytes.
        """
        link = self._links.get(hashname)
        path = None if link is None else link.best
        return self._inner_limit(path) - 2 - CHANNEL_HEAD_RESERVE

    def _inner_limit(self, path: Path | None) -> int:
        if path is None:
            return MAX_INNER_PACKET
        if path.type == "peer":
            # a relayed packet must fit every hop, and we cannot see the router's path to
            # the peer: stay at the v3 size whatever our path to the router allows.
            return MAX_INNER_PACKET
        mtu = self._path_mtu(path)
        if mtu <= MAX_UDP_PACKET:
            return MAX_INNER_PACKET
        return mtu - CHANNEL_OVERHEAD - CLOAK_NONCE_SIZE

    def _check_size(
        self, link: _Link, json: Mapping[str, Any] | None, body: _ch.OutBody, type: str = ""
    ) -> None:
        extra = len(encode_packet(dict(json))) if json else 0
        if type:
            extra += len(encode_packet({"type": type}))  # the open carries "type":"..."
        if len(body) + extra > self.max_body(link.hashname):
            raise LocalProtocolError(
                f"body of {len(body)} bytes (+{extra} head) exceeds max_body "
                f"{self.max_body(link.hashname)}"
            )

    def _up_link(self, hashname: Hashname) -> _Link:
        link = self._links.get(hashname)
        if link is None or link.state is not LinkState.UP or link.exchange is None:
            raise LinkError(f"no Up link to {hashname[:8]}")
        return link

    @staticmethod
    def _channel(link: _Link, cid: ChannelId) -> _ch.Channel:
        ch = link.channels.get(cid)
        if ch is None:
            raise LocalProtocolError(f"no channel {cid} to {link.hashname[:8]}")
        return ch

    # -- the sans-I/O surface ------------------------------------------------------------

    def receive_datagram(self, data: bytes, path: Path, now: float) -> None:
        """Process one datagram that arrived on ``path``. Never raises on bad input.

        Args:
            data: the datagram (or one TCP frame) as received.
            path: where it came from (a direct path).
            now: the current time.
        """
        self._datagrams_in += 1
        self._bytes_in += len(data)
        if len(data) > self._path_mtu(path):
            self._drop("too large", path)
            return
        try:
            plain, rounds = decloak(data)
            if len(plain) > 2 and plain[1] == 0 and plain[0] == 0:
                # head length 0, the bulk of all traffic: a channel packet. Its body goes on
                # as a view into the frame; the decryption reads it there (no copy).
                self._receive_channel_packet(
                    plain, memoryview(plain)[2:], path, rounds > 0, now
                )
                return
            packet = decode_packet(plain)
        except MalformedPacket:
            self._drop("malformed", path)
            return
        cloaked = rounds > 0
        head_len = len(packet.head)
        if head_len == 0:
            self._receive_channel_packet(plain, memoryview(packet.body), path, cloaked, now)
        elif head_len == 1:
            if packet.head[0] != CSID_3A:
                self._drop("unsupported csid", path)
                return
            self._receive_handshake(packet.body, path, cloaked, now)
        elif packet.json is not None:
            # telehash v3: a plaintext JSON packet is discovery or an unencrypted intro; we
            # answer neither on a direct path (zeroconf does discovery).
            self._drop("plaintext", path)
        else:
            self._drop("unsupported head", path)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Path]]:
        """Return (and forget) every datagram ready to go out, with its direct path.

        Args:
            now: the current time (channels decide what to (re)send).

        Returns:
            ``(bytes, path)`` pairs, cloaked when the path cloaks.
        """
        for link in list(self._links.values()):
            if link.state is not LinkState.UP or link.exchange is None:
                continue
            for cid in list(link.channels):
                ch = link.channels.get(cid)
                if ch is None:
                    continue
                for json, body in ch.packets_to_send(now):
                    self._send_inner(link, json, body)
                self._pump_channel(link, cid, now)
        out = self._outbox
        self._outbox = []
        for data, _ in out:
            self._datagrams_out += 1
            self._bytes_out += len(data)
        return out

    def get_timer(self) -> float | None:
        """Return the earliest time :meth:`handle_timer` must run, or None when idle."""
        deadlines: list[float] = []
        for link in self._links.values():
            deadline = self._link_deadline(link)
            if deadline is not None:
                deadlines.append(deadline)
            for ch in link.channels.values():
                t = ch.get_timer()
                if t is not None:
                    deadlines.append(t)
        relay = self._relay.next_deadline()
        if relay is not None:
            deadlines.append(relay)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        """Run every timer due at ``now``: resends, timeouts, keepalives, channel timers.

        Args:
            now: the current time.
        """
        self._relay.expire(now)
        for link in list(self._links.values()):
            self._link_timer(link, now)
            if link.hashname not in self._links:
                continue
            for cid in list(link.channels):
                ch = link.channels.get(cid)
                if ch is None:
                    continue
                t = ch.get_timer()
                if t is not None and t <= now:
                    ch.handle_timer(now)
                self._pump_channel(link, cid, now)

    def next_event(self) -> MeshEvent | None:
        """Return the next event, or None when there is none."""
        if not self._events:
            return None
        event = self._events.popleft()
        if isinstance(event, PacketDropped):
            self._queued_drops -= 1
        return event

    def statistics(self) -> MeshStatistics:
        """Return a snapshot of the counters."""
        states = Counter(link.state.value for link in self._links.values())
        return MeshStatistics(
            datagrams_in=self._datagrams_in,
            datagrams_out=self._datagrams_out,
            bytes_in=self._bytes_in,
            bytes_out=self._bytes_out,
            drops=dict(self._drops),
            links=dict(states),
            channels=sum(len(link.channels) for link in self._links.values()),
            relayed=self._relayed,
            relay_entries=len(self._relay),
            handshakes_sent=self._handshakes_sent,
        )

    def table_sizes(self) -> dict[str, int]:
        """Sizes of every internal table (tests check memory stays bounded)."""
        return {
            "links": len(self._links),
            "pending": self._pending_count(),
            "tokens": len(self._by_token),
            "relay": len(self._relay),
            "paths": sum(len(link.paths) for link in self._links.values()),
            "channels": sum(len(link.channels) for link in self._links.values()),
            "outbox": len(self._outbox),
            "events": len(self._events),
            "drop_reasons": len(self._drops),
            "mtu": len(self._mtu),
        }

    def debug_state(self) -> dict[str, Any]:
        """A comparable snapshot of all protocol state (not counters), for tests and logs."""
        return {
            "links": {
                hn: (
                    link.state.value,
                    link.key,
                    link.best,
                    tuple((p.path, p.seen, p.cloaked, p.probed) for p in link.paths),
                    None if link.exchange is None else link.exchange.token,
                    link.at,
                    link.hs_packet,
                    link.round_start,
                    link.resends,
                    link.received,
                    link.peer_ephemeral,
                    tuple(link.old_ephemerals),
                    link.last_rx,
                    link.last_sync,
                    tuple((cid, ch.state, ch.get_timer()) for cid, ch in link.channels.items()),
                    link.cid_floor,
                    tuple(link.ping_cids),
                )
                for hn, link in self._links.items()
            },
            "tokens": sorted(self._by_token),
            "relay": self._relay.snapshot(),
            "outbox": list(self._outbox),
            "events": list(self._events),
        }

    # -- internals: sending ---------------------------------------------------------------

    @property
    def _short(self) -> str:
        return self.hashname[:8]

    def _drop(self, reason: str, path: Path) -> None:
        self._drops[reason] += 1
        if self._queued_drops < MAX_QUEUED_DROP_EVENTS:
            self._queued_drops += 1
            self._events.append(PacketDropped(reason, path))
        log.debug("%s: dropped packet from %s: %s", self._short, path, reason)

    def _emit(self, event: MeshEvent) -> None:
        self._events.append(event)

    def _put(self, packet: bytes, path: Path, cloaked: bool) -> None:
        """Queue a whole wire packet for a direct path (cloaked when the path cloaks)."""
        data = cloak(packet, self._entropy) if cloaked else packet
        self._outbox.append((data, path))

    def _send_on_path(self, link: _Link, packet: bytes, path: Path) -> None:
        """Send a wire packet (handshake or channel packet) to ``link`` on ``path``."""
        if path.is_direct:
            info = link.path_info(path)
            self._put(packet, path, True if info is None else info.cloaked)
            return
        router = self._links.get(path.hn) if path.hn is not None else None
        if (
            router is None
            or router.state is not LinkState.UP
            or router.best is None
            or not router.best.is_direct
        ):
            # No way through that router now (the handshake timers retry). A router we
            # reach only through another router is not used: one relay hop at most, and
            # no cycle (A via R via A ...) can form.
            return
        if packet[:2] == b"\x00\x00":
            # telehash-js ext/peer.js: a channel packet goes raw to the router, which relays
            # it by the token at its start.
            self._send_raw_to(router, packet)
            return
        # A handshake travels inside a new peer channel to the router (channels/peer.md);
        # the router stays silent, so the channel keeps no state.
        assert router.exchange is not None
        cid = router.exchange.next_channel_id()
        self._send_inner(router, {"c": cid, "type": "peer", "peer": link.hashname}, packet)

    def _send_raw_to(self, link: _Link, packet: bytes) -> None:
        """Send a wire packet on the link's best direct path (through routers if need be)."""
        if link.best is None:
            return
        self._send_on_path(link, packet, link.best)

    def _send_inner(
        self,
        link: _Link,
        json: Mapping[str, Any],
        body: _ch.OutBody,
        path: Path | None = None,
    ) -> None:
        """Encrypt one inner channel packet for ``link`` and send it (best path by default)."""
        if link.exchange is None:
            return
        # one buffer, one copy of the body: the inner LOB is written where its ciphertext
        # goes and encrypted in place (_crypto.channel_seal); same bytes as encode_packet +
        # encrypt_channel. The result is a bytearray that nothing mutates from here on; it
        # travels as bytes (cloak, sockets and the memory network take any buffer), since
        # turning it into bytes would copy the whole packet once more.
        outer = cast(bytes, link.exchange.seal_channel(encode_head(json), body))
        if path is None:
            self._send_raw_to(link, outer)
        else:
            self._send_on_path(link, outer, path)

    def _send_handshake(self, link: _Link, paths: Iterable[Path]) -> None:
        if link.key is None:
            self._send_intros(link)  # no keys yet: no handshake, introduce ourselves
            return
        if link.hs_packet is None:
            return
        for path in paths:
            self._handshakes_sent += 1
            self._note_probe(link, path)
            self._send_on_path(link, link.hs_packet, path)

    @staticmethod
    def _note_probe(link: _Link, path: Path) -> None:
        info = link.path_info(path)
        if info is not None:
            info.probed = link.at

    def _make_handshake(self, link: _Link, at: int) -> None:
        """Make (and cache, to resend unchanged) our handshake with ``at``."""
        assert link.exchange is not None
        link.hs_packet = link.exchange.handshake(at)
        link.at = link.exchange.at

    def _next_at(self, link: _Link, now: float) -> int:
        """A fresh ``at`` of our parity above every at seen (e3x/handshake.md)."""
        assert link.exchange is not None
        # e3x/handshake.md: at grows across restarts because it comes from the wall clock.
        # We count milliseconds, not seconds as telehash-js does: a node killed and restarted
        # within a second would otherwise send an at no higher than its last session's and
        # be taken for stale. v3 makes at a uint64; epoch ms stay far below 2^53 (JSON-safe).
        return link.exchange.new_at((now + self._wall_offset) * AT_UNITS_PER_SECOND)

    def _usable_key(self, key: bytes) -> bool:
        """A 32-byte CS3a key with which key agreement works (not a low-order point)."""
        if len(key) != KEY_SIZE or key == self._identity.cs3a_public:
            return False
        try:
            beforenm(key, self._identity.cs3a_secret)
        except HandshakeFailed:
            return False
        return True

    def _ensure_exchange(self, link: _Link) -> Exchange:
        if link.exchange is None:
            assert link.key is not None
            link.exchange = Exchange(self._identity, link.key, self._entropy)
            self._by_token[link.exchange.token] = link
            link.at = 0
            link.hs_packet = None
            link.received = False
            link.cid_floor = 0
            link.recent.clear()
            link.recent_set.clear()
        return link.exchange

    def _start_round(self, link: _Link, now: float) -> None:
        """Send a fresh handshake (new at) to every path and arm the resend timers.

        A keyless (Unresolved) link sends plaintext intros through its routers instead, on
        the same schedule.
        """
        if link.key is not None:
            self._ensure_exchange(link)
            self._make_handshake(link, self._next_at(link, now))
            log.debug("%s: handshake at=%d to %s", self._short, link.at, link.hashname[:8])
        link.round_start = now
        link.resends = 0
        link.last_sync = now
        self._send_handshake(link, [p.path for p in link.paths])

    def _send_intros(self, link: _Link) -> None:
        """For a keyless link reached through routers: send our keys as a plaintext intro.

        telehash-js ext/peer.js: with no exchange, a ``peer`` carries
        ``LOB({"type":"link","csid":"3a"}, LOB(intermediates, CSK))`` and the target answers
        with a handshake if it accepts us.
        """
        intro = encode_packet(
            {"type": "link", "csid": "3a"},
            encode_packet({"3a": None}, self._identity.cs3a_public),
        )
        for info in link.paths:
            if info.path.type != "peer" or info.path.hn is None:
                continue
            router = self._links.get(info.path.hn)
            if router is None or router.state is not LinkState.UP or router.exchange is None:
                continue
            cid = router.exchange.next_channel_id()
            self._handshakes_sent += 1
            self._send_inner(router, {"c": cid, "type": "peer", "peer": link.hashname}, intro)

    # -- internals: timers ----------------------------------------------------------------

    def _link_deadline(self, link: _Link) -> float | None:
        if link.round_start is not None:
            if link.resends < len(HANDSHAKE_RESENDS):
                return link.round_start + HANDSHAKE_RESENDS[link.resends]
            return link.round_start + HANDSHAKE_TIMEOUT
        if link.state is LinkState.UP:
            deadline = link.last_rx + _keepalive_for(link.best)
            if self._wants_direct_probe(link):
                deadline = min(deadline, link.last_sync + DIRECT_PROBE_INTERVAL)
            return deadline
        return None

    def _wants_direct_probe(self, link: _Link) -> bool:
        if link.best is not None and link.best.is_direct:
            return False
        return any(p.path.is_direct for p in link.paths)

    def _link_timer(self, link: _Link, now: float) -> None:
        deadline = self._link_deadline(link)
        if deadline is None or deadline > now:
            return
        if link.round_start is not None:
            if link.resends < len(HANDSHAKE_RESENDS):
                link.resends += 1
                log.debug("%s: resend handshake to %s", self._short, link.hashname[:8])
                self._send_handshake(link, [p.path for p in link.paths])
                return
            log.info("%s: link to %s timed out", self._short, link.hashname[:8])
            self._link_down(link, "timeout", now, forget=not link.local_origin)
            return
        # Up and idle (or on a router with direct candidates): sync, telehash-js link.sync.
        self._start_round(link, now)

    def _link_down(self, link: _Link, reason: str, now: float, *, forget: bool) -> None:
        was_known = link.state is not LinkState.UNRESOLVED or link.round_start is not None
        self._error_channels(link, "link down")
        if link.exchange is not None:
            self._by_token.pop(link.exchange.token, None)
        link.exchange = None
        link.hs_packet = None
        link.round_start = None
        link.resends = 0
        link.received = False
        link.at = 0
        # The peer's ephemeral key is not "old": only we gave up. If the peer is alive it
        # keeps its session and its next handshake must start ours again.
        link.peer_ephemeral = None
        for info in link.paths:
            info.seen = None
        self._set_best(link, None)
        link.state = LinkState.DOWN if link.key is not None else LinkState.UNRESOLVED
        self._relay.forget(link.hashname)
        if forget:
            del self._links[link.hashname]
        if was_known:
            self._emit(LinkDown(link.hashname, reason))
        # links that reached their peer only through this router lose that path
        for other in self._links.values():
            changed = False
            for info in other.paths:
                if info.path.type == "peer" and info.path.hn == link.hashname and info.seen:
                    info.seen = None
                    changed = True
            if changed:
                self._update_best(other, now)

    def _error_channels(self, link: _Link, err: str) -> None:
        for cid in list(link.channels):
            self._emit(ChannelClosed(link.hashname, cid, err))
        link.channels.clear()

    # -- internals: paths -----------------------------------------------------------------

    @staticmethod
    def _coerce_path(path: Path | Mapping[str, Any]) -> Path:
        if isinstance(path, Path):
            return path
        try:
            return Path.from_json(path)
        except MalformedPacket as exc:
            raise LocalProtocolError(f"bad path: {exc}") from exc

    def _add_path(self, link: _Link, path: Path) -> _PathInfo | None:
        """Add a candidate path; keep the list bounded by dropping the stalest candidate."""
        if path.type == "peer" and path.hn in (link.hashname, self.hashname):
            return None  # telehash-js: no peer path to the peer itself (or through us)
        info = link.path_info(path)
        if info is not None:
            return info
        if len(link.paths) >= MAX_PATHS_PER_LINK:
            victims = [p for p in link.paths if p.path != link.best]
            victim = min(victims, key=lambda p: -1e18 if p.seen is None else p.seen)
            link.paths.remove(victim)
        info = _PathInfo(path)
        link.paths.append(info)
        return info

    def _path_seen(self, link: _Link, path: Path, cloaked: bool, now: float) -> bool:
        """A trusted packet arrived on ``path``. Returns True when the path is new."""
        info = link.path_info(path)
        new = info is None or info.seen is None
        if info is None:
            info = self._add_path(link, path)
            if info is None:
                return False
        info.seen = now
        if path.is_direct:
            info.cloaked = cloaked
        self._update_best(link, now)
        return new

    def _update_best(self, link: _Link, now: float) -> None:
        """Pick the most recently seen live direct path, else the freshest peer path."""
        best: _PathInfo | None = None
        for info in link.paths:
            if info.seen is None:
                continue
            if info.path.is_direct:
                dead = info.seen + PATH_DEAD_FACTOR * _keepalive_for(info.path) < now
                if dead:
                    continue
            if best is None:
                best = info
                continue
            if info.path.is_direct != best.path.is_direct:
                if info.path.is_direct:
                    best = info
                continue
            if info.seen > (best.seen or 0.0):
                best = info
        self._set_best(link, None if best is None else best.path)

    def _set_best(self, link: _Link, path: Path | None) -> None:
        if path == link.best:
            return
        old = link.best
        link.best = path
        if path is not None:
            log.debug("%s: path to %s is now %s", self._short, link.hashname[:8], path)
            self._emit(PathChanged(link.hashname, path, old))

    def _logical_path(self, link: _Link, path: Path) -> Path:
        """Map the direct path a packet came in on to the link's path it belongs to.

        A packet relayed by a router arrives from the router's address: it belongs to the
        link's ``peer`` path through that router, not to a new direct path.
        """
        info = link.path_info(path)
        if info is not None:
            return path
        for candidate in link.paths:
            if candidate.path.type != "peer" or candidate.path.hn is None:
                continue
            router = self._links.get(candidate.path.hn)
            if router is not None and router.path_info(path) is not None:
                return candidate.path
        return path

    # -- internals: handshakes ------------------------------------------------------------

    def _pending_count(self) -> int:
        return sum(
            1
            for link in self._links.values()
            if not link.local_origin and link.state is not LinkState.UP
        )

    def _receive_handshake(self, body: bytes, path: Path, cloaked: bool, now: float) -> None:
        """A CS3a handshake arrived on ``path`` (a direct path, or ``peer`` via a router)."""
        try:
            hs = open_handshake(self._identity, body)
        except (HandshakeFailed, MalformedPacket):
            self._drop("handshake failed", path)
            return
        link = self._links.get(hs.hashname)
        if link is None:
            if hs.hashname == self.hashname:
                self._drop("handshake failed", path)
                return
            if self._accept is None or not self._accept(hs.hashname):
                # unknown senders cost nothing stored (mesh.md: accept policy)
                self._drop("not accepted", path)
                return
            if len(self._links) >= MAX_LINKS or self._pending_count() >= MAX_PENDING_LINKS:
                self._drop("link table full", path)
                return
            link = _Link(hs.hashname, hs.key, local_origin=False)
            self._links[hs.hashname] = link
            log.debug("%s: accepted %s", self._short, hs.hashname[:8])
        elif link.key is not None and link.key != hs.key:
            self._drop("handshake failed", path)
            return
        if hs.ephemeral in link.old_ephemerals:
            self._drop("stale handshake", path)  # an earlier session's handshake: a replay
            return
        if link.key is None:
            link.key = hs.key
        exchange = self._ensure_exchange(link)
        try:
            verdict = exchange.receive_handshake(hs)
        except HandshakeFailed:
            self._drop("stale handshake", path)
            return
        trusted = link.path_info(path)
        if not verdict.new_session and (hs.ephemeral != link.peer_ephemeral or not verdict.current):
            # telehash v3 e3x/handshake: an older at (or a key the exchange did not adopt)
            # is stale, and changes nothing. A genuine one means the peer missed our latest
            # handshake, so we answer with our best at (it echoes it, which is current):
            # * same session: only on a path we already trust (a replay from elsewhere
            #   must not make us talk to a new address);
            # * an ephemeral key we never saw: the peer restarted, its clock (hence its at)
            #   is behind ours and it may have a new address; answer there, at most once
            #   per MIN_SYNC_INTERVAL, so its echo starts the new session.
            trusted_path = trusted is not None and trusted.seen is not None
            restarted = hs.ephemeral != link.peer_ephemeral
            if verdict.reply_at and (
                trusted_path or (restarted and link.last_catchup + MIN_SYNC_INTERVAL <= now)
            ):
                if not trusted_path:
                    link.last_catchup = now
                self._send_reply(link, verdict.reply_at, path, now)
            self._drop("stale handshake", path)
            return
        if verdict.new_session:
            if link.peer_ephemeral is not None:
                link.old_ephemerals.append(link.peer_ephemeral)
                log.info("%s: new session from %s", self._short, link.hashname[:8])
                # telehash v3 e3x/handshake: a new session errors every open channel and
                # resets the channel-id floor (the exchange reset its own id counter).
                self._error_channels(link, "new session")
            link.peer_ephemeral = hs.ephemeral
            link.cid_floor = 0
            link.recent.clear()
            link.recent_set.clear()
        was_up = link.state is LinkState.UP
        link.received = True
        link.last_rx = now
        info = link.path_info(path)
        probed = info is not None and info.probed == exchange.at
        new_path = self._path_seen(link, path, cloaked, now) and not probed
        if verdict.current:
            link.round_start = None  # our handshake is answered: stop resending
            link.resends = 0
        reply_at = verdict.reply_at
        digest = hashlib.sha256(body).digest()[:16]
        repeat = digest == link.last_peer_hs
        link.last_peer_hs = digest
        resent = (
            repeat and not exchange.is_ours(hs.at) and link.last_reply + RE_ECHO_INTERVAL <= now
        )
        if reply_at is None and (new_path or link.hs_packet is None or resent):
            # In sync, but: on a path we had not trusted yet (answer on it so the peer
            # trusts it too: a sync reaches us on every path it tries), or the peer resent
            # its own at, byte for byte, after we echoed it: our echo was lost and the peer
            # is still waiting (v3 resends a handshake unchanged at 1/3/7/15 s; without an
            # answer one lost echo would drop the link after 30 s). An echo of our own at is
            # the answer we wanted and needs none. Only an identical repeat counts: an EVEN
            # telehash-js peer refuses an even at from its ODD peer and answers our echo at
            # once with a *new* handshake of the same at (e3x.js x.sync); answering that
            # would ping-pong for ever (seen against telehash-js 0.4.18).
            reply_at = exchange.at
        if reply_at is not None:
            self._send_reply(link, reply_at, path, now)
            if verdict.new_session and link.round_start is None:
                # The peer cannot use the new session before our reply arrives, and it
                # never answers an echo of its own at: resend the reply on the v3
                # schedule until its first channel packet (or a handshake) shows it has
                # it. Otherwise one lost reply would leave it retrying blind while we sit
                # Up, and a peer that never comes back times out here too.
                link.round_start = now
                link.resends = 0
        link.at = exchange.at
        if not was_up or verdict.new_session:
            link.state = LinkState.UP
            self._emit(LinkUp(link.hashname, link.best or path))
            log.info("%s: link to %s up via %s", self._short, link.hashname[:8], path)
            self._send_path_ping(link)

    def _send_reply(self, link: _Link, at: int, path: Path, now: float) -> None:
        """Answer a handshake on the path it came from (e3x/handshake: echo or catch up)."""
        assert link.exchange is not None
        if link.hs_packet is None or at != link.at:
            self._make_handshake(link, at)
        self._handshakes_sent += 1
        assert link.hs_packet is not None
        self._note_probe(link, path)
        self._send_on_path(link, link.hs_packet, path)
        link.last_reply = now

    def _send_path_ping(self, link: _Link) -> None:
        """Open a ``path`` channel advertising our paths (telehash-js pings on link up)."""
        assert link.exchange is not None
        cid = link.exchange.next_channel_id()
        link.ping_cids.append(cid)
        self._send_inner(
            link,
            {"c": cid, "type": "path", "paths": [p.to_json() for p in self._local_paths]},
            b"",
        )

    # -- internals: channel packets -------------------------------------------------------

    def _receive_channel_packet(
        self, plain: bytes, body: memoryview, path: Path, cloaked: bool, now: float
    ) -> None:
        if len(body) < TOKEN_SIZE:
            self._drop("malformed", path)
            return
        token = bytes(body[:TOKEN_SIZE])
        link = self._by_token.get(token)
        if link is None:
            self._relay_packet(token, plain, path, now)
            return
        assert link.exchange is not None
        if not link.exchange.is_ready():
            # reordering: the peer's first channel packet overtook its handshake
            self._drop("no session", path)
            return
        try:
            inner = link.exchange.unseal_channel(body)
            packet = decode_packet(inner)  # reads the bytearray in place: one body copy
        except HandshakeFailed:
            self._drop("decrypt failed", path)
            return
        except MalformedPacket:
            self._drop("bad channel packet", path)
            return
        if link.seen_nonce(bytes(body[TOKEN_SIZE : TOKEN_SIZE + NONCE_PREFIX])):
            self._drop("replayed", path)
            return
        json = packet.json
        c = None if json is None else json.get("c")
        if json is None or isinstance(c, bool) or not isinstance(c, int) or not 0 < c <= CID_LIMIT:
            self._drop("bad channel packet", path)
            return
        if link.state is not LinkState.UP:
            self._drop("unknown channel", path)
            return
        logical = self._logical_path(link, path)
        new_path = self._path_seen(link, logical, cloaked, now)
        link.last_rx = now
        if link.round_start is not None:
            # A channel packet of the current session proves the peer alive and keyed as
            # well as an echo would: telehash-js never answers a resent handshake it has
            # already seen, so under loss its channel traffic is what ends our resends.
            link.round_start = None
            link.resends = 0
        if (
            new_path
            and logical.is_direct
            and link.round_start is None
            and link.last_sync + MIN_SYNC_INTERVAL <= now
        ):
            # telehash-js: a packet on a never-seen path triggers a sync on every path.
            self._start_round(link, now)
        self._handle_inner(link, ChannelId(c), json, packet.body, logical, now)

    def _relay_packet(self, token: bytes, plain: bytes, path: Path, now: float) -> None:
        """As a router, forward a channel packet carrying someone else's token."""
        entry = self._relay.get(token) if self._relay_enabled else None
        if entry is None:
            self._drop("unknown token", path)
            return
        source = self._links.get(entry.source)
        target = self._links.get(entry.target)
        if (
            source is None
            or target is None
            or target.state is not LinkState.UP
            or source.path_info(path) is None
        ):
            self._drop("relay refused", path)
            return
        if target.best is None or not target.best.is_direct:
            self._drop("no route", path)  # one relay hop at most (see _send_on_path)
            return
        self._relay.touch(entry, now)
        self._relayed += 1
        self._send_raw_to(target, plain)

    def _handle_inner(
        self,
        link: _Link,
        c: ChannelId,
        json: dict[str, Any],
        body: bytes,
        path: Path,
        now: float,
    ) -> None:
        ch = link.channels.get(c)
        if ch is not None:
            ch.receive(json, body, now)
            self._pump_channel(link, c, now)
            return
        if c in link.ping_cids:
            return  # a pong to our path ping: the path it came on is already marked seen
        kind = json.get("type")
        if not isinstance(kind, str):
            self._drop("unknown channel", path)
            return
        if "err" in json:
            self._drop("unknown channel", path)
            return
        assert link.exchange is not None
        if (c % 2 == 1) == link.exchange.is_odd:
            # an open in our own id space would collide with our channels
            self._drop("bad channel id", path)
            return
        if c <= link.cid_floor:
            # channel ids increase (e3x/channels); an open at or below the floor is a replay
            self._drop("stale channel", path)
            return
        link.cid_floor = c
        if kind == "path":
            self._handle_path_open(link, c, json, now)
        elif kind == "peer":
            self._handle_peer_open(link, json, body, path, now)
        elif kind == "connect":
            self._handle_connect_open(link, json, body, now)
        elif kind not in self._types:
            self._send_inner(link, {"c": c, "err": "unknown type"}, b"")
        elif len(link.channels) >= MAX_CHANNELS_PER_LINK:
            self._send_inner(link, {"c": c, "err": "too many channels"}, b"")
        else:
            try:
                ch = _ch.accept_channel(json, body, now, flow_control=self._flow_control)
            except MalformedPacket:
                self._drop("bad channel packet", path)
                return
            link.channels[c] = ch
            self._emit(ChannelOpened(link.hashname, c, kind, ch.reliable, dict(json), body))
            self._pump_channel(link, c, now)

    def _pump_channel(self, link: _Link, cid: ChannelId, now: float) -> None:
        """Turn a channel's events into mesh events; forget it once it may be forgotten."""
        ch = link.channels.get(cid)
        if ch is None:
            return
        while True:
            ev = ch.next_event()
            if ev is None:
                break
            if isinstance(ev, _ch.DataReceived):
                self._emit(ChannelData(link.hashname, cid, ev.json, ev.body))
            elif isinstance(ev, _ch.EndReceived):
                self._emit(ChannelEnded(link.hashname, cid))
            elif isinstance(ev, _ch.ChannelClosed):
                self._emit(ChannelClosed(link.hashname, cid, ev.err))
        # CHANNEL's can_forget: closed, last packets taken, lingering (to re-ack) done
        if ch.can_forget(now):
            del link.channels[cid]

    # -- internals: the mesh's own channels (path, peer, connect) --------------------------

    def _handle_path_open(self, link: _Link, c: int, json: dict[str, Any], now: float) -> None:
        """channels/path.md: pong on every path we know and every path the peer lists."""
        targets: list[Path] = [p.path for p in link.paths if p.seen is not None]
        advertised = json.get("paths")
        new_direct = False
        # Pongs to paths we never heard from make us send to addresses the peer chose: at
        # most MAX_PATHS_ADVERTISED of them per MIN_SYNC_INTERVAL, so an (authenticated)
        # peer cannot turn path pings into a packet cannon aimed at someone else.
        if isinstance(advertised, list) and link.last_path_open + MIN_SYNC_INTERVAL <= now:
            link.last_path_open = now
            for raw in advertised[:MAX_PATHS_ADVERTISED]:
                try:
                    path = Path.from_json(raw)
                except MalformedPacket:
                    continue
                if link.path_info(path) is None and path.is_direct:
                    new_direct = True
                info = self._add_path(link, path)
                if info is not None and path not in targets:
                    targets.append(path)
        for path in targets:
            self._send_inner(link, {"c": c, "path": path.to_json()}, b"", path)
        if new_direct and link.round_start is None and link.last_sync + MIN_SYNC_INTERVAL <= now:
            # try the new direct paths at once: handshakes to every path (telehash-js
            # addPath sends the handshake to a new pipe)
            self._start_round(link, now)

    def _handle_peer_open(
        self, link: _Link, json: dict[str, Any], body: bytes, path: Path, now: float
    ) -> None:
        """channels/peer.md: as a router, pass a handshake to its target as a connect."""
        target_hn = json.get("peer")
        if not self._relay_enabled or not is_hashname(target_hn):
            self._drop("bad peer request", path)
            return
        assert isinstance(target_hn, str)
        target = self._links.get(Hashname(target_hn))
        if target is None or target.state is not LinkState.UP or target is link:
            self._drop("no route", path)
            return
        if len(body) > MAX_PEER_BODY:
            self._drop("bad peer request", path)
            return
        try:
            attached = decode_packet(body)
        except MalformedPacket:
            self._drop("bad peer request", path)
            return
        if len(attached.head) == 1:
            if len(attached.body) < KEY_SIZE:
                self._drop("bad peer request", path)
                return
            # the handshake's token leads back to its sender (routing.md bridging)
            self._relay.add(_routing_token(attached.body), link.hashname, target.hashname, now)
        elif attached.json is None:
            self._drop("bad peer request", path)
            return
        assert target.exchange is not None
        cid = target.exchange.next_channel_id()
        self._send_inner(target, {"c": cid, "type": "connect", "peer": link.hashname}, body)

    def _handle_connect_open(
        self, router: _Link, json: dict[str, Any], body: bytes, now: float
    ) -> None:
        """channels/connect.md: a router passes us someone's handshake (or intro)."""
        via = Path.peer(router.hashname)
        try:
            attached = decode_packet(body)
        except MalformedPacket:
            self._drop("bad peer request", via)
            return
        if len(attached.head) == 1:
            if attached.head[0] != CSID_3A:
                self._drop("unsupported csid", via)
                return
            self._receive_handshake(attached.body, via, True, now)
            return
        if attached.json is None:
            self._drop("bad peer request", via)
            return
        self._receive_intro(attached.json, attached.body, via, now)

    def _receive_intro(self, head: dict[str, Any], body: bytes, via: Path, now: float) -> None:
        """A plaintext intro (keys) through a router: link back if we know or accept it."""
        if head.get("type", "link") != "link" or head.get("csid", "3a") != "3a":
            self._drop("unsupported handshake", via)
            return
        try:
            keypkt = decode_packet(body)
            key = keypkt.body
            if not self._usable_key(key):
                raise MalformedPacket("not a usable 3a key")
            intermediates: dict[str, bytes] = {}
            for csid, value in list((keypkt.json or {}).items())[:MAX_INTERMEDIATES]:
                if csid != "3a" and isinstance(value, str):
                    intermediates[csid] = b32decode(value)
            hashname = hashname_from_keys({"3a": key}, intermediates)
        except MalformedPacket:
            self._drop("bad peer request", via)
            return
        if hashname == self.hashname:
            self._drop("bad peer request", via)
            return
        link = self._links.get(hashname)
        if link is None:
            if self._accept is None or not self._accept(hashname):
                self._drop("not accepted", via)
                return
            if len(self._links) >= MAX_LINKS or self._pending_count() >= MAX_PENDING_LINKS:
                self._drop("link table full", via)
                return
            link = _Link(hashname, key, local_origin=False)
            self._links[hashname] = link
        if link.key is None:
            link.key = key
        elif link.key != key:
            self._drop("handshake failed", via)
            return
        self._add_path(link, via)
        if link.state is LinkState.UP:
            self._handshakes_sent += 1
            if link.hs_packet is not None:
                self._send_on_path(link, link.hs_packet, via)
            return
        link.state = LinkState.DOWN
        if link.round_start is None:
            self._start_round(link, now)
