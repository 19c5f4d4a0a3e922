// The Lightwire dashboard: three pages over the sidecar's admin API, chosen by the URL's hash
// (#/, #/sessions?filters, #/session/ID, #/adapters). No framework: each page is an async function that reads
// JSON and returns DOM nodes.
"use strict";

const KEY = "lightwire-admin-key"; // the admin key, kept for this browser tab only
const main = document.getElementById("main");

// -- the admin API ----------------------------------------------------------------------------------------

let asking = null; // the key form, while it is shown

async function api(path, { method = "GET", body } = {}) {
  const headers = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (resp.status === 401) {
    await askForKey(key ? "That key was refused." : "This sidecar needs its admin key.");
    return api(path, { method, body });
  }
  const answer = await resp.json();
  if (!resp.ok) throw new Error(answer.error ? answer.error.message : `${resp.status} ${resp.statusText}`);
  return answer;
}

function askForKey(why) {
  asking ??= new Promise((resolve) => {
    const input = el("input", { type: "password", name: "key", autocomplete: "off", required: true });
    const form = el("form", { class: "login" }, el("p", {}, why), el("label", {}, "Admin key ", input),
      el("button", { type: "submit" }, "Open"));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY, input.value);
      form.remove();
      asking = null;
      resolve();
    });
    document.body.append(form);
    input.focus();
  });
  return asking;
}

// -- small helpers ----------------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

const num = (value, digits = 3) => (value === null || value === undefined ? "–" : Number(value).toFixed(digits));
const pct = (value) => `${(100 * value).toFixed(1)} %`;
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");
const badge = (text) => el("span", { class: `badge ${text}` }, text);
const link = (hash, text) => el("a", { href: hash }, text);
const versionLink = (version) => link(`#/sessions?version=${encodeURIComponent(version)}`, version);

function table(headers, rows, empty = "Nothing yet.") {
  if (!rows.length) return el("p", { class: "muted" }, empty);
  return el("table", {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c ?? "–"))))));
}

function card(title, value, note) {
  return el("div", { class: "card" }, el("div", { class: "label" }, title), el("div", { class: "value" }, value),
    el("div", { class: "muted" }, note));
}

function section(title, ...content) {
  return el("section", {}, el("h2", {}, title), ...content);
}

// -- overview ---------------------------------------------------------------------------------------------

async function overviewPage() {
  const { stats, series, latency, policy, runs } = await api("/admin/overview");
  return [
    el("h1", {}, "Overview"),
    el("div", { class: "cards" },
      card("Calls", stats.spans, `${stats.failed_spans} failed`),
      card("Sessions", stats.sessions, `${stats.feedback} feedback rows`),
      card("Rewarded sessions", pct(stats.rewarded_session_fraction), `${stats.rewarded_sessions} of ${stats.sessions}`),
      card(`Mean ${stats.reward_name}`, num(stats.mean_reward), `over ${stats.rewarded} rewarded calls`),
      latencyCard(latency)),
    servingSection(policy),
    section("Mean reward over time, by adapter version",
      series.series.length ? lineChart(series.series) : el("p", { class: "muted" }, "No rewarded calls yet.")),
    section("By adapter version", table(["version", "calls", "sessions", "rewarded calls", "mean reward"],
      stats.by_adapter.map((g) => [versionLink(g.key), g.spans, g.sessions, g.rewarded, num(g.mean_reward)]))),
    section("Last optimizer runs", runsTable(runs)),
  ];
}

// The time Lightwire added to the last hour's calls: each one's duration minus the backend's.
function latencyCard(latency) {
  if (!latency.calls) return card("Added latency, p50", "–", "no calls in the last hour");
  return card("Added latency, p50", `${num(latency.p50_ms, 2)} ms`,
    `p99 ${num(latency.p99_ms, 2)} ms over the last hour's ${latency.calls} calls`);
}

