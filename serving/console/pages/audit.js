// The audit log, newest first, filtered by actor, action, model and time.
// The filters live in the URL (#/audit?actor=...), so a filtered view can be
// shared as a link and survives a reload.

import {h, table, when} from "../lib/dom.js";

const TEXT_FILTERS = ["actor", "action", "model"];
const DEFAULT_LIMIT = "100";

function localInput(ts) {
  // epoch seconds -> the value a datetime-local input shows (local time)
  if (!ts) return "";
  const d = new Date(Number(ts) * 1000);
  return new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 19);
}

function summary(value) {
  if (value === null || value === undefined) return "";
  const text = JSON.stringify(value);
  return text.length > 160 ? `${text.slice(0, 159)}…` : text;
}

export default {
  title: "Audit log",
  mount(view, ctx) {
    const q = ctx.query;
    const inputs = Object.fromEntries(TEXT_FILTERS.map((f) => [f, h("input", {id: `filter-${f}`, name: f, value: q.get(f) || ""})]));
    const since = h("input", {id: "filter-since", type: "datetime-local", step: 1, value: localInput(q.get("since"))});
    const until = h("input", {id: "filter-until", type: "datetime-local", step: 1, value: localInput(q.get("until"))});
    const limit = h("input", {id: "filter-limit", type: "number", min: 1, max: 10000, value: q.get("limit") || DEFAULT_LIMIT});
    const form = h("form", {class: "filters", id: "audit-filters", onsubmit: (event) => {
      event.preventDefault();
      const out = new URLSearchParams();
      for (const f of TEXT_FILTERS) if (inputs[f].value.trim()) out.set(f, inputs[f].value.trim());
      if (since.value) out.set("since", String(new Date(since.value).getTime() / 1000));
      if (until.value) out.set("until", String(new Date(until.value).getTime() / 1000));
      if (limit.value && limit.value !== DEFAULT_LIMIT) out.set("limit", limit.value);
      location.hash = `#/audit${out.toString() ? `?${out}` : ""}`;
    }},
    TEXT_FILTERS.map((f) => h("label", null, f[0].toUpperCase() + f.slice(1), inputs[f])),
    h("label", null, "Since", since), h("label", null, "Until", until), h("label", null, "Limit", limit),
    h("button", {type: "submit", id: "filter-apply"}, "Filter"),
    h("a", {href: "#/audit"}, "clear"));
    const body = h("div");
    view.append(h("h1", null, "Audit log"), form, body);
    const params = new URLSearchParams();
    for (const f of [...TEXT_FILTERS, "since", "until"]) if (q.get(f)) params.set(f, q.get(f));
    params.set("limit", q.get("limit") || DEFAULT_LIMIT);
    ctx.live(() => `/v2/audit?${params}`, (data) => {
      body.replaceChildren(table(["Time", "Actor", "Action", "Model", "Version", "Before", "After", "Loop run"],
        data.entries.map((e) => h("tr", {"data-action": e.action, "data-actor": e.actor},
          h("td", null, when(e.ts)), h("td", null, e.actor), h("td", null, e.action), h("td", null, e.model),
          h("td", null, e.version === null ? "" : String(e.version)), h("td", null, summary(e.before)),
          h("td", null, summary(e.after)), h("td", null, e.loop_run))),
        {id: "audit"}));
    });
  },
};
