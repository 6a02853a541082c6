"""Figures of the interventions (refprism.interventions): where the frozen prisms agree with causal effects.

Optional like refprism/figures.py, whose helpers they reuse: matplotlib is imported inside the functions, figures
are `matplotlib.figure.Figure` objects built by the `_*_fig` functions (which tests inspect) and saved atomically.

    validation_figure(v, path)   three panels: prism vs total (scatter, y = x), the gap decomposition of the
                                 largest components (prism + post-norm rescaling + final norm rescaling + mediated
                                 = total), the faithfulness
                                 curve (fraction recovered against k, with the 80% and 90% lines); for a
                                 validate(methods=...) result one more: each method's score vs total (y = x), its
                                 Spearman, top-k recall and passes in the legend
    patch_figure(p, path)        one component: prism, direct and total per readout column, and the two gaps
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from refprism.figures import _colors, _figure, _legend_below, _text, _write

# The gap decomposition's parts, in the order they add up to the total, and their colours.
PARTS = (("prism (frozen term)", "tab:blue"), ("post-norm rescaling", "tab:red"),
         ("final norm rescaling", "tab:orange"), ("mediated = total - direct", "tab:green"))


def validation_figure(v, path, *, top=20) -> Path:
    """Write the validation's three panels for its agreement column (see the module docstring)."""
    return _write(path, lambda: _validation_fig(v, top=top))


def patch_figure(p, path) -> Path:
    """Write one component's prism, direct and total effect per readout column, with the gaps between them."""
    return _write(path, lambda: _patch_fig(p))


def _validation_fig(v, *, top=20):
    methods = getattr(v, "methods", None)  # a MethodsValidation: its validation, and a panel for the methods
    if methods is not None:
        found, v = v, v.validation
    z = v.column
    rows = np.flatnonzero(v.verified)
    prism, direct, total = v.prism[rows, z], v.direct[rows, z], v.total[rows, z]
    post, final = v.post_norm_rescaling[rows, z], v.final_norm_rescaling[rows, z]
    labels = [v.labels[i] for i in rows]
    panels = (3 if v.faithfulness is not None else 2) + (methods is not None)
    fig = _figure(6.0 * panels, 6.0)
    axes = fig.subplots(1, panels, squeeze=False)[0]

    ax = axes[0]  # prism vs total
    ax.scatter(prism, total, s=14, color="tab:blue", alpha=0.8, label="re-run component")
    lim = float(np.nanmax(np.abs(np.concatenate([prism, total])))) * 1.08 or 1.0
    ax.plot([-lim, lim], [-lim, lim], color="0.5", lw=0.8, ls="--", label="total = prism")
    ax.axhline(0, color="0.8", lw=0.6), ax.axvline(0, color="0.8", lw=0.6)
    for i in np.argsort(-np.abs(total))[:6]:
        ax.annotate(_text(labels[i]), (prism[i], total[i]), xytext=(3, 3), textcoords="offset points",
                    fontsize="x-small")
    a = v.agreement
    rho = "n/a" if a["spearman"] is None else f"{a['spearman']:.2f}"
    tau = "n/a" if a["kendall"] is None else f"{a['kendall']:.2f}"
    ax.set_title(f"prism vs total ({len(rows)} re-run)\nSpearman {rho}, Kendall {tau}, signs {a['sign_agreement']:.2f}",
                 fontsize="medium")
    ax.set_xlabel("prism (frozen term)")
    ax.set_ylabel("total effect (full re-run)")
    ax.legend(fontsize="small", loc="upper left")

    ax = axes[1]  # the gap, per component: prism + post-norm + final norm rescaling + mediated = total
    order = np.argsort(-np.abs(total), kind="stable")[:top]
    parts = np.stack([prism[order], post[order], final[order], (total - direct)[order]], axis=1)  # [C, 4]
    _stacked(ax, [labels[i] for i in order], parts)
    ax.scatter(total[order], np.arange(len(order)), marker="D", color="black", s=16, zorder=3, label="total")
    ax.set_title(f"the gap, for the {len(order)} largest totals", fontsize="medium")
    ax.set_xlabel("effect on the readout")
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=2)

    if v.faithfulness is not None:  # the fraction recovered against k
        f = v.faithfulness
        ax = axes[2]
        k = np.asarray(f["k"])
        rec = np.asarray([np.nan if r is None else r for r in f["recovered"]], dtype=np.float64)
        ax.plot(k, rec, "-o", ms=3, color="tab:purple")
        for level, key, ls in ((0.8, "k80", ":"), (0.9, "k90", "--")):
            ax.axhline(level, color="0.5", lw=0.8, ls=ls, label=f"{level:.0%}: k = {f[key]}")
        if k.max() > 40:  # a geometric grid: spread it out, and label the ticks as plain numbers
            from matplotlib.ticker import ScalarFormatter

            ax.set_xscale("symlog", linthresh=1)
            steps = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10**4, 2 * 10**4, 5 * 10**4,
                                 10**5, 2 * 10**5) if t < 0.7 * k.max()]
            ax.set_xticks([0] + steps + [int(k.max())])
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.set_xlim(left=0)
        ax.set_xlabel(f"k: components kept clean, by |prism| (the rest {f['ablate']}-ablated)")
        ax.set_ylabel("fraction of the readout recovered")
        ax.set_title("circuit faithfulness", fontsize="medium")
        ax.legend(fontsize="small", loc="lower right")
    if methods is not None:  # each method's score against the total
        ax = axes[-1]
        colors = _colors(len(methods) + 1)
        ax.scatter(total, prism, s=10, color=colors[0], alpha=0.7, label=_method_label("prism", v.agreement, None))
        for (m, a), color in zip(methods.items(), colors[1:]):
            ax.scatter(total, found.scores(m)[:, z], s=10, color=color, alpha=0.7,
                       label=_method_label(m, found.agreement(m), a.cost))
        ax.plot([-lim, lim], [-lim, lim], color="0.5", lw=0.8, ls="--")
        ax.axhline(0, color="0.8", lw=0.6), ax.axvline(0, color="0.8", lw=0.6)
        ax.set_xlabel("total effect (full re-run)")
        ax.set_ylabel("the method's score")
        ax.set_title("each method against the total (y = x)", fontsize="medium")
        ax.legend(fontsize="x-small", loc="upper left")
    s = v.setting
    fig.suptitle(f"validation at level {_text(v.level)}: {_text(v.columns[z])} at position {s.position} "
                 f"({_text(s.clean.pieces[s.position])}); {s.ablate}, {s.direction}")
    return fig


