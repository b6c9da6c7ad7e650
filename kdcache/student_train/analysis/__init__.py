"""The paper's analyses as tools: the positional probe (`probe.py`, hooks in `capture.py`),
checkpoint diff (`diff.py`) and the RoPE planner (`rope_plan.py`)."""
