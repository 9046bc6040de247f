// Every registered model: its newest version, what is in production, its aliases.

import {h, link, table, when} from "../lib/dom.js";

export default {
  title: "Models",
  mount(view, ctx) {
    const body = h("div");
    view.append(h("h1", null, "Models"), body);
    ctx.live(() => "/v2/registry/models", (data) => {
      body.replaceChildren(table(["Model", "Latest version", "Production", "Aliases", "Created"],
        data.models.map((m) => [
          link(["models", m.name], m.name),
          String(m.latest_version),
          m.production_version === null ? "–" : String(m.production_version),
          Object.entries(m.aliases).map(([a, v]) => h("span", {class: "tag"}, `${a} → ${v}`)),
          `${when(m.created_at)} by ${m.created_by}`,
        ]), {id: "models"}));
    });
  },
};
