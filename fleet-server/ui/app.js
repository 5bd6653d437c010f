// The modelfleet dashboard: hash-routed pages over the fleet server's JSON API.
// Every element is built with the DOM API (no innerHTML), so text from devices is never markup.

import * as api from "./api.js";
import { lineChart, bar, fmt } from "./charts.js";

let me = null; // {name, role}
let current = null; // the page on screen: {route, refresh}
let stopStream = null;
let refreshTimer = null;
let refreshing = false;
let routeSeq = 0;

// ---- DOM helpers ----

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k === "value") el.value = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
  return el;
}

const $ = (id) => document.getElementById(id);
const badge = (s) => h("span", { class: "badge " + s, text: s });
const figure = (name, value) => h("span", { "data-figure": name, text: String(value) });
const canAct = () => me && me.role !== "viewer";

function card(label, name, value, cls, href) {
  const body = [h("div", { class: "n" }, figure(name, value)), h("div", { class: "l", text: label })];
  return href ? h("a", { class: "card " + (cls || ""), href }, body) : h("div", { class: "card " + (cls || "") }, body);
}

function table(headers, rows, attrs) {
  return h(
    "table",
    attrs || {},
    h("thead", {}, h("tr", {}, headers.map((c) => h("th", { class: /^[#\d]|num$/.test(c) ? "num" : null, text: c.replace(/ num$/, "") })))),
    h("tbody", {}, rows.length ? rows : [h("tr", {}, h("td", { colspan: headers.length, class: "note", text: "none" }))]),
  );
}

const td = (...c) => h("td", {}, ...c);
const tdn = (v, name) => h("td", { class: "num" }, name ? figure(name, v) : String(v));

function when(t) {
  if (!t) return "–";
  const d = new Date(t);
  const s = Math.round((Date.now() - d.getTime()) / 1000);
  const ago = s < 60 ? `${s}s ago` : s < 3600 ? `${Math.round(s / 60)}m ago` : s < 86400 ? `${Math.round(s / 3600)}h ago` : `${Math.round(s / 86400)}d ago`;
  return `${d.toISOString().replace("T", " ").slice(0, 19)} (${ago})`;
}

function bytes(n) {
  if (n >= 1 << 20) return (n / (1 << 20)).toFixed(1) + " MiB";
  if (n >= 1 << 10) return (n / (1 << 10)).toFixed(1) + " KiB";
  return n + " B";
}

const pct = (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(2) + " %");
const esc = encodeURIComponent;

function flash(root, ok, text) {
  const f = h("div", { class: "flash " + (ok ? "ok" : "bad"), role: "status", text });
  root.prepend(f);
  setTimeout(() => f.remove(), 8000);
}

// ---- routing ----

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/fleet";
  const [path, query] = raw.split("?");
  const parts = path.split("/").filter(Boolean);
  return { parts, query: new URLSearchParams(query || "") };
}

async function route() {
  if (!api.token()) return showSignin();
  const { parts, query } = parseHash();
  const page = $("page");
  const [name, id] = parts;
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === name);
  const pages = {
    fleet: fleetPage,
    rollouts: id ? rolloutPage : rolloutsPage,
    devices: id ? devicePage : devicesPage,
    bundles: bundlesPage,
  };
  const make = pages[name] || fleetPage;
  const root = h("div", { class: "page" });
  page.replaceChildren(root);
  page.dataset.route = parts.join("/");
  page.dataset.loaded = "";
  const seq = ++routeSeq;
  current = null;
  try {
    const made = await make(root, id ? decodeURIComponent(id) : null, query);
    await made.refresh();
    if (seq !== routeSeq) return; // the user went elsewhere meanwhile
    current = made;
    page.dataset.loaded = parts.join("/") || "fleet";
  } catch (e) {
    if (seq === routeSeq) handleError(root, e);
  }
}

function handleError(root, e) {
  if (e instanceof api.ApiError && e.status === 401) {
    api.setToken(null);
    showSignin("The token was refused: " + e.message);
    return;
  }
  root.appendChild(h("p", { class: "error", text: String(e.message || e) }));
}

// Live updates: re-fetch the page's figures (not its forms) at most once a second.
function scheduleRefresh() {
  if (refreshTimer || !current) return;
  refreshTimer = setTimeout(async () => {
    refreshTimer = null;
    if (refreshing || !current) return;
    refreshing = true;
    try {
      await current.refresh();
      $("page").dataset.updated = String(Date.now());
    } catch (e) {
      if (e instanceof api.ApiError && e.status === 401) handleError($("page"), e);
    } finally {
      refreshing = false;
    }
  }, 1000);
}

function startStream() {
  if (stopStream) stopStream();
  stopStream = api.stream(
    (name) => {
      if (name === "update") scheduleRefresh();
    },
    (on) => {
      const l = $("live");
      l.className = "live " + (on ? "on" : "off");
      l.textContent = on ? "live" : "offline";
    },
  );
}

// ---- sign in ----

function showSignin(message) {
  if (stopStream) stopStream();
  stopStream = null;
  current = null;
  me = null;
  $("nav").hidden = true;
  $("signout").hidden = true;
  $("who").textContent = "";
  $("page").replaceChildren();
  $("signin").hidden = false;
  $("signin-error").textContent = message || "";
  $("token").focus();
}

async function signIn(token) {
  api.setToken(token);
  try {
    me = await api.get("/api/v1/whoami");
  } catch (e) {
    api.setToken(null);
    showSignin(e.status === 401 ? "Unknown token." : String(e.message));
    return;
  }
  $("signin").hidden = true;
  $("nav").hidden = false;
  $("signout").hidden = false;
  $("who").textContent = `${me.name} (${me.role})`;
  document.body.dataset.role = me.role;
  startStream();
  await route();
}

// ---- Fleet ----

async function fleetPage(root) {
  root.append(h("h1", { text: "Fleet" }));
  const body = h("div");
  root.append(body);
  return {
    async refresh() {
      const s = await api.get("/api/v1/fleet/summary");
      const d = s.devices;
      const cards = h(
        "div",
        { class: "cards" },
        card("devices", "devices-total", d.total, "", "#/devices"),
        card("online", "devices-online", d.online, "ok", "#/devices?online=true"),
        card("offline", "devices-offline", d.offline, d.offline ? "warn" : "", "#/devices?online=false"),
        card("on trial", "devices-trial", d.trial, d.trial ? "warn" : "", "#/devices?state=trial"),
        card("reverted", "devices-reverted", d.reverted, d.reverted ? "bad" : "", "#/devices?state=reverted"),
        card("active rollouts", "rollouts-active", s.rollouts.active, "", "#/rollouts"),
        card("bundles", "bundles-total", s.bundles, "", "#/bundles"),
      );
      const modelRows = s.models.flatMap((m) =>
        m.versions.map((v) =>
          h(
            "tr",
            { "data-model": m.model, "data-version": v.version },
            td(h("a", { href: `#/devices?model=${esc(m.model)}`, text: m.model })),
            td(h("a", { href: `#/devices?model=${esc(m.model + "@" + v.version)}`, text: v.version })),
            h("td", { class: "num" }, figure(`model-${m.model}-${v.version}`, v.devices), " ", bar(v.devices, d.total)),
            tdn(v.online),
            tdn(v.trial),
            tdn(v.committed),
            tdn(v.reverted),
          ),
        ),
      );
      const targets = s.by_target.map((t) =>
        h("tr", {}, td(t.target), h("td", { class: "num" }, figure(`target-${t.target}`, t.total), " ", bar(t.total, d.total)), tdn(t.online)),
      );
      const labels = s.by_label.map((l) =>
        h(
          "tr",
          {},
          td(h("a", { href: `#/devices?label=${esc(l.key + ":" + l.value)}`, text: `${l.key}=${l.value}` })),
          h("td", { class: "num" }, figure(`label-${l.key}=${l.value}`, l.total), " ", bar(l.total, d.total)),
          tdn(l.online),
        ),
      );
      const states = Object.entries(s.rollouts.by_state).map(([k, v]) => h("span", {}, badge(k), " ", figure(`rollouts-${k}`, v), "  "));
      body.replaceChildren(
        cards,
        h("h2", { text: "Models and versions across the fleet" }),
        table(["model", "version", "devices num", "online num", "trial num", "committed num", "reverted num"], modelRows, { id: "models" }),
        h(
          "div",
          { class: "grid2" },
          h("div", {}, h("h2", { text: "By target" }), table(["target", "devices num", "online num"], targets, { id: "targets" })),
          h(
            "div",
            {},
            h("h2", { text: "By label" + (s.label_rows > s.by_label.length ? ` (top ${s.by_label.length} of ${s.label_rows})` : "") }),
            table(["label", "devices num", "online num"], labels, { id: "labels" }),
          ),
        ),
        h("h2", { text: "Rollouts" }),
        h("p", {}, states.length ? states : "no rollouts yet", " ", h("a", { href: "#/rollouts", text: "all rollouts →" })),
        h("p", { class: "note", text: `Aggregated on the server at ${when(s.generated_at)}.` }),
      );
    },
  };
}

// ---- Rollouts ----

function stageText(r) {
  const st = r.stages[r.stage];
  return `${Math.min(r.stage + 1, r.stages.length)}/${r.stages.length}` + (st ? ` (${st.percent} %)` : "");
}

async function rolloutsPage(root) {
  root.append(h("h1", { text: "Rollouts" }));
  const list = h("div");
  root.append(list);
  if (canAct()) root.append(h("h2", { text: "New rollout" }), await createForm(root));
  else root.append(h("p", { class: "note", text: "Signed in as a viewer: creating rollouts needs an operator token." }));
  return {
    async refresh() {
      const { rollouts } = await api.get("/api/v1/rollouts");
      const rows = rollouts.map((r) =>
        h(
          "tr",
          { "data-rollout": r.id },
          td(h("a", { href: `#/rollouts/${esc(r.id)}`, class: "mono", text: r.id })),
          td(`${r.model} ${r.version}`),
          td(badge(r.state)),
          td(stageText(r)),
          tdn(r.devices),
          td(when(r.created_at), " by ", r.created_by),
          td(r.last_decision ? `${r.last_decision.action}: ${r.last_decision.reason}` : "–"),
        ),
      );
      list.replaceChildren(
        h("p", {}, figure("rollouts-count", rollouts.length), " rollouts, newest first"),
        table(["id", "model", "state", "stage", "devices num", "created", "last decision"], rows, { id: "rollouts" }),
      );
    },
  };
}

async function createForm(root) {
  const bundleSel = h("select", { id: "new-bundle", name: "bundle" });
  async function loadBundles(select) {
    const { bundles } = await api.get("/api/v1/bundles");
    bundleSel.replaceChildren(...bundles.map((b) => h("option", { value: b.id, text: `${b.name} ${b.version} (${b.id.slice(0, 12)}…)` })));
    if (select) bundleSel.value = select;
  }
  await loadBundles();
  const file = h("input", { type: "file", id: "new-bundle-file", accept: ".mfb" });
  const upload = h("button", {
    type: "button",
    text: "Upload",
    onclick: async () => {
      if (!file.files.length) return flash(form, false, "choose a .mfb file first");
      try {
        const b = await api.postBytes("/api/v1/bundles", await file.files[0].arrayBuffer());
        await loadBundles(b.id);
        flash(form, true, `uploaded ${b.name} ${b.version}`);
      } catch (e) {
        flash(form, false, e.message);
      }
    },
  });
  const labels = h("input", { id: "new-labels", placeholder: "site=berlin, hw=pi4 (empty: every device)" });
  const stages = h("input", { id: "new-stages", value: "10:300, 50:600, 100:0" });
  const onFailure = h("select", { id: "new-on-failure" }, h("option", { value: "rollback", text: "rollback" }), h("option", { value: "pause", text: "pause" }));
  const gates = h("textarea", { id: "new-gates", rows: 2, placeholder: '{"max_error_rate_delta": 0.01, "min_requests_per_cohort": 200}' });
  const form = h(
    "form",
    { class: "create", id: "create-rollout" },
    h("label", { for: "new-bundle", text: "Bundle" }),
    bundleSel,
    h("label", { for: "new-bundle-file", text: "or upload one" }),
    h("span", {}, file, " ", upload),
    h("label", { for: "new-labels", text: "Devices with labels" }),
    labels,
    h("label", { for: "new-stages", text: "Stages (percent:bake s)" }),
    stages,
    h("label", { for: "new-on-failure", text: "On failure" }),
    onFailure,
    h("label", { for: "new-gates", text: "Gates (JSON, optional)" }),
    gates,
    h("span"),
    h("span", {}, h("button", { type: "submit", id: "create-submit", text: "Create rollout" })),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const spec = { bundle_id: bundleSel.value };
      const sel = {};
      for (const pair of labels.value.split(",").map((s) => s.trim()).filter(Boolean)) {
        const [k, v] = pair.split("=");
        if (!k || v === undefined) throw new Error(`label '${pair}' is not KEY=VALUE`);
        sel[k.trim()] = v.trim();
      }
      spec.selector = { labels: sel };
      spec.stages = stages.value
        .split(",")
        .map((s) => s.trim())
        .filter(Boolean)
        .map((s) => {
          const [p, b] = s.split(":");
          return { percent: Number(p), bake_seconds: Number(b || 0) };
        });
      spec.on_failure = onFailure.value;
      if (gates.value.trim()) spec.gates = JSON.parse(gates.value);
      const r = await api.postJson("/api/v1/rollouts", spec);
      location.hash = `#/rollouts/${esc(r.id)}`;
    } catch (e) {
      flash(form, false, e.message);
    }
  });
  return form;
}

const ALLOWED = {
  pause: ["pending", "running"],
  resume: ["paused", "failed"],
  abort: ["pending", "running", "paused", "failed"],
  rollback: ["pending", "running", "paused", "succeeded", "failed", "aborted"],
};

function gatesTable(gates) {
  return table(
    ["gate", "verdict", "canary num", "control num", "value num", "threshold num", "evidence"],
    gates.map((g) =>
      h("tr", { "data-gate": g.gate }, td(g.gate), td(badge(g.verdict)), tdn(fmt(g.canary)), tdn(fmt(g.control)), tdn(fmt(g.value)), tdn(fmt(g.threshold)), td(g.note)),
    ),
    { class: "gates" },
  );
}

async function rolloutPage(root, id) {
  const head = h("div");
  const actions = h("div", { class: "actions", id: "actions" });
  const body = h("div");
  root.append(head, actions, body);
  let state = null;
  const act = async (action) => {
    if ((action === "abort" || action === "rollback") && !window.confirm(`${action} rollout ${id}?`)) return;
    try {
      const r = await api.postJson(`/api/v1/rollouts/${esc(id)}/${action}`);
      flash(root, true, `${action}: the rollout is now ${r.state}`);
    } catch (e) {
      flash(root, false, `${action}: ${e.message}`);
    }
    await page.refresh();
  };
  const buttons = Object.keys(ALLOWED).map((a) =>
    h("button", { type: "button", id: `action-${a}`, class: a === "abort" || a === "rollback" ? "danger" : "", text: a[0].toUpperCase() + a.slice(1), onclick: () => act(a) }),
  );
  if (canAct()) actions.append(...buttons);
  else actions.append(h("span", { class: "note", text: "Signed in as a viewer: pause, resume, abort and roll back need an operator token." }));
  const page = {
    async refresh() {
      const [r, s, reverts] = await Promise.all([
        api.get(`/api/v1/rollouts/${esc(id)}`),
        api.get(`/api/v1/rollouts/${esc(id)}/series`),
        api.get(`/api/v1/events?kind=reverted&limit=500`),
      ]);
      state = r.state;
      for (const b of buttons) b.disabled = !ALLOWED[b.id.replace("action-", "")].includes(state);
      head.replaceChildren(
        h("h1", {}, "Rollout ", h("span", { class: "mono", text: r.id }), " ", h("span", { "data-figure": "rollout-state", class: "badge " + r.state, text: r.state })),
        h("p", {}, `${r.model} ${r.version} · bundle `, h("span", { class: "mono", text: r.bundle.bundle_id.slice(0, 16) + "…" }), ` · created ${when(r.created_at)} by ${r.created_by}` +
          ` · selector ${Object.entries(r.spec.selector.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ") || "every device"} · on failure ${r.spec.on_failure}`),
      );
      const stages = h(
        "div",
        { class: "stages", id: "stages" },
        r.spec.stages.map((st, i) => {
          const done = i < r.stage || (i === r.stage && r.state === "succeeded");
          const cls = done ? "done" : i === r.stage ? (["failed", "rolled_back"].includes(r.state) ? "current failed" : "current") : "";
          return h("div", { class: "stage " + cls, "data-stage": i }, h("strong", { text: `Stage ${i + 1}: ${st.percent} %` }), h("div", { class: "note", text: `bake ${st.bake_seconds || 0} s` }));
        }),
      );
      const c = r.cohorts;
      const cohorts = h(
        "div",
        { class: "cards", id: "cohorts" },
        card("selected", "cohort-selected", c.selected),
        card("canaries", "cohort-canary", c.canary.devices),
        card("staged", "cohort-staged", c.canary.staged, c.canary.staged ? "warn" : ""),
        card("installed", "cohort-installed", c.canary.installed, "ok"),
        card("failed installs", "cohort-failed", c.canary.failed, c.canary.failed ? "bad" : ""),
        card("reverted", "cohort-reverted", c.canary.reverted, c.canary.reverted ? "bad" : ""),
        card("rolled back", "cohort-rolled_back", c.canary.rolled_back),
        card("control", "cohort-control", c.control.devices),
      );
      const t = (x) => new Date(x).getTime();
      const pts = s.points;
      const judged = s.decisions.filter((d) => d.verdict);
      const markers = s.decisions.map((d) => ({ t: t(d.time), label: `${d.action}: ${d.reason}`, cls: d.action }));
      // One time axis for every chart, so a decision's line sits at the same place in each.
      const span = { from: t(s.from), to: t(s.to) };
      const chart = (title, get, opts = {}) =>
        lineChart(
          title,
          [
            { name: "canary", cls: "canary", points: pts.map((p) => [t(p.t), get(p.canary, p)]) },
            { name: "control", cls: "control", points: pts.map((p) => [t(p.t), get(p.control, p)]) },
            { name: "canary at decisions", cls: "canary", dots: true, points: judged.map((d) => [t(d.time), d.canary ? get(d.canary, d) : null]) },
            { name: "control at decisions", cls: "control", dots: true, points: judged.map((d) => [t(d.time), d.control ? get(d.control, d) : null]) },
          ],
          { markers, ...span, ...opts },
        );
      const g = r.spec.gates || {};
      const charts = h(
        "div",
        { class: "charts", id: "charts" },
        chart("Error rate", (x) => x.error_rate, { id: "chart-error-rate" }),
        chart("p95 latency (ms)", (x) => x.p95_ms, { id: "chart-p95" }),
        chart("Mean top-1 confidence", (x) => x.mean_confidence, { id: "chart-confidence" }),
        lineChart(
          "Prediction PSI (canary vs control)",
          [
            { name: "PSI", cls: "canary", points: pts.map((p) => [t(p.t), p.prediction_psi]) },
            { name: "PSI at decisions", cls: "canary", dots: true, points: judged.map((d) => [t(d.time), d.prediction_psi]) },
          ],
          { markers, ...span, threshold: g.max_prediction_psi, id: "chart-psi" },
        ),
        lineChart("Reverts (canaries, cumulative)", [{ name: "reverts", cls: "canary", points: pts.map((p) => [t(p.t), p.reverts]) }], {
          markers,
          ...span,
          threshold: g.max_reverts,
          floorMax: 1,
          id: "chart-reverts",
        }),
      );
      const decisions = r.decisions
        .slice()
        .reverse()
        .map((d) =>
          h(
            "tr",
            { "data-action": d.action },
            td(when(d.time)),
            tdn(d.stage + 1),
            td(badge(d.action)),
            td(
              d.reason,
              d.judgement
                ? h(
                    "details",
                    { open: d.judgement.verdict === "fail" ? true : null },
                    h("summary", {}, "evidence: ", badge(d.judgement.verdict)),
                    gatesTable(d.judgement.gates),
                    h("p", { class: "note", text: `canary ${d.judgement.canary.devices} devices, ${d.judgement.canary.requests} requests; control ${d.judgement.control ? d.judgement.control.devices + " devices, " + d.judgement.control.requests + " requests" : "none"}` }),
                  )
                : null,
            ),
          ),
        );
      const devs = Object.entries(r.devices).map(([dev, p]) =>
        h("tr", { "data-device": dev }, td(h("a", { href: `#/devices/${esc(dev)}`, text: dev })), tdn(p.stage + 1), td(badge(p.state)), td(when(p.since)), td(p.reason || "")),
      );
      const revs = (reverts.events || []).filter((e) => e.model === r.model && e.detail && e.detail.from === r.version && r.devices[e.device_id]);
      const revRows = revs.map((e) =>
        h(
          "tr",
          {},
          td(h("a", { href: `#/devices/${esc(e.device_id)}`, text: e.device_id })),
          td(when(e.time)),
          td(String(e.detail.reason || "")),
          td(h("details", {}, h("summary", { text: "evidence" }), h("pre", { class: "sample", text: JSON.stringify(e.detail.evidence || {}, null, 1) }))),
        ),
      );
      body.replaceChildren(
        h("h2", { text: "Stages" }),
        stages,
        h("h2", { text: "Cohorts" }),
        cohorts,
        h("h2", { text: "Canary vs control" }),
        h("p", { class: "note", text: `Telemetry summed per ${s.bucket_seconds} s on the server (since it started); dots are the figures each judgement used; vertical lines are decisions.` }),
        charts,
        h("h2", { text: "Decisions" }),
        table(["time", "stage num", "action", "reason and evidence"], decisions, { id: "decisions" }),
        h("h2", { text: "Reverted canaries" }),
        table(["device", "time", "reason", "evidence"], revRows, { id: "reverts" }),
        h("h2", { text: "Devices in the rollout" }),
        table(["device", "stage num", "state", "since", "note"], devs, { id: "rollout-devices" }),
      );
    },
  };
  return page;
}

// ---- Devices ----

const PAGE = 50;

async function devicesPage(root, _id, query) {
  root.append(h("h1", { text: "Devices" }));
  const q = h("input", { id: "dev-search", type: "search", placeholder: "search id, label, target, model", value: query.get("q") || "" });
  const label = h("input", { id: "dev-label", placeholder: "label KEY:VALUE", value: query.get("label") || "" });
  const online = h("select", { id: "dev-online" }, h("option", { value: "", text: "online or not" }), h("option", { value: "true", text: "online" }), h("option", { value: "false", text: "offline" }));
  online.value = query.get("online") || "";
  const state = h("select", { id: "dev-state" }, ["", "trial", "committed", "reverted"].map((s) => h("option", { value: s, text: s || "any model state" })));
  state.value = query.get("state") || "";
  const model = query.get("model") || "";
  let offset = Number(query.get("offset") || 0);
  const list = h("div");
  const go = () => {
    const p = new URLSearchParams();
    if (q.value) p.set("q", q.value);
    if (label.value) p.set("label", label.value);
    if (online.value) p.set("online", online.value);
    if (state.value) p.set("state", state.value);
    if (model) p.set("model", model);
    if (offset) p.set("offset", offset);
    location.hash = "#/devices" + (p.toString() ? "?" + p : "");
  };
  const form = h("form", { class: "toolbar", id: "dev-filter" }, q, label, online, state, h("button", { type: "submit", text: "Filter" }), model ? h("span", {}, "model ", h("code", { text: model }), " ", h("a", { href: "#/devices", text: "clear" })) : null);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    offset = 0;
    go();
  });
  root.append(form, list);
  return {
    async refresh() {
      const p = new URLSearchParams({ limit: PAGE, offset });
      if (q.value) p.set("q", q.value);
      if (label.value) p.set("label", label.value);
      if (online.value) p.set("online", online.value);
      if (state.value) p.set("state", state.value);
      if (model) p.set("model", model);
      const { devices, total } = await api.get("/api/v1/devices?" + p);
      const rows = devices.map((d) =>
        h(
          "tr",
          { "data-device": d.id },
          td(h("a", { href: `#/devices/${esc(d.id)}`, text: d.id })),
          td(badge(d.online ? "online" : "offline")),
          td(d.target || "–"),
          td(Object.entries(d.labels).map(([k, v]) => `${k}=${v}`).join(", ")),
          td(d.models.map((m) => h("span", {}, `${m.name} ${m.active} `, badge(m.state), " "))),
          td(when(d.last_seen)),
        ),
      );
      const prev = h("button", { type: "button", id: "dev-prev", text: "← Previous", disabled: offset <= 0, onclick: () => ((offset = Math.max(0, offset - PAGE)), go()) });
      const next = h("button", { type: "button", id: "dev-next", text: "Next →", disabled: offset + PAGE >= total, onclick: () => ((offset += PAGE), go()) });
      list.replaceChildren(
        h("div", { class: "pager" }, prev, next, h("span", {}, `${total ? offset + 1 : 0}–${offset + devices.length} of `, figure("devices-matching", total))),
        table(["device", "link", "target", "labels", "models", "last seen"], rows, { id: "devices" }),
      );
    },
  };
}

