"""Handing a thing on to another person's cloud, with its whole history or a chosen part.

Theory of operation
-------------------
Ownership changes hands (a sale, a gift; research/peers.md section 4 item 1: "unsolved
everywhere") in four pure steps, run by a device of the old owner's cloud that has opened the
thing key (p2pcloud.things.thing.open_thing_key):

1. :func:`prepare_transfer` builds a *new* sub-cloud for the thing: a filtered copy of the old
   one (all collections and logs, or the chosen ones; the profile always), authored by the
   thing itself (replica id ``replica_id_for(new sub-cloud, thing hashname)``) in one or more
   transactions, each sealed as an ordinary signed delta (p2pcloud/sync/envelope.py), so the
   new cloud's store keeps and forwards them like any other. It re-seals the thing key to
   the new cloud's members only, rotates the finder capability, keeps the claim secret
   spent, and signs a :class:`TransferRecord` with the thing's Ed25519 key: old and new
   sub-cloud, old and new cloud, the scope and a hash over the deltas.
2. The :class:`TransferPackage` (record + envelopes + new finder capability) goes to the new
   owner over an encrypted link (a ``thing`` channel claim response, or any channel).
3. :func:`accept_transfer` on a device of the new cloud verifies the record (the key binds
   to the hashname, the signature, the destination is this cloud), every envelope (signed by
   the thing, for the new sub-cloud), the content hash, that the seal opens for this device,
   and applies the deltas to its new replica; it keeps the record in the ``transfers`` log.
4. :func:`end_access` writes the record into the *old* sub-cloud and marks it ended; the old
   cloud's devices stop answering for the thing and lose their key seals.

The old owner's devices are not members of the new sub-cloud (its id is fresh), so nothing
written after the hand-over reaches them. The thing's hashname and key stay the same, so the
printed tag still resolves; only the finder capability on it is outdated until the new
owner prints a new tag. What a transfer cannot undo: the old owner has seen the key (see
docs/things.md "transfer" for what that allows and does not allow).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import cbor2

from p2pcloud._core import Replica, encode_value
from p2pcloud._crypto import (
    KEY_SIZE,
    SIGNATURE_SIZE,
    LocalIdentity,
    hashname_from_keys,
    verify_signature,
)
from p2pcloud._ids import CloudId, Hashname, SubCloudId
from p2pcloud._wire import Entropy
from p2pcloud.errors import (
    CoreError,
    DeltaRejected,
    LocalProtocolError,
    ThingError,
    TransferError,
)
from p2pcloud.sync.envelope import open_envelope, replica_id_for, seal
from p2pcloud.things import thing as _t

__all__ = [
    "MAX_PACKAGE_BYTES",
    "RECORD_VERSION",
    "TRANSFERABLE",
    "AcceptedThing",
    "TransferPackage",
    "TransferRecord",
    "accept_transfer",
    "access_ended",
    "content_hash",
    "end_access",
    "prepare_transfer",
    "transfer_records",
]

RECORD_VERSION: Final = 1
SIGNING_CONTEXT: Final = b"p2pcloud thing transfer v1"  # domain separation for the signature
MAX_PACKAGE_BYTES: Final = 16 * 1024 * 1024
"""Largest transfer package decoded: a thing's history holds readings and metadata (blobs
travel separately by hash); 16 MiB is years of readings and bounds a peer's message."""
MAX_PACKAGE_ENVELOPES: Final = 64  # 64 transactions of TXN_BUDGET cover MAX_PACKAGE_BYTES
TXN_BUDGET: Final = 1024 * 1024
"""Copied bytes per transaction: a quarter of MAX_DELTA_BYTES (the envelope limit), leaving
room for the delta format's own overhead."""
MAX_RECORD_BYTES: Final = 4096  # a record is ids, keys and a scope: a few hundred bytes
MAX_SCOPE: Final = 64  # collection and log names one transfer may list
TRANSFERABLE: Final = (_t.PROFILE, _t.NOTES, _t.FILES, _t.CARD, _t.RULES,
                       _t.READINGS, _t.EVENTS, _t.INBOX, _t.TRANSFERS)
"""What a transfer may copy; ``access``, ``keys`` and ``done`` are always made afresh."""
_NEVER_COPIED: Final = frozenset({_t.ACCESS, _t.KEYS, _t.DONE})


