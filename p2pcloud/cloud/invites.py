"""Invites: a one-time ``p2pcloud:`` URI (text or QR code) that lets a new device join.

Theory of operation
-------------------
An admin device makes an invite (:meth:`InviteBook.create`): a one-time 128-bit secret, an
expiry, the cloud id, and what the new device needs to reach the inviter (its CS3a and
Ed25519 keys, its current paths). It is shown as a QR code or as text. The inviter keeps
the secret in its :class:`InviteBook` (pure state; the shell persists
:meth:`InviteBook.to_bytes`), so a used or expired invite fails clearly.

URI format (version 1)::

    p2pcloud:invite/1/<base32(LEN(2) | CBOR payload | CHECK(4))>

``payload`` = ``{"c": cloud id, "a": inviter CS3a key, "k": inviter verify key, "p": [v3
path objects], "s": secret, "e": expiry (integer seconds)}``; ``LEN`` is the payload length
(big-endian), so a truncated invite is told apart from an altered one; ``CHECK`` =
``SHA-256(b"p2pcloud invite v1" + payload)[:4]`` catches typos and damage (it is not a
security check: whoever holds the invite holds the secret). The scheme, the word ``invite``
and the base32 are case-insensitive: QR codes use upper case (the QR alphanumeric mode, a
smaller code), text uses lower case. The inviter's hashname is computed from its key, never
read from the text.

The join protocol runs on a reliable channel of type ``pair`` (the node opens it to the
inviter's hashname, so both ends are authenticated by the E3X link). Messages are CBOR maps
with ``"v": 1`` and a type ``"t"``:

1. joiner -> inviter ``join``: ``i`` invite id (``SHA-256("p2pcloud invite id" + secret)[:16]``,
   so the secret itself never travels), ``a``/``k`` the joiner's CS3a and verify keys, ``n``
   a nonce, ``m`` = HMAC-SHA256(secret, transcript) where the transcript binds the cloud id,
   BOTH hashnames (the inviter's and the joiner's), the joiner's verify key and the nonce.
   The inviter checks the sender's link hashname equals the key's, then the invite's state
   (unknown, used, expired), then the MAC. Any proof attempt burns the invite.
2. inviter -> joiner ``welcome``: ``g`` the grant the inviter signed for the joiner, ``ch``
   the records that prove it back to the founding grant (:meth:`Membership.chain_for`), ``m``
   an HMAC by the same secret over the join MAC and those records, so the joiner knows the
   reply comes from whoever made the invite; or ``refused`` with a reason ``r``.

Pure: no I/O, no clock, no trio; ``now`` and ``entropy`` come in.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import struct
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import cbor2
import segno

from p2pcloud._crypto import KEY_SIZE, LocalIdentity, hashname_from_keys
from p2pcloud._ids import CloudId, Hashname
from p2pcloud._wire import Entropy, b32decode, b32encode
from p2pcloud.cloud._join import (
    CHANNEL_TYPE,
    PROTOCOL_VERSION,
    Joined,
    accept_welcome,
    admit,
    decode_message,
    lp,
    peer_keys,
    refusal,
    welcome,
)
from p2pcloud.cloud.grants import ID_SIZE, Grant, Scope, keys_belong
from p2pcloud.cloud.membership import Membership
from p2pcloud.errors import BadURI, JoinFailed, LocalProtocolError, MalformedPacket

__all__ = [
    "CHANNEL_TYPE",
    "DEFAULT_TTL",
    "INVITE_VERSION",
    "MAX_INVITE_PATHS",
    "Invite",
    "InviteBook",
    "InviteJoiner",
    "JoinOutcome",
    "Joined",
    "PendingInvite",
    "admit",
    "format_invite",
    "invite_qr",
    "invite_qr_png",
    "invite_qr_svg",
    "invite_qr_text",
    "is_invite",
    "parse_invite",
]

INVITE_VERSION: Final = 1
DEFAULT_TTL: Final = 24 * 3600  # an invite shown today is used today; a lost one dies soon
MAX_TTL: Final = 30 * 24 * 3600  # an invite is not a standing credential
SECRET_SIZE: Final = 16  # 128 bits: unguessable, and short enough for a small QR code
NONCE_SIZE: Final = 16
MAC_SIZE: Final = 32  # HMAC-SHA256, untruncated
CHECK_SIZE: Final = 4  # typo check: 1 in 4 billion damaged invites slips through
MAX_INVITE_PATHS: Final = 8
"""Most paths an invite carries: a device's few addresses; each costs QR modules."""
MAX_INVITE_TEXT: Final = 2048
"""Longest invite we parse: keys, secret and 8 paths take ~400 characters; a version 40 QR
code holds ~4 KiB, and nothing legitimate is longer than this."""
MAX_BOOK: Final = 1024  # open invites one device keeps; older expired ones are pruned first

