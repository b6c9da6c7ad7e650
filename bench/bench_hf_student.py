"""Training-step speed of transformers students: kdcache's path vs the usual ways, side by side.

Every cell is one (model, shape, variant): full training steps (forward, backward, gradient
clipping, fused AdamW; fp32 master weights under bf16 autocast) timed with CUDA events after
warm-up; peak memory is torch.cuda.max_memory_allocated over the timed steps (weights, optimizer
state and activations included). After each cell one JSON line is appended to
OUT_DIR/bench_hf_student.jsonl and the whole result rewritten to OUT_DIR/bench_hf_student.json,
so a call cut short keeps the finished cells. A cell that fails (CUDA out of memory included)
records its error, frees its memory and the next cell runs. No cell starts when its estimated
cost would pass --budget-s (seconds since start); it is recorded as skipped.

Variants (the same transformers model object and step in each):
  hf            attn_implementation="sdpa", model(input_ids, labels=...) (full logits + CE); at
                131k the documents are given the usual transformers way, as position ids that
                restart per document (transformers builds the dense document mask itself). At
                16k an out-of-memory run is retried with gradient checkpointing (recorded).
  liger         the same decoder, then Liger's fused linear cross-entropy on its final hidden
                states and lm_head weight (bf16, as ours): no full logits.
  kdcache       kdcache.student_train.hf_student.HFStudent: the same model, each decoder layer
                torch.compile'd, attention through the model's own interface (SDPA's causal kernel
                for the one-document 16k row, FlexAttention with a document block mask at 131k),
                the fused sparse-KL loss (KD + CE, alpha 0.5, top-64 targets) on the final hidden
                states and the model's own lm_head. At 131k the first layers are checkpointed
                (--ckpt131k; `auto` sizes it from the 16k cell's memory); retried with all layers
                on out-of-memory.
  kdcache-flex  kdcache with FlexAttention forced for the causal row (a causal BlockMask).

Shapes: `16k` (one 16,384-token causal row) and `131k` (one 131,072-token row of packed short
documents, ~600 tokens each: document mask, global positions for kdcache). Models (random init):
qwen3-0.6b (V = 151,936, tied) and llama-3.2-1b (V = 128,256, tied, llama3 RoPE scaling).

MFU = model FLOPs / (seconds x the bf16 matmul rate measured in the same run), model FLOPs =
6 x (parameters without the input embedding, plus lm_head) x tokens + attention FLOPs over the
unmasked 128 x 128 blocks only (3 x 4 x heads x head_dim x 128^2 per block and layer).
Recomputation (checkpointed layers) is not model work and is not counted.

GPU (one call; zstandard and Liger, when not installed, from the wheels carried in .whl/,
unpacked onto sys.path by the script):
  python3 bench/bench_hf_student.py --out-dir $OUT
Where a step's time goes (GPU): --profile adds one profiled step per cell (device time by kernel
category, the busiest kernels, idle time by gap size and the largest gaps, host waits on the
device); --attention times each SDPA backend's causal forward + backward (and FlexAttention's) on
each model's 16k shape, on heads-major and [B, T, H, D] memory and with repeated key/value heads;
--sdpa-backend forces one backend for every cell; --compile-mode passes a torch.compile mode to
kdcache's layers. One cell's own variant: `MODEL/SHAPE/VARIANT@sdpa=flash_attention`,
`@compile=max-autotune-no-cudagraphs`, `@attn=kdcache_flex` (options combine; the key names the
cell in the results). Compiled layers are reset between cells: their guards do not see every
option.
CPU (`make bench`): tiny Qwen3 and Llama, 256 and 2,048 tokens, to show every cell works (Liger
only under TRITON_INTERPRET=1); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import zipfile

T_START = time.time()
# Less fragmentation after a cell ran out of memory, and more room at 131k (before CUDA starts).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
WHEELS = os.path.join(ROOT, ".whl")  # carried wheels: the GPU machine has no network


def import_or_unpack(module: str, wheel_prefix: str):
    """Import `module`, else unpack its wheel from .whl/ (the one for this Python, or a pure
    one) onto sys.path and import it from there."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
        wheels = [w for w in sorted(glob.glob(os.path.join(WHEELS, wheel_prefix + "-*.whl")))
                  if tag in os.path.basename(w) or "py3-none-any" in w]
        if not wheels:
            raise RuntimeError(f"{module} not importable and no {wheel_prefix} wheel for "
                               f"{tag} in {WHEELS}") from None
        target = tempfile.mkdtemp(prefix=f"whl-{wheel_prefix}-")
        with zipfile.ZipFile(wheels[-1]) as wheel:
            wheel.extractall(target)
        sys.path.insert(0, target)
        return importlib.import_module(module)


