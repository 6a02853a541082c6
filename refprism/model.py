"""The user-facing object: `model = refprism.load(...)`, `run = model.run(prompt)`."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

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
    n_parameters,
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
class Deferred:
    """Weights not read yet (`load(..., defer=True)`): how to read them and what they will hold in memory."""

    read: Callable  # read(progress) -> Weights
    dtype: np.dtype
    memory: str  # "fast" or "low": the mode the weights will be read in
    resident: int  # bytes the read weights keep in memory (fast: every parameter in the compute dtype)
    progress: Callable | None = None  # progress(what, done, total), called as the weights are read


@dataclass
class Model:
    """A loaded Gemma model (1, 2 or 3 text): config, parameters in the compute dtype, tokenizer (if the directory has
    one).

    A model loaded with `defer=True` has its config and tokenizer but not yet its weights (`deferred`): they are
    read at the first use of `params` (a run, a prism), or by `load_weights()`. Everything that needs only the
    config and the tokenizer (encode, piece, check, the prisms' token lookups) works without them.
    """

    config: Config
    params: Weights = field(repr=False)
    tokenizer: object = field(repr=False)  # tokenizers.Tokenizer or None
    name: str = ""
    normalizer: np.ndarray = field(default=None, repr=False)
    notes: list = field(default_factory=list, repr=False)  # what loading ignored (a multimodal file's towers)
    deferred: Deferred | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.params is None and self.deferred is not None:
            del self.params  # read at first use: __getattr__ below

    def __getattr__(self, name):  # reached only for an attribute not set: the deferred weights
        if name == "params" and self.__dict__.get("deferred") is not None:
            return self.load_weights()
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def load_weights(self) -> Weights:
        """Read the weights of a model loaded with defer=True (once); a loaded model's weights as they are."""
        if self.deferred is not None:
            self.params = self.deferred.read(self.deferred.progress)
            self.deferred = None
        return self.params

    @property
    def dtype(self) -> np.dtype:
        return self.deferred.dtype if self.deferred is not None else self.params.dtype

    @property
    def memory(self) -> str:
        """The weights' memory mode: "fast" (converted at load) or "low" (converted per layer when used)."""
        return self.deferred.memory if self.deferred is not None else self.params.memory

    def check(self, prompt, *, record=None, positions=None, edited=False, spelling=None) -> np.ndarray:
        """What `run` checks before it computes, without computing (nor reading deferred weights): the prompt's
        token ids [T], every argument, and the memory the run's record needs (`preflight`)."""
        tokens = self.encode(prompt)
        selection = self._selection(record, positions, [len(tokens)])
        if selection is not None:
            selection.check(self.config)
        preflight(self, [len(tokens)], selection, edited=edited, spelling=spelling)
        return tokens

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
                   prompt: ask only for the positions you read. With record=None, the rest of the record is the
                   full one's (the same recipes, record.lazy_entry).
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

    def run_reading(self, prompt, position) -> Run:
        """The run a readout at `position` needs: the full record, the logits only there (no other row of the
        [T, V] unembedding is computed); the full run where `position` is not an integer in range (the reader's
        own error then follows)."""
        tokens = self.encode(prompt)
        inside = isinstance(position, (int, np.integer)) and not isinstance(position, bool) and \
            -len(tokens) <= position < len(tokens)
        return self.run(tokens, positions=[int(position)] if inside else None)

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
        return Selection(entries, everything=selection is None)


# The share of available memory a run may plan to use: the rest is left for the OS, the page cache and the
# arrays a prism makes afterwards.
MEMORY_SHARE = 0.9


def preflight(model, lengths, selection, *, edited=False, spelling=None) -> None:
    """Refuse, in one line and before allocating anything, a run whose record cannot fit in available memory.

    The estimate (record.estimate_bytes) counts what the record keeps plus one layer's attention scores and
    pattern and MLP activations, which every pass makes whether it keeps them or not. The memory of weights not
    yet read (a deferred model) is set aside first. The refusal names only the ways out that would fit
    (`ways_out`), spelled by `spelling` (key -> text; a key it lacks is not offered; default: the Python ones).
    """
    need = estimate_bytes(model.config, lengths, model.dtype, selection, edited=edited)
    pending = model.deferred.resident if model.deferred is not None else 0
    free = available_memory() - pending
    if need["total"] <= free * MEMORY_SHARE:
        return
    spelling = PYTHON_SPELLING if spelling is None else spelling
    ways = [spelling[key].format(**values) for key, values in
            ways_out(model, lengths, selection, edited=edited, free=free) if key in spelling]
    gb = lambda n: next(f"{n / 2**k:.1f} {unit}" for k, unit in ((30, "GB"), (20, "MB"), (10, "KB"))  # noqa: E731
                        if n >= 0.1 * 2**k) if n >= 100 else f"{n} bytes"
    T = max(lengths)
    weights = f" once the weights ({gb(pending)}) are loaded" if pending else ""
    advice = ("; or ".join(ways) if ways else
              "no smaller run of this command fits: free memory or use a machine with more")
    raise InputError(
        f"a run of {sum(lengths)} tokens would need about {gb(need['total'])} (record {gb(need['record'])}, of which "
        f"logits {gb(need['logits'])}; attention {gb(need['attention'])} per layer at T={T}) but {gb(max(free, 0))} "
        f"is available{weights}: {advice}")


# The ways out of the memory refusal, as the library spells them (refprism.cli has its own flags).
PYTHON_SPELLING = {
    "positions": "ask for the logits only where you read them (positions=-1)",
    "select": "record only what you read (record=[...], e.g. prisms.needs(model, ...))",
    "low": 'load the model with memory="low"',
    "float32": 'compute in dtype="float32"',
    "shorten": "shorten the prompt to at most {tokens} tokens",
}


def ways_out(model, lengths, selection, *, edited=False, free) -> list[tuple[str, dict]]:
    """The changes, one at a time, that would make a run fit in `free` bytes (the preflight's share of them).

    positions: the logits only at the last position; select: a record of only the last position's logits (the
    least any selection keeps); low: the low-memory mode instead of fast (its converted weights freed); float32
    instead of float64; shorten: the longest prompt (one prompt only) that fits as asked. Each is offered only
    when it changes the estimate and the result fits.
    """
    cfg, dt = model.config, model.dtype
    budget = free * MEMORY_SHARE
    need = estimate_bytes(cfg, lengths, dt, selection, edited=edited)["total"]
    fits = lambda sel, dtype=dt, room=budget, at=lengths: (  # noqa: E731
        estimate_bytes(cfg, at, dtype, sel, edited=edited)["total"] <= room)
    ways = []
    last = model._selection(selection, -1, lengths)
    if estimate_bytes(cfg, lengths, dt, last, edited=edited)["total"] < need and fits(last):
        ways.append(("positions", {}))
    least = Selection(["logits@-1"])
    if estimate_bytes(cfg, lengths, dt, least, edited=edited)["total"] < need and fits(least):
        ways.append(("select", {}))
    held = resident_bytes(cfg, dt, model.memory)  # what the weights hold (or will), in this mode and dtype
    low = resident_bytes(cfg, dt, "low")
    if model.memory == "fast" and fits(selection, room=(free + held - low) * MEMORY_SHARE):
        ways.append(("low", {}))
    if np.dtype(dt) == np.float64:
        freed = held - resident_bytes(cfg, np.float32, model.memory)
        if fits(selection, dtype=np.float32, room=(free + freed) * MEMORY_SHARE):
            ways.append(("float32", {}))
    if len(lengths) == 1 and lengths[0] > 1:
        lo, hi = 0, lengths[0] - 1  # the longest T' <= hi that fits (0: none)
        try:
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if fits(selection, at=[mid]) else (lo, mid - 1)
        except InputError:  # a selection's positions that a shorter prompt does not have
            lo = 0
        if lo >= 1:
            ways.append(("shorten", {"tokens": lo}))
    return ways


def load(model=None, dtype="float32", *, memory="auto", normalizer_dtype=None, defer=False, progress=None) -> Model:
    """Load a Gemma model (Gemma 1, 2 or 3 text) from a local directory, a GGUF file or a hub repo id.

    model:  a directory with config.json, safetensors weights (single or sharded) and tokenizer.json; a .gguf
            file (dequantized with the `gguf` package, refprism/checkpoints/gguf.py); or a hub id such as
            "google/gemma-2b" (only the needed files are downloaded). None: $REFPRISM_MODEL, else google/gemma-2b.
    dtype:  "float32" (default) or "float64" (audit mode): every weight and activation is in this dtype.
    memory: "fast" converts every weight once at load (4 bytes a parameter in float32, 8 in float64);
            "low" keeps the stored weights memory-mapped and converts each layer when it is used (a fifth of
            fast's memory on the gemma-2b shape, each forward pass slower); "auto" (default) is "fast" when it
            fits in the available memory. A GGUF file's weights are dequantized into memory: always "fast".
    normalizer_dtype: round the sqrt(D) embedding scale in this dtype instead of the compute dtype
            (e.g. "bfloat16" reproduces a bf16 run's 45.25 for gemma-2b).
    defer:  read config, tokenizer and the files' headers now (every check that needs no weights), the weights
            at their first use or `model.load_weights()` (refprism's CLI checks every argument in between).
    progress: progress(what, done, total), called as the weights are read (a layer or a tensor at a time).
    """
    dt = compute_dtype(dtype)
    if isinstance(model, (str, os.PathLike)) and os.fspath(model).lower().endswith(".gguf"):
        if memory not in ("auto", "fast", "low"):
            choose_memory(None, dt, memory)  # the same refusal as for a directory
        out = _load_gguf(Path(model), dt, normalizer_dtype, progress)
    else:
        model_dir, name = _resolve(model)
        cfg = read_config(model_dir)
        tokenizer = _read_tokenizer(model_dir, cfg)
        notes: list = []
        stored = read_tensors(model_dir, cfg, notes)
        mode = choose_memory(cfg, dt, memory)
        deferred = Deferred(lambda report: Weights(stored, cfg, dt, mode, progress=report), np.dtype(dt), mode,
                            resident_bytes(cfg, dt, mode), progress)
        out = Model(config=cfg, params=None, tokenizer=tokenizer, name=name,
                    normalizer=embed_normalizer(cfg.d_model, dt, round_to=normalizer_dtype), deferred=deferred,
                    notes=notes)
    if not defer:
        out.load_weights()
    return out


def resident_bytes(cfg: Config, dtype, memory: str) -> int:
    """The memory the weights keep once read: fast, every parameter in the compute dtype; low, one layer's
    converted matrices and the unembedding's chunk buffer (weights.Weights.unembed)."""
    item = np.dtype(dtype).itemsize
    if memory == "fast":
        return n_parameters(cfg) * item
    layer = (n_parameters(cfg) - cfg.vocab_size * cfg.d_model) // cfg.n_layers
    return (layer + min(32768, cfg.vocab_size) * cfg.d_model) * item


def _load_gguf(path: Path, dt, normalizer_dtype, progress) -> Model:
    """A GGUF file: config from its metadata (plus the documented defaults), its tokenizer, and (deferred) the
    dequantized tensors.

    The dequantized float32 tensors are in memory, so the weights are converted once ("fast" mode).
    """
    try:
        from refprism.checkpoints.gguf import open_gguf
    except ImportError:
        raise CheckpointError("reading GGUF files needs the gguf package: pip install 'refprism[gguf]'") from None
    hf, tokenizer, dequantize = open_gguf(path)
    cfg = Config.from_hf({k: v for k, v in hf.items() if k != "gguf_defaults"})
    _check_vocabulary(tokenizer, cfg, str(path))
    deferred = Deferred(lambda report: _weights_of_arrays(cfg, dequantize(report), dt, str(path), report),
                        np.dtype(dt), "fast", n_parameters(cfg) * np.dtype(dt).itemsize, progress)
    return Model(config=cfg, params=None, tokenizer=tokenizer, name=str(path),
                 normalizer=embed_normalizer(cfg.d_model, dt, round_to=normalizer_dtype), deferred=deferred)


def from_arrays(hf_config: dict, tensors: dict, tokenizer=None, *, name="", dtype="float32",
                normalizer_dtype=None) -> Model:
    """A model from an HF config dict and HF-named arrays in memory (GGUF files, tests, other frameworks' weights).

    The arrays are checked like a checkpoint's (names, shapes, finite values) and converted once.
    """
    dt = compute_dtype(dtype)
    cfg = Config.from_hf({k: v for k, v in hf_config.items() if k != "gguf_defaults"})
    tensors, notes = text_decoder_names(dict(tensors))
    params = _weights_of_arrays(cfg, tensors, dt, name)
    _check_vocabulary(tokenizer, cfg, name)
    normalizer = embed_normalizer(cfg.d_model, dt, round_to=normalizer_dtype)
    return Model(config=cfg, params=params, tokenizer=tokenizer, name=name, normalizer=normalizer, notes=notes)


def _weights_of_arrays(cfg: Config, tensors: dict, dt, name: str, progress=None) -> Weights:
    """HF-named arrays checked against the config (names, shapes) and converted once ("fast")."""
    tensors = dict(tensors)
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
    return Weights.from_arrays(tensors, cfg, dt, memory="fast", progress=progress)


def _check_vocabulary(tokenizer, cfg: Config, name: str) -> None:
    if tokenizer is not None and tokenizer.get_vocab_size() > cfg.vocab_size:
        raise CheckpointError(f"{name}: the vocabulary has {tokenizer.get_vocab_size()} tokens but the embedding "
                              f"only {cfg.vocab_size} rows")


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
