// nicwarden operator dashboard: one ES module, no dependencies, no build step.
//
// Data: GET /v1/telemetry/fleet and /v1/events on load, then /v1/events/stream (SSE read
// with fetch + ReadableStream, since EventSource cannot send the bearer token): `event`
// frames append to the event log, `tick` frames merge NodeNow entries by node, `resync`
// reloads. Views render from the shared state `S`; only the visible view touches the DOM
// on a tick, and it updates only what changed (fleet rows are keyed by node).

const TOKEN_KEY = 'nicwarden.operator-token';
const EVENT_KEEP = 10000; // events kept in memory (the controller keeps as many)
const EVENT_ROWS = 2000; // rows the events table shows at most
const EVENT_PAGE = 500; // rows it shows first (more on request, up to EVENT_ROWS)
const NODE_EVENT_ROWS = 200;
const STATES = ['active', 'partial', 'pending', 'exhausted', 'revoked', 'expired', 'tampered', 'none'];
const KINDS = ['lease.', 'lease.granted', 'lease.renewed', 'lease.changed', 'lease.revoked', 'lease.expired',
  'lease.exhausted', 'agent.', 'agent.connected', 'agent.disconnected', 'node.', 'node.added', 'node.removed',
  'node.enrolled', 'node.tampered', 'mesh.', 'mesh.key_rotated', 'quota.set', 'topology.', 'topology.applied',
  'topology.finding', 'topology.finding_updated', 'topology.finding_cleared'];
const SEVERITIES = ['info', 'warning', 'critical'];

// ---------------------------------------------------------------------------------------
// DOM helpers

const $ = (sel, root = document) => root.querySelector(sel);
const SVGNS = 'http://www.w3.org/2000/svg';

/** Builds an element: h('a', {href: '#', class: 'x', text: 'hi', onclick: f}, child...) */
function h(tag, props = {}, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v == null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of kids.flat()) if (c != null && c !== false) el.append(c);
  return el;
}

const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));

/** Sets text only if it changed (cheap no-op on a tick where nothing moved). */
function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}
function setAttr(el, name, value) {
  const v = value == null ? null : String(value);
  if (el.getAttribute(name) !== v) {
    if (v == null) el.removeAttribute(name);
    else el.setAttribute(name, v);
  }
}

const nodeHref = (name) => `#/node/${encodeURIComponent(name)}`;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Runs `fn` once, `ms` after the first call since the last run (a throttle: a steady
 *  stream of calls, e.g. 50 renewals a second, still gets it run every `ms`). */
const throttles = new Map();
function throttle(key, ms, fn) {
  if (throttles.has(key)) return;
  throttles.set(key, setTimeout(() => {
    throttles.delete(key);
    fn();
  }, ms));
}
const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: 'base' });
const nf = new Intl.NumberFormat();

// ---------------------------------------------------------------------------------------
// Units: the same grammar as the CLI (crates/nicwarden/src/units.rs), exact integers.

const RATE_EXAMPLES = 'examples: 200Mbit, 1.5G, 500k';
const BYTES_EXAMPLES = 'examples: 10MB, 200MiB, 64KiB, 1500';
const DURATION_EXAMPLES = 'examples: 30s, 2m, 1h30m, 500ms';

function splitNumber(s) {
  const t = s.trim();
  let i = 0;
  while (i < t.length && /[0-9._]/.test(t[i])) i++;
  return [t.slice(0, i).replaceAll('_', ''), t.slice(i).trim()];
}

/** number * multiplier rounded to an integer, exactly; null if not a decimal or too large. */
function scaleExact(number, multiplier) {
  const parts = number.split('.');
  if (parts.length > 2) return null;
  const [int, frac = ''] = parts;
  if (!int && !frac) return null;
  if (!/^\d*$/.test(int) || !/^\d*$/.test(frac)) return null;
  const f = frac.slice(0, 24);
  const mantissa = BigInt((int || '0') + f);
  const divisor = 10n ** BigInt(f.length);
  const v = (mantissa * BigInt(multiplier) + divisor / 2n) / divisor;
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) return undefined;
  return Number(v);
}

function parseRate(s) {
  const notRate = `\`${s}\` is not a rate; ${RATE_EXAMPLES}`;
  const [number, unit] = splitNumber(s);
  if (!number) throw new Error(s.trim() ? notRate : `a rate is required; ${RATE_EXAMPLES}`);
  if (unit.includes('B') || unit.toLowerCase().includes('byte'))
    throw new Error(`\`${s}\` looks like bytes, but rates are in bits/s (1 byte = 8 bits); ${RATE_EXAMPLES}`);
  const lower = unit.toLowerCase();
  const mult = { k: 1e3, m: 1e6, g: 1e9, t: 1e12 }[lower[0]];
  const rest = mult ? lower.slice(1) : lower;
  if (!['', 'bit', 'bits', 'bps', 'bit/s', 'bits/s'].includes(rest)) throw new Error(notRate);
  const v = scaleExact(number, mult || 1);
  if (v === null) throw new Error(notRate);
  if (v === undefined) throw new Error(`\`${s}\` is too large a rate`);
  return v;
}

function parseBytes(s) {
  const notBytes = `\`${s}\` is not a byte count; ${BYTES_EXAMPLES}`;
  const [number, unit] = splitNumber(s);
  if (!number) throw new Error(notBytes);
  const lower = unit.toLowerCase();
  if (lower.endsWith('bit') || lower.endsWith('bits') || lower.endsWith('bps'))
    throw new Error(`\`${s}\` looks like bits, but this is a byte count; ${BYTES_EXAMPLES}`);
  let prefix = '';
  let suffix = unit;
  if (unit && 'kKmMgGtT'.includes(unit[0])) [prefix, suffix] = [unit[0], unit.slice(1)];
  const power = { '': 0, k: 1, m: 2, g: 3, t: 4 }[prefix.toLowerCase()];
  let base;
  if ((suffix === 'i' || suffix === 'iB') && power > 0) base = 1024;
  else if (suffix === '' || suffix === 'B') base = 1000;
  else if ((suffix === 'bytes' || suffix === 'byte') && power === 0) base = 1000;
  else if (suffix === 'b' || suffix === 'ib')
    throw new Error(`\`${s}\` is ambiguous: a lowercase \`b\` usually means bits; write \`B\` for bytes (${BYTES_EXAMPLES})`);
  else throw new Error(notBytes);
  const v = scaleExact(number, base ** power);
  if (v === null) throw new Error(notBytes);
  if (v === undefined) throw new Error(`\`${s}\` is too large a byte count`);
  return v;
}

/** Seconds. A bare number is seconds; otherwise humantime-style `1h30m`, `500ms`, `2 m`. */
function parseDuration(s) {
  const bad = () => new Error(`\`${s}\` is not a duration; ${DURATION_EXAMPLES}`);
  const t = s.trim();
  if (/^[\d.]+$/.test(t)) {
    const v = Number(t);
    if (!Number.isFinite(v)) throw bad();
    return v;
  }
  const units = { ns: 1e-9, nsec: 1e-9, us: 1e-6, usec: 1e-6, ms: 1e-3, msec: 1e-3, s: 1, sec: 1, secs: 1, second: 1,
    seconds: 1, m: 60, min: 60, mins: 60, minute: 60, minutes: 60, h: 3600, hr: 3600, hrs: 3600, hour: 3600,
    hours: 3600, d: 86400, day: 86400, days: 86400, w: 604800, week: 604800, weeks: 604800 };
  const re = /\s*(\d+)\s*([a-z]+)/gy;
  let total = 0;
  let m;
  let end = 0;
  while ((m = re.exec(t))) {
    if (!(m[2] in units)) throw bad();
    total += Number(m[1]) * units[m[2]];
    end = re.lastIndex;
  }
  if (!t || end !== t.length) throw bad();
  return total;
}

