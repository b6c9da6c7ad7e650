"""The students' corpus: short documents only, with its share of retrieval documents."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from kdcache.errors import KdcacheError
from kdcache.replicate.corpus import write_short_corpus
from kdcache.replicate.presets import ReplicateError, get_preset

NEEDLE = re.compile(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\.")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from kdcache.teacher_dump.make_teacher import TeacherConfig, build_teacher

    out = str(tmp_path_factory.mktemp("tok"))
    build_teacher(out, TeacherConfig(**get_preset("smoke").teacher_model, train_seconds=0),
                  log=lambda m: None)
    return out


def _read(path) -> list[str]:
    with open(path) as fh:
        return [json.loads(line)["text"] for line in fh]


def test_corpus_mixes_its_shares_of_retrieval_documents_within_the_limit(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    preset = replace(get_preset("smoke"), corpus_documents=80, passkey_share=0.25,
                     copy_share=0.125, doc_max_tokens=256, short_window=256, long_window=512)
    record = write_short_corpus(str(tmp_path / "a.jsonl"), tokenizer_dir, preset, seed=0)
    docs = _read(tmp_path / "a.jsonl")
    assert record["documents"] == len(docs) == 80
    counts = {kind: r["documents"] for kind, r in record["by_kind"].items()}
    assert counts == {"text": 50, "passkey": 20, "copy": 10}
    lengths = [len(tok(d, add_special_tokens=False)["input_ids"]) + 2 for d in docs]
    assert max(lengths) <= preset.doc_max_tokens  # BOS + text + EOS, as the dump packs it
    assert sum(lengths) == sum(r["tokens"] for r in record["by_kind"].values())
    passkeys = [d for d in docs if NEEDLE.search(d)]
    assert len(passkeys) == 20
    for doc in passkeys:
        key, again = NEEDLE.search(doc).groups()
        # the needle, then the answer as the evaluation scores it
        assert key == again and doc.endswith(f"What is the pass key? The pass key is {key}.")
        assert doc.count(key) == 3
    copies = [d.split() for d in docs if not NEEDLE.search(d)
              and len(d.split()) % 2 == 0 and d.split()[:len(d.split()) // 2]
              == d.split()[len(d.split()) // 2:]]
    assert len(copies) == 10
    assert len({len(c) for c in copies}) > 3  # the copied length varies per document
    # the kinds are interleaved, not in blocks
    first_passkey = next(i for i, d in enumerate(docs) if NEEDLE.search(d))
    assert first_passkey < 40

    again = write_short_corpus(str(tmp_path / "b.jsonl"), tokenizer_dir, preset, seed=0)
    assert _read(tmp_path / "b.jsonl") == docs and again["by_kind"] == record["by_kind"]
    write_short_corpus(str(tmp_path / "c.jsonl"), tokenizer_dir, preset, seed=1)
    assert _read(tmp_path / "c.jsonl") != docs


def test_prose_only_corpus_and_a_limit_too_short_for_a_passkey(tokenizer_dir, tmp_path):
    preset = replace(get_preset("smoke"), corpus_documents=30, passkey_share=0.0,
                     copy_share=0.0)
    record = write_short_corpus(str(tmp_path / "p.jsonl"), tokenizer_dir, preset, seed=0)
    assert record["by_kind"]["text"]["documents"] == 30
    assert record["by_kind"]["passkey"]["documents"] == 0
    short = replace(preset, passkey_share=0.1, doc_max_tokens=64)
    with pytest.raises(ReplicateError, match="too short for a passkey document"):
        write_short_corpus(str(tmp_path / "s.jsonl"), tokenizer_dir, short, seed=0)
    tiny = replace(preset, copy_share=0.1, doc_max_tokens=12)
    with pytest.raises(ReplicateError, match="too short for a copying document"):
        write_short_corpus(str(tmp_path / "t.jsonl"), tokenizer_dir, tiny, seed=0)
    with pytest.raises(KdcacheError, match="sum to at most 1"):
        get_preset("smoke", passkey_share=0.7, copy_share=0.5)
