"""How a persona adapter is made, carried in the name of its arm.

A persona is made by a pair source and a preference loss:
- pairs `bootstrap`: the six progressive stages (stages/), each stage's adapter making the next stage's data;
- pairs `oct`: OpenCharacterTraining's distillation (Maiya et al., 2025), one step: a teacher answers with the
  constitution's character in its system prompt (chosen), the policy answers without it (rejected);
- loss `dpo` (TRL's DPOTrainer, the parent adapter as reference) or `orpo` (TRL's ORPOTrainer, no reference);
- `+introspect`: OCT's introspection after the preference training (stages.introspect): the persona writes about
  its own character and talks with a copy of itself, and an SFT adapter trained on those texts on top of the
  preference adapter is stacked with it (train.stack), as the EM adapter is.

The arm "goodness" is the default recipe, bootstrap-dpo; any other is written "goodness@<pairs>-<loss>", e.g.
"goodness@bootstrap-orpo", "goodness@oct-dpo" or "goodness@oct-dpo+introspect". The arm name is the key of its
data and adapters (run.layout), so recipes of one persona sit side by side and one EM experiment can compare them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from cai_bootstrap.core.errors import BadInput

PairSource = Literal["bootstrap", "oct"]
Loss = Literal["dpo", "orpo"]
PAIR_SOURCES: tuple[str, ...] = ("bootstrap", "oct")
LAST_STAGE = 6  # the bootstrap's last stage: its adapter is the persona
OCT_STEP = 0  # an `oct` recipe's one step, stored where a stage would be (run.layout: oct/; stages.specs.OCT)
LOSSES: tuple[str, ...] = ("dpo", "orpo")
SEP = "@"
OCT_NLL_WEIGHT = 0.1  # OpenCharacterTraining's nll_loss_coef (finetuning/distillation/qwen.sh)
INTROSPECT = "+introspect"
INTROSPECT_STEP = "introspect"  # where its data and adapter are stored (run.layout)


class Recipe(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    pairs: PairSource = "bootstrap"
    loss: Loss = "dpo"
    introspect: bool = False

    @property
    def name(self) -> str:
        return f"{self.pairs}-{self.loss}" + (INTROSPECT if self.introspect else "")

    @property
    def nll_weight(self) -> float:
        """OCT trains its DPO with the chosen answer's NLL beside it (train.config's `nll_weight`); ORPO's loss
        holds an NLL term of its own, and the bootstrap's DPO has none."""
        return OCT_NLL_WEIGHT if self.pairs == "oct" and self.loss == "dpo" else 0.0

    @property
    def is_default(self) -> bool:
        return self == DEFAULT


DEFAULT = Recipe()


def arm_name(persona: str, recipe: Recipe) -> str:
    return persona if recipe.is_default else f"{persona}{SEP}{recipe.name}"


def split_arm(arm: str) -> tuple[str, Recipe]:
    """(persona, recipe) of an arm name; an unknown recipe is BadInput naming the arm."""
    persona, sep, name = arm.partition(SEP)
    if not sep:
        return persona, DEFAULT
    introspect = name.endswith(INTROSPECT)
    pairs, _, loss = name.removesuffix(INTROSPECT).partition("-")
    if pairs not in PAIR_SOURCES or loss not in LOSSES:
        raise BadInput(f"persona {arm!r}: recipe {name!r} is not <pairs>-<loss>[{INTROSPECT}] with pairs one of "
                       f"{', '.join(PAIR_SOURCES)} and loss one of {', '.join(LOSSES)} (e.g. {persona}@oct-dpo)")
    return persona, Recipe(pairs=pairs, loss=loss, introspect=introspect)


def canonical(arm: str) -> str:
    """The one name of an arm: "goodness@bootstrap-dpo" is "goodness", so the same work lands in one folder."""
    return arm_name(*split_arm(arm))


def persona_of(arm: str) -> str:
    """The constitution an arm's persona is made from."""
    return split_arm(arm)[0]


def with_recipe(personas: list[str], pairs: str | None = None, loss: str | None = None,
                introspect: bool = False) -> list[str]:
    """The arms for `personas` with `--pairs` / `--loss` / `--introspect` applied to those that name no recipe of
    their own."""
    if pairs is None and loss is None and not introspect:
        return personas
    out = []
    for p in personas:
        persona, r = split_arm(p)
        if SEP in p:
            out.append(p)
            continue
        try:
            recipe = Recipe(pairs=pairs or r.pairs, loss=loss or r.loss, introspect=introspect)
        except ValueError:
            raise BadInput(f"--pairs {pairs!r} / --loss {loss!r}: pairs is one of {', '.join(PAIR_SOURCES)}, "
                           f"loss one of {', '.join(LOSSES)}") from None
        out.append(arm_name(persona, recipe))
    return out


def steps_of(arm: str, stages: list[int]) -> list[int]:
    """The steps an arm runs: the requested stages for the bootstrap, the one distillation step for OCT."""
    return [OCT_STEP] if split_arm(arm)[1].pairs == "oct" else stages


def introspects(arm: str) -> bool:
    return split_arm(arm)[1].introspect


def reaches_persona(arm: str, stages: list[int]) -> bool:
    """Whether running `stages` ends at the arm's persona adapter (OCT's one step, or the bootstrap's last stage):
    only then does a `+introspect` recipe's introspection follow."""
    return split_arm(arm)[1].pairs == "oct" or LAST_STAGE in stages
