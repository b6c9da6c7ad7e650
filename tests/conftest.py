"""Session-wide test settings. Component fixtures live in tests/<component>/conftest.py."""

import os

# Two cores on CI: keep BLAS/OpenMP from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
