// sensorpipe dashboard: devices and presence, latest values (live over Server-Sent Events), charts
// from the rollups that grow live, commands, sink health and dead letters. Plain JavaScript, served
// by the HTTP worker itself: works on a LAN with no internet.
"use strict";

const TOKEN_KEY = "sensorpipe-token";
const MAX_CHART_POINTS = 1500;          // the window is picked so a range holds at most about this many
const state = {device: null, range: 3600, windows: [], series: {}, stream: null, devices: []};

function token() { return localStorage.getItem(TOKEN_KEY) || ""; }

async function api(path, options = {}) {
  const headers = {"Content-Type": "application/json", ...(options.headers || {})};
  if (token()) headers.Authorization = "Bearer " + token();
  const response = await fetch(path, {...options, headers});
  if (response.status === 401) {
    const given = prompt("This sensorpipe needs an API token:");
    if (given) { localStorage.setItem(TOKEN_KEY, given.trim()); return api(path, options); }
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error ? `${body.error.code}: ${body.error.message}` : response.statusText);
  return body;
}

function ago(ms) {
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k.startsWith("data-")) node.setAttribute(k, v); else node[k] = v;
  }
  node.append(...children);
  return node;
}

function formatValue(value) {
  return typeof value === "number" ? String(+value.toPrecision(6)) : JSON.stringify(value);
}

// ------------------------------------------------------------------ devices

async function loadDevices() {
  try {
    const {devices} = await api("/api/devices");
    state.devices = devices;
    renderDevices();
    if (!state.device && devices.length) selectDevice(decodeURIComponent(location.hash.slice(1)) || devices[0].device);
  } catch (e) { document.getElementById("devices").replaceChildren(el("li", {class: "muted"}, e.message)); }
}

function renderDevices() {
  const list = document.getElementById("devices");
  list.replaceChildren(...state.devices.map(d => {
    const item = el("li", {"data-device": d.device, class: (d.online ? "online" : "offline") + (d.device === state.device ? " selected" : ""),
                           title: `${d.online ? "online" : "offline"} · ${d.via} ${d.peer}`},
                    el("span", {class: "dot"}), el("span", {class: "name"}, d.device), el("span", {class: "seen", "data-seen": d.last_seen}, ago(d.last_seen)));
    item.addEventListener("click", () => selectDevice(d.device));
    return item;
  }));
}

function selectDevice(device) {
  if (state.device === device) return;
  state.device = device;
  location.hash = encodeURIComponent(device);
  document.getElementById("device-title").textContent = device;
  renderDevices();
  document.querySelector("#latest tbody").replaceChildren();
  loadLatest();
  loadCharts();
  loadCommands();
  openStream();
}

// ------------------------------------------------------------------ latest values, live

async function loadLatest() {
  const device = state.device;
  try {
    const {fields} = await api(`/api/devices/${encodeURIComponent(device)}/latest`);
    if (device !== state.device) return;
    for (const [name, {value, ts}] of Object.entries(fields)) showValue(name, value, ts, false);
  } catch (e) { document.getElementById("device-presence").textContent = e.message; }
}

function showValue(name, value, ts, fresh) {
  const body = document.querySelector("#latest tbody");
  let row = body.querySelector(`tr[data-field="${CSS.escape(name)}"]`);
  if (!row) {
    row = el("tr", {"data-field": name}, el("th", {}, name), el("td", {class: "value"}), el("td", {class: "muted when"}));
    const rows = [...body.children, row].sort((a, b) => a.dataset.field.localeCompare(b.dataset.field));
    body.replaceChildren(...rows);
  }
  if (row.dataset.ts && +row.dataset.ts > ts) return;              // newer already shown
  row.dataset.ts = ts;
  row.querySelector(".value").textContent = formatValue(value);
  row.querySelector(".value").dataset.value = value;
  row.querySelector(".when").textContent = new Date(ts).toLocaleTimeString();
  if (fresh) { row.classList.remove("fresh"); void row.offsetWidth; row.classList.add("fresh"); }
}

