// Runs the shared workload (../shared/benchmarks/WORKLOAD.md) against the npm reference
// `resumable-stream` and prints one JSON document on stdout. Driven by ../bench_compare.py.
//
//   node bench.mjs --url redis://127.0.0.1:PORT [--chunks 10000] [--width 64] [--runs 5]
//                  [--small 200] [--mode main|replay] [--replay-mib 40] [--timeout 60]
//
// Both contexts get their own node-redis clients (the same `createClient({url})` the package
// makes by default), so this script can close them and count on an `error` handler being set.

import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { performance } from "node:perf_hooks";
import { parseArgs } from "node:util";
import { createClient } from "redis";
import { createResumableStreamContext } from "resumable-stream";

const installedVersion = (name) =>
  JSON.parse(readFileSync(new URL(`./node_modules/${name}/package.json`, import.meta.url), "utf8")).version;
const RS_VERSION = installedVersion("resumable-stream");
const REDIS_CLIENT_VERSION = installedVersion("redis");

const { values: opts } = parseArgs({
  options: {
    url: { type: "string", default: process.env.REDIS_URL ?? "redis://127.0.0.1:6379" },
    chunks: { type: "string", default: "10000" },
    width: { type: "string", default: "64" },
    runs: { type: "string", default: "5" },
    small: { type: "string", default: "200" },
    mode: { type: "string", default: "main" },
    "replay-mib": { type: "string", default: "40" },
    "replay-width": { type: "string", default: "65536" },
    timeout: { type: "string", default: "60" },
  },
});
const N = Number(opts.chunks);
const W = Number(opts.width);
const RUNS = Number(opts.runs);
const SMALL = Number(opts.small);
const URL_ = opts.url;

const ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
// Commands issued by the admin connection itself or by (re)connection handshakes.
const ADMIN = new Set(["info", "client|info", "pubsub|numsub", "ping", "hello", "client|setinfo", "select"]);

const now = () => performance.now();
const log = (...args) => console.error("[node bench]", ...args);

// chunk(i, W) = "%08d:" + ALPHABET rotated by i, W - 9 characters long.
function chunk(i, width) {
  const n = width - 9;
  const r = i % 62;
  const rot = ALPHABET.slice(r) + ALPHABET.slice(0, r);
  return String(i).padStart(8, "0") + ":" + rot.repeat(Math.ceil(n / 62)).slice(0, n);
}

function makeGate(at) {
  let open;
  const promise = new Promise((resolve) => (open = resolve));
  return { at, promise, open };
}

const nextTurn = () => new Promise((resolve) => setImmediate(resolve));

// A source that yields chunks as fast as they are pulled; `yieldEvery = k` waits one event-loop
// turn before every k-th chunk; the pull that would produce chunk `gate.at` first awaits the gate.
function makeSource(chunks, { yieldEvery = 0, gate = null } = {}) {
  return () => {
    let i = 0;
    return new ReadableStream(
      {
        pull(controller) {
          if (i >= chunks.length) {
            controller.close();
            return undefined;
          }
          const waits = [];
          if (gate && i === gate.at) waits.push(gate.promise);
          if (yieldEvery && i % yieldEvery === 0) waits.push(nextTurn());
          if (waits.length === 0) {
            controller.enqueue(chunks[i++]);
            return undefined;
          }
          return (async () => {
            for (const w of waits) await w;
            controller.enqueue(chunks[i++]);
          })();
        },
      },
      { highWaterMark: 0 },
    );
  };
}

const throwingMake = () => {
  throw new Error("a follower must not produce");
};

const clientErrors = [];

async function makeClient() {
  const client = createClient({ url: URL_ });
  client.on("error", (err) => {
    clientErrors.push(String(err?.message ?? err));
    log("redis client error:", String(err));
  });
  await client.connect();
  return client;
}

