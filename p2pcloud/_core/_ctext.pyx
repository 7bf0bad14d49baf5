# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Sequence CRDT for text and lists: the fast Cython implementation.

Theory of operation
-------------------
The readable twin, ``_reference_text.py``, is the specification: this module must give the
same values, deltas and state bytes on every input (tests/core/test_text_twin.py checks it
on random concurrent edit streams). Only the representation differs:

* characters live in *runs* (``Run``): consecutive characters inserted by one replica with
  contiguous counters, each character's origin_left being the previous one, all sharing
  one origin_right, all deleted or all visible. Runs sit in a pool of C structs and are
  never moved; deleting inside a run splits it into *fragments* linked in counter order
  (``next_frag``), and adjacent deleted fragments of one insert merge back;
* the document order is a list of ``Block``s of at most ``BLOCK_CAP`` run indices, each
  with its visible and raw (tombstones included) lengths, so a position lookup skips whole
  blocks; a cursor cache (block + visible chars before it) makes sequential typing O(1);
* per replica, an index of *chains* (one per insert op run, sorted by counter) finds the
  run holding an id: binary search, then a walk along the chain's fragments;
* a local insert that continues the run before the cursor just grows that run: the
  automerge-paper trace becomes a few thousand runs, not 180,000 items;
* the delete log keeps delete ops as runs (forward or backward, for backspacing).

Held ops (waiting for predecessors) and deltas are Python lists; they are off the
typing hot path. The state snapshot is written and read in C. No I/O, no clock.
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.unicode cimport (
    PyUnicode_DATA,
    PyUnicode_FromKindAndData,
    PyUnicode_KIND,
    PyUnicode_READ,
)
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.string cimport memcpy, memmove

import bisect
import zlib
from collections.abc import Mapping

from p2pcloud._core import _reference_text as _spec
from p2pcloud.errors import CoreUsageError, DecodeError

# the limits and format constants are the specification's (one source of truth)
MIN_REPLICA_ID = _spec.MIN_REPLICA_ID
MAX_REPLICA_ID = _spec.MAX_REPLICA_ID
MAX_COUNTER = _spec.MAX_COUNTER
MAX_ENCODED_BYTES = _spec.MAX_ENCODED_BYTES
MAX_AGENTS_PER_MESSAGE = _spec.MAX_AGENTS_PER_MESSAGE
MAX_HELD_RUNS = _spec.MAX_HELD_RUNS

cdef int64_t C_MAX_COUNTER = _spec.MAX_COUNTER
cdef int64_t C_MAX_ENCODED = _spec.MAX_ENCODED_BYTES
cdef int64_t C_MAX_AGENTS = _spec.MAX_AGENTS_PER_MESSAGE
cdef int C_MIN_ID = _spec.MIN_REPLICA_ID
cdef int C_MAX_ID = _spec.MAX_REPLICA_ID
cdef int FORMAT_DELTA = _spec.FORMAT_DELTA
cdef int FORMAT_STATE = _spec.FORMAT_STATE
cdef int SF_DELETED = _spec.SF_DELETED
cdef int SF_OL_PREV = _spec.SF_OL_PREV
cdef int SF_OL_NONE = _spec.SF_OL_NONE
cdef int SF_OR_NEXT = _spec.SF_OR_NEXT
cdef int SF_OR_NONE = _spec.SF_OR_NONE
cdef int SF_OR_SAME = _spec.SF_OR_SAME
cdef int SF_SAME_AGENT = _spec.SF_SAME_AGENT
cdef int SF_BITS = _spec.SF_BITS
cdef int N_COLUMNS = _spec.N_COLUMNS
cdef int COL_HEAD = _spec.COL_HEAD
cdef int COL_AGENT = _spec.COL_AGENT
cdef int COL_COUNTER = _spec.COL_COUNTER
cdef int COL_ORIGIN_AGENT = _spec.COL_ORIGIN_AGENT
cdef int COL_ORIGIN_COUNTER = _spec.COL_ORIGIN_COUNTER
cdef int COL_DEL_HEAD = _spec.COL_DEL_HEAD
cdef int COL_DEL_GAP = _spec.COL_DEL_GAP
cdef int COL_DEL_LENGTH = _spec.COL_DEL_LENGTH
cdef int COL_DEL_TARGET_AGENT = _spec.COL_DEL_TARGET_AGENT
cdef int COL_DEL_TARGET = _spec.COL_DEL_TARGET
cdef int MAX_VARINT_BYTES = _spec.MAX_VARINT_BYTES

cdef enum:
    BLOCK_CAP = 64  # runs per block: a memmove of <= 256 bytes, lookups scan <= 64 runs
    LOAD_FILL = 48  # runs per block when loading a snapshot: room to grow before splits
    NONE = -1

cdef int64_t KEY_END = 0x7FFFFFFFFFFFFFFF  # position key of "the end of the text"


cdef struct Run:
    int32_t agent        # internal replica index
    int32_t counter      # id of the first character
    int32_t length
    int32_t ol_agent     # origin_left of the first character, NONE = start of the text
    int32_t ol_counter
    int32_t or_agent     # origin_right of every character, NONE = end of the text
    int32_t or_counter
    int32_t block        # the block that holds this run
    int32_t next_frag    # the fragment with the next counters of the same insert, or NONE
    int32_t deleted
    int64_t content      # index of the first character in the content buffer


cdef struct Block:
    int32_t n
    int32_t ord          # index in the order array
    int64_t vis
    int64_t raw
    int32_t runs[BLOCK_CAP]


cdef struct Chain:
    int32_t start        # first counter of one integrated insert op run
    int32_t end          # counter after its last one
    int32_t head         # its first fragment
    int32_t n_frags      # fragments listed in ``frags`` (0 while the run is whole)
    int32_t cap_frags
    int32_t *frags       # its fragments in counter order, once it has been split


cdef struct Agent:
    Chain *chains
    int32_t n_chains
    int32_t cap_chains
    int32_t version


cdef struct DelRun:
    int32_t agent
    int32_t counter
    int32_t length
    int32_t target_agent
    int32_t target
    int32_t step


cdef struct DelBuf:
    DelRun *p
    Py_ssize_t n
    Py_ssize_t cap


cdef struct Buf:
    unsigned char *p
    Py_ssize_t n
    Py_ssize_t cap


cdef struct Rd:
    const unsigned char *p
    Py_ssize_t n
    Py_ssize_t pos


cdef struct Span:        # for sorting counter spans and id intervals
    int64_t agent
    int64_t start
    int64_t end
    int64_t extra


# -- small C helpers -------------------------------------------------------------------------


cdef int _grow(void **p, Py_ssize_t *cap, Py_ssize_t need, Py_ssize_t size) except -1:
    """Makes room for ``need`` elements of ``size`` bytes (doubling)."""
    cdef Py_ssize_t new_cap
    cdef void *q
    if need <= cap[0]:
        return 0
    new_cap = cap[0] * 2 if cap[0] else 16
    while new_cap < need:
        new_cap *= 2
    q = PyMem_Realloc(p[0], new_cap * size)
    if q == NULL:
        raise MemoryError()
    p[0] = q
    cap[0] = new_cap
    return 0


cdef inline int buf_put(Buf *b, unsigned char c) except -1:
    if b.n == b.cap:
        _grow(<void **>&b.p, &b.cap, b.n + 1, 1)
    b.p[b.n] = c
    b.n += 1
    return 0


cdef inline int put_uint(Buf *b, uint64_t v) except -1:
    while v >= 0x80:
        buf_put(b, <unsigned char>((v & 0x7F) | 0x80))
        v >>= 7
    buf_put(b, <unsigned char>v)
    return 0


cdef inline int put_sint(Buf *b, int64_t v) except -1:
    if v >= 0:
        put_uint(b, (<uint64_t>v) << 1)
    else:
        put_uint(b, ((<uint64_t>(-v)) << 1) - 1)
    return 0


cdef int put_raw(Buf *b, const unsigned char *s, Py_ssize_t n) except -1:
    _grow(<void **>&b.p, &b.cap, b.n + n, 1)
    if n:
        memcpy(b.p + b.n, s, n)
    b.n += n
    return 0


cdef int put_bytes(Buf *b, bytes data) except -1:
    put_uint(b, len(data))
    put_raw(b, <const unsigned char *>data, len(data))
    return 0


cdef bytes buf_bytes(Buf *b):
    if b.n == 0:
        return b""
    return (<char *>b.p)[:b.n]


cdef void buf_free(Buf *b) noexcept:
    PyMem_Free(b.p)
    b.p = NULL
    b.n = b.cap = 0


cdef int64_t rd_uint(Rd *r) except -1:
    cdef uint64_t result = 0
    cdef int shift = 0
    cdef int k
    cdef unsigned char byte
    for k in range(MAX_VARINT_BYTES):
        if r.pos >= r.n:
            raise DecodeError("truncated varint")
        byte = r.p[r.pos]
        r.pos += 1
        if shift < 64:
            result |= (<uint64_t>(byte & 0x7F)) << shift
        if byte < 0x80:
            # a 10th byte may only carry the 64th bit, which the range check rejects anyway
            if (k == 9 and byte > 1) or result >= (<uint64_t>1) << 63:
                raise DecodeError("varint out of range")
            return <int64_t>result
        shift += 7
    raise DecodeError("varint too long")


cdef int64_t rd_sint(Rd *r) except? -1:
    cdef int64_t raw = rd_uint(r)
    if raw & 1:
        return -((raw + 1) >> 1)
    return raw >> 1


cdef int64_t rd_count(Rd *r) except -1:
    cdef int64_t value = rd_uint(r)
    if value > r.n - r.pos:
        raise DecodeError("count larger than the data")
    return value


cdef int check_span(int64_t counter, int64_t length) except -1:
    if (counter < 1 or length < 1 or counter > C_MAX_COUNTER or length > C_MAX_COUNTER
            or counter + length - 1 > C_MAX_COUNTER):
        raise DecodeError("op counter out of range")
    return 0


cdef inline Py_UCS4 _get_char(const unsigned char *p, int kind, Py_ssize_t k) noexcept:
    if kind == 1:
        return p[k]
    if kind == 2:
        return (<const unsigned short *>p)[k]
    return (<const Py_UCS4 *>p)[k]


