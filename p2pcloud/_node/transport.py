"""Trio transports: UDP (one socket per node) and TCP (v3 chunking or large frames).

Theory of operation
-------------------
A transport moves whole packets between the node and the network and knows nothing of the
protocol. Every packet read is handed to the node's inbox as ``(packet, Path)``; the node
feeds it to the mesh. Every packet the mesh wants sent comes back with ``send(packet, path)``.
Both behave like datagrams: a send may be dropped (full buffers, a refused connection) and the
reliable channels above retransmit. Only programming mistakes raise.

* :class:`UdpTransport` binds one UDP socket (telehash v3 ``transports/udp.md``: one packet per
  datagram, port 0 by default). It never sets ``SO_REUSEADDR``/``SO_REUSEPORT``: two nodes on
  one machine must never share a port (telehash-js does, and loses packets to it).
* :class:`TcpTransport` listens on one TCP port and keeps one connection per remote address,
  keyed by its ``tcp4`` path: the target for connections we open, the peer's address for
  connections we accept (the mesh answers to the path a packet came from, so replies reuse the
  same connection). Each connection's framing is a pure :class:`p2pcloud._framing.StreamFraming`;
  when it turns on large frames the transport calls ``on_frames(path, max_frame)`` so the node
  can raise the mesh's MTU for that path (``Mesh.set_path_mtu``).
"""

from __future__ import annotations

import contextlib
import errno
import socket as _stdlib_socket
from collections import Counter
from collections.abc import Callable

import trio

from p2pcloud._framing import DEFAULT_MAX_FRAME, Framing, StreamFraming
from p2pcloud.errors import LocalProtocolError, MalformedPacket
from p2pcloud.proto.path import Path

__all__ = [
    "HELLO_WAIT",
    "MAX_TCP_BACKLOG",
    "TcpTransport",
    "TransportError",
    "UdpTransport",
]

MAX_DATAGRAM = 65_535  # the largest UDP payload; we read whole datagrams and let the mesh judge
UDP_SOCKET_BUFFER = 4 * 1024 * 1024  # ask the kernel for room for bursts of a channel window
HELLO_WAIT = 2.0  # seconds a connecting side waits for the large-frame answer before it stays
# in v3 chunking; a p2pcloud listener answers at once, so this only delays plain v3 peers
TCP_READ = 256 * 1024  # bytes per read: several large frames per system call
MAX_TCP_BACKLOG = 16 * 1024 * 1024  # bytes queued on one connection before sends are dropped,
# like a full socket buffer; well above a reliable window of large frames (50 x 64 KiB)
CONNECT_TIMEOUT = 10.0  # seconds before an outgoing connection attempt is given up

Inbox = trio.MemorySendChannel[tuple[bytes, Path]]


class TransportError(OSError):
    """Raised when a transport cannot bind its socket (port in use, bad address)."""


def _bind_error(kind: str, bind: str, port: int, exc: OSError) -> TransportError:
    if exc.errno == errno.EADDRINUSE:
        why = f"{kind} port {port} on {bind} is already in use; choose another port or 0"
    elif exc.errno in (errno.EADDRNOTAVAIL, errno.EINVAL):
        why = f"cannot bind {kind} to {bind}:{port}: not an address of this machine"
    else:
        why = f"cannot bind {kind} to {bind}:{port}: {exc.strerror or exc}"
    return TransportError(exc.errno or 0, why)


