// A version's lineage as a graph: the version, its parents, the data, code,
// job and evaluations it came from. Layered by distance from the version
// asked about (left: what it came from), one column per hop.

import {h, link, s, table} from "../lib/dom.js";

const BOX_W = 170;
const BOX_H = 40;
const GAP_X = 90;
const GAP_Y = 22;

function layers(graph) {
  // hops from the root over edges either way: a breadth-first walk
  const next = new Map(graph.nodes.map((n) => [n.id, []]));
  for (const e of graph.edges) {
    if (next.has(e.source)) next.get(e.source).push(e.target);
    if (next.has(e.target)) next.get(e.target).push(e.source);
  }
  const depth = new Map([[graph.root, 0]]);
  const queue = [graph.root];
  while (queue.length) {
    const id = queue.shift();
    for (const other of next.get(id) || []) {
      if (!depth.has(other)) {
        depth.set(other, depth.get(id) + 1);
        queue.push(other);
      }
    }
  }
  const columns = [];
  for (const n of graph.nodes) {
    const d = depth.has(n.id) ? depth.get(n.id) : columns.length; // unlinked nodes: a column of their own
    (columns[d] = columns[d] || []).push(n);
  }
  return columns.filter(Boolean);
}

function draw(graph) {
  const columns = layers(graph);
  const tall = Math.max(...columns.map((c) => c.length));
  const width = columns.length * (BOX_W + GAP_X) - GAP_X + 80; // room on the left for curves within a column
  const height = tall * (BOX_H + GAP_Y) - GAP_Y + 20;
  const at = new Map();
  // the root on the right, its sources to its left
  columns.forEach((col, d) => col.forEach((n, i) => at.set(n.id, {
    x: 70 + (columns.length - 1 - d) * (BOX_W + GAP_X),
    y: 10 + i * (BOX_H + GAP_Y) + ((tall - col.length) * (BOX_H + GAP_Y)) / 2,
  })));
  const svg = s("svg", {class: "graph", id: "lineage-graph", width, height, viewBox: `0 0 ${width} ${height}`});
  for (const e of graph.edges) {
    const a = at.get(e.source);
    const b = at.get(e.target);
    if (!a || !b) continue;
    if (a.x === b.x) {
      // both in one column (e.g. two versions built from one commit): a curve
      // out to the left, so that it does not run under the boxes between them
      const y1 = a.y + BOX_H / 2;
      const y2 = b.y + BOX_H / 2;
      svg.append(s("path", {d: `M${a.x},${y1} C${a.x - 45},${y1} ${a.x - 45},${y2} ${a.x},${y2}`, fill: "none"}),
        s("text", {x: a.x - 36, y: (y1 + y2) / 2, "text-anchor": "end"}, e.relation));
      continue;
    }
    const [left, right] = a.x <= b.x ? [a, b] : [b, a];
    const x1 = left.x + BOX_W;
    const y1 = left.y + BOX_H / 2;
    const x2 = right.x;
    const y2 = right.y + BOX_H / 2;
    svg.append(s("line", {x1, y1, x2, y2}),
      s("text", {x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 4, "text-anchor": "middle"}, e.relation));
  }
  for (const n of graph.nodes) {
    const p = at.get(n.id);
    const label = n.label.length > 24 ? `${n.label.slice(0, 23)}…` : n.label;
    svg.append(s("g", {class: n.id === graph.root ? "node root" : "node", "data-id": n.id},
      s("title", null, `${n.kind}: ${n.label}`),
      s("rect", {x: p.x, y: p.y, width: BOX_W, height: BOX_H, rx: 5}),
      s("text", {x: p.x + 8, y: p.y + 16}, label),
      s("text", {x: p.x + 8, y: p.y + 31, style: "fill:#616e7c;font-size:10px"}, n.kind)));
  }
  return svg;
}

export default {
  title: "Lineage",
  mount(view, ctx) {
    const [name, version] = ctx.params;
    const body = h("div");
    view.append(h("h1", null, `Lineage of ${name}/${version}`),
      h("p", null, link(["models", name], `back to ${name}`)), body);
    if (!version) {
      ctx.note("Open a version's lineage from its model's page.");
      return;
    }
    ctx.once(`/v2/registry/models/${encodeURIComponent(name)}/versions/${encodeURIComponent(version)}/lineage`,
      (graph) => {
        body.replaceChildren(draw(graph), h("h2", null, "Nodes"),
          table(["Node", "Kind", "Detail"], graph.nodes.map((n) => [n.label, n.kind, JSON.stringify(n.detail)])));
      });
  },
};
