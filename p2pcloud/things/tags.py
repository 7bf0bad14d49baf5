"""Tags: the ``p2pcloud:`` URI a thing's QR code carries, its rendering and its decoding.

Theory of operation
-------------------
A tag points at a thing with no server in between (research/peers.md section 4, item 2:
SquareTag resolved tags through one central server; we carry the key in the tag). It holds
the thing's CS3a key and hashname (self-certifying: whoever answers must hold the key), where
to reach the owner's cloud (direct paths, or routers that introduce the thing by telehash v3
``peer``/``connect``), and one 16-byte secret: the one-time *claim secret* of a fresh tag or
the *finder capability* of a claimed tag. docs/things.md "tag URI" has the byte layout::

    version(1)=1 | kind(1) | cs3a key(32) | hashname(32) | secret(16) |
    path count(1) | paths... | check(4) = SHA-256(b"p2pcloud tag" | all before)[:4]

The text form is ``P2PCLOUD:`` + RFC 4648 base32 in upper case: every character is in the
QR alphanumeric set, so the code stays small (version 7 for a tag with one path). Parsing is
case-insensitive and raises only :class:`BadURI`, distinguishing truncated, altered (the
check), wrong version and foreign key (hashname not of the key). The check catches damage
and typing mistakes, not forgery: a forged tag is just a tag for another thing.

Rendering uses segno (PNG, SVG, terminal text, a printable sheet); decoding a photo uses
zxing-cpp on a Pillow image. Those two functions are the only ones here that touch images;
none does I/O (bytes in, bytes out).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import ipaddress
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any, Final

import segno

from p2pcloud._crypto import KEY_SIZE, hashname_from_keys
from p2pcloud._ids import Hashname
from p2pcloud._wire import b32decode, b32encode
from p2pcloud.errors import BadURI, MalformedPacket, TagImageError
from p2pcloud.things.thing import CLAIM_SECRET_SIZE, NewThing

__all__ = [
    "KIND_CLAIMED",
    "KIND_FRESH",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "MAX_TAG_PATHS",
    "MAX_TAG_TEXT",
    "SCHEME",
    "TAG_VERSION",
    "Tag",
    "TagPath",
    "claimed_tag",
    "decode_image",
    "fresh_tag",
    "parse_tag",
    "render_png",
    "render_sheet",
    "render_svg",
    "render_text",
    "scan_image",
]

SCHEME: Final = "p2pcloud"
TAG_VERSION: Final = 1
KIND_FRESH: Final = "fresh"
KIND_CLAIMED: Final = "claimed"
_KIND_BYTES: Final = {KIND_FRESH: 1, KIND_CLAIMED: 2}
_KIND_NAMES: Final = {v: k for k, v in _KIND_BYTES.items()}
_CHECK_CONTEXT: Final = b"p2pcloud tag"
CHECK_SIZE: Final = 4  # 32 bits: a damaged or mistyped tag passes with odds 1 in 4 billion
SECRET_SIZE: Final = CLAIM_SECRET_SIZE  # claim secret and finder capability are both 16 bytes
_FIXED: Final = 2 + KEY_SIZE + 32 + SECRET_SIZE + 1  # header up to and with the path count
MAX_TAG_PATHS: Final = 4
"""Most paths one tag lists: each costs up to 39 bytes and the code must stay small enough to
scan from a sticker; an owner's cloud needs a home box address and a router or two."""
MAX_TAG_TEXT: Final = 512
"""Longest tag text parsed: four router paths give about 330 characters."""
MAX_IMAGE_BYTES: Final = 50 * 1024 * 1024  # a phone photo is a few MB; refuse larger files
MAX_IMAGE_PIXELS: Final = 64_000_000  # 64 MP: beyond any phone camera; bounds decode memory

# Path types: what follows each type byte.
_PATH_UDP4: Final = 1  # ip(4) port(2): a direct UDP address answering for the thing
_PATH_TCP4: Final = 2  # ip(4) port(2)
_PATH_UDP6: Final = 3  # ip(16) port(2)
_PATH_ROUTER: Final = 4  # router CS3a key(32) ip(4) port(2): link it, ask it to introduce
_PATH_NAMES: Final = {_PATH_UDP4: "udp4", _PATH_TCP4: "tcp4", _PATH_UDP6: "udp6",
                      _PATH_ROUTER: "router"}
