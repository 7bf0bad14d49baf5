"""Grants and revocations: the signed records that say who belongs to a cloud.

Theory of operation
-------------------
A cloud (DESIGN.md section 2) is the set of endpoints that hold a valid *grant*. A grant is a
small Ed25519-signed CBOR record: an issuer (an admin member) says "the endpoint with this
hashname, CS3a key and verify key is a member of cloud C with role R and these rights on
these sub-clouds, from not-before until expiry". A *revocation* is the matching signed
record that removes an endpoint. Both are self-verifying: the issuer's keys travel inside
the record and the signature covers everything else, so any member can store and forward
them unchanged (they live in the cloud sub-cloud, :mod:`p2pcloud.cloud.membership`).

Wire form of every record (versioned, size-limited)::

    record = CBOR {"v": 1, "t": "grant" | "revocation", "b": body (bytes), "g": signature (64)}
    g      = Ed25519(issuer, CONTEXT[t] + b)        # domain separated per record type
    id     = SHA-256(b"p2pcloud record id v1" + t + b)[:16]

``body`` is canonical CBOR (RFC 8949 section 4.2.1) of the fields below; the record id is a
hash of it, so two different records never share an id and a record cannot be altered
without changing its id. The signature is checked over the exact body bytes received, never
over a re-encoding.

Grant body: ``v`` version, ``c`` cloud id (16 bytes, or empty in the founding grant), ``n``
nonce (16 random bytes, so two otherwise equal grants differ), ``sh``/``sa``/``sk`` the
subject's hashname, CS3a key and Ed25519 verify key, ``r`` role (``admin``, ``device``,
``thing``), ``a`` rights (a map from a sub-cloud id, or ``"*"`` for every sub-cloud, to a
list of ``read``/``write``/``admin`` or ``["all"]``), ``nb`` not-before and ``ex`` expiry
(integer seconds since the Unix epoch, ``ex`` may be null: never), ``ih``/``ia``/``ik`` the
issuer's hashname, CS3a key and verify key.

The *founding grant* is the founder's own, self-signed (issuer == subject), role admin,
rights ``{"*": ["all"]}``, with an empty ``c``: the cloud id IS the founding grant's record
id. Nobody can swap the founder of a cloud, because a different founding grant has a
different id and so names a different cloud.

Revocation body: ``v``, ``c``, ``n``, ``rh`` the revoked hashname, ``cut`` the per-replica
cutoff (a map from each replica id of the revoked endpoint to the last dot counter the
revoker had accepted from it: later writes are rejected everywhere, with no trusted clock,
even when a third device forwards them), ``kr`` the ids of records (grants, revocations)
the revoked endpoint issued that stay in force (an admin's earlier pairings survive its
removal; anything else it signed, including back-dated grants, is void: no clock needed),
``at`` the revoker's clock (informational),
and ``ih``/``ia``/``ik``.

This module only encodes, decodes, signs and verifies single records; which records are in
force is :mod:`p2pcloud.cloud.membership`'s job. Pure: no I/O, no clock (``now`` is
passed in), randomness as ``entropy(n)``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NewType

import cbor2
import nacl.bindings as _nb
import nacl.exceptions

from p2pcloud._crypto import (
    KEY_SIZE,
    SIGNATURE_SIZE,
    LocalIdentity,
    hashname_from_keys,
    is_hashname,
)
from p2pcloud._crypto import verify_signature as _verify_signature
from p2pcloud._ids import CloudId, Hashname, ReplicaId, SubCloudId
from p2pcloud._wire import Entropy, b32encode
from p2pcloud.errors import BadRecord, LocalProtocolError, MalformedPacket

__all__ = [
    "ALL",
    "ALL_SUBCLOUDS",
    "MAX_CUTOFFS",
    "MAX_KEPT",
    "MAX_RECORD_BYTES",
    "MAX_SCOPES",
    "RECORD_VERSION",
    "RIGHTS",
    "ROLES",
    "ROLE_ADMIN",
    "ROLE_DEVICE",
    "ROLE_THING",
    "Grant",
    "Record",
    "RecordId",
    "Revocation",
    "Scope",
    "decode_record",
    "issue_grant",
    "found_cloud",
    "keys_belong",
    "record_id_text",
    "sign_revocation",
]

RecordId = NewType("RecordId", bytes)
"""The id of a grant or revocation: 16 bytes of a hash of its body (``id`` above)."""

RECORD_VERSION: Final = 1
ROLE_ADMIN: Final = "admin"
ROLE_DEVICE: Final = "device"
ROLE_THING: Final = "thing"
ROLES: Final = frozenset({ROLE_ADMIN, ROLE_DEVICE, ROLE_THING})
RIGHT_READ: Final = "read"
RIGHT_WRITE: Final = "write"
RIGHT_ADMIN: Final = "admin"
RIGHTS: Final = frozenset({RIGHT_READ, RIGHT_WRITE, RIGHT_ADMIN})
ALL: Final = "all"  # shorthand for every right
ALL_SUBCLOUDS: Final = "*"  # a rights key meaning every sub-cloud of the cloud

ID_SIZE: Final = 16  # record ids, cloud ids, sub-cloud ids, nonces: 128 bits, no collisions
REPLICA_ID_MAX: Final = 32  # BRIEF: replica ids are opaque bytes of 8..32
REPLICA_ID_MIN: Final = 8
MAX_SCOPES: Final = 256
"""Most sub-cloud entries one grant lists: a device shared with a few hundred things; a
member with access to everything uses ``"*"`` instead."""
MAX_CUTOFFS: Final = 16384
"""Most replicas one revocation cuts: a home box may hold 10,000 things (DESIGN.md section
5), each a sub-cloud the revoked endpoint may have written."""
MAX_KEPT: Final = 4096
"""Most records of a revoked admin that a revocation keeps: far above any person's devices."""
MAX_RECORD_BYTES: Final = 512 * 1024
"""Largest record: a revocation with MAX_CUTOFFS cutoffs (~26 bytes each) and MAX_KEPT
kept ids fits; a grant is a few hundred bytes. Bounds what one peer record can pin."""
MAX_TIME: Final = 1 << 40  # seconds: year 36812; keeps times inside int64 arithmetic
MAX_ROLE_TEXT: Final = 16  # longest role name we accept ("device")

