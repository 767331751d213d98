// Castellan's approver console. Plain script, no framework and no build
// step: it talks to /console/session and /console/api/… (the API, with the
// session cookie's credential) and writes every value as text, never as
// markup.
"use strict";

const $ = (id) => document.getElementById(id);
let csrf = "";
let current = null; // the request shown in detail
let watching = 0; // bumps to stop an older detail watch
let pendingTimer = null;

function show(el, on) {
  el.hidden = !on;
}

function message(text, kind) {
  const m = $("message");
  m.textContent = text || "";
  m.className = kind || "";
  show(m, !!text);
}

function text(el, value) {
  el.textContent = value === undefined || value === null || value === "" ? "-" : String(value);
}

function cell(row, value, cls) {
  const td = document.createElement("td");
  text(td, value);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

// A problem response as one line.
async function problem(resp) {
  try {
    const p = await resp.json();
    return (p.title || resp.status) + ": " + (p.detail || "");
  } catch (_) {
    return "HTTP " + resp.status;
  }
}

async function api(method, path, body) {
  const opts = { method, headers: {}, credentials: "same-origin" };
  if (method !== "GET") opts.headers["X-CSRF-Token"] = csrf;
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const resp = await fetch("/console/api" + path, opts);
  if (resp.status === 401) {
    signedOut();
    throw new Error("your session ended; sign in again");
  }
  if (!resp.ok) throw new Error(await problem(resp));
  return resp.json();
}

// ---- session -------------------------------------------------------------

async function loadSession() {
  const resp = await fetch("/console/session", { credentials: "same-origin" });
  const s = await resp.json();
  if (s.signed_in) signedIn(s);
  else signedOut(s.sign_in_with || []);
}

function signedIn(s) {
  csrf = s.csrf;
  text($("signed-in-as"), s.name);
  text($("role"), "(" + s.role + (s.groups && s.groups.length ? ", " + s.groups.join(", ") : "") + ")");
  show($("who"), true);
  show($("sign-in-panel"), false);
  show($("app"), true);
  tab("pending-panel");
}

function signedOut(issuers) {
  csrf = "";
  watching++;
  clearInterval(pendingTimer);
  show($("who"), false);
  show($("app"), false);
  show($("sign-in-panel"), true);
  const box = $("oidc-logins");
  if (issuers) {
    box.replaceChildren();
    for (const name of issuers) {
      const a = document.createElement("a");
      a.href = "/console/oidc/login?issuer=" + encodeURIComponent(name);
      a.className = "oidc-login button";
      a.dataset.issuer = name;
      a.textContent = "Sign in with " + name;
      box.appendChild(a);
    }
  }
}

async function signIn(event) {
  event.preventDefault();
  const token = $("token").value.trim();
  const resp = await fetch("/console/session", {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token }),
  });
  $("token").value = "";
  if (!resp.ok) {
    message(await problem(resp), "error");
    return;
  }
  // The cookie must have been kept: browsers drop Secure cookies on plain
  // http to anything but a loopback address.
  const check = await (await fetch("/console/session", { credentials: "same-origin" })).json();
  if (!check.signed_in) {
    message("Your browser did not keep the session cookie: open the console over HTTPS.", "error");
    return;
  }
  message("");
  signedIn(check);
}

async function signOut() {
  await fetch("/console/session", {
    method: "DELETE",
    credentials: "same-origin",
    headers: { "X-CSRF-Token": csrf },
  });
  message("Signed out.");
  loadSession();
}

// ---- tabs ------------------------------------------------------------------

function tab(id) {
  for (const p of document.querySelectorAll(".panel")) show(p, p.id === id);
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.tab === id);
  clearInterval(pendingTimer);
  watching++;
  if (id === "pending-panel") {
    refreshPending();
    pendingTimer = setInterval(refreshPending, 2000);
  } else if (id === "certificates-panel") {
    loadCertificates();
  } else if (id === "audit-panel") {
    loadAudit();
  }
}

// ---- pending requests ------------------------------------------------------

function approvalsOf(r) {
  const yes = (r.approvals || []).filter((v) => v.decision === "approve").length;
  return yes + " of " + r.required_approvals;
}

async function refreshPending() {
  let list;
  try {
    list = await api("GET", "/v1/ephemeral?state=pending");
  } catch (e) {
    message(e.message, "error");
    return;
  }
  const body = $("pending").querySelector("tbody");
  body.replaceChildren();
  const items = list.items || [];
  for (const r of items) {
    const row = document.createElement("tr");
    row.dataset.requestId = r.request_id;
    row.tabIndex = 0;
    cell(row, r.created_at);
    cell(row, r.requester && r.requester.name);
    cell(row, r.spiffe_id, "mono");
    cell(row, r.ttl_seconds + " s");
    cell(row, approvalsOf(r));
    cell(row, r.emergency ? "BREAK-GLASS" : r.agent ? "agent" : "", r.emergency ? "breakglass" : "");
    row.addEventListener("click", () => openRequest(r.request_id));
    row.addEventListener("keydown", (e) => {
      if (e.key === "Enter") openRequest(r.request_id);
    });
    body.appendChild(row);
  }
  show($("pending-empty"), items.length === 0);
  text($("pending-updated"), "updated " + new Date().toLocaleTimeString());
}

// ---- one request -------------------------------------------------------------

