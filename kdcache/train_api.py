"""kdcache as a library: logit-dataset windows, document masks and the fused loss for any loop.

For users who train with their own PyTorch loop, the HF `Trainer`, TRL or anything else:

    data = WindowDataset(["path/to/dataset"])            # batches, in the data's packing mode
    for batch in torch.utils.data.DataLoader(data, batch_size=None):
        hidden = hidden_states(model, batch, data.attention, data.positions)
        kd, ce = distill_loss(hidden, model.get_output_embeddings(), batch, alpha=0.5)
        (0.5 * kd + 0.5 * ce).backward()

- `WindowDataset`: a `torch.utils.data.IterableDataset` over the windows of one or more logit
  datasets (kdcache's seeded, resumable order; windows cut at document boundaries with `window=`
  for document-mode data; this rank's share under torch.distributed). Each item is a batch dict:
  tokens [R, L], seg_ids [R, L] (document index, -1 padding), position_ids [R, L] (global or
  reset, as the teacher saw them), labels [R, L] (-100 where no target), target_ids [R, L, k]
  (-1 pads) and target_logprobs [R, L, k]. `attention` / `positions` say which mask the targets
  need. `collate` turns a list of such items into one (for loaders that batch, like the Trainer's).
- `hidden_states(model, batch, attention, positions)`: the final hidden states of any
  transformers causal LM under the document mask (through the model's own attention interface;
  see kdcache.student_train.hf_student), never its full logits.
- `distill_loss(outputs_or_hidden, lm_head, batch)` -> (kd, ce): the fused sparse-KL loss on the
  model's own head (an nn.Linear, tied or not, with its bias; or a weight tensor).
- `compute_loss(model, inputs, return_outputs=False, ...)`: the same as a drop-in for
  `transformers.Trainer.compute_loss` (see examples/hf_trainer.py).
"""

from __future__ import annotations

import weakref
from typing import Any, Iterator

import torch

from kdcache.kernels import fused_sparse_kl
from kdcache.student_train.data import (IGNORE_INDEX, DataConfig, DataState, WindowBatches,
                                        target_rows)
from kdcache.student_train.hf_student import HFStudent
from kdcache.student_train.model import mode_for_packing
from kdcache.student_train.rope import positions_for

BATCH_KEYS = ("tokens", "seg_ids", "position_ids", "labels", "target_ids", "target_logprobs")