@dataclass(frozen=True, slots=True)
class TransferRecord:
    """A signed statement by the thing: "I now belong to ``to_cloud``".

    Attributes:
        thing_key: the thing's CS3a key. verify_key: its Ed25519 verify key.
        old_subcloud, new_subcloud: the sub-clouds before and after.
        from_cloud, to_cloud: the old and the new owner's clouds.
        at_ms: when (wall-clock ms). scope: the collections and logs copied.
        content_hash: :func:`content_hash` of the new sub-cloud's deltas, in order.
        signature: Ed25519 by the thing over :meth:`signed_bytes`.
    """

    thing_key: bytes
    verify_key: bytes
    old_subcloud: SubCloudId
    new_subcloud: SubCloudId
    from_cloud: CloudId
    to_cloud: CloudId
    at_ms: int
    scope: tuple[str, ...]
    content_hash: bytes
    signature: bytes = b""

    @property
    def thing(self) -> Hashname:
        """The thing's hashname (from its key)."""
        return hashname_from_keys({"3a": self.thing_key})

    def _body(self) -> dict[str, Any]:
        return {"v": RECORD_VERSION, "k": self.thing_key, "e": self.verify_key,
                "o": bytes(self.old_subcloud), "n": bytes(self.new_subcloud),
                "f": bytes(self.from_cloud), "t": bytes(self.to_cloud), "at": self.at_ms,
                "sc": list(self.scope), "h": self.content_hash}

    def signed_bytes(self) -> bytes:
        """What the thing signs: a domain tag and the canonical CBOR of every field."""
        return SIGNING_CONTEXT + cbor2.dumps(self._body(), canonical=True)

    def encode(self) -> bytes:
        """The record as canonical CBOR, signature included."""
        return bytes(cbor2.dumps({**self._body(), "g": self.signature}, canonical=True))

    @classmethod
    def decode(cls, data: bytes) -> TransferRecord:
        """Decode (not verify) a record.

        Args:
            data: from :meth:`encode`.

        Returns:
            The record.

        Raises:
            TransferError: malformed, too big or of another version.
        """
        m = _load_map(data, MAX_RECORD_BYTES, "transfer record")
        if m.get("v") != RECORD_VERSION:
            raise TransferError(f"transfer record version {m.get('v')!r} is not supported")
        try:
            scope = m["sc"]
            if not isinstance(scope, list) or len(scope) > MAX_SCOPE or not all(
                    isinstance(s, str) for s in scope):
                raise TransferError("transfer record: bad scope")
            fields = {k: m[k] for k in ("k", "e", "o", "n", "f", "t", "h", "g")}
            if not all(isinstance(v, bytes) for v in fields.values()):
                raise TransferError("transfer record: a key or id is not bytes")
            at = m["at"]
            if not isinstance(at, int) or isinstance(at, bool) or at < 0:
                raise TransferError("transfer record: bad time")
        except KeyError as exc:
            raise TransferError(f"transfer record lacks field {exc}") from exc
        return cls(fields["k"], fields["e"], SubCloudId(fields["o"]), SubCloudId(fields["n"]),
                   CloudId(fields["f"]), CloudId(fields["t"]), at, tuple(scope),
                   fields["h"], fields["g"])

    def verify(self) -> None:
        """Check the record was signed by the thing it names.

        Raises:
            TransferError: wrong sizes, a verify key that is not the thing's, or a bad
                signature.
        """
        if (len(self.thing_key) != KEY_SIZE or len(self.verify_key) != KEY_SIZE
                or len(self.signature) != SIGNATURE_SIZE or len(self.content_hash) != 32):
            raise TransferError("transfer record: a key, hash or signature has the wrong size")
        if not verify_signature(self.thing_key, self.verify_key, self.signed_bytes(),
                                self.signature):
            raise TransferError("transfer record: not signed by the thing it names")


