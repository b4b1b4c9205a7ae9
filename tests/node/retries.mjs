// The app of issue 16's cases (tests/test_node_sdk_retries.py): the SDK with its DEFAULT retries (maxRetries 2,
// honouring retry-after-ms / Retry-After), making the calls (chat, image, embeddings) one after the other.
// Not a lib.mjs script: it starts first and prints {"ready": true}, then reads one JSON line on stdin (baseURL,
// model, calls), so that Node's own start-up is not part of what the case times (a 0.3 s outage would pass
// during it). Prints one JSON line: per call, its outcome, the error's class, status and message, and the
// elapsed time in seconds.
import { once } from 'node:events';
import { createInterface } from 'node:readline';
import OpenAI from 'openai';

const IMAGE = { type: 'image_url', image_url: { url: 'data:image/png;base64,iVBORw0KGgo=' } };

process.stdout.write(JSON.stringify({ ready: true }) + '\n');
const lines = createInterface({ input: process.stdin });
const [line] = await once(lines, 'line');
lines.close();
const spec = JSON.parse(line);

const client = new OpenAI({ baseURL: spec.baseURL, apiKey: 'sk-app' }); // maxRetries, timeout: the defaults
const CALLS = {
  chat: () => client.chat.completions.create({ model: spec.model, messages: [{ role: 'user', content: 'hi' }] }),
  image: () =>
    client.chat.completions.create({
      model: spec.model,
      messages: [{ role: 'user', content: [{ type: 'text', text: 'what is this?' }, IMAGE] }],
    }),
  embeddings: () => client.embeddings.create({ model: spec.model, input: 'hi' }),
};

const outcomes = [];
for (const call of spec.calls) {
  const started = performance.now();
  const outcome = { error: '-', status: 200, message: '' };
  try {
    await CALLS[call]();
  } catch (err) {
    if (!(err instanceof OpenAI.APIError)) throw err; // not an answer the app could get: the test fails
    // The message as the app reads it: the error object's, or the SDK's own when there was no HTTP answer.
    const message = typeof err.error?.message === 'string' ? err.error.message : err.message;
    Object.assign(outcome, { error: err.constructor.name, status: err.status ?? null, message });
  }
  outcome.elapsed = (performance.now() - started) / 1000;
  outcomes.push(outcome);
}
process.stdout.write(JSON.stringify({ outcomes }) + '\n');
