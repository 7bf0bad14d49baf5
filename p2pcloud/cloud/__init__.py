"""A person's cloud: founding, grants and revocation, invites, short-code pairing, policy.

Pure (DESIGN.md section 3): no I/O, no clock, no trio; ``now`` and ``entropy`` come in.
docs/cloud.md describes the records, the chain check and the join protocols.

* :mod:`p2pcloud.cloud.grants`: signed grant and revocation records.
* :mod:`p2pcloud.cloud.membership`: who is a member with which rights (a function of the
  record set), revocation cutoffs, and the records' home in the cloud sub-cloud.
* :mod:`p2pcloud.cloud.invites`: ``p2pcloud:`` invite URIs, QR codes, the invite join.
* :mod:`p2pcloud.cloud.pairing`: pairing by a short typed code (SPAKE2).
* :mod:`p2pcloud.cloud.policy`: replication policy per member and sub-cloud.
"""

from __future__ import annotations
