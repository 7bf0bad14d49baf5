"""What a scan means, and the ``thing`` channel messages that carry it.

Theory of operation
-------------------
Scanning a tag (DESIGN.md section 7) leads to one of four outcomes, decided on the scanner by
:func:`decide_scan` from the tag and whether the scanner's cloud holds the thing:

* fresh tag, thing held by our cloud: claim it here (:func:`claim_here`): the claim secret is
  checked against its hash, recorded as spent, a finder capability is made, the thing is ours;
* fresh tag, thing held elsewhere: send a ``claim`` request over a ``thing`` channel to the
  thing's hashname; the holder answers with a transfer package (p2pcloud.things.transfer)
  and records the secret as spent; a second claim is refused (``claim secret already spent``);
* claimed tag, thing ours: open it (:func:`open_thing`), recording a ``scanned`` event;
* claimed tag, thing not ours: we are a finder; we may ask for the card and leave a message.

The holder side is :func:`serve_request`: bytes in, a response and the delta of what it wrote
out. It never raises on peer input: a bad request gets a refusal with a reason. The finder
capability authorises exactly two operations; :func:`check_finder_request` is the explicit
allow-list (operation, target thing, capability, fields) that every finder request passes
before anything is read or written. Everything else (another collection, another thing, the
inbox, listing, writing the card) is refused with a reason.

Messages are CBOR maps with a version ``v`` (docs/things.md "thing channel"):
request ``{v:1, op, t: thing hashname, ...}``, response ``{v:1, ok, ...}`` or
``{v:1, ok:false, err: reason, detail}``. Sizes are bounded below. Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import cbor2

from p2pcloud._core import Replica
from p2pcloud._crypto import KEY_SIZE, LocalIdentity, hashname_from_keys, is_hashname
from p2pcloud._ids import CloudId, Hashname
from p2pcloud._wire import Entropy
from p2pcloud.errors import ClaimRefused, MalformedPacket, ThingError, TransferError
from p2pcloud.things import thing as _t
from p2pcloud.things import transfer as _x
from p2pcloud.things.tags import Tag, TagPath, claimed_tag

__all__ = [
    "CHANNEL_TYPE",
    "FINDER_OPS",
    "MAX_CONTACT",
    "MAX_MESSAGE_TEXT",
    "MAX_MESSAGES_PER_DAY",
    "MAX_MESSAGES_PER_FINDER",
    "MAX_SCAN_EVENTS_PER_DAY",
    "MAX_SCAN_EVENTS_PER_FINDER",
    "MAX_REQUEST_BYTES",
    "MAX_RESPONSE_BYTES",
    "OP_CARD",
    "OP_CLAIM",
    "OP_MESSAGE",
    "PROTOCOL_VERSION",
    "CardShown",
    "ClaimAnswered",
    "MessageReceived",
    "Request",
    "RequestRefused",
    "ScanDecision",
    "Served",
    "card_request",
    "check_finder_request",
    "claim_host",
    "claim_here",
    "claim_request",
    "current_tag",
    "decide_scan",
    "decode_request",
    "decode_response",
    "encode_response",
    "message_request",
    "open_thing",
    "serve_request",
]

CHANNEL_TYPE: Final = "thing"  # the channel type finders and claimants open to a thing
PROTOCOL_VERSION: Final = 1
OP_CARD: Final = "card"
OP_MESSAGE: Final = "message"
OP_CLAIM: Final = "claim"
FINDER_OPS: Final = frozenset({OP_CARD, OP_MESSAGE})
"""The allow-list: the only operations a finder capability authorises."""
_FINDER_FIELDS: Final = {OP_CARD: frozenset({"v", "op", "t", "cap"}),
                         OP_MESSAGE: frozenset({"v", "op", "t", "cap", "text", "contact"})}
_CLAIM_FIELDS: Final = frozenset({"v", "op", "t", "secret", "cloud", "members"})

MAX_MESSAGE_TEXT: Final = 1000  # characters: a note to the owner, not a file
MAX_CONTACT: Final = 200  # characters: a phone number or an address to answer to
MAX_CLAIM_MEMBERS: Final = 64  # a household's devices; bounds the seals a claim makes
MAX_REQUEST_BYTES: Final = 8192
"""Largest request: a message (1000 characters, up to 4000 UTF-8 bytes) or a claim listing
64 members (64 * 70 bytes) plus the CBOR around them."""
MAX_RESPONSE_BYTES: Final = _x.MAX_PACKAGE_BYTES + 1024  # a claim answer holds a package
MAX_MESSAGES_PER_FINDER: Final = 20
"""Messages one finder hashname may leave per day: enough to talk, too few to flood the inbox."""
MAX_MESSAGES_PER_DAY: Final = 200
"""Messages per thing per day from all finders together: new hashnames cost nothing, so the
per-finder bound alone would not stop a flood."""
MAX_SCAN_EVENTS_PER_FINDER: Final = 20
MAX_SCAN_EVENTS_PER_DAY: Final = 500
"""Finder scans recorded per day (per finder, per thing): past these the card is still shown,
but no event is written, so reading the card cannot grow the owner's log without bound."""
_DAY_MS: Final = 86_400_000

