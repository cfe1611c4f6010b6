// Zoom and pan on a time axis, shared by the charts that show one range: Ctrl + wheel
// or a pinch zooms, a horizontal wheel, Shift + wheel or a drag pans, buttons do both.
"use strict";

class TimeView {
  constructor(lo, hi, minSpan) {
    if (!(hi > lo)) hi = lo + minSpan;
    this.full = [lo, hi];
    this.lo = lo;
    this.hi = hi;
    this.minSpan = Math.min(minSpan, hi - lo);
    this.listeners = [];
  }
  onChange(fn) {
    this.listeners.push(fn);
  }
  set(lo, hi) {
    const [a, b] = this.full;
    let span = Math.min(Math.max(hi - lo, this.minSpan), b - a);
    lo = Math.min(Math.max(lo, a), b - span);
    this.lo = lo;
    this.hi = lo + span;
    this.listeners.forEach((fn) => fn());
  }
  zoom(factor, at) {
    // factor < 1 zooms in, around the time `at` (the middle by default)
    if (at === undefined) at = (this.lo + this.hi) / 2;
    this.set(at - (at - this.lo) * factor, at + (this.hi - at) * factor);
  }
  pan(dt) {
    this.set(this.lo + dt, this.hi + dt);
  }
  reset() {
    this.set(...this.full);
  }
  zoomed() {
    return this.lo > this.full[0] || this.hi < this.full[1];
  }
}

// Wire `el` to `view`. `geom()` gives the plot's left edge and width in CSS pixels
// (relative to el); `onTap(x, y, event)` gets a click or tap that did not drag, and
// `onDouble(x, y)` a double click.
function bindZoom(el, view, geom, onTap, onDouble) {
  const timeAt = (x) => {
    const g = geom();
    return view.lo + ((x - g.left) / g.width) * (view.hi - view.lo);
  };
  const local = (e) => {
    const r = el.getBoundingClientRect();
    return [e.clientX - r.left, e.clientY - r.top];
  };
  el.addEventListener("wheel", (e) => {
    const [x] = local(e);
    const g = geom();
    if (e.ctrlKey || e.metaKey) { // a pinch on a touchpad comes as Ctrl + wheel
      e.preventDefault();
      view.zoom(Math.exp(Math.max(-100, Math.min(100, e.deltaY)) * 0.01), timeAt(x));
    } else if (Math.abs(e.deltaX) > Math.abs(e.deltaY) || e.shiftKey) {
      e.preventDefault();
      const d = Math.abs(e.deltaX) > Math.abs(e.deltaY) ? e.deltaX : e.deltaY;
      view.pan((d / g.width) * (view.hi - view.lo));
    }
  }, { passive: false });

  const pointers = new Map();
  let drag = null; // {x, lo, hi, moved}
  let pinch = null; // {d, mid, lo, hi}
  el.addEventListener("pointerdown", (e) => {
    if (e.button !== 0) return;
    pointers.set(e.pointerId, local(e));
    if (pointers.size === 1) {
      drag = { x: local(e)[0], y: local(e)[1], lo: view.lo, hi: view.hi, moved: false };
    } else if (pointers.size === 2) {
      const [p, q] = [...pointers.values()];
      pinch = { d: Math.abs(p[0] - q[0]) || 1, mid: timeAt((p[0] + q[0]) / 2), lo: view.lo, hi: view.hi };
      drag = null;
    }
  });
  const end = (e) => {
    if (!pointers.has(e.pointerId)) return;
    pointers.delete(e.pointerId);
    if (e.type === "pointerup" && drag && !drag.moved && onTap) {
      const [x, y] = local(e);
      onTap(x, y, e);
    }
    if (pointers.size < 2) pinch = null;
    drag = null;
  };
  el.addEventListener("pointerup", end);
  el.addEventListener("pointercancel", end);
  el.addEventListener("pointermove", (e) => {
    if (!pointers.has(e.pointerId)) return;
    pointers.set(e.pointerId, local(e));
    const g = geom();
    if (pinch && pointers.size === 2) {
      const [p, q] = [...pointers.values()];
      const f = pinch.d / (Math.abs(p[0] - q[0]) || 1);
      const mid = pinch.mid;
      view.set(mid - (mid - pinch.lo) * f, mid + (pinch.hi - mid) * f);
    } else if (drag) {
      const [x, y] = local(e);
      if (!drag.moved && Math.abs(x - drag.x) < 4 && Math.abs(y - drag.y) < 4) return;
      if (!drag.moved) el.setPointerCapture(e.pointerId);
      drag.moved = true;
      const dt = ((drag.x - x) / g.width) * (drag.hi - drag.lo);
      view.set(drag.lo + dt, drag.hi + dt);
    }
  });
  if (onDouble) {
    el.addEventListener("dblclick", (e) => {
      const [x, y] = local(e);
      onDouble(x, y);
    });
  }
}

// The buttons under a zoomable chart.
function zoomButtons(view, label) {
  const b = (text, title, fn) => h("button", { type: "button", title, "aria-label": title, onclick: fn }, text);
  const reset = b("Reset", "Show the whole " + label, () => view.reset());
  const update = () => { reset.disabled = !view.zoomed(); };
  view.onChange(update);
  update();
  return h("div", { class: "zoom", role: "group", "aria-label": "Zoom the " + label },
    b("\u2212", "Zoom out", () => view.zoom(2)),
    b("+", "Zoom in", () => view.zoom(0.5)),
    b("\u25c0", "Move back in time", () => view.pan(-(view.hi - view.lo) / 4)),
    b("\u25b6", "Move forward in time", () => view.pan((view.hi - view.lo) / 4)),
    reset);
}

// Tick positions at a 1-2-5 step (times `base`), the smallest whose labels, `labelW`
// pixels wide at most, keep 16 px apart over `width` pixels.
function niceTicks(lo, hi, width, labelW, steps) {
  const span = hi - lo;
  let step = steps ? steps.find((s) => (s / span) * width >= labelW + 16) : undefined;
  if (step === undefined) {
    step = Math.pow(10, Math.floor(Math.log10(span / Math.max(1, width / (labelW + 16)))));
    for (const m of [1, 2, 5, 10]) {
      if ((m * step / span) * width >= labelW + 16) { step *= m; break; }
    }
  }
  const out = [];
  for (let k = Math.ceil(lo / step - 1e-9); k * step <= hi + step * 1e-9; k++) out.push(k * step);
  return { step, ticks: out };
}

// A label for a time `ms` after the window's start at a tick step of `step` ms: the unit
// follows the step as in the terminal's axis (µs, ms, s), decimals only when zoomed in
// so far that the step needs them.
function msLabel(ms, step) {
  let unit = "ms", scale = 1;
  if (step < 1 && Math.abs(ms) < 1000) { unit = "\u00b5s"; scale = 1000; }
  else if (step >= 1000 || Math.abs(ms) >= 10000) { unit = "s"; scale = 1 / 1000; }
  const s = step * scale;
  const d = s >= 1 ? 0 : Math.min(6, Math.ceil(-Math.log10(s) - 1e-9));
  return fixed(ms * scale, d) + unit;
}

// Clock ticks for Unix seconds: steps from a millisecond to a day.
const CLOCK_STEPS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30,
  60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400];

function clockLabel(t, step) {
  const full = fmt.time(t, step < 1);
  if (step >= 86400) return full.slice(0, 10);
  const clock = full.slice(11);
  if (step < 1) return clock.slice(3, 9 + (step >= 0.1 ? 1 : step >= 0.01 ? 2 : 3)); // MM:SS.f
  return step >= 60 ? clock.slice(0, 5) : clock;
}
