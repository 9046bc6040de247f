// One training job, live: state, loss and accuracy curves per epoch, the
// tail of its log, and a Cancel button while it can still be cancelled.

import {h, num, when} from "../lib/dom.js";
import {lineChart} from "../lib/charts.js";

const LOG_LINES = 200;
const ENDED = new Set(["succeeded", "failed", "cancelled"]);

export default {
  title: "Training job",
  mount(view, ctx) {
    const id = ctx.params[0];
    const head = h("div");
    const message = h("p", {id: "action-message", role: "status"});
    const curves = h("div", {class: "grid2"});
    const log = h("pre", {class: "log", id: "log"});
    const cancel = h("button", {type: "button", class: "danger", id: "cancel-job", hidden: true}, "Cancel job");
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        const job = await ctx.api(`/v2/jobs/${encodeURIComponent(id)}/cancel`, {method: "POST"});  // cancel takes no body
        message.className = "ok";
        message.textContent = `Cancel requested; the job is ${job.state}.`;
      } catch (err) {
        message.className = "error";
        message.textContent = err.status === 403 ? `Not cancelled: cancelling needs the admin role (${err.message})`
          : `Not cancelled: ${err.message}`;
        cancel.disabled = false;
      }
    });
    view.append(h("h1", null, `Training job ${id}`), head, cancel, message, h("h2", null, "Curves"), curves,
      h("h2", null, `Log (last ${LOG_LINES} lines)`), log);
    ctx.live(() => `/v2/jobs/${encodeURIComponent(id)}?log_lines=${LOG_LINES}`, (data) => {
      const j = data.job;
      head.replaceChildren(h("p", null, `${j.name}: `, h("strong", {id: "job-state"}, j.state),
        `; priority ${j.priority}; submitted ${when(j.submitted_at)}`, j.started_at ? `, started ${when(j.started_at)}` : "",
        j.finished_at ? `, finished ${when(j.finished_at)}` : "", `; attempt(s) ${j.attempts}.`),
        j.error ? h("p", {class: "error"}, j.error) : "",
        data.progress ? h("p", {class: "muted"}, `Latest step: ${JSON.stringify(data.progress)}`) : "");
      cancel.hidden = ENDED.has(j.state) || j.cancel_requested;
      const at = (field) => data.epochs.map((e) => [e.epoch, e[field]]);
      curves.replaceChildren(
        lineChart([{name: "loss", points: at("loss")}, {name: "validation loss", points: at("val_loss")}],
          {title: "Loss per epoch", xLabel: (x) => `epoch ${num(x)}`}),
        lineChart([{name: "validation accuracy", points: at("val_accuracy")}],
          {title: "Validation accuracy per epoch", xLabel: (x) => `epoch ${num(x)}`}));
      log.textContent = data.log_tail.join("\n") || "(no log yet)";
    });
  },
};
