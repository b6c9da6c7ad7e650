"""Tiny teachers for tests, benches and the demo, built locally with no network.

A teacher is a normal Hugging Face model directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) that both transformers and vLLM load:

- tokenizer: byte-level BPE trained with `tokenizers` on the built-in corpus, with special tokens
  `<pad>` (0), `<s>` (1, BOS) and `</s>` (2, EOS). Byte-level means every UTF-8 text encodes.
- model: Llama-style (`LlamaForCausalLM`), head_dim 64 (vLLM-CPU's attention kernels reject smaller
  heads), float32 so that vLLM and the HF reference engine compute in the same precision. The model
  vocabulary may be larger than the tokenizer's (as in real models, whose lm_head is padded).
- optional training for `train_seconds` on packed built-in documents (next-token cross-entropy,
  AdamW), so that predictions are peaked and depend on context rather than being near-uniform.

Presets (gpt-fast style): `tiny` for tests (starts fast in vLLM-CPU), `demo`, and `bench`, the
4-layer, 256-wide, 32k-vocabulary model that BENCHMARKS.md's CPU dump figures are measured on.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace

from kdcache.teacher_dump.chat import BUILTIN_CHAT_TEMPLATE
from kdcache.teacher_dump.corpus import builtin_corpus

TEACHER_PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=1024, tokenizer_vocab=1024, hidden_size=128, intermediate_size=384,
                 num_layers=2, num_heads=2, num_kv_heads=1),
    "demo": dict(vocab_size=2048, tokenizer_vocab=2048, hidden_size=256, intermediate_size=768,
                 num_layers=3, num_heads=4, num_kv_heads=2),
    "bench": dict(vocab_size=32000, tokenizer_vocab=2048, hidden_size=256, intermediate_size=768,
                  num_layers=4, num_heads=4, num_kv_heads=4),
    # GPU throughput figures (random init, 1.4B parameters, the paper's 202,048-token vocabulary)
    "gpu-1b": dict(vocab_size=202048, tokenizer_vocab=2048, hidden_size=2048,
                   intermediate_size=5632, num_layers=12, num_heads=32, num_kv_heads=8),
}
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2


@dataclass
class TeacherConfig:
    vocab_size: int = 1024
    tokenizer_vocab: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    max_positions: int = 131072
    rope_theta: float = 500000.0
    seed: int = 0
    train_seconds: float = 0.0
    train_seq_len: int = 256
    train_batch: int = 8
    learning_rate: float = 3e-3
    corpus_documents: int = 2000
    tie_embeddings: bool = False  # lm_head = embed_tokens (the native student's layout)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.hidden_size // self.num_heads != 64:
            raise ValueError("head_dim (hidden_size / num_heads) must be 64: vLLM-CPU rejects "
                             f"smaller heads; got {self.hidden_size}/{self.num_heads}")
        if self.tokenizer_vocab > self.vocab_size:
            raise ValueError("tokenizer_vocab cannot exceed the model's vocab_size")

    @classmethod
    def preset(cls, name: str, **overrides) -> "TeacherConfig":
        if name not in TEACHER_PRESETS:
            raise ValueError(f"unknown teacher preset {name!r}; choose from {sorted(TEACHER_PRESETS)}")
        return replace(cls(**TEACHER_PRESETS[name]), **overrides)


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (transformers' PreTrainedTokenizerFast) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=10**9,
                                   chat_template=BUILTIN_CHAT_TEMPLATE)


def _training_batches(token_ids: list[list[int]], cfg: TeacherConfig, bos: int, eos: int):
    """Endless random batches [B, T] cut from the BOS ... EOS-wrapped documents, concatenated."""
    import torch

    stream = [t for ids in token_ids for t in (bos, *ids, eos)]
    data = torch.tensor(stream, dtype=torch.long)
    g = torch.Generator().manual_seed(cfg.seed)
    span = cfg.train_seq_len
    while True:
        starts = torch.randint(0, len(data) - span, (cfg.train_batch,), generator=g)
        yield torch.stack([data[s:s + span] for s in starts.tolist()])


def build_teacher(out_dir: str, cfg: TeacherConfig, *, log=print) -> dict:
    """Build (and optionally train) a teacher into `out_dir`; returns a summary dict."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    texts = list(builtin_corpus(cfg.corpus_documents, seed=10_000 + cfg.seed))
    tokenizer = train_tokenizer(texts, cfg.tokenizer_vocab)
    bos, eos, pad = (tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>"))
    model_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads, max_position_embeddings=cfg.max_positions,
        rope_theta=cfg.rope_theta, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        tie_word_embeddings=cfg.tie_embeddings, torch_dtype="float32")
    model = LlamaForCausalLM(model_cfg).float()
    steps, loss_value = 0, None  # no loss without training: JSON null, never NaN
    if cfg.train_seconds > 0:
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
        model.train()
        deadline = time.perf_counter() + cfg.train_seconds
        for batch in _training_batches(ids, cfg, bos, eos):
            # transformers shifts the labels by one itself
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            loss_value = float(loss.detach())
            if steps % 20 == 0:
                log(f"make-teacher: step {steps} loss {loss_value:.3f}")
            if time.perf_counter() > deadline:
                break
        model.eval()
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    summary = {"out": out_dir, "config": asdict(cfg), "bos_id": bos, "eos_id": eos,
               "parameters": sum(p.numel() for p in model.parameters()), "train_steps": steps,
               "final_loss": loss_value if loss_value is None or math.isfinite(loss_value)
               else None, "seconds": round(time.perf_counter() - t0, 2)}
    with open(os.path.join(out_dir, "kdcache_teacher.json"), "w") as fh:
        json.dump(summary, fh, indent=2, allow_nan=False)
    return summary
