// The console in a real browser against a real Herald (tests/tests/console.rs
// starts the stack and runs this). Every element is found by its
// accessible name, as a user of a screen reader would find it.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  api, assert, browser, done, env, eventually, freePort, log, rust, screen, screenshot,
} from './harness.mjs';

const ADMIN = env('HERALD_ADMIN_URL');
const KEY = env('HERALD_CONSOLE_KEY'); // organizations acme and initech
const OTHER_KEY = env('HERALD_OTHER_KEY'); // organization globex only
const RECEIVER = env('HERALD_RECEIVER_URL');

const { page, problems, close } = await browser();
const nav = (name) => page.getByRole('navigation', { name: 'Console' }).getByRole('link', { name });
const started = Date.now();
try {
  await signIn();
  const hook = await createThroughTheForm();
  await deliveredAndShown(hook);
  await editWithAConflict(hook);
  await rotateAndRecover(hook);
  await cancelAReplay();
  await workflowLimitIsPlain();
  await orgLogs();
  await disableStopsDeliveries(hook);
  await samplesVerifyARealDelivery();
  await deleteRemovesIt(hook);
  await orderedThroughTheForm();
  await organizationsAreSeparate(hook);
  assert(problems.length === 0, `no page errors, CSP violations or foreign requests:\n${problems.join('\n')}`);
  log(`console scenarios passed in ${((Date.now() - started) / 1000).toFixed(1)} s`);
} catch (e) {
  await screenshot(page, 'failure').catch(() => {});
  throw e;
} finally {
  await close();
  done();
}

async function signIn() {
  await page.goto(`${ADMIN}/console`);
  await page.getByRole('heading', { name: 'Sign in to Herald' }).waitFor();
  await screen(page, 'sign-in');
  const key = page.getByLabel('API key');
  await key.fill('not-a-key');
  await page.getByRole('button', { name: 'Sign in' }).click();
  await errorBeside(key, 'That API key is not valid.');
  await key.fill(KEY);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByRole('heading', { name: 'Webhooks' }).waitFor();
  // The key lives in sessionStorage, nowhere in the URL.
  assert(!page.url().includes(KEY), 'the key is not in the URL');
  assert(await page.evaluate((k) => Object.values(sessionStorage).includes(k), KEY), 'the key is in sessionStorage');
  assert(await page.evaluate((k) => !Object.values(localStorage).includes(k) && !document.cookie.includes(k), KEY),
    'the key is in neither localStorage nor a cookie');
  assert(await page.getByLabel('Organization').inputValue() === 'acme', 'the picker shows the default organization');
  await screen(page, 'webhooks-empty');
}

/// The error text is shown, and the field says it is invalid and points to it.
async function errorBeside(field, text) {
  await eventually(`"${text}" beside its field`, async () => {
    if (await field.getAttribute('aria-invalid') !== 'true') return false;
    const ids = (await field.getAttribute('aria-describedby') || '').split(/\s+/);
    for (const id of ids) {
      const el = page.locator(`[id="${id}"]`);
      if (await el.count() && (await el.textContent()).includes(text) && await el.isVisible()) return true;
    }
    return false;
  }, 10000);
}

