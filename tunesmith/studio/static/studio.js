// tunesmith studio: one page over the studio's JSON API. No build step, no network beyond the studio.
"use strict";

const $ = (selector) => document.querySelector(selector);
const POLL_MS = 2000;
const token = new URLSearchParams(location.search).get("token") || sessionStorage.getItem("token") || "";
if (token) sessionStorage.setItem("token", token);
let openRun = null;
let fieldsLoaded = false;

// ---- talking to the studio ----

function withToken(url) {
  return token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url;
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers.Authorization = "Bearer " + token;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  const body = await response.json().catch(() => ({ problems: [`${response.status} ${response.statusText}`] }));
  if (!response.ok) throw new Error((body.problems || [response.statusText]).join("; "));
  return body;
}

const post = (path, body) => api(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                         body: JSON.stringify(body || {}) });

function banner(message) {
  const box = $("#banner");
  box.textContent = message || "";
  box.hidden = !message;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child === null || child === undefined ? "" : child);
  return node;
}

const fmt = (value, digits = 4) => typeof value === "number" ? value.toPrecision(digits) : (value ?? "");

// ---- tabs ----

function showTab() {
  const [tab, arg] = decodeURIComponent(location.hash.slice(1) || "runs").split("/");
  for (const section of document.querySelectorAll("main > section")) section.hidden = section.id !== "tab-" + tab;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.tab === tab);
  openRun = tab === "run" ? arg : null;
  if (tab === "new" && !fieldsLoaded) loadFields();
  if (tab === "run") refreshRun();
  if (tab === "compare" || tab === "chat") refreshRuns();
}

// ---- runs ----

let knownRuns = [];

async function refreshRuns() {
  let state;
  try { state = await api("/api/runs"); banner(""); } catch (err) { banner("The studio does not answer: " + err.message); return; }
  knownRuns = state.runs;
  $("#root").textContent = "runs in " + state.root;
  const body = $("#runs tbody");
  body.replaceChildren(...state.runs.map((run) => {
    const row = el("tr", { "data-run": run.name },
      el("td", {}, run.name), el("td", {}, el("span", { class: "status " + run.status }, run.status)),
      el("td", {}, run.method), el("td", {}, run.data || ""),
      el("td", { class: "num" }, run.max_steps ? `${run.step} / ${run.max_steps}` : String(run.step)),
      el("td", { class: "num" }, fmt(run.best_val_loss)), el("td", {}, run.evaluation || (run.error ? "failed: " + run.error : "")));
    row.addEventListener("click", () => { location.hash = "run/" + encodeURIComponent(run.name); });
    return row;
  }));
  $("#runs-empty").hidden = state.runs.length > 0;
  fillPicks();
}

async function refreshRun() {
  if (!openRun) return;
  let run;
  try { run = await api("/api/runs/" + encodeURIComponent(openRun)); } catch (err) {
    $("#run-title").textContent = openRun;
    $("#run-status").textContent = "";
    $("#run-error").textContent = err.message;
    $("#run-error").hidden = false;
    return;
  }
  $("#run-title").textContent = run.name;
  $("#run-status").textContent = run.status + (run.max_steps ? ` · step ${run.step} / ${run.max_steps}` : ` · step ${run.step}`);
  $("#run-status").className = "status " + run.status;
  $("#run-error").textContent = run.error ? "Failed: " + run.error : "";
  $("#run-error").hidden = !run.error;
  $("#run-problems").replaceChildren(...run.problems.map((p) => el("li", {}, p)));
  const training = run.status === "running" || run.status === "starting";
  const jobBusy = run.job && run.job.running;
  $("#act-stop").disabled = !training;
  $("#act-resume").disabled = !run.resumable || jobBusy;
  for (const id of ["#act-evaluate", "#act-merge", "#act-export", "#act-report"]) $(id).disabled = run.status !== "finished" || jobBusy;
  $("#open-report").hidden = run.status !== "finished";
  $("#open-report").href = withToken(`/api/runs/${encodeURIComponent(run.name)}/report`);
  drawRunCharts(run.curves);
  showDiagnosis($("#diagnosis"), run.diagnosis);
  showResults($("#evaluation"), run.results);
  showExports(run.export || []);
  $("#commands").textContent = Object.entries(run.commands).map(([what, cmd]) => `# ${what}\n${cmd}`).join("\n");
  $("#job-log").textContent = run.job ? `$ ${run.job.command}\n${run.log}` : run.log;
}

