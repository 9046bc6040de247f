// Building the page: elements are made here and filled with text only, never
// with HTML strings, so nothing the API returns (a model name, a log line)
// can become markup.

const SVG_NS = "http://www.w3.org/2000/svg";

function fill(el, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** An HTML element: h("td", {class: "num"}, "3"). */
export function h(tag, attrs, ...children) {
  return fill(document.createElement(tag), attrs, children);
}

/** An SVG element (charts, the lineage graph). */
export function s(tag, attrs, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** A table from a header row and rows of cells (strings, numbers or nodes). */
export function table(headers, rows, attrs) {
  return h("table", attrs,
    h("thead", null, h("tr", null, headers.map((x) => h("th", null, x)))),
    h("tbody", null, rows.length
      ? rows.map((cells) => (cells instanceof Node ? cells : h("tr", null, cells.map((c) => h("td", null, c)))))
      : h("tr", null, h("td", {colspan: headers.length, class: "empty"}, "nothing yet"))));
}

/** Epoch seconds as local date and time ("" for none). */
export function when(ts) {
  if (ts === null || ts === undefined) return "";
  const d = new Date(ts * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** A number for a table cell: a few significant digits, "–" for none. */
export function num(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (Number.isInteger(x)) return String(x);
  return Number(x).toPrecision(digits);
}

export function pct(share) {
  return share === null || share === undefined ? "–" : `${(share * 100).toFixed(1)} %`;
}

/** A link inside the console (hash routes, so the server serves one page). */
export function link(route, text) {
  return h("a", {href: `#/${route.map(encodeURIComponent).join("/")}`}, text);
}

export function clear(el) {
  el.replaceChildren();
  return el;
}
