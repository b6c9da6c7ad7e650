"""The production engine: vLLM's offline `LLM`, one per Ray actor (tensor parallel inside it).

Two paths to the same targets (`EngineConfig.vllm_path`):

- `hidden` (default, fast): vLLM runs the backbone as a pooling model (`runner="pooling"`,
  `convert="embed"`, task `token_embed`, no normalisation) and returns the final-norm hidden
  states of every prompt token as one tensor per request (msgpack tensor transport, no pickle).
  The lm_head, logsumexp and top-k are then computed chunk by chunk (`chunked_topk`) with the
  lm_head weight read from the checkpoint, so no [n, V] fp32 log-softmax is ever materialised and
  nothing is walked per position. Valid for models whose logits are exactly `lm_head(h)`
  (Llama, Mistral, Qwen, ...); models with logit scaling or soft-capping are refused here.
- `prompt-logprobs`: vLLM's own path, `SamplingParams(max_tokens=1, prompt_logprobs=k,
  detokenize=False, flat_logprobs=True)`. Each prompt position then carries k + 1 entries: the
  actual next token first (with its rank), then ranks 1..k; the first position has none. We
  convert `FlatLogprobs.token_ids/logprobs` with one `np.asarray` + reshape and drop column 0.

Packing modes: `causal` (one request per window) and `document` (one request per document,
positions from 0). `document-global` needs positions that do not start at 0, which vLLM's offline
API cannot express: use the `hf` engine for it.

The engine core runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, `uni` executor when
tensor_parallel is 1): one vLLM import per actor instead of three spawned processes, which is most
of vLLM-CPU's start-up time.
"""

from __future__ import annotations

import json
import os

import numpy as np

from kdcache.teacher_dump.engines.base import (EngineConfig, EngineError, TeacherEngine,
                                               WindowTargets, chunked_topk, empty_targets,
                                               finish_targets, segments_for_mode)
from kdcache.teacher_dump.pack import PackedWindow
from kdcache.vllm_start import configure_vllm_env, start_llm, stop_llm

_LOGIT_SCALING_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                       "output_multiplier_scale")


def load_lm_head(model_dir: str):
    """The lm_head weight [V, d] from a checkpoint's safetensors (tied: the input embedding)."""
    from safetensors import safe_open

    with open(os.path.join(model_dir, "config.json")) as fh:
        config = json.load(fh)
    text_cfg = config.get("text_config", config)
    for key in _LOGIT_SCALING_KEYS:
        if text_cfg.get(key) not in (None, 1, 1.0):
            raise EngineError(f"{model_dir}: config sets {key}={text_cfg[key]}; the 'hidden' path "
                              "assumes logits = lm_head(h); use --vllm-path prompt-logprobs")
    names = ["lm_head.weight", "language_model.lm_head.weight"]
    if config.get("tie_word_embeddings", False) or text_cfg.get("tie_word_embeddings", False):
        names += ["model.embed_tokens.weight", "model.language_model.embed_tokens.weight"]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    for name in names:
        for f in files:
            with safe_open(os.path.join(model_dir, f), framework="pt") as st:
                if name in st.keys():
                    return st.get_tensor(name)
    raise EngineError(f"{model_dir}: no lm_head weight ({' or '.join(names)}) in its safetensors")


