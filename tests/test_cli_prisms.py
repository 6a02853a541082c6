"""The prism subcommands: one JSON schema, labels, --versus, chains, maps, and one-line errors."""

import json

import numpy as np
import pytest

from refprism import cli
from refprism import prisms as P
from refprism.errors import InputError

PROMPT = "The capital city of France is"
SCHEMA = {"prism", "model", "dtype", "tokens", "position", "targets", "whole", "components", "residual"}


def run_json(capsys, *args):
    code = cli.main([*map(str, args), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)  # stdout holds only the JSON


def check_schema(data, prism):
    assert SCHEMA <= set(data) and data["prism"] == prism
    assert all(set(t) == {"id", "piece"} for t in data["tokens"] + data["targets"])
    assert isinstance(data["position"], int) and data["position"] >= 0
    Z = len(data["targets"])
    assert len(data["whole"]["values"]) == Z and all(len(c["values"]) == Z for c in data["components"])


def test_residual_json(tiny_dir, tiny, capsys):
    data = run_json(capsys, "residual", PROMPT, "--model", tiny_dir, "--targets", "▁Paris", "#109", " Tokyo")
    check_schema(data, "residual")
    assert [t["piece"] for t in data["targets"]] == ["▁Paris", "▁London", "▁Tokyo"]
    assert [c["label"] for c in data["components"]] == ["embed", "L0.attn", "L0.mlp", "L1.attn", "L1.mlp"]
    assert data["whole"]["label"] == "logits" and data["position"] == 6
    logits = tiny.run(PROMPT).logits[6, [108, 109, 116]]
    # the CLI unembeds only the row it reads; BLAS may order that float32 product's sums otherwise than the whole one's
    np.testing.assert_allclose(data["whole"]["values"], logits, rtol=1e-5, atol=1e-6)
    sums = np.sum([c["values"] for c in data["components"]], axis=0)
    np.testing.assert_allclose(np.array(data["whole"]["values"]) - sums, data["residual"], atol=1e-6)
    assert data["exact"] is True and set(data["extras"]) == {"direct_effect", "logit_lens", "frozen_running_sum"}


def test_default_targets_are_the_top_five(tiny_dir, tiny, capsys):
    data = run_json(capsys, "residual", PROMPT, "--model", tiny_dir, "--position", "-2")
    assert data["position"] == 5
    top = np.argsort(-tiny.run(PROMPT).logits[5])[:5]
    assert [t["id"] for t in data["targets"]] == top.tolist()


def test_versus(tiny_dir, capsys):
    data = run_json(capsys, "residual", PROMPT, "--model", tiny_dir, "--targets", "▁Paris", "--versus", "▁London")
    assert data["columns"] == ["▁Paris - ▁London"] and data["versus"] == [{"id": 109, "piece": "▁London"}]
    both = run_json(capsys, "residual", PROMPT, "--model", tiny_dir, "--targets", "▁Paris", "▁London")
    np.testing.assert_allclose(data["whole"]["values"][0], both["whole"]["values"][0] - both["whole"]["values"][1],
                               rtol=1e-5)


def test_attention_json_has_every_head_and_source(tiny_dir, capsys):
    data = run_json(capsys, "attention", PROMPT, "--model", tiny_dir, "--layer", "1", "--targets", "▁Paris",
                    "--position", "3", "--top", "2")
    check_schema(data, "attention")
    assert [c["label"] for c in data["components"]] == [f"L1H{h}.src{s}" for h in range(4) for s in range(4)]
    assert data["whole"]["label"] == "L1.attn" and data["extras"]["heads"]["labels"] == [f"L1H{h}" for h in range(4)]


def test_mlp_table_shows_top_json_holds_all(tiny_dir, capsys):
    assert cli.main(["mlp", PROMPT, "--model", str(tiny_dir), "--layer", "0", "--targets", "▁Paris", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("L0N") == 3 and "(125 others)" in out and "exact: yes" in out
    data = run_json(capsys, "mlp", PROMPT, "--model", tiny_dir, "--layer", "0", "--targets", "▁Paris", "--top", "3")
    check_schema(data, "mlp")
    assert len(data["components"]) == 128 and data["whole"]["label"] == "L0.mlp"


def test_chain_and_then(tiny_dir, tiny, capsys):
    data = run_json(capsys, "chain", PROMPT, "--model", tiny_dir, "--layer", "1", "--head", "2", "--source", "5",
                    "--targets", "▁Paris")
    check_schema(data, "chain")
    assert data["whole"]["label"] == "L1H2.src5" and data["position"] == 5
    assert [c["label"] for c in data["components"]] == ["embed", "L0.attn", "L0.mlp"]
    att = P.attention_prism(P.logits_readout(tiny, tiny.run(PROMPT), ["▁Paris"]), 1)
    np.testing.assert_allclose(data["whole"]["values"], att.term("L1H2.src5"), rtol=1e-6)
    deeper = run_json(capsys, "chain", PROMPT, "--model", tiny_dir, "--layer", "1", "--head", "2", "--source", "5",
                      "--then", "head:0:1:3", "--targets", "▁Paris")
    assert deeper["whole"]["label"] == "L1H2.src5/L0H1.src3" and deeper["path"] == ["L1H2.src5", "L0H1.src3"]
    assert [c["label"] for c in deeper["components"]] == ["embed"]
    split = run_json(capsys, "chain", PROMPT, "--model", tiny_dir, "--layer", "1", "--head", "2", "--source", "5",
                     "--split", "mlp:0", "--targets", "▁Paris")
    assert split["prism"] == "mlp" and split["whole"]["label"] == "L1H2.src5/L0.mlp"


def _map_by_hand(tiny_dir, own_scale):
    """L1H2's map frozen at source 5 of PROMPT, read at its last position for ▁Paris and ▁Tokyo, from docs/math.md
    §3.5-3.8 with HF's tensors read here (not refprism's params) and the recorded residuals: (values [M, Z] for the
    scaled embeddings of ▁France ▁Japan ▁Russia, whole [Z] the map at the actual residual at the source).
        term(y) = pattern[h, p, s] (y / s(y) * (1 + w_ln1)) W_V^kv(h) . W_O^h (E[t] (1 + w_final) / s_final[p])
    with s(y) = s_ln1[s] (frozen at the source) or, own_scale, sqrt(mean(y**2) + eps). Tiny is Gemma 1: no post-norm,
    N 4 query heads on K 2 kv heads (head 2 reads kv head 1), H 16, D 64 (sqrt(D) = 8 exactly)."""
    from safetensors.numpy import load_file

    import refprism

    w = {k: v.astype(np.float64) for k, v in load_file(str(tiny_dir / "model.safetensors")).items()}
    model = refprism.load(tiny_dir, dtype="float64")
    run = model.run(PROMPT)
    eps, H, D, h, kv, s, p = 1e-6, 16, 64, 2, 1, 5, len(run.tokens) - 1
    rms = lambda x: np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)  # noqa: E731
    ids = [P.resolve_token(model, "▁" + word).id for word in ("Paris", "Tokyo", "France", "Japan", "Russia")]
    E = w["model.embed_tokens.weight"]
    x_final = run.record["blocks.1.resid_post"][p]
    u = E[ids[:2]] * (1 + w["model.norm.weight"]) / rms(x_final)  # [Z, D]
    Wv = w["model.layers.1.self_attn.v_proj.weight"][kv * H:(kv + 1) * H]  # [H, D]
    Wo = w["model.layers.1.self_attn.o_proj.weight"][:, h * H:(h + 1) * H]  # [D, H]
    pattern = run.record["blocks.1.attn.pattern"][h, p, s]
    x_src = run.record["blocks.1.resid_pre"][s]

    def term(y, scale):
        v = (y / scale * (1 + w["model.layers.1.input_layernorm.weight"])) @ Wv.T  # [M, H]
        return pattern * (v @ Wo.T) @ u.T  # [M, Z]

    ys = E[ids[2:]] * np.sqrt(D)
    values = term(ys, rms(ys) if own_scale else rms(x_src))
    return values, term(x_src[None], rms(x_src))[0]


@pytest.mark.parametrize("own_scale", [False, True])
def test_map_values(tiny_dir, capsys, own_scale):
    """`refprism map` (and prisms.apply_map under it) against the map computed by hand from its definition."""
    data = run_json(capsys, "map", PROMPT, "--model", tiny_dir, "--layer", "1", "--head", "2", "--source", "5",
                    "--inputs", "▁France", "▁Japan", "▁Russia", "--targets", "▁Paris", "▁Tokyo", "--dtype",
                    "float64", *(["--own-scale"] if own_scale else []))
    assert data["prism"] == "map" and [c["label"] for c in data["components"]] == ["▁France", "▁Japan", "▁Russia"]
    assert data["residual"] is None and data["whole"]["label"] == "L1H2.src5"
    values, whole = _map_by_hand(tiny_dir, own_scale)
    np.testing.assert_allclose([c["values"] for c in data["components"]], values, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(data["whole"]["values"], whole, rtol=1e-10, atol=1e-14)
    other, _ = _map_by_hand(tiny_dir, not own_scale)
    assert np.abs(values - other).max() > 1e-3 * np.abs(values).max()  # the two scalings differ: the flag acts


def test_pca_values(tiny_dir, capsys):
    """`refprism pca` against the PCA computed another way: the eigenvectors of the centred rows' covariance
    (np.linalg.eigh, not the SVD the library uses), from the embedding read here; coordinates up to each axis' sign."""
    from safetensors.numpy import load_file

    data = run_json(capsys, "pca", "--model", tiny_dir, "--targets", *"0123456789", "--dtype", "float64")
    assert len(data["coords"]) == 10 and [t["piece"] for t in data["targets"]] == list("0123456789")
    E = load_file(str(tiny_dir / "model.safetensors"))["model.embed_tokens.weight"].astype(np.float64)
    X = E[[t["id"] for t in data["targets"]]]
    X = X - X.mean(axis=0)
    lam, vec = np.linalg.eigh(X.T @ X)  # ascending
    want = X @ vec[:, [-1, -2]]
    got = np.array(data["coords"])
    signs = np.sign(np.sum(got * want, axis=0))
    np.testing.assert_allclose(got * signs, want, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(data["explained_variance"], lam[[-1, -2]] / lam.sum(), rtol=1e-8)
    assert lam[-1] > 1.01 * lam[-2] > 1.01 * lam[-3]  # distinct eigenvalues: the axes are defined


@pytest.mark.parametrize("args, message", [
    (["residual", PROMPT, "--targets", "▁Nowhere"], "▁Nowhere"),
    (["residual", PROMPT, "--targets", " Paris London"], "is 2 tokens (▁Paris ▁London)"),
    (["residual", PROMPT, "--targets", "#9999"], "beyond the vocabulary"),
    (["residual", PROMPT, "--targets", "▁Paris", "#108"], "given twice"),
    (["residual", PROMPT, "--position", "7"], "position 7 is out of range"),
    (["attention", PROMPT, "--layer", "2"], "layer 2 is out of range"),
    (["attention", PROMPT, "--layer", "-1"], "layer -1 is out of range"),
    (["chain", PROMPT, "--layer", "1", "--head", "4", "--source", "0"], "head 4 is out of range"),
    (["chain", PROMPT, "--layer", "1", "--head", "0", "--source", "6", "--position", "4"], "source 6 is out of range"),
    (["chain", PROMPT, "--layer", "1", "--head", "0", "--source", "2", "--then", "head:1:0:0"], "L1.attn is not part"),
    (["chain", PROMPT, "--layer", "1", "--head", "0", "--source", "2", "--then", "bogus"], "--then 'bogus'"),
    (["mlp", PROMPT, "--layer", "0", "--top", "0"], "--top must be at least 1"),
    (["residual", PROMPT, "--plot", "/nonexistent-dir/x.png"], "does not exist"),
])
def test_prism_errors_one_line(tiny_dir, capsys, args, message):
    assert cli.main([*args, "--model", str(tiny_dir)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args", [
    ["residual", PROMPT],
    ["attention", PROMPT, "--layer", "1"],
    ["mlp", PROMPT, "--layer", "0"],
    ["chain", PROMPT, "--layer", "1", "--head", "2", "--source", "5"],
    ["map", PROMPT, "--layer", "1", "--head", "2", "--source", "5", "--inputs", "▁France", "▁Japan"],
    ["pca"],
])
def test_every_command_writes_its_plot(tiny_dir, tmp_path, capsys, args):
    out = tmp_path / "fig.png"
    code = cli.main([*args, "--model", str(tiny_dir), "--targets", "▁Paris", "▁Tokyo", "--plot", str(out)])
    assert code == 0, capsys.readouterr().err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png"]  # no temporary file left


def test_chain_through_a_neuron_first(tiny_dir, tiny, capsys):
    data = run_json(capsys, "chain", PROMPT, "--model", tiny_dir, "--layer", "1", "--neuron", "7",
                    "--targets", "▁Paris")
    assert data["whole"]["label"] == "L1N7" and data["site"] == "blocks.1.resid_mid"
    assert [c["label"] for c in data["components"]] == ["embed", "L0.attn", "L0.mlp", "L1.attn"]
    mlp = P.mlp_prism(P.logits_readout(tiny, tiny.run(PROMPT), ["▁Paris"]), 1)
    np.testing.assert_allclose(data["whole"]["values"], mlp.term("L1N7"), rtol=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--neuron", "3", "--head", "0", "--source", "1"], "give one"),
    ([], "give one"),
    (["--head", "0"], "needs both --head and --source"),
])
def test_chain_first_step_errors(tiny_dir, capsys, extra, message):
    assert cli.main(["chain", PROMPT, "--model", str(tiny_dir), "--layer", "1", *extra]) == 2
    assert message in capsys.readouterr().err


def test_scaled_embeddings_take_pieces_as_every_prism_does(tiny):
    from refprism import prisms

    tokens = [prisms.resolve_token(tiny, t) for t in ("▁France", "#7")]
    np.testing.assert_array_equal(prisms.scaled_embeddings(tiny, ["▁France", "#7"]),
                                  prisms.scaled_embeddings(tiny, tokens))
    with pytest.raises(InputError, match="not in the vocabulary|not one"):
        prisms.scaled_embeddings(tiny, ["▁Nowhere-at-all"])


def test_gemma4_layer_parts_on_the_command_line(checkpoint, capsys):
    """mlp --part moe / expert:E / ple and chain --split moe:L / expert:L:E / ple:L print the library's splits
    (moe_prism, expert_prism, ple_prism), exact; bad parts, parts a model lacks and out-of-range experts are one
    line before the weights are read."""
    import refprism

    d = checkpoint("tiny-gemma4")
    model = refprism.load(d)
    ids = [2, 5, 7, 9, 11, 13, 17]
    cfg = model.config
    assert cfg.moe and cfg.ple
    ro = P.logits_readout(model, model.run(ids), ["#5", "#6"])
    top = model.run(ids).record["blocks.3.moe.topk.index"][-1]
    base = ["--ids", ",".join(map(str, ids)), "--model", d, "--targets", "#5", "#6"]
    for part, split in [("moe", P.moe_prism(ro, 3)), (f"expert:{int(top[0])}", P.expert_prism(ro, 3, int(top[0]))),
                        ("ple", P.ple_prism(ro, 3))]:
        data = run_json(capsys, "mlp", *base, "--layer", 3, "--part", part)
        check_schema(data, split.prism)
        assert [c["label"] for c in data["components"]] == split.labels and data["exact"]
        np.testing.assert_allclose([c["values"] for c in data["components"]], split.values, rtol=1e-5, atol=1e-7)
    head = P.through_head(ro, 5, 0, 4)
    chained = head.run.record["blocks.1.moe.topk.index"][4]
    for last, split in [("moe:1", P.moe_prism(head, 1)), ("ple:1", P.ple_prism(head, 1)),
                        (f"expert:1:{int(chained[0])}", P.expert_prism(head, 1, int(chained[0])))]:
        data = run_json(capsys, "chain", *base, "--layer", 5, "--head", 0, "--source", 4, "--split", last)
        assert [c["label"] for c in data["components"]] == split.labels and data["exact"]
        np.testing.assert_allclose([c["values"] for c in data["components"]], split.values, rtol=1e-5, atol=1e-7)
    gemma1 = checkpoint("tiny")
    for model_dir, extra, text in [
            (d, ["mlp", "--layer", "3", "--part", "bogus"], "--part 'bogus': use neurons, moe, expert:E or ple"),
            (d, ["mlp", "--layer", "3", "--part", "expert:99"], "expert 99 is out of range"),
            (d, ["chain", "--layer", "5", "--head", "0", "--source", "1", "--split", "moe:6"], "L6.mlp is not part"),
            (d, ["chain", "--layer", "5", "--head", "0", "--source", "1", "--split", "expert:1"], "--split 'expert:1'"),
            (gemma1, ["mlp", "--layer", "1", "--part", "moe"], "moe: this model has no mixture of experts"),
            (gemma1, ["mlp", "--layer", "1", "--part", "ple"], "ple: this model has no per-layer embeddings")]:
        args = [extra[0], "--ids", "2,5,7", "--model", str(model_dir), *extra[1:]]
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert text in err and "\n" not in err, (args, err)