// A sampled tensor: name, type and shape, plus the start of its sha256 when the bundle's
// telemetry_samples mode is "hashed" (no values are sent then).
function tensorLabel(x) {
  const head = `${x.name} ${x.datatype}[${x.shape.join("×")}]`;
  return x.sha256 ? `${head} sha256 ${x.sha256.slice(0, 12)}…` : head;
}

function sampleInputs(sample) {
  const hashed = sample.inputs.some((x) => x.sha256);
  const text = sample.inputs.map(tensorLabel).join(", ");
  return hashed ? h("span", { class: "mono", title: sample.inputs.map((x) => `${x.name} sha256 ${x.sha256}`).join("\n"), text }) : text;
}

function topClass(sample) {
  const out = sample.outputs && sample.outputs[0];
  if (out && out.sha256) return "hashed";
  if (!out || !out.data || !out.data.length) return "–";
  let best = 0;
  for (let i = 1; i < out.data.length; i++) if ((out.data[i] ?? -Infinity) > (out.data[best] ?? -Infinity)) best = i;
  return `class ${best} (${fmt(out.data[best])})`;
}

async function devicePage(root, id) {
  const body = h("div");
  root.append(body);
  return {
    async refresh() {
      const [d, ev] = await Promise.all([api.get(`/api/v1/devices/${esc(id)}`), api.get(`/api/v1/events?device_id=${esc(id)}&limit=100`)]);
      const tele = await Promise.all(d.models.map((m) => api.get(`/api/v1/devices/${esc(id)}/telemetry?model=${esc(m.name)}`)));
      const info = h(
        "dl",
        { class: "kv" },
        h("dt", { text: "state" }), h("dd", {}, h("span", { "data-figure": "device-online", class: "badge " + (d.online ? "online" : "offline"), text: d.online ? "online" : "offline" })),
        h("dt", { text: "target" }), h("dd", { text: d.target || "–" }),
        h("dt", { text: "labels" }), h("dd", { text: Object.entries(d.labels).map(([k, v]) => `${k}=${v}`).join(", ") || "–" }),
        h("dt", { text: "agent" }), h("dd", { text: d.agent_version || "–" }),
        h("dt", { text: "first seen" }), h("dd", { text: when(d.first_seen) }),
        h("dt", { text: "last seen" }), h("dd", { text: when(d.last_seen) }),
        h("dt", { text: "transfer" }), h("dd", { text: d.transfer ? `${d.transfer.bundle_id.slice(0, 12)}… ${d.transfer.chunks_served}/${d.transfer.total_chunks} chunks served, ${d.transfer.last_event || "no event yet"}` : "none" }),
      );
      const models = d.models.map((m) =>
        h("tr", { "data-model": m.name }, td(m.name), td(h("span", { "data-figure": `active-${m.name}`, text: m.active })), td(m.previous || "–"), td(badge(m.state)), td(h("span", { "data-figure": `compute-${m.name}`, text: m.compute || "–", title: "precision the device computes this model in (agents before it reported it: –)" })), tdn(m.security_version), td(h("span", { class: "mono", text: (m.bundle_sha256 || "").slice(0, 12) }))),
      );
      const events = ev.events.map((e) =>
        h(
          "tr",
          { "data-kind": e.kind },
          td(when(e.time)),
          td(badge(e.kind)),
          td([e.model, e.version].filter(Boolean).join(" ")),
          td(
            e.kind === "reverted" ? h("strong", { text: `${e.detail.from} → ${e.detail.to}: ${e.detail.reason}` }) : null,
            e.kind === "reverted" && e.detail.evidence ? h("details", {}, h("summary", { text: "evidence" }), h("pre", { class: "sample", text: JSON.stringify(e.detail.evidence, null, 1) })) : null,
            e.kind !== "reverted" ? h("span", { class: "detail", text: JSON.stringify(e.detail).slice(0, 140) }) : null,
          ),
          td(e.rollout_id ? h("a", { href: `#/rollouts/${esc(e.rollout_id)}`, class: "mono", text: e.rollout_id }) : "–"),
        ),
      );
      const sections = d.models.map((m, i) => {
        const windows = tele[i].windows;
        const versions = [...new Set(windows.map((w) => w.version))];
        const cls = ["device", "control", "canary"];
        const ser = (get) => versions.map((v, j) => ({ name: v, cls: cls[j % 3], points: windows.filter((w) => w.version === v).map((w) => [new Date(w.end).getTime(), get(w)]) }));
        const p95 = (w) => w.latency.p95_ms;
        const samples = tele[i].samples.slice().reverse().map((s) =>
          h("tr", {}, td(when(s.time)), td(s.version), tdn(fmt(s.latency_ms)), td(s.request_id || "–"), td(sampleInputs(s)), td(topClass(s))),
        );
        return h(
          "section",
          { "data-model": m.name },
          h("h2", { text: `Telemetry: ${m.name} (${windows.length} windows held by the server)` }),
          h(
            "div",
            { class: "charts" },
            lineChart("Requests per window", ser((w) => w.requests)),
            lineChart("Error rate", ser((w) => (w.requests ? (w.errors + w.non_finite) / w.requests : null))),
            lineChart("p95 latency (ms)", ser(p95)),
            lineChart("Mean confidence", ser((w) => (w.classification ? w.classification.mean_confidence : null))),
            lineChart("Prediction PSI vs baseline", ser((w) => (w.classification ? w.classification.prediction_psi_baseline : null))),
          ),
          h("h2", { text: `Latest sampled requests: ${m.name}` }),
          table(["time", "version", "latency ms num", "request", "inputs", "top-1"], samples, { class: "samples" }),
        );
      });
      body.replaceChildren(
        h("h1", {}, "Device ", h("span", { class: "mono", text: d.id })),
        info,
        h("h2", { text: "Models" }),
        table(["model", "active", "previous", "state", "compute", "security version num", "bundle"], models, { id: "device-models" }),
        ...sections,
        h("h2", { text: "Recent events" }),
        table(["time", "kind", "model", "detail", "rollout"], events, { id: "device-events" }),
      );
    },
  };
}

