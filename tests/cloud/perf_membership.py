"""How long Membership takes on a big cloud: ``.venv/bin/python -m tests.cloud.perf_membership``.

Not a test (no timing is asserted anywhere); it prints the figure quoted in docs/cloud.md:
a founder, 5 admins, 2,000 things each granted one sub-cloud, and 500 revocations.
"""

from __future__ import annotations

import time

from p2pcloud.cloud.grants import found_cloud, issue_grant
from p2pcloud.cloud.membership import Membership
from tests.cloud.helpers import entropy_from, identity

THINGS = 2000
REVOKED = 500


def main() -> None:
    """Build the records, then time one Membership over all of them (bytes in)."""
    ent = entropy_from("perf")
    founder = identity("perf founder")
    founding = found_cloud(founder, now=1000, entropy=ent)
    admins = [identity(f"perf admin {i}") for i in range(5)]
    records = [founding] + [
        issue_grant(founder, founding.cloud, subject_key=a.cs3a_public,
                    subject_verify_key=a.verify_key, role="admin", rights={"*": ["all"]},
                    not_before=1000, expires=None, entropy=ent)
        for a in admins
    ]
    things = [identity(f"perf thing {i}") for i in range(THINGS)]
    for i, thing in enumerate(things):
        records.append(issue_grant(
            admins[i % 5], founding.cloud, subject_key=thing.cs3a_public,
            subject_verify_key=thing.verify_key, role="thing",
            rights={bytes([i % 256]) * 16: ["read", "write"]}, not_before=1000, expires=None,
            entropy=ent,
        ))
    ms = Membership(founding.cloud, records, now=2000)
    revocations = [ms.revoke(founder, t.hashname, accepted={}, entropy=ent)
                   for t in things[:REVOKED]]
    raws = [r.raw for r in records] + [r.raw for r in revocations]
    t0 = time.perf_counter()
    result = Membership(founding.cloud, raws, now=2000)
    elapsed = time.perf_counter() - t0
    print(f"{len(raws)} records ({REVOKED} revocations): {elapsed:.3f} s, "
          f"{len(result.members())} members")


if __name__ == "__main__":
    main()
