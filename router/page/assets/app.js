// weft status page: polls the peer's JSON every 2 s and draws plain SVG. Every name comes
// from gossip, so text goes in through textContent only, never as markup.
"use strict";
(function () {
  const NS = "http://www.w3.org/2000/svg";
  const POLL_MS = 2000;
  const SMALL_MESH = 12; // up to this many peers every link is drawn; above, only the focus peer's
  const MAX_LABELS = 16; // beyond this many drawn links, figures are in tooltips and the table only
  const byName = (a, b) => a.localeCompare(b, undefined, { numeric: true });
  const state = { topo: null, sla: null, hist: [], ifaces: [], segs: null, status: null, focus: "", filter: "", sel: null, polls: 0 };

  const $ = (id) => document.getElementById(id);
  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function sv(tag, attrs, text) {
    const e = document.createElementNS(NS, tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function row(cells, attrs) {
    const tr = el("tr", attrs);
    for (const c of cells) {
      if (c instanceof Node) { const td = el("td"); td.appendChild(c); tr.appendChild(td); }
      else if (c && typeof c === "object") tr.appendChild(el("td", c.attrs, c.text));
      else tr.appendChild(el("td", {}, String(c)));
    }
    return tr;
  }
  const fmtMs = (v) => (v === undefined || v === null) ? "?" : (v < 10 ? v.toFixed(2) : v.toFixed(1)) + " ms";
  const fmtPct = (v) => (v * 100).toFixed(v > 0 && v < 0.01 ? 2 : 0) + "%";
  function fmtRate(bps) {
    const b = bps * 8;
    if (b >= 1e9) return (b / 1e9).toFixed(2) + " Gbit/s";
    if (b >= 1e6) return (b / 1e6).toFixed(2) + " Mbit/s";
    if (b >= 1e3) return (b / 1e3).toFixed(1) + " kbit/s";
    return b.toFixed(0) + " bit/s";
  }
  function ago(t) {
    const ts = Date.parse(t);
    if (!isFinite(ts) || ts < Date.UTC(2000, 0, 1)) return "—"; // Go's zero time: never set
    const s = Math.max(0, (Date.now() - ts) / 1000);
    if (s < 90) return s.toFixed(0) + " s ago";
    if (s < 5400) return (s / 60).toFixed(0) + " min ago";
    return (s / 3600).toFixed(1) + " h ago";
  }
  const matches = (name) => !state.filter || name.toLowerCase().includes(state.filter);

  async function getJSON(path) {
    const r = await fetch(path, { cache: "no-store" });
    if (!r.ok) throw new Error(path + ": " + r.status);
    return r.json();
  }

  async function refresh() {
    try {
      const [topo, sla, hist, ifaces, segs, status] = await Promise.all([
        getJSON("/api/topology"), getJSON("/api/sla"), getJSON("/api/history"), getJSON("/api/interfaces"),
        getJSON("/api/segments"), getJSON("/status").catch(() => null)]); // the peer's own tables are extra: the views work without them
      Object.assign(state, { topo, sla, hist, ifaces, segs, status });
      state.polls++;
      if (!state.focus) state.focus = topo.self;
      render();
      $("status").textContent = "as " + topo.self + " sees the mesh · " + topo.peers.length + " peers · updated " +
        new Date().toLocaleTimeString() + " · SLA " + topo.sla;
      $("status").dataset.polls = String(state.polls);
      $("status").dataset.updated = topo.generated;
    } catch (e) {
      $("status").textContent = "cannot reach the peer: " + e.message;
      $("status").dataset.error = e.message;
    }
  }

  function render() {
    const t = state.topo;
    $("self").textContent = t.self;
    $("self").dataset.self = t.self;
    document.title = "weft · " + t.self;
    renderControls(t);
    renderTopology(t);
    renderLinks(t);
    renderSegments();
    renderPerf();
    renderIfaces();
    renderSLA();
    renderPeer();
  }

  // renderPeer is what the page showed before it had pictures: this peer's networks and attachments.
  function renderPeer() {
    const st = state.status;
    if (!st) return;
    $("peer-info").textContent = "version " + st.version + " · up " + st.uptime;
    const nb = $("networks-table").tBodies[0];
    nb.textContent = "";
    for (const n of st.networks) {
      const blocks = (n.blocks || []).map((b) => b.cidr + " (" + b.used + "/" + b.free + ")").join(" ");
      nb.appendChild(row([n.name, n.subnet, n.bridge, n.gateway, blocks], { "data-network": n.name }));
    }
    const ab = $("attachments-table").tBodies[0];
    ab.textContent = "";
    for (const a of st.attachments) {
      ab.appendChild(row([a.name, a.address, a.network, a.container_id.slice(0, 12), a.ifname, a.host_ifname],
        { "data-container": a.container_id, "data-ifname": a.ifname }));
    }
  }

  function renderControls(t) {
    const sel = $("focus");
    const names = t.peers.map((p) => p.name);
    if (sel.dataset.names !== names.join(",")) {
      sel.textContent = "";
      for (const n of names) sel.appendChild(el("option", { value: n }, n + (n === t.self ? " (this peer)" : "")));
      sel.dataset.names = names.join(",");
    }
    if (!names.includes(state.focus)) state.focus = t.self;
    sel.value = state.focus;
    const groups = {};
    for (const p of t.peers) groups[p.state] = (groups[p.state] || 0) + 1;
    const g = $("groups");
    g.textContent = "";
    for (const s of Object.keys(groups).sort()) g.appendChild(el("span", { "data-group": s }, s + ": " + groups[s]));
  }

  // layout places peers deterministically: up to 8 on a circle (the focus at the top),
  // beyond that the focus in the middle and the others on a circle, grouped by state then
  // name, so a 100-peer mesh is a wheel of the focus peer's links, not a hairball.
  function layout(peers, focus) {
    const W = 800, H = 560, cx = W / 2, cy = H / 2, R = Math.min(W, H) / 2 - 60;
    const order = { alive: 0, suspect: 1, dead: 2, left: 3 };
    const others = peers.filter((p) => p.name !== focus)
      .sort((a, b) => (order[a.state] ?? 9) - (order[b.state] ?? 9) || byName(a.name, b.name));
    const pos = {};
    if (peers.length <= 8) {
      const ring = [peers.find((p) => p.name === focus), ...others].filter(Boolean);
      ring.forEach((p, i) => {
        const a = -Math.PI / 2 + 2 * Math.PI * i / ring.length;
        pos[p.name] = { x: cx + R * Math.cos(a), y: cy + R * Math.sin(a) };
      });
    } else {
      pos[focus] = { x: cx, y: cy };
      others.forEach((p, i) => {
        const a = -Math.PI / 2 + 2 * Math.PI * i / others.length;
        pos[p.name] = { x: cx + R * Math.cos(a), y: cy + R * Math.sin(a) };
      });
    }
    return pos;
  }

  function linkLabel(l) {
    const mode = (l.mode || "?") + (l.mode_inferred ? "?" : "");
    if (l.state === "down") return mode + " · down";
    if (l.estimated) return mode + " · ~" + fmtMs(l.rtt_ms) + " (est.)";
    return mode + " · " + fmtMs(l.rtt_ms) + " · " + fmtPct(l.loss) + (l.slow ? " · slow: " + segName(l.slow) : "");
  }
  const linkBad = (l) => l.state === "down" || !l.sla_ok;

  function renderTopology(t) {
    const svg = $("topo");
    svg.textContent = "";
    const defs = sv("defs");
    const m = sv("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "9", refY: "5", markerWidth: "6", markerHeight: "6", orient: "auto" });
    m.appendChild(sv("path", { d: "M0,0 L10,5 L0,10 z", fill: "#e69500" }));
    defs.appendChild(m);
    svg.appendChild(defs);
    const pos = layout(t.peers, state.focus);
    const showAll = $("all-links").checked || t.peers.length <= SMALL_MESH;
    const visible = (n) => matches(n) || n === state.focus;
    const gl = sv("g", { id: "links" }), gr = sv("g", { id: "relays" }), gp = sv("g", { id: "peers" });
    const drawn = t.links.filter((l) => pos[l.a] && pos[l.b] && visible(l.a) && visible(l.b) &&
      (showAll || l.a === state.focus || l.b === state.focus));
    const labels = drawn.length <= MAX_LABELS;
    for (const l of drawn) {
      const a = pos[l.a], b = pos[l.b];
      const cls = ["link"];
      if (linkBad(l)) cls.push("bad");
      if (l.state === "relayed") cls.push("relayed");
      if (l.mode_inferred) cls.push("inferred");
      if (l.estimated) cls.push("estimated");
      if (l.slow) cls.push("slow");
      const attrs = { id: "link-" + l.id, class: cls.join(" "), x1: a.x, y1: a.y, x2: b.x, y2: b.y,
        "data-link": l.id, "data-mode": l.mode, "data-state": l.state, "data-sla": linkBad(l) ? "violated" : "ok", "data-slow": l.slow || "",
        "data-rtt-ms": String(l.rtt_ms), "data-loss": String(l.loss) };
      const line = sv("line", attrs);
      line.appendChild(sv("title", {}, l.id + ": " + linkLabel(l) + (l.why ? " — " + l.why : "")));
      gl.appendChild(line);
      if (labels) {
        // beside the line on its upper side; on a steep line the text runs away from it
        let nx = a.y - b.y, ny = b.x - a.x;
        const len = Math.hypot(nx, ny) || 1;
        if (ny > 0 || (ny === 0 && nx > 0)) { nx = -nx; ny = -ny; }
        const anchor = Math.abs(nx) > Math.abs(ny) * 0.5 ? (nx < 0 ? "end" : "start") : "middle";
        gl.appendChild(sv("text", { class: "link-label", id: "label-" + l.id, x: (a.x + b.x) / 2 + 8 * nx / len,
          y: (a.y + b.y) / 2 + 8 * ny / len, "text-anchor": anchor }, linkLabel(l)));
      }
    }
    if (state.focus === t.self) {
      for (const r of t.relays) {
        if (!r.path.every((n) => pos[n] && visible(n))) continue;
        // drawn as a curve through the relay, bulging on the side opposite the link labels
        // so that it hides neither the links it follows nor their figures
        let d = "";
        for (let i = 0; i + 1 < r.path.length; i++) {
          const p = pos[r.path[i]], q = pos[r.path[i + 1]];
          let dx = p.y - q.y, dy = q.x - p.x;
          if (dy < 0 || (dy === 0 && dx < 0)) { dx = -dx; dy = -dy; }
          const mx = (p.x + q.x) / 2, my = (p.y + q.y) / 2, len = Math.hypot(dx, dy) || 1;
          d += (i === 0 ? "M" + p.x + "," + p.y : "") + " Q" + (mx + 28 * dx / len) + "," + (my + 28 * dy / len) + " " + q.x + "," + q.y;
        }
        const path = sv("path", { id: "relay-" + r.from + "-" + r.to, class: "relay" + (r.sla_ok ? "" : " bad"), d: d,
          "data-from": r.from, "data-to": r.to, "data-via": r.via, "data-path": r.path.join(","), "data-mode": "relay" });
        path.appendChild(sv("title", {}, "relayed: " + r.path.join(" → ")));
        gr.appendChild(path);
      }
    }
    const many = t.peers.length > 40;
    for (const p of t.peers) {
      const q = pos[p.name];
      if (!q || !visible(p.name)) continue;
      const cls = ["peer"];
      if (p.self) cls.push("self");
      if (p.name === state.focus) cls.push("focus");
      const g = sv("g", { id: "peer-" + p.name, class: cls.join(" "), "data-peer": p.name, "data-state": p.state,
        transform: "translate(" + q.x + "," + q.y + ")" });
      g.appendChild(sv("title", {}, p.name + " (" + p.state + ") " + p.address));
      g.appendChild(sv("circle", { r: many ? 6 : 16 }));
      if (!many || p.name === state.focus || state.filter) g.appendChild(sv("text", { y: many ? -9 : 30 }, p.name));
      g.addEventListener("click", () => { state.focus = p.name; writeHash(); render(); });
      gp.appendChild(g);
    }
    svg.appendChild(gl); svg.appendChild(gr); svg.appendChild(gp);
  }

  function renderLinks(t) {
    const tb = $("links-table").tBodies[0];
    tb.textContent = "";
    // In a large mesh the table follows the picture: the focus peer's links unless every link is asked for.
    const all = $("all-links").checked || t.peers.length <= SMALL_MESH;
    for (const l of [...t.links].sort((x, y) => byName(x.a, y.a) || byName(x.b, y.b))) {
      if (!matches(l.a) && !matches(l.b)) continue;
      if (!all && l.a !== state.focus && l.b !== state.focus) continue;
      const bad = linkBad(l);
      tb.appendChild(row([l.a + " ↔ " + l.b, (l.mode || "?") + (l.mode_inferred ? " (inferred)" : ""), l.state,
        l.state === "down" ? "—" : (l.estimated ? "~" + fmtMs(l.rtt_ms) + " (est.)" : fmtMs(l.rtt_ms)), fmtMs(l.jitter_ms), fmtPct(l.loss), bad ? "violated" : "ok",
        { attrs: { class: "why" }, text: [l.why, l.slow ? "slow segment: " + segName(l.slow) : ""].filter(Boolean).join("; ") }],
        { "data-link": l.id, "data-mode": l.mode, "data-state": l.state, "data-sla": bad ? "violated" : "ok", "data-slow": l.slow || "",
          "data-rtt-ms": String(l.rtt_ms), "data-estimated": String(!!l.estimated), class: bad ? "bad" : (l.state === "relayed" ? "relayed" : "") }));
    }
    const rb = $("relays-table").tBodies[0];
    rb.textContent = "";
    for (const r of t.relays) {
      rb.appendChild(row([r.path.join(" → "), r.via, r.sla + (r.sla_ok ? " (holds)" : " (violated)")],
        { "data-relay": r.from + ">" + r.to, "data-via": r.via, "data-path": r.path.join(","), class: r.sla_ok ? "relayed" : "bad" }));
    }
  }

  const SEG_NAMES = { "container-bridge": "container↔bridge", "underlay": "underlay", "link": "link",
    "remote-container-bridge": "remote container↔bridge", "end-to-end": "end to end" };
  const segName = (s) => SEG_NAMES[s] || s;

  // renderSegments: one row per peer and network, a cell per segment (figure, baseline), the
  // segment that grew the most highlighted, so a slow path says where to look.
  function renderSegments() {
    const tb = $("segments-table").tBodies[0];
    tb.textContent = "";
    if (!state.segs) return;
    for (const p of state.segs.paths) {
      if (!matches(p.peer)) continue;
      const cells = [p.peer, p.network || "(host to host)"];
      for (const f of p.segments) {
        let text = "—", cls = "seg none";
        if (f.samples > 0) {
          text = (f.estimated ? "~" : "") + fmtMs(f.rtt_ms) + (f.loss > 0 ? " · " + fmtPct(f.loss) + " lost" : "") +
            (f.has_baseline ? " (base " + fmtMs(f.baseline_rtt_ms) + ")" : " (no baseline)");
          cls = "seg" + (f.grew ? " grew" : "") + (f.segment === p.slow ? " slow" : "");
        }
        cells.push({ attrs: { class: cls, "data-segment": f.segment, "data-rtt-ms": String(f.rtt_ms), "data-baseline-ms": String(f.baseline_rtt_ms),
          "data-grew": String(!!f.grew), "data-samples": String(f.samples) }, text: text });
      }
      cells.push(p.slow ? segName(p.slow) + (p.loss_crosscheck !== undefined ? " · tunnel loss " + fmtPct(p.loss_crosscheck) : "") :
        (p.loss_crosscheck !== undefined ? "none · tunnel loss " + fmtPct(p.loss_crosscheck) : "none"));
      tb.appendChild(row(cells, { "data-segpath": p.peer + "/" + p.network, "data-peer": p.peer, "data-network": p.network,
        "data-slow": p.slow, class: p.slow ? "bad" : "" }));
    }
  }

  function renderPerf() {
    const tb = $("perf-table").tBodies[0];
    tb.textContent = "";
    const rows = state.hist.filter((h) => matches(h.peer));
    if (!state.sel && rows.length) state.sel = { peer: rows[0].peer, via: rows[0].via };
    for (const h of rows) {
      const s = h.summary;
      const tr = row([h.peer, h.via === "path" ? "path (end to end)" : h.via, fmtMs(s.rtt_p50_ms), fmtMs(s.rtt_p99_ms), fmtMs(s.jitter_ms),
        fmtPct(s.loss_mean) + " / " + fmtPct(s.loss_max), fmtPct(s.up_ratio), s.samples],
        { "data-peer": h.peer, "data-via": h.via, "data-rtt-p50-ms": String(s.rtt_p50_ms), "data-rtt-p99-ms": String(s.rtt_p99_ms),
          class: state.sel && state.sel.peer === h.peer && state.sel.via === h.via ? "sel" : "" });
      tr.addEventListener("click", () => { state.sel = { peer: h.peer, via: h.via }; renderPerf(); });
      tb.appendChild(tr);
    }
    drawChart();
  }

  async function drawChart() {
    const svg = $("perf-chart");
    if (!state.sel) { svg.textContent = ""; return; }
    const sel = state.sel;
    let h;
    try {
      h = await getJSON("/api/history?peer=" + encodeURIComponent(sel.peer) + "&via=" + encodeURIComponent(sel.via));
    } catch (e) { return; }
    if (state.sel !== sel) return;
    $("perf-chart-title").textContent = "RTT to " + sel.peer + " (" + sel.via + "), red: loss";
    svg.textContent = "";
    const W = 800, H = 160, pad = 30, s = h.samples;
    if (!s.length) return;
    const t0 = Date.parse(s[0].t), t1 = Math.max(Date.parse(s[s.length - 1].t), t0 + 1);
    const maxRTT = Math.max(1, ...s.map((x) => x.rtt_ms)) * 1.1;
    const X = (t) => pad + (W - 2 * pad) * (Date.parse(t) - t0) / (t1 - t0), Y = (v) => H - pad + -(H - 2 * pad) * v / maxRTT;
    let d = "";
    for (const x of s) if (x.up) d += (d ? " L" : "M") + X(x.t).toFixed(1) + "," + Y(x.rtt_ms).toFixed(1);
    svg.appendChild(sv("path", { class: "chart-line", d: d }));
    for (const x of s) if (x.loss > 0 || !x.up)
      svg.appendChild(sv("rect", { class: "chart-loss", x: X(x.t) - 1, y: pad, width: 2, height: (H - 2 * pad) * (x.up ? x.loss : 1) }));
    svg.appendChild(sv("text", { class: "axis", x: 2, y: pad }, fmtMs(maxRTT)));
    svg.appendChild(sv("text", { class: "axis", x: 2, y: H - pad }, "0"));
    svg.appendChild(sv("text", { class: "axis", x: pad, y: H - 8 }, ago(s[0].t)));
    svg.appendChild(sv("text", { class: "axis", x: W - pad - 30, y: H - 8 }, "now"));
  }

  function spark(samples) {
    const W = 160, H = 24, svg = sv("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H });
    if (samples.length < 2) return svg;
    const max = Math.max(1, ...samples.map((x) => x.rx_bps + x.tx_bps));
    let d = "";
    samples.forEach((x, i) => { d += (i ? " L" : "M") + (W * i / (samples.length - 1)).toFixed(1) + "," + (H - 1 - (H - 2) * (x.rx_bps + x.tx_bps) / max).toFixed(1); });
    svg.appendChild(sv("path", { class: "spark", d: d }));
    return svg;
  }

  function renderIfaces() {
    const tb = $("iface-table").tBodies[0];
    tb.textContent = "";
    for (const i of state.ifaces) {
      const last = i.samples.length ? i.samples[i.samples.length - 1] : { rx_bps: 0, tx_bps: 0 };
      const c = i.counters || {};
      const kind = (i.kind || "") + (i.members ? " (" + i.members + ")" : "");
      tb.appendChild(row([i.name, kind, fmtRate(last.rx_bps), fmtRate(last.tx_bps), c.rx_packets + " / " + c.tx_packets,
        c.rx_errors + " / " + c.tx_errors, c.rx_dropped + " / " + c.tx_dropped, String(c.overruns), spark(i.samples)],
        { "data-iface": i.name, "data-kind": i.kind || "", "data-rx-bps": String(last.rx_bps), "data-tx-bps": String(last.tx_bps),
          "data-rx-bytes": String(i.rx_bytes), "data-tx-bytes": String(i.tx_bytes) }));
    }
  }

  function renderSLA() {
    const tb = $("sla-table").tBodies[0];
    tb.textContent = "";
    for (const r of state.sla.rows) {
      if (!matches(r.from) && !matches(r.to)) continue;
      tb.appendChild(row([r.from + " → " + r.to, r.sla, r.ok ? "holds" : "violated", ago(r.since),
        { attrs: { class: "why" }, text: r.why }, fmtMs(r.rtt_ms) + " · " + fmtMs(r.jitter_ms) + " · " + fmtPct(r.loss),
        r.path.join(" → ") + (r.source === "link" ? " (gossiped link)" : "")],
        { "data-pair": r.from + ">" + r.to, "data-ok": String(r.ok), "data-source": r.source, class: r.ok ? "" : "bad" }));
    }
  }

  // The view is in the URL's fragment (#focus=P&filter=F&all=1), so a view can be bookmarked or linked.
  function readHash() {
    const h = new URLSearchParams(location.hash.slice(1));
    state.focus = h.get("focus") || state.focus;
    state.filter = (h.get("filter") || "").trim().toLowerCase();
    $("filter").value = state.filter;
    $("all-links").checked = h.get("all") === "1";
  }
  function writeHash() {
    const h = new URLSearchParams();
    if (state.topo && state.focus && state.focus !== state.topo.self) h.set("focus", state.focus);
    if (state.filter) h.set("filter", state.filter);
    if ($("all-links").checked) h.set("all", "1");
    history.replaceState(null, "", h.toString() ? "#" + h.toString() : location.pathname);
  }
  const changed = () => { writeHash(); if (state.topo) render(); };
  $("filter").addEventListener("input", (e) => { state.filter = e.target.value.trim().toLowerCase(); changed(); });
  $("focus").addEventListener("change", (e) => { state.focus = e.target.value; changed(); });
  $("all-links").addEventListener("change", changed);
  window.addEventListener("hashchange", () => { readHash(); if (state.topo) render(); });
  readHash();
  refresh();
  setInterval(refresh, POLL_MS);
})();
