// Status: the model and weights (/info, an admin call), readiness, and live figures from /metrics.
import { call, json } from "./api.js";
import { el, fixed } from "./ui.js";

const POLL_MS = 5000;
let timer = null;
let previous = null;           // the last sample: {at, requests, buckets, sum, count}

function facts(target, rows) {
  target.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v, "data-fact": k })]));
}

/** Sum every sample of `name` in a Prometheus text exposition whose labels pass `keep`. */
function total(text, name, keep = () => true) {
  let sum = 0;
  for (const line of text.split("\n")) {
    if (!line.startsWith(name)) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{([^}]*)\})?\s+(\S+)/);
    if (!m || m[1] !== name || !keep(m[3] || "")) continue;
    sum += Number(m[4]);
  }
  return sum;
}

function buckets(text) {
  const found = new Map();
  for (const line of text.split("\n")) {
    const m = line.match(/^adaface_request_seconds_bucket\{([^}]*)\}\s+(\S+)/);
    if (!m) continue;
    const le = (m[1].match(/le="([^"]+)"/) || [])[1];
    found.set(le, (found.get(le) || 0) + Number(m[2]));
  }
  return found;
}

/** The q-quantile's bucket bound from the change in cumulative buckets between two samples. */
function quantile(now, before, q) {
  const bounds = [...now.keys()].filter((b) => b !== "+Inf").map(Number).sort((a, b) => a - b);
  const delta = (le) => (now.get(le) || 0) - ((before && before.get(le)) || 0);
  const all = delta("+Inf");
  if (all <= 0) return null;
  for (const b of bounds) {
    const key = [...now.keys()].find((k) => Number(k) === b);
    if (delta(key) >= q * all) return b;
  }
  return Infinity;
}

async function sample() {
  const text = await (await call("/metrics")).text();
  // the service's work, not the console's own files or the probes and metrics polled
  const isEmbedding = (labels) => !/route="\/(ui|livez|readyz|metrics|info|openapi\.json|static)\b/.test(labels) &&
                                  !/route="\/"/.test(labels);
  return { at: Date.now(), text, requests: total(text, "adaface_requests_total", isEmbedding),
           buckets: buckets(text), queue: total(text, "adaface_queue_depth"),
           faces: total(text, "adaface_faces_per_image_sum") };
}

async function live() {
  const target = document.getElementById("status-live");
  try {
    const now = await sample();
    const rows = [["queue (images in flight)", String(now.queue)],
                  ["requests answered (this worker)", String(now.requests)]];
    if (previous) {
      const seconds = (now.at - previous.at) / 1000;
      rows.push(["requests/s (last interval)", fixed((now.requests - previous.requests) / seconds, 2)],
                ["faces/s (last interval)", fixed((now.faces - previous.faces) / seconds, 2)]);
      const p50 = quantile(now.buckets, previous.buckets, 0.5);
      const p99 = quantile(now.buckets, previous.buckets, 0.99);
      rows.push(["latency p50 (bucket bound)", p50 === null ? "no requests" : `≤ ${fixed(p50 * 1000, 0)} ms`],
                ["latency p99 (bucket bound)", p99 === null ? "no requests" : `≤ ${fixed(p99 * 1000, 0)} ms`]);
    }
    previous = now;
    facts(target, rows);
  } catch (err) {
    facts(target, [["metrics", err.message]]);
  }
}

async function model() {
  const target = document.getElementById("status-model");
  const rows = [];
  try {
    const ready = await json("/readyz");
    rows.push(["readiness", ready.status]);
  } catch (err) {
    rows.push(["readiness", `not ready: ${err.message}`]);
  }
  try {
    const info = await json("/info");
    rows.push(["model", info.model], ["architecture", info.arch], ["weights", info.weights],
              ["weights fingerprint", info.weights_fingerprint], ["synthetic weights", info.synthetic ? "yes" : "no"],
              ["backend", info.backend], ["device", info.device], ["threads", String(info.threads)],
              ["max batch", String(info.max_batch)], ["verify threshold", String(info.defaults.verify_threshold)]);
    document.getElementById("synthetic-banner").hidden = !info.synthetic;
  } catch (err) {
    rows.push(["model details", `${err.message} (/info needs a key with the admin scope)`]);
  }
  facts(target, rows);
}

export async function show() {
  previous = null;
  await model();
  await live();
  if (timer === null) timer = setInterval(live, POLL_MS);
}

export function hide() {
  if (timer !== null) clearInterval(timer);
  timer = null;
}