_TYPE_GRANT: Final = "grant"
_TYPE_REVOCATION: Final = "revocation"
_CONTEXTS: Final = {
    # domain separation: a grant signature never verifies as a revocation or a delta
    _TYPE_GRANT: b"p2pcloud grant v1",
    _TYPE_REVOCATION: b"p2pcloud revocation v1",
}
_ID_CONTEXT: Final = b"p2pcloud record id v1"
_RECORD_FIELDS: Final = frozenset({"v", "t", "b", "g"})
_GRANT_FIELDS: Final = frozenset(
    {"v", "c", "n", "sh", "sa", "sk", "r", "a", "nb", "ex", "ih", "ia", "ik"}
)
_REVOCATION_FIELDS: Final = frozenset({"v", "c", "n", "rh", "cut", "kr", "at", "ih", "ia", "ik"})

Scope = bytes | str
"""A rights key: a 16-byte sub-cloud id, or ALL_SUBCLOUDS (``"*"``)."""


def record_id_text(record_id: bytes) -> str:
    """The text form of a record id: the doc id under which it is stored, shown to users.

    Args:
        record_id: a 16-byte record id.

    Returns:
        Lowercase unpadded base32 (26 characters).
    """
    return b32encode(record_id)


@dataclass(frozen=True, slots=True)
class Grant:
    """A decoded grant whose signature verified (by :func:`decode_record`).

    Attributes:
        raw: the record bytes exactly as signed and stored.
        id: the record id (for the founding grant, also the cloud id).
        cloud: the cloud id (the founding grant's own id for the founding grant).
        founding: True for a cloud's founding grant.
        subject: the member's hashname.
        subject_key: its CS3a key.
        subject_verify_key: its Ed25519 verify key.
        role: ``admin``, ``device`` or ``thing``.
        rights: ``(scope, rights)`` pairs, scope a sub-cloud id or ``"*"``, sorted.
        not_before: the first second the grant is valid.
        expires: the first second it is no longer valid, or None (never).
        issuer: the issuer's hashname.
        issuer_key: its CS3a key.
        issuer_verify_key: its Ed25519 verify key.
    """

    raw: bytes = field(repr=False)
    id: RecordId
    cloud: CloudId
    founding: bool
    subject: Hashname
    subject_key: bytes
    subject_verify_key: bytes
    role: str
    rights: tuple[tuple[Scope, frozenset[str]], ...]
    not_before: int
    expires: int | None
    issuer: Hashname
    issuer_key: bytes
    issuer_verify_key: bytes

    def rights_on(self, subcloud: SubCloudId) -> frozenset[str]:
        """The rights this grant gives on one sub-cloud.

        Args:
            subcloud: a sub-cloud id.

        Returns:
            The union of the ``"*"`` entry and the sub-cloud's own entry.
        """
        out: set[str] = set()
        for scope, rights in self.rights:
            if scope in (ALL_SUBCLOUDS, subcloud):
                out |= rights
        return frozenset(out)

    def valid_at(self, now: float) -> bool:
        """Whether ``now`` lies in ``[not_before, expires)``.

        Args:
            now: seconds since the Unix epoch (the caller's clock).

        Returns:
            True inside the validity window.
        """
        return self.not_before <= now and (self.expires is None or now < self.expires)