_PATH_TYPES: Final = {v: k for k, v in _PATH_NAMES.items()}
_PATH_SIZES: Final = {_PATH_UDP4: 6, _PATH_TCP4: 6, _PATH_UDP6: 18, _PATH_ROUTER: 38}


@dataclass(frozen=True, slots=True)
class TagPath:
    """One way a tag says to reach the owner's cloud.

    Attributes:
        type: ``"udp4"``, ``"tcp4"``, ``"udp6"`` (the thing's hashname answers there) or
            ``"router"`` (an endpoint that introduces the thing; ``key`` is its CS3a key).
        ip: the address. port: the port.
        key: the router's CS3a key (routers only).
    """

    type: str
    ip: str
    port: int
    key: bytes = b""

    def to_path(self) -> dict[str, Any]:
        """The telehash v3 path object of the address (the router's own, for a router)."""
        kind = "udp4" if self.type == "router" else self.type
        return {"type": kind, "ip": self.ip, "port": self.port}

    @property
    def router_hashname(self) -> Hashname | None:
        """The router's hashname (None unless this is a router path)."""
        return hashname_from_keys({"3a": self.key}) if self.type == "router" else None


@dataclass(frozen=True, slots=True)
class Tag:
    """A parsed tag.

    Attributes:
        kind: ``"fresh"`` (``secret`` is the claim secret) or ``"claimed"`` (``secret`` is the
            finder capability).
        key: the thing's CS3a public key. hashname: the thing's hashname (matches ``key``).
        secret: 16 bytes. paths: where to reach the owner's cloud.
        version: the format version read.
    """

    kind: str
    key: bytes
    hashname: Hashname
    secret: bytes
    paths: tuple[TagPath, ...] = field(default_factory=tuple)
    version: int = TAG_VERSION

    @property
    def is_fresh(self) -> bool:
        """Whether this is a fresh (unclaimed) tag."""
        return self.kind == KIND_FRESH

    def to_bytes(self) -> bytes:
        """The binary form (docs/things.md), check included.

        Raises:
            BadURI: a field breaks the format (wrong sizes, too many paths, bad address).
        """
        if self.kind not in _KIND_BYTES:
            raise BadURI(f"unknown tag kind {self.kind!r}")
        if len(self.key) != KEY_SIZE or len(self.secret) != SECRET_SIZE:
            raise BadURI("a tag's key is 32 bytes and its secret 16")
        if hashname_from_keys({"3a": self.key}) != self.hashname:
            raise BadURI("the hashname is not the key's")
        if len(self.paths) > MAX_TAG_PATHS:
            raise BadURI(f"a tag lists at most {MAX_TAG_PATHS} paths")
        out = bytearray((TAG_VERSION, _KIND_BYTES[self.kind]))
        out += self.key + b32decode(self.hashname) + self.secret
        out.append(len(self.paths))
        for path in self.paths:
            out += _encode_path(path)
        out += _check(bytes(out))
        return bytes(out)

    def uri(self) -> str:
        """The URI text (``P2PCLOUD:`` + upper-case base32), what the QR code holds."""
        return SCHEME.upper() + ":" + b32encode(self.to_bytes()).upper()


def _check(data: bytes) -> bytes:
    return hashlib.sha256(_CHECK_CONTEXT + data).digest()[:CHECK_SIZE]


def _encode_path(path: TagPath) -> bytes:
    ptype = _PATH_TYPES.get(path.type)
    if ptype is None:
        raise BadURI(f"a tag cannot carry a {path.type!r} path")
    if not 0 < path.port < 65536:
        raise BadURI(f"port {path.port} out of range")
    try:
        addr = ipaddress.ip_address(path.ip)
    except ValueError as exc:
        raise BadURI(f"bad address {path.ip!r}") from exc
    if (addr.version == 6) != (ptype == _PATH_UDP6):
        raise BadURI(f"a {path.type} path needs an IPv{6 if ptype == _PATH_UDP6 else 4} address")
    body = addr.packed + path.port.to_bytes(2, "big")
    if ptype == _PATH_ROUTER:
        if len(path.key) != KEY_SIZE:
            raise BadURI("a router path needs the router's 32-byte CS3a key")
        body = path.key + body
    return bytes((ptype,)) + body


