"""The paper's positional probe (section 4), for any Llama-family HF causal LM.

Input: one block = BOS + (n-2) content tokens + EOS, repeated R times (default n = 2,048, R = 64:
131,072 tokens). The analysed row of repeat r is the last content token (block index n-2, global
position r*n + n-2), which has the most context inside its document.

Packing modes (the same three a teacher dump can use):
- `document-global` (the paper's): document mask, positions counted over the whole window.
  Computed exactly by running each block as its own sequence with position_ids r*n .. r*n+n-1:
  with a document mask no token sees another block, so this is the same function as one masked
  forward, and memory is O(batch * n) instead of an N x N mask. Blocks go through in batches.
- `document`: document mask, positions restart at 0 in every block (all repeats identical inputs:
  any difference is a bug or nondeterminism; it is the zero line).
- `causal`: the whole window with attention crossing blocks, global positions: one forward
  (SDPA's causal kernel, no dense mask tensor) up to 16,384 tokens, beyond that query chunks over
  a KV cache so that no layer's score matrix exceeds 2 GiB. Repeat r then also *sees* repeats
  0..r-1, so its drift is semantic, not positional.

Recorded at the analysed rows (hooks in capture.py): embeddings, pre-/post-RoPE queries per layer,
every layer's output, final hidden state, full-vocabulary log-probs. Over all rows of every block
(computed block by block from final hidden states, so at most n x V logits exist at a time):

    KL_r = mean_t KL(p_0[t] || p_r[t]),  t over the block's rows except the EOS row,

the teacher-side quantity that matters for distillation: with a pure-RoPE model under a document
mask, exact arithmetic gives KL_r = 0 in `document-global` mode, so what it measures is rounding of
large rotation angles in the given dtype plus any absolute-position feature of the model.

Known limit: Llama 4's NoPE-layer attention temperature and chunked attention follow the token's
index in the forward call, not position_ids, so `document-global` by blocks does not reproduce
them; use `causal` for such models or read their numbers with that in mind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from kdcache.evaluate.capture import ActivationRecorder, find_decoder
from kdcache.evaluate.models import (EvalError, LoadedModel, head_dim, load_model, rope_theta,
                                     special_ids, torch_dtype)
from kdcache.formats.packing import PACKING_MODES

PROBE_MODES = tuple(reversed(PACKING_MODES))  # the paper's document-global first

# Built-in block text (our own words), in the spirit of the paper's appendix example.
EXAMPLE_TEXT = (
    "Eating cereal for breakfast has become a habit in many homes. Most people eat it at least "
    "once a day, and the reason is simple: it is quick, it tastes good, and it keeps well. What "
    "fewer people know is how much the grains themselves bring to the table. Whole oats, wheat and "
    "barley carry fibre that slows digestion, minerals such as iron and magnesium, and vitamins "
    "that many diets lack. Children who eat a warm bowl in the morning tend to concentrate better "
    "at school, and adults who start the day with whole grains snack less before lunch. Below are "
    "some of the known benefits of a cereal breakfast, and a few reasons why you and your family "
    "might want to make it part of your routine. "
)


@dataclass
class ProbeConfig:
    block_tokens: int = 2048
    repeats: int = 64
    modes: tuple[str, ...] = PROBE_MODES
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    batch_blocks: int = 4  # blocks per forward in document modes
    query_layer: int = 0  # layer whose query states get the single-element / cosine plots
    element: int | None = None  # flat index into that layer's query vector; None: auto
    top_k: int = 10
    capture_queries: bool = True
    kl_chunk_rows: int = 512  # rows per lm_head chunk when computing KL over a block
    causal_chunk_tokens: int | None = None  # None: auto (see causal_chunk_tokens())
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.block_tokens < 3:
            raise EvalError(f"block must hold BOS, at least one content token and EOS; "
                            f"got --block {self.block_tokens}")
        if self.repeats < 2:
            raise EvalError(f"need at least 2 repeats to compare against repeat 0; got {self.repeats}")
        for mode in self.modes:
            if mode not in PROBE_MODES:
                raise EvalError(f"unknown packing mode {mode!r}; choose from {', '.join(PROBE_MODES)}")

    @property
    def window(self) -> int:
        return self.block_tokens * self.repeats


def build_block(tokenizer: Any, path: str, n: int, text: str | None = None) -> list[int]:
    """BOS + exactly n-2 content tokens (the text's tokens, repeated as needed) + EOS."""
    bos, eos = special_ids(tokenizer, path)
    content = tokenizer(text or EXAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    content = [t for t in content if t not in (bos, eos)]
    if not content:
        raise EvalError("probe text tokenizes to nothing")
    content = (content * (1 + (n - 2) // len(content)))[: n - 2]
    return [bos, *content, eos]


def logprobs_from_hidden(model: Any, hidden) -> Any:
    """Full-vocabulary log-probs (float32) from final hidden states [..., d], as the CausalLM
    head computes them (lm_head in the model's dtype, Gemma-style soft-capping if configured)."""
    import torch

    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits.float(), dim=-1)


def _block_kl(model: Any, ref_hidden, hidden, rows: int, chunk: int):
    """KL(p_ref || p) for rows [0, rows) of a block: (mean, max, KL at the last row)."""
    total, worst, last = 0.0, 0.0, 0.0
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        lp_ref = logprobs_from_hidden(model, ref_hidden[start:stop])
        lp = logprobs_from_hidden(model, hidden[start:stop])
        kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1).clamp_min(0)
        total += float(kl.sum())
        worst = max(worst, float(kl.max()))
        if stop == rows:
            last = float(kl[-1])
    return total / rows, worst, last


@dataclass
class RunResult:
    """One packing mode x dtype: per-repeat curves (index r = repeat r, r = 0 is the reference)."""

    mode: str
    dtype: str
    positions: list[int]
    kl_mean: list[float]
    kl_max: list[float]
    kl_last: list[float]
    layer_cosine: dict[str, list[float]]
    query_pre_cosine: dict[str, list[float]]
    query_post_cosine: dict[str, list[float]]
    captured: dict[str, Any] = field(default_factory=dict, repr=False)  # tensors [R, w]
    last_logprobs: Any = field(default=None, repr=False)  # [R, V]


def _cosine_to_first(x) -> list[float]:
    import torch

    return torch.nn.functional.cosine_similarity(x, x[:1].expand_as(x), dim=-1).tolist()


def run_mode(loaded: LoadedModel, block: list[int], cfg: ProbeConfig, mode: str, dtype: str,
             progress: Callable[[int], None] | None = None, compute_kl: bool = True,
             ) -> RunResult:
    """Forward the repeated block in one packing mode; record and compare against repeat 0."""
    import torch

    model, n, repeats = loaded.model, cfg.block_tokens, cfg.repeats
    decoder = find_decoder(model)
    block_ids = torch.tensor(block, dtype=torch.long, device=cfg.device)
    kl_mean, kl_max, kl_last = [0.0], [0.0], [0.0]
    finals, reference = [], None
    recorder = ActivationRecorder(model, capture_queries=cfg.capture_queries)

    def consume(hidden_blocks) -> None:  # hidden_blocks [b, n, d], in repeat order
        nonlocal reference
        for hidden in hidden_blocks:
            finals.append(hidden[n - 2].float().cpu())
            if reference is None:
                reference = hidden.clone()
                continue
            if not compute_kl:
                continue
            mean, worst, last = _block_kl(model, reference, hidden, n - 1, cfg.kl_chunk_rows)
            kl_mean.append(mean)
            kl_max.append(worst)
            kl_last.append(last)

    with torch.no_grad(), recorder:
        if mode == "causal":
            records = _causal_forward(model, recorder, block_ids, cfg, consume, progress)
        else:
            recorder.select(torch.tensor([n - 2], device=cfg.device))
            for start in range(0, repeats, cfg.batch_blocks):
                reps = torch.arange(start, min(repeats, start + cfg.batch_blocks))
                offsets = reps * n if mode == "document-global" else torch.zeros_like(reps)
                positions = offsets[:, None] + torch.arange(n)[None]
                ids = block_ids[None].expand(len(reps), n)
                hidden = decoder(input_ids=ids, position_ids=positions.to(cfg.device),
                                 use_cache=False).last_hidden_state
                consume(hidden)
                if progress:
                    progress(len(reps))
            records = {k: v[:, 0] for k, v in recorder.pop().items()}  # [R, w]
    final = torch.stack(finals)
    records["final"] = final
    with torch.no_grad():
        last_logprobs = logprobs_from_hidden(model, final.to(cfg.device, model.dtype)).cpu()
    layers = sorted(int(k.split(".")[1]) for k in records if k.startswith("layer."))
    q_layers = sorted(int(k.split(".")[1]) for k in records if k.startswith("q_pre."))
    return RunResult(
        mode=mode, dtype=dtype,
        positions=[r * (n if mode != "document" else 0) + n - 2 for r in range(repeats)],
        kl_mean=kl_mean, kl_max=kl_max, kl_last=kl_last,
        layer_cosine={"embeddings": _cosine_to_first(records["embeddings"]),
                      **{str(i): _cosine_to_first(records[f"layer.{i}"]) for i in layers},
                      "final": _cosine_to_first(final)},
        query_pre_cosine={str(i): _cosine_to_first(records[f"q_pre.{i}"]) for i in q_layers},
        query_post_cosine={str(i): _cosine_to_first(records[f"q_post.{i}"]) for i in q_layers},
        captured=records, last_logprobs=last_logprobs)


def causal_chunk_tokens(model: Any, cfg: ProbeConfig) -> int:
    """Query tokens per forward in `causal` mode. Up to 16,384 tokens: the whole window in one
    call (SDPA's causal kernel). Longer: chunks sized so that one layer's attention scores
    (chunk x window x heads, fp32) stay under 2 GiB, because SDPA falls back to its math kernel
    (a dense score matrix) for float32 and for grouped-query attention on some backends; seen on
    an H200 at 131,072 tokens in float32: a 1,280 GiB allocation. bfloat16/float16 on CUDA run
    the whole window in one call (flash kernel: 8.4 GiB peak for the paper-sized student)."""
    import torch

    if cfg.causal_chunk_tokens:
        return cfg.causal_chunk_tokens
    window = cfg.window
    flash = str(cfg.device).startswith("cuda") and model.dtype != torch.float32
    if window <= 16384 or flash:  # bf16/fp16 on CUDA: flash kernel, seen at 131k on an H200
        return window
    heads = model.config.num_attention_heads
    return max(64, min(window, (2 << 30) // (window * heads * 4)) // 64 * 64)


def _causal_forward(model: Any, recorder: Any, block_ids, cfg: ProbeConfig, consume,
                    progress) -> dict:
    """The whole window with attention across blocks, in query chunks over a KV cache when long.
    Calls `consume` with each completed block's final hidden states; returns records [R, w]."""
    import torch

    n, repeats, window = cfg.block_tokens, cfg.repeats, cfg.window
    decoder = find_decoder(model)
    ids = block_ids.repeat(repeats)[None]
    positions = torch.arange(window, device=cfg.device)[None]
    analysed = torch.arange(repeats, device=cfg.device) * n + (n - 2)
    chunk = causal_chunk_tokens(model, cfg)
    cache = None
    if chunk < window:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    parts: dict[str, list] = {}
    pending = []
    pending_tokens = 0
    for start in range(0, window, chunk):
        stop = min(window, start + chunk)
        rows = analysed[(analysed >= start) & (analysed < stop)] - start
        recorder.select(rows)
        hidden = decoder(input_ids=ids[:, start:stop], position_ids=positions[:, start:stop],
                         past_key_values=cache, use_cache=cache is not None,
                         ).last_hidden_state[0]
        for key, value in recorder.pop().items():
            parts.setdefault(key, []).append(value[0])
        pending.append(hidden)
        pending_tokens += stop - start
        if pending_tokens >= n:
            merged = torch.cat(pending)
            full = pending_tokens // n
            consume(merged[: full * n].view(full, n, -1))
            pending, pending_tokens = [merged[full * n:]], pending_tokens - full * n
            if progress:
                progress(full)
    return {key: torch.cat(values) for key, values in parts.items()}


def auto_element(loaded: LoadedModel, cfg: ProbeConfig) -> int:
    """A query element whose RoPE pair turns about 4 times over the window, so the sampled
    oscillation (one sample every n tokens) is visible rather than aliased."""
    hd, theta = head_dim(loaded.config), rope_theta(loaded.config) or 10000.0
    target = cfg.window / 4
    wavelengths = [2 * math.pi * theta ** (2 * i / hd) for i in range(hd // 2)]
    return min(range(hd // 2), key=lambda i: abs(math.log(wavelengths[i] / target)))


def top_tokens_table(run: RunResult, tokenizer: Any, k: int) -> dict:
    """Repeat 0's top-k tokens at the analysed row, their rank and probability at every repeat."""
    import torch

    lp = run.last_logprobs  # [R, V]
    top = torch.topk(lp[0], k).indices
    ranks = (lp[:, None, :] > lp[:, top][:, :, None]).sum(-1)  # [R, k]: tokens strictly above
    return {"token_ids": top.tolist(),
            "tokens": [tokenizer.decode([int(t)]) for t in top],
            "rank": ranks.tolist(),
            "prob": lp[:, top].exp().tolist(),
            "same_top_k_set": [bool(set(torch.topk(row, k).indices.tolist()) == set(top.tolist()))
                               for row in lp]}


def run_probe(model_path: str, cfg: ProbeConfig, text: str | None = None,
              show_progress: bool = False) -> tuple[dict, dict]:
    """All modes x dtypes. Returns (JSON-ready summary, data for the plots)."""
    from tqdm.auto import tqdm

    runs: list[RunResult] = []
    primary = None
    bar = tqdm(total=len(cfg.modes) * len(cfg.dtypes) * cfg.repeats, unit="block",
               disable=not show_progress, desc="probe")
    for dtype in cfg.dtypes:
        torch_dtype(dtype)
        if dtype == "float16" and not _float16_works():
            bar.update(len(cfg.modes) * cfg.repeats)
            continue
        loaded = load_model(model_path, dtype=dtype, device=cfg.device)
        block = build_block(loaded.tokenizer, model_path, cfg.block_tokens, text)
        max_pos = getattr(loaded.config, "max_position_embeddings", None)
        if max_pos and cfg.window > max_pos and "document-global" in cfg.modes:
            bar.write(f"note: window {cfg.window} exceeds {model_path}'s "
                      f"max_position_embeddings {max_pos}")
        for mode in cfg.modes:
            bar.set_postfix_str(f"{mode} {dtype}")
            runs.append(run_mode(loaded, block, cfg, mode, dtype, progress=bar.update))
        if primary is None:
            primary = loaded
    bar.close()
    first = runs[0]
    hd = head_dim(primary.config)
    pair = cfg.element if cfg.element is not None else auto_element(primary, cfg)
    summary = {
        "model": model_path,
        "config": {k: v for k, v in vars(cfg).items() if k != "device"} | {"window": cfg.window},
        "rope_theta": rope_theta(primary.config),
        "head_dim": hd,
        "num_layers": primary.config.num_hidden_layers,
        "block_token_ids": block,
        "method": {"document-global": "each block run separately with position_ids offset by "
                                      "r*n (exact for a document mask; no N x N mask)",
                   "document": "each block separately, positions from 0",
                   "causal": "one forward over the window, SDPA causal kernel"},
        "dtypes_skipped": [d for d in cfg.dtypes if d not in {r.dtype for r in runs}],
        "runs": [{k: v for k, v in vars(r).items() if k not in ("captured", "last_logprobs")}
                 for r in runs],
    }
    element = {}
    q_key = f"q_pre.{cfg.query_layer}"
    if q_key in first.captured:
        pre, post = first.captured[q_key], first.captured[f"q_post.{cfg.query_layer}"]
        element = {"layer": cfg.query_layer, "index": pair,
                   "head": pair // hd, "pair": (pair % hd) % (hd // 2),
                   "pre_distance": (pre[:, pair] - pre[0, pair]).abs().tolist(),
                   "post_distance": (post[:, pair] - post[0, pair]).abs().tolist()}
    summary["primary"] = {"mode": first.mode, "dtype": first.dtype, "query_element": element,
                          "top_tokens": top_tokens_table(first, primary.tokenizer, cfg.top_k)}
    return summary, {"runs": runs}


def _float16_works() -> bool:
    """Whether this machine runs float16 matmuls (CPU builds without fp16 GEMM raise)."""
    import torch

    try:
        x = torch.ones(4, 4, dtype=torch.float16)
        return bool(torch.isfinite(x @ x).all())
    except RuntimeError:
        return False
