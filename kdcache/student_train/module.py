"""The LightningModule: student forward, KD + CE loss through the fused sparse-KL kernel, AdamW.

    loss = alpha * KD_T(teacher || student) + (1 - alpha) * CE(next token)

alpha = 1 is pure logit distillation, alpha = 0 the paper's cross-entropy baseline on the same
windows. Both terms come out of one call of `kdcache.kernels.fused_sparse_kl`, which applies the
tied lm_head blockwise (the N x V logits never exist) and shares the logsumexp between KD and CE.
Only rows with a target enter the loss (`labels != -100`: the window's last token and, in
document-masked data, each document's EOS have none).

Optimisation: AdamW (fused on CUDA), decoupled weight decay on matrices only, linear warmup then
cosine decay to `min_lr_ratio * lr`, gradient clipping by the Trainer. On CUDA the Trainer runs
bf16 autocast; the loss then takes bf16 hidden states and weight (fp32 accumulation inside).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from kdcache.errors import ConfigMismatchError, KdcacheError
from kdcache.kernels import fused_sparse_kl
from kdcache.student_train.data import IGNORE_INDEX, target_rows
from kdcache.student_train.hf_student import load_hf_student
from kdcache.student_train.model import ModelArgs, Student, load_hf


class NonFiniteLossError(KdcacheError):
    """Training produced a NaN or infinite loss; it stops rather than train on (or export) it."""


@dataclass
class LossConfig:
    alpha: float = 1.0  # weight of KD; 1 - alpha weighs CE
    temperature: float = 1.0
    tail: str = "renormalize"  # how the teacher mass outside the top-k is treated (kernels)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"loss.alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ValueError(f"loss.temperature must be > 0, got {self.temperature}")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 100
    total_steps: int = 1000  # length of the cosine schedule
    min_lr_ratio: float = 0.1
    fused: bool | None = None  # fused AdamW; None: on CUDA


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base LR at `step`: linear warmup, cosine down to min_lr_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=True if fused else None)


def distillation_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], loss_cfg: LossConfig,
                      loss_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Forward the student on a batch and return {'loss', 'kd', 'ce'} (tensors) and 'rows' (the
    number of positions in the loss)."""
    hidden = model(batch["tokens"], batch["seg_ids"])  # (R, L, d)
    h, target_ids, target_logprobs, labels = target_rows(hidden, batch)
    weight = model.lm_head_weight
    bias = getattr(model, "lm_head_bias", None)  # an HF student's head may carry one
    if loss_dtype is not None:
        h, weight = h.to(loss_dtype), weight.to(loss_dtype)
    if bias is not None:
        bias = bias.to(weight.dtype)
    kd, ce = fused_sparse_kl(h, weight, target_ids, target_logprobs, labels, bias=bias,
                             tail=loss_cfg.tail, temperature=loss_cfg.temperature,
                             ignore_index=IGNORE_INDEX, reduction="mean",
                             loss_weights=(loss_cfg.alpha, 1.0 - loss_cfg.alpha))
    alpha = loss_cfg.alpha
    if alpha == 1.0:
        loss = kd
    elif alpha == 0.0:
        loss = ce
    else:
        loss = alpha * kd + (1.0 - alpha) * ce
    return {"loss": loss, "kd": kd.detach(), "ce": ce.detach(), "rows": len(labels)}


