"""Trio transports: UDP (one socket per node) and TCP (v3 chunking or large frames).

Theory of operation
-------------------
A transport moves whole packets between the node and the network and knows nothing of the
protocol. Every packet read is handed to the node with ``deliver(packet, path)`` (a plain
function call: the node feeds it to the mesh at once), and after each burst of reads the
transport calls ``pump()`` so the node dispatches events and sends the answers once per burst,
not once per packet. Packets go out with ``send_nowait(packet, path)`` (False only when the
socket's buffer is full; the node then waits with ``await send(packet, path)``). Both directions
behave like datagrams: a send may be dropped (full buffers, a refused connection) and the
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

Zero-copy receive: a TCP connection reads with ``recv_into`` straight into its framing's
receive buffer, and in large-frame mode each frame goes to ``deliver`` as a ``memoryview`` of
that buffer (typed as bytes for the node). The buffer is reused by the connection's next read,
so ``deliver`` must be done with the packet when it returns. The node's is: the mesh
processes a packet synchronously and what it keeps is new bytes (``decloak`` returns the
plain packet as its own bytes, or decrypts it from the view; the channel body is decrypted
into new bytes), so each frame is copied at most once, by the mesh, and never by the
transport.
"""

from __future__ import annotations

import errno
import socket as _stdlib_socket
from collections import Counter
from collections.abc import Callable
from typing import cast

import trio

from p2pcloud._framing import DEFAULT_MAX_FRAME, Framing, StreamFraming
from p2pcloud._wire import decloak
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
# like a full socket buffer; above what a reliable channel queues (2 windows x 50 x 128 KiB)
MAX_IOV = 512  # buffers per sendmsg call, below Linux's IOV_MAX of 1024
MAX_TCP_CONNECTIONS = 256  # open connections (in and out); more accepts are closed at once,
# so a flood of connections cannot exhaust file descriptors (a personal cloud has a few peers)
TCP_IDLE_TIMEOUT = 900.0  # seconds without a byte in either direction before a connection is
# closed: three times the mesh's 5-minute TCP keepalive, so only dead links are cut
CONNECT_TIMEOUT = 10.0  # seconds before an outgoing connection attempt is given up

MAX_BATCH = 256  # datagrams read in one burst before the node pumps and others get a turn

