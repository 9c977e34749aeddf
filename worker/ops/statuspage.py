"""The live status page of `--http` (/, /app.js, /app.css): no build step, no outside
resources; it polls /api/status every few seconds and draws the jobs worst first.

Nothing secret reaches it: the API carries no job configuration, only names, kinds,
schedules, health and the (already masked) reasons of failures.
"""

from __future__ import annotations

HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>syncworker</title>
<link rel="stylesheet" href="app.css">
<script src="app.js" defer></script>
</head>
<body>
<header>
  <h1>syncworker</h1>
  <p id="overall" class="badge" data-status="loading">loading…</p>
</header>
<main>
  <section id="summary" aria-label="summary"></section>
  <section aria-label="jobs">
    <h2>Jobs</h2>
    <p id="problem" class="problem" hidden></p>
    <table id="jobs">
      <thead><tr>
        <th>Job</th><th>Health</th><th>Schedule</th><th>Last run</th><th>Next run</th>
        <th>24 h</th><th>Problem</th>
      </tr></thead>
      <tbody></tbody>
    </table>
  </section>
  <section aria-label="replicas">
    <h2>Replicas</h2>
    <table id="workers">
      <thead><tr><th>Worker</th><th>Host</th><th>Role</th><th>Running</th><th>Heartbeat</th></tr></thead>
      <tbody></tbody>
    </table>
  </section>
</main>
<footer><span id="updated">not updated yet</span> · read-only; refreshes every 5 s</footer>
</body>
</html>
"""

STYLE = """
:root { color-scheme: light dark; --ok: #1a7f37; --warn: #9a6700; --bad: #cf222e; --muted: #6e7781; }
* { box-sizing: border-box; }
body { font: 15px/1.4 system-ui, sans-serif; margin: 0; padding: 0 12px 24px; }
header { display: flex; align-items: center; gap: 12px; flex-wrap: wrap; }
h1 { font-size: 20px; margin: 12px 0; }
h2 { font-size: 16px; margin: 20px 0 8px; }
.badge { padding: 2px 10px; border-radius: 12px; font-weight: 600; margin: 0; color: #fff;
         background: var(--muted); }
.badge[data-status=healthy] { background: var(--ok); }
.badge[data-status=degraded] { background: var(--warn); }
.badge[data-status=failing], .badge[data-status=unreachable] { background: var(--bad); }
#summary { display: flex; flex-wrap: wrap; gap: 8px 20px; }
#summary div { min-width: 110px; }
#summary b { display: block; font-size: 18px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid rgba(127,127,127,.25);
         vertical-align: top; }
th { font-size: 13px; color: var(--muted); }
td.health { font-weight: 600; white-space: nowrap; }
tr[data-health=ok] td.health { color: var(--ok); }
tr[data-health=disabled] td.health, tr[data-health=failing] td.health { color: var(--bad); }
tr[data-health=stale] td.health, tr[data-health=overrunning] td.health,
tr[data-health=late] td.health, tr[data-health=degraded] td.health,
tr[data-health=paused] td.health { color: var(--warn); }
td.problem { color: var(--muted); word-break: break-word; }
.problem { color: var(--bad); }
footer { margin-top: 20px; color: var(--muted); font-size: 13px; }
@media (max-width: 700px) {
  thead { display: none; }
  table, tbody, tr, td { display: block; width: 100%; }
  tr { border-bottom: 1px solid rgba(127,127,127,.35); padding: 6px 0; }
  td { border: 0; padding: 2px 0; }
  td[data-label]::before { content: attr(data-label) ": "; color: var(--muted); font-size: 13px; }
  td.name { font-weight: 600; font-size: 16px; }
}
"""

SCRIPT = """
"use strict";
const ORDER = ["disabled", "paused", "failing", "stale", "overrunning", "late", "degraded", "pending", "ok"];
const REFRESH_MS = 5000;

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const s = Math.abs(seconds);
  const text = s >= 86400 ? Math.floor(s / 86400) + "d" : s >= 3600 ? Math.floor(s / 3600) + "h"
    : s >= 60 ? Math.floor(s / 60) + "m" : Math.floor(s) + "s";
  return seconds >= 0 ? text + " ago" : "in " + text;
}

