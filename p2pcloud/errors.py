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
    """Raised by ``p2pcloud.files`` for a path that must not be synced (``..``, absolute...)."""


# -- things and tags ------------------------------------------------------------------------


class ThingError(P2PCloudError):
    """Base of the errors raised by ``p2pcloud.things`` (things, scans, rules, transfers)."""


class TagImageError(ThingError, ValueError):
    """Raised by ``p2pcloud.things.tags.decode_image`` when an image does not load or holds no
    QR code (a QR code that is not a p2pcloud tag raises :class:`BadURI`)."""


class ClaimRefused(ThingError):
    """Raised by ``p2pcloud.things.scan`` when a claim secret is wrong or already spent, or
    the thing is already claimed; ``reason`` is one of ``p2pcloud.things.scan.REFUSE_*``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        """Record why the claim was refused.

        Args:
            reason: a ``REFUSE_*`` constant of ``p2pcloud.things.scan``.
            detail: free text for logs and the user.
        """
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class RuleError(ThingError, ValueError):
    """Raised by ``p2pcloud.things.rules.parse_rule`` for a rule that does not parse, names an
    unknown event, field or action, or breaks a size or depth limit."""


class TransferError(ThingError):
    """Raised by ``p2pcloud.things.transfer`` when a transfer package or record does not
    verify, or a transfer is asked for something it cannot do."""


# -- the cloud: grants, invites, pairing ------------------------------------------------------


class BadRecord(RemoteProtocolError, ValueError):
    """Raised by ``p2pcloud.cloud.grants.decode_record`` when a grant or revocation is malformed,
    too big, of an unknown version, or its signature does not verify."""


class JoinFailed(P2PCloudError):
    """Raised by ``p2pcloud.cloud.invites`` and ``p2pcloud.cloud.pairing`` when joining a cloud
    fails: a used, expired or unknown invite, a wrong short code, a refused or forged reply.

    ``reason`` is a sentence for the user (say what happened and what to do).
    """

    def __init__(self, reason: str) -> None:
        """Record why the join failed.

        Args:
            reason: the user-facing explanation.
        """
        super().__init__(reason)
        self.reason = reason


# -- sub-clouds in the node -------------------------------------------------------------------


class SubCloudError(P2PCloudError):
    """Base of the errors raised by the node's sub-cloud API (``Node.subcloud``, ``SubCloud``)."""


class UnknownSubCloud(SubCloudError, KeyError):
    """No sub-cloud with that id or name is held by this node."""


class AccessDenied(SubCloudError):
    """This endpoint lacks the rights for the call (a write without write rights, a share by
    an endpoint that does not own the sub-cloud)."""


class SubscriptionLost(SubCloudError):
    """A subscriber fell too far behind and its changes were dropped: re-read the state."""


# -- things on a node --------------------------------------------------------------------------


class UnknownThing(ThingError, KeyError):
    """No thing with that hashname or name is held by this node (``node.things.get``)."""

    def __str__(self) -> str:
        # KeyError quotes its argument; a message for people reads better unquoted
        return str(self.args[0]) if self.args else "unknown thing"


class ThingMoved(ThingError):
    """The thing was handed on to another cloud: the devices a tag names no longer answer for
    it (its new owner prints a new tag)."""
