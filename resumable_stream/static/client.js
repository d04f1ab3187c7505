// @ts-check
/**
 * Browser client for `resumable_stream` servers: a dependency-free ES module, no build step.
 *
 * - {@link runTask} runs a task served by `resumable_stream.tasks.TaskApp` and resolves with its
 *   result, reconnecting (same task, `X-Task-Id` + `Last-Event-ID`) if the connection drops.
 * - {@link follow} streams Server-Sent Events over `fetch`, so any method, body and headers work
 *   (`EventSource` can only GET), and resumes after drops with `Last-Event-ID`, as
 *   `EventSource` does.
 * - {@link SSEParser} is the incremental `text/event-stream` parser both use (WHATWG rules).
 *
 * Serve it with `resumable_stream.asgi.ClientScriptApp` and import it from a module script:
 *
 *     import { runTask, follow } from "/client.js";
 *     const result = await runTask("/tasks/summarize", { url }, { onWait: () => spin() });
 *
 * Event ids of these servers are character offsets, so a reconnection that sends the last id
 * (or `0` when the response had not delivered one yet) resumes with no gap and no duplicate.
 * Cross-origin use needs CORS to allow the `Last-Event-ID` and `X-Task-Id` request headers and
 * to expose the `X-Task-Id` response header.
 *
 * @module resumable_stream/client
 */

/** Reconnection delay (ms) until the server sends `retry:`. */
const DEFAULT_RETRY_MS = 1000;
/** Ceiling of the backoff (ms); a larger `retry:` from the server still wins. */
const MAX_BACKOFF_MS = 30_000;
/** Consecutive connections that may fail (no event received) before giving up. */
const DEFAULT_RETRIES = 10;
/** Statuses that mean "try again later" rather than "this request is wrong". */
const RETRYABLE_STATUS = new Set([502, 503, 504]);
/** How much of an error response's body becomes the error's message. */
const MAX_ERROR_TEXT = 300;
const LINE_END = /\r\n|\r|\n/;

/**
 * What {@link runTask} rejects with and {@link follow} passes to `onError`.
 *
 * `code` is the server's code (`server-error` events: the `TaskError`'s code; `event: error`
 * frames: `failed`, `cancelled`, `producer_lost`, ...), or one of the client's own:
 * `INTERNAL_ERROR` (the task crashed; details stay on the server), `HTTP_<status>` (an error
 * status, or a response that is not an event stream), `NO_DATA` (the server has no outcome to
 * send: the task already finished, or is unknown), `NETWORK_ERROR` (the connection kept
 * failing, or dropped before reconnecting was possible), `BAD_RESPONSE` (a malformed result).
 */
export class StreamError extends Error {
  /**
   * @param {string} message
   * @param {string} code
   * @param {{ status?: number, cause?: unknown }} [details]
   */
  constructor(message, code, details = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.name = "StreamError";
    /** @type {string} */
    this.code = code;
    /** The HTTP status, for `HTTP_<status>` and `NO_DATA`. @type {number | undefined} */
    this.status = details.status;
  }
}

/**
 * One dispatched event, as `EventSource` would deliver it.
 * @typedef {object} SSEEvent
 * @property {string} id the last event id in effect ("" if none); here the offset just past it
 * @property {string} event the event type ("message" unless the server named it)
 * @property {string} data the data lines, joined with "\n"
 */

/**
 * Incremental `text/event-stream` parser following the WHATWG rules (HTML §9.2.6): UTF-8 with
 * one leading BOM dropped, CRLF / CR / LF line ends (also when a CR and its LF arrive in
 * different chunks), comments ignored, one space after the colon stripped, dispatch on a blank
 * line, a block without `data` dispatches nothing, `id` containing NUL ignored, `retry` ASCII
 * digits only. An event without its blank line at the end of a response is discarded.
 *
 * One parser follows one logical stream: call {@link SSEParser#end} when a response ends; the
 * last event id and the reconnection time carry over to the next response.
 */
export class SSEParser {
  /** The id a reconnection sends as `Last-Event-ID` (updated at each blank line). */
  lastEventId = "";
  /** The reconnection time (ms) last set by `retry:`, or null. @type {number | null} */
  retry = null;
  /** @type {TextDecoder} */ #decoder = new TextDecoder("utf-8");
  /** The start of an unfinished line. */ #line = "";
  /** The text so far ended with a CR, so a leading LF ends no line. */ #skipLF = false;
  /** @type {string[]} */ #data = [];
  #event = "";
  #idBuffer = "";

