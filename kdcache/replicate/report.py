"""The replication report: report.json (every number), report.md (each finding with what this run
measured and whether it replicated) and PNGs (accuracy by distance per arm with 95% intervals, the
causal-test arms, the probe, the checkpoint diff).

"Long distance" means needle distances of at least the short (stage 1) window: the distances the
students never saw inside one training document. A finding "replicates" when the 95% interval of
the difference it predicts excludes 0 in its direction, is "contradicted" when it excludes 0 the
other way, and is "not resolved at this scale" otherwise. Nothing can transfer from a teacher
that does not retrieve at long distance, and a student that does not retrieve even within one
document's length cannot show whether retrieval reaches past it: in either case the report says
so first, and then calls the student comparisons untestable rather than negative.
"""

from __future__ import annotations

import math
import os
from typing import Any

from kdcache.evaluate.report import save_figure
from kdcache.formats.storage import atomic_write_bytes, resolve
from kdcache.replicate.evaluation import STUDENT_BASE
from kdcache.replicate.presets import CAUSAL_ARMS, Preset
from kdcache.replicate.stats import diff_ci, mean_ci
from kdcache.replicate.store import save_json

RETRIEVES = 0.5  # teacher accuracy at long distance above which transfer is testable
# best arm's accuracy at distances within one document below which no student retrieves at all
STUDENTS_RETRIEVE = 0.25
# why the student comparisons test nothing (findings["untestable_because"])
TEACHER_CANNOT = "the teacher does not retrieve at long distance"
STUDENTS_CANNOT = "no student retrieves even within one document's length"
TASK_TITLES = {"niah_single": "RULER-style NIAH, one needle (numbers)"}


def _scores(needle: dict, names: list[str], min_distance: int = 0,
            max_distance: int | None = None) -> list[list[float]]:
    """Per model (seed): passkey scores of samples whose distance is in range."""
    out = []
    for name in names:
        samples = needle[name]["samples"]
        out.append([s["score"] for s in samples if s["distance"] >= min_distance
                    and (max_distance is None or s["distance"] < max_distance)])
    return out


def _arm_models(students: dict[str, list[dict]], arm: str) -> list[str]:
    return [f"{arm}/seed{r['seed']}" for r in students.get(arm, [])]


def _bins(needle: dict) -> list[int]:
    lengths = sorted({s["distance"] for m in needle.values() for s in m["samples"]})
    top = max(lengths) if lengths else 1
    return [0] + [2 ** k for k in range(4, int(math.log2(max(16, top))) + 2)]


def _verdict(d: dict, untestable: str | None) -> str:
    if untestable:
        return f"not testable ({untestable})"
    return {"positive": "replicated", "negative": "contradicted"}.get(
        d["sign"], "not resolved at this scale (the 95% interval includes 0)")


