#!/usr/bin/env node
// Drives centripy's admin web UI (centripy/admin_ui) in a headless Chromium (the system's,
// through playwright-core; no browser is ever downloaded) against a running centripy.
//
// Usage: node admin_ui.mjs < SCENARIO.json, where the scenario is
//   {"baseUrl": "http://127.0.0.1:PORT/", "password": "...", "apiUrl": "http://127.0.0.1:PORT/api",
//    "apiKey": "...", "wsUrl": "ws://127.0.0.1:PORT/connection/websocket",
//    "watcherToken": "<JWT whose `channels` claim holds `channel`>", "channel": "news:room",
//    "pagingChannel": "news:paging", "pagingCount": 25, "executablePath": "/usr/bin/chromium",
//    "userDataDir": "/tmp/...", "screenshot": "/tmp/.../admin_ui.png",
//    "timeoutMs": 90000, "stepTimeoutMs": 15000}
//
// Steps: a wrong password shows an error; the right one shows the node (from `info`); a
// WebSocket client (the watcher, subscribed server-side to `channel`) connects and the node's
// client count goes to 1 without a reload; the channels page lists `channel` with 1
// subscriber; a second page (logged in through the stored token) opens the channel
// inspector on `channel`, sees the watcher in presence and starts the live tail; the first
// page runs `publish` in the API console; the publication appears in the second page's tail
// (and reaches the watcher); the inspector then pages `pagingChannel`'s history (filled
// through /api) newest first, 10 a page, older and newer.
//
// Output: one JSON object per line on stdout ({"event": ...}); then {"event":"done"} (exit
// 0) or {"event":"fail","error","pageErrors"} (exit 1). Console errors in the pages (a
// Content-Security-Policy violation too) fail the scenario.

import { readFileSync } from 'node:fs';
import { chromium } from 'playwright-core';
import WebSocket from 'ws';

const CHROMIUM_FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  // two pages side by side, as two windows would be: no timer throttling of the one behind
  '--disable-background-timer-throttling', '--disable-renderer-backgrounding',
  '--disable-backgrounding-occluded-windows',
];
const PAGE_SIZE = 10;

const scenario = JSON.parse(readFileSync(0, 'utf8'));
const stepTimeout = scenario.stepTimeoutMs ?? 15000;
const pageErrors = [];
const pages = new Map();
let refusedLogins = 0;

function emit(event) {
  process.stdout.write(JSON.stringify(event) + '\n');
}

