// The jobledger dashboard: a client of the /v1 API that signs in with an API key.
// Every value from the server is put in the page as text (never as HTML).
"use strict";

const S = {
  key: null, project: null, me: null,
  view: null, jobId: null, params: new URLSearchParams(),
  cursors: [], cursor: null, nextCursor: null,
  after: 0, feed: null, events: 0, refresh: null, ticker: null,
};
const $ = (id) => document.getElementById(id);
const VIEWS = ["jobs", "job", "running", "stats", "credits", "audit"];

// -- helpers ---------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function clear(node) { node.textContent = ""; return node; }
function sleep(ms) { return new Promise((r) => setTimeout(r, ms)); }
function fmtTime(t) { return t ? new Date(t).toLocaleString() : "—"; }
function num(n) { return Number(n).toLocaleString(undefined, { maximumFractionDigits: 4 }); }

function duration(fromIso, toIso) {
  if (!fromIso) return "—";
  const ms = Math.max(0, (toIso ? Date.parse(toIso) : Date.now()) - Date.parse(fromIso));
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${(ms / 1000).toFixed(s < 10 ? 2 : 0)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${s % 60} s`;
  const hr = Math.floor(m / 60);
  return hr < 48 ? `${hr} h ${m % 60} min` : `${Math.floor(hr / 24)} d ${hr % 24} h`;
}

function elapsed(fromIso) {
  const s = Math.max(0, Math.floor((Date.now() - Date.parse(fromIso)) / 1000));
  return `${String(Math.floor(s / 60)).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}`;
}

function badge(status) { return h("span", { class: `badge s-${status}` }, status); }

function facts(dl, pairs) {
  clear(dl);
  for (const [k, v] of pairs) {
    if (v === undefined) continue;
    dl.append(h("dt", {}, k), h("dd", {}, v === null || v === "" ? "—" : v));
  }
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function headers(extra) {
  const out = Object.assign({ Authorization: `Bearer ${S.key}` }, extra || {});
  if (S.project) out["X-Project-Id"] = S.project;
  return out;
}

async function api(path, opts) {
  const o = opts || {};
  const resp = await fetch(path, { method: o.method || "GET", headers: headers(o.headers), body: o.body });
  if (resp.status === 401 && S.me) {
    signOut("The key is no longer accepted; sign in again.");
    throw new ApiError(401, "signed out");
  }
  if (!resp.ok) {
    let message = `${resp.status} ${resp.statusText}`;
    try { message = (await resp.json()).error.message; } catch (e) { /* not JSON */ }
    throw new ApiError(resp.status, message);
  }
  return o.raw ? resp : resp.json();
}

// -- sign in / out ---------------------------------------------------------------------------

async function signIn(key, project) {
  S.key = key; S.project = project || null;
  const me = await api("/v1/me");
  S.me = me;
  sessionStorage.setItem("jobledger.key", key);
  sessionStorage.setItem("jobledger.project", S.project || "");
  $("who-text").textContent =
    `${me.tenant} · ${me.role}${me.project ? ` · project ${me.project}` : ""} · ${me.key_id}`;
  $("nav-audit").hidden = me.role !== "admin";
  $("signin").hidden = true;
  $("nav").hidden = false;
  $("who").hidden = false;
  startFeed();
  if (!location.hash || location.hash === "#/" || location.hash === "#/signin") location.hash = "#/jobs";
  else route();
}

function signOut(message) {
  sessionStorage.removeItem("jobledger.key");
  sessionStorage.removeItem("jobledger.project");
  S.key = null; S.me = null; S.project = null;
  if (S.feed) S.feed.abort();
  S.feed = null;
  for (const v of VIEWS) $(`view-${v}`).hidden = true;
  $("nav").hidden = true;
  $("who").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message || "";
  $("key").value = "";
  $("key").focus();
}

// -- the live feed (Server-Sent Events read through fetch, so the key goes in a header) -------

function setLive(on) {
  const node = $("live");
  node.classList.toggle("on", on);
  node.textContent = on ? `live · ${S.events} new event${S.events === 1 ? "" : "s"}` : "reconnecting…";
}

async function startFeed() {
  if (S.feed) S.feed.abort();
  const controller = new AbortController();
  S.feed = controller;
  S.events = 0;
  try {
    S.after = (await api("/v1/jobs/stats")).position;
  } catch (e) { S.after = 0; }
  while (S.feed === controller) {
    try {
      const resp = await fetch(`/v1/events/stream?after=${S.after}`, { headers: headers(), signal: controller.signal });
      if (!resp.ok) throw new ApiError(resp.status, "stream refused");
      setLive(true);
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          handleBlock(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
        }
      }
    } catch (e) {
      if (controller.signal.aborted) return;
    }
    if (S.feed !== controller) return;
    setLive(false);
    await sleep(1000);
  }
}

function handleBlock(block) {
  let id = null, data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("id:")) id = line.slice(3).trim();
    else if (line.startsWith("data:")) data += line.slice(5).trim();
  }
  if (!data) return;
  const event = JSON.parse(data);
  if (id !== null) S.after = Number(id);
  S.events += 1;
  setLive(true);
  onEvent(event);
}

function onEvent(event) {
  if (S.view === "job" && event.stream === S.jobId) {
    addTimelineEvent(event);
    $("timeline-count").textContent = `${$("timeline").children.length} events`;
  }
  scheduleRefresh();
}

function scheduleRefresh() {
  if (S.refresh) return;
  S.refresh = setTimeout(() => {
    S.refresh = null;
    if (S.view === "job") loadJobFacts(S.jobId).catch(() => {});
    else if (S.view && S.view !== "audit") render(S.view, true).catch(() => {});
    else if (S.view === "audit") loadAuditHead().catch(() => {});
  }, 250);
}

// -- routing ---------------------------------------------------------------------------------

function route() {
  if (!S.me) return;
  const hash = location.hash.replace(/^#\/?/, "");
  const [path, query] = hash.split("?");
  const parts = path.split("/");
  let view = parts[0] || "jobs";
  if (!VIEWS.includes(view)) view = "jobs";
  S.params = new URLSearchParams(query || "");
  S.jobId = view === "job" ? decodeURIComponent(parts.slice(1).join("/")) : null;
  for (const v of VIEWS) $(`view-${v}`).hidden = v !== view;
  for (const a of document.querySelectorAll("#nav a[data-view]")) {
    if (a.dataset.view === view || (view === "job" && a.dataset.view === "jobs")) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (view !== S.view || view === "jobs") { S.cursors = []; S.cursor = null; }
  S.view = view;
  clearInterval(S.ticker);
  render(view, false).catch((e) => showError(view, e));
}

function showError(view, e) {
  const section = $(`view-${view}`);
  let box = section.querySelector(".view-error");
  if (!box) { box = h("p", { class: "error view-error", role: "alert" }); section.prepend(box); }
  box.textContent = e.status === 403 ? `This key may not see this: ${e.message}` : e.message;
}

async function render(view, live) {
  const section = $(`view-${view}`);
  const old = section.querySelector(".view-error");
  if (old) old.remove();
  if (view === "jobs") return renderJobs(live);
  if (view === "job") return renderJob(S.jobId);
  if (view === "running") return renderRunning();
  if (view === "stats") return renderStats();
  if (view === "credits") return renderCredits();
  if (view === "audit") return renderAudit();
}

// -- jobs ------------------------------------------------------------------------------------

const FILTERS = ["status", "agent", "account", "project", "created_after", "created_before", "q"];

function fillFilters() {
  const form = $("filters");
  for (const name of FILTERS) {
    const input = form.elements[name];
    const value = S.params.get(name) || "";
    if (input.type === "datetime-local" && value) {
      const d = new Date(value);
      input.value = new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 16);
    } else input.value = value;
  }
}

async function renderJobs(live) {
  if (!live) fillFilters();
  const q = new URLSearchParams();
  for (const name of FILTERS) if (S.params.get(name)) q.set(name, S.params.get(name));
  q.set("limit", "25");
  if (S.cursor) q.set("cursor", S.cursor);
  const page = await api(`/v1/jobs?${q}`);
  const body = clear($("jobs-body"));
  for (const job of page.jobs) {
    body.append(h("tr", { "data-job": job.id },
      h("td", {}, h("a", { href: `#/job/${encodeURIComponent(job.id)}` }, job.id)),
      h("td", {}, badge(job.status)),
      h("td", {}, job.agent),
      h("td", {}, job.account),
      h("td", {}, fmtTime(job.created_at)),
      h("td", {}, fmtTime(job.updated_at)),
      h("td", { class: "num" }, num(job.row_count)),
      h("td", { class: "num" }, num(job.credits_used)),
    ));
  }
  $("jobs-empty").hidden = page.jobs.length > 0;
  S.nextCursor = page.next_cursor;
  $("page-next").disabled = !page.has_more;
  $("page-first").disabled = S.cursors.length === 0;
  $("page-info").textContent = `page ${S.cursors.length + 1} · ${page.jobs.length} job${page.jobs.length === 1 ? "" : "s"}`;
}

