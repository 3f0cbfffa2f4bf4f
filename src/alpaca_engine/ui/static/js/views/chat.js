// Chat: conversations (threads) with an agent. The thread list and a form to start one; a
// thread's turns, each with the user's message, the answer streaming in from the thread's
// event stream, its tool steps and the approvals it waits for; fork from a turn, delete.
//
// Turns are built once and updated in place (never re-rendered), so a streaming answer, an
// open tool-steps disclosure or a comment typed on an approval card survive every refresh.

import { api, follow, withQuery } from "../api.js";
import { badge, fill, h, note, pretty, runLink, TERMINAL, timeEl } from "../dom.js";
import { errorText, oneLine, onSubmit, poll, toast } from "../ui.js";
import { CardList } from "./approvals.js";
import { loadAgents } from "./runs.js";

const threadHref = (id) => `#/chat/${encodeURIComponent(id)}`;

function threadName(t) {
  return t.title || `${t.agent} conversation`;
}

// ------------------------------------------------------------------ the list and the form

function newThreadForm() {
  const agent = h("select", { id: "thread-agent", name: "agent", required: true },
    h("option", { value: "" }, "Loading agents…"));
  const title = h("input", { id: "thread-title", name: "title", type: "text", maxlength: 200,
    placeholder: "optional", autocomplete: "off" });
  const submit = h("button", { type: "submit", class: "primary" }, "Start conversation");
  const message = h("p", { class: "form-message", role: "status" });
  let agents = [];

  loadAgents().then((items) => {
    agents = items;
    const several = new Set(items.map((a) => a.workflow)).size > 1;
    // start on a chat agent when the workflow has one
    const first = Math.max(0, items.findIndex(
      (a) => /\b(chat|assistant)\b/i.test(`${a.name} ${a.description || ""}`)));
    fill(agent, items.map((a, i) => h("option", { value: String(i), selected: i === first },
      several ? `${a.name} (${a.workflow})` : a.name)));
    agent.title = items[first]?.description || "";
  }).catch((error) => {
    fill(agent, h("option", { value: "" }, "unavailable"));
    message.textContent = errorText(error);
  });
  agent.addEventListener("change", () => {
    agent.title = agents[Number(agent.value)]?.description || "";
  });

  const form = h("form", { id: "new-thread", class: "panel new-thread",
    "aria-labelledby": "new-thread-title" },
    h("h2", { id: "new-thread-title" }, "New conversation"),
    h("label", { for: "thread-agent" }, "Agent"), agent,
    h("label", { for: "thread-title" }, "Title"), title,
    submit, message);
  onSubmit(form, submit, message, "Could not start it", async () => {
    const chosen = agents[Number(agent.value)];
    if (!chosen) return false;
    const thread = await api("/v1/threads", { method: "POST",
      body: { agent: chosen.name, workflow: chosen.workflow, title: title.value.trim() } });
    toast(`Started a conversation with ${thread.agent}`, "ok");
    location.hash = threadHref(thread.id);
    return true;
  });
  return form;
}

function threadList(items, currentId) {
  if (!items.length) return note("No conversation yet.");
  return h("ul", { class: "thread-list", id: "thread-list" }, items.map((t) => h("li", {},
    h("a", { href: threadHref(t.id), dataset: { threadId: t.id },
      "aria-current": t.id === currentId ? "page" : null },
      h("span", { class: "name" }, threadName(t)),
      h("span", { class: "sub" }, t.agent, " · ", timeEl(t.updated_at))))));
}

// ------------------------------------------------------------------------------- one turn

function toolStep(step) {
  const args = step.input && "arguments" in step.input ? step.input.arguments : step.input;
  const child = step.kind === "delegation" && step.output?.run_id ? step.output.run_id : null;
  return h("li", { class: `tool-step status-${step.status}`, dataset: { seq: step.seq } },
    h("div", { class: "step-head" },
      h("span", { class: `kind-tag kind-${step.kind}` }, step.kind),
      h("strong", { class: "name" }, step.name), badge(step.status),
      child ? h("span", {}, "→ ", runLink(child)) : null),
    h("div", { class: "io" },
      h("div", {}, h("h4", {}, "Arguments"), h("pre", { class: "json", tabindex: 0 }, pretty(args))),
      h("div", {}, h("h4", {}, step.error ? "Error" : "Result"),
        h("pre", { class: "json", tabindex: 0 }, step.error ? pretty(step.error)
          : step.output === null || step.output === undefined ? "—" : pretty(step.output)))));
}

