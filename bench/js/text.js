// Text anchors for bench/bench_text.py: yjs and @automerge/automerge replay the
// automerge-paper trace. Usage: node --expose-gc text.js <trace.json.gz> <runs>
// Prints one JSON object with the figures; bench_text.py makes the table.
"use strict";

const fs = require("fs");
const zlib = require("zlib");
const Y = require("yjs");
const A = require("@automerge/automerge");

const tracePath = process.argv[2];
const runs = Number(process.argv[3] || 3);
const trace = JSON.parse(zlib.gunzipSync(fs.readFileSync(tracePath)).toString("utf8"));
const edits = [];
for (const txn of trace.txns) for (const p of txn.patches) edits.push(p);

const pkgVersion = (name) =>
  JSON.parse(fs.readFileSync(require("path").join(__dirname, "node_modules", name, "package.json"))).version;
// process CPU time (user + system, all threads), in ms: the VM is shared, and wall time
// there measures the other tenants' load as much as ours
const now = () => { const u = process.cpuUsage(); return (u.user + u.system) / 1e3; };
const wall = () => Number(process.hrtime.bigint()) / 1e6;
const median = (xs) => xs.slice().sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const gc = () => { if (global.gc) { global.gc(); global.gc(); } };

function yjsReplay() {
  const doc = new Y.Doc();
  const text = doc.getText("text");
  for (const [pos, del, ins] of edits) {  // each call is its own transaction
    if (del) text.delete(pos, del);
    if (ins) text.insert(pos, ins);
  }
  return doc;
}

function yjsHeap() {
  // the document's retained heap: used heap with it, minus used heap once it is dropped
  let doc = yjsReplay();
  gc();
  const withDoc = process.memoryUsage().heapUsed;
  doc.destroy();
  doc = null;
  gc();
  return withDoc - process.memoryUsage().heapUsed;
}

function yjsRun() {
  gc();
  const w0 = wall();
  const t0 = now();
  const doc = yjsReplay();
  const replay = now() - t0;
  const replayWall = wall() - w0;
  const text = doc.getText("text");
  if (text.toString() !== trace.endContent) throw new Error("yjs: wrong final text");
  let t1 = now();
  const v2 = Y.encodeStateAsUpdateV2(doc);
  const encodeV2 = now() - t1;
  const v1 = Y.encodeStateAsUpdate(doc);
  t1 = now();
  const copy = new Y.Doc();
  Y.applyUpdateV2(copy, v2);
  const value = copy.getText("text").toString();
  const load = now() - t1;
  if (value !== trace.endContent) throw new Error("yjs: load mismatch");
  return { replay, replayWall, encodeV2, v2: v2.length, v1: v1.length, load };
}

function automergeRun() {
  // One change holding every splice, as crdt-anchors.md measured it: a change per edit
  // through the JS API re-materialises the document each time (minutes for this trace).
  const rss0 = process.memoryUsage().rss;
  const w0 = wall();
  const t0 = now();
  let doc = A.from({ text: "" });
  doc = A.change(doc, (d) => {
    for (const [pos, del, ins] of edits) A.splice(d, ["text"], pos, del, ins);
  });
  const replay = now() - t0;
  const replayWall = wall() - w0;
  if (doc.text !== trace.endContent) throw new Error("automerge: wrong final text");
  const rss = process.memoryUsage().rss - rss0;
  let t1 = now();
  const saved = A.save(doc);
  const encode = now() - t1;
  t1 = now();
  const loaded = A.load(saved);
  const value = loaded.text;
  const load = now() - t1;
  if (value !== trace.endContent) throw new Error("automerge: load mismatch");
  return { replay, replayWall, rss, encode, size: saved.length, load };
}

const y = [];
for (let i = 0; i < runs; i++) y.push(yjsRun());
const heaps = [yjsHeap(), yjsHeap(), yjsHeap()];
const am = automergeRun();
const out = {
  node: process.version,
  yjs: {
    version: pkgVersion("yjs"),
    replay_ms: median(y.map((r) => r.replay)),
    replay_wall_ms: median(y.map((r) => r.replayWall)),
    heap_bytes: median(heaps),
    encode_ms: median(y.map((r) => r.encodeV2)),
    v2_bytes: y[0].v2,
    v1_bytes: y[0].v1,
    load_ms: median(y.map((r) => r.load)),
    runs,
  },
  automerge: {
    version: pkgVersion("@automerge/automerge"),
    replay_ms: am.replay,
    replay_wall_ms: am.replayWall,
    rss_bytes: am.rss,
    encode_ms: am.encode,
    bytes: am.size,
    load_ms: am.load,
    runs: 1,
  },
};
process.stdout.write(JSON.stringify(out) + "\n");
