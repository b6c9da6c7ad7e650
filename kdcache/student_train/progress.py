"""The training progress bar: optimizer steps out of `max_steps`, on stderr.

Lightning's default bars count batches per epoch ("Epoch 0/-2" with max_epochs=-1, where an
epoch is only one pass over the windows) and print to stdout, which `--json` output shares.
A stage is defined by its steps, so the bar shows steps, resumed runs starting where they left.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class StepProgressBar(TQDMProgressBar):
    def __init__(self, description: str = "train") -> None:
        super().__init__()
        self.description = description

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(desc=self.description, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stderr, smoothing=0, unit="step",
                    bar_format=self.BAR_FORMAT)

    def on_train_start(self, trainer, *_: Any) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        self.train_progress_bar.update(trainer.global_step)

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        pass  # one bar for the whole stage, not one per pass over the data

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar.disable:
            return
        bar.update(trainer.global_step - bar.n)
        bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass

    def on_train_end(self, *_: Any) -> None:
        self.train_progress_bar.close()