async function createThroughTheForm() {
  await page.getByRole('link', { name: 'Create a webhook' }).click();
  await page.getByRole('heading', { name: 'Create a webhook' }).waitFor();
  await screen(page, 'create-form');

  await page.getByLabel('Name').fill('invoice approvals');
  await page.getByLabel('URL').fill('not a url');
  await page.getByRole('checkbox', { name: /^workflow\.completed / }).check();
  // Filters appear for the chosen types only: workers for worker events.
  assert(!(await page.getByLabel('Workers').isVisible()), 'no worker filter before a worker event is chosen');
  await page.getByRole('checkbox', { name: /^worker\.connected / }).check();
  assert(await page.getByLabel('Workers').isVisible(), 'the worker filter appears for worker events');
  await page.getByRole('checkbox', { name: /^worker\.connected / }).uncheck();
  await page.getByRole('checkbox', { name: /^workflow\.failed / }).check();
  await page.getByLabel('Workflows').fill('invoice-approval');
  assert(await page.getByRole('group', { name: 'Status' }).isVisible(), 'the status filter fits ended executions');
  await page.getByRole('button', { name: 'Create webhook' }).click();
  // The API's validation error, beside the URL field.
  await errorBeside(page.getByLabel('URL'), 'url is not valid');
  await screen(page, 'create-form-error');

  await page.getByLabel('URL').fill(`${RECEIVER}/console-hook`);
  await page.getByRole('button', { name: 'Create webhook' }).click();
  await page.getByRole('heading', { name: 'invoice approvals' }).waitFor();

  // The secret, once, with its warning, its copy button and the samples.
  const secret = (await page.locator('.secret-value').textContent()).trim();
  assert(/^whsec_[A-Za-z0-9+/=]+$/.test(secret), `a generated secret is shown: ${secret}`);
  await page.getByText('it will not be shown again').waitFor();
  await page.getByRole('button', { name: 'Copy the secret' }).waitFor();
  for (const lang of ['Python', 'Node.js', 'Go', 'Rust']) {
    const code = await sample(lang, lang === 'Rust' ? 'hmac and sha2 crates' : 'standard library only');
    assert(code.includes(secret), `the ${lang} sample has the secret filled in`);
  }
  assert(await page.getByRole('button', { name: 'Recover failed deliveries' }).isVisible(), 'recover is offered');
  assert(await page.getByRole('button', { name: 'Replay events' }).isVisible(), 'replay is offered');
  await screen(page, 'secret-once');
  const id = decodeURIComponent(page.url().split('#/webhooks/')[1]);

  // A reload, or coming back, never shows it again.
  await page.reload();
  await page.getByRole('heading', { name: 'invoice approvals' }).waitFor();
  assert(!(await page.content()).includes(secret), 'the secret is gone after a reload');
  assert(!(await page.evaluate((s) => Object.values(sessionStorage).join(' ').includes(s), secret)),
    'the secret was never stored');

  const { data } = await api(KEY, 'GET', `/webhooks/${id}`);
  assert(JSON.stringify(data.event_types) === '["workflow.completed","workflow.failed"]', `event types: ${data.event_types}`);
  assert(JSON.stringify(data.filters) === '{"workflow":["invoice-approval"]}', `filters: ${JSON.stringify(data.filters)}`);
  return { id, secret, name: 'invoice approvals' };
}

/// A sample's code as the console shows it.
async function sample(language, variant) {
  const details = page.locator('details.sample', { has: page.getByText(language, { exact: true }) });
  if (!(await details.getAttribute('open') !== null)) await details.locator('summary').click();
  const figure = page.getByRole('figure', { name: new RegExp(`^${language.replace('.', '\\.')}, ${variant}:`) });
  return figure.locator('pre').textContent();
}

