// Tenants in a real browser (tests/tests/console.rs starts the stack with
// HERALD_CONSOLE_FRAME_ANCESTORS set to a platform's origin, serves that
// platform's page, and runs this). Issue 26's "done when": an operator
// onboards an organization and a read-only key over the API; a console link
// for it opens inside the platform's page on another origin, shows that
// organization's webhooks and logs and none of another's, offers no
// control that changes anything, and once used, revoked or expired the
// same URL signs nobody in. Then the operator's own screens.

import {
  api, assert, browser, done, env, eventually, log, rust, screen, screenshot,
} from './harness.mjs';

const ADMIN = env('HERALD_ADMIN_URL');
const OPERATOR = env('HERALD_OPERATOR_KEY');
const PLATFORM = env('HERALD_PLATFORM_URL');
const RECEIVER = env('HERALD_RECEIVER_URL');

// Every control that changes something, by its accessible name: none of
// them may be offered to a read-only session.
const MUTATING = [
  ['link', /^Create a webhook/], ['link', /^Edit\b/], ['button', /^Delete\b/], ['button', /^Send a test event/],
  ['button', /^Rotate the secret/], ['button', /^Recover failed deliveries/], ['button', /^Replay events/],
  ['button', /^Deliver this event again/], ['button', /^Cancel the/], ['button', /^Save changes/],
  ['link', /^Create/], ['button', /^Create/], ['button', /^Revoke/], ['button', /^Sign out/],
];

const { context, page, problems, close } = await browser({ origins: [PLATFORM] });
const started = Date.now();
let visits = 0;
try {
  const world = await onboard();
  await readOnlyKeyInTheConsole(world);
  await framedLinkIsReadOnly(world);
  await revokedLinkEndsItsSession(world);
  await expiredLinks(world);
  await linkLimitedToOneWebhook(world);
  await operatorScreens(world);
  assert(problems.length === 0, `no page errors, CSP violations or foreign requests:\n${problems.join('\n')}`);
  log(`tenants scenario passed in ${((Date.now() - started) / 1000).toFixed(1)} s`);
} catch (e) {
  await screenshot(page, 'failure').catch(() => {});
  if (problems.length) log(`problems meanwhile:\n${problems.join('\n')}`);
  throw e;
} finally {
  await close();
  done();
}

async function ok(what, answer, status) {
  const got = await answer;
  assert(got.status === status, `${what}: ${got.status} ${JSON.stringify(got.data)}`);
  return got.data;
}

/// Over the API, as a platform's backend would: two organizations, a
/// read-only key for one, webhooks in both, an event delivered to each.
async function onboard() {
  await ok('create northwind', api(OPERATOR, 'POST', '/organizations', { id: 'northwind', name: 'Northwind Traders' }), 201);
  await ok('create contoso', api(OPERATOR, 'POST', '/organizations', { id: 'contoso', name: 'Contoso' }), 201);
  const viewer = await ok('a read-only key', api(OPERATOR, 'POST', '/api-keys', {
    name: 'northwind viewer', scope: 'read', organizations: ['northwind'],
  }), 201);
  assert(viewer.key.startsWith('hk_'), 'the key is answered once');
  const refused = await api(viewer.key, 'POST', '/webhooks', { name: 'x', url: `${RECEIVER}/x`, event_types: ['workflow.completed'] });
  assert(refused.status === 403 && refused.data.error.code === 'read_only', `a read key creates nothing: ${JSON.stringify(refused.data)}`);

  const hook = (org, name, path, extra = {}) => ok(`webhook ${name}`, api(OPERATOR, 'POST', '/webhooks', {
    name, url: `${RECEIVER}${path}`, event_types: ['workflow.completed'], ...extra,
  }, org), 201);
  const orders = await hook('northwind', 'northwind orders', '/northwind-orders',
    { headers: { Authorization: 'Bearer receiver-credential-1234' } });
  const billing = await hook('northwind', 'northwind billing', '/northwind-billing');
  await hook('contoso', 'contoso payroll', '/contoso-payroll');
  assert(orders.headers.Authorization === '••••1234', `header values come masked: ${JSON.stringify(orders.headers)}`);

  await rust('publish', { org: 'northwind', type: 'workflow.completed', event: { id: 'evt_northwind_1', attributes: { workflow: 'orders' } } });
  await rust('publish', { org: 'contoso', type: 'workflow.completed', event: { id: 'evt_contoso_1', attributes: { workflow: 'payroll' } } });
  await rust('wait_received', { path: '/northwind-orders', n: 1 });
  await rust('wait_received', { path: '/contoso-payroll', n: 1 });
  // The log-writer has indexed both organizations' attempts.
  for (const org of ['northwind', 'contoso']) {
    await eventually(`${org}'s attempts in its log`, async () => {
      const { data } = await api(OPERATOR, 'GET', '/webhooks/logs/all', null, org);
      return data.data.length >= 1;
    });
  }
  return { viewer: viewer.key, orders, billing };
}

