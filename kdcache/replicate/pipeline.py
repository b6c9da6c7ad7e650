"""`kdcache replicate`: the seed paper's experiment at toy scale, end to end, resumable by step.

1. teachers: one trained with passkey retrieval up to its context, one (the causal test's arm b)
   only up to the short window; their needle accuracy by distance is measured first;
2. a corpus of short documents only (at most `doc_max_tokens` tokens each), one document in
   corpus.HOLDOUT_FRACTION held out of every dump the students train on;
3. dumps (hf engine, the only one that serves `document-global`): the short window and the long
   window in `document-global` mode (document mask, global positions: the paper's setting), in
   `document` mode (arm a) and in `causal` mode (arm c), the short-context teacher's
   document-global dumps (arm b), and the held-out documents at the long window;
4. students, `seeds` of each arm, same data and steps: stage 1 at the short window from the
   students' start (`preset.student_base`: a student-shaped model trained with the teachers'
   retrieval curriculum at the short window, beside the teachers; random init without one),
   stage 2 at the long window starting from stage 1 (theta per schedule, KD alpha 1 or CE
   alpha 0);
5. evaluation: passkey accuracy by needle distance up to and past the training window (every
   student and teacher), held-out perplexity and KL to the teacher, the probe on the teacher in
   every packing mode and dtype, the checkpoint diff between the phase-wise arm's two stages;
6. the report (report.py).

Each step writes its result under DIR and is skipped when it is there, so an interrupted run
resumes. Every step (a teacher, the corpus, a dump, a student, an evaluation job) is a task
(tasks.py), run in this process one after the other, or `preset.parallel` at a time in
processes of their own sharing the GPU; the dumps run their engine in-process (no Ray). A task
starts as soon as what it needs exists: the corpus once the main teacher's tokenizer is saved
(while the teachers train), a teacher's dumps, needle test and probe once it is trained, a
student once its two datasets are written, its evaluation once it is done.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any, Callable

from kdcache.formats.manifest import MANIFEST_NAME
from kdcache.replicate.corpus import corpus_paths, corpus_record, document_mix, heldout_kinds
from kdcache.replicate.evaluation import EvalJob, evaluate_all, student_jobs, teacher_jobs
from kdcache.replicate.presets import THETAS, Preset, arm_parts
from kdcache.replicate.report import write_report
from kdcache.replicate.store import save_json
from kdcache.replicate.tasks import Task, run_tasks
from kdcache.replicate.teacher import load_teacher_record, teacher_record, tokenizer_ready
from kdcache.student_train.stages import (parse_run, run, stage_export_dir,
                                          stage_summary_path)

def dump_options(teacher: str, corpus: str, out: str, window: int, mode: str,
                 preset: Preset) -> dict:
    """`DumpConfig.from_options` of one dump: the hf engine (the only one that serves
    `document-global`), in this process (no Ray: one small engine, maybe on a GPU box)."""
    return dict(model=teacher, corpus=corpus, out=out, k=preset.k, window=window, mode=mode,
                engine="hf", device=preset.device, dtype=preset.dtype, workers=1,
                windows_per_shard=8, progress=False, in_process=True)


def _task(job: EvalJob) -> Task:
    return Task(job.kind, job.name, {**job.args, "out": job.path}, job.path, job.after)


def student_run(arm: str, seed: int, data: dict[str, str], out_dir: str, preset: Preset,
                tokenizer: str | None = None, base: str | None = None) -> dict:
    """The run-file dict of one student: two stages, same steps and data for every arm (the
    datasets hold no held-out document: corpus.split_heldout).
    `tokenizer`: the teachers' (shared) tokenizer directory, exported with the student.
    `base`: the HF directory stage 1 starts from (every arm and seed the same), else random."""
    loss, schedule, source = arm_parts(arm)
    theta1, theta2 = THETAS[schedule]
    alpha = 1.0 if loss == "kd" else 0.0
    model: dict[str, Any] = {"preset": preset.student_preset, "vocab_size": "dataset",
                             "overrides": dict(preset.student_overrides), "init_seed": seed}
    if tokenizer is not None:  # a dataset names no tokenizer a trainer may copy: say which
        model["tokenizer"] = tokenizer
    if source == "docpos":
        # targets computed with positions from 0 in every document, student at global positions
        model.update(attention="document", positions="global", force_mode=True)
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
             "data": {"paths": [data["short-" + source]]},
             "trainer": {"max_steps": preset.stage1_steps},
             **({"init_from": base} if base else {})},
            {"name": "stage2", "init_from": "previous", "model": {"rope_theta": theta2},
             "data": {"paths": [data["long-" + source]]},
             "trainer": {"max_steps": preset.stage2_steps}},
        ],
    }


def run_replicate(out: str, preset: Preset, *, log: Callable[[str], None] = print,
                  teacher_dir: str | None = None, corpus: str | None = None) -> dict:
    """Run (or resume) the whole experiment under `out`; returns the report dict.

    Every step is planned first, as tasks that start as soon as what they need exists (a
    student once its two datasets are written, not once every dump is), then run at once."""
    os.makedirs(out, exist_ok=True)
    save_json(os.path.join(out, "preset.json"), asdict(preset))

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
                              lr=preset.teacher_lr, documents=document_mix(preset))
                    for who, path in trained.items()}
    ready = {who: (teacher_record(path),) if who in trained else () for who, path in
             teachers.items()}  # what a teacher's users wait for
    tasks = [Task("teacher", f"teacher-{who}", args, teacher_record(args["out_dir"]))
             for who, args in teacher_args.items()]
    # the students' start: the same curriculum at the short window, in the teachers' token ids
    base_args = None
    if preset.student_base is not None:
        base_args = dict(out_dir=os.path.join(out, "student-base"), model=preset.student_base,
                         context=preset.short_window, seconds=preset.student_base_seconds,
                         device=preset.device, tokens_per_step=preset.teacher_tokens_per_step,
                         lr=preset.teacher_lr, tokenizer_of=teachers["main"],
                         documents=document_mix(preset))
        tasks.append(Task("teacher", "student-base", base_args,
                          teacher_record(base_args["out_dir"]),
                          (tokenizer_ready(teachers["main"]),) if "main" in trained else ()))
    base_dir = base_args["out_dir"] if base_args else None
    base_ready = (teacher_record(base_dir),) if base_dir else ()

    # 2. short documents only (split into training and held-out documents): needs only the
    # main teacher's tokenizer, so it is built while the teachers train
    tasks.append(Task("corpus", "corpus",
                      {"out": out, "preset": asdict(preset), "teacher": teachers["main"],
                       "corpus": corpus},
                      corpus_record(out),
                      (tokenizer_ready(teachers["main"]),) if "main" in trained else ()))
    corpus_files = corpus_paths(out, heldout_kinds(preset, corpus))

    # 3. dumps: which (teacher, window, mode) each arm needs, plus the held-out documents
    sources = {arm_parts(a)[2] for a in preset.arms}
    plan = {"long-main": ("main", preset.long_window, "document-global"),
            "short-main": ("main", preset.short_window, "document-global")}
    if "docpos" in sources:
        plan["long-docpos"] = ("main", preset.long_window, "document")
        plan["short-docpos"] = ("main", preset.short_window, "document")
    if "shortteacher" in sources:
        plan["long-shortteacher"] = ("shortteacher", preset.long_window, "document-global")
        plan["short-shortteacher"] = ("shortteacher", preset.short_window, "document-global")
    if "causal" in sources:
        plan["long-causal"] = ("main", preset.long_window, "causal")
        plan["short-causal"] = ("main", preset.short_window, "causal")
    data = {name: os.path.join(out, "data", f"{who}-{mode}-{window}")
            for name, (who, window, mode) in plan.items()}
    written = {name: os.path.join(path, MANIFEST_NAME) for name, path in data.items()}
    dumps = {}
    for name, (who, window, mode) in plan.items():
        dumps.setdefault(data[name], Task(
            "dump", f"dump-{who}-{mode}-{window}",
            dump_options(teachers[who], corpus_files["train"], data[name], window, mode, preset),
            written[name], ready[who] + (corpus_record(out),)))
    # the held-out documents, one dump per kind of document (or one of the user's corpus)
    heldout = {}
    for kind, documents in corpus_files["heldout"].items():
        name = "heldout" + ("" if kind == "all" else f"-{kind}")
        heldout[kind] = os.path.join(out, "data",
                                     f"{name}-main-document-global-{preset.long_window}")
        dumps[heldout[kind]] = Task(
            "dump", f"dump-{name}-main-document-global-{preset.long_window}",
            dump_options(teachers["main"], documents, heldout[kind], preset.long_window,
                         "document-global", preset),
            os.path.join(heldout[kind], MANIFEST_NAME), ready["main"] + (corpus_record(out),))
    tasks += list(dumps.values())
    # the teachers' own evaluation needs no dump: it fills the slots the dumps leave
    jobs = teacher_jobs(out, preset, teachers, ready, base_dir)
    tasks += [_task(j) for j in jobs]

    # 4. students, and each one's evaluation as soon as it is done
    runs = {(arm, seed): (os.path.join(out, "students", arm, f"seed{seed}"))
            for arm in preset.arms for seed in range(preset.seeds)}
    specs = {key: student_run(key[0], key[1], data, run_dir, preset,
                              tokenizer=teachers["main"], base=base_dir)
             for key, run_dir in runs.items()}
    planned = {key: {"seed": key[1],
                     "stage1": stage_export_dir(os.path.join(run_dir, "stage1")),
                     "stage2": stage_export_dir(os.path.join(run_dir, "stage2")),
                     "done": stage_summary_path(os.path.join(run_dir, "stage2"))}
               for key, run_dir in runs.items()}
    by_arm: dict[str, list[dict]] = {}
    for (arm, _), r in planned.items():
        by_arm.setdefault(arm, []).append(r)
    later = student_jobs(out, preset, teachers, by_arm, heldout, ready)
    source_of = {arm: arm_parts(arm)[2] for arm in preset.arms}
    tasks += [Task("student", f"student-{arm}-seed{seed}",
                   {"run": specs[(arm, seed)], "source": f"replicate:{arm}"},
                   planned[(arm, seed)]["done"],
                   (written["short-" + source_of[arm]], written["long-" + source_of[arm]])
                   + base_ready)
              for arm, seed in runs]
    tasks += [_task(j) for j in later]
    run_tasks(tasks, parallel=preset.parallel, log_dir=os.path.join(out, "logs"), log=log)

    # 5. every step is done: read the records, the students' summaries and the evaluation's
    steps: dict[str, Any] = {}
    for who, args in teacher_args.items():
        steps["teacher" if who == "main" else "teacher_short"] = \
            load_teacher_record(args["out_dir"])
    if base_args is not None:
        steps["student_base"] = load_teacher_record(base_args["out_dir"])
    with open(corpus_record(out)) as fh:
        steps["corpus"] = json.load(fh)
    students: dict[str, list[dict]] = {}
    for (arm, seed), spec in specs.items():
        summaries = run(parse_run(spec, source=f"replicate:{arm}"))
        students.setdefault(arm, []).append(
            {"seed": seed, "stage1": summaries[0]["hf_dir"], "stage2": summaries[-1]["hf_dir"],
             "final_loss": summaries[-1].get("final_loss")})
    evaluation = evaluate_all(jobs + later, preset, log=log)
    return write_report(out, preset, steps, teachers, students, evaluation, base_dir)