async function deliveredAndShown(hook) {
  await rust('publish', {
    org: 'acme', type: 'workflow.completed',
    event: { id: 'evt_console_1', attributes: { workflow: 'invoice-approval', status: 'succeeded' },
      data: { invoice: 'INV-4242', amount: 1200 } },
  });
  // Not this workflow: not delivered.
  await rust('publish', { org: 'acme', type: 'workflow.completed', event: { id: 'evt_console_other', attributes: { workflow: 'payroll' } } });
  const row = page.getByRole('row').filter({ hasText: 'workflow.completed' }).filter({ hasText: 'succeeded' });
  await eventually('the attempt in the webhook\'s log', async () => {
    await page.getByRole('button', { name: 'Refresh the log' }).click();
    await row.first().waitFor({ timeout: 1000 });
    return true;
  });
  await screen(page, 'webhook-log');

  // Send a test event: its attempt shows up by itself.
  await page.getByRole('button', { name: 'Send a test event' }).click();
  await page.getByRole('row').filter({ hasText: '(test)' }).first().waitFor();

  await row.filter({ hasNotText: '(test)' }).first().getByRole('link', { name: /^Show/ }).click();
  await page.getByRole('heading', { name: 'Attempt 1 of workflow.completed' }).waitFor();
  const body = await page.getByRole('region', { name: 'Request' }).getByLabel('Request body').textContent();
  assert(body.includes('"invoice": "INV-4242"'), `the request body shows the event's data, pretty-printed:\n${body}`);
  assert(body.includes('"id": "evt_console_1"'), 'it is the event published');
  const headers = await page.getByRole('table', { name: 'Request headers' }).textContent();
  assert(headers.includes('webhook-signature') && !headers.includes(hook.secret), 'headers shown, secret not');
  await page.getByRole('region', { name: 'Response' }).getByText('Status 204').or(
    page.getByRole('region', { name: 'Response' }).getByText('Status 200')).first().waitFor();
  await page.getByRole('button', { name: 'Deliver this event again' }).waitFor();
  await screen(page, 'attempt');
  const got = await rust('received', { path: '/console-hook' });
  assert(got.bodies.some((b) => b.includes('evt_console_1')), 'the receiver got the event');
  assert(!got.bodies.some((b) => b.includes('evt_console_other')), 'another workflow was not delivered');
  await page.getByRole('link', { name: hook.name }).click();
  await page.getByRole('heading', { name: hook.name }).waitFor();
}

async function editWithAConflict(hook) {
  await page.getByRole('link', { name: `Edit ${hook.name}` }).click();
  await page.getByRole('heading', { name: `Edit ${hook.name}` }).waitFor();
  assert(await page.getByLabel('Workflows').inputValue() === 'invoice-approval', 'the edit form shows the filter');
  await screen(page, 'edit-form');
  // Someone else changes it meanwhile.
  const other = await api(KEY, 'PATCH', `/webhooks/${hook.id}`, { description: 'changed elsewhere' });
  assert(other.status === 200, 'the other change is saved');
  await page.getByLabel('Description (optional)').fill('mine');
  await page.getByRole('button', { name: 'Save changes' }).click();
  await page.getByText('This webhook was changed meanwhile').waitFor();
  await page.getByRole('button', { name: 'Reload the webhook' }).click();
  await eventually('the reloaded form', async () => (await page.getByLabel('Description (optional)').inputValue()) === 'changed elsewhere');
  await page.getByLabel('Timeout (milliseconds)').fill('4000');
  await page.getByRole('button', { name: 'Save changes' }).click();
  await page.getByText('Saved.').waitFor();
  const { data } = await api(KEY, 'GET', `/webhooks/${hook.id}`);
  assert(data.timeout_ms === 4000 && data.description === 'changed elsewhere', 'only the change is saved');
  assert(JSON.stringify(data.filters) === '{"workflow":["invoice-approval"]}', 'filters kept');
}

async function rotateAndRecover(hook) {
  await page.getByRole('button', { name: 'Rotate the secret' }).click();
  const rotate = page.getByRole('dialog', { name: `Rotate the secret of “${hook.name}”?` });
  await rotate.getByRole('button', { name: 'Rotate the secret' }).click();
  await page.getByRole('heading', { name: 'The new signing secret' }).waitFor();
  const secret = (await page.locator('.secret-value').textContent()).trim();
  assert(secret !== hook.secret && secret.startsWith('whsec_'), 'a new secret is shown');
  assert((await sample('Python', 'standard library only')).includes(secret), 'the samples have the new secret');
  await screen(page, 'secret-rotated');

  await page.getByRole('button', { name: 'Recover failed deliveries' }).click();
  const recover = page.getByRole('dialog', { name: `Recover failed deliveries of “${hook.name}”` });
  await recover.getByLabel('From (your local time)').waitFor();
  await screen(page, 'recover');
  await recover.getByRole('button', { name: 'Start recovering' }).click();
  // Nothing failed: the job finds nothing to send again.
  await page.getByText(/^Done: 0 queued, 0 delivered, 0 failed/).waitFor({ timeout: 20000 });
}

