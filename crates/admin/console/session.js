// The signed-in session: the API key and the chosen organization, kept in
// sessionStorage only — gone when the tab closes, never in a URL, a cookie
// or a log.

const KEY = 'herald.console.key';
const ORG = 'herald.console.org';

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  get org() { return sessionStorage.getItem(ORG); },
  // What GET /me answered for the key (memory only).
  me: null,
  signIn(key, org) {
    sessionStorage.setItem(KEY, key);
    sessionStorage.setItem(ORG, org);
  },
  setOrg(org) { sessionStorage.setItem(ORG, org); },
  signOut() {
    sessionStorage.removeItem(KEY);
    sessionStorage.removeItem(ORG);
    this.me = null;
  },
};
