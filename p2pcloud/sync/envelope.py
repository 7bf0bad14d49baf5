"""Signed deltas ("envelopes"): how a delta travels between members and why it is trusted.

Theory of operation
-------------------
Every delta a replica commits is sealed once by its author and then forwarded unchanged by
any member (DESIGN.md section 5: "deltas are stored per origin replica, so any member can
forward them and any receiver can verify the author"). The envelope is a CBOR map::

    {"v": 1, "s": sub-cloud id (16), "a": author CS3a key (32),
     "k": author Ed25519 verify key (32), "d": delta, "g": signature (64)}

with ``g = Ed25519(b"p2pcloud delta v1" + s + d)``. A receiver checks, cheapest first:

1. the bytes parse and every field has its type and size (``malformed``);
2. the sub-cloud is one it replicates (``unknown sub-cloud``);
3. the verify key converts to the CS3a key (``key binding``), so the author's hashname,
   which commits to the CS3a key only (telehash v3 hashname.md), also names the signer;
4. the delta's replica id (read from its header by ``p2pcloud._core.delta_span``) is the
   author's replica id for that sub-cloud (``replica id``), so nobody can write in another
   member's name even with valid rights;
5. the author's hashname has write rights to the sub-cloud (``write rights``);
6. the signature (``forged signature``), last because it is the dearest check (~65 us).

Any failure raises :class:`~p2pcloud.errors.DeltaRejected` with one of the ``REJECT_*``
reasons and nothing is applied. This module is pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import cbor2
import nacl.bindings as _nb
import nacl.exceptions

from p2pcloud import _core
from p2pcloud._crypto import (
    KEY_SIZE,
    SIGNATURE_SIZE,
    LocalIdentity,
    hashname_from_keys,
    verify_signature,
)
from p2pcloud._ids import Hashname, ReplicaId, SubCloudId
from p2pcloud.errors import CoreError, DeltaRejected, LocalProtocolError

__all__ = [
    "ENVELOPE_VERSION",
    "MAX_DELTA_BYTES",
    "MAX_ENVELOPE_BYTES",
    "REJECT_BAD_SIGNATURE",
    "REJECT_KEY_BINDING",
    "REJECT_MALFORMED",
    "REJECT_NO_WRITE_RIGHTS",
    "REJECT_REPLICA_MISMATCH",
    "REJECT_UNKNOWN_SUBCLOUD",
    "SIGNING_CONTEXT",
    "SUBCLOUD_ID_SIZE",
    "Envelope",
    "WriteCheck",
    "decode_envelope",
    "open_envelope",
    "replica_id_for",
    "seal",
]

ENVELOPE_VERSION: Final = 1
SIGNING_CONTEXT: Final = b"p2pcloud delta v1"  # domain separation: no other signed thing verifies
SUBCLOUD_ID_SIZE: Final = 16  # BRIEF: 16 random bytes
REPLICA_ID_SIZE: Final = 16  # BRIEF: first 16 bytes of SHA-256(b"p2pcloud replica" + ...)
MAX_DELTA_BYTES: Final = 4 * 1024 * 1024
"""Largest delta one envelope carries: one local transaction. Bigger writes are split into
several transactions by the application; the bound caps the memory one peer message pins."""
MAX_ENVELOPE_BYTES: Final = MAX_DELTA_BYTES + 256  # the delta plus keys, signature and CBOR

REJECT_MALFORMED: Final = "malformed"
REJECT_UNKNOWN_SUBCLOUD: Final = "unknown sub-cloud"
REJECT_KEY_BINDING: Final = "verify key does not match the CS3a key"
REJECT_REPLICA_MISMATCH: Final = "replica id is not the author's"
REJECT_NO_WRITE_RIGHTS: Final = "author has no write rights"
REJECT_BAD_SIGNATURE: Final = "forged signature"

WriteCheck = Callable[[SubCloudId, Hashname], bool]
"""``can_write(subcloud_id, hashname) -> bool``: the rights check the cloud layer supplies."""

_FIELDS: Final = frozenset({"v", "s", "a", "k", "d", "g"})


def replica_id_for(subcloud: SubCloudId, hashname: Hashname) -> ReplicaId:
    """The replica id of ``hashname``'s replica of ``subcloud`` (bound to the author).

    Args:
        subcloud: the 16-byte sub-cloud id.
        hashname: the endpoint's hashname.

    Returns:
        The first 16 bytes of ``SHA-256(b"p2pcloud replica" + subcloud + hashname ascii)``.
    """
    digest = hashlib.sha256(b"p2pcloud replica" + subcloud + hashname.encode("ascii")).digest()
    return ReplicaId(digest[:REPLICA_ID_SIZE])


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded envelope; after :func:`open_envelope` also verified.

    Attributes:
        raw: the envelope bytes exactly as received (forwarded unchanged, stored as is).
        subcloud: the sub-cloud id.
        author: the author's CS3a public key.
        verify_key: the author's Ed25519 verify key.
        delta: the core delta.
        signature: the Ed25519 signature.
        origin: the delta's replica id (from its header).
        first: the first dot counter of the delta's run.
        last: the last dot counter of the delta's run.
    """

    raw: bytes
    subcloud: SubCloudId
    author: bytes
    verify_key: bytes
    delta: bytes
    signature: bytes
    origin: ReplicaId
    first: int
    last: int

    @property
    def hashname(self) -> Hashname:
        """The author's hashname (computed from the CS3a key, telehash v3 rules)."""
        return hashname_from_keys({"3a": self.author})