class UdpTransport:
    """One UDP socket: packets in to the node's inbox, packets out with :meth:`send`.

    Attributes:
        path: the bound local address as a ``udp4`` path.
        counts: ``received``, ``sent``, ``send_errors``, ``receive_errors``.
    """

    def __init__(self, sock: trio.socket.SocketType, path: Path) -> None:
        """Wrap a bound socket; use :meth:`bind`."""
        self._sock = sock
        self.path = path
        self.counts: Counter[str] = Counter()
        self._paths: dict[tuple[str, int], Path] = {}

    @classmethod
    async def bind(cls, bind: str = "127.0.0.1", port: int = 0) -> UdpTransport:
        """Bind a UDP socket.

        Args:
            bind: the local IPv4 address (``127.0.0.1`` or ``0.0.0.0``).
            port: the port; 0 lets the system choose.

        Returns:
            The transport.

        Raises:
            TransportError: the address cannot be bound (in use, not local).
        """
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        try:
            # Room for bursts; no SO_REUSEADDR/SO_REUSEPORT on purpose (module docstring).
            for opt in (_stdlib_socket.SO_RCVBUF, _stdlib_socket.SO_SNDBUF):
                sock.setsockopt(_stdlib_socket.SOL_SOCKET, opt, UDP_SOCKET_BUFFER)
            await sock.bind((bind, port))
        except OSError as exc:
            sock.close()
            raise _bind_error("UDP", bind, port, exc) from exc
        ip, real_port = sock.getsockname()[:2]
        return cls(sock, Path.udp4(ip, real_port))

    async def send(self, data: bytes, path: Path) -> None:
        """Send one datagram; failures are counted, never raised (UDP promises nothing).

        Args:
            data: the packet.
            path: a ``udp4`` path.
        """
        assert path.ip is not None and path.port is not None
        try:
            await self._sock.sendto(data, (path.ip, path.port))
        except OSError:
            self.counts["send_errors"] += 1
        else:
            self.counts["sent"] += 1

    async def run(self, inbox: Inbox) -> None:
        """Read datagrams forever and hand them to ``inbox``.

        Args:
            inbox: where ``(packet, source path)`` pairs go.
        """
        paths = self._paths
        while True:
            try:
                data, addr = await self._sock.recvfrom(MAX_DATAGRAM)
            except OSError:
                # Linux reports an ICMP error for an earlier send here; the socket is fine.
                self.counts["receive_errors"] += 1
                continue
            path = paths.get(addr)
            if path is None:
                if len(paths) > 4096:  # bound the cache of source paths
                    paths.clear()
                path = paths[addr] = Path.udp4(addr[0], addr[1])
            self.counts["received"] += 1
            await inbox.send((data, path))

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()


class _Connection:
    """One TCP connection and its framing."""

    def __init__(self, path: Path, framing: StreamFraming) -> None:
        self.path = path
        self.framing = framing
        self.stream: trio.SocketStream | None = None
        self.wake = trio.Event()
        self.cancel_scope = trio.CancelScope()
        self.frames_reported = False

    def kick(self) -> None:
        self.wake.set()