@dataclass(frozen=True, slots=True)
class TransferPackage:
    """What the old owner hands the new one.

    Attributes:
        record: the signed record.
        envelopes: the new sub-cloud's deltas, each sealed by the thing (in order).
        finder_cap: the new (rotated) finder capability, for printing the new tag.
    """

    record: TransferRecord
    envelopes: tuple[bytes, ...]
    finder_cap: bytes

    def encode(self) -> bytes:
        """CBOR ``{v, r: record, e: [envelope...], c: finder capability}``."""
        return bytes(cbor2.dumps({"v": RECORD_VERSION, "r": self.record.encode(),
                                  "e": list(self.envelopes), "c": self.finder_cap}))

    @classmethod
    def decode(cls, data: bytes) -> TransferPackage:
        """Decode (not verify) a package.

        Raises:
            TransferError: malformed, too big or of another version.
        """
        m = _load_map(data, MAX_PACKAGE_BYTES, "transfer package")
        if m.get("v") != RECORD_VERSION:
            raise TransferError(f"transfer package version {m.get('v')!r} is not supported")
        r, e, c = m.get("r"), m.get("e"), m.get("c")
        if not (isinstance(r, bytes) and isinstance(e, list) and isinstance(c, bytes)):
            raise TransferError("transfer package: missing or mistyped fields")
        if not e or len(e) > MAX_PACKAGE_ENVELOPES or not all(isinstance(x, bytes) for x in e):
            raise TransferError(f"transfer package: 1..{MAX_PACKAGE_ENVELOPES} envelopes")
        if len(c) != _t.FINDER_CAP_SIZE:
            raise TransferError("transfer package: bad finder capability size")
        return cls(TransferRecord.decode(r), tuple(e), c)


def _load_map(data: bytes, limit: int, what: str) -> dict[Any, Any]:
    if not isinstance(data, (bytes, bytearray)) or len(data) > limit:
        raise TransferError(f"{what} is not bytes or larger than {limit} bytes")
    try:
        value = cbor2.loads(bytes(data))
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError, OverflowError,
            MemoryError) as exc:
        raise TransferError(f"{what} is malformed: {exc}") from exc
    if not isinstance(value, dict):
        raise TransferError(f"{what} is not a map")
    return value


@dataclass(frozen=True, slots=True)
class AcceptedThing:
    """A thing received by the new owner.

    Attributes:
        replica: this device's replica of the new sub-cloud.
        record: the verified transfer record.
        identity: the thing's keys, opened with this device's seal.
        finder_cap: the new finder capability (print a new claimed tag with it).
        envelopes: the thing's verified envelopes: store them as received deltas of the
            new sub-cloud, so other members sync them from this device.
        delta: this device's write (the record kept in the ``transfers`` log).
    """

    replica: Replica
    record: TransferRecord
    identity: LocalIdentity
    finder_cap: bytes
    envelopes: tuple[bytes, ...]
    delta: bytes


def content_hash(deltas: Iterable[bytes]) -> bytes:
    """What a transfer record signs of the new sub-cloud's content.

    Args:
        deltas: the deltas in order.

    Returns:
        ``SHA-256`` over the concatenated ``SHA-256`` of each delta.
    """
    outer = hashlib.sha256(b"p2pcloud transfer content v1")
    for delta in deltas:
        outer.update(hashlib.sha256(delta).digest())
    return outer.digest()


class _Batcher:
    """Splits a long copy into transactions of about TXN_BUDGET bytes each."""

    def __init__(self, replica: Replica, now_ms: int) -> None:
        self.replica = replica
        self.now_ms = now_ms
        self.deltas: list[bytes] = []
        self.used = 0
        replica.begin(now_ms)

    def account(self, value: object) -> None:
        self.used += len(encode_value(value))
        if self.used >= TXN_BUDGET:
            self.flush()
            self.replica.begin(self.now_ms)

    def flush(self) -> None:
        delta = self.replica.commit()
        if delta:
            self.deltas.append(bytes(delta))
        self.used = 0


def _copy(src: Replica, dst: Replica, scope: Iterable[str], batch: _Batcher) -> None:
    """Copy the chosen collections and logs (values, not CRDT history) into ``dst``."""
    for name in scope:
        for doc_id in src.documents(name):
            doc = src.document(name, doc_id) or {}
            for field, value in doc.items():
                batch.account(value if not isinstance(value, (tuple, frozenset))
                              else list(value))
                if name == _t.NOTES and field == _t.NOTES_FIELD and isinstance(value, str):
                    if value:
                        dst.text_insert(name, doc_id, field, 0, value)
                elif isinstance(value, tuple):  # multi-value register: concurrent values
                    for item in value:
                        dst.set_mv(name, doc_id, field, item)
                elif isinstance(value, frozenset):
                    for item in sorted(value, key=repr):
                        dst.set_add(name, doc_id, field, item)
                else:
                    dst.set(name, doc_id, field, value)
        # Log records keep their order: one transaction appends them with rising counters.
        for _hlc, _rid, value in src.log(name):
            batch.account(value)
            dst.append(name, value)