function applyFilters(ev) {
  ev.preventDefault();
  const form = $("filters");
  const q = new URLSearchParams();
  for (const name of FILTERS) {
    const input = form.elements[name];
    if (!input.value) continue;
    q.set(name, input.type === "datetime-local" ? new Date(input.value).toISOString() : input.value.trim());
  }
  const target = `#/jobs${q.toString() ? `?${q}` : ""}`;
  if (location.hash === target) route(); else location.hash = target;
}

// -- one job ---------------------------------------------------------------------------------

async function loadJobFacts(id) {
  const job = await api(`/v1/jobs/${encodeURIComponent(id)}`);
  $("job-status").replaceWith(Object.assign(badge(job.status), { id: "job-status" }));
  const pr = job.pr_link && /^https?:\/\//.test(job.pr_link)
    ? h("a", { href: job.pr_link, rel: "noopener noreferrer", target: "_blank" }, job.pr_link) : job.pr_link;
  facts($("job-facts"), [
    ["Agent", job.agent], ["Account", job.account], ["Project", job.project],
    ["Model", job.model], ["Source", job.source ? JSON.stringify(job.source) : null],
    ["Created by", job.created_by ? JSON.stringify(job.created_by) : null],
    ["Created", fmtTime(job.created_at)], ["Started", fmtTime(job.started_at)],
    ["Finished", fmtTime(job.finished_at)], ["Archived", job.archived_at ? fmtTime(job.archived_at) : null],
    ["Rows", num(job.row_count)], ["Credits used", num(job.credits_used)],
    ["Error", job.error ? `${job.error.code || ""} ${job.error.message || ""}`.trim() : null],
    ["PR", pr], ["Params", Object.keys(job.params || {}).length ? JSON.stringify(job.params) : null],
    ["Version", job.version],
  ]);
  const end = job.finished_at || null;
  facts($("job-times"), [
    ["Queued", duration(job.created_at, job.started_at || end)],
    ["Running", job.started_at ? duration(job.started_at, end) : "—"],
    ["Total", duration(job.created_at, end)],
  ]);
  const x = job.executions;
  facts($("job-execs"), [["Total", x.total], ["Pending", x.pending], ["Retrying", x.retrying],
    ["Succeeded", x.succeeded], ["Failed", x.failed]]);
  const results = clear($("job-results"));
  if (job.result_id) {
    const path = `/v1/jobs/${encodeURIComponent(job.id)}/results`;
    const out = h("pre", { class: "data", hidden: true });
    results.append(
      h("p", {}, "Result ", h("code", {}, job.result_id), job.expires_at ? ` · expires ${fmtTime(job.expires_at)}` : ""),
      h("p", {}, h("code", {}, `GET ${path}`), " · ", h("code", {}, `GET /v1/results/${job.result_id}`)),
      h("button", { type: "button", class: "secondary", onclick: async () => {
        try {
          const r = await api(path);
          const text = JSON.stringify(r.data, null, 2);
          out.textContent = text.length > 20000 ? `${text.slice(0, 20000)}\n…` : text;
        } catch (e) { out.textContent = e.message; }
        out.hidden = false;
      } }, "Show results"),
      out,
    );
  } else results.append(h("p", { class: "hint" }, job.status === "queued" || job.status === "running" ? "Not finished yet." : "No results."));
  return job;
}

