# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The CRDT merge core, compiled: an optimisation of ``_reference.py``.

Theory of operation
-------------------
This module implements exactly the model, the public API and the byte formats of
``p2pcloud/_core/_reference.py`` (read that first: it is the specification). Every state,
delta, encoding and change report must be identical on every input; the hypothesis tests in
tests/core/ run both on random operation streams. Only the data structures differ where speed
asks for it:

* deltas are written into a growable C buffer (``_Buf``) and read by a bounds-checked C cursor
  (``_Reader``); varints, floats and names never go through Python objects;
* decoding is a first pass that validates everything and stores the ops in a C array of
  ``OpRec`` (the ``_Decoded`` object): malformed input raises DecodeError before anything
  changes, and the merge pass that follows cannot fail;
* the merge pass keeps the per-replica version vector entry in a C variable while it walks a
  run, so the "have I seen this dot?" test is one comparison in the common case;
* decoded names stay UTF-8 slices of one arena; a str is made only when the merge needs one
  (non-ASCII names are decoded, so validated, during the first pass);
* the merge tries a document's next field in insertion order before a hash probe (the
  "order hint": deltas and since-deltas usually list a document's fields in the order the
  document got them), compares the name as bytes, and puts a new entry in front of a chain
  by letting the head object take its contents, so a field already present costs no dict
  probe at all and a new one costs one;
* snapshots and since-deltas gather the live entries into a C array of ``LiveRec`` and sort it
  by (replica, counter) in C, walk the selection in C and number names in a C hash table;
* the garbage collector is paused during bulk calls (apply, load, set_many): they allocate
  millions of objects, none of them in a cycle, and a collection would walk them all;
* the own replica's dots of an open transaction join the causal context in one range when the
  context is next read (the reference adds them one by one; nothing can observe the
  difference).

Shared pure-Python pieces (BlobRef, the clock, the version-vector codec, the constants) are
imported from the reference, so values and errors are the very same objects.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem, PyDict_Next, PyDict_SetDefault
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongLong
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc, qsort, realloc
from libc.string cimport memcmp, memcpy

cimport cython


cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void* op)
    # CPython's presized dict constructor (Include/cpython/dictobject.h): a bulk load knows
    # how many fields a new document gets, so its dict is built without rehashing
    dict _PyDict_NewPresized(Py_ssize_t minused)
    # the collector is paused during bulk calls (see _gc_pause): they allocate millions of
    # objects none of which can form a cycle, and each collection would walk the big lists
    int PyGC_Enable()
    bint PyUnicode_IS_COMPACT_ASCII(object o)
    void* PyUnicode_DATA(object o)
    str PyUnicode_New(Py_ssize_t size, unsigned int maxchar)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    int PyGC_Disable()

DEF PRESIZE_MIN = 64  # below this, growing a dict costs less than thinking about it

from bisect import bisect_right

from p2pcloud._core._reference import (
    FORMAT_MAGIC,
    FORMAT_VERSION,
    MAX_BLOB_HASH,
    MAX_CLOCK_SKEW_MS,
    MAX_COUNTER,
    MAX_NAME_BYTES,
    MAX_PHYSICAL_MS,
    MAX_REPLICA_ID,
    MAX_VALUE_DEPTH,
    MIN_REPLICA_ID,
    BlobRef,
    HybridClock,
    decode_version,
    encode_version,
    hlc_pack,
    hlc_unpack,
)
from p2pcloud.errors import ClockSkewError, CoreUsageError, DecodeError

__all__ = [
    "FORMAT_VERSION",
    "MAX_CLOCK_SKEW_MS",
    "BlobRef",
    "CausalContext",
    "HybridClock",
    "Replica",
    "decode_value",
    "decode_version",
    "encode_value",
    "encode_version",
    "hlc_pack",
    "hlc_unpack",
]

cdef extern from *:
    """
    #define P2PCLOUD_C_MAX_COUNTER 0x7FFFFFFFFFFFFFFFULL
    """
    # MAX_COUNTER as a C constant: a DEF of this size is a Python int, and comparing a
    # counter with it would box the counter on every op
    const uint64_t C_MAX_COUNTER "P2PCLOUD_C_MAX_COUNTER"
DEF C_MAX_NAME = 1024
DEF C_MAX_DEPTH = 32
DEF C_MAX_SKEW = 300000

cdef enum:
    OP_LWW = 1
    OP_MV = 2
    OP_COUNTER = 3
    OP_SET_ADD = 4
    OP_TEXT = 5
    OP_APPEND = 6
    OP_REMOVE_FIELD = 7
    OP_REMOVE_DOC = 8
    OP_SET_REMOVE = 9
    OP_ADVANCE = 10
    FLAG_NEW_COLL = 0x10
    FLAG_NEW_DOC = 0x20
    FLAG_KILLS = 0x40
    FLAG_TICK = 0x80
    TAG_NONE = 0
    TAG_FALSE = 1
    TAG_TRUE = 2
    TAG_UINT = 3
    TAG_NEGINT = 4
    TAG_FLOAT = 5
    TAG_STR = 6
    TAG_BYTES = 7
    TAG_LIST = 8
    TAG_MAP = 9
    TAG_BLOB = 10
    TAG_SMALL = 0x80

cdef inline bint is_entry_op(int k) noexcept:
    return 1 <= k <= 6

cdef object U64_MAX = (1 << 64) - 1
cdef object NEG_MIN = -(1 << 64)

# -- buffers -------------------------------------------------------------------------------