def retrieval_findings(preset: Preset, students: dict, needle: dict) -> dict:
    """The student comparisons on one needle task's records (`needle`: label -> record with
    scored samples): the teacher and each arm within a document and at long distance, whether
    that is testable, and Findings 1 and 2 and the causal test as differences with verdicts."""
    long = preset.short_window
    teacher = mean_ci(_scores(needle, ["teacher-main"], long)) if "teacher-main" in needle \
        else mean_ci([])
    arms = {arm: mean_ci(_scores(needle, _arm_models(students, arm), long)) for arm in students}
    within = {arm: mean_ci(_scores(needle, _arm_models(students, arm), 0, preset.doc_max_tokens))
              for arm in students}
    best_within = max((ci["mean"] for ci in within.values() if ci["mean"] is not None),
                      default=None)
    untestable = None
    if teacher["mean"] is None or teacher["mean"] < RETRIEVES:
        untestable = TEACHER_CANNOT
    elif best_within is None or best_within < STUDENTS_RETRIEVE:
        untestable = STUDENTS_CANNOT
    testable = untestable is None
    # each seed's own long-distance accuracy: how much of an interval is the seeds' spread
    per_seed = {arm: [round(sum(v) / len(v), 4) if v else None
                      for v in _scores(needle, _arm_models(students, arm), long)]
                for arm in students}
    findings: dict[str, Any] = {"teacher_long_distance": teacher, "testable": testable,
                                "untestable_because": untestable, "long_distance_from": long,
                                "arms_long_distance": arms, "arms_within_document": within,
                                "arms_long_distance_by_seed": per_seed}
    if STUDENT_BASE in needle:  # where every arm starts: what training added is the difference
        findings["start"] = {
            "within_document": mean_ci(_scores(needle, [STUDENT_BASE], 0, preset.doc_max_tokens)),
            "long_distance": mean_ci(_scores(needle, [STUDENT_BASE], long))}

    def compare(a: str, b: str) -> dict | None:
        if a not in students or b not in students:
            return None
        d = diff_ci(_scores(needle, _arm_models(students, a), long),
                    _scores(needle, _arm_models(students, b), long))
        return {**d, "a": a, "b": b, "verdict": _verdict(d, untestable)}

    findings["phasewise_vs_fixed"] = [c for c in (compare("kd-phasewise", "kd-fixed10k"),
                                                  compare("kd-phasewise", "kd-fixed500k")) if c]
    findings["kd_vs_ce"] = [c for c in (compare(f"kd-{t}", f"ce-{t}")
                                        for t in ("phasewise", "fixed10k", "fixed500k")) if c]
    findings["causal_test"] = [c for c in (compare(arm, "ce-phasewise") for arm in CAUSAL_ARMS)
                               if c]
    main = compare("kd-phasewise", "ce-phasewise")
    if main and findings["causal_test"]:
        survives = [c for c in findings["causal_test"] if c["sign"] == "positive"]
        findings["causal_reading"] = (
            "not testable" if not testable else
            "KD's advantage survives targets without the teacher's positional signal: that "
            "signal is not its cause" if main["sign"] == "positive"
            and len(survives) == len(findings["causal_test"]) else
            "KD's advantage disappears without the teacher's positional signal: consistent with "
            "it being the cause" if main["sign"] == "positive" and not survives else
            "inconclusive at this scale")
    return findings


def task_view(needle: dict, task: str) -> dict:
    """The records of another needle task (evaluation.needle_record keeps them under "tasks"),
    in the shape of the passkey records: label -> {"model", "samples", ...}."""
    return {name: {"model": rec.get("model"), **rec["tasks"][task]}
            for name, rec in needle.items() if task in rec.get("tasks", {})}


def build_findings(preset: Preset, students: dict, evaluation: dict) -> dict:
    """Every finding: the student comparisons on passkey retrieval (the task the students'
    corpus and the teachers' curriculum hold), the same on each other needle task (RULER-style
    NIAH: a format none of the models trained on, under findings["tasks"]), the held-out
    comparison, the probe and the diff."""
    needle = evaluation["needle"]
    findings = retrieval_findings(preset, students, needle)
    tasks = sorted({t for rec in needle.values() for t in rec.get("tasks", {})})
    findings["tasks"] = {t: retrieval_findings(preset, students, task_view(needle, t))
                         for t in tasks}
    findings["heldout"] = _heldout_comparison(evaluation)
    probe = evaluation["probe"]["runs"]
    findings["probe"] = {f"{r['mode']}/{r['dtype']}": max(r["kl_mean"][1:] or [0.0])
                         for r in probe}
    diff = evaluation.get("diff")
    if diff:
        findings["diff"] = {layer: {k: v for k, v in e.items() if k in ("top_pairs",
                                                                       "top_eighth_share",
                                                                       "position_cv")}
                            for layer, e in diff["layers"].items()}
    return findings


def _labels(evaluation: dict) -> dict[str, str]:
    """Each evaluated model's directory -> its label (an arm's seed, "teacher-main", ...)."""
    return {entry.get("model"): name for name, entry in evaluation["needle"].items()}


def _heldout_comparison(evaluation: dict) -> dict | None:
    """The teacher's held-out perplexity against the best CE student's, overall and per kind of
    document: a teacher that predicts the students' documents worse than CE on them does
    (`teacher_worse`; `worse_kinds`: where) hands KD wrong targets, and KD against CE then
    measures that, not distillation as such."""
    label_of = _labels(evaluation)
    models = {label_of.get(m["model"], m["model"]): m
              for m in (evaluation.get("lm") or {}).get("models", [])}
    ce = [name for name in models if name.startswith("ce-")]
    if "teacher-main" not in models or not ce:
        return None

    def compare(get) -> dict:
        best = min(get(models[name]) for name in ce)
        return {"teacher_perplexity": get(models["teacher-main"]), "best_ce_perplexity": best,
                "teacher_worse": get(models["teacher-main"]) > best}

    result = compare(lambda m: m["perplexity"])
    kinds = models["teacher-main"].get("by_kind") or {}
    if len(kinds) > 1:
        result["by_kind"] = {kind: compare(lambda m, kind=kind: m["by_kind"][kind]["perplexity"])
                             for kind in kinds}
        result["worse_kinds"] = [kind for kind, c in result["by_kind"].items()
                                 if c["teacher_worse"]]
    return result


