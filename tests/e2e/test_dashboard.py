"""The dashboard in a real browser: Debian's chromium, headless, driven by Playwright.

The page is opened on a phone-sized viewport, logged in the way a user does it (the one-time
link from ``p2pcloud dashboard``), and must show this node, then a peer whose link is made
behind its back (through the API) appear live from the event stream, without a reload.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Daemon, cli_json, wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
PAGE_WAIT_MS = 30_000  # the upper bound of a UI wait on a shared machine


def _browser_or_skip() -> Any:
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed (pip install playwright)"
    if reason is None and not CHROMIUM.exists():
        reason = "chromium is not installed (apt-get install -y chromium)"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests cannot be skipped in CI: {reason}")
        pytest.skip(reason)
    return sync_playwright


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    """A fresh headless chromium page (own profile), phone-sized."""
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 390, "height": 844}, is_mobile=True,
            has_touch=True)
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(PAGE_WAIT_MS)
            yield page
        finally:
            context.close()


def test_dashboard_shows_the_node_and_a_peer_linking_live(
    page: Any, make_daemon: Callable[[str], Daemon],
) -> None:
    from playwright.sync_api import expect

    a, b, c = make_daemon("a"), make_daemon("b"), make_daemon("c")
    for d in (a, b, c):
        d.up("--port", "0", "--tcp-port", "0", "--api-port", "0")
    a_status, b_status, c_status = a.status(), b.status(), c.status()

    # Without logging in, the page shows the login form and no data.
    page.goto(a.api_url + "/")
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#node")).to_be_hidden()
    assert a_status["hashname"] not in page.content()

    # The one-time link from `p2pcloud dashboard` logs the browser in.
    url = cli_json(a.data_dir, "dashboard", "--no-open")["url"]
    page.goto(url)
    assert page.url == a.api_url + "/"  # redirected, the code gone from the address bar
    expect(page.locator("#node-hashname")).to_have_text(a_status["hashname"])
    expect(page.locator("#node-uri")).to_have_text(a_status["link_uri"])
    expect(page.locator("#node-core")).to_have_text(a_status["core_implementation"])
    expect(page.locator("#no-peers")).to_be_visible()
    expect(page.locator("#live")).to_have_text("live")
    # Usable on a phone: nothing wider than the screen.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390

    # A link made behind the page's back (through the API) appears live.
    assert a.request("POST", "/api/links", body={"uri": b_status["link_uri"]}).status == 200
    row = page.locator(f'#peers li[data-hashname="{b_status["hashname"]}"]')
    expect(row).to_have_class("online")
    expect(row.locator(".peer-meta")).to_contain_text("127.0.0.1")
    expect(page.locator("#no-peers")).to_be_hidden()

    # The page's own form links a third node (a cookie-authenticated, same-origin POST).
    page.fill("#link-uri", c_status["link_uri"])
    page.click("#link-form button")
    expect(page.locator("#link-result")).to_contain_text("linked " + c_status["hashname"][:12])
    expect(page.locator(f'#peers li[data-hashname="{c_status["hashname"]}"]')).to_have_class(
        "online")
    expect(page.locator("#peers-count")).to_have_text("2 of 2 online")

    # Logging out drops the session: a reload shows the login form again.
    page.click("#logout")
    expect(page.locator("#login")).to_be_visible()
    page.reload()
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#node")).to_be_hidden()


def test_dashboard_subcloud_view_follows_changes_and_sync_live(
    page: Any, make_daemon: Callable[[str], Daemon], tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    a, b = make_daemon("a"), make_daemon("b")
    for d in (a, b):
        d.up("--port", "0", "--tcp-port", "0", "--api-port", "0")
    a_hn, b_hn = a.status()["hashname"], b.status()["hashname"]
    assert a.request("POST", "/api/links", body={"uri": b.status()["link_uri"]}).status == 200

    # B's dashboard is open before the sub-cloud exists.
    page.goto(cli_json(b.data_dir, "dashboard", "--no-open")["url"])
    expect(page.locator("#live")).to_have_text("live")
    expect(page.locator("#no-subclouds")).to_be_visible()

    # A creates a sub-cloud, writes, shares it with B: it appears on B's page by itself.
    sc = a.request("POST", "/api/subclouds", body={"name": "family"}).json()["id"]
    assert a.request("PUT", f"/api/subclouds/{sc}/notes/n1", body={"title": "milk"}).status == 200
    assert a.request("POST", f"/api/subclouds/{sc}/share",
                     body={"hashname": b_hn, "rights": "write"}).status == 200
    item = page.locator('#subclouds li[data-name="family"]')
    expect(item).to_contain_text("write rights")
    item.locator("button").click()

    # The view: members (A online, the owner), collections, nothing in flight at rest.
    view = page.locator("#subcloud-view")
    expect(view).to_be_visible()
    expect(page.locator("#sc-id")).to_have_text(sc)
    owner = page.locator(f'#sc-members li[data-hashname="{a_hn}"]')
    expect(owner).to_have_class("online synced")
    expect(owner.locator(".sync-state")).to_have_text("owner · in sync")
    expect(page.locator(f'#sc-members li[data-hashname="{b_hn}"]')).to_contain_text("this node")
    notes = page.locator('#sc-collections li[data-collection="notes"]')
    expect(notes).to_contain_text("1 document")

    # A write on A arrives live: the change list and the counts update without a reload.
    assert a.request("PUT", f"/api/subclouds/{sc}/notes/n2",
                     body={"title": "bread", "qty": 2}).status == 200
    expect(page.locator("#sc-changes")).to_contain_text("notes/n2/title (from " + a_hn[:12])
    expect(notes).to_contain_text("2 documents")
    notes.locator("button").click()
    page.locator('#sc-documents li[data-document="n2"] button').click()
    expect(page.locator("#sc-document")).to_contain_text('"bread"')

    # Folders: A syncs one holding a file, B an empty one; the file reaches B's disk and
    # B's view shows the folder with it; afterwards nothing is left to move.
    fa, fb = tmp_path / "folder-a", tmp_path / "folder-b"
    fa.mkdir()
    fb.mkdir()
    (fa / "photo.bin").write_bytes(os.urandom(1 << 20))
    assert a.request("POST", "/api/folders", body={"subcloud": sc, "path": str(fa)}).status == 201
    assert b.request("POST", "/api/folders", body={"subcloud": sc, "path": str(fb)}).status == 201
    wait_for("photo.bin on B's disk", lambda: (fb / "photo.bin").exists()
             and (fb / "photo.bin").read_bytes() == (fa / "photo.bin").read_bytes())
    expect(page.locator("#sc-folders")).to_contain_text(str(fb.resolve()))
    expect(page.locator("#sc-folders")).to_contain_text("1 file")
    expect(page.locator("#transfers-card")).to_be_visible()
    expect(page.locator("#no-transfers")).to_be_visible()
    expect(owner.locator(".sync-state")).to_have_text("owner · in sync")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
