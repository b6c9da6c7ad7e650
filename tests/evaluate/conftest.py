"""Tiny local models for the eval/analysis tests: no network, no hub.

`tiny_model_dir`: a random-init LlamaForCausalLM (2 layers, head_dim 64 so that vLLM-CPU accepts
it) with a byte-level BPE tokenizer trained here on a few KB of generated text, saved with
save_pretrained. Built once per session.
"""

from __future__ import annotations

import random

import pytest

WORDS = ("the grass is green sky blue sun yellow here we go there and back again pass key "
         "remember it special magic number for value one of what are all mentioned in provided "
         "text document cereal breakfast culture health benefit reason taste good people many "
         "apple river stone cloud quick brown fox lazy dog").split()


def generated_text(seed: int = 0, sentences: int = 400) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        number = str(rng.randint(0, 9999999))
        lines.append(" ".join(words).capitalize() + f" {number}.")
    return lines


def build_tokenizer(path: str, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(generated_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(path)
    return fast


def build_model(path: str, tokenizer, seed: int = 0, rope_theta: float = 10000.0,
                num_layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=num_layers, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=64, max_position_embeddings=8192,
                         rope_theta=rope_theta, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                         initializer_range=0.2)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("models") / "tiny-llama")
    tokenizer = build_tokenizer(path)
    build_model(path, tokenizer)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir_b(tmp_path_factory, tiny_model_dir) -> str:
    """The tiny model with query weights changed in head 1, pairs 24..31 (dims 24..31 and
    56..63 of that head) and nothing else: `kdcache diff` must find exactly those."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(tmp_path_factory.mktemp("models") / "tiny-llama-b")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            weight = layer.self_attn.q_proj.weight  # [heads * 64, hidden]
            for dim in [*range(64 + 24, 64 + 32), *range(64 + 56, 64 + 64)]:
                weight[dim] += 0.5 * torch.randn(weight.shape[1], generator=generator)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path