/// Asserts that none of MUTATING is on `scope` (a page or a frame).
async function noMutatingControl(scope, where) {
  for (const [role, name] of MUTATING) {
    const n = await scope.getByRole(role, { name }).count();
    assert(n === 0, `${where}: no ${role} named ${name} (found ${n})`);
  }
  const switches = await scope.getByRole('switch').count();
  assert(switches === 0, `${where}: no enabled switch (found ${switches})`);
}

/// The read-only key, signed in by hand in the console's own page.
async function readOnlyKeyInTheConsole({ viewer, orders }) {
  await page.goto(`${ADMIN}/console`);
  await page.getByLabel('API key').fill(viewer);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByRole('heading', { name: 'Webhooks' }).waitFor();
  await page.getByRole('link', { name: 'northwind orders', exact: true }).waitFor();
  assert(await page.getByText('Read-only', { exact: true }).isVisible(), 'the header says read-only');
  assert(await page.getByRole('link', { name: 'contoso payroll' }).count() === 0, 'no other organization\'s webhook');
  await noMutatingControl(page.getByRole('main'), 'read key: webhooks');
  await screen(page, 'read-key-webhooks');
  await page.getByRole('link', { name: 'northwind orders', exact: true }).click();
  await page.getByRole('heading', { name: 'northwind orders' }).waitFor();
  await page.getByText('Authorization: ••••1234').waitFor();
  await noMutatingControl(page.getByRole('main'), 'read key: webhook');
  // A screen it may not open says so plainly.
  await page.goto(`${ADMIN}/console#/webhooks/${orders.id}/edit`);
  await page.getByRole('heading', { name: 'Not allowed' }).waitFor();
  await page.getByText('This session is read-only').waitFor();
  await screen(page, 'read-key-not-allowed');
  await page.getByRole('button', { name: 'Sign out' }).click();
  await page.getByRole('heading', { name: 'Sign in to Herald' }).waitFor();
}

async function link(body) {
  return ok('a console link', api(OPERATOR, 'POST', '/organizations/northwind/console-links', body), 201);
}

/// Opens a console link the way a platform frames it: in its own page, on
/// its own origin (another site: the browser denies the frame storage),
/// with `?embed`. Answers the console's frame, and the session token the
/// console got for the link (null when refused).
async function openFramed(url) {
  assert(url.startsWith(`${ADMIN}/console#link=hl_`), `a console link: ${url}`);
  const embed = url.replace('/console#', '/console?embed#');
  visits += 1;
  const exchanged = page.waitForResponse((r) => r.url() === `${ADMIN}/console-sessions`);
  await page.goto(`${PLATFORM}/platform?visit=${visits}#${encodeURIComponent(embed)}`);
  await page.getByRole('heading', { name: 'Your webhooks' }).waitFor();
  const answer = await exchanged;
  const session = answer.status() === 201 ? (await answer.json()).session : null;
  const frame = page.frameLocator('iframe[title="Webhooks (Herald console)"]');
  // Signed in, or refused: either way a heading shows.
  await frame.getByRole('heading', { name: /^(Webhooks|Sign in to Herald)$/ }).waitFor();
  const handle = await page.locator('iframe').elementHandle();
  return { frame, content: await handle.contentFrame(), session };
}

/// The link's URL signs nobody in: the console says why.
async function refused(url, why) {
  const { frame } = await openFramed(url);
  await frame.getByRole('heading', { name: 'Sign in to Herald' }).waitFor();
  await frame.getByText('This console link cannot be used').waitFor();
  assert(await frame.getByRole('heading', { name: 'Webhooks' }).count() === 0, `${why}: nobody is signed in`);
  return frame;
}

