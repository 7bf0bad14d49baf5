"""A thing: its keys, its sub-cloud id, and the digital-twin layout in a core Replica.

Theory of operation
-------------------
A thing (DESIGN.md section 7) is an owned object with a sub-cloud of its own. A tag-only
thing has no computer, so its keys live in its owner's cloud: the thing's Ed25519 seed is
sealed (libsodium ``crypto_box_seal``, byte-compatible with ``nacl.public.SealedBox``) to the
CS3a public key of every member of the cloud and stored in the thing's own sub-cloud, in the
``keys`` collection. Any member device opens its seal and then *acts for the thing*: it
answers links to the thing's hashname, signs transfer records. When members change, the
owner re-seals (:func:`reseal_thing_key`): seals of members that left are removed.

The layout (one sub-cloud per thing; docs/things.md "layout"):

* collections ``profile`` (doc ``thing``: name, make, model, serial, archived, hashname),
  ``notes`` (doc ``notes``, text field ``text``), ``files`` (one doc per file: a blob ref),
  ``card`` (doc ``card``: the public face the owner chooses), ``rules`` (one doc per rule),
  ``access`` (doc ``access``: claim state, finder capability, owner cloud, transfer state),
  ``keys`` (one doc per member hashname: the sealed seed), ``done`` (rule done-markers);
* logs ``readings``, ``events``, ``inbox`` (finder messages), ``transfers`` (signed records).

Every helper takes the replica of the calling endpoint, runs one transaction
(``begin(now_ms)`` ... ``commit()``) and returns the delta for the shell to seal in an
envelope (p2pcloud/sync/envelope.py) and send. This module is pure: no I/O, no clock
(``now_ms`` comes in), randomness from ``entropy(n)``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import nacl.bindings as _nb
import nacl.exceptions

from p2pcloud._core import BlobRef, Replica
from p2pcloud._crypto import KEY_SIZE, LocalIdentity, hashname_from_keys
from p2pcloud._ids import CloudId, Hashname, SubCloudId
from p2pcloud._wire import Entropy, b32encode
from p2pcloud.cloud.grants import ROLE_THING
from p2pcloud.cloud.membership import Membership
from p2pcloud.errors import CoreError, LocalProtocolError, MalformedPacket, ThingError

__all__ = [
    "ACCESS",
    "CARD",
    "CLAIM_SECRET_SIZE",
    "COLLECTIONS",
    "DONE",
    "EVENTS",
    "FILES",
    "FINDER_CAP_SIZE",
    "INBOX",
    "KEYS",
    "LOGS",
    "MAX_CARD_FIELDS",
    "MAX_CARD_VALUE",
    "MAX_NAME",
    "NOTES",
    "NOTICES",
    "PROFILE",
    "READINGS",
    "RESERVED",
    "RULES",
    "SUBCLOUD_ID_SIZE",
    "TRANSFERS",
    "NewThing",
    "ThingInfo",
    "add_file",
    "add_note",
    "add_reading",
    "card",
    "claim_hash",
    "create_layout",
    "event_record",
    "list_things",
    "new_thing",
    "open_sealed",
    "open_thing_key",
    "record_event",
    "rename",
    "reseal_thing_key",
    "seal_to",
    "sealing_members",
    "secret_matches",
    "set_archived",
    "set_card",
    "thing_info",
]

# -- layout names (docs/things.md "layout") -------------------------------------------------

PROFILE: Final = "profile"
NOTES: Final = "notes"
FILES: Final = "files"
CARD: Final = "card"
RULES: Final = "rules"
ACCESS: Final = "access"
KEYS: Final = "keys"
DONE: Final = "done"
READINGS: Final = "readings"
EVENTS: Final = "events"
INBOX: Final = "inbox"
TRANSFERS: Final = "transfers"
COLLECTIONS: Final = (PROFILE, NOTES, FILES, CARD, RULES, ACCESS, KEYS, DONE)
LOGS: Final = (READINGS, EVENTS, INBOX, TRANSFERS)
NOTICES: Final = "notices"  # log of rule notifications (notify_owner, show_card): the node
RESERVED: Final = frozenset({ACCESS, KEYS, DONE, TRANSFERS, RULES, INBOX, NOTICES})
"""Collections and logs that rules may not append to and transfers never copy blindly."""

PROFILE_DOC: Final = "thing"
NOTES_DOC: Final = "notes"
NOTES_FIELD: Final = "text"
CARD_DOC: Final = "card"
ACCESS_DOC: Final = "access"

# -- limits, each with its reason -----------------------------------------------------------

SUBCLOUD_ID_SIZE: Final = 16  # BRIEF "Sub-cloud contracts": 16 random bytes
CLAIM_SECRET_SIZE: Final = 16  # 128 bits: unguessable, yet short enough for a small QR code
FINDER_CAP_SIZE: Final = 16  # same reasoning as the claim secret
MAX_NAME: Final = 200  # a thing's name, make, model, serial: a label, not a document
MAX_CARD_FIELDS: Final = 16  # the card is a short public notice ("if found, call ...")
MAX_CARD_VALUE: Final = 500  # characters per card field: fits a phone screen
MAX_SEALS: Final = 256  # members one thing key is sealed to: far above a household's devices
_SEAL_OVERHEAD: Final = 32 + 16  # crypto_box_seal: ephemeral key + Poly1305 tag


@dataclass(frozen=True, slots=True)
class NewThing:
    """A freshly made thing, before it is written anywhere.

    Attributes:
        identity: the thing's keys (Ed25519 seed, CS3a derived from it).
        subcloud: the id of the thing's sub-cloud.
        claim_secret: the one-time secret printed on its fresh tag.
    """

    identity: LocalIdentity
    subcloud: SubCloudId
    claim_secret: bytes

    @property
    def hashname(self) -> Hashname:
        """The thing's hashname (its address on the mesh)."""
        return self.identity.hashname


