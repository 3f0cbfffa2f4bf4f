// One run: its state, its delegation tree, its step timeline with the decisions taken at
// each step, the approvals it waits for, and whether its audit chain verifies. Follows the
// run's event stream and refreshes on every event.

import { api, follow, withQuery } from "../api.js";
import {
  badge, fill, fmtDuration, h, note, pretty, runLink, short, TERMINAL, timeEl,
} from "../dom.js";
import { errorText, poll, toast } from "../ui.js";
import { mountRunGraph } from "../overlay.js";
import { CardList } from "./approvals.js";

// Audit kinds shown under their step: what the engine decided (the rest is bookkeeping).
const DECISION = /^(gate\.|breaker\.|approval\.|delegation\.|tool\.retry|tool\.failed|model\.error)/;
const NOISE = new Set(["budget.reserved", "model.output", "tool.result"]);

function category(kind) {
  if (kind === "gate.permission_allowed") return "allowed";
  if (kind.startsWith("gate.") || kind === "tool.failed" || kind === "model.error") return "denied";
  if (kind.startsWith("breaker.") || kind === "tool.retry") return "warn";
  if (kind.startsWith("approval.")) return "approval";
  if (kind.startsWith("delegation.")) return "delegation";
  return "info";
}

function summary(record) {
  const d = { ...record.data };
  delete d.step;
  switch (record.kind) {
    case "breaker.transition":
      return `${d.tool}: ${d.from} → ${d.to}${d.reason ? ` (${d.reason})` : ""}`;
    case "tool.retry":
      return `attempt ${d.attempt} failed: ${short(d.error, 100)}; retrying in ${fmtDuration(d.delay)}`;
    case "approval.requested":
      return `${d.action} — ${d.reason}`;
    case "approval.decided":
      return `${d.decision ?? "decided"}${d.comment ? `: “${short(d.comment, 100)}”` : ""}`;
    case "approval.expired":
      return `expired unanswered (policy: ${d.policy ?? "deny"})`;
    case "delegation.allowed":
      return `to ${d.target} (depth ${d.depth}: ${(d.ancestry || []).join(" → ")})`;
    case "delegation.finished":
      return `child run ${d.child_id} ${d.state}`;
    case "gate.permission_allowed":
      return `${d.tool}: ${d.rule}`;
    case "tool.failed":
      return `${d.tool} after ${d.attempts} attempt${d.attempts === 1 ? "" : "s"}: ${d.message ?? short(d, 100)}`;
    case "state.changed":
      return `${d.from} → ${d.to}${d.reason ? ` (${d.reason})` : ""}`;
    default:
      if (record.kind.startsWith("gate.") && d.message) {
        return `${d.tool}: ${d.message}${d.retry_after ? ` (retry after ${fmtDuration(d.retry_after)})` : ""}`;
      }
      delete d.tool;
      return short(d, 140);
  }
}

function decisionItem(record) {
  return h("li", { class: `decision cat-${category(record.kind)}` },
    h("code", { class: "kind" }, record.kind), " ",
    h("span", { class: "what" }, summary(record)), " ",
    h("span", { class: "muted seq", title: record.time }, `#${record.seq} · ${record.actor}`));
}

/** Audit records grouped by the step they belong to; the rest are run-level. */
function groupAudit(audit) {
  const byStep = new Map();
  const runLevel = [];
  const approvalStep = new Map();
  let current = null;
  for (const record of audit) {
    const step = Number.isInteger(record.data?.step) ? record.data.step : null;
    if (step !== null) current = step;
    if (record.kind === "approval.requested") approvalStep.set(record.data.approval_id, step);
    if (NOISE.has(record.kind)) continue;
    // a breaker transition is recorded with the call that caused it, right after its step;
    // an expiry names its approval, which names the step
    const at = step ?? (record.kind.startsWith("breaker.") ? current
      : approvalStep.get(record.data?.approval_id) ?? null);
    if (at !== null && DECISION.test(record.kind)) {
      if (!byStep.has(at)) byStep.set(at, []);
      byStep.get(at).push(record);
    } else if (at === null) {
      runLevel.push(record);
    }
  }
  return { byStep, runLevel };
}

function childOf(step, decisions) {
  if (step.kind !== "delegation") return null;
  if (step.output && typeof step.output === "object" && step.output.run_id) return step.output.run_id;
  const finished = decisions.find((r) => r.kind === "delegation.finished");
  return finished?.data?.child_id || null;
}

