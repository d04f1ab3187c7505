// The browser's entry point (bundled by esbuild for tests/test_ai_sdk_client.py): the AI SDK's
// ESM build and the scenarios, with `cut()` asking the test (a function Playwright exposes).
import { DefaultChatTransport, readUIMessageStream } from "ai";
import { scenarios } from "./scenarios.mjs";

const io = { DefaultChatTransport, readUIMessageStream, cut: () => window.cutConnection() };

window.runScenario = (options) => scenarios[options.scenario](io, options);