async function framedLinkIsReadOnly() {
  const { url } = await link({ scope: 'read', ttl: '1h' });
  const { frame, content, session } = await openFramed(url);
  const nav = (name) => frame.getByRole('navigation', { name: 'Console' }).getByRole('link', { name });
  await frame.getByRole('heading', { name: 'Webhooks' }).waitFor();
  await frame.getByRole('link', { name: 'northwind orders', exact: true }).waitFor();
  await frame.getByRole('link', { name: 'northwind billing', exact: true }).waitFor();
  assert(await frame.getByRole('link', { name: 'contoso payroll' }).count() === 0, 'none of another organization\'s webhooks');
  // The token left the address at once; the session is the tab's.
  assert(!content.url().includes('link='), `the token is out of the frame's URL: ${content.url()}`);
  assert(session && session.startsWith('hs_'), 'the link was exchanged for a session');
  assert(!content.url().includes(session), 'the session token is not in the URL either');
  // Embedded: no brand, no sign-out; the platform's page is the page.
  assert(await frame.getByRole('link', { name: 'Herald', exact: true }).count() === 0, 'no brand when embedded');
  await noMutatingControl(frame, 'framed read link: webhooks');
  await screen(page, 'framed-read-link-webhooks', content);

  await frame.getByRole('link', { name: 'northwind orders', exact: true }).click();
  await frame.getByRole('heading', { name: 'northwind orders' }).waitFor();
  const attempt = frame.getByRole('row').filter({ hasText: 'workflow.completed' }).filter({ hasText: 'succeeded' }).first();
  await attempt.waitFor();
  await noMutatingControl(frame, 'framed read link: webhook');
  await screen(page, 'framed-read-link-webhook', content);
  await attempt.getByRole('link', { name: /^Show/ }).click();
  await frame.getByRole('heading', { name: 'Attempt 1 of workflow.completed' }).waitFor();
  await noMutatingControl(frame, 'framed read link: attempt');

  await nav('Delivery logs').click();
  await frame.getByRole('heading', { name: 'Delivery logs' }).waitFor();
  await frame.getByRole('row').filter({ hasText: 'northwind orders' }).first().waitFor();
  assert(await frame.getByRole('row').filter({ hasText: 'contoso' }).count() === 0, 'no other organization\'s attempts');
  await noMutatingControl(frame, 'framed read link: logs');
  await screen(page, 'framed-read-link-logs', content);

  // Used once: the same URL signs nobody in again.
  await refused(url, 'a used link');
  await screen(page, 'framed-link-refused', page.frames().find((f) => f.url().startsWith(ADMIN)));
}

/// Waits for the console in `frame` to notice its session ended: the next
/// screen it opens is the sign-in screen with the reason.
async function sessionEnds(frame) {
  const nav = (name) => frame.getByRole('navigation', { name: 'Console' }).getByRole('link', { name });
  const signIn = frame.getByRole('heading', { name: 'Sign in to Herald' });
  await eventually('the session to end', async () => {
    if (await signIn.count()) return true;
    // Each click asks the API again.
    await nav((await nav('Webhooks').getAttribute('aria-current')) ? 'Delivery logs' : 'Webhooks').click({ timeout: 2000 });
    return (await signIn.count()) > 0;
  }, 20000);
  await frame.getByText('This console session has ended').waitFor();
}

async function revokedLinkEndsItsSession() {
  const { id, url } = await link({ scope: 'read', ttl: '1h' });
  const { frame, content, session: token } = await openFramed(url);
  await frame.getByRole('link', { name: 'northwind orders', exact: true }).waitFor();
  assert((await api(token, 'GET', '/webhooks')).status === 200, 'the session works before the revocation');
  await ok('revoke the link', api(OPERATOR, 'DELETE', `/organizations/northwind/console-links/${id}`), 204);
  await sessionEnds(frame);
  await screen(page, 'framed-session-ended', content);
  const after = await api(token, 'GET', '/webhooks');
  assert(after.status === 401, `the revoked link's session is refused: ${after.status}`);
  await refused(url, 'a revoked link');
  // A link revoked before anyone opened it signs nobody in either.
  const unused = await link({ scope: 'read', ttl: '1h' });
  await ok('revoke the unused link', api(OPERATOR, 'DELETE', `/organizations/northwind/console-links/${unused.id}`), 204);
  await refused(unused.url, 'a revoked, unused link');
}

