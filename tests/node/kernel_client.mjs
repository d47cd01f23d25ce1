// An IDE's kernel traffic through jupyter-dev-server, done the way VS Code's Jupyter extension does it:
// @jupyterlab/services over Node's fetch and the `ws` WebSocket, the token in an Authorization header
// (and, as @jupyterlab/services appends it, in the socket's query).
//
//   node kernel_client.mjs BASE_URL TOKEN [TIMEOUT_SECONDS] [survive-cut]
//
// Starts a notebook session with a python3 kernel, runs print(6*7), outputs 5 MB (and prints 2 MB),
// interrupts a time.sleep(30), restarts the kernel and runs a cell again, then shuts the session
// down. Prints one JSON line with what it saw and exits 0; on any failure (or after TIMEOUT_SECONDS)
// it prints the reason on stderr and exits 1. The Python test judges the JSON once more.
//
// With `survive-cut`: runs a cell that prints 40 lines over 10 s and prints the line `cut now` once
// the third has arrived (the test then breaks the proxy's hub link), then a second cell; the JSON
// line says what both printed and what became of the sockets.

import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const { KernelManager, ServerConnection, SessionManager } = require('@jupyterlab/services');
const WebSocket = require('ws');

const [baseUrl, token, timeoutArg] = process.argv.slice(2);
if (!baseUrl || token === undefined) {
  console.error('usage: node kernel_client.mjs BASE_URL TOKEN [TIMEOUT_SECONDS]');
  process.exit(2);
}
// stdout is for the result line only: the library's own chatter goes to stderr.
for (const name of ['log', 'info', 'debug', 'warn']) console[name] = (...args) => console.error(...args);

const BIG = 5 * 1024 * 1024;
const PRINTED = 2 * 1024 * 1024;
const ALPHABET = 'abcdefghijklmnopqrstuvwxyz';

function fail(message) {
  console.error(`kernel_client: ${message}`);
  process.exit(1);
}

function check(ok, what, seen) {
  if (!ok) fail(`${what}; saw ${JSON.stringify(seen).slice(0, 500)}`);
}

const overall = setTimeout(() => fail(`not done after ${timeoutArg || 120} s`), 1000 * Number(timeoutArg || 120));

// Every socket the library opens, with what the server agreed to.
const sockets = [];
class IdeWebSocket extends WebSocket {
  constructor(url, protocols, options) {
    super(url, protocols, { ...options, headers: { Authorization: `token ${token}` } });
    const shown = String(url).replace(/token=[^&]*/, 'token=[redacted]');
    const record = { url: shown, offered: protocols, protocol: null, closeCode: null };
    sockets.push(record);
    this.on('open', () => { record.protocol = this.protocol; });
    this.on('close', (code) => { record.closeCode = code; });
  }
}

const serverSettings = ServerConnection.makeSettings({
  baseUrl,
  wsUrl: baseUrl.replace(/^http/, 'ws'),
  token,
  appendToken: true,
  WebSocket: IdeWebSocket,
  fetch,
  Request,
  Headers,
});

// Run one cell; resolves with its stdout, its text/plain displays, the reply's content, the names
// of the errors it raised and the time it took. onStdout sees each piece of stdout as it comes.
async function run(kernel, code, onStdout) {
  const started = Date.now();
  const future = kernel.requestExecute({ code, store_history: false });
  const out = [];
  const displays = [];
  const errors = [];
  future.onIOPub = (msg) => {
    const type = msg.header.msg_type;
    if (type === 'stream' && msg.content.name === 'stdout') {
      out.push(msg.content.text);
      seenStdout += msg.content.text;
      if (onStdout) onStdout(msg.content.text);
    } else if (type === 'display_data') displays.push(msg.content.data['text/plain']);
    else if (type === 'error') errors.push(msg.content.ename);
  };
  const reply = await future.done;
  const seconds = (Date.now() - started) / 1000;
  return { stdout: out.join(''), displays, reply: reply.content, errors, seconds };
}

async function surviveCut(kernel, result) {
  let told = false;
  const cell = await run(
    kernel,
    'import time\nfor i in range(40):\n    print(i, flush=True)\n    time.sleep(0.25)',
    () => {
      if (!told && cell_lines() >= 3) {
        told = true;
        process.stdout.write('cut now\n');
      }
    },
  );
  result.cell = { status: cell.reply.status, stdout: cell.stdout, seconds: cell.seconds };
  const next = await run(kernel, 'print(6*7)');
  result.next = { status: next.reply.status, stdout: next.stdout };
}

let seenStdout = '';
function cell_lines() {
  return seenStdout.split('\n').length - 1;
}

