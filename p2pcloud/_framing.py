"""Packet framing on byte streams (TCP): Telehash v3 chunking and our large-frame mode.

Theory of operation
-------------------
UDP carries one packet per datagram; a TCP connection is a byte stream, so packets need a
framing. This module is pure (no I/O, no clock): bytes go in with :meth:`StreamFraming.
receive_data`, whole packets come out of :meth:`StreamFraming.next_packet`, packets to send go
in with :meth:`StreamFraming.send_packet` and the bytes to write come out of
:meth:`StreamFraming.data_to_send`. The Trio transport (``p2pcloud/_node/transport.py``) only
moves those bytes.

Two framings exist:

* **v3 chunking** (telehash v3 ``chunking.md``): a packet is cut into chunks ``len(1..255) |
  bytes``, and a ``0x00`` byte ends it. A lone ``0x00`` (no chunk pending) is an ack or a
  keepalive. This is what every v3 TCP peer (telehash-js ``tcp4``) speaks, and what every
  connection starts with.
* **large frames** (a p2pcloud extension, ``docs/protocol/transports.md``): ``u32 big-endian
  length | packet``, with packets up to the negotiated maximum (far above the 1.5 KB v3 MTU,
  so a reliable channel pays the per-packet crypto and bookkeeping cost far less often). A
  zero length is a keepalive.

Negotiation never confuses a plain v3 peer. The connecting side (``initiator``) sends, chunked,
a plaintext LOB whose JSON head is ``{"type":"p2pcloud-frames","v":1,"max":N}`` and then holds
every other outgoing packet until it knows the answer. A v3 peer drops plaintext packets of
unknown type and never answers; the transport then calls :meth:`StreamFraming.give_up`, and the
connection stays chunked. A p2pcloud listener that reads that hello as the *first* packet of the
connection answers with its own hello (chunked, ``max`` = the smaller of both) and switches both
directions to frames right after it; the initiator switches when it reads the answer. Because
the initiator sends nothing after its hello until the answer arrives, and the listener sends
nothing chunked after its answer, neither side ever reads a byte in the wrong framing.

Receiving without copies: each connection has one receive buffer. The transport reads into
its free end (:meth:`StreamFraming.receive_buffer`, ``sock.recv_into``, then
:meth:`StreamFraming.data_received`), and :meth:`StreamFraming.next_packet_view` hands a large
frame out as a ``memoryview`` of the buffer, valid until the next read. Only the partial frame
at the end is ever moved (to the front, when less than one frame of room is left), and in
frames mode the buffer has a fixed size of :data:`BUFFER_FRAMES` largest frames. v3 chunks are
reassembled into packets of their own (bytes), as before; :meth:`StreamFraming.next_packet`
always returns bytes.
"""

from __future__ import annotations

import json
import mmap
import struct
from enum import Enum

from p2pcloud.errors import LocalProtocolError, MalformedPacket

__all__ = [
    "BUFFER_FRAMES",
    "CHUNKED_BUFFER",
    "CHUNKED_READ",
    "CHUNK_MAX",
    "DEFAULT_MAX_FRAME",
    "FRAME_HEADER",
    "HELLO_TYPE",
    "HELLO_VERSION",
    "MAX_CHUNKED_PACKET",
    "MAX_FRAME",
    "MIN_FRAME",
    "ChunkDecoder",
    "FrameDecoder",
    "Framing",
    "StreamFraming",
    "encode_chunked",
    "encode_frame",
    "encode_hello",
    "parse_hello",
]