/// A replay to a slow receiver, stopped from its progress panel.
async function cancelAReplay() {
  // Every reply takes 3 s: the replay of the events published so far runs
  // long enough to be cancelled.
  await rust('slow', { path: '/console-slow', delay_ms: 3000, n: 50 });
  const created = await api(KEY, 'POST', '/webhooks', {
    name: 'slow backfill', url: `${RECEIVER}/console-slow`, event_types: ['workflow.completed'],
  });
  assert(created.status === 201, `a webhook to replay to: ${JSON.stringify(created.data)}`);
  const id = created.data.id;
  await page.goto(`${ADMIN}/console#/webhooks/${encodeURIComponent(id)}`);
  await page.getByRole('heading', { name: 'slow backfill' }).waitFor();
  await page.getByRole('button', { name: 'Replay events' }).click();
  const replay = page.getByRole('dialog', { name: 'Replay events to “slow backfill”' });
  await replay.getByRole('button', { name: 'Start replaying' }).click();
  await page.getByText(/^Running: \d+ queued/).waitFor({ timeout: 10000 });
  await screen(page, 'replay-running');
  await page.getByRole('button', { name: 'Cancel the replay' }).click();
  await page.getByText(/^Cancelled: \d+ queued/).waitFor({ timeout: 10000 });
  assert(!(await page.getByRole('button', { name: 'Cancel the replay' }).isVisible()), 'no cancel button once cancelled');
  // Free for a new job at once.
  const again = await api(KEY, 'POST', `/webhooks/${id}/replay`, { since: new Date(Date.now() - 60000).toISOString() });
  assert(again.status === 202, `a new replay starts after the cancel: ${again.status} ${JSON.stringify(again.data)}`);
  const cancelled = await api(KEY, 'POST', `/webhooks/${id}/jobs/${again.data.id}/cancel`);
  assert(cancelled.status === 200 && cancelled.data.status === 'cancelled', `cancelled over the API: ${JSON.stringify(cancelled.data)}`);
  const removed = await api(KEY, 'DELETE', `/webhooks/${id}`);
  assert(removed.status === 204, `the slow webhook removed: ${removed.status}`);
  await page.goto(`${ADMIN}/console#/webhooks`);
  await page.getByRole('heading', { name: 'Webhooks' }).waitFor();
}

/// The per-workflow limit's refusal, beside the filters.
async function workflowLimitIsPlain() {
  await nav('Webhooks').click();
  await page.getByRole('link', { name: 'Create a webhook' }).click();
  await page.getByLabel('Name').fill('second approvals');
  await page.getByLabel('URL').fill(`${RECEIVER}/second`);
  await page.getByRole('checkbox', { name: /^workflow\.completed / }).check();
  await page.getByLabel('Workflows').fill('invoice-approval');
  await page.getByRole('button', { name: 'Create webhook' }).click();
  const filters = page.getByRole('group', { name: 'Filters (optional)' });
  await filters.getByText('the maximum is 1').waitFor();
  await page.getByRole('link', { name: 'Cancel' }).click();
  await page.getByRole('heading', { name: 'Webhooks' }).waitFor();
}

/// The text of the fact `term` of a definition list in `scope`.
async function fact(scope, term) {
  const dt = scope.locator('dt').filter({ hasText: new RegExp(`^${term}$`) });
  return (await dt.locator('xpath=following-sibling::dd[1]').textContent()).trim();
}