function drawRunCharts(curves) {
  const charts = [
    ["loss", "loss (training and validation)", [["loss", curves.loss], ["val_loss", curves.val_loss]]],
    ["lr", "learning rate", [["lr", curves.lr]]],
    ["tokens_per_second", "tokens / s", [["tokens_per_second", curves.tokens_per_second]]],
  ];
  if (curves.reward_accuracy) charts.push(["reward_accuracy", "preference accuracy",
    [["reward_accuracy", curves.reward_accuracy], ["val_reward_accuracy", curves.val_reward_accuracy]]]);
  $("#charts").replaceChildren(...charts.map(([key, title, series]) =>
    chart(key, title, series.filter(([, points]) => points && points.length))));
}

const DOTS_UP_TO = 30;
const COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"];

// A line chart: series = [[name, [[step, value], ...]], ...]. Each line carries its point count.
function chart(key, title, series, width = 420, height = 230) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("data-chart", key);
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  add("text", { x: 10, y: 16 }, title);
  const all = series.flatMap(([, points]) => points);
  if (!all.length) { add("text", { x: 10, y: 40 }, "no points yet"); return svg; }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const left = 56, right = width - 10, top = 26, bottom = height - 36;
  const sx = (x) => left + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (right - left);
  const sy = (y) => bottom - (y1 === y0 ? 0.5 : (y - y0) / (y1 - y0)) * (bottom - top);
  add("line", { x1: left, y1: bottom, x2: right, y2: bottom, stroke: "#9aa6bd" });
  add("line", { x1: left, y1: top, x2: left, y2: bottom, stroke: "#9aa6bd" });
  add("text", { x: 4, y: top + 8 }, fmt(y1, 3));
  add("text", { x: 4, y: bottom }, fmt(y0, 3));
  add("text", { x: left, y: bottom + 14 }, String(x0));
  add("text", { x: right - 30, y: bottom + 14 }, String(x1));
  add("text", { x: (left + right) / 2 - 12, y: bottom + 14 }, "step");
  series.forEach(([name, points], i) => {
    add("polyline", { points: points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "),
                      fill: "none", stroke: COLORS[i % COLORS.length], "stroke-width": 1.6,
                      "data-series": name, "data-count": points.length });
    if (points.length <= DOTS_UP_TO) {  // a handful of points (validation passes): each one seen
      for (const p of points) add("circle", { cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 2.5, fill: COLORS[i % COLORS.length] });
    }
    add("text", { x: left + 8 + 130 * i, y: height - 6, fill: COLORS[i % COLORS.length] }, name);
  });
  return svg;
}

function showDiagnosis(box, found) {
  if (!found) { box.replaceChildren(); return; }
  box.replaceChildren(el("h3", {}, "Diagnosis"),
    el("p", { class: found.verdict === "well_fit" ? "good" : "warning" }, found.headline),
    el("ul", {}, ...found.findings.map((f) => el("li", {}, f))),
    found.advice.length ? el("p", {}, "What to change:") : "",
    el("ul", {}, ...found.advice.map((a) => el("li", {}, a))));
}

const METRICS = ["test_loss", "perplexity", "exact_match", "token_f1", "rougeL", "bleu", "preference_accuracy", "logp_margin"];

// columns = [[name, {metric: value}], ...] → the rows of a metric-by-column table.
function resultsTable(columns) {
  const metrics = METRICS.filter((m) => columns.some(([, r]) => r && typeof r[m] === "number"));
  return [el("tr", {}, el("th", {}, "metric"), ...columns.map(([name]) => el("th", {}, name))),
    ...metrics.map((m) => el("tr", {}, el("td", {}, m), ...columns.map(([, r]) => el("td", { class: "num" }, r ? fmt(r[m]) : "—"))))];
}

