"""Judge farm configuration: a pool of endpoints (OpenAI-compatible chat or Anthropic Messages) plus the
retry/deadline policy (YAML)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cai_bootstrap.core.errors import BadInput, field_errors

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")


class ConfigError(BadInput):
    """A judge config that cannot be used; the message names the file and field."""


class Endpoint(BaseModel):
    """One provider endpoint. `api_key_env` names an environment variable; the key itself never lives here."""

    model_config = ConfigDict(extra="forbid")

    name: str
    # which API it speaks (judge.providers): OpenAI-compatible chat completions (OpenAI, vLLM, most gateways)
    # or the Anthropic Messages API
    provider: Literal["openai", "anthropic"] = "openai"
    base_url: str  # e.g. https://api.openai.com/v1 or https://api.anthropic.com/v1 (the provider adds its path)
    model: str | None = None  # the provider's id for the judge model (default: the pool's `model`)
    api_key_env: str | None = None  # None: no Authorization header (local servers)
    rpm: float = Field(60.0, gt=0)  # requests per minute
    tpm: float | None = Field(
        None, gt=0
    )  # tokens per minute (prompt estimate + max_tokens), None = unlimited
    max_concurrent: int = Field(8, ge=1)
    usd_per_m_in: float = Field(0.0, ge=0)
    usd_per_m_out: float = Field(0.0, ge=0)
    # whether it returns top_logprobs (the logprobs and exact paths need them); default: true for openai,
    # false for anthropic (the Messages API has none)
    logprobs: bool | None = None
    local: bool = False  # the embedded vLLM server (started by the farm when `model_dir` is set)
    batch_price: float = Field(0.5, gt=0, le=1)  # `--batch`: the batch API's price as a fraction of the above

    @model_validator(mode="after")
    def _provider_logprobs(self) -> Endpoint:
        if self.logprobs is None:
            self.logprobs = self.provider == "openai"
        elif self.logprobs and self.provider == "anthropic":
            raise ValueError("logprobs: the Anthropic Messages API returns no logprobs; set `logprobs: false` "
                             "(its numbers are read by sampling)")
        return self

    def api_key(self) -> str | None:
        """Read at call time, never stored on the object (so it never reaches a repr, cache or log)."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def has_key(self) -> bool:
        return self.api_key_env is None or bool(os.environ.get(self.api_key_env))


class RetryPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # transient errors (429, 5xx, timeouts, bodies that do not parse) are retried with backoff until the item's
    # deadline; max_attempts only bounds a request that keeps failing fast
    max_attempts: int = Field(40, ge=1)  # per request, all causes
    deadline_s: float = Field(300.0, gt=0)  # per item wall time, waits included
    request_timeout_s: float = Field(60.0, gt=0)  # one attempt, body included (slow bodies are cut off)
    connect_timeout_s: float = Field(10.0, gt=0)
    backoff_base_s: float = Field(0.5, gt=0)
    backoff_cap_s: float = Field(30.0, gt=0)
    # an endpoint whose connections keep failing (refused, unreachable) this long, with no success between and
    # at least `down_after` failures, is dropped from the pool; 401/403/404 drop it at once
    down_after_s: float = Field(5.0, ge=0)
    down_after: int = Field(3, ge=1)
    slowdown_factor: float = Field(0.5, gt=0, le=1)  # rate multiplier right after a 429
    recover_s: float = Field(30.0, gt=0)  # time to climb back to the configured rate after a 429


class JudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str  # the canonical judge model name (part of every cache key)
    endpoints: list[Endpoint]
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    concurrency: int | None = Field(None, ge=1)  # workers; default: sum of endpoints' max_concurrent
    # the HTTP transport under httpx.AsyncClient: aiohttp's (httpx-aiohttp) took 26-41% less CPU per request
    # than httpx's own httpcore pool at 500 req/s (bench/judge.py `cpu` measures both side by side)
    transport: Literal["aiohttp", "httpx"] = "aiohttp"
    # the judge cache; None: the layout's (data/judge/cache.sqlite). Costs go to the ledger of the run that
    # judges (data/runs/<run>/ledger.sqlite), so that one budget covers every phase of a run.
    cache_path: str | None = None
    # the embedded default: a local vLLM server for `local: true` endpoints when no keyed endpoint is usable
    local_model: str | None = None  # model profile name or directory served by judge.local_server
    # how the judge's 0-100 numbers are read (core.reading). auto: from the judge's tokenizer where it is
    # known (local_model, or `tokenizer`), else logprobs, switching to sampled on a 400 that names logprobs,
    # max_tokens or temperature (reasoning models)
    scoring: Literal["auto", "logprobs", "exact", "sampled"] = "auto"
    tokenizer: str | None = None  # a HF tokenizer (dir or hub id) of a remote judge, e.g. your own vLLM server
    samples: int = Field(3, ge=1)  # sampled path: replies per metric, averaged
    # exact path: prefixes less likely than this are not read (their mass is reported as pruned_mass); each
    # read is one request, and a judge unsure of its number has many likely prefixes
    exact_prune: float = Field(1e-3, gt=0, lt=1)
    max_completion_tokens: int = Field(1024, ge=16)  # sampled path: output cap, hidden reasoning included
    # exact path: the text the judge's answer is made to start with (the server continues it), e.g. "Score: ".
    # A small judge that would open with words then answers with a number; CODE/REFUSAL become rarer. Part of
    # every request (so of every cache key), recorded per row as `judge_prefix`.
    answer_prefix: str | None = None
    # `--batch`: send through the first usable endpoint's batch API (OpenAI Batch, Anthropic Message Batches) at
    # its `batch_price`, polling every `batch_poll_s`; results within the provider's 24 h window
    batch: bool = False
    batch_poll_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> JudgeConfig:
        if not self.endpoints:
            raise ValueError("endpoints: at least one endpoint is needed")
        names = [e.name for e in self.endpoints]
        if len(set(names)) != len(names):
            raise ValueError(f"endpoints: names must be unique, got {names}")
        return self

    @property
    def workers(self) -> int:
        return self.concurrency or sum(e.max_concurrent for e in self.endpoints)

    def usable(self) -> list[Endpoint]:
        """Endpoints whose key is present; local ones only when no keyed endpoint is usable."""
        remote = [e for e in self.endpoints if not e.local and e.has_key()]
        return remote or [e for e in self.endpoints if e.local]


def load_config(path: str | Path | None = None) -> JudgeConfig:
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"judge config {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"judge config {path} is not valid YAML: {e}") from None
    try:
        return JudgeConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"judge config {path}: {field_errors(e)}") from None