cdef inline void _put_char(unsigned char *p, int kind, Py_ssize_t k, Py_UCS4 ch) noexcept:
    if kind == 1:
        p[k] = <unsigned char>ch
    elif kind == 2:
        (<unsigned short *>p)[k] = <unsigned short>ch
    else:
        (<Py_UCS4 *>p)[k] = ch


cdef int _sort_spans(Span *a, Py_ssize_t n) except -1:
    """Sorts spans by (agent, start): LSD radix sort, 5 passes of 11 bits.

    Agents are replica indices (< MAX_AGENTS_PER_MESSAGE = 2^16) and starts counters
    (< 2^31), so the key ``agent << 31 | start`` has 47 bits: 5 x 11 = 55 cover it. Loading
    a snapshot sorts tens of thousands of spans; this is several times faster than qsort.
    """
    cdef Span *tmp
    cdef Span *src = a
    cdef Span *dst
    cdef Span *swap
    cdef Py_ssize_t count[2048]
    cdef Py_ssize_t k, total, c
    cdef int shift, d
    cdef uint64_t key
    if n < 2:
        return 0
    tmp = <Span *>PyMem_Malloc(n * sizeof(Span))
    if tmp == NULL:
        raise MemoryError()
    dst = tmp
    for shift in range(0, 55, 11):
        for d in range(2048):
            count[d] = 0
        for k in range(n):
            key = ((<uint64_t>src[k].agent) << 31) | <uint64_t>src[k].start
            count[(key >> shift) & 2047] += 1
        total = 0
        for d in range(2048):
            c = count[d]
            count[d] = total
            total += c
        for k in range(n):
            key = ((<uint64_t>src[k].agent) << 31) | <uint64_t>src[k].start
            d = (key >> shift) & 2047
            dst[count[d]] = src[k]
            count[d] += 1
        swap = src
        src = dst
        dst = swap
    if src != a:  # an odd number of passes left the result in tmp
        memcpy(a, src, n * sizeof(Span))
    PyMem_Free(tmp)
    return 0


# -- framing and the delta codec (Python lists as op runs) ------------------------------------
#
# An op run is a list: [0, agent, counter, length, content, origin_left, origin_right] for an
# insert, [1, agent, counter, length, target_agent, target, step] for a delete; ids are
# (bytes, int) tuples or None. They mirror the twin's InsertRun / DeleteRun.


cdef bytes _frame(int fmt, bytes body):
    cdef Buf b
    cdef bytes packed
    if len(body) >= _spec.DEFLATE_MIN:
        packed = zlib.compress(body, _spec.DEFLATE_LEVEL)
        b.p = NULL
        b.n = b.cap = 0
        try:
            buf_put(&b, <unsigned char>fmt)
            buf_put(&b, <unsigned char>_spec.FLAG_DEFLATED)
            put_uint(&b, len(body))
            put_raw(&b, <const unsigned char *>packed, len(packed))
            if b.n - 2 < len(body):
                return buf_bytes(&b)
        finally:
            buf_free(&b)
    return bytes((fmt, 0)) + body


cdef bytes _unframe(int fmt, object data):
    cdef bytes raw
    cdef Rd r
    cdef int64_t size
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("encoded text must be bytes")
    raw = bytes(data)
    if len(raw) > C_MAX_ENCODED:
        raise DecodeError("encoded text larger than MAX_ENCODED_BYTES")
    if len(raw) < 2 or raw[0] != fmt:
        raise DecodeError("not a text delta/state of this format")
    flags = raw[1]
    if flags & ~_spec.KNOWN_FLAGS:
        raise DecodeError("unknown flags")
    if not flags & _spec.FLAG_DEFLATED:
        return raw[2:]
    r.p = <const unsigned char *>raw
    r.n = len(raw)
    r.pos = 2
    size = rd_uint(&r)
    if size > C_MAX_ENCODED:
        raise DecodeError("inflated size larger than MAX_ENCODED_BYTES")
    return _inflate(raw[r.pos:], size)


cdef list _read_agents(Rd *r):
    cdef int64_t count = rd_count(r)
    cdef int64_t size
    cdef list agents = []
    cdef bytes agent
    if count > C_MAX_AGENTS:
        raise DecodeError("too many replicas")
    for _ in range(count):
        size = rd_uint(r)
        if size < C_MIN_ID or size > C_MAX_ID:
            raise DecodeError("bad replica id length")
        if size > r.n - r.pos:
            raise DecodeError("truncated")
        agent = (<const char *>r.p)[r.pos:r.pos + size]
        r.pos += size
        if agents and agent <= agents[len(agents) - 1]:
            raise DecodeError("replica table not strictly ascending")
        agents.append(agent)
    return agents


cdef inline object _agent_at(list agents, int64_t index):
    if index >= len(agents):
        raise DecodeError("replica index out of range")
    return agents[index]


cdef object _read_id(Rd *r, list agents):
    cdef int64_t tag = rd_uint(r)
    cdef int64_t counter
    if tag == 0:
        return None
    counter = rd_uint(r)
    check_span(counter, 1)
    return (_agent_at(agents, tag - 1), counter)


cdef int _put_id(Buf *b, dict index, object ident) except -1:
    if ident is None:
        put_uint(b, 0)
    else:
        put_uint(b, <int64_t>index[ident[0]] + 1)
        put_uint(b, ident[1])
    return 0


cdef int _put_agents(Buf *b, list agents) except -1:
    put_uint(b, len(agents))
    for agent in agents:
        put_bytes(b, agent)
    return 0


cdef bytes _encode_delta(list runs):
    """The delta bytes of canonical op runs sorted by (agent, counter): see the twin."""
    cdef Buf b
    cdef set names
    cdef list agents, content
    cdef dict index
    cdef bytes text
    if not runs:
        return b""
    names = set()
    for run in runs:
        names.add(run[1])
        if run[0] == 0:
            if run[5] is not None:
                names.add(run[5][0])
            if run[6] is not None:
                names.add(run[6][0])
        else:
            names.add(run[4])
    agents = sorted(names)
    index = {agent: i for i, agent in enumerate(agents)}
    content = []
    b.p = NULL
    b.n = b.cap = 0
    try:
        _put_agents(&b, agents)
        put_uint(&b, len(runs))
        for run in runs:
            if run[0] == 0:
                put_uint(&b, (<int64_t>index[run[1]]) << 2 | _spec.KIND_INSERT)
                put_uint(&b, run[2])
                put_uint(&b, run[3])
                _put_id(&b, index, run[5])
                _put_id(&b, index, run[6])
                content.append(run[4])
            else:
                kind = (_spec.KIND_DELETE_BACK if run[6] < 0 and run[3] > 1
                        else _spec.KIND_DELETE_FWD)
                put_uint(&b, (<int64_t>index[run[1]]) << 2 | kind)
                put_uint(&b, run[2])
                put_uint(&b, run[3])
                put_uint(&b, index[run[4]])
                put_uint(&b, run[5])
        text = "".join(content).encode("utf-8", "surrogatepass")
        put_bytes(&b, text)
        return _frame(FORMAT_DELTA, buf_bytes(&b))
    finally:
        buf_free(&b)


cdef bytes _pack(bytes data):
    """A snapshot section: see the twin's ``_pack``."""
    cdef Buf b
    cdef bytes packed
    b.p = NULL
    b.n = b.cap = 0
    try:
        if len(data) >= _spec.DEFLATE_MIN:
            packed = zlib.compress(data, _spec.DEFLATE_LEVEL)
            if len(packed) < len(data):
                put_uint(&b, (<uint64_t>len(data)) << 1 | 1)
                put_bytes(&b, packed)
                return buf_bytes(&b)
        put_uint(&b, (<uint64_t>len(data)) << 1)
        put_raw(&b, <const unsigned char *>data, len(data))
        return buf_bytes(&b)
    finally:
        buf_free(&b)


cdef bytes _inflate(bytes packed, int64_t size):
    inflater = zlib.decompressobj()
    try:
        body = inflater.decompress(packed, size)
    except zlib.error as exc:
        raise DecodeError("bad deflate stream") from exc
    if len(body) != size or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise DecodeError("deflate stream does not match its declared size")
    return body


cdef bytes _take(Rd *r, int64_t size):
    if size > r.n - r.pos:
        raise DecodeError("truncated")
    r.pos += size
    return (<const char *>r.p)[r.pos - size:r.pos]


cdef bytes _unpack(Rd *r):
    """The next snapshot section, inflated (the twin's ``_unpack``)."""
    cdef int64_t head = rd_uint(r)
    cdef int64_t size = head >> 1
    if size > C_MAX_ENCODED:
        raise DecodeError("section larger than MAX_ENCODED_BYTES")
    if not head & 1:
        return _take(r, size)
    return _inflate(_take(r, rd_uint(r)), size)


cdef str _text_of(bytes data, int64_t chars):
    cdef str text
    if chars > len(data):
        raise DecodeError("content length does not match the runs")
    try:
        text = data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as exc:
        raise DecodeError("content is not UTF-8") from exc
    if len(text) != chars:
        raise DecodeError("content length does not match the runs")
    return text


cdef str _read_text(Rd *r, int64_t chars):
    cdef int64_t size = rd_uint(r)
    cdef str text
    if chars > size or size > r.n - r.pos:
        raise DecodeError("content length does not match the runs")
    try:
        text = (<const char *>r.p)[r.pos:r.pos + size].decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as exc:
        raise DecodeError("content is not UTF-8") from exc
    r.pos += size
    if len(text) != chars:
        raise DecodeError("content length does not match the runs")
    return text


