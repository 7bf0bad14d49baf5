"""``p2pcloudd``: run a p2pcloud node until Ctrl-C or SIGTERM.

With no arguments it creates (first start) or loads the identity in the default data dir
(``$P2PCLOUD_HOME``, else ``$XDG_DATA_HOME/p2pcloud``, else ``~/.local/share/p2pcloud``), binds
UDP and TCP on 127.0.0.1, prints the hashname and the link URI another node needs to link to
it, and serves until stopped. User errors (a port in use, a bad key file, a bad URI) print one
clear line on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import trio

import p2pcloud
from p2pcloud._node.node import default_data_dir
from p2pcloud._node.transport import TransportError
from p2pcloud.errors import BadURI, KeyFileError, LinkError, LocalProtocolError, WrongPassphrase
from p2pcloud.uri import parse_link_uri

DEFAULT_PORT = 42424  # telehash v3 uri.md: the default port of link URIs
PASSPHRASE_ENV = "P2PCLOUD_PASSPHRASE"  # noqa: S105  (a variable name: read when sealed)
EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem the user can fix; printed as one line, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``p2pcloudd``."""
    parser = argparse.ArgumentParser(
        prog="p2pcloudd",
        description="Run a p2pcloud node: print its hashname and link URI, serve until "
        "Ctrl-C or SIGTERM.",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the identity key file lives (default: $P2PCLOUD_HOME, else "
        "$XDG_DATA_HOME/p2pcloud, else ~/.local/share/p2pcloud)",
    )
    parser.add_argument(
        "--port",
        type=_port,
        default=None,
        help=f"UDP port (default {DEFAULT_PORT}, or a free one if that is taken; 0: any)",
    )
    parser.add_argument(
        "--tcp-port",
        type=_port,
        default=None,
        help="TCP port (default: the UDP port's number if free, else any; 0: any)",
    )
    parser.add_argument(
        "--bind",
        default="127.0.0.1",
        help="local address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)",
    )
    parser.add_argument(
        "--link",
        action="append",
        default=[],
        metavar="URI",
        help="link to this peer at start (a link:// URI); may be given several times",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="start, print the hashname and link URI, and exit (checks the setup)",
    )
    return parser


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0..65535: {value}")
    return value


async def _start_node(
    stack: contextlib.AsyncExitStack, args: argparse.Namespace, data_dir: Path
) -> p2pcloud.Node:
    passphrase = os.environ.get(PASSPHRASE_ENV) or None
    port = args.port if args.port is not None else DEFAULT_PORT
    tcp_port = args.tcp_port if args.tcp_port is not None else port
    try:
        try:
            return await stack.enter_async_context(
                p2pcloud.open_node(
                    data_dir, port=port, tcp_port=tcp_port, bind=args.bind, passphrase=passphrase
                )
            )
        except TransportError:
            if args.port is not None or args.tcp_port is not None:
                raise
            # The default port is taken (another node?): any free port works as well, and
            # the link URI printed next says which one.
            return await stack.enter_async_context(
                p2pcloud.open_node(data_dir, port=0, tcp_port=0, bind=args.bind,
                                   passphrase=passphrase)
            )
    except WrongPassphrase as exc:
        raise UserError(f"{exc} (set {PASSPHRASE_ENV})") from exc
    except TransportError as exc:
        raise UserError(exc.strerror or str(exc)) from exc
    except KeyFileError as exc:
        raise UserError(str(exc)) from exc


async def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the daemon with parsed arguments.

    Args:
        args: from :func:`build_parser`.
        out: where the banner and status lines go (default stdout).

    Returns:
        The exit status.

    Raises:
        UserError: a problem the user can fix.
    """
    stream = out if out is not None else sys.stdout
    data_dir = args.data_dir if args.data_dir is not None else default_data_dir()
    for uri in args.link:  # check every URI before starting anything
        try:
            parse_link_uri(uri)
        except BadURI as exc:
            raise UserError(f"--link {uri!r}: {exc}") from exc
    # Catch SIGINT/SIGTERM from the very start, so a stop request is never lost.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with contextlib.AsyncExitStack() as stack:
            node = await _start_node(stack, args, data_dir)
            _say(stream, f"p2pcloud {p2pcloud.__version__}")
            _say(stream, f"data dir: {data_dir}")
            _say(stream, f"hashname: {node.hashname}")
            _say(stream, f"link URI: {node.link_uri}")
            _say(stream, "listening: " + ", ".join(str(p) for p in node.paths))
            if args.once:
                return 0
            async with trio.open_nursery() as nursery:
                for uri in args.link:
                    nursery.start_soon(_link, node, uri, stream)
                async for signum in signals:
                    _say(stream, f"p2pcloudd: {signal.Signals(signum).name}, stopping")
                    break
                nursery.cancel_scope.cancel()
    _say(stream, "p2pcloudd: stopped")
    return 0


def _say(stream: TextIO, line: str) -> None:
    print(line, file=stream, flush=True)


async def _link(node: p2pcloud.Node, uri: str, stream: TextIO) -> None:
    try:
        hashname = await node.link(uri)
    except BadURI as exc:
        _say(stream, f"p2pcloudd: cannot link, bad URI: {exc}")
    except (LinkError, LocalProtocolError) as exc:
        _say(stream, f"p2pcloudd: cannot link: {exc}")
    else:
        _say(stream, f"p2pcloudd: linked {hashname}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``p2pcloudd`` command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status (0 after a clean stop, 2 for a user error).
    """
    args = build_parser().parse_args(argv)
    try:
        return trio.run(run, args)
    except UserError as exc:
        print(f"p2pcloudd: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # Ctrl-C before the signal handler was installed
        print("p2pcloudd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
