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

    try:
        with llvmlite_hidden():
            return LLM(**kwargs)
    except (ValueError, RuntimeError) as exc:
        raise error(f"{kwargs.get('model')}: vLLM could not start: {exc}") from exc


def stop_llm(llm: Any) -> None:
    """Shut an offline engine's core down, best effort: the engine is being dropped either way
    (and the process is often about to exit)."""
    if llm is None:
        return
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
