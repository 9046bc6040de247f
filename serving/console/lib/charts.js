// Small inline-SVG charts: enough for loss curves and drift figures, with no
// charting library to ship, pin and audit.

import {h, num, s} from "./dom.js";

export const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];

/**
 * A line chart. series: [{name, points: [[x, y], ...]}] (y null: a gap);
 * options: {width, height, xLabel(x) -> text, marks: [x] drawn as red ticks}.
 * Returns a <figure> holding the SVG and its legend.
 */
export function lineChart(series, options = {}) {
  const width = options.width || 520;
  const height = options.height || 200;
  const pad = {left: 48, right: 12, top: 10, bottom: 24};
  const all = series.flatMap((x) => x.points.filter((p) => p[1] !== null && p[1] !== undefined));
  const svg = s("svg", {class: "chart", width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": options.title || "chart"});
  if (!all.length) {
    svg.append(s("text", {x: width / 2, y: height / 2, "text-anchor": "middle"}, "no figures yet"));
    return h("figure", null, options.title ? h("div", {class: "chart-title"}, options.title) : "", svg);
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (options.yMin !== undefined) y0 = Math.min(y0, options.yMin);
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) y1 = y0 + 1;
  const X = (x) => pad.left + ((x - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const Y = (y) => height - pad.bottom - ((y - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);
  const xLabel = options.xLabel || ((x) => num(x));
  svg.append(
    s("line", {x1: pad.left, y1: height - pad.bottom, x2: width - pad.right, y2: height - pad.bottom, stroke: "#9fb3c8"}),
    s("line", {x1: pad.left, y1: pad.top, x2: pad.left, y2: height - pad.bottom, stroke: "#9fb3c8"}),
    s("text", {x: pad.left - 4, y: Y(y1) + 4, "text-anchor": "end"}, num(y1)),
    s("text", {x: pad.left - 4, y: Y(y0), "text-anchor": "end"}, num(y0)),
    s("text", {x: pad.left, y: height - 6}, xLabel(x0)),
    s("text", {x: width - pad.right, y: height - 6, "text-anchor": "end"}, xLabel(x1)));
  for (const x of options.marks || []) {
    svg.append(s("line", {x1: X(x), x2: X(x), y1: pad.top, y2: height - pad.bottom, stroke: "#dc2626",
      "stroke-dasharray": "3 3"}));
  }
  series.forEach((line, i) => {
    const color = line.color || COLORS[i % COLORS.length];
    let d = "";
    let pen = "M";
    for (const [x, y] of line.points) {
      if (y === null || y === undefined) {
        pen = "M";
        continue;
      }
      d += `${pen}${X(x).toFixed(1)},${Y(y).toFixed(1)} `;
      pen = "L";
    }
    svg.append(s("path", {d, fill: "none", stroke: color, "stroke-width": 2}));
    for (const [x, y] of line.points) {
      if (y !== null && y !== undefined) svg.append(s("circle", {cx: X(x), cy: Y(y), r: 2.5, fill: color}));
    }
  });
  const legend = h("figcaption", {class: "legend"}, series.map((line, i) =>
    h("span", null, h("i", {style: `background:${line.color || COLORS[i % COLORS.length]}`}), line.name)));
  return h("figure", null, options.title ? h("div", {class: "chart-title"}, options.title) : "", svg, legend);
}

/** A horizontal bar of shares ({name: share}), e.g. an endpoint's traffic split. */
export function splitBar(shares) {
  const names = Object.keys(shares);
  return h("div", {class: "split", role: "img", "aria-label": "traffic split"},
    names.filter((n) => shares[n] > 0).map((n) => h("div", {
      style: `width:${(shares[n] * 100).toFixed(2)}%;background:${COLORS[names.indexOf(n) % COLORS.length]}`,
      title: `${n}: ${(shares[n] * 100).toFixed(1)} %`,
    }, `${n} ${(shares[n] * 100).toFixed(0)} %`)));
}
