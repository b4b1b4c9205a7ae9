// Embeddings with the SDK's defaults: it asks for base64 and decodes the vectors itself.
import { client, headersOf, run, spec } from './lib.mjs';

await run(async () => {
  const { data, response } = await client.embeddings.create({ model: spec.model, input: spec.input }).withResponse();
  return { model: data.model, vectors: data.data.map((item) => item.embedding), headers: headersOf(response.headers) };
});