  constructor() {
    this.#begin();
  }

  #begin() {
    this.#decoder = new TextDecoder("utf-8"); // drops one leading BOM; bad bytes become U+FFFD
    this.#line = "";
    this.#skipLF = false;
    this.#data = [];
    this.#event = "";
    // Browsers start each response's id buffer at the last id (the spec says ""), so a
    // resumed response whose first event carries no id keeps the resume point. So do we.
    this.#idBuffer = this.lastEventId;
  }

  /**
   * Parse the next bytes of the body (or text already decoded); return the events completed.
   * @param {Uint8Array | ArrayBuffer | string} chunk
   * @returns {SSEEvent[]}
   */
  feed(chunk) {
    let text = typeof chunk === "string" ? chunk : this.#decoder.decode(chunk, { stream: true });
    if (!text) return [];
    if (this.#skipLF && text[0] === "\n") text = text.slice(1);
    // A CR at the end ends its line now (waiting for the next chunk could wait forever); only
    // the decision about an LF that may follow is carried over.
    this.#skipLF = text.endsWith("\r");
    const lines = text.split(LINE_END);
    const tail = /** @type {string} */ (lines.pop());
    /** @type {SSEEvent[]} */
    const events = [];
    if (lines.length > 0) {
      lines[0] = this.#line + lines[0];
      this.#line = "";
      for (const line of lines) {
        if (line) {
          this.#field(line);
        } else {
          const event = this.#dispatch();
          if (event) events.push(event);
        }
      }
    }
    this.#line += tail;
    return events;
  }

  /** The response ended: drop what was not dispatched; get ready for the next response. */
  end() {
    this.#begin();
  }

  /** @param {string} line */
  #field(line) {
    if (line[0] === ":") return; // a comment, usually a keep-alive
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value[0] === " ") value = value.slice(1);
    if (name === "data") this.#data.push(value);
    else if (name === "event") this.#event = value;
    else if (name === "id") {
      if (!value.includes("\0")) this.#idBuffer = value;
    } else if (name === "retry" && /^[0-9]+$/.test(value)) this.retry = Number(value);
  }

  /** @returns {SSEEvent | null} */
  #dispatch() {
    this.lastEventId = this.#idBuffer;
    if (this.#data.length === 0) {
      this.#event = "";
      return null;
    }
    const event = {
      id: this.lastEventId,
      event: this.#event || "message",
      data: this.#data.join("\n"),
    };
    this.#data = [];
    this.#event = "";
    return event;
  }
}

/**
 * Called before each reconnection.
 * @callback OnReconnect
 * @param {{ attempt: number, lastEventId: string, delay: number }} info the attempt number (1
 *   for the first reconnection), the cursor it sends as `Last-Event-ID` ("" for none), and the
 *   delay (ms) it waits first
 * @returns {void}
 */

/**
 * @typedef {object} RunTaskOptions
 * @property {HeadersInit} [headers] extra request headers (authentication, say)
 * @property {AbortSignal} [signal] aborting rejects with `signal.reason` and drops the
 *   connection; the task itself goes on (stop it with the server's `StopStreamApp`)
 * @property {() => void} [onWait] called for each `wait` event (the task is still running)
 * @property {(taskId: string) => void} [onTaskId] called once the server named the task: keep
 *   the id to join the task again later (after a reload, say)
 * @property {string} [taskId] join this task instead of starting one (or start it under this
 *   id if the server knows none); a finished task's outcome is then `NO_DATA`
 * @property {OnReconnect} [onReconnect]
 * @property {number} [retries] consecutive failed connections tolerated (default 10)
 */

/**
 * Run a task: POST `input` as JSON to a `TaskApp` endpoint and resolve with its result.
 *
 * Resolves with the `settle` event's JSON. Rejects with a {@link StreamError}: the task's own
 * `{message, code}` (`server-error`, from `TaskError`), `INTERNAL_ERROR` (`internal-error`),
 * the code of an `event: error` frame (`cancelled`, ...), `HTTP_<status>`, `NO_DATA` or
 * `NETWORK_ERROR`; or with `signal.reason` when aborted. If the connection drops before the
 * outcome, it POSTs again with the task's `X-Task-Id` and `Last-Event-ID`, after the server's
 * `retry:` delay (doubling while connections keep failing), so the task runs once.
 *
 * @param {string | URL} url
 * @param {unknown} input sent as the JSON body
 * @param {RunTaskOptions} [options]
 * @returns {Promise<any>}
 */
