"""The bottom of the wire: base32, LOB packets and cloaking (Telehash v3, byte for byte).

Everything here is pure: bytes in, bytes out, no I/O, no clock. Randomness comes in as an
``entropy(n) -> bytes`` callable. Every decoder raises only :class:`MalformedPacket`, whatever
the bytes, and every size it accepts is bounded by a named constant below.

References (see docs/protocol/wire.md): telehash v3 ``base32.md``, ``lob.md``,
``e3x/cloaking.md``; the JS quirks are those of npm ``lob-enc@0.0.17`` (telehash-js 0.4.18).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from p2pcloud.errors import LocalProtocolError, MalformedPacket

__all__ = [
    "CHANNEL_OVERHEAD",
    "CLOAK_KEY",
    "CLOAK_NONCE_SIZE",
    "HANDSHAKE_OVERHEAD",
    "MAX_B32_TEXT",
    "MAX_CLOAK_ROUNDS",
    "MAX_HEAD",
    "MAX_INNER_PACKET",
    "MAX_PACKET",
    "MAX_UDP_PACKET",
    "MIN_JSON_HEAD",
    "Entropy",
    "Packet",
    "b32decode",
    "b32encode",
    "cloak",
    "decloak",
    "decode_packet",
    "encode_head",
    "encode_packet",
]

Entropy = Callable[[int], bytes]
"""``entropy(n)`` returns ``n`` unpredictable bytes (``os.urandom`` in the shell)."""

# -- limits (every size a decoder accepts is bounded here, with its reason) ---------------

MAX_INNER_PACKET = 1400
"""telehash v3 e3x/channels: an inner (decrypted) channel packet is at most 1400 bytes, so
that the encrypted outer packet fits a 1500-byte Ethernet MTU minus IP/UDP headers."""

CHANNEL_OVERHEAD = 2 + 16 + 24 + 16
"""LOB length (2) + TOKEN (16) + NONCE (24) + Poly1305 MAC (16): e3x/cs/3a channel packet."""

HANDSHAKE_OVERHEAD = 3 + 32 + 24 + 16 + 16
"""LOB length+CSID head (3) + KEY (32) + NONCE (24) + MAC (16) + AUTH (16): cs/3a message."""

CLOAK_NONCE_SIZE = 8
"""telehash v3 cloaking: each round prepends an 8-byte nonce (byte 0 never zero)."""

MAX_CLOAK_ROUNDS = 8
"""Decloak at most this many rounds. JS and p2pcloud send one; the C fixture (vector C1) uses
four. Random garbage has byte 0 != 0 with probability 255/256 per round, so this bound is
what keeps one bad datagram from costing more than 8 ChaCha20 passes."""

MAX_UDP_PACKET = MAX_INNER_PACKET + CHANNEL_OVERHEAD + CLOAK_NONCE_SIZE * MAX_CLOAK_ROUNDS
"""Largest datagram a v3 peer sends: a full channel packet, cloaked up to MAX_CLOAK_ROUNDS
times (1522 bytes). The UDP transport's receive buffer should be at least this large."""

MAX_PACKET = 1 << 20
"""Largest frame any transport may hand to a decoder (1 MiB): covers TCP large-frame mode
(our extension, negotiated by the transport) with room to spare, and caps what one frame can
make a decoder allocate."""

MAX_HEAD = 0x7FFF
"""telehash-js ``lob-enc`` writes LENGTH with the signed ``writeInt16BE``, so a head longer
than 32767 bytes cannot be exchanged with JS; we neither send nor accept one."""

MIN_JSON_HEAD = 7
"""telehash v3 lob.md: heads of 7 bytes or more are JSON, 1..6 bytes are binary."""

MAX_B32_TEXT = 8192
"""Longest base32 text we decode: keys are 52..472 characters and path lists in link URIs a
few hundred; 8 KiB leaves room and bounds the allocation."""

