"""Things on real nodes (UDP on 127.0.0.1): create, print, scan from a PNG, claim, refuse."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio

from p2pcloud._wire import b32decode, b32encode
from p2pcloud.errors import BadURI, ClaimRefused, ThingError, UnknownThing
from p2pcloud.things import scan as s
from p2pcloud.things.tags import KIND_CLAIMED, Tag, parse_tag, render_png, render_sheet
from tests.things.nodes import GIVE_UP, found_and_join, holds, start_nodes, things, wait_for


async def test_create_print_scan_png_claim_on_phone_seen_on_laptop_second_claim_fails(
        tmp_path):
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            home, phone, laptop = await start_nodes(stack, tmp_path, ["home", "phone", "laptop"])
            await found_and_join(home, phone, laptop)
            view = await things(home).create("bike", make="Acme", model="X1", serial="S-1",
                                             card="if found, call 555 0100")
            assert (view.name, view.make, view.claimed) == ("bike", "Acme", False)
            fresh = things(home).tag(view.hashname)
            assert fresh.is_fresh and fresh.hashname == view.hashname
            # the tag names this cloud's devices as routers (home first)
            assert fresh.paths and fresh.paths[0].type == "router"
            assert fresh.paths[0].key == home.identity.cs3a_public
            # the tag can be printed again, identically, by another owner device
            await wait_for(lambda: holds(laptop, view.hashname))
            assert things(laptop).tag(view.hashname).secret == fresh.secret
            png = render_png(fresh)
            assert png.startswith(b"\x89PNG")

            result = await things(phone).scan(png)  # a real QR decode (zxing-cpp)
            assert result.action == "claimed"
            assert result.thing is not None and result.thing.claimed
            assert result.new_tag is not None and result.new_tag.kind == KIND_CLAIMED
            for node in (home, laptop):
                await wait_for(lambda n=node: holds(n, view.hashname)
                               and things(n).get(view.hashname).claimed)
                assert things(node).get("bike").model == "X1"
            # a second claim with the same tag, from another device of the cloud
            with pytest.raises(ClaimRefused, match="already spent"):
                await things(laptop).scan(fresh.uri())
            claimed = [e for e in things(home).events(view.hashname) if e["type"] == "claimed"]
            await wait_for(lambda: len([e for e in things(laptop).events(view.hashname)
                                        if e["type"] == "claimed"]) == len(claimed))
            assert len(claimed) == 1
            # the owner scanning the claimed tag opens it and records a scanned event
            opened = await things(laptop).scan(render_png(result.new_tag))
            assert opened.action == "opened" and opened.thing is not None
            assert any(e["type"] == "scanned" and e.get("owner") is True
                       for e in things(laptop).events(view.hashname))


async def test_a_fresh_tag_claimed_by_another_cloud_moves_the_thing_there(tmp_path):
    """A maker's cloud prints fresh tags; the buyer's cloud claims one over the network (the
    holder answers with a transfer package); a second claim, from a third cloud, is refused."""
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            maker, buyer, buyer_phone, other = await start_nodes(
                stack, tmp_path, ["maker", "buyer", "buyer_phone", "other"])
            await found_and_join(maker)
            await found_and_join(buyer, buyer_phone)
            await found_and_join(other)
            sheet_tags = await things(maker).fresh_tags(3)
            assert len(sheet_tags) == 3 and all(t.is_fresh for t in sheet_tags)
            sheet = render_sheet(sheet_tags, kind="png")
            assert sheet.startswith(b"\x89PNG")
            tag = sheet_tags[1]
            result = await things(buyer).scan(tag.uri())
            assert result.action == "claimed" and result.thing is not None
            assert result.thing.hashname == tag.hashname
            cloud = buyer.cloud.id
            assert result.thing.owner_cloud == b32encode(cloud)
            await wait_for(lambda: holds(buyer_phone, tag.hashname))
            # the maker's copy is handed on: not listed, and its endpoint answers "moved"
            assert not holds(maker, tag.hashname)
            with pytest.raises(UnknownThing):
                things(maker).get(tag.hashname)
            with pytest.raises(ClaimRefused) as refused:
                await things(other).scan(tag.uri())
            assert refused.value.reason in (s.REFUSE_MOVED, s.REFUSE_SPENT)
            assert not holds(other, tag.hashname)
            # the buyer's devices can now print the claimed tag (with their own routers)
            new_tag = things(buyer_phone).tag(tag.hashname)
            assert new_tag.kind == KIND_CLAIMED and new_tag.hashname == tag.hashname


def _altered(tag: Tag, index: int) -> str:
    body = tag.uri().split(":", 1)[1]
    raw = bytearray(b32decode(body.lower()))
    raw[index] ^= 0x01
    return "P2PCLOUD:" + b32encode(bytes(raw)).upper()


async def test_bad_tags_give_clear_errors_and_change_nothing(tmp_path):
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            home, phone, stranger = await start_nodes(stack, tmp_path,
                                                      ["home", "phone", "stranger"])
            await found_and_join(home, phone)
            await found_and_join(stranger)
            view = await things(home).create("scale")
            fresh = things(home).tag(view.hashname)
            uri = fresh.uri()

            def state() -> tuple[object, ...]:
                v = things(home).get(view.hashname)
                return (v.claimed, len(things(home).events(view.hashname)),
                        len(things(home).list()), len(things(stranger).list()))

            before = state()
            with pytest.raises(BadURI, match="truncated"):
                await things(phone).scan(uri[:60])
            with pytest.raises(BadURI, match="altered"):
                await things(phone).scan(_altered(fresh, 70))  # a byte of the secret
            wrong_version = bytearray(b32decode(uri.split(":", 1)[1].lower()))
            wrong_version[0] = 2
            with pytest.raises(BadURI, match="version"):
                await things(phone).scan("P2PCLOUD:" + b32encode(bytes(wrong_version)).upper())
            other_key = things(home).tag((await things(home).create("other")).hashname)
            foreign = Tag(fresh.kind, other_key.key, fresh.hashname, fresh.secret, fresh.paths)
            with pytest.raises(BadURI):
                foreign.uri()  # our own encoder refuses it; hand-build the bytes instead
            raw = bytearray(b32decode(uri.split(":", 1)[1].lower()))
            raw[2:34] = other_key.key
            import hashlib

            raw[-4:] = hashlib.sha256(b"p2pcloud tag" + bytes(raw[:-4])).digest()[:4]
            with pytest.raises(BadURI, match="foreign key|not the one the key gives"):
                await things(phone).scan("P2PCLOUD:" + b32encode(bytes(raw)).upper())
            with pytest.raises(BadURI, match="not a p2pcloud tag"):
                await things(phone).scan("https://example.com/bike")
            before = (before[0], before[1], before[2] + 1, before[3])  # "other" was made
            assert state() == before
            # a wrong claim secret (a well-formed tag for this thing with another secret)
            forged = Tag(fresh.kind, fresh.key, fresh.hashname, bytes(16), fresh.paths)
            with pytest.raises(ClaimRefused, match="wrong claim secret"):
                await things(stranger).scan(forged.uri())
            assert state() == before
            # the real claim works once; replaying it, from anywhere, is refused
            assert (await things(phone).scan(uri)).action == "claimed"
            await wait_for(lambda: things(home).get(view.hashname).claimed)
            after = state()
            with pytest.raises(ClaimRefused, match="already spent"):
                await things(stranger).scan(uri)
            with pytest.raises(ClaimRefused, match="already spent"):
                await things(home).scan(uri)
            assert state() == after
            assert not holds(stranger, view.hashname)
            parse_tag(uri)  # the genuine tag still parses


async def test_a_manual_attached_on_one_device_is_read_on_another(tmp_path):
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            home, laptop = await start_nodes(stack, tmp_path, ["home", "laptop"])
            await found_and_join(home, laptop)
            modem = await things(home).create("cable modem", make="Acme")
            manual = bytes(range(256)) * 2048  # 512 KiB: several chunks
            (tmp_path / "manual.pdf").write_bytes(manual)
            file_id = await things(home).add_file(modem.hashname, tmp_path / "manual.pdf",
                                                  name="manual.pdf", kind="manual",
                                                  mime="application/pdf")
            await wait_for(lambda: holds(laptop, modem.hashname)
                           and things(laptop).files(modem.hashname))
            [info] = things(laptop).files(modem.hashname)
            assert info == {"id": file_id, "name": "manual.pdf", "kind": "manual",
                            "mime": "application/pdf", "size": len(manual)}
            assert await things(laptop).read_file(modem.hashname, file_id) == manual
            with pytest.raises(ThingError, match="no file"):
                await things(laptop).read_file(modem.hashname, "nope")
