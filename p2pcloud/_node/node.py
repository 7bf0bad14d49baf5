"""The node: the thin Trio shell around the pure mesh (STYLE.md section 3).

Theory of operation
-------------------
:class:`Node` owns one :class:`p2pcloud.proto.mesh.Mesh` (all protocol state, no I/O, no
clock), the transports, and a few tasks in one nursery:

* each transport's **receive loop** (one per UDP socket, one per TCP connection, one for the
  in-memory endpoint in tests) reads a burst of packets, feeds each to
  ``mesh.receive_datagram`` with ``trio.current_time()``, then *pumps* once;
* a **pump** dispatches the mesh's events, sends what ``mesh.datagrams_to_send`` hands out
  (non-blocking sends straight to the transport the path names: udp4, tcp4, or the memory
  network), wakes senders waiting for window space and re-arms the timer;
* the **flusher** task only runs when a socket's buffer was full: it waits for room and sends
  the backlog in order;
* the **timer** task sleeps until ``mesh.get_timer()`` and calls ``mesh.handle_timer``.

Application calls (``link``, ``open_channel``, stream sends) call the mesh synchronously and
then pump, so the mesh is only ever touched from one thread and never across an ``await``.
Events become Trio-side state: ``LinkUp`` wakes ``link()`` waiters, ``ChannelOpened`` hands a
new :class:`ChannelStream` to the handler or acceptor registered for its type,
``ChannelData`` / ``ChannelEnded`` / ``ChannelClosed`` feed the stream.
"""

from __future__ import annotations

import logging
import math
import os
import socket as _stdlib_socket
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any, Literal, overload

import trio

from p2pcloud import _keyfile
from p2pcloud._crypto import LocalIdentity
from p2pcloud._ids import ChannelId, Hashname
from p2pcloud._node.cloud import Cloud, open_cloud
from p2pcloud._node.memory import MemoryEndpoint, MemoryNetwork
from p2pcloud._node.replication import Replication, open_replication
from p2pcloud._node.stream import ChannelStream, UnreliableChannel
from p2pcloud._node.subcloud import SubCloud
from p2pcloud._node.things import Things, open_things
from p2pcloud._node.transport import TcpTransport, TransportError, UdpTransport
from p2pcloud._wire import MAX_PACKET, MAX_UDP_PACKET, b32decode
from p2pcloud.errors import (
    BadURI,
    KeyFileError,
    LinkError,
    LocalProtocolError,
    MalformedPacket,
)
from p2pcloud.proto import events as ev
from p2pcloud.proto.mesh import Mesh
from p2pcloud.proto.path import Path, is_hashname
from p2pcloud.uri import LinkInfo, format_link_uri, parse_link_uri

__all__ = [
    "IDENTITY_FILE",
    "Node",
    "NodeStatistics",
    "TransportError",
    "default_data_dir",
    "open_node",
]

log = logging.getLogger("p2pcloud.node")

IDENTITY_FILE = "identity.key"  # the key file inside a node's data dir
MAX_BACKLOG = 4096  # packets waiting for socket buffer room; beyond that they are dropped,
# as a full UDP socket buffer drops them (the reliable channels retransmit)
MAX_LOCAL_ADDRESSES = 4  # interface addresses advertised on a wildcard bind (the mesh
# advertises at most 8 paths, a UDP and a TCP one per address)
MAX_ACCEPT_BACKLOG = 64  # incoming channels queued for an acceptor before new ones are refused

Channel = ChannelStream | UnreliableChannel
ChannelHandler = Callable[[Any], Awaitable[None]]  # takes a ChannelStream (or an
# UnreliableChannel for unreliable channel types)


def default_data_dir() -> FsPath:
    """The data dir used when none is given.

    Returns:
        ``$P2PCLOUD_HOME``, else ``$XDG_DATA_HOME/p2pcloud``, else
        ``~/.local/share/p2pcloud`` (the XDG base directory default).
    """
    home = os.environ.get("P2PCLOUD_HOME")
    if home:
        return FsPath(home).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = FsPath(xdg).expanduser() if xdg else FsPath.home() / ".local" / "share"
    return base / "p2pcloud"


def load_or_create_identity(data_dir: FsPath, passphrase: str | None = None) -> LocalIdentity:
    """Load the node's identity from ``data_dir``, creating both on first start.

    Args:
        data_dir: the node's data dir (created with mode 0700 if missing).
        passphrase: the key file's passphrase, if it is (or is to be) sealed.

    Returns:
        The identity.

    Raises:
        KeyFileError: the key file exists but cannot be read (never overwritten), or the
            data dir cannot be created.
    """
    data_dir = data_dir.expanduser()
    key_path = data_dir / IDENTITY_FILE
    if key_path.exists():
        return _keyfile.load_identity(key_path, passphrase)
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"{data_dir}: cannot create the data dir: {exc.strerror}") from exc
    identity = LocalIdentity.generate(os.urandom)
    try:
        _keyfile.save_identity(key_path, identity, passphrase)
    except KeyFileError:
        if key_path.exists():  # another process created it first: use theirs
            return _keyfile.load_identity(key_path, passphrase)
        raise
    return identity


