"""Stateful convergence: three members, partitions, restarts, folds and concurrent writes.

Hypothesis drives three nodes (and maybe a late fourth, which then starts from a snapshot
when the others folded their logs) sharing two sub-clouds through random link ups and downs
(a link down loses the session and everything in flight), restarts (session state lost,
stored logs and checkpoints kept), log folds at the prefix every member holds, and
concurrent writes of every CRDT kind. Whenever it heals the network and lets anti-entropy
run, every replica must equal every other and the reference merge of all writes (a fresh
replica applying every envelope ever written).
"""

from __future__ import annotations

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from p2pcloud._core import Replica
from p2pcloud.sync import SnapshotReceived, fold_point
from p2pcloud.sync.session import ANTI_ENTROPY_INTERVAL
from tests.sync.harness import NOW_MS, FakeNet

NODES = st.integers(0, 2)
WRITERS = st.integers(0, 3)  # 3 is the late joiner once it exists, else node 0..2
SUBCLOUDS = st.integers(0, 1)
KEYS = st.sampled_from(["k1", "k2", "k3"])


class SyncMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.net = FakeNet(seed=99)
        self.nodes = [self.net.add(name) for name in "abc"]
        self.scs = [self.net.subcloud(*self.nodes) for _ in range(2)]
        self.deltas: dict[bytes, list[bytes]] = {sc: [] for sc in self.scs}

    def _pair(self, i: int, j: int) -> tuple[int, int] | None:
        if i == j:
            return None
        return (i, j) if i < j else (j, i)

    def _linked(self, i: int, j: int) -> bool:
        return self.nodes[j].hashname in self.nodes[i].sessions

    @rule(n=WRITERS, s=SUBCLOUDS, key=KEYS, value=st.integers(-5, 5), op=st.integers(0, 4))
    def write(self, n: int, s: int, key: str, value: int, op: int) -> None:
        node, sc = self.nodes[n % len(self.nodes)], self.scs[s]

        def fn(r: Replica) -> None:
            if op == 0:
                r.set("docs", key, "lww", value)
            elif op == 1:
                r.increment("docs", key, "count", value)
            elif op == 2:
                r.set_add("docs", key, "tags", value)
            elif op == 3:
                r.append("readings", value)
            else:
                r.remove("docs", key)
                r.set_mv("docs", key, "mv", value)

        env = node.write(sc, fn)
        self.deltas[sc].append(env.delta)

    @precondition(lambda self: len(self.nodes) == 3)
    @rule(i=NODES)
    def join(self, i: int) -> None:
        """A new member joins a cloud whose members folded what they all hold.

        It is behind every fold, so wherever the others share a prefix it starts from the
        snapshot checkpoint.
        """
        for sc in self.scs:
            point = fold_point([node.replicas[sc].version() for node in self.nodes])
            for node in self.nodes:
                node.fold(sc, point)
        newcomer = self.net.add("d")
        for sc in self.scs:
            newcomer.add_subcloud(sc)
            self.net.writers[sc].add(newcomer.hashname)
        self.nodes.append(newcomer)
        self.net.connect(newcomer, self.nodes[i])

    @rule(i=NODES, j=NODES)
    def link_up(self, i: int, j: int) -> None:
        if self._pair(i, j) and not self._linked(i, j):
            self.net.connect(self.nodes[i], self.nodes[j])

    @rule(i=NODES, j=NODES)
    def link_down(self, i: int, j: int) -> None:
        if self._pair(i, j) and self._linked(i, j):
            self.net.disconnect(self.nodes[i], self.nodes[j])

    @rule(n=NODES)
    def restart(self, n: int) -> None:
        self.nodes[n].restart()

    @rule(steps=st.integers(1, 4))
    def deliver(self, steps: int) -> None:
        for _ in range(steps):
            self.net.step()

    @rule(s=SUBCLOUDS, everyone=st.booleans(), n=NODES)
    def fold(self, s: int, everyone: bool, n: int) -> None:
        """Fold the prefix every member holds: on every member, or on one."""
        sc = self.scs[s]
        point = fold_point([node.replicas[sc].version() for node in self.nodes])
        for node in self.nodes if everyone else [self.nodes[n]]:
            node.fold(sc, point)

    @rule()
    def heal_and_check(self) -> None:
        count = len(self.nodes)
        for i in range(count):
            for j in range(i + 1, count):
                if not self._linked(i, j):
                    self.net.connect(self.nodes[i], self.nodes[j])
        self.net.run()
        self.net.advance(ANTI_ENTROPY_INTERVAL + 1)
        self.net.run()
        for sc in self.scs:
            reference = Replica(b"\x00" * 16)
            reference.apply(self.deltas[sc], NOW_MS)
            expected = reference.encode_snapshot()
            for node in self.nodes:
                assert node.replicas[sc].encode_snapshot() == expected, node.name
                assert node.catalog.version(sc) == reference.version()
            for node in self.nodes:
                for session in node.sessions.values():
                    assert session.in_sync
                    assert session.progress() == {}
                assert not node.rejected

        snapshots = sum(isinstance(e, SnapshotReceived) for node in self.nodes for e in node.events)
        event(f"snapshot bootstraps: {min(snapshots, 1)}")
        event(f"joined: {len(self.nodes) == 4}")
        event(f"folded: {any(n.checkpoints for n in self.nodes)}")

    def teardown(self) -> None:
        self.heal_and_check()


SyncMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
TestSyncConvergence = SyncMachine.TestCase
