"""Tiny random-init transformers causal LMs, one per tested architecture (built, never downloaded)."""

from __future__ import annotations

import torch

VOCAB = 256
# the shape every tiny model shares (head_dim 16 keeps CPU tests fast)
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
ARCHITECTURES = ("llama", "llama-untied", "qwen2", "qwen3", "mistral", "gemma3", "phi3")


def tiny_config(arch: str, **overrides):
    """A transformers config of architecture `arch` at test size."""
    import transformers as tf

    common = {**_COMMON, **overrides}
    if arch in ("llama", "llama-untied"):
        # Llama 3.x long-context RoPE scaling
        rope = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}
        return tf.LlamaConfig(**{"head_dim": 16, "rope_parameters": rope,
                                 "tie_word_embeddings": arch == "llama", **common})
    if arch == "qwen2":  # q/k/v projections with bias
        return tf.Qwen2Config(**{"tie_word_embeddings": True, **common})
    if arch == "qwen3":  # q/k RMSNorm
        return tf.Qwen3Config(**{"head_dim": 16, "tie_word_embeddings": True, **common})
    if arch == "mistral":  # sliding window on every layer
        return tf.MistralConfig(**{"head_dim": 16, "sliding_window": 8,
                                   "tie_word_embeddings": False, **common})
    if arch == "gemma3":  # sliding + global layers, own scaling, embed scale, (1 + w) norms
        return tf.Gemma3TextConfig(**{"head_dim": 16, "sliding_window": 8,
                                      "layer_types": ["sliding_attention", "full_attention"],
                                      "query_pre_attn_scalar": 24, **common})
    if arch == "phi3":  # fused qkv and gate/up projections
        return tf.Phi3Config(**{"tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 1,
                                 "eos_token_id": 2, **common})
    raise ValueError(arch)


def save_tiny(arch: str, directory: str, seed: int = 0, **overrides) -> str:
    """Write a tiny random model of `arch` as an HF directory (float32 weights)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    # non-trivial norm weights and biases, so that a wrong norm/bias convention shows
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    return directory