import_or_unpack("zstandard", "zstandard")  # kdcache's codecs import it at the top

from bench_train import (BLOCK, attention_blocks, doc_lengths, make_batch,  # noqa: E402
                         matmul_tflops, seg_from_lengths, timed_steps)

from kdcache.student_train.hf_student import FLEX_IMPL, HFStudent  # noqa: E402
from kdcache.student_train.module import LossConfig, distillation_loss  # noqa: E402

MODELS = ("qwen3-0.6b", "llama-3.2-1b")
# Most important first: the 16k comparison and 131k kdcache of the first model, then kdcache on
# the second model (its 131k cell sized from its 16k cell) and its baselines, then the baselines
# at 131k (expected to fail), then the FlexAttention causal variant.
DEFAULT_CELLS = (
    "qwen3-0.6b/16k/kdcache", "qwen3-0.6b/16k/hf", "qwen3-0.6b/16k/liger",
    "qwen3-0.6b/131k/kdcache",
    "llama-3.2-1b/16k/kdcache", "llama-3.2-1b/131k/kdcache",
    "llama-3.2-1b/16k/hf", "llama-3.2-1b/16k/liger",
    "qwen3-0.6b/131k/liger", "llama-3.2-1b/131k/liger",
    "qwen3-0.6b/131k/hf", "llama-3.2-1b/131k/hf", "qwen3-0.6b/16k/kdcache-flex",
)
# Seconds a cell is expected to take on the H200 (compilation included): a cell starts only if
# it fits in what is left of --budget-s.
EST_S = {("16k", "kdcache"): 50, ("16k", "kdcache-flex"): 70, ("16k", "hf"): 15,
         ("16k", "liger"): 15, ("131k", "kdcache"): 80, ("131k", "hf"): 40,
         ("131k", "liger"): 40, ("131k", "kdcache-flex"): 80}
CKPT_131K_FALLBACK = {"qwen3-0.6b": 12, "llama-3.2-1b": 9}
VARIANTS = ("kdcache", "kdcache-flex", "hf", "liger")


def model_config(name: str, cuda: bool):
    import transformers as tf

    if name == "qwen3-0.6b":
        if not cuda:  # CPU smoke size
            return tf.Qwen3Config(vocab_size=4096, hidden_size=128, intermediate_size=256,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                                  max_position_embeddings=16_384)
        return tf.Qwen3Config(vocab_size=151_936, hidden_size=1024, intermediate_size=3072,
                              num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                              head_dim=128, rms_norm_eps=1e-6, tie_word_embeddings=True,
                              max_position_embeddings=131_072,
                              rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if name == "llama-3.2-1b":
        rope = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 32.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
        if not cuda:
            return tf.LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=512,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                                  max_position_embeddings=16_384, rope_parameters=rope)
        return tf.LlamaConfig(vocab_size=128_256, hidden_size=2048, intermediate_size=8192,
                              num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                              head_dim=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
                              max_position_embeddings=131_072, rope_parameters=rope)
    raise ValueError(f"unknown model {name!r}; known: {MODELS}")


def build_model(config, device: str):
    from transformers import AutoModelForCausalLM

    config._attn_implementation = "sdpa"
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.train()
    return model


def flop_params(model) -> int:
    """Parameters doing matmul work per token: all but the input embedding, the lm_head always."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    return total - embed.numel() + (head.numel() if head is embed else 0)


def optimizer_for(model, device: str):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                             fused=True if device == "cuda" else None)


def reset_positions(seg: torch.Tensor) -> torch.Tensor:
    """Position ids restarting at each document: how transformers is told about packing."""
    index = torch.arange(seg.shape[1], device=seg.device).expand_as(seg)
    change = torch.ones_like(seg, dtype=torch.bool)
    change[:, 1:] = seg[:, 1:] != seg[:, :-1]
    starts = torch.where(change, index, torch.zeros_like(index)).cummax(1).values
    return index - starts


def load_liger():
    """Liger's fused linear CE, installed or from the carried pure-Python wheel."""
    import_or_unpack("liger_kernel", "liger_kernel")
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss


