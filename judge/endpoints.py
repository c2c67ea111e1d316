"""Which endpoints a judge config sends to, and the judge model's name in cache keys.

A config's usable endpoints are the keyed ones whose key is set, else its `local: true` ones; local ones
are served by the embedded vLLM server (judge.local_server), started here only when asked to serve.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from cai_bootstrap.core.errors import BadInput
from cai_bootstrap.judge.config import Endpoint, JudgeConfig


def usable_endpoints(config: JudgeConfig) -> list[Endpoint]:
    eps = [e.model_copy() for e in config.usable()]
    if not eps:
        envs = ", ".join(e.api_key_env for e in config.endpoints if e.api_key_env) or "an api_key_env variable"
        raise BadInput(f"judge config: no usable endpoint: set {envs} or add a `local: true` endpoint")
    return eps


def judge_model_name(config: JudgeConfig) -> str:
    """The model name that goes into every judge cache key, known without starting anything (and without any
    key set: then it is the keyed endpoints' model, `config.model`)."""
    eps = config.usable()
    if not eps or not eps[0].local:
        return config.model
    if config.local_model:
        from cai_bootstrap.judge.local_server import LocalVLLMServer

        return LocalVLLMServer(config.local_model).served_name
    return eps[0].model or config.model


def embeds_server(config: JudgeConfig) -> bool:
    """Whether the endpoint a config judges with is the embedded vLLM server, which must be started first."""
    return bool(usable_endpoints(config)[0].local and config.local_model)


@contextlib.contextmanager
def serve_endpoints(config: JudgeConfig, log_path: Path | None = None) -> Iterator[tuple[str, list[Endpoint]]]:
    """(judge model name, endpoints ready to take requests): starts the embedded vLLM server for local
    endpoints when the config names a `local_model` (its output to `log_path`, else a temporary file), and
    stops it on exit."""
    eps = usable_endpoints(config)
    if not embeds_server(config):
        yield judge_model_name(config), eps
        return
    from cai_bootstrap.judge.local_server import LocalVLLMServer

    with LocalVLLMServer(config.local_model, log_path=log_path) as srv:
        for e in eps:
            e.base_url, e.model = srv.base_url, srv.served_name
        yield srv.served_name, eps


def judge_tokenizer(config: JudgeConfig):
    """The judge's tokenizer where it can be seen (the embedded server's model, or `tokenizer`); else None."""
    name = config.tokenizer
    eps = config.usable()
    if name is None and eps and eps[0].local and config.local_model:
        from cai_bootstrap.engine.models import PROFILES, resolve_model

        name = str(resolve_model(config.local_model)) if config.local_model in PROFILES else config.local_model
    if name is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def choose_path(config: JudgeConfig) -> tuple[str, object | None, str]:
    """(path, `tokenize` for the exact path or None, why): how this judge's numbers are read. Never a
    first-digit score: a tokenizer that splits 0-100 into digits is read on the exact path."""
    from cai_bootstrap.core.reading import token_texts, tokenizer_splits_numbers

    tok = judge_tokenizer(config) if config.scoring in ("auto", "exact") else None
    if config.scoring != "auto":
        return config.scoring, token_texts(tok) if tok is not None else None, "set by the judge config's `scoring`"
    if tok is not None:
        if tokenizer_splits_numbers(tok):
            return "exact", token_texts(tok), "the judge's tokenizer writes some of 0-100 as several tokens"
        return "logprobs", None, "the judge's tokenizer writes each of 0-100 as one token"
    if not all(e.logprobs for e in config.usable() or config.endpoints):  # keys may be unset while estimating
        return "sampled", None, "an endpoint is configured without logprobs"
    return "logprobs", None, ("tokenizer not visible: logprobs, switched to sampled if the judge rejects "
                              "logprobs, max_tokens or temperature")
