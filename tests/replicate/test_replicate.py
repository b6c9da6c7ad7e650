"""`kdcache replicate`: the statistics, the arms' run files, and the whole smoke pipeline."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest

from kdcache.errors import KdcacheError
from kdcache.replicate.presets import MAIN_ARMS, arm_parts, get_preset
from kdcache.replicate.stats import diff_ci, mean_ci


def test_intervals_cover_the_mean_and_separate_clear_differences():
    rng = np.random.default_rng(0)
    good = [list((rng.random(40) < 0.9).astype(float)) for _ in range(3)]
    bad = [list((rng.random(40) < 0.2).astype(float)) for _ in range(3)]
    ci = mean_ci(good)
    assert ci["lo"] <= ci["mean"] <= ci["hi"] and ci["n"] == 120 and ci["seeds"] == 3
    assert mean_ci(good) == ci  # seeded: the same report twice
    assert diff_ci(good, bad)["sign"] == "positive"
    assert diff_ci(bad, good)["sign"] == "negative"
    same = diff_ci(good, [list(g) for g in good])
    assert same["sign"] == "interval includes 0" and same["lo"] < 0 < same["hi"]
    # seed-level spread widens the interval: the same samples split across disagreeing seeds
    split = [[1.0] * 60, [0.0] * 60]
    pooled = [[1.0, 0.0] * 60]
    assert (mean_ci(split)["hi"] - mean_ci(split)["lo"]) > (mean_ci(pooled)["hi"]
                                                            - mean_ci(pooled)["lo"])
    assert mean_ci([[]])["mean"] is None


def test_presets_refuse_inconsistent_sizes():
    with pytest.raises(KdcacheError, match="unknown replicate preset"):
        get_preset("huge")
    with pytest.raises(KdcacheError, match="short window"):
        get_preset("smoke", doc_max_tokens=4096)
    with pytest.raises(KdcacheError, match="unknown arm"):
        get_preset("smoke", arms=("kd-phasewise", "kd-sideways"))
    # a students' start the students could not load exactly
    base = get_preset("smoke").student_base
    with pytest.raises(KdcacheError, match=r"num_layers \(1, 2\)"):
        get_preset("smoke", student_overrides={})
    with pytest.raises(KdcacheError, match=r"vocab_size \(2048, 1024\)"):
        get_preset("smoke", student_base=dict(base, vocab_size=2048))
    with pytest.raises(KdcacheError, match="tie_embeddings"):
        get_preset("smoke", student_base=dict(base, tie_embeddings=False))
    with pytest.raises(KdcacheError, match="student_base_seconds"):
        get_preset("smoke", student_base_seconds=0.0)
    assert get_preset("smoke", student_base=None, student_base_seconds=0.0).student_base is None


def test_arms_differ_only_in_what_they_name():
    from kdcache.replicate.pipeline import student_run

    preset = get_preset("smoke")
    data = {f"{w}-{s}": f"/d/{w}-{s}" for w in ("long", "short")
            for s in ("main", "docpos", "shortteacher", "causal")}
    runs = {arm: student_run(arm, 1, data, f"/o/{arm}", preset, tokenizer="/t", base="/b")
            for arm in preset.arms}
    for arm, run in runs.items():
        loss, schedule, source = arm_parts(arm)
        s1, s2 = run["stages"]
        assert run["defaults"]["loss"]["alpha"] == (1.0 if loss == "kd" else 0.0)
        assert (s1["model"]["rope_theta"], s2["model"]["rope_theta"]) == {
            "phasewise": (1e4, 5e5), "fixed10k": (1e4, 1e4), "fixed500k": (5e5, 5e5)}[schedule]
        assert s1["trainer"]["max_steps"] == preset.stage1_steps
        assert s2["trainer"]["max_steps"] == preset.stage2_steps
        assert s2["init_from"] == "previous" and s1["init_from"] == "/b"  # one start for all
        assert run["defaults"]["model"]["init_seed"] == 1 and run["defaults"]["data"]["seed"] == 1
        assert s2["data"]["paths"] == [data["long-" + source]]
        assert s1["data"]["paths"] == [data["short-" + source]]  # the same shapes for every arm
        assert run["defaults"]["model"]["tokenizer"] == "/t"
    docpos = runs["kd-phasewise-docpos"]["defaults"]["model"]
    assert docpos["positions"] == "global" and docpos["force_mode"]
    assert "force_mode" not in runs["kd-phasewise"]["defaults"]["model"]
    random_start = student_run("kd-phasewise", 1, data, "/o/r", preset, tokenizer="/t")
    assert "init_from" not in random_start["stages"][0]


@pytest.mark.slow
def test_smoke_preset_runs_end_to_end_and_reports_every_finding(tmp_path):
    from kdcache.replicate.pipeline import run_replicate

    preset = get_preset("smoke")
    out = str(tmp_path / "rep")
    report = run_replicate(out, preset, log=lambda m: None)
    for name in ("report.md", "report.json", "accuracy_by_distance.png", "causal_test.png",
                 "probe.png", "diff.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    findings = report["findings"]
    assert set(report["students"]) == set(preset.arms)
    assert set(MAIN_ARMS) <= set(findings["arms_long_distance"])
    assert {c["a"] for c in findings["kd_vs_ce"]} == {"kd-phasewise", "kd-fixed10k",
                                                      "kd-fixed500k"}
    assert len(findings["phasewise_vs_fixed"]) == 2 and len(findings["causal_test"]) == 2
    teacher = findings["teacher_long_distance"]
    assert 0.0 <= teacher["mean"] <= 1.0 and teacher["n"] > 0
    if not findings["testable"]:  # the report must say so, not call the findings negative
        assert all(c["verdict"].startswith("not testable") for c in findings["kd_vs_ce"])
        assert "does not retrieve at long distance" in open(os.path.join(out, "report.md")).read()
    text = open(os.path.join(out, "report.md")).read()
    # every arm starts from the students' start, which is in the teachers' token ids and is
    # itself evaluated
    base = report["student_base"]
    assert base and report["steps"]["student_base"]["context"] == preset.short_window
    assert {"within_document", "long_distance"} <= set(findings["start"])
    assert "Every student starts from the students' start" in text
    for arm, runs in report["students"].items():
        with open(os.path.join(out, "students", arm, "seed0", "stage1", "summary.json")) as fh:
            assert json.load(fh)["init_from"] == base, arm
    record = report["steps"]["teacher"]
    assert f"- long-context teacher: {record['steps']} steps" in text
    # RULER-style NIAH beside passkey: its own findings, table and plot
    assert set(findings["tasks"]) == {"niah_single"}
    assert set(findings["tasks"]["niah_single"]["arms_long_distance"]) == set(preset.arms)
    assert "## RULER-style NIAH, one needle (numbers)" in text
    assert os.path.getsize(os.path.join(out, "accuracy_by_distance_niah_single.png")) > 0
    # the held-out metrics are per kind (one held-out dump each) as well as overall
    assert all(set(m["by_kind"]) == {"text", "passkey", "copy"} for m in report["lm"]["models"])
    assert "| passkey: perplexity | passkey: KL |" in text
    assert f"passkey prompts up to {record['passkey']['longest_open']} tokens" in text
    assert {"document-global/float32", "causal/float32"} <= set(findings["probe"])
    assert findings["diff"]
    with open(os.path.join(out, "report.json")) as fh:
        assert json.load(fh)["findings"]["long_distance_from"] == preset.short_window
    # every student's final stage is a model directory of the recorded theta, with the
    # teachers' tokenizer beside it
    for arm, runs in report["students"].items():
        for r in runs:
            assert os.path.exists(os.path.join(r["stage2"], "tokenizer.json"))
            with open(os.path.join(r["stage2"], "config.json")) as fh:
                theta = json.load(fh).get("rope_theta") or json.load(open(os.path.join(
                    r["stage2"], "config.json")))["rope_parameters"]["rope_theta"]
            assert theta == (5e5 if "phasewise" in arm or "500k" in arm else 1e4)
    # a second run finds every step done and rewrites the same findings; evaluation records
    # removed are recomputed, here as tasks in processes of their own
    for name in ("probe.json", "lm-kd-phasewise-seed0.json", "lm-teacher-main.json"):
        os.remove(os.path.join(out, "eval", name))
    again = run_replicate(out, replace(preset, parallel=2), log=lambda m: None)
    assert again["findings"] == json.loads(json.dumps(findings, default=str))
    assert again["lm"] == json.loads(json.dumps(report["lm"], default=str))
    assert os.path.exists(os.path.join(out, "logs", "lm-teacher-main.log"))


@pytest.mark.slow
def test_tasks_in_processes_of_their_own_finish_or_stop_the_run_with_the_log(tmp_path,
                                                                           monkeypatch):
    """Steps run `parallel` at a time in their own processes: done ones are skipped next time; a
    failing one stops the run with its name and the end of its log, nothing marked done."""
    from kdcache.replicate.pipeline import dump_options
    from kdcache.replicate.tasks import Task, TaskError, run_tasks
    from kdcache.teacher_dump.make_teacher import TeacherConfig, build_teacher

    teacher = str(tmp_path / "teacher")
    build_teacher(teacher, TeacherConfig.preset("tiny", train_seconds=0), log=lambda m: None)
    preset = get_preset("smoke")
    good = [Task("dump", f"dump-{mode}", dict(dump_options(teacher, "builtin", str(tmp_path / mode),
                                                           256, mode, preset),
                                              builtin_documents=12),
                 str(tmp_path / mode / "manifest.json")) for mode in ("document", "causal")]
    logs = str(tmp_path / "logs")
    seen: list[str] = []
    run_tasks(good, parallel=2, log_dir=logs, log=seen.append)
    assert all(os.path.exists(t.done) for t in good)
    assert sum("done in" in m for m in seen) == 2
    seen.clear()
    run_tasks(good, parallel=2, log_dir=logs, log=seen.append)  # both done: nothing runs
    assert seen == []

    bad = dict(good[0].args, model=str(tmp_path / "no-teacher"), out=str(tmp_path / "d"))
    with pytest.raises(TaskError, match=r"dump dump-bad failed[\s\S]*directory not found"):
        run_tasks([Task("dump", "dump-bad", bad, str(tmp_path / "d" / "manifest.json"))],
                  parallel=2, log_dir=logs, log=lambda m: None)
    assert os.path.exists(os.path.join(logs, "dump-bad.log"))
    assert not os.path.exists(tmp_path / "d" / "manifest.json")

    # a task waits for what it comes after, even with a free slot; one that waits for what no
    # task writes stops the run instead of hanging
    first = Task("dump", "dump-first", dict(good[0].args, out=str(tmp_path / "f")),
                 str(tmp_path / "f" / "manifest.json"))
    second = Task("dump", "dump-second", dict(good[0].args, out=str(tmp_path / "s")),
                  str(tmp_path / "s" / "manifest.json"), after=(first.done,))
    run_tasks([second, first], parallel=2, log_dir=logs, log=lambda m: None)
    # the spec of a task is written as it starts
    assert os.path.getmtime(first.done) <= os.path.getmtime(os.path.join(logs, "dump-second.json"))
    # a task started by a quiet command is quiet too: no library banners in its log
    from kdcache.cli import QUIET_ENV

    def student(name: str) -> Task:
        spec = {"name": name, "output_dir": str(tmp_path / name),
                "defaults": {"data": {"seed": 0}, "model": {"vocab_size": "dataset"},
                             "trainer": {"accelerator": "cpu", "progress_bar": False}},
                "stages": [{"name": "s", "data": {"paths": [str(tmp_path / "causal")]},
                            "trainer": {"max_steps": 1}}]}
        return Task("student", name, {"run": spec, "source": name},
                    str(tmp_path / name / "s" / "summary.json"))
    for quiet in ("1", "0"):
        monkeypatch.setenv(QUIET_ENV, quiet)
        run_tasks([student(f"student-quiet{quiet}")], parallel=2, log_dir=logs,
                  log=lambda m: None)
        text = open(os.path.join(logs, f"student-quiet{quiet}.log")).read()
        assert ("GPU available" in text) == (quiet == "0"), text[-2000:]
    orphan = Task("dump", "dump-orphan", dict(good[0].args, out=str(tmp_path / "o")),
                  str(tmp_path / "o" / "manifest.json"), after=(str(tmp_path / "never"),))
    for parallel in (1, 2):
        with pytest.raises(TaskError, match="dump dump-orphan needs"):
            run_tasks([orphan], parallel=parallel, log_dir=logs, log=lambda m: None)


def test_task_processes_share_the_cores_and_keep_what_the_user_set(monkeypatch):
    """`parallel` task processes get cores // parallel threads each (not every core each); a
    thread count the user set is passed through as it is."""
    from kdcache.replicate.tasks import THREAD_VARIABLES, task_env

    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    env = task_env(parallel=6)
    assert {env[n] for n in THREAD_VARIABLES} == {"2"}
    assert task_env(parallel=64)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert task_env(parallel=6)["OMP_NUM_THREADS"] == "7"


def test_heldout_documents_are_in_no_training_corpus(tmp_path):
    """One document in HOLDOUT_FRACTION goes to the held-out file, the rest to the training
    file; none is in both, none is lost; too few documents to hold one out is refused."""
    from kdcache.replicate.corpus import HOLDOUT_FRACTION, split_heldout
    from kdcache.replicate.presets import ReplicateError

    docs = [json.dumps({"text": f"document {i}"}) for i in range(3 * HOLDOUT_FRACTION + 2)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(docs) + "\n")
    held_path = {"all": str(tmp_path / "h.jsonl")}
    record = split_heldout(str(corpus), str(tmp_path / "t.jsonl"), held_path)
    train = (tmp_path / "t.jsonl").read_text().splitlines()
    held = (tmp_path / "h.jsonl").read_text().splitlines()
    assert record == {"train_documents": len(train), "heldout_documents": 3,
                      "heldout_by_kind": {"all": 3}}
    assert not set(train) & set(held) and sorted(train + held) == sorted(docs)
    corpus.write_text("\n".join(docs[:HOLDOUT_FRACTION - 1]) + "\n")
    with pytest.raises(ReplicateError, match="too few"):
        split_heldout(str(corpus), str(tmp_path / "t.jsonl"), held_path)


def test_heldout_documents_split_by_kind(tmp_path):
    """The built-in corpus's held-out documents are one file per kind (one in HOLDOUT_FRACTION
    of each kind named), a kind not named is trained on whole, and a kind with too few
    documents to hold one out is refused by name."""
    from kdcache.replicate.corpus import HOLDOUT_FRACTION, split_heldout
    from kdcache.replicate.presets import ReplicateError

    f = HOLDOUT_FRACTION
    docs = ([json.dumps({"text": f"prose {i}", "kind": "text"}) for i in range(3 * f)]
            + [json.dumps({"text": f"key {i}", "kind": "passkey"}) for i in range(2 * f + 1)]
            + [json.dumps({"text": f"copy {i}", "kind": "copy"}) for i in range(5)])
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(docs) + "\n")
    paths = {kind: str(tmp_path / f"h-{kind}.jsonl") for kind in ("text", "passkey")}
    record = split_heldout(str(corpus), str(tmp_path / "t.jsonl"), paths)
    assert record["heldout_by_kind"] == {"text": 3, "passkey": 2}
    train = (tmp_path / "t.jsonl").read_text().splitlines()
    held = {kind: (tmp_path / f"h-{kind}.jsonl").read_text().splitlines() for kind in paths}
    assert all(json.loads(line)["kind"] == kind for kind, lines in held.items() for line in lines)
    assert sum(json.loads(line)["kind"] == "copy" for line in train) == 5
    assert sorted(train + held["text"] + held["passkey"]) == sorted(docs)
    with pytest.raises(ReplicateError, match="of each of copy"):
        split_heldout(str(corpus), str(tmp_path / "t.jsonl"),
                      {**paths, "copy": str(tmp_path / "h-copy.jsonl")})


def test_findings_are_untestable_when_no_student_retrieves_within_a_document():
    """A retrieving teacher is not enough: students at 0 even at short distances test nothing
    about distance, and the verdicts say why; students that retrieve within their documents make
    the comparisons real tests."""
    from kdcache.replicate.report import build_findings

    preset = get_preset("smoke")
    short, far = preset.doc_max_tokens // 2, preset.short_window * 2

    def record(near_score: float, far_score: float) -> dict:
        return {"samples": [{"distance": short, "score": near_score}] * 10
                + [{"distance": far, "score": far_score}] * 10}

    students = {arm: [{"seed": 0}] for arm in preset.arms}
    evaluation = {"probe": {"runs": []}, "diff": None,
                  "needle": {"teacher-main": record(1.0, 1.0),
                             **{f"{arm}/seed0": record(0.0, 0.0) for arm in preset.arms}}}
    findings = build_findings(preset, students, evaluation)
    assert not findings["testable"]
    assert findings["untestable_because"] == "no student retrieves even within one document's length"
    assert all(c["verdict"].startswith("not testable (no student") for c in findings["kd_vs_ce"])
    evaluation["needle"].update({f"{arm}/seed0": record(1.0, 0.5) for arm in preset.arms})
    findings = build_findings(preset, students, evaluation)
    assert findings["testable"] and findings["untestable_because"] is None
    assert findings["arms_within_document"]["kd-phasewise"]["mean"] == 1.0
    assert findings["arms_long_distance_by_seed"]["kd-phasewise"] == [0.5]
    assert not any(c["verdict"].startswith("not testable") for c in findings["kd_vs_ce"])
    assert findings["heldout"] is None  # no held-out metrics: nothing to compare
    assert findings["tasks"] == {}  # passkey records alone
    # another needle task's records are compared the same way, on their own
    for name, rec in evaluation["needle"].items():
        rec["tasks"] = {"niah_single": record(1.0, 0.0 if name == "teacher-main" else 1.0)}
    niah = build_findings(preset, students, evaluation)["tasks"]["niah_single"]
    assert niah["untestable_because"] == "the teacher does not retrieve at long distance"
    assert niah["arms_long_distance"]["ce-phasewise"]["mean"] == 1.0
    assert all(c["verdict"].startswith("not testable (the teacher") for c in niah["kd_vs_ce"])


def test_a_teacher_worse_than_ce_on_the_heldout_documents_is_flagged():
    """KD against CE is read against how well the teacher predicts the students' documents: a
    teacher above the best CE student's held-out perplexity is flagged, one below is not."""
    from kdcache.replicate.report import build_findings

    preset = get_preset("smoke")
    students = {arm: [{"seed": 0}] for arm in preset.arms}
    needle = {"teacher-main": {"model": "/t", "samples": []},
              **{f"{arm}/seed0": {"model": f"/s/{arm}", "samples": []} for arm in preset.arms}}

    def findings(teacher_ppl: float) -> dict:
        models = [{"model": "/t", "perplexity": teacher_ppl}] + [
            {"model": f"/s/{arm}", "perplexity": 2.5 if arm.startswith("ce-") else 500.0}
            for arm in preset.arms]
        return build_findings(preset, students, {"probe": {"runs": []}, "diff": None,
                                                 "needle": needle, "lm": {"models": models}})

    worse = findings(8000.0)["heldout"]
    assert worse == {"teacher_perplexity": 8000.0, "best_ce_perplexity": 2.5,
                     "teacher_worse": True}
    # by kind: right about prose, wrong about passkey documents, though better overall
    by_kind = lambda text, passkey: {"text": {"perplexity": text},  # noqa: E731
                                     "passkey": {"perplexity": passkey}}
    models = [{"model": "/t", "perplexity": 2.0, "by_kind": by_kind(1.5, 40.0)}] + [
        {"model": f"/s/{arm}", "perplexity": 2.5, "by_kind": by_kind(3.0, 2.0)}
        for arm in preset.arms]
    mixed = build_findings(preset, students, {"probe": {"runs": []}, "diff": None,
                                              "needle": needle, "lm": {"models": models}})
    assert mixed["heldout"]["teacher_worse"] is False
    assert mixed["heldout"]["worse_kinds"] == ["passkey"]
    assert mixed["heldout"]["by_kind"]["passkey"] == {
        "teacher_perplexity": 40.0, "best_ce_perplexity": 2.0, "teacher_worse": True}
    assert findings(2.0)["heldout"]["teacher_worse"] is False