def _method_label(name, agreement, cost) -> str:
    rho = "n/a" if agreement["spearman"] is None else f"{agreement['spearman']:.2f}"
    passes = "" if cost is None else f", {cost['forward']} + {cost['backward']} passes"
    return f"{_text(name)}: Spearman {rho}, top-k recall {agreement['top_k_recall']:.2f}{passes}"


def _patch_fig(p):
    Z = len(p.columns)
    fig = _figure(max(6.0, 2.5 * Z + 3.0), 4.8)
    ax = fig.subplots()
    at = np.arange(Z)
    width = 0.25
    colors = _colors(3)
    for i, (name, values) in enumerate((("prism (frozen term)", p.prism), ("direct (norms recomputed)", p.direct),
                                         ("total (full re-run)", p.total))):
        ax.bar(at + (i - 1) * width, values, width, color=colors[i], label=name)
    ax.set_xticks(at, labels=[_text(c) for c in p.columns])
    ax.axhline(0, color="0.4", lw=0.8)
    ax.set_ylabel("effect on the readout (clean - replaced)")
    gaps = "; ".join(f"{_text(c)}: norm rescaling {r:.3g}, mediated {m:.3g}"
                     for c, r, m in zip(p.columns, p.norm_rescaling, p.mediated))
    s = p.setting
    ax.set_title(f"{_text(p.component)} {s.ablate}-ablated ({s.direction}) at position(s) "
                 f"{','.join(map(str, s.at))}\n{gaps}", fontsize="medium")
    _legend_below(fig, ax)
    return fig


def _stacked(ax, labels, parts):
    """Horizontal bars of parts [C, len(PARTS)], stacked from 0 with negative parts stacked leftwards."""
    C = len(labels)
    pos_left, neg_left = np.zeros(C), np.zeros(C)
    for j, (name, color) in enumerate(PARTS):
        v = parts[:, j]
        left = np.where(v >= 0, pos_left, neg_left)
        ax.barh(np.arange(C), v, left=left, color=color, height=0.7, label=name)
        pos_left += np.where(v >= 0, v, 0)
        neg_left += np.where(v < 0, v, 0)
    ax.set_yticks(range(C), labels=[_text(l) for l in labels], fontsize="small")
    ax.invert_yaxis()
    ax.axvline(0, color="0.4", lw=0.8)
