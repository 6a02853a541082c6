"""Shared figure helpers: matplotlib imported only when a figure is drawn (`pip install 'refprism[plot]'`),
`matplotlib.figure.Figure` objects (no pyplot, no global state), colours, legends, labels, and the atomic write
(a temporary file beside the target, then `os.replace`) of every capability's figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from refprism.errors import InputError
from refprism.files import atomic_write

_MISSING = "plots need matplotlib: pip install 'refprism[plot]'"


# ------------------------------------------------------------------------------------------------- helpers


def _mpl():
    """Import what the figures need, or say how to install it."""
    try:
        from matplotlib import colormaps
        from matplotlib.backend_bases import FigureCanvasBase
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError(_MISSING) from None
    return Figure, colormaps, FigureCanvasBase


def _figure(width, height):
    Figure, _, _ = _mpl()
    return Figure(figsize=(min(width, 40.0), min(height, 40.0)), layout="constrained")


def _colors(n):
    cmap = _mpl()[1]["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _heatmap(ax, data, *, annotate, fontsize="x-small"):
    """Diverging heatmap centred at zero (symmetric limits); cell values written in when asked."""
    m = float(np.max(np.abs(data))) or 1.0
    im = ax.imshow(data, cmap="RdBu_r", vmin=-m, vmax=m, aspect="auto", interpolation="nearest")
    if annotate:
        for (i, j), v in np.ndenumerate(data):
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=fontsize,
                    color="white" if abs(v) > 0.6 * m else "black")
    return im


def _grouped_bars(ax, labels, values, legend, *, horizontal=False):
    """values [C, Z]: one group per label, one bar (and colour) per column."""
    C, Z = values.shape
    width = 0.8 / Z
    colors = _colors(Z)
    for z in range(Z):
        at = np.arange(C) + (z - (Z - 1) / 2) * width
        bar = ax.barh if horizontal else ax.bar
        bar(at, values[:, z], width, color=colors[z], label=legend[z])
    names = [_text(l) for l in labels]
    if horizontal:
        ax.set_yticks(range(C), labels=names)
        ax.invert_yaxis()  # first component on top
        ax.axvline(0, color="0.4", lw=0.8)
    else:
        ax.set_xticks(range(C), labels=names, rotation=60 if C > 6 else 0, ha="right" if C > 6 else "center",
                      rotation_mode="anchor")
        ax.axhline(0, color="0.4", lw=0.8)
    _legend_below(ax.figure, ax)


def _legend_below(fig, ax):
    """One legend of the targets' colours, below the panels (never over the data or the title)."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), fontsize="small")


def _x_labels(ax, labels, start=0):
    ax.set_xticks(range(start, start + len(labels)), labels=[_text(l) for l in labels],
                  rotation=90 if len(labels) > 8 else 30, ha="right" if len(labels) <= 8 else "center",
                  fontsize="small")


def _text(s) -> str:
    """A label as matplotlib should show it literally: no mathtext ($), control characters made visible."""
    return str(s).replace("$", r"\$").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def _write(path, build) -> Path:
    """Check the path, build the figure, save it atomically; return the path written."""
    out = _output_path(path)
    return _save(build(), out)


def _output_path(path) -> Path:
    _, _, canvas = _mpl()
    out = Path(path)
    if not out.parent.is_dir():
        raise InputError(f"cannot write the figure {str(path)!r}: directory {str(out.parent)!r} does not exist")
    if out.is_dir():
        raise InputError(f"cannot write the figure {str(path)!r}: it is a directory")
    fmt = out.suffix[1:].lower()
    if fmt not in canvas.get_supported_filetypes():
        raise InputError(f"cannot write the figure {str(path)!r}: give a file name ending in .png "
                         f"(or {', '.join('.' + f for f in sorted(canvas.get_supported_filetypes()))})")
    return out


def _save(fig, out: Path) -> Path:
    """Save to a temporary file beside `out` (same suffix, so the format is the same), then rename over it."""
    return atomic_write(out, lambda tmp: fig.savefig(tmp, format=out.suffix[1:].lower(), dpi=110))
