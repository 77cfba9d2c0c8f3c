// Organizations (operator keys): the list, create, edit (display name and
// limits), delete with a confirmation naming what goes with it, and a
// console link for one, shown with a copy button.

import { allWebhooks, api, query } from '../api.js';
import { ask, h, hidden, labelled, liveRegion, say, time, uid, valuePanel } from '../dom.js';

const LIMITS = [
  ['max_webhooks', 'Most webhooks'],
  ['requests_per_minute', 'API requests a minute, per key'],
  ['manual_sends_per_minute', 'Manual sends a minute, per key'],
];

export async function organizations() {
  const status = liveRegion();
  const result = h('div', {});
  const table = h('div', {});
  const more = h('button', { type: 'button', hidden: true, onclick: () => load(next) }, 'More organizations');
  let next = null;
  let rows = [];

  async function load(cursor) {
    const { data } = await api('GET', `/organizations${query({ limit: 100, cursor })}`);
    rows = cursor ? [...rows, ...data.data] : data.data;
    next = data.next_cursor;
    more.hidden = !next;
    table.replaceChildren(render());
  }

  function render() {
    if (rows.length === 0) {
      return h('p', { class: 'empty' }, 'No organizations yet. An organization without a record still works with the default limits.');
    }
    return h('table', { class: 'list' },
      h('caption', { class: 'visually-hidden' }, 'Organizations'),
      h('thead', {}, h('tr', {},
        ['ID', 'Name', ...LIMITS.map(([, label]) => label), 'Created'].map((c) => h('th', { scope: 'col' }, c)),
        h('th', { scope: 'col' }, h('span', { class: 'visually-hidden' }, 'Actions')))),
      h('tbody', {}, rows.map((o) => h('tr', {},
        h('th', { scope: 'row' }, h('code', {}, o.id)),
        h('td', {}, o.name),
        LIMITS.map(([key]) => h('td', { class: 'num' }, o.limits[key] ?? 'default')),
        h('td', {}, time(o.created_at)),
        h('td', { class: 'actions' },
          h('button', { type: 'button', onclick: () => edit(o) }, 'Edit', hidden(` ${o.name}`)),
          h('button', { type: 'button', onclick: () => link(o) }, 'Console link', hidden(` for ${o.name}`)),
          h('button', { type: 'button', class: 'danger', onclick: () => remove(o) }, 'Delete', hidden(` ${o.name}`)))))));
  }

  // The limits' fields, empty for the operator's default.
  function limitFields(o) {
    const inputs = LIMITS.map(([key, label]) => [key, label, h('input', {
      type: 'number', min: 1, step: 1, inputmode: 'numeric', value: o?.limits?.[key] ?? '',
    })]);
    const read = () => Object.fromEntries(inputs.map(([key, , input]) => [key,
      input.value.trim() === '' ? null : Number(input.value)]));
    const fields = h('fieldset', {}, h('legend', {}, 'Limits (empty: the operator’s default)'),
      inputs.map(([, label, input]) => labelled(label, input)));
    return { fields, read };
  }

  function create() {
    const id = h('input', { autocomplete: 'off', spellcheck: 'false', pattern: '[a-z0-9_\\-]{1,64}', required: true });
    const name = h('input', { autocomplete: 'off', maxlength: 255 });
    const limits = limitFields(null);
    ask({
      title: 'Create an organization',
      body: [
        labelled('ID', id, 'What its producers publish under: 1 to 64 of a-z, 0-9, _ and -. It cannot change.'),
        labelled('Display name (optional)', name),
        limits.fields,
      ],
      confirm: 'Create the organization',
      onConfirm: async () => {
        const body = { id: id.value.trim(), limits: dropNulls(limits.read()) };
        if (name.value.trim()) body.name = name.value.trim();
        const { data } = await api('POST', '/organizations', { body });
        await load(null);
        say(status, `The organization ${data.name} (${data.id}) was created.`);
      },
    });
  }

  function edit(o) {
    const name = h('input', { autocomplete: 'off', maxlength: 255, value: o.name });
    const limits = limitFields(o);
    ask({
      title: `Edit the organization “${o.name}”`,
      body: [labelled('Display name', name), limits.fields],
      confirm: 'Save changes',
      onConfirm: async () => {
        const body = {};
        if (name.value.trim() !== o.name) body.name = name.value.trim();
        const changed = Object.entries(limits.read()).filter(([key, v]) => v !== (o.limits[key] ?? null));
        if (changed.length) body.limits = Object.fromEntries(changed);
        if (Object.keys(body).length === 0) return say(status, 'Nothing changed.');
        await api('PATCH', `/organizations/${encodeURIComponent(o.id)}`, { body });
        await load(null);
        return say(status, `${o.name} was saved.`);
      },
    });
  }

  async function remove(o) {
    let count = '';
    try {
      const { data } = await api('GET', '/webhooks?limit=1', { org: o.id });
      count = `${data.total} webhook${data.total === 1 ? '' : 's'}`;
    } catch {
      count = 'webhooks';
    }
    ask({
      title: `Delete the organization “${o.name}” (${o.id})?`,
      body: h('p', {}, `This deletes its ${count} (no delivery starts for them afterwards), its API keys and its console links, `,
        'then the organization. Its events, delivery logs and audit trail age out with their retention. This cannot be undone.'),
      confirm: `Delete “${o.name}”`,
      danger: true,
      onConfirm: async () => {
        await api('DELETE', `/organizations/${encodeURIComponent(o.id)}`);
        await load(null);
        say(status, `The organization ${o.name} (${o.id}) was deleted.`);
      },
    });
  }

  async function link(o) {
    const scope = h('select', {}, h('option', { value: 'read' }, 'Read-only: sees everything, changes nothing'),
      h('option', { value: 'admin' }, 'Admin: manages the organization’s webhooks'));
    const ttl = h('input', { value: '1h', autocomplete: 'off', spellcheck: 'false' });
    let webhooks = [];
    try { webhooks = await allWebhooks(o.id); } catch { webhooks = []; }
    const boxes = webhooks.map((w) => h('input', { type: 'checkbox', id: uid('link-webhook'), value: w.id }));
    ask({
      title: `A console link for “${o.name}”`,
      body: [
        labelled('Scope', scope),
        labelled('Valid for', ttl, 'From 1s to 24h, like 30m or 1h. The link opens once; its session ends with it.'),
        webhooks.length ? h('fieldset', {}, h('legend', {}, 'Only these webhooks (optional; none checked: all of them)'),
          webhooks.map((w, i) => h('div', { class: 'check' }, boxes[i], h('label', { for: boxes[i].id }, w.name)))) : null,
      ],
      confirm: 'Create the link',
      onConfirm: async () => {
        const body = { scope: scope.value, ttl: ttl.value.trim() };
        const ids = boxes.filter((b) => b.checked).map((b) => b.value);
        if (ids.length) body.webhook_ids = ids;
        const { data } = await api('POST', `/organizations/${encodeURIComponent(o.id)}/console-links`, { body });
        showLink(o, data);
      },
    });
  }

  function showLink(o, data) {
    const revoke = h('button', {
      type: 'button', class: 'danger',
      onclick: async () => {
        revoke.disabled = true;
        try {
          await api('DELETE', `/organizations/${encodeURIComponent(o.id)}/console-links/${encodeURIComponent(data.id)}`);
          result.replaceChildren();
          say(status, 'The console link was revoked, and any session opened with it has ended.');
        } catch (e) {
          revoke.disabled = false;
          say(status, `Could not revoke the link: ${e.message}`, 'error');
        }
      },
    }, 'Revoke this link');
    result.replaceChildren(valuePanel({
      title: `Console link for ${o.name}`,
      label: 'Link',
      value: data.url,
      copyLabel: 'Copy the link',
      warning: 'Anyone with this link can open the console as this organization until it is used or expires: hand it only to the customer it is for.',
      more: [
        h('p', {}, `${data.scope === 'read' ? 'Read-only' : 'Admin'}, `,
          data.webhook_ids ? `limited to ${data.webhook_ids.length} webhook${data.webhook_ids.length === 1 ? '' : 's'}, ` : '',
          'valid until ', time(data.expires_at), '. To frame it in your own page, put ', h('code', {}, '?embed'),
          ' after ', h('code', {}, '/console'), ' (and list your origin in HERALD_CONSOLE_FRAME_ANCESTORS).'),
        revoke,
      ],
    }));
  }

  await load(null);
  return h('section', {},
    h('div', { class: 'title' },
      h('h1', { tabindex: '-1' }, 'Organizations'),
      h('button', { type: 'button', class: 'primary', onclick: create }, 'Create an organization')),
    h('p', { class: 'lead' }, 'Your platform’s customers: each one’s webhooks, keys and limits.'),
    status,
    result,
    table,
    more);
}

function dropNulls(o) {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== null));
}
