"""Sequence CRDT for text and lists: the readable reference twin (THE specification).

Theory of operation
-------------------
A :class:`Text` is a replicated sequence of characters. Every character ever inserted is an
*item* that keeps its place for ever; deleting a character only marks its item deleted (a
tombstone), so concurrent operations always find what they refer to. Items are ordered by
FugueMax (Weidner and Kleppmann, "The Art of the Fugue", arXiv:2305.00583) in its list
form: the ``integrateYjsMod`` procedure of josephg/reference-crdts, also used by
diamond-types, which its author describes as giving FugueMax's order:

* every item has an id ``(replica id, counter)`` and two *origins*: ``origin_left``, the
  item that was immediately to its left when it was typed (the visible character before the
  cursor), and ``origin_right``, the item (deleted or not) that followed ``origin_left`` at
  that moment. Either may be ``None`` (start / end of the text);
* a remote item is placed between its origins; concurrent items between the same origins
  are ordered by :meth:`Text._integrate`, which never interleaves two runs of characters
  typed concurrently at the same place (the Fugue paper's "maximal non-interleaving").

Operations (ops) are numbered per replica by a counter starting at 1. An insert of ``n``
characters uses ``n`` counters, a delete of ``n`` characters uses ``n`` counters (one per
deleted character, whose *target* is the deleted item's id). ``version()`` maps each
replica to the highest counter up to which every op of that replica is integrated here.
An op is integrated only when its causal predecessors are: the replica's previous counter,
its origins (insert) or its target (delete). Ops that arrive early are *held* and retried
after each :meth:`Text.apply`, so deltas may arrive in any order, twice, or be lost and
re-sent (``encode_since``).

This module keeps one Python object per character in chunked lists: slow but plain. The
Cython module ``_ctext`` stores runs of characters and must agree with this twin byte for
byte on every output (values, deltas, state encodings); the tests check that on random
concurrent edit streams. docs/text.md describes the byte layouts that ``_encode_delta`` and
``encode_state`` below define.

This module does no I/O and reads no clock (DESIGN.md section 3).
"""

from __future__ import annotations

import bisect
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from p2pcloud.errors import CoreUsageError, DecodeError

# -- limits (every decoded size is bounded; STYLE.md section 5) ---------------------------

MIN_REPLICA_ID = 8  # shorter ids collide too easily between independent replicas
MAX_REPLICA_ID = 32  # a SHA-256 digest; longer ids only bloat every delta
MAX_COUNTER = 2**31 - 1  # op counters are C int32 in _ctext: 2 billion edits per replica
MAX_ENCODED_BYTES = 64 << 20  # largest delta/state, before and after inflating: bounds memory
MAX_AGENTS_PER_MESSAGE = 1 << 16  # replica table of one delta/state; far above real documents
MAX_HELD_RUNS = 1 << 20  # op runs waiting for predecessors; past this, resync with encode_since
DEFLATE_MIN = 256  # bodies shorter than this are not worth a zlib header
DEFLATE_LEVEL = 6  # zlib's default: most of the gain of 9 at a third of the time

FORMAT_DELTA = 0x71  # first byte of a text delta
FORMAT_STATE = 0x72  # first byte of a text state snapshot
FLAG_DEFLATED = 0x01  # body is zlib-compressed, preceded by its varint length
KNOWN_FLAGS = FLAG_DEFLATED

# op run kinds in a delta (low 2 bits of the run head; 3 is malformed)
KIND_INSERT = 0  # insert with its characters
KIND_DELETE_FWD = 1  # delete; targets t, t+1, t+2, ...
KIND_DELETE_BACK = 2  # delete; targets t, t-1, t-2, ... (backspacing)

# item run flags in a state snapshot (low 6 bits of the run head; the length is above them)
SF_DELETED = 0x01  # the run is deleted (its content is still stored: see docs/text.md)
SF_OL_PREV = 0x02  # origin_left is the last character of the previous run
SF_OL_NONE = 0x04  # origin_left is the start of the text
SF_OR_NEXT = 0x08  # origin_right is the first character of the next run
SF_OR_NONE = 0x10  # origin_right is the end of the text
SF_OR_SAME = SF_OR_NEXT | SF_OR_NONE  # both bits: origin_right is the previous run's
SF_SAME_AGENT = 0x20  # same replica as the previous run
SF_BITS = 6

# the columns of a state snapshot, in their order in the body
COL_HEAD = 0  # item run: uint(length << SF_BITS | flags)
COL_AGENT = 1  # item run: uint(replica index), unless SF_SAME_AGENT
COL_COUNTER = 2  # item run: sint(counter - end of this replica's previous run)
COL_ORIGIN_AGENT = 3  # explicit origin: uint(replica index)
COL_ORIGIN_COUNTER = 4  # explicit origin: sint(counter - the run's counter)
COL_DEL_HEAD = 5  # delete run: uint(replica index << 1 | backward)
COL_DEL_GAP = 6  # delete run: uint(counter - end of the previous run of this replica)
COL_DEL_LENGTH = 7  # delete run: uint(length)
COL_DEL_TARGET_AGENT = 8  # delete run: uint(target replica index)
COL_DEL_TARGET = 9  # delete run: sint(first target - previous run's first target)
N_COLUMNS = 10

CHUNK_MAX = 512  # items per chunk of the twin's list; splits keep lookups near sqrt(n)

Id = tuple[bytes, int]
"""An item or op id: (replica id, counter)."""


# -- op runs: the unit of deltas and of held ops ------------------------------------------