function stepItem(step, decisions, open) {
  const ended = step.finished_at ?? null;
  const duration = ended !== null ? ended - step.started_at : null;
  const child = childOf(step, decisions);
  const details = h("details", { open: open.has(step.seq) },
    h("summary", {}, "Input and output"),
    h("div", { class: "io" },
      h("div", {}, h("h4", {}, "Input"), h("pre", { class: "json", tabindex: 0 }, pretty(step.input))),
      h("div", {}, h("h4", {}, "Output"),
        h("pre", { class: "json", tabindex: 0 }, step.output === null ? "—" : pretty(step.output)))));
  details.addEventListener("toggle", () => {
    if (details.open) open.add(step.seq); else open.delete(step.seq);
  });
  return h("li", { class: `step kind-${step.kind} status-${step.status}`, id: `step-${step.seq}`,
    dataset: { seq: step.seq, status: step.status } },
    h("div", { class: "step-head" },
      h("span", { class: "seq" }, `#${step.seq}`),
      h("span", { class: `kind-tag kind-${step.kind}` }, step.kind),
      h("strong", { class: "name" }, step.name),
      badge(step.status),
      h("span", { class: "muted" }, duration === null ? "in progress" : fmtDuration(duration)),
      step.attempts > 1 ? h("span", { class: "attempts" }, `${step.attempts} attempts`)
        : h("span", { class: "muted" }, "1 attempt"),
      child ? h("span", {}, "→ ", runLink(child)) : null),
    step.error ? h("p", { class: "error-text" }, h("code", {}, step.error.code || "error"), " ",
      step.error.message || short(step.error)) : null,
    decisions.length ? h("ul", { class: "decisions", "aria-label": `Decisions at step ${step.seq}` },
      decisions.map(decisionItem)) : null,
    details);
}

function treeView(items, currentId) {
  const children = new Map();
  let root = null;
  for (const r of items) {
    if (!r.parent_id) root = r;
    else {
      if (!children.has(r.parent_id)) children.set(r.parent_id, []);
      children.get(r.parent_id).push(r);
    }
  }
  for (const list of children.values()) list.sort((a, b) => a.created_at - b.created_at);
  const node = (r) => h("li", {},
    h("span", { class: `tree-node${r.id === currentId ? " current" : ""}`, dataset: { runId: r.id } },
      h("a", { href: `#/runs/${encodeURIComponent(r.id)}`, class: "mono",
        "aria-current": r.id === currentId ? "page" : null }, r.id),
      " ", h("span", { class: "agent" }, r.agent), " ", badge(r.state)),
    children.has(r.id) ? h("ul", {}, children.get(r.id).map(node)) : null);
  if (!root) return note("The tree is not available.");
  return h("ul", { class: "tree", id: "tree" }, node(root));
}

function verifyBadge(v) {
  if (v.ok) {
    return h("span", { class: "badge audit-ok", id: "audit-badge",
      title: `${v.records} hash-chained records recomputed` }, `audit verified (${v.records} records)`);
  }
  return h("span", { class: "badge audit-bad", id: "audit-badge" },
    `audit NOT verified: first bad record #${v.first_bad_seq ?? "?"}${v.reason ? ` (${v.reason})` : ""}`);
}

function usageList(usage) {
  const entries = Object.entries(usage || {});
  if (!entries.length) return h("span", { class: "muted" }, "none yet");
  return h("span", { class: "kv" }, entries.map(([k, v]) =>
    h("span", {}, h("span", { class: "muted" }, `${k.replace(/_/g, " ")} `),
      typeof v === "number" && !Number.isInteger(v) ? v.toFixed(4) : String(v))));
}