async function expiredLinks() {
  // One opened at once and left to expire; one never opened until after.
  const opened = await link({ scope: 'read', ttl: '8s' });
  const late = await link({ scope: 'read', ttl: '3s' });
  const { frame, content } = await openFramed(opened.url);
  await frame.getByRole('link', { name: 'northwind orders', exact: true }).waitFor();
  // Waiting for a deadline the API named, not for something to happen.
  await new Promise((r) => { setTimeout(r, Math.max(0, Date.parse(opened.expires_at) - Date.now() + 300)); });
  await sessionEnds(frame);
  await screen(page, 'framed-session-expired', content);
  assert(Date.parse(late.expires_at) < Date.now(), 'the short link is past its TTL');
  await refused(late.url, 'a link past its TTL');
}

/// An admin link limited to one webhook: only that one, no organization
/// screens, and what it may not open says so.
async function linkLimitedToOneWebhook({ orders }) {
  const { url } = await link({ scope: 'admin', ttl: '1h', webhook_ids: [orders.id] });
  const { frame, content } = await openFramed(url);
  await frame.getByRole('link', { name: 'northwind orders', exact: true }).waitFor();
  assert(await frame.getByRole('link', { name: 'northwind billing' }).count() === 0, 'only the webhook of the link');
  const nav = frame.getByRole('navigation', { name: 'Console' });
  assert(await nav.getByRole('link', { name: 'Delivery logs' }).count() === 0, 'no organization-wide log');
  assert(await nav.getByRole('link', { name: 'Audit trail' }).count() === 0, 'no audit trail');
  assert(await frame.getByRole('link', { name: 'Create a webhook' }).count() === 0, 'cannot create a webhook');
  // An admin link may still change its webhook.
  await frame.getByRole('switch', { name: 'Enabled: northwind orders' }).waitFor();
  await screen(page, 'framed-limited-link', content);
  await content.evaluate(() => { location.hash = '#/logs'; });
  await frame.getByRole('heading', { name: 'Not allowed' }).waitFor();
  await frame.getByText('limited to some webhooks').waitFor();
  await screen(page, 'framed-limited-link-not-allowed', content);
}

/// Whether two boxes share a line: they overlap vertically.
function sameLine(a, b) {
  return a.y < b.y + b.height && b.y < a.y + a.height;
}

/// The operator's header at 1280px is one line: the brand, every link,
/// the organization switch and Sign out side by side. Narrow, it wraps
/// without making the page scroll sideways.
async function headerFits() {
  const { width, height } = page.viewportSize();
  assert(width === 1280, `the browser is 1280px wide: ${width}`);
  const header = page.getByRole('banner');
  const brand = await header.getByRole('link', { name: 'Herald', exact: true }).boundingBox();
  const parts = [
    ...['Webhooks', 'Delivery logs', 'Audit trail', 'Organizations', 'API keys'].map((name) => ['link', name]),
    ['button', 'Switch organization'], ['button', 'Sign out'],
  ];
  for (const [role, name] of parts) {
    const box = await header.getByRole(role, { name, exact: true }).boundingBox();
    assert(box && sameLine(box, brand), `${name} is on the header's line at 1280px: ${JSON.stringify(box)} vs the brand's ${JSON.stringify(brand)}`);
  }
  await screen(page, 'operator-header-1280');
  await page.setViewportSize({ width: 360, height });
  try {
    const out = header.getByRole('button', { name: 'Sign out' });
    assert(await out.isVisible(), 'Sign out is there at 360px');
    const box = await out.boundingBox();
    assert(box.x >= 0 && box.x + box.width <= 360, `Sign out fits at 360px: ${JSON.stringify(box)}`);
    const over = await page.evaluate(() => [...document.querySelectorAll('header *')]
      .filter((e) => e.getClientRects().length && e.getBoundingClientRect().right > window.innerWidth)
      .map((e) => `${e.tagName} ${e.textContent}`));
    assert(over.length === 0, `nothing in the header goes past 360px: ${over.join(', ')}`);
    await screen(page, 'operator-header-360');
  } finally {
    await page.setViewportSize({ width, height });
  }
}