function render(r) {
  current = r;
  text($("d-id"), r.request_id);
  text($("state"), r.state);
  $("state").className = "state-" + r.state;
  show($("d-emergency"), !!r.emergency);
  text($("d-requester"), r.requester ? r.requester.name + " (" + r.requester.kind + ")" : "");
  text($("d-spiffe-id"), r.spiffe_id);
  text($("d-dns"), (r.dns_names || []).join(", "));
  text($("d-key"), r.key_fingerprint);
  text($("d-ttl"), r.ttl_seconds + " s");
  const agent = r.agent || {};
  text($("d-scopes"), (agent.scopes || []).join(" "));
  text($("d-audience"), (agent.audience || []).join(", "));
  drawChain(agent, r);
  text($("d-justification"), r.justification);
  text($("d-ticket"), r.ticket);
  const a = r.attestation;
  text($("d-attestation"), a ? a.method + " " + a.subject + " [" + (a.selectors || []).join(", ") + "]" : "");
  text($("d-needs"), r.required_approvals + " approval(s) from " + (r.approver_groups || []).join(", "));
  text($("binding"), r.binding);
  const votes = $("votes");
  votes.replaceChildren();
  for (const v of r.approvals || []) {
    const li = document.createElement("li");
    li.className = "vote-" + v.decision;
    li.textContent = v.decision + " by " + v.approver + " at " + v.at + (v.reason ? ": " + v.reason : "");
    votes.appendChild(li);
  }
  if (!votes.children.length) {
    const li = document.createElement("li");
    li.className = "none";
    li.textContent = "none yet";
    votes.appendChild(li);
  }
  text($("d-issued"), r.serial ? "serial " + r.serial + ", valid until " + r.not_after : "");
  show($("vote-form"), r.state === "pending");
}

// Who acts for whom: the person first, then each agent it delegated to,
// ending with the identity this request would mint.
function drawChain(agent, r) {
  const ol = $("chain");
  ol.replaceChildren();
  const links = (agent.delegation_chain || []).slice();
  if (agent.agent_id) links.push({ kind: "agent", sub: r.spiffe_id, self: true });
  if (links.length === 0) {
    const li = document.createElement("li");
    li.textContent = "no one (the requester acts for itself)";
    ol.appendChild(li);
    return;
  }
  for (const l of links) {
    const li = document.createElement("li");
    li.className = "link link-" + l.kind + (l.self ? " link-self" : "");
    const kind = document.createElement("span");
    kind.className = "kind";
    kind.textContent = l.self ? "this agent" : l.kind;
    const who = document.createElement("span");
    who.className = "sub";
    who.textContent = l.sub + (l.iss ? " (" + l.iss + ")" : "");
    li.append(kind, who);
    ol.appendChild(li);
  }
}

async function openRequest(id) {
  clearInterval(pendingTimer);
  for (const p of document.querySelectorAll(".panel")) show(p, p.id === "detail");
  $("reason").value = "";
  message("");
  const mine = ++watching;
  try {
    render(await api("GET", "/v1/ephemeral/" + encodeURIComponent(id)));
  } catch (e) {
    message(e.message, "error");
    return;
  }
  // Follow it live: the server answers when it changes, or after 25 s.
  while (mine === watching) {
    try {
      const r = await api("GET", "/v1/ephemeral/" + encodeURIComponent(id) + "?wait=25");
      if (mine !== watching) return;
      render(r);
    } catch (e) {
      if (mine !== watching) return;
      message(e.message, "error");
      await new Promise((ok) => setTimeout(ok, 2000));
    }
  }
}

async function vote(decision) {
  if (!current) return;
  const reason = $("reason").value.trim();
  if (decision === "deny" && !reason) {
    message("Give a reason to deny.", "error");
    return;
  }
  for (const b of ["approve", "deny"]) $(b).disabled = true;
  try {
    const r = await api("POST", "/v1/ephemeral/" + encodeURIComponent(current.request_id) + "/approvals", {
      decision,
      reason,
      binding: current.binding,
    });
    message("Your " + decision + " vote was recorded.", "ok");
    render(r.request || r);
  } catch (e) {
    message(e.message, "error");
  } finally {
    for (const b of ["approve", "deny"]) $(b).disabled = false;
  }
}

// ---- inventory and audit -------------------------------------------------------

async function loadCertificates() {
  try {
    const page = await api("GET", "/v1/certificates?newest=true&limit=100");
    const body = $("certificates").querySelector("tbody");
    body.replaceChildren();
    for (const c of (page.items || []).reverse()) {
      const row = document.createElement("tr");
      cell(row, c.issued_at);
      cell(row, c.serial, "mono");
      cell(row, c.spiffe_id, "mono");
      cell(row, c.source);
      cell(row, c.method);
      cell(row, c.not_after);
      body.appendChild(row);
    }
  } catch (e) {
    message(e.message, "error");
  }
}

async function loadAudit() {
  try {
    const page = await api("GET", "/v1/audit?newest=true&limit=100");
    const body = $("audit").querySelector("tbody");
    body.replaceChildren();
    for (const e of (page.items || []).reverse()) {
      const row = document.createElement("tr");
      cell(row, e.seq);
      cell(row, e.at);
      cell(row, e.kind);
      cell(row, e.actor);
      cell(row, JSON.stringify(e.detail), "mono detail");
      body.appendChild(row);
    }
  } catch (e) {
    message(e.message, "error");
  }
}

// ---- start ---------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("approve").addEventListener("click", () => vote("approve"));
  $("deny").addEventListener("click", () => vote("deny"));
  $("back").addEventListener("click", () => tab("pending-panel"));
  for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => tab(b.dataset.tab));
  const error = new URLSearchParams(location.search).get("login_error");
  if (error) message("Sign-in failed: " + error, "error");
  if (location.search) history.replaceState(null, "", "/console/");
  loadSession().catch((e) => message(e.message, "error"));
});
