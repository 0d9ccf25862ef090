// centripy admin UI: no dependencies, no build step. Talks only to its own server:
// GET admin/settings, POST admin/auth (form field "password" -> {"token"}), and
// POST admin/api/<method> with "Authorization: token <t>" for every server API call.
// The channel inspector pages a channel's history newest first (history with reverse +
// since) and tails it by polling history forward from the last offset every 500 ms.
'use strict';

const TOKEN_KEY = 'centripy-admin-token';
const NODES_EVERY_MS = 2000;
const CHANNELS_EVERY_MS = 3000;
const PRESENCE_EVERY_MS = 2000;
const TAIL_EVERY_MS = 500;
const TAIL_BATCH = 100;
const TAIL_KEEP = 500;
const METHODS = {
  publish: { channel: 'chat:index', data: { text: 'hello' } },
  broadcast: { channels: ['chat:index'], data: { text: 'hello' } },
  subscribe: { user: '', channel: '' },
  unsubscribe: { user: '', channel: '' },
  disconnect: { user: '' },
  refresh: { user: '' },
  presence: { channel: '' },
  presence_stats: { channel: '' },
  history: { channel: '', limit: 10, reverse: true },
  history_remove: { channel: '' },
  channels: { pattern: '' },
  info: {},
  rpc: { method: '', params: {} },
  batch: { commands: [{ info: {} }] },
};

const $ = (id) => document.getElementById(id);
const state = { token: '', insecure: false, view: '', timers: [] };

class ApiError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
  }
}

// -- server calls --------------------------------------------------------------------------

function authHeaders() {
  return state.token && !state.insecure ? { Authorization: `token ${state.token}` } : {};
}

// One server API call; returns `result`, throws ApiError for an API error. A 401 means the
// token is gone or expired: back to the login form.
async function call(method, request) {
  const response = await fetch(`admin/api/${method}`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', ...authHeaders() },
    body: JSON.stringify(request ?? {}),
  });
  if (response.status === 401) {
    logout('Session expired: log in again.');
    throw new ApiError(401, 'unauthorized');
  }
  const text = await response.text();
  if (!response.ok) throw new ApiError(response.status, text.trim() || response.statusText);
  const body = JSON.parse(text);
  if (body.error) throw new ApiError(body.error.code, body.error.message);
  return body.result ?? body;
}

// -- helpers ------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === 'class') node.className = value;
    else if (key.startsWith('data-')) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function json(value) {
  return value === undefined ? '' : JSON.stringify(value);
}

function uptime(seconds) {
  if (!seconds) return '-';
  const d = Math.floor(seconds / 86400), h = Math.floor((seconds % 86400) / 3600);
  const m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  return (d ? `${d}d ` : '') + (d || h ? `${h}h ` : '') + (d || h || m ? `${m}m ` : '') + `${s}s`;
}

function stamp() {
  return `updated ${new Date().toLocaleTimeString()}`;
}

function every(ms, fn) {
  fn();
  state.timers.push(setInterval(fn, ms));
}

function stopTimers() {
  state.timers.forEach(clearInterval);
  state.timers = [];
}

function from(pub) {
  if (!pub.info) return '';
  return pub.info.user ? `${pub.info.user} (${pub.info.client})` : pub.info.client;
}

// -- login --------------------------------------------------------------------------------

async function start() {
  const settings = await (await fetch('admin/settings')).json();
  state.insecure = Boolean(settings.insecure);
  state.token = localStorage.getItem(TOKEN_KEY) || '';
  if (state.insecure || state.token) enter();
  else showLogin('');
}

function showLogin(message) {
  stopTimers();
  inspector.stop();
  $('app').hidden = true;
  $('nav').hidden = true;
  $('logout').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = message;
  $('password').focus();
}

async function login(event) {
  event.preventDefault();
  $('login-error').textContent = '';
  const response = await fetch('admin/auth', {
    method: 'POST',
    headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({ password: $('password').value }),
  });
  if (!response.ok) {
    $('login-error').textContent = response.status === 400 ? 'Wrong password.' : `Error ${response.status}`;
    return;
  }
  state.token = (await response.json()).token;
  localStorage.setItem(TOKEN_KEY, state.token);
  $('password').value = '';
  enter();
}

function logout(message = '') {
  localStorage.removeItem(TOKEN_KEY);
  state.token = '';
  if (state.insecure) return;
  showLogin(message);
}

