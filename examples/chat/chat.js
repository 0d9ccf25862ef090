// The chat page: one Centrifuge client per (transport, room) choice and one subscription to
// "<namespace>:<room>". The namespace keeps history with force_recovery and has presence and
// join/leave (see config.json), so the page shows the last messages when it joins, the ones it
// missed when it comes back, and who is online. Plain browser JavaScript, no build step:
// `Centrifuge` comes from centrifuge.js, `CHAT_SETTINGS` ({server, namespace}) from serve.py.
"use strict";

const settings = window.CHAT_SETTINGS;
const $ = (id) => document.getElementById(id);
const PATHS = {
  websocket: "/connection/websocket",
  sse: "/connection/sse",
  http_stream: "/connection/http_stream",
};

let client = null;         // {centrifuge, subscription, transport, channel}
let myClientId = "";       // from the "connected" event
let recovering = false;    // true while centrifuge-js hands over the recovered publications
const shown = new Set();   // offsets already in the message list
const names = new Map();   // client id -> name, learnt from the messages it sent
const online = new Map();  // client id -> client info, from presence and join/leave

function endpointFor(transport) {
  const url = new URL(PATHS[transport], settings.server);
  if (transport === "websocket") url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.toString();
}

function createClient(transport, channel) {
  // The array form with one entry: exactly this transport, no fallback to another one.
  const centrifuge = new Centrifuge([{transport, endpoint: endpointFor(transport)}], {
    emulationEndpoint: new URL("/emulation", settings.server).toString(),
  });
  centrifuge.on("state", showStatus);
  centrifuge.on("connected", (ctx) => {
    myClientId = ctx.client;
    $("status").dataset.transport = ctx.transport;
    logEvent(`connected via ${ctx.transport}`);
    showStatus();
  });
  centrifuge.on("disconnected", (ctx) => logEvent(`disconnected (${ctx.reason})`));

  const subscription = centrifuge.newSubscription(channel);
  subscription.on("state", showStatus);
  subscription.on("subscribed", onSubscribed);
  subscription.on("publication", (ctx) => {
    showMessage(ctx, recovering ? "recovered" : "live");
  });
  subscription.on("join", (ctx) => {
    online.set(ctx.info.client, ctx.info);
    logEvent(`${label(ctx.info.client)} joined`);
    showOnline();
  });
  subscription.on("leave", (ctx) => {
    online.delete(ctx.info.client);
    logEvent(`${label(ctx.info.client)} left`);
    showOnline();
  });
  return {centrifuge, subscription, transport, channel};
}

async function onSubscribed(ctx) {
  if (ctx.wasRecovering && ctx.recovered) {
    // centrifuge-js emits the missed publications right after this event, in the same
    // synchronous call; a microtask runs only once they are all shown.
    recovering = true;
    queueMicrotask(() => { recovering = false; });
    logEvent(ctx.hasRecoveredPublications ? "reconnected: missed messages recovered"
                                          : "reconnected: nothing missed");
  }
  try {
    if (!ctx.recovered) {
      if (ctx.wasRecovering) {
        logEvent("could not recover the missed messages: history reloaded");
        clearMessages();
      }
      const history = await client.subscription.history({limit: 50, reverse: true});
      history.publications.reverse().forEach((pub) => showMessage(pub, "history"));
    }
    const presence = await client.subscription.presence();
    online.clear();
    Object.values(presence.clients).forEach((info) => online.set(info.client, info));
    showOnline();
  } catch (error) {
    logEvent(`history/presence failed: ${error.message || error.code}`);
  }
}

function showMessage(pub, kind) {
  if (shown.has(pub.offset)) return;  // history and live pushes may overlap
  shown.add(pub.offset);
  const data = pub.data && typeof pub.data === "object" ? pub.data : {text: JSON.stringify(pub.data)};
  if (pub.info && data.name) {
    names.set(pub.info.client, String(data.name));
    showOnline();
  }
  const item = document.createElement("li");
  item.className = kind;
  item.dataset.offset = pub.offset;
  const who = document.createElement("b");
  who.textContent = data.name ? String(data.name) : "server";
  item.append(who, `: ${data.text ?? JSON.stringify(data)}`);
  if (kind !== "live") {
    const note = document.createElement("small");
    note.textContent = kind;
    item.append(note);
  }
  const list = $("messages");
  const later = [...list.children].find((li) => Number(li.dataset.offset) > pub.offset);
  list.insertBefore(item, later || null);  // keep the list in offset order
}

function label(clientId) {
  if (clientId === myClientId) return `${$("name").value} (you)`;
  return names.get(clientId) || `anonymous ${clientId.slice(0, 8)}`;
}

function showOnline() {
  const items = [...online.keys()].map((clientId) => {
    const item = document.createElement("li");
    item.dataset.client = clientId;
    item.textContent = label(clientId);
    return item;
  });
  $("online").replaceChildren(...items);
}

function logEvent(text) {
  const item = document.createElement("li");
  item.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $("events").prepend(item);
  while ($("events").children.length > 20) $("events").lastChild.remove();
}

function clearMessages() {
  shown.clear();
  $("messages").replaceChildren();
}

function showStatus() {
  const status = $("status");
  const clientState = client ? client.centrifuge.state : "disconnected";
  const subState = client ? client.subscription.state : "unsubscribed";
  status.dataset.client = clientState;
  status.dataset.sub = subState;
  const via = clientState === "connected" ? ` via ${status.dataset.transport}` : "";
  status.textContent = client ? `${clientState}${via} · ${client.channel}: ${subState}` : "not connected";
  $("text").disabled = $("send").disabled = subState !== "subscribed";
  $("leave").disabled = clientState === "disconnected";
}

$("join-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const transport = $("transport").value;
  const channel = `${settings.namespace}:${$("room").value}`;
  if (client && client.transport === transport && client.channel === channel) {
    client.centrifuge.connect();  // the same room again: resubscribe and recover what we missed
    return;
  }
  if (client) {
    client.subscription.removeAllListeners();
    client.centrifuge.removeAllListeners();
    client.centrifuge.disconnect();
  }
  clearMessages();
  names.clear();
  online.clear();
  showOnline();
  delete $("status").dataset.transport;
  client = createClient(transport, channel);
  client.subscription.subscribe();
  client.centrifuge.connect();
});

$("leave").addEventListener("click", () => {
  client.centrifuge.disconnect();  // the subscription keeps its position for recovery
  online.clear();
  showOnline();
});

$("send-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("text");
  try {
    await client.subscription.publish({name: $("name").value, text: input.value});
    input.value = "";  // the message appears when the server delivers it back
  } catch (error) {
    logEvent(`publish failed: ${error.message || error.code}`);
  }
});
