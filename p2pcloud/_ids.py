"""Distinct types for distinct identifiers (STYLE.md section 5).

They are ``NewType`` aliases: free at run time, but mypy keeps a ``Hashname`` from being
passed where a ``ReplicaId`` is expected.
"""

from __future__ import annotations

from typing import NewType

Hashname = NewType("Hashname", str)
"""An endpoint's address: 52 lowercase base32 characters (Telehash v3 hashname)."""

CSID = NewType("CSID", int)
"""A cipher-set id byte, e.g. ``0x3a``."""

ChannelId = NewType("ChannelId", int)
"""A channel id inside one exchange: uint32 >= 1, parity set by the exchange order."""

ReplicaId = NewType("ReplicaId", bytes)
"""One copy of a sub-cloud on one endpoint."""

SubCloudId = NewType("SubCloudId", bytes)
"""A replicated CRDT store owned by a device or a thing."""

CloudId = NewType("CloudId", bytes)
"""One person's cloud."""

HASHNAME_LENGTH = 52  # base32 of a 32-byte SHA-256 digest, unpadded