@dataclass(slots=True)
class InsertRun:
    """``length`` consecutive inserts by ``agent``: counters ``counter..counter+length-1``.

    Character ``i > 0`` has ``origin_left == (agent, counter + i - 1)``; all characters
    share ``origin_right``. ``content`` holds the ``length`` characters.
    """

    agent: bytes
    counter: int
    length: int
    content: str
    origin_left: Id | None
    origin_right: Id | None

    def end(self) -> int:
        """Returns: the counter after the last one of this run."""
        return self.counter + self.length

    def tail(self, skip: int) -> InsertRun:
        """Returns: this run without its first ``skip`` characters."""
        return InsertRun(
            self.agent,
            self.counter + skip,
            self.length - skip,
            self.content[skip:],
            (self.agent, self.counter + skip - 1) if skip else self.origin_left,
            self.origin_right,
        )

    def head(self, keep: int) -> InsertRun:
        """Returns: the first ``keep`` characters of this run."""
        return InsertRun(
            self.agent,
            self.counter,
            keep,
            self.content[:keep],
            self.origin_left,
            self.origin_right,
        )


@dataclass(slots=True)
class DeleteRun:
    """``length`` consecutive deletes by ``agent``; op ``counter + i`` deletes the item
    ``(target_agent, target + i * step)`` with ``step`` +1 (forward) or -1 (backspacing)."""

    agent: bytes
    counter: int
    length: int
    target_agent: bytes
    target: int
    step: int

    def end(self) -> int:
        """Returns: the counter after the last one of this run."""
        return self.counter + self.length

    def tail(self, skip: int) -> DeleteRun:
        """Returns: this run without its first ``skip`` ops."""
        return DeleteRun(
            self.agent,
            self.counter + skip,
            self.length - skip,
            self.target_agent,
            self.target + skip * self.step,
            self.step,
        )

    def head(self, keep: int) -> DeleteRun:
        """Returns: the first ``keep`` ops of this run."""
        return DeleteRun(self.agent, self.counter, keep, self.target_agent, self.target, self.step)


OpRun = InsertRun | DeleteRun


def _merge_runs(chars: list[OpRun]) -> list[OpRun]:
    """Greedy canonical run-length merge of single-op runs sorted by (agent, counter).

    This rule defines the run boundaries in every delta, so the twin and ``_ctext`` emit the
    same bytes however their internal runs happen to be cut.
    """
    out: list[OpRun] = []
    for op in chars:
        last = out[-1] if out else None
        if (
            isinstance(op, InsertRun)
            and isinstance(last, InsertRun)
            and last.agent == op.agent
            and last.end() == op.counter
            and op.origin_left == (op.agent, op.counter - 1)
            and op.origin_right == last.origin_right
        ):
            last.length += op.length
            last.content += op.content
            continue
        if (
            isinstance(op, DeleteRun)
            and isinstance(last, DeleteRun)
            and last.agent == op.agent
            and last.end() == op.counter
            and last.target_agent == op.target_agent
        ):
            if last.length == 1 and op.target in (last.target + 1, last.target - 1):
                last.step = op.target - last.target
                last.length += 1
                continue
            if last.length > 1 and op.target == last.target + last.length * last.step:
                last.length += 1
                continue
        out.append(op.tail(0))  # a copy: merging must not change the caller's runs
    return out


def _run_end(run: OpRun) -> int:
    return run.end()


def _run_counter(run: OpRun) -> int:
    return run.counter


def _single_ops(run: OpRun) -> Iterator[OpRun]:
    """Yields: the run cut into one-op runs (the inverse of :func:`_merge_runs`)."""
    for i in range(run.length):
        yield run.tail(i).head(1)


# -- byte codec ----------------------------------------------------------------------------


def _put_uint(out: bytearray, value: int) -> None:
    """Appends ``value`` (>= 0) as an unsigned LEB128 varint."""
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _put_sint(out: bytearray, value: int) -> None:
    """Appends ``value`` as a zigzag varint (small magnitudes, either sign, stay short)."""
    _put_uint(out, (value << 1) if value >= 0 else ((-value << 1) - 1))


MAX_VARINT_BYTES = 10  # a 64-bit value; longer varints are malformed


class _Reader:
    """Bounds-checked reader: every failure is a :class:`DecodeError`."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def uint(self) -> int:
        """Returns: the next unsigned varint. Raises: DecodeError."""
        result = shift = 0
        for _ in range(MAX_VARINT_BYTES):
            if self.pos >= len(self.data):
                raise DecodeError("truncated varint")
            byte = self.data[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                if result >= 1 << 63:
                    raise DecodeError("varint out of range")
                return result
            shift += 7
        raise DecodeError("varint too long")

    def sint(self) -> int:
        """Returns: the next zigzag varint. Raises: DecodeError."""
        raw = self.uint()
        return (raw >> 1) if not raw & 1 else -((raw + 1) >> 1)

    def count(self, what: str) -> int:
        """Returns: a count of items that each take at least one more byte."""
        value = self.uint()
        if value > len(self.data) - self.pos:
            raise DecodeError(f"{what} count larger than the data")
        return value

    def take(self, n: int) -> bytes:
        """Returns: the next ``n`` bytes. Raises: DecodeError."""
        if n > len(self.data) - self.pos:
            raise DecodeError("truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def done(self) -> bool:
        """Returns: True when every byte is consumed."""
        return self.pos == len(self.data)


def _frame(fmt: int, body: bytes) -> bytes:
    """Returns: format byte, flags byte, then the body, deflated when that is smaller."""
    if len(body) >= DEFLATE_MIN:
        packed = bytearray()
        _put_uint(packed, len(body))
        packed += zlib.compress(body, DEFLATE_LEVEL)
        if len(packed) < len(body):
            return bytes((fmt, FLAG_DEFLATED)) + bytes(packed)
    return bytes((fmt, 0)) + body


def _unframe(fmt: int, data: bytes) -> bytes:
    """Returns: the body of a framed message. Raises: DecodeError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError("encoded text must be bytes")
    data = bytes(data)
    if len(data) > MAX_ENCODED_BYTES:
        raise DecodeError("encoded text larger than MAX_ENCODED_BYTES")
    if len(data) < 2 or data[0] != fmt:
        raise DecodeError("not a text delta/state of this format")
    flags = data[1]
    if flags & ~KNOWN_FLAGS:
        raise DecodeError("unknown flags")
    if not flags & FLAG_DEFLATED:
        return data[2:]
    reader = _Reader(data)
    reader.pos = 2
    size = reader.uint()
    if size > MAX_ENCODED_BYTES:
        raise DecodeError("inflated size larger than MAX_ENCODED_BYTES")
    return _inflate(data[reader.pos :], size)


