"""Capability retention through lm-evaluation-harness: the project's multiple-choice set as a custom local
task (task YAML + local JSON dataset written to a temp dir), scored by the model's own log-likelihood of
the answer letter, run through lm-eval's `hf` model with the stage adapter (`peft=`). Any standard harness
task can be added by name (`extra_tasks=["mmlu", "arc_easy"]`) on a machine that reaches the dataset hub.

Results are cached per (model, adapter content, task text, items, lm-eval version), so a rerun loads nothing.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from cai_bootstrap.evals.data import MCItem, load_mc
from cai_bootstrap.evals.store import ResultStore

TASK_NAME = "cai_capability_mc"
LETTERS = ["A", "B", "C", "D"]

# `doc_to_choice` are the bare letters: lm-eval scores " A", " B", ... (target_delimiter " ") after
# "Answer:", i.e. the log-likelihood of the answer letter given the question and the lettered options.
DOC_TO_TEXT = ("{{question}}\nA. {{options[0]}}\nB. {{options[1]}}\nC. {{options[2]}}\nD. {{options[3]}}"
               "\nAnswer:")


def task_config(task: str, data: str) -> dict:
    """The lm-eval task config (written as YAML): a local JSONL test split, multiple choice over letters."""
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": DOC_TO_TEXT,
        "doc_to_choice": LETTERS,
        "doc_to_target": "{{['A', 'B', 'C', 'D'].index(answer)}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


class CapabilityError(RuntimeError):
    """lm-eval could not run the task; the message names the model, adapter and task."""


def write_task(items: list[MCItem], directory: Path, task: str = TASK_NAME) -> Path:
    """The task YAML and its JSONL dataset in `directory`; returns the YAML path."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{task}.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it.model_dump(), ensure_ascii=False) + "\n")
    y = directory / f"{task}.yaml"
    y.write_text(yaml.safe_dump(task_config(task, str(data)), sort_keys=False), encoding="utf-8")
    return y


def _cache_parts(model_fp: str, adapter: str | None, items: list[MCItem], extra_tasks: list[str],
                 limit: int | None) -> dict:
    import lm_eval

    from cai_bootstrap.engine.base import adapter_hash
    from cai_bootstrap.engine.residency import hf_placement

    # fp32 on the CPU and bf16 on the GPU score differently: a result is reused only where it was made
    return {"v": 1, "placement": list(hf_placement()), "model": model_fp,
            "adapter": adapter_hash(adapter) if adapter else None,
            "task": task_config(TASK_NAME, "<data>"), "items": [it.model_dump() for it in items],
            "extra": sorted(extra_tasks),
            "limit": limit, "lm_eval": getattr(lm_eval, "__version__", "0.4.13")}


def run_capability(model_path: str, adapter: str | Path | None = None, *, model_fp: str | None = None,
                   items: list[MCItem] | None = None, extra_tasks: list[str] = (), limit: int | None = None,
                   store: ResultStore | None = None, batch_size: int = 16) -> dict[str, Any]:
    """Accuracy of one (model, adapter) on the MC set (+ extra harness tasks).

    Returns {"tasks": {name: {"acc": float, "acc_stderr": float|None, "n": int}}, "per_item": [{"id",
    "correct", "lls": [4 log-likelihoods]}], "seconds": float, "cached": bool}.
    """
    items = list(items if items is not None else load_mc())
    if limit is not None:
        items = items[:limit]
    adapter = str(adapter) if adapter else None
    key = None
    if store is not None:
        key = ResultStore.key("lm-eval", _cache_parts(model_fp or model_path, adapter, items, list(extra_tasks),
                                                      limit))
        hit = store.get(key)
        if hit is not None:
            return {**hit, "cached": True}
    t0 = time.perf_counter()
    out = _evaluate(model_path, adapter, items, list(extra_tasks), batch_size)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    if store is not None:
        store.put("lm-eval", key, out)
    return {**out, "cached": False}


def _evaluate(model_path: str, adapter: str | None, items: list[MCItem], extra: list[str],
              batch_size: int) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from cai_bootstrap.engine.residency import hf_placement

    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    device, dtype = hf_placement()  # lm-eval's hf backend, the stage adapter through its `peft` argument
    model_args: dict[str, Any] = {"pretrained": model_path, "dtype": dtype, "trust_remote_code": False}
    if adapter:
        model_args["peft"] = adapter
    with tempfile.TemporaryDirectory(prefix="cai-lmeval-") as tmp:
        write_task(items, Path(tmp))
        try:
            res = simple_evaluate(model="hf", model_args=model_args, tasks=[TASK_NAME, *extra],
                                  task_manager=TaskManager(include_path=tmp), batch_size=batch_size, device=device,
                                  log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                                  torch_random_seed=0, fewshot_random_seed=0)
        except Exception as e:  # lm-eval raises many kinds; say which run failed
            raise CapabilityError(f"lm-eval failed for model {model_path} adapter {adapter} tasks "
                                  f"{[TASK_NAME, *extra]}: {type(e).__name__}: {e}") from e
    if res is None:
        raise CapabilityError("lm-eval returned no results (non-zero rank?)")
    tasks = {}
    for name, r in res["results"].items():
        acc = r.get("acc,none")
        if acc is None:
            continue
        se = r.get("acc_stderr,none")
        n = res.get("n-samples", {}).get(name, {}).get("effective")
        tasks[name] = {"acc": float(acc), "acc_stderr": float(se) if isinstance(se, int | float) else None, "n": n}
    per_item = []
    by_idx = {s["doc_id"]: s for s in res["samples"][TASK_NAME]}
    for i, it in enumerate(items):
        s = by_idx.get(i)
        if s is None:
            continue
        lls = [float(r[0]) for r in s["filtered_resps"]]
        per_item.append({"id": it.id, "category": it.category, "correct": float(s["acc"]), "lls": lls})
    return {"tasks": tasks, "per_item": per_item}