def _decode_path(ptype: int, body: bytes) -> TagPath:
    key = b""
    if ptype == _PATH_ROUTER:
        key, body = body[:KEY_SIZE], body[KEY_SIZE:]
    port = int.from_bytes(body[-2:], "big")
    ip = str(ipaddress.ip_address(body[:-2]))
    if port == 0:
        raise BadURI("the tag is altered or damaged: a path has port 0")
    return TagPath(_PATH_NAMES[ptype], ip, port, key)


def fresh_tag(thing: NewThing, paths: Sequence[TagPath] = ()) -> Tag:
    """The fresh tag of a new thing (carries its one-time claim secret).

    Args:
        thing: from ``p2pcloud.things.thing.new_thing``.
        paths: where the cloud holding the thing answers.

    Returns:
        The tag.
    """
    return Tag(KIND_FRESH, thing.identity.cs3a_public, thing.hashname, thing.claim_secret,
               tuple(paths))


def claimed_tag(key: bytes, finder_cap: bytes, paths: Sequence[TagPath] = ()) -> Tag:
    """The tag of a claimed thing (carries the finder capability).

    Args:
        key: the thing's CS3a public key. finder_cap: its current finder capability.
        paths: where the owner's cloud answers.

    Returns:
        The tag.
    """
    return Tag(KIND_CLAIMED, bytes(key), hashname_from_keys({"3a": key}), bytes(finder_cap),
               tuple(paths))


def _b32_lenient(body: str) -> tuple[bytes, bool]:
    """Decode base32, cutting a truncated final group; returns (bytes, was_cut)."""
    try:
        return b32decode(body), False
    except MalformedPacket:
        pass
    # A cut-off text ends in a partial 8-character group; decode what is whole so the error
    # can say "truncated" rather than "not base32".
    for cut in range(1, 8):
        if len(body) <= cut:
            break
        try:
            return b32decode(body[:-cut]), True
        except MalformedPacket:
            continue
    raise BadURI("the tag is altered or damaged: its text is not base32")


def parse_tag(text: str) -> Tag:
    """Parse a tag URI.

    Args:
        text: the text a QR code held (surrounding spaces are ignored, case is not).

    Returns:
        The :class:`Tag`.

    Raises:
        BadURI: not a p2pcloud tag, truncated, altered (the check fails), a version this
            code does not read, or a foreign key (the hashname is not the key's).
    """
    if not isinstance(text, str):
        raise BadURI("a tag is text")
    text = text.strip()
    if len(text) > MAX_TAG_TEXT:
        raise BadURI(f"not a p2pcloud tag: longer than {MAX_TAG_TEXT} characters")
    scheme, sep, body = text.partition(":")
    if not sep or scheme.lower() != SCHEME:
        raise BadURI("not a p2pcloud tag: it does not start with 'p2pcloud:'")
    if not body.isascii() or not body.isalnum():
        raise BadURI("the tag is altered or damaged: unexpected characters after 'p2pcloud:'")
    data, cut = _b32_lenient(body.lower())
    if len(data) < 1:
        raise BadURI("the tag is truncated: it holds no data; scan the whole code again")
    if data[0] != TAG_VERSION:
        raise BadURI(f"tag format version {data[0]} is not supported (this p2pcloud reads "
                     f"version {TAG_VERSION}); update p2pcloud to read it")
    need = _FIXED
    if len(data) >= need:
        offset = _FIXED
        for _ in range(data[_FIXED - 1]):
            if len(data) <= offset:
                need = offset + 1
                break
            size = _PATH_SIZES.get(data[offset])
            if size is None:
                raise BadURI("the tag is altered or damaged: unknown path type "
                             f"{data[offset]}")
            offset += 1 + size
            need = offset
        need += CHECK_SIZE
    if len(data) < need or cut:
        raise BadURI(f"the tag is truncated ({len(data)} bytes, its layout needs {need}); "
                     "scan or copy the whole code")
    if len(data) > need:
        raise BadURI("the tag is altered or damaged: extra bytes after its check")
    if not hmac.compare_digest(_check(data[:-CHECK_SIZE]), data[-CHECK_SIZE:]):
        raise BadURI("the tag is altered or damaged: its integrity check does not match")
    if data[_FIXED - 1] > MAX_TAG_PATHS:
        raise BadURI(f"the tag lists more than {MAX_TAG_PATHS} paths")
    kind = _KIND_NAMES.get(data[1])
    if kind is None:
        raise BadURI(f"unknown tag kind {data[1]}")
    key = data[2:2 + KEY_SIZE]
    named = data[2 + KEY_SIZE:2 + KEY_SIZE + 32]
    if hashname_from_keys({"3a": key}) != b32encode(named):
        raise BadURI("foreign key: the tag's key does not belong to its hashname; "
                     "refusing it (the tag was forged or mixed up)")
    secret = data[2 + KEY_SIZE + 32:_FIXED - 1]
    paths = []
    offset = _FIXED
    for _ in range(data[_FIXED - 1]):
        ptype = data[offset]
        size = _PATH_SIZES[ptype]
        paths.append(_decode_path(ptype, data[offset + 1:offset + 1 + size]))
        offset += 1 + size
    return Tag(kind, bytes(key), Hashname(b32encode(named)), bytes(secret), tuple(paths))


