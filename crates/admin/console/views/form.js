// One form to create and to edit a webhook: name, URL, description, the
// catalogue grouped as the seed products group it, the filters that fit the
// chosen types, format, custom headers, timeout, ordered delivery (an
// attribute to order by, and what a delivery that gives up does to its
// key). The API validates; its
// error lands beside the field it names. An edit sends only what changed,
// with If-Match, and a 409 says the webhook changed meanwhile. Custom
// header values come masked and go back unchanged when not edited: the API
// keeps the value behind an unchanged mask.

import { api, ApiError, eventTypes } from '../api.js';
import { h, say, uid } from '../dom.js';
import { FILTERS, grouped, list, selected } from '../catalogue.js';
import { flash, go } from '../nav.js';
import { keepSecret } from './secret.js';

export async function webhookForm({ id }) {
  const catalogue = await eventTypes();
  let current = null;
  let etag = null;
  if (id) {
    const answer = await api('GET', `/webhooks/${encodeURIComponent(id)}`);
    current = answer.data;
    etag = answer.etag;
  }
  const editing = current !== null;
  const w = current || {
    name: '', url: '', description: '', event_types: [], filters: {}, format: 'json',
    headers: {}, timeout_ms: 5000, ordering: null, enabled: true,
  };
  const fields = new Map(); // API field name → {focus, error, hint}
  const formError = h('div', { class: 'form-error', role: 'alert' });

  // One labelled control with its hint and the slot for its error.
  function field(name, label, control, hint) {
    const controlId = control.id || uid(`f-${name}`);
    control.id = controlId;
    const hintEl = hint ? h('p', { id: `${controlId}-hint`, class: 'hint' }, hint) : null;
    const error = h('p', { id: `${controlId}-error`, class: 'field-error', hidden: true });
    fields.set(name, { focus: control, error, hint: hintEl && hintEl.id });
    if (hintEl) control.setAttribute('aria-describedby', hintEl.id);
    return h('div', { class: 'field' }, h('label', { for: controlId }, label), hintEl, control, error);
  }

  // A group of controls (a fieldset) with the slot for its error.
  function group(name, legend, hint, ...children) {
    const error = h('p', { class: 'field-error', hidden: true, id: uid(`f-${name}-error`) });
    const hintEl = hint ? h('p', { class: 'hint', id: uid(`f-${name}-hint`) }, hint) : null;
    const set = h('fieldset', { class: `group ${name}` }, h('legend', {}, legend), hintEl, error, ...children);
    if (hintEl) set.setAttribute('aria-describedby', hintEl.id);
    fields.set(name, { focus: set, error, hint: hintEl && hintEl.id, group: true });
    return set;
  }

  const name = h('input', { name: 'name', value: w.name, maxlength: 255, autocomplete: 'off' });
  const url = h('input', {
    name: 'url', type: 'url', value: w.url, inputmode: 'url', autocomplete: 'off', spellcheck: 'false',
    placeholder: 'https://example.com/webhooks/herald',
  });
  const description = h('textarea', { name: 'description', rows: 2, maxlength: 1024 }, w.description);

  // The catalogue as checkboxes; types and patterns outside it in a text field.
  const known = new Set(catalogue.map((t) => t.name));
  const boxes = [];
  const eventGroups = grouped(catalogue).map((g) => h('fieldset', { class: 'types' },
    h('legend', {}, g.title),
    g.types.map((t) => {
      const box = h('input', {
        type: 'checkbox', name: 'event_types', value: t.name, id: uid('type'),
        checked: w.event_types.includes(t.name), onchange: refresh,
      });
      boxes.push(box);
      return h('div', { class: 'check' }, box,
        h('label', { for: box.id }, h('code', {}, t.name), ' ', h('span', { class: 'desc' }, t.description)));
    })));
  const patterns = h('input', {
    name: 'patterns', autocomplete: 'off', spellcheck: 'false', oninput: refresh,
    value: w.event_types.filter((t) => !known.has(t)).join(', '),
  });

  // Filters: the known ones beside the types they fit; any other attribute
  // (and a known one that fits none of the chosen types) as text lines.
  const chosenAtStart = selected(w.event_types, catalogue);
  const other = [];
  const filterControls = FILTERS.map((f) => {
    const values = w.filters[f.key] || [];
    const fits = chosenAtStart.some(f.applies) || chosenAtStart.length === 0;
    if (values.length > 0 && !fits) {
      other.push(`${f.key}: ${values.join(', ')}`);
    }
    const start = fits ? values : [];
    const warning = h('p', { class: 'warning', hidden: true });
    let read;
    let control;
    if (f.values) {
      const checks = f.values.map((v) => h('input', {
        type: 'checkbox', id: uid(`${f.key}`), value: v, checked: start.includes(v), onchange: refresh,
      }));
      const more = h('input', {
        id: uid(`${f.key}-more`), autocomplete: 'off', oninput: refresh,
        value: start.filter((v) => !f.values.includes(v)).join(', '),
      });
      control = h('fieldset', { class: 'filter' },
        h('legend', {}, f.label),
        h('p', { class: 'hint' }, f.hint),
        h('div', { class: 'inline' }, checks.map((c) => h('span', { class: 'check' }, c,
          h('label', { for: c.id }, c.value)))),
        h('div', { class: 'field' }, h('label', { for: more.id }, `Other ${f.label.toLowerCase()} values`), more),
        warning);
      read = () => [...checks.filter((c) => c.checked).map((c) => c.value), ...list(more.value)];
    } else {
      const input = h('input', {
        id: uid(`filter-${f.key}`), autocomplete: 'off', spellcheck: 'false', oninput: refresh,
        value: start.join(', '), 'aria-describedby': null,
      });
      const hintId = `${input.id}-hint`;
      input.setAttribute('aria-describedby', hintId);
      control = h('div', { class: 'field filter' },
        h('label', { for: input.id }, f.label),
        h('p', { id: hintId, class: 'hint' }, f.hint),
        input, warning);
      read = () => list(input.value);
    }
    return { f, control, read, warning };
  });
  for (const [key, values] of Object.entries(w.filters)) {
    if (!FILTERS.some((f) => f.key === key)) other.push(`${key}: ${values.join(', ')}`);
  }
  const otherFilters = h('textarea', {
    id: uid('other-filters'), rows: 2, spellcheck: 'false', oninput: refresh,
  }, other.join('\n'));
  const noFilters = h('p', { class: 'hint' }, 'Pick events above to see the filters that fit them.');

  const formats = ['json', 'xml'].map((f) => h('input', {
    type: 'radio', name: 'format', value: f, id: uid(`format-${f}`), checked: w.format === f,
  }));

  const headerRows = h('div', { class: 'header-rows' });
  const addHeader = (hname = '', value = '') => {
    const n = headerRows.children.length + 1;
    const nameInput = h('input', { id: uid('header-name'), value: hname, autocomplete: 'off', spellcheck: 'false' });
    const valueInput = h('input', { id: uid('header-value'), value, autocomplete: 'off', spellcheck: 'false' });
    const rowEl = h('div', { class: 'header-row' },
      h('div', { class: 'field' }, h('label', { for: nameInput.id }, `Header ${n} name`), nameInput),
      h('div', { class: 'field' }, h('label', { for: valueInput.id }, `Header ${n} value`), valueInput),
      h('button', {
        type: 'button', class: 'quiet', onclick: () => { rowEl.remove(); renumber(); addButton.focus(); },
      }, `Remove header ${n}`));
    headerRows.append(rowEl);
    return nameInput;
  };
  const renumber = () => {
    [...headerRows.children].forEach((rowEl, i) => {
      const labels = rowEl.querySelectorAll('label');
      labels[0].textContent = `Header ${i + 1} name`;
      labels[1].textContent = `Header ${i + 1} value`;
      rowEl.querySelector('button').textContent = `Remove header ${i + 1}`;
    });
  };
  for (const [k, v] of Object.entries(w.headers)) addHeader(k, v);
  const addButton = h('button', { type: 'button', class: 'quiet', onclick: () => addHeader().focus() }, 'Add a header');

  const timeout = h('input', { name: 'timeout_ms', type: 'number', min: 1, max: 30000, step: 1, value: String(w.timeout_ms) });

  // Ordered delivery: an attribute name (empty: unordered) and what a
  // delivery that gives up does to its key.
  const orderingKey = h('input', {
    name: 'ordering_key', value: w.ordering ? w.ordering.key : '', maxlength: 64,
    autocomplete: 'off', spellcheck: 'false', placeholder: 'execution', oninput: () => refreshOrdering(),
  });
  const onFailure = h('select', { name: 'on_failure', value: w.ordering ? w.ordering.on_failure : 'skip' },
    h('option', { value: 'skip' }, 'Skip it'),
    h('option', { value: 'hold' }, 'Hold the key'));
  const refreshOrdering = () => { onFailure.disabled = orderingKey.value.trim() === ''; };
  refreshOrdering();

  const enabled = h('input', { type: 'checkbox', id: uid('enabled'), checked: w.enabled });
  const secret = editing ? null : h('input', { name: 'secret', autocomplete: 'off', spellcheck: 'false', maxlength: 255 });

  const submit = h('button', { type: 'submit', class: 'primary' }, editing ? 'Save changes' : 'Create webhook');
  const cancelHref = editing ? `#/webhooks/${encodeURIComponent(current.id)}` : '#/webhooks';

  const form = h('form', { class: 'webhook-form', novalidate: true, onsubmit: save },
    formError,
    field('name', 'Name', name, 'Something that reminds you why it exists, e.g. "invoice approvals to ERP".'),
    field('url', 'URL', url, 'Where Herald POSTs the events: your receiving application.'),
    field('description', 'Description (optional)', description),
    group('event_types', 'Events', 'Herald delivers the events of the types you pick. Pick only what you need.',
      eventGroups,
      h('div', { class: 'field' },
        h('label', { for: (patterns.id = uid('patterns')) }, 'Other types or patterns (optional)'),
        h('p', { class: 'hint', id: `${patterns.id}-hint` },
          'Comma-separated: workflow.* matches one level, workflow.> any depth.'),
        patterns)),
    group('filters', 'Filters (optional)',
      'Narrow the chosen events by their attributes. An event is delivered when, for every filter you fill in, its attribute matches one of the values.',
      noFilters,
      filterControls.map((c) => c.control),
      h('details', { class: 'more', open: other.length > 0 ? true : null },
        h('summary', {}, 'Filter on other attributes'),
        h('div', { class: 'field' },
          h('label', { for: otherFilters.id }, 'Other attribute filters'),
          h('p', { class: 'hint', id: `${otherFilters.id}-hint` }, 'One per line: attribute: value, value'),
          otherFilters))),
    group('format', 'Format', null,
      h('div', { class: 'inline' }, formats.map((r) => h('span', { class: 'check' }, r,
        h('label', { for: r.id }, r.value.toUpperCase()))))),
    group('headers', 'Custom headers (optional)',
      Object.keys(w.headers).length
        ? 'Sent with every request. Saved values are shown masked (••••abcd, the last four characters): leave one as it is to keep it, or replace it all to change it.'
        : 'Sent with every request, e.g. an Authorization your endpoint expects.',
      headerRows, addButton),
    field('timeout_ms', 'Timeout (milliseconds)', timeout, 'How long Herald waits for a 2xx answer: 1 to 30000, default 5000.'),
    h('fieldset', { class: 'group ordering' }, h('legend', {}, 'Ordered delivery (optional)'),
      field('ordering', 'Ordering key', orderingKey,
        'An attribute of the events, e.g. execution: the events that share its value are delivered one at a time, in the order Herald accepted them; other values, and events without it, go in parallel. Leave it empty to deliver every event on its own.'),
      field('on_failure', 'If a delivery gives up', onFailure,
        'Skip it: it is marked failed (you can recover it) and the next ones of its key go on. Hold the key: the next ones of its key wait until it is recovered.')),
    h('div', { class: 'check field' }, enabled, h('label', { for: enabled.id }, 'Enabled: deliver events to it')),
    secret ? field('secret', 'Secret (optional)', secret,
      'Leave it empty and Herald generates one. Either way it is shown once, right after you create the webhook.') : null,
    h('div', { class: 'buttons' }, submit, h('a', { class: 'button', href: cancelHref }, 'Cancel')));
  patterns.setAttribute('aria-describedby', `${patterns.id}-hint`);
  otherFilters.setAttribute('aria-describedby', `${otherFilters.id}-hint`);

  function chosenTypes() {
    return [...boxes.filter((b) => b.checked).map((b) => b.value), ...list(patterns.value)];
  }

  // Shows the filters that fit the chosen types, and warns when a filled-in
  // filter would stop some of them: an event without the attribute never
  // matches.
  function refresh() {
    const chosen = selected(chosenTypes(), catalogue);
    let any = false;
    for (const c of filterControls) {
      const fits = chosen.filter(c.f.applies);
      c.control.hidden = fits.length === 0;
      any = any || fits.length > 0;
      const misfits = chosen.filter((t) => !c.f.applies(t));
      if (fits.length > 0 && c.read().length > 0 && misfits.length > 0) {
        c.warning.textContent = `Events of ${misfits.join(', ')} have no ${c.f.key} attribute: with this filter they are never delivered.`;
        c.warning.hidden = false;
      } else {
        c.warning.hidden = true;
      }
    }
    noFilters.hidden = any;
  }
  refresh();

  function readFilters() {
    const filters = {};
    for (const c of filterControls) {
      const values = c.read();
      if (!c.control.hidden && values.length > 0) filters[c.f.key] = values;
    }
    for (const line of otherFilters.value.split('\n')) {
      const at = line.indexOf(':');
      if (at < 0) {
        if (line.trim()) throw new ApiError(400, 'validation_failed', `"${line.trim()}" is not "attribute: value, value".`, 'filters');
        continue;
      }
      const key = line.slice(0, at).trim();
      filters[key] = [...(filters[key] || []), ...list(line.slice(at + 1))];
    }
    return filters;
  }

  function readHeaders() {
    const headers = {};
    for (const rowEl of headerRows.children) {
      const [k, v] = rowEl.querySelectorAll('input');
      if (k.value.trim() || v.value) headers[k.value.trim()] = v.value;
    }
    return headers;
  }

  function read() {
    const t = timeout.value.trim();
    const body = {
      name: name.value,
      url: url.value.trim(),
      description: description.value,
      event_types: chosenTypes(),
      filters: readFilters(),
      format: formats.find((r) => r.checked)?.value || 'json',
      headers: readHeaders(),
      timeout_ms: t === '' ? null : (/^[0-9]+$/.test(t) ? Number(t) : t),
      ordering: orderingKey.value.trim() === '' ? null
        : { key: orderingKey.value.trim(), on_failure: onFailure.value },
      enabled: enabled.checked,
    };
    if (!editing) {
      if (body.timeout_ms === null) delete body.timeout_ms;
      if (body.ordering === null) delete body.ordering;
      if (secret.value) body.secret = secret.value;
      return body;
    }
    // Only what changed: a PATCH changes only the fields it is given.
    const changed = {};
    for (const [k, v] of Object.entries(body)) {
      if (k === 'timeout_ms' && v === null) continue; // left empty: unchanged
      if (JSON.stringify(sorted(v)) !== JSON.stringify(sorted(current[k]))) changed[k] = v;
    }
    return changed;
  }

  function clearErrors() {
    formError.replaceChildren();
    for (const f of fields.values()) {
      f.error.hidden = true;
      f.error.textContent = '';
      f.focus.removeAttribute('aria-invalid');
      if (f.hint) f.focus.setAttribute('aria-describedby', f.hint); else f.focus.removeAttribute('aria-describedby');
    }
  }

  function showError(e) {
    const f = e.field && fields.get(e.field);
    if (f) {
      f.error.textContent = e.message;
      f.error.hidden = false;
      if (!f.group) f.focus.setAttribute('aria-invalid', 'true');
      f.focus.setAttribute('aria-describedby', [f.hint, f.error.id].filter(Boolean).join(' '));
      if (f.group) {
        f.focus.setAttribute('tabindex', '-1');
        f.focus.scrollIntoView({ block: 'center' });
      }
      f.focus.focus();
      return;
    }
    if (e.status === 409) {
      const reload = h('button', { type: 'button', onclick: () => go(location.hash) },
        'Reload the webhook');
      formError.append(h('div', { class: 'message error' },
        h('p', {}, 'This webhook was changed meanwhile, in another tab or by someone else. ',
          'Your changes were not saved. Reload it to see the current version, then make your changes again.'),
        reload));
      reload.focus();
      return;
    }
    formError.append(h('p', { class: 'message error', tabindex: '-1' }, e.message));
    formError.firstChild.focus();
  }

  async function save(event) {
    event.preventDefault();
    clearErrors();
    submit.disabled = true;
    try {
      const body = read();
      if (editing) {
        if (Object.keys(body).length === 0) {
          flash('Nothing changed.');
          go(cancelHref);
          return;
        }
        await api('PATCH', `/webhooks/${encodeURIComponent(current.id)}`, { body, ifMatch: etag });
        flash('Saved.');
        go(cancelHref);
      } else {
        const { data } = await api('POST', '/webhooks', { body });
        keepSecret(data.id, data.secret, 'created');
        go(`#/webhooks/${encodeURIComponent(data.id)}`);
      }
    } catch (e) {
      if (e.status === 401) return;
      showError(e);
    } finally {
      submit.disabled = false;
    }
  }

  return h('section', {},
    h('h1', { tabindex: '-1' }, editing ? `Edit ${current.name}` : 'Create a webhook'),
    form);
}

// Objects with their keys in order, so two equal ones compare equal.
function sorted(v) {
  if (Array.isArray(v) || v === null || typeof v !== 'object') return v;
  return Object.fromEntries(Object.keys(v).sort().map((k) => [k, sorted(v[k])]));
}