function addTimelineEvent(e) {
  const list = $("timeline");
  if (list.querySelector(`li[data-position="${e.position}"]`)) return;
  const data = e.data === null ? (e.redacted ? "(erased)" : "null") : JSON.stringify(e.data, null, 2);
  list.append(h("li", { "data-position": e.position, "data-type": e.type, class: "event" },
    h("div", { class: "event-head" },
      h("span", { class: "etype" }, e.type),
      h("span", { class: "hint" }, ` #${e.position} · v${e.version}`)),
    h("dl", { class: "facts small" },
      h("dt", {}, "Occurred"), h("dd", {}, fmtTime(e.occurred_at)),
      h("dt", {}, "Recorded"), h("dd", {}, e.recorded_at),
      h("dt", {}, "Actor"), h("dd", {}, e.actor),
      h("dt", {}, "Event id"), h("dd", {}, e.event_id),
      h("dt", {}, "Hash"), h("dd", {}, h("code", { class: "hash", title: e.hash }, e.hash)),
      h("dt", {}, "Prev hash"), h("dd", {}, h("code", { class: "hash", title: e.prev_hash }, e.prev_hash))),
    data === "{}" ? null : h("pre", { class: "data" }, data),
  ));
}

async function renderJob(id) {
  $("job-id").textContent = id;
  $("job-error").textContent = "";
  clear($("timeline"));
  for (const dl of ["job-facts", "job-times", "job-execs", "job-results"]) clear($(dl));
  try {
    await loadJobFacts(id);
    const { events } = await api(`/v1/jobs/${encodeURIComponent(id)}/events`);
    if (S.jobId !== id) return;
    for (const e of events) addTimelineEvent(e);
    $("timeline-count").textContent = `${$("timeline").children.length} events`;
  } catch (e) {
    $("job-error").textContent = e.status === 404 ? `No job ${id} that this key may see.` : e.message;
  }
}

