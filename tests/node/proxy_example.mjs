// The README's Node example, run against `metrion-cache serve` by tests/test_proxy.py.
//
//   SDK_DIR=.cache/node-sdk PROXY_URL=http://127.0.0.1:8787 RUN_ID=abc node tests/node/proxy_example.mjs
//
// Prints one JSON line per call: which SDK, which step, the x-metrion-cache and key headers, the text.
// The SDKs live in SDK_DIR (installed by the test), not next to this script, so they are loaded
// with a require() rooted there.
import { createRequire } from 'node:module';
import path from 'node:path';

const require = createRequire(path.resolve(process.env.SDK_DIR, 'package.json'));
const Anthropic = require('@anthropic-ai/sdk').default;
const OpenAI = require('openai').default;

const proxy = process.env.PROXY_URL;
const run = process.env.RUN_ID;
const extra = process.env.PROXY_TOKEN ? { 'x-metrion-proxy-token': process.env.PROXY_TOKEN } : {};

function report(sdk, step, response, text) {
  const line = {
    sdk,
    step,
    status: response.status,
    cache: response.headers.get('x-metrion-cache'),
    key: response.headers.get('x-metrion-cache-key'),
    age: response.headers.get('age'),
    text,
  };
  console.log(JSON.stringify(line));
}

async function anthropicExample() {
  // The documentation's example: opt every request of this client in.
  const client = new Anthropic({
    apiKey: 'sk-ant-node-secret',
    baseURL: `${proxy}/anthropic`,
    defaultHeaders: { 'x-metrion-cache': 'true', ...extra },
    maxRetries: 0,
  });
  const ask = (question) => ({
    model: 'claude-sonnet-4-5',
    max_tokens: 200,
    messages: [{ role: 'user', content: question }],
  });
  const text = (message) => message.content.map((block) => block.text).join('');

  const question = `What are your delivery times? (node anthropic ${run})`;
  for (const step of ['first', 'second']) {
    const { data, response } = await client.messages.create(ask(question)).withResponse();
    report('anthropic', step, response, text(data));
  }
  // Per request: call the provider again and replace the entry.
  {
    const { data, response } = await client.messages
      .create(ask(question), { headers: { 'x-metrion-cache': 'refresh' } })
      .withResponse();
    report('anthropic', 'refresh', response, text(data));
  }
  // Per request: keep this answer for an hour.
  {
    const { data, response } = await client.messages
      .create(ask(`Keep this an hour (node anthropic ${run})`), { headers: { 'Cache-Control': 'max-age=3600' } })
      .withResponse();
    report('anthropic', 'max-age', response, text(data));
  }
  // A streamed call, twice: the second is replayed from the cache as a stream.
  const streamed = `Can I change my delivery address? (node anthropic stream ${run})`;
  for (const step of ['stream-first', 'stream-second']) {
    const { data: stream, response } = await client.messages.create({ ...ask(streamed), stream: true }).withResponse();
    let got = '';
    for await (const event of stream) {
      if (event.type === 'content_block_delta' && event.delta.type === 'text_delta') got += event.delta.text;
    }
    report('anthropic', step, response, got);
  }
}

async function openaiExample() {
  const client = new OpenAI({
    apiKey: 'sk-openai-node-secret',
    baseURL: `${proxy}/openai/v1`,
    defaultHeaders: { 'x-metrion-cache': 'true', ...extra },
    maxRetries: 0,
  });
  const ask = (question) => ({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: question }] });

  const question = `What are your delivery times? (node openai ${run})`;
  for (const step of ['first', 'second']) {
    const { data, response } = await client.chat.completions.create(ask(question)).withResponse();
    report('openai', step, response, data.choices[0].message.content);
  }
  {
    const { data, response } = await client.chat.completions
      .create(ask(question), { headers: { 'x-metrion-cache': 'refresh' } })
      .withResponse();
    report('openai', 'refresh', response, data.choices[0].message.content);
  }
  {
    const { data, response } = await client.chat.completions
      .create(ask(`Keep this an hour (node openai ${run})`), { headers: { 'Cache-Control': 'max-age=3600' } })
      .withResponse();
    report('openai', 'max-age', response, data.choices[0].message.content);
  }
  const streamed = `Can I change my delivery address? (node openai stream ${run})`;
  for (const step of ['stream-first', 'stream-second']) {
    const { data: stream, response } = await client.chat.completions
      .create({ ...ask(streamed), stream: true })
      .withResponse();
    let got = '';
    for await (const chunk of stream) got += chunk.choices[0]?.delta?.content ?? '';
    report('openai', step, response, got);
  }
}

await anthropicExample();
await openaiExample();