# -- rendering (segno) ---------------------------------------------------------------------------


def _qr(uri: str) -> Any:
    # Error correction M (15%): survives a scuffed sticker, keeps the code one version smaller
    # than Q; micro=False because phone scanners often do not read Micro QR.
    return segno.make(uri, error="m", micro=False, boost_error=False)


def render_png(tag: Tag | str, *, scale: int = 8, border: int = 4) -> bytes:
    """Render a tag as a PNG image (black on white).

    Args:
        tag: a :class:`Tag` or its URI. scale: pixels per module. border: quiet-zone modules.

    Returns:
        The PNG bytes.
    """
    out = io.BytesIO()
    _qr(tag.uri() if isinstance(tag, Tag) else tag).save(out, kind="png", scale=scale,
                                                          border=border)
    return out.getvalue()


def render_svg(tag: Tag | str, *, scale: int = 4, border: int = 4) -> bytes:
    """Render a tag as an SVG image for printing.

    Args:
        tag: a :class:`Tag` or its URI. scale: user units per module. border: quiet zone.

    Returns:
        The SVG document (UTF-8 bytes).
    """
    out = io.BytesIO()
    _qr(tag.uri() if isinstance(tag, Tag) else tag).save(out, kind="svg", scale=scale,
                                                          border=border)
    return out.getvalue()


def render_text(tag: Tag | str) -> str:
    """Render a tag for a terminal (half-block characters, two rows per line).

    Args:
        tag: a :class:`Tag` or its URI.

    Returns:
        The text, ready to print.
    """
    out = io.StringIO()
    _qr(tag.uri() if isinstance(tag, Tag) else tag).terminal(out=out, compact=True)
    return out.getvalue()


def _label(tag: Tag) -> str:
    return f"{tag.kind} {tag.hashname[:8]}"


