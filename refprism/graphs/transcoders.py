"""Per-layer transcoders read from GemmaScope's, circuit-tracer's and SAE Lens' files: arrays in, every shape checked.

A transcoder of layer l reads the MLP's input h_l[t] (one of INPUT_HOOKS) and writes the MLP's output (hook_mlp_out,
refprism's blocks.{l}.mlp.out: after Gemma 2/3's post-norm):

    pre[t] = h[t] W_enc + b_enc                      W_enc [D, F] (stored here as GemmaScope and SAE Lens store it)
    act[t] = gate[t] * pre[t]                         gate in {0, 1} (ACTIVATIONS)
    out[t] = act[t] W_dec + b_dec (+ h[t] W_skip)     W_dec [F, D], W_skip [D, D] (input rows, output columns)

ACTIVATIONS: "relu" gate = pre > 0; "jumprelu" gate = pre > threshold (and pre > 0 where the file's own code
applies a ReLU first: GemmaScope, SAE Lens; circuit-tracer's JumpReLU is pre * (pre > threshold)); "topk" gate = the
k largest pre of the position (SAE Lens also requires pre > 0: its TopK takes relu of the k values).

INPUT_HOOKS (TransformerLens' names, as the files' configs give them, with or without "blocks.{l}."):
    hook_resid_mid, hook_mlp_in   h = resid_mid                         (the residual before the pre-MLP norm)
    ln2.hook_normalized           h = resid_mid / s_ln2                 (GemmaScope's: the norm without its weight)
    mlp.hook_in                   h = resid_mid (1 + w_ln2) / s_ln2     (= refprism's ln2.out, the MLP's input)

Formats (read_transcoders; a folder, one file, or a glob pattern; never a pickle):
    GemmaScope      params.npz (np.load, allow_pickle=False) or params.safetensors: W_enc [D, F], W_dec [F, D],
                    b_enc [F], b_dec [D], threshold [F]; JumpReLU; ln2.hook_normalized -> hook_mlp_out; the
                    layer from a `layer_{l}` folder in the path. GemmaScope 2's lower-case w_enc / w_dec (and
                    affine_skip_connection [D_out, D_in]) too.
    circuit-tracer  config.yaml (feature_input_hook, feature_output_hook, optional transcoders: [paths],
                    activation: relu | topk with k) + layer_{l}.safetensors: W_enc [F, D] (torch's Linear
                    layout), W_dec [F, D], b_enc, b_dec, activation_function.threshold (JumpReLU) or none (ReLU),
                    W_skip [D_out, D_in]
    SAE Lens        one folder per layer: cfg.json (architecture transcoder | skip_transcoder |
                    jumprelu_transcoder, or standard | jumprelu | topk with hook_name_out; d_in, d_sae, d_out;
                    hook_name, hook_name_out, at the top or in metadata; k for topk) + sae_weights.safetensors:
                    W_enc [D, F], W_dec [F, D], b_enc, b_dec, threshold, W_skip [D_out, D_in]
Every refusal is one line (CheckpointError for the files, ConfigError for a config that does not fit the model).
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refprism.errors import CheckpointError, ConfigError

ACTIVATIONS = ("relu", "jumprelu", "topk")
INPUT_HOOKS = {"hook_resid_mid": "resid_mid", "hook_mlp_in": "resid_mid", "ln2.hook_normalized": "normalized",
               "mlp.hook_in": "ln2.out"}
OUTPUT_HOOKS = ("hook_mlp_out",)
SAE_LENS_ARCHITECTURES = {"transcoder": "relu", "skip_transcoder": "relu", "jumprelu_transcoder": "jumprelu",
                          "standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}


@dataclass
class Transcoder:
    """One layer's transcoder (the module docstring's math). W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D],
    threshold [F] (jumprelu) or None, k (topk) or None, relu: the gate also needs pre > 0, W_skip [D, D] or None."""

    layer: int
    W_enc: np.ndarray
    b_enc: np.ndarray
    W_dec: np.ndarray
    b_dec: np.ndarray
    activation: str
    threshold: np.ndarray | None = None
    k: int | None = None
    relu: bool = True
    W_skip: np.ndarray | None = None
    source: str = ""

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def gate(self, pre) -> np.ndarray:
        """The activation's 0/1 factor: act = gate * pre.  Shapes: pre [T, F] -> [T, F] (pre's dtype)."""
        if self.activation == "relu":
            on = pre > 0
        elif self.activation == "jumprelu":
            on = pre > self.threshold
            if self.relu:
                on &= pre > 0
        else:
            k = min(self.k, pre.shape[-1])
            top = np.argpartition(-pre, k - 1, axis=-1)[..., :k]
            on = np.zeros(pre.shape, bool)
            np.put_along_axis(on, top, True, axis=-1)
            if self.relu:
                on &= pre > 0
        return on.astype(pre.dtype)


@dataclass
class Transcoders:
    """A transcoder for every layer 0 .. L-1, reading `input_hook` (INPUT_HOOKS' values) and writing mlp.out."""

    layers: list
    input_hook: str  # "resid_mid", "normalized" or "ln2.out"
    hook_names: tuple  # (the files' input hook, output hook)
    format: str  # "gemmascope", "circuit-tracer" or "sae-lens"
    source: str

    @property
    def skip(self) -> bool:
        return any(tc.W_skip is not None for tc in self.layers)

    def check(self, cfg) -> None:
        """Refuse (ConfigError, one line) transcoders that do not fit the model: layer count, d_model."""
        if len(self.layers) != cfg.n_layers:
            raise ConfigError(f"transcoders {self.source}: {len(self.layers)} layers for a model of {cfg.n_layers} "
                              f"(one transcoder per layer 0 .. {cfg.n_layers - 1} is needed)")
        for tc in self.layers:
            if tc.W_enc.shape[0] != cfg.d_model:
                raise ConfigError(f"transcoder {tc.source}: d_model {tc.W_enc.shape[0]}, the model's is "
                                  f"{cfg.d_model}")

    def as_dtype(self, dtype) -> Transcoders:
        """The same transcoders with every array in `dtype` (the model's)."""
        def cast(a):
            return None if a is None else np.asarray(a, dtype)

        layers = [Transcoder(tc.layer, cast(tc.W_enc), cast(tc.b_enc), cast(tc.W_dec), cast(tc.b_dec), tc.activation,
                             cast(tc.threshold), tc.k, tc.relu, cast(tc.W_skip), tc.source) for tc in self.layers]
        return Transcoders(layers, self.input_hook, self.hook_names, self.format, self.source)


# ------------------------------------------------------------------------------------------------- reading


def read_transcoders(path) -> Transcoders:
    """Transcoders from a folder, one file, or a glob pattern (the module docstring's formats), every shape checked.

    A folder with config.yaml: circuit-tracer's; with cfg.json: one SAE Lens transcoder; else its layer files
    (layer_{l}.safetensors, layer_{l}/.../params.npz, or SAE Lens folders holding cfg.json), found recursively.
    Every refusal is one line: a line break or other unprintable character of a path is shown escaped.
    """
    try:
        ts = _read(path)
    except CheckpointError as e:
        raise CheckpointError(_one_line(str(e))) from None
    except OSError as e:  # a name too long, a folder that cannot be listed
        raise CheckpointError(_one_line(f"transcoders {path}: {e.strerror or type(e).__name__}")) from None
    ts.source = _one_line(ts.source)
    for tc in ts.layers:
        tc.source = _one_line(tc.source)
    return ts


def _one_line(text) -> str:
    """text with each unprintable character (a line break in a file name) escaped, at most 1000 characters."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return out if len(out) <= 1000 else out[:480] + " ... " + out[-480:]


def _read(path) -> Transcoders:
    text = str(path)
    if "\0" in text:
        raise CheckpointError("transcoders: the path holds a NUL character")
    p = Path(text)
    if p.is_dir() and (p / "config.yaml").is_file():
        return _circuit_tracer(p)
    if any(c in text for c in "*?["):
        found = sorted(glob.glob(text, recursive=True))
        if not found:
            raise CheckpointError(f"transcoders {text}: the pattern matches no file")
        return _layer_files([Path(f) for f in found], text)
    if p.is_dir():
        if (p / "cfg.json").is_file():
            return _assemble([_sae_lens(p)], text)
        found = sorted({q.parent if (q.parent / "cfg.json").is_file() else q  # an SAE Lens folder: one layer
                        for q in _files_under(p, text) if q.suffix in (".npz", ".safetensors")
                        or q.name == "cfg.json"})
        if not found:
            raise CheckpointError(f"transcoders {text}: no .npz, .safetensors or cfg.json under the folder")
        return _layer_files(found, text)
    if p.is_file():
        return _layer_files([p], text)
    raise CheckpointError(f"transcoders {text}: no such file or folder")


WALK_DEPTH, WALK_ENTRIES = 4, 20_000  # GemmaScope's deepest layout: layer_12/width_16k/average_l0_76/params.npz


def _files_under(folder: Path, text: str) -> list[Path]:
    """The files at most WALK_DEPTH folders below `folder`, refusing a folder with more than WALK_ENTRIES entries
    (`--transcoders /` must not walk the whole disk)."""
    files, seen, level = [], 0, [folder]
    for _ in range(WALK_DEPTH + 1):
        deeper = []
        for d in level:
            try:
                entries = sorted(d.iterdir())
            except OSError:
                continue
            seen += len(entries)
            if seen > WALK_ENTRIES:
                raise CheckpointError(f"transcoders {text}: over {WALK_ENTRIES:,} entries under the folder; give the "
                                      "transcoders' own folder or a glob pattern of their files")
            for q in entries:
                if q.is_dir() and not q.is_symlink():
                    deeper.append(q)
                elif q.is_file():
                    files.append(q)
        level = deeper
    return files


def _layer_files(paths, source) -> Transcoders:
    """One transcoder per path (a GemmaScope / circuit-tracer-layout file, or an SAE Lens folder)."""
    one = []
    for q in paths:
        if q.is_dir() or q.name in ("cfg.json", "sae_weights.safetensors"):
            folder = q if q.is_dir() else q.parent
            if not (folder / "cfg.json").is_file():
                continue
            one.append(_sae_lens(folder))
        elif q.suffix in (".npz", ".safetensors"):
            one.append(_gemmascope_or_plain(q))
    if not one:
        raise CheckpointError(f"transcoders {source}: no transcoder file among the matches")
    return _assemble(one, source)


def _assemble(items, source) -> Transcoders:
    """items: (Transcoder, format, (input hook, output hook)) -> Transcoders, refusing gaps, doubles, mixed hooks."""
    by_layer = {}
    for tc, fmt, hooks in items:
        if tc.layer in by_layer:
            first = by_layer[tc.layer][0].source
            raise CheckpointError(f"transcoders {source}: two files for layer {tc.layer} ({first}, {tc.source})")
        by_layer[tc.layer] = (tc, fmt, hooks)
    missing = sorted(set(range(max(by_layer) + 1)) - set(by_layer))
    if missing:
        raise CheckpointError(f"transcoders {source}: no transcoder for layer {missing[0]} (layers 0 .. "
                              f"{max(by_layer)} are needed without a gap)")
    layers = [by_layer[l] for l in range(len(by_layer))]
    hooks = {h for _, _, h in layers}
    if len(hooks) > 1:
        raise CheckpointError(f"transcoders {source}: the layers read or write different hooks ({sorted(hooks)})")
    (h_in, h_out), = hooks
    d = {tc.W_enc.shape[0] for tc, _, _ in layers}
    if len(d) > 1:
        raise CheckpointError(f"transcoders {source}: the layers have different d_model ({sorted(d)})")
    return Transcoders([tc for tc, _, _ in layers], _input_hook(h_in, source), (h_in, h_out), layers[0][1], source)


def _hook(name, layer, source, kind) -> str:
    """'blocks.{l}.ln2.hook_normalized' or 'ln2.hook_normalized' -> 'ln2.hook_normalized' (the layer checked)."""
    if not isinstance(name, str):
        raise CheckpointError(f"transcoder {source}: the {kind} hook name is missing")
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m:
        if layer is not None and int(m.group(1)) != layer:
            raise CheckpointError(f"transcoder {source}: the {kind} hook {name} is not at layer {layer}")
        name = m.group(2)
    known = INPUT_HOOKS if kind == "input" else OUTPUT_HOOKS
    if name not in known:
        raise CheckpointError(f"transcoder {source}: unknown {kind} hook {name!r} (known: {', '.join(known)})")
    return name


def _input_hook(name, source) -> str:
    return INPUT_HOOKS[_hook(name, None, source, "input")]


def _load_arrays(path: Path) -> dict:
    """A .npz (allow_pickle=False: an object array is refused) or a .safetensors file as NumPy arrays."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: np.asarray(z[k]) for k in z.files}
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    except Exception as e:  # noqa: BLE001  (a pickle in the npz, a truncated or foreign file: safetensors' own error)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"transcoder {path}: cannot be read ({first})") from None


def _layer_of(path: Path) -> int:
    m = re.findall(r"layer_(\d+)", str(path))
    if not m:
        raise CheckpointError(f"transcoder {path}: no layer_{{l}} in its path to say which layer it replaces")
    return int(m[-1])


def _gemmascope_or_plain(path: Path):
    """GemmaScope (threshold / w_enc keys: W_enc [D, F]) or circuit-tracer's layout (W_enc [F, D]) without its
    config: the latter needs config.yaml for its hooks, so it is refused here."""
    a = _load_arrays(path)
    layer = _layer_of(path)
    if "threshold" in a and "W_enc" in a:
        tc = _checked(layer, a["W_enc"], a.get("b_enc"), a.get("W_dec"), a.get("b_dec"), "jumprelu",
                      threshold=a["threshold"], relu=True, source=str(path), keys=a)
    elif "w_enc" in a:  # GemmaScope 2
        skip = a.get("affine_skip_connection")
        tc = _checked(layer, a["w_enc"], a.get("b_enc"), a.get("w_dec"), a.get("b_dec"), "jumprelu",
                      threshold=a.get("threshold"), relu=True, W_skip=None if skip is None else skip.T,
                      source=str(path), keys=a)
    else:
        raise CheckpointError(f"transcoder {path}: not a GemmaScope file (no threshold / w_enc); circuit-tracer's "
                              "layer files need their config.yaml (give its folder)")
    return tc, "gemmascope", ("ln2.hook_normalized", "hook_mlp_out")


def _circuit_tracer(folder: Path) -> Transcoders:
    """circuit-tracer's config.yaml (model_kind transcoder_set) and its per-layer safetensors."""
    try:
        import yaml  # PyYAML: not a core dependency (transformers, in the test extras, brings it)
    except ImportError:
        raise CheckpointError(f"transcoders {folder}/config.yaml: reading circuit-tracer's config needs PyYAML: "
                              "pip install pyyaml") from None

    try:
        cfg = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"transcoders {folder}/config.yaml: not YAML ({type(e).__name__})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"transcoders {folder}/config.yaml: not a mapping")
    kind = cfg.get("model_kind", "transcoder_set")
    if kind != "transcoder_set":
        raise CheckpointError(f"transcoders {folder}/config.yaml: model_kind {kind!r} (only per-layer transcoders, "
                              "transcoder_set, are read; cross-layer transcoders are not)")
    hooks = (cfg.get("feature_input_hook"), cfg.get("feature_output_hook"))
    _hook(hooks[0], None, f"{folder}/config.yaml", "input")
    _hook(hooks[1], None, f"{folder}/config.yaml", "output")
    activation = cfg.get("activation")
    if activation not in (None, "relu", "topk", "jumprelu"):
        raise CheckpointError(f"transcoders {folder}/config.yaml: unknown activation {activation!r}")
    if "transcoders" in cfg:
        paths = [folder / str(q) for q in cfg["transcoders"]]
        if any(str(q).startswith("hf://") for q in cfg["transcoders"]):
            raise CheckpointError(f"transcoders {folder}/config.yaml: hf:// paths are not fetched; download the "
                                  "files and list local paths")
    else:
        paths = sorted(folder.glob("layer_*.safetensors"), key=lambda q: _layer_of(q))
    if not paths:
        raise CheckpointError(f"transcoders {folder}: config.yaml lists no layer files and none is in the folder")
    items = []
    for i, q in enumerate(paths):
        if not q.is_file():
            raise CheckpointError(f"transcoders {folder}/config.yaml: layer {i}'s file {q} does not exist")
        layer = _layer_of(q) if "transcoders" not in cfg else i
        if q.suffix == ".npz":  # circuit-tracer reads GemmaScope's npz files listed in a config as GemmaScope's
            tc = _gemmascope_or_plain(q)[0]
            tc.layer = layer
            items.append((tc, "circuit-tracer", hooks))
            continue
        a = _load_arrays(q)
        if "W_enc" not in a:
            raise CheckpointError(f"transcoder {q}: no W_enc (circuit-tracer's keys: W_enc, W_dec, b_enc, b_dec)")
        thr = a.get("activation_function.threshold")
        act = activation or ("jumprelu" if thr is not None else "relu")
        k = cfg.get("k") if act == "topk" else None
        if act == "topk" and k is None:
            k = int(np.asarray(a["k"])) if "k" in a else None
        skip = a.get("W_skip")
        tc = _checked(layer, a["W_enc"].T, a.get("b_enc"), a.get("W_dec"), a.get("b_dec"), act, threshold=thr, k=k,
                      relu=False, W_skip=None if skip is None else skip.T, source=str(q), keys=a)
        items.append((tc, "circuit-tracer", hooks))
    return _assemble(items, str(folder))


def _sae_lens(folder: Path):
    """One SAE Lens transcoder: cfg.json + sae_weights.safetensors."""
    src = str(folder)
    try:
        cfg = json.loads((folder / "cfg.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"transcoder {src}/cfg.json: not JSON ({type(e).__name__})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"transcoder {src}/cfg.json: not a JSON object")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    arch = cfg.get("architecture")
    if arch not in SAE_LENS_ARCHITECTURES:
        raise CheckpointError(f"transcoder {src}/cfg.json: architecture {arch!r} is not one of "
                              f"{', '.join(SAE_LENS_ARCHITECTURES)}")
    h_in = meta.get("hook_name", cfg.get("hook_name"))
    h_out = meta.get("hook_name_out", cfg.get("hook_name_out"))
    if h_out is None:
        raise CheckpointError(f"transcoder {src}/cfg.json: no hook_name_out (an SAE that reads and writes one hook "
                              "is not a transcoder: it cannot replace an MLP)")
    m = re.fullmatch(r"blocks\.(\d+)\..+", str(h_in))
    if not m:
        raise CheckpointError(f"transcoder {src}/cfg.json: hook_name {h_in!r} names no layer (blocks.{{l}}.<hook>)")
    layer = int(m.group(1))
    h_in, h_out = _hook(h_in, layer, src, "input"), _hook(h_out, layer, src, "output")
    for key, bad in (("normalize_activations", "none"), ("reshape_activations", "none")):
        if cfg.get(key, bad) not in (bad, None):
            raise CheckpointError(f"transcoder {src}/cfg.json: {key} {cfg[key]!r} is not supported (only 'none')")
    for key in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm"):
        if cfg.get(key) and arch in ("standard", "jumprelu", "topk"):
            raise CheckpointError(f"transcoder {src}/cfg.json: {key} is not supported")
    weights = folder / "sae_weights.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"transcoder {src}: no sae_weights.safetensors beside cfg.json")
    a = _load_arrays(weights)
    if "W_enc" not in a:
        raise CheckpointError(f"transcoder {weights}: no W_enc (SAE Lens' keys: W_enc, W_dec, b_enc, b_dec)")
    act = SAE_LENS_ARCHITECTURES[arch]
    skip = a.get("W_skip")
    if arch == "skip_transcoder" and skip is None:
        raise CheckpointError(f"transcoder {weights}: a skip_transcoder without W_skip")
    tc = _checked(layer, a["W_enc"], a.get("b_enc"), a.get("W_dec"), a.get("b_dec"), act, threshold=a.get("threshold"),
                  k=cfg.get("k"), relu=True, W_skip=None if skip is None else skip.T, source=src, keys=a)
    for key, size in (("d_in", tc.W_enc.shape[0]), ("d_sae", tc.d_sae), ("d_out", tc.W_dec.shape[1])):
        if key in cfg and cfg[key] != size:
            raise CheckpointError(f"transcoder {src}: cfg.json says {key} {cfg[key]}, the weights have {size}")
    return tc, "sae-lens", (h_in, h_out)


def _checked(layer, W_enc, b_enc, W_dec, b_dec, activation, *, threshold=None, k=None, relu=True, W_skip=None,
             source, keys) -> Transcoder:
    """Every array present, floating, and of the shapes W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D]."""
    for name, value in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
        if value is None:
            raise CheckpointError(f"transcoder {source}: no {name} (its keys: {', '.join(sorted(keys))})")
        if not np.issubdtype(np.asarray(value).dtype, np.floating):
            raise CheckpointError(f"transcoder {source}: {name} is {np.asarray(value).dtype}, not floating point")
    if W_enc.ndim != 2:
        raise CheckpointError(f"transcoder {source}: W_enc has shape {list(W_enc.shape)}, not [d_model, d_sae]")
    D, F = W_enc.shape
    want = {"b_enc": (F,), "W_dec": (F, D), "b_dec": (D,)}
    if activation == "jumprelu":
        if threshold is None:
            raise CheckpointError(f"transcoder {source}: a JumpReLU transcoder without its threshold")
        want["threshold"] = (F,)
    if W_skip is not None:
        want["W_skip"] = (D, D)
    for name, value in (("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec), ("threshold", threshold),
                        ("W_skip", W_skip)):
        if name in want and tuple(value.shape) != want[name]:
            raise CheckpointError(f"transcoder {source}: {name} has shape {list(value.shape)}, expected "
                                  f"{list(want[name])} for d_model {D}, d_sae {F}")
    if activation == "topk" and (k is None or int(k) < 1):
        raise CheckpointError(f"transcoder {source}: a TopK transcoder needs k >= 1 (got {k})")
    return Transcoder(layer, W_enc, b_enc, W_dec, b_dec, activation, threshold, None if k is None else int(k), relu,
                      W_skip, source)
