// The openai npm package, unchanged, talking to keypool over its UNIX socket.
//
// undici's Agent connects to the socket; the host name in baseURL is only what the Host header
// says. fetch comes from the same undici, so the dispatcher and fetch agree on its version. The
// apiKey is required by the SDK but ignored: keypool puts a key of the pool in its place.
//
//   npm install openai undici
//   KEYPOOL_SOCKET=/run/keypool/keypool.sock node examples/node/openai_node.mjs
import OpenAI from 'openai';
import { Agent, fetch } from 'undici';

const socketPath = process.env.KEYPOOL_SOCKET ?? '/run/keypool/keypool.sock';
const model = process.env.KEYPOOL_MODEL ?? 'z-ai/glm-4.5';

const client = new OpenAI({
  baseURL: 'http://keypool/v1',
  apiKey: 'unused', // keypool adds the pool's key
  fetch,
  fetchOptions: { dispatcher: new Agent({ connect: { socketPath } }) },
});

const reply = await client.chat.completions.create({
  model,
  messages: [{ role: 'user', content: 'Say hello.' }],
});
console.log(reply.choices[0].message.content);

const stream = await client.chat.completions.create({
  model,
  messages: [{ role: 'user', content: 'Say hello, slowly.' }],
  stream: true,
});
let text = '';
for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? '';
console.log(text);
