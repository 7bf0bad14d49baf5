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
* a document's fields are not a dict of entry objects but a C table (``Doc``): slots in
  insertion order (name bytes, hash, chain head), an open-addressing index of slot numbers
  whose cells carry 32 bits of the hash, and an entry pool of C structs (dot, HLC, kind,
  value) linked into one chain per field. It behaves like the reference's dict: insertion
  order, a removed field that comes back goes last, a changed chain keeps its place. Names
  are hashed with CPython's own keyed hash of the UTF-8 bytes (``_Py_HashBytes``), which for
  an ASCII str is its cached ``hash()``, so peers cannot aim names at one bucket;
* a register's int value decoded from a delta stays unboxed in its entry until read;
* the merge tries a document's next slot before a hash probe (the "order hint": deltas and
  since-deltas usually list a document's fields in the order the document got them) and
  compares the name as bytes; a new entry goes in front of its field's chain;
* ``set_many`` into a document that was empty knows every key is new (a dict's keys are
  distinct), writes simple pairs inline and leaves them out of the index until the next
  lookup, which indexes them in one prefetching pass;
* snapshots and since-deltas gather the live entries into a C array of ``LiveRec`` and sort it
  by (replica, counter) in C, walk the selection in C and number names in a C hash table; a
  replica with no dead dots contributes only the entries the peer lacks;
* the garbage collector is paused during bulk calls (apply, load, set_many): they allocate
  millions of objects, none of them in a cycle, and a collection would walk them all;
* the own replica's dots of an open transaction join the causal context in one range when the
  context is next read (the reference adds them one by one; nothing can observe the
  difference).

Shared pure-Python pieces (BlobRef, the clock, the version-vector codec, the constants) are
imported from the reference, so values and errors are the very same objects.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.bytes cimport PyBytes_CheckExact
from cpython.dict cimport PyDict_GetItem, PyDict_Next, PyDict_Size
from cpython.float cimport PyFloat_CheckExact
from cpython.long cimport PyLong_CheckExact
from cpython.long cimport (
    PyLong_AsLongLongAndOverflow,
    PyLong_AsUnsignedLongLong,
    PyLong_FromLongLong,
)
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_CheckExact, PyUnicode_DecodeUTF8
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, qsort, realloc
from libc.string cimport memcmp, memcpy

cimport cython


cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void* op)
    # the collector is paused during bulk calls (see _gc_pause): they allocate millions of
    # objects none of which can form a cycle, and each collection would walk the big lists
    int PyGC_Enable()
    bint PyUnicode_IS_COMPACT_ASCII(object o)
    void* PyUnicode_DATA(object o)
    str PyUnicode_New(Py_ssize_t size, unsigned int maxchar)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    int PyGC_Disable()
    # CPython's hash of a byte string (siphash13 with the interpreter's random key): the
    # field tables hash UTF-8 names with it, so a peer cannot aim names at one bucket, and
    # an ASCII str's cached hash is the same number
    Py_hash_t _Py_HashBytes(const void* p, Py_ssize_t n)

DEF PRESIZE_MIN = 64  # below this, growing a table costs less than thinking about it

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


cdef inline void _copy(unsigned char* dst, const unsigned char* src, Py_ssize_t n) noexcept:
    # names and small values are a few bytes: a loop beats a call into memcpy for those
    cdef Py_ssize_t i
    if n <= 16:
        for i in range(n):
            dst[i] = src[i]
    else:
        memcpy(dst, src, n)


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
        _copy(self.data + self.n, p, k)
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
        # most varints are one byte: no loop for those
        if self.pos < self.end and self.p[self.pos] < 0x80:
            self.pos += 1
            return self.p[self.pos - 1]
        return self.varint_long()

    cdef uint64_t varint_long(self) except? 0xFFFFFFFFFFFFFFFF:
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
            if u < C_MAX_COUNTER:  # -1 - u fits a long long
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

    cdef int touch(self, object coll, object doc, object field, bint had_head,
                   uint64_t head_gen) except -1:
        """A kill, text or log touch of a place whose field head has generation ``head_gen``
        (``had_head`` false: the field is empty or it is a log)."""
        if not self.on:
            return 0
        key = (coll, doc, field)
        if key in self.rare:
            return 0
        if not had_head or head_gen != self.gen:
            self.order.append(key)
        self.rare.add(key)
        return 0

    cdef inline int inserted(self, Doc d, Py_ssize_t slot, bint had_head,
                             uint64_t old_gen) except -1:
        """An insertion in front of a head of generation ``old_gen`` (``had_head`` false: the
        field was empty)."""
        if not self.on:
            return 0
        if had_head and old_gen == self.gen:
            return 0
        key = (d.coll, d.id, d.slot_name(slot))
        if self.rare and key in self.rare:
            return 0
        # a tuple of strings cannot be part of a cycle: keep the collector off it, so a
        # million-entry report does not make every collection walk it
        PyObject_GC_UnTrack(<void*>key)
        self.order.append(key)
        return 0


# A document's fields live in a C table, not in a dict of objects (see Doc). Entries are C
# structs in a per-document pool, linked into one chain per field by index.

ctypedef struct ERec:
    uint64_t ctr
    uint64_t hlc
    uint64_t gen        # the apply() call that inserted it, or NIDX_FLAG | name number
    PyObject* value     # an owned reference (None for ops without a value); NULL: ``imm``
    int64_t imm         # a register's int value, kept unboxed until read (value NULL)
    int32_t rep
    int32_t next        # the next entry of the chain (-1: the end); in the free list: next free
    int32_t kind

ctypedef struct FSlot:
    Py_hash_t hash      # _Py_HashBytes of the UTF-8 name (= hash(str) of an ASCII name)
    PyObject* name      # an owned str of the name, or NULL until one is needed
    Py_ssize_t off      # the UTF-8 name: ``len`` bytes at ``off`` in the document's arena
    int32_t len
    int32_t head        # the first entry of the chain; -1: the field was removed

DEF IX_EMPTY = -1
DEF IX_DUMMY = -2
# an index cell holds the slot number in its low 32 bits and the high 32 bits of the name's
# hash above them, so a probe that meets another name rarely has to read its slot
cdef extern from *:
    """
    #define P2PCLOUD_CELL_EMPTY 0xFFFFFFFFFFFFFFFFULL
    #define P2PCLOUD_CELL_DUMMY 0xFFFFFFFFFFFFFFFEULL
    #define P2PCLOUD_TAG_MASK 0xFFFFFFFF00000000ULL
    """
    const uint64_t CELL_EMPTY "P2PCLOUD_CELL_EMPTY"
    const uint64_t CELL_DUMMY "P2PCLOUD_CELL_DUMMY"
    const uint64_t TAG_MASK "P2PCLOUD_TAG_MASK"


cdef inline int32_t _cell_slot(uint64_t c) noexcept:
    return <int32_t>(<uint32_t>c)


cdef inline uint64_t _cell(Py_hash_t h, Py_ssize_t s) noexcept:
    return ((<uint64_t>h) & TAG_MASK) | <uint64_t>(<uint32_t>s)
# a document's slot and entry numbers are int32: 2^31 - 1 of each (far beyond any memory
# this process could hold: an entry is 40 bytes) keeps the tables half the size of 64-bit ones
DEF MAX_DOC_ITEMS = 0x7FFFFFF0
DEF PREFETCH_AHEAD = 8  # slots; about the cache misses a core keeps in flight


cdef extern from *:
    void __builtin_prefetch(const void* p) noexcept nogil


cdef inline Py_hash_t _str_hash(object s, const char* p, Py_ssize_t n) except? -1:
    # the table's hash of a str whose UTF-8 is p[:n]: an ASCII str's own (cached) hash is the
    # hash of those very bytes (not a subclass's: it may define its own __hash__)
    if PyUnicode_CheckExact(s) and PyUnicode_IS_COMPACT_ASCII(s):
        return hash(s)
    return _Py_HashBytes(p, n)


