"""Tag URIs (round trip, every kind of bad tag), rendering, and decoding real images."""

from __future__ import annotations

import io
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageFilter

from p2pcloud._crypto import LocalIdentity
from p2pcloud._wire import b32decode, b32encode
from p2pcloud.errors import BadURI, TagImageError
from p2pcloud.things import tags as tg
from p2pcloud.things import thing as t
from tests.things.helpers import SeededEntropy

ROUTER_KEY = LocalIdentity.generate(SeededEntropy("router")).cs3a_public
PATHS = (tg.TagPath("udp4", "192.168.1.20", 42424), tg.TagPath("tcp4", "192.168.1.20", 42425),
         tg.TagPath("udp6", "2001:db8::1", 42424),
         tg.TagPath("router", "203.0.113.7", 42424, ROUTER_KEY))


def fresh(seed: str = "t", paths: tuple[tg.TagPath, ...] = PATHS[:1]) -> tg.Tag:
    return tg.fresh_tag(t.new_thing(SeededEntropy(seed)), paths)


def body(tag: tg.Tag) -> bytes:
    return tag.to_bytes()


def text_of(data: bytes) -> str:
    return "P2PCLOUD:" + b32encode(data).upper()


def with_check(data: bytes) -> bytes:
    """Re-compute the integrity check (an attacker or a newer writer could)."""
    import hashlib

    return data + hashlib.sha256(b"p2pcloud tag" + data).digest()[:4]


@pytest.mark.parametrize("paths", [(), PATHS[:1], PATHS])
def test_round_trip(paths: tuple[tg.TagPath, ...]) -> None:
    tag = fresh(paths=paths)
    uri = tag.uri()
    assert uri.startswith("P2PCLOUD:") and uri == uri.upper()
    assert tg.parse_tag(uri) == tag
    assert tg.parse_tag(uri.lower()) == tag  # case does not matter
    assert tg.parse_tag("  " + uri + "\n") == tag
    claimed = tg.claimed_tag(tag.key, b"\x07" * 16, paths)
    assert tg.parse_tag(claimed.uri()) == claimed and not claimed.is_fresh
    assert tag.is_fresh and len(uri) <= tg.MAX_TAG_TEXT


def test_router_path_names_the_router() -> None:
    tag = fresh(paths=PATHS)
    router = tg.parse_tag(tag.uri()).paths[3]
    assert router.router_hashname == LocalIdentity.generate(SeededEntropy("router")).hashname
    assert router.to_path() == {"type": "udp4", "ip": "203.0.113.7", "port": 42424}


def test_compact_enough_for_a_small_qr_code() -> None:
    import segno

    qr = segno.make(fresh().uri(), error="m", micro=False)
    assert qr.mode == "alphanumeric"
    assert qr.version <= 7  # 45x45 modules: prints at 2 cm and scans from a phone


def test_truncated() -> None:
    uri = fresh().uri()
    for cut in (1, 2, 5, 8, 20, len(uri) - 12):
        with pytest.raises(BadURI, match="truncated"):
            tg.parse_tag(uri[:-cut])


def test_altered() -> None:
    uri = fresh().uri()
    for pos in (12, 40, 90, len(uri) - 2):
        char = "A" if uri[pos] != "A" else "B"
        with pytest.raises(BadURI, match="altered or damaged"):
            tg.parse_tag(uri[:pos] + char + uri[pos + 1:])
    with pytest.raises(BadURI, match="altered or damaged"):
        tg.parse_tag(text_of(body(fresh()) + b"\x00"))
    with pytest.raises(BadURI, match="altered or damaged"):
        tg.parse_tag(uri[:20] + "!" + uri[21:])


def test_wrong_version() -> None:
    data = body(fresh())
    newer = with_check(bytes([2]) + data[1:-4])
    with pytest.raises(BadURI, match="version 2 is not supported"):
        tg.parse_tag(text_of(newer))


def test_foreign_key() -> None:
    data = bytearray(body(fresh())[:-4])
    other = LocalIdentity.generate(SeededEntropy("other")).cs3a_public
    data[2:34] = other  # someone else's key under this thing's hashname
    with pytest.raises(BadURI, match="foreign key"):
        tg.parse_tag(text_of(with_check(bytes(data))))