@dataclass(frozen=True, slots=True)
class Revocation:
    """A decoded revocation whose signature verified.

    Attributes:
        raw: the record bytes.
        id: the record id.
        cloud: the cloud id.
        revoked: the removed endpoint's hashname.
        cutoffs: replica id to the last counter accepted from it (absent means none).
        kept: ids of records (grants, revocations) the revoked endpoint issued that stay
            in force; any other record it signed, even back-dated, is void.
        at: the revoker's clock when it signed (informational only).
        issuer: the revoker's hashname.
        issuer_key: its CS3a key.
        issuer_verify_key: its Ed25519 verify key.
    """

    raw: bytes = field(repr=False)
    id: RecordId
    cloud: CloudId
    revoked: Hashname
    cutoffs: Mapping[ReplicaId, int]
    kept: frozenset[RecordId]
    at: int
    issuer: Hashname
    issuer_key: bytes
    issuer_verify_key: bytes


Record = Grant | Revocation
"""Either kind of signed record."""


# -- encoding --------------------------------------------------------------------------------


def _record_id(kind: str, body: bytes) -> RecordId:
    return RecordId(hashlib.sha256(_ID_CONTEXT + kind.encode("ascii") + body).digest()[:ID_SIZE])


def _seal(identity: LocalIdentity, kind: str, body_obj: dict[str, Any]) -> bytes:
    body = cbor2.dumps(body_obj, canonical=True)
    signature = identity.sign(_CONTEXTS[kind] + body)
    raw = cbor2.dumps({"v": RECORD_VERSION, "t": kind, "b": body, "g": signature}, canonical=True)
    if len(raw) > MAX_RECORD_BYTES:
        raise LocalProtocolError(f"record larger than {MAX_RECORD_BYTES} bytes")
    return raw


def _signer(identity: LocalIdentity) -> tuple[bytes, bytes]:
    if identity.verify_key is None:
        raise LocalProtocolError("this identity cannot sign (made from CS3a keys)")
    return identity.cs3a_public, identity.verify_key


def _rights_obj(rights: Mapping[Scope, Iterable[str]]) -> dict[Any, list[str]]:
    if not rights:
        raise LocalProtocolError("a grant needs at least one sub-cloud entry")
    if len(rights) > MAX_SCOPES:
        raise LocalProtocolError(f"a grant lists at most {MAX_SCOPES} sub-clouds")
    out: dict[Any, list[str]] = {}
    for scope, names in rights.items():
        if scope != ALL_SUBCLOUDS and not (isinstance(scope, bytes) and len(scope) == ID_SIZE):
            raise LocalProtocolError("a rights key is a 16-byte sub-cloud id or '*'")
        wanted = sorted(set(names))
        if wanted != [ALL] and not (wanted and set(wanted) <= RIGHTS):
            raise LocalProtocolError(f"rights must be a non-empty subset of {sorted(RIGHTS)}")
        out[bytes(scope) if isinstance(scope, bytes) else scope] = wanted
    return out


