"""The running daemon's shared state: the node, known peers, events, dashboard sessions.

Theory of operation
-------------------
:class:`Daemon` is what every API route gets. It owns no sockets itself (the node and the
HTTP server do); it keeps what the daemon knows that the node does not:

* **known peers** (``state.json``): every peer ever linked, its link URI when we linked to
  it, and when the link was last seen Up. They survive restarts, and ``relink`` links them
  again at start.
* the **link watcher**: a task that sleeps until the node's link hook
  (``node.add_link_listener``: LinkUp, LinkDown, PathChanged) wakes it, then compares
  ``node.links`` and ``node.link_path()`` with what it published last and publishes
  ``link.up`` / ``link.down`` / ``link.path`` events on the diff (docs/daemon.md). Nothing
  polls: an idle daemon (issue 7: fit for a phone) wakes for real link events only, plus a
  refresh of known peers' ``last_seen`` every :data:`STATE_SAVE_INTERVAL` while links are up.
* the **statistics ticker** publishing ``statistics`` events for live dashboards, only
  while someone follows ``/api/events`` (it sleeps while nobody listens).
* the **memory trimmer**: start-up (imports, store open, handshakes, first sync rounds)
  frees a lot of small heap blocks that glibc keeps; once, :data:`TRIM_AFTER` seconds after
  start, and then every :data:`TRIM_INTERVAL`, ``malloc_trim(0)`` hands free pages back to
  the system (idle RSS matters on a phone). Only where the C library has it (glibc).
* **goodbyes**: Telehash v3 has no message that ends a link, so a peer that stops would
  look online until the mesh's keepalive gives up (minutes). A stopping daemon opens a
  ``p2pcloud-bye`` channel (our extension) to each linked peer and waits up to
  :data:`BYE_TIMEOUT` for the acknowledgement; a daemon that receives one ends that link
  at once. Only the peer itself can send it: the channel runs inside its encrypted link.
* **dashboard sessions**: one-time login codes (minted by a token holder) turn into
  HttpOnly cookies; both live in memory only, so a restart logs dashboards out.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hmac
import logging
import math
import os
import secrets
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import trio

import p2pcloud
from p2pcloud._ids import Hashname
from p2pcloudd import datadir
from p2pcloudd.config import Settings
from p2pcloudd.events import EventHub

log = logging.getLogger("p2pcloudd")

STATE_SAVE_INTERVAL = 300.0
"""s between refreshes of linked peers' last_seen in state.json while links stay up (every
link change is written at once; this only bounds how stale last_seen is after a kill -9)."""
LOGIN_CODE_TTL = 300.0  # s a dashboard login code stays valid: long enough to open a browser
MAX_LOGIN_CODES = 32  # unused codes kept; minting more drops the oldest
SESSION_TTL = 30 * 24 * 3600.0  # s a dashboard session cookie lives (until the daemon restarts)
MAX_SESSIONS = 256  # dashboard sessions kept; beyond that the oldest is logged out
LINK_TIMEOUT = 30.0  # s; the mesh's own handshake give-up time (telehash v3 link timers)
RELINK_FIRST_DELAY = 1.0  # s after a link to a known peer went down before linking again
RELINK_MAX_DELAY = 60.0  # s between tries to a peer that stays away (Syncthing retries each 60 s)
BYE_CHANNEL = "p2pcloud-bye"  # our extension: "I am stopping", sent on each link at shutdown
BYE_TIMEOUT = 1.0  # s a stopping daemon waits for its peers to acknowledge the goodbye
TRIM_AFTER = 30.0  # s after start: start-up's transient allocations are freed by then
TRIM_INTERVAL = 3600.0  # s between later trims: a few milliseconds of CPU once an hour
RELINK_AFTER_BYE = 10.0
"""s before linking back to a peer that said goodbye: it is still shutting down, and one
that restarts links to us itself when it knows our URI."""


def core_implementation() -> str:
    """Which merge core runs (``cython``/``python``), or why none could be imported."""
    try:
        return p2pcloud.core_implementation()
    except (ImportError, AttributeError) as exc:  # a stale build of the Cython core
        return f"unavailable ({exc})"


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim`` (None where the C library has none, e.g. macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return None
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
    return trim


def path_json(path: Any) -> dict[str, Any] | None:
    """A node path (``p2pcloud.proto.path.Path``) as JSON, with ``direct`` added."""
    if path is None:
        return None
    data: dict[str, Any] = dict(path.to_json())
    data["direct"] = bool(path.is_direct)
    return data


def jsonable(value: Any) -> Any:
    """Turn statistics dataclasses, mappings, sets and tuples into JSON values."""
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [jsonable(v) for v in value]
        return sorted(items) if isinstance(value, set | frozenset) else items
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


class Daemon:
    """The state every API route works with.

    Attributes:
        node: the running node.
        settings: effective settings.
        data_dir: the data dir.
        state: what is remembered between runs.
        events: the event hub.
        token: the API bearer token.
        api_url: where the API listens (set once it does).
    """

    def __init__(
        self,
        node: p2pcloud.Node,
        *,
        settings: Settings,
        data_dir: Path,
        state: datadir.State,
        token: str,
    ) -> None:
        """Wrap a started node."""
        self.node = node
        self.settings = settings
        self.data_dir = data_dir
        self.state = state
        self.events = EventHub()
        self.token = token
        self.api_url: str | None = None
        self.started_wall = time.time()
        self._started = trio.current_time()
        self.shutdown_requested = trio.Event()
        self._login_codes: dict[str, float] = {}
        self._sessions: dict[str, float] = {}
        self._seen_up: dict[str, Any] = {}  # hashname -> path, as published last
        self._links_changed = trio.Event()  # set by the node's link hook
        self._relinking: set[str] = set()  # peers a _relink_after_down task is after
        self._said_bye: set[str] = set()  # peers that said goodbye since their link was up
        self._relink_nursery: trio.Nursery | None = None
        self._state_dirty = False

    # -- facts -------------------------------------------------------------------------

    def uptime(self) -> float:
        """Seconds since the daemon started."""
        return trio.current_time() - self._started

    def ports(self) -> dict[str, int | None]:
        """The ports in use: ``udp``, ``tcp`` (mesh) and ``api``."""
        ports: dict[str, int | None] = {"udp": None, "tcp": None, "api": self.state.api_port}
        for path in self.node.paths:
            if path.type.startswith("udp"):
                ports["udp"] = path.port
            elif path.type.startswith("tcp"):
                ports["tcp"] = path.port
        return ports

    def status(self) -> dict[str, Any]:
        """The body of ``GET /api/status``."""
        return {
            "hashname": self.node.hashname,
            "link_uri": self.node.link_uri,
            "paths": [path_json(p) for p in self.node.paths],
            "ports": self.ports(),
            "api_url": self.api_url,
            "uptime_s": round(self.uptime(), 3),
            "started_at": self.started_wall,
            "pid": os.getpid(),
            "data_dir": str(self.data_dir),
            "core_implementation": core_implementation(),
            "version": p2pcloud.__version__,
            "links_up": len(self.node.links),
        }

    def peers(self) -> list[dict[str, Any]]:
        """The body of ``GET /api/peers``: known peers plus any linked one, online first."""
        up = self.node.links
        now = time.time()
        rows: list[dict[str, Any]] = []
        for hashname in set(self.state.peers) | set(up):
            known = self.state.peers.get(hashname)
            online = hashname in up
            last_seen = now if online else (known.last_seen if known else None)
            rows.append({
                "hashname": hashname,
                "online": online,
                "path": path_json(self.node.link_path(Hashname(hashname))) if online else None,
                "last_seen": last_seen,
                "uri": known.uri if known else None,
            })
        rows.sort(key=lambda r: (not r["online"], -float(r["last_seen"] or 0.0), r["hashname"]))
        return rows

    def statistics(self) -> dict[str, Any]:
        """The body of ``GET /api/statistics`` (and of ``statistics`` events)."""
        stats = jsonable(self.node.statistics())
        stats["links_up"] = len(self.node.links)
        return {
            "node": stats,
            "daemon": {
                "uptime_s": round(self.uptime(), 3),
                "event_subscribers": self.events.subscribers,
                "events_published": dict(self.events.published),
                "known_peers": len(self.state.peers),
            },
        }

    # -- links -------------------------------------------------------------------------

    def remember_uri(self, hashname: str, uri: str) -> None:
        """Remember the URI we linked ``hashname`` with (so a restart can link again)."""
        peer = self.state.peers.setdefault(hashname, datadir.KnownPeer(hashname))
        peer.uri = uri
        self._state_dirty = True

    async def link(self, uri: str) -> str:
        """Link with the endpoint at ``uri``, remember it, and return its hashname.

        Raises:
            BadURI, LinkError, LocalProtocolError: from ``node.link``.
            trio.TooSlowError: no link within :data:`LINK_TIMEOUT`.
        """
        with trio.fail_after(LINK_TIMEOUT + 1.0):
            hashname = await self.node.link(uri)
        self.remember_uri(hashname, uri)
        self._poll_links()  # publish link.up before answering (the watcher may not have run)
        await self.save_state_if_dirty()
        return str(hashname)

    async def relink_known(self) -> None:
        """Link again, in parallel, with every known peer whose URI we remember."""
        async with trio.open_nursery() as nursery:
            for peer in list(self.state.peers.values()):
                if peer.uri and peer.hashname not in self.node.links:
                    nursery.start_soon(self._relink_one, peer)

    async def _relink_one(self, peer: datadir.KnownPeer) -> None:
        assert peer.uri is not None
        try:
            await self.link(peer.uri)
        except (p2pcloud.LinkError, p2pcloud.BadURI, p2pcloud.LocalProtocolError,
                trio.TooSlowError) as exc:
            log.info("relink failed peer=%s reason=%r", peer.hashname[:12], str(exc) or "timeout")
        else:
            log.info("relinked peer=%s", peer.hashname[:12])

    def _poll_links(self) -> None:
        up = self.node.links
        now = time.time()
        for hashname in up:
            path = path_json(self.node.link_path(hashname))
            peer = self.state.peers.get(hashname)
            if peer is None:
                peer = self.state.peers[hashname] = datadir.KnownPeer(hashname)
            peer.last_seen = now
            if hashname not in self._seen_up:
                self._seen_up[hashname] = path
                self._state_dirty = True
                log.info("link up peer=%s path=%s", hashname[:12], _path_text(path))
                self.events.publish("link.up", {"hashname": hashname, "path": path})
            elif self._seen_up[hashname] != path:
                self._seen_up[hashname] = path
                log.info("path changed peer=%s path=%s", hashname[:12], _path_text(path))
                self.events.publish("link.path", {"hashname": hashname, "path": path})
        for gone in list(self._seen_up):
            if gone not in up:
                del self._seen_up[gone]
                if gone in self.state.peers:
                    self.state.peers[gone].last_seen = now  # up until this event
                self._state_dirty = True
                log.info("link down peer=%s", gone[:12])
                self.events.publish("link.down", {"hashname": gone})
                self._relink_soon(gone)

    def _relink_soon(self, hashname: str) -> None:
        """Keep trying to link again with a known peer whose link went down.

        The node ends a link as soon as the peer closes its TCP connection (it stopped or
        restarted), and forgets links the peer made; so a peer we linked by URI is called
        back here, first after :data:`RELINK_FIRST_DELAY`, then backing off to
        :data:`RELINK_MAX_DELAY` while it stays away.
        """
        peer = self.state.peers.get(hashname)
        if (peer is None or not peer.uri or not self.settings.relink
                or self._relink_nursery is None or hashname in self._relinking):
            self._said_bye.discard(hashname)
            return
        self._relinking.add(hashname)
        first = RELINK_AFTER_BYE if hashname in self._said_bye else RELINK_FIRST_DELAY
        self._said_bye.discard(hashname)
        self._relink_nursery.start_soon(self._relink_after_down, peer, first)

    async def _relink_after_down(self, peer: datadir.KnownPeer, first_delay: float) -> None:
        delay = first_delay
        try:
            while peer.uri and peer.hashname not in self.node.links:
                await trio.sleep(delay)
                if peer.hashname in self.node.links:
                    return  # it linked to us meanwhile
                try:
                    await self.link(peer.uri)
                except (p2pcloud.LinkError, p2pcloud.BadURI, p2pcloud.LocalProtocolError,
                        trio.TooSlowError) as exc:
                    log.debug("relink failed peer=%s reason=%r next_in_s=%s",
                              peer.hashname[:12], str(exc) or "timeout", delay)
                    delay = min(delay * 2, RELINK_MAX_DELAY)
                else:
                    log.info("relinked peer=%s", peer.hashname[:12])
        finally:
            self._relinking.discard(peer.hashname)

    def _on_link_event(self, hashname: Hashname, what: str) -> None:
        # The node's link hook runs inside its event dispatch: only wake the watcher.
        self._links_changed.set()

    async def watch_links(self) -> None:
        """Publish link events, keep known peers' last_seen, and link again with known
        peers whose link went down, until cancelled.

        Sleeps until the node reports a link event (or, while links are up, until the next
        :data:`STATE_SAVE_INTERVAL` refresh of last_seen), so an idle daemon costs nothing.
        """
        self.node.serve_channel(BYE_CHANNEL, self._on_bye)
        self.node.add_link_listener(self._on_link_event)
        last_save = trio.current_time()
        async with trio.open_nursery() as nursery:
            self._relink_nursery = nursery
            while True:
                # Reset before looking: an event during the save below wakes the next wait.
                self._links_changed = trio.Event()
                self._poll_links()
                refresh = bool(self._seen_up) and (
                    trio.current_time() - last_save >= STATE_SAVE_INTERVAL)
                if self._state_dirty or refresh:
                    self._state_dirty = True
                    await self.save_state_if_dirty()
                    last_save = trio.current_time()
                # No link up: nothing to refresh, sleep until the next link event.
                wake = last_save + STATE_SAVE_INTERVAL if self._seen_up else math.inf
                with trio.move_on_at(wake):
                    await self._links_changed.wait()

    async def _on_bye(self, stream: Any) -> None:
        """A peer says it is stopping: acknowledge, then end its link now."""
        hashname = stream.hashname
        log.info("peer stopping peer=%s", str(hashname)[:12])
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                 p2pcloud.P2PCloudError):
            await stream.send_all(b"ok")
        self._said_bye.add(hashname)
        self.node.unlink(hashname)
        self._poll_links()  # link.down before this handler ends

    async def say_bye(self) -> None:
        """Tell every linked peer we are stopping (at most :data:`BYE_TIMEOUT`)."""
        async def bye(hashname: Hashname) -> None:
            try:
                stream = await self.node.open_channel(hashname, BYE_CHANNEL)
                await stream.receive_some()  # their "ok" (or the end): they got it
            except (p2pcloud.P2PCloudError, trio.BrokenResourceError,
                    trio.ClosedResourceError):
                return

        with trio.move_on_after(BYE_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for hashname in list(self.node.links):
                    nursery.start_soon(bye, hashname)

    async def tick_statistics(self) -> None:
        """Publish a ``statistics`` event every ``statistics_interval`` seconds while any
        client follows the event stream; with none, sleep until one subscribes (an idle
        daemon nobody watches does not wake for statistics)."""
        while True:
            await self.events.wait_subscribed()
            await trio.sleep(self.settings.statistics_interval)
            if self.events.subscribers:
                self.events.publish("statistics", self.statistics())

    async def trim_memory(self) -> None:
        """Give freed heap pages back to the system after start-up, then hourly (see the
        module docstring); returns at once where ``malloc_trim`` does not exist."""
        trim = _malloc_trim()
        if trim is None:
            return
        await trio.sleep(TRIM_AFTER)
        while True:
            trim(0)
            await trio.sleep(TRIM_INTERVAL)

    async def save_state_if_dirty(self) -> None:
        """Write state.json (in a thread: it fsyncs) if anything changed."""
        if not self._state_dirty:
            return
        self._state_dirty = False
        try:
            await trio.to_thread.run_sync(datadir.save_state, self.data_dir, self.state)
        except OSError as exc:
            self._state_dirty = True
            log.error("cannot save state file=%s error=%r", datadir.STATE_FILE, str(exc))

    def save_state_now(self) -> None:
        """Write state.json synchronously (at shutdown, when no more awaits are wanted)."""
        for peer in self.state.peers.values():
            if peer.hashname in self.node.links:
                peer.last_seen = time.time()
        datadir.save_state(self.data_dir, self.state)

    # -- dashboard login ---------------------------------------------------------------

    def check_token(self, presented: str) -> bool:
        """Compare a presented bearer token in constant time."""
        return hmac.compare_digest(presented.encode(), self.token.encode())

    def mint_login_code(self) -> tuple[str, float]:
        """A one-time code for ``GET /login?code=``; returns ``(code, ttl seconds)``."""
        now = trio.current_time()
        self._login_codes = {c: t for c, t in self._login_codes.items() if t > now}
        while len(self._login_codes) >= MAX_LOGIN_CODES:
            self._login_codes.pop(next(iter(self._login_codes)))
        code = secrets.token_urlsafe(24)
        self._login_codes[code] = now + LOGIN_CODE_TTL
        return code, LOGIN_CODE_TTL

    def redeem_login_code(self, code: str) -> bool:
        """Use up a login code; True if it was valid and unexpired."""
        expiry = self._login_codes.pop(code, None)
        return expiry is not None and expiry > trio.current_time()

    def new_session(self) -> str:
        """Start a dashboard session; returns the cookie value."""
        now = trio.current_time()
        self._sessions = {s: t for s, t in self._sessions.items() if t > now}
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.pop(next(iter(self._sessions)))
        session = secrets.token_urlsafe(32)
        self._sessions[session] = now + SESSION_TTL
        return session

    def check_session(self, session: str) -> bool:
        """True if ``session`` is a live dashboard session."""
        for known, expiry in self._sessions.items():
            if hmac.compare_digest(known.encode(), session.encode()):
                return expiry > trio.current_time()
        return False

    def end_session(self, session: str) -> None:
        """Log a dashboard session out."""
        self._sessions.pop(session, None)


def _path_text(path: dict[str, Any] | None) -> str:
    if path is None:
        return "none"
    if path.get("type") == "peer":
        return f"peer:{str(path.get('hn'))[:12]}"
    return f"{path.get('type')}:{path.get('ip')}:{path.get('port')}"
