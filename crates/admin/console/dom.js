// A small DOM builder: h('p', {class: 'x', onclick: f}, 'text', child).
// Text is always set as text, never parsed as HTML, so nothing that comes
// from the API can become markup or script.

const PROPERTIES = new Set(['checked', 'value', 'selected', 'disabled']);

export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  const later = [];
  for (const [name, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith('on') && typeof value === 'function') {
      el.addEventListener(name.slice(2), value);
    } else if (name === 'class') {
      el.className = value;
    } else if (PROPERTIES.has(name)) {
      later.push([name, value]); // a select's value needs its options first
    } else {
      el.setAttribute(name, value === true ? '' : String(value));
    }
  }
  append(el, children);
  for (const [name, value] of later) el[name] = value;
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

// Text only screen readers hear: "Edit" + hidden " invoice-approval".
export function hidden(text) {
  return h('span', { class: 'visually-hidden' }, text);
}

let ids = 0;
export function uid(prefix) {
  ids += 1;
  return `${prefix}-${ids}`;
}

// A time as the user's local date and time, with the exact value kept.
export function time(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  const pad = (n) => String(n).padStart(2, '0');
  const text = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  return h('time', { datetime: iso, title: iso }, text);
}

// A status line whose changes screen readers announce.
export function liveRegion(cls = 'status') {
  return h('div', { class: cls, role: 'status', 'aria-live': 'polite' });
}

export function say(region, text, kind = 'info') {
  region.replaceChildren();
  if (!text) return;
  region.append(h('p', { class: `message ${kind}` }, text));
}

// A definition list from [term, description] pairs.
export function dl(pairs) {
  return h('dl', { class: 'facts' },
    pairs.filter(Boolean).map(([term, desc]) => [h('dt', {}, term), h('dd', {}, desc)]));
}

// Copies text; says so next to the button.
export async function copy(text, button) {
  const label = button.textContent;
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = 'Copied';
  } catch {
    button.textContent = 'Copy failed: select the text and copy it';
  }
  setTimeout(() => { button.textContent = label; }, 2000);
}

// A modal question: resolves true when the user confirms. `body` may hold
// form fields; `onConfirm` may throw an ApiError to keep the dialog open
// with the message shown.
export function ask({ title, body = [], confirm, danger = false, onConfirm = async () => {} }) {
  return new Promise((resolve) => {
    const titleId = uid('dialog-title');
    const error = h('div', { role: 'alert' });
    const yes = h('button', { type: 'submit', class: danger ? 'danger' : 'primary' }, confirm);
    const no = h('button', { type: 'button' }, 'Cancel');
    const form = h('form', { method: 'dialog', novalidate: true }, body, error, h('div', { class: 'buttons' }, yes, no));
    const dialog = h('dialog', { 'aria-labelledby': titleId, class: 'confirm' }, h('h2', { id: titleId }, title), form);
    const done = (answer) => { dialog.close(); dialog.remove(); resolve(answer); };
    no.addEventListener('click', () => done(false));
    dialog.addEventListener('cancel', (e) => { e.preventDefault(); done(false); });
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      yes.disabled = true;
      try {
        await onConfirm();
        done(true);
      } catch (err) {
        say(error, err.message, 'error');
        yes.disabled = false;
      }
    });
    document.body.append(dialog);
    dialog.showModal();
    (form.querySelector('input, select, textarea') || no).focus();
  });
}

// A labelled control with an optional hint, for the forms in dialogs.
export function labelled(label, control, hint) {
  control.id = control.id || uid('field');
  const hintEl = hint ? h('p', { class: 'hint', id: `${control.id}-hint` }, hint) : null;
  if (hintEl) control.setAttribute('aria-describedby', hintEl.id);
  return h('div', { class: 'field' }, h('label', { for: control.id }, label), hintEl, control);
}

// A value shown with a copy button in a titled card: a new API key (shown
// once), a console link. Focus moves to its title, so it is announced.
export function valuePanel({ title, label, value, copyLabel, warning, more = [] }) {
  const titleId = uid('panel-title');
  const valueEl = h('code', { class: 'secret-value', id: uid('value') }, value);
  const copyButton = h('button', { type: 'button', onclick: () => copy(value, copyButton) }, copyLabel);
  const heading = h('h2', { id: titleId, tabindex: '-1' }, title);
  const panel = h('section', { class: 'secret card', 'aria-labelledby': titleId },
    heading,
    warning ? h('p', { class: 'message warning' }, h('strong', {}, warning)) : null,
    h('div', { class: 'secret-row' }, h('span', { class: 'label' }, label), valueEl, copyButton),
    more);
  setTimeout(() => heading.focus());
  return panel;
}
