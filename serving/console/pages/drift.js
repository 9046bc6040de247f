// Input drift of one served model version: each feature's statistic and
// p-value over time, per test, and the windows that flagged.

import {h, table, when} from "../lib/dom.js";
import {lineChart} from "../lib/charts.js";

function clock(ts) {
  return when(ts).slice(11);
}

function picker(ctx, name, version) {
  const model = h("input", {id: "drift-model", value: name || "", placeholder: "model", required: true});
  const ver = h("input", {id: "drift-version", value: version || "", placeholder: "version (default: routed)"});
  return h("form", {class: "filters", onsubmit: (event) => {
    event.preventDefault();
    const parts = ["drift", model.value.trim(), ver.value.trim()].filter(Boolean).map(encodeURIComponent);
    location.hash = `#/${parts.join("/")}`;
  }}, h("label", null, "Model", model), h("label", null, "Version", ver), h("button", {type: "submit"}, "Show"));
}

export default {
  title: "Drift",
  mount(view, ctx) {
    const [name, version] = ctx.params;
    const body = h("div");
    view.append(h("h1", null, name ? `Drift of ${name}${version ? `/${version}` : ""}` : "Drift"),
      picker(ctx, name, version), body);
    if (!name) {
      ctx.note("Name a served model whose config turns drift monitoring on.");
      return;
    }
    const query = version ? `?version=${encodeURIComponent(version)}` : "";
    ctx.live(() => `/v2/drift/${encodeURIComponent(name)}${query}`, (data) => {
      const tests = [...new Set(data.series.map((x) => x.test))];
      const marks = data.flagged.map((w) => w.ts);
      body.replaceChildren(
        h("p", {class: "muted"}, `Version ${data.version}; ${data.flagged.length} window(s) flagged. ` +
          "Dashed red lines mark the windows that flagged."),
        ...tests.map((test) => {
          const series = data.series.filter((x) => x.test === test);
          return h("section", {class: "card", "data-test": test},
            h("h2", null, `${test}: per-feature statistic and adjusted p-value`),
            h("div", {class: "grid2"},
              lineChart(series.map((x) => ({name: `feature ${x.feature}`, points: x.points.map((p) => [p.ts, p.statistic])})),
                {title: `${test} statistic per feature`, xLabel: clock, marks}),
              lineChart(series.map((x) => ({name: `feature ${x.feature}`, points: x.points.map((p) => [p.ts, p.p_value])})),
                {title: `${test} adjusted p-value per feature`, xLabel: clock, marks, yMin: 0})));
        }),
        tests.length ? "" : h("p", {class: "muted"}, "No window has been scored yet."),
        h("h2", null, "Windows that flagged"),
        table(["Time", "Test", "Features"], data.flagged.slice().reverse().map((w) => [when(w.ts), w.test, w.features.join(", ")]),
          {id: "flagged"}));
    });
  },
};
