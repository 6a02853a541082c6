"""The Ray backend of the sweeps (refprism/sweeps_ray.py): a local Ray (ray.init(num_cpus=2)) and a simulated
two-node cluster (ray.cluster_utils.Cluster). Its output equals the local backend's prompt by prompt; a worker
that dies mid-sweep has its chunk retried, and every prompt is written exactly once. Loopback only; every Ray
started here is shut down, also when a test fails."""

import json
import logging
from pathlib import Path

import pytest
import ray  # the ray extra: a missing Ray fails here, not as a skipped test
from ray.cluster_utils import Cluster

from refprism import sweeps as S

from test_sweeps import LEVELS, capital_rows, folder_files, write_jsonl

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


def assert_same_output(out, local):
    """Prompt by prompt (Ray writes chunks as they return, so the line order may differ) and file by file."""
    def by_id(folder):
        lines = (Path(folder) / "prompts.jsonl").read_text("utf-8").splitlines()
        ids = [json.loads(l)["id"] for l in lines]
        assert len(ids) == len(set(ids)), "a prompt was written twice"
        return dict(zip(ids, lines))

    ours, theirs = by_id(out), by_id(local)
    assert sorted(ours) == sorted(theirs)
    for ident in theirs:
        assert ours[ident] == theirs[ident], ident  # the same numbers, bit for bit
    a, b = folder_files(out), folder_files(local)
    assert sorted(a) == sorted(b)
    for name in b:
        if name != "prompts.jsonl":  # the side files are named by chunk; the summary reads in data-set order
            assert a[name] == b[name], name


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

