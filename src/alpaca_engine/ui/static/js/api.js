// Talking to /v1: JSON calls with the optional API key, and a live event stream.
//
// The key lives in sessionStorage (this tab only) and goes in the Authorization header, for
// the event stream too: EventSource cannot send headers, so the stream is read with fetch()
// and parsed here, which keeps the key out of URLs and server logs. Like EventSource, the
// reader reconnects by itself and resumes with Last-Event-ID.

const KEY = "alpaca.apiKey";

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem?.detail || problem?.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
    this.code = this.problem.code || String(status);
  }
}

export function getKey() {
  try {
    return sessionStorage.getItem(KEY);
  } catch {
    return null;
  }
}

export function setKey(key) {
  sessionStorage.setItem(KEY, key.trim());
}

export function clearKey() {
  sessionStorage.removeItem(KEY);
}

const listeners = new Set();

/** Called with the ApiError whenever the server answers 401. */
export function onUnauthorized(fn) {
  listeners.add(fn);
}

function headers(extra = {}) {
  const out = { ...extra };
  const key = getKey();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function problemOf(res) {
  try {
    return await res.json();
  } catch {
    return { title: res.statusText, status: res.status };
  }
}

async function fail(res) {
  const error = new ApiError(res.status, await problemOf(res));
  if (res.status === 401) for (const fn of listeners) fn(error);
  throw error;
}

/** GET/POST a JSON resource under the API; throws ApiError with the problem document. */
export async function api(path, { method = "GET", body, signal } = {}) {
  const init = { method, signal, cache: "no-store", headers: headers({ Accept: "application/json" }) };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const res = await fetch(path, init);
  if (!res.ok) await fail(res);
  return res.json();
}

/** Build "/v1/runs?state=x" from a path and a params object (empty values left out). */
export function withQuery(path, params = {}) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== null && v !== undefined && v !== "") q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `${path}?${s}` : path;
}

const sleep = (ms, signal) => new Promise((resolve) => {
  const t = setTimeout(resolve, ms);
  signal.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
});

/**
 * Follow a Server-Sent Events stream until its `end` event, or a 204 (or close()).
 * onEvent({id, event, data}) for each event; onStatus("live" | "reconnecting" | "ended" |
 * "unauthorized"). Reconnects after errors with Last-Event-ID, waiting `retry` ms (the
 * server may set it) growing up to 10 s.
 */
export function follow(path, { onEvent, onStatus = () => {} }) {
  const controller = new AbortController();
  const { signal } = controller;
  let lastId = null;
  let retry = 1000;

  async function readOnce() {
    const extra = { Accept: "text/event-stream" };
    if (lastId !== null) extra["Last-Event-ID"] = lastId;
    const res = await fetch(path, { headers: headers(extra), cache: "no-store", signal });
    if (!res.ok) await fail(res);
    if (res.status === 204) return true; // finished, and we have seen all of it
    onStatus("live");
    retry = 1000;
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let event = { data: [], event: "", id: null };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buffer += value;
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (line === "") {
          if (event.id !== null) lastId = event.id;
          if (event.data.length || event.event) {
            const text = event.data.join("\n");
            let data = text;
            try { data = JSON.parse(text); } catch { /* not JSON: keep the text */ }
            const name = event.event || "message";
            onEvent({ id: event.id ?? lastId, event: name, data });
            if (name === "message" && data?.type === "end") {
              reader.cancel().catch(() => {});
              return true;
            }
          }
          event = { data: [], event: "", id: null };
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "data") event.data.push(value);
        else if (field === "event") event.event = value;
        else if (field === "id" && !value.includes("\0")) event.id = value;
        else if (field === "retry" && /^\d+$/.test(value)) retry = Number(value);
      }
    }
  }

  (async () => {
    while (!signal.aborted) {
      try {
        if (await readOnce()) {
          onStatus("ended");
          return;
        }
      } catch (error) {
        if (signal.aborted) return;
        if (error instanceof ApiError && error.status < 500) {
          onStatus(error.status === 401 ? "unauthorized" : "error", error);
          return;
        }
      }
      if (signal.aborted) return;
      onStatus("reconnecting");
      await sleep(retry, signal);
      retry = Math.min(retry * 2, 10000);
    }
  })();

  return { close: () => controller.abort() };
}
