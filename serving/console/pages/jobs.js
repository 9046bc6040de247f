// Training jobs, newest first, with their state.

import {h, link, table, when} from "../lib/dom.js";

export default {
  title: "Training jobs",
  mount(view, ctx) {
    const body = h("div");
    view.append(h("h1", null, "Training jobs"), body);
    ctx.live(() => "/v2/jobs", (data) => {
      body.replaceChildren(table(["Job", "Name", "State", "Priority", "Submitted", "Started", "Finished", "Attempts"],
        data.jobs.map((j) => [link(["jobs", j.id], j.id), j.name,
          h("span", {class: j.state === "failed" ? "bad" : j.state === "succeeded" ? "ok" : null},
            j.state, j.cancel_requested && j.state !== "cancelled" ? " (cancelling)" : ""),
          String(j.priority), when(j.submitted_at), when(j.started_at), when(j.finished_at), String(j.attempts)]),
        {id: "jobs"}));
    });
  },
};
