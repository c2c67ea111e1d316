"""Which endpoints a judge config sends to, and the judge model's name in cache keys.

A config's usable endpoints are the keyed ones whose key is set, else its `local: true` ones; local ones
are served by the embedded vLLM server (judge.local_server), started here only when asked to serve.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from core.errors import BadInput
from judge.config import Endpoint, JudgeConfig


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
        from judge.local_server import LocalVLLMServer

        return LocalVLLMServer(config.local_model).served_name
    return eps[0].model or config.model


@contextlib.contextmanager
def serve_endpoints(config: JudgeConfig) -> Iterator[tuple[str, list[Endpoint]]]:
    """(judge model name, endpoints ready to take requests): starts the embedded vLLM server for local
    endpoints when the config names a `local_model`, and stops it on exit."""
    eps = usable_endpoints(config)
    if not (eps[0].local and config.local_model):
        yield judge_model_name(config), eps
        return
    from judge.local_server import LocalVLLMServer

    with LocalVLLMServer(config.local_model) as srv:
        for e in eps:
            e.base_url, e.model = srv.base_url, srv.served_name
        yield srv.served_name, eps