function servingSection(policy) {
  if (!policy) return section("Serving", el("p", { class: "muted" }, "This sidecar forwards to an upstream: no policy, no adapters."));
  const arms = policy.arms
    ? table(["arm", "rewarded sessions", "mean reward"],
      Object.entries(policy.arms).map(([arm, a]) => [arm, a.sessions, num(a.mean)]))
    : null;
  return section("Serving",
    el("dl", { class: "facts" },
      el("dt", {}, "active"), el("dd", { id: "active-version" }, policy.active),
      el("dt", {}, "canary"), el("dd", {}, policy.canary ? `${policy.canary} (${pct(policy.canary_fraction)} of sessions)` : "none"),
      el("dt", {}, "base model"), el("dd", {}, policy.base),
      el("dt", {}, "swap mode"), el("dd", {}, policy.mode),
      el("dt", {}, "state"), el("dd", {}, policy.state)),
    arms);
}

function runsTable(runs) {
  return table(["started", "run", "algorithm", "from → candidate", "records", "decision", "reason"],
    runs.map((r) => [when(r.started_at), r.run_id, r.algorithm, `${r.parent || "base"} → ${r.candidate || "–"}`,
      r.data ? r.data.records : null, badge(r.status), r.reason]),
    "No optimizer run yet.");
}

// -- sessions ---------------------------------------------------------------------------------------------

const FILTERS = ["since", "until", "version", "model", "status", "min_reward", "max_reward"];

async function sessionsPage(_, query) {
  const { data } = await api(`/admin/sessions?${query}`);
  return [
    el("h1", {}, "Sessions"),
    filterForm(query),
    table(["started", "session", "turns", "versions", "models", "tokens", "reward", "status", "ended"],
      data.map((s) => [when(s.started), link(`#/session/${encodeURIComponent(s.id)}`, s.id), s.turns,
        s.versions.join(", "), s.models.join(", "), s.tokens, num(s.reward), badge(s.status), s.ended]),
      "No session matches."),
  ];
}

function filterForm(query) {
  const local = (iso) => (iso ? new Date(new Date(iso).getTime() - new Date().getTimezoneOffset() * 60000).toISOString().slice(0, 16) : "");
  const field = (name, label, attrs) => el("label", {}, label,
    el("input", { name, value: name === "since" || name === "until" ? local(query.get(name)) : query.get(name) ?? "", ...attrs }));
  const status = el("select", { name: "status" }, ["", "ok", "failed"].map((s) =>
    el("option", { value: s, selected: query.get("status") === s }, s || "any")));
  const form = el("form", { class: "filters" },
    field("since", "since", { type: "datetime-local" }), field("until", "until", { type: "datetime-local" }),
    field("version", "version", { placeholder: "v1, base" }), field("model", "model", {}),
    el("label", {}, "status", status),
    field("min_reward", "reward ≥", { type: "number", step: "any" }),
    field("max_reward", "reward ≤", { type: "number", step: "any" }),
    el("button", { type: "submit" }, "Filter"), link("#/sessions", "clear"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const params = new URLSearchParams();
    for (const name of FILTERS) {
      const value = form.elements[name].value;
      if (value) params.set(name, name === "since" || name === "until" ? new Date(value).toISOString() : value);
    }
    location.hash = `#/sessions?${params}`;
  });
  return form;
}

async function sessionPage(id) {
  const session = await api(`/admin/sessions/${encodeURIComponent(id)}`);
  const turnOf = Object.fromEntries(session.turns.map((t, i) => [t.span_id, i]));
  const rewards = table(["name", "value", "for", "source", "comment", "received"],
    session.feedback.map((f) => [f.name, num(f.value), f.span_id ? `turn ${turnOf[f.span_id] ?? "?"}` : "session",
      f.source, f.comment, when(f.created_at)]),
    "No reward received.");
  return [
    el("h1", {}, "Session ", el("code", {}, id)),
    el("p", { class: "muted" }, `${session.turns.length} calls from ${when(session.turns[0].start_time)}; `,
      session.ended ? `ended (${session.ended.reason}) ${when(session.ended.ended_at)}` : "open"),
    section("Rewards", rewards),
    section("Transcript", el("div", { class: "transcript" },
      session.turns.map((turn, i) => turnView(turn, i, session.turns[i - 1], session.feedback)))),
  ];
}

