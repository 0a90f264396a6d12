// The operator page: reads /admin/stats every 2 s with the admin token and draws it.
// Every value from the server goes into the page as text (textContent), never as HTML:
// ban evidence carries paths that clients chose.
"use strict";

(() => {
  const KEY = "gateway-admin-token";
  const PERIOD_MS = 2000;
  const $ = (id) => document.getElementById(id);
  let timer = null;
  // evidence shown or folded by the operator, by banned address: kept across redraws
  const unfolded = new Map();
  const UNFOLD_UP_TO = 3; // with this many bans or fewer, evidence is shown unasked

  function takeTokenFromFragment() {
    const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
    if (m) {
      // a link with bad percent-encoding (a token cut short) must not stop the page
      let token = null;
      try { token = decodeURIComponent(m[1]); } catch (e) { token = null; }
      if (token) sessionStorage.setItem(KEY, token);
      history.replaceState(null, "", location.pathname + location.search);
    }
  }

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function row(cells) {
    const tr = document.createElement("tr");
    for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
    return tr;
  }

  function num(value, digits) {
    const td = el("td", value === null || value === undefined ? "–" : Number(value).toFixed(digits), "num");
    return td;
  }

  function ago(ts, now) {
    if (!ts) return "–";
    const s = Math.max(0, Math.round(now - ts));
    if (s < 90) return s + " s ago";
    if (s < 5400) return Math.round(s / 60) + " min ago";
    return Math.round(s / 3600) + " h ago";
  }

  function duration(s) {
    s = Math.max(0, Math.round(s));
    if (s < 90) return s + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    return (s / 3600).toFixed(1) + " h";
  }

  // an evidence record's status: none when the request was scored on its path, before
  // it was answered
  function answered(status) {
    if (status !== null && status !== undefined) return el("td", String(status), "num");
    const td = el("td", "not yet", "num muted");
    td.title = "scored on its path, before it was answered";
    return td;
  }

  function statusCell(status) {
    const td = el("td");
    const dot = el("span", null, "dot");
    dot.dataset.status = status;
    td.append(dot, document.createTextNode(status));
    return td;
  }

  function fill(tableId, rows, emptyId) {
    const body = $(tableId).tBodies[0];
    body.replaceChildren(...rows);
    if (emptyId) {
      $(emptyId).hidden = rows.length > 0;
      $(tableId).hidden = rows.length === 0;
    }
  }

  function spark(history) {
    const NS = "http://www.w3.org/2000/svg";
    const w = 240, h = 36;
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("class", "spark");
    // drawn in a 240 x 36 box, stretched to the cell's width (the strokes keep their width)
    svg.setAttribute("width", "100%");
    svg.setAttribute("height", h);
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    const base = document.createElementNS(NS, "line");
    base.setAttribute("class", "base");
    base.setAttribute("x1", 0); base.setAttribute("x2", w);
    base.setAttribute("y1", h - 0.5); base.setAttribute("y2", h - 0.5);
    svg.appendChild(base);
    const n = history.length;
    if (n < 2) return svg;
    const line = (values, cls) => {
      const max = Math.max(...values.map((v) => v || 0), 1e-9);
      const pts = values.map((v, i) => `${(i * (w - 2)) / (n - 1) + 1},${h - 2 - ((v || 0) / max) * (h - 5)}`);
      const p = document.createElementNS(NS, "polyline");
      p.setAttribute("class", cls);
      p.setAttribute("points", pts.join(" "));
      svg.appendChild(p);
    };
    line(history.map((s) => s.rps), "rate");
    line(history.map((s) => s.p99_ms), "p99");
    const title = document.createElementNS(NS, "title");
    const peak = Math.max(...history.map((s) => s.rps));
    title.textContent = `peak ${peak.toFixed(1)} req/s over 5 min`;
    svg.appendChild(title);
    return svg;
  }

  function render(d) {
    const now = d.generated_at;
    const pod = $("pod-status");
    pod.textContent = d.status;
    pod.dataset.status = d.status;
    $("draining").hidden = !d.draining;
    $("meta").textContent = `v${d.version} · config #${d.config.generation}`;
    $("updated").textContent = "updated " + new Date(now * 1000).toLocaleTimeString();

    fill("components", d.components.map((c) => row([
      el("td", c.name), statusCell(c.status), el("td", c.critical ? "yes" : "no"),
      el("td", ago(c.since, now)), el("td", c.message || "", "msg"),
    ])));

    fill("upstreams", d.upstreams.map((u) => {
      const badge = el("span", u.breaker, "badge");
      badge.dataset.status = u.breaker;
      const bar = el("div", null, "bar");
      const fillBar = el("span");
      const share = u.limit > 0 ? Math.min(1, u.inflight / u.limit) : 0;
      fillBar.style.width = (share * 100).toFixed(1) + "%";
      if (share >= 0.9) fillBar.classList.add("hot");
      bar.appendChild(fillBar);
      const tdBadge = el("td"); tdBadge.appendChild(badge);
      const tdBar = el("td"); tdBar.appendChild(bar);
      const limit = el("td", u.limit + (u.mode === "adaptive" ? " (adaptive)" : ""), "num");
      return row([el("td", u.name), tdBadge, num(u.inflight, 0), limit, tdBar]);
    }));

    fill("routes", d.routes.map((r) => {
      const errors = el("td", (r.error_ratio * 100).toFixed(1) + " %", "num");
      if (r.error_ratio >= 0.05) errors.classList.add("bad");
      const chart = el("td"); chart.appendChild(spark(r.history));
      return row([el("td", r.name), num(r.rps, 1), errors, num(r.p50_ms, 1), num(r.p99_ms, 1), chart]);
    }));

    fill("limited", d.limited.map((k) => row([el("td", k.key, "key"), num(k.count, 0)])), "limited-empty");

    const banRows = [];
    const evidence = d.bans.filter((b) => b.evidence && b.evidence.length);
    for (const b of d.bans) {
      const ev = b.evidence || [];
      const last = ev.length ? ev[ev.length - 1] : null;
      const lastCell = el("td", last ? `${last.method || ""} ${last.path || "(no path)"}`.trim() : "–", "key");
      banRows.push(row([el("td", b.ip, "key"), el("td", b.reason), num(b.score, 0),
        el("td", duration(b.expires_in_s)), lastCell]));
      if (ev.length) {
        const details = el("details", null, "evidence");
        const auto = evidence.length <= UNFOLD_UP_TO;
        const wanted = unfolded.get(b.ip);
        details.open = wanted === undefined ? auto : wanted;
        // setting .open fires "toggle" too: only the operator's own choice is kept
        details.addEventListener("toggle", () => {
          if (details.open === auto) unfolded.delete(b.ip);
          else unfolded.set(b.ip, details.open);
        });
        details.appendChild(el("summary", `why: the last ${ev.length} scored events`));
        const t = el("table");
        t.appendChild(row(["when", "event", "request", "status", "request id"].map((h) => el("th", h))));
        for (const e of ev.slice().reverse()) { // the newest first
          t.appendChild(row([el("td", ago(e.at, now)), el("td", e.reason),
            el("td", `${e.method || ""} ${e.path || "(no path)"}`.trim(), "key"),
            answered(e.status),
            el("td", e.request_id || "–", "key rid")]));
        }
        details.appendChild(t);
        const td = el("td"); td.colSpan = 5; td.appendChild(details);
        banRows.push(row([td]));
      }
    }
    fill("bans", banRows, "bans-empty");
    $("bans-count").textContent = d.bans_total > d.bans.length
      ? `the newest ${d.bans.length} of ${d.bans_total}` : (d.bans_total ? `${d.bans_total} in force` : "");

    fill("allow", (d.allow || []).map((a) => row([el("td", a.ip, "key"), el("td", a.reason, "msg"),
      el("td", a.by, "key"), el("td", duration(a.expires_in_s))])), "allow-empty");

    const c = d.config;
    const items = [
      ["source", c.source || "built-in defaults"],
      ["generation", c.generation],
      ["digest", c.digest || "–"],
      ["last reload", c.last_reload ? `${c.last_reload.result} ${ago(c.last_reload.at, now)}` +
        (c.last_reload.error ? ` — ${c.last_reload.error}` : "") : "none since start"],
    ];
    $("config").replaceChildren(...items.flatMap(([k, v]) => [el("dt", k), el("dd", v)]));
  }

  function showError(text) {
    $("error").textContent = text;
    $("error").hidden = !text;
  }

  function signedOut(message) {
    sessionStorage.removeItem(KEY);
    $("dashboard").hidden = true;
    $("forget").hidden = true;
    $("login").hidden = false;
    showError(message);
    if (timer) clearTimeout(timer);
    timer = null;
  }

  let round = 0; // a newer poll() makes an older one's answer and timer moot

  async function poll() {
    if (timer) clearTimeout(timer);
    timer = null;
    const mine = ++round;
    const token = sessionStorage.getItem(KEY);
    if (!token) return signedOut("");
    try {
      const resp = await fetch("/admin/stats", {
        headers: { Authorization: "Bearer " + token }, cache: "no-store", credentials: "omit",
      });
      if (mine !== round) return;
      if (resp.status === 401) return signedOut("That token was refused.");
      if (resp.status === 403) return signedOut("This gateway has no admin token configured (admin.token_env): the admin API is off.");
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      const data = await resp.json();
      if (mine !== round) return;
      document.body.classList.remove("stale");
      showError("");
      $("login").hidden = true;
      $("forget").hidden = false;
      $("dashboard").hidden = false;
      render(data);
    } catch (err) {
      if (mine !== round) return;
      document.body.classList.add("stale");
      showError(`Cannot read /admin/stats (${err.message}); showing the last figures.`);
    }
    if (mine === round) timer = setTimeout(poll, PERIOD_MS);
  }

  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const value = $("token").value.trim();
    if (!value) return;
    sessionStorage.setItem(KEY, value);
    $("token").value = "";
    poll();
  });
  $("forget").addEventListener("click", () => signedOut(""));
  window.addEventListener("hashchange", () => { takeTokenFromFragment(); poll(); });

  takeTokenFromFragment();
  poll();
})();