/// Ordered delivery: set through the form (its refusal beside the field),
/// shown on the webhook's page with what it holds back, turned off again.
async function orderedThroughTheForm() {
  await nav('Webhooks').click();
  await page.getByRole('link', { name: 'Create a webhook' }).click();
  await page.getByRole('heading', { name: 'Create a webhook' }).waitFor();
  await page.getByLabel('Name').fill('ordered executions');
  await page.getByLabel('URL').fill(`${RECEIVER}/ordered`);
  await page.getByRole('checkbox', { name: /^workflow\.completed / }).check();
  await page.getByLabel('Timeout (milliseconds)').fill('20000');
  const onFailure = page.getByLabel('If a delivery gives up');
  assert(await onFailure.isDisabled(), 'what a delivery that gives up does needs an ordering key first');
  await page.getByLabel('Ordering key').fill('execution.id');
  assert(await onFailure.isEnabled(), 'with a key, what a delivery that gives up does can be chosen');
  await onFailure.selectOption({ label: 'Hold the key' });
  await page.getByRole('button', { name: 'Create webhook' }).click();
  await errorBeside(page.getByLabel('Ordering key'), 'is not an attribute name');
  await screen(page, 'create-form-ordering');
  await page.getByLabel('Ordering key').fill('execution');
  await page.getByRole('button', { name: 'Create webhook' }).click();
  await page.getByRole('heading', { name: 'ordered executions' }).waitFor();
  const id = decodeURIComponent(page.url().split('#/webhooks/')[1]);
  const { data } = await api(KEY, 'GET', `/webhooks/${id}`);
  assert(JSON.stringify(data.ordering) === '{"key":"execution","on_failure":"hold"}', `ordering: ${JSON.stringify(data.ordering)}`);

  // The page: the ordering in the definition, and nothing waiting yet.
  const definition = page.getByRole('region', { name: 'Definition' });
  const ordering = await fact(definition, 'Ordering');
  assert(ordering.includes('By execution') && ordering.includes('holds its key until it is recovered'), `ordering shown: ${ordering}`);
  const status = page.getByRole('region', { name: 'Ordered delivery' });
  assert(await fact(status, 'Keys waiting') === '0', 'no key waits yet');
  assert(await fact(status, 'Keys held back') === '0', 'no key is held back yet');
  assert((await fact(status, 'Oldest waiting delivery')).startsWith('None'), 'no delivery waits yet');

  // A slow first delivery of a key holds back the next one of that key.
  await rust('slow', { path: '/ordered', delay_ms: 6000, n: 2 });
  for (const n of [1, 2]) {
    await rust('publish', {
      org: 'acme', type: 'workflow.completed',
      event: { id: `evt_console_ordered_${n}`, attributes: { workflow: 'ordered', execution: 'ex-1' } },
    });
  }
  await eventually('the second delivery held back behind the first', async () => {
    await page.getByRole('button', { name: 'Refresh the ordering status' }).click();
    await page.getByText('The ordering status is up to date.').waitFor({ timeout: 2000 });
    return await fact(status, 'Keys held back') === '1' && await fact(status, 'Deliveries waiting') === '2';
  }, 5000);
  assert(await fact(status, 'Keys waiting') === '1', 'one key waits');
  const oldest = await fact(status, 'Oldest waiting delivery');
  assert(oldest.includes('workflow.completed') && oldest.includes('ex-1') && oldest.includes('Not held'), `the oldest shown: ${oldest}`);
  await screen(page, 'webhook-ordered');

  // Turned off through the form: an empty key.
  await page.getByRole('link', { name: 'Edit ordered executions' }).click();
  await page.getByRole('heading', { name: 'Edit ordered executions' }).waitFor();
  assert(await page.getByLabel('Ordering key').inputValue() === 'execution', 'the edit form shows the key');
  assert(await onFailure.inputValue() === 'hold', 'the edit form shows what a delivery that gives up does');
  await page.getByLabel('Ordering key').fill('');
  await page.getByRole('button', { name: 'Save changes' }).click();
  await page.getByText('Saved.').waitFor();
  assert((await fact(definition, 'Ordering')).startsWith('None'), 'no ordering shown');
  assert(!(await status.count()), 'no ordered delivery section for an unordered webhook');
  const after = await api(KEY, 'GET', `/webhooks/${id}`);
  assert(after.data.ordering === null && after.data.ordering_status === null, `ordering off: ${JSON.stringify(after.data)}`);
  const removed = await api(KEY, 'DELETE', `/webhooks/${id}`);
  assert(removed.status === 204, `the ordered webhook removed: ${removed.status}`);
}