// -- running, stats --------------------------------------------------------------------------

async function renderRunning() {
  const data = await api("/v1/jobs/running");
  const box = clear($("running"));
  const busy = data.accounts.filter((a) => data.executing[a].length);
  if (!busy.length) box.append(h("p", { class: "empty" }, "Nothing is running."));
  for (const account of busy) {
    box.append(h("section", { class: "card", "data-account": account },
      h("h2", {}, account, h("span", { class: "hint" }, ` · ${data.summary[account].executing} running`)),
      h("table", { class: "grid" },
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Job"), h("th", { scope: "col" }, "Agent"),
          h("th", { scope: "col" }, "Started"), h("th", { scope: "col", class: "num" }, "Elapsed"))),
        h("tbody", {}, data.executing[account].map((x) => h("tr", {},
          h("td", {}, h("a", { href: `#/job/${encodeURIComponent(x.job_id)}` }, x.job_id)),
          h("td", {}, x.agent), h("td", {}, fmtTime(x.started_at)),
          h("td", { class: "num elapsed", "data-started": x.started_at || "" }, x.elapsed)))))));
  }
  clearInterval(S.ticker);
  S.ticker = setInterval(() => {
    for (const td of document.querySelectorAll("#running .elapsed")) if (td.dataset.started) td.textContent = elapsed(td.dataset.started);
  }, 1000);
}

async function renderStats() {
  const st = await api("/v1/jobs/stats");
  $("stats-total").textContent = `${num(st.total_jobs)} jobs · ${num(st.archived)} archived · ${num(st.credits_used)} credits used · chain position ${st.position}`;
  const statuses = Object.keys(st.by_status);
  window.JLChart.bars($("stats-status-chart"), statuses, statuses.map((s) => st.by_status[s]), { label: "jobs by status" });
  const t = clear($("stats-status"));
  t.append(h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Status"), h("th", { scope: "col", class: "num" }, "Jobs"))),
    h("tbody", {}, statuses.map((s) => h("tr", { "data-status": s }, h("td", {}, badge(s)), h("td", { class: "num" }, num(st.by_status[s]))))));
  const a = clear($("stats-agents"));
  a.append(h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Agent"), h("th", { scope: "col", class: "num" }, "Jobs"),
    statuses.map((s) => h("th", { scope: "col", class: "num" }, s)))),
  h("tbody", {}, Object.entries(st.by_agent).map(([agent, x]) => h("tr", { "data-agent": agent },
    h("td", {}, agent), h("td", { class: "num" }, num(x.total)),
    statuses.map((s) => h("td", { class: "num" }, num(x.by_status[s] || 0)))))));
}