class WindowDataset(torch.utils.data.IterableDataset):
    """Training batches from logit datasets; see the module docstring for what an item holds."""

    def __init__(self, paths: list[str], *, window: int | None = None, batch_windows: int = 1,
                 seed: int = 0, holdout_windows: int = 0, epochs: int | None = None,
                 vocab_size: int | None = None, attention: str | None = None,
                 positions: str | None = None, rank: int | None = None,
                 world_size: int | None = None, verify_hashes: bool = True) -> None:
        super().__init__()
        self.config = DataConfig(paths=list(paths), window=window, batch_windows=batch_windows,
                                 seed=seed, holdout_windows=holdout_windows,
                                 verify_hashes=verify_hashes)
        self.epochs = epochs  # None: repeat forever (the loop decides when to stop)
        self.vocab_size = vocab_size  # refuse target ids the student has no row for
        self._batches = self._epoch_batches(0)
        header = self._batches.data.header
        self.header = header
        self.attention, self.positions = mode_for_packing(
            header.packing["mode"], attention, positions, where=str(paths[0]))
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (
            torch.distributed.get_world_size() if distributed else 1)

    def _epoch_batches(self, epoch: int) -> WindowBatches:
        return WindowBatches(self.config, DataState(seed=self.config.seed, epoch=epoch),
                             getattr(self, "rank", 0), getattr(self, "world_size", 1),
                             self.vocab_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            batches = self._epoch_batches(epoch)
            batches._data = self._batches._data  # the datasets opened once
            produced = False
            for batch in batches:
                produced = True
                seg = batch["seg_ids"]
                if self.attention == "causal":
                    seg = torch.where(seg < 0, seg, torch.zeros_like(seg))
                batch["position_ids"] = positions_for(seg, self.positions)
                yield batch
            if not produced:
                return
            epoch += 1

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_batches"] = self._epoch_batches(0)  # workers reopen the datasets
        return state


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """One batch from items of WindowDataset (rows stacked; the tensors only)."""
    if len(items) == 1:
        return {key: items[0][key] for key in BATCH_KEYS}
    return {key: torch.cat([item[key] for item in items]) for key in BATCH_KEYS}


_students: "weakref.WeakKeyDictionary[torch.nn.Module, HFStudent]" = weakref.WeakKeyDictionary()


def as_student(model: torch.nn.Module, attention: str, positions: str) -> HFStudent:
    """kdcache's view of a transformers causal LM (shares its parameters; checked once)."""
    model = getattr(model, "module", model)  # DistributedDataParallel and friends
    if isinstance(model, HFStudent):
        return model
    student = _students.get(model)
    if student is None:
        student = HFStudent(model, attention=attention, positions=positions)
        _students[model] = student
    student.attention, student.positions = attention, positions
    return student


def hidden_states(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                  attention: str = "document", positions: str = "global") -> torch.Tensor:
    """Final hidden states [R, L, d] of a transformers causal LM on a batch, document-masked."""
    student = as_student(model, attention, positions)
    return student(batch["tokens"], batch["seg_ids"], batch.get("position_ids"))


def distill_loss(outputs: Any, lm_head: torch.nn.Module | torch.Tensor,
                 batch: dict[str, torch.Tensor], *, alpha: float = 1.0,
                 temperature: float = 1.0, tail: str = "renormalize",
                 loss_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(KD, CE), means over the rows with a target, from final hidden states (a tensor, or model
    outputs with `last_hidden_state`) and the model's lm_head. Back-propagate
    `alpha * kd + (1 - alpha) * ce` (the gradient is formed for that mix; others cost a pass)."""
    hidden = outputs if isinstance(outputs, torch.Tensor) else outputs.last_hidden_state
    if isinstance(lm_head, torch.nn.Module):
        weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    else:
        weight, bias = lm_head, None
    h, target_ids, target_logprobs, labels = target_rows(hidden, batch)
    if loss_dtype is None and h.is_cuda and torch.is_autocast_enabled("cuda"):
        loss_dtype = torch.get_autocast_dtype("cuda")
    if loss_dtype is not None:
        h, weight = h.to(loss_dtype), weight.to(loss_dtype)
    elif weight.dtype != h.dtype:
        weight = weight.to(h.dtype)
    if bias is not None:
        bias = bias.to(weight.dtype)
    return fused_sparse_kl(h, weight, target_ids, target_logprobs, labels, bias=bias, tail=tail,
                           temperature=temperature, ignore_index=IGNORE_INDEX, reduction="mean",
                           loss_weights=(alpha, 1.0 - alpha))


def compute_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                 return_outputs: bool = False, num_items_in_batch: Any = None, *,
                 alpha: float = 1.0, temperature: float = 1.0, tail: str = "renormalize",
                 attention: str = "document", positions: str = "global"):
    """`transformers.Trainer.compute_loss` for distillation from a kdcache batch: returns the
    loss (and {'kd', 'ce'} with return_outputs)."""
    student = as_student(model, attention, positions)
    hidden = hidden_states(student, inputs, attention, positions)
    kd, ce = distill_loss(hidden, student.model.get_output_embeddings(), inputs, alpha=alpha,
                          temperature=temperature, tail=tail)
    loss = kd if alpha == 1.0 else ce if alpha == 0.0 else alpha * kd + (1.0 - alpha) * ce
    if return_outputs:
        return loss, {"kd": kd.detach(), "ce": ce.detach()}
    return loss
