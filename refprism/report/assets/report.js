// refprism report: draws the prisms embedded in this page (script#refprism-data) and lets you click through them.
// Plain JavaScript, no library, nothing fetched. Every number shown comes from the embedded JSON (refprism's own);
// the only arithmetic done here is the sum of the parts in the exactness boxes, a check made in your browser.
// Each number cell carries data-label (the prism label), data-col (the target column) and data-value (full
// precision), which the tests read.
"use strict";

const D = JSON.parse(document.getElementById("refprism-data").textContent);
const F32 = D.dtype === "float32";
const Z = D.columns.length;
const state = { col: 0, stack: [{ kind: "residual", node: "" }], graphNode: null };

// ------------------------------------------------------------------------------------------------ decoding

// The inverse of refprism.report.encode_split: arrays of the compute dtype are base64 of their little-endian
// bytes (bit-exact); residual and tolerance are float64, as refprism computes them.
function unpack(text, width, f32 = F32) {
  const bin = atob(text);
  const view = new DataView(new ArrayBuffer(bin.length));
  for (let i = 0; i < bin.length; i++) view.setUint8(i, bin.charCodeAt(i));
  const size = f32 ? 4 : 8, n = bin.length / size, rows = [];
  for (let i = 0; i < n; i += width) {
    const row = [];
    for (let j = i; j < i + width && j < n; j++)
      row.push(f32 ? view.getFloat32(j * size, true) : view.getFloat64(j * size, true));
    rows.push(row);
  }
  return rows;
}

const unpack64 = (text) => (text === null ? null : unpack(text, Z, false)[0]);

function residualLabels(site) {
  const out = ["embed"];
  for (let i = 0; i < site; i++) out.push(`L${Math.floor(i / 2)}.${i % 2 ? "mlp" : "attn"}`);
  return out;
}

function layerOf(label) {
  return parseInt(label.slice(1), 10);
}

function lastLabel(label) {
  const parts = label.split("/");
  return parts[parts.length - 1];
}

function decode(enc) {
  let labels = enc.labels;
  if (!labels) {
    labels = [];
    if (enc.prism === "residual" || enc.prism === "chain") labels = residualLabels(enc.site);
    else {
      const layer = layerOf(lastLabel(enc.whole.label));
      for (let h = 0; h < D.config.n_heads; h++)
        for (let s = 0; s <= enc.position; s++) labels.push(`L${layer}H${h}.src${s}`);
    }
  }
  const extras = {};
  for (const [k, v] of Object.entries(enc.extras || {}))
    extras[k] = { labels: v.labels, values: unpack(v.values, Z) };
  return {
    prism: enc.prism, position: enc.position, site: enc.site, siteName: siteName(enc.site), path: enc.path,
    whole: { label: enc.whole.label, values: unpack(enc.whole.values, Z)[0] },
    labels, values: unpack(enc.values, Z),
    residual: unpack64(enc.residual), tolerance: unpack64(enc.tolerance), exact: enc.exact, extras,
    omitted: enc.omitted || null,
  };
}

function siteName(site) {
  const L = D.config.n_layers;
  if (site === 2 * L) return `blocks.${L - 1}.resid_post`;
  return `blocks.${Math.floor(site / 2)}.resid_${site % 2 ? "mid" : "pre"}`;
}

// The Split.to_json() of an embedded split, for scripts and the tests: window.refprism.splitJson(key, kind, layer).
function splitJson(key, kind, layer) {
  const node = D.nodes[key];
  const enc = kind === "residual" ? node.residual : node[kind][String(layer)].split;
  const s = decode(enc);
  const out = {
    prism: s.prism, model: D.model, dtype: D.dtype, tokens: D.tokens, position: s.position, site: s.siteName,
    path: s.path, targets: D.targets, versus: D.versus, columns: D.columns, whole: s.whole,
    components: s.labels.map((label, i) => ({ label, values: s.values[i] })),
    residual: s.residual, tolerance: s.tolerance, exact: s.exact, extras: s.extras,
  };
  if (s.omitted) out.omitted = s.omitted;
  return out;
}

// ------------------------------------------------------------------------------------------------ DOM helpers

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "onclick") e.addEventListener("click", v);
    else if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));  // text, never HTML
  }
  return e;
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function fmt(x) {
  if (x === null || x === undefined) return "—";
  if (typeof x !== "number") return String(x);
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a >= 1e-3 && a < 1e6) return x.toFixed(4);
  return x.toExponential(2);
}

function full(x) {
  return String(x);  // the shortest text that reads back as the same float64: full precision
}

function shown(piece) {
  return piece.replace(/[\u0000-\u001f\u007f]/g, (c) => "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0"));
}

function bar(value, scale, width = 90) {
  const s = svg("svg", { width, height: 12, class: "bar" });
  const mid = width / 2;
  const w = scale > 0 ? Math.min(1, Math.abs(value) / scale) * (mid - 1) : 0;
  s.append(svg("line", { x1: mid, x2: mid, y1: 0, y2: 12, stroke: "#a0aec0" }));
  s.append(svg("rect", { x: value < 0 ? mid - w : mid, y: 2, width: w, height: 8,
                         fill: value < 0 ? "#c53030" : "#2b6cb0" }));
  return s;
}

// A number cell: data-label / data-col / data-value for the tests, the full value in the tooltip.
function numCell(label, value, { scale = null, col = state.col, role = null, cls = "", onclick = null, title } = {}) {
  const td = el("td", { "data-label": label, "data-col": col, "data-value": full(value), "data-role": role,
                        class: cls + (onclick ? " click" : ""), title: title || `${label}: ${full(value)}`, onclick });
  if (scale !== null) td.append(bar(value, scale));
  td.append(el("span", { class: "num" }, fmt(value)));
  return td;
}

