"""The pure replication engine: signed deltas, reconciliation and the per-peer sync session.

No I/O, no clock, no trio, no lmdb (DESIGN.md section 3): the node's shell feeds bytes and
``now`` in, answers the session's storage requests, and sends what comes out.
docs/sync.md describes the protocol.

* :mod:`p2pcloud.sync.envelope`: seal and open signed deltas (``DeltaRejected`` with a reason).
* :mod:`p2pcloud.sync.catalog`: the in-memory per sub-cloud facts the sessions read;
  :func:`fold_point`.
* :mod:`p2pcloud.sync.reconcile`: range-based set reconciliation over many sub-clouds.
* :mod:`p2pcloud.sync.messages`: the channel's CBOR messages and framing.
* :mod:`p2pcloud.sync.session`: :class:`SyncSession` and its events.
"""

from __future__ import annotations

from p2pcloud.sync.catalog import Catalog, fold_point, version_digest
from p2pcloud.sync.envelope import Envelope, decode_envelope, open_envelope, replica_id_for, seal
from p2pcloud.sync.session import (
    EnvelopesReceived,
    EnvelopesWanted,
    MessageDropped,
    PeerVersionLearned,
    Progress,
    Reconciled,
    SessionFailed,
    SnapshotReceived,
    SnapshotWanted,
    SubCloudUnknownToPeer,
    SyncEvent,
    SyncSession,
)

__all__ = [
    "Catalog",
    "Envelope",
    "EnvelopesReceived",
    "EnvelopesWanted",
    "MessageDropped",
    "PeerVersionLearned",
    "Progress",
    "Reconciled",
    "SessionFailed",
    "SnapshotReceived",
    "SnapshotWanted",
    "SubCloudUnknownToPeer",
    "SyncEvent",
    "SyncSession",
    "decode_envelope",
    "fold_point",
    "open_envelope",
    "replica_id_for",
    "seal",
    "version_digest",
]
