"""Session-wide test settings. Component fixtures live in tests/<component>/conftest.py."""

import os

# Two cores on CI: keep BLAS/OpenMP from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The Triton kernel tests run in Triton's interpreter (CI has no GPU). Triton reads this when a
# kernel is decorated, and other tests (vLLM, Lightning) import triton first, so it is set here,
# before anything is imported. On a GPU machine, TRITON_INTERPRET=0 tests compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
