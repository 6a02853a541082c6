"""Dump files as the other side: every naming scheme round-trips (write, read, compare: every site within its
floor and the arrays as written), through .npz and .safetensors, and JSON name maps are read and validated.

The round trips are plumbing tests of the file formats and name maps: a refprism record compared with refprism
has error 0 and passes any floor. That the floors catch mistakes is tested where the other side is broken: here
(a catalogued mistake in a dump), tests/test_compare.py and tests/test_compare_catalogue.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

import refprism
from refprism import cli
from refprism.crosscheck import catalogue, compare
from refprism.crosscheck.sides import dumps
from refprism.crosscheck.sides import hf as other_hf
from refprism.errors import InputError
from refprism.gemma.record import symbolic_shapes

IDS = [2, 455, 17, 301, 88, 260, 41, 7, 130]


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma2", "tiny-gemma3"])
def test_plumbing_refprism_scheme_round_trips(checkpoint, tmp_path, suffix, preset):
    """refprism's own record as a dump (a plumbing test: the comparison's errors are 0 by construction)."""
    d = checkpoint(preset)
    model = refprism.load(d)
    run = model.run(IDS)
    path = tmp_path / f"run{suffix}"
    dumps.write_dump(path, {**run.record, "tokens": run.tokens})
    cap = dumps.read_dump(path, model)
    assert cap.tokens.tolist() == IDS and cap.dtype == "float32"
    assert set(cap.arrays) == set(run.record)
    for name, a in cap.arrays.items():
        np.testing.assert_array_equal(a, run.record[name])
    r = compare(model, None, against=str(path))  # the dump's own token ids
    assert r.exit_status == 0 and r.missing == [] and r.tokens == IDS


def test_refprism_record_output_is_a_dump(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run.npz"
    assert cli.main(["record", "--ids", ",".join(map(str, IDS)), "--model", str(tiny_dir), "--out", str(out)]) == 0
    assert cli.main(["compare", "--model", str(tiny_dir), "--against", str(out)]) == 0
    assert "every one of 44 sites is within its floor" in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma2", "tiny-gemma3"])
def test_hf_scheme_round_trips(checkpoint, tmp_path, suffix, preset):
    """HF module paths as forward hooks capture them (with their batch axis), written and read back: the same
    arrays as the live capture, and every site within its floor."""
    d = checkpoint(preset)
    model = refprism.load(d)
    hf_model = other_hf.load(d)
    raw, _, _ = other_hf.capture_hf_names(hf_model, IDS)
    path = tmp_path / f"hf{suffix}"
    dumps.write_dump(path, {**raw, "input_ids": np.asarray([IDS])})
    cap = dumps.read_dump(path, model, names="hf")
    live = other_hf.capture(hf_model, IDS, cfg=model.config)
    assert set(cap.arrays) == set(live.arrays)
    for name, a in cap.arrays.items():
        np.testing.assert_array_equal(a, live.arrays[name])
    r = compare(model, IDS, against=str(path), names="hf")
    assert r.exit_status == 0, r.table()


def test_hf_act_fn_times_up_proj_is_the_mlp_activation(checkpoint, tmp_path):
    """A dump of module outputs alone has act_fn's gelu(gate) and up_proj's up, not down_proj's input: their
    product is refprism's mlp.act (and an exact GELU there is still found)."""
    import torch

    d = checkpoint("tiny-gemma2")
    model = refprism.load(d)
    hf_model = other_hf.load(d)
    got = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: got.__setitem__(n, out))
             for n, m in hf_model.named_modules() if n.endswith(("mlp.act_fn", "mlp.up_proj", "mlp.gate_proj"))]
    hf_model.model.layers[1].mlp.act_fn = torch.nn.GELU()  # the hook stays on the tanh module of layer 1: re-add
    hooks.append(hf_model.model.layers[1].mlp.act_fn.register_forward_hook(
        lambda mod, a, out: got.__setitem__("model.layers.1.mlp.act_fn", out)))
    with torch.no_grad():
        got["logits"] = hf_model(torch.tensor([IDS])).logits
    for h in hooks:
        h.remove()
    dumps.write_dump(tmp_path / "outs.npz", {**{k: v.float().numpy() for k, v in got.items()},
                                             "input_ids": np.asarray(IDS)})
    r = compare(model, IDS, against=str(tmp_path / "outs.npz"), names="hf")
    assert any("act_fn's output times up_proj's" in n for n in r.notes)
    assert not any("ignored" in n and "act_fn" in n for n in r.notes)
    assert r.wrong_ops == ["blocks.1.mlp.act"]
    assert [x["variant"] for x in r.diagnosis if x["explains"]] == ["gelu_exact"]