_PREFIX: Final = "p2pcloud:invite/"
_B32_ALPHABET: Final = frozenset("abcdefghijklmnopqrstuvwxyz234567")
_CHECK_CONTEXT: Final = b"p2pcloud invite v1"
_ID_CONTEXT: Final = b"p2pcloud invite id"
_JOIN_CONTEXT: Final = b"p2pcloud join v1"


def _when(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def invite_id_for(secret: bytes) -> bytes:
    """The public id of an invite: a hash of its secret (the secret never travels).

    Args:
        secret: the 16-byte invite secret.

    Returns:
        16 bytes.
    """
    return hashlib.sha256(_ID_CONTEXT + secret).digest()[:ID_SIZE]


@dataclass(frozen=True, slots=True)
class Invite:
    """What an invite URI says.

    Attributes:
        cloud: the cloud id.
        inviter: the inviter's hashname (computed from ``inviter_key``).
        inviter_key: its CS3a key.
        inviter_verify_key: its Ed25519 verify key.
        paths: v3 path objects where the inviter may be reached.
        secret: the one-time secret.
        expires: the first second it is no longer valid.
    """

    cloud: CloudId
    inviter: Hashname
    inviter_key: bytes
    inviter_verify_key: bytes
    paths: tuple[Mapping[str, Any], ...]
    secret: bytes = field(repr=False)
    expires: int

    @property
    def id(self) -> bytes:
        """The invite id (:func:`invite_id_for`)."""
        return invite_id_for(self.secret)

    def keys(self) -> dict[str, bytes]:
        """The inviter's cipher-set keys, as ``Node.link`` takes them: ``{"3a": key}``."""
        return {"3a": self.inviter_key}


def format_invite(invite: Invite) -> str:
    """Write an invite as text (lower case).

    Args:
        invite: the invite.

    Returns:
        The ``p2pcloud:invite/1/...`` URI.

    Raises:
        BadURI: too many paths, or paths that are not CBOR-encodable maps.
    """
    if len(invite.paths) > MAX_INVITE_PATHS:
        raise BadURI(f"an invite carries at most {MAX_INVITE_PATHS} paths")
    payload_obj = {
        "c": bytes(invite.cloud), "a": invite.inviter_key, "k": invite.inviter_verify_key,
        "p": [dict(p) for p in invite.paths], "s": invite.secret, "e": int(invite.expires),
    }
    try:
        payload = cbor2.dumps(payload_obj, canonical=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise BadURI(f"paths do not encode: {exc}") from exc
    check = hashlib.sha256(_CHECK_CONTEXT + payload).digest()[:CHECK_SIZE]
    blob = struct.pack(">H", len(payload)) + payload + check
    text = f"{_PREFIX}{INVITE_VERSION}/{b32encode(blob)}"
    if len(text) > MAX_INVITE_TEXT:
        raise BadURI("invite too long; give fewer paths")
    return text


def is_invite(text: str) -> bool:
    """Whether scanned or pasted text is an invite rather than a thing's tag.

    Both are ``p2pcloud:`` URIs; a tag (``p2pcloud.things.tags``) is ``p2pcloud:<base32>``
    whose first letter is always ``a`` (its version byte), so it never reads ``invite/``.

    Args:
        text: the text a QR code held, or what the user pasted.

    Returns:
        True when it should go to :func:`parse_invite`.
    """
    return isinstance(text, str) and text.strip().lower().startswith(_PREFIX)


def parse_invite(text: str, *, now: float | None = None) -> Invite:
    """Parse an invite URI (text typed or pasted, or a decoded QR code).

    Args:
        text: the URI; case and surrounding white space do not matter.
        now: if given, an expired invite is refused (seconds since the Unix epoch).

    Returns:
        The :class:`Invite`.

    Raises:
        BadURI: with a message saying what is wrong: not an invite, wrong version,
            truncated, altered, malformed, or expired.
    """
    if not isinstance(text, str):
        raise BadURI("an invite is text")
    text = text.strip()
    if len(text) > MAX_INVITE_TEXT:
        raise BadURI(f"this is longer than any invite ({MAX_INVITE_TEXT} characters)")
    lowered = text.lower()
    if not lowered.startswith("p2pcloud:"):
        raise BadURI("this is not a p2pcloud: invite (it should start with p2pcloud:invite/)")
    if not lowered.startswith(_PREFIX):
        raise BadURI("this p2pcloud: URI is not an invite")
    rest = lowered[len(_PREFIX):]
    version, sep, data = rest.partition("/")
    if not sep or not version.isdigit():
        raise BadURI("this invite is truncated (no version); copy the whole text again")
    if int(version) != INVITE_VERSION:
        raise BadURI(
            f"invite version {int(version)} is not supported (this p2pcloud reads version "
            f"{INVITE_VERSION}); update p2pcloud on both devices"
        )
    try:
        blob = b32decode(data)
    except MalformedPacket as exc:
        if data and set(data) <= _B32_ALPHABET:
            # only base32 letters, yet not a whole number of bytes: letters are missing or
            # added at the end; the length header says which
            raise BadURI(_length_problem(data)) from exc
        raise BadURI(f"this invite is damaged ({exc}); copy the whole text again") from exc
    if len(blob) < 2:
        raise BadURI("this invite is truncated; copy the whole text again")
    (length,) = struct.unpack(">H", blob[:2])
    if len(blob) < 2 + length + CHECK_SIZE:
        raise BadURI("this invite is truncated; copy the whole text again")
    if len(blob) > 2 + length + CHECK_SIZE:
        raise BadURI("this invite has extra characters at the end; copy it exactly")
    payload = blob[2 : 2 + length]
    check = blob[2 + length :]
    expected = hashlib.sha256(_CHECK_CONTEXT + payload).digest()[:CHECK_SIZE]
    if not hmac.compare_digest(check, expected):
        raise BadURI("this invite was altered or mistyped (its check does not match)")
    invite = _payload_to_invite(payload)
    if now is not None and now >= invite.expires:
        raise BadURI(f"this invite expired at {_when(invite.expires)}; ask for a new one")
    return invite


def _length_problem(data: str) -> str:
    truncated = "this invite is truncated; copy the whole text again"
    for cut in range(1, 8):
        try:
            blob = b32decode(data[:-cut])
        except MalformedPacket:
            continue
        if len(blob) >= 2 and len(blob) >= 2 + struct.unpack(">H", blob[:2])[0] + CHECK_SIZE:
            return "this invite has extra characters at the end; copy it exactly"
        return truncated
    return truncated


def _payload_to_invite(payload: bytes) -> Invite:
    try:
        obj: Any = cbor2.loads(payload)
    except Exception as exc:  # cbor2 raises many types on hostile input; all mean malformed
        raise BadURI("this invite's content is malformed") from exc
    if not isinstance(obj, dict) or set(obj) != {"c", "a", "k", "p", "s", "e"}:
        raise BadURI("this invite's content is malformed (wrong fields)")
    cloud, key, vk, paths, secret, expires = (obj[k] for k in ("c", "a", "k", "p", "s", "e"))
    if not (isinstance(cloud, bytes) and len(cloud) == ID_SIZE):
        raise BadURI("this invite's cloud id is malformed")
    if not (isinstance(key, bytes) and isinstance(vk, bytes)
            and len(key) == KEY_SIZE and len(vk) == KEY_SIZE and keys_belong(key, vk)):
        raise BadURI("this invite's keys are malformed or do not belong together")
    if not (isinstance(secret, bytes) and len(secret) == SECRET_SIZE):
        raise BadURI("this invite's secret is malformed")
    if type(expires) is not int or not 0 < expires < 1 << 40:
        raise BadURI("this invite's expiry is malformed")
    if not isinstance(paths, list) or len(paths) > MAX_INVITE_PATHS:
        raise BadURI(f"an invite carries a list of at most {MAX_INVITE_PATHS} paths")
    for path in paths:
        if not isinstance(path, dict) or not isinstance(path.get("type"), str):
            raise BadURI('each path in an invite is a map with a "type"')
    return Invite(
        cloud=CloudId(cloud), inviter=hashname_from_keys({"3a": key}), inviter_key=key,
        inviter_verify_key=vk, paths=tuple(paths), secret=secret, expires=expires,
    )


# -- QR codes --------------------------------------------------------------------------------


def invite_qr(invite: Invite | str) -> segno.QRCode:
    """The invite as a QR code (upper case, so it uses the compact alphanumeric mode).

    Args:
        invite: an invite or its text.

    Returns:
        A ``segno.QRCode`` (error correction level M: survives a smudge or a fold).
    """
    text = invite if isinstance(invite, str) else format_invite(invite)
    return segno.make(text.upper(), error="m", micro=False)


def invite_qr_png(invite: Invite | str, *, scale: int = 8) -> bytes:
    """The invite's QR code as PNG bytes.

    Args:
        invite: an invite or its text.
        scale: pixels per module.

    Returns:
        A PNG image.
    """
    out = io.BytesIO()
    invite_qr(invite).save(out, kind="png", scale=scale, border=4)
    return out.getvalue()


def invite_qr_svg(invite: Invite | str, *, scale: int = 4) -> str:
    """The invite's QR code as an SVG document.

    Args:
        invite: an invite or its text.
        scale: user units per module.

    Returns:
        SVG text.
    """
    out = io.BytesIO()
    invite_qr(invite).save(out, kind="svg", scale=scale, border=4)
    return out.getvalue().decode("utf-8")


def invite_qr_text(invite: Invite | str) -> str:
    """The invite's QR code drawn with block characters, for a terminal.

    Args:
        invite: an invite or its text.

    Returns:
        Lines of text (two modules per character row).
    """
    out = io.StringIO()
    invite_qr(invite).terminal(out=out, compact=True)
    return out.getvalue()


# -- the inviter's one-time state ----------------------------------------------------------


@dataclass(slots=True)
class PendingInvite:
    """One invite this device made.

    Attributes:
        id: the invite id.
        secret: the secret.
        cloud: the cloud id.
        expires: first invalid second.
        role: the role the joiner will get.
        rights: the rights the joiner will get (scope to rights).
        grant_expires: the expiry of the grant the joiner gets, or None.
        used_at: when it was used (None while open).
        used_by: the hashname that used it (or tried to, with a wrong proof).
    """

    id: bytes
    secret: bytes = field(repr=False)
    cloud: CloudId
    expires: int
    role: str
    rights: dict[Scope, list[str]]
    grant_expires: int | None = None
    used_at: int | None = None
    used_by: str | None = None


class InviteBook:
    """The invites one device has made, and whether each was used (pure, persistable).

    The shell loads it with :meth:`from_bytes`, saves :meth:`to_bytes` after every change
    (a join burns an invite before the grant is sent, so a crash never lets it be reused if
    the book is saved before the reply goes out).
    """

    def __init__(self, entries: Iterable[PendingInvite] = ()) -> None:
        """Start a book.

        Args:
            entries: invites made earlier.
        """
        self._entries: dict[bytes, PendingInvite] = {e.id: e for e in entries}
        self._stats: Counter[str] = Counter()

    def __len__(self) -> int:
        """How many invites the book holds (used ones included, until pruned)."""
        return len(self._entries)

    def entries(self) -> list[PendingInvite]:
        """Every invite in the book, soonest expiry first."""
        return sorted(self._entries.values(), key=lambda e: (e.expires, e.id))

    def create(
        self,
        identity: LocalIdentity,
        membership: Membership,
        *,
        paths: Sequence[Mapping[str, Any]],
        now: float,
        entropy: Entropy,
        ttl: int = DEFAULT_TTL,
        role: str = "device",
        rights: Mapping[Scope, Iterable[str]] | None = None,
        grant_expires: int | None = None,
    ) -> Invite:
        """Make a new invite for this cloud.

        Args:
            identity: this device (must be an admin of the cloud).
            membership: the cloud's membership now.
            paths: where the joiner can reach us (v3 path objects).
            now: seconds since the Unix epoch.
            entropy: randomness source (the secret).
            ttl: seconds until the invite expires (at most MAX_TTL).
            role: the joiner's role (``device`` by default; ``admin`` for a device that may
                pair others).
            rights: the joiner's rights; every right on every sub-cloud by default.
            grant_expires: expiry of the joiner's grant, or None.

        Returns:
            The invite: show it with :func:`format_invite` or :func:`invite_qr_png`.

        Raises:
            LocalProtocolError: we are not an admin, a bad ttl, or too many open invites.
        """
        if identity.verify_key is None or not membership.is_admin(identity.hashname):
            raise LocalProtocolError("only an admin of this cloud can invite a device")
        if not 0 < ttl <= MAX_TTL:
            raise LocalProtocolError(f"an invite lives 1..{MAX_TTL} seconds")
        if len(paths) > MAX_INVITE_PATHS:
            raise LocalProtocolError(f"an invite carries at most {MAX_INVITE_PATHS} paths")
        self.prune(now)
        if len(self._entries) >= MAX_BOOK:
            raise LocalProtocolError("too many open invites; wait for some to expire")
        secret = entropy(SECRET_SIZE)
        if len(secret) != SECRET_SIZE:
            raise LocalProtocolError("entropy returned the wrong number of bytes")
        wanted = {k: sorted(set(v)) for k, v in (rights or {"*": ["all"]}).items()}
        expires = int(now) + int(ttl)
        entry = PendingInvite(
            id=invite_id_for(secret), secret=secret, cloud=membership.cloud, expires=expires,
            role=role, rights=wanted, grant_expires=grant_expires,
        )
        self._entries[entry.id] = entry
        return Invite(
            cloud=membership.cloud, inviter=identity.hashname, inviter_key=identity.cs3a_public,
            inviter_verify_key=identity.verify_key, paths=tuple(dict(p) for p in paths),
            secret=secret, expires=expires,
        )

    def check(self, invite_id: bytes, now: float) -> PendingInvite:
        """The open invite with this id.

        Args:
            invite_id: from a join message.
            now: seconds since the Unix epoch.

        Returns:
            The entry.

        Raises:
            JoinFailed: "this invite was already used", "this invite expired at ...", or
                unknown to this device.
        """
        entry = self._entries.get(bytes(invite_id))
        if entry is None:
            raise JoinFailed("this device made no such invite (or forgot it); ask for a new one")
        if entry.used_at is not None:
            raise JoinFailed("this invite was already used; ask for a new one")
        if now >= entry.expires:
            raise JoinFailed(f"this invite expired at {_when(entry.expires)}; ask for a new one")
        return entry

    def burn(self, invite_id: bytes, hashname: str, now: float) -> None:
        """Mark an invite used (whatever the outcome of the attempt).

        Args:
            invite_id: the invite.
            hashname: who used it.
            now: seconds since the Unix epoch.
        """
        entry = self._entries.get(bytes(invite_id))
        if entry is not None and entry.used_at is None:
            entry.used_at = int(now)
            entry.used_by = hashname

    def cancel(self, invite_id: bytes) -> bool:
        """Forget an invite so it can never be used.

        Returns:
            Whether the book held it.
        """
        return self._entries.pop(bytes(invite_id), None) is not None

    def prune(self, now: float) -> None:
        """Drop invites that expired (used ones too: an expired invite fails either way).

        Args:
            now: seconds since the Unix epoch.
        """
        for key in [k for k, e in self._entries.items() if now >= e.expires]:
            del self._entries[key]

    def handle_join(
        self,
        data: bytes,
        *,
        local: LocalIdentity,
        peer: Hashname,
        membership: Membership,
        now: float,
        entropy: Entropy,
    ) -> JoinOutcome:
        """Answer a ``join`` message received on a ``pair`` channel (never raises on input).

        Args:
            data: the message bytes.
            local: this device's identity (the inviter; must be an admin).
            peer: the hashname at the other end of the link (authenticated by E3X).
            membership: the cloud's membership now.
            now: seconds since the Unix epoch.
            entropy: randomness source (the grant's nonce).

        Returns:
            A :class:`JoinOutcome`: the reply to send and, on success, the new grant (store
            it with :func:`~p2pcloud.cloud.membership.write_records` and save the book).
        """
        outcome = self._handle_join(data, local, peer, membership, now, entropy)
        self._stats["joined" if outcome.grant is not None
                    else f"refused: {outcome.error}"[:120]] += 1
        return outcome

    def statistics(self) -> dict[str, int]:
        """Counts of join outcomes since the book was loaded: ``joined``, ``refused: <reason>``."""
        return dict(self._stats)

    def _handle_join(
        self, data: bytes, local: LocalIdentity, peer: Hashname, membership: Membership,
        now: float, entropy: Entropy,
    ) -> JoinOutcome:
        try:
            msg = decode_message(data, "join")
            invite_id, key, vk, nonce, mac = (msg.get(k) for k in ("i", "a", "k", "n", "m"))
            if not (isinstance(invite_id, bytes) and len(invite_id) == ID_SIZE
                    and isinstance(nonce, bytes) and len(nonce) == NONCE_SIZE
                    and isinstance(mac, bytes) and len(mac) == MAC_SIZE):
                raise JoinFailed("malformed join message")
            key, vk = peer_keys(key, vk, peer)
            entry = self.check(invite_id, now)
        except JoinFailed as exc:
            return JoinOutcome(refusal(exc.reason), None, exc.reason)
        if entry.cloud != membership.cloud:
            reason = "this invite is for another cloud than the one this device answered for"
            return JoinOutcome(refusal(reason), None, reason)
        # one attempt per invite: burn it before looking at the proof
        self.burn(entry.id, peer, now)
        transcript = _join_transcript(entry.cloud, local.hashname, peer, vk, nonce)
        expected = hmac.new(entry.secret, transcript, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, mac):
            reason = "the invite proof is wrong (a forged or altered join); the invite is burned"
            return JoinOutcome(refusal(reason), None, reason)
        try:
            grant, chain = admit(
                membership, local, subject_key=key, subject_verify_key=vk, role=entry.role,
                rights=entry.rights, expires=entry.grant_expires, entropy=entropy,
            )
        except LocalProtocolError as exc:
            return JoinOutcome(refusal(str(exc)), None, str(exc))
        reply = welcome(entry.secret, mac, grant, chain)
        return JoinOutcome(reply, grant, None)

    def to_bytes(self) -> bytes:
        """The book as bytes (CBOR), for the shell to store (it holds secrets: mode 0600)."""
        return cbor2.dumps(
            {
                "v": 1,
                "e": [
                    {"i": e.id, "s": e.secret, "c": bytes(e.cloud), "x": e.expires, "r": e.role,
                     "a": e.rights, "g": e.grant_expires, "u": e.used_at, "b": e.used_by}
                    for e in self.entries()
                ],
            },
            canonical=True,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> InviteBook:
        """Load a book saved by :meth:`to_bytes`.

        Args:
            data: the bytes.

        Returns:
            The book.

        Raises:
            LocalProtocolError: the bytes are not a saved book.
        """
        try:
            obj: Any = cbor2.loads(data)
            if obj["v"] != 1:
                raise LocalProtocolError("unknown invite book version")
            entries = [
                PendingInvite(
                    id=e["i"], secret=e["s"], cloud=CloudId(e["c"]), expires=e["x"], role=e["r"],
                    rights=e["a"], grant_expires=e["g"], used_at=e["u"], used_by=e["b"],
                )
                for e in obj["e"]
            ]
        except LocalProtocolError:
            raise
        except Exception as exc:  # a damaged file: say so, never guess
            raise LocalProtocolError(f"the invite book is damaged: {exc!r}") from exc
        return cls(entries)


@dataclass(frozen=True, slots=True)
class JoinOutcome:
    """What the inviter does after a join message.

    Attributes:
        reply: the message to send back on the ``pair`` channel (then end it).
        grant: the grant made for the joiner, or None when refused.
        error: why it was refused (for logs and the inviter's screen), or None.
    """

    reply: bytes
    grant: Grant | None
    error: str | None


def _join_transcript(
    cloud: bytes, inviter: str, joiner: str, joiner_vk: bytes, nonce: bytes
) -> bytes:
    return _JOIN_CONTEXT + lp(
        bytes(cloud), inviter.encode("ascii"), joiner.encode("ascii"), joiner_vk, nonce
    )


# -- the joiner ----------------------------------------------------------------------------


class InviteJoiner:
    """The joiner's side of the invite protocol (one attempt).

    Use: parse the invite, link to ``invite.inviter`` (its keys and paths are in the
    invite), open a ``pair`` channel, send :meth:`request`, feed the reply to
    :meth:`finish`.
    """

    def __init__(self, identity: LocalIdentity, invite: Invite, *, entropy: Entropy) -> None:
        """Prepare a join.

        Args:
            identity: this (new) device; must be able to sign.
            invite: the parsed invite.
            entropy: randomness source.

        Raises:
            LocalProtocolError: the identity cannot sign.
        """
        if identity.verify_key is None:
            raise LocalProtocolError("this identity cannot sign (made from CS3a keys)")
        self._identity = identity
        self._invite = invite
        self._nonce = entropy(NONCE_SIZE)
        transcript = _join_transcript(
            invite.cloud, invite.inviter, identity.hashname, identity.verify_key, self._nonce
        )
        self._mac = hmac.new(invite.secret, transcript, hashlib.sha256).digest()
        self._done = False

    def request(self) -> bytes:
        """The ``join`` message to send to the inviter."""
        return cbor2.dumps({
            "v": PROTOCOL_VERSION, "t": "join", "i": self._invite.id,
            "a": self._identity.cs3a_public, "k": self._identity.verify_key, "n": self._nonce,
            "m": self._mac,
        })

    def finish(self, data: bytes, *, peer: Hashname, now: float) -> Joined:
        """Check the inviter's reply.

        Args:
            data: the reply bytes.
            peer: the hashname at the other end of the link.
            now: seconds since the Unix epoch.

        Returns:
            The :class:`Joined` result.

        Raises:
            JoinFailed: refused (with the inviter's reason), forged, from the wrong
                endpoint, or a grant that does not make us a member.
        """
        if self._done:
            raise JoinFailed("this join already finished; scan a new invite")
        self._done = True
        if peer != self._invite.inviter:
            raise JoinFailed("the reply did not come from the device that made the invite")
        return accept_welcome(
            data, self._invite.secret, self._mac, self._identity, self._invite.cloud, now
        )


