"""Pairing by a short code typed by hand, authenticated with SPAKE2.

Theory of operation
-------------------
An admin device opens a pairing (:meth:`PairingHost.open`) and shows a short code such as
``42-maple-otter-drum``: a *nameplate* (1..99) and three words from a 256-word list
(:mod:`p2pcloud.cloud._words`), 24 secret bits. While the code is open the node advertises a
pairing flag and the nameplate in its LAN discovery record (``p2pcloud._node.discovery``),
so the new device finds it, links to it (an E3X link: both hashnames are authenticated) and
opens a reliable ``pair`` channel. The code itself never travels: both sides run SPAKE2
(password-authenticated key exchange, Abdalla-Pointcheval 2005, the ``spake2`` package that
magic-wormhole uses) with the code as the password and the two hashnames as the SPAKE2
identities, so an eavesdropper learns nothing and an active attacker gets exactly one guess.

Messages (CBOR maps, ``"v": 1``, type ``"t"``), on the ``pair`` channel:

1. joiner -> host ``pake``: ``np`` the nameplate, ``m`` the joiner's SPAKE2 message (side
   B), ``a``/``k`` the joiner's CS3a and verify keys (must match the link's hashname).
2. host -> joiner ``pake``: ``m`` the host's SPAKE2 message (side A) and ``c`` its key
   confirmation ``HMAC(K, "host" + T)``. The host burns the code here, before it knows
   whether the guess was right: a wrong code fails after ONE attempt.
3. joiner -> host ``confirm``: ``c`` = ``HMAC(K, "joiner" + T)``, sent only if the host's
   confirmation verified (a wrong code, or a man in the middle, fails here on the joiner).
4. host -> joiner ``welcome`` (grant + chain, as in :mod:`p2pcloud.cloud.invites`, MACed
   with a key derived from K) or ``refused``.

``T``, the transcript, binds the host's and the joiner's hashnames, the joiner's keys, both
SPAKE2 messages and the nameplate. A man in the middle holds a different hashname than at
least one side expects, so even relaying every byte the two sides derive different keys
and the confirmation fails; a relay that swaps keys in message 1 fails the link check.

Both sides are pure state machines: bytes and ``now`` in, bytes and a :class:`PairStep` out;
bad input never raises (it ends the attempt with a reason).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import cbor2
from spake2 import SPAKE2_A, SPAKE2_B  # type: ignore[import-untyped]

from p2pcloud._crypto import LocalIdentity
from p2pcloud._ids import Hashname
from p2pcloud._wire import Entropy
from p2pcloud.cloud._join import (
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
from p2pcloud.cloud._words import INDEX, WORDS
from p2pcloud.cloud.grants import Grant, Scope
from p2pcloud.cloud.membership import Membership
from p2pcloud.errors import JoinFailed, LocalProtocolError

__all__ = [
    "CODE_WORDS",
    "DEFAULT_CODE_TTL",
    "MAX_NAMEPLATE",
    "PairStep",
    "PairingHost",
    "PairingJoiner",
    "make_code",
    "parse_code",
]

CODE_WORDS: Final = 3  # 24 bits: one online guess per code gives an attacker 1 in 16 million
MAX_NAMEPLATE: Final = 99  # two digits: easy to read out; tells open pairings on a LAN apart
DEFAULT_CODE_TTL: Final = 10 * 60  # a code is typed within minutes of being shown
MAX_CODE_TTL: Final = 60 * 60  # a short code is never a standing credential
SPAKE_MESSAGE_SIZE: Final = 33  # spake2 ed25519: side byte + 32-byte group element
MAC_SIZE: Final = 32
MAX_CODE_TEXT: Final = 64  # "99-" plus three words of at most 6 letters, with room for spaces

_CONTEXT: Final = b"p2pcloud pair v1"
_CODE_SPLIT: Final = re.compile(r"[\s\-_.]+")


def make_code(entropy: Entropy) -> str:
    """A fresh pairing code: ``<nameplate>-<word>-<word>-<word>``.

    Args:
        entropy: randomness source.

    Returns:
        The code, e.g. ``"42-maple-otter-drum"``.
    """
    raw = entropy(2 + CODE_WORDS)
    if len(raw) != 2 + CODE_WORDS:
        raise LocalProtocolError("entropy returned the wrong number of bytes")
    nameplate = 1 + int.from_bytes(raw[:2], "big") % MAX_NAMEPLATE
    return "-".join([str(nameplate), *(WORDS[b] for b in raw[2:])])


def parse_code(text: str) -> tuple[int, str]:
    """Check and normalize a code as the user typed it.

    Args:
        text: the code; spaces, dots or underscores may stand for hyphens, case is ignored.

    Returns:
        ``(nameplate, normalized code)``.

    Raises:
        JoinFailed: not a pairing code, with a sentence saying what is wrong.
    """
    if not isinstance(text, str) or len(text) > MAX_CODE_TEXT:
        raise JoinFailed("this is not a pairing code (too long)")
    parts = [p for p in _CODE_SPLIT.split(text.strip().lower()) if p]
    if len(parts) != 1 + CODE_WORDS or not parts[0].isdigit():
        raise JoinFailed(
            f"a pairing code is a number and {CODE_WORDS} words, like 42-maple-otter-drum"
        )
    nameplate = int(parts[0])
    if not 1 <= nameplate <= MAX_NAMEPLATE:
        raise JoinFailed(f"the number of a pairing code is 1..{MAX_NAMEPLATE}")
    unknown = [w for w in parts[1:] if w not in INDEX]
    if unknown:
        raise JoinFailed(f"not a pairing word: {unknown[0][:20]!r}; check the spelling")
    return nameplate, "-".join([str(nameplate), *parts[1:]])


@dataclass(frozen=True, slots=True)
class PairStep:
    """What one side does after a message.

    Attributes:
        reply: bytes to send on the ``pair`` channel, or None.
        done: True when this attempt is over (then end the channel after sending ``reply``).
        grant: on the host, the grant made for the joiner on success.
        joined: on the joiner, the result on success.
        error: why the attempt failed (a sentence for the user), or None.
    """

    reply: bytes | None = None
    done: bool = False
    grant: Grant | None = None
    joined: Joined | None = None
    error: str | None = None


def _transcript(
    host: str, joiner: str, key: bytes, vk: bytes, msg_b: bytes, msg_a: bytes, nameplate: int
) -> bytes:
    return _CONTEXT + lp(
        host.encode("ascii"), joiner.encode("ascii"), key, vk, msg_b, msg_a,
        str(nameplate).encode("ascii"),
    )


def _mac(key: bytes, label: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, label + transcript, hashlib.sha256).digest()


_WRONG = "the pairing code was wrong, or another device is in the middle; start again"


@dataclass(slots=True)
class _HostSession:
    peer: Hashname
    key: bytes
    vk: bytes
    session_key: bytes
    transcript: bytes
    expires: float


class PairingHost:
    """The admin device's side: one open code at a time, one attempt per code."""

    def __init__(
        self,
        identity: LocalIdentity,
        *,
        role: str = "device",
        rights: Mapping[Scope, Iterable[str]] | None = None,
        grant_expires: int | None = None,
    ) -> None:
        """Prepare to pair devices into the cloud.

        Args:
            identity: this device (an admin of the cloud when a code is opened).
            role: the role paired devices get.
            rights: their rights; every right on every sub-cloud by default.
            grant_expires: expiry of their grants, or None.
        """
        self._identity = identity
        self._role = role
        self._rights = {k: sorted(set(v)) for k, v in (rights or {"*": ["all"]}).items()}
        self._grant_expires = grant_expires
        self._code: str | None = None
        self._cloud: bytes | None = None
        self._nameplate: int | None = None
        self._expires = 0.0
        self._sessions: dict[Hashname, _HostSession] = {}
        self.attempts = 0  # first messages that reached an open code (each burns it)
        self._stats: Counter[str] = Counter()

    def open(
        self, membership: Membership, *, now: float, entropy: Entropy,
        ttl: float = DEFAULT_CODE_TTL,
    ) -> str:
        """Open a new code (closing any earlier one).

        Args:
            membership: the cloud's membership now (we must be an admin).
            now: seconds since the Unix epoch.
            entropy: randomness source.
            ttl: seconds the code stays open (at most MAX_CODE_TTL).

        Returns:
            The code to show the user.

        Raises:
            LocalProtocolError: we are not an admin, or a bad ttl.
        """
        if not membership.is_admin(self._identity.hashname):
            raise LocalProtocolError("only an admin of this cloud can pair a device")
        if not 0 < ttl <= MAX_CODE_TTL:
            raise LocalProtocolError(f"a pairing code stays open 1..{MAX_CODE_TTL} seconds")
        self._cloud = membership.cloud
        self._code = make_code(entropy)
        self._nameplate = int(self._code.split("-", 1)[0])
        self._expires = now + ttl
        self._sessions.clear()
        return self._code

    def close(self) -> None:
        """Close the open code (the pairing flag goes off)."""
        self._code = None
        self._nameplate = None

    def nameplate(self, now: float) -> int | None:
        """The open code's nameplate for the discovery record, or None when none is open.

        Args:
            now: seconds since the Unix epoch (an expired code is closed here).
        """
        if self._code is not None and now >= self._expires:
            self.close()
        return self._nameplate

    def receive(
        self,
        peer: Hashname,
        data: bytes,
        *,
        membership: Membership,
        now: float,
        entropy: Entropy,
    ) -> PairStep:
        """Handle a message from a joiner on a ``pair`` channel (never raises on input).

        Args:
            peer: the hashname at the other end of the link.
            data: the message.
            membership: the cloud's membership now.
            now: seconds since the Unix epoch.
            entropy: randomness source.

        Returns:
            The :class:`PairStep`: a reply to send; on success the grant to store.
        """
        step = self._receive(peer, data, membership, now, entropy)
        if step.error is not None:
            self._stats[f"refused: {step.error}"[:120]] += 1
        elif step.grant is not None:
            self._stats["paired"] += 1
        return step

    def statistics(self) -> dict[str, int]:
        """Counts of pairing outcomes: attempts that burned a code, ``paired``, and
        ``refused: <reason>``."""
        return dict(self._stats)

    def _receive(
        self, peer: Hashname, data: bytes, membership: Membership, now: float, entropy: Entropy
    ) -> PairStep:
        try:
            msg = decode_message(data, "pake", "confirm")
        except JoinFailed as exc:
            self._sessions.pop(peer, None)
            return PairStep(refusal(exc.reason), True, error=exc.reason)
        if msg["t"] == "pake":
            return self._first(peer, msg, now, entropy)
        return self._confirm(peer, msg, membership, now, entropy)

    def _first(self, peer: Hashname, msg: dict[str, Any], now: float, entropy: Entropy
               ) -> PairStep:
        nameplate = self.nameplate(now)
        if self._code is None or nameplate is None:
            reason = "this device has no pairing code open (it expired or was used); start again"
            return PairStep(refusal(reason), True, error=reason)
        if type(msg.get("np")) is not int or msg.get("np") != nameplate:
            reason = f"this device is not showing pairing code number {msg.get('np')!r:.8}"
            return PairStep(refusal(reason), True, error=reason)
        code, expires = self._code, self._expires
        # one attempt per code: burn it before the guess is even evaluated
        self.close()
        self.attempts += 1
        self._stats["code burned by an attempt"] += 1
        try:
            key, vk = peer_keys(msg.get("a"), msg.get("k"), peer)
            msg_b = msg.get("m")
            if not isinstance(msg_b, bytes) or len(msg_b) != SPAKE_MESSAGE_SIZE:
                raise JoinFailed("malformed pairing message")
            spake = SPAKE2_A(code.encode("ascii"), idA=self._identity.hashname.encode("ascii"),
                             idB=peer.encode("ascii"), entropy_f=entropy)
            msg_a = spake.start()
            try:
                session_key = spake.finish(msg_b)
            except Exception as exc:  # spake2 raises several types on a bad element
                raise JoinFailed("malformed pairing message (bad SPAKE2 element)") from exc
        except JoinFailed as exc:
            return PairStep(refusal(exc.reason), True, error=exc.reason)
        transcript = _transcript(self._identity.hashname, peer, key, vk, msg_b, msg_a, nameplate)
        self._sessions[peer] = _HostSession(peer, key, vk, session_key, transcript, expires)
        reply = cbor2.dumps({"v": PROTOCOL_VERSION, "t": "pake", "m": msg_a,
                             "c": _mac(session_key, b"host", transcript)})
        return PairStep(reply)

    def _confirm(self, peer: Hashname, msg: dict[str, Any], membership: Membership,
                 now: float, entropy: Entropy) -> PairStep:
        session = self._sessions.pop(peer, None)
        if session is not None and now >= session.expires:
            session = None  # a confirmation after the code's lifetime counts for nothing
        if session is None:
            reason = "no pairing in progress with this device; start again"
            return PairStep(refusal(reason), True, error=reason)
        if membership.cloud != self._cloud:
            reason = "the code was opened for another cloud than the one given now"
            return PairStep(refusal(reason), True, error=reason)
        confirm = msg.get("c")
        expected = _mac(session.session_key, b"joiner", session.transcript)
        if not isinstance(confirm, bytes) or not hmac.compare_digest(confirm, expected):
            return PairStep(refusal(_WRONG), True, error=_WRONG)
        try:
            grant, chain = admit(
                membership, self._identity, subject_key=session.key, subject_verify_key=session.vk,
                role=self._role, rights=self._rights, expires=self._grant_expires,
                entropy=entropy,
            )
        except LocalProtocolError as exc:
            return PairStep(refusal(str(exc)), True, error=str(exc))
        welcome_key = _mac(session.session_key, b"welcome", session.transcript)
        return PairStep(welcome(welcome_key, expected, grant, chain), True, grant=grant)