export function mount(root, id) {
  const live = h("span", { class: "live", id: "live-status", "aria-live": "polite" }, "connecting…");
  const head = h("div", { class: "run-head" }, note("Loading…"));
  const details = h("section", { class: "panel", "aria-labelledby": "details-title" });
  const tree = h("section", { class: "panel", "aria-labelledby": "tree-title" });
  const graphPanel = h("section", { class: "panel", id: "run-graph-panel",
    "aria-labelledby": "run-graph-title" });
  let graphView = null;
  const waiting = h("section", { "aria-labelledby": "waiting-title", hidden: true });
  const waitingCards = h("div", { class: "cards" });
  const timeline = h("ol", { class: "timeline", id: "timeline" });
  const runEvents = h("ul", { class: "decisions run-level" });
  const open = new Set();
  let run = null;

  fill(root,
    h("p", { class: "crumbs" }, h("a", { href: "#/runs" }, "Runs"), " / ", h("span", { class: "mono" }, id)),
    head,
    h("div", { class: "two" }, details, tree),
    graphPanel,
    waiting,
    h("section", { "aria-labelledby": "timeline-title" },
      h("h2", { id: "timeline-title" }, "Step timeline"), timeline),
    h("section", { "aria-labelledby": "events-title" },
      h("details", {}, h("summary", { id: "events-title" }, "Run lifecycle events"), runEvents)));
  fill(waiting, h("h2", { id: "waiting-title" }, "Approvals in this run tree"), waitingCards);

  let poller = null;
  const cards = new CardList(waitingCards, () => poller?.now());

  async function refresh() {
    try {
      run = await api(`/v1/runs/${encodeURIComponent(id)}`);
    } catch (error) {
      fill(head, note(errorText(error), "error"));
      return;
    }
    graphView ??= mountRunGraph(graphPanel, run);
    const path = `/v1/runs/${encodeURIComponent(id)}`;
    let steps, audit, verify, family, pending;
    try {
      [steps, audit, verify, family, pending] = await Promise.all([
        api(`${path}/steps`), api(`${path}/audit`), api(`${path}/audit/verify`),
        api(withQuery("/v1/runs", { root_id: run.root_id, limit: 1000 })),
        api(withQuery("/v1/approvals", { status: "pending", limit: 1000 })),
      ]);
    } catch (error) {
      fill(head, note(errorText(error), "error"));
      return;
    }
    // what the whole tree waits for: approving here lets this run go on too
    const waitingFor = pending.items.filter((a) => a.root_id === run.root_id);
    render(steps.items, audit.items, verify, family.items, waitingFor);
    // Stop only on what this refresh rendered: the run read first, the tree after it. A tree
    // all finished beside a run read as "running" just before it ended must refresh again.
    if (stream === null && TERMINAL.has(run.state) &&
        family.items.every((r) => TERMINAL.has(r.state))) poller.stop();
  }

  function render(steps, audit, verify, family, pending) {
    document.title = `${run.agent} ${run.state} · Alpaca Engine`;
    fill(head,
      h("h1", {}, "Run ", h("span", { class: "mono" }, run.id)),
      h("div", { class: "status-line" },
        h("span", { id: "run-state" }, badge(run.state, "big")),
        verifyBadge(verify), live,
        !TERMINAL.has(run.state) ? h("button", { type: "button", class: "reject small",
          onclick: cancel }, run.cancel_requested ? "Cancelling…" : "Cancel run") : null));

    fill(details,
      h("h2", { id: "details-title" }, "Details"),
      h("dl", { class: "meta" },
        h("dt", {}, "Agent"), h("dd", {}, run.agent, h("span", { class: "muted" }, ` · ${run.workflow}`)),
        h("dt", {}, "Depth"), h("dd", {}, `${run.depth} (${run.ancestry.join(" → ")})`),
        run.parent_id ? [h("dt", {}, "Parent"), h("dd", {}, runLink(run.parent_id))] : null,
        h("dt", {}, "Created"), h("dd", {}, timeEl(run.created_at)),
        h("dt", {}, "Updated"), h("dd", {}, timeEl(run.updated_at)),
        h("dt", {}, "Usage"), h("dd", {}, usageList(run.usage)),
        h("dt", {}, "Input"), h("dd", {}, h("pre", { class: "text" }, run.input)),
        h("dt", {}, "Output"), h("dd", { id: "run-output" },
          run.output === null ? h("span", { class: "muted" }, "—")
            : run.output_type === "json" ? h("pre", { class: "json", tabindex: 0 }, pretty(run.output))
              : h("pre", { class: "text" }, run.output)),
        run.error_code ? [h("dt", {}, "Error"), h("dd", { class: "error-text" },
          h("code", {}, run.error_code), " ", run.error_message || "")] : null));

    fill(tree, h("h2", { id: "tree-title" }, `Delegation tree (${family.length} run${family.length === 1 ? "" : "s"})`),
      treeView(family, run.id));

    waiting.hidden = cards.update(pending) === 0 && !waitingCards.querySelector(".decided");

    const { byStep, runLevel } = groupAudit(audit);
    if (!steps.length) fill(timeline, note("No step yet."));
    else fill(timeline, steps.map((s) => stepItem(s, byStep.get(s.seq) || [], open)));
    fill(runEvents, runLevel.map(decisionItem));
  }

  async function cancel() {
    if (!confirm(`Cancel run ${id} and everything it delegated?`)) return;
    try {
      await api(`/v1/runs/${encodeURIComponent(id)}/cancel`, { method: "POST" });
      toast("Cancel requested", "ok");
      poller?.now();
    } catch (error) {
      toast(`Could not cancel: ${error.message}`, "error");
    }
  }

  const labels = { live: "● live", reconnecting: "reconnecting…", ended: "run ended",
    unauthorized: "needs an API key", error: "stream unavailable" };
  let burst = null;
  let stream = null;
  // Polling keeps the tree current; the tree's events (children's too) make it instant.
  poller = poll(refresh, 2500);
  stream = follow(`/v1/runs/${encodeURIComponent(id)}/events?tree=true`, {
    onEvent() {
      clearTimeout(burst);
      burst = setTimeout(() => poller.now(), 150); // coalesce a burst of records
    },
    onStatus(status) {
      live.textContent = labels[status] || status;
      live.dataset.status = status;
      if (status === "ended") {
        stream = null;
        poller.now();
      }
    },
  });

  return {
    unmount() {
      stream?.close();
      clearTimeout(burst);
      poller.stop();
      graphView?.unmount();
    },
  };
}
