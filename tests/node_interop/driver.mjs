// Drives one context of the real npm package `resumable-stream` for tests/test_compat_vercel.py.
//
//   node driver.mjs '{"module": "resumable-stream", "client": "node-redis", "url": "redis://...",
//                     "keyPrefix": "...", "extra": {...}, "bare": false, "dropDone": false}'
//
// `module` is the package or one of its npm aliases (rs-2.2.12, rs-2.2.0, rs-2.1.0, rs-2.0.0);
// `client` how the context gets its Redis clients: "node-redis" (two `createClient`s, connected
// here and passed in), "ioredis" (two raw `new Redis` instances, awaited to 'ready' and passed
// in: the package wraps them), or "default" (none passed: the package makes its own from
// REDIS_URL). `bare` leaves out the `unhandledRejection` handler frameworks install, so that a
// source error kills the process as it kills a bare Node producer. `dropDone` makes the
// publisher swallow the DONE message (node-redis only), as the reference's own tests do.
//
// One JSON command per stdin line, run concurrently; one JSON reply per stdout line, with the
// command's `id`. Strings travel as JSON, so lone surrogates survive both ways.

import readline from "node:readline";

const options = JSON.parse(process.argv[2]);
const send = (reply) => process.stdout.write(JSON.stringify(reply) + "\n");

if (!options.bare) {
  process.on("unhandledRejection", (reason) => {
    process.stderr.write(`driver: unhandled rejection: ${reason}\n`);
  });
}

const DONE_SENTINEL = "DONE_SENTINEL";

async function clients() {
  if (options.client === "default") {
    process.env.REDIS_URL = options.url;
    return {};
  }
  if (options.client === "ioredis") {
    const { Redis } = await import("ioredis");
    const make = () =>
      new Promise((resolve, reject) => {
        const client = new Redis(options.url, { lazyConnect: false });
        client.once("ready", () => resolve(client));
        client.once("error", reject);
        client.on("error", (e) => process.stderr.write(`driver: ioredis: ${e}\n`));
      });
    return { publisher: await make(), subscriber: await make() };
  }
  const { createClient } = await import("redis");
  const publisher = createClient({ url: options.url });
  const subscriber = createClient({ url: options.url });
  for (const client of [publisher, subscriber]) {
    // As any app does: a dropped connection is reconnected (subscriptions included), not fatal.
    client.on("error", (e) => process.stderr.write(`driver: node-redis: ${e}\n`));
  }
  await publisher.connect();
  await subscriber.connect();
  if (!options.dropDone) {
    return { publisher, subscriber };
  }
  // The DONE message never reaches anybody (a lost pub/sub message).
  const dropping = {
    connect: () => Promise.resolve(),
    publish: (channel, message) =>
      message.includes(DONE_SENTINEL) ? Promise.resolve(0) : publisher.publish(channel, message),
    set: (key, value, opts) => publisher.set(key, value, opts),
    get: (key) => publisher.get(key),
    incr: (key) => publisher.incr(key),
  };
  return { publisher: dropping, subscriber };
}

const mod = await import(options.module);
const createResumableStreamContext =
  mod.createResumableStreamContext ?? mod.default.createResumableStreamContext;
const context = createResumableStreamContext({
  keyPrefix: options.keyPrefix,
  waitUntil: (promise) => {
    promise.catch(() => {});
  },
  ...(await clients()),
  ...(options.extra ?? {}),
});

// Sources (what a producer's makeStream returns), and readers (streams this side reads).
const sources = new Map();
const readers = new Map();
let nextHandle = 0;

function newSource() {
  const handle = `s${nextHandle++}`;
  let controller;
  const stream = new ReadableStream({
    start(c) {
      controller = c;
    },
  });
  sources.set(handle, { stream, controller: () => controller, made: false });
  return handle;
}

function track(stream) {
  const handle = `r${nextHandle++}`;
  const reader = { chunks: [], done: false, error: null, changed: null, reader: null };
  reader.changed = new Promise((resolve) => (reader.wake = resolve));
  const notify = () => {
    const wake = reader.wake;
    reader.changed = new Promise((resolve) => (reader.wake = resolve));
    wake();
  };
  reader.reader = stream.getReader();
  (async () => {
    try {
      while (true) {
        const { done, value } = await reader.reader.read();
        if (done) break;
        reader.chunks.push(value);
        notify();
      }
    } catch (e) {
      reader.error = String(e?.message ?? e);
    }
    reader.done = true;
    notify();
  })();
  readers.set(handle, reader);
  return handle;
}

function outcome(value) {
  if (value === null) return { kind: "null" };
  if (value === undefined) return { kind: "undefined" };
  return { kind: "stream", handle: track(value) };
}

const commands = {
  async produce({ stream, mode, skip }) {
    const source = newSource();
    const make = () => {
      sources.get(source).made = true;
      return sources.get(source).stream;
    };
    const result =
      mode === "explicit"
        ? await context.createNewResumableStream(stream, make)
        : await context.resumableStream(stream, make, skip);
    return { source, made: sources.get(source).made, ...outcome(result) };
  },
  async write({ source, text, repeat }) {
    sources.get(source).controller().enqueue(repeat ? text.repeat(repeat) : text);
    return {};
  },
  async close({ source }) {
    sources.get(source).controller().close();
    return {};
  },
  async fail({ source }) {
    sources.get(source).controller().error(new Error("the source failed"));
    return {};
  },
  async resume({ stream, mode, skip }) {
    const started = Date.now();
    try {
      const result =
        mode === "explicit"
          ? await context.resumeExistingStream(stream, skip)
          : await context.resumableStream(
              stream,
              () => {
                throw new Error("makeStream called for a resume");
              },
              skip,
            );
      return { ms: Date.now() - started, ...outcome(result) };
    } catch (e) {
      return { ms: Date.now() - started, kind: "error", error: String(e?.message ?? e) };
    }
  },
  // The reader's text once it ended (or after `ms`), and whether it ended.
  async read({ handle, ms, length, quiet }) {
    const reader = readers.get(handle);
    const deadline = Date.now() + (ms ?? 10000);
    const have = () => reader.chunks.join("").length;
    while (!reader.done && (length == null || have() < length)) {
      const left = deadline - Date.now();
      if (left <= 0) break;
      await Promise.race([reader.changed, new Promise((r) => setTimeout(r, left))]);
    }
    const text = reader.chunks.join("");
    return {
      text: quiet ? "" : text, // quiet: the length only (a large text stays in Node)
      length: text.length,
      chunks: reader.chunks.length,
      done: reader.done,
      error: reader.error,
    };
  },
  async cancel({ handle }) {
    await readers.get(handle).reader.cancel();
    return {};
  },
  async has({ stream }) {
    const value = await context.hasExistingStream(stream);
    return { value: value === null ? "null" : value };
  },
  async exit() {
    setTimeout(() => process.exit(0), 10);
    return {};
  },
};

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const command = JSON.parse(line);
  const { id, op } = command;
  commands[op](command).then(
    (result) => send({ id, ok: true, ...result }),
    (e) => send({ id, ok: false, error: String(e?.stack ?? e) }),
  );
});
send({ id: "ready", ok: true });