class PairingJoiner:
    """The new device's side of a short-code pairing (one attempt)."""

    def __init__(
        self, identity: LocalIdentity, code: str, *, peer: Hashname, entropy: Entropy
    ) -> None:
        """Prepare to pair with the device at ``peer`` using a typed code.

        Args:
            identity: this (new) device; must be able to sign.
            code: the code as typed (see :func:`parse_code`).
            peer: the hashname of the device we linked to (found by discovery: its record
                carries the pairing flag and the nameplate).
            entropy: randomness source.

        Raises:
            JoinFailed: the code is not a pairing code.
            LocalProtocolError: the identity cannot sign.
        """
        if identity.verify_key is None:
            raise LocalProtocolError("this identity cannot sign (made from CS3a keys)")
        self._nameplate, normalized = parse_code(code)
        self._identity = identity
        self._peer = peer
        self._spake = SPAKE2_B(normalized.encode("ascii"), idA=peer.encode("ascii"),
                               idB=identity.hashname.encode("ascii"), entropy_f=entropy)
        self._msg_b: bytes = self._spake.start()
        self._state = "start"
        self._transcript = b""
        self._session_key = b""
        self._confirm = b""

    @property
    def nameplate(self) -> int:
        """The code's nameplate: pair with the device advertising it."""
        return self._nameplate

    def start(self) -> bytes:
        """The first message to send on the ``pair`` channel.

        Raises:
            LocalProtocolError: called twice.
        """
        if self._state != "start":
            raise LocalProtocolError("start() was already called")
        self._state = "sent"
        assert self._identity.verify_key is not None
        return cbor2.dumps({
            "v": PROTOCOL_VERSION, "t": "pake", "np": self._nameplate, "m": self._msg_b,
            "a": self._identity.cs3a_public, "k": self._identity.verify_key,
        })

    def receive(self, data: bytes, *, now: float) -> PairStep:
        """Handle the host's reply (never raises on input).

        Args:
            data: the message.
            now: seconds since the Unix epoch (checks the grant we are given).

        Returns:
            The :class:`PairStep`: the confirmation to send, then the result.
        """
        try:
            if self._state == "sent":
                return self._on_pake(data)
            if self._state == "confirmed":
                self._state = "done"
                welcome_key = _mac(self._session_key, b"welcome", self._transcript)
                joined = accept_welcome(
                    data, welcome_key, self._confirm, self._identity, None, now
                )
                return PairStep(done=True, joined=joined)
            raise JoinFailed("this pairing attempt is over; start again")
        except JoinFailed as exc:
            self._state = "done"
            return PairStep(None, True, error=exc.reason)

    def _on_pake(self, data: bytes) -> PairStep:
        msg = decode_message(data, "pake", "refused")
        if msg["t"] == "refused":
            reason = msg.get("r")
            raise JoinFailed(
                f"the other device refused: {reason[:200] if isinstance(reason, str) else '?'}"
            )
        msg_a, confirm = msg.get("m"), msg.get("c")
        if not (isinstance(msg_a, bytes) and len(msg_a) == SPAKE_MESSAGE_SIZE
                and isinstance(confirm, bytes) and len(confirm) == MAC_SIZE):
            raise JoinFailed("malformed pairing reply")
        try:
            self._session_key = self._spake.finish(msg_a)
        except Exception as exc:  # spake2 raises several types on a bad element
            raise JoinFailed("malformed pairing reply (bad SPAKE2 element)") from exc
        assert self._identity.verify_key is not None
        self._transcript = _transcript(
            self._peer, self._identity.hashname, self._identity.cs3a_public,
            self._identity.verify_key, self._msg_b, msg_a, self._nameplate,
        )
        if not hmac.compare_digest(confirm, _mac(self._session_key, b"host", self._transcript)):
            raise JoinFailed(_WRONG)
        self._confirm = _mac(self._session_key, b"joiner", self._transcript)
        self._state = "confirmed"
        return PairStep(cbor2.dumps({"v": PROTOCOL_VERSION, "t": "confirm", "c": self._confirm}))