def prepare_transfer(replica: Replica, thing_identity: LocalIdentity, *, to_cloud: CloudId,
                     members: Mapping[Hashname, bytes], scope: Iterable[str] | None = None,
                     entropy: Entropy, now_ms: int) -> TransferPackage:
    """Build the package that hands a thing to another cloud (steps 1-2 above).

    Args:
        replica: our replica of the thing's current sub-cloud.
        thing_identity: the thing's keys (opened by this device).
        to_cloud: the new owner's cloud. members: its members (hashname -> CS3a key); the
            thing key is sealed to them.
        scope: the collections and logs to copy (None: all of ``TRANSFERABLE``, i.e. the
            whole history). The profile is always copied.
        entropy: randomness. now_ms: wall-clock milliseconds.

    Returns:
        The package; send it, then call :func:`end_access` on our replica.

    Raises:
        TransferError: the thing already moved, the identity is not this thing's, or the
            scope names something that cannot be transferred.
        ThingError: a member key does not match its hashname.
    """
    info = _t.thing_info(replica)
    if info.ended:
        raise TransferError("this thing was already handed on; its new owner can transfer it")
    if thing_identity.hashname != info.hashname or thing_identity.verify_key is None:
        raise TransferError("the identity given is not this thing's signing key")
    chosen = list(TRANSFERABLE) if scope is None else list(dict.fromkeys(scope))
    bad = [s for s in chosen if s not in TRANSFERABLE]
    if bad:
        raise TransferError(f"cannot transfer {bad}: choose from {list(TRANSFERABLE)}")
    if _t.PROFILE not in chosen:
        chosen.insert(0, _t.PROFILE)
    old_subcloud = replica.get(_t.ACCESS, _t.ACCESS_DOC, "subcloud")
    from_cloud = replica.get(_t.ACCESS, _t.ACCESS_DOC, "owner_cloud")
    if not isinstance(old_subcloud, bytes) or not isinstance(from_cloud, bytes):
        raise TransferError("the thing's access record is missing")
    new_subcloud = SubCloudId(_t._entropy(entropy, _t.SUBCLOUD_ID_SIZE))
    finder_cap = _t._entropy(entropy, _t.FINDER_CAP_SIZE)
    new = Replica(replica_id_for(new_subcloud, thing_identity.hashname))
    batch = _Batcher(new, now_ms)
    try:
        _copy(replica, new, chosen, batch)
        # Rules start afresh at the hand-over: copied events must not fire again in the new
        # cloud (done-markers are not copied; docs/things.md "exactly once").
        for rule_id in new.documents(_t.RULES):
            new.set(_t.RULES, rule_id, "created_ms", now_ms)
        new.set_many(_t.ACCESS, _t.ACCESS_DOC, {
            "claim_hash": replica.get(_t.ACCESS, _t.ACCESS_DOC, "claim_hash", b""),
            "claim_spent": True, "owner_cloud": bytes(to_cloud), "ended": False,
            "subcloud": bytes(new_subcloud), "finder_cap": finder_cap,
            "finder_hash": _t.claim_hash(finder_cap)})
        _t._write_seals(new, thing_identity, members, entropy)
    except CoreError as exc:
        raise TransferError(f"the thing's state could not be copied: {exc}") from exc
    finally:
        batch.flush()
    if len(batch.deltas) > MAX_PACKAGE_ENVELOPES:
        raise TransferError("the thing's history is too large for one transfer package; "
                            "choose a part of it")
    try:
        envelopes = tuple(bytes(seal(thing_identity, new_subcloud, d).raw)
                          for d in batch.deltas)
    except LocalProtocolError as exc:
        raise TransferError(f"a copied transaction cannot be sealed: {exc}") from exc
    record = TransferRecord(
        thing_identity.cs3a_public, thing_identity.verify_key, SubCloudId(old_subcloud),
        new_subcloud, CloudId(from_cloud), to_cloud, now_ms, tuple(chosen),
        content_hash(batch.deltas))
    signed = dataclasses.replace(record, signature=thing_identity.sign(record.signed_bytes()))
    return TransferPackage(signed, envelopes, finder_cap)