export async function runTask(url, input, options = {}) {
  const { headers, signal, onWait, onTaskId, onReconnect, retries = DEFAULT_RETRIES } = options;
  const body = JSON.stringify(input === undefined ? null : input);
  const parser = new SSEParser();
  let taskId = options.taskId || "";
  let failures = 0;
  let problem = "";
  for (let attempt = 0; ; attempt++) {
    if (attempt > 0) {
      if (!taskId) {
        const message = `the connection failed before the task had an id: ${problem}`;
        throw new StreamError(message, "NETWORK_ERROR");
      }
      if (failures > retries) {
        throw giveUp(failures, problem);
      }
      const delay = backoff(parser.retry, failures);
      // The task exists, so a cursor of 0 only joins it (and still gets a recent outcome).
      onReconnect?.({ attempt, lastEventId: parser.lastEventId || "0", delay });
      await sleep(delay, signal);
    }
    signal?.throwIfAborted();
    const request = new Headers(headers);
    if (!request.has("Content-Type")) request.set("Content-Type", "application/json");
    if (!request.has("Accept")) request.set("Accept", "text/event-stream");
    if (taskId) request.set("X-Task-Id", taskId);
    if (attempt > 0) request.set("Last-Event-ID", parser.lastEventId || "0");
    /** @type {Response} */
    let response;
    try {
      const init = { method: "POST", headers: request, body, signal, cache: "no-store" };
      response = await fetch(url, /** @type {RequestInit} */ (init));
    } catch (error) {
      signal?.throwIfAborted();
      failures += 1;
      problem = describe(error);
      continue;
    }
    if (response.status === 204) {
      throw new StreamError(
        "the server has no outcome for this task: it already finished, or is unknown",
        "NO_DATA",
        { status: 204 },
      );
    }
    if (!response.ok || !isEventStream(response)) {
      if (taskId && RETRYABLE_STATUS.has(response.status)) {
        failures += 1;
        problem = await errorText(response);
        continue;
      }
      throw await httpError(response);
    }
    const named = response.headers.get("X-Task-Id");
    if (named && named !== taskId) {
      taskId = named;
      onTaskId?.(named);
    }
    /** @type {{ value: any } | { error: StreamError } | null} */
    let outcome = null;
    const { progressed, error } = await pump(response, parser, (event) => {
      switch (event.event) {
        case "wait":
          onWait?.();
          return false;
        case "settle":
          try {
            outcome = { value: JSON.parse(event.data) };
          } catch (cause) {
            const message = "the task's result is not JSON";
            outcome = { error: new StreamError(message, "BAD_RESPONSE", { cause }) };
          }
          return true;
        case "server-error":
          outcome = { error: failure(event.data, "the task failed", "TASK_ERROR") };
          return true;
        case "internal-error":
          outcome = { error: failure(event.data, "internal error", "INTERNAL_ERROR", true) };
          return true;
        case "error":
          outcome = { error: failure(event.data, "the task's stream ended with an error") };
          return true;
        default:
          return false;
      }
    });
    if (outcome !== null) {
      if ("error" in outcome) throw outcome.error;
      return outcome.value;
    }
    signal?.throwIfAborted();
    failures = progressed ? 1 : failures + 1;
    problem = error ? describe(error) : "the response ended before the task's outcome";
  }
}

/**
 * @typedef {object} FollowOptions
 * @property {(data: string, event: SSEEvent) => void} [onChunk] once per event, in order
 * @property {() => void} [onEnd] the server answered 204: the stream is finished (or unknown)
 * @property {(error: unknown) => void} [onError] a {@link StreamError} (an `event: error`
 *   frame, an HTTP error, `NETWORK_ERROR`), or what a callback threw; following stops
 * @property {OnReconnect} [onReconnect]
 * @property {number | string} [resumeAt] start at this offset (sent as `Last-Event-ID`, and
 *   again on reconnections until the first event id arrives)
 * @property {string} [method] default: GET, or POST when there is a `body`
 * @property {BodyInit} [body] sent again on each reconnection, so not a one-shot stream
 * @property {HeadersInit} [headers]
 * @property {AbortSignal} [signal] aborting is `close()`
 * @property {number} [retries] consecutive failed connections tolerated (default 10)
 */