function maxAbs(values) {
  let m = 0;
  for (const v of values) m = Math.max(m, Math.abs(v));
  return m;
}

// ------------------------------------------------------------------------------------------------ commands

// The refprism command that computes a view this page does not hold.
function chainArgs(path) {
  const out = [];
  path.forEach((label, i) => {
    const m = /^L(\d+)H(\d+)\.src(\d+)$/.exec(label);
    const n = /^L(\d+)N(\d+)$/.exec(label);
    if (i === 0) out.push(m ? `--layer ${m[1]} --head ${m[2]} --source ${m[3]}` : `--layer ${n[1]} --neuron ${n[2]}`);
    else out.push(m ? `--then head:${m[1]}:${m[2]}:${m[3]}` : `--then neuron:${n[1]}:${n[2]}`);
  });
  return out.join(" ");
}

function commandFor(view) {
  const path = view.node ? view.node.split("/") : [];
  if (!path.length) {
    if (view.kind === "residual") return `refprism residual ${D.command}`;
    if (view.kind === "ple") return `refprism mlp ${D.command} --layer ${view.layer} --part ple`;
    return `refprism ${view.kind === "attention" ? "attention" : "mlp"} ${D.command} --layer ${view.layer}`;
  }
  const split = view.kind === "residual" ? "" : ` --split ${view.kind}:${view.layer}`;
  return `refprism chain ${D.command} ${chainArgs(path)}${split}`;
}

// ------------------------------------------------------------------------------------------------ views

function nodeTitle(key) {
  return key ? lastLabel(key) : "logits";
}

function crumbLabel(view) {
  if (view.kind === "residual") return nodeTitle(view.node);
  const part = view.kind === "attention" ? "attn" : view.kind === "ple" ? "ple" : "mlp";
  return `L${view.layer}.${part}`;
}

function go(view) {
  state.stack.push(view);
  draw();
}

function tokens(highlight) {
  return el("div", { class: "tokens" }, D.tokens.map((t, i) => el("span", {
    class: "tok" + (i === D.position ? " at" : "") + (highlight === i && i !== D.position ? " src" : ""),
    "data-pos": i, title: `#${t.id}`,
  }, el("small", {}, String(i)), shown(t.piece))));
}

// whole, Σ parts (summed here, in float64), residual and tolerance (refprism's), exact flag.
function exactBox(s) {
  const sums = [];
  for (let z = 0; z < Z; z++) {
    let total = s.omitted ? s.omitted.values[z] : 0;
    for (const row of s.values) total += row[z];
    sums.push(total);
  }
  const head = el("tr", {}, el("th", { class: "label" }, ""), D.columns.map((c) => el("th", {}, c)));
  const row = (name, role, values, title) => el("tr", {}, el("td", { class: "label", title }, name),
    values.map((v, z) => numCell(s.whole.label, v, { col: z, role, title: `${name}: ${full(v)}` })));
  const rows = [
    row(`whole: ${s.whole.label}`, "whole", s.whole.values, "the value the parts must add up to"),
    row(s.omitted ? `Σ parts (${s.values.length} shown + ${s.omitted.count} others)` : `Σ parts (${s.values.length})`,
        "sum", sums, "summed in this browser, in float64"),
  ];
  const exact = el("div", { "data-role": "exact", "data-exact": String(s.exact) });
  if (s.residual !== null) {
    rows.push(row("residual = whole − Σ parts", "residual", s.residual, "refprism's residual (float64)"));
    rows.push(row("tolerance", "tolerance", s.tolerance, "atol + rtol Σ|parts|, for the compute dtype"));
    exact.append(s.exact ? el("span", { class: "ok" }, "exact: yes") : el("span", { class: "warn" }, "exact: NO"),
                 el("span", { class: "mute" }, ` — |residual| ≤ tolerance in ${D.dtype} (refprism's check)`));
  }
  return el("div", { class: "card exact" }, el("table", {}, el("thead", {}, head), el("tbody", {}, rows)), exact);
}

function notPrecomputed(view, why) {
  return el("div", { class: "card", "data-role": "not-precomputed" },
    el("p", { class: "warn" }, "Not precomputed in this page."),
    el("p", {}, why),
    el("p", {}, "Compute it with:"),
    el("pre", { class: "mono", "data-role": "command" }, commandFor(view)));
}

function budgetText() {
  const b = D.budget;
  const parts = ["the logits' residual prism; every layer's attention prism (every head × source) and MLP prism " +
                 `(its top ${b.top} neurons, the rest summed)`];
  if (b.depth >= 1) parts.push(`the chain of every head × source cell with a nonzero attention weight and of the top ` +
                               `${b.branch} neurons of each MLP (depth 1)`);
  if (b.depth >= 2) parts.push(`below that, to depth ${b.depth}, the ${b.branch} largest children of each panel ` +
                               `are opened: their ${b.branch} largest layer parts' prisms and those panels' ` +
                               `${b.branch} largest chains`);
  return "Precomputed: " + parts.join("; ") + ". Anything else says so, with the command that computes it.";
}

