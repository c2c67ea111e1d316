"""The async judge farm: providers, limits, cache, retries, cost; judge prompts and scorers.

Public API (import from the submodules; this package imports nothing heavy):
- judge.session: `session(config, layout=..., run=..., budget_usd=...)` → `JudgeSession`, the one way callers
  outside judge/ judge items (`.judge(items, scorer, purpose=...)`, `.stream(...)`, `.uncached(...)`)
- judge.scorers: `EMScorer`, `PersonaScorer`, `PairwiseScorer`, `make_scorer`, `load_anchors`, `drift_report`
- judge.config: `load_config`, `JudgeConfig`, `Endpoint`; judge/default.yaml is the embedded default
- judge.endpoints: `usable_endpoints`, `judge_model_name`, `serve_endpoints` (the embedded vLLM server)
- judge.farm: `Farm`, `judge_stream`, `run_judge`, `Result`, `Summary` (the engine under the session)
- judge.cache: `Cache`, `ChatRequest`, `cache_key`
The cost ledger is core.ledger (every phase books into it).
"""