function trimNum(v) {
  const digits = v < 10 ? 2 : 1;
  return v.toFixed(digits).replace(/\.?0+$/, '');
}
function fmtRate(bps) {
  if (bps == null || !Number.isFinite(bps)) return '—';
  const units = [[1e12, 'Tbit/s'], [1e9, 'Gbit/s'], [1e6, 'Mbit/s'], [1e3, 'kbit/s']];
  for (const [u, name] of units) if (Math.abs(bps) >= u * 0.9995) return `${trimNum(bps / u)} ${name}`;
  return `${Math.round(bps)} bit/s`;
}
function fmtBytes(b) {
  if (b == null || !Number.isFinite(b)) return '—';
  const units = [[1e12, 'TB'], [1e9, 'GB'], [1e6, 'MB'], [1e3, 'kB']];
  for (const [u, name] of units) if (Math.abs(b) >= u * 0.9995) return `${trimNum(b / u)} ${name}`;
  return `${Math.round(b)} B`;
}
/** `12 s`, `3 m 20 s`, `2 h 5 m`, `3 d 4 h`. */
function fmtDur(ms) {
  if (ms == null || !Number.isFinite(ms)) return '—';
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 10) return s % 60 ? `${m} m ${s % 60} s` : `${m} m`;
  if (m < 60) return `${m} m`;
  const hr = Math.floor(m / 60);
  if (hr < 24) return m % 60 ? `${hr} h ${m % 60} m` : `${hr} h`;
  const d = Math.floor(hr / 24);
  return hr % 24 ? `${d} d ${hr % 24} h` : `${d} d`;
}
const pad2 = (n) => String(n).padStart(2, '0');
function fmtClock(ms) {
  const d = new Date(ms);
  return `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
}
function fmtTime(ms) {
  if (ms == null) return '—';
  const d = new Date(ms);
  const today = new Date();
  const clock = fmtClock(ms);
  return d.toDateString() === today.toDateString() ? clock : `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${clock}`;
}
function fmtPct(r) {
  if (r == null || !Number.isFinite(r)) return '—';
  if (r > 0 && r < 0.001) return '<0.1%';
  return `${r >= 10 ? Math.round(r * 100) : Math.round(r * 1000) / 10}%`;
}

/** Exact text a parser reads back: 200000000 -> `200Mbit`. */
function rateInput(bps) {
  for (const [u, n] of [[1e12, 'Tbit'], [1e9, 'Gbit'], [1e6, 'Mbit'], [1e3, 'kbit']]) if (bps >= u && bps % u === 0) return `${bps / u}${n}`;
  return String(bps);
}
function bytesInput(b) {
  for (const [u, n] of [[1e12, 'TB'], [1e9, 'GB'], [1e6, 'MB'], [1e3, 'kB'], [2 ** 30, 'GiB'], [2 ** 20, 'MiB'], [2 ** 10, 'KiB']]) if (b >= u && b % u === 0) return `${b / u}${n}`;
  return String(b);
}
function durInput(ms) {
  if (ms % 3600000 === 0) return `${ms / 3600000}h`;
  if (ms % 60000 === 0) return `${ms / 60000}m`;
  if (ms % 1000 === 0) return `${ms / 1000}s`;
  return `${ms}ms`;
}
function scopeText(scope) {
  if (scope == null) return '';
  if (typeof scope === 'string') return scope;
  if (scope.kind === 'egress') return 'egress';
  if (scope.kind === 'peer') return `peer:${scope.peer ?? scope.node ?? ''}`;
  return JSON.stringify(scope);
}

// ---------------------------------------------------------------------------------------
// Shared state

const S = {
  token: null,
  gen: 0, // bumped on sign-in/out: async work of an older session drops its results
  loaded: false,
  nodes: new Map(), // name -> NodeNow (+ deadline: server ms of the soonest expiry)
  names: [], // sorted node names
  fleetVersion: 0, // bumped when the set of nodes changes
  staleAfter: 5000,
  offset: 0, // server clock - local clock, ms
  events: [],
  lastEventId: 0,
  conn: 'connecting',
  connDetail: '',
  retryAt: 0,
  lastTickLocal: 0,
  lastData: 0,
  abort: null,
  buffered: null, // events that arrive on the stream while a reload is in flight
};
const serverNow = () => Date.now() + S.offset;

/** Interconnect verification: GET /v1/topology/status (findings, each port's last probing
 *  round) and the applied topology (GET /v1/topology, fetched again only when the status
 *  names another version). Loaded by the views that show it (`usesTopology`): when they
 *  open, on `topology.*` events (debounced) and every T_REFRESH_MS while they are open. */
const T = {
  status: null,
  topology: null, // null: none applied (or not loaded yet: see `status`)
  error: null,
  loading: false,
  fetchedAt: 0, // local ms of the last fetch's start
  seq: 0, // bumped per fetch: an older answer is dropped
  version: 0, // bumped when `status`/`topology` change
};
const T_REFRESH_MS = 5000;
const T_DEBOUNCE_MS = 400;

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function errorText(res) {
  const text = await res.text().catch(() => '');
  try {
    const j = JSON.parse(text);
    if (j && typeof j.error === 'string') return j.error;
  } catch { /* not JSON */ }
  return `${res.status} ${res.statusText}${text ? `: ${text.slice(0, 300)}` : ''}`;
}

/** Calls the operator API. Throws ApiError with the server's `error` text; a 401 signs out. */
async function api(method, path, body) {
  const gen = S.gen;
  const headers = { Authorization: `Bearer ${S.token}`, Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: 'no-store' });
  } catch (e) {
    throw new ApiError(0, `cannot reach the controller (${e.message})`);
  }
  if (!res.ok) {
    const msg = await errorText(res);
    if (res.status === 401 && gen === S.gen && S.token) signOut(msg);
    throw new ApiError(res.status, msg);
  }
  const text = await res.text();
  if (gen !== S.gen) throw new ApiError(0, 'signed out');
  return text ? JSON.parse(text) : null;
}

// ---------------------------------------------------------------------------------------
// Applying data

let pending = { changed: new Set(), structural: false, events: [] };
let flushTimer = null;
function scheduleFlush() {
  if (flushTimer == null) flushTimer = setTimeout(flush, 0);
}
function flush() {
  flushTimer = null;
  const p = pending;
  pending = { changed: new Set(), structural: false, events: [] };
  const v = current.view;
  try {
    if (v) {
      if (p.structural) v.onFleet?.();
      else if (p.changed.size) v.onTick?.(p.changed);
      if (p.events.length) v.onEvent?.(p.events);
    }
  } catch (e) {
    console.error(e);
  }
  updateHealth();
}

function storeNode(n, t) {
  n.t = t;
  n.deadline = n.expires_in_ms != null ? t + n.expires_in_ms : null;
  for (const s of n.scopes || []) s.deadline = s.expires_in_ms != null ? t + s.expires_in_ms : null;
  const isNew = !S.nodes.has(n.node);
  S.nodes.set(n.node, n);
  return isNew;
}

function applyFleet(f) {
  S.staleAfter = f.stale_after_ms ?? S.staleAfter;
  S.offset = f.now_unix_ms - Date.now();
  const before = S.names.join('\n');
  S.nodes = new Map();
  for (const n of f.nodes) storeNode(n, f.now_unix_ms);
  S.names = [...S.nodes.keys()].sort(collator.compare);
  if (S.names.join('\n') !== before) S.fleetVersion++;
  pending.structural = true;
  scheduleFlush();
}

function applyTick(tick) {
  S.lastTickLocal = Date.now();
  if (Number.isFinite(tick.t)) S.offset = tick.t - Date.now();
  let added = false;
  for (const n of tick.nodes || []) {
    if (storeNode(n, tick.t)) added = true;
    pending.changed.add(n.node);
    nodeView.ingest(tick.t, n);
  }
  if (added) {
    S.names = [...S.nodes.keys()].sort(collator.compare);
    S.fleetVersion++;
    pending.structural = true;
  }
  scheduleFlush();
}

function addEvents(evs) {
  if (S.buffered) {
    // A reload is in flight: its answer decides which ids we have; merge these after it.
    S.buffered.push(...evs);
    return;
  }
  let fresh = 0;
  for (const ev of evs) {
    if (ev.id <= S.lastEventId) continue; // replayed after a reconnect
    S.lastEventId = ev.id;
    S.events.push(ev);
    pending.events.push(ev);
    fresh++;
    if (/^node\.(added|removed)$/.test(ev.kind)) scheduleFleetReload();
    if (ev.kind.startsWith('topology.')) scheduleTopology();
  }
  if (S.events.length > EVENT_KEEP) S.events.splice(0, S.events.length - EVENT_KEEP);
  if (fresh) scheduleFlush();
}

function scheduleFleetReload() {
  throttle('fleet', 1000, () => {
    const gen = S.gen;
    api('GET', '/v1/telemetry/fleet').then((f) => gen === S.gen && applyFleet(f)).catch((e) => {
      if (e.status !== 401) showBanner(`Reloading the fleet failed: ${e.message}`);
    });
  });
}

async function loadAll(gen) {
  S.buffered = [];
  let fleet;
  let ev;
  try {
    [fleet, ev] = await Promise.all([api('GET', '/v1/telemetry/fleet'), api('GET', `/v1/events?limit=${EVENT_ROWS}`)]);
  } catch (e) {
    S.buffered = null;
    throw e;
  }
  if (gen !== S.gen) return; // signed out meanwhile (signOut reset the buffer)
  applyFleet(fleet);
  S.events = ev.events.slice(-EVENT_KEEP);
  // Ids restart when the controller restarts: take its word for the newest id.
  S.lastEventId = Math.max(ev.last_id ?? 0, ...ev.events.map((e) => e.id), 0);
  S.loaded = true;
  const later = S.buffered;
  S.buffered = null;
  pending.events = [];
  current.view?.onReload?.();
  addEvents(later); // only those newer than what the reload returned
  scheduleFlush();
}

// ---------------------------------------------------------------------------------------
// The event stream: fetch + ReadableStream, SSE framing, reconnect with backoff.

async function runStream(gen) {
  let backoff = 1000;
  while (gen === S.gen) {
    try {
      if (!S.loaded) await loadAll(gen);
      if (gen !== S.gen) return;
      const ctrl = new AbortController();
      S.abort = ctrl;
      setConn('connecting');
      const res = await fetch(`/v1/events/stream?since_id=${S.lastEventId}`, {
        headers: { Authorization: `Bearer ${S.token}`, Accept: 'text/event-stream' },
        cache: 'no-store',
        signal: ctrl.signal,
      });
      if (res.status === 401) {
        const msg = await errorText(res);
        if (gen === S.gen) signOut(msg);
        return;
      }
      if (!res.ok) throw new Error(`event stream: ${await errorText(res)}`);
      S.lastData = Date.now();
      setConn('connected');
      backoff = 1000;
      await readSse(res.body, gen);
      if (gen !== S.gen) return;
      setConn('disconnected', 'the stream ended');
    } catch (e) {
      if (gen !== S.gen || e.status === 401) return;
      setConn('disconnected', e.name === 'AbortError' ? 'no data from the controller' : e.message);
    }
    const wait = backoff * (0.8 + Math.random() * 0.4);
    backoff = Math.min(backoff * 2, 15000);
    S.retryAt = Date.now() + wait;
    updateHealth();
    await sleep(wait);
  }
}

async function readSse(body, gen) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  let data = [];
  let type = '';
  const line = (l) => {
    if (l === '') {
      if (data.length) dispatchSse(type || 'message', data.join('\n'));
      data = [];
      type = '';
      return;
    }
    if (l[0] === ':') return; // comment: keep-alive
    const i = l.indexOf(':');
    const field = i < 0 ? l : l.slice(0, i);
    let value = i < 0 ? '' : l.slice(i + 1);
    if (value[0] === ' ') value = value.slice(1);
    if (field === 'data') data.push(value);
    else if (field === 'event') type = value;
    // `id` is carried inside each Event as well; we resume from the last event we applied.
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done || gen !== S.gen) return;
      S.lastData = Date.now();
      // A tick of a large fleet is one long line in many chunks: scan only the new part.
      const scanFrom = Math.max(0, buf.length - 1);
      buf += value;
      const re = /\r\n|\r|\n/g;
      re.lastIndex = scanFrom;
      let pos = 0;
      let m;
      while ((m = re.exec(buf))) {
        if (m[0] === '\r' && m.index === buf.length - 1) break; // maybe half of a \r\n
        line(buf.slice(pos, m.index));
        pos = m.index + m[0].length;
      }
      buf = buf.slice(pos);
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function dispatchSse(type, data) {
  let obj;
  try {
    obj = JSON.parse(data);
  } catch {
    console.warn('unparseable SSE data', type, data.slice(0, 200));
    return;
  }
  if (type === 'event') addEvents([obj]);
  else if (type === 'tick') applyTick(obj);
  else if (type === 'resync') requestResync();
}

// `resync`: we fell behind (or the controller restarted). Reload the fleet and the events;
// a resync that arrives during a reload asks for one more reload after it.
const resyncState = { running: false, again: false };
async function requestResync() {
  if (resyncState.running) {
    resyncState.again = true;
    return;
  }
  resyncState.running = true;
  const gen = S.gen;
  let attempt = 0;
  try {
    do {
      resyncState.again = false;
      try {
        await loadAll(gen);
        attempt = 0;
        $('#banner').hidden = true;
      } catch (e) {
        if (gen !== S.gen || e.status === 401) return;
        showBanner(`Reloading after a resync failed (${e.message}); retrying…`);
        await sleep(Math.min(15000, 1000 * 2 ** attempt++));
        resyncState.again = true;
      }
    } while (resyncState.again && gen === S.gen);
  } finally {
    resyncState.running = false;
  }
}

function setConn(state, detail = '') {
  S.conn = state;
  S.connDetail = detail;
  document.body.classList.toggle('offline', state !== 'connected');
  updateHealth();
}

function updateHealth() {
  const c = $('#health-conn');
  if (!c) return;
  let text;
  if (S.conn === 'connected') text = 'live: event stream connected';
  else if (S.conn === 'connecting') text = 'connecting to the event stream…';
  else {
    const secs = Math.max(0, Math.ceil((S.retryAt - Date.now()) / 1000));
    text = `disconnected${S.connDetail ? ` (${S.connDetail})` : ''}; retrying in ${secs} s`;
  }
  setText(c, text);
  setAttr(c, 'data-conn', S.conn);
  const t = $('#health-tick');
  const age = S.lastTickLocal ? Date.now() - S.lastTickLocal : null;
  setText(t, age == null ? 'no tick yet' : `last tick ${fmtDur(age)} ago`);
  t.classList.toggle('warn', age != null && age > 5000);
  let stale = 0;
  for (const n of S.nodes.values()) if (n.stale) stale++;
  setText($('#health-fleet'), `${nf.format(S.nodes.size)} nodes${stale ? `, ${nf.format(stale)} stale` : ''}`);
}

// Watchdog: the controller sends a tick every second and a keep-alive every 15 s.
setInterval(() => {
  if (S.conn === 'connected' && Date.now() - S.lastData > 40000) S.abort?.abort();
}, 5000);

function showBanner(msg) {
  const b = $('#banner');
  b.replaceChildren(h('span', { text: msg }), h('button', { type: 'button', class: 'ghost', onclick: () => (b.hidden = true), text: 'Dismiss' }));
  b.hidden = false;
}

// ---------------------------------------------------------------------------------------
// Sign-in

function showSignin(message) {
  $('#app').hidden = true;
  $('#signin').hidden = false;
  const err = $('#signin-error');
  err.textContent = message || '';
  err.hidden = !message;
  const input = $('#signin-token');
  input.setAttribute('aria-invalid', message ? 'true' : 'false');
  input.focus();
}

function signOut(message) {
  S.gen++;
  S.abort?.abort();
  S.token = null;
  S.loaded = false;
  S.nodes = new Map();
  S.names = [];
  S.events = [];
  S.lastEventId = 0;
  S.buffered = null;
  S.lastTickLocal = 0;
  S.fleetVersion++;
  T.status = null;
  T.topology = null;
  T.error = null;
  T.fetchedAt = 0;
  T.seq++;
  T.version++;
  pending = { changed: new Set(), structural: false, events: [] };
  sessionStorage.removeItem(TOKEN_KEY);
  current.view?.hide?.();
  for (const v of Object.values(VIEWS)) {
    v.reset?.();
    v.el.hidden = true;
  }
  current.view = null;
  current.key = null;
  showSignin(message);
}

function startSession(token, fleet) {
  S.token = token;
  const gen = ++S.gen;
  sessionStorage.setItem(TOKEN_KEY, token);
  $('#signin').hidden = true;
  $('#app').hidden = false;
  $('#banner').hidden = true;
  if (fleet) applyFleet(fleet);
  route();
  runStream(gen);
}

async function onSigninSubmit(e) {
  e.preventDefault();
  const token = $('#signin-token').value.trim();
  const err = $('#signin-error');
  if (!token) {
    showSignin('Enter the operator token.');
    return;
  }
  const btn = $('#signin-form button[type=submit]');
  btn.disabled = true;
  err.hidden = true;
  try {
    // Check the token with a real call; the server's error text is shown as is.
    const res = await fetch('/v1/telemetry/fleet', { headers: { Authorization: `Bearer ${token}`, Accept: 'application/json' }, cache: 'no-store' });
    if (!res.ok) {
      showSignin(await errorText(res));
      return;
    }
    const fleet = await res.json();
    $('#signin-token').value = '';
    startSession(token, fleet);
  } catch (ex) {
    showSignin(`Cannot reach the controller: ${ex.message}`);
  } finally {
    btn.disabled = false;
  }
}

// ---------------------------------------------------------------------------------------
// Small shared widgets

function badge(state, extra) {
  return h('span', { class: 'badge', 'data-state': state, text: extra ? `${state} ${extra}` : state });
}
function setBadge(el, state) {
  setAttr(el, 'data-state', state);
  setText(el, state);
}

/** A horizontal meter: value/max, with a level class for colour (text is always beside it). */
function meter(cls = '') {
  const fill = h('span', { class: 'fill' });
  const el = h('span', { class: `meter ${cls}`, 'aria-hidden': 'true' }, fill);
  return { el, fill };
}
function setMeter(m, ratio, level) {
  // CSSOM, not a style attribute: the page's CSP has no 'unsafe-inline'.
  const w = `${((ratio == null ? 0 : Math.max(0, Math.min(1, ratio))) * 100).toFixed(1)}%`;
  if (m.fill.style.width !== w) m.fill.style.width = w;
  setAttr(m.el, 'data-level', level || null);
}

function utilLevel(rate, leased, stale, state) {
  if (stale || !(leased > 0) || (state && state !== 'active' && state !== 'partial')) return { level: 'none', ratio: null };
  const r = rate / leased;
  return { level: r >= 0.95 ? 'sat' : r >= 0.7 ? 'high' : 'ok', ratio: r };
}
const UTIL_TEXT = { ok: 'below 70% of the lease', high: '70–95% of the lease', sat: 'at the lease (≥ 95%)', none: 'no lease or stale' };

function field(id, label, opts = {}) {
  const { type = 'text', hint, value, placeholder, required, list, options, readonly, autocomplete = 'off', inputmode } = opts;
  const describedBy = [hint ? `${id}-hint` : null, `${id}-error`].filter(Boolean).join(' ');
  let input;
  if (options) {
    input = h('select', { id, name: id, 'aria-describedby': describedBy, required });
    for (const o of options) input.append(h('option', { value: o.value ?? o, text: o.label ?? o }));
    if (value != null) input.value = value;
  } else {
    input = h('input', { id, name: id, type, value, placeholder, required, list, readonly, autocomplete, inputmode, spellcheck: 'false', 'aria-describedby': describedBy });
  }
  const err = h('p', { class: 'field-error', id: `${id}-error`, hidden: true });
  const wrap = h('div', { class: 'field' }, h('label', { for: id, text: label }), input, hint ? h('p', { class: 'hint', id: `${id}-hint`, text: hint }) : null, err);
  return { wrap, input, err };
}
function fieldError(f, msg) {
  f.err.textContent = msg || '';
  f.err.hidden = !msg;
  f.input.setAttribute('aria-invalid', msg ? 'true' : 'false');
}
function formError(el, msg, status) {
  el.textContent = msg || '';
  el.hidden = !msg;
  setAttr(el, 'data-status', status ?? null);
}

/** The confirmation dialog (a real <dialog>); resolves {ok, reason}. */
function confirmDialog({ title, message, confirmLabel = 'Confirm', reason = false, reasonLabel }) {
  const d = $('#confirm');
  $('#confirm-title').textContent = title;
  $('#confirm-message').textContent = message;
  $('#confirm-ok').textContent = confirmLabel;
  $('#confirm-reason-row').hidden = !reason;
  const r = $('#confirm-reason');
  r.value = '';
  if (reasonLabel) $('#confirm-reason-row label').textContent = reasonLabel;
  return new Promise((resolve) => {
    d.returnValue = '';
    d.addEventListener('close', () => resolve({ ok: d.returnValue === 'ok', reason: r.value.trim() }), { once: true });
    d.showModal();
    (reason ? r : $('#confirm-cancel')).focus();
  });
}

// ---------------------------------------------------------------------------------------
// The lease form: grant (POST /v1/leases) or change (PUT /v1/leases/{id}), same fields and
// the same validation as the CLI; server errors are shown verbatim.

function leaseForm({ prefix, node = null, lease = null, onDone }) {
  const changing = !!lease;
  const t = lease?.terms;
  const form = h('form', { class: 'lease-form', novalidate: true, 'data-form': changing ? 'change' : 'grant' });
  const f = {};
  if (!node && !changing) {
    f.node = field(`${prefix}-node`, 'Node', { options: [{ value: '', label: 'Choose a node…' }], required: true });
    f.node.input.addEventListener('focus', () => fillNodeOptions(f.node.input));
    fillNodeOptions(f.node.input);
  }
  f.scope = field(`${prefix}-scope`, 'Scope', { value: t ? scopeText(t.scope) : 'egress', hint: 'egress (all fabric egress) or peer:NODE', readonly: changing, list: 'nw-scopes' });
  f.rate = field(`${prefix}-rate`, 'Rate', { value: lease ? rateInput(lease.rate_bps ?? t.want_bps) : '', placeholder: '200Mbit', hint: RATE_EXAMPLES, required: true });
  f.burst = field(`${prefix}-burst`, 'Burst (optional)', { value: t ? bytesInput(t.burst_bytes) : '', placeholder: 'default: 10 ms at the rate', hint: BYTES_EXAMPLES });
  f.volume = field(`${prefix}-volume`, 'Volume (optional)', { value: t?.volume_bytes != null ? bytesInput(t.volume_bytes) : '', placeholder: 'no limit', hint: BYTES_EXAMPLES });
  f.ttl = field(`${prefix}-ttl`, 'Lifetime (TTL)', { value: t ? durInput(t.ttl_ms) : '', placeholder: '30s', hint: DURATION_EXAMPLES });
  f.renew = field(`${prefix}-renew`, 'Renew every (optional)', { value: t ? durInput(t.renew_interval_ms) : '', placeholder: 'TTL / 3', hint: DURATION_EXAMPLES });
  f.floor = field(`${prefix}-floor`, 'Floor (optional)', { value: t ? rateInput(t.floor?.rate_bps ?? 0) : '', placeholder: '0 = blocked', hint: 'rate once the lease lapses' });
  const serverErr = h('p', { class: 'form-error', id: `${prefix}-error`, role: 'alert', hidden: true });
  const result = h('p', { class: 'form-ok', id: `${prefix}-result`, role: 'status' });
  const submit = h('button', { type: 'submit', class: 'primary', id: `${prefix}-submit`, text: changing ? 'Save changes' : 'Grant lease' });
  form.append(h('div', { class: 'grid' }, Object.values(f).map((x) => x.wrap)), serverErr, h('div', { class: 'actions' }, submit), result);

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    formError(serverErr, null);
    result.textContent = '';
    for (const x of Object.values(f)) fieldError(x, null);
    const body = {};
    const errs = [];
    const take = (key, fn) => {
      try {
        fn(f[key].input.value.trim());
      } catch (ex) {
        fieldError(f[key], ex.message);
        errs.push(f[key]);
      }
    };
    body.node = node ?? lease?.node;
    if (f.node) take('node', (v) => { if (!v) throw new Error('choose a node'); body.node = v; });
    take('scope', (v) => {
      if (v !== 'egress' && !/^peer:\S+$/.test(v)) throw new Error(`scope must be \`egress\` or \`peer:NODE\`, got \`${v}\``);
      body.scope = v;
    });
    take('rate', (v) => {
      const r = parseRate(v);
      if (r <= 0) throw new Error('rate must be > 0');
      body.rate_bps = r;
    });
    take('burst', (v) => { if (v) body.burst_bytes = parseBytes(v); });
    take('volume', (v) => { if (v) body.volume_bytes = parseBytes(v); });
    take('ttl', (v) => {
      if (!v) return;
      const s = parseDuration(v);
      if (!(s > 0)) throw new Error('the lifetime must be > 0');
      body.ttl_s = s;
    });
    take('renew', (v) => {
      if (!v) return;
      const s = parseDuration(v);
      if (!(s > 0)) throw new Error('the renewal interval must be > 0');
      body.renew_s = s;
    });
    take('floor', (v) => { if (v) body.floor_bps = parseRate(v); });
    if (errs.length) {
      errs[0].input.focus();
      return;
    }
    submit.disabled = true;
    try {
      const l = changing ? await api('PUT', `/v1/leases/${lease.id}`, body) : await api('POST', '/v1/leases', body);
      result.replaceChildren(
        `Lease ${l.id} ${changing ? 'changed' : 'granted'}: ${l.node} ${scopeText(l.terms?.scope)} at ${fmtRate(l.rate_bps)}. `,
        h('a', { href: nodeHref(l.node), text: `Open ${l.node}` }),
      );
      onDone?.(l);
    } catch (ex) {
      formError(serverErr, ex.message, ex.status);
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

let nodeOptionsVersion = new WeakMap();
function fillNodeOptions(select) {
  if (nodeOptionsVersion.get(select) === S.fleetVersion) return;
  nodeOptionsVersion.set(select, S.fleetVersion);
  const keep = select.value;
  const frag = document.createDocumentFragment();
  frag.append(h('option', { value: '', text: 'Choose a node…' }));
  for (const n of S.names) frag.append(h('option', { value: n, text: n }));
  select.replaceChildren(frag);
  select.value = S.nodes.has(keep) ? keep : '';
}

// Datalists shared by the forms (node names for peer scopes and the event filter).
let datalistVersion = -1;
function refreshDatalists() {
  if (datalistVersion === S.fleetVersion) return;
  datalistVersion = S.fleetVersion;
  const scopes = $('#nw-scopes') || document.body.appendChild(h('datalist', { id: 'nw-scopes' }));
  const nodes = $('#nw-nodes') || document.body.appendChild(h('datalist', { id: 'nw-nodes' }));
  const sf = document.createDocumentFragment();
  sf.append(h('option', { value: 'egress' }));
  const nfr = document.createDocumentFragment();
  for (const n of S.names) {
    sf.append(h('option', { value: `peer:${n}` }));
    nfr.append(h('option', { value: n }));
  }
  scopes.replaceChildren(sf);
  nodes.replaceChildren(nfr);
}

// ---------------------------------------------------------------------------------------
// Fleet view

const FLEET_COLS = [
  { key: 'node', label: 'Node', w: 17 },
  { key: 'group', label: 'Group', w: 10 },
  { key: 'state', label: 'State', w: 10 },
  { key: 'leased', label: 'Leased rate', num: true, w: 11 },
  { key: 'measured', label: 'Measured rate', num: true, w: 14 },
  { key: 'volume', label: 'Volume used', w: 16 },
  { key: 'expires', label: 'Expires in', num: true, w: 10 },
  { key: 'age', label: 'Last report', num: true, w: 12 },
];
const STATE_ORDER = Object.fromEntries(['tampered', 'exhausted', 'revoked', 'expired', 'partial', 'pending', 'active', 'none'].map((s, i) => [s, i]));

const fleetView = {
  el: null,
  rows: new Map(),
  order: [],
  sort: { key: 'node', dir: 1 },
  filter: { text: '', state: '' },
  builtVersion: -1,

  mount() {
    this.el = $('#view-fleet');
    const text = h('input', { id: 'fleet-filter', type: 'search', placeholder: 'node or group', autocomplete: 'off', spellcheck: 'false' });
    const state = h('select', { id: 'fleet-state' }, h('option', { value: '', text: 'all states' }), STATES.map((s) => h('option', { value: s, text: s })), h('option', { value: 'stale', text: 'stale agents only' }));
    text.addEventListener('input', () => { this.filter.text = text.value.trim().toLowerCase(); this.apply(true); });
    state.addEventListener('change', () => { this.filter.state = state.value; this.apply(true); });
    this.summary = h('p', { class: 'summary', id: 'fleet-summary' });
    this.count = h('p', { class: 'muted', id: 'fleet-count', role: 'status' });
    this.thead = h('tr');
    for (const c of FLEET_COLS) {
      const btn = h('button', { type: 'button', class: 'sort', 'data-sort': c.key }, c.label, h('span', { class: 'arrow', 'aria-hidden': 'true' }));
      btn.addEventListener('click', () => {
        this.sort = this.sort.key === c.key ? { key: c.key, dir: -this.sort.dir } : { key: c.key, dir: 1 };
        this.apply(true);
      });
      this.thead.append(h('th', { scope: 'col', class: c.num ? 'num' : null, 'data-col': c.key }, btn));
    }
    this.tbody = h('tbody');
    this.empty = h('p', { class: 'empty', hidden: true, text: 'No node matches the filter.' });
    this.el.append(
      h('div', { class: 'view-head' }, h('h1', { id: 'fleet-title', text: 'Fleet' }), this.summary),
      h('div', { class: 'toolbar', role: 'search' },
        h('div', { class: 'field inline' }, h('label', { for: 'fleet-filter', text: 'Filter' }), text),
        h('div', { class: 'field inline' }, h('label', { for: 'fleet-state', text: 'State' }), state),
        this.count),
      // Fixed layout with set column widths: a changed cell never re-measures 1,000 rows.
      this.wrap = h('div', { class: 'table-wrap fleet-wrap' }, h('table', { class: 'fleet', id: 'fleet-table' },
        h('caption', { class: 'sr-only', text: 'Nodes, their lease state and live rates. Click a column header to sort.' }),
        h('colgroup', {}, FLEET_COLS.map((c) => h('col', { class: `w${c.w}` }))),
        h('thead', {}, this.thead), this.tbody)),
      this.empty,
    );
    rowObserver = new IntersectionObserver(onRowsIntersect, { root: this.wrap, rootMargin: '600px 0px' });
    this.summary.addEventListener('click', (e) => {
      const b = e.target.closest('button[data-filter-state]');
      if (!b) return;
      state.value = b.dataset.filterState;
      this.filter.state = state.value;
      this.apply(true);
    });
    this.textInput = text;
    this.stateSelect = state;
  },
  reset() {
    for (const row of this.rows.values()) row.drop();
    this.rows.clear();
    this.order = [];
    this.tbody?.replaceChildren();
    this.builtVersion = -1;
  },
  show() {
    this.sync();
    for (const [name, row] of this.rows) row.update(S.nodes.get(name));
    this.apply(true);
    this.onSecond();
  },
  onReload() { this.show(); },
  onFleet() { this.show(); },
  onTick(changed) {
    for (const name of changed) this.rows.get(name)?.update(S.nodes.get(name));
    this.apply(false, changed);
    this.onSecond();
  },
  onSecond() {
    const now = serverNow();
    for (const row of this.rows.values()) if (row.visible) row.second(now);
  },

  sync() {
    if (this.builtVersion === S.fleetVersion) return;
    this.builtVersion = S.fleetVersion;
    for (const [name, row] of this.rows) {
      if (!S.nodes.has(name)) {
        row.drop();
        this.rows.delete(name);
      }
    }
    for (const name of S.names) if (!this.rows.has(name)) this.rows.set(name, new FleetRow(name));
    this.order = [];
  },

  key(n) {
    switch (this.sort.key) {
      case 'group': return n.group;
      case 'state': return STATE_ORDER[n.state] ?? 99;
      case 'leased': return n.leased_bps ?? 0;
      case 'measured': return n.rate_bps ?? 0;
      case 'volume': return n.volume_bytes ? (n.used_bytes ?? 0) / n.volume_bytes : -1;
      case 'expires': return n.deadline ?? Infinity;
      case 'age': return n.last_report_unix_ms != null ? -n.last_report_unix_ms : Infinity;
      default: return null;
    }
  },

  matches(n) {
    const f = this.filter;
    if (f.state === 'stale' ? !n.stale : f.state && n.state !== f.state) return false;
    return !f.text || n.node.toLowerCase().includes(f.text) || (n.group || '').toLowerCase().includes(f.text);
  },

  /** Sorts and filters. Only moves rows when the order changed; only flips `hidden` when needed. */
  apply(full, changed) {
    const dir = this.sort.dir;
    const names = S.names.filter((n) => this.rows.has(n));
    const key = this.sort.key === 'node' ? null : (n) => this.key(S.nodes.get(n));
    let sorted;
    if (!key) sorted = dir === 1 ? names : names.slice().reverse();
    else {
      const keyed = names.map((n) => [key(n), n]);
      keyed.sort((a, b) => {
        const c = typeof a[0] === 'string' ? collator.compare(a[0], b[0]) : a[0] === b[0] ? 0 : a[0] < b[0] ? -1 : 1;
        return c * dir || collator.compare(a[1], b[1]);
      });
      sorted = keyed.map((x) => x[1]);
    }
    let same = sorted.length === this.order.length;
    for (let i = 0; same && i < sorted.length; i++) if (sorted[i] !== this.order[i]) same = false;
    if (!same) {
      const frag = document.createDocumentFragment();
      for (const n of sorted) frag.append(this.rows.get(n).tr);
      this.tbody.append(frag);
      this.order = sorted;
    }
    const check = full || !changed ? sorted : [...changed];
    for (const n of check) {
      const row = this.rows.get(n);
      const node = S.nodes.get(n);
      if (!row || !node) continue;
      const show = this.matches(node);
      if (row.tr.hidden === show) row.tr.hidden = !show;
    }
    let visible = 0;
    for (const row of this.rows.values()) if (!row.tr.hidden) visible++;
    setText(this.count, `Showing ${nf.format(visible)} of ${nf.format(this.rows.size)} nodes`);
    this.empty.hidden = visible > 0 || this.rows.size === 0;
    for (const th of this.thead.children) {
      const k = th.dataset.col;
      setAttr(th, 'aria-sort', k === this.sort.key ? (this.sort.dir === 1 ? 'ascending' : 'descending') : null);
      setText(th.querySelector('.arrow'), k === this.sort.key ? (this.sort.dir === 1 ? ' ▲' : ' ▼') : '');
    }
    this.renderSummary();
  },

  renderSummary() {
    const counts = {};
    let stale = 0;
    for (const n of S.nodes.values()) {
      counts[n.state] = (counts[n.state] || 0) + 1;
      if (n.stale) stale++;
    }
    const key = JSON.stringify([counts, stale, S.nodes.size]);
    if (this.summaryKey === key) return;
    this.summaryKey = key;
    const parts = [h('span', { text: `${nf.format(S.nodes.size)} nodes` })];
    for (const s of STATES) if (counts[s]) parts.push(h('button', { type: 'button', class: 'chip', 'data-filter-state': s, title: `Show only ${s} nodes` }, badge(s), ` ${nf.format(counts[s])}`));
    if (stale) parts.push(h('button', { type: 'button', class: 'chip', 'data-filter-state': 'stale', title: 'Show only stale agents' }, h('span', { class: 'badge stale-badge', text: 'stale' }), ` ${nf.format(stale)}`));
    this.summary.replaceChildren(...parts);
  },
};

// Every node has a row in the DOM (sorting, filtering and find-in-page stay simple), but
// only rows near the viewport get their text and bars written on a tick; the others keep
// their data attributes current and are marked dirty until they scroll into view. That
// keeps a tick of 1,000 nodes from re-laying out 1,000 rows.
let rowObserver = null; // created by fleetView.mount(), rooted at the table's scroller
function onRowsIntersect(entries) {
  const now = serverNow();
  for (const e of entries) {
    const row = e.target.nwRow;
    if (!row) continue;
    row.visible = e.isIntersecting;
    if (row.visible) {
      if (row.dirty) row.render();
      row.second(now);
    }
  }
}

class FleetRow {
  constructor(name) {
    this.name = name;
    this.visible = false;
    this.dirty = true;
    const c = () => h('td');
    this.link = h('a', { href: nodeHref(name), text: name });
    this.staleBadge = h('span', { class: 'badge stale-badge', text: 'stale', hidden: true });
    this.group = c();
    this.state = h('span', { class: 'badge', 'data-state': 'none', text: '' });
    this.leased = h('td', { class: 'num' });
    this.rateText = h('span', { class: 'num-text' });
    this.rateMeter = meter();
    this.volText = h('span', { class: 'num-text' });
    this.volMeter = meter('vol');
    this.expires = h('td', { class: 'num' });
    this.age = h('td', { class: 'num' });
    this.tr = h('tr', { 'data-node': name },
      h('th', { scope: 'row', class: 'node' }, this.link, ' ', this.staleBadge),
      this.group,
      h('td', {}, this.state),
      this.leased,
      h('td', { class: 'num rate' }, h('span', { class: 'cell-meter' }, this.rateText, this.rateMeter.el)),
      h('td', { class: 'vol' }, h('span', { class: 'cell-meter' }, this.volText, this.volMeter.el)),
      this.expires,
      this.age);
    this.tr.nwRow = this;
    this.rateCell = this.rateText.parentNode.parentNode;
    rowObserver.observe(this.tr);
  }
  drop() {
    rowObserver.unobserve(this.tr);
    this.tr.remove();
  }
  update(n) {
    if (!n) return;
    this.n = n;
    // Machine-readable attributes are cheap (no CSS reads them): always current.
    setAttr(this.tr, 'data-state', n.state);
    setAttr(this.tr, 'data-stale', n.stale ? 'true' : 'false');
    setAttr(this.rateCell, 'data-bps', n.rate_bps ?? 0);
    setAttr(this.leased, 'data-bps', n.leased_bps ?? 0);
    setAttr(this.age, 'data-last-report-ms', n.last_report_unix_ms ?? null);
    if (this.visible) this.render();
    else this.dirty = true;
  }
  render() {
    const n = this.n;
    if (!n) return;
    this.dirty = false;
    setText(this.group, n.group ?? '');
    setBadge(this.state, n.state);
    const stale = !!n.stale;
    if (this.tr.classList.contains('stale') !== stale) this.tr.classList.toggle('stale', stale);
    this.staleBadge.hidden = !stale;
    setAttr(this.staleBadge, 'title', !n.connected ? 'agent not connected' : 'no report within the stale window');
    setText(this.leased, n.leased_bps ? fmtRate(n.leased_bps) : '—');
    setText(this.rateText, fmtRate(n.rate_bps ?? 0));
    const u = utilLevel(n.rate_bps ?? 0, n.leased_bps, false, null);
    setMeter(this.rateMeter, u.ratio, u.level);
    setAttr(this.rateText.parentNode, 'title', n.leased_bps ? `${fmtPct(u.ratio)} of the leased rate` : 'no active lease');
    if (n.volume_bytes != null) {
      const r = n.volume_bytes > 0 ? (n.used_bytes ?? 0) / n.volume_bytes : 1;
      setText(this.volText, `${fmtBytes(n.used_bytes ?? 0)} / ${fmtBytes(n.volume_bytes)}`);
      setMeter(this.volMeter, r, r >= 1 ? 'sat' : r >= 0.9 ? 'high' : 'ok');
      setAttr(this.volText.parentNode, 'title', `${fmtPct(r)} used, ${fmtBytes(Math.max(0, n.volume_bytes - (n.used_bytes ?? 0)))} left`);
      this.volMeter.el.hidden = false;
    } else {
      setText(this.volText, 'no limit');
      this.volMeter.el.hidden = true;
    }
    this.second(serverNow());
  }
  second(now) {
    const n = this.n;
    if (!n || !this.visible || this.dirty) return;
    setText(this.expires, n.deadline != null ? fmtDur(n.deadline - now) : '—');
    const age = n.last_report_unix_ms != null ? now - n.last_report_unix_ms : null;
    setText(this.age, age != null ? `${fmtDur(age)} ago` : 'never');
    if (this.age.classList.contains('warn') !== !!n.stale) this.age.classList.toggle('warn', !!n.stale);
  }
}

// ---------------------------------------------------------------------------------------
// Charts: hand-written SVG. A line for the measured rate, step lines for lease and floor.
//
// Three ranges. "5 min" and "1 hour" draw the 1-second points: the history from
// /v1/telemetry/series (step=1s) plus one point per tick, kept for an hour whatever the
// range, so switching between the two costs at most one fetch. "24 hours" draws the
// per-minute store (step=1m): the mean per minute as the line, the highest second of each
// minute as a lighter band above it; it is refetched once a minute, not redrawn per tick.
// Long series are decimated to the plot's width in pixels (the lowest and the highest
// point of each pixel column), so a path has at most ~2 points per column.

const CW = 720;
const CH = 220;
const CM = { l: 52, r: 14, t: 24, b: 26 };
const HOUR = 3600000;
const RANGES = {
  '5m': { label: '5 min', what: 'the last 5 minutes', windowMs: 5 * 60000, step: '1s', stepMs: 1000, tickMs: 60000, seconds: true,
    note: '1-second points, live' },
  '1h': { label: '1 hour', what: 'the last hour', windowMs: HOUR, step: '1s', stepMs: 1000, tickMs: 10 * 60000, seconds: false,
    note: '1-second points, live' },
  '24h': { label: '24 hours', what: 'the last 24 hours', windowMs: 24 * HOUR, step: '1m', stepMs: 60000, tickMs: 3 * HOUR, seconds: false,
    note: '1-minute points: the mean, and the peak second as a band; refreshed every minute' },
};
const DEFAULT_RANGE = '5m';
const LIVE_KEEP_MS = HOUR + 10000; // 1-second points kept per scope (the longest live range)
/** Consecutive points further apart than this break the line (missed reports). */
const gapMs = (stepMs) => (stepMs >= 60000 ? stepMs * 1.5 : stepMs * 3.5);

function niceStep(range, n) {
  const raw = range / n;
  const p = 10 ** Math.floor(Math.log10(raw));
  const f = raw / p;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10) * p;
}
function rateUnit(max) {
  for (const [u, name] of [[1e12, 'Tbit/s'], [1e9, 'Gbit/s'], [1e6, 'Mbit/s'], [1e3, 'kbit/s']]) if (max >= u) return [u, name];
  return [1, 'bit/s'];
}
/** The first index whose t is >= x (t ascending). */
function lowerBound(t, x) {
  let lo = 0;
  let hi = t.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (t[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** The points of `t` within [from, to] as runs without gaps, each run a list of pixel
 *  columns `colMs` wide: [{i0, i1}] (index ranges, i1 exclusive). */
function columns(t, from, to, colMs, gap) {
  const runs = [];
  let run = null;
  let col = null;
  let prev = -Infinity;
  for (let i = lowerBound(t, from); i < t.length && t[i] <= to; i++) {
    const c = Math.floor((t[i] - from) / colMs);
    if (!run || t[i] - prev > gap) {
      run = [];
      runs.push(run);
      col = null;
    }
    if (col && col.c === c) col.i1 = i + 1;
    else {
      col = { c, i0: i, i1: i + 1 };
      run.push(col);
    }
    prev = t[i];
  }
  return runs;
}
function argExt(v, col, max) {
  let k = col.i0;
  for (let i = col.i0 + 1; i < col.i1; i++) if (max ? v[i] > v[k] : v[i] < v[k]) k = i;
  return k;
}
/** A line through the lowest and the highest point of each column, in time order; a lone
 *  point becomes a short dash so that it shows. `mode`: 'minmax', 'max' or 'min'. */
function linePath(runs, t, v, X, Y, mode = 'minmax') {
  let d = '';
  const pt = (i) => `${X(t[i]).toFixed(1)},${Y(v[i]).toFixed(1)}`;
  for (const run of runs) {
    const idx = [];
    for (const col of run) {
      if (col.i1 - col.i0 === 1) idx.push(col.i0);
      else if (mode !== 'minmax') idx.push(argExt(v, col, mode === 'max'));
      else {
        const lo = argExt(v, col, false);
        const hi = argExt(v, col, true);
        if (lo === hi) idx.push(lo);
        else idx.push(Math.min(lo, hi), Math.max(lo, hi));
      }
    }
    if (idx.length === 1) d += `M${(X(t[idx[0]]) - 1.5).toFixed(1)},${Y(v[idx[0]]).toFixed(1)}h3`;
    else for (let k = 0; k < idx.length; k++) d += `${k ? 'L' : 'M'}${pt(idx[k])}`;
  }
  return d;
}
/** A closed area per run between the column minima of `lo` and the column maxima of `hi`. */
function bandPath(runs, t, lo, hi, X, Y) {
  let d = '';
  for (const run of runs) {
    if (run.length < 2) continue;
    const top = run.map((col) => argExt(hi, col, true));
    const bottom = run.map((col) => argExt(lo, col, false)).reverse();
    d += `M${top.map((i) => `${X(t[i]).toFixed(1)},${Y(hi[i]).toFixed(1)}`).join('L')}`;
    d += `L${bottom.map((i) => `${X(t[i]).toFixed(1)},${Y(lo[i]).toFixed(1)}`).join('L')}Z`;
  }
  return d;
}
/** The step line of `key` over [x0, x1]: each entry holds until the next one's t. */
function stepPath(leased, key, x0, x1, X, Y) {
  let d = '';
  for (let i = 0; i < leased.length; i++) {
    const a = Math.max(leased[i].t, x0);
    const b = Math.min(i + 1 < leased.length ? leased[i + 1].t : x1, x1);
    if (b < x0 || a > x1) continue;
    const y = Y(leased[i][key]).toFixed(1);
    d += `${d ? 'L' : 'M'}${X(a).toFixed(1)},${y}L${X(b).toFixed(1)},${y}`;
  }
  return d;
}
/** Tick times within [x0, x1], `tickMs` apart, on round local times. */
function timeTicks(x0, x1, tickMs) {
  const tz = new Date(x0).getTimezoneOffset() * 60000;
  const out = [];
  for (let t = Math.ceil((x0 - tz) / tickMs) * tickMs + tz; t <= x1; t += tickMs) out.push(t);
  return out;
}
function fmtTick(ms, seconds) {
  const d = new Date(ms);
  return seconds ? fmtClock(ms) : `${pad2(d.getHours())}:${pad2(d.getMinutes())}`;
}

class Chart {
  constructor(scope) {
    this.scope = scope;
    // 1-second points (the live ranges); t is the end of the interval a point measures.
    this.t = [];
    this.v = [];
    this.leased = []; // [{t, leased_bps, floor_bps}]
    // Per-minute points (24 hours): {t, v (mean), peak, leased, now}, null until loaded.
    this.m = null;
    this.mVersion = 0;
    this.drawn = null; // what the SVG shows, for the ranges that do not redraw per tick
    this.svg = document.createElementNS(SVGNS, 'svg');
    this.svg.setAttribute('viewBox', `0 0 ${CW} ${CH}`);
    this.svg.setAttribute('role', 'img');
    this.svg.setAttribute('class', 'chart-svg');
    this.title = h('h3', { text: scope });
    this.legendVals = { measured: h('span'), peak: h('span'), leased: h('span'), floor: h('span') };
    this.measuredLabel = h('span', { class: 'label', text: 'measured' });
    this.peakItem = h('li', { hidden: true }, h('span', { class: 'swatch peak', 'aria-hidden': 'true' }), 'peak ', this.legendVals.peak);
    this.gaugeText = h('span', { class: 'num-text' });
    this.gaugeMeter = meter('vol');
    this.stateBadge = badge('none');
    this.el = h('figure', { class: 'chart', 'data-scope': scope },
      h('figcaption', {}, this.title, this.stateBadge,
        h('span', { class: 'gauge', title: 'volume used of granted' }, h('span', { class: 'muted', text: 'volume ' }), this.gaugeText, this.gaugeMeter.el)),
      this.svg,
      h('ul', { class: 'legend' },
        h('li', {}, h('span', { class: 'swatch measured', 'aria-hidden': 'true' }), this.measuredLabel, ' ', this.legendVals.measured),
        this.peakItem,
        h('li', {}, h('span', { class: 'swatch leased', 'aria-hidden': 'true' }), 'leased ', this.legendVals.leased),
        h('li', {}, h('span', { class: 'swatch floor', 'aria-hidden': 'true' }), 'floor ', this.legendVals.floor)));
  }
  /** Appends a measured point at `t` (the end of the interval it measures). */
  push(t, v) {
    const last = this.t.length ? this.t[this.t.length - 1] : -Infinity;
    if (!(t > last)) return;
    this.t.push(t);
    this.v.push(v);
    // The live ranges trim when they draw; the day view does not draw per tick.
    if (t - this.t[0] > LIVE_KEEP_MS + 60000) this.trim(t);
  }
  pushLeased(t, leased_bps, floor_bps) {
    const last = this.leased[this.leased.length - 1];
    if (last && last.leased_bps === leased_bps && last.floor_bps === floor_bps) return;
    if (last && t < last.t) return;
    this.leased.push({ t, leased_bps, floor_bps });
  }
  /** Merges 1-second history from /v1/telemetry/series under what is already here (what
   *  ticks brought, or a shorter history): only what is older than the oldest point. */
  history(series, stepMs) {
    const firstLive = this.t.length ? this.t[0] : Infinity;
    const t = [];
    const v = [];
    for (let i = 0; i < series.t.length; i++) {
      const te = series.t[i] + stepMs;
      if (te < firstLive) {
        t.push(te);
        v.push(series.rate_bps[i]);
      }
    }
    if (t.length) {
      this.t = t.concat(this.t);
      this.v = v.concat(this.v);
    }
    const firstLeased = this.leased.length ? this.leased[0].t : Infinity;
    const hist = (series.leased || []).filter((l) => l.t < firstLeased).map((l) => ({ t: l.t, leased_bps: l.leased_bps ?? 0, floor_bps: l.floor_bps ?? 0 }));
    if (hist.length) this.leased = hist.concat(this.leased);
  }
  /** Replaces the per-minute series (a step=1m answer for this scope, or null: none). */
  minutes(series, stepMs, now) {
    const n = series ? series.t.length : 0;
    this.m = {
      t: n ? series.t.map((x) => x + stepMs) : [],
      v: n ? series.rate_bps : [],
      peak: n ? (series.peak_rate_bps?.length === n ? series.peak_rate_bps : series.rate_bps) : [],
      leased: (series?.leased || []).map((l) => ({ t: l.t, leased_bps: l.leased_bps ?? 0, floor_bps: l.floor_bps ?? 0 })),
      now,
    };
    this.mVersion++;
  }
  trim(now) {
    const cut = now - LIVE_KEEP_MS;
    const i = Math.min(lowerBound(this.t, cut), Math.max(0, this.t.length - 1));
    if (i) {
      this.t.splice(0, i);
      this.v.splice(0, i);
    }
    let j = 0;
    while (j < this.leased.length - 1 && this.leased[j + 1].t <= cut) j++;
    if (j) this.leased.splice(0, j);
  }
  update(scopeNow) {
    if (scopeNow) {
      setBadge(this.stateBadge, scopeNow.state);
      if (scopeNow.volume_bytes != null) {
        const r = scopeNow.volume_bytes > 0 ? (scopeNow.used_bytes ?? 0) / scopeNow.volume_bytes : 1;
        setText(this.gaugeText, `${fmtBytes(scopeNow.used_bytes ?? 0)} of ${fmtBytes(scopeNow.volume_bytes)} (${fmtPct(r)})`);
        setMeter(this.gaugeMeter, r, r >= 1 ? 'sat' : r >= 0.9 ? 'high' : 'ok');
        this.gaugeMeter.el.hidden = false;
      } else {
        setText(this.gaugeText, `no limit, ${fmtBytes(scopeNow.bytes ?? 0)} sent`);
        this.gaugeMeter.el.hidden = true;
      }
    }
  }
  /** Draws `range` ('5m', '1h', '24h'). `px`: the SVG's width in CSS pixels (0: unknown);
   *  `loading`: the per-minute series is being fetched; `error`: fetching it failed. */
  render(range, px, { loading = false, error = null } = {}) {
    const R = RANGES[range] || RANGES[DEFAULT_RANGE];
    const perMinute = R.step === '1m';
    const cols = Math.max(60, Math.round(((CW - CM.l - CM.r) / CW) * (px > 0 ? px : CW)));
    if (perMinute) {
      // Redrawn when new minutes arrive or the width changes, not on every tick.
      const key = `${range}|${this.mVersion}|${cols}|${this.m ? '' : `${loading}|${error}`}`;
      if (this.drawn === key) return;
      this.drawn = key;
    } else {
      this.drawn = null;
    }
    let t, v, peak, leased, now;
    if (perMinute) {
      const m = this.m || { t: [], v: [], peak: [], leased: [], now: serverNow() };
      ({ t, v, peak, leased, now } = m);
    } else {
      now = Math.max(serverNow(), this.t.length ? this.t[this.t.length - 1] : 0);
      this.trim(now);
      ({ t, v, leased } = this);
    }
    const x0 = now - R.windowMs;
    const iw = CW - CM.l - CM.r;
    const ih = CH - CM.t - CM.b;
    const runs = columns(t, x0, now, R.windowMs / cols, gapMs(R.stepMs));
    let max = 0;
    for (const run of runs) for (const col of run) {
      const top = perMinute ? peak : v;
      for (let i = col.i0; i < col.i1; i++) if (top[i] > max) max = top[i];
    }
    for (let i = 0; i < leased.length; i++) {
      const end = i + 1 < leased.length ? leased[i + 1].t : now;
      if (end >= x0) max = Math.max(max, leased[i].leased_bps, leased[i].floor_bps);
    }
    if (!(max > 0)) max = 1e6;
    const step = niceStep(max * 1.08, 4);
    const ymax = Math.ceil((max * 1.08) / step) * step;
    const [unit, unitName] = rateUnit(ymax);
    const X = (x) => CM.l + ((x - x0) / R.windowMs) * iw;
    const Y = (y) => CM.t + ih - (Math.min(y, ymax) / ymax) * ih;
    const parts = [];
    // y grid and labels
    for (let y = 0; y <= ymax + step / 2; y += step) {
      const yy = Y(y).toFixed(1);
      parts.push(`<line class="grid" x1="${CM.l}" x2="${CW - CM.r}" y1="${yy}" y2="${yy}"/>`);
      parts.push(`<text class="tick" x="${CM.l - 6}" y="${yy}" text-anchor="end" dominant-baseline="middle">${esc(+(y / unit).toPrecision(4))}</text>`);
    }
    parts.push(`<text class="axis-title" x="${CM.l - 6}" y="${CM.t - 14}" text-anchor="end" dominant-baseline="middle">${unitName}</text>`);
    // x ticks on round local times: HH:MM:SS for 5 minutes, HH:MM beyond
    for (const tt of timeTicks(x0, now, R.tickMs)) {
      const x = X(tt);
      parts.push(`<line class="grid v" x1="${x.toFixed(1)}" x2="${x.toFixed(1)}" y1="${CM.t}" y2="${CM.t + ih}"/>`);
      if (x - CM.l > 14 && CW - x > 20) parts.push(`<text class="tick" x="${x.toFixed(1)}" y="${CH - 8}" text-anchor="middle">${fmtTick(tt, R.seconds)}</text>`);
    }
    parts.push(`<line class="axis" x1="${CM.l}" x2="${CW - CM.r}" y1="${CM.t + ih}" y2="${CM.t + ih}"/>`);
    parts.push(`<line class="axis" x1="${CM.l}" x2="${CM.l}" y1="${CM.t}" y2="${CM.t + ih}"/>`);
    // per minute: the peak second as a band above the mean, and its upper edge
    if (perMinute) {
      parts.push(`<path class="band peak" d="${bandPath(runs, t, v, peak, X, Y)}"/>`);
      parts.push(`<path class="line peak" d="${linePath(runs, t, peak, X, Y, 'max')}"/>`);
    }
    // measured (the mean per minute), broken where reports are missing
    parts.push(`<path class="line measured" d="${linePath(runs, t, v, X, Y)}"/>`);
    // The lease and the floor on top: a fully used lease must not hide its own line.
    parts.push(`<path class="line floor" d="${stepPath(leased, 'floor_bps', x0, now, X, Y)}"/>`);
    parts.push(`<path class="line leased" d="${stepPath(leased, 'leased_bps', x0, now, X, Y)}"/>`);
    const lastRun = runs[runs.length - 1];
    const li = lastRun ? lastRun[lastRun.length - 1].i1 - 1 : -1; // the latest point in the window
    if (li >= 0) parts.push(`<circle class="dot measured" cx="${X(t[li]).toFixed(1)}" cy="${Y(v[li]).toFixed(1)}" r="3"/>`);
    let empty = null;
    if (li < 0) {
      if (perMinute && !this.m && loading) empty = 'Loading the per-minute data…';
      else if (perMinute && !this.m && error) empty = `No per-minute data: ${error}`;
      else if (perMinute && (this.t.length || !this.m)) empty = 'No per-minute data yet: minutes are stored as they end';
      else empty = `No data in ${R.what}`;
      parts.push(`<text class="nodata" x="${CM.l + iw / 2}" y="${CM.t + ih / 2}" text-anchor="middle" dominant-baseline="middle">${esc(empty)}</text>`);
    }
    this.svg.innerHTML = parts.join('');
    const last = leased[leased.length - 1];
    const latest = li >= 0 ? v[li] : null;
    setText(this.measuredLabel, perMinute ? 'measured (mean)' : 'measured');
    this.peakItem.hidden = !perMinute;
    setText(this.legendVals.measured, latest != null ? fmtRate(latest) : '—');
    setText(this.legendVals.peak, li >= 0 && perMinute ? fmtRate(peak[li]) : '—');
    setText(this.legendVals.leased, last ? fmtRate(last.leased_bps) : '—');
    setText(this.legendVals.floor, last ? fmtRate(last.floor_bps) : '—');
    setAttr(this.el, 'data-range', range);
    setAttr(this.el, 'data-step-ms', R.stepMs);
    setAttr(this.el, 'data-empty', empty ? 'true' : 'false');
    setAttr(this.el, 'data-latest-rate-bps', latest);
    setAttr(this.el, 'data-latest-t', li >= 0 ? t[li] : null);
    setAttr(this.el, 'data-leased-bps', last ? last.leased_bps : null);
    const what = perMinute ? 'mean rate per minute' : 'measured rate';
    setAttr(this.svg, 'aria-label', `${this.scope}: ${what} over ${R.what}, ${empty ? empty.toLowerCase() : `latest ${fmtRate(latest)}`}; leased ${last ? fmtRate(last.leased_bps) : 'none'}; floor ${last ? fmtRate(last.floor_bps) : 'none'}`);
  }
}

// ---------------------------------------------------------------------------------------
// Node view

const nodeView = {
  el: null,
  usesTopology: true, // the "Link probes" line
  name: null,
  charts: new Map(),
  leases: [],
  watching: null,
  range: DEFAULT_RANGE, // kept while the tab lives: the next node opens in the same range
  hourLoaded: false, // the 1-hour 1-second history was fetched (or is being fetched)
  minuteSeq: 0, // bumped per per-minute fetch: an older answer is dropped
  minuteLoading: false,
  minuteError: null,
  minuteTimer: null,
  resizeObs: null,

  mount() {
    this.el = $('#view-node');
  },
  reset() {
    this.stopCharts();
    this.name = null;
    this.watching = null;
    this.charts.clear();
    this.el?.replaceChildren();
  },
  /** Stops the per-minute refresh and the resize observer (leaving the view). */
  stopCharts() {
    clearTimeout(this.minuteTimer);
    this.minuteTimer = null;
    this.minuteSeq++;
    this.minuteLoading = false;
    this.minuteError = null;
    this.hourLoaded = false;
    this.resizeObs?.disconnect();
    this.resizeObs = null;
  },
  ingest(t, n) {
    if (n.node !== this.watching) return;
    for (const s of n.scopes || []) {
      const c = this.chart(s.scope);
      c.push(t, s.rate_bps ?? 0);
      c.pushLeased(t, s.leased_bps ?? 0, s.floor_bps ?? 0);
    }
  },
  chart(scope) {
    let c = this.charts.get(scope);
    if (!c) {
      c = new Chart(scope);
      this.charts.set(scope, c);
      this.chartsDirty = true;
    }
    return c;
  },

  show({ name }) {
    if (!T.loading) loadTopology();
    if (name === this.name && this.el.firstChild) {
      this.refreshAll();
      return;
    }
    this.reset();
    this.name = name;
    this.watching = name;
    this.build();
    this.refreshAll();
    this.loadSeries(this.range === '1h' ? '1h' : '5m');
    if (this.range === '24h') this.loadMinutes();
    this.loadLeases();
    this.loadEvents();
  },
  hide() {
    // Stop collecting points; the next visit rebuilds from a fresh history.
    this.stopCharts();
    this.watching = null;
    this.name = null;
  },

  build() {
    const name = this.name;
    this.head = {
      state: badge('none'),
      stale: h('span', { class: 'badge stale-badge', text: 'stale', hidden: true }),
      group: h('dd'), connected: h('dd'), report: h('dd'), leased: h('dd'), measured: h('dd'), volume: h('dd'), expires: h('dd'),
    };
    const hd = this.head;
    this.portsText = h('span', { id: 'node-ports-text' });
    this.portsFind = h('a', { href: '#/topology', id: 'node-ports-findings' });
    this.portsFindWrap = h('span', { hidden: true }, ' · ', this.portsFind);
    this.ports = h('p', { class: 'hint node-ports', id: 'node-ports', hidden: true }, h('strong', { text: 'Link probes: ' }), this.portsText, this.portsFindWrap);
    this.msg = h('p', { class: 'form-ok', id: 'node-msg', role: 'status' });
    this.err = h('p', { class: 'form-error', id: 'node-error', role: 'alert', hidden: true });
    this.chartsEl = h('div', { class: 'charts', id: 'node-charts' });
    this.noCharts = h('p', { class: 'empty', text: 'No scope has reported yet.' });
    this.chartsTitle = h('h2', { id: 'node-charts-title' });
    this.rangeNote = h('span', { class: 'hint', id: 'node-range-note' });
    this.rangeButtons = Object.entries(RANGES).map(([key, r]) =>
      h('button', { type: 'button', 'data-range': key, text: r.label, onclick: () => this.setRange(key) }));
    const rangeGroup = h('div', { class: 'seg', role: 'group', id: 'node-range', 'aria-label': 'Chart range' }, this.rangeButtons);
    this.showRange();
    this.resizeObs = new ResizeObserver(() => throttle('node-charts-resize', 150, () => this.name && this.renderCharts()));
    this.resizeObs.observe(this.chartsEl);
    this.leaseBody = h('tbody', { id: 'node-leases' });
    this.eventBody = h('tbody', { id: 'node-events' });
    const grant = h('details', { class: 'card', id: 'node-grant' }, h('summary', { text: `Grant a lease to ${name}` }),
      leaseForm({ prefix: 'ngrant', node: name, onDone: () => this.loadLeases() }));
    const remove = h('button', { type: 'button', class: 'danger ghost', id: 'node-remove', text: 'Remove node…' });
    remove.addEventListener('click', () => this.removeNode());
    this.el.replaceChildren(
      h('p', { class: 'crumbs' }, h('a', { href: '#/fleet', text: 'Fleet' }), ' / ', name),
      h('div', { class: 'view-head' }, h('h1', { id: 'node-title', 'data-node': name }, name), hd.state, hd.stale, h('span', { class: 'spacer' }), remove),
      h('dl', { class: 'facts' },
        h('div', {}, h('dt', { text: 'Group' }), hd.group),
        h('div', {}, h('dt', { text: 'Agent' }), hd.connected),
        h('div', {}, h('dt', { text: 'Last report' }), hd.report),
        h('div', {}, h('dt', { text: 'Leased' }), hd.leased),
        h('div', {}, h('dt', { text: 'Measured' }), hd.measured),
        h('div', {}, h('dt', { text: 'Volume' }), hd.volume),
        h('div', {}, h('dt', { text: 'Expires in' }), hd.expires)),
      this.ports,
      this.msg, this.err,
      h('div', { class: 'chart-head' }, this.chartsTitle, rangeGroup, this.rangeNote), this.chartsEl, this.noCharts,
      h('h2', { text: 'Leases' }),
      h('div', { class: 'table-wrap' }, h('table', { class: 'leases' },
        h('thead', {}, h('tr', {}, ['Lease', 'Scope', 'State', 'Rate', 'Burst', 'Volume', 'TTL / renew', 'Renewals', 'Issued', 'Expires in', 'Actions'].map((c, i) => h('th', { scope: 'col', class: [0, 3, 4, 5, 6, 7, 9].includes(i) ? 'num' : null, text: c })))),
        this.leaseBody)),
      grant,
      h('h2', { text: 'Events' }),
      h('div', { class: 'table-wrap' }, h('table', { class: 'events' },
        h('thead', {}, h('tr', {}, ['Time', 'Severity', 'Kind', 'Message'].map((c) => h('th', { scope: 'col', text: c })))),
        this.eventBody)),
    );
    this.leaseBody.addEventListener('click', (e) => {
      const b = e.target.closest('button[data-action]');
      if (b) this.leaseAction(b.dataset.action, Number(b.dataset.lease));
    });
  },

  refreshAll() {
    const n = S.nodes.get(this.name);
    const hd = this.head;
    if (!n) {
      setBadge(hd.state, 'none');
      setText(hd.group, S.loaded ? 'unknown node' : '…');
    } else {
      setBadge(hd.state, n.state);
      hd.stale.hidden = !n.stale;
      setText(hd.group, n.group ?? '');
      setText(hd.connected, n.connected ? 'connected' : 'not connected');
      setText(hd.leased, fmtRate(n.leased_bps));
      setText(hd.measured, fmtRate(n.rate_bps));
      setText(hd.volume, n.volume_bytes != null ? `${fmtBytes(n.used_bytes)} of ${fmtBytes(n.volume_bytes)}` : 'no limit');
      for (const s of n.scopes || []) this.chart(s.scope);
    }
    this.second();
    this.renderCharts();
  },
  renderCharts() {
    if (this.chartsDirty) {
      this.chartsDirty = false;
      const scopes = [...this.charts.keys()].sort((a, b) => (a === 'egress' ? -1 : b === 'egress' ? 1 : collator.compare(a, b)));
      this.chartsEl.replaceChildren(...scopes.map((s) => this.charts.get(s).el));
    }
    this.noCharts.hidden = this.charts.size > 0;
    const n = S.nodes.get(this.name);
    const byScope = new Map((n?.scopes || []).map((s) => [s.scope, s]));
    // Widths first, then the drawing: one layout, not one per chart.
    const charts = [...this.charts.values()];
    const widths = charts.map((c) => c.svg.clientWidth);
    charts.forEach((c, i) => {
      c.update(byScope.get(c.scope));
      c.render(this.range, widths[i], { loading: this.minuteLoading, error: this.minuteError });
    });
  },
  showRange() {
    const R = RANGES[this.range];
    setText(this.chartsTitle, `Rates per scope (${R.what})`);
    setText(this.rangeNote, R.note);
    for (const b of this.rangeButtons) setAttr(b, 'aria-pressed', b.dataset.range === this.range ? 'true' : 'false');
  },
  setRange(range) {
    if (!RANGES[range] || range === this.range) return;
    this.range = range;
    clearTimeout(this.minuteTimer);
    this.minuteTimer = null;
    this.minuteSeq++;
    this.minuteLoading = false;
    this.showRange();
    if (range === '1h' && !this.hourLoaded) this.loadSeries('1h');
    if (range === '24h') this.loadMinutes();
    this.renderCharts();
  },
  onTick(changed) {
    if (changed.has(this.name)) this.refreshAll();
    else {
      this.renderCharts(); // slide the time axis
      this.second();
    }
  },
  onFleet() { this.refreshAll(); },
  onReload() {
    this.refreshAll();
    if (this.range === '24h') this.loadMinutes();
    this.loadLeases();
    this.loadEvents();
  },
  onSecond() {
    if (this.name) this.second();
  },
  second() {
    const n = S.nodes.get(this.name);
    const now = serverNow();
    if (n) {
      setText(this.head.report, n.last_report_unix_ms != null ? `${fmtDur(now - n.last_report_unix_ms)} ago` : 'never');
      setText(this.head.expires, n.deadline != null ? fmtDur(n.deadline - now) : '—');
    }
    for (const tr of this.leaseBody?.rows || []) {
      const dl = Number(tr.dataset.deadline);
      if (dl) setText(tr.cells[9], fmtDur(dl - now));
    }
    this.renderPorts(now);
  },
  onTopology() {
    if (this.name) this.renderPorts(serverNow());
  },
  /** One line: each fabric port of this node, its last probing round and what it heard. */
  renderPorts(now) {
    const el = this.ports;
    const st = T.status;
    const name = this.name;
    if (!el || !name) return;
    if (!st) {
      el.hidden = true;
      return;
    }
    const declared = T.topology?.nodes?.[name] || [];
    const byPort = new Map();
    for (const p of st.ports || []) if (p.node === name) byPort.set(p.port, p);
    const ports = [...new Set([...declared, ...byPort.keys()])];
    if (!ports.length && st.version == null) {
      el.hidden = true;
      return;
    }
    const text = !ports.length
      ? `${name} is not in the applied topology (version ${st.version}) and reported no probe round.`
      : ports.map((port) => {
        const p = byPort.get(port);
        const extra = declared.length && !declared.includes(port) ? ' (not declared)' : '';
        if (!p) return `${port}: no probe round yet`;
        return `${port}${extra}: last round ${fmtDur(now - p.last_round_unix_ms)} ago, heard ${p.heard.length ? p.heard.join(', ') : 'nothing'}`;
      }).join('; ');
    setText(this.portsText, text);
    // Open findings about this node: it is a culprit, or the subject names it.
    const mine = (st.findings || []).filter((f) => (f.culprits || []).includes(name) || (() => {
      const { eps, dirs } = subjectParts(f.subject);
      return eps.some((e) => deviceOf(e) === name) || dirs.some((d) => d.includes(name));
    })());
    this.portsFindWrap.hidden = !mine.length;
    setText(this.portsFind, mine.length ? `${mine.length} open finding${mine.length > 1 ? 's' : ''} (${[...new Set(mine.map((f) => f.kind))].join(', ')})` : '');
    setAttr(el, 'data-findings', mine.length);
    el.hidden = false;
  },
  onEvent(evs) {
    const mine = evs.filter((e) => e.node === this.name);
    if (!mine.length) return;
    const frag = document.createDocumentFragment();
    for (let i = mine.length - 1; i >= 0; i--) frag.append(eventRow(mine[i], false));
    this.eventBody.prepend(frag);
    while (this.eventBody.rows.length > NODE_EVENT_ROWS) this.eventBody.lastElementChild.remove();
    if (mine.some((e) => e.kind.startsWith('lease.'))) throttle('node-leases', 300, () => this.name && this.loadLeases());
  },

  /** Fetches the 1-second history of a live range ('5m': the server's default window;
   *  '1h': the whole in-memory hour) and merges it under the live points. */
  async loadSeries(range = '5m') {
    const name = this.name;
    let q = `node=${encodeURIComponent(name)}&step=1s`;
    if (range === '1h') {
      this.hourLoaded = true;
      // A little inside the hour the controller keeps, so that clock skew cannot make it a 422.
      q += `&since_ms=${Math.floor(serverNow() - RANGES['1h'].windowMs + 2000)}`;
    }
    try {
      const r = await api('GET', `/v1/telemetry/series?${q}`);
      if (name !== this.name) return;
      for (const s of r.series || []) this.chart(s.scope).history(s, r.step_ms ?? 1000);
      this.renderCharts();
    } catch (e) {
      if (name !== this.name) return;
      if (range === '1h') this.hourLoaded = false;
      if (e.status !== 401) this.showError(`Loading the rate history failed: ${e.message}`);
    }
  },
  /** Fetches the last 24 hours from the per-minute store, then again shortly after each
   *  minute ends (the controller writes a minute to the store within 5 s of its end). */
  async loadMinutes() {
    const name = this.name;
    const seq = ++this.minuteSeq;
    clearTimeout(this.minuteTimer);
    this.minuteTimer = null;
    this.minuteLoading = true;
    const since = Math.floor(serverNow() - RANGES['24h'].windowMs + 30000);
    try {
      const r = await api('GET', `/v1/telemetry/series?node=${encodeURIComponent(name)}&step=1m&since_ms=${since}`);
      if (name !== this.name || seq !== this.minuteSeq) return;
      const now = serverNow();
      const bySeries = new Map((r.series || []).map((s) => [s.scope, s]));
      for (const s of bySeries.keys()) this.chart(s);
      for (const c of this.charts.values()) c.minutes(bySeries.get(c.scope) || null, r.step_ms ?? 60000, now);
      this.minuteError = null;
    } catch (e) {
      if (name !== this.name || seq !== this.minuteSeq) return;
      this.minuteError = e.message;
      if (e.status !== 401) this.showError(`Loading the per-minute rates failed: ${e.message}`);
    }
    this.minuteLoading = false;
    this.renderCharts();
    const wait = 60000 - (serverNow() % 60000) + 7000;
    this.minuteTimer = setTimeout(() => {
      if (name === this.name && seq === this.minuteSeq && this.range === '24h') this.loadMinutes();
    }, wait);
  },
  async loadLeases() {
    const name = this.name;
    try {
      const leases = await api('GET', `/v1/leases?node=${encodeURIComponent(name)}`);
      if (name !== this.name) return;
      this.leases = leases;
      this.renderLeases(serverNow());
    } catch (e) {
      if (name === this.name && e.status !== 401) this.showError(`Loading the leases failed: ${e.message}`);
    }
  },
  async loadEvents() {
    const name = this.name;
    // Newest first from what the dashboard holds; the server filter fills in older ones.
    try {
      const r = await api('GET', `/v1/events?node=${encodeURIComponent(name)}&limit=${NODE_EVENT_ROWS}`);
      if (name !== this.name) return;
      const byId = new Map(r.events.map((e) => [e.id, e]));
      for (const e of S.events) if (e.node === name) byId.set(e.id, e);
      const all = [...byId.values()].sort((a, b) => b.id - a.id).slice(0, NODE_EVENT_ROWS);
      this.eventBody.replaceChildren(...all.map((e) => eventRow(e, false)));
    } catch (e) {
      if (name === this.name && e.status !== 401) this.showError(`Loading the events failed: ${e.message}`);
    }
  },
  renderLeases(now) {
    const rows = this.leases.slice().sort((a, b) => (a.state === 'active') - (b.state === 'active') || a.id - b.id).reverse();
    if (!rows.length) {
      this.leaseBody.replaceChildren(h('tr', {}, h('td', { colspan: 11, class: 'empty', text: 'No leases.' })));
      return;
    }
    this.leaseBody.replaceChildren(...rows.map((l) => {
      const t = l.terms || {};
      const active = l.state === 'active';
      const st = l.volume_exhausted && active ? 'exhausted' : l.state;
      const reason = l.status?.reason;
      const deadline = active && l.expires_in_ms != null ? now + l.expires_in_ms : null;
      const ended = l.status?.at;
      const actions = active ? [
        h('button', { type: 'button', 'data-action': 'renew', 'data-lease': l.id, text: 'Renew' }),
        h('button', { type: 'button', 'data-action': 'change', 'data-lease': l.id, text: 'Change…' }),
        h('button', { type: 'button', class: 'danger', 'data-action': 'revoke', 'data-lease': l.id, text: 'Revoke…' }),
      ] : [];
      return h('tr', { 'data-lease-id': l.id, 'data-state': st, 'data-deadline': deadline },
        h('th', { scope: 'row', class: 'num', text: String(l.id) }),
        h('td', { text: scopeText(t.scope) }),
        h('td', { class: 'state-cell' }, badge(st), reason ? h('span', { class: 'muted reason', text: reason }) : null),
        h('td', { class: 'num', text: fmtRate(l.rate_bps), title: t.want_bps !== l.rate_bps ? `asked ${fmtRate(t.want_bps)}` : null }),
        h('td', { class: 'num', text: fmtBytes(t.burst_bytes) }),
        h('td', { class: 'num', text: t.volume_bytes != null ? `${fmtBytes(l.usage?.bytes ?? 0)} / ${fmtBytes(t.volume_bytes)}` : `${fmtBytes(l.usage?.bytes ?? 0)}, no limit` }),
        h('td', { class: 'num', text: `${fmtDur(t.ttl_ms)} / ${fmtDur(t.renew_interval_ms)}` }),
        h('td', { class: 'num', text: String(l.renewals ?? 0) }),
        h('td', { text: fmtTime(l.issued_at) }),
        h('td', { class: 'num', text: deadline ? fmtDur(deadline - now) : ended ? `ended ${fmtTime(ended)}` : '—' }),
        h('td', { class: 'actions' }, actions));
    }));
  },
  showError(msg) {
    formError(this.err, msg);
  },
  async leaseAction(action, id) {
    const l = this.leases.find((x) => x.id === id);
    if (!l) return;
    formError(this.err, null);
    this.msg.textContent = '';
    const label = `lease ${id} (${l.node} ${scopeText(l.terms?.scope)})`;
    try {
      if (action === 'renew') {
        await api('POST', `/v1/leases/${id}/renew`);
        this.msg.textContent = `Renewed ${label}.`;
      } else if (action === 'revoke') {
        const c = await confirmDialog({
          title: `Revoke lease ${id}?`,
          message: `${l.node} falls to its floor (${fmtRate(l.terms?.floor?.rate_bps ?? 0)}) on ${scopeText(l.terms?.scope)} within a second. A revocation is final.`,
          confirmLabel: 'Revoke lease',
          reason: true,
        });
        if (!c.ok) return;
        await api('POST', `/v1/leases/${id}/revoke`, c.reason ? { reason: c.reason } : {});
        this.msg.textContent = `Revoked ${label}.`;
      } else if (action === 'change') {
        openChangeDialog(l, () => {
          this.msg.textContent = `Changed ${label}.`;
          this.loadLeases();
        });
        return;
      }
    } catch (e) {
      formError(this.err, e.message, e.status);
    }
    this.loadLeases();
  },
  async removeNode() {
    const name = this.name;
    const c = await confirmDialog({
      title: `Remove node ${name}?`,
      message: `Its leases are revoked, its certificate stops working and its agent must enroll again with a new join token.`,
      confirmLabel: 'Remove node',
    });
    if (!c.ok) return;
    try {
      await api('DELETE', `/v1/nodes/${encodeURIComponent(name)}`);
      location.hash = '#/fleet';
    } catch (e) {
      formError(this.err, e.message, e.status);
    }
  },
};

function openChangeDialog(lease, onDone) {
  const d = $('#change-dialog');
  const close = h('button', { type: 'button', id: 'change-cancel', text: 'Cancel', onclick: () => d.close() });
  const form = leaseForm({ prefix: 'change', lease, onDone: () => { d.close(); onDone(); } });
  $('#change-body').replaceChildren(h('h2', { id: 'change-title', text: `Change lease ${lease.id} (${lease.node} ${scopeText(lease.terms?.scope)})` }), form);
  form.querySelector('.actions').prepend(close);
  d.showModal();
  $('#change-rate').focus();
}

function eventRow(e, withNode = true) {
  return h('tr', { 'data-id': e.id, 'data-kind': e.kind, 'data-severity': e.severity, 'data-node': withNode ? e.node ?? '' : null },
    h('td', { class: 'time' }, h('time', { datetime: new Date(e.t).toISOString(), title: new Date(e.t).toLocaleString(), text: fmtTime(e.t) })),
    h('td', {}, h('span', { class: 'sev', 'data-severity': e.severity, text: e.severity })),
    h('td', { class: 'kind', text: e.kind }),
    withNode ? h('td', {}, e.node ? h('a', { href: nodeHref(e.node), text: e.node }) : '—') : null,
    h('td', { class: 'msg', text: e.message }));
}

// ---------------------------------------------------------------------------------------
// Events view

function kindMatches(kind, prefix) {
  if (!prefix) return true;
  if (kind === prefix) return true;
  return kind.startsWith(prefix) && (prefix.endsWith('.') || kind[prefix.length] === '.');
}
const SEV_RANK = { info: 0, warning: 1, critical: 2 };

const eventsView = {
  el: null,
  f: { kind: '', node: '', sev: '', text: '' },
  mount() {
    this.el = $('#view-events');
    const kind = h('input', { id: 'ev-kind', type: 'search', list: 'nw-kinds', placeholder: 'lease. or agent.connected', autocomplete: 'off' });
    const node = h('input', { id: 'ev-node', type: 'search', list: 'nw-nodes', placeholder: 'exact node name', autocomplete: 'off' });
    const sev = h('select', { id: 'ev-sev' }, h('option', { value: '', text: 'all' }), h('option', { value: 'warning', text: 'warning and critical' }), h('option', { value: 'critical', text: 'critical only' }));
    const text = h('input', { id: 'ev-text', type: 'search', placeholder: 'words in the message', autocomplete: 'off' });
    const kinds = h('datalist', { id: 'nw-kinds' }, KINDS.map((k) => h('option', { value: k })));
    const upd = () => {
      this.f = { kind: kind.value.trim(), node: node.value.trim(), sev: sev.value, text: text.value.trim().toLowerCase() };
      this.limit = EVENT_PAGE;
      this.render();
    };
    for (const i of [kind, node, text]) i.addEventListener('input', upd);
    sev.addEventListener('change', upd);
    this.count = h('p', { class: 'muted', id: 'ev-count', role: 'status' });
    this.tbody = h('tbody', { id: 'events-body' });
    this.limit = EVENT_PAGE;
    this.more = h('button', { type: 'button', id: 'ev-more', hidden: true, text: 'Show older events' });
    this.more.addEventListener('click', () => {
      this.limit = Math.min(EVENT_ROWS, this.limit + EVENT_PAGE);
      this.render();
    });
    this.el.append(
      h('div', { class: 'view-head' }, h('h1', { id: 'events-title', text: 'Events' })),
      kinds,
      h('div', { class: 'toolbar', role: 'search' },
        h('div', { class: 'field inline' }, h('label', { for: 'ev-kind', text: 'Kind' }), kind),
        h('div', { class: 'field inline' }, h('label', { for: 'ev-node', text: 'Node' }), node),
        h('div', { class: 'field inline' }, h('label', { for: 'ev-sev', text: 'Severity' }), sev),
        h('div', { class: 'field inline' }, h('label', { for: 'ev-text', text: 'Text' }), text)),
      this.count,
      h('div', { class: 'table-wrap' }, h('table', { class: 'events fixed', id: 'events-table' },
        h('caption', { class: 'sr-only', text: 'Controller events, newest first' }),
        h('colgroup', {}, ['time', 'sev', 'kind', 'node', 'msg'].map((c) => h('col', { class: `ev-${c}` }))),
        h('thead', {}, h('tr', {}, ['Time', 'Severity', 'Kind', 'Node', 'Message'].map((c) => h('th', { scope: 'col', text: c })))),
        this.tbody)),
      h('p', {}, this.more));
  },
  reset() {
    this.tbody?.replaceChildren();
  },
  match(e) {
    const f = this.f;
    return kindMatches(e.kind, f.kind)
      && (!f.node || e.node === f.node)
      && (!f.sev || SEV_RANK[e.severity] >= SEV_RANK[f.sev])
      && (!f.text || e.message.toLowerCase().includes(f.text) || e.kind.includes(f.text) || (e.node || '').toLowerCase().includes(f.text));
  },
  show() { this.render(); },
  onReload() { this.render(); },
  render() {
    const rows = [];
    let total = 0;
    for (let i = S.events.length - 1; i >= 0; i--) {
      const e = S.events[i];
      if (!this.match(e)) continue;
      total++;
      if (rows.length < this.limit) rows.push(eventRow(e));
    }
    this.total = total;
    this.tbody.replaceChildren(...rows);
    this.renderCount();
  },
  renderCount() {
    const shown = this.tbody.rows.length;
    setText(this.count, this.total > shown ? `Showing the newest ${nf.format(shown)} of ${nf.format(this.total)} matching events` : `${nf.format(this.total)} matching events`);
    this.more.hidden = !(this.total > shown && shown < EVENT_ROWS);
  },
  onEvent(evs) {
    const m = evs.filter((e) => this.match(e));
    if (!m.length) return;
    const frag = document.createDocumentFragment();
    for (let i = m.length - 1; i >= 0; i--) frag.append(eventRow(m[i]));
    this.tbody.prepend(frag);
    while (this.tbody.rows.length > this.limit) this.tbody.lastElementChild.remove();
    this.total += m.length;
    this.renderCount();
  },
};

// ---------------------------------------------------------------------------------------
// Interconnect verification data, shared by the topology and node views.

async function loadTopology() {
  const gen = S.gen;
  const seq = ++T.seq;
  T.loading = true;
  T.fetchedAt = Date.now();
  try {
    const st = await api('GET', '/v1/topology/status');
    let topo = T.topology;
    if (st.version == null) topo = null;
    else if (topo?.version !== st.version) {
      try {
        topo = await api('GET', '/v1/topology');
      } catch (e) {
        if (e.status !== 404) throw e;
        topo = null; // removed between the two calls
      }
    }
    if (gen !== S.gen || seq !== T.seq) return;
    T.status = st;
    T.topology = topo;
    T.error = null;
  } catch (e) {
    if (gen !== S.gen || seq !== T.seq || e.status === 401) return;
    T.error = `Loading the link verification status failed: ${e.message}`;
  } finally {
    if (seq === T.seq) T.loading = false;
  }
  T.version++;
  try {
    current.view?.onTopology?.();
  } catch (e) {
    console.error(e);
  }
}

/** A `topology.*` event arrived: reload once the burst is over (a re-cabling raises and
 *  clears many findings within a round). */
function scheduleTopology() {
  if (!current.view?.usesTopology) return;
  throttle('topology', T_DEBOUNCE_MS, () => S.token && loadTopology());
}

/** What a finding's subject names: endpoints (`device:port`) of a link `a <-> b`, a port
 *  `a`, two links `l1, l2`; and node directions `n1 -> n2` (byte findings). */
function subjectParts(subject) {
  const eps = [];
  const dirs = [];
  for (const raw of String(subject ?? '').split(', ')) {
    const part = raw.trim();
    if (part.includes(' <-> ')) eps.push(...part.split(' <-> ').map((x) => x.trim()));
    else if (part.includes(' -> ')) dirs.push(part.split(' -> ').map((x) => x.trim()));
    else if (part) eps.push(part);
  }
  return { eps, dirs };
}
const deviceOf = (ep) => (ep.includes(':') ? ep.slice(0, ep.indexOf(':')) : ep);
const bySeverity = (x, y) => (SEV_RANK[y.severity] ?? 0) - (SEV_RANK[x.severity] ?? 0) || (x.first_seen ?? 0) - (y.first_seen ?? 0) || collator.compare(x.id, y.id);

/** A node port whose last round is at most this old is probing (the verifier's own bound
 *  is `missing_after_rounds` probe intervals: 3 s by default). */
const PROBE_FRESH_MS = 15000;

/** Each declared link with its verification status:
 *  - `finding`: an open finding's subject names the link or one of its endpoints (or, for
 *    a node–node link, names the direction between its two nodes); `severity` is the worst;
 *  - `verified`: every node end probing (switches do not probe) and no finding names it;
 *  - `unverified`: no (fresh) probe data yet. */
function verifyLinks(topo, st) {
  if (!topo) return [];
  const now = st?.now_unix_ms ?? serverNow();
  const isNode = (d) => Object.prototype.hasOwnProperty.call(topo.nodes || {}, d);
  const ports = new Map((st?.ports || []).map((p) => [`${p.node}:${p.port}`, p]));
  const byEp = new Map();
  const byPair = new Map();
  const add = (m, k, f) => (m.has(k) ? m.get(k).push(f) : m.set(k, [f]));
  for (const f of st?.findings || []) {
    const { eps, dirs } = subjectParts(f.subject);
    for (const e of eps) add(byEp, e, f);
    for (const d of dirs) add(byPair, d.slice().sort().join('\n'), f);
  }
  return (topo.links || []).map((l) => {
    const aDev = deviceOf(l.a);
    const bDev = deviceOf(l.b);
    const fs = new Set([...(byEp.get(l.a) || []), ...(byEp.get(l.b) || [])]);
    if (isNode(aDev) && isNode(bDev)) for (const f of byPair.get([aDev, bDev].sort().join('\n')) || []) fs.add(f);
    const findings = [...fs].sort(bySeverity);
    const ends = [l.a, l.b].filter((ep) => isNode(deviceOf(ep))).map((ep) => {
      const round = ports.get(ep) || null;
      return { ep, round, probing: !!round && now - round.last_round_unix_ms <= PROBE_FRESH_MS };
    });
    let status = 'unverified';
    if (findings.length) status = 'finding';
    else if (ends.length && ends.every((e) => e.probing)) status = 'verified';
    return {
      key: `${l.a} <-> ${l.b}`, a: l.a, b: l.b, aDev, bDev, aNode: isNode(aDev), bNode: isNode(bDev),
      rtt: l.rtt_max_us, status, severity: findings[0]?.severity ?? null, findings, ends, now,
    };
  });
}

/** The status of a declared link in words (titles, lists, the info panel). */
function verifyText(v) {
  if (v.status === 'finding') {
    const kinds = [...new Set(v.findings.map((f) => f.kind))].join(', ');
    return `${v.severity} finding: ${kinds}`;
  }
  if (v.status === 'verified') return v.ends.length > 1 ? 'verified: both ends probing, no finding' : 'verified: its node end probing, no finding';
  const silent = v.ends.filter((e) => !e.probing);
  if (silent.length && silent.every((e) => !e.round)) return 'unverified: no probe data yet';
  return `unverified: ${silent.map((e) => (e.round ? `${e.ep} last probed ${fmtDur(v.now - e.round.last_round_unix_ms)} ago` : `${e.ep} never probed`)).join(', ')}`;
}

// ---------------------------------------------------------------------------------------
// Topology view: the fabric switch in the middle, nodes on concentric rings, node-switch
// links and peer-scope edges coloured by utilisation. With a topology applied it also
// draws the declared switches and links, each with its verification `data-status`
// (verified / finding / unverified), lists the open findings and refreshes them on
// `topology.*` events and every T_REFRESH_MS. Utilisation links carry a status too: an
// uplink the worst of its node's declared links, a peer edge that of a declared link
// between its two nodes ("unverified" without one).

const TW = 1000;
const TC = TW / 2;
const VERIFY_LEGEND = [
  ['verified', 'verified', 'verified: node ends probing, no finding'],
  ['finding', 'warning', 'finding (warning)'],
  ['finding', 'critical', 'finding (critical)'],
  ['unverified', null, 'unverified: no fresh probe data'],
];

const topoView = {
  el: null,
  usesTopology: true,
  builtVersion: -1,
  declKey: '',
  pos: new Map(),
  nodeEls: new Map(),
  upEls: new Map(),
  peerEls: new Map(),
  declEls: new Map(), // declared link key (`a <-> b`) -> its SVG element
  verified: [], // verifyLinks() of the data shown
  nodeStatus: new Map(), // node -> worst status of its declared links
  peerSig: '',
  findKey: null,
  listKey: null,
  links: new Map(), // id -> {id, kind, from, to, status, level, ratio}

  mount() {
    this.el = $('#view-topology');
    this.svg = document.createElementNS(SVGNS, 'svg');
    this.svg.setAttribute('viewBox', `0 0 ${TW} ${TW}`);
    this.svg.setAttribute('class', 'topo');
    this.svg.setAttribute('id', 'topology-graph');
    this.svg.setAttribute('role', 'group');
    this.svg.setAttribute('aria-label', 'Fabric topology: nodes around the fabric switch');
    this.info = h('div', { class: 'topo-info card', id: 'topo-info', 'aria-live': 'polite' }, h('p', { class: 'muted', text: 'Hover over or focus a node for details; click it to open it.' }));
    this.counts = h('ul', { class: 'legend vertical', id: 'topo-counts' });
    this.verifyText = h('p', { class: 'hint', id: 'topo-verify', text: 'Link verification: loading…' });
    this.verifyLegend = h('ul', { class: 'legend vertical', id: 'topo-verify-legend' });
    const find = h('input', { id: 'topo-find', type: 'search', list: 'nw-nodes', placeholder: 'node name', autocomplete: 'off' });
    const findForm = h('form', { class: 'field', role: 'search' }, h('label', { for: 'topo-find', text: 'Open a node' }), find);
    findForm.addEventListener('submit', (e) => {
      e.preventDefault();
      if (S.nodes.has(find.value.trim())) location.hash = nodeHref(find.value.trim());
    });
    // Findings: a table, an empty state, the applied version and the revoke policy.
    this.findVersion = h('p', { class: 'muted', id: 'topo-version' });
    this.findCount = h('span', { class: 'muted', id: 'topo-findings-count', role: 'status' });
    this.findErr = h('p', { class: 'form-error', id: 'topo-error', role: 'alert', hidden: true });
    this.findEmpty = h('p', { class: 'empty', id: 'topo-findings-empty', text: 'Loading…' });
    this.findBody = h('tbody', { id: 'topo-findings-body' });
    this.findTable = h('div', { class: 'table-wrap', hidden: true }, h('table', { class: 'findings', id: 'topo-findings-table' },
      h('caption', { class: 'sr-only', text: 'Open interconnect findings, most severe first' }),
      h('thead', {}, h('tr', {}, ['Severity', 'Kind', 'Subject', 'Culprits', 'Open', 'Detail'].map((c) => h('th', { scope: 'col', text: c })))),
      this.findBody));
    this.policy = h('p', { class: 'hint', id: 'topo-policy' });
    this.linkList = h('ul', { class: 'decl-list', id: 'topo-links-list' });
    this.linkSummary = h('summary', { text: 'Declared links' });
    this.linkDetails = h('details', { class: 'card', id: 'topo-links', hidden: true }, this.linkSummary, this.linkList);
    this.el.append(
      h('div', { class: 'view-head' }, h('h1', { id: 'topology-title', text: 'Topology' })),
      h('div', { class: 'topo-layout' },
        h('div', { class: 'topo-canvas' }, this.svg),
        h('aside', { class: 'topo-side' },
          findForm,
          h('h2', { text: 'Link utilisation' }),
          h('ul', { class: 'legend vertical' }, ['ok', 'high', 'sat', 'none'].map((l) => h('li', {}, h('span', { class: `swatch util-${l}`, 'aria-hidden': 'true' }), UTIL_TEXT[l]))),
          h('p', { class: 'hint', text: 'Utilisation is measured / leased rate. Node–switch links carry the node total; curved edges are peer scopes (peer:NODE). Dashed: no lease or stale; thick: at the lease.' }),
          h('h2', { text: 'Links now' }), this.counts,
          h('h2', { text: 'Link verification' }), this.verifyText, this.verifyLegend,
          this.info)),
      h('section', { class: 'topo-findings', id: 'topo-findings', 'aria-labelledby': 'topo-findings-title' },
        h('div', { class: 'chart-head' }, h('h2', { id: 'topo-findings-title', text: 'Findings' }), this.findCount),
        this.findVersion, this.findErr, this.findEmpty, this.findTable, this.policy, this.linkDetails));
    const hoverInfo = (e) => {
      const a = e.target.closest?.('[data-node]');
      if (a && a.closest('.topo-node')) this.describe(a.dataset.node);
    };
    this.svg.addEventListener('mouseover', hoverInfo);
    this.svg.addEventListener('focusin', hoverInfo);
  },
  reset() {
    this.builtVersion = -1;
    this.declKey = '';
    this.findKey = null;
    this.listKey = null;
    this.verified = [];
    this.nodeStatus = new Map();
    this.svg?.replaceChildren();
    this.findBody?.replaceChildren();
    this.linkList?.replaceChildren();
  },
  show() {
    this.build();
    this.onTopology();
    if (!T.loading) loadTopology();
  },
  onReload() { this.show(); },
  onFleet() {
    this.build();
    this.onTopology();
  },
  onTick(changed) {
    if (this.peerSignature() !== this.peerSig) this.buildPeers();
    for (const name of changed) this.updateNode(name);
    this.renderCounts();
    this.second();
  },
  onSecond() { this.second(); },
  /** New verification data (or none yet): declared links, statuses, findings. */
  onTopology() {
    this.buildDeclared();
    this.applyVerification();
    this.renderFindings();
    this.updateAll();
  },

  layout() {
    const names = S.names.slice().sort((a, b) => collator.compare(S.nodes.get(a)?.group ?? '', S.nodes.get(b)?.group ?? '') || collator.compare(a, b));
    const N = names.length;
    const r = N <= 40 ? 14 : N <= 200 ? 6 : 3;
    const spacing = r * 2 + (N <= 40 ? 20 : 3);
    // k concentric rings, the fewest whose innermost still holds N/k nodes at this spacing.
    // Node i (ordered by group, then name) sits at angle 2*pi*i/N on ring i mod k, so every
    // ring covers the whole circle and a group stays in one sector.
    const outer = TC - 60;
    const gap = spacing * 1.6;
    let k = 1;
    while (k < 12 && (2 * Math.PI * (outer - (k - 1) * gap)) / spacing < N / k) k++;
    const pos = new Map();
    names.forEach((name, i) => {
      const a = (2 * Math.PI * i) / Math.max(1, N) - Math.PI / 2;
      const R = outer - (i % k) * gap;
      pos.set(name, { x: TC + R * Math.cos(a), y: TC + R * Math.sin(a), a });
    });
    return { pos, r, labels: N <= 40, inner: outer - (Math.min(k, Math.max(1, N)) - 1) * gap };
  },

  build() {
    if (this.builtVersion === S.fleetVersion) return;
    this.builtVersion = S.fleetVersion;
    const { pos, r, labels, inner } = this.layout();
    this.pos = pos;
    this.r = r;
    this.inner = inner;
    const N = pos.size;
    const lw = N <= 40 ? 2.5 : N <= 200 ? 1.2 : 0.6;
    this.svg.style.setProperty('--lw', lw);
    this.svg.classList.toggle('dense', N > 200);
    const up = [];
    const nodes = [];
    for (const [name, p] of pos) {
      const e = esc(name);
      up.push(`<line class="link uplink util-none" data-link="up:${e}" data-node="${e}" data-status="unverified" x1="${TC}" y1="${TC}" x2="${p.x.toFixed(1)}" y2="${p.y.toFixed(1)}"><title></title></line>`);
      let label = '';
      if (labels) {
        const lx = TC + (Math.hypot(p.x - TC, p.y - TC) + r + 8) * Math.cos(p.a);
        const ly = TC + (Math.hypot(p.x - TC, p.y - TC) + r + 8) * Math.sin(p.a);
        const anchor = Math.cos(p.a) > 0.3 ? 'start' : Math.cos(p.a) < -0.3 ? 'end' : 'middle';
        label = `<text class="label" x="${lx.toFixed(1)}" y="${ly.toFixed(1)}" text-anchor="${anchor}" dominant-baseline="middle">${e}</text>`;
      }
      nodes.push(`<a class="topo-node" href="${esc(nodeHref(name))}" data-node="${e}" data-state="none" aria-label="${e}"><title>${e}</title><circle cx="${p.x.toFixed(1)}" cy="${p.y.toFixed(1)}" r="${r}"/>${label}</a>`);
    }
    this.svg.innerHTML = `<g class="uplinks">${up.join('')}</g><g class="peers"></g><g class="declared-links"></g>`
      + `<g class="switch" aria-label="fabric switch"><rect x="${TC - 44}" y="${TC - 22}" width="88" height="44" rx="8"/><text x="${TC}" y="${TC}" text-anchor="middle" dominant-baseline="middle">fabric</text></g>`
      + `<g class="declared-switches"></g><g class="nodes">${nodes.join('')}</g><text class="hover-label" id="topo-hover" x="0" y="0" hidden></text>`;
    this.nodeEls = new Map();
    for (const a of this.svg.querySelectorAll('.topo-node')) this.nodeEls.set(a.dataset.node, a);
    this.upEls = new Map();
    for (const l of this.svg.querySelectorAll('.uplink')) this.upEls.set(l.dataset.node, l);
    this.peersG = this.svg.querySelector('.peers');
    this.declG = this.svg.querySelector('.declared-links');
    this.swG = this.svg.querySelector('.declared-switches');
    this.hover = this.svg.querySelector('#topo-hover');
    this.labels = labels;
    this.links = new Map();
    this.peerSig = '';
    this.declKey = '';
    this.declEls = new Map();
    this.buildPeers();
  },

  /** Places each declared switch towards the nodes cabled to it (so a leaf sits by its
   *  rack), on a ring inside the innermost node ring, spread so that boxes do not overlap. */
  placeSwitches(topo) {
    const names = Object.keys(topo.switches || {}).sort(collator.compare);
    const m = names.length;
    const Rs = Math.max(110, Math.min(this.inner * 0.55, 250));
    const sums = new Map(names.map((s) => [s, { x: 0, y: 0, n: 0 }]));
    for (const l of topo.links || []) {
      for (const [sw, other] of [[deviceOf(l.a), deviceOf(l.b)], [deviceOf(l.b), deviceOf(l.a)]]) {
        const acc = sums.get(sw);
        const p = this.pos.get(other);
        if (!acc || !p) continue;
        acc.x += Math.cos(p.a);
        acc.y += Math.sin(p.a);
        acc.n++;
      }
    }
    const placed = names.map((s, i) => {
      const acc = sums.get(s);
      const even = (2 * Math.PI * i) / Math.max(1, m) - Math.PI / 2;
      const a = acc.n && Math.hypot(acc.x, acc.y) > 0.2 * acc.n ? Math.atan2(acc.y, acc.x) : even;
      return { name: s, a };
    }).sort((p, q) => p.a - q.a);
    const minSep = Math.min((2 * Math.PI) / Math.max(1, m), 100 / Rs);
    for (let i = 1; i < placed.length; i++) if (placed[i].a - placed[i - 1].a < minSep) placed[i].a = placed[i - 1].a + minSep;
    const out = new Map();
    for (const p of placed) out.set(p.name, { x: TC + Rs * Math.cos(p.a), y: TC + Rs * Math.sin(p.a) });
    return out;
  },

  /** Draws the applied topology's switches and links (again when it or the layout changes). */
  buildDeclared() {
    const topo = T.topology;
    const key = `${this.builtVersion}|${topo ? `${topo.version}|${topo.fingerprint}` : '-'}`;
    if (key === this.declKey || !this.declG) return;
    this.declKey = key;
    this.declEls = new Map();
    this.undrawn = 0;
    if (!topo) {
      this.declG.replaceChildren();
      this.swG.replaceChildren();
      return;
    }
    const sw = this.placeSwitches(topo);
    const links = [];
    for (const l of topo.links || []) {
      const k = `${l.a} <-> ${l.b}`;
      const pa = this.pos.get(deviceOf(l.a)) || sw.get(deviceOf(l.a));
      const pb = this.pos.get(deviceOf(l.b)) || sw.get(deviceOf(l.b));
      if (!pa || !pb) {
        this.undrawn++;
        continue;
      }
      const attrs = `class="link declared" data-link="${esc(k)}" data-a="${esc(l.a)}" data-b="${esc(l.b)}" data-status="unverified"`;
      if (this.pos.has(deviceOf(l.a)) && this.pos.has(deviceOf(l.b))) {
        // Node–node: a curve bent towards the centre (less than peer edges, to tell them apart).
        const mx = (pa.x + pb.x) / 2;
        const my = (pa.y + pb.y) / 2;
        const cx = mx + (TC - mx) * 0.35;
        const cy = my + (TC - my) * 0.35;
        links.push(`<path ${attrs} d="M${pa.x.toFixed(1)},${pa.y.toFixed(1)} Q${cx.toFixed(1)},${cy.toFixed(1)} ${pb.x.toFixed(1)},${pb.y.toFixed(1)}"><title>${esc(k)}</title></path>`);
      } else {
        links.push(`<line ${attrs} x1="${pa.x.toFixed(1)}" y1="${pa.y.toFixed(1)}" x2="${pb.x.toFixed(1)}" y2="${pb.y.toFixed(1)}"><title>${esc(k)}</title></line>`);
      }
    }
    this.declG.innerHTML = links.join('');
    for (const el of this.declG.children) this.declEls.set(el.dataset.link, el);
    const boxes = [];
    for (const [name, p] of sw) {
      const w = Math.max(44, name.length * 8.5 + 16);
      const ports = topo.switches[name] || [];
      boxes.push(`<g class="dswitch" data-switch="${esc(name)}"><title>switch ${esc(name)}: ${ports.length} ports (${esc(ports.join(', '))})</title>`
        + `<rect x="${(p.x - w / 2).toFixed(1)}" y="${(p.y - 13).toFixed(1)}" width="${w.toFixed(1)}" height="26" rx="5"/>`
        + `<text x="${p.x.toFixed(1)}" y="${p.y.toFixed(1)}" text-anchor="middle" dominant-baseline="middle">${esc(name)}</text></g>`);
    }
    this.swG.innerHTML = boxes.join('');
  },

  /** Sets every link's `data-status` from the latest verification data. */
  applyVerification() {
    this.verified = verifyLinks(T.topology, T.status);
    // Several links: any finding wins; "verified" only if all are.
    const merge = (m, k, status) => {
      const cur = m.get(k);
      if (!cur || status === 'finding' || (cur === 'verified' && status === 'unverified')) m.set(k, cur === 'finding' ? cur : status);
    };
    const nodeStatus = new Map();
    const pairStatus = new Map();
    for (const v of this.verified) {
      const el = this.declEls.get(v.key);
      if (el) {
        setAttr(el, 'data-status', v.status);
        setAttr(el, 'data-severity', v.severity);
        const t = el.firstChild;
        const title = `${v.key} (RTT bound ${nf.format(v.rtt)} µs): ${verifyText(v)}`;
        if (t && t.textContent !== title) t.textContent = title;
      }
      if (v.aNode) merge(nodeStatus, v.aDev, v.status);
      if (v.bNode) merge(nodeStatus, v.bDev, v.status);
      if (v.aNode && v.bNode) merge(pairStatus, [v.aDev, v.bDev].sort().join('\n'), v.status);
    }
    this.nodeStatus = nodeStatus;
    for (const [name, el] of this.upEls) setAttr(el, 'data-status', nodeStatus.get(name) ?? 'unverified');
    for (const el of this.peerEls.values()) setAttr(el, 'data-status', pairStatus.get([el.dataset.from, el.dataset.to].sort().join('\n')) ?? 'unverified');
    this.renderVerifySummary();
    this.renderLinkList();
  },
  renderVerifySummary() {
    const st = T.status;
    const topo = T.topology;
    const c = { verified: 0, warning: 0, critical: 0, info: 0, unverified: 0 };
    for (const v of this.verified) c[v.status === 'finding' ? v.severity ?? 'warning' : v.status]++;
    let text;
    if (!st) text = T.error ? 'Link verification: status unavailable; every link is “unverified”.' : 'Link verification: loading…';
    else if (!topo) text = 'No topology applied: every link is “unverified”. Declare one with `nicwarden topology apply FILE`.';
    else {
      text = `Topology version ${topo.version}: ${nf.format(this.verified.length)} declared links, drawn in the graph between nodes and switches. Utilisation links take the status of their nodes' declared links.`;
      if (this.undrawn) text += ` ${nf.format(this.undrawn)} not drawn (their node is not in the fleet).`;
    }
    setText(this.verifyText, text);
    const key = JSON.stringify([c, !!topo]);
    if (key === this.legendKey) return;
    this.legendKey = key;
    this.verifyLegend.replaceChildren(...VERIFY_LEGEND.map(([status, sev, label]) => h('li', { 'data-status': status, 'data-severity': sev },
      h('span', { class: `swatch decl-${sev ?? status}`, 'aria-hidden': 'true' }),
      topo ? `${nf.format(sev ? c[sev] : c[status])} ${label}` : label)));
  },
  /** The declared links as text (the graph's statuses, not only as colours and dashes). */
  renderLinkList() {
    const topo = T.topology;
    this.linkDetails.hidden = !topo;
    if (!topo) return;
    const key = JSON.stringify(this.verified.map((v) => [v.key, v.status, v.severity, verifyText(v)]));
    if (key === this.listKey) return;
    this.listKey = key;
    setText(this.linkSummary, `Declared links (${nf.format(this.verified.length)}), with their verification status`);
    this.linkList.replaceChildren(...this.verified.map((v) => h('li', { 'data-link': v.key, 'data-status': v.status, 'data-severity': v.severity },
      h('span', { class: `swatch decl-${v.status === 'finding' ? v.severity ?? 'warning' : v.status}`, 'aria-hidden': 'true' }),
      h('span', { class: 'mono', text: v.key }), ` — ${verifyText(v)}`)));
  },
  renderFindings() {
    const st = T.status;
    const topo = T.topology;
    setText(this.findErr, T.error || '');
    this.findErr.hidden = !T.error;
    if (!st) {
      setText(this.findEmpty, T.error ? 'Link verification status unavailable.' : 'Loading…');
      this.findEmpty.hidden = false;
      this.findTable.hidden = true;
      setText(this.findCount, '');
      setText(this.findVersion, '');
      setText(this.policy, '');
      return;
    }
    setAttr(this.findVersion, 'data-version', st.version);
    if (st.version == null) {
      this.findVersion.hidden = true;
    } else {
      this.findVersion.hidden = false;
      const parts = [`Topology version ${st.version} applied`];
      if (topo?.version === st.version) {
        parts[0] += ` ${fmtTime(topo.applied_at_unix_ms)}`;
        parts.push(`${nf.format(Object.keys(topo.nodes || {}).length)} nodes, ${nf.format(Object.keys(topo.switches || {}).length)} switches, ${nf.format((topo.links || []).length)} links`);
        if (topo.note) parts.push(`“${topo.note}”`);
      }
      if (st.fingerprint) parts.push(`fingerprint ${st.fingerprint}`);
      setText(this.findVersion, parts.join(' · '));
    }
    const findings = (st.findings || []).slice().sort(bySeverity);
    const noTopo = st.version == null;
    if (!findings.length) {
      const key = `empty|${st.version}`;
      if (this.findKey !== key) {
        this.findKey = key;
        this.findEmpty.replaceChildren(...(noTopo
          ? ['No findings. No topology applied: ', h('code', { text: 'nicwarden topology apply FILE' })]
          : [`No findings · topology version ${st.version}`]));
        this.findBody.replaceChildren();
      }
      this.findEmpty.hidden = false;
      this.findTable.hidden = true;
      setText(this.findCount, 'none open');
    } else {
      const revoke = new Set(st.revoke_policy || []);
      const key = JSON.stringify([findings.map((f) => [f.id, f.severity, f.culprits, f.detail, f.first_seen]), [...revoke]]);
      if (this.findKey !== key) {
        this.findKey = key;
        this.findBody.replaceChildren(...findings.map((f) => this.findingRow(f, revoke.has(f.kind))));
      }
      this.findEmpty.hidden = true;
      this.findTable.hidden = false;
      const crit = findings.filter((f) => f.severity === 'critical').length;
      setText(this.findCount, `${nf.format(findings.length)} open${crit ? `, ${nf.format(crit)} critical` : ''}${noTopo ? ' · no topology applied' : ''}`);
    }
    const pol = st.revoke_policy || [];
    setText(this.policy, pol.length
      ? `Revoke policy: the culprits of ${pol.join(', ')} findings lose their leases automatically.`
      : 'Revoke policy: none; findings are reported, no lease is revoked automatically.');
    this.second();
  },
  findingRow(f, revokes) {
    const culprits = f.culprits || [];
    const cul = culprits.length ? culprits.flatMap((c, i) => [i ? ', ' : null, S.nodes.has(c) ? h('a', { href: nodeHref(c), text: c }) : c]) : ['—'];
    return h('tr', { 'data-finding-id': f.id, 'data-kind': f.kind, 'data-severity': f.severity },
      h('td', {}, h('span', { class: 'sev', 'data-severity': f.severity, text: f.severity })),
      h('td', { class: 'kind', text: f.kind.replace(/_/g, ' '), title: f.kind }),
      h('td', { class: 'subject mono', text: f.subject }),
      h('td', { class: 'culprits' }, ...cul),
      h('td', { class: 'age', 'data-first-seen': f.first_seen, title: `first seen ${fmtTime(f.first_seen)}, last seen ${fmtTime(f.last_seen)}` }),
      h('td', { class: 'msg' }, f.detail, revokes && culprits.length ? h('span', { class: 'tag revokes', text: 'revokes the culprits’ leases' }) : null));
  },
  second() {
    const now = serverNow();
    for (const tr of this.findBody?.rows || []) {
      const td = tr.cells[4];
      setText(td, `for ${fmtDur(now - Number(td.dataset.firstSeen))}`);
    }
  },

  peerEdges() {
    const edges = [];
    for (const name of S.names) {
      const n = S.nodes.get(name);
      for (const s of n?.scopes || []) {
        if (!s.scope.startsWith('peer:') || s.lease_id == null) continue;
        const peer = s.scope.slice(5);
        if (this.pos.has(peer)) edges.push([name, peer, s]);
      }
    }
    return edges;
  },
  peerSignature() {
    let sig = '';
    for (const name of S.names) for (const s of S.nodes.get(name)?.scopes || []) if (s.scope.startsWith('peer:') && s.lease_id != null) sig += `${name}>${s.scope}|`;
    return sig;
  },
  buildPeers() {
    this.peerSig = this.peerSignature();
    const parts = [];
    for (const [a, b] of this.peerEdges()) {
      const p = this.pos.get(a);
      const q = this.pos.get(b);
      // A curve bent towards the centre so that edges do not hide the spokes.
      const mx = (p.x + q.x) / 2;
      const my = (p.y + q.y) / 2;
      const cx = mx + (TC - mx) * 0.55;
      const cy = my + (TC - my) * 0.55;
      parts.push(`<path class="link peer util-none" data-link="peer:${esc(a)}>${esc(b)}" data-from="${esc(a)}" data-to="${esc(b)}" data-status="unverified" d="M${p.x.toFixed(1)},${p.y.toFixed(1)} Q${cx.toFixed(1)},${cy.toFixed(1)} ${q.x.toFixed(1)},${q.y.toFixed(1)}"><title></title></path>`);
    }
    this.peersG.innerHTML = parts.join('');
    this.peerEls = new Map();
    for (const el of this.peersG.children) this.peerEls.set(`${el.dataset.from}>${el.dataset.to}`, el);
    for (const k of [...this.links.keys()]) if (k.startsWith('peer:')) this.links.delete(k);
    if (this.verified.length) this.applyVerification();
    for (const name of S.names) this.updateNode(name);
  },
  setLink(el, id, kind, from, to, level, ratio, text) {
    this.links.set(id, { id, kind, from, to, status: el.dataset.status || 'unverified', level, ratio });
    const cls = `link ${kind === 'up' ? 'uplink' : 'peer'} util-${level}${el.classList.contains('hl') ? ' hl' : ''}`;
    if (el.getAttribute('class') !== cls) el.setAttribute('class', cls);
    setAttr(el, 'data-util', ratio == null ? null : ratio.toFixed(3));
    setAttr(el, 'data-level', level);
    const t = el.firstChild;
    const what = kind === 'up' ? 'declared links' : 'declared link';
    const title = `${text}: ${ratio == null ? UTIL_TEXT.none : `${fmtPct(ratio)} of the lease`}; verification (${what}): ${el.dataset.status}`;
    if (t && t.textContent !== title) t.textContent = title;
  },
  updateNode(name) {
    const n = S.nodes.get(name);
    const a = this.nodeEls.get(name);
    if (!n || !a) return;
    setAttr(a, 'data-state', n.state);
    setAttr(a, 'data-stale', n.stale ? 'true' : 'false');
    const t = a.firstChild;
    const vs = this.nodeStatus.get(name);
    const title = `${name} (${n.group}): ${n.state}${n.stale ? ', stale' : ''}; ${fmtRate(n.rate_bps)} of ${fmtRate(n.leased_bps)}${vs ? `; declared links: ${vs}` : ''}`;
    if (t.textContent !== title) t.textContent = title;
    const up = this.upEls.get(name);
    if (up) {
      const u = utilLevel(n.rate_bps ?? 0, n.leased_bps, n.stale, null);
      this.setLink(up, `up:${name}`, 'up', name, 'fabric', u.level, u.ratio, `${name} – fabric`);
    }
    for (const s of n.scopes || []) {
      if (!s.scope.startsWith('peer:')) continue;
      const el = this.peerEls.get(`${name}>${s.scope.slice(5)}`);
      if (!el) continue;
      const u = utilLevel(s.rate_bps ?? 0, s.leased_bps, n.stale, s.state);
      this.setLink(el, `peer:${name}>${s.scope.slice(5)}`, 'peer', name, s.scope.slice(5), u.level, u.ratio, `${name} → ${s.scope.slice(5)} (peer scope)`);
    }
  },
  updateAll() {
    for (const name of S.names) this.updateNode(name);
    this.renderCounts();
  },
  renderCounts() {
    const c = { ok: 0, high: 0, sat: 0, none: 0 };
    for (const l of this.links.values()) c[l.level]++;
    const key = JSON.stringify(c);
    if (key === this.countKey) return;
    this.countKey = key;
    this.counts.replaceChildren(...['ok', 'high', 'sat', 'none'].map((l) => h('li', { 'data-level': l }, h('span', { class: `swatch util-${l}`, 'aria-hidden': 'true' }), `${nf.format(c[l])} ${UTIL_TEXT[l]}`)));
  },
  describe(name) {
    const n = S.nodes.get(name);
    const p = this.pos.get(name);
    if (!n || !p) return;
    for (const el of this.highlighted || []) el.classList.remove('hl');
    const declared = this.verified.filter((v) => v.aDev === name || v.bDev === name);
    this.highlighted = [this.upEls.get(name),
      ...[...this.peerEls.values()].filter((el) => el.dataset.from === name || el.dataset.to === name),
      ...declared.map((v) => this.declEls.get(v.key))].filter(Boolean);
    for (const el of this.highlighted) el.classList.add('hl');
    if (!this.labels) {
      this.hover.textContent = name;
      this.hover.setAttribute('x', (p.x + this.r + 4).toFixed(1));
      this.hover.setAttribute('y', (p.y - this.r - 4).toFixed(1));
      this.hover.removeAttribute('hidden');
    }
    const peers = (n.scopes || []).filter((s) => s.scope.startsWith('peer:'));
    let verify;
    if (!T.topology) verify = h('p', { class: 'muted', text: 'Link verification: unverified (no topology applied)' });
    else if (!declared.length) verify = h('p', { class: 'muted', text: `Link verification: unverified (${name} is not in topology version ${T.topology.version})` });
    else verify = [h('p', { class: 'muted', text: 'Declared links:' }), h('ul', { class: 'decl-list' }, declared.map((v) => h('li', { 'data-status': v.status }, h('span', { class: 'mono', text: v.key }), ` — ${verifyText(v)}`)))];
    this.info.replaceChildren(...[
      h('h3', {}, h('a', { href: nodeHref(name), text: name }), ' ', badge(n.state), n.stale ? h('span', { class: 'badge stale-badge', text: 'stale' }) : null),
      h('p', { text: `group ${n.group}; measured ${fmtRate(n.rate_bps)} of ${fmtRate(n.leased_bps)} leased (${n.leased_bps ? fmtPct(n.rate_bps / n.leased_bps) : 'no lease'})` }),
      peers.length ? h('ul', {}, peers.map((s) => h('li', { text: `${s.scope}: ${fmtRate(s.rate_bps)} of ${fmtRate(s.leased_bps)} (${s.state})` }))) : null,
      verify].flat().filter(Boolean));
  },
};

// ---------------------------------------------------------------------------------------
// Quota view: the quota tree with edit forms, new group, grant, add node.

const quotaView = {
  el: null,
  data: null,
  expanded: new Set(),
  editing: null,

  mount() {
    this.el = $('#view-quota');
    this.treeBody = h('tbody', { id: 'quota-tree' });
    this.treeErr = h('p', { class: 'form-error', id: 'quota-error', role: 'alert', hidden: true });
    this.treeMsg = h('p', { class: 'form-ok', id: 'quota-msg', role: 'status' });
    this.treeBody.addEventListener('click', (e) => {
      const b = e.target.closest('button[data-action]');
      if (!b) return;
      const name = b.dataset.name;
      if (b.dataset.action === 'expand') {
        if (this.expanded.has(name)) this.expanded.delete(name);
        else this.expanded.add(name);
      } else if (b.dataset.action === 'edit') this.editing = this.editing === name ? null : name;
      this.renderTree();
      if (b.dataset.action === 'edit' && this.editing) $('#quota-edit-capacity')?.focus();
    });

    // New group
    const g = {
      name: field('group-name', 'Group name', { placeholder: 'rack-b', required: true }),
      cap: field('group-capacity', 'Capacity', { placeholder: '400G', hint: RATE_EXAMPLES, required: true }),
      alg: field('group-alg', 'Algorithm', { options: [{ value: 'static', label: 'static' }, { value: 'fair_share', label: 'fair share' }] }),
    };
    const gErr = h('p', { class: 'form-error', id: 'group-error', role: 'alert', hidden: true });
    const gOk = h('p', { class: 'form-ok', id: 'group-result', role: 'status' });
    const gForm = h('form', { novalidate: true, id: 'group-form' }, h('div', { class: 'grid' }, Object.values(g).map((x) => x.wrap)), gErr,
      h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary', text: 'Create group' })), gOk);
    gForm.addEventListener('submit', async (e) => {
      e.preventDefault();
      formError(gErr, null);
      gOk.textContent = '';
      fieldError(g.name, null);
      fieldError(g.cap, null);
      const name = g.name.input.value.trim();
      let cap;
      let bad = false;
      if (!name) { fieldError(g.name, 'a group needs a name'); bad = true; } else if (this.exists(name)) { fieldError(g.name, `\`${name}\` already exists in the quota tree; use its Edit button`); bad = true; }
      try { cap = parseRate(g.cap.input.value); } catch (ex) { fieldError(g.cap, ex.message); bad = true; }
      if (bad) return;
      try {
        await api('PUT', `/v1/quota/${encodeURIComponent(name)}`, { capacity_bps: cap, algorithm: g.alg.input.value });
        gOk.textContent = `Group ${name} created with ${fmtRate(cap)}.`;
        g.name.input.value = '';
        this.load();
      } catch (ex) {
        formError(gErr, ex.message, ex.status);
      }
    });

    // Add node
    const n = {
      name: field('addnode-name', 'Node name', { placeholder: 'gpu-017', required: true }),
      group: field('addnode-group', 'Group', { options: ['default'] }),
      cap: field('addnode-capacity', 'Capacity (optional)', { placeholder: 'the group’s', hint: RATE_EXAMPLES }),
      ttl: field('addnode-ttl', 'Join token valid for (optional)', { placeholder: '1h', hint: DURATION_EXAMPLES }),
    };
    this.addGroupSelect = n.group.input;
    const nErr = h('p', { class: 'form-error', id: 'addnode-error', role: 'alert', hidden: true });
    const nOut = h('div', { id: 'addnode-result', class: 'token-out', hidden: true });
    const nForm = h('form', { novalidate: true, id: 'addnode-form' }, h('div', { class: 'grid' }, Object.values(n).map((x) => x.wrap)), nErr,
      h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary', text: 'Add node' })), nOut);
    nForm.addEventListener('submit', async (e) => {
      e.preventDefault();
      formError(nErr, null);
      for (const x of Object.values(n)) fieldError(x, null);
      nOut.hidden = true;
      const body = { name: n.name.input.value.trim(), group: n.group.input.value || undefined };
      let bad = false;
      if (!body.name) { fieldError(n.name, 'a node needs a name'); bad = true; }
      try { if (n.cap.input.value.trim()) body.capacity_bps = parseRate(n.cap.input.value); } catch (ex) { fieldError(n.cap, ex.message); bad = true; }
      try {
        if (n.ttl.input.value.trim()) {
          const s = parseDuration(n.ttl.input.value);
          if (!(s >= 1)) throw new Error('the token must stay valid at least 1 s');
          body.token_ttl_s = Math.round(s);
        }
      } catch (ex) { fieldError(n.ttl, ex.message); bad = true; }
      if (bad) return;
      try {
        const r = await api('POST', '/v1/nodes', body);
        n.name.input.value = '';
        const code = h('code', { id: 'addnode-token', text: r.join_token });
        const copy = h('button', { type: 'button', text: 'Copy' });
        copy.addEventListener('click', async () => {
          try {
            await navigator.clipboard.writeText(r.join_token);
            copy.textContent = 'Copied';
          } catch {
            getSelection().selectAllChildren(code);
            copy.textContent = 'Selected: press Ctrl+C';
          }
        });
        nOut.replaceChildren(
          h('p', {}, h('strong', { text: `Node ${r.name} added. ` }), `Its one-time join token is shown only now; it works once and expires at ${fmtTime(r.token_expires_at_unix_ms)}.`),
          h('p', { class: 'token' }, code, ' ', copy),
          h('p', { class: 'hint' }, 'Start its agent with ', h('code', { text: `nicwarden agent --node ${r.name} --token <token> --controller https://…` })));
        nOut.hidden = false;
        this.load();
      } catch (ex) {
        formError(nErr, ex.message, ex.status);
      }
    });

    this.el.append(
      h('div', { class: 'view-head' }, h('h1', { id: 'quota-title', text: 'Quota & leases' })),
      h('section', { class: 'card', 'aria-labelledby': 'quota-tree-title' },
        h('h2', { id: 'quota-tree-title', text: 'Quota tree' }),
        h('p', { class: 'hint', text: 'The fabric’s capacity is divided among groups, a group’s among its nodes. Allocated = granted lease rates.' }),
        this.treeErr, this.treeMsg,
        h('div', { class: 'table-wrap' }, h('table', { class: 'quota' },
          h('thead', {}, h('tr', {}, ['Name', 'Algorithm', 'Capacity', 'Allocated', ''].map((c, i) => h('th', { scope: 'col', class: i === 2 || i === 3 ? 'num' : null, text: c })))),
          this.treeBody))),
      h('section', { class: 'card', 'aria-labelledby': 'grant-title' }, h('h2', { id: 'grant-title', text: 'Grant a lease' }), leaseForm({ prefix: 'grant', onDone: () => this.load() })),
      h('div', { class: 'two' },
        h('section', { class: 'card', 'aria-labelledby': 'addnode-title' }, h('h2', { id: 'addnode-title', text: 'Add a node' }), nForm),
        h('section', { class: 'card', 'aria-labelledby': 'group-title' }, h('h2', { id: 'group-title', text: 'Add a group' }), gForm)));
  },
  reset() {
    this.data = null;
    this.editing = null;
    this.treeBody?.replaceChildren();
  },
  exists(name) {
    const t = this.data?.tree;
    return name === 'fabric' || !!t?.groups?.[name] || !!t?.nodes?.[name];
  },
  show() {
    fillNodeOptions($('#grant-node'));
    this.load();
  },
  onReload() { this.load(); },
  onFleet() { fillNodeOptions($('#grant-node')); },
  onEvent(evs) {
    // Allocations change on these (not on renewals).
    if (evs.some((e) => /^(quota\.set|lease\.(granted|changed|revoked|expired|exhausted)|node\.(added|removed))$/.test(e.kind))) {
      throttle('quota', 1000, () => current.view === this && this.load());
    }
  },
  async load() {
    try {
      const d = await api('GET', '/v1/quota');
      this.data = d;
      this.renderTree();
      const groups = Object.keys(d.tree.groups || {}).sort(collator.compare);
      const sel = this.addGroupSelect;
      const keep = sel.value || 'default';
      sel.replaceChildren(...groups.map((g) => h('option', { value: g, text: g })));
      sel.value = groups.includes(keep) ? keep : groups[0] ?? '';
    } catch (e) {
      if (e.status !== 401) formError(this.treeErr, `Loading the quota tree failed: ${e.message}`);
    }
  },
  renderTree() {
    const d = this.data;
    if (!d) return;
    // Keep an open edit form as it is (the tree reloads on every lease event).
    if (this.editing && this.treeBody.querySelector('#quota-edit-form') && this.editingKey === this.editing) {
      this.updateNumbers();
      return;
    }
    this.editingKey = this.editing;
    const t = d.tree;
    const alloc = d.allocated_bps || {};
    const rows = [];
    const row = (name, kind, level, q, extra) => {
      const a = alloc[name] ?? 0;
      const r = q.capacity_bps > 0 ? a / q.capacity_bps : 0;
      const m = meter();
      setMeter(m, r, r > 1 ? 'sat' : r >= 0.9 ? 'high' : 'ok');
      const allocText = h('span', { class: 'num-text', text: `${fmtRate(a)} (${fmtPct(r)})` });
      const tr = h('tr', { 'data-quota': name, 'data-kind': kind, class: `level-${level}` },
        h('th', { scope: 'row' }, h('span', { class: 'indent' }, extra || null, h('span', { class: 'kind-tag', text: kind }), ' ', name)),
        h('td', { text: q.algorithm === 'fair_share' ? 'fair share' : q.algorithm }),
        h('td', { class: 'num', text: fmtRate(q.capacity_bps) }),
        h('td', { class: 'num' }, h('span', { class: 'cell-meter', 'data-alloc': name }, allocText, m.el)),
        h('td', { class: 'actions' }, h('button', { type: 'button', 'data-action': 'edit', 'data-name': name, 'aria-expanded': this.editing === name ? 'true' : 'false', text: 'Edit' })));
      rows.push(tr);
      if (this.editing === name) rows.push(this.editRow(name, kind, q));
    };
    row('fabric', 'fabric', 0, t.fabric);
    const nodesByGroup = new Map();
    for (const [name, q] of Object.entries(t.nodes || {})) {
      if (!nodesByGroup.has(q.group)) nodesByGroup.set(q.group, []);
      nodesByGroup.get(q.group).push(name);
    }
    for (const g of Object.keys(t.groups || {}).sort(collator.compare)) {
      const members = (nodesByGroup.get(g) || []).sort(collator.compare);
      const open = this.expanded.has(g);
      const toggle = h('button', { type: 'button', class: 'ghost tiny', 'data-action': 'expand', 'data-name': g, 'aria-expanded': open ? 'true' : 'false', title: open ? 'Hide nodes' : 'Show nodes', text: `${open ? '▾' : '▸'} ${members.length}` });
      row(g, 'group', 1, t.groups[g], toggle);
      if (open) for (const n of members) row(n, 'node', 2, t.nodes[n]);
    }
    this.treeBody.replaceChildren(...rows);
  },
  updateNumbers() {
    const alloc = this.data.allocated_bps || {};
    for (const el of this.treeBody.querySelectorAll('[data-alloc]')) {
      const name = el.dataset.alloc;
      const q = name === 'fabric' ? this.data.tree.fabric : this.data.tree.groups?.[name] ?? this.data.tree.nodes?.[name];
      if (!q) continue;
      const a = alloc[name] ?? 0;
      const r = q.capacity_bps > 0 ? a / q.capacity_bps : 0;
      setText(el.firstChild, `${fmtRate(a)} (${fmtPct(r)})`);
    }
  },
  editRow(name, kind, q) {
    const cap = field('quota-edit-capacity', `Capacity of ${name}`, { value: rateInput(q.capacity_bps), hint: RATE_EXAMPLES });
    const alg = field('quota-edit-alg', 'Algorithm', { options: [{ value: 'static', label: 'static' }, { value: 'fair_share', label: 'fair share' }], value: q.algorithm });
    const groups = Object.keys(this.data.tree.groups || {}).sort(collator.compare);
    const grp = kind === 'node' ? field('quota-edit-group', 'Group', { options: groups, value: q.group }) : null;
    const err = h('p', { class: 'form-error', id: 'quota-edit-error', role: 'alert', hidden: true });
    const cancel = h('button', { type: 'button', text: 'Cancel' });
    cancel.addEventListener('click', () => {
      this.editing = null;
      this.renderTree();
    });
    const form = h('form', { id: 'quota-edit-form', novalidate: true, 'data-name': name },
      h('div', { class: 'grid' }, cap.wrap, alg.wrap, grp?.wrap), err,
      h('div', { class: 'actions' }, cancel, h('button', { type: 'submit', class: 'primary', text: 'Save' })));
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      fieldError(cap, null);
      formError(err, null);
      let bps;
      try {
        bps = parseRate(cap.input.value);
      } catch (ex) {
        fieldError(cap, ex.message);
        cap.input.focus();
        return;
      }
      if (bps < q.capacity_bps) {
        const c = await confirmDialog({
          title: `Reduce the capacity of ${name}?`,
          message: `From ${fmtRate(q.capacity_bps)} to ${fmtRate(bps)}. ${fmtRate(this.data.allocated_bps?.[name] ?? 0)} is granted now; the controller refuses the change if a lease guaranteed by static allocation would be cut.`,
          confirmLabel: 'Reduce capacity',
        });
        if (!c.ok) return;
      }
      const body = { capacity_bps: bps, algorithm: alg.input.value };
      if (grp && grp.input.value !== q.group) body.group = grp.input.value;
      try {
        await api('PUT', `/v1/quota/${encodeURIComponent(name)}`, body);
        this.treeMsg.textContent = `${name}: capacity ${fmtRate(bps)}, ${body.algorithm === 'fair_share' ? 'fair share' : 'static'}${body.group ? `, group ${body.group}` : ''}.`;
        this.editing = null;
        this.load();
      } catch (ex) {
        formError(err, ex.message, ex.status);
      }
    });
    return h('tr', { class: 'edit-row' }, h('td', { colspan: 5 }, form));
  },
};

// ---------------------------------------------------------------------------------------
// Routing

const VIEWS = { fleet: fleetView, node: nodeView, topology: topoView, quota: quotaView, events: eventsView };
const TITLES = { fleet: 'Fleet', node: 'Node', topology: 'Topology', quota: 'Quota & leases', events: 'Events' };
const current = { key: null, view: null, param: null };

function parseHash() {
  const parts = location.hash.replace(/^#\/?/, '').split('/');
  const key = parts[0] || 'fleet';
  if (key === 'node' && parts[1]) return { key, params: { name: decodeURIComponent(parts.slice(1).join('/')) } };
  if (VIEWS[key] && key !== 'node') return { key, params: {} };
  return null;
}

function route() {
  if (!S.token) return;
  const r = parseHash();
  if (!r) {
    location.replace('#/fleet');
    return;
  }
  const v = VIEWS[r.key];
  if (current.view && current.view !== v) {
    current.view.hide?.();
    current.view.el.hidden = true;
  }
  current.key = r.key;
  current.view = v;
  v.el.hidden = false;
  for (const a of document.querySelectorAll('nav a[data-view]')) {
    if (a.dataset.view === r.key) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  document.title = `${r.key === 'node' ? r.params.name : TITLES[r.key]} · nicwarden`;
  refreshDatalists();
  v.show(r.params);
}

function everySecond() {
  if (!S.token) return;
  updateHealth();
  try {
    if (datalistVersion !== S.fleetVersion) refreshDatalists();
    // Views showing verification data refresh it at least every T_REFRESH_MS.
    if (current.view?.usesTopology && !T.loading && Date.now() - T.fetchedAt >= T_REFRESH_MS) loadTopology();
    // Views refresh their clocks with each tick; the timer covers a quiet or broken stream.
    if (Date.now() - S.lastTickLocal > 1500) current.view?.onSecond?.();
  } catch (e) {
    console.error(e);
  }
}

function init() {
  for (const v of Object.values(VIEWS)) v.mount();
  $('#signin-form').addEventListener('submit', onSigninSubmit);
  $('#signout').addEventListener('click', () => signOut());
  $('#confirm-reason').addEventListener('keydown', (e) => {
    if (e.key === 'Enter') {
      e.preventDefault();
      $('#confirm-ok').click();
    }
  });
  window.addEventListener('hashchange', route);
  setInterval(everySecond, 1000);
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) startSession(token, null);
  else showSignin();
}

init();
