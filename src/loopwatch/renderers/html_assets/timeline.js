// The timeline: one row per request of the window on a shared time axis, in the states
// and colours of the terminal's (docs/timeline.md), one state per pixel column as the
// terminal has one per character column. Only the rows in view are drawn.
"use strict";

const CPU = 0, LOOP = 1, POOL = 2, DB = 3, OTHER = 4, IDLE = 5;
const STATE_NAMES = ["cpu", "loop", "pool", "db", "other"];
const LEGEND = [
  [CPU, "CPU on the event loop"],
  [DB, "awaiting the database"],
  [POOL, "waiting for a pool connection"],
  [LOOP, "waiting for the event loop"],
  [OTHER, "other waiting"],
];
// The fields of a window row, in order (html.py writes them).
const R = { off: 0, wall: 1, cpu: 2, db: 3, pool: 4, loop: 5, status: 6, method: 7, route: 8,
  path: 9, error: 10, pid: 11, id: 12, segs: 13, dropped: 14, blocked: 15, queries: 16, stmts: 17,
  coarse: 18 };

// Disjoint (state, start, end) intervals covering [0, wall], overlaps resolved by the
// precedence cpu > loop > pool > db > other; and the CPU segments clipped to the
// request. The same as timeline._intervals in Python.
function intervals(segs, wall) {
  const events = [], cpu = [];
  for (let i = 0; i < segs.length; i += 3) {
    const k = segs[i];
    let a = segs[i + 1], b = segs[i + 2];
    if (!(a <= wall)) continue;
    if (a < 0) a = 0;
    if (b > wall) b = wall;
    if (k === CPU && b >= a) cpu.push(a, b);
    if (b > a) events.push([a, k, 1], [b, k, -1]);
  }
  events.sort((x, y) => x[0] - y[0] || x[1] - y[1] || x[2] - y[2]);
  const out = [], counts = [0, 0, 0, 0];
  let pos = 0, last = -1;
  for (const [t, k, d] of events) {
    if (t > pos) {
      const top = counts[CPU] ? CPU : counts[LOOP] ? LOOP : counts[POOL] ? POOL : counts[DB] ? DB : OTHER;
      if (top === last) out[out.length - 1][2] = t;
      else out.push([top, pos, t]);
      pos = t;
      last = top;
    }
    counts[k] += d;
  }
  if (wall > pos) out.push([OTHER, pos, wall]);
  return { out, cpu };
}

// The state of each of `n` columns over `span` ms for a request starting `offset` ms
// into it: timeline._row_states in Python. `acc` is scratch space of 5 * n.
function rowStates(iv, wall, offset, span, n, acc, states) {
  const col = span / n;
  states.fill(IDLE);
  const [lo, hi] = cols(offset, offset + wall, col, n);
  if (lo < 0) return states;
  acc.fill(0, 0, 5 * n);
  for (const [k, a0, b0] of iv.out) {
    let a = a0 + offset, b = b0 + offset;
    if (a < 0) a = 0;
    if (b > span) b = span;
    if (b <= a) continue;
    const base = k * n;
    let c0 = Math.floor(a / col), c1 = Math.floor(b / col);
    if (c1 >= n) { c1 = n - 1; c0 = Math.min(c0, c1); }
    if (c0 === c1) { acc[base + c0] += b - a; continue; }
    acc[base + c0] += (c0 + 1) * col - a;
    for (let c = c0 + 1; c < c1; c++) acc[base + c] += col;
    acc[base + c1] += b - c1 * col;
  }
  for (let c = lo; c <= hi; c++) {
    let best = acc[c], s = CPU, sum = acc[c];
    for (let k = 1; k < 5; k++) {
      const v = acc[k * n + c];
      sum += v;
      if (v > best) { best = v; s = k; }
    }
    if (col - sum > best) s = IDLE;
    states[c] = s;
  }
  // A step shorter than a column still shows: short CPU is what a timeline is for.
  const cpu = iv.cpu;
  for (let i = 0; i < cpu.length; i += 2) {
    const a = cpu[i], b = cpu[i + 1];
    let mid = Math.floor((offset + (a + b) / 2) / col);
    mid = mid < 0 ? 0 : mid >= n ? n - 1 : mid;
    if (states[mid] !== CPU) {
      const [c0, c1] = cols(offset + a, offset + b, col, n);
      if (c0 >= 0 && !states.subarray(c0, c1 + 1).includes(CPU)) states[mid] = CPU;
    }
  }
  // So does a request shorter than a column, in the state it spent most time in.
  if (states.subarray(lo, hi + 1).every((s) => s === IDLE)) {
    const totals = [0, 0, 0, 0, 0];
    for (let k = 0; k < 5; k++) for (let c = lo; c <= hi; c++) totals[k] += acc[k * n + c];
    let state = OTHER, best = 0;
    totals.forEach((v, k) => { if (v > best) { best = v; state = k; } });
    states[colOf(offset + wall / 2, col, n)] = state;
  }
  return states;
}