class StudentModule(pl.LightningModule):
    """Trains a `Student` from teacher targets; see the module docstring for the loss."""

    def __init__(self, model_args: ModelArgs | None, loss: LossConfig | None = None,
                 optim: OptimConfig | None = None, compile_blocks: bool = False,
                 checkpoint_layers: int = 0, init_from: str | None = None,
                 hf_student: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model_args = model_args
        self.loss_cfg = loss or LossConfig()
        self.optim_cfg = optim or OptimConfig()
        # Checkpoints record plain values, not kdcache classes, so any kdcache can read them.
        self.save_hyperparameters({
            "model_args": model_args.as_dict() if model_args else None,
            "loss": asdict(self.loss_cfg), "optim": asdict(self.optim_cfg),
            "compile_blocks": compile_blocks, "checkpoint_layers": checkpoint_layers,
            "init_from": init_from or (hf_student or {}).get("path"), "hf_student": hf_student})
        if hf_student is not None:
            # Any transformers causal LM: its own weights (or random init), masks and head.
            self.model = load_hf_student(**hf_student)
            self.model.set_checkpoint_layers(checkpoint_layers)
        elif init_from:
            # A later stage: the previous stage's weights, this stage's theta and masks.
            self.model = load_hf(init_from, rope_theta=self.model_args.rope_theta,
                                 attention=self.model_args.attention,
                                 positions=self.model_args.positions,
                                 max_seq_len=self.model_args.max_seq_len)
            shape = ("n_layer", "n_head", "n_kv_head", "dim", "ffn_dim", "vocab_size")
            loaded = {f: getattr(self.model.args, f) for f in shape}
            wanted = {f: getattr(self.model_args, f) for f in shape}
            if loaded != wanted:
                raise ConfigMismatchError(
                    f"{init_from}: the model to start from has {loaded}, this stage's config "
                    f"asks for {wanted}")
            self.model_args = self.model.args
        else:
            self.model = Student(self.model_args)
        if hf_student is None:
            self.model.checkpoint_layers = checkpoint_layers
        self.compile_blocks = compile_blocks
        self.loss_history: list[float] = []  # per step, rank 0's view (tests, summaries)
        self._step_started: float | None = None

    def setup(self, stage: str) -> None:
        if self.compile_blocks and torch.cuda.is_available():
            self.model.compile_blocks()

    def _loss_dtype(self) -> torch.dtype | None:
        precision = str(getattr(self.trainer, "precision", "32")) if self._trainer else "32"
        return torch.bfloat16 if precision.startswith("bf16") else None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = distillation_loss(self.model, batch, self.loss_cfg, self._loss_dtype())
        self.check_finite(out, batch)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "mark_consumed"):
            datamodule.mark_consumed(batch)  # before any checkpoint of this step is written
        self.loss_history.append(float(out["loss"].detach()))
        now = time.perf_counter()
        logs = {"loss": out["loss"].detach(), "kd": out["kd"], "ce": out["ce"],
                "lr": self.optimizers().param_groups[0]["lr"] if self._trainer else 0.0,
                "epoch_data": float(batch["epoch"])}
        if self._step_started is not None:
            seconds = now - self._step_started
            logs["tokens_per_s"] = float(batch["n_tokens"]) * self.trainer.world_size / seconds
        self._step_started = now
        self.log_dict(logs, prog_bar=True, on_step=True, on_epoch=False, batch_size=1,
                      rank_zero_only=True)
        return out["loss"]

    def check_finite(self, out: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        """Stop before the optimizer step on a NaN/inf loss (on any rank): the weights are still
        those of the last good step, and nothing is exported."""
        finite = bool(torch.isfinite(out["loss"].detach()))
        if self._trainer is not None:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        values = {key: float(out[key].detach()) for key in ("loss", "kd", "ce")}
        windows = batch.get("windows")
        where = f" on windows {windows.tolist()}" if windows is not None else ""
        raise NonFiniteLossError(
            f"step {self.global_step}: the loss is not finite (loss {values['loss']}, kd "
            f"{values['kd']}, ce {values['ce']}){where}; stopped before updating or "
            "exporting any weights. Check the data with `kdcache verify`, or lower optim.lr.")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        # Fused AdamW (CUDA) "handles unscaling", so Lightning's mixed-precision plugin refuses to
        # clip for it; under bf16 there is no loss scaler and the gradients are the true ones:
        # clip them here. With a scaler (16-mixed) Lightning's own path applies.
        plugin = self.trainer.precision_plugin
        if (gradient_clip_val and getattr(optimizer, "_step_supports_amp_scaling", False)
                and getattr(plugin, "scaler", None) is None):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.optim_cfg)
        cfg = self.optim_cfg
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, cfg.warmup_steps, cfg.total_steps,
                                              cfg.min_lr_ratio))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
