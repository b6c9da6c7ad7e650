"""Distil a kdcache logit dataset with the Hugging Face Trainer: a subclass whose
compute_loss is kdcache's (document masks, the fused sparse-KL loss on the model's own head).

    python examples/hf_trainer.py --student QWEN3_DIR --data DATASET --steps 1000 --out trained
"""
import argparse

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from kdcache import train_api


class DistillationTrainer(Trainer):
    """The HF Trainer, with the loss computed from kdcache batches (teacher top-k targets)."""

    def __init__(self, *args, attention="document", positions="global", alpha=0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.kd_options = {"attention": attention, "positions": positions, "alpha": alpha}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return train_api.compute_loss(model, inputs, return_outputs, **self.kd_options)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--student", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--out", default="hf-trainer-out")
    args = p.parse_args(argv)
    model = AutoModelForCausalLM.from_pretrained(args.student)
    data = train_api.WindowDataset([args.data], vocab_size=model.config.vocab_size)
    training = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, learning_rate=args.lr,
        per_device_train_batch_size=1, remove_unused_columns=False, logging_steps=1,
        save_strategy="no", report_to=[], bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
    trainer = DistillationTrainer(model=model, args=training, train_dataset=data,
                                  data_collator=train_api.collate, attention=data.attention,
                                  positions=data.positions, alpha=args.alpha)
    trainer.train()
    trainer.save_model(args.out)
    print({"final_loss": trainer.state.log_history[-2].get("loss")
           if len(trainer.state.log_history) > 1 else None})


if __name__ == "__main__":
    main()
