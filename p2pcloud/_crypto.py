"""Identity, hashnames and the CS3a cipher set (Telehash v3, byte for byte).

Pure: no I/O, no clock; randomness arrives as ``entropy(n) -> bytes``. Library errors from
PyNaCl and ``cryptography`` are translated to :class:`HandshakeFailed` where they enter.

CS3a (telehash v3 e3x/cs/3a.md with the errata in docs/protocol/wire.md):

* ``beforenm(pk, sk)`` = HSalsa20(X25519(sk, pk)) = libsodium ``crypto_box_beforenm``.
* message (handshake) body: ``KEY(32) | NONCE(24) | secretbox(inner) (16+n) | AUTH(16)``,
  box key ``beforenm(rcpt_static, sender_eph)``, AUTH = Poly1305 over everything before it,
  keyed with ``SHA256(NONCE || beforenm(rcpt_static, sender_static))``.
* channel keys: ``SHA256(s || my_eph || peer_eph)`` / ``SHA256(s || peer_eph || my_eph)``
  with ``s = beforenm(peer_eph, my_eph_sk)``; the full 32 bytes (no folding).
* channel packet body: ``TOKEN(16) | NONCE(24) | secretbox(inner)``; TOKEN is the
  recipient's, ``SHA256(recipient_eph[:16])[:16]``.

Identity (our extension, invisible on the wire): every p2pcloud endpoint has an Ed25519
signing key and its CS3a key pair is derived from it, so the hashname (which commits to the
CS3a key only, as v3 requires) also authenticates the Ed25519 verify key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

import nacl.bindings as _nb
import nacl.exceptions
import nacl.signing
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.poly1305 import Poly1305
from nacl._sodium import ffi as _ffi
from nacl._sodium import lib as _lib

from p2pcloud._ids import CSID, HASHNAME_LENGTH, Hashname
from p2pcloud._wire import Entropy, b32decode, b32encode
from p2pcloud.errors import HandshakeFailed, LocalProtocolError, MalformedPacket

__all__ = [
    "AUTH_SIZE",
    "CSID_3A",
    "KEY_SIZE",
    "MAC_SIZE",
    "MESSAGE_MIN",
    "CHANNEL_MIN",
    "NONCE_SIZE",
    "SIGNATURE_SIZE",
    "TOKEN_SIZE",
    "LocalIdentity",
    "auth_secret",
    "beforenm",
    "channel_decrypt",
    "channel_encrypt",
    "channel_keys",
    "cs3a_keypair",
    "hashname_from_keys",
    "hashname_from_intermediates",
    "intermediate",
    "is_hashname",
    "message_decrypt",
    "channel_seal",
    "channel_unseal",
    "message_encrypt",
    "message_verify",
    "token_for",
    "verify_signature",
]

CSID_3A: CSID = CSID(0x3A)
"""The one cipher set p2pcloud speaks: Curve25519 + XSalsa20-Poly1305 (telehash v3 cs/3a)."""

KEY_SIZE = 32  # Curve25519 public and secret keys; Ed25519 seeds and verify keys
NONCE_SIZE = 24  # XSalsa20 nonce
MAC_SIZE = 16  # secretbox Poly1305 tag, stored in front of the ciphertext (MAC || C)
AUTH_SIZE = 16  # the message AUTH, a Poly1305 tag
TOKEN_SIZE = 16  # e3x/cs/3a: routing token = SHA256(eph[:16])[:16]
SIGNATURE_SIZE = 64  # Ed25519 detached signature
MESSAGE_MIN = KEY_SIZE + NONCE_SIZE + MAC_SIZE + AUTH_SIZE  # 88: a message with empty inner
CHANNEL_MIN = TOKEN_SIZE + NONCE_SIZE + MAC_SIZE  # 56: a channel packet with empty inner

_MAX_CSIDS = 16
"""Most cipher sets one hashname may combine; v3 defines five, this bounds peer input."""

_sha256 = hashlib.sha256
_box_beforenm = _nb.crypto_box_beforenm
_secretbox = _nb.crypto_secretbox_easy
_secretbox_open = _nb.crypto_secretbox_open_easy
_CryptoError = nacl.exceptions.CryptoError
_NaclValueError = nacl.exceptions.ValueError


# -- hashnames (telehash v3 hashname.md) --------------------------------------------------


def intermediate(key: bytes) -> bytes:
    """The hashname intermediate of one cipher-set key: ``SHA256(CSK)``.

    Args:
        key: the raw cipher-set key (CSK) bytes.

    Returns:
        32 bytes; its base32 stands in for the key in handshakes and link JSON.
    """
    return _sha256(key).digest()


def _csid_byte(csid: str) -> int:
    if not (isinstance(csid, str) and len(csid) == 2):
        raise MalformedPacket(f"cipher-set id {csid!r} is not two hex digits")
    try:
        value = int(csid, 16)
    except ValueError as exc:
        raise MalformedPacket(f"cipher-set id {csid!r} is not two hex digits") from exc
    if value == 0 or csid != csid.lower():
        raise MalformedPacket(f"cipher-set id {csid!r} is invalid (00 or upper case)")
    return value


def hashname_from_intermediates(intermediates: Mapping[str, bytes]) -> Hashname:
    """Roll intermediates into a hashname (telehash v3 hashname.md).

    ``roll = sha256(roll || csid_byte); roll = sha256(roll || intermediate)`` over the
    CSIDs in ascending order, starting from the empty string; the hashname is base32(roll).

    Args:
        intermediates: CSID text (``"3a"``) to its 32-byte intermediate.

    Returns:
        The 52-character hashname.

    Raises:
        MalformedPacket: no CSIDs, too many, a bad CSID or an intermediate of the wrong size.
    """
    if not intermediates:
        raise MalformedPacket("a hashname needs at least one cipher-set key")
    if len(intermediates) > _MAX_CSIDS:
        raise MalformedPacket(f"more than {_MAX_CSIDS} cipher sets")
    ordered = sorted((_csid_byte(csid), value) for csid, value in intermediates.items())
    roll = b""
    for csid_byte, value in ordered:
        if not isinstance(value, bytes) or len(value) != 32:
            raise MalformedPacket(f"intermediate for {csid_byte:02x} is not 32 bytes")
        roll = _sha256(roll + bytes((csid_byte,))).digest()
        roll = _sha256(roll + value).digest()
    return Hashname(b32encode(roll))


def hashname_from_keys(
    keys: Mapping[str, bytes], intermediates: Mapping[str, bytes] | None = None
) -> Hashname:
    """Compute a hashname from cipher-set keys, plus intermediates for keys we lack.

    Args:
        keys: CSID text to raw CSK bytes (``{"3a": pk32}``).
        intermediates: CSID text to 32-byte intermediates, for cipher sets whose keys are
            not known (a link handshake carries one key plus the others' intermediates).
            A CSID present in both uses the key.

    Returns:
        The 52-character hashname.

    Raises:
        MalformedPacket: as :func:`hashname_from_intermediates`.
    """
    rolled: dict[str, bytes] = dict(intermediates or {})
    for csid, key in keys.items():
        if not isinstance(key, bytes):
            raise MalformedPacket(f"key for {csid!r} is not bytes")
        rolled[csid] = intermediate(key)
    return hashname_from_intermediates(rolled)


def is_hashname(text: object) -> bool:
    """Whether ``text`` is a well-formed hashname (52 canonical base32 characters).

    Args:
        text: anything.

    Returns:
        True for a 52-character lowercase base32 string of 32 bytes.
    """
    if not isinstance(text, str) or len(text) != HASHNAME_LENGTH or text != text.lower():
        return False
    try:
        return len(b32decode(text)) == 32
    except MalformedPacket:
        return False


# -- identity -----------------------------------------------------------------------------


def cs3a_keypair(entropy: Entropy) -> tuple[bytes, bytes]:
    """Make a Curve25519 key pair from 32 bytes of entropy (as tweetnacl ``fromSecretKey``).

    Args:
        entropy: randomness source.

    Returns:
        ``(public, secret)``, 32 bytes each.
    """
    secret = entropy(KEY_SIZE)
    if len(secret) != KEY_SIZE:
        raise LocalProtocolError("entropy returned the wrong number of bytes")
    return _nb.crypto_scalarmult_base(secret), secret


class LocalIdentity:
    """This endpoint's keys: an Ed25519 signing key and the CS3a key pair derived from it.

    Derivation (ours, not v3): ``cs3a_secret = crypto_sign_ed25519_sk_to_curve25519(sk)``,
    ``cs3a_public = crypto_sign_ed25519_pk_to_curve25519(vk)``. The hashname commits to the
    CS3a key only (so telehash-js computes the same one), and since the CS3a key is a
    function of the verify key, a peer checks a claimed verify key by converting it
    (:func:`verify_signature`). Identities made with :meth:`from_cs3a` (vectors, keys from
    telehash-js) have no signing key and cannot sign.

    Attributes:
        cs3a_public: 32-byte Curve25519 public key (the CSK for "3a").
        cs3a_secret: 32-byte Curve25519 secret key.
        hashname: the Telehash v3 hashname of ``{"3a": cs3a_public}``.
        signing_key: the Ed25519 signing key, or None.
        verify_key: the 32-byte Ed25519 verify key, or None.
    """

    __slots__ = ("cs3a_public", "cs3a_secret", "hashname", "signing_key", "verify_key")

    def __init__(
        self,
        cs3a_public: bytes,
        cs3a_secret: bytes,
        signing_key: nacl.signing.SigningKey | None = None,
    ) -> None:
        """Build an identity; prefer :meth:`generate`, :meth:`from_seed`, :meth:`from_cs3a`.

        Args:
            cs3a_public: 32-byte Curve25519 public key.
            cs3a_secret: 32-byte Curve25519 secret key; must match ``cs3a_public``.
            signing_key: the Ed25519 key the CS3a pair was derived from, if any.

        Raises:
            LocalProtocolError: wrong sizes, or the keys do not belong together.
        """
        if len(cs3a_public) != KEY_SIZE or len(cs3a_secret) != KEY_SIZE:
            raise LocalProtocolError("CS3a keys are 32 bytes each")
        if not hmac.compare_digest(_nb.crypto_scalarmult_base(cs3a_secret), cs3a_public):
            raise LocalProtocolError("CS3a secret key does not match the public key")
        self.cs3a_public: bytes = bytes(cs3a_public)
        self.cs3a_secret: bytes = bytes(cs3a_secret)
        self.signing_key: nacl.signing.SigningKey | None = signing_key
        self.verify_key: bytes | None = (
            bytes(signing_key.verify_key) if signing_key is not None else None
        )
        if self.verify_key is not None and not hmac.compare_digest(
            _nb.crypto_sign_ed25519_pk_to_curve25519(self.verify_key), cs3a_public
        ):
            raise LocalProtocolError("CS3a key is not derived from the signing key")
        self.hashname: Hashname = hashname_from_keys({"3a": self.cs3a_public})

    @classmethod
    def from_seed(cls, seed: bytes) -> LocalIdentity:
        """Rebuild an identity from its 32-byte Ed25519 seed (what key files store).

        Args:
            seed: the Ed25519 seed.

        Returns:
            The identity, CS3a keys derived from the signing key.

        Raises:
            LocalProtocolError: the seed is not 32 bytes.
        """
        if len(seed) != KEY_SIZE:
            raise LocalProtocolError("an Ed25519 seed is 32 bytes")
        signing_key = nacl.signing.SigningKey(bytes(seed))
        sk64 = bytes(seed) + bytes(signing_key.verify_key)  # libsodium's 64-byte secret key
        secret = _nb.crypto_sign_ed25519_sk_to_curve25519(sk64)
        public = _nb.crypto_sign_ed25519_pk_to_curve25519(bytes(signing_key.verify_key))
        return cls(public, secret, signing_key)

    @classmethod
    def generate(cls, entropy: Entropy) -> LocalIdentity:
        """Make a new identity from 32 bytes of entropy.

        Args:
            entropy: randomness source (``os.urandom`` in the shell).

        Returns:
            A fresh identity with a signing key.
        """
        seed = entropy(KEY_SIZE)
        return cls.from_seed(seed)

    @classmethod
    def from_cs3a(cls, public: bytes, secret: bytes) -> LocalIdentity:
        """An identity from a bare CS3a key pair (test vectors, keys made by telehash-js).

        Args:
            public: 32-byte Curve25519 public key.
            secret: 32-byte Curve25519 secret key.

        Returns:
            An identity that can link but not sign.

        Raises:
            LocalProtocolError: the keys do not belong together.
        """
        return cls(public, secret, None)

    @property
    def seed(self) -> bytes | None:
        """The 32-byte Ed25519 seed, or None for a CS3a-only identity."""
        return bytes(self.signing_key) if self.signing_key is not None else None

    def keys(self) -> dict[str, str]:
        """The public keys as link JSON carries them.

        Returns:
            ``{"3a": base32(cs3a_public)}``.
        """
        return {"3a": b32encode(self.cs3a_public)}

    def sign(self, msg: bytes) -> bytes:
        """Sign a message with the Ed25519 key.

        Args:
            msg: the bytes to sign.

        Returns:
            The 64-byte detached signature.

        Raises:
            LocalProtocolError: this identity has no signing key (made by from_cs3a).
        """
        if self.signing_key is None:
            raise LocalProtocolError("this identity has no signing key (made from CS3a keys)")
        return bytes(self.signing_key.sign(msg).signature)

    def __repr__(self) -> str:
        # Never print secret keys, not even in a traceback.
        return f"LocalIdentity(hashname={self.hashname!r}, signs={self.signing_key is not None})"


def verify_signature(cs3a_public: bytes, verify_key: bytes, msg: bytes, sig: bytes) -> bool:
    """Check an Ed25519 signature by the endpoint whose CS3a key is ``cs3a_public``.

    The verify key is accepted only if it converts to ``cs3a_public``, so a hashname (which
    commits to the CS3a key) authenticates it.

    Args:
        cs3a_public: the signer's 32-byte CS3a key (from its verified handshake or hashname).
        verify_key: the 32-byte Ed25519 verify key the signer claims.
        msg: the signed bytes.
        sig: the 64-byte detached signature.

    Returns:
        True only if the verify key belongs to ``cs3a_public`` and the signature is valid.
    """
    if len(verify_key) != KEY_SIZE or len(sig) != SIGNATURE_SIZE or len(cs3a_public) != 32:
        return False
    try:
        converted = _nb.crypto_sign_ed25519_pk_to_curve25519(bytes(verify_key))
    except (_CryptoError, _NaclValueError, TypeError):
        return False
    if not hmac.compare_digest(converted, cs3a_public):
        return False
    try:
        nacl.signing.VerifyKey(bytes(verify_key)).verify(msg, bytes(sig))
    except (nacl.exceptions.BadSignatureError, _CryptoError, _NaclValueError, TypeError):
        return False
    return True


# -- CS3a primitives (telehash v3 e3x/cs/3a.md) -------------------------------------------


def beforenm(public: bytes, secret: bytes) -> bytes:
    """The CS3a shared secret: HSalsa20(X25519(secret, public)), not the raw X25519 output.

    Args:
        public: the other side's 32-byte Curve25519 key.
        secret: our 32-byte Curve25519 secret.

    Returns:
        32 bytes.

    Raises:
        HandshakeFailed: a bad key size or a low-order public key (all-zero shared secret).
    """
    try:
        return _box_beforenm(public, secret)
    except (_CryptoError, _NaclValueError, TypeError) as exc:
        raise HandshakeFailed(f"key agreement failed: {exc}") from exc


def auth_secret(remote_static: bytes, local_static_secret: bytes) -> bytes:
    """The static-static secret keying message AUTH: ``beforenm(remote, local)``.

    It is constant for a pair of endpoints, so an exchange computes it once.

    Args:
        remote_static: the other endpoint's CS3a key.
        local_static_secret: our CS3a secret.

    Returns:
        32 bytes.

    Raises:
        HandshakeFailed: as :func:`beforenm`.
    """
    return beforenm(remote_static, local_static_secret)


def message_encrypt(
    inner: bytes,
    *,
    eph_public: bytes,
    box_key: bytes,
    auth_key: bytes,
    nonce: bytes,
) -> bytes:
    """Encrypt a CS3a message (handshake) body.

    Args:
        inner: the inner packet (a LOB).
        eph_public: our ephemeral public key (the ``KEY`` field, fixed for the exchange).
        box_key: ``beforenm(recipient_static, our_eph_secret)``.
        auth_key: ``beforenm(recipient_static, our_static_secret)`` (:func:`auth_secret`).
        nonce: 24 random bytes.

    Returns:
        ``KEY | NONCE | MAC+C | AUTH``; the wire packet is ``LOB(head=0x3a, body)``.
    """
    boxed = b"".join((eph_public, nonce, _secretbox(inner, nonce, box_key)))
    # telehash v3 cs/3a: AUTH = Poly1305(everything before it, SHA256(NONCE || secret)).
    tag = Poly1305.generate_tag(_sha256(nonce + auth_key).digest(), boxed)
    return boxed + tag


def message_verify(body: bytes, auth_key: bytes) -> bool:
    """Verify a CS3a message's AUTH with the static-static secret.

    Args:
        body: the message body (``KEY | NONCE | MAC+C | AUTH``).
        auth_key: ``beforenm(sender_static, our_static_secret)``.

    Returns:
        True when AUTH is valid (constant-time comparison).
    """
    if len(body) < MESSAGE_MIN:
        return False
    view = memoryview(body)
    nonce = bytes(view[KEY_SIZE : KEY_SIZE + NONCE_SIZE])
    try:
        Poly1305.verify_tag(
            _sha256(nonce + auth_key).digest(), view[:-AUTH_SIZE], bytes(view[-AUTH_SIZE:])
        )
    except InvalidSignature:
        return False
    return True


def message_decrypt(body: bytes, local_static_secret: bytes) -> tuple[bytes, bytes]:
    """Open a CS3a message body with our static key (AUTH is checked separately).

    The secretbox MAC already proves the inner packet came from the holder of the ephemeral
    key; the caller must then check AUTH (:func:`message_verify`) with the sender's static
    key before trusting who sent it.

    Args:
        body: ``KEY | NONCE | MAC+C | AUTH``.
        local_static_secret: our CS3a secret.

    Returns:
        ``(ephemeral_public, inner)``.

    Raises:
        MalformedPacket: shorter than MESSAGE_MIN.
        HandshakeFailed: the box does not open (wrong recipient, altered bytes).
    """
    if len(body) < MESSAGE_MIN:
        raise MalformedPacket(f"CS3a message shorter than {MESSAGE_MIN} bytes")
    view = memoryview(body)
    eph = bytes(view[:KEY_SIZE])
    nonce = bytes(view[KEY_SIZE : KEY_SIZE + NONCE_SIZE])
    key = beforenm(eph, local_static_secret)
    try:
        inner = _secretbox_open(bytes(view[KEY_SIZE + NONCE_SIZE : -AUTH_SIZE]), nonce, key)
    except (_CryptoError, _NaclValueError) as exc:
        raise HandshakeFailed("handshake does not decrypt with our key") from exc
    return eph, inner


def channel_keys(
    my_eph_public: bytes, my_eph_secret: bytes, peer_eph_public: bytes
) -> tuple[bytes, bytes]:
    """Derive the two channel keys of a session (full SHA-256; the spec's "/2" is an error).

    Args:
        my_eph_public: our ephemeral public key.
        my_eph_secret: our ephemeral secret key.
        peer_eph_public: the peer's ephemeral public key (from its handshake).

    Returns:
        ``(enc_key, dec_key)``.

    Raises:
        HandshakeFailed: the peer's ephemeral key is unusable.
    """
    s = beforenm(peer_eph_public, my_eph_secret)
    enc = _sha256(s + my_eph_public + peer_eph_public).digest()
    dec = _sha256(s + peer_eph_public + my_eph_public).digest()
    return enc, dec


def token_for(eph_public: bytes) -> bytes:
    """The routing token of an ephemeral key: ``SHA256(eph[:16])[:16]``.

    Each side's incoming channel packets carry its own token (made from its own key).

    Args:
        eph_public: an ephemeral public key (or the first bytes of a handshake body).

    Returns:
        16 bytes.
    """
    return _sha256(eph_public[:16]).digest()[:TOKEN_SIZE]


def channel_encrypt(inner: bytes, *, enc_key: bytes, token: bytes, nonce: bytes) -> bytes:
    """Encrypt an inner channel packet into a full wire packet.

    Args:
        inner: the inner LOB.
        enc_key: our channel encryption key.
        token: the recipient's token.
        nonce: 24 random bytes.

    Returns:
        ``LOB(no head, TOKEN | NONCE | MAC+C)``, starting with ``00 00``.
    """
    return b"".join((b"\x00\x00", token, nonce, _secretbox(inner, nonce, enc_key)))


CHANNEL_PREFIX = 2 + TOKEN_SIZE + NONCE_SIZE
"""Bytes of a channel wire packet before its box: LOB length 0 (2), TOKEN, NONCE."""

_INNER_START = CHANNEL_PREFIX + MAC_SIZE  # where the inner packet's plaintext/ciphertext sits


def channel_seal(
    head: bytes, body: bytes | memoryview, *, enc_key: bytes, token: bytes, nonce: bytes
) -> bytearray:
    """Build and encrypt a channel wire packet in one buffer: the fast path of the mesh.

    Same bytes as ``channel_encrypt(encode_packet(head, body), ...)``, with one copy of the
    body instead of four: the inner LOB (``LENGTH | head | body``) is written straight into
    the wire packet at the place of its ciphertext and encrypted there in place (libsodium's
    ``crypto_secretbox_easy`` allows it: the MAC goes in front, where we left room).

    Args:
        head: the inner packet's raw head (JSON text, or empty), at most 0xFFFF bytes.
        body: the inner packet's body.
        enc_key: our 32-byte channel encryption key.
        token: the recipient's 16-byte token.
        nonce: 24 random bytes.

    Returns:
        ``LOB(no head, TOKEN | NONCE | MAC+C)`` as a new bytearray (not changed afterwards).

    Raises:
        LocalProtocolError: a key, token, nonce or head of the wrong size.
    """
    if len(enc_key) != KEY_SIZE or len(token) != TOKEN_SIZE or len(nonce) != NONCE_SIZE:
        raise LocalProtocolError("channel key, token or nonce of the wrong size")
    n = len(head)
    if n > 0xFFFF:
        raise LocalProtocolError("inner head longer than a LOB length can say")
    start = _INNER_START
    mlen = 2 + n + len(body)
    prefix = bytearray(start + 2 + n)  # small: everything in front of the body
    prefix[2:18] = token
    prefix[18:CHANNEL_PREFIX] = nonce
    prefix[start] = n >> 8
    prefix[start + 1] = n & 0xFF
    prefix[start + 2 :] = head
    out = prefix + body  # one allocation of the final size, one copy of the body
    buf = _ffi.from_buffer("unsigned char[]", out)
    # in place: ciphertext (MAC first) over the plaintext that starts MAC_SIZE further on
    if _lib.crypto_secretbox_easy(buf + CHANNEL_PREFIX, buf + start, mlen, nonce, enc_key):
        raise LocalProtocolError("secretbox refused to encrypt")  # pragma: no cover
    return out


def channel_unseal(body: bytes | bytearray | memoryview, dec_key: bytes) -> bytearray:
    """Decrypt a channel packet body without copying it first: the fast path of the mesh.

    Args:
        body: ``TOKEN | NONCE | MAC+C`` (a memoryview into the received frame is fine).
        dec_key: our 32-byte channel decryption key.

    Returns:
        The inner packet bytes, in a new bytearray.

    Raises:
        MalformedPacket: shorter than CHANNEL_MIN.
        HandshakeFailed: the box does not open (altered bytes, wrong or stale key).
    """
    clen = len(body) - TOKEN_SIZE - NONCE_SIZE
    if clen < MAC_SIZE:
        raise MalformedPacket(f"channel packet shorter than {CHANNEL_MIN} bytes")
    if len(dec_key) != KEY_SIZE:
        raise HandshakeFailed("channel key of the wrong size")
    out = bytearray(clen - MAC_SIZE or 1)  # cffi needs a non-empty buffer to point into
    src = _ffi.from_buffer("unsigned char[]", body)
    dst = _ffi.from_buffer("unsigned char[]", out)
    if _lib.crypto_secretbox_open_easy(
        dst, src + (TOKEN_SIZE + NONCE_SIZE), clen, src + TOKEN_SIZE, dec_key
    ):
        raise HandshakeFailed("channel packet does not decrypt")
    if clen == MAC_SIZE:
        del out[:]
    return out


def channel_decrypt(body: bytes, dec_key: bytes) -> bytes:
    """Decrypt a channel packet body (the caller has matched the token).

    Args:
        body: ``TOKEN | NONCE | MAC+C``.
        dec_key: our channel decryption key.

    Returns:
        The inner packet bytes.

    Raises:
        MalformedPacket: shorter than CHANNEL_MIN.
        HandshakeFailed: the box does not open (altered bytes, wrong or stale key).
    """
    if len(body) < CHANNEL_MIN:
        raise MalformedPacket(f"channel packet shorter than {CHANNEL_MIN} bytes")
    view = memoryview(body)
    try:
        return _secretbox_open(
            bytes(view[TOKEN_SIZE + NONCE_SIZE :]),
            bytes(view[TOKEN_SIZE : TOKEN_SIZE + NONCE_SIZE]),
            dec_key,
        )
    except (_CryptoError, _NaclValueError) as exc:
        raise HandshakeFailed("channel packet does not decrypt") from exc
