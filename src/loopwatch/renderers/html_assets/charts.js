// Time series over the whole recording (report.series: each process's samples, the
// longest stalls), drawn as line charts on one shared, zoomable clock axis.
"use strict";

const PROCESS_COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#9c755f",
  "#ff9da7", "#bab0ac", "#edc948", "#e15759"];

class SeriesChart {
  // lines: [{label, color, dash, t: [...], v: [... or null]}]; marks: [{t, v, color, info}]
  constructor({ name, view, lines, marks = [], band = null, yFmt, yMax = null, colors }) {
    this.name = name;
    this.view = view;
    this.lines = lines;
    this.marks = marks;
    this.band = band;
    this.yFmt = yFmt;
    this.yMax = yMax;
    this.colors = colors;
    this.height = 150;
    this.canvas = h("canvas", { "aria-hidden": "true" });
    this.el = h("div", { class: "chart", tabindex: "0", role: "img", "aria-label": name }, this.canvas);
    this.cursor = null;
    this.pending = false;
    view.onChange(() => this.draw());
    bindZoom(this.el, view, () => this.geom(),
      (x, y, e) => { if (e.pointerType !== "mouse") this.hover(x, y, e.clientX, e.clientY); });
    this.el.addEventListener("pointermove", (e) => {
      if (e.pointerType !== "mouse" || e.buttons) return;
      const r = this.el.getBoundingClientRect();
      this.hover(e.clientX - r.left, e.clientY - r.top, e.clientX, e.clientY);
    });
    this.el.addEventListener("pointerleave", (e) => {
      if (e.pointerType !== "mouse") return; // (a touch "leaves" as it ends)
      this.cursor = null;
      this.draw();
      tip.hide();
    });
    new ResizeObserver(() => this.draw()).observe(this.el);
  }

  geom() {
    const width = this.el.clientWidth;
    return { left: 58, top: 8, width: Math.max(20, width - 58 - 10), height: this.height - 8 - 22 };
  }

  x(t) {
    const g = this.geom();
    return g.left + ((t - this.view.lo) / (this.view.hi - this.view.lo)) * g.width;
  }

  // The first and last index of a sorted `t` to draw: one past the view either side.
  range(t) {
    const { lo, hi } = this.view;
    let a = lowerBound(t, lo) - 1, b = lowerBound(t, hi);
    return [Math.max(0, a), Math.min(t.length - 1, b)];
  }

  top() {
    if (this.yMax !== null) return this.yMax;
    let top = 0;
    for (const line of this.lines) {
      const [a, b] = this.range(line.t);
      for (let i = a; i <= b; i++) if (line.v[i] !== null && line.v[i] > top) top = line.v[i];
    }
    for (const m of this.marks) if (m.t >= this.view.lo && m.t <= this.view.hi && m.v > top) top = m.v;
    return top > 0 ? top * 1.08 : 1;
  }

  draw() {
    drawSoon(this);
  }