/**
 * What {@link follow} returns.
 * @typedef {object} FollowController
 * @property {() => void} close stop following; no callback is called afterwards
 * @property {string} lastEventId the cursor a reconnection would send now ("" for none)
 */

/**
 * Follow an SSE stream over `fetch`, resuming after drops; see {@link FollowOptions}.
 *
 * Calls `onChunk(data, event)` for every event except `event: error` (which ends with
 * `onError`). When a response ends or fails, it reconnects after the server's `retry:` delay
 * (doubling while connections keep failing) with `Last-Event-ID`: the last id received, else
 * `resumeAt`, else `0` once a response was accepted (it only continues the stream then). A 204
 * ends with `onEnd()`; 502, 503 and 504 are retried; other errors end with `onError`.
 *
 * @param {string | URL} url
 * @param {FollowOptions} [options]
 * @returns {FollowController}
 */
export function follow(url, options = {}) {
  const { onChunk, onEnd, onError, onReconnect, headers, body, signal } = options;
  const method = options.method ?? (body == null ? "GET" : "POST");
  const retries = options.retries ?? DEFAULT_RETRIES;
  const seed = options.resumeAt == null ? "" : String(options.resumeAt);
  const parser = new SSEParser();
  const stopper = new AbortController();
  let closed = false;
  let opened = false;
  const cursor = () => parser.lastEventId || seed || (opened ? "0" : "");

  function close() {
    if (closed) return;
    closed = true;
    signal?.removeEventListener("abort", close);
    stopper.abort();
  }
  /** @param {(() => void) | undefined} callback */
  function finish(callback) {
    if (closed) return;
    close();
    callback?.();
  }

  async function run() {
    let failures = 0;
    let problem = "";
    for (let attempt = 0; ; attempt++) {
      if (attempt > 0) {
        if (failures > retries) {
          const error = giveUp(failures, problem);
          return finish(() => onError?.(error));
        }
        const delay = backoff(parser.retry, failures);
        onReconnect?.({ attempt, lastEventId: cursor(), delay });
        try {
          await sleep(delay, stopper.signal);
        } catch {
          return; // closed
        }
      }
      if (closed) return;
      const request = new Headers(headers);
      if (!request.has("Accept")) request.set("Accept", "text/event-stream");
      if (cursor()) request.set("Last-Event-ID", cursor());
      /** @type {Response} */
      let response;
      try {
        const init = { method, headers: request, body, signal: stopper.signal, cache: "no-store" };
        response = await fetch(url, /** @type {RequestInit} */ (init));
      } catch (error) {
        if (closed) return;
        failures += 1;
        problem = describe(error);
        continue;
      }
      if (response.status === 204) return finish(onEnd);
      if (!response.ok || !isEventStream(response)) {
        if (RETRYABLE_STATUS.has(response.status)) {
          failures += 1;
          problem = await errorText(response);
          continue;
        }
        const error = await httpError(response);
        return finish(() => onError?.(error));
      }
      opened = true;
      /** @type {StreamError | null} */
      let ended = null;
      const { progressed, error } = await pump(response, parser, (event) => {
        if (closed) return true;
        if (event.event === "error") {
          ended = failure(event.data, "the stream ended with an error");
          return true;
        }
        onChunk?.(event.data, event);
        return closed; // onChunk may have closed
      });
      if (ended !== null) {
        const reason = ended;
        return finish(() => onError?.(reason));
      }
      if (closed) return;
      failures = progressed ? 1 : failures + 1;
      problem = error ? describe(error) : "the response ended";
    }
  }

  if (signal?.aborted) closed = true;
  else signal?.addEventListener("abort", close, { once: true });
  if (!closed) {
    run().catch((error) => {
      // A callback threw: stop, and tell onError (or the console, if onError itself threw).
      if (!closed) {
        close();
        try {
          onError?.(error);
          return;
        } catch (again) {
          error = again;
        }
      }
      report(error);
    });
  }
  return {
    close,
    get lastEventId() {
      return cursor();
    },
  };
}