@cython.final
cdef class _Buf:
    """A growable byte buffer in C memory."""
    cdef unsigned char* data
    cdef Py_ssize_t n
    cdef Py_ssize_t cap

    def __cinit__(self):
        self.cap = 256
        self.n = 0
        self.data = <unsigned char*>malloc(self.cap)
        if self.data == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.data)

    cdef int grow(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t need = self.n + extra
        cdef Py_ssize_t cap = self.cap
        cdef unsigned char* p
        if need <= cap:
            return 0
        while cap < need:
            cap *= 2
        p = <unsigned char*>realloc(self.data, cap)
        if p == NULL:
            raise MemoryError()
        self.data = p
        self.cap = cap
        return 0

    cdef inline int byte(self, unsigned char b) except -1:
        if self.n >= self.cap:
            self.grow(1)
        self.data[self.n] = b
        self.n += 1
        return 0

    cdef inline int varint(self, uint64_t v) except -1:
        if self.n + 10 > self.cap:
            self.grow(10)
        while v > 0x7F:
            self.data[self.n] = <unsigned char>((v & 0x7F) | 0x80)
            self.n += 1
            v >>= 7
        self.data[self.n] = <unsigned char>v
        self.n += 1
        return 0

    cdef inline int raw(self, const unsigned char* p, Py_ssize_t k) except -1:
        if self.n + k > self.cap:
            self.grow(k)
        memcpy(self.data + self.n, p, k)
        self.n += k
        return 0

    cdef inline int append_buf(self, _Buf other) except -1:
        return self.raw(other.data, other.n)

    cdef bytes tobytes(self):
        return PyBytes_FromStringAndSize(<char*>self.data, self.n)


cdef Py_ssize_t _pow2_above(Py_ssize_t n) noexcept:
    cdef Py_ssize_t p = 64
    while p < n:
        p *= 2
    return p


cdef void* _grow(void* p, size_t size) except NULL:
    cdef void* q = realloc(p, size)
    if q == NULL:
        raise MemoryError()
    return q


cdef inline uint64_t zigzag(int64_t n) noexcept:
    return (<uint64_t>n << 1) ^ <uint64_t>(n >> 63)


cdef inline int64_t unzigzag(uint64_t n) noexcept:
    return <int64_t>(n >> 1) ^ -<int64_t>(n & 1)


# -- values --------------------------------------------------------------------------------


cdef int put_value(_Buf b, object value, int depth) except -1:
    cdef long long x
    cdef int overflow = 0
    cdef Py_ssize_t n
    cdef const char* p
    cdef double f
    cdef uint64_t bits
    cdef int i
    if depth > C_MAX_DEPTH:
        raise CoreUsageError(f"value nested deeper than {MAX_VALUE_DEPTH}")
    if value is None:
        b.byte(TAG_NONE)
    elif value is True:
        b.byte(TAG_TRUE)
    elif value is False:
        b.byte(TAG_FALSE)
    elif isinstance(value, int):
        x = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow == 0:
            if 0 <= x < 0x80:
                b.byte(TAG_SMALL | <unsigned char>x)
            elif x >= 0:
                b.byte(TAG_UINT)
                b.varint(<uint64_t>x)
            else:
                b.byte(TAG_NEGINT)
                b.varint(<uint64_t>(-(x + 1)))
        elif 0 <= value <= U64_MAX:
            b.byte(TAG_UINT)
            b.varint(PyLong_AsUnsignedLongLong(value))
        elif NEG_MIN <= value < 0:
            b.byte(TAG_NEGINT)
            b.varint(PyLong_AsUnsignedLongLong(-1 - value))
        else:
            raise CoreUsageError("integers must fit in -2^64..2^64-1")
    elif isinstance(value, float):
        f = value
        memcpy(&bits, &f, 8)
        b.byte(TAG_FLOAT)
        b.grow(8)
        for i in range(8):
            b.data[b.n + i] = <unsigned char>((bits >> (8 * i)) & 0xFF)
        b.n += 8
    elif isinstance(value, str):
        try:
            p = PyUnicode_AsUTF8AndSize(value, &n)
        except UnicodeEncodeError as exc:
            raise CoreUsageError("strings must be valid Unicode (no lone surrogates)") from exc
        b.byte(TAG_STR)
        b.varint(<uint64_t>n)
        b.raw(<const unsigned char*>p, n)
    elif isinstance(value, bytes):
        b.byte(TAG_BYTES)
        n = PyBytes_GET_SIZE(value)
        b.varint(<uint64_t>n)
        b.raw(<const unsigned char*>PyBytes_AS_STRING(value), n)
    elif isinstance(value, (list, tuple)):
        b.byte(TAG_LIST)
        b.varint(<uint64_t>len(value))
        for item in value:
            put_value(b, item, depth + 1)
    elif isinstance(value, dict):
        b.byte(TAG_MAP)
        b.varint(<uint64_t>len(value))
        for key, item in value.items():
            if not isinstance(key, str):
                raise CoreUsageError("map keys must be str")
            try:
                p = PyUnicode_AsUTF8AndSize(key, &n)
            except UnicodeEncodeError as exc:
                raise CoreUsageError("map keys must be valid Unicode") from exc
            b.varint(<uint64_t>n)
            b.raw(<const unsigned char*>p, n)
            put_value(b, item, depth + 1)
    elif isinstance(value, BlobRef):
        b.byte(TAG_BLOB)
        n = len(value.hash)
        b.varint(<uint64_t>n)
        b.raw(<const unsigned char*>PyBytes_AS_STRING(value.hash), n)
        b.varint(PyLong_AsUnsignedLongLong(value.size))
    else:
        raise CoreUsageError(f"cannot store a value of type {type(value).__name__}")
    return 0


def encode_value(value):
    """Encode a user value in the core's value format (see the reference).

    Raises:
        CoreUsageError: the value has an unsupported type or is out of range.
    """
    cdef _Buf b = _Buf()
    put_value(b, value, 0)
    return b.tobytes()


@cython.final
cdef class _Reader:
    """A bounds-checked cursor over bytes; every failure is a DecodeError."""
    cdef bytes data
    cdef const unsigned char* p
    cdef Py_ssize_t pos
    cdef Py_ssize_t end

    def __cinit__(self, bytes data):
        self.data = data
        self.p = <const unsigned char*>PyBytes_AS_STRING(data)
        self.pos = 0
        self.end = PyBytes_GET_SIZE(data)

    cdef inline int byte(self) except -1:
        if self.pos >= self.end:
            raise DecodeError("truncated")
        self.pos += 1
        return self.p[self.pos - 1]

    cdef inline uint64_t varint(self) except? 0xFFFFFFFFFFFFFFFF:
        cdef uint64_t n = 0
        cdef uint64_t b
        cdef int shift = 0
        while True:
            if self.pos >= self.end:
                raise DecodeError("truncated")
            b = self.p[self.pos]
            self.pos += 1
            if shift == 63:
                if b & 0x80:
                    raise DecodeError("varint longer than 10 bytes")
                if b > 1:
                    raise DecodeError("varint exceeds 64 bits")
                return n | (b << 63)
            n |= (b & 0x7F) << shift
            if not (b & 0x80):
                return n
            shift += 7

    cdef inline Py_ssize_t count(self) except -1:
        cdef uint64_t n = self.varint()
        if n > <uint64_t>(self.end - self.pos):
            raise DecodeError("count exceeds the remaining bytes")
        return <Py_ssize_t>n

    cdef inline int need(self, uint64_t n) except -1:
        if n > <uint64_t>(self.end - self.pos):
            raise DecodeError("truncated")
        return 0

    cdef bytes raw(self, uint64_t n):
        self.need(n)
        out = PyBytes_FromStringAndSize(<const char*>(self.p + self.pos), <Py_ssize_t>n)
        self.pos += <Py_ssize_t>n
        return out

    cdef str text(self, uint64_t n):
        self.need(n)
        try:
            out = PyUnicode_DecodeUTF8(<const char*>(self.p + self.pos), <Py_ssize_t>n, NULL)
        except UnicodeDecodeError as exc:
            raise DecodeError("invalid UTF-8") from exc
        self.pos += <Py_ssize_t>n
        return out

    cdef object value(self, int depth):
        cdef int tag
        cdef uint64_t bits = 0
        cdef double f
        cdef int i
        cdef Py_ssize_t k, cnt
        if depth > C_MAX_DEPTH:
            raise DecodeError("value nested too deep")
        tag = self.byte()
        if tag >= TAG_SMALL:
            return tag & 0x7F
        if tag == TAG_NONE:
            return None
        if tag == TAG_FALSE:
            return False
        if tag == TAG_TRUE:
            return True
        if tag == TAG_UINT:
            return self.varint()
        if tag == TAG_NEGINT:
            u = self.varint()
            if u <= <uint64_t>0x7FFFFFFFFFFFFFFE:
                return -1 - <long long>u  # in C: no intermediate int object
            return -1 - <object>u
        if tag == TAG_FLOAT:
            self.need(8)
            for i in range(8):
                bits |= (<uint64_t>self.p[self.pos + i]) << (8 * i)
            self.pos += 8
            memcpy(&f, &bits, 8)
            return f
        if tag == TAG_STR:
            return self.text(self.varint())
        if tag == TAG_BYTES:
            return self.raw(self.varint())
        if tag == TAG_LIST:
            cnt = self.count()
            out = []
            for k in range(cnt):
                out.append(self.value(depth + 1))
            return out
        if tag == TAG_MAP:
            cnt = self.count()
            d = {}
            for k in range(cnt):
                key = self.text(self.varint())
                d[key] = self.value(depth + 1)
            return d
        if tag == TAG_BLOB:
            n = self.varint()
            if not 1 <= n <= MAX_BLOB_HASH:
                raise DecodeError("blob hash length out of range")
            digest = self.raw(n)
            return BlobRef(digest, self.varint())
        raise DecodeError(f"unknown value tag {tag}")


def decode_value(data):
    """Decode one value encoded by :func:`encode_value`.

    Raises:
        DecodeError: the bytes are malformed or have trailing bytes.
    """
    cdef _Reader r = _Reader(bytes(data))
    value = r.value(0)
    if r.pos != r.end:
        raise DecodeError("trailing bytes after value")
    return value


cdef object _stored(object value):
    if isinstance(value, (list, tuple, dict)):
        return decode_value(encode_value(value))
    return value


cdef object _copy_out(object value):
    if isinstance(value, (list, dict)):
        return decode_value(encode_value(value))
    return value


cdef bytes _check_replica_id(object replica_id):
    if not isinstance(replica_id, bytes) or not MIN_REPLICA_ID <= len(replica_id) <= MAX_REPLICA_ID:
        raise CoreUsageError("a replica id is 8..32 bytes")
    return replica_id


cdef inline const char* _name_utf8(object name, Py_ssize_t* n, str what) except NULL:
    cdef const char* p
    if not isinstance(name, str):
        raise CoreUsageError(f"{what} must be a str")
    try:
        p = PyUnicode_AsUTF8AndSize(name, n)
    except UnicodeEncodeError as exc:
        raise CoreUsageError(f"{what} must be valid Unicode") from exc
    if n[0] > C_MAX_NAME:
        raise CoreUsageError(f"{what} longer than {MAX_NAME_BYTES} bytes")
    return p


cdef _check_now(object now_ms):
    if not isinstance(now_ms, int) or not 0 <= now_ms <= MAX_PHYSICAL_MS:
        raise CoreUsageError("now_ms must be an int of milliseconds in 0..2^47-1")


# -- causal context ------------------------------------------------------------------------


cdef class CausalContext:
    """A set of dots: per replica a version vector entry plus a cloud of ranges above it.

    Same semantics as the reference's CausalContext (kept compact on every insert).
    """
    cdef public dict vv
    cdef public dict cloud

    def __init__(self):
        """Create an empty context."""
        self.vv = {}
        self.cloud = {}

    cpdef bint contains(self, object key, uint64_t counter) except -1:
        """Return whether the dot ``(key, counter)`` is in the context."""
        cdef PyObject* v = PyDict_GetItem(self.vv, key)
        cdef list ranges
        cdef Py_ssize_t i
        if v != NULL and counter <= <uint64_t>(<object>v):
            return True
        v = PyDict_GetItem(self.cloud, key)
        if v == NULL:
            return False
        ranges = <list>v
        i = bisect_right(ranges, (counter, U64_MAX)) - 1
        return i >= 0 and ranges[i][0] <= counter <= ranges[i][1]

    def add(self, key, counter):
        """Add the dot ``(key, counter)``."""
        self.add_range(key, counter, counter)

    cpdef int add_range(self, object key, uint64_t lo, uint64_t hi) except -1:
        """Add the dots ``(key, lo) .. (key, hi)`` (inclusive); compacts as it goes."""
        cdef PyObject* pv
        cdef uint64_t v
        cdef list ranges
        cdef Py_ssize_t i, j
        if hi < lo:
            return 0
        pv = PyDict_GetItem(self.vv, key)
        v = 0 if pv == NULL else <uint64_t>(<object>pv)
        if hi <= v:
            return 0
        pv = PyDict_GetItem(self.cloud, key)
        ranges = None if pv == NULL else <list>pv
        if lo <= v + 1:
            v = hi
            if ranges is not None:
                i = 0
                while i < len(ranges) and <uint64_t>ranges[i][0] <= v + 1:
                    v = max(v, <uint64_t>ranges[i][1])
                    i += 1
                del ranges[:i]
                if not ranges:
                    del self.cloud[key]
            self.vv[key] = v
            return 0
        if ranges is None:
            self.cloud[key] = [(lo, hi)]
            return 0
        i = bisect_right(ranges, (lo, U64_MAX))
        if i > 0 and <uint64_t>ranges[i - 1][1] + 1 >= lo:
            i -= 1
            lo = ranges[i][0]
            hi = max(hi, <uint64_t>ranges[i][1])
        j = i
        while j < len(ranges) and <uint64_t>ranges[j][0] <= hi + 1:
            hi = max(hi, <uint64_t>ranges[j][1])
            j += 1
        ranges[i:j] = [(lo, hi)]
        return 0

    cpdef bint overlaps(self, object key, uint64_t lo, uint64_t hi) except -1:
        """Return whether any dot ``(key, lo..hi)`` is in the context."""
        cdef PyObject* pv = PyDict_GetItem(self.vv, key)
        cdef list ranges
        cdef Py_ssize_t i
        if pv != NULL and lo <= <uint64_t>(<object>pv):
            return True
        pv = PyDict_GetItem(self.cloud, key)
        if pv == NULL:
            return False
        ranges = <list>pv
        i = bisect_right(ranges, (hi, U64_MAX)) - 1
        return i >= 0 and ranges[i][1] >= lo

    cpdef list ranges(self, object key):
        """Return the dots of ``key`` as sorted disjoint inclusive ranges."""
        cdef list out = []
        v = self.vv.get(key, 0)
        if v:
            out.append((1, v))
        out.extend(self.cloud.get(key, ()))
        return out

    def keyset(self):
        """Return every key with at least one dot."""
        return set(self.vv) | set(self.cloud)

    cpdef uint64_t max(self, object key) except? 0xFFFFFFFFFFFFFFFF:
        """Return the greatest counter of ``key`` in the context (0 if none)."""
        ranges = self.cloud.get(key)
        if ranges:
            return ranges[len(ranges) - 1][1]
        return self.vv.get(key, 0)

    def merge(self, CausalContext other):
        """Add every dot of ``other`` (the join of two contexts)."""
        for key in other.keyset():
            for lo, hi in other.ranges(key):
                self.add_range(key, lo, hi)

    def compact(self):
        """Fold cloud ranges into the version vector where they touch it (idempotent)."""
        for key in list(self.cloud):
            ranges = sorted(self.cloud.pop(key))
            for lo, hi in ranges:
                self.add_range(key, lo, hi)

    def version(self):
        """Return the version vector part (keys with a counter > 0)."""
        return {k: v for k, v in self.vv.items() if v}

    def copy(self):
        """Return an independent copy."""
        cdef CausalContext out = CausalContext()
        out.vv = dict(self.vv)
        out.cloud = {k: list(v) for k, v in self.cloud.items()}
        return out

    def __eq__(self, other):
        if not isinstance(other, CausalContext):
            return NotImplemented
        keys = self.keyset() | other.keyset()
        return all(self.ranges(k) == other.ranges(k) for k in keys)

    __hash__ = None

    def __repr__(self):
        return f"CausalContext(vv={self.vv!r}, cloud={self.cloud!r})"


# -- state ---------------------------------------------------------------------------------


@cython.no_gc
@cython.freelist(64)
cdef class Entry:
    """One live entry of a dot store (see the reference).

    Not tracked by the garbage collector: an entry refers only to the next entry of its
    field and to a stored value (scalars, or containers the core copied), so it is never
    part of a reference cycle; millions of entries would otherwise make every collection
    walk them. ``gen`` is the apply() call that inserted it (0 for local writes): it lets
    the change report skip fields already reported without a dictionary of every change.
    """
    cdef public int kind
    cdef public int rep
    cdef public uint64_t ctr
    cdef public uint64_t hlc
    cdef public object value
    cdef public Entry next
    cdef uint64_t gen


cdef inline Entry new_entry(int kind, int rep, uint64_t ctr, uint64_t hlc, object value):
    cdef Entry e = Entry.__new__(Entry)
    e.kind = kind
    e.rep = rep
    e.ctr = ctr
    e.hlc = hlc
    e.value = value
    e.next = None
    e.gen = 0
    return e


@cython.final
cdef class _Changes:
    """The change report of one apply() call: each place once, in first-touch order.

    The reference keeps a dict of every change. Here an insertion marks its entry with the
    call's generation, so a field whose head carries that mark was already reported; the
    rarer touches (kills, text, logs) go through the ``rare`` set, which an insertion
    consults only when it is not empty.
    """
    cdef list order
    cdef set rare
    cdef uint64_t gen
    cdef bint on

    def __cinit__(self, uint64_t gen, bint on):
        self.order = []
        self.rare = set()
        self.gen = gen
        self.on = on

    cdef int touch(self, object coll, object doc, object field, Entry head) except -1:
        """A kill, text or log touch of a place whose field head is ``head`` (or None)."""
        if not self.on:
            return 0
        key = (coll, doc, field)
        if key in self.rare:
            return 0
        if head is None or head.gen != self.gen:
            self.order.append(key)
        self.rare.add(key)
        return 0

    cdef inline int inserted(self, Doc d, object field, bint had_head, uint64_t old_gen) except -1:
        """An insertion in front of a head of generation ``old_gen`` (``had_head`` false: the
        field was empty)."""
        if not self.on:
            return 0
        if had_head and old_gen == self.gen:
            return 0
        key = (d.coll, d.id, field)
        if self.rare and key in self.rare:
            return 0
        # a tuple of strings cannot be part of a cycle: keep the collector off it, so a
        # million-entry report does not make every collection walk it
        PyObject_GC_UnTrack(<void*>key)
        self.order.append(key)
        return 0


cdef class Doc:
    """A document: field name -> the head of its chain of live entries."""
    cdef public str coll
    cdef public str id
    cdef public dict fields

    def __cinit__(self, str coll, str doc_id):
        self.coll = coll
        self.id = doc_id
        self.fields = {}


cdef inline void _swap_into_head(Entry head, Entry e) noexcept:
    # put ``e`` in front of the chain starting at ``head`` without changing which object is
    # the head: the two exchange contents and ``e`` (now the old head) follows ``head``
    cdef int kind = head.kind, rep = head.rep
    cdef uint64_t ctr = head.ctr, hlc = head.hlc, gen = head.gen
    value = head.value
    head.kind = e.kind
    head.rep = e.rep
    head.ctr = e.ctr
    head.hlc = e.hlc
    head.gen = e.gen
    head.value = e.value
    e.kind = kind
    e.rep = rep
    e.ctr = ctr
    e.hlc = hlc
    e.gen = gen
    e.value = value
    e.next = head.next
    head.next = e


cdef list _chain_list(Entry head):
    cdef list out = []
    while head is not None:
        out.append(head)
        head = head.next
    return out


cdef _relink(Doc d, str field, list keep):
    cdef Py_ssize_t i
    if not keep:
        del d.fields[field]
        return
    for i in range(len(keep) - 1):
        (<Entry>keep[i]).next = keep[i + 1]
    (<Entry>keep[len(keep) - 1]).next = None
    d.fields[field] = keep[0]


cdef Entry _winner(list reps, Entry head):
    cdef Entry best = head
    cdef Entry e = head.next
    while e is not None:
        if e.hlc > best.hlc or (e.hlc == best.hlc and (
                reps[e.rep] > reps[best.rep] or (reps[e.rep] == reps[best.rep]
                                                 and e.ctr > best.ctr))):
            best = e
        e = e.next
    return best


_Text = None


def _text_class():
    """CORE-TEXT's compiled Text class (imported lazily: text is optional)."""
    global _Text
    if _Text is None:
        from p2pcloud._core._ctext import Text
        _Text = Text
    return _Text


def _text_apply(text, payload):
    """Apply a validated text delta; a refusal that depends on the text's state is dropped.

    The payload decoded during validation, so the only refusal left is the text's bound on
    ops held for missing predecessors (MAX_HELD_RUNS): the merge cannot fail half-way, so
    those ops are dropped here, and the next since-delta, which carries the whole text,
    brings them back.
    """
    try:
        return bool(text.apply(payload))
    except DecodeError:
        return False


def _validate_text(payload):
    # a text delta must decode before anything changes (CORE-TEXT's decode-only check)
    if payload:
        from p2pcloud._core._ctext import validate_delta
        validate_delta(payload)


cdef bytes _element(object element):
    if isinstance(element, (list, tuple, dict)):
        raise CoreUsageError("set elements are scalars: None, bool, int, float, str, bytes, BlobRef")
    return encode_value(element)


# -- names: the front-coded name table ------------------------------------------------------


DEF FIELD_CACHE = 8  # FIELD_NAME_CACHE of the reference
# Entry.gen of a local entry: this flag | its name number
cdef uint64_t NIDX_FLAG = (<uint64_t>1) << 63


@cython.final
cdef class _Names:
    """The names of one delta being written (the reference's _NameTable, same rules).

    The index from name to number is an open-addressing table in C (linear probing, the
    str's cached hash stored beside it) holding a reference to each name: a snapshot puts
    every field name once, and a Python dict would cost a probe of its entries plus an int
    object per name.
    """
    cdef Py_hash_t* ihash
    cdef PyObject** ikey
    cdef Py_ssize_t* iidx
    cdef Py_ssize_t icap  # a power of two, kept at most three quarters full
    cdef _Buf last
    cdef Py_ssize_t count
    # the last FIELD_CACHE field names introduced, in a ring (they are distinct, so the
    # order of the search does not matter): the str objects (kept alive by the list), their
    # UTF-8 bytes and their numbers
    cdef list recent_names
    cdef const char* recent_ptr[FIELD_CACHE]
    cdef Py_ssize_t recent_len[FIELD_CACHE]
    cdef Py_ssize_t recent_idx[FIELD_CACHE]
    cdef Py_hash_t recent_hash[FIELD_CACHE]  # str hashes are cached: a cheap first test
    cdef Py_ssize_t nrecent
    cdef Py_ssize_t ring

    def __cinit__(self):
        self.ihash = NULL
        self.ikey = NULL
        self.iidx = NULL
        self.icap = 0
        self.last = _Buf()
        self.count = 0
        self.recent_names = [None] * FIELD_CACHE
        self.nrecent = 0
        self.ring = 0

    cdef Py_ssize_t new(self, _Buf buf, str name) except -1:
        cdef Py_ssize_t n, p, limit
        cdef const unsigned char* raw = <const unsigned char*>PyUnicode_AsUTF8AndSize(name, &n)
        limit = n if n < self.last.n else self.last.n
        p = 0
        while p < limit and raw[p] == self.last.data[p]:
            p += 1
        buf.varint(((<uint64_t>p) << 1) | 1)
        buf.varint(<uint64_t>(n - p))
        buf.raw(raw + p, n - p)
        self.last.n = p
        self.last.raw(raw + p, n - p)
        self.count += 1
        return self.count - 1

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.ikey != NULL:
            for i in range(self.icap):
                Py_XDECREF(self.ikey[i])
        free(self.ihash)
        free(self.ikey)
        free(self.iidx)

    cdef int _rehash(self, Py_ssize_t cap) except -1:
        cdef Py_hash_t* oh = self.ihash
        cdef PyObject** ok = self.ikey
        cdef Py_ssize_t* oi = self.iidx
        cdef Py_ssize_t ocap = self.icap, i, j
        self.ihash = <Py_hash_t*>malloc(cap * sizeof(Py_hash_t))
        self.ikey = <PyObject**>malloc(cap * sizeof(PyObject*))
        self.iidx = <Py_ssize_t*>malloc(cap * sizeof(Py_ssize_t))
        if self.ihash == NULL or self.ikey == NULL or self.iidx == NULL:
            free(self.ihash)
            free(self.ikey)
            free(self.iidx)
            self.ihash, self.ikey, self.iidx, self.icap = oh, ok, oi, ocap
            raise MemoryError()
        for i in range(cap):
            self.ikey[i] = NULL
        self.icap = cap
        for i in range(ocap):
            if ok[i] != NULL:
                j = <Py_ssize_t>(<size_t>oh[i] & <size_t>(cap - 1))
                while self.ikey[j] != NULL:
                    j = (j + 1) & (cap - 1)
                self.ihash[j] = oh[i]
                self.ikey[j] = ok[i]
                self.iidx[j] = oi[i]
        free(oh)
        free(ok)
        free(oi)
        return 0

    cdef Py_ssize_t put(self, _Buf buf, str name) except -1:
        cdef Py_hash_t hv = hash(name)
        cdef Py_ssize_t j, found
        cdef PyObject* k
        if (self.count + 1) * 4 > self.icap * 3:
            self._rehash(64 if self.icap == 0 else self.icap * 2)
        j = <Py_ssize_t>(<size_t>hv & <size_t>(self.icap - 1))
        while True:
            k = self.ikey[j]
            if k == NULL:
                break
            if self.ihash[j] == hv and (k == <PyObject*>name or <str>k == name):
                found = self.iidx[j]
                buf.varint((<uint64_t>found) << 1)
                return found
            j = (j + 1) & (self.icap - 1)
        found = self.new(buf, name)
        Py_INCREF(name)
        self.ikey[j] = <PyObject*>name
        self.ihash[j] = hv
        self.iidx[j] = found
        return found

    cdef Py_ssize_t put_field(self, _Buf buf, str name, Py_ssize_t known) except -1:
        cdef Py_ssize_t i, k, idx, n
        cdef list recent = self.recent_names
        cdef const char* p = PyUnicode_AsUTF8AndSize(name, &n)
        cdef Py_hash_t hv = hash(name)
        if known < 0:
            for i in range(self.nrecent):
                if self.recent_hash[i] == hv and self.recent_len[i] == n and \
                        memcmp(self.recent_ptr[i], p, n) == 0:
                    known = self.recent_idx[i]
                    break
        if known >= 0:
            buf.varint((<uint64_t>known) << 1)
            return known
        idx = self.new(buf, name)
        k = self.ring
        recent[k] = name  # replaces the oldest once the ring is full
        self.recent_ptr[k] = p
        self.recent_len[k] = n
        self.recent_idx[k] = idx
        self.recent_hash[k] = hv
        self.ring = (k + 1) % FIELD_CACHE
        if self.nrecent < FIELD_CACHE:
            self.nrecent += 1
        return idx


cdef inline Py_ssize_t _known_name(Entry head, uint64_t txn_start):
    # the name number of a field whose head entry this transaction wrote, else -1
    if head is not None and head.rep == 0 and head.ctr >= txn_start and (head.gen & NIDX_FLAG):
        return <Py_ssize_t>(head.gen & ~NIDX_FLAG)
    return -1


@cython.final
cdef class _TxnWriter:
    """Encodes the ops of one local transaction as they happen."""
    cdef _Buf buf
    cdef _Names names
    cdef list reps
    cdef dict rep_map
    cdef object coll
    cdef object doc
    cdef Py_ssize_t nops
    # the document the last write went to, for the common run of writes to one document
    cdef object cache_coll
    cdef object cache_doc
    cdef Doc cache_d

    def __cinit__(self, bytes own_id):
        self.buf = _Buf()
        self.names = _Names()
        self.reps = [own_id]
        self.rep_map = {0: 0}
        self.coll = None
        self.doc = None
        self.nops = 0
        self.cache_coll = None
        self.cache_doc = None
        self.cache_d = None


# -- decoded deltas ------------------------------------------------------------------------


ctypedef struct OpRec:
    uint8_t kind
    int32_t coll
    int32_t doc
    int32_t field
    uint64_t ctr
    uint64_t hlc
    Py_ssize_t kstart
    Py_ssize_t kcount
    PyObject* payload  # a reference owned by the _Decoded (NULL: none yet)

ctypedef struct RunRec:
    Py_ssize_t rep
    Py_ssize_t first
    Py_ssize_t end

ctypedef struct KillRec:
    Py_ssize_t rep
    uint64_t ctr


@cython.final
cdef class _Decoded:
    """A fully decoded and validated delta, ready to merge (ops in C arrays)."""
    cdef list reps
    cdef list ctx
    # the name table: names are UTF-8 slices of ``arena``; the str of a name is made only
    # when a merge needs it (a field found by the order hint is compared as bytes and never
    # becomes a new str). Non-ASCII names are decoded (validated) while decoding.
    cdef _Buf arena
    cdef Py_ssize_t* noff
    cdef Py_ssize_t* nlen
    cdef PyObject** nobj
    cdef Py_ssize_t nnames
    cdef Py_ssize_t ncap
    cdef bint last_ascii  # whether the last name is ASCII (so is every prefix of it)
    cdef Py_ssize_t nascii  # names below this number have been added (ASCII or made)
    cdef OpRec* ops
    cdef Py_ssize_t nops
    cdef Py_ssize_t ops_cap
    cdef KillRec* kills
    cdef Py_ssize_t nkills
    cdef Py_ssize_t kills_cap
    cdef RunRec* runs
    cdef Py_ssize_t nruns
    cdef uint64_t max_hlc

    def __cinit__(self):
        self.reps = []
        self.ctx = []
        self.arena = _Buf()
        self.noff = NULL
        self.nlen = NULL
        self.nobj = NULL
        self.nnames = self.ncap = 0
        self.last_ascii = True
        self.nascii = 0
        self.ops = NULL
        self.kills = NULL
        self.runs = NULL
        self.nops = self.ops_cap = self.nkills = self.kills_cap = self.nruns = 0
        self.max_hlc = 0

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.ops != NULL:
            for i in range(self.nops):
                Py_XDECREF(self.ops[i].payload)
        if self.nobj != NULL:
            for i in range(self.nnames):
                Py_XDECREF(self.nobj[i])
        free(self.ops)
        free(self.kills)
        free(self.runs)
        free(self.noff)
        free(self.nlen)
        free(self.nobj)

    cdef int add_name(self, Py_ssize_t pre, const unsigned char* p, Py_ssize_t k) except -1:
        # a new name: the first ``pre`` bytes of the previous name, then ``p[:k]``, built in
        # place at the end of the arena
        cdef Py_ssize_t cap, i, start = self.arena.n, n = pre + k
        cdef bint ascii = self.last_ascii or pre == 0
        cdef unsigned char* q
        if not ascii:
            ascii = True
            q = self.arena.data + self.noff[self.nnames - 1]
            for i in range(pre):
                if q[i] >= 0x80:
                    ascii = False
                    break
        if ascii:
            for i in range(k):
                if p[i] >= 0x80:
                    ascii = False
                    break
        self.arena.grow(n)
        if pre:
            # the arena may have moved: copy from the previous name's offset
            memcpy(self.arena.data + start, self.arena.data + self.noff[self.nnames - 1], pre)
        memcpy(self.arena.data + start + pre, p, k)
        self.arena.n = start + n
        self.last_ascii = ascii
        if self.nnames >= self.ncap:
            cap = 64 if self.ncap == 0 else self.ncap * 2
            self.noff = <Py_ssize_t*>_grow(self.noff, cap * sizeof(Py_ssize_t))
            self.nlen = <Py_ssize_t*>_grow(self.nlen, cap * sizeof(Py_ssize_t))
            self.nobj = <PyObject**>_grow(self.nobj, cap * sizeof(PyObject*))
            self.ncap = cap
        i = self.nnames
        self.noff[i] = start
        self.nlen[i] = n
        self.nobj[i] = NULL
        if not ascii:
            self.nnames = i + 1
            self.name(i)  # validates the UTF-8 now, before anything changes
            return 0
        self.nnames = i + 1
        self.nascii = i + 1
        return 0

    cdef str name(self, Py_ssize_t i):
        cdef PyObject* o = self.nobj[i]
        if o != NULL:
            return <str>o
        if self.nascii > i:
            # every name not made yet is ASCII (add_name makes the others): copy the bytes
            out = PyUnicode_New(self.nlen[i], 127)
            memcpy(PyUnicode_DATA(out), self.arena.data + self.noff[i], self.nlen[i])
        else:
            try:
                out = PyUnicode_DecodeUTF8(<const char*>(self.arena.data + self.noff[i]),
                                           self.nlen[i], NULL)
            except UnicodeDecodeError as exc:
                raise DecodeError("invalid UTF-8 in a name") from exc
        Py_INCREF(out)
        self.nobj[i] = <PyObject*>out
        return out

    cdef inline bint name_is(self, Py_ssize_t i, object s) except -1:
        # whether name ``i`` equals the str ``s`` (compared as UTF-8 when ``s`` is ASCII)
        cdef PyObject* o = self.nobj[i]
        if o != NULL:
            return o == <PyObject*>s or <str>o == <str>s
        if PyUnicode_IS_COMPACT_ASCII(s):
            return PyUnicode_GET_LENGTH(s) == self.nlen[i] and memcmp(
                PyUnicode_DATA(s), self.arena.data + self.noff[i], self.nlen[i]) == 0
        return self.name(i) == <str>s

    cdef int reserve(self, Py_ssize_t n) except -1:
        # room for n ops in all (a run's header says how many ops follow), and for as many
        # names (most ops of a big delta introduce one): no regrowth while decoding. At
        # least doubling, so a delta of many small runs costs no quadratic copying.
        cdef OpRec* p
        cdef Py_ssize_t cap
        if n > self.ncap:
            cap = n if n > 2 * self.ncap else 2 * self.ncap
            self.noff = <Py_ssize_t*>_grow(self.noff, cap * sizeof(Py_ssize_t))
            self.nlen = <Py_ssize_t*>_grow(self.nlen, cap * sizeof(Py_ssize_t))
            self.nobj = <PyObject**>_grow(self.nobj, cap * sizeof(PyObject*))
            self.ncap = cap
        if n > self.ops_cap:
            cap = n if n > 2 * self.ops_cap else 2 * self.ops_cap
            p = <OpRec*>realloc(self.ops, cap * sizeof(OpRec))
            if p == NULL:
                raise MemoryError()
            self.ops = p
            self.ops_cap = cap
        return 0

    cdef OpRec* new_op(self) except NULL:
        cdef Py_ssize_t cap
        cdef OpRec* p
        if self.nops >= self.ops_cap:
            cap = 64 if self.ops_cap == 0 else self.ops_cap * 2
            p = <OpRec*>realloc(self.ops, cap * sizeof(OpRec))
            if p == NULL:
                raise MemoryError()
            self.ops = p
            self.ops_cap = cap
        self.ops[self.nops].payload = NULL
        self.nops += 1
        return &self.ops[self.nops - 1]

    cdef int add_kill(self, Py_ssize_t rep, uint64_t ctr) except -1:
        cdef Py_ssize_t cap
        cdef KillRec* p
        if self.nkills >= self.kills_cap:
            cap = 16 if self.kills_cap == 0 else self.kills_cap * 2
            p = <KillRec*>realloc(self.kills, cap * sizeof(KillRec))
            if p == NULL:
                raise MemoryError()
            self.kills = p
            self.kills_cap = cap
        self.kills[self.nkills].rep = rep
        self.kills[self.nkills].ctr = ctr
        self.nkills += 1
        return 0


cdef int32_t _read_name(_Reader r, _Decoded names) except -2:
    cdef uint64_t n = r.varint()
    cdef uint64_t p, k
    if not (n & 1):
        if (n >> 1) >= <uint64_t>names.nnames:
            raise DecodeError("name reference out of range")
        return <int32_t>(n >> 1)
    p = n >> 1
    # the previous new name is the table's last one (every new name is appended)
    if p > <uint64_t>(names.nlen[names.nnames - 1] if names.nnames else 0):
        raise DecodeError("name prefix longer than the previous name")
    k = r.varint()
    if p + k > C_MAX_NAME or k > C_MAX_NAME:
        raise DecodeError("name too long")
    r.need(k)
    names.add_name(<Py_ssize_t>p, r.p + r.pos, <Py_ssize_t>k)
    r.pos += <Py_ssize_t>k
    return <int32_t>(names.nnames - 1)


# -- live entries gathered for encoding ---------------------------------------------------


ctypedef struct LiveRec:
    uint64_t ctr
    Py_ssize_t rank
    PyObject* entry
    PyObject* coll
    PyObject* doc
    PyObject* field


cdef int _cmp_live(const void* a, const void* b) noexcept nogil:
    cdef const LiveRec* x = <const LiveRec*>a
    cdef const LiveRec* y = <const LiveRec*>b
    if x.rank != y.rank:
        return -1 if x.rank < y.rank else 1
    if x.ctr != y.ctr:
        return -1 if x.ctr < y.ctr else 1
    return 0


cdef int _bucket_sort(_LiveArray live, Py_ssize_t nrank) except -1:
    cdef Py_ssize_t* start
    cdef LiveRec* out
    cdef Py_ssize_t i, r, a, b
    cdef bint sorted_ok = True
    for i in range(1, live.n):
        if _cmp_live(&live.recs[i - 1], &live.recs[i]) > 0:
            sorted_ok = False
            break
    if sorted_ok or live.n < 2:
        return 0
    start = <Py_ssize_t*>malloc((nrank + 1) * sizeof(Py_ssize_t))
    out = <LiveRec*>malloc(live.n * sizeof(LiveRec))
    if start == NULL or out == NULL:
        free(start)
        free(out)
        raise MemoryError()
    for r in range(nrank + 1):
        start[r] = 0
    for i in range(live.n):
        start[live.recs[i].rank + 1] += 1
    for r in range(nrank):
        start[r + 1] += start[r]
    for i in range(live.n):
        r = live.recs[i].rank
        out[start[r]] = live.recs[i]
        start[r] += 1
    free(live.recs)
    live.recs = out
    live.cap = live.n
    # start[r] is now the end of bucket r
    a = 0
    for r in range(nrank):
        b = start[r]
        for i in range(a + 1, b):
            if out[i - 1].ctr > out[i].ctr:
                qsort(&out[a], b - a, sizeof(LiveRec), _cmp_live)
                break
        a = b
    free(start)
    return 0


@cython.final
cdef class _LiveArray:
    cdef LiveRec* recs
    cdef Py_ssize_t n
    cdef Py_ssize_t cap
    cdef list keep  # keeps the objects the records point to alive

    def __cinit__(self):
        self.recs = NULL
        self.n = self.cap = 0
        self.keep = []

    def __dealloc__(self):
        free(self.recs)

    cdef int push(self, Entry e, Py_ssize_t rank, object coll, object doc, object field) except -1:
        cdef Py_ssize_t cap
        cdef LiveRec* p
        if self.n >= self.cap:
            cap = 1024 if self.cap == 0 else self.cap * 2
            p = <LiveRec*>realloc(self.recs, cap * sizeof(LiveRec))
            if p == NULL:
                raise MemoryError()
            self.recs = p
            self.cap = cap
        p = &self.recs[self.n]
        p.ctr = e.ctr
        p.rank = rank
        p.entry = <PyObject*>e
        p.coll = <PyObject*>coll
        p.doc = NULL if doc is None else <PyObject*>doc
        p.field = NULL if field is None else <PyObject*>field
        self.n += 1
        return 0


# -- the replica ---------------------------------------------------------------------------


cdef class Replica:
    """One replica of a sub-cloud: collections, logs, causal context, clock.

    The same API and behaviour as the reference's Replica (see its docstrings).
    """
    cdef public bytes replica_id
    cdef public object clock
    cdef list _reps
    cdef dict _rep_index
    cdef CausalContext _ctx
    cdef dict _colls
    cdef dict _logs
    cdef dict _texts
    cdef uint64_t _next
    cdef _TxnWriter _txn
    cdef uint64_t _txn_hlc
    cdef uint64_t _txn_start
    cdef uint64_t _own_flushed
    cdef _Buf _scratch
    cdef uint64_t _gen

    def __init__(self, replica_id):
        """Create an empty replica.

        Raises:
            CoreUsageError: the id is out of range.
        """
        self.replica_id = _check_replica_id(replica_id)
        self._reps = [replica_id]
        self._rep_index = {replica_id: 0}
        self._ctx = CausalContext()
        self._colls = {}
        self._logs = {}
        self._texts = {}
        self.clock = HybridClock()
        self._next = 1
        self._txn = None
        self._txn_hlc = 0
        self._txn_start = 0
        self._own_flushed = 0
        self._scratch = _Buf()
        self._gen = 1

    cdef int _flush_own(self) except -1:
        # the open transaction's own dots join the context as one range
        cdef uint64_t lo
        if self._txn_start == 0 or self._next - 1 <= self._own_flushed:
            return 0
        lo = self._txn_start if self._txn_start > self._own_flushed else self._own_flushed + 1
        self._ctx.add_range(0, lo, self._next - 1)
        self._own_flushed = self._next - 1
        return 0

    # -- transactions ------------------------------------------------------------------

    def begin(self, now_ms):
        """Start a local transaction; all its writes share one HLC reading.

        Raises:
            CoreUsageError: a transaction is already open, or ``now_ms`` is out of range.
        """
        if self._txn is not None:
            raise CoreUsageError("a transaction is already open")
        self._txn_hlc = self.clock.tick(now_ms)
        self._txn = _TxnWriter(self.replica_id)
        self._txn_start = self._next
        self._own_flushed = self._next - 1

    def commit(self):
        """End the transaction and return its delta (``b""`` if it wrote nothing).

        Raises:
            CoreUsageError: no transaction is open.
        """
        cdef _TxnWriter t = self._txn
        cdef _Buf out
        if t is None:
            raise CoreUsageError("no transaction is open")
        self._flush_own()
        start = self._txn_start
        self._txn = None
        self._txn_start = 0
        if t.nops == 0:
            return b""
        out = _Buf()
        out.byte(FORMAT_MAGIC)
        out.byte(FORMAT_VERSION)
        out.varint(len(t.reps))
        for rid in t.reps:
            out.varint(len(<bytes>rid))
            out.raw(<const unsigned char*>PyBytes_AS_STRING(rid), len(<bytes>rid))
        out.byte(0)
        out.byte(1)
        out.byte(0)
        out.varint(start)
        out.varint(self._txn_hlc)
        out.varint(<uint64_t>t.nops)
        out.grow(t.buf.n)
        out.append_buf(t.buf)
        return out.tobytes()

    @property
    def in_transaction(self):
        """Whether a local transaction is open."""
        return self._txn is not None

    cdef _TxnWriter _writer(self):
        if self._txn is None:
            raise CoreUsageError("writes need an open transaction: call begin(now_ms) first")
        return self._txn

    cdef int _op_header(self, _TxnWriter t, int op, str coll, object doc, bint kills) except -1:
        cdef int h = op | (FLAG_KILLS if kills else 0)
        cdef bint new_coll = coll != t.coll
        cdef bint new_doc = doc is not None and (new_coll or doc != t.doc)
        if new_coll:
            h |= FLAG_NEW_COLL
        if new_doc:
            h |= FLAG_NEW_DOC
        t.buf.byte(h)
        if new_coll:
            t.names.put(t.buf, coll)
            t.coll = coll
            t.doc = None
        if new_doc:
            t.names.put(t.buf, doc)
            t.doc = doc
        t.nops += 1
        return 0

    cdef int _put_kills(self, _TxnWriter t, list kills) except -1:
        cdef Entry e
        cdef PyObject* pi
        t.buf.varint(len(kills))
        for e in kills:
            pi = PyDict_GetItem(t.rep_map, e.rep)
            if pi == NULL:
                idx = len(t.reps)
                t.rep_map[e.rep] = idx
                t.reps.append(self._reps[e.rep])
            else:
                idx = <object>pi
            t.buf.varint(idx)
            t.buf.varint(e.ctr)
        return 0

    cdef uint64_t _new_dot(self) except 0:
        cdef uint64_t ctr = self._next
        if ctr > C_MAX_COUNTER:
            raise CoreUsageError("dot counter exhausted")
        self._next = ctr + 1
        return ctr

    cdef Doc _doc_for_write(self, str coll, str doc):
        cdef PyObject* p = PyDict_GetItem(self._colls, coll)
        cdef dict docs
        cdef Doc d
        if p == NULL:
            docs = {}
            self._colls[coll] = docs
        else:
            docs = <dict>p
        p = PyDict_GetItem(docs, doc)
        if p == NULL:
            d = Doc(coll, doc)
            docs[doc] = d
            return d
        return <Doc>p

    cdef Doc _doc_w(self, _TxnWriter t, object coll, object doc):
        # the document a local write goes to; names are checked once per run of writes
        cdef Py_ssize_t n
        if coll is t.cache_coll and doc is t.cache_doc and t.cache_d is not None:
            return t.cache_d
        _name_utf8(coll, &n, "collection name")
        _name_utf8(doc, &n, "document id")
        d = self._doc_for_write(coll, doc)
        t.cache_coll = coll
        t.cache_doc = doc
        t.cache_d = d
        return d

    cdef int _set1(self, _TxnWriter t, object coll, object doc, object field, object value,
                   int op) except -1:
        """set / set_mv: write a register value, killing every entry seen at the field."""
        cdef _Buf s = self._scratch
        cdef Py_ssize_t n
        cdef Doc d
        cdef PyObject* ph
        cdef Entry head, e
        cdef uint64_t ctr
        cdef int h
        s.n = 0
        put_value(s, value, 0)
        if not (coll is t.cache_coll and doc is t.cache_doc and t.cache_d is not None):
            _name_utf8(coll, &n, "collection name")
            _name_utf8(doc, &n, "document id")
        _name_utf8(field, &n, "field name")
        d = self._doc_w(t, coll, doc)
        if isinstance(value, (list, tuple, dict)):
            value = decode_value(s.tobytes())
        ctr = self._new_dot()
        e = new_entry(op, 0, ctr, self._txn_hlc, value)
        ph = PyDict_SetDefault(d.fields, field, e)
        head = None
        if ph != <PyObject*>e:
            head = <Entry>ph
            d.fields[field] = e
        # header byte, then the names that changed, the field, the value, the kills
        h = op
        if head is not None:
            h |= FLAG_KILLS
        if coll != t.coll:
            h |= FLAG_NEW_COLL | FLAG_NEW_DOC
            t.buf.byte(h)
            t.names.put(t.buf, coll)
            t.names.put(t.buf, doc)
            t.coll = coll
            t.doc = doc
        elif doc != t.doc:
            h |= FLAG_NEW_DOC
            t.buf.byte(h)
            t.names.put(t.buf, doc)
            t.doc = doc
        else:
            t.buf.byte(h)
        t.nops += 1
        e.gen = NIDX_FLAG | <uint64_t>t.names.put_field(t.buf, field,
                                                         _known_name(head, self._txn_start))
        t.buf.append_buf(s)
        if head is not None:
            self._put_kills(t, _chain_list(head))
        return 0

    # -- local writes ------------------------------------------------------------------

    def set(self, coll, doc, field, value):
        """Write a last-writer-wins value (see the reference).

        Raises:
            CoreUsageError: no open transaction, a bad name or an unsupported value.
        """
        cdef _TxnWriter t = self._txn
        if t is None:
            raise CoreUsageError("writes need an open transaction: call begin(now_ms) first")
        self._set1(t, coll, doc, field, value, OP_LWW)

    def set_many(self, coll, doc, items):
        """Write many last-writer-wins fields of one document (the bulk path).

        Raises:
            CoreUsageError: as :meth:`set`; the pairs before the bad one are written.
        """
        cdef _TxnWriter t = self._txn
        if t is None:
            raise CoreUsageError("writes need an open transaction: call begin(now_ms) first")
        cdef int was = PyGC_Disable()
        try:
            self._set_many(t, coll, doc, items)
        finally:
            if was:
                PyGC_Enable()

    cdef int _set_many(self, _TxnWriter t, coll, doc, items) except -1:
        cdef Py_ssize_t n, i = 0
        cdef Doc d
        if isinstance(items, dict):
            n = len(<dict>items)
            for field, value in (<dict>items).items():
                self._set1(t, coll, doc, field, value, OP_LWW)
                i += 1
                if i == 1 and n >= PRESIZE_MIN:
                    # a bulk write into a new document: presize its dict and the name table
                    d = t.cache_d
                    if d is not None and len(d.fields) == 1:
                        fresh = _PyDict_NewPresized(n)
                        # item by item: dict.update() into an empty dict clones the small
                        # source's table and so would undo the presizing
                        for fk, fv in d.fields.items():
                            fresh[fk] = fv
                        d.fields = fresh

        else:
            from collections.abc import Mapping
            pairs = items.items() if isinstance(items, Mapping) else items
            for field, value in pairs:
                self._set1(t, coll, doc, field, value, OP_LWW)
        return 0

    def set_mv(self, coll, doc, field, value):
        """Write a multi-value register (see the reference).

        Raises:
            CoreUsageError: as :meth:`set`.
        """
        cdef _TxnWriter t = self._writer()
        self._set1(t, coll, doc, field, value, OP_MV)

    cdef _check_kind(self, coll, doc, field, int kind):
        head = self._field_head(coll, doc, field)
        if head is not None and _winner(self._reps, head).kind != kind:
            raise CoreUsageError(f"field {field!r} holds another type")

    cdef Entry _write(self, int op, coll, doc, field, value, bytes payload, int filt,
                      bytes enc):
        """Shared body of the entry-creating writes other than set/set_mv."""
        cdef _TxnWriter t = self._writer()
        cdef Py_ssize_t n
        cdef Entry e, entry, prev
        _name_utf8(coll, &n, "collection name")
        _name_utf8(doc, &n, "document id")
        _name_utf8(field, &n, "field name")
        d = self._doc_for_write(coll, doc)
        head = d.fields.get(field)
        kills = []
        keep = []
        for e in _chain_list(head):
            if (filt == 1 and e.kind == OP_COUNTER and e.rep == 0) or \
               (filt == 2 and e.kind == OP_TEXT and e.rep == 0) or \
               (filt == 3 and e.kind == OP_SET_ADD and encode_value(e.value) == enc):
                kills.append(e)
            else:
                keep.append(e)
        ctr = self._new_dot()
        entry = new_entry(op, 0, ctr, self._txn_hlc, value)
        prev = entry
        for e in keep:
            prev.next = e
            prev = e
        prev.next = None
        d.fields[field] = entry
        self._op_header(t, op, coll, doc, bool(kills))
        entry.gen = NIDX_FLAG | <uint64_t>t.names.put_field(t.buf, field,
                                                             _known_name(head, self._txn_start))
        t.buf.raw(<const unsigned char*>PyBytes_AS_STRING(payload), len(payload))
        if kills:
            self._put_kills(t, kills)
        return entry

    def increment(self, coll, doc, field, amount=1):
        """Add ``amount`` (negative to decrement) to a counter field.

        Raises:
            CoreUsageError: the field holds a non-counter value, or bad arguments.
        """
        cdef Entry e
        self._writer()
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise CoreUsageError("counter amounts are ints")
        self._check_kind(coll, doc, field, OP_COUNTER)
        head = self._field_head(coll, doc, field)
        p = n = 0
        for e in _chain_list(head):
            if e.kind == OP_COUNTER and e.rep == 0:
                p += e.value[0]
                n += e.value[1]
        if amount >= 0:
            p += amount
        else:
            n -= amount
        if p > U64_MAX or n > U64_MAX:
            raise CoreUsageError("counter overflow")
        b = _Buf()
        b.varint(PyLong_AsUnsignedLongLong(p))
        b.varint(PyLong_AsUnsignedLongLong(n))
        self._write(OP_COUNTER, coll, doc, field, (p, n), b.tobytes(), 1, None)

    def set_add(self, coll, doc, field, element):
        """Add an element to an add-wins set field.

        Raises:
            CoreUsageError: the field holds another type, or the element is not a scalar.
        """
        self._writer()
        enc = _element(element)
        self._check_kind(coll, doc, field, OP_SET_ADD)
        self._write(OP_SET_ADD, coll, doc, field, element, enc, 3, enc)

    def set_discard(self, coll, doc, field, element):
        """Remove an element from an add-wins set (a concurrent add wins).

        Raises:
            CoreUsageError: no open transaction or the element is not a scalar.
        """
        cdef Entry e
        cdef _TxnWriter t = self._writer()
        enc = _element(element)
        head = self._field_head(coll, doc, field)
        kills = [e for e in _chain_list(head)
                 if e.kind == OP_SET_ADD and encode_value(e.value) == enc]
        if not kills:
            return
        self._kill_in_field(coll, doc, field, kills)
        self._new_dot()
        self._op_header(t, OP_SET_REMOVE, coll, doc, True)
        t.names.put_field(t.buf, field, _known_name(head, self._txn_start))
        t.buf.raw(<const unsigned char*>PyBytes_AS_STRING(enc), len(enc))
        self._put_kills(t, kills)

    def remove_field(self, coll, doc, field):
        """Remove a field (a concurrent write to it survives).

        Raises:
            CoreUsageError: no open transaction.
        """
        cdef _TxnWriter t = self._writer()
        head = self._field_head(coll, doc, field)
        kills = _chain_list(head)
        if not kills:
            return
        self._kill_in_field(coll, doc, field, kills)
        self._new_dot()
        self._op_header(t, OP_REMOVE_FIELD, coll, doc, True)
        t.names.put_field(t.buf, field, _known_name(head, self._txn_start))
        self._put_kills(t, kills)

    def remove(self, coll, doc):
        """Remove a document (fields written concurrently survive).

        Raises:
            CoreUsageError: no open transaction.
        """
        cdef _TxnWriter t = self._writer()
        d = self._colls.get(coll, {}).get(doc)
        if d is None:
            return
        kills = []
        for head in (<Doc>d).fields.values():
            kills.extend(_chain_list(head))
        del self._colls[coll][doc]
        if not self._colls[coll]:
            del self._colls[coll]
        t.cache_d = None
        self._new_dot()
        self._op_header(t, OP_REMOVE_DOC, coll, doc, True)
        self._put_kills(t, kills)

    def append(self, log, value):
        """Append a record to an append-only log (readings, events).

        Raises:
            CoreUsageError: no open transaction, a bad name or an unsupported value.
        """
        cdef _TxnWriter t = self._writer()
        cdef Py_ssize_t n
        cdef _Buf s = self._scratch
        _name_utf8(log, &n, "log name")
        s.n = 0
        put_value(s, value, 0)
        ctr = self._new_dot()
        es = self._logs.get(log)
        if es is None:
            es = self._logs[log] = []
        es.append(new_entry(OP_APPEND, 0, ctr, self._txn_hlc, _stored(value)))
        self._op_header(t, OP_APPEND, log, None, False)
        t.buf.append_buf(s)

    def text_insert(self, coll, doc, field, pos, text):
        """Insert ``text`` at ``pos`` in a text field.

        Raises:
            CoreUsageError: the field holds another type or bad arguments.
        """
        self._text_edit(coll, doc, field, lambda t: t.insert(pos, text))

    def text_delete(self, coll, doc, field, pos, length):
        """Delete ``length`` characters at ``pos`` in a text field.

        Raises:
            CoreUsageError: the field holds another type or bad arguments.
        """
        self._text_edit(coll, doc, field, lambda t: t.delete(pos, length))

    def _text_edit(self, coll, doc, field, edit):
        cdef Py_ssize_t n
        self._writer()
        _name_utf8(coll, &n, "collection name")
        _name_utf8(doc, &n, "document id")
        _name_utf8(field, &n, "field name")
        self._check_kind(coll, doc, field, OP_TEXT)
        key = (coll, doc, field)
        text = self._texts.get(key)
        if text is None:
            text = _text_class()(self.replica_id)
        try:
            edit(text)
        except (IndexError, ValueError, TypeError) as exc:
            raise CoreUsageError(f"bad text edit: {exc}") from exc
        self._texts[key] = text
        delta = text.take_pending()
        b = _Buf()
        b.varint(len(delta))
        b.raw(<const unsigned char*>PyBytes_AS_STRING(delta), len(delta))
        self._write(OP_TEXT, coll, doc, field, None, b.tobytes(), 2, None)

    cdef _kill_in_field(self, coll, doc, field, list kills):
        cdef Doc d = self._colls[coll][doc]
        dead = {id(e) for e in kills}
        keep = [e for e in _chain_list(d.fields[field]) if id(e) not in dead]
        _relink(d, field, keep)
        if not d.fields:
            del self._colls[coll][doc]
            if not self._colls[coll]:
                del self._colls[coll]
            if self._txn is not None:
                self._txn.cache_d = None

    # -- reads -------------------------------------------------------------------------

    cdef Entry _field_head(self, coll, doc, field):
        docs = self._colls.get(coll)
        if docs is None:
            return None
        d = docs.get(doc)
        if d is None:
            return None
        return (<Doc>d).fields.get(field)

    cdef object _read(self, coll, doc, field, Entry head):
        cdef Entry w = _winner(self._reps, head)
        cdef Entry e
        if w.kind == OP_LWW:
            return _copy_out(w.value)
        if w.kind == OP_MV:
            same = sorted((e for e in _chain_list(head) if e.kind == OP_MV),
                          key=lambda e: (e.hlc, self._reps[e.rep], e.ctr))
            return tuple(_copy_out(e.value) for e in same)
        if w.kind == OP_COUNTER:
            total = 0
            for e in _chain_list(head):
                if e.kind == OP_COUNTER:
                    total += e.value[0] - e.value[1]
            return total
        if w.kind == OP_SET_ADD:
            return frozenset([e.value for e in _chain_list(head) if e.kind == OP_SET_ADD])
        text = self._texts.get((coll, doc, field))
        return "" if text is None else text.value()

    def get(self, coll, doc, field, default=None):
        """Read a field (see the reference for what each type returns)."""
        head = self._field_head(coll, doc, field)
        return default if head is None else self._read(coll, doc, field, head)

    def conflicts(self, coll, doc, field):
        """Every live value of a field, oldest first (HLC, replica id, counter)."""
        es = sorted(_chain_list(self._field_head(coll, doc, field)),
                    key=lambda e: (e.hlc, self._reps[e.rep], e.ctr))
        return [_copy_out(e.value) for e in es]

    def document(self, coll, doc):
        """Read a whole document as ``{field: value}`` (fields sorted), or None if absent."""
        d = self._colls.get(coll, {}).get(doc)
        if d is None:
            return None
        fields = (<Doc>d).fields
        return {f: self._read(coll, doc, f, fields[f]) for f in sorted(fields)}

    def documents(self, coll):
        """The ids of the documents of a collection, sorted."""
        return sorted(self._colls.get(coll, {}))

    def collections(self):
        """The names of the non-empty collections, sorted."""
        return sorted(self._colls)

    def logs(self):
        """The names of the logs, sorted."""
        return sorted(self._logs)

    def log(self, name):
        """The records of a log as ``(hlc, replica id, value)``, oldest first."""
        es = sorted(self._logs.get(name, ()), key=lambda e: (e.hlc, self._reps[e.rep], e.ctr))
        return [(e.hlc, self._reps[e.rep], _copy_out(e.value)) for e in es]

    def version(self):
        """The version vector: replica id -> greatest counter seen with no gap below it."""
        self._flush_own()
        return {self._reps[k]: v for k, v in self._ctx.vv.items() if v}

    def context(self):
        """A copy of the causal context, keyed by replica id."""
        cdef CausalContext out = CausalContext()
        self._flush_own()
        for k in self._ctx.keyset():
            for lo, hi in self._ctx.ranges(k):
                out.add_range(self._reps[k], lo, hi)
        return out

    # -- decoding ----------------------------------------------------------------------

    cdef _Decoded _decode(self, bytes data, object now_ms):
        cdef _Reader r = _Reader(data)
        cdef _Decoded d = _Decoded()
        cdef Py_ssize_t nrep, i, j, cnt, nranges, nruns, nops, nk
        cdef uint64_t n, rep, lo, hi, start, hlc, ctr, skip, kctr, krep
        cdef int64_t step
        cdef int h, kind
        cdef int32_t coll, doc, field
        cdef OpRec* op
        cdef RunRec* run
        cdef _Decoded names = d
        if r.byte() != FORMAT_MAGIC:
            raise DecodeError("not a p2pcloud delta")
        if r.byte() != FORMAT_VERSION:
            raise DecodeError("unknown delta version")
        seen = set()
        cnt = r.count()
        for i in range(cnt):
            n = r.varint()
            if not MIN_REPLICA_ID <= n <= MAX_REPLICA_ID:
                raise DecodeError("replica id length out of range")
            rid = r.raw(n)
            if rid in seen:
                raise DecodeError("duplicate replica id")
            seen.add(rid)
            d.reps.append(rid)
        nrep = len(d.reps)
        cnt = r.count()
        for i in range(cnt):
            rep = r.varint()
            if rep >= <uint64_t>nrep:
                raise DecodeError("replica index out of range")
            ranges = []
            hi = 0
            nranges = r.count()
            for j in range(nranges):
                n = r.varint()
                if n > C_MAX_COUNTER:
                    raise DecodeError("counter out of range")
                lo = hi + 1 + n
                n = r.varint()
                if n > C_MAX_COUNTER or lo > C_MAX_COUNTER:
                    raise DecodeError("counter out of range")
                hi = lo + n
                if hi > C_MAX_COUNTER:
                    raise DecodeError("counter out of range")
                ranges.append((lo, hi))
            d.ctx.append((rep, ranges))
        nruns = r.count()
        d.runs = <RunRec*>malloc((nruns if nruns else 1) * sizeof(RunRec))
        if d.runs == NULL:
            raise MemoryError()
        for i in range(nruns):
            rep = r.varint()
            if rep >= <uint64_t>nrep:
                raise DecodeError("replica index out of range")
            start = r.varint()
            hlc = r.varint()
            if start < 1 or start > C_MAX_COUNTER:
                raise DecodeError("run start out of range")
            run = &d.runs[i]
            run.rep = <Py_ssize_t>rep
            run.first = d.nops
            d.nruns = i + 1
            run.end = d.nops
            ctr = start
            coll = -1
            doc = -1
            if hlc > d.max_hlc:
                d.max_hlc = hlc
            nops = r.count()
            d.reserve(d.nops + nops)
            for j in range(nops):
                h = r.byte()
                kind = h & 0x0F
                if kind == OP_ADVANCE:
                    if h != OP_ADVANCE:
                        raise DecodeError("flags on an advance op")
                    skip = r.varint()
                    step = unzigzag(r.varint())
                    if skip > C_MAX_COUNTER or ctr + skip > C_MAX_COUNTER:
                        raise DecodeError("advance out of range")
                    ctr += skip
                    if (step < 0 and <uint64_t>(-(step + 1)) >= hlc) or \
                       (step > 0 and <uint64_t>step > 0xFFFFFFFFFFFFFFFF - hlc):
                        raise DecodeError("advance out of range")
                    if step >= 0:
                        hlc += <uint64_t>step
                    else:
                        hlc -= <uint64_t>(-(step + 1)) + 1
                    if hlc > d.max_hlc:
                        d.max_hlc = hlc
                    continue
                if not OP_LWW <= kind <= OP_SET_REMOVE:
                    raise DecodeError(f"bad op header {h:#x}")
                if h & FLAG_TICK:
                    if hlc == 0xFFFFFFFFFFFFFFFF:
                        raise DecodeError("HLC out of range")
                    hlc += 1
                    if hlc > d.max_hlc:
                        d.max_hlc = hlc
                if h & FLAG_NEW_COLL:
                    coll = _read_name(r, names)
                    doc = -1
                if h & FLAG_NEW_DOC:
                    if kind == OP_APPEND:
                        raise DecodeError("a log append has no document")
                    doc = _read_name(r, names)
                if coll < 0 or (doc < 0 and kind != OP_APPEND):
                    raise DecodeError("op without a collection or document")
                field = -1
                if kind != OP_APPEND and kind != OP_REMOVE_DOC:
                    field = _read_name(r, names)
                payload = None
                if kind == OP_LWW or kind == OP_MV or kind == OP_APPEND:
                    payload = r.value(0)
                elif kind == OP_SET_ADD or kind == OP_SET_REMOVE:
                    payload = r.value(0)
                    if isinstance(payload, (list, dict)):
                        raise DecodeError("set elements are scalars")
                elif kind == OP_COUNTER:
                    payload = (r.varint(), r.varint())
                elif kind == OP_TEXT:
                    payload = r.raw(r.varint())
                    _validate_text(payload)
                op = d.new_op()
                op.kind = <uint8_t>kind
                op.coll = coll
                op.doc = doc
                op.field = field
                op.hlc = hlc
                op.kstart = d.nkills
                op.kcount = 0
                Py_INCREF(payload)
                op.payload = <PyObject*>payload
                if h & FLAG_KILLS:
                    if kind == OP_APPEND:
                        raise DecodeError("a log append kills nothing")
                    nk = r.count()
                    for i2 in range(nk):
                        krep = r.varint()
                        kctr = r.varint()
                        if krep >= <uint64_t>nrep or not 1 <= kctr <= C_MAX_COUNTER:
                            raise DecodeError("bad kill dot")
                        d.add_kill(<Py_ssize_t>krep, kctr)
                    op = &d.ops[d.nops - 1]
                    op.kcount = nk
                if ctr > C_MAX_COUNTER:
                    raise DecodeError("counter out of range")
                op.ctr = ctr
                ctr += 1
                d.runs[i].end = d.nops
        if r.pos != r.end:
            raise DecodeError("trailing bytes after delta")
        if now_ms is not None:  # None: a trusted local snapshot (load)
            self.clock.check(d.max_hlc, now_ms)
        return d

    # -- merging -----------------------------------------------------------------------

    def apply(self, deltas, now_ms):
        """Merge remote deltas, since-deltas or snapshots, in order (see the reference).

        Raises:
            DecodeError: a delta is malformed (``.delta_index`` says which).
            ClockSkewError: a delta's clock is too far ahead (``.delta_index`` says which).
            CoreUsageError: a transaction is open or ``now_ms`` is out of range.
        """
        _check_now(now_ms)
        return self._apply(deltas, now_ms, True)

    cdef list _apply(self, deltas, now_ms, bint report):
        cdef int was = PyGC_Disable()
        try:
            return self._apply_all(deltas, now_ms, report)
        finally:
            if was:
                PyGC_Enable()

    cdef list _apply_all(self, deltas, now_ms, bint report):
        cdef _Decoded d
        if self._txn is not None:
            raise CoreUsageError("commit the open transaction before applying deltas")
        decoded = []
        for i, data in enumerate(deltas):
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise CoreUsageError("deltas are bytes")
            if not data:
                continue
            try:
                decoded.append(self._decode(bytes(data), now_ms))
            except (DecodeError, ClockSkewError) as exc:
                exc.delta_index = i
                raise
        self._flush_own()
        changes = _Changes(self._gen, report)
        self._gen += 1
        for d in decoded:
            self._merge(d, changes)
            if d.max_hlc > self.clock.last:
                self.clock.last = d.max_hlc
        m = self._ctx.max(0) + 1
        if m > self._next:
            self._next = m
        return changes.order

    @classmethod
    def load(cls, snapshot, replica_id, now_ms):
        """Create a replica from a snapshot in one call (``now_ms`` None: a trusted local one).

        Raises:
            DecodeError, ClockSkewError, CoreUsageError: as :meth:`apply`.
        """
        cdef Replica out = cls(replica_id)
        if now_ms is not None:
            _check_now(now_ms)
        out._apply([snapshot], now_ms, False)
        return out

    cdef int _intern(self, bytes rid) except -1:
        cdef PyObject* p = PyDict_GetItem(self._rep_index, rid)
        if p != NULL:
            return <int>(<object>p)
        idx = len(self._reps)
        self._reps.append(rid)
        self._rep_index[rid] = idx
        return idx

    cdef int _merge(self, _Decoded d, _Changes changes) except -1:
        cdef Py_ssize_t i, k, nrep = len(d.reps)
        cdef int* rmap = <int*>malloc((nrep if nrep else 1) * sizeof(int))
        if rmap == NULL:
            raise MemoryError()
        try:
            for i in range(nrep):
                rmap[i] = self._intern(d.reps[i])
            self._merge_inner(d, changes, rmap)
        finally:
            free(rmap)
        return 0

    cdef int _merge_inner(self, _Decoded d, _Changes changes, int* rmap) except -1:
        cdef Py_ssize_t i, k, oi, upto
        cdef RunRec* run
        cdef OpRec* op
        cdef int r, kind
        cdef uint64_t dot, vv_r, plo, phi
        cdef bint cloud_r, fresh, have_piece
        cdef CausalContext ctx = self._ctx
        cdef PyObject* pv
        cdef PyObject* ph
        cdef dict colls = self._colls
        cdef Doc doc_obj = None
        cdef int32_t doc_coll = -1, doc_doc = -1
        cdef Entry e, head
        cdef uint64_t old_gen
        cdef PyObject* hint_dict = NULL
        cdef bint use_hint = True
        cdef Py_ssize_t hint_pos = 0, hp
        cdef PyObject* hk
        cdef PyObject* hv
        # 1. context ranges: drop local entries the sender has seen but does not hold
        hit = set()
        kctx = CausalContext()
        for rep, ranges in d.ctx:
            for lo, hi in ranges:
                kctx.add_range(rmap[rep], lo, hi)
                if ctx.overlaps(rmap[rep], lo, hi):
                    hit.add(rmap[rep])
        if hit:
            rundots = set()
            for i in range(d.nops):
                if is_entry_op(d.ops[i].kind):
                    rundots.add((rmap[self._op_rep(d, i)], d.ops[i].ctr))
            self._kill_covered(kctx, hit, rundots, changes)
        # 2. runs, op by op
        for k in range(d.nruns):
            run = &d.runs[k]
            r = rmap[run.rep]
            pv = PyDict_GetItem(ctx.vv, r)
            vv_r = 0 if pv == NULL else <uint64_t>(<object>pv)
            cloud_r = PyDict_GetItem(ctx.cloud, r) != NULL
            have_piece = False
            plo = phi = 0
            for oi in range(run.first, run.end):
                op = &d.ops[oi]
                kind = op.kind
                dot = op.ctr
                if have_piece and phi + 1 == dot:
                    phi = dot
                else:
                    if have_piece:
                        ctx.add_range(r, plo, phi)
                    plo = phi = dot
                    have_piece = True
                if op.kcount:
                    self._apply_kills(d, op, rmap, changes)
                    pv = PyDict_GetItem(ctx.vv, r)
                    vv_r = 0 if pv == NULL else <uint64_t>(<object>pv)
                    cloud_r = PyDict_GetItem(ctx.cloud, r) != NULL
                    doc_obj = None
                if not is_entry_op(kind):
                    continue
                if dot <= vv_r:
                    fresh = False
                elif not cloud_r:
                    fresh = True
                else:
                    fresh = not ctx.contains(r, dot)
                if kind == OP_TEXT:
                    coll_s = d.name(op.coll)
                    key = (coll_s, d.name(op.doc), d.name(op.field))
                    text = self._texts.get(key)
                    if text is None:
                        text = self._texts[key] = _text_class()(self.replica_id)
                    payload = <object>op.payload
                    if payload and _text_apply(text, payload):
                        changes.touch(key[0], key[1], key[2], self._field_head(key[0], key[1], key[2]))
                if not fresh:
                    continue
                if kind == OP_APPEND:
                    coll_s = d.name(op.coll)
                    es = self._logs.get(coll_s)
                    if es is None:
                        es = self._logs[coll_s] = []
                    es.append(new_entry(kind, r, dot, op.hlc, <object>op.payload))
                    changes.touch(coll_s, None, None, None)
                    continue
                if doc_obj is None or op.coll != doc_coll or op.doc != doc_doc:
                    doc_obj = self._doc_for_write(d.name(op.coll), d.name(op.doc))
                    doc_coll = op.coll
                    doc_doc = op.doc
                    # a document that was empty here gets new fields: no order to follow
                    use_hint = len(doc_obj.fields) != 0
                    if not use_hint:
                        # a new document: presize its dict for the ops of this run that go to it
                        upto = oi + 1
                        while upto < run.end and d.ops[upto].coll == doc_coll and \
                                d.ops[upto].doc == doc_doc:
                            upto += 1
                        if upto - oi >= PRESIZE_MIN:
                            doc_obj.fields = _PyDict_NewPresized(upto - oi)
                e = new_entry(kind, r, dot, op.hlc, <object>op.payload)
                e.gen = changes.gen
                # the order hint: a delta often lists a document's fields in the order the
                # document got them (a replica writing the same keys, a since-delta): try the
                # dict's next entry first, verified by comparing the names, before a hash probe
                # into a big table. A stale position (the dict changed) just misses.
                ph = NULL
                if hint_dict is not <PyObject*>doc_obj.fields:
                    hint_dict = <PyObject*>doc_obj.fields
                    hint_pos = 0
                hp = hint_pos
                if use_hint and PyDict_Next(doc_obj.fields, &hp, &hk, &hv) and \
                        d.name_is(op.field, <object>hk):
                    ph = hv
                    hint_pos = hp
                    field_s = <object>hk
                else:
                    field_s = d.name(op.field)
                if ph == NULL:
                    ph = PyDict_SetDefault(doc_obj.fields, field_s, e)
                if ph != <PyObject*>e:
                    # the field has a chain: the new entry goes in front. Rather than a second
                    # dict store, the head object takes the new entry's contents and the new
                    # object, linked second, takes the old head's (entries have no identity
                    # anyone keeps: one dict probe per op instead of two)
                    head = <Entry>ph
                    old_gen = head.gen
                    _swap_into_head(head, e)
                    changes.inserted(doc_obj, field_s, True, old_gen)
                else:
                    changes.inserted(doc_obj, field_s, False, 0)
            if have_piece:
                ctx.add_range(r, plo, phi)
        # 3. the context ranges join the local context
        for rep, ranges in d.ctx:
            for lo, hi in ranges:
                ctx.add_range(rmap[rep], lo, hi)
        return 0

    cdef Py_ssize_t _op_rep(self, _Decoded d, Py_ssize_t oi):
        cdef Py_ssize_t k
        for k in range(d.nruns):
            if d.runs[k].first <= oi < d.runs[k].end:
                return d.runs[k].rep
        return 0

    cdef int _apply_kills(self, _Decoded d, OpRec* op, int* rmap, _Changes changes) except -1:
        cdef Py_ssize_t i
        cdef Entry e
        dots = []
        for i in range(op.kstart, op.kstart + op.kcount):
            dots.append((rmap[d.kills[i].rep], d.kills[i].ctr))
        coll = d.name(op.coll)
        doc = d.name(op.doc) if op.doc >= 0 else None
        field = d.name(op.field) if op.field >= 0 else None
        for rep, ctr in dots:
            self._ctx.add_range(rep, ctr, ctr)
        docs = self._colls.get(coll)
        dd = docs.get(doc) if docs is not None and doc is not None else None
        if dd is None:
            return 0
        dead = set(dots)
        fields = (<Doc>dd).fields
        for f in [field] if field is not None else list(fields):
            head = fields.get(f)
            if head is None:
                continue
            es = _chain_list(head)
            keep = [e for e in es if (e.rep, e.ctr) not in dead]
            if len(keep) != len(es):
                changes.touch(coll, doc, f, head)
                _relink(dd, f, keep)
        if not fields:
            del self._colls[coll][(<Doc>dd).id]
            if not self._colls[coll]:
                del self._colls[coll]
        return 0

    cdef _kill_covered(self, CausalContext kctx, set hit, set rundots, _Changes changes):
        cdef Entry e
        for coll in list(self._colls):
            docs = self._colls[coll]
            for doc_id in list(docs):
                d = <Doc>docs[doc_id]
                for f in list(d.fields):
                    es = _chain_list(d.fields[f])
                    keep = [e for e in es if not (e.rep in hit and kctx.contains(e.rep, e.ctr)
                                                  and (e.rep, e.ctr) not in rundots)]
                    if len(keep) != len(es):
                        changes.touch(coll, doc_id, f, d.fields[f])
                        _relink(d, f, keep)
                if not d.fields:
                    del docs[doc_id]
            if not docs:
                del self._colls[coll]
        for name in list(self._logs):
            es = self._logs[name]
            keep = [e for e in es if not (e.rep in hit and kctx.contains(e.rep, e.ctr)
                                          and (e.rep, e.ctr) not in rundots)]
            if len(keep) != len(es):
                changes.touch(name, None, None, None)
                if keep:
                    self._logs[name] = keep
                else:
                    del self._logs[name]

    # -- encoding ----------------------------------------------------------------------

    def encode_snapshot(self):
        """Encode the whole state: the delta an empty replica lacks (canonical)."""
        return self.encode_since({})

    def encode_since(self, version):
        """Extract the delta that the holder of ``version`` lacks (see the reference)."""
        cdef _LiveArray live = _LiveArray()
        cdef Py_ssize_t nrep, i, j, a, b, rk, nops
        cdef Entry e, head
        cdef Doc d
        cdef LiveRec* rec
        cdef uint64_t lo, hi, cur, ctr, hlc, since
        cdef _Buf out, ops
        cdef _Names names
        cdef int kind, h
        cdef PyObject* cur_coll
        cdef PyObject* cur_doc
        cdef Py_ssize_t* rank
        cdef Py_ssize_t* selidx = NULL
        cdef Py_ssize_t nsel
        if self._txn is not None:
            raise CoreUsageError("commit the open transaction before encoding")
        self._flush_own()
        vv = {self._rep_index[k]: v for k, v in version.items() if k in self._rep_index}
        nrep = len(self._reps)
        # rank of each replica index in replica-id order
        order = sorted(range(nrep), key=lambda k: self._reps[k])
        rank = <Py_ssize_t*>malloc(nrep * sizeof(Py_ssize_t))
        if rank == NULL:
            raise MemoryError()
        try:
            for i in range(nrep):
                rank[<Py_ssize_t>order[i]] = i
            for coll, docs in self._colls.items():
                for doc_id, dobj in (<dict>docs).items():
                    d = <Doc>dobj
                    for f, hobj in d.fields.items():
                        e = <Entry>hobj
                        while e is not None:
                            live.push(e, rank[e.rep], coll, doc_id, f)
                            e = e.next
            for name, es in self._logs.items():
                for eobj in <list>es:
                    e = <Entry>eobj
                    live.push(e, rank[e.rep], name, None, None)
        finally:
            free(rank)
        # sort by (replica id, counter): bucket by replica, then sort a bucket only if its
        # counters are out of order (fields are visited in insertion order, so rarely)
        _bucket_sort(live, nrep)
        # per replica (in id order): the slice of live records, dead ranges, what to send
        ctx_keys = self._ctx.keyset()
        used = []
        dead = {}
        send_from = {}
        a = 0
        for rk in range(nrep):
            k = order[rk]
            b = a
            while b < live.n and live.recs[b].rank == rk:
                b += 1
            if k not in ctx_keys and a == b:
                continue
            out_ranges = []
            j = a
            for lo_o, hi_o in self._ctx.ranges(k):
                lo = lo_o
                hi = hi_o
                cur = lo
                while j < b and live.recs[j].ctr < lo:
                    j += 1
                while j < b and live.recs[j].ctr <= hi:
                    if live.recs[j].ctr > cur:
                        out_ranges.append((cur, live.recs[j].ctr - 1))
                    cur = live.recs[j].ctr + 1
                    j += 1
                if cur <= hi:
                    out_ranges.append((cur, hi))
            sv = vv.get(k, 0)
            since = 0 if sv < 0 else (sv if sv <= MAX_COUNTER else MAX_COUNTER)
            j = a
            while j < b and live.recs[j].ctr <= since:
                j += 1
            if out_ranges:
                dead[k] = out_ranges
            # live text entries always go (see the reference); the selection is the list of
            # those below ``since`` plus the slice j..b
            if self._texts:
                sel = [i for i in range(a, j) if (<Entry>live.recs[i].entry).kind == OP_TEXT]
            else:
                sel = []
            if sel or j < b:
                send_from[k] = (sel, j, b)
            if out_ranges or k in send_from:
                used.append(k)
            a = b
        out = _Buf()
        out.byte(FORMAT_MAGIC)
        out.byte(FORMAT_VERSION)
        out.varint(len(used))
        table = {}
        for i, k in enumerate(used):
            table[k] = i
            rid = self._reps[k]
            out.varint(len(<bytes>rid))
            out.raw(<const unsigned char*>PyBytes_AS_STRING(rid), len(<bytes>rid))
        out.varint(len(dead))
        for k in used:
            if k not in dead:
                continue
            out.varint(table[k])
            out.varint(len(dead[k]))
            cur = 0
            for lo_o, hi_o in dead[k]:
                lo = lo_o
                hi = hi_o
                out.varint(lo - cur - 1)
                out.varint(hi - lo)
                cur = hi
        out.varint(len(send_from))
        names = _Names()
        names._rehash(_pow2_above((4 * live.n) // 3 + 16))  # each name at most once: no regrowth
        texts_sent = set()
        ops = _Buf()
        for k in used:
            if k not in send_from:
                continue
            sel, sj, sb = send_from[k]
            nsel = len(sel) + (<Py_ssize_t>sb - <Py_ssize_t>sj)
            selidx = <Py_ssize_t*>_grow(selidx, (nsel if nsel else 1) * sizeof(Py_ssize_t))
            i = 0
            for jo in sel:
                selidx[i] = jo
                i += 1
            for j in range(<Py_ssize_t>sj, <Py_ssize_t>sb):
                selidx[i] = j
                i += 1
            e = <Entry>live.recs[selidx[0]].entry
            out.varint(table[k])
            out.varint(e.ctr)
            out.varint(e.hlc)
            ops.n = 0
            nops = 0
            ctr = e.ctr
            hlc = e.hlc
            cur_coll = NULL
            cur_doc = NULL
            for i in range(nsel):
                rec = &live.recs[selidx[i]]
                e = <Entry>rec.entry
                h = e.kind
                if e.ctr == ctr and e.hlc == hlc + 1:
                    h |= FLAG_TICK
                    hlc += 1
                elif e.ctr != ctr or e.hlc != hlc:
                    ops.byte(OP_ADVANCE)
                    ops.varint(e.ctr - ctr)
                    ops.varint(zigzag(<int64_t>(e.hlc - hlc)))
                    nops += 1
                    ctr = e.ctr
                    hlc = e.hlc
                new_coll = cur_coll == NULL or (
                    rec.coll != cur_coll and <str>rec.coll != <str>cur_coll)
                new_doc = rec.doc != NULL and (new_coll or (
                    rec.doc != cur_doc and (cur_doc == NULL or <str>rec.doc != <str>cur_doc)))
                if new_coll:
                    h |= FLAG_NEW_COLL
                if new_doc:
                    h |= FLAG_NEW_DOC
                ops.byte(h)
                if new_coll:
                    names.put(ops, <str>rec.coll)
                    cur_coll = rec.coll
                    cur_doc = NULL
                if new_doc:
                    names.put(ops, <str>rec.doc)
                    cur_doc = rec.doc
                if rec.field != NULL:
                    names.put(ops, <str>rec.field)
                kind = e.kind
                if kind == OP_COUNTER:
                    ops.varint(PyLong_AsUnsignedLongLong(e.value[0]))
                    ops.varint(PyLong_AsUnsignedLongLong(e.value[1]))
                elif kind == OP_TEXT:
                    key = (<str>rec.coll, <str>rec.doc, <str>rec.field)
                    text = self._texts.get(key)
                    state = b""
                    if text is not None and key not in texts_sent:
                        state = text.encode_since({})
                        texts_sent.add(key)
                    ops.varint(len(state))
                    ops.raw(<const unsigned char*>PyBytes_AS_STRING(state), len(state))
                else:
                    put_value(ops, e.value, 0)
                nops += 1
                ctr += 1
            out.varint(<uint64_t>nops)
            out.append_buf(ops)
        free(selidx)
        return out.tobytes()
