"""Figures of the logit prisms, one per figure of the post "Logit Prisms: Decomposing Transformer Outputs for
Mechanistic Interpretability" (neuralblog, 2024).

Optional: matplotlib is imported inside the functions (`pip install 'refprism[plot]'`), so importing this module
costs nothing. Figures are built as `matplotlib.figure.Figure` objects (no pyplot, no global state) by the
`_*_fig` functions, which tests inspect; the public writers validate the path, build, and save atomically
(refprism.figures: the shared helpers)
(a temporary file beside the target, then `os.replace`), returning the path written.

    figure_for(split, path)   dispatch on split.prism
    residual_figure           Fig 3 / Fig 7   per-component contributions (+ logit lens vs frozen running sum)
    attention_figure          Fig 4           heads x source tokens heatmap, one per target
    chain_figure              Fig 5           a pulled-back term split into the earlier residual
    map_figure                Fig 6           a frozen map applied to chosen inputs (e.g. country embeddings)
    mlp_figure                Fig 8           the top neurons of one MLP layer
    heads_figure              (Fig 4, summed) one bar per head, sources summed
    pca_figure                Fig 9           2-D PCA of unembedding rows, joined in order

Shapes as in prisms.py: C components, Z readout columns (targets), N heads, S source positions.
"""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

import numpy as np

from refprism.errors import InputError
from refprism.figures import _colors, _figure, _grouped_bars, _heatmap, _legend_below, _text, _write, _x_labels

_HEAD_SOURCE = re.compile(r"H(\d+)\.src(\d+)$")


def residual_figure(split, path, *, zoom_last=None) -> Path:
    """Write the post's Fig 3 (and Fig 7): each component's contribution to each target's logit.

    Panel 1: x = the components in order (embed, L0.attn, L0.mlp, ...), y = u . part, one line per target.
    Panel 2: the same, zoomed on the last `zoom_last` components (default: the last third).
    Panel 3 (logits readout only): x = running sum through each component, y = the frozen running sum
             (solid) beside the logit lens (dashed, final norm recomputed), one colour per target.
    """
    return _write(path, lambda: _residual_fig(split, zoom_last=zoom_last))


def attention_figure(split, path) -> Path:
    """Write the post's Fig 4: one heatmap per target, rows = heads H0..H{N-1}, columns = source tokens."""
    return _write(path, lambda: _attention_fig(split))


def chain_figure(split, path) -> Path:
    """Write the post's Fig 5: a pulled-back term (e.g. L14H5.src5) split into the residual parts it reads;
    y = the components (embed, L{j}.attn, L{j}.mlp), x = value, one bar per target."""
    return _write(path, lambda: _chain_fig(split))


def map_figure(split, path) -> Path:
    """Write the post's Fig 6: heatmap of a frozen map, rows = inputs (e.g. ▁France), columns = targets."""
    return _write(path, lambda: _map_fig(split))


def mlp_figure(split, path, *, top=20) -> Path:
    """Write the post's Fig 8: the `top` neurons by max |value| over targets; x = neuron, y = value per target."""
    return _write(path, lambda: _mlp_fig(split, top=top))


def heads_figure(split, path) -> Path:
    """Write each head's term (summed over sources) per target; x = head, y = value. Takes an attention or an
    attention-heads split."""
    return _write(path, lambda: _heads_fig(split))


def pca_figure(coords, labels, explained, path, *, title=None) -> Path:
    """Write the post's Fig 9: points coords [M, 2] labelled and joined in the given order; axes PC1, PC2 with
    the fraction of variance each explains."""
    return _write(path, lambda: _pca_fig(coords, labels, explained, title=title))


def figure_for(split, path, **kw) -> Path:
    """Write the figure that fits split.prism; keyword arguments go to that writer (e.g. top=, zoom_last=)."""
    writers = {"residual": residual_figure, "chain": chain_figure, "attention": attention_figure,
               "attention-heads": heads_figure, "mlp": mlp_figure, "map": map_figure}
    if split.prism not in writers:
        raise InputError(f"no figure for a {split.prism!r} split (known: {', '.join(writers)})")
    return writers[split.prism](split, path, **kw)