function openStream() {
  if (state.stream) state.stream.close();
  const query = token() ? `?token=${encodeURIComponent(token())}` : "";
  const stream = new EventSource(`/api/devices/${encodeURIComponent(state.device)}/stream${query}`);
  state.stream = stream;
  stream.addEventListener("reading", message => {
    const reading = JSON.parse(message.data);
    for (const [name, value] of Object.entries(reading.fields)) {
      showValue(name, value, reading.ts, true);
      growChart(name, reading.ts, value);
    }
  });
  stream.addEventListener("seen", message => {
    const seen = JSON.parse(message.data);
    const known = state.devices.find(d => d.device === seen.device);
    if (known) { known.last_seen = Math.max(known.last_seen, seen.last_seen); known.online = true; renderDevices(); }
    document.getElementById("device-presence").textContent = `online · last seen ${new Date(seen.last_seen).toLocaleTimeString()} via ${seen.via}`;
  });
  stream.addEventListener("event", message => {
    const event = JSON.parse(message.data);
    if (event.kind === "cmd_ack") loadCommands();
  });
}

// ------------------------------------------------------------------ charts

function pickWindow(rangeS) {
  // the smallest configured window that keeps the range under MAX_CHART_POINTS, else the largest
  const fitting = state.windows.filter(w => rangeS / w.seconds <= MAX_CHART_POINTS);
  return fitting.length ? fitting[0] : state.windows[state.windows.length - 1];
}

async function loadCharts() {
  const device = state.device, to = Date.now();
  const window = pickWindow(state.range);
  // the query worker refuses more than [query] history_max_points (10,000): with only small windows
  // configured, a week is cut to what fits, and the note says so
  const spanS = window ? Math.min(state.range, window.seconds * 9000) : state.range;
  const from = to - spanS * 1000;
  const numeric = Object.entries((await api(`/api/devices/${encodeURIComponent(device)}/latest`).catch(() => ({fields: {}}))).fields)
    .filter(([, f]) => typeof f.value === "number").map(([name]) => name).sort();
  const charts = document.getElementById("charts");
  charts.replaceChildren();
  state.series = {};
  const note = [];
  for (const field of numeric) {
    let points = [];
    let used = "raw";
    if (window) {
      try {
        const h = await api(`/api/devices/${encodeURIComponent(device)}/history?field=${encodeURIComponent(field)}&window=${window.label}&from=${from}&to=${to}`);
        points = h.points.map(([t, , min, max, mean]) => ({t: t + window.seconds * 500, y: mean, lo: min, hi: max}));
        used = window.label;
      } catch (e) { note.push(e.message); }
    }
    if (!points.length) {      // no closed window yet (a new device): its raw readings, while they fit
      try {
        const h = await api(`/api/devices/${encodeURIComponent(device)}/history?field=${encodeURIComponent(field)}&from=${from}&to=${to}`);
        points = h.points.map(([t, v]) => ({t, y: v}));
        used = "raw";
      } catch (e) { note.push(e.message); }
    }
    if (device !== state.device) return;
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    const box = el("div", {class: "chart", "data-field": field}, el("h3", {}, `${field} · ${used}`));
    box.append(svg);
    charts.append(box);               // in the page first: the chart is drawn at its width
    state.series[field] = {svg, points};
    drawChart(svg, points, [Date.now() - state.range * 1000, Date.now()]);
  }
  const cut = spanS < state.range ? ` (the last ${Math.round(spanS / 3600)} h: add a larger window to [rollups] windows)` : "";
  document.getElementById("chart-note").textContent = note.length ? note[0] : (window ? `rollups: ${window.label}${cut}` : "raw readings");
}

function growChart(field, ts, value) {
  const series = state.series[field];
  if (!series || typeof value !== "number") return;
  series.points.push({t: ts, y: value});
  drawChart(series.svg, series.points, [Date.now() - state.range * 1000, Date.now()]);
}