def render_sheet(tags: Sequence[Tag], *, labels: Sequence[str] | None = None,
                 kind: str = "svg", columns: int = 4, scale: int = 4) -> bytes:
    """Lay out tags on one printable page, each with a label under its code.

    Args:
        tags: the tags (e.g. fresh tags of new things). labels: one per tag; default the
            kind and the first 8 characters of the hashname, so a printed tag can be matched
            to its thing. kind: ``"svg"`` or ``"png"``. columns: codes per row.
        scale: pixels (PNG) or user units (SVG) per module.

    Returns:
        The page as SVG or PNG bytes.

    Raises:
        ValueError: an unknown kind, no tags, or labels of the wrong count.
    """
    if not tags:
        raise ValueError("a sheet needs at least one tag")
    texts = list(labels) if labels is not None else [_label(t) for t in tags]
    if len(texts) != len(tags):
        raise ValueError("give one label per tag")
    if kind not in ("svg", "png") or columns < 1:
        raise ValueError("kind is 'svg' or 'png'; columns at least 1")
    matrices = [_qr(t.uri()).matrix for t in tags]
    border = 4
    modules = max(len(m) for m in matrices) + 2 * border
    cell = modules * scale
    label_h = max(14, 4 * scale)
    pitch_y = cell + label_h + 2 * scale
    rows = (len(tags) + columns - 1) // columns
    width, height = columns * cell, rows * pitch_y
    cells = [((i % columns) * cell, (i // columns) * pitch_y) for i in range(len(tags))]
    if kind == "svg":
        parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                 f'viewBox="0 0 {width} {height}">',
                 f'<rect width="{width}" height="{height}" fill="#fff"/>']
        for (x0, y0), matrix, text in zip(cells, matrices, texts, strict=True):
            off = border + (modules - 2 * border - len(matrix)) // 2
            d = "".join(f"M{x0 + (c + off) * scale} {y0 + (r + off) * scale}h{scale}v{scale}"
                        f"h-{scale}z"
                        for r, row in enumerate(matrix) for c, v in enumerate(row) if v & 1)
            parts.append(f'<path fill="#000" d="{d}"/>')
            parts.append(f'<text x="{x0 + cell // 2}" y="{y0 + cell + label_h - 2}" '
                         f'font-family="monospace" font-size="{label_h - 2}" '
                         f'text-anchor="middle">{escape(text)}</text>')
        parts.append("</svg>")
        return "\n".join(parts).encode("utf-8")
    from PIL import Image, ImageDraw, ImageFont

    page = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=label_h - 2)
    for (x0, y0), matrix, text in zip(cells, matrices, texts, strict=True):
        off = border + (modules - 2 * border - len(matrix)) // 2
        for r, row in enumerate(matrix):
            for c, v in enumerate(row):
                if v & 1:
                    x, y = x0 + (c + off) * scale, y0 + (r + off) * scale
                    draw.rectangle((x, y, x + scale - 1, y + scale - 1), fill=0)
        draw.text((x0 + cell // 2, y0 + cell + 1), text, fill=0, font=font, anchor="mt")
    out = io.BytesIO()
    page.save(out, format="PNG")
    return out.getvalue()


# -- decoding photos and screenshots (zxing-cpp) ---------------------------------------------------


def _load_image(image: Any) -> Any:
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        img = image
    else:
        if not isinstance(image, (bytes, bytearray)):
            raise TagImageError("give the image as bytes or a PIL image")
        if len(image) > MAX_IMAGE_BYTES:
            raise TagImageError(f"the image is larger than {MAX_IMAGE_BYTES} bytes")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(bytes(image)))
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise TagImageError(f"the image has more than {MAX_IMAGE_PIXELS} pixels")
                img.load()
        except TagImageError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
                Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise TagImageError(f"the file is not an image this program can read ({exc})"
                                ) from exc
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise TagImageError(f"the image has more than {MAX_IMAGE_PIXELS} pixels")
    return img.convert("L")


def decode_image(image: Any) -> list[Tag]:
    """Find every p2pcloud tag in a photo or screenshot, in reading order.

    Args:
        image: encoded image bytes (PNG, JPEG, ...) or a PIL image.

    Returns:
        The tags, top to bottom then left to right (one per tag on a sheet).

    Raises:
        TagImageError: the bytes are not an image, or no QR code is in it.
        BadURI: QR codes were found but none is a valid p2pcloud tag (the first one's
            error says why).
    """
    import zxingcpp

    img = _load_image(image)
    qr_only = zxingcpp.BarcodeFormats(zxingcpp.BarcodeFormat.QRCode)
    found = zxingcpp.read_barcodes(img, formats=qr_only)
    if not found:
        raise TagImageError("no QR code found in the image; photograph the tag square on, "
                            "in focus, with some white around it")
    def reading_order(code: Any) -> tuple[int, int]:
        pos = code.position
        height = max(1, abs(pos.bottom_left.y - pos.top_left.y))
        return (pos.top_left.y + height // 2) // height, pos.top_left.x

    placed = sorted(found, key=reading_order)
    tags: list[Tag] = []
    first_error: BadURI | None = None
    for code in placed:
        try:
            tag = parse_tag(code.text)
        except BadURI as exc:
            first_error = first_error or exc
            continue
        if tag not in tags:
            tags.append(tag)
    if not tags:
        assert first_error is not None
        raise BadURI(f"the QR code is not a p2pcloud tag: {first_error}") from first_error
    return tags


def scan_image(image: Any) -> Tag:
    """Decode the one tag in a photo (what ``p2pcloud scan FILE`` does).

    Args:
        image: encoded image bytes or a PIL image.

    Returns:
        The tag.

    Raises:
        TagImageError: not an image, no QR code, or several different tags in it.
        BadURI: the QR code is not a p2pcloud tag.
    """
    tags = decode_image(image)
    if len(tags) > 1:
        raise TagImageError(f"{len(tags)} different tags in the image; crop it to one")
    return tags[0]
