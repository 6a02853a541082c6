"""Dump files from any implementation as the other side of a comparison: `.npz` or `.safetensors`, never pickles.

A dump holds one array per activation and the token ids the run used (`tokens` or `input_ids`; or pass the ids).
Its names are read in one of four schemes (`--names`):

    refprism    refprism's record names and layouts (`refprism record --out run.npz` writes one)
    hf          HF module paths as forward hooks see them (`sides.hf.scheme_hf`'s table)
    tl          TransformerLens hook names (`sides.tl.scheme_tl`), as a plain bridge's run_with_cache
    llama.cpp   llama.cpp tensor names as llama-debug / eval-callback print them (`sides.llamacpp`); a
                tensor with fewer rows than the prompt (llama.cpp's cut last layer) is a summary of those rows,
                and the floors are llama.cpp's arithmetic (the model's GGUF weight types, the KV cache given)

or by a JSON name map for a port of one's own (`NameMap`, docs/compare.md):

    {
      "tokens": "input_ids",                                       optional: the key of the token ids
      "sites": {
        "layers.{l}.attn_norm": {"site": "blocks.{l}.ln1.out", "axes": "BTD", "norm_weight": "none"},
        "layers.{l}.q":         {"site": "blocks.{l}.attn.q", "axes": "T(NH)"},
        "layers.{l}.probs":     {"site": "blocks.{l}.attn.pattern", "axes": "BNTS"},
        "logits":               "logits"
      }
    }

Keys are dump names, `{l}` standing for a layer index; a value is a refprism site (same `{l}`) or an object with
`site`, `axes` (the dump array's axes in refprism's letters, T S D N K H F V; `B` a batch axis, of which element
`batch_index` (default 0) is taken; `(NH)` one axis holding N x H flattened, N the slower; default: the site's own
letters) and `norm_weight`: `one_plus_w` (default: the values are a norm's output x / s * (1 + w), as refprism
records them) or `none` (the values are x / s before the weight, as ports that fold the weight into the next
matrix keep them; refprism multiplies by 1 + w from the checkpoint).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refprism.crosscheck.capture import Capture, GgmlArithmetic, Summary
from refprism.errors import InputError
from refprism.files import atomic_write
from refprism.gemma.config import Config
from refprism.gemma.record import symbolic_shapes

SCHEMES = ("refprism", "hf", "tl", "llama.cpp")
TOKEN_KEYS = ("tokens", "input_ids")
IGNORED_KEYS = ("config",)  # `refprism record` stores the config as JSON text beside the arrays
LETTERS = "TSDNKHFV"


def read_dump(path, model, *, names="refprism", ids=None, kv_cache="f16") -> Capture:
    """A dump file -> Capture in refprism's names and layouts (module docstring).

    model: the refprism Model compared against (its config names the sites; a `norm_weight: none` entry needs its
           norm weights). ids: the token ids, when the dump holds none.
    kv_cache: for a dump in llama.cpp's names, the KV cache type llama.cpp ran with ("f16" or "f32"): with the
           GGUF's weight types (when the model is a .gguf file) it says how llama.cpp rounded, for the floors.
    """
    cfg = model.config
    names = as_names(names, cfg)
    arrays = load_arrays(path)
    source = Path(path).name
    tokens, token_key = _tokens(arrays, ids, source, names)
    mapper, label = _mapper(names, model, len(tokens), source)
    out: dict[str, np.ndarray] = {}
    summaries: dict[str, Summary] = {}  # tl's unmasked scores; llama.cpp's cut last layer: rows, not whole arrays
    origin: dict[str, str] = {}
    notes, ignored = [], []
    for key, array in arrays.items():
        if key == token_key or key in IGNORED_KEYS:
            continue
        mapped = mapper(key, array)
        if not mapped:
            ignored.append(key)
        for site, value in mapped:
            if isinstance(value, Summary):
                if site in summaries and summaries[site] != value:
                    raise InputError(f"{source}: {origin[site]} and {key} both give {site} and differ")
                summaries[site], origin[site] = value, key
                continue
            if site in out and not np.array_equal(out[site], value, equal_nan=True):
                raise InputError(f"{source}: {origin[site]} and {key} both give {site} and differ")
            out[site], origin[site] = value, key
    if names == "hf":
        from refprism.crosscheck.sides.hf import derived_hf

        extra, derived_notes, used = derived_hf(arrays, cfg, out)
        out.update(extra)
        notes += derived_notes
        ignored = [k for k in ignored if k not in used]
    if ignored:
        notes.append(f"{len(ignored)} arrays of the dump name no refprism site in the {label} scheme, ignored: "
                     + ", ".join(ignored[:8]) + (" ..." if len(ignored) > 8 else ""))
    if not out and not summaries:
        tried = sorted(k for k in arrays if k != token_key and k not in IGNORED_KEYS)
        count = f"{len(tried)} array" + ("s" if len(tried) != 1 else "")
        raise InputError(f"{source}: none of its {count} besides the token ids names a site in the {label} scheme "
                         f"(its names begin {', '.join(tried[:3])}): check --names")
    arithmetic = None
    if names == "llama.cpp":  # llama.cpp computed it: its floors are llama.cpp's arithmetic
        arithmetic, more = _llamacpp_arithmetic(model, kv_cache)
        notes += more
    return Capture(source=source, tokens=tokens, arrays=out, summaries=summaries, dtype=_dtype_of(out.values()),
                   notes=notes, arithmetic=arithmetic)


def _llamacpp_arithmetic(model, kv_cache):
    """How llama.cpp rounded a dump in its names: the weight types of the model's GGUF and the KV cache given."""
    from refprism.crosscheck.sides.llamacpp import arithmetic, gemma4_f32_only

    note = (f"a dump in llama.cpp's names: floors of llama.cpp's CPU arithmetic ({kv_cache} KV cache, GELU through "
            "an f16 table, ggml's RoPE angles")
    if str(model.name).lower().endswith(".gguf"):
        if model.config.gemma4:
            gemma4_f32_only(model.name)  # as --against llama.cpp: ggml's row conversions are modelled on F32 only
        how = arithmetic(model.name, kv_cache)
        return how, [note + f", input rows of each product as its {how.weights} weight's type makes them)"]
    how = GgmlArithmetic(weights="F32", kv_cache=kv_cache)
    return how, [note + "; the model is no .gguf file, so llama.cpp's weights are taken as F32: float32 products)"]