function showResults(box, results) {
  if (!results) { box.replaceChildren(el("p", {}, "Not evaluated yet: press Evaluate.")); return; }
  const table = el("table", { id: "eval-table" });
  table.replaceChildren(...resultsTable(Object.entries(results)));
  const n = Object.values(results)[0].n_test;
  box.replaceChildren(el("h3", {}, `Evaluation on ${n} held-out rows (base vs tuned)`), table);
}

function showExports(exports) {
  $("#exports").replaceChildren(...(exports.length ? [el("h3", {}, "Exports")] : []), ...exports.map((e) =>
    el("p", {}, `${e.folder}/${e.file} (${e.type}): llama.cpp gave the same answer as the run on ` +
      `${e.same_answers} of ${e.prompts} held-out prompts (agreement ${fmt(e.agreement, 3)})`)));
}

async function action(verb) {
  $("#act-message").textContent = "";
  try {
    const query = verb === "export" ? "?type=" + $("#export-type").value : "";
    const done = await post(`/api/runs/${encodeURIComponent(openRun)}/${verb}${query}`);
    $("#act-message").textContent = done.command ? "Started: " + done.command : done.note || "";
  } catch (err) { $("#act-message").textContent = err.message; }
  refreshRun();
}

// ---- new run ----

async function loadFields() {
  const { fields } = await api("/api/fields");
  fieldsLoaded = true;
  const field = (f) => {
    const id = "f-" + f.key.replaceAll(".", "-");
    const input = f.choices
      ? el("select", { id, name: f.key }, ...f.choices.map((c) => { const o = el("option", { value: c }, c); if (c === f.default) o.selected = true; return o; }))
      : el("input", { id, name: f.key, placeholder: f.default });
    input.dataset.default = f.default;
    return el("label", {}, f.key, input, el("small", {}, f.doc));
  };
  $("#basic-fields").replaceChildren(...fields.filter((f) => f.basic).map(field));
  const sections = {};
  for (const f of fields.filter((f) => !f.basic)) (sections[f.section] ||= []).push(f);
  $("#more-fields").replaceChildren(...Object.entries(sections).map(([name, list]) =>
    el("details", {}, el("summary", {}, `${name} (${list.length} keys)`), el("div", { class: "fields" }, ...list.map(field)))));
  for (const input of document.querySelectorAll("#new-run input, #new-run select")) input.addEventListener("change", () => { $("#start").disabled = true; });
}

function formValues() {
  const values = {};
  for (const input of document.querySelectorAll("#new-run [name]")) {
    if (input.name === "name") continue;
    const value = input.value.trim();
    if (value !== "" && value !== input.dataset.default) values[input.name] = value;
  }
  return { name: $("#f-name").value.trim(), values };
}

async function checkNew() {
  $("#problems").replaceChildren(el("li", { class: "warning" }, "checking the data and the memory ..."));
  $("#start").disabled = true;
  let result;
  try { result = await post("/api/check", formValues()); } catch (err) { $("#problems").replaceChildren(el("li", {}, err.message)); return; }
  $("#problems").replaceChildren(...result.problems.map((p) => el("li", {}, p)));
  $("#new-command").textContent = result.command || "";
  if (result.problems.length) { $("#doctor").replaceChildren(); $("#memory").textContent = ""; return; }
  const d = result.doctor;
  $("#doctor").replaceChildren(el("h3", {}, "Data doctor: " + d.verdict),
    d.rows ? el("p", {}, `${d.format} rows, template ${d.template}; ` + Object.entries(d.rows).map(([s, n]) => `${s} ${n}`).join(", ")) : "",
    el("ul", {}, ...d.findings.map((f) => el("li", { class: f.level === "problem" ? "problem" : f.level === "warning" ? "warning" : "" }, f.message))),
    d.plot ? el("img", { src: withToken("/api/doctor/" + d.plot + "?t=" + Date.now()), alt: "token lengths", id: "doctor-plot" }) : "");
  const m = result.memory;
  $("#memory").textContent = (m.fits === null ? "" : m.fits ? "Memory: fits.\n" : "Memory: does NOT fit.\n") + m.lines.join("\n");
  $("#start").disabled = d.findings.some((f) => f.level === "problem") && !d.rows;
}