function viewResidual(view) {
  const node = D.nodes[view.node];
  if (!node) return notPrecomputed(view, "This chain is beyond what the page was built to hold.");
  const s = decode(node.residual);
  const z = state.col;
  const out = el("div", { "data-panel": "residual", "data-node": view.node });
  if (!view.node) {
    out.append(el("h2", {}, `The logits at position ${D.position} (${shown(D.tokens[D.position].piece)}), ` +
                            "split into the parts of the final residual stream"));
    out.append(el("p", { class: "mute" }, "Each part (the embedding, each layer's attention and MLP output) read " +
                  "through the final norm with its scale frozen; they add up to the model's raw logits exactly. " +
                  "Click a layer's attention or MLP term to split it further."));
  } else {
    const p = node.path[node.path.length - 1];
    const frozen = /N\d+$/.test(p) ? "This neuron's term (its gelu(gate) and the norm scales frozen)"
      : "This head's term (its attention weight and the norm scales frozen)";
    out.append(el("h2", {}, `Chain: ${s.whole.label}`));
    out.append(el("p", { class: "mute" }, `${frozen} is a ` +
                  `linear function of ${s.siteName} at position ${s.position} ` +
                  `(${shown(D.tokens[s.position].piece)}): here it is split into the residual parts there.`));
    out.append(tokens(s.position));
  }
  out.append(exactBox(s));
  const values = s.values.map((r) => r[z]);
  const scale = maxAbs(values);
  const idx = Object.fromEntries(s.labels.map((l, i) => [l, i]));
  const rows = [];
  const extras = s.extras;
  const showX = !!extras.frozen_running_sum;
  const ple = s.labels.some((l) => /^L\d+\.ple$/.test(l));  // Gemma 4: each layer's per-layer input term
  const head = el("tr", {}, el("th", { class: "label" }, "layer"), el("th", {}, "attention"), el("th", {}, "MLP"),
    ple ? el("th", { title: "Gemma 4: the per-layer input term, after the MLP" }, "per-layer input") : [],
    showX ? [el("th", { title: "Σ of the frozen parts so far" }, "running sum"),
             el("th", { title: "the residual so far through the real final norm" }, "logit lens")] : []);
  const xcell = (label) => showX ? [
    numCell(label, extras.frozen_running_sum.values[idx[label]][z], { role: "frozen_running_sum" }),
    numCell(label, extras.logit_lens.values[idx[label]][z], { role: "logit_lens" })] : [];
  rows.push(el("tr", {}, el("td", { class: "label" }, "embed"),
               numCell("embed", values[0], { scale, role: "part" }), el("td", {}, ""), xcell("embed")));
  const L = D.config.n_layers;
  for (let l = 0; l < L; l++) {
    const a = `L${l}.attn`, m = `L${l}.mlp`, e = `L${l}.ple`;
    if (!(a in idx)) break;
    const cell = (label, kind) => {
      if (!(label in idx)) return el("td", {}, "");
      const open = !!(node[kind] && node[kind][String(l)]);
      return numCell(label, values[idx[label]], { scale, role: "part", cls: open ? "open" : "closed",
        onclick: () => go({ kind, node: view.node, layer: l }) });
    };
    const last = e in idx ? e : m in idx ? m : a;
    rows.push(el("tr", {}, el("td", { class: "label" }, `L${l}`), cell(a, "attention"), cell(m, "mlp"),
                 ple ? cell(e, "ple") : [], showX ? xcell(last) : []));
  }
  out.append(el("div", { class: "card scroll" },
    el("p", { class: "legend" }, `Column: ${D.columns[z]}. Underlined terms open their prism; dotted ones were ` +
                                 "not precomputed (the page gives the command)." +
                                 (showX ? ` Running sum and logit lens: after the layer's ${ple ? "per-layer input" :
                                          "MLP"}.` : "")),
    el("table", {}, el("thead", {}, head), el("tbody", {}, rows))));
  if (showX) out.append(lensCard(s, z));
  return out;
}

// The frozen running sum beside the logit lens, after every part (the root only), and the per-part details.
function lensCard(s, z) {
  const run = s.extras.frozen_running_sum.values.map((r) => r[z]);
  const lens = s.extras.logit_lens.values.map((r) => r[z]);
  const direct = s.extras.direct_effect.values.map((r) => r[z]);
  const W = 760, H = 220, pad = 36, n = run.length;
  const lo = Math.min(0, ...run, ...lens), hi = Math.max(0, ...run, ...lens);
  const x = (i) => pad + (n > 1 ? i * (W - 2 * pad) / (n - 1) : 0);
  const y = (v) => H - pad + (hi > lo ? -(v - lo) * (H - 2 * pad) / (hi - lo) : 0);
  const chart = svg("svg", { width: W, height: H, "data-role": "lens-chart" });
  chart.append(svg("line", { x1: pad, x2: W - pad, y1: y(0), y2: y(0), stroke: "#cbd5e0" }));
  for (const [vals, color, name] of [[run, "#2b6cb0", "frozen running sum"], [lens, "#dd6b20", "logit lens"]]) {
    chart.append(svg("polyline", { points: vals.map((v, i) => `${x(i)},${y(v)}`).join(" "), fill: "none",
                                   stroke: color, "stroke-width": 2 }));
    const t = svg("text", { x: W - pad - 140, y: name === "logit lens" ? 14 : 28, fill: color });
    t.textContent = name;
    t.setAttribute("style", `fill:${color}`);
    chart.append(t);
  }
  const t0 = svg("text", { x: 2, y: y(hi) + 4 }); t0.textContent = fmt(hi); chart.append(t0);
  const t1 = svg("text", { x: 2, y: y(lo) + 4 }); t1.textContent = fmt(lo); chart.append(t1);
  const rows = s.labels.map((label, i) => el("tr", {}, el("td", { class: "label" }, label),
    numCell(label, s.values[i][z], { role: "frozen" }), numCell(label, direct[i], { role: "direct_effect" }),
    numCell(label, run[i], { role: "running" }), numCell(label, lens[i], { role: "lens" })));
  const capped = s.extras.softcapped ? el("p", {}, `The whole above is pre-cap; ${s.extras.softcapped.labels[0]}: `,
    el("span", { class: "num", "data-role": "softcapped", "data-value": full(s.extras.softcapped.values[0][z]) },
       fmt(s.extras.softcapped.values[0][z]))) : null;
  return el("div", { class: "card" }, el("h3", {}, "Frozen running sum beside the logit lens"),
    el("p", { class: "legend" }, "The running sum adds the frozen parts; the logit lens reads the residual so far " +
       "through the real final norm. Where they differ, the norm's scale is doing work; both end at the logit."),
    chart, capped,
    el("details", {}, el("summary", {}, "every part: frozen term, direct effect (norm recomputed), running sum, lens"),
       el("table", {}, el("thead", {}, el("tr", {}, el("th", { class: "label" }, "part"), el("th", {}, "frozen term"),
          el("th", {}, "direct effect"), el("th", {}, "running sum"), el("th", {}, "logit lens"))),
          el("tbody", {}, rows))));
}