  paint() {
    const width = this.el.clientWidth;
    if (!width) return;
    const ctx = fitCanvas(this.canvas, width, this.height);
    const g = this.geom();
    const c = this.colors;
    const { lo, hi } = this.view;
    ctx.clearRect(0, 0, width, this.height);
    ctx.font = "11px system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif";
    const top = this.top();
    this.yTop = top;
    const y = (v) => g.top + g.height - (v / top) * g.height;

    if (this.band) {
      const a = Math.max(this.x(this.band[0]), g.left), b = Math.min(this.x(this.band[1]), g.left + g.width);
      if (b > a - 2) {
        ctx.fillStyle = c.band;
        ctx.fillRect(a, g.top, Math.max(2, b - a), g.height);
      }
    }
    // The value axis.
    ctx.textBaseline = "middle";
    ctx.textAlign = "right";
    const yt = niceTicks(0, top, g.height, 14);
    for (const v of yt.ticks) {
      const py = Math.round(y(v)) + 0.5;
      ctx.fillStyle = c.grid;
      ctx.fillRect(g.left, py, g.width, 1);
      ctx.fillStyle = c.muted;
      ctx.fillText(this.yFmt(v, yt.step), g.left - 6, py);
    }
    // The clock axis.
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const sample = ctx.measureText("00:00:00.000").width;
    const xt = niceTicks(lo, hi, g.width, sample, CLOCK_STEPS);
    this.ticks = xt.ticks.map((t) => clockLabel(t, xt.step));
    xt.ticks.forEach((t, k) => {
      const px = this.x(t);
      ctx.fillStyle = c.grid;
      ctx.fillRect(Math.round(px), g.top + g.height, 1, 4);
      ctx.fillStyle = c.muted;
      ctx.fillText(this.ticks[k], Math.min(Math.max(px, g.left + 20), width - 24), g.top + g.height + 6);
    });
    this.el.dataset.ticks = this.ticks.join(" ");

    ctx.save();
    ctx.beginPath();
    ctx.rect(g.left, g.top - 4, g.width, g.height + 4);
    ctx.clip();
    ctx.lineWidth = 1.5;
    ctx.lineJoin = "round";
    for (const line of this.lines) {
      const [a, b] = this.range(line.t);
      ctx.strokeStyle = line.color;
      ctx.setLineDash(line.dash ? [5, 3] : []);
      ctx.beginPath();
      // A value with no neighbour to join (one sample, or unknowns either side: the
      // first busy share of each process) is drawn as a dot.
      const dots = [];
      let run = 0, first = null;
      for (let i = a; i <= b; i++) {
        const v = line.v[i];
        if (v === null) { if (run === 1) dots.push(first); run = 0; continue; }
        const px = this.x(line.t[i]), py = y(v);
        if (run) ctx.lineTo(px, py);
        else { ctx.moveTo(px, py); first = [px, py]; }
        run++;
      }
      if (run === 1) dots.push(first);
      ctx.stroke();
      ctx.fillStyle = line.color;
      for (const [px, py] of dots) ctx.fillRect(px - 2, py - 2, 4, 4);
    }
    ctx.setLineDash([]);
    for (const m of this.marks) {
      if (m.t < lo || m.t > hi) continue;
      const px = this.x(m.t), py = y(m.v);
      ctx.fillStyle = m.color;
      ctx.strokeStyle = c.bg;
      ctx.beginPath();
      ctx.moveTo(px, py - 5);
      ctx.lineTo(px + 5, py);
      ctx.lineTo(px, py + 5);
      ctx.lineTo(px - 5, py);
      ctx.closePath();
      ctx.fill();
      ctx.stroke();
    }
    ctx.restore();
    if (this.cursor !== null) {
      ctx.fillStyle = c.cursor;
      ctx.fillRect(Math.round(this.cursor), g.top, 1, g.height);
    }
  }

  hover(x, yy, cx, cy) {
    const g = this.geom();
    if (x < g.left || x > g.left + g.width) { this.cursor = null; this.draw(); tip.hide(); return; }
    this.cursor = x;
    this.draw();
    const t = this.view.lo + ((x - g.left) / g.width) * (this.view.hi - this.view.lo);
    const top = this.yTop || 1;
    let near = null, best = 64; // a mark within 8 px
    for (const m of this.marks) {
      const dx = this.x(m.t) - x, dy = g.top + g.height - (m.v / top) * g.height - yy;
      if (dx * dx + dy * dy < best) { best = dx * dx + dy * dy; near = m; }
    }
    if (near) { tip.show(cx, cy, near.info()); return; }
    const lines = [h("div", { class: "tip-head" }, `${this.name} at ${fmt.time(t, true)} UTC`)];
    for (const line of this.lines) {
      if (!line.t.length) continue;
      let i = lowerBound(line.t, t);
      if (i >= line.t.length || (i > 0 && t - line.t[i - 1] < line.t[i] - t)) i -= 1;
      const v = line.v[i];
      lines.push(h("div", { class: "kv" }, h("span", { class: "key" }, h("i", { class: "sw", style: null }), line.label),
        h("span", { text: v === null ? "not measured" : this.yFmt(v) })));
      lines[lines.length - 1].querySelector("i").style.background = line.color;
    }
    tip.show(cx, cy, lines);
  }
}

