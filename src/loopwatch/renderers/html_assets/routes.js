// Where each route's time goes: per route, the distribution of its wall time and of its
// parts (CPU, database, pool and loop waits) over its requests, each as a glyph on one
// ms axis shared by every route: a box from p50 to p95, a line to p99, a diamond at the
// longest and a dot at the mean. Every figure is --json's (the route's *_p50_ms ...).
"use strict";

// key prefix in --json, label (the summary table's), timeline colour class, mean
const ROUTE_FIGURES = [
  ["wall", "wall", "wall", (r) => (r.requests ? r.wall_total_ms / r.requests : 0)],
  ["cpu", "CPU on loop", "cpu", (r) => r.cpu_mean_ms],
  ["db", "awaited DB", "db", (r) => r.db_mean_ms],
  ["pool_wait", "pool wait", "pool", (r) => r.pool_wait_mean_ms],
  ["loop_wait", "loop wait", "loop", (r) => r.loop_wait_mean_ms],
];
const PCTS = ["p50", "p95", "p99", "max"];
const OPEN_ROUTES = 8; // shown; the rest under a fold
const LOG_FROM = 100; // a log axis where the figures span more than this factor

function figuresOf(r, key, mean) {
  const f = { mean: mean(r) };
  for (const p of PCTS) f[p] = r[`${key}_${p}_ms`];
  return f;
}

// The shared axis: linear from 0, or, where the figures span more than LOG_FROM times
// (CPU in microseconds beside walls of seconds, a max far beyond the p95), log from a
// power of ten at or below the smallest figure that is not 0 (at most 6 decades down),
// everything smaller, zeros too, at its left edge.
function msAxis(figs) {
  let top = 0, least = Infinity;
  for (const f of figs) {
    for (const v of [...PCTS.map((p) => f[p]), f.mean]) {
      if (v > top) top = v;
      if (v > 0 && v < least) least = v;
    }
  }
  if (!(top > 0)) top = 1;
  if (!(top > LOG_FROM * least)) {
    const { step } = niceTicks(0, top, 500, 84);
    const hi = Math.ceil(top / step - 1e-9) * step;
    const ticks = [];
    for (let k = 0; k * step <= hi * (1 + 1e-9); k++) ticks.push([k * step, k ? msLabel(k * step, step) : "0"]);
    return { log: false, lo: 0, hi, ticks, at: (v) => Math.max(0, Math.min(1, v / hi)) };
  }
  const hiExp = Math.ceil(Math.log10(top) - 1e-9);
  const loExp = Math.max(Math.floor(Math.log10(least) + 1e-9), hiExp - 6);
  const lo = Math.pow(10, loExp), span = hiExp - loExp;
  const ticks = [];
  for (let k = loExp; k <= hiExp; k++) ticks.push([Math.pow(10, k), decadeLabel(k)]);
  return { log: true, lo, hi: Math.pow(10, hiExp), ticks,
    at: (v) => (v > lo ? Math.min(1, (Math.log10(v) - loExp) / span) : 0) };
}

function decadeLabel(k) { // 10^k ms: 1µs ... 100ms, 1s, 10s ...
  if (k < 0) return `${Math.round(Math.pow(10, k + 3))}\u00b5s`;
  if (k < 3) return `${Math.round(Math.pow(10, k))}ms`;
  return `${Math.round(Math.pow(10, k - 3))}s`;
}