@dataclass(frozen=True, slots=True)
class ThingInfo:
    """What a listing shows of one thing.

    Attributes:
        hashname: the thing's hashname.
        name: its name ("" if none). make, model, serial: free text.
        archived: hidden from the default listing.
        owner_cloud: the cloud that owns it, or None while unclaimed.
        claimed: whether its claim secret is spent.
        ended: whether it was handed on (this replica is the old owner's archive).
    """

    hashname: Hashname
    name: str
    make: str
    model: str
    serial: str
    archived: bool
    owner_cloud: CloudId | None
    claimed: bool
    ended: bool


def _entropy(entropy: Entropy, n: int) -> bytes:
    out = entropy(n)
    if not isinstance(out, bytes) or len(out) != n:
        raise LocalProtocolError("entropy returned the wrong number of bytes")
    return out


def new_thing(entropy: Entropy) -> NewThing:
    """Make a thing: a keypair and hashname, a sub-cloud id and a claim secret.

    Args:
        entropy: randomness source.

    Returns:
        The :class:`NewThing`; write it with :func:`create_layout`.
    """
    identity = LocalIdentity.generate(entropy)
    subcloud = SubCloudId(_entropy(entropy, SUBCLOUD_ID_SIZE))
    return NewThing(identity, subcloud, _entropy(entropy, CLAIM_SECRET_SIZE))


def claim_hash(secret: bytes) -> bytes:
    """What the thing's state keeps of a claim secret (or a finder capability).

    Args:
        secret: the secret bytes.

    Returns:
        SHA-256 over a domain tag and the secret, so the state never holds the secret itself.
    """
    return hashlib.sha256(b"p2pcloud thing secret v1" + secret).digest()


def _text(value: str, what: str, limit: int = MAX_NAME) -> str:
    if not isinstance(value, str):
        raise ThingError(f"{what} must be text")
    if len(value) > limit:
        raise ThingError(f"{what} is longer than {limit} characters")
    return value


# -- sealing the thing's key to the cloud's members ------------------------------------------


