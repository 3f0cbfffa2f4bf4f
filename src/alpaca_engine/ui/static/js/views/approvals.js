// The approvals inbox: pending actions to approve or reject, and the decided ones.

import { api, withQuery } from "../api.js";
import { badge, fill, fmtRelative, h, note, pretty, runLink, timeEl } from "../dom.js";
import { errorText, poll, toast } from "../ui.js";

/**
 * A pending approval with its arguments and Approve / Reject buttons.
 * onDecided(approval) runs after the server accepted the decision.
 */
export function approvalCard(a, onDecided = () => {}) {
  const commentId = `comment-${a.id}`;
  const titleId = `approval-title-${a.id}`;
  const comment = h("textarea", { id: commentId, rows: 2, maxlength: 10000,
    placeholder: "Why (recorded in the audit log)" });
  const message = h("p", { class: "card-message", role: "status" });
  const approve = h("button", { type: "button", class: "approve" }, "Approve");
  const reject = h("button", { type: "button", class: "reject" }, "Reject");
  const status = badge(a.status);
  const card = h("article", { class: "card approval", "aria-labelledby": titleId,
    dataset: { approvalId: a.id } },
    h("header", { class: "card-head" },
      h("h3", { id: titleId }, h("code", {}, a.action), " ",
        h("span", { class: "muted" }, `(${a.kind})`)),
      status),
    h("p", { class: "reason" }, a.reason),
    h("dl", { class: "meta" },
      h("dt", {}, "Requested by"), h("dd", {}, a.requested_by),
      h("dt", {}, "Run"), h("dd", {}, runLink(a.run_id), ` step ${a.step}`),
      a.root_id !== a.run_id ? [h("dt", {}, "Root run"), h("dd", {}, runLink(a.root_id))] : null,
      h("dt", {}, "Requested"), h("dd", {}, timeEl(a.created_at)),
      h("dt", {}, "Expires"), h("dd", {},
        a.expires_at ? [timeEl(a.expires_at), ` (${fmtRelative(a.expires_at)}, then ${a.on_expiry})`]
          : "never"),
      h("dt", {}, "If rejected"), h("dd", {}, a.on_reject)),
    h("h4", {}, "Arguments"),
    h("pre", { class: "json", tabindex: 0 }, pretty(a.arguments)),
    h("div", { class: "decide" },
      h("label", { for: commentId }, "Comment (optional)"), comment,
      h("div", { class: "buttons" }, approve, reject)),
    message);

  async function decide(decision) {
    approve.disabled = reject.disabled = comment.disabled = true;
    message.className = "card-message";
    message.textContent = decision === "approve" ? "Approving…" : "Rejecting…";
    try {
      const body = { decision };
      if (comment.value.trim()) body.comment = comment.value.trim();
      const done = await api(`/v1/approvals/${encodeURIComponent(a.id)}/decision`,
        { method: "POST", body });
      card.classList.add("decided");
      status.replaceWith(badge(done.status));
      message.textContent = `${done.status === "approved" ? "Approved" : "Rejected"} by ${done.decided_by}.`;
      toast(`${a.action}: ${done.status}`, "ok");
      onDecided(done);
    } catch (error) {
      approve.disabled = reject.disabled = comment.disabled = false;
      message.className = "card-message error";
      message.textContent = error.status === 403
        ? `Your key may not decide: ${error.message}` : `Failed: ${error.message}`;
    }
  }

  approve.addEventListener("click", () => decide("approve"));
  reject.addEventListener("click", () => decide("reject"));
  return card;
}

/**
 * Keep a list of approval cards in step with the server without rebuilding cards that are
 * still pending (so a comment being typed survives the refresh). A card decided here stays,
 * greyed, with its confirmation, until the page is left. Returns how many are pending.
 */
export class CardList {
  constructor(container, onDecided) {
    this.container = container;
    this.onDecided = onDecided;
    this.cards = new Map();
  }

  update(items) {
    const ids = new Set(items.map((a) => a.id));
    for (const [id, card] of this.cards) {
      if (!ids.has(id) && !card.classList.contains("decided")) {
        card.remove();
        this.cards.delete(id);
      }
    }
    items.forEach((a, i) => {
      let card = this.cards.get(a.id);
      if (!card) {
        card = approvalCard(a, this.onDecided);
        this.cards.set(a.id, card);
      }
      const at = this.container.children[i] || null;
      if (at !== card) this.container.insertBefore(card, at);
    });
    return items.length;
  }
}

function decidedTable(items) {
  if (!items.length) return note("Nothing has been decided yet.");
  return h("table", { class: "data" },
    h("caption", { class: "sr-only" }, "Decided approvals, newest first"),
    h("thead", {}, h("tr", {},
      ["Action", "Decision", "By", "When", "Comment", "Arguments", "Run"].map(
        (c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, items.map((a) => h("tr", {},
      h("td", {}, h("code", {}, a.action)),
      h("td", {}, badge(a.status)),
      h("td", {}, a.decided_by || "—"),
      h("td", {}, timeEl(a.decided_at ?? a.expires_at)),
      h("td", { class: "wrap" }, a.comment || ""),
      h("td", {}, h("details", {}, h("summary", {}, "show"),
        h("pre", { class: "json" }, pretty(a.arguments)))),
      h("td", {}, runLink(a.run_id))))));
}

export function mount(root, tab = "pending") {
  const tabs = [["pending", "Pending"], ["decided", "Decided"]];
  const body = h("div", { id: "approvals-body" });
  const updated = h("p", { class: "updated muted", "aria-live": "off" });
  fill(root,
    h("div", { class: "page-head" }, h("h1", {}, "Approvals"), updated),
    h("nav", { class: "tabs", "aria-label": "Approval lists" },
      tabs.map(([key, label]) => h("a", { href: `#/approvals/${key}`,
        "aria-current": key === tab ? "page" : null }, label))),
    body);

  if (tab === "decided") {
    const poller = poll(async () => {
      try {
        const { items } = await api(withQuery("/v1/approvals", { status: "all", limit: 200 }));
        const decided = items.filter((a) => a.status !== "pending")
          .sort((x, y) => (y.decided_at ?? y.created_at) - (x.decided_at ?? x.created_at));
        fill(body, decidedTable(decided));
        updated.textContent = `Updated ${new Date().toLocaleTimeString()}`;
      } catch (error) {
        fill(body, note(errorText(error), "error"));
      }
    }, 3000);
    return { unmount: () => poller.stop() };
  }

  const list = h("div", { class: "cards", id: "inbox" });
  const empty = note("No approval is waiting. Runs that need one pause here.");
  let poller = null;
  const problem = h("div");
  const cards = new CardList(list, () => poller?.now());
  fill(body, problem, list);
  poller = poll(async () => {
    try {
      const { items } = await api(withQuery("/v1/approvals", { status: "pending", limit: 200 }));
      fill(problem);
      if (cards.update(items)) empty.remove(); else body.append(empty);
      updated.textContent = `${items.length} pending · updated ${new Date().toLocaleTimeString()}`;
    } catch (error) {
      fill(problem, note(errorText(error), "error"));
    }
  }, 2000);
  return { unmount: () => poller.stop() };
}
