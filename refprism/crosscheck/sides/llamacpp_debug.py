"""llama-debug's printout in refprism's names: the printed tensors parsed (`parse_debug_output`), each graph
tensor placed at its refprism site (`place`, the table in crosscheck/sides/llamacpp.py's docstring) and turned into
a `Summary` of the elements it printed and its running sum (`summaries_from_debug`), and a dump in llama.cpp's
graph names mapped the same way (`scheme_llamacpp`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import numpy as np

from refprism.crosscheck.capture import Summary
from refprism.errors import InputError, ToolError
from refprism.gemma.config import Config
from refprism.gemma.record import SITE_LETTERS, axis_sizes

PRINTED_EDGE = 3  # llama-debug prints the first and last 3 indices of each of the three fastest axes


PRINT_DECIMALS = 4  # ... as %12.4f


PRINTED_RESOLUTION = 0.5 * 10.0 ** -PRINT_DECIMALS  # a printed element is within 5e-5 of the tensor's value


SUM_RESOLUTION = 0.5e-6  # the sum is printed as %f (6 decimals) of a running float32 sum (common/debug.cpp)


@dataclass
class Printed:
    """One tensor as llama-debug printed it: name, type, op, sources, ne (fastest first), printed values, sum."""

    name: str
    type: str
    op: str
    src0: str
    src1: str
    ne: tuple[int, int, int, int]
    values: dict[tuple[int, int, int, int], float] = field(default_factory=dict)  # (i0, i1, i2, i3) -> value
    total: float | None = None


_HEADER = re.compile(r"^common_debug_cb_eval:\s*(?P<name>.*?) = \((?P<type>[^)]*)\)\s*(?P<op>[A-Z0-9_]+)"
                     r"\((?P<src0>.*?)\{[-\d, ]*\}, (?P<src1>.*?)\}\) = \{(?P<ne>[-\d, ]+)\}\s*$")


_SUM = re.compile(r"^\s*sum = (?P<sum>\S+)\s*$")


def printed_indices(n: int, edge: int = PRINTED_EDGE) -> list[int]:
    """The indices llama-debug prints along an axis of length n: all if n <= 2*edge, else the first and last `edge`."""
    return list(range(n)) if n <= 2 * edge else [*range(edge), *range(n - edge, n)]


def parse_debug_output(text: str) -> tuple[list[int] | None, list[Printed]]:
    """llama-debug's stdout -> (the token ids it printed, or None; every tensor it printed, in graph order)."""
    lines = text.splitlines()
    tensors: list[Printed] = []
    tokens = None
    i = 0
    while i < len(lines):
        m = _HEADER.match(lines[i])
        if m is None:
            if lines[i].startswith("Token ids (") and i + 1 < len(lines):
                n = int(lines[i][len("Token ids ("):].split(")")[0])
                found = _token_ids("\n".join(lines[i + 1:]) + "\n", n)  # a piece may be a newline: read on
                if found is None:
                    raise ToolError(f"cannot read llama-debug's {n} token ids from {lines[i + 1][:200]!r}")
                tokens = found
            i += 1
            continue
        ne = tuple(int(x) for x in m["ne"].split(","))
        t = Printed(m["name"].strip(), m["type"], m["op"], m["src0"].strip(), m["src1"].strip(), ne)
        i += 1
        numbers: list[float] = []
        while i < len(lines) and lines[i].startswith(" "):  # the data block is indented; a quantized tensor has none
            s = _SUM.match(lines[i])
            if s:
                if t.total is None:
                    t.total = float(s["sum"])
                i += 1
                if i < len(lines) and lines[i].strip() == "[":  # another ne[3] block follows
                    continue
                break
            row = lines[i].strip()
            if row.startswith("[") and len(row) > 1:
                numbers += [float(x) for x in row.strip("[],").replace(" ", "").split(",") if x and x != "..."]
            i += 1
        if numbers:
            order = [(i0, i1, i2, i3) for i3 in range(ne[3]) for i2 in printed_indices(ne[2])
                     for i1 in printed_indices(ne[1]) for i0 in printed_indices(ne[0])]
            if len(order) != len(numbers):
                raise ToolError(f"llama-debug printed {len(numbers)} values of {t.name} (ne {list(ne)}), "
                                f"expected {len(order)}: its print format changed")
            t.values = dict(zip(order, numbers))
        tensors.append(t)
    return tokens, tensors


