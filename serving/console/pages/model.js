// One model: its versions with metrics, stage, aliases, approvals and the
// gates that still stop each from production; admins approve from here.

import {h, link, num, table, when} from "../lib/dom.js";

// Approving needs the admin role, which the API does not tell a key in
// advance: the button is offered, and once the server refuses it (403) it is
// withdrawn for the rest of this tab's session.
const CANNOT_APPROVE = "flywheel.cannotApprove";

function approveButton(ctx, name, version, message) {
  const button = h("button", {type: "button", class: "approve", "data-version": version}, "Approve");
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      const result = await ctx.api(
        `/v2/registry/models/${encodeURIComponent(name)}/versions/${version}/approve`,
        {method: "POST", body: {comment: "approved in the console"}});
      message.className = "ok";
      message.textContent = `Version ${version} approved by ${result.by}` +
        (result.gates.length ? `; still failing: ${result.gates.join("; ")}` : "; no gate stops it now");
    } catch (err) {
      if (err.status === 403) sessionStorage.setItem(CANNOT_APPROVE, "1");
      message.className = "error";
      message.textContent = err.status === 403
        ? `Not approved: approving needs the admin role (${err.message})`
        : `Not approved: ${err.message}`;
      button.disabled = false;
    }
  });
  return button;
}

export default {
  title: "Model",
  mount(view, ctx) {
    const name = ctx.params[0];
    const head = h("div");
    const message = h("p", {id: "action-message", role: "status"});
    const versions = h("div");
    view.append(h("h1", null, "Model ", h("span", {id: "model-name"}, name)), head, message, versions);
    ctx.live(() => `/v2/registry/models/${encodeURIComponent(name)}`, (data) => {
      const rules = (data.policy.rules || []).map((r) => h("span", {class: "tag"},
        Object.entries(r).map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ")));
      head.replaceChildren(h("p", null,
        `Latest version ${data.model.latest_version}; production: ${data.model.production_version ?? "none"}. `,
        "Gate policy: ", rules.length ? rules : "none"));
      const mayApprove = sessionStorage.getItem(CANNOT_APPROVE) !== "1";
      versions.replaceChildren(table(
        ["Version", "Stage", "Aliases", "Metrics", "Approvals", "Gates to production", "Created", ""],
        data.versions.slice().reverse().map((v) => h("tr", {"data-version": v.version},
          h("td", null, String(v.version)),
          h("td", null, h("span", {class: `tag ${v.stage}`}, v.stage)),
          h("td", null, v.aliases.map((a) => h("span", {class: "tag"}, a))),
          h("td", null, Object.entries(v.metrics).map(([k, x]) => h("div", null, `${k} ${num(x, 4)}`))),
          h("td", {class: "approvals"}, v.approvals.map((a) => h("div", null, `${a.actor}`,
            a.comment ? h("span", {class: "muted"}, ` “${a.comment}”`) : ""))),
          h("td", {class: "gates"}, v.gates.length
            ? v.gates.map((g) => h("div", {class: "bad"}, g))
            : h("span", {class: "ok"}, "passes")),
          h("td", null, when(v.created_at), h("div", {class: "muted"}, v.created_by)),
          h("td", null, link(["lineage", name, String(v.version)], "lineage"), " ",
            mayApprove && v.stage !== "production" && v.gates.some((g) => g.startsWith("approvals"))
              ? approveButton(ctx, name, v.version, message) : ""))),
        {id: "versions"}));
    });
  },
};
