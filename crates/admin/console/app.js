// The console's shell: sign-in (with a key, or through a console link's
// `#link=<token>`), the organization picker, sign-out, the navigation the
// session's scope allows, and a router over the URL's fragment
// (#/webhooks, #/webhooks/<id>, …). The fragment never carries the key or
// a secret: a link's token is taken out of it before anything else runs.

import { api, forget, whenUnauthorized } from './api.js';
import { h, hidden, say } from './dom.js';
import { go, leave } from './nav.js';
import { embedded, may, session } from './session.js';
import { signIn } from './views/signin.js';
import { webhookList } from './views/webhooks.js';
import { webhookForm } from './views/form.js';
import { webhookDetail } from './views/webhook.js';
import { orgLogs } from './views/logs.js';
import { attemptView } from './views/attempt.js';
import { organizations } from './views/organizations.js';
import { apiKeys } from './views/keys.js';
import { auditTrail } from './views/audit.js';

// Why this session may not open a screen; null when it may.
const READ_ONLY = 'This session is read-only: it can look at everything here but change nothing.';
const LIMITED = 'This console session is limited to some webhooks: the organization-wide screens are not part of it.';
const OPERATORS = 'Only an operator key can open this screen.';
const changes = () => (may.change ? null : READ_ONLY);
const wholeOrganization = () => (may.seeOrganization ? null : LIMITED);
const operators = () => (may.operate ? null : OPERATORS);