# llama-debug ends with "Token ids (n):" and one line of `piece(id)`, space separated; a piece is printed as it is,
# so a newline piece breaks that line: an id is "(digits)" followed by a space or a newline.
_TOKEN_ID = re.compile(r"\((-?\d+)\)(?=[ \n])")


def _token_ids(rest: str, n: int) -> list[int] | None:
    """The n ids printed at the start of `rest` (what follows "Token ids (n):"), or None when the output stops
    before the line that holds the last of them is complete."""
    found = list(_TOKEN_ID.finditer(rest))[:n]
    if len(found) < n:
        return None
    if found and "\n" not in rest[found[-1].end():]:
        return None  # the line of the last id is not finished: the output was cut there
    return [int(m[1]) for m in found]


def _ends_with_token_ids(text: str) -> bool:
    """Whether llama-debug's output holds its closing "Token ids (n):" line and all n ids after it."""
    at = text.rfind("\nToken ids (")
    if at < 0:
        return False
    head, _, rest = text[at + 1:].partition("\n")
    return _token_ids(rest, int(head[len("Token ids ("):].split(")")[0])) is not None


GLOBAL_SITES = ("embed", "ln_final.out", "logits", "ple.token", "ple.input")  # ple.*: Gemma 4, [T, L, P]


def place(tag: str, op: str | None, ndim: int, cfg: Config) -> tuple[str, str] | None:
    """(refprism site without "blocks.{l}.", ggml layout fastest first) of a llama.cpp graph tensor, or None.

    tag: the name without its "-l" layer suffix. op: the ggml op that made it; None for a dump file, which keeps
    names only: then a repeated name means its last tensor, told apart by ndim (Qcur as [N*H, T] is the
    projection, as [H, N, T] the tensor after RoPE). A layout lists ne axes fastest first; "NH" is one axis holding
    head n's H values at n*H + h; S is the KV cache's cell axis.
    """
    if cfg.gemma4:
        return _place_gemma4(tag, op)
    post = cfg.post_norms
    simple = {
        "inp_scaled": ("embed", "D T"),
        "attn_norm": ("ln1.out", "D T"),
        "attn_post_norm": ("attn.out", "D T") if post else None,
        "sa_out": ("resid_mid", "D T"),
        "ffn_norm": ("ln2.out", "D T"),
        "ffn_gate": ("mlp.gate", "F T"),
        "ffn_up": ("mlp.up", "F T"),
        "ffn_geglu": ("mlp.act", "F T"),
        "ffn_out": ("mlp.down" if post else "mlp.out", "D T"),
        "ffn_post_norm": ("mlp.out", "D T") if post else None,
        "l_out": ("resid_post", "D T"),
        "kq": ("attn.scores", "S T N"),
        "kq_soft_max": ("attn.pattern", "S T N"),
        "kqv_out": ("attn.z", "NH T"),
        "kqv": ("attn.z", "H T N"),
        "result_norm": ("ln_final.out", "D T"),
        "result_output": ("logits", "V T"),
        "attn_output": ("attn.o_proj" if post else "attn.out", "D T"),  # the unnamed MUL_MAT of blk.l.attn_output
    }
    if tag in simple:
        return simple[tag]
    if tag not in ("Qcur", "Kcur", "Vcur"):
        return None
    heads = "N" if tag == "Qcur" else "K"
    before, after = {"Qcur": ("attn.q_pre", "attn.q"), "Kcur": ("attn.k_pre", "attn.k"),
                     "Vcur": ("attn.v", "attn.v")}[tag]
    if op == "MUL_MAT" or (op is None and ndim == 2):
        return before, f"{heads}H T"  # the projection, [N*H, T]
    if op == "RESHAPE":
        return before, f"H {heads} T"  # the same values viewed per head
    if op == "ROPE" or (op is None and ndim == 3):
        return after, f"H {heads} T"  # after RoPE (Gemma 3: after the q/k norm too); v has no RoPE: the reshape
    return None