def _signed_bytes(subcloud: bytes, delta: bytes) -> bytes:
    return SIGNING_CONTEXT + subcloud + delta


def seal(identity: LocalIdentity, subcloud: SubCloudId, delta: bytes) -> Envelope:
    """Sign a delta committed by ``identity``'s replica of ``subcloud``.

    Args:
        identity: the local identity (must have a signing key).
        subcloud: the sub-cloud id (16 bytes).
        delta: the bytes :meth:`Replica.commit` returned (non-empty).

    Returns:
        The envelope; ``raw`` is what goes to the store and the wire.

    Raises:
        LocalProtocolError: no signing key, a bad sub-cloud id, an empty or oversized delta,
            or a delta whose replica id is not this identity's replica of the sub-cloud.
    """
    if identity.verify_key is None:
        raise LocalProtocolError("this identity cannot sign (made from CS3a keys)")
    if len(subcloud) != SUBCLOUD_ID_SIZE:
        raise LocalProtocolError("a sub-cloud id is 16 bytes")
    if not delta or len(delta) > MAX_DELTA_BYTES:
        raise LocalProtocolError(f"a delta is 1..{MAX_DELTA_BYTES} bytes")
    try:
        origin, first, last = _core.delta_span(delta)
    except CoreError as exc:
        raise LocalProtocolError(f"not a transaction delta: {exc}") from exc
    if origin != replica_id_for(subcloud, identity.hashname):
        raise LocalProtocolError("the delta was not committed by this identity's replica")
    signature = identity.sign(_signed_bytes(subcloud, delta))
    raw = cbor2.dumps(
        {
            "v": ENVELOPE_VERSION,
            "s": bytes(subcloud),
            "a": identity.cs3a_public,
            "k": identity.verify_key,
            "d": bytes(delta),
            "g": signature,
        }
    )
    return Envelope(
        raw, subcloud, identity.cs3a_public, identity.verify_key, bytes(delta), signature,
        ReplicaId(origin), first, last,
    )


