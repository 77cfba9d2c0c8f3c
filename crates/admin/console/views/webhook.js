// One webhook: its definition and state, the secret once after create or
// rotate, the actions (edit, send a test event, rotate the secret, recover,
// replay, delete), what an ordered webhook holds back, and its delivery
// log. A read-only session gets the same
// page without the actions.

import { api, query, routes } from '../api.js';
import { ask, dl, h, hidden, liveRegion, say, time, uid } from '../dom.js';
import { go, onLeave, takeFlash } from '../nav.js';
import { logList } from './logs.js';
import { may } from '../session.js';
import { keepSecret, secretPanel, takeSecret } from './secret.js';
import { confirmDelete, stateOf } from './webhooks.js';

export async function webhookDetail({ id }) {
  const path = `/webhooks/${encodeURIComponent(id)}`;
  const { data: w } = await api('GET', path);
  const described = await routes();
  const status = liveRegion();
  const flashed = takeFlash();
  if (flashed) say(status, flashed);
  const kept = takeSecret(w.id);
  const secretSlot = h('div', {}, kept ? secretPanel(kept) : null);
  const jobSlot = h('div', {});
  const stateEl = h('p', { class: 'state-line' }, 'State: ', stateOf(w));
  const logs = await logList({ webhookId: w.id });

  const switchId = uid('enabled');
  const toggle = h('input', {
    type: 'checkbox', role: 'switch', id: switchId, checked: w.enabled,
    onchange: async () => {
      const enabled = toggle.checked;
      toggle.disabled = true;
      try {
        const { data } = await api('PATCH', path, { body: { enabled } });
        Object.assign(w, data);
        stateEl.replaceChildren('State: ', stateOf(w));
        say(status, `${w.name} is ${enabled ? 'enabled' : 'disabled'}.`);
      } catch (e) {
        toggle.checked = !enabled;
        say(status, `Could not ${enabled ? 'enable' : 'disable'} it: ${e.message}`, 'error');
      } finally {
        toggle.disabled = false;
      }
    },
  });

  const test = h('button', {
    type: 'button',
    onclick: async () => {
      test.disabled = true;
      try {
        const { data } = await api('POST', `${path}/test`);
        say(status, 'A test workflow.completed event is on its way; its attempt appears in the log below.');
        waitForAttempt(data.log_id);
      } catch (e) {
        say(status, `Could not send a test event: ${e.message}`, 'error');
      } finally {
        test.disabled = false;
      }
    },
  }, 'Send a test event');

  // The log is refreshed until the test's attempt is in it (a few seconds).
  let polling = null;
  onLeave(() => clearTimeout(polling));
  function waitForAttempt(logId, tries = 10) {
    clearTimeout(polling);
    polling = setTimeout(async () => {
      await logs.refresh();
      if (tries > 1 && !logs.element.querySelector(`a[href$="/logs/${CSS.escape(encodeURIComponent(logId))}"]`)) {
        waitForAttempt(logId, tries - 1);
      }
    }, 700);
  }

  const rotate = h('button', {
    type: 'button',
    onclick: () => ask({
      title: `Rotate the secret of “${w.name}”?`,
      body: h('p', {}, 'Herald makes a new secret and shows it once. The current secret keeps signing alongside it for 24 hours.'),
      confirm: 'Rotate the secret',
      onConfirm: async () => {
        const { data } = await api('POST', `${path}/rotate-secret`);
        keepSecret(w.id, data.secret, 'rotated');
        secretSlot.replaceChildren(secretPanel(takeSecret(w.id)));
        say(status, 'The secret was rotated. Copy the new one below.');
        secretSlot.querySelector('h2').setAttribute('tabindex', '-1');
        setTimeout(() => secretSlot.querySelector('h2').focus());
      },
    }),
  }, 'Rotate the secret');

  const jobButtons = [];
  if (described.has('/webhooks/{id}/recover')) {
    jobButtons.push(h('button', { type: 'button', onclick: () => startJob('recover') }, 'Recover failed deliveries'));
  }
  if (described.has('/webhooks/{id}/replay')) {
    jobButtons.push(h('button', { type: 'button', onclick: () => startJob('replay') }, 'Replay events'));
  }

  // Recover (deliver again what failed) or replay (deliver retained events
  // again) in a time window; then the job's progress until it is done.
  function startJob(kind) {
    const local = (d) => {
      const pad = (n) => String(n).padStart(2, '0');
      return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
    };
    const since = h('input', { type: 'datetime-local', id: uid('since'), value: local(new Date(Date.now() - 86400000)) });
    const until = h('input', { type: 'datetime-local', id: uid('until') });
    const types = h('input', { id: uid('replay-types'), autocomplete: 'off', spellcheck: 'false' });
    const body = [
      h('p', {}, kind === 'recover'
        ? 'Herald delivers again every delivery of this webhook in the window whose last attempt failed or was skipped, with the same webhook-id.'
        : 'Herald delivers again every retained event of the window that this webhook matches now, as new deliveries.'),
      h('div', { class: 'field' }, h('label', { for: since.id }, 'From (your local time)'), since),
      h('div', { class: 'field' }, h('label', { for: until.id }, 'Until (optional; now when empty)'), until),
      kind === 'replay' ? h('div', { class: 'field' },
        h('label', { for: types.id }, 'Only these event types (optional, comma-separated)'), types) : null,
    ];
    ask({
      title: kind === 'recover' ? `Recover failed deliveries of “${w.name}”` : `Replay events to “${w.name}”`,
      body,
      confirm: kind === 'recover' ? 'Start recovering' : 'Start replaying',
      onConfirm: async () => {
        const request = { since: since.value ? new Date(since.value).toISOString() : '' };
        if (until.value) request.until = new Date(until.value).toISOString();
        const list = types.value.split(',').map((s) => s.trim()).filter(Boolean);
        if (kind === 'replay' && list.length) request.event_types = list;
        const { data } = await api('POST', `${path}/${kind}`, { body: request });
        follow(data);
      },
    });
  }

  // A job's progress, polled each second while it runs, with a button that
  // stops it (what it already sent stays sent).
  function follow(job) {
    const line = h('p', {});
    const titleId = uid('job');
    const noun = job.kind === 'replay' ? 'replay' : 'recovery';
    const problem = h('div', {});
    let timer = null;
    const cancel = h('button', {
      type: 'button',
      class: 'danger',
      onclick: async () => {
        cancel.disabled = true;
        say(problem, '');
        try {
          const { data } = await api('POST', `${path}/jobs/${encodeURIComponent(job.id)}/cancel`);
          clearTimeout(timer);
          show(data);
          logs.refresh();
        } catch (e) {
          cancel.disabled = false;
          say(problem, `Could not cancel the ${noun}: ${e.message}`, 'error');
          // It may have ended meanwhile: show how.
          clearTimeout(timer);
          poll();
        }
      },
    }, `Cancel the ${noun}`);
    const panel = h('section', { class: 'card job', 'aria-labelledby': titleId },
      h('h2', { id: titleId }, job.kind === 'replay' ? 'Replay' : 'Recovery'),
      h('div', { role: 'status', 'aria-live': 'polite' }, line),
      cancel, problem);
    jobSlot.replaceChildren(panel);
    const STATUS = { running: 'Running', done: 'Done', failed: 'Failed', cancelled: 'Cancelled' };
    const show = (j) => {
      const what = STATUS[j.status] || j.status;
      line.textContent = `${what}: ${j.queued} queued, ${j.delivered} delivered, ${j.failed} failed${j.error ? ` — ${j.error}` : ''}.`;
      if (j.status !== 'running') cancel.remove();
    };
    show(job);
    onLeave(() => clearTimeout(timer));
    const poll = async () => {
      try {
        const { data } = await api('GET', `${path}/jobs/${encodeURIComponent(job.id)}`);
        show(data);
        if (data.status === 'running') timer = setTimeout(poll, 1000);
        else logs.refresh();
      } catch (e) {
        line.textContent = `Cannot read the job's progress: ${e.message}`;
      }
    };
    if (job.status === 'running') timer = setTimeout(poll, 1000);
  }

  // What an ordered webhook holds back (`ordering_status`), read again on
  // request: a held key waits for a recovery.
  const orderingSlot = h('div', {});
  const orderingRegion = liveRegion();
  const refreshOrdering = h('button', {
    type: 'button',
    onclick: async () => {
      refreshOrdering.disabled = true;
      try {
        const { data } = await api('GET', path);
        orderingSlot.replaceChildren(await orderingFacts(data));
        say(orderingRegion, 'The ordering status is up to date.');
      } catch (e) {
        if (e.status !== 401) say(orderingRegion, `Could not read the ordering status: ${e.message}`, 'error');
      } finally {
        refreshOrdering.disabled = false;
      }
    },
  }, 'Refresh the ordering status');
  if (w.ordering) orderingSlot.append(await orderingFacts(w));

  const del = h('button', { type: 'button', class: 'danger', onclick: () => confirmDelete(w, () => go('#/webhooks')) },
    'Delete', hidden(` ${w.name}`));

  const filters = Object.entries(w.filters || {});
  const headers = Object.entries(w.headers || {});
  return h('section', {},
    h('p', { class: 'crumbs' }, h('a', { href: '#/webhooks' }, 'Webhooks'), ' / '),
    h('div', { class: 'title' },
      h('h1', { tabindex: '-1' }, w.name),
      may.change ? h('label', { for: switchId, class: 'switch' }, toggle, ' Enabled')
        : h('p', {}, w.enabled ? 'Enabled' : 'Not enabled')),
    stateEl,
    may.change ? h('div', { class: 'toolbar actions', role: 'group', 'aria-label': 'Actions' },
      h('a', { class: 'button', href: `#/webhooks/${encodeURIComponent(w.id)}/edit` }, 'Edit', hidden(` ${w.name}`)),
      test, rotate, jobButtons, del) : null,
    status,
    secretSlot,
    jobSlot,
    h('section', { 'aria-labelledby': 'definition' },
      h('h2', { id: 'definition' }, 'Definition'),
      dl([
        ['URL', h('span', { class: 'url' }, w.url)],
        w.description ? ['Description', w.description] : null,
        ['Events', h('ul', { class: 'tags' }, w.event_types.map((t) => h('li', {}, h('code', {}, t))))],
        ['Filters', filters.length === 0 ? 'None: every event of these types'
          : h('ul', { class: 'plain' }, filters.map(([k, v]) => h('li', {}, h('code', {}, k), `: ${v.join(', ')}`)))],
        ['Format', w.format.toUpperCase()],
        ['Custom headers', headers.length === 0 ? 'None'
          // Values come masked (••••abcd): the API never shows them again.
          : h('ul', { class: 'plain' }, headers.map(([k, v]) => h('li', {}, h('code', {}, k), `: ${v}`)))],
        ['Timeout', `${w.timeout_ms} ms`],
        ['Ordering', orderingText(w.ordering)],
        ['Created', time(w.created_at)],
        ['Updated', time(w.updated_at)],
        ['ID', h('code', {}, w.id)],
      ])),
    w.ordering ? h('section', { 'aria-labelledby': 'ordering' },
      h('h2', { id: 'ordering' }, 'Ordered delivery'),
      orderingSlot, refreshOrdering, orderingRegion) : null,
    h('section', { 'aria-labelledby': 'log' },
      h('h2', { id: 'log' }, 'Delivery log'),
      logs.element));
}