// -- credits ---------------------------------------------------------------------------------

async function renderCredits() {
  const [credits, accounts] = await Promise.all([api("/v1/credits"), api("/v1/accounts")]);
  $("credits-total").textContent = `Granted ${num(credits.granted)} · used ${num(credits.used)} · balance ${num(credits.balance)}`;
  const t = clear($("accounts"));
  t.append(h("thead", {}, h("tr", {}, ["Account", "Jobs", "Running", "Granted", "Used", "Balance"].map((c, i) =>
    h("th", { scope: "col", class: i ? "num" : null }, c)))),
  h("tbody", {}, accounts.accounts.map((x) => h("tr", { "data-account": x.account },
    h("td", {}, x.account), h("td", { class: "num" }, num(x.jobs.total)), h("td", { class: "num" }, num(x.executing)),
    h("td", { class: "num" }, num(x.credits.granted)), h("td", { class: "num" }, num(x.credits.used)),
    h("td", { class: `num${Number(x.credits.balance) < 0 ? " negative" : ""}` }, num(x.credits.balance))))));
  await renderUsage();
}

async function renderUsage() {
  const q = new URLSearchParams({ days: $("usage-days").value });
  const account = $("usage-account").value.trim();
  if (account) q.set("account", account);
  const u = await api(`/v1/credits/usage?${q}`);
  window.JLChart.stackedBars($("usage-plot"), u.days, u.by_agent, { label: "credits used" });
  $("usage-caption").textContent = `${num(u.total)} credits used from ${u.days[0]} to ${u.days[u.days.length - 1]}${account ? ` by account ${account}` : ""} (UTC days; jobs count on the day they finished).`;
  const agents = Object.keys(u.by_agent);
  const t = clear($("usage-table"));
  t.append(h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Day"), agents.map((a) => h("th", { scope: "col", class: "num" }, a)))),
    h("tbody", {}, u.days.map((d, i) => agents.some((a) => Number(u.by_agent[a][i])) ? h("tr", {}, h("td", {}, d),
      agents.map((a) => h("td", { class: "num" }, num(u.by_agent[a][i])))) : null)));
}

