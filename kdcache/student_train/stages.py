"""Training runs as a list of stages read from one YAML file; phase-wise RoPE lives here.

A run file:

    name: phasewise-kd-tiny
    output_dir: runs/phasewise-kd-tiny
    defaults:                        # merged (deeply) into every stage
      model: {preset: tiny, vocab_size: dataset}
      loss: {alpha: 1.0, temperature: 1.0}
      data: {paths: [demo-out/dataset]}
    stages:
      - name: stage1
        model: {rope_theta: 10000}
        data: {window: 256}          # cut from document-mode data (refused otherwise)
        trainer: {max_steps: 100}
      - name: stage2
        init_from: previous          # stage 1's exported weights, with this stage's theta
        model: {rope_theta: 500000}
        trainer: {max_steps: 50}

Each stage trains with Lightning into `<output_dir>/<stage>/` (checkpoints/, logs/), then exports
the student as an HF Llama directory `<output_dir>/<stage>/hf/` and writes `summary.json`. A stage
whose summary exists is skipped; a stage with `checkpoints/last.ckpt` resumes from it (weights,
optimizer, schedule and data order). A later stage starts from the previous stage's exported
weights with a fresh optimizer and schedule: that, with a new `rope_theta`, is phase-wise RoPE.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any

from kdcache.errors import KdcacheError
from kdcache.formats.storage import atomic_write_bytes, resolve
from kdcache.student_train.data import DataConfig, WindowDataModule
from kdcache.student_train.hf_student import hf_student_spec
from kdcache.student_train.model import ModelArgs, mode_for_packing, read_hf_args, save_hf
from kdcache.student_train.module import LossConfig, OptimConfig, StudentModule
from kdcache.student_train.progress import StepProgressBar
from kdcache.student_train.vocab_check import check_vocab, student_vocab, teacher_vocab

log = logging.getLogger("kdcache.train")


class TrainConfigError(KdcacheError):
    """A training config file is malformed (unknown key, wrong type, missing field)."""


# One config story: a run file is read into typed dataclasses (ModelArgs, DataConfig, LossConfig,
# OptimConfig beside the code they configure, and the ones below) by `_build`, field by field from their
# type hints; nothing downstream sees a dict. A stage's `model:` section is a ModelArgs request,
# resolved for the dataset by `model_args_for`.
@dataclass
class TrainerConfig:
    max_steps: int = 100
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | None = None  # None: bf16-mixed on CUDA, 32-true on CPU
    gradient_clip_val: float = 1.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    checkpoint_every: int = 100
    progress_bar: bool = True


@dataclass
class StageConfig:
    name: str
    data: DataConfig
    model: ModelArgs = field(default_factory=ModelArgs)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    init_from: str | None = None  # "previous", an HF directory, or None (random init)
    student: str | None = None  # any transformers causal-LM directory (instead of a preset)
    init: str = "pretrained"  # the student's weights as they are, or "random" from its config


@dataclass
class RunConfig:
    name: str
    output_dir: str
    stages: list[StageConfig]
    source: str = ""


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _build(cls, values: Any, where: str):
    """A `cls` dataclass from a YAML mapping: unknown keys refused, nested dataclasses built from
    their sections, YAML lists turned into the tuples a field's type asks for."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise TrainConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name for f in fields(cls) if f.init and f.metadata.get("run_file", True)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TrainConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {key: _value(hints[key], value, f"{where}.{key}") for key, value in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise TrainConfigError(f"{where}: {exc}") from None