@cython.final
@cython.no_gc
cdef class Doc:
    """A document: an insertion-ordered hash table of fields, each a chain of entries.

    Like a dict (the reference's ``fields``) it keeps insertion order, a removed field that
    comes back goes last, and a field whose chain changes keeps its place; iteration order
    is observable (change reports, a removal's kill list), so it must match the dict's. The
    table is CPython's dict layout in C: ``slots`` in insertion order (removed ones marked
    ``head == -1`` until the next rebuild), an open-addressing ``index`` of slot numbers,
    names as UTF-8 bytes in ``arena``. Entries sit in the ``ents`` pool with a free list.
    Not tracked by the garbage collector: it refers only to strs and stored values.
    """
    cdef public str coll
    cdef public str id
    cdef FSlot* slots
    cdef Py_ssize_t nslots   # used slots, removed ones included
    cdef Py_ssize_t slots_cap
    cdef Py_ssize_t nlive    # fields with a chain
    cdef uint64_t* index     # cells: the hash's high 32 bits << 32 | slot (see _cell)
    cdef Py_ssize_t icap     # a power of two, kept at most two thirds full (dummies count)
    cdef Py_ssize_t ifill    # index cells in use, dummies included
    cdef Py_ssize_t nindexed  # slots below this are in the index; the rest wait (all live)
    cdef uint64_t mods       # counts added and removed fields (bulk writes check it)
    cdef ERec* ents
    cdef Py_ssize_t nents
    cdef Py_ssize_t ents_cap
    cdef int32_t free_ent
    cdef unsigned char* arena
    cdef Py_ssize_t arena_n
    cdef Py_ssize_t arena_cap

    def __cinit__(self, str coll, str doc_id):
        self.coll = coll
        self.id = doc_id
        self.slots = NULL
        self.nslots = self.slots_cap = self.nlive = 0
        self.index = NULL
        self.icap = self.ifill = self.nindexed = 0
        self.mods = 0
        self.ents = NULL
        self.nents = self.ents_cap = 0
        self.free_ent = -1
        self.arena = NULL
        self.arena_n = self.arena_cap = 0

    def __dealloc__(self):
        cdef Py_ssize_t i
        cdef int32_t e
        for i in range(self.nslots):
            Py_XDECREF(self.slots[i].name)
            e = self.slots[i].head
            while e >= 0:
                Py_XDECREF(self.ents[e].value)
                e = self.ents[e].next
        free(self.slots)
        free(self.index)
        free(self.ents)
        free(self.arena)

    @property
    def fields(self):
        """The live fields as ``{name: None}`` in table order (for tests and debugging)."""
        return {self.slot_name(i): None for i in range(self.nslots) if self.slots[i].head >= 0}

    # -- entries ------------------------------------------------------------------------

    cdef int32_t new_ent(self, int kind, int rep, uint64_t ctr, uint64_t hlc,
                         object value) except -1:
        cdef int32_t i
        cdef Py_ssize_t cap
        cdef ERec* e
        if self.free_ent >= 0:
            i = self.free_ent
            self.free_ent = self.ents[i].next
        else:
            if self.nents >= self.ents_cap:
                # small first: most documents hold a handful of fields, and bulk writes
                # and loads size the arrays exactly (reserve)
                cap = 1 if self.ents_cap == 0 else self.ents_cap * 2
                if cap > MAX_DOC_ITEMS:
                    cap = MAX_DOC_ITEMS
                    if self.nents >= cap:
                        raise MemoryError("too many entries in one document")
                self.ents = <ERec*>_grow(self.ents, cap * sizeof(ERec))
                self.ents_cap = cap
            i = <int32_t>self.nents
            self.nents += 1
        e = &self.ents[i]
        e.kind = kind
        e.rep = rep
        e.ctr = ctr
        e.hlc = hlc
        e.gen = 0
        e.next = -1
        Py_INCREF(value)
        e.value = <PyObject*>value
        return i

    cdef int32_t new_ent_imm(self, int kind, int rep, uint64_t ctr, uint64_t hlc,
                             int64_t imm) except -1:
        # an entry whose value is an int held unboxed (decoded registers: no int object)
        cdef int32_t i = self.new_ent(kind, rep, ctr, hlc, None)
        Py_XDECREF(self.ents[i].value)
        self.ents[i].value = NULL
        self.ents[i].imm = imm
        return i

    cdef void free_one(self, int32_t i) noexcept:
        cdef PyObject* v = self.ents[i].value
        self.ents[i].value = NULL
        self.ents[i].next = self.free_ent
        self.free_ent = i
        Py_XDECREF(v)

    cdef int reserve_ents(self, Py_ssize_t n) except -1:
        # room for n more entries in the pool
        cdef Py_ssize_t cap
        if self.nents + n > self.ents_cap:
            cap = self.nents + n
            if cap < 2 * self.ents_cap:
                cap = 2 * self.ents_cap
            if cap > MAX_DOC_ITEMS:
                raise MemoryError("too many entries in one document")
            self.ents = <ERec*>_grow(self.ents, cap * sizeof(ERec))
            self.ents_cap = cap
        return 0

    cdef int reserve(self, Py_ssize_t n) except -1:
        # room for n more fields with one entry each: no regrowth during a bulk insert
        cdef Py_ssize_t cap, need = self.nslots + n
        if need > MAX_DOC_ITEMS:
            raise MemoryError("too many fields in one document")
        if need > self.slots_cap:
            self.slots = <FSlot*>_grow(self.slots, need * sizeof(FSlot))
            self.slots_cap = need
        if self.nents + n > self.ents_cap:
            self.ents = <ERec*>_grow(self.ents, (self.nents + n) * sizeof(ERec))
            self.ents_cap = self.nents + n
        if (self.ifill + self.nslots - self.nindexed + n) * 3 >= self.icap * 2:
            self.rebuild(self.nlive + n)
        return 0

    # -- the field table ----------------------------------------------------------------

    cdef int index_pending(self) except -1:
        # index the slots a bulk insert appended. One tight loop that prefetches the cell of
        # the slot PREFETCH_AHEAD places on: the index is bigger than the caches, and a probe
        # per write stalls on one cache miss at a time, where this overlaps them
        cdef Py_ssize_t i, k, pend = self.nslots - self.nindexed
        cdef size_t mask, j, perturb
        cdef Py_hash_t h
        if pend == 0:
            return 0
        if (self.ifill + pend) * 3 >= self.icap * 2:
            return self.rebuild(self.nlive + self.nlive // 2 + 8)
        mask = <size_t>(self.icap - 1)
        for i in range(self.nindexed, self.nslots):
            k = i + PREFETCH_AHEAD
            if k < self.nslots:
                __builtin_prefetch(&self.index[<size_t>self.slots[k].hash & mask])
            h = self.slots[i].hash
            perturb = <size_t>h
            j = perturb & mask
            while _cell_slot(self.index[j]) >= 0:
                perturb >>= 5
                j = (j * 5 + perturb + 1) & mask
            if self.index[j] == CELL_EMPTY:
                self.ifill += 1
            self.index[j] = _cell(h, i)
        self.nindexed = self.nslots
        return 0

    cdef Py_ssize_t find(self, const char* p, Py_ssize_t n, Py_hash_t h) except -2:
        """The live slot of the name p[:n] (hash h), or -1."""
        cdef size_t mask, j, perturb
        cdef int32_t s
        cdef uint64_t c, tag = (<uint64_t>h) & TAG_MASK
        cdef FSlot* f
        if self.nindexed != self.nslots:
            self.index_pending()
        if self.icap == 0:
            return -1
        mask = <size_t>(self.icap - 1)
        perturb = <size_t>h
        j = <size_t>h & mask
        while True:
            c = self.index[j]
            s = _cell_slot(c)
            if s == IX_EMPTY:
                return -1
            if s >= 0 and (c & TAG_MASK) == tag:
                f = &self.slots[s]
                if f.hash == h and f.len == n and memcmp(self.arena + f.off, p, n) == 0:
                    return s
            perturb >>= 5
            j = (j * 5 + perturb + 1) & mask

    cdef Py_ssize_t find_str(self, object name) except -2:
        """The live slot of a field named by a str (-1: none, or not a valid name)."""
        cdef Py_ssize_t n
        cdef const char* p
        if not isinstance(name, str):
            hash(name)  # an unhashable key fails as a dict lookup would
            return -1
        try:
            p = PyUnicode_AsUTF8AndSize(name, &n)
        except UnicodeEncodeError:
            return -1
        return self.find(p, n, _str_hash(name, p, n))

    cdef int rebuild(self, Py_ssize_t want) except -1:
        # drop removed slots (keeping the order of the others), compact the arena, and make
        # an index with room for ``want`` fields
        cdef Py_ssize_t i, k = 0, cap = 8, total = 0
        cdef size_t mask, j, perturb
        cdef unsigned char* na
        cdef uint64_t* ni
        if want < self.nlive:
            want = self.nlive
        while cap * 2 <= want * 3:
            cap *= 2
        if self.nlive != self.nslots:
            for i in range(self.nslots):
                if self.slots[i].head >= 0:
                    total += self.slots[i].len
            na = <unsigned char*>malloc(total if total else 1)
            if na == NULL:
                raise MemoryError()
            for i in range(self.nslots):
                if self.slots[i].head >= 0:
                    self.slots[k] = self.slots[i]
                    k += 1
            # copy the names in slot order into the new arena
            total = 0
            for i in range(k):
                memcpy(na + total, self.arena + self.slots[i].off, self.slots[i].len)
                self.slots[i].off = total
                total += self.slots[i].len
            free(self.arena)
            self.arena = na
            self.arena_n = self.arena_cap = total
            self.nslots = k
        ni = <uint64_t*>malloc(cap * sizeof(uint64_t))
        if ni == NULL:
            raise MemoryError()
        for i in range(cap):
            ni[i] = CELL_EMPTY
        mask = <size_t>(cap - 1)
        for i in range(self.nslots):
            perturb = <size_t>self.slots[i].hash
            j = perturb & mask
            while ni[j] != CELL_EMPTY:
                perturb >>= 5
                j = (j * 5 + perturb + 1) & mask
            ni[j] = _cell(self.slots[i].hash, i)
        free(self.index)
        self.index = ni
        self.icap = cap
        self.ifill = self.nslots
        self.nindexed = self.nslots
        return 0

    cdef Py_ssize_t add(self, const char* p, Py_ssize_t n, Py_hash_t h, object name,
                        int32_t head, bint defer=False) except -1:
        """Append a slot for a field that is not in the table; ``name`` is its str or None.

        ``defer``: leave it out of the index until the next lookup (see index_pending).
        """
        cdef Py_ssize_t s, cap
        cdef size_t mask, j, perturb
        cdef FSlot* f
        # rebuild when the index fills up, and when removed slots (fields removed and
        # written again) outnumber the live ones, so neither grows without bound
        if (self.ifill + self.nslots - self.nindexed + 1) * 3 >= self.icap * 2 or \
                self.nslots - self.nlive > self.nlive + 8:
            self.rebuild(2 * self.nlive + 4)
        elif not defer and self.nindexed != self.nslots:
            self.index_pending()
        if self.nslots >= self.slots_cap:
            cap = 1 if self.slots_cap == 0 else self.slots_cap * 2
            if cap > MAX_DOC_ITEMS:
                cap = MAX_DOC_ITEMS
                if self.nslots >= cap:
                    raise MemoryError("too many fields in one document")
            self.slots = <FSlot*>_grow(self.slots, cap * sizeof(FSlot))
            self.slots_cap = cap
        if self.arena_n + n > self.arena_cap:
            cap = 32 if self.arena_cap == 0 else self.arena_cap * 2
            while cap < self.arena_n + n:
                cap *= 2
            self.arena = <unsigned char*>_grow(self.arena, cap)
            self.arena_cap = cap
        _copy(self.arena + self.arena_n, <const unsigned char*>p, n)
        s = self.nslots
        f = &self.slots[s]
        f.hash = h
        f.off = self.arena_n
        f.len = <int32_t>n
        f.head = head
        if name is None:
            f.name = NULL
        else:
            Py_INCREF(name)
            f.name = <PyObject*>name
        self.arena_n += n
        self.nslots = s + 1
        self.nlive += 1
        self.mods += 1
        if defer:
            return s
        self.nindexed = s + 1
        mask = <size_t>(self.icap - 1)
        perturb = <size_t>h
        j = perturb & mask
        while _cell_slot(self.index[j]) >= 0:
            perturb >>= 5
            j = (j * 5 + perturb + 1) & mask
        if self.index[j] == CELL_EMPTY:
            self.ifill += 1
        self.index[j] = _cell(h, s)
        return s

    cdef int remove_slot(self, Py_ssize_t s) except -1:
        """Remove a field whose chain is already empty or freed (its place goes)."""
        cdef size_t mask, j, perturb
        cdef FSlot* f = &self.slots[s]
        if self.nindexed != self.nslots:
            self.index_pending()
        mask = <size_t>(self.icap - 1)
        perturb = <size_t>f.hash
        j = perturb & mask
        while _cell_slot(self.index[j]) != <int32_t>s:
            perturb >>= 5
            j = (j * 5 + perturb + 1) & mask
        self.index[j] = CELL_DUMMY
        self.mods += 1
        f.head = -1
        Py_XDECREF(f.name)
        f.name = NULL
        self.nlive -= 1
        return 0

    cdef str slot_name(self, Py_ssize_t s):
        cdef FSlot* f = &self.slots[s]
        if f.name == NULL:
            # names are validated UTF-8 (local writes encode a str, decoding checks them)
            out = PyUnicode_DecodeUTF8(<const char*>(self.arena + f.off), f.len, NULL)
            Py_INCREF(out)
            f.name = <PyObject*>out
        return <str>f.name

    cdef list chain(self, Py_ssize_t s):
        """The entry numbers of a field's chain, head first."""
        cdef list out = []
        cdef int32_t e = self.slots[s].head
        while e >= 0:
            out.append(e)
            e = self.ents[e].next
        return out

    cdef int relink(self, Py_ssize_t s, list keep) except -1:
        """Make ``keep`` (entry numbers, in order) the field's chain, freeing the others; an
        empty ``keep`` removes the field."""
        cdef int32_t e = self.slots[s].head, nx
        cdef Py_ssize_t i
        cdef set kept = set(keep)
        while e >= 0:
            nx = self.ents[e].next
            if e not in kept:
                self.free_one(e)
            e = nx
        if not keep:
            self.remove_slot(s)
            return 0
        for i in range(len(keep) - 1):
            self.ents[<int32_t>keep[i]].next = <int32_t>keep[i + 1]
        self.ents[<int32_t>keep[len(keep) - 1]].next = -1
        self.slots[s].head = <int32_t>keep[0]
        return 0

    cdef int free_chain(self, int32_t e) except -1:
        cdef int32_t nx
        while e >= 0:
            nx = self.ents[e].next
            self.free_one(e)
            e = nx
        return 0

    cdef int32_t winner(self, list reps, int32_t head) except -2:
        cdef int32_t best = head
        cdef int32_t e = self.ents[head].next
        cdef ERec* b
        cdef ERec* x
        while e >= 0:
            b = &self.ents[best]
            x = &self.ents[e]
            if x.hlc > b.hlc or (x.hlc == b.hlc and (
                    reps[x.rep] > reps[b.rep] or (reps[x.rep] == reps[b.rep]
                                                  and x.ctr > b.ctr))):
                best = e
            e = self.ents[e].next
        return best


cdef list _dots_of(Doc d, list ents):
    # the dots (replica index, counter) of entries of ``d``
    cdef ERec* e
    cdef list out = []
    for k in ents:
        e = &d.ents[<int32_t>k]
        out.append((e.rep, e.ctr))
    return out


cdef inline object _val(Doc d, object k):
    # the value of entry ``k`` of ``d`` (an unboxed int becomes an int object here)
    cdef ERec* e = &d.ents[<int32_t>k]
    if e.value == NULL:
        return PyLong_FromLongLong(e.imm)
    return <object>e.value


cdef inline int _put_imm(_Buf b, int64_t x) except -1:
    # the value encoding of an int (as put_value writes it)
    if 0 <= x < 0x80:
        b.byte(TAG_SMALL | <unsigned char>x)
    elif x >= 0:
        b.byte(TAG_UINT)
        b.varint(<uint64_t>x)
    else:
        b.byte(TAG_NEGINT)
        b.varint(<uint64_t>(-(x + 1)))
    return 0


cdef inline int32_t _new_register(Doc d, int op, uint64_t ctr, uint64_t hlc,
                                 object value) except -1:
    # a local register write's entry: an exact int that fits 64 bits is held unboxed
    cdef long long x
    cdef int overflow = 0
    if PyLong_CheckExact(value):
        x = PyLong_AsLongLongAndOverflow(value, &overflow)
        if not overflow:
            return d.new_ent_imm(op, 0, ctr, hlc, x)
    return d.new_ent(op, 0, ctr, hlc, value)


cdef int _count_live(Doc d, uint64_t* counts) except -1:
    # count the document's entries per replica index
    cdef Py_ssize_t s
    cdef int32_t k
    for s in range(d.nslots):
        k = d.slots[s].head
        while k >= 0:
            counts[d.ents[k].rep] += 1
            k = d.ents[k].next
    return 0


cdef list _chain_from(Doc d, int32_t e):
    # the entry numbers of the chain starting at ``e`` (-1: none)
    cdef list out = []
    while e >= 0:
        out.append(e)
        e = d.ents[e].next
    return out



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


ctypedef struct NCell:
    Py_hash_t hash
    int32_t idx         # the name's number (its bytes: noff[idx] in the store); -1: empty
    int32_t len


@cython.final
cdef class _Names:
    """The names of one delta being written (the reference's _NameTable, same rules).

    Names are UTF-8 bytes. Every name introduced is copied into ``store`` (so callers may
    pass bytes that move or die later); the index from name to number (for ``put``) is an
    open-addressing table in C of store offsets with the name's hash beside each, and the
    last FIELD_CACHE field names introduced (for ``put_field``) sit in a ring.
    """
    cdef NCell* cells
    cdef Py_ssize_t icap  # a power of two, kept at most three quarters full (linear probing)
    cdef Py_ssize_t iused
    cdef Py_ssize_t* noff  # store offset of each indexed name, by number
    cdef Py_ssize_t ncap
    cdef _Buf store
    cdef Py_ssize_t last_off
    cdef Py_ssize_t last_len
    cdef Py_ssize_t count
    # the last FIELD_CACHE field names introduced, in a ring (they are distinct, so the
    # order of the search does not matter): store offsets, lengths, hashes, numbers
    cdef Py_ssize_t recent_off[FIELD_CACHE]
    cdef Py_ssize_t recent_len[FIELD_CACHE]
    cdef Py_ssize_t recent_idx[FIELD_CACHE]
    cdef Py_hash_t recent_hash[FIELD_CACHE]
    cdef Py_ssize_t nrecent
    cdef Py_ssize_t ring

    def __cinit__(self):
        self.cells = NULL
        self.icap = self.iused = 0
        self.noff = NULL
        self.ncap = 0
        self.store = _Buf()
        self.last_off = self.last_len = 0
        self.count = 0
        self.nrecent = 0
        self.ring = 0

    def __dealloc__(self):
        free(self.cells)
        free(self.noff)

    cdef inline Py_ssize_t new(self, _Buf buf, const unsigned char* raw, Py_ssize_t n) except -1:
        cdef Py_ssize_t p = 0, limit, k
        cdef _Buf st = self.store
        cdef const unsigned char* last
        cdef unsigned char* o
        cdef uint64_t v
        if buf.n + n + 20 > buf.cap:  # the suffix and two varints of at most 10 bytes
            buf.grow(n + 20)
        if st.n + n > st.cap:
            st.grow(n)
        last = st.data + self.last_off
        limit = n if n < self.last_len else self.last_len
        while p < limit and raw[p] == last[p]:
            p += 1
        k = n - p
        o = buf.data + buf.n
        v = ((<uint64_t>p) << 1) | 1
        while v > 0x7F:
            o[0] = <unsigned char>((v & 0x7F) | 0x80)
            o += 1
            v >>= 7
        o[0] = <unsigned char>v
        o += 1
        v = <uint64_t>k
        while v > 0x7F:
            o[0] = <unsigned char>((v & 0x7F) | 0x80)
            o += 1
            v >>= 7
        o[0] = <unsigned char>v
        o += 1
        _copy(o, raw + p, k)
        buf.n = (o - buf.data) + k
        self.last_off = st.n
        self.last_len = n
        _copy(st.data + st.n, raw, n)
        st.n += n
        self.count += 1
        return self.count - 1

    cdef int _rehash(self, Py_ssize_t cap) except -1:
        cdef NCell* old = self.cells
        cdef Py_ssize_t ocap = self.icap, i, j
        cdef NCell* c = <NCell*>malloc(cap * sizeof(NCell))
        if c == NULL:
            raise MemoryError()
        for i in range(cap):
            c[i].idx = -1
        for i in range(ocap):
            if old[i].idx >= 0:
                j = <Py_ssize_t>(<size_t>old[i].hash & <size_t>(cap - 1))
                while c[j].idx >= 0:
                    j = (j + 1) & (cap - 1)
                c[j] = old[i]
        free(old)
        self.cells = c
        self.icap = cap
        return 0

    cdef Py_ssize_t put(self, _Buf buf, const unsigned char* p, Py_ssize_t n,
                        Py_hash_t hv) except -1:
        """Refer to a name already in the table, or introduce it and index it."""
        cdef Py_ssize_t j, found, cap
        cdef NCell* c
        if (self.iused + 1) * 4 > self.icap * 3:
            self._rehash(64 if self.icap == 0 else self.icap * 2)
        j = <Py_ssize_t>(<size_t>hv & <size_t>(self.icap - 1))
        while True:
            c = &self.cells[j]
            if c.idx < 0:
                break
            if c.hash == hv and c.len == n and \
                    memcmp(self.store.data + self.noff[c.idx], p, n) == 0:
                buf.varint((<uint64_t>c.idx) << 1)
                return c.idx
            j = (j + 1) & (self.icap - 1)
        found = self.new(buf, p, n)
        if found >= self.ncap:
            cap = 64 if self.ncap == 0 else self.ncap * 2
            while cap <= found:
                cap *= 2
            self.noff = <Py_ssize_t*>_grow(self.noff, cap * sizeof(Py_ssize_t))
            self.ncap = cap
        self.noff[found] = self.last_off
        c = &self.cells[j]
        c.hash = hv
        c.len = <int32_t>n
        c.idx = <int32_t>found
        self.iused += 1
        return found

    cdef Py_ssize_t put_str(self, _Buf buf, str name) except -1:
        cdef Py_ssize_t n
        cdef const char* p = PyUnicode_AsUTF8AndSize(name, &n)
        return self.put(buf, <const unsigned char*>p, n, _str_hash(name, p, n))

    cdef Py_ssize_t put_field(self, _Buf buf, const unsigned char* p, Py_ssize_t n,
                              Py_hash_t hv, Py_ssize_t known) except -1:
        """A transaction's field name: refer to it if ``known`` (>= 0) or in the ring."""
        cdef Py_ssize_t i, k, idx
        if known < 0:
            for i in range(self.nrecent):
                if self.recent_hash[i] == hv and self.recent_len[i] == n and \
                        memcmp(self.store.data + self.recent_off[i], p, n) == 0:
                    known = self.recent_idx[i]
                    break
        if known >= 0:
            buf.varint((<uint64_t>known) << 1)
            return known
        idx = self.new(buf, p, n)
        k = self.ring
        self.recent_off[k] = self.last_off  # replaces the oldest once the ring is full
        self.recent_len[k] = n
        self.recent_idx[k] = idx
        self.recent_hash[k] = hv
        self.ring = (k + 1) % FIELD_CACHE
        if self.nrecent < FIELD_CACHE:
            self.nrecent += 1
        return idx


cdef inline Py_ssize_t _known_name(Doc d, int32_t head, uint64_t txn_start) noexcept:
    # the name number of a field whose head entry this transaction wrote, else -1
    cdef ERec* e
    if head < 0:
        return -1
    e = &d.ents[head]
    if e.rep == 0 and e.ctr >= txn_start and (e.gen & NIDX_FLAG):
        return <Py_ssize_t>(e.gen & ~NIDX_FLAG)
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
    cdef bint fresh_broken  # set_many's document changed under it (see _bulk_fresh)
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
        self.fresh_broken = False
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
    PyObject* payload  # a reference owned by the _Decoded (NULL: the unboxed int ``imm``)
    int64_t imm

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
    cdef Py_hash_t* nhash  # -1: not computed yet
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
        self.nhash = NULL
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
        free(self.nhash)

    cdef int add_name(self, Py_ssize_t pre, const unsigned char* p, Py_ssize_t k) except -1:
        # a new name: the first ``pre`` bytes of the previous name, then ``p[:k]``, built in
        # place at the end of the arena
        cdef Py_ssize_t cap, i, start = self.arena.n, n = pre + k
        cdef bint ascii = self.last_ascii or pre == 0
        cdef unsigned char* q
        cdef unsigned char acc = 0
        if start + n > self.arena.cap:
            self.arena.grow(n)
        q = self.arena.data + start
        if pre:
            # the arena may have moved: copy from the previous name's offset
            _copy(q, self.arena.data + self.noff[self.nnames - 1], pre)
            if not ascii:
                for i in range(pre):
                    acc |= q[i]
        for i in range(k):  # copy the suffix and see whether it is ASCII in one pass
            q[pre + i] = p[i]
            acc |= p[i]
        ascii = acc < 0x80
        self.arena.n = start + n
        self.last_ascii = ascii
        if self.nnames >= self.ncap:
            cap = 64 if self.ncap == 0 else self.ncap * 2
            self.noff = <Py_ssize_t*>_grow(self.noff, cap * sizeof(Py_ssize_t))
            self.nlen = <Py_ssize_t*>_grow(self.nlen, cap * sizeof(Py_ssize_t))
            self.nobj = <PyObject**>_grow(self.nobj, cap * sizeof(PyObject*))
            self.nhash = <Py_hash_t*>_grow(self.nhash, cap * sizeof(Py_hash_t))
            self.ncap = cap
        i = self.nnames
        self.noff[i] = start
        self.nlen[i] = n
        self.nobj[i] = NULL
        self.nhash[i] = -1
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

    cdef inline Py_hash_t name_hash(self, Py_ssize_t i) noexcept:
        cdef Py_hash_t h = self.nhash[i]
        if h == -1:
            h = _Py_HashBytes(self.arena.data + self.noff[i], self.nlen[i])
            self.nhash[i] = h
        return h

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
            self.nhash = <Py_hash_t*>_grow(self.nhash, cap * sizeof(Py_hash_t))
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
    uint64_t hlc
    PyObject* value     # borrowed: the entry's value (NULL: the unboxed int ``imm``)
    int64_t imm
    PyObject* doc       # the Doc of a document entry (NULL for a log record)
    PyObject* coll      # a log record's log name
    int32_t slot        # the document entry's field slot
    int32_t kind


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

    cdef int reserve(self, Py_ssize_t n) except -1:
        cdef LiveRec* p
        if n > self.cap:
            p = <LiveRec*>realloc(self.recs, n * sizeof(LiveRec))
            if p == NULL:
                raise MemoryError()
            self.recs = p
            self.cap = n
        return 0

    cdef inline LiveRec* slot_for(self) except NULL:
        cdef Py_ssize_t cap
        cdef LiveRec* p
        if self.n >= self.cap:
            cap = 1024 if self.cap == 0 else self.cap * 2
            p = <LiveRec*>realloc(self.recs, cap * sizeof(LiveRec))
            if p == NULL:
                raise MemoryError()
            self.recs = p
            self.cap = cap
        self.n += 1
        return &self.recs[self.n - 1]

    cdef int push_log(self, Entry e, Py_ssize_t rank, object name) except -1:
        cdef LiveRec* p = self.slot_for()
        p.ctr = e.ctr
        p.rank = rank
        p.hlc = e.hlc
        p.value = <PyObject*>e.value
        p.doc = NULL
        p.coll = <PyObject*>name
        p.slot = -1
        p.kind = e.kind
        return 0

    cdef int push_doc(self, Doc d, Py_ssize_t* rank, uint64_t* above) except -1:
        # the entries of a document, field by field, whose counter is above ``above`` of
        # their replica, and every text entry
        cdef Py_ssize_t s, cap
        cdef int32_t k
        cdef ERec* e
        cdef LiveRec* p
        for s in range(d.nslots):
            k = d.slots[s].head
            while k >= 0:
                e = &d.ents[k]
                if e.ctr <= above[e.rep] and e.kind != OP_TEXT:
                    k = e.next
                    continue
                if self.n >= self.cap:
                    self.slot_for()
                    self.n -= 1
                p = &self.recs[self.n]
                self.n += 1
                p.ctr = e.ctr
                p.rank = rank[e.rep]
                p.hlc = e.hlc
                p.value = e.value
                p.imm = e.imm
                p.doc = <PyObject*>d
                p.coll = NULL
                p.slot = <int32_t>s
                p.kind = e.kind
                k = e.next
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
            t.names.put_str(t.buf, coll)
            t.coll = coll
            t.doc = None
        if new_doc:
            t.names.put_str(t.buf, doc)
            t.doc = doc
        t.nops += 1
        return 0

    cdef int _put_kills(self, _TxnWriter t, list dots) except -1:
        # ``dots``: (replica index, counter) pairs (see _dots_of)
        cdef PyObject* pi
        t.buf.varint(len(dots))
        for rep, ctr in dots:
            pi = PyDict_GetItem(t.rep_map, rep)
            if pi == NULL:
                idx = len(t.reps)
                t.rep_map[rep] = idx
                t.reps.append(self._reps[rep])
            else:
                idx = <object>pi
            t.buf.varint(idx)
            t.buf.varint(<uint64_t>ctr)
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

    cdef int _drop_doc_if_empty(self, Doc d) except -1:
        cdef dict docs
        if d.nlive:
            return 0
        docs = <dict>self._colls[d.coll]
        del docs[d.id]
        if not docs:
            del self._colls[d.coll]
        if self._txn is not None:
            self._txn.cache_d = None
        return 0

    cdef int _set1(self, _TxnWriter t, object coll, object doc, object field, object value,
                   int op, Doc fresh=None) except -1:
        """set / set_mv: write a register value, killing every entry seen at the field.

        ``fresh``: the caller knows the field is not in this document (set_many into a
        document that was empty: a dict's keys are distinct), so no lookup is needed.
        """
        cdef _Buf s = self._scratch
        cdef Py_ssize_t n, slot
        cdef const char* p
        cdef Doc d
        cdef int32_t head, ei
        cdef uint64_t ctr
        cdef Py_hash_t hv
        cdef int h
        cdef uint64_t mods = 0 if fresh is None else fresh.mods
        # the value's bytes are s[start:]: encoding a container may run its own code, which
        # may write to this replica and so use the scratch buffer too (above our bytes)
        cdef Py_ssize_t start = s.n
        try:
            put_value(s, value, 0)
            if fresh is not None and fresh.mods != mods:
                fresh = None  # encoding the value ran code that changed the document: look up
                t.fresh_broken = True
            if not (coll is t.cache_coll and doc is t.cache_doc and t.cache_d is not None):
                _name_utf8(coll, &n, "collection name")
                _name_utf8(doc, &n, "document id")
            p = _name_utf8(field, &n, "field name")
            d = self._doc_w(t, coll, doc)
            if isinstance(value, (list, tuple, dict)):
                value = decode_value(PyBytes_FromStringAndSize(<char*>s.data + start,
                                                               s.n - start))
            ctr = self._new_dot()
        except BaseException:
            s.n = start
            raise
        hv = _str_hash(field, p, n)
        slot = -1 if fresh is d else d.find(p, n, hv)
        ei = _new_register(d, op, ctr, self._txn_hlc, value)
        if slot < 0:
            head = -1
            d.add(p, n, hv, field, ei, fresh is d)
        else:
            head = d.slots[slot].head
            d.slots[slot].head = ei
        # header byte, then the names that changed, the field, the value, the kills
        h = op
        if head >= 0:
            h |= FLAG_KILLS
        if coll != t.coll:
            h |= FLAG_NEW_COLL | FLAG_NEW_DOC
            t.buf.byte(h)
            t.names.put_str(t.buf, coll)
            t.names.put_str(t.buf, doc)
            t.coll = coll
            t.doc = doc
        elif doc != t.doc:
            h |= FLAG_NEW_DOC
            t.buf.byte(h)
            t.names.put_str(t.buf, doc)
            t.doc = doc
        else:
            t.buf.byte(h)
        t.nops += 1
        d.ents[ei].gen = NIDX_FLAG | <uint64_t>t.names.put_field(
            t.buf, <const unsigned char*>p, n, hv, _known_name(d, head, self._txn_start))
        t.buf.raw(s.data + start, s.n - start)
        s.n = start
        if head >= 0:
            self._put_kills(t, _dots_of(d, _chain_from(d, head)))
            d.free_chain(head)
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
                break
            d = t.cache_d
            if n > 1 and d is not None and d.nlive == 1 and type(items) is dict:
                # the document held at most the first field: the other keys are new to it;
                # its arrays get exactly the room they need (most documents are small)
                d.reserve(n - 1)
                return self._bulk_fresh(t, d, coll, doc, <dict>items, n)
            for field, value in (<dict>items).items():
                i += 1
                if i > 1:
                    self._set1(t, coll, doc, field, value, OP_LWW)
        else:
            from collections.abc import Mapping
            pairs = items.items() if isinstance(items, Mapping) else items
            for field, value in pairs:
                self._set1(t, coll, doc, field, value, OP_LWW)
        return 0

    cdef int _bulk_fresh(self, _TxnWriter t, Doc d, object coll, object doc, dict items,
                         Py_ssize_t n) except -1:
        """set_many's pairs after the first into ``d``, to which every key is new.

        The same bytes and state as _set1 per pair, without a lookup per key; pairs of an
        ASCII str key and a value whose encoding cannot fail or run user code (None, bool,
        int, float, bytes, ASCII str) are written inline, any other pair through _set1. If
        anything changes the document or the transaction's position meanwhile (a value's
        own code writing to this replica), the rest goes through _set1 with lookups.
        """
        cdef Py_ssize_t pos = 0, i = 0, kn, idx
        cdef PyObject* kp
        cdef PyObject* vp
        cdef _Buf buf = t.buf
        cdef _Names names = t.names
        cdef const char* p
        cdef long long x
        cdef int overflow
        cdef uint64_t ctr, hlc = self._txn_hlc
        cdef Py_hash_t hv
        cdef int32_t ei
        cdef bint fast = True
        cdef uint64_t mods = d.mods
        t.fresh_broken = False
        while PyDict_Next(items, &pos, &kp, &vp):
            i += 1
            if i == 1:
                continue
            if PyDict_Size(items) != n:
                raise RuntimeError("dictionary changed size during iteration")
            key = <object>kp
            value = <object>vp
            if fast and (d.mods != mods or t.cache_d is not d or t.coll is not coll
                         or t.doc is not doc):
                fast = False  # a value's code wrote to this replica: look every key up
            if not fast:
                self._set1(t, coll, doc, key, value, OP_LWW)
                continue
            overflow = 0
            x = 0
            if not (PyUnicode_CheckExact(key) and PyUnicode_IS_COMPACT_ASCII(key)
                    and PyUnicode_GET_LENGTH(key) <= C_MAX_NAME):
                self._set1(t, coll, doc, key, value, OP_LWW, d)
                mods = d.mods
                fast = not t.fresh_broken
                continue
            if PyLong_CheckExact(value):
                x = PyLong_AsLongLongAndOverflow(value, &overflow)
                if overflow:
                    self._set1(t, coll, doc, key, value, OP_LWW, d)
                    mods = d.mods
                    fast = not t.fresh_broken
                    continue
            elif not (value is None or value is True or value is False
                      or PyFloat_CheckExact(value) or PyBytes_CheckExact(value)
                      or (PyUnicode_CheckExact(value) and PyUnicode_IS_COMPACT_ASCII(value))):
                self._set1(t, coll, doc, key, value, OP_LWW, d)
                mods = d.mods
                fast = not t.fresh_broken
                continue
            p = <const char*>PyUnicode_DATA(key)
            kn = PyUnicode_GET_LENGTH(key)
            ctr = self._new_dot()
            hv = hash(key)
            ei = _new_register(d, OP_LWW, ctr, hlc, value)
            d.add(p, kn, hv, key, ei, True)
            mods = d.mods
            buf.byte(OP_LWW)
            idx = names.put_field(buf, <const unsigned char*>p, kn, hv, -1)
            d.ents[ei].gen = NIDX_FLAG | <uint64_t>idx
            if PyLong_CheckExact(value):
                if buf.n + 11 > buf.cap:
                    buf.grow(11)
                if 0 <= x < 0x80:
                    buf.data[buf.n] = TAG_SMALL | <unsigned char>x
                    buf.n += 1
                elif x >= 0:
                    buf.data[buf.n] = TAG_UINT
                    buf.n += 1
                    buf.varint(<uint64_t>x)
                else:
                    buf.data[buf.n] = TAG_NEGINT
                    buf.n += 1
                    buf.varint(<uint64_t>(-(x + 1)))
            else:
                put_value(buf, value, 0)
            t.nops += 1
        return 0

    def set_mv(self, coll, doc, field, value):
        """Write a multi-value register (see the reference).

        Raises:
            CoreUsageError: as :meth:`set`.
        """
        cdef _TxnWriter t = self._writer()
        self._set1(t, coll, doc, field, value, OP_MV)

    cdef _check_kind(self, coll, doc, field, int kind):
        cdef Doc d = self._doc_of(coll, doc)
        cdef Py_ssize_t s
        if d is None:
            return
        s = d.find_str(field)
        if s >= 0 and d.ents[d.winner(self._reps, d.slots[s].head)].kind != kind:
            raise CoreUsageError(f"field {field!r} holds another type")

    cdef _write(self, int op, coll, doc, field, value, bytes payload, int filt, bytes enc):
        """Shared body of the entry-creating writes other than set/set_mv."""
        cdef _TxnWriter t = self._writer()
        cdef Py_ssize_t n, slot
        cdef const char* p
        cdef Doc d
        cdef int32_t head, ei, prev
        cdef ERec* e
        cdef Py_hash_t hv
        _name_utf8(coll, &n, "collection name")
        _name_utf8(doc, &n, "document id")
        p = _name_utf8(field, &n, "field name")
        d = self._doc_for_write(coll, doc)
        hv = _str_hash(field, p, n)
        slot = d.find(p, n, hv)
        head = -1 if slot < 0 else d.slots[slot].head
        kills = []
        keep = []
        for k in _chain_from(d, head):
            e = &d.ents[<int32_t>k]
            if (filt == 1 and e.kind == OP_COUNTER and e.rep == 0) or \
               (filt == 2 and e.kind == OP_TEXT and e.rep == 0) or \
               (filt == 3 and e.kind == OP_SET_ADD and encode_value(_val(d, k)) == enc):
                kills.append(k)
            else:
                keep.append(k)
        ctr = self._new_dot()
        ei = d.new_ent(op, 0, ctr, self._txn_hlc, value)
        prev = ei
        for k in keep:
            d.ents[prev].next = <int32_t>k
            prev = <int32_t>k
        d.ents[prev].next = -1
        if slot < 0:
            d.add(p, n, hv, field, ei)
        else:
            d.slots[slot].head = ei
        self._op_header(t, op, coll, doc, bool(kills))
        d.ents[ei].gen = NIDX_FLAG | <uint64_t>t.names.put_field(
            t.buf, <const unsigned char*>p, n, hv, _known_name(d, head, self._txn_start))
        t.buf.raw(<const unsigned char*>PyBytes_AS_STRING(payload), len(payload))
        if kills:
            self._put_kills(t, _dots_of(d, kills))
            for k in kills:
                d.free_one(<int32_t>k)

    def increment(self, coll, doc, field, amount=1):
        """Add ``amount`` (negative to decrement) to a counter field.

        Raises:
            CoreUsageError: the field holds a non-counter value, or bad arguments.
        """
        cdef Doc d
        cdef Py_ssize_t s
        cdef ERec* e
        self._writer()
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise CoreUsageError("counter amounts are ints")
        self._check_kind(coll, doc, field, OP_COUNTER)
        p = n = 0
        d = self._doc_of(coll, doc)
        s = -1 if d is None else d.find_str(field)
        if s >= 0:
            for k in d.chain(s):
                e = &d.ents[<int32_t>k]
                if e.kind == OP_COUNTER and e.rep == 0:
                    p += (<object>e.value)[0]
                    n += (<object>e.value)[1]
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
        cdef _TxnWriter t = self._writer()
        cdef Doc d
        cdef Py_ssize_t s, n
        cdef const char* p
        cdef int32_t head
        cdef ERec* e
        enc = _element(element)
        d = self._doc_of(coll, doc)
        s = -1 if d is None else d.find_str(field)
        if s < 0:
            return
        head = d.slots[s].head
        kills = []
        for k in d.chain(s):
            e = &d.ents[<int32_t>k]
            if e.kind == OP_SET_ADD and encode_value(_val(d, k)) == enc:
                kills.append(k)
        if not kills:
            return
        p = PyUnicode_AsUTF8AndSize(field, &n)
        hv = d.slots[s].hash
        known = _known_name(d, head, self._txn_start)
        dots = _dots_of(d, kills)
        self._kill_in_field(d, s, kills)
        self._new_dot()
        self._op_header(t, OP_SET_REMOVE, coll, doc, True)
        t.names.put_field(t.buf, <const unsigned char*>p, n, hv, known)
        t.buf.raw(<const unsigned char*>PyBytes_AS_STRING(enc), len(enc))
        self._put_kills(t, dots)

    def remove_field(self, coll, doc, field):
        """Remove a field (a concurrent write to it survives).

        Raises:
            CoreUsageError: no open transaction.
        """
        cdef _TxnWriter t = self._writer()
        cdef Doc d
        cdef Py_ssize_t s, n
        cdef const char* p
        d = self._doc_of(coll, doc)
        s = -1 if d is None else d.find_str(field)
        if s < 0:
            return
        kills = d.chain(s)
        p = PyUnicode_AsUTF8AndSize(field, &n)
        hv = d.slots[s].hash
        known = _known_name(d, d.slots[s].head, self._txn_start)
        dots = _dots_of(d, kills)
        self._kill_in_field(d, s, kills)
        self._new_dot()
        self._op_header(t, OP_REMOVE_FIELD, coll, doc, True)
        t.names.put_field(t.buf, <const unsigned char*>p, n, hv, known)
        self._put_kills(t, dots)

    def remove(self, coll, doc):
        """Remove a document (fields written concurrently survive).

        Raises:
            CoreUsageError: no open transaction.
        """
        cdef _TxnWriter t = self._writer()
        cdef Doc d = self._doc_of(coll, doc)
        cdef Py_ssize_t s
        if d is None:
            return
        kills = []
        for s in range(d.nslots):
            if d.slots[s].head >= 0:
                kills.extend(d.chain(s))
        del self._colls[coll][doc]
        if not self._colls[coll]:
            del self._colls[coll]
        t.cache_d = None
        self._new_dot()
        self._op_header(t, OP_REMOVE_DOC, coll, doc, True)
        self._put_kills(t, _dots_of(d, kills))

    def append(self, log, value):
        """Append a record to an append-only log (readings, events).

        Raises:
            CoreUsageError: no open transaction, a bad name or an unsupported value.
        """
        cdef _TxnWriter t = self._writer()
        cdef Py_ssize_t n
        cdef _Buf s = self._scratch
        cdef Py_ssize_t start = s.n
        _name_utf8(log, &n, "log name")
        try:
            put_value(s, value, 0)
            ctr = self._new_dot()
        except BaseException:
            s.n = start
            raise
        es = self._logs.get(log)
        if es is None:
            es = self._logs[log] = []
        es.append(new_entry(OP_APPEND, 0, ctr, self._txn_hlc, _stored(value)))
        self._op_header(t, OP_APPEND, log, None, False)
        t.buf.raw(s.data + start, s.n - start)
        s.n = start

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

    cdef _kill_in_field(self, Doc d, Py_ssize_t s, list kills):
        kset = set(kills)
        keep = [k for k in d.chain(s) if k not in kset]
        d.relink(s, keep)
        self._drop_doc_if_empty(d)

    # -- reads -------------------------------------------------------------------------

    cdef Doc _doc_of(self, coll, doc):
        docs = self._colls.get(coll)
        if docs is None:
            return None
        return <Doc>(<dict>docs).get(doc)

    cdef object _read(self, coll, doc, Doc d, Py_ssize_t s):
        cdef int32_t head = d.slots[s].head
        cdef int32_t w = d.winner(self._reps, head)
        cdef int kind = d.ents[w].kind
        cdef ERec* e
        if kind == OP_LWW:
            return _copy_out(_val(d, w))
        if kind == OP_MV:
            same = sorted([k for k in d.chain(s) if d.ents[<int32_t>k].kind == OP_MV],
                          key=lambda k: self._ent_key(d, k))
            return tuple([_copy_out(_val(d, k)) for k in same])
        if kind == OP_COUNTER:
            total = 0
            for k in d.chain(s):
                e = &d.ents[<int32_t>k]
                if e.kind == OP_COUNTER:
                    total += (<object>e.value)[0] - (<object>e.value)[1]
            return total
        if kind == OP_SET_ADD:
            return frozenset([_val(d, k) for k in d.chain(s)
                              if d.ents[<int32_t>k].kind == OP_SET_ADD])
        text = self._texts.get((coll, doc, d.slot_name(s)))
        return "" if text is None else text.value()

    cdef tuple _ent_key(self, Doc d, object k):
        cdef ERec* e = &d.ents[<int32_t>k]
        return (e.hlc, self._reps[e.rep], e.ctr)

    def get(self, coll, doc, field, default=None):
        """Read a field (see the reference for what each type returns)."""
        cdef Doc d = self._doc_of(coll, doc)
        cdef Py_ssize_t s
        if d is None:
            return default
        s = d.find_str(field)
        return default if s < 0 else self._read(coll, doc, d, s)

    def conflicts(self, coll, doc, field):
        """Every live value of a field, oldest first (HLC, replica id, counter)."""
        cdef Doc d = self._doc_of(coll, doc)
        cdef Py_ssize_t s = -1 if d is None else d.find_str(field)
        if s < 0:
            return []
        es = sorted(d.chain(s), key=lambda k: self._ent_key(d, k))
        return [_copy_out(_val(d, k)) for k in es]

    def document(self, coll, doc):
        """Read a whole document as ``{field: value}`` (fields sorted), or None if absent."""
        cdef Doc d = self._doc_of(coll, doc)
        cdef Py_ssize_t s
        if d is None:
            return None
        slots = {d.slot_name(s): s for s in range(d.nslots) if d.slots[s].head >= 0}
        return {f: self._read(coll, doc, d, slots[f]) for f in sorted(slots)}

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
        cdef int h, kind, tag
        cdef int32_t coll, doc, field
        cdef Py_ssize_t vpos
        cdef uint64_t u
        cdef int64_t imm = 0
        cdef bint unboxed
        cdef Py_ssize_t i2
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
                       (step > 0 and <uint64_t>step > CELL_EMPTY - hlc):
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
                    if hlc == CELL_EMPTY:  # 2^64 - 1
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
                unboxed = False
                if (kind == OP_LWW or kind == OP_MV) and r.pos < r.end and (
                        r.p[r.pos] >= TAG_SMALL or r.p[r.pos] == TAG_UINT
                        or r.p[r.pos] == TAG_NEGINT):
                    # a register's int: kept unboxed when it fits 64 signed bits
                    vpos = r.pos
                    tag = r.p[r.pos]
                    r.pos += 1
                    if tag >= TAG_SMALL:
                        imm = tag & 0x7F
                        unboxed = True
                    else:
                        u = r.varint()
                        if u <= C_MAX_COUNTER:  # 2^63 - 1: fits an int64
                            imm = <int64_t>u if tag == TAG_UINT else -1 - <int64_t>u
                            unboxed = True
                        else:
                            r.pos = vpos
                            payload = r.value(0)
                elif kind == OP_LWW or kind == OP_MV or kind == OP_APPEND:
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
                if unboxed:
                    op.payload = NULL
                    op.imm = imm
                else:
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
        cdef Py_ssize_t i, k, oi, upto, slot, hp
        cdef RunRec* run
        cdef OpRec* op
        cdef int r, kind
        cdef uint64_t dot, vv_r, plo, phi, old_gen
        cdef bint cloud_r, fresh, have_piece
        cdef CausalContext ctx = self._ctx
        cdef PyObject* pv
        cdef dict colls = self._colls
        cdef Doc doc_obj = None
        cdef int32_t doc_coll = -1, doc_doc = -1, ei, head
        cdef bint use_hint = True
        cdef Py_ssize_t hint_pos = 0
        cdef const unsigned char* np
        cdef Py_ssize_t nn
        cdef Py_hash_t hv
        cdef FSlot* fs
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
                        self._touch_field(changes, key[0], key[1], key[2])
                if not fresh:
                    continue
                if kind == OP_APPEND:
                    coll_s = d.name(op.coll)
                    es = self._logs.get(coll_s)
                    if es is None:
                        es = self._logs[coll_s] = []
                    es.append(new_entry(kind, r, dot, op.hlc, <object>op.payload))
                    changes.touch(coll_s, None, None, False, 0)
                    continue
                if doc_obj is None or op.coll != doc_coll or op.doc != doc_doc:
                    doc_obj = self._doc_for_write(d.name(op.coll), d.name(op.doc))
                    doc_coll = op.coll
                    doc_doc = op.doc
                    hint_pos = 0
                    # a document that was empty here gets new fields: no order to follow
                    use_hint = doc_obj.nlive != 0
                    # presize the document's entry pool (and a new document's table) for the
                    # ops of this run that go to it
                    upto = oi + 1
                    while upto < run.end and d.ops[upto].coll == doc_coll and \
                            d.ops[upto].doc == doc_doc:
                        upto += 1
                    if not use_hint:
                        doc_obj.reserve(upto - oi)  # exactly: most documents are small
                    elif upto - oi >= PRESIZE_MIN:
                        doc_obj.reserve_ents(upto - oi)
                np = d.arena.data + d.noff[op.field]
                nn = d.nlen[op.field]
                # the order hint: a delta often lists a document's fields in the order the
                # document got them (a replica writing the same keys, a since-delta): try the
                # table's next slot first, verified by comparing the names, before a hash probe.
                # A stale position (the table changed) just misses.
                slot = -1
                hv = 0
                if use_hint:
                    hp = hint_pos
                    while hp < doc_obj.nslots and doc_obj.slots[hp].head < 0:
                        hp += 1
                    if hp < doc_obj.nslots:
                        fs = &doc_obj.slots[hp]
                        if fs.len == nn and memcmp(doc_obj.arena + fs.off, np, nn) == 0:
                            slot = hp
                            hint_pos = hp + 1
                    if slot < 0:
                        hint_pos = hp  # the removed slots skipped are not looked at again
                if slot < 0:
                    hv = d.name_hash(op.field)
                    slot = doc_obj.find(<const char*>np, nn, hv)
                    if slot >= 0:
                        hint_pos = slot + 1
                if op.payload == NULL:
                    ei = doc_obj.new_ent_imm(kind, r, dot, op.hlc, op.imm)
                else:
                    ei = doc_obj.new_ent(kind, r, dot, op.hlc, <object>op.payload)
                doc_obj.ents[ei].gen = changes.gen
                if slot < 0:
                    pv = d.nobj[op.field]
                    slot = doc_obj.add(<const char*>np, nn, hv,
                                       None if pv == NULL else <object>pv, ei)
                    changes.inserted(doc_obj, slot, False, 0)
                else:
                    # the field has a chain: the new entry goes in front
                    head = doc_obj.slots[slot].head
                    old_gen = doc_obj.ents[head].gen
                    doc_obj.ents[ei].next = head
                    doc_obj.slots[slot].head = ei
                    changes.inserted(doc_obj, slot, True, old_gen)
            if have_piece:
                ctx.add_range(r, plo, phi)
        # 3. the context ranges join the local context
        for rep, ranges in d.ctx:
            for lo, hi in ranges:
                ctx.add_range(rmap[rep], lo, hi)
        return 0

    cdef int _touch_field(self, _Changes changes, coll, doc, field) except -1:
        # a kill or text touch of a field: the head's generation says whether an insertion
        # of this call already reported it
        cdef Doc d
        cdef Py_ssize_t s
        if not changes.on:
            return 0
        d = self._doc_of(coll, doc)
        s = -1 if d is None else d.find_str(field)
        if s < 0:
            return changes.touch(coll, doc, field, False, 0)
        return changes.touch(coll, doc, field, True, d.ents[d.slots[s].head].gen)

    cdef Py_ssize_t _op_rep(self, _Decoded d, Py_ssize_t oi):
        cdef Py_ssize_t k
        for k in range(d.nruns):
            if d.runs[k].first <= oi < d.runs[k].end:
                return d.runs[k].rep
        return 0

    cdef int _apply_kills(self, _Decoded d, OpRec* op, int* rmap, _Changes changes) except -1:
        cdef Py_ssize_t i, s
        cdef Doc dd
        cdef ERec* e
        dots = []
        for i in range(op.kstart, op.kstart + op.kcount):
            dots.append((rmap[d.kills[i].rep], d.kills[i].ctr))
        coll = d.name(op.coll)
        doc = d.name(op.doc) if op.doc >= 0 else None
        field = d.name(op.field) if op.field >= 0 else None
        for rep, ctr in dots:
            self._ctx.add_range(rep, ctr, ctr)
        dd = self._doc_of(coll, doc) if doc is not None else None
        if dd is None:
            return 0
        dead = set(dots)
        if field is not None:
            s = dd.find_str(field)
            todo = [s] if s >= 0 else []
        else:
            todo = [s for s in range(dd.nslots) if dd.slots[s].head >= 0]
        for so in todo:
            s = so
            es = dd.chain(s)
            keep = []
            for k in es:
                e = &dd.ents[<int32_t>k]
                if (e.rep, e.ctr) not in dead:
                    keep.append(k)
            if len(keep) != len(es):
                changes.touch(coll, doc, dd.slot_name(s), True,
                              dd.ents[dd.slots[s].head].gen)
                dd.relink(s, keep)
        if not dd.nlive:
            del self._colls[coll][dd.id]
            if not self._colls[coll]:
                del self._colls[coll]
        return 0

    cdef _kill_covered(self, CausalContext kctx, set hit, set rundots, _Changes changes):
        cdef Doc d
        cdef Py_ssize_t s
        cdef ERec* e
        for coll in list(self._colls):
            docs = self._colls[coll]
            for doc_id in list(docs):
                d = <Doc>docs[doc_id]
                for s in range(d.nslots):
                    if d.slots[s].head < 0:
                        continue
                    es = d.chain(s)
                    keep = []
                    for k in es:
                        e = &d.ents[<int32_t>k]
                        if not (e.rep in hit and kctx.contains(e.rep, e.ctr)
                                and (e.rep, e.ctr) not in rundots):
                            keep.append(k)
                    if len(keep) != len(es):
                        changes.touch(coll, doc_id, d.slot_name(s), True,
                                      d.ents[d.slots[s].head].gen)
                        d.relink(s, keep)
                if not d.nlive:
                    del docs[doc_id]
            if not docs:
                del self._colls[coll]
        for name in list(self._logs):
            es = self._logs[name]
            keep = [le for le in es if not (
                (<Entry>le).rep in hit and kctx.contains((<Entry>le).rep, (<Entry>le).ctr)
                and ((<Entry>le).rep, (<Entry>le).ctr) not in rundots)]
            if len(keep) != len(es):
                changes.touch(name, None, None, False, 0)
                if keep:
                    self._logs[name] = keep
                else:
                    del self._logs[name]

    # -- encoding ----------------------------------------------------------------------

    cdef int _encode_select(self, _LiveArray live, list order, dict vv, uint64_t* above,
                            Py_ssize_t* pnrep, list used, dict dead, dict send_from) except -1:
        """encode_since's selection: per replica (in id order) its dead ranges and the slice
        of gathered records to send."""
        cdef Py_ssize_t nrep = pnrep[0], a, b, j, rk
        cdef uint64_t lo, hi, cur, since
        # sort by (replica id, counter): bucket by replica, then sort a bucket only if its
        # counters are out of order (fields are visited in insertion order, so rarely)
        _bucket_sort(live, nrep)
        # per replica (in id order): the slice of live records, dead ranges, what to send
        ctx_keys = self._ctx.keyset()
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
            # a replica gathered in part has no holes (see encode_since)
            for lo_o, hi_o in (self._ctx.ranges(k) if above[<Py_ssize_t>k] == 0 else ()):
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
                sel = [i for i in range(a, j) if live.recs[i].kind == OP_TEXT]
            else:
                sel = []
            if sel or j < b:
                send_from[k] = (sel, j, b)
            if out_ranges or k in send_from:
                used.append(k)
            a = b
        return 0

    def encode_snapshot(self):
        """Encode the whole state: the delta an empty replica lacks (canonical)."""
        return self.encode_since({})

    def encode_since(self, version):
        """Extract the delta that the holder of ``version`` lacks (see the reference)."""
        cdef _LiveArray live = _LiveArray()
        cdef Py_ssize_t nrep, i, j, a, b, rk, nops
        cdef Entry e
        cdef Doc d
        cdef LiveRec* rec
        cdef FSlot* fs
        cdef uint64_t lo, hi, cur, ctr, hlc, since
        cdef _Buf out, ops
        cdef _Names names
        cdef int kind, h
        cdef PyObject* cur_coll
        cdef PyObject* cur_doc
        cdef PyObject* rcoll
        cdef PyObject* rdoc
        cdef bint new_coll, new_doc
        cdef Py_ssize_t* rank
        cdef uint64_t* above
        cdef uint64_t* nlive
        cdef Py_ssize_t* selidx = NULL
        cdef Py_ssize_t nsel, total
        if self._txn is not None:
            raise CoreUsageError("commit the open transaction before encoding")
        self._flush_own()
        vv = {self._rep_index[k]: v for k, v in version.items() if k in self._rep_index}
        used = []
        dead = {}
        send_from = {}
        nrep = len(self._reps)
        # rank of each replica index in replica-id order
        order = sorted(range(nrep), key=lambda k: self._reps[k])
        rank = <Py_ssize_t*>malloc((nrep + 1) * sizeof(Py_ssize_t))
        above = <uint64_t*>malloc((nrep + 1) * sizeof(uint64_t))
        nlive = <uint64_t*>malloc((nrep + 1) * sizeof(uint64_t))
        if rank == NULL or above == NULL or nlive == NULL:
            free(rank)
            free(above)
            free(nlive)
            raise MemoryError()
        try:
            for i in range(nrep):
                rank[<Py_ssize_t>order[i]] = i
                nlive[i] = 0
            # a replica whose every dot in the context has a live entry has no dead ranges:
            # then only its entries the peer lacks (counter above the peer's vector) are
            # gathered and sorted; the others need all their entries to find the holes
            for docs in self._colls.values():
                for dobj in (<dict>docs).values():
                    _count_live(<Doc>dobj, nlive)
            for es in self._logs.values():
                for eobj in <list>es:
                    nlive[(<Entry>eobj).rep] += 1
            for i in range(nrep):
                ndots = 0
                for lo_o, hi_o in self._ctx.ranges(i):
                    ndots += hi_o - lo_o + 1
                if ndots == nlive[i]:
                    sv = vv.get(i, 0)
                    above[i] = 0 if sv < 0 else (sv if sv <= MAX_COUNTER else MAX_COUNTER)
                else:
                    above[i] = 0
            total = 0
            for i in range(nrep):
                total += nlive[i]
            live.reserve(total)  # at most every live entry: no regrowth while gathering
            for docs in self._colls.values():
                for dobj in (<dict>docs).values():
                    live.push_doc(<Doc>dobj, rank, above)
            for name, es in self._logs.items():
                for eobj in <list>es:
                    e = <Entry>eobj
                    if e.ctr > above[e.rep]:
                        live.push_log(e, rank[e.rep], name)
            self._encode_select(live, order, vv, above, &nrep, used, dead, send_from)
        finally:
            free(rank)
            free(above)
            free(nlive)
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
        ops.grow(8 * live.n)  # a register op of a small value is about 8 bytes
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
            rec = &live.recs[selidx[0]]
            out.varint(table[k])
            out.varint(rec.ctr)
            out.varint(rec.hlc)
            ops.n = 0
            nops = 0
            ctr = rec.ctr
            hlc = rec.hlc
            cur_coll = NULL
            cur_doc = NULL
            for i in range(nsel):
                rec = &live.recs[selidx[i]]
                h = rec.kind
                if rec.ctr == ctr and rec.hlc == hlc + 1:
                    h |= FLAG_TICK
                    hlc += 1
                elif rec.ctr != ctr or rec.hlc != hlc:
                    ops.byte(OP_ADVANCE)
                    ops.varint(rec.ctr - ctr)
                    ops.varint(zigzag(<int64_t>(rec.hlc - hlc)))
                    nops += 1
                    ctr = rec.ctr
                    hlc = rec.hlc
                if rec.doc != NULL:
                    d = <Doc>rec.doc
                    rcoll = <PyObject*>d.coll
                    rdoc = <PyObject*>d.id
                else:
                    d = None
                    rcoll = rec.coll
                    rdoc = NULL
                new_coll = cur_coll == NULL or (
                    rcoll != cur_coll and <str>rcoll != <str>cur_coll)
                new_doc = rdoc != NULL and (new_coll or (
                    rdoc != cur_doc and (cur_doc == NULL or <str>rdoc != <str>cur_doc)))
                if new_coll:
                    h |= FLAG_NEW_COLL
                if new_doc:
                    h |= FLAG_NEW_DOC
                ops.byte(h)
                if new_coll:
                    names.put_str(ops, <str>rcoll)
                    cur_coll = rcoll
                    cur_doc = NULL
                if new_doc:
                    names.put_str(ops, <str>rdoc)
                    cur_doc = rdoc
                if d is not None:
                    fs = &d.slots[rec.slot]
                    names.put(ops, d.arena + fs.off, fs.len, fs.hash)
                kind = rec.kind
                if kind == OP_COUNTER:
                    ops.varint(PyLong_AsUnsignedLongLong((<object>rec.value)[0]))
                    ops.varint(PyLong_AsUnsignedLongLong((<object>rec.value)[1]))
                elif kind == OP_TEXT:
                    key = (d.coll, d.id, d.slot_name(rec.slot))
                    text = self._texts.get(key)
                    state = b""
                    if text is not None and key not in texts_sent:
                        state = text.encode_since({})
                        texts_sent.add(key)
                    ops.varint(len(state))
                    ops.raw(<const unsigned char*>PyBytes_AS_STRING(state), len(state))
                elif rec.value == NULL:
                    _put_imm(ops, rec.imm)
                else:
                    put_value(ops, <object>rec.value, 0)
                nops += 1
                ctr += 1
            out.varint(<uint64_t>nops)
            out.append_buf(ops)
        free(selidx)
        return out.tobytes()
