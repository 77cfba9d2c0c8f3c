// The signed-in session: the API key (or a console link's session token)
// and the chosen organization, kept in sessionStorage only — gone when the
// tab closes, never in a URL, a cookie or a log. What the key may do comes
// from GET /me, and the screens follow it.

const KEY = 'herald.console.key';
const ORG = 'herald.console.org';

// A browser that denies storage to a frame of another site (third-party
// storage blocked, as Safari and Firefox do by default) still gets a
// console: the session then lives in this page's memory, until the frame
// is reloaded.
const store = (() => {
  try {
    window.sessionStorage.getItem(KEY);
    return window.sessionStorage;
  } catch {
    const kept = new Map();
    return {
      getItem: (k) => (kept.has(k) ? kept.get(k) : null),
      setItem: (k, v) => { kept.set(k, String(v)); },
      removeItem: (k) => { kept.delete(k); },
    };
  }
})();

export const session = {
  get key() { return store.getItem(KEY); },
  get org() { return store.getItem(ORG); },
  // What GET /me answered for the key (memory only).
  me: null,
  signIn(key, org) {
    store.setItem(KEY, key);
    store.setItem(ORG, org);
  },
  setOrg(org) { store.setItem(ORG, org); },
  signOut() {
    store.removeItem(KEY);
    store.removeItem(ORG);
    this.me = null;
  },
};

// The console inside a platform's page (`/console?embed`): no header of
// its own, no sign-out.
export const embedded = new URLSearchParams(location.search).has('embed');

// What the session may do, from GET /me: a `read` key or link changes
// nothing; a link limited to some webhooks sees only those (no
// organization-wide log or audit trail); operators manage organizations
// and keys.
export const may = {
  get change() { return (session.me?.scope || 'admin') !== 'read'; },
  get operate() { return session.me?.scope === 'operator'; },
  get seeOrganization() { return !session.me?.webhook_ids; },
  get readAudit() { return this.seeOrganization; },
};