def _value(hint: Any, value: Any, where: str) -> Any:
    if is_dataclass(hint):
        return _build(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if origin is list and isinstance(value, str):  # `paths: ds` for `paths: [ds]`
        return [value]
    return value


def parse_run(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{source}: a run config is a mapping with 'stages'")
    unknown = sorted(set(raw) - {"name", "output_dir", "defaults", "stages", "student", "init"})
    if unknown:
        raise TrainConfigError(f"{source}: unknown top-level key(s) {unknown}")
    student = raw.get("student")
    if student is not None and not isinstance(student, str):
        raise TrainConfigError(f"{source}: 'student' is the path of an HF model directory")
    stages_raw = raw.get("stages")
    if not stages_raw or not isinstance(stages_raw, list):
        raise TrainConfigError(f"{source}: 'stages' must be a non-empty list")
    defaults = raw.get("defaults") or {}
    stages = []
    for index, stage_raw in enumerate(stages_raw):
        merged = _merge(defaults, stage_raw or {})
        merged.setdefault("name", f"stage{index + 1}")
        merged.setdefault("student", student)  # the run's HF student, for every stage
        merged.setdefault("init", raw.get("init", "pretrained"))
        where = f"{source}: stage {merged['name']!r}"
        if isinstance(merged.get("data") or {}, dict):  # paths may come from --data later
            merged["data"] = {"paths": [], **(merged.get("data") or {})}
        stage = _build(StageConfig, merged, where)
        if "total_steps" not in (merged.get("optim") or {}):  # the cosine ends with training
            stage.optim.total_steps = stage.trainer.max_steps
        if stage.init not in ("pretrained", "random"):
            raise TrainConfigError(f"{where}: init must be 'pretrained' or 'random', got "
                                   f"{stage.init!r}")
        stages.append(stage)
    if stages[0].init_from == "previous":
        raise TrainConfigError(f"{source}: the first stage cannot start from 'previous'")
    return RunConfig(name=raw.get("name") or os.path.splitext(os.path.basename(source))[0],
                     output_dir=raw.get("output_dir") or os.path.join("runs", raw.get("name", "run")),
                     stages=stages, source=source)


def load_run(path: str) -> RunConfig:
    import yaml

    try:
        with open(path) as handle:
            raw = yaml.safe_load(handle)
    except FileNotFoundError:
        raise TrainConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        raise TrainConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_run(raw, source=path)


def bundled_configs() -> list[str]:
    """The YAML configs shipped with kdcache (paper settings, KD and CE, paper and tiny sizes)."""
    directory = os.path.join(os.path.dirname(__file__), "configs")
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".yaml"))


def resolve_config_path(name: str) -> str:
    if os.path.exists(name):
        return name
    for path in bundled_configs():
        if os.path.splitext(os.path.basename(path))[0] == name:
            return path
    raise TrainConfigError(f"{name}: no such config file or bundled config "
                           f"({', '.join(os.path.basename(p)[:-5] for p in bundled_configs())})")


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "generation_config.json")


def student_tokenizer_dir(stage: StageConfig, header) -> str | None:
    """The student's tokenizer: the configured one, or, for a student that takes the dataset's
    vocabulary, the teacher's (when its directory is on this machine)."""
    if stage.model.tokenizer:
        return stage.model.tokenizer
    if stage.model.vocab_size != "dataset":
        return None
    teacher = header.teacher or {}
    path = teacher.get("tokenizer_path") or teacher.get("path")
    if path and os.path.exists(os.path.join(str(path), "tokenizer.json")):
        return str(path)
    return None


def copy_tokenizer(src: str | None, hf_dir: str) -> None:
    """Put the tokenizer beside the exported weights, so transformers and vLLM load the student
    (and `kdcache eval needle` can build prompts) with no other directory."""
    if not src:
        return
    for name in _TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(hf_dir, name))


def model_args_for(stage: StageConfig, header, where: str, start_theta: float | None = None):
    """ModelArgs for a stage on a dataset: preset + theta + the mask/positions the data needs,
    after the vocabulary check. `start_theta`: the theta of the model the stage starts from,
    kept unless the stage sets its own (a start model is reproduced exactly)."""
    cfg = stage.model
    attention, positions = mode_for_packing(header.packing["mode"], cfg.attention, cfg.positions,
                                            force=cfg.force_mode, where=where)
    overrides = dict(cfg.overrides)
    if cfg.vocab_size == "dataset":
        overrides["vocab_size"] = header.vocab_size
    elif cfg.vocab_size is not None:
        overrides["vocab_size"] = int(cfg.vocab_size)
    theta = cfg.rope_theta if cfg.rope_theta is not None else start_theta
    overrides.update(rope_theta=float(theta if theta is not None else 10_000.0),
                     attention=attention, positions=positions)
    for key in ("bos_id", "eos_id"):
        value = header.packing.get(key)
        if value is not None and key not in overrides:
            overrides[key] = int(value)
    # the request, resolved: the same choices, with the architecture they give on this data
    args = replace(cfg, **ModelArgs.from_preset(cfg.preset, **overrides).as_dict())
    verdict = check_vocab(student_vocab(args.vocab_size, student_tokenizer_dir(stage, header),
                                        f"preset {cfg.preset}"),
                          teacher_vocab(header, where))
    log.info("%s: %s", where, verdict)
    return args, verdict


