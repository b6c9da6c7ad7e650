"""Real-size check of `kdcache probe` (not collected by pytest; run by hand on a GPU):

    python3 tests/evaluate/gpu_probe_check.py OUT_DIR [DTYPES]   (default float32,bfloat16,float16)

Builds a random-init model shaped like the paper's student (30 layers, 20 heads, 4 KV heads,
dim 1280, FFN 6144, vocab 202,048, theta 500k) with the test tokenizer, then runs the default
probe (2,048 x 64 = 131,072 tokens, all three packing modes, float32/bfloat16/float16) on CUDA
and prints one JSON line with wall time and peak GPU memory per dtype.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from conftest import build_tokenizer  # noqa: E402
from kdcache.evaluate.probe import ProbeConfig, run_probe  # noqa: E402


def main(out: str, dtypes: tuple[str, ...]) -> None:
    path = "/tmp/paper-student-random"  # not under OUT: only results travel back
    tok = build_tokenizer(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=202048, hidden_size=1280, intermediate_size=6144,
                         num_hidden_layers=30, num_attention_heads=20, num_key_value_heads=4,
                         head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    report = {}
    for dtype in dtypes:
        torch.cuda.reset_peak_memory_stats()
        start = time.time()
        cfg = ProbeConfig(dtypes=(dtype,), device="cuda", batch_blocks=8)
        summary, _ = run_probe(path, cfg)
        report[dtype] = {
            "seconds": round(time.time() - start, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "kl_mean": {r["mode"]: [min(r["kl_mean"][1:]), max(r["kl_mean"][1:])]
                        for r in summary["runs"]},
            "post_rope_cos_min_layer0": min(summary["runs"][0]["query_post_cosine"]["0"]),
            "final_cos_min": {r["mode"]: min(r["layer_cosine"]["final"]) for r in summary["runs"]},
        }
        print(json.dumps({dtype: report[dtype]}), flush=True)
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "window": 131072, "report": report}))


if __name__ == "__main__":
    main(sys.argv[1], tuple((sys.argv[2] if len(sys.argv) > 2 else
                             "float32,bfloat16,float16").split(",")))