def _check_times(not_before: int, expires: int | None) -> None:
    if not 0 <= not_before < MAX_TIME:
        raise LocalProtocolError("not_before out of range")
    if expires is not None and not not_before < expires < MAX_TIME:
        raise LocalProtocolError("expiry must come after not_before")


def found_cloud(identity: LocalIdentity, *, now: float, entropy: Entropy) -> Grant:
    """Found a new cloud: the founder's self-signed admin grant (``p2pcloud init``).

    Args:
        identity: the founding endpoint (must have a signing key).
        now: seconds since the Unix epoch; the grant is valid from then on, with no expiry.
        entropy: randomness source (the nonce, so each founding makes a new cloud).

    Returns:
        The founding grant; its ``id`` is the new cloud id.

    Raises:
        LocalProtocolError: the identity cannot sign.
    """
    cs3a, vk = _signer(identity)
    nb = int(now)
    _check_times(nb, None)
    body = {
        "v": RECORD_VERSION, "c": b"", "n": _nonce(entropy),
        "sh": identity.hashname, "sa": cs3a, "sk": vk,
        "r": ROLE_ADMIN, "a": {ALL_SUBCLOUDS: [ALL]}, "nb": nb, "ex": None,
        "ih": identity.hashname, "ia": cs3a, "ik": vk,
    }
    record = decode_record(_seal(identity, _TYPE_GRANT, body))
    assert isinstance(record, Grant)
    return record


def issue_grant(
    issuer: LocalIdentity,
    cloud: CloudId,
    *,
    subject_key: bytes,
    subject_verify_key: bytes,
    role: str,
    rights: Mapping[Scope, Iterable[str]],
    not_before: int,
    expires: int | None,
    entropy: Entropy,
) -> Grant:
    """Sign a grant for a member (whether it is in force is :class:`Membership`'s call).

    Args:
        issuer: the signing admin.
        cloud: the cloud id (the founding grant's id).
        subject_key: the member's CS3a key (its hashname is computed from it).
        subject_verify_key: the member's Ed25519 verify key; must convert to ``subject_key``.
        role: ``admin``, ``device`` or ``thing``; an admin grant must give ``{"*": ["all"]}``.
        rights: scope (sub-cloud id or ``"*"``) to rights (subset of read/write/admin, or
            ``["all"]``).
        not_before: first valid second.
        expires: first invalid second, or None.
        entropy: randomness source (the nonce).

    Returns:
        The signed grant.

    Raises:
        LocalProtocolError: bad arguments, keys that do not belong together, or an issuer
            that cannot sign.
    """
    cs3a, vk = _signer(issuer)
    if len(cloud) != ID_SIZE:
        raise LocalProtocolError("a cloud id is 16 bytes")
    if role not in ROLES:
        raise LocalProtocolError(f"role must be one of {sorted(ROLES)}")
    if len(subject_key) != KEY_SIZE or len(subject_verify_key) != KEY_SIZE:
        raise LocalProtocolError("subject keys are 32 bytes each")
    if not keys_belong(subject_key, subject_verify_key):
        raise LocalProtocolError("the subject's verify key does not convert to its CS3a key")
    rights_obj = _rights_obj(rights)
    if role == ROLE_ADMIN and rights_obj != {ALL_SUBCLOUDS: [ALL]}:
        raise LocalProtocolError("an admin grant covers every sub-cloud with every right")
    _check_times(not_before, expires)
    body = {
        "v": RECORD_VERSION, "c": bytes(cloud), "n": _nonce(entropy),
        "sh": hashname_from_keys({"3a": bytes(subject_key)}), "sa": bytes(subject_key),
        "sk": bytes(subject_verify_key), "r": role, "a": rights_obj,
        "nb": int(not_before), "ex": None if expires is None else int(expires),
        "ih": issuer.hashname, "ia": cs3a, "ik": vk,
    }
    record = decode_record(_seal(issuer, _TYPE_GRANT, body))
    assert isinstance(record, Grant)
    return record


