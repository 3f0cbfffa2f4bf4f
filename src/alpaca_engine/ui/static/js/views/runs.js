// Runs: the list with filters, and the form that starts a new run.

import { api, withQuery } from "../api.js";
import { badge, fill, h, note, RUN_STATES, runLink, short, timeEl } from "../dom.js";
import { errorText, onSubmit, poll, toast } from "../ui.js";

let agentsCache = null;

export async function loadAgents() {
  if (!agentsCache) agentsCache = (await api("/v1/agents")).items;
  return agentsCache;
}

export function forgetAgents() {
  agentsCache = null;
}

function option(value, label, selected = false) {
  return h("option", { value, selected }, label);
}

function newRunForm() {
  const agent = h("select", { id: "new-agent", name: "agent", required: true },
    option("", "Loading agents…"));
  const input = h("textarea", { id: "new-input", name: "input", rows: 3, required: true,
    placeholder: "What should the agent do?" });
  const submit = h("button", { type: "submit", class: "primary" }, "Start run");
  const message = h("p", { class: "form-message", role: "status" });
  let agents = [];

  const form = h("form", { id: "new-run", class: "panel new-run", "aria-labelledby": "new-run-title" },
    h("h2", { id: "new-run-title" }, "New run"),
    h("div", { class: "row" },
      h("div", { class: "field" }, h("label", { for: "new-agent" }, "Agent"), agent),
      h("div", { class: "field grow" }, h("label", { for: "new-input" }, "Input"), input)),
    h("div", { class: "row end" }, message, submit));

  loadAgents().then((items) => {
    agents = items;
    const several = new Set(items.map((a) => a.workflow)).size > 1;
    // start on an agent that delegates (the entry point of a workflow) when there is one
    const first = Math.max(0, items.findIndex((a) => a.delegates_to.length));
    fill(agent, items.map((a, i) => option(String(i),
      several ? `${a.name} (${a.workflow})` : a.name, i === first)));
    agent.title = items[first]?.description || "";
  }).catch((error) => {
    fill(agent, option("", "unavailable"));
    message.textContent = errorText(error);
  });
  agent.addEventListener("change", () => {
    agent.title = agents[Number(agent.value)]?.description || "";
  });

  onSubmit(form, submit, message, "Could not start the run", async () => {
    const chosen = agents[Number(agent.value)];
    if (!chosen) return false;
    const run = await api("/v1/runs", { method: "POST",
      body: { agent: chosen.name, workflow: chosen.workflow, input: input.value } });
    toast(`Started ${run.agent} run ${run.id}`, "ok");
    location.hash = `#/runs/${encodeURIComponent(run.id)}`;
    return true;
  });
  return form;
}

function runsTable(items) {
  if (!items.length) return note("No run matches.");
  return h("table", { class: "data runs" },
    h("caption", { class: "sr-only" }, "Runs, newest first"),
    h("thead", {}, h("tr", {},
      ["Run", "Agent", "State", "Depth", "Created", "Error"].map(
        (c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, items.map((r) => h("tr", { dataset: { runId: r.id, state: r.state } },
      h("td", {}, runLink(r.id)),
      h("td", {}, r.agent),
      h("td", {}, badge(r.state)),
      h("td", { class: "num" }, r.depth),
      h("td", {}, timeEl(r.created_at)),
      h("td", { class: "wrap error-text" }, r.error_code
        ? h("span", { title: r.error_message || "" },
          h("code", {}, r.error_code), " ", short(r.error_message || "", 80))
        : "")))));
}

export function mount(root, params) {
  const filters = { state: params.get("state") || "", agent: params.get("agent") || "",
    top: params.get("top") === "1" };
  const stateSel = h("select", { id: "filter-state", name: "state" },
    option("", "any state"), RUN_STATES.map((s) => option(s, s.replace("_", " "), s === filters.state)));
  const agentSel = h("select", { id: "filter-agent", name: "agent" }, option("", "any agent"));
  const topBox = h("input", { type: "checkbox", id: "filter-top", checked: filters.top });
  const updated = h("p", { class: "updated muted" });
  const tableBox = h("div", { class: "table-wrap", id: "runs-table" }, note("Loading…"));

  fill(root,
    h("div", { class: "page-head" }, h("h1", {}, "Runs"), updated),
    newRunForm(),
    h("section", { "aria-labelledby": "runs-title" },
      h("div", { class: "section-head" },
        h("h2", { id: "runs-title" }, "Recent runs"),
        h("form", { class: "filters", role: "search", "aria-label": "Filter runs",
          onsubmit: (e) => e.preventDefault() },
          h("label", { for: "filter-state" }, "State"), stateSel,
          h("label", { for: "filter-agent" }, "Agent"), agentSel,
          h("label", { class: "check" }, topBox, " top-level only"))),
      tableBox));

  loadAgents().then((items) => {
    const names = [...new Set(items.map((a) => a.name))].sort();
    if (filters.agent && !names.includes(filters.agent)) names.push(filters.agent);
    agentSel.append(...names.map((n) => option(n, n, n === filters.agent)));
  }).catch(() => {});

  const poller = poll(async () => {
    try {
      const { items } = await api(withQuery("/v1/runs",
        { state: filters.state, agent: filters.agent, limit: 200 }));
      fill(tableBox, runsTable(filters.top ? items.filter((r) => r.depth === 0) : items));
      updated.textContent = `Updated ${new Date().toLocaleTimeString()}`;
    } catch (error) {
      fill(tableBox, note(errorText(error), "error"));
    }
  }, 2000);

  function changed() {
    filters.state = stateSel.value;
    filters.agent = agentSel.value;
    filters.top = topBox.checked;
    const q = withQuery("#/runs", { state: filters.state, agent: filters.agent,
      top: filters.top ? "1" : "" });
    history.replaceState(null, "", q); // shareable, without re-mounting the page
    poller.now();
  }
  for (const el of [stateSel, agentSel, topBox]) el.addEventListener("change", changed);
  return { unmount: () => poller.stop() };
}