/// `url` opened in a tab of its own (the operator's tab keeps its
/// session): the console refuses it, and nobody is signed in.
async function refusedInATab(url, why) {
  const tab = await context.newPage();
  try {
    await tab.goto(url);
    await tab.getByRole('heading', { name: 'Sign in to Herald' }).waitFor();
    await tab.getByText('This console link cannot be used').waitFor();
    assert(await tab.getByRole('heading', { name: 'Webhooks' }).count() === 0, `${why}: nobody is signed in`);
  } finally {
    await tab.close();
  }
}

/// The operator's screens: organizations (create, edit, console links:
/// the list, create, revoke; delete), API keys (create shown once,
/// revoke), the audit trail.
async function operatorScreens({ orders }) {
  // A link the platform's backend made over the API, not opened yet.
  const existing = await link({ scope: 'admin', ttl: '3h' });
  await page.goto(`${ADMIN}/console`);
  await page.getByRole('heading', { name: /^(Webhooks|Sign in to Herald)$/ }).waitFor();
  if (await page.getByRole('heading', { name: 'Sign in to Herald' }).count()) {
    await page.getByLabel('API key').fill(OPERATOR);
    await page.getByRole('button', { name: 'Sign in' }).click();
  }
  await page.getByRole('heading', { name: 'Webhooks' }).waitFor();
  await headerFits();
  const nav = (name) => page.getByRole('navigation', { name: 'Console' }).getByRole('link', { name });
  await nav('Organizations').click();
  await page.getByRole('heading', { name: 'Organizations' }).waitFor();
  await page.getByRole('row').filter({ hasText: 'Northwind Traders' }).waitFor();
  await page.getByRole('button', { name: 'Create an organization' }).click();
  let dialog = page.getByRole('dialog', { name: 'Create an organization' });
  await dialog.getByLabel('ID').fill('fabrikam');
  await dialog.getByLabel('Display name (optional)').fill('Fabrikam');
  await dialog.getByLabel('Most webhooks').fill('5');
  await screen(page, 'operator-create-organization');
  await dialog.getByRole('button', { name: 'Create the organization' }).click();
  await page.getByText('The organization Fabrikam (fabrikam) was created.').waitFor();
  const created = await ok('fabrikam', api(OPERATOR, 'GET', '/organizations/fabrikam'), 200);
  assert(created.limits.max_webhooks === 5, `its limit: ${JSON.stringify(created.limits)}`);

  await page.getByRole('button', { name: 'Edit Fabrikam' }).click();
  dialog = page.getByRole('dialog', { name: 'Edit the organization “Fabrikam”' });
  await dialog.getByLabel('Display name').fill('Fabrikam Inc');
  await dialog.getByLabel('Most webhooks').fill('');
  await dialog.getByRole('button', { name: 'Save changes' }).click();
  await page.getByText('Fabrikam was saved.').waitFor();
  const edited = await ok('fabrikam', api(OPERATOR, 'GET', '/organizations/fabrikam'), 200);
  assert(edited.name === 'Fabrikam Inc' && edited.limits.max_webhooks === null, `edited: ${JSON.stringify(edited)}`);

  // Northwind's console links: the one made over the API is listed with
  // what it grants and that nobody opened it; no token is shown.
  await page.getByRole('button', { name: 'Console links of Northwind Traders' }).click();
  const links = page.getByRole('region', { name: 'Console links of Northwind Traders' });
  assert(await page.evaluate(() => document.activeElement.textContent) === 'Console links of Northwind Traders',
    'focus moves to the links\' heading');
  const listed = links.getByRole('row').filter({ hasText: existing.id });
  await listed.waitFor();
  const cells = await listed.textContent();
  assert(cells.includes('Admin') && cells.includes('All webhooks') && cells.includes('Not yet'),
    `the API's link as made: ${cells}`);
  // The link opened in the read-only scenario says when.
  const opened = (await ok('links', api(OPERATOR, 'GET', '/organizations/northwind/console-links'), 200))
    .data.filter((l) => l.exchanged_at);
  assert(opened.length > 0, 'a link was opened earlier');
  assert(!(await links.getByRole('row').filter({ hasText: opened[0].id }).textContent()).includes('Not yet'),
    'an opened link says when it was opened');
  const token = existing.url.split('#link=')[1];
  assert(!(await page.content()).includes(token), 'no link\'s token is on the page');
  await screen(page, 'operator-console-links');

  await links.getByRole('button', { name: 'Create a console link for Northwind Traders' }).click();
  dialog = page.getByRole('dialog', { name: 'A console link for “Northwind Traders”' });
  await dialog.getByLabel('Scope').selectOption('read');
  await dialog.getByLabel('Valid for').fill('2h');
  await dialog.getByRole('checkbox', { name: 'northwind orders' }).check();
  await screen(page, 'operator-console-link-dialog');
  await dialog.getByRole('button', { name: 'Create the link' }).click();
  const panel = page.getByRole('region', { name: 'Console link for Northwind Traders' });
  await panel.getByRole('button', { name: 'Copy the link' }).waitFor();
  const url = (await panel.locator('.secret-value').textContent()).trim();
  assert(url.startsWith(`${ADMIN}/console#link=hl_`), `the link is shown: ${url}`);
  const all = await ok('links', api(OPERATOR, 'GET', '/organizations/northwind/console-links'), 200);
  const made = all.data.find((l) => l.webhook_ids && l.webhook_ids[0] === orders.id && l.scope === 'read');
  assert(made, `the link as asked: ${JSON.stringify(all.data)}`);
  // The list is read again: the new link is in it, with its webhook's name.
  const madeRow = links.getByRole('row').filter({ hasText: made.id });
  await madeRow.waitFor();
  assert((await madeRow.textContent()).includes('northwind orders'), 'the new link names its webhook');
  await screen(page, 'operator-console-link');

  // Revoking asks first; Cancel changes nothing.
  await listed.getByRole('button', { name: `Revoke ${existing.id}` }).click();
  dialog = page.getByRole('dialog', { name: `Revoke the console link ${existing.id}?` });
  await dialog.getByText('Nobody has opened it yet').waitFor();
  await dialog.getByRole('button', { name: 'Cancel' }).click();
  await dialog.waitFor({ state: 'detached' });
  await listed.waitFor();
  await listed.getByRole('button', { name: `Revoke ${existing.id}` }).click();
  dialog = page.getByRole('dialog', { name: `Revoke the console link ${existing.id}?` });
  await screen(page, 'operator-revoke-console-link');
  await dialog.getByRole('button', { name: 'Revoke the link' }).click();
  await page.getByRole('status').getByText(`The console link ${existing.id} was revoked`).waitFor();
  await listed.waitFor({ state: 'detached' });
  assert(await links.getByRole('row').filter({ hasText: made.id }).count() === 1, 'the other links stay');
  assert(await page.evaluate(() => document.activeElement.textContent) === 'Console links of Northwind Traders',
    'focus goes back to the links\' heading');
  const after = await ok('links', api(OPERATOR, 'GET', '/organizations/northwind/console-links'), 200);
  assert(!after.data.some((l) => l.id === existing.id), 'the API lists it no more');
  await refusedInATab(existing.url, 'a link revoked in the console');

  // The new link's own Revoke button asks too, and empties the panel.
  await panel.getByRole('button', { name: 'Revoke this link' }).click();
  dialog = page.getByRole('dialog', { name: `Revoke the console link ${made.id}?` });
  await dialog.getByRole('button', { name: 'Revoke the link' }).click();
  await page.getByRole('status').getByText(`The console link ${made.id} was revoked`).waitFor();
  await panel.waitFor({ state: 'detached' });
  await links.getByRole('row').filter({ hasText: made.id }).waitFor({ state: 'detached' });
  await refusedInATab(url, 'the console\'s own link, revoked');
  await links.getByRole('button', { name: 'Close the console links' }).click();
  await links.waitFor({ state: 'detached' });

  // An organization without links says so.
  await page.getByRole('button', { name: 'Console links of Fabrikam Inc' }).click();
  await page.getByRole('region', { name: 'Console links of Fabrikam Inc' })
    .getByText('Fabrikam Inc has no console link that is still valid.').waitFor();

  await page.getByRole('button', { name: 'Delete Fabrikam Inc' }).click();
  dialog = page.getByRole('dialog', { name: 'Delete the organization “Fabrikam Inc” (fabrikam)?' });
  await dialog.getByText('This deletes its 0 webhooks').waitFor();
  await screen(page, 'operator-delete-organization');
  await dialog.getByRole('button', { name: 'Delete “Fabrikam Inc”' }).click();
  await page.getByText('The organization Fabrikam Inc (fabrikam) was deleted.').waitFor();
  assert(await page.getByRole('row').filter({ hasText: 'fabrikam' }).count() === 0, 'gone from the list');

  await nav('API keys').click();
  await page.getByRole('heading', { name: 'API keys' }).waitFor();
  await page.getByRole('row').filter({ hasText: 'northwind viewer' }).waitFor();
  await page.getByRole('button', { name: 'Create an API key' }).click();
  dialog = page.getByRole('dialog', { name: 'Create an API key' });
  await dialog.getByLabel('Name').fill('northwind ci');
  await dialog.getByLabel('Scope').selectOption('admin');
  await dialog.getByLabel('Organizations').fill('northwind');
  await dialog.getByLabel('Expires after (optional)').fill('90d');
  await dialog.getByRole('button', { name: 'Create the key' }).click();
  const keyPanel = page.getByRole('region', { name: 'The new API key “northwind ci”' });
  await keyPanel.getByText('it will not be shown again').waitFor();
  await keyPanel.getByRole('button', { name: 'Copy the key' }).waitFor();
  const key = (await keyPanel.locator('.secret-value').textContent()).trim();
  const me = await ok('the new key works', api(key, 'GET', '/me'), 200);
  assert(me.scope === 'admin' && me.organization === 'northwind', `the key as asked: ${JSON.stringify(me)}`);
  await page.getByRole('row').filter({ hasText: 'northwind ci' }).waitFor();
  await screen(page, 'operator-api-key-once');
  await page.getByRole('button', { name: 'Revoke northwind ci' }).click();
  dialog = page.getByRole('dialog', { name: 'Revoke the API key “northwind ci”?' });
  await dialog.getByRole('button', { name: 'Revoke “northwind ci”' }).click();
  await page.getByText('The API key northwind ci was revoked.').waitFor();
  assert(!(await page.content()).includes(key), 'the key is not shown again');
  await eventually('the revoked key refused', async () => (await api(key, 'GET', '/me')).status === 401, 5000);

  await page.getByLabel('Organization', { exact: true }).fill('northwind');
  await page.getByRole('button', { name: 'Switch organization' }).click();
  await page.getByRole('heading', { name: 'Webhooks' }).waitFor();

  // Masked header values go back unchanged: the receiver still gets the
  // real one after an edit that adds another header.
  await page.getByRole('link', { name: 'Edit northwind orders' }).click();
  await page.getByRole('heading', { name: 'Edit northwind orders' }).waitFor();
  assert(await page.getByLabel('Header 1 value').inputValue() === '••••1234', 'the form shows the masked value');
  await page.getByText('Saved values are shown masked').waitFor();
  await page.getByRole('button', { name: 'Add a header' }).click();
  await page.getByLabel('Header 2 name').fill('X-Trace');
  await page.getByLabel('Header 2 value').fill('trace-value-42');
  await page.getByRole('button', { name: 'Save changes' }).click();
  await page.getByText('Saved.').waitFor();
  const saved = await ok('orders', api(OPERATOR, 'GET', `/webhooks/${orders.id}`, null, 'northwind'), 200);
  assert(saved.headers.Authorization === '••••1234' && saved.headers['X-Trace'] === '••••e-42', `headers: ${JSON.stringify(saved.headers)}`);
  await rust('publish', { org: 'northwind', type: 'workflow.completed', event: { id: 'evt_northwind_2', attributes: { workflow: 'orders' } } });
  await rust('wait_received', { path: '/northwind-orders', n: 2 });
  const got = await rust('received', { path: '/northwind-orders', header: 'authorization' });
  assert(got.values.at(-1) === 'Bearer receiver-credential-1234', `the real value is still sent: ${JSON.stringify(got.values)}`);

  // The audit trail of northwind, newest first: the edit on top.
  await nav('Audit trail').click();
  await page.getByRole('heading', { name: 'Audit trail' }).waitFor();
  const rows = page.getByRole('table', { name: 'Changes, newest first' }).getByRole('row');
  await rows.nth(1).waitFor();
  const first = await rows.nth(1).textContent();
  assert(first.includes('webhook.updated') && first.includes('headers'), `the newest change first: ${first}`);
  await page.getByRole('row').filter({ hasText: 'api_key.revoked' }).first().waitFor();
  await page.getByRole('row').filter({ hasText: 'organization.created' }).filter({ hasText: 'northwind' }).first().waitFor();
  await page.getByRole('row').filter({ hasText: 'console_link.exchanged' }).first().waitFor();
  await screen(page, 'operator-audit');
}