def test_not_a_tag() -> None:
    for text in ("https://example.com/x", "link://host/?cs3a=abc", "", "p2pcloud:",
                 "P2PCLOUD:" + "A" * 600, 42):
        with pytest.raises(BadURI):
            tg.parse_tag(text)  # type: ignore[arg-type]


def test_bad_tags_never_raise_anything_else() -> None:
    rng = random.Random(7)
    uri = fresh(paths=PATHS).uri()
    refused = 0
    for _ in range(400):
        chars = list(uri)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            pos = rng.randrange(len(chars))
            if op < 0.4:
                chars[pos] = rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
            elif op < 0.7 and len(chars) > 10:
                del chars[pos]
            else:
                chars.insert(pos, rng.choice("A2Z7"))
        mutated = "".join(chars)
        try:
            parsed = tg.parse_tag(mutated)
        except BadURI:
            refused += 1
            continue
        assert parsed.uri() == mutated  # only a mutation that undid itself parses
    assert refused > 350


def test_encode_refuses_bad_fields() -> None:
    tag = fresh()
    with pytest.raises(BadURI):
        tg.Tag("fresh", tag.key, tag.hashname, b"short").uri()
    with pytest.raises(BadURI):
        tg.Tag("fresh", tag.key, tag.hashname, tag.secret, PATHS + PATHS[:1]).uri()
    with pytest.raises(BadURI):
        tg.Tag("fresh", tag.key, tag.hashname, tag.secret,
               (tg.TagPath("udp4", "2001:db8::1", 1),)).uri()
    with pytest.raises(BadURI):
        tg.Tag("fresh", ROUTER_KEY, tag.hashname, tag.secret).uri()


# -- rendering and decoding --------------------------------------------------------------------


def test_png_decodes_with_zxing() -> None:
    tag = fresh(paths=PATHS[:2])
    png = tg.render_png(tag)
    assert png.startswith(b"\x89PNG")
    assert tg.scan_image(png) == tag


def photo_like(png: bytes, seed: int) -> bytes:
    """Scale, rotate a little, put on a larger grey margin, add noise and blur; JPEG."""
    rng = random.Random(seed)
    img = Image.open(io.BytesIO(png)).convert("L")
    img = img.resize((int(img.width * 0.8), int(img.height * 0.8)), Image.Resampling.BILINEAR)
    img = img.rotate(rng.uniform(4, 9), resample=Image.Resampling.BICUBIC, expand=True,
                     fillcolor=255)
    canvas = Image.new("L", (img.width + 160, img.height + 120), 200)
    canvas.paste(img, (rng.randint(40, 120), rng.randint(30, 90)))
    pixels = canvas.load()
    assert pixels is not None
    for y in range(canvas.height):
        for x in range(canvas.width):
            pixels[x, y] = max(0, min(255, pixels[x, y] + int(rng.gauss(0, 18))))  # type: ignore[index,operator]
    canvas = canvas.filter(ImageFilter.GaussianBlur(0.8))
    out = io.BytesIO()
    canvas.convert("RGB").save(out, format="JPEG", quality=80)
    return out.getvalue()


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_photo_like_image_decodes(seed: int) -> None:
    tag = fresh(f"photo {seed}", paths=PATHS[:seed % 3])
    assert tg.scan_image(photo_like(tg.render_png(tag, scale=6), seed=seed)) == tag


def test_svg_and_text_render() -> None:
    tag = fresh()
    svg = tg.render_svg(tag)
    assert svg.lstrip().startswith(b"<?xml") and b"<svg" in svg
    text = tg.render_text(tag)
    assert len(text.splitlines()) > 20 and set(text) - set(" \n") != set()


def sheet_tags(n: int) -> list[tg.Tag]:
    entropy = SeededEntropy("sheet")
    return [tg.fresh_tag(t.new_thing(entropy), PATHS[:1]) for _ in range(n)]


def test_png_sheet_decodes_tag_by_tag() -> None:
    tags = sheet_tags(6)
    page = tg.render_sheet(tags, kind="png", columns=3, scale=4)
    assert set(tg.decode_image(page)) == set(tags)
    assert tg.decode_image(page) == tags  # reading order: rows, then left to right
    with pytest.raises(TagImageError, match="6 different tags"):
        tg.scan_image(page)