def load_arrays(path) -> dict[str, np.ndarray]:
    """name -> array of an .npz (np.load, allow_pickle=False: an object array is refused, never unpickled) or a
    .safetensors file (bfloat16 arrives as ml_dtypes.bfloat16)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".npz", ".safetensors"):
        raise InputError(f"dump {p.name!r}: a dump is an .npz or a .safetensors file (--against hf|tl|llama.cpp "
                         "runs an implementation live)")
    if not p.is_file():
        raise InputError(f"no dump file {str(p)!r}")
    try:
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        from safetensors.numpy import load_file

        return load_file(str(p))
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise InputError(f"dump {p.name}: holds an object (pickled) array; refprism never unpickles: save plain "
                             "numeric arrays") from None
        raise InputError(f"dump {p.name} is not a readable {suffix} file ({str(e).splitlines()[0][:120]})") from None
    except Exception as e:  # zipfile.BadZipFile, safetensors' own errors, OSError
        raise InputError(f"dump {p.name} is not a readable {suffix} file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else 'corrupt'})") from None


def write_dump(path, arrays: dict) -> Path:
    """Write name -> array as .npz or .safetensors, atomically (a failed write leaves nothing)."""
    p = Path(path)
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}

    def write(tmp):
        if p.suffix.lower() == ".safetensors":
            from safetensors.numpy import save_file

            save_file(arrays, str(tmp))
        else:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

    return atomic_write(p, write)


def _tokens(arrays, ids, source, names):
    """(token ids [T], the key they came from or None): the dump's own ids, else the ids given."""
    key = None
    if isinstance(names, NameMap) and names.tokens:
        key = names.tokens
        if key not in arrays:
            raise InputError(f"{source}: the name map's token key {key!r} is not in the dump")
    else:
        key = next((k for k in TOKEN_KEYS if k in arrays), None)
    if key is None:
        if ids is None:
            raise InputError(f"{source} holds no token ids (an array named {' or '.join(TOKEN_KEYS)}): give the "
                             "prompt the dump was made from (text or --ids)")
        return np.asarray(ids, dtype=np.int64), None
    t = np.asarray(arrays[key])
    if t.ndim == 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 1 or not np.issubdtype(t.dtype, np.integer):
        raise InputError(f"{source}: {key} must be a 1-D array of integer token ids, got shape {list(t.shape)} of "
                         f"{t.dtype}")
    return t.astype(np.int64), key