def _inflate(packed: bytes, size: int) -> bytes:
    """Returns: zlib data that must inflate to exactly ``size`` bytes. Raises: DecodeError."""
    inflater = zlib.decompressobj()
    try:
        body = inflater.decompress(packed, size)
    except zlib.error as exc:
        raise DecodeError("bad deflate stream") from exc
    if len(body) != size or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise DecodeError("deflate stream does not match its declared size")
    return body


def _pack(out: bytearray, data: bytes) -> None:
    """Appends a snapshot section: ``uint(len << 1)`` and the bytes, or, when zlib makes
    it smaller, ``uint(len << 1 | 1), uint(deflated len)`` and the zlib stream."""
    if len(data) >= DEFLATE_MIN:
        packed = zlib.compress(data, DEFLATE_LEVEL)
        if len(packed) < len(data):
            _put_uint(out, len(data) << 1 | 1)
            _put_uint(out, len(packed))
            out += packed
            return
    _put_uint(out, len(data) << 1)
    out += data


def _unpack(reader: _Reader) -> bytes:
    """Returns: the next snapshot section, inflated. Raises: DecodeError."""
    head = reader.uint()
    size = head >> 1
    if size > MAX_ENCODED_BYTES:
        raise DecodeError("section larger than MAX_ENCODED_BYTES")
    if not head & 1:
        return reader.take(size)
    return _inflate(reader.take(reader.uint()), size)


def _read_agents(reader: _Reader) -> list[bytes]:
    """Returns: the replica table (strictly ascending ids). Raises: DecodeError."""
    count = reader.count("replica")
    if count > MAX_AGENTS_PER_MESSAGE:
        raise DecodeError("too many replicas")
    agents: list[bytes] = []
    for _ in range(count):
        size = reader.uint()
        if not MIN_REPLICA_ID <= size <= MAX_REPLICA_ID:
            raise DecodeError("bad replica id length")
        agent = reader.take(size)
        if agents and agent <= agents[-1]:
            raise DecodeError("replica table not strictly ascending")
        agents.append(agent)
    return agents


def _agent(agents: list[bytes], index: int) -> bytes:
    if index >= len(agents):
        raise DecodeError("replica index out of range")
    return agents[index]


def _check_span(counter: int, length: int) -> None:
    if counter < 1 or length < 1 or counter + length - 1 > MAX_COUNTER:
        raise DecodeError("op counter out of range")


def _put_agents(out: bytearray, agents: list[bytes]) -> dict[bytes, int]:
    _put_uint(out, len(agents))
    for agent in agents:
        _put_uint(out, len(agent))
        out += agent
    return {agent: i for i, agent in enumerate(agents)}


def _put_id(out: bytearray, index: Mapping[bytes, int], ident: Id | None) -> None:
    if ident is None:
        _put_uint(out, 0)
    else:
        _put_uint(out, index[ident[0]] + 1)
        _put_uint(out, ident[1])


def _read_id(reader: _Reader, agents: list[bytes]) -> Id | None:
    tag = reader.uint()
    if tag == 0:
        return None
    counter = reader.uint()
    _check_span(counter, 1)
    return (_agent(agents, tag - 1), counter)


def _encode_delta(runs: list[OpRun]) -> bytes:
    """Returns: the delta bytes for canonical op runs sorted by (agent, counter).

    Layout (docs/text.md): format, flags, then the body
    ``agents, n_runs, runs..., content`` where a run is
    ``uint(agent_index << 2 | kind), uint(counter), uint(length)`` followed by
    ``id(origin_left), id(origin_right)`` (inserts) or ``uint(target agent), uint(target)``
    (deletes); an id is ``uint(0)`` for none or ``uint(agent_index + 1), uint(counter)``;
    content is ``uint(byte length)`` and the UTF-8 text of the insert runs.
    """
    if not runs:
        return b""
    names: set[bytes] = set()
    for run in runs:
        names.add(run.agent)
        if isinstance(run, InsertRun):
            names.update(i[0] for i in (run.origin_left, run.origin_right) if i is not None)
        else:
            names.add(run.target_agent)
    body = bytearray()
    index = _put_agents(body, sorted(names))
    _put_uint(body, len(runs))
    content: list[str] = []
    for run in runs:
        if isinstance(run, InsertRun):
            _put_uint(body, index[run.agent] << 2 | KIND_INSERT)
            _put_uint(body, run.counter)
            _put_uint(body, run.length)
            _put_id(body, index, run.origin_left)
            _put_id(body, index, run.origin_right)
            content.append(run.content)
        else:
            # a one-op run has no direction: always written forward
            kind = KIND_DELETE_BACK if run.step < 0 and run.length > 1 else KIND_DELETE_FWD
            _put_uint(body, index[run.agent] << 2 | kind)
            _put_uint(body, run.counter)
            _put_uint(body, run.length)
            _put_uint(body, index[run.target_agent])
            _put_uint(body, run.target)
    text = "".join(content).encode("utf-8", "surrogatepass")
    _put_uint(body, len(text))
    body += text
    return _frame(FORMAT_DELTA, bytes(body))


