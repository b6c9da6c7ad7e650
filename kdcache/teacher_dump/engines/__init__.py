"""Teacher engines behind one protocol (`TeacherEngine.topk`); see base.py for the contract."""

from __future__ import annotations

from kdcache.teacher_dump.engines.base import (EngineConfig, EngineError, TeacherEngine,
                                               WindowTargets, chunked_topk)
from kdcache.teacher_dump.engines.hf import HFEngine
from kdcache.teacher_dump.engines.vllm import VLLMEngine

ENGINES = ("vllm", "hf")


def make_engine(name: str, cfg: EngineConfig) -> TeacherEngine:
    """Build an engine by name (vLLM and transformers are imported by the engines' constructors:
    importing this package stays light)."""
    if name == "vllm":
        return VLLMEngine(cfg)
    if name == "hf":
        return HFEngine(cfg)
    raise EngineError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")


__all__ = ["ENGINES", "EngineConfig", "EngineError", "TeacherEngine", "WindowTargets",
           "chunked_topk", "make_engine"]