cdef list _decode_delta(object data):
    """The op runs of a delta. Raises DecodeError (malformed or out of bounds)."""
    cdef bytes body = _unframe(FORMAT_DELTA, data)
    cdef Rd r
    cdef list agents, runs, inserts
    cdef int64_t head, kind, counter, length, target, step, last, chars = 0, offset
    cdef str text
    r.p = <const unsigned char *>body
    r.n = len(body)
    r.pos = 0
    agents = _read_agents(&r)
    runs = []
    inserts = []
    for _ in range(rd_count(&r)):
        head = rd_uint(&r)
        agent = _agent_at(agents, head >> 2)
        kind = head & 3
        counter = rd_uint(&r)
        length = rd_uint(&r)
        check_span(counter, length)
        if kind == _spec.KIND_INSERT:
            left = _read_id(&r, agents)
            right = _read_id(&r, agents)
            run = [0, agent, counter, length, "", left, right]
            inserts.append(run)
            runs.append(run)
            chars += length
        elif kind == 3:
            raise DecodeError("unknown op kind")
        else:
            target_agent = _agent_at(agents, rd_uint(&r))
            target = rd_uint(&r)
            step = 1 if kind == _spec.KIND_DELETE_FWD else -1
            if target < 1 or target > C_MAX_COUNTER:
                raise DecodeError("delete target out of range")
            last = target + (length - 1) * step
            if min(target, last) < 1 or max(target, last) > C_MAX_COUNTER:
                raise DecodeError("delete target out of range")
            runs.append([1, agent, counter, length, target_agent, target, step])
    text = _read_text(&r, chars)
    offset = 0
    for run in inserts:
        run[4] = text[offset:offset + run[3]]
        offset += run[3]
    if r.pos != r.n:
        raise DecodeError("trailing bytes after the delta")
    return runs


cdef inline int64_t _run_end(list run):
    return run[2] + run[3]


cdef list _tail(list run, int64_t skip):
    if run[0] == 0:
        return [0, run[1], run[2] + skip, run[3] - skip, run[4][skip:],
                (run[1], run[2] + skip - 1) if skip else run[5], run[6]]
    return [1, run[1], run[2] + skip, run[3] - skip, run[4], run[5] + skip * run[6], run[6]]


cdef list _head(list run, int64_t keep):
    if run[0] == 0:
        return [0, run[1], run[2], keep, run[4][:keep], run[5], run[6]]
    return [1, run[1], run[2], keep, run[4], run[5], run[6]]


cdef int _push_del(DelBuf *d, int32_t a, int32_t c, int64_t n, int32_t ta, int64_t t,
                   int32_t step) except -1:
    """Appends delete ops to canonical runs with the twin's greedy rule (_merge_runs)."""
    cdef DelRun *last
    while n > 0:
        if d.n > 0:
            last = &d.p[d.n - 1]
            if last.agent == a and last.counter + last.length == c and last.target_agent == ta:
                if last.length == 1 and (t == last.target + 1 or t == last.target - 1):
                    last.step = <int32_t>(t - last.target)
                    last.length = 2
                    c += 1
                    t += step
                    n -= 1
                    continue
                if last.length > 1 and t == last.target + <int64_t>last.length * last.step:
                    if n > 1 and step == last.step:
                        last.length += <int32_t>n
                        return 0
                    last.length += 1
                    c += 1
                    t += step
                    n -= 1
                    continue
        _grow(<void **>&d.p, &d.cap, d.n + 1, sizeof(DelRun))
        last = &d.p[d.n]
        d.n += 1
        last.agent = a
        last.counter = c
        last.length = <int32_t>n
        last.target_agent = ta
        last.target = <int32_t>t
        last.step = step if n > 1 else 1
        return 0
    return 0


def validate_delta(delta):
    """Checks that ``delta`` decodes, without a Text (see the twin's ``validate_delta``).

    Raises:
        DecodeError: the delta is malformed or breaks a limit.
    """
    if len(delta):
        _decode_delta(delta)


def _check_replica(replica_id):
    if not isinstance(replica_id, bytes) or not (C_MIN_ID <= len(replica_id) <= C_MAX_ID):
        raise CoreUsageError(
            f"replica id must be {C_MIN_ID}..{C_MAX_ID} bytes, got {replica_id!r}"
        )
    return replica_id


# -- the document ----------------------------------------------------------------------------


