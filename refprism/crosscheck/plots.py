"""The figure of a comparison (`refprism compare --plot FILE.png`): error and floor along the depth.

Two panels side by side, one point per compared site in forward order (x: the site's index, labelled at each
layer's resid_pre and at the final sites), log scale y, everything relative to the site's scale (max |reference|)
so that sites of different sizes share an axis:

    left   inherited error max|theirs - reference| / scale (dots) and its floor (line)
    right  local error max|theirs - our op on their inputs| / scale (dots) and its local floor (line)

Diverging sites are red; the first divergence (left) and the first wrong op (right) get a vertical line and
their name. Zero errors are drawn at the bottom of the axis (a log scale has no 0). matplotlib is imported
lazily, as in refprism.figures, whose helpers this uses.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from refprism.figures import _figure, _text, _write


def compare_figure(result, path) -> Path:
    """Write the comparison's figure to a PNG (atomically); return the path."""
    return _write(path, lambda: _compare_fig(result))


def _series(result):
    """Per site: (relative error, relative floor, relative local error or nan, relative local floor or nan)."""
    rows = []
    for s in result.sites:
        scale = s.scale if s.scale > 0 else 1.0  # an all-zero reference: absolute errors
        rel = lambda x, scale=scale: np.nan if x is None else (x / scale if math.isfinite(x) else np.inf)  # noqa: E731
        rows.append((s.max_rel if math.isfinite(s.max_rel) else np.inf, rel(s.floor), rel(s.local_max_abs),
                     rel(s.local_floor)))
    return np.array(rows, dtype=np.float64).reshape(-1, 4)


def _compare_fig(result):
    data = _series(result)
    n = len(result.sites)
    fig = _figure(max(10.0, 0.12 * n + 6), 4.8)
    axes = fig.subplots(1, 2, sharey=True)
    positive = data[np.isfinite(data) & (data > 0)]
    bottom = 10 ** math.floor(math.log10(positive.min())) / 10 if positive.size else 1e-18
    top = 10 ** math.ceil(math.log10(positive.max())) * 10 if positive.size else 1.0
    x = np.arange(n)
    marks = {"left": result.first_divergence, "right": result.first_wrong_op}
    for ax, (err, floor, label, which, flag) in zip(axes, (
            (data[:, 0], data[:, 1], "inherited: |theirs - reference|", "left", "diverges"),
            (data[:, 2], data[:, 3], "local: |theirs - our op on their inputs|", "right", "local_diverges"))):
        shown = np.where(np.isfinite(err), np.clip(err, bottom, None), top)
        bad = np.array([getattr(s, flag) for s in result.sites], dtype=bool)
        ax.plot(x, np.clip(floor, bottom, None), "-", color="0.35", lw=1.2, label="floor")
        ax.scatter(x[~bad], shown[~bad], s=14, color="tab:blue", label="within floor", zorder=3)
        ax.scatter(x[bad], shown[bad], s=22, color="tab:red", label="above floor", zorder=4)
        ax.set_yscale("log")
        ax.set_ylim(bottom, top)
        ax.set_title(label)
        site = marks[which]
        if site is not None:
            i = [s.site for s in result.sites].index(site)
            ax.axvline(i, color="tab:red", lw=0.8, ls="--")
            name = "first divergence" if which == "left" else "first wrong op"
            ax.annotate(f"{name}: {_text(site)}", (i, top), xytext=(4, -12), textcoords="offset points",
                        fontsize="small", color="tab:red", va="top")
        ticks = [i for i, s in enumerate(result.sites)
                 if s.site.endswith(".resid_pre") or not s.site.startswith("blocks.")]
        ax.set_xticks(ticks, labels=[_text(_short(result.sites[i].site)) for i in ticks], rotation=90,
                      fontsize="small")
        ax.grid(True, which="major", axis="y", color="0.9")
    axes[0].set_ylabel("error / max |reference| at the site")
    axes[1].legend(loc="lower right", fontsize="small")
    fig.suptitle(_text(f"{result.model} vs {result.against} ({result.dtype}): {result.headline()}"),
                 fontsize="medium")
    return fig


def _short(site):
    """blocks.3.resid_pre -> L3; other names as they are."""
    if site.startswith("blocks.") and site.endswith(".resid_pre"):
        return "L" + site.split(".")[1]
    return site
