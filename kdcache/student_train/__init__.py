"""kdcache.student_train: train students from cached teacher targets (docs/student_train.md).

model.py (Llama-style student, presets, HF export) -> rope.py -> data.py (windows -> batches,
resumable order) -> module.py (KD + CE through kdcache.kernels) -> stages.py (YAML stages,
phase-wise RoPE) -> commands.py (`kdcache train`). Kept import-light: `kdcache --help` imports
this package.
"""
