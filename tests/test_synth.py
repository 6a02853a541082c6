"""Tests of refprism.checkpoints.synth (random-weight HF checkpoints) and tools/make_checkpoint.py."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch  # plain import on purpose: the HF cross-load below must run in CI
import transformers
from conftest import shared_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from refprism.checkpoints import synth
from refprism.checkpoints.synth import PRESETS, build_small_tokenizer, make_config, write_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
SENTENCE = "The capital city of France is"

# The tiny preset written out by hand: V=512, D=64, N=4, K=2, H=16, F=128, L=2.
TINY_LAYER_SHAPES = {
    "input_layernorm.weight": (64,),
    "self_attn.q_proj.weight": (64, 64),  # [N*H, D]
    "self_attn.k_proj.weight": (32, 64),  # [K*H, D]
    "self_attn.v_proj.weight": (32, 64),  # [K*H, D]
    "self_attn.o_proj.weight": (64, 64),  # [D, N*H]
    "post_attention_layernorm.weight": (64,),
    "mlp.gate_proj.weight": (128, 64),  # [F, D]
    "mlp.up_proj.weight": (128, 64),  # [F, D]
    "mlp.down_proj.weight": (64, 128),  # [D, F]
}
TINY_SHAPES = {
    "model.embed_tokens.weight": (512, 64),
    **{f"model.layers.{i}.{k}": s for i in range(2) for k, s in TINY_LAYER_SHAPES.items()},
    "model.norm.weight": (64,),
}
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def read_tensors(folder: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a checkpoint folder, and the file each came from."""
    tensors, origin = {}, {}
    for path in sorted(folder.glob("*.safetensors")):
        for name, array in load_file(path).items():
            assert name not in tensors, f"{name} stored twice"
            tensors[name], origin[name] = array, path.name
    return tensors, origin


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def test_gemma_2b_preset_matches_the_hub_config():
    expected = {
        "architectures": ["GemmaForCausalLM"], "model_type": "gemma", "vocab_size": 256000,
        "hidden_size": 2048, "intermediate_size": 16384, "num_hidden_layers": 18,
        "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256, "hidden_act": "gelu",
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    }
    config = make_config("gemma-2b")
    assert {k: config[k] for k in expected} == expected
    # 2,506,172,416 parameters: the published count of gemma-2b.
    assert sum(math.prod(s) for s in synth.tensor_shapes(config).values()) == 2_506_172_416


def test_gemma_7b_and_tiny_presets():
    c7 = make_config("gemma-7b")
    assert (c7["num_hidden_layers"], c7["hidden_size"], c7["num_attention_heads"], c7["num_key_value_heads"],
            c7["head_dim"], c7["intermediate_size"], c7["vocab_size"]) == (28, 3072, 16, 16, 256, 24576, 256000)
    assert sum(math.prod(s) for s in synth.tensor_shapes(c7).values()) == 8_537_680_896
    tiny = make_config("tiny")
    assert (tiny["num_hidden_layers"], tiny["hidden_size"], tiny["num_attention_heads"], tiny["num_key_value_heads"],
            tiny["head_dim"], tiny["intermediate_size"], tiny["vocab_size"], tiny["max_position_embeddings"]) == (
        2, 64, 4, 2, 16, 128, 512, 128)
    assert synth.tensor_shapes(tiny) == TINY_SHAPES
    assert list(synth.tensor_shapes(tiny)) == list(TINY_SHAPES)  # file order too


def test_make_config_overrides_and_does_not_alias_presets():
    config = make_config("tiny", num_key_value_heads=1, num_hidden_layers=3)
    assert (config["num_key_value_heads"], config["num_hidden_layers"]) == (1, 3)
    config["architectures"].append("oops")
    assert PRESETS["tiny"]["architectures"] == ["GemmaForCausalLM"]
    assert PRESETS["tiny"]["num_hidden_layers"] == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"hidden_size": 0}, "positive integer"),
        ({"intermediate_size": -4}, "positive integer"),
        ({"num_hidden_layers": 2.0}, "positive integer"),
        ({"vocab_size": True}, "positive integer"),
        ({"head_dim": 15}, "even"),
        ({"rms_norm_eps": 0.0}, "positive number"),
        ({"num_layers": 3}, "unknown config keys"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
        ({"torch_dtype": "int8"}, "torch_dtype"),
    ],
)
def test_make_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config("tiny", **overrides)