REFUSE_MALFORMED: Final = "malformed request"
REFUSE_VERSION: Final = "unsupported protocol version"
REFUSE_NOT_ALLOWED: Final = "a finder may only read the card and leave a message"
REFUSE_FIELD: Final = "a finder request may not name collections, documents or other fields"
REFUSE_OTHER_THING: Final = "the request is for another thing"
REFUSE_NO_CAP: Final = "no finder capability given"
REFUSE_BAD_CAP: Final = "wrong or outdated finder capability"
REFUSE_TOO_LONG: Final = "message too long"
REFUSE_RATE: Final = "too many messages today; try again tomorrow"
REFUSE_NOT_CLAIMED: Final = "the thing is not claimed yet: it has no public face"
REFUSE_MOVED: Final = "the thing moved to another cloud"
REFUSE_BAD_SECRET: Final = "wrong claim secret"  # noqa: S105 - a reason, not a password
REFUSE_SPENT: Final = "claim secret already spent: the thing is claimed"
REFUSE_NO_KEY: Final = "this device cannot act for the thing"
REFUSE_NOT_CLAIM_HOST: Final = "another device of the cloud answers claims for this thing"


# -- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """A decoded request on a ``thing`` channel.

    Attributes:
        op: the operation. thing: the target thing's hashname.
        fields: the whole decoded map (checked by the allow-list before use).
    """

    op: str
    thing: Hashname
    fields: dict[str, Any]


def _dump(value: Mapping[str, Any], limit: int) -> bytes:
    data = bytes(cbor2.dumps(dict(value)))
    if len(data) > limit:
        raise ThingError(f"message of {len(data)} bytes is larger than {limit}")
    return data


def _load(data: bytes, limit: int) -> dict[str, Any]:
    if not isinstance(data, (bytes, bytearray)) or len(data) > limit:
        raise MalformedPacket(f"message is not bytes or larger than {limit} bytes")
    try:
        value = cbor2.loads(bytes(data))
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError, OverflowError,
            MemoryError) as exc:
        raise MalformedPacket(f"message is not CBOR: {exc}") from exc
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise MalformedPacket("message is not a map with text keys")
    return value


def decode_request(data: bytes) -> Request:
    """Decode a request.

    Args:
        data: the channel body.

    Returns:
        The :class:`Request` (its fields are not yet authorised).

    Raises:
        MalformedPacket: not CBOR, too big, no version 1, no op or no thing hashname.
    """
    m = _load(data, MAX_REQUEST_BYTES)
    if m.get("v") != PROTOCOL_VERSION:
        raise MalformedPacket(f"{REFUSE_VERSION}: {m.get('v')!r}")
    op, thing = m.get("op"), m.get("t")
    if not isinstance(op, str) or len(op) > 32 or not is_hashname(thing):
        raise MalformedPacket("a request needs an op and the thing's hashname")
    return Request(op, Hashname(str(thing)), m)


def encode_response(ok: bool, **fields: Any) -> bytes:
    """Encode a response ``{v:1, ok, **fields}``.

    Args:
        ok: success. **fields: ``card``, ``pkg``, or ``err`` and ``detail``.

    Returns:
        The CBOR bytes.
    """
    return _dump({"v": PROTOCOL_VERSION, "ok": ok, **fields}, MAX_RESPONSE_BYTES)


def decode_response(data: bytes) -> dict[str, Any]:
    """Decode a response (the scanner's side).

    Args:
        data: the channel body.

    Returns:
        The map; ``ok`` is a bool, and ``err`` a str when ``ok`` is false.

    Raises:
        MalformedPacket: not a version 1 response.
    """
    m = _load(data, MAX_RESPONSE_BYTES)
    if m.get("v") != PROTOCOL_VERSION or not isinstance(m.get("ok"), bool):
        raise MalformedPacket("not a version 1 thing response")
    if not m["ok"] and not isinstance(m.get("err"), str):
        raise MalformedPacket("a refusal without a reason")
    return m


def card_request(tag: Tag) -> bytes:
    """A finder's request for the card.

    Args:
        tag: a claimed tag.

    Returns:
        The request bytes.
    """
    return _dump({"v": PROTOCOL_VERSION, "op": OP_CARD, "t": tag.hashname, "cap": tag.secret},
                 MAX_REQUEST_BYTES)


def message_request(tag: Tag, text: str, contact: str = "") -> bytes:
    """A finder's message to the owner.

    Args:
        tag: a claimed tag. text: the message. contact: how to answer (optional).

    Returns:
        The request bytes.

    Raises:
        ThingError: the text or contact is too long.
    """
    if len(text) > MAX_MESSAGE_TEXT or len(contact) > MAX_CONTACT:
        raise ThingError(f"{REFUSE_TOO_LONG}: at most {MAX_MESSAGE_TEXT} characters")
    return _dump({"v": PROTOCOL_VERSION, "op": OP_MESSAGE, "t": tag.hashname,
                  "cap": tag.secret, "text": text, "contact": contact}, MAX_REQUEST_BYTES)


def claim_request(tag: Tag, *, cloud: CloudId, members: Mapping[Hashname, bytes]) -> bytes:
    """A claim of a fresh tag by another cloud.

    Args:
        tag: the fresh tag. cloud: the claimant's cloud. members: its members (hashname ->
            CS3a key): the thing key will be sealed to them.

    Returns:
        The request bytes.

    Raises:
        ThingError: the tag is not fresh, or too many members.
    """
    if not tag.is_fresh:
        raise ThingError("only a fresh tag can be claimed")
    if len(members) > MAX_CLAIM_MEMBERS:
        raise ThingError(f"at most {MAX_CLAIM_MEMBERS} members per claim")
    return _dump({"v": PROTOCOL_VERSION, "op": OP_CLAIM, "t": tag.hashname, "secret": tag.secret,
                  "cloud": bytes(cloud), "members": [bytes(k) for k in members.values()]},
                 MAX_REQUEST_BYTES)


# -- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CardShown:
    """A finder read the card. ``event`` is the ``scanned`` record written (for rules)."""

    thing: Hashname
    finder: Hashname
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A finder left a message; it is in the inbox. Notify the owner; ``event`` feeds rules."""

    thing: Hashname
    finder: Hashname
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ClaimAnswered:
    """Another cloud claimed the thing with its fresh tag; the package went to it."""

    thing: Hashname
    claimant: Hashname
    to_cloud: CloudId


