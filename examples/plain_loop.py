"""Distil a kdcache logit dataset into any transformers causal LM with a plain PyTorch loop.

    python examples/plain_loop.py --student QWEN3_DIR --data DATASET --steps 1000 --out trained
"""
import argparse
import json

import torch
from transformers import AutoModelForCausalLM

from kdcache import train_api


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--student", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--alpha", type=float, default=0.5, help="KD weight; 1 - alpha weighs CE")
    p.add_argument("--out")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.student).to(device)
    data = train_api.WindowDataset([args.data], vocab_size=model.config.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    batches = torch.utils.data.DataLoader(data, batch_size=None, pin_memory=device == "cuda")
    for step, batch in zip(range(args.steps), batches):
        batch = {k: v.to(device) for k, v in train_api.collate([batch]).items()}
        with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
            hidden = train_api.hidden_states(model, batch, data.attention, data.positions)
        kd, ce = train_api.distill_loss(hidden, model.get_output_embeddings(), batch,
                                        alpha=args.alpha)
        loss = args.alpha * kd + (1 - args.alpha) * ce
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(json.dumps({"step": step, "loss": float(loss), "kd": float(kd), "ce": float(ce)}))
    if args.out:
        model.save_pretrained(args.out)


if __name__ == "__main__":
    main()