CHUNK_MAX = 255  # telehash v3 chunking.md: a chunk's length is one byte, 0 ends the packet
MAX_CHUNKED_PACKET = 65_536  # largest v3 packet we reassemble: a LOB head is at most 64 KiB,
# and v3 peers send packets near the 1.5 KB UDP MTU; this bounds the reassembly buffer.
FRAME_HEADER = 4  # large frames: u32 big-endian length before each packet
MIN_FRAME = 1_500  # smallest large-frame maximum worth negotiating: no gain below the v3 MTU
MAX_FRAME = 1 << 20  # 1 MiB: the largest frame we ever accept; bounds memory per connection
DEFAULT_MAX_FRAME = 512 * 1024  # what we offer: measured on loopback (bench/bench_wire.py),
# 128 KiB frames beat 64 KiB by about a fifth (per-packet costs halve). Two node processes
# syncing a 1 GiB file (bench/bench_syncthing.py) on a loaded 2-core machine went from
# 10.6/8.7 s (128 KiB) to 8.8/7.7 s (256 KiB) and 7.5/6.9 s (512 KiB): the per-packet work
# in Python (mesh, channel, acks) is what the CPU runs short of. A 50-packet reliable window
# of them keeps up to 25 MiB in flight (the receiver's peak RSS rose ~5-10 MiB).
HELLO_TYPE = "p2pcloud-frames"  # the JSON ``type`` of the negotiation packet
HELLO_VERSION = 1  # the large-frame format described in docs/protocol/transports.md
_U32 = struct.Struct(">I")
MAX_HELLO = 255  # a hello is a short plaintext LOB; v3 errata: plaintext heads stay < 256 B


def encode_chunked(packet: bytes) -> bytes:
    """Encode one packet in v3 chunking: ``len | bytes`` chunks, then a ``0x00``.

    Args:
        packet: the packet (non-empty).

    Returns:
        The bytes to write.

    Raises:
        LocalProtocolError: the packet is empty or larger than :data:`MAX_CHUNKED_PACKET`.
    """
    size = len(packet)
    if not 0 < size <= MAX_CHUNKED_PACKET:
        raise LocalProtocolError(f"cannot chunk a packet of {size} bytes")
    out = bytearray()
    view = memoryview(packet)
    for start in range(0, size, CHUNK_MAX):
        piece = view[start : start + CHUNK_MAX]
        out.append(len(piece))
        out += piece
    out.append(0)  # telehash v3 chunking.md: a zero-length chunk ends the packet
    return bytes(out)


def encode_frame(packet: bytes, max_frame: int = MAX_FRAME) -> bytes:
    """Encode one packet as a large frame: ``u32 length | packet``.

    Args:
        packet: the packet (non-empty).
        max_frame: the negotiated maximum.

    Returns:
        The bytes to write.

    Raises:
        LocalProtocolError: the packet is empty or larger than ``max_frame``.
    """
    size = len(packet)
    if not 0 < size <= max_frame:
        raise LocalProtocolError(f"cannot frame a packet of {size} bytes (max {max_frame})")
    return struct.pack(">I", size) + packet


class ChunkDecoder:
    """Incremental v3 chunk decoder with a bounded reassembly buffer.

    Attributes:
        keepalives: lone ``0x00`` bytes seen (v3 acks/keepalives).
    """

    def __init__(self, max_packet: int = MAX_CHUNKED_PACKET) -> None:
        """Create a decoder.

        Args:
            max_packet: the largest packet accepted; a longer one is malformed.
        """
        self._max_packet = max_packet
        self._packet = bytearray()
        self.keepalives = 0

    @property
    def pending(self) -> int:
        """Bytes of a packet reassembled so far."""
        return len(self._packet)

    def decode(
        self, buf: bytes | bytearray | memoryview, pos: int, end: int | None = None
    ) -> tuple[bytes | None, int]:
        """Decode from ``buf[pos:end]`` until one packet is complete or the input runs out.

        Args:
            buf: buffered input.
            pos: where to start reading.
            end: where the input ends (default: ``len(buf)``).

        Returns:
            ``(packet, new_pos)``; ``packet`` is None when more input is needed (everything up
            to ``new_pos`` is consumed into the decoder either way).

        Raises:
            MalformedPacket: a packet grows beyond the maximum.
        """
        if end is None:
            end = len(buf)
        view = memoryview(buf)  # chunks are appended from the view: one copy each
        while pos < end:
            size = view[pos]
            if size == 0:
                pos += 1
                if not self._packet:
                    self.keepalives += 1  # telehash v3 chunking.md: lone 0x00 = ack/keepalive
                    continue
                packet = bytes(self._packet)
                self._packet.clear()
                return packet, pos
            if pos + 1 + size > end:
                break  # wait for the whole chunk: at most 255 bytes stay buffered outside
            if len(self._packet) + size > self._max_packet:
                raise MalformedPacket(f"chunked packet longer than {self._max_packet} bytes")
            self._packet += view[pos + 1 : pos + 1 + size]
            pos += 1 + size
        return None, pos


