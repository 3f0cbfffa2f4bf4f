// A run drawn on its workflow's graph, live: each agent node shows the state of its run(s) in
// the tree, their step count and time; each tool node how often it was called and how the
// last call ended. Built on polling GET /v1/runs?root_id= and GET /v1/runs/{id}/steps, behind
// watchTree(), so switching it to the event stream later touches one function.

import { api, withQuery } from "./api.js";
import { fill, fmtDuration, h, note, TERMINAL } from "./dom.js";
import { applyOverlay, drawGraph } from "./graph.js";
import { poll } from "./ui.js";

const BUSY = ["running", "waiting", "queued", "failed", "timed_out", "cancelled", "succeeded"];

/** Where the graph of a run's workflow is: its pinned version, or the served one by ref. */
export async function graphPathFor(ref) {
  const pinned = /^registry:([A-Za-z0-9_-]+)@(\d+)$/.exec(ref);
  if (pinned) {
    return `/v1/workflows/${encodeURIComponent(pinned[1])}/versions/${pinned[2]}/graph`;
  }
  const { items } = await api("/v1/workflows");
  const served = items.find((w) => w.ref === ref);
  return served ? `/v1/workflows/${encodeURIComponent(served.name)}/graph` : null;
}

/**
 * Follow the run tree of `rootId`: onUpdate({runs, steps}) after every refresh, where steps
 * maps run id -> its steps. Steps of finished runs are fetched once. Returns {stop(), now()}.
 */
export function watchTree(rootId, onUpdate, ms = 1500) {
  const done = new Map();
  let poller = null;
  poller = poll(async () => {
    const { items } = await api(withQuery("/v1/runs", { root_id: rootId, limit: 1000 }));
    const steps = new Map();
    await Promise.all(items.map(async (run) => {
      if (done.has(run.id)) {
        steps.set(run.id, done.get(run.id));
        return;
      }
      const found = (await api(`/v1/runs/${encodeURIComponent(run.id)}/steps`)).items;
      steps.set(run.id, found);
      if (TERMINAL.has(run.state)) done.set(run.id, found);
    }));
    onUpdate({ runs: items, steps });
    if (items.length && items.every((r) => TERMINAL.has(r.state))) poller.stop();
  }, ms);
  return poller;
}

/** Node id -> {state, text} for one refresh of the tree. */
export function overlayOf(runs, steps, now = Date.now() / 1000) {
  const out = new Map();
  const byAgent = new Map();
  for (const run of runs) {
    if (!byAgent.has(run.agent)) byAgent.set(run.agent, []);
    byAgent.get(run.agent).push(run);
  }
  for (const [agent, list] of byAgent) {
    const state = BUSY.find((s) => list.some((r) => r.state === s)) || list[0].state;
    const count = list.reduce((n, r) => n + (steps.get(r.id) || []).length, 0);
    const seconds = list.reduce((t, r) => t + ((TERMINAL.has(r.state) ? r.updated_at : now) - r.created_at), 0);
    const runsText = list.length > 1 ? `${list.length} runs · ` : "";
    out.set(`agent:${agent}`, { state, text: `${state.replace("_", " ")} · ${runsText}${count} step${count === 1 ? "" : "s"} · ${fmtDuration(seconds)}` });
  }
  const calls = new Map();
  for (const list of steps.values()) {
    for (const step of list) {
      if (step.kind !== "tool") continue;
      const seen = calls.get(step.name) || { n: 0, last: null };
      seen.n += 1;
      if (!seen.last || step.started_at >= seen.last.started_at) seen.last = step;
      calls.set(step.name, seen);
    }
  }
  for (const [tool, { n, last }] of calls) {
    const how = last.status === "started" ? "in progress" : last.status;
    out.set(`tool:${tool}`, { state: last.status, text: `${n} call${n === 1 ? "" : "s"} · last ${how}` });
  }
  return out;
}

/** A panel with the run tree of `run` drawn on its workflow graph; returns {unmount()}. */
export function mountRunGraph(panel, run) {
  let watcher = null;
  let stopped = false;
  fill(panel, h("h2", { id: "run-graph-title" }, "On the workflow graph"), note("Loading the graph…"));
  (async () => {
    let graph;
    try {
      const path = await graphPathFor(run.workflow);
      if (!path) {
        fill(panel, h("h2", { id: "run-graph-title" }, "On the workflow graph"),
          note(`The graph of ${run.workflow} is not available here.`));
        return;
      }
      graph = await api(path);
    } catch (error) {
      fill(panel, h("h2", { id: "run-graph-title" }, "On the workflow graph"),
        note(`Could not load the graph: ${error.message}`, "error"));
      return;
    }
    if (stopped) return;
    const svg = drawGraph(graph);
    const box = h("div", { class: "graph-box", id: "run-graph" });
    box.append(svg);
    fill(panel, h("h2", { id: "run-graph-title" }, "On the workflow graph"),
      h("p", { class: "muted" }, `Live: each agent's state, steps and time in this run tree (${run.workflow}).`), box);
    watcher = watchTree(run.root_id, ({ runs, steps }) => applyOverlay(svg, overlayOf(runs, steps)));
  })();
  return {
    unmount() {
      stopped = true;
      watcher?.stop();
    },
  };
}
