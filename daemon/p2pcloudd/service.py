"""``p2pcloudd``, the full daemon: a node, its local HTTP API and dashboard, until stopped.

Theory of operation
-------------------
Start-up, in order (each step's failure is one clear line on stderr and an exit status):

1. the data dir (``--data-dir``, else ``$P2PCLOUD_HOME``, else ``$XDG_DATA_HOME/p2pcloud``,
   else ``~/.local/share/p2pcloud``) is created (mode 0700) and its lock taken with
   ``fcntl.flock``: a second daemon on the same data dir exits with status 3 and says who
   holds it. The kernel drops the lock when a daemon dies, even by kill -9.
2. ``config.toml`` (optional) is read and merged under the flags (:mod:`p2pcloudd.config`).
3. the node starts (identity created on first start by the node). Ports: a flag or config
   value is used as given; otherwise the ports remembered in ``state.json`` (falling back to
   any free port, with a warning, if one is taken now); on first start 42424 (or any free
   port). The ports in use are written back to ``state.json``.
4. the HTTP API binds (remembered port, else 42480, else any; loopback only unless
   ``allow_remote_api``) and hypercorn's Trio worker serves it in the daemon's nursery;
   ``api.json`` (mode 0600) tells the CLI where it is.
5. tasks: the link watcher (events + last seen), the statistics ticker, linking with
   ``--link``/``link`` URIs and with known peers (``relink``).

SIGTERM, SIGINT or ``POST /api/shutdown`` stop it: the HTTP server and the node close (every
channel and transport), ``state.json`` is saved, ``api.json`` removed, the lock released, and
the process exits 0.

Exit statuses: 0 clean stop (or ``--once``); 2 a problem the user can fix (bad config, port
in use, unreadable key file, bad URI); 3 another daemon runs on this data dir.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import trio

import p2pcloud
from p2pcloud._node.node import default_data_dir
from p2pcloud._node.transport import TransportError
from p2pcloud.errors import BadURI, KeyFileError, WrongPassphrase
from p2pcloud.uri import parse_link_uri
from p2pcloudd import datadir
from p2pcloudd.config import (
    DISCOVERY_MODES,
    LOG_FORMATS,
    LOG_LEVELS,
    ConfigError,
    Settings,
    is_loopback,
    load_config_file,
    resolve,
)
from p2pcloudd.runtime import Daemon, core_implementation

log = logging.getLogger("p2pcloudd")

DEFAULT_PORT = 42424  # telehash v3 uri.md: the default port of link URIs
DEFAULT_API_PORT = 42480  # the dashboard's usual port, near the mesh's; any if taken
PASSPHRASE_ENV = "P2PCLOUD_PASSPHRASE"  # noqa: S105  (a variable name: read when sealed)
EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_ALREADY_RUNNING = 3
HTTP_GRACE = 1.0  # s open HTTP requests (event streams) get to finish at shutdown


class UserError(Exception):
    """A problem the user can fix; printed as one line, no traceback."""

    def __init__(self, message: str, status: int = EXIT_USER_ERROR) -> None:
        """The message and the exit status to use."""
        super().__init__(message)
        self.status = status


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``p2pcloudd`` (NODE's flags plus the daemon's)."""
    parser = argparse.ArgumentParser(
        prog="p2pcloudd",
        description="Run a p2pcloud node with its local HTTP API and web dashboard until "
        "Ctrl-C, SIGTERM or `p2pcloud down`. Options can also be set in DATA_DIR/config.toml "
        "(docs/daemon.md).",
    )
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="the data dir (default: $P2PCLOUD_HOME, else "
                        "$XDG_DATA_HOME/p2pcloud, else ~/.local/share/p2pcloud)")
    parser.add_argument("--port", type=_port, default=None,
                        help=f"UDP port (default: remembered, else {DEFAULT_PORT} or any free "
                        "one; 0: any)")
    parser.add_argument("--tcp-port", type=_port, default=None,
                        help="TCP port (default: remembered, else the UDP port's number if "
                        "free, else any; 0: any)")
    parser.add_argument("--bind", default=None,
                        help="local address the mesh listens on (default 127.0.0.1; 0.0.0.0 "
                        "for every interface)")
    parser.add_argument("--link", action="append", default=[], metavar="URI",
                        help="link to this peer at start (a link:// URI); may be repeated")
    parser.add_argument("--once", action="store_true",
                        help="start, print the hashname and link URI, and exit (checks the setup)")
    parser.add_argument("--api-port", type=_port, default=None,
                        help=f"HTTP API and dashboard port (default: remembered, else "
                        f"{DEFAULT_API_PORT} or any free one; 0: any)")
    parser.add_argument("--api-bind", default=None,
                        help="HTTP API address (default 127.0.0.1; others need "
                        "allow_remote_api = true in config.toml)")
    parser.add_argument("--discovery", choices=DISCOVERY_MODES, default=None,
                        help="LAN discovery by mDNS: auto (on when --bind is not loopback), "
                        "on, off (default auto)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=None,
                        help="least severe log level written (default info)")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=None,
                        help="text (key=value) or json lines (default text)")
    return parser


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0..65535: {value}")
    return value