async function startNew() {
  try {
    const started = await post("/api/runs", formValues());
    location.hash = "run/" + encodeURIComponent(started.name);
  } catch (err) { $("#problems").replaceChildren(el("li", {}, err.message)); }
}

async function uploadFile() {
  const file = $("#upload").files[0];
  if (!file) return;
  $("#upload-note").textContent = "uploading ...";
  try {
    const done = await api("/api/upload/" + encodeURIComponent(file.name.replace(/[^A-Za-z0-9_.-]/g, "-")),
                           { method: "PUT", body: file });
    $("#f-data-path").value = done.path;
    $("#upload-note").textContent = `saved as ${done.path} (${done.bytes} bytes)`;
  } catch (err) { $("#upload-note").textContent = err.message; }
}

// ---- compare ----

function fillPicks() {
  const picked = new Set([...document.querySelectorAll("#compare-picks input:checked")].map((i) => i.value));
  $("#compare-picks").replaceChildren(...knownRuns.map((run) => el("label", {},
    Object.assign(el("input", { type: "checkbox", class: "pick", value: run.name }), { checked: picked.has(run.name) }),
    ` ${run.name} `)));
  const select = $("#chat-run"), current = select.value;
  select.replaceChildren(...knownRuns.filter((r) => r.status === "finished" || r.status === "interrupted").map((r) => el("option", { value: r.name }, r.name)));
  if (current) select.value = current;
}

async function compareRuns() {
  const names = [...document.querySelectorAll("#compare-picks input:checked")].map((i) => i.value);
  const query = names.map((n) => "run=" + encodeURIComponent(n)).join("&") + "&filter=" + $("#compare-filter").value;
  let c;
  try { c = await api("/api/compare?" + query); $("#compare-problems").replaceChildren(); } catch (err) {
    $("#compare-problems").replaceChildren(el("li", {}, err.message)); return;
  }
  $("#compare-charts").replaceChildren(
    chart("compare-loss", "training loss", c.runs.map((name, i) => [name, c.curves[i].loss || []])),
    chart("compare-val", "validation loss", c.runs.map((name, i) => [name, c.curves[i].val_loss || []])));
  $("#compare-diff").replaceChildren(el("tr", {}, el("th", {}, "key"), ...c.runs.map((r) => el("th", {}, r))),
    ...c.differences.map((d) => el("tr", {}, el("td", {}, d.key), ...d.values.map((v) => el("td", {}, JSON.stringify(v))))));
  const base = c.results.find((r) => r && r.base);
  $("#compare-results").replaceChildren(...resultsTable([["base", base ? base.base : null],
    ...c.runs.map((run, i) => [run, c.results[i] ? c.results[i].tuned : null])]));
  $("#compare-diagnoses").replaceChildren(...c.runs.map((run, i) => {
    const box = el("div");
    showDiagnosis(box, c.diagnoses[i]);
    if (box.firstChild) box.firstChild.textContent = "Diagnosis of " + run;
    return box;
  }));
  $("#compare-count").textContent = `${c.total} of ${c.shared} held-out rows shown` +
    (c.not_evaluated.length ? `; not evaluated yet: ${c.not_evaluated.join(", ")}` : "");
  $("#compare-answers").replaceChildren(
    el("tr", {}, el("th", {}, "prompt"), el("th", {}, "reference"), el("th", {}, "base"), ...c.runs.map((r) => el("th", {}, r))),
    ...c.rows.map((row) => el("tr", { "data-where": row.where }, el("td", {}, row.prompt), el("td", {}, row.reference),
      el("td", { class: row.base_right ? "right" : "wrong" }, row.base),
      ...row.runs.map((r) => r ? el("td", { class: r.right ? "right" : "wrong" }, r.answer) : el("td", {}, "—")))));
}

