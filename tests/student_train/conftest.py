"""Tiny logit datasets shared by the student-trainer tests (written once per session)."""

from __future__ import annotations

import pytest

from kdcache.formats.synthetic import write_synthetic_dataset

VOCAB = 256


def _write(root, mode: str, windows: int, window: int, kind: str = "topk", seed: int = 0):
    write_synthetic_dataset(root, windows=windows, window=window, vocab_size=VOCAB, k=4,
                            mode=mode, kind=kind, windows_per_shard=4, seed=seed,
                            doc_len=(8, 80))
    return str(root)


@pytest.fixture(scope="session")
def doc_dataset(tmp_path_factory):
    """`document` mode: 12 windows of 128 tokens."""
    return _write(tmp_path_factory.mktemp("st-doc") / "ds", "document", 12, 128)


@pytest.fixture(scope="session")
def doc512_dataset(tmp_path_factory):
    """`document` mode at 512 tokens (the tiny configs cut stage 1 to 256)."""
    return _write(tmp_path_factory.mktemp("st-doc512") / "ds", "document", 4, 512, seed=4)


@pytest.fixture(scope="session")
def causal_dataset(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("st-causal") / "ds", "causal", 8, 128, seed=1)


@pytest.fixture(scope="session")
def docglobal_dataset(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("st-dg") / "ds", "document-global", 8, 128, seed=2)


@pytest.fixture(scope="session")
def sampled_dataset(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("st-sampled") / "ds", "document", 4, 128,
                  kind="sampled", seed=3)


@pytest.fixture(scope="session")
def tiny_run():
    return _tiny_run


def _tiny_run(paths, out_dir, *, steps=4, checkpoint_every=2, window=None, alpha=1.0,
             stages=None, **trainer):
    """A run config dict for a very small student on CPU."""
    base = {
        "model": {"preset": "tiny", "vocab_size": "dataset", "overrides": {"n_layer": 1}},
        "data": {"paths": list(paths), "window": window, "seed": 7},
        "loss": {"alpha": alpha},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "total_steps": 8},
        "trainer": {"max_steps": steps, "checkpoint_every": checkpoint_every,
                    "progress_bar": False, "log_every_n_steps": 1, "accelerator": "cpu",
                    **trainer},
    }
    return {"name": "t", "output_dir": str(out_dir), "defaults": base,
            "stages": stages or [{"name": "s1"}]}
