"""Real sockets on 127.0.0.1 (port 0): links, 50 MiB transfers, routing, the daemon.

Every byte here crosses the kernel: UDP datagrams and TCP connections between nodes in this
process, with real CS3a crypto.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from p2pcloud._crypto import LocalIdentity
from p2pcloud._framing import Framing
from p2pcloud._node import transport
from p2pcloud._node.node import Node, open_node
from p2pcloud._node.stream import ChannelStream
from p2pcloud._node.transport import TCP_IDLE_TIMEOUT
from p2pcloud._wire import MAX_INNER_PACKET

MIB = 1 << 20
TRANSFER = 50 * MIB
BLOCK = MIB


def new_identity() -> LocalIdentity:
    return LocalIdentity.generate(os.urandom)


async def transfer(a: Node, b: Node, size: int) -> None:
    """Send ``size`` bytes a -> b on a reliable channel and compare SHA-256 digests."""
    result: dict[str, Any] = {}
    done = trio.Event()

    async def sink(stream: ChannelStream) -> None:
        digest = hashlib.sha256()
        count = 0
        try:
            while chunk := await stream.receive_some(MIB):
                digest.update(chunk)
                count += len(chunk)
        except trio.BrokenResourceError as exc:
            result["error"] = f"{exc} (after {count} bytes)"
        finally:
            result["digest"], result["count"] = digest.digest(), count
            done.set()

    b.serve_channel("bulk", sink)
    stream = await a.open_channel(b.hashname, "bulk")
    sent = hashlib.sha256()
    block = os.urandom(BLOCK)
    for i in range(size // BLOCK):
        piece = block[i % 251 :] + block[: i % 251]  # every block different
        sent.update(piece)
        await stream.send_all(piece)
    await stream.send_eof()
    with trio.fail_after(300):
        await done.wait()
    assert "error" not in result, result["error"]
    assert result["count"] == size
    assert result["digest"] == sent.digest()
    await stream.aclose()


@pytest.mark.slow
async def test_50_mib_over_udp() -> None:
    async with open_node(identity=new_identity(), tcp_port=None) as a, open_node(
        identity=new_identity(), tcp_port=None
    ) as b:
        with trio.fail_after(30):
            await a.link(b.link_uri)
        path = a.link_path(b.hashname)
        assert path is not None and path.is_udp
        await transfer(a, b, TRANSFER)
        stats = a.statistics()
        assert stats.transports["udp"]["sent"] > TRANSFER // MAX_INNER_PACKET


@pytest.mark.slow
async def test_50_mib_over_tcp_large_frames() -> None:
    async with open_node(identity=new_identity(), port=None) as a, open_node(
        identity=new_identity(), port=None
    ) as b:
        with trio.fail_after(30):
            await a.link(b.link_json)
        path = a.link_path(b.hashname)
        assert path is not None and path.is_tcp
        assert a._tcp is not None and a._tcp.connection_framing(path) is Framing.FRAMES
        # the mesh now puts far more than a v3 packet in each channel packet
        assert a._mesh.max_body(b.hashname) > 10 * MAX_INNER_PACKET
        await transfer(a, b, TRANSFER)
        tcp = a.statistics().transports["tcp"]
        assert tcp["frames"] >= 1
        assert tcp["sent"] < TRANSFER // MAX_INNER_PACKET  # large frames, not v3 packets


async def test_nodes_with_udp_and_tcp_move_data_whichever_path_the_mesh_picks() -> None:
    # Both transports: the mesh may move the link between the UDP and the large-frame TCP
    # path mid-transfer; packets sized for TCP frames must still arrive.
    async with open_node(identity=new_identity()) as a, open_node(identity=new_identity()) as b:
        with trio.fail_after(30):
            await a.link(b.link_uri)
        await transfer(a, b, 16 * MIB)
        assert a.statistics().dropped.get("too large for path", 0) == 0


async def test_tcp_without_large_frames_stays_v3_chunked() -> None:
    async with open_node(identity=new_identity(), port=None) as a, open_node(
        identity=new_identity(), port=None, large_frames=False
    ) as b:
        with trio.fail_after(30):
            await a.link(b.link_json)  # a offers frames, b answers nothing: a falls back
        path = a.link_path(b.hashname)
        assert path is not None and path.is_tcp
        assert a._tcp is not None and a._tcp.connection_framing(path) is Framing.CHUNKED
        assert a._mesh.max_body(b.hashname) < MAX_INNER_PACKET
        await transfer(a, b, 2 * MIB)


async def test_router_introduces_two_nodes_then_they_go_direct() -> None:
    async with open_node(identity=new_identity(), tcp_port=None) as router, open_node(
        identity=new_identity(), tcp_port=None
    ) as a, open_node(identity=new_identity(), tcp_port=None) as b:
        with trio.fail_after(30):
            await a.link(router.link_uri)
            await b.link(router.link_uri)
        assert b.hashname not in a.links
        # a knows only b's hashname and the router: no key, no address of b.
        with trio.fail_after(60):
            await a.link(b.hashname, via=router.hashname)
        await b.wait_link_up(a.hashname)
        # the introduction and the first packets went through the router ...
        assert router.statistics().mesh.relayed > 0
        # ... and then the link moved to a direct path between a and b.
        with trio.fail_after(60):
            path = await a.wait_direct_path(b.hashname)
        assert path == b.paths[0]
        relayed = router.statistics().mesh.relayed
        await transfer(a, b, 2 * MIB)
        assert router.statistics().mesh.relayed - relayed < 10  # the data did not go through it


def test_p2pcloudd_once_prints_hashname_and_uri(tmp_path: Path) -> None:
    env = dict(os.environ, P2PCLOUD_HOME=str(tmp_path / "home"))
    command = [sys.executable, "-m", "p2pcloudd", "--port", "0", "--once"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    hashname = lines["hashname"]
    assert len(hashname) == 52 and hashname.isalnum()
    assert lines["link URI"].startswith("link://127.0.0.1:")
    assert (tmp_path / "home" / "identity.key").is_file()
    # a second start loads the same identity
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert f"hashname: {hashname}" in again.stdout


def test_p2pcloudd_reports_a_port_in_use_without_traceback(tmp_path: Path) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "p2pcloudd", "--data-dir", str(tmp_path),
                   "--port", str(port), "--once"]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "already in use" in proc.stderr and "Traceback" not in proc.stderr


def _start_daemon(args: list[str], home: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, P2PCLOUD_HOME=str(home))
    return subprocess.Popen(
        [sys.executable, "-m", "p2pcloudd", "--port", "0", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _banner(proc: subprocess.Popen[str]) -> dict[str, str]:
    assert proc.stdout is not None
    lines: dict[str, str] = {}
    while "listening" not in lines:
        line = proc.stdout.readline()
        assert line, f"daemon exited early: {proc.stderr.read() if proc.stderr else ''}"
        if ": " in line:
            key, value = line.rstrip("\n").split(": ", 1)
            lines[key] = value
    return lines


def test_two_daemons_link_and_stop_cleanly_on_sigterm(tmp_path: Path) -> None:
    import signal

    first = _start_daemon([], tmp_path / "a")
    second = None
    try:
        uri = _banner(first)["link URI"]
        second = _start_daemon(["--link", uri], tmp_path / "b")
        _banner(second)
        assert second.stdout is not None
        line = second.stdout.readline()  # "p2pcloudd: linked <hashname>"
        assert line.startswith("p2pcloudd: linked "), line
        for proc in (first, second):
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            assert "p2pcloudd: stopped" in out and "Traceback" not in err
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


async def test_garbage_on_tcp_and_udp_is_dropped_and_the_node_keeps_working() -> None:
    async with open_node(identity=new_identity()) as a, open_node(identity=new_identity()) as b:
        assert b._tcp is not None and b._udp is not None
        tcp_path, udp_path = b._tcp.path, b._udp.path
        # A chunked "packet" longer than any v3 packet may be: the connection is dropped.
        stream = await trio.open_tcp_stream(tcp_path.ip, tcp_path.port)
        await stream.send_all(b"\xff" + b"x" * 255)
        with trio.fail_after(30):
            try:
                while True:
                    await stream.send_all((b"\xff" + b"y" * 255) * 64)
            except (trio.BrokenResourceError, OSError):
                pass  # the node closed the connection
        await stream.aclose()
        assert b.statistics().transports["tcp"]["malformed"] == 1
        # Random datagrams on UDP: dropped with a reason, nothing else happens.
        udp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with udp:
            for n in range(50):
                await udp.sendto(os.urandom(1 + n * 20), (udp_path.ip, udp_path.port))
        with trio.fail_after(30):
            hashname = await a.link(b.link_uri)
        assert sum(b.statistics().dropped.values()) >= 1
        await transfer(a, b, MIB)
        assert hashname == b.hashname


async def test_idle_tcp_connections_are_closed(autojump_clock: trio.testing.MockClock) -> None:
    # Virtual time over real sockets: a connection that never sends a byte is cut after
    # TCP_IDLE_TIMEOUT (links themselves stay alive with the mesh's 5-minute keepalive).
    async with open_node(identity=new_identity(), port=None) as node:
        assert node._tcp is not None
        path = node._tcp.path
        stream = await trio.open_tcp_stream(path.ip, path.port)
        with trio.fail_after(TCP_IDLE_TIMEOUT * 2):
            assert await stream.receive_some(10) == b""  # closed by the node
        await stream.aclose()
        assert node.statistics().transports["tcp"]["closed_idle"] == 1


async def test_tcp_connections_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "MAX_TCP_CONNECTIONS", 3)
    async with open_node(identity=new_identity(), port=None) as node:
        assert node._tcp is not None
        path = node._tcp.path
        streams = [await trio.open_tcp_stream(path.ip, path.port) for _ in range(5)]
        with trio.fail_after(30):
            for extra in streams[3:]:
                assert await extra.receive_some(10) == b""  # closed at once by the node
        assert node.statistics().transports["tcp"]["refused_too_many"] == 2
        assert node._tcp.connections == 3
        for stream in streams:
            await stream.aclose()
