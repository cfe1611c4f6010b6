// The page: the sections of the terminal report, in its words and figures, with the
// timeline and the charts. Every figure comes from the embedded data (report.to_json(),
// the series and the window's requests); this file only lays them out and formats them.
"use strict";

const SUMMARY_ROWS = [
  ["wall", "wall_ms"], ["CPU on loop", "cpu_ms"], ["awaited DB", "db_ms"],
  ["pool wait", "pool_wait_ms"], ["loop wait", "loop_wait_ms"],
];

// The route table's columns (summary._ROUTE_COLUMNS): heading, cell text, JSON key.
const ROUTE_COLUMNS = [
  ["reqs", (r) => fmt.int(r.requests)],
  ["p50", (r) => fmt.ms(r.wall_p50_ms)],
  ["p95", (r) => fmt.ms(r.wall_p95_ms)],
  ["cpu", (r) => fmt.ms(r.cpu_mean_ms)],
  ["db", (r) => fmt.ms(r.db_mean_ms)],
  ["stmts", (r) => (r.db_statements_mean === null ? "-" : fixed(r.db_statements_mean, 1))],
  ["queries", (r) => fixed(r.db_queries_mean, 1)],
  ["pool", (r) => fmt.ms(r.pool_wait_mean_ms)],
  ["loop", (r) => fmt.ms(r.loop_wait_mean_ms)],
  ["4xx", (r) => fmt.int(r.client_errors)],
  ["5xx", (r) => fmt.int(r.errors)],
];

function themeColors() {
  return {
    states: ["--cpu", "--loop", "--pool", "--db", "--other"].map(cssVar),
    bg: cssVar("--bg"), text: cssVar("--text"), muted: cssVar("--muted"), grid: cssVar("--grid"),
    hover: cssVar("--hover"), cursor: cssVar("--cursor"), band: cssVar("--band"),
  };
}

function header(d) {
  const r = d.report;
  const procs = r.memory.processes;
  const head = h("header", {},
    h("h1", {}, "loopwatch report"),
    h("p", { class: "sub", id: "period" },
      `${fmt.count(r.requests, "request")}, ${fmt.count(procs, "process")}, ${fmt.period(r.first_start, r.last_end)}`));
  if (r.scope) head.append(h("p", { class: "sub", text: `only ${r.scope}` }));
  const files = r.files.map((f) => h("li", {}, f.path + (f.error ? ` (${f.error})` : `: ${fmt.count(f.requests, "request")}`)));
  head.append(h("details", { class: "files" }, h("summary", {}, `From ${fmt.count(r.files.length, "file")}`), h("ul", {}, files)));
  if (r.problems.length) {
    head.append(h("div", { class: "notes", role: "note" }, h("strong", {}, "Notes"),
      h("ul", {}, r.problems.map((p) => h("li", { text: p })))));
  }
  return head;
}

function diagnosis(r) {
  if (!r.diagnosis.length) return null;
  return section("diagnosis", "Diagnosis", h("div", { class: "diagnosis" }, r.diagnosis.map(prose)));
}

function summary(r) {
  const table = h("table", { class: "figures", id: "summary-table" },
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, ""), ["p50", "p95", "p99", "max"].map((k) => h("th", { scope: "col", text: k })))),
    h("tbody", {}, SUMMARY_ROWS.map(([label, key]) => h("tr", {},
      h("th", { scope: "row", text: label }),
      ["p50", "p95", "p99", "max"].map((p) => h("td", { "data-key": `${key}.${p}`, text: fmt.ms(r[key][p]) }))))));
  const lines = [
    `CPU on the loop: ${fmt.pct(r.cpu_share, 1)} of wall time.`,
    `In flight at once (all processes): peak ${fmt.int(r.peak_in_flight)}, p95 ${fmt.int(r.p95_in_flight)}.`,
    memoryLine(r.memory.by_pid),
  ];
  if (r.errors) lines.push(`Errors: ${fmt.count(r.errors, "request")} (status 500 or more, or raised).`);
  if (r.sampled_requests) lines.push(samplingLine(r));
  if (r.skipped_lines) lines.push(`Skipped: ${fmt.count(r.skipped_lines, "line")} that could not be read.`);
  const cards = h("div", { class: "cards" },
    card("requests", fmt.int(r.requests), "requests"),
    card("wall p50", fmt.ms(r.wall_ms.p50), "wall_ms.p50"),
    card("wall p95", fmt.ms(r.wall_ms.p95), "wall_ms.p95"),
    card("peak in flight", fmt.int(r.peak_in_flight), "peak_in_flight"),
    card("CPU share", fmt.pct(r.cpu_share, 1), "cpu_share"));
  return section("summary", "Summary", cards, h("div", { class: "scroll" }, table),
    h("div", { class: "prose" }, lines.map((l) => h("p", { text: l }))));
}

