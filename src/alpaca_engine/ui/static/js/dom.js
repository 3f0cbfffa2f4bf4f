// Building the page from DOM nodes: every piece of data becomes a text node, never markup.

/**
 * h("a", {href: "#/x", class: "link", onclick: fn}, "text", child, [more])
 * Attributes go through setAttribute (never as HTML); on* keys add event listeners;
 * strings and numbers become text nodes; null, undefined and false are skipped.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else if (value === true) {
      el.setAttribute(key, "");
    } else {
      el.setAttribute(key, String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Replace an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

export function pad(n) {
  return String(n).padStart(2, "0");
}

/** Epoch seconds as local "YYYY-MM-DD HH:MM:SS". */
export function fmtTime(epoch) {
  if (epoch === null || epoch === undefined) return "—";
  const d = new Date(epoch * 1000);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** A <time> element with the absolute time as text and ISO as datetime. */
export function timeEl(epoch) {
  if (epoch === null || epoch === undefined) return h("span", { class: "muted" }, "—");
  return h("time", { datetime: new Date(epoch * 1000).toISOString() }, fmtTime(epoch));
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(2)} s`;
  const m = Math.floor(seconds / 60);
  if (m < 60) return `${m} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

/** "in 23 h" / "5 min ago" relative to now. */
export function fmtRelative(epoch) {
  const delta = epoch - Date.now() / 1000;
  const text = fmtDuration(Math.abs(delta)).replace(/\.\d+ s$/, " s");
  return delta >= 0 ? `in ${text}` : `${text} ago`;
}

export function pretty(value) {
  if (typeof value === "string") return value;
  try {
    return JSON.stringify(value, null, 2);
  } catch {
    return String(value);
  }
}

/** One-line summary of a JSON value, cut at `max` characters. */
export function short(value, max = 120) {
  const text = typeof value === "string" ? value : JSON.stringify(value);
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled", "timed_out"]);
export const RUN_STATES = ["queued", "running", "waiting", "succeeded", "failed", "cancelled",
  "timed_out"];

/** A coloured state label; the text is always there (colour is never the only signal). */
export function badge(state, extraClass = "") {
  return h("span", { class: `badge state-${String(state).replace(/[^a-z_]/g, "")} ${extraClass}` },
    String(state).replace("_", " "));
}

export function runLink(id, text) {
  return h("a", { href: `#/runs/${encodeURIComponent(id)}`, class: "mono" }, text ?? id);
}

export function field(label, ...value) {
  return [h("dt", {}, label), h("dd", {}, ...value)];
}

/** A message in place of content: loading, empty, or an error. */
export function note(text, kind = "muted") {
  return h("p", { class: `note ${kind}` }, text);
}
