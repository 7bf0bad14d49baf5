"""The dashboard's things view in a real browser (headless chromium, Playwright).

Logged in with the one-time link, the page lists the node's things with their QR tags (the
images are real SVG tags served by the daemon, decoded here back to the thing's hashname),
adds a thing through its own form, and shows a thing created behind its back (through the
CLI) without a reload, from the event stream.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from p2pcloud.things import tags
from tests.e2e.conftest import Daemon, cli_json
from tests.e2e.test_dashboard import page  # noqa: F401  (the browser fixture)


def _tag_image_hashname(view: Any, selector: str) -> str:
    """Draw the <img> onto a canvas in the page, decode the PNG with zxing-cpp here."""
    data_url = view.evaluate(
        """(sel) => { const img = document.querySelector(sel);
             const c = document.createElement('canvas');
             c.width = img.naturalWidth * 4; c.height = img.naturalHeight * 4;
             const g = c.getContext('2d'); g.imageSmoothingEnabled = false;
             g.fillStyle = '#fff'; g.fillRect(0, 0, c.width, c.height);
             g.drawImage(img, 0, 0, c.width, c.height); return c.toDataURL('image/png'); }""",
        selector)
    png = base64.b64decode(data_url.split(",", 1)[1])
    return str(tags.scan_image(png).hashname)


def test_things_view_lists_things_with_their_tags_live(
    page: Any, make_daemon: Callable[[str], Daemon],  # noqa: F811
) -> None:
    from playwright.sync_api import expect

    a = make_daemon("a")
    a.up("--port", "0", "--tcp-port", "0", "--api-port", "0")
    cli_json(a.data_dir, "cloud", "new")
    bike = cli_json(a.data_dir, "thing", "new", "bike", "--make", "Brompton")

    page.goto(cli_json(a.data_dir, "dashboard", "--no-open")["url"])
    card = page.locator("#things-card")
    expect(card).to_be_visible()
    row = page.locator(f'#things li[data-hashname="{bike["hashname"]}"]')
    expect(row).to_contain_text("bike")
    expect(row).to_contain_text("Brompton")
    expect(page.locator("#things-count")).to_have_text("1")
    img = f'#things li[data-hashname="{bike["hashname"]}"] img.thing-tag'
    page.wait_for_function(
        "(sel) => { const i = document.querySelector(sel); return i && i.complete "
        "&& i.naturalWidth > 0; }", arg=img)
    assert _tag_image_hashname(page, img) == bike["hashname"]
    assert page.evaluate("document.documentElement.scrollWidth") <= 390

    # The page's own form creates a thing (a cookie-authenticated, same-origin POST).
    page.fill("#thing-name", "scale")
    page.click("#thing-form button")
    expect(page.locator("#thing-result")).to_contain_text("created scale")
    expect(page.locator("#things-count")).to_have_text("2")
    listed = {t["name"] for t in cli_json(a.data_dir, "thing", "ls")["things"]}
    assert listed == {"bike", "scale"}

    # A thing made behind the page's back appears live (thing events on /api/events).
    boots = cli_json(a.data_dir, "thing", "new", "boots")
    expect(page.locator(f'#things li[data-hashname="{boots["hashname"]}"]')).to_contain_text(
        "boots")
    expect(page.locator("#things-count")).to_have_text("3")

    # Bad input in the form shows the API's error, and nothing is created.
    page.evaluate("document.getElementById('thing-name').removeAttribute('maxlength')")
    page.fill("#thing-name", "x" * 201)
    page.click("#thing-form button")
    expect(page.locator("#thing-result")).to_contain_text("too long")
    assert len(cli_json(a.data_dir, "thing", "ls")["things"]) == 3
