"""The Ray backend of the sweeps (`refprism sweep --backend ray`; the optional extra `pip install 'refprism[ray]'`).

    weights  put into Ray's object store once, by the driver: one object per layer (`Weights.block(l)`), the
             embedding and the final norm, in refprism's layout and compute dtype. The actors of a node read them
             zero-copy: NumPy views of the node's shared memory, read-only (the forward pass and the prisms never
             write to weights), rebuilt into a Model by `Weights.from_converted`. Only ObjectRefs travel; the
             weights are never captured in a closure or sent with a task.
    actors   long-lived, each holding the model: one per node with that node's CPUs, or `workers` of them with
             the cluster's CPUs split evenly. NumPy's BLAS threads are set to the actor's CPUs through its
             environment (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS, MKL_NUM_THREADS), read when NumPy loads.
    chunks   go out to the actors as they free up (two in flight per actor, so an actor never waits for the
             driver); the driver commits each chunk as it comes back (sweeps.Folder.commit). A chunk whose actor
             dies goes back to the queue and a new actor replaces the dead one: a chunk's results depend only on
             its prompts, so computing it again is idempotent, and the driver commits every chunk exactly once.
    results  equal to the local backend's, prompt by prompt: bit for bit when an actor has as many BLAS threads
             as the local run (one actor per node: all of its CPUs), else within float32 rounding, since OpenBLAS
             orders a product's sums by its thread count (exactness is unaffected: every split is exact either way)
    cluster  `address` joins a running cluster (`ray start --head`); without it, a local one is started with
             ray.init(num_cpus=...) (`local_mode` is gone from current Ray) and an object store sized for the
             weights (Ray's default, 30% of RAM, is less than gemma-2b's 10 GB in float32; and Ray spills objects
             to disk once its store is 80% full, so the store is weights / 0.8 plus room for results), and shut
             down after. A cluster's stores are checked: too small for the weights is refused.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from refprism.errors import InputError, OutputError, RefprismError

IN_FLIGHT = 2  # chunks queued per actor
MAX_ATTEMPTS = 3  # a chunk whose actor dies this many times stops the sweep (it probably kills its worker)
STORE_HEADROOM = 256 * 2**20  # object store bytes beyond the weights (the results in flight)
SPILL_THRESHOLD = 0.8  # Ray spills objects to disk once its store is fuller than this (object_spilling_threshold)


def _ray():
    try:
        import ray
    except ImportError:
        raise InputError("--backend ray needs Ray: pip install 'refprism[ray]'") from None
    return ray


def weights_bytes(model) -> int:
    from refprism.gemma.weights import n_parameters

    return n_parameters(model.config) * model.dtype.itemsize


def run_chunks(model, todo, levels, commit, *, workers=None, address=None, validate=None, fault=None,
               stats=None) -> None:
    """Compute the chunks `todo` [(k, items)] on Ray actors; commit(k, results) in the driver as each returns.

    stats: a dict filled with what the actors report at the end (pid, node, BLAS threads, memory; see
    SweepWorker.info) and how many chunks were retried.
    """
    if not todo:
        return
    ray = _ray()
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise InputError(f"--workers must be a positive integer, got {workers!r}")
    started = not ray.is_initialized()
    if started and address:
        ray.init(address=address, logging_level=logging.WARNING)
    elif started:  # the weights below the spilling threshold: never written to disk and read back
        ray.init(num_cpus=os.cpu_count(), object_store_memory=store_bytes(model), include_dashboard=False,
                 logging_level=logging.WARNING)
    pool = None
    try:
        _check_stores(ray, model)
        refs = put_weights(ray, model)
        pool = Pool(ray, model, refs, levels, validate, fault, _placements(ray, workers))
        pool.run(todo, commit)
        if stats is not None:
            stats["actors"] = ray.get([slot.actor.info.remote() for slot in pool.slots])
            stats["retried"] = pool.retried
            stats["driver"] = proc_memory()  # its RssShmem: the store pages it wrote the weights into
    finally:
        if pool is not None:
            pool.close()
        if started:
            ray.shutdown()


def store_bytes(model) -> int:
    """Object store size for the weights: they stay below Ray's spilling threshold, plus room for results."""
    return int(weights_bytes(model) / SPILL_THRESHOLD) + STORE_HEADROOM


def _check_stores(ray, model) -> None:
    """Every node's object store must hold the weights (refused otherwise); below store_bytes, Ray spills some
    of them to disk and reads them back when an actor starts (a warning)."""
    need = weights_bytes(model)
    for node in ray.nodes():
        have = node.get("Resources", {}).get("object_store_memory", 0) if node.get("Alive") else None
        if have is None:
            continue
        where = f"node {node.get('NodeManagerAddress', node.get('NodeID'))}"
        if have < need:
            raise InputError(f"{where}'s Ray object store holds {have / 1e9:.1f} GB but the weights need "
                             f"{need / 1e9:.1f} GB: start it with ray start --object-store-memory "
                             f"{store_bytes(model)}")
        if have < store_bytes(model):
            print(f"refprism: warning: {where}'s Ray object store ({have / 1e9:.1f} GB) is fuller than "
                  f"{SPILL_THRESHOLD:.0%} with the weights ({need / 1e9:.1f} GB): Ray will spill some to disk; "
                  f"--object-store-memory {store_bytes(model)} avoids it", file=sys.stderr)


def proc_memory() -> dict:
    """This process's memory from /proc/self/status, in kB: VmHWM (peak RSS), VmRSS, RssAnon (private), RssFile,
    RssShmem (shared memory, e.g. the object store's pages)."""
    status = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                status[key] = int(value.split()[0])
    except OSError:
        pass
    return status