function viewAttention(view) {
  const node = D.nodes[view.node];
  const panel = node && node.attention && node.attention[String(view.layer)];
  if (!panel) return notPrecomputed(view, `L${view.layer}.attn of ${nodeTitle(view.node)} was not split here.`);
  const s = decode(panel.split);
  const z = state.col, N = D.config.n_heads, S = s.position + 1;
  const pattern = unpack(panel.pattern, S);
  const out = el("div", { "data-panel": "attention", "data-node": view.node, "data-layer": view.layer });
  out.append(el("h2", {}, `${s.whole.label}: heads × source tokens`));
  out.append(el("p", { class: "mute" }, `Each cell is head h's output at position ${s.position} coming from source ` +
    "token s (its attention weight times the value there, through the head's output matrix), read by the target. " +
    "Click a cell for its chain: what the head read at that source."));
  out.append(tokens(s.position));
  out.append(exactBox(s));
  const scale = maxAbs(s.values.map((r) => r[z]));
  const heads = s.extras.heads;
  const head = el("tr", {}, el("th", { class: "label" }, "head \\ source"),
    Array.from({ length: S }, (_, j) => el("th", { title: `#${D.tokens[j].id}` }, `${j}: ${shown(D.tokens[j].piece)}`)),
    el("th", {}, "head total"));
  const rows = [];
  for (let h = 0; h < N; h++) {
    const cells = [];
    for (let j = 0; j < S; j++) {
      const i = h * S + j, v = s.values[i][z], label = s.labels[i], w = pattern[h][j];
      const key = view.node ? `${view.node}/${label}` : label;
      const a = scale > 0 ? Math.abs(v) / scale : 0;
      const td = numCell(label, v, {
        cls: w === 0 ? "masked" : (key in D.nodes ? "open" : "closed"),
        title: `${label}: ${full(v)} (attention weight ${fmt(w)})`,
        onclick: () => go({ kind: "residual", node: key, masked: w === 0 }),
      });
      if (w !== 0) td.style.background = v >= 0 ? `rgba(43,108,176,${0.6 * a})` : `rgba(197,48,48,${0.6 * a})`;
      cells.push(td);
    }
    rows.push(el("tr", {}, el("td", { class: "label" }, `H${h}`), cells,
                 numCell(heads.labels[h], heads.values[h][z], { role: "head" })));
  }
  out.append(el("div", { class: "card scroll" }, el("p", { class: "legend" }, `Column: ${D.columns[z]}. ` +
    "Blue adds to it, red takes away; grey cells have attention weight 0 (outside the window)."),
    el("table", { class: "grid" }, el("thead", {}, head), el("tbody", {}, rows))));
  return out;
}

function viewMlp(view) {
  const node = D.nodes[view.node];
  const panel = node && node.mlp && node.mlp[String(view.layer)];
  if (!panel) return notPrecomputed(view, `L${view.layer}.mlp of ${nodeTitle(view.node)} was not split here.`);
  const s = decode(panel.split);
  const out = el("div", { "data-panel": "mlp", "data-node": view.node, "data-layer": view.layer });
  const total = s.values.length + (s.omitted ? s.omitted.count : 0);
  const moe = s.labels.some((l) => /E\d+$/.test(l));  // Gemma 4 MoE: the selected experts beside the neurons
  out.append(el("h2", {}, `${s.whole.label}: its top ${s.values.length} of ${total} ` +
                          (moe ? "neurons and selected experts" : "neurons")));
  out.append(el("p", { class: "mute" }, "Each neuron's term: its activation (gelu(gate) × up) times its output " +
    "vector, read by each target. Ranked by the largest |term| over the targets; the others are summed in the last " +
    "row. Click a neuron for its chain: the residual parts that fed it."));
  out.append(exactBox(s));
  const scales = D.columns.map((_, z) => maxAbs(s.values.map((r) => r[z])));
  const head = el("tr", {}, el("th", { class: "label" }, "neuron"), D.columns.map((c) => el("th", {}, c)));
  const rows = s.labels.map((label, i) => {
    const key = view.node ? `${view.node}/${label}` : label;
    if (/E\d+$/.test(label))  // an expert: a leaf here (its neurons: refprism mlp --part expert:E)
      return el("tr", { class: "leaf", "data-expert": label, title: `its neurons: refprism mlp ... --layer ` +
                        `${view.layer} --part expert:${label.split("E")[1]}` },
        el("td", { class: "label" }, label),
        s.values[i].map((v, z) => numCell(label, v, { col: z, scale: scales[z], role: "expert" })));
    return el("tr", { class: "click " + (key in D.nodes ? "open" : "closed"), "data-neuron": label,
                      onclick: () => go({ kind: "residual", node: key }) },
      el("td", { class: "label" }, label),
      s.values[i].map((v, z) => numCell(label, v, { col: z, scale: scales[z], role: "neuron" })));
  });
  rows.push(el("tr", {}, el("td", { class: "label" }, `(${s.omitted.count} others, summed)`),
    s.omitted.values.map((v, z) => numCell("others", v, { col: z, role: "omitted" }))));
  out.append(el("div", { class: "card scroll" }, el("table", {}, el("thead", {}, head), el("tbody", {}, rows))));
  return out;
}

