"""Figures of refprism.prisms.plots: each writes a real PNG, draws the split's own numbers, and saves atomically.

The splits are real prisms of the tiny random checkpoint (tests/conftest.py). Figure contents are checked on
the Figure objects the `_*_fig` builders return (before saving), against the split's values.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import matplotlib.image
import numpy as np
import pytest
from matplotlib.figure import Figure

from refprism import prisms as P
from refprism.errors import InputError, OutputError
from refprism.prisms import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def splits(tiny):
    """One split of every prism, as the post builds them: logits -> L1 head 2 at source 3 -> the embeddings."""
    run = tiny.run("The capital city of France is")
    r = P.logits_readout(tiny, run, ["▁Paris", "▁London", "▁Tokyo"])
    att = P.attention_prism(r, 1)
    h = P.through_head(r, 1, 2, 3)
    toks = [P.resolve_token(tiny, t) for t in ["▁France", "▁Japan", "▁Russia"]]
    return {
        "residual": P.residual_prism(r),
        "attention": att,
        "attention-heads": P.head_split(att),
        "mlp": P.mlp_prism(r, 0),
        "chain": P.residual_prism(h),
        "map": P.apply_map(h, P.scaled_embeddings(tiny, toks), [t.piece for t in toks]),
    }


@pytest.fixture(scope="module")
def pca(tiny):
    tokens = P.resolve_targets(tiny, ["▁Paris", "▁London", "▁Tokyo", "▁France", "▁Japan", "▁Russia"]).targets
    coords, explained = P.unembedding_pca(tiny, tokens)
    return coords, [t.piece for t in tokens], explained


def assert_png(path, *, min_px=150, max_px=5000):
    """A complete PNG of a sensible size (not an empty canvas, not a runaway figure)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name}: not a PNG (starts {data[:8]!r})"
    img = matplotlib.image.imread(path)
    h, w = img.shape[:2]
    assert min_px <= h <= max_px and min_px <= w <= max_px, f"{path.name}: {w}x{h} px"
    assert np.ptp(img[..., :3]) > 0.5, f"{path.name}: the image is blank"


def legend_lines(ax):
    """Plotted data lines (axhline and other helpers carry labels starting with '_')."""
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


# ------------------------------------------------------------------------------------------------- files


WRITERS = [
    ("residual", plots.residual_figure),
    ("attention", plots.attention_figure),
    ("chain", plots.chain_figure),
    ("map", plots.map_figure),
    ("mlp", plots.mlp_figure),
    ("attention-heads", plots.heads_figure),
]


