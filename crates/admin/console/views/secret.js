// The secret, once: kept in memory from the create or rotate answer until
// the webhook's screen shows it, then forgotten. A reload or another
// screen never shows it again. With it: a copy button, the warning, and
// receivers that verify the signatures, with the secret filled in.

import { copy, h, uid } from '../dom.js';
import { samples } from '../samples.js';

let kept = null;

export function keepSecret(webhookId, secret, why) {
  kept = { webhookId, secret, why };
}

// The secret kept for this webhook, if any; forgotten as it is taken.
export function takeSecret(webhookId) {
  const found = kept && kept.webhookId === webhookId ? kept : null;
  kept = null;
  return found;
}

export function secretPanel({ secret, why }) {
  const titleId = uid('secret-title');
  const value = h('code', { class: 'secret-value', id: uid('secret') }, secret);
  const copyButton = h('button', { type: 'button', onclick: () => copy(secret, copyButton) }, 'Copy the secret');
  const panel = h('section', { class: 'secret card', 'aria-labelledby': titleId },
    h('h2', { id: titleId }, why === 'rotated' ? 'The new signing secret' : 'The signing secret'),
    h('p', { class: 'message warning' },
      h('strong', {}, 'Copy it now: it will not be shown again. '),
      why === 'rotated'
        ? 'The previous secret keeps signing alongside it for 24 hours, so receivers can switch over.'
        : 'Receivers use it to check that a request comes from Herald.'),
    h('div', { class: 'secret-row' }, h('span', { class: 'label', id: `${value.id}-label` }, 'Secret'), value, copyButton),
    h('h3', {}, 'Verify the signatures in your receiver'),
    h('p', {},
      'Every request carries ', h('code', {}, 'webhook-id'), ', ', h('code', {}, 'webhook-timestamp'),
      ' and ', h('code', {}, 'webhook-signature'), ' (Standard Webhooks: any of its libraries verifies them), and ',
      h('code', {}, 'X-Webhook-Signature: sha256=<hex HMAC-SHA256 of the body>'), ' for a check by hand.'),
    samples(secret).map((lang, i) => h('details', { class: 'sample', open: i === 0 ? true : null },
      h('summary', {}, lang.language),
      lang.variants.map((v) => {
        const captionId = uid('sample');
        const code = h('pre', { tabindex: '0', 'aria-labelledby': captionId }, h('code', {}, v.code));
        const button = h('button', { type: 'button', class: 'quiet', onclick: () => copy(v.code, button) },
          `Copy the ${lang.language} sample (${v.title})`);
        return h('figure', { 'aria-labelledby': captionId },
          h('figcaption', { id: captionId }, `${lang.language}, ${v.title}: ${v.file}`),
          v.install ? h('p', { class: 'hint' }, 'Install: ', h('code', {}, v.install)) : null,
          code, button);
      }))));
  return panel;
}
