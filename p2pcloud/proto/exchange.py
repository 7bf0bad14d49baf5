"""E3X exchange: handshakes, sessions and channel crypto with one remote endpoint (CS3a).

Theory of operation
-------------------
An :class:`Exchange` holds what telehash v3 e3x/exchange.md calls an exchange: our static
CS3a keys, the remote endpoint's CS3a key (CSK), and one ephemeral key pair made when the
exchange is created and fixed for its life. It produces handshakes, judges the handshakes
it receives, and once it has seen the peer's ephemeral key it encrypts and decrypts channel
packets. It owns no timers and sends nothing by itself: the mesh (proto/mesh.py) decides when
to send a handshake (using :data:`HANDSHAKE_RESENDS`, :data:`HANDSHAKE_TIMEOUT` and the
keepalive constants exported here) and what to do with a verdict.

Incoming handshakes are opened by :func:`open_handshake`, which knows nothing of exchanges:
it decrypts with our static key, parses the inner packet and the attached key packet,
verifies AUTH against the attached key and computes the sender's hashname. The mesh then
finds (or creates) the exchange for that hashname and calls
:meth:`Exchange.receive_handshake`, which applies the ``at`` rules (e3x/handshake.md, as
telehash-js 0.4.18 implements them) and detects a new session:

* ``at`` is a uint (epoch seconds in practice) with the sender's parity: the ODD side (the
  higher CSK, e3x/order.md) uses odd values, the EVEN side even ones. An echo of the other
  side's value is the one exception.
* equal ``at``: in sync, nothing to send. Higher ``at`` with the peer's parity: adopt it and
  echo it. Lower, or our parity but not our value (JS re-handshakes when an ODD peer sends
  an even ``at``): answer with our best ``at`` so the peer can catch up.
* A handshake whose first 32 bytes (the ephemeral key; JS compares 16) differ from the
  session's starts a new session when its ``at`` is not below the highest ``at`` seen from
  the peer (or when there is no session yet): the channel keys and the peer's token change,
  the channel-id floor resets, and the verdict says ``new_session`` so the mesh errors every
  open channel. An ephemeral key of an earlier session is a replay: HandshakeFailed.

See docs/protocol/wire.md ("The exchange") for the byte formats.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from p2pcloud import _crypto
from p2pcloud._crypto import (
    CHANNEL_MIN,
    CSID_3A,
    KEY_SIZE,
    NONCE_SIZE,
    TOKEN_SIZE,
    LocalIdentity,
)
from p2pcloud._ids import ChannelId, Hashname
from p2pcloud._wire import (
    CHANNEL_OVERHEAD,
    MAX_PACKET,
    Entropy,
    b32decode,
    decode_packet,
    encode_packet,
)
from p2pcloud.errors import HandshakeFailed, LocalProtocolError, MalformedPacket

__all__ = [
    "HANDSHAKE_RESENDS",
    "HANDSHAKE_TIMEOUT",
    "KEEPALIVE_HTTP",
    "KEEPALIVE_TCP",
    "KEEPALIVE_UDP",
    "MAX_AT",
    "MAX_CHANNEL_ID",
    "MAX_HANDSHAKE",
    "Exchange",
    "Handshake",
    "HandshakeVerdict",
    "channel_token",
    "open_handshake",
]

# -- timing constants for the mesh (telehash v3 e3x/handshake.md, telehash-js defaults) ---

HANDSHAKE_RESENDS: tuple[float, ...] = (1, 3, 7, 15)
"""Seconds after the first send at which an unanswered handshake is resent unchanged."""

HANDSHAKE_TIMEOUT: float = 30
"""Seconds with no handshake answer after which the mesh drops the exchange (link down)."""

KEEPALIVE_UDP: float = 30
"""Seconds of silence on a UDP path before a keepalive handshake (keeps NAT mappings)."""

KEEPALIVE_TCP: float = 300
"""Seconds of silence on a TCP path before a keepalive handshake."""

KEEPALIVE_HTTP: float = 60
"""Seconds of silence on an HTTP path before a keepalive handshake (v3; we have no HTTP)."""

# -- limits -------------------------------------------------------------------------------

MAX_HANDSHAKE = 2048
"""Largest handshake body we open. A CS3a link handshake is about 160 bytes, with every
official CSID's intermediate about 500; the bound caps the work a stranger can make us do
before AUTH is checked."""

MAX_AT = (1 << 53) - 1
"""Largest ``at``: v3 says uint64, but JS numbers are exact only below 2**53 (digest §10.7)."""

MAX_CHANNEL_ID = (1 << 32) - 1
"""telehash v3 e3x/channels.md: ``c`` is a uint32."""

MAX_INTERMEDIATES = 16
"""Most CSIDs an attached key packet may list; v3 defines five cipher sets."""

SEEN_EPHEMERALS = 16
"""How many earlier session ephemeral keys an exchange remembers to refuse their replay."""

_LINK_TYPES = frozenset(("link", "key"))  # "key" is the old name JS upgrades to "link"


@dataclass(frozen=True, slots=True)
class Handshake:
    """A decrypted, verified incoming handshake (from :func:`open_handshake`).

    Attributes:
        csid: the cipher set (always 0x3a here).
        type: the handshake type (``"link"``; a missing type or the old ``"key"`` mean link).
        at: the sender's ``at``.
        hashname: the sender's hashname (its key plus any intermediates it sent).
        key: the sender's static CS3a key, which AUTH was verified against.
        ephemeral: the sender's ephemeral key (first 32 bytes of the message body).
        json: the inner packet's JSON head.
        body: the inner packet's body (the attached key packet).
        intermediates: CSID to 32-byte intermediate for the sender's other cipher sets.
    """

    csid: int
    type: str
    at: int
    hashname: Hashname
    key: bytes
    ephemeral: bytes
    json: dict[str, Any]
    body: bytes
    intermediates: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HandshakeVerdict:
    """What :meth:`Exchange.receive_handshake` concluded.

    Attributes:
        current: the handshake's ``at`` was valid and not below our best: the peer is alive
            and in step (the mesh may call the link up / reset its timeout).
        new_session: the peer's ephemeral key changed and was accepted: channel keys are new,
            the channel-id floor is reset; the mesh must error every open channel.
        reply_at: send ``exchange.handshake(reply_at)`` now; None when both sides agree.
        at: our best known ``at`` after this handshake.
    """

    current: bool
    new_session: bool
    reply_at: int | None
    at: int


def _parse_intermediates(attached_json: dict[str, Any] | None) -> dict[str, bytes]:
    """Read the attached key packet's JSON: ``{"<csid>": "<b32 intermediate>", ...}``."""
    if attached_json is None:
        return {}
    if len(attached_json) > MAX_INTERMEDIATES:
        raise MalformedPacket(f"attached key packet lists more than {MAX_INTERMEDIATES} CSIDs")
    out: dict[str, bytes] = {}
    for csid, value in attached_json.items():
        if csid == "3a":
            # The link CSID's own key is the body; JS writes null here, C writes true.
            continue
        if not isinstance(value, str):
            raise MalformedPacket(f"intermediate for {csid!r} is not base32 text")
        raw = b32decode(value)
        if len(raw) != 32:
            raise MalformedPacket(f"intermediate for {csid!r} is not 32 bytes")
        out[csid] = raw
    return out