CLOAK_KEY = hashlib.sha256(b"telehash").digest()
"""telehash v3 e3x/cloaking.md: the ChaCha20 key is SHA-256("telehash")."""

_COUNTER_ZERO = bytes(8)  # cryptography's 16-byte ChaCha20 nonce = LE counter(8) || nonce(8)

# -- base32 (telehash v3 base32.md: RFC 4648, lowercase, unpadded) ------------------------

_B32_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")
# RFC 4648 padding for each possible (len % 8); other remainders cannot occur.
_B32_PAD = {0: "", 2: "======", 4: "====", 5: "===", 7: "="}


def b32encode(data: bytes) -> str:
    """Encode bytes as lowercase, unpadded RFC 4648 base32 (telehash v3 base32.md).

    Args:
        data: any bytes.

    Returns:
        The text, e.g. ``b32encode(b"foo") == "mzxw6"``.
    """
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def b32decode(text: str) -> bytes:
    """Decode lowercase, unpadded base32 strictly.

    Upper case is accepted (RFC 4648 is case-insensitive); padding, whitespace, characters
    outside the alphabet, impossible lengths and non-zero trailing bits are not, so every
    byte string has exactly one accepted spelling (hashnames compare as text).

    Args:
        text: base32 text, at most MAX_B32_TEXT characters.

    Returns:
        The decoded bytes.

    Raises:
        MalformedPacket: the text is not canonical base32.
    """
    if not isinstance(text, str):
        raise MalformedPacket("base32 must be text")
    if len(text) > MAX_B32_TEXT:
        raise MalformedPacket(f"base32 text longer than {MAX_B32_TEXT} characters")
    low = text.lower()
    remainder = len(low) % 8
    pad = _B32_PAD.get(remainder)
    if pad is None:
        raise MalformedPacket(f"base32 text of impossible length {len(text)}")
    if not _B32_ALPHABET.issuperset(low):
        raise MalformedPacket("base32 text has characters outside a-z2-7")
    try:
        data = base64.b32decode(low.upper() + pad)
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - guarded above
        raise MalformedPacket(f"bad base32: {exc}") from exc
    # Non-zero trailing bits would give a second spelling of the same bytes.
    if b32encode(data) != low:
        raise MalformedPacket("base32 text has non-zero trailing bits")
    return data


# -- LOB (telehash v3 lob.md) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Packet:
    """A decoded LOB packet: ``LENGTH(uint16 BE) | HEAD | BODY``.

    Attributes:
        head: the raw head bytes: empty (channel packets), 1..6 binary bytes (``b"\\x3a"``
            for a CS3a message), or the JSON text when 7 bytes or longer.
        json: the parsed JSON head (an object), or None when the head is shorter than 7.
        body: the rest of the packet, possibly itself a LOB (an "attached" packet).
    """

    head: bytes
    json: dict[str, Any] | None
    body: bytes


def _reject_constant(name: str) -> Any:
    # I-JSON (RFC 7493, required by lob.md) has no NaN/Infinity.
    raise ValueError(f"non-finite number {name} in JSON head")


_json_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_json_encoder = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":"), check_circular=False
)