cdef class Text:
    """A replicated text (sequence CRDT, FugueMax order): the fast twin of
    ``_reference_text.Text``, with the same API and the same bytes."""

    cdef bytes _replica
    cdef int32_t _me
    cdef list _agent_ids
    cdef dict _agent_index
    cdef Agent *_agents
    cdef Py_ssize_t _n_agents, _cap_agents
    cdef Run *_runs
    cdef Py_ssize_t _n_runs, _cap_runs
    cdef int32_t _free_run
    cdef Block *_blocks
    cdef Py_ssize_t _n_blocks, _cap_blocks
    cdef int32_t *_order
    cdef Py_ssize_t _cap_order
    cdef unsigned char *_chars  # every character ever inserted, _kind bytes each
    cdef int _kind               # 1, 2 or 4 (PEP 393 kinds): widened on the first wider char
    cdef Py_ssize_t _n_chars, _cap_chars
    cdef DelBuf _dels
    cdef int64_t _visible
    cdef int64_t _raw
    cdef int32_t _cur_ord
    cdef int64_t _cur_start
    cdef list _local     # [start, end] counter ranges of local ops not yet taken
    cdef dict _held      # replica id -> op runs sorted by counter, disjoint

    def __cinit__(self, *args, **kwargs):
        self._agents = NULL
        self._runs = NULL
        self._blocks = NULL
        self._order = NULL
        self._chars = NULL
        self._dels.p = NULL
        self._dels.n = self._dels.cap = 0
        self._n_agents = self._cap_agents = 0
        self._n_runs = self._cap_runs = 0
        self._n_blocks = self._cap_blocks = self._cap_order = 0
        self._n_chars = self._cap_chars = 0
        self._kind = 1
        self._free_run = NONE

    def __init__(self, replica_id):
        """Makes an empty text edited locally as ``replica_id``.

        Args:
            replica_id: this replica's opaque id, 8..32 bytes, unique among the replicas.

        Raises:
            CoreUsageError: the id is not bytes of an allowed length.
        """
        self._replica = _check_replica(replica_id)
        self._agent_ids = []
        self._agent_index = {}
        self._visible = 0
        self._raw = 0
        self._cur_ord = 0
        self._cur_start = 0
        self._local = []
        self._held = {}
        self._me = self._agent(self._replica)

    def __dealloc__(self):
        cdef Py_ssize_t i, k
        if self._agents != NULL:
            for i in range(self._n_agents):
                for k in range(self._agents[i].n_chains):
                    PyMem_Free(self._agents[i].chains[k].frags)
                PyMem_Free(self._agents[i].chains)
        PyMem_Free(self._agents)
        PyMem_Free(self._runs)
        PyMem_Free(self._blocks)
        PyMem_Free(self._order)
        PyMem_Free(self._chars)
        PyMem_Free(self._dels.p)

    # -- replicas and ids ------------------------------------------------------------------

    cdef int32_t _agent(self, bytes agent) except -1:
        cdef object found = self._agent_index.get(agent)
        cdef Agent *a
        if found is not None:
            return found
        _grow(<void **>&self._agents, &self._cap_agents, self._n_agents + 1, sizeof(Agent))
        a = &self._agents[self._n_agents]
        a.chains = NULL
        a.n_chains = a.cap_chains = 0
        a.version = 0
        self._agent_index[agent] = self._n_agents
        self._agent_ids.append(agent)
        self._n_agents += 1
        return <int32_t>(self._n_agents - 1)

    cdef int32_t _known(self, object agent):
        """Internal index of a replica id, or NONE if never seen."""
        cdef object found = self._agent_index.get(agent)
        return NONE if found is None else <int32_t>found

    cdef int _add_chain(self, int32_t agent, int32_t start, int32_t end, int32_t head) except -1:
        cdef Agent *a = &self._agents[agent]
        cdef Py_ssize_t cap = a.cap_chains
        _grow(<void **>&a.chains, &cap, a.n_chains + 1, sizeof(Chain))
        a.cap_chains = <int32_t>cap
        a.chains[a.n_chains].start = start
        a.chains[a.n_chains].end = end
        a.chains[a.n_chains].head = head
        a.chains[a.n_chains].n_frags = 0
        a.chains[a.n_chains].cap_frags = 0
        a.chains[a.n_chains].frags = NULL
        a.n_chains += 1
        return 0

    cdef Chain *_chain_of(self, int32_t agent, int64_t counter) noexcept:
        """The chain holding ``(agent, counter)``, or NULL."""
        cdef Agent *a
        cdef Py_ssize_t lo = 0, hi, mid
        if agent < 0 or agent >= self._n_agents:
            return NULL
        a = &self._agents[agent]
        hi = a.n_chains
        while lo < hi:
            mid = (lo + hi) >> 1
            if a.chains[mid].start <= counter:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0 or counter >= a.chains[lo - 1].end:
            return NULL
        return &a.chains[lo - 1]

    cdef Py_ssize_t _frag_index(self, Chain *c, int64_t counter) noexcept:
        """Index in ``c.frags`` of the last fragment starting at or before ``counter``."""
        cdef Py_ssize_t lo = 0, hi = c.n_frags, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._runs[c.frags[mid]].counter <= counter:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    cdef int _frag_added(self, int32_t r, int32_t f) except -1:
        """Lists fragment ``f`` (just cut from ``r``) after ``r`` in its chain."""
        cdef Chain *c = self._chain_of(self._runs[r].agent, self._runs[r].counter)
        cdef Py_ssize_t cap, at
        if c.frags == NULL:
            cap = 0
            _grow(<void **>&c.frags, &cap, 4, sizeof(int32_t))
            c.cap_frags = <int32_t>cap
            c.frags[0] = c.head
            c.n_frags = 1
        cap = c.cap_frags
        _grow(<void **>&c.frags, &cap, c.n_frags + 1, sizeof(int32_t))
        c.cap_frags = <int32_t>cap
        at = self._frag_index(c, self._runs[r].counter) + 1
        memmove(&c.frags[at + 1], &c.frags[at], (c.n_frags - at) * sizeof(int32_t))
        c.frags[at] = f
        c.n_frags += 1
        return 0

    cdef void _frag_removed(self, int32_t f) noexcept:
        """Unlists fragment ``f`` (merged into the one before it)."""
        cdef Chain *c = self._chain_of(self._runs[f].agent, self._runs[f].counter)
        cdef Py_ssize_t at = self._frag_index(c, self._runs[f].counter)
        memmove(&c.frags[at], &c.frags[at + 1], (c.n_frags - at - 1) * sizeof(int32_t))
        c.n_frags -= 1

    cdef int32_t _find(self, int32_t agent, int64_t counter, int32_t *offset) noexcept:
        """The run holding character ``(agent, counter)``, or NONE (not an inserted char).

        Two binary searches: the chain (one per insert op run), then its fragments.
        """
        cdef Chain *c = self._chain_of(agent, counter)
        cdef int32_t r
        if c == NULL:
            return NONE
        r = c.head if c.frags == NULL else c.frags[self._frag_index(c, counter)]
        offset[0] = <int32_t>(counter - self._runs[r].counter)
        return r

    cdef int32_t _index_in_block(self, int32_t r) noexcept:
        cdef Block *b = &self._blocks[self._runs[r].block]
        cdef int32_t i
        for i in range(b.n):
            if b.runs[i] == r:
                return i
        return NONE

    cdef inline int64_t _key(self, int32_t r, int32_t offset) noexcept:
        """A number that orders characters as the document does (tombstones included)."""
        return ((<int64_t>self._blocks[self._runs[r].block].ord) << 39) | (
            (<int64_t>self._index_in_block(r)) << 31) | offset

    cdef int64_t _key_of(self, int32_t agent, int32_t counter, int64_t none) noexcept:
        cdef int32_t off
        cdef int32_t r
        if agent == NONE:
            return none
        r = self._find(agent, counter, &off)
        return self._key(r, off)

    # -- runs and blocks -------------------------------------------------------------------

    cdef int32_t _new_run(self) except -1:
        cdef int32_t r
        if self._free_run != NONE:
            r = self._free_run
            self._free_run = self._runs[r].next_frag
            return r
        _grow(<void **>&self._runs, &self._cap_runs, self._n_runs + 1, sizeof(Run))
        self._n_runs += 1
        return <int32_t>(self._n_runs - 1)

    cdef int32_t _new_block(self) except -1:
        cdef Block *b
        _grow(<void **>&self._blocks, &self._cap_blocks, self._n_blocks + 1, sizeof(Block))
        _grow(<void **>&self._order, &self._cap_order, self._n_blocks + 1, sizeof(int32_t))
        b = &self._blocks[self._n_blocks]
        b.n = 0
        b.vis = b.raw = 0
        b.ord = 0
        self._n_blocks += 1
        return <int32_t>(self._n_blocks - 1)

    cdef int _split_block(self, int32_t o) except -1:
        """Moves the upper half of the block at order ``o`` into a new block after it."""
        cdef int32_t nb = self._new_block()
        cdef int32_t bl = self._order[o]
        cdef Block *left = &self._blocks[bl]
        cdef Block *right = &self._blocks[nb]
        cdef int32_t half = left.n // 2, i, r
        cdef Py_ssize_t k
        right.n = left.n - half
        memcpy(right.runs, &left.runs[half], right.n * sizeof(int32_t))
        left.n = half
        for i in range(right.n):
            r = right.runs[i]
            self._runs[r].block = nb
            right.raw += self._runs[r].length
            if not self._runs[r].deleted:
                right.vis += self._runs[r].length
        left.raw -= right.raw
        left.vis -= right.vis
        memmove(&self._order[o + 2], &self._order[o + 1],
                (self._n_blocks - 2 - o) * sizeof(int32_t))
        self._order[o + 1] = nb
        for k in range(o + 1, self._n_blocks):
            self._blocks[self._order[k]].ord = <int32_t>k
        if self._cur_ord > o:
            self._cur_ord += 1
        return 0

    cdef int _place(self, int32_t o, int32_t i, int32_t r) except -1:
        """Puts run ``r`` before position ``i`` of the block at order ``o``."""
        cdef int32_t bl, half
        cdef Block *b
        if self._n_blocks == 0:
            bl = self._new_block()
            self._order[0] = bl
            o = i = 0
        bl = self._order[o]
        if self._blocks[bl].n == BLOCK_CAP:
            self._split_block(o)
            half = self._blocks[bl].n
            if i > half:
                o += 1
                i -= half
                bl = self._order[o]
        b = &self._blocks[bl]
        memmove(&b.runs[i + 1], &b.runs[i], (b.n - i) * sizeof(int32_t))
        b.runs[i] = r
        b.n += 1
        self._runs[r].block = bl
        b.raw += self._runs[r].length
        self._raw += self._runs[r].length
        if not self._runs[r].deleted:
            b.vis += self._runs[r].length
            self._visible += self._runs[r].length
        return 0

    cdef int32_t _split(self, int32_t r, int32_t k) except -1:
        """Cuts run ``r`` before its ``k``-th character; returns the new right fragment."""
        cdef int32_t f = self._new_run()
        cdef Run *a = &self._runs[r]
        cdef Run *n = &self._runs[f]
        cdef int32_t i, bl
        n.agent = a.agent
        n.counter = a.counter + k
        n.length = a.length - k
        n.ol_agent = a.agent
        n.ol_counter = a.counter + k - 1
        n.or_agent = a.or_agent
        n.or_counter = a.or_counter
        n.next_frag = a.next_frag
        n.deleted = a.deleted
        n.content = a.content + k
        n.block = a.block
        a.length = k
        a.next_frag = f
        self._frag_added(r, f)
        # the block keeps its totals: take the fragment out of them, _place adds it back
        bl = a.block
        self._blocks[bl].raw -= n.length
        self._raw -= n.length
        if not n.deleted:
            self._blocks[bl].vis -= n.length
            self._visible -= n.length
        i = self._index_in_block(r)
        self._place(self._blocks[bl].ord, i + 1, f)
        return f

    cdef int _remove_at(self, int32_t bl, int32_t i) noexcept:
        """Drops the run at position ``i`` of block ``bl`` (merged away; totals unchanged)."""
        cdef Block *b = &self._blocks[bl]
        cdef int32_t r = b.runs[i]
        memmove(&b.runs[i], &b.runs[i + 1], (b.n - i - 1) * sizeof(int32_t))
        b.n -= 1
        self._runs[r].next_frag = self._free_run
        self._runs[r].length = 0
        self._free_run = r
        return 0

    cdef int32_t _delete_span(self, int32_t r, int32_t off, int32_t take) except -1:
        """Marks ``take`` characters of visible run ``r`` from ``off`` deleted.

        Returns the run now holding them (it may have merged with deleted neighbours).
        """
        cdef int32_t bl, i, nx, pv
        cdef Block *b
        if off > 0:
            r = self._split(r, off)
        if take < self._runs[r].length:
            self._split(r, take)
        self._runs[r].deleted = 1
        bl = self._runs[r].block
        self._blocks[bl].vis -= take
        self._visible -= take
        b = &self._blocks[bl]
        i = self._index_in_block(r)
        if i + 1 < b.n:
            nx = b.runs[i + 1]
            if self._runs[nx].deleted and self._runs[r].next_frag == nx:
                self._frag_removed(nx)
                self._runs[r].length += self._runs[nx].length
                self._runs[r].next_frag = self._runs[nx].next_frag
                self._remove_at(bl, i + 1)
        if i > 0:
            pv = b.runs[i - 1]
            if self._runs[pv].deleted and self._runs[pv].next_frag == r:
                self._frag_removed(r)
                self._runs[pv].length += self._runs[r].length
                self._runs[pv].next_frag = self._runs[r].next_frag
                self._remove_at(bl, i)
                r = pv
        return r

    cdef int64_t _find_visible(self, int64_t q, int32_t *o_out, int32_t *i_out) noexcept:
        """Finds the ``q``-th visible character: block order, index in block, offset."""
        cdef int32_t o = self._cur_ord
        cdef int64_t start = self._cur_start
        cdef Block *b
        cdef int32_t i, r
        if o >= self._n_blocks:
            o = 0
            start = 0
        while q < start:
            o -= 1
            start -= self._blocks[self._order[o]].vis
        while q >= start + self._blocks[self._order[o]].vis:
            start += self._blocks[self._order[o]].vis
            o += 1
        self._cur_ord = o
        self._cur_start = start
        b = &self._blocks[self._order[o]]
        q -= start
        for i in range(b.n):
            r = b.runs[i]
            if not self._runs[r].deleted:
                if q < self._runs[r].length:
                    o_out[0] = o
                    i_out[0] = i
                    return q
                q -= self._runs[r].length
        return NONE  # unreachable: block totals count these runs

    cdef int _reserve_chars(self, Py_ssize_t need, int kind) except -1:
        """Room for ``need`` characters of ``kind`` bytes; widens the stored ones if needed."""
        cdef Py_ssize_t cap = self._cap_chars, k
        cdef unsigned char *q
        if need <= cap and kind <= self._kind:
            return 0
        if need > cap:
            cap = cap * 2 if cap else 256
            while cap < need:
                cap *= 2
        if kind < self._kind:
            kind = self._kind
        q = <unsigned char *>PyMem_Malloc(cap * kind)
        if q == NULL:
            raise MemoryError()
        if kind == self._kind:
            memcpy(q, self._chars, self._n_chars * kind)
        else:
            for k in range(self._n_chars):
                _put_char(q, kind, k, _get_char(self._chars, self._kind, k))
        PyMem_Free(self._chars)
        self._chars = q
        self._cap_chars = cap
        self._kind = kind
        return 0

    cdef int _append_chars(self, str text) except -1:
        cdef Py_ssize_t n = self._n_chars, k, size = len(text)
        cdef int kind = PyUnicode_KIND(text)
        cdef void *data = PyUnicode_DATA(text)
        self._reserve_chars(n + size, kind)
        if kind == self._kind:
            memcpy(self._chars + n * kind, data, size * kind)
        else:
            for k in range(size):
                _put_char(self._chars, self._kind, n + k, PyUnicode_READ(kind, data, k))
        self._n_chars = n + size
        return 0

    cdef str _chars_of(self, int64_t start, int64_t length):
        if length == 0:
            return ""
        return PyUnicode_FromKindAndData(self._kind, self._chars + start * self._kind, length)

    # -- reading ---------------------------------------------------------------------------

    def value(self):
        """Returns: the visible text."""
        cdef unsigned char *out
        cdef Py_ssize_t n = 0, k
        cdef int kind = self._kind
        cdef int32_t i, r
        cdef Block *b
        if self._visible == 0:
            return ""
        out = <unsigned char *>PyMem_Malloc(self._visible * kind)
        if out == NULL:
            raise MemoryError()
        try:
            for k in range(self._n_blocks):
                b = &self._blocks[self._order[k]]
                for i in range(b.n):
                    r = b.runs[i]
                    if not self._runs[r].deleted:
                        memcpy(out + n * kind, self._chars + self._runs[r].content * kind,
                               self._runs[r].length * kind)
                        n += self._runs[r].length
            return PyUnicode_FromKindAndData(kind, out, n)
        finally:
            PyMem_Free(out)

    def __str__(self):
        return self.value()

    def __len__(self):
        return self._visible

    def version(self):
        """Returns: per replica, the highest counter up to which all its ops are integrated."""
        cdef Py_ssize_t i
        return {self._agent_ids[i]: self._agents[i].version
                for i in range(self._n_agents) if self._agents[i].version > 0}

    # -- local edits -----------------------------------------------------------------------

    cdef int32_t _next_counter(self, int64_t count) except -1:
        cdef int64_t counter = <int64_t>self._agents[self._me].version + 1
        if counter + count - 1 > C_MAX_COUNTER:
            raise CoreUsageError("this replica used up its op counters (MAX_COUNTER)")
        return <int32_t>counter

    cdef int _note_local(self, int32_t start, int32_t end) except -1:
        if self._local and self._local[len(self._local) - 1][1] == start:
            self._local[len(self._local) - 1][1] = end
        else:
            self._local.append([start, end])
        return 0

    def insert(self, pos, text):
        """Inserts ``text`` so that it starts at visible position ``pos``.

        Args:
            pos: 0..len(self).
            text: the characters to insert (may be empty).

        Raises:
            CoreUsageError: ``pos`` is out of range or ``text`` is not a str.
        """
        cdef int64_t p, n, c0
        cdef int32_t counter, o, i, off, L, f, nr, R, ola, olc, ora, orc
        cdef Run *run
        cdef Block *b
        cdef Agent *me
        if not isinstance(text, str) or not isinstance(pos, int) or not 0 <= pos <= self._visible:
            raise CoreUsageError(f"insert at {pos!r} outside 0..{self._visible} or text not str")
        n = len(<str>text)
        if n == 0:
            return
        p = pos
        counter = self._next_counter(n)
        c0 = self._n_chars
        self._append_chars(text)
        ola = olc = ora = orc = NONE
        if p == 0:
            o = i = 0
            self._cur_ord = 0  # block 0 grows: the cursor's count of chars before it would not
            self._cur_start = 0
            if self._n_blocks:
                nr = self._blocks[self._order[0]].runs[0]
                ora = self._runs[nr].agent
                orc = self._runs[nr].counter
        else:
            off = <int32_t>self._find_visible(p - 1, &o, &i)
            b = &self._blocks[self._order[o]]
            L = b.runs[i]
            run = &self._runs[L]
            ola = run.agent
            olc = run.counter + off
            if off < run.length - 1:
                ora = run.agent
                orc = run.counter + off + 1
                f = self._split(L, off + 1)
                o = self._blocks[self._runs[f].block].ord
                i = self._index_in_block(f)
            else:
                if i + 1 < b.n:
                    nr = b.runs[i + 1]
                elif o + 1 < self._n_blocks:
                    nr = self._blocks[self._order[o + 1]].runs[0]
                else:
                    nr = NONE
                if nr != NONE:
                    ora = self._runs[nr].agent
                    orc = self._runs[nr].counter
                me = &self._agents[self._me]
                # typing on: grow the run before the cursor instead of adding one
                if (run.agent == self._me and run.counter + run.length == counter
                        and not run.deleted and run.next_frag == NONE
                        and run.content + run.length == c0
                        and run.or_agent == ora and (ora == NONE or run.or_counter == orc)
                        and me.n_chains and me.chains[me.n_chains - 1].end == counter):
                    run.length += <int32_t>n
                    b.vis += n
                    b.raw += n
                    self._visible += n
                    self._raw += n
                    me.chains[me.n_chains - 1].end += <int32_t>n
                    me.version = <int32_t>(counter + n - 1)
                    self._note_local(counter, <int32_t>(counter + n))
                    return
                i += 1
        R = self._new_run()
        run = &self._runs[R]
        run.agent = self._me
        run.counter = counter
        run.length = <int32_t>n
        run.ol_agent = ola
        run.ol_counter = olc
        run.or_agent = ora
        run.or_counter = orc
        run.next_frag = NONE
        run.deleted = 0
        run.content = c0
        run.block = NONE
        self._place(o, i, R)
        self._add_chain(self._me, counter, <int32_t>(counter + n), R)
        self._agents[self._me].version = <int32_t>(counter + n - 1)
        self._note_local(counter, <int32_t>(counter + n))

    def delete(self, pos, length):
        """Deletes ``length`` visible characters from visible position ``pos``.

        Args:
            pos: first character to delete.
            length: how many; ``pos + length <= len(self)``.

        Raises:
            CoreUsageError: the range is outside the text.
        """
        cdef int64_t remaining, take
        cdef int32_t counter, start, o, i, off, r
        if (not isinstance(pos, int) or not isinstance(length, int) or pos < 0 or length < 0
                or pos + length > self._visible):
            raise CoreUsageError(f"delete {pos!r}+{length!r} outside 0..{self._visible}")
        if length == 0:
            return
        remaining = length
        counter = start = self._next_counter(remaining)
        off = <int32_t>self._find_visible(pos, &o, &i)
        r = self._blocks[self._order[o]].runs[i]
        while True:
            take = min(self._runs[r].length - off, remaining)
            # ops take counters in document order of their targets
            _push_del(&self._dels, self._me, counter, take, self._runs[r].agent,
                      self._runs[r].counter + off, 1)
            counter += <int32_t>take
            remaining -= take
            r = self._delete_span(r, off, <int32_t>take)
            if remaining == 0:
                break
            o = self._blocks[self._runs[r].block].ord
            i = self._index_in_block(r)
            while True:
                i += 1
                if i == self._blocks[self._order[o]].n:
                    o += 1
                    i = 0
                r = self._blocks[self._order[o]].runs[i]
                if not self._runs[r].deleted:
                    break
            off = 0
        self._agents[self._me].version = counter - 1
        self._note_local(start, counter)

    # -- ops out ---------------------------------------------------------------------------

    cdef object _id(self, int32_t agent, int32_t counter):
        if agent == NONE:
            return None
        return (self._agent_ids[agent], counter)

    cdef list _ops_of(self, int32_t a, int64_t lo, int64_t hi):
        """Canonical op runs of replica ``a`` with counters in lo..hi, in counter order."""
        cdef Agent *ag = &self._agents[a]
        cdef Py_ssize_t k, lo_c = 0, hi_c, first
        cdef int32_t r
        cdef int64_t s, e, fs, fe
        cdef list inserts = [], out = []
        cdef DelBuf dels
        cdef DelRun *d
        cdef bytes name = self._agent_ids[a]
        cdef list last
        hi_c = ag.n_chains
        while lo_c < hi_c:  # first chain ending after lo
            k = (lo_c + hi_c) >> 1
            if ag.chains[k].end <= lo:
                lo_c = k + 1
            else:
                hi_c = k
        for k in range(lo_c, ag.n_chains):
            if ag.chains[k].start > hi:
                break
            r = ag.chains[k].head
            while r != NONE:
                fs = self._runs[r].counter
                fe = fs + self._runs[r].length
                s = max(fs, lo)
                e = min(fe, hi + 1)
                if s < e:
                    left = (self._id(self._runs[r].ol_agent, self._runs[r].ol_counter)
                            if s == fs else (name, s - 1))
                    right = self._id(self._runs[r].or_agent, self._runs[r].or_counter)
                    text = self._chars_of(self._runs[r].content + (s - fs), e - s)
                    last = inserts[len(inserts) - 1] if inserts else None
                    if (last is not None and last[2] + last[3] == s and left == (name, s - 1)
                            and right == last[6]):
                        last[3] += e - s
                        last[4] += text
                    else:
                        inserts.append([0, name, s, e - s, text, left, right])
                r = self._runs[r].next_frag
        dels.p = NULL
        dels.n = dels.cap = 0
        try:
            # the log is in integration order, so each replica's runs are in counter order:
            # start after the last run of this replica that ends at or before ``lo``
            first = self._dels.n
            while first > 0:
                d = &self._dels.p[first - 1]
                if d.agent == a and <int64_t>d.counter + d.length <= lo:
                    break
                first -= 1
            for k in range(first, self._dels.n):
                d = &self._dels.p[k]
                if d.agent != a:
                    continue
                s = max(<int64_t>d.counter, lo)
                e = min(<int64_t>d.counter + d.length, hi + 1)
                if s < e:
                    _push_del(&dels, a, <int32_t>s, e - s, d.target_agent,
                              d.target + (s - d.counter) * d.step, d.step)
            deletes = [[1, name, dels.p[k].counter, dels.p[k].length,
                        self._agent_ids[dels.p[k].target_agent], dels.p[k].target,
                        dels.p[k].step] for k in range(dels.n)]
        finally:
            PyMem_Free(dels.p)
        out = inserts + deletes
        out.sort(key=_counter_of)
        return out

    def take_pending(self):
        """Returns: the delta of the local ops since the last call; ``b""`` if none."""
        cdef list runs = []
        for start, end in self._local:
            runs.extend(self._ops_of(self._me, start, end - 1))
        self._local = []
        return _encode_delta(_merge_lists(runs))

    def encode_since(self, version):
        """Returns: the delta of every integrated op the holder of ``version`` lacks.

        Args:
            version: a replica's ``version()``.

        Raises:
            CoreUsageError: ``version`` is not a mapping of bytes to ints.
        """
        cdef list runs = []
        cdef int32_t a
        _spec._check_version(version)
        for name in sorted(self._agent_ids):
            a = self._agent_index[name]
            have = version.get(name, 0)
            if have < self._agents[a].version:
                runs.extend(self._ops_of(a, max(have + 1, 1), self._agents[a].version))
        return _encode_delta(runs)

    # -- ops in ----------------------------------------------------------------------------

    def apply(self, delta):
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
        if sum([len(held) for held in self._held.values()]) + len(runs) > MAX_HELD_RUNS:
            raise DecodeError("too many ops waiting for their predecessors (MAX_HELD_RUNS)")
        for run in runs:
            self._hold(run)
        return self._integrate_held() == 1

    cdef _hold(self, list run):
        """Adds the part of ``run`` that is neither integrated nor already held."""
        cdef int32_t a = self._known(run[1])
        cdef int64_t done = self._agents[a].version if a != NONE else 0
        cdef list held, pieces, other
        if _run_end(run) <= done + 1:
            return
        if run[2] <= done:
            run = _tail(run, done + 1 - run[2])
        held = self._held.setdefault(run[1], [])
        pieces = []
        # held runs are sorted and disjoint: visit those overlapping ``run``; for every
        # counter the first arrival wins
        at = bisect.bisect_right(held, run[2], key=_end_of)
        while at < len(held) and held[at][2] < _run_end(run):
            other = held[at]
            if other[2] > run[2]:
                pieces.append(_head(run, other[2] - run[2]))
            if _run_end(other) >= _run_end(run):
                run = _head(run, 0)
                break
            run = _tail(run, _run_end(other) - run[2])
            at += 1
        if run[3]:
            pieces.append(run)
        for piece in pieces:
            bisect.insort(held, piece, key=_counter_of)

    cdef bint _can_insert(self, list run):
        """Both origins are here, origin_left before origin_right (see the twin)."""
        cdef int32_t la = NONE, ra = NONE, off
        left, right = run[5], run[6]
        if left is not None:
            la = self._known(left[0])
            if la == NONE or self._find(la, left[1], &off) == NONE:
                return False
        if right is not None:
            ra = self._known(right[0])
            if ra == NONE or self._find(ra, right[1], &off) == NONE:
                return False
        if la != NONE and ra != NONE:
            return self._key_of(la, left[1], -1) < self._key_of(ra, right[1], KEY_END)
        return True

    cdef int _integrate_held(self) except -1:
        """Integrates every held op whose predecessors are present. Returns: text changed."""
        cdef bint changed = False, progress = True
        cdef int32_t a
        cdef int64_t done
        cdef Py_ssize_t taken
        cdef list held, run
        while progress:
            progress = False
            for agent in sorted(self._held):
                held = self._held[agent]
                a = self._agent(agent)
                taken = 0
                while taken < len(held) and (
                        held[taken][2] == <int64_t>self._agents[a].version + 1):
                    run = held[taken]
                    if run[0] == 0:
                        if not self._can_insert(run):
                            break
                        self._integrate_insert(a, run)
                        done = run[3]
                        changed = True
                    else:
                        done = self._integrate_delete(a, run)
                        if done < 0:
                            changed = True
                            done = -done
                    if done == 0:
                        break
                    progress = True
                    if done < run[3]:
                        held[taken] = _tail(run, done)
                        break
                    taken += 1
                del held[:taken]
                if not held:
                    del self._held[agent]
        # remote edits change block totals anywhere: restart the cursor cache
        self._cur_ord = 0
        self._cur_start = 0
        return changed

    cdef int _integrate_insert(self, int32_t a, list op) except -1:
        """Places a remote insert run between its origins: FugueMax ("YjsMod") order.

        The scan is the twin's ``_integrate``, per run instead of per character: inside a
        run only the first character can stop the scan (the others have the previous
        character, which lies right of our origin_left, as origin_left), and the
        characters after the first of ``op`` land right after it (the lemma in
        docs/text.md), so the whole run goes in at one place.
        """
        cdef int32_t ola = NONE, olc = 0, ora = NONE, orc = 0
        cdef int32_t lr, loff, rr = NONE, roff = 0, o, i, off, r, R, f
        cdef int32_t dest_o, dest_i, dest_off
        cdef int64_t lkey = -1, rkey = KEY_END, okey, orkey, c0
        cdef bint scanning = False
        cdef Run *run
        cdef str content = op[4]
        left, right = op[5], op[6]
        if left is not None:
            ola = self._known(left[0])
            olc = left[1]
        if right is not None:
            ora = self._known(right[0])
            orc = right[1]
        o = i = off = 0
        if ola != NONE:
            lr = self._find(ola, olc, &loff)
            lkey = self._key(lr, loff)
            o = self._blocks[self._runs[lr].block].ord
            i = self._index_in_block(lr)
            off = loff + 1
            if off == self._runs[lr].length:
                off = 0
                i += 1
                if i == self._blocks[self._order[o]].n:
                    o += 1
                    i = 0
        if ora != NONE:
            rr = self._find(ora, orc, &roff)
            rkey = self._key(rr, roff)
        dest_o, dest_i, dest_off = o, i, off
        while True:
            if not scanning:
                dest_o, dest_i, dest_off = o, i, off
            if o >= self._n_blocks:
                break
            r = self._blocks[self._order[o]].runs[i]
            if r == rr and off == roff:
                break
            if off == 0:
                okey = self._key_of(self._runs[r].ol_agent, self._runs[r].ol_counter, -1)
            else:
                okey = ((<int64_t>o) << 39) | ((<int64_t>i) << 31) | (off - 1)
            if okey < lkey:
                break
            if okey == lkey:
                orkey = self._key_of(self._runs[r].or_agent, self._runs[r].or_counter, KEY_END)
                if orkey < rkey:
                    scanning = True
                elif orkey == rkey:
                    if self._agent_ids[a] < self._agent_ids[self._runs[r].agent]:
                        break
                    scanning = False
                else:
                    scanning = False
            if r == rr and roff > off:
                off = roff
            else:
                off = 0
                i += 1
                if i == self._blocks[self._order[o]].n:
                    o += 1
                    i = 0
        c0 = self._n_chars
        self._append_chars(content)
        R = self._new_run()
        run = &self._runs[R]
        run.agent = a
        run.counter = op[2]
        run.length = op[3]
        run.ol_agent = ola
        run.ol_counter = olc if ola != NONE else NONE
        run.or_agent = ora
        run.or_counter = orc if ora != NONE else NONE
        run.next_frag = NONE
        run.deleted = 0
        run.content = c0
        run.block = NONE
        if dest_o >= self._n_blocks:
            if self._n_blocks == 0:
                self._place(0, 0, R)
            else:
                dest_o = <int32_t>(self._n_blocks - 1)
                self._place(dest_o, self._blocks[self._order[dest_o]].n, R)
        elif dest_off > 0:
            f = self._split(self._blocks[self._order[dest_o]].runs[dest_i], dest_off)
            self._place(self._blocks[self._runs[f].block].ord, self._index_in_block(f), R)
        else:
            self._place(dest_o, dest_i, R)
        self._add_chain(a, op[2], op[2] + op[3], R)
        self._agents[a].version = op[2] + op[3] - 1
        return 0

    cdef int64_t _integrate_delete(self, int32_t a, list op) except? -1:
        """Integrates the prefix of a delete run whose targets are here.

        Returns the number of ops integrated, negated if a visible character went away.
        """
        cdef int32_t ta = self._known(op[4])
        cdef int64_t length = op[3], target = op[5], t, span, done = 0
        cdef int32_t step = op[6], r, off, start_off, counter = op[2]
        cdef bint changed = False
        if ta == NONE:
            return 0
        while done < length:
            t = target + done * step
            r = self._find(ta, t, &off)
            if r == NONE:
                break
            if step > 0:
                span = min(self._runs[r].length - off, length - done)
                start_off = off
            else:
                span = min(off + 1, length - done)
                start_off = <int32_t>(off - span + 1)
            if not self._runs[r].deleted:
                self._delete_span(r, start_off, <int32_t>span)
                changed = True
            _push_del(&self._dels, a, <int32_t>(counter + done), span, ta, t, step)
            done += span
        if done:
            self._agents[a].version = <int32_t>(counter + done - 1)
        return -done if changed else done

    # -- state -----------------------------------------------------------------------------

    def encode_state(self):
        """Returns: a snapshot of the whole text (items, delete ops, held ops).

        The layout is the twin's (``_reference_text.Text.encode_state``, docs/text.md).
        """
        cdef Run *rows = NULL
        cdef Py_ssize_t n_rows = 0, cap_rows = 0, k, j, n_content = 0
        cdef unsigned char *content = NULL
        cdef int kind = self._kind
        cdef Buf cols[10]
        cdef Buf body
        cdef DelBuf dels
        cdef int32_t *tidx = NULL
        cdef int64_t *expected = NULL
        cdef int32_t i, r, flags, a
        cdef Run *cur
        cdef Run *prev
        cdef Run *run
        cdef Block *b
        cdef DelRun *d
        cdef int64_t prev_end, prev_target, left_counter
        cdef int32_t prev_agent
        cdef list agents
        for k in range(N_COLUMNS):
            cols[k].p = NULL
            cols[k].n = cols[k].cap = 0
        body.p = NULL
        body.n = body.cap = 0
        dels.p = NULL
        dels.n = dels.cap = 0
        try:
            content = <unsigned char *>PyMem_Malloc((self._raw + 1) * kind)
            tidx = <int32_t *>PyMem_Malloc((self._n_agents + 1) * sizeof(int32_t))
            expected = <int64_t *>PyMem_Malloc((self._n_agents + 1) * sizeof(int64_t))
            if content == NULL or tidx == NULL or expected == NULL:
                raise MemoryError()
            # canonical item runs in document order (fragments merged back)
            for k in range(self._n_blocks):
                b = &self._blocks[self._order[k]]
                for i in range(b.n):
                    run = &self._runs[b.runs[i]]
                    memcpy(content + n_content * kind, self._chars + run.content * kind,
                           run.length * kind)
                    n_content += run.length
                    if n_rows:
                        cur = &rows[n_rows - 1]
                        if (cur.agent == run.agent and cur.counter + cur.length == run.counter
                                and run.ol_agent == run.agent
                                and run.ol_counter == run.counter - 1
                                and run.or_agent == cur.or_agent
                                and run.or_counter == cur.or_counter
                                and run.deleted == cur.deleted):
                            cur.length += run.length
                            continue
                    _grow(<void **>&rows, &cap_rows, n_rows + 1, sizeof(Run))
                    rows[n_rows] = run[0]
                    n_rows += 1
            agents = sorted([self._agent_ids[k] for k in range(self._n_agents)
                             if self._agents[k].version > 0])
            for j, name in enumerate(agents):
                tidx[<int32_t>self._agent_index[name]] = <int32_t>j
                expected[<int32_t>self._agent_index[name]] = 1
            _put_agents(&body, agents)
            put_uint(&body, n_rows)
            for k in range(n_rows):
                run = &rows[k]
                flags = SF_DELETED if run.deleted else 0
                if run.ol_agent == NONE:
                    flags |= SF_OL_NONE
                elif k and run.ol_agent == rows[k - 1].agent and (
                        run.ol_counter == rows[k - 1].counter + rows[k - 1].length - 1):
                    flags |= SF_OL_PREV
                if run.or_agent == NONE:
                    flags |= SF_OR_NONE
                elif k + 1 < n_rows and run.or_agent == rows[k + 1].agent and (
                        run.or_counter == rows[k + 1].counter):
                    flags |= SF_OR_NEXT
                elif k and run.or_agent == rows[k - 1].or_agent and (
                        run.or_counter == rows[k - 1].or_counter):
                    flags |= SF_OR_SAME
                if k and rows[k - 1].agent == run.agent:
                    flags |= SF_SAME_AGENT
                put_uint(&cols[COL_HEAD], ((<uint64_t>run.length) << SF_BITS) | flags)
                if not flags & SF_SAME_AGENT:
                    put_uint(&cols[COL_AGENT], tidx[run.agent])
                put_sint(&cols[COL_COUNTER], run.counter - expected[run.agent])
                expected[run.agent] = <int64_t>run.counter + run.length
                if not flags & (SF_OL_PREV | SF_OL_NONE):
                    put_uint(&cols[COL_ORIGIN_AGENT], tidx[run.ol_agent])
                    put_sint(&cols[COL_ORIGIN_COUNTER], <int64_t>run.ol_counter - run.counter)
                if not flags & (SF_OR_NEXT | SF_OR_NONE):
                    put_uint(&cols[COL_ORIGIN_AGENT], tidx[run.or_agent])
                    put_sint(&cols[COL_ORIGIN_COUNTER], <int64_t>run.or_counter - run.counter)
            # delete runs, canonical, in (replica id, counter) order
            for name in agents:
                a = self._agent_index[name]
                for k in range(self._dels.n):
                    d = &self._dels.p[k]
                    if d.agent == a:
                        _push_del(&dels, a, d.counter, d.length, d.target_agent, d.target,
                                  d.step)
            put_uint(&body, dels.n)
            prev_agent = NONE
            prev_end = 1
            prev_target = 0
            for k in range(dels.n):
                d = &dels.p[k]
                if d.agent != prev_agent:
                    prev_agent = d.agent
                    prev_end = 1
                put_uint(&cols[COL_DEL_HEAD],
                         ((<uint64_t>tidx[d.agent]) << 1) | (1 if d.step < 0 and d.length > 1
                                                             else 0))
                put_uint(&cols[COL_DEL_GAP], d.counter - prev_end)
                put_uint(&cols[COL_DEL_LENGTH], d.length)
                put_uint(&cols[COL_DEL_TARGET_AGENT], tidx[d.target_agent])
                put_sint(&cols[COL_DEL_TARGET], d.target - prev_target)
                prev_end = <int64_t>d.counter + d.length
                prev_target = d.target
            for k in range(N_COLUMNS):
                put_uint(&body, cols[k].n)
                put_raw(&body, cols[k].p, cols[k].n)
            held = _encode_delta([run_ for agent in sorted(self._held)
                                  for run_ in self._held[agent]])
            put_bytes(&body, held)
            text = PyUnicode_FromKindAndData(kind, content, n_content)
            # two sections, deflated apart (the twin's _pack)
            return (bytes((FORMAT_STATE, 0)) + _pack(buf_bytes(&body))
                    + _pack(text.encode("utf-8", "surrogatepass")))
        finally:
            for k in range(N_COLUMNS):
                buf_free(&cols[k])
            buf_free(&body)
            PyMem_Free(dels.p)
            PyMem_Free(rows)
            PyMem_Free(content)
            PyMem_Free(tidx)
            PyMem_Free(expected)

    @classmethod
    def decode_state(cls, data, replica_id):
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
        cdef Text text = cls(replica_id)
        text._load_state(data)
        return text

    cdef int _load_state(self, object data) except -1:
        cdef bytes outer = _unframe(FORMAT_STATE, data)
        cdef bytes body, content_bytes
        cdef Rd r
        cdef Rd col[10]
        cdef list agents, held_runs
        cdef int64_t n_rows, n_dels, k, j, head, flags, length, counter, chars = 0, ref, base
        cdef int64_t target, step, last, prev_end, prev_target, size
        cdef int32_t *amap = NULL
        cdef int64_t *expected = NULL
        cdef Run *rows = NULL
        cdef DelRun *dl = NULL
        cdef int32_t agent = 0, prev_agent, ai
        cdef int64_t gap
        cdef Run *row
        cdef str content
        cdef bytes held_bytes
        r.p = <const unsigned char *>outer
        r.n = len(outer)
        r.pos = 0
        body = _unpack(&r)
        content_bytes = _unpack(&r)
        if r.pos != r.n:
            raise DecodeError("trailing bytes after the state")
        r.p = <const unsigned char *>body
        r.n = len(body)
        r.pos = 0
        agents = _read_agents(&r)
        n_rows = rd_count(&r)
        n_dels = rd_count(&r)
        for k in range(N_COLUMNS):
            size = rd_uint(&r)
            if size > r.n - r.pos:
                raise DecodeError("truncated")
            col[k].p = r.p + r.pos
            col[k].n = size
            col[k].pos = 0
            r.pos += size
        try:
            amap = <int32_t *>PyMem_Malloc((len(agents) + 1) * sizeof(int32_t))
            expected = <int64_t *>PyMem_Malloc((len(agents) + 1) * sizeof(int64_t))
            rows = <Run *>PyMem_Malloc((n_rows + 1) * sizeof(Run))
            dl = <DelRun *>PyMem_Malloc((n_dels + 1) * sizeof(DelRun))
            if amap == NULL or expected == NULL or rows == NULL or dl == NULL:
                raise MemoryError()
            for k in range(len(agents)):
                expected[k] = 1
            # rows use table indices until they are checked
            for k in range(n_rows):
                row = &rows[k]
                head = rd_uint(&col[COL_HEAD])
                flags = head & ((1 << SF_BITS) - 1)
                length = head >> SF_BITS
                if flags & SF_OL_PREV and flags & SF_OL_NONE:
                    raise DecodeError("contradictory run flags")
                if flags & SF_SAME_AGENT:
                    if k == 0:
                        raise DecodeError("first run cannot repeat the previous replica")
                else:
                    agent = self._table_agent(agents, rd_uint(&col[COL_AGENT]))
                counter = expected[agent] + rd_sint(&col[COL_COUNTER])
                check_span(counter, length)
                expected[agent] = counter + length
                row.agent = agent
                row.counter = <int32_t>counter
                row.length = <int32_t>length
                row.deleted = 1 if flags & SF_DELETED else 0
                row.next_frag = NONE
                # origin_left
                if flags & SF_OL_NONE:
                    row.ol_agent = NONE
                    row.ol_counter = NONE
                elif flags & SF_OL_PREV:
                    if k == 0:
                        raise DecodeError("first run has no previous run")
                    row.ol_agent = rows[k - 1].agent
                    row.ol_counter = rows[k - 1].counter + rows[k - 1].length - 1
                else:
                    row.ol_agent = self._table_agent(agents, rd_uint(&col[COL_ORIGIN_AGENT]))
                    ref = counter + rd_sint(&col[COL_ORIGIN_COUNTER])
                    check_span(ref, 1)
                    row.ol_counter = <int32_t>ref
                # origin_right (SF_OR_NEXT is filled in below, once the next row is read)
                if flags & SF_OR_SAME == SF_OR_SAME:
                    if k == 0:
                        raise DecodeError("first run has no previous run")
                    if rows[k - 1].or_agent == -2:
                        row.or_agent = agent
                        row.or_counter = <int32_t>counter
                    else:
                        row.or_agent = rows[k - 1].or_agent
                        row.or_counter = rows[k - 1].or_counter
                elif flags & SF_OR_NONE:
                    row.or_agent = NONE
                    row.or_counter = NONE
                elif flags & SF_OR_NEXT:
                    row.or_agent = -2  # marker: the next row's first character
                    row.or_counter = 0
                else:
                    row.or_agent = self._table_agent(agents, rd_uint(&col[COL_ORIGIN_AGENT]))
                    ref = counter + rd_sint(&col[COL_ORIGIN_COUNTER])
                    check_span(ref, 1)
                    row.or_counter = <int32_t>ref
            for k in range(n_rows):
                if rows[k].or_agent == -2:
                    if k + 1 >= n_rows:
                        raise DecodeError("last run has no next run")
                    rows[k].or_agent = rows[k + 1].agent
                    rows[k].or_counter = rows[k + 1].counter
                chars += rows[k].length
            prev_agent = NONE
            prev_end = 1
            prev_target = 0
            for k in range(n_dels):
                head = rd_uint(&col[COL_DEL_HEAD])
                ai = self._table_agent(agents, head >> 1)
                if ai != prev_agent:
                    prev_agent = ai
                    prev_end = 1
                gap = rd_uint(&col[COL_DEL_GAP])
                if gap > C_MAX_COUNTER:
                    raise DecodeError("op counter out of range")
                counter = prev_end + gap
                length = rd_uint(&col[COL_DEL_LENGTH])
                check_span(counter, length)
                dl[k].agent = ai
                dl[k].counter = <int32_t>counter
                dl[k].length = <int32_t>length
                dl[k].target_agent = self._table_agent(agents, rd_uint(&col[COL_DEL_TARGET_AGENT]))
                target = prev_target + rd_sint(&col[COL_DEL_TARGET])
                step = -1 if head & 1 else 1
                if target < 1 or target > C_MAX_COUNTER:
                    raise DecodeError("delete target out of range")
                last = target + (length - 1) * step
                if min(target, last) < 1 or max(target, last) > C_MAX_COUNTER:
                    raise DecodeError("delete target out of range")
                dl[k].target = <int32_t>target
                dl[k].step = <int32_t>step
                prev_end = counter + length
                prev_target = target
            for k in range(N_COLUMNS):
                if col[k].pos != col[k].n:
                    raise DecodeError("trailing bytes in a column")
            size = rd_uint(&r)
            if size > r.n - r.pos:
                raise DecodeError("truncated")
            held_bytes = (<const char *>r.p)[r.pos:r.pos + size]
            r.pos += size
            held_runs = _decode_delta(held_bytes) if held_bytes else []
            if r.pos != r.n:
                raise DecodeError("trailing bytes after the state")
            content = _text_of(content_bytes, chars)
            if len(held_runs) > MAX_HELD_RUNS:
                raise DecodeError("too many held ops (MAX_HELD_RUNS)")
            # table indices -> this text's replica indices
            for k in range(len(agents)):
                amap[k] = self._agent(agents[k])
            self._build(rows, n_rows, dl, n_dels, amap, content)
        finally:
            PyMem_Free(amap)
            PyMem_Free(expected)
            PyMem_Free(rows)
            PyMem_Free(dl)
        for run in held_runs:
            self._hold(run)
        self._integrate_held()
        return 0

    cdef int32_t _table_agent(self, list agents, int64_t index) except -2:
        if index >= len(agents):
            raise DecodeError("replica index out of range")
        return <int32_t>index

    cdef int _build(self, Run *rows, int64_t n_rows, DelRun *dl, int64_t n_dels,
                    int32_t *amap, str content) except -1:
        """Fills this (empty) text from decoded rows and checks that they are consistent."""
        cdef Span *spans = NULL
        cdef Span *targets = NULL
        cdef int64_t *raw_start = NULL
        cdef int64_t k, n_spans = 0, n_targets = 0, raw = 0, lo, hi, t, e, m
        cdef int32_t R, bl = NONE, o, off, rr, x
        cdef Run *run
        cdef Block *b
        cdef DelRun *d
        # remap every replica index of the rows and delete runs
        for k in range(n_rows):
            rows[k].agent = amap[rows[k].agent]
            if rows[k].ol_agent != NONE:
                rows[k].ol_agent = amap[rows[k].ol_agent]
            if rows[k].or_agent != NONE:
                rows[k].or_agent = amap[rows[k].or_agent]
        for k in range(n_dels):
            dl[k].agent = amap[dl[k].agent]
            dl[k].target_agent = amap[dl[k].target_agent]
        try:
            spans = <Span *>PyMem_Malloc((n_rows + n_dels + 1) * sizeof(Span))
            targets = <Span *>PyMem_Malloc((n_dels + 1) * sizeof(Span))
            raw_start = <int64_t *>PyMem_Malloc((n_rows + 1) * sizeof(int64_t))
            if spans == NULL or targets == NULL or raw_start == NULL:
                raise MemoryError()
            self._append_chars(content)
            # runs and blocks, in document order
            for k in range(n_rows):
                R = self._new_run()
                run = &self._runs[R]
                run[0] = rows[k]
                run.content = raw
                raw_start[k] = raw
                raw += run.length
                if bl == NONE or self._blocks[bl].n == LOAD_FILL:
                    bl = self._new_block()
                    self._order[self._n_blocks - 1] = bl
                    self._blocks[bl].ord = <int32_t>(self._n_blocks - 1)
                b = &self._blocks[bl]
                b.runs[b.n] = R
                b.n += 1
                run.block = bl
                b.raw += run.length
                if not run.deleted:
                    b.vis += run.length
                    self._visible += run.length
                spans[n_spans].agent = run.agent
                spans[n_spans].start = run.counter
                spans[n_spans].end = <int64_t>run.counter + run.length
                spans[n_spans].extra = R
                n_spans += 1
            self._raw = raw
            # chains: every row is one, sorted by counter per replica; ids must be unique
            _sort_spans(spans, n_spans)
            for k in range(n_spans):
                if k and spans[k].agent == spans[k - 1].agent and (
                        spans[k].start < spans[k - 1].end):
                    raise DecodeError("duplicate item id")
                self._add_chain(<int32_t>spans[k].agent, <int32_t>spans[k].start,
                                <int32_t>spans[k].end, <int32_t>spans[k].extra)
            # origins exist and lie on the right sides
            for k in range(n_rows):
                run = &self._runs[k]
                if run.ol_agent != NONE:
                    rr = self._find(run.ol_agent, run.ol_counter, &off)
                    if rr == NONE or raw_start[rr] + off >= raw_start[k]:
                        raise DecodeError("origin_left missing or not left of its item")
                if run.or_agent != NONE:
                    rr = self._find(run.or_agent, run.or_counter, &off)
                    if rr == NONE or raw_start[rr] + off <= raw_start[k] + run.length - 1:
                        raise DecodeError("origin_right missing or not right of its item")
            # counters of every replica are 1..version, each used once
            for k in range(n_dels):
                spans[n_spans].agent = dl[k].agent
                spans[n_spans].start = dl[k].counter
                spans[n_spans].end = <int64_t>dl[k].counter + dl[k].length
                n_spans += 1
            _sort_spans(spans, n_spans)
            for k in range(n_spans):
                if k == 0 or spans[k].agent != spans[k - 1].agent:
                    if spans[k].start != 1:
                        raise DecodeError("op counters of a replica are not contiguous from 1")
                elif spans[k].start != spans[k - 1].end:
                    raise DecodeError("op counters of a replica are not contiguous from 1")
                self._agents[spans[k].agent].version = <int32_t>(spans[k].end - 1)
            # delete targets: existing characters, all deleted; deleted ones all targeted
            for k in range(n_dels):
                if dl[k].step > 0:
                    lo = dl[k].target
                    hi = <int64_t>dl[k].target + dl[k].length - 1
                else:
                    lo = <int64_t>dl[k].target - dl[k].length + 1
                    hi = dl[k].target
                t = lo
                while t <= hi:
                    rr = self._find(dl[k].target_agent, t, &off)
                    if rr == NONE:
                        raise DecodeError("delete target missing")
                    if not self._runs[rr].deleted:
                        raise DecodeError("deleted flags disagree with the delete ops")
                    t = <int64_t>self._runs[rr].counter + self._runs[rr].length
                targets[n_targets].agent = dl[k].target_agent
                targets[n_targets].start = lo
                targets[n_targets].end = hi + 1
                n_targets += 1
            # the delete log must list each replica's runs in counter order (encode_since
            # and encode_state rely on it); a snapshot may list them in any order
            for k in range(n_dels):
                spans[k].agent = dl[k].agent
                spans[k].start = dl[k].counter
                spans[k].extra = k
            _sort_spans(spans, n_dels)
            for k in range(n_dels):
                d = &dl[spans[k].extra]
                _push_del(&self._dels, d.agent, d.counter, d.length, d.target_agent, d.target,
                          d.step)
            _sort_spans(targets, n_targets)
            m = 0  # union of the target intervals, in place
            for k in range(n_targets):
                if m and targets[m - 1].agent == targets[k].agent and (
                        targets[k].start <= targets[m - 1].end):
                    if targets[k].end > targets[m - 1].end:
                        targets[m - 1].end = targets[k].end
                else:
                    targets[m] = targets[k]
                    m += 1
            for k in range(n_rows):
                run = &self._runs[k]
                if run.deleted and not _covered(targets, m, run.agent, run.counter,
                                                <int64_t>run.counter + run.length):
                    raise DecodeError("deleted flags disagree with the delete ops")
        finally:
            PyMem_Free(spans)
            PyMem_Free(targets)
            PyMem_Free(raw_start)
        return 0


