// The console's one way to the admin API: same origin, the session's key
// as a bearer token, the organization as X-Organization-Id, JSON both
// ways, and every failure as an ApiError with the API's code, message and
// field, so a view can put it beside the field it names.

import { session } from './session.js';

export class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field || null;
  }
}

// What a 403 means, in the words of someone who clicked something.
const REFUSED = {
  read_only: 'This session is read-only: it can look at everything here but change nothing.',
  operator_only: 'Only an operator key can do this.',
  restricted: 'This console session is limited to some webhooks, so it cannot see or change the whole organization.',
};

// Called when the key stops working (401): the app signs out.
let onUnauthorized = () => {};
export function whenUnauthorized(f) { onUnauthorized = f; }

// `api('PATCH', '/webhooks/x', {body, ifMatch})` → `{status, data, etag}`.
export async function api(method, path, options = {}) {
  const key = options.key ?? session.key;
  const org = options.org ?? session.org;
  const headers = { Accept: 'application/json' };
  if (key) headers.Authorization = `Bearer ${key}`;
  if (org) headers['X-Organization-Id'] = org;
  if (options.ifMatch) headers['If-Match'] = options.ifMatch;
  let body;
  if (options.body !== undefined) {
    headers['Content-Type'] = 'application/json';
    body = JSON.stringify(options.body);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, cache: 'no-store', credentials: 'omit' });
  } catch {
    throw new ApiError(0, 'network', 'Cannot reach the admin API. Check your connection and try again.');
  }
  const text = await response.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch { data = text; }
  }
  if (!response.ok) {
    const e = (data && data.error) || {};
    const error = new ApiError(response.status, e.code || 'error',
      REFUSED[e.code] || e.message || `The API answered ${response.status}.`, e.field);
    if (response.status === 401 && options.key === undefined) onUnauthorized(error);
    throw error;
  }
  return { status: response.status, data, etag: response.headers.get('ETag') };
}

// A query string from an object, leaving out empty values.
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== '') q.set(k, v);
  }
  const s = q.toString();
  return s ? `?${s}` : '';
}

// The API's own description, read once: the console shows the buttons of
// the routes it lists (recover and replay, when this API has them).
let described = null;
export async function routes() {
  if (!described) {
    described = api('GET', '/openapi.json')
      .then(({ data }) => new Set(Object.keys(data.paths || {})))
      .catch(() => new Set());
  }
  return described;
}

// The catalogue, read once per organization.
const catalogues = new Map();
export async function eventTypes() {
  const org = session.org;
  if (!catalogues.has(org)) {
    catalogues.set(org, api('GET', '/event-types').then(({ data }) => data.data)
      .catch((e) => { catalogues.delete(org); throw e; }));
  }
  return catalogues.get(org);
}

export function forget() { catalogues.clear(); }

// Every webhook of the organization, page after page (an organization has
// at most HERALD_MAX_WEBHOOKS_PER_ORG).
export async function allWebhooks(org) {
  const webhooks = [];
  let cursor = '';
  do {
    const { data } = await api('GET', `/webhooks?limit=500&cursor=${encodeURIComponent(cursor)}`, { org });
    webhooks.push(...data.data);
    cursor = data.next_cursor || '';
  } while (cursor);
  return webhooks;
}
