// The audit trail of the organization, newest first, paged with the API's
// next_cursor: which key changed what, when, and the names of the fields
// it gave (never their values). An operator may read every organization's.

import { api, query } from '../api.js';
import { h, liveRegion, say, time, uid } from '../dom.js';
import { may, session } from '../session.js';

const PAGE = 25;

export async function auditTrail() {
  const region = liveRegion();
  const table = h('div', {});
  const everyId = uid('audit-all');
  const every = may.operate
    ? h('input', { type: 'checkbox', id: everyId, onchange: () => load([null]) }) : null;
  const newer = h('button', { type: 'button', onclick: () => load(cursors.slice(0, -1)) }, 'Newer changes');
  const older = h('button', { type: 'button', onclick: () => load([...cursors, next]) }, 'Older changes');
  let cursors = [null];
  let next = null;

  async function load(stack) {
    const all = every?.checked;
    const { data } = await api('GET', `/audit${query({ limit: PAGE, cursor: stack[stack.length - 1], all: all ? 'true' : '' })}`);
    cursors = stack;
    next = data.next_cursor;
    newer.disabled = cursors.length <= 1;
    older.disabled = !next;
    table.replaceChildren(render(data.data, all));
    say(region, data.data.length ? `Showing ${data.data.length} change${data.data.length === 1 ? '' : 's'}${cursors.length > 1 ? ` (page ${cursors.length})` : ''}.` : '');
  }

  function render(rows, all) {
    if (rows.length === 0) return h('p', { class: 'empty' }, 'No changes recorded yet.');
    return h('table', { class: 'list audit' },
      h('caption', { class: 'visually-hidden' }, 'Changes, newest first'),
      h('thead', {}, h('tr', {},
        ['Time', all ? 'Organization' : null, 'Change', 'Of', 'Fields', 'By key'].filter(Boolean)
          .map((c) => h('th', { scope: 'col' }, c)))),
      h('tbody', {}, rows.map((r) => h('tr', {},
        h('td', {}, time(r.at)),
        all ? h('td', {}, r.organization || 'every organization') : null,
        h('td', {}, h('code', {}, r.action)),
        h('td', {}, `${r.target.type.replace('_', ' ')} `, h('code', {}, r.target.id)),
        h('td', {}, r.fields.length ? r.fields.join(', ') : '—'),
        h('td', {}, h('code', {}, r.key_id))))));
  }

  await load([null]);
  return h('section', {},
    h('h1', { tabindex: '-1' }, 'Audit trail'),
    h('p', { class: 'lead' },
      `Every change to ${session.org}’s webhooks, API keys, console links and the organization itself: `,
      'which key made it, when, and the names of the fields it gave (never their values). Newest first.'),
    every ? h('div', { class: 'check field' }, every, h('label', { for: everyId }, 'Every organization’s changes')) : null,
    region,
    table,
    h('div', { class: 'pager' }, newer, older));
}
