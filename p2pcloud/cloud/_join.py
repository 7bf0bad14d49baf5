"""What invites and short-code pairing share: the join messages, the welcome, the grant.

Both join protocols (:mod:`p2pcloud.cloud.invites`, :mod:`p2pcloud.cloud.pairing`) run on a
reliable ``pair`` channel with CBOR messages ``{"v": 1, "t": <type>, ...}`` and end the
same way: the inviting admin signs a grant for the joiner (:func:`admit`) and sends it with
the records that prove it back to the founding grant, in a ``welcome`` MACed with a key only
the two ends know (the invite secret, or the SPAKE2 session key); or a ``refused`` with a
reason. Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import cbor2

from p2pcloud._crypto import KEY_SIZE, LocalIdentity, hashname_from_keys
from p2pcloud._ids import CloudId, Hashname
from p2pcloud._wire import Entropy
from p2pcloud.cloud.grants import MAX_RECORD_BYTES, Grant, Scope, decode_record, keys_belong
from p2pcloud.cloud.membership import Membership
from p2pcloud.errors import BadRecord, JoinFailed, LocalProtocolError

__all__ = [
    "CHANNEL_TYPE",
    "FRAME_HEADER",
    "FrameReader",
    "frame",
    "MAX_CHAIN",
    "MAX_MESSAGE",
    "MAX_REASON",
    "PROTOCOL_VERSION",
    "Joined",
    "accept_welcome",
    "admit",
    "decode_message",
    "lp",
    "message_type",
    "peer_keys",
    "refusal",
    "welcome",
    "welcome_mac",
]

CHANNEL_TYPE: Final = "pair"  # the reliable channel both join protocols run on
PROTOCOL_VERSION: Final = 1
MAX_CHAIN: Final = 64
"""Most records in a welcome's chain: the admin chain's depth plus revocations that keep
records on it; a person's cloud is a few levels deep."""
MAX_MESSAGE: Final = MAX_CHAIN * 8 * 1024 + MAX_RECORD_BYTES
"""Largest join message: a chain of typical records (a few hundred bytes each, revocations
bigger) plus one full-size record. Bounds what a peer can make us parse."""
MAX_REASON: Final = 200  # characters of a refusal reason we show the user
_WELCOME_CONTEXT: Final = b"p2pcloud welcome v1"
FRAME_HEADER: Final = 4  # a pair channel is a byte stream: each message is LEN(4) | CBOR


def frame(message: bytes) -> bytes:
    """Frame one join message for the ``pair`` channel's byte stream.

    Args:
        message: the CBOR message.

    Returns:
        ``len(message)`` as 4 big-endian bytes, then the message.

    Raises:
        LocalProtocolError: longer than MAX_MESSAGE.
    """
    if len(message) > MAX_MESSAGE:
        raise LocalProtocolError(f"a join message is at most {MAX_MESSAGE} bytes")
    return struct.pack(">I", len(message)) + message


def message_type(data: bytes) -> str | None:
    """The type of a ``pair`` message, so the shell can route it (never raises).

    ``"join"`` goes to :meth:`InviteBook.handle_join`; ``"pake"`` and ``"confirm"`` go to
    :meth:`PairingHost.receive` (which also refuses anything else with a reason).

    Args:
        data: one framed message.

    Returns:
        The ``"t"`` field, or None if the bytes are not a join message.
    """
    try:
        msg = decode_message(data, "join", "pake", "confirm", "welcome", "refused")
    except JoinFailed:
        return None
    kind: str = msg["t"]
    return kind