/** One turn's elements, updated in place as its records, deltas and end arrive. */
class Turn {
  constructor(data, agent, onFork) {
    this.data = { ...data };
    this.stream = null; // {key: "step:attempt", pieces: []} of the answer being written
    this.deltas = 0;
    this.stepsOpen = false;
    this.answer = h("div", { class: "text answer" });
    this.foot = h("div", { class: "turn-foot" });
    this.tools = h("div", { class: "turn-tools", hidden: true });
    this.approvals = h("div", { class: "cards turn-approvals" });
    this.cards = null;
    this.fork = h("button", { type: "button", class: "small fork",
      onclick: () => onFork(this.data.turn) }, `Fork from turn ${data.turn}`);
    this.bubble = h("div", { class: "msg assistant" },
      h("div", { class: "who" }, agent), this.answer);
    this.el = h("li", { class: "turn", id: `turn-${data.turn}`, dataset: { turn: data.turn } },
      h("div", { class: "msg user" }, h("div", { class: "who" }, "You"),
        h("p", { class: "text" }, data.content)),
      this.tools, this.approvals, this.bubble, this.foot);
    this.render();
  }

  get finished() {
    return TERMINAL.has(this.data.state);
  }

  update(data) {
    Object.assign(this.data, data);
    this.render();
  }

  /** A piece of the answer: pieces of one (step, attempt) joined in index order. */
  delta(event) {
    if (event.run_id !== this.data.run_id || typeof event.text !== "string" || this.finished) return;
    const key = `${event.step}:${event.attempt}`;
    if (this.stream?.key !== key) this.stream = { key, pieces: [] }; // a restart or a new step
    this.stream.pieces[event.index] = event.text;
    this.deltas += 1;
    this.el.dataset.deltas = String(this.deltas);
    this.answer.textContent = this.stream.pieces.join("");
    this.bubble.classList.add("streaming");
  }

  render() {
    const d = this.data;
    this.el.dataset.state = d.state;
    this.el.dataset.runId = d.run_id;
    const done = this.finished;
    this.bubble.classList.toggle("pending", !done);
    this.bubble.setAttribute("aria-busy", done ? "false" : "true");
    if (done) {
      this.bubble.classList.remove("streaming");
      this.stream = null;
      if (d.answer !== null && d.answer !== undefined) {
        fill(this.answer, d.output_type === "json" ? h("pre", { class: "json" }, pretty(d.answer))
          : d.answer);
      } else {
        fill(this.answer, h("span", { class: "muted" }, "No answer."));
      }
    } else if (!this.stream) {
      fill(this.answer, h("span", { class: "muted typing" },
        d.state === "waiting" ? "Waiting for an approval…" : "…"));
    }
    fill(this.foot, h("span", { class: "turn-state" }, badge(d.state)),
      h("span", { class: "muted" }, `turn ${d.turn} · `, runLink(d.run_id, "run")),
      d.error_code ? h("span", { class: "error-text" }, h("code", {}, d.error_code), " ",
        d.error_message || "") : null,
      done ? this.fork : null);
  }

  showSteps(items) {
    const shown = items.filter((s) => s.kind === "tool" || s.kind === "delegation");
    this.tools.hidden = shown.length === 0;
    if (!shown.length) return;
    const details = h("details", { class: "tool-steps", open: this.stepsOpen },
      h("summary", {}, `${shown.length} tool step${shown.length === 1 ? "" : "s"}: `,
        shown.map((s) => s.name).join(", ")),
      h("ol", {}, shown.map(toolStep)));
    details.addEventListener("toggle", () => { this.stepsOpen = details.open; });
    fill(this.tools, details);
  }

  /** Cards still to decide (a decided one stays, greyed, with its confirmation). */
  get undecided() {
    return [...(this.cards?.cards.values() || [])].some((c) => !c.classList.contains("decided"));
  }

  showApprovals(pending, onDecided) {
    this.cards ??= new CardList(this.approvals, onDecided);
    this.cards.update(pending);
  }
}

// -------------------------------------------------------------------------- one thread