function enter() {
  $('login').hidden = true;
  $('app').hidden = false;
  $('nav').hidden = false;
  $('logout').hidden = state.insecure;
  route();
}

// -- views --------------------------------------------------------------------------------

function route() {
  if ($('app').hidden) return;
  const [, view = 'nodes', ...rest] = location.hash.split('/');
  const name = ['nodes', 'channels', 'console', 'inspector'].includes(view) ? view : 'nodes';
  stopTimers();
  if (name !== 'inspector') inspector.stop();
  state.view = name;
  document.querySelectorAll('.view').forEach((section) => {
    section.hidden = section.id !== `view-${name}`;
  });
  document.querySelectorAll('#nav a').forEach((link) => {
    link.classList.toggle('active', link.dataset.view === name);
  });
  if (name === 'nodes') every(NODES_EVERY_MS, loadNodes);
  if (name === 'channels') every(CHANNELS_EVERY_MS, loadChannels);
  if (name === 'inspector') {
    const channel = decodeURIComponent(rest.join('/'));
    if (channel && channel !== inspector.channel) {
      $('inspector-channel').value = channel;
      inspector.open(channel);
    } else if (inspector.channel) {
      inspector.resume();
    }
  }
}

async function loadNodes() {
  try {
    const result = await call('info', {});
    const rows = (result.nodes || []).map((node) => el('tr', { class: 'node', 'data-uid': node.uid },
      el('td', { class: 'name' }, node.name), el('td', {}, el('code', {}, node.uid)),
      el('td', {}, node.version || ''), el('td', { class: 'num clients' }, node.num_clients || 0),
      el('td', { class: 'num' }, node.num_users || 0), el('td', { class: 'num' }, node.num_channels || 0),
      el('td', { class: 'num' }, node.num_subs || 0), el('td', {}, uptime(node.uptime))));
    $('nodes').tBodies[0].replaceChildren(...rows);
    const sum = (key) => (result.nodes || []).reduce((total, node) => total + (node[key] || 0), 0);
    $('totals').textContent = `${rows.length} node(s), ${sum('num_clients')} client(s), `
      + `${sum('num_channels')} channel(s)`;
    $('nodes-updated').textContent = stamp();
    $('nodes-error').textContent = '';
  } catch (error) {
    if (error.code !== 401) $('nodes-error').textContent = `info failed: ${error.message}`;
  }
}

async function loadChannels() {
  try {
    const result = await call('channels', { pattern: $('channels-pattern').value });
    const entries = Object.entries(result.channels || {}).sort(([a], [b]) => a.localeCompare(b));
    const rows = entries.map(([name, info]) => el('tr', { class: 'channel', 'data-channel': name },
      el('td', {}, name), el('td', { class: 'num' }, info.num_clients || 0),
      el('td', {}, el('a', { href: `#/inspector/${encodeURIComponent(name)}` }, 'Inspect'))));
    $('channels').tBodies[0].replaceChildren(...rows);
    $('channels-empty').hidden = rows.length > 0;
    $('channels-updated').textContent = stamp();
    $('channels-error').textContent = '';
  } catch (error) {
    if (error.code !== 401) $('channels-error').textContent = `channels failed: ${error.message}`;
  }
}

// -- API console --------------------------------------------------------------------------

function setupConsole() {
  const select = $('console-method');
  for (const name of Object.keys(METHODS)) select.append(el('option', { value: name }, name));
  select.addEventListener('change', () => {
    $('console-params').value = JSON.stringify(METHODS[select.value], null, 2);
  });
  select.value = 'info';
  $('console-params').value = '{}';
  $('console-form').addEventListener('submit', runConsole);
}

async function runConsole(event) {
  event.preventDefault();
  const out = $('console-result');
  const method = $('console-method').value;
  let request;
  try {
    request = JSON.parse($('console-params').value || '{}');
  } catch (error) {
    out.className = 'json failed';
    out.textContent = `The request is not JSON: ${error.message}`;
    $('console-status').textContent = 'not sent';
    return;
  }
  const started = performance.now();
  const response = await fetch(`admin/api/${method}`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', ...authHeaders() },
    body: JSON.stringify(request),
  });
  if (response.status === 401) {
    logout('Session expired: log in again.');
    return;
  }
  const text = await response.text();
  let body = null;
  try { body = JSON.parse(text); } catch { /* not JSON: shown as text */ }
  const failed = !response.ok || Boolean(body && body.error);
  out.className = failed ? 'json failed' : 'json';
  out.dataset.method = method;
  out.textContent = body === null ? text : JSON.stringify(body, null, 2);
  const millis = Math.round(performance.now() - started);
  $('console-status').textContent = `${method}: HTTP ${response.status}, ${millis} ms`;
  $('console-status').dataset.status = failed ? 'error' : 'ok';
}

