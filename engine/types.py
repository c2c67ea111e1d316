"""The engine interface's records: requests, sampling, completions, usage."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from cai_bootstrap.core.errors import BadInput

Messages = list[dict[str, str]]


class Request(BaseModel):
    """A chat conversation (instruct models) or a raw prompt (base models, few-shot)."""

    messages: Messages | None = None
    prompt: str | None = None
    # chat only: text the assistant's turn starts with (prefill), e.g. "Score:" so a number comes next
    prefix: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> Request:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a Request needs exactly one of `messages` or `prompt`")
        return self

    @classmethod
    def chat(cls, *turns: str, system: str | None = None) -> Request:
        roles = ["user", "assistant"]
        msgs = [{"role": "system", "content": system}] if system else []
        msgs += [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
        return cls(messages=msgs)


class Sampling(BaseModel):
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 128
    n: int = 1
    seed: int | None = 0
    stop: list[str] = Field(default_factory=list)
    logprobs: int | None = None  # top-k logprobs per generated token


class Completion(BaseModel):
    request_index: int
    sample_index: int = 0
    text: str
    finish_reason: str | None = None  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = Field(default_factory=list)
    # one {token_text: logprob} dict of the top-k alternatives per generated token
    logprobs: list[dict[str, float]] | None = None


class CallUsage(BaseModel):
    """What one engine call cost: the cost ledger multiplies seconds by the profile's $/hour."""

    engine: str
    requests: int
    tokens_in: int
    tokens_out: int
    seconds: float
    adapter: str | None = None


class EngineError(BadInput, RuntimeError):
    """Bad input to an engine (unknown adapter, over-long request), named clearly."""
