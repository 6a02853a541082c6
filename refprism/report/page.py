"""The report page: what it embeds, how it is encoded and rendered; the package docstring (refprism.report)
says what a node is and what each depth holds.
"""

from __future__ import annotations

import base64
import html
import json
import re
import shlex
from importlib import resources
from pathlib import Path

import numpy as np

from refprism import prisms as P
from refprism.errors import InputError
from refprism.files import atomic_write

FORMAT = 1  # the page's data format; bump when encode_split changes
GRAPH_FORMAT = 1  # the graph view's format the page draws (graphs.view.FORMAT, which arrives as JSON)
NEXT_TOKENS = 10  # the top next tokens listed with their probabilities
SHARED = ("model", "dtype", "tokens", "targets", "versus", "columns")  # Split.to_json fields stored once per page

# The keys each optional section's renderer reads (the issues' stated shapes); a file lacking one is refused.
SECTION_KEYS = {
    "validate": {"top": ("components", "agreement"),
                 "components": ("label", "prism", "direct", "total", "norm_rescaling", "mediated"),
                 "agreement": ("spearman", "kendall", "sign_agreement", "top_k_precision", "top_k_recall")},
    "compare": {"top": ("tokens_match", "sites", "first_divergence", "first_wrong_op", "diagnosis"),
                "sites": ("site", "max_abs", "floor", "local_max_abs", "diverges"),
                "diagnosis": ("variant", "explains")},
    "sweep": {"top": ("sweep", "columns", "splits"),
              "splits": ("prism", "whole", "components"),
              "splits.components": ("label", "mean", "ci", "same_sign")},
    "graph": {"top": ("format", "model", "tokens", "position", "n_layers", "scores", "pruned", "shown", "top",
                      "nodes", "edges"),
              "nodes": ("id", "label", "kind", "layer", "position", "value", "input", "influence", "weight",
                        "incoming", "outgoing", "split")},
}


# ------------------------------------------------------------------------------------------------- the encoding


def _packed(a, dtype) -> str:
    """An array of the compute dtype as base64 of its little-endian bytes, row-major: bit-exact, ~5.3 characters
    per float32 where the shortest decimal text takes ~13 (the page for gemma-2b stays under 3 MB)."""
    a = np.asarray(a)
    if a.dtype != dtype:
        raise ValueError(f"an array of {a.dtype} where the compute dtype {dtype} was expected")
    return base64.b64encode(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()).decode("ascii")


def _unpacked(text: str, dtype, z: int) -> list[list[float]]:
    flat = np.frombuffer(base64.b64decode(text), dtype=np.dtype(dtype).newbyteorder("<"))
    return [[float(x) for x in flat[i: i + z]] for i in range(0, len(flat), z)]


def residual_labels(site: int) -> list[str]:
    """The labels of the residual parts at a site (prisms.residual_parts): embed, L0.attn, L0.mlp, ..."""
    return ["embed"] + [f"L{i // 2}.{'mlp' if i % 2 else 'attn'}" for i in range(site)]


def attention_labels(layer: int, n_heads: int, n_sources: int) -> list[str]:
    return [f"L{layer}H{h}.src{s}" for h in range(n_heads) for s in range(n_sources)]


def _layer_of(label: str) -> int:
    """'L12.attn', 'L12H2.src5', 'L12N1021' -> 12."""
    digits = label[1:]
    return int(digits[: len(digits) - len(digits.lstrip("0123456789"))])


def encode_split(split, keep=None) -> dict:
    """A Split as stored in the page: Split.to_json() without the page-wide fields (SHARED), compactly.

    - components are two parallel lists, "labels" and "values" ([C][Z]); "labels" is left out where it is the
      canonical list (a residual/chain split's residual_labels(site), an attention split's attention_labels);
    - `keep` (indices, in the order to show) embeds only those components; the rest are summed (in float64) into
      "omitted": {"count", "values"}; whole, residual, tolerance and exact stay those of the full split;
    - the site is its index ("site": 2l or 2l+1 or 2L);
    - arrays are `_packed` (base64 of the little-endian bytes): whole, values and extras in the compute dtype,
      residual and tolerance in float64 (as Split computes them); the omitted row is float64 JSON numbers.
    decode_split inverts it.
    """
    dtype = np.dtype(split.values.dtype)
    r = split.readout
    cfg = r.model.config
    idx = range(len(split.labels)) if keep is None else list(keep)
    labels = [split.labels[i] for i in idx]
    enc = {"prism": split.prism, "position": int(r.position), "site": int(r.site), "path": list(r.path),
           "whole": {"label": split.whole_label, "values": _packed(split.whole, dtype)},
           "values": _packed(split.values[list(idx)], dtype)}
    if keep is None and labels == _canonical(split.prism, r.site, split.labels, cfg.n_heads):
        pass  # the decoder rebuilds them
    else:
        enc["labels"] = labels
    if keep is not None:
        rest = np.ones(len(split.labels), dtype=bool)
        rest[list(idx)] = False
        enc["omitted"] = {"count": int(rest.sum()),
                          "values": [float(x) for x in split.values[rest].astype(np.float64).sum(axis=0)]}
    if split.decomposes:  # float64, as Split.to_json() holds them (without converting every component to JSON)
        enc["residual"] = _packed(split.residual, np.float64)
        enc["tolerance"] = _packed(split.tolerance, np.float64)
        enc["exact"] = split.exact
    else:
        enc["residual"] = enc["tolerance"] = enc["exact"] = None
    if split.extras:
        enc["extras"] = {k: {"labels": list(v["labels"]), "values": _packed(v["values"], dtype)}
                         for k, v in split.extras.items()}
    return enc