class FrameDecoder:
    """Incremental large-frame decoder (``u32 length | packet``), bounded by ``max_frame``.

    Attributes:
        keepalives: zero-length frames seen.
    """

    def __init__(self, max_frame: int) -> None:
        """Create a decoder.

        Args:
            max_frame: the negotiated maximum frame size.
        """
        self._max_frame = max_frame
        self.keepalives = 0

    def decode(
        self, buf: bytes | bytearray | memoryview, pos: int, end: int | None = None
    ) -> tuple[memoryview | None, int]:
        """Decode one frame from ``buf[pos:end]`` if it is complete.

        Args:
            buf: buffered input.
            pos: where to start reading.
            end: where the input ends (default: ``len(buf)``).

        Returns:
            ``(packet, new_pos)``; ``packet`` is a view of ``buf`` (no copy: it is only
            valid while ``buf`` is not overwritten), ``(None, pos)`` when the frame is not
            complete yet.

        Raises:
            MalformedPacket: a frame announces more than the negotiated maximum.
        """
        if end is None:
            end = len(buf)
        while end - pos >= FRAME_HEADER:
            (size,) = _U32.unpack_from(buf, pos)
            if size > self._max_frame:
                raise MalformedPacket(f"frame of {size} bytes exceeds {self._max_frame}")
            if size == 0:
                self.keepalives += 1
                pos += FRAME_HEADER
                continue
            if end - pos - FRAME_HEADER < size:
                break
            start = pos + FRAME_HEADER
            return memoryview(buf)[start : start + size], start + size
        return None, pos


def encode_hello(max_frame: int) -> bytes:
    """Build the negotiation packet: a plaintext LOB with the JSON head only.

    Args:
        max_frame: the largest frame this side accepts.

    Returns:
        The LOB (to be sent chunked).
    """
    head = json.dumps(
        {"type": HELLO_TYPE, "v": HELLO_VERSION, "max": max_frame}, separators=(",", ":")
    ).encode()
    return struct.pack(">H", len(head)) + head


