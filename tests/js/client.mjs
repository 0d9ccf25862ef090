#!/usr/bin/env node
// Scripted centrifuge-js driver for centripy's integration tests.
//
// Usage: node client.mjs SCENARIO.json   (or the scenario JSON on stdin)
//
// A scenario is
//   {"endpoint": "ws://127.0.0.1:PORT/connection/websocket",    // used when transports is null
//    "transports": null | [{"transport": "http_stream", "endpoint": "http://.../connection/http_stream"}, ...],
//    "emulationEndpoint": "http://127.0.0.1:PORT/emulation",     // default: derived from the endpoints
//    "token": "...", "tokens": ["...", ...],                       // tokens: served in order by getToken
//    "data": {...}, "name": "js", "options": {...},                // more Centrifuge options
//    "apiUrl": "http://127.0.0.1:PORT/api", "apiKey": "...",       // for the "api" step
//    "protobuf": true,                                              // centrifuge-js protobuf build
//    "timeoutMs": 30000,                                            // whole scenario
//    "steps": [{"op": "connect"}, ...]}
//
// Steps (each may carry "expectError": CODE or true, making a failure with that code the
// expected outcome, and "timeoutMs"):
//   connect {wait=true}            disconnect                    sleep {ms}
//   subscribe {channel, options, wait=true}                      unsubscribe {channel}
//   publish {channel, data}        presence {channel}            presenceStats {channel}
//   history {channel, options}     rpc {method, data}            send {data}
//   waitPublications {channel, count}   waitState {state}        waitSubState {channel, state}
//   waitEvent {match: {...}, count=1}   assertState {state}      api {method, payload}
//
// Output: one JSON object per line on stdout, e.g. {"event":"connected",...},
// {"event":"publication","channel":..,"data":..,"offset":..}, {"event":"result","op":..,"value":..};
// the last line is {"event":"done"} on success or {"event":"fail",...} (exit code 1; 2 on the
// scenario timeout).

import { readFileSync } from 'node:fs';
import { Centrifuge, UnauthorizedError } from 'centrifuge';
import WebSocket from 'ws';
import { EventSource } from 'eventsource';

const events = [];
const waiters = new Set();

function emit(event) {
  events.push(event);
  process.stdout.write(JSON.stringify(event) + '\n');
  for (const waiter of waiters) waiter.check();
}

class StepError extends Error {}

// Resolve when predicate() holds (checked now and after every event), or reject after timeoutMs.
function waitFor(description, predicate, timeoutMs) {
  return new Promise((resolve, reject) => {
    const waiter = {
      check() {
        if (predicate()) {
          clearTimeout(timer);
          waiters.delete(waiter);
          resolve();
        }
      },
    };
    const timer = setTimeout(() => {
      waiters.delete(waiter);
      reject(new StepError(`timeout after ${timeoutMs} ms waiting for ${description}`));
    }, timeoutMs);
    waiters.add(waiter);
    waiter.check();
  });
}

function matches(event, pattern) {
  return Object.entries(pattern).every(([key, value]) => {
    if (value !== null && typeof value === 'object') {
      return event[key] !== null && typeof event[key] === 'object' && matches(event[key], value);
    }
    return event[key] === value;
  });
}

function readScenario() {
  const text = process.argv[2] ? readFileSync(process.argv[2], 'utf8') : readFileSync(0, 'utf8');
  const scenario = JSON.parse(text);
  if (!Array.isArray(scenario.steps)) throw new Error('scenario.steps must be an array');
  return scenario;
}

function errorInfo(err) {
  if (err && typeof err === 'object' && 'code' in err) {
    return { code: err.code, message: err.message ?? '' };
  }
  return { code: null, message: String(err && err.message ? err.message : err) };
}

async function makeClient(scenario) {
  const options = {
    websocket: WebSocket,
    fetch: globalThis.fetch,
    readableStream: globalThis.ReadableStream,
    eventsource: EventSource,
    name: scenario.name ?? 'js',
    ...(scenario.options ?? {}),
  };
  if (scenario.token) options.token = scenario.token;
  if (scenario.data !== undefined) options.data = scenario.data;
  if (Array.isArray(scenario.tokens)) {
    const tokens = scenario.tokens;
    let next = 0;
    options.getToken = async () => {
      if (next >= tokens.length) {
        emit({ event: 'getToken', index: next, exhausted: true });
        throw new UnauthorizedError('no more tokens in the scenario');
      }
      emit({ event: 'getToken', index: next });
      return tokens[next++];
    };
  }
  let endpoint = scenario.endpoint;
  if (Array.isArray(scenario.transports)) {
    endpoint = scenario.transports;
    if (endpoint.some((t) => t.transport === 'sockjs')) {
      options.sockjs = (await import('sockjs-client')).default;
    }
    const http = endpoint.find((t) => t.transport === 'http_stream' || t.transport === 'sse');
    if (!options.emulationEndpoint && (scenario.emulationEndpoint || http)) {
      options.emulationEndpoint =
        scenario.emulationEndpoint ?? new URL('/emulation', http.endpoint).toString();
    }
  }
  if (!endpoint) throw new Error('scenario needs "endpoint" or "transports"');
  if (scenario.protobuf) {
    // centrifuge-js's protobuf build: subprotocol centrifuge-protobuf, payloads are bytes.
    const pb = await import('centrifuge/build/protobuf');
    return new pb.Centrifuge(endpoint, options);
  }
  return new Centrifuge(endpoint, options);
}

