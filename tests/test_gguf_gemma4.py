"""Gemma 4 GGUF (arch `gemma4`): a tiny file written with the gguf package as llama.cpp's converter writes one
(convert_hf_to_gguf.py's Gemma4Model in conversion/gemma.py, read by src/models/gemma4.cpp, vendored in
llama-cpp-python 0.3.36): llama.cpp's tensor names (per-layer embeddings, experts and their scales,
layer_output_scale, rope_freqs), norms stored as w (no unit offset), per-layer arrays for head_count_kv and
feed_forward_length, one bool per layer for the sliding pattern. Read back, it is the same model as the
safetensors checkpoint it came from: config, every tensor bit for bit (F32), and the logits."""

import json

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file
from test_gguf import VOCAB

import refprism
from refprism.checkpoints.gguf import read_gguf
from refprism.errors import CheckpointError
from refprism.gemma.config import Config

# HF module (after model.layers.{l}.) -> llama.cpp's name (after blk.{l}.), written from gguf-py's tensor_mapping
_BLOCK = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
          "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
          "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
          "self_attn.k_norm.weight": "attn_k_norm.weight",
          "post_attention_layernorm.weight": "post_attention_norm.weight",
          "pre_feedforward_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
          "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
          "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
          "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
          "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
          "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight",
          "router.proj.weight": "ffn_gate_inp.weight", "router.scale": "ffn_gate_inp.scale",
          "router.per_expert_scale": "ffn_down_exps.scale", "experts.gate_up_proj": "ffn_gate_up_exps.weight",
          "experts.down_proj": "ffn_down_exps.weight", "layer_scalar": "layer_output_scale.weight",
          "per_layer_input_gate.weight": "inp_gate.weight", "per_layer_projection.weight": "proj.weight",
          "post_per_layer_input_norm.weight": "post_norm.weight"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "model.embed_tokens_per_layer.weight": "per_layer_token_embd.weight",
           "model.per_layer_model_projection.weight": "per_layer_model_proj.weight",
           "model.per_layer_projection_norm.weight": "per_layer_proj_norm.weight"}


def llama_cpp_name(hf: str) -> str:
    if hf in _GLOBAL:
        return _GLOBAL[hf]
    _, _, l, rest = hf.split(".", 3)
    return f"blk.{l}.{_BLOCK[rest]}"


