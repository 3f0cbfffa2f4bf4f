// Workflows: the registered ones (versions pushed by a builder) and the served, read-only
// ones; one workflow's graph drawn as the builder does, a version picker, node details and
// the text of the version.

import { api, withQuery } from "../api.js";
import { fill, h, note, pretty, timeEl } from "../dom.js";
import { drawGraph } from "../graph.js";
import { errorText, toast } from "../ui.js";

const link = (name) => `#/workflows/${encodeURIComponent(name)}`;

export function mountList(root) {
  const body = h("div", { id: "workflows-body" }, note("Loading…"));
  fill(root,
    h("div", { class: "page-head" }, h("h1", {}, "Workflows")),
    h("p", { class: "lead" }, "Registered workflows are versioned: a run keeps the version it " +
      "started on. Served workflows come from the server's disk and are read-only."),
    body);
  (async () => {
    try {
      const { items } = await api("/v1/workflows");
      if (!items.length) {
        fill(body, note("No workflow yet: push one with alpaca workflows push FILE."));
        return;
      }
      fill(body, h("div", { class: "table-wrap" }, h("table", { class: "data", id: "workflows-table" },
        h("thead", {}, h("tr", {}, ["Name", "Kind", "Latest version", "Author", "Pushed"].map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, items.map((w) => h("tr", { dataset: { name: w.name } },
          h("td", {}, h("a", { href: link(w.name), class: "mono" }, w.name)),
          h("td", {}, w.kind === "served" ? h("span", { class: "badge" }, "served · read-only") : h("span", { class: "badge state-succeeded" }, "registered")),
          h("td", { class: "num" }, w.version ?? "—"),
          h("td", {}, w.author || "—"),
          h("td", {}, w.created_at ? timeEl(w.created_at) : "—")))))));
    } catch (error) {
      fill(body, note(errorText(error), "error"));
    }
  })();
  return { unmount() {} };
}

/** Start a run of this very version (registered) or of the served workflow. */
function startForm(target, agents) {
  const agent = h("select", { id: "start-agent", name: "agent", required: true },
    agents.map((a, i) => h("option", { value: a, selected: i === 0 }, a)));
  const input = h("input", { id: "start-input", name: "input", type: "text", required: true,
    placeholder: "What should the agent do?" });
  const message = h("p", { class: "form-message", role: "status" });
  const form = h("form", { id: "start-run", class: "panel new-run", "aria-labelledby": "start-title" },
    h("h2", { id: "start-title" }, "Start a run of ", h("span", { class: "mono" }, target)),
    h("div", { class: "row" },
      h("div", { class: "field" }, h("label", { for: "start-agent" }, "Agent"), agent),
      h("div", { class: "field grow" }, h("label", { for: "start-input" }, "Input"), input)),
    h("div", { class: "row end" }, message, h("button", { type: "submit", class: "primary" }, "Start run")));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const run = await api("/v1/runs", { method: "POST",
        body: { workflow: target, agent: agent.value, input: input.value } });
      toast(`Started ${run.id} on ${run.workflow}`, "ok");
      location.hash = `#/runs/${encodeURIComponent(run.id)}`;
    } catch (error) {
      message.textContent = error.message;
      message.className = "form-message error";
    }
  });
  return form;
}

function nodeDetails(node) {
  if (!node) return note("Select a node to see its settings.");
  return h("div", {},
    h("h3", {}, `${node.kind} `, h("span", { class: "mono" }, node.label)),
    h("pre", { class: "json", tabindex: 0 }, pretty(node.data)));
}

export function mountDetail(root, name, params) {
  const version = params.get("v") ? Number(params.get("v")) : null;
  const head = h("div", { class: "run-head" }, note("Loading…"));
  const graphBox = h("div", { class: "graph-box", id: "workflow-graph" });
  const details = h("section", { class: "panel", id: "node-details", "aria-live": "polite" }, nodeDetails(null));
  const source = h("section", { "aria-labelledby": "source-title", hidden: true });
  const start = h("div", { id: "start-box" });
  fill(root,
    h("p", { class: "crumbs" }, h("a", { href: "#/workflows" }, "Workflows"), " / ", h("span", { class: "mono" }, name)),
    head,
    h("section", { class: "panel", "aria-labelledby": "graph-title" },
      h("h2", { id: "graph-title" }, "Graph"),
      h("p", { class: "muted legend" },
        h("span", { class: "key key-agent" }, "agent"), h("span", { class: "key key-tool" }, "tool"),
        h("span", { class: "key key-mcp" }, "MCP server"), h("span", { class: "key key-gated" }, "approval gate"),
        h("span", { class: "key key-denied" }, "not permitted")),
      graphBox),
    details,
    start,
    source);

  (async () => {
    let detail;
    let graph;
    try {
      detail = await api(`/v1/workflows/${encodeURIComponent(name)}`);
      const shown = version ?? detail.version;
      graph = await api(detail.kind === "registered" && shown
        ? `/v1/workflows/${encodeURIComponent(name)}/versions/${shown}/graph`
        : `/v1/workflows/${encodeURIComponent(name)}/graph`);
    } catch (error) {
      fill(head, note(errorText(error), "error"));
      return;
    }
    const shown = version ?? detail.version;
    const picker = detail.kind === "registered"
      ? h("select", { id: "version-select", "aria-label": "Version", onchange: (ev) => {
          location.hash = withQuery(link(name), { v: ev.target.value });
        } }, detail.versions.map((v) => h("option", { value: v.version, selected: v.version === shown },
          `version ${v.version}${v.version === detail.version ? " (latest)" : ""} · ${v.author || "?"}`)))
      : null;
    fill(head,
      h("h1", {}, "Workflow ", h("span", { class: "mono" }, name)),
      h("div", { class: "status-line" },
        detail.kind === "served" ? h("span", { class: "badge" }, "served · read-only")
          : h("span", { class: "badge state-succeeded" }, `version ${shown}`),
        picker,
        h("span", { class: "muted mono", id: "workflow-ref" }, graph.workflow),
        h("span", { class: "muted" }, `${detail.agents.length} agents`)));
    const svg = drawGraph(graph, { onSelect: (node) => {
      for (const g of svg.querySelectorAll("g.node")) g.classList.toggle("selected", g.dataset.id === node.id);
      fill(details, nodeDetails(node));
    } });
    fill(graphBox, svg);
    fill(start, startForm(detail.kind === "registered" ? `${name}@${shown}` : name, detail.agents));
    if (detail.kind === "registered" && shown) {
      try {
        const text = await api(`/v1/workflows/${encodeURIComponent(name)}/versions/${shown}`);
        source.hidden = false;
        fill(source, h("details", {}, h("summary", { id: "source-title" }, `Text of version ${shown} (${text.format})`),
          h("pre", { class: "text", tabindex: 0 }, text.source)));
      } catch { /* the graph is what matters here */ }
    }
  })();
  return { unmount() {} };
}