@dataclass(frozen=True, slots=True)
class RequestRefused:
    """A request was refused; ``reason`` is a ``REFUSE_*`` constant (count it in statistics)."""

    thing: Hashname | None
    requester: Hashname
    reason: str


ServeEvent = CardShown | MessageReceived | ClaimAnswered | RequestRefused


@dataclass(frozen=True, slots=True)
class Served:
    """The outcome of :func:`serve_request`.

    Attributes:
        response: the bytes to send back on the channel.
        delta: what was written to the replica (``b""`` if nothing); seal and sync it.
        events: what happened, for the shell (notifications, statistics, rules).
        record: the transfer record when a claim handed the thing to another cloud (the
            replica is already marked ended; the shell need not call ``end_access``).
    """

    response: bytes
    delta: bytes = b""
    events: list[ServeEvent] = field(default_factory=list)
    record: _x.TransferRecord | None = None


# -- the finder allow-list -------------------------------------------------------------------------


def check_finder_request(request: Request, *, thing: Hashname,
                         finder_hash: bytes | None) -> str | None:
    """The explicit allow-list a finder request must pass before anything is read.

    A finder capability authorises exactly ``card`` (read the card) and ``message`` (leave a
    message), for exactly the thing that issued it, with exactly the fields those
    operations take. Everything else is refused.

    Args:
        request: the decoded request. thing: the thing this endpoint answers for.
        finder_hash: the hash of the thing's current finder capability (None: unclaimed).

    Returns:
        None when allowed, else the refusal reason (a ``REFUSE_*`` constant).
    """
    if request.op not in FINDER_OPS:
        return REFUSE_NOT_ALLOWED
    if request.thing != thing:
        return REFUSE_OTHER_THING
    extra = set(request.fields) - _FINDER_FIELDS[request.op]
    if extra:
        return REFUSE_FIELD
    cap = request.fields.get("cap")
    if not isinstance(cap, bytes) or len(cap) != _t.FINDER_CAP_SIZE:
        return REFUSE_NO_CAP
    if finder_hash is None:
        return REFUSE_NOT_CLAIMED
    if not _t.secret_matches(finder_hash, cap):
        return REFUSE_BAD_CAP
    if request.op == OP_MESSAGE:
        text, contact = request.fields.get("text"), request.fields.get("contact", "")
        if not isinstance(text, str) or not isinstance(contact, str):
            return REFUSE_FIELD
        if len(text) > MAX_MESSAGE_TEXT or len(contact) > MAX_CONTACT:
            return REFUSE_TOO_LONG
    return None