class TcpTransport:
    """A TCP listener plus one connection per remote path.

    Attributes:
        path: the listening address as a ``tcp4`` path.
        counts: ``received``, ``sent``, ``connects``, ``accepts``, ``connect_errors``,
            ``dropped_backlog``, ``malformed``, ``closed``, ``frames`` (large-frame connections).
    """

    def __init__(
        self,
        listener: trio.SocketListener,
        path: Path,
        *,
        offer_frames: bool = True,
        max_frame: int = DEFAULT_MAX_FRAME,
        on_frames: Callable[[Path, int], None] | None = None,
    ) -> None:
        """Wrap a bound listener; use :meth:`bind`."""
        self._listener = listener
        self.path = path
        self._offer = offer_frames
        self._max_frame = max_frame
        self._on_frames = on_frames
        self._connections: dict[Path, _Connection] = {}
        self._nursery: trio.Nursery | None = None
        self._inbox: Inbox | None = None
        self.counts: Counter[str] = Counter()

    @classmethod
    async def bind(
        cls,
        bind: str = "127.0.0.1",
        port: int = 0,
        *,
        offer_frames: bool = True,
        max_frame: int = DEFAULT_MAX_FRAME,
        on_frames: Callable[[Path, int], None] | None = None,
    ) -> TcpTransport:
        """Bind the TCP listener.

        Args:
            bind: the local IPv4 address.
            port: the port; 0 lets the system choose.
            offer_frames: negotiate large frames (False: plain v3 chunking only).
            max_frame: the largest frame offered and accepted.
            on_frames: called with ``(path, max_frame)`` when a connection turns on frames.

        Returns:
            The transport.

        Raises:
            TransportError: the address cannot be bound.
        """
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        try:
            # A TCP listener may reuse a port in TIME_WAIT (a restarted daemon keeps its port);
            # unlike UDP this never lets two live listeners share it.
            sock.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_REUSEADDR, 1)
            await sock.bind((bind, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise _bind_error("TCP", bind, port, exc) from exc
        ip, real_port = sock.getsockname()[:2]
        return cls(
            trio.SocketListener(sock),
            Path.tcp4(ip, real_port),
            offer_frames=offer_frames,
            max_frame=max_frame,
            on_frames=on_frames,
        )

    def connection_framing(self, path: Path) -> Framing | None:
        """The framing state of the connection to ``path``, or None if there is none."""
        conn = self._connections.get(path)
        return conn.framing.state if conn else None

    @property
    def connections(self) -> int:
        """Open (or opening) connections."""
        return len(self._connections)

    async def run(self, inbox: Inbox) -> None:
        """Accept connections and run every connection's tasks until cancelled.

        Args:
            inbox: where ``(packet, source path)`` pairs go.
        """
        self._inbox = inbox
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                while True:
                    try:
                        stream = await self._listener.accept()
                    except OSError:
                        self.counts["accept_errors"] += 1
                        await trio.sleep(0.1)  # e.g. out of file descriptors: do not spin
                        continue
                    ip, port = stream.socket.getpeername()[:2]
                    path = Path.tcp4(ip, port)
                    conn = _Connection(path, StreamFraming(initiator=False,
                                                           offer_frames=self._offer,
                                                           max_frame=self._max_frame))
                    conn.stream = stream
                    old = self._connections.get(path)
                    if old is not None:
                        old.cancel_scope.cancel()
                    self._connections[path] = conn
                    self.counts["accepts"] += 1
                    nursery.start_soon(self._serve, conn)
            finally:
                self._nursery = None

    async def send(self, data: bytes, path: Path) -> None:
        """Send one packet on the connection to ``path``, opening it if needed.

        Failures (refused connection, full backlog) drop the packet and are counted.

        Args:
            data: the packet.
            path: a ``tcp4`` path.
        """
        conn = self._connections.get(path)
        if conn is None:
            if self._nursery is None:
                self.counts["dropped_not_running"] += 1
                return
            conn = _Connection(path, StreamFraming(initiator=True, offer_frames=self._offer,
                                                   max_frame=self._max_frame))
            self._connections[path] = conn
            self._nursery.start_soon(self._serve, conn)
        framing = conn.framing
        if framing.output_buffered > MAX_TCP_BACKLOG or len(data) > framing.packet_limit:
            self.counts["dropped_backlog"] += 1
        else:
            try:
                framing.send_packet(data)
            except LocalProtocolError:
                self.counts["dropped_backlog"] += 1
            else:
                self.counts["sent"] += 1
                conn.kick()
        await trio.lowlevel.checkpoint()

    async def _serve(self, conn: _Connection) -> None:
        try:
            with conn.cancel_scope:
                if conn.stream is None:
                    assert conn.path.ip is not None and conn.path.port is not None
                    with trio.move_on_after(CONNECT_TIMEOUT), contextlib.suppress(OSError):
                        conn.stream = await trio.open_tcp_stream(conn.path.ip, conn.path.port)
                    if conn.stream is None:
                        self.counts["connect_errors"] += 1
                        return
                    self.counts["connects"] += 1
                async with conn.stream, trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, conn)
                    if conn.framing.state is Framing.NEGOTIATING:
                        nursery.start_soon(self._negotiation_timeout, conn)
                    await self._reader(conn)
                    nursery.cancel_scope.cancel()
        finally:
            self.counts["closed"] += 1
            if self._connections.get(conn.path) is conn:
                del self._connections[conn.path]

    async def _negotiation_timeout(self, conn: _Connection) -> None:
        await trio.sleep(HELLO_WAIT)
        if conn.framing.state is Framing.NEGOTIATING:
            conn.framing.give_up()
            conn.kick()

    async def _reader(self, conn: _Connection) -> None:
        assert conn.stream is not None and self._inbox is not None
        framing = conn.framing
        while True:
            try:
                data = await conn.stream.receive_some(TCP_READ)
            except (trio.BrokenResourceError, OSError):
                return
            if not data:
                return
            framing.receive_data(data)
            try:
                while True:
                    packet = framing.next_packet()
                    if framing.state is Framing.FRAMES and not conn.frames_reported:
                        # Tell the node before it handles any packet read in frames.
                        self._report_frames(conn)
                    if packet is None:
                        break
                    self.counts["received"] += 1
                    await self._inbox.send((packet, conn.path))
            except MalformedPacket:
                self.counts["malformed"] += 1
                return
            if framing.output_buffered:
                conn.kick()  # an answer or released packets are waiting

    def _report_frames(self, conn: _Connection) -> None:
        conn.frames_reported = True
        self.counts["frames"] += 1
        if self._on_frames is not None and conn.framing.max_frame is not None:
            self._on_frames(conn.path, conn.framing.max_frame)

    async def _writer(self, conn: _Connection) -> None:
        assert conn.stream is not None
        while True:
            await conn.wake.wait()
            conn.wake = trio.Event()
            data = conn.framing.data_to_send()
            if data:
                try:
                    await conn.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    conn.cancel_scope.cancel()
                    return

    def close(self) -> None:
        """Stop accepting; open connections end with the transport's task."""
        for conn in list(self._connections.values()):
            conn.cancel_scope.cancel()
