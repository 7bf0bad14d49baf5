"""Replication policy: which member keeps which sub-cloud, and how much of it.

Theory of operation
-------------------
Every sub-cloud has, per member, one of three modes (DESIGN.md section 6):

* ``full``: the member keeps every document and fetches every blob (a home box);
* ``on-demand``: the member keeps only what it opened and fetches blobs when they are
  read (a phone);
* ``hidden``: the sub-cloud is never sent to that member at all.

The policy is data in the cloud sub-cloud (so it replicates like everything else and only
admins may change it): collection ``policy``, document id = a member's hashname or ``"*"``
(every member), field = a base32 sub-cloud id or ``"*"`` (every sub-cloud), value = the
mode. Concurrent changes merge as last-writer-wins registers.

The most specific entry wins: ``(member, sub-cloud)``, then ``(member, *)``, then
``(*, sub-cloud)``, then ``(*, *)``, then the default (``full``). The policy never widens
access: a member that may not read a sub-cloud (:meth:`Membership.can_read`) is never sent
it, whatever the mode says, and the cloud sub-cloud itself is always ``full`` for every
member (they all need the grants). Pure: no I/O, no clock; decisions are plain functions
of the policy data and the membership.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from p2pcloud._crypto import is_hashname
from p2pcloud._ids import Hashname, SubCloudId
from p2pcloud._wire import b32decode, b32encode
from p2pcloud.cloud.membership import Membership
from p2pcloud.errors import LocalProtocolError, MalformedPacket

__all__ = [
    "ANY",
    "COLL_POLICY",
    "DEFAULT_MODE",
    "MODES",
    "MODE_FULL",
    "MODE_HIDDEN",
    "MODE_ON_DEMAND",
    "ReplicationPolicy",
    "clear_policy",
    "read_policy",
    "set_policy",
]

COLL_POLICY: Final = "policy"
MODE_FULL: Final = "full"
MODE_ON_DEMAND: Final = "on-demand"
MODE_HIDDEN: Final = "hidden"
MODES: Final = frozenset({MODE_FULL, MODE_ON_DEMAND, MODE_HIDDEN})
DEFAULT_MODE: Final = MODE_FULL  # a device with no policy keeps everything it may read
ANY: Final = "*"  # a member or sub-cloud key meaning "every"
SUBCLOUD_ID_SIZE: Final = 16

PolicyKey = tuple[str, str]  # (hashname or "*", base32 sub-cloud id or "*")


def _member_key(member: str) -> str:
    if member != ANY and not is_hashname(member):
        raise LocalProtocolError("a policy member is a hashname or '*'")
    return member


def _subcloud_key(subcloud: bytes | str) -> str:
    if subcloud == ANY:
        return ANY
    if not isinstance(subcloud, bytes) or len(subcloud) != SUBCLOUD_ID_SIZE:
        raise LocalProtocolError("a policy sub-cloud is a 16-byte id or '*'")
    return b32encode(subcloud)


def set_policy(replica: Any, member: str, subcloud: bytes | str, mode: str) -> None:
    """Write one policy entry into a replica of the cloud sub-cloud (in an open transaction).

    Args:
        replica: a ``p2pcloud._core.Replica`` of the cloud sub-cloud, in a transaction.
        member: a member's hashname, or ``"*"`` for every member.
        subcloud: a sub-cloud id, or ``"*"`` for every sub-cloud.
        mode: ``full``, ``on-demand`` or ``hidden``.

    Raises:
        LocalProtocolError: a bad member, sub-cloud or mode.
    """
    if mode not in MODES:
        raise LocalProtocolError(f"a replication mode is one of {sorted(MODES)}")
    replica.set(COLL_POLICY, _member_key(member), _subcloud_key(subcloud), mode)


def clear_policy(replica: Any, member: str, subcloud: bytes | str) -> None:
    """Remove one policy entry (the next less specific one applies again).

    Args:
        replica: a ``p2pcloud._core.Replica`` of the cloud sub-cloud, in a transaction.
        member: a hashname or ``"*"``.
        subcloud: a sub-cloud id or ``"*"``.

    Raises:
        LocalProtocolError: a bad member or sub-cloud.
    """
    replica.remove_field(COLL_POLICY, _member_key(member), _subcloud_key(subcloud))


def read_policy(replica: Any) -> dict[PolicyKey, str]:
    """Every valid policy entry in a replica of the cloud sub-cloud.

    Entries with a malformed key or an unknown mode (a newer version's, or junk) are
    skipped, so an older device keeps the modes it understands.

    Args:
        replica: a ``p2pcloud._core.Replica`` of the cloud sub-cloud.

    Returns:
        ``(member, sub-cloud key) -> mode``.
    """
    out: dict[PolicyKey, str] = {}
    for member in replica.documents(COLL_POLICY):
        if member != ANY and not is_hashname(member):
            continue
        fields = replica.document(COLL_POLICY, member) or {}
        for key, mode in fields.items():
            if mode not in MODES or not _valid_subcloud_key(key):
                continue
            out[(member, key)] = mode
    return out


def _valid_subcloud_key(key: object) -> bool:
    if key == ANY:
        return True
    if not isinstance(key, str):
        return False
    try:
        return len(b32decode(key)) == SUBCLOUD_ID_SIZE
    except MalformedPacket:
        return False


@dataclass(frozen=True, slots=True)
class ReplicationPolicy:
    """The replication decisions for one cloud.

    Attributes:
        entries: ``(member or "*", base32 sub-cloud id or "*") -> mode``.
        membership: the cloud's membership (rights bound every decision).
        default: the mode when no entry applies.
    """

    entries: Mapping[PolicyKey, str]
    membership: Membership
    default: str = DEFAULT_MODE

    @classmethod
    def from_replica(cls, replica: Any, membership: Membership) -> ReplicationPolicy:
        """Read the policy from a replica of the cloud sub-cloud.

        Args:
            replica: a ``p2pcloud._core.Replica`` of the cloud sub-cloud.
            membership: the cloud's membership.

        Returns:
            The policy.
        """
        return cls(read_policy(replica), membership)

    def mode(self, subcloud: SubCloudId, hashname: Hashname) -> str:
        """The mode that applies to a member and a sub-cloud (most specific entry wins).

        Args:
            subcloud: a sub-cloud id.
            hashname: a member.

        Returns:
            ``full``, ``on-demand`` or ``hidden`` (``full`` for the cloud sub-cloud).
        """
        if subcloud == self.membership.subcloud:
            return MODE_FULL  # every member keeps the grants
        key = b32encode(subcloud)
        for candidate in ((hashname, key), (hashname, ANY), (ANY, key), (ANY, ANY)):
            mode = self.entries.get(candidate)
            if mode is not None:
                return mode
        return self.default

    def should_send(self, subcloud: SubCloudId, to_hashname: Hashname) -> bool:
        """Whether to send a sub-cloud's data (vectors, deltas, snapshots) to a member.

        Args:
            subcloud: the sub-cloud.
            to_hashname: the receiving endpoint.

        Returns:
            True when it may read the sub-cloud and its mode is not ``hidden``.
        """
        if not self.membership.can_read(subcloud, to_hashname):
            return False
        return self.mode(subcloud, to_hashname) != MODE_HIDDEN

    def keeps_full(self, subcloud: SubCloudId, hashname: Hashname) -> bool:
        """Whether a member keeps the whole sub-cloud, blobs included (push it everything).

        Args:
            subcloud: the sub-cloud.
            hashname: the member.

        Returns:
            True when it may read it and its mode is ``full``.
        """
        return self.should_send(subcloud, hashname) and self.mode(subcloud, hashname) == (
            MODE_FULL
        )

    def fetches_on_read(self, subcloud: SubCloudId, hashname: Hashname) -> bool:
        """Whether a member keeps only what it opened and fetches blobs when read.

        Args:
            subcloud: the sub-cloud.
            hashname: the member.

        Returns:
            True when it may read it and its mode is ``on-demand``.
        """
        return self.should_send(subcloud, hashname) and self.mode(subcloud, hashname) == (
            MODE_ON_DEMAND
        )

    def full_holders(self, subcloud: SubCloudId) -> list[Hashname]:
        """The members that keep a full copy of a sub-cloud (where to fetch blobs from).

        Args:
            subcloud: the sub-cloud.

        Returns:
            Their hashnames, sorted.
        """
        return [h for h in self.membership.members() if self.keeps_full(subcloud, h)]