# llama.cpp's Gemma 4 graph (src/models/gemma4.cpp) -> refprism's sites. "mm:<weight>" is the unnamed MUL_MAT
# (MUL_MAT_ID for the experts) of blk.l.<weight>.weight, placed by its weight (summaries_from_debug).
GEMMA4_SITES = {
    "inp_scaled": ("embed", "D T"),
    "inp_per_layer_selected": ("ple.token", "P L T"),  # E_ple[tokens] * sqrt(P)
    "inp_per_layer": ("ple.input", "P L T"),  # (rms_norm(model; ple_norm) + token) / sqrt(2), before the permute
    "attn_norm": ("ln1.out", "D T"),
    "Qcur_pos": ("attn.q", "H N T"),  # after q_norm and RoPE
    "Kcur_pos": ("attn.k", "H K T"),
    "kq": ("attn.scores", "S T N"),  # q . k, scale 1 (f_attention_scale)
    "kq_soft_max": ("attn.pattern", "S T N"),
    "kqv": ("attn.z", "H T N"),
    "kqv_out": ("attn.z", "NH T"),
    "mm:attn_output": ("attn.o_proj", "D T"),
    "attn_post_norm": ("attn.out", "D T"),
    "attn_out": ("resid_mid", "D T"),
    "ffn_norm": ("ln2.out", "D T"),  # a layer without experts
    "ffn_norm_1": ("ln2.out", "D T"),  # a layer with experts: the dense MLP's input norm
    "ffn_gate": ("mlp.gate", "F T"),
    "ffn_up": ("mlp.up", "F T"),
    "ffn_geglu": ("mlp.act", "F T"),
    "mm:ffn_down": ("mlp.down", "D T"),
    "ffn_out": ("mlp.down", "D T"),  # a layer without experts names its down product
    "ffn_mlp": ("mlp.dense", "D T"),
    "ffn_moe_logits": ("moe.router.logits", "E T"),
    "ffn_norm_2": ("ln2_moe.out", "D T"),
    "ffn_moe_gate": ("moe.gate", "G J T"),
    "ffn_moe_up": ("moe.up", "G J T"),
    "ffn_moe_geglu": ("moe.act", "G J T"),
    "mm:ffn_down_exps": ("moe.expert_out", "D J T"),  # before the per-expert scale and the routing weight
    "ffn_moe_down": ("moe.expert_out", "D J T"),  # that product's name when no per-expert scale follows it
    "ffn_moe_out": ("moe.down", "D T"),
    "ffn_moe": ("moe.out", "D T"),
    "ffn_moe_combined": ("mlp.sum", "D T"),
    "ffn_post_norm": ("mlp.out", "D T"),
    "pe_in": ("resid_mlp", "D T"),
    "mm:inp_gate": ("ple.gate", "P T"),
    "mm:proj": ("ple.proj", "D T"),
    "per_layer_embd_out": ("ple.out", "D T"),
    "l_out": ("resid_post", "D T"),  # after layer_output_scale
    "result_norm": ("ln_final.out", "D T"),
    "result_output": ("logits", "V T"),  # after the final soft-cap
}