async function orgLogs() {
  await nav('Delivery logs').click();
  await page.getByRole('heading', { name: 'Delivery logs' }).waitFor();
  await page.getByRole('row').filter({ hasText: 'invoice approvals' }).first().waitFor();
  await page.getByLabel('Status').selectOption('failed');
  await page.getByText('No attempts match these filters.').waitFor();
  await page.getByLabel('Status').selectOption('');
  await page.getByLabel('Event type').selectOption('workflow.completed');
  await page.getByRole('row').filter({ hasText: 'invoice approvals' }).first().waitFor();
  await screen(page, 'organization-logs');
}

async function disableStopsDeliveries(hook) {
  // A second webhook for the same events shows when the event has gone by.
  const control = await api(KEY, 'POST', '/webhooks', {
    name: 'control', url: `${RECEIVER}/control`, event_types: ['workflow.completed'],
  });
  assert(control.status === 201, 'control webhook');
  await nav('Webhooks').click();
  await page.getByRole('heading', { name: 'Webhooks' }).waitFor();
  const toggle = page.getByRole('switch', { name: `Enabled: ${hook.name}` });
  assert(await toggle.isChecked(), 'enabled at first');
  await toggle.uncheck();
  await page.getByText(`${hook.name} is disabled.`).waitFor();
  await page.getByRole('row', { name: new RegExp(hook.name) }).getByText('Disabled').waitFor();
  await screen(page, 'webhooks');
  const { data } = await api(KEY, 'GET', `/webhooks/${hook.id}`);
  assert(data.enabled === false && data.state === 'disabled', 'disabled in the API');

  await rust('publish', {
    org: 'acme', type: 'workflow.completed',
    event: { id: 'evt_console_2', attributes: { workflow: 'invoice-approval' } },
  });
  const seen = await rust('wait_received', { path: '/control', n: 1, timeout_ms: 20000 });
  assert(seen.bodies.some((b) => b.includes('evt_console_2')), 'the control webhook got the event');
  const got = await rust('received', { path: '/console-hook' });
  assert(!got.bodies.some((b) => b.includes('evt_console_2')), 'the disabled webhook did not');
  await api(KEY, 'DELETE', `/webhooks/${control.data.id}`);
}

