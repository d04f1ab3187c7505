// The scenarios the tests act out with the AI SDK's `DefaultChatTransport`, in Node
// (client.mjs) and in Chromium (bundled with esbuild): the same code in both. Each takes
// `io` (the `ai` exports it needs, and `cut()`: the test cuts the connection) and the test's
// options, and returns plain data for the test to check.

const userMessage = (text) => ({
  id: `user-${Math.random().toString(36).slice(2)}`,
  role: "user",
  parts: [{ type: "text", text }],
});

const plain = (error) => (error == null ? null : { name: error.name, message: String(error.message) });

// Read a chunk stream to its end (or its error): the chunks, and the error if any.
async function drain(stream, chunks = []) {
  const reader = stream.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) return { chunks, error: null };
      chunks.push(value);
    }
  } catch (error) {
    return { chunks, error: plain(error) };
  }
}

// The message `readUIMessageStream` assembles from a chunk stream, and the errors it reports.
async function assemble(io, stream, message) {
  const errors = [];
  let last = null;
  for await (const snapshot of io.readUIMessageStream({
    stream,
    message,
    onError: (error) => errors.push(plain(error)),
  })) {
    last = snapshot;
  }
  return { message: last, errors };
}

// A copy of a chunk stream: one branch for readUIMessageStream, the chunks of the other.
function tee(stream) {
  const [a, b] = stream.tee();
  return [a, drain(b)];
}

const textOf = (message) =>
  (message?.parts ?? []).filter((p) => p.type === "text").map((p) => p.text).join("");

function send(io, api, chatId, prompt) {
  const transport = new io.DefaultChatTransport({ api });
  return transport.sendMessages({
    chatId,
    messages: [userMessage(prompt)],
    trigger: "submit-message",
    messageId: undefined,
    abortSignal: undefined,
  });
}

// Read until `count` text deltas arrived, then have the connection cut; read on to the break.
async function readAndCut(io, stream, count) {
  const reader = stream.getReader();
  const chunks = [];
  let deltas = 0;
  let cutDone = false;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) return { chunks, error: null, cut: cutDone };
      chunks.push(value);
      if (value.type === "text-delta") deltas += 1;
      if (deltas === count && !cutDone) {
        await io.cut();
        cutDone = true;
      }
    }
  } catch (error) {
    return { chunks, error: plain(error), cut: cutDone };
  }
}

// The client of docs/guides/ai-sdk.md for a resume that continues instead of replaying, as a
// function of the `DefaultChatTransport` class (the page imports it from "ai").
export const continuingTransport = (DefaultChatTransport) =>
  class ContinuingTransport extends DefaultChatTransport {
    received = 0; // chunks of the current message received so far

    constructor(options) {
      super({
        ...options,
        resumeStreamIsReplay: false,
        prepareReconnectToStreamRequest: ({ api, id }) => ({
          api: `${api}/${encodeURIComponent(id)}/stream?received=${this.received}`,
        }),
      });
    }

    async sendMessages(options) {
      this.received = 0;
      return super.sendMessages(options);
    }

    processResponseStream(stream) {
      const count = new TransformStream({
        transform: (chunk, controller) => {
          this.received += 1;
          controller.enqueue(chunk);
        },
      });
      return super.processResponseStream(stream).pipeThrough(count);
    }
  };

export const scenarios = {
  // The message is cut off mid-stream, then resumed (replayed from its start) and read to
  // its end; a second reconnect after the end finds nothing.
  async resume(io, { api, resumeApi, chatId, prompt, cutAfter }) {
    const first = await readAndCut(io, await send(io, api, chatId, prompt), cutAfter);
    const transport = new io.DefaultChatTransport({ api: resumeApi });
    const resumed = await transport.reconnectToStream({ chatId });
    if (resumed == null) return { first, resumed: null };
    const [branch, raw] = tee(resumed);
    const { message, errors } = await assemble(io, branch);
    const again = await transport.reconnectToStream({ chatId });
    return {
      first,
      resumed: { text: textOf(message), id: message?.id, parts: message?.parts, errors },
      resumedChunks: (await raw).chunks,
      resumedError: (await raw).error,
      secondIsNull: again === null,
    };
  },

  // The docs' `ContinuingTransport` counts the chunks it received and, cut off, continues
  // from there (`resumeStreamIsReplay: false`): the assembled message has every chunk once.
  async continue(io, { api, resumeApi, chatId, prompt, cutAfter }) {
    const transport = new (continuingTransport(io.DefaultChatTransport))({ api });
    const first = await readAndCut(
      io,
      await transport.sendMessages({
        chatId,
        messages: [userMessage(prompt)],
        trigger: "submit-message",
        messageId: undefined,
        abortSignal: undefined,
      }),
      cutAfter,
    );
    const received = transport.received;
    transport.api = resumeApi; // the reconnect lands on the other worker
    const rest = await transport.reconnectToStream({ chatId });
    const tail = rest == null ? { chunks: [], error: null } : await drain(rest);
    const all = [...first.chunks, ...tail.chunks];
    const whole = new ReadableStream({
      start(controller) {
        for (const chunk of all) controller.enqueue(chunk);
        controller.close();
      },
    });
    const { message, errors } = await assemble(io, whole);
    return {
      first,
      tail,
      received,
      counted: transport.received,
      replayFlag: transport.resumeStreamIsReplay,
      text: textOf(message),
      id: message?.id,
      errors,
    };
  },

  // Several viewers reconnect to one running message at once.
  async viewers(io, { api, resumeApi, chatId, prompt, count }) {
    const stream = await send(io, api, chatId, prompt);
    const reader = stream.getReader();
    await reader.read(); // the message started
    const transport = new io.DefaultChatTransport({ api: resumeApi });
    const views = await Promise.all(
      Array.from({ length: count }, async () => {
        const resumed = await transport.reconnectToStream({ chatId });
        if (resumed == null) return null;
        const { message, errors } = await assemble(io, resumed);
        return { text: textOf(message), id: message?.id, errors };
      }),
    );
    const own = await drain(new ReadableStream({ pull: async (c) => {
      const { done, value } = await reader.read();
      if (done) c.close(); else c.enqueue(value);
    } }));
    return { views, ownError: own.error };
  },

  // The model raises: the message ends with an `error` chunk the client reports.
  async error(io, { api, chatId, prompt }) {
    const [branch, raw] = tee(await send(io, api, chatId, prompt));
    const { message, errors } = await assemble(io, branch);
    return { chunks: (await raw).chunks, text: textOf(message), errors };
  },

  // Stopped from the server while it streams: the message ends cleanly with `abort`.
  async stop(io, { api, chatId, prompt, stopAfter }) {
    const stream = await send(io, api, chatId, prompt);
    const reader = stream.getReader();
    const chunks = [];
    let stopped = null;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      chunks.push(value);
      if (value.type === "text-delta" && chunks.filter((c) => c.type === "text-delta").length === stopAfter) {
        stopped = (await fetch(`${api}/${encodeURIComponent(chatId)}/stop`, { method: "POST" })).status;
      }
    }
    const whole = new ReadableStream({
      start(controller) {
        for (const chunk of chunks) controller.enqueue(chunk);
        controller.close();
      },
    });
    const { message, errors } = await assemble(io, whole);
    const transport = new io.DefaultChatTransport({ api });
    const again = await transport.reconnectToStream({ chatId });
    return { chunks, stopped, text: textOf(message), parts: message?.parts, errors, againIsNull: again === null };
  },
};