function card(label, value, key) {
  return h("div", { class: "card" }, h("div", { class: "value", "data-key": key, text: value }), h("div", { class: "label", text: label }));
}

function memoryLine(procs) {
  const known = procs.filter((p) => p.rss_bytes_max !== null);
  if (!known.length) return "Memory: not measured.";
  if (procs.length === 1) {
    const p = known[0];
    const uss = p.uss_bytes_max !== null ? ` (USS ${fmt.bytes(p.uss_bytes_max)})` : "";
    return `Memory: pid ${p.pid}, peak RSS ${fmt.bytes(p.rss_bytes_max || 0)}${uss}.`;
  }
  const rss = known.map((p) => p.rss_bytes_max || 0);
  const uss = known.filter((p) => p.uss_bytes_max !== null).map((p) => p.uss_bytes_max);
  const range = (v) => {
    const lo = fmt.bytes(Math.min(...v)), hi = fmt.bytes(Math.max(...v));
    return lo === hi ? lo : `${lo}\u2013${hi}`;
  };
  return `Memory: ${fmt.count(procs.length, "process")}, peak RSS ${range(rss)} each` +
    `${uss.length ? ` (USS ${range(uss)})` : ""}, ${fmt.bytes(rss.reduce((a, b) => a + b, 0))} together.`;
}

function samplingLine(r) {
  return `Sampled: ${fmt.pct(r.sampled_requests / r.requests, 0)} of these requests were recorded with a ` +
    `sample_rate below 1 (LoopWatch(sample_rate=...)): they stand for about ` +
    `${fmt.count(r.requests_estimated, "request")} in all. Times, percentiles and the timeline are of the ` +
    `recorded requests (a random sample); counts per route, in flight and errors are recorded ones, and the ` +
    `sync-worker estimate replays the recorded arrivals only: it understates the load the full traffic ` +
    `would put on sync workers.`;
}

function routeLabel(r) {
  return r.method === null ? r.route : `${r.method} ${r.route}`;
}

function routes(r) {
  const rows = r.routes;
  let cols = ROUTE_COLUMNS;
  if (rows.every((x) => x.db_statements_mean === null)) cols = cols.filter(([k]) => k !== "stmts" && k !== "queries");
  const means = cols.some(([k]) => k === "stmts") ? "cpu, db, statements, queries," : "cpu, db,";
  const table = h("table", { class: "figures routes", id: "routes-table" },
    h("thead", {}, h("tr", {}, h("th", { scope: "col", class: "route", text: "route" }), cols.map(([k]) => h("th", { scope: "col", text: k })))),
    h("tbody", {}, rows.map((row, i) => h("tr", { "data-route": i },
      h("th", { scope: "row", class: "route", text: routeLabel(row) }),
      cols.map(([k, cell]) => h("td", { "data-col": k, text: cell(row) }))))));
  const dist = routeDistributions(rows, r);
  const more = r.route_count > rows.length ? h("p", { class: "muted", text: `${fmt.count(r.route_count, "row")} in all: the last one holds the rest.` }) : null;
  return section("routes", "Routes",
    h("p", { class: "muted", text: `By total wall time (mean ${means} pool wait and loop wait per request)` }),
    h("div", { class: "scroll" }, table), more,
    h("h3", {}, "Where each route's time goes"),
    h("p", { class: "muted" }, "Per request: the wall time and its parts (the driver's CPU inside a query counts in both " +
      "CPU and database), each a distribution over the route's requests in the timeline's colours. " +
      (r.sampled_requests ? "Of the recorded requests (a sample: see the summary). " : "") +
      "Hover or tap a row for its figures."),
    ...distLegend(dist.axis), dist.list);
}

function who(routes) {
  const named = routes.filter((r) => r !== null);
  const parts = [];
  if (named.length) parts.push((named.length === 1 ? "route " : "routes ") + named.join(", "));
  if (routes.includes(null)) parts.push("no request");
  return parts.join(" and ");
}

