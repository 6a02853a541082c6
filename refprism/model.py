"""The user-facing object: `model = refprism.load(...)`, `run = model.run(prompt)`."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refprism.checkpoints.safetensors import read_tensors, resolve_model_dir
from refprism.errors import CheckpointError, InputError
from refprism.gemma.config import Config, read_config
from refprism.gemma.forward import embed_normalizer, forward, forward_packed
from refprism.gemma.record import (
    Record,
    Selection,
    as_selection,
    estimate_bytes,
    prompt_bytes,
    symbolic_shapes,
    with_transient,
)
from refprism.gemma.weights import (
    Weights,
    available_memory,
    check_gemma4_tensors,
    choose_memory,
    compute_dtype,
    gemma4_ignored,
    hf_shapes,
    text_decoder_names,
)


@dataclass
class Run:
    """One forward pass: the token ids, their pieces, and every activation by name."""

    tokens: np.ndarray  # [T] int64
    pieces: list[str]
    record: Record

    @property
    def logits(self) -> np.ndarray:
        """[T, V] raw logits."""
        return self.record["logits"]


@dataclass
class Model:
    """A loaded Gemma model (1, 2 or 3 text): config, parameters in the compute dtype, tokenizer (if the directory has
    one)."""

    config: Config
    params: Weights = field(repr=False)
    tokenizer: object = field(repr=False)  # tokenizers.Tokenizer or None
    name: str = ""
    normalizer: np.ndarray = field(default=None, repr=False)
    notes: list = field(default_factory=list, repr=False)  # what loading ignored (a multimodal file's towers)

    @property
    def dtype(self) -> np.dtype:
        return self.params.dtype

    def encode(self, prompt) -> np.ndarray:
        """A prompt (text, with BOS as the tokenizer adds it) or a sequence of token ids -> ids [T], checked."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InputError(f"{self.name} has no tokenizer.json: give the prompt as token ids")
            check_text(prompt, "the prompt")
            ids = self.tokenizer.encode(prompt).ids
            if not ids:
                raise InputError(f"{self.name}'s tokenizer turned the prompt into no tokens (not even BOS): "
                                 "check its tokenizer.json, or give token ids")
            beyond = [i for i in ids if i >= self.config.vocab_size]
            if beyond:
                raise CheckpointError(f"{self.name}'s tokenizer gave token id {beyond[0]}, beyond the embedding's "
                                      f"{self.config.vocab_size} rows: tokenizer.json does not match these weights")
        else:
            if isinstance(prompt, (bytes, bytearray)):
                raise InputError("the prompt is bytes: decode it to text (str) first, or give a list of token ids")
            try:
                ids = list(prompt)
            except TypeError:
                raise InputError("a prompt is a string or a sequence of integer token ids") from None
            if not all(isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_)) for i in ids):
                raise InputError("a prompt is a string or a sequence of integer token ids (not floats or booleans)")
            ids = [int(i) for i in ids]
            if not ids:
                raise InputError("the token id list is empty (an empty text prompt is the BOS-only run)")
        V = self.config.vocab_size
        bad = [i for i in ids if not 0 <= i < V]
        if bad:
            raise InputError(f"token id {bad[0]} is out of range: the vocabulary has ids 0 .. {V - 1}")
        if len(ids) > self.config.max_positions:
            raise InputError(f"the prompt has {len(ids)} tokens; the model's context is {self.config.max_positions} "
                             "tokens: shorten the prompt")
        return np.asarray(ids, dtype=np.int64)

    def piece(self, token_id: int) -> str:
        """The vocabulary piece of an id (e.g. 7127 -> '▁Paris'), or '#id' without a tokenizer."""
        if self.tokenizer is None:
            return f"#{int(token_id)}"
        piece = self.tokenizer.id_to_token(int(token_id))
        return f"#{int(token_id)}" if piece is None else piece

    def run(self, prompt, *, record=None, positions=None, edit=None, resume=None) -> Run:
        """Forward pass over a prompt (text or token ids), recording every activation (or a selection).

        record:    None (everything) or entries of record.Selection (`["blocks.*.attn.out@-1", "logits@-1"]`)
        positions: where logits are computed and kept (an int or a list, negative from the end); None: wherever
                   `record` keeps them (everything by default). The unembedding is the largest product of a long
                   prompt: ask only for the positions you read.
        edit, resume: forward.forward's edit function and (layer, clean record) resume point.
        Before running, the record's size is estimated; a run that cannot fit in the memory available is refused
        in one line (`preflight`), not killed by the kernel minutes later.
        """
        tokens = self.encode(prompt)
        selection = self._selection(record, positions, [len(tokens)])
        preflight(self, [len(tokens)], selection, edited=edit is not None)
        rec = forward(self.params, self.config, tokens, normalizer=self.normalizer, edit=edit, resume=resume,
                      record=selection)
        return Run(tokens=tokens, pieces=[self.piece(t) for t in tokens], record=rec)

    def run_many(self, prompts, *, record=None, positions=None, pack_tokens=1024) -> list[Run]:
        """Many prompts, computed in packed passes (forward.forward_packed): one Run per prompt, each its own
        view (tokens, logits, record), equal to `run` within float32 rounding; the prisms work on it unchanged.

        Prompts are packed in the given order into passes of at most `pack_tokens` tokens (a longer prompt runs
        alone), and fewer when the memory preflight says a pack's record would not fit.
        record, positions: as for `run`; positions are each prompt's own (-1: every prompt's last position).
        """
        if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__"):
            raise InputError("run_many takes a list of prompts (texts or token id lists)")
        encoded = []
        for i, prompt in enumerate(prompts):
            try:
                encoded.append(self.encode(prompt))
            except InputError as e:
                raise InputError(f"prompt {i}: {e}") from None
        if not encoded:
            return []
        if not isinstance(pack_tokens, (int, np.integer)) or pack_tokens < 1:
            raise InputError(f"pack_tokens must be a positive integer, got {pack_tokens!r}")
        selection = self._selection(record, positions, [len(t) for t in encoded])  # checked against every prompt
        runs = []
        for pack in self._packs(encoded, selection, pack_tokens):
            lengths = [len(t) for t in pack]
            preflight(self, lengths, selection)
            records = forward_packed(self.params, self.config, pack, normalizer=self.normalizer, record=selection)
            runs += [Run(tokens=t, pieces=[self.piece(i) for i in t], record=r) for t, r in zip(pack, records)]
        return runs

    def _packs(self, encoded, selection, pack_tokens):
        """Consecutive prompts grouped while the pack stays within pack_tokens and within memory (each prompt's
        record bytes counted once per length, the pack's total kept as it grows)."""
        budget = available_memory() * MEMORY_SHARE
        kept = {}  # T -> (record bytes, logits bytes) of one prompt of T tokens in a pack
        pack, record, logits = [], 0, 0
        for t in encoded:
            T = len(t)
            if T not in kept:
                kept[T] = prompt_bytes(self.config, T, self.dtype, selection, alone=False)
            if pack:
                lengths = [len(x) for x in pack] + [T]
                need = with_transient(self.config, lengths, self.dtype, record + kept[T][0], logits + kept[T][1])
                if sum(lengths) > pack_tokens or need["total"] > budget:
                    yield pack
                    pack, record, logits = [], 0, 0
            pack.append(t)
            record, logits = record + kept[T][0], logits + kept[T][1]
        if pack:
            yield pack

    def _selection(self, record, positions, lengths):
        """The Selection a run records: `record` as given, with logits only at `positions` when those are given."""
        selection = as_selection(record)
        if positions is None:
            return selection
        ps = [positions] if isinstance(positions, (int, np.integer)) else list(positions)
        if not ps or not all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in ps):
            raise InputError(f"positions must be an integer or a list of integers, got {positions!r}")
        for T in lengths:
            bad = [p for p in ps if not -T <= p < T]
            if bad:
                raise InputError(f"position {bad[0]} is out of range for {T} tokens (use 0 .. {T - 1} or -{T} .. -1)")
        at = "@" + ",".join(str(int(p)) for p in ps)
        logit_names = ("logits", "logits_uncapped")
        if selection is None:  # everything, but the logits only at the positions asked for
            entries = [n for n in symbolic_shapes(self.config) if n not in logit_names]
        else:
            entries = [g + ("" if r is None else "@" + ",".join(map(str, r))) for g, r in selection.entries
                       if not any(fnmatch.fnmatchcase(n, g) for n in logit_names)]
        entries += [n + at for n in logit_names if n in symbolic_shapes(self.config)]
        return Selection(entries)


