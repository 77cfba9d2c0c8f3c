// One delivery attempt in full ("Show"): what was sent (headers, body
// pretty-printed), what came back (status, headers, body), the error, the
// duration, the attempt number and the next attempt's time; and a button
// that delivers the event again (not for a read-only session).

import { api } from '../api.js';
import { dl, h, liveRegion, say, time } from '../dom.js';
import { pretty } from '../pretty.js';
import { may } from '../session.js';

export async function attemptView({ id, logId }) {
  const base = `/webhooks/${encodeURIComponent(id)}`;
  const [{ data: w }, { data: a }] = await Promise.all([
    api('GET', base),
    api('GET', `${base}/logs/${encodeURIComponent(logId)}`),
  ]);
  const status = liveRegion();
  const retry = h('button', {
    type: 'button', class: 'primary',
    onclick: async () => {
      retry.disabled = true;
      try {
        const { data } = await api('POST', `${base}/logs/${encodeURIComponent(a.id)}/retry`);
        status.replaceChildren(h('p', { class: 'message info' }, 'The event is queued for delivery again. ',
          h('a', { href: `#/webhooks/${encodeURIComponent(id)}/logs/${encodeURIComponent(data.log_id)}` }, 'Show the new attempt'),
          ' (it takes a moment to appear).'));
      } catch (e) {
        say(status, `Could not deliver it again: ${e.message}`, 'error');
      } finally {
        retry.disabled = false;
      }
    },
  }, 'Deliver this event again');

  const header = (headers, name) => (headers || []).find((x) => x.name.toLowerCase() === name)?.value || '';
  const headerTable = (headers, caption) => (headers && headers.length
    ? h('table', { class: 'list headers' },
      h('caption', {}, caption),
      h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Name'), h('th', { scope: 'col' }, 'Value'))),
      h('tbody', {}, headers.map((x) => h('tr', {}, h('th', { scope: 'row' }, h('code', {}, x.name)), h('td', {}, h('code', {}, x.value))))))
    : h('p', {}, `${caption}: none`));
  const bodyBlock = (part, label) => {
    if (!part || part.body === undefined || part.body === '') return h('p', {}, `${label}: empty`);
    const text = part.body_base64 ? part.body : pretty(part.body, header(part.headers, 'content-type'));
    return h('figure', {},
      h('figcaption', {}, label,
        part.body_base64 ? ' (not text: base64)' : '',
        part.body_truncated ? ` (truncated${part.body_size ? ` from ${part.body_size} bytes` : ''})` : ''),
      h('pre', { tabindex: '0', 'aria-label': label }, h('code', {}, text)));
  };

  const req = a.request;
  const res = a.response;
  return h('section', {},
    h('p', { class: 'crumbs' }, h('a', { href: '#/webhooks' }, 'Webhooks'), ' / ',
      h('a', { href: `#/webhooks/${encodeURIComponent(id)}` }, w.name), ' / '),
    h('h1', { tabindex: '-1' }, `Attempt ${a.attempt} of ${a.event_type}`),
    may.change ? h('div', { class: 'toolbar' }, retry) : null,
    status,
    dl([
      ['Status', h('span', { class: `badge ${a.status}` }, a.status)],
      ['Time', time(a.created_at)],
      ['Attempt', String(a.attempt)],
      ['Duration', `${a.duration_ms} ms`],
      ['Next attempt', a.next_attempt_at ? time(a.next_attempt_at) : 'None'],
      ['Error', a.error || 'None'],
      ['Kind', a.kind.replace('_', ' ')],
      ['Event ID', h('code', {}, a.event_id)],
      ['Delivery ID (webhook-id)', h('code', {}, a.delivery_id)],
    ]),
    h('section', { 'aria-labelledby': 'request' },
      h('h2', { id: 'request' }, 'Request'),
      req ? [
        h('p', {}, h('code', {}, `${req.method} ${req.url}`)),
        headerTable(req.headers, 'Request headers'),
        bodyBlock(req, 'Request body'),
      ] : h('p', {}, 'Not recorded.')),
    h('section', { 'aria-labelledby': 'response' },
      h('h2', { id: 'response' }, 'Response'),
      res ? [
        h('p', {}, 'Status ', h('strong', {}, String(res.status))),
        headerTable(res.headers, 'Response headers'),
        bodyBlock(res, 'Response body'),
      ] : h('p', {}, a.error ? 'No response: see the error above.' : 'No response.')));
}
