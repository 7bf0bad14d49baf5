"""Replication policy on real nodes: hidden sub-clouds never reach a member; an on-demand
member fetches blobs only when it reads them, a full member fetches them at once."""

from __future__ import annotations

import os
from contextlib import AsyncExitStack

import pytest
import trio

from p2pcloud.cloud.policy import MODE_HIDDEN, MODE_ON_DEMAND
from p2pcloud.errors import LocalProtocolError
from tests.cloud.node_helpers import GIVE_UP, field, held, start_nodes, wait_for


async def test_a_hidden_subcloud_never_reaches_that_member(tmp_path):
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            home, phone, laptop = await start_nodes(stack, tmp_path, ["home", "phone", "laptop"])
            await home.cloud.found()
            secret = await home.create_subcloud("secret")
            await home.cloud.set_policy(phone.hashname, secret.id, MODE_HIDDEN)
            assert home.cloud.policy.mode(secret.id, phone.hashname) == MODE_HIDDEN
            await secret.set("keys", "k1", "value", "for the laptop only")
            await phone.cloud.join(await home.cloud.invite())
            await laptop.cloud.join(await home.cloud.invite())
            await wait_for(lambda: field(laptop, secret.id, "keys", "k1", "value"))
            # the laptop holds the secret sub-cloud and the same policy: it never forwards
            # it to the phone either; the phone and the laptop link and sync other data
            await wait_for(lambda: laptop.cloud.policy.mode(secret.id, phone.hashname)
                           == MODE_HIDDEN)
            await wait_for(lambda: laptop.hashname in phone.links)
            await laptop.cloud.device.set("notes", "marker", "text", "after the secret")
            await wait_for(lambda: field(phone, laptop.cloud.device_id, "notes", "marker", "text"))
            await secret.set("keys", "k2", "value", "later")
            await wait_for(lambda: field(laptop, secret.id, "keys", "k2", "value"))
            await home.cloud.device.set("notes", "marker", "text", "after k2")
            await wait_for(lambda: field(phone, home.cloud.device_id, "notes", "marker", "text"))
            assert held(phone, secret.id) is None
            assert not home.replication.may_read(secret.id, phone.hashname)
            assert not laptop.replication.may_read(secret.id, phone.hashname)
            assert laptop.replication.may_read(secret.id, home.hashname)


async def test_on_demand_member_fetches_a_blob_when_read_full_member_at_once(tmp_path):
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            home, phone, box = await start_nodes(stack, tmp_path, ["home", "phone", "box"])
            await home.cloud.found()
            photos = await home.create_subcloud("photos")
            await home.cloud.set_policy(phone.hashname, photos.id, MODE_ON_DEMAND)
            data = os.urandom(300_000)
            ref = await photos.add_blob(data)
            await photos.set("photos", "p1", "image", ref)
            await phone.cloud.join(await home.cloud.invite())
            await box.cloud.join(await home.cloud.invite())
            assert home.cloud.policy.fetches_on_read(photos.id, phone.hashname)
            assert home.cloud.policy.keeps_full(photos.id, box.hashname)
            # the box (full, the default) fetches the blob without anyone reading it
            await wait_for(lambda: box.replication.store.get_blob(ref.hash) is not None
                           and not box.replication.store.missing_chunks(ref.hash))
            # the phone has the document (the reference) but not the content ...
            await wait_for(lambda: field(phone, photos.id, "photos", "p1", "image"))
            await wait_for(lambda: phone.cloud.policy.fetches_on_read(photos.id, phone.hashname))
            assert phone.replication.store.get_blob(ref.hash) is None
            # ... until it opens it
            got = await phone.subcloud(photos.id).open_blob(ref).read_all()
            assert got == data


async def test_only_an_admin_sets_policy_and_modes_are_checked(tmp_path):
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            home, phone = await start_nodes(stack, tmp_path, ["home", "phone"])
            await home.cloud.found()
            await phone.cloud.join(await home.cloud.invite())
            with pytest.raises(LocalProtocolError, match="mode"):
                await home.cloud.set_policy(phone.hashname, "*", "sometimes")
            await wait_for(lambda: phone.cloud.subcloud is not None)
            with pytest.raises(LocalProtocolError, match="admin"):
                await phone.cloud.set_policy(phone.hashname, "*", MODE_HIDDEN)
