// p2pcloud dashboard: plain JS, no build step. Reads the API with the session cookie
// (HttpOnly: this script never sees a secret), follows /api/events for live changes.
// Every value from the API goes into the page with textContent, never as HTML.
"use strict";

const state = {
  status: null, peers: new Map(), stats: null, statusAt: 0,
  subclouds: new Map(),      // id -> {id, name, kind, owner, rights}
  progress: new Map(),       // sub-cloud id -> [PeerProgress rows] (sync.progress events)
  highWater: new Map(),      // "sc|peer" -> most items seen pending since last in sync
  changes: new Map(),        // sub-cloud id -> recent change events, newest first
  open: null,                // the sub-cloud view: {id, detail, coll, doc}
};
const MAX_CHANGES = 20;      // recent changes kept per sub-cloud for the view
const RELOAD_DELAY_MS = 200; // coalesce a burst of change events into one re-read
const $ = (id) => document.getElementById(id);

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (response.status === 401) { showLogin(); throw new Error("not logged in"); }
  const body = response.status === 204 ? null : await response.json();
  if (!response.ok) {
    const e = body && body.error ? body.error : { message: response.statusText, hint: "" };
    throw new Error(e.message + (e.hint ? " — " + e.hint : ""));
  }
  return body;
}

function showLogin() {
  $("login").hidden = false;
  for (const id of ["node", "peers-card", "stats-card", "subclouds-card", "transfers-card",
                    "subcloud-view"]) $(id).hidden = true;
}

function short(hashname) { return hashname.slice(0, 12) + "…" + hashname.slice(-4); }

function pathText(path) {
  if (!path) return "no path";
  if (path.type === "peer") return "through router " + short(path.hn || "");
  return path.type + " " + path.ip + ":" + path.port;
}

function ago(seconds) {
  if (seconds < 5) return "now";
  if (seconds < 90) return Math.round(seconds) + " s ago";
  if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
  if (seconds < 129600) return Math.round(seconds / 3600) + " h ago";
  return Math.round(seconds / 86400) + " days ago";
}

function duration(seconds) {
  const s = Math.floor(seconds), d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24,
        m = Math.floor(s / 60) % 60;
  if (d) return d + " d " + h + " h";
  if (h) return h + " h " + m + " min";
  if (m) return m + " min " + (s % 60) + " s";
  return (s % 60) + " s";
}

function renderNode() {
  const s = state.status;
  if (!s) return;
  $("login").hidden = true;
  $("node").hidden = false;
  $("node-hashname").textContent = s.hashname;
  $("node-uri").textContent = s.link_uri;
  const p = s.ports || {};
  $("node-ports").textContent = "UDP " + p.udp + " · TCP " + p.tcp + " · API " + p.api;
  $("node-uptime").textContent = duration(s.uptime_s + (Date.now() - state.statusAt) / 1000);
  $("node-core").textContent = s.core_implementation;
  $("node-version").textContent = s.version;
}

function renderPeers() {
  $("peers-card").hidden = false;
  const list = $("peers");
  const peers = [...state.peers.values()].sort((a, b) =>
    (b.online - a.online) || ((b.last_seen || 0) - (a.last_seen || 0)));
  list.replaceChildren(...peers.map((peer) => {
    const li = document.createElement("li");
    li.className = peer.online ? "online" : "offline";
    li.dataset.hashname = peer.hashname;
    const dot = document.createElement("span");
    dot.className = "dot";
    dot.title = peer.online ? "online" : "offline";
    const name = document.createElement("span");
    name.className = "peer-name";
    name.textContent = peer.hashname;
    const meta = document.createElement("span");
    meta.className = "peer-meta";
    const seen = peer.online ? "online" :
      (peer.last_seen ? "last seen " + ago(Date.now() / 1000 - peer.last_seen) : "never seen");
    meta.textContent = seen + (peer.online ? " · " + pathText(peer.path) : "");
    li.append(dot, name, meta);
    return li;
  }));
  const online = peers.filter((p) => p.online).length;
  $("peers-count").textContent = peers.length ? online + " of " + peers.length + " online" : "";
  $("no-peers").hidden = peers.length > 0;
}

function renderStats() {
  const s = state.stats;
  if (!s) return;
  $("stats-card").hidden = false;
  const node = s.node || {}, mesh = node.mesh || {};
  const rows = [
    ["links up", node.links_up],
    ["channels", node.channels],
    ["datagrams in / out", (mesh.datagrams_in ?? "?") + " / " + (mesh.datagrams_out ?? "?")],
    ["bytes in / out", (mesh.bytes_in ?? "?") + " / " + (mesh.bytes_out ?? "?")],
    ["dropped", Object.values(node.dropped || {}).reduce((a, b) => a + b, 0)],
  ];
  $("stats").replaceChildren(...rows.flatMap(([k, v]) => {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k;
    dd.textContent = String(v);
    return [dt, dd];
  }));
}

