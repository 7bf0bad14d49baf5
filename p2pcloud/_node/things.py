"""Things on a node: the ``node.things`` facade over the pure layers (docs/things.md).

Theory of operation
-------------------
Every node with a data dir gets a :class:`Things` (``node.things``). A thing is a sub-cloud
of kind ``thing`` (p2pcloud/things/thing.py layout) replicated by the node's engine like any
other; this module only adds what the pure layers leave to the shell:

* **Owning the sub-cloud.** A thing's registry record (p2pcloud/_node/subcloud.py) is signed
  by the *thing's own key*, with the cloud's devices in its ACL. Any owner device that opened
  the thing key (sealed to every member, ``open_thing_key``) can re-sign it when the cloud's
  membership changes, a smart thing is the natural owner of its own sub-cloud, and a thing
  handed on to another cloud writes its new sub-cloud as itself (transfer.py).
* **Writes** run the pure helper (``create_layout``, ``rename``, ``claim_here``...) on the
  device's replica under the sub-cloud's lock and commit the delta through the engine
  (sealed by this device, durable before the call returns, pushed to the members).
* **Reaching a thing** (scans by claimants and finders): see p2pcloud/_node/thinghost.py. A
  tag lists owner devices as routers; the scanner wakes the thing on one of them and links
  the thing's hashname; the thing endpoint serves the ``thing`` channel with
  ``scan.serve_request`` against the owner device's replica (finder allow-list included).
* **Notifications.** Inbox messages and rule notices are data in the sub-cloud (``inbox`` and
  ``notices`` logs), so every owner device learns of them through sync. A change hook of the
  engine turns appends to those logs into :class:`ThingNotice` events (``message``,
  ``notification``) on every device, once per record.
* **Rules** (p2pcloud/things/rules.py): one :class:`RuleRunner` per thing that has rules (or
  for every changed thing once Python handlers are registered). The change hook marks a
  thing dirty; a single task observes dirty things, runs what is due on this device (done
  marker and appends in one delta), writes ``notify_owner`` notices, calls Python handlers,
  and sleeps until the earliest runner timer. Exactly once holds as the pure layer states.
* **Transfers**: the new owner makes a *transfer target* (cloud id, member keys, a device to
  reach, a single-use secret); the old owner's device builds the package
  (``prepare_transfer``), sends it on a ``thingtransfer`` channel, and on success ends its
  access (``end_access``). The new owner verifies (``accept_transfer``) and stores the
  thing's envelopes as received deltas of the new sub-cloud.

Scale: nothing here runs per thing at open. The index (hashname -> sub-cloud) and the views
``list()`` returns are read through ``SubCloud.derived`` (values cached per sub-cloud state
and persisted by the engine), so neither loads a replica that has not changed since it was
last read (replicas load lazily, subcloud.py); runners exist only for things with rules;
endpoints are started on demand and bounded (thinghost.py).
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import hmac
import inspect
import logging
import math
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import cbor2
import trio

from p2pcloud._core import BlobRef, Replica
from p2pcloud._crypto import LocalIdentity, hashname_from_keys, is_hashname
from p2pcloud._ids import CloudId, Hashname, SubCloudId
from p2pcloud._node.subcloud import Change, RegistryRecord, SubCloud, sign_record
from p2pcloud._node.thinghost import (
    HOST_CHANNEL,
    MAX_HOST_REQUEST,
    ThingHost,
    decode_wake,
    read_frame,
    write_frame,
)
from p2pcloud._wire import b32decode, b32encode
from p2pcloud.cloud.grants import ROLE_THING
from p2pcloud.errors import (
    AccessDenied,
    BadURI,
    ClaimRefused,
    LinkError,
    LocalProtocolError,
    MalformedPacket,
    StoreError,
    ThingError,
    ThingMoved,
    TransferError,
    UnknownThing,
)
from p2pcloud.things import rules as _r
from p2pcloud.things import scan as _s
from p2pcloud.things import thing as _t
from p2pcloud.things import transfer as _x
from p2pcloud.things.tags import Tag, TagPath, fresh_tag, parse_tag, scan_image
from p2pcloud.uri import LinkInfo

if TYPE_CHECKING:
    from p2pcloud._node.node import Node
    from p2pcloud._node.replication import Replication
    from p2pcloud._node.stream import ChannelStream

__all__ = [
    "NOTICES",
    "TRANSFER_CHANNEL",
    "ScanResult",
    "ThingEvent",
    "MessageReceived",
    "OwnerNotified",
    "ThingChanged",
    "ThingCreated",
    "ThingNotice",
    "ThingView",
    "Things",
    "claim_secret_for",
    "smart_subcloud_id",
]

log = logging.getLogger("p2pcloud.things")

TRANSFER_CHANNEL: Final = "thingtransfer"  # the new owner's device receives packages here
TRANSFER_PREFIX: Final = "P2PCLOUD-TRANSFER:"
NOTICES: Final = _t.NOTICES  # log of notify_owner records (rules), one per firing
MAX_SHEET: Final = 200  # fresh tags made in one call: a few printed pages
MAX_KEY_CACHE: Final = 256  # opened thing keys kept in memory (an LRU): busy things only
REACH_TIMEOUT: Final = 15.0  # seconds to link a router or a thing before trying the next path
REQUEST_TIMEOUT: Final = 30.0  # seconds for one request/response on a thing channel
REUSED_LINK_TIMEOUT: Final = 3.0
"""Seconds for a request over a link that was already up before the tag was scanned: a
live endpoint answers at once, a stale one is dropped and the tag's paths tried."""
TARGET_TTL: Final = 3600.0  # seconds a transfer target stays valid
MAX_TARGETS: Final = 64  # open transfer targets of one device
MAX_TARGET_TEXT: Final = 8192  # a target lists up to 64 member keys and 4 paths
MAX_TARGET_MEMBERS: Final = 64  # as a claim (scan.MAX_CLAIM_MEMBERS)
SCHEDULE_TICK: Final = 30.0
"""Seconds between looks at things with schedule rules: a daily rule fires within this of
its minute; frequent enough for "at 09:00", rare enough to cost nothing."""
SAME_CLOUD_WAIT: Final = 30.0  # seconds a claim by a fellow device waits for the sync
READING_FIELDS: Final = frozenset({"value", "unit", "kind"})
CARD_LABEL: Final = "text"  # the card field ``set_card(text)`` writes
HISTORY_ALL: Final = "all"
_HEAD: Final = "things.head"  # SubCloud.derived names (cached per sub-cloud state)
_VIEW: Final = "things.view"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def claim_secret_for(seed: bytes) -> bytes:
    """The claim secret of a thing made by a node, derived from the thing's seed.

    The pure layer draws a random secret and keeps only its hash; a node derives it from the
    thing's Ed25519 seed instead, so any owner device that opens the thing key can print the
    fresh tag again (a sheet lost before it was stuck on). Those who cannot open the key
    learn nothing: the derivation is a keyed hash.

    Args:
        seed: the thing's 32-byte Ed25519 seed.

    Returns:
        16 bytes.
    """
    return hmac.new(seed, b"p2pcloud claim secret v1", hashlib.sha256).digest()[
        :_t.CLAIM_SECRET_SIZE]


