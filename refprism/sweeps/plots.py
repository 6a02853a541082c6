"""Figures of a sweep (`refprism sweep --plot`), drawn from its summary (summary.json, sweeps.summarize): means
over the data set with their bootstrap intervals.

Optional: matplotlib is imported inside the functions (`pip install 'refprism[plot]'`). Figures are built as
`matplotlib.figure.Figure` objects by the `_*_fig` functions (tests inspect them) and saved atomically by the
writers of refprism/figures.py.

    residual_figure   the mean residual prism: each component's mean with its interval, one series per column
    heads_figure      layers x heads heat map of the mean head terms (sources summed), one panel per column
    roles_figure      per role (and "other"), layers x heads heat map of the mean head x role terms, one colour scale
    neurons_figure    the top neurons across the data set, mean and interval
    write_figures(summary, folder) writes those the summary has data for: residual.png, heads.png, roles.png,
    neurons.png
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from refprism.errors import InputError
from refprism.figures import _colors, _figure, _legend_below, _text, _write, _x_labels

_HEAD = re.compile(r"^L(\d+)H(\d+)(?:\.(.+))?$")


def write_figures(summary, folder) -> list[Path]:
    """Write every figure the summary has data for into `folder`; return the paths written."""
    folder = Path(folder)
    prisms = {s["prism"] for s in summary["splits"]}
    written = []
    for prism, name, writer in (("residual", "residual.png", residual_figure), ("heads", "heads.png", heads_figure),
                                ("head-role", "roles.png", roles_figure), ("neurons", "neurons.png", neurons_figure)):
        if prism in prisms:
            written.append(writer(summary, folder / name))
    return written


def residual_figure(summary, path) -> Path:
    """Write the mean residual prism: x = components (embed, L0.attn, ...), y = the mean term over the prompts,
    bars = the 95% bootstrap interval; one series per column."""
    return _write(path, lambda: _residual_fig(summary))


def heads_figure(summary, path) -> Path:
    """Write the mean head terms (sources summed) as a heat map: rows = layers, columns = heads; one panel per
    readout column."""
    return _write(path, lambda: _heads_fig(summary))


def roles_figure(summary, path, *, column=0) -> Path:
    """Write, per role (and "other"), the mean head x role terms of one readout column: rows = layers, columns =
    heads, one colour scale for every panel (so roles compare)."""
    return _write(path, lambda: _roles_fig(summary, column=column))


def neurons_figure(summary, path) -> Path:
    """Write the top neurons across the data set (summary["top"]["neurons"]): mean and interval, one bar per
    column."""
    return _write(path, lambda: _neurons_fig(summary))


# ------------------------------------------------------------------------------------------------- figures


def _splits(summary, prism):
    found = [s for s in summary["splits"] if s["prism"] == prism]
    if not found:
        raise InputError(f"the summary has no {prism!r} splits (sweep with --levels including it)")
    return found


def _suptitle(fig, summary, what) -> None:
    """The headline and what was averaged, the figure widened so that the title fits (~9 characters an inch)."""
    s, b = summary["sweep"], summary["bootstrap"]
    text = (f"{what}\nmean over {s['prompts']} prompts of {_text(s['data']['file'])}, {b['confidence']:.0%} "
            f"bootstrap interval ({b['resamples']} resamples); model {_text(Path(s['model']['name']).name)}")
    fig.set_figwidth(max(fig.get_figwidth(), max(len(line) for line in text.splitlines()) / 9 + 0.5))
    fig.suptitle(text)


def _residual_fig(summary):
    split = _splits(summary, "residual")[0]
    comps = split["components"]
    labels = [c["label"] for c in comps]
    mean = np.array([c["mean"] for c in comps])  # [C, Z]
    ci = np.array([c["ci"] for c in comps])  # [C, Z, 2]
    C, Z = mean.shape
    fig = _figure(max(8.0, 0.3 * C + 3), 5.0)
    ax = fig.subplots()
    colors = _colors(Z)
    for z in range(Z):
        x = np.arange(C) + (z - (Z - 1) / 2) * 0.15
        err = np.stack([mean[:, z] - ci[:, z, 0], ci[:, z, 1] - mean[:, z]])
        whole = split["whole"]
        ax.errorbar(x, mean[:, z], yerr=err, fmt="-o", ms=4, capsize=2, color=colors[z],
                    label=f"{_text(summary['columns'][z])}: whole {whole['mean'][z]:.3g} "
                          f"[{whole['ci'][z][0]:.3g}, {whole['ci'][z][1]:.3g}]")
    _x_labels(ax, labels)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_ylabel(f"mean contribution to {_text(split['whole']['label'])}")
    _legend_below(fig, ax)
    _suptitle(fig, summary, "mean residual prism")
    return fig


def _grid(splits, column, role=None):
    """Head components of per-layer splits -> [L, N] means of one column (role None: the heads split)."""
    cells = {}
    for split in splits:
        for c in split["components"]:
            m = _HEAD.match(c["label"])
            if m and m.group(3) == role:
                cells[int(m.group(1)), int(m.group(2))] = c["mean"][column]
    if not cells:
        raise InputError(f"no head components{'' if role is None else f' for role {role!r}'} in the summary")
    L, N = (max(k[i] for k in cells) + 1 for i in (0, 1))
    grid = np.full((L, N), np.nan)
    for (l, h), v in cells.items():
        grid[l, h] = v
    return grid


def _heat(fig, ax, grid, vmax, title):
    im = ax.imshow(grid, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
    L, N = grid.shape
    if L * N <= 400:
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize="x-small",
                        color="white" if abs(v) > 0.6 * vmax else "black")
    ax.set_xticks(range(N), labels=[f"H{h}" for h in range(N)])
    ax.set_yticks(range(L), labels=[f"L{l}" for l in range(L)])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize="medium")
    fig.colorbar(im, ax=ax, shrink=0.8)


def _heads_fig(summary):
    splits = _splits(summary, "heads")
    Z = len(summary["columns"])
    grids = [_grid(splits, z) for z in range(Z)]
    L, N = grids[0].shape
    fig = _figure(max(4.5, 0.6 * N + 2.5) * Z, max(4.0, 0.3 * L + 2.0))
    axes = fig.subplots(1, Z, squeeze=False)[0]
    for z, (ax, grid) in enumerate(zip(axes, grids)):
        _heat(fig, ax, grid, np.nanmax(np.abs(grid)) or 1.0, _text(summary["columns"][z]))
    _suptitle(fig, summary, "mean head terms (sources summed)")
    return fig


def _roles_fig(summary, *, column=0):
    splits = _splits(summary, "head-role")
    roles = list(dict.fromkeys(_HEAD.match(c["label"]).group(3) for s in splits for c in s["components"]))
    grids = [_grid(splits, column, role) for role in roles]
    vmax = max(np.nanmax(np.abs(g)) for g in grids) or 1.0
    L, N = grids[0].shape
    fig = _figure(max(3.5, 0.6 * N + 2.0) * len(roles), max(4.0, 0.3 * L + 2.0))
    axes = fig.subplots(1, len(roles), squeeze=False)[0]
    named = {c["label"].split(".", 1)[1]: c.get("prompts_named") for s in splits for c in s["components"]}
    n = summary["sweep"]["prompts"]
    for ax, role, grid in zip(axes, roles, grids):
        count = "" if named.get(role) is None else f" (named in {named[role]} of {n})"
        _heat(fig, ax, grid, vmax, f"{_text(role)}{count}")
    _suptitle(fig, summary, f"mean head x role terms of {_text(summary['columns'][column])}")
    return fig


def _neurons_fig(summary):
    rows = summary["top"].get("neurons") or []
    if not rows:
        raise InputError("the summary has no neurons (sweep with --levels including neurons:K)")
    mean = np.array([r["mean"] for r in rows])  # [C, Z]
    ci = np.array([r["ci"] for r in rows])  # [C, Z, 2]
    C, Z = mean.shape
    fig = _figure(9.0, 2.0 + C * (0.15 + 0.1 * Z))
    ax = fig.subplots()
    colors = _colors(Z)
    width = 0.8 / Z
    for z in range(Z):
        at = np.arange(C) + (z - (Z - 1) / 2) * width
        err = np.stack([mean[:, z] - ci[:, z, 0], ci[:, z, 1] - mean[:, z]])
        ax.barh(at, mean[:, z], width, xerr=err, capsize=2, color=colors[z], label=_text(summary["columns"][z]))
    ax.set_yticks(range(C), labels=[_text(r["label"]) for r in rows])
    ax.invert_yaxis()
    ax.axvline(0, color="0.4", lw=0.8)
    ax.set_xlabel("mean contribution to its layer's MLP term")
    _legend_below(fig, ax)
    _suptitle(fig, summary, f"top {C} neurons across the data set")
    return fig