def test_make_config_rejects_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("gemma-3b")


# ---------------------------------------------------------------------------------------------
# Random values
# ---------------------------------------------------------------------------------------------


def test_random_tensor_scales():
    # Sample std of n normals has relative standard error 1/sqrt(2n); n >= 4096 here gives
    # < 1.2 %, so a 10 % tolerance cannot fail by chance but catches a wrong scale (e.g. 1/D).
    embed = synth.random_tensor("model.embed_tokens.weight", (512, 64), seed=0)
    assert embed.dtype == np.float32
    assert embed.std() == pytest.approx(1 / 8, rel=0.1)  # 1/sqrt(D)
    down = synth.random_tensor("model.layers.0.mlp.down_proj.weight", (64, 128), seed=0)
    assert down.std() == pytest.approx(128 ** -0.5, rel=0.1)  # 1/sqrt(fan_in = F)
    norm = synth.random_tensor("model.norm.weight", (65536,), seed=0)
    assert norm.std() == pytest.approx(0.3, rel=0.1)
    assert abs(norm.mean()) < 0.01  # 5 standard errors of the mean (0.3 / 256)
    with pytest.raises(ValueError, match="no initialisation rule"):
        synth.random_tensor("lm_head.weight", (4, 4))


def test_random_tensor_streams_depend_on_name_and_seed_only():
    a = synth.random_tensor("model.layers.0.self_attn.q_proj.weight", (8, 8), seed=1)
    assert np.array_equal(a, synth.random_tensor("model.layers.0.self_attn.q_proj.weight", (8, 8), seed=1))
    assert not np.array_equal(a, synth.random_tensor("model.layers.0.self_attn.q_proj.weight", (8, 8), seed=2))
    assert not np.array_equal(a, synth.random_tensor("model.layers.1.self_attn.q_proj.weight", (8, 8), seed=1))


# ---------------------------------------------------------------------------------------------
# Shard planning
# ---------------------------------------------------------------------------------------------


def test_plan_shards_literal_cases():
    assert synth._plan_shards([10, 1, 1, 1, 1, 1], shards=3) == [[0], [1, 2], [3, 4, 5]]
    assert synth._plan_shards([1, 1, 1, 1, 10], shards=4) == [[0], [1], [2, 3], [4]]
    assert synth._plan_shards([5, 5, 5, 5], max_shard_bytes=10) == [[0, 1], [2, 3]]
    assert synth._plan_shards([5, 20, 5], max_shard_bytes=10) == [[0], [1], [2]]  # oversize alone
    assert synth._plan_shards([5, 5], max_shard_bytes=100) == [[0, 1]]
    with pytest.raises(ValueError, match="non-empty shards"):
        synth._plan_shards([1, 1], shards=3)
    with pytest.raises(ValueError, match="not both"):
        synth._plan_shards([1, 1], shards=2, max_shard_bytes=1)
    with pytest.raises(ValueError, match="positive integer"):
        synth._plan_shards([1, 1], shards=0)


def _optimal_bottleneck(sizes: list[int], n: int) -> int:
    """Smallest possible largest part over all splits of sizes into n contiguous non-empty parts (DP)."""
    prefix = [0, *np.cumsum(sizes).tolist()]
    best = {(0, 0): 0}  # (parts, items used) -> smallest largest part
    for k in range(1, n + 1):
        for j in range(k, len(sizes) + 1):
            best[(k, j)] = min(
                max(best[(k - 1, i)], prefix[j] - prefix[i]) for i in range(k - 1, j) if (k - 1, i) in best
            )
    return best[(n, len(sizes))]


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 1000), min_size=1, max_size=12), data=st.data())
def test_plan_shards_partitions_in_order_and_is_optimal(sizes, data):
    n = data.draw(st.integers(1, len(sizes)))
    plan = synth._plan_shards(sizes, shards=n)
    assert len(plan) == n and all(plan)
    assert [i for group in plan for i in group] == list(range(len(sizes)))
    assert max(sum(sizes[i] for i in g) for g in plan) == _optimal_bottleneck(sizes, n)


