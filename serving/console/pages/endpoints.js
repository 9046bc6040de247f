// Every endpoint: its variants, live traffic split and any canary.

import {h, link, pct, table} from "../lib/dom.js";
import {splitBar} from "../lib/charts.js";

export default {
  title: "Endpoints",
  mount(view, ctx) {
    const body = h("div");
    view.append(h("h1", null, "Endpoints"), body);
    ctx.live(() => "/v2/endpoints", (data) => {
      body.replaceChildren(table(["Endpoint", "Variants", "Traffic split", "Canary", "Shadow"],
        data.endpoints.map((ep) => {
          const canary = ep.canary;
          return [
            link(["endpoints", ep.name], ep.name),
            Object.keys(ep.variants).join(", "),
            splitBar(ep.weights),
            canary ? `${canary.status}: ${canary.variant} at ${canary.config.steps[canary.step]} %` : "–",
            ep.shadow ? `${pct(ep.shadow.fraction)} to ${ep.shadow.variant}` : "–",
          ];
        }), {id: "endpoints"}));
    });
  },
};
