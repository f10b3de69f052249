// imgclf's page: upload images and follow their tasks, and a live monitor of recent tasks.
// Plain JS with no build step; served with a strict CSP, so no inline code or markup styles
// (element.style set from script is allowed) and all text goes in through textContent.
"use strict";

(() => {
  const FINAL = new Set(["SUCCESS", "FAILURE"]);
  const KEY_STORAGE = "imgclf.apiKey";
  const UPLOADS_AT_ONCE = 3; // more would only queue behind each other in the browser
  const PAGE = 25;
  const MAX_LIMIT = 100; // refreshes re-read at most this many rows
  const REFRESH_MS = 2000;

  const $ = (id) => document.getElementById(id);

  // ---- API key and requests ----------------------------------------------------------------

  const keyInput = $("api-key");
  const authBanner = $("auth-banner");

  function storedKey() {
    try {
      return localStorage.getItem(KEY_STORAGE) || "";
    } catch {
      return ""; // storage disabled: the key lives in the field only
    }
  }

  function saveKey(key) {
    try {
      if (key) localStorage.setItem(KEY_STORAGE, key);
      else localStorage.removeItem(KEY_STORAGE);
    } catch {
      /* storage disabled */
    }
  }

  keyInput.value = storedKey();
  keyInput.addEventListener("input", () => {
    saveKey(keyInput.value.trim());
    authBanner.hidden = true;
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    $("key-state").textContent = keyInput.value ? "API key saved" : "No API key";
    retryUnauthorized();
    if (monitorShown()) refreshMonitor();
  });
  $("key-clear").addEventListener("click", () => {
    keyInput.value = "";
    saveKey("");
    $("key-state").textContent = "API key forgotten";
    keyInput.focus();
  });

  class ApiError extends Error {
    constructor(status, detail, retryAfter) {
      super(detail);
      this.status = status;
      this.retryAfter = retryAfter;
    }
  }

  // fetch with the API key; resolves to the JSON body, or throws an ApiError whose message is
  // the server's `detail` where it sent one.
  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const key = keyInput.value.trim();
    if (key) headers.set("Authorization", `Bearer ${key}`);
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(0, "The server could not be reached. Check your connection.");
    }
    let body = null;
    const text = await response.text();
    if (text) {
      try {
        body = JSON.parse(text);
      } catch {
        body = null;
      }
    }
    if (response.ok) return body;
    if (response.status === 401) showAuthNeeded();
    const detail =
      body && typeof body.detail === "string" && body.detail
        ? body.detail
        : `HTTP ${response.status} ${response.statusText}`.trim();
    const retryAfter = Number(response.headers.get("Retry-After")) || 0;
    throw new ApiError(response.status, detail, retryAfter);
  }

  function showAuthNeeded() {
    authBanner.hidden = false;
  }

  function explain(error) {
    if (error.status === 401) {
      return keyInput.value.trim()
        ? "The API key was refused. Check it in the API key field above."
        : "This server needs an API key: enter it in the API key field above.";
    }
    return error.message || String(error);
  }

  // A random idempotency key (crypto.randomUUID needs a secure context; this does not).
  function newKey() {
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  const sleep = (ms, signal) =>
    new Promise((resolve, reject) => {
      const timer = setTimeout(resolve, ms);
      signal?.addEventListener("abort", () => {
        clearTimeout(timer);
        reject(new DOMException("aborted", "AbortError"));
      });
    });

  // ---- Tabs (WAI-ARIA tabs pattern: arrows move between them) ------------------------------

  const tabs = [$("tab-classify"), $("tab-monitor")];

  function selectTab(tab, focus) {
    for (const t of tabs) {
      const selected = t === tab;
      t.setAttribute("aria-selected", String(selected));
      t.tabIndex = selected ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !selected;
    }
    if (focus) tab.focus();
    // #tasks opens the monitor, so it can be bookmarked; the upload view is the bare URL.
    const hash = tab.id === "tab-monitor" ? "#tasks" : "";
    if (location.hash !== hash) {
      history.replaceState(null, "", `${location.pathname}${location.search}${hash}`);
    }
    monitorVisibilityChanged();
  }

  for (const tab of tabs) {
    tab.addEventListener("click", () => selectTab(tab, false));
    tab.addEventListener("keydown", (event) => {
      const i = tabs.indexOf(tab);
      const next = {
        ArrowRight: tabs[(i + 1) % tabs.length],
        ArrowLeft: tabs[(i - 1 + tabs.length) % tabs.length],
        Home: tabs[0],
        End: tabs[tabs.length - 1],
      }[event.key];
      if (next) {
        event.preventDefault();
        selectTab(next, true);
      }
    });
  }

  // ---- Classify: drop zone, uploads and long polls ------------------------------------------

  const drop = $("drop");
  const fileInput = $("file-input");
  const results = $("results");
  const cardTemplate = $("card-template");
  const cards = new Set();
  let active = 0;
  const waiting = [];

  fileInput.addEventListener("change", () => {
    addFiles(fileInput.files);
    fileInput.value = ""; // the same file may be chosen again
  });

  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    addFiles(event.dataTransfer.files);
  });
  // A file dropped next to the zone would otherwise replace the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  $("clear-results").addEventListener("click", () => {
    for (const card of cards) card.abort.abort();
    cards.clear();
    waiting.length = 0;
    for (const img of results.querySelectorAll("img.thumb")) URL.revokeObjectURL(img.src);
    results.replaceChildren();
    $("results-head").hidden = true;
    fileInput.focus();
  });

  function addFiles(files) {
    const list = Array.from(files || []);
    if (!list.length) return;
    $("results-head").hidden = false;
    // Newest first, in the order chosen.
    for (const file of list.reverse()) {
      const card = makeCard(file);
      results.prepend(card.el);
      cards.add(card);
      enqueue(card);
    }
  }

  function makeCard(file) {
    const el = cardTemplate.content.firstElementChild.cloneNode(true);
    const card = {
      el,
      file,
      abort: new AbortController(),
      taskId: null,
      lastError: null,
      // One key for every try of this card's upload: a retry after a lost answer gets the
      // task the server already made, not a second one.
      idempotencyKey: newKey(),
    };
    const img = el.querySelector(".thumb");
    img.src = URL.createObjectURL(file);
    img.alt = file.name;
    el.querySelector(".name").textContent = file.name;
    el.querySelector(".name").title = file.name;
    el.querySelector(".retry").addEventListener("click", () => {
      card.abort = new AbortController();
      // A task the server no longer knows (expired, or a restart with memory:// results)
      // is uploaded again, as a new task.
      if (card.lastError?.status === 404) {
        card.taskId = null;
        card.idempotencyKey = newKey();
      }
      enqueue(card);
    });
    setState(card, "QUEUED", "Waiting to upload…");
    return card;
  }

  const STATE_TEXT = {
    QUEUED: "Queued",
    UPLOADING: "Uploading",
    PENDING: "Pending",
    STARTED: "Classifying",
    SUCCESS: "Done",
    FAILURE: "Failed",
    ERROR: "Error",
  };

  function setState(card, state, message) {
    card.state = state;
    card.el.dataset.state = state;
    const badge = card.el.querySelector(".badge");
    badge.textContent = STATE_TEXT[state] || state;
    badge.dataset.state = state;
    const msg = card.el.querySelector(".msg");
    msg.textContent = message || "";
    msg.hidden = !message;
    msg.classList.toggle("error", state === "ERROR" || state === "FAILURE");
    card.el.querySelector(".retry").hidden = state !== "ERROR";
    card.el.setAttribute("aria-busy", String(!FINAL.has(state) && state !== "ERROR"));
  }

  function enqueue(card) {
    setState(card, "QUEUED", "Waiting to upload…");
    waiting.push(card);
    pump();
  }

  function pump() {
    while (active < UPLOADS_AT_ONCE && waiting.length) {
      const card = waiting.shift();
      active += 1;
      run(card)
        .catch((error) => {
          if (error.name === "AbortError") return;
          card.lastError = error;
          setState(card, "ERROR", explain(error));
        })
        .finally(() => {
          active -= 1;
          pump();
        });
    }
  }

  function retryUnauthorized() {
    for (const card of cards) {
      if (card.state === "ERROR" && card.lastError?.status === 401) {
        card.abort = new AbortController();
        enqueue(card);
      }
    }
  }

  async function run(card) {
    const signal = card.abort.signal;
    if (!card.taskId) card.taskId = await upload(card, signal);
    card.el.dataset.taskId = card.taskId;
    await follow(card, signal);
  }

  // The server's limit for one image, from the page it served (0: unknown, not checked).
  const maxUploadBytes = Number(document.body.dataset.maxUploadBytes) || 0;

  function mebibytes(bytes) {
    return `${(bytes / 1048576).toFixed(1)}\u00a0MiB`;
  }

  // Uploads, waiting out 429 and 503 (backpressure) as the server's Retry-After asks. A file
  // over the server's limit is refused here, before its bytes are sent for a 413.
  async function upload(card, signal) {
    if (maxUploadBytes && card.file.size > maxUploadBytes) {
      const sizes = `${mebibytes(card.file.size)}; this server takes at most ${mebibytes(maxUploadBytes)}`;
      throw new ApiError(413, `This file is too large to upload (${sizes}).`);
    }
    for (let attempt = 1; ; attempt += 1) {
      setState(card, "UPLOADING", "Uploading…");
      const form = new FormData();
      form.append("file", card.file, card.file.name);
      try {
        const body = await api("api/upload-image", {
          method: "POST",
          body: form,
          headers: { "Idempotency-Key": card.idempotencyKey },
          signal,
        });
        return body.task_id;
      } catch (error) {
        const busy = error.status === 429 || error.status === 503;
        if (!busy || attempt >= 5) throw error;
        const seconds = Math.min(Math.max(error.retryAfter, 1), 30);
        setState(card, "UPLOADING", `The server is busy; retrying in ${seconds} s…`);
        await sleep(seconds * 1000, signal);
      }
    }
  }

  // Long-polls the task until it is final: the server answers as soon as it ends.
  async function follow(card, signal) {
    let failures = 0;
    for (;;) {
      let status;
      const asked = Date.now();
      try {
        status = await api(`api/task-status/${encodeURIComponent(card.taskId)}?wait=30`, {
          signal,
        });
        failures = 0;
      } catch (error) {
        // A lost connection or a busy server is waited out; a refusal (4xx) is final.
        const transient = error.status === 0 || error.status >= 500 || error.status === 429;
        if (!transient || failures >= 8) throw error;
        failures += 1;
        await sleep(Math.min(1000 * 2 ** failures, 15000), signal);
        continue;
      }
      showStatus(card, status);
      if (FINAL.has(status.state)) return;
      // A server (or proxy) that does not hold the request is not polled flat out.
      if (Date.now() - asked < 200) await sleep(500, signal);
    }
  }

  function showStatus(card, status) {
    const state = status.state;
    const attempts = status.attempts > 1 ? ` (attempt ${status.attempts})` : "";
    if (state === "SUCCESS") {
      setState(card, "SUCCESS", timingText(status.result?.timings));
      renderPredictions(card.el.querySelector(".preds"), status.result?.classification || []);
    } else if (state === "FAILURE") {
      setState(card, "FAILURE", status.error || "The image could not be classified.");
    } else if (state === "STARTED") {
      setState(card, "STARTED", `Classifying${attempts}…`);
    } else {
      setState(card, "PENDING", `Waiting for a worker${attempts}…`);
    }
  }

  function renderPredictions(list, predictions) {
    list.replaceChildren(
      ...predictions.slice(0, 5).map((p, i) => {
        const li = document.createElement("li");
        li.className = i === 0 ? "pred top" : "pred";
        const percent = `${(p.probability * 100).toFixed(1)}%`;
        const label = span("pred-label", p.label);
        label.title = `${p.label} (class ${p.class_id})`;
        const bar = span("pred-bar", "");
        const fill = span("pred-fill", "");
        fill.style.width = `${Math.max(0, Math.min(100, p.probability * 100))}%`;
        bar.append(fill);
        bar.setAttribute("aria-hidden", "true");
        li.append(label, span("pred-pct", percent), bar);
        return li;
      }),
    );
  }

  function span(className, text) {
    const el = document.createElement("span");
    el.className = className;
    el.textContent = text;
    return el;
  }

  const STAGES = [
    ["queue_wait_ms", "queue"],
    ["fetch_ms", "fetch"],
    ["preprocess_ms", "preprocess"],
    ["infer_ms", "infer"],
  ];

  function timingText(timings) {
    if (!timings) return "";
    return STAGES.filter(([key]) => typeof timings[key] === "number")
      .map(([key, name]) => `${name}\u00a0${formatMs(timings[key])}`)
      .join(" · ");
  }

  function formatMs(ms) {
    // No-break spaces: a number never wraps away from its unit.
    return ms >= 1000 ? `${(ms / 1000).toFixed(1)}\u00a0s` : `${Math.round(ms)}\u00a0ms`;
  }

  // ---- Task monitor --------------------------------------------------------------------------

  const monitorPanel = $("panel-monitor");
  const filter = $("state-filter");
  const live = $("live");
  const rows = $("task-rows");
  const loadMore = $("load-more");
  const monitorError = $("monitor-error");
  const monitor = {
    tasks: [],
    nextCursor: null,
    generation: 0, // bumped when the filter changes, so answers to older requests are dropped
    timer: null,
    busy: false,
    again: false, // a refresh was asked for while one was in flight
    errors: { list: null, summary: null },
  };

  filter.addEventListener("change", () => {
    monitor.generation += 1;
    monitor.tasks = [];
    monitor.nextCursor = null;
    renderTasks();
    refreshMonitor();
  });
  $("refresh").addEventListener("click", () => refreshMonitor());
  live.addEventListener("change", () => monitorVisibilityChanged());
  document.addEventListener("visibilitychange", () => monitorVisibilityChanged());
  loadMore.addEventListener("click", () => loadMoreTasks());

  function monitorShown() {
    return !monitorPanel.hidden && document.visibilityState === "visible";
  }

  function monitorVisibilityChanged() {
    clearTimeout(monitor.timer);
    monitor.timer = null;
    if (monitorShown()) refreshMonitor();
  }

  function schedule() {
    clearTimeout(monitor.timer);
    monitor.timer = null;
    if (monitorShown() && live.checked) monitor.timer = setTimeout(refreshMonitor, REFRESH_MS);
  }

  function tasksQuery(limit, cursor) {
    const params = new URLSearchParams({ limit: String(limit) });
    if (filter.value) params.set("state", filter.value);
    if (cursor) params.set("cursor", cursor);
    return `api/tasks?${params}`;
  }

  async function refreshMonitor() {
    if (monitor.busy) {
      monitor.again = true;
      return;
    }
    monitor.busy = true;
    monitor.again = false;
    const generation = monitor.generation;
    const limit = Math.min(Math.max(monitor.tasks.length, PAGE), MAX_LIMIT);
    try {
      const [list, summary] = await Promise.allSettled([
        api(tasksQuery(limit)),
        api("api/tasks/summary"),
      ]);
      if (generation !== monitor.generation) return;
      if (list.status === "fulfilled") {
        monitor.errors.list = null;
        mergeFirstPage(list.value, limit);
      } else {
        monitor.errors.list = explain(list.reason);
      }
      if (summary.status === "fulfilled") {
        monitor.errors.summary = null;
        renderSummary(summary.value);
      } else {
        monitor.errors.summary = explain(summary.reason);
      }
      renderTasks();
      $("updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;
    } finally {
      monitor.busy = false;
      if (monitor.again && monitorShown()) refreshMonitor();
      else schedule();
    }
  }

  // The refreshed first rows replace what was shown of them; older rows fetched by "load more"
  // stay, with their cursor, until a refresh reaches them.
  function mergeFirstPage(page, limit) {
    const fresh = Array.isArray(page?.tasks) ? page.tasks : [];
    const seen = new Set(fresh.map((t) => t.task_id));
    const last = fresh[fresh.length - 1];
    const complete = fresh.length < limit; // the server had no more: nothing older remains
    const tail =
      complete || !last
        ? []
        : monitor.tasks.filter((t) => !seen.has(t.task_id) && t.created_at_ms < last.created_at_ms);
    monitor.tasks = fresh.concat(tail);
    if (!tail.length) monitor.nextCursor = page?.next_cursor ?? null;
  }

  async function loadMoreTasks() {
    if (!monitor.nextCursor) return;
    const generation = monitor.generation;
    loadMore.disabled = true;
    loadMore.textContent = "Loading…";
    try {
      const page = await api(tasksQuery(PAGE, monitor.nextCursor));
      if (generation !== monitor.generation) return;
      const seen = new Set(monitor.tasks.map((t) => t.task_id));
      const more = (page?.tasks || []).filter((t) => !seen.has(t.task_id));
      monitor.tasks = monitor.tasks.concat(more);
      monitor.nextCursor = page?.next_cursor ?? null;
      monitor.errors.list = null;
    } catch (error) {
      monitor.errors.list = explain(error);
    } finally {
      loadMore.disabled = false;
      loadMore.textContent = "Load more";
      renderTasks();
    }
  }

  function renderSummary(summary) {
    const counts = summary?.counts || {};
    for (const state of ["PENDING", "STARTED", "SUCCESS", "FAILURE"]) {
      $(`count-${state}`).textContent = formatCount(counts[state]);
    }
    $("queue-depth").textContent = formatCount(summary?.queue_depth);
    $("dead-letters").textContent = formatCount(summary?.dead_letters);
    $("dead-letters").parentElement.classList.toggle("alarm", summary?.dead_letters > 0);
  }

  function formatCount(n) {
    return typeof n === "number" ? n.toLocaleString() : "–";
  }

  function renderTasks() {
    const { list, summary } = monitor.errors;
    // One cause (a missing key, the server down) is said once, not once per request.
    const errors =
      list && list === summary
        ? [list]
        : [list && `Task list: ${list}`, summary && `Counts: ${summary}`].filter(Boolean);
    monitorError.textContent = errors.join(" ");
    monitorError.hidden = !errors.length;
    const now = Date.now();
    rows.replaceChildren(...monitor.tasks.map((t) => taskRow(t, now)));
    $("tasks-empty").hidden = monitor.tasks.length > 0 || monitor.errors.list !== null;
    loadMore.hidden = !monitor.nextCursor;
  }

  function cell(label, ...children) {
    const td = document.createElement("td");
    td.dataset.label = label;
    td.append(...children);
    return td;
  }

  function badge(state, text) {
    const b = span("badge", text || STATE_TEXT[state] || state);
    b.dataset.state = state;
    return b;
  }

  function taskRow(task, now) {
    const tr = document.createElement("tr");
    tr.dataset.taskId = task.task_id;
    tr.dataset.state = task.state;

    const id = document.createElement("code");
    id.textContent = String(task.task_id).slice(0, 8);
    id.title = task.task_id;
    const filename = task.filename ?? task.result?.metadata?.filename;
    const idCell = cell("Task", id);
    if (filename) idCell.append(span("filename", filename));

    const stateCell = cell("State", badge(task.state, task.state));
    if (FINAL.has(task.state) && task.updated_at_ms && task.created_at_ms) {
      stateCell.append(span("sub", `in ${formatMs(task.updated_at_ms - task.created_at_ms)}`));
    }

    const created = document.createElement("time");
    if (task.created_at_ms) {
      const at = new Date(task.created_at_ms);
      created.dateTime = at.toISOString();
      created.title = at.toLocaleString();
      created.textContent = ago(now - task.created_at_ms);
    }

    const timings = task.result?.timings;
    const stages = timings
      ? span("stages", timingText(timings))
      : span("sub", task.state === "FAILURE" ? "—" : "…");

    let result;
    if (task.state === "SUCCESS" && task.result?.classification?.length) {
      const top = task.result.classification[0];
      result = span("top1", `${top.label} ${(top.probability * 100).toFixed(1)}%`);
    } else if (task.error) {
      result = span("error", task.error);
    } else {
      result = span("sub", "—");
    }

    const callback = webhookCell(task.webhook);

    tr.append(
      idCell,
      stateCell,
      cell("Attempts", String(task.attempts ?? 0)),
      cell("Created", created),
      cell("Stages", stages),
      cell("Result", result),
      cell("Callback", ...callback),
    );
    return tr;
  }

  function webhookCell(webhook) {
    if (!webhook) return [span("sub", "none")];
    const state = String(webhook.state || "").toLowerCase();
    const out = [badge(`WEBHOOK_${state.toUpperCase()}`, state || "?")];
    const details = [`${webhook.attempts ?? 0} attempt${webhook.attempts === 1 ? "" : "s"}`];
    if (webhook.last_status) details.push(webhook.last_status);
    out.push(span("sub", details.join(" · ")));
    return out;
  }

  function ago(ms) {
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return `${s} s ago`;
    const m = Math.round(s / 60);
    if (m < 60) return `${m} min ago`;
    const h = Math.round(m / 60);
    if (h < 48) return `${h} h ago`;
    return `${Math.round(h / 24)} d ago`;
  }

  // ---- Start ---------------------------------------------------------------------------------

  selectTab(location.hash === "#tasks" ? tabs[1] : tabs[0], false);
})();
