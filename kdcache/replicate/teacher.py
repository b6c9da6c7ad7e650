"""A teacher that can retrieve at distance: the local Llama teacher, trained on the built-in text
plus passkey retrieval sequences up to its context length.

Nothing can transfer from a teacher that cannot retrieve, so the experiment trains its own and
measures it first. Each step is one batch of about `tokens_per_step` tokens of equal-length
sequences: every other step built-in text crops (language modelling), otherwise passkey prompts
(needle_tasks, the evaluation's own task, at random lengths up to `context` and random depths,
with fresh keys) followed by the answer and EOS, trained on the answer. The
short-context teacher of the causal test is the same recipe (same seed: same tokenizer, same
initial weights, same data order) with `context` = the short window, so the two teachers differ
only in the longest context they were trained on.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import replace
from typing import Callable

from kdcache.evaluate.needle_tasks import Haystack, build_sample
from kdcache.teacher_dump.corpus import builtin_corpus
from kdcache.teacher_dump.make_teacher import TeacherConfig, build_teacher


MIN_PASSKEY = 192  # a passkey prompt's instruction, needle and question take ~150 tokens


def passkey_lengths(context: int) -> list[int]:
    """Training lengths of passkey sequences: the context and its halvings, down to MIN_PASSKEY
    (none when the context is shorter: such a teacher learns from text alone)."""
    return sorted({context >> s for s in range(6) if context >> s >= MIN_PASSKEY})


def _passkey_batches(tokenizer, context: int, tokens: int, seed: int):
    """Endless (ids, labels) batches [B, L] of passkey prompt + answer + EOS: L drawn per batch,
    B = tokens // L rows, labels only on the answer and EOS (the haystack is the same kind of
    text the text batches train on; here the gradient is the retrieval's alone)."""
    import torch

    rng = random.Random(seed)
    haystack = Haystack(tokenizer)
    eos = tokenizer.eos_token_id
    lengths = passkey_lengths(context)
    while True:
        length = rng.choice(lengths)
        rows, labels = [], []
        for _ in range(max(1, tokens // length)):
            sample = build_sample(tokenizer, haystack, "passkey", "numbers", length - 8,
                                  rng.random(), rng)
            answer = list(tokenizer(" " + sample.answers[0] + ".",
                                    add_special_tokens=False)["input_ids"]) + [eos]
            prompt = list(sample.input_ids)
            ids = (prompt + answer + [eos] * length)[:length]
            target = ([-100] * len(prompt) + answer + [-100] * length)[:length]
            rows.append(ids)
            labels.append(target)
        yield torch.tensor(rows, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def _text_batches(tokenizer, documents: int, seq_len: int, batch: int, seed: int):
    import torch

    texts = list(builtin_corpus(documents, seed=10_000 + seed))
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream = [t for doc in ids for t in (tokenizer.bos_token_id, *doc, tokenizer.eos_token_id)]
    data = torch.tensor(stream, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - seq_len, (batch,), generator=g)
        crops = torch.stack([data[s:s + seq_len] for s in starts.tolist()])
        yield crops, crops


def teacher_record(out_dir: str) -> str:
    """The JSON record a trained teacher leaves beside its weights (its presence: trained)."""
    return os.path.join(out_dir, "kdcache_retrieval.json")


def train_retrieval_teacher(out_dir: str, model: dict, *, context: int, seconds: float,
                            device: str = "cpu", seed: int = 0, tokens_per_step: int = 8192,
                            log: Callable[[str], None] = print) -> dict:
    """Build the teacher into `out_dir` and train it for `seconds`; returns its summary."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    done = teacher_record(out_dir)
    if os.path.exists(done):
        with open(done) as fh:
            return json.load(fh)
    cfg = replace(TeacherConfig(**model), seed=seed, train_seconds=0.0,
                  max_positions=max(model.get("max_positions", 0), 4 * context))
    build_teacher(out_dir, cfg, log=lambda m: None)
    tok = AutoTokenizer.from_pretrained(out_dir)
    net = LlamaForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32).to(device)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95))
    seq_len = min(256, context)
    text = _text_batches(tok, 2000, seq_len, max(1, tokens_per_step // seq_len), seed)
    retrieval = bool(passkey_lengths(context))
    passkeys = _passkey_batches(tok, context, tokens_per_step, seed) if retrieval else None
    steps, losses = 0, []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else None
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        batch, labels = next(text) if steps % 2 == 0 or passkeys is None else next(passkeys)
        batch, labels = batch.to(device), labels.to(device)
        if autocast is not None:
            with autocast:
                loss = net(input_ids=batch, labels=labels, use_cache=False).loss
        else:
            loss = net(input_ids=batch, labels=labels, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        steps += 1
        losses.append(float(loss.detach()))
        if steps % 50 == 0:
            log(f"replicate: teacher {os.path.basename(out_dir)} step {steps} "
                f"loss {sum(losses[-50:]) / 50:.3f}")
    net.eval()
    net.to("cpu").save_pretrained(out_dir, safe_serialization=True)
    summary = {"out": out_dir, "context": context, "seconds": seconds, "steps": steps,
               "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4)
               if losses else None}
    with open(done, "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary
