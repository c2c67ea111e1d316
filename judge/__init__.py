"""The async judge farm: providers, limits, cache, retries, cost ledger; judge prompts and scorers.

Public API (import from the submodules; this package imports nothing heavy):
- judge.farm: `judge_items`, `run_judge`, `judge_stream`, `Result`, `Summary`
- judge.scorers: `EMScorer`, `PersonaScorer`, `PairwiseScorer`, `load_anchors`, `drift_report`
- judge.config: `load_config`, `JudgeConfig`, `Endpoint`; judge/default.yaml is the embedded default
- judge.cache: `Cache`, `ChatRequest`, `cache_key`; judge.ledger: `Ledger` (the project's cost ledger)
- judge.local_server: `LocalVLLMServer`
"""