def sign_revocation(
    issuer: LocalIdentity,
    cloud: CloudId,
    revoked: Hashname,
    *,
    cutoffs: Mapping[ReplicaId, int],
    kept: Iterable[RecordId] = (),
    now: float,
    entropy: Entropy,
) -> Revocation:
    """Sign a revocation (prefer :meth:`Membership.revoke`, which refuses to remove the last
    admin and fills in the cutoffs and kept grants).

    Args:
        issuer: the signing admin.
        cloud: the cloud id.
        revoked: the hashname to remove.
        cutoffs: each replica id of the revoked endpoint to the last dot counter accepted.
        kept: ids of records the revoked endpoint issued that stay in force.
        now: the issuer's clock, recorded for people (never used to decide anything).
        entropy: randomness source.

    Returns:
        The signed revocation.

    Raises:
        LocalProtocolError: bad arguments or an issuer that cannot sign.
    """
    cs3a, vk = _signer(issuer)
    if len(cloud) != ID_SIZE:
        raise LocalProtocolError("a cloud id is 16 bytes")
    kept_ids = sorted({bytes(g) for g in kept})
    if len(cutoffs) > MAX_CUTOFFS or len(kept_ids) > MAX_KEPT:
        raise LocalProtocolError("too many cutoffs or kept records for one revocation")
    cut: dict[bytes, int] = {}
    for rid, counter in cutoffs.items():
        if not REPLICA_ID_MIN <= len(rid) <= REPLICA_ID_MAX or not 0 <= counter < 1 << 63:
            raise LocalProtocolError("a cutoff maps an 8..32-byte replica id to a counter")
        cut[bytes(rid)] = int(counter)
    if any(len(g) != ID_SIZE for g in kept_ids):
        raise LocalProtocolError("a record id is 16 bytes")
    body = {
        "v": RECORD_VERSION, "c": bytes(cloud), "n": _nonce(entropy), "rh": str(revoked),
        "cut": cut, "kr": kept_ids, "at": max(0, min(int(now), MAX_TIME - 1)),
        "ih": issuer.hashname, "ia": cs3a, "ik": vk,
    }
    record = decode_record(_seal(issuer, _TYPE_REVOCATION, body))
    assert isinstance(record, Revocation)
    return record


def _nonce(entropy: Entropy) -> bytes:
    nonce = entropy(ID_SIZE)
    if len(nonce) != ID_SIZE:
        raise LocalProtocolError("entropy returned the wrong number of bytes")
    return nonce


# -- decoding ----------------------------------------------------------------------------------


def keys_belong(cs3a: bytes, verify_key: bytes) -> bool:
    """Whether an Ed25519 verify key belongs to a CS3a key (our identity extension).

    The CS3a key is derived from the Ed25519 key (:class:`~p2pcloud._crypto.LocalIdentity`),
    so a verify key belongs to a hashname only if it converts to the hashname's CS3a key.

    Args:
        cs3a: a 32-byte CS3a public key.
        verify_key: a 32-byte Ed25519 verify key.

    Returns:
        True if ``verify_key`` converts to ``cs3a``.
    """
    try:
        converted = _nb.crypto_sign_ed25519_pk_to_curve25519(bytes(verify_key))
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, TypeError):
        return False
    return hmac.compare_digest(converted, bytes(cs3a))


def _bytes(obj: dict[str, Any], key: str, size: int | None = None) -> bytes:
    value = obj[key]
    if not isinstance(value, bytes) or (size is not None and len(value) != size):
        raise BadRecord(f"field {key!r} is not {size or 'some'} bytes")
    return value


def _int(obj: dict[str, Any], key: str, *, nullable: bool = False) -> int | None:
    value = obj[key]
    if value is None and nullable:
        return None
    if type(value) is not int or not 0 <= value < MAX_TIME:
        raise BadRecord(f"field {key!r} is not a time in range")
    return value


