"""Key encodings, argument checks and record codecs of the store (pure, no LMDB).

Keys are struct-packed big-endian so that LMDB's byte order (memcmp) is the order that
matters: every counter is an unsigned 64-bit big-endian integer, so a cursor walks one
origin's log in counter order. Variable-length ids are prefixed with their length byte, so
the prefix of one (sub-cloud, origin) pair is never the prefix of another pair's keys.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping
from typing import Any, Final

import cbor2

from p2pcloud._ids import HASHNAME_LENGTH, Hashname, ReplicaId, SubCloudId
from p2pcloud.errors import StoreError, StoreUsageError

# -- limits, each with its reason ---------------------------------------------------------

MIN_SUBCLOUD_ID: Final = 1
MAX_SUBCLOUD_ID: Final = 64  # BRIEF: 16 random bytes; 64 leaves room and keeps keys short
MIN_REPLICA_ID: Final = 8  # BRIEF: replica ids are opaque bytes of 8..32
MAX_REPLICA_ID: Final = 32
MAX_COUNTER: Final = (1 << 63) - 1  # the core's dot counters fit an int64 (core MAX_COUNTER)
MAX_ENVELOPE_BYTES: Final = 128 << 20
"""One signed delta (one local transaction of the core). A bulk import bigger than this
should be split into several transactions; it also bounds what one log read holds."""
MAX_SNAPSHOT_BYTES: Final = (2 << 30) - 1
"""A checkpoint is read whole into memory by ``load_state`` and ``Replica.load``; 2 GiB
(a signed 32-bit length) is far above the 1,000,000-document state (tens of MiB)."""
MIN_HASH: Final = 16  # a chunk hash: at least 128 bits, or collisions become plausible
MAX_HASH: Final = 64  # a BLAKE3/SHA-512 digest at most (the core's MAX_BLOB_HASH)
MAX_BLOB_ID: Final = 64  # blob ids are hashes or short names; well under LMDB's 511-byte keys
MAX_CHUNK_BYTES: Final = 16 << 20
"""Content-defined chunkers cap chunks at a few MiB; a larger chunk is a caller bug."""
MAX_BLOB_CHUNKS: Final = 1 << 20
"""Chunks of one blob: 64 GiB of 64 KiB chunks; bounds a blob record (~36 MiB at most)."""
MAX_BLOB_SIZE: Final = (1 << 63) - 1  # a file size that fits an int64 (os.stat's st_size)
MAX_NAME_BYTES: Final = 1024  # a sub-cloud's name: a label, not a payload
MAX_RECORD_BYTES: Final = 64 << 10
"""A sub-cloud or peer record (metadata, keys, a few paths): a few hundred bytes in
practice; 64 KiB stops a caller from hiding payloads in metadata."""
MAX_PATHS_PER_PEER: Final = 16  # remembered paths per peer, most recent first; older ones go
MAX_CSID_KEYS: Final = 16  # cipher-set keys per peer (telehash v3 has a handful of CSIDs)
MAX_KEY_BYTES: Final = 1024  # one cipher-set public key (CS3a: 32 bytes; CS2a RSA: 294)

SUBCLOUD_KINDS: Final = frozenset({"device", "thing", "cloud"})
HASHNAME_RE: Final = re.compile(rf"[a-z2-7]{{{HASHNAME_LENGTH}}}")  # base32, lowercase
CSID_RE: Final = re.compile(r"[0-9a-f]{2}")  # telehash v3: a CSID is one byte in hex

U64: Final = struct.Struct(">Q")
U32: Final = struct.Struct(">I")


# -- argument checks -------------------------------------------------------------------------


def as_bytes(value: object, what: str, lo: int, hi: int) -> bytes:
    """Check that ``value`` is bytes-like of ``lo..hi`` bytes and return it as bytes.

    Raises:
        StoreUsageError: wrong type or length.
    """
    if isinstance(value, bytes):
        out = value
    elif isinstance(value, bytearray | memoryview):
        out = bytes(value)
    else:
        raise StoreUsageError(f"{what} must be bytes, not {type(value).__name__}")
    if not lo <= len(out) <= hi:
        raise StoreUsageError(f"{what} must be {lo}..{hi} bytes long, not {len(out)}")
    return out


def as_subcloud(value: object) -> SubCloudId:
    """Check a sub-cloud id. Raises StoreUsageError."""
    return SubCloudId(as_bytes(value, "sub-cloud id", MIN_SUBCLOUD_ID, MAX_SUBCLOUD_ID))


def as_replica(value: object) -> ReplicaId:
    """Check a replica id. Raises StoreUsageError."""
    return ReplicaId(as_bytes(value, "replica id", MIN_REPLICA_ID, MAX_REPLICA_ID))


def as_counter(value: object, what: str, lo: int = 1) -> int:
    """Check a dot counter (an int in ``lo..MAX_COUNTER``). Raises StoreUsageError."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise StoreUsageError(f"{what} must be an int, not {type(value).__name__}")
    if not lo <= value <= MAX_COUNTER:
        raise StoreUsageError(f"{what} must be in {lo}..{MAX_COUNTER}, not {value}")
    return value


