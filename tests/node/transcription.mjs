// An audio transcription: a multipart upload of the file at `spec.path`, made with `toFile`.
import { readFile } from 'node:fs/promises';
import { toFile } from 'openai';
import { client, headersOf, run, spec } from './lib.mjs';

await run(async () => {
  const file = await toFile(await readFile(spec.path), 'speech.wav', { type: 'audio/wav' });
  const request = client.audio.transcriptions.create({ model: spec.model, file, language: 'en' });
  const { data, response } = await request.withResponse();
  return { text: data.text, headers: headersOf(response.headers) };
});
