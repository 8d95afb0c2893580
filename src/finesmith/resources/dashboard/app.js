// The finesmith dashboard: plain DOM and fetch against the server's own /v1 API; no libraries.
"use strict";
const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
keyInput.value = localStorage.getItem("finesmith-key") || "";
keyInput.addEventListener("change", () => {
  localStorage.setItem("finesmith-key", keyInput.value);
  tick(); refreshReports();
});
let selected = null; // {kind: "job"|"run", id}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}
async function api(path, options) {
  options = options || {};
  const response = await fetch(path, Object.assign({}, options, {headers: headers(options.headers)}));
  const text = await response.text();
  const body = text && (response.headers.get("content-type") || "").includes("json") ? JSON.parse(text) : text;
  if (!response.ok) throw new Error((body && body.error && body.error.message) || response.statusText);
  return body;
}
function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
}
const fmt = (x) => (typeof x === "number" ? x.toFixed(4) : "");
const when = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "");

async function refreshJobs() {
  const jobs = (await api("/v1/fine_tuning/jobs?limit=50")).data;
  const body = $("jobs").tBodies[0];
  body.replaceChildren();
  for (const job of jobs) {
    const row = body.insertRow();
    row.className = "selectable" + (selected && selected.id === job.id ? " selected" : "");
    row.dataset.job = job.id;
    cell(row, job.id); cell(row, job.model); cell(row, job.method.type);
    cell(row, job.status, "status-" + job.status); cell(row, job.fine_tuned_model); cell(row, when(job.created_at));
    const action = {running: "pause", queued: "pause", paused: "resume"}[job.status];
    const td = row.insertCell();
    if (action) { // pause: the job checkpoints and stops; resume: it continues from that checkpoint
      const button = document.createElement("button");
      button.textContent = action;
      button.addEventListener("click", async (e) => {
        e.stopPropagation();
        try { await api("/v1/fine_tuning/jobs/" + job.id + "/" + action, {method: "POST"}); } catch (error) { td.title = error.message; }
        refreshJobs();
      });
      td.appendChild(button);
    }
    row.addEventListener("click", () => { selected = {kind: "job", id: job.id}; refreshCurve(); refreshJobs(); });
  }
}
async function refreshRuns() {
  const runs = (await api("/v1/finesmith/runs")).data;
  const body = $("runs").tBodies[0];
  body.replaceChildren();
  for (const run of runs) {
    const row = body.insertRow();
    row.className = "selectable" + (selected && selected.id === run.id ? " selected" : "");
    row.dataset.run = run.id;
    cell(row, run.job ? run.name + " (job)" : run.name); cell(row, run.state, "state-" + run.state);
    if (run.error) row.title = run.error; // a damaged run: why it cannot be read
    cell(row, run.method); cell(row, run.objective);
    cell(row, run.steps !== null && run.steps !== undefined ? run.steps + "/" + run.total_steps : "/" + run.total_steps);
    cell(row, fmt(run.final_loss)); cell(row, fmt(run.eval_loss));
    row.addEventListener("click", () => { selected = {kind: "run", id: run.id}; refreshCurve(); refreshRuns(); });
  }
  return runs;
}
function draw(series) {
  const svg = $("curve");
  svg.replaceChildren();
  const points = [].concat(...series.map((s) => s.points));
  if (!points.length) { $("curve-legend").textContent = "no steps yet"; return; }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-6);
  const X = (x) => 10 + 580 * (x - x0) / (x1 - x0), Y = (y) => 210 - 200 * (y - y0) / (y1 - y0);
  for (const s of series) {
    if (!s.points.length) continue;
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", s.points.map((p) => X(p[0]).toFixed(1) + "," + Y(p[1]).toFixed(1)).join(" "));
    line.setAttribute("fill", "none"); line.setAttribute("stroke", s.color); line.setAttribute("stroke-width", "2");
    line.setAttribute("class", "series-" + s.name); line.dataset.points = String(s.points.length);
    svg.appendChild(line);
  }
  const last = series[0].points[series[0].points.length - 1];
  $("curve-legend").textContent = series.map((s) => s.name + " (" + s.points.length + " points)").join(" · ") +
    (last ? " · step " + last[0] + ": " + fmt(last[1]) : "") + " · range " + fmt(y0) + " – " + fmt(y1);
}
async function refreshCurve() {
  if (!selected) return;
  let runId = selected.id;
  if (selected.kind === "job") {
    const run = (await api("/v1/finesmith/runs")).data.find((r) => r.job === selected.id);
    $("curve-title").textContent = selected.id;
    if (!run) { draw([{name: "loss", color: "#1a56db", points: []}]); return; }
    runId = run.id;
  } else {
    $("curve-title").textContent = runId;
  }
  const m = await api("/v1/finesmith/runs/" + runId + "/metrics");
  draw([{name: "loss", color: "#1a56db", points: m.loss}, {name: "eval_loss", color: "#e8710a", points: m.eval_loss}]);
}
async function refreshModels() {
  const models = (await api("/v1/models")).data.map((m) => m.id);
  for (const id of ["job-model", "chat-model"]) {
    const select = $(id), current = select.value;
    const bases = id === "job-model" ? models.filter((m) => !m.startsWith("ft:")) : models;
    if (select.options.length === bases.length && [...select.options].every((o, i) => o.value === bases[i])) continue;
    select.replaceChildren(...bases.map((m) => new Option(m, m)));
    if (bases.includes(current)) select.value = current;
  }
}
async function refreshReports() {
  const ul = $("reports");
  let list;
  try {
    list = (await api("/v1/finesmith/reports")).data;
  } catch (error) {
    ul.textContent = "error: " + error.message;
    return;
  }
  ul.replaceChildren();
  if (!list.length) { ul.textContent = "none yet: a job with a validation file ends with one; so does `finesmith compare` under --runs"; return; }
  for (const r of list) {
    const li = document.createElement("li"), a = document.createElement("a");
    a.href = "#"; a.textContent = r.name;
    a.addEventListener("click", async (e) => {
      e.preventDefault();
      const frame = $("report");
      frame.srcdoc = await api("/v1/finesmith/reports/" + r.id);
      frame.hidden = false;
    });
    li.appendChild(a); ul.appendChild(li);
  }
}
$("job-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const message = $("job-message");
  message.className = ""; message.textContent = "uploading…";
  try {
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", $("job-file").files[0]);
    const file = await api("/v1/files", {method: "POST", body: form});
    const method = $("job-method").value, body = {model: $("job-model").value, training_file: file.id,
      method: {type: method, [method]: {hyperparameters: {n_epochs: Number($("job-epochs").value)}}}};
    if ($("job-suffix").value) body.suffix = $("job-suffix").value;
    const job = await api("/v1/fine_tuning/jobs", {method: "POST", body: JSON.stringify(body),
                                                   headers: {"Content-Type": "application/json"}});
    selected = {kind: "job", id: job.id};
    message.textContent = "started " + job.id;
    await refreshJobs();
  } catch (error) {
    message.className = "error"; message.textContent = error.message;
  }
});
$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("chat-input"), log = $("chat-log"), text = input.value;
  const line = (cls, content) => {
    const div = document.createElement("div");
    div.className = cls; div.textContent = content; log.appendChild(div);
  };
  input.value = "";
  line("mine", "you: " + text);
  try {
    const reply = await api("/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({model: $("chat-model").value, max_tokens: 64,
                            messages: [{role: "user", content: text}]})});
    line("reply", reply.model + ": " + reply.choices[0].message.content);
  } catch (error) {
    line("error", "error: " + error.message);
  }
});
async function tick() {
  try {
    await Promise.all([refreshJobs(), refreshRuns(), refreshModels()]);
    await refreshCurve();
  } catch (error) {
    $("curve-legend").textContent = "error: " + error.message;
  }
}
tick(); refreshReports();
setInterval(tick, 1000);