function colOf(t, col, n) {
  return Math.min(Math.max(Math.floor(t / col), 0), n - 1);
}

function cols(a, b, col, n) {
  if (b < 0 || a > col * n) return [-1, -1];
  const c0 = colOf(a, col, n);
  let c1 = colOf(b, col, n);
  if (b > a && c1 > c0 && c1 * col >= b) c1 -= 1;
  return [c0, c1];
}

class Timeline {
  constructor(win, colors) {
    this.rows = win.rows;
    this.t0 = win.t0;
    this.colors = colors;
    this.iv = this.rows.map((r) => intervals(r[R.segs], Math.max(r[R.wall], 0)));
    let end = 0;
    for (const r of this.rows) end = Math.max(end, r[R.off] + Math.max(r[R.wall], 0));
    this.view = new TimeView(0, end > 0 ? end : 1, 0.005);
    this.hover = -1;
    this.cursorX = null;
    this.labels = new Map();
    this.rowH = 18;
    this.axisH = 24;
    this.canvas = h("canvas", { class: "tl-canvas", "aria-hidden": "true" });
    this.spacer = h("div", { class: "tl-spacer" });
    this.scroller = h("div", { class: "tl-scroll" }, this.spacer);
    this.box = h("div", {
      class: "tl-box", tabindex: "0", role: "img",
      "aria-label": `Timeline of ${fmt.count(this.rows.length, "request")}: hover or tap a row for its details`,
    }, this.canvas, this.scroller);
    this.el = h("div", { class: "timeline" }, this.box);
    this.pending = false;
    this.view.onChange(() => this.draw());
    this.scroller.addEventListener("scroll", () => this.draw(), { passive: true });
    bindZoom(this.box, this.view, () => this.geom(),
      (x, y, e) => { if (e.pointerType !== "mouse") this.showTip(x, y, e.clientX, e.clientY); },
      (x, y) => this.zoomToRow(this.rowAt(y)));
    this.box.addEventListener("pointermove", (e) => {
      if (e.pointerType !== "mouse" || e.buttons) return;
      const r = this.box.getBoundingClientRect();
      this.showTip(e.clientX - r.left, e.clientY - r.top, e.clientX, e.clientY);
    });
    // (a touch also "leaves" as it ends: the details it asked for stay)
    this.box.addEventListener("pointerleave", (e) => { if (e.pointerType === "mouse") this.clearHover(); });
    this.box.addEventListener("keydown", (e) => this.key(e));
    new ResizeObserver(() => this.layout()).observe(this.el);
  }

  geom() {
    const width = this.el.clientWidth;
    const label = Math.round(Math.min(300, Math.max(96, width * 0.28)));
    return { left: label + 8, width: Math.max(20, width - label - 8 - 16) };
  }

  layout() {
    const width = this.el.clientWidth;
    if (!width) return;
    this.rowH = width < 600 ? 16 : 18;
    const content = this.rows.length * this.rowH;
    const height = Math.min(content, Math.max(240, Math.min(window.innerHeight * 0.7, 760)));
    this.height = this.axisH + height;
    this.box.style.height = this.height + "px";
    this.scroller.style.top = this.axisH + "px";
    this.spacer.style.height = content + "px";
    if (this.labelW !== this.geom().left) this.labels.clear();
    this.labelW = this.geom().left;
    this.draw();
  }

  rowAt(y) {
    const i = Math.floor((y - this.axisH + this.scroller.scrollTop) / this.rowH);
    return y >= this.axisH && i >= 0 && i < this.rows.length ? i : -1;
  }

  draw() {
    drawSoon(this);
  }