def encode_packet(head: Mapping[str, Any] | bytes | None = None, body: bytes = b"") -> bytes:
    """Encode a LOB packet exactly as telehash-js ``lob.encode`` does.

    A mapping head is written as compact UTF-8 JSON (``{"type":"link","at":1}``, no spaces,
    key order kept). As in JS, JSON shorter than 7 bytes (e.g. ``{}``) is dropped and the
    packet gets an empty head: a decoder would otherwise read it as a binary head.

    Args:
        head: None/empty for no head, bytes for a binary head (or ready-made JSON text of 7+
            bytes, so ``encode_packet(p.head, p.body)`` re-encodes a decoded packet), or a
            JSON object.
        body: the body bytes.

    Returns:
        The packet bytes.

    Raises:
        LocalProtocolError: the head is longer than MAX_HEAD, the packet longer than
            MAX_PACKET, or the JSON head is not serializable as I-JSON.
    """
    if head is None:
        raw = b""
    elif isinstance(head, bytes | bytearray | memoryview):
        raw = bytes(head)
    else:
        try:
            raw = _json_encoder.encode(head).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise LocalProtocolError(f"head is not I-JSON: {exc}") from exc
        if len(raw) < MIN_JSON_HEAD:
            raw = b""  # lob-enc quirk: JSON heads shorter than 7 bytes are dropped
    n = len(raw)
    if n > MAX_HEAD:
        raise LocalProtocolError(f"head of {n} bytes exceeds MAX_HEAD ({MAX_HEAD})")
    if n + len(body) + 2 > MAX_PACKET:
        raise LocalProtocolError(f"packet exceeds MAX_PACKET ({MAX_PACKET})")
    return b"".join((n.to_bytes(2, "big"), raw, body))


def encode_head(head: Mapping[str, Any]) -> bytes:
    """Encode a JSON head exactly as :func:`encode_packet` writes it, without the packet.

    For callers that build the packet around it themselves (the mesh encrypts channel
    packets in one buffer, see ``_crypto.channel_seal``).

    Args:
        head: a JSON object.

    Returns:
        Compact UTF-8 JSON, or ``b""`` when shorter than 7 bytes (the lob-enc quirk).

    Raises:
        LocalProtocolError: not serializable as I-JSON, or longer than MAX_HEAD.
    """
    try:
        raw = _json_encoder.encode(head).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise LocalProtocolError(f"head is not I-JSON: {exc}") from exc
    n = len(raw)
    if n < MIN_JSON_HEAD:
        return b""  # lob-enc quirk: JSON heads shorter than 7 bytes are dropped
    if n > MAX_HEAD:
        raise LocalProtocolError(f"head of {n} bytes exceeds MAX_HEAD ({MAX_HEAD})")
    return raw