# -- logging ------------------------------------------------------------------------------

_KV = re.compile(r"""(\w+)=("(?:[^"\\]|\\.)*"|'[^']*'|\S+)""")


class _Formatter(logging.Formatter):
    """``ts=... level=... logger=... msg="link up" peer=...`` lines, or JSON lines.

    Log calls in the daemon write ``"what happened key=value key=value"``; the words before
    the first ``key=`` become ``msg``, the pairs stay fields.
    """

    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.json = fmt == "json"

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        first = _KV.search(message)
        head = (message[: first.start()] if first else message).strip()
        tail = message[first.start():] if first else ""
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ts += f".{int(record.msecs):03d}Z"
        level = record.levelname.lower()
        if self.json:
            fields: dict[str, Any] = {"ts": ts, "level": level, "logger": record.name,
                                      "msg": head}
            for key, value in _KV.findall(tail):
                fields.setdefault(key, value.strip("'\"") if value[:1] in "'\"" else value)
            if record.exc_info:
                fields["exc"] = self.formatException(record.exc_info)
            return json.dumps(fields)
        line = f"ts={ts} level={level} logger={record.name} msg={json.dumps(head)}"
        if tail:
            line += " " + tail
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return line


def setup_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Send the daemon's and the node's logs to stderr in ``fmt`` at ``level``."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_Formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))


# -- start-up -----------------------------------------------------------------------------


def _choose(flag: int | None, remembered: int | None, default: int) -> tuple[int, bool]:
    """(port to try, may fall back to any free port if it is taken)."""
    if flag is not None:
        return flag, False
    if remembered is not None:
        return remembered, True
    return default, True


def discovery_settings(settings: Settings) -> dict[str, Any]:
    """``open_node``'s LAN discovery arguments from the ``discovery`` option.

    ``auto`` runs mDNS when the mesh listens beyond loopback. mDNS uses the interface of the
    bound address only (every interface for a wildcard bind), also when a pairing code
    starts it on demand, so a daemon bound to 127.0.0.1 never sends multicast elsewhere.
    """
    bind = settings.bind
    wildcard = bind in ("0.0.0.0", "")  # noqa: S104
    enabled = (settings.discovery == "on"
               or (settings.discovery == "auto" and not is_loopback(bind)))
    address = "127.0.0.1" if bind == "localhost" else bind
    return {"discovery": enabled, "discovery_interfaces": None if wildcard else [address]}


async def _open_node(
    stack: contextlib.AsyncExitStack, settings: Settings, state: datadir.State, data_dir: Path
) -> p2pcloud.Node:
    passphrase = os.environ.get(PASSPHRASE_ENV) or None
    udp, udp_soft = _choose(settings.port, state.udp_port, DEFAULT_PORT)
    tcp_default = udp if settings.port is None or settings.port != 0 else 0
    tcp, tcp_soft = _choose(settings.tcp_port, state.tcp_port, tcp_default)
    lan = discovery_settings(settings)
    try:
        try:
            return await stack.enter_async_context(p2pcloud.open_node(
                data_dir, port=udp, tcp_port=tcp, bind=settings.bind, passphrase=passphrase,
                **lan))
        except TransportError as exc:
            if not (udp_soft or tcp_soft):
                raise
            log.warning("port taken, choosing another udp=%s tcp=%s error=%r",
                        udp, tcp, exc.strerror or str(exc))
            return await stack.enter_async_context(p2pcloud.open_node(
                data_dir, port=0 if udp_soft else udp, tcp_port=0 if tcp_soft else tcp,
                bind=settings.bind, passphrase=passphrase, **lan))
    except WrongPassphrase as exc:
        raise UserError(f"{exc} (set {PASSPHRASE_ENV})") from exc
    except TransportError as exc:
        raise UserError(exc.strerror or str(exc)) from exc
    except KeyFileError as exc:
        raise UserError(str(exc)) from exc