def seal_to(recipient_cs3a: bytes, message: bytes, entropy: Entropy) -> bytes:
    """Seal ``message`` to a CS3a public key (libsodium ``crypto_box_seal``).

    Built from an ephemeral key drawn from ``entropy`` (this layer reads no randomness of its
    own) with the exact construction of ``crypto_box_seal``:
    ``epk | crypto_box(m, nonce=BLAKE2b-24(epk | pk), pk, esk)``, so
    ``nacl.public.SealedBox(PrivateKey(sk)).decrypt`` opens it.

    Args:
        recipient_cs3a: the recipient's 32-byte Curve25519 public key.
        message: the plaintext.
        entropy: randomness source (32 bytes for the ephemeral key).

    Returns:
        ``32 + 16 + len(message)`` bytes.

    Raises:
        ThingError: the recipient key is not 32 bytes.
    """
    if len(recipient_cs3a) != KEY_SIZE:
        raise ThingError("a CS3a public key is 32 bytes")
    esk = _entropy(entropy, KEY_SIZE)
    epk = _nb.crypto_scalarmult_base(esk)
    nonce = hashlib.blake2b(epk + recipient_cs3a, digest_size=24).digest()
    return epk + _nb.crypto_box(message, nonce, recipient_cs3a, esk)


def open_sealed(identity: LocalIdentity, sealed: bytes) -> bytes:
    """Open a :func:`seal_to` box with our CS3a key.

    Args:
        identity: our identity.
        sealed: the sealed bytes.

    Returns:
        The plaintext.

    Raises:
        ThingError: the box is not ours or was altered.
    """
    try:
        return bytes(
            _nb.crypto_box_seal_open(sealed, identity.cs3a_public, identity.cs3a_secret)
        )
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, TypeError) as exc:
        raise ThingError("the sealed thing key does not open with this device's key") from exc


def _check_members(members: Mapping[Hashname, bytes]) -> dict[Hashname, bytes]:
    if not members:
        # Sealed to nobody, the key would be lost and nobody could act for the thing again.
        raise ThingError("the thing key must be sealed to at least one member")
    if len(members) > MAX_SEALS:
        raise ThingError(f"more than {MAX_SEALS} members to seal the thing key to")
    out: dict[Hashname, bytes] = {}
    for hashname, key in members.items():
        try:
            computed = hashname_from_keys({"3a": key})
        except MalformedPacket as exc:
            raise ThingError(f"member {hashname}: bad CS3a key") from exc
        if len(key) != KEY_SIZE or computed != hashname:
            raise ThingError(f"member {hashname}: the CS3a key does not match the hashname")
        out[hashname] = bytes(key)
    return out


def sealing_members(membership: Membership, subcloud: SubCloudId) -> dict[Hashname, bytes]:
    """The members a thing's key is sealed to, from the cloud's membership (docs/cloud.md).

    Every device or admin that may read the thing's sub-cloud; smart things (role
    ``thing``) act for themselves and get no other thing's key.

    Args:
        membership: the cloud's current membership. subcloud: the thing's sub-cloud.

    Returns:
        hashname -> CS3a key, for :func:`create_layout` and :func:`reseal_thing_key`.
    """
    return {h: m.key for h, m in membership.members().items()
            if m.role != ROLE_THING and membership.can_read(subcloud, h)}


def _write_seals(replica: Replica, identity: LocalIdentity,
                 members: Mapping[Hashname, bytes], entropy: Entropy) -> None:
    seed = identity.seed
    if seed is None:
        raise ThingError("a thing identity needs its Ed25519 seed to be sealed")
    checked = _check_members(members)
    for hashname in replica.documents(KEYS):
        if hashname not in checked:
            replica.remove(KEYS, hashname)
    for hashname, key in sorted(checked.items()):
        replica.set_many(KEYS, hashname, {"cs3a": key, "sealed": seal_to(key, seed, entropy)})