def put_weights(ray, model) -> dict:
    """The converted weights into the object store, once: {"embed", "ln_final", "blocks": [one per layer]}.
    Layer by layer, so the driver holds at most one converted layer (with --memory low) beside the store."""
    p = model.params
    return {"embed": ray.put(p.embedding()), "ln_final": ray.put(p.ln_final),
            "blocks": [ray.put(p.block(l)) for l in range(model.config.n_layers)]}


def _placements(ray, workers) -> list[tuple[int, object]]:
    """(CPUs, scheduling strategy) of each actor: one per alive node with its CPUs, or `workers` spread evenly."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1]
    if not nodes:
        raise InputError("the Ray cluster has no node with a CPU")
    if workers is None:
        return [(int(n["Resources"]["CPU"]), NodeAffinitySchedulingStrategy(n["NodeID"], soft=True)) for n in nodes]
    total = sum(int(n["Resources"]["CPU"]) for n in nodes)
    return [(max(1, total // workers), "SPREAD")] * workers


class SweepWorker:
    """A Ray actor: the model rebuilt around the object store's read-only weights; computes chunks of prompts."""

    def __init__(self, config, dtype, normalizer, name, refs, levels, validate, fault):
        import ray

        from refprism.gemma.weights import Weights
        from refprism.model import Model

        params = Weights.from_converted(config, dtype, embed=ray.get(refs["embed"]), ln_final=ray.get(refs["ln_final"]),
                                        blocks=ray.get(refs["blocks"]))
        self.model = Model(config=config, params=params, tokenizer=None, name=name, normalizer=normalizer)
        self.levels, self.validate, self.fault = levels, validate, fault

    def compute(self, k, items):
        from refprism.sweeps.compute import compute_chunk

        if self.fault is not None and k == self.fault[0] and not Path(self.fault[1]).exists():
            Path(self.fault[1]).write_text(f"actor {os.getpid()} exits at chunk {k}\n")  # once: tests only
            os._exit(1)
        return compute_chunk(self.model, items, self.levels, validate=self.validate)

    def info(self) -> dict:
        """pid, node, BLAS thread settings, whether every weight is a read-only view, and /proc memory (kB):
        VmHWM (peak RSS), VmRSS, RssAnon (private), RssShmem (shared memory: the object store's pages)."""
        import ray

        p = self.model.params
        arrays = [p.embedding(), p.ln_final] + [a for l in range(self.model.config.n_layers)
                                                for a in p.block(l).values()]
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "threads": {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")},
                "weights_read_only": all(not a.flags.writeable for a in arrays),
                "weights_own_data": any(a.flags.owndata for a in arrays), "memory_kb": proc_memory()}


@dataclass
class _Slot:
    """One actor of the pool and how to make it again; generation counts replacements."""

    cpus: int
    strategy: object
    actor: object = None
    generation: int = 0
    busy: int = 0


@dataclass
class Pool:
    ray: object
    model: object
    refs: dict
    levels: object
    validate: object
    fault: object
    placements: list
    slots: list = field(default_factory=list)
    retried: int = 0

    def __post_init__(self):
        self.remote = self.ray.remote(SweepWorker)
        self.slots = [_Slot(cpus, strategy) for cpus, strategy in self.placements]
        for slot in self.slots:
            self._start(slot)

    def _start(self, slot):
        threads = str(slot.cpus)
        env = {"OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        m = self.model
        slot.actor = self.remote.options(num_cpus=slot.cpus, max_restarts=0, max_task_retries=0,
                                         scheduling_strategy=slot.strategy, runtime_env={"env_vars": env}).remote(
            m.config, m.dtype, m.normalizer, m.name, self.refs, self.levels, self.validate, self.fault)
        slot.busy = 0

    def run(self, todo, commit):
        from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

        queue = deque((k, items, 1) for k, items in todo)
        pending = {}  # ObjectRef -> (slot, generation, k, items, attempt)
        committed = set()
        while queue or pending:
            for slot in self.slots:
                while queue and slot.busy < IN_FLIGHT:
                    k, items, attempt = queue.popleft()
                    pending[slot.actor.compute.remote(k, items)] = (slot, slot.generation, k, items, attempt)
                    slot.busy += 1
            [ref], _ = self.ray.wait(list(pending), num_returns=1)
            slot, generation, k, items, attempt = pending.pop(ref)
            try:
                results = self.ray.get(ref)
            except (RayActorError, WorkerCrashedError):
                if attempt >= MAX_ATTEMPTS:
                    raise OutputError(f"chunk {k} (prompts {items[0].id} .. {items[-1].id}) lost its Ray worker "
                                      f"{attempt} times; the chunks done so far are saved: re-run to resume") from None
                self.retried += 1
                queue.appendleft((k, items, attempt + 1))
                if slot.generation == generation:  # the first of its chunks to report the death: replace it
                    self.ray.kill(slot.actor, no_restart=True)
                    slot.generation += 1
                    self._start(slot)
                continue
            except RayTaskError as e:  # an error inside compute_chunk: the same on any worker, so not retried
                cause = getattr(e, "cause", None)
                raise (cause if isinstance(cause, RefprismError) else e) from None
            if slot.generation == generation:
                slot.busy -= 1
            if k not in committed:
                committed.add(k)
                commit(k, results)

    def close(self):
        for slot in self.slots:
            try:
                self.ray.kill(slot.actor, no_restart=True)
            except Exception:  # already gone (a dead actor, a lost cluster): nothing to release
                pass
