// One endpoint, live: traffic split, per-variant figures, the canary's
// progress with each gate's figures, shadow agreement and the event history.

import {h, num, pct, table, when} from "../lib/dom.js";
import {splitBar} from "../lib/charts.js";

function percentNow(canary) {
  if (canary.status === "rolled_back" || canary.status === "aborted") return 0;
  return canary.config.steps[canary.step];
}

function gateRows(gates) {
  return gates.map((g) => h("tr", {"data-gate": g.name},
    h("td", null, g.name),
    h("td", {class: g.passed ? "ok" : "bad"}, g.passed ? "passed" : "failed"),
    h("td", null, num(g.value, 4)),
    h("td", null, num(g.limit, 4)),
    h("td", null, g.detail)));
}

function canarySection(canary) {
  if (!canary) return h("p", {class: "muted", id: "canary"}, "No canary has run on this endpoint.");
  const cfg = canary.config;
  const percent = percentNow(canary);
  const steps = h("ol", {class: "steps"}, cfg.steps.map((p, i) => h("li", {
    class: canary.status === "running" && i === canary.step ? "now"
      : i < canary.step || (i === canary.step && canary.status !== "running") ? "done" : null,
  }, `${p} %`)));
  const g = cfg.gates;
  return h("div", {id: "canary", "data-status": canary.status, "data-step": canary.step, "data-percent": percent},
    h("p", null,
      h("strong", null, `Canary ${canary.variant} vs ${canary.baseline}: `),
      h("span", {id: "canary-status", class: canary.status === "rolled_back" ? "bad" : null}, canary.status), ", ",
      h("span", {id: "canary-percent"}, `${percent} %`), " of traffic, ",
      `step ${canary.step + 1} of ${cfg.steps.length}, started ${when(canary.started_at)}, `,
      `each step held ${cfg.hold_s} s.`),
    steps,
    h("p", {class: "muted"}, `Gates: at least ${g.min_requests} requests; error rate increase ≤ ${g.max_error_rate_increase}` +
      (g.max_p99_ratio !== null ? `; p99 ratio ≤ ${g.max_p99_ratio}` : "") +
      (g.max_reward_drop !== null ? `; reward drop ≤ ${g.max_reward_drop}` : "") +
      (g.max_drift !== null ? `; drift ≤ ${g.max_drift}` : "")),
    h("h2", null, "Gate figures, latest evaluation"),
    table(["Gate", "Result", "Value", "Limit", "Detail"], gateRows(canary.last_gates), {id: "gates"}),
    h("h2", null, "Canary history"),
    table(["Time", "Step", "Traffic", "Action", "Reason", "Gates"], canary.history.slice().reverse().map((e) => [
      when(e.time), String(e.step + 1), `${e.percent} %`, e.action, e.reason,
      e.gates.map((x) => h("div", {class: x.passed ? "ok" : "bad"}, `${x.name} ${num(x.value, 3)} / ${num(x.limit, 3)}`)),
    ]), {id: "canary-history"}));
}

export default {
  title: "Endpoint",
  mount(view, ctx) {
    const name = ctx.params[0];
    const parts = {
      split: h("div", {id: "split"}), variants: h("div"), canary: h("div"), shadow: h("div"), events: h("div"),
    };
    view.append(h("h1", null, `Endpoint ${name}`),
      h("h2", null, "Traffic split"), parts.split,
      h("h2", null, "Variants"), parts.variants,
      h("h2", null, "Canary"), parts.canary,
      h("h2", null, "Shadow"), parts.shadow,
      h("h2", null, "Events"), parts.events);
    ctx.live(() => `/v2/endpoints/${encodeURIComponent(name)}`, (ep) => {
      parts.split.replaceChildren(splitBar(ep.weights),
        h("p", {class: "muted"}, `Policy ${ep.policy.kind}; ${ep.replicas} ingress replica(s).`));
      parts.variants.replaceChildren(table(
        ["Variant", "Status", "Share", "Requests", "Errors", "Error rate", "p50 ms", "p99 ms", "Rewards", "Mean reward"],
        Object.entries(ep.variants).map(([v, x]) => h("tr", {"data-variant": v},
          h("td", null, v), h("td", {class: x.status === "ready" ? "ok" : "warn"}, x.status, x.error ? ` (${x.error})` : ""),
          h("td", null, pct(ep.weights[v] ?? 0)), h("td", null, String(x.requests)), h("td", null, String(x.errors)),
          h("td", null, pct(x.error_rate)), h("td", null, num(x.p50_ms)), h("td", null, num(x.p99_ms)),
          h("td", null, String(x.rewards)), h("td", null, num(x.mean_reward)))), {id: "variants"}));
      parts.canary.replaceChildren(canarySection(ep.canary));
      const mirrored = Object.entries(ep.variants).filter(([, x]) => x.shadow_compared > 0);
      parts.shadow.replaceChildren(
        h("p", null, ep.shadow ? `${pct(ep.shadow.fraction)} of requests mirrored to ${ep.shadow.variant}.` : "No shadow traffic now."),
        mirrored.length ? table(["Variant", "Compared", "Agreed", "Agreement", "Mean abs. difference"],
          mirrored.map(([v, x]) => [v, String(x.shadow_compared), String(x.shadow_agreed),
            pct(x.shadow_agreed / x.shadow_compared), num(x.shadow_abs_diff_sum / x.shadow_compared)]), {id: "shadow"}) : "");
      parts.events.replaceChildren(table(["Time", "Kind", "Detail"],
        ep.events.slice().reverse().map((e) => [when(e.time), e.kind, e.detail]), {id: "events"}));
    });
  },
};
