// servesim trace page: steps through records of the real scheduler (sim/lab/trace.py), embedded as JSON.
// Plain browser JavaScript, no library, no network. Every number drawn comes from the data; nothing is simulated here.
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("trace-data").textContent);
  const SVGNS = "http://www.w3.org/2000/svg";
  // Okabe-Ito and Tol colours: distinguishable in colour-blindness and on a washed-out projector.
  const PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#882255", "#117733",
                   "#332288", "#AA4499", "#44AA99", "#999933", "#661100", "#6699CC", "#888888"];
  const PHASE_TITLE = {before: "since the last step", schedule: "scheduling this step",
                       after: "at the end of this step"};
  const state = {scene: 0, frame: 0, timer: null, focus: null, compare: true};

  // ---- helpers ------------------------------------------------------------------------------
  function h(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function s(tag, attrs, parent, text) {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  function colour(scene, rid) {
    const ids = Object.keys(scene.requests);
    const i = ids.indexOf(rid);
    return PALETTE[(i < 0 ? ids.length : i) % PALETTE.length];
  }
  function pale(hex) {  // the colour mixed with 75% white: reserved but empty
    const n = parseInt(hex.slice(1), 16);
    const mix = (c) => Math.round(c + (255 - c) * 0.75);
    return `rgb(${mix(n >> 16)}, ${mix((n >> 8) & 255)}, ${mix(n & 255)})`;
  }
  function fmt(ms) { return ms.toFixed(2); }

  // Positions each chunk of a step writes, as "physical:offset" (paged) or "slot:position" keys.
  function writtenCells(panel, rec) {
    const cells = new Set();
    for (const [rid, start, n] of rec.chunks) {
      const table = rec.tables[rid];
      if (!table) continue;
      for (let p = start; p < start + n; p++) {
        if (panel.kind === "paged") {
          const b = table[Math.floor(p / panel.block_size)];
          if (b !== undefined) cells.add(`${b}:${p % panel.block_size}`);
        } else {
          cells.add(`${table[0]}:${p}`);
        }
      }
    }
    return cells;
  }

  // ---- the paged pool: block tables, arrows, physical blocks -----------------------------------
  function maxLogical(panel) {
    if (panel._maxLogical === undefined) {
      let m = 1;
      for (const st of panel.steps) for (const t of Object.values(st.tables)) m = Math.max(m, t.length);
      panel._maxLogical = m;
    }
    return panel._maxLogical;
  }

  function holdersInOrder(rec) {
    const order = rec.running.filter((r) => r in rec.tables);
    for (const r of Object.keys(rec.tables)) if (!order.includes(r)) order.push(r);
    return order;
  }

  function drawPaged(scene, panel, rec) {
    const W = 900, bs = panel.block_size, nb = panel.num_blocks;
    const TX = 8, LABEL_W = 92, TABLE_W = 500, POOL_X = 640;
    const nl = maxLogical(panel);
    const lbw = Math.min(110, (TABLE_W - LABEL_W) / nl);  // one logical block
    const cellW = (lbw - 10) / bs;
    const ROW = 68, BH = 32;
    const seqs = holdersInOrder(rec);
    const cols = Math.ceil(nb / 18), perCol = Math.ceil(nb / cols);
    const colW = (W - POOL_X) / cols, PB = 26, PPITCH = 31;
    const pcellW = Math.min(26, (colW - 96) / bs);
    const tablesH = 40 + Math.max(seqs.length, 1) * ROW;
    const poolH = 40 + perCol * PPITCH;
    const H = Math.max(tablesH, poolH) + 10;
    const root = s("svg", {viewBox: `0 0 ${W} ${H}`, class: "memory paged", role: "img",
                           "aria-label": "block tables and the physical block pool"});
    const defs = s("defs", {}, root);
    const blocks = new Map(rec.blocks.map(([b, fill, refs, cached]) => [b, {fill, refs, cached}]));
    const holders = new Map();
    for (const rid of seqs) for (const b of rec.tables[rid]) {
      if (!holders.has(b)) holders.set(b, []);
      if (!holders.get(b).includes(rid)) holders.get(b).push(rid);
    }
    const written = writtenCells(panel, rec);
    const preemptedFrom = new Map();
    for (const ev of rec.events) if (ev.kind === "preempt") for (const b of ev.blocks) preemptedFrom.set(b, ev.rid);
    const copied = new Map();
    for (const ev of rec.events) if (ev.kind === "cow") for (const [src, dst] of ev.copies) copied.set(dst, src);

    s("text", {x: TX, y: 22, "font-size": 19, "font-weight": 700}, root, "block tables (logical block \u2192 physical)");
    s("text", {x: POOL_X, y: 22, "font-size": 19, "font-weight": 700}, root, "physical blocks");
    // Physical blocks first (arrows end on them).
    const blockPos = new Map();
    for (let b = 0; b < nb; b++) {
      const col = Math.floor(b / perCol), row = b % perCol;
      const x = POOL_X + col * colW, y = 36 + row * PPITCH;
      const st = blocks.get(b) || {fill: 0, refs: 0, cached: 0};
      const who = holders.get(b) || [];
      const g = s("g", {class: "pblock", "data-block": b, "data-refs": st.refs, "data-fill": st.refs ? st.fill : 0,
                        "data-cached": st.cached, "data-holders": who.join(" ")}, root);
      const cx = x + 8;
      s("text", {x: cx + bs * pcellW + 6, y: y + PB / 2 + 7, "font-size": 18,
                 "font-weight": st.refs ? 700 : 400}, g, String(b));
      blockPos.set(b, {x: cx, y: y + PB / 2});
      s("rect", {x: cx, y: y, width: bs * pcellW, height: PB, fill: "none", class: "cells"}, g);  // the block's box
      for (let j = 0; j < bs; j++) {
        const key = `${b}:${j}`;
        let fillColour = "#fff", stroke = "#999";
        if (b === 0) { fillColour = "#444"; stroke = "#444"; }
        else if (st.refs > 0) { stroke = colour(scene, who[0] || ""); if (j < st.fill) fillColour = null; }
        else if (st.cached) { fillColour = "#c8c8c8"; stroke = "#888"; }
        const cellX = cx + j * pcellW;
        if (fillColour === null) {  // bands, one per sequence holding the block
          who.forEach((rid, k) => s("rect", {x: cellX, y: y + (k * PB) / who.length, width: pcellW,
                                             height: PB / who.length, fill: colour(scene, rid)}, g));
          s("rect", {x: cellX, y: y, width: pcellW, height: PB, fill: "none", stroke: "#fff", "stroke-width": 1}, g);
        } else {
          s("rect", {x: cellX, y: y, width: pcellW, height: PB, fill: fillColour, stroke: stroke, "stroke-width": 1.5}, g);
        }
        if (written.has(key)) s("rect", {x: cellX + 1.5, y: y + 1.5, width: pcellW - 3, height: PB - 3, fill: "none",
                                         stroke: "#000", "stroke-width": 3, class: "written"}, g);
      }
      const right = cx + bs * pcellW + 34;
      if (b === 0) s("text", {x: right, y: y + PB / 2 + 6, "font-size": 16, fill: "#444"}, g, "null");
      else if (st.refs > 1) s("text", {x: right, y: y + PB / 2 + 6, "font-size": 17, "font-weight": 700}, g, `ref ${st.refs}`);
      else if (st.refs === 0 && st.cached) s("text", {x: right, y: y + PB / 2 + 6, "font-size": 15, fill: "#444"}, g, "cached");
      if (preemptedFrom.has(b)) {
        s("rect", {x: cx - 3, y: y - 3, width: bs * pcellW + 6, height: PB + 6, fill: "none", stroke: "#c00000",
                   "stroke-width": 2.5, "stroke-dasharray": "6 4", class: "preempted-from"}, g);
        s("title", {}, g, `freed by preempting ${preemptedFrom.get(b)} in this step`);
      }
      if (copied.has(b)) s("text", {x: right, y: y + PB / 2 + 6, "font-size": 15, fill: "#6a00a8", "font-weight": 700},
                           g, `copy of ${copied.get(b)}`);
    }
    // Block tables, one row per sequence holding blocks, with an arrow from each logical block to its physical block.
    const chunkOf = new Map(rec.chunks.map((c) => [c[0], c]));
    seqs.forEach((rid, r) => {
      const y = 40 + r * ROW, c = colour(scene, rid);
      const g = s("g", {class: "seq", "data-seq": rid}, root);
      g.addEventListener("click", () => { state.focus = state.focus === rid ? null : rid; render(); });
      s("text", {x: TX, y: y + 34, "font-size": 24, "font-weight": 700, fill: c}, g, rid);
      const ch = chunkOf.get(rid);
      if (ch) s("text", {x: TX, y: y + 56, "font-size": 14, fill: "#333"}, g,
                ch[3] === "decode" ? `decode@${ch[1]}` : `${ch[3]} ${ch[1]}:${ch[1] + ch[2]}`);
      rec.tables[rid].forEach((b, li) => {
        const x = TX + LABEL_W + li * lbw, st = blocks.get(b) || {fill: 0};
        const lg = s("g", {class: "lblock", "data-logical": li, "data-physical": b}, g);
        s("text", {x: x + (lbw - 10) / 2, y: y + 12, "font-size": 15, "text-anchor": "middle"}, lg, `L${li}\u2192${b}`);
        for (let j = 0; j < bs; j++) {
          const cx = x + j * cellW;
          s("rect", {x: cx, y: y + 18, width: cellW, height: BH, fill: j < st.fill ? c : "#fff", stroke: c,
                     "stroke-width": 1.5}, lg);
          if (written.has(`${b}:${j}`)) s("rect", {x: cx + 1.5, y: y + 19.5, width: cellW - 3, height: BH - 3,
                                                    fill: "none", stroke: "#000", "stroke-width": 3}, lg);
        }
        const end = blockPos.get(b);
        if (!end) return;
        const x1 = x + (lbw - 10) / 2, y1 = y + 18 + BH;
        const markId = `head-${r}`;
        if (!defs.querySelector(`#${markId}`)) {
          const m = s("marker", {id: markId, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7,
                                 orient: "auto-start-reverse"}, defs);
          s("path", {d: "M0,0 L10,5 L0,10 z", fill: c}, m);
        }
        const cls = "arrow" + (state.focus ? (state.focus === rid ? " focused" : " faded") : "");
        s("path", {class: cls, "data-seq": rid, "data-logical": li, "data-to": b, stroke: c,
                   d: `M${x1},${y1} C${x1},${y1 + 40} ${end.x - 120},${end.y} ${end.x - 2},${end.y}`,
                   "marker-end": `url(#${markId})`}, root);
      });
    });
    if (!seqs.length) s("text", {x: TX, y: 70, "font-size": 18, fill: "#333"}, root, "no sequence holds blocks");
    return root;
  }

  // ---- slots: num_slots rows of slot_len token positions, reserved at load -----------------------
  function drawSlots(scene, panel, rec) {
    const W = 900, n = panel.slot_len, LABEL_W = 150, ROW = 58, CH = 34;
    const cellW = (W - LABEL_W - 110) / n;
    const H = 40 + panel.num_slots * ROW;
    const root = s("svg", {viewBox: `0 0 ${W} ${H}`, class: "memory slots", role: "img",
                           "aria-label": "KV slots, each reserved for its whole length"});
    s("text", {x: 8, y: 22, "font-size": 19, "font-weight": 700}, root,
      `${panel.num_slots} slots \u00d7 ${n} token positions, each reserved whether used or not`);
    const holderOf = new Map();
    for (const [rid, t] of Object.entries(rec.tables)) holderOf.set(t[0], rid);
    const written = writtenCells(panel, rec);
    for (let k = 0; k < panel.num_slots; k++) {
      const y = 36 + k * ROW, rid = holderOf.get(k), held = rid ? (rec.held[rid] || 0) : 0;
      const c = rid ? colour(scene, rid) : "#bbb";
      const g = s("g", {class: "slot", "data-slot": k, "data-holder": rid || "", "data-held": held}, root);
      s("text", {x: 8, y: y + 24, "font-size": 20, "font-weight": 700}, g, `slot ${k}`);
      if (rid) s("text", {x: 86, y: y + 24, "font-size": 22, "font-weight": 700, fill: c}, g, rid);
      for (let j = 0; j < n; j++) {
        const x = LABEL_W + j * cellW;
        s("rect", {x: x, y: y, width: cellW, height: CH, fill: j < held ? c : (rid ? pale(c) : "#eee"),
                   stroke: rid ? c : "#bbb", "stroke-width": 1}, g);
        if (written.has(`${k}:${j}`)) s("rect", {x: x + 1.2, y: y + 1.2, width: cellW - 2.4, height: CH - 2.4,
                                                  fill: "none", stroke: "#000", "stroke-width": 2.5}, g);
      }
      s("text", {x: LABEL_W + n * cellW + 8, y: y + 24, "font-size": 17}, g, rid ? `${held}/${n} used` : "idle");
    }
    return root;
  }

  // ---- KV memory over time: reserved and used token slots, preemptions marked --------------------
  function drawChart(scene, panel, t) {
    const W = 900, H = 120, L = 70, R = 12, T = 14, B = 28;
    let tmax = 0;
    for (const p of scene.panels) for (const st of p.steps) tmax = Math.max(tmax, st.t + st.dt);
    const cap = Math.max(1, ...panel.steps.map((st) => st.capacity));
    const X = (v) => L + (W - L - R) * (tmax ? v / tmax : 0), Y = (v) => T + (H - T - B) * (1 - v / cap);
    const root = s("svg", {viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
                           "aria-label": "KV token slots reserved and used over time"});
    s("line", {x1: L, x2: W - R, y1: Y(cap), y2: Y(cap), stroke: "#777", "stroke-dasharray": "3 3"}, root);
    s("text", {x: L - 6, y: Y(cap) + 6, "font-size": 15, "text-anchor": "end"}, root, String(cap));
    s("text", {x: L - 6, y: Y(0) + 5, "font-size": 15, "text-anchor": "end"}, root, "0");
    s("line", {x1: L, x2: W - R, y1: Y(0), y2: Y(0), stroke: "#000"}, root);
    const path = (key) => panel.steps.filter((st) => st.chunks.length)
      .map((st) => `${X(st.t)},${Y(st[key])} ${X(st.t + st.dt)},${Y(st[key])}`).join(" ");
    s("polyline", {points: path("reserved"), fill: "none", stroke: "#000", "stroke-width": 2.5,
                   "stroke-dasharray": "8 4"}, root);
    s("polyline", {points: path("stored"), fill: "none", stroke: "#0072B2", "stroke-width": 3}, root);
    for (const st of panel.steps) if (st.events.some((e) => e.kind === "preempt"))
      s("path", {d: `M${X(st.t) - 7},${T} l14,0 l-7,12 z`, fill: "#c00000", class: "preempt-mark"}, root);
    s("line", {x1: X(t), x2: X(t), y1: T - 4, y2: H - B, stroke: "#c00000", "stroke-width": 2.5}, root);
    s("text", {x: L, y: H - 8, "font-size": 15}, root,
      `token slots over ${fmt(tmax)} ms: - - reserved, \u2014 holding tokens, \u25bc preemption`);
    return root;
  }

  // ---- a panel -----------------------------------------------------------------------------------
  function renderPanel(scene, panel, i, changed, t) {
    const sec = h("section", {class: "panel" + (changed ? " changed" : ""), "data-engine": panel.name,
                              "data-kind": panel.kind});
    sec.appendChild(h("h2", {}, `${panel.name} \u00b7 ${panel.scheduler}`));
    sec.appendChild(h("p", {class: "describe"}, panel.describe));
    if (i < 0) {
      sec.dataset.step = "0";
      sec.appendChild(h("p", {class: "status"}, "not started yet"));
      return sec;
    }
    const rec = panel.steps[i];
    sec.dataset.step = String(rec.step);
    const status = h("p", {class: "status"});
    status.textContent = rec.chunks.length ? `step ${rec.step} \u00b7 t = ${fmt(rec.t)} ms (+${fmt(rec.dt)} ms)`
                                           : `t = ${fmt(rec.t)} ms`;
    if (rec.label) status.appendChild(h("span", {class: "label"}, ` \u2014 ${rec.label}`));
    sec.appendChild(status);
    // Waiting queue, head first.
    const q = h("div", {class: "row queue"});
    q.appendChild(h("span", {class: "what"}, "waiting"));
    if (!rec.waiting.length) q.appendChild(h("span", {class: "empty"}, "empty"));
    for (const rid of rec.waiting) {
      const chip = h("span", {class: "chip" + (rec.recompute.includes(rid) ? " recompute" : ""), "data-rid": rid}, rid);
      chip.style.background = colour(scene, rid);
      if (rec.recompute.includes(rid)) chip.title = "preempted: will be recomputed";
      q.appendChild(chip);
    }
    sec.appendChild(q);
    // The batch and its token budget.
    const b = h("div", {class: "row batch"});
    b.appendChild(h("span", {class: "what"}, "batch"));
    const total = rec.chunks.reduce((a, c) => a + c[2], 0);
    const budget = panel.budget || Math.max(total, 1);
    const bar = h("div", {class: "budget", title: `${total} of ${panel.budget || "unbounded"} tokens`});
    for (const [rid, start, n, kind] of rec.chunks) {
      const seg = h("div", {class: "seg", "data-rid": rid},
                    kind === "decode" ? rid : `${rid} ${kind} ${n}`);
      seg.style.width = `${(100 * n) / budget}%`;
      seg.style.background = colour(scene, rid);
      seg.title = kind === "decode" ? `${rid} decode@${start}` : `${rid} ${kind} ${start}:${start + n}`;
      bar.appendChild(seg);
    }
    b.appendChild(bar);
    b.appendChild(h("span", {class: "budget-text"},
                    rec.chunks.length ? `${total}${panel.budget ? ` / ${panel.budget}` : ""} tokens, ${rec.chunks.length} seqs`
                                      : "no step"));
    sec.appendChild(b);
    sec.appendChild(panel.kind === "paged" ? drawPaged(scene, panel, rec) : drawSlots(scene, panel, rec));
    sec.appendChild(h("p", {class: "kv"}, `KV: ${rec.kv}`));
    // Events in causal order, grouped by when they happened, numbered across the groups.
    const evs = h("div", {class: "events", "aria-label": "events in causal order"});
    let ol = null, phase = null, count = 0;
    for (const ev of rec.events) {
      if (ev.phase !== phase) {
        phase = ev.phase;
        evs.appendChild(h("div", {class: "phase"}, PHASE_TITLE[phase] || phase));
        ol = h("ol", {start: String(count + 1)});
        evs.appendChild(ol);
      }
      ol.appendChild(h("li", {class: "ev", "data-kind": ev.kind, "data-rid": ev.rid, "data-phase": ev.phase}, ev.text));
      count += 1;
    }
    if (!rec.events.length) evs.appendChild(h("div", {class: "phase"}, "no change to the queue or the KV memory"));
    sec.appendChild(evs);
    if (scene.panels.length > 1 || panel.steps.length > 8) sec.appendChild(drawChart(scene, panel, t));
    return sec;
  }

  // ---- the frame -----------------------------------------------------------------------------------
  function render() {
    const scene = DATA.scenes[state.scene];
    const n = scene.frames.length;
    state.frame = Math.max(0, Math.min(state.frame, n - 1));
    const frame = scene.frames[state.frame];
    document.body.dataset.scene = scene.id;
    document.body.dataset.frame = String(state.frame);
    document.getElementById("title").textContent = scene.title;
    document.getElementById("subtitle").textContent = scene.subtitle;
    document.getElementById("counter").textContent = `frame ${state.frame + 1} / ${n} \u00b7 t = ${fmt(frame.t)} ms`;
    const slider = document.getElementById("slider");
    slider.max = String(n - 1);
    slider.value = String(state.frame);
    document.querySelectorAll("#scenes button").forEach((btn, k) =>
      btn.setAttribute("aria-selected", String(k === state.scene)));
    const box = document.getElementById("panels");
    box.replaceChildren();
    scene.panels.forEach((panel, k) => {
      if (k > 0 && !state.compare) return;
      box.appendChild(renderPanel(scene, panel, frame.at[k], frame.changed.includes(k) && scene.panels.length > 1,
                                  frame.t));
    });
    const hash = `#scene=${state.scene + 1}&frame=${state.frame + 1}`;
    if (location.hash !== hash) history.replaceState(null, "", hash);
  }

  function go(frame) { state.frame = frame; render(); }
  function step(d) { go(state.frame + d); }
  function setScene(k) {
    if (k < 0 || k >= DATA.scenes.length || k === state.scene) return;
    state.scene = k; state.frame = 0; state.focus = null; render();
  }
  function togglePlay() {
    const btn = document.getElementById("play");
    if (state.timer) { clearInterval(state.timer); state.timer = null; btn.textContent = "play"; return; }
    btn.textContent = "pause";
    state.timer = setInterval(() => {
      if (state.frame >= DATA.scenes[state.scene].frames.length - 1) togglePlay(); else step(1);
    }, 900);
  }
  function cycleFocus() {
    const scene = DATA.scenes[state.scene], frame = scene.frames[state.frame];
    const i = frame.at[0];
    if (i < 0 || scene.panels[0].kind !== "paged") return;
    const seqs = holdersInOrder(scene.panels[0].steps[i]);
    const k = state.focus === null ? 0 : seqs.indexOf(state.focus) + 1;
    state.focus = k < seqs.length ? seqs[k] : null;
    render();
  }

  document.addEventListener("keydown", (e) => {
    if (e.altKey || e.ctrlKey || e.metaKey) return;
    const last = DATA.scenes[state.scene].frames.length - 1;
    const keys = {
      ArrowRight: () => step(1), ArrowDown: () => step(1), ArrowLeft: () => step(-1), ArrowUp: () => step(-1),
      PageDown: () => step(10), PageUp: () => step(-10), Home: () => go(0), End: () => go(last),
      " ": togglePlay, a: cycleFocus, c: () => { state.compare = !state.compare; render(); },
    };
    DATA.scenes.forEach((_, k) => { keys[String(k + 1)] = () => setScene(k); });
    const fn = keys[e.key];
    if (fn) { e.preventDefault(); fn(); }
  });
  document.getElementById("first").addEventListener("click", () => go(0));
  document.getElementById("prev").addEventListener("click", () => step(-1));
  document.getElementById("next").addEventListener("click", () => step(1));
  document.getElementById("last").addEventListener("click",
    () => go(DATA.scenes[state.scene].frames.length - 1));
  document.getElementById("play").addEventListener("click", togglePlay);
  document.getElementById("slider").addEventListener("input", (e) => go(Number(e.target.value)));
  const tabs = document.getElementById("scenes");
  DATA.scenes.forEach((scene, k) => {
    const btn = h("button", {type: "button", role: "tab", "data-scene": scene.id}, `${k + 1}. ${scene.title}`);
    btn.addEventListener("click", () => setScene(k));
    tabs.appendChild(btn);
  });
  // #scene=S&frame=F (1-based) opens that frame: links in lecture notes, and screenshots.
  function fromHash() {
    const m = /scene=(\d+)/.exec(location.hash), f = /frame=(\d+)/.exec(location.hash);
    if (m) state.scene = Math.max(0, Math.min(DATA.scenes.length - 1, Number(m[1]) - 1));
    if (f) state.frame = Number(f[1]) - 1;
  }
  window.addEventListener("hashchange", () => { fromHash(); render(); });
  fromHash();
  document.title = DATA.title;
  render();
})();
