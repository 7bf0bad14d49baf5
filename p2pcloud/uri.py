"""Link URIs: an endpoint's keys and paths as one line of text (telehash v3 uri.md).

Form: ``link://host[:port]/?cs3a=<base32 CSK>[&paths=<base32(paths JSON)>]``.

* ``cs<csid>`` parameters carry raw cipher-set keys (base32); the hashname is computed from
  all of them, so a URI is self-certifying: whoever answers must hold those keys.
* ``paths`` carries base32 of a JSON array of v3 path objects (``{"type":"udp4","ip":...,
  "port":...}``); a single object is accepted too, and several ``paths`` parameters add up.
* ``host:port`` (default port 42424) is where to try first; when ``host`` is an IPv4
  literal it also becomes a ``udp4`` path.

Pure: no I/O. Parsing raises only :class:`BadURI`, with a message that says what is wrong.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from p2pcloud._crypto import LocalIdentity, hashname_from_keys
from p2pcloud._ids import Hashname
from p2pcloud._wire import b32decode, b32encode
from p2pcloud.errors import BadURI, MalformedPacket

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_SCHEME",
    "MAX_PATHS",
    "MAX_URI",
    "LinkInfo",
    "format_link_uri",
    "parse_link_uri",
]

DEFAULT_SCHEME = "link"
"""telehash v3 uri.md: the scheme may be app-specific; ``link`` is the default."""

DEFAULT_PORT = 42424
"""telehash v3 uri.md: the default port of a link URI."""

MAX_URI = 4096
"""Longest URI we parse: a key and a handful of paths take a few hundred characters; QR
codes hold at most about 4 KiB, so nothing longer can come from a tag."""

MAX_PATHS = 32
"""Most paths one URI may list; a device has a few addresses, this bounds peer input."""

_CSID_PARAM = re.compile(r"cs([0-9a-f]{2})\Z")
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*\Z")
_KEY_SIZES = {"3a": 32}  # sizes we can check; other cipher sets only feed the hashname


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """What a link URI says about an endpoint.

    Attributes:
        hashname: computed from ``keys`` (never taken on trust from the text).
        keys: CSID text (``"3a"``) to raw key bytes.
        paths: v3 path objects (``{"type": "udp4", "ip": ..., "port": ...}``).
        host: the URI's host ("" if none).
        port: the URI's port (DEFAULT_PORT when not given).
    """

    hashname: Hashname
    keys: dict[str, bytes]
    paths: list[dict[str, Any]] = field(default_factory=list)
    host: str = ""
    port: int = DEFAULT_PORT


def _paths_from_param(text: str) -> list[dict[str, Any]]:
    try:
        raw = b32decode(text)
    except MalformedPacket as exc:
        raise BadURI(f"the paths parameter is not base32 ({exc}); copy the whole URI") from exc
    try:
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise BadURI("the paths parameter does not hold JSON") from exc
    items = value if isinstance(value, list) else [value]
    paths: list[dict[str, Any]] = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise BadURI('each path must be a JSON object with a "type"')
        paths.append(item)
    return paths


def parse_link_uri(text: str, *, scheme: str = DEFAULT_SCHEME) -> LinkInfo:
    """Parse a link URI.

    Args:
        text: the URI.
        scheme: the expected scheme (apps may use their own).

    Returns:
        The :class:`LinkInfo`, its hashname computed from the keys.

    Raises:
        BadURI: wrong scheme, no or bad keys, bad paths, bad port, or too long.
    """
    if not isinstance(text, str):
        raise BadURI("a link URI must be text")
    if len(text) > MAX_URI:
        raise BadURI(f"link URI longer than {MAX_URI} characters")
    if not text.isascii() or any(c.isspace() or ord(c) < 0x20 for c in text):
        raise BadURI("link URI contains spaces or non-ASCII characters; copy it exactly")
    try:
        parts = urlsplit(text)
        port = parts.port
        host = parts.hostname or ""
    except ValueError as exc:
        raise BadURI(f"link URI does not parse: {exc}") from exc
    if port == 0:
        raise BadURI("port 0 is not a port to link to")
    if parts.scheme != scheme:
        raise BadURI(f"expected a {scheme}:// URI, got {parts.scheme or 'no'} scheme")
    if parts.username is not None or parts.password is not None:
        raise BadURI("link URIs carry no user name or password")
    keys: dict[str, bytes] = {}
    paths: list[dict[str, Any]] = []
    try:
        params = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False)
    except ValueError as exc:
        raise BadURI(f"bad query in link URI: {exc}") from exc
    for name, value in params:
        match = _CSID_PARAM.match(name)
        if match:
            csid = match.group(1)
            if csid in keys:
                raise BadURI(f"key cs{csid} given twice")
            try:
                key = b32decode(value)
            except MalformedPacket as exc:
                raise BadURI(f"key cs{csid} is not base32 ({exc})") from exc
            expected = _KEY_SIZES.get(csid)
            if (expected is not None and len(key) != expected) or not key:
                raise BadURI(f"key cs{csid} has the wrong length ({len(key)} bytes)")
            keys[csid] = key
        elif name == "paths":
            paths.extend(_paths_from_param(value))
            if len(paths) > MAX_PATHS:
                raise BadURI(f"more than {MAX_PATHS} paths")
        # Other parameters are ignored, as v3 readers ignore unknown fields.
    if "3a" not in keys:
        raise BadURI("link URI has no cs3a key; p2pcloud links only with cipher set 3a")
    try:
        hashname = hashname_from_keys(keys)
    except MalformedPacket as exc:  # pragma: no cover - keys validated above
        raise BadURI(f"keys do not make a hashname: {exc}") from exc
    if host:
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            addr = None
        if addr is not None and addr.version == 4:
            direct = {"type": "udp4", "ip": host, "port": port or DEFAULT_PORT}
            if direct not in paths:
                paths.insert(0, direct)
    return LinkInfo(hashname=hashname, keys=keys, paths=paths, host=host, port=port or DEFAULT_PORT)


def format_link_uri(
    identity: LocalIdentity | Mapping[str, bytes],
    paths: Sequence[Mapping[str, Any]] = (),
    *,
    host: str = "",
    port: int = DEFAULT_PORT,
    scheme: str = DEFAULT_SCHEME,
) -> str:
    """Write a link URI for an identity (or raw keys) and its paths.

    Args:
        identity: our identity, or CSID text to raw key bytes.
        paths: v3 path objects to include (base32 of their compact JSON array).
        host: the host part; defaults to the first udp4/tcp4 path's ip, else ``localhost``.
        port: the port part (left out when it is DEFAULT_PORT).
        scheme: the URI scheme.

    Returns:
        The URI text; :func:`parse_link_uri` gives back the same keys and paths.

    Raises:
        BadURI: a bad scheme, port or host, or paths that are not JSON objects.
    """
    if not _SCHEME.match(scheme):
        raise BadURI(f"bad scheme {scheme!r}")
    keys = {"3a": identity.cs3a_public} if isinstance(identity, LocalIdentity) else identity
    path_list = [dict(p) for p in paths]
    if not host:
        for p in path_list:
            if p.get("type") in ("udp4", "tcp4") and isinstance(p.get("ip"), str):
                host, port = p["ip"], int(p.get("port", port))
                break
        else:
            host = "localhost"
    if not 0 < port < 65536:
        raise BadURI(f"port {port} out of range")
    if not host.isascii() or any(c in host for c in "/?#@[] "):
        raise BadURI(f"bad host {host!r}")
    netloc = host if port == DEFAULT_PORT else f"{host}:{port}"
    query = [f"cs{csid}={b32encode(key)}" for csid, key in sorted(keys.items())]
    if path_list:
        try:
            text = json.dumps(path_list, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise BadURI(f"paths are not JSON: {exc}") from exc
        query.append("paths=" + b32encode(text.encode("utf-8")))
    return f"{scheme}://{quote(netloc, safe=':.')}/?{'&'.join(query)}"
