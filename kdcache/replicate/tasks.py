"""The experiment's independent steps (a teacher, a dump, a student, an evaluation job) as
tasks, run one after the other or `parallel` at a time.

A task is a kind, a name and JSON arguments; `execute` runs one in this process. With
`parallel` > 1 every task runs in a process of its own (`python -m kdcache.replicate.tasks
SPEC.json`; its output in DIR/logs/NAME.log): the experiment's models are small, one of them
leaves most of a GPU idle, and several at once share it. A task writes its result under DIR and
is skipped once `done` exists, so whoever runs the pipeline afterwards (this process) reads the
results as if it had computed them itself, and an interrupted run resumes task by task.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from kdcache.errors import KdcacheError
from kdcache.replicate.corpus import make_corpus
from kdcache.replicate.evaluation import EVAL_KINDS, eval_record
from kdcache.replicate.store import save_json
from kdcache.replicate.teacher import train_retrieval_teacher
from kdcache.student_train.stages import parse_run, run
from kdcache.teacher_dump.plan import DumpConfig
from kdcache.teacher_dump.runner import run_dump


class TaskError(KdcacheError):
    """A step of the experiment failed (its log says why)."""


@dataclass(frozen=True)
class Task:
    kind: str  # "teacher", "corpus", "dump", "student" or one of evaluation.EVAL_KINDS
    name: str  # unique within the run: names its log file
    args: dict[str, Any]
    done: str  # the file whose existence means the task has finished
    after: tuple[str, ...] = ()  # `done` files of the tasks it needs (it starts once they exist)


def execute(kind: str, args: dict[str, Any]) -> None:
    """Run one task here (its result lands where its `done` file says)."""
    if kind == "teacher":
        train_retrieval_teacher(**args, log=print)
    elif kind == "dump":
        run_dump(DumpConfig.from_options(**args), log=lambda m: None)
    elif kind == "corpus":
        make_corpus(**args)
    elif kind == "student":
        run(parse_run(args["run"], source=args["source"]))
    elif kind in EVAL_KINDS:
        save_json(args["out"], eval_record(kind, args))
    else:
        raise TaskError(f"unknown task kind {kind!r}")


def _ready(task: Task) -> bool:
    return all(os.path.exists(path) for path in task.after)


def _never_ready(task: Task) -> TaskError:
    missing = [p for p in task.after if not os.path.exists(p)]
    return TaskError(f"replicate: {task.kind} {task.name} needs {missing}, which no step wrote")


def run_tasks(tasks: list[Task], *, parallel: int, log_dir: str,
              log: Callable[[str], None] = print) -> None:
    """Run the tasks whose `done` file is missing, `parallel` at a time (1: in this process, in
    list order). A task starts once the tasks it comes `after` are done; among those ready, the
    earliest in the list goes first (so a later phase fills slots an earlier one leaves idle)."""
    todo = [t for t in tasks if not os.path.exists(t.done)]
    if parallel <= 1:
        for t in todo:
            if not _ready(t):
                raise _never_ready(t)
            log(f"replicate: {t.kind} {t.name}")
            execute(t.kind, t.args)
        return
    os.makedirs(log_dir, exist_ok=True)
    running: dict[str, tuple[Task, subprocess.Popen, Any, float]] = {}
    try:
        while todo or running:
            while len(running) < parallel:
                t = next((t for t in todo if _ready(t)), None)
                if t is None:
                    break
                todo.remove(t)
                spec = os.path.join(log_dir, t.name + ".json")
                save_json(spec, {"kind": t.kind, "args": t.args})
                handle = open(os.path.join(log_dir, t.name + ".log"), "w")
                proc = subprocess.Popen([sys.executable, "-m", "kdcache.replicate.tasks", spec],
                                        stdout=handle, stderr=subprocess.STDOUT,
                                        env=task_env(parallel))
                running[t.name] = (t, proc, handle, time.perf_counter())
                log(f"replicate: {t.kind} {t.name} started ({len(running)} running, "
                    f"{len(todo)} waiting)")
            if not running and todo:
                raise _never_ready(todo[0])
            time.sleep(0.5)
            for name, (t, proc, handle, started) in list(running.items()):
                if proc.poll() is None:
                    continue
                handle.close()
                del running[name]
                if proc.returncode != 0 or not os.path.exists(t.done):
                    raise TaskError(f"replicate: {t.kind} {name} failed (exit "
                                    f"{proc.returncode}); its log ({handle.name}) ends:\n"
                                    + _tail(handle.name))
                log(f"replicate: {t.kind} {name} done in {time.perf_counter() - started:.0f} s")
    finally:  # an error or Ctrl-C: stop the others; their steps rerun on resume
        for t, proc, handle, _ in running.values():
            proc.terminate()
        for t, proc, handle, _ in running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            handle.close()


# Each of these defaults to every core in every process: with `parallel` processes that is
# `parallel` x cores threads (and Inductor's compile pool: `parallel` x cores worker processes).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS")


def task_env(parallel: int) -> dict[str, str]:
    """The environment of a task process: the machine's cores shared out among the `parallel`
    processes (a variable the user set is kept)."""
    env = dict(os.environ)
    share = str(max(1, (os.cpu_count() or 1) // parallel))
    for name in THREAD_VARIABLES:
        env.setdefault(name, share)
    return env


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return "(no log)"


def main(argv: list[str]) -> int:
    from kdcache.cli import QUIET_ENV, quiet_libraries

    if os.environ.get(QUIET_ENV) == "1":  # as quiet as the command that started the task
        quiet_libraries()
    with open(argv[0]) as fh:
        spec = json.load(fh)
    execute(spec["kind"], spec["args"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