def parse_hello(packet: bytes) -> int | None:
    """Recognise a negotiation packet and return its ``max``; never raises.

    Args:
        packet: any packet read from a stream.

    Returns:
        The peer's maximum frame size, or None when ``packet`` is not a version-1 hello with
        an acceptable ``max`` (anything else is an ordinary packet or garbage).
    """
    if len(packet) < 2 or len(packet) > MAX_HELLO or packet[0] != 0:
        return None  # cloaked (byte0 != 0) or too long to be our hello
    (head_len,) = struct.unpack_from(">H", packet, 0)
    if head_len < 7 or head_len != len(packet) - 2:  # LOB: JSON heads are >= 7 bytes, no body
        return None
    try:
        head = json.loads(packet[2:].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(head, dict) or head.get("type") != HELLO_TYPE:
        return None
    version, size = head.get("v"), head.get("max")
    if version != HELLO_VERSION or isinstance(size, bool) or not isinstance(size, int):
        return None
    if not MIN_FRAME <= size <= MAX_FRAME:
        return None
    return size


class Framing(Enum):
    """The framing state of one stream connection."""

    NEGOTIATING = "negotiating"  # initiator: hello sent, answer awaited; packets held
    CHUNKED = "chunked"  # telehash v3 chunking
    FRAMES = "frames"  # p2pcloud large frames


CHUNKED_BUFFER = 64 * 1024  # receive buffer in v3 chunking: the chunk decoder takes every
# whole chunk of a read, so only a partial chunk (< 256 bytes) ever stays behind
CHUNKED_READ = 16 * 1024  # least room offered to a read in v3 chunking (v3 packets are ~1.5 KB)
BUFFER_FRAMES = 4  # the receive buffer in frames mode holds this many largest frames. Frames
# are handed out as views of it; the partial frame at the end is moved to the front only when
# less than one frame of room is left, so at most about one byte in three (typically far
# fewer) is copied once more, and the buffer never grows: 4 x 512 KiB per connection
LAZY_BUFFER = 256 * 1024  # receive buffers this large are anonymous mappings, whose pages the
# kernel only makes resident when written: a bytearray is zero-filled (every page touched) at
# once, so an idle frames-mode connection, which only ever writes keepalives at the front of
# its 4 x 512 KiB buffer, would hold 2 MiB resident per peer.
MAX_HELD_PACKETS = 256  # initiator: packets held while negotiating; a few handshakes at most
# arrive in that time, so more means the application is flooding a connection not yet ready


def _new_buffer(size: int) -> bytearray | mmap.mmap:
    """A zeroed, writable receive buffer of ``size`` bytes (see :data:`LAZY_BUFFER`)."""
    if size < LAZY_BUFFER:
        return bytearray(size)
    return mmap.mmap(-1, size)  # anonymous and private: memory, not I/O


class StreamFraming:
    """The framing of one stream connection, with large-frame negotiation (pure).

    Attributes:
        state: the current :class:`Framing`.
        max_frame: the negotiated frame maximum (None until large frames are on).
        held_dropped: packets dropped because too many were held while negotiating.
    """

    def __init__(
        self, *, initiator: bool, offer_frames: bool = True, max_frame: int = DEFAULT_MAX_FRAME
    ) -> None:
        """Create the framing for a new connection.

        Args:
            initiator: True on the connecting side (it sends the hello).
            offer_frames: False for a plain v3 connection (no hello sent, none answered).
            max_frame: the largest frame this side accepts (MIN_FRAME..MAX_FRAME).

        Raises:
            LocalProtocolError: ``max_frame`` out of range.
        """
        if not MIN_FRAME <= max_frame <= MAX_FRAME:
            raise LocalProtocolError(f"max_frame must be in {MIN_FRAME}..{MAX_FRAME}")
        self._initiator = initiator
        self._offer = offer_frames
        self._own_max = max_frame
        self.max_frame: int | None = None
        # The receive buffer: bytes ``[_pos, _end)`` are read and not yet decoded. It is
        # replaced (never resized: views of it may be alive) when it must grow.
        self._buf: bytearray | mmap.mmap = bytearray(CHUNKED_BUFFER)
        self._view = memoryview(self._buf)
        self._pos = 0
        self._end = 0
        self._min_read = CHUNKED_READ
        self._want = CHUNKED_BUFFER  # the capacity the current framing asks for
        self._out: list[bytes] = []  # buffers to write, in order (no joining until asked)
        self._out_size = 0
        self._held: list[bytes] = []
        self.held_dropped = 0
        self._chunks = ChunkDecoder()
        self._frames: FrameDecoder | None = None
        self._first_packet = True
        if initiator and offer_frames:
            self.state = Framing.NEGOTIATING
            self._emit(encode_chunked(encode_hello(max_frame)))
        else:
            self.state = Framing.CHUNKED

    @property
    def keepalives(self) -> int:
        """Keepalives (lone 0x00 or zero-length frames) received so far."""
        return self._chunks.keepalives + (self._frames.keepalives if self._frames else 0)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Copy bytes read from the stream into the buffer; read packets with :meth:`next_packet`.

        (:meth:`receive_buffer` and :meth:`data_received` read without this copy.) Views
        returned by :meth:`next_packet_view` before this call may be overwritten by it. The
        buffer grows to hold ``data``: the caller bounds what it passes (a read's size).

        Args:
            data: bytes in stream order.
        """
        size = len(data)
        if size:
            self._reserve(size)
            self._view[self._end : self._end + size] = data
            self._end += size

    def receive_buffer(self, limit: int | None = None) -> memoryview:
        """Room to read into (``sock.recv_into``); then call :meth:`data_received`.

        The buffer is reused: views returned by :meth:`next_packet_view` before this call may
        be overwritten from now on. In frames mode the room is at least one largest frame, and
        the buffer never grows beyond :data:`BUFFER_FRAMES` frames.

        Args:
            limit: the most bytes wanted (a read size); the room returned may be smaller
                (but never below one largest frame, or :data:`CHUNKED_READ` when chunked).

        Returns:
            A writable view of the free end of the buffer.
        """
        self._reserve(self._min_read)
        stop = len(self._buf)
        if limit is not None:
            stop = min(stop, self._end + max(limit, self._min_read))
        return self._view[self._end : stop]

    def data_received(self, size: int) -> None:
        """Account for ``size`` bytes written into the room :meth:`receive_buffer` gave.

        Args:
            size: bytes written (a read's result).

        Raises:
            LocalProtocolError: more bytes than there was room for.
        """
        if not 0 <= size <= len(self._buf) - self._end:
            raise LocalProtocolError(f"{size} bytes do not fit the receive buffer")
        self._end += size

    def _reserve(self, room: int) -> None:
        """Make ``room`` bytes free after the undecoded ones (compact, or a new buffer)."""
        pending = self._end - self._pos
        if pending == 0:
            self._pos = self._end = 0  # everything decoded: reuse from the front, no copy
        capacity = len(self._buf)
        if capacity - self._end >= room and capacity >= self._want:
            return
        if pending + room <= capacity and capacity >= self._want:
            # Move the partial packet to the front (overlapping copies are safe: memmove).
            self._view[:pending] = self._view[self._pos : self._end]
        else:
            buf = _new_buffer(max(self._want, pending + room))
            view = memoryview(buf)
            view[:pending] = self._view[self._pos : self._end]
            self._buf, self._view = buf, view
        self._pos, self._end = 0, pending

    @property
    def receive_capacity(self) -> int:
        """The size of the receive buffer (bounded in frames mode; see BUFFER_FRAMES)."""
        return len(self._buf)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet decoded."""
        return self._end - self._pos

    def next_packet(self) -> bytes | None:
        """Return the next whole packet for the mesh, or None when more bytes are needed.

        Negotiation packets are consumed here and never returned.

        Returns:
            A packet (its own bytes), or None.

        Raises:
            MalformedPacket: the stream broke the framing; the connection must be closed.
        """
        packet = self.next_packet_view()
        return packet if packet is None or type(packet) is bytes else bytes(packet)

    def next_packet_view(self) -> bytes | memoryview | None:
        """Like :meth:`next_packet`, but a large frame comes as a view of the receive buffer.

        The view is only valid until the next :meth:`receive_buffer` or :meth:`receive_data`
        call (the buffer is then reused): a consumer that keeps a packet longer copies it.

        Returns:
            A packet (a memoryview in frames mode, bytes in v3 chunking), or None.

        Raises:
            MalformedPacket: the stream broke the framing; the connection must be closed.
        """
        while True:
            if self.state is Framing.FRAMES:
                assert self._frames is not None
                frame, self._pos = self._frames.decode(self._view, self._pos, self._end)
                if frame is not None:
                    self._first_packet = False
                return frame
            packet, self._pos = self._chunks.decode(self._view, self._pos, self._end)
            if packet is None:
                return None
            first, self._first_packet = self._first_packet, False
            peer_max = parse_hello(packet)
            if peer_max is None:
                return packet
            self._on_hello(peer_max, first)

    def _on_hello(self, peer_max: int, first: bool) -> None:
        size = min(peer_max, self._own_max)
        if self.state is Framing.NEGOTIATING:
            # Initiator: the answer. Switch both directions, then release held packets.
            self._switch_to_frames(size)
            held, self._held = self._held, []
            for packet in held:
                self._emit(_U32.pack(len(packet)), packet)
        elif not self._initiator and first and self._offer:
            # Listener: a hello as the first packet. Answer chunked, then frames both ways.
            self._emit(encode_chunked(encode_hello(size)))
            self._switch_to_frames(size)
        # Otherwise (a late or repeated hello, or frames not offered): ignore it, as v3 does.

    def _switch_to_frames(self, size: int) -> None:
        self.max_frame = size
        self._frames = FrameDecoder(size)
        # From the next read on, the buffer holds BUFFER_FRAMES whole frames (see there).
        self._min_read = size + FRAME_HEADER
        self._want = BUFFER_FRAMES * (size + FRAME_HEADER)
        self.state = Framing.FRAMES

    def give_up(self) -> None:
        """Initiator: no answer came in time; stay in v3 chunking and release held packets."""
        if self.state is not Framing.NEGOTIATING:
            return
        self.state = Framing.CHUNKED
        held, self._held = self._held, []
        for packet in held:
            self._emit(encode_chunked(packet))

    @property
    def packet_limit(self) -> int:
        """The largest packet :meth:`send_packet` accepts in the current state."""
        if self.state is Framing.FRAMES:
            assert self.max_frame is not None
            return self.max_frame
        return MAX_CHUNKED_PACKET

    def send_packet(self, packet: bytes) -> None:
        """Queue one packet for sending in the current framing.

        Args:
            packet: a whole packet (non-empty, within :attr:`packet_limit`).

        Raises:
            LocalProtocolError: empty or too large for the current framing.
        """
        if self.state is Framing.FRAMES:
            assert self.max_frame is not None
            size = len(packet)
            if not 0 < size <= self.max_frame:
                raise LocalProtocolError(f"cannot frame {size} bytes (max {self.max_frame})")
            # The header and the packet stay separate buffers: no copy of a large packet.
            self._emit(_U32.pack(size), packet)
        elif self.state is Framing.CHUNKED:
            self._emit(encode_chunked(packet))
        else:
            if not 0 < len(packet) <= MAX_CHUNKED_PACKET:
                raise LocalProtocolError(f"cannot send a packet of {len(packet)} bytes")
            if len(self._held) >= MAX_HELD_PACKETS:
                self.held_dropped += 1  # like a full UDP send buffer: the packet is lost
                return
            self._held.append(packet)

    @property
    def output_buffered(self) -> int:
        """Bytes queued by :meth:`send_packet` and not yet taken by :meth:`data_to_send`."""
        return self._out_size + sum(len(packet) for packet in self._held)

    def send_keepalive(self) -> None:
        """Queue a keepalive (a lone 0x00, or a zero-length frame)."""
        if self.state is Framing.FRAMES:
            self._emit(b"\x00" * FRAME_HEADER)
        elif self.state is Framing.CHUNKED:
            self._emit(b"\x00")

    def _emit(self, *buffers: bytes) -> None:
        for buf in buffers:
            self._out.append(buf)
            self._out_size += len(buf)

    def buffers_to_send(self) -> list[bytes]:
        """Return (and forget) the buffers to write, in order, for a gathering write.

        Large frames stay as they came (header, packet, header, packet...): a writer that
        uses ``sendmsg`` never copies them.
        """
        out, self._out, self._out_size = self._out, [], 0
        return out

    def data_to_send(self) -> bytes:
        """Return (and forget) the bytes to write to the stream, in order."""
        return b"".join(self.buffers_to_send())
