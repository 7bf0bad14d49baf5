"""Lazy replicas: a node opens without loading any, keeps at most its budget loaded, drops
and reloads them with identical content, and nothing is lost (real LMDB, real crypto, real
nodes on 127.0.0.1 for sync). See p2pcloud/_node/subcloud.py, "Lazy replicas"."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import trio
import trio.lowlevel

import p2pcloud
from p2pcloud._node.node import Node
from p2pcloud._node.replication import DERIVED_FILE
from p2pcloud._node.subcloud import SubCloud
from p2pcloud.errors import UnknownSubCloud

WAIT = 60  # seconds a step may take on a loaded 2-core machine before the test fails
COUNT = 8  # sub-clouds per node: more than the budget the tests set
BUDGET = 3


async def wait_for(predicate: Any, what: str) -> None:
    """Poll until ``predicate()`` holds."""
    with trio.move_on_after(WAIT):
        while True:
            if predicate():
                return
            await trio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def loaded(node: Node) -> list[SubCloud]:
    """The sub-clouds whose replica is in memory now."""
    return [sc for sc in node.subclouds() if sc.is_loaded]


def content(sc: SubCloud) -> dict[str, Any]:
    """Everything a reader sees of the sub-cloud's "kv" collection and "events" log."""
    return {"kv": {d: sc.get("kv", d) for d in sc.documents("kv")}, "log": sc.log("events")}


async def fill(node: Node) -> dict[str, dict[str, Any]]:
    """COUNT sub-clouds with distinct content; returns name -> content."""
    out = {}
    for i in range(COUNT):
        sc = await node.create_subcloud(f"s{i}")
        for k in range(5):
            await sc.put("kv", f"d{k}", {"i": i, "k": k})
        await sc.append("events", {"i": i})
        out[sc.name] = content(sc)
    return out


async def test_open_loads_nothing_drops_and_reloads_identically(tmp_path: Path) -> None:
    async with p2pcloud.open_node(tmp_path / "a", tcp_port=None) as a:
        expected = await fill(a)
        snapshots = {sc.name: sc.replica.encode_snapshot() for sc in a.subclouds()}
    async with p2pcloud.open_node(tmp_path / "a", tcp_port=None) as a:
        repl = a.replication
        assert repl is not None
        assert len(a.subclouds()) == COUNT
        assert loaded(a) == []  # the registry and the catalog only
        assert repl.statistics().get("replica loads", 0) == 0
        repl.replica_budget = BUDGET
        for _ in range(2):  # the second pass reloads what the first dropped
            for sc in a.subclouds():
                assert content(sc) == expected[sc.name]
                assert sc.replica.encode_snapshot() == snapshots[sc.name]  # canonical bytes
                assert len(loaded(a)) <= BUDGET
        stats = repl.statistics()
        assert stats["replica drops"] >= COUNT and stats["replica loads"] >= 2 * COUNT - BUDGET
        # writes to every one (each loads it again in a worker thread), then a restart
        for sc in a.subclouds():
            await sc.set("kv", "d0", "after", sc.name)
            expected[sc.name]["kv"]["d0"] = {**expected[sc.name]["kv"]["d0"], "after": sc.name}
            assert len(loaded(a)) <= BUDGET
        versions = {sc.name: sc.version() for sc in a.subclouds()}
    async with p2pcloud.open_node(tmp_path / "a", tcp_port=None) as a:
        assert a.replication is not None
        a.replication.replica_budget = BUDGET
        for sc in a.subclouds():
            assert content(sc) == expected[sc.name]
            assert sc.version() == versions[sc.name]
            # counters continue after drops and restarts: a new write takes the next dot
            await sc.append("events", {"again": True})
            mine = bytes(sc.replica_id)
            assert sc.version()[mine] == versions[sc.name][mine] + 1


async def test_pinned_replicas_stay_loaded(tmp_path: Path) -> None:
    async with p2pcloud.open_node(tmp_path / "a", tcp_port=None) as a:
        await fill(a)
    async with p2pcloud.open_node(tmp_path / "a", tcp_port=None) as a:
        assert a.replication is not None
        a.replication.replica_budget = 1
        first, second, *rest = a.subclouds()
        sub = first.subscribe()  # an open subscription pins
        first.get("kv", "d0")
        with second.pin():
            second.get("kv", "d0")
            for sc in rest:
                sc.get("kv", "d0")
            assert first.is_loaded and second.is_loaded
            assert sum(sc.is_loaded for sc in rest) == 1  # the budget for the unpinned
        await sub.aclose()
        rest[0].get("kv", "d0")  # a load trims again: now nothing pins first or second
        assert not first.is_loaded and not second.is_loaded
        # a held lock (a write or merge in flight) pins too
        async with second.lock:
            await a.replication.loaded(second, locked=True)
            for sc in rest:
                sc.get("kv", "d0")
            assert second.is_loaded