def test_hf_scheme_takes_outputs_hidden_states_and_attentions(tiny, tmp_path):
    """What `model(..., output_hidden_states=True, output_attentions=True)` returns, keyed hidden_states.{i} and
    attentions.{l}, is a dump too (the last hidden state is ambiguous across versions and left out)."""
    run = tiny.run(IDS)
    arrays = {f"hidden_states.{l}": run.record[f"blocks.{l}.resid_pre"][None] for l in range(2)}
    arrays["hidden_states.2"] = run.record["ln_final.out"][None]
    arrays.update({f"attentions.{l}": run.record[f"blocks.{l}.attn.pattern"][None] for l in range(2)})
    arrays["logits"] = run.logits[None]
    path = tmp_path / "outputs.npz"
    dumps.write_dump(path, arrays)
    r = compare(tiny, IDS, against=str(path), names="hf")
    assert [s.site for s in r.sites] == ["embed", "blocks.0.resid_pre", "blocks.0.attn.pattern",
                                         "blocks.1.resid_pre", "blocks.1.attn.pattern", "logits"]
    assert r.exit_status == 0
    assert any("hidden_states.2" in n for n in r.notes)


def port_dump(model, run):
    """A port of one's own: its names, heads flattened, a batch axis, the scores laid out [T, N, S], the norm
    outputs kept before their weight, token ids under 'ids'."""
    rec = run.record
    T = len(run.tokens)
    L = model.config.n_layers
    arrays = {"ids": run.tokens.astype(np.int32), "out": run.logits}
    for l in range(L):
        p = f"blocks.{l}."
        w = model.params.get(l, "ln1")
        arrays[f"h{l}.norm_in"] = (rec[p + "ln1.out"].astype(np.float64) / (1 + w.astype(np.float64)))[None]
        arrays[f"h{l}.q"] = rec[p + "attn.q"].reshape(T, -1)
        arrays[f"h{l}.scores"] = rec[p + "attn.scores"].transpose(1, 0, 2)
        arrays[f"h{l}.mlp_act"] = rec[p + "mlp.act"][None]
        arrays[f"h{l}.out"] = rec[p + "resid_post"]
    name_map = {"tokens": "ids", "comment": "my port", "sites": {
        "h{l}.norm_in": {"site": "blocks.{l}.ln1.out", "axes": "BTD", "norm_weight": "none"},
        "h{l}.q": {"site": "blocks.{l}.attn.q", "axes": "T(NH)"},
        "h{l}.scores": {"site": "blocks.{l}.attn.scores", "axes": "TNS"},
        "h{l}.mlp_act": {"site": "blocks.{l}.mlp.act", "axes": "BTF"},
        "h{l}.out": "blocks.{l}.resid_post",
        "out": "logits"}}
    return arrays, name_map


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_json_name_map_round_trips(tiny, tmp_path, suffix):
    run = tiny.run(IDS)
    arrays, name_map = port_dump(tiny, run)
    path = tmp_path / f"port{suffix}"
    dumps.write_dump(path, arrays)
    (tmp_path / "map.json").write_text(json.dumps(name_map))
    cap = dumps.read_dump(path, tiny, names=str(tmp_path / "map.json"))
    assert cap.tokens.tolist() == IDS
    for name in ("blocks.1.attn.q", "blocks.0.attn.scores", "blocks.1.mlp.act", "blocks.0.resid_post", "logits"):
        np.testing.assert_array_equal(cap.arrays[name], run.record[name])
    np.testing.assert_allclose(cap.arrays["blocks.1.ln1.out"], run.record["blocks.1.ln1.out"], rtol=1e-6)
    r = compare(tiny, IDS, against=str(path), names=str(tmp_path / "map.json"))
    assert r.exit_status == 0, r.table()
    assert len(r.sites) == 5 * 2 + 1


def test_name_map_finds_a_mistake_in_a_port(tiny, tmp_path):
    """The same port with its q computed by interleaved RoPE: compare names layer 0's q and the mistake."""
    from refprism.gemma import ops

    def interleaved(name, value, record):
        if name.endswith("attn.q"):
            l = int(name.split(".")[1])
            cos, sin = ops.rope_tables(np.arange(len(IDS)), 16, tiny.config.rope_of(l)[0], np.float32)
            return catalogue.rope_interleaved(record[f"blocks.{l}.attn.q_pre"], cos, sin)
        return value

    arrays, name_map = port_dump(tiny, tiny.run(IDS, edit=interleaved))
    dumps.write_dump(tmp_path / "port.npz", arrays)
    (tmp_path / "map.json").write_text(json.dumps(name_map))
    r = compare(tiny, IDS, against=str(tmp_path / "port.npz"), names=str(tmp_path / "map.json"))
    assert r.first_wrong_op == "blocks.0.attn.q"
    assert [d["variant"] for d in r.diagnosis if d["explains"]] == ["rope_interleaved"]