function where(g) {
  const loc = g.location;
  if (loc === null) return "unknown location";
  return loc.line ? `${loc.file}:${loc.line} in ${loc.function}` : loc.file;
}

function groupLine(g) {
  const cause = g.cause === "cpu" ? "CPU-bound" : "blocked";
  const worst = g.count > 1 ? `, worst ${fmt.ms(g.max_ms)}` : "";
  const delayed = g.delayed_requests
    ? `delayed ${fmt.count(g.delayed_requests, "other request")} by ${fmt.ms(g.delayed_ms)}`
    : "delayed no other request";
  return `${fmt.count(g.count, "stall")}, ${fmt.ms(g.total_ms)}${worst}, CPU ${fmt.ms(g.cpu_ms)} (${cause}), ${who(g.routes)}; ${delayed}.`;
}

function loop(r) {
  const s = r.loop;
  let health;
  if (s.utilization === null && s.lag_ms === null) {
    health = "Busy share and lag: not measured in this period.";
  } else {
    const busy = s.utilization === null
      ? `Busy share not measured (${fmt.count(s.samples, "sample")})`
      : `Busy ${fmt.pct(s.utilization, 1)} of the time (loop thread CPU, ${fmt.count(s.samples, "sample")})`;
    const lag = s.lag_ms === null ? "not measured" : `p50 ${fmt.ms(s.lag_ms.p50)}, p99 ${fmt.ms(s.lag_ms.p99)}, max ${fmt.ms(s.lag_ms.max)}`;
    health = `${busy}; lag ${lag}.`;
  }
  const out = [h("p", { id: "loop-health", text: health })];
  if (!s.stalls.length) {
    out.push(h("p", { text: "No stalls: no step held the loop long enough to be recorded." }));
  } else {
    const total = s.stalls.reduce((a, g) => a + g.total_ms, 0);
    out.push(h("p", { text: `${fmt.count(s.stall_count, "stall")}, ${fmt.ms(total)} in total, by code location:` }));
    const item = (g) => h("li", {}, h("code", { class: "where", text: where(g) }), ": ", groupLine(g));
    out.push(h("ul", { class: "stalls" }, s.stalls.slice(0, 10).map(item)));
    if (s.stalls.length > 10) {
      const rest = s.stalls.slice(10);
      const n = rest.reduce((a, g) => a + g.count, 0);
      out.push(h("details", {}, h("summary", {},
        `\u2026 and ${fmt.count(rest.length, "more location")}: ${fmt.count(n, "stall")}, ${fmt.ms(rest.reduce((a, g) => a + g.total_ms, 0))}.`),
      h("ul", { class: "stalls" }, rest.map(item))));
    }
  }
  return section("loop", "Loop", ...out);
}

function capacity(r) {
  const c = r.capacity;
  const count = (n, noun) => (n === null ? "?" : fmt.count(n, noun));
  const mem = (b) => (b === null ? "" : `~${fmt.bytes(b)}`);
  const k = c.async_processes;
  const rows = [
    [`same p95 latency (${fmt.ms(c.async_p95_ms)})`, count(c.sync_workers_same_latency, "worker"), mem(c.sync_bytes_same_latency)],
    [`same throughput (${fmt.num(c.async_throughput_rps, 0)} req/s)`, count(c.sync_workers_same_throughput, "worker"), mem(c.sync_bytes_same_throughput)],
    ["no request ever queuing", count(c.sync_workers_no_queueing, "worker"), `(the most in flight at once; p95: ${fmt.int(c.sync_workers_no_queueing_p95)})`],
    ["measured", count(k, "process"), c.async_bytes === null ? "memory not measured" : fmt.bytes(c.async_bytes) + (k > 1 ? " in all" : "")],
  ];
  const table = h("table", { class: "figures capacity", id: "capacity-table" }, h("tbody", {}, rows.map(([label, n, rest], i) =>
    h("tr", { class: i < 3 ? "sync" : "async" },
      i === 0 ? h("th", { scope: "rowgroup", rowspan: 3, class: "kind", text: "SYNC" }) : null,
      i === 3 ? h("th", { scope: "row", class: "kind", text: "ASYNC" }) : null,
      h("th", { scope: "row", text: label }), h("td", { class: "n", text: n }), h("td", { text: rest })))));
  const notes = [];
  const rss = c.sync_worker_rss_bytes, uss = c.sync_worker_uss_bytes;
  if (rss !== null) {
    notes.push(uss !== null
      ? `Sync memory: each worker imports the app (no --preload): ${fmt.bytes(rss)} for the first, ` +
        `${fmt.bytes(Math.min(uss, rss))} unique (USS) for each further one; forked after --preload they share more.`
      : `Sync memory: ${fmt.bytes(rss)} a worker, no sharing (USS not measured).`);
  }
  const side = [];
  if (c.db_connections_used_max !== null && c.db_connections_max !== null) {
    side.push(`at most ${fmt.int(c.db_connections_used_max)} of its ${fmt.int(c.db_connections_max)} pooled database connections were in use at once`);
  }
  const busy = c.loop_busy_max;
  if (busy !== null && busy > 0) {
    side.push(busy >= 0.8
      ? `its event loop was busy up to ${fmt.pct(busy, 0)} of a sample: at more traffic requests queue for the CPU, in either model`
      : `its loop was busy at most ${fmt.pct(busy, 0)} of a sample, so one process takes ~${fixed(1 / busy, 1)}\u00d7 ` +
        "this traffic before its loop is busy all the time (the database permitting)");
  }
  if (side.length) notes.push("Async side: " + side.join("; ") + ".");
  return section("capacity", "Capacity", h("p", { class: "muted", text: "Sync workers (one request at a time each) for this traffic" }),
    h("div", { class: "scroll" }, table), h("div", { class: "prose" }, notes.map((n) => h("p", { text: n }))));
}

