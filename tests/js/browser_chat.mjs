#!/usr/bin/env node
// Drives examples/chat/index.html in a headless Chromium (the system's, through playwright-core;
// no browser is ever downloaded) against a running centripy and the example's static server.
//
// Usage: node browser_chat.mjs < SCENARIO.json, where the scenario is
//   {"pageUrl": "http://127.0.0.1:PAGE_PORT/", "apiUrl": "http://127.0.0.1:PORT/api",
//    "apiKey": "...", "executablePath": "/usr/bin/chromium", "userDataDir": "/tmp/...",
//    "screenshot": "/tmp/.../chat.png", "transports": ["websocket", "sse", "http_stream"],
//    "namespace": "chat", "timeoutMs": 45000, "stepTimeoutMs": 10000}
//
// For each transport, in a room of its own: Alice joins; the API publishes "before bob";
// Bob joins and sees it as history; Alice sends a message and both see it; the API publishes
// and both see it; both see two clients online and Alice sees Bob join; Bob leaves, Alice sees
// him leave, the API publishes, Bob joins again and sees that message as recovered. The first
// transport's Alice page is saved as a screenshot.
//
// Output: one JSON object per line on stdout: {"event":"connected","transport","page","via"},
// {"event":"messages","transport","page","messages":[{text,kind}]}, {"event":"online",...},
// {"event":"screenshot","path"}; then {"event":"done"} (exit 0) or {"event":"fail","error",
// "pageErrors"} (exit 1).

import { readFileSync } from 'node:fs';
import { chromium } from 'playwright-core';

const CHROMIUM_FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

const scenario = JSON.parse(readFileSync(0, 'utf8'));
const stepTimeout = scenario.stepTimeoutMs ?? 10000;
const pageErrors = [];
const openPages = new Map();  // "who/transport" -> page, for the diagnostics of a failure

function emit(event) {
  process.stdout.write(JSON.stringify(event) + '\n');
}

async function apiPublish(channel, data) {
  const response = await fetch(`${scenario.apiUrl}/publish`, {
    method: 'POST',
    headers: { 'X-API-Key': scenario.apiKey, 'Content-Type': 'application/json' },
    body: JSON.stringify({ channel, data }),
  });
  const body = await response.json();
  if (response.status !== 200 || body.error) {
    throw new Error(`API publish -> ${response.status} ${JSON.stringify(body)}`);
  }
}

async function openChat(context, who, transport, room) {
  const page = await context.newPage();
  openPages.set(`${who}/${transport}`, page);
  page.setDefaultTimeout(stepTimeout);
  page.on('pageerror', (error) => pageErrors.push(`${who}/${transport}: ${error.message}`));
  page.on('console', (message) => {
    if (message.type() === 'error') pageErrors.push(`${who}/${transport} console: ${message.text()}`);
  });
  await page.goto(scenario.pageUrl);
  await page.selectOption('#transport', transport);
  await page.fill('#name', who);
  await page.fill('#room', room);
  await join(page);
  const via = await page.getAttribute('#status', 'data-transport');
  emit({ event: 'connected', transport, page: who, via });
  return page;
}

async function join(page) {
  await page.click('#join');
  await page.waitForSelector('#status[data-client="connected"][data-sub="subscribed"]');
}

async function leave(page) {
  await page.click('#leave');
  await page.waitForSelector('#status[data-client="disconnected"]');
}

// Wait until the page's message list has `text`, with the given kind (live/history/recovered).
async function waitMessage(page, text, kind) {
  const item = page.locator(`#messages li.${kind}`, { hasText: text });
  await item.waitFor({ state: 'visible' });
}

async function waitOnlineCount(page, count) {
  await page.waitForFunction(
    (n) => document.querySelectorAll('#online li').length === n, count, { timeout: stepTimeout },
  );
}

async function waitEvent(page, text) {
  await page.locator('#events li', { hasText: text }).first().waitFor({ state: 'visible' });
}