// ---- Bundles ----

async function bundlesPage(root) {
  root.append(h("h1", { text: "Bundles" }));
  const list = h("div");
  root.append(list);
  if (canAct()) {
    const file = h("input", { type: "file", id: "upload-file", accept: ".mfb" });
    const form = h("form", { class: "toolbar", id: "upload-form" }, h("label", { for: "upload-file", text: "Upload a signed bundle:" }), file, h("button", { type: "submit", text: "Upload" }));
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      if (!file.files.length) return flash(form, false, "choose a .mfb file first");
      try {
        const b = await api.postBytes("/api/v1/bundles", await file.files[0].arrayBuffer());
        flash(form, true, `uploaded ${b.name} ${b.version}`);
        await current.refresh();
      } catch (err) {
        flash(form, false, err.message);
      }
    });
    root.append(form);
  }
  // A bundle's recorded quality: accuracy on the labels (classifiers) or the ROC AUC of the
  // reconstruction error on anomaly labels (autoencoders), with the float model's beside a
  // quantized bundle's.
  function qualityCell(b) {
    const quantized = b.quantization && b.quantization !== "none";
    if (b.accuracy != null) {
      return h("td", { class: "num", "data-accuracy": b.accuracy }, pct(b.accuracy),
        quantized && b.float_accuracy != null ? ` (float ${pct(b.float_accuracy)})` : "");
    }
    if (b.auc != null) {
      return h("td", { class: "num", "data-auc": b.auc }, `AUC ${b.auc.toFixed(4)}`,
        quantized && b.float_auc != null ? ` (float ${b.float_auc.toFixed(4)})` : "");
    }
    return h("td", { class: "num" }, "–");
  }
  return {
    async refresh() {
      const { bundles } = await api.get("/api/v1/bundles");
      const rows = bundles.map((b) =>
        h(
          "tr",
          { "data-bundle": b.id },
          td(b.name),
          td(b.version),
          tdn(b.security_version),
          h("td", { class: "num", "data-size": b.size, text: bytes(b.size) }),
          td(b.quantization || "–"),
          qualityCell(b),
          td(b.task ? b.task.kind + (b.task.classes ? ` (${b.task.classes} classes)` : "") : "–"),
          td(when(b.uploaded_at), " by ", b.uploaded_by),
          td(h("span", { class: "mono", text: b.id.slice(0, 16) + "…", title: b.id })),
        ),
      );
      list.replaceChildren(
        h("p", {}, figure("bundles-count", bundles.length), " bundles, newest upload first"),
        table(["name", "version", "security version num", "size num", "quantization", "accuracy / AUC num", "task", "uploaded", "id"], rows, { id: "bundles" }),
      );
    },
  };
}

// ---- start ----

window.addEventListener("hashchange", () => route());
document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const t = $("token").value.trim();
    $("token").value = "";
    signIn(t);
  });
  $("signout").addEventListener("click", () => {
    api.setToken(null);
    showSignin("Signed out.");
  });
  if (api.token()) signIn(api.token());
  else showSignin();
});