function timelineSection(d, colors) {
  const win = d.window;
  const title = d.report.window.title;
  if (!win.rows.length) return { el: section("timeline", "Timeline", h("p", { text: "No requests to draw." })), timeline: null };
  const timeline = new Timeline(win, colors);
  const el = section("timeline", "Timeline",
    h("p", { class: "muted", id: "window-title", text: title }),
    h("div", { class: "toolbar" }, zoomButtons(timeline.view, "timeline"), legend()),
    timeline.el,
    h("p", { class: "hint" }, "Hover or tap a row for its details; Ctrl + wheel or pinch to zoom, drag or Shift + wheel " +
      "to move in time, double-click a row to zoom to it. Keys: + \u2212 \u2190 \u2192 0."));
  return { el, timeline };
}

function seriesSection(d, colors) {
  const made = seriesCharts(d.series, d.report, d.window, colors);
  if (!made) {
    return { el: section("series", "Over the whole recording", h("p", { text:
      "No process samples or stalls in these files: the recording process writes a sample every 0.5 s while requests run." })),
    charts: [] };
  }
  const s = d.series;
  const shown = s.stall_count > s.stalls.length ? ` The ${fmt.count(s.stalls.length, "longest stall")} of ${fmt.int(s.stall_count)} are marked.` : "";
  const el = section("series", "Over the whole recording",
    h("p", { class: "muted", text: "Each process's samples (the most in each stretch of time, the mean for the busy share)." + shown }),
    h("div", { class: "toolbar" }, zoomButtons(made.view, "recording"), made.keys),
    made.charts.map((c) => h("figure", {}, h("figcaption", { text: c.name }), c.el)));
  return { el, charts: made.charts };
}

function main() {
  const d = JSON.parse(document.getElementById("loopwatch-data").textContent);
  const r = d.report;
  document.title = `loopwatch report: ${fmt.count(r.requests, "request")}, ${fmt.time(r.first_start)} UTC`;
  const colors = themeColors();
  const app = document.getElementById("app");
  const tl = timelineSection(d, colors);
  const series = seriesSection(d, colors);
  app.replaceChildren(header(d), ...[diagnosis(r), tl.el, summary(r), series.el, routes(r), loop(r), capacity(r)].filter(Boolean),
    h("footer", {}, `loopwatch ${d.loopwatch}. This page is self-contained: it loads nothing from anywhere.`));
  window.loopwatch = { data: d, fmt, intervals, rowStates, timeline: tl.timeline, charts: series.charts };
  requestAnimationFrame(() => requestAnimationFrame(() => {
    document.documentElement.dataset.ready = String(Math.round(performance.now()));
  }));
}

try {
  main();
} catch (err) {
  const app = document.getElementById("app");
  if (app) app.replaceChildren(h("p", { class: "notes", text: `This report could not be drawn: ${err}` }));
  throw err;
}