def _precision(trainer_cfg: TrainerConfig) -> str:
    import torch

    if trainer_cfg.precision:
        return trainer_cfg.precision
    cuda = torch.cuda.is_available() and trainer_cfg.accelerator in ("auto", "gpu", "cuda")
    return "bf16-mixed" if cuda else "32-true"


def build_trainer(stage: StageConfig, stage_dir: str, callbacks: list | None = None,
                  logger: Any = True):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    t = stage.trainer
    checkpoint = ModelCheckpoint(dirpath=os.path.join(stage_dir, "checkpoints"),
                                 every_n_train_steps=t.checkpoint_every, save_last=True,
                                 save_top_k=1, filename="step{step:06d}",
                                 auto_insert_metric_name=False)
    if logger is True:
        logger = CSVLogger(stage_dir, name="logs")  # a new version per (re)start
    callbacks = [checkpoint, *(callbacks or [])]
    if t.progress_bar:
        callbacks.append(StepProgressBar(f"train {stage.name}"))
    return pl.Trainer(
        max_steps=t.max_steps, max_epochs=-1, accelerator=t.accelerator, devices=t.devices,
        num_nodes=t.num_nodes, strategy=t.strategy, precision=_precision(t),
        gradient_clip_val=t.gradient_clip_val, accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=t.log_every_n_steps,
        callbacks=callbacks, logger=logger,
        use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0,
        enable_progress_bar=t.progress_bar, enable_model_summary=False,
        default_root_dir=stage_dir)


def prepare_stage(stage: StageConfig, stage_dir: str, previous_hf: str | None):
    """The data module and the LightningModule for one stage (nothing is trained yet)."""
    datamodule = WindowDataModule(stage.data)
    where = f"stage {stage.name!r} data {stage.data.paths[0] if stage.data.paths else '?'}"
    if not stage.data.paths:
        raise TrainConfigError(f"stage {stage.name!r}: data.paths is empty (give --data PATH)")
    import lightning.pytorch as pl

    init_from = previous_hf if stage.init_from == "previous" else stage.init_from
    hf_dir = init_from if stage.student and init_from else stage.student
    if hf_dir:
        spec, vocab_rows, verdict = hf_student_spec(
            stage, datamodule.header, where, hf_dir,
            init="pretrained" if init_from else stage.init)
        datamodule.student_vocab_size = vocab_rows
        pl.seed_everything(stage.model.init_seed, workers=True, verbose=False)
        module = StudentModule(None, stage.loss, stage.optim, compile_blocks=stage.model.compile,
                               checkpoint_layers=stage.model.checkpoint_layers, hf_student=spec)
        return datamodule, module, verdict
    start_theta = None
    if init_from:
        start_theta = read_hf_args(init_from).rope_theta  # refuses what it cannot reproduce
    args, verdict = model_args_for(stage, datamodule.header, where, start_theta)
    if start_theta is not None and args.rope_theta != start_theta:
        log.info("stage %s: starts from %s (rope_theta %g) with rope_theta %g", stage.name,
                 init_from, start_theta, args.rope_theta)
    datamodule.student_vocab_size = args.vocab_size
    pl.seed_everything(stage.model.init_seed, workers=True, verbose=False)
    module = StudentModule(args, stage.loss, stage.optim, compile_blocks=stage.model.compile,
                           checkpoint_layers=stage.model.checkpoint_layers, init_from=init_from)
    return datamodule, module, verdict


