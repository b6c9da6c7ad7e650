"""kdcache.evaluate: evaluation and analysis of any Hugging Face causal LM directory
(docs/eval.md). It reads models with transformers (`models.py`) and logit datasets through
`kdcache.formats`, and imports neither the teacher dump nor the trainer, so a student, a teacher
or a third-party checkpoint are evaluated the same way.

Evaluation: needle retrieval by distance (`needle.py`, `needle_tasks.py`, `generate.py`) and
general ability on a logit dataset (`lm.py`); `kdcache eval needle / lm` (`eval_commands.py`).
Analysis: the positional probe (`probe.py`, hooks in `capture.py`), checkpoint diff (`diff.py`),
the RoPE planner (`rope_plan.py`) and their figures (`plots.py`); `kdcache probe / diff /
rope-plan` (`analysis_commands.py`). Reports: `report.py`.
"""