def _fmt(ci: dict | None) -> str:
    if not ci or ci.get("mean", ci.get("diff")) is None:
        return "n/a"
    value = ci.get("mean", ci.get("diff"))
    return f"{value:+.2f} [{ci['lo']:+.2f}, {ci['hi']:+.2f}]" if "diff" in ci else \
        f"{value:.2f} [{ci['lo']:.2f}, {ci['hi']:.2f}]"


def teacher_training_line(name: str, record: dict | None) -> str | None:
    """How far a teacher's retrieval curriculum got (its record, teacher.py), in one line."""
    if not record or not record.get("steps"):
        return None
    seconds = record.get("trained_seconds", record.get("seconds"))
    line = f"- {name}: {record['steps']} steps in {seconds} s"
    ladder = record.get("passkey")
    if ladder:
        opened = ", ".join(f"{o['length']} at step {o['step']}" for o in ladder["opened"])
        top = ladder["by_length"].get(str(ladder["longest_open"]), {})
        acc = top.get("accuracy")
        line += (f"; passkey prompts up to {ladder['longest_open']} tokens of "
                 f"{ladder['lengths'][-1]} (rungs opened: {opened}; running exact-answer "
                 f"accuracy there {acc if acc is not None else 'n/a'})")
    return line + "."


def _arm_table(preset: Preset, findings: dict) -> list[str]:
    """Each arm's accuracy within a document and at long distance (interval, then each seed)."""
    within = findings.get("arms_within_document", {})
    by_seed = findings.get("arms_long_distance_by_seed", {})
    return ([f"| arm | within a document (< {preset.doc_max_tokens}) | long distance "
             f"(>= {findings['long_distance_from']}) | long distance, each seed |",
             "|---|---|---|---|"]
            + [f"| {arm} | {_fmt(within.get(arm))} | {_fmt(ci)} | "
               + " / ".join("n/a" if v is None else f"{v:.2f}" for v in by_seed.get(arm, []))
               + " |" for arm, ci in findings["arms_long_distance"].items()])


def _comparison_table(comparisons: list[dict]) -> list[str]:
    return (["| comparison | difference | verdict |", "|---|---|---|"]
            + [f"| {c['a']} - {c['b']} | {_fmt(c)} | {c['verdict']} |" for c in comparisons])