// Protobuf payloads arrive as bytes: show them as the JSON they carry.
function payload(data) {
  if (data instanceof Uint8Array) {
    const text = new TextDecoder().decode(data);
    try { return JSON.parse(text); } catch { return text; }
  }
  return data;
}

function publicationEvent(ctx, source) {
  return {
    event: 'publication', source, channel: ctx.channel, data: payload(ctx.data),
    offset: ctx.offset ?? 0, info: ctx.info ?? null, tags: ctx.tags ?? null,
  };
}

function subscribedEvent(ctx, source) {
  return {
    event: 'subscribed', source, channel: ctx.channel, recoverable: ctx.recoverable,
    positioned: ctx.positioned, streamPosition: ctx.streamPosition ?? null,
    wasRecovering: ctx.wasRecovering, recovered: ctx.recovered, data: ctx.data ?? null,
  };
}

function listenClient(client) {
  client.on('connecting', (ctx) => emit({ event: 'connecting', code: ctx.code, reason: ctx.reason }));
  client.on('connected', (ctx) => emit({ event: 'connected', ctx }));
  client.on('disconnected', (ctx) => emit({ event: 'disconnected', code: ctx.code, reason: ctx.reason }));
  client.on('error', (ctx) =>
    emit({ event: 'error', source: 'client', type: ctx.type, ...errorInfo(ctx.error) }));
  client.on('message', (ctx) => emit({ event: 'message', data: ctx.data }));
  // Server-side subscriptions.
  client.on('subscribing', (ctx) => emit({ event: 'subscribing', source: 'server', channel: ctx.channel }));
  client.on('subscribed', (ctx) => emit(subscribedEvent(ctx, 'server')));
  client.on('unsubscribed', (ctx) => emit({ event: 'unsubscribed', source: 'server', channel: ctx.channel }));
  client.on('publication', (ctx) => emit(publicationEvent(ctx, 'server')));
  client.on('join', (ctx) => emit({ event: 'join', source: 'server', channel: ctx.channel, info: ctx.info }));
  client.on('leave', (ctx) => emit({ event: 'leave', source: 'server', channel: ctx.channel, info: ctx.info }));
}

function listenSubscription(sub) {
  const channel = sub.channel;
  sub.on('subscribing', (ctx) => emit({ event: 'subscribing', source: 'client', channel, code: ctx.code, reason: ctx.reason }));
  sub.on('subscribed', (ctx) => emit(subscribedEvent(ctx, 'client')));
  sub.on('unsubscribed', (ctx) => emit({ event: 'unsubscribed', source: 'client', channel, code: ctx.code, reason: ctx.reason }));
  sub.on('publication', (ctx) => emit(publicationEvent({ ...ctx, channel }, 'client')));
  sub.on('join', (ctx) => emit({ event: 'join', source: 'client', channel, info: ctx.info }));
  sub.on('leave', (ctx) => emit({ event: 'leave', source: 'client', channel, info: ctx.info }));
  sub.on('error', (ctx) => emit({ event: 'error', source: 'client', channel, type: ctx.type, ...errorInfo(ctx.error) }));
}

function subscription(client, channel) {
  const sub = client.getSubscription(channel);
  if (sub === null) throw new StepError(`no subscription to ${channel}`);
  return sub;
}

async function callApi(scenario, method, payload) {
  if (!scenario.apiUrl) throw new StepError('the "api" step needs scenario.apiUrl');
  const response = await fetch(`${scenario.apiUrl}/${method}`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', 'X-API-Key': scenario.apiKey ?? '' },
    body: JSON.stringify(payload ?? {}),
  });
  const text = await response.text();
  if (response.status !== 200) {
    throw Object.assign(new StepError(`api ${method}: HTTP ${response.status} ${text}`), { code: response.status });
  }
  const body = JSON.parse(text);
  if (body.error) throw Object.assign(new StepError(`api ${method}: ${text}`), body.error);
  return body.result ?? body;
}

