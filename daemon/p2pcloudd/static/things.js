// p2pcloud dashboard: the things view. Plain JS, no build step, loaded beside app.js.
// Lists this cloud's things with their QR tags (GET /api/things, /api/things/{h}/tag.svg),
// creates things, and follows /api/events so things made or changed on any device appear
// live. Every value from the API goes into the page with textContent, never as HTML.
"use strict";

(function () {
  const RELOAD_DELAY_MS = 250; // coalesce bursts of events (a sync brings many changes)
  let reloadTimer = null;
  let stream = null;

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    for (const child of children) node.append(child);
    return node;
  }

  async function call(path, options) {
    const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options));
    const body = response.status === 204 ? null : await response.json();
    if (!response.ok) {
      const e = body && body.error ? body.error : { message: response.statusText, hint: "" };
      const error = new Error(e.message + (e.hint ? " — " + e.hint : ""));
      error.status = response.status;
      throw error;
    }
    return body;
  }

  function buildSection() {
    const list = el("ul", { id: "things" });
    const empty = el("p", { id: "no-things", className: "muted", hidden: true,
      textContent: "No things yet. Create one below, or scan a fresh tag " +
        "(p2pcloud scan FILE) to claim it." });
    const name = el("input", { id: "thing-name", type: "text", autocomplete: "off",
      placeholder: "a new thing's name (bike, scale…)" });
    name.setAttribute("aria-label", "new thing name");
    name.required = true;
    name.maxLength = 200;
    const form = el("form", { id: "thing-form" }, name, el("button", { textContent: "Add" }));
    const result = el("p", { id: "thing-result" });
    result.setAttribute("role", "status");
    const count = el("span", { id: "things-count", className: "count" });
    const section = el("section", { id: "things-card", className: "card", hidden: true },
      el("h2", {}, "Things ", count), list, empty, form, result);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      result.className = "";
      result.textContent = "creating…";
      try {
        const thing = await call("/api/things", {
          method: "POST", headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ name: name.value.trim() }) });
        result.textContent = "created " + thing.name;
        name.value = "";
        await load();
      } catch (e) {
        result.className = "error";
        result.textContent = e.message;
      }
    });
    return section;
  }

  function thingItem(thing) {
    const h = thing.hashname;
    const img = el("img", { className: "thing-tag", alt: "QR tag of " + thing.name,
      src: "/api/things/" + encodeURIComponent(h) + "/tag.svg", width: 96, height: 96,
      loading: "lazy" });
    img.style.width = "6rem";
    img.style.height = "6rem";
    img.style.background = "#fff";
    img.style.borderRadius = ".3rem";
    const png = el("a", { href: "/api/things/" + encodeURIComponent(h) + "/tag.png",
      textContent: "PNG", download: (thing.name || "tag") + ".png" });
    const svg = el("a", { href: "/api/things/" + encodeURIComponent(h) + "/tag.svg",
      textContent: "SVG", download: (thing.name || "tag") + ".svg" });
    const meta = [thing.make, thing.model].filter(Boolean).join(" ");
    const info = el("div", { className: "thing-info" },
      el("div", { className: "thing-name", textContent: thing.name || "(unnamed)" }),
      el("div", { className: "peer-meta", textContent: (meta ? meta + " · " : "") +
        h.slice(0, 12) + "…" + (thing.claimed ? "" : " · unclaimed: scan its tag") +
        (thing.smart ? " · smart" : "") + (thing.archived ? " · archived" : "") }),
      el("div", { className: "peer-meta" }, "tag: ", png, " · ", svg));
    const li = el("li", {}, img, info);
    li.dataset.hashname = h;
    li.style.display = "grid";
    li.style.gridTemplateColumns = "auto 1fr";
    li.style.gap = "0 .75rem";
    li.style.alignItems = "center";
    li.style.padding = ".5rem 0";
    li.style.borderBottom = "1px solid var(--line)";
    return li;
  }

  async function load() {
    const section = document.getElementById("things-card");
    let body;
    try {
      body = await call("/api/things");
    } catch (e) {
      // 401: not logged in (app.js shows the login form); 503: no things on this node.
      section.hidden = true;
      return false;
    }
    section.hidden = false;
    const list = document.getElementById("things");
    list.replaceChildren(...body.things.map(thingItem));
    list.style.listStyle = "none";
    list.style.margin = "0";
    list.style.padding = "0";
    document.getElementById("no-things").hidden = body.things.length > 0;
    document.getElementById("things-count").textContent = String(body.things.length);
    return true;
  }

  function scheduleReload() {
    if (reloadTimer !== null) return;
    reloadTimer = setTimeout(() => { reloadTimer = null; load(); }, RELOAD_DELAY_MS);
  }

  function follow() {
    if (stream !== null) return;
    stream = new EventSource("/api/events");
    const onEvent = (event) => {
      let type = event.type;
      try { type = JSON.parse(event.data).type || type; } catch (e) { /* keep event.type */ }
      if (type.startsWith("thing.") || type === "change" || type === "change.lost" ||
          type === "reset") scheduleReload();
    };
    for (const type of ["thing.created", "thing.claimed", "thing.changed", "thing.message",
                        "thing.notify", "thing.scanned", "thing.transferred",
                        "thing.received", "change", "change.lost", "reset"]) {
      stream.addEventListener(type, onEvent);
    }
    stream.onerror = () => { /* EventSource reconnects with Last-Event-ID by itself */ };
  }

  async function start() {
    const main = document.querySelector("main");
    if (!main || document.getElementById("things-card")) return;
    main.append(buildSection());
    // Not logged in: logging in reloads the page (a redirect), which runs this again.
    if (await load()) follow();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
