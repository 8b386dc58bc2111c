// The status page's script: polls /api/status every second and draws the jobs and the workers; the
// buttons POST /api/jobs/{id}/{pause,resume,cancel,retry}, and a keep-going job's task buttons
// /api/jobs/{id}/tasks/{index}/{cancel,retry}. No framework: the page is one table and a list of cards.
"use strict";

const POLL_MS = 1000;

const esc = (s) =>
  String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const image = (hash, max) => `/api/images/${encodeURIComponent(hash)}?max=${max}`;
// a task's log (its attempts, as text)
const taskLog = (job, t) => `/api/jobs/${encodeURIComponent(job.id)}/tasks/${t.index}/log`;
// a running task's latest preview from its worker; `v` changes with each new one
const livePreview = (job, t) =>
  `/api/jobs/${encodeURIComponent(job.id)}/tasks/${t.index}/preview?v=${t.preview_ms}`;
const percent = (f) => `${Math.floor(100 * f)}%`;

function bytes(n) {
  if (!n) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(n < 10 && i > 0 ? 1 : 0)} ${units[i]}`;
}

function ago(seconds) {
  if (seconds < 0) return "not since the coordinator started";
  if (seconds < 1) return "now";
  if (seconds < 120) return `${Math.round(seconds)} s ago`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min ago`;
  return `${Math.round(seconds / 3600)} h ago`;
}

