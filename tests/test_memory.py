"""Fast and low-memory modes give identical numbers; the safetensors reader checks every declared size first."""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import refprism
from refprism import prisms as P
from refprism.checkpoints.safetensors import read_header
from refprism.errors import CheckpointError, InputError
from refprism.gemma.weights import choose_memory


@pytest.mark.parametrize("dtype, stored", [("float32", "bfloat16"), ("float64", "bfloat16"), ("float32", "float16"),
                                           ("float32", "float32")])
def test_low_memory_equals_fast_bit_for_bit(checkpoint, dtype, stored):
    d = checkpoint(dtype=stored, shards=2)
    fast, low = refprism.load(d, dtype=dtype, memory="fast"), refprism.load(d, dtype=dtype, memory="low")
    assert fast.params.memory == "fast" and low.params.memory == "low"
    a, b = fast.run("The capital city of France is"), low.run("The capital city of France is")
    for name in a.record:
        np.testing.assert_array_equal(a.record[name], b.record[name], err_msg=name)
    ra, rb = (P.logits_readout(m, r, ["▁Paris", "▁Tokyo"]) for m, r in ((fast, a), (low, b)))
    for f in (P.residual_prism, lambda r: P.attention_prism(r, 1), lambda r: P.mlp_prism(r, 0),
              lambda r: P.residual_prism(P.through_head(r, 1, 2, 5))):
        np.testing.assert_array_equal(f(ra).values, f(rb).values)


def test_low_memory_unembeds_in_chunks(tiny_dir):
    low = refprism.load(tiny_dir, memory="low")
    h = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    E = low.params.embedding()
    chunked = low.params.unembed(h, chunk=100)  # 512 rows in 6 chunks, the last short
    assert chunked.shape == (3, 512) and chunked.dtype == np.float32
    # each logit is a float32 dot product of 64 terms (BLAS picks its own order per shape): within 64 eps of the
    # exact one, in units of sum |h_i E_vi|; a chunk placed at the wrong columns is off by order 1
    exact = h.astype(np.float64) @ E.astype(np.float64).T
    bound = 64 * np.finfo(np.float32).eps * (np.abs(h).astype(np.float64) @ np.abs(E).astype(np.float64).T)
    assert np.all(np.abs(chunked - exact) <= bound)


def test_few_row_products_in_slices_are_exact_and_placed():
    """ops.matmul: a short prompt's x W in column slices of W (OpenBLAS's small-matrix kernels) where W's columns
    are contiguous (a transposed view), one product for a row-major W. Each output is still one float32 dot
    product (within K eps of the exact one, in units of sum |x_k W_kv|; a slice written at the wrong columns is off
    by order 1), and a slice's bits do not depend on where a caller's W starts if at a multiple of 4096 (the
    low-memory unembedding's chunks)."""
    from refprism.gemma.ops import matmul, slice_width

    assert [slice_width(7, 2816), slice_width(12, 2816), slice_width(7, 12288)] == [32, 16, 8]
    assert slice_width(64, 2816) is None
    assert (slice_width(1, 640), slice_width(7, 64)) == (1024, 2048)
    rng = np.random.default_rng(0)
    K, V = 64, 70_001  # not a multiple of the width: the last slice is short
    E = rng.standard_normal((V, K)).astype(np.float32)  # stored [V, K]; the product reads E^T
    for T in (1, 3, 7, 30):
        x = rng.standard_normal((T, K)).astype(np.float32)
        assert slice_width(T, K) < V  # the sliced path
        for W in (E.T, np.ascontiguousarray(E.T)):  # a transposed view, and the same values laid out [K, V]
            got = matmul(x, W, np.full((T, V), np.nan, np.float32))
            exact = x.astype(np.float64) @ W.astype(np.float64)
            bound = K * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(W).astype(np.float64))
            assert np.all(np.abs(got - exact) <= bound)
            np.testing.assert_array_equal(matmul(x, W[:, 8192:16384]), got[:, 8192:16384])
        # a row-major W (W_Q, W_O as stored): its column slices would read a few floats of every row, so it is one
        # product, NumPy's own bits
        Wc = np.ascontiguousarray(E.T)
        np.testing.assert_array_equal(matmul(x, Wc), x @ Wc)
        # the sliced path writes through views of `out`, here a column chunk of a wider array: every column written
        wide = np.full((T, V + 100), np.nan, np.float32)
        matmul(x, E.T, out=wide[:, 50:50 + V])
        np.testing.assert_array_equal(wide[:, 50:50 + V], matmul(x, E.T))
        assert np.isnan(wide[:, :50]).all() and np.isnan(wide[:, 50 + V:]).all()
    x = rng.standard_normal((200, K)).astype(np.float32)  # many rows: one product, as NumPy's own
    np.testing.assert_array_equal(matmul(x, E.T), x @ E.T)