// -- sub-clouds ----------------------------------------------------------------------

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const child of children) node.append(child);
  return node;
}

function bytes(n) {
  if (n < 1024) return n + " B";
  if (n < 1048576) return (n / 1024).toFixed(1) + " KiB";
  if (n < 1073741824) return (n / 1048576).toFixed(1) + " MiB";
  return (n / 1073741824).toFixed(2) + " GiB";
}

function peerName(hashname) {
  if (state.status && hashname === state.status.hashname) return "this node";
  return short(hashname);
}

// One peer's progress for one sub-cloud: {text, fraction (0..1) or null, done}.
// Items still to move have no known total, so the bar runs against the most items seen
// pending since the peer was last in sync (it fills as the backlog drains).
function progressOf(scId, row) {
  const pending = row.send_items + row.receive_items;
  const key = scId + "|" + row.peer;
  const blobsLeft = row.blob_bytes_total - row.blob_bytes_done;
  if (pending === 0 && row.in_flight_bytes === 0 && blobsLeft <= 0) {
    state.highWater.delete(key);
    return { text: "in sync", fraction: 1, done: true };
  }
  const high = Math.max(state.highWater.get(key) || 0, pending);
  state.highWater.set(key, high);
  const parts = [];
  if (row.send_items) parts.push("sending " + row.send_items + " items (" + bytes(row.send_bytes) + ")");
  if (row.receive_items) parts.push("receiving " + row.receive_items + " items (" + bytes(row.receive_bytes) + ")");
  if (row.in_flight_bytes) parts.push(bytes(row.in_flight_bytes) + " in flight");
  let fraction = high ? (high - pending) / high : null;
  if (blobsLeft > 0) {
    parts.push("files " + bytes(row.blob_bytes_done) + " of " + bytes(row.blob_bytes_total));
    fraction = row.blob_bytes_done / row.blob_bytes_total;
  }
  return { text: parts.join(" · ") || "settling", fraction, done: false };
}

function progressBar(p) {
  const bar = el("progress", { max: 1 });
  if (p.fraction !== null) bar.value = p.fraction;  // no value: an indeterminate bar
  return bar;
}

function renderSubclouds() {
  $("subclouds-card").hidden = false;
  const scs = [...state.subclouds.values()].sort((a, b) => a.name.localeCompare(b.name));
  $("subclouds").replaceChildren(...scs.map((sc) => {
    const open = el("button", { type: "button", className: "link sc-open",
                                textContent: sc.name });
    open.addEventListener("click", () => openSubcloud(sc.id));
    const meta = el("span", { className: "peer-meta", textContent:
      sc.kind + " · " + (sc.rights || "no") + " rights · owner " + peerName(sc.owner) });
    const li = el("li", {}, open, meta);
    li.dataset.subcloud = sc.id;
    li.dataset.name = sc.name;
    return li;
  }));
  $("subclouds-count").textContent = scs.length ? String(scs.length) : "";
  $("no-subclouds").hidden = scs.length > 0;
}

function renderTransfers() {
  const rows = [];
  for (const [scId, peers] of state.progress) {
    const sc = state.subclouds.get(scId);
    for (const row of peers) {
      const p = progressOf(scId, row);
      if (p.done) continue;
      const label = el("span", { className: "peer-name",
        textContent: (sc ? sc.name : scId.slice(0, 8)) + " ↔ " + peerName(row.peer) });
      const meta = el("span", { className: "peer-meta", textContent: p.text });
      const li = el("li", {}, label, progressBar(p), meta);
      li.dataset.subcloud = scId;
      li.dataset.peer = row.peer;
      rows.push(li);
    }
  }
  $("transfers-card").hidden = false;
  $("transfers").replaceChildren(...rows);
  $("no-transfers").hidden = rows.length > 0;
}

function renderSubcloudView() {
  const open = state.open;
  $("subcloud-view").hidden = !open || !open.detail;
  if (!open || !open.detail) return;
  const d = open.detail;
  $("sc-name").textContent = d.name;
  $("sc-kind").textContent = d.kind;
  $("sc-id").textContent = d.id;
  $("sc-owner").textContent = d.owner;
  $("sc-rights").textContent = d.rights || "none";
  const progress = new Map((state.progress.get(d.id) || d.peers).map((r) => [r.peer, r]));
  $("sc-members").replaceChildren(...d.members.map((m) => {
    const peer = state.peers.get(m.hashname);
    const online = m.self || (peer ? peer.online : m.online);
    const name = el("span", { className: "peer-name",
      textContent: (m.self ? "this node " : "") + m.hashname });
    const who = [m.owner ? "owner" : m.rights];
    const li = el("li", { className: online ? "online" : "offline" },
                  el("span", { className: "dot", title: online ? "online" : "offline" }), name);
    li.dataset.hashname = m.hashname;
    const row = progress.get(m.hashname);
    if (!m.self) {
      const p = row ? progressOf(d.id, row) : null;
      who.push(!online ? "offline" : p ? p.text : "linked, not syncing yet");
      if (p && !p.done) li.append(progressBar(p));
      li.classList.toggle("synced", Boolean(p && p.done));
    }
    li.append(el("span", { className: "peer-meta sync-state", textContent: who.join(" · ") }));
    return li;
  }));
  $("sc-collections").replaceChildren(...d.collections.map((c) => {
    const b = el("button", { type: "button", className: "link", textContent: c.name });
    b.addEventListener("click", () => { open.coll = c.name; open.doc = null; reloadOpen(); });
    const li = el("li", {}, b, el("span", { className: "peer-meta",
      textContent: c.documents + (c.documents === 1 ? " document" : " documents") }));
    li.dataset.collection = c.name;
    return li;
  }));
  $("sc-no-collections").hidden = d.collections.length > 0;
  $("sc-documents-box").hidden = !open.coll;
  if (open.coll && open.documents) {
    $("sc-documents-title").textContent = open.coll;
    $("sc-documents").replaceChildren(...open.documents.map((doc) => {
      const b = el("button", { type: "button", className: "link", textContent: doc });
      b.addEventListener("click", () => { open.doc = doc; reloadOpen(); });
      const li = el("li", {}, b);
      li.dataset.document = doc;
      return li;
    }));
  }
  $("sc-document-box").hidden = !(open.doc && open.fields);
  if (open.doc && open.fields) {
    $("sc-document-title").textContent = open.coll + "/" + open.doc;
    $("sc-document").replaceChildren(...Object.keys(open.fields).sort().flatMap((k) => [
      el("dt", { textContent: k }),
      el("dd", { textContent: JSON.stringify(open.fields[k]) })]));
  }
  $("sc-folders").replaceChildren(...d.folders.map((f) => el("li", {},
    el("span", { className: "peer-name", textContent: f.path }),
    el("span", { className: "peer-meta", textContent: f.files + (f.files === 1 ? " file" : " files") +
      (f.conflicts.length ? " · " + f.conflicts.length + " conflicts: " +
        f.conflicts.map((c) => c.copy || c.path).join(", ") : "") }))));
  $("sc-no-folders").hidden = d.folders.length > 0;
  const changes = state.changes.get(d.id) || [];
  $("sc-changes").replaceChildren(...changes.map((c) => {
    const where = [c.collection, c.document, c.field].filter((x) => x !== null).join("/");
    const from = c.origin === "local" ? "here" : "from " + peerName(c.origin);
    return el("li", { textContent: new Date(c.time * 1000).toLocaleTimeString() + " " +
                      where + " (" + from + ")" });
  }));
  $("sc-no-changes").hidden = changes.length > 0;
}

async function reloadOpen() {
  const open = state.open;
  if (!open) return;
  const base = "/api/subclouds/" + encodeURIComponent(open.id);
  try {
    open.detail = await api(base);
    if (!state.progress.has(open.id)) state.progress.set(open.id, open.detail.peers);
    if (open.coll) {
      open.documents = (await api(base + "/" + encodeURIComponent(open.coll))).documents;
    }
    if (open.doc) {
      try {
        open.fields = (await api(base + "/" + encodeURIComponent(open.coll) + "/" +
                                 encodeURIComponent(open.doc))).fields;
      } catch (_) { open.fields = null; }  // removed meanwhile
    }
  } catch (e) {
    if (e.message === "not logged in") return;
  }
  if (state.open === open) renderSubcloudView();
}

let reloadTimer = null;
function reloadOpenSoon() {
  if (reloadTimer) return;
  reloadTimer = setTimeout(() => { reloadTimer = null; reloadOpen(); }, RELOAD_DELAY_MS);
}

function openSubcloud(id) {
  state.open = { id, detail: null, coll: null, doc: null };
  reloadOpen().then(() => $("subcloud-view").scrollIntoView({ block: "start" }));
}

