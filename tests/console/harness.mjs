// What the console scenarios share: Debian's Chromium driven by
// playwright-core, a line protocol to the Rust test that started us (it
// owns the Herald stack, publishes to NATS and holds the receiver), an
// axe-core check and a screenshot per screen.
//
// Protocol: a request is one stdout line `@@herald {"id", "op", ...}`; the
// answer is one stdin line `{"id", "ok", ...}`. Every other stdout line is a
// log line the Rust test passes on.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { createRequire } from 'node:module';
import { chromium } from 'playwright-core';

const require = createRequire(import.meta.url);
export const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set (the Rust test sets it)`);
  return v;
};

// ---- the Rust side -------------------------------------------------------

const pending = new Map();
let nextId = 1;
const lines = readline.createInterface({ input: process.stdin });
lines.on('line', (line) => {
  const answer = JSON.parse(line);
  const p = pending.get(answer.id);
  if (!p) return;
  pending.delete(answer.id);
  if (answer.ok) p.resolve(answer); else p.reject(new Error(`rust: ${answer.error}`));
});

export function rust(op, args = {}) {
  const id = nextId;
  nextId += 1;
  return new Promise((resolve, reject) => {
    pending.set(id, { resolve, reject });
    process.stdout.write(`@@herald ${JSON.stringify({ id, op, ...args })}\n`);
  });
}

export function done() { lines.close(); }

// ---- the browser ---------------------------------------------------------

/// `origins`: other origins the page may load from (a platform's page that
/// frames the console); anything else is a problem.
export async function browser({ origins = [] } = {}) {
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'herald-console-chromium-'));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: { width: 1280, height: 900 },
    // Everything the page asks for must come from the admin service.
    offline: false,
  });
  context.setDefaultTimeout(15000);
  const problems = [];
  const hosts = new Set([env('HERALD_ADMIN_URL'), ...origins].map((o) => new URL(o).host));
  await context.route('**/*', (route) => {
    const url = new URL(route.request().url());
    if (!hosts.has(url.host)) {
      problems.push(`request to another origin: ${url.href}`);
      return route.abort();
    }
    return route.continue();
  });
  // Policy violations are reported to the page; keep them for the checks.
  await context.addInitScript(() => {
    window.__violations = [];
    document.addEventListener('securitypolicyviolation', (e) => {
      window.__violations.push(`${e.violatedDirective}: ${e.blockedURI}`);
    });
  });
  const page = context.pages()[0] || await context.newPage();
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && !/status of 40[0149]/.test(m.text())) problems.push(`console error: ${m.text()}`);
  });
  const close = async () => {
    await context.close();
    fs.rmSync(userDataDir, { recursive: true, force: true });
  };
  return { context, page, problems, close };
}

// ---- checks --------------------------------------------------------------

const axeSource = fs.readFileSync(require.resolve('axe-core/axe.min.js'), 'utf8');

/// axe-core on what the page (or one frame of it) shows now: no serious or
/// critical violation. Injected with evaluate (DevTools protocol), so the
/// page's CSP stays as it is and is not loosened for the test.
export async function accessible(page, screen) {
  if (!(await page.evaluate(() => typeof window.axe !== 'undefined'))) {
    await page.evaluate(axeSource);
  }
  const result = await page.evaluate(() => window.axe.run(document, {
    runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'wcag22aa', 'best-practice'] },
  }));
  const bad = result.violations.filter((v) => v.impact === 'serious' || v.impact === 'critical');
  if (bad.length > 0) {
    const text = bad.map((v) => `${v.id} (${v.impact}): ${v.help}\n    ${v.nodes.slice(0, 3).map((n) => n.target.join(' ')).join('\n    ')}`).join('\n  ');
    throw new Error(`accessibility of "${screen}":\n  ${text}`);
  }
  const violations = await page.evaluate(() => window.__violations);
  if (violations.length > 0) throw new Error(`CSP violations on "${screen}": ${violations.join('; ')}`);
  return result.violations.length;
}

let shot = 0;
export async function screenshot(page, name) {
  const dir = env('HERALD_SCREENSHOTS');
  fs.mkdirSync(dir, { recursive: true });
  shot += 1;
  const file = path.join(dir, `${String(shot).padStart(2, '0')}-${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  return file;
}

/// Both checks, for a screen the user reaches; `target` may be a frame of
/// `page` (the console inside a platform's page).
export async function screen(page, name, target = page) {
  await accessible(target, name);
  await screenshot(page, name);
  log(`screen ok: ${name}`);
}

export function log(text) { process.stdout.write(`${text}\n`); }

export function assert(condition, message) {
  if (!condition) throw new Error(`assertion failed: ${message}`);
}

/// Polls `f` until it answers something truthy.
export async function eventually(what, f, timeoutMs = 20000) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const v = await f();
      if (v) return v;
    } catch (e) { last = e; }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? `: ${last.message}` : ''}`);
    await new Promise((r) => { setTimeout(r, 200); });
  }
}

/// A free TCP port on 127.0.0.1.
export async function freePort() {
  const net = await import('node:net');
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

/// The admin API called directly, for what a second user does meanwhile.
export async function api(key, method, p, body, org) {
  const headers = { Authorization: `Bearer ${key}` };
  if (org) headers['X-Organization-Id'] = org;
  if (body) headers['Content-Type'] = 'application/json';
  const r = await fetch(env('HERALD_ADMIN_URL') + p, { method, headers, body: body && JSON.stringify(body) });
  const text = await r.text();
  return { status: r.status, data: text ? JSON.parse(text) : null };
}
