"""Generation spread over Ray workers with Ray Data: each worker holds one of the project's vLLM engines (a data
parallel replica, itself tensor parallel over the profile's GPUs); a call's prompts are split into one batch per
replica, `map_batches` runs the batches through the workers, and the completions come back in request order.

`--ray local` starts a Ray of its own on this machine; `--ray ADDRESS` joins a running cluster (`ray start --head`),
where every node must see the model and the adapters at the same paths (shared storage). Each call reserves a
placement group of one bundle per replica (a GPU profile's tensor-parallel GPUs and a core; a CPU profile's share
of the cores) and frees it when done. vLLM inside a worker runs its multiprocessing executor: its Ray executor
does not run on CPU, and inside a placed worker it would ask for GPUs the worker already holds. Workers live for
one call, so each call pays the replicas' start-up (20-30 s on 2 CPU cores, about a minute and a half for a 7B
on a GPU): the path pays off for large calls (a stage's answers, an arm's EM answers), not for many small ones.
"""

from __future__ import annotations

import math
import os

from cai_bootstrap.engine.base import Engine
from cai_bootstrap.engine.models import Profile
from cai_bootstrap.engine.types import Completion, EngineError, Sampling

LOCAL = "local"


class EngineWorker:
    """One Ray Data worker: a vLLM engine started when the worker starts, generating each batch it is given."""

    def __init__(self, profile: dict, max_lora_rank: int | None) -> None:
        import atexit

        from cai_bootstrap.engine.vllm_engine import VLLMEngine

        self.engine = VLLMEngine(Profile(**profile), max_lora_rank=max_lora_rank, distributed_executor_backend="mp")
        # Ray Data ends its workers gracefully when the call is done, which runs atexit: the engine's own process
        # goes with the worker instead of living on as an orphan
        atexit.register(self.engine.close)

    def __call__(self, batch: dict, sampling: dict, adapter: str | None) -> dict:
        ids = [[int(t) for t in p] for p in batch["prompt_ids"]]
        out = self.engine.generate_ids(ids, Sampling(**sampling), adapter)
        index = [int(i) for i in batch["index"]]  # the batch's rows are requests of the whole call
        return {"completion": [c.model_copy(update={"request_index": index[c.request_index]}).model_dump_json()
                               for c in out]}


class _Session:
    """The process's connection to Ray, shared by its engines (a run's policy and OCT teacher); a local Ray
    started here stops when the last engine using it closes."""

    users = 0
    started_here = False

    @classmethod
    def join(cls, address: str) -> None:
        import ray

        if not ray.is_initialized():
            local = address == LOCAL
            # "local" always starts a Ray of its own, even beside a running cluster; one logical core beyond the
            # machine's lets Ray Data's own small tasks run beside engines that hold every core
            ray.init(address="local" if local else address, include_dashboard=False, log_to_driver=False,
                     **({"num_cpus": (os.cpu_count() or 1) + 1} if local else {}))
            from ray.data import DataContext

            ctx = DataContext.get_current()
            ctx.enable_progress_bars = False  # the run's own progress display speaks for the call
            ctx.print_on_execution_start = False
            cls.started_here = local
        cls.users += 1

    @classmethod
    def leave(cls) -> None:
        import ray

        cls.users = max(0, cls.users - 1)
        if cls.users == 0 and cls.started_here and ray.is_initialized():
            ray.shutdown()
            cls.started_here = False


class RayEngine(Engine):
    # the generation cache keys on this name: Ray's workers run the same vLLM engine, so a run that moves between
    # `--ray` and the plain engine reuses what either made (tests/test_ray_engine.py: same texts)
    name = "vllm"

    def __init__(self, profile: Profile | str = "tiny", address: str = LOCAL, max_lora_rank: int | None = None,
                 replicas: int | None = None) -> None:
        super().__init__(profile)
        self.address = address
        self.replicas = replicas or self.profile.data_parallel_size
        self.max_lora_rank = max_lora_rank or self.profile.max_lora_rank
        self._joined = False

    def _bundle(self) -> dict[str, float]:
        """What one replica holds: a GPU profile's tensor-parallel GPUs and a core; a CPU profile's share of the
        cluster's cores (sized from the cluster, not from the machine that drives it)."""
        import ray

        if self.profile.gpus > 0:
            return {"GPU": self.profile.tensor_parallel_size, "CPU": 1}
        return {"CPU": max(1, int(ray.cluster_resources().get("CPU", 1) - 1) // self.replicas)}

    def _generate(self, prompt_ids: list[list[int]], sampling: Sampling, adapter: str | None) -> list[Completion]:
        if not self._joined:
            _Session.join(self.address)
            self._joined = True
        import ray.data
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = self._bundle()
        group = placement_group([bundle] * self.replicas, strategy="PACK")
        try:
            if not group.wait(timeout_seconds=120):
                raise EngineError(f"Ray could not place {self.replicas} engine replica(s) of {bundle} within 120 s "
                                  f"(cluster: {ray.cluster_resources()})")
            rows = [{"index": i, "prompt_ids": ids} for i, ids in enumerate(prompt_ids)]
            # the scheduling strategy per call: this call's group (Ray 2.60 still honours the remote argument)
            out = ray.data.from_items(rows).map_batches(
                EngineWorker, batch_format="numpy", batch_size=math.ceil(len(rows) / self.replicas),
                concurrency=self.replicas, num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                fn_constructor_kwargs={"profile": self.profile.model_dump(), "max_lora_rank": self.max_lora_rank},
                fn_kwargs={"sampling": sampling.model_dump(), "adapter": adapter},
                scheduling_strategy=PlacementGroupSchedulingStrategy(group))
            done = [Completion.model_validate_json(r["completion"]) for r in out.take_all()]
        finally:
            remove_placement_group(group)
        return sorted(done, key=lambda c: (c.request_index, c.sample_index))

    def close(self) -> None:
        """Workers end with each call; a local Ray started for this process ends with its last engine."""
        if self._joined:
            _Session.leave()
            self._joined = False
        super().close()