def test_fast_mode_keeps_no_file_mapped(tiny_dir):
    model = refprism.load(tiny_dir, memory="fast")
    maps = open("/proc/self/maps").read()
    assert str(tiny_dir) not in maps  # every memory map of the checkpoint was released after conversion
    assert model.params.block(0)["W_Q"].flags.c_contiguous


def test_auto_chooses_by_available_memory(monkeypatch, tiny):
    import refprism.gemma.weights as W

    monkeypatch.setattr(W, "available_memory", lambda: 10**12)
    assert choose_memory(tiny.config, np.float32, "auto") == "fast"
    monkeypatch.setattr(W, "available_memory", lambda: 10**5)
    assert choose_memory(tiny.config, np.float32, "auto") == "low"
    with pytest.raises(InputError, match="memory mode 'medium'"):
        choose_memory(tiny.config, np.float32, "medium")


def test_reader_equals_safetensors_library(checkpoint):
    for stored in ("bfloat16", "float16", "float32"):
        d = checkpoint(dtype=stored, shards=2)
        for path in sorted(d.glob("*.safetensors")):
            ours, theirs = read_header(path), load_file(str(path))
            assert set(ours) == set(theirs)
            for name, t in theirs.items():
                a = ours[name].array()
                assert a.dtype == t.dtype and a.shape == t.shape
                np.testing.assert_array_equal(a.view(np.uint8), t.view(np.uint8))


def _write_raw(path, header: dict, data: bytes, header_len=None):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if header_len is None else header_len) + h + data)
    return path


@pytest.mark.parametrize("header, data, header_len, message", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10**9, "header claims"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, None, "outside the file"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "declares shape"),
    ({"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, None, "dtype I64"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "invalid shape"),
    ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "malformed"),
    ([1, 2], b"", None, "not a JSON object"),
])
def test_reader_refuses_inconsistent_headers(tmp_path, header, data, header_len, message):
    path = _write_raw(tmp_path / "x.safetensors", header, data, header_len)
    with pytest.raises(CheckpointError, match=message):
        read_header(path)


def test_reader_refuses_non_json_and_tiny_files(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 5) + b"{abc}")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_header(p)
    p.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="only 2 bytes"):
        read_header(p)