def _party(obj: dict[str, Any], h: str, a: str, k: str) -> tuple[Hashname, bytes, bytes]:
    cs3a = _bytes(obj, a, KEY_SIZE)
    vk = _bytes(obj, k, KEY_SIZE)
    try:
        computed = hashname_from_keys({"3a": cs3a})
    except MalformedPacket as exc:  # pragma: no cover - sizes checked above
        raise BadRecord(f"bad key in {a!r}") from exc
    if obj[h] != computed:
        raise BadRecord(f"hashname {h!r} does not match its CS3a key")
    if not keys_belong(cs3a, vk):
        raise BadRecord(f"verify key {k!r} does not belong to CS3a key {a!r}")
    return computed, cs3a, vk


def _parse_rights(value: Any) -> tuple[tuple[Scope, frozenset[str]], ...]:
    if not isinstance(value, dict) or not value or len(value) > MAX_SCOPES:
        raise BadRecord(f"rights must be a map of 1..{MAX_SCOPES} entries")
    out: list[tuple[Scope, frozenset[str]]] = []
    for scope, names in value.items():
        if not (scope == ALL_SUBCLOUDS or (isinstance(scope, bytes) and len(scope) == ID_SIZE)):
            raise BadRecord("a rights key is a 16-byte sub-cloud id or '*'")
        if not isinstance(names, list) or not names or len(names) > len(RIGHTS):
            raise BadRecord("rights must be a short non-empty list")
        if not all(isinstance(n, str) for n in names):
            raise BadRecord("rights are text")
        if names == [ALL]:
            granted = RIGHTS
        elif set(names) <= RIGHTS:
            granted = frozenset(names)
        else:
            raise BadRecord(f"unknown right in {names!r}")
        out.append((scope, granted))
    out.sort(key=lambda item: (isinstance(item[0], bytes), item[0] if isinstance(item[0], bytes)
                               else b""))
    return tuple(out)


def _decode_grant(raw: bytes, body: bytes, rid: RecordId, obj: dict[str, Any]) -> Grant:
    if set(obj) != _GRANT_FIELDS:
        raise BadRecord("grant fields are wrong")
    cloud = obj["c"]
    if not isinstance(cloud, bytes) or len(cloud) not in (0, ID_SIZE):
        raise BadRecord("cloud id is not 16 bytes")
    _bytes(obj, "n", ID_SIZE)
    subject, s_key, s_vk = _party(obj, "sh", "sa", "sk")
    issuer, i_key, i_vk = _party(obj, "ih", "ia", "ik")
    role = obj["r"]
    if not isinstance(role, str) or len(role) > MAX_ROLE_TEXT or role not in ROLES:
        raise BadRecord(f"unknown role {role!r}"[:80])
    rights = _parse_rights(obj["a"])
    nb = _int(obj, "nb")
    ex = _int(obj, "ex", nullable=True)
    assert nb is not None
    if ex is not None and ex <= nb:
        raise BadRecord("grant expires before it starts")
    if role == ROLE_ADMIN and rights != ((ALL_SUBCLOUDS, RIGHTS),):
        raise BadRecord("an admin grant must cover every sub-cloud with every right")
    founding = not cloud
    if founding and (issuer != subject or role != ROLE_ADMIN):
        raise BadRecord("a founding grant is the founder's own admin grant")
    return Grant(
        raw=raw, id=rid, cloud=CloudId(rid if founding else cloud), founding=founding,
        subject=subject, subject_key=s_key, subject_verify_key=s_vk, role=role, rights=rights,
        not_before=nb, expires=ex, issuer=issuer, issuer_key=i_key, issuer_verify_key=i_vk,
    )