async function report(page, who, transport) {
  const messages = await page.$$eval('#messages li', (items) => items.map((li) => ({
    text: li.childNodes[1].textContent.slice(2), kind: li.className,
  })));
  emit({ event: 'messages', transport, page: who, messages });
}

async function runTransport(context, transport, index) {
  const room = `room-${transport}`;
  const channel = `${scenario.namespace}:${room}`;
  const alice = await openChat(context, 'alice', transport, room);
  await apiPublish(channel, { text: `before bob ${transport}` });
  await waitMessage(alice, `before bob ${transport}`, 'live');

  const bob = await openChat(context, 'bob', transport, room);
  await waitMessage(bob, `before bob ${transport}`, 'history');
  await waitOnlineCount(alice, 2);
  await waitOnlineCount(bob, 2);
  await waitEvent(alice, 'joined');
  emit({ event: 'online', transport, page: 'alice', count: 2 });

  await alice.fill('#text', `hello from alice ${transport}`);
  await alice.click('#send');
  await waitMessage(bob, `hello from alice ${transport}`, 'live');
  await waitMessage(alice, `hello from alice ${transport}`, 'live');

  await apiPublish(channel, { text: `from the api ${transport}` });
  await waitMessage(alice, `from the api ${transport}`, 'live');
  await waitMessage(bob, `from the api ${transport}`, 'live');

  await leave(bob);
  await waitOnlineCount(alice, 1);
  await waitEvent(alice, 'left');
  await apiPublish(channel, { text: `while bob was away ${transport}` });
  await waitMessage(alice, `while bob was away ${transport}`, 'live');
  await join(bob);
  await waitMessage(bob, `while bob was away ${transport}`, 'recovered');
  await waitOnlineCount(bob, 2);

  await report(alice, 'alice', transport);
  await report(bob, 'bob', transport);
  if (index === 0 && scenario.screenshot) {
    await alice.screenshot({ path: scenario.screenshot, fullPage: true });
    emit({ event: 'screenshot', path: scenario.screenshot });
  }
  await alice.close();
  await bob.close();
  openPages.clear();
}

// What the open pages show, emitted when the scenario fails.
async function dumpPages() {
  for (const [name, page] of openPages) {
    try {
      const state = await page.evaluate(() => ({
        status: document.getElementById('status').textContent,
        messages: [...document.querySelectorAll('#messages li')].map((li) => `${li.className}: ${li.textContent}`),
        online: [...document.querySelectorAll('#online li')].map((li) => li.textContent),
        events: [...document.querySelectorAll('#events li')].map((li) => li.textContent),
      }));
      emit({ event: 'page', page: name, ...state });
    } catch (error) {
      emit({ event: 'page', page: name, error: String(error) });
    }
  }
}

async function main() {
  const context = await chromium.launchPersistentContext(scenario.userDataDir, {
    executablePath: scenario.executablePath,
    headless: true,
    args: CHROMIUM_FLAGS,
    timeout: stepTimeout,
  });
  try {
    for (const [index, transport] of scenario.transports.entries()) {
      await runTransport(context, transport, index);
    }
  } catch (error) {
    await dumpPages();
    throw error;
  } finally {
    await context.close();
  }
  if (pageErrors.length > 0) throw new Error(`errors in the page: ${pageErrors.join('; ')}`);
}

const overall = setTimeout(() => {
  emit({ event: 'fail', error: `scenario timeout after ${scenario.timeoutMs} ms`, pageErrors });
  process.exit(2);
}, scenario.timeoutMs ?? 45000);

main().then(
  () => {
    clearTimeout(overall);
    emit({ event: 'done' });
    process.exit(0);
  },
  (error) => {
    clearTimeout(overall);
    emit({ event: 'fail', error: String(error && error.stack ? error.stack : error), pageErrors });
    process.exit(1);
  },
);