// A context with its own publisher and subscriber; `pending` is the promise the last producer
// handed to waitUntil, resolving to the time it settled (DONE written, listeners told).
async function makeContext() {
  const publisher = await makeClient();
  const subscriber = await makeClient();
  const holder = { pending: null, publisher, subscriber };
  holder.api = createResumableStreamContext({
    keyPrefix: "bench",
    publisher,
    subscriber,
    waitUntil: (promise) => {
      holder.pending = promise.then(() => now());
    },
  });
  return holder;
}

async function closeContext(ctx) {
  for (const client of [ctx.publisher, ctx.subscriber]) {
    try {
      client.destroy();
    } catch {
      // already closed
    }
  }
}

async function commandstats(admin) {
  const text = await admin.info("commandstats");
  const out = new Map();
  for (const line of text.split(/\r?\n/)) {
    const m = /^cmdstat_([^:]+):calls=(\d+)/.exec(line);
    if (m) out.set(m[1], Number(m[2]));
  }
  return out;
}

function delta(before, after) {
  const out = {};
  for (const [name, calls] of after) {
    const d = calls - (before.get(name) ?? 0);
    if (d > 0 && !ADMIN.has(name)) out[name] = d;
  }
  return Object.fromEntries(Object.entries(out).sort());
}

const settle = () => new Promise((resolve) => setTimeout(resolve, 100));

// Reads a stream to its end: texts, the time the text reached `length` characters, the end time.
async function readAll(reader, length = Infinity) {
  const parts = [];
  let size = 0;
  let lastAt = null;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    parts.push(value);
    size += value.length;
    if (lastAt === null && size >= length) lastAt = now();
  }
  return { parts, size, lastAt, endAt: now() };
}