// ---- chat ----

let chatTurns = [];  // the conversation so far: {prompt, base, tuned}, each side with its own answers

function chatHistory(side) {
  return chatTurns.flatMap((turn) => [{ role: "user", content: turn.prompt }, { role: "assistant", content: turn[side] }]);
}

// One side's answer to `prompt`, streamed into a new turn of its conversation box; the text, or null if refused.
async function streamAnswer(side, run, prompt, box) {
  const answer = el("pre", { class: "answer" });
  box.append(el("div", { class: "you" }, prompt), answer);
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = "Bearer " + token;
  const response = await fetch("/api/chat", { method: "POST", headers, body: JSON.stringify({
    run, side, prompt, history: chatHistory(side), max_new_tokens: Number($("#chat-max").value),
    temperature: Number($("#chat-temp").value) }) });
  if (!response.ok) {
    const body = await response.json().catch(() => ({ problems: [response.statusText] }));
    answer.textContent = "error: " + body.problems.join("; ");
    answer.classList.add("problem");
    box.dataset.done = "1";
    return null;
  }
  const dropped = Number(response.headers.get("X-Dropped-Turns") || 0);
  if (dropped) box.insertBefore(el("p", { class: "warning" }, `The ${dropped} oldest turn(s) were left out: ` +
    "the conversation no longer fits the model's context."), answer);
  const reader = response.body.getReader(), decoder = new TextDecoder();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    answer.textContent += decoder.decode(value, { stream: true });
    box.scrollTop = box.scrollHeight;
  }
  box.dataset.done = "1";
  return answer.textContent;
}

async function sendChat() {
  const run = $("#chat-run").value, prompt = $("#chat-prompt").value;
  if (!prompt.trim()) return;
  $("#chat-command").textContent = `tunesmith chat --run ${knownRunsRoot()}/${run}   (and without --run: the base model)`;
  for (const box of [$("#chat-base"), $("#chat-tuned")]) delete box.dataset.done;
  $("#chat-send").disabled = true;
  const [base, tuned] = await Promise.all([streamAnswer("base", run, prompt, $("#chat-base")),
                                           streamAnswer("tuned", run, prompt, $("#chat-tuned"))]);
  $("#chat-send").disabled = false;
  if (base !== null && tuned !== null) {  // a refused turn is shown but not sent again as history
    chatTurns.push({ prompt, base, tuned });
    $("#chat-prompt").value = "";
  }
  $("#chat-turns").textContent = chatTurns.length ? `${chatTurns.length} turn(s) in this conversation` : "";
}

function newConversation() {
  chatTurns = [];
  for (const box of [$("#chat-base"), $("#chat-tuned")]) { box.replaceChildren(); delete box.dataset.done; }
  $("#chat-turns").textContent = "";
}

const knownRunsRoot = () => $("#root").textContent.replace(/^runs in /, "");

// ---- wiring ----

window.addEventListener("hashchange", showTab);
$("#act-stop").addEventListener("click", () => action("stop"));
$("#act-resume").addEventListener("click", () => action("resume"));
for (const verb of ["evaluate", "report", "merge", "export"]) $("#act-" + verb).addEventListener("click", () => action(verb));
$("#check").addEventListener("click", checkNew);
$("#start").addEventListener("click", startNew);
$("#upload").addEventListener("change", uploadFile);
$("#compare-go").addEventListener("click", compareRuns);
$("#compare-filter").addEventListener("change", compareRuns);
$("#chat-send").addEventListener("click", sendChat);
$("#chat-new").addEventListener("click", newConversation);
$("#chat-run").addEventListener("change", newConversation);
showTab();
refreshRuns();
setInterval(() => { refreshRuns(); if (openRun) refreshRun(); }, POLL_MS);
