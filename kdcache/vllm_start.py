"""Starting vLLM's offline `LLM` inside a kdcache process: the environment it reads and the
llvmlite work-around. Used by the teacher engine and by the evaluation generator.

vLLM itself is imported inside `start_llm`: importing it takes seconds and the machines that only
train or evaluate with transformers do not have it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator


def configure_vllm_env(kv_cache_gib: float) -> None:
    """Environment vLLM reads at import / engine start (set before importing vllm)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(kv_cache_gib)))))
    # One in-process engine core: the default three spawned processes cost most of vLLM-CPU's
    # start-up time.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is for --json
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # flashinfer is an optional extra


@contextlib.contextmanager
def llvmlite_hidden() -> Iterator[None]:
    """vLLM-CPU 0.32's kernel registration scans every module namespace and calls
    `vars(value).get(...)` on anything with a `__dict__` attribute; llvmlite's `ffi.lib` answers
    any attribute (including `__dict__`) with a function wrapper, so engine start crashes with
    "'_lib_fn_wrapper' object has no attribute 'get'" once numba (used by kdcache's codecs) is
    imported in the same process. Hide those objects for the duration of engine start."""
    hidden = []
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attr, value in list(namespace.items()):
            if (type(value).__name__ == "_lib_wrapper"
                    and type(value).__module__.startswith("llvmlite")):
                hidden.append((namespace, attr, value))
                namespace[attr] = None
    try:
        yield
    finally:
        for namespace, attr, value in hidden:
            namespace[attr] = value


def start_llm(error: type[Exception], **kwargs: Any):
    """`vllm.LLM(**kwargs)` with llvmlite hidden while it starts (call `configure_vllm_env`
    first). vLLM's own start-up errors are raised as `error` (the caller's kdcache error),
    naming the model."""
    from vllm import LLM
    from vllm.platforms import current_platform

    ranks = (kwargs.get("tensor_parallel_size") or 1, kwargs.get("pipeline_parallel_size") or 1)
    bind = None
    if current_platform.is_cpu() and ranks[0] * ranks[1] > 1:
        if ranks[1] > 1:
            # vLLM-CPU 0.32: a later stage's first step fails (its intermediate tensors are
            # never allocated), for generation and pooling alike
            raise error(f"{kwargs.get('model')}: vLLM-CPU cannot run pipeline parallel "
                        f"(--pipeline-parallel {ranks[1]}); use tensor parallel or one stage")
        bind = cpu_bind_for_ranks(ranks[0] * ranks[1], error)
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    try:
        if bind is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
        with llvmlite_hidden():
            return LLM(**kwargs)
    except (ValueError, RuntimeError) as exc:
        raise error(f"{kwargs.get('model')}: vLLM could not start: {exc}") from exc
    finally:
        if bind is not None:  # the ranks have read it; the next engine picks its own
            if saved is None:
                os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
            else:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved


def cpu_bind_for_ranks(ranks: int, error: type[Exception]) -> str | None:
    """vLLM-CPU binds each rank's OpenMP threads to a NUMA node and refuses more ranks than
    nodes ("Not enough allowed NUMA nodes"), which is every one-socket machine. Give each rank
    an equal share of the engine's CPUs ("0|1" for two ranks on two cores): those that
    VLLM_CPU_OMP_THREADS_BIND names as one list (what the dump's actor pool gives each engine),
    else those this process may use. A value already split per rank ("a|b"), "auto" or "nobind"
    is the user's: None keeps it."""
    given = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "").strip()
    if "|" in given or given in ("auto", "nobind"):
        return None
    try:
        cpus = _cpu_list(given) if given else sorted(os.sched_getaffinity(0))
    except ValueError:
        raise error(f"VLLM_CPU_OMP_THREADS_BIND={given!r} is not a CPU list such as "
                    "'0,2,4-7' (or 'a|b' per rank, 'auto', 'nobind')") from None
    if len(cpus) < ranks:
        raise error(f"{ranks} vLLM-CPU ranks need at least {ranks} CPUs; this engine may use "
                    f"{len(cpus)}")
    share = len(cpus) // ranks
    return "|".join(",".join(str(c) for c in cpus[r * share:(r + 1) * share])
                    for r in range(ranks))


def _cpu_list(text: str) -> list[int]:
    """CPU ids of a list such as "0,2,4-7" (vLLM's binding syntax for one rank)."""
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def stop_llm(llm: Any) -> None:
    """Shut an offline engine's core down, best effort: the engine is being dropped either way
    (and the process is often about to exit)."""
    if llm is None:
        return
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