# The share of available memory a run may plan to use: the rest is left for the OS, the page cache and the
# arrays a prism makes afterwards.
MEMORY_SHARE = 0.9


def preflight(model, lengths, selection, *, edited=False) -> None:
    """Refuse, in one line and before allocating anything, a run whose record cannot fit in available memory.

    The estimate (record.estimate_bytes) counts what the record keeps plus one layer's attention scores and
    pattern and MLP activations, which every pass makes whether it keeps them or not.
    """
    need = estimate_bytes(model.config, lengths, model.dtype, selection, edited=edited)
    free = available_memory()
    if need["total"] <= free * MEMORY_SHARE:
        return
    gb = lambda n: f"{n / 2**30:.1f} GB"  # noqa: E731
    T = max(lengths)
    raise InputError(
        f"a run of {sum(lengths)} tokens would need about {gb(need['total'])} (record {gb(need['record'])}, of which "
        f"logits {gb(need['logits'])}; attention {gb(need['attention'])} per layer at T={T}) but {gb(free)} is "
        "available: ask for logits only where you read them (positions=, --position), record a selection "
        "(record=...), shorten the prompt, or use --memory low")


def load(model=None, dtype="float32", *, memory="auto", normalizer_dtype=None) -> Model:
    """Load a Gemma model (Gemma 1, 2 or 3 text) from a local directory, a GGUF file or a hub repo id.

    model:  a directory with config.json, safetensors weights (single or sharded) and tokenizer.json; a .gguf
            file (dequantized with the `gguf` package, refprism/checkpoints/gguf.py); or a hub id such as
            "google/gemma-2b" (only the needed files are downloaded). None: $REFPRISM_MODEL, else google/gemma-2b.
    dtype:  "float32" (default) or "float64" (audit mode): every weight and activation is in this dtype.
    memory: "fast" converts every weight once at load (4 bytes a parameter in float32, 8 in float64);
            "low" keeps the stored weights memory-mapped and converts each layer when it is used (about a third
            of the memory, slower); "auto" (default) is "fast" when it fits in the available memory.
    normalizer_dtype: round the sqrt(D) embedding scale in this dtype instead of the compute dtype
            (e.g. "bfloat16" reproduces a bf16 run's 45.25 for gemma-2b).
    """
    dt = compute_dtype(dtype)
    if isinstance(model, (str, os.PathLike)) and os.fspath(model).lower().endswith(".gguf"):
        return _load_gguf(Path(model), dt, normalizer_dtype)
    model_dir, name = _resolve(model)
    cfg = read_config(model_dir)
    tokenizer = _read_tokenizer(model_dir, cfg)
    notes: list = []
    params = Weights(read_tensors(model_dir, cfg, notes), cfg, dt, choose_memory(cfg, dt, memory))
    normalizer = embed_normalizer(cfg.d_model, dt, round_to=normalizer_dtype)
    return Model(config=cfg, params=params, tokenizer=tokenizer, name=name, normalizer=normalizer, notes=notes)