def write_markdown(path: str, preset: Preset, findings: dict, evaluation: dict,
                   plots: list[str], steps: dict | None = None) -> None:
    t = findings["teacher_long_distance"]
    lines = [f"# Replication report ({preset.name} preset)", "",
             f"Students: {preset.student_preset}, {preset.seeds} seed(s) per arm, stage 1 "
             f"{preset.stage1_steps} steps at {preset.short_window} tokens, stage 2 "
             f"{preset.stage2_steps} steps at {preset.long_window} tokens; documents of at most "
             f"{preset.doc_max_tokens} tokens, document mask, global positions. Long distance: "
             f"needle distance >= {findings['long_distance_from']} tokens. Intervals: 95%, "
             "bootstrap over seeds and samples.", "",
             "## The teacher", "",
             f"Passkey accuracy at long distance: {_fmt(t)}."]
    trained = [teacher_training_line(name, (steps or {}).get(key))
               for name, key in (("long-context teacher", "teacher"),
                                 ("short-context teacher", "teacher_short"),
                                 ("students' start", "student_base"))]
    if any(trained):
        lines += ["", "Training (the retrieval curriculum, teacher.py):"]
        lines += [x for x in trained if x]
    start = findings.get("start")
    if start:
        lines += ["", f"Every student starts from the students' start ({preset.student_preset} "
                      f"shape, trained with the same curriculum up to {preset.short_window} "
                      f"tokens, theta {(preset.student_base or {}).get('rope_theta', 0):g}): "
                      f"passkey accuracy within a document {_fmt(start['within_document'])}, at "
                      f"long distance {_fmt(start['long_distance'])}."]
    because = findings.get("untestable_because")
    if because == TEACHER_CANNOT:
        lines += ["", f"**The teacher does not retrieve at long distance (accuracy below "
                      f"{RETRIEVES:.0%}), so nothing can transfer: the student comparisons below "
                      "are not tests of the paper's findings at this scale.** A larger teacher, "
                      "longer retrieval training, or the `toy` preset on a GPU is needed."]
    elif because == STUDENTS_CANNOT:
        lines += ["", f"**No student retrieves even within one document's length (best arm "
                      f"below {STUDENTS_RETRIEVE:.0%} at distances under {preset.doc_max_tokens} "
                      "tokens), so whether retrieval reaches past the documents cannot be seen: "
                      "the student comparisons below are not tests of the paper's findings at "
                      "this scale.** Students that learn retrieval within their documents (more "
                      "steps, retrieval among the short documents, a larger student) are needed."]
    lines += ["", "## Accuracy by arm", ""] + _arm_table(preset, findings)
    sections = [("Finding 1: phase-wise theta beats a fixed theta (KD)", "phasewise_vs_fixed"),
                ("Finding 2: logit KD beats cross-entropy on the same data", "kd_vs_ce"),
                ("The causal test: KD arms without the teacher's positional signal vs CE",
                 "causal_test")]
    for title, key in sections:
        lines += ["", f"## {title}", ""] + _comparison_table(findings[key])
    heldout = findings.get("heldout")
    worse = (heldout or {}).get("worse_kinds", [])
    if heldout and (heldout["teacher_worse"] or worse):
        where = (f" (worse on {', '.join(worse)} documents)" if worse else "")
        lines += ["", f"**Caveat: the teacher predicts the students' held-out documents worse "
                      f"than the CE students do{where}: perplexity "
                      f"{heldout['teacher_perplexity']:.4g} against "
                      f"{heldout['best_ce_perplexity']:.4g} overall.** KD distils a teacher "
                      "that is wrong about this corpus, so the KD-CE differences measure that "
                      "as well as distillation."]
    if "causal_reading" in findings:
        lines += ["", f"Reading: {findings['causal_reading']}."]
    for task, f in findings.get("tasks", {}).items():
        lines += ["", f"## {TASK_TITLES.get(task, task)}", "",
                  "The same models on a needle format none of them trained on (RULER's "
                  "wording): whether the retrieval learnt on passkey prompts is general. Teacher "
                  f"at long distance: {_fmt(f['teacher_long_distance'])}"
                  + (f"; not testable: {f['untestable_because']}." if f["untestable_because"]
                     else "."), ""]
        lines += _arm_table(preset, f) + [""] + _comparison_table(
            [c for key in ("phasewise_vs_fixed", "kd_vs_ce", "causal_test") for c in f[key]])
    lines += ["", "## Finding 3: RoPE perturbations reach the teacher's output (probe)", "",
              "Largest mean KL(p_0 || p_r) over repeats, by packing mode and dtype:", "",
              "| mode/dtype | KL |", "|---|---|"]
    lines += [f"| {k} | {v:.3g} |" for k, v in findings["probe"].items()]
    lines += ["", "Under a document mask (`document-global`) a pure-RoPE teacher's output moves "
                  "with position only by rounding: compare its float32 and bfloat16 rows with "
                  "`causal`, where context really changes."]
    if "diff" in findings:
        lines += ["", "## Finding 4: long-context training changes specific query dimensions",
                  "", "| layer | share of the change in the top eighth of RoPE pairs | "
                      "variation across positions (CV) |", "|---|---|---|"]
        lines += [f"| {layer} | {d['top_eighth_share']:.2f} | {d['position_cv']:.2f} |"
                  for layer, d in findings["diff"].items()]
        lines += ["", "A uniform change would put 0.12 of it in the top eighth; a change flat "
                      "across positions has a CV near 0."]
    lm = evaluation["lm"]
    kinds = [k for k in (lm["models"][0].get("by_kind") or {}) if k != "all"] \
        if lm["models"] else []
    lines += ["", "## Held-out perplexity and KL to the teacher", "",
              "| model | perplexity | KL to teacher | "
              + "".join(f"{k}: perplexity | {k}: KL | " for k in kinds),
              "|---|---|---|" + "---|---|" * len(kinds)]
    label_of = _labels(evaluation)
    for m in lm["models"]:
        by_kind = m.get("by_kind") or {}
        cells = "".join(f"{by_kind[k]['perplexity']:.2f} | {by_kind[k]['kl_to_teacher']:.3f} | "
                        if k in by_kind else "n/a | n/a | " for k in kinds)
        lines.append(f"| {label_of.get(m['model'], m['model'])} | {m['perplexity']:.2f} | "
                     f"{m['kl_to_teacher']:.3f} | {cells}")
    lines += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})"
                                     for p in plots]
    fs, base = resolve(path)
    atomic_write_bytes(fs, base, ("\n".join(lines) + "\n").encode())