// [pattern, screen, why not (optional)]
const ROUTES = [
  [/^#\/webhooks$/, () => webhookList()],
  [/^#\/webhooks\/new$/, () => webhookForm({}), () => changes() || wholeOrganization()],
  [/^#\/webhooks\/([^/]+)\/edit$/, (m) => webhookForm({ id: m[1] }), changes],
  [/^#\/webhooks\/([^/]+)\/logs\/([^/]+)$/, (m) => attemptView({ id: m[1], logId: m[2] })],
  [/^#\/webhooks\/([^/]+)$/, (m) => webhookDetail({ id: m[1] })],
  [/^#\/logs$/, () => orgLogs(), wholeOrganization],
  [/^#\/audit$/, () => auditTrail(), wholeOrganization],
  [/^#\/organizations$/, () => organizations(), operators],
  [/^#\/api-keys$/, () => apiKeys(), operators],
];

const header = document.getElementById('header');
const main = document.getElementById('main');
if (embedded) document.documentElement.classList.add('embed');
let rendering = 0;

async function render(notice) {
  rendering += 1;
  const mine = rendering;
  leave();
  if (!session.key) {
    renderHeader();
    show(signIn({ notice, onSignedIn: () => go('#/webhooks') }), 'Sign in');
    return;
  }
  if (!session.me) {
    try {
      session.me = (await api('GET', '/me')).data;
    } catch (e) {
      if (e.status === 401 || e.status === 404) return signOut(ended());
      session.me = { organizations: [session.org], any_organization: false };
    }
  }
  renderHeader();
  const route = ROUTES.find(([pattern]) => pattern.test(location.hash));
  if (!route) {
    location.replace('#/webhooks');
    return;
  }
  const loading = h('p', { class: 'loading' }, 'Loading…');
  main.replaceChildren(loading);
  let view;
  try {
    const refused = route[2] && route[2]();
    if (refused) throw Object.assign(new Error(refused), { status: 403 });
    view = await route[1](location.hash.match(route[0]).map(decodeURIComponent));
  } catch (e) {
    if (e.status === 401) return undefined;
    view = problem(e);
  }
  if (mine !== rendering) return undefined; // a newer navigation won
  show(view);
  return undefined;
}

function problem(e) {
  const region = h('div', { role: 'alert' });
  const title = { 403: 'Not allowed', 404: 'Not found' }[e.status] || 'Something went wrong';
  say(region, e.status === 404 ? 'Not found: it was deleted, or this organization cannot see it.' : e.message, 'error');
  return h('section', {},
    h('h1', { tabindex: '-1' }, title),
    region,
    h('p', {}, h('a', { href: '#/webhooks' }, 'Back to the webhooks')));
}

function show(view) {
  main.replaceChildren(view);
  const heading = main.querySelector('h1');
  document.title = `${heading ? heading.textContent : 'Herald'} — Herald console`;
  for (const link of header.querySelectorAll('nav a')) {
    const here = location.hash.startsWith(link.getAttribute('href'))
      && !(link.getAttribute('href') === '#/webhooks' && location.hash.startsWith('#/logs'));
    if (here) link.setAttribute('aria-current', 'page'); else link.removeAttribute('aria-current');
  }
  // Moving between screens puts focus on the new screen's heading, as a
  // page load would, so keyboard and screen-reader users start there.
  if (heading) heading.focus();
}

function signOut(notice) {
  session.signOut();
  forget();
  if (location.hash !== '#/webhooks') history.replaceState(null, '', '#/webhooks');
  render(notice);
}

function renderHeader() {
  const brand = embedded ? null : h('a', { class: 'brand', href: '#/webhooks' }, 'Herald');
  if (!session.key) {
    header.replaceChildren(...(brand ? [h('div', { class: 'bar' }, brand)] : []));
    header.hidden = embedded;
    return;
  }
  header.hidden = false;
  const links = [
    ['#/webhooks', 'Webhooks'],
    may.seeOrganization ? ['#/logs', 'Delivery logs'] : null,
    may.readAudit ? ['#/audit', 'Audit trail'] : null,
    may.operate ? ['#/organizations', 'Organizations'] : null,
    may.operate ? ['#/api-keys', 'API keys'] : null,
  ].filter(Boolean);
  const nav = h('nav', { 'aria-label': 'Console' },
    h('ul', {}, links.map(([href, text]) => h('li', {}, h('a', { href }, text)))));
  const out = embedded ? null
    : h('button', { type: 'button', class: 'quiet', onclick: () => signOut({ text: 'You are signed out.' }) }, 'Sign out');
  header.replaceChildren(h('div', { class: 'bar' }, brand, nav,
    h('div', { class: 'session' }, orgPicker(), readOnlyBadge(), out)));
}

function readOnlyBadge() {
  return may.change ? null : h('p', { class: 'badge read-only' }, 'Read-only');
}

function orgPicker() {
  const me = session.me || {};
  const orgs = (me.organizations || []).filter((o) => o !== '*');
  const current = session.org;
  const switchTo = (org) => {
    if (!org || org === session.org) return;
    session.setOrg(org);
    forget();
    go('#/webhooks');
  };
  if (me.any_organization) {
    // An operator key may use any organization: type its id.
    const input = h('input', {
      id: 'org-input', name: 'organization', value: current, size: 12,
      autocomplete: 'off', spellcheck: 'false', pattern: '[a-z0-9_\\-]{1,64}',
    });
    return h('form', {
      class: 'org', onsubmit: (e) => { e.preventDefault(); switchTo(input.value.trim()); },
    },
    h('label', { for: 'org-input' }, 'Organization'), input,
    h('button', { type: 'submit', class: 'quiet' }, 'Switch', hidden(' organization')));
  }
  if (orgs.length > 1) {
    const select = h('select', {
      id: 'org-select', name: 'organization', value: current,
      onchange: () => switchTo(select.value),
    }, orgs.map((o) => h('option', { value: o }, o)));
    return h('div', { class: 'org' }, h('label', { for: 'org-select' }, 'Organization'), select);
  }
  return h('p', { class: 'org' }, 'Organization ', h('strong', {}, current));
}

// A console link (`/console#link=<token>`): the token is exchanged, once,
// for a session token kept like a signed-in key. It leaves the URL first,
// so it is in no history entry, bookmark or screenshot of the address bar.
async function arriveByLink() {
  const match = /^#link=(.+)$/.exec(location.hash);
  if (!match) return null;
  const token = decodeURIComponent(match[1]);
  history.replaceState(null, '', `${location.pathname}${location.search}#/webhooks`);
  session.signOut();
  forget();
  try {
    const { data } = await api('POST', '/console-sessions', { body: { token }, key: '', org: '' });
    session.signIn(data.session, data.organization);
    return null;
  } catch (e) {
    return {
      kind: 'error',
      text: e.status === 401
        ? 'This console link cannot be used: it has expired, was revoked, or was already opened once. Ask for a new link.'
        : `This console link could not be opened: ${e.message}`,
    };
  }
}

// Why the key stopped working: a console link's session (`hs_…`) ends with
// its link.
function ended() {
  return session.key?.startsWith('hs_')
    ? { kind: 'error', text: 'This console session has ended: its link expired or was revoked. Ask for a new link.' }
    : { kind: 'error', text: 'Your API key is no longer accepted. Sign in again.' };
}

whenUnauthorized(() => signOut(ended()));
window.addEventListener('hashchange', () => {
  if (location.hash.startsWith('#link=')) arriveByLink().then((notice) => render(notice));
  else render();
});
arriveByLink().then((notice) => render(notice));
