"""transformers backend: batched left-padded `generate`, PEFT adapters; the fallback without vLLM."""

from __future__ import annotations

from cai_bootstrap.engine.base import Engine, adapter_hash
from cai_bootstrap.engine.types import Completion, Sampling


class HFEngine(Engine):
    name = "hf"

    def __init__(self, profile="tiny", batch_size: int = 32, device: str | None = None) -> None:
        super().__init__(profile)
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size = batch_size
        self._model = None
        self._adapters: dict[str, str] = {}  # adapter dir -> PEFT adapter name

    @property
    def model(self):
        """Loaded on first use, so a run whose generations are all cached never loads the weights."""
        if self._model is None:
            import torch
            from transformers import AutoModelForCausalLM

            dtype = getattr(torch, self.profile.dtype) if self.device != "cpu" else torch.float32
            self._model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype).to(self.device).eval()
        return self._model

    @model.setter
    def model(self, value) -> None:
        self._model = value

    def close(self) -> None:
        self._model = None
        self._adapters.clear()
        super().close()

    def _activate(self, adapter: str | None):
        """Returns the model to call: the PEFT wrapper with `adapter` active, or the base."""
        from peft import PeftModel

        if adapter is None:
            return None
        key = adapter_hash(adapter)
        name = "a" + key
        if not isinstance(self.model, PeftModel):
            self.model = PeftModel.from_pretrained(self.model, adapter, adapter_name=name).eval()
        elif name not in self._adapters.values():
            self.model.load_adapter(adapter, adapter_name=name)
        self._adapters[adapter] = name
        self.model.set_adapter(name)
        return name

    def _generate(self, prompt_ids, sampling: Sampling, adapter):
        import contextlib

        import torch
        from peft import PeftModel

        active = self._activate(adapter)
        ctx = (
            self.model.disable_adapter()
            if active is None and isinstance(self.model, PeftModel)
            else contextlib.nullcontext()
        )
        eos = self.tokenizer.eos_token_id
        out: list[Completion] = []
        with ctx, torch.inference_mode():
            for start in range(0, len(prompt_ids), self.batch_size):
                chunk = prompt_ids[start : start + self.batch_size]
                batch = self.tokenizer.pad({"input_ids": chunk}, return_tensors="pt").to(self.device)
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed + start)
                kw = dict(
                    max_new_tokens=sampling.max_tokens,
                    num_return_sequences=sampling.n,
                    pad_token_id=self.tokenizer.pad_token_id,
                    return_dict_in_generate=True,
                    output_logits=sampling.logprobs is not None,
                )
                if sampling.temperature > 0:
                    kw.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
                else:
                    kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                if sampling.stop:
                    kw.update(stop_strings=sampling.stop, tokenizer=self.tokenizer)
                res = self.model.generate(**batch, **kw)
                width = batch["input_ids"].shape[1]
                for row, seq in enumerate(res.sequences):
                    req = start + row // sampling.n
                    new = seq[width:].tolist()
                    out.append(self._completion(req, row % sampling.n, new, len(prompt_ids[req]), eos,
                                                sampling, res.logits, row))
        return out

    def _completion(self, req, sample, new, n_prompt, eos, sampling, logits, row) -> Completion:
        finish = "length"
        if eos in new:
            new = new[: new.index(eos)]
            finish = "stop"
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        for s in sampling.stop:
            if s in text:
                text, finish = text[: text.index(s)], "stop"
        lps = None
        if sampling.logprobs is not None and logits is not None:
            import torch

            lps = []
            for step in range(len(new)):
                lp = torch.log_softmax(logits[step][row].float(), dim=-1)
                top = torch.topk(lp, max(sampling.logprobs, 1))
                d = {self.tokenizer.decode([t]): v for t, v in zip(top.indices.tolist(), top.values.tolist())}
                d.setdefault(self.tokenizer.decode([new[step]]), lp[new[step]].item())
                lps.append(d)
        return Completion(request_index=req, sample_index=sample, text=text, finish_reason=finish,
                          prompt_tokens=n_prompt, completion_tokens=len(new), token_ids=new, logprobs=lps)
