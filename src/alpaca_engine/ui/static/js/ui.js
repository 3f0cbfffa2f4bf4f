// Small shared pieces: the status toast and polling that pauses in background tabs.

let toastTimer = null;

/** Show a short message in the live region (read out by screen readers). */
export function toast(text, kind = "info") {
  const el = document.getElementById("toast");
  el.textContent = text;
  el.className = `toast show ${kind}`;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { el.className = "toast"; }, kind === "error" ? 8000 : 4000);
}

/**
 * Call `fn` now and every `ms` while the tab is visible; calls never overlap.
 * Returns {stop(), now()}; now() refreshes at once (coalescing bursts of calls).
 */
export function poll(fn, ms) {
  let timer = null;
  let running = false;
  let again = false;
  let stopped = false;

  async function tick() {
    clearTimeout(timer);
    if (stopped) return;
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      await fn();
    } catch (error) {
      console.warn(error);
    } finally {
      running = false;
    }
    if (stopped) return;
    if (again) {
      again = false;
      tick();
      return;
    }
    timer = setTimeout(() => {
      if (document.hidden) {
        document.addEventListener("visibilitychange", tick, { once: true });
      } else {
        tick();
      }
    }, ms);
  }

  tick();
  return {
    stop() { stopped = true; clearTimeout(timer); },
    now() { tick(); },
  };
}

/** Show an API failure where the content would be. */
export function errorText(error) {
  if (error?.status === 401) return "An API key is needed to see this (enter it above).";
  if (error?.status === 403) return `Not allowed: ${error.message}`;
  if (error?.status === 404) return "Not found.";
  return `Could not load: ${error?.message || error}`;
}

/** A failed call as one readable line, from its problem+json body. */
export function oneLine(error) {
  const text = String(error?.message || error).replace(/\s+/g, " ").trim();
  if (error?.status === 422 && error.code === "validation_error") {
    // "body.content: Value error, the message is empty; …" → "content: the message is empty; …"
    return text.replace(/^body\./, "").replace(/: Value error, /, ": ");
  }
  return text;
}

/**
 * On the form's submit, run `action` with `button` disabled and `message` saying "Starting…";
 * a failure shows as "`failure`: reason". An action that returns false did not start.
 */
export function onSubmit(form, button, message, failure, action) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    message.className = "form-message";
    message.textContent = "Starting…";
    try {
      if (await action() === false) message.textContent = "";
    } catch (error) {
      message.className = "form-message error";
      message.textContent = `${failure}: ${oneLine(error)}`;
    } finally {
      button.disabled = false;
    }
  });
}
