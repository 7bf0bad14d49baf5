"""Membership: who belongs to a cloud, with which rights, computed from signed records.

Theory of operation
-------------------
:class:`Membership` is a deterministic function of ``(cloud id, set of records, now)``:
records may arrive in any order, duplicated, from any member; the same set always gives the
same members, rights, revocations and rejections. It owns no state beyond that result and
never changes it; new records make a new :class:`Membership` (:meth:`Membership.with_records`).

The chain check (docs/cloud.md "The chain check"):

1. Every record is decoded and its signature verified (:func:`grants.decode_record`);
   failures are rejected as ``malformed`` or ``forged signature``. Records naming another
   cloud are rejected as ``unknown cloud``.
2. The founding grant is the grant whose record id equals the cloud id. From it, a
   breadth-first walk over grants indexed by issuer finds the *admin chain*: a grant is in
   force when its issuer is an admin already reached, ``now`` lies in its validity window,
   and, if the issuer was revoked, the revocation keeps it. Grants never reached are
   rejected with the first reason that applies: ``expired``/``not yet valid``, ``issuer is
   not an admin``, ``issuer was revoked``, ``cycle`` (the issuer's own grants lead back to
   themselves, never to the founder) or ``no chain to the founding grant``.
3. Revocations are applied one at a time, ordered by the issuer's depth in the admin chain
   (the founder first), then issuer hashname, then record id: a revocation counts when its
   issuer is, at that step, an admin of the chain not itself revoked, or a revoked admin
   whose revocation keeps this record. So when two admins revoke each other, the one closer
   to the founder wins, deterministically. A revoked endpoint is never a member again, its
   grants still prove what rights it *had* (its pre-cutoff deltas keep verifying), and the
   records it issued count only if kept.

Revocation cutoffs: a revocation lists, per replica of the revoked endpoint, the last dot
counter the revoker had accepted. :meth:`Membership.accepts_delta` admits a revoked author's
delta only if it lies entirely at or below the cutoff (the largest one when several admins
revoked the same endpoint). This needs no trusted clock and rejects a late write however it
travels, including forwarded unchanged by a third device.

The records live in the cloud sub-cloud, which every member replicates: collection
``grants`` or ``revocations``, document id = base32 record id, field ``record`` = the signed
bytes (:func:`put_record`, :func:`read_records`). Every member may read it; only admins may
write it (the records are self-verifying, so a write by an admin can add but never forge).

Pure: no I/O, no clock; ``now`` comes in.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from p2pcloud._crypto import LocalIdentity
from p2pcloud._ids import CloudId, Hashname, ReplicaId, SubCloudId
from p2pcloud._wire import Entropy, b32decode
from p2pcloud.cloud import grants as _g
from p2pcloud.cloud.grants import (
    ROLE_ADMIN,
    Grant,
    RecordId,
    Revocation,
    Scope,
    decode_record,
    issue_grant,
    record_id_text,
    sign_revocation,
)
from p2pcloud.errors import BadRecord, DeltaRejected, LocalProtocolError, MalformedPacket
from p2pcloud.sync.envelope import REJECT_NO_WRITE_RIGHTS, Envelope, open_envelope

__all__ = [
    "CLOCK_SKEW",
    "COLL_GRANTS",
    "COLL_REVOCATIONS",
    "FIELD_RECORD",
    "MAX_RECORDS",
    "REJECT_CYCLE",
    "REJECT_EXPIRED",
    "REJECT_FORGED",
    "REJECT_ISSUER_REVOKED",
    "REJECT_MALFORMED",
    "REJECT_NOT_ADMIN",
    "REJECT_NOT_YET_VALID",
    "REJECT_NO_CHAIN",
    "REJECT_SUBJECT_REVOKED",
    "REJECT_UNKNOWN_CLOUD",
    "Member",
    "Membership",
    "Rejection",
    "cloud_subcloud_id",
    "put_record",
    "read_records",
    "verify_envelope",
    "write_records",
]

COLL_GRANTS: Final = "grants"
COLL_REVOCATIONS: Final = "revocations"
FIELD_RECORD: Final = "record"

MAX_RECORDS: Final = 100_000
"""Most records one membership evaluates: 10,000 things (DESIGN.md section 5) plus devices,
each with a few grants; beyond that the input is an attack on our memory."""
CLOCK_SKEW: Final = 300
"""Seconds a grant may start in our future and still count: a grant made on a device whose
clock runs ahead must not lock out the new member (5 minutes, as the core's HLC tolerance).
Expiry is checked strictly."""

REJECT_MALFORMED: Final = "malformed"
REJECT_FORGED: Final = "forged signature"
REJECT_UNKNOWN_CLOUD: Final = "unknown cloud"
REJECT_EXPIRED: Final = "expired"
REJECT_NOT_YET_VALID: Final = "not yet valid"
REJECT_NOT_ADMIN: Final = "issuer is not an admin"
REJECT_ISSUER_REVOKED: Final = "issuer was revoked"
REJECT_CYCLE: Final = "cycle"
REJECT_NO_CHAIN: Final = "no chain to the founding grant"
REJECT_SUBJECT_REVOKED: Final = "subject was revoked"

_ROLE_ORDER: Final = {"thing": 0, "device": 1, "admin": 2}


def cloud_subcloud_id(cloud: CloudId) -> SubCloudId:
    """The id of a cloud's own sub-cloud, where grants, revocations and policy live.

    Args:
        cloud: the cloud id.

    Returns:
        The first 16 bytes of ``SHA-256(b"p2pcloud cloud sub-cloud" + cloud)``; every
        member computes it from the cloud id alone.
    """
    return SubCloudId(hashlib.sha256(b"p2pcloud cloud sub-cloud" + bytes(cloud)).digest()[:16])


@dataclass(frozen=True, slots=True)
class Rejection:
    """A record that is not in force, and why.

    Attributes:
        record_id: the record's id, or None when the bytes did not decode.
        kind: ``"grant"``, ``"revocation"`` or ``"?"`` (undecodable).
        reason: one of the ``REJECT_*`` constants.
        detail: free text for logs.
    """

    record_id: RecordId | None
    kind: str
    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Member:
    """A valid member of the cloud at the membership's ``now``.

    Attributes:
        hashname: the member's hashname.
        key: its CS3a key.
        verify_key: its Ed25519 verify key.
        role: the highest role among its grants in force (admin > device > thing).
        grants: the ids of its grants in force, sorted.
    """

    hashname: Hashname
    key: bytes
    verify_key: bytes
    role: str
    grants: tuple[RecordId, ...]


@dataclass(frozen=True, slots=True)
class _Eval:
    # one walk of the admin chain under a fixed set of revocations
    in_force: dict[RecordId, Grant]  # grants reached (subject may be revoked)
    depth: dict[Hashname, int]  # admins reached (revoked ones too), depth from the founder
    subjects: frozenset[Hashname]  # subjects of the grants reached


class Membership:
    """Who is a member of one cloud, with which rights, at ``now``.

    Build it from every grant and revocation you have (bytes or decoded records, any order,
    duplicates fine). Query it; make a new one when records or ``now`` change.

    Attributes:
        cloud: the cloud id.
        now: the time it was computed for (seconds since the Unix epoch).
        founder: the founder's hashname, or None if the founding grant is missing.
        rejected: every record not in force, with its reason, sorted.
    """

    def __init__(
        self, cloud: CloudId, records: Iterable[bytes | Grant | Revocation], *, now: float
    ) -> None:
        """Compute the membership.

        Args:
            cloud: the cloud id (the founding grant's record id).
            records: grants and revocations, as bytes or decoded.
            now: seconds since the Unix epoch (the caller's clock), for validity windows.

        Raises:
            LocalProtocolError: more than MAX_RECORDS records.
        """
        self.cloud: CloudId = CloudId(bytes(cloud))
        self.now: float = float(now)
        self._subcloud = cloud_subcloud_id(self.cloud)
        rejected: dict[tuple[Any, ...], Rejection] = {}
        grants: dict[RecordId, Grant] = {}
        revocations: dict[RecordId, Revocation] = {}
        seen: set[bytes] = set()
        count = 0
        for item in records:
            count += 1
            if count > MAX_RECORDS:
                raise LocalProtocolError(f"more than {MAX_RECORDS} records")
            if isinstance(item, (Grant, Revocation)):
                record: Grant | Revocation = item
                if record.raw in seen:
                    continue
                seen.add(record.raw)
            else:
                raw = bytes(item)
                if raw in seen:
                    continue
                seen.add(raw)
                try:
                    record = decode_record(raw)
                except BadRecord as exc:
                    reason = REJECT_FORGED if str(exc) == "forged signature" else REJECT_MALFORMED
                    digest = RecordId(hashlib.sha256(raw).digest()[:16])
                    rej = Rejection(None, "?", reason, f"{exc} (bytes sha256 {digest.hex()})")
                    rejected[(b"", digest, reason)] = rej
                    continue
            kind = "grant" if isinstance(record, Grant) else "revocation"
            if record.cloud != self.cloud:
                rejected[(record.id, kind)] = Rejection(
                    record.id, kind, REJECT_UNKNOWN_CLOUD, f"names cloud {record.cloud.hex()}"
                )
            elif isinstance(record, Grant):
                grants[record.id] = record
            else:
                revocations[record.id] = record
        self._grants = grants
        self._revocations = revocations
        founding = grants.get(RecordId(self.cloud))
        self.founder: Hashname | None = (
            founding.subject if founding is not None and founding.founding else None
        )
        self._by_issuer: dict[Hashname, list[Grant]] = defaultdict(list)
        self._by_subject: dict[Hashname, list[Grant]] = defaultdict(list)
        for grant in sorted(grants.values(), key=lambda g: g.id):
            if not grant.founding:
                self._by_issuer[grant.issuer].append(grant)
            self._by_subject[grant.subject].append(grant)

        # Revocations, one at a time, in a fixed order (module docstring, step 3).
        kept: dict[Hashname, set[RecordId]] = {}
        self._revoked_by: dict[Hashname, list[Revocation]] = {}
        base = self._walk(kept)
        ordered = sorted(
            revocations.values(),
            key=lambda r: (base.depth.get(r.issuer, 1 << 30), r.issuer, r.id),
        )
        state = base
        effective: list[Revocation] = []
        for rev in ordered:
            refused = self._revocation_refused(rev, state, kept)
            if refused is not None:
                rejected[(rev.id, "revocation")] = Rejection(rev.id, "revocation", *refused)
                continue
            effective.append(rev)
            kept.setdefault(rev.revoked, set()).update(rev.kept)
            self._revoked_by.setdefault(rev.revoked, []).append(rev)
            if rev.revoked in state.depth:
                # only an admin's removal changes which grants are reached: a non-admin's
                # grants and revocations never count, so the walk would come out the same
                state = self._walk(kept)
        self._kept = kept
        self._state = state
        self._effective = {r.id: r for r in effective}
        cycles: dict[Hashname, bool] = {}
        for gid, grant in grants.items():
            if gid not in state.in_force:
                reason, detail = self._why_not(grant, state, kept, cycles)
                rejected[(gid, "grant")] = Rejection(gid, "grant", reason, detail)
        for gid, grant in state.in_force.items():
            if grant.subject in kept:
                rejected[(gid, "grant")] = Rejection(
                    gid, "grant", REJECT_SUBJECT_REVOKED, grant.subject
                )
        self.rejected: tuple[Rejection, ...] = tuple(
            sorted(rejected.values(), key=lambda r: (r.record_id or b"", r.kind, r.reason,
                                                     r.detail))
        )

        # Members and the rights they hold (or held, for revoked endpoints).
        self._members: dict[Hashname, Member] = {}
        self._rights: dict[Hashname, list[Grant]] = defaultdict(list)
        for gid in sorted(state.in_force):
            grant = state.in_force[gid]
            self._rights[grant.subject].append(grant)
        for hashname, held in self._rights.items():
            if hashname in kept:
                continue
            role = max((g.role for g in held), key=_ROLE_ORDER.__getitem__)
            self._members[hashname] = Member(
                hashname, held[0].subject_key, held[0].subject_verify_key, role,
                tuple(g.id for g in held),
            )
        self._cutoffs: dict[Hashname, dict[ReplicaId, int]] = {}
        for hashname, revs in self._revoked_by.items():
            merged: dict[ReplicaId, int] = {}
            for rev in revs:
                for rid, counter in rev.cutoffs.items():
                    merged[rid] = max(counter, merged.get(rid, -1))
            self._cutoffs[hashname] = merged

    # -- the chain walk --------------------------------------------------------------------

    def _walk(self, kept: Mapping[Hashname, set[RecordId]]) -> _Eval:
        in_force: dict[RecordId, Grant] = {}
        depth: dict[Hashname, int] = {}
        founding = self._grants.get(RecordId(self.cloud))
        if founding is not None and self._in_window(founding):
            in_force[founding.id] = founding
            depth[founding.subject] = 0
        queue: deque[Hashname] = deque(depth)
        while queue:
            issuer = queue.popleft()
            for grant in self._by_issuer.get(issuer, ()):
                if grant.id in in_force or not self._in_window(grant):
                    continue
                if issuer in kept and grant.id not in kept[issuer]:
                    continue  # issued by a revoked admin and not kept: void
                in_force[grant.id] = grant
                if grant.role == ROLE_ADMIN and grant.subject not in depth:
                    depth[grant.subject] = depth[issuer] + 1
                    queue.append(grant.subject)
        return _Eval(in_force, depth, frozenset(g.subject for g in in_force.values()))

    def _in_window(self, grant: Grant) -> bool:
        if grant.expires is not None and self.now >= grant.expires:
            return False
        return grant.not_before - CLOCK_SKEW <= self.now

    def _why_not(
        self,
        grant: Grant,
        state: _Eval,
        kept: Mapping[Hashname, set[RecordId]],
        cycles: dict[Hashname, bool],
    ) -> tuple[str, str]:
        if grant.expires is not None and self.now >= grant.expires:
            return REJECT_EXPIRED, f"expired at {grant.expires}"
        if grant.not_before - CLOCK_SKEW > self.now:
            return REJECT_NOT_YET_VALID, f"valid from {grant.not_before}"
        if grant.founding:
            return REJECT_UNKNOWN_CLOUD, "a founding grant of another cloud"
        if grant.issuer in state.depth:
            return REJECT_ISSUER_REVOKED, f"{grant.issuer} was revoked and did not keep it"
        if grant.issuer in state.subjects:
            return REJECT_NOT_ADMIN, f"{grant.issuer} is a member but not an admin"
        if grant.issuer not in cycles:  # memoized: many grants may share one bad issuer
            cycles[grant.issuer] = self._ancestry_cycles(grant.issuer)
        if cycles[grant.issuer]:
            return REJECT_CYCLE, f"the grants of {grant.issuer} lead back to themselves"
        return REJECT_NO_CHAIN, f"nothing links {grant.issuer} to the founder"

    def _ancestry_cycles(self, start: Hashname) -> bool:
        # Depth-first over "subject <- issuer" edges of all grants of this cloud; a grey node
        # met again is a cycle. Iterative (a peer controls the depth), each node visited once.
        colour: dict[Hashname, int] = {}  # 1 on the path, 2 finished
        stack: list[tuple[Hashname, int]] = [(start, 0)]
        while stack:
            node, index = stack.pop()
            issuers = [g.issuer for g in self._by_subject.get(node, ()) if not g.founding]
            if index == 0:
                if colour.get(node) == 2:
                    continue
                colour[node] = 1
            if index < len(issuers):
                stack.append((node, index + 1))
                nxt = issuers[index]
                if colour.get(nxt) == 1:
                    return True
                if nxt not in colour:
                    stack.append((nxt, 0))
            else:
                colour[node] = 2
        return False

    def _revocation_refused(
        self, rev: Revocation, state: _Eval, kept: Mapping[Hashname, set[RecordId]]
    ) -> tuple[str, str] | None:
        issuer = rev.issuer
        if issuer not in state.depth:
            if issuer in state.subjects:
                return REJECT_NOT_ADMIN, f"{issuer} is a member but not an admin"
            if self._ancestry_cycles(issuer):
                return REJECT_CYCLE, f"the grants of {issuer} lead back to themselves"
            return REJECT_NO_CHAIN, f"nothing links {issuer} to the founder"
        if issuer in kept and rev.id not in kept[issuer]:
            return REJECT_ISSUER_REVOKED, f"{issuer} was revoked and did not keep it"
        return None

    # -- queries ------------------------------------------------------------------------------

    @property
    def subcloud(self) -> SubCloudId:
        """The cloud sub-cloud's id (:func:`cloud_subcloud_id`)."""
        return self._subcloud

    def members(self) -> dict[Hashname, Member]:
        """Every valid member, by hashname (sorted).

        Returns:
            A new dict.
        """
        return {h: self._members[h] for h in sorted(self._members)}

    def member(self, hashname: Hashname) -> Member | None:
        """One member, or None if ``hashname`` is not a valid member.

        Args:
            hashname: an endpoint.

        Returns:
            The :class:`Member` or None.
        """
        return self._members.get(hashname)

    def is_member(self, hashname: Hashname) -> bool:
        """Whether ``hashname`` is a valid (granted, in force, not revoked) member."""
        return hashname in self._members

    def is_admin(self, hashname: Hashname) -> bool:
        """Whether ``hashname`` is a valid member with role admin."""
        member = self._members.get(hashname)
        return member is not None and member.role == ROLE_ADMIN

    def admins(self) -> list[Hashname]:
        """The valid admins, sorted."""
        return sorted(h for h, m in self._members.items() if m.role == ROLE_ADMIN)

    def grants_of(self, hashname: Hashname) -> list[Grant]:
        """The grants in force for ``hashname``, revoked endpoints included (what it held).

        Args:
            hashname: an endpoint.

        Returns:
            Its grants, by record id (empty for a stranger).
        """
        return list(self._rights.get(hashname, ()))

    def is_revoked(self, hashname: Hashname) -> bool:
        """Whether an effective revocation removed ``hashname``."""
        return hashname in self._revoked_by

    def revoked(self) -> list[Hashname]:
        """The revoked endpoints, sorted."""
        return sorted(self._revoked_by)

    def cutoffs(self, hashname: Hashname) -> dict[ReplicaId, int]:
        """The merged revocation cutoffs of a revoked endpoint (empty if not revoked).

        Args:
            hashname: an endpoint.

        Returns:
            Replica id to the last accepted counter (the largest over its revocations).
        """
        return dict(self._cutoffs.get(hashname, {}))

    def _held_rights(self, subcloud: SubCloudId, hashname: Hashname) -> frozenset[str]:
        held = self._rights.get(hashname, ())
        if subcloud == self._subcloud:
            # the cloud sub-cloud: every member reads it, admins write it
            out = {_g.RIGHT_READ} if held else set()
            if any(g.role == ROLE_ADMIN for g in held):
                out |= _g.RIGHTS
            return frozenset(out)
        rights: set[str] = set()
        for grant in held:
            rights |= grant.rights_on(subcloud)
        return frozenset(rights)

    def rights(self, subcloud: SubCloudId, hashname: Hashname) -> frozenset[str]:
        """A valid member's rights on a sub-cloud (empty for non-members and revoked ones).

        Args:
            subcloud: a sub-cloud id.
            hashname: an endpoint.

        Returns:
            A subset of ``{"read", "write", "admin"}``.
        """
        if hashname not in self._members:
            return frozenset()
        return self._held_rights(subcloud, hashname)

    def can_read(self, subcloud: SubCloudId, hashname: Hashname) -> bool:
        """Whether ``hashname`` may receive the sub-cloud now."""
        return _g.RIGHT_READ in self.rights(subcloud, hashname)

    def can_write(self, subcloud: SubCloudId, hashname: Hashname) -> bool:
        """Whether ``hashname`` may write the sub-cloud now (the envelope's ``can_write``).

        A revoked endpoint may not; its earlier deltas are judged by :meth:`accepts_delta`.
        """
        return _g.RIGHT_WRITE in self.rights(subcloud, hashname)

    def can_admin(self, subcloud: SubCloudId, hashname: Hashname) -> bool:
        """Whether ``hashname`` may manage the sub-cloud (its policy, its sharing)."""
        return _g.RIGHT_ADMIN in self.rights(subcloud, hashname)

    def accepts_delta(
        self,
        subcloud: SubCloudId,
        hashname: Hashname,
        replica_id: ReplicaId,
        first: int,
        last: int,
    ) -> bool:
        """Whether a delta written by ``hashname`` may be applied (rights and cutoffs).

        A valid member's delta is accepted when it may write. A revoked endpoint's delta is
        accepted only if it held write rights and the whole run ``first..last`` lies at or
        below the cutoff for ``replica_id``; a replica the revokers never heard from has no
        cutoff, so all of its writes are refused.

        Args:
            subcloud: the sub-cloud the delta belongs to.
            hashname: its author.
            replica_id: the author's replica (from the delta header).
            first: the first dot counter of the delta's run.
            last: the last dot counter.

        Returns:
            True if the delta may be applied.
        """
        if first > last:
            return False
        if hashname in self._revoked_by:
            if _g.RIGHT_WRITE not in self._held_rights(subcloud, hashname):
                return False
            cut = self._cutoffs[hashname].get(replica_id)
            return cut is not None and last <= cut
        return self.can_write(subcloud, hashname)

    def should_link(self, hashname: Hashname) -> bool:
        """Whether to link with an endpoint at all: revoked endpoints are refused.

        Strangers are not refused here (a joiner or a router is not a member yet); what they
        may see is decided per sub-cloud by :meth:`can_read`.
        """
        return hashname not in self._revoked_by

    def chain_for(self, hashname: Hashname) -> list[bytes]:
        """The records that prove ``hashname``'s membership: its grants in force and every
        grant on a shortest path from the founding grant to their issuers.

        Args:
            hashname: a valid member.

        Returns:
            Record bytes, founding grant first; empty if ``hashname`` is not a member.
        """
        if hashname not in self._members:
            return []
        depth = self._state.depth
        best: dict[Hashname, tuple[int, Grant]] = {}  # shortest-path admin grant per admin
        for grant in sorted(self._state.in_force.values(), key=lambda g: g.id):
            if grant.role != ROLE_ADMIN:
                continue
            rank = 0 if grant.founding else depth.get(grant.issuer, 1 << 30) + 1
            if grant.subject not in best or rank < best[grant.subject][0]:
                best[grant.subject] = (rank, grant)
        out: dict[RecordId, bytes] = {}
        todo: list[Grant | Revocation] = [
            self._state.in_force[g] for g in self._members[hashname].grants
        ]
        while todo:
            record = todo.pop()
            if record.id in out:
                continue
            out[record.id] = record.raw
            if isinstance(record, Grant) and record.founding:
                continue
            if record.issuer in best:
                todo.append(best[record.issuer][1])
            # a revoked issuer's record counts because a revocation keeps it: prove that too
            todo.extend(
                rev for rev in self._revoked_by.get(record.issuer, ()) if record.id in rev.kept
            )
        founding = RecordId(self.cloud)
        return [out[founding]] + [out[k] for k in sorted(out) if k != founding]

    def records(self) -> list[bytes]:
        """Every record of this cloud that decoded (in force or not), sorted by id.

        Returns:
            Record bytes, for storing or forwarding.
        """
        items: list[Grant | Revocation] = [*self._grants.values(), *self._revocations.values()]
        return [r.raw for r in sorted(items, key=lambda r: r.id)]

    def summary(self) -> tuple[Any, ...]:
        """A hashable digest of the whole result (members, rights, revocations, rejections).

        Two memberships built from the same set of records and ``now`` have equal summaries.
        """
        return (
            self.cloud, self.founder,
            tuple((h, m.role, m.grants) for h, m in sorted(self._members.items())),
            tuple((h, tuple(sorted(c.items()))) for h, c in sorted(self._cutoffs.items())),
            tuple(sorted(self._effective)),
            self.rejected,
        )

    def with_records(
        self, records: Iterable[bytes | Grant | Revocation], *, now: float | None = None
    ) -> Membership:
        """A new membership over these records plus the new ones.

        Args:
            records: more records.
            now: a new time, or None to keep this one.

        Returns:
            The new :class:`Membership`.
        """
        return Membership(
            self.cloud,
            [*self._grants.values(), *self._revocations.values(), *records],
            now=self.now if now is None else now,
        )

    # -- making records -------------------------------------------------------------------

    def grant(
        self,
        issuer: LocalIdentity,
        *,
        subject_key: bytes,
        subject_verify_key: bytes,
        role: str,
        rights: Mapping[Scope, Iterable[str]],
        expires: int | None = None,
        entropy: Entropy,
    ) -> Grant:
        """Sign a grant as a valid admin of this cloud (valid from ``now``).

        Args:
            issuer: our identity; must be a valid admin.
            subject_key: the new member's CS3a key.
            subject_verify_key: its Ed25519 verify key.
            role: ``admin``, ``device`` or ``thing``.
            rights: scope to rights (see :func:`grants.issue_grant`).
            expires: first invalid second, or None.
            entropy: randomness source.

        Returns:
            The grant; add it with :meth:`with_records` and store it with :func:`put_record`.

        Raises:
            LocalProtocolError: we are not an admin, the subject was revoked, or bad arguments.
        """
        if not self.is_admin(issuer.hashname):
            raise LocalProtocolError("only an admin of this cloud can grant membership")
        grant = issue_grant(
            issuer, self.cloud, subject_key=subject_key, subject_verify_key=subject_verify_key,
            role=role, rights=rights, not_before=int(self.now), expires=expires, entropy=entropy,
        )
        if grant.subject in self._revoked_by:
            raise LocalProtocolError(
                f"{grant.subject} was revoked and can never rejoin; pair it with a new key"
            )
        return grant

    def revoke(
        self,
        issuer: LocalIdentity,
        hashname: Hashname,
        *,
        accepted: Mapping[ReplicaId, int],
        entropy: Entropy,
    ) -> Revocation:
        """Sign a revocation of a member, refusing to remove the last admin.

        Args:
            issuer: our identity; must be a valid admin.
            hashname: the member to remove (may be ourselves: leaving the cloud).
            accepted: for each replica of that member we hold, the last counter we applied
                (our version vector entries for its replica ids); these become the cutoffs.
            entropy: randomness source.

        Returns:
            The revocation; the records it keeps are those the member issued that are in
            force now, so its earlier pairings and revocations stand.

        Raises:
            LocalProtocolError: we are not an admin, ``hashname`` is not a member, or no
                admin would remain.
        """
        if not self.is_admin(issuer.hashname):
            raise LocalProtocolError("only an admin of this cloud can revoke a member")
        if hashname not in self._members:
            raise LocalProtocolError(f"{hashname} is not a member of this cloud")
        keep = [g.id for g in self._state.in_force.values() if g.issuer == hashname
                and not g.founding]
        keep += [r.id for r in self._effective.values() if r.issuer == hashname]
        rev = sign_revocation(
            issuer, self.cloud, hashname, cutoffs=accepted, kept=keep, now=self.now,
            entropy=entropy,
        )
        if not self.with_records([rev]).admins():
            raise LocalProtocolError(
                "refusing to remove the last admin: make another device an admin first"
            )
        return rev


# -- the cloud sub-cloud ---------------------------------------------------------------------


def put_record(replica: Any, record: Grant | Revocation) -> bool:
    """Write one record into a replica of the cloud sub-cloud, inside an open transaction.

    Args:
        replica: a ``p2pcloud._core.Replica`` of the cloud sub-cloud, in a transaction.
        record: the grant or revocation.

    Returns:
        False if the replica already held exactly these bytes (nothing written).

    Raises:
        CoreUsageError: no transaction is open (from the core).
    """
    coll = COLL_GRANTS if isinstance(record, Grant) else COLL_REVOCATIONS
    doc = record_id_text(record.id)
    if record.raw in replica.conflicts(coll, doc, FIELD_RECORD):
        return False
    replica.set(coll, doc, FIELD_RECORD, record.raw)
    return True


def write_records(
    replica: Any, records: Iterable[Grant | Revocation], *, now_ms: int
) -> bytes:
    """Write records into a replica of the cloud sub-cloud in one transaction.

    Args:
        replica: a ``p2pcloud._core.Replica`` of the cloud sub-cloud, not in a transaction.
        records: grants and revocations.
        now_ms: the physical time in milliseconds (for the transaction's HLC).

    Returns:
        The delta to seal and send (``b""`` if every record was already there).
    """
    replica.begin(now_ms)
    try:
        for record in records:
            put_record(replica, record)
    finally:
        delta: bytes = replica.commit()
    return delta


def read_records(replica: Any) -> list[bytes]:
    """Every record stored in a replica of the cloud sub-cloud, concurrent values included.

    Values that are not bytes, or whose record id does not match their document id, are
    skipped (a record is stored under its own id; anything else was not written by us).

    Args:
        replica: a ``p2pcloud._core.Replica`` of the cloud sub-cloud.

    Returns:
        Record bytes, for :class:`Membership`.
    """
    out: list[bytes] = []
    for coll in (COLL_GRANTS, COLL_REVOCATIONS):
        for doc in replica.documents(coll):
            try:
                expected = b32decode(doc)
            except MalformedPacket:
                continue
            for value in replica.conflicts(coll, doc, FIELD_RECORD):
                if not isinstance(value, bytes):
                    continue
                try:
                    record = decode_record(value)
                except BadRecord:
                    out.append(value)  # Membership reports it with its reason
                    continue
                kind_ok = isinstance(record, Grant) == (coll == COLL_GRANTS)
                if record.id == expected and kind_ok:
                    out.append(value)
    return out


def verify_envelope(
    membership: Membership,
    data: bytes,
    *,
    is_known: Any = None,
) -> Envelope:
    """Open a signed delta with this cloud's rights and revocation cutoffs.

    The envelope checks of :func:`p2pcloud.sync.envelope.open_envelope` run with a rights
    check that also admits a revoked author who held write rights; then the delta's run must
    pass :meth:`Membership.accepts_delta`, so a revoked endpoint's writes up to the cutoff
    still verify (they may be forwarded by anyone) and later ones are refused everywhere.

    Args:
        membership: the cloud's membership.
        data: the envelope bytes.
        is_known: ``is_known(subcloud)`` as for ``open_envelope``, or None.

    Returns:
        The verified envelope.

    Raises:
        DeltaRejected: as ``open_envelope``; a late write of a revoked author has reason
            ``REJECT_NO_WRITE_RIGHTS`` and detail "beyond the revocation cutoff".
    """

    def had_write(subcloud: SubCloudId, hashname: Hashname) -> bool:
        if membership.is_revoked(hashname):
            return _g.RIGHT_WRITE in membership._held_rights(subcloud, hashname)
        return membership.can_write(subcloud, hashname)

    env = open_envelope(data, had_write, is_known=is_known)
    if not membership.accepts_delta(env.subcloud, env.hashname, env.origin, env.first, env.last):
        raise DeltaRejected(REJECT_NO_WRITE_RIGHTS, f"{env.hashname}: beyond the revocation cutoff")
    return env