function conversation(box, id, onListChanged) {
  const live = h("span", { class: "live", id: "chat-live", "aria-live": "polite" }, "connecting…");
  const head = h("div", { class: "conversation-head" }, note("Loading…"));
  const list = h("ol", { class: "messages", id: "messages", "aria-label": "Turns" });
  const input = h("textarea", { id: "composer-input", name: "content", rows: 2,
    placeholder: "Write a message (Enter sends, Shift+Enter for a new line)",
    "aria-describedby": "composer-error" });
  const send = h("button", { type: "submit", class: "primary" }, "Send");
  const problem = h("p", { class: "form-message error", id: "composer-error", role: "alert" });
  const composer = h("form", { class: "composer", id: "composer" },
    h("label", { for: "composer-input", class: "sr-only" }, "Message"), input, send, problem);
  fill(box, head, list, composer);

  const turns = new Map();
  let thread = null;
  let sending = false;
  let gone = false;
  const stepTimers = new Map();
  const early = new Map(); // deltas of a turn whose message we have not listed yet

  function busy() {
    return gone || sending || [...turns.values()].some((t) => !t.finished);
  }

  function updateComposer() {
    const b = busy();
    input.disabled = gone;
    send.disabled = b;
    composer.dataset.busy = b ? "true" : "false";
  }

  function nearBottom() {
    return list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  }

  function upsert(data) {
    let turn = turns.get(data.turn);
    if (turn) {
      // a listing read before the turn ended never takes back its end, nor wipes the
      // answer the stream is showing
      if (turn.finished && !TERMINAL.has(data.state)) return turn;
      if (data.answer === null && !TERMINAL.has(data.state)) delete data.answer;
      turn.update(data);
    } else {
      const stick = nearBottom();
      turn = new Turn(data, thread?.agent ?? "Agent", fork);
      turns.set(data.turn, turn);
      const after = [...turns.keys()].filter((n) => n > data.turn).sort((a, b) => a - b)[0];
      list.insertBefore(turn.el, after === undefined ? null : turns.get(after).el);
      for (const event of early.get(data.turn) || []) turn.delta(event);
      early.delete(data.turn);
      if (stick) list.scrollTop = list.scrollHeight;
    }
    updateComposer();
    return turn;
  }

  async function sync() {
    const { items } = await api(`/v1/threads/${encodeURIComponent(id)}/messages`);
    for (const item of items) upsert(item);
    if (!items.length && !list.querySelector(".turn")) {
      list.dataset.empty = "true";
    } else {
      delete list.dataset.empty;
    }
  }

  async function refreshSteps(turn) {
    try {
      const { items } = await api(`/v1/runs/${encodeURIComponent(turn.data.run_id)}/steps`);
      turn.showSteps(items);
    } catch (error) {
      console.warn(error);
    }
  }

  function stepsSoon(turn) {
    clearTimeout(stepTimers.get(turn.data.turn));
    stepTimers.set(turn.data.turn, setTimeout(() => refreshSteps(turn), 200));
  }

  // The thread stream carries the turns' own runs; an approval a delegated run waits for is
  // found by its root (the turn's run) in the pending list.
  async function refreshApprovals() {
    const open = [...turns.values()].filter((t) => !t.finished || t.undecided);
    if (!open.length) return;
    const { items } = await api(withQuery("/v1/approvals", { status: "pending", limit: 1000 }));
    for (const turn of open) {
      turn.showApprovals(items.filter((a) => a.root_id === turn.data.run_id), () => poller.now());
    }
  }

  let syncTimer = null;
  function syncSoon() {
    clearTimeout(syncTimer);
    syncTimer = setTimeout(() => sync().catch((e) => console.warn(e)), 150);
  }

  function onEvent({ data }) {
    if (!data || typeof data !== "object") return;
    if (data.type === "thread.deleted") {
      deleted();
      return;
    }
    const turn = turns.get(data.turn);
    if (data.type === "message.delta") {
      if (turn) {
        const stick = nearBottom();
        turn.delta(data);
        if (stick) list.scrollTop = list.scrollHeight;
      } else if (Number.isInteger(data.turn)) {
        if (!early.has(data.turn)) early.set(data.turn, []);
        early.get(data.turn).push(data);
      }
      return;
    }
    if (!turn) { // a turn sent from elsewhere: fetch its message
      syncSoon();
      return;
    }
    if (data.type === "turn.end") {
      turn.update({ state: data.state, answer: data.answer });
      if (turn.el.dataset.hadTools) stepsSoon(turn);
      updateComposer();
      poller.now();
      syncSoon(); // its error code and message, if it failed
      return;
    }
    if (data.type !== "audit") return;
    const { kind, data: rec } = data.record;
    if (kind === "state.changed" && rec?.to && !turn.finished && !TERMINAL.has(rec.to)) {
      turn.update({ state: rec.to });
    }
    if (/^(tool\.|delegation\.|approval\.|gate\.)/.test(kind)) {
      turn.el.dataset.hadTools = "true";
      stepsSoon(turn);
    }
    if (kind.startsWith("approval.")) poller.now();
  }

  function deleted() {
    gone = true;
    stream?.close();
    stream = null;
    live.textContent = "deleted";
    fill(box, note("This conversation was deleted.", "error"));
    onListChanged();
  }

  async function fork(turnNo) {
    try {
      const made = await api(`/v1/threads/${encodeURIComponent(id)}/fork`,
        { method: "POST", body: { turn: turnNo } });
      toast(`Forked at turn ${turnNo}`, "ok");
      location.hash = threadHref(made.id);
    } catch (error) {
      toast(`Could not fork: ${oneLine(error)}`, "error");
    }
  }

  async function remove() {
    if (!confirm(`Delete “${threadName(thread)}” and everything its turns recorded? ` +
      "The audit keeps only anchors that prove the deletion.")) return;
    try {
      await api(`/v1/threads/${encodeURIComponent(id)}`, { method: "DELETE" });
      toast("Conversation deleted", "ok");
      gone = true;
      location.hash = "#/chat";
    } catch (error) {
      toast(`Could not delete: ${oneLine(error)}`, "error");
    }
  }

  function renderHead() {
    document.title = `${threadName(thread)} · Chat · Alpaca Engine`;
    fill(head,
      h("div", { class: "title-line" },
        h("h2", { id: "thread-name" }, threadName(thread)), live,
        h("button", { type: "button", class: "reject small", id: "delete-thread",
          onclick: remove }, "Delete conversation")),
      h("p", { class: "muted meta-line" }, "with ", h("strong", {}, thread.agent), ` · ${thread.workflow}`,
        thread.workflow_version ? ` v${thread.workflow_version}` : "", " · started ",
        timeEl(thread.created_at),
        thread.forked_from ? [" · forked from ",
          h("a", { href: threadHref(thread.forked_from), class: "mono" }, thread.forked_from),
          ` at turn ${thread.forked_turn}`] : null));
  }

  composer.addEventListener("submit", async (event) => {
    event.preventDefault();
    const running = [...turns.values()].find((t) => !t.finished);
    if (running && !sending) {
      problem.textContent = `Turn ${running.data.turn} is still ${running.data.state}; ` +
        "send this once it has finished.";
      return;
    }
    if (busy() || !input.value) return;
    sending = true;
    updateComposer();
    problem.textContent = "";
    try {
      const run = await api(`/v1/threads/${encodeURIComponent(id)}/messages`,
        { method: "POST", body: { content: input.value } });
      input.value = "";
      delete list.dataset.empty;
      upsert({ turn: run.turn, run_id: run.id, state: run.state, content: run.input,
        answer: null, output_type: run.output_type || "text", error_code: null,
        error_message: null });
      list.scrollTop = list.scrollHeight;
      poller.now();
    } catch (error) {
      problem.textContent = oneLine(error);
      if (error.code === "turn_in_progress") syncSoon();
    } finally {
      sending = false;
      updateComposer();
      input.focus();
    }
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.ctrlKey && !event.altKey &&
        !event.metaKey && !event.isComposing) {
      event.preventDefault();
      composer.requestSubmit();
    }
  });

  // Polling covers approvals of delegated runs and a stream that is down; it is cheap
  // while no turn runs.
  const poller = poll(async () => {
    if (gone || !thread) return;
    if (busy() && !sending) await sync();
    await refreshApprovals();
  }, 2500);

  const labels = { live: "● live", reconnecting: "reconnecting…", ended: "stream ended",
    unauthorized: "needs an API key", error: "stream unavailable" };
  let stream = null;

  (async () => {
    try {
      thread = await api(`/v1/threads/${encodeURIComponent(id)}`);
      renderHead();
      await sync();
    } catch (error) {
      fill(box, note(error?.status === 404 ? "No such conversation (it may have been deleted)."
        : errorText(error), "error"));
      gone = true;
      return;
    }
    poller.now();
    if (gone) return;
    // Every record of every turn, then live; reconnects resume after the last one seen.
    stream = follow(`/v1/threads/${encodeURIComponent(id)}/events`, {
      onEvent,
      onStatus(status) {
        live.textContent = labels[status] || status;
        live.dataset.status = status;
      },
    });
    input.focus();
  })();

  return {
    unmount() {
      gone = true;
      stream?.close();
      poller.stop();
      clearTimeout(syncTimer);
      for (const t of stepTimers.values()) clearTimeout(t);
    },
  };
}

// ------------------------------------------------------------------------------ the view

export function mount(root, threadId = null) {
  const listBox = h("div", { id: "threads" }, note("Loading…"));
  const main = h("section", { class: "chat-main", id: "chat-main", "aria-label": "Conversation" });
  fill(root,
    h("div", { class: "page-head" }, h("h1", {}, "Chat")),
    h("div", { class: "chat" },
      h("aside", { class: "chat-side", "aria-label": "Conversations" },
        newThreadForm(),
        h("h2", { id: "threads-title" }, "Conversations"), listBox),
      main));

  const lister = poll(async () => {
    try {
      const { items } = await api(withQuery("/v1/threads", { limit: 200 }));
      fill(listBox, threadList(items, threadId));
    } catch (error) {
      fill(listBox, note(errorText(error), "error"));
    }
  }, 5000);

  let open = null;
  if (threadId) open = conversation(main, threadId, () => lister.now());
  else fill(main, note("Pick a conversation, or start a new one with an agent."));

  return {
    unmount() {
      lister.stop();
      open?.unmount();
    },
  };
}