def open_handshake(
    local: LocalIdentity, body: bytes, *, expected_key: bytes | None = None
) -> Handshake:
    """Decrypt, parse and verify one incoming CS3a handshake.

    Args:
        local: our identity (its static CS3a secret opens the message).
        body: the LOB body of a packet whose head is the single byte 0x3a.
        expected_key: if the sender is known, its CS3a key: AUTH is then verified before
            the inner packet is even parsed.

    Returns:
        The verified :class:`Handshake`.

    Raises:
        MalformedPacket: sizes out of range, or the inner/attached packets do not parse.
        HandshakeFailed: it does not decrypt, AUTH does not verify (altered, or not from the
            key it carries), it is not a link handshake, or its key is not ``expected_key``.
    """
    if len(body) > MAX_HANDSHAKE:
        raise MalformedPacket(f"handshake of {len(body)} bytes exceeds {MAX_HANDSHAKE}")
    if expected_key is not None and not _crypto.message_verify(
        body, _crypto.auth_secret(expected_key, local.cs3a_secret)
    ):
        # telehash v3 e3x/cs/3a: verify AUTH before trusting anything.
        raise HandshakeFailed("handshake AUTH does not verify against the known key")
    ephemeral, inner_bytes = _crypto.message_decrypt(body, local.cs3a_secret)
    inner = decode_packet(inner_bytes)
    head = inner.json
    if head is None:
        raise MalformedPacket("handshake inner packet has no JSON head")
    kind = head.get("type", "link")  # e3x/handshake.md: a missing type means link
    if not isinstance(kind, str):
        raise MalformedPacket("handshake type is not text")
    if kind not in _LINK_TYPES:
        raise HandshakeFailed(f"unsupported handshake type {kind[:32]!r}")
    csid = head.get("csid", "3a")  # may be left out inside an encrypted message
    if csid != "3a":
        raise MalformedPacket("handshake csid does not match its 0x3a message")
    at = head.get("at")
    if type(at) is not int or not 1 <= at <= MAX_AT:
        raise MalformedPacket("handshake at is not an integer in 1..2**53-1")
    attached = decode_packet(inner.body)
    if attached.json is None and attached.head:
        raise MalformedPacket("attached key packet has a binary head")
    key = attached.body
    if len(key) != KEY_SIZE:
        raise MalformedPacket("attached CS3a key is not 32 bytes")
    if expected_key is not None:
        if key != expected_key:
            raise HandshakeFailed("handshake carries a different key than expected")
    elif not _crypto.message_verify(body, _crypto.auth_secret(key, local.cs3a_secret)):
        raise HandshakeFailed("handshake AUTH does not verify against its attached key")
    intermediates = _parse_intermediates(attached.json)
    hashname = _crypto.hashname_from_keys({"3a": key}, intermediates)
    return Handshake(
        csid=CSID_3A,
        type="link",
        at=at,
        hashname=hashname,
        key=key,
        ephemeral=ephemeral,
        json=head,
        body=inner.body,
        intermediates=intermediates,
    )