cdef bint _covered(Span *spans, int64_t n, int64_t agent, int64_t start, int64_t end) noexcept:
    """Is [start, end) of ``agent`` inside one of the disjoint sorted intervals?"""
    cdef int64_t lo = 0, hi = n, mid
    while lo < hi:  # last interval starting at or before ``start``
        mid = (lo + hi) >> 1
        if spans[mid].agent < agent or (spans[mid].agent == agent and spans[mid].start <= start):
            lo = mid + 1
        else:
            hi = mid
    if lo == 0:
        return False
    return spans[lo - 1].agent == agent and spans[lo - 1].end >= end


def _counter_of(run):
    return run[2]


def _end_of(run):
    return run[2] + run[3]


def _merge_lists(list runs):
    """The twin's ``_merge_runs`` for runs of one replica sorted by counter."""
    cdef list out = []
    cdef list last
    for run in runs:
        last = out[len(out) - 1] if out else None
        if (run[0] == 0 and last is not None and last[0] == 0 and last[1] == run[1]
                and last[2] + last[3] == run[2] and run[5] == (run[1], run[2] - 1)
                and run[6] == last[6]):
            last[3] += run[3]
            last[4] += run[4]
            continue
        if run[0] == 1 and last is not None and last[0] == 1:
            # re-run the greedy delete merge op by op (rare: only across take ranges)
            for op in range(run[3]):
                last = out[len(out) - 1]
                t = run[5] + op * run[6]
                c = run[2] + op
                if last[0] == 1 and last[1] == run[1] and last[2] + last[3] == c and (
                        last[4] == run[4]):
                    if last[3] == 1 and t in (last[5] + 1, last[5] - 1):
                        last[6] = t - last[5]
                        last[3] = 2
                        continue
                    if last[3] > 1 and t == last[5] + last[3] * last[6]:
                        last[3] += 1
                        continue
                out.append([1, run[1], c, 1, run[4], t, 1])
            continue
        out.append(list(run))
    return out
