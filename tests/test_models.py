"""Model provisioning: the tiny model converts once, atomically, and has a stable fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest

from cai_bootstrap.engine import models


def test_tiny_model_is_provisioned(tiny_path):
    p = Path(tiny_path)
    assert (p / "config.json").is_file() and (p / "model.safetensors").is_file()
    # the stored fingerprint is the hash of the weights on disk, recomputed here (a stale or foreign
    # fingerprint.txt would make every cache key lie about the model)
    assert models.model_fingerprint("tiny") == models.hash_weights(p)
    assert len(models.model_fingerprint("tiny")) == 16


def test_interrupted_conversion_leaves_no_model(tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_CACHE", str(tmp_path))

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        models.resolve_model("tiny")
    assert not models.tiny_model_dir().exists()
    assert list((tmp_path / "models").iterdir()) == []  # the temp dir was removed too


def test_missing_wheel_says_what_to_do(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelError, match="make install"):
        models.tiny_gguf_path()


def test_offline_profile_not_cached_is_named(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_in_hf_cache", lambda repo: False)
    with pytest.raises(models.ModelError, match="Qwen/Qwen2.5-7B-Instruct.*qwen2.5-7b"):
        models.resolve_model("qwen2.5-7b")