Deliver = Callable[[bytes, Path], None]
Pump = Callable[[], None]


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
    """One UDP socket: packets in to the node with ``deliver``, out with :meth:`send_nowait`.

    The socket is used directly in non-blocking mode: a burst of datagrams is read (or sent)
    with plain system calls, and Trio is asked to wait only when the socket would block.

    Attributes:
        path: the bound local address as a ``udp4`` path.
        counts: ``received``, ``sent``, ``send_errors``, ``receive_errors``, ``send_waits``.
    """

    def __init__(self, sock: _stdlib_socket.socket, path: Path) -> None:
        """Wrap a bound non-blocking socket; use :meth:`bind`."""
        self._sock = sock
        self.path = path
        self.counts: Counter[str] = Counter()
        self._paths: dict[tuple[str, int], Path] = {}
        self._closed = False

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
        sock = _stdlib_socket.socket(_stdlib_socket.AF_INET, _stdlib_socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            # Room for bursts; no SO_REUSEADDR/SO_REUSEPORT on purpose (module docstring).
            for opt in (_stdlib_socket.SO_RCVBUF, _stdlib_socket.SO_SNDBUF):
                sock.setsockopt(_stdlib_socket.SOL_SOCKET, opt, UDP_SOCKET_BUFFER)
            sock.bind((bind, port))
        except OSError as exc:
            sock.close()
            raise _bind_error("UDP", bind, port, exc) from exc
        await trio.lowlevel.checkpoint()
        ip, real_port = sock.getsockname()[:2]
        return cls(sock, Path.udp4(ip, real_port))

    def send_nowait(self, data: bytes, path: Path) -> bool:
        """Send one datagram if the socket has room; errors are counted, never raised.

        Args:
            data: the packet.
            path: a ``udp4`` path.

        Returns:
            False only when the socket's send buffer is full (try :meth:`send`).
        """
        if self._closed:
            return True  # a closed node drops what is left, as a dead socket would
        try:
            self._sock.sendto(data, (path.ip, path.port))
        except BlockingIOError:
            return False
        except OSError:
            self.counts["send_errors"] += 1
        else:
            self.counts["sent"] += 1
        return True

    async def send(self, data: bytes, path: Path) -> None:
        """Send one datagram, waiting for room in the socket's buffer if needed.

        Args:
            data: the packet.
            path: a ``udp4`` path.
        """
        while not self.send_nowait(data, path):
            self.counts["send_waits"] += 1
            try:
                await trio.lowlevel.wait_writable(self._sock)
            except trio.ClosedResourceError:
                return
        await trio.lowlevel.checkpoint()

    async def run(self, deliver: Deliver, pump: Pump) -> None:
        """Read datagrams until closed, handing each to ``deliver`` and pumping per burst.

        Args:
            deliver: called with ``(packet, source path)`` for every datagram.
            pump: called after each burst.
        """
        paths = self._paths
        sock = self._sock
        while True:
            try:
                await trio.lowlevel.wait_readable(sock)
            except (trio.ClosedResourceError, OSError):
                return  # close() was called: the node is stopping
            got = 0
            while got < MAX_BATCH:
                try:
                    data, addr = sock.recvfrom(MAX_DATAGRAM)
                except BlockingIOError:
                    break
                except OSError:
                    if self._closed:
                        return
                    # Linux reports an ICMP error for an earlier send here; the socket is fine.
                    self.counts["receive_errors"] += 1
                    continue
                got += 1
                path = paths.get(addr)
                if path is None:
                    if len(paths) > 4096:  # bound the cache of source paths
                        paths.clear()
                    path = paths[addr] = Path.udp4(addr[0], addr[1])
                deliver(data, path)
            self.counts["received"] += got
            if got:
                pump()
            if got >= MAX_BATCH:
                await trio.lowlevel.checkpoint()  # let other tasks run between full bursts

    def close(self) -> None:
        """Close the socket (a task waiting on it wakes up and returns)."""
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()


class _Connection:
    """One TCP connection: its non-blocking socket, its framing, its unsent bytes."""

    def __init__(self, path: Path, framing: StreamFraming) -> None:
        self.path = path
        self.framing = framing
        self.sock: _stdlib_socket.socket | None = None
        self.pending: list[bytes | memoryview] = []  # written partly; the writer finishes
        self.wake = trio.Event()
        self.cancel_scope = trio.CancelScope()
        self.frames_reported = False
        self.broken = False
        self.peer_closed = False  # the peer ended it (EOF or reset), not us
        self.last_active = trio.current_time()

    def kick(self) -> None:
        self.wake.set()

    def write_now(self) -> bool:
        """Write what the socket takes now, without waiting; True when nothing is left.

        Frame headers and large packets go out in one gathering write (``sendmsg``), uncopied.
        """
        sock = self.sock
        if sock is None or self.broken:
            return False
        pending = self.pending
        if self.framing.output_buffered:
            pending.extend(self.framing.buffers_to_send())
        while pending:
            try:
                if _HAVE_SENDMSG:
                    sent = sock.sendmsg(pending[:MAX_IOV])
                else:  # pragma: no cover  (Windows has no sendmsg)
                    sent = sock.send(b"".join(pending[:MAX_IOV]))
            except BlockingIOError:
                return False
            except OSError:
                self.broken = True
                self.cancel_scope.cancel()
                return False
            done = 0
            while done < len(pending) and sent >= len(pending[done]):
                sent -= len(pending[done])
                done += 1
            del pending[:done]
            if sent:
                pending[0] = memoryview(pending[0])[sent:]
        return True

    @property
    def unsent(self) -> int:
        return self.framing.output_buffered + sum(len(b) for b in self.pending)


_HAVE_SENDMSG = hasattr(_stdlib_socket.socket, "sendmsg")


class TcpTransport:
    """A TCP listener plus one connection per remote path.

    Sockets are used directly in non-blocking mode: a packet is written at once when the
    socket takes it (the common case), and a connection's writer task only waits when the
    kernel buffer is full; each connection's reader waits for data and decodes every packet
    of a read before the node pumps.

    Attributes:
        path: the listening address as a ``tcp4`` path.
        counts: ``received``, ``sent``, ``connects``, ``accepts``, ``connect_errors``,
            ``dropped_backlog``, ``malformed``, ``closed``, ``closed_idle``,
            ``closed_by_peer``, ``refused_too_many``, ``frames`` (large-frame connections).
        on_peer_closed: called with a connection's path when the peer ended it (EOF or
            reset) while the transport runs; the node ends a link that ran on it.
    """

    def __init__(
        self,
        listener: _stdlib_socket.socket,
        path: Path,
        *,
        offer_frames: bool = True,
        max_frame: int = DEFAULT_MAX_FRAME,
        on_frames: Callable[[Path, int], None] | None = None,
    ) -> None:
        """Wrap a bound, listening, non-blocking socket; use :meth:`bind`."""
        self._listener = listener
        self.path = path
        self._offer = offer_frames
        self._max_frame = max_frame
        self._on_frames = on_frames
        self._connections: dict[Path, _Connection] = {}
        self._nursery: trio.Nursery | None = None
        self._deliver: Deliver | None = None
        self._pump: Pump | None = None
        self._closed = False
        self.counts: Counter[str] = Counter()
        self.on_peer_closed: Callable[[Path], None] | None = None

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
            on_frames: called with ``(path, max_frame)`` when a connection turns on frames,
                and with ``(path, 0)`` when such a connection closes.

        Returns:
            The transport.

        Raises:
            TransportError: the address cannot be bound.
        """
        sock = _stdlib_socket.socket(_stdlib_socket.AF_INET, _stdlib_socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            # A TCP listener may reuse a port in TIME_WAIT (a restarted daemon keeps its port);
            # unlike UDP this never lets two live listeners share it.
            sock.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_REUSEADDR, 1)
            sock.bind((bind, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise _bind_error("TCP", bind, port, exc) from exc
        await trio.lowlevel.checkpoint()
        ip, real_port = sock.getsockname()[:2]
        return cls(
            sock,
            Path.tcp4(ip, real_port),
            offer_frames=offer_frames,
            max_frame=max_frame,
            on_frames=on_frames,
        )

    def connection_framing(self, path: Path) -> Framing | None:
        """The framing state of the connection to ``path``, or None if there is none."""
        conn = self._connections.get(path)
        return conn.framing.state if conn else None

    def frame_limit(self, path: Path) -> int | None:
        """The negotiated frame size of the connection to ``path`` (None: not in frames)."""
        conn = self._connections.get(path)
        if conn is None or conn.framing.state is not Framing.FRAMES:
            return None
        return conn.framing.max_frame

    @property
    def connections(self) -> int:
        """Open (or opening) connections."""
        return len(self._connections)

    async def run(
        self,
        deliver: Deliver,
        pump: Pump,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections and run every connection's tasks until cancelled.

        Start it with ``await nursery.start(...)``: sends work once it has started.

        Args:
            deliver: called with ``(packet, source path)`` for every packet read.
            pump: called after the packets of each read.
            task_status: Trio's start protocol.
        """
        self._deliver = deliver
        self._pump = pump
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    try:
                        await trio.lowlevel.wait_readable(self._listener)
                        sock, addr = self._listener.accept()
                    except BlockingIOError:
                        continue
                    except (trio.ClosedResourceError, ValueError):
                        return  # close() was called: the node is stopping
                    except OSError:
                        if self._closed:
                            return
                        self.counts["accept_errors"] += 1
                        await trio.sleep(0.1)  # e.g. out of file descriptors: do not spin
                        continue
                    if len(self._connections) >= MAX_TCP_CONNECTIONS:
                        self.counts["refused_too_many"] += 1
                        sock.close()
                        continue
                    self._configure(sock)
                    path = Path.tcp4(addr[0], addr[1])
                    conn = _Connection(path, StreamFraming(initiator=False,
                                                           offer_frames=self._offer,
                                                           max_frame=self._max_frame))
                    conn.sock = sock
                    old = self._connections.get(path)
                    if old is not None:
                        old.cancel_scope.cancel()
                    self._connections[path] = conn
                    self.counts["accepts"] += 1
                    nursery.start_soon(self._serve, conn)
            finally:
                self._nursery = None

    @staticmethod
    def _configure(sock: _stdlib_socket.socket) -> None:
        sock.setblocking(False)
        # Packets are whole messages already: send each at once (no Nagle delay).
        sock.setsockopt(_stdlib_socket.IPPROTO_TCP, _stdlib_socket.TCP_NODELAY, 1)

    async def send(self, data: bytes, path: Path) -> None:
        """Send one packet (see :meth:`send_nowait`), then checkpoint.

        Args:
            data: the packet.
            path: a ``tcp4`` path.
        """
        self.send_nowait(data, path)
        await trio.lowlevel.checkpoint()

    def send_nowait(self, data: bytes, path: Path) -> bool:
        """Queue one packet on the connection to ``path``, opening it if needed.

        Failures (refused connection, full backlog) drop the packet and are counted, as a
        full socket buffer drops a UDP datagram.

        Args:
            data: the packet.
            path: a ``tcp4`` path.

        Returns:
            True (the connection's writer task does any waiting).
        """
        conn = self._connections.get(path)
        if conn is None:
            if self._nursery is None:
                self.counts["dropped_not_running"] += 1
                return True
            if len(self._connections) >= MAX_TCP_CONNECTIONS:
                self.counts["dropped_too_many"] += 1
                return True
            conn = _Connection(path, StreamFraming(initiator=True, offer_frames=self._offer,
                                                   max_frame=self._max_frame))
            self._connections[path] = conn
            self._nursery.start_soon(self._serve, conn)
        framing = conn.framing
        if framing.state is not Framing.FRAMES and data[:1] != b"\x00":
            # A v3-chunked connection may lead to telehash-js, whose tcp4 chunk decoder parses
            # every packet as a LOB and cannot decloak: send it the plain packet (receivers
            # accept both; see docs/protocol/transports.md).
            try:
                data = decloak(data)[0]
            except MalformedPacket:
                self.counts["dropped_malformed"] += 1
                return True
        if conn.unsent > MAX_TCP_BACKLOG or len(data) > framing.packet_limit:
            self.counts["dropped_backlog"] += 1
            return True
        try:
            framing.send_packet(data)
        except LocalProtocolError:
            self.counts["dropped_backlog"] += 1
            return True
        self.counts["sent"] += 1
        conn.last_active = trio.current_time()
        if conn.pending or not conn.write_now():
            conn.kick()  # the socket is full (or not connected yet): the writer waits
        return True

    async def _serve(self, conn: _Connection) -> None:
        try:
            with conn.cancel_scope:
                if conn.sock is None:
                    conn.sock = await self._connect(conn.path)
                    if conn.sock is None:
                        self.counts["connect_errors"] += 1
                        return
                    self.counts["connects"] += 1
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, conn)
                    nursery.start_soon(self._idle_watch, conn)
                    if conn.framing.state is Framing.NEGOTIATING:
                        nursery.start_soon(self._negotiation_timeout, conn)
                    await self._reader(conn)
                    nursery.cancel_scope.cancel()
        finally:
            self.counts["closed"] += 1
            if conn.sock is not None:
                trio.lowlevel.notify_closing(conn.sock)
                conn.sock.close()
            if self._connections.get(conn.path) is conn:
                del self._connections[conn.path]
                if conn.frames_reported and self._on_frames is not None:
                    # The next connection to this path negotiates afresh: until then the
                    # path carries only what v3 chunking carries.
                    self._on_frames(conn.path, 0)
            if conn.peer_closed and not self._closed:
                self.counts["closed_by_peer"] += 1
                if self.on_peer_closed is not None:
                    self.on_peer_closed(conn.path)

    async def _connect(self, path: Path) -> _stdlib_socket.socket | None:
        assert path.ip is not None and path.port is not None
        sock = _stdlib_socket.socket(_stdlib_socket.AF_INET, _stdlib_socket.SOCK_STREAM)
        try:
            self._configure(sock)
            err = sock.connect_ex((path.ip, path.port))
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, "connect failed")
            with trio.move_on_after(CONNECT_TIMEOUT):
                await trio.lowlevel.wait_writable(sock)
                if sock.getsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_ERROR) == 0:
                    return sock
        except OSError:
            pass
        except BaseException:  # cancelled mid-connect (the node closing): no socket leaks
            trio.lowlevel.notify_closing(sock)
            sock.close()
            raise
        trio.lowlevel.notify_closing(sock)
        sock.close()
        return None

    async def _idle_watch(self, conn: _Connection) -> None:
        while True:
            await trio.sleep_until(conn.last_active + TCP_IDLE_TIMEOUT)
            if trio.current_time() >= conn.last_active + TCP_IDLE_TIMEOUT:
                self.counts["closed_idle"] += 1
                conn.cancel_scope.cancel()
                return

    async def _negotiation_timeout(self, conn: _Connection) -> None:
        await trio.sleep(HELLO_WAIT)
        if conn.framing.state is Framing.NEGOTIATING:
            conn.framing.give_up()
            conn.kick()

    async def _reader(self, conn: _Connection) -> None:
        sock = conn.sock
        assert sock is not None
        assert self._deliver is not None and self._pump is not None
        deliver, pump = self._deliver, self._pump
        framing = conn.framing
        while True:
            try:
                await trio.lowlevel.wait_readable(sock)
                # Straight into the framing's buffer: no bytes object per read, and large
                # frames are handed on as views of it (no copy per frame either).
                size = sock.recv_into(framing.receive_buffer(TCP_READ))
            except BlockingIOError:
                continue
            except ConnectionResetError:
                conn.peer_closed = True
                return
            except (OSError, trio.ClosedResourceError):
                return
            if not size:
                conn.peer_closed = True
                return  # the peer closed the connection
            conn.last_active = trio.current_time()
            framing.data_received(size)
            try:
                while True:
                    # A frame is a view of the receive buffer, valid until the next read:
                    # ``deliver`` consumes it before returning (module docstring).
                    packet = framing.next_packet_view()
                    if framing.state is Framing.FRAMES and not conn.frames_reported:
                        # Tell the node before it handles any packet read in frames.
                        self._report_frames(conn)
                    if packet is None:
                        break
                    self.counts["received"] += 1
                    deliver(cast(bytes, packet), conn.path)
            except MalformedPacket:
                self.counts["malformed"] += 1
                return
            finally:
                pump()
            if framing.output_buffered and (conn.pending or not conn.write_now()):
                conn.kick()  # an answer or released packets are waiting

    def _report_frames(self, conn: _Connection) -> None:
        conn.frames_reported = True
        self.counts["frames"] += 1
        if self._on_frames is not None and conn.framing.max_frame is not None:
            self._on_frames(conn.path, conn.framing.max_frame)

    async def _writer(self, conn: _Connection) -> None:
        sock = conn.sock
        assert sock is not None
        while True:
            await conn.wake.wait()
            conn.wake = trio.Event()
            while not conn.write_now():
                if conn.broken:
                    return
                try:
                    await trio.lowlevel.wait_writable(sock)
                except (OSError, trio.ClosedResourceError):
                    return

    def close(self) -> None:
        """Stop accepting and drop every connection."""
        self._closed = True
        for conn in list(self._connections.values()):
            conn.cancel_scope.cancel()
        trio.lowlevel.notify_closing(self._listener)
        self._listener.close()