def write_gemma4_gguf(path, hf: dict, tensors: dict, *, split_experts=False, extra=None, rope_freqs=None,
                      tokenizer_model="gemma4"):
    """The converter's metadata (Gemma4Model.set_gguf_parameters and TextModel's) and tensors, F32."""
    cfg = Config.from_hf(hf)
    L = cfg.n_layers
    w = gguf.GGUFWriter(str(path), "gemma4")
    a = "gemma4."
    w.add_file_type(gguf.LlamaFileType.ALL_F32)  # general.file_type: llama.cpp's side reads "F32" from it
    w.add_uint32(a + "block_count", L)
    w.add_uint32(a + "context_length", hf["max_position_embeddings"])
    w.add_uint32(a + "embedding_length", cfg.d_model)
    w.add_array(a + "feed_forward_length", [cfg.mlp_width_of(l) for l in range(L)])
    w.add_uint32(a + "attention.head_count", cfg.n_heads)
    w.add_array(a + "attention.head_count_kv", [cfg.kv_heads_of(l) for l in range(L)])
    w.add_uint32(a + "attention.key_length", cfg.d_head_global)
    w.add_uint32(a + "attention.value_length", cfg.d_head_global)
    w.add_uint32(a + "attention.key_length_swa", cfg.d_head)
    w.add_uint32(a + "attention.value_length_swa", cfg.d_head)
    w.add_float32(a + "attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_uint32(a + "attention.sliding_window", cfg.sliding_window)
    w.add_array(a + "attention.sliding_window_pattern", [t == "sliding_attention" for t in cfg.layer_types])
    w.add_uint32(a + "attention.shared_kv_layers", cfg.n_kv_shared)
    w.add_uint32(a + "embedding_length_per_layer_input", cfg.d_ple)
    w.add_float32(a + "rope.freq_base", cfg.rope_theta)
    w.add_float32(a + "rope.freq_base_swa", cfg.rope_local_theta)
    w.add_uint32(a + "rope.dimension_count", cfg.d_head_global)
    w.add_uint32(a + "rope.dimension_count_swa", cfg.d_head)
    w.add_float32(a + "final_logit_softcapping", cfg.final_softcap)
    w.add_uint32(a + "expert_count", cfg.n_experts)
    w.add_uint32(a + "expert_used_count", cfg.top_k)
    w.add_uint32(a + "expert_feed_forward_length", cfg.d_expert)
    w.add_tokenizer_model(tokenizer_model)  # "llama" (SentencePiece) for llama.cpp: its "gemma4" is BPE with merges
    vocab = VOCAB + [(f"x{i}", 1) for i in range(cfg.vocab_size - len(VOCAB))]
    w.add_token_list([p for p, _ in vocab])
    w.add_token_scores([-float(i) for i in range(len(vocab))])
    w.add_token_types([t for _, t in vocab])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    n_rot = int(cfg.d_head_global * cfg.rope_partial / 2)  # Gemma4Model.generate_extra_tensors
    if rope_freqs is None:
        rope_freqs = np.array([1.0] * n_rot + [1e30] * (cfg.d_head_global // 2 - n_rot), np.float32)
    w.add_tensor("rope_freqs.weight", rope_freqs)
    for name, arr in tensors.items():
        if split_experts and name.endswith("experts.gate_up_proj"):
            I = cfg.d_expert
            base = llama_cpp_name(name).replace("ffn_gate_up_exps", "{}")
            w.add_tensor(base.format("ffn_gate_exps"), np.ascontiguousarray(arr[:, :I]))
            w.add_tensor(base.format("ffn_up_exps"), np.ascontiguousarray(arr[:, I:]))
            continue
        w.add_tensor(llama_cpp_name(name), arr)  # as stored: Gemma 4's norm_shift is 0
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny4(checkpoint):
    d = checkpoint("tiny-gemma4")
    return d, json.loads((d / "config.json").read_text()), load_file(d / "model.safetensors")


@pytest.mark.parametrize("split", [False, True])
def test_gemma4_gguf_round_trip(tiny4, tmp_path, split):
    d, hf, tensors = tiny4
    path = write_gemma4_gguf(tmp_path / "g4.gguf", hf, tensors, split_experts=split)
    config, arrays, _ = read_gguf(path)
    assert Config.from_hf({k: v for k, v in config.items() if k != "gguf_defaults"}) == Config.from_hf(hf)
    assert set(arrays) == set(tensors)
    for name, a in tensors.items():  # F32 everywhere: exact; norms exactly w
        np.testing.assert_array_equal(arrays[name], a, err_msg=name)
    ours, ref = refprism.load(path), refprism.load(d)
    ids = np.arange(4, 20)
    np.testing.assert_array_equal(ours.run(ids).logits, ref.run(ids).logits)


def test_gemma4_gguf_consumer_kv_ignored_rope_freqs_read_and_checked(tiny4, tmp_path):
    _, hf, tensors = tiny4
    extra = {"blk.5.attn_k.weight": np.ones((32, 64), np.float32)}  # a KV-sharing layer's k: ignored
    config, arrays, _ = read_gguf(write_gemma4_gguf(tmp_path / "a.gguf", hf, tensors, extra=extra))
    assert "model.layers.5.self_attn.k_proj.weight" not in arrays
    bad = dict(tensors)
    cfg = Config.from_hf(hf)
    path = tmp_path / "b.gguf"
    write_gemma4_gguf(path, {**hf, "rope_parameters": {**hf["rope_parameters"], "full_attention": {
        **hf["rope_parameters"]["full_attention"], "partial_rotary_factor": 0.5}}}, bad)
    config, _, _ = read_gguf(path)
    assert config["rope_parameters"]["full_attention"]["partial_rotary_factor"] == 0.5 != cfg.rope_partial
    wrong = np.ones(16, np.float32)
    wrong[2] = 1e30  # a still frequency between rotated ones: not proportional RoPE
    with pytest.raises(CheckpointError, match="rope_freqs is not Gemma 4's proportional RoPE"):
        read_gguf(write_gemma4_gguf(tmp_path / "c.gguf", hf, tensors, rope_freqs=wrong))