def _bind_api_socket(settings: Settings, state: datadir.State) -> socket.socket:
    port, soft = _choose(settings.api_port, state.api_port, DEFAULT_API_PORT)
    host = "127.0.0.1" if settings.api_bind == "localhost" else settings.api_bind.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for attempt in (port, 0) if soft and port != 0 else (port,):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, attempt))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE and attempt != 0 and soft:
                log.warning("api port taken, choosing another port=%d", attempt)
                continue
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"API port {attempt} on {host} is already in use; choose "
                                "another with --api-port (0: any)") from exc
            raise UserError(f"cannot bind the API to {host}:{attempt}: {exc.strerror}") from exc
        return sock
    raise AssertionError("unreachable: the last attempt binds port 0 or raises")


def _api_url(settings: Settings, port: int) -> str:
    host = settings.api_bind
    if not is_loopback(host) and host in ("0.0.0.0", "::"):  # noqa: S104
        host = "127.0.0.1"  # the CLI on this machine reaches a wildcard bind on loopback
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


async def _serve_api(
    daemon: Daemon, sock: socket.socket, done: trio.Event, *,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    from p2pcloudd.api import build_app

    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    sock.detach()  # hypercorn owns the descriptor from here on
    config.errorlog = logging.getLogger("p2pcloudd.http")
    config.accesslog = (logging.getLogger("p2pcloudd.access")
                        if log.isEnabledFor(logging.DEBUG) else None)
    config.graceful_timeout = HTTP_GRACE
    try:
        # A shutdown request stops accepting connections and lets answers in flight
        # (POST /api/shutdown's own) finish, for up to graceful_timeout.
        await serve(build_app(daemon), config,  # type: ignore[arg-type]
                    shutdown_trigger=daemon.shutdown_requested.wait, task_status=task_status)
    finally:
        done.set()


def _say(stream: TextIO, line: str) -> None:
    print(line, file=stream, flush=True)


async def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the daemon with parsed arguments (see the module docstring).

    Returns:
        The exit status.

    Raises:
        UserError: a problem the user can fix.
    """
    stream = out if out is not None else sys.stdout
    data_dir = (args.data_dir if args.data_dir is not None else default_data_dir()).expanduser()
    try:
        datadir.ensure_dir(data_dir)
    except datadir.DataDirError as exc:
        raise UserError(str(exc)) from exc
    lock = datadir.DataDirLock(data_dir)
    try:
        lock.acquire()
    except datadir.AlreadyRunning as exc:
        raise UserError(str(exc), EXIT_ALREADY_RUNNING) from exc
    except datadir.DataDirError as exc:
        raise UserError(str(exc)) from exc
    try:
        return await _run_locked(args, data_dir, stream)
    finally:
        lock.release()


async def _run_locked(args: argparse.Namespace, data_dir: Path, stream: TextIO) -> int:
    try:
        file_values = load_config_file(data_dir / datadir.CONFIG_FILE)
        settings = resolve(file_values, {
            "port": args.port, "tcp_port": args.tcp_port, "bind": args.bind,
            "link": args.link, "api_port": args.api_port, "api_bind": args.api_bind,
            "log_level": args.log_level, "log_format": args.log_format,
            "discovery": args.discovery,
        })
    except ConfigError as exc:
        raise UserError(str(exc)) from exc
    setup_logging(settings.log_level, settings.log_format)
    for uri in settings.link:  # check every URI before starting anything
        try:
            parse_link_uri(uri)
        except BadURI as exc:
            raise UserError(f"--link {uri!r}: {exc}") from exc
    try:
        state = datadir.load_state(data_dir)
        token = datadir.load_or_create_token(data_dir)
    except datadir.DataDirError as exc:
        raise UserError(str(exc)) from exc

    # Catch SIGINT/SIGTERM from the very start, so a stop request is never lost.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with contextlib.AsyncExitStack() as stack:
            node = await _open_node(stack, settings, state, data_dir)
            daemon = Daemon(node, settings=settings, data_dir=data_dir, state=state, token=token)
            ports = daemon.ports()
            state.udp_port, state.tcp_port = ports["udp"], ports["tcp"]
            api_sock = _bind_api_socket(settings, state)
            state.api_port = api_sock.getsockname()[1]
            daemon.api_url = _api_url(settings, state.api_port)
            await trio.to_thread.run_sync(datadir.save_state, data_dir, state)
            try:
                async with trio.open_nursery() as nursery:
                    api_done = trio.Event()
                    await nursery.start(_serve_api, daemon, api_sock, api_done)
                    await trio.to_thread.run_sync(functools.partial(
                        datadir.write_api_file, data_dir, url=daemon.api_url or "",
                        pid=os.getpid()))
                    _say(stream, f"p2pcloud {p2pcloud.__version__}")
                    _say(stream, f"data dir: {data_dir}")
                    _say(stream, f"hashname: {node.hashname}")
                    _say(stream, f"link URI: {node.link_uri}")
                    _say(stream, f"api: {daemon.api_url}")
                    _say(stream, "dashboard: run `p2pcloud dashboard` to open it logged in")
                    # "listening" comes last: scripts read the banner up to it as "ready"
                    _say(stream, "listening: " + ", ".join(str(p) for p in node.paths))
                    log.info("ready hashname=%s api=%s udp=%s tcp=%s core=%s", node.hashname,
                             daemon.api_url, ports["udp"], ports["tcp"],
                             core_implementation())
                    if args.once:
                        nursery.cancel_scope.cancel()
                        return EXIT_OK
                    nursery.start_soon(daemon.watch_links)
                    nursery.start_soon(daemon.tick_statistics)
                    nursery.start_soon(daemon.trim_memory)  # idle RSS (a phone)
                    if settings.relink:
                        nursery.start_soon(daemon.relink_known)
                    for uri in settings.link:
                        nursery.start_soon(_link, daemon, uri, stream)
                    nursery.start_soon(_watch_signals, daemon, signals, stream)
                    await daemon.shutdown_requested.wait()
                    log.info("stopping")
                    await daemon.say_bye()  # peers see us offline now, not in minutes
                    with trio.move_on_after(HTTP_GRACE + 1.0):
                        await api_done.wait()
                    nursery.cancel_scope.cancel()
            finally:
                with contextlib.suppress(OSError):
                    daemon.save_state_now()
                datadir.remove_api_file(data_dir, os.getpid())
    _say(stream, "p2pcloudd: stopped")
    return EXIT_OK


async def _watch_signals(daemon: Daemon, signals: Any, stream: TextIO) -> None:
    async for signum in signals:
        _say(stream, f"p2pcloudd: {signal.Signals(signum).name}, stopping")
        daemon.shutdown_requested.set()
        return


async def _link(daemon: Daemon, uri: str, stream: TextIO) -> None:
    try:
        hashname = await daemon.link(uri)
    except BadURI as exc:
        _say(stream, f"p2pcloudd: cannot link, bad URI: {exc}")
    except (p2pcloud.LinkError, p2pcloud.LocalProtocolError) as exc:
        _say(stream, f"p2pcloudd: cannot link: {exc}")
    except trio.TooSlowError:
        _say(stream, "p2pcloudd: cannot link: no answer in time")
    else:
        _say(stream, f"p2pcloudd: linked {hashname}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``p2pcloudd`` daemon.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 clean stop, 2 user error, 3 already running on this data dir.
    """
    args = build_parser().parse_args(argv)
    try:
        try:
            return trio.run(run, args)
        except BaseExceptionGroup as group:
            # A user error raised inside a nursery leaves as itself, not as a group.
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], UserError):
                raise group.exceptions[0] from None
            raise
    except UserError as exc:
        print(f"p2pcloudd: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:  # Ctrl-C before the signal handler was installed
        print("p2pcloudd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