def _checkpoint_problem(path: str) -> str | None:
    """Why a checkpoint file cannot be resumed from (None if intact). torch checkpoints are zip
    archives: the central directory and every member's CRC are checked, nothing is unpickled."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return f"member {bad} is corrupt" if bad else None


def resume_checkpoint(directory: str) -> str | None:
    """The newest intact checkpoint to resume from: last.ckpt, else the newest step checkpoint
    (with a warning); None when there is none. Unusable ones only: a clear error."""
    import re

    if not os.path.isdir(directory):
        return None
    steps = sorted((f for f in os.listdir(directory) if re.fullmatch(r"step\d+\.ckpt", f)),
                   reverse=True)
    candidates = [f for f in ["last.ckpt", *steps] if os.path.isfile(os.path.join(directory, f))]
    problems = []
    for name in candidates:
        path = os.path.join(directory, name)
        problem = _checkpoint_problem(path)
        if problem is None:
            if problems:
                log.warning("resuming from %s instead: %s", path, "; ".join(problems))
            return path
        problems.append(f"{path} is unreadable ({problem})")
    if problems:
        raise TrainConfigError("cannot resume: " + "; ".join(problems)
                               + ". Delete the checkpoints or pass --no-resume to start over.")
    return None


def stage_summary_path(stage_dir: str) -> str:
    """A finished stage's summary (its presence: the stage is done and is skipped)."""
    return os.path.join(stage_dir, "summary.json")


def stage_export_dir(stage_dir: str) -> str:
    """Where a finished stage's model is exported (an HF directory)."""
    return os.path.join(stage_dir, "hf")


def run_stage(stage: StageConfig, stage_dir: str, previous_hf: str | None = None, *,
              resume: bool = True, callbacks: list | None = None) -> dict[str, Any]:
    """Train one stage to `trainer.max_steps`, export it, return its summary."""
    summary_path = stage_summary_path(stage_dir)
    if resume and os.path.exists(summary_path):
        with open(summary_path) as handle:
            summary = json.load(handle)
        log.info("stage %s already finished (%s): skipped", stage.name, summary_path)
        return summary
    os.makedirs(stage_dir, exist_ok=True)
    datamodule, module, verdict = prepare_stage(stage, stage_dir, previous_hf)
    trainer = build_trainer(stage, stage_dir, callbacks)
    ckpt_path = resume_checkpoint(os.path.join(stage_dir, "checkpoints")) if resume else None
    started = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    seconds = time.time() - started
    hf_dir = stage_export_dir(stage_dir)
    trained = getattr(module.model, "args", module.model)  # ModelArgs, or the HFStudent itself
    summary = {
        "stage": stage.name, "steps": int(trainer.global_step), "seconds": round(seconds, 2),
        "resumed_from": ckpt_path, "init_from": module.hparams.get("init_from"),
        "rope_theta": trained.rope_theta, "attention": trained.attention,
        "positions": trained.positions, "vocab": verdict,
        "final_loss": module.loss_history[-1] if module.loss_history else None,
        "data_state": datamodule.state.as_dict(), "holdout_windows": stage.data.holdout_windows,
        "hf_dir": hf_dir,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }
    if trainer.is_global_zero:
        record = {"kdcache_training": {
            "stage": stage.name, "steps": summary["steps"], "loss": asdict(stage.loss),
            "data": list(stage.data.paths), "holdout_windows": stage.data.holdout_windows}}
        if module.model_args is None:  # an HF student: the same architecture, its tokenizer
            module.model.save(hf_dir, extra_config=record)
        else:
            save_hf(module.model, hf_dir, extra_config=record)
            copy_tokenizer(student_tokenizer_dir(stage, datamodule.header), hf_dir)
        fs, base = resolve(summary_path)
        atomic_write_bytes(fs, base, (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def run(config: RunConfig, *, only_stage: str | None = None, resume: bool = True,
        callbacks: list | None = None) -> list[dict[str, Any]]:
    """Run the stages in order (or one of them); each later stage starts from the one before."""
    summaries = []
    previous_hf = None
    names = [s.name for s in config.stages]
    if only_stage is not None and only_stage not in names:
        raise TrainConfigError(f"{config.source}: no stage {only_stage!r} (stages: {names})")
    for stage in config.stages:
        stage_dir = os.path.join(config.output_dir, stage.name)
        if only_stage is None or stage.name == only_stage:
            if stage.init_from == "previous" and (previous_hf is None
                                                  or not os.path.exists(previous_hf)):
                raise TrainConfigError(
                    f"stage {stage.name!r} starts from the previous stage, whose export "
                    f"{previous_hf} does not exist yet: run that stage first")
            summaries.append(run_stage(stage, stage_dir, previous_hf, resume=resume,
                                       callbacks=callbacks))
        previous_hf = stage_export_dir(stage_dir)
    return summaries