function viewPle(view) {
  const node = D.nodes[view.node];
  const panel = node && node.ple && node.ple[String(view.layer)];
  if (!panel) return notPrecomputed(view, `L${view.layer}.ple of ${nodeTitle(view.node)} was not split here.`);
  const s = decode(panel.split);
  const out = el("div", { "data-panel": "ple", "data-node": view.node, "data-layer": view.layer });
  out.append(el("h2", {}, `${s.whole.label}: the per-layer input term, in its two pieces`));
  out.append(el("p", { class: "mute" }, "Gemma 4 adds, after each layer's MLP, a term gated by the layer's own " +
    "slice of the per-layer input: a token-identity piece (its embedding row in the per-layer table) and a piece " +
    "linear in the scaled embedding. With the gelu(gate) and the norm scales frozen the term splits exactly into " +
    "the two."));
  out.append(exactBox(s));
  const scales = D.columns.map((_, z) => maxAbs(s.values.map((r) => r[z])));
  const head = el("tr", {}, el("th", { class: "label" }, "piece"), D.columns.map((c) => el("th", {}, c)));
  const rows = s.labels.map((label, i) => el("tr", { "data-piece": label }, el("td", { class: "label" }, label),
    s.values[i].map((v, z) => numCell(label, v, { col: z, scale: scales[z], role: "piece" }))));
  out.append(el("div", { class: "card scroll" }, el("table", {}, el("thead", {}, head), el("tbody", {}, rows))));
  return out;
}

function viewOf(view) {
  if (view.kind === "residual" && view.masked)
    return el("div", { class: "card", "data-role": "masked" }, el("p", {}, `${lastLabel(view.node)} has attention ` +
      "weight 0 (the source is outside this layer's window): its term and its whole chain are exactly 0."));
  if (view.kind === "residual") return viewResidual(view);
  if (view.kind === "attention") return viewAttention(view);
  if (view.kind === "ple") return viewPle(view);
  return viewMlp(view);
}

// ------------------------------------------------------------------------------------------------ sections

function cellText(v) {
  if (v === null || v === undefined) return "—";
  if (typeof v === "number") return fmt(v);
  if (typeof v === "boolean") return v ? "yes" : "no";
  if (Array.isArray(v) && v.every((x) => typeof x === "number")) return v.map(fmt).join(", ");
  if (typeof v === "string") return v;
  return JSON.stringify(v);
}

function tableOf(rows, keys, role) {
  return el("div", { class: "scroll" }, el("table", { "data-role": role },
    el("thead", {}, el("tr", {}, keys.map((k) => el("th", { class: "label" }, k)))),
    el("tbody", {}, rows.map((r) => el("tr", {}, keys.map((k) => el("td", {
      class: "label", "data-key": k, "data-value": typeof r[k] === "object" ? JSON.stringify(r[k]) : String(r[k]),
    }, cellText(r[k]))))))));
}

function pairs(obj, role) {
  return tableOf(Object.entries(obj).map(([k, v]) => ({ key: k, value: v })), ["key", "value"], role);
}

// A sweep split: the whole, then its components by largest |mean| (SWEEP_ROWS shown; the JSON holds all).
const SWEEP_ROWS = 20;
function sweepSplit(sp, cols) {
  const score = (c) => Math.max(...c.mean.map((m) => Math.abs(m)));
  const rows = sp.components.slice().sort((a, b) => score(b) - score(a)).slice(0, SWEEP_ROWS);
  const head = el("tr", {}, el("th", { class: "label" }, "component"),
    ...cols.flatMap((c) => [el("th", {}, `${c}: mean`), el("th", {}, "95% interval"), el("th", {}, "same sign")]));
  const row = (c, cls) => el("tr", { class: cls || "" }, el("td", { class: "label" }, c.label),
    ...cols.flatMap((_, z) => [
      el("td", { "data-key": "mean", "data-label": c.label, "data-col": z, "data-value": full(c.mean[z]) },
         fmt(c.mean[z])),
      el("td", { "data-key": "ci", "data-label": c.label, "data-col": z, "data-value": JSON.stringify(c.ci[z]) },
         `${fmt(c.ci[z][0])} .. ${fmt(c.ci[z][1])}`),
      el("td", { "data-key": "same_sign", "data-label": c.label, "data-col": z, "data-value": full(c.same_sign[z]) },
         `${(100 * c.same_sign[z]).toFixed(0)}%`)]));
  return el("div", { "data-sweep-split": sp.prism },
    el("h3", {}, `${sp.prism} (whole: ${sp.whole.label || ""})`),
    el("table", { "data-role": "sweep-components" }, el("thead", {}, head),
      el("tbody", {}, row(Object.assign({}, sp.whole, { label: sp.whole.label || "whole" }), "whole"),
        rows.map((c) => row(c)))),
    sp.components.length > SWEEP_ROWS ?
      el("p", { class: "mute" }, `(${sp.components.length - SWEEP_ROWS} more components in the JSON)`) : null);
}