async function refreshSubclouds() {
  const scs = await api("/api/subclouds");
  state.subclouds = new Map(scs.subclouds.map((sc) => [sc.id, sc]));
  renderSubclouds();
}

async function refresh() {
  const [status, peers, stats] = await Promise.all(
    [api("/api/status"), api("/api/peers"), api("/api/statistics")]);
  state.status = status;
  state.statusAt = Date.now();
  state.peers = new Map(peers.peers.map((p) => [p.hashname, p]));
  state.stats = stats;
  renderNode();
  renderPeers();
  renderStats();
  await refreshSubclouds();
  renderTransfers();
  await reloadOpen();
}

function follow() {
  // EventSource sends the cookie, reconnects by itself and resumes with Last-Event-ID.
  const source = new EventSource("/api/events");
  const live = $("live");
  source.onopen = () => {
    live.textContent = "live";
    live.className = "live on";
    refresh().catch(() => {});  // catch up on anything that changed while (re)connecting
  };
  source.onerror = () => {
    live.textContent = "reconnecting…";
    live.className = "live off";
  };
  source.addEventListener("link.up", (e) => {
    const { data } = JSON.parse(e.data);
    const old = state.peers.get(data.hashname) || { hashname: data.hashname, uri: null };
    state.peers.set(data.hashname, { ...old, online: true, path: data.path,
                                     last_seen: Date.now() / 1000 });
    renderPeers();
    renderSubcloudView();
  });
  source.addEventListener("link.path", (e) => {
    const { data } = JSON.parse(e.data);
    const old = state.peers.get(data.hashname);
    if (old) { state.peers.set(data.hashname, { ...old, path: data.path }); renderPeers(); }
  });
  source.addEventListener("link.down", (e) => {
    const { data } = JSON.parse(e.data);
    const old = state.peers.get(data.hashname) || { hashname: data.hashname, uri: null };
    state.peers.set(data.hashname, { ...old, online: false, path: null,
                                     last_seen: Date.now() / 1000 });
    renderPeers();
    renderSubcloudView();
  });
  source.addEventListener("statistics", (e) => {
    state.stats = JSON.parse(e.data).data;
    renderStats();
  });
  source.addEventListener("reset", () => { refresh().catch(() => {}); });
  source.addEventListener("subcloud.added", (e) => {
    const { data } = JSON.parse(e.data);
    if (!state.subclouds.has(data.subcloud)) refreshSubclouds().catch(() => {});
  });
  source.addEventListener("change", (e) => {
    const event = JSON.parse(e.data);
    const data = event.data;
    const list = state.changes.get(data.subcloud) || [];
    list.unshift({ ...data, time: event.time });
    state.changes.set(data.subcloud, list.slice(0, MAX_CHANGES));
    if (!state.subclouds.has(data.subcloud)) refreshSubclouds().catch(() => {});
    if (state.open && state.open.id === data.subcloud) reloadOpenSoon();
  });
  source.addEventListener("change.lost", (e) => {
    const { data } = JSON.parse(e.data);
    if (state.open && state.open.id === data.subcloud) reloadOpenSoon();
  });
  source.addEventListener("sync.progress", (e) => {
    const { data } = JSON.parse(e.data);
    state.progress.set(data.subcloud, data.peers);
    renderTransfers();
    if (state.open && state.open.id === data.subcloud) renderSubcloudView();
  });
}

function wire() {
  $("copy-uri").addEventListener("click", async () => {
    try { await navigator.clipboard.writeText($("node-uri").textContent); } catch (_) {
      const range = document.createRange();
      range.selectNodeContents($("node-uri"));
      getSelection().removeAllRanges();
      getSelection().addRange(range);
    }
  });
  $("link-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const uri = $("link-uri").value.trim();
    const out = $("link-result");
    if (!uri) return;
    out.className = "";
    out.textContent = "linking…";
    try {
      const result = await api("/api/links", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ uri }) });
      out.textContent = "linked " + short(result.hashname);
      $("link-uri").value = "";
    } catch (e) {
      out.className = "error";
      out.textContent = e.message;
    }
  });
  $("subcloud-close").addEventListener("click", () => {
    state.open = null;
    renderSubcloudView();
  });
  $("logout").addEventListener("click", async () => {
    try { await api("/api/logout", { method: "POST" }); } finally { showLogin(); }
  });
  setInterval(() => { renderNode(); if (state.peers.size) renderPeers(); }, 1000);
}

wire();
refresh().then(follow).catch((e) => {
  if (e.message !== "not logged in") { $("live").textContent = e.message; }
});
