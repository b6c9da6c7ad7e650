"""Student training step speed: kdcache's trainer step vs transformers' LlamaForCausalLM.

One JSON line. Each shape is timed as full training steps (forward, backward, gradient clipping,
fused AdamW) after warm-up, with CUDA events; peak memory is torch.cuda.max_memory_allocated over
the timed steps (model, optimizer state and activations included).

  ours       Student + fused sparse-KL loss (Triton on CUDA; the lm_head logits never exist),
             FlexAttention document block mask (SDPA for plain causal), torch.compile'd blocks,
             activation checkpointing of the first `--ckpt` layers, bf16 autocast, fused AdamW.
  hf         transformers LlamaForCausalLM with the identical architecture (tied embeddings),
             attn_implementation="sdpa", gradient checkpointing, bf16 autocast, full logits + CE
             (model(input_ids, labels=...)), fused AdamW.

Shapes: `hf16k` / `ours16k` (one 16,384-token causal sequence: a shape transformers can run),
`stage1` (64 rows x 2,048 tokens, documents cut at boundaries: document mask, reset positions),
`stage2` (one 131,072-token window of packed short documents: document mask, global positions).

MFU = model FLOPs / (seconds x the bf16 matmul rate measured in the same run), model FLOPs =
6 x (non-embedding parameters + lm_head) x tokens + attention FLOPs over the unmasked 128 x 128
blocks only (3 x 4 x heads x head_dim x 128^2 per block and layer: QK^T and PV, forward + 2x
backward). Activation recomputation is not counted (it is not model work).

On CPU (`make bench`) it runs the `tiny` preset at 1,024 tokens with both implementations, to show
the script works; the figures that matter come from the GPU (bench/gpu_train.sh).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kdcache.student_train.model import ModelArgs, Student, hf_config  # noqa: E402
from kdcache.student_train.module import (LossConfig, OptimConfig, build_optimizer,  # noqa: E402
                                          distillation_loss)

BLOCK = 128


def matmul_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12


def doc_lengths(rng: np.random.Generator, total: int, median: int = 600) -> list[int]:
    """Short documents (log-normal around ~470 words ~ 600 tokens), packed to `total`."""
    lengths, used = [], 0
    while used < total:
        n = int(np.clip(rng.lognormal(math.log(median), 0.8), 32, 8192))
        n = min(n, total - used)
        lengths.append(n)
        used += n
    return lengths


def seg_from_lengths(lengths: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(lengths)), lengths)


def attention_blocks(seg_rows: np.ndarray) -> int:
    """Number of 128 x 128 (q, kv) blocks with at least one allowed (document-causal) pair."""
    total = 0
    for seg in seg_rows:
        n = seg.shape[0]
        starts = np.zeros(seg.max() + 1, dtype=np.int64)
        change = np.flatnonzero(np.diff(seg)) + 1
        starts[seg[change]] = change
        for i in range(math.ceil(n / BLOCK)):
            first_kv = starts[seg[i * BLOCK]] // BLOCK  # the block's first document's start
            total += i - first_kv + 1
    return total


def model_flops(args: ModelArgs, tokens: int, blocks: int) -> float:
    dense = 6 * args.n_params() * tokens  # tied: the embedding matrix counted once, as lm_head
    attention = 3 * 4 * args.n_head * args.head_dim * BLOCK * BLOCK * blocks * args.n_layer
    return dense + attention


def make_batch(args: ModelArgs, seg_rows: np.ndarray, k: int, device: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rows, length = seg_rows.shape
    tokens = torch.randint(3, args.vocab_size, (rows, length), generator=g)
    seg = torch.from_numpy(seg_rows.astype(np.int32))
    labels = torch.full((rows, length), -100, dtype=torch.long)
    labels[:, :-1] = tokens[:, 1:]
    labels[:, :-1][seg[:, 1:] != seg[:, :-1]] = -100  # each document's last token: no target
    # distinct top-k ids per row (a random offset, stride co-prime-ish with V) and log-probs
    start = torch.randint(0, args.vocab_size, (rows, length, 1), generator=g)
    ids = (start + torch.arange(k) * 1543) % args.vocab_size
    logits = torch.randn(rows, length, k, generator=g) * 2
    logprobs = torch.log_softmax(logits, -1) + math.log(0.9)
    batch = {"tokens": tokens, "seg_ids": seg, "labels": labels, "target_ids": ids,
             "target_logprobs": logprobs}
    return {name: t.to(device) for name, t in batch.items()}


def timed_steps(step, device: str, warmup: int, steps: int,
                warmup_s: list[float] | None = None) -> tuple[float, float]:
    """Median seconds per step and peak GiB over the timed steps (each warm-up step's wall
    seconds, compilation included, appended to `warmup_s` when given)."""
    for _ in range(warmup):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        if warmup_s is not None:
            warmup_s.append(round(time.perf_counter() - t0, 2))
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        peak = None  # not measured on CPU
    return float(np.median(times)), peak


def run_ours(args: ModelArgs, seg_rows: np.ndarray, *, device: str, k: int, ckpt: int,
             compile_blocks: bool, warmup: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = Student(args).to(device)
    model.checkpoint_layers = ckpt
    if compile_blocks:
        model.compile_blocks()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4))
    batch = make_batch(args, seg_rows, k, device)
    loss_cfg = LossConfig(alpha=1.0)
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    losses = []

    def step():
        with amp:
            out = distillation_loss(model, batch, loss_cfg,
                                    torch.bfloat16 if device == "cuda" else None)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out["loss"].detach())

    seconds, peak = timed_steps(step, device, warmup, steps)
    return {"seconds": seconds, "peak_gib": peak, "loss_first_last":
            [float(losses[0]), float(losses[-1])]}


def run_hf(args: ModelArgs, length: int, *, device: str, warmup: int, steps: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in hf_config(args, torch.float32).items()
                            if k not in ("kdcache", "architectures", "torch_dtype")})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.config.use_cache = False
    model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                  weight_decay=0.1, fused=True if device == "cuda" else None)
    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(3, args.vocab_size, (1, length), generator=g).to(device)
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        with amp:
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, peak = timed_steps(step, device, warmup, steps)
    return {"seconds": seconds, "peak_gib": peak}


def shape_rows(name: str, length: int, rng: np.random.Generator) -> np.ndarray:
    if name in ("hf16k", "ours16k"):
        return np.zeros((1, length), dtype=np.int64)
    if name == "stage1":  # 2,048-token rows of whole short documents (a cut document-mode dump)
        rows = [seg_from_lengths(doc_lengths(rng, 2048)) for _ in range(64)]
        return np.stack(rows)
    if name == "stage2":
        return seg_from_lengths(doc_lengths(rng, 131_072))[None]
    raise ValueError(name)


def main() -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="paper-1.1b" if cuda else "tiny")
    parser.add_argument("--shapes", default="ours16k:0,hf16k,stage2:20,stage1:20" if cuda
                        else "ours16k:0,hf16k",
                        help="comma list of NAME[:CHECKPOINTED_LAYERS]; names: ours16k, hf16k, "
                        "stage1, stage2")
    parser.add_argument("--length", type=int, default=16_384 if cuda else 1024,
                        help="tokens of the causal comparison shape")
    parser.add_argument("--k", type=int, default=64, help="teacher top-k")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5 if cuda else 2)
    parser.add_argument("--json-out", help="also write the JSON line to this file")
    opts = parser.parse_args()
    device = "cuda" if cuda else "cpu"
    if cuda:
        from torch import _dynamo

        # one static compile per shape (no dynamic-shape recompiles between shapes)
        _dynamo.config.automatic_dynamic_shapes = False
        _dynamo.config.cache_size_limit = 64
        torch.backends.cuda.matmul.allow_tf32 = True
    args = ModelArgs.from_preset(opts.preset, attention="document", positions="global",
                                 max_seq_len=131_072)
    rng = np.random.default_rng(0)
    tflops = matmul_tflops(device)
    result = {"bench": "train_step", "date": time.strftime("%Y-%m-%d"), "device":
              torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
              "torch": torch.__version__, "preset": opts.preset, "params": args.n_params(),
              "matmul_bf16_tflops": tflops, "k": opts.k,
              "loss_impl": os.environ.get("KDCACHE_SPARSE_KL_IMPL", "triton" if cuda else
                                          "reference")}
    for spec in opts.shapes.split(","):
        name, _, ckpt_text = spec.partition(":")
        ckpt = int(ckpt_text or 0)
        seg_rows = shape_rows(name, opts.length, rng)
        tokens = int(seg_rows.size)
        blocks = attention_blocks(seg_rows)
        shape_args = args
        if name in ("hf16k", "ours16k"):
            shape_args = ModelArgs.from_preset(opts.preset, attention="causal",
                                               positions="global", max_seq_len=131_072)
        if name == "stage1":
            shape_args = ModelArgs.from_preset(opts.preset, attention="document",
                                               positions="reset", rope_theta=10_000.0)
        t0 = time.time()
        try:
            if name == "hf16k":
                entry = run_hf(shape_args, opts.length, device=device, warmup=opts.warmup,
                               steps=opts.steps)
            else:
                entry = None
                try:
                    entry = run_ours(shape_args, seg_rows, device=device, k=opts.k,
                                     ckpt=ckpt, compile_blocks=cuda and not opts.no_compile,
                                     warmup=opts.warmup, steps=opts.steps)
                except torch.OutOfMemoryError:
                    if ckpt >= shape_args.n_layer:
                        raise
                    print(f"{spec}: out of memory, retrying with every layer checkpointed",
                          file=sys.stderr, flush=True)
                if entry is None:  # outside the except block, so the failed run's memory is free
                    gc.collect()
                    torch.cuda.empty_cache()
                    ckpt = shape_args.n_layer
                    entry = run_ours(shape_args, seg_rows, device=device, k=opts.k,
                                     ckpt=ckpt, compile_blocks=cuda and not opts.no_compile,
                                     warmup=opts.warmup, steps=opts.steps)
                entry["ckpt_layers"] = ckpt
        except torch.OutOfMemoryError as exc:
            entry = {"error": f"out of memory: {str(exc)[:160]}"}
        except Exception as exc:  # keep timing the other shapes; report what broke
            import traceback

            traceback.print_exc()
            entry = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        entry.update(tokens=tokens, rows=int(seg_rows.shape[0]), wall_s=round(time.time() - t0, 1))
        if "seconds" in entry:
            entry["tokens_per_s"] = tokens / entry["seconds"]
            flops = model_flops(shape_args, tokens, blocks)
            entry["model_tflops"] = flops / entry["seconds"] / 1e12
            entry["mfu"] = entry["model_tflops"] / tflops if tflops else None
        result[spec] = entry
        print(json.dumps({spec: entry}), file=sys.stderr, flush=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    hf = result.get("hf16k", {})
    for spec in [s for s in result if s.startswith("ours16k")]:
        if "seconds" in hf and "seconds" in result[spec]:
            result[spec]["speedup_vs_hf"] = hf["seconds"] / result[spec]["seconds"]
            result[spec]["peak_ratio_vs_hf"] = (result[spec]["peak_gib"] / hf["peak_gib"]
                                                if cuda else None)
    line = json.dumps(result)
    print(line)
    if opts.json_out:
        with open(opts.json_out, "w") as handle:
            handle.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