def test_memory_option_on_the_command_line(tiny_dir, capsys):
    from refprism import cli

    assert cli.main(["run", "--ids", "2,5", "--model", str(tiny_dir), "--memory", "low", "--json"]) == 0
    low = json.loads(capsys.readouterr().out)
    assert cli.main(["run", "--ids", "2,5", "--model", str(tiny_dir), "--memory", "fast", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top"] == low["top"]


@pytest.mark.parametrize("memory", ["fast", "low"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_weights_are_named(tiny_dir, tmp_path, memory, bad):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    t = load_file(str(d / "model.safetensors"))
    t["model.layers.1.mlp.up_proj.weight"][3, 5] = bad
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight contains NaN or inf"):
        model = refprism.load(d, memory=memory)
        model.run([2, 5])  # low-memory mode converts (and checks) layer 1 here


def test_large_finite_weights_are_not_mistaken_for_inf():
    """A sum that overflows float32 is looked at element-wise before anything is called infinite."""
    from refprism.checkpoints.synth import make_config, random_tensor, tensor_shapes
    from refprism.gemma.config import Config
    from refprism.gemma.weights import Weights

    hf = make_config("tiny")
    arrays = {n: random_tensor(n, s) for n, s in tensor_shapes(hf).items()}
    arrays["model.layers.0.mlp.down_proj.weight"][:] = 3e38  # finite, but the sum overflows
    w = Weights.from_arrays(arrays, Config.from_hf(hf), np.float32)
    assert np.isfinite(w.block(0)["W_down"]).all()


def test_low_memory_blocks_are_the_callers_own_unless_scratch(tiny_dir):
    low, fast = refprism.load(tiny_dir, memory="low"), refprism.load(tiny_dir, memory="fast")
    a, b = low.params.block(0), low.params.block(1)  # new arrays each: a is still layer 0
    np.testing.assert_array_equal(a["W_Q"], fast.params.block(0)["W_Q"])
    np.testing.assert_array_equal(b["W_Q"], fast.params.block(1)["W_Q"])
    s0 = low.params.block(0, scratch=True)
    w0 = s0["W_down"].copy()
    s1 = low.params.block(1, scratch=True)
    assert np.shares_memory(s0["W_down"], s1["W_down"])  # one buffer per role, overwritten layer by layer
    np.testing.assert_array_equal(s1["W_down"], fast.params.block(1)["W_down"])
    np.testing.assert_array_equal(w0, fast.params.block(0)["W_down"])


def test_slice_threads_give_the_same_bits_and_survive_fork(monkeypatch):
    """ops.matmul's slices on 1, 2 or 3 threads (ops.threads: REFPRISM_THREADS first): the same BLAS call per slice
    on whichever thread, so the same bits; one row stays on the calling thread. A child forked after the pool
    exists has none of its threads and makes its own (without os.register_at_fork's reset it would wait forever)."""
    import multiprocessing

    from refprism.gemma import ops

    monkeypatch.delenv("REFPRISM_THREADS", raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    assert ops.threads() == 3
    monkeypatch.setenv("REFPRISM_THREADS", "2")
    assert ops.threads() == 2
    rng = np.random.default_rng(1)
    K, V = 96, 50_003
    E = rng.standard_normal((V, K)).astype(np.float32)
    for T in (1, 2, 9):
        x = rng.standard_normal((T, K)).astype(np.float32)
        got = {}
        for n in ("1", "2", "3"):
            monkeypatch.setenv("REFPRISM_THREADS", n)
            got[n] = matmul_nan(ops, x, E.T)
        np.testing.assert_array_equal(got["2"], got["1"])
        np.testing.assert_array_equal(got["3"], got["1"])
        exact = x.astype(np.float64) @ E.T.astype(np.float64)
        bound = K * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(E.T).astype(np.float64))
        assert np.all(np.abs(got["3"] - exact) <= bound)
    # fewer slices than runs (5 slices of 1024 and a short one, on 3 threads: one slice a run); a W this small
    # (2 MB) runs on the calling thread unless the threshold is lowered, so it is for this check
    monkeypatch.setattr(ops, "SLICE_THREAD_BYTES", 0)
    assert ops.slice_width(9, K) == 1024
    x5, W5 = rng.standard_normal((9, K)).astype(np.float32), E[:5 * 1024 + 7].T
    monkeypatch.setenv("REFPRISM_THREADS", "1")
    one = matmul_nan(ops, x5, W5)
    monkeypatch.setenv("REFPRISM_THREADS", "3")
    np.testing.assert_array_equal(matmul_nan(ops, x5, W5), one)
    monkeypatch.setenv("REFPRISM_THREADS", "2")
    np.testing.assert_array_equal(matmul_nan(ops, x, E.T), got["2"])  # the pool the child inherits: one worker
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_threaded_product_in_child, args=(x, E, got["2"]))
    child.start()
    child.join(timeout=60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0


def matmul_nan(ops, x, W):
    return ops.matmul(x, W, np.full((len(x), W.shape[1]), np.nan, np.float32))


def _threaded_product_in_child(x, E, expected):
    import os

    from refprism.gemma import ops

    os._exit(0 if np.array_equal(ops.matmul(x, E.T), expected) else 1)


def test_each_runs_every_item_once_on_the_threads_and_raises_a_tasks_error(monkeypatch):
    """ops.each: every item exactly once, on up to threads() threads (the caller one of them); a task's own
    products stay on its thread (an each or a sliced matmul inside a task runs serially, not on the pool it is
    running on: no wait on itself); a task's exception reaches the caller after the other threads stop, and the
    next call works."""
    import threading

    from refprism.gemma import ops

    monkeypatch.setenv("REFPRISM_THREADS", "2")
    seen, names, lock = [], set(), threading.Lock()
    x = np.ones((9, 96), np.float32)
    W = np.ones((4096 + 5, 96), np.float32).T  # sliced (slice_width(9, 96) = 1024), on the task's thread

    def task(i):
        inner = []
        ops.each(range(3), inner.append)  # nested: serial, in order
        product = ops.matmul(x, W)
        with lock:
            seen.append(i)
            names.add(threading.current_thread().name)
        assert inner == [0, 1, 2] and (product == 96).all()

    ops.each(range(40), task)
    assert sorted(seen) == list(range(40))
    assert threading.current_thread().name in names and len(names) <= 2

    def fails(i):
        if i == 7:
            raise ValueError("task 7")

    with pytest.raises(ValueError, match="task 7"):
        ops.each(range(20), fails)
    seen.clear()
    ops.each(range(5), task)
    assert sorted(seen) == list(range(5))


@pytest.mark.parametrize("T", [1, 48])
def test_experts_side_by_side_give_the_same_bits_on_any_thread_count(checkpoint, monkeypatch, T):
    """Gemma 4's MoE runs its selected experts on ops.each's threads when they have forward.MOE_EACH_ROWS rows
    each on average, else in turn: every recorded site (the experts' slots included) is bit for bit the
    one-thread run's, with 1, 2 and 3 threads, side by side and in turn (the rule forced both ways), at one token
    and at 48; and the rule picks side by side at 48 tokens (2 x 48 slots over the tiny model's 4 experts) and in
    turn at one."""
    from refprism.gemma import forward, ops

    model = refprism.load(checkpoint("tiny-gemma4"), dtype="float32")
    cfg = model.config
    ids = np.random.default_rng(3).integers(3, cfg.vocab_size, T)
    calls = []
    real_each = ops.each
    monkeypatch.setattr(ops, "each", lambda items, fn: (calls.append(len(items)), real_each(items, fn)))
    model.run(ids)
    moe_layers = sum(1 for l in range(cfg.n_layers) if cfg.moe)
    assert len(calls) == (2 * moe_layers if T * cfg.top_k >= forward.MOE_EACH_ROWS * cfg.n_experts else 0)
    assert (len(calls) > 0) == (T == 48)
    runs = {}
    for rule in ("auto", "side by side", "in turn"):
        monkeypatch.setattr(forward, "MOE_EACH_ROWS", {"auto": 8, "side by side": 0, "in turn": 10**9}[rule])
        for n in ("1", "2", "3"):
            monkeypatch.setenv("REFPRISM_THREADS", n)
            runs[rule, n] = model.run(ids).record
    one = runs["auto", "1"]
    assert any(len(np.unique(one[f"blocks.{l}.moe.topk.index"])) > 1 for l in range(cfg.n_layers))
    for key, record in runs.items():
        assert record.keys() == one.keys()
        for name in one:
            np.testing.assert_array_equal(record[name], one[name], err_msg=f"{key} {name}")


def test_small_sliced_products_stay_on_the_calling_thread(monkeypatch):
    """ops.matmul's slices of a W under SLICE_THREAD_BYTES run on the calling thread (the pool is not woken: it
    costs more than it saves there), a larger W's on the pool; the same bits either way."""
    from refprism.gemma import ops

    monkeypatch.setenv("REFPRISM_THREADS", "2")
    submitted = []
    real = ops._submit
    monkeypatch.setattr(ops, "_submit", lambda workers, fn: submitted.append(workers) or real(workers, fn))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 256)).astype(np.float32)
    small = rng.standard_normal((1536, 256)).astype(np.float32).T  # 1.6 MB: W_ple_proj's shape on E2B
    big = rng.standard_normal((16384, 256)).astype(np.float32).T  # 16.8 MB
    assert small.nbytes < ops.SLICE_THREAD_BYTES <= big.nbytes and ops.slice_width(7, 256) < 1536
    one = matmul_nan(ops, x, small)
    assert submitted == []
    wide = matmul_nan(ops, x, big)
    assert submitted == [1]
    # its first 1536 columns alone are a small W (the calling thread): the same slices, so the same bits
    np.testing.assert_array_equal(matmul_nan(ops, x, big[:, :1536]), wide[:, :1536])
    assert submitted == [1]
    monkeypatch.setattr(ops, "SLICE_THREAD_BYTES", 0)
    np.testing.assert_array_equal(matmul_nan(ops, x, small), one)  # on the pool now: the same BLAS calls
    assert submitted == [1, 1]


def test_the_pool_grows_and_is_shared_by_calls_that_want_fewer_workers(monkeypatch):
    """ops._submit keeps one pool for calls that want different worker counts (each's experts on threads() - 1
    helpers, a narrow product's few slices on fewer): it is made again only to grow, never torn down and rebuilt
    at every switch between them; a call never runs more tasks than it asked for."""
    from refprism.gemma import ops

    monkeypatch.setattr(ops, "_POOL", [None, 0])
    ran = []
    for f in ops._submit(2, lambda: ran.append(2)):
        f.result()
    pool = ops._POOL[0]
    for f in ops._submit(1, lambda: ran.append(1)):
        f.result()
    assert ops._POOL[0] is pool and ran == [2, 2, 1]
    for f in ops._submit(3, lambda: ran.append(3)):
        f.result()
    assert ops._POOL[0] is not pool and ops._POOL[1] == 3 and ran.count(3) == 3
    ops._POOL[0].shutdown()