# -- the holder's side ---------------------------------------------------------------------------


def _refuse(reason: str, requester: Hashname, thing: Hashname | None,
            detail: str = "") -> Served:
    return Served(encode_response(False, err=reason, detail=detail),
                  events=[RequestRefused(thing, requester, reason)])


def _today(replica: Replica, log: str, now_ms: int, *, key: str, finder: Hashname,
           event_type: str | None = None) -> tuple[int, int]:
    """Records of the last day in ``log``: (from this finder, from every finder)."""
    mine = total = 0
    for _h, _r, v in replica.log(log):
        if (not isinstance(v, dict) or not isinstance(v.get("at_ms"), int)
                or now_ms - v["at_ms"] >= _DAY_MS or not v.get(key)
                or (event_type is not None and v.get("type") != event_type)):
            continue
        total += 1
        mine += v.get(key) == finder
    return mine, total


def claim_host(thing: Hashname, hosts: Sequence[str]) -> str | None:
    """The one device of the holding cloud that answers claims for ``thing``.

    A claim secret is single use; if two devices of the holding cloud answered two claimants
    while cut off from each other, both would hand the thing out. One device per thing
    (rendezvous hashing over the cloud's rule hosts, as p2pcloud.things.rules does for
    schedules) answers claims; the others refuse with ``REFUSE_NOT_CLAIM_HOST`` and name it.

    Args:
        thing: the thing's hashname. hosts: the cloud's rule hosts.

    Returns:
        The host's hashname, or None when there are no hosts.
    """
    if not hosts:
        return None
    return min(hosts, key=lambda h: (hashlib.sha256(f"claim|{thing}|{h}".encode()).digest(), h))


