"""A finder of another cloud scans a claimed tag: the card, a message, and nothing else."""

from __future__ import annotations

from contextlib import AsyncExitStack

import cbor2
import pytest
import trio

from p2pcloud._node.thinghost import HOST_CHANNEL, read_frame, write_frame
from p2pcloud._node.things import MessageReceived, ThingNotice
from p2pcloud.errors import ThingError
from p2pcloud.things import scan as s
from p2pcloud.things import thing as t
from p2pcloud.things.tags import Tag, render_png
from tests.things.nodes import GIVE_UP, found_and_join, holds, start_nodes, things, wait_for


def _request(**fields: object) -> bytes:
    return cbor2.dumps({"v": 1, **fields})


async def test_finder_reads_the_card_leaves_a_message_and_is_refused_everything_else(tmp_path):
    with trio.fail_after(GIVE_UP):
        async with AsyncExitStack() as stack:
            home, phone, finder = await start_nodes(stack, tmp_path, ["home", "phone", "finder"])
            await found_and_join(home, phone)
            await found_and_join(finder)
            notices: dict[str, list[ThingNotice]] = {"home": [], "phone": []}
            things(home).add_listener(notices["home"].append)
            things(phone).add_listener(notices["phone"].append)

            bike = await things(home).create("bike", card="if found, call 555 0100")
            other = await things(home).create("scale")
            for view in (bike, other):
                claimed = await things(home).scan(things(home).tag(view.hashname).uri())
                assert claimed.action == "claimed"
            await things(home).note(bike.hashname, "serial scratched off the frame")
            tag = things(home).tag(bike.hashname)
            other_tag = things(home).tag(other.hashname)
            await wait_for(lambda: holds(phone, bike.hashname)
                           and things(phone).get(bike.hashname).claimed)

            result = await things(finder).scan(render_png(tag))  # a real QR decode
            assert result.action == "finder" and result.thing is None
            assert result.card == {"text": "if found, call 555 0100"}
            # the finder's node learned no sub-cloud of the owner's cloud
            assert finder.replication is not None
            assert all(sc.kind != "thing" for sc in finder.replication.subclouds.values())

            await things(finder).leave_message(tag, "found it at the station", "555 0199")
            for node, name in ((home, "home"), (phone, "phone")):
                await wait_for(lambda n=node: len(things(n).inbox(bike.hashname)) == 1)
                [msg] = things(node).inbox(bike.hashname)
                assert (msg["text"], msg["contact"], msg["from"]) == (
                    "found it at the station", "555 0199", finder.hashname)
                got = await wait_for(lambda k=name: [n for n in notices[k]
                                                      if isinstance(n, MessageReceived)])
                assert len(got) == 1 and got[0].thing == bike.hashname
                assert got[0].data["text"] == "found it at the station"

            # every other attempt is refused, with its reason, and writes nothing
            cap = tag.secret
            attempts = [
                (_request(op="read", t=bike.hashname, cap=cap, coll="notes"),
                 s.REFUSE_NOT_ALLOWED),
                (_request(op="inbox", t=bike.hashname, cap=cap), s.REFUSE_NOT_ALLOWED),
                (_request(op="list", t=bike.hashname, cap=cap), s.REFUSE_NOT_ALLOWED),
                (_request(op="set_card", t=bike.hashname, cap=cap, text="mine"),
                 s.REFUSE_NOT_ALLOWED),
                (_request(op="card", t=bike.hashname, cap=cap, collection="inbox"),
                 s.REFUSE_FIELD),
                (_request(op="card", t=bike.hashname, cap=cap, doc="notes"), s.REFUSE_FIELD),
                (_request(op="card", t=other.hashname, cap=cap), s.REFUSE_OTHER_THING),
                (_request(op="card", t=bike.hashname, cap=bytes(16)), s.REFUSE_BAD_CAP),
                (_request(op="card", t=bike.hashname), s.REFUSE_NO_CAP),
                (_request(op="claim", t=bike.hashname, secret=bytes(16),
                          cloud=bytes(finder.cloud.id), members=[finder.identity.cs3a_public]),
                 s.REFUSE_SPENT),
                (b"\xff\x00 not cbor", s.REFUSE_MALFORMED),
                (cbor2.dumps({"v": 2, "op": "card", "t": bike.hashname}), s.REFUSE_VERSION),
            ]
            for data, reason in attempts:
                answer = await things(finder).raw_request(tag, data)
                assert answer["ok"] is False and answer["err"] == reason, (data, answer)
            # the other thing: reachable only with its own capability (on its own tag)
            wrong = Tag(other_tag.kind, other_tag.key, other_tag.hashname, cap, tag.paths)
            answer = await things(finder).raw_request(wrong, s.card_request(wrong))
            assert answer == {"v": 1, "ok": False, "err": s.REFUSE_BAD_CAP,
                              "detail": "op 'card'"}
            with pytest.raises(ThingError, match="wrong or outdated finder capability"):
                await things(finder).scan(wrong.uri())
            # the wake channel only wakes; it answers nothing about the cloud
            stream = await finder.open_channel(home.hashname, HOST_CHANNEL)
            await write_frame(stream, cbor2.dumps({"v": 1, "t": "x" * 52, "coll": "inbox"}))
            answer = cbor2.loads(await read_frame(stream, 4096) or b"")
            await stream.aclose()
            assert answer["ok"] is False and "paths" not in answer
            # the owner's things are not served on the owner devices' own hashnames
            with pytest.raises(trio.BrokenResourceError):
                stream = await finder.open_channel(home.hashname, s.CHANNEL_TYPE)
                await write_frame(stream, s.card_request(tag))
                await read_frame(stream, 4096)
            # sub-clouds are not replicated to a stranger that links an owner device
            assert home.replication is not None
            bike_sc = things(home)._find(bike.hashname)
            assert not home.replication.may_read(bike_sc.id, finder.hashname)
            assert all(sc.kind != "thing" for sc in finder.replication.subclouds.values())
            # nothing was written by the refused attempts: one message, the notes intact
            assert len(things(home).inbox(bike.hashname)) == 1
            assert things(home).notes(bike.hashname) == "serial scratched off the frame"
            assert things(home).get(bike.hashname).card == {"text": "if found, call 555 0100"}
            assert len(things(home).inbox(other.hashname)) == 0
            assert bike_sc.replica.get(t.ACCESS, t.ACCESS_DOC, "claim_spent") is True
            refused = sum(v for k, v in things(home).stats.items()
                          if k.startswith("refused: ")) + sum(
                v for k, v in things(phone).stats.items() if k.startswith("refused: "))
            assert refused >= len(attempts) + 1