def decode_packet(data: bytes | bytearray | memoryview) -> Packet:
    """Decode one LOB packet.

    Args:
        data: the packet bytes (at most MAX_PACKET); a bytearray or memoryview is read in
            place, so the body is copied exactly once, into the packet's ``bytes``.

    Returns:
        The decoded :class:`Packet`.

    Raises:
        MalformedPacket: too short or too long, LENGTH past the end or above MAX_HEAD, or a
            7+ byte head that is not a UTF-8 I-JSON object. Nothing else, whatever the bytes.
    """
    total = len(data)
    if total < 2:
        raise MalformedPacket("packet shorter than its 2-byte length")
    if total > MAX_PACKET:
        raise MalformedPacket(f"packet of {total} bytes exceeds MAX_PACKET ({MAX_PACKET})")
    n = (data[0] << 8) | data[1]
    if n > total - 2:
        raise MalformedPacket(f"head length {n} runs past the end of a {total}-byte packet")
    if n > MAX_HEAD:
        raise MalformedPacket(f"head length {n} exceeds MAX_HEAD ({MAX_HEAD})")
    end = 2 + n
    if type(data) is bytes:
        head = data[2:end]  # slicing bytes makes the one copy
        body = data[end:]
    else:
        view = memoryview(data)  # no intermediate bytearray slice: one copy into bytes
        head = bytes(view[2:end])
        body = bytes(view[end:])
    if n < MIN_JSON_HEAD:
        return Packet(head, None, body)
    try:
        parsed = _json_decoder.decode(head.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, ints
        raise MalformedPacket(f"head is not JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise MalformedPacket("JSON head is not an object")
    return Packet(head, parsed, body)


# -- cloaking (telehash v3 e3x/cloaking.md) -----------------------------------------------


class _CloakContext(threading.local):
    """One ChaCha20 context per thread, re-keyed per packet with ``reset_nonce``.

    Creating a fresh OpenSSL context costs about 2 us per packet, more than ChaCha20 itself
    on 1400 bytes; ``reset_nonce`` (cryptography >= 43) restarts the stream at block 0 with
    the new nonce. Thread-local because a context is stateful.
    """

    def __init__(self) -> None:
        self.ctx = Cipher(algorithms.ChaCha20(CLOAK_KEY, bytes(16)), mode=None).encryptor()


_cloak_context = _CloakContext()
_HAS_RESET_NONCE = hasattr(_cloak_context.ctx, "reset_nonce")


def _chacha20(nonce8: bytes, data: bytes | memoryview) -> bytes:
    # Original DJB ChaCha20: 64-bit nonce, 64-bit block counter starting at zero;
    # cryptography takes LE counter(8) || nonce(8).
    if not _HAS_RESET_NONCE:  # cryptography < 43: a fresh context per packet
        cipher = Cipher(algorithms.ChaCha20(CLOAK_KEY, _COUNTER_ZERO + nonce8), mode=None)
        return cipher.encryptor().update(data)
    ctx = _cloak_context.ctx
    ctx.reset_nonce(_COUNTER_ZERO + nonce8)
    return ctx.update(data)


def cloak(data: bytes, entropy: Entropy, rounds: int = 1) -> bytes:
    """Cloak a packet: ``NONCE(8, byte0 != 0) | ChaCha20(K, NONCE, packet)`` per round.

    Args:
        data: a plain packet (its byte 0 is 0x00 for every packet we send).
        entropy: source of the 8 random nonce bytes per round.
        rounds: how many times to cloak (1 is what JS and p2pcloud send).

    Returns:
        The cloaked bytes, 8 bytes longer per round.

    Raises:
        LocalProtocolError: rounds outside 1..MAX_CLOAK_ROUNDS.
    """
    if not 1 <= rounds <= MAX_CLOAK_ROUNDS:
        raise LocalProtocolError(f"cloak rounds must be 1..{MAX_CLOAK_ROUNDS}")
    for _ in range(rounds):
        nonce = entropy(CLOAK_NONCE_SIZE)
        if len(nonce) != CLOAK_NONCE_SIZE:
            raise LocalProtocolError("entropy returned the wrong number of bytes")
        if nonce[0] == 0:
            # byte 0 must be non-zero: a zero byte 0 means "plain packet" to the receiver.
            # Cloaking hides traffic patterns only, so this tiny bias costs nothing.
            nonce = b"\x01" + nonce[1:]
        data = nonce + _chacha20(nonce, data)
    return data


def decloak(data: bytes) -> tuple[bytes, int]:
    """Remove every cloaking round: decloak while byte 0 is non-zero.

    Args:
        data: a received datagram/frame (at most MAX_PACKET bytes).

    Returns:
        ``(plain, rounds)``: the plain packet (byte 0 is 0x00, or the input unchanged when it
        was not cloaked) and how many rounds were removed, so a sender can mirror the peer.

    Raises:
        MalformedPacket: empty, longer than MAX_PACKET, a round too short to hold a nonce and
            a packet, or more than MAX_CLOAK_ROUNDS rounds.
    """
    if len(data) > MAX_PACKET:
        raise MalformedPacket(f"frame of {len(data)} bytes exceeds MAX_PACKET ({MAX_PACKET})")
    rounds = 0
    while True:
        if not data:
            raise MalformedPacket("empty packet")
        if data[0] == 0:
            return bytes(data), rounds
        if rounds == MAX_CLOAK_ROUNDS:
            raise MalformedPacket(f"more than {MAX_CLOAK_ROUNDS} cloaking rounds")
        if len(data) < CLOAK_NONCE_SIZE + 2:
            raise MalformedPacket("cloaked packet shorter than nonce plus a LOB length")
        view = memoryview(data)  # no copy of the ciphertext before ChaCha20 reads it
        data = _chacha20(bytes(view[:CLOAK_NONCE_SIZE]), view[CLOAK_NONCE_SIZE:])
        rounds += 1