def _decode_delta(data: bytes) -> list[OpRun]:
    """Returns: the op runs of a delta. Raises: DecodeError (malformed or out of bounds)."""
    reader = _Reader(_unframe(FORMAT_DELTA, data))
    agents = _read_agents(reader)
    runs: list[OpRun] = []
    inserts: list[InsertRun] = []
    for _ in range(reader.count("run")):
        head = reader.uint()
        agent = _agent(agents, head >> 2)
        kind = head & 3
        counter = reader.uint()
        length = reader.uint()
        _check_span(counter, length)
        if kind == KIND_INSERT:
            left = _read_id(reader, agents)
            right = _read_id(reader, agents)
            run = InsertRun(agent, counter, length, "", left, right)
            inserts.append(run)
            runs.append(run)
        elif kind == 3:
            raise DecodeError("unknown op kind")
        else:
            target_agent = _agent(agents, reader.uint())
            target = reader.uint()
            step = 1 if kind == KIND_DELETE_FWD else -1
            last = target + (length - 1) * step
            if min(target, last) < 1 or max(target, last) > MAX_COUNTER:
                raise DecodeError("delete target out of range")
            runs.append(DeleteRun(agent, counter, length, target_agent, target, step))
    text = _read_text(reader, sum(run.length for run in inserts))
    offset = 0
    for run in inserts:
        run.content = text[offset : offset + run.length]
        offset += run.length
    if not reader.done():
        raise DecodeError("trailing bytes after the delta")
    return runs


def _read_text(reader: _Reader, chars: int) -> str:
    """Returns: the content section, which must hold exactly ``chars`` characters."""
    size = reader.uint()
    if chars > size or size > len(reader.data) - reader.pos:
        raise DecodeError("content length does not match the runs")
    return _text_of(reader.take(size), chars)


def _text_of(data: bytes, chars: int) -> str:
    """Returns: UTF-8 ``data`` decoded; it must hold exactly ``chars`` characters."""
    if chars > len(data):
        raise DecodeError("content length does not match the runs")
    try:
        text = data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as exc:
        raise DecodeError("content is not UTF-8") from exc
    if len(text) != chars:
        raise DecodeError("content length does not match the runs")
    return text


# -- the document --------------------------------------------------------------------------


class _Item:
    """One character ever inserted (a tombstone once deleted)."""

    __slots__ = ("agent", "counter", "char", "origin_left", "origin_right", "deleted", "chunk")

    def __init__(
        self,
        agent: bytes,
        counter: int,
        char: str,
        origin_left: Id | None,
        origin_right: Id | None,
        deleted: bool,
    ) -> None:
        self.agent = agent
        self.counter = counter
        self.char = char
        self.origin_left = origin_left
        self.origin_right = origin_right
        self.deleted = deleted
        self.chunk: _Chunk | None = None

    def ident(self) -> Id:
        """Returns: this item's id."""
        return (self.agent, self.counter)


class _Chunk:
    """A slice of the item list with its visible count, so lookups skip whole chunks."""

    __slots__ = ("items", "visible")

    def __init__(self, items: list[_Item]) -> None:
        self.items = items
        self.visible = sum(1 for item in items if not item.deleted)
        for item in items:
            item.chunk = self


Pos = tuple[int, int]  # (chunk index, index in chunk): raw order, tombstones included


def _check_replica(replica_id: object) -> bytes:
    if not isinstance(replica_id, bytes) or not (
        MIN_REPLICA_ID <= len(replica_id) <= MAX_REPLICA_ID
    ):
        raise CoreUsageError(
            f"replica id must be {MIN_REPLICA_ID}..{MAX_REPLICA_ID} bytes, got {replica_id!r}"
        )
    return replica_id


