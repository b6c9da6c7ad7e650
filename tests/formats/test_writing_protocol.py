"""The dataset-writing protocol every writer follows (formats/writer.py): begin_dataset stores the
codec table before any shard, shards are named by shard_name, finish_dataset writes the card and
then the manifest with the codec's full parameters; and storage.atomic_directory."""

import numpy as np
import pytest

from kdcache.formats import storage
from kdcache.formats.manifest import TABLE_PATH, DatasetHeader
from kdcache.formats.reader import open_dataset
from kdcache.formats.synthetic import synthetic_window
from kdcache.formats.verify import verify_dataset
from kdcache.formats.writer import (begin_dataset, dataset_finished, finish_dataset, make_codec,
                                    read_finished_manifest, read_stored_codec_table, shard_name,
                                    shard_name_of, shard_path, write_shard)


def _header(codec="qrank"):
    return DatasetHeader(kind="topk", k=8, vocab_size=500, codec=codec,
                         packing={"window": 64, "mode": "document"})


def _windows(n_windows, seed=0):
    rng = np.random.default_rng(seed)
    return [synthetic_window(rng, i, 64, 500, 8, mode="document", doc_len=(4, 24))
            for i in range(n_windows)]


def test_shard_names_round_trip():
    assert shard_name(3) == "shard-00003"
    assert shard_name_of(shard_path(shard_name(12))) == "shard-00012"


def test_protocol_by_steps_gives_a_verified_dataset(tmp_path):
    root = str(tmp_path / "ds")
    header = _header()
    windows = _windows(6)
    codec = begin_dataset(root, header, sample_ids=windows[0].ids[windows[0].valid])
    assert codec.table is not None
    assert read_stored_codec_table(root) == codec.table  # stored before any shard
    assert not dataset_finished(root)
    # a worker elsewhere rebuilds the codec from the header and the stored table
    worker_codec = make_codec(header, read_stored_codec_table(root))
    shards = [write_shard(root, shard_name(i), windows[3 * i:3 * i + 3], header, worker_codec)
              for i in range(2)]
    assert header.codec_params == {}  # make_codec does not touch the header
    manifest = finish_dataset(root, header, shards, table=codec.table)
    assert dataset_finished(root)
    assert read_finished_manifest(root)["totals"] == manifest["totals"]
    assert manifest["codec"]["params"] == codec.config()  # every parameter, defaults included
    assert manifest["codec"]["table"]["path"] == TABLE_PATH
    assert verify_dataset(root).ok
    ds = open_dataset(root)
    assert len(ds) == 6 and [s["name"] for s in manifest["shards"]] == [
        "shards/shard-00000.arrow", "shards/shard-00001.arrow"]


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with storage.atomic_directory(str(target)) as tmp:
        (tmp_path / tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError, match="midway"):
        with storage.atomic_directory(str(target)) as tmp:
            (tmp_path / tmp / "a.txt").write_text("two")
            raise RuntimeError("midway")
    assert (target / "a.txt").read_text() == "one"  # the old directory, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left
    with storage.atomic_directory(str(target)) as tmp:
        (tmp_path / tmp / "b.txt").write_text("three")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
