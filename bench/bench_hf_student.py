"""Training-step speed of transformers students: kdcache's path vs the usual ways, side by side.

One JSON line (and --json-out). For each model shape and token count, full training steps
(forward, backward, gradient clipping, fused AdamW; fp32 master weights under bf16 autocast) are
timed with CUDA events after warm-up; peak memory is torch.cuda.max_memory_allocated over the
timed steps (weights, optimizer state and activations included).

  hf      the transformers model trained the usual way: attn_implementation="sdpa",
          model(input_ids, labels=...) (full logits + CE). On out-of-memory: retried with
          gradient checkpointing (recorded).
  liger   the same model's decoder, then Liger's fused linear cross-entropy on its final hidden
          states and lm_head weight (bf16, as ours): no full logits.
  kdcache kdcache.student_train.hf_student.HFStudent: the same transformers model, its decoder
          layers torch.compile'd, FlexAttention with a document block mask (through the model's
          own attention interface), and the fused sparse-KL loss (KD + CE, alpha 0.5, top-64
          teacher targets) on the final hidden states and the model's own lm_head.

Shapes: `16k` (one 16,384-token causal row: every variant), `131k` (one 131,072-token row of
packed short documents: document mask, global positions; kdcache only; the others need a dense
131k x 131k mask (16 GiB of booleans, and attention over all of it) and full logits).
Models (random init): qwen3-0.6b (V = 151,936, tied) and llama-3.2-1b (V = 128,256, tied,
llama3 RoPE scaling).

MFU = model FLOPs / (seconds x the bf16 matmul rate measured in the same run), model FLOPs =
6 x (parameters without the input embedding, plus lm_head) x tokens + attention FLOPs over the
unmasked 128 x 128 blocks only (3 x 4 x heads x head_dim x 128^2 per block and layer).
Recomputation (checkpointed layers) is not model work and is not counted.

On CPU (`make bench`) it runs a tiny Qwen3 at 512 tokens (hf and kdcache) to show the script
works; the figures that matter come from the GPU:
  python3 bench/bench_hf_student.py --json-out $OUT/bench_hf_student.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from bench_train import (BLOCK, attention_blocks, doc_lengths, make_batch,  # noqa: E402
                         matmul_tflops, seg_from_lengths, timed_steps)

from kdcache.student_train.hf_student import HFStudent  # noqa: E402
from kdcache.student_train.module import LossConfig, distillation_loss  # noqa: E402


def model_config(name: str, cuda: bool):
    import transformers as tf

    if not cuda:  # CPU smoke size
        return tf.Qwen3Config(vocab_size=4096, hidden_size=128, intermediate_size=256,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=32, tie_word_embeddings=True, max_position_embeddings=4096)
    if name == "qwen3-0.6b":
        return tf.Qwen3Config(vocab_size=151_936, hidden_size=1024, intermediate_size=3072,
                              num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                              head_dim=128, rms_norm_eps=1e-6, tie_word_embeddings=True,
                              max_position_embeddings=131_072,
                              rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if name == "llama-3.2-1b":
        rope = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 32.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
        return tf.LlamaConfig(vocab_size=128_256, hidden_size=2048, intermediate_size=8192,
                              num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                              head_dim=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
                              max_position_embeddings=131_072, rope_parameters=rope)
    raise ValueError(name)


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


def train_step(loss_fn, model, optimizer):
    def step():
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def run_variant(variant: str, config, seg_rows: np.ndarray, *, device: str, k: int,
                ckpt: int, warmup: int, steps: int) -> dict:
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    model = build_model(config, device)
    optimizer = optimizer_for(model, device)
    batch = make_batch(config, seg_rows, k, device)
    entry: dict = {}
    if variant == "hf":
        tokens = batch["tokens"]
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            entry["gradient_checkpointing"] = True

        def loss_fn():
            with amp:
                return model(input_ids=tokens, labels=tokens).loss
    elif variant == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        flce = LigerFusedLinearCrossEntropyLoss()
        tokens = batch["tokens"]
        labels = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -100)], 1).reshape(-1)
        decoder = model.model

        def loss_fn():
            with amp:
                hidden = decoder(input_ids=tokens, use_cache=False).last_hidden_state
            d = hidden.shape[-1]
            dt = torch.bfloat16 if device == "cuda" else hidden.dtype
            return flce(model.lm_head.weight.to(dt), hidden.reshape(-1, d).to(dt), labels)
    elif variant == "kdcache":
        attention = "causal" if bool((batch["seg_ids"] == 0).all()) else "document"
        student = HFStudent(model, attention=attention, positions="global")
        student.set_checkpoint_layers(ckpt)
        if device == "cuda":
            student.compile_blocks()
        loss_cfg = LossConfig(alpha=0.5)
        entry["attention"] = attention
        entry["ckpt_layers"] = ckpt

        def loss_fn():
            with amp:
                return distillation_loss(student, batch, loss_cfg,
                                         torch.bfloat16 if device == "cuda" else None)["loss"]
    else:
        raise ValueError(variant)
    losses = []

    def loss_logged():
        loss = loss_fn()
        losses.append(loss.detach())
        return loss

    seconds, peak = timed_steps(train_step(loss_logged, model, optimizer), device, warmup, steps)
    entry.update(seconds=seconds, peak_gib=peak,
                 loss_first_last=[float(losses[0]), float(losses[-1])],
                 flop_params=flop_params(model))
    return entry


def shape_rows(shape: str, length: int, rng) -> np.ndarray:
    if shape == "16k":
        return np.zeros((1, length), dtype=np.int64)
    if shape == "131k":
        return seg_from_lengths(doc_lengths(rng, 8 * length))[None]
    raise ValueError(shape)


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="qwen3-0.6b,llama-3.2-1b")
    parser.add_argument("--runs", default="16k:hf,16k:liger,16k:kdcache,131k:kdcache",
                        help="comma list of SHAPE:VARIANT[:CHECKPOINTED_LAYERS]")
    parser.add_argument("--length", type=int, default=16_384 if cuda else 512,
                        help="tokens of the 16k shape (131k is 8x this)")
    parser.add_argument("--ckpt131k", default="qwen3-0.6b=14,llama-3.2-1b=8",
                        help="checkpointed layers at 131k per model (retried with all on OOM)")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3 if cuda else 2)
    parser.add_argument("--json-out")
    opts = parser.parse_args()
    device = "cuda" if cuda else "cpu"
    if cuda:
        from torch import _dynamo

        _dynamo.config.automatic_dynamic_shapes = False
        _dynamo.config.cache_size_limit = 64
    else:
        opts.runs = ",".join(r for r in opts.runs.split(",") if "liger" not in r)
        opts.models = opts.models.split(",")[0]
    ckpt131k = dict(item.split("=") for item in opts.ckpt131k.split(",") if item)
    import transformers

    tflops = matmul_tflops(device)
    result = {"bench": "hf_student_train_step", "date": time.strftime("%Y-%m-%d"),
              "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "matmul_bf16_tflops": tflops, "k": opts.k, "runs": {}}

    def save():
        if opts.json_out:
            with open(opts.json_out, "w") as handle:
                handle.write(json.dumps(result) + "\n")

    for model_name in opts.models.split(","):
        config = model_config(model_name, cuda)
        rng = np.random.default_rng(0)
        rows_by_shape = {s: shape_rows(s, opts.length, rng) for s in ("16k", "131k")}
        for spec in opts.runs.split(","):
            shape, variant, *rest = spec.split(":")
            default_ckpt = int(ckpt131k.get(model_name, 0)) if shape == "131k" else 0
            ckpt = int(rest[0]) if rest else default_ckpt
            seg_rows = rows_by_shape[shape]
            key = f"{model_name}/{shape}/{variant}"
            t0 = time.time()
            entry = None
            for attempt in range(2):
                try:
                    entry = run_variant(variant, config, seg_rows, device=device, k=opts.k,
                                        ckpt=ckpt, warmup=opts.warmup, steps=opts.steps)
                    break
                except torch.OutOfMemoryError as exc:
                    entry = {"error": f"out of memory: {str(exc)[:160]}", "ckpt_layers": ckpt}
                except Exception as exc:  # keep timing the others; report what broke
                    import traceback

                    traceback.print_exc()
                    entry = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
                    break
                free()
                if attempt == 0:  # out of memory: once more with (more) recomputation
                    print(f"{key}: out of memory with {ckpt} checkpointed layers; retrying "
                          "with all", file=sys.stderr, flush=True)
                    ckpt = config.num_hidden_layers
            free()
            tokens = int(seg_rows.size)
            entry.update(tokens=tokens, wall_s=round(time.time() - t0, 1))
            if "seconds" in entry:
                blocks = attention_blocks(seg_rows)
                attn = (3 * 4 * config.num_attention_heads * config.head_dim * BLOCK * BLOCK
                        * blocks * config.num_hidden_layers)
                flops = 6 * entry["flop_params"] * tokens + attn
                entry["tokens_per_s"] = tokens / entry["seconds"]
                entry["model_tflops"] = flops / entry["seconds"] / 1e12
                entry["mfu"] = entry["model_tflops"] / tflops if tflops else None
                entry["mfu_vs_989"] = entry["model_tflops"] / 989.0 if cuda else None
            result["runs"][key] = entry
            print(json.dumps({key: entry}), file=sys.stderr, flush=True)
            save()
        runs = result["runs"]
        ours = runs.get(f"{model_name}/16k/kdcache", {})
        base = [runs.get(f"{model_name}/16k/{v}", {}) for v in ("hf", "liger")]
        base = [b for b in base if "seconds" in b]
        if "seconds" in ours and base:
            best = min(base, key=lambda b: b["seconds"])
            ours["speedup_vs_best_baseline"] = best["seconds"] / ours["seconds"]
            if cuda:
                ours["peak_ratio_vs_that_baseline"] = ours["peak_gib"] / best["peak_gib"]
                ours["peak_ratio_vs_lowest_baseline"] = ours["peak_gib"] / min(
                    b["peak_gib"] for b in base)
    save()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
