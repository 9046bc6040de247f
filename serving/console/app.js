// The console's shell: sign-in, navigation, and the life of the page shown.
// Each page is one module under pages/ that exports {title, mount(view, ctx)};
// routes live in the URL's hash so that the server serves one index.html.

import {api, explain, forget, hasKey, onSignOut, signIn, signOut, signedIn} from "./lib/api.js";
import {clear, h} from "./lib/dom.js";

// A page polls at most once per POLL_MS (the cap: one request per
// second per page); the wait counts from the start of the previous request.
const POLL_MS = 1000;

// first segment of the hash -> [page without a name, page with one]
const ROUTES = {
  models: ["models", "model"],
  lineage: ["lineage", "lineage"],
  endpoints: ["endpoints", "endpoint"],
  drift: ["drift", "drift"],
  jobs: ["jobs", "job"],
  audit: ["audit", "audit"],
};
const NAV = [["models", "Models"], ["endpoints", "Endpoints"], ["drift", "Drift"], ["jobs", "Training jobs"],
  ["audit", "Audit log"]];

let current = null; // the page shown: {stop()}
let shown = 0; // counts show() calls: a page whose module arrives after a later call is dropped
let signOutNote = "";

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, search] = raw.split("?", 2);
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return {parts, query: new URLSearchParams(search || "")};
}

/** The context a page works with; everything it starts ends with stop(). */
function context(view, status, params, query) {
  let alive = true;
  let loop = 0; // a later live() replaces the earlier one
  const ctx = {
    params,
    query,
    api,
    get alive() { return alive; },
    fail(err) {
      status.replaceChildren(h("p", {class: "error", role: "alert"}, explain(err)));
    },
    note(text) {
      status.replaceChildren(text ? h("p", {class: "note"}, text) : "");
    },
    /**
     * Fetch `path()` now and then every POLL_MS while the page is shown;
     * render(data) runs when the answer differs from the last one, so a
     * table being clicked is not rebuilt under the pointer for nothing.
     */
    live(path, render, every = POLL_MS) {
      const mine = ++loop;
      let last = null;
      const tick = async () => {
        if (!alive || mine !== loop) return;
        const started = Date.now();
        try {
          const data = await api(path());
          if (!alive || mine !== loop) return;
          const text = JSON.stringify(data);
          if (text !== last) {
            last = text;
            render(data);
            view.dataset.ready = "1";
          }
          status.replaceChildren();
        } catch (err) {
          if (!alive || mine !== loop) return;
          if (err.status === 401) return; // signed out: the sign-in form replaces the page
          ctx.fail(err);
        }
        setTimeout(tick, Math.max(every, POLL_MS) - (Date.now() - started));
      };
      tick();
    },
    /** Fetch once (pages whose data does not move, e.g. lineage). */
    async once(path, render) {
      try {
        const data = await api(path);
        if (alive) {
          render(data);
          view.dataset.ready = "1";
        }
      } catch (err) {
        if (alive && err.status !== 401) ctx.fail(err);
      }
    },
  };
  return {ctx, stop() { alive = false; }};
}

async function show() {
  const mine = ++shown;
  const root = document.getElementById("main");
  if (current) current.stop();
  current = null;
  if (!signedIn()) {
    renderSignIn(root);
    return;
  }
  renderNav();
  const {parts, query} = parseHash();
  const route = ROUTES[parts[0]];
  if (!route) {
    location.replace("#/models");
    return;
  }
  const name = parts.length > 1 ? route[1] : route[0];
  const status = h("div", {id: "status"});
  const view = h("section", {id: "view", "data-page": name, "data-route": location.hash});
  clear(root).append(status, view);
  const page = await import(`./pages/${name}.js`);
  if (mine !== shown) return;
  const life = context(view, status, parts.slice(1), query);
  current = life;
  document.title = `${page.default.title} · Flywheel`;
  page.default.mount(view, life.ctx);
}

function renderNav() {
  const nav = document.getElementById("nav");
  const here = parseHash().parts[0];
  const who = hasKey() ? `key ${sessionStorage.getItem("flywheel.key").split("_").slice(0, 2).join("_")}` : "no key";
  nav.replaceChildren(
    ...NAV.map(([route, text]) => h("a", {href: `#/${route}`, class: route === here ? "here" : null}, text)),
    h("span", {class: "who"}, who),
    h("button", {id: "sign-out", type: "button", onclick: () => signOut("")}, "Sign out"));
}

function renderSignIn(root) {
  document.getElementById("nav").replaceChildren();
  document.title = "Sign in · Flywheel";
  const input = h("input", {id: "key", type: "password", autocomplete: "off", placeholder: "fwk_…", required: true});
  const message = h("p", {id: "sign-in-message", class: signOutNote ? "error" : "note", role: "status"},
    signOutNote || "The key is kept in this browser tab only and sent with each request.");
  const submit = async (event) => {
    event.preventDefault();
    signIn(input.value.trim());
    try {
      // reading the registry needs the operate role, as does every page
      await api("/v2/registry/models", {signOutOn401: false});
      signOutNote = "";
      show();
    } catch (err) {
      forget();
      message.className = "error";
      message.textContent = err.status === 401 ? `This key is not accepted: ${err.message}`
        : err.status === 403 ? `This key is refused: the console needs the operate or admin role (${err.message})`
          : explain(err);
    }
  };
  const withoutKey = () => {
    signIn("");
    signOutNote = "";
    show();
  };
  clear(root).append(h("section", {id: "sign-in"},
    h("h1", null, "Sign in"),
    h("form", {onsubmit: submit},
      h("label", {for: "key"}, "API key"), input,
      h("button", {type: "submit", id: "sign-in-button"}, "Sign in")),
    message,
    h("p", null, h("button", {type: "button", class: "link", id: "no-key", onclick: withoutKey},
      "Continue without a key (servers with auth off)"))));
  input.focus();
}

onSignOut((reason) => {
  signOutNote = reason;
  show();
});
window.addEventListener("hashchange", show);
show();