window.addEventListener("resize", () => {     // charts are drawn at their pixel width: draw again
  for (const series of Object.values(state.series)) drawChart(series.svg, series.points, [Date.now() - state.range * 1000, Date.now()]);
});

document.querySelectorAll(".ranges button").forEach(button => button.addEventListener("click", () => {
  document.querySelectorAll(".ranges button").forEach(b => b.classList.toggle("active", b === button));
  state.range = +button.dataset.range;
  if (state.device) loadCharts();
}));

// ------------------------------------------------------------------ commands

async function loadCommands() {
  if (!state.device) return;
  const device = state.device;
  try {
    const {commands} = await api(`/api/devices/${encodeURIComponent(device)}/commands?limit=20`);
    if (device !== state.device) return;
    document.querySelector("#commands tbody").replaceChildren(...commands.map(c => el("tr", {"data-id": c.id},
      el("td", {}, el("code", {}, c.id)), el("td", {}, el("code", {}, JSON.stringify(c.command))),
      el("td", {class: `status state-${c.status}`, title: c.error || c.via || ""}, c.status),
      el("td", {class: "muted"}, ago(c.created)))));
  } catch (e) { document.getElementById("command-result").textContent = e.message; }
}

document.getElementById("command-form").addEventListener("submit", async event => {
  event.preventDefault();
  const result = document.getElementById("command-result");
  let command;
  try { command = JSON.parse(document.getElementById("command-json").value); }
  catch (e) { result.textContent = "not JSON: " + e.message; return; }
  if (!state.device) { result.textContent = "pick a device first"; return; }
  try {
    const reply = await api(`/api/devices/${encodeURIComponent(state.device)}/commands`, {method: "POST", body: JSON.stringify({command})});
    result.textContent = `${reply.id}: ${reply.status}${reply.via ? " via " + reply.via : ""}${reply.reason ? " (" + reply.reason + ")" : ""}`;
  } catch (e) { result.textContent = e.message; }
  loadCommands();
});

// ------------------------------------------------------------------ health

async function loadStatus() {
  try {
    const status = await api("/api/status");
    state.windows = (status.http.rollup_windows || []).map(([label, seconds]) => ({label, seconds}));
    const sinks = Object.entries(status.sinks);
    document.querySelector("#sinks tbody").replaceChildren(...sinks.map(([name, s]) => el("tr", {"data-sink": name},
      el("td", {}, name), el("td", {class: s.state === "ok" && !s.stale ? "state-acked" : "state-failed"}, s.stale ? "silent" : s.state),
      el("td", {}, s.written), el("td", {}, s.pending), el("td", {}, s.spooled))));
    const bad = sinks.filter(([, s]) => s.state !== "ok" || s.stale).length;
    const health = document.getElementById("health");
    health.textContent = bad ? `${bad} sink(s) failing` : "all sinks ok";
    health.className = "pill " + (bad ? "bad" : "ok");
  } catch (e) {
    const health = document.getElementById("health");
    health.textContent = e.message; health.className = "pill bad";
  }
}

async function loadDeadLetters() {
  try {
    const {total, deadletters} = await api("/api/deadletters?limit=5");
    const count = document.getElementById("deadletter-count");
    count.textContent = total; count.className = "pill " + (total ? "warn" : "ok");
    document.querySelector("#deadletters tbody").replaceChildren(...deadletters.map(d => el("tr", {},
      el("td", {class: "muted"}, ago(d.recv_ts)), el("td", {}, d.device || d.peer), el("td", {}, d.reason))));
  } catch (e) { /* shown by the health pill */ }
}

function tick() {
  document.getElementById("clock").textContent = new Date().toLocaleTimeString();
  document.querySelectorAll("#devices .seen").forEach(span => { span.textContent = ago(+span.dataset.seen); });
}

async function start() {
  await loadStatus();
  await loadDevices();
  loadDeadLetters();
  setInterval(loadDevices, 5000);
  setInterval(loadStatus, 3000);
  setInterval(loadDeadLetters, 10000);
  setInterval(loadCommands, 2000);
  setInterval(tick, 1000);
  tick();
}
start();
