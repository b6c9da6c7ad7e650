"""Corpus reading and packing: formats, counting of bad documents, determinism, windows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdcache.teacher_dump.corpus import (CorpusError, CorpusSpec, CorpusStats, builtin_corpus,
                                         corpus_fingerprint, iter_documents)
from kdcache.teacher_dump.pack import PackConfig, PackStats, pack_token_docs


def _read(path, **kw):
    stats = CorpusStats()
    return list(iter_documents(CorpusSpec(path, **kw), stats)), stats


def test_jsonl_counts_empty_and_undecodable(tmp_path):
    p = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": "one"}).encode(), json.dumps({"text": "  "}).encode(),
             b"{not json", json.dumps({"body": "wrong field"}).encode(), b"\xff\xfe bad utf8",
             json.dumps({"text": "two"}).encode(), b""]
    p.write_bytes(b"\n".join(lines) + b"\n")
    docs, stats = _read(str(p))
    assert docs == [(0, "one"), (1, "two")]
    assert (stats.documents, stats.empty, stats.undecodable) == (2, 1, 3)
    assert any("c.jsonl:3" in s for s in stats.problems)


def test_parquet_txt_folder_and_fsspec_url(tmp_path):
    pq.write_table(pa.table({"body": ["a doc", "", "b doc"]}), tmp_path / "x.parquet")
    docs, stats = _read(str(tmp_path / "x.parquet"), text_field="body")
    assert [t for _, t in docs] == ["a doc", "b doc"] and stats.empty == 1
    with pytest.raises(CorpusError, match="no column 'text'"):
        _read(str(tmp_path / "x.parquet"))
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "b.txt").write_text("second")
    (folder / "a.txt").write_text("first")
    (folder / "c.txt").write_bytes(b"\xff\xff")
    docs, stats = _read(str(folder))
    assert [t for _, t in docs] == ["first", "second"] and stats.undecodable == 1
    import fsspec

    with fsspec.open("memory://kd/corpus.jsonl", "w") as fh:
        fh.write(json.dumps({"text": "in memory"}) + "\n")
    docs, _ = _read("memory://kd/corpus.jsonl")
    assert docs == [(0, "in memory")]
    with pytest.raises(CorpusError, match="not found"):
        _read(str(tmp_path / "missing.jsonl"))


def test_fingerprint_changes_with_content(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "abc"}) + "\n")
    a = corpus_fingerprint(CorpusSpec(str(p)))
    p.write_text(json.dumps({"text": "abd"}) + "\n")
    assert corpus_fingerprint(CorpusSpec(str(p))) != a
    assert list(builtin_corpus(5, 1)) == list(builtin_corpus(5, 1)) != list(builtin_corpus(5, 2))


@pytest.mark.parametrize("size_kib, at_kib", [(100, 70), (128, 127), (600, 300)])
def test_fingerprint_covers_every_byte(tmp_path, size_kib, at_kib):
    """An edit anywhere (the tail of a 64-128 KiB file, the middle of a large one) that keeps the
    size is a different corpus: a resume must not mix old and new text."""
    p = tmp_path / "c.txt"
    data = bytearray(b"x" * (size_kib << 10))
    p.write_bytes(bytes(data))
    before = corpus_fingerprint(CorpusSpec(str(p)))
    data[at_kib << 10] = ord("y")
    p.write_bytes(bytes(data))
    assert corpus_fingerprint(CorpusSpec(str(p))) != before


def _docs(lengths):
    return [(i, list(range(10, 10 + n))) for i, n in enumerate(lengths)]


def test_packing_whole_documents_deterministic():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=200).tolist()
    cfg = PackConfig(window=128, seed=3, shuffle_buffer=50)
    a = list(pack_token_docs(_docs(lengths), cfg, 1, 2, PackStats()))
    b = list(pack_token_docs(_docs(lengths), cfg, 1, 2, PackStats()))
    c = list(pack_token_docs(_docs(lengths), PackConfig(window=128, seed=4, shuffle_buffer=50),
                             1, 2, PackStats()))
    assert [w.tokens.tolist() for w in a] == [w.tokens.tolist() for w in b]
    assert [w.tokens.tolist() for w in a] != [w.tokens.tolist() for w in c]
    seen = []
    for i, w in enumerate(a):
        assert w.window_index == i and 0 < w.n_tokens <= 128
        assert w.doc_offsets[0] == 0 and w.doc_offsets[-1] == w.n_tokens
        for s, e, d in zip(w.doc_offsets[:-1], w.doc_offsets[1:], w.doc_ids):
            assert w.tokens[s] == 1 and w.tokens[e - 1] == 2  # BOS ... EOS
            assert e - s == lengths[d] + 2
            seen.append(int(d))
    assert sorted(seen) == list(range(200))  # every document exactly once


def test_over_long_documents_split_or_dropped():
    lengths = [10, 300, 5]
    stats = PackStats()
    wins = list(pack_token_docs(_docs(lengths), PackConfig(window=128), 1, 2, stats))
    pieces = [(int(w.doc_ids[0]), int(w.doc_pieces[0]), w.n_tokens) for w in wins
              if w.doc_ids[0] == 1]
    assert pieces == [(1, 0, 128), (1, 1, 128), (1, 2, 46)]
    assert (stats.over_long, stats.split, stats.pieces) == (1, 1, 3)
    stats = PackStats()
    wins = list(pack_token_docs(_docs(lengths), PackConfig(window=128, split_long_docs=False),
                                1, 2, stats))
    assert 1 not in {int(d) for w in wins for d in w.doc_ids}
    assert (stats.over_long, stats.dropped_over_long, stats.documents) == (1, 1, 2)