def plot_arms(path: str, needle: dict, students: dict, arms: list[str], teacher: bool,
              title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = _bins(needle)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    series = [("teacher", ["teacher-main"])] if teacher else []
    if teacher and STUDENT_BASE in needle:
        series.append(("students' start", [STUDENT_BASE]))
    series += [(arm, _arm_models(students, arm)) for arm in arms if arm in students]
    for i, (label, names) in enumerate(series):
        xs, ys, lo, hi = [], [], [], []
        for a, b in zip(bins[:-1], bins[1:]):
            ci = mean_ci(_scores(needle, names, a, b))
            if ci["mean"] is None:
                continue
            xs.append(max(1, (a + b) / 2) * (1 + 0.03 * i))  # offset so intervals stay visible
            ys.append(ci["mean"])
            lo.append(ci["mean"] - ci["lo"])
            hi.append(ci["hi"] - ci["mean"])
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label,
                    linestyle={"teacher": "--", "students' start": ":"}.get(label, "-"))
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("needle distance (tokens, bin centre)")
    ax.set_ylabel("passkey accuracy (95% CI)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure(fig, path)


def plot_probe(path: str, probe: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in probe["runs"]:
        values = [max(v, 1e-12) for v in r["kl_mean"][1:]]
        ax.plot(range(1, len(values) + 1), values, marker="o", label=f"{r['mode']} {r['dtype']}")
    ax.set_yscale("log")
    ax.set_xlabel("repeat r (block position in the window)")
    ax.set_ylabel("mean KL(p_0 || p_r)")
    ax.set_title("teacher probe: output change with position", fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_diff(path: str, diff: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(diff["layers"].items())
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for layer, e in layers:
        axes[0].plot(e["by_pair"], label=f"layer {layer}")
        axes[1].plot(e["by_position"], marker=".", label=f"layer {layer}")
    axes[0].set_xlabel("RoPE pair index (low index = high frequency)")
    axes[0].set_ylabel("stage 1 vs stage 2 query distance")
    axes[1].set_xlabel("repeat (position in the window)")
    axes[1].set_ylabel("query distance")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("phase-wise arm: where the queries changed", fontsize=10)
    return save_figure(fig, path)



def write_report(out: str, preset: Preset, steps: dict, teachers: dict, students: dict,
                 evaluation: dict, student_base: str | None = None) -> dict:
    findings = build_findings(preset, students, evaluation)
    needle = evaluation["needle"]
    main = [a for a in students if a not in CAUSAL_ARMS]
    plots = [plot_arms(os.path.join(out, "accuracy_by_distance.png"), needle, students, main,
                       True, "passkey accuracy by needle distance: KD/CE x theta schedule"),
             plot_arms(os.path.join(out, "causal_test.png"), needle, students,
                       ["kd-phasewise", "ce-phasewise", *CAUSAL_ARMS], False,
                       "the causal test: targets without the teacher's positional signal"),
             plot_probe(os.path.join(out, "probe.png"), evaluation["probe"])]
    for task in findings.get("tasks", {}):
        plots.append(plot_arms(os.path.join(out, f"accuracy_by_distance_{task}.png"),
                               task_view(needle, task), students, main, True,
                               f"{TASK_TITLES.get(task, task)} accuracy by needle distance"))
    if evaluation.get("diff"):
        plots.append(plot_diff(os.path.join(out, "diff.png"), evaluation["diff"]))
    report = {"preset": preset.name, "steps": steps, "teachers": teachers,
              "student_base": student_base, "students": students,
              "findings": findings, "lm": evaluation["lm"], "probe": evaluation["probe"],
              "diff": evaluation.get("diff"), "plots": [os.path.basename(p) for p in plots]}
    save_json(os.path.join(out, "report.json"), report)
    write_markdown(os.path.join(out, "report.md"), preset, findings, evaluation, plots, steps)
    return report