def reseal_thing_key(replica: Replica, identity: LocalIdentity,
                     members: Mapping[Hashname, bytes], *, entropy: Entropy,
                     now_ms: int) -> bytes:
    """Seal the thing key to exactly ``members``; seals of former members are removed.

    Call it when the cloud's membership changes (the cloud layer knows when).

    Args:
        replica: our replica of the thing's sub-cloud.
        identity: the thing's identity (opened with :func:`open_thing_key`).
        members: member hashname -> CS3a public key, checked against each other.
        entropy: randomness for the seals. now_ms: wall-clock milliseconds.

    Returns:
        The delta.

    Raises:
        ThingError: a member's key does not match its hashname, no members or too many;
            nothing is written.
    """
    _check_members(members)
    replica.begin(now_ms)
    try:
        _write_seals(replica, identity, members, entropy)
    finally:
        delta = replica.commit()
    return bytes(delta)


def open_thing_key(replica: Replica, me: LocalIdentity) -> LocalIdentity:
    """Open the thing's key with this device's key, so the device can act for the thing.

    Args:
        replica: our replica of the thing's sub-cloud.
        me: this device's identity.

    Returns:
        The thing's identity (checked against the hashname in the profile).

    Raises:
        ThingError: no seal for this device, a seal that does not open, or a key that is
            not the thing's.
    """
    sealed = replica.get(KEYS, me.hashname, "sealed")
    if not isinstance(sealed, bytes):
        raise ThingError(f"the thing key is not sealed to {me.hashname}; ask a member to re-seal")
    seed = open_sealed(me, sealed)
    try:
        thing = LocalIdentity.from_seed(seed)
    except LocalProtocolError as exc:
        raise ThingError("the sealed thing key is not an Ed25519 seed") from exc
    expected = replica.get(PROFILE, PROFILE_DOC, "hashname")
    if thing.hashname != expected:
        raise ThingError("the sealed key is not this thing's key")
    return thing


# -- layout and helpers ------------------------------------------------------------------------


def create_layout(replica: Replica, thing: NewThing, *, name: str = "", make: str = "",
                  model: str = "", serial: str = "", cloud: CloudId,
                  members: Mapping[Hashname, bytes], entropy: Entropy, now_ms: int,
                  card: Mapping[str, str] | None = None, smart: bool = False) -> bytes:
    """Write a new thing's digital twin into an empty replica of its sub-cloud.

    The thing starts unclaimed: its state keeps the hash of the claim secret, and
    ``owner_cloud`` is the cloud that made it (it holds the key until someone claims it).

    Args:
        replica: our (empty) replica of ``thing.subcloud``.
        thing: from :func:`new_thing`.
        name, make, model, serial: the profile (each at most MAX_NAME characters).
        cloud: the cloud that holds the thing. members: that cloud's members (hashname ->
            CS3a key); the thing key is sealed to each.
        entropy: randomness. now_ms: wall-clock milliseconds.
        card: the card's first fields (as :func:`set_card` takes them), None: empty.
        smart: the thing runs its own node (profile field ``smart``).

    Returns:
        The delta.

    Raises:
        ThingError: a bad profile field or member key; nothing is written.
    """
    profile = {"name": _text(name, "name"), "make": _text(make, "make"),
               "model": _text(model, "model"), "serial": _text(serial, "serial"),
               "archived": False, "hashname": thing.hashname,
               "cs3a": thing.identity.cs3a_public, "created_ms": now_ms}
    if smart:
        profile["smart"] = True
    card_fields = _card_fields(card or {})
    _check_members(members)
    if thing.identity.seed is None:
        raise ThingError("a thing identity needs its Ed25519 seed")
    replica.begin(now_ms)
    try:
        replica.set_many(PROFILE, PROFILE_DOC, profile)
        replica.set_many(ACCESS, ACCESS_DOC, {
            "claim_hash": claim_hash(thing.claim_secret), "claim_spent": False,
            "owner_cloud": bytes(cloud), "ended": False, "subcloud": bytes(thing.subcloud)})
        replica.set(CARD, CARD_DOC, "fields", card_fields)
        _write_seals(replica, thing.identity, members, entropy)
    finally:
        delta = replica.commit()
    return bytes(delta)


def _opt_bytes(value: Any) -> bytes | None:
    return bytes(value) if isinstance(value, bytes) else None


