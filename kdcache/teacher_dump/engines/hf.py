"""The transformers reference engine (CPU or GPU): the backbone in HF, the shared chunked top-k.

It serves all three packing modes by running each request of `segments_for_mode` separately with
explicit position ids: causal = the whole window from 0; document = each document from 0;
document-global = each document from its offset in the window. The last is exactly the paper's
setting (document mask, positions counted over the window) without building an n x n mask.
Requests of similar length are batched, right-padded, up to `BATCH_TOKENS` padded tokens per
forward (a window of thousands of short documents is a few forwards, not thousands): under the
causal mask a real token never sees the padding after it, so its hidden state is the same
computation as alone.
Tests use it to check the vLLM engine; it is also the engine for GPU machines without vLLM.

The logits are the model's own: its lm_head (bias included) and the logit scale / soft-cap its
config names (`LogitHead`). At start-up the engine compares that with the model's full forward
on a probe sequence and refuses a model whose forward does something else to its logits.
"""

from __future__ import annotations

import numpy as np

from kdcache.teacher_dump.engines.base import (EngineConfig, EngineError, LogitHead,
                                               TeacherEngine, WindowTargets, chunked_topk,
                                               empty_targets, finish_targets, needed_rows,
                                               segments_for_mode)
from kdcache.teacher_dump.pack import PackedWindow


BATCH_TOKENS = 8192  # padded tokens per forward when short requests are batched


def length_batches(lengths: list[int], budget: int = BATCH_TOKENS) -> list[list[int]]:
    """Request indices, longest first, in batches whose padded size (count x longest) stays
    within `budget` tokens; a request longer than the budget runs alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class HFEngine(TeacherEngine):
    name = "hf"
    modes = ("causal", "document", "document-global")

    def __init__(self, cfg: EngineConfig) -> None:
        super().__init__(cfg)
        import torch
        from transformers import AutoModelForCausalLM

        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" \
            else cfg.device
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}.get(cfg.dtype)
        if dtype is None:
            raise EngineError(f"unsupported dtype {cfg.dtype!r}")
        if self.device != "cpu" and cfg.tensor_parallel * cfg.pipeline_parallel > 1:
            raise EngineError("the hf engine runs on one GPU; tensor or pipeline parallel "
                              "teachers need --engine vllm")
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise EngineError(f"{cfg.model}: cannot load the teacher with transformers: {exc}") \
                from None
        self.model = model.to(self.device).eval()
        self.backbone = self.model.get_decoder()
        output = self.model.get_output_embeddings()
        if output is None or getattr(output, "weight", None) is None:
            raise EngineError(f"{cfg.model}: {type(model).__name__} has no output embedding "
                              "(lm_head) for the hf engine; use --engine vllm "
                              "--vllm-path prompt-logprobs")
        self.weight = output.weight
        self.head = LogitHead.from_config(output.weight, getattr(output, "bias", None),
                                          self.model.config)
        self.vocab_size = int(output.weight.shape[0])
        if cfg.k > self.vocab_size:
            raise EngineError(f"k={cfg.k} exceeds the teacher's vocabulary ({self.vocab_size})")
        self.check_head()

    def check_head(self, tokens: int = 24) -> None:
        """Refuse a model whose own forward computes other logits than backbone + LogitHead
        (a post-processing kdcache does not know): its targets would not be its distribution."""
        import torch

        ids = torch.as_tensor(np.random.default_rng(0).integers(0, self.vocab_size, tokens),
                              device=self.device)
        with torch.inference_mode():
            want = self.model(input_ids=ids[None], use_cache=False).logits[0].float()
            got = self.head(self.hidden_states(ids.cpu().numpy(), 0))
            error = float((want.log_softmax(-1) - got.log_softmax(-1)).abs().max())
        tolerance = 1e-3 if self.cfg.dtype == "float32" else 0.1
        if not error <= tolerance:
            raise EngineError(
                f"{self.cfg.model}: {type(self.model).__name__}'s own logits differ from the hf "
                f"engine's lm_head top-k by up to {error:.3g} nats (tolerance {tolerance}): it "
                "post-processes its logits in a way kdcache does not reproduce, so the stored "
                "targets would not be its next-token distribution. Use --engine vllm "
                "--vllm-path prompt-logprobs (vLLM's own log-probs of the model).")

    def hidden_states(self, tokens: np.ndarray, first_position: int):
        """Final-norm hidden states [m, d] of one request."""
        import torch

        ids = torch.as_tensor(tokens, dtype=torch.long, device=self.device)[None]
        pos = torch.arange(first_position, first_position + ids.shape[1],
                           device=self.device)[None]
        with torch.inference_mode():
            out = self.backbone(input_ids=ids, position_ids=pos, use_cache=False)
        return out.last_hidden_state[0]

    def batch_hidden_states(self, requests: list[tuple[np.ndarray, int]]):
        """Final-norm hidden states [b, longest, d] of right-padded requests (tokens, first
        position); row i is valid up to len(tokens_i). Padding repeats the last real position,
        so no position exceeds the request's own."""
        import torch

        longest = max(len(t) for t, _ in requests)
        ids = torch.zeros((len(requests), longest), dtype=torch.long)
        pos = torch.empty((len(requests), longest), dtype=torch.long)
        steps = torch.arange(longest)
        for row, (tokens, first) in enumerate(requests):
            ids[row, :len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
            pos[row] = first + torch.clamp(steps, max=len(tokens) - 1)
        with torch.inference_mode():
            out = self.backbone(input_ids=ids.to(self.device), position_ids=pos.to(self.device),
                                use_cache=False)
        return out.last_hidden_state

    def topk(self, windows: list[PackedWindow]) -> list[WindowTargets]:
        import torch

        k, mode = self.cfg.k, self.cfg.mode
        out = [empty_targets(win.n_tokens, k) for win in windows]
        requests = [(w, start, end, first_pos) for w, win in enumerate(windows)
                    for start, end, first_pos in segments_for_mode(win, mode)]
        for batch in length_batches([end - start for _, start, end, _ in requests]):
            hidden = self.batch_hidden_states(
                [(windows[w].tokens[s:e], p) for w, s, e, p in (requests[i] for i in batch)])
            for row, i in enumerate(batch):
                w, start, end, _ = requests[i]
                ids, logprobs = out[w]
                h = hidden[row, :end - start]
                if windows[w].target_mask is not None:
                    # a conversation: the top-k pass only for the rows that get a target
                    rows = np.flatnonzero(needed_rows(windows[w], mode)[start:end])
                    sub_ids, sub_lps = empty_targets(len(rows), k)
                    chunked_topk(h[torch.as_tensor(rows, device=h.device)], self.head, k,
                                 chunk_elements=self.cfg.chunk_elements, out_ids=sub_ids,
                                 out_logprobs=sub_lps)
                    ids[start + rows], logprobs[start + rows] = sub_ids, sub_lps
                    continue
                chunked_topk(h, self.head, k, chunk_elements=self.cfg.chunk_elements,
                             out_ids=ids[start:end], out_logprobs=logprobs[start:end])
        return [finish_targets(win, mode, ids, logprobs)
                for win, (ids, logprobs) in zip(windows, out)]

    def close(self) -> None:
        del self.model, self.backbone, self.weight, self.head
