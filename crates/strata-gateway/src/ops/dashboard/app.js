// strata's dashboard: reads /ui/data every five seconds and draws it as SVG
// line charts, bars and tables. No library, nothing fetched from elsewhere;
// every string from the server is set as text, never as markup.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#3b82c4", "#e07b39", "#3f9e5a", "#9b59b6", "#c0392b", "#16a2a8", "#7f8c8d", "#d4a017"];
const W = 640, H = 220, PAD = { l: 52, r: 10, t: 8, b: 22 };

function el(tag, attrs, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function clock(ms, seconds) {
  const fields = { hour: "2-digit", minute: "2-digit" };
  if (seconds) fields.second = "2-digit";
  return new Date(ms).toLocaleTimeString([], fields);
}

function number(v) {
  if (v === null || v === undefined) return "–";
  const a = Math.abs(v);
  if (a >= 1000) return (v / 1000).toFixed(a >= 10000 ? 0 : 1) + "k";
  if (a >= 10 || v === 0) return v.toFixed(0);
  if (a >= 1) return v.toFixed(1);
  return v.toPrecision(2);
}

// A line chart into `section`: `t` the times (ms), each series
// {name, values} (null for a gap), `lines` horizontal objectives
// {name, value}. Marks the section with how many points it drew.
function lineChart(section, t, series, lines, step) {
  for (const old of section.querySelectorAll("svg, .legend, .empty")) old.remove();
  lines = (lines || []).filter(l => l.value !== null && l.value !== undefined);
  let points = 0;
  for (const s of series) points += s.values.filter(v => v !== null && v !== undefined).length;
  section.dataset.points = String(points);
  section.dataset.series = String(series.length);
  if (points === 0 || t.length === 0) {
    section.appendChild(el("p", { class: "empty" }, "No data in this window yet."));
    return;
  }
  const x0 = t[0], x1 = Math.max(t[t.length - 1], x0 + 1);
  let top = 0;
  for (const s of series) for (const v of s.values) if (v !== null && v > top) top = v;
  for (const l of lines) top = Math.max(top, l.value);
  top = top > 0 ? top * 1.1 : 1;
  const X = v => PAD.l + (v - x0) / (x1 - x0) * (W - PAD.l - PAD.r);
  const Y = v => H - PAD.b - v / top * (H - PAD.t - PAD.b);
  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": section.querySelector("h2").textContent });
  for (let i = 0; i <= 4; i++) {
    const v = top * i / 4;
    svg.appendChild(el("svg:line", { class: "grid", x1: PAD.l, x2: W - PAD.r, y1: Y(v), y2: Y(v) }));
    svg.appendChild(el("svg:text", { x: PAD.l - 4, y: Y(v) + 3, "text-anchor": "end" }, number(v)));
  }
  for (let i = 0; i <= 4; i++) {
    const v = x0 + (x1 - x0) * i / 4;
    const anchor = i === 0 ? "start" : i === 4 ? "end" : "middle";
    svg.appendChild(el("svg:text", { x: X(v), y: H - 6, "text-anchor": anchor }, clock(v, x1 - x0 < 600000)));
  }
  series.forEach((s, n) => {
    const color = COLORS[n % COLORS.length];
    let d = "", pen = false, prev = null;
    s.values.forEach((v, i) => {
      if (v === null || v === undefined) { pen = false; prev = null; return; }
      if (step && prev !== null) d += `L${X(t[i])},${Y(prev)}`;
      d += `${pen ? "L" : "M"}${X(t[i])},${Y(v)}`;
      pen = true; prev = v;
    });
    const path = el("svg:path", { class: "series", d, stroke: color });
    path.appendChild(el("svg:title", {}, s.name));
    svg.appendChild(path);
    // A point with no neighbour draws no line: mark it.
    const at = i => s.values[i] !== null && s.values[i] !== undefined;
    s.values.forEach((v, i) => {
      if (at(i) && !at(i - 1) && !at(i + 1)) {
        svg.appendChild(el("svg:circle", { class: "dot", cx: X(t[i]), cy: Y(v), r: 3, fill: color }));
      }
    });
  });
  for (const l of lines) {
    svg.appendChild(el("svg:line", { class: "slo", x1: PAD.l, x2: W - PAD.r, y1: Y(l.value), y2: Y(l.value) }));
  }
  section.appendChild(svg);
  const legend = el("div", { class: "legend" });
  series.forEach((s, n) => {
    const item = el("span", {}, s.name);
    const swatch = el("i");
    swatch.style.background = COLORS[n % COLORS.length];
    item.prepend(swatch);
    legend.appendChild(item);
  });
  for (const l of lines) legend.appendChild(el("span", { class: "refused" }, `- - ${l.name} (${number(l.value)})`));
  section.appendChild(legend);
}

function bars(section, rows) {
  const box = section.querySelector(".bars");
  box.replaceChildren();
  section.dataset.points = String(rows.length);
  if (rows.length === 0) {
    box.appendChild(el("p", { class: "empty" }, "No requests in this window yet."));
    return;
  }
  const top = Math.max(...rows.map(r => r.cost_usd), 1e-12);
  for (const r of rows) {
    const row = el("div", { class: "row" });
    row.appendChild(el("span", { title: r.tenant_id }, r.name || r.tenant_id));
    const bar = el("div", { class: "bar" });
    bar.style.width = `${Math.max(r.cost_usd / top * 100, 0.5)}%`;
    row.appendChild(bar);
    row.appendChild(el("span", {}, `$${r.cost_usd.toFixed(6)} · ${r.requests} req`));
    box.appendChild(row);
  }
}

function table(section, rows) {
  const body = section.querySelector("tbody");
  body.replaceChildren();
  for (const cells of rows) {
    const tr = el("tr");
    for (const c of cells) tr.appendChild(el("td", {}, c === null || c === undefined ? "–" : String(c)));
    body.appendChild(tr);
  }
  section.dataset.rows = String(rows.length);
}

function render(d) {
  const load = d.load;
  const lt = load.map(s => s.at_ms);
  lineChart(document.getElementById("chart-load"), lt, [
    { name: "in flight", values: load.map(s => s.in_flight) },
    { name: "waiting", values: load.map(s => s.waiting) },
    { name: "capacity (slots)", values: load.map(s => s.capacity) },
  ]);
  lineChart(document.getElementById("chart-tokens"), lt, [
    { name: "tokens/s", values: load.map(s => s.tokens_per_s) },
  ]);
  const r = d.replicas;
  lineChart(document.getElementById("chart-replicas"), r.t,
    Object.entries(r.series).map(([name, values]) => ({ name, values })), [], true);
  const c = d.cost;
  lineChart(document.getElementById("chart-cost"), c.t, [
    ...Object.entries(c.instances_by_pool).map(([pool, values]) => ({ name: `instances, pool ${pool} ($)`, values })),
    { name: "billed tokens ($)", values: c.billed },
  ]);
  const l = d.latency;
  lineChart(document.getElementById("chart-ttft"), l.t, [
    { name: "p50", values: l.ttft_ms.p50 }, { name: "p95", values: l.ttft_ms.p95 }, { name: "p99", values: l.ttft_ms.p99 },
  ], [{ name: "p95 objective", value: d.slo.ttft_p95_ms }]);
  lineChart(document.getElementById("chart-latency"), l.t, [
    { name: "p50", values: l.latency_ms.p50 }, { name: "p95", values: l.latency_ms.p95 }, { name: "p99", values: l.latency_ms.p99 },
  ]);
  bars(document.getElementById("chart-tenants"), d.tenants_spend);
  table(document.getElementById("models"), d.models.map(m => [
    m.model, m.pools.join(", ") || null, m.requests, number(m.tokens), m.billed_usd.toFixed(6),
    m.instances_usd.toFixed(4), m.ttft_p95_ms === null ? null : Math.round(m.ttft_p95_ms), m.replicas_running,
  ]));
  table(document.getElementById("decisions"), d.decisions.map(x => [
    new Date(x.at_ms).toLocaleString(), x.pool, `${x.from} → ${x.to}`, x.reason,
    x.inputs && x.inputs.stable_demand_tokens_per_s !== undefined ? number(x.inputs.stable_demand_tokens_per_s) : null,
    x.inputs && x.inputs.plan_cost_per_hour !== undefined ? x.inputs.plan_cost_per_hour.toFixed(2) : null,
  ]));
  const rows = [];
  for (const t of d.tenants) {
    const limits = [t.requests_per_minute && `${t.requests_per_minute} req/min`, t.tokens_per_minute && `${t.tokens_per_minute} tok/min`,
      t.monthly_budget_usd !== null && t.monthly_budget_usd !== undefined && `$${t.monthly_budget_usd}/month`].filter(Boolean).join(", ") || "none";
    const keys = t.keys.length ? t.keys : [null];
    for (const k of keys) {
      rows.push([`${t.name} (${t.id})`, t.isolation, limits, k && `${k.name} (${k.id})`, k && k.role,
        k && new Date(k.created_at_ms).toLocaleString(), k && (k.revoked_at_ms ? "revoked" : "active")]);
    }
  }
  table(document.getElementById("tenants"), rows);
  document.getElementById("updated").textContent = `updated ${new Date(d.now_ms).toLocaleTimeString()}`;
}

async function refresh() {
  const minutes = document.getElementById("window").value;
  const error = document.getElementById("error");
  try {
    const r = await fetch(`/ui/data?minutes=${minutes}`, { credentials: "same-origin", cache: "no-store" });
    if (r.status === 401) { window.location.assign("/ui"); return; }
    if (!r.ok) throw new Error((await r.json()).error.message);
    render(await r.json());
    error.hidden = true;
    document.body.dataset.loaded = "true";
  } catch (e) {
    error.textContent = `Cannot read the dashboard's data: ${e.message}`;
    error.hidden = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("window").addEventListener("change", refresh);
  refresh();
  setInterval(refresh, 5000);
});