def _residual_fig(split, *, zoom_last=None):
    _expect(split, "residual", "chain")
    C, Z = split.values.shape
    k = max(1, math.ceil(C / 3)) if zoom_last is None else int(zoom_last)
    if not 1 <= k <= C:
        raise InputError(f"zoom_last must be 1 .. {C} (the number of components), got {zoom_last}")
    extras = split.extras
    lens = "logit_lens" in extras and "frozen_running_sum" in extras
    fig = _figure(max(8.0, 0.3 * C + 3), 3.8 * (2 + lens))
    axes = fig.subplots(2 + lens, 1, squeeze=False)[:, 0]
    colors = _colors(Z)
    for ax, lo in ((axes[0], 0), (axes[1], C - k)):
        for z in range(Z):
            ax.plot(range(lo, C), split.values[lo:, z], "-o", ms=4, color=colors[z], label=_legend(split, z))
        _x_labels(ax, split.labels[lo:], start=lo)
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_ylabel(f"contribution to {_text(split.whole_label)}")
    axes[0].set_title("every component")
    axes[1].set_title(f"zoom: the last {k} components")
    _legend_below(fig, axes[0])
    if lens:
        ax = axes[2]
        for z in range(Z):
            ax.plot(extras["frozen_running_sum"]["values"][:, z], "-o", ms=4, color=colors[z],
                    label=f"{_text(split.columns[z])} frozen running sum")
            ax.plot(extras["logit_lens"]["values"][:, z], "--s", ms=3, color=colors[z], alpha=0.8,
                    label=f"{_text(split.columns[z])} logit lens")  # colours as in the legend below
        _x_labels(ax, extras["logit_lens"]["labels"])
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_xlabel("residual after component")
        ax.set_ylabel("logit")
        ax.set_title("frozen running sum (solid) vs logit lens (dashed, final norm recomputed)")
    _suptitle(fig, split, f"{split.prism} prism of {split.whole_label}")
    return fig