  paint() {
    const width = this.el.clientWidth;
    if (!width || !this.height) return;
    const ctx = fitCanvas(this.canvas, width, this.height);
    const g = this.geom();
    const c = this.colors;
    const { lo, hi } = this.view;
    const span = hi - lo;
    ctx.clearRect(0, 0, width, this.height);
    ctx.font = "12px system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif";
    ctx.textBaseline = "middle";

    // Rows in view.
    const top = this.scroller.scrollTop;
    const first = Math.max(0, Math.floor(top / this.rowH));
    const last = Math.min(this.rows.length - 1, Math.ceil((top + this.height - this.axisH) / this.rowH));
    const n = Math.max(1, Math.floor(g.width));
    if (!this.acc || this.acc.length < 5 * n) this.acc = new Float64Array(5 * n);
    const states = new Uint8Array(n);
    const colW = g.width / n;
    ctx.save();
    ctx.beginPath();
    ctx.rect(0, this.axisH, width, this.height - this.axisH);
    ctx.clip();
    for (let i = first; i <= last; i++) {
      const r = this.rows[i];
      const y = this.axisH + i * this.rowH - top;
      if (i === this.hover) {
        ctx.fillStyle = c.hover;
        ctx.fillRect(0, y, width, this.rowH);
      }
      this.drawLabel(ctx, i, y, g.left - 8);
      rowStates(this.iv[i], Math.max(r[R.wall], 0), r[R.off] - lo, span, n, this.acc, states);
      let c0 = 0;
      for (let col = 1; col <= n; col++) {
        if (col < n && states[col] === states[c0]) continue;
        const s = states[c0];
        if (s !== IDLE) {
          const x = g.left + c0 * colW, w = (col - c0) * colW;
          ctx.fillStyle = c.states[s];
          if (s === OTHER) ctx.fillRect(x, y + this.rowH / 2 - 1, w, 2);
          else ctx.fillRect(x, y + 3, w, this.rowH - 6);
        }
        c0 = col;
      }
    }
    ctx.restore();

    // The axis, over the rows.
    ctx.fillStyle = c.bg;
    ctx.fillRect(0, 0, width, this.axisH);
    ctx.strokeStyle = c.grid;
    ctx.beginPath();
    ctx.moveTo(0, this.axisH - 0.5);
    ctx.lineTo(width, this.axisH - 0.5);
    ctx.stroke();
    ctx.fillStyle = c.muted;
    ctx.textAlign = "left";
    ctx.fillText("time \u2500\u2500\u25b6", 4, this.axisH / 2);
    // Labels start at their tick, as the terminal's; the widest one sets the spacing.
    let labelW = Math.max(36, ctx.measureText(msLabel(hi, span / 8)).width);
    let axis = niceTicks(lo, hi, g.width, labelW);
    const widest = Math.max(...axis.ticks.map((t) => ctx.measureText(msLabel(t, axis.step)).width));
    if (widest > labelW) axis = niceTicks(lo, hi, g.width, widest);
    this.ticks = [];
    ctx.textAlign = "left";
    for (const t of axis.ticks) {
      const x = g.left + ((t - lo) / span) * g.width;
      const text = msLabel(t, axis.step);
      ctx.fillStyle = c.grid;
      ctx.fillRect(Math.round(x), this.axisH - 6, 1, 6);
      if (x + 2 + ctx.measureText(text).width > width) continue;
      ctx.fillStyle = c.muted;
      ctx.fillText(text, x + 2, this.axisH / 2 - 2);
      this.ticks.push(text);
    }
    if (this.cursorX !== null) {
      ctx.fillStyle = c.cursor;
      ctx.fillRect(Math.round(this.cursorX), 0, 1, this.height);
      // Where the cursor is, in the axis: time after the window's start.
      const text = fmt.ms(Math.max(0, lo + ((this.cursorX - g.left) / g.width) * span));
      const w = ctx.measureText(text).width + 8;
      const x = Math.min(Math.max(this.cursorX - w / 2, g.left), width - w);
      ctx.fillStyle = c.text;
      ctx.fillRect(x, 2, w, this.axisH - 6);
      ctx.fillStyle = c.bg;
      ctx.textAlign = "left";
      ctx.fillText(text, x + 4, this.axisH / 2 - 2);
    }
    this.box.dataset.ticks = this.ticks.join(" ");
  }

  drawLabel(ctx, i, y, room) {
    let label = this.labels.get(i);
    if (!label) {
      const r = this.rows[i];
      const where = r[R.route] === null ? r[R.path] : r[R.route];
      const outcome = r[R.status] === null ? (r[R.error] || "-") : String(r[R.status]);
      if (room < 170) { // a phone: the route alone (the rest is in the details)
        label = { wall: "", text: clip(ctx, where, room - 6) };
      } else {
        const wall = fmt.ms(r[R.wall]);
        const text = `${r[R.method]} ${where} ${outcome}`;
        label = { wall, text: clip(ctx, text, room - ctx.measureText(wall).width - 10) };
      }
      this.labels.set(i, label);
    }
    ctx.fillStyle = this.colors.text;
    ctx.textAlign = "left";
    ctx.fillText(label.text, 4, y + this.rowH / 2);
    ctx.fillStyle = this.colors.muted;
    ctx.textAlign = "right";
    ctx.fillText(label.wall, room, y + this.rowH / 2);
  }

  clearHover() {
    if (this.hover !== -1 || this.cursorX !== null) {
      this.hover = -1;
      this.cursorX = null;
      this.draw();
    }
    tip.hide();
  }

