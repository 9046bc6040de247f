// The JSON API with the session's key. The key lives in sessionStorage only:
// it is gone when the tab closes and is never written to disk by the console.

const KEY = "flywheel.key";
const NO_KEY = "flywheel.nokey"; // "continue without a key": a server with auth off

export class ApiError extends Error {
  constructor(status, message, field) {
    super(message);
    this.status = status;
    this.field = field || "";
  }
}

const signOutListeners = [];

/** Called with a reason whenever the server stops accepting the session's key. */
export function onSignOut(fn) {
  signOutListeners.push(fn);
}

export function signedIn() {
  return sessionStorage.getItem(KEY) !== null || sessionStorage.getItem(NO_KEY) === "1";
}

export function hasKey() {
  return sessionStorage.getItem(KEY) !== null;
}

export function signIn(key) {
  sessionStorage.removeItem(NO_KEY);
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.setItem(NO_KEY, "1");
}

/** Drop the key without telling anyone (a sign-in that was refused). */
export function forget() {
  sessionStorage.removeItem(KEY);
  sessionStorage.removeItem(NO_KEY);
}

export function signOut(reason) {
  forget();
  for (const fn of signOutListeners) fn(reason || "");
}

/** A short sentence for an API error, as a page shows it. */
export function explain(err) {
  if (!(err instanceof ApiError)) return `the server could not be reached: ${err.message}`;
  if (err.status === 403) return `your key lacks the role this needs: ${err.message}`;
  return err.field ? `${err.message} (field ${err.field})` : err.message;
}

/**
 * Call the API: `path` from the server's root ("/v2/registry/models").
 * Resolves to the decoded JSON body; rejects with ApiError for any status
 * other than 2xx. A 401 also signs the session out: the key was revoked,
 * expired or mistyped, and every later call would fail the same way.
 */
export async function api(path, options = {}) {
  const headers = {"Accept": "application/json"};
  const key = sessionStorage.getItem(KEY);
  if (key) headers["Authorization"] = `Bearer ${key}`;
  let body;
  if (options.body !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(options.body);
  }
  const resp = await fetch(path, {method: options.method || "GET", headers, body, cache: "no-store"});
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = {error: text};
  }
  if (resp.ok) return data;
  const message = (data && data.error) || `${resp.status} ${resp.statusText}`;
  const err = new ApiError(resp.status, message, data && data.field);
  if (resp.status === 401 && options.signOutOn401 !== false) {
    signOut(`The server no longer accepts this key (${message}). Sign in again.`);
  }
  throw err;
}