class FrameReader:
    """Splits the ``pair`` channel's byte stream back into messages (pure)."""

    def __init__(self) -> None:
        """Start with an empty buffer."""
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the messages now complete.

        Args:
            data: bytes from the stream.

        Returns:
            Complete messages, in order.

        Raises:
            JoinFailed: a frame announces more than MAX_MESSAGE bytes (the peer is broken).
        """
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= FRAME_HEADER:
            (length,) = struct.unpack(">I", self._buf[:FRAME_HEADER])
            if length > MAX_MESSAGE:
                raise JoinFailed("the other device sent an oversized pairing message")
            if len(self._buf) < FRAME_HEADER + length:
                break
            out.append(bytes(self._buf[FRAME_HEADER:FRAME_HEADER + length]))
            del self._buf[:FRAME_HEADER + length]
        return out


@dataclass(frozen=True, slots=True)
class Joined:
    """A successful join, on the joiner's side.

    Attributes:
        cloud: the cloud id.
        grant: our grant.
        records: the grant and its chain (store them in the cloud sub-cloud).
        membership: the membership those records make (we are a member in it).
    """

    cloud: CloudId
    grant: Grant
    records: tuple[bytes, ...]
    membership: Membership


def admit(
    membership: Membership,
    local: LocalIdentity,
    *,
    subject_key: bytes,
    subject_verify_key: bytes,
    role: str,
    rights: Mapping[Scope, Iterable[str]],
    expires: int | None,
    entropy: Entropy,
) -> tuple[Grant, list[bytes]]:
    """Sign a grant for a joiner and collect the records that prove it (invites and pairing).

    Args:
        membership: the cloud's membership now.
        local: the inviter (a valid admin).
        subject_key: the joiner's CS3a key.
        subject_verify_key: its Ed25519 verify key.
        role: its role.
        rights: its rights.
        expires: its grant's expiry, or None.
        entropy: randomness source.

    Returns:
        ``(grant, chain)``: the chain holds the founding grant first and every record the
        joiner needs to check its grant with no other knowledge.

    Raises:
        LocalProtocolError: we are not an admin, or the joiner was revoked.
    """
    grant = membership.grant(
        local, subject_key=subject_key, subject_verify_key=subject_verify_key, role=role,
        rights=rights, expires=expires, entropy=entropy,
    )
    after = membership.with_records([grant])
    chain = [r for r in after.chain_for(grant.subject) if r != grant.raw]
    if len(chain) >= MAX_CHAIN:
        raise LocalProtocolError("the grant chain is too long to send")
    return grant, chain




def lp(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: no two different transcripts serialize alike.

    Args:
        parts: byte strings.

    Returns:
        ``len(p) (4 bytes, big-endian) | p`` for each part, joined.
    """
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def decode_message(data: bytes, *types: str) -> dict[str, Any]:
    """Decode a join message and check its version and type.

    Args:
        data: the bytes from the ``pair`` channel.
        types: the message types acceptable now.

    Returns:
        The message map.

    Raises:
        JoinFailed: malformed, too long, another protocol version, or an unexpected type.
    """
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_MESSAGE:
        raise JoinFailed("malformed message (not bytes or too long)")
    try:
        obj: Any = cbor2.loads(bytes(data))
    except Exception as exc:  # hostile bytes: one typed outcome
        raise JoinFailed("malformed message (not CBOR)") from exc
    if not isinstance(obj, dict) or any(not isinstance(k, str) for k in obj):
        raise JoinFailed("malformed message (not a map)")
    if obj.get("v") != PROTOCOL_VERSION or type(obj.get("v")) is not int:
        raise JoinFailed(
            f"the other device speaks join protocol version {obj.get('v')!r:.20}; update "
            "p2pcloud on both devices"
        )
    if obj.get("t") not in types:
        raise JoinFailed(f"unexpected message type {obj.get('t')!r:.20}")
    return obj


def peer_keys(key: Any, vk: Any, peer: Hashname) -> tuple[bytes, bytes]:
    """Check the keys a joiner sent against the hashname its link authenticated.

    Args:
        key: the claimed CS3a key.
        vk: the claimed Ed25519 verify key.
        peer: the link's remote hashname.

    Returns:
        ``(key, vk)``.

    Raises:
        JoinFailed: malformed keys, keys of another endpoint, or keys that do not belong
            together.
    """
    if not (isinstance(key, bytes) and isinstance(vk, bytes)
            and len(key) == KEY_SIZE and len(vk) == KEY_SIZE):
        raise JoinFailed("malformed keys in the join message")
    if hashname_from_keys({"3a": key}) != peer:
        raise JoinFailed("the join message names another endpoint than the link")
    if not keys_belong(key, vk):
        raise JoinFailed("the joiner's verify key does not belong to its hashname")
    return key, vk