/**
 * Read a response's events into `onEvent` until it returns true (stop), the body ends or the
 * connection fails. A throwing `onEvent` cancels the body and rethrows.
 * @param {Response} response
 * @param {SSEParser} parser
 * @param {(event: SSEEvent) => boolean} onEvent
 * @returns {Promise<{ progressed: boolean, error: unknown }>}
 */
async function pump(response, parser, onEvent) {
  const before = parser.lastEventId;
  let count = 0;
  if (!response.body) return { progressed: false, error: null };
  const reader = response.body.getReader();
  try {
    for (;;) {
      /** @type {ReadableStreamReadResult<Uint8Array>} */
      let result;
      try {
        result = await reader.read();
      } catch (error) {
        return { progressed: count > 0 || parser.lastEventId !== before, error };
      }
      if (result.done) {
        return { progressed: count > 0 || parser.lastEventId !== before, error: null };
      }
      for (const event of parser.feed(result.value)) {
        count += 1;
        let stop = true;
        try {
          stop = onEvent(event);
        } finally {
          if (stop) reader.cancel().catch(() => {});
        }
        if (stop) return { progressed: true, error: null };
      }
    }
  } finally {
    parser.end();
  }
}

/** @param {number} failures @param {string} problem */
function giveUp(failures, problem) {
  const message = `gave up after ${failures} failed connections: ${problem}`;
  return new StreamError(message, "NETWORK_ERROR");
}

/**
 * The delay before a reconnection: the server's `retry:` (or the default), doubled for each
 * further connection that failed, up to MAX_BACKOFF_MS (or `retry:`, if larger).
 * @param {number | null} retry @param {number} failures (at least 1)
 */
function backoff(retry, failures) {
  const base = retry ?? DEFAULT_RETRY_MS;
  return Math.min(base * 2 ** Math.max(0, failures - 1), Math.max(base, MAX_BACKOFF_MS));
}

/** @param {number} ms @param {AbortSignal | undefined} signal @returns {Promise<void>} */
function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const abort = () => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", abort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", abort, { once: true });
  });
}

/** @param {Response} response */
function isEventStream(response) {
  return /^text\/event-stream\s*(;|$)/i.test(response.headers.get("Content-Type") ?? "");
}

/**
 * The `{message, code}` JSON of an event, as a StreamError; `message` and `code` are the
 * defaults, and with `fixed` the code is `code` whatever the data says.
 * @param {string} data @param {string} message @param {string} [code] @param {boolean} [fixed]
 */
function failure(data, message, code = "error", fixed = false) {
  /** @type {any} */
  let info = null;
  try {
    info = JSON.parse(data);
  } catch {
    // not JSON: keep the defaults
  }
  if (info === null || typeof info !== "object") info = {};
  const text = typeof info.message === "string" && info.message ? info.message : message;
  const given = typeof info.code === "string" && info.code ? info.code : code;
  return new StreamError(text, fixed ? code : given);
}

/** The start of an error response's text (and the end of it). @param {Response} response */
async function errorText(response) {
  let text = "";
  if (response.body) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    try {
      while (text.length < MAX_ERROR_TEXT) {
        const { done, value } = await reader.read();
        if (done) break;
        text += decoder.decode(value, { stream: true });
      }
    } catch {
      // the body broke off: what we have will do
    } finally {
      reader.cancel().catch(() => {});
    }
  }
  text = text.trim().slice(0, MAX_ERROR_TEXT);
  return text || `HTTP ${response.status}${response.statusText ? ` ${response.statusText}` : ""}`;
}

/** @param {Response} response */
async function httpError(response) {
  const status = response.status;
  const message = response.ok
    ? `expected an event stream, got ${response.headers.get("Content-Type") || "no Content-Type"}`
    : await errorText(response);
  if (response.ok) response.body?.cancel().catch(() => {});
  return new StreamError(message, `HTTP_${status}`, { status });
}

/** @param {unknown} error */
function describe(error) {
  return error instanceof Error ? error.message : String(error);
}

/** Report an error nobody can handle, as an uncaught one. @param {unknown} error */
function report(error) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(error);
  else setTimeout(() => { throw error; });
}
