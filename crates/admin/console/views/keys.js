// API keys (operator keys): the keys made over the API (never the key
// itself), create one (shown once, with a copy button) and revoke one.
// Bootstrap keys from the keys file are not listed: they change with it.

import { api } from '../api.js';
import { ask, h, hidden, labelled, liveRegion, say, time, valuePanel } from '../dom.js';
import { session } from '../session.js';

const SCOPES = {
  admin: 'Admin: its organizations’ webhooks',
  read: 'Read-only: reads everything of its organizations, changes nothing',
  operator: 'Operator: every organization, organizations and keys',
};

export async function apiKeys() {
  const status = liveRegion();
  const result = h('div', {});
  const table = h('div', {});

  async function load() {
    const { data } = await api('GET', '/api-keys');
    table.replaceChildren(render(data.data));
  }

  function render(keys) {
    if (keys.length === 0) return h('p', { class: 'empty' }, 'No API keys made here yet.');
    return h('table', { class: 'list' },
      h('caption', { class: 'visually-hidden' }, 'API keys'),
      h('thead', {}, h('tr', {},
        ['Name', 'Starts with', 'Scope', 'Organizations', 'Created', 'Last used', 'Expires'].map((c) => h('th', { scope: 'col' }, c)),
        h('th', { scope: 'col' }, h('span', { class: 'visually-hidden' }, 'Actions')))),
      h('tbody', {}, keys.map((k) => h('tr', {},
        h('th', { scope: 'row' }, k.name),
        h('td', {}, h('code', {}, `${k.prefix}…`)),
        h('td', {}, k.scope),
        h('td', {}, k.organizations.includes('*') ? 'every organization' : k.organizations.join(', ')),
        h('td', {}, time(k.created_at)),
        h('td', {}, k.last_used_at ? time(k.last_used_at) : 'never'),
        h('td', {}, k.expires_at ? time(k.expires_at) : 'never'),
        h('td', { class: 'actions' },
          h('button', { type: 'button', class: 'danger', onclick: () => revoke(k) }, 'Revoke', hidden(` ${k.name}`)))))));
  }

  function create() {
    const name = h('input', { autocomplete: 'off', maxlength: 255, required: true });
    const scope = h('select', {}, Object.entries(SCOPES).map(([value, text]) => h('option', { value }, text)));
    const orgs = h('input', { autocomplete: 'off', spellcheck: 'false', value: session.org || '' });
    const ttl = h('input', { autocomplete: 'off', spellcheck: 'false' });
    ask({
      title: 'Create an API key',
      body: [
        labelled('Name', name, 'Says what uses it, e.g. “acme CI” — shown in the list and the audit trail.'),
        labelled('Scope', scope),
        labelled('Organizations', orgs, 'Comma-separated; the first is its default. An operator key uses every organization.'),
        labelled('Expires after (optional)', ttl, 'Like 90d or 12h; empty: never.'),
      ],
      confirm: 'Create the key',
      onConfirm: async () => {
        const list = orgs.value.split(',').map((s) => s.trim()).filter(Boolean);
        const body = { name: name.value.trim(), scope: scope.value };
        if (scope.value === 'operator') body.default_organization = list[0] || session.org;
        else body.organizations = list;
        if (ttl.value.trim()) body.ttl = ttl.value.trim();
        const { data } = await api('POST', '/api-keys', { body });
        result.replaceChildren(valuePanel({
          title: `The new API key “${data.name}”`,
          label: 'Key',
          value: data.key,
          copyLabel: 'Copy the key',
          warning: 'Copy it now: it will not be shown again.',
        }));
        await load();
      },
    });
  }

  function revoke(k) {
    ask({
      title: `Revoke the API key “${k.name}”?`,
      body: h('p', {}, 'Every admin replica refuses it within two seconds. This cannot be undone.'),
      confirm: `Revoke “${k.name}”`,
      danger: true,
      onConfirm: async () => {
        await api('DELETE', `/api-keys/${encodeURIComponent(k.id)}`);
        result.replaceChildren();
        await load();
        say(status, `The API key ${k.name} was revoked.`);
      },
    });
  }

  await load();
  return h('section', {},
    h('div', { class: 'title' },
      h('h1', { tabindex: '-1' }, 'API keys'),
      h('button', { type: 'button', class: 'primary', onclick: create }, 'Create an API key')),
    h('p', { class: 'lead' }, 'Keys made over the API. Bootstrap keys from the keys file are not listed.'),
    status,
    result,
    table);
}
