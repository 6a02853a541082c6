"""The transcoder basis: files in three formats read to the same arrays, exact row sums, every edge against a forward
with the transcoders spliced in by edits, an independent dense reference of circuit-tracer's conventions, the JSON,
and bad files refused in one line.

circuit-tracer itself is not run here: it pins TransformerLens < 3 and transformers <= 4.57.3, which this
environment does not have (tools/crosscheck_circuit_tracer.py runs it in a venv of its own). Instead
`_dense_reference` recomputes its adjacency (features zero at BOS, the error node = mlp_out - reconstruction,
embeddings, demeaned logits) from the weights and the run's frozen factors alone, by pushing every source's output
vector forward through dense per-layer linear maps (no backward, no refprism forward): an implementation that
shares no code with the graph's.
Tolerances: float64 throughout; 1e-10 of the largest input leaves room for BLAS order, a wrong edge is O(edge) off.
"""

import json

import jsonschema
import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file
from test_graphs_output import SCHEMA

import refprism
from refprism import cli
from refprism.gemma import ops
from refprism.graphs import edge_heads, faithfulness, graph, graph_json
from refprism.graphs.transcoders import read_transcoders

PRESETS = ["tiny-gemma2", "tiny-gemma3"]
F = 40


@pytest.fixture(scope="module")
def models(checkpoint):
    return {p: refprism.load(checkpoint(p), dtype="float64") for p in PRESETS}


def _ids(model, T=7, seed=4):
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, T)


def _weights(cfg, seed=0, skip=True, d_model=None, F=F):
    """Random transcoders, GemmaScope's layout: W_enc [D, F], W_dec [F, D], thresholds about a third active."""
    rng = np.random.default_rng(seed)
    D = d_model or cfg.d_model
    out = []
    for _ in range(cfg.n_layers):
        w = {"W_enc": rng.normal(size=(D, F)) * 3 / np.sqrt(D), "b_enc": rng.normal(size=F) * 0.2,
             "W_dec": rng.normal(size=(F, D)) * 0.3, "b_dec": rng.normal(size=D) * 0.2,
             "threshold": np.abs(rng.normal(size=F)) * 0.4}
        if skip:
            w["W_skip"] = rng.normal(size=(D, D)) * 0.05  # h W_skip (input rows)
        out.append(w)
    return out