// A duration in seconds for people: "40 s", "3 min", "2.5 h".
function span(s) {
  if (s < 120) return `${Math.round(s)} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function elapsed(job, now) {
  const end = job.finished_ms || now;
  const s = Math.max(0, (end - job.submitted_ms) / 1000);
  return s < 120 ? `${s.toFixed(0)} s` : `${(s / 60).toFixed(1)} min`;
}

function counts(c) {
  return ["running", "pending", "succeeded", "failed", "cancelled"]
    .filter((s) => c[s])
    .map((s) => `<span class="count ${s}">${c[s]} ${s}</span>`)
    .join(" ");
}

// A tiled job's current scale: the previous scale's stitched image, its tiles drawn over it as they finish.
function mosaic(job) {
  const [w, h] = job.canvas;
  const previous = job.previews.filter((p) => p.label.startsWith("scale")).pop();
  const done = job.tasks.filter((t) => t.state === "succeeded").length;
  const tiles = job.tasks
    .filter((t) => t.rect)
    .map((t) => {
      const [x, y, tw, th] = t.rect;
      const style = `left:${(100 * x) / w}%;top:${(100 * y) / h}%;width:${(100 * tw) / w}%;height:${(100 * th) / h}%`;
      const live = t.state === "running" && t.preview_ms
        ? `<img class="live" src="${livePreview(job, t)}" alt="tile ${t.index} rendering">`
        : "";
      const inner = t.result
        ? `<img src="${image(t.result, 128)}" alt="tile ${t.index}">`
        : t.state === "running"
          ? `${live}<div class="bar" style="width:${percent(t.progress)}"></div>`
          : "";
      return `<div class="tile ${esc(t.state)}" style="${style}" title="tile ${t.index}: ${esc(t.state)}">${inner}</div>`;
    })
    .join("");
  const background = previous ? `<img class="background" src="${image(previous.image, 512)}" alt="">` : "";
  return `<figure class="mosaic"><div class="canvas" style="aspect-ratio:${w}/${h}">${background}${tiles}</div>
    <figcaption>scale ${job.scale} of ${job.scales}, ${w}×${h}: ${done} of ${job.tasks_of} tiles${
      job.tasks.length < job.tasks_of ? ` (the first ${job.tasks.length} drawn)` : ""}</figcaption></figure>`;
}

// Task buttons pressed whose call has not answered yet ("job/task/action"): drawn disabled, as the job
// buttons are, though a redraw makes them anew.
const pressed = new Set();

// A keep-going job's task: a button that cancels it alone while it is queued or running, or runs it again
// once it failed or was cancelled (not once the job succeeded).
function taskButton(job, t) {
  if (!job.keep_going) return "";
  const action = ["pending", "running"].includes(t.state) && !job.finished
    ? "cancel"
    : ["failed", "cancelled"].includes(t.state) && job.state !== "succeeded" ? "retry" : "";
  const disabled = pressed.has(`${job.id}/${t.index}/${action}`) ? " disabled" : "";
  return action
    ? ` <button class="action ${action}" data-job="${esc(job.id)}" data-task="${t.index}" data-action="${action}"${disabled}>${action}</button>`
    : "";
}

function taskRows(job) {
  if (job.kind === "tiled") return "";
  const rows = job.tasks
    .map((t) => {
      const progress = (t.state === "running" && t.iterations
        ? `${t.iteration}/${t.iterations}${t.loss != null ? ` · loss ${t.loss.toPrecision(4)}` : ""}${
          t.eta_s != null ? ` · ${span(t.eta_s)} left` : ""}`
        : "") + (t.checkpoint ? ` · checkpoint: scale ${t.checkpoint[0]}, iteration ${t.checkpoint[1]}` : "");
      const thumb = t.result
        ? `<img src="${image(t.result, 128)}" alt="task ${t.index}">`
        : t.state === "running" && t.preview_ms
          ? `<img class="live" src="${livePreview(job, t)}" alt="task ${t.index} rendering">`
          : "";
      return `<tr class="task ${esc(t.state)}"><td>${t.index}</td><td>${esc(t.label)}</td>
        <td><span class="badge ${esc(t.state)}">${esc(t.state)}</span></td><td>${esc(t.worker)}</td>
        <td><progress max="1" value="${t.progress}"></progress> ${progress}</td><td>${thumb}</td>
        <td><span class="err">${esc(t.error)}</span>${
          t.warnings.map((w) => `<span class="warn">warning: ${esc(w)}</span>`).join("")}  <a class="log" href="${taskLog(job, t)}" target="_blank" rel="noopener">log</a>${
          taskButton(job, t)}</td></tr>`;
    })
    .join("");
  const more = job.tasks.length < job.tasks_of ? `<p class="more">the first ${job.tasks.length} of ${job.tasks_of} tasks</p>` : "";
  return `<table class="tasks"><thead><tr><th>#</th><th>task</th><th>state</th><th>worker</th><th>progress</th>
    <th>result</th><th></th></tr></thead><tbody>${rows}</tbody></table>${more}`;
}

// A job's card: a head (id, state, progress, counts, time) and a body (previews, tiles, tasks), each
// redrawn only when its markup changes, and its action buttons made once (shown or hidden by its state): a
// redraw never takes a button from under a click.
function headHtml(job, now) {
  const scale = job.scales ? `<span>scale ${job.scale} of ${job.scales}</span>` : "";
  const name = job.name ? ` <strong class="name">${esc(job.name)}</strong>` : "";
  return `<code>${esc(job.id)}</code>${name} <span class="kind">${esc(job.kind)}</span>
    <span class="badge ${esc(job.state)}">${esc(job.state)}</span>${
      job.paused && !job.finished ? ` <span class="badge paused">paused</span>` : ""}
    <progress max="1" value="${job.progress}"></progress><span class="percent">${percent(job.progress)}</span>
    ${scale} <span class="counts">${counts(job.counts)}</span> <span class="time">${elapsed(job, now)}</span>`;
}

// The content images a keep-going batch left out at its submit: how many, then the first few (which file,
// why), and how many more.
function leftOutHtml(leftOut, count) {
  if (!count) return "";
  const items = leftOut.map((why) => `<li>${esc(why)}</li>`).join("");
  const more = count > leftOut.length ? `<li>and ${count - leftOut.length} more (stylefarm status)</li>` : "";
  return `<details class="err"><summary>${count} content image(s) left out at its submit</summary>
    <ul>${items}${more}</ul></details>`;
}

function bodyHtml(job) {
  const previews = job.previews
    .map((p) => `<figure><img src="${image(p.image, 256)}" alt="${esc(p.label)}"><figcaption>${esc(p.label)}</figcaption></figure>`)
    .join("");
  const live = job.kind === "tiled" && !job.finished && job.canvas[0] > 0 ? mosaic(job) : "";
  return `${job.error ? `<p class="err">${esc(job.error)}</p>` : ""}
    ${job.waiting ? `<p class="waiting">waiting: ${esc(job.waiting)}</p>` : ""}
    ${leftOutHtml(job.left_out, job.left_out_count)}
    <div class="previews">${previews}${live}</div>${taskRows(job)}`;
}

const cards = new Map(); // job id -> { card, head, body, and a button per action }

// A job's action: a button that POSTs /api/jobs/{id}/{action}, labelled with the action.
function actionButton(job, action) {
  const button = document.createElement("button");
  button.className = `action ${action}`;
  button.dataset.job = job.id;
  button.dataset.action = action;
  button.textContent = action;
  return button;
}

function card(job) {
  let c = cards.get(job.id);
  if (!c) {
    const article = document.createElement("article");
    article.id = `job-${job.id}`;
    article.innerHTML = `<div class="head"><span class="info"></span></div><div class="body"></div>`;
    const actions = ["pause", "resume", "cancel", "retry"];
    const [pause, resume, cancel, retry] = actions.map((action) => actionButton(job, action));
    article.querySelector(".head").append(pause, resume, cancel, retry);
    const [head, body] = [article.querySelector(".info"), article.querySelector(".body")];
    c = { article, head, body, pause, resume, cancel, retry, shown: {} };
    cards.set(job.id, c);
  }
  return c;
}

// Redraws `el` when its markup changed, but not while a button in it is pressed: its click would be lost.
function update(el, key, html, shown) {
  if (shown[key] !== html && !el.querySelector("button:active")) {
    el.innerHTML = html;
    shown[key] = html;
  }
}

function drawJobs(status) {
  const list = document.getElementById("jobs");
  const ids = new Set(status.jobs.map((j) => j.id));
  for (const [id, c] of cards) {
    if (!ids.has(id)) {
      c.article.remove();
      cards.delete(id);
    }
  }
  let previous = null;
  for (const job of status.jobs) {
    const c = card(job);
    c.article.className = `job ${job.state}`;
    update(c.head, "head", headHtml(job, status.now_ms), c.shown);
    update(c.body, "body", bodyHtml(job), c.shown);
    c.cancel.hidden = job.finished;
    c.pause.hidden = job.finished || job.paused;
    c.resume.hidden = job.finished || !job.paused;
    // a failed or cancelled job runs again: its failed and cancelled tasks, its results kept; so do a
    // keep-going batch's tasks that failed, or were cancelled alone, while it runs
    c.retry.hidden = !job.finished
      ? !(job.counts.failed || (job.keep_going && job.counts.cancelled))
      : job.state === "succeeded";
    // newest first: moved only when out of place
    const want = previous ? previous.nextSibling : list.firstChild;
    if (want !== c.article) list.insertBefore(c.article, want);
    previous = c.article;
  }
  document.getElementById("no-jobs").hidden = status.jobs.length > 0;
}

function workerRow(w) {
  const memory = w.memory_bytes ? `${bytes(w.memory_used_bytes)} of ${bytes(w.memory_bytes)}` : bytes(w.memory_used_bytes);
  const task = w.health === "busy"
    ? `${w.job_id ? `<code>${esc(w.job_id)}</code> #${w.task}` : "another tenant's task"}
       <progress max="1" value="${w.progress}"></progress>`
    : "";
  const tags = w.tags.map((t) => ` <span class="tag">${esc(t)}</span>`).join("");
  return `<tr class="worker ${esc(w.health)}"><td><code>${esc(w.id)}</code>${tags}</td><td>${esc(w.device || "?")}</td>
    <td>${memory}</td><td><span class="badge ${esc(w.health)}">${esc(w.health)}</span>${w.drained ? ` <span class="badge drained">drained</span>` : ""}${w.leaving ? ` <span class="badge drained">leaving</span>` : ""}${w.name_shared ? ` <span class="badge drained" title="another worker process runs under this name: the farm counts them as one">name shared</span>` : ""}</td><td>${task}</td>
    <td>${ago(w.last_seen_s)}</td></tr>`;
}

let shownWorkers = null;

function draw(status) {
  drawJobs(status);
  const workers = status.workers.map(workerRow).join("") || `<tr><td colspan="6">No workers yet.</td></tr>`;
  if (workers !== shownWorkers) {
    document.querySelector("#workers tbody").innerHTML = workers;
    shownWorkers = workers;
  }
  const live = status.workers.filter((w) => w.health === "busy" || w.health === "idle").length;
  const running = status.jobs.filter((j) => !j.finished).length;
  document.getElementById("summary").textContent =
    `${status.tenant ? `tenant ${status.tenant} · ` : ""}${running} unfinished jobs · ${live} live workers`;
  document.getElementById("logout").hidden = !status.auth;
}

function showError(message) {
  const p = document.getElementById("error");
  p.textContent = message;
  p.hidden = !message;
}

async function refresh() {
  try {
    const response = await fetch("/api/status", { credentials: "same-origin", cache: "no-store" });
    if (response.status === 401) {
      location.reload(); // the login form
      return;
    }
    if (!response.ok) throw new Error(`${response.status}: ${await response.text()}`);
    draw(await response.json());
    showError("");
  } catch (e) {
    showError(`cannot read the coordinator's status: ${e.message}`);
  }
}

document.addEventListener("click", async (event) => {
  const button = event.target.closest("button.action");
  if (!button) return;
  const action = button.dataset.action;
  // a task's button acts on that task alone
  const task = button.dataset.task !== undefined ? `tasks/${button.dataset.task}/` : "";
  const key = `${button.dataset.job}/${button.dataset.task}/${action}`;
  if (task) pressed.add(key);
  button.disabled = true;
  button.textContent = `${action}…`;
  try {
    const response = await fetch(`/api/jobs/${encodeURIComponent(button.dataset.job)}/${task}${action}`, {
      method: "POST",
      credentials: "same-origin",
      headers: { "X-Stylefarm-Csrf": "1" },
    });
    if (!response.ok) throw new Error(`${response.status}: ${await response.text()}`);
    showError("");
  } catch (e) {
    showError(`${action} failed: ${e.message}`);
  }
  pressed.delete(key);
  button.disabled = false;
  button.textContent = action;
  refresh();
});

refresh();
setInterval(refresh, POLL_MS);