def _place_gemma4(tag: str, op: str | None) -> tuple[str, str] | None:
    """`place` for Gemma 4 (GEMMA4_SITES). Qcur / Kcur / Vcur as MUL_MAT are the projections [N*H, T] (on a
    k_eq_v layer the one product of blk.l.attn_k is named Vcur: it is placed at k_pre too, `_k_eq_v_too`);
    Vcur_normed (RMS_NORM, no weight) is v. Qcur_normed / Kcur_normed (after the norm, before RoPE) have no site.

    op None (a dump file, names only): gemma4.cpp names each of Qcur / Kcur / Vcur / Vcur_normed once, so the name
    alone places it; an unnamed product ("mm:<weight>" here, `node_<i>` in the graph) is named in a dump by its
    weight and layer, "<weight>-l" (e.g. "attn_output-3", "ffn_down_exps-0"), as Gemma 3's attn_output-l is."""
    if tag in GEMMA4_SITES:
        return GEMMA4_SITES[tag]
    if op in ("MUL_MAT", None) and tag in ("Qcur", "Kcur", "Vcur"):
        return {"Qcur": ("attn.q_pre", "NH T"), "Kcur": ("attn.k_pre", "KH T"), "Vcur": ("attn.v_pre", "KH T")}[tag]
    if op in ("RMS_NORM", None) and tag == "Vcur_normed":
        return "attn.v", "H K T"
    if op is None and "mm:" + tag in GEMMA4_SITES:
        return GEMMA4_SITES["mm:" + tag]
    return None


def _k_eq_v_too(cfg: Config, site_end: str, layer: int | None) -> list[str]:
    """The other site a Gemma 4 tensor also is: on a k_eq_v layer the one product of blk.l.attn_k (named Vcur,
    placed at v_pre) is k_pre as well."""
    if cfg.gemma4 and site_end == "attn.v_pre" and layer is not None and cfg.k_eq_v_at(layer):
        return [f"blocks.{layer}.attn.k_pre"]
    return []


def _sizes(cfg: Config, T: int, l: int | None = None) -> dict[str, int]:
    if cfg.gemma4:
        return axis_sizes(cfg, T, l)  # each layer's own K, H, F (double-wide consumers, full layers' heads)
    return {"T": T, "D": cfg.d_model, "N": cfg.n_heads, "K": cfg.n_kv_heads, "H": cfg.d_head, "F": cfg.d_mlp,
            "V": cfg.vocab_size}


def _split(tag: str) -> tuple[str, int | None]:
    """"Qcur-3" -> ("Qcur", 3); "result_norm" -> ("result_norm", None)."""
    head, _, tail = tag.rpartition("-")
    return (head, int(tail)) if head and tail.isdecimal() else (tag, None)


def summaries_from_debug(tensors: list[Printed], cfg: Config, T: int) -> tuple[dict[str, Summary], list[str]]:
    """llama-debug's printed tensors -> {refprism site: Summary of the printed elements}, plus notes.

    Two printed tensors of one site (Qcur MUL_MAT and RESHAPE; kqv and kqv_out) pool their elements; the total is
    the first one's. Elements in KV cells beyond the prompt are checked to be 0 and dropped.
    """
    out: dict[str, Summary] = {}
    notes: list[str] = []
    sizes = _sizes(cfg, T)
    last_layer = None  # Gemma 2 names its post-feedforward norm "ffn_post_norm", without the layer
    for t in tensors:
        tag, layer = _split(t.name)
        if tag.startswith("node_") and t.op in ("MUL_MAT", "MUL_MAT_ID"):
            m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", t.src0)
            if m is None:
                continue
            if not cfg.gemma4 and m[2] != "attn_output":
                continue
            tag, layer = ("mm:" + m[2] if cfg.gemma4 else m[2]), int(m[1])
        if tag == "ffn_out":
            last_layer = layer
        if tag == "ffn_post_norm" and layer is None:
            layer = last_layer
        spot = place(tag, t.op, 2 if t.ne[2] == 1 and t.ne[3] == 1 else 3, cfg)
        if spot is None or not t.values:
            continue
        site_end, layout = spot
        if (layer is None) != (site_end in GLOBAL_SITES):
            continue
        site = site_end if layer is None else f"blocks.{layer}.{site_end}"
        here = _sizes(cfg, T, layer) if cfg.gemma4 else sizes
        summary = summary_of(t, site, SITE_LETTERS[site_end], layout.split(), here, notes)
        for at in [site, *_k_eq_v_too(cfg, site_end, layer)]:
            if at in out:
                _pool(out[at], summary, at)
            else:
                out[at] = replace(summary, elements=dict(summary.elements))
    for site, same in _entering(cfg):  # refprism's resid_pre of layer l is what left layer l - 1 (or the embedding)
        if same in out and out[same].rows is None:
            out[site] = replace(out[same], elements=dict(out[same].elements))
    return out, notes