function sections() {
  const out = [];
  const S = D.sections || {};
  if (S.validate) {
    out.push(el("div", { class: "card section", "data-section": "validate" },
      el("h2", {}, "Validation: the prisms' terms against interventions"),
      el("p", { class: "mute" }, "Each component's prism term beside its direct and total effect under " +
         "intervention, and how well the rankings agree."),
      pairs(S.validate.agreement, "agreement"),
      tableOf(S.validate.components, ["label", "prism", "direct", "total", "norm_rescaling", "mediated"],
              "validate-components")));
  }
  if (S.compare) {
    const c = S.compare;
    out.push(el("div", { class: "card section", "data-section": "compare" },
      el("h2", {}, "Comparison with another implementation"),
      pairs({ tokens_match: c.tokens_match, first_divergence: c.first_divergence,
              first_wrong_op: c.first_wrong_op }, "compare-summary"),
      tableOf(c.sites, ["site", "max_abs", "floor", "local_max_abs", "diverges"], "compare-sites"),
      el("h3", {}, "Diagnosis"), tableOf(c.diagnosis, ["variant", "explains"], "compare-diagnosis")));
  }
  if (S.sweep) {
    const w = S.sweep, cols = w.columns || [];
    const meta = w.sweep || {};
    out.push(el("div", { class: "card section", "data-section": "sweep" },
      el("h2", {}, "Sweep: mean terms over the data set, with bootstrap 95% intervals"),
      el("p", { class: "mute" }, `${meta.prompts} prompts of ${(meta.data || {}).file || "the data set"} ` +
         `(${meta.bad_rows || 0} bad rows left out); per component: the mean term, its interval and the share of ` +
         "prompts whose term has the mean's sign. The mean terms decompose the mean whole exactly " +
         `(${w.exact ? "checked: yes" : "NOT within tolerance"}).`),
      ...(w.splits || []).map((sp) => sweepSplit(sp, cols))));
  }
  return out;
}

// ------------------------------------------------------------------------------------------------ the graph

// The attribution graph (refprism.graphs.graph_view, embedded as sections.graph): laid out as circuit-tracer's
// frontend lays it out, x = token position, y = layer (embeddings at the bottom, logits at the top). Every number
// shown is the embedded one, computed in Python; nothing is summed here.
const KIND_FILL = { embed: "#9ae6b4", neuron: "#90cdf4", feature: "#90cdf4", remainder: "#cbd5e0", error: "#cbd5e0",
                    bias: "#e9d8fd", logit: "#fbd38d", expert: "#b2f5ea", ple: "#fed7e2", ple_token: "#c6f6d5" };

function graphRow(G, n) {
  if (n.kind === "embed") return 0;
  if (n.kind === "logit") return G.n_layers + 1;
  return n.layer + 1;
}