def thing_info(replica: Replica) -> ThingInfo:
    """Read the listing view of a thing from its replica.

    Args:
        replica: a replica of the thing's sub-cloud.

    Returns:
        The :class:`ThingInfo`.

    Raises:
        ThingError: the replica holds no thing profile.
    """
    doc = replica.document(PROFILE, PROFILE_DOC)
    access = replica.document(ACCESS, ACCESS_DOC) or {}
    if doc is None or not isinstance(doc.get("hashname"), str):
        raise ThingError("this sub-cloud holds no thing profile")
    owner = _opt_bytes(access.get("owner_cloud"))
    return ThingInfo(
        hashname=Hashname(doc["hashname"]), name=str(doc.get("name", "")),
        make=str(doc.get("make", "")), model=str(doc.get("model", "")),
        serial=str(doc.get("serial", "")), archived=bool(doc.get("archived", False)),
        owner_cloud=CloudId(owner) if owner is not None else None,
        claimed=bool(access.get("claim_spent", False)), ended=bool(access.get("ended", False)))


def list_things(replicas: Iterable[Replica], *, include_archived: bool = False,
                include_ended: bool = False) -> list[ThingInfo]:
    """List things, sorted by name then hashname.

    Args:
        replicas: replicas of thing sub-clouds (others are skipped).
        include_archived: also list archived things.
        include_ended: also list things handed on to another cloud.

    Returns:
        The infos.
    """
    out = []
    for replica in replicas:
        try:
            info = thing_info(replica)
        except ThingError:
            continue
        if (info.archived and not include_archived) or (info.ended and not include_ended):
            continue
        out.append(info)
    return sorted(out, key=lambda i: (i.name.casefold(), i.hashname))


def _one_write(replica: Replica, now_ms: int, write: Any) -> bytes:
    replica.begin(now_ms)
    try:
        write()
    except CoreError as exc:
        replica.commit()
        raise ThingError(f"the write was refused: {exc}") from exc
    return bytes(replica.commit())


def rename(replica: Replica, name: str, *, now_ms: int) -> bytes:
    """Rename a thing.

    Args:
        replica: our replica of the thing's sub-cloud. name: the new name.
        now_ms: wall-clock milliseconds.

    Returns:
        The delta.

    Raises:
        ThingError: the name is too long.
    """
    _text(name, "name")
    return _one_write(replica, now_ms, lambda: replica.set(PROFILE, PROFILE_DOC, "name", name))


def set_archived(replica: Replica, archived: bool, *, now_ms: int) -> bytes:
    """Archive (hide from listings) or restore a thing; nothing is deleted.

    Args:
        replica: our replica. archived: the new flag. now_ms: wall-clock milliseconds.

    Returns:
        The delta.
    """
    return _one_write(replica, now_ms,
                      lambda: replica.set(PROFILE, PROFILE_DOC, "archived", bool(archived)))


def set_card(replica: Replica, fields: Mapping[str, str], *, now_ms: int) -> bytes:
    """Choose the thing's public face: the only thing a finder can read.

    Args:
        replica: our replica. fields: label -> text (``{"if found": "call 555 0100"}``).
        now_ms: wall-clock milliseconds.

    Returns:
        The delta.

    Raises:
        ThingError: too many fields, or a label or text too long.
    """
    clean = _card_fields(fields)
    return _one_write(replica, now_ms, lambda: replica.set(CARD, CARD_DOC, "fields", clean))


def _card_fields(fields: Mapping[str, str]) -> dict[str, str]:
    if len(fields) > MAX_CARD_FIELDS:
        raise ThingError(f"a card has at most {MAX_CARD_FIELDS} fields")
    return {_text(k, "card label", MAX_NAME): _text(v, "card text", MAX_CARD_VALUE)
            for k, v in fields.items()}


def card(replica: Replica) -> dict[str, str]:
    """The card's fields (what a finder sees).

    Args:
        replica: a replica of the thing's sub-cloud.

    Returns:
        label -> text; empty when the owner shows nothing.
    """
    value = replica.get(CARD, CARD_DOC, "fields", {})
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items() if isinstance(v, str)}


