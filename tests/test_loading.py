"""Loading: single / sharded, f32 / bf16 / f16, strict names and shapes, no pickles, the hub's failures."""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
from conftest import shared_tokenizer
from safetensors.numpy import load_file, save_file

import refprism
from refprism.errors import AccessError, CheckpointError, InputError
from refprism.gemma.weights import to_compute


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_equals_single(checkpoint):
    one, three = refprism.load(checkpoint()), refprism.load(checkpoint(shards=3))
    ids = [2, 7, 9, 11]
    np.testing.assert_array_equal(one.run(ids).logits, three.run(ids).logits)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_converts_exactly(checkpoint, dtype):
    d = checkpoint(dtype=dtype)
    model = refprism.load(d)
    raw = load_file(str(d / "model.safetensors"))
    stored = raw["model.layers.1.mlp.down_proj.weight"]
    assert stored.dtype == np.dtype(dtype if dtype != "bfloat16" else ml_dtypes.bfloat16)
    np.testing.assert_array_equal(model.params.block(1)["W_down"], stored.astype(np.float32).T)
    np.testing.assert_array_equal(model.params.embedding(), raw["model.embed_tokens.weight"].astype(np.float32))


def test_bf16_fast_conversion_is_exact():
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    x[:4] = [np.inf, -np.inf, 0.0, -0.0]
    b = x.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(to_compute(b, np.float32), b.astype(np.float32))


def test_per_head_layout(tiny_dir, tiny):
    """W_Q[:, n] is q_proj's rows n*H:(n+1)*H transposed; W_O[n] is o_proj's columns n*H:(n+1)*H transposed."""
    raw = load_file(str(tiny_dir / "model.safetensors"))
    H = tiny.config.d_head
    q = raw["model.layers.0.self_attn.q_proj.weight"]
    o = raw["model.layers.0.self_attn.o_proj.weight"]
    for n in range(tiny.config.n_heads):
        np.testing.assert_array_equal(tiny.params.block(0)["W_Q"][:, n], q[n * H:(n + 1) * H].T)
        np.testing.assert_array_equal(tiny.params.block(0)["W_O"][n], o[:, n * H:(n + 1) * H].T)


def _rewrite(d, edit):
    path = d / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    _rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        refprism.load(d)


