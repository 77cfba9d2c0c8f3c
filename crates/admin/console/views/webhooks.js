// The webhook list: name, URL, events, an enabled switch that PATCHes at
// once, the state (healthy, throttled, failing, disabled with the reason),
// Edit and Delete; and the delete confirmation the detail screen shares.
// A read-only session sees the same list without a control that changes
// anything.

import { allWebhooks, api } from '../api.js';
import { h, hidden, liveRegion, say, time, uid } from '../dom.js';
import { go } from '../nav.js';
import { may } from '../session.js';

export async function webhookList() {
  const webhooks = await allWebhooks();
  const status = liveRegion();
  const body = webhooks.length === 0
    ? h('p', { class: 'empty' }, may.change && may.seeOrganization
      ? 'No webhooks yet. Create one to have events delivered to your URL.' : 'No webhooks yet.')
    : h('table', { class: 'list' },
      h('caption', { class: 'visually-hidden' }, 'Webhooks of this organization'),
      h('thead', {}, h('tr', {},
        ['Name', 'URL', 'Events', 'Enabled', 'State'].map((c) => h('th', { scope: 'col' }, c)),
        may.change ? h('th', { scope: 'col' }, h('span', { class: 'visually-hidden' }, 'Actions')) : null)),
      h('tbody', {}, webhooks.map((w) => row(w, status))));
  return h('section', {},
    h('div', { class: 'title' },
      h('h1', { tabindex: '-1' }, 'Webhooks'),
      may.change && may.seeOrganization
        ? h('a', { class: 'button primary', href: '#/webhooks/new' }, 'Create a webhook') : null),
    status,
    body);
}

function row(w, status) {
  const stateCell = h('td', {}, stateOf(w));
  if (!may.change) {
    return h('tr', {},
      h('th', { scope: 'row' }, h('a', { href: `#/webhooks/${encodeURIComponent(w.id)}` }, w.name)),
      h('td', { class: 'url' }, w.url),
      h('td', {}, h('ul', { class: 'tags' }, w.event_types.map((t) => h('li', {}, h('code', {}, t))))),
      h('td', {}, w.enabled ? 'Yes' : 'No'),
      stateCell);
  }
  const switchId = uid('enabled');
  const toggle = h('input', {
    id: switchId, type: 'checkbox', role: 'switch', checked: w.enabled,
    onchange: () => setEnabled(w, toggle, stateCell, status),
  });
  return h('tr', {},
    h('th', { scope: 'row' }, h('a', { href: `#/webhooks/${encodeURIComponent(w.id)}` }, w.name)),
    h('td', { class: 'url' }, w.url),
    h('td', {}, h('ul', { class: 'tags' }, w.event_types.map((t) => h('li', {}, h('code', {}, t))))),
    h('td', {}, h('label', { for: switchId, class: 'switch' }, toggle,
      h('span', { class: 'visually-hidden' }, `Enabled: ${w.name}`))),
    stateCell,
    h('td', { class: 'actions' },
      h('a', { class: 'button', href: `#/webhooks/${encodeURIComponent(w.id)}/edit` }, 'Edit', hidden(` ${w.name}`)),
      h('button', { type: 'button', class: 'danger', onclick: () => confirmDelete(w, () => go('#/webhooks')) },
        'Delete', hidden(` ${w.name}`))));
}

async function setEnabled(w, toggle, stateCell, status) {
  const enabled = toggle.checked;
  toggle.disabled = true;
  try {
    const { data } = await api('PATCH', `/webhooks/${encodeURIComponent(w.id)}`, { body: { enabled } });
    Object.assign(w, data);
    stateCell.replaceChildren(stateOf(data));
    say(status, `${w.name} is ${enabled ? 'enabled' : 'disabled'}.`);
  } catch (e) {
    toggle.checked = !enabled;
    say(status, `Could not ${enabled ? 'enable' : 'disable'} ${w.name}: ${e.message}`, 'error');
  } finally {
    toggle.disabled = false;
  }
}

// The state as words: healthy, throttled, failing since … (next probe,
// last error), disabled (the reason), or unknown while Redis is away.
export function stateOf(w) {
  switch (w.state) {
    case 'disabled':
      return h('span', { class: 'state disabled' }, 'Disabled',
        w.disabled_reason ? h('span', { class: 'reason' }, `: ${w.disabled_reason}`) : null);
    case 'failing':
      return h('span', { class: 'state failing' }, 'Failing',
        w.failing_since ? [' since ', time(w.failing_since)] : null,
        w.next_probe_at ? ['; next try ', time(w.next_probe_at)] : null,
        w.last_error ? h('span', { class: 'reason' }, `: ${w.last_error}`) : null);
    case 'throttled':
      return h('span', { class: 'state throttled' }, 'Throttled (the endpoint asked Herald to slow down)');
    case 'healthy':
      return h('span', { class: 'state healthy' }, 'Healthy');
    default:
      return h('span', { class: 'state' }, 'Unknown right now');
  }
}

// Asks before deleting, naming the webhook; `after` runs once it is gone.
export function confirmDelete(w, after) {
  const titleId = uid('delete-title');
  const error = h('div', { role: 'alert' });
  const yes = h('button', { type: 'button', class: 'danger' }, `Delete “${w.name}”`);
  const no = h('button', { type: 'button' }, 'Cancel');
  const dialog = h('dialog', { 'aria-labelledby': titleId, class: 'confirm' },
    h('h2', { id: titleId }, `Delete the webhook “${w.name}”?`),
    h('p', {}, 'No delivery starts for it afterwards, and this cannot be undone. ',
      'Its delivery logs stay readable in the organization’s logs until they expire.'),
    error,
    h('div', { class: 'buttons' }, yes, no));
  const close = () => { dialog.close(); dialog.remove(); };
  no.addEventListener('click', close);
  dialog.addEventListener('cancel', () => dialog.remove());
  yes.addEventListener('click', async () => {
    yes.disabled = true;
    try {
      await api('DELETE', `/webhooks/${encodeURIComponent(w.id)}`);
      close();
      after();
    } catch (e) {
      say(error, e.status === 404 ? 'It was already deleted.' : e.message, 'error');
      yes.disabled = false;
    }
  });
  document.body.append(dialog);
  dialog.showModal();
  no.focus();
}