async def test_concurrent_writes_while_others_are_dropped(tmp_path: Path) -> None:
    """Writers on every sub-cloud at once, a reader churning through all of them with a
    budget of 2: every write lands, in memory and after a restart."""
    writes = 15
    async with p2pcloud.open_node(tmp_path / "a", tcp_port=None) as a:
        await fill(a)
    async with p2pcloud.open_node(tmp_path / "a", tcp_port=None) as a:
        assert a.replication is not None
        a.replication.replica_budget = 2
        stale = a.subclouds()[0].replica  # a task holding an object that gets dropped
        assert a.subclouds()[0]._drop()

        async def writer(sc: SubCloud) -> None:
            for n in range(writes):
                await sc.set("w", f"n{n}", "v", n)

        async def churn(done: trio.Event) -> None:
            while not done.is_set():
                for sc in a.subclouds():
                    sc.documents("kv")
                await trio.lowlevel.checkpoint()

        done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(churn, done)
            async with trio.open_nursery() as writers:
                for sc in a.subclouds():
                    writers.start_soon(writer, sc)
            done.set()
        assert a.replication.statistics()["replica drops"] > 0
        first = a.subclouds()[0]
        assert first.documents("w") == sorted(f"n{n}" for n in range(writes))
        assert first.replica is not stale and stale.documents("w") == []  # not written through
        for sc in a.subclouds():
            assert len(sc.documents("w")) == writes
    async with p2pcloud.open_node(tmp_path / "a", tcp_port=None) as a:
        for sc in a.subclouds():
            assert [sc.get_field("w", f"n{n}", "v") for n in range(writes)] == list(range(writes))


async def test_sync_of_dropped_subclouds_from_a_peer(tmp_path: Path) -> None:
    async with p2pcloud.open_node(tmp_path / "a") as a, p2pcloud.open_node(tmp_path / "b") as b:
        assert a.replication is not None and b.replication is not None
        b.replication.replica_budget = 2
        await a.link(b.link_uri)
        scs = []
        for i in range(COUNT):
            sc = await a.create_subcloud(f"s{i}")
            await sc.share(b.hashname, "write")
            await sc.put("kv", "d", {"i": i})
            scs.append(sc)

        def caught_up() -> bool:
            # the catalog says what B stored: no replica load to find out
            return all(b.replication.catalog.version(sc.id)  # type: ignore[union-attr]
                       == a.replication.catalog.version(sc.id) for sc in scs)  # type: ignore[union-attr]

        await wait_for(caught_up, "every sub-cloud on B")
        # merged within the budget (plus any a merge still pinned at the last trim)
        assert b.replication.statistics()["replica drops"] > 0
        # drop them all on B, then A writes to each: B loads each to merge it
        for sc in scs:
            b_sc = b.subcloud(sc.id)
            assert b_sc.get("kv", "d") == {"i": int(sc.name[1:])}
        for sc in b.subclouds():
            sc._drop()
        assert loaded(b) == []
        for sc in scs:
            await sc.set("kv", "d", "more", sc.name)
        await wait_for(caught_up, "the new writes on B")
        for sc in scs:
            assert b.subcloud(sc.id).get("kv", "d") == {"i": int(sc.name[1:]), "more": sc.name}
        # and B writes into a dropped one: A gets it
        target = b.subcloud(scs[3].id)
        target._drop()
        await target.append("events", {"from": "b"})
        await wait_for(lambda: scs[3].log("events") == [{"from": "b"}], "B's append on A")


async def test_restart_with_a_stale_derived_cache(tmp_path: Path) -> None:
    """Things list at open from the persisted derived values (no thing replica loaded);
    a cache older than the store is detected (fingerprint) and recomputed."""
    async with p2pcloud.open_node(tmp_path / "a", tcp_port=None) as a:
        assert a.cloud is not None and a.things is not None
        await a.cloud.found()
        views = [await a.things.create(f"thing {i}") for i in range(4)]
    old_cache = tmp_path / "old.cbor"
    shutil.copy(tmp_path / "a" / DERIVED_FILE, old_cache)
    async with p2pcloud.open_node(tmp_path / "a", tcp_port=None) as a:
        assert a.things is not None and a.replication is not None
        things = [sc for sc in a.subclouds() if sc.kind == "thing"]
        assert len(things) == 4 and not any(sc.is_loaded for sc in things)
        assert [v.name for v in a.things.list()] == [f"thing {i}" for i in range(4)]
        assert not any(sc.is_loaded for sc in things)  # listed from the derived values
        await a.things.rename(views[1].hashname, "renamed")
    shutil.copy(old_cache, tmp_path / "a" / DERIVED_FILE)  # as if the last save was lost
    async with p2pcloud.open_node(tmp_path / "a", tcp_port=None) as a:
        assert a.things is not None
        names = sorted(v.name for v in a.things.list())
        assert names == sorted(["thing 0", "renamed", "thing 2", "thing 3"])
        assert a.things.get(views[1].hashname).name == "renamed"
    (tmp_path / "a" / DERIVED_FILE).write_bytes(b"\xff damaged")
    async with p2pcloud.open_node(tmp_path / "a", tcp_port=None) as a:
        assert a.things is not None
        assert len(a.things.list()) == 4
        try:
            a.subcloud("no such sub-cloud")
        except UnknownSubCloud:
            pass
        else:
            raise AssertionError("an unknown name must raise")