const publicationsOf = (channel) =>
  events.filter((e) => e.event === 'publication' && e.channel === channel).length;

// Run one step; returns the value to report as {"event":"result"}, or undefined for none.
async function runStep(client, scenario, step, timeoutMs) {
  switch (step.op) {
    case 'connect':
      client.connect();
      if (step.wait !== false) await client.ready(timeoutMs);
      return undefined;
    case 'disconnect':
      client.disconnect();
      return undefined;
    case 'sleep':
      await new Promise((resolve) => setTimeout(resolve, step.ms ?? 0));
      return undefined;
    case 'subscribe': {
      let sub = client.getSubscription(step.channel);
      if (sub === null) {
        sub = client.newSubscription(step.channel, step.options ?? {});
        listenSubscription(sub);
      }
      sub.subscribe();
      if (step.wait !== false) await sub.ready(timeoutMs);
      return undefined;
    }
    case 'unsubscribe':
      subscription(client, step.channel).unsubscribe();
      return undefined;
    case 'publish':
      return client.publish(
        step.channel,
        scenario.protobuf ? new TextEncoder().encode(JSON.stringify(step.data)) : step.data,
      );
    case 'presence':
      return client.presence(step.channel);
    case 'presenceStats':
      return client.presenceStats(step.channel);
    case 'history':
      return client.history(step.channel, step.options ?? {});
    case 'rpc':
      return client.rpc(step.method, step.data ?? {});
    case 'send':
      await client.send(step.data ?? {});
      return undefined;
    case 'api':
      return callApi(scenario, step.method, step.payload);
    case 'waitPublications':
      await waitFor(`${step.count} publications in ${step.channel}`,
        () => publicationsOf(step.channel) >= step.count, timeoutMs);
      return undefined;
    case 'waitState':
      await waitFor(`client state ${step.state}`, () => client.state === step.state, timeoutMs);
      return undefined;
    case 'waitSubState':
      await waitFor(`subscription ${step.channel} state ${step.state}`,
        () => subscription(client, step.channel).state === step.state, timeoutMs);
      return undefined;
    case 'waitEvent':
      await waitFor(`${step.count ?? 1} events matching ${JSON.stringify(step.match)}`,
        () => events.filter((e) => matches(e, step.match)).length >= (step.count ?? 1), timeoutMs);
      return undefined;
    case 'assertState':
      if (client.state !== step.state) {
        throw new StepError(`client state is ${client.state}, expected ${step.state}`);
      }
      return undefined;
    default:
      throw new StepError(`unknown op ${JSON.stringify(step.op)}`);
  }
}

async function runScenario(client, scenario) {
  for (const [index, step] of scenario.steps.entries()) {
    const timeoutMs = step.timeoutMs ?? 5000;
    try {
      const value = await runStep(client, scenario, step, timeoutMs);
      if (step.expectError !== undefined) {
        throw new StepError(`expected error ${step.expectError}, the step succeeded`);
      }
      if (value !== undefined) emit({ event: 'result', op: step.op, step: index, value });
    } catch (err) {
      const info = errorInfo(err);
      const expected = step.expectError !== undefined && info.code !== null &&
        (step.expectError === true || step.expectError === info.code);
      if (!expected) {
        throw Object.assign(new Error(info.message), { step: index, op: step.op, code: info.code });
      }
      emit({ event: 'result', op: step.op, step: index, error: info });
    }
  }
}

async function main() {
  let client = null;
  // The last line: events of the teardown itself are not reported.
  const finish = (event, code) => {
    waiters.clear();
    if (client !== null) {
      client.removeAllListeners();
      for (const sub of Object.values(client.subscriptions())) sub.removeAllListeners();
      client.disconnect();
    }
    emit(event);
    process.exit(code);
  };
  let scenario;
  try {
    scenario = readScenario();
    client = await makeClient(scenario);
  } catch (err) {
    finish({ event: 'fail', step: null, op: null, message: `bad scenario: ${err.message}` }, 1);
  }
  listenClient(client);
  const timeoutMs = scenario.timeoutMs ?? 30000;
  setTimeout(() => {
    finish({ event: 'fail', step: null, op: null, message: `scenario timeout ${timeoutMs} ms` }, 2);
  }, timeoutMs);
  try {
    await runScenario(client, scenario);
  } catch (err) {
    finish({ event: 'fail', step: err.step ?? null, op: err.op ?? null, code: err.code ?? null, message: err.message }, 1);
  }
  finish({ event: 'done' }, 0);
}

main();
