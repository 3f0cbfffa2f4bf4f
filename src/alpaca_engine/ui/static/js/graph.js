// A workflow graph (GET /v1/workflows/{name}/graph) drawn as SVG, left to right from the root
// agents, as the builder draws it: agents, then the agents they delegate to, then tools, then
// MCP servers. Every label is a text node; nothing is parsed as markup. Colours and lines
// come from app.css classes (the page's CSP allows no inline styles).

const SVG = "http://www.w3.org/2000/svg";
const COL = 290;
const BOX = { agent: [190, 58], tool: [170, 46], mcp: [170, 46] };
const ROW = 78;
const PAD = 24;

function el(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined && value !== false) node.setAttribute(key, String(value));
  }
  if (text !== undefined) node.textContent = text;
  return node;
}

/** Column per node: agents by delegation depth from the roots (back edges of a cycle are
 *  ignored), each tool right of the deepest agent using it, each MCP server after its tools. */
export function layout(graph) {
  const kind = new Map(graph.nodes.map((n) => [n.id, n.kind]));
  const out = new Map();
  for (const e of graph.edges) {
    if (!out.has(e.source)) out.set(e.source, []);
    out.get(e.source).push(e);
  }
  const col = new Map();
  const visit = (id, depth, path) => {
    if ((col.get(id) ?? -1) >= depth && col.has(id)) return;
    col.set(id, Math.max(col.get(id) ?? 0, depth));
    for (const e of out.get(id) || []) {
      if (e.kind === "delegates_to" && !path.has(e.target)) {
        visit(e.target, depth + 1, new Set([...path, e.target]));
      }
    }
  };
  const roots = graph.roots.length ? graph.roots
    : graph.nodes.filter((n) => n.kind === "agent").slice(0, 1).map((n) => n.id);
  for (const root of roots) visit(root, 0, new Set([root]));
  for (const n of graph.nodes) if (n.kind === "agent" && !col.has(n.id)) visit(n.id, 0, new Set([n.id]));
  const agentCols = Math.max(0, ...graph.nodes.filter((n) => n.kind === "agent").map((n) => col.get(n.id)));
  for (const e of graph.edges) {
    if (e.kind === "uses") col.set(e.target, Math.max(col.get(e.target) ?? 0, col.get(e.source) + 1));
  }
  for (const n of graph.nodes) if (n.kind === "tool" && !col.has(n.id)) col.set(n.id, agentCols + 1);
  for (const e of graph.edges) {
    if (e.kind === "provides") col.set(e.source, Math.max(col.get(e.source) ?? 0, col.get(e.target) + 1));
  }
  // rows: in node order per column, children ordered by where their parents sit
  const columns = new Map();
  for (const n of graph.nodes) {
    const c = col.get(n.id) ?? 0;
    if (!columns.has(c)) columns.set(c, []);
    columns.get(c).push(n);
  }
  const parents = new Map();
  for (const e of graph.edges) {
    const [from, to] = e.kind === "provides" ? [e.target, e.source] : [e.source, e.target];
    if (e.kind === "gated") continue;
    if (!parents.has(to)) parents.set(to, []);
    parents.get(to).push(from);
  }
  const pos = new Map();
  for (const c of [...columns.keys()].sort((a, b) => a - b)) {
    const nodes = columns.get(c);
    const weight = (n) => {
      const ys = (parents.get(n.id) || []).filter((p) => pos.has(p)).map((p) => pos.get(p).y);
      return ys.length ? ys.reduce((a, b) => a + b, 0) / ys.length : Infinity;
    };
    const order = nodes.map((n, i) => [weight(n), i, n]).sort((a, b) => a[0] - b[0] || a[1] - b[1]);
    order.forEach(([, , n], row) => {
      const [w, h] = BOX[n.kind] || BOX.tool;
      pos.set(n.id, { x: PAD + c * COL, y: PAD + row * ROW, w, h, kind: kind.get(n.id) });
    });
  }
  return pos;
}

function subtitle(node) {
  const d = node.data || {};
  if (node.kind === "agent") return `${d.model} · ${d.limits?.max_steps ?? "?"} steps`;
  if (node.kind === "mcp") return `MCP · ${d.transport}`;
  const caps = (d.capabilities || []).join(", ");
  return `${d.source}${caps ? ` · ${caps}` : ""}`;
}

function curve(a, b, back) {
  const x1 = a.x + a.w;
  const y1 = a.y + a.h / 2;
  const x2 = b.x;
  const y2 = b.y + b.h / 2;
  if (back) { // a cycle: leave from the bottom, come back under the boxes
    const low = Math.max(a.y + a.h, b.y + b.h) + 28;
    return `M ${a.x + a.w / 2} ${a.y + a.h} C ${a.x + a.w / 2} ${low}, ${b.x + b.w / 2} ${low}, ${b.x + b.w / 2} ${b.y + b.h}`;
  }
  const dx = Math.max(40, (x2 - x1) / 2);
  return `M ${x1} ${y1} C ${x1 + dx} ${y1}, ${x2 - dx} ${y2}, ${x2} ${y2}`;
}