def _decode_revocation(raw: bytes, rid: RecordId, obj: dict[str, Any]) -> Revocation:
    if set(obj) != _REVOCATION_FIELDS:
        raise BadRecord("revocation fields are wrong")
    cloud = _bytes(obj, "c", ID_SIZE)
    _bytes(obj, "n", ID_SIZE)
    revoked = obj["rh"]
    if not is_hashname(revoked):
        raise BadRecord("revoked hashname is malformed")
    cut = obj["cut"]
    if not isinstance(cut, dict) or len(cut) > MAX_CUTOFFS:
        raise BadRecord(f"cutoffs must be a map of at most {MAX_CUTOFFS} entries")
    cutoffs: dict[ReplicaId, int] = {}
    for key, counter in cut.items():
        if not isinstance(key, bytes) or not REPLICA_ID_MIN <= len(key) <= REPLICA_ID_MAX:
            raise BadRecord("a cutoff key is an 8..32-byte replica id")
        if type(counter) is not int or not 0 <= counter < 1 << 63:
            raise BadRecord("a cutoff counter is out of range")
        cutoffs[ReplicaId(key)] = counter
    kr = obj["kr"]
    if not isinstance(kr, list) or len(kr) > MAX_KEPT:
        raise BadRecord("kept records must be a short list")
    if not all(isinstance(g, bytes) and len(g) == ID_SIZE for g in kr):
        raise BadRecord("a kept record id is 16 bytes")
    at = _int(obj, "at")
    assert at is not None
    issuer, i_key, i_vk = _party(obj, "ih", "ia", "ik")
    return Revocation(
        raw=raw, id=rid, cloud=CloudId(cloud), revoked=Hashname(revoked), cutoffs=cutoffs,
        kept=frozenset(RecordId(g) for g in kr), at=at, issuer=issuer, issuer_key=i_key,
        issuer_verify_key=i_vk,
    )


def decode_record(data: bytes) -> Grant | Revocation:
    """Decode a grant or revocation and verify its signature.

    A record that comes back is well formed and signed by the key it names as issuer; whether
    that issuer may issue it is decided by :class:`~p2pcloud.cloud.membership.Membership`.

    Args:
        data: the record bytes (from the cloud sub-cloud, an invite reply, a peer).

    Returns:
        A :class:`Grant` or a :class:`Revocation`.

    Raises:
        BadRecord: whatever is wrong, whatever the bytes ("forged signature" when only the
            signature fails).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadRecord("a record is bytes")
    raw = bytes(data)
    if len(raw) > MAX_RECORD_BYTES:
        raise BadRecord(f"record longer than {MAX_RECORD_BYTES} bytes")
    try:
        outer: Any = cbor2.loads(raw)
    except Exception as exc:  # cbor2 raises many types on hostile input; all mean "malformed"
        raise BadRecord(f"record is not CBOR: {type(exc).__name__}") from exc
    if not isinstance(outer, dict) or set(outer) != _RECORD_FIELDS:
        raise BadRecord("not a record map")
    if type(outer["v"]) is not int or outer["v"] != RECORD_VERSION:
        raise BadRecord(f"unknown record version {outer['v']!r}"[:80])
    kind = outer["t"]
    if kind not in _CONTEXTS:
        raise BadRecord("unknown record type")
    body, signature = outer["b"], outer["g"]
    if not isinstance(body, bytes) or not isinstance(signature, bytes):
        raise BadRecord("body and signature are bytes")
    if len(signature) != SIGNATURE_SIZE:
        raise BadRecord("signature is not 64 bytes")
    if cbor2.dumps(outer, canonical=True) != raw:
        # one record, one byte string: no re-encoding of the same signed body may travel
        # under the same id (the set of records, and what is stored, stays a function of it)
        raise BadRecord("record is not canonical CBOR")
    try:
        obj: Any = cbor2.loads(body)
    except Exception as exc:  # as above: hostile bytes, typed error
        raise BadRecord(f"record body is not CBOR: {type(exc).__name__}") from exc
    if not isinstance(obj, dict) or any(not isinstance(k, str) for k in obj):
        raise BadRecord("record body is not a map")
    if type(obj.get("v")) is not int or obj["v"] != RECORD_VERSION:
        raise BadRecord("unknown record body version")
    rid = _record_id(kind, body)
    record: Grant | Revocation
    try:
        if kind == _TYPE_GRANT:
            record = _decode_grant(raw, body, rid, obj)
        else:
            record = _decode_revocation(raw, rid, obj)
    except (KeyError, TypeError) as exc:  # pragma: no cover - field sets checked first
        raise BadRecord(f"record fields are wrong: {exc}") from exc
    # Signature last: it is the dearest check and needs the issuer's keys parsed and bound.
    if not _verify_signature(record.issuer_key, record.issuer_verify_key,
                             _CONTEXTS[kind] + body, signature):
        raise BadRecord("forged signature")
    return record