function routeDistributions(rows, report) {
  const drawn = rows.map((r) => ROUTE_FIGURES.map(([key, label, cls, mean]) => ({ key, label, cls, f: figuresOf(r, key, mean) }))
    .filter((g, i) => i === 0 || g.f.max > 0));
  const axis = msAxis(drawn.flat().map((g) => g.f));
  const pos = (v) => `${axis.at(v) * 100}%`;
  const sampled = report.sampled_requests > 0;

  function grid() {
    return axis.ticks.map(([v]) => { const l = h("i", { class: "gl" }); l.style.left = pos(v); return l; });
  }

  function glyph(g) {
    const f = g.f;
    const line = h("i", { class: "whisker" });
    line.style.left = pos(f.p95);
    line.style.width = `${(axis.at(f.p99) - axis.at(f.p95)) * 100}%`;
    // (from 0, or below the log axis: it fades in from the left edge)
    const box = h("i", { class: axis.at(f.p50) === 0 && f.p95 > f.p50 ? "box open" : "box" });
    box.style.left = pos(f.p50);
    box.style.width = `${(axis.at(f.p95) - axis.at(f.p50)) * 100}%`;
    const cap = h("i", { class: "cap" });
    cap.style.left = pos(f.p99);
    const top = h("i", { class: "max" });
    top.style.left = pos(f.max);
    const mean = h("i", { class: "mean" });
    mean.style.left = pos(f.mean);
    return [line, box, cap, top, mean];
  }

  function details(r, g) {
    const f = g.f;
    const kv = (k, v) => h("div", { class: "kv" }, h("span", { class: "key", text: k }), h("span", { text: v }));
    return [
      h("div", { class: "tip-head" }, h("i", { class: `sw c-${g.cls}` }), `${routeLabel(r)}: ${g.label}`),
      ...PCTS.map((p) => kv(p === "max" ? "max" : p, fmt.ms(f[p]))),
      kv("mean", fmt.ms(f.mean)),
      kv("requests", fmt.int(r.requests) + (sampled ? " recorded (a sample)" : "")),
    ];
  }

  function figureRow(r, i, g) {
    const track = h("div", { class: "dist-track" }, grid(), glyph(g));
    const figs = h("div", { class: "dist-figs" }, PCTS.map((p) => h("span", { "data-key": `${g.key}_${p}_ms`, text: fmt.ms(g.f[p]) })));
    const row = h("div", { class: `dist-g c-${g.cls}`, "data-route": i, "data-figure": g.key, tabindex: "0",
      "aria-label": `${routeLabel(r)}, ${g.label}: ` + PCTS.map((p) => `${p} ${fmt.ms(g.f[p])}`).join(", ") + `, mean ${fmt.ms(g.f.mean)}` },
    h("span", { class: "dist-name", text: g.label }), track, figs);
    const show = (e) => tip.show(e.clientX, e.clientY, details(r, g));
    row.addEventListener("pointermove", (e) => { if (e.pointerType === "mouse") show(e); });
    row.addEventListener("pointerdown", (e) => { if (e.pointerType !== "mouse") show(e); });
    row.addEventListener("pointerleave", (e) => { if (e.pointerType === "mouse") tip.hide(); });
    return row;
  }

  function route(r, i) {
    const none = ROUTE_FIGURES.slice(1).filter(([key]) => !drawn[i].some((g) => g.key === key)).map(([, label]) => label);
    return h("div", { class: "dist-route", "data-route": i },
      h("div", { class: "dist-label" }, h("span", { class: "route", text: routeLabel(r) }),
        h("span", { class: "muted", text: ` ${fmt.count(r.requests, "request")}` + (none.length ? `; no ${none.join(", no ")}` : "") })),
      drawn[i].map((g) => figureRow(r, i, g)));
  }

  const head = h("div", { class: "dist-axis" }, h("span", { class: "dist-name", text: axis.log ? "log scale" : "" }),
    h("div", { class: "dist-scale" }, axis.ticks.map(([v, label], k) => {
      const at = axis.at(v);
      const t = h("span", { class: at < 0.02 ? "from" : at > 0.98 ? "to" : null, text: k === 0 && axis.log ? `\u2264${label}` : label });
      t.style.left = pos(v);
      return t;
    })),
    h("div", { class: "dist-figs" }, PCTS.map((p) => h("span", { text: p }))));
  const list = h("div", { class: "dist", id: "route-dist", "data-scale": axis.log ? "log" : "linear" }, head,
    rows.slice(0, OPEN_ROUTES).map(route));
  if (rows.length > OPEN_ROUTES) {
    list.append(h("details", { class: "dist-more" }, h("summary", {}, `\u2026 and ${fmt.count(rows.length - OPEN_ROUTES, "more row")}`),
      rows.slice(OPEN_ROUTES).map((r, k) => route(r, k + OPEN_ROUTES))));
  }
  return { list, axis };
}

function distLegend(axis) {
  const item = (cls, text) => h("li", {}, h("i", { class: `key ${cls}` }), text);
  const scale = axis.log
    ? `Log scale (each step ten times the last): zeros and anything under ${decadeLabel(Math.round(Math.log10(axis.lo)))} sit at ` +
      "its left edge, and a box from there fades in."
    : "Linear scale from 0.";
  return [
    h("ul", { class: "legend dist-legend" },
      item("box", "p50 to p95"), item("whisker", "to p99"), item("max", "the longest"), item("mean", "the mean"),
      ROUTE_FIGURES.map(([, label, cls]) => h("li", {}, h("i", { class: `sw c-${cls}` }), label))),
    h("p", { class: "muted", id: "dist-scale-note", text: `${scale} One axis for every route and figure.` }),
  ];
}