def _load_gguf(path: Path, dt, normalizer_dtype) -> Model:
    """A GGUF file: config from its metadata (plus the documented defaults), dequantized tensors, its tokenizer.

    The dequantized float32 tensors are already in memory, so the weights are converted once ("fast" mode).
    """
    try:
        from refprism.checkpoints.gguf import read_gguf
    except ImportError:
        raise CheckpointError("reading GGUF files needs the gguf package: pip install 'refprism[gguf]'") from None
    hf, tensors, tokenizer = read_gguf(path)
    return from_arrays(hf, tensors, tokenizer, name=str(path), dtype=dt, normalizer_dtype=normalizer_dtype)


def from_arrays(hf_config: dict, tensors: dict, tokenizer=None, *, name="", dtype="float32",
                normalizer_dtype=None) -> Model:
    """A model from an HF config dict and HF-named arrays in memory (GGUF files, tests, other frameworks' weights).

    The arrays are checked like a checkpoint's (names, shapes, finite values) and converted once.
    """
    dt = compute_dtype(dtype)
    cfg = Config.from_hf({k: v for k, v in hf_config.items() if k != "gguf_defaults"})
    tensors, notes = text_decoder_names(dict(tensors))
    if cfg.gemma4:
        tensors.pop("lm_head.weight", None)  # tied (a multimodal file may store it)
    check_gemma4_tensors(cfg, tensors)
    tensors = {n: a for n, a in tensors.items() if not gemma4_ignored(cfg, n)}
    expected = hf_shapes(cfg)
    missing = [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{name or 'the arrays'}: " + (f"missing tensor {missing[0]}" if missing else
                                                             f"unexpected tensor {unexpected[0]}"))
    for n, shape in expected.items():
        if tuple(tensors[n].shape) != shape:
            raise CheckpointError(f"tensor {n} has shape {list(tensors[n].shape)}, the config implies {list(shape)}")
    params = Weights.from_arrays(tensors, cfg, dt, memory="fast")
    if tokenizer is not None and tokenizer.get_vocab_size() > cfg.vocab_size:
        raise CheckpointError(f"{name}: the vocabulary has {tokenizer.get_vocab_size()} tokens but the embedding "
                              f"only {cfg.vocab_size} rows")
    normalizer = embed_normalizer(cfg.d_model, dt, round_to=normalizer_dtype)
    return Model(config=cfg, params=params, tokenizer=tokenizer, name=name, normalizer=normalizer, notes=notes)