def as_size(value: object, what: str, lo: int, hi: int) -> int:
    """Check a non-boolean int in ``lo..hi``. Raises StoreUsageError."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise StoreUsageError(f"{what} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise StoreUsageError(f"{what} must be in {lo}..{hi}, not {value}")
    return value


def as_hashname(value: object) -> Hashname:
    """Check a hashname (52 lowercase base32 characters). Raises StoreUsageError."""
    if not isinstance(value, str) or not HASHNAME_RE.fullmatch(value):
        raise StoreUsageError(
            f"a hashname must be {HASHNAME_LENGTH} lowercase base32 characters, not {value!r:.80}"
        )
    return Hashname(value)


def as_version(value: object, what: str = "version") -> dict[ReplicaId, int]:
    """Check a version vector (replica id -> counter >= 0). Raises StoreUsageError."""
    if not isinstance(value, Mapping):
        raise StoreUsageError(f"{what} must be a mapping of replica id to counter")
    return {as_replica(k): as_counter(v, f"{what} counter", 0) for k, v in value.items()}


def as_time(value: object, what: str) -> float:
    """Check a time in seconds since the epoch (finite, >= 0). Raises StoreUsageError."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise StoreUsageError(f"{what} must be a number of seconds, not {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out) or out < 0:
        raise StoreUsageError(f"{what} must be a finite number of seconds >= 0, not {value}")
    return out


# -- keys ------------------------------------------------------------------------------------


def subcloud_prefix(subcloud: bytes) -> bytes:
    """``len | sub-cloud id``: the prefix of every log and head key of a sub-cloud."""
    return bytes((len(subcloud),)) + subcloud


def origin_key(subcloud: bytes, origin: bytes) -> bytes:
    """``len | sub-cloud id | len | origin``: a head key, and the prefix of its log keys."""
    return bytes((len(subcloud),)) + subcloud + bytes((len(origin),)) + origin


def split_origin_key(key: bytes) -> tuple[SubCloudId, ReplicaId]:
    """Invert :func:`origin_key`. Raises StoreError on a key it did not make."""
    try:
        n = key[0]
        subcloud = key[1 : 1 + n]
        m = key[1 + n]
        origin = key[2 + n : 2 + n + m]
    except IndexError as exc:
        raise StoreError(f"corrupt head key {key.hex()}: restore or re-sync the store") from exc
    if len(subcloud) != n or len(origin) != m or 2 + n + m != len(key):
        raise StoreError(f"corrupt head key {key.hex()}: restore or re-sync the store")
    return SubCloudId(subcloud), ReplicaId(origin)


# -- records ---------------------------------------------------------------------------------


def encode_record(value: Any, what: str, limit: int = MAX_RECORD_BYTES) -> bytes:
    """CBOR-encode a record, checking that it encodes and fits ``limit``.

    Raises:
        StoreUsageError: a value CBOR cannot encode, or the record is too big.
    """
    try:
        out: bytes = cbor2.dumps(value)
    except (cbor2.CBOREncodeError, TypeError, ValueError, RecursionError) as exc:
        raise StoreUsageError(f"{what} does not encode as CBOR: {exc}") from exc
    if len(out) > limit:
        raise StoreUsageError(f"{what} is {len(out)} bytes encoded; the limit is {limit}")
    return out


def decode_record(data: bytes, what: str) -> Any:
    """Decode a CBOR record the store wrote.

    Raises:
        StoreError: the stored bytes do not decode (the file was damaged).
    """
    try:
        return cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise StoreError(
            f"a stored {what} does not decode ({exc}): the store file is damaged; "
            "restore it from a backup or let the node re-sync"
        ) from exc
