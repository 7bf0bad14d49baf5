"""Shared helpers for the things tests: seeded entropy, devices, a cloud holding a thing."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from p2pcloud._core import Replica
from p2pcloud._crypto import LocalIdentity
from p2pcloud._ids import CloudId, Hashname
from p2pcloud.sync.envelope import replica_id_for
from p2pcloud.things import thing as t

NOW = 1_780_000_000_000  # a fixed wall clock (ms) for deterministic tests


class SeededEntropy:
    """Deterministic ``entropy(n)``: SHA-256 in counter mode over a seed."""

    def __init__(self, seed: bytes | str) -> None:
        self.seed = seed.encode() if isinstance(seed, str) else seed
        self.counter = 0

    def __call__(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            self.counter += 1
            out += hashlib.sha256(self.seed + self.counter.to_bytes(8, "big")).digest()
        return out[:n]


@dataclass
class Cloud:
    """A cloud for tests: an id and its member devices."""

    id: CloudId
    devices: list[LocalIdentity]

    @property
    def members(self) -> dict[Hashname, bytes]:
        return {d.hashname: d.cs3a_public for d in self.devices}


def make_cloud(name: str, n: int = 2) -> Cloud:
    entropy = SeededEntropy("cloud " + name)
    return Cloud(CloudId(entropy(16)), [LocalIdentity.generate(entropy) for _ in range(n)])


def replica_for(thing_subcloud: bytes, device: LocalIdentity) -> Replica:
    return Replica(replica_id_for(thing_subcloud, device.hashname))


def make_thing(cloud: Cloud, entropy: SeededEntropy | None = None, name: str = "bike"
               ) -> tuple[t.NewThing, Replica, bytes]:
    """A new thing held by ``cloud``: its layout written by the cloud's first device."""
    entropy = entropy or SeededEntropy("thing " + name)
    new = t.new_thing(entropy)
    replica = replica_for(new.subcloud, cloud.devices[0])
    delta = t.create_layout(replica, new, name=name, make="Acme", model="X1", serial="S-1",
                            cloud=cloud.id, members=cloud.members, entropy=entropy,
                            now_ms=NOW)
    return new, replica, delta
