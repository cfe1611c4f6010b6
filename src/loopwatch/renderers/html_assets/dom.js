// Building the page: elements and text nodes only. Record content (routes, paths, stall
// locations, errors) is untrusted and only ever becomes text, never markup.
"use strict";

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// A sentence of the diagnosis: `code` spans as <code>, the rest as text.
function prose(text) {
  const p = h("p");
  text.split(/(`[^`]+`)/).forEach((part) => {
    if (part.length > 2 && part.startsWith("`") && part.endsWith("`")) {
      p.append(h("code", { text: part.slice(1, -1) }));
    } else if (part) {
      p.append(document.createTextNode(part));
    }
  });
  return p;
}

function section(id, title, ...children) {
  return h("section", { id, "aria-labelledby": id + "-h" }, h("h2", { id: id + "-h", text: title }), ...children);
}

// Colours come from the style sheet's custom properties, so the canvas follows its theme.
function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

// A canvas sized for its box and the screen's pixel density; returns its 2D context.
// Paint ``view`` (its paint()) at the next frame, once however often this is called.
function drawSoon(view) {
  if (view.pending) return;
  view.pending = true;
  requestAnimationFrame(() => {
    view.pending = false;
    view.paint();
  });
}

function fitCanvas(canvas, width, height) {
  const ratio = window.devicePixelRatio || 1;
  const w = Math.max(1, Math.round(width * ratio));
  const hh = Math.max(1, Math.round(height * ratio));
  if (canvas.width !== w || canvas.height !== hh) {
    canvas.width = w;
    canvas.height = hh;
  }
  canvas.style.width = width + "px";
  canvas.style.height = height + "px";
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  return ctx;
}

// The floating box of details shown on hover (or a tap), kept inside the window.
const tip = {
  el: null,
  show(x, y, lines) {
    if (!this.el) {
      this.el = h("div", { class: "tip", role: "tooltip", id: "tip" });
      document.body.append(this.el);
    }
    const el = this.el;
    el.replaceChildren(...lines.map((l) => (l instanceof Node ? l : h("div", { text: l }))));
    el.hidden = false;
    const pad = 12, vw = document.documentElement.clientWidth, vh = window.innerHeight;
    const r = el.getBoundingClientRect();
    let left = x + pad, top = y + pad;
    if (left + r.width > vw - 4) left = Math.max(4, x - pad - r.width);
    if (top + r.height > vh - 4) top = Math.max(4, y - pad - r.height);
    el.style.left = left + window.scrollX + "px";
    el.style.top = top + window.scrollY + "px";
  },
  hide() {
    if (this.el) this.el.hidden = true;
  },
};

// A tap anywhere but on a chart puts the details away (a mouse does it by leaving).
document.addEventListener("pointerdown", (e) => {
  if (!(e.target instanceof Element && e.target.closest(".tl-box, .chart, .dist-g"))) tip.hide();
});
