"""Sub-clouds between two real nodes on 127.0.0.1 (UDP + TCP, real LMDB, real crypto)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

import p2pcloud
from p2pcloud._core import BlobRef
from p2pcloud._node.node import Node
from p2pcloud._node.subcloud import Change, SubCloud
from p2pcloud.errors import AccessDenied, UnknownSubCloud

WAIT = 60  # seconds a step may take on a loaded 2-core machine before the test fails


async def wait_for(predicate: Any, what: str) -> None:
    """Poll until ``predicate()`` holds (the failure message says what never happened)."""
    with trio.move_on_after(WAIT):
        while True:
            if predicate():
                return
            await trio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def shared_pair(a: Node, b: Node, rights: str = "write") -> tuple[SubCloud, SubCloud]:
    await a.link(b.link_uri)
    sc_a = await a.create_subcloud("notes")
    await sc_a.share(b.hashname, rights)

    def held() -> bool:
        try:
            b.subcloud(sc_a.id)
        except UnknownSubCloud:
            return False
        return True

    await wait_for(held, "the registry record on B")
    return sc_a, b.subcloud(sc_a.id)


async def test_write_on_one_seen_on_the_other_via_subscribe(tmp_path: Path) -> None:
    async with p2pcloud.open_node(tmp_path / "a") as a, p2pcloud.open_node(tmp_path / "b") as b:
        sc_a, sc_b = await shared_pair(a, b)
        assert sc_b.owner == a.hashname and sc_b.name == "notes"
        changes = sc_b.subscribe()
        await sc_a.put("todo", "t1", {"title": "milk", "done": False})
        got: list[Change] = []
        with trio.fail_after(WAIT):
            async for change in changes:
                got.append(change)
                if sc_b.get("todo", "t1") == {"done": False, "title": "milk"}:
                    break
        assert {(c.collection, c.document) for c in got} == {("todo", "t1")}
        assert all(c.origin == a.hashname for c in got)
        # and back: B has write rights
        await sc_b.set("todo", "t1", "done", True)
        await wait_for(lambda: sc_a.get("todo", "t1") == {"done": True, "title": "milk"},
                       "B's write on A")
        await sc_a.append("events", {"n": 1})
        await sc_a.delete("todo", "t1")
        await wait_for(lambda: sc_b.get("todo", "t1") is None and sc_b.log("events") == [{"n": 1}],
                       "delete and append on B")
        assert sc_b.collections() == [] and sc_a.documents("todo") == []
        await changes.aclose()


async def test_state_survives_restart_and_catches_up(tmp_path: Path) -> None:
    async with p2pcloud.open_node(tmp_path / "a") as a:
        sc = await a.create_subcloud("kv")
        for i in range(50):
            await sc.set("kv", f"k{i}", "v", i)
        sc_id = sc.id
    async with p2pcloud.open_node(tmp_path / "a") as a, p2pcloud.open_node(tmp_path / "b") as b:
        sc = a.subcloud("kv")
        assert sc.id == sc_id and len(sc.documents("kv")) == 50
        assert a.subcloud(sc.id_text) is sc and a.subclouds() == [sc]
        await sc.set("kv", "k50", "v", 50)  # counters continue: no reuse after a restart
        await a.link(b.link_uri)
        await sc.share(b.hashname, "read")
        await wait_for(lambda: any(s.id == sc_id for s in b.subclouds())
                       and len(b.subcloud(sc_id).documents("kv")) == 51, "the backlog on B")
        sc_b = b.subcloud(sc_id)
        assert sc_b.get("kv", "k7") == {"v": 7}
        with pytest.raises(AccessDenied):
            await sc_b.set("kv", "x", "v", 1)  # read rights only
        with pytest.raises(AccessDenied):
            await sc_b.share(a.hashname, "write")  # not the owner


async def test_blob_fetched_on_open(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096 + b"tail"  # ~1 MiB, several chunks
    async with p2pcloud.open_node(tmp_path / "a") as a, p2pcloud.open_node(tmp_path / "b") as b:
        sc_a, sc_b = await shared_pair(a, b)
        ref = await sc_a.add_blob(data)
        assert isinstance(ref, BlobRef) and ref.size == len(data)
        await sc_a.set("photos", "p1", "image", ref)
        await wait_for(lambda: sc_b.get("photos", "p1") is not None, "the reference on B")
        got_ref = sc_b.get_field("photos", "p1", "image")
        with trio.fail_after(WAIT):
            async with sc_b.open_blob(got_ref) as reader:
                assert await reader.read_all() == data
        src = tmp_path / "src.bin"
        src.write_bytes(data[::-1])
        ref2 = await sc_b.add_blob(src)
        with trio.fail_after(WAIT):
            assert await sc_a.open_blob(ref2).read_all() == data[::-1]
        progress = sc_a.progress()
        assert [p.peer for p in progress] == [b.hashname]
