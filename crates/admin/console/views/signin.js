// Sign in with an API key. The key is checked with GET /me, which also
// says which organizations it may use; it is kept in sessionStorage only.
// `notice` ({kind, text}) says why the user is here: signed out, a session
// that ended, a console link that was refused.

import { api, ApiError } from '../api.js';
import { h, uid } from '../dom.js';
import { session } from '../session.js';

export function signIn({ onSignedIn, notice }) {
  const inputId = uid('api-key');
  const errorId = `${inputId}-error`;
  const input = h('input', {
    id: inputId, name: 'api-key', type: 'password', autocomplete: 'off', spellcheck: 'false',
    required: true, 'aria-describedby': `${inputId}-hint`,
  });
  const error = h('p', { id: errorId, class: 'field-error', hidden: true });
  const button = h('button', { type: 'submit', class: 'primary' }, 'Sign in');
  const form = h('form', { class: 'card narrow', novalidate: true, onsubmit: submit },
    h('div', { class: 'field' },
      h('label', { for: inputId }, 'API key'),
      h('p', { id: `${inputId}-hint`, class: 'hint' },
        'Kept in this browser tab only, until you sign out or close it.'),
      input,
      error),
    button);

  async function submit(event) {
    event.preventDefault();
    const key = input.value.trim();
    error.hidden = true;
    input.removeAttribute('aria-invalid');
    if (!key) return fail('Enter an API key.');
    button.disabled = true;
    try {
      const { data } = await api('GET', '/me', { key, org: '' });
      session.me = data;
      session.signIn(key, data.default_organization);
      onSignedIn();
    } catch (e) {
      fail(e instanceof ApiError && e.status === 401
        ? 'That API key is not valid.'
        : e.message);
    } finally {
      button.disabled = false;
    }
  }

  function fail(message) {
    error.textContent = message;
    error.hidden = false;
    input.setAttribute('aria-invalid', 'true');
    input.setAttribute('aria-describedby', `${inputId}-hint ${errorId}`);
    input.focus();
  }

  return h('section', { class: 'signin' },
    h('h1', { tabindex: '-1' }, 'Sign in to Herald'),
    notice ? h('div', { role: notice.kind === 'error' ? 'alert' : 'status' },
      h('p', { class: `message ${notice.kind || 'info'}` }, notice.text)) : null,
    form);
}