def test_svg_sheet_has_every_tag_and_label() -> None:
    tags = sheet_tags(5)
    labels = [f"tag {i}" for i in range(5)]
    svg = tg.render_sheet(tags, labels=labels, kind="svg", columns=2).decode()
    assert svg.count("<path") == 5
    assert all(f">{label}</text>" in svg for label in labels)
    # The sheet's modules are the QR codes' modules: rasterise one cell and decode it.
    import re

    import segno

    first = re.search(r'<path fill="#000" d="([^"]+)"', svg)
    assert first is not None
    squares = re.findall(r"M(\d+) (\d+)h", first.group(1))
    img = Image.new("L", (46 * 4 * 2 + 200, 46 * 4 * 2 + 200), 255)
    for x, y in squares:
        img.paste(0, (int(x) * 2 + 20, int(y) * 2 + 20, int(x) * 2 + 28, int(y) * 2 + 28))
    assert segno.make(tags[0].uri(), error="m", micro=False).mode == "alphanumeric"
    assert tg.scan_image(img) == tags[0]


def test_sheet_argument_errors() -> None:
    with pytest.raises(ValueError):
        tg.render_sheet([])
    with pytest.raises(ValueError):
        tg.render_sheet(sheet_tags(2), labels=["one"])
    with pytest.raises(ValueError):
        tg.render_sheet(sheet_tags(1), kind="pdf")


def test_image_without_a_qr_code() -> None:
    out = io.BytesIO()
    Image.new("L", (200, 200), 255).save(out, format="PNG")
    with pytest.raises(TagImageError, match="no QR code"):
        tg.scan_image(out.getvalue())


def test_not_an_image() -> None:
    with pytest.raises(TagImageError, match="not an image"):
        tg.scan_image(b"this is text, not a PNG")


def test_qr_code_that_is_not_a_tag() -> None:
    import segno

    out = io.BytesIO()
    segno.make("https://example.com/", micro=False).save(out, kind="png", scale=6)
    with pytest.raises(BadURI, match="not a p2pcloud tag"):
        tg.scan_image(out.getvalue())


def test_b32_helpers_agree() -> None:
    data = body(fresh())
    assert b32decode(b32encode(data)) == data


# -- properties -----------------------------------------------------------------------------------

_paths = st.one_of(
    st.builds(lambda ip, port: tg.TagPath("udp4", ip, port),
              st.ip_addresses(v=4).map(str), st.integers(1, 65535)),
    st.builds(lambda ip, port: tg.TagPath("tcp4", ip, port),
              st.ip_addresses(v=4).map(str), st.integers(1, 65535)),
    st.builds(lambda ip, port: tg.TagPath("udp6", ip, port),
              st.ip_addresses(v=6).map(str), st.integers(1, 65535)),
    st.builds(lambda ip, port, seed: tg.TagPath(
        "router", ip, port, LocalIdentity.from_seed(seed).cs3a_public),
        st.ip_addresses(v=4).map(str), st.integers(1, 65535), st.binary(min_size=32,
                                                                        max_size=32)),
)


@given(seed=st.binary(min_size=32, max_size=32), secret=st.binary(min_size=16, max_size=16),
       fresh_kind=st.booleans(), paths=st.lists(_paths, max_size=tg.MAX_TAG_PATHS))
def test_any_tag_round_trips(seed: bytes, secret: bytes, fresh_kind: bool,
                             paths: list[tg.TagPath]) -> None:
    key = LocalIdentity.from_seed(seed).cs3a_public
    tag = tg.claimed_tag(key, secret, paths)
    if fresh_kind:
        tag = tg.Tag(tg.KIND_FRESH, tag.key, tag.hashname, tag.secret, tag.paths)
    assert tg.parse_tag(tag.uri()) == tag
    assert len(tag.uri()) <= tg.MAX_TAG_TEXT


@given(st.text(max_size=300))
def test_any_text_parses_or_raises_bad_uri(text: str) -> None:
    """Whatever the text, parsing gives a tag that writes back the same, or BadURI."""
    for candidate in (text, "p2pcloud:" + text, "P2PCLOUD:" + text.upper()):
        try:
            tag = tg.parse_tag(candidate)
        except BadURI:
            continue
        assert tag.uri() == candidate.strip().upper()
