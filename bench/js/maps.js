// Map workloads (a), (b), (c) of bench/bench_core.py for Yjs and Automerge, on Node.
//
// Usage: node maps.js [N_A] [N_C]   (defaults 100000 and 10000)
// Prints one JSON object: for each system, the figures bench_core.py puts in its table.
// The workloads are the same as the Python side's: keys "key<i>" with integer values i,
// replicas with small client ids, best of a few runs for the fast systems.
"use strict";

const Y = require("yjs");
const A = require("@automerge/automerge");
const fs = require("fs");
const path = require("path");

function version(pkg) {
  const file = path.join(__dirname, "node_modules", pkg, "package.json");
  return JSON.parse(fs.readFileSync(file, "utf8")).version;
}

const N_A = parseInt(process.argv[2] || "100000", 10);
const N_C = parseInt(process.argv[3] || "10000", 10);

function now() {
  return Number(process.hrtime.bigint()) / 1e9;
}

function best(runs, fn) {
  let b = Infinity;
  let out;
  for (let i = 0; i < runs; i++) {
    if (global.gc) global.gc();
    const t0 = now();
    out = fn();
    const dt = now() - t0;
    if (dt < b) b = dt;
  }
  return [b, out];
}

const keys = [];
for (let i = 0; i < N_A; i++) keys.push("key" + i);

function yjsDoc(clientID) {
  const d = new Y.Doc();
  d.clientID = clientID;
  return d;
}

function benchYjs() {
  const out = {};
  // (a) one transaction, one set per key
  const [ta, doc] = best(3, () => {
    const d = yjsDoc(1);
    const m = d.getMap("m");
    d.transact(() => {
      for (let i = 0; i < N_A; i++) m.set(keys[i], i);
    });
    return d;
  });
  out.a_ops_per_s = N_A / ta;
  // (b) full state: size, encode time, load into an empty replica
  const [te, state] = best(3, () => Y.encodeStateAsUpdate(doc));
  out.b_bytes = state.length;
  out.b_encode_s = te;
  const [tl] = best(3, () => {
    const d = yjsDoc(2);
    Y.applyUpdate(d, state);
    return d;
  });
  out.b_load_s = tl;
  // (c) two replicas, N_C concurrent edits each (one transaction per edit), sync both ways
  const make = (clientID, offset) => {
    const d = yjsDoc(clientID);
    const m = d.getMap("m");
    for (let i = 0; i < N_C; i++) d.transact(() => m.set("k" + i, i + offset));
    return d;
  };
  let bytes = 0;
  // time only the sync itself, not the making of the edits
  let syncBest = Infinity;
  for (let r = 0; r < 3; r++) {
    const a = make(1, 0);
    const b = make(2, 1);
    const t0 = now();
    const sva = Y.encodeStateVector(a);
    const diffB = Y.encodeStateAsUpdate(b, sva);
    const svb = Y.encodeStateVector(b);
    Y.applyUpdate(a, diffB);
    const diffA = Y.encodeStateAsUpdate(a, svb);
    Y.applyUpdate(b, diffA);
    syncBest = Math.min(syncBest, now() - t0);
    bytes = sva.length + diffB.length + svb.length + diffA.length;
    if (a.getMap("m").get("k7") !== b.getMap("m").get("k7")) throw new Error("yjs diverged");
  }
  out.c_sync_s = syncBest;
  out.c_bytes = bytes;
  out.c_messages = 3;
  return out;
}

function benchAutomerge() {
  const out = {};
  // (a) one change setting every key (the JS API; one run: it is slow)
  const [ta, doc] = best(1, () =>
    A.change(A.init({ actor: "01" }), (d) => {
      for (let i = 0; i < N_A; i++) d[keys[i]] = i;
    })
  );
  out.a_ops_per_s = N_A / ta;
  const [te, saved] = best(3, () => A.save(doc));
  out.b_bytes = saved.length;
  out.b_encode_s = te;
  const [tl] = best(3, () => A.load(saved, { actor: "02" }));
  out.b_load_s = tl;
  // (c) N_C concurrent edits each, made in one change per replica (one change per edit
  // costs Automerge's JS API milliseconds each on a 10k-key map), then its sync protocol
  const make = (actor, offset) =>
    A.change(A.init({ actor }), (d) => {
      for (let i = 0; i < N_C; i++) d["k" + i] = i + offset;
    });
  let syncBest = Infinity;
  let bytes = 0;
  let messages = 0;
  for (let r = 0; r < 2; r++) {
    let a = make("01", 0);
    let b = make("02", 1);
    let sa = A.initSyncState();
    let sb = A.initSyncState();
    let total = 0;
    let count = 0;
    const t0 = now();
    for (let round = 0; round < 10; round++) {
      let moved = false;
      let msg;
      [sa, msg] = A.generateSyncMessage(a, sa);
      if (msg) {
        total += msg.length;
        count += 1;
        moved = true;
        [b, sb] = A.receiveSyncMessage(b, sb, msg);
      }
      [sb, msg] = A.generateSyncMessage(b, sb);
      if (msg) {
        total += msg.length;
        count += 1;
        moved = true;
        [a, sa] = A.receiveSyncMessage(a, sa, msg);
      }
      if (!moved) break;
    }
    const dt = now() - t0;
    if (a.k7 !== b.k7) throw new Error("automerge diverged");
    if (dt < syncBest) syncBest = dt;
    bytes = total;
    messages = count;
  }
  out.c_sync_s = syncBest;
  out.c_bytes = bytes;
  out.c_messages = messages;
  out.c_note = "edits made in one change per replica";
  return out;
}

const result = {
  node: process.version,
  yjs: version("yjs"),
  automerge: version("@automerge/automerge"),
  n_a: N_A,
  n_c: N_C,
  Yjs: benchYjs(),
  Automerge: benchAutomerge(),
};
process.stdout.write(JSON.stringify(result) + "\n");
