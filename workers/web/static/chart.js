// A line chart in plain SVG: the mean (or the raw value) as a line, min..max as a band behind it.
// Small on purpose: the dashboard needs no charting library, and nothing is fetched from elsewhere.
"use strict";
const SVG_NS = "http://www.w3.org/2000/svg";

function svgEl(name, attrs) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  return el;
}

// points: [{t: ms, y: number, lo?: number, hi?: number}], sorted by t. range: [fromMs, toMs].
function drawChart(svg, points, range) {
  // drawn at the element's own pixel size, so labels keep their shape at a phone's width
  const W = Math.max(200, Math.round(svg.getBoundingClientRect().width) || 600), H = 140, L = 40, R = 6, T = 8, B = 18;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  const ys = points.flatMap(p => [p.y, p.lo ?? p.y, p.hi ?? p.y]).filter(Number.isFinite);
  if (!ys.length) {
    const t = svgEl("text", {x: W / 2, y: H / 2, "text-anchor": "middle"});
    t.textContent = "no data in this range yet";
    svg.append(t);
    return;
  }
  let lo = Math.min(...ys), hi = Math.max(...ys);
  if (hi === lo) { hi += 1; lo -= 1; }
  const [t0, t1] = range;
  const x = t => L + (W - L - R) * (t - t0) / Math.max(1, t1 - t0);
  const y = v => T + (H - T - B) * (1 - (v - lo) / (hi - lo));
  for (const v of [lo, (lo + hi) / 2, hi]) {
    svg.append(svgEl("line", {class: "axis", x1: L, x2: W - R, y1: y(v), y2: y(v)}));
    const label = svgEl("text", {x: L - 4, y: y(v) + 3, "text-anchor": "end"});
    label.textContent = +v.toPrecision(4);
    svg.append(label);
  }
  const banded = points.filter(p => Number.isFinite(p.lo) && Number.isFinite(p.hi));
  if (banded.length > 1) {
    const top = banded.map(p => `${x(p.t).toFixed(1)},${y(p.hi).toFixed(1)}`);
    const bottom = banded.slice().reverse().map(p => `${x(p.t).toFixed(1)},${y(p.lo).toFixed(1)}`);
    svg.append(svgEl("polygon", {class: "band", points: top.concat(bottom).join(" ")}));
  }
  const d = points.map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(p.y).toFixed(1)}`).join("");
  svg.append(svgEl("path", {class: "line", d: points.length > 1 ? d : d + `h2`}));
  for (const [t, anchor] of [[t0, "start"], [t1, "end"]]) {
    const label = svgEl("text", {x: x(t), y: H - 4, "text-anchor": anchor});
    label.textContent = new Date(t).toLocaleString([], {month: "short", day: "numeric", hour: "2-digit", minute: "2-digit"});
    svg.append(label);
  }
}
