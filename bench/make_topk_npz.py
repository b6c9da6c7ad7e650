"""Build a top-k npz (the keys of /work/shared/data/dev_topk.npz) from a causal LM over text.

    # any local Hugging Face causal-LM directory, over text files:
    .venv/bin/python bench/make_topk_npz.py --model DIR --text 'docs/**/*.md' --out topk.npz
    # no model given: train a small Llama on the text first (local, no network), then score
    .venv/bin/python bench/make_topk_npz.py --train-seconds 120 --out topk.npz

Without --text the corpus is this Python's own standard-library sources (code and docstrings:
real text found on every machine). Files are split by a fixed shuffle into training files and
held-out files; only held-out text is scored, in contexts of --context tokens. Each scored
position gives the top-k ids and full-vocabulary log-probs (fp32 log-softmax, chunked) of the next
token. Output arrays: ids int32 [N, k], logprobs float32 [N, k] (descending), vocab_size, targets
int32 [N] (the actual next token).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import sysconfig
import time

import numpy as np


def corpus_files(patterns: list[str] | None) -> list[str]:
    if not patterns:
        patterns = [os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py")]
    files = sorted({f for p in patterns for f in glob.glob(p, recursive=True) if os.path.isfile(f)})
    if not files:
        raise SystemExit(f"no text files match {patterns}")
    return files


def read_texts(files: list[str], max_bytes: int) -> list[str]:
    texts, total = [], 0
    for path in files:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            texts.append(text)
            total += len(text)
        if total >= max_bytes:
            break
    return texts


def train_model(texts: list[str], args, device: str):
    """A small Llama trained for args.train_seconds on `texts` (next-token cross-entropy)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdcache.teacher_dump.make_teacher import train_tokenizer

    tokenizer = train_tokenizer(texts[:3000], args.vocab)
    eos = tokenizer.convert_tokens_to_ids("</s>")
    stream = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids + [eos])
    data = torch.tensor(stream, dtype=torch.long)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden,
                      intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    steps, deadline, loss = 0, time.perf_counter() + args.train_seconds, float("nan")
    model.train()
    while time.perf_counter() < deadline:
        starts = torch.randint(0, len(data) - args.context - 1, (args.batch,), generator=g)
        batch = torch.stack([data[s:s + args.context] for s in starts.tolist()]).to(device)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                            enabled=device.startswith("cuda")):
            out = model(input_ids=batch, labels=batch, use_cache=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        steps += 1
        loss = float(out.loss)
        if steps % 50 == 0:
            print(json.dumps({"step": steps, "loss": round(loss, 3)}), flush=True)
    model.eval()
    info = {"train_steps": steps, "final_train_loss": loss, "train_tokens": int(len(data)),
            "parameters": sum(p.numel() for p in model.parameters())}
    return model, tokenizer, info


def score(model, tokenizer, texts: list[str], args, device: str):
    """Top-k ids/log-probs of the next token at every position of held-out contexts."""
    import torch

    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids + [eos])
    need = args.tokens + 1
    ids_out, lp_out, tgt_out, nll = [], [], [], []
    with torch.no_grad():
        for start in range(0, len(stream) - 1, args.context):
            chunk = torch.tensor(stream[start:start + args.context + 1], device=device)
            if chunk.numel() < 2 or sum(len(x) for x in tgt_out) >= need - 1:
                break
            logits = model(input_ids=chunk[None, :-1], use_cache=False).logits[0].float()
            for a in range(0, logits.shape[0], 256):  # chunked log-softmax over the vocabulary
                lp = torch.log_softmax(logits[a:a + 256], dim=-1)
                top = lp.topk(args.k, dim=-1)
                ids_out.append(top.indices.int().cpu().numpy())
                lp_out.append(top.values.cpu().numpy())
                tgt = chunk[1 + a:1 + a + 256]
                tgt_out.append(tgt.int().cpu().numpy())
                nll.append(-lp.gather(1, tgt[:, None].long())[:, 0].cpu().numpy())
    n = min(args.tokens, sum(len(x) for x in tgt_out))
    return (np.concatenate(ids_out)[:n], np.concatenate(lp_out)[:n].astype(np.float32),
            np.concatenate(tgt_out)[:n], float(np.exp(np.concatenate(nll)[:n].mean())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", help="a local HF causal-LM directory (default: train one)")
    ap.add_argument("--text", nargs="*", help="glob(s) of text files (default: Python stdlib)")
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=12288, help="scored positions to keep")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-text-mb", type=float, default=30.0)
    ap.add_argument("--heldout", type=float, default=0.1, help="fraction of files held out")
    # the model trained when --model is not given
    ap.add_argument("--train-seconds", type=float, default=120.0)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--save-model", help="save the trained model and tokenizer here")
    args = ap.parse_args()

    import torch

    torch.manual_seed(0)
    files = corpus_files(args.text)
    random.Random(0).shuffle(files)
    n_held = max(1, int(len(files) * args.heldout))
    held, train = files[:n_held], files[n_held:] or files
    info: dict = {}
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
        model = model.to(args.device).eval()
    else:
        texts = read_texts(train, int(args.max_text_mb * 1e6))
        model, tokenizer, info = train_model(texts, args, args.device)
        if args.save_model:
            model.save_pretrained(args.save_model, safe_serialization=True)
            tokenizer.save_pretrained(args.save_model)
    vocab = int(model.config.vocab_size)
    ids, lp, targets, ppl = score(model, tokenizer, read_texts(held, 10**8), args, args.device)
    tmp = args.out + ".tmp.npz"
    np.savez_compressed(tmp, ids=ids, logprobs=lp, vocab_size=np.int64(vocab), targets=targets)
    os.replace(tmp, args.out)
    p = np.exp(lp.astype(np.float64))
    print(json.dumps({"out": args.out, "tokens": int(ids.shape[0]), "k": int(ids.shape[1]),
                      "vocab_size": vocab, "heldout_ppl": round(ppl, 2),
                      "mean_top1_p": round(float(p[:, 0].mean()), 4),
                      "mean_topk_mass": round(float(p.sum(1).mean()), 4),
                      "model": args.model or "trained here", **info}), flush=True)


if __name__ == "__main__":
    main()
