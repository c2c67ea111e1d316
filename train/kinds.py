"""The kinds of training a process can be asked to run (train.worker in a child, train.launch over several):
each one's function and config, in one table."""

from __future__ import annotations

from dataclasses import dataclass

from cai_bootstrap.train.config import DPOTrainConfig, EMTrainConfig, LoraSpec


@dataclass(frozen=True)
class Kind:
    """A kind of training: the function that runs it (imported when called: it pulls in TRL) and its config."""

    module: str
    function: str
    config: type[LoraSpec]

    def target(self):
        import importlib

        return getattr(importlib.import_module(self.module), self.function)


KINDS = {"dpo": Kind(f"{__package__}.dpo", "train_dpo", DPOTrainConfig),
         "em": Kind(f"{__package__}.em", "train_em", EMTrainConfig)}
