"use strict";
const $ = (id) => document.getElementById(id);
let selected = null;

function cell(tr, text, code) {
  const td = document.createElement("td");
  if (code) { const c = document.createElement("code"); c.textContent = text; td.appendChild(c); }
  else td.textContent = text;
  tr.appendChild(td);
  return td;
}

async function api(method, path, body) {
  const headers = { "Authorization": "Bearer " + sessionStorage.getItem("ops-token") };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) { const e = new Error(data.message || r.statusText); e.status = r.status; throw e; }
  return data;
}

function figure(label, value, id) {
  const d = document.createElement("div");
  d.className = "figure";
  const b = document.createElement("b");
  b.textContent = value;
  if (id) b.id = id;
  d.append(b, label);
  return d;
}

async function loadSla() {
  const s = await api("GET", "/v1/ops/compensation/sla");
  $("sla").replaceChildren(
    figure("compensation success rate", (s.success_rate * 100).toFixed(3) + " %", "sla-success"),
    figure("compensated", String(s.compensated)),
    figure("failed", String(s.failed)),
    figure("open failures", String(s.open_failures), "sla-open"),
    figure("poll mode", s.fast_mode ? "fast (" + s.fast_interval_ms + " ms)" : "normal (" + s.check_interval_ms + " ms)"),
  );
  const body = $("latency").tBodies[0];
  body.replaceChildren();
  for (const l of s.paid_latency) {
    const tr = body.insertRow();
    for (const v of [l.source, l.count, l.p50_ms.toFixed(0), l.p99_ms.toFixed(0), l.max_ms.toFixed(0)]) cell(tr, String(v));
  }
}

async function loadFailures() {
  const list = await api("GET", "/v1/ops/compensation/failures?status=open");
  const body = $("failures").tBodies[0];
  body.replaceChildren();
  $("no-failures").hidden = list.length > 0;
  for (const f of list) {
    const tr = body.insertRow();
    tr.dataset.id = f.id;
    if (selected === f.id) tr.className = "selected";
    cell(tr, String(f.id));
    cell(tr, f.payment_id, true);
    cell(tr, f.order_id, true);
    cell(tr, f.provider);
    cell(tr, f.reason);
    cell(tr, String(f.attempts));
    cell(tr, f.last_error);
    cell(tr, f.order_state);
    const b = document.createElement("button");
    b.textContent = "Inspect";
    b.className = "inspect";
    b.onclick = () => inspect(f.id);
    cell(tr, "").appendChild(b);
  }
}

async function inspect(id) {
  selected = id;
  const d = await api("GET", "/v1/ops/compensation/failures/" + id);
  const f = d.failure;
  $("detail").hidden = false;
  $("detail-id").textContent = "#" + f.id;
  $("detail-status").textContent = f.status + (f.resolution ? " (" + f.resolution + ")" : "");
  $("detail-order").textContent = f.order_id;
  $("detail-order-state").textContent = f.order_state;
  $("txn").value = (f.params && f.params.transaction_id) || "";
  $("context").textContent = JSON.stringify(f.context, null, 2);
  const body = $("audit").tBodies[0];
  body.replaceChildren();
  for (const a of d.audit) {
    const tr = body.insertRow();
    cell(tr, new Date(a.at).toLocaleString());
    cell(tr, a.operator);
    cell(tr, a.action);
    cell(tr, JSON.stringify(a.detail), true);
    cell(tr, a.outcome);
  }
  const open = f.status === "open";
  for (const id of ["txn", "save", "replay"]) $(id).disabled = !open;
  for (const tr of $("failures").tBodies[0].rows) tr.className = Number(tr.dataset.id) === id ? "selected" : "";
}

async function loadDead() {
  const jobs = await api("GET", "/v1/ops/jobs?state=dead&limit=100");
  const body = $("dead-jobs").tBodies[0];
  body.replaceChildren();
  $("no-dead").hidden = jobs.length > 0;
  for (const j of jobs) {
    const tr = body.insertRow();
    tr.dataset.id = j.id;
    cell(tr, String(j.id));
    cell(tr, j.kind);
    cell(tr, JSON.stringify(j.payload), true);
    cell(tr, j.attempts + "/" + j.max_attempts);
    cell(tr, j.last_error || "");
    const b = document.createElement("button");
    b.textContent = "Redrive";
    b.className = "redrive";
    b.onclick = async () => {
      b.disabled = true;
      try { await api("POST", "/v1/ops/jobs/" + j.id + "/redrive"); await loadDead(); }
      catch (e) { b.disabled = false; alert("Redrive failed: " + e.message); }
    };
    cell(tr, "").appendChild(b);
  }
}

async function refresh() {
  await Promise.all([loadSla(), loadFailures(), loadDead()]);
  if (selected !== null) await inspect(selected);
}

$("login-form").onsubmit = async (ev) => {
  ev.preventDefault();
  sessionStorage.setItem("ops-token", $("token").value);
  $("login-error").textContent = "";
  try { await start(); }
  catch (e) {
    sessionStorage.removeItem("ops-token");
    $("login-error").textContent =
      e.status === 401 ? "That is not a valid operator token." :
      e.status === 403 ? "That token is not an operator's: " + e.message :
      "Could not log in: " + e.message;
  }
};

$("edit-form").onsubmit = async (ev) => {
  ev.preventDefault();
  const t = $("txn").value.trim();
  try {
    await api("PATCH", "/v1/ops/compensation/failures/" + selected, { params: t ? { transaction_id: t } : {} });
    $("replay-result").className = "ok";
    $("replay-result").textContent = "saved";
    await inspect(selected);
  } catch (e) { $("replay-result").className = "error"; $("replay-result").textContent = e.message; }
};

$("replay").onclick = async () => {
  $("replay").disabled = true;
  try {
    const r = await api("POST", "/v1/ops/compensation/failures/" + selected + "/replay");
    $("replay-result").className = r.resolved ? "ok" : "error";
    $("replay-result").textContent = "replay: " + r.outcome;
    await refresh();
  } catch (e) { $("replay-result").className = "error"; $("replay-result").textContent = e.message; }
  finally { $("replay").disabled = false; }
};

$("refresh").onclick = () => refresh().catch((e) => alert(e.message));
$("logout").onclick = () => { sessionStorage.clear(); location.reload(); };

async function start() {
  // who the token names: the audit records it, whatever anyone types
  const me = await api("GET", "/v1/ops/whoami");
  await refresh();
  $("login-box").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  $("who").textContent = "operator: " + me.operator;
}

if (sessionStorage.getItem("ops-token")) start().catch(() => sessionStorage.clear());