def kernel_category(name: str) -> str:
    """A CUDA kernel's kind, from its name (cuBLAS / cuDNN / Triton / PyTorch naming)."""
    n = name.lower()
    if "sparse_kl" in n:
        return "sparse_kl_kernel"
    if n.startswith("triton_tem") or "flex" in n:
        return "flex_or_template"
    if any(s in n for s in ("fmha", "flash", "cudnn", "attn", "attention", "sdpa")):
        return "attention"
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "wgmma")):
        return "matmul"
    if "adam" in n or "multi_tensor" in n or "foreach" in n:
        return "optimizer_and_clip"
    if n.startswith("triton_"):
        return "inductor_fused"
    if "embedding" in n or "index" in n or "scatter" in n or "gather" in n:
        return "embedding_index"
    if "reduce" in n or "norm" in n or "softmax" in n:
        return "reduction"
    if any(s in n for s in ("copy", "elementwise", "vectorized", "fill", "cast")):
        return "elementwise"
    return "other"


def profile_step(step) -> dict:
    """One step under torch.profiler: device seconds per kernel category, the 15 busiest
    kernels, how much of the step's span the GPU sat idle (by gap size, and the largest gaps
    with the kernels around them), and the host's waits on the device."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.events()
    # user annotations (e.g. "Optimizer.step#AdamW.step") are ranges on the device timeline,
    # not kernels: counting them would double the time they cover and hide its gaps
    kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")
               and not getattr(e, "is_user_annotation", False)
               and e.time_range.end > e.time_range.start]
    if not kernels:
        return {"error": "no CUDA kernel events"}
    by_cat: dict[str, float] = {}
    by_name: dict[str, list] = {}
    for e in kernels:
        us = e.time_range.end - e.time_range.start
        cat = kernel_category(e.name)
        by_cat[cat] = by_cat.get(cat, 0.0) + us
        item = by_name.setdefault(e.name, [0.0, 0, cat])
        item[0] += us
        item[1] += 1
    kernels.sort(key=lambda e: e.time_range.start)
    t0 = kernels[0].time_range.start
    busy, gaps = 0.0, []
    cur_s, cur_e, cur_name = t0, kernels[0].time_range.end, kernels[0].name
    for e in kernels[1:]:
        s, end = e.time_range.start, e.time_range.end
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append((s - cur_e, cur_e - t0, cur_name, e.name))
            cur_s, cur_e = s, end
        elif end > cur_e:
            cur_e = end
        if end >= cur_e:
            cur_name = e.name
    busy += cur_e - cur_s
    span = cur_e - t0
    bins = {"under_10us": 0.0, "10_to_100us": 0.0, "100us_to_1ms": 0.0, "over_1ms": 0.0}
    for g, *_ in gaps:
        key = ("under_10us" if g < 10 else "10_to_100us" if g < 100 else
               "100us_to_1ms" if g < 1000 else "over_1ms")
        bins[key] += g / 1e6
    waits = [e for e in events if not str(getattr(e, "device_type", "")).endswith("CUDA")
             and any(w in e.name for w in ("Synchronize", "cudaMemcpy", "EventSynchronize"))]
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:15]
    return {"span_s": span / 1e6, "busy_s": busy / 1e6, "idle_s": (span - busy) / 1e6,
            "kernels": len(kernels), "gaps": len(gaps),
            "idle_by_gap_s": {k: round(v, 5) for k, v in bins.items()},
            "largest_gaps": [[round(g / 1e3, 3), round(at / 1e3, 2), a[:60], b[:60]]
                             for g, at, a, b in sorted(gaps, reverse=True)[:8]],
            "host_waits": {"count": len(waits),
                           "s": round(sum(e.time_range.end - e.time_range.start
                                          for e in waits) / 1e6, 5)},
            "by_category_s": {c: round(v / 1e6, 5) for c, v in
                              sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "top_kernels": [[n[:120], round(v[0] / 1e6, 5), v[1], v[2]] for n, v in top]}


def attention_bench(config, length: int) -> dict:
    """Causal self-attention forward and forward + backward on one model's shape (bf16, GQA as
    transformers calls SDPA), per SDPA backend and FlexAttention: ms and TFLOP/s (the causal
    half counted: forward 2 x 2 x S^2/2 x heads x head_dim, backward 2.5x that). Heads-major
    tensors ([B, H, T, D] in memory) unless the name ends in `_bthd`: the [B, T, H, D] memory
    that a model's projections give when viewed and transposed to heads."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    h, kvh, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    gen = torch.Generator(device="cuda").manual_seed(0)

    def tensor(heads: int, tokens_major: bool, grad: bool = True) -> torch.Tensor:
        shape = (1, length, heads, d) if tokens_major else (1, heads, length, d)
        t = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
        t.requires_grad_(grad)
        return t.transpose(1, 2) if tokens_major else t

    def tensors(tokens_major: bool):
        return [tensor(n, tokens_major) for n in (h, kvh, kvh)]

    fwd_flops = 4 * length * length / 2 * h * d
    out: dict = {}

    def time_ms(fn) -> float:
        return 1e3 * timed_steps(fn, "cuda", 1, 5)[0]

    def record(name: str, forward) -> None:
        tokens_major = name.endswith("_bthd")
        q, k, v = tensors(tokens_major)
        grad = tensor(h, tokens_major, grad=False)
        try:
            with torch.no_grad():
                f_ms = time_ms(lambda: forward(q, k, v))
            fb_ms = time_ms(lambda: forward(q, k, v).backward(grad))
            out[name] = {"fwd_ms": round(f_ms, 3), "fwd_bwd_ms": round(fb_ms, 3),
                         "fwd_tflops": round(fwd_flops / f_ms / 1e9, 1),
                         "fwd_bwd_tflops": round(3.5 * fwd_flops / fb_ms / 1e9, 1)}
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}

    for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        def forward(q, k, v, backend=backend):
            with sdpa_kernel(getattr(SDPBackend, backend)):
                return sdpa(q, k, v, is_causal=True, enable_gqa=True)
        record(backend.lower(), forward)
        if backend != "EFFICIENT_ATTENTION":
            record(backend.lower() + "_bthd", forward)

        def forward_repeated(q, k, v, backend=backend):  # GQA as plain multi-head attention
            with sdpa_kernel(getattr(SDPBackend, backend)):
                k, v = (t.repeat_interleave(h // kvh, dim=1) for t in (k, v))
                return sdpa(q, k, v, is_causal=True)
        if backend != "EFFICIENT_ATTENTION" and h != kvh:
            record(backend.lower() + "_repeat_kv_bthd", forward_repeated)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        mask = create_block_mask(lambda b, hh, qi, ki: qi >= ki, None, None, length, length)
        flex = torch.compile(flex_attention)
        record("flex", lambda q, k, v: flex(q, k, v, block_mask=mask, enable_gqa=True))
    except Exception as exc:
        out["flex"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return out


def run_cell(variant: str, config, seg_rows: np.ndarray, *, device: str, k: int, ckpt: int,
             warmup: int, steps: int, liger_cls=None, profile: bool = False,
             sdpa_backend: str | None = None, compile_mode: str | None = None,
             attn: str | None = None) -> dict:
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    model = build_model(config, device)
    optimizer = optimizer_for(model, device)
    batch = make_batch(config, seg_rows, k, device)
    packed = not bool((batch["seg_ids"] == 0).all())
    entry: dict = {}
    if variant == "hf":
        tokens = batch["tokens"]
        kwargs = {}
        if packed:  # the usual transformers way: positions restarting per document
            kwargs["position_ids"] = reset_positions(batch["seg_ids"])
            labels = tokens.clone()
            labels[:, 1:][batch["seg_ids"][:, 1:] != batch["seg_ids"][:, :-1]] = -100
        else:
            labels = tokens
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            entry["gradient_checkpointing"] = True

        def loss_fn():
            with amp:
                return model(input_ids=tokens, labels=labels, **kwargs).loss
    elif variant == "liger":
        flce = liger_cls()
        tokens = batch["tokens"]
        kwargs = {"position_ids": reset_positions(batch["seg_ids"])} if packed else {}
        labels = batch["labels"].reshape(-1)  # next token, -100 at each document's end
        decoder = model.model
        dt = torch.bfloat16 if device == "cuda" else torch.float32

        def loss_fn():
            with amp:
                hidden = decoder(input_ids=tokens, use_cache=False, **kwargs).last_hidden_state
            d = hidden.shape[-1]
            return flce(model.lm_head.weight.to(dt), hidden.reshape(-1, d).to(dt), labels)
    elif variant in ("kdcache", "kdcache-flex"):
        student = HFStudent(model, attention="document" if packed else "causal",
                            positions="global")
        if variant == "kdcache-flex":
            student.attn_implementation = FLEX_IMPL
        if attn:
            student.attn_implementation = attn
            entry["attn_forced"] = attn
        student.set_checkpoint_layers(ckpt)
        if device == "cuda":
            student.compile_blocks(**({"mode": compile_mode} if compile_mode else {}))
            entry["compile_mode"] = compile_mode
        loss_cfg = LossConfig(alpha=0.5)
        entry["ckpt_layers"] = ckpt
        loss_dtype = torch.bfloat16 if device == "cuda" else None

        def loss_fn():
            with amp:
                out = distillation_loss(student, batch, loss_cfg, loss_dtype)["loss"]
            entry["attention"] = student.config._attn_implementation
            return out
    else:
        raise ValueError(f"unknown variant {variant!r}")
    losses = []
    if sdpa_backend:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        chosen = getattr(SDPBackend, sdpa_backend.upper())
        inner_loss_fn = loss_fn
        entry["sdpa_backend_forced"] = sdpa_backend

        def loss_fn():
            with sdpa_kernel(chosen):
                return inner_loss_fn()

    def step():
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    warmup_s: list[float] = []
    seconds, peak = timed_steps(step, device, warmup, steps, warmup_s)
    n_params = sum(p.numel() for p in model.parameters())
    entry.update(seconds=seconds, peak_gib=peak, warmup_s=warmup_s, steps=steps,
                 loss_first_last=[float(losses[0]), float(losses[-1])],
                 flop_params=flop_params(model), params=n_params)
    if profile and device == "cuda":
        try:
            entry["profile"] = profile_step(step)
        except Exception as exc:  # informational: the timing above stands
            entry["profile"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    if device == "cuda":
        # weights + optimizer state held between steps; the grads (fp32) come on top at the peak
        entry["static_gib"] = torch.cuda.memory_allocated() / 2**30
        entry["grads_gib"] = 4 * n_params / 2**30
        entry["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return entry


def auto_ckpt(measured: dict | None, config, tokens: int, total_gib: float) -> int | None:
    """Fewest checkpointed layers at `tokens` that fit, from the kdcache 16k cell's peak: its
    activations scale with tokens, a checkpointed layer keeps only its fp32 input (plus one
    layer's activations live again in its backward)."""
    if not measured or "peak_gib" not in measured or measured.get("ckpt_layers"):
        return None
    layers = int(config.num_hidden_layers)
    fixed = measured["static_gib"] + measured["grads_gib"]
    act = (measured["peak_gib"] - fixed) * tokens / measured["tokens"] / layers  # per layer
    kept = tokens * config.hidden_size * 4 / 2**30
    for n in range(layers + 1):
        if fixed + (layers - n) * act + n * kept + act + 8.0 <= total_gib:
            return n
    return layers


def sdpa_backend(config, device: str, length: int) -> str:
    """The kernel SDPA picks for this model's causal training attention (what `hf` and the
    one-document `kdcache` rows run), as transformers calls it (GQA without repeat_kv)."""
    from torch.nn.attention import SDPBackend

    try:
        shape = (1, config.num_attention_heads, length, config.head_dim)
        kv_shape = (1, config.num_key_value_heads, length, config.head_dim)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        q = torch.empty(shape, device=device, dtype=dtype, requires_grad=True)
        k = torch.empty(kv_shape, device=device, dtype=dtype, requires_grad=True)
        choice = int(torch._fused_sdp_choice(q, k, k, is_causal=True, enable_gqa=True))
        names = {int(v): n for n, v in SDPBackend.__members__.items()}
        return names.get(choice, str(choice))
    except Exception as exc:  # informational only
        return f"unknown ({type(exc).__name__}: {str(exc)[:100]})"


def shape_rows(shape: str, length: int, rng) -> np.ndarray:
    if shape == "16k":
        return np.zeros((1, length), dtype=np.int64)
    if shape == "131k":
        return seg_from_lengths(doc_lengths(rng, 8 * length))[None]
    raise ValueError(f"unknown shape {shape!r}")


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def add_rates(entry: dict, config, seg_rows: np.ndarray, tflops: float | None) -> None:
    tokens = int(seg_rows.size)
    blocks = attention_blocks(seg_rows)
    attn = (3 * 4 * config.num_attention_heads * config.head_dim * BLOCK * BLOCK * blocks
            * config.num_hidden_layers)
    flops = 6 * entry["flop_params"] * tokens + attn
    entry["tokens_per_s"] = tokens / entry["seconds"]
    entry["model_tflops"] = flops / entry["seconds"] / 1e12
    entry["mfu"] = entry["model_tflops"] / tflops if tflops else None
    entry["mfu_vs_989"] = entry["model_tflops"] / 989.0 if tflops else None


def compare(runs: dict, cuda: bool) -> dict:
    """Per model: kdcache at 16k against the faster baseline, and who ran at 131k."""
    summary = {}
    for model in MODELS:
        ours = runs.get(f"{model}/16k/kdcache", {})
        base = [(v, runs.get(f"{model}/16k/{v}", {})) for v in ("hf", "liger")]
        base = [(v, b) for v, b in base if "seconds" in b]
        item = {}
        if "seconds" in ours and base:
            name, best = min(base, key=lambda vb: vb[1]["seconds"])
            item["best_baseline_16k"] = name
            item["speedup_16k"] = best["seconds"] / ours["seconds"]
            if cuda:
                item["peak_ratio_16k_vs_that_baseline"] = ours["peak_gib"] / best["peak_gib"]
                item["peak_ratio_16k_vs_lowest_baseline"] = ours["peak_gib"] / min(
                    b["peak_gib"] for _, b in base)
        flex = runs.get(f"{model}/16k/kdcache-flex", {})
        if "seconds" in flex and base:
            item["speedup_16k_kdcache_flex"] = min(b["seconds"] for _, b in base) / flex["seconds"]
        for variant in ("kdcache", "hf", "liger"):
            cell = runs.get(f"{model}/131k/{variant}")
            if cell is not None:
                item[f"131k_{variant}"] = ("ran" if "seconds" in cell else
                                           cell.get("error") or cell.get("skipped"))
        if "mfu" in runs.get(f"{model}/131k/kdcache", {}):
            item["mfu_131k"] = runs[f"{model}/131k/kdcache"]["mfu"]
        if item:
            summary[model] = item
    return summary


class Cells:
    """Runs the cells in order with their retries; what they share: options, the result so far
    (the 131k checkpointing is sized from the 16k cell), the token rows, Liger once loaded."""

    def __init__(self, opts, cuda: bool, result: dict, ckpt_given: dict[str, int],
                 tflops: float | None) -> None:
        self.opts, self.cuda, self.result, self.ckpt_given = opts, cuda, result, ckpt_given
        self.tflops = tflops
        self.device = "cuda" if cuda else "cpu"
        self.total_gib = (torch.cuda.get_device_properties(0).total_memory / 2**30
                          if cuda else 0.0)
        self.rows_by_shape: dict[str, np.ndarray] = {}
        self.liger_cls, self.liger_error = None, None

    def liger(self):
        if self.liger_cls is None and self.liger_error is None:
            try:
                self.liger_cls = load_liger()
            except Exception as exc:  # reported in every Liger cell
                self.liger_error = f"Liger unavailable ({type(exc).__name__}): {str(exc)[:300]}"
        if self.liger_error or (not self.cuda and os.environ.get("TRITON_INTERPRET") != "1"):
            raise RuntimeError(self.liger_error or "Liger's Triton kernels need CUDA or "
                               "TRITON_INTERPRET=1")
        return self.liger_cls

    def left_s(self) -> float:
        return self.opts.budget_s - (time.time() - T_START)

    def attempt(self, variant: str, config, seg_rows, ckpt: int, warmup: int,
                steps: int, options: dict[str, str]) -> tuple[dict, bool]:
        """(entry, out_of_memory); the failed run's memory is freed before returning."""
        entry, oom = None, False
        try:
            liger_cls = self.liger() if variant == "liger" else None
            entry = run_cell(variant, config, seg_rows, device=self.device, k=self.opts.k,
                             ckpt=ckpt, warmup=warmup, steps=steps, liger_cls=liger_cls,
                             profile=self.opts.profile,
                             sdpa_backend=options.get("sdpa", self.opts.sdpa_backend),
                             compile_mode=options.get("compile", self.opts.compile_mode),
                             attn=options.get("attn"))
        except Exception as exc:  # keep timing the other cells; report what broke
            # cuBLAS / cuDNN workspaces report running out as a RuntimeError
            oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc)
            if oom:
                entry = {"error": f"out of memory: {str(exc)[:200]}", "ckpt_layers": ckpt}
            else:
                traceback.print_exc()
                entry = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        free()  # outside the except blocks: the failed run's frames are gone
        return entry, oom

    def run(self, model_name: str, shape: str, variant: str, ckpt_text: str,
            estimate: float, options: dict[str, str] | None = None) -> dict:
        """One cell: out of memory -> every layer checkpointed (kdcache; hf at 16k); another
        failure of kdcache at 16k -> FlexAttention for the causal row (the path measured before)."""
        config = model_config(model_name, self.cuda)
        if shape not in self.rows_by_shape:
            self.rows_by_shape[shape] = shape_rows(shape, self.opts.length,
                                                   np.random.default_rng(0))
        seg_rows = self.rows_by_shape[shape]
        layers = int(config.num_hidden_layers)
        warmup, steps = self.opts.warmup, self.opts.steps
        if shape == "131k" and variant in ("hf", "liger") and self.cuda:
            warmup, steps = 0, 1  # expected to fail; if not, one step is measured
        ckpt = int(ckpt_text) if ckpt_text else 0
        if not ckpt_text and shape == "131k" and variant.startswith("kdcache"):
            ckpt = self.ckpt_given.get(model_name)
            if ckpt is None and self.cuda:
                ckpt = auto_ckpt(self.result["runs"].get(f"{model_name}/16k/kdcache"), config,
                                 int(seg_rows.size), self.total_gib)
            if ckpt is None:
                ckpt = CKPT_131K_FALLBACK[model_name]
            ckpt = min(ckpt, layers)
        retry = variant.startswith("kdcache") or (variant == "hf" and shape == "16k")
        entry, oom = self.attempt(variant, config, seg_rows, ckpt, warmup, steps, options or {})
        if oom and retry and ckpt < layers and self.left_s() + 30 >= estimate:
            print(f"{model_name}/{shape}/{variant}: out of memory with {ckpt} checkpointed "
                  f"layers; once more with all {layers}", file=sys.stderr, flush=True)
            first = entry
            entry, _ = self.attempt(variant, config, seg_rows, layers, warmup, steps,
                                     options or {})
            entry["first_attempt"] = first
        elif ("error" in entry and not oom and variant == "kdcache" and shape == "16k"
              and self.cuda and self.left_s() + 30 >= EST_S[("16k", "kdcache-flex")]):
            print(f"{model_name}/{shape}/{variant}: {entry['error'][:80]}; once more with "
                  "FlexAttention", file=sys.stderr, flush=True)
            first = entry
            entry, _ = self.attempt("kdcache-flex", config, seg_rows, ckpt, warmup, steps,
                                     options or {})
            entry["first_attempt"] = {"variant": "kdcache", **first}
        entry.update(tokens=int(seg_rows.size), documents=int(seg_rows.max()) + 1)
        if "seconds" in entry:
            add_rates(entry, config, seg_rows, self.tflops)
        return entry


CELL_OPTIONS = ("sdpa", "compile", "attn")
ATTN_IMPLS = ("sdpa", FLEX_IMPL)
SDPA_BACKENDS = ("cudnn_attention", "flash_attention", "efficient_attention")


def parse_variant(text: str) -> tuple[str, dict[str, str] | None]:
    """`kdcache@sdpa=flash_attention@compile=max-autotune-no-cudagraphs` -> the variant and its
    options (None when one is unknown)."""
    variant, *items = text.split("@")
    options = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in CELL_OPTIONS or not value or (key == "sdpa" and value not in SDPA_BACKENDS) \
                or (key == "attn" and value not in ATTN_IMPLS):
            return variant, None
        options[key] = value
    return variant, options


def main() -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", default=",".join(DEFAULT_CELLS),
                        help="comma list of MODEL/SHAPE/VARIANT[@KEY=VALUE...][:CHECKPOINTED_LAYERS] "
                        "in order; KEY sdpa (an SDPA backend), compile (a torch.compile mode) "
                        "or attn (kdcache's attention implementation) sets that cell's option")
    parser.add_argument("--length", type=int, default=16_384 if cuda else 256,
                        help="tokens of the 16k shape (131k is 8x this)")
    parser.add_argument("--ckpt131k", default="auto",
                        help="checkpointed layers of kdcache at 131k: 'auto' (from the 16k "
                        "cell's memory) or MODEL=N,...")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3 if cuda else 1)
    parser.add_argument("--budget-s", type=float, default=330.0 if cuda else 1e9,
                        help="start no cell whose estimated cost passes this many seconds "
                        "since start")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more step per cell (GPU): device time by kernel kind")
    parser.add_argument("--attention", action="store_true",
                        help="time each SDPA backend and FlexAttention on each model's 16k "
                        "causal shape first (GPU)")
    parser.add_argument("--sdpa-backend", default=None,
                        choices=SDPA_BACKENDS,
                        help="force one SDPA backend in every cell")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode for kdcache's layers (e.g. "
                        "max-autotune-no-cudagraphs)")
    parser.add_argument("--out-dir", default=os.environ.get("OUT"),
                        help="where bench_hf_student.jsonl / .json go (default $OUT)")
    opts = parser.parse_args()
    device = "cuda" if cuda else "cpu"
    if cuda:
        from torch import _dynamo

        _dynamo.config.automatic_dynamic_shapes = False  # one static compile per shape
        _dynamo.config.cache_size_limit = 64
    import transformers

    ckpt_given = {} if opts.ckpt131k == "auto" else {
        m: int(n) for m, n in (item.split("=") for item in opts.ckpt131k.split(",") if item)}
    tflops = matmul_tflops(device)
    result = {"bench": "hf_student_train_step", "date": time.strftime("%Y-%m-%d"),
              "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "matmul_bf16_tflops": tflops, "k": opts.k, "tokens_16k": opts.length,
              "budget_s": opts.budget_s,
              "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
              "sdpa_causal_backend_16k": {m: sdpa_backend(model_config(m, cuda), device,
                                                          opts.length) for m in MODELS},
              "runs": {}}
    jsonl = json_path = None
    if opts.out_dir:
        os.makedirs(opts.out_dir, exist_ok=True)
        jsonl = os.path.join(opts.out_dir, "bench_hf_student.jsonl")
        json_path = os.path.join(opts.out_dir, "bench_hf_student.json")
        open(jsonl, "w").close()

    def save(key: str, entry: dict) -> None:
        line = json.dumps({"cell": key, **entry})
        print(line, file=sys.stderr, flush=True)
        result["runs"][key] = entry
        result["summary"] = compare(result["runs"], cuda)
        result["elapsed_s"] = round(time.time() - T_START, 1)
        if jsonl:
            with open(jsonl, "a") as handle:
                handle.write(line + "\n")
            with open(json_path + ".tmp", "w") as handle:
                handle.write(json.dumps(result) + "\n")
            os.replace(json_path + ".tmp", json_path)

    if opts.attention and cuda:
        result["attention_16k"] = {m: attention_bench(model_config(m, cuda), opts.length)
                                   for m in MODELS}
        print(json.dumps({"attention_16k": result["attention_16k"]}), file=sys.stderr, flush=True)
    cells = Cells(opts, cuda, result, ckpt_given, tflops)
    last_model = None
    for spec in [c for c in opts.cells.split(",") if c]:
        cell, _, ckpt_text = spec.partition(":")
        t0 = time.time()
        parts = cell.split("/")
        options = None
        if len(parts) == 3:
            parts[2], options = parse_variant(parts[2])
        if len(parts) != 3 or parts[0] not in MODELS or parts[1] not in ("16k", "131k") or \
                parts[2] not in VARIANTS or options is None:
            save(cell, {"error": f"bad cell {spec!r}: MODEL/SHAPE/VARIANT[@KEY=VALUE...] with "
                        f"MODEL in {MODELS}, SHAPE 16k or 131k, VARIANT in {VARIANTS}, KEY in "
                        f"{CELL_OPTIONS}"})
            continue
        model_name, shape, variant = parts
        estimate = EST_S[(shape, variant)] if cuda else 0
        if cuda and "autotune" in options.get("compile", opts.compile_mode or ""):
            estimate += 150  # inductor benchmarks its matmul and fusion choices first
        if cells.left_s() < estimate:
            save(cell, {"skipped": f"time budget: {time.time() - T_START:.0f} s gone, "
                        f"~{estimate} s needed, budget {opts.budget_s:.0f} s"})
            continue
        if variant == "kdcache-flex" and not cuda:
            save(cell, {"skipped": "FlexAttention training needs CUDA (no CPU backward)"})
            continue
        if cuda and last_model is not None:
            # the previous cell's compiled layers do not guard on every option (an SDPA
            # backend, the model) a cell can change
            torch._dynamo.reset()
        last_model = model_name
        try:
            entry = cells.run(model_name, shape, variant, ckpt_text, estimate, options)
        except Exception as exc:  # the bench itself goes on: record and continue
            traceback.print_exc()
            entry = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            free()
        entry.update(model=model_name, shape=shape, variant=variant, options=options,
                     wall_s=round(time.time() - t0, 1))
        save(cell, entry)
    result["elapsed_s"] = round(time.time() - T_START, 1)
    if json_path:
        with open(json_path, "w") as handle:
            handle.write(json.dumps(result) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