def _resolve(model) -> tuple[Path, str]:
    """weights.resolve_model_dir, with the argument checked and the path's own failures as CheckpointErrors."""
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise InputError(f"model must be a directory or a hub id (a string), got {type(model).__name__}")
    text = "" if model is None else os.fspath(model)
    if isinstance(text, bytes) or "\0" in text:
        raise InputError(f"model {text!r} is not a usable path or hub id (bytes or a NUL character)")
    try:
        return resolve_model_dir(model)
    except OSError as e:  # e.g. a name longer than the file system allows
        raise CheckpointError(f"cannot use the model path {text[:80]!r}: {e.strerror or e}") from None
    except RuntimeError:  # Path.expanduser: "~someone/..." for a user this system does not have
        if not text.startswith("~"):
            raise
        raise CheckpointError(f"cannot expand {text[:80]!r}: no such user's home directory") from None
    except ValueError as e:
        from huggingface_hub.errors import HFValidationError

        if isinstance(e, HFValidationError):  # looks like owner/name but the hub refuses the spelling
            raise CheckpointError(f"{text[:80]!r} is neither a model directory nor a valid hub id "
                                  f"({str(e).splitlines()[0][:100]})") from None
        raise


def check_text(text: str, what: str) -> None:
    """Refuse text that is not Unicode (lone surrogates: undecodable bytes of a command line, or bad escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        byte = f" (byte 0x{ord(bad) - 0xDC00:02x})" if 0xDC80 <= ord(bad) <= 0xDCFF else ""
        raise InputError(f"{what} is not valid UTF-8 text: character {e.start} is a lone surrogate "
                         f"{bad.encode('unicode_escape').decode()}{byte}; give UTF-8 text") from None


def _read_tokenizer(model_dir: Path, cfg: Config):
    """tokenizer.json through `tokenizers`, or None when the directory has none."""
    path = model_dir / "tokenizer.json"
    if not path.exists():
        return None
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"{path} is not a valid tokenizers file ({str(e).splitlines()[0][:200]})") from None
    if tok.get_vocab_size() > cfg.vocab_size:
        raise CheckpointError(
            f"tokenizer.json has {tok.get_vocab_size()} tokens but the embedding has only {cfg.vocab_size} rows: "
            "use the tokenizer that came with these weights")
    return tok
