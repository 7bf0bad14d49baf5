"""The node's LMDB store (DESIGN.md sections 3 and 5; docs/store.md).

One environment per node; every function is synchronous and runs one whole transaction,
durable when it returns. The Trio shell calls it with ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

from p2pcloud._store._codec import (
    MAX_BLOB_CHUNKS,
    MAX_CHUNK_BYTES,
    MAX_ENVELOPE_BYTES,
    MAX_HASH,
    MAX_PATHS_PER_PEER,
    MAX_SNAPSHOT_BYTES,
    MAX_SUBCLOUD_ID,
    MIN_HASH,
)
from p2pcloud._store._env import INITIAL_MAP_SIZE, MAX_MAP_SIZE, MIN_MAP_SIZE
from p2pcloud._store.store import (
    MAX_BATCH_BYTES,
    MAX_BATCH_ENVELOPES,
    MAX_CHUNK_BATCH,
    MAX_GC_BATCH,
    SCHEMA_VERSION,
    AppendResult,
    BlobRecord,
    GarbageCollected,
    LoadedState,
    LogRecord,
    LogSummary,
    PeerRecord,
    Store,
    StoreStatistics,
    SubCloudRecord,
    TableStatistics,
    open_store,
)

__all__ = [
    "INITIAL_MAP_SIZE",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_ENVELOPES",
    "MAX_BLOB_CHUNKS",
    "MAX_CHUNK_BATCH",
    "MAX_CHUNK_BYTES",
    "MAX_ENVELOPE_BYTES",
    "MAX_GC_BATCH",
    "MAX_HASH",
    "MAX_MAP_SIZE",
    "MAX_PATHS_PER_PEER",
    "MAX_SNAPSHOT_BYTES",
    "MAX_SUBCLOUD_ID",
    "MIN_HASH",
    "MIN_MAP_SIZE",
    "SCHEMA_VERSION",
    "AppendResult",
    "BlobRecord",
    "GarbageCollected",
    "LoadedState",
    "LogRecord",
    "LogSummary",
    "PeerRecord",
    "Store",
    "StoreStatistics",
    "SubCloudRecord",
    "TableStatistics",
    "open_store",
]
