// Formatting: the same text as the terminal report's (loopwatch/renderers/text.py), from
// the figures of `loopwatch report --json`. Nothing here computes a figure of its own.
"use strict";

// x with d decimals, as Python's format(x, ".{d}f") writes it: an exact tie (the double
// is exactly halfway) goes to the even digit, where toFixed() would round it up.
function fixed(x, d) {
  const out = x.toFixed(d);
  const a = Math.abs(x);
  if (!(a < 1e21)) return out;
  const exact = a.toFixed(100); // every digit of the double (it has fewer than 100 here)
  const dot = exact.indexOf(".");
  const tail = exact.slice(dot + 1 + d);
  if (!/^50*$/.test(tail)) return out;
  const kept = exact.slice(0, d ? dot + 1 + d : dot);
  if ((kept.charCodeAt(kept.length - 1) - 48) % 2) return out; // odd: up is even
  return (x < 0 ? "-" : "") + kept;
}

// Python's round(): ties to even.
function roundEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 ? 2 * Math.round(x / 2) : r;
}

function grouped(text) {
  const [whole, frac] = text.split(".");
  const g = whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  return frac === undefined ? g : g + "." + frac;
}

const fmt = {
  fixed,
  ms(ms) {
    if (ms < 1) return fixed(ms * 1000, 0) + "\u00b5s";
    if (ms < 10) return fixed(ms, 2) + "ms";
    if (ms < 1000) return fixed(ms, 1) + "ms";
    return fixed(ms / 1000, 2) + "s";
  },
  bytes(n) {
    for (const [unit, size] of [["GB", 1e9], ["MB", 1e6], ["kB", 1e3]]) {
      if (n >= size) {
        const v = n / size;
        return (v < 10 ? fixed(v, 1) : fixed(v, 0)) + " " + unit;
      }
    }
    return fixed(n, 0) + " B";
  },
  int(n) {
    return grouped(String(n)); // Python's f"{n:,}"
  },
  num(x, d) {
    return grouped(fixed(x, d)); // f"{x:,.{d}f}"
  },
  pct(share, d) {
    return fixed(share * 100, d) + "%"; // f"{share:.{d}%}"
  },
  count(n, noun) {
    const plural = noun + (noun.endsWith("s") ? "es" : "s");
    return `${grouped(String(n))} ${n === 1 ? noun : plural}`;
  },
  // Unix seconds as UTC: 2026-11-24 20:41:03(.512), as text.fmt_time (microseconds
  // rounded first, as datetime does, then cut to milliseconds).
  time(t, withMs) {
    const us = roundEven(t * 1e6);
    const s = Math.floor(us / 1e6);
    const d = new Date(s * 1000);
    if (Number.isNaN(d.getTime())) return `${fixed(t, 0)} (Unix s)`;
    const p = (v, n) => String(v).padStart(n, "0");
    const text = `${p(d.getUTCFullYear(), 4)}-${p(d.getUTCMonth() + 1, 2)}-${p(d.getUTCDate(), 2)} ` +
      `${p(d.getUTCHours(), 2)}:${p(d.getUTCMinutes(), 2)}:${p(d.getUTCSeconds(), 2)}`;
    return withMs ? `${text}.${p(Math.floor((us - s * 1e6) / 1000), 3)}` : text;
  },
  span(seconds) {
    if (seconds < 60) return fmt.ms(seconds * 1000);
    let minutes = Math.floor(roundEven(seconds) / 60);
    const secs = roundEven(seconds) - 60 * minutes;
    if (minutes < 60) return `${minutes}m ${secs}s`;
    let hours = Math.floor(minutes / 60);
    minutes -= 60 * hours;
    if (hours < 48) return `${hours}h ${minutes}m`;
    return `${Math.floor(hours / 24)}d ${hours % 24}h`;
  },
  // "2026-11-24 20:41:03 to 20:45:10 UTC (4m 7s)", as summary._period.
  period(first, last) {
    const a = fmt.time(first), b = fmt.time(last);
    return `${a} to ${a.slice(0, 10) === b.slice(0, 10) ? b.slice(11) : b} UTC (${fmt.span(last - first)})`;
  },
};