@pytest.mark.parametrize("prism, writer", WRITERS, ids=[w[0] for w in WRITERS])
def test_each_writer_writes_one_png_and_nothing_else(splits, tmp_path, prism, writer):
    out = tmp_path / f"{prism}.png"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert writer(splits[prism], out) == out
    assert_png(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary left behind
    glyphs = [str(w.message) for w in caught if "missing from" in str(w.message)]
    assert not glyphs, f"labels with ▁ must render: {glyphs}"


def test_pca_writes_png(pca, tmp_path):
    out = plots.pca_figure(*pca, tmp_path / "pca.png", title="six pieces")
    assert_png(out)


@pytest.mark.parametrize("prism", ["residual", "chain", "attention", "attention-heads", "mlp", "map"])
def test_figure_for_dispatches_on_the_prism(splits, tmp_path, monkeypatch, prism):
    called = []
    for name in ["residual_figure", "chain_figure", "attention_figure", "heads_figure", "mlp_figure",
                 "map_figure"]:
        monkeypatch.setattr(plots, name, lambda split, path, _n=name, **kw: called.append((_n, split, kw)))
    kw = {"top": 3} if prism == "mlp" else {}
    plots.figure_for(splits[prism], tmp_path / "x.png", **kw)
    expected = {"residual": "residual_figure", "chain": "chain_figure", "attention": "attention_figure",
                "attention-heads": "heads_figure", "mlp": "mlp_figure", "map": "map_figure"}[prism]
    assert [(n, s) for n, s, _ in called] == [(expected, splits[prism])]
    assert called[0][2] == kw


def test_figure_for_writes_the_file(splits, tmp_path):
    out = plots.figure_for(splits["mlp"], tmp_path / "mlp.png", top=5)
    assert_png(out)


def test_figure_for_refuses_an_unknown_prism(splits, tmp_path):
    from dataclasses import replace

    with pytest.raises(InputError, match="no figure for a 'lens' split"):
        plots.figure_for(replace(splits["residual"], prism="lens"), tmp_path / "x.png")


# ------------------------------------------------------------------------------------------------- contents


def test_residual_lines_are_the_split_values(splits):
    split = splits["residual"]
    C, Z = split.values.shape
    fig = plots._residual_fig(split, zoom_last=2)
    full, zoom, lens = fig.axes[:3]
    for z in range(Z):
        x, y = legend_lines(full)[z].get_data()
        np.testing.assert_array_equal(x, np.arange(C))
        np.testing.assert_array_equal(y, split.values[:, z])
        x, y = legend_lines(zoom)[z].get_data()
        np.testing.assert_array_equal(x, np.arange(C - 2, C))
        np.testing.assert_array_equal(y, split.values[C - 2:, z])
        solid, dashed = legend_lines(lens)[2 * z: 2 * z + 2]
        assert (solid.get_linestyle(), dashed.get_linestyle()) == ("-", "--")
        np.testing.assert_array_equal(solid.get_ydata(), split.extras["frozen_running_sum"]["values"][:, z])
        np.testing.assert_array_equal(dashed.get_ydata(), split.extras["logit_lens"]["values"][:, z])
    assert [t.get_text() for t in full.get_xticklabels()] == split.labels
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [f"{c} (logits {w:.4g})" for c, w in
                                                          zip(split.columns, split.whole)]
    assert "[▁is]" in fig.get_suptitle() and "position 6" in fig.get_suptitle()


def test_residual_default_zoom_is_the_last_third(splits):
    split = splits["residual"]  # 5 components: the zoom shows ceil(5 / 3) = 2
    zoom = plots._residual_fig(split).axes[1]
    np.testing.assert_array_equal(legend_lines(zoom)[0].get_xdata(), [3, 4])


def test_residual_without_lens_extras_has_two_panels(splits):
    fig = plots._residual_fig(splits["chain"])  # a chained split has no logit lens
    assert len(fig.axes) == 2


def test_residual_refuses_a_zoom_out_of_range(splits, tmp_path):
    with pytest.raises(InputError, match="zoom_last must be 1 .. 5"):
        plots.residual_figure(splits["residual"], tmp_path / "r.png", zoom_last=6)
    assert not any(tmp_path.iterdir())


def test_attention_heatmaps_are_head_by_source_per_target(splits):
    split = splits["attention"]
    N, S, Z = 4, split.readout.position + 1, len(split.columns)
    grid = split.values.reshape(N, S, Z)
    fig = plots._attention_fig(split)
    axes = image_axes(fig)
    assert len(axes) == Z
    for z, ax in enumerate(axes):
        im = ax.images[0]
        np.testing.assert_array_equal(np.asarray(im.get_array()), grid[:, :, z])
        m = np.abs(grid[:, :, z]).max()
        np.testing.assert_allclose(im.get_clim(), (-m, m))  # diverging, centred at zero
        assert [t.get_text() for t in ax.get_yticklabels()] == [f"H{h}" for h in range(N)]
        assert [t.get_text() for t in ax.get_xticklabels()] == split.readout.run.pieces[:S]
        assert ax.get_title().startswith(split.columns[z])
    assert len(fig.axes) == 2 * Z  # one colorbar each


def test_attention_wraps_at_four_per_row(tiny):
    run = tiny.run("The capital city of France is")
    r = P.logits_readout(tiny, run, ["▁Paris", "▁London", "▁Tokyo", "▁France", "▁Japan"])
    fig = plots._attention_fig(P.attention_prism(r, 0))
    rows = sorted({ax.get_subplotspec().rowspan.start for ax in image_axes(fig)})
    cols = sorted({ax.get_subplotspec().colspan.start for ax in image_axes(fig)})
    assert (len(image_axes(fig)), rows, cols) == (5, [0, 1], [0, 1, 2, 3])


def test_attention_refuses_other_prisms(splits, tmp_path):
    with pytest.raises(InputError, match="attention split, got a 'residual' split"):
        plots.attention_figure(splits["residual"], tmp_path / "a.png")


def test_chain_bars_are_the_split_values(splits):
    split = splits["chain"]
    fig = plots._chain_fig(split)
    ax = fig.axes[0]
    np.testing.assert_array_equal(np.stack([c.datavalues for c in ax.containers], axis=1), split.values)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["embed", "L0.attn", "L0.mlp"]
    assert ax.yaxis_inverted()  # read top-down in the residual's order, embed first
    title = fig.get_suptitle()
    assert title.startswith(f"L1H2.src3 = ▁Paris {split.whole[0]:.4g}, ▁London {split.whole[1]:.4g}")
    assert "logits → L1H2.src3" in title and "[▁city]" in title


def test_map_heatmap_is_inputs_by_targets(splits):
    split = splits["map"]
    fig = plots._map_fig(split)
    (ax,) = image_axes(fig)
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), split.values)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["▁France", "▁Japan", "▁Russia"]
    assert [t.get_text() for t in ax.get_xticklabels()] == split.columns
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{v:.2g}" for v in split.values.ravel())
    assert fig.get_suptitle().startswith("frozen map of L1H2.src3")


