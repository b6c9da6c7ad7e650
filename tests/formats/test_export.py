"""`kdcache export --format parquet` and `kdcache.formats.hf_iterable_dataset`: decoded targets
that pandas, polars and Hugging Face datasets read as they are."""

from __future__ import annotations

import glob
import json

import numpy as np
import pytest

from kdcache.cli import main as cli_main
from kdcache.formats.reader import open_dataset
from kdcache.formats.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module", params=["topk", "sampled"])
def dataset(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(f"exp-{request.param}") / "ds")
    write_synthetic_dataset(path, windows=5, window=128, vocab_size=3000, k=8,
                            kind=request.param, windows_per_shard=2, doc_len=(16, 64))
    return path


def _expected(path: str):
    ds = open_dataset(path)
    for i in range(len(ds)):
        w = ds[i]
        vals = (w.logprobs if w.logprobs is not None else w.weights).numpy()
        ids = w.ids.numpy()
        keep = w.valid.numpy()[:, None] & (ids >= 0)
        yield w, [r[m].tolist() for r, m in zip(ids, keep)], \
            [r[m].tolist() for r, m in zip(vals, keep)]


def _check_rows(path: str, rows: list[dict]) -> None:
    ds = open_dataset(path)
    col = "logprobs" if ds.kind == "topk" else "weights"
    assert len(rows) == len(ds)
    for (w, ids, vals), row in zip(_expected(path), rows):
        assert row["window_index"] == w.window_index
        assert list(row["tokens"]) == w.tokens.tolist()
        assert list(row["valid"]) == w.valid.tolist()
        assert [list(r) for r in row["ids"]] == ids
        np.testing.assert_array_equal(np.concatenate([np.asarray(r, np.float32)
                                                      for r in row[col]] or [[]]),
                                      np.concatenate([np.asarray(r, np.float32)
                                                      for r in vals] or [[]]))


def test_export_parquet_read_by_pandas_polars_and_datasets(dataset, tmp_path, capsys):
    out = str(tmp_path / "pq")
    assert cli_main(["export", dataset, "--format", "parquet", "--out", out, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    files = sorted(glob.glob(f"{out}/*.parquet"))
    assert len(files) == summary["files"] == 3

    import pandas as pd
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    _check_rows(dataset, frame.to_dict("records"))

    polars = pytest.importorskip("polars")
    _check_rows(dataset, polars.read_parquet(files).to_dicts())

    datasets = pytest.importorskip("datasets")
    hf = datasets.load_dataset("parquet", data_files=files, split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    _check_rows(dataset, list(hf))


def test_export_refuses_a_non_empty_folder(dataset, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert cli_main(["export", dataset, "--out", str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_hf_iterable_dataset(dataset):
    datasets = pytest.importorskip("datasets")
    from kdcache.formats import hf_iterable_dataset

    it = hf_iterable_dataset(dataset)
    assert isinstance(it, datasets.IterableDataset) and it.num_shards == 3
    _check_rows(dataset, list(it))
    first_shard = list(it.shard(num_shards=3, index=0))
    assert [r["window_index"] for r in first_shard] == [0, 1]
