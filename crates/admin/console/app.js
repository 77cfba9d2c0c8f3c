// The console's shell: sign-in, the organization picker, sign-out, and a
// router over the URL's fragment (#/webhooks, #/webhooks/<id>, …). The
// fragment never carries the key or a secret.

import { api, forget, whenUnauthorized } from './api.js';
import { h, say } from './dom.js';
import { go, leave } from './nav.js';
import { session } from './session.js';
import { signIn } from './views/signin.js';
import { webhookList } from './views/webhooks.js';
import { webhookForm } from './views/form.js';
import { webhookDetail } from './views/webhook.js';
import { orgLogs } from './views/logs.js';
import { attemptView } from './views/attempt.js';

const ROUTES = [
  [/^#\/webhooks$/, () => webhookList()],
  [/^#\/webhooks\/new$/, () => webhookForm({})],
  [/^#\/webhooks\/([^/]+)\/edit$/, (m) => webhookForm({ id: m[1] })],
  [/^#\/webhooks\/([^/]+)\/logs\/([^/]+)$/, (m) => attemptView({ id: m[1], logId: m[2] })],
  [/^#\/webhooks\/([^/]+)$/, (m) => webhookDetail({ id: m[1] })],
  [/^#\/logs$/, () => orgLogs()],
];

const header = document.getElementById('header');
const main = document.getElementById('main');
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
      if (e.status === 401 || e.status === 404) return signOut('Sign in again.');
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
    view = await route[1](location.hash.match(route[0]).map(decodeURIComponent));
  } catch (e) {
    if (e.status === 401) return undefined;
    const region = h('div', { role: 'alert' });
    say(region, e.status === 404 ? 'Not found: it was deleted, or this organization cannot see it.' : e.message, 'error');
    view = h('section', {},
      h('h1', { tabindex: '-1' }, e.status === 404 ? 'Not found' : 'Something went wrong'),
      region,
      h('p', {}, h('a', { href: '#/webhooks' }, 'Back to the webhooks')));
  }
  if (mine !== rendering) return undefined; // a newer navigation won
  show(view);
  return undefined;
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
  const brand = h('a', { class: 'brand', href: '#/webhooks' }, 'Herald');
  if (!session.key) {
    header.replaceChildren(h('div', { class: 'bar' }, brand));
    return;
  }
  const nav = h('nav', { 'aria-label': 'Console' },
    h('ul', {},
      h('li', {}, h('a', { href: '#/webhooks' }, 'Webhooks')),
      h('li', {}, h('a', { href: '#/logs' }, 'Delivery logs'))));
  const out = h('button', { type: 'button', class: 'quiet', onclick: () => signOut('You are signed out.') }, 'Sign out');
  header.replaceChildren(h('div', { class: 'bar' }, brand, nav, orgPicker(), out));
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
      autocomplete: 'off', spellcheck: 'false', pattern: '[a-z0-9_-]{1,64}',
    });
    return h('form', {
      class: 'org', onsubmit: (e) => { e.preventDefault(); switchTo(input.value.trim()); },
    },
    h('label', { for: 'org-input' }, 'Organization'), input,
    h('button', { type: 'submit', class: 'quiet' }, 'Switch organization'));
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

whenUnauthorized(() => signOut('Your API key is no longer accepted. Sign in again.'));
window.addEventListener('hashchange', () => render());
render();
