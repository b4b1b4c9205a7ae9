// What every client script shares. A script is run as `node <script>.mjs '<spec as JSON>'` by
// tests/test_node_sdk.py; the spec names the base URL and what to ask. The script prints one JSON line:
// what it got, `received` (what arrived before a failure, for streams) and `error` (what the SDK threw).
import OpenAI from 'openai';

export const spec = JSON.parse(process.argv[2]);

export const client = new OpenAI({
  baseURL: spec.baseURL,
  apiKey: spec.apiKey ?? 'unused',
  maxRetries: spec.maxRetries ?? 0,
  timeout: 10_000,
});

export function headersOf(headers) {
  return Object.fromEntries(headers.entries());
}

function describe(err) {
  if (!(err instanceof OpenAI.OpenAIError)) {
    return { class: err?.constructor?.name ?? typeof err, message: String(err?.message ?? err), openai: false };
  }
  return {
    class: err.constructor.name,
    openai: true,
    apiError: err instanceof OpenAI.APIError,
    status: err.status ?? null,
    message: err.message,
    code: err.code ?? null,
    type: err.type ?? null,
    param: err.param ?? null,
    error: err.error ?? null,
    requestID: err.requestID ?? null,
    headers: err.headers ? headersOf(err.headers) : null,
  };
}

export async function run(main) {
  const out = { received: [] };
  const started = performance.now();
  try {
    Object.assign(out, await main(out));
  } catch (err) {
    out.error = describe(err);
  }
  out.elapsed_ms = Math.round(performance.now() - started);
  process.stdout.write(JSON.stringify(out) + '\n');
}