def refusal(reason: str) -> bytes:
    """A ``refused`` message.

    Args:
        reason: a sentence for the other side's user (cut to MAX_REASON characters).

    Returns:
        The message bytes.
    """
    return cbor2.dumps({"v": PROTOCOL_VERSION, "t": "refused", "r": reason[:MAX_REASON]})


def welcome_mac(key: bytes, bound: bytes, grant: bytes, chain: Sequence[bytes]) -> bytes:
    """The MAC of a welcome: HMAC-SHA256 over what came before (``bound``) and the records.

    Args:
        key: the key only the two ends know.
        bound: the joiner's last proof (join MAC or SPAKE2 confirmation).
        grant: the grant bytes.
        chain: the chain's record bytes.

    Returns:
        32 bytes.
    """
    return hmac.new(key, _WELCOME_CONTEXT + lp(bound, grant, *chain), hashlib.sha256).digest()


def welcome(key: bytes, bound: bytes, grant: Grant, chain: Sequence[bytes]) -> bytes:
    """A ``welcome`` message carrying the joiner's grant and its chain.

    Args:
        key: the MAC key (see :func:`welcome_mac`).
        bound: the joiner's last proof.
        grant: the grant signed for the joiner.
        chain: the records proving it.

    Returns:
        The message bytes.
    """
    return cbor2.dumps({
        "v": PROTOCOL_VERSION, "t": "welcome", "g": grant.raw, "ch": list(chain),
        "m": welcome_mac(key, bound, grant.raw, chain),
    })


def accept_welcome(
    data: bytes, key: bytes, bound: bytes, identity: LocalIdentity, cloud: CloudId | None,
    now: float,
) -> Joined:
    """Check a ``welcome`` (or ``refused``) on the joiner's side.

    Args:
        data: the message bytes.
        key: the MAC key.
        bound: our last proof.
        identity: this device.
        cloud: the cloud we expect (from an invite), or None (short-code pairing).
        now: seconds since the Unix epoch.

    Returns:
        The :class:`Joined` result: we are a member of the cloud the grant names.

    Raises:
        JoinFailed: refused (with the other side's reason), forged, malformed, not for us,
            for another cloud, or a grant that does not make us a member.
    """
    msg = decode_message(data, "welcome", "refused")
    if msg["t"] == "refused":
        reason = msg.get("r")
        text = reason[:MAX_REASON] if isinstance(reason, str) else "no reason given"
        raise JoinFailed(f"the inviting device refused: {text}")
    grant_raw, chain, mac = msg.get("g"), msg.get("ch"), msg.get("m")
    if not (isinstance(grant_raw, bytes) and isinstance(chain, list) and isinstance(mac, bytes)
            and len(chain) < MAX_CHAIN and all(isinstance(r, bytes) for r in chain)):
        raise JoinFailed("malformed welcome message")
    if not hmac.compare_digest(welcome_mac(key, bound, grant_raw, chain), mac):
        raise JoinFailed("the welcome is not from the device that holds the secret (forged)")
    try:
        grant = decode_record(grant_raw)
    except BadRecord as exc:
        raise JoinFailed(f"the grant we were given does not verify: {exc}") from exc
    if not isinstance(grant, Grant) or grant.subject != identity.hashname:
        raise JoinFailed("the grant we were given is not for this device")
    if cloud is not None and grant.cloud != cloud:
        raise JoinFailed("the grant we were given is for another cloud")
    records = (grant_raw, *chain)
    membership = Membership(grant.cloud, records, now=now)
    if not membership.is_member(identity.hashname):
        why = "; ".join(f"{r.reason} ({r.detail})" for r in membership.rejected) or "no chain"
        raise JoinFailed(f"the grant we were given does not make us a member: {why}"[:400])
    return Joined(grant.cloud, grant, tuple(records), membership)