async function apiCall(method, body) {
  const response = await fetch(`${scenario.apiUrl}/${method}`, {
    method: 'POST',
    headers: { 'X-API-Key': scenario.apiKey, 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  const result = await response.json();
  if (response.status !== 200 || result.error) {
    throw new Error(`API ${method} -> ${response.status} ${JSON.stringify(result)}`);
  }
  return result.result;
}

// A raw Centrifugo-protocol WebSocket client: connect with a token whose `channels` claim
// subscribes it server-side; records the publications pushed to it.
function watcher() {
  const received = [];
  const ws = new WebSocket(scenario.wsUrl);
  const connected = new Promise((resolve, reject) => {
    ws.on('open', () => ws.send(JSON.stringify({ id: 1, connect: { token: scenario.watcherToken } })));
    ws.on('error', reject);
    ws.on('message', (frame) => {
      for (const line of frame.toString().split('\n')) {
        if (!line.trim()) continue;
        const message = JSON.parse(line);
        if (message.id === 1) {
          if (message.error) reject(new Error(`connect: ${JSON.stringify(message.error)}`));
          else resolve(message.connect);
        } else if (message.push && message.push.pub) {
          received.push(message.push.pub);
        } else if (!message.push && Object.keys(message).length === 0) {
          ws.send('{}'); // pong
        }
      }
    });
  });
  return { ws, connected, received };
}

async function newPage(context, name) {
  const page = await context.newPage();
  pages.set(name, page);
  page.setDefaultTimeout(stepTimeout);
  page.on('pageerror', (error) => pageErrors.push(`${name}: ${error.message}`));
  page.on('console', (message) => {
    if (message.type() !== 'error') return;
    // The wrong password of step 1 is answered 400: Chromium logs that failed load.
    const refusedLogin = message.text().includes('status of 400')
      && message.location().url.endsWith('/admin/auth');
    if (refusedLogin) refusedLogins += 1;
    else pageErrors.push(`${name} console: ${message.text()} (${message.location().url})`);
  });
  return page;
}

async function text(page, selector) {
  return (await page.locator(selector).first().textContent()).trim();
}

async function historyOffsets(page) {
  return page.$$eval('#history tbody tr.pub', (rows) => rows.map((row) => Number(row.dataset.offset)));
}

// Wait until the history table shows exactly `offsets` (newest first).
async function waitHistory(page, offsets) {
  await page.waitForFunction((want) => {
    const got = [...document.querySelectorAll('#history tbody tr.pub')].map((r) => Number(r.dataset.offset));
    return JSON.stringify(got) === JSON.stringify(want);
  }, offsets, { timeout: stepTimeout });
  return historyOffsets(page);
}

function range(from, to) {
  const out = [];
  for (let i = from; i >= to; i -= 1) out.push(i);
  return out;
}

async function main() {
  const context = await chromium.launchPersistentContext(scenario.userDataDir, {
    executablePath: scenario.executablePath,
    headless: true,
    args: CHROMIUM_FLAGS,
    timeout: stepTimeout,
    viewport: { width: 1280, height: 900 },
  });
  let client = null;
  try {
    // 1. log in: a wrong password first
    const first = await newPage(context, 'first');
    await first.goto(scenario.baseUrl);
    await first.waitForSelector('#login-form', { state: 'visible' });
    await first.fill('#password', 'not-the-password');
    await first.click('#login-button');
    await first.waitForFunction(() => document.getElementById('login-error').textContent.length > 0);
    emit({ event: 'login-refused', message: await text(first, '#login-error') });
    await first.fill('#password', scenario.password);
    await first.click('#login-button');
    await first.waitForSelector('#nodes tbody tr.node');
    const node = {
      name: await text(first, '#nodes tbody tr.node td.name'),
      uid: await first.getAttribute('#nodes tbody tr.node', 'data-uid'),
      clients: Number(await text(first, '#nodes tbody tr.node td.clients')),
    };
    emit({ event: 'node', ...node });

    // 2. a client connects: the nodes page refreshes on its own
    client = watcher();
    const reply = await client.connected;
    emit({ event: 'watcher-connected', subs: Object.keys(reply.subs || {}) });
    await first.waitForFunction(
      () => document.querySelector('#nodes tbody tr.node td.clients').textContent === '1',
    );
    emit({ event: 'node-clients', clients: 1 });
    if (scenario.nodesScreenshot) {
      await first.screenshot({ path: scenario.nodesScreenshot, fullPage: true });
      emit({ event: 'screenshot', path: scenario.nodesScreenshot });
    }

    // 3. the channels page
    await first.click('#nav a[data-view="channels"]');
    const row = first.locator(`#channels tbody tr.channel[data-channel="${scenario.channel}"]`);
    await row.waitFor({ state: 'visible' });
    emit({ event: 'channel-listed', channel: scenario.channel, subscribers: Number(await row.locator('td.num').textContent()) });

    // 4. a second page: the inspector on the channel, tail on
    const inspector = await newPage(context, 'inspector');
    await inspector.goto(`${scenario.baseUrl}#/inspector/${encodeURIComponent(scenario.channel)}`);
    await inspector.waitForSelector('#inspector', { state: 'visible' });
    await inspector.waitForSelector('#presence li.client');
    const presence = await inspector.$$eval('#presence li.client', (items) => items.map((li) => li.textContent));
    emit({ event: 'presence', clients: presence, offset: Number(await text(inspector, '#stream-offset')) });
    // when the first publication enters the tail, by the page's own clock (a hidden page's
    // animation frames, which Playwright's waits may ride on, are throttled)
    await inspector.evaluate(() => {
      new MutationObserver((changes, observer) => {
        if (document.querySelector('#tail li.pub')) {
          window.tailShownAt = Date.now();
          observer.disconnect();
        }
      }).observe(document.getElementById('tail'), { childList: true });
    });
    await inspector.click('#tail-toggle');
    await inspector.waitForFunction(() => document.getElementById('tail-state').textContent === 'live');

    // 5. publish from the API console of the first page
    await first.click('#nav a[data-view="console"]');
    await first.selectOption('#console-method', 'publish');
    const published = { text: 'hello from the console', at: Date.now() };
    await first.fill('#console-params', JSON.stringify({ channel: scenario.channel, data: published }, null, 2));
    await first.evaluate(() => {
      document.getElementById('console-form').addEventListener('submit', () => {
        window.submittedAt = Date.now();
      }, { capture: true, once: true });
    });
    await first.click('#console-run');
    await first.waitForSelector('#console-status[data-status="ok"]');
    const consoleResult = JSON.parse(await first.textContent('#console-result'));
    emit({ event: 'console-result', status: await text(first, '#console-status'), result: consoleResult });

    // 6. it arrives in the other page's live tail (and at the watcher)
    const item = inspector.locator('#tail li.pub', { hasText: 'hello from the console' });
    await item.waitFor({ state: 'visible' });
    // Run pressed -> publish -> the next 500 ms poll -> shown in the other page
    const submittedAt = await first.evaluate(() => window.submittedAt);
    const tailLatencyMs = (await inspector.evaluate(() => window.tailShownAt)) - submittedAt;
    await inspector.waitForFunction(
      (offset) => document.getElementById('stream-offset').textContent === String(offset),
      consoleResult.result.offset,
    );
    const tail = await inspector.$$eval('#tail li.pub', (items) => items.map((li) => ({
      offset: Number(li.dataset.offset), text: li.querySelector('.data').textContent,
    })));
    emit({ event: 'tail', items: tail, latencyMs: tailLatencyMs });
    const deadline = Date.now() + stepTimeout;
    while (!client.received.some((pub) => pub.data && pub.data.at === published.at)) {
      if (Date.now() > deadline) throw new Error(`the watcher never got the publication: ${JSON.stringify(client.received)}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    emit({ event: 'watcher-received', offsets: client.received.map((pub) => pub.offset) });
    // the history page showed the newest publications: it follows the stream
    await inspector.waitForSelector('#history tbody tr.pub[data-offset="1"]');
    await inspector.screenshot({ path: scenario.screenshot, fullPage: true });
    emit({ event: 'screenshot', path: scenario.screenshot });

    // 7. page through another channel's history, newest first
    for (let n = 1; n <= scenario.pagingCount; n += 1) {
      await apiCall('publish', { channel: scenario.pagingChannel, data: { n } });
    }
    await inspector.selectOption('#history-limit', String(PAGE_SIZE));
    await inspector.fill('#inspector-channel', scenario.pagingChannel);
    await inspector.click('#inspector-open');
    const top = scenario.pagingCount;
    const seen = [];
    seen.push(await waitHistory(inspector, range(top, top - PAGE_SIZE + 1)));
    emit({ event: 'history-buttons', newer: await inspector.isDisabled('#history-newer'), older: await inspector.isDisabled('#history-older') });
    await inspector.click('#history-older');
    seen.push(await waitHistory(inspector, range(top - PAGE_SIZE, top - 2 * PAGE_SIZE + 1)));
    await inspector.click('#history-older');
    seen.push(await waitHistory(inspector, range(top - 2 * PAGE_SIZE, 1)));
    const lastOlderDisabled = await inspector.isDisabled('#history-older');
    await inspector.click('#history-newer');
    seen.push(await waitHistory(inspector, range(top - PAGE_SIZE, top - 2 * PAGE_SIZE + 1)));
    await inspector.click('#history-newest');
    seen.push(await waitHistory(inspector, range(top, top - PAGE_SIZE + 1)));
    const data = await inspector.$$eval('#history tbody tr.pub td.data', (cells) => cells.map((c) => c.textContent));
    emit({
      event: 'history-pages', pages: seen, lastOlderDisabled, firstPageData: data,
      range: await text(inspector, '#history-range'),
    });
    if (scenario.historyScreenshot) {
      await inspector.screenshot({ path: scenario.historyScreenshot, fullPage: true });
      emit({ event: 'screenshot', path: scenario.historyScreenshot });
    }
  } catch (error) {
    for (const [name, page] of pages) {
      try {
        emit({ event: 'page', page: name, url: page.url(), body: (await page.textContent('body')).replace(/\s+/g, ' ').slice(0, 3000) });
      } catch (dumpError) {
        emit({ event: 'page', page: name, error: String(dumpError) });
      }
    }
    throw error;
  } finally {
    if (client) client.ws.close();
    await context.close();
  }
  if (pageErrors.length > 0) throw new Error(`errors in the page: ${pageErrors.join('; ')}`);
  if (refusedLogins !== 1) throw new Error(`${refusedLogins} refused logins logged, expected 1`);
}

const overall = setTimeout(() => {
  emit({ event: 'fail', error: `scenario timeout after ${scenario.timeoutMs} ms`, pageErrors });
  process.exit(2);
}, scenario.timeoutMs ?? 90000);

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
