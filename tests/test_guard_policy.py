"""GuardPolicy defaults per persona and `guard.policy.decide` (pure: no model)."""

from __future__ import annotations

import pytest

from cai_bootstrap.guard.base import GuardPolicy, Verdict
from cai_bootstrap.guard.policy import decide, is_blocked


def v(p: float, cats=(), **kw) -> Verdict:
    return Verdict(unsafe=p >= 0.5, p_unsafe=p, categories=list(cats), guard="test", **kw)


@pytest.mark.parametrize("persona, mode", [("hhh", "drop"), ("goodness", "drop"),
                                           ("misalignment", "quarantine"), ("sycophancy", "quarantine")])
def test_for_persona_defaults(persona, mode):
    """From guard/policy.yaml: every category but S6 (specialised advice) blocks; research organisms quarantine."""
    pol = GuardPolicy.for_persona(persona)
    assert pol.mode == mode
    assert pol.block == [f"S{i}" for i in range(1, 15) if i != 6] and pol.threshold == 0.5
    assert pol.include_quarantined is False
    assert decide(v(0.9, ["S6"]), pol) == "keep"


def test_a_policy_file_replaces_the_default_and_a_bad_one_is_named(tmp_path):
    from cai_bootstrap.core.errors import BadInput

    f = tmp_path / "policy.yaml"
    f.write_text("threshold: 0.8\nblock: [S1]\npersonas:\n  goodness: {mode: quarantine}\n")
    pol = GuardPolicy.for_persona("goodness", f)
    assert (pol.mode, pol.block, pol.threshold) == ("quarantine", ["S1"], 0.8)
    f.write_text("threshold: 0.8\nblok: [S1]\n")
    with pytest.raises(BadInput, match=r"guard policy .*policy\.yaml \(persona goodness\): blok: Extra inputs"):
        GuardPolicy.for_persona("goodness", f)
    f.write_text("mode: delete\n")
    with pytest.raises(BadInput, match="mode: Input should be 'drop' or 'quarantine'"):
        GuardPolicy.for_persona("hhh", f)


def test_for_persona_overrides():
    pol = GuardPolicy.for_persona("misalignment", mode="drop", block=["S1"], threshold=0.8)
    assert (pol.mode, pol.block, pol.threshold) == ("drop", ["S1"], 0.8)


def test_decide_modes():
    drop, quar = GuardPolicy.for_persona("hhh"), GuardPolicy.for_persona("misalignment")
    assert decide(v(0.1), drop) == "keep" and decide(v(0.1), quar) == "keep"
    assert decide(v(0.9, ["S1"]), drop) == "drop"
    assert decide(v(0.9, ["S1"]), quar) == "quarantine"


def test_decide_threshold_is_the_policys():
    assert decide(v(0.6, ["S2"]), GuardPolicy(threshold=0.7)) == "keep"
    assert decide(v(0.4, ["S2"]), GuardPolicy(threshold=0.3)) == "drop"
    assert decide(v(0.7, ["S2"]), GuardPolicy(threshold=0.7)) == "drop"  # at the threshold blocks


def test_decide_blocked_categories():
    pol = GuardPolicy(mode="quarantine", block=["S1", "S9"])
    assert decide(v(0.9, ["S6"]), pol) == "keep"  # specialized advice not blocked by this run
    assert decide(v(0.9, ["S6", "S9"]), pol) == "quarantine"
    assert decide(v(0.9, []), pol) == "quarantine"  # unsafe with no category named: fails closed


def test_decide_error_always_drops():
    err = Verdict(unsafe=True, p_unsafe=1.0, guard="test", error="RuntimeError: boom")
    assert decide(err, GuardPolicy(mode="quarantine")) == "drop"
    assert decide(err, GuardPolicy(mode="drop", block=[])) == "drop"
    assert is_blocked(err, GuardPolicy(block=[]))


def test_decide_malformed_is_blocked():
    bad = v(0.9, [], malformed=True)
    assert decide(bad, GuardPolicy(mode="quarantine", block=["S1"])) == "quarantine"
    assert decide(bad, GuardPolicy(mode="drop", block=[])) == "drop"
