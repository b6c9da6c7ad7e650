"""Golden conformance vectors (FORMAT.md section 12): small datasets of every codec and kind.

`tests/data/golden/cases.json` lists the cases; each case directory holds the writer's input
(`input.npz`), the dataset files kdcache wrote from it (`manifest.json`, `shards/`, `codec/`) and
the decoded arrays (`decoded.npz`). The inputs are built here once, with rows chosen to reach every
branch of the format (tie groups, dq escapes, ids outside the rank table, rank gaps with extra
bits, odd row counts, mass-lowering, values at the edge of the tolerances, windows with no valid
rows); tests feed the stored input back to the writer and compare bytes.

Regenerate (only when the format itself changes, with a new format version):
    PYTHONPATH=. .venv/bin/python -m tests.formats.golden_cases
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

GOLDEN = Path(__file__).resolve().parent.parent / "data" / "golden"
DATASET_FILES = ("manifest.json",)
DATASET_DIRS = ("shards", "codec")
# Manifest fields that name the run rather than the data.
VOLATILE_MANIFEST_FIELDS = ("created_at", "created_by")

CASES: list[dict[str, Any]] = [
    {"name": "qrank-topk", "kind": "topk", "k": 8, "vocab_size": 1000, "codec": "qrank",
     "codec_params": {}, "mode": "document", "window": 80, "windows_per_shard": 2, "table": True},
    {"name": "qrank-topk-k1", "kind": "topk", "k": 1, "vocab_size": 300, "codec": "qrank",
     "codec_params": {}, "mode": "causal", "window": 16, "windows_per_shard": 4, "table": True},
    {"name": "qrank-sampled-counts", "kind": "sampled", "k": 6, "vocab_size": 70000,
     "codec": "qrank", "codec_params": {"draws": 50}, "mode": "causal", "window": 40,
     "windows_per_shard": 2, "table": True},
    {"name": "qrank-sampled-float", "kind": "sampled", "k": 5, "vocab_size": 200,
     "codec": "qrank", "codec_params": {}, "mode": "document-global", "window": 24,
     "windows_per_shard": 4, "table": False},
    {"name": "raw-topk", "kind": "topk", "k": 4, "vocab_size": 256, "codec": "raw",
     "codec_params": {}, "mode": "document", "window": 24, "windows_per_shard": 4, "table": False},
    {"name": "raw-sampled", "kind": "sampled", "k": 4, "vocab_size": 255, "codec": "raw",
     "codec_params": {}, "mode": "causal", "window": 24, "windows_per_shard": 4, "table": False},
    {"name": "qrank-topk-no-valid-rows", "kind": "topk", "k": 4, "vocab_size": 500,
     "codec": "qrank", "codec_params": {}, "mode": "document", "window": 8,
     "windows_per_shard": 4, "table": True},
]


# ---- inputs --------------------------------------------------------------------------------
def _window(rng: np.random.Generator, index: int, n: int, case: dict[str, Any], *,
            doc_len: tuple[int, int] = (3, 30), no_valid: bool = False) -> dict[str, np.ndarray]:
    from kdcache.formats.packing import default_valid
    from kdcache.formats.synthetic import synthetic_targets

    vocab, k = case["vocab_size"], case["k"]
    lengths: list[int] = []
    while sum(lengths) < n:
        lengths.append(min(int(rng.integers(*doc_len)), n - sum(lengths)))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.integers(3, vocab, size=n)
    valid = np.zeros(n, dtype=bool) if no_valid else default_valid(n, offsets, case["mode"])
    ids, values = synthetic_targets(rng, n, vocab, k, kind=case["kind"])
    if case["kind"] == "sampled" and not case["codec_params"].get("draws"):
        # Weights that are not counts of a fixed number of draws: stored as float32.
        w = np.where(ids >= 0, rng.uniform(0.05, 1.0, size=ids.shape), 0.0)
        values = (w / w.sum(axis=1, keepdims=True)).astype(np.float32)
    return {"index": np.array(index), "tokens": tokens, "doc_offsets": offsets, "valid": valid,
            "ids": ids, "values": values.astype(np.float32),
            "doc_ids": np.arange(len(lengths), dtype=np.int64) + 100 * index,
            "doc_pieces": np.zeros(len(lengths), dtype=np.int32)}


def _edge_rows_topk(rng: np.random.Generator, vocab: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows that reach the rare branches of qrank topk (k = 8)."""
    rows = [
        [-1.5, -2.0, -2.0, -2.0, -3.0, -3.0, -4.0, -5.0],  # tie groups: gap symbols
        [-1e-4, -12.0, -12.5, -30.0, -60.0, -100.0, -200.0, -400.0],  # dq escapes; mass ~1
        [-1e-7, -20.0, -20.0, -21.0, -22.0, -23.0, -5000.0, -5000.0],  # top raised for mass <= 1
        [5e-5, -9.0, -9.5, -10.0, -10.5, -11.0, -11.5, -12.0],  # log-prob above 0, in tolerance
        [-1.0, -0.999995, -3.0, -3.1, -3.2, -3.3, -3.4, -3.5],  # ascending by 5e-6, in tolerance
        [-2.1, -2.2, -2.3, -2.4, -2.5, -2.6, -2.7, -2.8],  # flat row
        [-0.01, -5.0, -6.0, -7.0, -8.0, -9.0, -10.0, -13000.0],  # capped (log) piece
    ]
    values = np.array(rows, dtype=np.float32)
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in rows])
    ids[0] = [990, 991, 992, 993, 994, 995, 996, 997]  # high ids: outside the table, extra bits
    return ids.astype(np.int64), values


