// Two small SVG charts, no library: stacked bars per day (credits by agent) and plain bars.
// Every bar carries data-* attributes and a <title>, so screen readers and tests can read it.
"use strict";

(function () {
  const NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2",
    "#65a30d", "#dc2626", "#4b5563", "#ca8a04"];

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (parent) parent.appendChild(node);
    return node;
  }

  function niceMax(value) {
    if (value <= 0) return 1;
    const step = Math.pow(10, Math.floor(Math.log10(value)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= value) return m * step;
    return 10 * step;
  }

  function fmt(n) {
    return Number(n).toLocaleString(undefined, { maximumFractionDigits: 4 });
  }

  function color(i) { return PALETTE[i % PALETTE.length]; }

  // days: ["2026-11-01", ...]; series: {agent: [amount per day]}
  function stackedBars(container, days, series, opts) {
    const o = Object.assign({ width: 1100, height: 300, label: "credits" }, opts || {});
    container.textContent = "";
    const agents = Object.keys(series);
    const totals = days.map((_, i) => agents.reduce((s, a) => s + Number(series[a][i] || 0), 0));
    const max = niceMax(Math.max(0, ...totals));
    const m = { top: 12, right: 12, bottom: 36, left: 56 };
    const w = o.width - m.left - m.right, h = o.height - m.top - m.bottom;
    const svg = el("svg", {
      viewBox: `0 0 ${o.width} ${o.height}`, role: "img", class: "chart",
      "aria-label": `${o.label} per day by agent, ${days[0] || ""} to ${days[days.length - 1] || ""}`,
    }, container);
    const g = el("g", { transform: `translate(${m.left},${m.top})` }, svg);
    for (let t = 0; t <= 4; t++) {
      const y = h - (h * t) / 4;
      el("line", { x1: 0, x2: w, y1: y, y2: y, class: "gridline" }, g);
      const label = el("text", { x: -6, y: y + 4, "text-anchor": "end", class: "tick" }, g);
      label.textContent = fmt((max * t) / 4);
    }
    const band = w / Math.max(1, days.length);
    const barW = Math.max(1, band * 0.8);
    const every = Math.ceil(days.length / 10);
    days.forEach((day, i) => {
      let y = h;
      agents.forEach((agent, j) => {
        const v = Number(series[agent][i] || 0);
        if (v <= 0) return;
        const bh = (v / max) * h;
        y -= bh;
        const rect = el("rect", {
          x: i * band + (band - barW) / 2, y: y, width: barW, height: Math.max(bh, 0.5),
          fill: color(j), class: "bar", "data-day": day, "data-agent": agent, "data-amount": v,
        }, g);
        el("title", {}, rect).textContent = `${day} · ${agent}: ${fmt(v)}`;
      });
      if (i % every === 0) {
        const label = el("text", {
          x: i * band + band / 2, y: h + 16, "text-anchor": "middle", class: "tick",
        }, g);
        label.textContent = day.slice(5);
      }
    });
    el("line", { x1: 0, x2: w, y1: h, y2: h, class: "axis" }, g);
    const legend = document.createElement("ul");
    legend.className = "legend";
    agents.forEach((agent, j) => {
      const li = document.createElement("li");
      const sw = el("svg", { width: 12, height: 12, "aria-hidden": "true" }, li);
      el("rect", { width: 12, height: 12, fill: color(j) }, sw);
      li.appendChild(document.createTextNode(" " + agent));
      legend.appendChild(li);
    });
    container.appendChild(legend);
    return svg;
  }

  // labels: ["queued", ...]; values: [n, ...]
  function bars(container, labels, values, opts) {
    const o = Object.assign({ width: 420, row: 24, label: "count" }, opts || {});
    container.textContent = "";
    const max = niceMax(Math.max(0, ...values));
    const left = 110, right = 50;
    const height = labels.length * o.row + 8;
    const svg = el("svg", { viewBox: `0 0 ${o.width} ${height}`, role: "img", class: "chart",
      "aria-label": o.label }, container);
    labels.forEach((label, i) => {
      const y = 4 + i * o.row;
      const t = el("text", { x: left - 8, y: y + o.row * 0.65, "text-anchor": "end", class: "tick" }, svg);
      t.textContent = label;
      const bw = ((o.width - left - right) * values[i]) / max;
      const rect = el("rect", { x: left, y: y + 3, width: Math.max(bw, values[i] ? 1 : 0),
        height: o.row - 6, fill: color(i), class: "bar", "data-label": label,
        "data-value": values[i] }, svg);
      el("title", {}, rect).textContent = `${label}: ${fmt(values[i])}`;
      const v = el("text", { x: left + bw + 6, y: y + o.row * 0.65, class: "tick" }, svg);
      v.textContent = fmt(values[i]);
    });
    return svg;
  }

  window.JLChart = { stackedBars, bars, color };
})();
