"""The prism commands: `residual`, `attention`, `mlp`, `chain`, `map`, `pca`."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from refprism.cli.common import (
    MODEL_HELP,
    _check_plot_path,
    _check_top,
    _head_args,
    _is_int,
    _prism_common,
    _readout,
    _show,
    memory_help,
    open_model,
    read_weights,
    short,
    shown,
)
from refprism.errors import InputError


def register(sub) -> None:
    p = sub.add_parser("residual", help="logits split into embed and each layer's attention and MLP (Fig 3/7)")
    _prism_common(p)
    p.set_defaults(func=cmd_residual)

    p = sub.add_parser("attention", help="layer L's attention term split into heads x source tokens (Fig 4)")
    _prism_common(p)
    p.add_argument("--layer", type=int, required=True, help="the layer (0-based)")
    p.add_argument("--top", type=int, default=20, help="rows in the table (default 20; JSON holds all)")
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("mlp", help="layer L's MLP term split into neurons (Fig 8)")
    _prism_common(p)
    p.add_argument("--layer", type=int, required=True, help="the layer (0-based)")
    p.add_argument("--part", default="neurons", metavar="PART",
                   help="neurons (default: the neurons, and on a Gemma 4 MoE layer each selected expert); Gemma 4: "
                        "moe (the dense branch and each selected expert), expert:E (expert E's neurons), ple (the "
                        "per-layer input term's token and embedding pieces)")
    p.add_argument("--top", type=int, default=20, help="rows in the table (default 20; JSON holds all)")
    p.set_defaults(func=cmd_mlp)

    p = sub.add_parser("chain", help="a head's term at a source token (or a neuron's term) split into the residual "
                                     "parts it read (Fig 5)")
    _prism_common(p)
    _head_args(p)
    p.add_argument("--then", action="append", default=[], metavar="STEP",
                   help="pull back further: head:L:H:S (a head of layer L at source S) or neuron:L:N; repeatable")
    p.add_argument("--split", default="residual", metavar="PRISM",
                   help="the last prism: residual (default), attention:L or mlp:L; Gemma 4 also moe:L, expert:L:E "
                        "and ple:L (mlp --part)")
    p.add_argument("--top", type=int, default=None, help="rows in the table (default: all)")
    p.set_defaults(func=cmd_chain)

    p = sub.add_parser("map", help="a head's frozen map at a source token applied to other tokens (Fig 6)")
    _prism_common(p)
    _head_args(p)
    p.add_argument("--inputs", nargs="+", required=True, metavar="TOKEN",
                   help="tokens whose scaled embeddings the frozen map is applied to (e.g. ▁France ▁Japan)")
    p.add_argument("--own-scale", action="store_true",
                   help="normalise each input by its own RMS instead of the norm scale frozen at the source")
    p.set_defaults(func=cmd_map)

    p = sub.add_parser("pca", help="2-D PCA of the targets' unembedding vectors, joined in order (Fig 9)")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 (default) or float64")
    p.add_argument("--memory", default="auto", choices=["auto", "fast", "low"],
                   help=memory_help("one") + " (pca reads only the targets' embedding rows: low converts only those)")
    p.add_argument("--targets", nargs="*", required=True, metavar="TOKEN", help="tokens, in the order to join")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--plot", metavar="FILE.png", help="write the figure")
    p.set_defaults(func=cmd_pca)


def cmd_residual(args) -> int:
    from refprism import prisms

    split = prisms.residual_prism(_readout(args))
    return _show(args, split, extra=_beyond_table(split))


@dataclass
class _Plan:
    """Where a chain of pull-backs stands (a readout's model, site and position, without its arrays): the prisms'
    argument checks run on it before any weight is read."""

    model: object
    site: int
    position: int

    @property
    def site_name(self) -> str:
        from refprism import prisms

        return prisms.site_name(self.site, self.model.config.n_layers)


def _layer_check(args, kind):
    """The check of a layer prism's --layer, for _readout."""
    def check(model, T, p):
        from refprism.prisms.readouts import _check_layer

        _check_layer(_Plan(model, 2 * model.config.n_layers, p), args.layer, kind)
    return check


def _beyond_table(split) -> str:
    """Per target: the frozen term, the direct effect with the final norm recomputed, running sums and lens."""
    ex = split.extras
    lines = []
    if "softcapped" in ex:  # Gemma 2: the whole above is pre-cap; the model's own (capped) values
        capped = "  ".join(f"{v:.4f}" for v in ex["softcapped"]["values"][0])
        lines.append(f"\nthe whole above is pre-cap; {ex['softcapped']['labels'][0]}: {capped}")
    for z, col in enumerate(split.columns):
        lines.append(f"\n{col}: frozen term | direct effect (norm recomputed) | frozen running sum | logit lens")
        for i, label in enumerate(split.labels):
            lines.append(f"  {label:<10} {split.values[i, z]:>11.4f} {ex['direct_effect']['values'][i, z]:>11.4f} "
                         f"{ex['frozen_running_sum']['values'][i, z]:>11.4f} {ex['logit_lens']['values'][i, z]:>11.4f}")
    return "\n".join(lines)


def cmd_attention(args) -> int:
    from refprism import prisms

    _check_top(args)
    split = prisms.attention_prism(_readout(args, _layer_check(args, "attn")), args.layer)
    return _show(args, split, top=args.top, extra="\nper head:\n" + prisms.head_split(split).table())


def cmd_mlp(args) -> int:
    _check_top(args)
    part = _part(args.part, args.layer)
    return _show(args, _split_of(_readout(args, _part_check(part)), part), top=args.top)


LAYER_PARTS = "neurons, moe, expert:E or ple"


def _part(text, layer) -> tuple:
    """mlp --part parsed: ("mlp", L), ("moe", L), ("expert", L, E) or ("ple", L)."""
    kind, _, arg = str(text).partition(":")
    if kind in ("neurons", "moe", "ple") and not arg:
        return ("mlp" if kind == "neurons" else kind, layer)
    if kind == "expert" and _is_int(arg):
        return ("expert", layer, int(arg))
    raise InputError(f"--part {short(text)}: use {LAYER_PARTS}")


def _check_part(plan, part) -> None:
    """A layer prism's checks on a _Plan (or a readout), before the weights are read."""
    from refprism.prisms.readouts import _check_layer

    kind, layer = part[0], part[1]
    cfg = plan.model.config
    if kind in ("moe", "expert") and not cfg.moe:
        raise InputError(f"{kind}: this model has no mixture of experts (Gemma 4 26B-A4B does)")
    if kind == "ple" and not cfg.ple:
        raise InputError("ple: this model has no per-layer embeddings (Gemma 4 E2B / E4B do)")
    if kind == "expert" and not 0 <= part[2] < cfg.n_experts:
        raise InputError(f"expert {part[2]} is out of range (layer {layer} has experts 0 .. {cfg.n_experts - 1})")
    _check_layer(plan, layer, {"attention": "attn", "ple": "ple"}.get(kind, "mlp"))


def _part_check(part):
    def check(model, T, p):
        _check_part(_Plan(model, 2 * model.config.n_layers, p), part)
    return check


def _split_of(readout, part):
    """The Split of a layer prism: attention, mlp (neurons), and Gemma 4's moe, expert and ple."""
    from refprism import prisms

    kind, layer, *rest = part
    return {"attention": prisms.attention_prism, "mlp": prisms.mlp_prism, "moe": prisms.moe_prism,
            "expert": prisms.expert_prism, "ple": prisms.ple_prism}[kind](readout, layer, *rest)


def _parse_int_fields(step, fields, expected):
    parts = step.split(":")
    if len(parts) != expected + 1:
        raise InputError(f"--then {short(step)}: expected {fields}")
    if not all(_is_int(x) for x in parts[1:]):
        raise InputError(f"--then {short(step)}: expected {fields} with integers")
    return [int(x) for x in parts[1:]]


def _steps(args) -> list[tuple]:
    """The pull-back steps: the first (--head/--source or --neuron) and each --then, parsed:
    ("head", layer, head, source) or ("neuron", layer, neuron)."""
    head = args.head is not None or args.source is not None
    if head == (args.neuron is not None):
        raise InputError("the first step is a head (--head H --source S) or a neuron (--neuron N): give one")
    if head and (args.head is None or args.source is None):
        raise InputError("a head step needs both --head and --source")
    steps = [("head", args.layer, args.head, args.source) if head else ("neuron", args.layer, args.neuron)]
    for step in getattr(args, "then", []):
        kind = step.split(":")[0]
        if kind == "head":
            steps.append(("head", *_parse_int_fields(step, "head:LAYER:HEAD:SOURCE", 3)))
        elif kind == "neuron":
            steps.append(("neuron", *_parse_int_fields(step, "neuron:LAYER:NEURON", 2)))
        else:
            raise InputError(f"--then {short(step)}: a step is head:LAYER:HEAD:SOURCE or neuron:LAYER:NEURON")
    return steps


def _last_split(args):
    """--split parsed: ("residual", None), ("attention", L), ("mlp", L), ("moe", L), ("expert", L, E), ("ple", L)."""
    kind, _, rest = args.split.partition(":")
    fields = rest.split(":") if rest else []
    if kind == "residual" and not fields:
        return kind, None
    if kind in ("attention", "mlp", "moe", "ple") and len(fields) == 1 and _is_int(fields[0]):
        return kind, int(fields[0])
    if kind == "expert" and len(fields) == 2 and all(map(_is_int, fields)):
        return kind, int(fields[0]), int(fields[1])
    raise InputError(f"--split {short(args.split)}: use residual, attention:LAYER or mlp:LAYER (Gemma 4: moe:LAYER, "
                     f"expert:LAYER:E, ple:LAYER)")


def _check_steps(args, last=None):
    """Every step's checks (and the last split's, and map's --inputs) on a _Plan, before the weights are read."""
    def check(model, T, p):
        from refprism import prisms

        plan = _Plan(model, 2 * model.config.n_layers, p)
        for kind, layer, *rest in _steps(args):
            if kind == "head":
                prisms.check_head(plan, layer, *rest)
                plan = _Plan(model, 2 * layer, rest[1])
            else:
                prisms.check_neuron(plan, layer, *rest)
                plan = _Plan(model, 2 * layer + 1, plan.position)
        if last is not None and last[0] != "residual":
            _check_part(plan, last)
        for t in getattr(args, "inputs", None) or ():
            prisms.resolve_token(model, t)
    return check


def _pull_back(args, last=None):
    from refprism import prisms

    readout = _readout(args, _check_steps(args, last))
    for kind, layer, *rest in _steps(args):
        if kind == "head":
            readout = prisms.through_head(readout, layer, *rest)
        else:
            readout = prisms.through_neuron(readout, layer, *rest)
    return readout


def cmd_chain(args) -> int:
    from refprism import prisms

    _check_top(args)
    last = _last_split(args)
    readout = _pull_back(args, last)
    split = prisms.residual_prism(readout) if last[0] == "residual" else _split_of(readout, last)
    return _show(args, split, top=args.top)


def cmd_map(args) -> int:
    from refprism import prisms

    readout = _pull_back(args)
    tokens = [prisms.resolve_token(readout.model, t) for t in args.inputs]
    split = prisms.apply_map(readout, prisms.scaled_embeddings(readout.model, tokens), [t.piece for t in tokens],
                             own_scale=args.own_scale)
    return _show(args, split)


def cmd_pca(args) -> int:
    from refprism import prisms

    if args.plot:
        _check_plot_path(args.plot)
    if len(args.targets) == 1:  # none: resolve_targets says so; one: the same words as prisms.unembedding_pca
        raise InputError("a 2-D PCA needs at least 2 tokens, got 1")
    model = open_model(args)
    tokens = prisms.resolve_targets(model, args.targets).targets
    read_weights(model)
    coords, explained = prisms.unembedding_pca(model, tokens)
    if args.plot:
        from refprism.prisms import plots

        plots.pca_figure(coords, [t.piece for t in tokens], explained, args.plot)
    if args.json:
        print(json.dumps({"prism": "pca", "model": model.name, "dtype": str(model.dtype),
                          "targets": [t.to_json() for t in tokens], "coords": coords.tolist(),
                          "explained_variance": explained.tolist()}))
    else:
        print(f"PCA of the unembedding rows: PC1 {explained[0]:.1%}, PC2 {explained[1]:.1%} of the variance")
        for t, (a, b) in zip(tokens, coords):
            print(f"  {shown(t.piece):<16} #{t.id:<8} {a:>10.4f} {b:>10.4f}")
    if args.plot:
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