async function downloadStatement(ev) {
  ev.preventDefault();
  const q = new URLSearchParams({ account: $("st-account").value.trim(), format: "csv" });
  if ($("st-since").value) q.set("since", `${$("st-since").value}T00:00:00Z`);
  if ($("st-until").value) q.set("until", `${$("st-until").value}T00:00:00Z`);
  try {
    const resp = await api(`/v1/credits/statement?${q}`, { raw: true });
    const text = await resp.text();
    const url = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
    const a = h("a", { href: url, download: `statement-${q.get("account")}.csv` });
    document.body.append(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    $("statement-msg").textContent = `Statement downloaded: ${Math.max(0, text.trim().split("\n").length - 2)} charged jobs.`;
  } catch (e) { $("statement-msg").textContent = e.message; }
}

// -- audit -----------------------------------------------------------------------------------

async function loadAuditHead() {
  const head = await api("/v1/audit/head");
  facts($("audit-head"), [["Events", num(head.count)], ["Last position", head.position],
    ["Head hash", h("code", { class: "hash", id: "head-hash" }, head.hash)]]);
  return head;
}

async function renderAudit() {
  if (S.me.role !== "admin") {
    clear($("audit-head"));
    $("verify-result").textContent = "The audit chain is for admin keys.";
    $("verify-server").disabled = $("verify-browser").disabled = true;
    return;
  }
  $("verify-server").disabled = false;
  $("verify-browser").disabled = !!S.me.project;
  $("verify-browser").title = S.me.project ? "A project's export is a slice of the chain; verify on the server." : "";
  await loadAuditHead();
}

function verdict(ok, text) {
  const node = $("verify-result");
  node.className = ok ? "ok" : "error";
  node.textContent = text;
}

async function verifyOnServer() {
  $("verify-result").textContent = "Verifying…";
  try {
    const v = await api("/v1/audit/verify", { method: "POST" });
    verdict(v.ok, v.ok ? `OK: ${num(v.count)} events, the chain ends at ${v.head} (verified on the server at ${fmtTime(v.checked_at)}).`
      : `FAILED at position ${v.bad_position}: ${v.reason}`);
  } catch (e) { verdict(false, e.message); }
}

const HEADER = ["actor", "data_hash", "event_id", "occurred_at", "position", "recorded_at", "stream", "type", "version"];
const enc = new TextEncoder();
async function sha256hex(text) {
  const digest = await crypto.subtle.digest("SHA-256", enc.encode(text));
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

// The chain check of docs/audit.md, over the export: data_hash covers the data exactly as
// exported (the ledger stores and exports it in canonical form), hash covers the header.
async function checkLine(line, prev) {
  const e = JSON.parse(line);
  if (e.prev_hash !== prev) return [e, "prev_hash does not link to the previous event"];
  if (e.data !== null) {
    const start = line.indexOf(',"data":') + 8;
    const end = line.lastIndexOf(',"data_hash":"');
    if (await sha256hex(line.slice(start, end)) !== e.data_hash) return [e, "data does not match data_hash"];
  }
  const header = {};
  for (const k of HEADER) header[k] = e[k];
  if (await sha256hex(`${prev}\n${JSON.stringify(header)}`) !== e.hash) return [e, "hash does not match the header"];
  return [e, null];
}

async function verifyInBrowser() {
  verdict(true, "Downloading the export…");
  try {
    const head = await loadAuditHead();
    const resp = await api("/v1/audit/export", { raw: true });
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "", prev = "0".repeat(64), count = 0;
    const step = async (line) => {
      if (!line.trim()) return true;
      const [e, problem] = await checkLine(line, prev);
      if (problem) { verdict(false, `FAILED at position ${e.position}: ${problem} (checked in this browser)`); return false; }
      prev = e.hash; count += 1;
      if (count % 1000 === 0) $("verify-result").textContent = `Checked ${num(count)} events…`;
      return true;
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 1);
        if (!(await step(line))) { reader.cancel(); return; }
      }
    }
    if (!(await step(buffer))) return;
    if (count < head.count || (count === head.count && prev !== head.hash)) {
      verdict(false, `FAILED: the export ends at ${count} events and ${prev}, the head says ${head.count} and ${head.hash}`);
      return;
    }
    verdict(true, `OK: ${num(count)} events, the chain ends at ${prev} (verified in this browser with WebCrypto SHA-256).`);
  } catch (e) { verdict(false, e.message); }
}

// -- wiring ----------------------------------------------------------------------------------

function init() {
  $("signin-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("signin-error").textContent = "";
    try { await signIn($("key").value.trim(), $("signin-project").value.trim()); } catch (e) {
      S.key = null; S.me = null;
      $("signin-error").textContent = e.status === 401 ? "That key is not valid." : e.message;
    }
  });
  $("signout").addEventListener("click", () => signOut(""));
  $("filters").addEventListener("submit", applyFilters);
  $("filters").addEventListener("reset", () => setTimeout(() => { location.hash = "#/jobs"; }, 0));
  $("page-next").addEventListener("click", () => {
    if (!S.nextCursor) return;
    S.cursors.push(S.cursor); S.cursor = S.nextCursor;
    renderJobs(true).catch((e) => showError("jobs", e));
  });
  $("page-first").addEventListener("click", () => {
    S.cursors = []; S.cursor = null;
    renderJobs(true).catch((e) => showError("jobs", e));
  });
  $("usage-form").addEventListener("submit", (ev) => { ev.preventDefault(); renderUsage().catch((e) => showError("credits", e)); });
  $("statement-form").addEventListener("submit", downloadStatement);
  $("verify-server").addEventListener("click", verifyOnServer);
  $("verify-browser").addEventListener("click", verifyInBrowser);
  window.addEventListener("hashchange", route);
  const key = sessionStorage.getItem("jobledger.key");
  if (key) signIn(key, sessionStorage.getItem("jobledger.project")).catch(() => signOut(""));
  else signOut("");
}

document.addEventListener("DOMContentLoaded", init);