@dataclass(frozen=True, slots=True)
class NodeStatistics:
    """A snapshot of a node's counters (``Node.statistics()``).

    Attributes:
        hashname: this endpoint.
        links_up: hashnames whose link is Up.
        channels: open channel handles.
        events: mesh events seen, by type name.
        dropped: dropped packets by reason (``PacketDropped`` events).
        transports: each transport's counters (``udp``, ``tcp``, ``memory``).
        mesh: the mesh's own statistics.
    """

    hashname: Hashname
    links_up: frozenset[Hashname]
    channels: int
    events: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    transports: dict[str, dict[str, int]] = field(default_factory=dict)
    mesh: Any = None


class _LinkWaiter:
    def __init__(self) -> None:
        self.event = trio.Event()
        self.down_reason: str | None = None


class Node:
    """A running p2pcloud endpoint; open it with :func:`open_node`.

    Attributes:
        identity: this endpoint's keys.
        hashname: this endpoint's address.
        data_dir: where its key file lives (None for an in-memory test node).
        paths: the local paths peers can reach it on.
    """

    def __init__(
        self,
        identity: LocalIdentity,
        *,
        data_dir: FsPath | None,
        accept: Callable[[Hashname], bool] | None,
    ) -> None:
        """Create the node; :func:`open_node` does this and starts it."""
        self.identity = identity
        self.data_dir = data_dir
        # Default policy: any endpoint that completes a handshake may link (the handshake
        # authenticates its hashname; channels still need a registered type to open).
        # flow_control: a reliable channel's window counts what its stream has not read yet
        # (ChannelStream reports reads through _consume), so a slow reader bounds memory.
        # wall_offset: handshake `at` values are epoch seconds (telehash v3), while the
        # mesh's `now` is Trio's clock, which starts at a random offset in every process;
        # without it a restarted node could send a lower `at` and be taken for stale.
        self._accept_user = accept or _accept_all
        self.accept_filters: list[Callable[[Hashname], bool]] = []
        """More accept checks (the cloud refuses revoked endpoints); all must say True."""
        self._mesh = Mesh(
            identity,
            entropy=os.urandom,
            accept=self._accept_handshake,
            flow_control=True,
            wall_offset=time.time() - trio.current_time(),
        )
        self.hashname: Hashname = self._mesh.hashname
        self.paths: list[Path] = []
        self._udp: UdpTransport | None = None
        self._tcp: TcpTransport | None = None
        self._memory: MemoryEndpoint | None = None
        self._backlog: deque[tuple[bytes, Path]] = deque()
        self._nursery: trio.Nursery | None = None
        self._flush_wanted = trio.Event()
        self._timer_scope: trio.CancelScope | None = None
        self._channels: dict[tuple[Hashname, ChannelId], Channel] = {}
        self._handlers: dict[str, ChannelHandler] = {}
        self._acceptors: dict[str, trio.MemorySendChannel[Any]] = {}
        self._link_waiters: dict[Hashname, list[_LinkWaiter]] = {}
        self._links_up: set[Hashname] = set()
        self._link_paths: dict[Hashname, Path] = {}
        self._paths_changed = trio.Event()
        self._blocked_senders: set[ChannelStream] = set()
        self._events: Counter[str] = Counter()
        self._dropped: Counter[str] = Counter()
        self._closed = False
        self._pumping = False
        self._public_hosts: list[str] = []  # real addresses advertised on a wildcard bind
        # sub-clouds (docs/subclouds.md): open_node attaches the engine when there is a data dir
        self.replication: Replication | None = None
        self._link_listeners: list[Callable[[Hashname, bool], None]] = []
        self._link_event_listeners: list[Callable[[Hashname, str], None]] = []
        # the person's cloud (docs/cloud.md): open_node attaches it when there is a data dir
        self.cloud: Cloud | None = None
        # things and their tags (docs/things.md): open_node attaches them with a data dir
        self.things: Things | None = None

    def _accept_handshake(self, hashname: Hashname) -> bool:
        return all(check(hashname) for check in self.accept_filters) and self._accept_user(
            hashname)

    # -- properties --------------------------------------------------------------------

    @property
    def link_uri(self) -> str:
        """A ``link://`` URI with this endpoint's key and paths, for another node to link."""
        # The URI's host:port is the first path (format_link_uri's rule); on a wildcard bind
        # the paths already name a real address of this machine.
        return format_link_uri(self.identity, [p.to_json() for p in self.paths])

    @property
    def link_json(self) -> dict[str, Any]:
        """The v3 link JSON (``{"hashname","keys","paths"}``), as telehash-js takes it."""
        return {
            "hashname": self.hashname,
            "keys": self.identity.keys(),
            "paths": [p.to_json() for p in self.paths],
        }

    @property
    def links(self) -> frozenset[Hashname]:
        """Hashnames whose link is Up now."""
        return frozenset(self._links_up)

    def link_path(self, hashname: Hashname) -> Path | None:
        """The path the mesh last reported for ``hashname`` (``PathChanged``/``LinkUp``)."""
        return self._link_paths.get(hashname)

    def add_link_listener(self, fn: Callable[[Hashname, str], None]) -> None:
        """Call ``fn(hashname, what)`` on every link event, so nothing needs to poll.

        ``what`` is ``"up"`` (``LinkUp``), ``"down"`` (``LinkDown``) or ``"path"``
        (``PathChanged``); :attr:`links` and :meth:`link_path` already show the new state
        when ``fn`` runs. It runs inside the node's event dispatch: it must return quickly
        and must not raise (set a ``trio.Event`` or start a task for real work).

        Args:
            fn: the listener; kept until the node closes.
        """
        self._link_event_listeners.append(fn)

    # -- start and stop ----------------------------------------------------------------

    async def _start(
        self,
        nursery: trio.Nursery,
        *,
        bind: str,
        port: int | None,
        tcp_port: int | None,
        network: MemoryNetwork | None,
        offer_frames: bool,
        max_frame: int | None,
    ) -> None:
        self._nursery = nursery
        if network is not None:
            self._memory = network.endpoint(port or None)
            self._add_path(self._memory.path)
            nursery.start_soon(self._memory_reader, self._memory)
        else:
            if port is None and tcp_port is None:
                raise LocalProtocolError("a node needs UDP or TCP (port and tcp_port are None)")
            if port is not None:
                self._udp = await UdpTransport.bind(bind, port)
            try:
                if tcp_port is not None:
                    kwargs: dict[str, Any] = {"offer_frames": offer_frames}
                    if max_frame is not None:
                        kwargs["max_frame"] = max_frame
                    self._tcp = await TcpTransport.bind(
                        bind, tcp_port, on_frames=self._on_frames, **kwargs
                    )
                    self._tcp.on_peer_closed = self._on_tcp_peer_closed
            except BaseException:
                if self._udp is not None:
                    self._udp.close()
                raise
            if bind == "0.0.0.0":  # noqa: S104  (a wildcard bind: advertise a real address)
                self._public_hosts = await trio.to_thread.run_sync(_local_addresses)
            if self._udp is not None:
                self._add_path(self._udp.path)
                nursery.start_soon(self._udp.run, self._deliver, self._pump)
            if self._tcp is not None:
                self._add_path(self._tcp.path)
                await nursery.start(self._tcp.run, self._deliver, self._pump)
        nursery.start_soon(self._flush_loop)
        nursery.start_soon(self._timer_loop)

    def _add_path(self, path: Path) -> None:
        if path.ip == "0.0.0.0" and self._public_hosts:  # noqa: S104
            # one path per interface address: a box with a leg in two networks is
            # reachable (and its invites and link URIs work) from both
            for host in self._public_hosts:
                self._add_path(Path(path.type, ip=host, port=path.port))
            return
        self.paths.append(path)
        self._mesh.add_local_path(path)

    async def aclose(self) -> None:
        """Stop the node: close every channel handle and transport. Idempotent."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        if self.replication is not None:
            with trio.CancelScope(shield=True):
                await self.replication.aclose()  # checkpoints, while the store is open
        self._closed = True
        for channel in list(self._channels.values()):
            channel._on_closed("node closed")
        for acceptor in self._acceptors.values():
            acceptor.close()
        for waiters in self._link_waiters.values():
            for waiter in waiters:
                waiter.down_reason = "node closed"
                waiter.event.set()
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        if self._memory is not None:
            self._memory.close()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        await trio.lowlevel.checkpoint()

    # -- the shell: receive, flush, timer ----------------------------------------------

    async def _memory_reader(self, endpoint: MemoryEndpoint) -> None:
        async for data, path in endpoint:
            self._deliver(data, path)
            while True:  # the rest of the burst, then one pump
                try:
                    data, path = endpoint.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                self._deliver(data, path)
            self._pump()

    def _deliver(self, data: bytes, path: Path) -> None:
        """Feed one received packet to the mesh (transports call this; never raises)."""
        self._mesh.receive_datagram(data, path, trio.current_time())

    def _pump(self) -> None:
        """Dispatch the mesh's events, send its datagrams, wake senders, re-arm the timer."""
        if self._pumping:
            return  # called again from an event handler: the running loop picks it up
        self._pumping = True
        try:
            mesh = self._mesh
            while True:
                event = mesh.next_event()
                if event is None:
                    self._flush_now()  # sending can produce events too: look once more
                    event = mesh.next_event()
                    if event is None:
                        break
                self._dispatch(event)
        finally:
            self._pumping = False
        for stream in list(self._blocked_senders):
            stream._on_progress()
        self._rearm_timer()

    def _flush_now(self) -> None:
        backlog = self._backlog
        for data, path in self._mesh.datagrams_to_send(trio.current_time()):
            if backlog or not self._send_nowait(data, path):
                if len(backlog) >= MAX_BACKLOG:
                    self._dropped["send backlog full"] += 1
                else:
                    backlog.append((data, path))
        if backlog:
            self._flush_wanted.set()

    def _send_nowait(self, data: bytes, path: Path) -> bool:
        if self._memory is not None:
            return self._memory.send_nowait(data, path)
        if path.is_udp and self._udp is not None:
            if len(data) > MAX_UDP_PACKET:
                # A packet sized for a large-frame TCP path, after the mesh moved the link to
                # UDP (it follows the most recently seen path): it cannot be a datagram, so
                # it goes on that peer's large-frame connection instead of being lost.
                alternative = self._large_frame_path(path, len(data))
                if alternative is None:
                    self._dropped["too large for path"] += 1
                    return True
                path = alternative
            else:
                return self._udp.send_nowait(data, path)
        if path.is_tcp and self._tcp is not None:
            return self._tcp.send_nowait(data, path)
        self._dropped["no transport for path"] += 1
        return True

    def _large_frame_path(self, udp_path: Path, size: int) -> Path | None:
        """A large-frame TCP path of the peer that ``udp_path`` belongs to, if one is open."""
        if self._tcp is None:
            return None
        for hashname in self._mesh.links():
            paths = self._mesh.link_paths(hashname)
            if udp_path not in paths:
                continue
            for candidate in paths:
                limit = self._tcp.frame_limit(candidate) if candidate.is_tcp else None
                if limit is not None and size <= limit:
                    return candidate
        return None

    def _rearm_timer(self) -> None:
        if self._timer_scope is not None:
            deadline = self._mesh.get_timer()
            self._timer_scope.deadline = math.inf if deadline is None else deadline

    async def _flush_loop(self) -> None:
        # Only needed when a socket buffer was full: wait for room, keep the order.
        backlog = self._backlog
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted = trio.Event()
            while backlog:
                data, path = backlog[0]
                await self._send_datagram(data, path)
                backlog.popleft()

    async def _send_datagram(self, data: bytes, path: Path) -> None:
        if self._memory is not None:
            await self._memory.send(data, path)
        elif path.is_udp and self._udp is not None:
            await self._udp.send(data, path)
        elif path.is_tcp and self._tcp is not None:
            await self._tcp.send(data, path)
        else:
            self._dropped["no transport for path"] += 1
            await trio.lowlevel.checkpoint()

    async def _timer_loop(self) -> None:
        while True:
            with trio.CancelScope() as scope:
                self._timer_scope = scope
                self._rearm_timer()
                await trio.sleep_forever()
            self._timer_scope = None
            now = trio.current_time()
            deadline = self._mesh.get_timer()
            if deadline is not None and deadline <= now:
                self._mesh.handle_timer(now)
                self._pump()

    def _on_frames(self, path: Path, max_frame: int) -> None:
        # A TCP connection turned on large frames: let the mesh send bigger packets there
        # (0: the connection closed, back to the v3 size until a new one negotiates).
        self._mesh.set_path_mtu(path, min(max(max_frame, MAX_UDP_PACKET), MAX_PACKET))

    def _on_tcp_peer_closed(self, path: Path) -> None:
        # A peer that closes the TCP connection its link runs on has stopped or dropped us
        # (our own idle cut comes only after 15 min of silence): end the link now rather
        # than after the mesh's keepalive timeouts (minutes), so peers and dashboards see
        # it offline at once. A peer that is still alive links again with its next
        # handshake; the daemon relinks the peers whose URI it knows.
        if self._closed:
            return
        now = trio.current_time()
        for hashname in self._mesh.links():
            if self._mesh.link_path(hashname) == path:
                self._mesh.unlink(hashname, now)
        self._pump()

    # -- events ------------------------------------------------------------------------

    def _dispatch(self, event: ev.MeshEvent) -> None:
        self._events[type(event).__name__] += 1
        if isinstance(event, ev.ChannelData):
            channel = self._channels.get((event.hashname, event.cid))
            if channel is not None:
                channel._on_data(event.json, event.body)
        elif isinstance(event, ev.ChannelOpened):
            self._on_channel_opened(event)
        elif isinstance(event, ev.ChannelEnded):
            channel = self._channels.get((event.hashname, event.cid))
            if channel is not None:
                channel._on_end()
        elif isinstance(event, ev.ChannelClosed):
            channel = self._channels.pop((event.hashname, event.cid), None)
            if channel is not None:
                channel._on_closed(event.err)
        elif isinstance(event, ev.LinkUp):
            self._links_up.add(event.hashname)
            self._link_paths[event.hashname] = event.path
            self._paths_changed.set()
            self._paths_changed = trio.Event()
            for waiter in self._link_waiters.pop(event.hashname, []):
                waiter.event.set()
            for listener in self._link_listeners:
                listener(event.hashname, True)
            for notify in self._link_event_listeners:
                notify(event.hashname, "up")
        elif isinstance(event, ev.LinkDown):
            self._links_up.discard(event.hashname)
            for waiter in self._link_waiters.pop(event.hashname, []):
                waiter.down_reason = event.reason
                waiter.event.set()
            for key, channel in list(self._channels.items()):
                if key[0] == event.hashname:
                    del self._channels[key]
                    channel._on_closed("link down")
            for listener in self._link_listeners:
                listener(event.hashname, False)
            for notify in self._link_event_listeners:
                notify(event.hashname, "down")
        elif isinstance(event, ev.PathChanged):
            self._link_paths[event.hashname] = event.path
            self._paths_changed.set()
            self._paths_changed = trio.Event()
            for notify in self._link_event_listeners:
                notify(event.hashname, "path")
        elif isinstance(event, ev.PacketDropped):
            self._dropped[event.reason] += 1

    def _on_channel_opened(self, event: ev.ChannelOpened) -> None:
        key = (event.hashname, event.cid)
        stream: Channel
        if event.reliable:
            stream = ChannelStream(self, event.hashname, event.cid, event.type, event.json)
        else:
            # The open packet itself arrives next as the first ChannelData.
            stream = UnreliableChannel(self, event.hashname, event.cid, event.type)
        self._channels[key] = stream
        handler = self._handlers.get(event.type)
        acceptor = self._acceptors.get(event.type)
        if handler is not None and self._nursery is not None:
            self._nursery.start_soon(self._run_handler, handler, stream)
            return
        if acceptor is not None:
            try:
                acceptor.send_nowait(stream)
                return
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        # telehash-js answers an unknown type with {"err":"unknown type"}; so do we.
        del self._channels[key]
        self._close_channel(event.hashname, event.cid, "unknown type")

    async def _run_handler(self, handler: ChannelHandler, stream: Channel) -> None:
        # One failing handler must not stop the node: its channel is reset (the peer gets
        # an err) and the failure is logged. Errors caused by the node closing are expected.
        try:
            await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if not self._closed:
                log.info("handler of %s channel %d: channel gone", stream.type, stream.cid)
        except Exception:
            log.exception("handler of %s channel %d failed", stream.type, stream.cid)
            if isinstance(stream, ChannelStream):
                stream._reset()
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    # -- calls from channel handles ----------------------------------------------------

    def _spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn()`` in the node's nursery (background work of a channel handle)."""
        if self._nursery is not None and not self._closed:
            self._nursery.start_soon(fn)

    def _capacity(self, hashname: Hashname, cid: ChannelId) -> int:
        """Packets the channel accepts now; -1 when the channel or its link is gone."""
        try:
            return self._mesh.send_capacity(hashname, cid)
        except (LinkError, LocalProtocolError):
            return -1

    def _max_body(self, hashname: Hashname) -> int:
        return self._mesh.max_body(hashname)

    def _consume(self, hashname: Hashname, cid: ChannelId, count: int) -> None:
        """A stream read ``count`` packets: open the channel's window, send the update."""
        if self._mesh.consume(hashname, cid, count, now=trio.current_time()):
            self._pump()  # a window update is due, or a delayed ack needs the timer

    def _send(
        self,
        hashname: Hashname,
        cid: ChannelId,
        body: bytes | memoryview,
        *,
        json: Mapping[str, Any] | None = None,
        end: bool = False,
        pump: bool = True,
    ) -> bool:
        """Queue one packet; False when the channel or link is gone (nothing was sent).

        ``pump=False`` leaves the sending to the caller's next :meth:`_pump` (batching).
        """
        try:
            self._mesh.send(hashname, cid, body, json=json, end=end, now=trio.current_time())
        except LinkError:
            return False
        except LocalProtocolError:
            if self._capacity(hashname, cid) < 0:
                return False
            raise
        if pump:
            self._pump()
        return True

    def _close_channel(self, hashname: Hashname, cid: ChannelId, err: str | None) -> None:
        try:
            self._mesh.close_channel(hashname, cid, err=err, now=trio.current_time())
        except LocalProtocolError:
            return  # already gone in the mesh: nothing to tell the peer
        self._pump()

    # -- public API --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the node is closed")

    async def link(
        self, target: str | LinkInfo | Mapping[str, Any], *, via: Hashname | None = None
    ) -> Hashname:
        """Link to an endpoint and wait until the link is Up.

        The mesh gives up after 30 s without an answer (telehash v3 handshake timers);
        wrap the call in ``trio.move_on_after`` / ``trio.fail_after`` to wait less.

        Args:
            target: a link URI (``link://...``), a :class:`LinkInfo`, v3 link JSON
                (``{"keys": {"3a": b32}, "paths": [...]}``), or a bare hashname when ``via``
                is given (the router brings the keys).
            via: a router we are linked to that also knows the target: the link is made
                through it (telehash v3 ``peer``/``connect``), and moves to a direct path
                as soon as one works.

        Returns:
            The peer's hashname.

        Raises:
            BadURI: the URI or link JSON does not parse.
            LinkError: no handshake came back in time, or the link went down.
            LocalProtocolError: the target is this node itself, or keys are unusable.
            trio.ClosedResourceError: the node is closed.
        """
        self._check_open()
        paths = [Path.peer(via)] if via is not None else []
        mesh_target: LinkInfo | Hashname
        if via is not None and isinstance(target, str) and is_hashname(target):
            mesh_target = Hashname(target)
        else:
            mesh_target = _link_info(target)
        hashname = self._mesh.link(mesh_target, now=trio.current_time(), paths=paths)
        self._pump()
        await self.wait_link_up(hashname)
        return hashname

    async def wait_link_up(self, hashname: Hashname) -> None:
        """Wait until the link to ``hashname`` is Up (e.g. when the peer links to us).

        Args:
            hashname: the peer.

        Raises:
            LinkError: the link went down (the mesh timed it out, or it was closed).
            trio.ClosedResourceError: the node is closed.
        """
        self._check_open()
        if hashname in self._links_up:
            await trio.lowlevel.checkpoint()
            return
        waiter = _LinkWaiter()
        self._link_waiters.setdefault(hashname, []).append(waiter)
        try:
            await waiter.event.wait()
        finally:
            waiters = self._link_waiters.get(hashname, [])
            if waiter in waiters:
                waiters.remove(waiter)
        if waiter.down_reason is not None:
            if self._closed:
                raise trio.ClosedResourceError("the node is closed")
            raise LinkError(f"link to {hashname[:8]} went down: {waiter.down_reason}")

    def unlink(self, hashname: Hashname) -> None:
        """Drop the link to ``hashname`` now (its channels close with "link down").

        A later handshake from it is judged by the accept checks like a stranger's.

        Args:
            hashname: the peer.
        """
        if self._closed:
            return
        self._mesh.unlink(hashname, trio.current_time())
        self._pump()

    async def wait_direct_path(self, hashname: Hashname) -> Path:
        """Wait until packets to ``hashname`` take a direct path (not through a router).

        Args:
            hashname: a linked peer.

        Returns:
            The direct path.
        """
        while True:
            path = self._link_paths.get(hashname)
            if path is not None and path.is_direct:
                await trio.lowlevel.checkpoint()
                return path
            await self._paths_changed.wait()

    @overload
    async def open_channel(
        self,
        hashname: Hashname,
        type: str,
        *,
        reliable: Literal[True] = True,
        json: Mapping[str, Any] | None = None,
        body: bytes = b"",
    ) -> ChannelStream: ...

    @overload
    async def open_channel(
        self,
        hashname: Hashname,
        type: str,
        *,
        reliable: Literal[False],
        json: Mapping[str, Any] | None = None,
        body: bytes = b"",
    ) -> UnreliableChannel: ...

    async def open_channel(
        self,
        hashname: Hashname,
        type: str,
        *,
        reliable: bool = True,
        json: Mapping[str, Any] | None = None,
        body: bytes = b"",
    ) -> ChannelStream | UnreliableChannel:
        """Open a channel to a linked peer.

        Args:
            hashname: the peer (link to it first).
            type: the channel type the peer serves.
            reliable: a reliable stream (default) or an unreliable packet channel.
            json: extra fields for the open packet's head.
            body: the open packet's body.

        Returns:
            A :class:`ChannelStream` (reliable) or :class:`UnreliableChannel`.

        Raises:
            LinkError: the link to ``hashname`` is not Up.
            LocalProtocolError: a bad type or head.
            trio.ClosedResourceError: the node is closed.
        """
        self._check_open()
        if hashname not in self._links_up:
            raise LinkError(f"no link to {hashname[:8]}; call node.link() first")
        cid = self._mesh.open_channel(
            hashname, type, reliable=reliable, json=json, body=body, now=trio.current_time()
        )
        channel: Channel
        if reliable:
            channel = ChannelStream(self, hashname, cid, type, dict(json or {}))
        else:
            channel = UnreliableChannel(self, hashname, cid, type)
        self._channels[(hashname, cid)] = channel
        self._pump()
        await trio.lowlevel.checkpoint()
        return channel

    def serve_channel(self, type: str, handler: ChannelHandler) -> None:
        """Run ``handler(stream)`` in the node for every incoming reliable channel of ``type``.

        The stream is closed when the handler returns.

        Args:
            type: the channel type.
            handler: an async function taking the :class:`ChannelStream`.

        Raises:
            LocalProtocolError: a handler or acceptor for ``type`` exists already.
        """
        if type in self._handlers or type in self._acceptors:
            raise LocalProtocolError(f"channel type {type!r} is already served")
        self._handlers[type] = handler
        self._register_type(type)

    @asynccontextmanager
    async def accept_channels(
        self, type: str
    ) -> AsyncIterator[trio.MemoryReceiveChannel[Any]]:
        """Receive incoming reliable channels of ``type`` while the block runs.

        Args:
            type: the channel type.

        Yields:
            A receive channel of :class:`ChannelStream` objects.

        Raises:
            LocalProtocolError: a handler or acceptor for ``type`` exists already.
        """
        if type in self._handlers or type in self._acceptors:
            raise LocalProtocolError(f"channel type {type!r} is already served")
        send, receive = trio.open_memory_channel[Any](MAX_ACCEPT_BACKLOG)
        self._acceptors[type] = send
        self._register_type(type)
        try:
            async with receive:
                yield receive
        finally:
            self._acceptors.pop(type, None)
            send.close()

    def _register_type(self, type: str) -> None:
        self._mesh.handle_types(type)

    # -- sub-clouds (docs/subclouds.md) ---------------------------------------------------

    def _replication(self) -> Replication:
        if self.replication is None:
            raise LocalProtocolError("sub-clouds need a node with a data dir (open_node(path))")
        return self.replication

    async def create_subcloud(self, name: str, kind: str = "device") -> SubCloud:
        """Create a sub-cloud owned by this node.

        Args:
            name: its name (1..200 characters).
            kind: ``"device"``, ``"thing"`` or ``"cloud"``.

        Returns:
            The new :class:`SubCloud` (durable when this returns).

        Raises:
            LocalProtocolError: a bad name or kind, or a node without a data dir.
        """
        return await self._replication().create_subcloud(name, kind)

    def subcloud(self, id_or_name: str | bytes) -> SubCloud:
        """A sub-cloud this node holds, by id (16 bytes or base32) or name.

        Raises:
            UnknownSubCloud: no such sub-cloud (or a name several share).
        """
        return self._replication().find(id_or_name)

    def subclouds(self) -> list[SubCloud]:
        """Every sub-cloud this node holds."""
        return list(self._replication().subclouds.values())

    def statistics(self) -> NodeStatistics:
        """Return a snapshot of the node's counters."""
        transports: dict[str, dict[str, int]] = {}
        if self._udp is not None:
            transports["udp"] = dict(self._udp.counts)
        if self._tcp is not None:
            transports["tcp"] = dict(self._tcp.counts)
        return NodeStatistics(
            hashname=self.hashname,
            links_up=frozenset(self._links_up),
            channels=len(self._channels),
            events=dict(self._events),
            dropped=dict(self._dropped),
            transports=transports,
            mesh=self._mesh.statistics(),
        )


