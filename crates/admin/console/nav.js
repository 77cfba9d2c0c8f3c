// Navigation that views use without importing the shell: go to a screen,
// and run something when the current screen is left (stop a timer).

let leaving = [];

export function go(hash) {
  if (location.hash === hash) window.dispatchEvent(new HashChangeEvent('hashchange'));
  else location.hash = hash;
}

export function onLeave(f) { leaving.push(f); }

export function leave() {
  for (const f of leaving) f();
  leaving = [];
}

// A message for the next screen ("Saved."), kept in memory only.
let pending = null;
export function flash(text) { pending = text; }
export function takeFlash() {
  const text = pending;
  pending = null;
  return text;
}
