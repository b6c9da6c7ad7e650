"""Does a student from random weights learn passkey retrieval within its documents from the
replicate corpus (kdcache/replicate/corpus.py)? A CPU-sized calibration of `passkey_share` and
`copy_share`: the smoke preset's tokenizer (an untrained smoke teacher: CE students ignore its
targets), documents of at most --doc-max tokens packed into --window windows (document-global),
one CE stage (alpha 0) through the replicate run file's trainer, then the evaluation's passkey
prompts at lengths within the document limit. Prints one JSON line per run.

    python3 bench/bench_student_corpus.py --passkey-share 0 0.2 0.2 --copy-share 0 0 0.3
    python3 bench/bench_student_corpus.py --passkey-share 0.2 --copy-share 0.3 \
        --copy-stage-steps 450   # a first stage on copying documents alone
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace

from kdcache.replicate.corpus import write_short_corpus
from kdcache.replicate.evaluation import needle_config, needle_record
from kdcache.replicate.pipeline import dump_options
from kdcache.replicate.presets import get_preset
from kdcache.student_train.stages import parse_run, run
from kdcache.teacher_dump.make_teacher import TeacherConfig, build_teacher
from kdcache.teacher_dump.plan import DumpConfig
from kdcache.teacher_dump.runner import run_dump


def one_run(work: str, teacher: str, passkey: float, copy: float, args) -> dict:
    preset = replace(get_preset("smoke"), doc_max_tokens=args.doc_max, short_window=args.window,
                     long_window=2 * args.window, corpus_documents=args.documents,
                     passkey_share=passkey, copy_share=copy, k=4)
    tag = f"p{passkey}-c{copy}"
    corpus = os.path.join(work, f"corpus-{tag}.jsonl")
    record = write_short_corpus(corpus, teacher, preset, seed=0)
    data = os.path.join(work, f"data-{tag}")
    t0 = time.perf_counter()
    run_dump(DumpConfig.from_options(**dump_options(teacher, corpus, data, args.window,
                                                    "document-global", preset)),
             log=lambda m: None)
    dump_s = time.perf_counter() - t0
    spec = {"name": tag, "output_dir": os.path.join(work, f"student-{tag}"),
            "defaults": {"model": {"preset": args.student, "vocab_size": "dataset",
                                   "init_seed": 0, "tokenizer": teacher},
                         "loss": {"alpha": 0.0},
                         "optim": {"lr": args.lr, "warmup_steps": max(1, args.steps // 10)},
                         "data": {"seed": 0, "batch_windows": args.batch},
                         "trainer": {"accelerator": "cpu", "checkpoint_every": args.steps,
                                     "progress_bar": False, "log_every_n_steps": 10}},
            "stages": [{"name": "stage1", "model": {"rope_theta": 10_000.0},
                        "data": {"paths": [data]}, "trainer": {"max_steps": args.steps}}]}
    if args.copy_stage_steps:
        # a first stage on copying documents alone (the teacher's phase 1), then the mix
        copy_preset = replace(preset, passkey_share=0.0, copy_share=1.0)
        copy_corpus = os.path.join(work, f"corpus-copy-{tag}.jsonl")
        write_short_corpus(copy_corpus, teacher, copy_preset, seed=1)
        copy_data = os.path.join(work, f"data-copy-{tag}")
        run_dump(DumpConfig.from_options(**dump_options(teacher, copy_corpus, copy_data,
                                                        args.window, "document-global",
                                                        copy_preset)), log=lambda m: None)
        spec["stages"] = [{"name": "copy", "model": {"rope_theta": 10_000.0},
                           "data": {"paths": [copy_data]},
                           "trainer": {"max_steps": args.copy_stage_steps}},
                          {**spec["stages"][0], "init_from": "previous"}]
    t0 = time.perf_counter()
    summary = run(parse_run(spec, source="bench"))[-1]
    train_s = time.perf_counter() - t0
    lengths = [n for n in args.lengths if n <= args.doc_max]
    needle = needle_record(summary["hf_dir"], needle_config(replace(
        preset, needle_lengths=tuple(lengths), needle_depths=(0.1, 0.5, 0.9),
        needle_samples=args.samples)))
    return {"passkey_share": passkey, "copy_share": copy, "student": args.student,
            "copy_stage_steps": args.copy_stage_steps,
            "steps": args.steps, "tokens_per_step": args.batch * args.window,
            "doc_max": args.doc_max, "corpus": record["by_kind"],
            "final_loss": summary.get("final_loss"), "train_s": round(train_s, 1),
            "dump_s": round(dump_s, 1), "accuracy": needle["accuracy"],
            "by_length": {n: sum(s["score"] for s in needle["samples"] if s["length"] == n)
                          / max(1, sum(s["length"] == n for s in needle["samples"]))
                          for n in lengths},
            "by_distance": needle["by_distance"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passkey-share", type=float, nargs="+", default=[0.0, 0.1, 0.1])
    ap.add_argument("--copy-share", type=float, nargs="+", default=[0.0, 0.0, 0.1])
    ap.add_argument("--doc-max", type=int, default=384)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--documents", type=int, default=3000)
    ap.add_argument("--student", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lengths", type=int, nargs="+", default=[192, 288, 384])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--copy-stage-steps", type=int, default=0,
                    help="steps of a first stage on copying documents alone (0: none)")
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="kdcache-student-corpus-")
    teacher = os.path.join(work, "teacher")
    if not os.path.exists(os.path.join(teacher, "config.json")):
        build_teacher(teacher, TeacherConfig(**get_preset("smoke").teacher_model,
                                             train_seconds=0), log=lambda m: None)
    for passkey, copy in zip(args.passkey_share, args.copy_share):
        print(json.dumps(one_run(work, teacher, passkey, copy, args)), flush=True)


if __name__ == "__main__":
    main()
