// The official openai npm client against a running `tpfleet serve` (BASE_URL, e.g. http://127.0.0.1:8000)
// of the testdata/serve/moe-top1-chat fixture: completions and chat, whole and streamed; stop strings;
// logprobs (with echo: the prompt's too); n = 3; seed reproducibility; tools and tool calls rendered (the parser of the model's calls is
// tested in Go on fixed outputs: the fixture's random model does not call tools); with IMAGE_BASE_URL, an
// image chat and refused images. Run by cmd/tpfleet's TestOpenAINodeClient; exits non-zero on
// the first failed check, naming it.
import assert from 'node:assert/strict';
import OpenAI from 'openai';

const base = process.env.BASE_URL;
if (!base) {
  console.error('BASE_URL is not set');
  process.exit(2);
}
const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: process.env.API_KEY ?? 'none', maxRetries: 0 });
const greedy = { temperature: 0, max_tokens: 12, ignore_eos: true };
const messages = [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hello!' }];

async function collect(stream) {
  const texts = {};
  const finish = {};
  for await (const chunk of stream) {
    for (const c of chunk.choices) {
      const piece = c.text ?? c.delta?.content ?? '';
      texts[c.index] = (texts[c.index] ?? '') + piece;
      if (c.finish_reason) finish[c.index] = c.finish_reason;
    }
  }
  return { texts, finish };
}

const checks = [];
function check(name, fn) {
  checks.push([name, fn]);
}

let model;
check('models.list', async () => {
  const models = await client.models.list();
  assert.equal(models.data.length, 1);
  model = models.data[0].id;
  assert.equal(model, 'moe-top1-chat');
});

let completionText;
check('completions, whole and streamed', async () => {
  const r = await client.completions.create({ model, prompt: 'Once upon a time', ...greedy });
  assert.equal(r.object, 'text_completion');
  assert.equal(r.choices.length, 1);
  assert.equal(r.choices[0].finish_reason, 'length');
  assert.equal(r.usage.completion_tokens, 12);
  completionText = r.choices[0].text;
  assert.ok(completionText.length > 0, 'empty completion');
  const s = await collect(await client.completions.create({ model, prompt: 'Once upon a time', ...greedy, stream: true }));
  assert.equal(s.texts[0], completionText);
  assert.equal(s.finish[0], 'length');
});

let chatText;
check('chat, whole and streamed', async () => {
  const r = await client.chat.completions.create({ model, messages, ...greedy });
  assert.equal(r.object, 'chat.completion');
  assert.equal(r.choices[0].message.role, 'assistant');
  chatText = r.choices[0].message.content;
  assert.equal(typeof chatText, 'string');
  const s = await collect(await client.chat.completions.create({ model, messages, ...greedy, stream: true }));
  assert.equal(s.texts[0], chatText);
  assert.equal(s.finish[0], 'length');
});

check('stop strings, whole and streamed', async () => {
  // A stop string taken from the greedy text: the text ends before its first occurrence.
  const chars = [...completionText];
  assert.ok(chars.length >= 4, `greedy text too short: ${JSON.stringify(completionText)}`);
  const stop = chars.slice(2, 4).join('');
  const want = completionText.slice(0, completionText.indexOf(stop));
  const r = await client.completions.create({ model, prompt: 'Once upon a time', ...greedy, stop: [stop, '\u2603\u2603'] });
  assert.equal(r.choices[0].text, want);
  assert.equal(r.choices[0].finish_reason, 'stop');
  const s = await collect(await client.completions.create({ model, prompt: 'Once upon a time', ...greedy, stop, stream: true }));
  assert.equal(s.texts[0], want);
  assert.equal(s.finish[0], 'stop');
});

check('logprobs (completions and chat)', async () => {
  const r = await client.completions.create({ model, prompt: 'Once upon a time', ...greedy, logprobs: 3 });
  const lp = r.choices[0].logprobs;
  assert.equal(lp.tokens.length, 12);
  assert.equal(lp.token_logprobs.length, 12);
  lp.top_logprobs.forEach((top, i) => {
    const values = Object.values(top);
    // The chosen token and the 3 most likely, fewer where two tokens have the same text (a dict).
    assert.ok(values.length >= 1 && values.length <= 4, `top_logprobs[${i}] has ${values.length} entries`);
    // Greedy: the chosen token is the most likely one.
    assert.equal(lp.token_logprobs[i], Math.max(...values));
    assert.ok(lp.token_logprobs[i] <= 0);
  });
  const c = await client.chat.completions.create({ model, messages, ...greedy, logprobs: true, top_logprobs: 2 });
  const content = c.choices[0].logprobs.content;
  assert.equal(content.length, 12);
  for (const t of content) {
    assert.equal(t.top_logprobs.length, 2);
    assert.equal(t.logprob, t.top_logprobs[0].logprob);
    assert.deepEqual(t.bytes, [...Buffer.from(t.token, 'utf8')]);
  }
  const s = client.chat.completions.create({ model, messages, ...greedy, logprobs: true, stream: true });
  let n = 0;
  for await (const chunk of await s) n += chunk.choices[0]?.logprobs?.content?.length ?? 0;
  assert.equal(n, 12);
});

check('echo with logprobs (the prompt\'s first)', async () => {
  const prompt = 'Once upon a time';
  const r = await client.completions.create({ model, prompt, ...greedy, logprobs: 2, echo: true });
  const c = r.choices[0];
  const lp = c.logprobs;
  assert.ok(c.text.startsWith(prompt));
  const n = r.usage.prompt_tokens + 12;
  assert.equal(lp.tokens.length, n);
  assert.equal(lp.token_logprobs.length, n);
  // The prompt's first token has none; the rest have theirs and their top ones.
  assert.equal(lp.token_logprobs[0], null);
  assert.equal(lp.top_logprobs[0], null);
  let offset = 0;
  lp.tokens.forEach((t, i) => {
    assert.equal(lp.text_offset[i], offset, `text_offset[${i}]`);
    offset += [...t].length;
    if (i === 0) return;
    assert.ok(lp.token_logprobs[i] <= 0);
    assert.equal(lp.top_logprobs[i][t], lp.token_logprobs[i]);
  });
  // Streamed: the first event carries the echoed prompt and its logprobs.
  const s = await client.completions.create({ model, prompt, ...greedy, logprobs: 2, echo: true, stream: true });
  const tokens = [];
  let text = '';
  for await (const chunk of s) {
    text += chunk.choices[0]?.text ?? '';
    tokens.push(...(chunk.choices[0]?.logprobs?.tokens ?? []));
  }
  assert.equal(text, c.text);
  assert.deepEqual(tokens, lp.tokens);
});

check('n = 3 and seed reproducibility', async () => {
  const req = { model, prompt: 'Once upon a time', max_tokens: 10, temperature: 1, n: 3, seed: 1234, ignore_eos: true };
  const a = await client.completions.create(req);
  assert.deepEqual(a.choices.map((c) => c.index), [0, 1, 2]);
  assert.equal(a.usage.completion_tokens, 30);
  const b = await client.completions.create(req);
  assert.deepEqual(b.choices.map((c) => c.text), a.choices.map((c) => c.text));
  const s = await collect(await client.completions.create({ ...req, stream: true }));
  assert.deepEqual([0, 1, 2].map((i) => s.texts[i]), a.choices.map((c) => c.text));
  const chat = await client.chat.completions.create({ model, messages, max_tokens: 10, temperature: 1, n: 3, seed: 99, ignore_eos: true });
  const again = await client.chat.completions.create({ model, messages, max_tokens: 10, temperature: 1, n: 3, seed: 99, ignore_eos: true });
  assert.equal(chat.choices.length, 3);
  assert.deepEqual(again.choices.map((c) => c.message.content), chat.choices.map((c) => c.message.content));
});

check('tools, a tool call and its result rendered by the chat template', async () => {
  const tools = [{
    type: 'function',
    function: { name: 'get_weather', description: 'Weather in a city', parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] } },
  }];
  const convo = [
    { role: 'user', content: 'Weather in Paris?' },
    { role: 'assistant', content: null, tool_calls: [{ id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city": "Paris"}' } }] },
    { role: 'tool', tool_call_id: 'call_1', content: '{"temp": 21}' },
  ];
  const r = await client.chat.completions.create({ model, messages: convo, tools, max_tokens: 4, temperature: 0 });
  assert.ok(['stop', 'length', 'tool_calls'].includes(r.choices[0].finish_reason));
  // The prompt it generated from: /tokenize and /detokenize of the same messages and tools.
  const post = async (path, body) => (await fetch(`${base}${path}`, { method: 'POST', body: JSON.stringify(body) })).json();
  const tok = await post('/tokenize', { model, messages: convo, tools });
  assert.equal(tok.count, r.usage.prompt_tokens);
  const { prompt } = await post('/detokenize', { model, tokens: tok.tokens });
  assert.ok(prompt.includes('{\n    "type": "function",\n    "function": {\n        "name": "get_weather",'), prompt);
  assert.ok(prompt.includes('<|python_start|><|python_end|>{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot|>'), prompt);
  assert.ok(prompt.includes('<|header_start|>ipython<|header_end|>\n\n"{\\"temp\\": 21}"<|eot|>'), prompt);
});

check('a refused field is a 400 the client raises', async () => {
  await assert.rejects(
    client.chat.completions.create({ model, messages, max_tokens: 4, response_format: { type: 'json_object' } }),
    (err) => err instanceof OpenAI.BadRequestError && /response_format/.test(err.message),
  );
  await assert.rejects(
    client.chat.completions.create({ model, messages, max_tokens: 4, tools: [{ type: 'function', function: { name: 'f' } }], tool_choice: 'required' }),
    (err) => err instanceof OpenAI.BadRequestError && /tool_choice/.test(err.message),
  );
});

// Images: an image_url data URL in a chat to a checkpoint with a vision tower (IMAGE_BASE_URL: a second
// `tpfleet serve`, of the image fixture), streamed; the ids and text must be what the local
// `tpfleet generate --image` decodes for the same chat (IMAGE_WANT_IDS, IMAGE_WANT_TEXT).
const imageBase = process.env.IMAGE_BASE_URL;
if (imageBase) {
  const { readFileSync } = await import('node:fs');
  const imageClient = new OpenAI({ baseURL: `${imageBase}/v1`, apiKey: process.env.API_KEY ?? 'none', maxRetries: 0 });
  const png = readFileSync(process.env.IMAGE_FILE).toString('base64');
  const imageMessages = (url) => [{
    role: 'user',
    content: [
      { type: 'image_url', image_url: { url, detail: 'auto' } },
      { type: 'text', text: process.env.IMAGE_QUESTION },
    ],
  }];
  const imageGreedy = { temperature: 0, max_tokens: JSON.parse(process.env.IMAGE_WANT_IDS).length, ignore_eos: true };

  check('image chat (image_url data URL), streamed', async () => {
    const [{ id: imageModel }] = (await imageClient.models.list()).data;
    const stream = await imageClient.chat.completions.create({
      model: imageModel, messages: imageMessages(`data:image/png;base64,${png}`), ...imageGreedy,
      stream: true, return_token_ids: true,
    });
    let text = '';
    const ids = [];
    let finish;
    for await (const chunk of stream) {
      for (const c of chunk.choices) {
        text += c.delta?.content ?? '';
        ids.push(...(c.token_ids ?? []));
        if (c.finish_reason) finish = c.finish_reason;
      }
    }
    assert.deepEqual(ids, JSON.parse(process.env.IMAGE_WANT_IDS));
    assert.equal(text, process.env.IMAGE_WANT_TEXT);
    assert.equal(finish, 'length');
  });

  check('bad images are 400s the client raises', async () => {
    const [{ id: imageModel }] = (await imageClient.models.list()).data;
    const junk = Buffer.from('not an image').toString('base64');
    await assert.rejects(
      imageClient.chat.completions.create({ model: imageModel, messages: imageMessages(`data:image/png;base64,${junk}`), max_tokens: 2 }),
      (err) => err instanceof OpenAI.BadRequestError && /invalid image/.test(err.message),
    );
    await assert.rejects(
      imageClient.chat.completions.create({ model: imageModel, messages: imageMessages('https://example.com/cat.png'), max_tokens: 2 }),
      (err) => err instanceof OpenAI.BadRequestError && /allowed-media-domains/.test(err.message),
    );
    // A checkpoint without a vision tower.
    await assert.rejects(
      client.chat.completions.create({ model, messages: imageMessages(`data:image/png;base64,${png}`), max_tokens: 2 }),
      (err) => err instanceof OpenAI.BadRequestError && /takes no images/.test(err.message),
    );
  });
}

let failed = 0;
for (const [name, fn] of checks) {
  try {
    await fn();
    console.log(`ok   ${name}`);
  } catch (err) {
    failed++;
    console.log(`FAIL ${name}: ${err.stack ?? err}`);
  }
}
process.exit(failed ? 1 : 0);