/**
 * The graph as an <svg>. onSelect(node) when a node is clicked or activated with the keyboard.
 * Nodes are <g class="node kind-agent" data-id="agent:orchestrator">, edges
 * <path class="edge kind-uses" data-id="uses:agent:a->tool:t">.
 */
export function drawGraph(graph, { onSelect } = {}) {
  const pos = layout(graph);
  let width = 0;
  let height = 0;
  for (const p of pos.values()) {
    width = Math.max(width, p.x + p.w + PAD);
    height = Math.max(height, p.y + p.h + PAD + 30);
  }
  const svg = el("svg", { class: "graph", viewBox: `0 0 ${width} ${height}`, width, height,
    role: "img", "aria-label": `Workflow graph: ${graph.nodes.length} nodes, ${graph.edges.length} edges` });
  svg.append(el("title", {}, `Workflow ${graph.workflow}`));
  const defs = el("defs");
  for (const name of ["arrow", "arrow-gated"]) {
    const marker = el("marker", { id: name, viewBox: "0 0 10 10", refX: 9, refY: 5,
      markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" });
    marker.append(el("path", { d: "M 0 0 L 10 5 L 0 10 z", class: `marker ${name}` }));
    defs.append(marker);
  }
  svg.append(defs);

  const gates = new Map();
  for (const e of graph.edges) if (e.kind === "gated") gates.set(`${e.source}->${e.target}`, e);
  const edges = el("g", { class: "edges" });
  for (const e of graph.edges) {
    if (e.kind === "gated") continue; // drawn on the edge it gates
    const [from, to] = e.kind === "provides" ? [e.target, e.source] : [e.source, e.target];
    const a = pos.get(from);
    const b = pos.get(to);
    if (!a || !b) continue;
    const gate = gates.get(`${e.source}->${e.target}`);
    const classes = ["edge", `kind-${e.kind}`];
    if (gate) classes.push("gated");
    if (e.data?.permitted === false) classes.push("denied");
    const path = el("path", { d: curve(a, b, b.x <= a.x), class: classes.join(" "),
      "data-id": e.id, "marker-end": `url(#${gate ? "arrow-gated" : "arrow"})` });
    path.append(el("title", {}, `${e.kind.replace("_", " ")}: ${from} → ${to}` +
      (gate ? ` (approval: ${gate.data.reason})` : "") +
      (e.data?.permitted === false ? ` (not permitted: ${e.data.rule})` : "")));
    edges.append(path);
    if (gate) {
      const x = (a.x + a.w + b.x) / 2;
      const y = (a.y + a.h / 2 + b.y + b.h / 2) / 2;
      const badge = el("g", { class: "gate", "data-id": gate.id, transform: `translate(${x - 34} ${y - 10})` });
      badge.append(el("rect", { width: 68, height: 20, rx: 10 }), el("text", { x: 34, y: 14, "text-anchor": "middle" }, "approval"));
      badge.append(el("title", {}, gate.data.reason));
      edges.append(badge);
    }
  }
  svg.append(edges);

  const nodes = el("g", { class: "nodes" });
  for (const n of graph.nodes) {
    const p = pos.get(n.id);
    const g = el("g", { class: `node kind-${n.kind}${n.data?.root ? " root" : ""}`, "data-id": n.id,
      transform: `translate(${p.x} ${p.y})`, tabindex: 0, role: "button",
      "aria-label": `${n.kind} ${n.label}` });
    g.append(el("rect", { width: p.w, height: p.h, rx: n.kind === "agent" ? 10 : 6 }));
    g.append(el("text", { x: 12, y: 20, class: "label" }, n.label));
    g.append(el("text", { x: 12, y: 37, class: "sub" }, subtitle(n)));
    if (n.kind === "tool" && n.data?.approval === "required") { // a pause sign: waits for approval
      const gate = el("g", { class: "lock", transform: `translate(${p.w - 22} 9)` });
      gate.append(el("rect", { width: 4, height: 13, rx: 1 }), el("rect", { x: 7, width: 4, height: 13, rx: 1 }),
        el("title", {}, "requires approval"));
      g.append(gate);
    }
    g.append(el("text", { x: 12, y: p.h + 15, class: "overlay" }, ""));
    g.append(el("title", {}, `${n.kind} ${n.label}${n.data?.description ? `: ${n.data.description}` : ""}`));
    const select = () => onSelect?.(n);
    g.addEventListener("click", select);
    g.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); select(); } });
    nodes.append(g);
  }
  svg.append(nodes);
  return svg;
}

/** Mark nodes with a run's state: overlay = Map(id -> {state, text}). */
export function applyOverlay(svg, overlay) {
  for (const g of svg.querySelectorAll("g.node")) {
    const found = overlay.get(g.dataset.id);
    const label = g.querySelector("text.overlay");
    if (found) {
      g.dataset.state = found.state;
      label.textContent = found.text;
    } else {
      delete g.dataset.state;
      label.textContent = "";
    }
  }
}