function turnView(turn, i, previous, feedback) {
  const tokens = turn.usage_input_tokens === null ? "" : ` · ${turn.usage_input_tokens} → ${turn.usage_output_tokens} tokens`;
  const ttfc = turn.time_to_first_chunk_ms === null ? "" : `, first chunk ${num(turn.time_to_first_chunk_ms, 0)} ms`;
  const status = turn.error_type ? badge("failed") : badge("ok");
  const meta = el("div", { class: "meta" }, el("strong", {}, `turn ${i}`), ` ${turn.request_model} · version `,
    el("strong", {}, turn.version), ` · ${num(turn.duration_ms, 0)} ms${ttfc}${tokens} · `, status);
  const own = feedback.filter((f) => f.span_id === turn.span_id).map((f) =>
    el("span", { class: "reward" }, `${f.name} ${num(f.value, 2)}`, f.comment ? ` (${f.comment})` : ""));
  const body = [];
  if (turn.operation_name === "chat") {
    body.push(...newMessages(turn.request.messages || [], previous).map((m) => messageView(m)));
    for (const [c, choice] of ((turn.response && turn.response.choices) || []).entries()) {
      body.push(messageView(choice.message || {}, turn.response.choices.length > 1 ? `choice ${c}` : null));
    }
  } else {
    body.push(messageView({ role: "prompt", content: String(turn.request.prompt) }));
    for (const choice of (turn.response && turn.response.choices) || []) body.push(messageView({ role: "completion", content: choice.text }));
  }
  if (turn.error_type) body.push(el("div", { class: "error" }, `${turn.http_status} ${turn.error_type}: ${turn.error_message}`));
  return el("article", { class: "turn", "data-span": turn.span_id }, meta, own.length ? el("div", { class: "rewards" }, own) : null,
    body, el("details", {}, el("summary", {}, "request and response as sent"),
      el("pre", {}, JSON.stringify({ request: turn.request, response: turn.response }, null, 2))));
}

// Agents send the whole conversation each turn: show what is new since the previous turn and its answer.
function newMessages(messages, previous) {
  if (!previous || previous.operation_name !== "chat") return messages;
  let start = (previous.request.messages || []).length;
  const reply = previous.response && previous.response.choices && previous.response.choices[0].message;
  if (reply && messages[start] && sameMessage(messages[start], reply)) start += 1;
  return start < messages.length ? messages.slice(start) : messages;
}

function sameMessage(a, b) {
  const calls = (m) => JSON.stringify((m.tool_calls || []).map((c) => c.function));
  return a.role === b.role && (a.content ?? null) === (b.content ?? null) && calls(a) === calls(b);
}

function messageView(message, label = null) {
  const text = Array.isArray(message.content)
    ? message.content.map((part) => part.text ?? `[${part.type}]`).join("\n")
    : message.content;
  const calls = (message.tool_calls || []).map((call) =>
    el("pre", { class: "tool-call" }, `${call.function.name}(${call.function.arguments})`));
  const role = message.role === "tool" ? `tool result${message.tool_call_id ? ` (${message.tool_call_id})` : ""}` : message.role;
  return el("div", { class: `message ${message.role}` }, el("div", { class: "role" }, role, label ? ` · ${label}` : ""),
    text ? el("div", { class: "content" }, text) : null, calls);
}

// -- adapters and runs ------------------------------------------------------------------------------------

