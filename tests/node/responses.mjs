// The Responses API as a stream of typed events: `client.responses.stream()`, then its final response.
import { client, run, spec } from './lib.mjs';

await run(async (out) => {
  const stream = client.responses.stream({ model: spec.model, input: 'hi' });
  for await (const event of stream) {
    out.received.push(event.type === 'response.output_text.delta' ? { type: event.type, delta: event.delta } : { type: event.type });
  }
  const final = await stream.finalResponse();
  return { model: final.model, text: final.output_text, status: final.status, usage: final.usage ?? null };
});
