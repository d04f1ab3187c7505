// The AI SDK's own client (npm package `ai`) against the Python backend, for
// tests/test_ai_sdk_client.py. One scenario per run: `node client.mjs '<JSON>'`; it prints
// `{"event": "cut"}` when the test should cut the connection (then waits for a line on stdin),
// and its result as one JSON line at the end.
import { createInterface } from "node:readline";
import { DefaultChatTransport, readUIMessageStream } from "ai";
import { scenarios } from "./scenarios.mjs";

const options = JSON.parse(process.argv[2]);
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

const io = {
  DefaultChatTransport,
  readUIMessageStream,
  // Tell the test to cut the connection now, and wait until it did.
  async cut() {
    process.stdout.write(`${JSON.stringify({ event: "cut" })}\n`);
    await lines.next();
  },
};

const result = await scenarios[options.scenario](io, options);
process.stdout.write(`${JSON.stringify({ event: "result", result })}\n`);
process.exit(0);