def accept_transfer(package: TransferPackage | bytes, *, me: LocalIdentity, my_cloud: CloudId,
                    expect_thing: Hashname | None = None, now_ms: int) -> AcceptedThing:
    """Verify a package and load the thing into this device's replica (step 3 above).

    Args:
        package: the package or its bytes.
        me: this device's identity (its seal must open).
        my_cloud: this device's cloud; the record must name it as the destination.
        expect_thing: the hashname the user scanned, if any (a package for another thing is
            refused).
        now_ms: wall-clock milliseconds.

    Returns:
        The :class:`AcceptedThing`.

    Raises:
        TransferError: anything does not verify; nothing is kept.
    """
    pkg = package if isinstance(package, TransferPackage) else TransferPackage.decode(package)
    record = pkg.record
    record.verify()
    if expect_thing is not None and record.thing != expect_thing:
        raise TransferError("the package is for another thing than the one scanned")
    if record.to_cloud != my_cloud:
        raise TransferError("the package hands the thing to another cloud")
    thing, new_subcloud = record.thing, record.new_subcloud
    deltas = []
    for raw in pkg.envelopes:
        try:
            # Only the thing itself may write these deltas, and only into its new sub-cloud.
            env = open_envelope(raw, lambda sc, hn: sc == new_subcloud and hn == thing)
        except DeltaRejected as exc:
            raise TransferError(f"a delta of the package does not verify: {exc}") from exc
        deltas.append(env.delta)
    if content_hash(deltas) != record.content_hash:
        raise TransferError("the content is not the one the thing signed")
    replica = Replica(replica_id_for(new_subcloud, me.hashname))
    try:
        replica.apply(deltas, now_ms)
    except CoreError as exc:
        raise TransferError(f"the content does not apply: {exc}") from exc
    if replica.get(_t.PROFILE, _t.PROFILE_DOC, "hashname") != thing:
        raise TransferError("the content is another thing's")
    if replica.get(_t.ACCESS, _t.ACCESS_DOC, "finder_cap") != pkg.finder_cap:
        raise TransferError("the finder capability does not match the content")
    try:
        identity = _t.open_thing_key(replica, me)
    except ThingError as exc:
        raise TransferError(f"the thing key is not sealed to this device: {exc}") from exc
    replica.begin(now_ms)
    replica.append(_t.TRANSFERS, record.encode())
    delta = bytes(replica.commit())
    return AcceptedThing(replica, record, identity, pkg.finder_cap, pkg.envelopes, delta)


def end_access(replica: Replica, record: TransferRecord, *, now_ms: int) -> bytes:
    """Close the old owner's side (step 4 above): keep the record, mark the thing moved.

    The old sub-cloud stays as the old owner's archive; seals of the key are removed and
    :func:`access_ended` becomes true, so the old cloud's devices stop answering for it.

    Args:
        replica: our replica of the old sub-cloud.
        record: the signed record from :func:`prepare_transfer`.
        now_ms: wall-clock milliseconds.

    Returns:
        The delta.

    Raises:
        TransferError: the record does not verify or is not about this sub-cloud.
    """
    record.verify()
    if replica.get(_t.ACCESS, _t.ACCESS_DOC, "subcloud") != record.old_subcloud:
        raise TransferError("the record is about another sub-cloud")
    replica.begin(now_ms)
    replica.append(_t.TRANSFERS, record.encode())
    replica.set_many(_t.ACCESS, _t.ACCESS_DOC, {
        "ended": True, "moved_to": bytes(record.to_cloud), "claim_spent": True})
    replica.remove_field(_t.ACCESS, _t.ACCESS_DOC, "finder_cap")
    replica.remove_field(_t.ACCESS, _t.ACCESS_DOC, "finder_hash")
    for member in replica.documents(_t.KEYS):
        replica.remove(_t.KEYS, member)
    return bytes(replica.commit())


def transfer_records(replica: Replica) -> list[TransferRecord]:
    """The verified transfer records a sub-cloud keeps, oldest first (bad ones skipped).

    Args:
        replica: a replica of a thing's sub-cloud.

    Returns:
        The records.
    """
    out = []
    for _hlc, _rid, value in replica.log(_t.TRANSFERS):
        try:
            record = TransferRecord.decode(value)
            record.verify()
        except TransferError:
            continue
        out.append(record)
    return out


def access_ended(replica: Replica, cloud: CloudId) -> bool:
    """Whether ``cloud`` lost the thing: a verified record hands it from ``cloud`` onwards.

    Args:
        replica: a replica of the thing's (old or new) sub-cloud.
        cloud: the cloud to ask about.

    Returns:
        True when the latest record naming ``cloud`` moved the thing away from it.
    """
    state = False
    for record in sorted(transfer_records(replica), key=lambda r: r.at_ms):
        if record.from_cloud == cloud:
            state = True
        if record.to_cloud == cloud:
            state = False
    return state