function lowerBound(arr, x) {
  let lo = 0, hi = arr.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (arr[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// The charts of the "Over the whole recording" section; null when there is nothing to draw.
function seriesCharts(series, report, win, colors) {
  const procs = series ? series.processes : [];
  const stalls = series ? series.stalls : [];
  if (!procs.length && !stalls.length) return null;
  let lo = report.first_start, hi = report.last_end;
  for (const p of procs) if (p.time.length) { lo = Math.min(lo, p.time[0]); hi = Math.max(hi, p.time[p.time.length - 1]); }
  for (const s of stalls) { lo = Math.min(lo, s.time); hi = Math.max(hi, s.time + s.duration_ms / 1000); }
  const view = new TimeView(lo, hi > lo ? hi : lo + 1, 0.01);
  let band = null;
  if (win.rows.length) {
    let end = 0;
    for (const r of win.rows) end = Math.max(end, r[R.off] + Math.max(r[R.wall], 0));
    band = [win.t0, win.t0 + end / 1000];
  }
  const color = (k) => PROCESS_COLORS[k % PROCESS_COLORS.length];
  const lines = (key, opts = {}) => procs.map((p, k) => ({
    label: `pid ${p.pid}${opts.suffix || ""}`, color: color(k), dash: opts.dash, t: p.time,
    v: opts.scale ? p[key].map((v) => (v === null ? null : v * opts.scale)) : p[key],
  }));
  const common = { view, band, colors };
  const ms = (v, step) => (step !== undefined && v === 0 ? "0" : fmt.ms(v));
  const charts = [
    new SeriesChart({ ...common, name: "Requests in flight", lines: lines("in_flight"),
      yFmt: (v, step) => (step !== undefined && step < 1 ? fixed(v, 1) : fmt.int(Math.round(v))) }),
    new SeriesChart({ ...common, name: "Loop busy (share of wall time on the CPU)", lines: lines("loop_busy", { scale: 100 }),
      yFmt: (v) => fixed(v, v < 10 && v % 1 ? 1 : 0) + "%", yMax: 100 }),
    new SeriesChart({ ...common, name: "Loop lag (lines) and stalls (marks)", lines: lines("loop_lag_ms"), yFmt: ms,
      marks: stalls.map((s) => ({ t: s.time, v: s.duration_ms, color: colors.states[s.cause === "cpu" ? CPU : LOOP],
        info: () => stallInfo(s) })) }),
    new SeriesChart({ ...common, name: "Memory: RSS (solid) and USS (dashed)",
      lines: [...lines("rss_bytes", { suffix: " RSS" }), ...lines("uss_bytes", { suffix: " USS", dash: true })],
      yFmt: (v, step) => (v === 0 ? "0" : fmt.bytes(v)) }),
  ];
  const keys = h("ul", { class: "legend" }, procs.map((p, k) => {
    const sw = h("i", { class: "sw" });
    sw.style.background = color(k);
    return h("li", {}, sw, `pid ${p.pid} (${fmt.count(p.samples, "sample")})`);
  }));
  if (stalls.length) {
    keys.append(h("li", {}, h("i", { class: "sw s0 mark" }), "stall, computing"),
      h("li", {}, h("i", { class: "sw s1 mark" }), "stall, blocked"));
  }
  if (band) {
    keys.append(h("li", {}, h("i", { class: "sw band" }), "the timeline's window"));
  }
  return { view, charts, keys };
}

function stallInfo(s) {
  const kv = (k, v) => h("div", { class: "kv" }, h("span", { class: "key", text: k }), h("span", { text: v }));
  return [
    h("div", { class: "tip-head" }, `Stall: ${fmt.ms(s.duration_ms)}, ${s.cause === "cpu" ? "computing" : "blocked, not computing"}`),
    kv("at", `${fmt.time(s.time, true)} UTC`),
    kv("CPU", fmt.ms(s.cpu_ms)),
    kv("process", `pid ${s.pid}`),
    kv("route", s.route === null ? "no request" : s.route),
    kv("where", s.where === null ? "unknown location (no stack taken)" : s.where),
  ];
}
