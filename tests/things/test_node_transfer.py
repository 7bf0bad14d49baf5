"""Handing a thing on between two clouds of real nodes, with its history or a part of it."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio

from p2pcloud.errors import ThingError, TransferError, UnknownThing
from p2pcloud.things import thing as t
from p2pcloud.things.transfer import transfer_records
from tests.things.nodes import GIVE_UP, found_and_join, holds, start_nodes, things, wait_for


async def test_transfer_moves_the_history_ends_old_access_and_the_tag_keeps_working(tmp_path):
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            a_home, a_phone, b_home, b_laptop, finder = await start_nodes(
                stack, tmp_path, ["a_home", "a_phone", "b_home", "b_laptop", "finder"])
            await found_and_join(a_home, a_phone)
            await found_and_join(b_home, b_laptop)
            await found_and_join(finder)
            bike = await things(a_home).create("bike", make="Acme", card="call Ann")
            old_tag = (await things(a_home).scan(things(a_home).tag(bike.hashname).uri())
                       ).new_tag
            assert old_tag is not None
            for i in range(5):
                await things(a_home).add_reading(bike.hashname, {"value": i, "unit": "km"})
            await things(a_home).note(bike.hashname, "new chain in May")
            await things(finder).leave_message(old_tag, "it was in my garden")
            # a transfer copies what the sending device holds: let the phone catch up
            await wait_for(lambda: holds(a_phone, bike.hashname)
                           and len(things(a_phone).readings(bike.hashname)) == 5
                           and len(things(a_phone).inbox(bike.hashname)) == 1
                           and things(a_phone).notes(bike.hashname))
            old_sc = things(a_phone)._find(bike.hashname)

            target = things(b_laptop).transfer_target()
            with pytest.raises(TransferError, match="not a transfer target"):
                await things(a_phone).transfer(bike.hashname, "P2PCLOUD:NOPE")
            with pytest.raises(TransferError, match="cannot transfer"):
                await things(a_phone).transfer(bike.hashname, target, history="profile,keys")
            await things(a_phone).transfer(bike.hashname, target)
            # the target was single use
            with pytest.raises(TransferError, match="refused"):
                other = await things(a_home).create("lamp")
                await things(a_home).transfer(other.hashname, target)

            # the new owner's devices have the thing with its whole history
            for node in (b_laptop, b_home):
                await wait_for(lambda n=node: holds(n, bike.hashname)
                               and len(things(n).readings(bike.hashname)) == 5)
                view = things(node).get(bike.hashname)
                assert (view.name, view.make, view.claimed) == ("bike", "Acme", True)
                assert view.owner_cloud is not None
                assert things(node).notes(bike.hashname) == "new chain in May"
                assert [m["text"] for m in things(node).inbox(bike.hashname)] == [
                    "it was in my garden"]
                assert [r["value"] for r in things(node).readings(bike.hashname)] == [
                    0, 1, 2, 3, 4]
            new_sc = things(b_home)._find(bike.hashname)
            assert new_sc.id != old_sc.id
            # the receiving device (the laptop) wrote the record; the home box syncs it
            [record] = await wait_for(lambda: transfer_records(new_sc.replica))
            assert record.old_subcloud == old_sc.id and record.new_subcloud == new_sc.id

            # the old owner's access ended on every device
            for node in (a_home, a_phone):
                await wait_for(lambda n=node: not holds(n, bike.hashname))
                with pytest.raises(UnknownThing):
                    await things(node).add_reading(bike.hashname, {"value": 99})
                assert node.replication is not None
                assert new_sc.id not in node.replication.subclouds
                sc = node.replication.subclouds[old_sc.id]
                assert sc.replica.get(t.ACCESS, t.ACCESS_DOC, "ended") is True
                assert sc.replica.documents(t.KEYS) == []

            # the new owner keeps writing; nothing of it reaches the old owner
            await things(b_laptop).add_reading(bike.hashname, {"value": 5, "unit": "km"})
            await wait_for(lambda: len(things(b_home).readings(bike.hashname)) == 6)
            for node in (a_home, a_phone):
                assert new_sc.id not in node.replication.subclouds
                assert len(node.replication.subclouds[old_sc.id].log(t.READINGS)) == 5

            # the printed tag keeps working for the new owner: their scan opens the thing
            opened = await things(b_home).scan(old_tag.uri())
            assert opened.action == "opened" and opened.thing is not None
            assert opened.thing.hashname == bike.hashname
            # a finder with the old tag reaches the old owner's devices only: "moved"
            with pytest.raises(ThingError, match="moved"):
                await things(finder).scan(old_tag.uri())
            # the new owner's tag names their devices; a finder reads the card there
            new_tag = things(b_home).tag(bike.hashname)
            assert new_tag.secret != old_tag.secret
            seen = await things(finder).scan(new_tag.uri())
            assert seen.action == "finder" and seen.card == {"text": "call Ann"}


async def test_transfer_of_a_chosen_part(tmp_path):
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            seller, buyer = await start_nodes(stack, tmp_path, ["seller", "buyer"])
            await found_and_join(seller)
            await found_and_join(buyer)
            lamp = await things(seller).create("lamp", serial="L-7")
            await things(seller).scan(things(seller).tag(lamp.hashname).uri())
            await things(seller).add_reading(lamp.hashname, {"value": 3})
            await things(seller).note(lamp.hashname, "private note")
            await things(seller).transfer(lamp.hashname, things(buyer).transfer_target(),
                                          history="profile,readings")
            view = things(buyer).get(lamp.hashname)
            assert view.serial == "L-7"
            assert [r["value"] for r in things(buyer).readings(lamp.hashname)] == [3]
            assert things(buyer).notes(lamp.hashname) == ""
            assert not holds(seller, lamp.hashname)