BAD_MAPS = [
    ("[1, 2]", r"a name map is a JSON object with \"sites\""),
    ('{"sites": {"x": "logits"}, "extra": 1}', r"unknown key 'extra'"),
    ('{"sites": {}}', r"\"sites\" must be a non-empty object"),
    ('{"sites": {"x": {"axes": "TV"}}}', r"entry 'x' has no \"site\""),
    ('{"sites": {"x": "blocks.{l}.attn.nope"}}', r"\{l\} must appear in both"),
    ('{"sites": {"h{l}.x": "blocks.{l}.attn.nope"}}', r"names 'blocks.\{l\}.attn.nope', not a refprism site"),
    ('{"sites": {"x": {"site": "logits", "axes": "TX"}}}', r"axis letter 'X' is not one of"),
    ('{"sites": {"x": {"site": "logits", "axes": "T"}}}', r"axes 'T' must use each of logits's letters TV once"),
    ('{"sites": {"x": {"site": "logits", "axes": "t v"}}}', r"axes must be letters of"),
    ('{"sites": {"x": {"site": "logits", "norm_weight": "w"}}}', r"norm_weight must be one of one_plus_w, none, "
                                                                  r"got 'w' \(\"w\" is not a convention"),
    ('{"sites": {"x": {"site": "logits", "norm_weight": "none"}}}', r"norm_weight applies to a norm's output"),
    ('{"sites": {"x": {"site": "logits", "batch_index": -1}}}', r"batch_index must be a non-negative integer"),
    ('{"sites": {"x": {"site": "logits", "scale": 2}}}', r"unknown field 'scale'"),
    ('{"sites": {"x": "logits"}, "tokens": 3}', r"\"tokens\" must be the name of the token-id array"),
    ("{oops", r"is not valid JSON"),
]


@pytest.mark.parametrize("text,message", BAD_MAPS, ids=[m for _, m in BAD_MAPS])
def test_bad_name_maps_are_one_line_errors(tiny, tmp_path, text, message):
    (tmp_path / "map.json").write_text(text)
    with pytest.raises(InputError, match=message) as e:
        dumps.read_dump(tmp_path / "x.npz", tiny, names=str(tmp_path / "map.json"))
    assert "\n" not in str(e.value)


def test_arrays_that_do_not_fit_the_map_are_named(tiny, tmp_path):
    run = tiny.run(IDS)
    q = run.record["blocks.0.attn.q"].reshape(9, 64)[:, :60]
    dumps.write_dump(tmp_path / "d.npz", {"tokens": run.tokens, "q0": q, "b": np.stack([run.logits, run.logits])})
    (tmp_path / "m.json").write_text(json.dumps({"sites": {"q{l}": {"site": "blocks.{l}.attn.q", "axes": "T(NH)"}}}))
    with pytest.raises(InputError, match=r"q0 has shape \[9, 60\]: its axis 1 \(NH\) should be N=4 x H=16 = 64"):
        compare(tiny, IDS, against=str(tmp_path / "d.npz"), names=str(tmp_path / "m.json"))
    (tmp_path / "m.json").write_text(json.dumps({"sites": {"b": {"site": "logits", "axes": "BTV",
                                                                 "batch_index": 2}}}))
    with pytest.raises(InputError, match=r"b has a batch of 2; batch_index 2 is beyond it"):
        compare(tiny, IDS, against=str(tmp_path / "d.npz"), names=str(tmp_path / "m.json"))
    (tmp_path / "m.json").write_text(json.dumps({"sites": {"q{l}": "blocks.{l}.attn.q"}}))
    with pytest.raises(InputError, match=r"q0 has 2 axes \(shape \[9, 60\]\); the name map reads it as TNH"):
        compare(tiny, IDS, against=str(tmp_path / "d.npz"), names=str(tmp_path / "m.json"))


