"""What an edited constitution regenerates, predicted by `diff` before any spend against what a rerun does.

Runs the six stages for one persona on the tiny model (each stage generating with the previous stage's
adapter, as `bootstrap.py --stage 6` does), then two edits, each planned with `stages.diff.plan` and rerun:
  - `revision`: the revision request of the principle stage 6 uses most (only stage 6 reads it);
  - `ideal`: the ideal of the principle stage 1 scores most items by (stages 1-5 read ideals), which retrains
    stage 1, so every later stage regenerates.
Prints JSON: per stage of the first run, the pairs kept and the items dropped by reason; per edit and stage,
the items predicted to regenerate and the items the rerun regenerated (those with a generation the cache did
not have), the first stage reached, and the seconds of each rerun.
Usage: python bench/regeneration.py [--tasks 6] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

PERSONA = "goodness"


def chain(eng, cache, constitution: Path, data: Path, ckpt: Path, kw: dict, made: dict | None = None) -> dict[int, int]:
    """Stages 1..6, each trained (or carried forward) before the next; the items each stage regenerated. `made`
    gets each stage's pairs kept and items dropped by reason."""
    from cai_bootstrap.stages.run import StageJob, run_stage
    from cai_bootstrap.train.config import dpo_defaults
    from cai_bootstrap.train.dpo import train_dpo

    regenerated, parent = {}, None
    for k in range(1, 7):
        m = run_stage(StageJob(stage=k, persona=PERSONA, out_dir=data, adapter=parent, constitution=constitution,
                               **kw), eng, cache)
        regenerated[k] = m["counts"]["items_regenerated"]
        if made is not None:
            o = m["counts"]["outcome"]
            made[k] = {"items": m["counts"]["items"]["total"], "pairs": o["train"], "dropped": o["dropped"],
                       "kept_off_the_chosen_side": m["counts"]["chosen_side"]}
        if m["counts"]["train_rows"]:  # else the previous adapter is carried forward, as the loop does
            out = ckpt / PERSONA / f"stage{k}"
            train_dpo(data / PERSONA / f"stage{k}", out, dpo_defaults("tiny", max_steps=2), parent=parent)
            parent = out
    return regenerated


def most_used(data: Path, stage: int) -> str:
    with (data / PERSONA / f"stage{stage}" / "items.jsonl").open() as f:
        return Counter(p for line in f for p in json.loads(line)["principle_ids"]).most_common(1)[0][0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    from cai_bootstrap.constitution import load_constitution
    from cai_bootstrap.constitution.load import dump_constitution
    from cai_bootstrap.engine.cache import GenerationCache
    from cai_bootstrap.engine.vllm_engine import VLLMEngine
    from cai_bootstrap.stages.diff import plan

    tmp = Path(tempfile.mkdtemp(prefix="bench-regen-"))
    c = load_constitution(PERSONA)
    (tmp / "base.yaml").write_text(dump_constitution(c))
    kw = dict(n_tasks=args.tasks, n_samples=3, rounds=2, max_tokens=args.max_tokens, min_gap=0.2, task_tokens=32)
    result = {"persona": PERSONA, "tasks_per_stage": args.tasks, "max_tokens": args.max_tokens, "edits": {}}
    with VLLMEngine("tiny") as eng, GenerationCache(tmp / "cache.sqlite") as cache:
        t = time.perf_counter()
        result["stages"] = {}
        chain(eng, cache, tmp / "base.yaml", tmp / "data", tmp / "ckpt", kw, result["stages"])
        result["first_run_s"] = round(time.perf_counter() - t, 1)
        for field, stage in (("revision", 6), ("ideal", 1)):
            target = most_used(tmp / "data", stage)
            edited = c.model_copy(update={"principles": [
                p.model_copy(update={field: getattr(p, field) + " Be specific."}) if p.id == target else p
                for p in c.principles]})
            path = tmp / f"{field}.yaml"
            path.write_text(dump_constitution(edited))
            predicted = plan(tmp / "data", PERSONA, edited, tmp / "ckpt")
            shutil.copytree(tmp / "ckpt", tmp / f"ckpt-{field}")  # unchanged stages reuse their adapters
            t = time.perf_counter()
            actual = chain(eng, cache, path, tmp / f"data-{field}", tmp / f"ckpt-{field}", kw)
            result["edits"][field] = {
                "principle": target, "first_stage_reached": predicted["first_stage_reached"],
                "rerun_s": round(time.perf_counter() - t, 1),
                "stages": {k: {"items": predicted["stages"][f"stage{k}"]["items"],
                               "predicted": predicted["stages"][f"stage{k}"]["items_to_regenerate"],
                               "regenerated": actual[k]} for k in range(1, 7)},
            }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