# -- what the facade returns -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ThingView:
    """A thing as an application shows it.

    Attributes:
        hashname: the thing's hashname. subcloud: its sub-cloud id (base32).
        name, make, model, serial: the profile. archived: hidden from the default list.
        claimed: its claim secret is spent. ended: handed on to another cloud.
        owner_cloud: base32 id of the cloud that holds it (None if unknown).
        card: what a finder sees. created_ms: when it was made.
        smart: the thing runs its own node (it owns and writes its sub-cloud itself).
    """

    hashname: Hashname
    subcloud: str
    name: str
    make: str
    model: str
    serial: str
    archived: bool
    claimed: bool
    ended: bool
    owner_cloud: str | None
    card: dict[str, str]
    created_ms: int
    smart: bool = False

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the daemon's API shape)."""
        return {"hashname": self.hashname, "subcloud": self.subcloud, "name": self.name,
                "make": self.make, "model": self.model, "serial": self.serial,
                "archived": self.archived, "claimed": self.claimed, "ended": self.ended,
                "owner_cloud": self.owner_cloud, "card": dict(self.card),
                "created_ms": self.created_ms, "smart": self.smart}


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What a scan did.

    Attributes:
        action: ``"claimed"`` (a fresh tag: the thing is now this cloud's), ``"opened"`` (the
            owner scanned a claimed tag; a ``scanned`` event was recorded) or ``"finder"``
            (someone else's thing: only ``card`` is known; :meth:`Things.leave_message`).
        tag: the tag that was scanned.
        thing: the thing (claimed / opened), else None.
        card: the card (finder), else None.
        new_tag: after a claim, the claimed tag to print (it replaces the fresh one).
    """

    action: str
    tag: Tag
    thing: ThingView | None = None
    card: dict[str, str] | None = None
    new_tag: Tag | None = None


@dataclass(frozen=True, slots=True)
class ThingEvent:
    """An event of a thing, as Python handlers (:meth:`Things.add_handler`) get it.

    Attributes:
        thing: the thing's hashname. type: ``scanned``, ``reading_added``,
        ``message_received`` or ``schedule``. id: the event id. origin: the device where it
        happened. at_ms: when. fields: what rule conditions read.
    """

    thing: Hashname
    type: str
    id: str
    origin: str
    at_ms: int
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ThingNotice:
    """What :meth:`Things.add_listener` functions get (one of the subclasses below).

    Attributes:
        thing: the thing's hashname.
        data: details (see each subclass).
    """

    thing: Hashname
    data: dict[str, Any] = field(default_factory=dict)

    kind = "notice"  # a class attribute: what happened, for logs and filters


@dataclass(frozen=True, slots=True)
class ThingCreated(ThingNotice):
    """A thing appeared on this device: made here, claimed, received by transfer, or synced
    from another owner device."""

    kind = "created"


@dataclass(frozen=True, slots=True)
class ThingChanged(ThingNotice):
    """A thing's sub-cloud changed; ``data["collections"]`` names what (or ``claimed`` /
    ``handed_on`` is true)."""

    kind = "changed"


@dataclass(frozen=True, slots=True)
class MessageReceived(ThingNotice):
    """A finder left a message; ``data`` is the inbox record ``{id, from, text, contact,
    at_ms}``. Every owner device gets it once (the inbox replicates)."""

    kind = "message"


@dataclass(frozen=True, slots=True)
class OwnerNotified(ThingNotice):
    """A rule notified the owner; ``data`` has ``text``, ``rule``, ``event``, ``type``. Every
    owner device gets it once; the rule fired on one of them."""

    kind = "notification"


_NOTICES: Final[dict[str, type[ThingNotice]]] = {
    c.kind: c for c in (ThingCreated, ThingChanged, MessageReceived, OwnerNotified)}


Handler = Callable[[ThingEvent], Awaitable[None] | None]
Listener = Callable[[ThingNotice], None]


class _Registry(_r.HandlerRegistry):
    """Python handlers that fire only for events at or after their registration (as rules
    fire only for events after their creation: registering must not replay history)."""

    def __init__(self) -> None:
        super().__init__()
        self.since_ms: dict[str, int] = {}

    def firing(self, event: _r.Event) -> _r.Firing | None:
        since = self.since_ms.get(event.type)
        if since is None or event.at_ms < since:
            return None
        return super().firing(event)


@dataclass(frozen=True, slots=True)
class _Target:
    cloud: CloudId
    device_key: bytes
    paths: list[dict[str, Any]]
    secret: bytes
    members: dict[Hashname, bytes]


# -- the facade ----------------------------------------------------------------------------------


class Things:
    """The things of this node's cloud (see the module docstring). ``node.things``."""

    def __init__(self, node: Node, *, takeover_ms: int = _r.TAKEOVER_MS) -> None:
        """Create the facade; ``open_node`` does this and calls :meth:`start`.

        Args:
            node: a node with a data dir (its replication engine runs).
            takeover_ms: how long each rule candidate waits for the one before it
                (``rules.TAKEOVER_MS``); set before the first event for tests.
        """
        assert node.replication is not None
        self.node = node
        self._repl: Replication = node.replication
        self.takeover_ms = takeover_ms
        self._index: dict[Hashname, SubCloudId] = {}
        self._keys: OrderedDict[SubCloudId, LocalIdentity] = OrderedDict()
        self._listeners: builtins.list[Listener] = []
        self._registry = _Registry()
        self._py_handlers: dict[str, list[tuple[Handler, bool]]] = {}
        self._runners: dict[SubCloudId, _r.RuleRunner] = {}
        self._dirty: set[SubCloudId] = set()
        self._rules_wake = trio.Event()
        self._targets: dict[bytes, tuple[float, _Target]] = {}
        self._seen_logs: dict[tuple[SubCloudId, str], int] = {}
        self._started_ms = _now_ms()
        self._nursery: trio.Nursery | None = None
        bind = next((p.ip for p in node.paths if p.type == "udp4" and p.ip), "127.0.0.1")
        self.host = ThingHost(bind, self._serve_thing)
        self.stats: Counter[str] = Counter()
        self.opened_in = 0.0  # seconds start() took (indexing every held thing)
        self._serving_self = False
        self._refresh_lock = trio.Lock()
        self._refresh_wake = trio.Event()
        self._refresh_all = False
        self._refresh_wanted: set[SubCloudId] = set()
        self._announced: set[SubCloudId] = set()  # things this device announced as created
        self._scheduled: set[SubCloudId] = set()  # things with schedule rules
        self._next_schedule_ms = 0
        self._rules_deadline = math.inf
        self._rules_timer_scope: trio.CancelScope | None = None

    # -- start ---------------------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Index the held things, serve the channels, start the rules task."""
        began = time.perf_counter()
        self._nursery = nursery
        for sc in self._thing_subclouds():
            self._index_one(sc)
            self._note_logs(sc)
            if _head(sc)["rules"]:
                self._dirty.add(sc.id)
        await nursery.start(self.host.run)
        self.node.serve_channel(HOST_CHANNEL, self._serve_wake)
        self.node.serve_channel(TRANSFER_CHANNEL, self._serve_transfer)
        self._repl.change_listeners.append(self._on_change)
        self._repl.subcloud_listeners.append(self._on_subcloud)
        if self._held(self.node.hashname) is not None:
            self._serve_self()
        cloud = self._cloud()
        if cloud is not None and hasattr(cloud, "add_listener"):
            cloud.add_listener(self._on_membership)
        nursery.start_soon(self._rules_loop)
        nursery.start_soon(self._rules_timer)
        nursery.start_soon(self._refresh_loop)
        self._rules_wake.set()
        self.opened_in = time.perf_counter() - began

    # -- cloud ---------------------------------------------------------------------------------

    def _cloud(self) -> Any:
        return getattr(self.node, "cloud", None)

    def _cloud_id(self) -> CloudId | None:
        cloud = self._cloud()
        cid = getattr(cloud, "id", None) if cloud is not None else None
        return CloudId(bytes(cid)) if cid else None

    def _require_cloud(self) -> CloudId:
        cid = self._cloud_id()
        if cid is None:
            raise ThingError("this node is in no cloud yet: found one or join one first")
        return cid

    def _membership(self) -> Any:
        cloud = self._cloud()
        return getattr(cloud, "membership", None) if self._cloud_id() else None

    def _members(self, sc_id: SubCloudId | None) -> dict[Hashname, bytes]:
        """Who the thing key is sealed to: the cloud's devices that may read the thing."""
        membership = self._membership()
        out: dict[Hashname, bytes] = {}
        if membership is not None:
            for h, m in membership.members().items():
                if m.role == ROLE_THING:
                    continue
                if sc_id is None or membership.can_read(sc_id, h):
                    out[h] = bytes(m.key)
        out.setdefault(self.node.hashname, self.node.identity.cs3a_public)
        return out

    def _acl(self, sc_id: SubCloudId, owner: Hashname) -> dict[Hashname, str]:
        """The thing sub-cloud's ACL: its devices, and smart things that may write it."""
        acl = {h: "write" for h in self._members(sc_id)}
        membership = self._membership()
        if membership is not None:
            for h, m in membership.members().items():
                if m.role == ROLE_THING and membership.can_write(sc_id, h):
                    acl[h] = "write"
        acl.pop(owner, None)
        return acl

    def _hosts(self, sc_id: SubCloudId) -> builtins.list[str]:
        return sorted(self._members(sc_id))

    # -- index and lookups ---------------------------------------------------------------------

    def _thing_subclouds(self) -> builtins.list[SubCloud]:
        return [sc for sc in self._repl.subclouds.values() if sc.kind == "thing"]

    def _index_one(self, sc: SubCloud) -> None:
        head = _head(sc)
        if head["hn"] is None:
            return
        hn = Hashname(head["hn"])
        held = self._index.get(hn)
        if held is not None and held != sc.id:
            other = self._repl.subclouds.get(held)
            # the live sub-cloud wins over an ended one (an old owner's archive)
            if other is not None and not _head(other)["ended"] and head["ended"]:
                return
        self._index[hn] = sc.id

    def _held(self, hashname: Hashname, *, scan: bool = False) -> SubCloud | None:
        """This node's live (not handed on) sub-cloud of a thing, if any.

        The index is kept by start() and the change listener (every write and merge), so a
        lookup is O(1), also for strangers asking about hashnames we do not hold. ``scan``
        (this device's own calls) also looks at sub-clouds merged a moment ago whose change
        listener has not run yet.
        """
        sc_id = self._index.get(hashname)
        if sc_id is None and scan:
            for sc in self._thing_subclouds():
                self._index_one(sc)
            sc_id = self._index.get(hashname)
        held = self._repl.subclouds.get(sc_id) if sc_id is not None else None
        if held is None or _head(held)["ended"]:
            return None
        return held

    def _find(self, thing: str | ThingView, *, live: bool = True) -> SubCloud:
        if not isinstance(thing, str):
            thing = str(getattr(thing, "hashname", thing))
        if is_hashname(thing):
            sc = self._held(Hashname(thing), scan=True)
            if sc is not None or live:
                if sc is None:
                    raise UnknownThing(f"no thing {thing[:12]} in this cloud")
                return sc
        scs = self._thing_subclouds()
        named = []
        for sc in scs:
            try:
                info = self._view(sc)
            except ThingError:
                continue
            if live and info.ended:
                continue
            if info.name == thing or (len(thing) >= 8 and info.hashname.startswith(thing)):
                named.append(sc)
        if len(named) != 1:
            more = "several things match" if named else "no thing matches"
            raise UnknownThing(f"{thing!r}: {more}; use the hashname")
        return named[0]

    def _view(self, sc: SubCloud) -> ThingView:
        fields = sc.derived(_VIEW, _view_fields)  # no replica load while unchanged
        if "error" in fields:
            raise ThingError(str(fields["error"]))
        return ThingView(
            hashname=Hashname(fields["hashname"]), subcloud=sc.id_text, name=fields["name"],
            make=fields["make"], model=fields["model"], serial=fields["serial"],
            archived=fields["archived"], claimed=fields["claimed"], ended=fields["ended"],
            owner_cloud=fields["owner_cloud"], card=dict(fields["card"]),
            created_ms=fields["created_ms"],
            smart=sc.owner == fields["hashname"] and fields["smart"])

    def list(self, *, include_archived: bool = False) -> builtins.list[ThingView]:
        """The things this node holds, sorted by name (handed-on things are not listed).

        Args:
            include_archived: also list archived things.

        Returns:
            The views.
        """
        out = []
        for sc in self._thing_subclouds():
            try:
                view = self._view(sc)
            except ThingError:
                continue  # the record arrived, the profile not yet
            if view.ended or (view.archived and not include_archived):
                continue
            out.append(view)
        return sorted(out, key=lambda v: (v.name.casefold(), v.hashname))

    def get(self, hashname_or_name: str) -> ThingView:
        """One thing, by hashname, unique name, or hashname prefix (8+ characters).

        Raises:
            UnknownThing: none matches, or several do.
        """
        return self._view(self._find(hashname_or_name))

    # -- keys -----------------------------------------------------------------------------------

    def _thing_key(self, sc: SubCloud) -> LocalIdentity:
        identity = self._keys.get(sc.id)
        if identity is None:
            owner = sc.replica.get(_t.PROFILE, _t.PROFILE_DOC, "hashname")
            if owner == self.node.hashname:
                identity = self.node.identity  # a smart thing is itself
            else:
                identity = _t.open_thing_key(sc.replica, self.node.identity)
            self._keys[sc.id] = identity
            while len(self._keys) > MAX_KEY_CACHE:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(sc.id)
        return identity

    # -- writes --------------------------------------------------------------------------------

    async def _write(self, sc: SubCloud, fn: Callable[[Replica], Any],
                     places: builtins.list[tuple[str, str | None, str | None]]) -> Any:
        """Run a pure helper on our replica and commit its delta through the engine.

        ``fn`` returns a delta, or a tuple whose last item is the delta; its result is
        returned. Raises what ``fn`` raises (nothing written), AccessDenied or StoreError.
        """
        if not self._repl.can_write(sc.id, self.node.hashname):
            raise AccessDenied(f"this device may not write the thing {sc.name!r}")
        async with sc.lock:
            result = fn(sc.replica)
            delta = result[-1] if isinstance(result, tuple) else result
            if delta:
                await self._repl._commit_delta(sc, delta)
        if delta:
            self._repl._changed(sc, [Change(c, d, f, "local") for c, d, f in places])
        return result

    async def _put_record(self, thing: LocalIdentity, sc_id: SubCloudId,
                          acl: dict[Hashname, str], previous: RegistryRecord | None = None
                          ) -> SubCloud:
        """Sign (as the thing) and keep the thing sub-cloud's registry record; tell peers."""
        record = sign_record(thing, sc_id, name=f"thing {thing.hashname}", kind="thing",
                             acl=acl, revision=previous.revision + 1 if previous else 1)
        sc = await self._repl._put_record(record)
        for peer in set(acl) | (set(previous.acl) if previous else set()):
            self._repl._send_record(peer, record)
        self._repl._rerun_sessions()
        return sc

    def _new_thing(self) -> _t.NewThing:
        made = _t.new_thing(os.urandom)
        seed = made.identity.seed
        assert seed is not None
        return _t.NewThing(made.identity, made.subcloud, claim_secret_for(seed))

    async def _create(self, new: _t.NewThing, *, name: str, make: str, model: str,
                      serial: str, card: str, smart: bool = False) -> ThingView:
        cloud = self._require_cloud()
        members = self._members(new.subcloud)
        now = _now_ms()
        card_fields = {CARD_LABEL: _card_text(card)} if card else None
        # Check the profile on a scratch replica first: a bad name must leave no sub-cloud.
        _t.create_layout(Replica(b"\0" * 16), new, name=name, make=make, model=model,
                         serial=serial, cloud=cloud, members=members, entropy=os.urandom,
                         now_ms=now, card=card_fields, smart=smart)
        sc = await self._put_record(new.identity, new.subcloud,
                                    self._acl(new.subcloud, new.hashname))
        # one transaction: a device that syncs the thing sees it whole (profile, card, keys)
        async with sc.lock:
            delta = _t.create_layout(sc.replica, new, name=name, make=make, model=model,
                                     serial=serial, cloud=cloud, members=members,
                                     entropy=os.urandom, now_ms=now, card=card_fields,
                                     smart=smart)
            await self._repl._commit_delta(sc, delta)
        self._keys[sc.id] = new.identity
        self._index[new.hashname] = sc.id
        self._announced.add(sc.id)
        self._repl._changed(sc, [(Change(_t.PROFILE, _t.PROFILE_DOC, None, "local"))])
        self._notify("created", new.hashname, {})
        return self._view(sc)

    async def create(self, name: str, *, make: str = "", model: str = "", serial: str = "",
                     card: str = "") -> ThingView:
        """Make a new thing held by this cloud (unclaimed: print its fresh tag, then scan).

        Args:
            name, make, model, serial: its profile (each at most 200 characters).
            card: what a finder may read once it is claimed ("" shows nothing).

        Returns:
            The new thing.

        Raises:
            ThingError: no cloud yet, or a field too long (nothing is written).
        """
        _card_text(card)
        return await self._create(self._new_thing(), name=name, make=make, model=model,
                                  serial=serial, card=card)

    async def fresh_tags(self, count: int) -> builtins.list[Tag]:
        """Make ``count`` unclaimed things and return their fresh tags (a sheet to print).

        Raises:
            ThingError: count out of 1..MAX_SHEET, or no cloud yet.
        """
        if not isinstance(count, int) or not 0 < count <= MAX_SHEET:
            raise ThingError(f"a sheet has 1..{MAX_SHEET} tags")
        out = []
        for _ in range(count):
            view = await self.create("")
            out.append(self.tag(view.hashname))
        return out

    def _live(self, thing: str | ThingView) -> SubCloud:
        sc = self._find(thing)
        return sc

    async def rename(self, thing: str | ThingView, name: str) -> None:
        """Rename a thing. Raises UnknownThing, ThingError (too long)."""
        sc = self._live(thing)
        await self._write(sc, lambda r: _t.rename(r, name, now_ms=_now_ms()),
                          [(_t.PROFILE, _t.PROFILE_DOC, "name")])

    async def archive(self, thing: str | ThingView, archived: bool = True) -> None:
        """Archive (hide from the default list) or restore a thing; nothing is deleted."""
        sc = self._find(thing)
        await self._write(sc, lambda r: _t.set_archived(r, archived, now_ms=_now_ms()),
                          [(_t.PROFILE, _t.PROFILE_DOC, "archived")])

    async def note(self, thing: str | ThingView, text: str) -> None:
        """Append text to a thing's notes (a collaborative text field)."""
        sc = self._live(thing)
        await self._write(sc, lambda r: _t.add_note(r, text, now_ms=_now_ms()),
                          [(_t.NOTES, _t.NOTES_DOC, _t.NOTES_FIELD)])

    def notes(self, thing: str | ThingView) -> str:
        """A thing's notes text."""
        value = self._find(thing).replica.get(_t.NOTES, _t.NOTES_DOC, _t.NOTES_FIELD, "")
        return value if isinstance(value, str) else ""

    async def add_reading(self, thing: str | ThingView, fields: Mapping[str, Any]) -> None:
        """Record a reading (``{"value": 71.5, "unit": "kg", "kind": "weight"}``).

        Raises:
            ThingError: no numeric ``value``, or unknown fields.
        """
        extra = set(fields) - READING_FIELDS
        if extra or "value" not in fields:
            raise ThingError(f"a reading has a numeric 'value' and optional 'unit', 'kind' "
                             f"(got {sorted(fields)})")
        sc = self._live(thing)
        me = self.node.hashname
        await self._write(sc, lambda r: _t.add_reading(
            r, fields["value"], unit=str(fields.get("unit", "")),
            kind=str(fields.get("kind", "")), by=me, entropy=os.urandom, now_ms=_now_ms()),
            [(_t.READINGS, None, None), (_t.EVENTS, None, None)])

    def readings(self, thing: str | ThingView) -> builtins.list[dict[str, Any]]:
        """A thing's readings, oldest first."""
        return [v for v in self._find(thing, live=False).log(_t.READINGS) if isinstance(v, dict)]

    def events(self, thing: str | ThingView) -> builtins.list[dict[str, Any]]:
        """A thing's events (scanned, claimed, reading_added, message_received), oldest first."""
        return [v for v in self._find(thing, live=False).log(_t.EVENTS) if isinstance(v, dict)]

    def notices(self, thing: str | ThingView) -> builtins.list[dict[str, Any]]:
        """The notifications rules wrote for a thing, oldest first."""
        return [v for v in self._find(thing, live=False).log(NOTICES) if isinstance(v, dict)]

    async def set_card(self, thing: str | ThingView, text: str) -> None:
        """Choose what a finder sees ("" shows nothing). Raises ThingError (too long)."""
        sc = self._live(thing)
        fields = {CARD_LABEL: _card_text(text)} if text else {}
        await self._write(sc, lambda r: _t.set_card(r, fields, now_ms=_now_ms()),
                          [(_t.CARD, _t.CARD_DOC, "fields")])

    async def add_file(self, thing: str | ThingView, source: str | Path | bytes, *,
                       name: str, kind: str = "file",
                       mime: str = "application/octet-stream") -> str:
        """Attach a file (a manual, a photo): its content becomes a blob of the thing's
        sub-cloud (chunked, fetched by other devices when they open it).

        Args:
            thing: the thing. source: a file path or the bytes. name: the file's name.
            kind: ``manual``, ``photo`` or another short word. mime: its media type.

        Returns:
            The file's id (its document in the ``files`` collection).

        Raises:
            ThingError: a text too long. OSError: the path cannot be read.
        """
        sc = self._live(thing)
        ref = await sc.add_blob(source)
        file_id = b32encode(os.urandom(10))
        await self._write(sc, lambda r: _t.add_file(r, file_id, name=name, kind=kind,
                                                    blob=ref, mime=mime, now_ms=_now_ms()),
                          [(_t.FILES, file_id, None)])
        return file_id

    def files(self, thing: str | ThingView) -> builtins.list[dict[str, Any]]:
        """A thing's files: ``{id, name, kind, mime, size}``, sorted by name."""
        sc = self._find(thing, live=False)
        out = []
        for file_id in sc.replica.documents(_t.FILES):
            doc = sc.replica.document(_t.FILES, file_id) or {}
            blob = doc.get("blob")
            out.append({"id": file_id, "name": str(doc.get("name", "")),
                        "kind": str(doc.get("kind", "")), "mime": str(doc.get("mime", "")),
                        "size": int(getattr(blob, "size", 0))})
        return sorted(out, key=lambda f: (f["name"], f["id"]))

    async def read_file(self, thing: str | ThingView, file_id: str) -> bytes:
        """A file's content (chunks missing here are fetched from the other devices first).

        Raises:
            ThingError: no such file. BlobError: its content cannot be fetched.
        """
        sc = self._find(thing, live=False)
        blob = sc.replica.get(_t.FILES, file_id, "blob")
        if not isinstance(blob, BlobRef):
            raise ThingError(f"the thing has no file {file_id!r}")
        async with sc.open_blob(blob) as reader:
            return await reader.read_all()

    def inbox(self, thing: str | ThingView) -> builtins.list[dict[str, Any]]:
        """Finder messages, oldest first: ``{id, from, text, contact, at_ms}``."""
        return [v for v in self._find(thing, live=False).log(_t.INBOX) if isinstance(v, dict)]

    # -- tags ----------------------------------------------------------------------------------

    def _tag_paths(self) -> builtins.list[TagPath]:
        """Router paths of this cloud: this device first, then members we see directly."""
        out: builtins.list[TagPath] = []
        seen: set[tuple[str, int]] = set()

        def add(key: bytes, ip: str | None, port: int | None) -> None:
            if (ip and port and ip not in ("0.0.0.0", "") and (ip, port) not in seen  # noqa: S104
                    and len(out) < 4 and ":" not in ip):
                seen.add((ip, port))
                out.append(TagPath("router", ip, port, key))

        for p in self.node.paths:
            if p.type == "udp4":
                add(self.node.identity.cs3a_public, p.ip, p.port)
        membership = self._membership()
        if membership is not None:
            for h, m in sorted(membership.members().items()):
                if h == self.node.hashname or m.role == ROLE_THING:
                    continue
                path = self.node.link_path(h)
                if path is not None and path.type == "udp4":
                    add(bytes(m.key), path.ip, path.port)
        return out

    def tag(self, thing: str | ThingView) -> Tag:
        """A thing's current tag, with this cloud's routers: its fresh tag while unclaimed
        (re-derived from the thing key), else the claimed tag with the finder capability.

        Raises:
            UnknownThing: no such thing. ThingError: this device cannot open the thing key.
        """
        sc = self._live(thing)
        info = _t.thing_info(sc.replica)
        paths = self._tag_paths()
        if info.claimed:
            return _s.current_tag(sc.replica, paths)
        identity = self._thing_key(sc)
        seed = identity.seed
        assert seed is not None
        return fresh_tag(_t.NewThing(identity, sc.id, claim_secret_for(seed)), paths)

    # -- scanning --------------------------------------------------------------------------------

    async def _read_tag(self, source: str | bytes | Path) -> Tag:
        if isinstance(source, Path):
            data = await trio.Path(source).read_bytes()
            return await trio.to_thread.run_sync(scan_image, data)
        if isinstance(source, bytes):
            return await trio.to_thread.run_sync(scan_image, source)
        text = str(source).strip()
        if not text.lower().startswith("p2pcloud:") and await trio.Path(text).is_file():
            return await self._read_tag(Path(text))
        return parse_tag(text)

    async def scan(self, source: str | bytes | Path) -> ScanResult:
        """Scan a tag: claim a fresh one, open our own thing, or read a stranger's card.

        Args:
            source: the tag URI text, a PNG/JPEG as bytes, or an image path.

        Returns:
            The :class:`ScanResult`.

        Raises:
            BadURI: the text is not a valid tag (truncated, altered, wrong version, foreign
                key). TagImageError: no tag in the image. ClaimRefused: the claim secret is
                wrong or spent. ThingError: the owner cannot be reached, or no cloud to claim
                into. Nothing changes on any of these.
        """
        tag = await self._read_tag(source)
        sc = self._held(tag.hashname, scan=True)
        cloud = self._cloud_id()
        decision = _s.decide_scan(tag, holder=sc.replica if sc is not None else None,
                                  my_cloud=cloud if cloud is not None else CloudId(b""))
        me = self.node.hashname
        if decision.action == _s.SCAN_REFUSED:
            raise ClaimRefused(decision.reason, "this tag was claimed before; a claim works once")
        if decision.action == _s.SCAN_CLAIM_HERE:
            assert sc is not None and cloud is not None
            paths = self._tag_paths()
            new_tag, _event, _delta = await self._write(sc, lambda r: _s.claim_here(
                r, tag.secret, me=me, my_cloud=cloud, paths=paths, entropy=os.urandom,
                now_ms=_now_ms()), [(_t.ACCESS, _t.ACCESS_DOC, None), (_t.EVENTS, None, None)])
            self._notify("changed", tag.hashname, {"claimed": True})
            return ScanResult("claimed", tag, self._view(sc), new_tag=new_tag)
        if decision.action == _s.SCAN_OPEN:
            assert sc is not None
            await self._write(sc, lambda r: _s.open_thing(r, me=me, entropy=os.urandom,
                                                          now_ms=_now_ms()),
                              [(_t.EVENTS, None, None)])
            return ScanResult("opened", tag, self._view(sc))
        if decision.action == _s.SCAN_CLAIM_REMOTE:
            return await self._claim_remote(tag)
        response = await self._request(tag, _s.card_request(tag))
        if not response["ok"]:
            raise ThingError(f"the thing's owner refused: {response['err']}")
        card = response.get("card")
        if not isinstance(card, dict):
            raise ThingError("the thing's owner sent no card")
        return ScanResult("finder", tag,
                          card={str(k): str(v) for k, v in card.items()})

    async def _claim_remote(self, tag: Tag) -> ScanResult:
        cloud = self._require_cloud()
        members = self._members(None)
        try:
            response = await self._request(tag, _s.claim_request(tag, cloud=cloud,
                                                                 members=members))
        except ThingMoved as exc:
            raise ClaimRefused(_s.REFUSE_MOVED, str(exc)) from exc
        if not response["ok"]:
            detail = response.get("detail")
            raise ClaimRefused(response["err"], detail if isinstance(detail, str) else "")
        if response.get("same_cloud"):
            # A device of our own cloud answered: the thing is ours; wait for its sub-cloud.
            with trio.move_on_after(SAME_CLOUD_WAIT):
                while True:
                    sc = self._held(tag.hashname)
                    if sc is not None and _t.thing_info(sc.replica).claimed:
                        return ScanResult("claimed", tag, self._view(sc),
                                          new_tag=_s.current_tag(sc.replica, self._tag_paths()))
                    await trio.sleep(0.05)
            raise ThingError("the thing was claimed, but its sub-cloud has not arrived yet; "
                             "it will appear once this device syncs with the others")
        pkg = response.get("pkg")
        if not isinstance(pkg, bytes):
            raise ThingError("the holder answered the claim without a package")
        sc = await self._accept_package(pkg, expect=tag.hashname)
        return ScanResult("claimed", tag, self._view(sc),
                          new_tag=_s.current_tag(sc.replica, self._tag_paths()))

    async def leave_message(self, tag: Tag | str, text: str, contact: str = "") -> None:
        """Leave a message for a thing's owner (as a finder).

        Args:
            tag: the claimed tag (or its text). text: the message (at most 1000 characters).
            contact: how to answer (optional, at most 200 characters).

        Raises:
            BadURI: not a tag. ThingError: refused (rate, capability) or unreachable.
        """
        parsed = parse_tag(tag) if isinstance(tag, str) else tag
        if parsed.is_fresh:
            raise ThingError("a fresh tag has no owner to write to; scan it to claim the thing")
        response = await self._request(parsed, _s.message_request(parsed, text, contact))
        if not response["ok"]:
            raise ThingError(f"the thing's owner refused the message: {response['err']}")

    async def _reach(self, tag: Tag) -> Hashname:
        """Link the thing's hashname: wake it on a router of the tag, or use a direct path."""
        node = self.node
        if tag.hashname in node.links:
            return tag.hashname
        problems: builtins.list[str] = []
        moved = False
        for p in tag.paths:
            try:
                with trio.fail_after(REACH_TIMEOUT):
                    if p.type == "router":
                        router = p.router_hashname
                        if router is None or router == node.hashname:
                            continue
                        await node.link(LinkInfo(router, {"3a": p.key}, [p.to_path()]))
                        paths = await self._wake(router, tag.hashname)
                    else:
                        paths = [p.to_path()]
                    await node.link(LinkInfo(tag.hashname, {"3a": tag.key}, paths))
                    return tag.hashname
            except (LinkError, trio.TooSlowError, MalformedPacket, trio.BrokenResourceError,
                    ThingError, BadURI) as exc:
                moved = moved or isinstance(exc, ThingMoved)
                problems.append(f"{p.type} {p.ip}:{p.port}: {exc or type(exc).__name__}")
        if moved:
            raise ThingMoved(f"{_s.REFUSE_MOVED}: the devices this tag names handed it on; "
                             "ask its new owner for a new tag")
        raise ThingError("cannot reach the thing's owner: "
                         + ("; ".join(problems) if problems else "the tag lists no path"))

    async def _wake(self, router: Hashname, thing: Hashname) -> builtins.list[dict[str, Any]]:
        stream = await self.node.open_channel(router, HOST_CHANNEL)
        try:
            await write_frame(stream, cbor2.dumps({"v": 1, "t": thing}))
            data = await read_frame(stream, 4096)
        finally:
            await stream.aclose()
        try:
            m = cbor2.loads(data or b"")
        except Exception as exc:  # cbor2 raises many types on hostile input
            raise MalformedPacket(f"wake answer is not CBOR: {exc}") from exc
        if not isinstance(m, dict) or m.get("v") != 1:
            raise MalformedPacket("not a wake answer")
        if not m.get("ok"):
            if m.get("err") == _s.REFUSE_MOVED:
                raise ThingMoved(_s.REFUSE_MOVED)
            raise ThingError(str(m.get("err", "refused")))
        paths = m.get("paths")
        if not isinstance(paths, list) or not paths or not all(isinstance(x, dict)
                                                               for x in paths[:8]):
            raise MalformedPacket("a wake answer without paths")
        return [dict(x) for x in paths[:8]]

    async def _request(self, tag: Tag, data: bytes) -> dict[str, Any]:
        """Send one request on a ``thing`` channel to the thing and return the response.

        A link to the thing's hashname that is already up may lead to an endpoint that no
        longer answers for it (its old owner's, or one stopped for idleness): then the link
        is dropped and the thing is reached again through the tag's paths.
        """
        if tag.hashname in self.node.links:
            try:
                answer = await self._request_once(tag, data, REUSED_LINK_TIMEOUT)
            except ThingError:
                answer = None
            if answer is not None and (answer["ok"] or answer.get("err") != _s.REFUSE_MOVED):
                return answer
            self.node.unlink(tag.hashname)
        return await self._request_once(tag, data, REQUEST_TIMEOUT)

    async def _request_once(self, tag: Tag, data: bytes, seconds: float) -> dict[str, Any]:
        hn = await self._reach(tag)
        try:
            with trio.fail_after(seconds):
                stream = await self.node.open_channel(hn, _s.CHANNEL_TYPE)
                try:
                    await write_frame(stream, data)
                    answer = await read_frame(stream, _s.MAX_RESPONSE_BYTES)
                finally:
                    await stream.aclose()
        except (LinkError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            raise ThingError(f"the thing did not answer: {exc or type(exc).__name__}") from exc
        if answer is None:
            raise ThingError("the thing closed the channel without an answer")
        try:
            return _s.decode_response(answer)
        except MalformedPacket as exc:
            raise ThingError(f"the thing's answer is malformed: {exc}") from exc

    async def raw_request(self, tag: Tag, data: bytes) -> dict[str, Any]:
        """Send any request bytes on a ``thing`` channel (tools and tests of the allow-list).

        Returns:
            The decoded response (``ok`` false with ``err`` for refusals).
        """
        return await self._request(tag, data)

    # -- serving (the owner's side) --------------------------------------------------------------

    async def _serve_wake(self, stream: ChannelStream) -> None:
        with trio.move_on_after(REQUEST_TIMEOUT):
            try:
                data = await read_frame(stream, MAX_HOST_REQUEST)
                if data is None:
                    return
                hn = decode_wake(data)
            except MalformedPacket as exc:
                self.stats["refused: bad wake request"] += 1
                await write_frame(stream, cbor2.dumps({"v": 1, "ok": False, "err": str(exc)}))
                return
            sc = self._held(hn)
            answer: dict[str, Any]
            if sc is None:
                moved = self._index.get(hn) in self._repl.subclouds
                answer = {"v": 1, "ok": False,
                          "err": _s.REFUSE_MOVED if moved else "no such thing here"}
            else:
                try:
                    identity = self._thing_key(sc)
                    if identity.hashname == self.node.hashname:  # a smart thing answers itself
                        paths = [p.to_json() for p in self.node.paths]
                    else:
                        paths = await self.host.wake(identity)
                    answer = {"v": 1, "ok": True, "paths": paths}
                    self.stats["woken"] += 1
                except ThingError as exc:
                    answer = {"v": 1, "ok": False, "err": str(exc)}
            await write_frame(stream, cbor2.dumps(answer))

    async def _serve_thing(self, thing: Hashname, stream: ChannelStream) -> None:
        """Answer requests on a ``thing`` channel to a hosted thing (thinghost.py)."""
        requester = stream.hashname
        while True:
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    data = await read_frame(stream, _s.MAX_REQUEST_BYTES)
            except (MalformedPacket, trio.TooSlowError) as exc:
                self.stats["refused: bad frame"] += 1
                await write_frame(stream, _s.encode_response(
                    False, err=_s.REFUSE_MALFORMED, detail=str(exc)))
                return
            if data is None:
                return
            await write_frame(stream, await self._answer(thing, requester, data))

    async def _answer(self, thing: Hashname, requester: Hashname, data: bytes) -> bytes:
        sc = self._held(thing)
        if sc is None:
            self.stats[f"refused: {_s.REFUSE_MOVED}"] += 1
            return _s.encode_response(False, err=_s.REFUSE_MOVED,
                                      detail="ask the owner for the thing's new tag")
        try:
            request: _s.Request | None = _s.decode_request(data)
        except MalformedPacket:
            request = None
        cloud = self._cloud_id()
        membership = self._membership()
        if (request is not None and request.op == _s.OP_CLAIM and cloud is not None
                and request.fields.get("cloud") == bytes(cloud) and membership is not None
                and membership.is_member(requester)):
            return await self._claim_for_member(sc, request)
        try:
            identity: LocalIdentity | None = self._thing_key(sc)
        except ThingError:
            identity = None
        me = self.node.hashname
        async with sc.lock:
            served = _s.serve_request(sc.replica, data, requester=requester, me=me,
                                      thing_identity=identity, entropy=os.urandom,
                                      now_ms=_now_ms())
            if served.delta:
                await self._repl._commit_delta(sc, served.delta)
        if served.delta:
            self._repl._changed(sc, [Change(_t.EVENTS, None, None, "local"),
                                     Change(_t.INBOX, None, None, "local")])
        for event in served.events:
            if isinstance(event, _s.RequestRefused):
                self.stats[f"refused: {event.reason}"] += 1
            elif isinstance(event, _s.ClaimAnswered):
                self.stats["claims answered"] += 1
                self.host.stop(thing)
                self._notify("changed", thing, {"handed_on": True})
        return served.response

    async def _claim_for_member(self, sc: SubCloud, request: _s.Request) -> bytes:
        secret = request.fields.get("secret")
        cloud = self._require_cloud()
        me = self.node.hashname
        paths = self._tag_paths()
        try:
            await self._write(sc, lambda r: _s.claim_here(
                r, secret if isinstance(secret, bytes) else b"", me=me, my_cloud=cloud,
                paths=paths, entropy=os.urandom, now_ms=_now_ms()),
                [(_t.ACCESS, _t.ACCESS_DOC, None), (_t.EVENTS, None, None)])
        except ClaimRefused as exc:
            self.stats[f"refused: {exc.reason}"] += 1
            return _s.encode_response(False, err=exc.reason, detail=exc.detail)
        self._notify("changed", _t.thing_info(sc.replica).hashname, {"claimed": True})
        return _s.encode_response(True, same_cloud=True, subcloud=bytes(sc.id))

    # -- transfer --------------------------------------------------------------------------------

    def transfer_target(self) -> str:
        """A transfer target for someone handing a thing to this cloud (show it to them).

        It names this cloud, its members' keys (the thing key is sealed to them), this device
        and where it answers, and a single-use secret (valid TARGET_TTL seconds, until this
        node stops).

        Raises:
            ThingError: no cloud yet, or too many open targets.
        """
        cloud = self._require_cloud()
        now = trio.current_time()
        self._targets = {s: v for s, v in self._targets.items() if v[0] > now}
        if len(self._targets) >= MAX_TARGETS:
            raise ThingError("too many open transfer targets; wait for some to expire")
        secret = os.urandom(16)
        members = self._members(None)
        paths = [p.to_json() for p in self.node.paths][:4]
        target = _Target(cloud, self.node.identity.cs3a_public, paths, secret, members)
        self._targets[secret] = (now + TARGET_TTL, target)
        body = cbor2.dumps({"v": 1, "c": bytes(cloud), "k": target.device_key, "p": paths,
                            "s": secret, "m": [bytes(k) for k in list(members.values())[
                                :MAX_TARGET_MEMBERS]]})
        return TRANSFER_PREFIX + b32encode(body).upper()

    @staticmethod
    def _parse_target(text: str) -> _Target:
        text = text.strip()
        if len(text) > MAX_TARGET_TEXT or not text.upper().startswith(TRANSFER_PREFIX):
            raise TransferError(f"not a transfer target (it starts with {TRANSFER_PREFIX})")
        try:
            m = cbor2.loads(b32decode(text[len(TRANSFER_PREFIX):].lower()))
        except Exception as exc:  # base32 or CBOR: both mean the text is damaged
            raise TransferError(f"the transfer target is damaged: {exc}") from exc
        try:
            if not isinstance(m, dict) or m.get("v") != 1:
                raise TransferError("unknown transfer target version")
            cloud, key, paths, secret, keys = m["c"], m["k"], m["p"], m["s"], m["m"]
            if not (isinstance(cloud, bytes) and isinstance(key, bytes) and len(key) == 32
                    and isinstance(paths, list) and isinstance(secret, bytes)
                    and len(secret) == 16 and isinstance(keys, list)
                    and 0 < len(keys) <= MAX_TARGET_MEMBERS
                    and all(isinstance(k, bytes) and len(k) == 32 for k in keys)
                    and all(isinstance(p, dict) for p in paths)):
                raise TransferError("the transfer target has bad fields")
        except KeyError as exc:
            raise TransferError(f"the transfer target lacks {exc}") from exc
        members = {hashname_from_keys({"3a": k}): k for k in keys}
        return _Target(CloudId(cloud), key, [dict(p) for p in paths], secret, members)

    async def transfer(self, thing: str | ThingView, to: str, *,
                       history: str = HISTORY_ALL) -> None:
        """Hand a thing on to another cloud, with its history or a part of it.

        Args:
            thing: the thing. to: the new owner's :meth:`transfer_target` text.
            history: ``"all"``, or comma-separated names among profile, notes, files, card,
                rules, readings, events, inbox, transfers (the profile always goes).

        Raises:
            TransferError: a bad target, scope or package, or the new owner refused; nothing
                changed here. ThingError: the new owner's device cannot be reached.
        """
        target = self._parse_target(to)
        sc = self._live(thing)
        identity = self._thing_key(sc)
        scope = None if history.strip() == HISTORY_ALL else [
            s.strip() for s in history.split(",") if s.strip()]
        if target.cloud == self._cloud_id():
            raise TransferError("the thing already belongs to that cloud")
        async with sc.lock:
            package = _x.prepare_transfer(sc.replica, identity, to_cloud=target.cloud,
                                          members=target.members, scope=scope,
                                          entropy=os.urandom, now_ms=_now_ms())
        device = hashname_from_keys({"3a": target.device_key})
        try:
            with trio.fail_after(REACH_TIMEOUT):
                await self.node.link(LinkInfo(device, {"3a": target.device_key},
                                              target.paths))
            with trio.fail_after(REQUEST_TIMEOUT * 4):
                stream = await self.node.open_channel(device, TRANSFER_CHANNEL)
                try:
                    await write_frame(stream, cbor2.dumps({"v": 1, "s": target.secret,
                                                           "pkg": package.encode()}))
                    answer = await read_frame(stream, 4096)
                finally:
                    await stream.aclose()
        except (LinkError, trio.TooSlowError, trio.BrokenResourceError,
                MalformedPacket) as exc:
            raise ThingError(f"cannot reach the new owner: {exc or type(exc).__name__}"
                             ) from exc
        try:
            m = cbor2.loads(answer or b"")
        except Exception as exc:  # cbor2 raises many types on hostile input
            raise TransferError(f"the new owner's answer is malformed: {exc}") from exc
        if not isinstance(m, dict) or m.get("ok") is not True:
            err = m.get("err") if isinstance(m, dict) else None
            raise TransferError(f"the new owner refused the thing: {err or 'no reason'}")
        hn = _t.thing_info(sc.replica).hashname
        await self._write(sc, lambda r: _x.end_access(r, package.record, now_ms=_now_ms()),
                          [(_t.ACCESS, _t.ACCESS_DOC, None), (_t.TRANSFERS, None, None)])
        self.host.stop(hn)
        self._keys.pop(sc.id, None)
        self._runners.pop(sc.id, None)
        self._notify("changed", hn, {"handed_on": True})

    async def _serve_transfer(self, stream: ChannelStream) -> None:
        with trio.move_on_after(REQUEST_TIMEOUT * 4):
            answer: dict[str, Any]
            try:
                data = await read_frame(stream, _x.MAX_PACKAGE_BYTES + 1024)
                if data is None:
                    return
                m = cbor2.loads(data)
                if not isinstance(m, dict) or m.get("v") != 1:
                    raise TransferError("not a transfer message")
                secret, pkg = m.get("s"), m.get("pkg")
                if not isinstance(secret, bytes):
                    raise TransferError("no transfer target secret")
                entry = self._targets.get(secret)
                if entry is None or entry[0] < trio.current_time():
                    raise TransferError("unknown or expired transfer target")
                if not isinstance(pkg, bytes):
                    raise TransferError("no package")
                del self._targets[secret]  # single use, spent even if the package is bad
                await self._accept_package(pkg, expect=None)
                answer = {"v": 1, "ok": True}
            except (TransferError, ThingError, MalformedPacket) as exc:
                self.stats["refused: transfer"] += 1
                answer = {"v": 1, "ok": False, "err": str(exc)}
            except Exception as exc:  # cbor2's many decode errors: a malformed message
                self.stats["refused: transfer"] += 1
                answer = {"v": 1, "ok": False, "err": f"malformed: {exc}"}
            await write_frame(stream, cbor2.dumps(answer))

    async def _accept_package(self, pkg: bytes, *, expect: Hashname | None) -> SubCloud:
        """Verify a package and keep the thing's new sub-cloud (its envelopes as received)."""
        cloud = self._require_cloud()
        accepted = await trio.to_thread.run_sync(
            lambda: _x.accept_transfer(pkg, me=self.node.identity, my_cloud=cloud,
                                       expect_thing=expect, now_ms=_now_ms()))
        new_id = accepted.record.new_subcloud
        if new_id in self._repl.subclouds:
            raise TransferError("this package was received before")
        thing = accepted.identity
        sc = await self._put_record(thing, new_id, self._acl(new_id, thing.hashname))
        self._announced.add(new_id)  # announced once below, with "transferred"
        await self._repl.ingest(new_id, accepted.envelopes, self.node.hashname)
        if _t.thing_info(sc.replica).hashname != thing.hashname:
            raise TransferError("the package's envelopes were not stored")
        record = accepted.record.encode()

        def keep_record(r: Replica) -> bytes:
            r.begin(_now_ms())
            r.append(_t.TRANSFERS, record)
            return bytes(r.commit())

        await self._write(sc, keep_record, [(_t.TRANSFERS, None, None)])
        self._keys[sc.id] = thing
        self._index[thing.hashname] = sc.id
        self._announced.add(sc.id)
        self._notify("created", thing.hashname, {"transferred": True})
        self._dirty.add(sc.id)
        self._rules_wake.set()
        return sc

    # -- rules and handlers ------------------------------------------------------------------------

    async def add_rule(self, thing: str | ThingView, text: str) -> str:
        """Store a rule in the thing's sub-cloud (it replicates to every owner device).

        Returns:
            The rule id.

        Raises:
            RuleError: the rule does not parse (with a column), or too many rules.
        """
        sc = self._live(thing)
        rule, _delta = await self._write(sc, lambda r: _r.add_rule(
            r, text, entropy=os.urandom, now_ms=_now_ms()), [(_t.RULES, None, None)])
        return str(rule.id)

    async def remove_rule(self, thing: str | ThingView, rule_id: str) -> None:
        """Delete a rule. Raises UnknownThing, ThingError (no such rule)."""
        sc = self._live(thing)
        if rule_id not in sc.replica.documents(_t.RULES):
            raise ThingError(f"the thing has no rule {rule_id!r}")
        await self._write(sc, lambda r: _r.remove_rule(r, rule_id, now_ms=_now_ms()),
                          [(_t.RULES, rule_id, None)])

    def rules(self, thing: str | ThingView) -> builtins.list[dict[str, Any]]:
        """A thing's rules: ``{id, text, created_ms, enabled}`` (``error`` if it does not parse)."""
        sc = self._find(thing)
        _parsed, errors = _r.load_rules(sc.replica)
        out = []
        for rule_id in sc.replica.documents(_t.RULES):
            doc = sc.replica.document(_t.RULES, rule_id) or {}
            item = {"id": rule_id, "text": doc.get("text", ""),
                    "created_ms": doc.get("created_ms", 0), "enabled": doc.get("enabled", True)}
            if rule_id in errors:
                item["error"] = errors[rule_id]
            out.append(item)
        return out

    def add_handler(self, event: str, fn: Handler) -> None:
        """Run ``fn(ThingEvent)`` for every new event of ``event`` type of any thing, once per
        event across the owner devices (the rule plan, docs/things.md "exactly once").

        Only events from now on are handled. ``fn`` may be a plain or an async function.

        Raises:
            RuleError: an unknown event type.
        """
        self._registry.on(event)  # validates the type
        self._registry.since_ms.setdefault(event, _now_ms())
        self._py_handlers.setdefault(event, []).append((fn, inspect.iscoroutinefunction(fn)))

        def marker(_event: _r.Event) -> None:
            return None

        self._registry.on(event)(marker)

    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(ThingNotice)`` when a thing is created, changes, gets a message, or a rule
        notifies the owner (on every owner device). ``fn`` must not block."""
        self._listeners.append(fn)

    def _notify(self, kind: str, thing: Hashname, data: dict[str, Any]) -> None:
        notice = _NOTICES[kind](thing, data)
        for fn in list(self._listeners):
            try:
                fn(notice)
            except Exception:
                log.exception("thing listener failed")

    def rules_pending(self) -> int:
        """Firings this device still waits on (0 when every known event was handled here or
        marked done by another device)."""
        return sum(len(r._pending) for r in self._runners.values())

    def _runner(self, sc: SubCloud) -> _r.RuleRunner | None:
        runner = self._runners.get(sc.id)
        if runner is None:
            if not sc.replica.documents(_t.RULES) and not self._py_handlers:
                return None
            runner = _r.RuleRunner(self.node.hashname, self._hosts(sc.id),
                                   registry=self._registry, started_ms=self._started_ms,
                                   takeover_ms=self.takeover_ms)
            self._runners[sc.id] = runner
        return runner

    def _on_change(self, sc: SubCloud, changes: builtins.list[Change]) -> None:
        """The engine's change hook (local writes and merges of any sub-cloud)."""
        if sc.kind != "thing":
            return
        self._index_one(sc)
        # keep list()'s cached view current, so the next open lists without loading (a
        # thing whose profile has not arrived yet has no view)
        with contextlib.suppress(ThingError):
            self._view(sc)
        hn = sc.replica.get(_t.PROFILE, _t.PROFILE_DOC, "hashname")
        if not is_hashname(hn):
            return
        thing = Hashname(str(hn))
        if _ended(sc.replica):  # handed on (here or by another device): stop answering
            self.host.stop(thing)
            self._runners.pop(sc.id, None)
        touched = {c.collection for c in changes}
        remote = any(c.origin != "local" for c in changes)
        if remote and _t.KEYS in touched:  # seals arrived: maybe this device acts now
            self._refresh_wanted.add(sc.id)
            self._refresh_wake.set()
        # first seen here after start (synced from another device): what its logs held
        # before it arrived is history, not news for this device (see _on_subcloud)
        appeared = self._seen_logs.setdefault((sc.id, "__seen"), _now_ms())
        if remote and sc.id not in self._announced:
            self._announced.add(sc.id)
            self._notify("created", thing, {})
        for log_name, kind in ((_t.INBOX, "message"), (NOTICES, "notification")):
            if log_name in touched:
                records = sc.log(log_name)
                start = self._seen_logs.get((sc.id, log_name), 0)
                for record in records[start:]:
                    if isinstance(record, dict) and _at(record) >= appeared:
                        self._notify(kind, thing, dict(record))
                self._seen_logs[(sc.id, log_name)] = len(records)
        self._notify("changed", thing, {"collections": sorted(touched)})
        if (_t.EVENTS in touched or _t.RULES in touched or _t.DONE in touched
                or sc.id in self._runners):
            self._dirty.add(sc.id)
            self._rules_wake.set()

    def _on_subcloud(self, sc: SubCloud) -> None:
        """The engine holds a new sub-cloud (its record arrived, or it was made here): the
        records its logs bring from before this moment are history, not news here."""
        if sc.kind == "thing":
            self._seen_logs.setdefault((sc.id, "__seen"), _now_ms())

    def _note_logs(self, sc: SubCloud) -> None:
        # at start, inbox and notices already held are old news: notify only what arrives
        self._seen_logs[(sc.id, "__seen")] = 0
        self._announced.add(sc.id)
        head = _head(sc)
        for log_name in (_t.INBOX, NOTICES):
            n = head["logs"].get(log_name, 0)
            if n:
                self._seen_logs[(sc.id, log_name)] = n

    async def _rules_loop(self) -> None:
        """Run the rules of dirty things, of things whose timer is due, and (every
        SCHEDULE_TICK seconds) of things with schedule rules; one task for all things."""
        while True:
            await self._rules_wake.wait()
            self._rules_wake = trio.Event()
            now = _now_ms()
            todo = set(self._dirty)
            self._dirty.clear()
            for sc_id, runner in self._runners.items():
                wake = runner.get_timer()
                if wake is not None and wake <= now:
                    todo.add(sc_id)
            if now >= self._next_schedule_ms:
                todo |= self._scheduled
                self._next_schedule_ms = now + int(SCHEDULE_TICK * 1000)
            for sc_id in sorted(todo):
                sc = self._repl.subclouds.get(sc_id)
                if sc is None or _ended(sc.replica):
                    self._runners.pop(sc_id, None)
                    self._scheduled.discard(sc_id)
                    continue
                try:
                    await self._run_rules(sc)
                except (ThingError, AccessDenied) as exc:
                    log.warning("rules of %s: %s", sc.name, exc)
            wakes = [w for r in self._runners.values() if (w := r.get_timer()) is not None]
            if self._scheduled:
                wakes.append(self._next_schedule_ms)
            self._set_rules_timer(min(wakes) if wakes else None)

    def _set_rules_timer(self, wake_ms: int | None) -> None:
        """Wake the rules loop at ``wake_ms`` (wall-clock ms; None: only when dirtied)."""
        deadline = math.inf if wake_ms is None else (
            trio.current_time() + max(0.0, (wake_ms - _now_ms()) / 1000))
        self._rules_deadline = deadline
        if self._rules_timer_scope is not None:
            self._rules_timer_scope.deadline = deadline

    async def _rules_timer(self) -> None:
        """One timer task for every thing's rules (see ``_set_rules_timer``)."""
        while True:
            with trio.CancelScope(deadline=self._rules_deadline) as scope:
                self._rules_timer_scope = scope
                await trio.sleep_forever()
            self._rules_timer_scope = None
            if trio.current_time() >= self._rules_deadline:
                self._rules_deadline = math.inf
                self._rules_wake.set()

    async def _run_rules(self, sc: SubCloud) -> None:
        await self._repl.loaded(sc)  # in a worker thread, not in the rules loop's step
        runner = self._runner(sc)
        if runner is None:
            return
        runner.hosts = self._hosts(sc.id)
        now = _now_ms()
        runner.observe(sc.replica, now)
        rules, _errors = _r.load_rules(sc.replica, runner._rule_cache)
        if any(rule.event == "schedule" for rule in rules):
            self._scheduled.add(sc.id)
        else:
            self._scheduled.discard(sc.id)
        thing = Hashname(str(sc.replica.get(_t.PROFILE, _t.PROFILE_DOC, "hashname")))
        for due in runner.due(sc.replica, now):
            if not self._repl.can_write(sc.id, self.node.hashname):
                return
            async with sc.lock:
                actions, delta = runner.complete(sc.replica, due, now_ms=_now_ms(),
                                                 notify_log=NOTICES)
                if delta:
                    await self._repl._commit_delta(sc, delta)
            if not delta:
                continue
            self.stats["rule firings"] += 1
            # notify_owner / show_card records went into the notices log with the marker
            self._repl._changed(sc, [Change(_t.DONE, None, None, "local"),
                                     Change(NOTICES, None, None, "local")])
            if due.firing.rule_id == _r.HandlerRegistry.HANDLERS_RULE:
                await self._invoke_handlers(thing, due.event)
            for kind, target, _value in actions:
                if kind == "forward":
                    # Doors to second parties (DESIGN.md section 8) are not built yet: the
                    # firing is recorded and logged, nothing leaves the cloud.
                    self.stats["forward not delivered"] += 1
                    log.info("rule %s would forward to %s (no doors yet)", due.firing.rule_id,
                             str(target)[:8])

    async def _invoke_handlers(self, thing: Hashname, event: _r.Event) -> None:
        view = ThingEvent(thing, event.type, event.id, event.origin, event.at_ms,
                          dict(event.fields))
        for fn, is_async in list(self._py_handlers.get(event.type, ())):
            try:
                result = fn(view)
                if is_async or inspect.isawaitable(result):
                    await result  # type: ignore[misc]
            except Exception:
                log.exception("thing handler for %s failed", event.type)

    # -- membership changes ------------------------------------------------------------------

    def _on_membership(self) -> None:
        """The cloud's membership changed: every thing's access is re-checked."""
        self._refresh_all = True
        self._refresh_wake.set()

    async def _refresh_loop(self) -> None:
        """Re-check access of the things asked for (membership changes, seals that arrived)."""
        while True:
            await self._refresh_wake.wait()
            self._refresh_wake = trio.Event()
            if self._refresh_all:
                self._refresh_all = False
                self._refresh_wanted.clear()
                await self.refresh_access()
            else:
                wanted, self._refresh_wanted = self._refresh_wanted, set()
                async with self._refresh_lock:
                    for sc_id in sorted(wanted):
                        sc = self._repl.subclouds.get(sc_id)
                        if sc is not None and self._may_refresh():
                            await self._refresh_one(sc)

    async def refresh_access(self) -> int:
        """Re-seal thing keys and re-sign ACLs after the cloud's membership changed.

        For each thing one device acts: a smart thing itself, else the lowest hashname among
        the devices that hold a seal of its key and that this device sees online (itself
        included), so devices do not race, and an offline one does not block the others.
        Things this device cannot open are skipped. It also runs for one thing when seals of
        its key arrive (this device may have become the one to act).

        Returns:
            How many things were updated.
        """
        if self._cloud_id() is None:
            return 0
        async with self._refresh_lock:  # one pass at a time: each re-sign bumps a revision
            if not self._may_refresh():
                return 0
            done = 0
            for sc in self._thing_subclouds():
                done += await self._refresh_one(sc)
            return done

    def _may_refresh(self) -> bool:
        membership = self._membership()
        # revoked (or not yet a member): nothing of the cloud is ours to sign
        return membership is not None and membership.is_member(self.node.hashname)

    async def _refresh_one(self, sc: SubCloud) -> int:
        await self._repl.loaded(sc)  # in a worker thread: a pass may visit every thing
        if _ended(sc.replica):
            return 0
        me = self.node.hashname
        members = self._members(sc.id)
        sealed = set(sc.replica.documents(_t.KEYS))
        able = sorted(h for h in members if h in sealed and (h == me or h in self.node.links))
        if sc.owner != me and (not able or able[0] != me):
            return 0
        try:
            identity = self._thing_key(sc)
        except ThingError:
            return 0
        acl = self._acl(sc.id, identity.hashname)
        changed = 0
        try:
            if acl != sc.record.acl and sc.owner == identity.hashname:
                await self._put_record(identity, sc.id, acl, sc.record)
                changed = 1
            if set(sc.replica.documents(_t.KEYS)) != set(members):
                def reseal(r: Replica, i: LocalIdentity = identity,
                           m: dict[Hashname, bytes] = members) -> bytes:
                    return _t.reseal_thing_key(r, i, m, entropy=os.urandom, now_ms=_now_ms())

                await self._write(sc, reseal, [(_t.KEYS, None, None)])
                changed = 1
        except (ThingError, AccessDenied, StoreError, LocalProtocolError) as exc:
            # one thing that cannot be updated must not stop the others (nor the node)
            self.stats["refresh failed"] += 1
            log.warning("access of %s not refreshed: %s", sc.name, exc)
        runner = self._runners.get(sc.id)
        if runner is not None:
            runner.hosts = self._hosts(sc.id)
        return changed

    # -- smart things ------------------------------------------------------------------------------

    async def invite_smart(self, *, expires_in: float = 3600.0) -> str:
        """An invite for a smart thing to pair with this cloud (``run_thing(invite=...)``).

        The thing joins with role ``thing`` and a grant that names no sub-cloud of the cloud
        (only an unused placeholder id: a grant needs one entry), so it reads nothing of the
        owner's; it writes its own sub-cloud as its owner. Revoke it like a device.

        Raises:
            LocalProtocolError: not in a cloud, or not an admin.
        """
        cloud = self._cloud()
        if cloud is None:
            raise ThingError("this node has no cloud")
        return str(await cloud.invite(role=ROLE_THING, expires_in=expires_in,
                                      rights={b32encode(NO_SUBCLOUD): ["read"]}))

    async def become_thing(self, name: str, *, make: str = "", model: str = "",
                           serial: str = "") -> ThingView:
        """Make this node a smart thing: its own identity is the thing's (a device that has a
        computer: a scale, a meter). Its sub-cloud is owned and written by itself; the cloud's
        devices get write rights and its key sealed, as for any thing. Idempotent.

        Returns:
            Its view.

        Raises:
            ThingError: this node is in no cloud yet (pair or join first).
        """
        self._require_cloud()
        sc = self._held(self.node.hashname)
        if sc is not None:
            return self._view(sc)
        seed = self.node.identity.seed
        if seed is None:
            raise ThingError("this node's identity cannot sign")
        sc_id = smart_subcloud_id(self.node.hashname)
        new = _t.NewThing(self.node.identity, sc_id, claim_secret_for(seed))
        view = await self._create(new, name=name, make=make, model=model, serial=serial,
                                  card="", smart=True)
        # A smart thing is claimed by pairing: it joined the cloud, no tag to claim with.
        sc = self._repl.subclouds[sc_id]
        cloud = self._require_cloud()
        me = self.node.hashname
        await self._write(sc, lambda r: _s.claim_here(r, new.claim_secret, me=me,
                                                      my_cloud=cloud, entropy=os.urandom,
                                                      now_ms=_now_ms()),
                          [(_t.ACCESS, _t.ACCESS_DOC, None)])
        del view
        self._serve_self()
        return self._view(sc)

    def _serve_self(self) -> None:
        """A smart thing serves the ``thing`` channel on its own node (its own hashname)."""
        if not self._serving_self:
            self._serving_self = True
            me = self.node.hashname
            self.node.serve_channel(_s.CHANNEL_TYPE, lambda stream: self._serve_thing(me, stream))


NO_SUBCLOUD: Final = SubCloudId(hashlib.sha256(b"p2pcloud no sub-cloud v1").digest()[:16])
"""The placeholder a smart thing's grant names: no sub-cloud has this id (a grant must name
one scope; ``"*"`` would give the thing everything)."""


def smart_subcloud_id(hashname: Hashname) -> SubCloudId:
    """The sub-cloud id of a smart thing: derived from its hashname, so the cloud can grant it
    rights on exactly its own sub-cloud when it pairs, before the sub-cloud exists.

    Args:
        hashname: the smart thing's hashname.

    Returns:
        16 bytes.
    """
    return SubCloudId(hashlib.sha256(b"p2pcloud smart thing v1" + hashname.encode()).digest()[
        :_t.SUBCLOUD_ID_SIZE])


def _at(record: Mapping[str, Any]) -> int:
    at = record.get("at_ms")
    return at if isinstance(at, int) and not isinstance(at, bool) else 0


def _ended(replica: Replica) -> bool:
    return bool(replica.get(_t.ACCESS, _t.ACCESS_DOC, "ended", False))


def _head_fields(replica: Replica) -> dict[str, Any]:
    hn = replica.get(_t.PROFILE, _t.PROFILE_DOC, "hashname")
    return {"hn": str(hn) if is_hashname(hn) else None, "ended": _ended(replica),
            "rules": bool(replica.documents(_t.RULES)),
            "logs": {n: len(replica.log(n)) for n in (_t.INBOX, NOTICES)}}


def _head(sc: SubCloud) -> dict[str, Any]:
    """What the index and start() read of a thing: hashname, ended, has rules, log sizes
    (cached per sub-cloud state: no replica load at open)."""
    return sc.derived(_HEAD, _head_fields)


def _view_fields(replica: Replica) -> dict[str, Any]:
    """A :class:`ThingView`'s fields (CBOR-able, cached), or ``{"error": ...}``."""
    try:
        info = _t.thing_info(replica)
    except ThingError as exc:
        return {"error": str(exc)}
    created = replica.get(_t.PROFILE, _t.PROFILE_DOC, "created_ms", 0)
    return {
        "hashname": str(info.hashname), "name": info.name, "make": info.make,
        "model": info.model, "serial": info.serial, "archived": info.archived,
        "claimed": info.claimed, "ended": info.ended,
        "owner_cloud": b32encode(info.owner_cloud) if info.owner_cloud else None,
        "card": dict(_t.card(replica)),
        "created_ms": created if isinstance(created, int) else 0,
        "smart": replica.get(_t.PROFILE, _t.PROFILE_DOC, "smart", False) is True}


def _card_text(text: str) -> str:
    if not isinstance(text, str) or len(text) > _t.MAX_CARD_VALUE:
        raise ThingError(f"a card is text of at most {_t.MAX_CARD_VALUE} characters")
    return text


async def open_things(node: Node, nursery: trio.Nursery) -> Things:
    """Attach and start ``node.things`` (``open_node`` calls this after the cloud).

    Args:
        node: a started node with a data dir. nursery: the node's nursery.

    Returns:
        The running :class:`Things`.
    """
    things = Things(node)
    await things.start(nursery)
    return things