def _entering(cfg: Config) -> list[tuple[str, str]]:
    """(blocks.l.resid_pre, the site it equals by definition): embed for layer 0, resid_post of l - 1 after."""
    return [("blocks.0.resid_pre", "embed")] + [(f"blocks.{l}.resid_pre", f"blocks.{l - 1}.resid_post")
                                                for l in range(1, cfg.n_layers)]


def summary_of(t: Printed, site: str, letters, layout: list[str], sizes: dict[str, int], notes: list) -> Summary:
    """One printed tensor as a Summary of `site`: each ne index (layout: its axes, fastest first) -> refprism index."""
    T = sizes["T"]
    n_rows = T
    for axis, n in zip(layout, t.ne):
        if axis == "S":
            if n < T:
                raise ToolError(f"llama-debug's {t.name} has {n} KV cells for {T} tokens")
        elif axis == "T":
            if n not in (T, 1):
                raise ToolError(f"llama-debug's {t.name} has {n} positions; the prompt has {T}")
            n_rows = n
        elif n != np.prod([sizes[a] for a in axis]):
            raise ToolError(f"llama-debug printed {t.name} with ne {list(t.ne)}; the {site} mapping expects "
                            f"{' '.join(layout)} = {[sizes.get(a, a) for a in layout]}: the graph changed")
    if any(n != 1 for n in t.ne[len(layout):]):
        raise ToolError(f"llama-debug printed {t.name} with ne {list(t.ne)}: more axes than {' '.join(layout)}")
    rows = None if n_rows == T else (T - 1,)  # the cut last layer keeps the position with logits: the last
    elements = {}
    beyond = []
    for idx, value in t.values.items():
        at = {}
        for axis, i in zip(layout, idx):
            if len(axis) == 2:  # "NH": i = n*H + h
                at[axis[0]], at[axis[1]] = divmod(i, sizes[axis[1]])
            else:
                at[axis] = i
        if rows is not None:
            at["T"] = rows[at["T"]]
        if at.get("S", 0) >= T:  # a KV cell beyond the prompt: empty
            beyond.append(value)
            continue
        elements[tuple(at[a] for a in letters)] = value
    total = t.total
    if any(v != 0 for v in beyond):
        notes.append(f"{site}: KV cells beyond the prompt are not empty in llama.cpp's {t.name}: its sum left out")
        total = None
    shape = tuple(T if a in ("T", "S") else sizes[a] for a in letters)
    order = tuple(c for axis in reversed(layout) for c in axis)  # ggml sums i0 fastest: its axes, slowest first
    return Summary(shape=shape, elements=elements, total=total, rows=rows, resolution=PRINTED_RESOLUTION,
                   total_sum="float32", total_order=order, total_resolution=SUM_RESOLUTION)


def _pool(into: Summary, more: Summary, site: str) -> None:
    if into.shape != more.shape or into.rows != more.rows:
        raise ToolError(f"llama-debug printed {site} twice with different shapes")
    for k, v in more.elements.items():
        into.elements.setdefault(k, v)
    if into.total is None:
        into.total = more.total


