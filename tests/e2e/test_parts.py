"""In-process checks of daemon parts whose edge cases a whole daemon reaches only slowly:
the event hub's replay and slow-reader cut-off, config precedence, the data dir files."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trio
from p2pcloudd import datadir
from p2pcloudd.config import ConfigError, load_config_file, resolve
from p2pcloudd.events import (
    MAX_HISTORY,
    MAX_SUBSCRIBER_BACKLOG,
    MAX_SUBSCRIBERS,
    EventHub,
    TooManySubscribers,
)


async def test_events_reach_every_subscriber_in_order() -> None:
    hub = EventHub()
    with hub.subscribe() as (missed1, rx1), hub.subscribe() as (missed2, rx2):
        assert missed1 == missed2 == []
        for i in range(3):
            hub.publish("link.up", {"n": i})
        for rx in (rx1, rx2):
            got = [rx.receive_nowait() for _ in range(3)]
            assert [e.data["n"] for e in got] == [0, 1, 2]
            assert [e.id for e in got] == [1, 2, 3]
    assert hub.subscribers == 0


async def test_reconnect_with_last_event_id_replays_or_resets() -> None:
    hub = EventHub()
    for i in range(10):
        hub.publish("statistics", {"n": i})
    with hub.subscribe(last_id=7) as (missed, _rx):
        assert [e.id for e in missed] == [8, 9, 10]
    with hub.subscribe(last_id=10) as (missed, _rx):
        assert missed == []
    with hub.subscribe(last_id=11) as (missed, _rx):  # from an earlier run of the daemon
        assert [e.type for e in missed] == ["reset"]
    for i in range(MAX_HISTORY):
        hub.publish("statistics", {"n": i})
    with hub.subscribe(last_id=3) as (missed, _rx):  # those are gone from the ring
        assert [e.type for e in missed] == ["reset"]


async def test_a_slow_subscriber_is_cut_off_not_buffered_forever() -> None:
    hub = EventHub()
    with hub.subscribe() as (_, slow), hub.subscribe() as (_, fast):
        for i in range(MAX_SUBSCRIBER_BACKLOG + 1):
            hub.publish("statistics", {"n": i})
            fast.receive_nowait()
        assert hub.subscribers == 1  # the slow one is gone, the fast one stays
        received = [slow.receive_nowait() for _ in range(MAX_SUBSCRIBER_BACKLOG)]
        assert len(received) == MAX_SUBSCRIBER_BACKLOG
        with pytest.raises(trio.EndOfChannel):
            await slow.receive()


async def test_subscribers_are_bounded() -> None:
    hub = EventHub()
    managers = [hub.subscribe() for _ in range(MAX_SUBSCRIBERS)]
    for m in managers:
        m.__enter__()
    with pytest.raises(TooManySubscribers), hub.subscribe():
        pass
    for m in managers:
        m.__exit__(None, None, None)
    assert hub.subscribers == 0


def test_flags_override_the_file_which_overrides_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('port = 5000\napi_port = 6000\nlink = ["link://a"]\nrelink = false\n')
    values = load_config_file(path)
    settings = resolve(values, {"port": 7000, "api_port": None, "link": ["link://b"]})
    assert settings.port == 7000 and settings.api_port == 6000
    assert settings.link == ("link://a", "link://b") and settings.relink is False
    assert settings.bind == "127.0.0.1" and settings.log_level == "info"
    assert load_config_file(tmp_path / "missing.toml") == {}


def test_a_remote_api_needs_allow_remote_api() -> None:
    with pytest.raises(ConfigError, match="allow_remote_api = true"):
        resolve({"api_bind": "0.0.0.0"}, {})
    with pytest.raises(ConfigError, match="allow_remote_api"):
        resolve({}, {"api_bind": "192.168.1.5"})
    assert resolve({"api_bind": "0.0.0.0", "allow_remote_api": True}, {}).api_bind == "0.0.0.0"
    assert resolve({}, {"api_bind": "::1"}).api_bind == "::1"  # loopback v6 is fine


@pytest.mark.parametrize("text, message", [
    ("port = 70000", "port number 0..65535"),
    ("relink = 1", "true or false"),
    ("log_level = 'loud'", "one of debug"),
    ("statistics_interval = 0.01", "at least"),
    ("link = 'link://x'", "list of link URIs"),
    ("[node]\nport = 1", "unknown option 'node'"),
    ("port = ", "not valid TOML"),
])
def test_bad_config_values_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config_file(path)
    assert str(path) in str(info.value)


def test_token_is_private_and_the_same_for_concurrent_creators(tmp_path: Path) -> None:
    tokens: list[str] = []
    threads = [threading.Thread(target=lambda: tokens.append(
        datadir.load_or_create_token(tmp_path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(tokens)) == 1 and len(tokens[0]) >= 40
    assert (tmp_path / datadir.TOKEN_FILE).stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [datadir.TOKEN_FILE]  # no temp left
    os.chmod(tmp_path / datadir.TOKEN_FILE, 0o640)
    with pytest.raises(datadir.DataDirError, match="chmod 600"):
        datadir.read_token(tmp_path)


def test_state_round_trips_and_damage_is_reported(tmp_path: Path) -> None:
    state = datadir.State(udp_port=4000, tcp_port=4001, api_port=4002)
    state.peers["h" * 52] = datadir.KnownPeer("h" * 52, "link://x", 1.5)
    datadir.save_state(tmp_path, state)
    loaded = datadir.load_state(tmp_path)
    assert loaded.to_json() == state.to_json()
    (tmp_path / datadir.STATE_FILE).write_text('{"udp_port": "x"}')
    with pytest.raises(datadir.DataDirError, match="move it aside"):
        datadir.load_state(tmp_path)


def test_the_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    first = datadir.DataDirLock(tmp_path)
    first.acquire()
    assert datadir.lock_holder(tmp_path) == os.getpid()
    with pytest.raises(datadir.AlreadyRunning, match=f"pid {os.getpid()}"):
        datadir.DataDirLock(tmp_path).acquire()
    first.release()
    assert datadir.lock_holder(tmp_path) is None
    second = datadir.DataDirLock(tmp_path)
    second.acquire()
    second.release()