def _dtype_of(arrays) -> str:
    """The arithmetic a dump reports: its most common float dtype (bfloat16 / float16 / float32 / float64)."""
    counts: dict[str, int] = {}
    for a in arrays:
        name = str(a.dtype)
        counts[name] = counts.get(name, 0) + 1
    best = max(counts, key=counts.get) if counts else "float32"
    return best if best in ("float64", "float32", "bfloat16", "float16") else "float32"


def as_names(names, cfg: Config):
    """A scheme name as given, or a JSON name map read and validated (a NameMap passes through)."""
    if isinstance(names, NameMap) or names in SCHEMES:
        return names
    if isinstance(names, (str, Path)) and (str(names).lower().endswith(".json") or Path(names).is_file()):
        return NameMap.read(names, cfg)
    raise InputError(f"--names must be one of {', '.join(SCHEMES)} or a JSON name map file, got {str(names)[:80]!r}")


def _mapper(names, model, T, source):
    """(key, array) -> [(site, array)] for the scheme or name map, and its label for messages."""
    cfg = model.config
    if isinstance(names, NameMap):
        return (lambda key, a: names.apply(key, a, model, T, source)), "name-map"
    if names == "refprism":
        sites = symbolic_shapes(cfg)
        return (lambda key, a: [(key, a)] if key in sites else []), "refprism"
    if names == "hf":
        from refprism.crosscheck.sides.hf import scheme_hf

        return (lambda key, a: scheme_hf(key, a, cfg)), "hf"
    if names == "tl":  # a dump of a plain bridge's hooks (a compatibility-mode one folds norms: see tl.scheme_tl)
        from refprism.crosscheck.sides.tl import scheme_tl

        return (lambda key, a: scheme_tl(key, a, cfg)), "tl"
    from refprism.crosscheck.sides.llamacpp_debug import scheme_llamacpp

    # T: a tensor with fewer rows than the prompt (llama.cpp's cut last layer) comes back as a Summary of its rows
    return (lambda key, a: scheme_llamacpp(key, a, cfg, T=T)), "llama.cpp"


# ------------------------------------------------------------------------------------------ JSON name maps

NORM_WEIGHTS = ("one_plus_w", "none")


@dataclass
class Entry:
    """One entry of a name map: the dump's name (as a regular expression, `{l}` a layer) and how to read it."""

    pattern: re.Pattern
    key: str
    site: str
    groups: list[str]  # each dump axis: one letter, or several flattened (slowest first)
    norm_weight: str = "one_plus_w"
    batch_index: int = 0