def _canonical(prism, site, labels, n_heads):
    if prism in ("residual", "chain"):
        return residual_labels(site)
    if prism == "attention" and labels:
        layer = _layer_of(labels[0])
        return attention_labels(layer, n_heads, len(labels) // n_heads)
    return None


def decode_split(enc: dict, page: dict) -> dict:
    """The Split.to_json() of an embedded split (page = the page's data, for the shared fields and the config).

    Values come back as exactly the floats Split.to_json() holds. A split stored with `keep` has only the kept
    components and keeps its "omitted" row.
    """
    dtype, z = page["dtype"], len(page["columns"])
    cfg = page["config"]
    labels = enc.get("labels")
    if labels is None:
        if enc["prism"] in ("residual", "chain"):
            labels = residual_labels(enc["site"])
        else:
            labels = attention_labels(_layer_of(enc["whole"]["label"].split("/")[-1]), cfg["n_heads"],
                                      enc["position"] + 1)
    out = {"prism": enc["prism"], "model": page["model"], "dtype": page["dtype"], "tokens": page["tokens"],
           "position": enc["position"], "site": P.site_name(enc["site"], cfg["n_layers"]), "path": enc["path"],
           "targets": page["targets"], "versus": page["versus"], "columns": page["columns"],
           "whole": {"label": enc["whole"]["label"], "values": _unpacked(enc["whole"]["values"], dtype, z)[0]},
           "components": [{"label": l, "values": v} for l, v in zip(labels, _unpacked(enc["values"], dtype, z))],
           "residual": None if enc["residual"] is None else _unpacked(enc["residual"], np.float64, z)[0],
           "tolerance": None if enc["tolerance"] is None else _unpacked(enc["tolerance"], np.float64, z)[0],
           "exact": enc["exact"],
           "extras": {k: {"labels": v["labels"], "values": _unpacked(v["values"], dtype, z)}
                      for k, v in enc.get("extras", {}).items()}}
    if "omitted" in enc:
        out["omitted"] = enc["omitted"]
    return out


# ------------------------------------------------------------------------------------------------- the tree


def node_key(path) -> str:
    """A node's key in the page: its path joined by '/' ('' for the logits)."""
    return "/".join(path)


def pull_back(readout, path) -> P.Readout:
    """The readout of a node: `readout` pulled back along path labels (L{l}H{h}.src{s} through a head at a source,
    L{l}N{n} through a neuron), as the page's chains were made."""
    for label in path:
        head = re.fullmatch(r"L(\d+)H(\d+)\.src(\d+)", label)
        neuron = re.fullmatch(r"L(\d+)N(\d+)", label)
        if head:
            readout = P.through_head(readout, *map(int, head.groups()))
        elif neuron:
            readout = P.through_neuron(readout, *map(int, neuron.groups()))
        else:
            raise InputError(f"{label!r} is not a step (L12H2.src5 or L3N1021)")
    return readout


def _children_of_attention(split, pattern, chosen) -> list[tuple[int, int]]:
    """(head, source) of the chosen components whose attention weight is nonzero."""
    S = pattern.shape[1]
    return [(i // S, i % S) for i in chosen if pattern[i // S, i % S] != 0]


def build_data(model, run, targets, *, position=-1, versus=(), depth=2, top=50, branch=2, sections=None) -> dict:
    """Everything the page shows, as one JSON-able dict (see the module docstring for what is embedded).

    Keys: format, the Split fields shared by every split (model, dtype, tokens, targets, versus, columns), position,
    config (n_layers, n_heads, n_kv_heads, d_mlp, model_type, final_softcap), prediction (the top next tokens: id,
    piece, logit, prob), budget (depth, top, branch), command (the arguments that make `refprism chain` compute the
    same readout), nodes (node_key -> {"path", "depth", "residual", "attention": {layer: {"split", "pattern"}},
    "mlp": {layer: {"split"}}, and on Gemma 4 "ple": {layer: {"split"}}}) and sections (validate, compare, sweep:
    their JSON as given).
    """
    check_budget(depth, top, branch)
    readout = P.logits_readout(model, run, targets, position=position, versus=versus)
    cfg, p = model.config, readout.position
    logits = run.logits[p].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    best = np.argsort(-logits, kind="stable")[:NEXT_TOKENS]
    root = P.residual_prism(readout).to_json()
    data = {"format": FORMAT, **{k: root[k] for k in SHARED}, "position": p,
            "config": {"n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
                       "d_mlp": cfg.d_mlp, "model_type": cfg.model_type, "final_softcap": cfg.final_softcap},
            "prediction": [{"id": int(i), "piece": model.piece(i), "logit": float(run.logits[p, i]),
                            "prob": float(probs[i])} for i in best],
            "budget": {"depth": depth, "top": top, "branch": branch},
            "command": _command(model, run, readout),
            "nodes": {}, "sections": {k: _json_safe(v) for k, v in (sections or {}).items()}}
    _expand(data, readout, 0, depth=depth, top=top, branch=branch)
    return data


def _json_safe(value):
    """A section's JSON with NaN and infinities (which Python's json reads, but JSON cannot carry) as the strings
    "NaN", "Infinity", "-Infinity", shown as such; everything else as given."""
    if isinstance(value, float) and not np.isfinite(value):
        return "NaN" if np.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _command(model, run, readout) -> str:
    ids = ",".join(str(int(t)) for t in run.tokens)
    args = ["--ids", ids, "--model", model.name or "MODEL", "--position", str(readout.position),
            "--targets", *(f"#{t.id}" for t in readout.targets.targets)]
    if readout.targets.versus:
        args += ["--versus", *(f"#{t.id}" for t in readout.targets.versus)]
    if model.dtype != np.float32:
        args += ["--dtype", str(model.dtype)]
    return " ".join(shlex.quote(a) for a in args)


def _expand(data, readout, d, *, depth, top, branch, open_it=True):
    """Embed the node of `readout` (its residual prism) and, when opened, its panels and their children."""
    res = P.residual_prism(readout)
    node = {"path": list(readout.path), "depth": d, "residual": encode_split(res)}
    data["nodes"][node_key(readout.path)] = node
    if not open_it or (d > 0 and d >= depth):  # the root is always opened; a chain only above the depth
        return
    chain = d < depth  # whether this node's panels chain their children (one more pull-back step)
    parts = [i for i, label in enumerate(res.labels) if label != "embed"]
    if d > 0:  # the root opens every layer; a pulled-back node its `branch` largest layer parts
        order = res.top(len(res.labels))
        parts = [i for i in order if res.labels[i] != "embed"][:branch]
    node["attention"], node["mlp"] = {}, {}
    rec, p = readout.run.record, readout.position
    for i in parts:
        label = res.labels[i]
        layer = _layer_of(label)
        if label.endswith(".attn"):
            split = P.attention_prism(readout, layer)
            pattern = rec[f"blocks.{layer}.attn.pattern"][:, p, : p + 1]  # [N, S]
            node["attention"][str(layer)] = {"split": encode_split(split),
                                             "pattern": _packed(pattern, split.values.dtype)}
            ranked = split.top(len(split.labels))
            cells = _children_of_attention(split, pattern, ranked)
            opened = set(cells[:branch])
            chained = (cells if d == 0 else cells[:branch]) if chain else []  # the root chains every cell
            for h, s in chained:
                _expand(data, P.through_head(readout, layer, h, s), d + 1, depth=depth, top=top, branch=branch,
                        open_it=(h, s) in opened)
        elif label.endswith(".ple"):  # Gemma 4: the per-layer input term, its two exact pieces (a leaf panel)
            node.setdefault("ple", {})[str(layer)] = {"split": encode_split(P.ple_prism(readout, layer))}
        else:
            split = P.mlp_prism(readout, layer)
            ranked = split.top(top)
            node["mlp"][str(layer)] = {"split": encode_split(split, keep=ranked)}
            # the neurons chain; a Gemma 4 MoE layer's experts (L{l}E{e}, after the neurons) are leaves here
            neurons = [n for n in ranked if split.labels[n].startswith(f"L{layer}N")]
            for n in neurons[:branch] if chain else []:
                _expand(data, P.through_neuron(readout, layer, n), d + 1, depth=depth, top=top, branch=branch)


# ------------------------------------------------------------------------------------------------- sections


def check_budget(depth, top, branch) -> None:
    for name, value, least in (("--depth", depth, 0), ("--top", top, 1), ("--branch", branch, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise InputError(f"{name} must be an integer of at least {least}, got {value!r}")


def check_section(kind: str, data, source: str) -> dict:
    """Refuse a section's JSON that lacks a key its renderer reads; return it unchanged otherwise."""
    keys = SECTION_KEYS[kind]
    if not isinstance(data, dict):
        raise InputError(f"--{kind} {source} holds a JSON {type(data).__name__}, not an object")
    missing = [k for k in keys["top"] if k not in data]
    if missing:
        raise InputError(f"--{kind} {source} lacks the key {missing[0]!r} (a {kind} JSON has "
                         f"{', '.join(keys['top'])})")
    for field, needed in keys.items():
        if field == "top":
            continue
        outer, _, inner = field.partition(".")
        rows = data[outer] if isinstance(data[outer], list) else [data[outer]]
        if inner:  # a list inside each row (a sweep's splits[n].components)
            rows = [r for row in rows if isinstance(row, dict) for r in (row.get(inner) or [None])]
        for n, row in enumerate(rows):
            lacking = [k for k in needed if not isinstance(row, dict) or k not in row]
            if lacking:
                raise InputError(f"--{kind} {source}: {field}[{n}] lacks the key {lacking[0]!r} "
                                 f"(each has {', '.join(needed)})")
    return data


def check_graph(view: dict, model, run, position=-1) -> dict:
    """Refuse a graph view (graphs.graph_view's dict) of another model, prompt or position than the page's."""
    p = P.resolve_position(run, position)
    ids = [int(t) for t in run.tokens[: p + 1]]
    if view["model"] != model.name:
        raise InputError(f"the graph is of the model {view['model']!r}, the page of {model.name!r}")
    if view["position"] != p or [t["id"] for t in view["tokens"]] != ids:
        raise InputError(f"the graph traces position {view['position']} of another prompt than the page's position "
                         f"{p} (its tokens differ): build it from the same prompt and position")
    if view["format"] != GRAPH_FORMAT:
        raise InputError(f"the graph view has format {view['format']!r}, this page reads format {GRAPH_FORMAT}")
    return view


def load_section(kind: str, path) -> dict:
    """The JSON of --validate FILE, --compare FILE or --sweep DIR (DIR/summary.json), checked by check_section."""
    path = Path(path)
    file = path / "summary.json" if kind == "sweep" else path
    if "\0" in str(path):  # no file system has such a name (open() would raise ValueError)
        raise InputError(f"cannot read --{kind} {_quoted(path)}: a path cannot hold a NUL character")
    if kind == "sweep" and not path.is_dir():
        raise InputError(f"--sweep {_quoted(path)} is not a directory (give the folder holding summary.json)")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise InputError(f"cannot read --{kind} {_quoted(file)}: {reason}") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InputError(f"--{kind} {_quoted(file)} is not valid JSON ({e})") from None
    return check_section(kind, data, _quoted(file))


def _quoted(path) -> str:
    return repr(str(path))


# ------------------------------------------------------------------------------------------------- the page


def _asset(name: str) -> str:
    return resources.files("refprism.report").joinpath("assets", name).read_text(encoding="utf-8")


def _script_json(data) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' can close the element or start a comment."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render(data: dict) -> str:
    """The HTML page for a build_data dict: template, style, data and script in one file."""
    title = "refprism report: " + "".join(t["piece"] for t in data["tokens"])
    page = _asset("report.html")
    for key, value in (("{{title}}", html.escape(title)), ("{{style}}", _asset("report.css")),
                       ("{{data}}", _script_json(data)), ("{{script}}", _asset("report.js"))):
        page = page.replace(key, value, 1)
    return page


def build_page(model, run, targets, *, position=-1, versus=(), depth=2, top=50, branch=2, validate=None,
               compare=None, sweep=None, graph=None) -> str:
    """The page as one HTML string (see the module docstring for what it embeds). validate / compare / sweep: the
    JSON dicts of those sections (checked by check_section), or None to leave the section out; graph: the dict of
    graphs.graph_view for the same model, prompt and position (check_graph), or None."""
    sections = {kind: check_section(kind, value, "(given)") for kind, value in
                (("validate", validate), ("compare", compare), ("sweep", sweep), ("graph", graph))
                if value is not None}
    if graph is not None:
        check_graph(graph, model, run, position)
    return render(build_data(model, run, targets, position=position, versus=versus, depth=depth, top=top,
                             branch=branch, sections=sections))


def write_report(out, model, run, targets, **kw) -> Path:
    """build_page(...) written to `out` atomically (never a half-written file); returns the path."""
    text = build_page(model, run, targets, **kw)
    return atomic_write(Path(out), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def page_data(text: str) -> dict:
    """The data embedded in a page written by render (for tests and scripts)."""
    start = text.index('<script id="refprism-data" type="application/json">')
    start = text.index(">", start) + 1
    return json.loads(text[start: text.index("</script>", start)])
