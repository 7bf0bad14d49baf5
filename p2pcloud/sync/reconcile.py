"""Range-based set reconciliation over (sub-cloud id, version-vector digest).

Theory of operation
-------------------
Two endpoints that share M sub-clouds must find the K whose version vectors differ without
exchanging M vectors (DESIGN.md section 5, "many sub-clouds"; crdt-anchors.md section 5,
goal G6). This is Meyer's range-based set reconciliation (arXiv:2212.13567) as negentropy
runs it (b = 16 buckets, item lists below a threshold, 16-byte fingerprints), specialised to
our keys:

* The set holds one item per sub-cloud: key = the 16-byte sub-cloud id, value = a 16-byte
  digest of its version vector. ``item_hash = SHA-256(id || digest)[:16]``.
* Sub-cloud ids are 16 random bytes, so the key space splits evenly by hex digit: a *range*
  is a prefix of ``depth`` nibbles of the id (depth 0 is everything, depth 32 one id). The
  16 children of a range are its prefixes one nibble longer, so bucket bounds cost no bytes
  on the wire (negentropy sends a bound per bucket). Skewed ids only cost more rounds.
* A fingerprint is ``SHA-256(salt || sum of item hashes mod 2^128 || count)[:8]``
  (negentropy's additive fingerprint, salted and shortened); sums come from a Fenwick
  tree, so a changed digest is an O(log M) update and any range's fingerprint an
  O(log M) query. Item lists carry ``SHA-256(salt || item hash)[:4]``.
* The *salt* (8 bytes) is fixed per run by the initiator and travels once per message:
  ``SHA-256("p2pcloud rbsr salt" || the initiator's whole-set sum || count)[:8]``. It
  changes whenever any sub-cloud of the initiator changes and cannot be chosen apart from
  the sums it protects, so a member who crafts version vectors to make two ranges collide
  faces a 2^64 (fingerprints) or 2^32 writes (item hashes) search per run instead of a
  precomputed birthday collision; that is what lets fingerprints be 8 bytes instead of
  negentropy's 16 and item hashes 4 instead of 8 (G6: bytes per changed sub-cloud). An
  accidental item-hash collision (2^-32 per differing sub-cloud) hides a difference only
  until the next change anywhere in the set re-salts the next run; live pushes do not
  depend on reconciliation at all.

A range travels in one of six modes. Answering (:func:`respond`):

``FP``        fingerprint of the sender's items. Equal: the range is settled (no reply).
              Else we answer ``EMPTY`` if we hold nothing there; ``OFFERED`` if we hold at
              most ``DIRECT_THRESHOLD`` items (listed, and their vectors offered at once:
              one round trip less); ``ITEMS`` if we hold at most ``ITEM_THRESHOLD`` (or the
              range is a single id); else one ``SPLIT``.
``SPLIT``     the 16 children at once: a 16-bit map of the non-empty ones and their
              fingerprints (children are handled as ``FP`` or ``EMPTY``).
``ITEMS``     the sender's 8-byte item hashes. Our items whose hash is not listed differ
              (reported); listed hashes we do not hold go back as ``UNMATCHED``.
``OFFERED``   as ``ITEMS``, but the sender offered every listed vector: no ``UNMATCHED``.
``UNMATCHED`` item hashes of ours the peer did not hold: those sub-clouds differ.
``EMPTY``     the sender holds nothing here: every sub-cloud of ours in the range differs.

Idle peers: one ``FP`` range (about 35 bytes with framing and the salt) and an empty
reply, one round trip. K changed of M: about ``ceil(log16(M / ITEM_THRESHOLD)) + 1``
round trips, each changed sub-cloud costing about 16 fingerprints per level below the
shared top levels, plus one short item list.

This module is pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

__all__ = [
    "BUCKETS",
    "DIRECT_THRESHOLD",
    "FINGERPRINT_SIZE",
    "ITEM_HASH_SIZE",
    "ITEM_THRESHOLD",
    "KEY_SIZE",
    "SALT_SIZE",
    "MAX_DEPTH",
    "MODE_EMPTY",
    "MODE_FP",
    "MODE_ITEMS",
    "MODE_OFFERED",
    "MODE_SPLIT",
    "MODE_UNMATCHED",
    "Range",
    "ReconcileSet",
    "RangeError",
    "initial_ranges",
    "item_hash",
    "respond",
]

KEY_SIZE: Final = 16  # sub-cloud ids (BRIEF: 16 random bytes)
DIGEST_SIZE: Final = 16  # version-vector digests
BUCKETS: Final = 16  # negentropy's branching factor: one hex digit per level
MAX_DEPTH: Final = 2 * KEY_SIZE  # 32 nibbles: a range of depth 32 holds one id
FINGERPRINT_SIZE: Final = 8  # salted per run (module docstring): 2^-64 per compared range
ITEM_HASH_SIZE: Final = 4  # salted per run: 2^-32 per differing item, a quarter of the old cost
SALT_SIZE: Final = 8  # per-run salt of fingerprints and item hashes (module docstring)
DIRECT_THRESHOLD: Final = 4
"""A mismatched range holding at most this many of our items is answered with their item
list *and* their version vectors at once: four vectors (~60 B each) cost less than the
extra round trip an item list would need before the vectors go out."""
ITEM_THRESHOLD: Final = 48
"""Largest range answered with an item list instead of a split: 48 hashes of 4 bytes (192 B)
cost about one split (16 fingerprints, ~130 B) plus the next level, end the recursion one
level earlier and name exactly the differing sub-clouds (M = 10,000 leaves ~39 per range at
depth 2). negentropy uses 32 with 32-byte ids."""

MODE_FP: Final = 0
MODE_ITEMS: Final = 1
MODE_UNMATCHED: Final = 2
MODE_EMPTY: Final = 3
MODE_SPLIT: Final = 4
MODE_OFFERED: Final = 5
_MODES: Final = frozenset(
    {MODE_FP, MODE_ITEMS, MODE_UNMATCHED, MODE_EMPTY, MODE_SPLIT, MODE_OFFERED}
)
SPLIT_BITMAP: Final = 2  # 16 bits: which of the 16 children hold items

_SUM_SIZE: Final = 16  # item hashes and their sums are 128-bit integers
_MOD: Final = 1 << (8 * _SUM_SIZE)


class RangeError(ValueError):
    """A range from the peer is malformed (the session drops the message and counts it)."""


def item_hash(key: bytes, digest: bytes) -> int:
    """The 16-byte hash of one item, as an integer (what fingerprints sum).

    Args:
        key: the sub-cloud id.
        digest: the digest of its version vector.

    Returns:
        ``int.from_bytes(SHA-256(key || digest)[:16], "big")``.
    """
    return int.from_bytes(hashlib.sha256(key + digest).digest()[:_SUM_SIZE], "big")


def _short(h: int, salt: bytes) -> bytes:
    return hashlib.sha256(salt + h.to_bytes(_SUM_SIZE, "big")).digest()[:ITEM_HASH_SIZE]


def _fingerprint(total: int, count: int, salt: bytes) -> bytes:
    return hashlib.sha256(
        salt + (total % _MOD).to_bytes(_SUM_SIZE, "little") + count.to_bytes(8, "little")
    ).digest()[:FINGERPRINT_SIZE]


def run_salt(rset: ReconcileSet) -> bytes:
    """The salt of a run the holder of ``rset`` starts (module docstring).

    Args:
        rset: the initiator's set.

    Returns:
        ``SALT_SIZE`` bytes.
    """
    count, total = rset.sum(0, 1 << (8 * KEY_SIZE))
    return hashlib.sha256(
        b"p2pcloud rbsr salt" + (total % _MOD).to_bytes(_SUM_SIZE, "little")
        + count.to_bytes(8, "little")
    ).digest()[:SALT_SIZE]


@dataclass(frozen=True, slots=True)
class Range:
    """One range of a reconciliation message.

    Attributes:
        depth: number of leading hex digits of the id fixed by ``prefix`` (0..32).
        prefix: those digits, packed two per byte (``ceil(depth / 2)`` bytes, the unused
            low nibble zero).
        mode: one of the ``MODE_*`` constants.
        payload: a fingerprint, concatenated 4-byte item hashes, a split (16-bit bitmap
            of the non-empty children, then their fingerprints), or empty.
        salt: the run's salt (``SALT_SIZE`` bytes; empty: unsalted, for tests and tools).
    """

    depth: int
    prefix: bytes
    mode: int
    payload: bytes
    salt: bytes = b""

    def bounds(self) -> tuple[int, int]:
        """The ids ``lo <= id < hi`` (as big-endian integers) inside this range.

        Raises:
            RangeError: the range is malformed.
        """
        if not 0 <= self.depth <= MAX_DEPTH or len(self.prefix) != (self.depth + 1) // 2:
            raise RangeError("bad depth or prefix length")
        if self.mode not in _MODES:
            raise RangeError("unknown mode")
        if len(self.salt) not in (0, SALT_SIZE):
            raise RangeError("salt of the wrong size")
        shift = 4 * (MAX_DEPTH - self.depth)
        lo = int.from_bytes(self.prefix.ljust(KEY_SIZE, b"\0"), "big")
        if lo & ((1 << shift) - 1):
            raise RangeError("prefix has bits below its depth")
        if self.mode == MODE_FP and len(self.payload) != FINGERPRINT_SIZE:
            raise RangeError("fingerprint of the wrong size")
        if self.mode in (MODE_ITEMS, MODE_UNMATCHED, MODE_OFFERED) and (
            len(self.payload) % ITEM_HASH_SIZE
        ):
            raise RangeError("item list not a multiple of the item hash size")
        if self.mode == MODE_SPLIT:
            if self.depth == MAX_DEPTH or len(self.payload) < SPLIT_BITMAP:
                raise RangeError("a split of a single id, or no bitmap")
            bits = int.from_bytes(self.payload[:SPLIT_BITMAP], "big")
            if len(self.payload) != SPLIT_BITMAP + FINGERPRINT_SIZE * bits.bit_count():
                raise RangeError("split payload does not match its bitmap")
        if self.mode == MODE_EMPTY and self.payload:
            raise RangeError("an empty range carries no payload")
        return lo, lo + (1 << shift)

    def children(self) -> list[Range]:
        """Expand a ``MODE_SPLIT`` range into its 16 children (``FP`` or ``EMPTY``).

        Call after :meth:`bounds` has validated the range.
        """
        bits = int.from_bytes(self.payload[:SPLIT_BITMAP], "big")
        out = []
        pos = SPLIT_BITMAP
        for nibble in range(BUCKETS):
            if bits & (1 << (BUCKETS - 1 - nibble)):
                fp = self.payload[pos : pos + FINGERPRINT_SIZE]
                pos += FINGERPRINT_SIZE
                out.append(self.child(nibble, MODE_FP, fp))
            else:
                out.append(self.child(nibble, MODE_EMPTY, b""))
        return out

    def child(self, nibble: int, mode: int, payload: bytes) -> Range:
        """The child range one hex digit deeper.

        Args:
            nibble: the next hex digit (0..15).
            mode: the child's mode.
            payload: the child's payload.

        Returns:
            The child range.
        """
        depth = self.depth + 1
        if depth % 2:  # the new digit is the high nibble of a new byte
            prefix = self.prefix + bytes((nibble << 4,))
        else:
            prefix = self.prefix[:-1] + bytes((self.prefix[-1] | nibble,))
        return Range(depth, prefix, mode, payload, self.salt)

    def answer(self, mode: int, payload: bytes) -> Range:
        """The same range in another mode (an answer to it), in the same run.

        Args:
            mode: the answer's mode.
            payload: its payload.

        Returns:
            The range.
        """
        return Range(self.depth, self.prefix, mode, payload, self.salt)


class ReconcileSet:
    """The sorted set of (sub-cloud id, item hash) one side reconciles, with range sums.

    Digest changes are point updates of a Fenwick tree; adding or removing an id marks the
    tree for a rebuild on the next query (O(M), rare: sub-clouds are created seldom).
    """

    def __init__(self) -> None:
        """Create an empty set."""
        self._hash: dict[int, int] = {}  # id (as int) -> item hash
        self._keys: list[int] = []  # sorted ids
        self._pos: dict[int, int] = {}  # id -> index in _keys
        self._tree: list[int] = [0]  # Fenwick tree, 1-based
        self._dirty = False

    def __len__(self) -> int:
        """Number of items."""
        return len(self._hash)

    def __contains__(self, key: object) -> bool:
        """Whether a sub-cloud id (bytes) is in the set."""
        return isinstance(key, bytes) and int.from_bytes(key, "big") in self._hash

    def set(self, key: bytes, digest: bytes) -> None:
        """Insert or update the item of one sub-cloud.

        Args:
            key: the 16-byte sub-cloud id.
            digest: the 16-byte digest of its version vector.

        Raises:
            ValueError: the id is not 16 bytes.
        """
        if len(key) != KEY_SIZE:
            raise ValueError("a sub-cloud id is 16 bytes")
        k = int.from_bytes(key, "big")
        h = item_hash(key, digest)
        old = self._hash.get(k)
        self._hash[k] = h
        if old is None:
            self._dirty = True
        elif not self._dirty:
            self._add(self._pos[k] + 1, h - old)

    def discard(self, key: bytes) -> None:
        """Remove a sub-cloud's item if present.

        Args:
            key: the sub-cloud id.
        """
        if self._hash.pop(int.from_bytes(key, "big"), None) is not None:
            self._dirty = True

    def _rebuild(self) -> None:
        self._keys = sorted(self._hash)
        self._pos = {k: i for i, k in enumerate(self._keys)}
        n = len(self._keys)
        tree = [0] * (n + 1)
        for i, k in enumerate(self._keys, 1):
            tree[i] += self._hash[k]
            j = i + (i & -i)
            if j <= n:
                tree[j] += tree[i]
        self._tree = tree
        self._dirty = False

    def _add(self, i: int, delta: int) -> None:
        tree = self._tree
        n = len(tree) - 1
        while i <= n:
            tree[i] += delta
            i += i & -i

    def _prefix_sum(self, i: int) -> int:
        s = 0
        tree = self._tree
        while i > 0:
            s += tree[i]
            i -= i & -i
        return s

    def _span(self, lo: int, hi: int) -> tuple[int, int]:
        if self._dirty:
            self._rebuild()
        return bisect_left(self._keys, lo), bisect_left(self._keys, hi)

    def count(self, lo: int, hi: int) -> int:
        """Number of ids in ``[lo, hi)``."""
        a, b = self._span(lo, hi)
        return b - a

    def fingerprint(self, lo: int, hi: int, salt: bytes = b"") -> tuple[int, bytes]:
        """Count and fingerprint of the ids in ``[lo, hi)``.

        Args:
            lo: the lowest id (as an integer).
            hi: the id after the highest.
            salt: the run's salt.

        Returns:
            ``(count, FINGERPRINT_SIZE-byte fingerprint)``.
        """
        count, total = self.sum(lo, hi)
        return count, _fingerprint(total, count, salt)

    def sum(self, lo: int, hi: int) -> tuple[int, int]:
        """Count and sum of the item hashes of the ids in ``[lo, hi)``."""
        a, b = self._span(lo, hi)
        return b - a, self._prefix_sum(b) - self._prefix_sum(a)

    def items(self, lo: int, hi: int) -> Iterator[tuple[bytes, int]]:
        """The (id, item hash) pairs in ``[lo, hi)``, in id order."""
        a, b = self._span(lo, hi)
        for k in self._keys[a:b]:
            yield k.to_bytes(KEY_SIZE, "big"), self._hash[k]


def initial_ranges(rset: ReconcileSet, *, direct: bool = False) -> tuple[list[Range], list[bytes]]:
    """The first message of a reconciliation run.

    Args:
        rset: our set.
        direct: at the start of a session, a set of at most ``DIRECT_THRESHOLD`` items is
            sent as an item list and its ids are returned for direct vector offers (one
            round trip less: the peer answers the vectors with the envelopes we lack).

    Returns:
        ``(ranges, ids to offer now)``: one ``FP`` range of depth 0 (``EMPTY`` if we hold
        nothing), or in direct mode the root ``ITEMS`` range and its ids.
    """
    root = Range(0, b"", MODE_EMPTY, b"", run_salt(rset))
    lo, hi = root.bounds()
    count, fp = rset.fingerprint(lo, hi, root.salt)
    if count == 0:
        return [root], []
    if direct and count <= DIRECT_THRESHOLD:
        return _answer_mismatch(rset, root, lo, hi, count)
    return [root.answer(MODE_FP, fp)], []


def _answer_mismatch(
    rset: ReconcileSet, rng: Range, lo: int, hi: int, count: int
) -> tuple[list[Range], list[bytes]]:
    if count == 0:
        return [rng.answer(MODE_EMPTY, b"")], []
    if count <= ITEM_THRESHOLD or rng.depth == MAX_DEPTH:
        items = list(rset.items(lo, hi))
        hashes = b"".join(_short(h, rng.salt) for _k, h in items)
        if count <= DIRECT_THRESHOLD:
            ids = [k for k, _h in items]
            return [rng.answer(MODE_OFFERED, hashes)], ids
        return [rng.answer(MODE_ITEMS, hashes)], []
    # one SPLIT range carries the 16 children: the bounds are implicit, empty ones cost a bit
    bits = 0
    fps = []
    step = (hi - lo) // BUCKETS
    for nibble in range(BUCKETS):
        clo = lo + nibble * step
        ccount, cfp = rset.fingerprint(clo, clo + step, rng.salt)
        if ccount:
            bits |= 1 << (BUCKETS - 1 - nibble)
            fps.append(cfp)
    payload = bits.to_bytes(SPLIT_BITMAP, "big") + b"".join(fps)
    return [rng.answer(MODE_SPLIT, payload)], []


def respond(rset: ReconcileSet, ranges: Iterable[Range]) -> tuple[list[Range], list[bytes]]:
    """Answer the ranges of one reconciliation message.

    Args:
        rset: our set.
        ranges: the ranges the peer sent.

    Returns:
        ``(reply ranges, ids of our sub-clouds found to differ)``; the ids are in the order
        found and may repeat across messages (the session de-duplicates).

    Raises:
        RangeError: a range is malformed (the caller drops the whole message).
    """
    reply: list[Range] = []
    differ: list[bytes] = []
    todo = list(ranges)
    todo.reverse()
    while todo:
        rng = todo.pop()
        lo, hi = rng.bounds()
        if rng.mode == MODE_SPLIT:
            todo.extend(reversed(rng.children()))
        elif rng.mode == MODE_FP:
            count, fp = rset.fingerprint(lo, hi, rng.salt)
            if fp != rng.payload:
                more, direct = _answer_mismatch(rset, rng, lo, hi, count)
                reply.extend(more)
                differ.extend(direct)
        elif rng.mode == MODE_EMPTY:
            differ.extend(k for k, _h in rset.items(lo, hi))
        elif rng.mode in (MODE_ITEMS, MODE_OFFERED):
            theirs = {
                rng.payload[i : i + ITEM_HASH_SIZE]
                for i in range(0, len(rng.payload), ITEM_HASH_SIZE)
            }
            mine = set()
            for k, h in rset.items(lo, hi):
                s = _short(h, rng.salt)
                mine.add(s)
                if s not in theirs:
                    differ.append(k)
            unmatched = b"".join(sorted(theirs - mine))
            # OFFERED: the sender already offered the vectors of every listed item
            if unmatched and rng.mode == MODE_ITEMS:
                reply.append(rng.answer(MODE_UNMATCHED, unmatched))
        else:  # MODE_UNMATCHED
            wanted = {
                rng.payload[i : i + ITEM_HASH_SIZE]
                for i in range(0, len(rng.payload), ITEM_HASH_SIZE)
            }
            differ.extend(k for k, h in rset.items(lo, hi) if _short(h, rng.salt) in wanted)
    return reply, differ
