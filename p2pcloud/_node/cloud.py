"""The person's cloud on a node: founding, pairing, grants, revocation, policy, re-linking.

Theory of operation
-------------------
One :class:`Cloud` per node with a data dir (``node.cloud``), the Trio shell around the pure
layers of ``p2pcloud/cloud`` (docs/cloud.md). It holds:

* **Which cloud** this node is in, and the *bootstrap* records a joiner got in its welcome
  (its grant and the chain proving it), in ``<data dir>/cloud.cbor`` (mode 0600), with the
  paths members were last reached on and the id of this device's own sub-cloud.
* **The cloud sub-cloud** (kind ``cloud``, id ``cloud_subcloud_id(cloud id)``, registry
  record signed by the founder): grants, revocations and replication policy, replicated
  by every member like any sub-cloud. ``membership`` is recomputed (in a worker thread)
  from the bootstrap records plus every record in it whenever it changes, and every
  ``RECHECK_INTERVAL`` seconds (grants expire). ``policy`` is read from it too.
* **The invite book** (``<data dir>/invites.cbor``, mode 0600, it holds secrets) and the
  short-code :class:`~p2pcloud.cloud.pairing.PairingHost`; the ``pair`` channel type is
  served for both join protocols.

Enforcement. The cloud is the replication engine's :class:`CloudRules`: for a sub-cloud of
the cloud (the cloud sub-cloud, or one owned by an endpoint that holds or held a grant) the
grants decide who writes and who reads, the policy hides sub-clouds from members, and
revoked endpoints get nothing; for any other sub-cloud the registry ACL decides (sharing
outside the cloud). Deltas go through ``accepts_delta``: a revoked author's dot runs beyond
the revocation cutoff are refused wherever they come from. The node's accept hook refuses
handshakes from revoked endpoints and their links are dropped when the revocation lands.

Re-linking. A keeper task (woken by link changes, path changes, discovery and membership
changes, and every ``KEEP_INTERVAL`` seconds or at a backoff's end while some member is
offline; never on a timer while every member is linked, so an idle phone sleeps) links
every member that is not linked, trying at once the
paths seen on the LAN (mDNS), the paths remembered from earlier links, the paths of the
invite it joined by, and every linked member as a router (telehash v3 ``peer``/``connect``;
the mesh moves to a direct path when one works). A node whose address changed is found
again the same ways.

Telehash v3 gives links, channels and routing; everything here is p2pcloud's extension.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import TYPE_CHECKING, Any, Final

import cbor2
import trio

from p2pcloud._core import BlobRef
from p2pcloud._ids import CloudId, Hashname, ReplicaId, SubCloudId
from p2pcloud._node.subcloud import Change, RegistryRecord, SubCloud, sign_record
from p2pcloud._wire import b32decode, b32encode
from p2pcloud.cloud._join import CHANNEL_TYPE, FrameReader, frame, message_type, refusal
from p2pcloud.cloud.grants import (
    ALL,
    ALL_SUBCLOUDS,
    RIGHT_READ,
    RIGHT_WRITE,
    ROLES,
    Grant,
    Revocation,
    decode_record,
)
from p2pcloud.cloud.grants import found_cloud as _found_cloud
from p2pcloud.cloud.invites import (
    MAX_INVITE_PATHS,
    MAX_TTL,
    InviteBook,
    InviteJoiner,
    format_invite,
    parse_invite,
)
from p2pcloud.cloud.membership import (
    Membership,
    cloud_subcloud_id,
    put_record,
    read_records,
)
from p2pcloud.cloud.policy import COLL_POLICY, MODES, ReplicationPolicy, read_policy, set_policy
from p2pcloud.errors import (
    BadRecord,
    BlobError,
    JoinFailed,
    LinkError,
    LocalProtocolError,
    MalformedPacket,
    SubscriptionLost,
)
from p2pcloud.sync import replica_id_for
from p2pcloud.uri import LinkInfo

if TYPE_CHECKING:
    # discovery (and zeroconf, ~3.5 MiB) loads when LAN discovery first starts, not with
    # every node: the daemon on loopback never starts it (docs/daemon.md, idle memory)
    from p2pcloud._core import Replica
    from p2pcloud._node.discovery import DiscoveredPeer, Discovery
    from p2pcloud._node.node import Node
    from p2pcloud._node.replication import Replication
    from p2pcloud._node.stream import ChannelStream
    from p2pcloud.cloud._join import Joined
    from p2pcloud.cloud.pairing import PairingHost, PairingJoiner  # SPAKE2: on first pairing

__all__ = [
    "CLOUD_FILE",
    "INVITES_FILE",
    "KEEP_INTERVAL",
    "Cloud",
    "MemberView",
    "open_cloud",
]

log = logging.getLogger("p2pcloud.cloud")

CLOUD_FILE: Final = "cloud.cbor"  # which cloud, bootstrap records, remembered paths
INVITES_FILE: Final = "invites.cbor"  # the invite book (secrets: mode 0600)
STATE_VERSION: Final = 1
KEEP_INTERVAL: Final = 5.0
"""Seconds between re-link rounds when nothing wakes the keeper: a member whose link went
down is tried again within this (link changes and discovery wake it at once)."""
LINK_ATTEMPT: Final = 20.0  # seconds one re-link attempt waits (the mesh retries inside)
MAX_BACKOFF: Final = 300.0
"""Seconds at most between tries to reach a member that stays offline (doubling from
KEEP_INTERVAL); a new link (a possible router), discovery or a membership change retries
sooner."""
RECHECK_INTERVAL: Final = 60.0  # seconds: membership is re-evaluated as grants expire
MAX_REMEMBERED_PATHS: Final = 4  # per member: the last few addresses it was reached on
MAX_STATE_BYTES: Final = 16 * 1024 * 1024  # a cloud.cbor larger than this is damaged
MAX_LEARNED: Final = 4096  # records peers sent as proof: chains of a few grants per member
MAX_PREFETCH: Final = 64  # blobs a full member fetches at once (each holds one task)
DEVICE_RIGHTS: Final = {ALL_SUBCLOUDS: [RIGHT_READ, RIGHT_WRITE]}  # a paired device's default
ADMIN_RIGHTS: Final = {ALL_SUBCLOUDS: [ALL]}  # the only rights an admin grant may carry
NO_CLOUD: Final = CloudId(bytes(16))  # the membership of a node in no cloud names this id


@dataclass(frozen=True, slots=True)
class MemberView:
    """One member as the API shows it (``Cloud.members()``).

    Attributes:
        hashname: the member.
        role: ``admin``, ``device`` or ``thing`` (the highest of its grants).
        rights: scope (base32 sub-cloud id or ``"*"``) to sorted rights, over its grants.
        expires: when its last grant expires (seconds since the epoch), None for never.
        revoked: True for a revoked endpoint (listed so people see the removal).
        online: whether this node has a link to it now.
        path: the v3 path JSON the link uses now (``{"type": "peer", ...}`` through a
            router), or None when offline.
        this_device: True for this node itself.
    """

    hashname: Hashname
    role: str
    rights: dict[str, list[str]]
    expires: int | None
    revoked: bool
    online: bool
    path: dict[str, Any] | None
    this_device: bool = False


class _Messages:
    """Framed ``pair`` messages from a channel stream, one at a time."""

    def __init__(self, stream: ChannelStream) -> None:
        self.stream = stream
        self.reader = FrameReader()
        self.pending: deque[bytes] = deque()

    async def next(self) -> bytes | None:
        while not self.pending:
            data = await self.stream.receive_some()
            if not data:
                return None
            self.pending.extend(self.reader.feed(data))  # JoinFailed on an oversized frame
        return self.pending.popleft()


class Cloud:
    """This node's membership of a person's cloud (see the module docstring).

    Attributes:
        id: the cloud id, None until founded or joined.
        membership: who is a member now (empty in no cloud).
        policy: the replication policy now.
        subcloud: the cloud sub-cloud, None until this node holds it.
        device: this device's own sub-cloud, None in no cloud.
    """

    def __init__(self, node: Node, replication: Replication, *, discovery: bool,
                 discovery_interfaces: list[str] | None) -> None:
        """Created by :func:`open_cloud`."""
        self.node = node
        self.replication = replication
        self.identity = node.identity
        self.hashname: Hashname = node.hashname
        self.id: CloudId | None = None
        self.membership = Membership(NO_CLOUD, [], now=time.time())
        self.policy = ReplicationPolicy({}, self.membership)
        self.device_id: SubCloudId | None = None
        assert node.data_dir is not None
        self._dir: FsPath = node.data_dir
        self._bootstrap: list[bytes] = []
        self._learned: dict[bytes, None] = {}  # records peers sent as proof (intro_records)
        self._paths: dict[Hashname, list[dict[str, Any]]] = {}
        self._book = InviteBook()
        self._host: PairingHost | None = None  # made on first use: see _pairing_host
        self._listeners: list[Callable[[], None]] = []
        self._revoking: set[Hashname] = set()
        self._linking: set[Hashname] = set()
        self._joining = False  # a join or pair is running (one at a time)
        self._backoff: dict[Hashname, tuple[int, float]] = {}  # failed tries, next try (trio)
        self._lock = trio.Lock()  # one membership recomputation at a time
        self._save_lock = trio.Lock()  # one write of cloud.cbor / invites.cbor at a time
        self._dirty = trio.Event()  # the cloud sub-cloud changed
        self._keeper_wake = trio.Event()
        self._lan_changed = trio.Event()
        self._paths_dirty = False
        self._watched: set[SubCloudId] = set()
        self._nursery: trio.Nursery | None = None
        self._want_discovery = discovery
        self._interfaces = discovery_interfaces
        self._discovery: Discovery | None = None
        self._discovery_starting: trio.Event | None = None
        self._prefetching: set[bytes] = set()  # blobs a full-policy member is fetching
        self._stats: Counter[str] = Counter()

    # -- the API ------------------------------------------------------------------------------

    @property
    def subcloud(self) -> SubCloud | None:
        """The cloud sub-cloud (grants, revocations, policy), once this node holds it."""
        if self.id is None:
            return None
        return self.replication.subclouds.get(cloud_subcloud_id(self.id))

    @property
    def device(self) -> SubCloud | None:
        """This device's own sub-cloud (made when it founded or joined the cloud)."""
        if self.device_id is None:
            return None
        return self.replication.subclouds.get(self.device_id)

    def add_listener(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` whenever the membership or the policy changes (in the Trio thread).

        Args:
            fn: a quick synchronous callback (start a task for anything slow).
        """
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[], None]) -> None:
        """Stop calling ``fn`` (no error if it was not registered)."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(fn)

    async def found(self) -> CloudId:
        """Found a new cloud with this device as its first admin.

        Makes the founding grant (its record id is the cloud id), the cloud sub-cloud with
        the grant in it, and this device's own sub-cloud.

        Returns:
            The new cloud id.

        Raises:
            LocalProtocolError: this node is already in a cloud.
        """
        self._require_no_cloud()
        grant = _found_cloud(self.identity, now=time.time(), entropy=os.urandom)
        cloud = CloudId(bytes(grant.id))
        self.id = cloud
        self._bootstrap = [grant.raw]
        self.membership = Membership(cloud, [grant], now=time.time())
        self.policy = ReplicationPolicy({}, self.membership)
        await self._save_state()
        record = sign_record(self.identity, cloud_subcloud_id(cloud), name="cloud",
                             kind="cloud", acl={}, revision=1)
        await self.replication._put_record(record)
        await self._write_records([grant])
        await self._make_device_subcloud()
        log.info("founded cloud %s", b32encode(cloud))
        self._changed()
        return cloud

    async def invite(self, *, role: str = "device", expires_in: float = 3600.0,
                     rights: Mapping[str, Iterable[str]] | None = None) -> str:
        """Make a one-time invite for a new device (show it as text or as a QR code).

        Args:
            role: the role the joiner gets: ``device``, ``admin`` or ``thing``.
            expires_in: seconds the invite stays valid (at most 30 days).
            rights: scope (base32 sub-cloud id or ``"*"``) to rights; by default read and
                write on every sub-cloud (every right for an admin).

        Returns:
            The ``p2pcloud:invite/1/...`` text (``p2pcloud.cloud.invites.invite_qr_png``
            renders it as a QR code).

        Raises:
            LocalProtocolError: not in a cloud, not an admin, or bad arguments.
        """
        cloud = self._require_cloud()
        if role not in ROLES:
            raise LocalProtocolError(f"role must be one of {sorted(ROLES)}")
        if not 0 < expires_in <= MAX_TTL:
            raise LocalProtocolError(f"an invite lives 1..{MAX_TTL} seconds")
        scopes = self._rights_for(role, rights)
        now = time.time()
        self._refresh_now(now)
        invite = self._book.create(
            self.identity, self.membership, paths=self._own_paths(), now=now,
            entropy=os.urandom, ttl=max(1, int(expires_in)), role=role, rights=scopes,
        )
        await self._save_book()
        log.info("invite made for cloud %s (role %s)", b32encode(cloud)[:8], role)
        return format_invite(invite)

    async def join(self, invite: str, *, timeout: float = 30.0) -> CloudId:  # noqa: ASYNC109
        # (the Cloud API contract names the timeout: a CLI/daemon call passes it through)
        """Join a cloud with an invite: link to the inviter, prove the secret, get a grant.

        Args:
            invite: the ``p2pcloud:invite/...`` text (pasted, or decoded from its QR code).
            timeout: seconds to wait for the inviter.

        Returns:
            The cloud id.

        Raises:
            BadURI: the text is not a valid invite, or it expired (the message says so).
            JoinFailed: the inviter refused (used invite, expired, ...), could not be
                reached in time, or its answer did not check out.
            LocalProtocolError: this node is already in a cloud.
        """
        self._require_no_cloud()
        parsed = parse_invite(invite, now=time.time())
        joiner = InviteJoiner(self.identity, parsed, entropy=os.urandom)
        paths = [dict(p) for p in parsed.paths]
        info = LinkInfo(parsed.inviter, parsed.keys(), paths)
        self._joining = True
        try:
            reply, peer = await self._exchange(info, [joiner.request()], timeout,
                                               "the inviting device")
            joined = joiner.finish(reply, peer=peer, now=time.time())
            self._remember(peer, paths)
            await self._adopt(joined)
        finally:
            self._joining = False
        return joined.cloud

    async def open_pairing(self, *, expires_in: float = 300.0) -> str:
        """Open a short code (``42-maple-otter-drum``) for a device without a camera.

        The code is advertised by its number on the LAN (mDNS) until it is used once
        (right or wrong) or expires; the pairing completes in the background and the
        listeners hear of the new member.

        Args:
            expires_in: seconds the code stays open (at most an hour).

        Returns:
            The code to show.

        Raises:
            LocalProtocolError: not in a cloud, not an admin, no UDP, or a bad expiry.
        """
        self._require_cloud()
        now = time.time()
        self._refresh_now(now)
        host = self._pairing_host()
        code = host.open(self.membership, now=now, entropy=os.urandom, ttl=expires_in)
        discovery = await self._ensure_discovery()
        await discovery.set_pairing(host.nameplate(now))
        if self._nursery is not None:
            self._nursery.start_soon(self._close_pairing_at, now + expires_in)
        return code

    async def pair(self, code: str, *, timeout: float = 30.0) -> CloudId:  # noqa: ASYNC109
        """Join a cloud with a short code typed by hand (the host is found by mDNS).

        Args:
            code: the code the admin device shows.
            timeout: seconds to find the host and finish.

        Returns:
            The cloud id.

        Raises:
            JoinFailed: not a code, no device shows it in time, or the code was wrong
                (one attempt per code: ask for a new one).
            LocalProtocolError: this node is already in a cloud, or has no UDP.
        """
        self._require_no_cloud()
        from p2pcloud.cloud.pairing import parse_code  # SPAKE2 loads on first use

        nameplate, _ = parse_code(code)
        self._joining = True
        try:
            return await self._pair(code, nameplate, trio.current_time() + timeout)
        finally:
            self._joining = False

    async def _pair(self, code: str, nameplate: int, deadline: float) -> CloudId:
        discovery = await self._ensure_discovery()
        with trio.move_on_at(deadline):
            while True:
                host = next((p for p in discovery.peers.values() if p.pairing == nameplate
                             and p.hashname != self.hashname), None)
                if host is not None:
                    break
                await self._lan_changed.wait()
        if host is None:
            raise JoinFailed(f"no device on this network shows a code numbered {nameplate}; "
                             "check the code and that both devices are on the same network")
        from p2pcloud.cloud.pairing import PairingJoiner

        joiner = PairingJoiner(self.identity, code, peer=host.hashname, entropy=os.urandom)
        info = LinkInfo(host.hashname, dict(host.keys), host.paths())
        remaining = max(1.0, deadline - trio.current_time())
        joined = await self._pair_exchange(info, joiner, remaining)
        self._remember(host.hashname, host.paths())
        await self._adopt(joined)
        return joined.cloud

    async def revoke(self, hashname: Hashname) -> None:
        """Remove a member (a lost phone): its links are refused from now on, it gets
        nothing new, and its writes after this moment are refused by every member.

        Args:
            hashname: the member.

        Raises:
            LocalProtocolError: not an admin, not a member, or the last admin.
        """
        self._require_cloud()
        hashname = Hashname(hashname)
        self._refresh_now(time.time())
        if not self.membership.is_admin(self.hashname):
            raise LocalProtocolError("only an admin of this cloud can revoke a member")
        if not self.membership.is_member(hashname):
            raise LocalProtocolError(f"{hashname} is not a member of this cloud")
        # Stop taking its deltas first, then read the cutoffs: nothing can slip in between.
        self._revoking.add(hashname)
        try:
            accepted: dict[ReplicaId, int] = {}
            for sc in list(self.replication.subclouds.values()):
                rid = replica_id_for(sc.id, hashname)
                async with sc.lock:  # an in-flight merge finishes first
                    # the catalog holds the stored version: no replica load per sub-cloud
                    counter = self.replication.catalog.counter(sc.id, bytes(rid))
                if counter:
                    accepted[rid] = counter
            rev = self.membership.revoke(self.identity, hashname, accepted=accepted,
                                         entropy=os.urandom)
            await self._write_records([rev])
        finally:
            self._revoking.discard(hashname)
        log.info("revoked %s", hashname[:8])

    async def set_policy(self, member: Hashname | str, subcloud: SubCloudId | str,
                         mode: str) -> None:
        """Set how a member replicates a sub-cloud: ``full``, ``on-demand`` or ``hidden``.

        Args:
            member: a member's hashname, or ``"*"`` for every member.
            subcloud: the sub-cloud id (16 bytes or base32), or ``"*"`` for every one.
            mode: ``full`` (keep everything, fetch every blob), ``on-demand`` (fetch blobs
                when read) or ``hidden`` (never sent to that member).

        Raises:
            LocalProtocolError: not in a cloud, not an admin, or a bad mode or id.
        """
        self._require_cloud()
        if mode not in MODES:
            raise LocalProtocolError(f"mode must be one of {sorted(MODES)}")
        if not self.membership.is_admin(self.hashname):
            raise LocalProtocolError("only an admin of this cloud can set a policy")
        key: bytes | str
        if subcloud == "*":
            key = "*"
        elif isinstance(subcloud, str):
            try:
                key = b32decode(subcloud)
            except MalformedPacket as exc:
                raise LocalProtocolError(f"not a sub-cloud id: {subcloud!r}") from exc
        else:
            key = bytes(subcloud)
        sc = self._require_subcloud()
        await self.replication.write(
            sc, lambda r: set_policy(r, member, key, mode),
            [(COLL_POLICY, str(member), key if isinstance(key, str) else b32encode(key))])
        await self._recompute()

    def members(self) -> list[MemberView]:
        """Every member (and every revoked endpoint), with who is online over which path.

        Returns:
            Members first (sorted by hashname), then revoked endpoints.
        """
        if self.id is None:
            return []
        m = self.membership
        out: list[MemberView] = []
        for h in [*m.members(), *m.revoked()]:
            grants = m.grants_of(h)
            if not grants:
                continue
            rights: dict[str, set[str]] = {}
            for g in grants:
                for scope, granted in g.rights:
                    text = scope if isinstance(scope, str) else b32encode(scope)
                    rights.setdefault(text, set()).update(granted)
            expiries = [g.expires for g in grants]
            member = m.member(h)
            role = member.role if member is not None else max(
                (g.role for g in grants), key=("thing", "device", "admin").index)
            path = self.node.link_path(h)
            online = h in self.node.links
            out.append(MemberView(
                hashname=h, role=role,
                rights={k: sorted(v) for k, v in sorted(rights.items())},
                expires=None if None in expiries else max(e for e in expiries if e is not None),
                revoked=m.is_revoked(h), online=online or h == self.hashname,
                path=path.to_json() if online and path is not None else None,
                this_device=h == self.hashname,
            ))
        return out

    def statistics(self) -> dict[str, int]:
        """Counters since start: join protocol outcomes (invites, pairing) and re-link
        attempts by the way they tried (``relink: lan``, ``relink: remembered``,
        ``relink: router``) and how they succeeded (``relinked``, ``relinked: router``)."""
        out = dict(self._stats)
        out.update({f"invite {k}": v for k, v in self._book.statistics().items()})
        if self._host is not None:  # a host never made has counted nothing
            out.update({f"pairing {k}": v for k, v in self._host.statistics().items()})
        return out

    # -- the engine's rules (replication.CloudRules) -------------------------------------------

    def _in_cloud(self, record: RegistryRecord) -> bool:
        if self.id is None:
            return False
        m = self.membership
        if record.subcloud == m.subcloud:
            return True
        return bool(m.grants_of(record.owner))

    def _barred(self, hashname: Hashname) -> bool:
        return hashname in self._revoking or self.membership.is_revoked(hashname)

    def can_write(self, record: RegistryRecord, hashname: Hashname) -> bool | None:
        """Grants decide writes to the cloud's sub-clouds (None: not ours to decide)."""
        if not self._in_cloud(record):
            return None
        if self._barred(hashname):
            return False
        m = self.membership
        if record.subcloud == m.subcloud:
            return m.can_write(record.subcloud, hashname)
        if m.can_write(record.subcloud, hashname):
            return True
        return None  # the owner, or an ACL entry (sharing a cloud sub-cloud outside it)

    def had_write(self, record: RegistryRecord, hashname: Hashname) -> bool | None:
        """Write rights a revoked author held (its deltas up to the cutoff still verify)."""
        if not self._in_cloud(record) or not self.membership.is_revoked(hashname):
            return None
        m = self.membership
        held = any(RIGHT_WRITE in g.rights_on(record.subcloud) or ALL in g.rights_on(
            record.subcloud) for g in m.grants_of(hashname))
        if record.subcloud == m.subcloud:
            return any(g.role == "admin" for g in m.grants_of(hashname))
        return held or record.rights(hashname) == "write"

    def may_read(self, record: RegistryRecord, hashname: Hashname) -> bool | None:
        """Grants and policy decide who replicates the cloud's sub-clouds; revoked
        endpoints get nothing at all."""
        if self.id is None:
            return None
        if self._barred(hashname):
            return False
        if not self._in_cloud(record):
            return None
        if hashname == record.owner and record.subcloud != self.membership.subcloud:
            return True
        if self.membership.can_read(record.subcloud, hashname):
            return self.policy.should_send(record.subcloud, hashname)
        return None

    def accepts_delta(self, subcloud: SubCloudId, hashname: Hashname, origin: ReplicaId,
                      first: int, last: int) -> bool:
        """Revocation cutoffs: a revoked author's dots beyond the cutoff are refused."""
        if self.id is None:
            return True
        if hashname in self._revoking:
            return False
        if not self.membership.is_revoked(hashname):
            return True
        cut = self.membership.cutoffs(hashname).get(origin)
        return cut is not None and first <= last <= cut

    def accepts_snapshot(self, record: RegistryRecord, peer: Hashname,
                         version: dict[bytes, int]) -> bool:
        """Judge a snapshot before it is merged: it carries no author signatures, so a
        sub-cloud of the cloud takes one only from a member that may write it (any member
        for the cloud sub-cloud, whose records verify on their own), and never one that
        holds a revoked author's dots beyond its cutoff (a relay that took a late write
        before it heard of the revocation, then folded its log, would pass it on this way).
        """
        if self.id is None or not self._in_cloud(record):
            return True
        m = self.membership
        if self._barred(peer):
            return False
        if record.subcloud == m.subcloud:
            if not m.is_member(peer):
                return False
        elif not self.replication.can_write(record.subcloud, peer):
            return False
        for h in m.revoked():
            rid = replica_id_for(record.subcloud, h)
            counter = version.get(bytes(rid), 0)
            if counter and counter > m.cutoffs(h).get(rid, 0):
                return False
        return True

    def intro_records(self, peer: Hashname) -> list[bytes]:
        """Our membership proof for a member we link with (the registry channel carries it).

        A member that has not synced the grant that admitted us (it joined through another
        admin, or before we did) would otherwise refuse to sync the cloud sub-cloud with
        us, the one place it could learn it. Strangers get nothing.
        """
        if self.id is None or self._barred(peer) or not self.membership.is_member(peer):
            return []
        return self.membership.chain_for(self.hashname)

    def take_record(self, raw: bytes, peer: Hashname) -> bool:
        """A grant or revocation sent on the registry channel: keep it if it names our
        cloud (it is self-verifying; the chain check decides what it proves)."""
        try:
            obj: Any = cbor2.loads(raw)
        except Exception:  # noqa: BLE001  (hostile bytes: cbor2 raises many types; not ours)
            return False
        if not isinstance(obj, dict) or obj.get("t") not in ("grant", "revocation"):
            return False
        try:
            record = decode_record(raw)
        except BadRecord as exc:
            self._stats["bad cloud record from a peer"] += 1
            log.info("bad cloud record from %s: %s", peer[:8], exc)
            return True
        if (self.id is not None and record.cloud == self.id and raw not in self._learned
                and len(self._learned) < MAX_LEARNED):
            self._learned[raw] = None
            self._stats["cloud records from peers"] += 1
            self._dirty.set()
        return True

    def _accept_link(self, hashname: Hashname) -> bool:
        return not self._barred(hashname)

    # -- helpers -----------------------------------------------------------------------------

    def _require_cloud(self) -> CloudId:
        if self.id is None:
            raise LocalProtocolError("this device is in no cloud: found one or join one first")
        return self.id

    def _require_no_cloud(self) -> None:
        if self.id is not None:
            raise LocalProtocolError(
                f"this device is already in cloud {b32encode(self.id)}; a device is in one "
                "cloud at a time")
        if self._joining:
            raise LocalProtocolError("this device is already joining a cloud; wait for it")

    def _require_subcloud(self) -> SubCloud:
        sc = self.subcloud
        if sc is None:
            raise LocalProtocolError("the cloud sub-cloud has not synced to this device yet")
        return sc

    def _rights_for(self, role: str, rights: Mapping[str, Iterable[str]] | None
                    ) -> dict[Any, list[str]]:
        if role == "admin":
            return {k: list(v) for k, v in ADMIN_RIGHTS.items()}
        if rights is None:
            return {k: list(v) for k, v in DEVICE_RIGHTS.items()}
        out: dict[Any, list[str]] = {}
        for scope, granted in rights.items():
            key: Any = scope
            if scope != ALL_SUBCLOUDS:
                try:
                    key = b32decode(scope) if isinstance(scope, str) else bytes(scope)
                except MalformedPacket as exc:
                    raise LocalProtocolError(f"not a sub-cloud id: {scope!r}") from exc
            out[key] = sorted(set(granted))
        return out

    def _refresh_now(self, now: float) -> None:
        # admin checks at the current time (a grant may have expired since the last update)
        if self.id is not None and now - self.membership.now > 1.0:
            self.membership = self.membership.with_records([], now=now)
            self.policy = ReplicationPolicy(self.policy.entries, self.membership)

    def _own_paths(self) -> list[dict[str, Any]]:
        paths = [p.to_json() for p in self.node.paths if p.type in ("udp4", "tcp4")]
        return paths[:MAX_INVITE_PATHS]

    def _remember(self, hashname: Hashname, paths: Iterable[Mapping[str, Any]]) -> None:
        known = self._paths.setdefault(hashname, [])
        before = list(known)
        for raw in paths:
            p = dict(raw)
            if p.get("type") not in ("udp4", "tcp4"):
                continue
            if p in known:
                known.remove(p)
            known.insert(0, p)
        del known[MAX_REMEMBERED_PATHS:]
        if known != before:
            self._paths_dirty = True

    def remembered_paths(self, hashname: Hashname) -> list[dict[str, Any]]:
        """The direct paths ``hashname`` was last reached on (newest first).

        Args:
            hashname: a member.

        Returns:
            v3 path objects (copies).
        """
        return [dict(p) for p in self._paths.get(hashname, [])]

    async def _exchange(self, info: LinkInfo, first: list[bytes], seconds: float,
                        who: str) -> tuple[bytes, Hashname]:
        """Link, open a pair channel, send ``first``, return the first reply."""
        with trio.move_on_after(seconds):
            try:
                peer = await self.node.link(info)
                stream = await self.node.open_channel(peer, CHANNEL_TYPE)
            except LinkError as exc:
                raise JoinFailed(f"could not reach {who}: {exc}; is it online?") from exc
            try:
                for message in first:
                    await stream.send_all(frame(message))
                reply = await _Messages(stream).next()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise JoinFailed(f"{who} closed the connection; try again") from exc
            finally:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
            if reply is None:
                raise JoinFailed(f"{who} ended the pairing without an answer; try again")
            return reply, peer
        raise JoinFailed(f"{who} did not answer within {seconds:g} s; is it online and "
                         "reachable from this network?")

    async def _pair_exchange(self, info: LinkInfo, joiner: PairingJoiner,
                             seconds: float) -> Joined:
        who = "the device showing the code"
        with trio.move_on_after(seconds):
            try:
                peer = await self.node.link(info)
                stream = await self.node.open_channel(peer, CHANNEL_TYPE)
            except LinkError as exc:
                raise JoinFailed(f"could not reach {who}: {exc}") from exc
            try:
                await stream.send_all(frame(joiner.start()))
                messages = _Messages(stream)
                while (data := await messages.next()) is not None:
                    step = joiner.receive(data, now=time.time())
                    if step.reply is not None:
                        await stream.send_all(frame(step.reply))
                    if step.error is not None:
                        raise JoinFailed(step.error)
                    if step.joined is not None:
                        return step.joined
                    if step.done:
                        break
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise JoinFailed(f"{who} closed the connection; try again") from exc
            finally:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
            raise JoinFailed(f"{who} ended the pairing without an answer; open a new code")
        raise JoinFailed(f"{who} did not answer within {seconds:g} s")

    async def _adopt(self, joined: Joined) -> None:
        """We are a member now: keep the welcome's records until the cloud sub-cloud syncs."""
        self.id = joined.cloud
        self._bootstrap = list(joined.records)
        self.membership = Membership(joined.cloud, self._bootstrap, now=time.time())
        self.policy = ReplicationPolicy({}, self.membership)
        await self._save_state()
        await self._make_device_subcloud()
        log.info("joined cloud %s", b32encode(joined.cloud))
        self._changed()

    async def _make_device_subcloud(self) -> None:
        sc = await self.replication.create_subcloud(f"device-{self.hashname[:8]}", "device")
        self.device_id = sc.id
        await self._save_state()

    async def _write_records(self, records: list[Grant | Revocation]) -> None:
        sc = self._require_subcloud()

        def put(replica: Replica) -> None:
            for record in records:
                put_record(replica, record)

        await self.replication.write(sc, put, [
            ("grants" if isinstance(r, Grant) else "revocations", b32encode(r.id), "record")
            for r in records])
        await self._recompute()

    async def _recompute(self) -> None:
        """Membership and policy from the bootstrap records plus the cloud sub-cloud."""
        async with self._lock:
            cloud = self.id
            if cloud is None:
                return
            records = [*self._bootstrap, *self._learned]
            entries: dict[Any, str] = {}
            sc = self.subcloud
            if sc is not None:
                async with sc.lock:
                    records += read_records(sc.replica)
                    entries = dict(read_policy(sc.replica))
            now = time.time()
            membership = await trio.to_thread.run_sync(
                lambda: Membership(cloud, records, now=now))
            changed = (membership.summary() != self.membership.summary()
                       or entries != dict(self.policy.entries))
            self.membership = membership
            self.policy = ReplicationPolicy(entries, membership)
        if changed:
            self._changed()

    def _changed(self) -> None:
        """Membership or policy changed: enforce it, re-share, re-link, tell listeners."""
        for h in self.membership.revoked():
            if h in self.node.links:
                log.info("dropping the link to revoked %s", h[:8])
                self.node.unlink(h)
        self.replication.refresh_shares()
        self._backoff.clear()  # new members, new routers: try everyone again
        self._keeper_wake.set()
        for fn in list(self._listeners):
            try:
                fn()
            except Exception:
                log.exception("cloud listener failed")

    # -- persistence -------------------------------------------------------------------------

    def _load_blocking(self) -> None:
        path = self._dir / CLOUD_FILE
        if path.exists():
            data = path.read_bytes()
            obj: Any = cbor2.loads(data) if len(data) <= MAX_STATE_BYTES else None
            if not isinstance(obj, dict) or obj.get("v") != STATE_VERSION:
                raise LocalProtocolError(f"{path}: not a p2pcloud cloud state file")
            c = obj.get("c")
            self.id = CloudId(c) if isinstance(c, bytes) and len(c) == 16 else None
            self._bootstrap = [r for r in obj.get("b") or [] if isinstance(r, bytes)]
            d = obj.get("d")
            self.device_id = SubCloudId(d) if isinstance(d, bytes) and len(d) == 16 else None
            paths = obj.get("p") or {}
            if isinstance(paths, dict):
                self._paths = {Hashname(h): [dict(p) for p in v if isinstance(p, dict)]
                               for h, v in paths.items() if isinstance(v, list)}
        book = self._dir / INVITES_FILE
        if book.exists():
            self._book = InviteBook.from_bytes(book.read_bytes())

    async def _save_state(self) -> None:
        obj = {"v": STATE_VERSION, "c": None if self.id is None else bytes(self.id),
               "b": list(self._bootstrap),
               "d": None if self.device_id is None else bytes(self.device_id),
               "p": {str(h): v for h, v in self._paths.items()}}
        data = cbor2.dumps(obj, canonical=True)
        self._paths_dirty = False
        async with self._save_lock:  # one writer of the temp file at a time
            await trio.to_thread.run_sync(_write_private, self._dir / CLOUD_FILE, data)

    async def _save_book(self) -> None:
        data = self._book.to_bytes()
        async with self._save_lock:
            await trio.to_thread.run_sync(_write_private, self._dir / INVITES_FILE, data)

    # -- tasks -------------------------------------------------------------------------------

    async def _start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        await trio.to_thread.run_sync(self._load_blocking)
        if self.id is not None:
            self.membership = Membership(self.id, self._bootstrap, now=time.time())
        self.replication.rules = self
        self.replication.subcloud_listeners.append(self._on_subcloud)
        self.replication.change_listeners.append(self._on_changes)
        self.node.accept_filters.append(self._accept_link)
        self.node._link_listeners.append(self._on_link)
        # a link moved to a direct path: the keeper remembers it (no polling for it)
        self.node.add_link_listener(self._on_link_event)
        self.node.serve_channel(CHANNEL_TYPE, self._serve_pair)
        for sc in list(self.replication.subclouds.values()):
            self._on_subcloud(sc)
        await self._recompute()
        nursery.start_soon(self._membership_loop)
        nursery.start_soon(self._keeper_loop)
        if self._want_discovery:
            await self._ensure_discovery()

    def _on_subcloud(self, sc: SubCloud) -> None:
        if self.id is None or sc.id != cloud_subcloud_id(self.id) or sc.id in self._watched:
            return
        self._watched.add(sc.id)
        if self._nursery is not None:
            self._nursery.start_soon(self._watch, sc)
        self._dirty.set()

    async def _watch(self, sc: SubCloud) -> None:
        while True:
            sub = sc.subscribe()
            try:
                async with sub:
                    async for _change in sub:
                        self._dirty.set()
            except SubscriptionLost:
                self._dirty.set()
                continue
            return

    def _on_changes(self, sc: SubCloud, changes: list[Change]) -> None:
        """A ``full`` member keeps every blob: fetch the ones remote writes refer to."""
        if self._nursery is None or not self._in_cloud(sc.record):
            return
        if not self.policy.keeps_full(sc.id, self.hashname):
            return
        places: list[tuple[str, str, str]] = [
            (c.collection, c.document, c.field) for c in changes
            if c.origin != "local" and c.document is not None and c.field is not None]
        if places and len(self._prefetching) < MAX_PREFETCH:
            self._nursery.start_soon(self._prefetch, sc, places)

    async def _prefetch(self, sc: SubCloud, places: list[tuple[str, str, str]]) -> None:
        async with sc.lock:  # a merge may be running in a worker thread
            refs = [v for c, d, f in places
                    if isinstance(v := sc.replica.get(c, d, f, None), BlobRef)]
        for ref in refs:
            if ref.hash in self._prefetching or len(self._prefetching) >= MAX_PREFETCH:
                continue
            self._prefetching.add(ref.hash)
            try:
                await self.replication.ensure_blob(ref.hash)
            except BlobError as exc:
                log.info("prefetch of blob %s failed: %s", ref.hash.hex()[:16], exc)
            finally:
                self._prefetching.discard(ref.hash)

    async def _membership_loop(self) -> None:
        while True:
            with trio.move_on_after(RECHECK_INTERVAL):
                await self._dirty.wait()
            self._dirty = trio.Event()
            try:
                await self._recompute()
            except LocalProtocolError:
                log.exception("membership could not be computed")

    def _on_link(self, hashname: Hashname, up: bool) -> None:
        if up:
            if self._barred(hashname):
                self.node.unlink(hashname)
                return
            path = self.node.link_path(hashname)
            if (self.membership.is_member(hashname) and path is not None
                    and path.type in ("udp4", "tcp4")):
                self._remember(hashname, [path.to_json()])
            # a new link is a new router: every member is worth another try now
            self._backoff.clear()
        self._keeper_wake.set()

    def _pairing_host(self) -> PairingHost:
        """The short-code pairing host, made on first use: importing SPAKE2 costs about
        1.5 MiB that an idle daemon which never pairs does not need (issue 7)."""
        if self._host is None:
            from p2pcloud.cloud.pairing import PairingHost

            self._host = PairingHost(self.identity)
        return self._host

    def _pairing_nameplate(self) -> int | None:
        """The open pairing code's nameplate for discovery (None: no code open)."""
        return None if self._host is None else self._host.nameplate(time.time())

    def _on_link_event(self, hashname: Hashname, what: str) -> None:
        if what == "path":
            self._keeper_wake.set()

    def _keeper_deadline(self) -> float:
        """When the keeper must look again if nothing wakes it: at the first due re-link try
        of an offline member; never while every member is linked (link and membership
        changes wake it)."""
        now = trio.current_time()
        due = float("inf")
        for h in self.membership.members():
            if h != self.hashname and h not in self.node.links:
                due = min(due, max(self._backoff.get(h, (0, 0.0))[1], now + KEEP_INTERVAL))
        return due

    async def _keeper_loop(self) -> None:
        while True:
            with trio.move_on_at(self._keeper_deadline()):
                await self._keeper_wake.wait()
            self._keeper_wake = trio.Event()
            for h in self.node.links:  # a link through a router moves to a direct path
                path = self.node.link_path(h)
                if path is not None and path.is_direct and self.membership.is_member(h):
                    self._remember(h, [path.to_json()])
            if self._paths_dirty and self.id is not None:
                await self._save_state()
            if self.id is None or self._nursery is None:
                continue
            now = trio.current_time()
            for h, member in self.membership.members().items():
                if h == self.hashname or h in self.node.links or h in self._linking:
                    continue
                if self._backoff.get(h, (0, 0.0))[1] > now:
                    continue
                self._linking.add(h)
                self._nursery.start_soon(self._relink, h, member.key)

    async def _relink(self, hashname: Hashname, key: bytes) -> None:
        """Link a member by every way we know at once (LAN, remembered, routers)."""
        try:
            paths: list[dict[str, Any]] = []
            if self._discovery is not None and hashname in self._discovery.peers:
                paths += self._discovery.peers[hashname].paths()
                self._stats["relink: lan"] += 1
            remembered = [p for p in self._paths.get(hashname, []) if p not in paths]
            if remembered:
                paths += remembered
                self._stats["relink: remembered"] += 1
            routers = [r for r in self.node.links if r != hashname
                       and self.membership.is_member(r)]
            if not paths and not routers:
                return
            info = LinkInfo(hashname, {"3a": key}, paths)
            with trio.move_on_after(LINK_ATTEMPT):
                async with trio.open_nursery() as nursery:

                    async def attempt(via: Hashname | None) -> None:
                        try:
                            await self.node.link(info, via=via)
                        except (LinkError, LocalProtocolError, trio.ClosedResourceError):
                            return  # this way failed (or the node is closing)
                        self._stats["relinked" if via is None else "relinked: router"] += 1
                        nursery.cancel_scope.cancel()

                    if paths:
                        nursery.start_soon(attempt, None)
                    for router in routers:
                        self._stats["relink: router"] += 1
                        nursery.start_soon(attempt, router)
        finally:
            self._linking.discard(hashname)
            if hashname in self.node.links:
                self._backoff.pop(hashname, None)
            else:  # offline for now: try less and less often (a phone's battery)
                failures = self._backoff.get(hashname, (0, 0.0))[0] + 1
                delay = min(MAX_BACKOFF, KEEP_INTERVAL * 2 ** min(failures, 8))
                self._backoff[hashname] = (failures, trio.current_time() + delay)

    async def _lan_attempt(self, peer: DiscoveredPeer) -> None:
        self._stats["relink: lan"] += 1
        info = LinkInfo(peer.hashname, dict(peer.keys), peer.paths())
        with trio.move_on_after(LINK_ATTEMPT):
            try:
                await self.node.link(info)
            except (LinkError, LocalProtocolError, trio.ClosedResourceError):
                return
            self._stats["relinked"] += 1

    async def _serve_pair(self, stream: ChannelStream) -> None:
        """The admin side of both join protocols on an incoming ``pair`` channel."""
        messages = _Messages(stream)
        peer = stream.hashname
        while True:
            try:
                data = await messages.next()
            except JoinFailed as exc:
                log.info("pair channel from %s: %s", peer[:8], exc.reason)
                return
            if data is None:
                return
            now = time.time()
            if self.id is None or not self.membership.is_admin(self.hashname):
                await stream.send_all(frame(refusal("this device cannot add members (it is "
                                                    "not an admin of a cloud)")))
                break
            self._refresh_now(now)
            reply: bytes | None
            grant: Grant | None
            if message_type(data) == "join":
                outcome = self._book.handle_join(
                    data, local=self.identity, peer=peer, membership=self.membership,
                    now=now, entropy=os.urandom)
                await self._save_book()  # burned before anyone hears the answer
                reply, grant, done = outcome.reply, outcome.grant, True
            else:
                step = self._pairing_host().receive(peer, data, membership=self.membership,
                                                    now=now, entropy=os.urandom)
                reply, grant, done = step.reply, step.grant, step.done
                await self._sync_pairing_flag()
            if grant is not None:
                path = self.node.link_path(peer)
                if path is not None and path.is_direct:
                    self._remember(peer, [path.to_json()])
                await self._write_records([grant])
                log.info("admitted %s as %s", peer[:8], grant.role)
            if reply is not None:
                await stream.send_all(frame(reply))
            if done:
                await stream.send_eof()
                return

    # -- discovery and pairing flags ---------------------------------------------------------

    async def _ensure_discovery(self) -> Discovery:
        if self._discovery is not None:
            return self._discovery
        if self._discovery_starting is not None:
            await self._discovery_starting.wait()
            if self._discovery is None:
                raise LocalProtocolError("LAN discovery could not start")
            return self._discovery
        udp = [p for p in self.node.paths if p.type == "udp4"]
        if not udp or udp[0].port is None:
            raise LocalProtocolError("LAN discovery needs a node with UDP")
        if self._nursery is None:
            raise LocalProtocolError("the cloud is not running")
        self._discovery_starting = trio.Event()
        try:
            await self._nursery.start(self._discovery_task, udp[0].port)
        finally:
            self._discovery_starting.set()
            self._discovery_starting = None
        assert self._discovery is not None
        return self._discovery

    async def _discovery_task(self, port: int, *,
                              task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                              ) -> None:
        from p2pcloud._node.discovery import PeerDiscovered, open_discovery

        async with open_discovery(self.identity, port, interfaces=self._interfaces,
                                  pairing=self._pairing_nameplate()) as discovery:
            self._discovery = discovery
            task_status.started()
            try:
                async for event in discovery:
                    self._lan_changed.set()
                    self._lan_changed = trio.Event()
                    if (isinstance(event, PeerDiscovered)
                            and self.membership.is_member(event.peer.hashname)
                            and event.peer.hashname not in self.node.links
                            and self._nursery is not None):
                        # at once, even while a slower attempt (stale paths) is running:
                        # the mesh adds these paths to the link's handshake round
                        self._nursery.start_soon(self._lan_attempt, event.peer)
            finally:
                self._discovery = None

    async def _sync_pairing_flag(self) -> None:
        if self._discovery is None:
            return
        nameplate = self._pairing_nameplate()
        if nameplate != self._discovery.pairing:
            with contextlib.suppress(LocalProtocolError):
                await self._discovery.set_pairing(nameplate)

    async def _close_pairing_at(self, deadline: float) -> None:
        await trio.sleep(max(0.0, deadline - time.time()) + 0.5)
        await self._sync_pairing_flag()


def _write_private(path: FsPath, data: bytes) -> None:
    """Write a file atomically with mode 0600 (temp + fsync + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


async def open_cloud(node: Node, nursery: trio.Nursery, *, discovery: bool = False,
                     discovery_interfaces: list[str] | None = None) -> Cloud:
    """Attach the cloud to a started node with a replication engine (``open_node`` does).

    Args:
        node: the node (with a data dir).
        nursery: the node's nursery (the cloud's tasks run there).
        discovery: run mDNS discovery from the start.
        discovery_interfaces: the interfaces mDNS uses (None: all).

    Returns:
        The running :class:`Cloud` (also ``node.cloud``).

    Raises:
        LocalProtocolError: the node has no replication engine, or its cloud state file
            is damaged.
    """
    if node.replication is None:
        raise LocalProtocolError("the cloud needs a node with a data dir")
    cloud = Cloud(node, node.replication, discovery=discovery,
                  discovery_interfaces=discovery_interfaces)
    await cloud._start(nursery)
    return cloud