def serve_request(replica: Replica, data: bytes, *, requester: Hashname, me: Hashname,
                  thing_identity: LocalIdentity | None, entropy: Entropy, now_ms: int,
                  claim_hosts: Sequence[str] = ()) -> Served:
    """Answer one request that arrived on a ``thing`` channel for the thing of ``replica``.

    Never raises on bad input: every failure is a refusal response and a
    :class:`RequestRefused` event. Writes (a ``scanned`` event, an inbox message, a spent
    claim) go into ``replica`` in one transaction; its delta is in the result.

    Args:
        replica: this device's replica of the thing's sub-cloud.
        data: the request bytes.
        requester: the hashname of the endpoint at the other end of the link (the link
            authenticated it; it is not taken from the request).
        me: this device's hashname (events record where they originated).
        thing_identity: the thing's keys if this device opened them (needed for claims).
        entropy: randomness. now_ms: wall-clock milliseconds.
        claim_hosts: the cloud's rule hosts; when given, only :func:`claim_host` of them
            answers claims (empty: this device answers, e.g. a cloud of one device).

    Returns:
        The :class:`Served`.
    """
    try:
        info = _t.thing_info(replica)
    except ThingError:
        return _refuse(REFUSE_OTHER_THING, requester, None, "no thing here")
    try:
        request = decode_request(data)
    except MalformedPacket as exc:
        reason = REFUSE_VERSION if REFUSE_VERSION in str(exc) else REFUSE_MALFORMED
        return _refuse(reason, requester, info.hashname, str(exc))
    if info.ended:
        return _refuse(REFUSE_MOVED, requester, info.hashname,
                       "ask the owner for the thing's new tag")
    if request.op == OP_CLAIM:
        host = claim_host(info.hashname, claim_hosts)
        if host is not None and host != me:
            return _refuse(REFUSE_NOT_CLAIM_HOST, requester, info.hashname, host)
        return _serve_claim(replica, request, info, requester=requester,
                            thing_identity=thing_identity, entropy=entropy, now_ms=now_ms)
    finder_hash = replica.get(_t.ACCESS, _t.ACCESS_DOC, "finder_hash")
    refusal = check_finder_request(request, thing=info.hashname,
                                   finder_hash=finder_hash if isinstance(finder_hash, bytes)
                                   else None)
    if refusal is not None:
        return _refuse(refusal, requester, info.hashname, f"op {request.op!r}")
    if request.op == OP_CARD:
        event = _t.event_record("scanned", by=me, now_ms=now_ms, entropy=entropy,
                                owner=False, finder=requester)
        mine, total = _today(replica, _t.EVENTS, now_ms, key="finder", finder=requester,
                             event_type="scanned")
        delta = b""
        if mine < MAX_SCAN_EVENTS_PER_FINDER and total < MAX_SCAN_EVENTS_PER_DAY:
            replica.begin(now_ms)
            replica.append(_t.EVENTS, event)
            delta = bytes(replica.commit())
        # The card and nothing else: not even the thing's name (the owner puts on the card
        # what a finder may see).
        return Served(encode_response(True, card=_t.card(replica)), delta,
                      [CardShown(info.hashname, requester, event)])
    mine, total = _today(replica, _t.INBOX, now_ms, key="from", finder=requester)
    if mine >= MAX_MESSAGES_PER_FINDER or total >= MAX_MESSAGES_PER_DAY:
        return _refuse(REFUSE_RATE, requester, info.hashname)
    text = request.fields["text"]
    contact = request.fields.get("contact", "")
    event = _t.event_record("message_received", by=me, now_ms=now_ms, entropy=entropy,
                            finder=requester, text=text, contact=contact, length=len(text))
    replica.begin(now_ms)
    replica.append(_t.INBOX, {"id": event["id"], "from": requester, "text": text,
                              "contact": contact, "at_ms": now_ms})
    replica.append(_t.EVENTS, event)
    delta = bytes(replica.commit())
    return Served(encode_response(True), delta, [MessageReceived(info.hashname, requester, event)])