# ---------------------------------------------------------------------------------------------
# Written checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shards", [1, 3])
def test_written_checkpoint_files_shapes_dtypes(tmp_path, dtype, shards):
    out = write_checkpoint(tmp_path / "ckpt", make_config("tiny"), dtype=dtype, shards=shards, seed=3)
    assert out == (tmp_path / "ckpt").absolute()
    names = {p.name for p in out.iterdir()}
    weight_files = (
        {"model.safetensors"} if shards == 1
        else {f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)} | {"model.safetensors.index.json"}
    )
    assert names == weight_files | {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left

    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask  # not mkdtemp's 0700
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}  # not safetensors' 0600

    config = json.loads((out / "config.json").read_text())
    assert config == {**make_config("tiny"), "torch_dtype": dtype}

    tensors, origin = read_tensors(out)
    assert {k: v.shape for k, v in tensors.items()} == TINY_SHAPES
    assert all(v.dtype == NP_DTYPES[dtype] for v in tensors.values())
    for path in out.glob("*.safetensors"):
        with safe_open(path, "np") as f:
            assert f.metadata() == {"format": "pt"}
    if shards == 3:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == origin  # every tensor, once, in the file it is really in
        itemsize = np.dtype(NP_DTYPES[dtype]).itemsize
        assert index["metadata"]["total_size"] == sum(math.prod(s) for s in TINY_SHAPES.values()) * itemsize
        assert len(set(origin.values())) == 3

    for name, value in tensors.items():
        if name.endswith("norm.weight"):
            w = value.astype(np.float32)
            assert np.all(w != 0) and 0.15 < w.std() < 0.5, name  # random, non-zero: (1 + w) matters


def test_values_do_not_depend_on_sharding_or_dtype_cast(tmp_path):
    single, _ = read_tensors(write_checkpoint(tmp_path / "a", make_config("tiny"), shards=1, seed=7))
    split, _ = read_tensors(write_checkpoint(tmp_path / "b", make_config("tiny"), shards=3, seed=7))
    bf16, _ = read_tensors(write_checkpoint(tmp_path / "c", make_config("tiny"), dtype="bfloat16", seed=7))
    other, _ = read_tensors(write_checkpoint(tmp_path / "d", make_config("tiny"), seed=8))
    for name in TINY_SHAPES:
        assert np.array_equal(single[name], split[name]), name
        # bf16 is exactly the float32 values rounded to nearest even, not a separate draw.
        assert np.array_equal(single[name].astype(ml_dtypes.bfloat16).view(np.uint16), bf16[name].view(np.uint16)), name
        assert not np.array_equal(single[name], other[name]), name