// -- channel inspector --------------------------------------------------------------------

const inspector = {
  channel: '',
  epoch: '',
  top: 0,
  upper: 0, // the highest offset the history page shows (newest first)
  lowest: 0,
  tailing: false,
  tailOffset: 0,
  tailTimer: null,
  presenceTimer: null,

  limit() { return Number($('history-limit').value); },

  error(message) { $('inspector-error').textContent = message; },

  async open(channel) {
    this.stop();
    $('tail').replaceChildren();
    this.channel = channel;
    this.error('');
    try {
      const position = await call('history', { channel, limit: 0 });
      if (channel !== this.channel) return;
      this.epoch = position.epoch || '';
      this.top = position.offset || 0;
      this.showPosition();
      $('inspector').hidden = false;
      await this.page(this.top);
      this.resume();
    } catch (error) {
      if (channel !== this.channel) return;
      $('inspector').hidden = true;
      if (error.code === 108) this.error('History is off for this channel: nothing to browse or tail.');
      else if (error.code !== 401) this.error(`history failed: ${error.message}`);
    }
  },

  resume() {
    clearInterval(this.presenceTimer);
    this.loadPresence();
    this.presenceTimer = setInterval(() => {
      this.loadPresence();
      this.refreshPosition();
    }, PRESENCE_EVERY_MS);
  },

  // The stream's top now; a history page showing the newest publications follows it.
  async refreshPosition() {
    const channel = this.channel;
    try {
      const position = await call('history', { channel, limit: 0 });
      if (channel !== this.channel || position.epoch !== this.epoch) return;
      this.advance(position.offset || 0);
    } catch (error) {
      if (error.code !== 401 && channel === this.channel) this.error(`history failed: ${error.message}`);
    }
  },

  advance(top) {
    if (top <= this.top) return;
    const atNewest = this.upper >= this.top;
    this.top = top;
    this.showPosition();
    if (atNewest) this.page(top).catch((e) => this.error(e.message));
    else $('history-newest').disabled = $('history-newer').disabled = false;
  },

  stop() {
    clearInterval(this.presenceTimer);
    this.presenceTimer = null;
    this.stopTail();
  },

  showPosition() {
    $('stream-offset').textContent = String(this.top);
    $('stream-epoch').textContent = this.epoch || '-';
  },

  // The page of publications with offsets <= upper, newest first.
  async page(upper) {
    const request = { channel: this.channel, limit: this.limit(), reverse: true };
    if (upper > 0) request.since = { offset: upper + 1, epoch: this.epoch };
    const channel = this.channel;
    let result;
    try {
      result = await call('history', request);
    } catch (error) {
      if (channel !== this.channel) return undefined;
      if (error.code === 112) return this.open(channel); // a new epoch: start over
      throw error;
    }
    if (channel !== this.channel) return undefined; // another channel was opened meanwhile
    this.top = Math.max(this.top, result.offset || 0);
    this.showPosition();
    const pubs = result.publications || [];
    this.upper = upper;
    this.lowest = pubs.length ? pubs[pubs.length - 1].offset : 0;
    $('history').tBodies[0].replaceChildren(...pubs.map((pub) => el('tr', {
      class: 'pub', 'data-offset': pub.offset,
    }, el('td', { class: 'num' }, pub.offset), el('td', { class: 'data' }, json(pub.data)),
    el('td', {}, from(pub)))));
    $('history-range').textContent = pubs.length
      ? `offsets ${pubs[0].offset} to ${this.lowest} of ${this.top}` : 'no publications';
    $('history-older').disabled = !pubs.length || this.lowest <= 1 || pubs.length < this.limit();
    $('history-newer').disabled = upper >= this.top;
    $('history-newest').disabled = upper >= this.top;
    return undefined;
  },

  older() { return this.page(this.lowest - 1).catch((e) => this.error(e.message)); },

  newer() {
    return this.page(Math.min(this.top, this.upper + this.limit())).catch((e) => this.error(e.message));
  },

  async newest() {
    const channel = this.channel;
    try {
      const position = await call('history', { channel, limit: 0 });
      if (channel !== this.channel) return;
      this.top = position.offset || 0;
      await this.page(this.top);
    } catch (error) {
      this.error(error.message);
    }
  },

  async loadPresence() {
    const channel = this.channel;
    try {
      const result = await call('presence', { channel });
      if (channel !== this.channel) return;
      const clients = Object.values(result.presence || {});
      $('presence').replaceChildren(...clients.map((info) => el('li', { class: 'client' },
        `${info.user || '(anonymous)'} `, el('code', {}, info.client))));
      $('presence-count').textContent = `${clients.length} client(s)`;
      $('presence-error').textContent = '';
    } catch (error) {
      if (channel !== this.channel) return;
      $('presence').replaceChildren();
      $('presence-count').textContent = '';
      $('presence-error').textContent = error.code === 108
        ? 'Presence is off for this channel.' : `presence failed: ${error.message}`;
    }
  },

  toggleTail() {
    if (this.tailing) this.stopTail();
    else this.startTail();
  },

  startTail() {
    if (!this.channel) return;
    this.tailing = true;
    this.tailOffset = this.top;
    this.note(`tailing from offset ${this.top}`);
    $('tail-toggle').textContent = 'Stop tail';
    $('tail-state').textContent = 'live';
    $('tail-state').className = 'muted live';
    this.scheduleTail(0);
  },

  stopTail() {
    if (!this.tailing) return;
    this.tailing = false;
    clearTimeout(this.tailTimer);
    $('tail-toggle').textContent = 'Start tail';
    $('tail-state').textContent = 'stopped';
    $('tail-state').className = 'muted';
  },

  scheduleTail(ms) {
    clearTimeout(this.tailTimer);
    if (this.tailing) this.tailTimer = setTimeout(() => this.pollTail(), ms);
  },

  // Everything after tailOffset, oldest first; again at once while full batches come.
  async pollTail() {
    const channel = this.channel;
    let more = false;
    try {
      const result = await call('history', {
        channel, limit: TAIL_BATCH, since: { offset: this.tailOffset, epoch: this.epoch },
      });
      if (!this.tailing || channel !== this.channel) return;
      for (const pub of result.publications || []) {
        this.tailOffset = pub.offset;
        this.add(pub);
      }
      this.advance(result.offset || 0);
      more = (result.publications || []).length === TAIL_BATCH;
    } catch (error) {
      if (error.code === 112) {
        const position = await call('history', { channel, limit: 0 }).catch(() => null);
        if (position) {
          this.epoch = position.epoch;
          this.tailOffset = 0;
          this.note(`the stream restarted with epoch ${position.epoch}`);
        }
      } else if (error.code === 401) {
        return;
      } else {
        this.note(`history failed: ${error.message}`);
      }
    }
    this.scheduleTail(more ? 0 : TAIL_EVERY_MS);
  },

  add(pub) {
    const list = $('tail');
    list.prepend(el('li', { class: 'pub', 'data-offset': pub.offset },
      el('span', { class: 'offset' }, `#${pub.offset}`), el('span', { class: 'data' }, json(pub.data)),
      pub.info ? el('span', { class: 'muted' }, ` from ${from(pub)}`) : ''));
    while (list.children.length > TAIL_KEEP) list.lastChild.remove();
  },

  note(text) {
    $('tail').prepend(el('li', { class: 'note' }, text));
  },
};

function setupInspector() {
  $('inspector-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const channel = $('inspector-channel').value.trim();
    if (!channel) return;
    const hash = `#/inspector/${encodeURIComponent(channel)}`;
    if (location.hash === hash) inspector.open(channel);
    else location.hash = hash;
  });
  $('history-older').addEventListener('click', () => inspector.older());
  $('history-newer').addEventListener('click', () => inspector.newer());
  $('history-newest').addEventListener('click', () => inspector.newest());
  $('history-limit').addEventListener('change', () => inspector.channel && inspector.newest());
  $('tail-toggle').addEventListener('click', () => inspector.toggleTail());
  $('tail-clear').addEventListener('click', () => $('tail').replaceChildren());
}

document.addEventListener('DOMContentLoaded', () => {
  $('login-form').addEventListener('submit', login);
  $('logout').addEventListener('click', () => logout());
  $('channels-form').addEventListener('submit', (event) => { event.preventDefault(); loadChannels(); });
  setupConsole();
  setupInspector();
  window.addEventListener('hashchange', route);
  start().catch((error) => showLogin(`Cannot reach the server: ${error.message}`));
});
