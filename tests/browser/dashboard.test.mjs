// Browser tests of the nicwarden dashboard: Playwright (playwright-core, no bundled browser)
// driving the system's headless Chromium, run by Node's built-in test runner:
//
//   NW_URL=http://127.0.0.1:7080 NW_TOKEN=... NW_ARTIFACTS=/tmp/shots \
//   NW_EXPECT='{"node":"sim-0002","scope":"egress","rate_bps":100000000,"revoke_node":"sim-0003"}' \
//   node --test tests/browser/dashboard.test.mjs
//
// NW_EXPECT describes the simulated feed:
//   node, scope, rate_bps  a node whose `scope` reports `rate_bps` measured, under an active lease
//   revoke_node            a node with an active lease in `scope` that the revoke test may revoke
//   large (optional)       true for a fleet of 1,000 nodes: runs the performance test
//   stale_node (optional)  a node whose agent does not report: its fleet row must stand out
//   grant (optional)       {node, scope, rate} for the grant test's valid grant (revoked
//                          again at the end). Default: node = `revoke_node`,
//                          scope = `peer:<node>`, rate 10Mbit, so that `node` stays untouched.
// Env: NW_CHROMIUM (default /usr/bin/chromium), NW_WAIT_MS (default 20000: every wait's bound).
// Every test saves a full-page screenshot into NW_ARTIFACTS, also when it fails.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const BASE = (process.env.NW_URL || 'http://127.0.0.1:7080').replace(/\/+$/, '');
const TOKEN = process.env.NW_TOKEN || '';
const ARTIFACTS = process.env.NW_ARTIFACTS || fs.mkdtempSync(path.join(os.tmpdir(), 'nw-dashboard-'));
const EXPECT = JSON.parse(process.env.NW_EXPECT || '{}');
const WAIT = Number(process.env.NW_WAIT_MS || 20000);
const NODE = EXPECT.node;
const SCOPE = EXPECT.scope || 'egress';
const RATE = EXPECT.rate_bps;
const REVOKE_NODE = EXPECT.revoke_node;
const GRANT = {
  node: EXPECT.grant?.node || REVOKE_NODE,
  scope: EXPECT.grant?.scope || `peer:${NODE}`,
  rate: EXPECT.grant?.rate || '10Mbit',
};

assert.ok(TOKEN, 'NW_TOKEN (the operator token) is required');
assert.ok(NODE && RATE && REVOKE_NODE, 'NW_EXPECT needs node, rate_bps and revoke_node');
fs.mkdirSync(ARTIFACTS, { recursive: true });

let ctx;
let userDataDir;

before(async () => {
  userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'nw-chromium-'));
  // Playwright passes --user-data-dir itself for a persistent context (a fresh temp dir).
  ctx = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.NW_CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: { width: 1400, height: 900 },
  });
});

after(async () => {
  await ctx?.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------
// Helpers

/** A fresh tab (its own sessionStorage, so signed out); screenshot and close at the end. */
async function withPage(name, fn) {
  const page = await ctx.newPage();
  page.setDefaultTimeout(WAIT);
  const problems = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && /Content Security Policy|Refused to|Uncaught/i.test(m.text())) problems.push(`console: ${m.text()}`);
  });
  try {
    await fn(page);
  } finally {
    await page.screenshot({ path: path.join(ARTIFACTS, `${name}.png`), fullPage: true }).catch(() => {});
    await page.close();
  }
  assert.deepEqual(problems, [], 'the page logged errors');
}