def _attention_fig(split):
    _expect(split, "attention")
    grid = _head_source_grid(split)  # [N, S, Z]
    N, S, Z = grid.shape
    ncols = min(4, Z)
    nrows = math.ceil(Z / ncols)
    fig = _figure(max(4.5, 0.55 * S + 2.2) * ncols, max(3.0, 0.4 * N + 2.2) * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    sources = [_text(p) for p in split.readout.run.pieces[:S]]
    for z, ax in enumerate(axes):
        if z >= Z:
            ax.set_visible(False)
            continue
        im = _heatmap(ax, grid[:, :, z], annotate=N * S <= 160)
        ax.set_xticks(range(S), labels=sources, rotation=60, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(N), labels=[f"H{h}" for h in range(N)])
        ax.set_xlabel("source token")
        ax.set_ylabel("head")
        ax.set_title(f"{_text(split.columns[z])}   (sum {split.whole[z]:.4g})", fontsize="medium")
        fig.colorbar(im, ax=ax, shrink=0.9)
    _suptitle(fig, split, f"attention prism of {split.whole_label}: head x source")
    return fig


def _chain_fig(split):
    _expect(split, "chain", "residual")
    C, Z = split.values.shape
    fig = _figure(9.0, 2.2 + C * (0.12 + 0.07 * Z))
    ax = fig.subplots()
    _grouped_bars(ax, split.labels, split.values, [_legend(split, z) for z in range(Z)], horizontal=True)
    ax.set_xlabel(f"contribution to {_text(split.whole_label)}")
    ax.set_ylabel(f"residual part at {split.readout.site_name}")
    chain = " → ".join(("logits",) + split.readout.path)
    values = ", ".join(f"{_text(c)} {w:.4g}" for c, w in zip(split.columns, split.whole))
    _suptitle(fig, split, f"{split.whole_label} = {values}, split into the residual it reads ({chain})")
    return fig


def _map_fig(split):
    _expect(split, "map")
    M, Z = split.values.shape
    fig = _figure(max(5.0, 1.3 * Z + 3.0), max(3.0, 0.5 * M + 2.2))
    ax = fig.subplots()
    im = _heatmap(ax, split.values, annotate=M * Z <= 400, fontsize="small")
    ax.set_xticks(range(Z), labels=[_text(c) for c in split.columns], rotation=30, ha="right",
                  rotation_mode="anchor")
    ax.set_yticks(range(M), labels=[_text(l) for l in split.labels])
    ax.set_xlabel("target (readout column)")
    ax.set_ylabel("input (scaled embedding)")
    fig.colorbar(im, ax=ax, shrink=0.9)
    actual = ", ".join(f"{w:.3g}" for w in split.whole)
    _suptitle(fig, split, f"frozen map of {split.whole_label} applied to inputs (actual term: {actual})")
    return fig


def _mlp_fig(split, *, top=20):
    _expect(split, "mlp")
    if int(top) < 1:
        raise InputError(f"top must be at least 1, got {top}")
    rows = split.top(int(top))
    C, Z = split.values.shape
    fig = _figure(max(8.0, 0.12 * len(rows) * (Z + 1) + 3), 5.0)
    ax = fig.subplots()
    _grouped_bars(ax, [split.labels[i] for i in rows], split.values[rows], [_legend(split, z) for z in range(Z)])
    ax.set_xlabel(f"neuron (top {len(rows)} of {C} by max |value| over targets)")
    ax.set_ylabel(f"contribution to {_text(split.whole_label)}")
    _suptitle(fig, split, f"MLP prism of {split.whole_label}")
    return fig


def _heads_fig(split):
    _expect(split, "attention-heads", "attention")
    if split.prism == "attention":
        from refprism.prisms.splits import head_split

        split = head_split(split)
    C, Z = split.values.shape
    fig = _figure(max(6.0, 0.15 * C * (Z + 1) + 3), 4.5)
    ax = fig.subplots()
    _grouped_bars(ax, split.labels, split.values, [_legend(split, z) for z in range(Z)])
    ax.set_xlabel("head (summed over source tokens)")
    ax.set_ylabel(f"contribution to {_text(split.whole_label)}")
    _suptitle(fig, split, f"attention heads of {split.whole_label}")
    return fig


def _pca_fig(coords, labels, explained, *, title=None):
    coords = np.asarray(coords, dtype=np.float64)
    explained = np.asarray(explained, dtype=np.float64).ravel()
    labels = list(labels)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(labels) != len(coords) or explained.shape != (2,):
        raise InputError(f"pca_figure needs coords [M, 2], M labels and 2 explained-variance fractions; got "
                         f"coords {coords.shape}, {len(labels)} labels, explained {explained.shape}")
    fig = _figure(6.5, 5.5)
    ax = fig.subplots()
    ax.plot(coords[:, 0], coords[:, 1], "-o", color="tab:blue", lw=1, ms=5)
    for (x, y), label in zip(coords, labels):
        ax.annotate(_text(label), (x, y), xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"PC1 ({explained[0]:.1%} of variance)")
    ax.set_ylabel(f"PC2 ({explained[1]:.1%} of variance)")
    ax.set_title(_text(title) if title else "unembedding rows, 2-D PCA, joined in order")
    return fig


def _expect(split, *prisms):
    if split.prism not in prisms:
        raise InputError(f"this figure draws a {' or '.join(prisms)} split, got a {split.prism!r} split")


def _head_source_grid(split) -> np.ndarray:
    """Attention values [N*S, Z] (labels L{l}H{h}.src{s}, head-major) -> grid [N, S, Z]."""
    S = split.readout.position + 1
    C, Z = split.values.shape
    N = C // S
    found = [tuple(map(int, m.groups())) if (m := _HEAD_SOURCE.search(l)) else None for l in split.labels]
    if N * S != C or found != [(h, s) for h in range(N) for s in range(S)]:
        raise InputError(f"attention labels are not head-major L{{l}}H{{h}}.src{{s}} over {S} sources")
    return split.values.reshape(N, S, Z)


def _legend(split, z):
    return f"{_text(split.columns[z])} ({split.whole_label} {split.whole[z]:.4g})"


def _suptitle(fig, split, what):
    """The headline (wrapped to the figure's width), then the prompt window around the position read, that
    token in brackets, and the residual site read."""
    r = split.readout
    pieces, p = r.run.pieces, r.position
    lo, hi = max(0, p - 10), min(len(pieces), p + 4)
    shown = [f"[{_text(x)}]" if i == p else _text(x) for i, x in enumerate(pieces[lo:hi], start=lo)]
    prompt = ("… " if lo else "") + " ".join(shown) + (" …" if hi < len(pieces) else "")
    where = f"{prompt}   (position {p}, {r.site_name})"
    fig.set_figwidth(max(fig.get_figwidth(), len(where) / 9 + 0.5))  # ~9 title characters per inch
    headline = textwrap.fill(_text(what), max(40, int(fig.get_figwidth() * 9)))
    fig.suptitle(f"{headline}\n{where}")
