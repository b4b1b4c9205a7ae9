// Chat completions, unstreamed or streamed (`spec.params` are extra request parameters), with the
// response headers through `.withResponse()`.
import { client, headersOf, run, spec } from './lib.mjs';

await run(async (out) => {
  const params = { model: spec.model, messages: [{ role: 'user', content: 'hi' }], ...spec.params };
  const { data, response } = await client.chat.completions.create(params).withResponse();
  out.headers = headersOf(response.headers);
  if (!params.stream) {
    const choice = data.choices[0];
    return { model: data.model, text: choice.message.content, usage: data.usage ?? null, requestID: data._request_id };
  }
  for await (const chunk of data) {
    out.received.push({
      model: chunk.model,
      content: chunk.choices[0]?.delta?.content ?? null,
      finish: chunk.choices[0]?.finish_reason ?? null,
      usage: chunk.usage ?? null,
    });
  }
  return { text: out.received.map((chunk) => chunk.content ?? '').join('') };
});