class VLLMEngine(TeacherEngine):
    name = "vllm"
    modes = ("causal", "document")

    def __init__(self, cfg: EngineConfig) -> None:
        super().__init__(cfg)
        if cfg.vllm_path not in ("hidden", "prompt-logprobs"):
            raise EngineError(f"unknown vllm path {cfg.vllm_path!r}")
        configure_vllm_env(cfg.kv_cache_gib)
        try:
            from vllm import LLM  # noqa: F401
        except ImportError as exc:
            raise EngineError(f"the vllm engine needs vLLM installed ({exc}); "
                              "use --engine hf on machines without it") from None
        with open(os.path.join(cfg.model, "config.json")) as fh:
            max_pos = json.load(fh).get("max_position_embeddings") or cfg.window + 1
        world = cfg.tensor_parallel * cfg.pipeline_parallel
        common = dict(model=cfg.model, dtype=cfg.dtype, seed=cfg.seed,
                      max_model_len=int(min(cfg.window + 1, max_pos)),
                      enable_prefix_caching=False, enforce_eager=True,
                      tensor_parallel_size=cfg.tensor_parallel,
                      pipeline_parallel_size=cfg.pipeline_parallel, disable_log_stats=True,
                      # mp: the ranks stay on this node, on the GPUs Ray gave this actor (in a
                      # placement group vLLM would otherwise pick its ray executor)
                      distributed_executor_backend="uni" if world == 1 else "mp")
        if cfg.gpu_memory_utilization is not None:
            common["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if cfg.vllm_path == "hidden":
            self.weight = load_lm_head(cfg.model).float()
            self.llm = start_llm(EngineError, **common, runner="pooling", convert="embed",
                                 pooler_config=_pooler_config())
        else:
            self.weight = None
            self.llm = start_llm(EngineError, **common, skip_tokenizer_init=True, max_logprobs=cfg.k)
        self.max_logprobs = cfg.k
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())
        if cfg.k > self.vocab_size:
            raise EngineError(f"k={cfg.k} exceeds the teacher's vocabulary ({self.vocab_size})")

    def reconfigure(self, *, k: int, mode: str, window: int) -> None:
        if self.cfg.vllm_path == "prompt-logprobs" and k > self.max_logprobs:
            raise EngineError(f"k={k} exceeds max_logprobs={self.max_logprobs} this engine "
                              "was started with")
        super().reconfigure(k=k, mode=mode, window=window)

    # ------------------------------------------------------------------ requests

    def _requests(self, windows: list[PackedWindow]):
        prompts, where = [], []
        for w, win in enumerate(windows):
            for start, end, _ in segments_for_mode(win, self.cfg.mode):
                prompts.append({"prompt_token_ids": win.tokens[start:end].tolist()})
                where.append((w, start, end))
        return prompts, where

    def topk(self, windows: list[PackedWindow]) -> list[WindowTargets]:
        k = self.cfg.k
        out = [empty_targets(win.n_tokens, k) for win in windows]
        prompts, where = self._requests(windows)
        if self.cfg.vllm_path == "hidden":
            self._topk_hidden(prompts, where, out)
        else:
            self._topk_prompt_logprobs(prompts, where, out)
        return [finish_targets(win, self.cfg.mode, ids, lps)
                for win, (ids, lps) in zip(windows, out)]

    def _topk_hidden(self, prompts, where, out) -> None:
        from vllm import PoolingParams

        results = self.llm.encode(prompts, pooling_task="token_embed",
                                  pooling_params=PoolingParams(use_activation=False),
                                  use_tqdm=False)
        for (w, start, end), res in zip(where, results):
            hidden = res.outputs.data
            if hidden.shape[0] != end - start:
                raise EngineError(f"vLLM returned {hidden.shape[0]} hidden states for a "
                                  f"{end - start}-token request")
            ids, lps = out[w]
            chunked_topk(hidden, self.weight, self.cfg.k, chunk_elements=self.cfg.chunk_elements,
                         out_ids=ids[start:end], out_logprobs=lps[start:end])

    def _topk_prompt_logprobs(self, prompts, where, out) -> None:
        from vllm import SamplingParams

        k = self.cfg.k
        params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False,
                                flat_logprobs=True, temperature=1.0)
        results = self.llm.generate(prompts, params, use_tqdm=False)
        for (w, start, end), res in zip(where, results):
            rows = end - start - 1  # position p >= 1 carries the target of token p
            if rows <= 0:
                continue
            flat = res.prompt_logprobs
            tid = np.asarray(flat.token_ids, dtype=np.int32)
            lp = np.asarray(flat.logprobs, dtype=np.float32)
            if tid.shape[0] != rows * (k + 1):
                raise EngineError(f"vLLM returned {tid.shape[0]} prompt log-prob entries for "
                                  f"{rows} positions, expected {rows * (k + 1)}")
            ids, lps = out[w]
            ids[start:end - 1] = tid.reshape(rows, k + 1)[:, 1:]
            lps[start:end - 1] = lp.reshape(rows, k + 1)[:, 1:]

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        stop_llm(llm)


def _pooler_config():
    from vllm.config import PoolerConfig

    return PoolerConfig(task="token_embed", use_activation=False)