  showTip(x, y, cx, cy) {
    const i = this.rowAt(y);
    const g = this.geom();
    this.cursorX = x >= g.left && x <= g.left + g.width ? x : null;
    if (i !== this.hover) this.hover = i;
    this.draw();
    if (i < 0) { tip.hide(); return; }
    tip.show(cx, cy, this.details(i));
  }

  details(i) {
    const r = this.rows[i];
    const where = r[R.route] === null ? r[R.path] : r[R.route];
    const outcome = r[R.status] === null ? (r[R.error] || "no response") : String(r[R.status]);
    const lines = [
      h("div", { class: "tip-head" }, `${r[R.method]} ${where} \u2192 ${outcome}`),
    ];
    if (r[R.route] !== null) lines.push(h("div", { class: "tip-path" }, r[R.path]));
    const kv = (k, v, state) => h("div", { class: "kv" },
      h("span", { class: "key" }, state === undefined ? null : h("i", { class: "sw s" + state }), k), h("span", { text: v }));
    const queries = r[R.queries] ? ` (${fmt.count(r[R.queries], "query")}` +
      (r[R.stmts] === null ? ")" : `, ${fmt.count(r[R.stmts], "statement")})`) : "";
    lines.push(
      kv("wall", fmt.ms(r[R.wall])),
      kv("CPU on loop", fmt.ms(r[R.cpu]), CPU),
      kv("awaited DB", fmt.ms(r[R.db]) + queries, DB),
      kv("pool wait", fmt.ms(r[R.pool]), POOL),
      kv("loop wait", fmt.ms(r[R.loop]), LOOP),
      kv("started", `${fmt.time(this.t0 + r[R.off] / 1000, true)} UTC (+${fmt.ms(r[R.off])})`),
      kv("process", `pid ${r[R.pid]}, request ${r[R.id]}`),
    );
    if (r[R.status] !== null && r[R.error]) lines.push(kv("error", r[R.error]));
    const b = r[R.blocked];
    if (b) {
      const who = b[2] === null ? "work outside any request" : `${b[1] || ""} ${b[2]}`.trim();
      lines.push(kv("waited behind", `${who}: ${fmt.ms(b[3])} (its step's CPU ${fmt.ms(b[4])})`));
    }
    const segs = r[R.segs];
    const count = segs.length / 3;
    if (count) {
      const list = h("div", { class: "segs" });
      const shown = Math.min(count, 12);
      for (let k = 0; k < shown; k++) {
        const s = segs[3 * k], a = segs[3 * k + 1], e = segs[3 * k + 2];
        list.append(h("div", {}, h("i", { class: "sw s" + s }),
          `${STATE_NAMES[s]} ${fmt.ms(a)} \u2013 ${fmt.ms(e)} (${fmt.ms(e - a)})`));
      }
      if (count > shown) list.append(h("div", { text: `\u2026 and ${fmt.count(count - shown, "more segment")}` }));
      if (r[R.dropped]) list.append(h("div", { text: `${fmt.count(r[R.dropped], "segment")} not recorded (too many)` }));
      const head = r[R.coarse]
        ? `its timeline in ${r[R.coarse]} columns (too many segments to carry them all)`
        : "segments (from its start)";
      lines.push(h("div", { class: "key" }, head), list);
    }
    lines.push(h("div", { class: "hint" }, "Double-click (double-tap) to zoom to this request"));
    return lines;
  }

  zoomToRow(i) {
    if (i < 0) return;
    const r = this.rows[i];
    const wall = Math.max(r[R.wall], 0.005);
    this.view.set(r[R.off] - wall * 0.05, r[R.off] + wall * 1.05);
  }

  key(e) {
    const span = this.view.hi - this.view.lo;
    const acts = {
      "+": () => this.view.zoom(0.5), "=": () => this.view.zoom(0.5), "-": () => this.view.zoom(2),
      ArrowLeft: () => this.view.pan(-span / 4), ArrowRight: () => this.view.pan(span / 4),
      "0": () => this.view.reset(), Escape: () => this.clearHover(),
    };
    const act = acts[e.key];
    if (act) { e.preventDefault(); act(); }
  }
}

// `text` cut with an ellipsis to at most `room` pixels.
function clip(ctx, text, room) {
  if (room <= 0) return "";
  if (ctx.measureText(text).width <= room) return text;
  let lo = 0, hi = text.length;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (ctx.measureText(text.slice(0, mid) + "\u2026").width <= room) lo = mid;
    else hi = mid - 1;
  }
  return text.slice(0, lo) + "\u2026";
}

function legend() {
  return h("ul", { class: "legend" }, LEGEND.map(([s, text]) => h("li", {}, h("i", { class: "sw s" + s }), text)));
}
