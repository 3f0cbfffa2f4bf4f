// Circuit breakers: the state of every tool's breaker this deployment has used.

import { api } from "../api.js";
import { badge, fill, h, note, timeEl } from "../dom.js";
import { errorText, poll } from "../ui.js";

function windowView(window) {
  if (!window.length) return h("span", { class: "muted" }, "—");
  const failures = window.filter((ok) => !ok).length;
  return h("span", { class: "window", role: "img",
    "aria-label": `${window.length} recent calls, ${failures} failed` },
    window.map((ok) => h("span", { class: ok ? "ok" : "bad", title: ok ? "success" : "failure" },
      ok ? "✓" : "✗")));
}

function table(items) {
  if (!items.length) return note("No tool with a breaker has been called yet.");
  return h("table", { class: "data breakers" },
    h("caption", { class: "sr-only" }, "Circuit breakers"),
    h("thead", {}, h("tr", {},
      ["Tool", "State", "Consecutive failures", "Recent calls", "Opened", "Half-open trials"]
        .map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, items.map((b) => h("tr", { dataset: { tool: b.tool, state: b.state } },
      h("td", {}, h("code", {}, b.tool)),
      h("td", {}, badge(b.state, "breaker")),
      h("td", { class: "num" }, b.consecutive_failures),
      h("td", {}, windowView(b.window)),
      h("td", {}, b.opened_at ? timeEl(b.opened_at) : h("span", { class: "muted" }, "—")),
      h("td", { class: "num" }, b.state === "half_open"
        ? `${b.half_open_in_flight} in flight, ${b.half_open_successes} succeeded` : "—")))));
}

export function mount(root) {
  const body = h("div", { class: "table-wrap" }, note("Loading…"));
  const updated = h("p", { class: "updated muted" });
  fill(root,
    h("div", { class: "page-head" }, h("h1", {}, "Circuit breakers"), updated),
    h("p", { class: "lead" }, "A breaker opens after repeated failures of a tool and refuses ",
      "calls until a trial call succeeds again; closed is healthy."),
    body);
  const poller = poll(async () => {
    try {
      fill(body, table((await api("/v1/breakers")).items));
      updated.textContent = `Updated ${new Date().toLocaleTimeString()}`;
    } catch (error) {
      fill(body, note(errorText(error), "error"));
    }
  }, 3000);
  return { unmount: () => poller.stop() };
}
