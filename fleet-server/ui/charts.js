// Small hand-made SVG charts: lines over time with optional markers. No dependencies.

const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs, parent) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  if (parent) parent.appendChild(el);
  return el;
}

function fmt(v) {
  if (v === null || v === undefined || !isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a === 0) return "0";
  if (a >= 100) return v.toFixed(0);
  if (a >= 1) return v.toFixed(2);
  if (a >= 0.01) return v.toFixed(3);
  return v.toExponential(1);
}

function clock(t) {
  const d = new Date(t);
  return d.toTimeString().slice(0, 8);
}

// series: [{name, cls, points: [[timeMs, value|null], ...]}]; markers: [{t, label, cls}].
// Returns a <figure> with the chart, its title and a legend.
export function lineChart(title, series, opts = {}) {
  const W = opts.width || 360;
  const H = opts.height || 150;
  const L = 46, R = 8, T = 10, B = 22;
  const fig = document.createElement("figure");
  fig.className = "chart";
  if (opts.id) fig.id = opts.id;
  const cap = document.createElement("figcaption");
  cap.textContent = title;
  fig.appendChild(cap);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  fig.appendChild(root);
  const all = series.flatMap((s) => s.points.filter((p) => p[1] !== null && isFinite(p[1])));
  const times = series.flatMap((s) => s.points.map((p) => p[0])).concat((opts.markers || []).map((m) => m.t));
  if (!all.length) {
    const t = svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, root);
    t.textContent = "no data yet";
  }
  let t0 = opts.from !== undefined ? opts.from : Math.min(...times);
  let t1 = opts.to !== undefined ? opts.to : Math.max(...times);
  if (!isFinite(t0)) { t0 = Date.now() - 60000; t1 = Date.now(); }
  if (t1 <= t0) t1 = t0 + 1000;
  let y0 = opts.min !== undefined ? opts.min : Math.min(0, ...all.map((p) => p[1]));
  let y1 = Math.max(...all.map((p) => p[1]), opts.floorMax || 0);
  if (opts.threshold !== undefined && opts.threshold !== null) y1 = Math.max(y1, opts.threshold);
  if (!isFinite(y1) || y1 <= y0) y1 = y0 + 1;
  y1 = y1 * 1.08;
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  // axes and grid
  svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }, root);
  svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }, root);
  for (const v of [y0, (y0 + y1) / 2, y1 / 1.08]) {
    svg("line", { x1: L, y1: y(v), x2: W - R, y2: y(v), class: "grid" }, root);
    const t = svg("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end", class: "tick" }, root);
    t.textContent = fmt(v);
  }
  for (const [tt, anchor] of [[t0, "start"], [t1, "end"]]) {
    const t = svg("text", { x: x(tt), y: H - 6, "text-anchor": anchor, class: "tick" }, root);
    t.textContent = clock(tt);
  }
  if (opts.threshold !== undefined && opts.threshold !== null) {
    svg("line", { x1: L, y1: y(opts.threshold), x2: W - R, y2: y(opts.threshold), class: "threshold" }, root);
  }
  for (const m of opts.markers || []) {
    const g = svg("g", { class: "marker " + (m.cls || "") }, root);
    svg("line", { x1: x(m.t), y1: T, x2: x(m.t), y2: H - B }, g);
    const tt = svg("title", {}, g);
    tt.textContent = m.label;
  }
  for (const s of series) {
    let d = "";
    let pen = false;
    for (const [t, v] of s.points) {
      if (v === null || v === undefined || !isFinite(v)) { pen = false; continue; }
      d += (pen ? "L" : "M") + x(t).toFixed(1) + "," + y(v).toFixed(1);
      pen = true;
    }
    if (d) svg("path", { d, class: "line " + s.cls }, root);
    for (const [t, v] of s.points) {
      if (v === null || v === undefined || !isFinite(v)) continue;
      if (s.points.length > 60 && !s.dots) continue;
      const c = svg("circle", { cx: x(t), cy: y(v), r: s.dots ? 3 : 1.6, class: "dot " + s.cls }, root);
      const tt = svg("title", {}, c);
      tt.textContent = `${s.name} ${clock(t)}: ${fmt(v)}`;
    }
  }
  const legend = document.createElement("div");
  legend.className = "legend";
  for (const s of series) {
    const last = [...s.points].reverse().find((p) => p[1] !== null && isFinite(p[1]));
    const item = document.createElement("span");
    item.className = "key " + s.cls;
    item.textContent = `${s.name} ${last ? fmt(last[1]) : "–"}`;
    legend.appendChild(item);
  }
  fig.appendChild(legend);
  return fig;
}

// A horizontal bar: `value` of `total`, as an inline SVG.
export function bar(value, total, cls) {
  const W = 120, H = 10;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "bar", width: W, height: H });
  svg("rect", { x: 0, y: 0, width: W, height: H, class: "bar-bg" }, root);
  const w = total > 0 ? (W * value) / total : 0;
  svg("rect", { x: 0, y: 0, width: w, height: H, class: "bar-fg " + (cls || "") }, root);
  return root;
}

export { fmt };
