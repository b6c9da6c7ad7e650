"""`kdcache replicate`: the seed paper's experiment at toy scale, end to end, resumable by step.

1. teachers: one trained with passkey retrieval up to its context, one (the causal test's arm b)
   only up to the short window; their needle accuracy by distance is measured first;
2. a corpus of short documents only (at most `doc_max_tokens` tokens each);
3. dumps (hf engine, the only one that serves `document-global`): the short window and the long
   window in `document-global` mode (document mask, global positions: the paper's setting), the
   long window in `document` mode (arm a) and in `causal` mode (arm c), and the short-context
   teacher's document-global dumps (arm b);
4. students, `seeds` of each arm, same data and steps: stage 1 at the short window, stage 2 at
   the long window starting from stage 1 (theta per schedule, KD alpha 1 or CE alpha 0), the last
   eighth of the long windows held out;
5. evaluation: passkey accuracy by needle distance up to and past the training window (every
   student and teacher), held-out perplexity and KL to the teacher, the probe on the teacher in
   every packing mode and dtype, the checkpoint diff between the phase-wise arm's two stages;
6. the report (report.py).

Each step writes its result under DIR and is skipped when it is there, so an interrupted run
resumes. Independent steps (the teachers; the dumps; the students; each evaluation job) are
tasks (tasks.py), run in this process one after the other, or `preset.parallel` at a time in
processes of their own sharing the GPU; the dumps run their engine in-process (no Ray). A task
starts once what it needs exists: the teachers' needle tests and the probe run beside the dumps,
each student's evaluation as soon as that student is done.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any, Callable

from kdcache.errors import KdcacheError
from kdcache.formats.manifest import MANIFEST_NAME
from kdcache.formats.reader import open_dataset
from kdcache.replicate.corpus import write_short_corpus
from kdcache.replicate.evaluation import EvalJob, evaluate_all, student_jobs, teacher_jobs
from kdcache.replicate.presets import THETAS, Preset, arm_parts
from kdcache.replicate.report import write_report
from kdcache.replicate.store import cached_json, save_json
from kdcache.replicate.tasks import Task, run_tasks
from kdcache.replicate.teacher import teacher_record, train_retrieval_teacher
from kdcache.student_train.stages import (parse_run, run, stage_export_dir,
                                          stage_summary_path)

HOLDOUT_FRACTION = 8  # the last 1/8 of the long windows are never trained on


class ReplicateError(KdcacheError):
    """The experiment cannot run as asked."""


def dump_options(teacher: str, corpus: str, out: str, window: int, mode: str,
                 preset: Preset) -> dict:
    """`DumpConfig.from_options` of one dump: the hf engine (the only one that serves
    `document-global`), in this process (no Ray: one small engine, maybe on a GPU box)."""
    return dict(model=teacher, corpus=corpus, out=out, k=preset.k, window=window, mode=mode,
                engine="hf", device=preset.device, dtype=preset.dtype, workers=1,
                windows_per_shard=8, progress=False, in_process=True)


def _task(job: EvalJob) -> Task:
    return Task(job.kind, job.name, {**job.args, "out": job.path}, job.path, job.after)


def _n_windows(path: str) -> int:
    return len(open_dataset(path))


def student_run(arm: str, seed: int, data: dict[str, str], out_dir: str, preset: Preset,
                holdout: int, tokenizer: str | None = None) -> dict:
    """The run-file dict of one student: two stages, same steps and data for every arm.
    `tokenizer`: the teachers' (shared) tokenizer directory, exported with the student."""
    loss, schedule, source = arm_parts(arm)
    theta1, theta2 = THETAS[schedule]
    alpha = 1.0 if loss == "kd" else 0.0
    long_data = data["long-" + source]
    short_data = data["short-" + source]
    model: dict[str, Any] = {"preset": preset.student_preset, "vocab_size": "dataset",
                             "overrides": dict(preset.student_overrides), "init_seed": seed}
    if tokenizer is not None:  # a dataset names no tokenizer a trainer may copy: say which
        model["tokenizer"] = tokenizer
    stage1_data: dict[str, Any] = {"paths": [short_data]}
    if source == "docpos":
        # targets computed with positions from 0 in every document, student at global positions
        model.update(attention="document", positions="global", force_mode=True)
        stage1_data = {"paths": [long_data], "window": preset.short_window}
    trainer = {"accelerator": "gpu" if preset.torch_device == "cuda" else "cpu",
               "checkpoint_every": max(preset.stage1_steps, preset.stage2_steps),
               "progress_bar": False, "log_every_n_steps": 5}
    return {
        "name": f"{arm}-seed{seed}", "output_dir": out_dir,
        "defaults": {
            "model": model,
            "loss": {"alpha": alpha},
            "optim": {"lr": preset.lr, "warmup_steps": max(1, preset.stage1_steps // 10)},
            "data": {"seed": seed, "batch_windows": preset.batch_windows},
            "trainer": trainer,
        },
        "stages": [
            {"name": "stage1", "model": {"rope_theta": theta1},
             "data": {**stage1_data, "batch_windows": preset.batch_windows},
             "trainer": {"max_steps": preset.stage1_steps}},
            {"name": "stage2", "init_from": "previous", "model": {"rope_theta": theta2},
             "data": {"paths": [long_data], "holdout_windows": holdout},
             "trainer": {"max_steps": preset.stage2_steps}},
        ],
    }


def run_replicate(out: str, preset: Preset, *, log: Callable[[str], None] = print,
                  teacher_dir: str | None = None, corpus: str | None = None) -> dict:
    """Run (or resume) the whole experiment under `out`; returns the report dict."""
    os.makedirs(out, exist_ok=True)
    save_json(os.path.join(out, "preset.json"), asdict(preset))
    steps: dict[str, Any] = {}

    def run_all(tasks: list[Task]) -> None:
        run_tasks(tasks, parallel=preset.parallel, log_dir=os.path.join(out, "logs"), log=log)

    # 1. teachers
    teachers = {"main": teacher_dir or os.path.join(out, "teacher")}
    contexts = {"main": preset.teacher_context}
    if any(arm_parts(a)[2] == "shortteacher" for a in preset.arms):
        teachers["shortteacher"] = os.path.join(out, "teacher-short")
        contexts["shortteacher"] = preset.short_context
    trained = {who: path for who, path in teachers.items() if who != "main" or not teacher_dir}
    log(f"replicate: training {len(trained)} teacher(s), {preset.teacher_seconds:.0f} s each "
        f"(retrieval up to {', '.join(str(contexts[w]) for w in trained)} tokens)")
    teacher_args = {who: dict(out_dir=path, model=preset.teacher_model, context=contexts[who],
                              seconds=preset.teacher_seconds, device=preset.device,
                              tokens_per_step=preset.teacher_tokens_per_step,
                              lr=preset.teacher_lr)
                    for who, path in trained.items()}
    run_all([Task("teacher", f"teacher-{who}", args,
                  teacher_record(args["out_dir"]))
             for who, args in teacher_args.items()])
    for who, args in teacher_args.items():  # each is done: this reads its record
        steps["teacher" if who == "main" else "teacher_short"] = \
            train_retrieval_teacher(**args, log=log)

    # 2. short documents only
    corpus_path = corpus or os.path.join(out, "corpus-short.jsonl")
    if corpus is None:
        steps["corpus"] = cached_json(os.path.join(out, "corpus.json"), lambda: write_short_corpus(
            corpus_path, teachers["main"], preset, seed=0))

    # 3. dumps: which (teacher, window, mode) each arm needs
    sources = {arm_parts(a)[2] for a in preset.arms}
    plan = {"long-main": ("main", preset.long_window, "document-global"),
            "short-main": ("main", preset.short_window, "document-global")}
    if "docpos" in sources:
        plan["long-docpos"] = ("main", preset.long_window, "document")
        plan["short-docpos"] = plan["long-docpos"]
    if "shortteacher" in sources:
        plan["long-shortteacher"] = ("shortteacher", preset.long_window, "document-global")
        plan["short-shortteacher"] = ("shortteacher", preset.short_window, "document-global")
    if "causal" in sources:
        plan["long-causal"] = ("main", preset.long_window, "causal")
        plan["short-causal"] = ("main", preset.short_window, "causal")
    data = {name: os.path.join(out, "data", f"{who}-{mode}-{window}")
            for name, (who, window, mode) in plan.items()}
    dumps = {}
    for name, (who, window, mode) in plan.items():
        dumps.setdefault(data[name], Task(
            "dump", f"dump-{who}-{mode}-{window}",
            dump_options(teachers[who], corpus_path, data[name], window, mode, preset),
            os.path.join(data[name], MANIFEST_NAME)))
    # the teachers' own evaluation needs no dump: it fills the slots the dumps leave
    jobs = teacher_jobs(out, preset, teachers)
    run_all(list(dumps.values()) + [_task(j) for j in jobs])
    n_long = _n_windows(data["long-main"])
    holdout = max(1, n_long // HOLDOUT_FRACTION)
    if n_long - holdout < 1:
        raise ReplicateError(f"the corpus packs into {n_long} long windows: too few to hold out "
                             "an eighth; use more documents")

    # 4. students, and each one's evaluation as soon as it is done
    runs = {(arm, seed): (os.path.join(out, "students", arm, f"seed{seed}"))
            for arm in preset.arms for seed in range(preset.seeds)}
    specs = {key: student_run(key[0], key[1], data, run_dir, preset, holdout,
                              tokenizer=teachers["main"]) for key, run_dir in runs.items()}
    planned = {key: {"seed": key[1],
                     "stage1": stage_export_dir(os.path.join(run_dir, "stage1")),
                     "stage2": stage_export_dir(os.path.join(run_dir, "stage2")),
                     "done": stage_summary_path(os.path.join(run_dir, "stage2"))}
               for key, run_dir in runs.items()}
    by_arm: dict[str, list[dict]] = {}
    for (arm, _), r in planned.items():
        by_arm.setdefault(arm, []).append(r)
    later = student_jobs(out, preset, teachers, by_arm, data["long-main"], holdout)
    run_all([Task("student", f"student-{arm}-seed{seed}",
                  {"run": specs[(arm, seed)], "source": f"replicate:{arm}"},
                  planned[(arm, seed)]["done"])
             for arm, seed in runs] + [_task(j) for j in later])
    students: dict[str, list[dict]] = {}
    for (arm, seed), spec in specs.items():  # each is done: this reads its stages' summaries
        summaries = run(parse_run(spec, source=f"replicate:{arm}"))
        students.setdefault(arm, []).append(
            {"seed": seed, "stage1": summaries[0]["hf_dir"], "stage2": summaries[-1]["hf_dir"],
             "final_loss": summaries[-1].get("final_loss")})

    # 5. the evaluation's records (all computed above, as tasks) and the report
    evaluation = evaluate_all(jobs + later, preset, log=log)
    return write_report(out, preset, steps, teachers, students, evaluation)
