"""The intervention commands: `patch` (one component in full detail), `validate` (a level's agreement report,
with attribution methods beside the prism: --methods) and `attribute` (a level scored by gradient methods)."""

from __future__ import annotations

import json
import sys

from refprism.cli.common import (
    RUN_SPELLING,
    _check_plot_path,
    _is_int,
    _prism_common,
    open_model,
    prompt_of,
    read_weights,
    short,
    shown,
)
from refprism.errors import InputError


def register(sub) -> None:
    p = sub.add_parser("patch", help="replace one component (zero, mean or resample): its prism term beside its "
                                     "direct and total effect, and the gap explained")
    _intervention_args(p)
    p.add_argument("--component", required=True, metavar="LABEL",
                   help="embed, L{l}.attn, L{l}.mlp, L{l}H{h}, L{l}H{h}.src{s} or L{l}N{n} (0-based, as the prisms)")
    p.add_argument("--source", type=int, help="with a head L{l}H{h}: only its term from this source token")
    p.set_defaults(func=cmd_patch)

    p = sub.add_parser("validate", help="every component of a level: prism vs total effect, their agreement, "
                                        "and circuit faithfulness")
    _intervention_args(p, work="many")
    p.add_argument("--level", required=True, metavar="LEVEL",
                   help="residual, heads, head-source:L, neurons:L, neurons or (Gemma 4 MoE) experts:L")
    p.add_argument("--top", type=int, default=10, help="k of the top-k metrics and of the faithfulness table "
                                                       "(default 10)")
    p.add_argument("--budget", type=int, default=256,
                   help="the most re-runs: a larger level re-runs the prism's top-k and a random sample of the rest "
                        "(default 256)")
    p.add_argument("--seed", type=int, default=0, help="the random sample's seed (default 0)")
    p.add_argument("--no-faithfulness", action="store_true", help="skip the faithfulness curve (its ~25 re-runs)")
    p.add_argument("--methods", metavar="M,M", help="attribution methods to set beside the prism, comma separated: "
                                                   "gradxact, atp, atp*, atp-gd, atp*-gd, ig (refprism/gradients/); "
                                                   "each "
                                                   "scores the components validate re-runs (ig: --steps re-runs "
                                                   "each, so at most --budget x --steps)")
    p.add_argument("--steps", type=int, default=8, help="ig's steps k (midpoint rule; default 8)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("attribute", help="score every component of a level by a gradient method (gradient x "
                                         "activation, AtP, AtP with GradDrop, integrated gradients), or every edge "
                                         "between components (EAP, EAP-IG)")
    _intervention_args(p, work="many")
    p.add_argument("--method", action="append", required=True, metavar="METHOD",
                   help="gradxact, atp, atp* (heads, resample), atp-gd, atp*-gd (heads, resample) or ig (repeatable); "
                        "or the edge methods eap, "
                        "eap-ig (resample; --level heads or neurons:L)")
    p.add_argument("--level", required=True, metavar="LEVEL",
                   help="residual, heads, head-source:L, neurons:L, neurons or (Gemma 4 MoE) experts:L (edges: "
                        "heads = heads and MLPs, neurons:L = layer L's MLP as its neurons)")
    p.add_argument("--steps", type=int, default=8, help="ig's and eap-ig's steps k (midpoint rule; default 8)")
    p.add_argument("--components", metavar="LABEL,LABEL",
                   help="score only these components of the level, comma separated (e.g. L3H1,L5H0: ig on a few "
                        "heads); not with eap, eap-ig")
    p.add_argument("--top", type=int, default=20, help="rows of the text table (default 20)")
    p.set_defaults(func=cmd_attribute)


def _intervention_args(p, work="one"):
    # the prompt, --position (the readout's), --targets, --versus, --json, --plot
    _prism_common(p, targets_default="the top token minus the runner-up (resample: minus the counterfactual's top "
                                     "token when it differs)", work=work)
    p.add_argument("--ablate", required=True, choices=["zero", "mean", "resample"],
                   help="zero; mean (over --reference prompts, or the prompt's own positions 1 .. T-1); resample "
                        "(the value in --counterfactual)")
    p.add_argument("--counterfactual", metavar="PROMPT2", help="the prompt resample takes values from (same token "
                                                               "count as the prompt)")
    p.add_argument("--counterfactual-ids", metavar="IDS", help="the counterfactual as token ids, e.g. 2,651,6037")
    p.add_argument("--reference", action="append", metavar="PROMPT",
                   help="a prompt of the mean set (repeatable); default: the prompt's own positions")
    p.add_argument("--direction", default="noising", choices=["noising", "denoising"],
                   help="noising (default): edit the clean run; denoising: edit the counterfactual run with clean "
                        "values")
    p.add_argument("--at", metavar="POSITIONS",
                   help="where the component is replaced: positions, comma separated, or 'all' (default: --position)")


def _at(args):
    if args.at is None or args.at == "all":
        return args.at
    items = [x.strip() for x in args.at.split(",")]
    if not items or not all(_is_int(x) for x in items):
        raise InputError(f"--at {short(args.at)}: give 'all' or positions separated by commas (e.g. 5 or 3,6)")
    return [int(x) for x in items]


def _counterfactual(args):
    if args.counterfactual is not None and args.counterfactual_ids is not None:
        raise InputError("give the counterfactual once: --counterfactual or --counterfactual-ids")
    if args.counterfactual_ids is None:
        return args.counterfactual
    try:
        ids = [int(t) for t in args.counterfactual_ids.replace(",", " ").split()]
    except ValueError:
        raise InputError(f"--counterfactual-ids must be integers separated by commas or spaces, got "
                         f"{short(args.counterfactual_ids)}") from None
    if not ids:
        raise InputError("--counterfactual-ids is empty: give token ids like 2,651,6037")
    return ids


def _options(args) -> dict:
    if args.plot:
        _check_plot_path(args.plot)
    return {"targets": args.targets, "versus": args.versus or (), "position": args.position, "at": _at(args),
            "ablate": args.ablate, "counterfactual": _counterfactual(args), "reference": args.reference,
            "direction": args.direction}


def _checked_model(args, options, prompt, *, component=None, level=None, work="one"):
    """The model with every argument of patch / validate checked before its weights are read: the prompts (their
    tokens, the counterfactual's count, the memory of a re-run), --position, --targets/--versus, --at and the
    component or level; then the weights."""
    from refprism import prisms
    from refprism.interventions.components import EMPTY_MEAN_SET, level_groups, parse_component
    from refprism.interventions.setting import _positions, check_options

    check_options(options["ablate"], options["direction"], options["counterfactual"],
                                options["reference"])
    model = open_model(args, work=work)
    T = len(model.check(prompt, edited=True, spelling=RUN_SPELLING))  # the clean run, and each re-run of it
    model.check(prompt, positions=args.position)  # --position in range, in the library's words
    p = args.position % T
    if options["counterfactual"] is not None:
        n = len(model.check(options["counterfactual"], spelling=RUN_SPELLING))
        if n != T:
            raise InputError(f"the counterfactual has {n} tokens and the prompt {T}: resample patching pairs "
                             "positions, so both need the same token count")
    means = [len(model.check(r, spelling=RUN_SPELLING)) for r in options["reference"] or ()] or [T]
    if options["ablate"] == "mean" and max(means) < 2:  # no position 1 .. T-1 to average
        raise InputError(str(EMPTY_MEAN_SET))
    if args.targets is not None:
        prisms.resolve_targets(model, args.targets, args.versus or ())
    at = _positions(options["at"], T, p)
    if component is not None:
        g = parse_component(model.config, component, T=T, source=args.source)
        if g.kind == "edge" and g.source[0] > max(at):
            raise InputError(f"source {g.source[0]} is out of range: it must be 0 .. {max(at)} (a head at position "
                             f"{max(at)} reads no later token)")
    if level is not None:
        level_groups(model.config, level, p)
    return read_weights(model)


def _heading(args, result, what) -> None:
    s = result.setting
    r, run = s.readout, s.clean
    print(f"{what}  model {s.model.name}  dtype {s.model.dtype}  readout at position {r.position} "
          f"({shown(run.pieces[r.position])})")
    print("tokens: " + " ".join(f"{i}:{shown(p)}" for i, p in enumerate(run.pieces)))
    if s.counterfactual is not None:
        print("counterfactual: " + " ".join(f"{i}:{shown(p)}" for i, p in enumerate(s.counterfactual.pieces)))
    print("targets: " + ", ".join(f"{shown(t.piece)} #{t.id}" for t in r.targets.targets + r.targets.versus))
    where = "all positions" if len(s.at) == len(run.tokens) > 1 else "position " + ",".join(map(str, s.at))
    means = {"mean": f" (the mean over positions 1 .. T-1 of {len(s.means)} prompt(s))",
             "resample": " (the counterfactual's value)"}.get(s.ablate, "")
    print(f"replaced at {where} by {s.ablate}{means}, {s.direction}; every effect = readout with the component clean "
          "- readout with it replaced")


def cmd_patch(args) -> int:
    from refprism.interventions import patch

    options = _options(args)
    prompt = prompt_of(args)
    model = _checked_model(args, options, prompt, component=args.component)
    args.progress.phase("running the prompt (and the counterfactual or references), then the patched re-run")
    result = patch(model, prompt, args.component, source=args.source, **options)
    if args.plot:
        from refprism.interventions import plots as plots_interventions

        plots_interventions.patch_figure(result, args.plot)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        _heading(args, result, f"patch {result.component}")
        print(result.table())
    if args.plot:
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def cmd_validate(args) -> int:
    from refprism.interventions import validate
    from refprism.interventions.validation import check_budget

    check_budget(args.top, args.budget, args.seed, flags=True)
    options = _options(args)
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    if methods is not None and not methods:
        raise InputError("--methods is empty: give methods separated by commas, e.g. atp,ig")
    prompt = prompt_of(args)
    model = _checked_model(args, options, prompt, level=args.level, work="many")
    args.progress.phase(f"running the prompt, then re-running each component of --level {args.level} (at most "
                        f"--budget {args.budget})" + ("" if args.no_faithfulness else " and the faithfulness curve")
                        + ("" if methods is None else f", and the attribution methods {', '.join(methods)}"))
    common = dict(level=args.level, top=args.top, budget=args.budget, seed=args.seed,
                  faithfulness=not args.no_faithfulness, **options)
    if methods is None:
        result = shown = validate(model, prompt, **common)
    else:
        from refprism.interventions.attribution import validate_methods

        shown = validate_methods(model, prompt, methods=methods, steps=args.steps, **common)
        result = shown.validation
    if args.plot:
        from refprism.interventions import plots as plots_interventions

        plots_interventions.validation_figure(shown, args.plot)  # with --methods: a panel of the methods
    if args.json:
        print(json.dumps(shown.to_json()))
    else:
        _heading(args, result, f"validate --level {result.level}")
        print(shown.table(top=max(args.top, 10)))
    if args.plot:
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def cmd_attribute(args) -> int:
    from refprism.interventions.attribution import attribute, check_method
    from refprism.interventions.edges import EDGE_METHODS

    if args.plot:
        raise InputError("attribute draws no figure: use validate --methods ... --plot for the validation figure")
    options = _options(args)
    for method in args.method:  # before the weights: the method and what it needs of the level and the ablation
        check_method(method, args.level, options["ablate"], args.steps)
    edge = {m in EDGE_METHODS for m in args.method}
    if len(edge) > 1:
        raise InputError("eap and eap-ig score edges, the other methods components: give one kind per command")
    edge = edge.pop()
    components = None
    if args.components is not None:
        components = [c.strip() for c in args.components.split(",") if c.strip()]
        if edge:
            raise InputError("eap and eap-ig score every edge of the level: --components picks components, not "
                             "edges")
        if not components:
            raise InputError("--components names no component: give labels of the level, comma separated")
    prompt = prompt_of(args)
    model = _checked_model(args, options, prompt, level=args.level, work="many")  # gradients: many passes
    args.progress.phase(f"running the prompt, then {', '.join(args.method)} over --level {args.level}")
    results = []
    for method in args.method:
        results.append(attribute(model, prompt, method=method, level=args.level, steps=args.steps,
                                 components=components, **options))
        prompt = results[0].setting.clean  # the same runs for every method
        if options["counterfactual"] is not None:
            options["counterfactual"] = results[0].setting.counterfactual
    if args.json:
        first = results[0].to_json()
        for key in ("method", "steps", "cost", "rule"):
            first.pop(key, None)
        first["methods"] = {r.method: {"cost": r.cost, "steps": r.steps, **({"rule": r.rule} if edge else {})}
                            for r in results}
        if edge:  # each edge: its label, its two ends under validate's labels, one number list per method
            first["edges"] = [{"label": l, "upstream": u, "downstream": d,
                               **{r.method: [float(x) for x in r.values[i]] for r in results}}
                              for i, (l, u, d) in enumerate(zip(results[0].labels, results[0].upstream,
                                                                results[0].downstream))]
        else:
            first["components"] = [{"label": l, **{r.method: [float(x) for x in r.values[i]] for r in results}}
                                   for i, l in enumerate(results[0].labels)]
        print(json.dumps(first))
        return 0
    _heading(args, results[0], f"attribute --level {args.level}")
    for r in results:
        print(r.table(top=args.top))
    return 0