def write_gemmascope(folder, weights):
    for l, w in enumerate(weights):
        d = folder / f"layer_{l}" / "width_16k" / "average_l0_50"
        d.mkdir(parents=True)
        np.savez(d / "params.npz", **{k: w[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")})
    return folder


def write_circuit_tracer(folder, weights, *, activation=None, k=None, hook="ln2.hook_normalized"):
    folder.mkdir(parents=True)
    for l, w in enumerate(weights):
        t = {"W_enc": w["W_enc"].T.copy(), "W_dec": w["W_dec"], "b_enc": w["b_enc"], "b_dec": w["b_dec"]}
        if activation is None:
            t["activation_function.threshold"] = w["threshold"]
        if "W_skip" in w:
            t["W_skip"] = w["W_skip"].T.copy()  # torch's [out, in]
        save_file(t, str(folder / f"layer_{l}.safetensors"))
    cfg = {"model_kind": "transcoder_set", "feature_input_hook": hook, "feature_output_hook": "hook_mlp_out"}
    if activation:
        cfg["activation"] = activation
    if k:
        cfg["k"] = k
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    return folder


def write_sae_lens(folder, weights, *, architecture="jumprelu_transcoder", hook="ln2.hook_normalized"):
    for l, w in enumerate(weights):
        d = folder / f"blocks.{l}"
        d.mkdir(parents=True)
        t = {k: w[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
        if architecture == "jumprelu_transcoder":
            t["threshold"] = w["threshold"]
        if architecture == "skip_transcoder":
            t["W_skip"] = w["W_skip"].T.copy()
        save_file(t, str(d / "sae_weights.safetensors"))
        D, Fl = w["W_enc"].shape
        cfg = {"architecture": architecture, "d_in": D, "d_sae": Fl, "d_out": D, "dtype": "float32",
               "normalize_activations": "none", "apply_b_dec_to_input": False,
               "metadata": {"hook_name": f"blocks.{l}.{hook}", "hook_name_out": f"blocks.{l}.hook_mlp_out"}}
        (d / "cfg.json").write_text(json.dumps(cfg))
    return folder


# ------------------------------------------------------------------------------------------------- the files


def test_three_formats_read_to_the_same_arrays(models, tmp_path):
    cfg = models["tiny-gemma2"].config
    w = _weights(cfg)
    gs = read_transcoders(write_gemmascope(tmp_path / "gs", w))
    ct = read_transcoders(write_circuit_tracer(tmp_path / "ct", w))
    sl = read_transcoders(write_sae_lens(tmp_path / "sl", w, architecture="skip_transcoder"))
    pattern = read_transcoders(str(tmp_path / "gs" / "layer_*" / "width_16k" / "*" / "params.npz"))
    for l, x in enumerate(w):  # GemmaScope's safetensors form, and GemmaScope 2's lower-case keys with a skip
        d = tmp_path / "gs-st" / f"layer_{l}"
        d.mkdir(parents=True)
        save_file({k: x[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}, str(d / "params.safetensors"))
        d = tmp_path / "gs2" / f"layer_{l}_width_16k_l0_small"
        d.mkdir(parents=True)
        save_file({"w_enc": x["W_enc"], "w_dec": x["W_dec"], "b_enc": x["b_enc"], "b_dec": x["b_dec"],
                   "threshold": x["threshold"], "affine_skip_connection": x["W_skip"].T.copy()},
                  str(d / "params.safetensors"))
    gs_st, gs2 = read_transcoders(tmp_path / "gs-st"), read_transcoders(tmp_path / "gs2")
    for l in range(cfg.n_layers):
        for ts in (gs_st, gs2):
            np.testing.assert_array_equal(ts.layers[l].W_enc, w[l]["W_enc"])
            np.testing.assert_array_equal(ts.layers[l].threshold, w[l]["threshold"])
        np.testing.assert_array_equal(gs2.layers[l].W_skip, w[l]["W_skip"])
    assert (gs.format, ct.format, sl.format) == ("gemmascope", "circuit-tracer", "sae-lens")
    for ts in (gs, ct, sl, pattern):
        assert ts.input_hook == "normalized" and len(ts.layers) == cfg.n_layers
        for l, tc in enumerate(ts.layers):
            np.testing.assert_array_equal(tc.W_enc, w[l]["W_enc"])
            np.testing.assert_array_equal(tc.W_dec, w[l]["W_dec"])
            np.testing.assert_array_equal(tc.b_dec, w[l]["b_dec"])
    for l in range(cfg.n_layers):
        np.testing.assert_array_equal(ct.layers[l].W_skip, w[l]["W_skip"])
        np.testing.assert_array_equal(sl.layers[l].W_skip, w[l]["W_skip"])
        np.testing.assert_array_equal(ct.layers[l].threshold, w[l]["threshold"])
    assert gs.layers[0].W_skip is None and sl.layers[0].activation == "relu" and ct.layers[0].activation == "jumprelu"
    # the gates as each library's code writes them: circuit-tracer x (x > thr); GemmaScope / SAE Lens relu first
    pre = np.array([[-0.5, 0.1, 0.3, 2.0]])
    thr = np.array([-1.0, 0.2, 0.2, 0.2])
    g_ct, g_gs = ct.layers[0], gs.layers[0]
    g_ct.threshold = g_gs.threshold = thr
    np.testing.assert_array_equal(g_ct.gate(pre), [[1, 0, 1, 1]])
    np.testing.assert_array_equal(g_gs.gate(pre), [[0, 0, 1, 1]])


def _apply(model, rec, l, tc, input_hook, zero_positions=1):
    """One transcoder on a record's values, written out here: c [T, D], h, pre, gate, recon (jumprelu pre > thr (and
    > 0), relu pre > 0, topk the k largest; gate 0 at positions < zero_positions)."""
    x = rec[f"blocks.{l}.resid_mid"]
    s = rec[f"blocks.{l}.ln2.scale"].reshape(len(x), 1)
    c = {"resid_mid": np.ones_like(x), "normalized": np.ones_like(x) / s,
         "ln2.out": np.broadcast_to((1 + model.params.get(l, "ln2")) / s, x.shape)}[input_hook]
    pre = (x * c) @ tc.W_enc + tc.b_enc
    if tc.activation == "topk":
        gate = (pre >= np.sort(pre, axis=1)[:, -tc.k][:, None]) & ((pre > 0) | (not tc.relu))
    elif tc.activation == "relu":
        gate = pre > 0
    else:
        gate = (pre > tc.threshold) & ((pre > 0) | (not tc.relu))
    gate = gate.astype(float)
    gate[:zero_positions] = 0
    recon = (gate * pre) @ tc.W_dec + tc.b_dec + ((x * c) @ tc.W_skip if tc.W_skip is not None else 0)
    return c, x * c, pre, gate, recon


def _edit_reference(model, run, ts, zero_positions=1):
    """Each layer's clean transcoder values, computed here (_apply): c [T, D], pre, gate, err = mlp.out - recon."""
    out = []
    for l, tc in enumerate(ts.layers):
        c, _, pre, gate, recon = _apply(model, run.record, l, tc, ts.input_hook, zero_positions)
        out.append({"c": c, "pre": pre, "gate": gate, "err": run.record[f"blocks.{l}.mlp.out"] - recon})
    return out


def _inputs_with_source_added(g, j, ref, block=None):
    """Every target's input in a forward where each MLP output is replaced by its transcoder's (every feature held
    at its clean value, the skip path live, the clean error added), every norm scale and pattern held, and source
    j's output added once at its site. block=(m, h): head h of layer m held at its clean z as well (the source's
    paths through it cut)."""
    model, run, ts = g.model, g.run, g.transcoders
    cfg, rec = model.config, run.record
    kind, l0, t0, n0 = g.kind[j], int(g.layer[j]), int(g.position[j]), int(g.index[j])
    pres = {}

    def edit(name, value, record):
        site = name.split(".", 2)[-1]
        if name.endswith("scale") or site == "attn.pattern":
            return rec[name].copy()
        if block is not None and name == f"blocks.{block[0]}.attn.z":
            out = value.copy()
            out[:, block[1]] = rec[name][:, block[1]]
            return out
        if name == "embed" and kind == "embed":
            out = value.copy()
            out[t0] *= 2
            return out
        if site == "mlp.out":
            l = int(name.split(".")[1])
            tc, r = ts.layers[l], ref[l]
            h = record[f"blocks.{l}.resid_mid"] * r["c"]
            pre = h @ tc.W_enc + tc.b_enc
            if kind == "bias" and n0 == -3 and l == l0:
                pre[t0] += tc.b_enc
            pres[l] = pre
            a = r["gate"] * r["pre"]  # every feature held (a path through another feature is two edges)
            if kind == "feature" and l == l0:
                a[t0, n0] += r["gate"][t0, n0] * r["pre"][t0, n0]
            out = a @ tc.W_dec + tc.b_dec + r["err"] + (h @ tc.W_skip if tc.W_skip is not None else 0)
            if l == l0 and kind == "error":
                out[t0] += r["err"][t0]
            if l == l0 and kind == "bias" and n0 == -2:
                out[t0] += tc.b_dec
            return out
        return value

    edited = model.run(run.tokens, edit=edit).record
    change = np.zeros(g.n)
    for i in np.flatnonzero(g.kind == "feature"):
        l, t, f = g.layer[i], g.position[i], g.index[i]
        change[i] = pres[l][t, f] - ref[l]["pre"][t, f]
    raw = "logits_uncapped" if cfg.final_softcap is not None else "logits"
    logits = np.flatnonzero(g.kind == "logit")
    new, old = edited[raw][g.read_at], rec[raw][g.read_at]
    change[logits] = (new[g.index[logits]] - new.mean()) - (old[g.index[logits]] - old.mean())
    return change


def _column(g, j):
    col = np.zeros(g.n)
    m = g.cols == j
    col[g.rows[m]] = g.values[m]
    return col


def _pick(g, kind, k, rng, **where):
    m = g.kind == kind
    for key, value in where.items():
        m &= getattr(g, key) == value
    idx = np.flatnonzero(m)
    return list(rng.choice(idx, min(k, len(idx)), replace=False))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("fmt", ["ct-normalized-jumprelu-skip", "sae-lens-mlp-in-skip", "ct-resid-mid-topk"])
def test_every_edge_equals_a_forward_with_the_transcoders_spliced_in(models, preset, fmt, tmp_path):
    model = models[preset]
    w = _weights(model.config, seed=3)
    ts = read_transcoders({
        "ct-normalized-jumprelu-skip": lambda: write_circuit_tracer(tmp_path / "x", w),
        "sae-lens-mlp-in-skip": lambda: write_sae_lens(tmp_path / "x", w, architecture="skip_transcoder",
                                                       hook="mlp.hook_in"),
        "ct-resid-mid-topk": lambda: write_circuit_tracer(tmp_path / "x", w, activation="topk", k=7,
                                                          hook="hook_resid_mid")}[fmt]())
    g = graph(model, _ids(model), transcoders=ts)
    ref = _edit_reference(model, g.run, g.transcoders)
    scale = np.nanmax(np.abs(g.input))
    rng = np.random.default_rng(0)
    sources = (_pick(g, "feature", 5, rng) + _pick(g, "error", 3, rng) + _pick(g, "embed", 2, rng)
               + _pick(g, "bias", 3, rng, index=-2) + _pick(g, "bias", 3, rng, index=-3)
               + _pick(g, "error", 1, rng, position=0))
    reached = set()
    for j in sources:
        col, change = _column(g, j), _inputs_with_source_added(g, j, ref)
        err = np.abs(col - change).max()
        assert err <= 1e-10 * scale, f"{preset} source {g.label(j)}: max |edge - change| {err:.2e}"
        if np.abs(col).max() > 1e-6:
            reached.add(g.label(j).split("@")[0].split(".")[-1] if g.kind[j] in ("bias", "error") else g.kind[j])
    assert reached == {"feature", "err", "embed", "b_dec", "b_enc"}  # every kind of source reaches something
    # the features' values and inputs are the reference's
    f = np.flatnonzero(g.kind == "feature")
    np.testing.assert_allclose(g.input[f], [ref[g.layer[i]]["pre"][g.position[i], g.index[i]] for i in f], rtol=1e-12)
    assert g.counts[0] == int(sum((r["gate"][: g.read_at + 1] * r["pre"][: g.read_at + 1] != 0).sum() for r in ref))
    assert not (g.position[f] == 0).any()  # circuit-tracer's BOS rule


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("fmt", ["gemmascope-jumprelu", "sae-lens-relu", "sae-lens-skip-mlp-in", "ct-topk",
                                 "ct-resid-mid"])
def test_row_sums_are_exact(models, preset, fmt, tmp_path):
    model = models[preset]
    w = _weights(model.config, seed=5)
    path = {"gemmascope-jumprelu": lambda: write_gemmascope(tmp_path / "x", w),
            "sae-lens-relu": lambda: write_sae_lens(tmp_path / "x", w, architecture="transcoder"),
            "sae-lens-skip-mlp-in": lambda: write_sae_lens(tmp_path / "x", w, architecture="skip_transcoder",
                                                           hook="mlp.hook_in"),
            "ct-topk": lambda: write_circuit_tracer(tmp_path / "x", w, activation="topk", k=6),
            "ct-resid-mid": lambda: write_circuit_tracer(tmp_path / "x", w, hook="hook_resid_mid")}[fmt]()
    for kw in ({}, {"max_nodes": 25, "batch_size": 8, "update_interval": 1}):
        g = graph(model, _ids(model, 8, 7), transcoders=path, **kw)
        targets = np.flatnonzero(~np.isnan(g.input))
        err = np.abs(g.row_sums()[targets] - g.input[targets]).max()
        assert err <= 1e-10 * np.abs(g.input[targets]).max(), (fmt, kw, err)
        assert not np.isin(np.flatnonzero(np.isnan(g.input)), g.rows).any()  # sources take no edges
        if fmt == "ct-topk":
            f = g.kind == "feature"
            per = np.bincount(g.layer[f] * 100 + g.position[f])
            assert per.max() <= 6
        if kw:
            assert g.explored == 25 and g.counts[1] > g.counts[2] // 2  # remainders beside the errors
    assert g.basis == "transcoders"


# ------------------------------------------------------------------------------------------------- the reference


def _dense_reference(model, run, ts, p, logit_ids):
    """circuit-tracer's adjacency for features, errors, tokens and logits, from weights and frozen factors only.

    Every source's output vector is placed at its site (mlp.out of its layer, or the embedding) and pushed up by
    the frozen linear map of each later sublayer: attention x -> post1(sum_h pattern_h (x c1) W_V W_O), the
    replaced MLP x -> h W_skip (its features are nodes); the target reads it: W_enc[:, f] c (features) or the
    demeaned unembedding through the frozen final norm (logits).
    Shapes: -> {(target, source) labels: value}
    """
    cfg, rec, params = model.config, run.record, model.params
    T, D, L = p + 1, cfg.d_model, cfg.n_layers
    kv = ops.kv_index(cfg.n_heads, cfg.n_kv_heads)
    ref = _edit_reference(model, run, ts)

    def attn(l, x):  # [n, T, D] -> [n, T, D]
        b = f"blocks.{l}."
        c1 = (1 + params.get(l, "ln1")) / rec[b + "ln1.scale"][:T].reshape(T, 1)
        v = np.einsum("ntd,dkh->ntkh", x * c1, params.get(l, "W_V"))[:, :, kv]  # [n, T, N, H]
        z = np.einsum("hts,nshe->nthe", rec[b + "attn.pattern"][:, :T, :T], v)
        o = np.einsum("nthe,hed->ntd", z, params.get(l, "W_O"))
        if cfg.post_norms:
            o = o * (1 + params.get(l, "ln1_post")) / rec[b + "ln1_post.scale"][:T].reshape(T, 1)
        return o

    def up_to(x, start, stop):
        """x at resid_post of layer start-1 (start = 0: the embeddings) -> resid_mid of layer stop (L: final)."""
        for l in range(start, min(stop + 1, L)):
            x = x + attn(l, x)
            if l == stop:
                return x
            if ts.layers[l].W_skip is not None:
                x = x + (x * ref[l]["c"][:T]) @ ts.layers[l].W_skip
        return x

    sources = []  # (label, the first layer above its site, [T, D] vector)
    for t in range(T):
        e = np.zeros((T, D))
        e[t] = rec["embed"][t]
        sources.append((f"E@{t}", 0, e))
    for l, r in enumerate(ref):
        for t in range(1, T):  # circuit-tracer: features and errors at BOS are zero
            for f in np.flatnonzero(r["gate"][t] * r["pre"][t]):
                e = np.zeros((T, D))
                e[t] = r["gate"][t, f] * r["pre"][t, f] * ts.layers[l].W_dec[f]
                sources.append((f"L{l}F{f}@{t}", l + 1, e))
            e = np.zeros((T, D))
            e[t] = r["err"][t]
            sources.append((f"L{l}.err@{t}", l + 1, e))
    out = {}
    mean = params.embed_rows(np.arange(cfg.vocab_size)).mean(axis=0)
    for label, start, x in sources:
        for stop in range(start, L + 1):
            y = up_to(x[None], start, stop)[0]
            if stop == L:
                xf = y[p]
                scale = (1 + params.ln_final) / rec["ln_final.scale"][p]
                for tok in logit_ids:
                    out[(f"logit{tok}", label)] = float(((params.embed_rows([tok])[0] - mean) * scale) @ xf)
                continue
            r = ref[stop]
            for t in range(1, T):
                for f in np.flatnonzero(r["gate"][t] * r["pre"][t]):
                    out[(f"L{stop}F{f}@{t}", label)] = float((ts.layers[stop].W_enc[:, f] * r["c"][t]) @ y[t])
    return out


def test_against_a_dense_reference_of_circuit_tracers_conventions(models, tmp_path):
    model = models["tiny-gemma2"]
    ts = read_transcoders(write_circuit_tracer(tmp_path / "ct", _weights(model.config, seed=8)))
    g = graph(model, _ids(model, 5, 2), transcoders=ts)
    logits = np.flatnonzero(g.kind == "logit")
    want = _dense_reference(model, g.run, g.transcoders, g.read_at, [int(i) for i in g.index[logits]])
    names = [g.label(i) if g.kind[i] != "logit" else f"logit{g.index[i]}" for i in range(g.n)]
    got = {(names[i], names[j]): v for i, j, v in zip(g.rows, g.cols, g.values)}
    scale = np.nanmax(np.abs(g.input))
    keys = set(want)
    assert len(keys) > 2000
    worst = max(abs(got.get(k, 0.0) - want[k]) for k in keys)
    assert worst <= 1e-10 * scale, worst
    # what circuit-tracer's rows leave out, refprism has as nodes: the biases and the error at BOS
    extra = {k: v for k, v in got.items() if k not in keys}
    kinds = {k[1].split(".")[-1].split("@")[0] for k in extra if abs(extra[k]) > 0}
    assert kinds <= {"b_dec", "b_enc", "err"}
    assert all(k[1].endswith("@0") for k in extra if ".err@" in k[1])


# ------------------------------------------------------------------------------------------------- edges per head


@pytest.mark.parametrize("preset", PRESETS)
def test_edge_heads_of_a_transcoder_graph_sum_to_the_edge_and_cut_what_a_blocked_head_cuts(models, preset, tmp_path):
    """Every kind of source and target: skip + sum_h heads[h] = the edge, the [N, S] terms sum to heads, and each
    head's part is what the spliced forward loses when that head is held at its clean z (its paths cut)."""
    model = models[preset]
    cfg = model.config
    L = cfg.n_layers
    ts = read_transcoders(write_circuit_tracer(tmp_path / "ct", _weights(cfg, seed=3)))  # with W_skip
    g = graph(model, _ids(model), transcoders=ts)
    ref = _edit_reference(model, g.run, g.transcoders)
    scale = np.nanmax(np.abs(g.input))
    rng = np.random.default_rng(1)
    logit = int(np.flatnonzero(g.kind == "logit")[0])
    top = _pick(g, "feature", 1, rng, layer=L - 1)
    sources = (_pick(g, "feature", 2, rng, layer=0) + _pick(g, "error", 1, rng, layer=0) + _pick(g, "embed", 1, rng)
               + _pick(g, "bias", 1, rng, layer=0, index=-2))
    checked = 0
    for target in [logit] + top:
        for j in sources:
            edge = _column(g, j)[target]
            for m in range(int(g.layer[j]) + 1, min(int(g.layer[target]), L - 1) + 1):
                skip, heads = edge_heads(g, target, j, m)
                assert abs(skip + heads.sum() - edge) <= 1e-10 * scale, (g.label(target), g.label(j), m)
                _, terms = edge_heads(g, target, j, m, by_source=True)
                assert terms.shape == (cfg.n_heads, g.read_at + 1)
                np.testing.assert_allclose(terms.sum(axis=1), heads, rtol=0, atol=1e-12 * scale)
                h = int(np.argmax(np.abs(heads)))
                blocked = _inputs_with_source_added(g, j, ref, block=(m, h))[target]
                assert abs((edge - blocked) - heads[h]) <= 1e-10 * scale, (g.label(target), g.label(j), m, h)
                checked += np.abs(heads[h]) > 1e-6
    assert checked >= 5
    # a remainder source of an explored graph: the parts still sum to its edge
    g2 = graph(model, _ids(model), transcoders=ts, max_nodes=20, batch_size=8, update_interval=1)
    rem = int(np.flatnonzero((g2.kind == "remainder") & (g2.layer == 0))[0])
    logit2 = int(np.flatnonzero(g2.kind == "logit")[0])
    skip, heads = edge_heads(g2, logit2, rem, 1)
    assert abs(skip + heads.sum() - _column(g2, rem)[logit2]) <= 1e-10 * np.nanmax(np.abs(g2.input))
    enc = int(np.flatnonzero((g.kind == "bias") & (g.index == -3))[0])
    with pytest.raises(refprism.InputError, match="no path"):  # b_enc feeds its own layer's features directly
        edge_heads(g, logit, enc, 1)
    with pytest.raises(refprism.InputError, match="a feature or logit target"):
        edge_heads(g, sources[1], logit, 1)


# ------------------------------------------------------------------------------------------------- faithfulness


def _replacement_readout(g, ref, fills):
    """The logit nodes' demeaned pre-cap readouts of the replacement model written out here: every mlp.out replaced
    by its transcoder's output on the live values (_apply: norm scales, patterns, gates live), the clean error
    added, the features in fills {(l, t, f): value} set to value. A full forward, no resume."""
    model, ts = g.model, g.transcoders

    def edit(name, value, record):
        if not name.endswith(".mlp.out"):
            return value
        l = int(name.split(".")[1])
        tc = ts.layers[l]
        _, h, pre, gate, _ = _apply(model, record, l, tc, ts.input_hook)
        a = gate * pre
        for (m, t, f), v in fills.items():
            if m == l:
                a[t, f] = v
        return a @ tc.W_dec + tc.b_dec + ref[l]["err"] + (h @ tc.W_skip if tc.W_skip is not None else 0)

    raw = model.run(g.run.tokens, edit=edit).record["logits_uncapped"][g.read_at]
    return raw[g.index[g.kind == "logit"]] - raw.mean()


def test_faithfulness_of_a_transcoder_graph_is_the_replacement_model_with_features_ablated(models, tmp_path):
    from refprism.graphs import Pruned

    model = models["tiny-gemma2"]
    ts = read_transcoders(write_circuit_tracer(tmp_path / "ct", _weights(model.config, seed=3)))
    g = graph(model, _ids(model), transcoders=ts)
    ref = _edit_reference(model, g.run, g.transcoders)
    T = g.read_at + 1
    mean = {l: (r["gate"] * r["pre"])[1:].mean(axis=0) for l, r in enumerate(ref)}  # positions 1 .. T-1
    active = {(l, t, f) for l, r in enumerate(ref) for t, f in zip(*np.nonzero((r["gate"] * r["pre"])[:T]))}
    feats = np.flatnonzero(g.kind == "feature")
    assert active == {(g.layer[i], g.position[i], g.index[i]) for i in feats}
    clean = _replacement_readout(g, ref, {})
    raw = g.run.record["logits_uncapped"][g.read_at]
    np.testing.assert_allclose(clean, raw[g.index[g.kind == "logit"]] - raw.mean(), rtol=1e-12)  # err's definition
    pr = g.pruned()
    w = g.logit_weights
    everything = Pruned(np.ones(g.n, bool), np.ones(len(g.values), bool), pr.cumulative, pr.influence)
    # feature j, the one of the largest |act| . |edge to the top logit|: ablated alone
    j = int(feats[np.argmax(np.abs(_column(g, int(np.flatnonzero(g.kind == "logit")[0]))[feats]))])
    lj, tj, fj = int(g.layer[j]), int(g.position[j]), int(g.index[j])
    but_j = everything.node_mask.copy()
    but_j[j] = False
    one = Pruned(but_j, everything.edge_mask, pr.cumulative, pr.influence)
    changes = {}
    for ablation in ("zero", "mean"):
        fill = (lambda l, f: 0.0) if ablation == "zero" else (lambda l, f: mean[l][f])
        none = _replacement_readout(g, ref, {k: fill(k[0], k[2]) for k in active})
        f = faithfulness(g, pruned=pr, ablation=ablation)
        outside = {(g.layer[i], g.position[i], g.index[i]) for i in feats if not pr.node_mask[i]}
        kept = _replacement_readout(g, ref, {k: fill(k[0], k[2]) for k in outside})
        scale = np.abs(clean).max()
        np.testing.assert_allclose(f["clean"], clean, rtol=0, atol=1e-10 * scale)
        np.testing.assert_allclose(f["kept"], kept, rtol=0, atol=1e-10 * scale)
        np.testing.assert_allclose(f["none"], none, rtol=0, atol=1e-10 * scale)
        assert f["recovered"] == pytest.approx(w @ (kept - none) / (w @ (clean - none)), rel=1e-9)
        assert f["ablated_features"] == len(outside) > 0 and f["kept_features"] == len(active) - len(outside)
        assert (f["replacement"], f["completeness"]) == g.scores() and f["replacement"] < 1
        assert f["held_errors"] == int((g.kind == "error").sum())
        assert f["held_errors_outside"] == int(((g.kind == "error") & ~pr.node_mask).sum())
        # every node kept: the replacement forward is the clean forward, whatever the ablation
        f_all = faithfulness(g, pruned=everything, ablation=ablation)
        assert f_all["recovered"] == pytest.approx(1.0, abs=1e-10) and f_all["ablated_features"] == 0
        np.testing.assert_allclose(f_all["kept"], clean, rtol=0, atol=1e-10 * scale)
        # one feature ablated: the readout changes by what a direct forward edit of that feature computes
        f_one = faithfulness(g, pruned=one, ablation=ablation)
        direct = _replacement_readout(g, ref, {(lj, tj, fj): fill(lj, fj)})
        np.testing.assert_allclose(np.array(f_one["kept"]) - clean, direct - clean, rtol=0, atol=1e-10 * scale)
        assert f_one["ablated_features"] == 1 and np.abs(direct - clean).max() > 1e-4 * scale
        changes[ablation] = np.array(f_one["kept"]) - clean
    # zero sets act_j to 0, mean to mean_j (this prompt's positions 1 .. T-1, computed above): each matched its own
    # direct edit, and the two are different changes (mean_j is neither 0 nor act_j here)
    a = ref[lj]["gate"][tj, fj] * ref[lj]["pre"][tj, fj]
    apart = np.abs(changes["zero"] - changes["mean"]).max()
    assert 0 != mean[lj][fj] != a and apart > 1e-3 * np.abs(changes["zero"]).max()


# ------------------------------------------------------------------------------------------------- outputs


def test_json_ids_of_a_transcoder_graph(models, tmp_path):
    model = models["tiny-gemma3"]
    L = model.config.n_layers
    g = graph(model, _ids(model), transcoders=write_gemmascope(tmp_path / "gs", _weights(model.config, skip=False)))
    doc = json.loads(json.dumps(graph_json(g, slug="t", node_threshold=0.9, edge_threshold=0.99)))
    jsonschema.validate(doc, SCHEMA)
    types = {n["feature_type"] for n in doc["nodes"]}
    assert {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"} <= types
    label = {g.label(i): i for i in range(g.n)}
    for n in doc["nodes"]:
        a, b, c = n["node_id"].split("_")
        if n["feature_type"] == "cross layer transcoder":
            i = label[f"L{a}F{b}@{c}"]
            assert n["activation"] == pytest.approx(g.activation[i]) and int(c) == n["ctx_idx"] and int(a) < L
        elif n["feature_type"] == "mlp reconstruction error":
            assert b == "-1" and f"L{a}.err@{c}" in label
        elif n["feature_type"] == "bias":
            assert b in ("-2", "-3")
    assert doc["metadata"]["info"]["basis"] == "transcoders"
    assert len(doc["metadata"]["transcoder_list"]) == L
    assert doc["metadata"]["info"]["max_row_sum_error"] <= 1e-10 * np.nanmax(np.abs(g.input))


def test_cli_graph_with_transcoders(checkpoint, tmp_path, capsys, monkeypatch):
    model = refprism.load(checkpoint("tiny-gemma2"))
    folder = write_sae_lens(tmp_path / "sl", _weights(model.config, skip=False))
    out = tmp_path / "g.json"
    assert cli.main(["graph", "--ids", "2 17 33 5 9", "--model", str(checkpoint("tiny-gemma2")), "--out", str(out),
                     "--transcoders", str(folder), "--check", "mean"]) == 0
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, SCHEMA)
    printed = capsys.readouterr().out
    assert "active features explored" in printed and "other active features" in printed and "recovered" in printed
    faith = doc["metadata"]["info"]["faithfulness"]
    assert faith["ablation"] == "mean" and faith["held_errors"] == 3 * 5 and 0 < faith["ablated_features"]
    reads = []
    load_weights = refprism.Model.load_weights
    monkeypatch.setattr(refprism.Model, "load_weights", lambda self: (reads.append(1), load_weights(self))[1])
    assert cli.main(["graph", "--ids", "2 17 33", "--model", str(checkpoint("tiny-gemma2")), "--out",
                     str(tmp_path / "h.json"), "--transcoders", str(folder)]) == 0
    assert reads  # the watch above sees a load: a refusal without one came before it
    assert doc["metadata"]["info"]["transcoders"]["format"] == "sae-lens"


def _bad(tmp_path, cfg, case):
    w = _weights(cfg, skip=False)
    if case == "d_model":
        return write_gemmascope(tmp_path / "x", _weights(cfg, d_model=cfg.d_model + 2, skip=False))
    if case == "layers":
        return write_gemmascope(tmp_path / "x", w[:-1])
    if case == "gap":
        folder = write_gemmascope(tmp_path / "x", w)
        (folder / "layer_0" / "width_16k" / "average_l0_50" / "params.npz").unlink()
        return folder
    if case == "hook":
        return write_sae_lens(tmp_path / "x", w, hook="hook_attn_out")
    if case == "shape":
        w[1]["b_dec"] = w[1]["b_dec"][:-1]
        return write_circuit_tracer(tmp_path / "x", w)
    if case == "pickle":
        folder = write_gemmascope(tmp_path / "x", w)
        np.savez(folder / "layer_0" / "width_16k" / "average_l0_50" / "params.npz",
                 W_enc=np.array([{"a": 1}], dtype=object))
        return folder
    if case == "double":
        folder = write_gemmascope(tmp_path / "x", w)
        d = folder / "layer_1" / "width_65k" / "average_l0_9"
        d.mkdir(parents=True)
        np.savez(d / "params.npz", **{k: w[1][k] for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")})
        return folder
    if case == "sae":
        folder = write_sae_lens(tmp_path / "x", w)
        for l in range(cfg.n_layers):
            c = json.loads((folder / f"blocks.{l}" / "cfg.json").read_text())
            del c["metadata"]["hook_name_out"]
            (folder / f"blocks.{l}" / "cfg.json").write_text(json.dumps(c))
        return folder
    return tmp_path / "nothing-here"


@pytest.mark.parametrize("case, message", [
    ("d_model", "d_model"), ("layers", "layers for a model of"), ("gap", "no transcoder for layer 0"),
    ("hook", "unknown input hook 'hook_attn_out'"), ("shape", "b_dec has shape"), ("pickle", "cannot be read"),
    ("double", "two files for layer 1"), ("sae", "no hook_name_out"), ("missing", "no such file"),
])
def test_bad_transcoders_are_refused_in_one_line_before_the_weights(checkpoint, tmp_path, capsys, monkeypatch, case,
                                                                   message):
    cfg = refprism.load(checkpoint("tiny-gemma2")).config
    path = _bad(tmp_path, cfg, case)
    reads = []
    load_weights = refprism.Model.load_weights
    monkeypatch.setattr(refprism.Model, "load_weights", lambda self: (reads.append(1), load_weights(self))[1])
    code = cli.main(["graph", "--ids", "2 17 33", "--model", str(checkpoint("tiny-gemma2")), "--out",
                     str(tmp_path / "g.json"), "--transcoders", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "g.json").exists() and not reads  # refused before the weights were read
    monkeypatch.undo()
    with pytest.raises(refprism.RefprismError, match=message.split("'")[0]):
        graph(refprism.load(checkpoint("tiny-gemma2"), dtype="float64"), [2, 17, 33], transcoders=path)


def test_a_folder_is_walked_to_a_bounded_depth_and_size(models, tmp_path, monkeypatch):
    """`--transcoders /` must not walk the whole disk: deeper than WALK_DEPTH is not searched, and a folder with more
    than WALK_ENTRIES entries is refused in one line (both bounds lowered here, so the test stays small)."""
    from refprism.graphs import transcoders as tc

    cfg = models["tiny-gemma2"].config
    folder = write_gemmascope(tmp_path / "gs", _weights(cfg, skip=False))  # layer_l/width_16k/average_l0_50/params
    assert len(tc.read_transcoders(folder).layers) == cfg.n_layers  # depth 3: found
    monkeypatch.setattr(tc, "WALK_DEPTH", 2)
    with pytest.raises(refprism.RefprismError, match="no .npz, .safetensors or cfg.json under the folder"):
        tc.read_transcoders(folder)
    monkeypatch.setattr(tc, "WALK_DEPTH", 4)
    monkeypatch.setattr(tc, "WALK_ENTRIES", 2 * cfg.n_layers)  # each layer's folder holds three more entries
    with pytest.raises(refprism.RefprismError, match=f"over {2 * cfg.n_layers} entries under the folder") as e:
        tc.read_transcoders(folder)
    assert "\n" not in str(e.value)


def test_a_tiny_byte_budget_gives_the_same_transcoder_graph(models, tmp_path, monkeypatch):
    """ROWS_BYTES = 1 (one row per pass, each truncated to its position) against one pass per layer: the same
    features, errors, biases and entries."""
    from refprism.graphs import build

    model = models["tiny-gemma2"]
    ts = read_transcoders(write_gemmascope(tmp_path / "gs", _weights(model.config, seed=2)))
    kw = {"max_nodes": 25, "batch_size": 512, "update_interval": 1}
    one = graph(model, _ids(model, 8, 3), transcoders=ts, **kw)
    monkeypatch.setattr(build, "ROWS_BYTES", 1)
    many = graph(model, _ids(model, 8, 3), transcoders=ts, **kw)
    assert many.batch_rows == 1 and many.passes > 5 * one.passes
    for key in ("kind", "layer", "index", "position", "rows", "cols"):
        np.testing.assert_array_equal(getattr(many, key), getattr(one, key), err_msg=key)
    np.testing.assert_allclose(many.values, one.values, rtol=0, atol=1e-12 * np.abs(one.values).max())


def test_two_threads_give_the_same_transcoder_graph_bit_for_bit(models, tmp_path):
    """threads=2: the same features, errors, biases and entries, every value to the bit."""
    model = models["tiny-gemma2"]
    ts = read_transcoders(write_gemmascope(tmp_path / "gs", _weights(model.config, seed=2)))
    kw = {"max_nodes": 25, "batch_size": 4, "update_interval": 1, "transcoders": ts}
    one = graph(model, _ids(model, 8, 3), **kw)
    two = graph(model, _ids(model, 8, 3), threads=2, **kw)
    assert one.passes > 10 and one.passes == two.passes
    for key in ("kind", "layer", "index", "position", "activation", "input", "rows", "cols", "values"):
        np.testing.assert_array_equal(getattr(two, key), getattr(one, key), err_msg=key)
