(() => {
  "use strict";
  const POLL_MS = 2000, TIMEOUT_MS = 5000, MAX_ROWS = 100;
  const STATUSES = ["ready", "cooling", "blocked", "disabled"];
  const state = { data: null, offset: 0, okAt: null };

  // -- small helpers: every value from the snapshot is untrusted and may be missing --------
  const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
  const str = (v) => (v === null || v === undefined ? "" : String(v));
  const arr = (v) => (Array.isArray(v) ? v : []);
  const obj = (v) => (v !== null && typeof v === "object" && !Array.isArray(v) ? v : {});
  const $ = (id) => document.getElementById(id);
  const serverNow = () => Date.now() / 1000 + state.offset;

  function el(tag, cls, text, attrs) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== undefined && v !== null) e.setAttribute(k, String(v));
    }
    return e;
  }
  function add(parent, ...children) {
    for (const c of children) if (c) parent.appendChild(c);
    return parent;
  }

  // -- formatting ------------------------------------------------------------------------
  const intFmt = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
  const fmtInt = (n) => (num(n) === null ? "—" : intFmt.format(n));
  function fmtCompact(n) {
    if (num(n) === null) return "—";
    const a = Math.abs(n);
    if (a < 10000) return intFmt.format(n);
    if (a < 1e6) return (n / 1e3).toFixed(1) + "k";
    if (a < 1e9) return (n / 1e6).toFixed(1) + "M";
    return (n / 1e9).toFixed(1) + "B";
  }
  function fmtSpan(s) {
    s = Math.max(0, Math.ceil(s));
    const p2 = (x) => String(x).padStart(2, "0");
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + p2(s % 60) + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h " + p2(Math.floor((s % 3600) / 60)) + "m";
    return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
  }
  const fmtCountdown = (until) => {
    const left = until - serverNow();
    return left > 0.5 ? "resets in " + fmtSpan(left) : "resets now";
  };
  const fmtAgo = (ts) => {
    const d = serverNow() - ts;
    return d < 2 ? "just now" : fmtSpan(d) + " ago";
  };
  function fmtClock(ts) {
    const d = new Date(ts * 1000), p2 = (x) => String(x).padStart(2, "0");
    return p2(d.getHours()) + ":" + p2(d.getMinutes()) + ":" + p2(d.getSeconds());
  }
  const fmtMs = (ms) => (ms < 1000 ? Math.round(ms) + " ms" : (ms / 1000).toFixed(2) + " s");

  // Live elements carry their timestamp; the ticker rewrites their text every second.
  function countdown(until, cls) {
    return el("span", "countdown " + (cls || ""), fmtCountdown(until), { "data-until": until });
  }
  function ago(ts) {
    return el("span", "ago", fmtAgo(ts), { "data-ts": ts, title: new Date(ts * 1000).toString() });
  }
  function tick() {
    for (const e of document.querySelectorAll("[data-until]")) {
      e.textContent = fmtCountdown(Number(e.getAttribute("data-until")));
    }
    for (const e of document.querySelectorAll("[data-ts]")) {
      e.textContent = fmtAgo(Number(e.getAttribute("data-ts")));
    }
    if (state.okAt !== null) {
      $("updated").textContent = "updated " + fmtSpan((Date.now() - state.okAt) / 1000) + " ago";
    }
  }

  // -- header and totals -----------------------------------------------------------------
  function renderHeader(d) {
    $("version").textContent = d.version ? "v" + str(d.version) : "";
    const up = num(d.uptime_s);
    $("uptime").textContent = up === null ? "" : "up " + fmtSpan(up);
    const c = obj(d.cluster), alive = num(c.alive);
    const modes = {
      shared: "cluster: shared through Redis" + (alive === null ? "" : " · " + alive + " alive"),
      degraded: "cluster: Redis unreachable · local share of the limits",
      refusing: "cluster: Redis unreachable · refusing requests",
    };
    const mode = str(c.mode);
    $("cluster").textContent = Object.hasOwn(modes, mode) ? modes[mode] : "";
    const problem = str(d.config_error || d.error);
    $("config-error").textContent = problem
      ? "The configuration file could not be applied: " + problem +
        (d.config_error ? " (the last good configuration is in use)" : "")
      : "";
    $("config-error").hidden = !problem;
    const kc = keyCounts(d);
    document.title = "kmi-rotor" + (kc.all ? " · " + kc.ready + "/" + kc.all + " ready" : "");
  }
  function keyCounts(d) {
    let ready = 0, all = 0;
    for (const p of arr(d.pools)) {
      for (const k of arr(obj(p).keys)) { all++; if (obj(k).status === "ready") ready++; }
    }
    return { ready, all };
  }
  function tile(name, label, value, level) {
    const t = el("div", "tile " + (level || ""), null, { "data-total": name });
    return add(t, el("div", "tile-label", label), el("div", "tile-value", value));
  }
  function renderTotals(d) {
    const t = obj(d.totals), kc = keyCounts(d), box = $("totals");
    const lvl = (v, bad) => (num(v) ? bad : "");
    box.replaceChildren(
      tile("keys_ready", "Keys ready", kc.all ? kc.ready + " / " + kc.all : "—",
        kc.all && kc.ready === 0 ? "bad" : ""),
      tile("requests", "Requests", fmtInt(t.requests)),
      tile("tokens", "Tokens", fmtCompact(t.tokens)),
      tile("inflight", "In flight", fmtInt(t.inflight)),
      tile("errors", "Errors", fmtInt(t.errors), lvl(t.errors, "bad")),
      tile("upstream_429", "Upstream 429", fmtInt(t.upstream_429), lvl(t.upstream_429, "warn")),
      tile("local_429", "Local 429", fmtInt(t.local_429), lvl(t.local_429, "warn")),
      tile("retries", "Retries", fmtInt(t.retries)),
    );
  }

  // -- pools and keys --------------------------------------------------------------------
  const KEY_COLUMNS = [["Key", "col-key"], ["Status", "col-status"], ["Quota", "col-quota"],
    ["Requests", "num"], ["Errors", "num"], ["Rate limited", "num"], ["Tokens", "num"], ["Last", "col-last"]];

  function renderPools(d) {
    const box = $("pools"), pools = arr(d.pools);
    if (!pools.length) {
      box.replaceChildren(add(el("section", "panel"), el("p", "empty", "No pools configured.")));
      return;
    }
    box.replaceChildren(...pools.map((p) => poolPanel(obj(p))));
  }
  function poolPanel(p) {
    const keys = arr(p.keys).map(obj);
    const ready = keys.filter((k) => k.status === "ready").length;
    const sec = el("section", "panel pool", null, { "data-pool": str(p.name) });
    const head = add(el("div", "panel-head"), el("h2", null, str(p.name) || "(unnamed pool)"));
    if (p.provider) add(head, el("span", "chip", str(p.provider), { title: "provider" }));
    if (p.strategy) add(head, el("span", "chip", str(p.strategy), { title: "strategy" }));
    add(head, el("span", "aside pool-summary", ready + " of " + keys.length + " ready"));
    add(sec, head);
    if (!keys.length) return add(sec, el("p", "empty", "No keys in this pool."));
    const table = el("table", "keys");
    const hr = el("tr");
    for (const [label, cls] of KEY_COLUMNS) add(hr, el("th", cls, label));
    add(table, add(el("thead"), hr), add(el("tbody"), ...keys.flatMap(keyRows)));
    return add(sec, add(el("div", "table-wrap"), table));
  }
  // A key of a provider that limits per model: its own row, then one row per scope it holds
  // anything for (cooldown, windows). A key-wide pool shows just the key's row.
  function keyRows(k) {
    return [keyRow(k), ...arr(k.scopes).map(obj).map((s) => scopeRow(k, s))];
  }
  function scopeRow(k, s) {
    const status = str(s.status) || "unknown";
    const tr = el("tr", "scope-row", null, {
      "data-key": str(k.label), "data-scope": str(s.scope), "data-status": status });
    add(tr, add(el("td", "scope-cell"), el("div", "scope-name mono", str(s.scope))),
      statusCell(s, status), quotaCell(s));
    for (let i = 3; i < KEY_COLUMNS.length; i++) add(tr, el("td"));
    return tr;
  }
  function keyRow(k) {
    const status = str(k.status) || "unknown";
    const tr = el("tr", "key-row", null, { "data-key": str(k.label), "data-status": status });
    return add(tr, keyCell(k), statusCell(k, status), quotaCell(k),
      countCell(k.requests), countCell(k.errors, "count-bad", errorsSub(k)), limitedCell(k),
      add(el("td", "num"), el("span", null, fmtCompact(k.tokens), { title: fmtInt(k.tokens) })),
      lastCell(k));
  }
  function keyCell(k) {
    const td = add(el("td", "key-cell"), el("div", "key-label", str(k.label) || "(no label)"));
    if (k.masked) add(td, el("div", "key-masked mono", str(k.masked)));
    if (k.fingerprint) add(td, el("div", "fp mono", str(k.fingerprint)));
    const n = num(k.inflight);
    if (n) add(td, el("div", "inflight", n + " in flight"));
    return td;
  }
  function statusCell(k, status) {
    const cls = STATUSES.includes(status) ? "status-" + status : "status-unknown";
    const td = add(el("td", "status-cell"), el("span", "badge " + cls, status, { "data-status": status }));
    const until = num(k.until);
    if (until !== null && status !== "ready") add(td, countdown(until, "status-until"));
    if (k.reason) add(td, el("div", "reason", str(k.reason)));
    return td;
  }
  function countCell(v, hotCls, subs) {
    const td = el("td", "num");
    add(td, el("span", num(v) ? hotCls : null, fmtInt(v)));
    for (const sub of subs || []) add(td, el("div", "sub", sub));
    return td;
  }
  function limitedCell(k) {
    // upstream and local 429s side by side: the first costs the provider's goodwill, the
    // second only means the local limiter held a request back
    const td = el("td", "num limited-cell");
    add(td, add(el("div", "l-up"), el("span", num(k.upstream_429) ? "count-warn" : null,
      fmtInt(k.upstream_429)), el("span", "unit", " upstream")));
    add(td, add(el("div", "sub l-local"), el("span", null, fmtInt(k.local_429)), el("span", "unit", " local")));
    return td;
  }
  function errorsSub(k) {
    const parts = [];
    const score = num(k.error_score);
    if (score !== null) parts.push("score " + score.toFixed(2));
    if (num(k.retries)) parts.push(fmtInt(k.retries) + " retried");
    return parts;
  }
  function lastCell(k) {
    const td = el("td", "last-cell");
    if (num(k.last_status) !== null) add(td, statusCode(k.last_status));
    const used = num(k.last_used);
    add(td, add(el("div", "sub"), used === null ? el("span", "none", "never used") : ago(used)));
    return td;
  }

  // -- quota bars ------------------------------------------------------------------------
  function quotaCell(k) {
    const td = el("td", "quota-cell"), quotas = arr(k.quota).map(obj);
    if (!quotas.length) return add(td, el("span", "none", "no quota data"));
    return add(td, ...quotas.map(quotaBar));
  }
  function fillLevel(frac) {
    if (frac === null) return "level-unknown";
    if (frac <= 0.1) return "level-empty";
    return frac <= 0.35 ? "level-low" : "level-ok";
  }
  function quotaBar(q) {
    const limit = num(q.limit), rem = num(q.remaining), name = str(q.name) || "quota";
    const frac = limit && limit > 0 && rem !== null ? Math.min(1, Math.max(0, rem / limit)) : null;
    const pct = frac === null ? 0 : Math.round(frac * 1000) / 10;
    const box = el("div", "quota", null, { "data-quota": name, "data-source": str(q.source) || null });
    const bar = el("div", "quota-bar", null, {
      role: "meter", "aria-label": name, "aria-valuemin": 0, "aria-valuemax": limit,
      "aria-valuenow": rem, "data-remaining": rem, "data-limit": limit, "data-pct": pct });
    const fill = el("div", "quota-fill " + fillLevel(frac));
    fill.style.width = pct + "%";
    const amount = (rem === null ? "?" : fmtInt(rem)) + (limit === null ? "" : "/" + fmtInt(limit));
    const text = add(el("div", "quota-text"), el("span", "quota-amount", amount), el("span", null, " " + name));
    const resets = num(q.resets_at);
    if (resets !== null) add(text, el("span", null, " · "), countdown(resets, "quota-reset"));
    const line = add(el("div", "quota-line"), text);
    if (q.source) add(line, el("span", "quota-source", str(q.source), { title: "quota source" }));
    return add(box, add(bar, fill), line);
  }

  // -- timeline --------------------------------------------------------------------------
  function outcomeClass(r) {
    const s = num(r.status), o = str(r.outcome).toLowerCase();
    if (s === 429 || o.includes("429") || o.includes("limit")) return "limited";
    if (o === "ok" && (s === null || s < 400)) return "ok";
    if (!o && s !== null && s < 400) return "ok";
    return "fail";
  }
  function statusCode(s) {
    const n = num(s);
    if (n === null) return el("span", "code cerr", "—");
    const cls = n === 429 ? "c429" : "c" + String(n)[0];
    return el("span", "code " + cls, String(n));
  }
  function renderTimeline(d) {
    const rows = arr(d.recent).map(obj)
      .sort((a, b) => (num(b.ts) ?? -Infinity) - (num(a.ts) ?? -Infinity)).slice(0, MAX_ROWS);
    const maxMs = Math.max(1, ...rows.map((r) => num(r.total_ms) || 0));
    $("timeline-body").replaceChildren(...rows.map((r) => timelineRow(r, maxMs)));
    $("timeline-empty").hidden = rows.length > 0;
    $("timeline").hidden = rows.length === 0;
    const fails = rows.filter((r) => outcomeClass(r) !== "ok").length;
    $("timeline-count").textContent = rows.length
      ? rows.length + " shown" + (fails ? " · " + fails + " not ok" : "") : "";
    renderStrip(rows.slice().reverse(), maxMs);
  }
  function timelineRow(r, maxMs) {
    const oc = outcomeClass(r), ts = num(r.ts), ms = num(r.total_ms), att = num(r.attempt);
    const tr = el("tr", "tl-row " + oc, null, {
      "data-key": str(r.key), "data-outcome": str(r.outcome), "data-status": num(r.status) });
    const time = el("td", "mono", ts === null ? "—" : fmtClock(ts), { title: ts === null ? null : new Date(ts * 1000).toString() });
    const key = add(el("td"), el("span", "key-label", str(r.key) || "—"));
    if (r.pool) add(key, el("span", "faint", " · " + str(r.pool)));
    const req = add(el("td", "path", null, { title: str(r.path) }),
      el("span", "method", str(r.method)), el("span", "mono", str(r.path)));
    if (r.stream === true) add(req, el("span", "tag", "stream"));
    if (r.scope) add(req, el("span", "tag", str(r.scope)));
    const dur = add(el("td", "num"), durCell(ms, maxMs));
    return add(tr, time, key, req, add(el("td"), statusCode(r.status)),
      el("td", "outcome", str(r.outcome) || "—"),
      add(el("td", "num"), el("span", att && att > 1 ? "count-warn" : null, att === null ? "—" : "#" + att)),
      el("td", "num", fmtInt(r.tokens_in) + " / " + fmtInt(r.tokens_out)), dur);
  }
  function durCell(ms, maxMs) {
    const box = el("div", "dur");
    if (ms === null) return add(box, el("span", "none", "—"));
    const bar = el("div", "dur-bar"), fill = el("div", "dur-fill");
    fill.style.width = Math.max(2, Math.round((ms / maxMs) * 100)) + "%";
    return add(box, add(bar, fill), el("span", null, fmtMs(ms)));
  }
  function renderStrip(rows, maxMs) {
    $("strip").replaceChildren(...rows.map((r) => {
      const ms = num(r.total_ms), oc = outcomeClass(r);
      const t = el("div", "tick o-" + oc, null, { title: [num(r.ts) === null ? "" : fmtClock(r.ts),
        str(r.key), num(r.status) ?? "", str(r.outcome), ms === null ? "" : fmtMs(ms)].join("  ") });
      // square root keeps short requests visible next to one slow stream
      t.style.height = Math.max(10, Math.round(Math.sqrt((ms || 0) / maxMs) * 100)) + "%";
      return t;
    }));
  }

  // -- polling ---------------------------------------------------------------------------
  function setConn(live, why) {
    const c = $("conn");
    c.setAttribute("data-state", live ? "live" : "disconnected");
    $("conn-text").textContent = live ? "live" : "disconnected" + (why ? " (" + why + ")" : "");
    document.body.setAttribute("data-conn", live ? "live" : "disconnected");
  }
  function render(d) {
    for (const part of [renderHeader, renderTotals, renderPools, renderTimeline]) {
      try { part(d); } catch (e) { console.error("status page:", e); }
    }
    tick();
  }
  async function fetchStatus() {
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), TIMEOUT_MS);
    try {
      const r = await fetch("api/status", {
        cache: "no-store", signal: ctrl.signal, headers: { Accept: "application/json" } });
      if (!r.ok) throw new Error("HTTP " + r.status);
      const d = await r.json();
      if (d === null || typeof d !== "object" || Array.isArray(d)) throw new Error("bad data");
      return d;
    } finally {
      clearTimeout(timer);
    }
  }
  async function poll() {
    try {
      const d = await fetchStatus();
      const gen = num(d.generated_at);
      state.offset = gen === null ? 0 : gen - Date.now() / 1000;
      state.data = d;
      state.okAt = Date.now();
      setConn(true);
      render(d);
    } catch (e) {
      // keep showing the last data: a restarting proxy should not blank the page
      setConn(false, e && e.name === "AbortError" ? "timeout" : e && e.message);
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }
  setInterval(tick, 1000);
  poll();
})();