// A webhook's `ordering`, in words.
function orderingText(ordering) {
  if (!ordering) return 'None: every event is delivered on its own';
  return h('span', {}, 'By ', h('code', {}, ordering.key),
    ': the events that share its value go one at a time, in order. ',
    ordering.on_failure === 'hold'
      ? 'A delivery that gives up holds its key until it is recovered.'
      : 'A delivery that gives up is skipped: the next ones of its key go on.');
}

// `ordering_status` as facts: the keys waiting and held back, and the
// oldest waiting delivery with a link to its latest attempt, if it has one.
async function orderingFacts(w) {
  const s = w.ordering_status;
  if (!s) return h('p', {}, 'Herald cannot say what waits right now. Try again in a moment.');
  let oldest = 'None: nothing waits';
  if (s.oldest) {
    const o = s.oldest;
    let attempt = null;
    try {
      const { data } = await api('GET', `/webhooks/${encodeURIComponent(w.id)}/logs${query({ delivery_id: o.delivery_id, limit: 1 })}`);
      const latest = data.data[0];
      if (latest) {
        attempt = h('a', { href: `#/webhooks/${encodeURIComponent(w.id)}/logs/${encodeURIComponent(latest.id)}` },
          'Show its latest attempt', hidden(` (attempt ${latest.attempt}, ${latest.status})`));
      }
    } catch (e) {
      if (e.status === 401) throw e;
    }
    oldest = h('ul', { class: 'plain' },
      h('li', {}, h('code', {}, o.event_type), ', key ', h('code', {}, o.key)),
      h('li', {}, 'Waiting since ', time(o.since)),
      h('li', {}, o.held ? 'Held: it gave up and its key waits until it is recovered.' : 'Not held: it is being delivered, or waits for its next retry.'),
      h('li', {}, 'Delivery ID (webhook-id): ', h('code', {}, o.delivery_id)),
      h('li', {}, attempt || 'No attempt yet.'));
  }
  return dl([
    ['Keys waiting', String(s.keys_waiting)],
    ['Keys held back', String(s.keys_held_back)],
    ['Deliveries waiting', String(s.deliveries_waiting)],
    ['Oldest waiting delivery', oldest],
  ]);
}