def add_note(replica: Replica, text: str, *, now_ms: int) -> bytes:
    """Append text to the thing's notes (a collaborative text field).

    Args:
        replica: our replica. text: what to append. now_ms: wall-clock milliseconds.

    Returns:
        The delta.
    """
    current = replica.get(NOTES, NOTES_DOC, NOTES_FIELD, "")
    at = len(current) if isinstance(current, str) else 0
    return _one_write(replica, now_ms,
                      lambda: replica.text_insert(NOTES, NOTES_DOC, NOTES_FIELD, at, text))


def add_file(replica: Replica, file_id: str, *, name: str, kind: str, blob: Any,
             mime: str = "application/octet-stream", now_ms: int) -> bytes:
    """Attach a file (a manual, a photo) by its blob reference.

    Args:
        replica: our replica. file_id: the document id. name: the file name.
        kind: ``"manual"``, ``"photo"`` or another short word. blob: a core ``BlobRef``.
        mime: its media type. now_ms: wall-clock milliseconds.

    Returns:
        The delta.

    Raises:
        ThingError: ``blob`` is not a BlobRef, or a text is too long.
    """
    if not isinstance(blob, BlobRef):
        raise ThingError("files are attached by BlobRef")
    doc = {"name": _text(name, "file name"), "kind": _text(kind, "kind"),
           "mime": _text(mime, "media type"), "blob": blob}
    return _one_write(replica, now_ms, lambda: replica.set_many(FILES, file_id, doc))


def event_record(event_type: str, *, by: Hashname | None, now_ms: int, entropy: Entropy,
                 **fields: Any) -> dict[str, Any]:
    """Build an event record with a unique event id (the key of rule done-markers).

    Args:
        event_type: the event type (``"scanned"``, ``"reading_added"``, ``"message_received"``).
        by: the device where the event originated (it handles the event's rules first).
        now_ms: wall-clock milliseconds. entropy: randomness for the id.
        **fields: the event's fields (conditions in rules read them).

    Returns:
        ``{"id", "type", "by", "at_ms", **fields}``.
    """
    return {"id": b32encode(_entropy(entropy, 10)), "type": event_type, "by": by or "",
            "at_ms": now_ms, **fields}


def record_event(replica: Replica, record: Mapping[str, Any], *, now_ms: int) -> bytes:
    """Append an event record (from :func:`event_record`) to the ``events`` log.

    Args:
        replica: our replica. record: the event. now_ms: wall-clock milliseconds.

    Returns:
        The delta.
    """
    return _one_write(replica, now_ms, lambda: replica.append(EVENTS, dict(record)))


def add_reading(replica: Replica, value: float, *, unit: str = "", kind: str = "",
                by: Hashname | None, entropy: Entropy,
                now_ms: int) -> tuple[dict[str, Any], bytes]:
    """Record a reading (a weight, a meter value) and its ``reading_added`` event.

    Args:
        replica: our replica. value: the number. unit: e.g. ``"kg"``. kind: e.g. ``"weight"``.
        by: this device's hashname. entropy: randomness. now_ms: wall-clock milliseconds.

    Returns:
        ``(event record, delta)``; hand the event to the rules (p2pcloud.things.rules).

    Raises:
        ThingError: the value is not a number.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ThingError("a reading is a number")
    _text(unit, "unit")
    _text(kind, "kind")
    event = event_record("reading_added", by=by, now_ms=now_ms, entropy=entropy,
                         value=value, unit=unit, kind=kind)

    def write() -> None:
        replica.append(READINGS, {"value": value, "unit": unit, "kind": kind,
                                  "at_ms": now_ms, "event": event["id"]})
        replica.append(EVENTS, event)

    return event, _one_write(replica, now_ms, write)


def secret_matches(stored_hash: Any, secret: bytes) -> bool:
    """Constant-time check of a secret against its stored :func:`claim_hash`.

    Args:
        stored_hash: what the state holds (anything; non-bytes never match).
        secret: the presented secret.

    Returns:
        True when they match.
    """
    return isinstance(stored_hash, bytes) and hmac.compare_digest(stored_hash,
                                                                  claim_hash(secret))
