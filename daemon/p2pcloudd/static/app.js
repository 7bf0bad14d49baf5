// p2pcloud dashboard: plain JS, no build step. Reads the API with the session cookie
// (HttpOnly: this script never sees a secret), follows /api/events for live changes.
// Every value from the API goes into the page with textContent, never as HTML.
"use strict";

const state = { status: null, peers: new Map(), stats: null, statusAt: 0 };
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
  for (const id of ["node", "peers-card", "stats-card"]) $(id).hidden = true;
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
  });
  source.addEventListener("statistics", (e) => {
    state.stats = JSON.parse(e.data).data;
    renderStats();
  });
  source.addEventListener("reset", () => { refresh().catch(() => {}); });
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
  $("logout").addEventListener("click", async () => {
    try { await api("/api/logout", { method: "POST" }); } finally { showLogin(); }
  });
  setInterval(() => { renderNode(); if (state.peers.size) renderPeers(); }, 1000);
}

wire();
refresh().then(follow).catch((e) => {
  if (e.message !== "not logged in") { $("live").textContent = e.message; }
});
