"""`kdcache train`: train a student from logit datasets, stage by stage, from a YAML config."""

from __future__ import annotations

import argparse
import json
import logging
import os

# The handlers import what they run inside themselves: `kdcache --help` imports every commands
# module, and pyarrow, numba, torch, vLLM or Ray at module level would make it take seconds.

_DESCRIPTION = """\
Train a student from one or more kdcache logit datasets with Lightning: the built-in
Llama-style one (presets), or any transformers causal LM directory (`student: HF_DIR` or
--student HF_DIR; its pretrained weights, or `init: random`), exported as the same
architecture. The config is a YAML run file: a list of stages (window, RoPE theta, loss alpha
and temperature, data, steps) with shared defaults; a later stage starts from the previous stage's
exported weights with its own theta (phase-wise RoPE, e.g. 10k at 2,048 tokens, then 500k at
131,072). The loss is alpha * KD(T) + (1 - alpha) * CE through the fused sparse-KL kernel.

The attention mask and positions follow the dataset's packing mode (causal -> causal + global,
document -> document + reset, document-global -> document + global); a student vocabulary that
differs from the teacher's is refused. Each stage writes <out>/<stage>/checkpoints/ (resumed from
last.ckpt when present, with the same data order), logs/ (CSV metrics: loss, kd, ce, lr,
tokens_per_s), hf/ (the student as a Hugging Face directory, loadable by transformers and
vLLM: a Llama for the built-in student, the student's own architecture otherwise) and
summary.json. A model kdcache cannot train exactly (logit soft-capping or scaling, attention
soft-capping, other layer types) is refused, naming the missing piece.

--config takes a path or the name of a bundled config: paper-{fixed10k,fixed500k,phasewise}-{kd,ce}
at the paper's 1.1B size and tiny-{...}-{kd,ce} for CPU (list them with --list-configs).
Example:  kdcache train --config tiny-phasewise-kd --data demo-out/dataset --out runs/tiny
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a student from logit datasets (stages, "
                              "phase-wise RoPE, KD/CE)", description=_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run YAML file, or a bundled config's name")
    p.add_argument("--data", action="append", metavar="PATH",
                   help="dataset path or URL for every stage, or STAGE=PATH for one stage "
                   "(repeat for several datasets); replaces data.paths of the config")
    p.add_argument("--out", help="output directory (replaces the config's output_dir)")
    p.add_argument("--stage", help="run only this stage (its predecessor must be finished)")
    p.add_argument("--student", metavar="HF_DIR",
                   help="train this transformers causal-LM directory (Llama, Qwen2/3, Mistral, "
                   "Gemma 3, Phi-3, ...) instead of the config's preset; replaces `student:`")
    p.add_argument("--init", choices=("pretrained", "random"),
                   help="the student's weights as they are (default) or a random init from its "
                   "config; replaces `init:`")
    p.add_argument("--max-steps", type=int, help="override trainer.max_steps of every stage")
    p.add_argument("--holdout-windows", type=int, default=None, metavar="N",
                   help="never train on the last N windows of the data (evaluate on them with "
                        "`kdcache eval lm --last-windows N`); replaces data.holdout_windows")
    p.add_argument("--workers", type=int, help="DataLoader workers per rank")
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if checkpoints or finished stages exist")
    p.add_argument("--list-configs", action="store_true", help="list the bundled configs and exit")
    p.add_argument("--json", action="store_true", help="print the stage summaries as one JSON line")
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from kdcache.student_train import stages

    if args.list_configs:
        for path in stages.bundled_configs():
            print(os.path.splitext(os.path.basename(path))[0])
        return 0
    if not args.config:
        raise stages.TrainConfigError("--config is required (a YAML file or a bundled name)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = stages.load_run(stages.resolve_config_path(args.config))
    if args.out:
        config.output_dir = args.out
    data_for: dict[str | None, list[str]] = {}
    for item in args.data or []:
        name, sep, path = item.partition("=")
        stage_name = name if sep and name in {s.name for s in config.stages} else None
        data_for.setdefault(stage_name, []).append(path if stage_name else item)
    for stage in config.stages:
        paths = data_for.get(stage.name) or data_for.get(None)
        if paths:
            stage.data.paths = list(paths)
        if args.max_steps is not None:
            if stage.optim.total_steps == stage.trainer.max_steps:
                stage.optim.total_steps = args.max_steps
            stage.trainer.max_steps = args.max_steps
        if args.student:
            stage.student = args.student
        if args.init:
            stage.init = args.init
        if args.workers is not None:
            stage.data.num_workers = args.workers
        if args.holdout_windows is not None:
            stage.data.holdout_windows = args.holdout_windows
        if args.json:
            stage.trainer.progress_bar = False
    summaries = stages.run(config, only_stage=args.stage, resume=not args.no_resume)
    if args.json:
        print(json.dumps(summaries))
    else:
        print(f"\n{config.name}: {len(summaries)} stage(s) -> {config.output_dir}")
        for s in summaries:
            loss = s.get("final_loss")
            metrics = s.get("metrics", {})
            print(f"  {s['stage']:<10} steps {s['steps']:>6}  theta {s['rope_theta']:>9g}  "
                  f"{s['attention']}/{s['positions']}  loss {loss if loss is None else round(loss, 4)}"
                  f"  kd {metrics.get('kd', float('nan')):.4f}  ce {metrics.get('ce', float('nan')):.4f}"
                  f"  model {s['hf_dir']}")
    return 0