function cell(row, text, label, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined || text === "" ? "-" : String(text);
  if (label) td.dataset.label = label;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function rank(health) {
  const i = ORDER.indexOf(health);
  return i < 0 ? ORDER.indexOf("pending") - 0.5 : i;
}

function drawSummary(data) {
  const box = document.getElementById("summary");
  box.replaceChildren();
  const counts = data.jobs_by_health || {};
  const items = [
    ["jobs", data.jobs_total],
    ["runs 24 h", data.runs_24h],
    ["success 24 h", data.success_rate_24h === null || data.success_rate_24h === undefined
      ? "-" : Math.round(data.success_rate_24h * 100) + "%"],
    ["replicas alive", data.workers_alive],
    ["this replica", data.replica ? data.replica.role : "-"],
  ];
  for (const word of ORDER) if (counts[word]) items.push([word, counts[word]]);
  for (const [label, value] of items) {
    const div = document.createElement("div");
    const b = document.createElement("b");
    b.textContent = value === undefined || value === null ? "-" : String(value);
    div.append(b, label);
    box.appendChild(div);
  }
}

function drawJobs(data) {
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren();
  const now = data.db_now;
  const jobs = (data.jobs || []).slice().sort((a, b) => rank(a.health) - rank(b.health)
    || String(a.name).localeCompare(String(b.name)));
  for (const job of jobs) {
    const tr = document.createElement("tr");
    tr.dataset.health = job.health;
    cell(tr, job.name + " (" + job.kind + ")", "", "name");
    cell(tr, job.health, "health", "health");
    cell(tr, job.schedule, "schedule");
    const last = job.running ? "running for " + ago(now - job.running_since_epoch).replace(" ago", "")
      : (job.last_status || "never") + (job.last_sync_epoch ? ", " + ago(now - job.last_sync_epoch) : "");
    cell(tr, last, "last run");
    cell(tr, job.enabled && job.next_sync_epoch ? ago(now - job.next_sync_epoch) : "-", "next run");
    const rate = job.success_rate_24h === null || job.success_rate_24h === undefined
      ? "" : " (" + Math.round(job.success_rate_24h * 100) + "% ok)";
    cell(tr, job.runs_24h + " runs" + rate, "24 h");
    cell(tr, job.problem, "problem", "problem");
    body.appendChild(tr);
  }
  if (!jobs.length) {
    const tr = document.createElement("tr");
    cell(tr, "no jobs yet");
    body.appendChild(tr);
  }
}

function drawWorkers(data) {
  const body = document.querySelector("#workers tbody");
  body.replaceChildren();
  for (const w of data.workers || []) {
    const tr = document.createElement("tr");
    cell(tr, "w" + w.id + (w.alive ? "" : " (lost)"), "", "name");
    cell(tr, w.hostname + ":" + w.pid + " v" + w.version, "host");
    cell(tr, w.leader ? "leader" : "standby", "role");
    cell(tr, w.running + " / " + w.concurrency, "running");
    cell(tr, ago(data.db_now - w.heartbeat_epoch), "heartbeat");
    body.appendChild(tr);
  }
}

async function refresh() {
  const overall = document.getElementById("overall");
  const problem = document.getElementById("problem");
  try {
    const response = await fetch("api/status", {cache: "no-store", credentials: "same-origin"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    const data = await response.json();
    overall.textContent = data.status;
    overall.dataset.status = data.status;
    overall.title = (data.reasons || []).join("; ");
    problem.hidden = !data.problem;
    problem.textContent = data.problem || "";
    drawSummary(data);
    drawJobs(data);
    drawWorkers(data);
    document.getElementById("updated").textContent =
      "updated " + new Date().toLocaleTimeString();
    document.body.dataset.loaded = "true";
    document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
  } catch (err) {
    overall.textContent = "unreachable";
    overall.dataset.status = "unreachable";
    problem.hidden = false;
    problem.textContent = "cannot read the status: " + err.message;
  }
}

function layout() {
  document.body.dataset.layout = window.matchMedia("(max-width: 700px)").matches ? "cards" : "table";
}

layout();
window.addEventListener("resize", layout);
refresh();
setInterval(refresh, REFRESH_MS);
"""
