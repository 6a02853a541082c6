"""The Ray backend of the sweeps (refprism/sweeps/ray.py): a local Ray (ray.init(num_cpus=2)) and a simulated
two-node cluster (ray.cluster_utils.Cluster). Its output equals the local backend's prompt by prompt; a worker
that dies mid-sweep has its chunk retried, and every prompt is written exactly once. Loopback only; every Ray
started here is shut down, also when a test fails."""

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray  # the ray extra: a missing Ray fails here, not as a skipped test
from ray.cluster_utils import Cluster
from test_sweeps import LEVELS, capital_rows, folder_files, write_jsonl

from refprism import sweeps as S

STORE = 100 * 2**20  # object store bytes per node: the tiny weights are ~0.3 MB (Ray's minimum is 75 MiB)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "capitals.jsonl", capital_rows())


@pytest.fixture(scope="module")
def local(data, tiny, tmp_path_factory):
    """The local backend's output folder: what every Ray sweep must reproduce."""
    out = tmp_path_factory.mktemp("local") / "out"
    S.sweep(data, tiny, out, levels=LEVELS, chunk=3, quiet=True, bootstrap=100)
    return out


def assert_close_json(a, b, where):
    """The same JSON tree: equal keys, strings, integers and booleans; floats within float32 rounding (1e-6 +
    1e-5 |b|). OpenBLAS may order a product's sums differently with another thread count (an actor has its
    CPUs' threads, this process all of them), so equality is exact only when the thread counts match."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and sorted(a) == sorted(b), where
        for k in b:
            assert_close_json(a[k], b[k], f"{where}.{k}")
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_json(x, y, f"{where}[{i}]")
    elif isinstance(b, float):
        assert isinstance(a, float) and abs(a - b) <= 1e-6 + 1e-5 * abs(b), f"{where}: {a!r} vs {b!r}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def assert_same_output(out, local):
    """Prompt by prompt (Ray writes chunks as they return, so the line order may differ), every prompt exactly
    once; the summary, the neuron side files and the Parquet parts alike."""
    def by_id(folder):
        lines = [json.loads(l) for l in (Path(folder) / "prompts.jsonl").read_text("utf-8").splitlines()]
        ids = [l["id"] for l in lines]
        assert len(ids) == len(set(ids)), "a prompt was written twice"
        return dict(zip(ids, lines))

    ours, theirs = by_id(out), by_id(local)
    assert sorted(ours) == sorted(theirs) and len(theirs) == 14
    for ident in theirs:
        assert_close_json(ours[ident], theirs[ident], ident)
    assert_close_json(*(json.loads((Path(f) / "summary.json").read_text()) for f in (out, local)), "summary")
    assert sorted(folder_files(out)) == sorted(folder_files(local))
    for part in sorted((Path(local) / "neurons").glob("*.npz")):
        with np.load(part) as want, np.load(Path(out) / "neurons" / part.name) as got:
            assert np.array_equal(got["index"], want["index"])
            np.testing.assert_allclose(got["terms"], want["terms"], rtol=1e-5, atol=1e-6)
    for name in ("prompts.parquet", "neurons.parquet"):
        a, b = (pq.read_table(Path(f) / name).to_pandas().sort_values(["id", "label", "column"]) for f in (out, local))
        assert list(a["label"]) == list(b["label"])
        np.testing.assert_allclose(a["value"], b["value"], rtol=1e-5, atol=1e-6)


class TestLocalRay:
    @pytest.fixture(scope="class", autouse=True)
    def ray_local(self):
        ray.init(num_cpus=2, object_store_memory=STORE, include_dashboard=False, logging_level=logging.WARNING)
        try:
            yield
        finally:
            ray.shutdown()

    def test_ray_equals_local_and_shares_read_only_weights(self, data, tiny, local, tmp_path):
        stats = {}
        S.sweep(data, tiny, tmp_path / "out", levels=LEVELS, chunk=3, backend="ray", workers=2, quiet=True,
                bootstrap=100, stats=stats)
        assert_same_output(tmp_path / "out", local)
        actors = stats["actors"]
        assert len(actors) == 2 and len({a["pid"] for a in actors}) == 2 and stats["retried"] == 0
        for a in actors:  # zero-copy views of the object store (read-only, owning nothing); BLAS on 1 CPU each
            assert a["weights_read_only"] and not a["weights_own_data"]
            assert a["threads"] == {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}

    def test_a_worker_that_dies_has_its_chunk_retried(self, data, tiny, local, tmp_path):
        marker = tmp_path / "died"
        stats = {}
        S.sweep(data, tiny, tmp_path / "out", levels=LEVELS, chunk=3, backend="ray", workers=2, quiet=True,
                bootstrap=100, stats=stats, _fault=(1, str(marker)))  # the actor computing chunk 1 exits, once
        assert marker.read_text().startswith("actor ") and stats["retried"] >= 1
        assert len(stats["actors"]) == 2 and str(marker.read_text().split()[1]) not in {
            str(a["pid"]) for a in stats["actors"]}  # the dead actor was replaced
        assert_same_output(tmp_path / "out", local)


def test_two_node_cluster_with_a_dying_worker(data, tiny, local, tmp_path):
    """`--address` joins a running cluster: one actor per node (each with its node's CPU), the weights pulled
    to the second node's store; an actor dies on its first chunk and the sweep still completes, equal to local."""
    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": STORE,
                                                            "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=STORE)
        cluster.wait_for_nodes()
        stats = {}
        S.sweep(data, tiny, tmp_path / "out", levels=LEVELS, chunk=3, backend="ray", address=cluster.address,
                quiet=True, bootstrap=100, stats=stats, _fault=(0, str(tmp_path / "died")))
        assert (tmp_path / "died").exists() and stats["retried"] >= 1
        nodes = {a["node"] for a in stats["actors"]}
        assert len(stats["actors"]) == 2 and len(nodes) == 2
        assert all(a["weights_read_only"] for a in stats["actors"])
        assert not ray.is_initialized()  # the sweep disconnected from the cluster it joined
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert_same_output(tmp_path / "out", local)



def test_object_stores_are_checked_for_the_weights(tiny, capsys):
    """Ray spills objects to disk beyond 80% of a store: a store that cannot hold the weights is refused, one that
    would spill them gets a warning with the size to use (no Ray needed: the nodes as ray.nodes() lists them)."""
    from refprism.errors import InputError
    from refprism.sweeps import ray as R

    need = R.weights_bytes(tiny)
    assert R.store_bytes(tiny) == int(need / 0.8) + R.STORE_HEADROOM

    def cluster(*stores):
        return type("FakeRay", (), {"nodes": staticmethod(lambda: [
            {"Alive": True, "NodeManagerAddress": f"10.0.0.{i}", "Resources": {"object_store_memory": b}}
            for i, b in enumerate(stores)])})

    R._check_stores(cluster(R.store_bytes(tiny), 10 * R.store_bytes(tiny)), tiny)
    assert capsys.readouterr().err == ""
    R._check_stores(cluster(R.store_bytes(tiny), need), tiny)
    err = capsys.readouterr().err
    assert "10.0.0.1" in err and f"--object-store-memory {R.store_bytes(tiny)}" in err
    with pytest.raises(InputError, match="node 10.0.0.0's Ray object store holds"):
        R._check_stores(cluster(need - 1), tiny)