def _serve_claim(replica: Replica, request: Request, info: _t.ThingInfo, *,
                 requester: Hashname, thing_identity: LocalIdentity | None, entropy: Entropy,
                 now_ms: int) -> Served:
    if request.thing != info.hashname:
        return _refuse(REFUSE_OTHER_THING, requester, info.hashname)
    fields = request.fields
    if set(fields) - _CLAIM_FIELDS:
        return _refuse(REFUSE_FIELD, requester, info.hashname)
    secret, cloud, keys = fields.get("secret"), fields.get("cloud"), fields.get("members")
    if (not isinstance(secret, bytes) or not isinstance(cloud, bytes) or not cloud
            or len(cloud) > 64 or not isinstance(keys, list) or not keys
            or len(keys) > MAX_CLAIM_MEMBERS
            or not all(isinstance(k, bytes) and len(k) == KEY_SIZE for k in keys)):
        return _refuse(REFUSE_MALFORMED, requester, info.hashname, "bad claim fields")
    access = replica.document(_t.ACCESS, _t.ACCESS_DOC) or {}
    if access.get("claim_spent"):
        return _refuse(REFUSE_SPENT, requester, info.hashname)
    if not _t.secret_matches(access.get("claim_hash"), secret):
        return _refuse(REFUSE_BAD_SECRET, requester, info.hashname)
    if thing_identity is None or thing_identity.hashname != info.hashname:
        return _refuse(REFUSE_NO_KEY, requester, info.hashname)
    members = {hashname_from_keys({"3a": k}): k for k in keys}
    try:
        package = _x.prepare_transfer(replica, thing_identity, to_cloud=CloudId(cloud),
                                      members=members, entropy=entropy, now_ms=now_ms)
        delta = _x.end_access(replica, package.record, now_ms=now_ms)
    except (TransferError, ThingError) as exc:
        return _refuse(REFUSE_MALFORMED, requester, info.hashname, str(exc))
    return Served(encode_response(True, pkg=package.encode()), delta,
                  [ClaimAnswered(info.hashname, requester, CloudId(cloud))], package.record)


# -- the scanner's side --------------------------------------------------------------------------

SCAN_CLAIM_HERE: Final = "claim here"
SCAN_CLAIM_REMOTE: Final = "claim remote"
SCAN_OPEN: Final = "open"
SCAN_FINDER: Final = "finder"
SCAN_REFUSED: Final = "refused"


@dataclass(frozen=True, slots=True)
class ScanDecision:
    """What to do with a scanned tag.

    Attributes:
        action: ``SCAN_CLAIM_HERE`` (call :func:`claim_here`), ``SCAN_CLAIM_REMOTE`` (send
            :func:`claim_request` to the thing), ``SCAN_OPEN`` (call :func:`open_thing`),
            ``SCAN_FINDER`` (send :func:`card_request`, maybe :func:`message_request`) or
            ``SCAN_REFUSED``.
        tag: the tag. reason: why (for ``SCAN_REFUSED``), else "".
    """

    action: str
    tag: Tag
    reason: str = ""


def decide_scan(tag: Tag, *, holder: Replica | None, my_cloud: CloudId) -> ScanDecision:
    """Decide what a scan means for this device (pure; no state changes).

    Args:
        tag: the parsed tag.
        holder: this device's replica of the thing's sub-cloud if our cloud holds the thing
            (the shell looks it up by ``tag.hashname``), else None.
        my_cloud: this device's cloud.

    Returns:
        The :class:`ScanDecision`.
    """
    info: _t.ThingInfo | None = None
    if holder is not None:
        try:
            info = _t.thing_info(holder)
        except ThingError:
            info = None
    ours = (info is not None and info.hashname == tag.hashname and not info.ended
            and info.owner_cloud == my_cloud)
    if tag.is_fresh:
        if not ours:
            return ScanDecision(SCAN_CLAIM_REMOTE, tag)
        if info is not None and info.claimed:
            return ScanDecision(SCAN_REFUSED, tag, REFUSE_SPENT)
        return ScanDecision(SCAN_CLAIM_HERE, tag)
    return ScanDecision(SCAN_OPEN if ours else SCAN_FINDER, tag)


