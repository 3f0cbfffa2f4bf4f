// The single-page app: hash routes, the API key prompt, and the pending-approvals counter.

import { api, clearKey, getKey, onUnauthorized, setKey, withQuery } from "./api.js";
import { fill, h } from "./dom.js";
import { poll } from "./ui.js";
import * as approvals from "./views/approvals.js";
import * as breakers from "./views/breakers.js";
import * as chat from "./views/chat.js";
import * as run from "./views/run.js";
import * as runs from "./views/runs.js";
import * as workflows from "./views/workflows.js";

const view = document.getElementById("view");

const routes = [
  [/^#\/runs\/([^/?]+)$/, "runs", (m) => run.mount(view, decodeURIComponent(m[1]))],
  [/^#\/runs(?:\?(.*))?$/, "runs", (m) => runs.mount(view, new URLSearchParams(m[1] || ""))],
  [/^#\/approvals(?:\/(pending|decided))?$/, "approvals", (m) => approvals.mount(view, m[1] || "pending")],
  [/^#\/breakers$/, "breakers", () => breakers.mount(view)],
  [/^#\/chat(?:\/([^/?]+))?$/, "chat", (m) => chat.mount(view, m[1] ? decodeURIComponent(m[1]) : null)],
  [/^#\/workflows\/([^/?]+)(?:\?(.*))?$/, "workflows",
    (m) => workflows.mountDetail(view, decodeURIComponent(m[1]), new URLSearchParams(m[2] || ""))],
  [/^#\/workflows$/, "workflows", () => workflows.mountList(view)],
];

let current = null;

function route() {
  current?.unmount();
  current = null;
  const hash = location.hash || "#/runs";
  for (const [pattern, section, mount] of routes) {
    const m = hash.match(pattern);
    if (!m) continue;
    for (const link of document.querySelectorAll("[data-nav]")) {
      if (link.dataset.nav === section) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    document.title = `${section[0].toUpperCase()}${section.slice(1)} · Alpaca Engine`;
    current = mount(m);
    view.focus({ preventScroll: true });
    return;
  }
  location.replace("#/runs");
}

// ------------------------------------------------------------------------- API key

const panel = document.getElementById("auth-panel");
const form = document.getElementById("auth-form");
const input = document.getElementById("auth-key");
const reason = document.getElementById("auth-reason");
const status = document.getElementById("auth-status");

function showAuth(message) {
  if (message) reason.textContent = message;
  panel.hidden = false;
  if (document.activeElement !== input) input.focus();
}

function renderAuthStatus() {
  if (getKey()) {
    fill(status, h("span", { class: "muted" }, "API key set"), " ",
      h("button", { type: "button", class: "link", onclick: () => {
        clearKey();
        runs.forgetAgents();
        renderAuthStatus();
        route();
      } }, "Forget key"));
  } else {
    fill(status, h("button", { type: "button", class: "link", onclick: () => showAuth() },
      "Use an API key"));
  }
}

onUnauthorized((error) => {
  showAuth(getKey()
    ? `The server refused the key (${error.message}). Paste another one.`
    : "This server needs an API key. It is kept in this browser tab only (session storage) " +
      "and sent as an Authorization: Bearer header.");
});

form.addEventListener("submit", (event) => {
  event.preventDefault();
  if (!input.value.trim()) return;
  setKey(input.value);
  input.value = "";
  panel.hidden = true;
  runs.forgetAgents();
  renderAuthStatus();
  route();
});

// ------------------------------------------------------------------- pending counter

const counter = document.getElementById("pending-count");
poll(async () => {
  try {
    const { items } = await api(withQuery("/v1/approvals", { status: "pending", limit: 1000 }));
    counter.hidden = items.length === 0;
    counter.textContent = String(items.length);
    counter.setAttribute("aria-label", `${items.length} pending`);
  } catch {
    counter.hidden = true;
  }
}, 4000);

window.addEventListener("hashchange", route);
renderAuthStatus();
route();