/// The console's own samples, with the secret it showed, verify a real
/// delivery; a forged request is refused.
async function samplesVerifyARealDelivery() {
  const port = await freePort();
  await page.getByRole('link', { name: 'Create a webhook' }).click();
  await page.getByLabel('Name').fill('samples');
  await page.getByLabel('URL').fill(`http://127.0.0.1:${port}/`);
  await page.getByRole('checkbox', { name: /^workflow\.started / }).check();
  await page.getByRole('button', { name: 'Create webhook' }).click();
  await page.getByRole('heading', { name: 'samples' }).waitFor();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'herald-samples-'));
  const nodeModules = path.join(path.dirname(new URL(import.meta.url).pathname), 'node_modules');
  const runs = [
    ['Python', 'standard library only', 'receiver.py', ['python3', 'receiver.py']],
    ['Node.js', 'standard library only', 'receiver.js', ['node', 'receiver.js']],
    ['Node.js', 'Standard Webhooks library', 'receiver.js', ['node', 'receiver.js']],
  ];
  const python = await new Promise((resolve) => {
    spawn('python3', ['-c', 'import standardwebhooks'], { stdio: 'ignore' }).on('exit', (c) => resolve(c === 0));
  });
  if (python) runs.push(['Python', 'Standard Webhooks library', 'receiver.py', ['python3', 'receiver.py']]);
  else if (process.env.CI === 'true') throw new Error('python3 has no standardwebhooks module: run `make deps`');
  else log('NOTE: python3 has no standardwebhooks module (`make deps` installs it); the Python library sample is not run');
  const codes = [];
  for (const [language, variant, file] of runs) codes.push(await sample(language, variant));
  let n = 0;
  for (const [i, [language, variant, file, command]] of runs.entries()) {
    n += 1;
    const where = path.join(dir, `${n}`);
    fs.mkdirSync(where);
    fs.writeFileSync(path.join(where, file), codes[i]);
    const child = spawn(command[0], command.slice(1), {
      cwd: where, env: { ...process.env, PORT: String(port), NODE_PATH: nodeModules, PYTHONUNBUFFERED: '1' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    child.stdout.on('data', (d) => { out += d; });
    child.stderr.on('data', (d) => { out += d; });
    try {
      await eventually(`${language} sample listening`, async () => {
        const r = await fetch(`http://127.0.0.1:${port}/`, { method: 'POST', body: '{}', headers: { 'X-Webhook-Signature': 'sha256=00' } });
        return r.status === 401; // a forged request is refused
      }, 15000);
      const eventId = `evt_sample_${n}`;
      await rust('publish', { org: 'acme', type: 'workflow.started', event: { id: eventId, attributes: { workflow: 'w' } } });
      await eventually(`${language} (${variant}) verifies a real delivery`, async () => out.includes('verified '), 20000);
      log(`sample ok: ${language}, ${variant}`);
    } catch (e) {
      throw new Error(`${e.message}\n--- sample output ---\n${out}`);
    } finally {
      child.kill();
      await new Promise((r) => { if (child.exitCode !== null) r(); else child.on('exit', r); });
    }
  }
  fs.rmSync(dir, { recursive: true, force: true });
}

async function deleteRemovesIt(hook) {
  await nav('Webhooks').click();
  await page.getByRole('heading', { name: 'Webhooks' }).waitFor();
  await page.getByRole('button', { name: `Delete ${hook.name}` }).click();
  const dialog = page.getByRole('dialog', { name: `Delete the webhook “${hook.name}”?` });
  await dialog.waitFor();
  await screen(page, 'delete-confirmation');
  await dialog.getByRole('button', { name: `Delete “${hook.name}”` }).click();
  await page.getByRole('link', { name: hook.name, exact: true }).waitFor({ state: 'detached' });
  const { status } = await api(KEY, 'GET', `/webhooks/${hook.id}`);
  assert(status === 404, 'deleted in the API');
}

async function organizationsAreSeparate() {
  // The picker: another organization of this key has none of acme's.
  const acme = await api(KEY, 'GET', '/webhooks');
  assert(acme.data.data.some((w) => w.name === 'samples'), 'acme has the samples webhook');
  await page.getByLabel('Organization').selectOption('initech');
  await page.getByText('No webhooks yet.').waitFor();
  await page.getByLabel('Organization').selectOption('acme');
  await page.getByRole('link', { name: 'samples', exact: true }).waitFor();
  const samplesId = acme.data.data.find((w) => w.name === 'samples').id;

  // Another key, of another organization, sees none of them either.
  await page.getByRole('button', { name: 'Sign out' }).click();
  await page.getByRole('heading', { name: 'Sign in to Herald' }).waitFor();
  assert(await page.evaluate(() => sessionStorage.length === 0), 'signing out forgets the key');
  await page.getByLabel('API key').fill(OTHER_KEY);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByText('No webhooks yet.').waitFor();
  assert(!(await page.getByRole('link', { name: 'samples' }).count()), 'globex does not see acme\'s webhook');
  await page.goto(`${ADMIN}/console#/webhooks/${samplesId}`);
  await page.getByRole('heading', { name: 'Not found' }).waitFor();
  await screen(page, 'not-found-for-another-organization');
  await page.goto(`${ADMIN}/console#/logs`);
  await page.getByText('No delivery attempts yet.').waitFor();
}