def test_unexpected_tensor_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    _rewrite(d, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.self_attn\.q_norm\.weight"):
        refprism.load(d)


def test_misshaped_tensor_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    _rewrite(d, lambda t: t.update({"model.norm.weight": np.zeros(63, np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has shape \[63\], config.json implies \[64\]"):
        refprism.load(d)


def test_untied_lm_head_refused_tied_accepted(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    _rewrite(d, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    refprism.load(d)  # an explicit copy of the tied matrix is fine
    _rewrite(d, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        refprism.load(d)


def test_unsupported_stored_dtype(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    _rewrite(d, lambda t: t.update({"model.norm.weight": np.zeros(64, np.int32)}))
    with pytest.raises(CheckpointError, match="model.norm.weight .* dtype I32"):
        refprism.load(d)


def test_pickles_refused_never_opened(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 not even read")
    with pytest.raises(CheckpointError, match="never unpickles"):
        refprism.load(d)
    with pytest.raises(CheckpointError, match="never unpickles"):
        refprism.load(d / "pytorch_model.bin")


def test_index_naming_missing_shard(checkpoint, tmp_path):
    d = _copy(checkpoint(shards=2), tmp_path / "m")
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names shard model-00002-of-00002.safetensors"):
        refprism.load(d)


def test_same_tensor_in_two_shards(checkpoint, tmp_path):
    d = _copy(checkpoint(shards=2), tmp_path / "m")
    first = load_file(str(d / "model-00001-of-00002.safetensors"))
    second = load_file(str(d / "model-00002-of-00002.safetensors"))
    name = next(iter(first))
    second[name] = first[name]
    save_file(second, str(d / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor {name} is stored twice"):
        refprism.load(d)


def test_truncated_safetensors(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        refprism.load(d)


def test_dtype_choices(tiny_dir):
    assert refprism.load(tiny_dir, dtype="float64").dtype == np.float64
    with pytest.raises(InputError, match="float32 or float64"):
        refprism.load(tiny_dir, dtype="float16")


def test_float32_run_stays_float32(tiny):
    run = tiny.run([2, 5, 6, 7])
    assert {a.dtype for a in run.record.values()} == {np.dtype(np.float32)}


def test_environment_variable_names_the_default_model(tiny_dir, monkeypatch):
    monkeypatch.setenv("REFPRISM_MODEL", str(tiny_dir))
    assert refprism.load().config.d_model == 64


def test_nonexistent_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(CheckpointError, match="no model directory"):
        refprism.load(str(tmp_path / "nope"))


def test_hub_offline_with_empty_cache(tmp_path, monkeypatch, network_guard):
    """Real huggingface_hub in offline mode (conftest sets it before the hub is imported), empty cache: one clear
    message, raised by the hub's offline mode; no host was looked up (the guard sees every attempt)."""
    import huggingface_hub.constants
    from huggingface_hub import errors as hf_errors

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(AccessError, match="not in the local HF cache .* go online once") as e:
        refprism.load("google/gemma-2b")
    assert network_guard.attempts == []
    cause = e.value.__context__  # what huggingface_hub raised (refprism re-raises it `from None`)
    assert isinstance(cause, (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled)), repr(cause)
    assert not any(isinstance(c, OSError) and "no network in tests" in str(c) for c in _chain(cause))


def _chain(error):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def test_the_network_guard_sees_a_hub_request(monkeypatch, network_guard):
    """The guard the offline tests stand on: with the hub's offline mode switched off, the same call is seen trying
    to reach huggingface.co (and refused: nothing leaves)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_ETAG_TIMEOUT", 1)
    with pytest.raises(AccessError):
        refprism.load("google/gemma-2b")
    assert any("huggingface.co" in attempt for attempt in network_guard.attempts), network_guard.attempts
    network_guard.attempts.clear()  # made on purpose: the autouse check after the test must not fail it


def test_hub_uses_cache_offline(tiny_dir, tmp_path, monkeypatch):
    """A model already in the HF cache loads in offline mode, from exactly the files refprism asks for."""
    import huggingface_hub

    asked = {}

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        asked.update(repo_id=repo_id, patterns=allow_patterns)
        return str(tiny_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = refprism.load("someone/tiny-gemma")
    assert model.name == "someone/tiny-gemma" and asked["repo_id"] == "someone/tiny-gemma"
    assert "config.json" in asked["patterns"] and "tokenizer.json" in asked["patterns"]
    assert not any(p.endswith((".bin", ".gguf", "*")) for p in asked["patterns"])


@pytest.mark.parametrize("error, message", [
    ("GatedRepoError", "gated: accept its license .* set HF_TOKEN"),
    ("RepositoryNotFoundError", "no hub model .* check the id"),
    ("LocalEntryNotFoundError", "go online once"),
])
def test_hub_errors_are_one_line(monkeypatch, error, message):
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    cls = getattr(hf_errors, error)

    def fail(*a, **kw):
        raise cls.__new__(cls)  # the classes want an HTTP response to construct; the type is what matters

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(AccessError, match=message) as e:
        refprism.load("google/gemma-2b")
    assert "\n" not in str(e.value)


def test_real_tokenizer_through_the_model(checkpoint):
    shared_tokenizer()  # the real tokenizer's folder: part of the test environment (absent: fail, naming it)
    d = checkpoint(vocab_size=256000, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=8, num_hidden_layers=1)
    model = refprism.load(d)
    run = model.run("The capital city of France is")
    assert run.tokens.tolist() == [2, 651, 6037, 3413, 576, 6081, 603]
    assert run.pieces == ["<bos>", "The", "▁capital", "▁city", "▁of", "▁France", "▁is"]
    assert model.piece(7127) == "▁Paris"
    assert model.run("").tokens.tolist() == [2]  # an empty prompt is the BOS-only run
    with pytest.raises(InputError, match="out of range"):
        model.run([2, 256000])


def test_prompt_longer_than_context(checkpoint):
    model = refprism.load(checkpoint(max_position_embeddings=8))
    with pytest.raises(InputError, match="9 tokens; the model's context is 8"):
        model.run(list(range(9)))


def test_tokenizer_larger_than_embedding_refused(checkpoint, tmp_path):
    d = _copy(checkpoint(), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    from refprism.checkpoints.synth import build_small_tokenizer
    build_small_tokenizer(cfg["vocab_size"] + 10).save(str(d / "tokenizer.json"))
    with pytest.raises(CheckpointError, match="tokenizer.json has 522 tokens but the embedding has only 512"):
        refprism.load(d)


def test_corrupt_tokenizer(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    (d / "tokenizer.json").write_text("{")
    with pytest.raises(CheckpointError, match="tokenizer.json is not a valid tokenizers file"):
        refprism.load(d)