/** Polls `fn` until `pred` holds (like expect.poll), bounded by WAIT. */
async function poll(fn, pred, what, timeout = WAIT) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    last = await fn();
    if (pred(last)) return last;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}; last value: ${JSON.stringify(last)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function api(method, p, body, token = TOKEN) {
  const res = await fetch(BASE + p, {
    method,
    headers: { Authorization: `Bearer ${token}`, ...(body ? { 'Content-Type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null };
}

async function signIn(page) {
  await page.goto(`${BASE}/`);
  await page.locator('#signin-token').fill(TOKEN);
  await page.locator('#signin-form button[type=submit]').click();
  await page.locator('#app').waitFor({ state: 'visible' });
  await page.locator('#health-conn[data-conn="connected"]').waitFor();
}

/** Same-document navigation (no reload): the app must follow the hash. */
async function go(page, hash) {
  await page.evaluate((h) => { location.hash = h; }, hash);
}

const scopeOf = (l) => (typeof l.terms.scope === 'string' ? l.terms.scope
  : l.terms.scope.kind === 'egress' ? 'egress' : `peer:${l.terms.scope.peer}`);

// ---------------------------------------------------------------------------------------

test('1. sign in: a wrong token shows the server\'s error, the right one opens the fleet', { timeout: 4 * WAIT }, async () => {
  await withPage('01-signin', async (page) => {
    await page.goto(`${BASE}/`);
    const panel = page.locator('#signin');
    await panel.waitFor({ state: 'visible' });
    assert.match(await panel.innerText(), /operator\.token/, 'the panel says where the token is');
    assert.equal(await page.locator('#app').isVisible(), false);

    const wrong = await api('GET', '/v1/telemetry/fleet', null, 'not-the-operator-token');
    assert.equal(wrong.status, 401);
    await page.locator('#signin-token').fill('not-the-operator-token');
    await page.locator('#signin-form button[type=submit]').click();
    const err = page.locator('#signin-error');
    await err.waitFor({ state: 'visible' });
    assert.equal((await err.innerText()).trim(), wrong.body.error, 'the server\'s error text, verbatim');
    assert.equal(await page.locator('#app').isVisible(), false);
    assert.equal(await page.evaluate(() => sessionStorage.length), 0, 'a wrong token is not kept');

    await page.locator('#signin-token').fill(TOKEN);
    await page.locator('#signin-form button[type=submit]').click();
    await page.locator('#fleet-table tbody tr[data-node]').first().waitFor();
    await page.locator('#health-conn[data-conn="connected"]').waitFor();
    assert.equal(await page.locator('#signin').isVisible(), false);
    await page.screenshot({ path: path.join(ARTIFACTS, '01-signin-fleet.png'), fullPage: true });

    // Sign out returns to the panel and forgets the token.
    await page.locator('#signout').click();
    await panel.waitFor({ state: 'visible' });
    assert.equal(await page.evaluate(() => sessionStorage.length), 0);
  });
});

test('2. fleet view: the expected node is active with live data', { timeout: 4 * WAIT }, async () => {
  await withPage('02-fleet', async (page) => {
    await signIn(page);
    const row = page.locator(`#fleet-table tr[data-node="${NODE}"]`);
    await row.waitFor();
    await poll(() => row.locator('.badge[data-state]').getAttribute('data-state'), (s) => s === 'active', `${NODE} to be active`);
    assert.equal((await row.locator('.badge[data-state]').innerText()).trim(), 'active', 'the state is also text');
    assert.match(await row.innerText(), /bit\/s/, 'rates in human units');

    // Live: the last-report time moves forward without a reload, and the age text is human.
    const age = row.locator('td[data-last-report-ms]');
    const first = Number(await age.getAttribute('data-last-report-ms'));
    await poll(async () => Number(await age.getAttribute('data-last-report-ms')), (t) => t > first, 'a newer report');
    assert.match(await age.innerText(), /^\d+ (s|m)( \d+ s)? ago$/);

    // The measured rate of the node is shown next to the lease.
    const measured = Number(await row.locator('td.rate').getAttribute('data-bps'));
    assert.ok(measured > 0, `measured rate ${measured}`);

    if (EXPECT.stale_node) {
      // The summary's "stale" chip filters the table to stale agents; the row stands out.
      const stale = page.locator(`#fleet-table tr[data-node="${EXPECT.stale_node}"]`);
      await poll(() => stale.getAttribute('data-stale'), (s) => s === 'true', `${EXPECT.stale_node} to be stale`);
      await page.locator('#fleet-summary button[data-filter-state="stale"]').click();
      assert.equal(await page.locator('#fleet-state').inputValue(), 'stale');
      await stale.waitFor({ state: 'visible' });
      await stale.locator('.stale-badge').waitFor({ state: 'visible' });
      assert.equal((await stale.locator('.stale-badge').innerText()).trim().toLowerCase(), 'stale', 'a "stale" badge, in text');
      assert.ok((await stale.getAttribute('class')).split(' ').includes('stale'), 'a distinct row style');
      const shown = await page.locator('#fleet-table tbody tr:not([hidden])').evaluateAll((rs) => rs.map((r) => r.dataset.stale));
      assert.ok(shown.length >= 1 && shown.every((x) => x === 'true'), 'only stale agents are listed');
      await page.screenshot({ path: path.join(ARTIFACTS, '02-fleet-stale.png'), fullPage: true });
      await page.locator('#fleet-state').selectOption('');
    }

    // Filtering by text leaves only matching rows; the state filter keeps the node.
    await page.locator('#fleet-filter').fill(NODE);
    await poll(() => page.locator('#fleet-table tbody tr:not([hidden])').evaluateAll((rs) => rs.map((r) => r.dataset.node)),
      (names) => names.length >= 1 && names.every((n) => n.includes(NODE)), 'the filter to apply');
    await page.locator('#fleet-state').selectOption('active');
    assert.ok(await row.isVisible());
    await page.locator('#fleet-state').selectOption('revoked');
    await poll(() => row.isVisible(), (v) => v === false, 'the state filter to hide the active node');
    await page.locator('#fleet-state').selectOption('');
    await page.locator('#fleet-filter').fill('');
  });
});

test('3. node view: the chart\'s latest point is the fed rate, live', { timeout: 4 * WAIT }, async () => {
  await withPage('03-node-chart', async (page) => {
    await signIn(page);
    await go(page, `#/node/${encodeURIComponent(NODE)}`);
    await page.locator(`#node-title[data-node="${NODE}"]`).waitFor();
    const chart = page.locator(`figure.chart[data-scope="${SCOPE}"]`);
    await chart.waitFor();
    const near = (v) => v != null && Math.abs(Number(v) - RATE) <= RATE * 0.01;
    await poll(() => chart.getAttribute('data-latest-rate-bps'), near, `the latest ${SCOPE} point to be ${RATE} bit/s ±1%`);
    const t1 = Number(await chart.getAttribute('data-latest-t'));
    // Extended live by ticks: a newer point arrives, still at the fed rate.
    const t2 = await poll(async () => Number(await chart.getAttribute('data-latest-t')), (t) => t > t1, 'a newer point');
    assert.ok(t2 > t1);
    assert.ok(near(await chart.getAttribute('data-latest-rate-bps')), 'the newer point is at the fed rate too');
    // The chart draws the measured line, the lease and the floor, with a legend.
    const d = await chart.locator('path.measured').getAttribute('d');
    assert.ok(d && d.length > 5, 'a measured line');
    assert.ok((await chart.locator('path.leased').getAttribute('d')).length > 5, 'a lease step line');
    assert.ok(Number(await chart.getAttribute('data-leased-bps')) > 0, 'the leased rate is known');
    assert.match(await chart.locator('.legend').innerText(), /measured[\s\S]*leased[\s\S]*floor/);
    assert.match(await chart.locator('svg').innerHTML(), /bit\/s/, 'the y axis carries its unit');

    // The range selector: 5 minutes is the default, 1-second points, HH:MM:SS on the x axis.
    const rangeButton = (r) => page.locator(`#node-range button[data-range="${r}"]`);
    const xLabels = () => chart.locator('svg text.tick[text-anchor="middle"]').evaluateAll((ts) => ts.map((t) => t.textContent));
    assert.equal(await chart.getAttribute('data-range'), '5m');
    assert.equal(await chart.getAttribute('data-step-ms'), '1000');
    assert.equal(await rangeButton('5m').getAttribute('aria-pressed'), 'true');
    const labels5m = await xLabels();
    assert.ok(labels5m.length >= 2 && labels5m.every((l) => /^\d\d:\d\d:\d\d$/.test(l)), `5-minute axis labels: ${labels5m}`);
    await page.screenshot({ path: path.join(ARTIFACTS, '03-node-chart-5m.png'), fullPage: true });

    // 1 hour: still 1-second points and live; the latest point is still the fed rate.
    await rangeButton('1h').click();
    await poll(() => chart.getAttribute('data-range'), (r) => r === '1h', 'the chart to show 1 hour');
    assert.equal(await chart.getAttribute('data-step-ms'), '1000');
    assert.equal(await rangeButton('1h').getAttribute('aria-pressed'), 'true');
    assert.equal(await rangeButton('5m').getAttribute('aria-pressed'), 'false');
    assert.match(await page.locator('#node-charts-title').innerText(), /last hour/);
    await poll(() => chart.getAttribute('data-latest-rate-bps'), near, `the 1-hour chart's latest point to be ${RATE} bit/s ±1%`);
    const h1 = Number(await chart.getAttribute('data-latest-t'));
    await poll(async () => Number(await chart.getAttribute('data-latest-t')), (t) => t > h1, 'a newer point in the 1-hour chart');
    assert.ok(near(await chart.getAttribute('data-latest-rate-bps')), 'the newer point is at the fed rate too');
    assert.ok((await chart.locator('path.measured').getAttribute('d')).length > 5, 'a measured line over the hour');
    assert.ok((await chart.locator('path.leased').getAttribute('d')).length > 5, 'a lease step line over the hour');
    const labels1h = await xLabels();
    assert.ok(labels1h.length >= 2 && labels1h.every((l) => /^\d\d:\d\d$/.test(l)), `1-hour axis labels: ${labels1h}`);
    await page.screenshot({ path: path.join(ARTIFACTS, '03-node-chart-1h.png'), fullPage: true });

    // 24 hours: per-minute points. A young fleet may have no closed minute yet: then the
    // chart says so in words; otherwise it draws the mean line (and the peak band).
    await rangeButton('24h').click();
    await poll(() => chart.getAttribute('data-range'), (r) => r === '24h', 'the chart to show 24 hours');
    assert.equal(await chart.getAttribute('data-step-ms'), '60000');
    assert.match(await page.locator('#node-charts-title').innerText(), /last 24 hours/);
    const shown = await poll(async () => ({
      d: await chart.locator('path.measured').getAttribute('d'),
      msg: await chart.locator('svg text.nodata').evaluateAll((ts) => ts.map((t) => t.textContent).join(' ')),
    }), ({ d, msg }) => (d && d.length > 5) || /no per-minute data yet/i.test(msg), 'a per-minute line or "no per-minute data yet"');
    if (shown.d && shown.d.length > 5) {
      // The latest closed minute's mean: 0 if that minute came before the lease, at most the fed rate.
      const mean = Number(await chart.getAttribute('data-latest-rate-bps'));
      assert.ok(Number.isFinite(mean) && mean >= 0 && mean <= RATE * 1.05, `the latest minute's mean rate: ${mean}`);
      assert.ok(Number(await chart.getAttribute('data-latest-t')) % 60000 === 0, 'per-minute points fall on minutes');
    }
    assert.match(await chart.locator('.legend').innerText(), /measured[\s\S]*peak[\s\S]*leased[\s\S]*floor/);
    const labels24h = await xLabels();
    assert.ok(labels24h.every((l) => /^\d\d:\d\d$/.test(l)), `24-hour axis labels: ${labels24h}`);
    // Refreshed once a minute, not redrawn on every tick: count redraws over ~3.5 ticks
    // (one is allowed: the minute's refresh may fall into the window).
    const redraws = await chart.locator('svg').evaluate(async (svg) => {
      let n = 0;
      const mo = new MutationObserver((records) => { n += records.length ? 1 : 0; });
      mo.observe(svg, { childList: true });
      await new Promise((r) => setTimeout(r, 3500));
      mo.disconnect();
      return n;
    });
    assert.ok(redraws <= 1, `the 24-hour chart was redrawn ${redraws} times in 3.5 s`);
    await page.screenshot({ path: path.join(ARTIFACTS, '03-node-chart-24h.png'), fullPage: true });

    // Back to 5 minutes: live again.
    await rangeButton('5m').click();
    await poll(() => chart.getAttribute('data-range'), (r) => r === '5m', 'the chart to show 5 minutes again');
    await poll(() => chart.getAttribute('data-latest-rate-bps'), near, `the 5-minute chart's latest point to be ${RATE} bit/s ±1%`);
  });
});

test('4. grant form: client-side error, server error verbatim, a valid grant lands in the lease table', { timeout: 6 * WAIT }, async () => {
  await withPage('04-grant', async (page) => {
    await signIn(page);
    await go(page, '#/quota');
    await page.locator(`#grant-node option[value="${GRANT.node}"]`).waitFor({ state: 'attached' });
    await page.locator('#grant-node').selectOption(GRANT.node);
    await page.locator('#grant-scope').fill(GRANT.scope);

    // 1) a bad rate: an inline error next to the field, no request.
    await page.locator('#grant-rate').fill('fast');
    await page.locator('#grant-submit').click();
    const rateErr = page.locator('#grant-rate-error');
    await rateErr.waitFor({ state: 'visible' });
    assert.match(await rateErr.innerText(), /`fast` is not a rate/);
    assert.equal(await page.locator('#grant-rate').getAttribute('aria-invalid'), 'true');
    assert.equal(await page.locator('#grant-error').isVisible(), false);
    await page.locator('#grant-rate').fill('10MB');
    await page.locator('#grant-submit').click();
    await poll(() => rateErr.innerText(), (t) => /looks like bytes/.test(t), 'the bits-vs-bytes error');

    // 2) over the quota: the server refuses; its error is shown as it sent it.
    const huge = 900e12; // 900 Tbit/s
    const expected = await api('POST', '/v1/leases', { node: GRANT.node, scope: GRANT.scope, rate_bps: huge });
    assert.ok([409, 422].includes(expected.status), `the server refuses ${huge} bit/s (got ${expected.status})`);
    await page.locator('#grant-rate').fill('900T');
    await page.locator('#grant-submit').click();
    const serverErr = page.locator('#grant-error');
    await serverErr.waitFor({ state: 'visible' });
    assert.equal(await rateErr.isVisible(), false, 'the inline error is cleared');
    const digits = (s) => s.replace(/\d+/g, '#');
    assert.equal(digits((await serverErr.innerText()).trim()), digits(expected.body.error), 'the server\'s error, verbatim');
    assert.equal(await serverErr.getAttribute('data-status'), String(expected.status));

    // 3) a valid grant appears in the node's lease table.
    await page.locator('#grant-rate').fill(GRANT.rate);
    await page.locator('#grant-volume').fill('1GB');
    await page.locator('#grant-ttl').fill('30s');
    await page.locator('#grant-submit').click();
    const result = page.locator('#grant-result');
    const text = await poll(() => result.innerText(), (t) => /Lease \d+ granted/.test(t), 'the grant to succeed');
    assert.equal(await serverErr.isVisible(), false);
    const id = Number(text.match(/Lease (\d+)/)[1]);
    await result.locator('a').click(); // "Open NODE"
    const leaseRow = page.locator(`#node-leases tr[data-lease-id="${id}"]`);
    await leaseRow.waitFor();
    assert.equal(await leaseRow.getAttribute('data-state'), 'active');
    const cells = await leaseRow.innerText();
    assert.ok(cells.includes(GRANT.scope), `scope ${GRANT.scope} in "${cells}"`);
    assert.match(cells, /1 GB/);
    await page.screenshot({ path: path.join(ARTIFACTS, '04-grant-node.png'), fullPage: true });

    // Leave the fleet as we found it.
    const r = await api('POST', `/v1/leases/${id}/revoke`, { reason: 'browser test cleanup' });
    assert.equal(r.status, 200);

    // The quota tree: a bad capacity is caught inline; reducing one asks first (cancelled here).
    await go(page, '#/quota');
    const before = (await api('GET', '/v1/quota')).body.tree.fabric.capacity_bps;
    await page.locator('#quota-tree button[data-action="edit"][data-name="fabric"]').click();
    const cap = page.locator('#quota-edit-capacity');
    assert.ok((await cap.inputValue()).length > 0, 'the edit form is prefilled');
    await cap.fill('lots');
    await page.locator('#quota-edit-form button[type=submit]').click();
    await page.locator('#quota-edit-capacity-error').waitFor({ state: 'visible' });
    await cap.fill('1k');
    await page.locator('#quota-edit-form button[type=submit]').click();
    const dialog = page.locator('dialog#confirm');
    await dialog.waitFor({ state: 'visible' });
    assert.match(await dialog.innerText(), /Reduce the capacity of fabric/);
    await page.locator('#confirm-cancel').click();
    await dialog.waitFor({ state: 'hidden' });
    assert.equal((await api('GET', '/v1/quota')).body.tree.fabric.capacity_bps, before, 'cancel changes nothing');

    // Add a node: its one-time join token is shown; then remove it again.
    const name = `dash-test-${Date.now().toString(36)}`;
    await page.locator('#addnode-name').fill(name);
    await page.locator('#addnode-form button[type=submit]').click();
    const token = page.locator('#addnode-token');
    await token.waitFor({ state: 'visible' });
    assert.match(await token.innerText(), /^nwjt1\./);
    assert.match(await page.locator('#addnode-result').innerText(), /shown only now/);
    assert.equal((await api('DELETE', `/v1/nodes/${name}`)).status, 200);
  });
});

test('5. revoke from the node view with confirmation; the event appears live', { timeout: 6 * WAIT }, async () => {
  // Re-runnable: make sure there is an active lease to revoke.
  const leases = (await api('GET', `/v1/leases?node=${encodeURIComponent(REVOKE_NODE)}`)).body;
  let lease = leases.find((l) => l.state === 'active' && scopeOf(l) === SCOPE);
  if (!lease) {
    const g = await api('POST', '/v1/leases', { node: REVOKE_NODE, scope: SCOPE, rate_bps: 10_000_000 });
    assert.equal(g.status, 201, JSON.stringify(g.body));
    lease = g.body;
  }
  await withPage('05-revoke', async (page) => {
    await signIn(page);
    await page.evaluate(() => { window.__nwNoReload = 'still here'; });
    await go(page, `#/node/${encodeURIComponent(REVOKE_NODE)}`);
    const row = page.locator(`#node-leases tr[data-lease-id="${lease.id}"]`);
    await row.waitFor();
    assert.equal(await row.getAttribute('data-state'), 'active');
    const revoke = row.locator('button[data-action="revoke"]');
    const dialog = page.locator('dialog#confirm');

    // Renew: re-issued, no error.
    await row.locator('button[data-action="renew"]').click();
    await poll(() => page.locator('#node-msg').innerText(), (t) => t.includes(`Renewed lease ${lease.id}`), 'the renewal');
    assert.equal(await page.locator('#node-error').isVisible(), false);

    // Change: a prefilled form in a dialog; the new rate shows in the table.
    await row.locator('button[data-action="change"]').click();
    const change = page.locator('dialog#change-dialog');
    await change.waitFor({ state: 'visible' });
    assert.equal(await page.locator('#change-scope').inputValue(), SCOPE);
    assert.notEqual(await page.locator('#change-scope').getAttribute('readonly'), null, 'the scope cannot change');
    assert.ok((await page.locator('#change-rate').inputValue()).length > 0, 'the rate is prefilled');
    await page.locator('#change-rate').fill('50Mbit');
    await page.locator('#change-submit').click();
    await change.waitFor({ state: 'hidden' });
    await poll(() => row.locator('td').nth(2).innerText(), (t) => t.trim() === '50 Mbit/s', 'the changed rate in the table');
    assert.equal((await api('GET', `/v1/leases/${lease.id}`)).body.rate_bps, 50_000_000);

    // Cancel first: nothing happens.
    await revoke.click();
    await dialog.waitFor({ state: 'visible' });
    assert.match(await dialog.innerText(), new RegExp(`lease ${lease.id}`, 'i'));
    await page.locator('#confirm-cancel').click();
    await dialog.waitFor({ state: 'hidden' });
    assert.equal((await api('GET', `/v1/leases/${lease.id}`)).body.state, 'active', 'cancel does not revoke');

    // Confirm with a reason.
    await revoke.click();
    await dialog.waitFor({ state: 'visible' });
    await page.locator('#confirm-reason').fill('browser test: enclosure opened');
    await page.locator('#confirm-ok').click();
    await dialog.waitFor({ state: 'hidden' });
    await poll(() => row.getAttribute('data-state'), (s) => s === 'revoked', 'the lease to show revoked');
    assert.match(await row.innerText(), /revoked/);
    assert.match(await row.innerText(), /enclosure opened/, 'the reason is shown');
    assert.equal(await row.locator('button[data-action="revoke"]').count(), 0, 'no actions on a revoked lease');

    // The events view has the lease.revoked event, without a reload.
    await page.locator('nav a[data-view="events"]').click();
    const ev = page.locator(`#events-body tr[data-kind="lease.revoked"][data-node="${REVOKE_NODE}"]`).first();
    await ev.waitFor();
    assert.match(await ev.innerText(), new RegExp(String(lease.id)));
    // ... and the kind filter narrows the log to it.
    await page.locator('#ev-kind').fill('lease.revoked');
    await poll(() => page.locator('#events-body tr').evaluateAll((rs) => rs.map((r) => r.dataset.kind)),
      (kinds) => kinds.length > 0 && kinds.every((k) => k === 'lease.revoked'), 'the kind filter');
    assert.equal(await page.evaluate(() => window.__nwNoReload), 'still here', 'the page was not reloaded');
  });
});

test('6. topology view: one graph node per fleet node', { timeout: 4 * WAIT }, async () => {
  const fleet = (await api('GET', '/v1/telemetry/fleet')).body;
  const n = fleet.nodes.length;
  await withPage('06-topology', async (page) => {
    await signIn(page);
    await go(page, '#/topology');
    const graph = page.locator('#topology-graph');
    await graph.waitFor();
    await poll(() => graph.locator('.topo-node').count(), (c) => c === n, `${n} graph nodes`);
    await page.screenshot({ path: path.join(ARTIFACTS, '06-topology-graph.png'), fullPage: true });
    const names = await graph.locator('.topo-node').evaluateAll((as) => as.map((a) => a.dataset.node).sort());
    assert.deepEqual(names, fleet.nodes.map((x) => x.node).sort());
    assert.equal(await graph.locator('.uplink').count(), n, 'one node-switch link per node');
    const statuses = await graph.locator('.link').evaluateAll((ls) => [...new Set(ls.map((l) => l.dataset.status))]);
    assert.deepEqual(statuses, ['unverified'], 'every link carries a verification status');
    // The expected node's link is coloured by utilisation (it carries traffic under a lease).
    await poll(() => graph.locator(`.uplink[data-node="${NODE}"]`).getAttribute('data-level'), (l) => ['ok', 'high', 'sat'].includes(l), 'a utilisation level');
    // Clicking a node opens its node view.
    await graph.locator(`.topo-node[data-node="${NODE}"] circle`).click();
    await page.locator(`#node-title[data-node="${NODE}"]`).waitFor();
    assert.equal(await page.evaluate(() => location.hash), `#/node/${encodeURIComponent(NODE)}`);
  });
});

test('7. a 1,000-node fleet: renders, filters fast, sorts', { timeout: 6 * WAIT, skip: EXPECT.large ? false : 'NW_EXPECT has no "large": true' }, async () => {
  const fleet = (await api('GET', '/v1/telemetry/fleet')).body;
  const n = fleet.nodes.length;
  assert.ok(n >= 1000, `expected a fleet of at least 1,000 nodes, got ${n}`);
  await withPage('07-large', async (page) => {
    const t0 = Date.now();
    await signIn(page);
    const rows = page.locator('#fleet-table tbody tr[data-node]');
    await poll(() => rows.count(), (c) => c === n, `${n} rows`);
    const renderMs = Date.now() - t0;

    // Long tasks while ticks for the whole fleet arrive: the page stays responsive.
    await page.evaluate(() => {
      window.__nwLong = [];
      new PerformanceObserver((l) => { for (const e of l.getEntries()) window.__nwLong.push(e.duration); }).observe({ type: 'longtask', buffered: false });
    });
    const age = page.locator(`#fleet-table tr[data-node="${NODE}"] td[data-last-report-ms]`);
    let seen = Number(await age.getAttribute('data-last-report-ms'));
    for (let i = 0; i < 3; i++) {
      seen = await poll(async () => Number(await age.getAttribute('data-last-report-ms')), (t) => t > seen, 'a tick');
    }
    const longest = await page.evaluate(() => Math.max(0, ...window.__nwLong));
    assert.ok(longest < 500, `the longest main-thread task during ticks took ${longest} ms`);

    // Filtering to one node: measured inside the page (the synchronous work), then seen.
    const filter = await page.evaluate((name) => {
      const input = document.querySelector('#fleet-filter');
      const t = performance.now();
      input.value = name;
      input.dispatchEvent(new Event('input'));
      const ms = performance.now() - t;
      const visible = [...document.querySelectorAll('#fleet-table tbody tr')].filter((r) => !r.hidden).map((r) => r.dataset.node);
      return { ms, visible };
    }, NODE);
    assert.deepEqual(filter.visible, [NODE]);
    assert.ok(filter.ms < 100, `filtering took ${filter.ms} ms`);
    await page.locator('#fleet-filter').fill('');
    await poll(() => page.locator('#fleet-table tbody tr:not([hidden])').count(), (c) => c === n, 'all rows back');

    // Sorting: by name descending, then by measured rate both ways.
    const visibleOrder = (attr) => page.evaluate((a) => [...document.querySelectorAll('#fleet-table tbody tr')].filter((r) => !r.hidden).map((r) => (a ? Number(r.querySelector(a).dataset.bps) : r.dataset.node)), attr);
    const clickSort = (key) => page.evaluate((k) => {
      const t = performance.now();
      document.querySelector(`button[data-sort="${k}"]`).click();
      return performance.now() - t;
    }, key);
    const ms1 = await clickSort('node'); // already ascending by name: now descending
    const names = await visibleOrder(null);
    const desc = fleet.nodes.map((x) => x.node).sort((a, b) => b.localeCompare(a, undefined, { numeric: true }));
    assert.equal(names[0], desc[0]);
    assert.equal(names[names.length - 1], desc[desc.length - 1]);
    assert.equal(await page.locator('th[data-col="node"]').getAttribute('aria-sort'), 'descending');
    const ms2 = await clickSort('measured');
    const up = await visibleOrder('td.rate');
    assert.ok(up.every((v, i) => i === 0 || up[i - 1] <= v), 'ascending by measured rate');
    const ms3 = await clickSort('measured');
    const down = await visibleOrder('td.rate');
    assert.ok(down.every((v, i) => i === 0 || down[i - 1] >= v), 'descending by measured rate');
    for (const ms of [ms1, ms2, ms3]) assert.ok(ms < 250, `a sort took ${ms} ms`);
    console.log(`# large fleet: ${n} rows in ${renderMs} ms (sign-in to all rows), filter ${filter.ms.toFixed(1)} ms, sorts ${[ms1, ms2, ms3].map((x) => x.toFixed(1)).join('/')} ms, longest task ${longest} ms`);

    // The topology draws them all too.
    await go(page, '#/topology');
    await poll(() => page.locator('#topology-graph .topo-node').count(), (c) => c === n, `${n} graph nodes`);
  });
});

test('8. topology verification: an applied topology draws its links, unverified, and the findings panel says so', { timeout: 6 * WAIT }, async () => {
  // Two simulated nodes of the fleet, one leaf switch; a node–switch link each and a
  // node–node link. Simulated agents do not probe: every declared link stays "unverified"
  // and no finding is raised.
  const [A, B] = [NODE, REVOKE_NODE];
  const toml = [
    'version_note = "browser test"',
    `[nodes."${A}"]`, 'ports = ["fab0", "fab1"]',
    `[nodes."${B}"]`, 'ports = ["fab0", "fab1"]',
    '[switches.leaf-bt]', 'ports = ["p1", "p2"]',
    '[[links]]', `a = "${A}:fab0"`, 'b = "leaf-bt:p1"',
    '[[links]]', 'a = "leaf-bt:p2"', `b = "${B}:fab0"`, // written switch first: shown node first
    '[[links]]', `a = "${A}:fab1"`, `b = "${B}:fab1"`, 'rtt_max_us = 500',
  ].join('\n');
  const expectedLinks = [`${A}:fab0 <-> leaf-bt:p1`, `${B}:fab0 <-> leaf-bt:p2`, [`${A}:fab1`, `${B}:fab1`].sort().join(' <-> ')].sort();
  const before = (await api('GET', '/v1/topology/status')).body;
  await withPage('08-topology-verify', async (page) => {
    await signIn(page);
    await go(page, '#/topology');
    const panel = page.locator('#topo-findings');
    await panel.waitFor();
    if (before.version == null) {
      // Nothing applied yet: the panel says how to declare one.
      await poll(() => page.locator('#topo-findings-empty').innerText(), (t) => /no topology applied/i.test(t) && t.includes('nicwarden topology apply FILE'), 'the "no topology applied" state');
      assert.equal(await page.locator('#topology-graph .declared').count(), 0, 'no declared links without a topology');
      await page.screenshot({ path: path.join(ARTIFACTS, '08-topology-none.png'), fullPage: true });
    }

    // Apply through the API: the open view follows (topology.applied event), no reload.
    await page.evaluate(() => { window.__nwNoReload = 'still here'; });
    const applied = await api('PUT', '/v1/topology', { toml });
    assert.equal(applied.status, 200, JSON.stringify(applied.body));
    const version = applied.body.version;
    assert.ok(version >= 1, `a version: ${version}`);
    assert.deepEqual(applied.body.links.map((l) => `${l.a} <-> ${l.b}`).sort(), expectedLinks, 'canonical orientation');

    await poll(() => page.locator('#topo-version').getAttribute('data-version'), (v) => v === String(version), `the view to show version ${version}`);
    assert.match(await page.locator('#topo-version').innerText(), new RegExp(`Topology version ${version} applied`));
    const empty = page.locator('#topo-findings-empty');
    await poll(() => empty.innerText(), (t) => t.includes(`No findings · topology version ${version}`), 'the "no findings" state with the version');
    assert.equal(await page.locator('#topo-findings-table').isVisible(), false);

    // The declared links are drawn, each "unverified", with a title that says so in words.
    const graph = page.locator('#topology-graph');
    const declared = graph.locator('.declared');
    await poll(() => declared.count(), (c) => c === expectedLinks.length, `${expectedLinks.length} declared links`);
    const links = await declared.evaluateAll((ls) => ls.map((l) => ({ link: l.dataset.link, status: l.dataset.status, title: l.querySelector('title')?.textContent ?? '' })));
    assert.deepEqual(links.map((l) => l.link).sort(), expectedLinks);
    for (const l of links) {
      assert.equal(l.status, 'unverified', `${l.link}`);
      assert.match(l.title, /unverified: no probe data yet/, `${l.link} has a text title`);
    }
    assert.equal(await graph.locator('.dswitch[data-switch="leaf-bt"]').count(), 1, 'the declared switch is drawn');
    // Every link still carries a status; with no probe data none is verified.
    const statuses = await graph.locator('.link').evaluateAll((ls) => [...new Set(ls.map((l) => l.dataset.status))]);
    assert.deepEqual(statuses, ['unverified']);
    // The side panel and the text list say it too (not colour alone).
    assert.match(await page.locator('#topo-verify-legend').innerText(), /3 unverified/);
    const listed = await page.locator('#topo-links-list li').evaluateAll((ls) => ls.map((l) => `${l.dataset.link}=${l.dataset.status}`).sort());
    assert.deepEqual(listed, expectedLinks.map((l) => `${l}=unverified`));
    await page.screenshot({ path: path.join(ARTIFACTS, '08-topology-applied.png'), fullPage: true });

    // The node view's "Link probes" line: its declared ports, none probed yet.
    await go(page, `#/node/${encodeURIComponent(A)}`);
    await page.locator(`#node-title[data-node="${A}"]`).waitFor();
    const probes = page.locator('#node-ports');
    await probes.waitFor({ state: 'visible' });
    assert.match(await probes.innerText(), /fab0: no probe round yet; fab1: no probe round yet/);
    assert.equal(await page.evaluate(() => window.__nwNoReload), 'still here', 'the page was not reloaded');
  });
});