class NameMap:
    """A JSON name map (module docstring), validated against the model on reading: every problem is one line
    naming the entry."""

    def __init__(self, entries: list[Entry], tokens: str | None, where: str):
        self.entries, self.tokens, self.where = entries, tokens, where

    @classmethod
    def read(cls, path, cfg: Config) -> "NameMap":
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise InputError(f"cannot read the name map {str(p)!r}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise InputError(f"name map {p.name} is not UTF-8 text") from None
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise InputError(f"name map {p.name} is not valid JSON ({str(e)[:100]})") from None
        return cls.parse(data, cfg, p.name)

    @classmethod
    def parse(cls, data, cfg: Config, where: str = "the name map") -> "NameMap":
        if not isinstance(data, dict):
            raise InputError(f"{where}: a name map is a JSON object with \"sites\" (and optionally \"tokens\")")
        extra = sorted(set(data) - {"sites", "tokens", "comment"})
        if extra:
            raise InputError(f"{where}: unknown key {extra[0]!r} (a name map has \"sites\", \"tokens\", \"comment\")")
        sites = data.get("sites")
        if not isinstance(sites, dict) or not sites:
            raise InputError(f"{where}: \"sites\" must be a non-empty object of dump name -> refprism site")
        tokens = data.get("tokens")
        if tokens is not None and not isinstance(tokens, str):
            raise InputError(f"{where}: \"tokens\" must be the name of the token-id array")
        return cls([_entry(key, value, cfg, where) for key, value in sites.items()], tokens, where)

    def apply(self, key: str, a, model, T: int, source: str) -> list[tuple[str, np.ndarray]]:
        for e in self.entries:
            m = e.pattern.fullmatch(key)
            if m:
                site = e.site.format(l=int(m.group(1))) if "{l}" in e.site else e.site
                if site not in symbolic_shapes(model.config):
                    raise InputError(f"{source}: {key} maps to {site}, which this model does not have "
                                     f"({model.config.n_layers} layers)")
                return [(site, _arrange(e, key, site, np.asarray(a), model, T, source))]
        return []


def _entry(key, value, cfg: Config, where) -> Entry:
    if not isinstance(key, str) or not key:
        raise InputError(f"{where}: dump names must be non-empty strings")
    if isinstance(value, str):
        value = {"site": value}
    if not isinstance(value, dict):
        raise InputError(f"{where}: entry {key!r} must be a refprism site or an object with \"site\"")
    extra = sorted(set(value) - {"site", "axes", "norm_weight", "batch_index"})
    if extra:
        raise InputError(f"{where}: entry {key!r} has unknown field {extra[0]!r} (fields: site, axes, norm_weight, "
                         "batch_index)")
    site = value.get("site")
    if not isinstance(site, str):
        raise InputError(f"{where}: entry {key!r} has no \"site\" (a refprism name such as blocks.{{l}}.attn.q)")
    if ("{l}" in key) != ("{l}" in site):
        raise InputError(f"{where}: entry {key!r} -> {site!r}: {{l}} must appear in both the dump name and the site, "
                         "or in neither")
    shapes = symbolic_shapes(cfg)
    probe = site.replace("{l}", "0")
    if probe not in shapes:
        raise InputError(f"{where}: entry {key!r} names {site!r}, not a refprism site of this model (e.g. "
                         "blocks.{l}.attn.q, blocks.{l}.mlp.act, logits; see refprism.RECORD_TABLE)")
    letters = shapes[probe]
    axes = value.get("axes", "".join(letters))
    groups = _parse_axes(axes, key, where)
    flat = [c for g in groups for c in g if c != "B"]
    if sorted(flat) != sorted(letters) or groups.count("B") > 1 or any("B" in g and g != "B" for g in groups):
        raise InputError(f"{where}: entry {key!r}: axes {axes!r} must use each of {site}'s letters "
                         f"{''.join(letters)} once (optionally B for a batch axis)")
    norm_weight = value.get("norm_weight", "one_plus_w")
    if norm_weight not in NORM_WEIGHTS:
        raise InputError(f"{where}: entry {key!r}: norm_weight must be one of {', '.join(NORM_WEIGHTS)}, got "
                         f"{norm_weight!r} (\"w\" is not a convention but the classic mistake: compare finds it)")
    if norm_weight == "none" and _norm_weight_key(probe, cfg) is None:
        raise InputError(f"{where}: entry {key!r}: norm_weight applies to a norm's output (ln1.out, ln2.out, "
                         f"ln_final.out, and attn.out / mlp.out in Gemma 2/3), not {site}")
    batch = value.get("batch_index", 0)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise InputError(f"{where}: entry {key!r}: batch_index must be a non-negative integer")
    pattern = re.compile(re.escape(key).replace(re.escape("{l}"), r"(\d+)"))
    return Entry(pattern, key, site, groups, norm_weight, batch)


def _parse_axes(axes, key, where) -> list[str]:
    """'BT(NH)' -> ['B', 'T', 'NH']."""
    if not isinstance(axes, str) or not re.fullmatch(r"(?:[A-Z]|\([A-Z]{2,}\))+", axes):
        raise InputError(f"{where}: entry {key!r}: axes must be letters of {LETTERS} (and B), with flattened axes "
                         f"in parentheses, e.g. \"BT(NH)\"; got {axes!r}")
    groups = re.findall(r"\(([A-Z]+)\)|([A-Z])", axes)
    out = [a or b for a, b in groups]
    bad = [c for g in out for c in g if c not in LETTERS + "B"]
    if bad:
        raise InputError(f"{where}: entry {key!r}: axis letter {bad[0]!r} is not one of {LETTERS} or B")
    return out


def _norm_weight_key(site: str, cfg: Config):
    """The weight behind a norm output site: ('ln1', l) style key, or None when the site is not a norm output."""
    m = re.fullmatch(r"blocks\.(\d+)\.(ln1\.out|ln2\.out|attn\.out|mlp\.out)", site)
    if site == "ln_final.out":
        return "ln_final"
    if not m:
        return None
    kind = m.group(2)
    if kind in ("attn.out", "mlp.out"):
        return None if not cfg.post_norms else {"attn.out": "ln1_post", "mlp.out": "ln2_post"}[kind]
    return kind.split(".")[0]


def _arrange(e: Entry, key, site, a, model, T, source) -> np.ndarray:
    """A dump array in the entry's axes -> the site's layout (batch element taken, flattened axes split, axes
    permuted; a norm output before its weight multiplied by 1 + w)."""
    cfg = model.config
    letters = symbolic_shapes(cfg)[site]
    sizes = {"T": T, "S": T, "D": cfg.d_model, "N": cfg.n_heads, "K": cfg.n_kv_heads, "H": cfg.d_head,
             "F": cfg.d_mlp, "V": cfg.vocab_size}
    if a.ndim != len(e.groups):
        raise InputError(f"{source}: {key} has {a.ndim} axes (shape {list(a.shape)}); the name map reads it as "
                         f"{''.join(g if len(g) == 1 else f'({g})' for g in e.groups)} ({len(e.groups)} axes)")
    order = []
    shape = []
    for axis, g in enumerate(e.groups):
        if g == "B":
            if e.batch_index >= a.shape[axis]:
                raise InputError(f"{source}: {key} has a batch of {a.shape[axis]}; batch_index {e.batch_index} is "
                                 "beyond it")
            continue
        want = int(np.prod([sizes[c] for c in g]))
        if a.shape[axis] != want:
            what = " x ".join(f"{c}={sizes[c]}" for c in g)
            raise InputError(f"{source}: {key} has shape {list(a.shape)}: its axis {axis} ({g}) should be {what} = "
                             f"{want} for {site}")
        order += list(g)
        shape += [sizes[c] for c in g]
    if "B" in e.groups:
        a = np.take(a, e.batch_index, axis=e.groups.index("B"))
    a = a.reshape(shape).transpose([order.index(c) for c in letters])
    if e.norm_weight == "none":
        which = _norm_weight_key(site, cfg)
        l = int(site.split(".")[1]) if site.startswith("blocks.") else None
        w = model.params.ln_final if which == "ln_final" else model.params.get(l, which)
        a = a.astype(np.float64) * (1.0 + np.asarray(w, dtype=np.float64))
    return a