def scheme_llamacpp(name: str, array, cfg: Config, *, T: int | None = None) -> list[tuple[str, object]]:
    """A dump file's tensor named in llama.cpp's graph scheme -> [(refprism site, array or Summary)], [] if unmapped.

    The array is the tensor's memory as NumPy sees it: dimensions in reverse ne order (ggml's [ne0=D, ne1=T] is a
    [T, D] array), possibly with leading axes of 1 (ne[3], ne[2]). A name repeated in llama.cpp's graph means its
    last tensor: "Qcur-l" as [T, N*H] is the projection (attn.q_pre), as [T, N, H] the one after RoPE (attn.q).
    kq / kq_soft_max come as [N, T, cells] and keep the first T cells (the prompt's positions). When T (the
    prompt's length) is given, a tensor with fewer rows (llama.cpp's cut last layer) comes back as a Summary of
    the last rows. Gemma 2's layerless "ffn_post_norm" cannot be placed: []. A scheme name of the wrong shape is
    InputError.

    Gemma 4: placed by GEMMA4_SITES (`_place_gemma4`, op None: each name once, an unnamed product as
    "<weight>-l"), at each layer's own widths; layouts as the printout's ([P, L, T] is a [T, L, P] array, the
    experts' [G, J, T] a [T, J, G] one); a k_eq_v layer's Vcur is k_pre too.
    """
    tag, layer = _split(name)
    probe = place(tag, None, 2, cfg)
    if probe is None:
        return []
    a = np.asarray(array)
    while a.ndim > 3 and a.shape[0] == 1:  # ne[3] = 1
        a = a[0]
    if tag in ("Qcur", "Kcur", "Vcur") and not cfg.gemma4:
        heads = cfg.n_heads if tag == "Qcur" else cfg.n_kv_heads
        if a.ndim == 3 and a.shape[1:] != (heads, cfg.d_head) and a.shape[0] == 1:
            a = a[0]  # [1, T, N*H]: the projection with its ne[2] = 1
    else:
        while a.ndim > len(probe[1].split()) and a.shape[0] == 1:  # Gemma 4's names keep one layout each
            a = a[0]
    site_end, layout = place(tag, None, a.ndim, cfg)
    is_global = site_end in GLOBAL_SITES
    if (layer is None) != is_global or (layer is not None and not 0 <= layer < cfg.n_layers):
        return []
    site = site_end if is_global else f"blocks.{layer}.{site_end}"
    axes = layout.split()[::-1]  # NumPy order: slowest first
    if a.ndim != len(axes):
        raise InputError(f"{name}: {a.ndim} axes {list(a.shape)}, but llama.cpp's {tag} is [{', '.join(axes)}]")
    n_rows = a.shape[axes.index("T")]
    sizes = {**_sizes(cfg, n_rows, layer), "S": n_rows}  # Gemma 4: layer l's own K, H, F
    expect = [None if ax in ("T", "S") else int(np.prod([sizes[c] for c in ax])) for ax in axes]
    if any(e is not None and e != n for e, n in zip(expect, a.shape)):
        shown = ", ".join(ax if e is None else str(e) for ax, e in zip(axes, expect))
        raise InputError(f"{name}: shape {list(a.shape)}, but llama.cpp's {tag} for this model is [{shown}]")
    if "S" in axes:  # [N, T, cells]: the first T cells hold the prompt's positions
        if a.shape[2] < n_rows:
            raise InputError(f"{name}: {a.shape[2]} KV cells for {n_rows} positions")
        a = a[:, :, :n_rows]
    flat = [c for ax in axes for c in ax]  # "NH" -> N, H (n major)
    letters = SITE_LETTERS[site_end]
    a = a.reshape([sizes[c] for c in flat]).transpose([flat.index(c) for c in letters])
    if T is not None and n_rows < T:
        rows = tuple(range(T - n_rows, T))  # llama.cpp keeps the output rows: the last positions
        elements = {(rows[idx[0]], *idx[1:]): float(v) for idx, v in np.ndenumerate(a)}
        return [(site, Summary(shape=(T, *a.shape[1:]), elements=elements, total=float(a.sum(dtype=np.float64)),
                               rows=rows))]
    also = [entering for entering, same in _entering(cfg) if same == site]  # the next layer's resid_pre
    return [(at, a) for at in [site, *also, *_k_eq_v_too(cfg, site_end, layer)]]
