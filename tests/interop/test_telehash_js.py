"""Interop with telehash-js 0.4.18 (the v3 reference implementation) as a real peer.

The JS meshes run under Node on 127.0.0.1; our node uses real UDP (and TCP) sockets. These
tests need node and npm (``conftest.py`` installs telehash-js from the shared recipe).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pcloud._crypto import LocalIdentity
from p2pcloud._framing import Framing
from p2pcloud._node.node import open_node
from p2pcloud._node.stream import ChannelStream
from tests.interop.conftest import JS_DIR, SHARED_RECIPE, open_js

pytestmark = pytest.mark.interop

SERVER_JS = SHARED_RECIPE / "scripts" / "server.js"  # the shared recipe's mesh with "echo"
PEER_JS = JS_DIR / "peer.js"  # ours: any role, prints what it sees
LINK_WAIT = 30  # seconds: a link to a local JS mesh takes about 25 ms; this is only a guard


def js_link_json(info: dict[str, Any], kind: str = "udp4") -> dict[str, Any]:
    """Link JSON for a JS mesh from what it printed (``{hashname, keys, port|paths}``)."""
    if "paths" in info:
        paths = [p for p in info["paths"] if p.get("type") == kind]
    else:
        paths = [{"type": kind, "ip": "127.0.0.1", "port": info["port"]}]
    return {"keys": info["keys"], "paths": paths}


async def echo_server(stream: ChannelStream) -> None:
    """Our side of an ``echo`` channel, behaving like the shared server.js."""
    while True:
        try:
            packet = await stream.receive_packet()
        except trio.EndOfChannel:
            await stream.send_eof()
            return
        await stream.send_packet(packet.body, json={"echo": packet.json.get("msg")})


async def test_we_link_to_js_and_use_echo_both_ways(telehash_js: Path) -> None:
    async with open_js(telehash_js, SERVER_JS, "3a") as js, open_node(
        identity=LocalIdentity.generate(os.urandom), tcp_port=None
    ) as node:
        info = await js.first_line()
        with trio.fail_after(LINK_WAIT):
            hashname = await node.link(js_link_json(info))
        assert hashname == info["hashname"]  # the same v3 hashname on both sides

        # A reliable custom channel with data both ways (JS echoes msg and body back).
        stream = await node.open_channel(
            hashname, "echo", json={"msg": "hello from python"}, body=b"\x00\x01binary"
        )
        with trio.fail_after(LINK_WAIT):
            first = await stream.receive_packet()
            assert first.json.get("echo") == "hello from python"
            assert first.body == b"\x00\x01binary"
            for i in range(20):
                payload = bytes([i]) * (100 + 37 * i)
                await stream.send_packet(payload, json={"msg": f"n{i}"})
                reply = await stream.receive_packet()
                assert reply.json.get("echo") == f"n{i}" and reply.body == payload
            await stream.send_eof()
            assert await stream.receive_some() == b""  # JS answered end with end
        await stream.aclose()
        assert node.statistics().dropped == {}


async def test_js_answers_unknown_type_with_err(telehash_js: Path) -> None:
    async with open_js(telehash_js, SERVER_JS, "3a") as js, open_node(
        identity=LocalIdentity.generate(os.urandom), tcp_port=None
    ) as node:
        info = await js.first_line()
        with trio.fail_after(LINK_WAIT):
            hashname = await node.link(js_link_json(info))
            stream = await node.open_channel(hashname, "bogus")
            with pytest.raises(trio.BrokenResourceError):
                await stream.receive_some()
        assert stream.error == "unknown type"


async def test_js_links_to_us_pings_path_and_uses_our_echo(telehash_js: Path) -> None:
    async with open_node(identity=LocalIdentity.generate(os.urandom), tcp_port=None) as node:
        node.serve_channel("echo", echo_server)
        options = {"link": node.link_json, "open": "echo"}
        async with open_js(telehash_js, PEER_JS, json.dumps(options)) as js:
            ready = await js.wait_for("ready")
            with trio.fail_after(LINK_WAIT):
                await node.wait_link_up(ready["hashname"])
            up = await js.wait_for("up")
            assert up["hashname"] == node.hashname
            # JS pinged our path channel and got our pong.
            path = await js.wait_for("path")
            assert path["err"] is None
            # JS opened a reliable echo channel to us: both of its packets came back.
            first = await js.wait_for("chan")
            second = await js.wait_for("chan")
            assert first["json"]["echo"] == "hello from js"
            assert base64.b64decode(first["body"]) == b"js says hi"
            assert second["json"]["echo"] == "second"
            assert base64.b64decode(second["body"]) == b"more from js"


async def test_we_answer_js_unknown_type_with_err(telehash_js: Path) -> None:
    async with open_node(identity=LocalIdentity.generate(os.urandom), tcp_port=None) as node:
        options = {"link": node.link_json, "open": "nothing-here"}
        async with open_js(telehash_js, PEER_JS, json.dumps(options)) as js:
            await js.wait_for("up")
            event = await js.wait_for("chan-err")
            assert "unknown type" in event["err"]


async def test_tcp_large_frame_offer_does_not_confuse_js(telehash_js: Path) -> None:
    # Our TCP connector offers large frames; telehash-js (plain v3 chunking) never answers,
    # so the connection stays chunked and the link works.
    options = {"transports": ["tcp4"]}
    async with open_js(telehash_js, PEER_JS, json.dumps(options)) as js, open_node(
        identity=LocalIdentity.generate(os.urandom), port=None
    ) as node:
        info = await js.wait_for("ready")
        with trio.fail_after(LINK_WAIT):
            hashname = await node.link(js_link_json(info, "tcp4"))
        path = node.link_path(hashname)
        assert path is not None and path.is_tcp
        assert node._tcp is not None
        assert node._tcp.connection_framing(path) is Framing.CHUNKED
        stream = await node.open_channel(hashname, "echo", json={"msg": "over tcp"}, body=b"t")
        with trio.fail_after(LINK_WAIT):
            reply = await stream.receive_packet()
        assert reply.json.get("echo") == "over tcp" and reply.body == b"t"
        await stream.aclose()


async def test_js_connects_over_tcp_to_our_listener(telehash_js: Path) -> None:
    async with open_node(identity=LocalIdentity.generate(os.urandom), port=None) as node:
        node.serve_channel("echo", echo_server)
        options = {"transports": ["tcp4"], "link": node.link_json, "open": "echo"}
        async with open_js(telehash_js, PEER_JS, json.dumps(options)) as js:
            ready = await js.wait_for("ready")
            with trio.fail_after(LINK_WAIT):
                await node.wait_link_up(ready["hashname"])
            first = await js.wait_for("chan")
            assert first["json"]["echo"] == "hello from js"
            path = node.link_path(ready["hashname"])
            assert path is not None and path.is_tcp


