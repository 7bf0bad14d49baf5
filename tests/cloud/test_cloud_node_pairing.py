"""Short-code pairing between real nodes that find each other by mDNS on loopback."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio

from p2pcloud.cloud._words import WORDS
from p2pcloud.cloud.pairing import parse_code
from p2pcloud.cloud.policy import MODE_FULL
from p2pcloud.errors import JoinFailed
from tests.cloud.node_helpers import GIVE_UP, field, start_nodes, wait_for

LAN = {"discovery": True, "discovery_interfaces": ["127.0.0.1"]}


def wrong_words(code: str) -> str:
    """The same nameplate with different words (a mistyped code)."""
    nameplate, normalized = parse_code(code)
    words = normalized.split("-")[1:]
    # the next word of the list in each place: a valid code that differs in every word
    other = [WORDS[(WORDS.index(w) + 1) % len(WORDS)] for w in words]
    return "-".join([str(nameplate), *other])


async def test_short_code_pairing_over_mdns_then_sync(tmp_path):
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            home, tablet = await start_nodes(stack, tmp_path, ["home", "tablet"], **LAN)
            cid = await home.cloud.found()
            code = await home.cloud.open_pairing(expires_in=120)
            assert await tablet.cloud.pair(code.upper().replace("-", " ")) == cid
            assert tablet.cloud.membership.is_member(tablet.hashname)
            await wait_for(lambda: home.cloud.membership.is_member(tablet.hashname))
            # the code was used: the home box stops advertising it
            await wait_for(lambda: home.cloud._discovery.pairing is None)
            await home.cloud.device.set("notes", "n", "text", "paired")
            await wait_for(lambda: field(tablet, home.cloud.device_id, "notes", "n", "text"))
            assert home.cloud.policy.mode(home.cloud.device_id, tablet.hashname) == MODE_FULL


async def test_a_wrong_code_fails_after_one_attempt(tmp_path):
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            home, intruder, tablet = await start_nodes(
                stack, tmp_path, ["home", "intruder", "tablet"], **LAN)
            await home.cloud.found()
            code = await home.cloud.open_pairing(expires_in=120)
            with pytest.raises(JoinFailed, match="wrong"):
                await intruder.cloud.pair(wrong_words(code))
            assert intruder.cloud.id is None
            assert not home.cloud.membership.is_member(intruder.hashname)
            # one guess burned the code: even the right code no longer works
            await wait_for(lambda: home.cloud._discovery.pairing is None)
            with pytest.raises(JoinFailed):
                await tablet.cloud.pair(code, timeout=3)
            assert tablet.cloud.id is None
            assert len(home.cloud.membership.members()) == 1