def test_mlp_bars_are_the_top_neurons(splits):
    split = splits["mlp"]
    fig = plots._mlp_fig(split, top=7)
    ax = fig.axes[0]
    rows = split.top(7)
    assert [t.get_text() for t in ax.get_xticklabels()] == [split.labels[i] for i in rows]
    np.testing.assert_array_equal(np.stack([c.datavalues for c in ax.containers], axis=1), split.values[rows])
    colors = {c.patches[0].get_facecolor() for c in ax.containers}
    assert len(colors) == len(split.columns)  # one colour per target


def test_mlp_refuses_top_zero(splits, tmp_path):
    with pytest.raises(InputError, match="top must be at least 1"):
        plots.mlp_figure(splits["mlp"], tmp_path / "m.png", top=0)


def test_heads_bars_sum_sources(splits):
    heads = splits["attention"].values.reshape(4, -1, 3).sum(axis=1)  # [N, Z]
    for split in (splits["attention-heads"], splits["attention"]):
        ax = plots._heads_fig(split).axes[0]
        np.testing.assert_allclose(np.stack([c.datavalues for c in ax.containers], axis=1), heads, rtol=1e-6)
        assert [t.get_text() for t in ax.get_xticklabels()] == ["L1H0", "L1H1", "L1H2", "L1H3"]


def test_pca_line_joins_the_points_in_order(pca):
    coords, labels, explained = pca
    fig = plots._pca_fig(coords, labels, explained)
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.lines[0].get_xydata(), coords)
    assert [t.get_text() for t in ax.texts] == labels
    np.testing.assert_array_equal([t.xy for t in ax.texts], coords)
    assert f"{explained[0]:.1%}" in ax.get_xlabel() and f"{explained[1]:.1%}" in ax.get_ylabel()


def test_pca_refuses_mismatched_inputs(pca, tmp_path):
    coords, labels, explained = pca
    with pytest.raises(InputError, match="coords \\[M, 2\\], M labels"):
        plots.pca_figure(coords, labels[:-1], explained, tmp_path / "p.png")


def test_dollar_and_newline_pieces_are_shown_literally():
    fig = plots._pca_fig(np.eye(2), ["$x$", "\n"], [0.6, 0.4])
    assert [t.get_text() for t in fig.axes[0].texts] == [r"\$x\$", "\\n"]


# ------------------------------------------------------------------------------------------------- saving


def test_missing_directory_is_an_input_error_naming_it(splits, tmp_path):
    out = tmp_path / "nope" / "r.png"
    with pytest.raises(InputError, match="nope") as e:
        plots.residual_figure(splits["residual"], out)
    assert "does not exist" in str(e.value)
    assert not out.parent.exists() and not any(tmp_path.iterdir())


def test_unknown_suffix_is_refused(splits, tmp_path):
    with pytest.raises(InputError, match="ending in .png"):
        plots.map_figure(splits["map"], tmp_path / "m.txt")
    assert not any(tmp_path.iterdir())


def test_save_renders_once_to_a_png_temporary_beside_the_target(splits, tmp_path, monkeypatch):
    seen, real = [], Figure.savefig

    def spy(self, fname, **kw):
        seen.append(fname)
        assert not out.exists(), "the target must appear only by the final rename"
        return real(self, fname, **kw)

    out = tmp_path / "chain.png"
    monkeypatch.setattr(Figure, "savefig", spy)
    plots.chain_figure(splits["chain"], out)
    assert len(seen) == 1
    tmp = seen[0]
    assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp != out and not tmp.exists()
    assert_png(out)


def test_failed_save_leaves_no_file_and_keeps_the_old_one(splits, tmp_path, monkeypatch):
    out = tmp_path / "m.png"
    out.write_bytes(b"old figure")

    def broken(self, fname, **kw):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise RuntimeError("renderer died")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="renderer died"):
        plots.map_figure(splits["map"], out)
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]
    assert out.read_bytes() == b"old figure"


def test_os_error_while_saving_is_an_input_error(splits, tmp_path, monkeypatch):
    def full(self, fname, **kw):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    with pytest.raises(OutputError, match="could not write .* No space left on device"):
        plots.mlp_figure(splits["mlp"], tmp_path / "m.png")
    assert not any(tmp_path.iterdir())


def test_missing_matplotlib_says_how_to_install(splits, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(InputError, match=r"plots need matplotlib: pip install 'refprism\[plot\]'"):
        plots.residual_figure(splits["residual"], tmp_path / "r.png")


def test_importing_plots_does_not_import_matplotlib():
    code = "import refprism.prisms.plots, sys; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