def decode_envelope(data: bytes) -> Envelope:
    """Parse an envelope and read its delta header, without checking any signature or right.

    The session uses this to learn an envelope's (origin, first, last) span cheaply.

    Args:
        data: the envelope bytes.

    Returns:
        The envelope (unverified).

    Raises:
        DeltaRejected: reason ``malformed``, whatever the bytes.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DeltaRejected(REJECT_MALFORMED, "not bytes")
    data = bytes(data)
    if len(data) > MAX_ENVELOPE_BYTES:
        raise DeltaRejected(REJECT_MALFORMED, f"longer than {MAX_ENVELOPE_BYTES} bytes")
    try:
        obj: Any = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises many types on hostile input; all mean "malformed"
        raise DeltaRejected(REJECT_MALFORMED, f"not CBOR: {exc}") from exc
    if not isinstance(obj, dict) or set(obj) != _FIELDS:
        raise DeltaRejected(REJECT_MALFORMED, "not an envelope map")
    if obj["v"] != ENVELOPE_VERSION or type(obj["v"]) is not int:
        raise DeltaRejected(REJECT_MALFORMED, f"unknown envelope version {obj['v']!r}")
    s, a, k, d, g = obj["s"], obj["a"], obj["k"], obj["d"], obj["g"]
    if not all(isinstance(x, bytes) for x in (s, a, k, d, g)):
        raise DeltaRejected(REJECT_MALFORMED, "a field is not a byte string")
    if len(s) != SUBCLOUD_ID_SIZE or len(a) != KEY_SIZE or len(k) != KEY_SIZE:
        raise DeltaRejected(REJECT_MALFORMED, "a key or id has the wrong size")
    if len(g) != SIGNATURE_SIZE or not d or len(d) > MAX_DELTA_BYTES:
        raise DeltaRejected(REJECT_MALFORMED, "signature or delta size out of range")
    try:
        origin, first, last = _core.delta_span(d)
    except CoreError as exc:
        raise DeltaRejected(REJECT_MALFORMED, f"delta header: {exc}") from exc
    return Envelope(data, SubCloudId(s), a, k, d, g, ReplicaId(origin), first, last)


def _converts_to(verify_key: bytes, cs3a_public: bytes) -> bool:
    try:
        converted = _nb.crypto_sign_ed25519_pk_to_curve25519(verify_key)
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, TypeError):
        return False
    return hmac.compare_digest(converted, cs3a_public)


def open_envelope(
    data: bytes,
    can_write: WriteCheck,
    *,
    is_known: Callable[[SubCloudId], bool] | None = None,
) -> Envelope:
    """Decode and verify an envelope from a peer; raise with a reason if it must not apply.

    Args:
        data: the envelope bytes.
        can_write: ``can_write(subcloud, hashname)``: whether the author may write.
        is_known: ``is_known(subcloud)``: whether this endpoint replicates the sub-cloud;
            None accepts every sub-cloud (the rights check then decides).

    Returns:
        The verified envelope.

    Raises:
        DeltaRejected: with ``reason`` one of the ``REJECT_*`` constants.
    """
    env = decode_envelope(data)
    if is_known is not None and not is_known(env.subcloud):
        raise DeltaRejected(REJECT_UNKNOWN_SUBCLOUD, env.subcloud.hex())
    # our identity extension (_crypto.LocalIdentity): the CS3a key is derived from the
    # Ed25519 key, so the hashname authenticates the verify key once it converts back.
    if not _converts_to(env.verify_key, env.author):
        raise DeltaRejected(REJECT_KEY_BINDING)
    hashname = env.hashname
    if env.origin != replica_id_for(env.subcloud, hashname):
        raise DeltaRejected(REJECT_REPLICA_MISMATCH, f"{env.origin.hex()} by {hashname}")
    if not can_write(env.subcloud, hashname):
        raise DeltaRejected(REJECT_NO_WRITE_RIGHTS, hashname)
    if not verify_signature(
        env.author, env.verify_key, _signed_bytes(env.subcloud, env.delta), env.signature
    ):
        raise DeltaRejected(REJECT_BAD_SIGNATURE, hashname)
    return env