def channel_token(body: bytes) -> bytes:
    """The routing token of a channel packet: the first 16 bytes of its LOB body.

    Args:
        body: the body of a packet with an empty head.

    Returns:
        16 bytes; the recipient's :attr:`Exchange.token`.

    Raises:
        MalformedPacket: the body is shorter than a channel packet can be.
    """
    if len(body) < CHANNEL_MIN:
        raise MalformedPacket(f"channel packet shorter than {CHANNEL_MIN} bytes")
    return bytes(body[:TOKEN_SIZE])


class Exchange:
    """All crypto state shared with one remote endpoint (see the module docstring).

    Attributes:
        local: our identity.
        remote_key: the peer's static CS3a key.
        remote_hashname: the peer's hashname.
        is_odd: True when our CSK is the higher one (odd ``at`` and channel ids).
        token: our token: incoming channel packets for this exchange start with it.
        ephemeral: our ephemeral public key (fixed for the exchange's life).
    """

    __slots__ = (
        "_auth_key",
        "_best_at",
        "_box_key",
        "_dec_key",
        "_enc_key",
        "_entropy",
        "_eph_secret",
        "_next_cid",
        "_peer_at",
        "_peer_ephemeral",
        "_remote_token",
        "_seen",
        "ephemeral",
        "is_odd",
        "local",
        "remote_hashname",
        "remote_key",
        "token",
    )

    def __init__(
        self,
        local: LocalIdentity,
        remote_key: bytes,
        entropy: Entropy,
        *,
        remote_intermediates: Mapping[str, bytes] | None = None,
    ) -> None:
        """Start an exchange with a new ephemeral key pair (draws 32 bytes of entropy).

        Args:
            local: our identity.
            remote_key: the peer's static CS3a key (32 bytes).
            entropy: randomness for the ephemeral key and every nonce.
            remote_intermediates: the peer's other cipher sets' intermediates, so that
                :attr:`remote_hashname` matches a multi-CSID peer (telehash-js).

        Raises:
            LocalProtocolError: the key is not 32 bytes or is our own.
            HandshakeFailed: the key is a low-order point (no shared secret).
        """
        if len(remote_key) != KEY_SIZE:
            raise LocalProtocolError("a CS3a key is 32 bytes")
        if remote_key == local.cs3a_public:
            raise LocalProtocolError("cannot make an exchange with ourselves")
        self.local = local
        self.remote_key = bytes(remote_key)
        self.remote_hashname: Hashname = _crypto.hashname_from_keys(
            {"3a": self.remote_key}, remote_intermediates
        )
        # e3x/order.md: compare the CSKs as big-endian numbers; the higher one is ODD.
        self.is_odd: bool = local.cs3a_public > self.remote_key
        self._entropy = entropy
        self.ephemeral, self._eph_secret = _crypto.cs3a_keypair(entropy)
        self.token: bytes = _crypto.token_for(self.ephemeral)
        # Constant for the exchange: the box key of our handshakes and the AUTH secret.
        self._box_key = _crypto.beforenm(self.remote_key, self._eph_secret)
        self._auth_key = _crypto.auth_secret(self.remote_key, local.cs3a_secret)
        self._best_at = 0  # highest at sent or adopted (JS x._at)
        self._peer_at = 0  # highest at received in a verified handshake
        self._peer_ephemeral: bytes | None = None
        self._remote_token: bytes | None = None
        self._enc_key: bytes | None = None
        self._dec_key: bytes | None = None
        self._seen: deque[bytes] = deque(maxlen=SEEN_EPHEMERALS)
        self._next_cid = 1 if self.is_odd else 2

    # -- at -------------------------------------------------------------------------------

    @property
    def at(self) -> int:
        """Our best known ``at`` (0 before the first handshake is sent or received)."""
        return self._best_at

    def _ours_above(self, value: int) -> int:
        """The smallest ``at`` with our parity that is greater than ``value``."""
        candidate = value + 1
        if (candidate % 2 == 1) != self.is_odd:
            candidate += 1
        return candidate

    def new_at(self, now: float) -> int:
        """A fresh ``at`` for a new or keepalive handshake: our parity, >= now, > best.

        A value above every ``at`` the peer has seen makes it answer (it echoes), which is
        what a keepalive needs.

        Args:
            now: the current time in seconds (epoch seconds, as JS uses).

        Returns:
            The ``at`` to pass to :meth:`handshake`.
        """
        return self._ours_above(max(int(now) - 1, self._best_at, 0))

    # -- handshakes -----------------------------------------------------------------------

    def handshake(self, at: int | None = None) -> bytes:
        """Make a link handshake (draws 24 bytes of entropy for the nonce).

        Args:
            at: the ``at`` to send: a value with our parity (e.g. from :meth:`new_at`), or
                our best known value (to echo the peer's). A value with the peer's parity
                that is not the best known is bumped by one to our parity. None resends
                the best known value.

        Returns:
            The full wire packet ``LOB(head=0x3a, KEY|NONCE|box|AUTH)``, uncloaked.

        Raises:
            LocalProtocolError: no ``at`` yet, or one out of range.
        """
        if at is None:
            at = self._best_at
        if type(at) is not int or not 1 <= at <= MAX_AT:
            raise LocalProtocolError("handshake at must be an integer in 1..2**53-1")
        if at != self._best_at and (at % 2 == 1) != self.is_odd:
            at += 1  # JS x.at(): force our parity
        self._best_at = max(self._best_at, at)
        # telehash-js lib/util/handshake.js key order; "csid" is optional when encrypted.
        inner = encode_packet(
            {"type": "link", "at": at, "csid": "3a"},
            # Attached key packet: intermediates of our other CSIDs (none: "{}" is dropped
            # to an empty head, as lob-enc does) and our raw CS3a key as the body.
            encode_packet(None, self.local.cs3a_public),
        )
        nonce = self._entropy(NONCE_SIZE)
        body = _crypto.message_encrypt(
            inner,
            eph_public=self.ephemeral,
            box_key=self._box_key,
            auth_key=self._auth_key,
            nonce=nonce,
        )
        return b"\x00\x01\x3a" + body

    def receive_handshake(self, hs: Handshake) -> HandshakeVerdict:
        """Judge a verified handshake from :func:`open_handshake`.

        Args:
            hs: the handshake; it must come from this exchange's remote key.

        Returns:
            The :class:`HandshakeVerdict` (new session? reply with which ``at``?).

        Raises:
            HandshakeFailed: the handshake carries another key, another cipher set, or the
                ephemeral key of an earlier session (a replay). Nothing changes then.
        """
        if hs.csid != CSID_3A:
            raise HandshakeFailed("handshake of another cipher set")
        if hs.key != self.remote_key:
            raise HandshakeFailed("handshake from a different key than this exchange's")
        at = hs.at
        new_session = False
        if hs.ephemeral != self._peer_ephemeral:
            if hs.ephemeral in self._seen:
                raise HandshakeFailed("replayed handshake: ephemeral key of an earlier session")
            if self._peer_ephemeral is None or at >= self._peer_at:
                self._start_session(hs.ephemeral)
                new_session = True
        best = self._best_at
        ours = (at % 2 == 1) == self.is_odd
        if not ours or at == best:
            self._peer_at = max(self._peer_at, at)  # never let a bogus-parity at raise it
        if at == best:
            return HandshakeVerdict(True, new_session, None, best)
        if not ours and at > best:
            self._best_at = at  # adopt the higher at and echo it
            return HandshakeVerdict(True, new_session, at, at)
        # Lower than our best, or our parity but not a value we sent (JS re-handshakes when
        # an ODD peer sends an even at): answer with our best so the peer catches up.
        reply = best if best else self._ours_above(at)
        return HandshakeVerdict(False, new_session, reply, best)

    def _start_session(self, peer_ephemeral: bytes) -> None:
        enc, dec = _crypto.channel_keys(self.ephemeral, self._eph_secret, peer_ephemeral)
        if self._peer_ephemeral is not None:
            self._seen.append(self._peer_ephemeral)
        self._peer_ephemeral = peer_ephemeral
        self._remote_token = _crypto.token_for(peer_ephemeral)
        self._enc_key, self._dec_key = enc, dec
        self._next_cid = 1 if self.is_odd else 2  # new session: reset the channel-id floor

    # -- channels -------------------------------------------------------------------------

    def is_ready(self) -> bool:
        """Whether channel keys exist (a handshake from the peer was accepted).

        Returns:
            True once :meth:`encrypt_channel` and :meth:`decrypt_channel` work.
        """
        return self._enc_key is not None

    @property
    def remote_token(self) -> bytes | None:
        """The peer's token (our outgoing channel packets carry it), None before a session."""
        return self._remote_token

    def encrypt_channel(self, inner: bytes) -> bytes:
        """Encrypt an inner channel packet (draws 24 bytes of entropy for the nonce).

        Args:
            inner: the inner LOB (at most MAX_INNER_PACKET for UDP paths; the mesh checks).

        Returns:
            The full wire packet ``LOB(no head, TOKEN | NONCE | box)``, uncloaked.

        Raises:
            LocalProtocolError: no session yet, or the packet would exceed MAX_PACKET.
        """
        if self._enc_key is None or self._remote_token is None:
            raise LocalProtocolError("no session yet: wait for the peer's handshake")
        if len(inner) + CHANNEL_OVERHEAD > MAX_PACKET:
            raise LocalProtocolError("inner packet too large for MAX_PACKET")
        return _crypto.channel_encrypt(
            inner,
            enc_key=self._enc_key,
            token=self._remote_token,
            nonce=self._entropy(NONCE_SIZE),
        )

    def seal_channel(self, head: bytes, body: bytes | memoryview) -> bytearray:
        """Encrypt an inner channel packet given as its raw head and body (the fast path).

        The same wire bytes as ``encrypt_channel(encode_packet(head, body))``, built in one
        buffer with one copy of the body (:func:`p2pcloud._crypto.channel_seal`).

        Args:
            head: the inner packet's raw head (compact JSON text, or empty).
            body: the inner packet's body.

        Returns:
            The full wire packet ``LOB(no head, TOKEN | NONCE | box)``, uncloaked, as a
            bytearray that nothing changes afterwards.

        Raises:
            LocalProtocolError: no session yet, or the packet would exceed MAX_PACKET.
        """
        if self._enc_key is None or self._remote_token is None:
            raise LocalProtocolError("no session yet: wait for the peer's handshake")
        if 2 + len(head) + len(body) + CHANNEL_OVERHEAD > MAX_PACKET:
            raise LocalProtocolError("inner packet too large for MAX_PACKET")
        return _crypto.channel_seal(
            head,
            body,
            enc_key=self._enc_key,
            token=self._remote_token,
            nonce=self._entropy(NONCE_SIZE),
        )

    def unseal_channel(self, body: bytes | memoryview) -> bytearray:
        """Decrypt the body of an incoming channel packet without copying it first.

        Args:
            body: the LOB body (``TOKEN | NONCE | box``), e.g. a memoryview into the frame.

        Returns:
            The inner packet bytes in a new bytearray (decode with ``decode_packet``).

        Raises:
            MalformedPacket: too short.
            HandshakeFailed: no session, a token that is not ours, or a box that does not
                open (altered, or encrypted for an earlier session).
        """
        return _crypto.channel_unseal(body, self._channel_key(body))

    def decrypt_channel(self, body: bytes) -> bytes:
        """Decrypt the body of an incoming channel packet.

        Args:
            body: the LOB body (``TOKEN | NONCE | box``) of a packet with an empty head.

        Returns:
            The inner packet bytes (decode with :func:`p2pcloud._wire.decode_packet`).

        Raises:
            MalformedPacket: too short.
            HandshakeFailed: no session, a token that is not ours, or a box that does not
                open (altered, or encrypted for an earlier session).
        """
        return _crypto.channel_decrypt(body, self._channel_key(body))

    def _channel_key(self, body: bytes | memoryview) -> bytes:
        """Check a channel packet's length and token; return the key that opens it."""
        if len(body) < CHANNEL_MIN:
            raise MalformedPacket(f"channel packet shorter than {CHANNEL_MIN} bytes")
        if self._dec_key is None:
            raise HandshakeFailed("channel packet before any session")
        if body[:TOKEN_SIZE] != self.token:
            raise HandshakeFailed("channel packet carries another exchange's token")
        return self._dec_key

    def next_channel_id(self) -> ChannelId:
        """Allocate the next channel id for a channel we open.

        Returns:
            An increasing id with our parity (odd for the ODD side, from 1; even from 2).

        Raises:
            LocalProtocolError: the uint32 id space of this session is used up.
        """
        cid = self._next_cid
        if cid > MAX_CHANNEL_ID:
            raise LocalProtocolError("channel ids of this session are used up")
        self._next_cid = cid + 2
        return ChannelId(cid)

    def is_ours(self, cid: int) -> bool:
        """Whether a channel id has our parity (we opened it) or the peer's.

        Args:
            cid: a channel id.

        Returns:
            True for ids we allocate.
        """
        return (cid % 2 == 1) == self.is_odd

    def __repr__(self) -> str:
        return (
            f"Exchange(remote={self.remote_hashname!r}, odd={self.is_odd}, "
            f"ready={self.is_ready()}, at={self._best_at})"
        )
