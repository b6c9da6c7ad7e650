"""Greedy generation from token-id prompts: vLLM when available, transformers otherwise.

Both engines take prompts as token ids (so the exact lengths built by needle_tasks.py are what the
model sees) and decode greedily (temperature 0 / do_sample=False), stopping at EOS or after
`max_new_tokens`. The transformers path groups prompts of equal length into batches, so no
padding is ever needed (every needle prompt of one length has exactly that many tokens).
vLLM is imported lazily: machines without it (e.g. the GPU trainer) never touch it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Sequence

from kdcache.evaluate.models import EvalError, load_model
from kdcache.vllm_start import configure_vllm_env, start_llm, stop_llm

ENGINES = ("auto", "vllm", "hf")


def vllm_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def resolve_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise EvalError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if engine == "auto":
        return "vllm" if vllm_available() else "hf"
    if engine == "vllm" and not vllm_available():
        raise EvalError("--engine vllm: vLLM is not installed here; use --engine hf")
    return engine


class HFGenerator:
    """transformers `generate`, greedy, batches of equal-length prompts."""

    name = "hf"

    def __init__(self, model_path: str, dtype: str = "float32", device: str = "cpu",
                 batch_size: int = 8) -> None:
        self.loaded = load_model(model_path, dtype=dtype, device=device)
        self.device, self.batch_size = device, batch_size

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    def generate(self, prompts: Sequence[list[int]], max_new_tokens: int,
                 progress: Callable[[int], None] | None = None) -> list[str]:
        import torch

        tok, model = self.loaded.tokenizer, self.loaded.model
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        by_length: dict[int, list[int]] = defaultdict(list)
        for i, p in enumerate(prompts):
            by_length[len(p)].append(i)
        out: list[str] = [""] * len(prompts)
        for indices in by_length.values():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                ids = torch.tensor([prompts[i] for i in batch], device=self.device)
                with torch.no_grad():
                    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                         max_new_tokens=max_new_tokens, do_sample=False,
                                         eos_token_id=eos, pad_token_id=pad)
                for row, i in enumerate(batch):
                    new = gen[row, ids.shape[1]:].tolist()
                    if eos in new:
                        new = new[:new.index(eos)]
                    out[i] = tok.decode(new, skip_special_tokens=True)
                if progress:
                    progress(len(batch))
        return out

    def close(self) -> None:
        self.loaded = None


class VLLMGenerator:
    """vLLM offline `LLM.generate` on token-id prompts, temperature 0."""

    name = "vllm"

    def __init__(self, model_path: str, dtype: str = "float32", max_len: int = 4096,
                 kv_cache_gib: float = 1.0, seed: int = 0) -> None:
        configure_vllm_env(kv_cache_gib)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.llm = start_llm(EvalError, model=model_path, dtype=dtype, seed=seed,
                             max_model_len=max_len, enable_prefix_caching=False,
                             enforce_eager=True, disable_log_stats=True,
                             distributed_executor_backend="uni")

    def generate(self, prompts: Sequence[list[int]], max_new_tokens: int,
                 progress: Callable[[int], None] | None = None) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        results = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params,
                                    use_tqdm=False)
        if progress:
            progress(len(prompts))
        eos = self.tokenizer.eos_token_id
        texts = []
        for r in results:
            new = list(r.outputs[0].token_ids)
            if eos in new:
                new = new[:new.index(eos)]
            texts.append(self.tokenizer.decode(new, skip_special_tokens=True))
        return texts

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        stop_llm(llm)


def make_generator(engine: str, model_path: str, *, dtype: str = "float32", device: str = "cpu",
                   batch_size: int = 8, max_len: int = 4096):
    engine = resolve_engine(engine)
    if engine == "vllm":
        return VLLMGenerator(model_path, dtype=dtype, max_len=max_len)
    return HFGenerator(model_path, dtype=dtype, device=device, batch_size=batch_size)