def test_max_shard_bytes_shards_like_the_hub(tmp_path):
    config = make_config("tiny")
    # embed is 512*64*4 = 131072 bytes; each layer about 129 kB; cap at 140 kB.
    out = write_checkpoint(tmp_path / "c", config, max_shard_bytes=140_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for file in files:
        tensors = load_file(out / file)
        assert sum(v.nbytes for v in tensors.values()) <= 140_000 or len(tensors) == 1, file


def test_refuses_non_empty_out_dir_and_force_replaces(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_checkpoint(out, make_config("tiny"))
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    write_checkpoint(out, make_config("tiny"), force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    write_checkpoint(empty, make_config("tiny"))  # an empty folder is not refused
    assert (empty / "config.json").is_file()


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        synth_save(tensors, filename, metadata=metadata)

    synth_save = synth.save_file
    monkeypatch.setattr(synth, "save_file", failing_save)
    with pytest.raises(OSError, match="simulated"):
        write_checkpoint(tmp_path / "ckpt", make_config("tiny"), shards=3)
    assert len(calls) == 2  # the first shard was really written before the failure
    assert list(tmp_path.iterdir()) == []

    # With force, a failed rewrite keeps the old checkpoint intact.
    monkeypatch.setattr(synth, "save_file", synth_save)
    old = write_checkpoint(tmp_path / "ckpt", make_config("tiny"), seed=1)
    before = (old / "model.safetensors").read_bytes()
    calls.clear()
    monkeypatch.setattr(synth, "save_file", failing_save)
    with pytest.raises(OSError, match="simulated"):
        write_checkpoint(tmp_path / "ckpt", make_config("tiny"), shards=3, seed=2, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert (old / "model.safetensors").read_bytes() == before


def test_write_checkpoint_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        write_checkpoint(tmp_path / "a", dtype="bf16")
    with pytest.raises(ValueError, match="seed"):
        write_checkpoint(tmp_path / "a", seed=-1)
    with pytest.raises(ValueError, match="tokenizer"):
        write_checkpoint(tmp_path / "a", tokenizer="small")
    with pytest.raises(ValueError, match="multiple"):
        write_checkpoint(tmp_path / "a", {**make_config("tiny"), "num_key_value_heads": 3})
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_none_and_small_vocab(tmp_path):
    out = write_checkpoint(tmp_path / "c", make_config("tiny", vocab_size=100), tokenizer=None)
    assert not (out / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="vocab_size >= 256"):
        write_checkpoint(tmp_path / "d", make_config("tiny", vocab_size=100))
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


# ---------------------------------------------------------------------------------------------
# transformers reads the checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, shards", [("float32", 1), ("bfloat16", 3)])
def test_transformers_loads_and_runs(tmp_path, dtype, shards):
    out = write_checkpoint(tmp_path / "c", make_config("tiny"), dtype=dtype, shards=shards)
    model, info = transformers.GemmaForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    # Legacy hidden_act "gelu" is read as tanh GELU, as for the hub's gemma-2b.
    assert model.config.hidden_act == "gelu_pytorch_tanh"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    stored, _ = read_tensors(out)
    np.testing.assert_array_equal(  # bf16 -> f32 is exact
        model.model.layers[1].mlp.down_proj.weight.detach().numpy(),
        stored["model.layers.1.mlp.down_proj.weight"].astype(np.float32),
    )

    ids = torch.tensor([[2, 131, 103, 104, 105]])
    with torch.no_grad():
        result = model(ids, output_attentions=True)
    logits = result.logits
    assert logits.shape == (1, 5, 512) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    # "Numerically interesting": logits of order 1-10, attention neither uniform nor one-hot.
    std = logits[0].std(-1)
    assert ((0.3 < std) & (std < 10)).all(), std
    last = torch.stack([a[0, :, -1] for a in result.attentions])  # [L, N, S] for the last query
    assert last.max() < 0.99 and (last.max(-1).values > 1 / 5 + 0.05).all(), last


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_tok():
    return build_small_tokenizer(512)


def test_small_tokenizer_encodes_like_gemma(small_tok):
    tok = small_tok
    enc = tok.encode(SENTENCE)
    assert enc.tokens == ["<bos>", "The", "\u2581capital", "\u2581city", "\u2581of", "\u2581France", "\u2581is"]
    expected = [2] + [tok.token_to_id(t) for t in enc.tokens[1:]]
    assert enc.ids == expected and None not in expected
    assert len(set(enc.ids)) == 7
    assert [tok.id_to_token(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert tok.get_vocab_size() == 512
    for word in ["Paris", "London", "Moscow", "Hanoi", "Dublin", "Amsterdam", "Tehran", "Seoul", "Tokyo"]:
        assert tok.encode(" " + word).tokens == ["<bos>", "\u2581" + word], word
    assert tok.encode("2024").tokens == ["<bos>", "2", "0", "2", "4"]  # digits split, as in Gemma
    assert tok.encode("x<unused5>y").tokens == ["<bos>", "x", "<unused5>", "y"]
    assert tok.decode(enc.ids) == SENTENCE
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<bos>" + SENTENCE


@pytest.mark.parametrize("vocab_size", [256, 257, 1000])
def test_small_tokenizer_vocab_size_is_exact(vocab_size):
    tok = build_small_tokenizer(vocab_size)
    assert tok.get_vocab_size() == vocab_size
    assert tok.id_to_token(vocab_size - 1) == f"<unused{vocab_size - 1 - len(synth._small_pieces())}>"
    assert tok.id_to_token(vocab_size) is None


def test_small_tokenizer_rejects_small_vocab():
    with pytest.raises(ValueError, match="vocab_size >= 256"):
        build_small_tokenizer(255)


_ALPHABET = [c for c in "abcdefghijklmnopqrstuvwxyzTHEPARIS0123456789 .,!?'\n\t-"]


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=_ALPHABET, max_size=40) | st.lists(st.sampled_from(synth._WORDS + [" "])).map(" ".join))
def test_small_tokenizer_round_trips(small_tok, text):
    enc = small_tok.encode(text)
    assert enc.ids[0] == 2 and 3 not in enc.ids  # <bos> first, nothing unknown
    assert small_tok.decode(enc.ids) == text


def test_written_small_tokenizer_is_the_built_one(tmp_path):
    out = write_checkpoint(tmp_path / "c", make_config("tiny", vocab_size=300))
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == 300
    assert tok.encode(SENTENCE).ids == build_small_tokenizer(300).encode(SENTENCE).ids
    assert json.loads((out / "tokenizer_config.json").read_text()) == {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
    }


def test_transformers_auto_tokenizer_reads_the_small_tokenizer_as_written(tmp_path):
    out = write_checkpoint(tmp_path / "c", make_config("tiny"))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    # Not GemmaTokenizer, which would rebuild a BPE model and split "The" into characters.
    assert tok(SENTENCE).input_ids == build_small_tokenizer(512).encode(SENTENCE).ids
    assert len(tok) == 512


def test_tokenizer_selection_small_vocab():
    files = synth._tokenizer_files_for(512)
    assert set(files) == {"tokenizer.json", "tokenizer_config.json"}
    assert all(isinstance(v, str) for v in files.values())
    assert Tokenizer.from_str(files["tokenizer.json"]).get_vocab_size() == 512


def test_tokenizer_selection_real_vocab_uses_env_folder(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    monkeypatch.setenv("REFPRISM_SHARED_TOKENIZER", str(tmp_path))
    assert synth._tokenizer_files_for(256000) == {
        "tokenizer.json": tmp_path / "tokenizer.json",
        "tokenizer_config.json": tmp_path / "tokenizer_config.json",
    }
    monkeypatch.setenv("REFPRISM_SHARED_TOKENIZER", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="REFPRISM_SHARED_TOKENIZER"):
        synth._tokenizer_files_for(256000)
    # ... and write_checkpoint fails before writing anything.
    with pytest.raises(FileNotFoundError):
        write_checkpoint(tmp_path / "out", make_config("tiny", vocab_size=256000, num_hidden_layers=1,
                                                       hidden_size=8, intermediate_size=8, head_dim=2))
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "tokenizer.json", "tokenizer_config.json"]


def test_tokenizer_selection_real_vocab_default_folder(monkeypatch):
    """The default folder is ../shared/gemma-2b-tokenizer beside the checkout; the real vocabulary's files come from
    the folder the environment names (part of the test environment: absent, the test fails)."""
    monkeypatch.delenv("REFPRISM_SHARED_TOKENIZER", raising=False)
    assert synth._shared_tokenizer_dir() == REPO.parent / "shared" / "gemma-2b-tokenizer"
    SHARED = shared_tokenizer()
    monkeypatch.setenv("REFPRISM_SHARED_TOKENIZER", str(SHARED))
    files = synth._tokenizer_files_for(256000)
    assert files["tokenizer.json"] == SHARED / "tokenizer.json"
    assert files["tokenizer_config.json"] == SHARED / "tokenizer_config.json"
    tok = Tokenizer.from_file(str(files["tokenizer.json"]))
    assert tok.encode(SENTENCE).ids == [2, 651, 6037, 3413, 576, 6081, 603]
    assert tok.get_vocab_size() == 256000


# ---------------------------------------------------------------------------------------------
# The command-line tool
# ---------------------------------------------------------------------------------------------


def _run_tool(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "tools/make_checkpoint.py", *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


def test_tool_writes_a_sharded_bf16_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    result = _run_tool(out, "--preset", "tiny", "--dtype", "bfloat16", "--shards", "2", "--layers", "3")
    assert result.returncode == 0, result.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    tensors, _ = read_tensors(out)
    assert len(tensors) == 2 + 3 * 9
    assert all(v.dtype == ml_dtypes.bfloat16 for v in tensors.values())
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert (out / "tokenizer.json").is_file()
    assert str(out) in result.stdout


def test_tool_reports_errors_without_traceback(tmp_path):
    result = _run_tool(tmp_path / "x", "--kv-heads", "3")
    assert result.returncode == 2
    assert "multiple of num_key_value_heads" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "f").write_text("")
    result = _run_tool(tmp_path / "y")
    assert result.returncode == 2 and "not empty" in result.stderr
    result = _run_tool(tmp_path / "z", "--shards", "2", "--max-shard-bytes", "1000")
    assert result.returncode == 2 and "not allowed with" in result.stderr
