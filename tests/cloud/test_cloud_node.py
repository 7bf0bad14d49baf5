"""The cloud on real nodes (UDP on 127.0.0.1): found, invite (QR), join, members, restart."""

from __future__ import annotations

import io
import os
import stat
from contextlib import AsyncExitStack
from dataclasses import replace

import pytest
import trio
import zxingcpp
from PIL import Image

from p2pcloud._node.cloud import CLOUD_FILE, INVITES_FILE
from p2pcloud._node.node import open_node
from p2pcloud.cloud.invites import format_invite, invite_qr_png, parse_invite
from p2pcloud.cloud.membership import cloud_subcloud_id
from p2pcloud.errors import BadURI, JoinFailed, LocalProtocolError
from tests.cloud.node_helpers import GIVE_UP, field, found_and_join, start_nodes, wait_for


async def test_found_makes_the_cloud_its_subcloud_and_a_device_subcloud(tmp_path):
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            (home,) = await start_nodes(stack, tmp_path, ["home"])
            cloud = home.cloud
            assert cloud is not None and cloud.id is None and cloud.members() == []
            cid = await cloud.found()
            assert cloud.id == cid
            assert cloud.subcloud is not None and cloud.subcloud.id == cloud_subcloud_id(cid)
            assert cloud.subcloud.kind == "cloud"
            assert cloud.device is not None and cloud.device.owner == home.hashname
            [me] = cloud.members()
            assert (me.hashname, me.role, me.this_device, me.revoked) == (
                home.hashname, "admin", True, False)
            with pytest.raises(LocalProtocolError, match="already in cloud"):
                await cloud.found()
            mode = stat.S_IMODE(os.stat(tmp_path / "home" / CLOUD_FILE).st_mode)
            assert mode == 0o600


async def test_join_by_invite_decoded_from_its_qr_png_then_data_flows(tmp_path):
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            home, laptop = await start_nodes(stack, tmp_path, ["home", "laptop"])
            assert home.cloud is not None and laptop.cloud is not None
            cid = await home.cloud.found()
            text = await home.cloud.invite(expires_in=600)
            assert stat.S_IMODE(os.stat(tmp_path / "home" / INVITES_FILE).st_mode) == 0o600
            # the laptop "scans" the QR code: PNG -> a real QR decoder -> the invite text
            [result] = zxingcpp.read_barcodes(Image.open(io.BytesIO(invite_qr_png(text))))
            assert result.format == zxingcpp.BarcodeFormat.QRCode
            assert await laptop.cloud.join(result.text) == cid
            assert laptop.cloud.id == cid
            assert laptop.cloud.membership.is_member(laptop.hashname)
            # the cloud sub-cloud and the founder's device sub-cloud replicate to the member
            await home.cloud.device.set("notes", "n1", "text", "from home")
            await laptop.cloud.device.set("notes", "n2", "text", "from laptop")
            home_dev, laptop_dev = home.cloud.device_id, laptop.cloud.device_id
            await wait_for(lambda: field(laptop, home_dev, "notes", "n1", "text"))
            await wait_for(lambda: field(home, laptop_dev, "notes", "n2", "text"))
            assert laptop.cloud.subcloud is not None
            views = {m.hashname: m for m in home.cloud.members()}
            assert views[laptop.hashname].role == "device"
            assert views[laptop.hashname].online
            assert views[laptop.hashname].path is not None
            assert views[laptop.hashname].rights == {"*": ["read", "write"]}
            # the laptop is a device, not an admin: it cannot invite or revoke
            with pytest.raises(LocalProtocolError, match="admin"):
                await laptop.cloud.invite()
            with pytest.raises(LocalProtocolError, match="admin"):
                await laptop.cloud.revoke(home.hashname)


async def test_a_used_invite_and_an_expired_invite_fail_clearly(tmp_path):
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            home, a, b = await start_nodes(stack, tmp_path, ["home", "a", "b"])
            await home.cloud.found()
            text = await home.cloud.invite()
            await a.cloud.join(text)
            with pytest.raises(JoinFailed, match="already used"):
                await b.cloud.join(text)
            assert b.cloud.id is None
            short = await home.cloud.invite(expires_in=1)
            await trio.sleep(1.5)  # let the one-second invite expire (not a timing claim)
            with pytest.raises(BadURI, match="expired"):
                await b.cloud.join(short)
            assert b.cloud.id is None


async def test_listeners_hear_a_new_member(tmp_path):
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            home, phone = await start_nodes(stack, tmp_path, ["home", "phone"])
            await home.cloud.found()
            heard = []
            home.cloud.add_listener(lambda: heard.append(len(home.cloud.membership.members())))
            await phone.cloud.join(await home.cloud.invite())
            assert 2 in heard


async def test_the_cloud_survives_a_restart_and_members_relink_by_remembered_paths(tmp_path):
    with trio.fail_after(GIVE_UP):
        async with open_node(tmp_path / "home", port=0, tcp_port=None) as home:
            async with open_node(tmp_path / "phone", port=0, tcp_port=None) as phone:
                cid = await found_and_join(home, phone)
                phone_dev = phone.cloud.device_id
            # the phone comes back on another port: the home box does not know it, the
            # phone re-links by the path it remembered for the home box
            async with open_node(tmp_path / "phone", port=0, tcp_port=None) as phone:
                assert phone.cloud.id == cid
                assert phone.cloud.device_id == phone_dev
                assert phone.cloud.membership.is_member(phone.hashname)
                await phone.cloud.device.set("notes", "after", "text", "restarted")
                await wait_for(lambda: field(home, phone_dev, "notes", "after", "text"))


async def test_an_invite_used_before_a_restart_stays_used(tmp_path):
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            a, b = await start_nodes(stack, tmp_path, ["a", "b"])
            async with open_node(tmp_path / "home", port=0, tcp_port=None) as home:
                await home.cloud.found()
                text = await home.cloud.invite()
                await a.cloud.join(text)
            # the home box restarts (on another port): the replayed invite names its old
            # path, so b links by the path it is given and is told the invite was used
            async with open_node(tmp_path / "home", port=0, tcp_port=None) as home:
                assert home.cloud.membership.is_member(a.hashname)
                used = text_with_paths(text, home)
                with pytest.raises(JoinFailed, match="already used"):
                    await b.cloud.join(used)
                assert b.cloud.id is None


def text_with_paths(text, node):
    """The same invite (same secret) carrying the node's current paths."""
    invite = parse_invite(text)
    return format_invite(replace(invite, paths=tuple(
        p for p in node.link_json["paths"] if p["type"] == "udp4")))