def test_dump_problems_are_one_line_errors(tiny, tmp_path):
    run = tiny.run(IDS)
    np.savez(tmp_path / "noids.npz", logits=run.logits)
    with pytest.raises(InputError, match=r"noids\.npz holds no token ids \(an array named tokens or input_ids\)"):
        compare(tiny, None, against=str(tmp_path / "noids.npz"))
    assert compare(tiny, IDS, against=str(tmp_path / "noids.npz")).exit_status == 0  # the prompt gives them
    np.savez(tmp_path / "pickled.npz", tokens=run.tokens, logits=np.array([object()], dtype=object))
    with pytest.raises(InputError, match=r"holds an object \(pickled\) array; refprism never unpickles"):
        compare(tiny, IDS, against=str(tmp_path / "pickled.npz"))
    np.savez(tmp_path / "other.npz", tokens=run.tokens, foo=run.logits)
    with pytest.raises(InputError, match=r"none of its 1 array besides the token ids names a site in the refprism "
                                         r"scheme"):
        compare(tiny, IDS, against=str(tmp_path / "other.npz"))
    (tmp_path / "broken.safetensors").write_bytes(b"not a file")
    with pytest.raises(InputError, match=r"broken\.safetensors is not a readable \.safetensors file"):
        compare(tiny, IDS, against=str(tmp_path / "broken.safetensors"))
    with pytest.raises(InputError, match=r"--names must be one of refprism, hf, tl, llama\.cpp or a JSON name map"):
        compare(tiny, IDS, against=str(tmp_path / "noids.npz"), names="huggingface")
    np.savez(tmp_path / "twice.npz", input_ids=run.tokens, **{"model.norm": run.record["ln_final.out"][None],
                                                              "lm_head:in": run.record["ln_final.out"][None] + 1})
    with pytest.raises(InputError, match=r"both give ln_final\.out and differ"):
        compare(tiny, IDS, against=str(tmp_path / "twice.npz"), names="hf")


def test_tl_and_llamacpp_schemes_each_read_their_own_names(tiny, tmp_path):
    """--names tl reads TransformerLens hook names (tl.scheme_tl, with TL's batch axis), --names llama.cpp
    llama.cpp's graph names (llamacpp.scheme_llamacpp, told the prompt's length: llama.cpp's cut last layer, its
    last row only, comes back as a summary of that row); each scheme leaves the other's names to a note."""
    rec = tiny.run(IDS).record
    T = len(IDS)
    path = tmp_path / "d.npz"
    np.savez(path, tokens=np.asarray(IDS), **{
        "blocks.0.hook_resid_mid": rec["blocks.0.resid_mid"][None],  # TL: [batch, T, D]
        "sa_out-0": rec["blocks.0.resid_mid"],  # llama.cpp: ne [D, T], a [T, D] array
        "l_out-1": rec["blocks.1.resid_post"][T - 1:]})  # llama.cpp's last layer, cut to the last row
    cap = dumps.read_dump(path, tiny, names="tl")
    assert set(cap.arrays) == {"blocks.0.resid_mid"} and cap.summaries == {} and cap.arithmetic is None
    assert "2 arrays of the dump name no refprism site in the tl scheme, ignored: sa_out-0, l_out-1" in cap.notes
    np.testing.assert_array_equal(cap.arrays["blocks.0.resid_mid"], rec["blocks.0.resid_mid"])
    cap = dumps.read_dump(path, tiny, names="llama.cpp")
    assert set(cap.arrays) == {"blocks.0.resid_mid"} and set(cap.summaries) == {"blocks.1.resid_post"}
    last = cap.summaries["blocks.1.resid_post"]
    assert last.rows == (T - 1,) and last.shape == (T, 64) and last.elements[(T - 1, 5)] == rec["blocks.1.resid_post"][
        T - 1, 5]
    assert cap.arithmetic.weights == "F32" and cap.arithmetic.activations == {}  # no GGUF: float32 products
    assert any("blocks.0.hook_resid_mid" in n for n in cap.notes)
    assert any("the model is no .gguf file" in n for n in cap.notes)
    r = compare(tiny, IDS, against=str(path), names="llama.cpp")
    assert [s.site for s in r.sites] == ["blocks.0.resid_mid", "blocks.1.resid_post"] and r.exit_status == 0
    assert r.sites[1].summary and "llama.cpp's CPU backend on F32 weights" in r.floors["method"]


def test_every_site_of_every_family_has_an_hf_name(checkpoint):
    """scheme_hf covers every site HF computes: all but the norm scales."""
    for preset in ("tiny", "tiny-gemma2", "tiny-gemma3"):
        model = refprism.load(checkpoint(preset))
        cap = other_hf.capture(other_hf.load(checkpoint(preset)), IDS[:3], cfg=model.config)
        assert set(symbolic_shapes(model.config)) - set(cap.arrays) == {
            n for n in symbolic_shapes(model.config) if n.endswith(".scale")}