async function adaptersPage() {
  const [adapters, runs] = await Promise.all([api("/admin/adapters").catch((err) => err), api("/admin/runs")]);
  const runOf = Object.fromEntries(runs.data.filter((r) => r.candidate).map((r) => [r.candidate, r]));
  let versions;
  if (adapters instanceof Error) {
    versions = el("p", { class: "muted" }, adapters.message);
  } else {
    versions = [
      el("p", {}, `Serving ${adapters.active} to new sessions`,
        adapters.canary ? `, canary ${adapters.canary} to ${pct(adapters.canary_fraction)}` : "", ` (${adapters.mode} mode). `,
        el("button", { class: "rollback", onclick: () => act("roll back", "/admin/rollback", {},
          adapters.canary ? `Stop the canary ${adapters.canary}?` : `Return from ${adapters.active} to the previous version?`) },
        "Roll back")),
      table(["version", "status", "parent", "algorithm", "data window", "evaluation", "created", "note", ""],
        adapters.data.slice().reverse().map((a) => [a.version, badge(a.status), a.parent || "base", a.algorithm,
          dataWindow(a.data), evaluation(runOf[a.version]), when(a.created_at), a.message, actions(a)]),
        "No adapter version yet: the optimizer registers them, or lightwire adapters register."),
    ];
  }
  return [
    el("h1", {}, "Adapters & runs"),
    section("Versions", versions),
    section("Optimizer runs", table(["started", "ended", "run", "algorithm", "from → candidate", "data", "training", "evaluation", "decision", "reason"],
      runs.data.slice().reverse().map((r) => [when(r.started_at), when(r.ended_at), r.run_id, r.algorithm,
        `${r.parent || "base"} → ${r.candidate || "–"}`, dataWindow(r.data), training(r.training), evaluation(r), badge(r.status), r.reason]),
      "No optimizer run yet.")),
  ];
}

function dataWindow(data) {
  if (!data) return null;
  const span = `${data.since ? when(data.since) : "start"} → ${data.until ? when(data.until) : "now"}`;
  return data.records === undefined ? span : `${span}, ${data.records} records`;
}

function training(t) {
  if (!t) return null;
  const losses = t.losses || [];
  return losses.length ? `loss ${num(losses[0])} → ${num(losses[losses.length - 1])}` : JSON.stringify(t);
}

function evaluation(run) {
  const e = run && run.evaluation;
  if (!e) return null;
  const arms = e.arms ? Object.entries(e.arms).map(([arm, a]) => `${arm} ${num(a.mean)} (${a.sessions ?? a.n ?? "?"})`).join(", ") : "";
  return `${e.method || ""}${arms ? `: ${arms}` : ""}`;
}

function actions(adapter) {
  if (adapter.status === "active" || adapter.status === "failed") return null;
  return el("span", { class: "actions" },
    el("button", { class: "activate", "data-version": adapter.version, onclick: () =>
      act("activate", `/admin/adapters/${adapter.version}/activate`, {}, `Serve ${adapter.version} to every new session?`) },
    "Activate"),
    el("button", { class: "canary", "data-version": adapter.version, onclick: () => {
      const fraction = prompt(`Share of new sessions for a canary of ${adapter.version} (0 to 1):`, "0.1");
      if (fraction !== null) act("canary", `/admin/adapters/${adapter.version}/canary`, { fraction: Number(fraction) });
    } }, "Canary"));
}

async function act(what, path, body, question = null) {
  if (question !== null && !confirm(question)) return;
  try {
    await api(path, { method: "POST", body });
    await route();
  } catch (err) {
    alert(`Could not ${what}: ${err.message}`);
  }
}

// -- routing ----------------------------------------------------------------------------------------------

const PAGES = { "": overviewPage, sessions: sessionsPage, session: sessionPage, adapters: adaptersPage };

async function route() {
  const [path, query = ""] = location.hash.slice(1).split("?");
  const [, page = "", arg = ""] = path.split("/");
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("here", a.dataset.page === (page === "session" ? "sessions" : page));
  try {
    const nodes = await (PAGES[page] || overviewPage)(decodeURIComponent(arg), new URLSearchParams(query));
    main.replaceChildren(...nodes.flat().filter(Boolean));
  } catch (err) {
    main.replaceChildren(el("p", { class: "error" }, err.message));
  }
  main.dataset.page = page || "overview"; // tests and screenshots wait for this
}

addEventListener("hashchange", route);
route();
