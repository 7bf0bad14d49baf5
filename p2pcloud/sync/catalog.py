"""What this endpoint holds, per sub-cloud: the facts sync needs, kept in memory.

Theory of operation
-------------------
The sync sessions never read the store (STYLE.md section 1: the protocol core is pure). The
shell keeps one :class:`Catalog` per node, filled from the store at start-up
(:meth:`Catalog.set_subcloud`) and told of every envelope it stores
(:meth:`Catalog.record`). Per sub-cloud it holds:

* the *version*: origin replica id -> greatest counter ``c`` such that every dot of that
  origin up to ``c`` is held (DESIGN.md section 5; the same vector as ``Replica.version()``);
  envelopes that arrive past a gap wait in a bounded pending list until the gap fills;
* the *floor*: origin -> counter up to which the log was folded into the snapshot
  checkpoint (envelopes at or below it can no longer be sent; a peer below it gets the
  snapshot first);
* log size totals, to estimate the bytes behind a number of dots (progress bars);
* the item ``(id, digest(version))`` in a :class:`~p2pcloud.sync.reconcile.ReconcileSet`, so
  every session reconciles against the same, incrementally maintained fingerprints.

:func:`fold_point` is the decision "every member has this prefix" the shell uses before it
folds a log prefix into a new checkpoint.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from p2pcloud._core import encode_version
from p2pcloud._ids import SubCloudId
from p2pcloud.errors import LocalProtocolError
from p2pcloud.sync.reconcile import KEY_SIZE, ReconcileSet

__all__ = [
    "EARLIER_VERSIONS",
    "MAX_PENDING_SPANS",
    "Catalog",
    "CatalogView",
    "fold_point",
    "version_digest",
]

MAX_PENDING_SPANS: Final = 1024
"""Out-of-order envelopes remembered per sub-cloud until their gap fills. Gaps come from
live pushes racing anti-entropy and close within a round trip; past the bound a span is
simply not counted (anti-entropy re-sends it), so a hostile peer cannot grow this list."""

EARLIER_VERSIONS: Final = 4
"""Versions a sub-cloud held before its latest changes, remembered (newest first) so a
session can recognise a peer that is a few transactions behind from the salted item hash
it lists in reconciliation and send it the difference without waiting for its vector (one
round trip less). Only sub-clouds that changed since start-up keep any."""

_DIGEST_CONTEXT: Final = b"p2pcloud vv"


def version_digest(version: Mapping[bytes, int]) -> bytes:
    """The 16-byte digest of a version vector (reconciliation item value).

    Args:
        version: origin replica id -> counter.

    Returns:
        ``SHA-256(b"p2pcloud vv" + encode_version(version))[:16]``; zero counters are
        ignored, so ``{}`` and ``{r: 0}`` agree.
    """
    return hashlib.sha256(_DIGEST_CONTEXT + encode_version(version)).digest()[:16]


def fold_point(versions_of_members: Iterable[Mapping[bytes, int]]) -> dict[bytes, int]:
    """The per-origin prefix every member holds: the most a log may be folded.

    Args:
        versions_of_members: the latest known version vector of every member that keeps a
            full copy of the sub-cloud (including this endpoint).

    Returns:
        origin -> the minimum counter over the members (origins missing anywhere are 0 and
        left out). An empty input folds nothing.
    """
    out: dict[bytes, int] | None = None
    for version in versions_of_members:
        if out is None:
            out = {o: c for o, c in version.items() if c > 0}
        else:
            out = {o: min(c, version.get(o, 0)) for o, c in out.items()}
            out = {o: c for o, c in out.items() if c > 0}
    return out or {}


class _SubCloud:
    __slots__ = ("digest", "earlier", "floor", "log_bytes", "log_dots", "pending", "version")

    def __init__(self) -> None:
        self.version: dict[bytes, int] = {}
        self.floor: dict[bytes, int] = {}
        self.pending: dict[bytes, dict[int, int]] = {}  # origin -> first -> last
        self.log_bytes = 0
        self.log_dots = 0
        self.digest = version_digest({})
        # (digest, version) this sub-cloud held before, newest last; None until it changes
        self.earlier: deque[tuple[bytes, tuple[tuple[bytes, int], ...]]] | None = None


class CatalogView:
    """The reconciliation items of the sub-clouds one peer may replicate, kept current.

    A phone that keeps 10 of a home box's 10,000 sub-clouds must reconcile against those
    10 only, or every run would find the other 9,990 "different". Made by
    :meth:`Catalog.view`; it follows every change of the catalog while it is referenced.
    """

    def __init__(self, catalog: Catalog, shares: Callable[[SubCloudId], bool]) -> None:
        """Build the view; prefer :meth:`Catalog.view`.

        Args:
            catalog: the catalog to follow.
            shares: whether a sub-cloud belongs in the view.
        """
        self.shares = shares
        self.reconcile_set = ReconcileSet()
        """The (id, version digest) items of the shared sub-clouds."""
        self._catalog = catalog
        self.rebuild()

    def rebuild(self) -> None:
        """Re-evaluate ``shares`` for every sub-cloud (after grants changed)."""
        self.reconcile_set = ReconcileSet()
        for sc in self._catalog.subclouds():
            if self.shares(sc):
                self.reconcile_set.set(sc, self._catalog.digest(sc))

    def changed(self, subcloud: SubCloudId, digest: bytes | None) -> None:
        """The catalog's notification: a digest changed (None: the sub-cloud is gone).

        Args:
            subcloud: the sub-cloud.
            digest: its new version digest, or None.
        """
        if digest is None or not self.shares(subcloud):
            self.reconcile_set.discard(subcloud)
        else:
            self.reconcile_set.set(subcloud, digest)


class Catalog:
    """Per sub-cloud version, floor and size facts of this endpoint; the sessions' view."""

    def __init__(self) -> None:
        """Create an empty catalog."""
        self._subs: dict[SubCloudId, _SubCloud] = {}
        self._views: weakref.WeakSet[CatalogView] = weakref.WeakSet()
        self.reconcile_set = ReconcileSet()
        """The (id, version digest) items of every sub-cloud held."""

    def view(self, shares: Callable[[SubCloudId], bool]) -> CatalogView:
        """A live subset for one peer (see :class:`CatalogView`).

        Args:
            shares: whether the peer may replicate a sub-cloud.

        Returns:
            The view; it stops following the catalog once nothing references it.
        """
        view = CatalogView(self, shares)
        self._views.add(view)
        return view

    def __contains__(self, subcloud: object) -> bool:
        """Whether this endpoint replicates ``subcloud``."""
        return subcloud in self._subs

    def __len__(self) -> int:
        """Number of sub-clouds."""
        return len(self._subs)

    def subclouds(self) -> list[SubCloudId]:
        """Every sub-cloud id held."""
        return list(self._subs)

    def set_subcloud(
        self,
        subcloud: SubCloudId,
        version: Mapping[bytes, int] | None = None,
        floor: Mapping[bytes, int] | None = None,
        *,
        log_bytes: int = 0,
        log_dots: int = 0,
    ) -> None:
        """Add a sub-cloud or replace its facts (start-up, snapshot loaded, log folded).

        Args:
            subcloud: the 16-byte id.
            version: origin -> contiguous counter held (``Replica.version()``).
            floor: origin -> counter folded into the checkpoint.
            log_bytes: bytes of envelopes in the log (for estimates).
            log_dots: dots those envelopes carry.

        Raises:
            LocalProtocolError: the id is not 16 bytes.
        """
        if len(subcloud) != KEY_SIZE:
            raise LocalProtocolError("a sub-cloud id is 16 bytes")
        sub = self._subs.get(subcloud) or _SubCloud()
        sub.version = {o: c for o, c in (version or {}).items() if c > 0}
        sub.floor = {o: c for o, c in (floor or {}).items() if c > 0}
        sub.pending = {}
        sub.log_bytes, sub.log_dots = log_bytes, log_dots
        self._subs[subcloud] = sub
        self._update(subcloud, sub)

    def remove(self, subcloud: SubCloudId) -> None:
        """Forget a sub-cloud (no longer replicated here).

        Args:
            subcloud: the id.
        """
        if self._subs.pop(subcloud, None) is not None:
            self.reconcile_set.discard(subcloud)
            for view in list(self._views):
                view.changed(subcloud, None)

    def _update(self, subcloud: SubCloudId, sub: _SubCloud) -> None:
        sub.digest = version_digest(sub.version)
        self.reconcile_set.set(subcloud, sub.digest)
        for view in list(self._views):
            view.changed(subcloud, sub.digest)

    def record(self, subcloud: SubCloudId, origin: bytes, first: int, last: int, size: int) -> bool:
        """Note an envelope just stored (after verifying it).

        Args:
            subcloud: its sub-cloud (must be in the catalog).
            origin: the delta's replica id.
            first: first counter of its run.
            last: last counter of its run.
            size: envelope bytes.

        Returns:
            True if the version advanced (the envelope was new and contiguous, or filled a gap).

        Raises:
            LocalProtocolError: the sub-cloud is not in the catalog.
        """
        sub = self._subs.get(subcloud)
        if sub is None:
            raise LocalProtocolError("record() for a sub-cloud not in the catalog")
        have = sub.version.get(origin, 0)
        if last <= have:
            return False
        sub.log_bytes += size
        sub.log_dots += last - first + 1
        if first > have + 1:
            if sum(len(p) for p in sub.pending.values()) < MAX_PENDING_SPANS:
                waiting = sub.pending.setdefault(origin, {})
                waiting[first] = max(last, waiting.get(first, 0))
            return False
        have = last
        pend = sub.pending.get(origin)
        while pend:
            # a waiting span that now touches the contiguous prefix joins it
            ready = [f for f in pend if f <= have + 1]
            if not ready:
                break
            for f in ready:
                have = max(have, pend.pop(f))
        if pend is not None and not pend:
            del sub.pending[origin]
        if sub.earlier is None:
            sub.earlier = deque(maxlen=EARLIER_VERSIONS)
        sub.earlier.append((sub.digest, tuple(sub.version.items())))
        sub.version[origin] = have
        self._update(subcloud, sub)
        return True

    def earlier_versions(self, subcloud: SubCloudId) -> list[tuple[bytes, dict[bytes, int]]]:
        """Versions this sub-cloud held before its latest changes, newest first.

        Args:
            subcloud: the id.

        Returns:
            Up to :data:`EARLIER_VERSIONS` ``(digest, version)`` pairs; empty for a
            sub-cloud that has not changed since it was set (or an unknown id).
        """
        sub = self._subs.get(subcloud)
        if sub is None or not sub.earlier:
            return []
        return [(d, dict(v)) for d, v in reversed(sub.earlier)]

    def version(self, subcloud: SubCloudId) -> dict[bytes, int]:
        """The contiguous version held (origin -> counter); ``{}`` for an unknown id."""
        sub = self._subs.get(subcloud)
        return dict(sub.version) if sub is not None else {}

    def counter(self, subcloud: SubCloudId, origin: bytes) -> int:
        """The contiguous counter held for one origin (0 if none)."""
        sub = self._subs.get(subcloud)
        return sub.version.get(origin, 0) if sub is not None else 0

    def floor(self, subcloud: SubCloudId) -> dict[bytes, int]:
        """The folded prefix (origin -> counter); envelopes at or below are gone."""
        sub = self._subs.get(subcloud)
        return dict(sub.floor) if sub is not None else {}

    def digest(self, subcloud: SubCloudId) -> bytes:
        """The 16-byte digest of the version (what reconciliation compares)."""
        sub = self._subs.get(subcloud)
        return sub.digest if sub is not None else version_digest({})

    def has_gap(self, subcloud: SubCloudId) -> bool:
        """Whether envelopes past a gap are waiting (the session then asks for the gap)."""
        sub = self._subs.get(subcloud)
        return bool(sub is not None and sub.pending)

    def bytes_per_dot(self, subcloud: SubCloudId) -> float:
        """Average envelope bytes per dot in the log (0.0 when nothing is known)."""
        sub = self._subs.get(subcloud)
        if sub is None or sub.log_dots == 0:
            return 0.0
        return sub.log_bytes / sub.log_dots
