// Delivery logs, newest first: one webhook's or the whole organization's,
// filtered by status and event type, paged with the API's next_cursor.
// "Show" opens one attempt in full.

import { allWebhooks, api, eventTypes, query } from '../api.js';
import { h, hidden, liveRegion, say, time, uid } from '../dom.js';

const STATUSES = ['succeeded', 'failed', 'retrying', 'throttled', 'skipped'];
const PAGE = 25;

export async function orgLogs() {
  const names = new Map((await allWebhooks()).map((w) => [w.id, w.name]));
  const logs = await logList({ names });
  return h('section', {},
    h('h1', { tabindex: '-1' }, 'Delivery logs'),
    h('p', { class: 'lead' }, 'Every delivery attempt of this organization’s webhooks, retries included.'),
    logs.element);
}

// The log of one webhook (`webhookId`) or of the organization (`names`
// maps webhook ids to names for the Webhook column).
export async function logList({ webhookId, names }) {
  const catalogue = await eventTypes();
  const status = h('select', { id: uid('log-status') },
    h('option', { value: '' }, 'Any status'), STATUSES.map((s) => h('option', { value: s }, s)));
  const type = h('select', { id: uid('log-type') },
    h('option', { value: '' }, 'Any event type'), catalogue.map((t) => h('option', { value: t.name }, t.name)));
  const refreshButton = h('button', { type: 'button', onclick: () => load([null]) }, 'Refresh the log');
  const newer = h('button', { type: 'button', onclick: () => load(cursors.slice(0, -1)) }, 'Newer attempts');
  const older = h('button', { type: 'button', onclick: () => load([...cursors, next]) }, 'Older attempts');
  const region = liveRegion();
  const table = h('div', { class: 'log-table' });
  let cursors = [null];
  let next = null;
  status.addEventListener('change', () => load([null]));
  type.addEventListener('change', () => load([null]));

  async function load(stack) {
    const path = webhookId ? `/webhooks/${encodeURIComponent(webhookId)}/logs` : '/webhooks/logs/all';
    const cursor = stack[stack.length - 1];
    refreshButton.disabled = true;
    try {
      const { data } = await api('GET', path + query({
        limit: PAGE, status: status.value, event_type: type.value, cursor,
      }));
      cursors = stack;
      next = data.next_cursor;
      table.replaceChildren(render(data.data));
      newer.disabled = cursors.length <= 1;
      older.disabled = !next;
      const n = data.data.length;
      say(region, n === 0 ? '' : `Showing ${n} attempt${n === 1 ? '' : 's'}${cursors.length > 1 ? ` (page ${cursors.length})` : ''}.`);
    } catch (e) {
      if (e.status !== 401) say(region, `Could not read the log: ${e.message}`, 'error');
    } finally {
      refreshButton.disabled = false;
    }
  }

  function render(rows) {
    if (rows.length === 0) {
      return h('p', { class: 'empty' },
        status.value || type.value ? 'No attempts match these filters.' : 'No delivery attempts yet.');
    }
    const columns = ['Time', names ? 'Webhook' : null, 'Event type', 'Status', 'Attempt', 'Response', 'Duration']
      .filter(Boolean);
    return h('table', { class: 'list logs' },
      h('caption', { class: 'visually-hidden' }, 'Delivery attempts, newest first'),
      h('thead', {}, h('tr', {}, columns.map((c) => h('th', { scope: 'col' }, c)),
        h('th', { scope: 'col' }, h('span', { class: 'visually-hidden' }, 'Details')))),
      h('tbody', {}, rows.map((a) => h('tr', {},
        h('td', {}, time(a.created_at)),
        names ? h('td', {}, h('a', { href: `#/webhooks/${encodeURIComponent(a.webhook_id)}` }, names.get(a.webhook_id) || a.webhook_id)) : null,
        h('td', {}, h('code', {}, a.event_type), a.kind !== 'event' ? h('span', { class: 'kind' }, ` (${a.kind.replace('_', ' ')})`) : null),
        h('td', {}, h('span', { class: `badge ${a.status}` }, a.status)),
        h('td', { class: 'num' }, a.attempt),
        h('td', { class: 'response' }, a.response_status ?? '', a.error ? h('span', { class: 'reason' }, ` ${a.error}`) : null),
        h('td', { class: 'num' }, `${a.duration_ms} ms`),
        h('td', {}, h('a', {
          class: 'button', href: `#/webhooks/${encodeURIComponent(a.webhook_id)}/logs/${encodeURIComponent(a.id)}`,
        }, 'Show', hidden(` attempt ${a.attempt} of ${a.event_type}, ${a.status}`)))))));
  }

  await load([null]);
  const element = h('div', { class: 'logs-panel' },
    h('div', { class: 'toolbar', role: 'group', 'aria-label': 'Log filters' },
      h('div', { class: 'field' }, h('label', { for: status.id }, 'Status'), status),
      h('div', { class: 'field' }, h('label', { for: type.id }, 'Event type'), type),
      refreshButton),
    region,
    table,
    h('div', { class: 'pager' }, newer, older));
  return { element, refresh: () => load([null]) };
}
