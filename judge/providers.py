"""The judge APIs the farm speaks: how a provider-independent ChatRequest becomes that API's HTTP request, and
its reply the one shape the scorers read (an OpenAI chat completion: `choices[0].message.content`, optional
`logprobs`, `usage.prompt_tokens/completion_tokens`).

Written here rather than with the providers' SDKs: the farm owns retries, rate limits, budget and billing in
one loop over one HTTP client, and the SDKs each bring their own retry and connection layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from cai_bootstrap.judge.cache import ChatRequest

ANTHROPIC_VERSION = "2023-06-01"


@dataclass
class Usage:
    tokens_in: int
    tokens_out: int


class OpenAIChat:
    """OpenAI chat completions, and every server that speaks it (vLLM, most gateways)."""

    name: ClassVar[str] = "openai"
    path: ClassVar[str] = "/chat/completions"
    batch_path: ClassVar[str] = "/v1/chat/completions"  # the `url` of each line of an OpenAI batch file

    def headers(self, key: str | None) -> dict[str, str]:
        return {"authorization": f"Bearer {key}"} if key else {}

    def body(self, req: ChatRequest, model: str) -> dict[str, Any]:
        return req.body(model)

    def reply(self, data: Any) -> tuple[dict, Usage | None]:
        """(the reply, what the provider says it billed, or None when the body has no usage). Raises
        KeyError/TypeError/IndexError/AttributeError on a body that is not a chat completion."""
        data["choices"][0]["message"]
        usage = data.get("usage")
        if not usage:
            return data, None
        return data, Usage(int(usage["prompt_tokens"]), int(usage.get("completion_tokens") or 0))


class AnthropicMessages:
    """The Anthropic Messages API: no logprobs (its numbers are read by sampling), the system prompt apart from
    the turns, `max_tokens` required, a final assistant turn continued (prefill)."""

    name: ClassVar[str] = "anthropic"
    path: ClassVar[str] = "/messages"

    def headers(self, key: str | None) -> dict[str, str]:
        h = {"anthropic-version": ANTHROPIC_VERSION}
        return h | {"x-api-key": key} if key else h

    def body(self, req: ChatRequest, model: str) -> dict[str, Any]:
        system = "\n\n".join(m["content"] for m in req.messages if m["role"] == "system")
        turns = [m for m in req.messages if m["role"] != "system"]
        if req.prefill is not None:
            turns = [*turns, {"role": "assistant", "content": req.prefill}]
        body: dict[str, Any] = {"model": model, "max_tokens": req.max_out or 1024, "messages": turns}
        if system:
            body["system"] = system
        # temperature only: recent Claude models reject temperature and top_p together; no seed in this API
        if req.temperature is not None:
            body["temperature"] = min(1.0, req.temperature)
        return body

    def reply(self, data: Any) -> tuple[dict, Usage | None]:
        text = "".join(b["text"] for b in data["content"] if b.get("type") == "text")
        finish = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}.get(data.get("stop_reason"),
                                                                                        data.get("stop_reason"))
        usage = data.get("usage")
        got = None
        if usage:
            # cache reads and writes are input tokens too (billed at their own rates; the farm uses none)
            tin = sum(int(usage.get(k) or 0) for k in ("input_tokens", "cache_creation_input_tokens",
                                                         "cache_read_input_tokens"))
            got = Usage(tin, int(usage.get("output_tokens") or 0))
        body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish, "logprobs": None}],
                "usage": {"prompt_tokens": got.tokens_in, "completion_tokens": got.tokens_out} if got else None,
                "model": data.get("model"), "provider": self.name}
        return body, got


PROVIDERS: dict[str, OpenAIChat | AnthropicMessages] = {"openai": OpenAIChat(), "anthropic": AnthropicMessages()}
