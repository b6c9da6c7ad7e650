"""A kdcache dataset as a Hugging Face `datasets.IterableDataset` (pip install kdcache[hf]).

Rows are those of `kdcache export` (kdcache.formats.export): one per window, decoded targets as
nested lists. Shards are the iterable's shards, so `datasets`' DataLoader workers, `shard()` and
`shuffle()` split and reorder them without reading everything. Nothing is cached or copied:
windows are decoded as they are iterated, from a local path or any fsspec URL.
"""

from __future__ import annotations

from typing import Any, Iterator

from kdcache.errors import KdcacheError
from kdcache.formats.export import export_schema, shard_table
from kdcache.formats.reader import open_dataset


def _rows(path: str, shards: list[int]) -> Iterator[dict[str, Any]]:
    ds = open_dataset(path)
    for s in shards:
        yield from shard_table(ds, s).to_pylist()


def hf_iterable_dataset(path: str):
    """`datasets.IterableDataset` over a kdcache dataset's windows."""
    try:
        import datasets
    except ImportError:
        raise KdcacheError("Hugging Face datasets is not installed: pip install 'kdcache[hf]' "
                           "(or read kdcache datasets with kdcache.formats.open_dataset)") from None
    ds = open_dataset(path)
    features = datasets.Features.from_arrow_schema(export_schema(ds))
    return datasets.IterableDataset.from_generator(
        _rows, features=features,
        gen_kwargs={"path": ds.root, "shards": list(range(len(ds.shards)))})