function median(values) {
  const s = [...values].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function medianOf(runs) {
  const out = {};
  for (const key of Object.keys(runs[0])) {
    const values = runs.map((r) => r[key]);
    if (typeof values[0] === "boolean") out[key] = values.every(Boolean);
    else if (typeof values[0] === "number") out[key] = median(values);
  }
  return out;
}

// Scenarios ------------------------------------------------------------------------------------

async function baseline(chunks, yieldEvery) {
  const t0 = now();
  const reader = makeSource(chunks, { yieldEvery })().getReader();
  let n = 0;
  for (;;) {
    const { done } = await reader.read();
    if (done) break;
    n += 1;
  }
  const total = now() - t0;
  return { total_ms: total, chunks_per_s: (n / total) * 1e3 };
}

async function produceConsume(P, chunks, fullText, yieldEvery) {
  const id = randomUUID();
  const t0 = now();
  const stream = await P.api.resumableStream(id, makeSource(chunks, { yieldEvery }));
  const completed = P.pending;
  const reader = stream.getReader();
  const first = await reader.read();
  const ttfc = now() - t0;
  const rest = await readAll(reader, fullText.length - first.value.length);
  const total = (rest.lastAt ?? rest.endAt) - t0;
  const complete = (await completed) - t0;
  const text = first.value + rest.parts.join("");
  return {
    ttfc_ms: ttfc,
    total_ms: total,
    complete_ms: complete,
    chunks_per_s: (chunks.length / total) * 1e3,
    mb_per_s: fullText.length / 1e6 / (total / 1e3),
    ok: text === fullText,
  };
}

async function resumeGated(P, C, chunks, fullText, explicit) {
  const k = Math.floor(chunks.length / 2);
  const gate = makeGate(k);
  const id = randomUUID();
  const source = makeSource(chunks, { gate });
  const own = explicit
    ? await P.api.createNewResumableStream(id, source)
    : await P.api.resumableStream(id, source);
  const completed = P.pending;
  const ownReader = own.getReader();
  const got = [];
  while (got.length < k) got.push((await ownReader.read()).value);
  const offset = k * W - 17;
  const t0 = now();
  const follower = explicit
    ? await C.api.resumeExistingStream(id, offset)
    : await C.api.resumableStream(id, throwingMake, offset);
  const ack = now() - t0;
  if (!follower) throw new Error(`gated follower got ${follower}`);
  const followerReader = follower.getReader();
  const first = await followerReader.read();
  const firstChunk = now() - t0;
  const gateOpen = now();
  gate.open();
  const [ownRest, followerRest, doneAt] = await Promise.all([
    readAll(ownReader),
    readAll(followerReader),
    completed,
  ]);
  const followerText = first.value + followerRest.parts.join("");
  return {
    resume_ack_ms: ack,
    follower_first_chunk_ms: firstChunk,
    producer_live_chunks_per_s_with_1_listener: ((chunks.length - k) / (doneAt - gateOpen)) * 1e3,
    follower_done_after_gate_ms: followerRest.endAt - gateOpen,
    follower_reads: 1 + followerRest.parts.length,
    follower_ok: followerText === fullText.slice(offset),
    producer_ok: got.join("") + ownRest.parts.join("") === fullText,
  };
}

async function resumeUngated(P, C, chunks, fullText) {
  const id = randomUUID();
  const own = await P.api.resumableStream(id, makeSource(chunks, { yieldEvery: 1 }));
  const completed = P.pending;
  const ownReader = own.getReader();
  const first = await ownReader.read();
  const t0 = now();
  const follower = await C.api.resumableStream(id, throwingMake, 0);
  const ack = now() - t0;
  const ownRest = readAll(ownReader);
  let followerText = "";
  let reads = 0;
  if (follower) {
    const r = await readAll(follower.getReader());
    followerText = r.parts.join("");
    reads = r.parts.length;
  }
  const own_ = await ownRest;
  await completed;
  return {
    resume_ack_ms: ack,
    follower_null: !follower,
    follower_reads: reads,
    follower_ok: followerText === fullText,
    producer_ok: first.value + own_.parts.join("") === fullText,
  };
}

async function commandsPerStream(P, admin, explicit, streams) {
  const chunks = [chunk(0, W), chunk(1, W), chunk(2, W)];
  const before = await commandstats(admin);
  for (let i = 0; i < streams; i++) {
    const id = randomUUID();
    const stream = explicit
      ? await P.api.createNewResumableStream(id, makeSource(chunks))
      : await P.api.resumableStream(id, makeSource(chunks));
    const completed = P.pending;
    await readAll(stream.getReader());
    await completed;
  }
  await settle();
  const raw = delta(before, await commandstats(admin));
  const per = Object.fromEntries(Object.entries(raw).map(([k, v]) => [k, v / streams]));
  return { streams, per_stream_calls: per, raw_delta: raw };
}

async function withCommands(admin, fn) {
  const before = await commandstats(admin);
  const result = await fn();
  await settle();
  return [result, delta(before, await commandstats(admin))];
}

// 40 MiB replay: P buffers `mib` MiB (chunks of `width` characters) and waits at a gate before one
// last chunk; C resumes at 0. Time to the last replayed byte, or the failure, within `timeout` s.
async function replayBig(P, C, mib, width, timeoutS) {
  const size = mib * 1024 * 1024;
  const count = Math.ceil(size / width);
  const chunks = Array.from({ length: count + 1 }, (_, i) => chunk(i, width));
  const fullText = chunks.join("");
  const replayed = chunks.slice(0, count).reduce((n, c) => n + c.length, 0);
  const gate = makeGate(count);
  const id = randomUUID();
  const own = await P.api.resumableStream(id, makeSource(chunks, { gate }));
  const completed = P.pending;
  const ownReader = own.getReader();
  for (let i = 0; i < count; i++) await ownReader.read();
  const result = { replay_chars: replayed, timeout_s: timeoutS };
  const t0 = now();
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no complete replay within ${timeoutS} s`)), timeoutS * 1e3);
  });
  try {
    const attempt = (async () => {
      const follower = await C.api.resumableStream(id, throwingMake, 0);
      result.resume_ack_ms = now() - t0;
      if (!follower) throw new Error("resume returned null");
      const reader = follower.getReader();
      const parts = [];
      let got = 0;
      while (got < replayed) {
        const { done, value } = await reader.read();
        if (done) throw new Error(`stream ended after ${got} characters`);
        parts.push(value);
        got += value.length;
      }
      result.last_byte_ms = now() - t0;
      gate.open();
      const rest = await readAll(reader);
      result.ok = parts.join("") + rest.parts.join("") === fullText;
    })();
    await Promise.race([attempt, timeout]);
    result.completed = true;
  } catch (err) {
    result.completed = false;
    result.ok = false;
    result.failed_after_ms = now() - t0;
    result.error = String(err?.message ?? err);
  } finally {
    clearTimeout(timer);
    gate.open();
  }
  result.redis_client_errors = [...new Set(clientErrors)];
  await readAll(ownReader);
  await Promise.race([completed, new Promise((r) => setTimeout(r, 5000))]);
  return result;
}

// Main -----------------------------------------------------------------------------------------

async function main() {
  process.on("unhandledRejection", (reason) => log("unhandled rejection:", String(reason)));
  const admin = await makeClient();
  const info = await admin.info("server");
  const redisVersion = /redis_version:(\S+)/.exec(info)?.[1] ?? "?";
  const port = Number(new URL(URL_).port);
  const P = await makeContext();
  const C = await makeContext();
  const report = {
    impl: `node:resumable-stream@${RS_VERSION}`,
    node: process.version,
    redis_client: `redis@${REDIS_CLIENT_VERSION}`,
    redis_version: redisVersion,
    params: { chunks: N, width: W, runs: RUNS, small_streams: SMALL, port },
    results: {},
  };
  try {
    const warm = [chunk(0, W), chunk(1, W), chunk(2, W)];
    for (const ctx of [P, C]) await produceConsume(ctx, warm, warm.join(""), 0);

    if (opts.mode === "replay") {
      const mib = Number(opts["replay-mib"]);
      report.params.replay_mib = mib;
      report.params.replay_width = Number(opts["replay-width"]);
      report.results[`replay_${mib}mib`] = await replayBig(
        P, C, mib, Number(opts["replay-width"]), Number(opts.timeout),
      );
    } else {
      const chunks = Array.from({ length: N }, (_, i) => chunk(i, W));
      const fullText = chunks.join("");
      const runs = {};
      const record = (name, r) => (runs[name] ??= []).push(r);
      const commands = {};
      for (let run = 0; run < RUNS; run++) {
        record("baseline_no_library", await baseline(chunks, 0));
        record("produce_consume", await produceConsume(P, chunks, fullText, 0));
        record("baseline_no_library_yielding_source", await baseline(chunks, 1));
        record("produce_consume_yielding_source", await produceConsume(P, chunks, fullText, 1));
        for (const [name, explicit] of [
          ["resume_gated_idempotent_api", false],
          ["resume_gated_explicit_api", true],
        ]) {
          if (run === 0) {
            const [r, d] = await withCommands(admin, () => resumeGated(P, C, chunks, fullText, explicit));
            record(name, r);
            commands[name] = d;
          } else {
            record(name, await resumeGated(P, C, chunks, fullText, explicit));
          }
        }
        record("resume_ungated", await resumeUngated(P, C, chunks, fullText));
      }
      for (const [name, list] of Object.entries(runs)) {
        report.results[name] = { runs: list, median: medianOf(list) };
        if (commands[name]) report.results[name].commands_first_run = commands[name];
      }
      report.results.commands_per_stream_idempotent_api = await commandsPerStream(P, admin, false, SMALL);
      report.results.commands_per_stream_explicit_api = await commandsPerStream(P, admin, true, SMALL);
      const [big, bigDelta] = await withCommands(admin, () => produceConsume(P, chunks, fullText, 0));
      report.results.commands_one_big_stream = { chunks: N, ok: big.ok, raw_delta: bigDelta };
    }
  } finally {
    await closeContext(P);
    await closeContext(C);
    admin.destroy();
  }
  process.stdout.write(JSON.stringify(report) + "\n");
}

main().then(
  () => process.exit(0),
  (err) => {
    log("failed:", err?.stack ?? String(err));
    process.exit(1);
  },
);