def _accept_all(hashname: Hashname) -> bool:
    return True


def _guess_host() -> str:
    """An address of this machine for link URIs when bound to 0.0.0.0 (no traffic sent)."""
    try:
        return _stdlib_socket.gethostbyname(_stdlib_socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _local_addresses() -> list[str]:
    """The machine's IPv4 interface addresses (not loopback) for a wildcard bind.

    The host name's address (:func:`_guess_host`) is only the fallback: /etc/hosts often
    names a loopback or stale address, and inside a network namespace it names none of ours.
    """
    try:
        import ifaddr  # zeroconf's own dependency; imported here only when needed

        found = [str(ip.ip) for adapter in ifaddr.get_adapters() for ip in adapter.ips
                 if ip.is_IPv4 and not str(ip.ip).startswith("127.")]
    except (ImportError, OSError):
        found = []
    return list(dict.fromkeys(found))[:MAX_LOCAL_ADDRESSES] or [_guess_host()]


def _link_info(target: str | LinkInfo | Mapping[str, Any]) -> LinkInfo:
    if isinstance(target, LinkInfo):
        return target
    if isinstance(target, str):
        return parse_link_uri(target)
    keys_json = target.get("keys")
    if not isinstance(keys_json, Mapping) or not keys_json:
        raise BadURI("link JSON needs a non-empty 'keys' object")
    try:
        keys = {str(csid): b32decode(str(key)) for csid, key in keys_json.items()}
    except MalformedPacket as exc:
        raise BadURI(f"link JSON key is not base32: {exc}") from exc
    paths = target.get("paths") or []
    if not isinstance(paths, list):
        raise BadURI("link JSON 'paths' must be a list")
    from p2pcloud._crypto import hashname_from_keys

    try:
        hashname = hashname_from_keys(keys)
    except (MalformedPacket, ValueError) as exc:
        raise BadURI(f"link JSON keys do not make a hashname: {exc}") from exc
    return LinkInfo(hashname=hashname, keys=keys, paths=[dict(p) for p in paths])


@asynccontextmanager
async def open_node(
    path: str | os.PathLike[str] | None = None,
    *,
    port: int | None = 0,
    tcp_port: int | None = 0,
    bind: str = "127.0.0.1",
    accept: Callable[[Hashname], bool] | None = None,
    passphrase: str | None = None,
    identity: LocalIdentity | None = None,
    network: MemoryNetwork | None = None,
    large_frames: bool = True,
    max_frame: int | None = None,
    discovery: bool = False,
    discovery_interfaces: list[str] | None = None,
) -> AsyncIterator[Node]:
    """Start a node and stop it when the block ends.

    Args:
        path: the data dir (its key file is created on first start); None with
            ``identity`` given keeps nothing on disk; None without it uses
            :func:`default_data_dir`.
        port: the UDP port (0: any free port; None: no UDP).
        tcp_port: the TCP port (0: any free port; None: no TCP).
        bind: the local address to bind (``"127.0.0.1"`` by default, ``"0.0.0.0"`` for all).
        accept: decides whether an unknown endpoint that sends us a handshake may link;
            None accepts every endpoint (its hashname is authenticated by the handshake).
        passphrase: the key file's passphrase.
        identity: use these keys instead of the key file.
        network: run on an in-memory network (tests) instead of sockets.
        large_frames: negotiate large frames on TCP (False: plain v3 chunking).
        max_frame: the largest TCP frame offered (default: ``_framing.DEFAULT_MAX_FRAME``).
        discovery: advertise and browse on the LAN with mDNS (``_node/discovery.py``) so
            the cloud's members find each other (needs UDP and a data dir); a short-code
            pairing turns it on when needed.
        discovery_interfaces: the IPv4 addresses mDNS uses (None: every interface;
            ``["127.0.0.1"]`` in tests).

    Yields:
        The running :class:`Node`.

    Raises:
        KeyFileError: the key file cannot be read or created.
        WrongPassphrase: the key file is sealed and the passphrase is wrong.
        TransportError: a port cannot be bound (in use, not a local address).
    """
    data_dir: FsPath | None = None
    if identity is None:
        data_dir = FsPath(path) if path is not None else default_data_dir()
        identity = await trio.to_thread.run_sync(load_or_create_identity, data_dir, passphrase)
    elif path is not None:
        data_dir = FsPath(path)
    node = Node(identity, data_dir=data_dir, accept=accept)
    store = None
    try:
        async with trio.open_nursery() as nursery:
            await node._start(
                nursery,
                bind=bind,
                port=port,
                tcp_port=tcp_port,
                network=network,
                offer_frames=large_frames,
                max_frame=max_frame,
            )
            if data_dir is not None:  # sub-clouds: the store and the replication engine
                store = await open_replication(node, nursery)
                # the person's cloud: membership, pairing, re-linking (docs/cloud.md)
                node.cloud = await open_cloud(node, nursery, discovery=discovery,
                                              discovery_interfaces=discovery_interfaces)
                # things and their tags (docs/things.md "Things on a node")
                node.things = await open_things(node, nursery)
            try:
                yield node
            finally:
                with trio.CancelScope(shield=True):
                    await node.aclose()
    except BaseExceptionGroup as group:
        # The nursery is an implementation detail: an error from the ``async with`` body
        # (or from starting) leaves as itself, not wrapped in a group.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from group.exceptions[0].__cause__
        raise
    finally:
        if store is not None:
            store.close()