def claim_here(replica: Replica, secret: bytes, *, me: Hashname, my_cloud: CloudId,
               paths: Sequence[TagPath] = (), entropy: Entropy,
               now_ms: int) -> tuple[Tag, dict[str, Any], bytes]:
    """Claim a thing our cloud holds with its fresh tag's secret.

    Args:
        replica: this device's replica. secret: the claim secret from the tag.
        me: this device's hashname. my_cloud: our cloud (becomes the owner).
        paths: what to print on the new claimed tag. entropy: randomness.
        now_ms: wall-clock milliseconds.

    Returns:
        ``(claimed tag with the new finder capability, the "claimed" event, delta)``.

    Raises:
        ClaimRefused: wrong secret, spent secret, or the thing moved; nothing is written.
    """
    info = _t.thing_info(replica)
    access = replica.document(_t.ACCESS, _t.ACCESS_DOC) or {}
    if info.ended:
        raise ClaimRefused(REFUSE_MOVED)
    if access.get("claim_spent"):
        raise ClaimRefused(REFUSE_SPENT, "this tag was claimed before; a claim works once")
    if not _t.secret_matches(access.get("claim_hash"), secret):
        raise ClaimRefused(REFUSE_BAD_SECRET)
    cap = _t._entropy(entropy, _t.FINDER_CAP_SIZE)
    key = replica.get(_t.PROFILE, _t.PROFILE_DOC, "cs3a")
    event = _t.event_record("claimed", by=me, now_ms=now_ms, entropy=entropy)
    replica.begin(now_ms)
    replica.set_many(_t.ACCESS, _t.ACCESS_DOC, {
        "claim_spent": True, "owner_cloud": bytes(my_cloud), "finder_cap": cap,
        "finder_hash": _t.claim_hash(cap)})
    # Who spent it, as a multi-value register: two partitioned devices claiming at once both
    # show up after the merge instead of one silently winning.
    replica.set_mv(_t.ACCESS, _t.ACCESS_DOC, "claimed_by", me)
    replica.append(_t.EVENTS, event)
    delta = bytes(replica.commit())
    return claimed_tag(key, cap, paths), event, delta


def open_thing(replica: Replica, *, me: Hashname, entropy: Entropy,
               now_ms: int) -> tuple[_t.ThingInfo, dict[str, Any], bytes]:
    """The owner scanned a claimed tag: open the thing and record a ``scanned`` event.

    Args:
        replica: this device's replica. me: this device's hashname.
        entropy: randomness. now_ms: wall-clock milliseconds.

    Returns:
        ``(the thing's info, the event, delta)``.
    """
    info = _t.thing_info(replica)
    event = _t.event_record("scanned", by=me, now_ms=now_ms, entropy=entropy, owner=True)
    replica.begin(now_ms)
    replica.append(_t.EVENTS, event)
    return info, event, bytes(replica.commit())


def current_tag(replica: Replica, paths: Sequence[TagPath] = ()) -> Tag:
    """The claimed tag to print for a thing we own (its current finder capability).

    Args:
        replica: a replica of the thing's sub-cloud. paths: where our cloud answers.

    Returns:
        The tag.

    Raises:
        ThingError: the thing is not claimed.
    """
    cap = replica.get(_t.ACCESS, _t.ACCESS_DOC, "finder_cap")
    key = replica.get(_t.PROFILE, _t.PROFILE_DOC, "cs3a")
    if not isinstance(cap, bytes) or not isinstance(key, bytes):
        raise ThingError("the thing is not claimed: print its fresh tag")
    return claimed_tag(key, cap, paths)
