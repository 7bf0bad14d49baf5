"""The one error tree of p2pcloud.

Every exception that p2pcloud raises on purpose derives from :class:`P2PCloudError`.
Library errors (cbor2, nacl, lmdb, OS errors) are translated where they enter, with
``raise ... from exc``, so callers need to know only this module.
"""

from __future__ import annotations


class P2PCloudError(Exception):
    """Base of every error p2pcloud raises on purpose."""


# -- protocol ----------------------------------------------------------------------------


class LocalProtocolError(P2PCloudError):
    """Raised when the local application asks for something the protocol forbids."""


class RemoteProtocolError(P2PCloudError):
    """Raised when a peer broke the protocol."""


class MalformedPacket(RemoteProtocolError, ValueError):
    """Raised by every decoder when bytes do not parse or break a size limit."""


class HandshakeFailed(RemoteProtocolError):
    """Raised by the exchange when a handshake does not decrypt or does not verify."""


class ChannelError(P2PCloudError):
    """Raised on a channel that the peer or a timeout closed with an error."""


class LinkError(P2PCloudError):
    """Raised when a link cannot be made or went down while it was needed."""


# -- identity and keys -------------------------------------------------------------------


class KeyFileError(P2PCloudError):
    """Raised when a key file is missing, corrupt, or of an unknown version."""


class WrongPassphrase(KeyFileError):
    """Raised when a sealed key file does not open with the passphrase given."""


class BadURI(P2PCloudError, ValueError):
    """Raised when a link URI, an invite or a tag URI does not parse or is of a wrong version."""


# -- CRDT core ---------------------------------------------------------------------------


class CoreError(P2PCloudError):
    """Base of the errors raised by the CRDT merge core."""


class DecodeError(CoreError, ValueError):
    """Raised by the core when an encoded delta or snapshot is malformed; nothing changes."""


class ClockSkewError(CoreError):
    """Raised when a remote hybrid logical clock is too far ahead of the local one."""


class CoreUsageError(CoreError):
    """Raised when the local application misuses a core object (wrong type for a field...)."""


# -- storage ------------------------------------------------------------------------------


class StoreError(P2PCloudError):
    """Raised when the LMDB store fails; wraps ``lmdb.Error``."""


class StoreUsageError(StoreError, ValueError):
    """Raised by the store on a wrong type or a broken size limit; nothing is written."""


class StoreFull(StoreError):
    """Raised by the store when its map hit its size cap or the disk is full; nothing written."""


# -- sync -----------------------------------------------------------------------------------


class DeltaRejected(RemoteProtocolError):
    """Raised by ``p2pcloud.sync.envelope.open_envelope`` when a signed delta must not be applied.

    ``reason`` is one of the ``p2pcloud.sync.envelope.REJECT_*`` strings (forged signature,
    key binding, write rights, unknown sub-cloud, replica id mismatch, malformed).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        """Record why the delta was refused.

        Args:
            reason: a ``REJECT_*`` constant of ``p2pcloud.sync.envelope``.
            detail: free text for logs.
        """
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# -- blobs and folder sync ------------------------------------------------------------------


class BlobError(P2PCloudError):
    """Base of the errors raised by ``p2pcloud.blobs`` and ``p2pcloud.files``."""


class BadManifest(BlobError, ValueError):
    """Raised by ``p2pcloud.blobs.decode_manifest`` when manifest bytes are malformed or too big."""


class UnsafePath(BlobError, ValueError):
    """Raised by ``p2pcloud.files`` for a path that must not be synced (``..``, absolute, unsafe)."""