def build_inputs(case: dict[str, Any]) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(zlib.crc32(case["name"].encode()))
    name = case["name"]
    if name == "qrank-topk":
        wins = [_window(rng, 0, 72, case), _window(rng, 1, 34, case)]
        edge = _window(rng, 2, 16, case, doc_len=(16, 17))  # one document: rows 0..14 valid
        ids, values = _edge_rows_topk(rng, case["vocab_size"], case["k"])
        edge["ids"][:len(ids)], edge["values"][:len(ids)] = ids, values
        wins += [edge, _window(rng, 3, 5, case, no_valid=True)]
    elif name == "qrank-topk-k1":
        wins = [_window(rng, 0, 16, case), _window(rng, 1, 9, case), _window(rng, 2, 1, case)]
    elif name == "raw-topk":
        wins = [_window(rng, 0, case["window"], case), _window(rng, 1, 17, case),
                _window(rng, 2, 3, case, no_valid=True)]
        # Stored exactly: values at the tolerances FORMAT.md section 3 makes readers accept.
        rows = np.flatnonzero(wins[0]["valid"])[:3]
        wins[0]["values"][rows] = np.array(
            [[5e-5, -8.0, -9.0, -10.0],  # log-prob above 0
             [-1.0, -0.999995, -3.0, -4.0],  # ascending by 5e-6
             np.log([0.5, 0.3, 0.2, 0.0008])],  # mass 1.0008
            dtype=np.float32)
    elif name == "qrank-topk-no-valid-rows":
        wins = [_window(rng, 0, 1, case), _window(rng, 1, 6, case, no_valid=True)]
    else:
        w = case["window"]
        wins = [_window(rng, 0, w, case), _window(rng, 1, w - 7, case),
                _window(rng, 2, 3, case, no_valid=True)]
    return wins


def save_inputs(path: Path, windows: list[dict[str, np.ndarray]]) -> None:
    np.savez(path, **{f"w{i}_{key}": arr for i, w in enumerate(windows) for key, arr in w.items()})


def load_inputs(path: Path) -> list[dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    windows: list[dict[str, np.ndarray]] = []
    i = 0
    while f"w{i}_tokens" in arrays:
        windows.append({key.split("_", 1)[1]: arr for key, arr in arrays.items()
                        if key.startswith(f"w{i}_")})
        i += 1
    return windows


# ---- writing -------------------------------------------------------------------------------
def write_case(root: str | os.PathLike, case: dict[str, Any],
               windows: list[dict[str, np.ndarray]]) -> None:
    """Write `windows` with kdcache's writer exactly as the golden dataset was written."""
    from kdcache.formats.manifest import DatasetHeader
    from kdcache.formats.window import WindowRecord
    from kdcache.formats.writer import DatasetWriter, make_codec

    header = DatasetHeader(
        kind=case["kind"], k=case["k"], vocab_size=case["vocab_size"], codec=case["codec"],
        codec_params=dict(case["codec_params"]),
        packing={"window": case["window"], "mode": case["mode"], "bos_id": 1, "eos_id": 2,
                 "seed": 0},
        teacher={"name": "golden", "config_hash": "golden", "tokenizer_hash": "golden"},
        extra={"license": "apache-2.0"})
    codec = None if case["table"] else make_codec(header, None)
    with DatasetWriter(root, header, codec=codec,
                       windows_per_shard=case["windows_per_shard"]) as writer:
        for w in windows:
            writer.add(WindowRecord(window_index=int(w["index"]), tokens=w["tokens"],
                                    doc_offsets=w["doc_offsets"], valid=w["valid"], ids=w["ids"],
                                    values=w["values"], doc_ids=w["doc_ids"],
                                    doc_pieces=w["doc_pieces"]))


def decoded_arrays(root: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every window as kdcache's reader decodes it, keyed w<i>_<field>."""
    from kdcache.formats.reader import open_dataset

    out: dict[str, np.ndarray] = {}
    for i, w in enumerate(open_dataset(root).iter_windows()):
        values = w.logprobs if w.logprobs is not None else w.weights
        out.update({f"w{i}_tokens": w.tokens.numpy(), f"w{i}_valid": w.valid.numpy(),
                    f"w{i}_doc_offsets": w.doc_offsets.numpy(), f"w{i}_ids": w.ids.numpy(),
                    f"w{i}_values": values.numpy()})
    return out


def library_versions() -> dict[str, str]:
    """The libraries whose output bytes the golden files depend on (zstd inside both)."""
    import pyarrow
    import zstandard

    return {"pyarrow": pyarrow.__version__, "zstandard": zstandard.__version__,
            "libzstd": ".".join(map(str, zstandard.ZSTD_VERSION))}


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="kdcache-golden-"))
    try:
        if GOLDEN.exists():
            shutil.rmtree(GOLDEN)
        GOLDEN.mkdir(parents=True)
        for case in CASES:
            out = GOLDEN / case["name"]
            out.mkdir()
            windows = build_inputs(case)
            save_inputs(out / "input.npz", windows)
            windows = load_inputs(out / "input.npz")
            write_case(tmp / case["name"], case, windows)
            for name in DATASET_FILES:
                shutil.copy(tmp / case["name"] / name, out / name)
            for name in DATASET_DIRS:
                if (tmp / case["name"] / name).exists():
                    shutil.copytree(tmp / case["name"] / name, out / name)
            np.savez(out / "decoded.npz", **decoded_arrays(tmp / case["name"]))
        (GOLDEN / "cases.json").write_text(json.dumps(
            {"cases": CASES, "written_with": library_versions()}, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {len(CASES)} golden cases to {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
