"""Teacher engines behind one protocol (`TeacherEngine.topk`); see base.py for the contract."""

from __future__ import annotations

from kdcache.teacher_dump.engines.base import (EngineConfig, EngineError, TeacherEngine,
                                               WindowTargets, chunked_topk)

ENGINES = ("vllm", "hf")


def make_engine(name: str, cfg: EngineConfig) -> TeacherEngine:
    """Build an engine by name; vLLM and transformers are imported only here."""
    if name == "vllm":
        from kdcache.teacher_dump.engines.vllm import VLLMEngine

        return VLLMEngine(cfg)
    if name == "hf":
        from kdcache.teacher_dump.engines.hf import HFEngine

        return HFEngine(cfg)
    raise EngineError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")


__all__ = ["ENGINES", "EngineConfig", "EngineError", "TeacherEngine", "WindowTargets",
           "chunked_topk", "make_engine"]
