// A line chart in plain SVG: one series per adapter version, mean reward (y) over time (x).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04"];

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

// series: [{version, points: [{t (ISO time), mean, n}]}]; returns an <svg class="chart"> with a legend.
function lineChart(series, { width = 1000, height = 280 } = {}) {
  const pad = { left: 44, right: 16, top: 12, bottom: 28 };
  const points = series.flatMap((s) => s.points);
  const times = points.map((p) => Date.parse(p.t));
  const values = points.map((p) => p.mean);
  let [t0, t1] = [Math.min(...times), Math.max(...times)];
  if (t0 === t1) [t0, t1] = [t0 - 60000, t1 + 60000];
  const lo = Math.min(0, ...values);
  const hi = Math.max(1, ...values);
  const x = (t) => pad.left + ((t - t0) / (t1 - t0)) * (width - pad.left - pad.right);
  const y = (v) => height - pad.bottom - ((v - lo) / (hi - lo)) * (height - pad.top - pad.bottom);

  const chart = svg("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img" });
  for (let i = 0; i <= 4; i++) {
    const v = lo + ((hi - lo) * i) / 4;
    chart.append(
      svg("line", { class: "grid", x1: pad.left, x2: width - pad.right, y1: y(v), y2: y(v) }),
      svg("text", { class: "tick", x: pad.left - 6, y: y(v) + 4, "text-anchor": "end" }, v.toFixed(2)),
    );
  }
  for (const [t, anchor] of [[t0, "start"], [(t0 + t1) / 2, "middle"], [t1, "end"]]) {
    const seconds = t1 - t0 < 3600000 ? { second: "2-digit" } : {};
    const label = new Date(t).toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", ...seconds });
    chart.append(svg("text", { class: "tick", x: x(t), y: height - 8, "text-anchor": anchor }, label));
  }
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const path = s.points.map((p, j) => `${j ? "L" : "M"}${x(Date.parse(p.t)).toFixed(1)},${y(p.mean).toFixed(1)}`);
    const group = svg("g", { class: "series", "data-version": s.version, stroke: color, fill: color });
    group.append(svg("path", { d: path.join(" "), fill: "none", "stroke-width": 2 }));
    for (const p of s.points) {
      const dot = svg("circle", { cx: x(Date.parse(p.t)), cy: y(p.mean), r: 3.5 });
      dot.append(svg("title", {}, `${s.version}: ${p.mean.toFixed(3)} over ${p.n} calls, ${p.t}`));
      group.append(dot);
    }
    chart.append(group);
  });
  const legend = document.createElement("div");
  legend.className = "legend";
  series.forEach((s, i) => {
    const item = document.createElement("span");
    item.style.setProperty("--color", COLORS[i % COLORS.length]);
    item.textContent = s.version;
    legend.append(item);
  });
  const figure = document.createElement("figure");
  figure.append(chart, legend);
  return figure;
}