async function main() {
  const kernelManager = new KernelManager({ serverSettings });
  const sessionManager = new SessionManager({ kernelManager, serverSettings });
  await sessionManager.ready;
  const specs = await ServerConnection.makeRequest(`${baseUrl}/api/kernelspecs`, {}, serverSettings);
  if (specs.status !== 200) fail(`GET /api/kernelspecs answered ${specs.status}`);

  const session = await sessionManager.startNew({
    path: `jds-kernel-client-${Date.now()}.ipynb`,
    type: 'notebook',
    name: 'jds-kernel-client.ipynb',
    kernel: { name: 'python3' },
  });
  const kernel = session.kernel;
  if (!kernel) fail('the session has no kernel');
  const statuses = [];  // the library's view of its connection: "connected", "connecting", ...
  kernel.connectionStatusChanged.connect((_, status) => statuses.push(status));
  const info = await kernel.info;
  const result = { kernel_id: kernel.id, session_id: session.id, implementation: info.implementation };
  if (process.argv[5] === 'survive-cut') {
    await surviveCut(kernel, result);
    result.sockets = JSON.parse(JSON.stringify(sockets));  // as they were before the shutdown
    result.connection_statuses = statuses;
    await session.shutdown();
    sessionManager.dispose();
    kernelManager.dispose();
    clearTimeout(overall);
    process.stdout.write(JSON.stringify(result) + '\n', () => process.exit(0));
    return;
  }

  const answer = await run(kernel, 'print(6*7)');
  check(answer.stdout === '42\n', 'print(6*7) must print 42', answer);
  result.answer = answer.stdout;

  // 5 MB of output in one message, as display data, and 2 MB printed. Not 5 MB printed: jupyter_server
  // itself drops stream output above its iopub_data_rate_limit (1 MB/s over a 3 s window) and sends
  // "IOPub data rate exceeded" instead, with or without a proxy.
  const text = (n) => `(${JSON.stringify(ALPHABET)} * ${Math.ceil(n / 26)})[:${n}]`;
  const expected = (n) => ALPHABET.repeat(Math.ceil(n / 26)).slice(0, n);
  const big = await run(
    kernel,
    `from IPython.display import display; display({"text/plain": ${text(BIG)}}, raw=True); print(${text(PRINTED)})`,
  );
  result.big = {
    status: big.reply.status,
    displays: big.displays.length,
    display_length: big.displays.length ? big.displays[0].length : 0,
    display_intact: big.displays.length === 1 && big.displays[0] === expected(BIG),
    stdout_length: big.stdout.length,
    stdout_intact: big.stdout === expected(PRINTED) + '\n',
    seconds: big.seconds,
  };
  check(big.reply.status === 'ok' && result.big.display_intact, '5 MB must arrive whole', result.big);
  check(result.big.stdout_intact, '2 MB of stdout must arrive whole', result.big);

  await run(kernel, 'jds_before_restart = 1');
  let interrupted = false;
  const sleeper = await run(kernel, 'import time; print("sleeping", flush=True); time.sleep(30)', () => {
    // The cell is in time.sleep (or about to be): interrupt it as the IDE's stop button does.
    if (!interrupted) {
      interrupted = true;
      kernel.interrupt().catch((e) => fail(`interrupt: ${e}`));
    }
  });
  result.interrupt = {
    status: sleeper.reply.status,
    ename: sleeper.reply.ename ?? null,
    errors: sleeper.errors,
    stdout: sleeper.stdout,
    seconds: sleeper.seconds,
  };
  check(sleeper.reply.ename === 'KeyboardInterrupt', 'the interrupt must raise KeyboardInterrupt', result.interrupt);
  check(sleeper.seconds < 15, 'the interrupt must end time.sleep(30) early', result.interrupt);

  await kernel.restart();
  const after = await run(kernel, 'print(6*7, "jds_before_restart" in globals())');
  result.after_restart = after.stdout;
  check(after.stdout === '42 False\n', 'the restarted kernel must run cells, without old variables', after);

  const kernelId = kernel.id;
  await session.shutdown();
  const left = await ServerConnection.makeRequest(`${baseUrl}/api/kernels`, {}, serverSettings);
  result.kernel_listed_after_shutdown = (await left.json()).some((k) => k.id === kernelId);
  result.sockets = sockets;

  sessionManager.dispose();
  kernelManager.dispose();
  clearTimeout(overall);
  process.stdout.write(JSON.stringify(result) + '\n', () => process.exit(0));
}

main().catch((error) => fail(error && error.stack ? error.stack : String(error)));
