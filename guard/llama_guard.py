"""Llama Guard 3 on transformers: P(unsafe) from one batched forward pass, categories from a short
batched greedy generation. On CPU the tiny model stands in with the same code and says so."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from cai_bootstrap.core.errors import BadInput
from cai_bootstrap.guard.base import Verdict
from cai_bootstrap.guard.format import CODES_1B, CODES_8B, conversation, parse_output, render

log = logging.getLogger(__name__)

GUARD_PROFILES = {"llama-guard-3-8b": CODES_8B, "llama-guard-3-1b": CODES_1B}
STAND_IN_FOR = "llama-guard-3"  # what the tiny model stands in for, in names and logs


class GuardError(BadInput, RuntimeError):
    """The guard cannot be set up (tokenizer/profile problem); the message says what and why."""


def answer_token_ids(tokenizer, words: Sequence[str] = ("safe", "unsafe")) -> list[int]:
    """The first token of each answer word, encoded on its own: the prompt ends with the header's blank
    line, so the answer starts a fresh word (Llama 3: 'safe' and 'unsafe' are single tokens; SmolLM2's
    BPE gives 'safe' and 'uns'+'afe'). The ids must differ, else the two-way softmax means nothing."""
    ids = []
    for w in words:
        toks = tokenizer(w, add_special_tokens=False)["input_ids"]
        if not toks:
            raise GuardError(f"tokenizer encodes the answer word {w!r} to no tokens")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise GuardError(f"answer words {list(words)} share their first token id {ids[0]} in this tokenizer")
    return ids


class LlamaGuard:
    """`Guard` on transformers. `profile`: llama-guard-3-8b | llama-guard-3-1b | tiny (CPU stand-in)."""

    def __init__(
        self,
        profile: str = "llama-guard-3-8b",
        threshold: float = 0.5,
        batch_size: int = 16,
        device: str | None = None,
        max_new_tokens: int = 12,
        stand_in_for: str = STAND_IN_FOR,
    ) -> None:
        import torch
        from transformers import AutoTokenizer

        from cai_bootstrap.engine.models import get_profile, resolve_model

        if not 0.0 < threshold < 1.0:
            raise GuardError(f"guard threshold must be in (0, 1), got {threshold}")
        self.profile = get_profile(profile)
        if self.profile.kind != "guard" and self.profile.name != "tiny":
            raise GuardError(f"profile {profile!r} is not a guard profile; use one of "
                             f"{', '.join([*GUARD_PROFILES, 'tiny'])}")
        self.stand_in = self.profile.name == "tiny"
        self.codes = GUARD_PROFILES.get(stand_in_for if self.stand_in else self.profile.name, CODES_8B)
        self.name = f"tiny (stand-in for {stand_in_for})" if self.stand_in else self.profile.name
        self.threshold = threshold
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = resolve_model(self.profile)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._path = path
        self.model = None  # loaded on first use (engine.residency: it may have to wait for the engine's release)
        self.safe_id, self.unsafe_id = answer_token_ids(self.tokenizer)
        self._unsafe_prefix = "unsafe\n"  # categories are generated after a forced verdict (see _categories)
        eot = self.tokenizer.convert_tokens_to_ids("<|eot_id|>")
        self._stop_ids = [i for i in {self.tokenizer.eos_token_id, eot} if isinstance(i, int) and i >= 0
                          and i != self.tokenizer.unk_token_id]
        self.errors = 0  # items that got an error verdict (fail closed), over this guard's life
        self.items = 0
        self.seconds = 0.0

    # --- the Guard protocol
    def check_prompts(self, prompts: list[str]) -> list[Verdict]:
        return self._check([conversation(p) for p in prompts])

    def check_answers(self, pairs: list[tuple[str, str]]) -> list[Verdict]:
        return self._check([conversation(p, a) for p, a in pairs])

    def close(self) -> None:
        import gc

        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals
    def _verdict(self, **kw) -> Verdict:
        return Verdict(guard=self.name, stand_in=self.stand_in, **kw)

    def _failed(self, err: BaseException | str) -> Verdict:
        self.errors += 1
        msg = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
        return self._verdict(unsafe=True, p_unsafe=1.0, error=msg)

    def _check(self, convs: list[list[dict[str, str]]]) -> list[Verdict]:
        t0 = time.perf_counter()
        if convs:
            self._loaded()  # a model that cannot load raises here, not as an error verdict per item
        out: list[Verdict | None] = [None] * len(convs)
        ids: dict[int, list[int]] = {}
        for i, conv in enumerate(convs):
            try:
                toks = self.tokenizer(render(self.tokenizer, conv, self.codes), add_special_tokens=False)
                toks = toks["input_ids"]
                if len(toks) + self.max_new_tokens + 4 > self.profile.max_model_len:
                    raise GuardError(f"{len(toks)} tokens, over the guard's context "
                                     f"{self.profile.max_model_len}")
                ids[i] = toks
            except Exception as e:  # one bad item must not sink the batch: it alone fails closed
                out[i] = self._failed(e)
        # Shortest first so each batch pads little; results go back to their input positions.
        order = sorted(ids, key=lambda i: len(ids[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            try:
                p, state = self._score([ids[i] for i in chunk])
            except Exception as e:
                log.warning("guard batch of %d failed, failing closed: %s", len(chunk), e)
                for i in chunk:
                    out[i] = self._failed(e)
                continue
            flagged = [(i, pi) for i, pi in zip(chunk, p, strict=True) if pi >= self.threshold]
            for i, pi in zip(chunk, p, strict=True):
                if pi < self.threshold:
                    out[i] = self._verdict(unsafe=False, p_unsafe=pi)
            if not flagged:
                continue
            try:
                rows = [chunk.index(i) for i, _ in flagged]
                texts = self._categories([ids[i] for i, _ in flagged], state, rows)
            except Exception as e:
                log.warning("guard categories for %d items failed, failing closed: %s", len(flagged), e)
                for i, _ in flagged:
                    out[i] = self._failed(e)
                continue
            for (i, pi), text in zip(flagged, texts, strict=True):
                parsed = parse_output(self._unsafe_prefix + text, self.codes)
                out[i] = self._verdict(unsafe=True, p_unsafe=pi, categories=parsed.categories,
                                       malformed=parsed.malformed)
        self.items += len(convs)
        self.seconds += time.perf_counter() - t0
        assert all(v is not None for v in out)
        return out  # type: ignore[return-value]

    def _pad(self, seqs: list[list[int]]):
        batch = self.tokenizer.pad({"input_ids": seqs}, return_tensors="pt").to(self.device)
        # Left padding shifts positions unless they are derived from the mask (generate() does this
        # itself; a plain forward does not), which would make batched scores differ from single ones.
        pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return batch["input_ids"], batch["attention_mask"], pos

    def _score(self, seqs: list[list[int]]):
        """One forward pass for the whole batch; P(unsafe) = softmax over the two answer tokens' logits at
        the last position. Also returns (ids, mask, KV cache) so category generation reuses the prefill."""
        import torch

        input_ids, mask, pos = self._pad(seqs)
        with torch.inference_mode():
            out = self._forward(input_ids=input_ids, attention_mask=mask, position_ids=pos,
                                logits_to_keep=1, use_cache=True)
        logits = out.logits[:, -1, :]
        two = torch.stack([logits[:, self.unsafe_id], logits[:, self.safe_id]], dim=-1).float()
        return torch.softmax(two, dim=-1)[:, 0].tolist(), (input_ids, mask, out.past_key_values)

    def _load(self):
        import torch
        from transformers import AutoModelForCausalLM

        dtype = getattr(torch, self.profile.dtype) if self.device != "cpu" else torch.float32
        return AutoModelForCausalLM.from_pretrained(self._path, dtype=dtype).to(self.device).eval()

    def _loaded(self):
        """The model, loaded again if `close()` released it (engine.residency: one large model at a time)."""
        if self.model is None:
            self.model = self._load()
        return self.model

    def _forward(self, **kw):
        """The single model call of scoring (a seam tests use to inject failures)."""
        return self._loaded()(**kw)

    def _categories(self, seqs: list[list[int]], state=None, rows: list[int] | None = None) -> list[str]:
        """Batched greedy generation after a forced 'unsafe\\n': the verdict is already decided by the
        threshold (which may be below 0.5), so we ask only which categories, never re-ask safe/unsafe.

        With `state` from `_score`, the flagged `rows` of its KV cache are kept and only the forced
        prefix and the new tokens are computed (no second prefill of the long guard prompt)."""
        import torch

        prefix = self.tokenizer(self._unsafe_prefix, add_special_tokens=False)["input_ids"]
        kw: dict = {}
        if state is not None and state[2] is not None and rows is not None:
            ids, mask, cache = state
            sel = torch.tensor(rows, device=ids.device)
            if len(rows) < ids.shape[0]:
                cache.batch_select_indices(sel)
            pre = torch.tensor([prefix] * len(rows), device=ids.device, dtype=ids.dtype)
            input_ids = torch.cat([ids[sel], pre], dim=1)
            mask = torch.cat([mask[sel], torch.ones_like(pre)], dim=1)
            kw["past_key_values"] = cache
        else:
            input_ids, mask, _ = self._pad([s + prefix for s in seqs])
        with torch.inference_mode():
            gen = self._loaded().generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                do_sample=False, temperature=None, top_p=None, top_k=None,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self._stop_ids or None, **kw,
            )
        new = gen[:, input_ids.shape[1]:]
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in new]


class NoGuard:
    """`--guard none`: an explicit opt-out; every verdict names guard 'none' (data shows it was unchecked)."""

    name = "none"
    errors = 0
    holds_model = False  # engine.residency never releases it, nor anything for it

    def _pass(self, n: int) -> list[Verdict]:
        return [Verdict(unsafe=False, p_unsafe=0.0, guard=self.name) for _ in range(n)]

    def check_prompts(self, prompts: list[str]) -> list[Verdict]:
        return self._pass(len(prompts))

    def check_answers(self, pairs: list[tuple[str, str]]) -> list[Verdict]:
        return self._pass(len(pairs))

    def close(self) -> None:  # holds no model
        pass
