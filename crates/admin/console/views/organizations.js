// Organizations (operator keys): the list, create, edit (display name and
// limits), delete with a confirmation naming what goes with it, and one
// organization's console links: the ones still valid (what each grants,
// who made it and when, when it expires, whether it was opened; never a
// token), create one (its URL shown once, with a copy button) and revoke
// one.

import { allWebhooks, api, query } from '../api.js';
import { ask, h, hidden, labelled, liveRegion, say, time, uid, valuePanel } from '../dom.js';

const LIMITS = [
  ['max_webhooks', 'Most webhooks'],
  ['requests_per_minute', 'API requests a minute, per key'],
  ['manual_sends_per_minute', 'Manual sends a minute, per key'],
];

export async function organizations() {
  const status = liveRegion();
  const linksPanel = h('div', {});
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
          h('button', { type: 'button', 'data-links': o.id, onclick: () => openLinks(o) }, 'Console links', hidden(` of ${o.name}`)),
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
        if (open?.o.id === o.id) closeLinks(false);
        await load(null);
        say(status, `The organization ${o.name} (${o.id}) was deleted.`);
      },
    });
  }

  // The console links of the organization shown in `linksPanel`: its
  // heading (focus goes there), the new link's panel, the list, and the
  // names of its webhooks and of the keys that made links.
  let open = null;

  function openLinks(o) {
    if (open?.o.id === o.id) {
      loadLinks();
      open.heading.focus();
      return;
    }
    const titleId = uid('links-title');
    const heading = h('h2', { id: titleId, tabindex: '-1' }, `Console links of ${o.name}`);
    const here = {
      o, heading, fresh: h('div', {}), freshId: null, names: null,
      list: h('div', {}, h('p', { class: 'loading' }, 'Loading the console links…')),
    };
    open = here;
    linksPanel.replaceChildren(h('section', { class: 'links card', 'aria-labelledby': titleId },
      h('div', { class: 'title' }, heading,
        h('div', { class: 'buttons' },
          h('button', { type: 'button', class: 'primary', onclick: () => link(here) }, 'Create a console link', hidden(` for ${o.name}`)),
          h('button', { type: 'button', onclick: () => closeLinks(true) }, 'Close', hidden(' the console links')))),
      h('p', { class: 'hint' }, 'The links not yet expired, oldest first. A link opens the console once; the session it opens ',
        'lasts until the link expires, unless the link is revoked. Revoked and expired links are not listed.'),
      here.fresh,
      here.list));
    heading.focus();
    loadLinks();
  }

  function closeLinks(refocus) {
    const was = open;
    open = null;
    linksPanel.replaceChildren();
    if (refocus && was) table.querySelector(`[data-links="${CSS.escape(was.o.id)}"]`)?.focus();
  }

  async function loadLinks() {
    const here = open;
    if (!here) return;
    try {
      const [{ data }] = await Promise.all([
        api('GET', `/organizations/${encodeURIComponent(here.o.id)}/console-links`),
        namesOf(here),
      ]);
      if (open !== here) return;
      here.list.replaceChildren(renderLinks(here, data.data));
    } catch (e) {
      if (open !== here || e.status === 401) return;
      const region = h('div', { role: 'alert' });
      say(region, `Could not load the console links: ${e.message}`, 'error');
      here.list.replaceChildren(region, h('button', { type: 'button', onclick: () => loadLinks() }, 'Try again'));
    }
  }

  // Webhook and key names for the list, read once per opening; an id
  // without a name is shown as it is.
  async function namesOf(here) {
    if (!here.names) {
      const [webhooks, keys] = await Promise.all([
        allWebhooks(here.o.id).catch(() => []),
        api('GET', '/api-keys').then(({ data }) => data.data).catch(() => []),
      ]);
      here.names = {
        webhooks: new Map(webhooks.map((w) => [w.id, w.name])),
        keys: new Map(keys.map((k) => [k.id, k.name])),
      };
    }
    return here.names;
  }

  const scopeName = (l) => (l.scope === 'read' ? 'Read-only' : 'Admin');

  function webhooksOf(here, l) {
    if (!l.webhook_ids) return 'All webhooks';
    return h('ul', { class: 'plain' }, l.webhook_ids.map((id) => h('li', {},
      here.names?.webhooks.get(id) ?? h('code', {}, id))));
  }

  function creator(here, id) {
    const name = here.names?.keys.get(id);
    if (name) return name;
    return id.startsWith('file:') ? ['a key of the keys file ', h('code', {}, id)] : h('code', {}, id);
  }

  function renderLinks(here, links) {
    if (links.length === 0) {
      return h('p', { class: 'empty' }, `${here.o.name} has no console link that is still valid.`);
    }
    return h('table', { class: 'list' },
      h('caption', { class: 'visually-hidden' }, `Console links of ${here.o.name}`),
      h('thead', {}, h('tr', {},
        ['Link', 'Scope', 'Webhooks', 'Created', 'Created by', 'Expires', 'Opened'].map((c) => h('th', { scope: 'col' }, c)),
        h('th', { scope: 'col' }, h('span', { class: 'visually-hidden' }, 'Actions')))),
      h('tbody', {}, links.map((l) => h('tr', {},
        h('th', { scope: 'row' }, h('code', {}, l.id)),
        h('td', {}, scopeName(l)),
        h('td', {}, webhooksOf(here, l)),
        h('td', {}, time(l.created_at)),
        h('td', {}, creator(here, l.created_by)),
        h('td', {}, time(l.expires_at)),
        h('td', {}, l.exchanged_at ? time(l.exchanged_at) : 'Not yet'),
        h('td', { class: 'actions' },
          h('button', { type: 'button', class: 'danger', onclick: () => revokeLink(here, l) }, 'Revoke', hidden(` ${l.id}`)))))));
  }

  async function link(here) {
    const { o } = here;
    const scope = h('select', {}, h('option', { value: 'read' }, 'Read-only: sees everything, changes nothing'),
      h('option', { value: 'admin' }, 'Admin: manages the organization’s webhooks'));
    const ttl = h('input', { value: '1h', autocomplete: 'off', spellcheck: 'false' });
    let webhooks = [];
    try { webhooks = await allWebhooks(o.id); } catch { webhooks = []; }
    const boxes = webhooks.map((w) => h('input', { type: 'checkbox', id: uid('link-webhook'), value: w.id }));
    let made = null;
    const created = await ask({
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
        made = (await api('POST', `/organizations/${encodeURIComponent(o.id)}/console-links`, { body })).data;
      },
    });
    if (!created || open !== here) return;
    here.names = null; // a webhook made meanwhile gets its name
    showLink(here, made);
    await loadLinks();
  }

  // The new link's URL, shown once (the API keeps only its hash).
  function showLink(here, data) {
    here.freshId = data.id;
    here.fresh.replaceChildren(valuePanel({
      title: `Console link for ${here.o.name}`,
      label: 'Link',
      value: data.url,
      copyLabel: 'Copy the link',
      warning: 'Copy it now: it will not be shown again. Anyone with this link can open the console as this organization until it is used or expires: hand it only to the customer it is for.',
      more: [
        h('p', {}, `${scopeName(data)}, `,
          data.webhook_ids ? `limited to ${data.webhook_ids.length} webhook${data.webhook_ids.length === 1 ? '' : 's'}, ` : '',
          'valid until ', time(data.expires_at), '. To frame it in your own page, put ', h('code', {}, '?embed'),
          ' after ', h('code', {}, '/console'), ' (and list your origin in HERALD_CONSOLE_FRAME_ANCESTORS).'),
        h('button', { type: 'button', class: 'danger', onclick: () => revokeLink(here, data) }, 'Revoke this link'),
      ],
    }));
  }

  async function revokeLink(here, l) {
    let gone = false;
    const webhooks = l.webhook_ids
      ? `limited to ${l.webhook_ids.length} webhook${l.webhook_ids.length === 1 ? '' : 's'}`
      : 'for all its webhooks';
    const revoked = await ask({
      title: `Revoke the console link ${l.id}?`,
      body: [
        h('p', {}, `${scopeName(l)}, ${webhooks}, valid until `, time(l.expires_at), '.'),
        h('p', {}, l.exchanged_at
          ? 'It was opened already: the session opened with it ends on every admin replica within seconds. '
          : 'Nobody has opened it yet: it will sign nobody in. ',
        'This cannot be undone.'),
      ],
      confirm: 'Revoke the link',
      danger: true,
      onConfirm: async () => {
        try {
          await api('DELETE', `/organizations/${encodeURIComponent(here.o.id)}/console-links/${encodeURIComponent(l.id)}`);
        } catch (e) {
          if (e.status !== 404) throw e;
          gone = true; // expired, or revoked by someone else meanwhile
        }
      },
    });
    if (!revoked || open !== here) return;
    if (here.freshId === l.id) {
      here.fresh.replaceChildren();
      here.freshId = null;
    }
    await loadLinks();
    say(status, gone
      ? `The console link ${l.id} had already expired or been revoked.`
      : `The console link ${l.id} was revoked: it signs nobody in, and any session opened with it has ended.`);
    here.heading.focus();
  }

  await load(null);
  return h('section', {},
    h('div', { class: 'title' },
      h('h1', { tabindex: '-1' }, 'Organizations'),
      h('button', { type: 'button', class: 'primary', onclick: create }, 'Create an organization')),
    h('p', { class: 'lead' }, 'Your platform’s customers: each one’s webhooks, keys and limits.'),
    status,
    linksPanel,
    table,
    more);
}

function dropNulls(o) {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== null));
}