function graphLayout(G) {
  const T = G.tokens.length, R = G.n_layers + 2;
  const colW = Math.max(60, Math.min(150, Math.floor(660 / T))), pad = 56, step = 13;
  const perLine = Math.max(1, Math.floor((colW - 10) / step));
  const cells = new Map();  // (row, position) -> node indices, largest influence (logits: weight) first
  G.nodes.forEach((n, i) => {
    const key = `${graphRow(G, n)},${n.position}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(i);
  });
  const size = (n) => (n.kind === "logit" ? n.weight : n.influence);
  const lines = new Array(R).fill(1);
  for (const [key, list] of cells) {
    list.sort((a, b) => size(G.nodes[b]) - size(G.nodes[a]) || a - b);
    const r = +key.split(",")[0];
    lines[r] = Math.max(lines[r], Math.ceil(list.length / perLine));
  }
  const bandH = lines.map((k) => 14 + k * step);
  const H = bandH.reduce((a, b) => a + b, 0) + 30, W = pad + T * colW + 10;
  const top = [];  // the y of each band's top edge, row 0 (embeddings) at the bottom
  let y = H - 30;
  for (let r = 0; r < R; r++) { y -= bandH[r]; top.push(y); }
  const xy = new Array(G.nodes.length);
  for (const [key, list] of cells) {
    const [r, t] = key.split(",").map(Number);
    list.forEach((i, k) => {
      const line = Math.floor(k / perLine), inLine = k % perLine;
      const count = Math.min(perLine, list.length - line * perLine);
      xy[i] = [pad + t * colW + colW / 2 + (inLine - (count - 1) / 2) * step, top[r] + bandH[r] - 10 - line * step];
    });
  }
  const maxInfl = Math.max(1e-300, ...G.nodes.filter((n) => n.kind !== "logit").map((n) => n.influence));
  const maxW = Math.max(1e-300, ...G.nodes.filter((n) => n.kind === "logit").map((n) => n.weight));
  const radius = G.nodes.map((n) => 2.5 + 3.5 * Math.sqrt(n.kind === "logit" ? n.weight / maxW : n.influence / maxInfl));
  return { W, H, pad, colW, top, bandH, xy, radius, R };
}

function nodeTip(n) {
  const parts = [`${n.label} (${n.kind}${n.piece !== null ? ` ${shown(n.piece)}` : ""})`];
  if (n.value !== null) parts.push(`value ${full(n.value)}`);
  if (n.input !== null) parts.push(`input ${full(n.input)}`);
  parts.push(n.kind === "logit" ? `weight ${full(n.weight)}` : `influence ${full(n.influence)}`);
  return parts.join("\n");
}

function graphSvg(G, sel) {
  const lay = graphLayout(G);
  const s = svg("svg", { width: lay.W, height: lay.H, "data-role": "graph-svg" });
  for (let r = 0; r < lay.R; r++) {
    if (r % 2) s.append(svg("rect", { x: lay.pad, y: lay.top[r], width: lay.W - lay.pad - 10, height: lay.bandH[r],
                                      fill: "#f7fafc" }));
    const t = svg("text", { x: 4, y: lay.top[r] + lay.bandH[r] / 2 + 4 });
    t.textContent = r === 0 ? "embed" : r === lay.R - 1 ? "logits" : `L${r - 1}`;
    s.append(t);
  }
  G.tokens.forEach((tok, t) => {
    const label = svg("text", { x: lay.pad + t * lay.colW + 4, y: lay.H - 12 });
    label.textContent = `${t}: ${shown(tok.piece)}`.slice(0, Math.floor(lay.colW / 6.5));
    s.append(label);
  });
  const maxAbsW = Math.max(1e-300, ...G.edges.map((e) => Math.abs(e[2])));
  const near = new Set();
  G.edges.forEach(([i, j, w]) => {
    const [x1, y1] = lay.xy[j], [x2, y2] = lay.xy[i], a = Math.abs(w) / maxAbsW;
    const on = sel === null || i === sel || j === sel;
    if (sel !== null && on) { near.add(i); near.add(j); }
    const path = svg("path", { d: `M${x1},${y1} C${x1},${(y1 + y2) / 2} ${x2},${(y1 + y2) / 2} ${x2},${y2}`,
      fill: "none", stroke: w >= 0 ? "#2b6cb0" : "#c53030", "stroke-width": (0.4 + 3.6 * a).toFixed(2),
      "stroke-opacity": on ? (0.2 + 0.6 * a).toFixed(2) : "0.05", "data-edge": `${i},${j}`,
      "data-value": full(w) });
    const tip = svg("title", {});
    tip.textContent = `${G.nodes[j].label} → ${G.nodes[i].label}: ${full(w)}`;
    path.append(tip);
    s.append(path);
  });
  G.nodes.forEach((n, i) => {
    const [x, y] = lay.xy[i];
    const c = svg("circle", { cx: x, cy: y, r: lay.radius[i].toFixed(2), fill: KIND_FILL[n.kind] || "#e2e8f0",
      stroke: i === sel ? "#1a202c" : (n.value !== null && n.value < 0 ? "#c53030" : "#4a5568"),
      "stroke-width": i === sel ? 2.5 : 1, class: "click", "data-node": i, "data-id": n.id, "data-kind": n.kind,
      "fill-opacity": sel === null || near.has(i) || i === sel ? 1 : 0.35 });
    const tip = svg("title", {});
    tip.textContent = nodeTip(n);
    c.append(tip);
    c.addEventListener("click", () => { state.graphNode = i; draw(); });
    s.append(c);
  });
  return s;
}

function edgeTable(G, list, role, sumRows) {
  const scale = Math.max(...list.top.map((e) => Math.abs(e[1])), 0);
  const rows = list.top.map(([label, v, k]) => el("tr", {},
    el("td", { class: "label" }, k >= 0 ? el("a", { class: "click", "data-goto": k,
      onclick: () => { state.graphNode = k; draw(); } }, label) : el("span", { title: "not among the shown nodes" },
      label)),
    numCell(label, v, { col: 0, role, scale })));
  if (list.others.count) rows.push(el("tr", {}, el("td", { class: "label" }, `(${list.others.count} others, summed)`),
    numCell("others", list.others.sum, { col: 0, role: `${role}-others` })));
  for (const [name, r, v] of sumRows) rows.push(el("tr", { class: "whole" }, el("td", { class: "label" }, name),
    numCell(name, v, { col: 0, role: `${role}-${r}` })));
  return el("table", { "data-role": `${role}-table` }, el("tbody", {}, rows));
}

function graphPanel(G, i) {
  if (i === null || i === undefined) return el("div", { class: "card gpanel", "data-role": "graph-panel" },
    el("p", { class: "mute" }, "Click a node: its exact value, its incoming edges (summing to its input), its " +
      "outgoing edges and its input split by component (the prisms' readout)."));
  const n = G.nodes[i];
  const out = el("div", { class: "card gpanel", "data-role": "graph-panel", "data-node": i, "data-id": n.id });
  out.append(el("h3", {}, `${n.label}${n.piece !== null ? ` (${shown(n.piece)})` : ""}`));
  const facts = [["kind", n.kind, null], ["layer", n.layer, null], ["position", n.position, null]];
  const numbers = [["value", "g-value", n.value], ["input", "g-input", n.input],
                   [n.kind === "logit" ? "weight (seeds the influence)" : "influence", "g-influence",
                    n.kind === "logit" ? n.weight : n.influence]];
  out.append(el("table", {}, el("tbody", {},
    facts.map(([k, v]) => el("tr", {}, el("td", { class: "label" }, k), el("td", { class: "label" }, String(v)))),
    numbers.filter(([, , v]) => v !== null).map(([k, role, v]) => el("tr", {}, el("td", { class: "label" }, k),
      numCell(k, v, { col: 0, role }))))));
  if (n.incoming) {
    out.append(el("h3", {}, `Incoming edges: the top ${n.incoming.top.length} of ${n.incoming.count}`));
    out.append(edgeTable(G, n.incoming, "g-in", [["Σ all incoming (float64)", "sum", n.incoming.sum],
      ["input", "input", n.input], ["residual = input − Σ", "residual", n.incoming.residual]]));
  } else {
    out.append(el("p", { class: "mute" }, "A source: it has no incoming edges."));
  }
  out.append(el("h3", {}, `Outgoing edges: the top ${n.outgoing.top.length} of ${n.outgoing.count}`));
  out.append(n.outgoing.count ? edgeTable(G, n.outgoing, "g-out", [["Σ all outgoing", "sum", n.outgoing.sum]])
    : el("p", { class: "mute" }, "None."));
  if (n.split) {
    const sp = n.split;
    out.append(el("h3", {}, "Its input split by component (residual prism)"));
    out.append(el("p", { class: "legend" }, "The parts of the residual the node reads, at its own position, each " +
      "read by the node's readout with the norm scales frozen. Another exact split of the same input than the edges."));
    const scale = Math.max(...sp.values.map(Math.abs), 0);
    const rows = sp.labels.map((label, k) => el("tr", {}, el("td", { class: "label" }, label),
      numCell(label, sp.values[k], { col: 0, role: "g-split", scale })));
    for (const [name, role, v] of [["whole (the input)", "whole", sp.whole], ["Σ parts (float64)", "sum", sp.sum],
                                   ["residual = whole − Σ", "residual", sp.residual],
                                   ["tolerance", "tolerance", sp.tolerance]])
      rows.push(el("tr", { class: "whole" }, el("td", { class: "label" }, name),
        numCell(name, v, { col: 0, role: `g-split-${role}` })));
    out.append(el("table", { "data-role": "g-split-table" }, el("tbody", {}, rows)));
    out.append(el("div", { "data-role": "g-split-exact", "data-exact": String(sp.exact) },
      sp.exact ? el("span", { class: "ok" }, "exact: yes") : el("span", { class: "warn" }, "exact: NO"),
      el("span", { class: "mute" }, ` — |residual| ≤ tolerance in ${sp.dtype}`)));
  }
  return out;
}

function graphSection(G) {
  const sel = state.graphNode === undefined ? null : state.graphNode;
  const capped = G.shown.nodes < G.pruned.nodes || G.shown.edges < G.pruned.edges;
  return el("div", { class: "card section", "data-section": "graph" },
    el("h2", {}, "Attribution graph"),
    el("p", { class: "mute" }, `${G.basis === "neurons" ? "Neuron" : "Transcoder"} basis, ${G.explored} of ` +
       `${G.neurons} ${G.basis === "neurons" ? "neurons" : "active features"} explored; pruned at node ` +
       `${G.thresholds.node}, edge ${G.thresholds.edge} (circuit-tracer's rule) to ${G.pruned.nodes} nodes and ` +
       `${G.pruned.edges} edges; replacement ${fmt(G.scores.replacement)}, completeness ` +
       `${fmt(G.scores.completeness)}. Edges are direct effects with every norm scale, attention pattern and ` +
       "gelu(gate) factor frozen (the gate and query/key paths are left out)."),
    el("p", { class: capped ? "warn" : "mute", "data-role": "graph-caps" }, `Shown: ${G.shown.nodes} of ` +
       `${G.pruned.nodes} pruned nodes (every logit, then by influence) and ${G.shown.edges} of ${G.pruned.edges} ` +
       `pruned edges (the largest |weight| between shown nodes)${capped ? "; the rest are left out of this page" : ""}` +
       `. Each node lists its top ${G.top} incoming and outgoing edges over the whole graph, the rest summed.`),
    el("p", { class: "legend" }, "x: token position, y: layer (embeddings at the bottom, logits at the top); node " +
       "size: influence on the logits (a logit's: its weight); blue edges add, red take away, width by |weight|. " +
       "Hover for the numbers, click a node for its panel."),
    el("div", { class: "gwrap" }, el("div", { class: "scroll gsvg" }, graphSvg(G, sel)), graphPanel(G, sel)));
}

// ------------------------------------------------------------------------------------------------ the page

function header() {
  const top = D.prediction;
  const pmax = Math.max(...top.map((t) => t.prob));
  const targets = D.targets.map((t) => `${t.piece} #${t.id}`).join(", ");
  const versus = D.versus.length ? `; versus ${D.versus.map((t) => `${t.piece} #${t.id}`).join(", ")}` : "";
  return el("div", {},
    el("h1", {}, "refprism report"),
    el("p", { class: "mute" }, `model ${D.model} · ${D.config.model_type}, ${D.config.n_layers} layers, ` +
       `${D.config.n_heads} heads, ${D.config.d_mlp} neurons per MLP · compute dtype ${D.dtype}`),
    tokens(null),
    el("div", { class: "top" }, el("div", { class: "card" }, el("h3", {}, `Next token after position ${D.position}`),
      el("table", { "data-role": "prediction" }, el("thead", {}, el("tr", {}, el("th", {}, "#"),
        el("th", { class: "label" }, "token"), el("th", {}, "probability"), el("th", {}, "logit"))),
        el("tbody", {}, top.map((t, r) => el("tr", {}, el("td", {}, String(r + 1)),
          el("td", { class: "label", title: `#${t.id}` }, shown(t.piece)),
          el("td", { "data-role": "prob", "data-id": t.id, "data-value": full(t.prob) }, bar(t.prob, pmax),
             el("span", { class: "num" }, t.prob.toFixed(4))),
          el("td", { "data-role": "logit", "data-id": t.id, "data-value": full(t.logit) },
             el("span", { class: "num" }, fmt(t.logit)))))))),
      el("div", { class: "about" },
        el("p", {}, `Targets (the columns): ${targets}${versus}.`),
        el("p", { class: "legend", "data-role": "budget" }, budgetText()),
        el("p", { class: "legend" }, "Every number is refprism's own, embedded in this file (the prisms' JSON " +
           "schema); nothing is fetched. Hover a number for its full precision."))));
}

function draw() {
  const app = document.getElementById("app");
  app.textContent = "";
  app.append(header());
  if (D.sections && D.sections.graph) app.append(graphSection(D.sections.graph));
  app.append(el("div", { class: "cols", "data-role": "columns" }, el("span", { class: "mute" }, "Bars and grids show:"),
    D.columns.map((c, z) => el("button", { class: z === state.col ? "on" : "", "data-col": z,
      onclick: () => { state.col = z; draw(); } }, c))));
  const crumbs = el("nav", { class: "crumbs", "data-role": "crumbs" });
  state.stack.forEach((view, i) => {
    if (i) crumbs.append(el("span", { class: "sep" }, "→"));
    const last = i === state.stack.length - 1;
    crumbs.append(last ? el("span", { class: "here", "data-crumb": i }, crumbLabel(view))
      : el("a", { "data-crumb": i, onclick: () => { state.stack.length = i + 1; draw(); } }, crumbLabel(view)));
  });
  app.append(crumbs);
  app.append(viewOf(state.stack[state.stack.length - 1]));
  for (const s of sections()) app.append(s);
}

window.refprism = { data: D, decode, splitJson, state, draw };
draw();
