"""Evaluation of any Hugging Face causal LM directory: needle retrieval by distance
(`needle.py`, `needle_tasks.py`, `generate.py`) and general ability on a logit dataset (`lm.py`).
"""