class Text:
    """A replicated text (sequence CRDT, FugueMax order); see the module docstring."""

    def __init__(self, replica_id: bytes) -> None:
        """Makes an empty text edited locally as ``replica_id``.

        Args:
            replica_id: this replica's opaque id, 8..32 bytes, unique among the replicas.

        Raises:
            CoreUsageError: the id is not bytes of an allowed length.
        """
        self._replica = _check_replica(replica_id)
        self._chunks: list[_Chunk] = []
        self._items: dict[Id, _Item] = {}
        self._visible = 0
        self._version: dict[bytes, int] = {}
        self._deletes: dict[Id, DeleteRun] = {}  # every integrated delete op, one per op
        self._local: list[Id] = []  # ids of local ops not yet handed out by take_pending
        self._held: dict[bytes, list[OpRun]] = {}  # per replica, sorted, disjoint

    # -- reading ---------------------------------------------------------------------------

    def value(self) -> str:
        """Returns: the visible text."""
        return "".join(
            item.char for chunk in self._chunks for item in chunk.items if not item.deleted
        )

    def __str__(self) -> str:
        return self.value()

    def __len__(self) -> int:
        return self._visible

    def version(self) -> dict[bytes, int]:
        """Returns: per replica, the highest counter up to which all its ops are integrated."""
        return dict(self._version)

    # -- positions -------------------------------------------------------------------------

    def _item_at(self, pos: Pos) -> _Item:
        return self._chunks[pos[0]].items[pos[1]]

    def _end(self) -> Pos:
        return (len(self._chunks), 0)

    def _next(self, pos: Pos) -> Pos:
        chunk, index = pos
        if index + 1 < len(self._chunks[chunk].items):
            return (chunk, index + 1)
        return (chunk + 1, 0)

    def _position(self, ident: Id) -> Pos:
        item = self._items[ident]
        assert item.chunk is not None
        return (self._chunks.index(item.chunk), item.chunk.items.index(item))

    def _visible_position(self, index: int) -> Pos:
        """Returns: the raw position of the ``index``-th visible character."""
        for number, chunk in enumerate(self._chunks):
            if index < chunk.visible:
                for offset, item in enumerate(chunk.items):
                    if not item.deleted:
                        if index == 0:
                            return (number, offset)
                        index -= 1
            index -= chunk.visible
        raise AssertionError("visible index beyond the text")

    def _place(self, pos: Pos, item: _Item) -> Pos:
        """Puts ``item`` at raw position ``pos`` (before the item there).

        Returns:
            The position of ``item`` afterwards (a full chunk splits).
        """
        if pos[0] == len(self._chunks):
            if not self._chunks or len(self._chunks[-1].items) >= CHUNK_MAX:
                self._chunks.append(_Chunk([]))
            pos = (len(self._chunks) - 1, len(self._chunks[-1].items))
        chunk = self._chunks[pos[0]]
        chunk.items.insert(pos[1], item)
        item.chunk = chunk
        if not item.deleted:
            chunk.visible += 1
            self._visible += 1
        self._items[item.ident()] = item
        if len(chunk.items) > CHUNK_MAX:
            half = len(chunk.items) // 2
            right = _Chunk(chunk.items[half:])
            del chunk.items[half:]
            chunk.visible -= right.visible
            self._chunks.insert(pos[0] + 1, right)
            if pos[1] >= half:
                return (pos[0] + 1, pos[1] - half)
        return pos

    # -- local edits -----------------------------------------------------------------------

    def _next_counter(self, count: int) -> int:
        counter = self._version.get(self._replica, 0) + 1
        if counter + count - 1 > MAX_COUNTER:
            raise CoreUsageError("this replica used up its op counters (MAX_COUNTER)")
        return counter

    def insert(self, pos: int, text: str) -> None:
        """Inserts ``text`` so that it starts at visible position ``pos``.

        Args:
            pos: 0..len(self).
            text: the characters to insert (may be empty).

        Raises:
            CoreUsageError: ``pos`` is out of range or ``text`` is not a str.
        """
        if not isinstance(text, str) or not isinstance(pos, int) or not 0 <= pos <= len(self):
            raise CoreUsageError(f"insert at {pos!r} outside 0..{len(self)} or text not str")
        if not text:
            return
        counter = self._next_counter(len(text))
        if pos == 0:
            left: Id | None = None
            at = (0, 0) if self._chunks else self._end()
        else:
            before = self._visible_position(pos - 1)
            left = self._item_at(before).ident()
            at = self._next(before)
        right = None if at == self._end() else self._item_at(at).ident()
        # Nothing lies between `left` and `right` (right is left's raw successor), so
        # integration places the new characters at `at` without a scan.
        for i, char in enumerate(text):
            item = _Item(self._replica, counter + i, char, left, right, False)
            at = self._next(self._place(at, item))
            left = item.ident()
            self._local.append(left)
        self._version[self._replica] = counter + len(text) - 1

    def delete(self, pos: int, length: int) -> None:
        """Deletes ``length`` visible characters from visible position ``pos``.

        Args:
            pos: first character to delete.
            length: how many; ``pos + length <= len(self)``.

        Raises:
            CoreUsageError: the range is outside the text.
        """
        if (
            not isinstance(pos, int)
            or not isinstance(length, int)
            or pos < 0
            or length < 0
            or pos + length > len(self)
        ):
            raise CoreUsageError(f"delete {pos!r}+{length!r} outside 0..{len(self)}")
        if length == 0:
            return
        counter = self._next_counter(length)
        targets: list[_Item] = []
        at = self._visible_position(pos)
        while len(targets) < length:
            item = self._item_at(at)
            if not item.deleted:
                targets.append(item)
            at = self._next(at)
        # ops take counters in document order of their targets
        for i, item in enumerate(targets):
            op = DeleteRun(self._replica, counter + i, 1, item.agent, item.counter, 1)
            self._delete_item(item)
            self._deletes[(op.agent, op.counter)] = op
            self._local.append((op.agent, op.counter))
        self._version[self._replica] = counter + length - 1

    def _delete_item(self, item: _Item) -> bool:
        if item.deleted:
            return False
        item.deleted = True
        assert item.chunk is not None
        item.chunk.visible -= 1
        self._visible -= 1
        return True

    # -- ops out ---------------------------------------------------------------------------

    def _op(self, ident: Id) -> OpRun:
        """Returns: the integrated op ``ident`` as a one-op run."""
        item = self._items.get(ident)
        if item is None:
            return self._deletes[ident]
        return InsertRun(
            item.agent, item.counter, 1, item.char, item.origin_left, item.origin_right
        )

    def take_pending(self) -> bytes:
        """Returns: the delta of the local ops since the last call; ``b""`` if none."""
        ops = [self._op(ident) for ident in self._local]
        self._local = []
        return _encode_delta(_merge_runs(ops))

    def encode_since(self, version: Mapping[bytes, int]) -> bytes:
        """Returns: the delta of every integrated op the holder of ``version`` lacks.

        Args:
            version: a replica's ``version()``.

        Raises:
            CoreUsageError: ``version`` is not a mapping of bytes to ints.
        """
        _check_version(version)
        idents = [
            ident
            for ident in list(self._items) + list(self._deletes)
            if ident[1] > version.get(ident[0], 0)
        ]
        idents.sort()
        return _encode_delta(_merge_runs([self._op(ident) for ident in idents]))

    # -- ops in ----------------------------------------------------------------------------

    def apply(self, delta: bytes) -> bool:
        """Merges a remote delta (any order, duplicates fine).

        Ops whose causal predecessors are missing are held until those arrive.

        Args:
            delta: bytes from ``take_pending`` or ``encode_since`` of any replica.

        Returns:
            True if the visible text changed.

        Raises:
            DecodeError: the delta is malformed or breaks a limit; nothing changed.
        """
        if len(delta) == 0:
            return False
        runs = _decode_delta(delta)
        if sum(len(held) for held in self._held.values()) + len(runs) > MAX_HELD_RUNS:
            raise DecodeError("too many ops waiting for their predecessors (MAX_HELD_RUNS)")
        for run in runs:
            self._hold(run)
        return self._integrate_held()

    def _hold(self, run: OpRun) -> None:
        """Adds the part of ``run`` that is neither integrated nor already held."""
        done = self._version.get(run.agent, 0)
        if run.end() <= done + 1:
            return
        if run.counter <= done:
            run = run.tail(done + 1 - run.counter)
        held = self._held.setdefault(run.agent, [])
        pieces: list[OpRun] = []
        # held runs are sorted and disjoint: visit those overlapping ``run``; for every
        # counter the first arrival wins
        at = bisect.bisect_right(held, run.counter, key=_run_end)
        while at < len(held) and held[at].counter < run.end():
            other = held[at]
            if other.counter > run.counter:
                pieces.append(run.head(other.counter - run.counter))
            if other.end() >= run.end():
                run = run.head(0)
                break
            run = run.tail(other.end() - run.counter)
            at += 1
        if run.length:
            pieces.append(run)
        for piece in pieces:
            bisect.insort(held, piece, key=_run_counter)

    def _is_item(self, ident: Id | None) -> bool:
        return ident is None or ident in self._items

    def _can_insert(self, op: InsertRun) -> bool:
        """Returns: True when both origins of ``op`` are here, left before right.

        A valid op's origin_right follows its origin_left in every replica, because items
        never move; an op breaking that came from a broken peer and stays held for ever.
        """
        left, right = op.origin_left, op.origin_right
        if not (self._is_item(left) and self._is_item(right)):
            return False
        return left is None or right is None or self._position(left) < self._position(right)

    def _integrate_held(self) -> bool:
        """Integrates every held op whose predecessors are present. Returns: text changed."""
        changed = False
        progress = True
        while progress:
            progress = False
            for agent in sorted(self._held):
                held = self._held[agent]
                taken = 0
                while taken < len(held) and held[taken].counter == self._version.get(agent, 0) + 1:
                    run = held[taken]
                    done = 0
                    for op in _single_ops(run):
                        if isinstance(op, InsertRun):
                            if not self._can_insert(op):
                                break
                            item = _Item(
                                op.agent,
                                op.counter,
                                op.content,
                                op.origin_left,
                                op.origin_right,
                                False,
                            )
                            self._integrate(item)
                            changed = True
                        else:
                            target = self._items.get((op.target_agent, op.target))
                            if target is None:
                                break
                            changed |= self._delete_item(target)
                            self._deletes[(op.agent, op.counter)] = op
                        self._version[agent] = op.counter
                        done += 1
                    if done == 0:
                        break
                    progress = True
                    if done < run.length:
                        held[taken] = run.tail(done)
                        break
                    taken += 1
                del held[:taken]
                if not held:
                    del self._held[agent]
        return changed

    def _integrate(self, item: _Item) -> None:
        """Places a remote item between its origins: FugueMax ("YjsMod") order.

        Scans the items between ``origin_left`` and ``origin_right``. An item ``other``
        whose origin_left lies left of ours ends the scan (we go before it). One with the
        same origin_left is a sibling: if its origin_right lies further right it and its
        subtree stay left of us; if both origins are equal the smaller replica id goes
        first; if its origin_right lies nearer, we may still belong after it, so we
        remember where we were (``scanning``) until that is decided. Items whose
        origin_left lies right of ours belong to a sibling's subtree and are skipped.
        """
        before: Pos = (-1, -1)  # a position left of every item
        end = self._end()
        left = before if item.origin_left is None else self._position(item.origin_left)
        right = end if item.origin_right is None else self._position(item.origin_right)
        cursor = (0, 0) if item.origin_left is None else self._next(left)
        if not self._chunks:
            cursor = end
        dest = cursor
        scanning = False
        while True:
            if not scanning:
                dest = cursor
            if cursor in (end, right):
                break
            other = self._item_at(cursor)
            other_left = before if other.origin_left is None else self._position(other.origin_left)
            if other_left < left:
                break
            if other_left == left:
                other_right = (
                    end if other.origin_right is None else self._position(other.origin_right)
                )
                if other_right < right:
                    scanning = True
                elif other_right == right:
                    if item.agent < other.agent:
                        break
                    scanning = False
                else:
                    scanning = False
            cursor = self._next(cursor)
        self._place(dest, item)

    # -- state -----------------------------------------------------------------------------

    def encode_state(self) -> bytes:
        """Returns: a snapshot of the whole text (items, delete ops, held ops).

        Layout (docs/text.md): format, flags (0), then two sections (see ``_pack``):
        the metadata ``agents, n_item_runs, n_delete_runs, the N_COLUMNS columns (each
        uint(byte length) + varints), held delta (uint(length) + bytes)`` and the
        content, the UTF-8 text of every item in document order. Item runs are in
        document order; delete runs in (agent, counter) order. Keeping each field in its
        own column lets deflate find the repetitions.
        """
        items = [item for chunk in self._chunks for item in chunk.items]
        runs: list[list[_Item]] = []
        for item in items:
            last = runs[-1][-1] if runs else None
            if (
                last is not None
                and last.agent == item.agent
                and last.counter + 1 == item.counter
                and item.origin_left == last.ident()
                and item.origin_right == last.origin_right
                and item.deleted == last.deleted
            ):
                runs[-1].append(item)
            else:
                runs.append([item])
        deletes = _merge_runs([self._deletes[k] for k in sorted(self._deletes)])
        held = _encode_delta([run for agent in sorted(self._held) for run in self._held[agent]])
        names = {item.agent for item in items} | {d.agent for d in deletes}
        body = bytearray()
        index = _put_agents(body, sorted(names))
        _put_uint(body, len(runs))
        _put_uint(body, len(deletes))
        col = [bytearray() for _ in range(N_COLUMNS)]
        expected: dict[bytes, int] = {}
        content: list[str] = []
        for number, run in enumerate(runs):
            first, last = run[0], run[-1]
            flags = SF_DELETED if first.deleted else 0
            if first.origin_left is None:
                flags |= SF_OL_NONE
            elif number and first.origin_left == runs[number - 1][-1].ident():
                flags |= SF_OL_PREV
            if first.origin_right is None:
                flags |= SF_OR_NONE
            elif number + 1 < len(runs) and first.origin_right == runs[number + 1][0].ident():
                flags |= SF_OR_NEXT
            elif number and first.origin_right == runs[number - 1][0].origin_right:
                flags |= SF_OR_SAME
            if number and runs[number - 1][0].agent == first.agent:
                flags |= SF_SAME_AGENT
            _put_uint(col[COL_HEAD], len(run) << SF_BITS | flags)
            if not flags & SF_SAME_AGENT:
                _put_uint(col[COL_AGENT], index[first.agent])
            _put_sint(col[COL_COUNTER], first.counter - expected.get(first.agent, 1))
            expected[first.agent] = last.counter + 1
            for ident, skip in (
                (first.origin_left, SF_OL_PREV | SF_OL_NONE),
                (first.origin_right, SF_OR_NEXT | SF_OR_NONE),
            ):
                if not flags & skip:
                    assert ident is not None
                    _put_uint(col[COL_ORIGIN_AGENT], index[ident[0]])
                    _put_sint(col[COL_ORIGIN_COUNTER], ident[1] - first.counter)
            content.append("".join(item.char for item in run))
        previous_agent, previous_end, previous_target = b"", 1, 0
        for op_run in deletes:
            assert isinstance(op_run, DeleteRun)
            if op_run.agent != previous_agent:
                previous_agent, previous_end = op_run.agent, 1
            backward = op_run.step < 0 and op_run.length > 1
            _put_uint(col[COL_DEL_HEAD], index[op_run.agent] << 1 | backward)
            _put_uint(col[COL_DEL_GAP], op_run.counter - previous_end)
            _put_uint(col[COL_DEL_LENGTH], op_run.length)
            _put_uint(col[COL_DEL_TARGET_AGENT], index[op_run.target_agent])
            _put_sint(col[COL_DEL_TARGET], op_run.target - previous_target)
            previous_end, previous_target = op_run.end(), op_run.target
        for column in col:
            _put_uint(body, len(column))
            body += column
        _put_uint(body, len(held))
        body += held
        text = "".join(content).encode("utf-8", "surrogatepass")
        # two sections, deflated apart: faster and smaller than one stream of both
        out = bytearray((FORMAT_STATE, 0))
        _pack(out, bytes(body))
        _pack(out, text)
        return bytes(out)

    @classmethod
    def decode_state(cls, data: bytes, replica_id: bytes) -> Text:
        """Rebuilds a text from :meth:`encode_state` bytes.

        Args:
            data: a snapshot from any replica.
            replica_id: the id this copy will edit as (its counters continue the
                version the snapshot holds for that id).

        Returns:
            The text.

        Raises:
            DecodeError: the snapshot is malformed or inconsistent.
            CoreUsageError: ``replica_id`` is not bytes of an allowed length.
        """
        text = cls(replica_id)
        outer = _Reader(_unframe(FORMAT_STATE, data))
        reader = _Reader(_unpack(outer))
        content_bytes = _unpack(outer)
        if not outer.done():
            raise DecodeError("trailing bytes after the state")
        agents = _read_agents(reader)
        n_runs = reader.count("item run")
        n_deletes = reader.count("delete run")
        col = [_Reader(reader.take(reader.uint())) for _ in range(N_COLUMNS)]
        expected: dict[bytes, int] = {}
        # (agent, counter, length, deleted, origin_left, origin_right) in document order
        rows: list[tuple[bytes, int, int, bool, Id | None, Id | None]] = []
        agent = b""
        next_first: list[int] = []  # rows whose origin_right is the next row's first char
        for number in range(n_runs):
            head = col[COL_HEAD].uint()
            flags, length = head & ((1 << SF_BITS) - 1), head >> SF_BITS
            if flags & SF_OL_PREV and flags & SF_OL_NONE:
                raise DecodeError("contradictory run flags")
            if flags & SF_SAME_AGENT:
                if number == 0:
                    raise DecodeError("first run cannot repeat the previous replica")
            else:
                agent = _agent(agents, col[COL_AGENT].uint())
            counter = expected.get(agent, 1) + col[COL_COUNTER].sint()
            _check_span(counter, length)
            expected[agent] = counter + length
            ids: list[Id | None] = []
            for prev_next, none in ((SF_OL_PREV, SF_OL_NONE), (SF_OR_NEXT, SF_OR_NONE)):
                if prev_next == SF_OR_NEXT and flags & SF_OR_SAME == SF_OR_SAME:
                    if number == 0:
                        raise DecodeError("first run has no previous run")
                    if next_first and next_first[-1] == number - 1:
                        ids.append((agent, counter))  # the previous run's is this run's first
                    else:
                        ids.append(rows[-1][5])
                elif flags & none:
                    ids.append(None)
                elif flags & prev_next:
                    if prev_next == SF_OL_PREV:
                        if number == 0:
                            raise DecodeError("first run has no previous run")
                        prev = rows[-1]
                        ids.append((prev[0], prev[1] + prev[2] - 1))
                    else:
                        ids.append(None)  # filled in when the next row is read
                        next_first.append(number)
                else:
                    ref_agent = _agent(agents, col[COL_ORIGIN_AGENT].uint())
                    ref = counter + col[COL_ORIGIN_COUNTER].sint()
                    _check_span(ref, 1)
                    ids.append((ref_agent, ref))
            rows.append((agent, counter, length, bool(flags & SF_DELETED), ids[0], ids[1]))
        for number in next_first:
            if number + 1 >= len(rows):
                raise DecodeError("last run has no next run")
            row, nxt = rows[number], rows[number + 1]
            rows[number] = (*row[:5], (nxt[0], nxt[1]))
        deletes: list[DeleteRun] = []
        previous_agent, previous_end, previous_target = b"", 1, 0
        for _ in range(n_deletes):
            head = col[COL_DEL_HEAD].uint()
            del_agent = _agent(agents, head >> 1)
            if del_agent != previous_agent:
                previous_agent, previous_end = del_agent, 1
            counter = previous_end + col[COL_DEL_GAP].uint()
            length = col[COL_DEL_LENGTH].uint()
            _check_span(counter, length)
            target_agent = _agent(agents, col[COL_DEL_TARGET_AGENT].uint())
            target = previous_target + col[COL_DEL_TARGET].sint()
            step = -1 if head & 1 else 1
            last = target + (length - 1) * step
            if min(target, last) < 1 or max(target, last) > MAX_COUNTER:
                raise DecodeError("delete target out of range")
            deletes.append(DeleteRun(del_agent, counter, length, target_agent, target, step))
            previous_end, previous_target = counter + length, target
        if not all(column.done() for column in col):
            raise DecodeError("trailing bytes in a column")
        held_bytes = reader.take(reader.uint())
        held_runs = _decode_delta(held_bytes) if held_bytes else []
        if not reader.done():
            raise DecodeError("trailing bytes after the state")
        content = _text_of(content_bytes, sum(row[2] for row in rows))
        if len(held_runs) > MAX_HELD_RUNS:
            raise DecodeError("too many held ops (MAX_HELD_RUNS)")
        text._load(rows, deletes, content)
        for run in held_runs:
            text._hold(run)
        # a snapshot from encode_state never holds an op that could integrate; a crafted one
        # may, and integrating it now gives the state any replica would reach
        text._integrate_held()
        return text

    def _load(
        self,
        rows: list[tuple[bytes, int, int, bool, Id | None, Id | None]],
        deletes: list[DeleteRun],
        content: str,
    ) -> None:
        """Builds the item list from decoded rows and checks that it is consistent."""
        items: list[_Item] = []
        offset = 0
        for agent, counter, length, deleted, left, right in rows:
            for i in range(length):
                items.append(
                    _Item(
                        agent,
                        counter + i,
                        content[offset + i],
                        left if i == 0 else (agent, counter + i - 1),
                        right,
                        deleted,
                    )
                )
            offset += length
        order: dict[Id, int] = {}
        for number, item in enumerate(items):
            if item.ident() in order:
                raise DecodeError("duplicate item id")
            order[item.ident()] = number
        for number, item in enumerate(items):
            if item.origin_left is not None and order.get(item.origin_left, number) >= number:
                raise DecodeError("origin_left missing or not left of its item")
            if item.origin_right is not None and order.get(item.origin_right, -1) <= number:
                raise DecodeError("origin_right missing or not right of its item")
        counters: dict[bytes, list[tuple[int, int]]] = {}
        for agent, counter, length, *_ in rows:
            counters.setdefault(agent, []).append((counter, length))
        targeted: set[Id] = set()
        for run in deletes:
            counters.setdefault(run.agent, []).append((run.counter, run.length))
            for op in _single_ops(run):
                assert isinstance(op, DeleteRun)
                if (op.target_agent, op.target) not in order:
                    raise DecodeError("delete target missing")
                targeted.add((op.target_agent, op.target))
        if any(item.deleted != (item.ident() in targeted) for item in items):
            raise DecodeError("deleted flags disagree with the delete ops")
        version: dict[bytes, int] = {}
        for agent, spans in counters.items():
            spans.sort()
            expect = 1
            for counter, length in spans:
                if counter != expect:
                    raise DecodeError("op counters of a replica are not contiguous from 1")
                expect = counter + length
            version[agent] = expect - 1
        for start in range(0, len(items), CHUNK_MAX // 2):
            chunk = _Chunk(items[start : start + CHUNK_MAX // 2])
            self._chunks.append(chunk)
            self._visible += chunk.visible
        self._items = {item.ident(): item for item in items}
        for run in deletes:
            for op in _single_ops(run):
                assert isinstance(op, DeleteRun)
                self._deletes[(op.agent, op.counter)] = op
        self._version = version


def validate_delta(delta: bytes) -> None:
    """Checks that ``delta`` decodes, without a Text: what ``Text.apply`` checks first.

    ``apply`` can still refuse a valid delta when too many ops would wait for their
    predecessors (``MAX_HELD_RUNS``), which depends on the receiving text.

    Args:
        delta: bytes from ``take_pending`` or ``encode_since`` (``b""`` is valid).

    Raises:
        DecodeError: the delta is malformed or breaks a limit.
    """
    if len(delta):
        _decode_delta(delta)


def _check_version(version: object) -> None:
    if not isinstance(version, Mapping) or not all(
        isinstance(k, bytes) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in version.items()
    ):
        raise CoreUsageError("version must map replica ids (bytes) to counters (int)")
